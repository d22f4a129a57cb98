//! The image half: recipe → lock/fetch → rootfs → compose → disk → outputs,
//! run by `pipeline`, recorded in the `manifest` that validation and deployment read.

pub(crate) mod airgap;
pub(crate) mod cachegc;
pub(crate) mod cloudinit;
pub mod compose;
pub(crate) mod contract;
pub mod diff;
pub mod disk;
pub(crate) mod fetch;
pub(crate) mod hygiene;
pub mod inputs;
pub(crate) mod lock;
pub mod manifest;
pub mod oci;
pub(crate) mod outputs;
pub mod pipeline;
pub(crate) mod promote;
pub(crate) mod recipe;
pub(crate) mod reuse;
pub(crate) mod rootfs;
pub(crate) mod sbom;
pub mod signature;
pub mod values;
