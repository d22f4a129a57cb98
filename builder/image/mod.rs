//! The image half: recipe → lock/fetch → rootfs → compose → disk → outputs,
//! run by `pipeline`, recorded in the `manifest` that validation and deployment read.

pub mod airgap;
pub mod cachegc;
pub mod cloudinit;
pub mod compose;
pub mod contract;
pub mod disk;
pub mod fetch;
pub mod hygiene;
pub mod inputs;
pub mod lock;
pub mod manifest;
pub mod oci;
pub mod outputs;
pub mod pipeline;
pub mod promote;
pub mod recipe;
pub mod reuse;
pub mod rootfs;
