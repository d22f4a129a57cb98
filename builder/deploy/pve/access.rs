//! The API token's privileges: what a job needs on which path, checked up
//! front with `GET /access/permissions` (each user or token may read its own
//! effective privileges), so a missing one is named with its path before
//! anything is uploaded or created.

use anyhow::Result;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

use super::client::Pve;
use super::errors::ApiError;

/// The privileges `kiln publish` may use, for a role made once:
/// `pveum role add KilnPublish -privs "..."`. Keep in step with README.md
/// and kiln.example.toml (a test checks both).
pub(crate) const KILN_PUBLISH_PRIVS: &[&str] = &[
    "Datastore.Allocate",
    "Datastore.AllocateSpace",
    "Datastore.AllocateTemplate",
    "Datastore.Audit",
    "SDN.Use",
    "Sys.Audit",
    "VM.Allocate",
    "VM.Audit",
    "VM.Config.CPU",
    "VM.Config.Disk",
    "VM.Config.HWType",
    "VM.Config.Memory",
    "VM.Config.Network",
    "VM.Config.Options",
];

/// The privileges `kiln env` uses on Proxmox (clone, configure, start,
/// stop, destroy VMs; upload seed ISOs). Keep in step with README.md (a test
/// checks it).
pub(crate) const KILN_ENV_PRIVS: &[&str] = &[
    "Datastore.AllocateSpace",
    "Datastore.AllocateTemplate",
    "Datastore.Audit",
    "SDN.Use",
    "Sys.Audit",
    "VM.Allocate",
    "VM.Audit",
    "VM.Clone",
    "VM.Config.CDROM",
    "VM.Config.CPU",
    "VM.Config.Disk",
    "VM.Config.HWType",
    "VM.Config.Memory",
    "VM.Config.Network",
    "VM.Config.Options",
    "VM.PowerMgmt",
];

/// The roles kiln documents for its API tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KilnRole {
    /// `kiln publish` and `kiln templates`.
    Publish,
    /// `kiln env` on a Proxmox provider.
    Environments,
}

impl KilnRole {
    fn name(self) -> &'static str {
        match self {
            KilnRole::Publish => "KilnPublish",
            KilnRole::Environments => "KilnEnvironments",
        }
    }

    fn privileges(self) -> &'static [&'static str] {
        match self {
            KilnRole::Publish => KILN_PUBLISH_PRIVS,
            KilnRole::Environments => KILN_ENV_PRIVS,
        }
    }
}

/// The `pveum` line that makes the role.
pub(crate) fn role_command(role: KilnRole) -> String {
    format!(
        "pveum role add {} -privs \"{}\"",
        role.name(),
        role.privileges().join(",")
    )
}

/// One privilege a job needs on one path, and what for.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Need {
    pub path: String,
    /// Another path where the privilege counts as well (a VM's pool).
    pub or_path: Option<String>,
    /// Any one of these will do (e.g. `Datastore.Audit` or
    /// `Datastore.AllocateSpace` to read a storage).
    pub any_of: Vec<&'static str>,
    pub why: String,
    /// Without it the job still succeeds, with less done (a warning).
    pub optional: bool,
}

impl Need {
    pub(crate) fn new(path: impl Into<String>, privilege: &'static str, why: &str) -> Need {
        Need {
            path: path.into(),
            or_path: None,
            any_of: vec![privilege],
            why: why.into(),
            optional: false,
        }
    }

    /// The privilege may come from `path` too.
    pub(crate) fn or_on(mut self, path: Option<String>) -> Need {
        self.or_path = path;
        self
    }

    pub(crate) fn optional(mut self) -> Need {
        self.optional = true;
        self
    }
}

/// What checking found: missing privileges that stop the job, and notes for
/// optional ones or when the check itself could not be made.
#[derive(Debug, Default)]
pub(crate) struct Checked {
    pub missing: Vec<Need>,
    pub warnings: Vec<String>,
}

/// Effective privileges on `path`, or None when this PVE has no
/// `/access/permissions` (then nothing can be checked up front).
fn privileges_on(pve: &Pve, path: &str) -> Result<Option<BTreeSet<String>>> {
    let v = match pve.get("/access/permissions", &[("path", path.to_string())]) {
        Ok(v) => v,
        Err(e)
            if e.downcast_ref::<ApiError>()
                .is_some_and(|a| a.status == 501 || a.status == 404) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e.context("cannot read the API token's privileges")),
    };
    // `{PATH: {PRIV: 1, ...}}`; an empty object when there are none.
    Ok(Some(
        v.get(path)
            .and_then(Value::as_object)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default(),
    ))
}

/// Check every need, one request per distinct path.
pub(crate) fn check(pve: &Pve, needs: &[Need]) -> Result<Checked> {
    let mut by_path: BTreeMap<&str, Option<BTreeSet<String>>> = BTreeMap::new();
    let mut out = Checked::default();
    for n in needs {
        let mut have = BTreeSet::new();
        for path in std::iter::once(&n.path).chain(n.or_path.as_ref()) {
            if !by_path.contains_key(path.as_str()) {
                let p = privileges_on(pve, path)?;
                by_path.insert(path, p);
            }
            let Some(privs) = &by_path[path.as_str()] else {
                out.warnings.push(
                    "this Proxmox VE does not answer /access/permissions: privileges not checked up front"
                        .into(),
                );
                return Ok(out);
            };
            have.extend(privs.iter().cloned());
        }
        if n.any_of.iter().any(|p| have.contains(*p)) {
            continue;
        }
        if n.optional {
            out.warnings.push(format!(
                "the API token lacks {} on {}: {}",
                n.any_of.join(" or "),
                n.path,
                n.why
            ));
        } else {
            out.missing.push(n.clone());
        }
    }
    Ok(out)
}

/// Whether the token has `privilege` on `path` (false when it cannot be told).
pub(crate) fn has(pve: &Pve, path: &str, privilege: &str) -> Result<bool> {
    Ok(privileges_on(pve, path)?.is_some_and(|p| p.contains(privilege)))
}

/// The tags of `wanted` the datacenter's tag policy does not let this token
/// set, with the policy in words; Err only for failed requests. The rules
/// are pve-guest-common's (`PVE::GuestHelpers::assert_tag_permissions`,
/// `get_allowed_tags`): Sys.Modify on `/` may set any tag; otherwise a
/// registered tag never, and another one when `user-allow` is `free` (the
/// default), or it is in `user-allow-list` (unless `none`), or, for
/// `existing`, a VM the token can see already carries it. `options` is the
/// answer of `GET /cluster/options` (datacenter.cfg), `existing` the tags
/// on visible VMs.
pub(crate) fn refused_tags(
    options: &Value,
    privileged: bool,
    wanted: &[String],
    existing: &BTreeSet<String>,
) -> (Vec<String>, String) {
    if privileged {
        return (Vec::new(), String::new());
    }
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
    let registered = list(options.get("registered-tags"));
    // An object, or the property string `user-allow=...,user-allow-list=a;b`.
    let (allow, allow_list) = match options.get("user-tag-access") {
        Some(Value::Object(o)) => (
            o.get("user-allow")
                .and_then(Value::as_str)
                .unwrap_or("free")
                .to_string(),
            list(o.get("user-allow-list")),
        ),
        Some(Value::String(s)) => {
            let mut allow = "free".to_string();
            let mut l = Vec::new();
            for part in s.split(',') {
                match part.split_once('=') {
                    Some(("user-allow", v)) => allow = v.to_string(),
                    Some(("user-allow-list", v)) => {
                        l = v
                            .split(';')
                            .filter(|t| !t.is_empty())
                            .map(str::to_string)
                            .collect()
                    }
                    _ => {}
                }
            }
            (allow, l)
        }
        _ => ("free".to_string(), Vec::new()),
    };
    let refused = wanted
        .iter()
        .filter(|t| {
            let allowed = !registered.contains(t)
                && (allow == "free"
                    || (allow != "none" && allow_list.contains(t))
                    || (allow == "existing" && existing.contains(*t)));
            !allowed
        })
        .cloned()
        .collect();
    let mut policy = format!("user-tag-access: user-allow={allow}");
    if !allow_list.is_empty() {
        policy.push_str(&format!(", user-allow-list={}", allow_list.join(";")));
    }
    if !registered.is_empty() {
        policy.push_str(&format!("; registered-tags: {}", registered.join(";")));
    }
    (refused, policy)
}

/// The error for missing privileges: each with its path and purpose, and
/// the role that has them all.
pub(crate) fn missing_error(token_id: &str, missing: &[Need], role: KilnRole) -> anyhow::Error {
    let list: Vec<String> = missing
        .iter()
        .map(|n| {
            let on = match &n.or_path {
                Some(o) => format!("{} or {o}", n.path),
                None => n.path.clone(),
            };
            format!("{} on {on} ({})", n.any_of.join(" or "), n.why)
        })
        .collect();
    anyhow::anyhow!(
        "the API token {token_id} lacks privileges: {}. A role with all kiln {} needs: \
         `{}`; then `pveum acl modify / --tokens '{token_id}' --roles {}`",
        list.join("; "),
        match role {
            KilnRole::Publish => "publish",
            KilnRole::Environments => "env",
        },
        role_command(role),
        role.name()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_role_command_is_the_one_kiln_prints() {
        let cmd = role_command(KilnRole::Publish);
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        for f in ["README.md", "kiln.example.toml"] {
            let text = std::fs::read_to_string(root.join(f)).unwrap();
            assert!(text.contains(&cmd), "{f} does not show `{cmd}`");
        }
    }

    #[test]
    fn the_documented_environments_role_is_the_one_kiln_prints() {
        let cmd = role_command(KilnRole::Environments);
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
        assert!(text.contains(&cmd), "README.md does not show `{cmd}`");
    }

    #[test]
    fn the_tag_policy_is_applied_as_proxmox_does() {
        let wanted: Vec<String> = ["kiln", "lb", "id-abc"].map(String::from).to_vec();
        let existing: BTreeSet<String> = ["kiln".to_string(), "lb".to_string()].into();
        let r = |opts: Value| refused_tags(&opts, false, &wanted, &existing).0;
        assert!(r(serde_json::json!({})).is_empty());
        assert_eq!(
            r(serde_json::json!({"user-tag-access": {"user-allow": "existing"}})),
            vec!["id-abc"]
        );
        assert_eq!(
            r(serde_json::json!({"user-tag-access": "user-allow=list,user-allow-list=kiln;lb"})),
            vec!["id-abc"]
        );
        assert_eq!(
            r(
                serde_json::json!({"user-tag-access": {"user-allow": "none", "user-allow-list": ["kiln"]}})
            ),
            wanted
        );
        assert_eq!(
            r(serde_json::json!({"registered-tags": ["kiln"]})),
            vec!["kiln"]
        );
        let (none, _) = refused_tags(
            &serde_json::json!({"registered-tags": ["kiln"]}),
            true,
            &wanted,
            &existing,
        );
        assert!(none.is_empty());
    }

    #[test]
    fn missing_privileges_are_named_with_their_paths() {
        let e = missing_error(
            "ci@pve!kiln",
            &[Need::new(
                "/storage/local",
                "Datastore.AllocateTemplate",
                "upload",
            )],
            KilnRole::Publish,
        );
        let msg = format!("{e:#}");
        assert!(
            msg.contains("Datastore.AllocateTemplate on /storage/local (upload)"),
            "{msg}"
        );
        assert!(msg.contains("pveum role add KilnPublish"), "{msg}");
    }
}
