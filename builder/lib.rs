//! kiln turns declarative recipes into immutable, versioned, reproducible VM
//! images for K3s clusters on Proxmox VE, then validates and publishes them.
//!
//! The modules follow the pipeline, one job each:
//! recipe → lock/fetch → rootfs → compose/hygiene → disk (+ qcow2) and lxc →
//! manifest → validate → publish. `reuse` lets a rebuild copy what did not
//! change from the last output; `parallel` spreads compression over the cores.

pub mod build;
pub mod cli;
pub mod cloudinit;
pub mod compose;
pub mod disk;
pub mod fat;
pub mod fetch;
pub mod hosttools;
pub mod hygiene;
pub mod images;
pub mod lock;
pub mod lxc;
pub mod manifest;
pub mod oci;
pub mod parallel;
pub mod progress;
pub mod publish;
pub mod pvesim;
pub mod recipe;
pub mod reuse;
pub mod rootfs;
pub mod util;
pub mod validate;
pub mod values;
