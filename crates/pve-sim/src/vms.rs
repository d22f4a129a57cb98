//! VM endpoints: create, template, clone, start/stop, destroy, views (the
//! option checks create shares with config update are in `options`).
//! Part of pve-sim, a labelled STAND-IN for the Proxmox VE API (not Proxmox).

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

use crate::access;
use crate::faults::{injected_500, refuse_injected, FaultKind, FaultOp};
use crate::options::{
    check_option_perms, check_options, is_disk_key, is_indexed, is_option_key, net_with_mac,
    tag_policy, vm_perm, NOT_IN_SCHEMA,
};
use crate::params::{self, Errors};
use crate::routes::{check_node, check_vmid, err500, param_err, ApiError, ApiResult};
use crate::state::{lock, new_uuid, normalize_tags, storage, Shared, State, Vm, STORAGES};
use crate::tasks::{spawn_task, task_plan, TaskOf};

pub(crate) fn vm_missing(node: &str, vmid: u32) -> ApiError {
    err500(config_missing(node, vmid))
}

/// `PVE::QemuConfig->load_config` for a VM that is not on `node`.
pub(crate) fn config_missing(node: &str, vmid: u32) -> String {
    format!("Configuration file 'nodes/{node}/qemu-server/{vmid}.conf' does not exist")
}

/// The VM `vmid` on the request's node (a VM on another node is missing
/// there: its config lives under that node's directory).
pub(crate) fn vm_on<'a>(
    st: &'a State,
    p: &BTreeMap<String, String>,
    vmid: u32,
) -> Result<&'a Vm, ApiError> {
    let node = p.get("node").map(String::as_str).unwrap_or("");
    st.vms
        .get(&vmid)
        .filter(|vm| vm.node == node)
        .ok_or_else(|| vm_missing(node, vmid))
}

fn vm_summary(vm: &Vm) -> Value {
    let mut v = json!({
        "vmid": vm.vmid,
        "name": vm.config.get("name").cloned().unwrap_or_default(),
        "status": if vm.running { "running" } else { "stopped" },
        "template": if vm.template { 1 } else { 0 },
        "maxmem": 8u64 << 30,
        "maxdisk": 4u64 << 30,
    });
    if let Some(t) = vm.config.get("tags") {
        v["tags"] = json!(t);
    }
    if let Some(l) = vm.config.get("lock") {
        v["lock"] = json!(l);
    }
    v
}

pub(crate) fn cluster_resources(shared: &Shared, p: &BTreeMap<String, String>) -> ApiResult {
    if let Some(t) = p.get("type") {
        let mut e = Errors::new();
        params::check_enum(&mut e, "type", t, &["vm", "storage", "node", "sdn"]);
        if !e.is_empty() {
            return Err(ApiError::Params(e));
        }
    }
    let st = lock(shared);
    let mut out = Vec::new();
    let want = p.get("type").map(String::as_str);
    if want.is_none() || want == Some("vm") {
        // Without VM.Audit a VM is silently left out (pve-manager,
        // PVE/API2/Cluster.pm, `resources`).
        for vm in st
            .vms
            .values()
            .filter(|vm| access::has(shared, &format!("/vms/{}", vm.vmid), "VM.Audit"))
        {
            let mut v = vm_summary(vm);
            if let Some(pool) = shared.pool_of(vm.vmid) {
                v["pool"] = json!(pool);
            }
            v["id"] = json!(format!("qemu/{}", vm.vmid));
            v["type"] = json!("qemu");
            v["node"] = json!(vm.node);
            out.push(v);
        }
    }
    if want.is_none() || want == Some("storage") {
        for s in STORAGES
            .iter()
            .filter(|s| access::has(shared, &format!("/storage/{}", s.id), "Datastore.Audit"))
        {
            // One entry per node, also for a shared storage (PVE does so).
            for node in &shared.cfg.nodes {
                out.push(json!({"id": format!("storage/{node}/{}", s.id), "type": "storage", "storage": s.id, "node": node, "content": s.content.join(","), "shared": if s.shared { 1 } else { 0 }, "status": "available"}));
            }
        }
    }
    if want.is_none() || want == Some("node") {
        for node in &shared.cfg.nodes {
            out.push(
                json!({"id": format!("node/{node}"), "type": "node", "node": node, "status": "online"}),
            );
        }
    }
    Ok(Value::Array(out))
}

pub(crate) fn nextid(shared: &Shared, p: &BTreeMap<String, String>) -> ApiResult {
    let st = lock(shared);
    if p.contains_key("vmid") {
        let vmid = check_vmid(p, "vmid")?;
        if st.vms.contains_key(&vmid) {
            return Err(param_err("vmid", format!("VM {vmid} already exists")));
        }
        return Ok(json!(vmid.to_string()));
    }
    let id = (100u32..).find(|i| !st.vms.contains_key(i)).unwrap();
    // Real PVE returns the number as a string.
    Ok(json!(id.to_string()))
}

pub(crate) fn vm_list(shared: &Shared, p: &BTreeMap<String, String>) -> ApiResult {
    check_node(shared, p)?;
    let st = lock(shared);
    let node = p.get("node").cloned().unwrap_or_default();
    Ok(Value::Array(
        st.vms
            .values()
            .filter(|vm| vm.node == node)
            .map(vm_summary)
            .collect(),
    ))
}

/// `GET .../config`: with pending changes applied unless `current=1`
/// (`PVE/API2/Qemu.pm` `vm_config`, `PVE::QemuConfig->load_current_config`).
pub(crate) fn vm_config(shared: &Shared, p: &BTreeMap<String, String>) -> ApiResult {
    check_node(shared, p)?;
    let vmid = check_vmid(p, "vmid")?;
    let mut e = Errors::new();
    let current = match p.get("current") {
        Some(v) => params::check_boolean(&mut e, "current", v),
        None => Some(false),
    };
    if !e.is_empty() {
        return Err(ApiError::Params(e));
    }
    access::require(shared, &format!("/vms/{vmid}"), "VM.Audit")?;
    let st = lock(shared);
    let vm = vm_on(&st, p, vmid)?;
    let config = if current == Some(true) {
        vm.config.clone()
    } else {
        with_pending(vm)
    };
    let mut m = serde_json::Map::new();
    for (k, v) in &config {
        m.insert(k.clone(), Value::String(v.clone()));
    }
    if vm.template {
        m.insert("template".into(), json!(1));
    }
    m.insert("digest".into(), json!(config_digest(vm)));
    Ok(Value::Object(m))
}

/// A VM's config with its pending changes applied.
pub(crate) fn with_pending(vm: &Vm) -> BTreeMap<String, String> {
    let mut c = vm.config.clone();
    for (k, v) in &vm.pending {
        match v {
            Some(v) => c.insert(k.clone(), v.clone()),
            None => c.remove(k),
        };
    }
    c
}

/// The config file's digest: 40 hex digits like PVE's SHA-1 of the file
/// (`PVE::QemuServer::parse_vm_config`; `digest` parameters have
/// `maxLength => 40`), over the config and its pending section.
pub(crate) fn config_digest(vm: &Vm) -> String {
    use sha2::{Digest, Sha256};
    let h = hex::encode(Sha256::digest(
        format!("{:?}{:?}", vm.config, vm.pending).as_bytes(),
    ));
    h[..40].to_string()
}

/// `GET .../status/current` as `PVE::QemuServer::vmstatus($vmid, 1)`
/// answers it (`PVE/API2/Qemu.pm` `vm_status`): `status` is `running` or
/// `stopped`, `qmpstatus` QEMU's `query-status` (`running`) or else the
/// status, `name` the config's or `VM <vmid>`, `tags` and `lock` only when
/// set, `template` only for templates.
pub(crate) fn vm_status(shared: &Shared, p: &BTreeMap<String, String>) -> ApiResult {
    check_node(shared, p)?;
    let vmid = check_vmid(p, "vmid")?;
    access::require(shared, &format!("/vms/{vmid}"), "VM.Audit")?;
    let st = lock(shared);
    let vm = vm_on(&st, p, vmid)?;
    let c = &vm.config;
    let status = if vm.running { "running" } else { "stopped" };
    let num = |k: &str, default: u64| {
        c.get(k)
            .map(|v| v.strip_prefix("current=").unwrap_or(v))
            .and_then(|v| v.split(',').next()?.parse().ok())
            .unwrap_or(default)
    };
    let mut v = json!({
        "vmid": vmid,
        "status": status,
        "qmpstatus": status,
        "name": c.get("name").cloned().unwrap_or_else(|| format!("VM {vmid}")),
        "cpus": num("sockets", 1) * num("cores", 1),
        "maxmem": num("memory", 512) << 20,
        "maxdisk": 4u64 << 30,
        "disk": 0, "cpu": 0, "mem": 0, "netin": 0, "netout": 0,
        "uptime": 0,
        "ha": {"managed": 0},
    });
    if vm.running {
        v["pid"] = json!(10_000 + vmid);
    }
    if vm.template {
        v["template"] = json!(1);
    }
    for k in ["lock", "tags"] {
        if let Some(x) = c.get(k) {
            v[k] = json!(x);
        }
    }
    let agent = c
        .get("agent")
        .and_then(|a| params::property_string(a, "enabled").ok())
        .and_then(|(h, _)| h)
        .is_some_and(|h| matches!(h.as_str(), "1" | "true" | "yes" | "on"));
    if agent {
        v["agent"] = json!(1);
    }
    Ok(v)
}

/// Parameters of `POST /nodes/{node}/qemu` that are not config options.
const CREATE_ONLY_KEYS: &[&str] = &["vmid", "node", "start", "pool", "storage"];

fn check_create_params(
    st: &State,
    p: &BTreeMap<String, String>,
    pve_version: &str,
) -> Result<u32, ApiError> {
    let mut e = Errors::new();
    for k in p.keys() {
        if !CREATE_ONLY_KEYS.contains(&k.as_str()) && !is_option_key(k) {
            e.insert(k.clone(), NOT_IN_SCHEMA.into());
        }
    }
    let vmid = match p.get("vmid") {
        None => {
            e.insert(
                "vmid".into(),
                "property is missing and it is not optional".into(),
            );
            None
        }
        Some(v) => params::check_integer(&mut e, "vmid", v, 100, 999_999_999),
    };
    let node = p.get("node").map(String::as_str).unwrap_or("");
    let hard = check_options(st, node, p, &mut e, true, pve_version);
    if !e.is_empty() {
        return Err(ApiError::Params(e));
    }
    if let Some(x) = hard {
        return Err(x);
    }
    Ok(vmid.expect("checked") as u32)
}

/// The permission checks of `POST /nodes/{node}/qemu` after its parameters
/// passed: VM.Allocate, then [`check_option_perms`]. The simulator checks
/// the VM.Config.Options that tags need here, with the pool
/// (`assert_tag_permissions` checks it in the task, on `/vms/{vmid}`).
fn check_create_perms(
    shared: &Shared,
    vmid: u32,
    p: &BTreeMap<String, String>,
) -> Result<(), ApiError> {
    let pool = p.get("pool");
    if !vm_perm(shared, vmid, pool, &["VM.Allocate"]) {
        return Err(access::denied(&format!("/vms/{vmid}"), "VM.Allocate"));
    }
    if p.contains_key("tags") && !vm_perm(shared, vmid, pool, &["VM.Config.Options"]) {
        return Err(access::denied(&format!("/vms/{vmid}"), "VM.Config.Options"));
    }
    check_option_perms(shared, vmid, pool, p.keys(), p)
}

pub(crate) fn create_vm(
    shared: &Arc<Shared>,
    p: &BTreeMap<String, String>,
    user: &str,
) -> ApiResult {
    check_node(shared, p)?;
    let mut st = lock(shared);
    let vmid = check_create_params(&st, p, &shared.cfg.version)?;
    check_create_perms(shared, vmid, p)?;
    // `$rpcenv->check_pool_exist($pool)` before the worker starts.
    if let Some(pool) = p.get("pool") {
        if !shared.pools().contains_key(pool) {
            return Err(err500(format!("pool '{pool}' does not exist")));
        }
    }
    let (delay, fail, kind) = task_plan(shared, &mut st, FaultOp::Create);
    if kind == Some(FaultKind::Race) {
        st.add_vm(vmid, "someone-else", "", false);
    }
    if let Some(other) = st.vms.get(&vmid) {
        return Err(err500(format!(
            "VM {vmid} already exists on node '{}'",
            other.node
        )));
    }
    let node = p.get("node").cloned().unwrap_or_default();
    match kind {
        Some(FaultKind::Http500) => return Err(injected_500()),
        Some(FaultKind::Drop) => return Err(ApiError::Drop),
        _ => {}
    }
    let mut config = BTreeMap::new();
    for (k, v) in p {
        if k == "vmid" || k == "node" || k == "start" || k == "storage" {
            continue;
        }
        let v = if k == "tags" {
            normalize_tags(v)
        } else if is_indexed(k, "net", 31) {
            // PVE/API2/Qemu.pm create_vm: `add_random_macs`.
            net_with_mac(v, false)
        } else {
            v.clone()
        };
        config.insert(k.clone(), v);
    }
    // "auto generate uuid if user did not specify smbios1 option"
    // (PVE/API2/Qemu.pm, create_vm).
    config
        .entry("smbios1".into())
        .or_insert_with(|| format!("uuid={}", new_uuid()));
    // While the task runs the config holds only the lock: PVE writes the
    // rest (name, tags, description, disks) when the task ends
    // (PVE/API2/Qemu.pm create_vm: create_and_lock_config, then write_config).
    let locked: BTreeMap<String, String> = [("lock".to_string(), "create".to_string())].into();
    st.vms.insert(
        vmid,
        Vm {
            vmid,
            node: node.clone(),
            config: locked,
            template: false,
            running: false,
            pending: BTreeMap::new(),
        },
    );
    // The import sources as they are now: the import reads them during the
    // task, and a file replaced meanwhile (an upload of the same name) spoils it.
    let sources: Vec<(String, Option<u64>)> = config
        .iter()
        .filter(|(k, _)| is_disk_key(k))
        .filter_map(|(_, v)| params::property_string(v, "file").ok())
        .filter_map(|(_, o)| o.get("import-from").cloned())
        .map(|src| {
            let ino = file_identity(&st, &node, &src);
            (src, ino)
        })
        .collect();
    let lock_timeout_fault = kind == Some(FaultKind::LockTimeout);
    let shared2 = shared.clone();
    let upid = spawn_task(
        shared,
        &mut st,
        TaskOf {
            node: &node.clone(),
            kind: "qmcreate",
            id: &vmid.to_string(),
            user,
        },
        delay,
        Box::new(move |st, _log| {
            if fail || lock_timeout_fault {
                // PVE removes the config of a VM whose creation failed.
                st.vms.remove(&vmid);
                return Err(if lock_timeout_fault {
                    format!("unable to create VM {vmid} - can't lock file '/var/lock/qemu-server/lock-{vmid}.conf' - got timeout")
                } else {
                    format!(
                        "unable to create VM {vmid} - import failed (fault injected by pve-sim)"
                    )
                });
            }
            // Tags are checked inside the task, after the disks are made
            // (PVE/API2/Qemu.pm create_vm: assert_tag_permissions before
            // write_config): a refused tag costs the whole import.
            if let Some(t) = config.get("tags") {
                if let Err(why) = tag_policy(&shared2, st, ("", t)) {
                    st.vms.remove(&vmid);
                    return Err(format!("unable to create VM {vmid} - {why}"));
                }
            }
            if let Some((src, _)) = sources
                .iter()
                .find(|(src, ino)| file_identity(st, &node, src) != *ino)
            {
                st.vms.remove(&vmid);
                return Err(format!(
                    "unable to create VM {vmid} - import failed: '{src}' was replaced or removed while it was read"
                ));
            }
            // Each import source's virtual size, read before the VM is borrowed.
            let import_sizes: BTreeMap<String, u64> = config
                .values()
                .flat_map(|v| v.split(','))
                .filter_map(|p| p.strip_prefix("import-from="))
                .map(|src| (src.to_string(), imported_size(st, &node, src)))
                .collect();
            let Some(vm) = st.vms.get_mut(&vmid) else {
                return Err(format!("VM {vmid} vanished during creation"));
            };
            // The pool is not part of the config (PVE keeps it in user.cfg,
            // `add_vm_to_pool` after write_config).
            if let Some(pool) = config.remove("pool") {
                shared2.pools().entry(pool).or_default().insert(vmid);
            }
            vm.config = config;
            let mut new_vols = Vec::new();
            let mut n = 0;
            let keys: Vec<String> = vm.config.keys().cloned().collect();
            for k in keys {
                let v = vm.config[&k].clone();
                if !is_disk_key(&k) {
                    continue;
                }
                let (file, opts) = params::property_string(&v, "file").unwrap_or_default();
                let file = file.unwrap_or_default();
                let Some((sid, rest)) = file.split_once(':') else {
                    continue;
                };
                let Some(sdef) = storage(sid) else {
                    continue;
                };
                let new = if rest == "cloudinit" {
                    format!("{},media=cdrom", crate::disks::cloudinit(sdef, vmid))
                } else if rest.parse::<f64>().is_err() {
                    // An existing volume (an ISO image) is used as it is;
                    // only `STORAGE:SIZE` allocates (`create_disks`,
                    // `$NEW_DISK_RE`).
                    continue;
                } else {
                    n += 1;
                    let vol = crate::disks::new_disk(sdef, vmid, n - 1);
                    // The drive records its size (`create_disks` sets
                    // `size=`): an imported disk has its source's virtual
                    // size, an EFI vars disk 528K (4m), a new one SIZE GiB.
                    let size = match opts.iter().find(|(k, _)| k.as_str() == "import-from") {
                        Some((_, src)) => import_sizes.get(src).copied().unwrap_or(4 << 30),
                        None if k == "efidisk0" => 528 << 10,
                        None => (rest.parse::<f64>().unwrap_or(0.0) * (1u64 << 30) as f64) as u64,
                    };
                    let mut extra: Vec<String> = opts
                        .iter()
                        .filter(|(k, _)| k.as_str() != "import-from")
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    extra.insert(0, vol.clone());
                    extra.push(format!("size={}", crate::vmconfig::format_size(size)));
                    new_vols.push((vol, size));
                    extra.join(",")
                };
                vm.config.insert(k, new);
            }
            vm.config.remove("lock");
            for (vol, size) in new_vols {
                st.add_vm_disk(&node, vol, size);
            }
            Ok(())
        }),
    );
    Ok(json!(upid))
}

/// Which file a volume is right now (its inode), None when it is gone.
/// The virtual size of an uploaded disk image: a qcow2 header's size field
/// (bytes 24..32, big-endian), else the file's length; 4 GiB when the sim
/// has no file for it.
fn imported_size(st: &State, node: &str, volid: &str) -> u64 {
    use std::io::Read;
    let Some(path) = st
        .volumes
        .get(&st.volume_key(node, volid))
        .and_then(|v| v.path.clone())
    else {
        return 4 << 30;
    };
    let mut head = [0u8; 32];
    match std::fs::File::open(&path).and_then(|mut f| f.read_exact(&mut head)) {
        Ok(()) if &head[..4] == b"QFI\xfb" => u64::from_be_bytes(head[24..32].try_into().unwrap()),
        _ => std::fs::metadata(&path).map(|m| m.len()).unwrap_or(4 << 30),
    }
}

fn file_identity(st: &State, node: &str, volid: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let v = st.volumes.get(&st.volume_key(node, volid))?;
    match &v.path {
        Some(p) => std::fs::metadata(p).ok().map(|m| m.ino()),
        None => Some(0),
    }
}

/// A disk option's volume id and the rest (`,discard=on,...`).
pub(crate) fn split_volume(v: &str) -> (String, String) {
    match v.split_once(',') {
        Some((a, b)) => (a.to_string(), format!(",{b}")),
        None => (v.to_string(), String::new()),
    }
}

/// A VM's config lock (`lock: create`, `clone`, ...) refuses other tasks.
fn not_locked(vm: &Vm) -> Result<(), ApiError> {
    check_lock(vm).map_err(err500)
}

/// `PVE::AbstractConfig::check_lock` (pve-guest-common): "VM is locked (LOCK)".
pub(crate) fn check_lock(vm: &Vm) -> Result<(), String> {
    match vm.config.get("lock") {
        Some(l) => Err(format!("VM is locked ({l})")),
        None => Ok(()),
    }
}

/// The task handlers on one existing VM (template, destroy, start, stop) run
/// this sequence: the VM must exist and pass `check`; with `faults`, the
/// operation's injected faults apply (a lock timeout or 500 refuses the
/// request, `fail` ends the task with the given error, `slow` delays it);
/// then a task of type `kind` runs `work` when it ends.
fn vm_task(
    shared: &Arc<Shared>,
    user: &str,
    (node, vmid): (&str, u32),
    kind: &str,
    faults: Option<(FaultOp, String)>,
    check: impl FnOnce(&Vm) -> Result<(), ApiError>,
    work: impl FnOnce(&mut State) -> Result<(), String> + Send + 'static,
) -> ApiResult {
    let mut st = lock(shared);
    let vm = st
        .vms
        .get(&vmid)
        .filter(|vm| vm.node == node)
        .ok_or_else(|| vm_missing(node, vmid))?;
    check(vm)?;
    let (delay, failed) = match faults {
        Some((op, error)) => {
            let (delay, fail, injected) = task_plan(shared, &mut st, op);
            refuse_injected(injected, vmid)?;
            (delay, fail.then_some(error))
        }
        None => (shared.cfg.task_delay, None),
    };
    let upid = spawn_task(
        shared,
        &mut st,
        TaskOf {
            node,
            kind,
            id: &vmid.to_string(),
            user,
        },
        delay,
        Box::new(move |st, _log| match failed {
            Some(error) => Err(error),
            None => work(st),
        }),
    );
    Ok(json!(upid))
}

pub(crate) fn template(
    shared: &Arc<Shared>,
    p: &BTreeMap<String, String>,
    user: &str,
) -> ApiResult {
    check_node(shared, p)?;
    let vmid = check_vmid(p, "vmid")?;
    access::require(shared, &format!("/vms/{vmid}"), "VM.Allocate")?;
    let failed = format!("converting VM {vmid} to a template failed (fault injected by pve-sim)");
    let node = p.get("node").cloned().unwrap_or_default();
    vm_task(
        shared,
        user,
        (&node, vmid),
        "qmtemplate",
        Some((FaultOp::Template, failed)),
        |vm| {
            if vm.template {
                return Err(err500("you can't convert a template to a template"));
            }
            if vm.running {
                return Err(err500(
                    "you can't convert a VM to template if VM is running",
                ));
            }
            not_locked(vm)
        },
        move |st| {
            let vm = st.vms.get_mut(&vmid).ok_or(format!("VM {vmid} vanished"))?;
            vm.template = true;
            // Each disk becomes a base volume (`create_base` of its storage).
            let mut renamed = Vec::new();
            for (k, v) in vm.config.iter().filter(|(k, _)| is_disk_key(k)) {
                let (vol, rest) = split_volume(v);
                if let Some(base) = crate::disks::to_base(&vol, vmid) {
                    renamed.push((k.clone(), vol, format!("{base}{rest}")));
                }
            }
            let node = vm.node.clone();
            for (k, _, new) in &renamed {
                vm.config.insert(k.clone(), new.clone());
            }
            for (_, old, new) in renamed {
                let base = new.split(',').next().unwrap_or("").to_string();
                let old_key = st.volume_key(&node, &old);
                let new_key = st.volume_key(&node, &base);
                if let Some(mut v) = st.volumes.remove(&old_key) {
                    v.volid = base;
                    st.volumes.insert(new_key, v);
                }
            }
            Ok(())
        },
    )
}

/// `POST .../clone` (`PVE/API2/Qemu.pm` `clone_vm`). The checks of its
/// `$load_and_check` run before the task: `target` must be a cluster node
/// (`PVE::Cluster::check_node_exists`) and is dropped when it is this node;
/// `storage` must take images and, with a `target`, be shared; `storage` is
/// refused for a linked clone; each disk needs Datastore.AllocateSpace on its
/// storage (or `storage`) (`$check_storage_access_clone`); and a VM with any
/// volume (also an ISO) on storage that is not shared cannot go to another
/// node, even as a full clone to shared storage ("can't clone VM to node
/// ... (VM uses local storage)"). NICs get new MACs ("always change MAC!").
pub(crate) fn clone_vm(
    shared: &Arc<Shared>,
    p: &BTreeMap<String, String>,
    user: &str,
) -> ApiResult {
    check_node(shared, p)?;
    let vmid = check_vmid(p, "vmid")?;
    let newid = check_vmid(p, "newid")?;
    let mut e = Errors::new();
    for k in p.keys() {
        if ![
            "node",
            "vmid",
            "newid",
            "name",
            "full",
            "storage",
            "target",
            "pool",
            "description",
            "format",
            "snapname",
            "bwlimit",
        ]
        .contains(&k.as_str())
        {
            e.insert(k.clone(), NOT_IN_SCHEMA.into());
        }
    }
    if let Some(n) = p.get("name") {
        if !params::is_dns_name(n) {
            e.insert(
                "name".into(),
                "invalid format - value does not look like a valid DNS name".into(),
            );
        }
    }
    for k in ["storage", "target"] {
        if p.get(k).is_some_and(|v| !params::is_safe_id(v)) {
            e.insert(
                k.into(),
                "invalid format - value does not look like a valid ID".into(),
            );
        }
    }
    let full = match p.get("full") {
        Some(v) => params::check_boolean(&mut e, "full", v),
        None => None,
    };
    if !e.is_empty() {
        return Err(ApiError::Params(e));
    }
    access::require(shared, &format!("/vms/{vmid}"), "VM.Clone")?;
    if !vm_perm(shared, newid, p.get("pool"), &["VM.Allocate"]) {
        return Err(access::denied(&format!("/vms/{newid}"), "VM.Allocate"));
    }
    let node = p.get("node").cloned().unwrap_or_default();
    let target = p
        .get("target")
        .filter(|t| **t != node && *t != "localhost")
        .cloned();
    if let Some(t) = &target {
        if !shared.cfg.nodes.contains(t) {
            return Err(err500(format!("no such cluster node '{t}'")));
        }
    }
    let to_storage = match p.get("storage") {
        Some(sid) => {
            let sdef =
                storage(sid).ok_or_else(|| err500(format!("storage '{sid}' does not exist")))?;
            if !sdef.content.contains(&"images") {
                return Err(param_err(
                    "storage",
                    format!("storage '{sid}' does not support vm images"),
                ));
            }
            if target.is_some() && !sdef.shared {
                return Err(err500(format!("can't clone to non-shared storage '{sid}'")));
            }
            Some(sdef)
        }
        None => None,
    };
    let mut st = lock(shared);
    let src = vm_on(&st, p, vmid)?.clone();
    not_locked(&src)?;
    let full = full.unwrap_or(!src.template);
    if to_storage.is_some() && !full {
        return Err(err500("parameter 'storage' not allowed for linked clones"));
    }
    // `$check_storage_access_clone`: AllocateSpace per disk; whether every
    // volume (CD-ROM images too) is on shared storage.
    let mut shared_vm = true;
    for (_, v) in src.config.iter().filter(|(k, _)| is_disk_key(k)) {
        let (vol, rest) = split_volume(v);
        let Some(sdef) = vol.split_once(':').and_then(|(sid, _)| storage(sid)) else {
            continue;
        };
        shared_vm &= sdef.shared;
        if !rest.contains("media=cdrom") {
            let sid = to_storage.map_or(sdef.id, |s| s.id);
            access::require(
                shared,
                &format!("/storage/{sid}"),
                "Datastore.AllocateSpace",
            )?;
        }
    }
    if let Some(t) = &target {
        if !shared_vm {
            return Err(err500(format!(
                "can't clone VM to node '{t}' (VM uses local storage)"
            )));
        }
    }
    if st.vms.contains_key(&newid) {
        return Err(err500(format!(
            "unable to create VM {newid}: config file already exists"
        )));
    }
    if !full && !src.template {
        return Err(err500(
            "Linked clone feature is not supported for a VM that is not a template",
        ));
    }
    let (delay, fail, kind) = task_plan(shared, &mut st, FaultOp::Clone);
    if kind == Some(FaultKind::Http500) {
        return Err(injected_500());
    }
    let mut config = src.config.clone();
    config.remove("template");
    // A clone gets a new SMBIOS UUID, keeping the other smbios1 fields
    // (PVE/API2/Qemu.pm, clone_vm: "auto generate a new uuid").
    let others: Vec<String> = config
        .get("smbios1")
        .map(|v| {
            v.split(',')
                .filter(|p| !p.starts_with("uuid=") && !p.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let mut smbios = vec![format!("uuid={}", new_uuid())];
    smbios.extend(others);
    config.insert("smbios1".into(), smbios.join(","));
    if let Some(n) = p.get("name") {
        config.insert("name".into(), n.clone());
    }
    if let Some(d) = p.get("description").filter(|d| !d.is_empty()) {
        config.insert("description".into(), d.clone());
    }
    let mut new_volumes = Vec::new();
    for (k, v) in config.iter_mut() {
        if is_indexed(k, "net", 31) {
            *v = net_with_mac(v, true);
            continue;
        }
        if !is_disk_key(k) {
            continue;
        }
        let (vol, rest) = split_volume(v);
        if vol.ends_with("-cloudinit") || vol.ends_with("-cloudinit.qcow2") {
            // A clone gets a cloud-init drive of its own.
            if let Some(sdef) = vol.split_once(':').and_then(|(sid, _)| storage(sid)) {
                *v = format!("{}{rest}", crate::disks::cloudinit(sdef, newid));
            }
            continue;
        }
        if let Some(c) = crate::disks::clone_disk(&vol, vmid, newid, !full) {
            // A full copy goes to `storage` when given.
            let c = match to_storage {
                Some(sdef) => crate::disks::new_disk(sdef, newid, crate::disks::disk_no(&vol)),
                None => c,
            };
            // The copy has the size its source drive records.
            let size = rest
                .split(',')
                .find_map(|p| p.strip_prefix("size="))
                .and_then(crate::vmconfig::parse_size)
                .unwrap_or(4 << 30);
            new_volumes.push((c.clone(), size));
            *v = format!("{c}{rest}");
        }
    }
    // The disks are made on this node (then the config moves to `target`).
    for (vol, size) in new_volumes {
        st.add_vm_disk(&node, vol, size);
    }
    config.insert("lock".into(), "clone".into());
    st.vms.insert(
        newid,
        Vm {
            vmid: newid,
            node: target.clone().unwrap_or_else(|| node.clone()),
            config,
            template: false,
            running: false,
            pending: BTreeMap::new(),
        },
    );
    if !src.template {
        st.vms
            .get_mut(&vmid)
            .unwrap()
            .config
            .insert("lock".into(), "clone".into());
    }
    let upid = spawn_task(
        shared,
        &mut st,
        TaskOf {
            node: &node,
            kind: "qmclone",
            id: &vmid.to_string(),
            user,
        },
        delay,
        Box::new(move |st, _log| {
            if let Some(s) = st.vms.get_mut(&vmid) {
                if s.config.get("lock").map(|l| l == "clone").unwrap_or(false) {
                    s.config.remove("lock");
                }
            }
            if fail {
                st.vms.remove(&newid);
                return Err("clone failed (fault injected by pve-sim)".into());
            }
            if let Some(n) = st.vms.get_mut(&newid) {
                n.config.remove("lock");
            }
            Ok(())
        }),
    );
    Ok(json!(upid))
}

/// Start or stop a VM (no faults apply).
pub(crate) fn power(
    shared: &Arc<Shared>,
    p: &BTreeMap<String, String>,
    user: &str,
    on: bool,
) -> ApiResult {
    check_node(shared, p)?;
    let vmid = check_vmid(p, "vmid")?;
    let node = p.get("node").cloned().unwrap_or_default();
    vm_task(
        shared,
        user,
        (&node, vmid),
        if on { "qmstart" } else { "qmstop" },
        None,
        |vm| {
            if on && vm.template {
                return Err(err500("you can't start a vm if it's a template"));
            }
            not_locked(vm)
        },
        move |st| {
            let vm = st.vms.get_mut(&vmid).ok_or(format!("VM {vmid} vanished"))?;
            // A start applies what is pending (`vm_start_nolock`:
            // `vmconfig_apply_pending`).
            if on && !vm.running {
                crate::vmconfig::apply_pending(vm);
            }
            vm.running = on;
            Ok(())
        },
    )
}

pub(crate) fn destroy(shared: &Arc<Shared>, p: &BTreeMap<String, String>, user: &str) -> ApiResult {
    check_node(shared, p)?;
    let vmid = check_vmid(p, "vmid")?;
    let mut e = Errors::new();
    for k in ["purge", "destroy-unreferenced-disks", "skiplock"] {
        if let Some(v) = p.get(k) {
            params::check_boolean(&mut e, k, v);
        }
    }
    if !e.is_empty() {
        return Err(ApiError::Params(e));
    }
    access::require(shared, &format!("/vms/{vmid}"), "VM.Allocate")?;
    let skiplock = p.get("skiplock").map(|v| v == "1").unwrap_or(false);
    let unreferenced = p
        .get("destroy-unreferenced-disks")
        .is_some_and(|v| params::check_boolean(&mut Errors::new(), "", v) == Some(true));
    let failed = format!("destroying VM {vmid} failed (fault injected by pve-sim)");
    let shared2 = shared.clone();
    let node = p.get("node").cloned().unwrap_or_default();
    vm_task(
        shared,
        user,
        (&node, vmid),
        "qmdestroy",
        Some((FaultOp::Destroy, failed)),
        |vm| {
            if vm.running {
                return Err(err500(format!("VM {vmid} is running - destroy failed")));
            }
            if skiplock {
                Ok(())
            } else {
                not_locked(vm)
            }
        },
        move |st| {
            // PVE refuses to free a base volume a linked clone's name points
            // at (`PVE::Storage::vdisk_free`); on LVM-thin nothing points at
            // it and the template goes (its clones' thin volumes stay).
            let in_use = st.vms.values().filter(|o| o.vmid != vmid).find_map(|o| {
                o.config
                    .iter()
                    .filter(|(k, _)| is_disk_key(k))
                    .map(|(_, v)| split_volume(v).0)
                    .find(|vol| crate::disks::linked_base(vol) == Some(vmid))
            });
            if let Some(vol) = in_use {
                let base = crate::disks::base_volume(&vol).unwrap_or(vol);
                return Err(format!(
                    "base volume '{base}' is still in use by linked cloned"
                ));
            }
            // `PVE::QemuServer::destroy_vm`: free the volumes the config
            // references (unusedN too) that the VM owns, skipping CD-ROMs
            // (an ISO image is no VM's: it stays for whoever uploaded it);
            // a cloud-init drive is freed. With destroy-unreferenced-disks
            // also every `images` volume the VM owns on the node's storages
            // (`vdisk_list` with content `images`).
            let Some(vm) = st.vms.remove(&vmid) else {
                return Err(format!("VM {vmid} vanished"));
            };
            let pending = vm
                .pending
                .iter()
                .filter_map(|(k, v)| Some((k, v.as_ref()?)));
            let mut doomed: Vec<String> = vm
                .config
                .iter()
                .chain(pending)
                .filter(|(k, _)| is_disk_key(k) || is_indexed(k, "unused", 255))
                .map(|(_, v)| split_volume(v))
                .filter(|(vol, rest)| !rest.contains("media=cdrom") || vol.contains("cloudinit"))
                .map(|(vol, _)| vol)
                .filter(|vol| crate::disks::owner(vol) == Some(vmid))
                .map(|vol| st.volume_key(&vm.node, &vol))
                .collect();
            if unreferenced {
                for s in crate::state::STORAGES {
                    doomed.extend(
                        st.volumes_on(&vm.node, s.id)
                            .filter(|v| v.content == "images")
                            .filter(|v| crate::disks::owner(&v.volid) == Some(vmid))
                            .map(|v| st.volume_key(&vm.node, &v.volid))
                            .collect::<Vec<_>>(),
                    );
                }
            }
            for key in doomed {
                if let Some(path) = st.volumes.remove(&key).and_then(|v| v.path) {
                    let _ = std::fs::remove_file(path);
                }
            }
            for members in shared2.pools().values_mut() {
                members.remove(&vmid);
            }
            Ok(())
        },
    )
}
