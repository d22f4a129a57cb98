//! The `local` provider: real QEMU VMs on this host, booted the way Proxmox
//! boots them (q35, OVMF with Secure Boot and Microsoft keys, virtio-scsi),
//! on a bridge inside a network namespace kiln makes (`kiln-<env>`). Nothing
//! leaves that namespace: no NAT, no veth to the host; kiln reaches the VMs
//! with sockets made inside it ([`netns::connect`]).
//!
//! State lives in `<env state>/local/`:
//!
//! - `network.json`: the namespace kiln made (written before it is made, so
//!   a namespace is only ever deleted by the environment that made it);
//! - `vms/<name>/`: one VM: `vm.json` (its marks, tap, MAC and QEMU pid;
//!   written before QEMU starts, so a VM whose creation was interrupted is
//!   still listed and can be destroyed), `disk.qcow2` (an overlay over the
//!   image's disk), `OVMF_VARS.fd`, `seed.iso` (NoCloud ISO on a CD-ROM as on Proxmox, with a static
//!   network-config), `serial.log`, `qmp.sock`, `qemu.pid`, `qemu.stderr`.
//!
//! QEMU runs detached (`-daemonize`): the environment keeps running after
//! kiln exits. A VM counts as running when its pid is alive and that
//! process's command line is this VM's QEMU (pids are reused).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{netns, NewVm, NodeVm, Provider};
use crate::deploy::env::model::Network;
use crate::image::manifest::ImageManifest;
use crate::util::hosttools;
use crate::validate::qemu::{self, AccelKind, Firmware, Net, VmSpec};
use crate::validate::qmp::QmpClient;
use crate::validate::{seed, Accel, ValidateOptions};

/// The bridge inside the namespace; it holds the environment's gateway address.
pub const BRIDGE: &str = "kbr0";

/// The network namespace of environment `env`.
pub fn namespace(env: &str) -> String {
    format!("kiln-{env}")
}

const VM_RECORD: &str = "vm.json";
const NET_RECORD: &str = "network.json";
/// Lines of the serial console shown to explain a failed gate.
const CONSOLE_TAIL_LINES: usize = 30;
/// sockaddr_un.sun_path holds 108 bytes with the terminating NUL (unix(7)).
const MAX_SOCKET_PATH: usize = 107;

/// What kiln knows about one local VM (`vms/<name>/vm.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct VmRecord {
    env: String,
    name: String,
    slot: String,
    generation: u32,
    image_id: String,
    values_digest: String,
    address: Ipv4Addr,
    image_dir: PathBuf,
    cores: u32,
    memory_mib: u32,
    uefi: bool,
    tap: String,
    mac: String,
    /// The QEMU program, to recognise its process.
    qemu: PathBuf,
    /// Set once QEMU has started; `None` while the VM is being made.
    pid: Option<u32>,
    created: String,
}

impl VmRecord {
    fn shown(&self, running: bool) -> NodeVm {
        NodeVm {
            handle: self.name.clone(),
            name: self.name.clone(),
            slot: self.slot.clone(),
            generation: self.generation,
            image_id: self.image_id.clone(),
            values_digest: self.values_digest.clone(),
            address: self.address,
            running,
        }
    }
}

/// The namespace kiln made for the environment (`network.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct NetRecord {
    env: String,
    namespace: String,
    bridge: String,
    gateway: Ipv4Addr,
    prefix: u8,
}

/// QEMU VMs on this host, in the environment's network namespace.
pub struct LocalProvider {
    env: String,
    network: Network,
    /// `<env state>/local`.
    dir: PathBuf,
    /// The QEMU program; `None`: qemu-system-x86_64 from PATH.
    qemu: Option<PathBuf>,
    accel: Accel,
    /// Serialises the choice of tap names and the writing of new VM records.
    creating: Mutex<()>,
}

impl LocalProvider {
    /// The provider of environment `env_name`, keeping its state under
    /// `state_dir/local` (`state_dir` is the environment's state directory,
    /// [`crate::deploy::env::journal::state_dir`]). Needs root: it makes a network
    /// namespace and tap devices.
    pub fn new(env_name: &str, network: &Network, state_dir: PathBuf) -> Result<Self> {
        // SAFETY: geteuid(2) cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            bail!("the local provider needs root (it makes a network namespace and tap devices): run kiln as root");
        }
        Ok(Self {
            env: env_name.to_string(),
            network: network.clone(),
            dir: state_dir.join("local"),
            qemu: None,
            accel: Accel::Auto,
            creating: Mutex::new(()),
        })
    }

    /// Use another QEMU program (a stand-in, in tests).
    pub fn with_qemu(mut self, program: PathBuf) -> Self {
        self.qemu = Some(program);
        self
    }

    /// The accelerator choice, as `kiln validate --accel` (default: auto,
    /// which probes KVM once per process and falls back to TCG).
    pub fn with_accel(mut self, accel: Accel) -> Self {
        self.accel = accel;
        self
    }

    /// The environment's network namespace.
    pub fn namespace(&self) -> String {
        namespace(&self.env)
    }

    fn vms_dir(&self) -> PathBuf {
        self.dir.join("vms")
    }

    fn vm_dir(&self, handle: &str) -> Result<PathBuf> {
        if handle.is_empty() || handle.contains('/') || handle.starts_with('.') {
            bail!("`{handle}` is not a local VM handle");
        }
        Ok(self.vms_dir().join(handle))
    }

    fn qemu_program(&self) -> Result<PathBuf> {
        match &self.qemu {
            Some(p) => Ok(p.clone()),
            None => hosttools::path_of(hosttools::QEMU_SYSTEM),
        }
    }

    /// The VM records in `vms/`, with their directories.
    fn records(&self) -> Result<Vec<(PathBuf, VmRecord)>> {
        let vms = self.vms_dir();
        let entries = match std::fs::read_dir(&vms) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", vms.display())),
        };
        let mut out = Vec::new();
        for e in entries {
            let e = e.with_context(|| format!("cannot read {}", vms.display()))?;
            if e.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let dir = e.path();
            if let Some(rec) = read_record(&dir)? {
                out.push((dir, rec));
            }
        }
        out.sort_by(|a, b| a.1.name.cmp(&b.1.name));
        Ok(out)
    }

    /// The record of VM `handle`, if it exists and carries this
    /// environment's mark (another's is refused, never touched).
    fn record(&self, handle: &str) -> Result<Option<(PathBuf, VmRecord)>> {
        let dir = self.vm_dir(handle)?;
        let Some(rec) = read_record(&dir)? else {
            return Ok(None);
        };
        if rec.env != self.env {
            bail!(
                "{} belongs to environment `{}`, not `{}`: left alone",
                dir.join(VM_RECORD).display(),
                rec.env,
                self.env
            );
        }
        Ok(Some((dir, rec)))
    }

    fn accel_for(&self, image_dir: &Path, firmware: &Firmware) -> Result<AccelKind> {
        if self.accel == Accel::Tcg {
            return Ok(AccelKind::Tcg);
        }
        let manifest = ImageManifest::load(image_dir)?;
        let choice = crate::validate::resolve_accel(
            self.accel,
            &manifest,
            image_dir,
            firmware,
            &ValidateOptions::default(),
        )?;
        Ok(choice.kind)
    }

    /// A tap name no other VM of the environment has.
    fn free_tap(&self) -> Result<String> {
        let used: Vec<String> = self.records()?.into_iter().map(|(_, r)| r.tap).collect();
        Ok((0..)
            .map(|n| format!("tap{n}"))
            .find(|t| !used.contains(t))
            .expect("an unused tap name"))
    }

    fn fresh(&self, vm: &NewVm, dir: &Path) -> Result<NodeVm> {
        let mac = super::mac_for(&self.env, &vm.name);
        if let Some((_, other)) = self.records()?.into_iter().find(|(_, r)| r.mac == mac) {
            bail!(
                "VM {} would get MAC {mac}, which {} has already: rename one of them",
                vm.name,
                other.name
            );
        }
        let rec = VmRecord {
            env: self.env.clone(),
            name: vm.name.clone(),
            slot: vm.slot.clone(),
            generation: vm.generation,
            image_id: vm.image_id.clone(),
            values_digest: vm.values_digest.clone(),
            address: vm.address,
            image_dir: vm.image_dir.clone(),
            cores: vm.cores,
            memory_mib: vm.memory_mib,
            uefi: vm.uefi,
            tap: self.free_tap()?,
            mac,
            qemu: self.qemu_program()?,
            pid: None,
            created: crate::util::now_rfc3339(),
        };
        check_socket_path(dir)?;
        // The record goes in first, through a staging directory renamed into
        // place: vms/<name>/ never exists without its vm.json.
        let staging = self.vms_dir().join(format!(".{}.new", vm.name));
        remove_dir(&staging)?;
        make_private_dir(&staging)?;
        write_record(&staging, &rec)?;
        std::fs::rename(&staging, dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;

        let base = vm.image_dir.join(&vm.disk_file);
        qemu::create_overlay(
            &base,
            &vm.disk_format,
            vm.disk_virtual_size,
            vm.disk_bytes.saturating_sub(vm.disk_virtual_size),
            &dir.join("disk.qcow2"),
        )?;
        seed::Seed {
            instance_id: vm.name.clone(),
            hostname: vm.name.clone(),
            public_keys: vm.ssh_public_keys.clone(),
            user_data: vm.user_data.clone(),
            network_config: Some(seed::static_network_config(
                &rec.mac,
                vm.address,
                self.network.prefix,
                self.network.gateway,
                &self.network.dns,
            )),
        }
        .write_iso(&dir.join(SEED_ISO))?;
        self.start(dir, rec)
    }

    /// Start (or start again) the QEMU of the VM in `dir`; records its pid.
    fn start(&self, dir: &Path, mut rec: VmRecord) -> Result<NodeVm> {
        let firmware = if rec.uefi {
            for f in [crate::validate::OVMF_CODE, crate::validate::OVMF_VARS] {
                hosttools::firmware(&[f], crate::validate::OVMF_PACKAGE)?;
            }
            Firmware::Uefi {
                code: crate::validate::OVMF_CODE.into(),
                vars_template: crate::validate::OVMF_VARS.into(),
            }
        } else {
            Firmware::Bios
        };
        let accel = self.accel_for(&rec.image_dir, &firmware)?;
        let ns = self.namespace();
        netns::add_tap(&ns, &rec.tap, BRIDGE)?;
        let spec = VmSpec {
            name: rec.name.clone(),
            accel,
            firmware,
            disk: dir.join("disk.qcow2"),
            seed: Some(seed_drive(dir)),
            net: Net::Tap {
                ifname: rec.tap.clone(),
                mac: rec.mac.clone(),
            },
            memory_mib: rec.memory_mib,
            cpus: rec.cores,
            workdir: dir.to_path_buf(),
            detached: true,
        };
        let _ = std::fs::remove_file(spec.qmp_socket());
        rec.qemu = self.qemu_program()?;
        write_record(dir, &rec)?;
        let mut cmd = Command::new(&rec.qemu);
        netns::enter_on_exec(&mut cmd, &ns)?;
        let pid = qemu::start_detached(&spec, cmd)
            .with_context(|| format!("cannot start VM {}", rec.name))?;
        rec.pid = Some(pid);
        write_record(dir, &rec)?;
        Ok(rec.shown(true))
    }

    /// Stop QEMU now: QMP quit, then SIGKILL; fails if it will not die.
    fn stop_hard(&self, dir: &Path, rec: &VmRecord, qmp: Option<QmpClient>) -> Result<()> {
        if live_pid(dir, rec).is_none() {
            return Ok(());
        }
        let mut qmp = qmp.or_else(|| qmp_connect(dir, rec));
        if let Some(q) = qmp.as_mut() {
            let _ = q.quit();
            wait_dead(dir, rec, Duration::from_secs(3));
        }
        drop(qmp);
        if let Some(pid) = live_pid(dir, rec) {
            // SAFETY: kill(2) on a pid whose command line was just checked to be this VM's QEMU.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            if !wait_dead(dir, rec, Duration::from_secs(10)) {
                bail!("QEMU of VM {} (pid {pid}) would not die", rec.name);
            }
        }
        Ok(())
    }

    /// Remove a VM that is not running: its tap and its directory.
    fn remove(&self, dir: &Path, rec: &VmRecord) -> Result<()> {
        self.stop_hard(dir, rec, None)?;
        let ns = self.namespace();
        if netns::exists(&ns) {
            netns::delete_link(&ns, &rec.tap)?;
        }
        remove_dir(dir)
    }

    fn net_record(&self) -> Result<Option<NetRecord>> {
        let p = self.dir.join(NET_RECORD);
        match std::fs::read(&p) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
                format!("{} is not kiln's network record", p.display())
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
        }
    }
}

impl Provider for LocalProvider {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn prepare(&self) -> Result<()> {
        hosttools::require(&[hosttools::IP])?;
        make_private_dir(&self.dir)?;
        let ns = self.namespace();
        let want = NetRecord {
            env: self.env.clone(),
            namespace: ns.clone(),
            bridge: BRIDGE.to_string(),
            gateway: self.network.gateway,
            prefix: self.network.prefix,
        };
        let have = self.net_record()?;
        if have.is_none() && netns::exists(&ns) {
            bail!(
                "network namespace {ns} exists but kiln did not make it for environment `{}` (no {}): remove it (`ip netns delete {ns}`) if it is a leftover",
                self.env,
                self.dir.join(NET_RECORD).display()
            );
        }
        // Recorded before it is made: a namespace kiln made is always on record.
        if have.as_ref() != Some(&want) {
            crate::util::write_atomic(
                &self.dir.join(NET_RECORD),
                serde_json::to_string_pretty(&want)?.as_bytes(),
            )?;
        }
        if !netns::exists(&ns) {
            netns::create(&ns)?;
        }
        netns::ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        netns::ensure_bridge(&ns, BRIDGE)?;
        if let Some(old) = have.filter(|h| (h.gateway, h.prefix) != (want.gateway, want.prefix)) {
            netns::remove_address(&ns, BRIDGE, old.gateway, old.prefix)?;
        }
        netns::add_address(&ns, BRIDGE, want.gateway, want.prefix)
    }

    fn list(&self) -> Result<Vec<NodeVm>> {
        Ok(self
            .records()?
            .into_iter()
            .filter(|(_, r)| r.env == self.env)
            .map(|(dir, r)| {
                let running = live_pid(&dir, &r).is_some();
                r.shown(running)
            })
            .collect())
    }

    fn create(&self, vm: &NewVm) -> Result<NodeVm> {
        vm.check_env(&self.env)?;
        if !self.network.contains(vm.address) {
            bail!(
                "VM {}: address {} is outside {}/{}",
                vm.name,
                vm.address,
                self.network.cidr,
                self.network.prefix
            );
        }
        let dir = self.vm_dir(&vm.name)?;
        self.prepare()?;
        let _guard = self.creating.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((dir, rec)) = self.record(&vm.name)? {
            if live_pid(&dir, &rec).is_some() {
                return Ok(rec.shown(true));
            }
            if rec.pid.is_some() {
                // It was made and has stopped since: start it again on its disk.
                return self.start(&dir, rec);
            }
            // Its creation was interrupted before QEMU ran: start afresh.
            self.remove(&dir, &rec)
                .with_context(|| format!("cannot clear the leftovers of VM {}", vm.name))?;
        }
        crate::util::check_interrupted()?;
        self.fresh(vm, &dir).inspect_err(|_| {
            // Nothing half-made stays behind when kiln can clean it now.
            if let Ok(Some((dir, rec))) = self.record(&vm.name) {
                let _ = self.remove(&dir, &rec);
            }
        })
    }

    fn connect(&self, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
        netns::connect(&self.namespace(), addr, timeout)
    }

    fn stop(&self, vm: &NodeVm, grace: Duration) -> Result<()> {
        let Some((dir, rec)) = self.record(&vm.handle)? else {
            return Ok(());
        };
        if live_pid(&dir, &rec).is_none() {
            return Ok(());
        }
        let mut qmp = qmp_connect(&dir, &rec);
        if let Some(q) = qmp.as_mut() {
            // ACPI power button: the guest shuts down cleanly (keepalived
            // hands the VIP over); QEMU exits when it powers off.
            if q.powerdown().is_ok() && wait_dead(&dir, &rec, grace) {
                return Ok(());
            }
        }
        self.stop_hard(&dir, &rec, qmp)
    }

    fn destroy(&self, vm: &NodeVm) -> Result<()> {
        let Some((dir, rec)) = self.record(&vm.handle)? else {
            return Ok(());
        };
        self.remove(&dir, &rec)
    }

    fn console_tail(&self, vm: &NodeVm) -> Option<String> {
        let path = self.vm_dir(&vm.handle).ok()?.join("serial.log");
        let tail = crate::validate::console::tail_lines(&path, CONSOLE_TAIL_LINES);
        (!tail.trim().is_empty()).then_some(tail)
    }

    fn teardown(&self) -> Result<()> {
        let left: Vec<String> = self.records()?.into_iter().map(|(_, r)| r.name).collect();
        if !left.is_empty() {
            bail!(
                "environment `{}` still has local VMs ({}): destroy them before tearing its network down",
                self.env,
                left.join(", ")
            );
        }
        if let Ok(entries) = std::fs::read_dir(self.vms_dir()) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') && name.ends_with(".new") {
                    remove_dir(&e.path())?;
                }
            }
        }
        if let Some(net) = self.net_record()? {
            netns::delete(&net.namespace)?;
            std::fs::remove_file(self.dir.join(NET_RECORD)).with_context(|| {
                format!("cannot remove {}", self.dir.join(NET_RECORD).display())
            })?;
        }
        // Only empty directories go: anything else in them is not kiln's.
        let _ = std::fs::remove_dir(self.vms_dir());
        let _ = std::fs::remove_dir(&self.dir);
        Ok(())
    }
}

/// The seed ISO's file name in a VM's directory.
const SEED_ISO: &str = "seed.iso";

/// The VM's seed: the ISO on a CD-ROM, as a Proxmox VM carries it; a VM
/// made by an older kiln keeps its VFAT `seed.img` disk.
fn seed_drive(dir: &Path) -> crate::validate::qemu::SeedDrive {
    use crate::validate::qemu::SeedDrive;
    let legacy = dir.join("seed.img");
    if !dir.join(SEED_ISO).exists() && legacy.exists() {
        return SeedDrive::Disk(legacy);
    }
    SeedDrive::Cdrom(dir.join(SEED_ISO))
}

/// The pid of the VM's QEMU if it runs: the recorded pid, or the one QEMU
/// wrote itself (kiln may have died before recording it), counted only when
/// that process is this VM's QEMU.
fn live_pid(dir: &Path, rec: &VmRecord) -> Option<u32> {
    let from_file = std::fs::read_to_string(dir.join("qemu.pid"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    let socket = dir.join("qmp.sock");
    [rec.pid, from_file]
        .into_iter()
        .flatten()
        .find(|pid| process_is(*pid, &rec.qemu, &socket.to_string_lossy()))
}

/// Whether process `pid` runs `program` (as an argument: the interpreter of
/// a script shows the script second) with an argument containing `marker`.
/// A zombie has an empty command line, so it does not count.
fn process_is(pid: u32, program: &Path, marker: &str) -> bool {
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let program = program.to_string_lossy();
    args.iter().take(2).any(|a| *a == program) && args.iter().any(|a| a.contains(marker))
}

/// Wait up to `limit` for the VM's QEMU to be gone; whether it is.
fn wait_dead(dir: &Path, rec: &VmRecord, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    loop {
        if live_pid(dir, rec).is_none() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn qmp_connect(dir: &Path, rec: &VmRecord) -> Option<QmpClient> {
    let socket = dir.join("qmp.sock");
    QmpClient::connect(
        &socket,
        Instant::now() + Duration::from_secs(5),
        || match live_pid(dir, rec) {
            Some(_) => Ok(()),
            None => bail!("QEMU is gone"),
        },
    )
    .ok()
}

fn check_socket_path(dir: &Path) -> Result<()> {
    let socket = dir.join("qmp.sock");
    let len = socket.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        bail!(
            "the QMP socket path {} is {len} bytes, more than a Unix socket allows ({MAX_SOCKET_PATH}): set KILN_STATE to a shorter directory",
            socket.display()
        );
    }
    Ok(())
}

fn read_record(dir: &Path) -> Result<Option<VmRecord>> {
    let p = dir.join(VM_RECORD);
    match std::fs::read(&p) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{} is not a local VM record (kiln writes it; remove {} if that VM is gone)",
                p.display(),
                dir.display()
            )
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
    }
}

fn write_record(dir: &Path, rec: &VmRecord) -> Result<()> {
    crate::util::write_atomic(
        &dir.join(VM_RECORD),
        serde_json::to_string_pretty(rec)?.as_bytes(),
    )
}

/// A directory only root reads: VM directories hold the rendered user-data.
fn make_private_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

fn remove_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vms_mac_is_stable_local_unicast_and_differs_between_vms() {
        let a = crate::deploy::providers::mac_for("qa", "qa-lb-1-g0");
        assert_eq!(a, crate::deploy::providers::mac_for("qa", "qa-lb-1-g0"));
        assert!(a.starts_with("52:54:00:"), "{a}");
        assert_eq!(a.len(), 17);
        assert_ne!(a, crate::deploy::providers::mac_for("qa", "qa-lb-1-g1"));
        assert_ne!(a, crate::deploy::providers::mac_for("prod", "qa-lb-1-g0"));
    }

    #[test]
    fn a_pid_counts_only_while_it_is_that_vms_process() {
        let mut child = Command::new("sh")
            .args(["-c", "sleep 30; :", "kiln-test-marker-/vms/a/qmp.sock"])
            .spawn()
            .unwrap();
        let pid = child.id();
        // spawn returns while exec may still be setting up the new command
        // line (the vfork parent wakes early); wait until it shows.
        let until = Instant::now() + Duration::from_secs(5);
        while std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.is_empty())
            && Instant::now() < until
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(process_is(pid, Path::new("sh"), "/vms/a/qmp.sock"));
        // Another VM's socket, or another program: not this VM's QEMU.
        assert!(!process_is(pid, Path::new("sh"), "/vms/b/qmp.sock"));
        assert!(!process_is(
            pid,
            Path::new("/usr/bin/qemu-system-x86_64"),
            "/vms/a/qmp.sock"
        ));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!process_is(pid, Path::new("sh"), "/vms/a/qmp.sock"));
    }

    #[test]
    fn a_socket_path_too_long_for_unix_sockets_is_refused_naming_kiln_state() {
        check_socket_path(Path::new(
            "/root/.local/state/kiln/envs/qa/local/vms/qa-lb-1-g0",
        ))
        .unwrap();
        let long = PathBuf::from("/").join("d".repeat(100));
        let e = check_socket_path(&long).unwrap_err().to_string();
        assert!(e.contains("set KILN_STATE to a shorter directory"), "{e}");
    }
}
