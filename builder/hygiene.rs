//! Hygiene: what must never ship in an image (host keys, machine-id, caches,
//! logs, private keys), cleaned from the base and then enforced on the result.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HygieneReport {
    /// Paths removed or emptied from the base rootfs.
    pub cleaned: Vec<String>,
    /// Private keys present because the recipe allow-lists them.
    pub allowed: Vec<String>,
    /// Violations found in the final rootfs (a build with any fails).
    pub violations: Vec<String>,
}
