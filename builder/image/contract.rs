//! The contract types every stage shares, below all of them: what a path in
//! the image tree is, which image paths are acceptable, recipe checks, the hygiene report,
//! the files kiln adds over the base, output kinds.

use serde::{Deserialize, Serialize};

/// What a path in the tree is.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    Dir,
    File,
    Symlink(String),
    /// A hard link to another member (normalized path).
    HardLink(String),
    Other,
}

/// Check a path meant for the image: absolute, no `..`, no empty or `.` parts.
pub(crate) fn check_image_path(p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err(format!("`{p}` must be an absolute path in the image"));
    }
    for part in p.split('/').skip(1) {
        match part {
            ".." => {
                return Err(format!(
                    "`{p}` contains `..`: nothing may land outside the image root"
                ))
            }
            "." => return Err(format!("`{p}` contains `.`")),
            "" if p != "/" && !p.ends_with('/') => {
                return Err(format!("`{p}` contains an empty component"))
            }
            _ => {}
        }
    }
    if p.contains('\0') {
        return Err(format!("`{p}` contains a NUL byte"));
    }
    Ok(())
}

/// The mode an overlay entry gets in the image (and in its digest): the
/// checkout's, without the group and other write bits. Git records only
/// whether a file is executable, so a clone's modes follow its umask (0644
/// under 022, 0664 under 002); without those bits every clone gives the same
/// image, and no umask makes an image's files group-writable.
pub(crate) fn overlay_mode(meta: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & !0o022
}

/// A check declared by a recipe, run over SSH by `kiln validate`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    pub name: String,
    pub command: String,
    /// Expected exit status (default 0).
    #[serde(default)]
    pub exit: i32,
    /// A regular expression stdout must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<String>,
    /// Seconds before the check counts as failed.
    #[serde(default = "default_check_timeout")]
    pub timeout: u64,
}

fn default_check_timeout() -> u64 {
    60
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HygieneReport {
    /// Paths removed or emptied from the base rootfs.
    pub cleaned: Vec<String>,
    /// Private keys present because the recipe allow-lists them.
    pub allowed: Vec<String>,
    /// Violations found in the final rootfs (a build with any fails).
    pub violations: Vec<String>,
}

/// A file or symlink kiln wrote over the base rootfs from an overlay, its
/// defaults or `[units]` (artifacts and container images are recorded by
/// digest instead), so `kiln diff` can name what changed between two images.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(deny_unknown_fields)]
pub struct AddedFile {
    /// Absolute path in the image, symlinks in its parents resolved.
    pub path: String,
    /// Where it came from, e.g. `overlays/base/etc/motd` or `kiln defaults`.
    pub origin: String,
    /// Octal, e.g. `0644` (symlinks have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// sha256 of a file's content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// A symlink's target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// One kind of file a build can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputKind {
    /// The VM disk (qcow2): the image's identity is its sha256.
    Disk,
    /// The rootfs as an LXC template (`vztmpl` `.tar.zst`), when the recipe asks.
    Lxc,
    /// The software bill of materials (SPDX 2.3 JSON), written after the disk.
    Sbom,
}

impl OutputKind {
    /// The file's name inside `images/<name>/<version>/`.
    pub fn file_name(self, name: &str, version: &str) -> String {
        match self {
            OutputKind::Disk => format!("{name}-{version}.qcow2"),
            OutputKind::Lxc => format!("{name}-{version}-lxc.tar.zst"),
            OutputKind::Sbom => format!("{name}-{version}.spdx.json"),
        }
    }

    /// How the build summary and the manifest's stage record count reuse
    /// (the SBOM is written whole: it reuses nothing).
    pub fn reuse_unit(self) -> &'static str {
        match self {
            OutputKind::Disk => "qcow2 clusters",
            OutputKind::Lxc => "zstd frames",
            OutputKind::Sbom => "files",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            OutputKind::Disk => "disk",
            OutputKind::Lxc => "lxc",
            OutputKind::Sbom => "sbom",
        }
    }
}
