//! Changing an existing VM: `POST|PUT /nodes/{node}/qemu/{vmid}/config`
//! (options, with pending changes on a running VM), `PUT .../resize` and
//! `POST .../status/shutdown`. Rules from qemu-server `PVE/API2/Qemu.pm`
//! (`$update_vm_api`, `resize_vm`, `vm_shutdown`) and `PVE/QemuServer.pm`
//! (`vmconfig_hotplug_pending`, `vmconfig_apply_pending`, `_do_vm_stop`).
//! Part of pve-sim, a labelled STAND-IN for the Proxmox VE API (not Proxmox).

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

use crate::access;
use crate::faults::{injected_500, FaultKind, FaultOp};
use crate::options::{
    assert_tag_permissions, check_bridge_access, check_option_perms, check_options, is_disk_key,
    is_indexed, is_option_key, net_with_mac, volume_present, CLOUDINIT_OPTIONS, NOT_IN_SCHEMA,
};
use crate::params::{self, Errors};
use crate::routes::{check_node, check_vmid, err500, param_err, ApiError, ApiResult};
use crate::state::{lock, normalize_tags, storage, Shared, State, Vm};
use crate::tasks::{spawn_task, task_plan, TaskOf};
use crate::vms::{
    check_lock, config_digest, config_missing, split_volume, vm_missing, with_pending,
};

/// The privileges of which `POST|PUT .../config` needs any one on the VM
/// (`$vm_config_perm_list`).
const VM_CONFIG_PRIVS: &[&str] = &[
    "VM.Config.Disk",
    "VM.Config.CDROM",
    "VM.Config.CPU",
    "VM.Config.Memory",
    "VM.Config.Network",
    "VM.Config.HWType",
    "VM.Config.Options",
    "VM.Config.Cloudinit",
];

/// Options a running VM takes at once, without hotplug
/// (`PVE/QemuServer.pm` `$fast_plug_option`), and the cloud-init options
/// ([`CLOUDINIT_OPTIONS`]).
const FAST_PLUG: &[&str] = &[
    "description",
    "hookscript",
    "lock",
    "migrate_downtime",
    "migrate_speed",
    "name",
    "onboot",
    "protection",
    "shares",
    "startup",
    "tags",
    "vmstatestorage",
];

/// `checksum mismatch`: the client read another config than there is now.
const DIGEST_MISMATCH: &str = "checksum mismatch (file change by other user?)";

/// The parameters a non-root token may not set (`raise_param_exc`
/// "Only root may use this option.").
fn root_only(e: &mut Errors, p: &BTreeMap<String, String>, keys: &[&str]) {
    for k in keys {
        if let Some(v) = p.get(*k) {
            if params::check_boolean(e, k, v) == Some(true) {
                e.insert(k.to_string(), "Only root may use this option.".into());
            }
        }
    }
}

/// `digest` (`maxLength => 40`).
fn check_digest(e: &mut Errors, p: &BTreeMap<String, String>) {
    if p.get("digest").is_some_and(|d| d.chars().count() > 40) {
        e.insert(
            "digest".into(),
            "value may only be 40 characters long".into(),
        );
    }
}

/// What one config update does, checked.
struct Update {
    node: String,
    vmid: u32,
    digest: Option<String>,
    delete: Vec<String>,
    set: BTreeMap<String, String>,
    /// `update VM N: -key value ...`, the line PVE logs.
    log: String,
}

/// `POST .../config` (`update_vm_async`: a `qmconfig` task applies the
/// change; answers its UPID) and `PUT .../config` (`update_vm`: applied
/// before the answer, `null`). The option values are checked as create
/// checks them ([`check_options`]); privileges per option as
/// `check_vm_modify_config_perm` ([`check_option_perms`]). Tags, drive
/// privileges, the volumes and the lock are checked again when the change is
/// applied (in the task for POST), as `$updatefn` does.
pub(crate) fn update_config(
    shared: &Arc<Shared>,
    p: &BTreeMap<String, String>,
    user: &str,
    sync: bool,
) -> ApiResult {
    check_node(shared, p)?;
    let vmid = check_vmid(p, "vmid")?;
    let node = p.get("node").cloned().unwrap_or_default();
    let mut e = Errors::new();
    for k in p.keys() {
        let known = [
            "node", "vmid", "delete", "revert", "force", "digest", "skiplock", "cdrom",
        ]
        .contains(&k.as_str())
            || (k == "background_delay" && !sync)
            || is_option_key(k);
        if !known {
            e.insert(k.clone(), NOT_IN_SCHEMA.into());
        }
    }
    check_digest(&mut e, p);
    if let Some(v) = p.get("background_delay") {
        params::check_integer(&mut e, "background_delay", v, 1, 30);
    }
    // The options to set; `cdrom` is `ide2` with `media=cdrom`
    // (`$resolve_cdrom_alias`).
    let mut set: BTreeMap<String, String> = p
        .iter()
        .filter(|(k, _)| is_option_key(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(v) = p.get("cdrom") {
        let v = if v.contains("media=") {
            v.clone()
        } else {
            format!("{v},media=cdrom")
        };
        set.insert("ide2".into(), v);
    }
    let mut st = lock(shared);
    let hard = check_options(&st, &node, &set, &mut e, false, &shared.cfg.version);
    if !e.is_empty() {
        return Err(ApiError::Params(e));
    }
    root_only(&mut e, p, &["skiplock"]);
    if !e.is_empty() {
        return Err(ApiError::Params(e));
    }
    for k in ["revert", "force"] {
        if p.contains_key(k) {
            return Err(ApiError::Status(
                501,
                format!("pve-sim does not simulate '{k}' (a stand-in, not Proxmox)"),
            ));
        }
    }
    let delete_str = p.get("delete").cloned().unwrap_or_default();
    if delete_str.is_empty() && set.is_empty() {
        return Err(err500("no options specified"));
    }
    let mut delete = Vec::new();
    for opt in params::split_tags(&delete_str) {
        let opt = if opt == "cdrom" { "ide2".into() } else { opt };
        if set.contains_key(&opt) {
            return Err(param_err(
                "delete",
                format!("you can't use '-{opt}' and -delete {opt}' at the same time"),
            ));
        }
        if !is_option_key(&opt) {
            return Err(param_err("delete", format!("unknown option '{opt}'")));
        }
        delete.push(opt);
    }
    if let Some(x) = hard {
        return Err(x);
    }
    let log = format!(
        "update VM {vmid}: {}",
        p.iter()
            .filter(|(k, _)| !["node", "vmid", "digest", "background_delay"].contains(&k.as_str()))
            .map(|(k, v)| format!("-{k} {v}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    for (k, v) in set.iter_mut() {
        if is_indexed(k, "net", 31) {
            *v = net_with_mac(v, false);
        }
    }
    access::require_any(shared, &format!("/vms/{vmid}"), VM_CONFIG_PRIVS)?;
    check_option_perms(shared, vmid, None, delete.iter().chain(set.keys()), &set)?;
    let up = Update {
        node,
        vmid,
        digest: p.get("digest").cloned(),
        delete,
        set,
        log,
    };
    // `$load_and_check_config->(0)`: early checks before the task.
    let vm = st
        .vms
        .get(&vmid)
        .filter(|vm| vm.node == up.node)
        .ok_or_else(|| vm_missing(&up.node, vmid))?;
    if up.digest.as_ref().is_some_and(|d| *d != config_digest(vm)) {
        return Err(err500(DIGEST_MISMATCH));
    }
    check_lock(vm).map_err(err500)?;
    if sync {
        // Run in the request, a permission failure is a 403 as elsewhere.
        let mut log = Vec::new();
        apply_update(shared, &mut st, &up, &mut log).map_err(|why| {
            if why.starts_with("Permission check failed") {
                ApiError::Status(403, why)
            } else {
                err500(why)
            }
        })?;
        return Ok(Value::Null);
    }
    if p.contains_key("background_delay") {
        // POST with `background_delay` waits that long for its task and
        // answers null when it ended in time (a simulator task always does),
        // "failed to update VM N: ERROR" when it failed.
        let mut log = Vec::new();
        apply_update(shared, &mut st, &up, &mut log)
            .map_err(|why| err500(format!("failed to update VM {vmid}: {why}")))?;
        return Ok(Value::Null);
    }
    let shared2 = shared.clone();
    let node = up.node.clone();
    let upid = spawn_task(
        shared,
        &mut st,
        TaskOf {
            node: &node,
            kind: "qmconfig",
            id: &vmid.to_string(),
            user,
        },
        shared.cfg.task_delay,
        Box::new(move |st, log| apply_update(&shared2, st, &up, log)),
    );
    Ok(json!(upid))
}

/// The privilege a drive needs, by its value (`$check_drive_perms` in
/// `$updatefn`): a cloud-init drive VM.Config.Cloudinit or CDROM, a CD-ROM
/// VM.Config.CDROM, any other disk VM.Config.Disk.
fn check_drive_perms(shared: &Shared, vmid: u32, value: &str) -> Result<(), String> {
    let (vol, rest) = split_volume(value);
    let privs: &[&str] = if vol.contains("cloudinit") {
        &["VM.Config.Cloudinit", "VM.Config.CDROM"]
    } else if rest.contains("media=cdrom") {
        &["VM.Config.CDROM"]
    } else {
        &["VM.Config.Disk"]
    };
    if access::has_any(shared, &format!("/vms/{vmid}"), privs) {
        Ok(())
    } else {
        Err(format!(
            "Permission check failed (/vms/{vmid}, {})",
            privs[0]
        ))
    }
}

/// `$updatefn`: re-check the config, write each change to the pending
/// section (allocating new disks as `create_disks` does), then apply what
/// the VM can take now. A change written before a failure stays, as in PVE
/// (each option is written on its own).
fn apply_update(
    shared: &Shared,
    st: &mut State,
    up: &Update,
    log: &mut Vec<String>,
) -> Result<(), String> {
    let mut vm = st
        .vms
        .get(&up.vmid)
        .filter(|vm| vm.node == up.node)
        .cloned()
        .ok_or_else(|| config_missing(&up.node, up.vmid))?;
    if up.digest.as_ref().is_some_and(|d| *d != config_digest(&vm)) {
        return Err(DIGEST_MISMATCH.into());
    }
    check_lock(&vm)?;
    log.push(up.log.clone());
    let res = write_pending(shared, st, up, &mut vm, log);
    if res.is_ok() {
        if vm.running {
            hotplug_pending(&mut vm);
        } else {
            apply_pending(&mut vm);
        }
    }
    st.vms.insert(up.vmid, vm);
    res
}

fn write_pending(
    shared: &Shared,
    st: &mut State,
    up: &Update,
    vm: &mut Vm,
    log: &mut Vec<String>,
) -> Result<(), String> {
    let vmid = up.vmid;
    for opt in &up.delete {
        let Some(val) = with_pending(vm).get(opt).cloned() else {
            log.push(format!(
                "cannot delete '{opt}' - not set in current configuration!"
            ));
            continue;
        };
        if opt == "tags" {
            assert_tag_permissions(shared, st, vmid, (&val, ""))?;
        } else if is_disk_key(opt) {
            check_drive_perms(shared, vmid, &val)?;
        } else if is_indexed(opt, "net", 31) {
            if let Some(old) = vm.config.get(opt) {
                check_bridge_access(shared, old).map_err(api_text)?;
            }
        }
        vm.pending.insert(opt.clone(), None);
    }
    for (opt, val) in &up.set {
        let mut val = val.clone();
        if is_disk_key(opt) {
            if let Some(old) = vm.config.get(opt) {
                check_drive_perms(shared, vmid, old)?;
            }
            check_drive_perms(shared, vmid, &val)?;
            val = create_disk(st, &up.node, vm, &val)?;
        } else if opt == "tags" {
            let old = vm.config.get("tags").cloned().unwrap_or_default();
            assert_tag_permissions(shared, st, vmid, (&old, &val))?;
            // `PVE::GuestHelpers::get_unique_tags`.
            val = normalize_tags(&val);
        } else if is_indexed(opt, "net", 31) {
            if let Some(old) = vm.config.get(opt) {
                check_bridge_access(shared, old).map_err(api_text)?;
            }
        }
        vm.pending.insert(opt.clone(), Some(val));
    }
    Ok(())
}

/// The text of an API error, for a task's exit status.
fn api_text(e: ApiError) -> String {
    match e {
        ApiError::Status(_, m) => m,
        ApiError::Params(errs) => format!("{errs:?}"),
        ApiError::Drop => "connection dropped".into(),
    }
}

/// `create_disks` for one drive of a config update: an existing volume (an
/// ISO image) must exist on the node; `STORAGE:SIZE` (or an import) gets a
/// new volume named as its storage names disks; `STORAGE:cloudinit` a
/// cloud-init drive. Returns the drive as the config then holds it.
fn create_disk(st: &mut State, node: &str, vm: &Vm, value: &str) -> Result<String, String> {
    let (file, opts) = params::property_string(value, "file")?;
    let file = file.unwrap_or_default();
    let Some((sid, rest)) = file.split_once(':') else {
        return Ok(value.to_string());
    };
    let sdef = storage(sid).ok_or_else(|| format!("storage '{sid}' does not exist"))?;
    if rest == "cloudinit" {
        return Ok(format!(
            "{},media=cdrom",
            crate::disks::cloudinit(sdef, vm.vmid)
        ));
    }
    if rest.parse::<f64>().is_err() {
        volume_present(st, node, &file)?;
        return Ok(value.to_string());
    }
    // The first disk number no volume of this VM on this storage has.
    let taken = |volid: &str| {
        st.volumes.contains_key(&st.volume_key(node, volid))
            || with_pending(vm)
                .values()
                .any(|v| split_volume(v).0 == volid)
    };
    let n = (0..).find(|n| !taken(&crate::disks::new_disk(sdef, vm.vmid, *n)));
    let volid = crate::disks::new_disk(sdef, vm.vmid, n.unwrap_or(0));
    let size = (rest.parse::<f64>().unwrap_or(0.0) * (1u64 << 30) as f64) as u64;
    st.add_vm_disk(node, volid.clone(), size);
    let mut out = vec![volid];
    out.extend(
        opts.iter()
            .filter(|(k, _)| k.as_str() != "import-from")
            .map(|(k, v)| format!("{k}={v}")),
    );
    Ok(out.join(","))
}

/// Whether a drive value is a CD-ROM (`drive_is_cdrom`).
fn is_cdrom(value: &str) -> bool {
    split_volume(value).1.contains("media=cdrom")
}

/// Put one pending change into the config. A disk that is replaced or
/// removed stays as `unusedN` (`vmconfig_register_unused_drive`,
/// `vmconfig_delete_or_detach_drive` without `force`); a CD-ROM or
/// cloud-init drive does not.
fn commit(vm: &mut Vm, opt: &str) {
    let Some(change) = vm.pending.remove(opt) else {
        return;
    };
    if is_disk_key(opt) {
        if let Some(old) = vm.config.get(opt).cloned() {
            let (vol, _) = split_volume(&old);
            let keep = !is_cdrom(&old)
                && !vol.contains("cloudinit")
                && crate::disks::owner(&vol) == Some(vm.vmid)
                && change.as_deref().map(|v| split_volume(v).0) != Some(vol.clone());
            if keep {
                let n = (0..).find(|n| !vm.config.contains_key(&format!("unused{n}")));
                vm.config.insert(format!("unused{}", n.unwrap_or(0)), vol);
            }
        }
    }
    match change {
        Some(v) => vm.config.insert(opt.to_string(), v),
        None => vm.config.remove(opt),
    };
}

/// A stopped VM takes every pending change (`vmconfig_apply_pending`; also
/// when it starts).
pub(crate) fn apply_pending(vm: &mut Vm) {
    let opts: Vec<String> = vm.pending.keys().cloned().collect();
    for opt in opts {
        commit(vm, &opt);
    }
}

/// A running VM takes what it can now (`vmconfig_hotplug_pending` with the
/// default `hotplug: network,disk,usb`): the fast-plug options, NICs,
/// CD-ROM media and SCSI/VirtIO disks; a removed IDE/SATA drive, an EFI or
/// TPM disk and everything else (cores, sockets, memory...) stay pending
/// until the next start.
fn hotplug_pending(vm: &mut Vm) {
    let opts: Vec<(String, bool)> = vm
        .pending
        .iter()
        .map(|(k, v)| (k.clone(), v.is_none()))
        .collect();
    for (opt, deleted) in opts {
        let now = if FAST_PLUG.contains(&opt.as_str())
            || CLOUDINIT_OPTIONS.contains(&opt.as_str())
            || is_indexed(&opt, "ipconfig", 31)
            || is_indexed(&opt, "net", 31)
        {
            true
        } else if is_disk_key(&opt) {
            let ide_sata = is_indexed(&opt, "ide", 3) || is_indexed(&opt, "sata", 5);
            let cdrom = vm.pending[&opt].as_deref().is_some_and(is_cdrom);
            // A CD-ROM changes its medium; a removed IDE/SATA drive waits.
            !(ide_sata || opt == "efidisk0") || (cdrom && !deleted)
        } else {
            false
        };
        if now {
            commit(vm, &opt);
        }
    }
}

/// The valid drive names in PVE's order (`PVE::QemuServer::Drive::valid_drive_names`).
fn drive_names() -> Vec<String> {
    let mut out = Vec::new();
    for (prefix, n) in [("ide", 4), ("scsi", 31), ("virtio", 16), ("sata", 6)] {
        out.extend((0..n).map(|i| format!("{prefix}{i}")));
    }
    out.push("efidisk0".into());
    out.push("tpmstate0".into());
    out
}

/// A `resize` size: `[+]N[.N][KMGT]` (the parameter's pattern
/// `\+?\d+(\.\d+)?[KMGT]?`): (relative, bytes).
fn parse_resize(s: &str) -> Option<(bool, f64)> {
    let (plus, rest) = match s.strip_prefix('+') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let (num, unit) = match rest.char_indices().last() {
        Some((i, c)) if "KMGT".contains(c) => (&rest[..i], Some(c)),
        _ => (rest, None),
    };
    let (int, frac) = match num.split_once('.') {
        Some((a, b)) => (a, Some(b)),
        None => (num, None),
    };
    let digits = |d: &str| !d.is_empty() && d.chars().all(|c| c.is_ascii_digit());
    if !digits(int) || frac.is_some_and(|f| !digits(f)) {
        return None;
    }
    let mult = match unit {
        Some('K') => 1u64 << 10,
        Some('M') => 1 << 20,
        Some('G') => 1 << 30,
        Some('T') => 1 << 40,
        _ => 1,
    };
    Some((plus, num.parse::<f64>().ok()? * mult as f64))
}

/// A size as a drive's `size=` shows it (`PVE::JSONSchema::format_size`):
/// the largest unit that divides it.
pub(crate) fn format_size(bytes: u64) -> String {
    let mut n = bytes;
    for unit in ["", "K", "M", "G", "T"] {
        if unit == "T" || !n.is_multiple_of(1024) {
            return format!("{n}{unit}");
        }
        n /= 1024;
    }
    unreachable!()
}

/// A drive's `size=` in bytes (`PVE::JSONSchema::parse_size`).
pub(crate) fn parse_size(s: &str) -> Option<u64> {
    let (n, mult) = match s.chars().last()? {
        'K' => (&s[..s.len() - 1], 1u64 << 10),
        'M' => (&s[..s.len() - 1], 1 << 20),
        'G' => (&s[..s.len() - 1], 1 << 30),
        'T' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    Some((n.parse::<f64>().ok()? * mult as f64) as u64)
}

/// `PUT /nodes/{node}/qemu/{vmid}/resize` (`PVE/API2/Qemu.pm` `resize_vm`).
/// Not in the schema subset; its parameters there: `node`, `vmid`,
/// `skiplock` (root only), `disk` (one of `valid_drive_names`), `size`
/// (pattern `\+?\d+(\.\d+)?[KMGT]?`: `+` adds to the current size, else
/// absolute), `digest` (maxLength 40); permission VM.Config.Disk on the VM.
/// Current PVE answers the UPID of a `resize` task (`returns => { type =>
/// 'string', description => "the task ID." }`, `fork_worker('resize', ...)`);
/// every other check runs in the task: digest, lock, the disk exists and is
/// no CD-ROM, Datastore.AllocateSpace on its storage, and "shrinking disks
/// is not supported".
pub(crate) fn resize(shared: &Arc<Shared>, p: &BTreeMap<String, String>, user: &str) -> ApiResult {
    check_node(shared, p)?;
    let vmid = check_vmid(p, "vmid")?;
    let mut e = Errors::new();
    for k in p.keys() {
        if !["node", "vmid", "skiplock", "disk", "size", "digest"].contains(&k.as_str()) {
            e.insert(k.clone(), NOT_IN_SCHEMA.into());
        }
    }
    let names = drive_names();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    for k in ["disk", "size"] {
        if !p.contains_key(k) {
            e.insert(
                k.into(),
                "property is missing and it is not optional".into(),
            );
        }
    }
    if let Some(d) = p.get("disk") {
        params::check_enum(&mut e, "disk", d, &names);
    }
    let size = p.get("size").map(|s| (s.clone(), parse_resize(s)));
    if let Some((s, None)) = &size {
        e.insert(
            "size".into(),
            format!("value does not match the regex pattern ('{s}')"),
        );
    }
    check_digest(&mut e, p);
    if e.is_empty() {
        root_only(&mut e, p, &["skiplock"]);
    }
    if !e.is_empty() {
        return Err(ApiError::Params(e));
    }
    access::require(shared, &format!("/vms/{vmid}"), "VM.Config.Disk")?;
    let node = p.get("node").cloned().unwrap_or_default();
    let disk = p["disk"].clone();
    let Some((sizestr, Some((relative, amount)))) = size else {
        unreachable!("checked above")
    };
    let digest = p.get("digest").cloned();
    let shared2 = shared.clone();
    let node2 = node.clone();
    let mut st = lock(shared);
    let upid = spawn_task(
        shared,
        &mut st,
        TaskOf {
            node: &node,
            kind: "resize",
            id: &vmid.to_string(),
            user,
        },
        shared.cfg.task_delay,
        Box::new(move |st, log| {
            let vm = st
                .vms
                .get(&vmid)
                .filter(|vm| vm.node == node2)
                .ok_or_else(|| config_missing(&node2, vmid))?;
            if digest.is_some_and(|d| d != config_digest(vm)) {
                return Err(DIGEST_MISMATCH.into());
            }
            check_lock(vm)?;
            let drive = vm
                .config
                .get(&disk)
                .cloned()
                .ok_or_else(|| format!("disk '{disk}' does not exist"))?;
            let (volid, _) = split_volume(&drive);
            if volid.is_empty() || volid == "none" {
                return Err(format!("disk '{disk}' has no associated volume"));
            }
            if is_cdrom(&drive) {
                return Err("you can't resize a cdrom".into());
            }
            let sid = volid.split_once(':').map(|(s, _)| s).unwrap_or("");
            access::require(
                &shared2,
                &format!("/storage/{sid}"),
                "Datastore.AllocateSpace",
            )
            .map_err(api_text)?;
            let key = st.volume_key(&node2, &volid);
            let opts = params::property_string(&drive, "file")
                .unwrap_or_default()
                .1;
            let current = st
                .volumes
                .get(&key)
                .map(|v| v.size)
                .or_else(|| opts.get("size").and_then(|s| parse_size(s)))
                .ok_or_else(|| format!("Could not determine current size of volume '{volid}'"))?;
            let mut new = amount;
            if relative {
                new += current as f64;
            }
            let new = new as u64;
            if new < current {
                return Err("shrinking disks is not supported".into());
            }
            if new == current {
                return Ok(());
            }
            log.push(format!(
                "update VM {vmid}: resize --disk {disk} --size {sizestr}"
            ));
            if let Some(v) = st.volumes.get_mut(&key) {
                v.size = new;
            }
            let mut parts: Vec<String> = vec![volid];
            parts.extend(
                opts.iter()
                    .filter(|(k, _)| k.as_str() != "size")
                    .map(|(k, v)| format!("{k}={v}")),
            );
            parts.push(format!("size={}", format_size(new)));
            if let Some(vm) = st.vms.get_mut(&vmid) {
                vm.config.insert(disk, parts.join(","));
            }
            Ok(())
        }),
    );
    Ok(json!(upid))
}

/// `POST /nodes/{node}/qemu/{vmid}/status/shutdown` (`PVE/API2/Qemu.pm`
/// `vm_shutdown`, then `PVE::QemuServer::vm_stop` / `_do_vm_stop` in a
/// `qmshutdown` task): VM.PowerMgmt on the VM; `keepActive` and `skiplock`
/// root only. In the task: a stopped VM is nothing to do; the lock is
/// checked; the guest gets the ACPI power button and the VM stops. A guest
/// that ignores it (fault `shutdown:ignore-acpi`) is still running after
/// `timeout` (default 60 s; the simulator does not wait that long): without
/// `forceStop` the task fails with "VM quit/powerdown failed - got timeout"
/// and the VM keeps running; with it the VM is killed ("VM still running -
/// terminating now with SIGTERM", a plain `warn`: the task ends OK).
pub(crate) fn shutdown(
    shared: &Arc<Shared>,
    p: &BTreeMap<String, String>,
    user: &str,
) -> ApiResult {
    check_node(shared, p)?;
    let vmid = check_vmid(p, "vmid")?;
    let mut e = Errors::new();
    for k in p.keys() {
        if ![
            "node",
            "vmid",
            "skiplock",
            "timeout",
            "forceStop",
            "keepActive",
        ]
        .contains(&k.as_str())
        {
            e.insert(k.clone(), NOT_IN_SCHEMA.into());
        }
    }
    if let Some(t) = p.get("timeout") {
        params::check_integer(&mut e, "timeout", t, 0, i64::MAX);
    }
    let force = match p.get("forceStop") {
        Some(v) => params::check_boolean(&mut e, "forceStop", v) == Some(true),
        None => false,
    };
    if e.is_empty() {
        root_only(&mut e, p, &["skiplock", "keepActive"]);
    }
    if !e.is_empty() {
        return Err(ApiError::Params(e));
    }
    access::require(shared, &format!("/vms/{vmid}"), "VM.PowerMgmt")?;
    let node = p.get("node").cloned().unwrap_or_default();
    let mut st = lock(shared);
    st.vms
        .get(&vmid)
        .filter(|vm| vm.node == node)
        .ok_or_else(|| vm_missing(&node, vmid))?;
    let (delay, fail, kind) = task_plan(shared, &mut st, FaultOp::Shutdown);
    match kind {
        Some(FaultKind::Http500) => return Err(injected_500()),
        Some(FaultKind::Drop) => return Err(ApiError::Drop),
        _ => {}
    }
    let ignores_acpi = kind == Some(FaultKind::IgnoreAcpi);
    let upid = spawn_task(
        shared,
        &mut st,
        TaskOf {
            node: &node,
            kind: "qmshutdown",
            id: &vmid.to_string(),
            user,
        },
        delay,
        Box::new(move |st, log| {
            if fail {
                return Err(format!(
                    "shutdown of VM {vmid} failed (fault injected by pve-sim)"
                ));
            }
            let vm = st
                .vms
                .get_mut(&vmid)
                .ok_or_else(|| format!("VM {vmid} vanished"))?;
            if !vm.running {
                return Ok(());
            }
            check_lock(vm)?;
            if ignores_acpi {
                if !force {
                    return Err("VM quit/powerdown failed - got timeout".into());
                }
                log.push("VM still running - terminating now with SIGTERM".into());
            }
            vm.running = false;
            Ok(())
        }),
    );
    Ok(json!(upid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_sizes_follow_pves_pattern() {
        assert_eq!(parse_resize("+2G"), Some((true, 2.0 * (1u64 << 30) as f64)));
        assert_eq!(parse_resize("10"), Some((false, 10.0)));
        assert_eq!(
            parse_resize("1.5M"),
            Some((false, 1.5 * (1u64 << 20) as f64))
        );
        assert_eq!(parse_resize("-1G"), None);
        assert_eq!(parse_resize("2GB"), None);
        assert_eq!(parse_resize("+G"), None);
    }

    #[test]
    fn drive_sizes_print_in_the_largest_dividing_unit() {
        assert_eq!(format_size(6 << 30), "6G");
        assert_eq!(format_size((4 << 30) + (512 << 20)), "4608M");
        assert_eq!(format_size(1000), "1000");
        assert_eq!(parse_size("4G"), Some(4 << 30));
    }
}
