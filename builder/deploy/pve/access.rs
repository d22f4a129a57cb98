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
    "VM.Allocate",
    "VM.Audit",
    "VM.Config.CPU",
    "VM.Config.Disk",
    "VM.Config.HWType",
    "VM.Config.Memory",
    "VM.Config.Network",
    "VM.Config.Options",
];

/// The `pveum` line that makes the role.
pub(crate) fn role_command() -> String {
    format!(
        "pveum role add KilnPublish -privs \"{}\"",
        KILN_PUBLISH_PRIVS.join(",")
    )
}

/// One privilege a job needs on one path, and what for.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Need {
    pub path: String,
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
            any_of: vec![privilege],
            why: why.into(),
            optional: false,
        }
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
        if !by_path.contains_key(n.path.as_str()) {
            let p = privileges_on(pve, &n.path)?;
            by_path.insert(&n.path, p);
        }
        let Some(have) = &by_path[n.path.as_str()] else {
            out.warnings.push(
                "this Proxmox VE does not answer /access/permissions: privileges not checked up front"
                    .into(),
            );
            return Ok(out);
        };
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

/// The error for missing privileges: each with its path and purpose, and
/// the role that has them all.
pub(crate) fn missing_error(token_id: &str, missing: &[Need]) -> anyhow::Error {
    let list: Vec<String> = missing
        .iter()
        .map(|n| format!("{} on {} ({})", n.any_of.join(" or "), n.path, n.why))
        .collect();
    anyhow::anyhow!(
        "the API token {token_id} lacks privileges: {}. A role with all kiln publish needs: \
         `{}`; then `pveum acl modify / --tokens '{token_id}' --roles KilnPublish`",
        list.join("; "),
        role_command()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_role_command_is_the_one_kiln_prints() {
        let cmd = role_command();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        for f in ["README.md", "kiln.example.toml"] {
            let text = std::fs::read_to_string(root.join(f)).unwrap();
            assert!(text.contains(&cmd), "{f} does not show `{cmd}`");
        }
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
        );
        let msg = format!("{e:#}");
        assert!(
            msg.contains("Datastore.AllocateTemplate on /storage/local (upload)"),
            "{msg}"
        );
        assert!(msg.contains("pveum role add KilnPublish"), "{msg}");
    }
}
