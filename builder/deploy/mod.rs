//! Deployment: everything after an image exists. The Proxmox client, and on
//! top of it publishing images as templates and listing/pruning them.

pub mod publish;
pub mod pve;
pub mod templates;
