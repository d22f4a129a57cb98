//! The cache's upkeep: the locks that say which builds use which entries,
//! the records of what each build used, and `kiln cache du|gc`.
//!
//! Layout of `$KILN_CACHE` (see [`Cache`], [`crate::image::rootfs`],
//! [`crate::image::reuse`], [`crate::image::airgap::oci_cache_dir`]):
//!
//! | area | files | lock |
//! | --- | --- | --- |
//! | bases | `rootfs/<key>.{tar,json}` | `rootfs/<key>.lock` |
//! | blobs (artifacts) | `blobs/sha256/<hex>` | `locks/blobs/<hex>.lock` |
//! | oci (container image blobs) | `oci/blobs/sha256/<hex>` | `locks/oci.lock` (the whole area) |
//! | references | `references/<name>{,.idx}` | `references/<name>.lock` |
//! | tmp (scratch) | `tmp/<prefix><random>/`, `tmp/.download-*` | `.kiln-lock` inside, or the file itself |
//!
//! A build holds a shared lock on every entry it uses until it ends (a
//! reference only while it opens or replaces it: it reads the file it
//! opened); filling or repairing an entry takes the exclusive lock. `gc`
//! removes an entry only under its exclusive lock, so never one in use.
//!
//! A successful build records what it used in `usage/<recipe>/<time>-<pid>.json`;
//! `gc --keep N` keeps what the N newest records of each recipe name.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::image::fetch::Cache;
use crate::util::locks::{Held, Mode, Swept};

/// The parts of the cache, as `du` and `gc` name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Area {
    Bases,
    Blobs,
    Oci,
    References,
    Tmp,
}

impl Area {
    pub(crate) const ALL: [Area; 5] = [
        Area::Bases,
        Area::Blobs,
        Area::Oci,
        Area::References,
        Area::Tmp,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Area::Bases => "bases",
            Area::Blobs => "blobs",
            Area::Oci => "oci",
            Area::References => "references",
            Area::Tmp => "tmp",
        }
    }

    /// The area's directory under the cache root.
    pub(crate) fn dir(self) -> &'static str {
        match self {
            Area::Bases => "rootfs",
            Area::Blobs => "blobs",
            Area::Oci => "oci",
            Area::References => "references",
            Area::Tmp => "tmp",
        }
    }
}

/// The lock of the artifact blob `sha256` (hex).
pub(crate) fn blob_lock(cache: &Cache, sha256: &str) -> PathBuf {
    cache
        .root
        .join("locks/blobs")
        .join(format!("{sha256}.lock"))
}

/// The lock of the whole OCI area: shared by builds that bake images.
pub(crate) fn oci_lock(cache: &Cache) -> PathBuf {
    cache.root.join("locks/oci.lock")
}

fn gc_lock(cache: &Cache) -> PathBuf {
    cache.root.join("locks/gc.lock")
}

/// Remove what killed builds left in the cache's scratch area.
pub(crate) fn sweep_tmp(cache: &Cache, dry_run: bool) -> Vec<Swept> {
    crate::util::locks::sweep(&cache.root.join("tmp"), "", dry_run)
}

/// Take a shared lock on a cache entry for as long as the returned guard
/// lives, filling or repairing the entry first when it is not `ready`.
///
/// `ready` runs under the shared lock and says whether the entry can be used
/// as it is (it must not change the entry); `make` runs under the exclusive
/// lock and fills or repairs it. A flock cannot be turned from exclusive into
/// shared atomically, so `ready` is asked again afterwards.
pub(crate) fn use_entry<T>(
    lock: &Path,
    what: &str,
    mut ready: impl FnMut() -> Result<Option<T>>,
    mut make: impl FnMut() -> Result<()>,
) -> Result<(T, Held)> {
    for _ in 0..3 {
        let shared = Held::acquire(lock, Mode::Shared, what)?;
        if let Some(v) = ready()? {
            return Ok((v, shared));
        }
        drop(shared);
        let exclusive = Held::acquire(lock, Mode::Exclusive, what)?;
        if ready()?.is_none() {
            make()?;
        }
        drop(exclusive);
    }
    bail!("{what} in the cache keeps changing under this build (is `kiln cache gc` running in a loop?)")
}

/// What one build used from the cache, by area (entry ids).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Usage {
    #[serde(default)]
    pub bases: BTreeSet<String>,
    #[serde(default)]
    pub blobs: BTreeSet<String>,
    #[serde(default)]
    pub oci: BTreeSet<String>,
    #[serde(default)]
    pub references: BTreeSet<String>,
}

impl Usage {
    fn ids(&self, area: Area) -> Option<&BTreeSet<String>> {
        match area {
            Area::Bases => Some(&self.bases),
            Area::Blobs => Some(&self.blobs),
            Area::Oci => Some(&self.oci),
            Area::References => Some(&self.references),
            Area::Tmp => None,
        }
    }
}

/// Record what a build of `recipe` used (only a hint for `gc`: failing to
/// write it is not a failed build).
pub(crate) fn record_use(cache: &Cache, recipe: &str, usage: &Usage) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let path = cache
        .root
        .join("usage")
        .join(recipe)
        .join(format!("{nanos:020}-{}.json", std::process::id()));
    let written = serde_json::to_vec_pretty(usage)
        .map_err(anyhow::Error::from)
        .and_then(|b| crate::util::write_hint(&path, &b));
    if let Err(e) = written {
        crate::util::term::warn(format!(
            "cannot record the cache entries this build used: {e:#}"
        ));
    }
}

/// Each recipe's usage records, newest first; and the unreadable ones.
type Records = BTreeMap<String, Vec<(PathBuf, Usage)>>;

fn records(cache: &Cache) -> (Records, Vec<PathBuf>) {
    let (mut out, mut bad) = (BTreeMap::new(), Vec::new());
    let Ok(rd) = std::fs::read_dir(cache.root.join("usage")) else {
        return (out, bad);
    };
    for recipe in rd.flatten() {
        let Ok(files) = std::fs::read_dir(recipe.path()) else {
            continue;
        };
        let mut list = Vec::new();
        for p in files.flatten().map(|f| f.path()) {
            if p.extension().is_none_or(|x| x != "json") {
                continue;
            }
            match std::fs::read(&p)
                .ok()
                .and_then(|b| serde_json::from_slice::<Usage>(&b).ok())
            {
                Some(u) => list.push((p, u)),
                None => bad.push(p),
            }
        }
        list.sort_by(|a, b| b.0.cmp(&a.0));
        out.insert(recipe.file_name().to_string_lossy().into_owned(), list);
    }
    (out, bad)
}

/// One entry of an area: its files and its lock.
#[derive(Debug, Clone)]
struct Entry {
    id: String,
    files: Vec<PathBuf>,
    /// `None` for OCI blobs (the area has one lock) and scratch.
    lock: Option<PathBuf>,
    /// When the entry last changed (for entries no record names).
    mtime: std::time::SystemTime,
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The files directly in `dir`, with their names.
fn files_in(dir: &Path) -> Vec<(String, PathBuf)> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
                .collect()
        })
        .unwrap_or_default()
}

/// The entry id a file in `references/` belongs to: `<name>`, `<name>.idx`,
/// `<name>.lock`, `<name>.tmp-<pid>`.
fn reference_id(file: &str) -> &str {
    if let Some(i) = file.rfind(".tmp-") {
        if file[i + 5..].bytes().all(|b| b.is_ascii_digit()) {
            return &file[..i];
        }
    }
    file.strip_suffix(".idx")
        .or_else(|| file.strip_suffix(".lock"))
        .unwrap_or(file)
}

fn entries(cache: &Cache, area: Area) -> Vec<Entry> {
    let root = &cache.root;
    let mut by_id: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    match area {
        Area::Bases => {
            for (name, p) in files_in(&root.join("rootfs")) {
                let id = name.split('.').next().unwrap_or("");
                if is_hex64(id) {
                    by_id.entry(id.to_string()).or_default().push(p);
                }
            }
        }
        Area::Blobs => {
            for (name, p) in files_in(&root.join("blobs/sha256")) {
                if is_hex64(&name) {
                    by_id.entry(name).or_default().push(p);
                }
            }
        }
        Area::Oci => {
            for (name, p) in files_in(&root.join("oci/blobs/sha256")) {
                if is_hex64(&name) {
                    by_id.entry(name).or_default().push(p);
                }
            }
        }
        Area::References => {
            for (name, p) in files_in(&root.join("references")) {
                if !name.starts_with('.') {
                    by_id
                        .entry(reference_id(&name).to_string())
                        .or_default()
                        .push(p);
                }
            }
        }
        Area::Tmp => {}
    }
    by_id
        .into_iter()
        .map(|(id, files)| {
            let lock = match area {
                Area::Bases => Some(root.join("rootfs").join(format!("{id}.lock"))),
                Area::Blobs => Some(blob_lock(cache, &id)),
                Area::References => Some(root.join("references").join(format!("{id}.lock"))),
                Area::Oci | Area::Tmp => None,
            };
            let mtime = files
                .iter()
                .filter(|p| Some(p.as_path()) != lock.as_deref())
                .filter_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
                .max()
                .unwrap_or(std::time::UNIX_EPOCH);
            Entry {
                id,
                files,
                lock,
                mtime,
            }
        })
        .collect()
}

/// Sizes of one area.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct AreaUsage {
    pub area: Area,
    pub path: PathBuf,
    /// Bytes allocated on disk (each hard-linked file counted once).
    pub bytes: u64,
    pub entries: usize,
}

/// `kiln cache du`: what each area holds.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct DiskUsage {
    pub cache: PathBuf,
    pub areas: Vec<AreaUsage>,
    /// Locks, usage records and anything else kiln keeps there.
    pub other_bytes: u64,
    pub total_bytes: u64,
}

pub(crate) fn du(cache: &Cache) -> DiskUsage {
    let mut seen = HashSet::new();
    let mut areas = Vec::new();
    for area in Area::ALL {
        let path = cache.root.join(area.dir());
        let bytes =
            crate::util::locks::disk_usage(&path, &mut seen).saturating_sub(own_blocks(&path));
        let entries = match area {
            Area::Tmp => std::fs::read_dir(&path).map(|r| r.count()).unwrap_or(0),
            _ => entries(cache, area).len(),
        };
        areas.push(AreaUsage {
            area,
            path,
            bytes,
            entries,
        });
    }
    let in_areas: u64 = areas.iter().map(|a| a.bytes).sum();
    // The rest of the tree; the areas' inodes are already in `seen`.
    let other_bytes = crate::util::locks::disk_usage(&cache.root, &mut seen);
    DiskUsage {
        cache: cache.root.clone(),
        areas,
        other_bytes,
        total_bytes: in_areas + other_bytes,
    }
}

/// A directory's own blocks (its listing), not what it holds.
fn own_blocks(path: &Path) -> u64 {
    std::fs::symlink_metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// What `gc` removed (or, with `dry_run`, would remove).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Removed {
    pub area: Area,
    pub id: String,
    /// Space given back: files whose last link goes with the entry.
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct GcReport {
    pub dry_run: bool,
    pub keep: usize,
    pub removed: Vec<Removed>,
    /// Entries gc would have removed but a running build holds.
    pub in_use: Vec<Removed>,
    pub freed_bytes: u64,
}

/// `kiln cache gc --keep N`: per recipe, keep what its N newest builds used;
/// of the entries no build record names (older kilns, `kiln lock`
/// downloads), keep the N newest of each area; remove the rest, except
/// entries a running build holds; sweep scratch that killed builds left.
pub(crate) fn gc(cache: &Cache, keep: usize, dry_run: bool) -> Result<GcReport> {
    let _gc = Held::try_acquire(&gc_lock(cache), Mode::Exclusive)?
        .context("another `kiln cache gc` is running on this cache")?
        .remove_on_drop();
    let (records, mut old_records) = records(cache);
    let mut kept: HashMap<Area, BTreeSet<String>> = HashMap::new();
    let mut named: HashMap<Area, BTreeSet<String>> = HashMap::new();
    for list in records.values() {
        for (i, (path, usage)) in list.iter().enumerate() {
            for area in Area::ALL {
                let Some(ids) = usage.ids(area) else { continue };
                named.entry(area).or_default().extend(ids.iter().cloned());
                if i < keep {
                    kept.entry(area).or_default().extend(ids.iter().cloned());
                }
            }
            if i >= keep {
                old_records.push(path.clone());
            }
        }
    }

    // Everything to remove, before anything is, so that hard links between
    // removed files count as freed space once.
    let mut plan: Vec<(Area, Entry)> = Vec::new();
    for area in [Area::Bases, Area::Blobs, Area::References, Area::Oci] {
        let (kept, named) = (kept.get(&area), named.get(&area));
        let mut unnamed = Vec::new();
        for e in entries(cache, area) {
            if kept.is_some_and(|k| k.contains(&e.id)) {
                continue;
            }
            if named.is_some_and(|n| n.contains(&e.id)) {
                plan.push((area, e));
            } else {
                unnamed.push(e);
            }
        }
        unnamed.sort_by(|a, b| b.mtime.cmp(&a.mtime).then(a.id.cmp(&b.id)));
        plan.extend(unnamed.into_iter().skip(keep).map(|e| (area, e)));
    }

    let mut report = GcReport {
        dry_run,
        keep,
        removed: Vec::new(),
        in_use: Vec::new(),
        freed_bytes: 0,
    };
    let mut links: HashMap<(u64, u64), (u64, u64, u64)> = HashMap::new();
    for (_, e) in &plan {
        for f in &e.files {
            if let Ok(m) = std::fs::symlink_metadata(f) {
                let slot =
                    links
                        .entry((m.dev(), m.ino()))
                        .or_insert((m.nlink(), 0, m.blocks() * 512));
                slot.1 += 1;
            }
        }
    }
    let freed_by = |files: &[PathBuf]| -> u64 {
        let mut seen = HashSet::new();
        files
            .iter()
            .filter_map(|f| std::fs::symlink_metadata(f).ok())
            .filter(|m| seen.insert((m.dev(), m.ino())))
            .filter_map(|m| links.get(&(m.dev(), m.ino())))
            .filter(|(nlink, in_plan, _)| in_plan >= nlink)
            .map(|(_, _, bytes)| bytes)
            .sum()
    };

    // Container image blobs have one lock for the area: a build baking
    // images holds it shared.
    let oci_held = Held::try_acquire(&oci_lock(cache), Mode::Exclusive)?.map(Held::remove_on_drop);
    for (area, e) in &plan {
        let bytes = freed_by(&e.files);
        let item = Removed {
            area: *area,
            id: e.id.clone(),
            bytes,
        };
        let held = match (&e.lock, *area) {
            // A dry run leaves no lock file behind: none means nobody holds it.
            (Some(lock), _) if dry_run && !lock.exists() => None,
            (Some(lock), _) => match Held::try_acquire(lock, Mode::Exclusive)? {
                Some(h) if dry_run => Some(h),
                Some(h) => Some(h.remove_on_drop()),
                None => {
                    report.in_use.push(item);
                    continue;
                }
            },
            (None, Area::Oci) if oci_held.is_none() => {
                report.in_use.push(item);
                continue;
            }
            (None, _) => None,
        };
        if !dry_run {
            for f in &e.files {
                if Some(f) != e.lock.as_ref() {
                    std::fs::remove_file(f)
                        .or_else(|err| match err.kind() {
                            std::io::ErrorKind::NotFound => Ok(()),
                            _ => Err(err),
                        })
                        .with_context(|| format!("cannot remove {}", f.display()))?;
                }
            }
        }
        // The lock file goes last (unless a dry run), as the lock is released.
        drop(held);
        report.freed_bytes += bytes;
        report.removed.push(item);
    }
    // Half-written blobs of interrupted pulls, when no build is pulling.
    if oci_held.is_some() {
        for (name, p) in files_in(&cache.root.join("oci/blobs/sha256")) {
            if !is_hex64(&name) {
                let bytes = own_blocks(&p);
                if dry_run || std::fs::remove_file(&p).is_ok() {
                    report.freed_bytes += bytes;
                    report.removed.push(Removed {
                        area: Area::Oci,
                        id: name,
                        bytes,
                    });
                }
            }
        }
    }
    drop(oci_held);
    for s in sweep_tmp(cache, dry_run) {
        report.freed_bytes += s.bytes;
        report.removed.push(Removed {
            area: Area::Tmp,
            id: s
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            bytes: s.bytes,
        });
    }
    if !dry_run {
        for p in old_records {
            let _ = std::fs::remove_file(p);
        }
    }
    Ok(report)
}
