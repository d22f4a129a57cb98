//! The Proxmox VE client: targets (kiln.toml / KILN_PVE_*), requests with
//! token auth and pinned TLS, tasks, VMs, volumes, uploads and errors.

pub(crate) mod access;
pub(crate) mod client;
pub(crate) mod config;
pub(crate) mod errors;
pub(crate) mod tasks;
pub(crate) mod upload;
pub(crate) mod vms;
pub(crate) mod volumes;

pub(crate) use client::Pve;
