//! Errors of the Proxmox VE API: PVE's error answers decoded, and the one
//! test for "that object does not exist" every caller shares.

use std::collections::BTreeMap;

/// An error answer of the API, decoded from PVE's conventions.
#[derive(Debug, thiserror::Error)]
#[error("{method} {path}: {status} {message}{}", fmt_errors(.errors))]
pub(crate) struct ApiError {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub message: String,
    pub errors: BTreeMap<String, String>,
}

fn fmt_errors(e: &BTreeMap<String, String>) -> String {
    if e.is_empty() {
        String::new()
    } else {
        let parts: Vec<String> = e
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.trim()))
            .collect();
        format!(" ({})", parts.join("; "))
    }
}

impl ApiError {
    pub(crate) fn mentions(&self, needle: &str) -> bool {
        self.message.contains(needle) || self.errors.values().any(|v| v.contains(needle))
    }
}

/// Whether an error is PVE saying the VM, volume or storage does not exist
/// (PVE answers 500 with "... does not exist" for a missing VM config,
/// `PVE/QemuConfig.pm` via `PVE::AbstractConfig::load_config`, and for missing volumes).
pub(crate) fn is_missing(e: &anyhow::Error) -> bool {
    e.downcast_ref::<ApiError>()
        .is_some_and(|a| a.mentions("does not exist"))
}
