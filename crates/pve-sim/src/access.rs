//! Privileges of the API token: an ACL of privileges per path, inherited by
//! every path below (as with `propagate=1`), `GET /access/permissions`, and
//! the checks the handlers make, with PVE's 403 answers
//! (`PVE::RPCEnvironment::check`: "Permission check failed (PATH, PRIV)").
//! Part of pve-sim, a labelled STAND-IN for the Proxmox VE API (not Proxmox).

use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};

use crate::routes::{ApiError, ApiResult};
use crate::state::Shared;

/// Privileges granted per path; a path's privileges hold below it too.
pub type Acl = BTreeMap<String, BTreeSet<String>>;

/// The path and its ancestors: `/vms/9000`, `/vms`, `/`.
fn ancestors(path: &str) -> Vec<String> {
    let mut out = vec![];
    let mut p = path.trim_end_matches('/').to_string();
    while !p.is_empty() {
        out.push(p.clone());
        match p.rfind('/') {
            Some(i) => p.truncate(i),
            None => break,
        }
    }
    out.push("/".into());
    out
}

/// Effective privileges at `path`; None means "everything" (no ACL set).
/// A VM in a pool also has the pool's (`/pool/<pool>`) privileges.
pub(crate) fn privileges(shared: &Shared, path: &str) -> Option<BTreeSet<String>> {
    let acl = shared.cfg.acl.as_ref()?;
    let mut paths = ancestors(path);
    if let Some(vmid) = path.strip_prefix("/vms/").and_then(|v| v.parse().ok()) {
        if let Some(pool) = shared.pool_of(vmid) {
            paths.extend(ancestors(&format!("/pool/{pool}")));
        }
    }
    let mut out = BTreeSet::new();
    for a in paths {
        if let Some(p) = acl.get(&a) {
            out.extend(p.iter().cloned());
        }
    }
    Some(out)
}

pub(crate) fn has(shared: &Shared, path: &str, privilege: &str) -> bool {
    privileges(shared, path).is_none_or(|p| p.contains(privilege))
}

pub(crate) fn has_any(shared: &Shared, path: &str, privs: &[&str]) -> bool {
    privs.iter().any(|p| has(shared, path, p))
}

/// PVE's answer to a failed check.
pub(crate) fn denied(path: &str, privilege: &str) -> ApiError {
    ApiError::Status(
        403,
        format!("Permission check failed ({path}, {privilege})"),
    )
}

/// Require one privilege on a path.
pub(crate) fn require(shared: &Shared, path: &str, privilege: &str) -> Result<(), ApiError> {
    if has(shared, path, privilege) {
        Ok(())
    } else {
        Err(denied(path, privilege))
    }
}

/// Require any of `privs` on a path (the answer names the first).
pub(crate) fn require_any(shared: &Shared, path: &str, privs: &[&str]) -> Result<(), ApiError> {
    if has_any(shared, path, privs) {
        Ok(())
    } else {
        Err(ApiError::Status(403, "Permission check failed".into()))
    }
}

/// `GET /access/permissions`: with `path`, the effective privileges there;
/// without, those of every path the ACL names. Values are 1 (propagated).
pub(crate) fn permissions(shared: &Shared, p: &BTreeMap<String, String>) -> ApiResult {
    const ALL: &[&str] = &[
        "Datastore.Allocate",
        "Datastore.AllocateSpace",
        "Datastore.AllocateTemplate",
        "Datastore.Audit",
        "Pool.Allocate",
        "Pool.Audit",
        "SDN.Audit",
        "SDN.Use",
        "Sys.Audit",
        "Sys.Modify",
        "VM.Allocate",
        "VM.Audit",
        "VM.Clone",
        "VM.Config.CDROM",
        "VM.Config.CPU",
        "VM.Config.Cloudinit",
        "VM.Config.Disk",
        "VM.Config.HWType",
        "VM.Config.Memory",
        "VM.Config.Network",
        "VM.Config.Options",
        "VM.PowerMgmt",
    ];
    let paths: Vec<String> = match (p.get("path"), &shared.cfg.acl) {
        (Some(path), _) => vec![path.clone()],
        (None, Some(acl)) => acl.keys().cloned().collect(),
        (None, None) => vec!["/".into()],
    };
    let mut out = Map::new();
    for path in paths {
        let privs: Vec<String> = match privileges(shared, &path) {
            Some(p) => p.into_iter().collect(),
            None => ALL.iter().map(|s| s.to_string()).collect(),
        };
        let m: Map<String, Value> = privs.into_iter().map(|p| (p, json!(1))).collect();
        out.insert(path, Value::Object(m));
    }
    Ok(Value::Object(out))
}

/// Whether the token may set `tag` on a new VM under the datacenter's tag
/// policy (pve-guest-common, `PVE::GuestHelpers::assert_tag_permissions` and
/// `get_allowed_tags`): Sys.Modify on `/` may set any tag; otherwise a
/// registered tag never, and another one when `user-allow` is `free`
/// (the default), or it is in `user-allow-list` (unless `none`), or, for
/// `existing`, some VM the token may audit already carries it.
pub(crate) fn tag_allowed(shared: &Shared, tag: &str, existing: &BTreeSet<String>) -> bool {
    if has(shared, "/", "Sys.Modify") {
        return true;
    }
    let dc = &shared.cfg.datacenter;
    let list = |v: Option<&Value>| -> Vec<String> {
        match v {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect(),
            Some(Value::String(s)) => s
                .split([';', ',', ' '])
                .filter(|t| !t.is_empty())
                .map(str::to_string)
                .collect(),
            _ => Vec::new(),
        }
    };
    if list(dc.get("registered-tags")).iter().any(|t| t == tag) {
        return false;
    }
    let uta = dc.get("user-tag-access");
    let user_allow = uta
        .and_then(|u| u.get("user-allow"))
        .and_then(Value::as_str)
        .unwrap_or("free");
    if user_allow == "free" {
        return true;
    }
    if user_allow != "none"
        && list(uta.and_then(|u| u.get("user-allow-list")))
            .iter()
            .any(|t| t == tag)
    {
        return true;
    }
    user_allow == "existing" && existing.contains(tag)
}

/// Parse `PATH=PRIV,PRIV` specs (the binary's `--acl`).
pub fn parse_acl(specs: &[String]) -> Result<Acl, String> {
    let mut acl = Acl::new();
    for s in specs {
        let (path, privs) = s
            .split_once('=')
            .ok_or_else(|| format!("--acl `{s}` is not PATH=PRIV[,PRIV...]"))?;
        if !path.starts_with('/') {
            return Err(format!("--acl `{s}`: the path must start with /"));
        }
        acl.entry(path.to_string()).or_default().extend(
            privs
                .split(',')
                .filter(|p| !p.is_empty())
                .map(str::to_string),
        );
    }
    Ok(acl)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_inherit_from_their_ancestors() {
        assert_eq!(ancestors("/vms/9000"), vec!["/vms/9000", "/vms", "/"]);
        assert_eq!(ancestors("/"), vec!["/"]);
    }

    #[test]
    fn acl_specs_parse() {
        let acl = parse_acl(&["/vms=VM.Audit,VM.Allocate".into(), "/=Sys.Audit".into()]).unwrap();
        assert!(acl["/vms"].contains("VM.Allocate"));
        assert!(parse_acl(&["vms=VM.Audit".into()]).is_err());
    }
}
