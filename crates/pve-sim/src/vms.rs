//! VM endpoints: create (and its parameter checks), template, clone, start/stop, destroy, views.
//! Part of pve-sim, a labelled STAND-IN for the Proxmox VE API (not Proxmox).

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

use crate::access;
use crate::faults::{injected_500, refuse_injected, FaultKind, FaultOp};
use crate::params::{self, Errors};
use crate::routes::{check_node, check_vmid, err500, param_err, ApiError, ApiResult};
use crate::state::{lock, new_uuid, normalize_tags, storage, Shared, State, Vm, STORAGES};
use crate::tasks::{spawn_task, task_plan, TaskOf};

fn vm_missing(node: &str, vmid: u32) -> ApiError {
    err500(format!(
        "Configuration file 'nodes/{node}/qemu-server/{vmid}.conf' does not exist"
    ))
}

/// The VM `vmid` on the request's node (a VM on another node is missing
/// there: its config lives under that node's directory).
fn vm_on<'a>(st: &'a State, p: &BTreeMap<String, String>, vmid: u32) -> Result<&'a Vm, ApiError> {
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

pub(crate) fn vm_config(shared: &Shared, p: &BTreeMap<String, String>) -> ApiResult {
    check_node(shared, p)?;
    let vmid = check_vmid(p, "vmid")?;
    access::require(shared, &format!("/vms/{vmid}"), "VM.Audit")?;
    let st = lock(shared);
    let vm = vm_on(&st, p, vmid)?;
    let mut m = serde_json::Map::new();
    for (k, v) in &vm.config {
        m.insert(k.clone(), Value::String(v.clone()));
    }
    if vm.template {
        m.insert("template".into(), json!(1));
    }
    m.insert(
        "digest".into(),
        json!(sha256_hex(format!("{:?}", vm.config).as_bytes())),
    );
    Ok(Value::Object(m))
}

pub(crate) fn vm_status(shared: &Shared, p: &BTreeMap<String, String>) -> ApiResult {
    check_node(shared, p)?;
    let vmid = check_vmid(p, "vmid")?;
    access::require(shared, &format!("/vms/{vmid}"), "VM.Audit")?;
    let st = lock(shared);
    let vm = vm_on(&st, p, vmid)?;
    Ok(vm_summary(vm))
}

/// Hex sha256 of bytes (the simulator's config digests).
fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}

const CREATE_KEYS: &[&str] = &[
    "vmid",
    "node",
    "name",
    "tags",
    "description",
    "bios",
    "machine",
    "efidisk0",
    "scsihw",
    "boot",
    "agent",
    "cores",
    "sockets",
    "memory",
    "cpu",
    "ostype",
    "vga",
    "onboot",
    "start",
    "pool",
    "storage",
    "ciuser",
    "sshkeys",
    "ipconfig0",
    "numa",
    "template",
    "tpmstate0",
    "smbios1",
];

fn is_indexed(k: &str, prefix: &str, max: u32) -> bool {
    k.strip_prefix(prefix)
        .and_then(|n| n.parse::<u32>().ok())
        .map(|n| n <= max && k == format!("{prefix}{n}"))
        .unwrap_or(false)
}

/// A disk option of `qm create`: `scsiN`, `ideN`, `sataN`, `virtioN`, `efidisk0`.
fn is_disk_key(k: &str) -> bool {
    is_indexed(k, "scsi", 30)
        || is_indexed(k, "ide", 3)
        || is_indexed(k, "sata", 5)
        || is_indexed(k, "virtio", 15)
        || k == "efidisk0"
}

/// `(major, minor, patch)` of a version string such as `9.1.13`.
fn version_triple(v: &str) -> (u32, u32, u32) {
    let mut it = v.split(['.', '-']).map(|x| x.parse::<u32>().unwrap_or(0));
    (
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
    )
}

/// The values `efidisk0`'s `ms-cert` takes on the simulated PVE, None where
/// the option does not exist. The sim answers as the oldest qemu-server its
/// pve-manager version (`/version`) requires: qemu-server added `ms-cert` in
/// 9.0.27 with `2011, 2023`, `2023w` in 9.1.4 and `2023k` in 9.1.5
/// (`src/PVE/QemuServer/Drive.pm`, `%efitype_fmt`); pve-manager's
/// `debian/control` requires qemu-server >= 9.0.28 from 9.0.17 on and >=
/// 9.1.11 from 9.1.13 on.
fn efidisk_ms_cert_values(pve_version: &str) -> Option<&'static [&'static str]> {
    let v = version_triple(pve_version);
    if v >= (9, 1, 13) {
        Some(&["2011", "2023", "2023w", "2023k"])
    } else if v >= (9, 0, 17) {
        Some(&["2011", "2023"])
    } else {
        None
    }
}

/// Check one disk option: a new volume (`STORAGE:SIZE`), an import
/// (`STORAGE:0,import-from=VOLUME`), `STORAGE:cloudinit`, or `none`.
/// `efi`: the `efidisk0` of a PVE with these `ms-cert` values (None: none).
fn check_disk(
    st: &State,
    node: &str,
    e: &mut Errors,
    key: &str,
    v: &str,
    efi: Option<Option<&[&str]>>,
) -> Result<(), ApiError> {
    let (file, opts) = match params::property_string(v, "file") {
        Ok(x) => x,
        Err(m) => {
            e.insert(key.into(), format!("invalid format - {m}"));
            return Ok(());
        }
    };
    let allowed: Vec<&str> = match efi {
        Some(ms_cert) => {
            let mut a = vec![
                "file",
                "efitype",
                "pre-enrolled-keys",
                "format",
                "size",
                "import-from",
            ];
            if ms_cert.is_some() {
                a.push("ms-cert");
            }
            a
        }
        None => params::DRIVE_OPTS.to_vec(),
    };
    if !params::check_keys(e, key, &opts, &allowed) {
        return Ok(());
    }
    let file = file.unwrap_or_default();
    if let Some(ms_cert) = efi {
        if let Some(t) = opts.get("efitype") {
            params::check_enum(e, key, t, &["2m", "4m"]);
        }
        if let Some(b) = opts.get("pre-enrolled-keys") {
            params::check_boolean(e, key, b);
        }
        if let (Some(c), Some(values)) = (opts.get("ms-cert"), ms_cert) {
            params::check_enum(e, key, c, values);
        }
    }
    if file == "none" {
        return Ok(());
    }
    let Some((sid, rest)) = file.split_once(':') else {
        e.insert(
            key.into(),
            format!("invalid format - unable to parse volume '{file}'"),
        );
        return Ok(());
    };
    let Some(s) = storage(sid) else {
        return Err(err500(format!("storage '{sid}' does not exist")));
    };
    if rest == "cloudinit" {
        if !s.content.contains(&"images") {
            return Err(err500(format!(
                "storage '{sid}' does not support content-type 'images'"
            )));
        }
        return Ok(());
    }
    if let Some(src) = opts.get("import-from") {
        if rest != "0" {
            e.insert(
                key.into(),
                "import-from requires the special syntax STORAGE:0".into(),
            );
            return Ok(());
        }
        if src.starts_with('/') {
            return Err(ApiError::Status(
                403,
                format!(
                    "Permission check failed (only root may import from an absolute path '{src}')"
                ),
            ));
        }
        if !st.volumes.contains_key(&st.volume_key(node, src)) {
            return Err(err500(format!("volume '{src}' does not exist")));
        }
    } else if rest.parse::<f64>().is_err() {
        // An existing volume used directly: import volumes cannot be.
        if rest.starts_with("import/") {
            e.insert(
                key.into(),
                format!("'{file}' is an import volume; use STORAGE:0,import-from={file}"),
            );
            return Ok(());
        }
        if !st.volumes.contains_key(&st.volume_key(node, &file)) {
            return Err(err500(format!("volume '{file}' does not exist")));
        }
    }
    if !s.content.contains(&"images") {
        return Err(err500(format!(
            "storage '{sid}' does not support content-type 'images'"
        )));
    }
    Ok(())
}

fn check_create_params(
    st: &State,
    p: &BTreeMap<String, String>,
    pve_version: &str,
) -> Result<u32, ApiError> {
    let mut e = Errors::new();
    for k in p.keys() {
        let known = CREATE_KEYS.contains(&k.as_str())
            || is_indexed(k, "scsi", 30)
            || is_indexed(k, "ide", 3)
            || is_indexed(k, "sata", 5)
            || is_indexed(k, "virtio", 15)
            || is_indexed(k, "net", 31)
            || is_indexed(k, "serial", 3);
        if !known {
            e.insert(k.clone(), "property is not defined in schema and the schema does not allow additional properties".into());
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
    if let Some(n) = p.get("name") {
        if !params::is_dns_name(n) {
            e.insert(
                "name".into(),
                "invalid format - value does not look like a valid DNS name".into(),
            );
        }
    }
    if let Some(t) = p.get("tags") {
        if let Some(bad) = params::split_tags(t)
            .into_iter()
            .find(|t| !params::is_tag(t))
        {
            e.insert(
                "tags".into(),
                format!("invalid format - invalid tag '{bad}'"),
            );
        }
    }
    if let Some(d) = p.get("description") {
        if d.chars().count() > 8192 {
            e.insert(
                "description".into(),
                "value may only be 8192 characters long".into(),
            );
        }
    }
    if let Some(v) = p.get("bios") {
        params::check_enum(&mut e, "bios", v, &["seabios", "ovmf"]);
    }
    if let Some(v) = p.get("smbios1") {
        check_smbios1(&mut e, v);
    }
    if let Some(v) = p.get("scsihw") {
        params::check_enum(
            &mut e,
            "scsihw",
            v,
            &[
                "lsi",
                "lsi53c810",
                "virtio-scsi-pci",
                "virtio-scsi-single",
                "megasas",
                "pvscsi",
            ],
        );
    }
    if let Some(v) = p.get("ostype") {
        params::check_enum(
            &mut e,
            "ostype",
            v,
            &[
                "other", "wxp", "w2k", "w2k3", "w2k8", "wvista", "win7", "win8", "win10", "win11",
                "l24", "l26", "solaris",
            ],
        );
    }
    if let Some(v) = p.get("machine") {
        if !params::machine_ok(v) {
            e.insert(
                "machine".into(),
                format!(
                    "invalid format - value does not match the regex pattern ({})",
                    params::MACHINE_RE_HINT
                ),
            );
        }
    }
    for k in ["cores", "sockets"] {
        if let Some(v) = p.get(k) {
            params::check_integer(&mut e, k, v, 1, 4096);
        }
    }
    if let Some(v) = p.get("memory") {
        let v = v.strip_prefix("current=").unwrap_or(v);
        params::check_integer(&mut e, "memory", v, 16, 1 << 30);
    }
    if let Some(v) = p.get("agent") {
        match params::property_string(v, "enabled") {
            Ok((h, o)) => {
                if params::check_keys(
                    &mut e,
                    "agent",
                    &o,
                    &["enabled", "freeze-fs", "fstrim_cloned_disks", "type"],
                ) {
                    params::check_boolean(&mut e, "agent", h.as_deref().unwrap_or(""));
                }
            }
            Err(m) => {
                e.insert("agent".into(), format!("invalid format - {m}"));
            }
        }
    }
    for (k, v) in p {
        if is_indexed(k, "serial", 3) && !(v == "socket" || v.starts_with("/dev/")) {
            e.insert(
                k.clone(),
                "value does not match the regex pattern (/dev/.+|socket)".into(),
            );
        }
        if is_indexed(k, "net", 31) {
            match params::property_string(v, "model") {
                Ok((h, o)) => {
                    let model = h.unwrap_or_default();
                    let model = model.split('=').next().unwrap_or("");
                    if params::check_keys(
                        &mut e,
                        k,
                        &o,
                        &[
                            "bridge",
                            "firewall",
                            "link_down",
                            "macaddr",
                            "mtu",
                            "queues",
                            "rate",
                            "tag",
                            "trunks",
                            "model",
                        ],
                    ) {
                        params::check_enum(
                            &mut e,
                            k,
                            model,
                            &["e1000", "e1000e", "rtl8139", "virtio", "vmxnet3"],
                        );
                    }
                }
                Err(m) => {
                    e.insert(k.clone(), format!("invalid format - {m}"));
                }
            }
        }
        if k == "boot" && !(v.starts_with("order=") || v.chars().all(|c| "acdn".contains(c))) {
            e.insert(k.clone(), "invalid format - format error".into());
        }
    }
    // Disks last: they may fail with non-400 errors (storage, permissions).
    let mut hard = None;
    for (k, v) in p {
        if is_disk_key(k) {
            let node = p.get("node").map(String::as_str).unwrap_or("");
            let efi = (k == "efidisk0").then(|| efidisk_ms_cert_values(pve_version));
            if let Err(x) = check_disk(st, node, &mut e, k, v, efi) {
                hard.get_or_insert(x);
            }
        }
    }
    if !e.is_empty() {
        return Err(ApiError::Params(e));
    }
    if let Some(x) = hard {
        return Err(x);
    }
    Ok(vmid.expect("checked") as u32)
}

/// The privilege an option of `POST /nodes/{node}/qemu` needs on the VM
/// (`PVE/API2/Qemu.pm`, `check_vm_modify_config_perm`, serial ports in
/// `check_vm_create_serial_perm`, tags in `PVE::GuestHelpers::assert_tag_permissions`);
/// None for disks (checked on their storage) and the path parameters.
fn option_privilege(k: &str) -> Option<&'static [&'static str]> {
    const CPU: &[&str] = &[
        "cores", "cpu", "cpulimit", "cpuunits", "numa", "smp", "sockets", "vcpus",
    ];
    const MEMORY: &[&str] = &["memory", "balloon", "shares"];
    const HWTYPE: &[&str] = &[
        "acpi", "hotplug", "kvm", "machine", "scsihw", "smbios1", "tablet", "vga", "watchdog",
    ];
    const GENERAL: &[&str] = &[
        "agent",
        "autostart",
        "bios",
        "description",
        "keyboard",
        "localtime",
        "name",
        "onboot",
        "ostype",
        "protection",
        "reboot",
        "startdate",
        "startup",
        "tdf",
        "template",
        "tags",
    ];
    const CLOUDINIT: &[&str] = &[
        "cicustom",
        "cipassword",
        "citype",
        "ciuser",
        "nameserver",
        "searchdomain",
        "sshkeys",
    ];
    if is_disk_key(k) || ["vmid", "node", "pool", "storage", "start"].contains(&k) {
        None
    } else if CPU.contains(&k) {
        Some(&["VM.Config.CPU"])
    } else if MEMORY.contains(&k) {
        Some(&["VM.Config.Memory"])
    } else if HWTYPE.contains(&k) || is_indexed(k, "serial", 3) {
        Some(&["VM.Config.HWType"])
    } else if GENERAL.contains(&k) {
        Some(&["VM.Config.Options"])
    } else if ["boot", "bootdisk", "vmstatestorage"].contains(&k) {
        Some(&["VM.Config.Disk"])
    } else if is_indexed(k, "net", 31) {
        Some(&["VM.Config.Network"])
    } else if CLOUDINIT.contains(&k) || is_indexed(k, "ipconfig", 31) {
        Some(&["VM.Config.Cloudinit", "VM.Config.Network"])
    } else {
        None
    }
}

/// A VM privilege holds on `/vms/{vmid}` or on the pool it goes into
/// (`PVE::RPCEnvironment::check_vm_perm`).
fn vm_perm(shared: &Shared, vmid: u32, pool: Option<&String>, privs: &[&str]) -> bool {
    access::has_any(shared, &format!("/vms/{vmid}"), privs)
        || pool.is_some_and(|p| access::has_any(shared, &format!("/pool/{p}"), privs))
}

/// The permission checks of `POST /nodes/{node}/qemu` after its parameters
/// passed: VM.Allocate, each option's privilege, Datastore.AllocateSpace on
/// the storage of each new disk, read access to an `import-from` volume's
/// storage (`PVE::Storage::check_volume_access`), SDN.Use on each bridge
/// (`PVE::QemuServer::check_bridge_access`).
fn check_create_perms(
    shared: &Shared,
    vmid: u32,
    p: &BTreeMap<String, String>,
) -> Result<(), ApiError> {
    let pool = p.get("pool");
    if !vm_perm(shared, vmid, pool, &["VM.Allocate"]) {
        return Err(access::denied(&format!("/vms/{vmid}"), "VM.Allocate"));
    }
    for k in p.keys() {
        if let Some(privs) = option_privilege(k) {
            if !vm_perm(shared, vmid, pool, privs) {
                return Err(access::denied(&format!("/vms/{vmid}"), privs[0]));
            }
        }
    }
    for (k, v) in p {
        if is_disk_key(k) {
            let (file, opts) = params::property_string(v, "file").unwrap_or_default();
            let file = file.unwrap_or_default();
            if let Some((sid, rest)) = file.split_once(':') {
                if rest != "cloudinit" && rest.parse::<f64>().is_ok() {
                    access::require(
                        shared,
                        &format!("/storage/{sid}"),
                        "Datastore.AllocateSpace",
                    )?;
                }
            }
            if let Some((src, _)) = opts.get("import-from").and_then(|s| s.split_once(':')) {
                access::require_any(
                    shared,
                    &format!("/storage/{src}"),
                    &["Datastore.AllocateSpace", "Datastore.Audit"],
                )?;
            }
        }
        if is_indexed(k, "net", 31) {
            let (_, o) = params::property_string(v, "model").unwrap_or_default();
            if let Some(bridge) = o.get("bridge") {
                access::require(
                    shared,
                    &format!("/sdn/zones/localnetwork/{bridge}"),
                    "SDN.Use",
                )?;
            }
        }
    }
    Ok(())
}

/// `smbios1` (format `pve-qm-smbios1`): known keys, `uuid` a UUID.
fn check_smbios1(e: &mut Errors, v: &str) {
    // The format has no default key: a bare value is an error.
    match params::property_string(v, "") {
        Ok((Some(bare), _)) => {
            e.insert(
                "smbios1".into(),
                format!("invalid format - value without key, but schema does not define a default key: {bare}"),
            );
        }
        Ok((None, o)) => {
            if params::check_keys(
                e,
                "smbios1",
                &o,
                &[
                    "base64",
                    "family",
                    "manufacturer",
                    "product",
                    "serial",
                    "sku",
                    "uuid",
                    "version",
                ],
            ) {
                if let Some(u) = o.get("uuid") {
                    if !params::is_uuid(u) {
                        e.insert(
                            "smbios1".into(),
                            format!("invalid format - value '{u}' is not a valid UUID"),
                        );
                    }
                }
            }
        }
        Err(m) => {
            e.insert("smbios1".into(), format!("invalid format - {m}"));
        }
    }
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
        if k == "vmid" || k == "node" || k == "start" {
            continue;
        }
        let v = if k == "tags" {
            normalize_tags(v)
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
            let existing: std::collections::BTreeSet<String> = st
                .vms
                .values()
                .filter(|v| access::has(&shared2, &format!("/vms/{}", v.vmid), "VM.Audit"))
                .filter_map(|v| v.config.get("tags"))
                .flat_map(|t| params::split_tags(t))
                .collect();
            if let Some(t) = config.get("tags").and_then(|t| {
                params::split_tags(t)
                    .into_iter()
                    .find(|t| !access::tag_allowed(&shared2, t, &existing))
            }) {
                st.vms.remove(&vmid);
                return Err(format!(
                    "unable to create VM {vmid} - Permission check failed (/, Sys.Modify for modifying tag '{t}')"
                ));
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
                } else {
                    n += 1;
                    let vol = crate::disks::new_disk(sdef, vmid, n - 1);
                    let mut extra: Vec<String> = opts
                        .iter()
                        .filter(|(k, _)| k.as_str() != "import-from")
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    extra.insert(0, vol.clone());
                    new_vols.push(vol);
                    extra.join(",")
                };
                vm.config.insert(k, new);
            }
            vm.config.remove("lock");
            for vol in new_vols {
                st.add_vm_disk(&node, vol);
            }
            Ok(())
        }),
    );
    Ok(json!(upid))
}

/// Which file a volume is right now (its inode), None when it is gone.
fn file_identity(st: &State, node: &str, volid: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let v = st.volumes.get(&st.volume_key(node, volid))?;
    match &v.path {
        Some(p) => std::fs::metadata(p).ok().map(|m| m.ino()),
        None => Some(0),
    }
}

/// A disk option's volume id and the rest (`,discard=on,...`).
fn split_volume(v: &str) -> (String, String) {
    match v.split_once(',') {
        Some((a, b)) => (a.to_string(), format!(",{b}")),
        None => (v.to_string(), String::new()),
    }
}

/// A VM's config lock (`lock: create`, `clone`, ...) refuses other tasks.
fn not_locked(vm: &Vm) -> Result<(), ApiError> {
    match vm.config.get("lock") {
        Some(l) => Err(err500(format!("VM is locked ({l})"))),
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
            e.insert(k.clone(), "property is not defined in schema and the schema does not allow additional properties".into());
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
    let mut st = lock(shared);
    let src = vm_on(&st, p, vmid)?.clone();
    let node = src.node.clone();
    if st.vms.contains_key(&newid) {
        return Err(err500(format!(
            "unable to create VM {newid}: config file already exists"
        )));
    }
    not_locked(&src)?;
    let full = full.unwrap_or(!src.template);
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
    let mut full_copies = Vec::new();
    for (k, v) in config.iter_mut().filter(|(k, _)| is_disk_key(k)) {
        let (vol, rest) = split_volume(v);
        if vol.ends_with("-cloudinit") || vol.ends_with("-cloudinit.qcow2") {
            // A clone gets a cloud-init drive of its own.
            if let Some(sdef) = vol.split_once(':').and_then(|(sid, _)| storage(sid)) {
                *v = format!("{}{rest}", crate::disks::cloudinit(sdef, newid));
            }
            continue;
        }
        if let Some(c) = crate::disks::clone_disk(&vol, vmid, newid, !full) {
            if full {
                full_copies.push(c.clone());
            }
            *v = format!("{c}{rest}");
        }
        let _ = k;
    }
    for vol in full_copies {
        st.add_vm_disk(&node, vol);
    }
    config.insert("lock".into(), "clone".into());
    st.vms.insert(
        newid,
        Vm {
            vmid: newid,
            node: node.clone(),
            config,
            template: false,
            running: false,
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
            st.vms.remove(&vmid);
            st.volumes
                .retain(|k, _| crate::disks::owner(k) != Some(vmid));
            for members in shared2.pools().values_mut() {
                members.remove(&vmid);
            }
            Ok(())
        },
    )
}
