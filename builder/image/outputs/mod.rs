//! What a build writes into an image directory besides the manifest: the
//! qcow2 disk and the LXC rootfs archive, one family each reusing the recipe's last output.
//!
//! Every output has a kind ([`OutputKind`]) that names its file and its
//! reference in the cache; the manifest lists what was made
//! (`ImageManifest::outputs`), and sums,
//! verification, publishing and printing iterate over that list.

pub(crate) mod lxc;
pub(crate) mod qcow2;

pub(crate) use crate::image::contract::OutputKind;

/// The cache name of the recipe's last output of `kind`, which the next
/// build reuses unchanged pieces of (the compressed outputs only: the SBOM
/// is small and written whole, see `image::sbom`).
pub(crate) fn reference_name(kind: OutputKind, recipe: &str) -> String {
    match kind {
        OutputKind::Disk => qcow2::reference_name(recipe),
        OutputKind::Lxc => lxc::reference_name(recipe),
        OutputKind::Sbom => unreachable!("the SBOM is not compressed against a reference"),
    }
}
