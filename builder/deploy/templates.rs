//! `kiln templates list|prune`: the templates kiln published on a target, and
//! removal of old ones that keeps the newest N per image and any with linked clones.

use crate::deploy::publish::naming;
use crate::deploy::pve::client::seg;
use crate::deploy::pve::vms::{as_u64, destroy_vm, list_vms, vm_config};
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

/// Templates tagged `kiln` on `nodes`, newest first within each image.
pub(crate) fn list(pve: &Pve, nodes: &[String]) -> Result<Vec<TemplateInfo>> {
    let mut out = Vec::new();
    for vm in list_vms(pve)?.into_iter().filter(|v| {
        v.template && v.tags.iter().any(|t| t == naming::KILN_TAG) && nodes.contains(&v.node)
    }) {
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
            .then(a.node.cmp(&b.node))
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
    /// Templates past the newest N that stay because linked clones use them
    /// (an empty list: Proxmox refused to remove it for a linked clone kiln
    /// cannot see).
    pub kept_linked: Vec<(TemplateInfo, Vec<u32>)>,
    /// Templates past the newest N on storage that shows no link from a
    /// linked clone to its template (LVM-thin), kept because VMs cloned from
    /// them exist (they carry the template's description); `--force`
    /// deletes them anyway.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub kept_maybe_linked: Vec<(TemplateInfo, Vec<u32>, String)>,
}

/// Which templates a prune removes: all but the newest `keep` of each image
/// on each node (every node keeps its own copies).
pub(crate) fn prune_plan(
    list: &[TemplateInfo],
    keep: usize,
) -> (Vec<TemplateInfo>, Vec<TemplateInfo>) {
    let mut by_image: BTreeMap<(&str, &str), Vec<&TemplateInfo>> = BTreeMap::new();
    for t in list {
        by_image.entry((&t.image, &t.node)).or_default().push(t);
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

/// Disk options of a VM config (`scsiN`, `virtioN`, `sataN`, `ideN`, `efidisk0`, `tpmstate0`).
fn is_disk_key(k: &str) -> bool {
    let digits = |p: &str| {
        k.strip_prefix(p)
            .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
    };
    digits("scsi")
        || digits("virtio")
        || digits("sata")
        || digits("ide")
        || k == "efidisk0"
        || k == "tpmstate0"
}

/// The storages a VM's disks are on.
fn disk_storages(cfg: &serde_json::Map<String, Value>) -> Vec<String> {
    let mut out: Vec<String> = cfg
        .iter()
        .filter(|(k, _)| is_disk_key(k))
        .filter_map(|(_, v)| v.as_str()?.split(',').next()?.split_once(':'))
        .map(|(s, _)| s.to_string())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// For every VM, the templates its disks are visible linked clones of, read
/// once before any change.
fn linked_clone_users(
    configs: &BTreeMap<u32, serde_json::Map<String, Value>>,
) -> BTreeMap<u32, Vec<u32>> {
    let mut users: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for (vmid, cfg) in configs {
        for (_, v) in cfg.iter().filter(|(k, _)| is_disk_key(k)) {
            if let Some(base) = v.as_str().and_then(linked_base) {
                if base != *vmid {
                    let e = users.entry(base).or_default();
                    if !e.contains(vmid) {
                        e.push(*vmid);
                    }
                }
            }
        }
    }
    users
}

/// The template VMID a disk value is a linked clone of, where the storage
/// shows it in the name (pve-storage's `clone_image`):
/// ZFS/RBD `base-X-disk-N/vm-Y-disk-M`, file based (dir, NFS, CIFS, BTRFS)
/// `X/base-X-disk-N.qcow2/Y/vm-Y-disk-M.qcow2`. LVM-thin names a linked
/// clone `vm-Y-disk-M` like any disk (`LvmThinPlugin::clone_image`).
pub(crate) fn linked_base(disk: &str) -> Option<u32> {
    let vol = disk.split(',').next()?;
    let (_, path) = vol.split_once(':')?;
    let parts: Vec<&str> = path.split('/').collect();
    match parts.as_slice() {
        [base, _clone] => base.strip_prefix("base-")?.split('-').next()?.parse().ok(),
        [x, base, _, _] if base.starts_with(&format!("base-{x}-")) => x.parse().ok(),
        _ => None,
    }
}

/// Whether linked clones on a storage of this type show their template in
/// their disk names (or cannot exist there at all). LVM-thin and types kiln
/// does not know cannot tell.
pub(crate) fn storage_shows_links(kind: &str) -> bool {
    matches!(
        kind,
        "zfspool" | "zfs" | "rbd" | "dir" | "nfs" | "cifs" | "btrfs" | "glusterfs" | "cephfs"
            // No clones at all.
            | "lvm" | "iscsi" | "iscsidirect"
    )
}

/// A storage as a node lists it: its type and whether all nodes share it.
#[derive(Debug, Clone)]
struct StorageKind {
    kind: String,
    shared: bool,
}

/// Storage id to type and sharing on a node (`GET /nodes/{node}/storage`).
fn storage_kinds(pve: &Pve, node: &str) -> Result<BTreeMap<String, StorageKind>> {
    let v = pve.get(&format!("/nodes/{}/storage", seg(node)), &[])?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| {
                    Some((
                        e.get("storage")?.as_str()?.to_string(),
                        StorageKind {
                            kind: e.get("type")?.as_str()?.to_string(),
                            shared: e.get("shared").and_then(as_u64).unwrap_or(0) == 1,
                        },
                    ))
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Whether an error is Proxmox refusing to free a base volume a linked clone
/// uses (`PVE::Storage::vdisk_free`: "... is still in use by linked cloned").
fn in_use_by_linked_clone(e: &anyhow::Error) -> bool {
    format!("{e:#}").contains("still in use by linked clone")
}

/// What a prune deletes and how carefully.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PruneOptions {
    pub keep: usize,
    pub dry_run: bool,
    /// Delete templates on LVM-thin even when VMs cloned from them exist.
    pub force: bool,
}

pub(crate) fn prune(pve: &Pve, nodes: &[String], opts: PruneOptions) -> Result<PruneOutcome> {
    let list = list(pve, nodes)?;
    let (kept, candidates) = prune_plan(&list, opts.keep);
    let mut configs = BTreeMap::new();
    let mut vm_nodes = BTreeMap::new();
    for vm in list_vms(pve)? {
        configs.insert(vm.vmid, vm_config(pve, &vm.node, vm.vmid)?);
        vm_nodes.insert(vm.vmid, vm.node);
    }
    let users = linked_clone_users(&configs);
    let mut kinds: BTreeMap<String, BTreeMap<String, StorageKind>> = BTreeMap::new();
    let mut out = PruneOutcome {
        kept,
        ..Default::default()
    };
    for t in candidates {
        if let Some(u) = users.get(&t.vmid) {
            out.kept_linked.push((t, u.clone()));
            continue;
        }
        let Some(cfg) = configs.get(&t.vmid) else {
            continue;
        };
        if !kinds.contains_key(&t.node) {
            kinds.insert(t.node.clone(), storage_kinds(pve, &t.node)?);
        }
        let blind: Vec<(String, bool)> = disk_storages(cfg)
            .into_iter()
            .filter_map(|s| {
                let k = kinds[&t.node].get(&s);
                let kind = k.map(|k| k.kind.as_str()).unwrap_or("unknown");
                (!storage_shows_links(kind))
                    .then(|| (format!("`{s}` ({kind})"), k.is_some_and(|k| k.shared)))
            })
            .collect();
        if !blind.is_empty() && !opts.force {
            // A linked clone lives on its template's storage: where that is
            // local to the node (LVM-thin always is), only VMs on the
            // template's node can be its clones.
            let local = blind.iter().all(|(_, shared)| !shared);
            let only_on = local.then_some((&vm_nodes, t.node.as_str()));
            let clones = clones_of(&configs, t.vmid, cfg, only_on);
            if !clones.is_empty() {
                let names: Vec<String> = blind.into_iter().map(|(n, _)| n).collect();
                out.kept_maybe_linked.push((t, clones, names.join(", ")));
                continue;
            }
        }
        if !opts.dry_run {
            match destroy_vm(pve, &t.node, t.vmid) {
                Ok(()) => {}
                Err(e) if in_use_by_linked_clone(&e) => {
                    out.kept_linked.push((t, Vec::new()));
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        out.deleted.push(t);
    }
    Ok(out)
}

/// VMs cloned from template `vmid`: they carry its description (Proxmox
/// copies it into clones, `PVE/API2/Qemu.pm` `clone_vm`) with its
/// `kiln-run` line, but not its SMBIOS UUID. A publish to several nodes
/// writes one `kiln-run` into each node's template: with `only_on` (the
/// VMs' nodes, the template's node) only VMs on that node count.
fn clones_of(
    configs: &BTreeMap<u32, serde_json::Map<String, Value>>,
    vmid: u32,
    template: &serde_json::Map<String, Value>,
    only_on: Option<(&BTreeMap<u32, String>, &str)>,
) -> Vec<u32> {
    let desc = |c: &serde_json::Map<String, Value>| {
        naming::parse_description(c.get("description").and_then(Value::as_str).unwrap_or(""))
    };
    let d = desc(template);
    let key = if d.contains_key(naming::keys::RUN) {
        naming::keys::RUN
    } else {
        naming::keys::ID
    };
    let Some(mine) = d.get(key) else {
        return Vec::new();
    };
    configs
        .iter()
        .filter(|(id, c)| {
            **id != vmid
                && c.get("template").and_then(Value::as_u64) != Some(1)
                && desc(c).get(key) == Some(mine)
                && only_on
                    .is_none_or(|(nodes, node)| nodes.get(*id).map(String::as_str) == Some(node))
        })
        .map(|(id, _)| *id)
        .collect()
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
        if users.is_empty() {
            s.push_str(&format!(
                "kept {} {} (vmid {}): Proxmox says linked clones use it\n",
                t.image, t.version, t.vmid
            ));
        } else {
            s.push_str(&format!(
                "kept {} {} (vmid {}): linked clones {:?} use it\n",
                t.image, t.version, t.vmid, users
            ));
        }
    }
    for (t, clones, storages) in &o.kept_maybe_linked {
        s.push_str(&format!(
            "kept {} {} (vmid {}): linked clones {:?} may use it (its storage {storages} \
             shows no link from a clone to its template); --force deletes it\n",
            t.image, t.version, t.vmid, clones
        ));
    }
    s.push_str(&format!(
        "{} kept as newest, {} {verb}, {} kept for linked clones\n",
        o.kept.len(),
        o.deleted.len(),
        o.kept_linked.len() + o.kept_maybe_linked.len()
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
        assert_eq!(
            linked_base("local:9000/base-9000-disk-0.qcow2/120/vm-120-disk-0.qcow2,size=4G"),
            Some(9000)
        );
        assert_eq!(
            linked_base("local:9000/base-9000-disk-0.qcow2,size=4G"),
            None
        );
        assert_eq!(linked_base("local:120/vm-120-disk-0.qcow2"), None);
        assert_eq!(linked_base("local-lvm:vm-120-disk-1,size=4G"), None);
        assert_eq!(linked_base("local-lvm:base-9000-disk-1,size=4G"), None);
    }

    #[test]
    fn prune_keeps_the_newest_n_on_each_node() {
        let mut on_b = t("a", "2026-01-01T00:00:00Z", 9010);
        on_b.node = "pve2".into();
        let list = vec![
            t("a", "2026-01-01T00:00:00Z", 9000),
            t("a", "2026-02-01T00:00:00Z", 9001),
            on_b,
        ];
        let (kept, gone) = prune_plan(&list, 1);
        let kept: Vec<u32> = kept.iter().map(|t| t.vmid).collect();
        assert_eq!(kept, vec![9001, 9010]);
        assert_eq!(gone.len(), 1);
    }

    #[test]
    fn vms_on_another_node_are_no_clones_of_a_template_on_node_local_storage() {
        let cfg = |desc: &str, template: bool| {
            let mut m = serde_json::Map::new();
            m.insert("description".into(), Value::String(desc.into()));
            if template {
                m.insert("template".into(), Value::from(1));
            }
            m
        };
        // One publish run made templates 9000 (pve) and 9001 (pve2); VMs
        // cloned from each carry the same kiln-run line.
        let run = "kiln-run: 0f8e6a62-1c2b-4d3e-9f00-aabbccddeeff";
        let configs: BTreeMap<u32, serde_json::Map<String, Value>> = [
            (9000, cfg(run, true)),
            (9001, cfg(run, true)),
            (120, cfg(run, false)),
            (121, cfg(run, false)),
        ]
        .into();
        let nodes: BTreeMap<u32, String> = [
            (9000, "pve".to_string()),
            (9001, "pve2".into()),
            (120, "pve".into()),
            (121, "pve2".into()),
        ]
        .into();
        assert_eq!(
            clones_of(&configs, 9000, &configs[&9000], None),
            vec![120, 121]
        );
        assert_eq!(
            clones_of(&configs, 9000, &configs[&9000], Some((&nodes, "pve"))),
            vec![120]
        );
    }

    #[test]
    fn prune_keep_zero_removes_all() {
        let list = vec![t("a", "x", 1), t("b", "y", 2)];
        assert_eq!(prune_plan(&list, 0).1.len(), 2);
    }
}
