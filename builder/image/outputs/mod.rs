//! What a build writes into an image directory besides the manifest: the
//! qcow2 disk and the LXC rootfs archive, one family each reusing the recipe's last output.
//!
//! Every output has a kind ([`OutputKind`]) that names its file and its
//! reference in the cache; the manifest lists what was made
//! ([`crate::image::manifest::ImageManifest::outputs`]), and sums,
//! verification, publishing and printing iterate over that list.

pub mod lxc;
pub mod qcow2;

use serde::{Deserialize, Serialize};

/// One kind of file a build can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputKind {
    /// The VM disk (qcow2): the image's identity is its sha256.
    Disk,
    /// The rootfs as an LXC template (`vztmpl` `.tar.zst`), when the recipe asks.
    Lxc,
}

impl OutputKind {
    /// The file's name inside `images/<name>/<version>/`.
    pub fn file_name(self, name: &str, version: &str) -> String {
        match self {
            OutputKind::Disk => format!("{name}-{version}.qcow2"),
            OutputKind::Lxc => format!("{name}-{version}-lxc.tar.zst"),
        }
    }

    /// The cache name of the recipe's last output of this kind, which the
    /// next build reuses unchanged pieces of.
    pub fn reference_name(self, recipe: &str) -> String {
        match self {
            OutputKind::Disk => qcow2::reference_name(recipe),
            OutputKind::Lxc => lxc::reference_name(recipe),
        }
    }

    /// How the build summary and the manifest's stage record count reuse.
    pub fn reuse_unit(self) -> &'static str {
        match self {
            OutputKind::Disk => "qcow2 clusters",
            OutputKind::Lxc => "zstd frames",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            OutputKind::Disk => "disk",
            OutputKind::Lxc => "lxc",
        }
    }
}
