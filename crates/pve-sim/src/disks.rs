//! How each storage type names VM disks, base (template) disks and linked
//! clones, after the storage plugins of pve-storage:
//! - `zfspool`, `rbd`: `vm-Y-disk-N`, `base-X-disk-N`, linked clone
//!   `base-X-disk-N/vm-Y-disk-M` (`ZFSPoolPlugin`/`RBDPlugin::clone_image`);
//! - `lvmthin`: the same, but a linked clone is plain `vm-Y-disk-M`
//!   (`LvmThinPlugin::clone_image` returns only the new name), so nothing
//!   shows which template it came from;
//! - file based (`dir`, `nfs`, ...): `Y/vm-Y-disk-N.qcow2`, `X/base-X-disk-N.qcow2`,
//!   linked clone `X/base-X-disk-N.qcow2/Y/vm-Y-disk-M.qcow2` (`Plugin::clone_image`).
//!
//! Part of pve-sim, a labelled STAND-IN for the Proxmox VE API (not Proxmox).

use crate::state::{storage, StorageDef};

fn file_based(s: &StorageDef) -> bool {
    matches!(
        s.kind,
        "dir" | "nfs" | "cifs" | "btrfs" | "glusterfs" | "cephfs"
    )
}

/// Volume id of a VM's `n`th new disk on storage `s`.
pub(crate) fn new_disk(s: &StorageDef, vmid: u32, n: u32) -> String {
    if file_based(s) {
        format!("{}:{vmid}/vm-{vmid}-disk-{n}.qcow2", s.id)
    } else {
        format!("{}:vm-{vmid}-disk-{n}", s.id)
    }
}

/// Volume id of a VM's cloud-init drive.
pub(crate) fn cloudinit(s: &StorageDef, vmid: u32) -> String {
    if file_based(s) {
        format!("{}:{vmid}/vm-{vmid}-cloudinit.qcow2", s.id)
    } else {
        format!("{}:vm-{vmid}-cloudinit", s.id)
    }
}

/// The base volume a VM disk becomes when its VM is made a template
/// (`create_base`: `vm-` becomes `base-`); None for other volumes.
pub(crate) fn to_base(volid: &str, vmid: u32) -> Option<String> {
    let (sid, name) = volid.split_once(':')?;
    let flat = format!("vm-{vmid}-disk-");
    let path = format!("{vmid}/vm-{vmid}-disk-");
    if name.starts_with(&flat) {
        Some(format!("{sid}:base-{vmid}-disk-{}", &name[flat.len()..]))
    } else if name.starts_with(&path) {
        Some(format!(
            "{sid}:{vmid}/base-{vmid}-disk-{}",
            &name[path.len()..]
        ))
    } else {
        None
    }
}

/// The disk number of a VM or base volume (`...-disk-N[.qcow2]`).
pub(crate) fn disk_no(volid: &str) -> u32 {
    let last = volid.rsplit('-').next().unwrap_or("0");
    last.split('.').next().unwrap_or("0").parse().unwrap_or(0)
}

/// Volume id of `newid`'s copy of disk `src` (of VM or template `vmid`):
/// a linked clone of a base volume, or a full copy.
pub(crate) fn clone_disk(src: &str, vmid: u32, newid: u32, linked: bool) -> Option<String> {
    let (sid, name) = src.split_once(':')?;
    let s = storage(sid)?;
    if !name.contains(&format!("-{vmid}-disk-")) {
        return None;
    }
    let n = disk_no(src);
    Some(match (linked, file_based(s), s.kind) {
        (false, _, _) => new_disk(s, newid, n),
        (true, true, _) => format!("{sid}:{name}/{newid}/vm-{newid}-disk-{n}.qcow2"),
        (true, false, "lvmthin") => format!("{sid}:vm-{newid}-disk-{n}"),
        (true, false, _) => format!("{sid}:{name}/vm-{newid}-disk-{n}"),
    })
}

/// The template a volume is a visible linked clone of.
pub(crate) fn linked_base(volid: &str) -> Option<u32> {
    let (_, name) = volid.split_once(':')?;
    let parts: Vec<&str> = name.split('/').collect();
    match parts.as_slice() {
        [base, _] => base.strip_prefix("base-")?.split('-').next()?.parse().ok(),
        [x, base, _, _] if base.starts_with(&format!("base-{x}-")) => x.parse().ok(),
        _ => None,
    }
}

/// The base volume a visible linked clone points at.
pub(crate) fn base_volume(volid: &str) -> Option<String> {
    linked_base(volid)?;
    let (sid, name) = volid.split_once(':')?;
    let parts: Vec<&str> = name.split('/').collect();
    Some(match parts.as_slice() {
        [base, _] => format!("{sid}:{base}"),
        [x, base, _, _] => format!("{sid}:{x}/{base}"),
        _ => return None,
    })
}

/// The content type of a volume from its name, as the storage plugins'
/// `parse_volname` tell it (pve-storage `PVE/Storage/Plugin.pm`): `iso/...`,
/// `vztmpl/...`, `backup/...`, `import/...`, `snippets/...`, else `images`.
pub(crate) fn volume_type(volid: &str) -> &'static str {
    let name = volid.split_once(':').map(|(_, n)| n).unwrap_or(volid);
    for t in ["iso", "vztmpl", "backup", "import", "snippets"] {
        if name.starts_with(&format!("{t}/")) {
            return t;
        }
    }
    "images"
}

/// The VM a volume belongs to (a linked clone belongs to the clone). ISO
/// images, container templates, imports and backups belong to no VM, whatever
/// their name (`parse_volname` gives them no owner).
pub(crate) fn owner(volid: &str) -> Option<u32> {
    if volume_type(volid) != "images" {
        return None;
    }
    let (_, name) = volid.split_once(':')?;
    let last = name.rsplit('/').next()?;
    let rest = last
        .strip_prefix("vm-")
        .or_else(|| last.strip_prefix("base-"))?;
    rest.split('-').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linked_clones_are_named_per_storage_type() {
        let zfs = to_base("local-zfs:vm-100-disk-1", 100).unwrap();
        assert_eq!(zfs, "local-zfs:base-100-disk-1");
        assert_eq!(
            clone_disk(&zfs, 100, 120, true).unwrap(),
            "local-zfs:base-100-disk-1/vm-120-disk-1"
        );
        let dir = to_base("nfs:100/vm-100-disk-0.qcow2", 100).unwrap();
        assert_eq!(dir, "nfs:100/base-100-disk-0.qcow2");
        let c = clone_disk(&dir, 100, 120, true).unwrap();
        assert_eq!(c, "nfs:100/base-100-disk-0.qcow2/120/vm-120-disk-0.qcow2");
        assert_eq!(linked_base(&c), Some(100));
        assert_eq!(base_volume(&c).unwrap(), "nfs:100/base-100-disk-0.qcow2");
        assert_eq!(owner(&c), Some(120));
        let thin = clone_disk("local-lvm:base-100-disk-1", 100, 120, true).unwrap();
        assert_eq!(thin, "local-lvm:vm-120-disk-1");
        assert_eq!(linked_base(&thin), None);
        assert_eq!(
            clone_disk("local-lvm:base-100-disk-1", 100, 121, false).unwrap(),
            "local-lvm:vm-121-disk-1"
        );
    }

    #[test]
    fn iso_images_belong_to_no_vm_whatever_their_name() {
        assert_eq!(volume_type("local:iso/vm-120-cidata.iso"), "iso");
        assert_eq!(owner("local:iso/vm-120-cidata.iso"), None);
        assert_eq!(owner("pve2/local:iso/vm-120-cidata.iso"), None);
        assert_eq!(owner("local-dir:120/vm-120-disk-0.qcow2"), Some(120));
        assert_eq!(volume_type("local-lvm:vm-120-disk-0"), "images");
    }
}
