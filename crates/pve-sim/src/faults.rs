//! Injected faults: their `op:kind[*count]` specs and how handlers take them.
//! Part of pve-sim, a labelled STAND-IN for the Proxmox VE API (not Proxmox).

use anyhow::Result;
use serde_json::Value;
use std::collections::BTreeMap;

use crate::routes::{err500, param_err, ApiError, ApiResult};
use crate::state::{lock, Shared, State};

/// Which API operation a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    Upload,
    Create,
    Template,
    Clone,
    Destroy,
    VolumeDelete,
    TaskStatus,
    /// `POST .../status/shutdown`.
    Shutdown,
}

/// What goes wrong.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FaultKind {
    /// Answer `500 Internal Server Error` instead of doing the work.
    Http500,
    /// Close the connection mid-request (for uploads: after half the body).
    Drop,
    /// The task starts but ends with an error.
    FailTask,
    /// The task takes this many seconds.
    SlowTask(f64),
    /// `can't lock file ... - got timeout`.
    LockTimeout,
    /// A transient `400` (e.g. task status polled right after creation).
    Transient400,
    /// Another client takes the requested VMID just before this create.
    Race,
    /// The guest ignores the ACPI power button: a shutdown without
    /// `forceStop` runs into its timeout (see `vmconfig::shutdown`).
    IgnoreAcpi,
}

/// An injected fault: `op:kind[*count]`, e.g. `upload:500`, `create:fail`,
/// `template:lock-timeout`, `upload:drop`, `create:slow=5`, `status:400*2`,
/// `create:race`, `shutdown:ignore-acpi`.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub op: FaultOp,
    pub kind: FaultKind,
    pub remaining: u32,
}

impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (spec, count) = match s.split_once('*') {
            Some((a, n)) => (
                a,
                n.parse().map_err(|_| format!("bad fault count in `{s}`"))?,
            ),
            None => (s, 1),
        };
        let (op, kind) = spec
            .split_once(':')
            .ok_or_else(|| format!("fault `{s}` is not OP:KIND"))?;
        let op = match op {
            "upload" => FaultOp::Upload,
            "create" => FaultOp::Create,
            "template" => FaultOp::Template,
            "clone" => FaultOp::Clone,
            "destroy" => FaultOp::Destroy,
            "volume-delete" => FaultOp::VolumeDelete,
            "status" => FaultOp::TaskStatus,
            "shutdown" => FaultOp::Shutdown,
            other => return Err(format!("unknown fault operation `{other}` (upload, create, template, clone, destroy, volume-delete, status, shutdown)")),
        };
        let kind = match kind {
            "500" => FaultKind::Http500,
            "drop" => FaultKind::Drop,
            "fail" => FaultKind::FailTask,
            "lock-timeout" => FaultKind::LockTimeout,
            "400" => FaultKind::Transient400,
            "race" => FaultKind::Race,
            "ignore-acpi" => FaultKind::IgnoreAcpi,
            k if k.starts_with("slow=") => FaultKind::SlowTask(
                k[5..].parse().map_err(|_| format!("bad seconds in `{s}`"))?,
            ),
            other => return Err(format!("unknown fault kind `{other}` (500, drop, fail, slow=SECS, lock-timeout, 400, race, ignore-acpi)")),
        };
        Ok(Fault {
            op,
            kind,
            remaining: count,
        })
    }
}

impl State {
    pub(crate) fn take_fault(&mut self, op: FaultOp) -> Option<FaultKind> {
        self.take_fault_if(op, |_| true)
    }

    pub(crate) fn take_fault_if(
        &mut self,
        op: FaultOp,
        want: impl Fn(FaultKind) -> bool,
    ) -> Option<FaultKind> {
        let i = self
            .faults
            .iter()
            .position(|f| f.op == op && f.remaining > 0 && want(f.kind))?;
        let f = &mut self.faults[i];
        f.remaining -= 1;
        let kind = f.kind;
        if f.remaining == 0 {
            self.faults.remove(i);
        }
        Some(kind)
    }
}

/// Parse `--fault` specs for the binary.
pub fn parse_faults(specs: &[String]) -> Result<Vec<Fault>> {
    specs
        .iter()
        .map(|s| s.parse::<Fault>().map_err(anyhow::Error::msg))
        .collect()
}

/// `POST /_sim/faults` (simulator-only, not part of PVE): inject a fault at runtime.
pub(crate) fn add_fault(shared: &Shared, p: &BTreeMap<String, String>) -> ApiResult {
    let spec = p.get("spec").cloned().unwrap_or_default();
    let f: Fault = spec.parse().map_err(|e: String| param_err("spec", e))?;
    lock(shared).faults.push(f);
    Ok(Value::Null)
}

/// The answer to an injected `500` fault.
pub(crate) fn injected_500() -> ApiError {
    err500("Internal Server Error (fault injected by pve-sim)")
}

/// The request-level faults (a lock timeout, a 500) injected for this call.
pub(crate) fn refuse_injected(kind: Option<FaultKind>, vmid: u32) -> Result<(), ApiError> {
    match kind {
        Some(FaultKind::LockTimeout) => Err(lock_timeout(vmid)),
        Some(FaultKind::Http500) => Err(injected_500()),
        _ => Ok(()),
    }
}

fn lock_timeout(vmid: u32) -> ApiError {
    err500(format!(
        "can't lock file '/var/lock/qemu-server/lock-{vmid}.conf' - got timeout"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_specs_parse() {
        let f: Fault = "upload:drop*2".parse().unwrap();
        assert_eq!(f.op, FaultOp::Upload);
        assert_eq!(f.kind, FaultKind::Drop);
        assert_eq!(f.remaining, 2);
        let f: Fault = "create:slow=1.5".parse().unwrap();
        assert_eq!(f.kind, FaultKind::SlowTask(1.5));
        assert!("nothing:500".parse::<Fault>().is_err());
        let f: Fault = "shutdown:ignore-acpi".parse().unwrap();
        assert_eq!((f.op, f.kind), (FaultOp::Shutdown, FaultKind::IgnoreAcpi));
    }
}
