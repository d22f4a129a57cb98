//! Promote: the last step of a build. An image directory is staged beside
//! `images/<name>/<version>/` and moved into place with one rename (an
//! atomic exchange when an older image is there), under the lock that makes
//! a build the only one writing that image.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

use crate::image::manifest::{ImageManifest, InputDigests};
use crate::util::locks::{Held, LockedDir, Mode};

/// The prefix of staging directories in the output directory.
const STAGING_PREFIX: &str = ".kiln-staging-";

/// A staging directory in `out`, locked while this build lives; staging
/// directories nobody holds (their build was killed) are swept away first.
pub(crate) fn staging_dir(out: &Path) -> Result<LockedDir> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    crate::util::locks::sweep(out, STAGING_PREFIX, false);
    LockedDir::new_in(out, &format!("{STAGING_PREFIX}{}-", std::process::id()))
        .with_context(|| format!("cannot create a staging directory in {}", out.display()))
}

/// Make this build the only one writing `images/<name>/<version>` (in
/// `out`): another build of the same image waits, saying so, until this
/// one ends. The caller checks again for an up-to-date image once it holds
/// the lock: the build it waited for may have made exactly that image.
pub(crate) fn lock_output(out: &Path, name: &str, version: &str) -> Result<Held> {
    // `@` is in neither names nor versions (recipe.rs), so names cannot clash.
    let path = out.join(format!(".kiln-lock-{name}@{version}"));
    let held =
        Held::acquire(&path, Mode::Exclusive, &format!("{name} {version}"))?.remove_on_drop();
    recover_replaced(&out.join(name).join(version))?;
    Ok(held)
}

/// Where the old image waits while a filesystem without an atomic exchange
/// replaces it with two renames.
fn replaced_path(dest: &Path) -> PathBuf {
    let name = dest.file_name().expect("dest has a name").to_string_lossy();
    dest.with_file_name(format!(".kiln-replaced-{name}"))
}

/// Finish what a build killed between the two renames of a replacement
/// left: the old image back in place if the new one never got there, else
/// gone. Called under the output lock.
fn recover_replaced(dest: &Path) -> Result<()> {
    let old = replaced_path(dest);
    if std::fs::symlink_metadata(&old).is_err() {
        return Ok(());
    }
    if std::fs::symlink_metadata(dest).is_err() {
        std::fs::rename(&old, dest)
            .with_context(|| format!("cannot put {} back in place", dest.display()))?;
    } else {
        std::fs::remove_dir_all(&old)
            .with_context(|| format!("cannot remove {}", old.display()))?;
    }
    Ok(())
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

/// Move the staging directory into place in one rename. An existing image
/// is swapped with it atomically (renameat2 RENAME_EXCHANGE), so `dest`
/// exists at every moment; where the filesystem cannot exchange, the old
/// image is renamed aside first. Called under [`lock_output`].
pub(crate) fn promote(staging: LockedDir, dest: &Path) -> Result<()> {
    let parent = dest.parent().expect("dest has a parent");
    std::fs::create_dir_all(parent)?;
    let staged = staging
        .keep()
        .context("cannot unlock the staging directory")?;
    let placed = if std::fs::symlink_metadata(dest).is_err() {
        std::fs::rename(&staged, dest)
    } else {
        match exchange(&staged, dest) {
            // The old image is now at the staging path.
            Ok(()) => Ok(()),
            Err(e) if exchange_unsupported(&e) => replace_by_renames(&staged, dest),
            Err(e) => Err(e),
        }
    };
    // The staging path holds the old image after an exchange, the new one
    // after a failure: gone either way.
    let _ = std::fs::remove_dir_all(&staged);
    placed.with_context(|| format!("cannot publish {}", dest.display()))
}

/// Swap two paths atomically (both must exist).
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: two valid C strings, relative to the working directory.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Filesystems without RENAME_EXCHANGE say EINVAL; kernels or libcs without
/// renameat2 say ENOSYS (rename(2)).
fn exchange_unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
    )
}

/// The old image aside, the new one in, the old one removed; on failure
/// the old one is put back ([`recover_replaced`] finishes the job if this
/// process dies in between).
fn replace_by_renames(staged: &Path, dest: &Path) -> std::io::Result<()> {
    let old = replaced_path(dest);
    std::fs::rename(dest, &old)?;
    if let Err(e) = std::fs::rename(staged, dest) {
        let _ = std::fs::rename(&old, dest);
        return Err(e);
    }
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn the_old_image_a_killed_replacement_set_aside_is_put_back_or_removed() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("images");
        let dest = out.join("lb/0.1.0");
        let aside = out.join("lb/.kiln-replaced-0.1.0");
        // Killed between the two renames: the old image is only aside.
        std::fs::create_dir_all(&aside).unwrap();
        std::fs::write(aside.join("manifest.json"), b"old").unwrap();
        drop(lock_output(&out, "lb", "0.1.0").unwrap());
        assert_eq!(std::fs::read(dest.join("manifest.json")).unwrap(), b"old");
        assert!(!aside.exists());
        // Killed after them: the new image is in place, the old one goes.
        std::fs::create_dir_all(&aside).unwrap();
        drop(lock_output(&out, "lb", "0.1.0").unwrap());
        assert!(!aside.exists() && dest.join("manifest.json").exists());
        // The lock leaves no file behind.
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
    }

    #[test]
    fn without_an_atomic_exchange_two_renames_replace_the_image() {
        let d = tempfile::tempdir().unwrap();
        let (staged, dest) = (d.path().join("staged"), d.path().join("0.1.0"));
        for (p, v) in [(&staged, "new"), (&dest, "old")] {
            std::fs::create_dir(p).unwrap();
            std::fs::write(p.join("v"), v).unwrap();
        }
        replace_by_renames(&staged, &dest).unwrap();
        assert_eq!(std::fs::read_to_string(dest.join("v")).unwrap(), "new");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_replaced_image_directory_never_stops_existing() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("images");
        let dest = out.join("lb/0.1.0");
        std::fs::create_dir_all(&dest).unwrap();
        let (stop, missing) = (AtomicBool::new(false), AtomicBool::new(false));
        std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    if std::fs::symlink_metadata(&dest).is_err() {
                        missing.store(true, Ordering::Relaxed);
                    }
                }
            });
            for i in 0..300 {
                let staging = staging_dir(&out).unwrap();
                std::fs::write(staging.path().join("n"), i.to_string()).unwrap();
                promote(staging, &dest).unwrap();
                if missing.load(Ordering::Relaxed) {
                    break;
                }
            }
            stop.store(true, Ordering::Relaxed);
        });
        assert!(
            !missing.load(Ordering::Relaxed),
            "the destination was missing during a replacement"
        );
        assert_eq!(std::fs::read_to_string(dest.join("n")).unwrap(), "299");
    }
}
