//! The simulated node's state: configuration, storages, VMs, volumes, tasks, faults.
//! Part of pve-sim, a labelled STAND-IN for the Proxmox VE API (not Proxmox).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::faults::Fault;
use crate::params;

/// The first (default) node's name.
pub const NODE: &str = "pve";

/// A storage of the simulated node.
#[derive(Debug, Clone, Copy)]
pub struct StorageDef {
    pub id: &'static str,
    /// PVE storage type: `dir`, `lvmthin`, `zfspool`, `nfs`.
    pub kind: &'static str,
    pub content: &'static [&'static str],
    /// The same storage on every node (network storage).
    pub shared: bool,
}

pub const STORAGES: &[StorageDef] = &[
    StorageDef {
        id: "local",
        kind: "dir",
        content: &["iso", "vztmpl", "import", "backup"],
        shared: false,
    },
    // A directory storage for VM disks (qcow2 files, linked clones named
    // `X/base-X-disk-N.qcow2/Y/vm-Y-disk-M.qcow2` like `nfs`), as an
    // administrator adds one with `pvesm add dir`.
    StorageDef {
        id: "local-dir",
        kind: "dir",
        content: &["images", "rootdir"],
        shared: false,
    },
    StorageDef {
        id: "local-lvm",
        kind: "lvmthin",
        content: &["images", "rootdir"],
        shared: false,
    },
    StorageDef {
        id: "local-zfs",
        kind: "zfspool",
        content: &["images", "rootdir"],
        shared: false,
    },
    StorageDef {
        id: "nfs",
        kind: "nfs",
        content: &["images", "import", "vztmpl", "iso"],
        shared: true,
    },
];

pub(crate) fn storage(id: &str) -> Option<&'static StorageDef> {
    STORAGES.iter().find(|s| s.id == id)
}

/// How to run a simulator.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub listen: SocketAddr,
    /// `USER@REALM!TOKENID=SECRET`.
    pub token: String,
    /// Where uploads and volumes live (`var-tmp/`, `storage/<id>/`, other
    /// nodes' local storages in `nodes/<node>/storage/<id>/`).
    pub data_dir: PathBuf,
    /// PEM certificate chain and key: serve HTTPS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// How long each task runs.
    pub task_delay: Duration,
    /// Reported by `/version`.
    pub version: String,
    /// The cluster's nodes (default: one, `pve`). Local storages exist on
    /// each with their own contents; shared ones (`nfs`) once for all.
    pub nodes: Vec<String>,
    pub faults: Vec<Fault>,
    /// The token's privileges per path (inherited below each path); None
    /// grants everything everywhere.
    pub acl: Option<crate::access::Acl>,
    /// Datacenter options (`datacenter.cfg`) as `GET /cluster/options`
    /// answers them, e.g. `{"user-tag-access": {"user-allow": "existing"},
    /// "registered-tags": ["prod"]}`; they decide which tags a token may set.
    pub datacenter: serde_json::Value,
}

impl SimConfig {
    pub fn new(token: &str, data_dir: &Path) -> Self {
        SimConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            token: token.to_string(),
            data_dir: data_dir.to_path_buf(),
            tls: None,
            task_delay: Duration::from_millis(100),
            version: "8.4.1".into(),
            nodes: vec![NODE.to_string()],
            faults: Vec::new(),
            acl: None,
            datacenter: serde_json::json!({}),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Vm {
    pub vmid: u32,
    /// The node the VM is on.
    pub node: String,
    /// Config keys as `qm config` shows them (`lock` while a task runs).
    pub config: BTreeMap<String, String>,
    pub template: bool,
    pub running: bool,
    /// Changes waiting for the next start (`[PENDING]` in the config file):
    /// a new value, or None for a deletion. A running VM keeps those it
    /// cannot hotplug here (see `vmconfig`).
    pub pending: BTreeMap<String, Option<String>>,
}

#[derive(Debug, Clone)]
pub struct Volume {
    pub volid: String,
    pub content: String,
    pub format: String,
    pub size: u64,
    pub ctime: u64,
    /// The file on disk for file-based storage.
    pub path: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct Task {
    pub upid: String,
    pub kind: String,
    pub id: String,
    pub user: String,
    pub pid: u32,
    pub pstart: u64,
    pub starttime: u64,
    /// None while running.
    pub exitstatus: Option<String>,
    pub log: Vec<String>,
}

/// One API request as the simulator saw it (after auth), for conformance tests.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// The API path template, e.g. `/nodes/{node}/qemu`.
    pub path: String,
    /// Path, query and body parameters, merged.
    pub params: BTreeMap<String, String>,
}

/// Everything the simulator knows; tests may inspect or seed it.
#[derive(Debug, Default)]
pub struct State {
    pub vms: BTreeMap<u32, Vm>,
    pub volumes: BTreeMap<String, Volume>,
    pub tasks: HashMap<String, Task>,
    pub faults: Vec<Fault>,
    pub requests: Vec<Recorded>,
    /// Bytes of upload file parts received (also for failed uploads).
    pub upload_bytes: u64,
    pub(crate) next_pid: u32,
    /// The first node: its volumes (and shared storages' volumes) are keyed
    /// by volid alone in `volumes`, other nodes' by `NODE/volid`.
    pub(crate) first_node: String,
}

impl State {
    /// The key of `volid` on `node` in [`State::volumes`]: the volid for the
    /// first node and for shared storages, `NODE/volid` for other nodes.
    pub fn volume_key(&self, node: &str, volid: &str) -> String {
        let shared = volid
            .split_once(':')
            .and_then(|(sid, _)| storage(sid))
            .is_some_and(|s| s.shared);
        if shared || self.first_node.is_empty() || node == self.first_node {
            volid.to_string()
        } else {
            format!("{node}/{volid}")
        }
    }

    /// A VM disk a create or clone made on `node`, of `size` bytes (the sim
    /// keeps no disk contents).
    pub(crate) fn add_vm_disk(&mut self, node: &str, volid: String, size: u64) {
        let key = self.volume_key(node, &volid);
        self.volumes.insert(
            key,
            Volume {
                volid,
                content: "images".into(),
                format: "raw".into(),
                size,
                ctime: now(),
                path: None,
            },
        );
    }

    /// The volumes of storage `sid` as node `node` sees them.
    pub(crate) fn volumes_on<'a>(
        &'a self,
        node: &'a str,
        sid: &'a str,
    ) -> impl Iterator<Item = &'a Volume> + 'a {
        let prefix = format!("{sid}:");
        self.volumes
            .iter()
            .filter(move |(k, v)| {
                v.volid.starts_with(&prefix) && **k == self.volume_key(node, &v.volid)
            })
            .map(|(_, v)| v)
    }

    /// Seed a VM (as if someone else created it), e.g. to occupy a VMID.
    pub fn add_vm(&mut self, vmid: u32, name: &str, tags: &str, template: bool) {
        self.add_vm_on("local-lvm", vmid, name, tags, template)
    }

    /// [`State::add_vm`] with its disk on `storage`.
    pub fn add_vm_on(
        &mut self,
        storage_id: &str,
        vmid: u32,
        name: &str,
        tags: &str,
        template: bool,
    ) {
        let mut config = BTreeMap::new();
        config.insert("name".into(), name.into());
        if !tags.is_empty() {
            config.insert("tags".into(), normalize_tags(tags));
        }
        let sdef = storage(storage_id).expect("a storage of the simulator");
        let mut disk = crate::disks::new_disk(sdef, vmid, 1);
        if template {
            disk = crate::disks::to_base(&disk, vmid).expect("a VM disk");
        }
        config.insert("scsi0".into(), format!("{disk},size=4G"));
        config.insert("smbios1".into(), format!("uuid={}", new_uuid()));
        let node = if self.first_node.is_empty() {
            NODE.to_string()
        } else {
            self.first_node.clone()
        };
        self.vms.insert(
            vmid,
            Vm {
                vmid,
                node,
                config,
                template,
                running: false,
                pending: BTreeMap::new(),
            },
        );
    }

    /// Seed a linked clone of template `base`, as `POST .../clone` makes it:
    /// the template's config (tags, description) with a new SMBIOS UUID and
    /// each disk a linked clone named the way the disk's storage names them.
    pub fn add_linked_clone(&mut self, base: u32, vmid: u32, name: &str) {
        let src = self.vms.get(&base).expect("the template exists").clone();
        let mut config = src.config.clone();
        config.insert("name".into(), name.into());
        config.insert("smbios1".into(), format!("uuid={}", new_uuid()));
        let mut linked = Vec::new();
        for v in config.values_mut() {
            let (vol, rest) = match v.split_once(',') {
                Some((a, b)) => (a.to_string(), format!(",{b}")),
                None => (v.clone(), String::new()),
            };
            if let Some(c) = crate::disks::clone_disk(&vol, base, vmid, true) {
                *v = format!("{c}{rest}");
                linked.push(c);
            }
        }
        for vol in linked {
            self.add_vm_disk(&src.node, vol, 4 << 30);
        }
        self.vms.insert(
            vmid,
            Vm {
                vmid,
                node: src.node.clone(),
                config,
                template: false,
                running: false,
                pending: BTreeMap::new(),
            },
        );
    }
}

/// What the server threads share.
pub(crate) struct Shared {
    pub(crate) cfg: SimConfig,
    pub(crate) token_id: String,
    pub(crate) secret: String,
    pub(crate) state: Mutex<State>,
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
    pub(crate) stopped: AtomicBool,
    /// Resource pools and their VMs (PVE keeps them in user.cfg, not in the
    /// VM config). Apart from `state` so privilege checks can read it while
    /// a handler holds the state.
    pub(crate) pools: Mutex<BTreeMap<String, std::collections::BTreeSet<u32>>>,
}

impl Shared {
    pub(crate) fn pools(
        &self,
    ) -> MutexGuard<'_, BTreeMap<String, std::collections::BTreeSet<u32>>> {
        self.pools.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pool a VM is in.
    pub(crate) fn pool_of(&self, vmid: u32) -> Option<String> {
        self.pools()
            .iter()
            .find(|(_, m)| m.contains(&vmid))
            .map(|(p, _)| p.clone())
    }
}

/// The state, also after a thread panicked while holding it.
pub(crate) fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    shared.state.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A fresh random-looking UUID, as PVE generates for `smbios1` on create and
/// clone (`PVE::QemuServer::generate_uuid`).
pub fn new_uuid() -> String {
    use sha2::{Digest, Sha256};
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let seed = format!(
        "{:?}-{}-{}",
        SystemTime::now(),
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    );
    let h = hex::encode(Sha256::digest(seed.as_bytes()));
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

pub(crate) fn normalize_tags(s: &str) -> String {
    let mut t: Vec<String> = params::split_tags(s)
        .into_iter()
        .map(|t| t.to_ascii_lowercase())
        .collect();
    t.sort();
    t.dedup();
    t.join(";")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_stored_lowercased_and_sorted() {
        assert_eq!(normalize_tags("Kiln;b,a a"), "a;b;kiln");
    }
}
