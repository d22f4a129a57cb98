//! The QEMU side of a validation boot: copy-on-write overlay, firmware vars,
//! the command line Proxmox would use, and a process guard that never leaks QEMU.

use super::console::ConsoleLog;
use super::qmp::QmpClient;
use crate::util::hosttools;
use anyhow::{bail, Context, Result};
use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Which accelerator runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelKind {
    Kvm,
    Tcg,
}

impl AccelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AccelKind::Kvm => "kvm",
            AccelKind::Tcg => "tcg",
        }
    }
}

/// How the guest firmware starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Firmware {
    /// OVMF with Secure Boot enforced: read-only code plus a private copy of
    /// the vars template (Microsoft keys enrolled, as Proxmox pre-enrolls).
    Uefi {
        code: PathBuf,
        vars_template: PathBuf,
    },
    /// SeaBIOS (QEMU's default firmware).
    Bios,
}

impl Firmware {
    pub fn label(&self) -> &'static str {
        match self {
            Firmware::Uefi { .. } => "uefi",
            Firmware::Bios => "bios",
        }
    }
}

/// How the guest's one network card is connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Net {
    /// No network card (the acceleration probe).
    None,
    /// QEMU user networking, restricted, with 127.0.0.1:`ssh_port`
    /// forwarded to the guest's port 22 (validation boots).
    User { ssh_port: u16 },
    /// A tap device that exists already (the local environment provider
    /// makes it in its network namespace); QEMU runs no scripts on it.
    Tap { ifname: String, mac: String },
}

/// How the NoCloud seed reaches the guest.
#[derive(Debug, Clone)]
pub enum SeedDrive {
    /// A small VFAT volume on its own SCSI disk (`kiln validate`).
    Disk(PathBuf),
    /// An ISO 9660 volume in a CD-ROM drive on the SATA controller's port 2,
    /// the way a Proxmox VM carries an ISO on `ide2` (`media=cdrom`).
    Cdrom(PathBuf),
}

/// Everything needed to start one guest.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// QEMU's `-name` (shown by `ps` and in QMP).
    pub name: String,
    pub accel: AccelKind,
    pub firmware: Firmware,
    pub disk: PathBuf,
    pub seed: Option<SeedDrive>,
    pub net: Net,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Directory for the QMP socket, console log, stderr and vars copy.
    pub workdir: PathBuf,
    /// QEMU daemonizes and outlives kiln ([`start_detached`]); otherwise it
    /// is kiln's child and dies with it ([`Vm::start`]).
    pub detached: bool,
}

/// Create a qcow2 overlay over `base`, `grow` bytes larger than the base, so
/// the image itself is never written and the guest sees a bigger disk.
pub fn create_overlay(
    base: &Path,
    base_format: &str,
    base_virtual: u64,
    grow: u64,
    overlay: &Path,
) -> Result<()> {
    let qemu_img = hosttools::path_of(hosttools::QEMU_IMG)?;
    let base = base
        .canonicalize()
        .with_context(|| format!("cannot find {}", base.display()))?;
    let out = Command::new(qemu_img)
        .args(["create", "-q", "-f", "qcow2", "-F", base_format, "-b"])
        .arg(&base)
        .arg(overlay)
        .arg((base_virtual + grow).to_string())
        .stdin(Stdio::null())
        .output()
        .context("cannot run qemu-img")?;
    if !out.status.success() {
        bail!(
            "qemu-img could not create an overlay of {}: {}",
            base.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A free TCP port on 127.0.0.1 (the OS picks it).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind(("127.0.0.1", 0)).context("cannot find a free port on 127.0.0.1")?;
    Ok(l.local_addr()?.port())
}

/// Fail with a clear message when a requested port is taken.
pub fn ensure_port_free(port: u16) -> Result<()> {
    TcpListener::bind(("127.0.0.1", port))
        .map(drop)
        .with_context(|| format!("port 127.0.0.1:{port} is already taken (pick another --ssh-port, or omit it to use a free one)"))
}

impl VmSpec {
    pub fn qmp_socket(&self) -> PathBuf {
        self.workdir.join("qmp.sock")
    }
    pub fn console_path(&self) -> PathBuf {
        self.workdir.join("serial.log")
    }
    pub fn stderr_path(&self) -> PathBuf {
        self.workdir.join("qemu.stderr")
    }
    /// Where a detached QEMU writes its pid.
    pub fn pid_path(&self) -> PathBuf {
        self.workdir.join("qemu.pid")
    }

    /// The QEMU command line (without the program).
    pub fn args(&self) -> Result<Vec<String>> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |s: &str| a.push(s.to_string());
        let p = |p: &Path| p.display().to_string();
        push("-name");
        push(&self.name);
        for s in ["-nodefaults", "-no-user-config", "-display", "none"] {
            push(s);
        }
        match &self.firmware {
            Firmware::Uefi {
                code,
                vars_template,
            } => {
                // A private copy, made once: a detached VM started again keeps
                // the boot entries its firmware wrote.
                let vars = self.workdir.join("OVMF_VARS.fd");
                if !vars.exists() {
                    let tmp = self.workdir.join("OVMF_VARS.fd.tmp");
                    std::fs::copy(vars_template, &tmp)
                        .and_then(|_| std::fs::rename(&tmp, &vars))
                        .with_context(|| {
                            format!("cannot copy OVMF vars {}", vars_template.display())
                        })?;
                }
                push("-machine");
                push("q35,smm=on");
                push("-global");
                push("driver=cfi.pflash01,property=secure,value=on");
                push("-global");
                push("ICH9-LPC.disable_s3=1");
                push("-drive");
                push(&format!(
                    "if=pflash,format=raw,unit=0,readonly=on,file={}",
                    p(code)
                ));
                push("-drive");
                push(&format!("if=pflash,format=raw,unit=1,file={}", p(&vars)));
            }
            Firmware::Bios => {
                push("-machine");
                push("q35");
            }
        }
        push("-accel");
        match self.accel {
            AccelKind::Kvm => {
                push("kvm");
                push("-cpu");
                push("host");
            }
            AccelKind::Tcg => {
                push("tcg,tb-size=256");
                push("-cpu");
                push("max");
            }
        }
        push("-m");
        push(&self.memory_mib.to_string());
        push("-smp");
        push(&self.cpus.to_string());
        // virtio-scsi-single: one controller per disk, as Proxmox does.
        push("-device");
        push("virtio-scsi-pci,id=scsi0");
        // A validation overlay is thrown away, so guest flushes are skipped;
        // a detached VM's disk lives on after kiln and must survive a host crash.
        let cache = if self.detached { "writeback" } else { "unsafe" };
        push("-drive");
        push(&format!(
            "if=none,id=disk0,format=qcow2,cache={cache},discard=unmap,file={}",
            p(&self.disk)
        ));
        push("-device");
        push("scsi-hd,drive=disk0,bus=scsi0.0,bootindex=1");
        match &self.seed {
            None => {}
            Some(SeedDrive::Disk(seed)) => {
                push("-device");
                push("virtio-scsi-pci,id=scsi1");
                push("-drive");
                push(&format!(
                    "if=none,id=seed,format=raw,readonly=on,file={}",
                    p(seed)
                ));
                push("-device");
                push("scsi-hd,drive=seed,bus=scsi1.0");
            }
            Some(SeedDrive::Cdrom(iso)) => {
                // q35's ICH9 AHCI controller has ports ide.0 to ide.5.
                push("-drive");
                push(&format!(
                    "if=none,id=seed,media=cdrom,format=raw,readonly=on,file={}",
                    p(iso)
                ));
                push("-device");
                push("ide-cd,drive=seed,bus=ide.2");
            }
        }
        match &self.net {
            Net::None => {}
            Net::User { ssh_port } => {
                // restrict=on: the guest reaches nothing outside QEMU; only the
                // explicit forward from 127.0.0.1 into the guest exists.
                push("-netdev");
                push(&format!(
                    "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{ssh_port}-:22"
                ));
                push("-device");
                push("virtio-net-pci,netdev=n0");
            }
            Net::Tap { ifname, mac } => {
                push("-netdev");
                push(&format!(
                    "tap,id=n0,ifname={ifname},script=no,downscript=no"
                ));
                push("-device");
                push(&format!("virtio-net-pci,netdev=n0,mac={mac}"));
            }
        }
        push("-device");
        push("virtio-rng-pci");
        push("-device");
        push("pvpanic");
        push("-qmp");
        push(&format!(
            "unix:{},server=on,wait=off",
            p(&self.qmp_socket())
        ));
        push("-serial");
        push(&format!("file:{}", p(&self.console_path())));
        if self.detached {
            // QEMU forks, and its first process exits only once the guest is
            // set up (or with the reason it could not be), leaving the pid here.
            push("-daemonize");
            push("-pidfile");
            push(&p(&self.pid_path()));
        }
        Ok(a)
    }
}

/// Start a detached QEMU (`spec.detached`): it is not kiln's child, sits in
/// its own session and keeps running after kiln exits. `cmd` is the QEMU
/// program as the caller prepared it (e.g. to enter a network namespace);
/// the arguments and stdio are set here. Returns QEMU's pid once it runs.
pub fn start_detached(spec: &VmSpec, mut cmd: Command) -> Result<u32> {
    if !spec.detached {
        bail!("start_detached needs a spec with `detached` set");
    }
    let args = spec.args()?;
    let stderr = File::create(spec.stderr_path())
        .with_context(|| format!("cannot create {}", spec.stderr_path().display()))?;
    let _ = std::fs::remove_file(spec.pid_path());
    crate::util::term::command_detail(Path::new(cmd.get_program()), &args);
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {program}"))?;
    // The first process waits for the daemon to finish its setup; that is quick.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().context("cannot check on QEMU")? {
            break status;
        }
        if Instant::now() >= deadline || crate::util::interrupted() {
            let _ = child.kill();
            let _ = child.wait();
            crate::util::check_interrupted()?;
            bail!("QEMU did not finish starting within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = std::fs::read_to_string(spec.stderr_path()).unwrap_or_default();
    if !status.success() {
        bail!(
            "QEMU exited ({status}){}",
            if err.trim().is_empty() {
                String::new()
            } else {
                format!(": {}", err.trim())
            }
        );
    }
    let pid = std::fs::read_to_string(spec.pid_path())
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .with_context(|| {
            format!(
                "QEMU started but left no pid in {}",
                spec.pid_path().display()
            )
        })?;
    Ok(pid)
}

/// A running QEMU. Dropping it stops QEMU (QMP quit, then SIGKILL) and reaps it.
pub struct Vm {
    child: Option<Child>,
    pub qmp: Option<QmpClient>,
    pub console: ConsoleLog,
    pub started: Instant,
    stderr_path: PathBuf,
}

impl Vm {
    pub fn start(spec: &VmSpec) -> Result<Vm> {
        if spec.detached {
            bail!("a detached VM is started with start_detached");
        }
        let qemu = hosttools::path_of(hosttools::QEMU_SYSTEM)?;
        let args = spec.args()?;
        let stderr = File::create(spec.stderr_path())?;
        crate::util::term::command_detail(&qemu, &args);
        let mut cmd = Command::new(&qemu);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        // Own process group (a terminal's Ctrl-C reaches kiln, which stops
        // QEMU itself) and die with kiln even if kiln is SIGKILLed.
        unsafe {
            cmd.pre_exec(|| {
                libc::setpgid(0, 0);
                Ok(())
            });
        }
        crate::util::locks::die_with_parent(&mut cmd, libc::SIGKILL);
        let started = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", qemu.display()))?;
        let mut vm = Vm {
            child: Some(child),
            qmp: None,
            console: ConsoleLog::new(&spec.console_path()),
            started,
            stderr_path: spec.stderr_path(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let qmp = {
            let vm_ref = &mut vm;
            let child = vm_ref.child.as_mut().expect("just spawned");
            let stderr_path = vm_ref.stderr_path.clone();
            // A Ctrl-C while QEMU is still starting (slow on a loaded host)
            // must not wait out the deadline.
            QmpClient::connect(&spec.qmp_socket(), deadline, || {
                check_child(child, &stderr_path)?;
                crate::util::check_interrupted()
            })
        };
        let qmp = match qmp {
            Ok(q) => q,
            Err(e) if crate::util::interrupted() => return Err(e),
            Err(e) => {
                // QEMU that dies right after opening its socket says why on
                // stderr; that beats "connection reset".
                for _ in 0..40 {
                    vm.alive()?;
                    std::thread::sleep(Duration::from_millis(50));
                }
                return Err(e);
            }
        };
        vm.qmp = Some(qmp);
        Ok(vm)
    }

    /// Fail if QEMU has exited, quoting its stderr.
    pub fn alive(&mut self) -> Result<()> {
        match self.child.as_mut() {
            Some(child) => check_child(child, &self.stderr_path),
            None => bail!("QEMU was already stopped"),
        }
    }

    /// QEMU's stderr so far (for error messages).
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr_path)
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// Graceful stop: ACPI powerdown, wait up to `grace` for QEMU to exit,
    /// then QMP quit, then SIGKILL. Returns whether the guest stopped by itself.
    pub fn shutdown(&mut self, grace: Duration) -> bool {
        let Some(child) = self.child.as_mut() else {
            return true;
        };
        let mut graceful = false;
        if let Some(qmp) = self.qmp.as_mut() {
            if qmp.powerdown().is_ok() {
                let until = Instant::now() + grace;
                while Instant::now() < until {
                    if let Ok(Some(_)) = child.try_wait() {
                        graceful = true;
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        self.stop();
        graceful
    }

    /// Stop QEMU now: QMP quit, then SIGKILL if it lingers; always reaped.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(None) = child.try_wait() {
            // After Ctrl-C, kill at once: a busy QEMU may take seconds to
            // answer QMP, and the overlay is thrown away anyway.
            if let Some(qmp) = self.qmp.as_mut().filter(|_| !crate::util::interrupted()) {
                let _ = qmp.quit();
            }
            let until = Instant::now() + Duration::from_secs(3);
            while Instant::now() < until {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
        }
        let _ = child.wait();
        self.qmp = None;
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}

fn check_child(child: &mut Child, stderr_path: &Path) -> Result<()> {
    if let Some(status) = child.try_wait().context("cannot check on QEMU")? {
        let err = std::fs::read_to_string(stderr_path).unwrap_or_default();
        let err = err.trim();
        if err.contains("Could not set up host forwarding rule") {
            bail!("QEMU could not forward the SSH port: it is already taken ({err})");
        }
        bail!(
            "QEMU exited ({status}){}",
            if err.is_empty() {
                String::new()
            } else {
                format!(": {err}")
            }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path, fw: Firmware) -> VmSpec {
        VmSpec {
            name: "kiln-validate".into(),
            accel: AccelKind::Tcg,
            firmware: fw,
            disk: dir.join("overlay.qcow2"),
            seed: Some(SeedDrive::Disk(dir.join("seed.img"))),
            net: Net::User { ssh_port: 2222 },
            memory_mib: 2048,
            cpus: 2,
            workdir: dir.to_path_buf(),
            detached: false,
        }
    }

    #[test]
    fn uefi_command_line_enforces_secure_boot_like_proxmox() {
        let dir = tempfile::tempdir().unwrap();
        let vars = dir.path().join("vars-template.fd");
        std::fs::write(&vars, b"vars").unwrap();
        let a = spec(
            dir.path(),
            Firmware::Uefi {
                code: "/usr/share/OVMF/OVMF_CODE_4M.ms.fd".into(),
                vars_template: vars,
            },
        )
        .args()
        .unwrap()
        .join(" ");
        assert!(a.contains("-machine q35,smm=on"), "{a}");
        assert!(
            a.contains("driver=cfi.pflash01,property=secure,value=on"),
            "{a}"
        );
        assert!(
            a.contains("readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.ms.fd"),
            "{a}"
        );
        // The vars are a private copy, never the template itself.
        let copy = dir.path().join("OVMF_VARS.fd");
        assert!(
            a.contains(&format!("unit=1,file={}", copy.display())),
            "{a}"
        );
        assert_eq!(std::fs::read(copy).unwrap(), b"vars");
        assert!(a.contains("virtio-scsi-pci,id=scsi0"), "{a}");
        assert!(a.contains("hostfwd=tcp:127.0.0.1:2222-:22"), "{a}");
        assert!(a.contains("restrict=on"), "{a}");
        assert!(a.contains("-accel tcg"), "{a}");
    }

    #[test]
    fn a_detached_vm_on_a_tap_daemonizes_with_a_pidfile_and_keeps_its_mac() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(dir.path(), Firmware::Bios);
        s.detached = true;
        s.net = Net::Tap {
            ifname: "tap3".into(),
            mac: "52:54:00:12:34:56".into(),
        };
        let a = s.args().unwrap().join(" ");
        assert!(
            a.contains("-netdev tap,id=n0,ifname=tap3,script=no,downscript=no"),
            "{a}"
        );
        assert!(
            a.contains("virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56"),
            "{a}"
        );
        assert!(!a.contains("hostfwd"), "{a}");
        assert!(
            a.contains(&format!(
                "-daemonize -pidfile {}",
                dir.path().join("qemu.pid").display()
            )),
            "{a}"
        );
        assert!(a.contains("cache=writeback"), "{a}");
        // Validation boots stay kiln's children.
        let v = spec(dir.path(), Firmware::Bios).args().unwrap().join(" ");
        assert!(!v.contains("-daemonize"), "{v}");
        assert!(v.contains("cache=unsafe"), "{v}");
    }

    #[test]
    fn bios_command_line_has_no_pflash() {
        let dir = tempfile::tempdir().unwrap();
        let a = spec(dir.path(), Firmware::Bios).args().unwrap().join(" ");
        assert!(!a.contains("pflash"), "{a}");
        assert!(a.contains("-machine q35 "), "{a}");
    }

    #[test]
    fn taken_port_is_refused_with_a_clear_message() {
        let l = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        let err = ensure_port_free(port).unwrap_err();
        assert!(format!("{err:#}").contains(&format!("port 127.0.0.1:{port} is already taken")));
    }

    #[test]
    fn overlay_grows_and_leaves_the_base_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&base)
            .arg("64M")
            .status()
            .unwrap();
        assert!(st.success());
        let before = crate::util::sha256_file(&base).unwrap();
        let overlay = dir.path().join("o.qcow2");
        create_overlay(&base, "qcow2", 64 << 20, 1 << 30, &overlay).unwrap();
        let info = Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&overlay)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(v["virtual-size"], (64u64 << 20) + (1 << 30));
        assert_eq!(crate::util::sha256_file(&base).unwrap(), before);
    }
}
