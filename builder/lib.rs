//! kiln turns declarative recipes into immutable, versioned, reproducible VM
//! images for K3s clusters on Proxmox VE, then validates and publishes them.
//!
//! Layers, each depending only on those below it:
//!
//! | layer | modules | job |
//! | --- | --- | --- |
//! | front end | [`cli`] | argument structs, output formatting, exit codes |
//! | deployment | [`deploy`] (`pve`, `publish`) | the Proxmox client; images become templates |
//! | validation | [`validate`] | boot an image in QEMU, check it over SSH |
//! | image build | [`image`] (`pipeline`: recipe → lock/fetch → rootfs → compose → disk → outputs) | recipes become image directories with a manifest |
//! | utilities | [`util`] | interrupts, parallel work, progress, host tools, atomic files |
//!
//! The Proxmox VE stand-in used by the tests lives outside this library, in
//! `crates/pve-sim`.

#![warn(unreachable_pub)]

pub mod cli;
pub mod deploy;
pub mod image;
pub mod util;
pub mod validate;
