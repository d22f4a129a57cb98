//! What each `kiln publish` run creates on Proxmox, recorded on this machine
//! BEFORE each request that creates something (a VM, an uploaded file), so a
//! later run can prove a half-made VM is a leftover of a run that died.
//!
//! Tags and description are no proof: Proxmox copies both into every clone
//! (`PVE/API2/Qemu.pm`, `clone_vm`: all options but disks, MACs and the
//! SMBIOS UUID are copied). A VM counts as a leftover only when
//! - a run recorded its VMID here before creating it,
//! - that run's process is gone (it held an exclusive `flock` on its lock
//!   file for its whole life; the kernel drops it when the process dies),
//! - the run was on this host, and
//! - the VM still carries the run's marker: SMBIOS UUID = run id (see
//!   [`super::naming::run_marker_matches`]), which a clone cannot inherit.
//!
//! Files: `<state>/publish-runs/<run>.json` (`util::state_root`) (rewritten
//! atomically) and `<run>.lock` (never replaced, so the lock stays valid).

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// A VM a run created (or was about to create) on a node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct NodeVm {
    pub node: String,
    pub vmid: u32,
}

/// A file a run uploaded (or was about to upload) to a node's storage.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct NodeVolume {
    pub node: String,
    pub storage: String,
    pub volid: String,
}

/// One run's record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Entry {
    /// The run id, a UUID: also the SMBIOS UUID of every VM it creates.
    pub run: String,
    /// API URL of the target (without a trailing slash).
    pub url: String,
    pub image_id: String,
    /// Host name of the machine the run ran on.
    pub host: String,
    pub pid: u32,
    /// RFC 3339 UTC.
    pub started: String,
    #[serde(default)]
    pub vms: Vec<NodeVm>,
    #[serde(default)]
    pub uploads: Vec<NodeVolume>,
}

/// Where run records live.
pub(crate) fn dir() -> Result<PathBuf> {
    Ok(crate::util::state_root()?.join("publish-runs"))
}

pub(crate) fn this_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// A fresh run id: a random (version 4) UUID.
pub(crate) fn new_run_id() -> String {
    use rand_core::{OsRng, RngCore};
    let mut b = [0u8; 16];
    OsRng.fill_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Try to take an exclusive lock without waiting; Ok(false) when another
/// process holds it.
fn try_lock(f: &File) -> Result<bool> {
    // SAFETY: flock on a file descriptor this process owns.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e).context("flock failed")
    }
}

/// The running publish's own record; kept on disk until [`Run::finish`].
pub(crate) struct Run {
    pub entry: Entry,
    /// Set when a failed run could not remove all it made: its record then
    /// stays for the next run.
    pub left_behind: bool,
    json: PathBuf,
    lock_path: PathBuf,
    _lock: File,
}

impl Run {
    pub(crate) fn start(url: &str, image_id: &str) -> Result<Run> {
        Self::start_in(&dir()?, url, image_id)
    }

    pub(crate) fn start_in(dir: &Path, url: &str, image_id: &str) -> Result<Run> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let run = new_run_id();
        let lock_path = dir.join(format!("{run}.lock"));
        let lock = File::create(&lock_path)
            .with_context(|| format!("cannot create {}", lock_path.display()))?;
        if !try_lock(&lock)? {
            anyhow::bail!("{} is locked by another process", lock_path.display());
        }
        let r = Run {
            left_behind: false,
            entry: Entry {
                run: run.clone(),
                url: url.trim_end_matches('/').to_string(),
                image_id: image_id.to_string(),
                host: this_host(),
                pid: std::process::id(),
                started: crate::util::now_rfc3339(),
                vms: Vec::new(),
                uploads: Vec::new(),
            },
            json: dir.join(format!("{run}.json")),
            lock_path,
            _lock: lock,
        };
        r.save()?;
        Ok(r)
    }

    pub(crate) fn id(&self) -> &str {
        &self.entry.run
    }

    fn save(&self) -> Result<()> {
        crate::util::write_atomic(&self.json, &serde_json::to_vec_pretty(&self.entry)?)
            .with_context(|| format!("cannot record the publish run in {}", self.json.display()))
    }

    /// Record a VMID before asking Proxmox to create it.
    pub(crate) fn will_create_vm(&mut self, node: &str, vmid: u32) -> Result<()> {
        let v = NodeVm {
            node: node.to_string(),
            vmid,
        };
        if !self.entry.vms.contains(&v) {
            self.entry.vms.push(v);
            self.save()?;
        }
        Ok(())
    }

    /// Record an upload before sending it.
    pub(crate) fn will_upload(&mut self, node: &str, storage: &str, volid: &str) -> Result<()> {
        let v = NodeVolume {
            node: node.to_string(),
            storage: storage.to_string(),
            volid: volid.to_string(),
        };
        if !self.entry.uploads.contains(&v) {
            self.entry.uploads.push(v);
            self.save()?;
        }
        Ok(())
    }

    /// Everything this run made is either kept on purpose (the template) or
    /// removed: forget the run.
    pub(crate) fn finish(self) {
        let _ = std::fs::remove_file(&self.json);
        let _ = std::fs::remove_file(&self.lock_path);
    }
}

/// A record of a run whose process is gone, locked by this process while it
/// cleans up after it (so two later runs do not both do it).
pub(crate) struct DeadRun {
    pub entry: Entry,
    json: PathBuf,
    lock_path: PathBuf,
    _lock: File,
}

impl DeadRun {
    /// Everything the run left is gone: forget it.
    pub(crate) fn forget(self) {
        let _ = std::fs::remove_file(&self.json);
        let _ = std::fs::remove_file(&self.lock_path);
    }
}

/// Runs against `url` recorded on this host whose process has ended.
pub(crate) fn dead_runs(dir: &Path, url: &str) -> Result<Vec<DeadRun>> {
    let url = url.trim_end_matches('/');
    let host = this_host();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
    };
    let mut out = Vec::new();
    for de in rd {
        let path = de?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let Ok(text) = std::fs::read(&path) else {
            continue;
        };
        let Ok(entry) = serde_json::from_slice::<Entry>(&text) else {
            continue;
        };
        if entry.url != url || entry.host != host {
            continue;
        }
        let lock_path = path.with_extension("lock");
        let lock = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
        {
            Ok(f) => f,
            Err(_) => continue,
        };
        // Still held: the run is alive (or another run is cleaning up after it).
        if !try_lock(&lock)? {
            continue;
        }
        // Cleaned up and forgotten between listing and locking.
        if !path.exists() {
            let _ = std::fs::remove_file(&lock_path);
            continue;
        }
        out.push(DeadRun {
            entry,
            json: path,
            lock_path,
            _lock: lock,
        });
    }
    out.sort_by(|a, b| a.entry.started.cmp(&b.entry.started));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_are_version_4_uuids() {
        let id = new_run_id();
        let re = regex::Regex::new(
            "^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$",
        )
        .unwrap();
        assert!(re.is_match(&id), "{id}");
        assert_ne!(id, new_run_id());
    }

    #[test]
    fn a_live_run_is_not_dead_and_a_finished_run_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let mut run = Run::start_in(dir.path(), "https://pve:8006/", "abc").unwrap();
        run.will_create_vm("pve", 9000).unwrap();
        // This process holds the run's lock: flock locks are per open file,
        // so a second open in the same process sees it held.
        assert!(dead_runs(dir.path(), "https://pve:8006")
            .unwrap()
            .is_empty());
        run.finish();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_run_whose_lock_is_free_is_dead_and_lists_what_it_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let mut run = Run::start_in(dir.path(), "https://pve:8006", "abc").unwrap();
        run.will_upload("pve", "local", "local:import/x.qcow2")
            .unwrap();
        run.will_create_vm("pve", 9001).unwrap();
        let id = run.id().to_string();
        // What a killed process leaves: the record without anyone holding the lock.
        drop(run);
        let dead = dead_runs(dir.path(), "https://pve:8006").unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].entry.run, id);
        assert_eq!(
            dead[0].entry.vms,
            vec![NodeVm {
                node: "pve".into(),
                vmid: 9001
            }]
        );
        assert_eq!(dead[0].entry.uploads[0].volid, "local:import/x.qcow2");
        // While one cleaner holds it, another does not get it.
        assert!(dead_runs(dir.path(), "https://pve:8006")
            .unwrap()
            .is_empty());
        // Other targets never see it.
        drop(dead);
        assert!(dead_runs(dir.path(), "https://other:8006")
            .unwrap()
            .is_empty());
        let dead = dead_runs(dir.path(), "https://pve:8006").unwrap();
        dead.into_iter().for_each(DeadRun::forget);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
