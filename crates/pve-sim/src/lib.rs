//! pve-sim: a labelled STAND-IN for the Proxmox VE HTTP API (a cluster of one
//! node `pve` by default, or of [`SimConfig::nodes`]), so
//! `kiln publish` can be tested and tried without Proxmox. It is a simulator, not Proxmox.
//!
//! What it reproduces: API-token auth (401 otherwise), the upload endpoint's
//! multipart rules (Content-Length required, chunked refused, fields before
//! the file part, PVE's file name rules), asynchronous UPID tasks, config
//! locks while tasks run, template rules, `400 Parameter verification failed`
//! with per-parameter errors, the token's privileges per path
//! ([`SimConfig::acl`], `403` where PVE answers it), and injectable faults
//! (see [`Fault`]).
//! Storages: `local` (dir: iso, vztmpl, import, backup), `local-dir` (dir:
//! images, rootdir), `local-lvm` (lvmthin: images, rootdir), `local-zfs` (zfspool: images, rootdir) and
//! `nfs` (shared: images, import, vztmpl, iso), each naming disks and linked
//! clones as its PVE storage type does (see `disks`). Disk contents are not converted: an imported
//! disk is recorded with its size, nothing boots.
//!
//! Modules: `state` (what the node holds), `routes` (route table, auth,
//! dispatch), `vms` (create, clone, template, power, destroy, views),
//! `vmconfig` (config update, resize, shutdown), `options` (option checks
//! both share), `storage` and `tasks` (the handlers), `faults`, and the wire
//! layer `http`, `multipart`, `params`.

pub mod http;
pub mod multipart;
pub mod params;

mod access;
mod disks;
mod faults;
mod options;
mod routes;
mod state;
mod storage;
mod tasks;
mod vmconfig;
mod vms;

pub use access::{parse_acl, Acl};
pub use faults::{parse_faults, Fault, FaultKind, FaultOp};
pub use state::{
    new_uuid, Recorded, SimConfig, State, StorageDef, Task, Vm, Volume, NODE, STORAGES,
};

use anyhow::{bail, Context, Result};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use state::Shared;

/// A running simulator; stops when dropped.
pub struct Sim {
    addr: SocketAddr,
    shared: Arc<Shared>,
    https: bool,
}

/// A rustls server configuration from PEM files (also used by kube-sim).
pub fn load_tls(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read certificate {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad PEM in {}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("cannot read private key {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("certificate and key do not fit together")?;
    Ok(Arc::new(cfg))
}

impl Sim {
    /// Bind, then serve on background threads.
    pub fn start(cfg: SimConfig) -> Result<Sim> {
        let (token_id, secret) = cfg
            .token
            .split_once('=')
            .filter(|(id, s)| id.contains('@') && id.contains('!') && !s.is_empty())
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .context("--token must look like USER@REALM!TOKENID=SECRET")?;
        for d in [
            "var-tmp",
            "storage/local/import",
            "storage/local/template/cache",
        ] {
            std::fs::create_dir_all(cfg.data_dir.join(d))
                .with_context(|| format!("cannot create {}", cfg.data_dir.join(d).display()))?;
        }
        let tls = match &cfg.tls {
            Some((c, k)) => Some(load_tls(c, k)?),
            None => None,
        };
        let listener = TcpListener::bind(cfg.listen)
            .with_context(|| format!("cannot listen on {}", cfg.listen))?;
        let addr = listener.local_addr()?;
        let https = tls.is_some();
        let state = State {
            faults: cfg.faults.clone(),
            next_pid: 4000,
            first_node: cfg
                .nodes
                .first()
                .cloned()
                .unwrap_or_else(|| NODE.to_string()),
            ..State::default()
        };
        let shared = Arc::new(Shared {
            cfg,
            token_id,
            secret,
            state: Mutex::new(state),
            tls,
            stopped: AtomicBool::new(false),
            pools: Mutex::new(Default::default()),
        });
        let s2 = shared.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s2.stopped.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(tcp) = conn {
                    let s3 = s2.clone();
                    std::thread::spawn(move || routes::serve(s3, tcp));
                }
            }
        });
        Ok(Sim {
            addr,
            shared,
            https,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL, e.g. `https://127.0.0.1:8006`.
    pub fn url(&self) -> String {
        format!(
            "{}://{}",
            if self.https { "https" } else { "http" },
            self.addr
        )
    }

    /// Inspect or seed the simulator's state.
    pub fn state(&self) -> MutexGuard<'_, State> {
        state::lock(&self.shared)
    }

    /// Create a resource pool (as `pveum pool add NAME` would).
    pub fn add_pool(&self, name: &str) {
        self.shared.pools().entry(name.to_string()).or_default();
    }

    /// The VMs in a pool, None when there is no such pool.
    pub fn pool_members(&self, name: &str) -> Option<Vec<u32>> {
        self.shared
            .pools()
            .get(name)
            .map(|m| m.iter().copied().collect())
    }

    pub fn inject(&self, fault: Fault) {
        self.state().faults.push(fault);
    }

    /// Block until the simulator is stopped by a signal or by `stop`.
    pub fn wait(&self) {
        while !self.shared.stopped.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn stop(&self) {
        if !self.shared.stopped.swap(true, Ordering::SeqCst) {
            // Wake the accept loop so it sees the flag.
            let _ = TcpStream::connect(self.addr);
        }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Fail early on a token that cannot work.
pub fn check_token_shape(token: &str) -> Result<()> {
    if !token.contains('@') || !token.contains('!') || !token.contains('=') {
        bail!("--token must look like USER@REALM!TOKENID=SECRET");
    }
    Ok(())
}
