//! `kiln templates list|prune`: the templates kiln published on a target, and
//! removal of old ones that keeps the newest N per image and any with linked clones.

use crate::deploy::publish::naming;
use crate::deploy::pve::vms::{destroy_vm, list_vms, vm_config, VmEntry};
use crate::deploy::pve::Pve;
use anyhow::Result;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct TemplateInfo {
    pub image: String,
    pub version: String,
    pub image_id: String,
    pub vmid: u32,
    pub name: String,
    pub node: String,
    /// RFC 3339 UTC, from the description kiln wrote.
    pub created: String,
}

/// Templates tagged `kiln`, newest first within each image.
pub(crate) fn list(pve: &Pve) -> Result<Vec<TemplateInfo>> {
    let mut out = Vec::new();
    for vm in list_vms(pve)?
        .into_iter()
        .filter(|v| v.template && v.tags.iter().any(|t| t == naming::KILN_TAG))
    {
        let cfg = vm_config(pve, &vm.node, vm.vmid)?;
        let d =
            naming::parse_description(cfg.get("description").and_then(Value::as_str).unwrap_or(""));
        let get = |k: &str| d.get(k).cloned().unwrap_or_default();
        out.push(TemplateInfo {
            image: get(naming::keys::IMAGE),
            version: get(naming::keys::VERSION),
            image_id: get(naming::keys::ID),
            vmid: vm.vmid,
            name: vm.name,
            node: vm.node,
            created: get(naming::keys::CREATED),
        });
    }
    out.sort_by(|a, b| {
        a.image
            .cmp(&b.image)
            .then(b.created.cmp(&a.created))
            .then(b.vmid.cmp(&a.vmid))
    });
    Ok(out)
}

pub(crate) fn table(list: &[TemplateInfo]) -> String {
    let mut rows = vec![[
        "IMAGE".to_string(),
        "VERSION".into(),
        "ID".into(),
        "VMID".into(),
        "NODE".into(),
        "CREATED".into(),
    ]];
    for t in list {
        rows.push([
            t.image.clone(),
            t.version.clone(),
            t.image_id.chars().take(12).collect(),
            t.vmid.to_string(),
            t.node.clone(),
            t.created.clone(),
        ]);
    }
    let mut widths = [0usize; 6];
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let mut s = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        s.push_str(line.join("  ").trim_end());
        s.push('\n');
    }
    s
}

#[derive(Debug, Clone, Serialize, Default)]
pub(crate) struct PruneOutcome {
    pub kept: Vec<TemplateInfo>,
    pub deleted: Vec<TemplateInfo>,
    /// Templates past the newest N that stay because linked clones use them.
    pub kept_linked: Vec<(TemplateInfo, Vec<u32>)>,
}

/// Which templates a prune removes: all but the newest `keep` of each image.
pub(crate) fn prune_plan(
    list: &[TemplateInfo],
    keep: usize,
) -> (Vec<TemplateInfo>, Vec<TemplateInfo>) {
    let mut by_image: BTreeMap<&str, Vec<&TemplateInfo>> = BTreeMap::new();
    for t in list {
        by_image.entry(&t.image).or_default().push(t);
    }
    let (mut kept, mut gone) = (Vec::new(), Vec::new());
    for (_, mut ts) in by_image {
        ts.sort_by(|a, b| b.created.cmp(&a.created).then(b.vmid.cmp(&a.vmid)));
        for (i, t) in ts.into_iter().enumerate() {
            if i < keep {
                kept.push(t.clone());
            } else {
                gone.push(t.clone());
            }
        }
    }
    (kept, gone)
}

/// For every VM, the templates its disks are linked clones of
/// (`<storage>:base-<template>-disk-N/vm-<vmid>-disk-N`), read once before any change.
fn linked_clone_users(pve: &Pve, vms: &[VmEntry]) -> Result<BTreeMap<u32, Vec<u32>>> {
    let mut users: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for vm in vms {
        let cfg = vm_config(pve, &vm.node, vm.vmid)?;
        for v in cfg.values().filter_map(Value::as_str) {
            if let Some(base) = linked_base(v) {
                if base != vm.vmid {
                    let e = users.entry(base).or_default();
                    if !e.contains(&vm.vmid) {
                        e.push(vm.vmid);
                    }
                }
            }
        }
    }
    Ok(users)
}

/// The template VMID a disk value is a linked clone of.
pub(crate) fn linked_base(disk: &str) -> Option<u32> {
    let vol = disk.split(',').next()?;
    let (_, path) = vol.split_once(':')?;
    let (base, _clone) = path.split_once('/')?;
    base.strip_prefix("base-")?.split('-').next()?.parse().ok()
}

pub(crate) fn prune(pve: &Pve, keep: usize, dry_run: bool) -> Result<PruneOutcome> {
    let list = list(pve)?;
    let (kept, candidates) = prune_plan(&list, keep);
    let users = linked_clone_users(pve, &list_vms(pve)?)?;
    let mut out = PruneOutcome {
        kept,
        ..Default::default()
    };
    for t in candidates {
        if let Some(u) = users.get(&t.vmid) {
            out.kept_linked.push((t, u.clone()));
            continue;
        }
        if !dry_run {
            destroy_vm(pve, &t.node, t.vmid)?;
        }
        out.deleted.push(t);
    }
    Ok(out)
}

pub(crate) fn prune_summary(o: &PruneOutcome, dry_run: bool) -> String {
    let verb = if dry_run { "would delete" } else { "deleted" };
    let mut s = String::new();
    for t in &o.deleted {
        s.push_str(&format!(
            "{verb} {} {} (vmid {})\n",
            t.image, t.version, t.vmid
        ));
    }
    for (t, users) in &o.kept_linked {
        s.push_str(&format!(
            "kept {} {} (vmid {}): linked clones {:?} use it\n",
            t.image, t.version, t.vmid, users
        ));
    }
    s.push_str(&format!(
        "{} kept as newest, {} {verb}, {} kept for linked clones\n",
        o.kept.len(),
        o.deleted.len(),
        o.kept_linked.len()
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(image: &str, created: &str, vmid: u32) -> TemplateInfo {
        TemplateInfo {
            image: image.into(),
            version: created.into(),
            image_id: String::new(),
            vmid,
            name: String::new(),
            node: "pve".into(),
            created: created.into(),
        }
    }

    #[test]
    fn prune_keeps_the_newest_n_of_each_image() {
        let list = vec![
            t("a", "2026-01-01T00:00:00Z", 9000),
            t("a", "2026-03-01T00:00:00Z", 9002),
            t("a", "2026-02-01T00:00:00Z", 9001),
            t("b", "2026-01-01T00:00:00Z", 9003),
        ];
        let (kept, gone) = prune_plan(&list, 2);
        let gone: Vec<u32> = gone.iter().map(|t| t.vmid).collect();
        assert_eq!(gone, vec![9000]);
        assert_eq!(kept.len(), 3);
    }

    #[test]
    fn linked_clone_disks_name_their_template() {
        assert_eq!(
            linked_base("local-lvm:base-9000-disk-1/vm-120-disk-1,size=4G"),
            Some(9000)
        );
        assert_eq!(linked_base("local-lvm:vm-120-disk-1,size=4G"), None);
        assert_eq!(linked_base("local-lvm:base-9000-disk-1,size=4G"), None);
    }

    #[test]
    fn prune_keep_zero_removes_all() {
        let list = vec![t("a", "x", 1), t("b", "y", 2)];
        assert_eq!(prune_plan(&list, 0).1.len(), 2);
    }
}
