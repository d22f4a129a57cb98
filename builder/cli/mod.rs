//! The command-line front end's verbs: each turns its arguments (`args`)
//! into the library's options, runs it, and prints a summary or `--json` for CI.

mod affected;
pub mod args;
mod diff;
mod env;
mod global;
mod publish;
mod sign;
mod validate;

pub use affected::affected;
pub use args::*;
pub use diff::diff;
pub use env::env;
pub use global::{completions, init, man, parse};
pub use publish::{publish, templates};
pub use sign::{sign, verify};
pub use validate::validate;

use anyhow::{Context, Result};
use serde_json::json;

use crate::image::fetch::Cache;
use crate::image::lock::Lockfile;
use crate::image::pipeline::{BuildOptions, BuildOutcome};
use crate::image::recipe::Recipe;

pub fn check(a: CheckArgs) -> Result<()> {
    let recipe = Recipe::load(&a.recipe)?;
    let lock_path = recipe.lock_path();
    let lock = Lockfile::load(&lock_path)?;
    let lock_state = match &lock {
        None => "missing".to_string(),
        Some(l) => {
            l.check_matches(&recipe, &lock_path)?;
            if l.packages.is_empty() {
                "ok (packages pinned at the next build)".into()
            } else {
                "ok".into()
            }
        }
    };
    if a.json {
        println!(
            "{}",
            json!({
                "recipe": recipe.path,
                "name": recipe.name,
                "version": recipe.version,
                "digest": recipe.digest(),
                "lock": lock_state,
                // What the base stage runs, for benchmarks and debugging.
                "mmdebstrap": lock.as_ref().map(|l| crate::image::rootfs::mmdebstrap_args(&recipe, l, std::path::Path::new("OUT.tar"))),
                "source_date_epoch": lock.as_ref().map(|l| l.source_date_epoch),
            })
        );
    } else {
        println!(
            "{}: ok ({} {}, {} packages requested, {} artifacts, {} overlays, roles: {})",
            recipe.path.display(),
            recipe.name,
            recipe.version,
            recipe.requested_packages().len(),
            recipe.artifacts.len(),
            recipe.all_overlays().len(),
            recipe.roles.keys().cloned().collect::<Vec<_>>().join(", ")
        );
        if lock_state == "missing" {
            println!("lock: missing: run `kiln lock {}`", recipe.path.display());
        } else {
            println!("lock: {lock_state}");
        }
    }
    Ok(())
}

pub fn lock(a: LockArgs) -> Result<()> {
    use crate::image::lock::Update;
    let (recipe_path, update) = match (a.recipe, a.update) {
        (Some(r), None) => (r, Update::Nothing),
        (Some(r), Some(n)) if n.is_empty() => (r, Update::All),
        (Some(r), Some(n)) => (r, Update::Pin(n)),
        // `kiln lock --update RECIPE`: clap hands the recipe to `--update`.
        (None, Some(n)) if !n.is_empty() => (std::path::PathBuf::from(n), Update::All),
        (None, _) => anyhow::bail!("kiln lock needs a recipe: kiln lock RECIPE [--update [NAME]]"),
    };
    let recipe = Recipe::load(&recipe_path)?;
    let path = recipe.lock_path();
    let old = Lockfile::load(&path)?;
    let cache = Cache::from_env()?;
    let auth = crate::image::airgap::registry_auth(a.docker_config.as_deref())?;
    let resolve_image = |r: &str| crate::image::airgap::resolve_reference(r, &auth);
    let show = crate::util::progress::enabled(a.json);
    let new = crate::image::lock::relock(
        &recipe,
        old.as_ref(),
        &cache,
        &resolve_image,
        &crate::image::lock::LockOptions {
            update,
            show_progress: show,
        },
    )?;
    let changed = old.as_ref() != Some(&new);
    if changed {
        new.save(&path)?;
    }
    if a.json {
        println!(
            "{}",
            json!({ "lock": path, "changed": changed, "artifacts": new.artifacts.len(), "images": new.images.len(), "packages": new.packages.len() })
        );
    } else {
        println!(
            "{} {}",
            path.display(),
            if changed { "written" } else { "unchanged" }
        );
    }
    Ok(())
}

pub fn build(a: BuildArgs) -> Result<()> {
    let show = crate::util::progress::enabled(a.json);
    // Validation boots the staged image, so only a validated image is published.
    let vopts = crate::validate::ValidateOptions {
        accel: a.accel,
        progress: show,
        ..Default::default()
    };
    let validate = |dir: &std::path::Path| crate::validate::validate_image(dir, &vopts).map(drop);
    let opts = BuildOptions {
        out: a.out.clone(),
        cache: Cache::from_env()?,
        force: a.force,
        locked: a.locked,
        show_progress: show,
        registry_auth: crate::image::airgap::registry_auth(a.docker_config.as_deref())?,
        before_promote: (!a.no_validate)
            .then_some(&validate as crate::image::pipeline::BeforePromote<'_>),
    };
    let started = std::time::Instant::now();
    let outcome = crate::image::pipeline::build(&a.recipe, &opts)?;
    print_build(&outcome, a.json, started.elapsed().as_secs_f64());
    Ok(())
}

fn print_build(o: &BuildOutcome, json_out: bool, seconds: f64) {
    let m = &o.manifest;
    let manifest_path = o.dir.join(crate::image::manifest::MANIFEST_FILE);
    if json_out {
        println!(
            "{}",
            json!({
                "manifest": manifest_path,
                "id": m.id,
                "name": m.name,
                "version": m.version,
                "disk": o.dir.join(&m.disk.file),
                "up_to_date": o.up_to_date,
                "validated": m.validation.as_ref().map(|v| v.validated),
                "seconds": (seconds * 100.0).round() / 100.0,
                "peak_rss_bytes": crate::util::peak_rss_bytes(),
            })
        );
        return;
    }
    if o.up_to_date {
        println!(
            "{} {} is up to date: {}",
            m.name,
            m.version,
            o.dir.display()
        );
        println!("id {}", m.id);
        return;
    }
    println!("built {} {} in {:.1}s", m.name, m.version, seconds);
    for s in &m.stages {
        let note = match &s.reused {
            Some(r) => format!(" ({} of {} {} reused)", r.reused, r.total, r.unit),
            None if s.cached => " (cached)".to_string(),
            None => String::new(),
        };
        println!("  {:<9} {:>7.2}s{note}", s.stage, s.seconds);
    }
    for (kind, f) in m.outputs() {
        let extra = match kind {
            crate::image::contract::OutputKind::Disk => format!(
                "{} qcow2, {} virtual",
                crate::util::human_bytes(f.size),
                crate::util::human_bytes(m.disk.virtual_size)
            ),
            crate::image::contract::OutputKind::Lxc => crate::util::human_bytes(f.size),
            crate::image::contract::OutputKind::Sbom => {
                format!("SPDX 2.3, {}", crate::util::human_bytes(f.size))
            }
        };
        println!(
            "  {:<9} {} ({extra})",
            kind.label(),
            o.dir.join(&f.file).display()
        );
    }
    println!(
        "  packages  {}; hygiene: {} cleaned, {} violations",
        m.packages.len(),
        m.hygiene.cleaned.len(),
        m.hygiene.violations.len()
    );
    if let Some(v) = &m.validation {
        let passed = v.checks.iter().filter(|c| c.passed).count();
        println!(
            "  validated {} ({passed}/{} checks passed, {}, cloud-init done after {})",
            if v.validated { "yes" } else { "NO" },
            v.checks.len(),
            v.accel,
            v.boot_to_cloud_init_seconds
                .map(|s| format!("{s:.0}s"))
                .unwrap_or_else(|| "-".into())
        );
    } else {
        println!("  validated no (--no-validate)");
    }
    println!("  manifest  {}", manifest_path.display());
    println!("id {}", m.id);
}

pub fn cloud_init(c: CloudInitCommand) -> Result<()> {
    match c {
        CloudInitCommand::Render(a) => {
            let recipe = Recipe::load(&a.recipe)?;
            let values = crate::image::cloudinit::load_values(&a.values)?;
            let text = crate::image::cloudinit::render(&recipe, &a.role, &values)?;
            match a.out {
                // User-data holds the node's secrets (K3s token, keys).
                Some(p) => crate::util::write_private(&p, text.as_bytes())
                    .with_context(|| format!("cannot write {}", p.display()))?,
                None => print!("{text}"),
            }
            Ok(())
        }
    }
}

/// Print an error as one line: `error: cause: cause: ...`.
pub fn report_error(e: &anyhow::Error) {
    use crate::util::term::{paint, Style};
    eprintln!("{} {e:#}", paint(Style::Error, "error:"));
}

pub fn exit_code(e: &anyhow::Error) -> i32 {
    if crate::util::interrupt::is_interrupt(e) {
        130
    } else {
        1
    }
}

/// `kiln cache du|gc`: what the cache holds, and trimming it.
pub fn cache(c: CacheCommand) -> Result<()> {
    use crate::image::cachegc;
    let cache = Cache::from_env()?;
    match c {
        CacheCommand::Du(a) => {
            let du = cachegc::du(&cache);
            if a.json {
                println!("{}", serde_json::to_string_pretty(&du)?);
                return Ok(());
            }
            println!("{}", du.cache.display());
            for area in &du.areas {
                println!(
                    "  {:<10} {:>10}  {} entries",
                    area.area.name(),
                    crate::util::human_bytes(area.bytes),
                    area.entries
                );
            }
            println!(
                "  {:<10} {:>10}",
                "other",
                crate::util::human_bytes(du.other_bytes)
            );
            println!(
                "  {:<10} {:>10}",
                "total",
                crate::util::human_bytes(du.total_bytes)
            );
        }
        CacheCommand::Gc(a) => {
            let report = cachegc::gc(&cache, a.keep, a.dry_run)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
                return Ok(());
            }
            let verb = if a.dry_run { "would remove" } else { "removed" };
            for r in &report.removed {
                println!(
                    "{verb} {} {} ({})",
                    r.area.name(),
                    r.id,
                    crate::util::human_bytes(r.bytes)
                );
            }
            for r in &report.in_use {
                println!(
                    "kept {} {} (in use by a running build)",
                    r.area.name(),
                    r.id
                );
            }
            println!(
                "{} {} in {} entries",
                if a.dry_run { "would free" } else { "freed" },
                crate::util::human_bytes(report.freed_bytes),
                report.removed.len()
            );
        }
    }
    Ok(())
}
