//! VM options: the ones the simulator knows, the checks of their values and
//! the privileges they need, shared by create (`vms`) and config update
//! (`vmconfig`) so that both refuse the same things.
//! Part of pve-sim, a labelled STAND-IN for the Proxmox VE API (not Proxmox).

use std::collections::BTreeMap;

use crate::access;
use crate::params::{self, Errors};
use crate::routes::{err500, ApiError};
use crate::state::{new_uuid, storage, Shared, State};

/// The VM options the simulator knows: a subset of
/// `PVE::QemuServer::json_config_properties`, the options of both create and
/// config update.
/// The cloud-init options (`PVE/QemuServer/Cloudinit.pm`): VM.Config.Cloudinit,
/// and taken at once by a running VM.
pub(crate) const CLOUDINIT_OPTIONS: &[&str] = &[
    "cicustom",
    "cipassword",
    "citype",
    "ciuser",
    "ciupgrade",
    "nameserver",
    "searchdomain",
    "sshkeys",
];

const OPTION_KEYS: &[&str] = &[
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
    "ciuser",
    "sshkeys",
    "ipconfig0",
    "numa",
    "template",
    "tpmstate0",
    "smbios1",
];

/// A config option of [`OPTION_KEYS`], a disk, a NIC or a serial port.
pub(crate) fn is_option_key(k: &str) -> bool {
    OPTION_KEYS.contains(&k)
        || is_disk_key(k)
        || is_indexed(k, "net", 31)
        || is_indexed(k, "serial", 3)
}

pub(crate) fn is_indexed(k: &str, prefix: &str, max: u32) -> bool {
    k.strip_prefix(prefix)
        .and_then(|n| n.parse::<u32>().ok())
        .map(|n| n <= max && k == format!("{prefix}{n}"))
        .unwrap_or(false)
}

/// A disk option of `qm create`: `scsiN`, `ideN`, `sataN`, `virtioN`, `efidisk0`.
pub(crate) fn is_disk_key(k: &str) -> bool {
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
/// (`STORAGE:0,import-from=VOLUME`), `STORAGE:cloudinit`, an existing
/// volume (an ISO image for a CD-ROM: `local:iso/x.iso,media=cdrom`), or
/// `none`. With `present_now`, an existing volume must exist now (create);
/// else the caller checks that when it applies the change (config update,
/// `create_disks` in its task). `efi`: the `efidisk0` of a PVE with these
/// `ms-cert` values (Some(None): a PVE without the option).
fn check_disk(
    st: &State,
    node: &str,
    e: &mut Errors,
    (key, v): (&str, &str),
    efi: Option<Option<&[&str]>>,
    present_now: bool,
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
        // PVE/API2/Qemu.pm `$check_storage_access`: "content type needs to
        // be 'images' or 'iso'".
        let vtype = crate::disks::volume_type(&file);
        if vtype != "images" && vtype != "iso" {
            e.insert(
                key.into(),
                "content type needs to be 'images' or 'iso'".into(),
            );
            return Ok(());
        }
        if present_now {
            volume_present(st, node, &file).map_err(err500)?;
        }
        if vtype == "iso" {
            return Ok(());
        }
    }
    if !s.content.contains(&"images") {
        return Err(err500(format!(
            "storage '{sid}' does not support content-type 'images'"
        )));
    }
    Ok(())
}

/// An existing volume the VM uses must exist on its node (`create_disks`:
/// "volume ... does not exist").
pub(crate) fn volume_present(st: &State, node: &str, volid: &str) -> Result<(), String> {
    if st.volumes.contains_key(&st.volume_key(node, volid)) {
        Ok(())
    } else {
        Err(format!("volume {volid} does not exist"))
    }
}

/// The schema's answer to a parameter it does not know.
pub(crate) const NOT_IN_SCHEMA: &str =
    "property is not defined in schema and the schema does not allow additional properties";

/// The checks of VM option values that create and config update share (the
/// formats of `PVE::QemuServer::json_config_properties`): per-parameter
/// errors go into `e`; the first failure that is no parameter error (a
/// storage, a missing volume, a permission) is returned.
pub(crate) fn check_options(
    st: &State,
    node: &str,
    p: &BTreeMap<String, String>,
    e: &mut Errors,
    volumes_present_now: bool,
    pve_version: &str,
) -> Option<ApiError> {
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
        params::check_enum(e, "bios", v, &["seabios", "ovmf"]);
    }
    if let Some(v) = p.get("smbios1") {
        check_smbios1(e, v);
    }
    if let Some(v) = p.get("scsihw") {
        params::check_enum(
            e,
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
            e,
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
            params::check_integer(e, k, v, 1, 4096);
        }
    }
    if let Some(v) = p.get("memory") {
        let v = v.strip_prefix("current=").unwrap_or(v);
        params::check_integer(e, "memory", v, 16, 1 << 30);
    }
    if let Some(v) = p.get("agent") {
        match params::property_string(v, "enabled") {
            Ok((h, o)) => {
                if params::check_keys(
                    e,
                    "agent",
                    &o,
                    &["enabled", "freeze-fs", "fstrim_cloned_disks", "type"],
                ) {
                    params::check_boolean(e, "agent", h.as_deref().unwrap_or(""));
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
            match parse_net(v) {
                Ok(net) => {
                    if params::check_keys(
                        e,
                        k,
                        &net.opts,
                        &[
                            "bridge",
                            "firewall",
                            "link_down",
                            "mtu",
                            "queues",
                            "rate",
                            "tag",
                            "trunks",
                        ],
                    ) {
                        params::check_enum(e, k, &net.model, NIC_MODELS);
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
            let efi = (k == "efidisk0").then(|| efidisk_ms_cert_values(pve_version));
            if let Err(x) = check_disk(st, node, e, (k, v), efi, volumes_present_now) {
                hard.get_or_insert(x);
            }
        }
    }
    hard
}

/// The privileges an option needs on the VM, any one of them (a copy of
/// `PVE/API2/Qemu.pm` `check_vm_modify_config_perm` with its option lists
/// `$cpuoptions`, `$memoryoptions`, `$hwtypeoptions`, `$generaloptions`,
/// `$vmpoweroptions`, `$diskoptions`, `$cloudinitoptions`; serial ports as
/// `check_vm_create_serial_perm` checks a `socket`). None for what that
/// check skips: drives (their privilege depends on the value, and their
/// storage is checked), tags (`PVE::GuestHelpers::assert_tag_permissions`,
/// see [`assert_tag_permissions`]) and the non-option parameters. `startup`
/// needs Sys.Modify on `/` too; options outside every list only root may set
/// ("only root can set '...' config"): the simulator knows none of them.
pub(crate) fn option_privilege(k: &str) -> Option<&'static [&'static str]> {
    const CPU: &[&str] = &[
        "cores",
        "cpu",
        "runningcpu",
        "cpulimit",
        "cpuunits",
        "numa",
        "smp",
        "sockets",
        "vcpus",
    ];
    const MEMORY: &[&str] = &["memory", "balloon", "shares", "allow-ksm"];
    const HWTYPE: &[&str] = &[
        "acpi",
        "hotplug",
        "kvm",
        "machine",
        "runningmachine",
        "scsihw",
        "smbios1",
        "tablet",
        "vga",
        "watchdog",
        "audio0",
        "rng0",
    ];
    const GENERAL: &[&str] = &[
        "agent",
        "autostart",
        "bios",
        "description",
        "keyboard",
        "localtime",
        "migrate_downtime",
        "migrate_speed",
        "name",
        "onboot",
        "ostype",
        "protection",
        "reboot",
        "startdate",
        "startup",
        "tdf",
        "template",
    ];
    if is_disk_key(k) || k == "tpmstate0" || k == "tags" {
        None
    } else if CPU.contains(&k) || is_indexed(k, "numa", 7) {
        Some(&["VM.Config.CPU"])
    } else if MEMORY.contains(&k) {
        Some(&["VM.Config.Memory"])
    } else if HWTYPE.contains(&k) || is_indexed(k, "serial", 3) {
        Some(&["VM.Config.HWType"])
    } else if GENERAL.contains(&k) {
        Some(&["VM.Config.Options"])
    } else if k == "freeze" {
        Some(&["VM.PowerMgmt"])
    } else if ["boot", "bootdisk", "vmstatestorage"].contains(&k) {
        Some(&["VM.Config.Disk"])
    } else if is_indexed(k, "net", 31) {
        Some(&["VM.Config.Network"])
    } else if CLOUDINIT_OPTIONS.contains(&k) || is_indexed(k, "ipconfig", 31) {
        Some(&["VM.Config.Cloudinit", "VM.Config.Network"])
    } else {
        None
    }
}

/// A VM privilege holds on `/vms/{vmid}` or on the pool it goes into
/// (`PVE::RPCEnvironment::check_vm_perm`).
pub(crate) fn vm_perm(shared: &Shared, vmid: u32, pool: Option<&String>, privs: &[&str]) -> bool {
    access::has_any(shared, &format!("/vms/{vmid}"), privs)
        || pool.is_some_and(|p| access::has_any(shared, &format!("/pool/{p}"), privs))
}

/// The permission checks of create and config update for the options they
/// set or delete (`keys`) and the values they set (`p`): each option's
/// [`option_privilege`] (`startup` also Sys.Modify on `/`),
/// Datastore.AllocateSpace on the storage of each new disk, read access to
/// an existing volume's or an `import-from` volume's storage
/// (`PVE::Storage::check_volume_access`), SDN.Use on each bridge
/// (`PVE::QemuServer::check_bridge_access`).
pub(crate) fn check_option_perms<'a>(
    shared: &Shared,
    vmid: u32,
    pool: Option<&String>,
    keys: impl IntoIterator<Item = &'a String>,
    p: &BTreeMap<String, String>,
) -> Result<(), ApiError> {
    for k in keys {
        if let Some(privs) = option_privilege(k) {
            if !vm_perm(shared, vmid, pool, privs) {
                return Err(access::denied(&format!("/vms/{vmid}"), privs[0]));
            }
        }
        if k == "startup" {
            access::require(shared, "/", "Sys.Modify")?;
        }
    }
    let read = ["Datastore.AllocateSpace", "Datastore.Audit"];
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
                } else if rest != "cloudinit" && crate::disks::volume_type(&file) == "iso" {
                    access::require_any(shared, &format!("/storage/{sid}"), &read)?;
                }
            }
            if let Some((src, _)) = opts.get("import-from").and_then(|s| s.split_once(':')) {
                access::require_any(shared, &format!("/storage/{src}"), &read)?;
            }
        }
        if is_indexed(k, "net", 31) {
            check_bridge_access(shared, v)?;
        }
    }
    Ok(())
}

/// SDN.Use on a NIC's bridge (`PVE::QemuServer::check_bridge_access`).
pub(crate) fn check_bridge_access(shared: &Shared, net: &str) -> Result<(), ApiError> {
    let (_, o) = params::property_string(net, "model").unwrap_or_default();
    match o.get("bridge") {
        Some(bridge) => access::require(
            shared,
            &format!("/sdn/zones/localnetwork/{bridge}"),
            "SDN.Use",
        ),
        None => Ok(()),
    }
}

/// `PVE::GuestHelpers::assert_tag_permissions` for a tag change from `old`
/// to `new`: VM.Config.Options on the VM, and the datacenter's tag policy
/// ([`access::tag_allowed`]) for each tag added or removed. `existing` are
/// the tags of the VMs the token may audit.
pub(crate) fn assert_tag_permissions(
    shared: &Shared,
    st: &State,
    vmid: u32,
    (old, new): (&str, &str),
) -> Result<(), String> {
    if !access::has(shared, &format!("/vms/{vmid}"), "VM.Config.Options") {
        return Err(format!(
            "Permission check failed (/vms/{vmid}, VM.Config.Options)"
        ));
    }
    tag_policy(shared, st, (old, new))
}

/// The tag policy part of [`assert_tag_permissions`].
pub(crate) fn tag_policy(
    shared: &Shared,
    st: &State,
    (old, new): (&str, &str),
) -> Result<(), String> {
    let existing: std::collections::BTreeSet<String> = st
        .vms
        .values()
        .filter(|v| access::has(shared, &format!("/vms/{}", v.vmid), "VM.Audit"))
        .filter_map(|v| v.config.get("tags"))
        .flat_map(|t| params::split_tags(t))
        .collect();
    let (old, new) = (params::split_tags(old), params::split_tags(new));
    let count = |l: &[String], t: &str| l.iter().filter(|x| *x == t).count();
    for t in old.iter().chain(&new) {
        if count(&old, t) != count(&new, t) && !access::tag_allowed(shared, t, &existing) {
            return Err(format!(
                "Permission check failed (/, Sys.Modify for modifying tag '{t}')"
            ));
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

/// NIC models the simulator knows (some of `PVE::QemuServer::Network`'s
/// `$nic_model_list`).
const NIC_MODELS: &[&str] = &["e1000", "e1000e", "rtl8139", "virtio", "vmxnet3"];

/// A parsed NIC option (format `pve-qm-net`).
pub(crate) struct Net {
    pub model: String,
    pub mac: Option<String>,
    /// The other keys (`bridge`, `firewall`, ...).
    pub opts: BTreeMap<String, String>,
}

/// Parse a NIC option: `MODEL[=MAC]` or `model=MODEL[,macaddr=MAC]`, then
/// options (`MODEL=MAC` is the format's key alias: `virtio=BC:24:11:..`).
pub(crate) fn parse_net(v: &str) -> Result<Net, String> {
    let (head, mut opts) = params::property_string(v, "model")?;
    let mut mac = opts.remove("macaddr");
    let model = match head {
        Some(m) => m,
        None => {
            let alias = opts
                .keys()
                .find(|k| NIC_MODELS.contains(&k.as_str()))
                .cloned()
                .ok_or("missing property - 'model'")?;
            mac = opts.remove(&alias);
            alias
        }
    };
    Ok(Net { model, mac, opts })
}

/// A NIC option with a MAC address: one is made up (Proxmox's prefix
/// `BC:24:11`) when it has none, or always with `fresh` (a clone's NIC),
/// and printed as PVE prints it, `MODEL=MAC` first
/// (`PVE::QemuServer::Network` `parse_net`, `print_net`;
/// `PVE::Tools::random_ether_addr`).
pub(crate) fn net_with_mac(v: &str, fresh: bool) -> String {
    let Ok(net) = parse_net(v) else {
        return v.to_string();
    };
    let mac = match net.mac {
        Some(m) if !fresh => m,
        _ => random_mac(),
    };
    let mut out = vec![format!("{}={mac}", net.model)];
    out.extend(net.opts.iter().map(|(k, v)| format!("{k}={v}")));
    out.join(",")
}

/// A locally administered unicast MAC with Proxmox's `BC:24:11` prefix.
fn random_mac() -> String {
    let u = new_uuid().replace('-', "");
    format!(
        "BC:24:11:{}:{}:{}",
        &u[0..2].to_ascii_uppercase(),
        &u[2..4].to_ascii_uppercase(),
        &u[4..6].to_ascii_uppercase()
    )
}
