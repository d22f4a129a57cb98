//! Promote: the last step of a build. An image directory is staged beside
//! `images/<name>/<version>/` and moved into place with one rename.

use anyhow::{bail, Context, Result};
use std::path::Path;

use crate::image::manifest::{ImageManifest, InputDigests};

/// A staging directory in `out`, named so that a later build can sweep it
/// away when this process died before promoting it.
pub(crate) fn staging_dir(out: &Path) -> Result<tempfile::TempDir> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    crate::util::remove_stale_dirs(out, ".kiln-staging-");
    tempfile::Builder::new()
        .prefix(&format!(".kiln-staging-{}-", std::process::id()))
        .tempdir_in(out)
        .with_context(|| format!("cannot create a staging directory in {}", out.display()))
}

/// An existing image built from exactly these inputs, or an error if one
/// with the same name and version differs (unless `force`).
pub(crate) fn existing(
    dest: &Path,
    inputs: &InputDigests,
    force: bool,
) -> Result<Option<ImageManifest>> {
    if !dest.join(crate::image::manifest::MANIFEST_FILE).exists() {
        return Ok(None);
    }
    let m = ImageManifest::load(dest)?;
    // The base tarball's own digest is informational: the same inputs can
    // give a base that differs only in what compose cleans away.
    let mut a = m.inputs.clone();
    a.base_rootfs.clear();
    let same = a == *inputs && m.kiln_version == env!("CARGO_PKG_VERSION");
    let disk_ok = std::fs::metadata(m.disk_path(dest))
        .map(|md| md.len() == m.disk.size)
        .unwrap_or(false);
    if same && disk_ok {
        return Ok(Some(m));
    }
    if !force {
        bail!(
            "{} already exists and was built from different inputs: bump `version` in the recipe, or pass --force to replace it",
            dest.display()
        );
    }
    Ok(None)
}

/// Move the staging directory into place in one rename.
pub(crate) fn promote(staging: tempfile::TempDir, dest: &Path) -> Result<()> {
    let parent = dest.parent().expect("dest has a parent");
    std::fs::create_dir_all(parent)?;
    let staged = staging.keep();
    if dest.exists() {
        let old = parent.join(format!(".kiln-replaced-{}", std::process::id()));
        std::fs::rename(dest, &old)
            .with_context(|| format!("cannot move aside {}", dest.display()))?;
        if let Err(e) = std::fs::rename(&staged, dest) {
            let _ = std::fs::rename(&old, dest);
            let _ = std::fs::remove_dir_all(&staged);
            return Err(e).with_context(|| format!("cannot publish {}", dest.display()));
        }
        let _ = std::fs::remove_dir_all(&old);
    } else if let Err(e) = std::fs::rename(&staged, dest) {
        let _ = std::fs::remove_dir_all(&staged);
        return Err(e).with_context(|| format!("cannot publish {}", dest.display()));
    }
    Ok(())
}
