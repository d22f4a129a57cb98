//! `ImageManifest`: the record kiln writes beside every disk image, and the
//! contract between build, validate and publish (`manifest.json`).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use crate::image::contract::CheckSpec;
use crate::image::contract::OutputKind;

pub const MANIFEST_FILE: &str = "manifest.json";
pub const SUMS_FILE: &str = "SHA256SUMS";

/// Everything known about one built image. `id` is the sha256 of the disk
/// file; validation results are added later without changing it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImageManifest {
    pub name: String,
    pub version: String,
    /// sha256 of the disk file: the image's identity.
    pub id: String,
    pub kiln_version: String,
    pub disk: DiskInfo,
    pub inputs: InputDigests,
    pub source_date_epoch: u64,
    pub boot: BootInfo,
    /// Installed packages and versions (from dpkg's status database).
    pub packages: BTreeMap<String, String>,
    pub hygiene: crate::image::contract::HygieneReport,
    /// Per-stage wall time in seconds, in pipeline order.
    pub stages: Vec<StageTiming>,
    /// Roles whose static files are baked in; user-data is rendered per node.
    pub roles: Vec<String>,
    /// What `kiln validate` needs to test this image without the recipe.
    pub validate: ValidateSpec,
    /// An LXC rootfs archive built from the same rootfs, when the recipe asks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lxc: Option<FileInfo>,
    /// The SPDX 2.3 software bill of materials (`image::sbom`); images made
    /// by an older kiln have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sbom: Option<FileInfo>,
    /// Every file and symlink kiln wrote over the base from overlays, its
    /// defaults and `[units]`, by path, with its sha256 (what `kiln diff`
    /// compares; artifacts and images are compared by their digests).
    #[serde(default)]
    pub added_files: Vec<crate::image::contract::AddedFile>,
    /// Filled in by `kiln validate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<ValidationRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DiskInfo {
    /// File name inside the image directory.
    pub file: String,
    /// `qcow2` or `raw`.
    pub format: String,
    pub sha256: String,
    /// Bytes on disk.
    pub size: u64,
    /// Bytes the guest sees.
    pub virtual_size: u64,
    /// Filesystem UUID of the root partition (what the bootloader searches).
    pub root_fs_uuid: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileInfo {
    pub file: String,
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InputDigests {
    /// sha256 of the recipe after `extends` is resolved (canonical JSON).
    pub recipe: String,
    pub lock: String,
    pub artifacts: BTreeMap<String, String>,
    /// Container images baked in: reference → manifest digest.
    #[serde(default)]
    pub images: BTreeMap<String, String>,
    /// Digest of the inputs of the cached base rootfs, and of its tarball.
    pub base_rootfs_key: String,
    pub base_rootfs: String,
    pub overlays: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BootInfo {
    pub uefi: bool,
    pub secure_boot: bool,
    pub bios: bool,
    pub kernel: String,
    pub cmdline: String,
    /// What boots, in order: shim, GRUB, the kernel (and MokManager), each
    /// with the Debian package it came from; images made by an older kiln have none.
    #[serde(default)]
    pub chain: Vec<BootComponent>,
}

/// One piece of the boot chain, as read from the base rootfs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BootComponent {
    /// `shim`, `grub`, `kernel` or `mok-manager`.
    pub component: String,
    /// Path in the rootfs it was read from.
    pub file: String,
    pub sha256: String,
    /// The Debian package whose file list names it, and its version (None
    /// when dpkg's database does not say).
    pub package: Option<String>,
    pub version: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StageTiming {
    pub stage: String,
    pub seconds: f64,
    /// True when the stage's output came from the cache.
    pub cached: bool,
    /// For the compressing stages: how much of the output was copied from the
    /// recipe's last image instead of compressed again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reused: Option<Reuse>,
}

/// `reused` of `total` units (qcow2 clusters, LXC frames) came from the last image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Reuse {
    pub reused: u64,
    pub total: u64,
    pub unit: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ValidateSpec {
    /// The role the validation boot plays.
    pub role: Option<String>,
    /// That role's user-data rendered with the recipe's test values
    /// (never real secrets); validate adds its throwaway SSH key to it.
    pub user_data: Option<String>,
    pub checks: Vec<CheckSpec>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ValidationRecord {
    pub validated: bool,
    /// RFC 3339 UTC.
    pub when: String,
    pub kiln_version: String,
    pub accel: String,
    /// Microsoft Secure Boot key sets the UEFI boots had (`2011`, `2023k`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secure_boot_keys: Vec<String>,
    pub boot_to_ssh_seconds: Option<f64>,
    pub boot_to_cloud_init_seconds: Option<f64>,
    pub checks: Vec<CheckOutcome>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CheckOutcome {
    pub name: String,
    pub passed: bool,
    pub seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl ImageManifest {
    /// Load `manifest.json` from an image directory.
    pub fn load(image_dir: &Path) -> Result<Self> {
        let path = image_dir.join(MANIFEST_FILE);
        if !path.is_file() {
            bail!(
                "{} is not a kiln image: it has no {MANIFEST_FILE}",
                image_dir.display()
            );
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let m: ImageManifest = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a kiln manifest", path.display()))?;
        m.check_output_names()
            .with_context(|| format!("{} is not a usable kiln manifest", path.display()))?;
        Ok(m)
    }

    /// Write `manifest.json` atomically into an image directory.
    pub fn save(&self, image_dir: &Path) -> Result<()> {
        let mut text = serde_json::to_string_pretty(self)?;
        text.push('\n');
        crate::util::write_atomic(&image_dir.join(MANIFEST_FILE), text.as_bytes())
    }

    /// Every output the build made, the disk first.
    pub fn outputs(&self) -> Vec<(OutputKind, FileInfo)> {
        let disk = FileInfo {
            file: self.disk.file.clone(),
            sha256: self.disk.sha256.clone(),
            size: self.disk.size,
        };
        let mut v = vec![(OutputKind::Disk, disk)];
        v.extend(self.lxc.iter().map(|l| (OutputKind::Lxc, l.clone())));
        v.extend(self.sbom.iter().map(|s| (OutputKind::Sbom, s.clone())));
        v
    }

    /// Path of the disk file inside `image_dir`.
    pub fn disk_path(&self, image_dir: &Path) -> PathBuf {
        image_dir.join(&self.disk.file)
    }

    /// Refuse a manifest whose output names leave the image directory (a
    /// crafted manifest could otherwise make publish upload any local file).
    pub fn check_output_names(&self) -> Result<()> {
        for (kind, f) in self.outputs() {
            let plain = !f.file.is_empty()
                && !f.file.contains('/')
                && f.file != "."
                && f.file != ".."
                && !f.file.starts_with('.');
            if !plain {
                bail!(
                    "manifest: {} file `{}` is not a plain file name inside the image directory",
                    kind.label(),
                    f.file
                );
            }
        }
        Ok(())
    }

    /// Check that the disk file is the one this manifest describes.
    pub fn verify_disk(&self, image_dir: &Path) -> Result<()> {
        let path = self.disk_path(image_dir);
        let actual = crate::util::sha256_file(&path)?;
        if actual != self.disk.sha256 || actual != self.id {
            bail!(
                "{} does not match its manifest: sha256 is {actual}, manifest says {}",
                path.display(),
                self.id
            );
        }
        Ok(())
    }

    /// Check that every output file is the one this manifest describes (the
    /// disk's sha256 is also the image id).
    pub fn verify_outputs(&self, image_dir: &Path) -> Result<()> {
        self.verify_disk(image_dir)?;
        for (_, f) in self.outputs().iter().skip(1) {
            let path = image_dir.join(&f.file);
            let actual = crate::util::sha256_file(&path)?;
            if actual != f.sha256 {
                bail!(
                    "{} does not match its manifest: sha256 is {actual}, manifest says {}",
                    path.display(),
                    f.sha256
                );
            }
        }
        Ok(())
    }

    /// Write `SHA256SUMS` (the format `sha256sum -c` reads) for every output.
    pub fn write_sums(&self, image_dir: &Path) -> Result<()> {
        let text: String = self
            .outputs()
            .iter()
            .map(|(_, f)| format!("{}  {}\n", f.sha256, f.file))
            .collect();
        crate::util::write_atomic(&image_dir.join(SUMS_FILE), text.as_bytes())
    }

    /// The first 12 hex digits of the id, as used in tags and names.
    pub fn short_id(&self) -> &str {
        &self.id[..12.min(self.id.len())]
    }
}
