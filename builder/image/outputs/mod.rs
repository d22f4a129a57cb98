//! What a build writes into an image directory besides the manifest: the
//! qcow2 disk and the LXC rootfs archive, each reusing the recipe's last output.

pub mod lxc;
pub mod qcow2;
