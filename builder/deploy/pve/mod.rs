//! The Proxmox VE client: targets (kiln.toml / KILN_PVE_*), HTTP requests
//! with token auth and pinned TLS, tasks, volumes and errors.

pub mod api;
pub mod config;
