//! `kiln affected RANGE`: the recipes a git diff range touches, so CI builds
//! and validates only those. A recipe is touched when its file, its lock,
//! a recipe it `extends`, one of its role templates or value types, or a
//! file under one of its overlays changed.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::args::AffectedArgs;
use crate::image::recipe::Recipe;

/// One recipe the range touches, and the changed files that touch it.
#[derive(Debug, Serialize, PartialEq)]
pub(crate) struct AffectedRecipe {
    /// As found: `--recipes` joined with the file name (`recipes/lb.toml`).
    pub recipe: PathBuf,
    pub name: String,
    pub version: String,
    /// Changed paths (relative to the repository) that are its inputs.
    pub because: Vec<String>,
}

pub fn affected(a: AffectedArgs) -> Result<()> {
    let (top, changed) = changed_files(&a.recipes, &a.range)?;
    let found = affected_by(&a.recipes, &top, &changed)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "range": a.range, "changed": changed, "recipes": found })
        );
    } else {
        for r in &found {
            println!("{}", r.recipe.display());
        }
    }
    Ok(())
}

/// The repository's top directory and the paths (relative to it) that
/// `git diff RANGE` names; a rename counts as its old and its new path.
fn changed_files(dir: &Path, range: &str) -> Result<(PathBuf, Vec<String>)> {
    if range.starts_with('-') || range.trim().is_empty() {
        bail!("`{range}` is not a git revision range (e.g. origin/main...HEAD)");
    }
    let git = |args: &[&str]| -> Result<Vec<u8>> {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .context("cannot run git (apt install git)")?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            bail!(
                "git {} failed: {}",
                args.join(" "),
                err.lines().next().unwrap_or("").trim()
            );
        }
        Ok(out.stdout)
    };
    let top = String::from_utf8(git(&["rev-parse", "--show-toplevel"])?)
        .context("git rev-parse: the path is not UTF-8")?;
    let names = git(&["diff", "--name-only", "-z", "--no-renames", range, "--"])?;
    let changed = names
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect();
    Ok((PathBuf::from(top.trim_end()), changed))
}

/// The recipes in `dir` (each `*.toml` directly in it) whose inputs include
/// one of `changed` (paths relative to `top`), sorted by file name. A file
/// that does not load is an error unless another recipe extends it (a base
/// such as base.toml, never built on its own).
pub(crate) fn affected_by(
    dir: &Path,
    top: &Path,
    changed: &[String],
) -> Result<Vec<AffectedRecipe>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read recipe directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    let mut loaded = Vec::new();
    let mut failed = Vec::new();
    for f in files {
        match Recipe::load(&f) {
            Ok(r) => loaded.push((f, r)),
            Err(e) => failed.push((f, e)),
        }
    }
    let extended: Vec<PathBuf> = loaded
        .iter()
        .flat_map(|(_, r)| r.sources.iter().filter_map(|s| s.canonicalize().ok()))
        .collect();
    for (f, e) in failed {
        let is_base = f.canonicalize().is_ok_and(|c| extended.contains(&c));
        if !is_base {
            return Err(e);
        }
    }
    let top = top
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", top.display()))?;
    let mut found = Vec::new();
    for (file, r) in loaded {
        let inputs = Inputs::of(&r)?;
        let because: Vec<String> = changed
            .iter()
            .filter(|c| inputs.contains(&top.join(c)))
            .cloned()
            .collect();
        if !because.is_empty() {
            found.push(AffectedRecipe {
                recipe: file,
                name: r.name,
                version: r.version,
                because,
            });
        }
    }
    Ok(found)
}

/// A recipe's inputs as absolute, symlink-free paths.
struct Inputs {
    files: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
}

impl Inputs {
    fn of(r: &Recipe) -> Result<Inputs> {
        let real = |p: &Path| {
            p.canonicalize()
                .with_context(|| format!("cannot resolve {}", p.display()))
        };
        let mut files = r
            .sources
            .iter()
            .map(|p| real(p))
            .collect::<Result<Vec<_>>>()?;
        // The lock need not exist yet (a recipe awaiting `kiln lock`).
        let lock = r.lock_path();
        let dir = match r.dir() {
            d if d.as_os_str().is_empty() => Path::new("."),
            d => d,
        };
        files.push(real(dir)?.join(lock.file_name().context("a lock has a file name")?));
        let dirs = r
            .all_overlays()
            .iter()
            .map(|o| real(&r.overlay_dir(o)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Inputs { files, dirs })
    }

    fn contains(&self, p: &Path) -> bool {
        self.files.iter().any(|f| f == p) || self.dirs.iter().any(|d| p.starts_with(d))
    }
}
