//! Input digests: everything an image derives from, known before any heavy
//! work, so equal inputs mean an equal image (and an up-to-date build does nothing).

use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

use crate::image::lock::Lockfile;
use crate::image::manifest::InputDigests;
use crate::image::recipe::Recipe;

/// sha256 over an overlay tree: paths, kinds, modes, contents and link targets.
pub(crate) fn overlay_digest(dir: &Path) -> Result<String> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut stack = vec![dir.to_path_buf()];
    let mut files = Vec::new();
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("cannot read {}", d.display()))? {
            let p = e?.path();
            let m = std::fs::symlink_metadata(&p)?;
            if m.is_dir() {
                stack.push(p.clone());
            }
            files.push((p, m));
        }
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    for (p, m) in files {
        let rel = p
            .strip_prefix(dir)
            .expect("under dir")
            .to_string_lossy()
            .into_owned();
        let mode = crate::image::contract::overlay_mode(&m);
        h.update(format!("{rel}\0{mode:o}\0").as_bytes());
        if m.file_type().is_symlink() {
            h.update(std::fs::read_link(&p)?.to_string_lossy().as_bytes());
        } else if m.is_file() {
            h.update(crate::util::sha256_file(&p)?.as_bytes());
        }
        h.update(b"\n");
    }
    Ok(hex::encode(h.finalize()))
}

/// Inputs known before any heavy work; equal inputs mean an equal image.
pub fn digests(recipe: &Recipe, lock: &Lockfile, lock_bytes: &[u8]) -> Result<InputDigests> {
    let mut overlays = BTreeMap::new();
    for o in recipe.all_overlays() {
        overlays.insert(o.clone(), overlay_digest(&recipe.overlay_dir(&o))?);
    }
    let mut role_templates = BTreeMap::new();
    for (name, role) in &recipe.roles {
        if let Some(t) = &role.user_data {
            role_templates.insert(format!("role:{name}"), crate::util::sha256_file(t)?);
        }
    }
    overlays.extend(role_templates);
    Ok(InputDigests {
        recipe: recipe.digest(),
        lock: crate::util::sha256_hex(lock_bytes),
        artifacts: lock
            .artifacts
            .iter()
            .map(|(k, v)| (k.clone(), v.sha256.clone()))
            .collect(),
        images: lock.images.clone(),
        base_rootfs_key: crate::image::rootfs::base_key(recipe, lock),
        base_rootfs: String::new(),
        overlays,
    })
}

/// Stable identities derived from the build inputs (see [`seed`]), so two builds of the same
/// inputs get the same UUIDs (and the same bytes).
#[derive(Debug, Clone, PartialEq)]
pub struct Identities {
    pub disk_guid: String,
    pub esp_guid: String,
    pub root_guid: String,
    pub bios_guid: String,
    pub root_fs_uuid: String,
    pub esp_volume_id: u32,
}

fn uuid_from(seed: &str, what: &str) -> String {
    let h = crate::util::sha256_hex(format!("{what}\0{seed}").as_bytes());
    let mut b = hex::decode(&h[..32]).expect("hex");
    b[6] = (b[6] & 0x0f) | 0x40; // version 4 layout
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
    let x = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &x[..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..]
    )
}

impl Identities {
    pub fn derive(seed: &str) -> Identities {
        let vol = crate::util::sha256_hex(format!("esp-volume\0{seed}").as_bytes());
        Identities {
            disk_guid: uuid_from(seed, "disk"),
            esp_guid: uuid_from(seed, "esp"),
            root_guid: uuid_from(seed, "root-part"),
            bios_guid: uuid_from(seed, "bios-part"),
            root_fs_uuid: uuid_from(seed, "root-fs"),
            esp_volume_id: u32::from_str_radix(&vol[..8], 16).expect("hex"),
        }
    }
}

/// The seed every identity derives from: the image's inputs (not the base
/// tarball's digest, which is informational; see `promote::existing`).
pub(crate) fn seed(inputs: &InputDigests) -> Result<String> {
    Ok(crate::util::sha256_hex(
        serde_json::to_string(inputs)?.as_bytes(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_digest_changes_with_content_and_mode() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), "a").unwrap();
        let a = overlay_digest(d.path()).unwrap();
        std::fs::write(d.path().join("f"), "b").unwrap();
        let b = overlay_digest(d.path()).unwrap();
        std::fs::set_permissions(d.path().join("f"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        let c = overlay_digest(d.path()).unwrap();
        assert!(a != b && b != c);
    }

    #[test]
    fn overlay_digest_is_the_same_under_umask_022_and_002() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, "a").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let a = overlay_digest(d.path()).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o664)).unwrap();
        assert_eq!(overlay_digest(d.path()).unwrap(), a);
    }
}
