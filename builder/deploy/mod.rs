//! Deployment: everything after an image exists. The Proxmox client, and on
//! top of it publishing images as templates and listing/pruning them.

pub mod env;
pub(crate) mod k3s;
pub mod providers;
pub mod publish;
pub(crate) mod pve;
pub(crate) mod templates;
