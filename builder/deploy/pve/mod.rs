//! The Proxmox VE client: targets (kiln.toml / KILN_PVE_*), requests with
//! token auth and pinned TLS, tasks, VMs, volumes, uploads and errors.

pub mod client;
pub mod config;
pub mod errors;
pub mod tasks;
pub mod upload;
pub mod vms;
pub mod volumes;

pub use client::Pve;
pub use config::Target;
pub use errors::{is_missing, ApiError};
