//! `kiln validate`: boot an image in QEMU the way Proxmox does and prove it
//! works (QMP control, serial-console scan, checks over SSH).
//!
//! The library entry is [`validate_image`]; `kiln build` calls it at its end and
//! the `kiln validate` verb ([`run`]) calls it once per image directory.

pub(crate) mod checks;
pub(crate) mod console;
pub mod efivars;
pub mod keys;
pub mod qemu;
pub(crate) mod qmp;
pub(crate) mod report;
pub(crate) mod seed;
pub mod ssh;

use crate::image::manifest::{CheckOutcome, CheckSpec, ImageManifest, ValidationRecord};
use crate::util::round2;
use anyhow::{bail, Context, Result};
use checks::BootFacts;
use qemu::{AccelKind, Firmware, Vm, VmSpec};
use report::ImageResult;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.ms.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.ms.fd";
pub(crate) const OVMF_PACKAGE: &str = "ovmf";

/// `--accel`: which accelerator to use.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Accel {
    /// Probe KVM with a short real boot; fall back to TCG if it fails.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// How to validate; `Default` is what `kiln build` uses.
#[derive(Debug, Clone)]
pub struct ValidateOptions {
    pub accel: Accel,
    /// From QEMU start until SSH answers.
    pub boot_timeout: Duration,
    /// For `cloud-init status --wait` once SSH answers.
    pub cloud_init_timeout: Duration,
    /// How long the guest may take to power off after `system_powerdown`.
    pub shutdown_grace: Duration,
    /// How long the KVM probe waits for the kernel to start.
    pub kvm_probe_timeout: Duration,
    pub ssh_port: Option<u16>,
    pub ssh_user: String,
    pub ovmf_code: PathBuf,
    pub ovmf_vars: PathBuf,
    /// Microsoft key sets to boot UEFI with, once each ([`efivars::choose`]).
    pub secure_boot_keys: Vec<efivars::SecureBootKeys>,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Bytes added to the disk's virtual size in the overlay, so the
    /// "root filesystem grown" check sees growth.
    pub grow_disk: u64,
    /// Check the disk's sha256 against the manifest before booting.
    pub verify_digest: bool,
    /// Copy the serial console log of each boot into this directory.
    pub console_dir: Option<PathBuf>,
    /// Write the result into manifest.json.
    pub record: bool,
    /// Draw a spinner on stderr.
    pub progress: bool,
}

impl Default for ValidateOptions {
    fn default() -> Self {
        Self {
            accel: Accel::Auto,
            boot_timeout: Duration::from_secs(300),
            cloud_init_timeout: Duration::from_secs(300),
            shutdown_grace: Duration::from_secs(30),
            kvm_probe_timeout: Duration::from_secs(30),
            ssh_port: None,
            ssh_user: "debian".into(),
            ovmf_code: OVMF_CODE.into(),
            ovmf_vars: OVMF_VARS.into(),
            secure_boot_keys: vec![efivars::SecureBootKeys::Auto],
            memory_mib: 2048,
            cpus: 2,
            grow_disk: 1 << 30,
            verify_digest: true,
            console_dir: None,
            record: true,
            progress: false,
        }
    }
}

/// Validation ran and the image failed it. The record (also saved in the
/// manifest) is attached: `err.downcast_ref::<ValidationFailed>()`.
#[derive(Debug, thiserror::Error)]
#[error("{image} failed validation: {reason}")]
pub struct ValidationFailed {
    pub image: String,
    pub reason: String,
    pub record: ValidationRecord,
}

use crate::util::interrupted;

fn bail_if_interrupted() -> Result<()> {
    crate::util::check_interrupted()
}

/// The accelerator chosen and why.
#[derive(Debug, Clone)]
pub struct AccelChoice {
    pub kind: AccelKind,
    pub reason: String,
}

/// Boot the image in `image_dir`, run its checks, record the result in its
/// manifest.json (the `id` never changes) and return the record. Fails with
/// [`ValidationFailed`] when the image fails, with a plain error when it
/// could not be validated at all (bad input, missing QEMU or firmware).
pub fn validate_image(image_dir: &Path, opts: &ValidateOptions) -> Result<ValidationRecord> {
    let mut manifest = ImageManifest::load(image_dir)?;
    let disk = manifest.disk_path(image_dir);
    if !disk.is_file() {
        bail!(
            "{} names disk {} but it does not exist",
            image_dir
                .join(crate::image::manifest::MANIFEST_FILE)
                .display(),
            disk.display()
        );
    }
    checks::check_specs(&manifest.validate.checks)
        .with_context(|| format!("{}: bad recipe checks", image_dir.display()))?;
    crate::util::hosttools::require(&[
        crate::util::hosttools::QEMU_SYSTEM,
        crate::util::hosttools::QEMU_IMG,
    ])?;
    let mut modes = Vec::new();
    // Holds a vars store with the 2023 keys enrolled, while the boots run.
    let scratch = workdir()?;
    if manifest.boot.uefi {
        for f in [&opts.ovmf_code, &opts.ovmf_vars] {
            crate::util::hosttools::firmware(&[f.to_str().unwrap_or_default()], OVMF_PACKAGE)?;
        }
        let chosen = efivars::choose(&opts.secure_boot_keys, &opts.ovmf_vars, scratch.path())?;
        let several = chosen.len() > 1;
        for c in chosen {
            if let Some(note) = &c.note {
                static SAID: AtomicBool = AtomicBool::new(false);
                if !SAID.swap(true, Ordering::SeqCst) {
                    eprintln!("{note}");
                }
            }
            modes.push(Mode {
                label: match c.keys {
                    Some(k) if several => format!("uefi {}", k.label()),
                    _ => "uefi".into(),
                },
                firmware: Firmware::Uefi {
                    code: opts.ovmf_code.clone(),
                    vars_template: c.vars,
                },
                keys: c.keys,
            });
        }
    }
    if manifest.boot.bios {
        modes.push(Mode {
            label: "bios".into(),
            firmware: Firmware::Bios,
            keys: None,
        });
    }
    if modes.is_empty() {
        bail!(
            "{}: the manifest enables neither UEFI nor BIOS boot",
            image_dir.display()
        );
    }
    if let Some(port) = opts.ssh_port {
        qemu::ensure_port_free(port)?;
    }
    // The digest is computed while the guest boots (it is read-only work on
    // the image); a mismatch stops the boot and nothing is recorded.
    let mut digest = DigestCheck::start(&manifest, image_dir, opts.verify_digest);
    bail_if_interrupted()?;
    let accel = resolve_accel(opts.accel, &manifest, image_dir, &modes[0].firmware, opts)?;

    let mut all_checks = Vec::new();
    let mut first: Option<(Option<f64>, Option<f64>)> = None;
    let mut failure: Option<String> = None;
    for mode in &modes {
        let b = boot_and_check(
            &manifest,
            image_dir,
            mode,
            accel.kind,
            opts,
            modes.len() > 1,
            &mut digest,
        )?;
        first.get_or_insert((b.ssh_seconds, b.cloud_init_seconds));
        if failure.is_none() {
            failure = b.failure.clone();
        }
        all_checks.extend(b.checks);
    }
    digest.wait()?;
    let (ssh_s, ci_s) = first.unwrap_or((None, None));
    let validated = failure.is_none() && all_checks.iter().all(|c| c.passed);
    let record = ValidationRecord {
        validated,
        when: crate::util::now_rfc3339(),
        kiln_version: env!("CARGO_PKG_VERSION").to_string(),
        accel: accel.kind.as_str().to_string(),
        secure_boot_keys: modes
            .iter()
            .filter_map(|m| m.keys.map(|k| k.label().to_string()))
            .collect(),
        boot_to_ssh_seconds: ssh_s.map(round2),
        boot_to_cloud_init_seconds: ci_s.map(round2),
        checks: all_checks,
    };
    if opts.record {
        manifest.validation = Some(record.clone());
        manifest
            .save(image_dir)
            .with_context(|| format!("cannot record the validation in {}", image_dir.display()))?;
    }
    if !validated {
        let reason = failure.unwrap_or_else(|| {
            let failed: Vec<String> = record
                .checks
                .iter()
                .filter(|c| !c.passed)
                .map(
                    |c| match c.detail.as_deref().and_then(|d| d.lines().next()) {
                        Some(why) => format!("{} ({why})", c.name),
                        None => c.name.clone(),
                    },
                )
                .collect();
            format!("failed checks: {}", failed.join(", "))
        });
        return Err(ValidationFailed {
            image: image_dir.display().to_string(),
            reason,
            record,
        }
        .into());
    }
    Ok(record)
}

/// Choose the accelerator. `auto` probes KVM once per process with a real
/// short boot of the image and falls back to TCG, saying why.
pub fn resolve_accel(
    requested: Accel,
    manifest: &ImageManifest,
    image_dir: &Path,
    firmware: &Firmware,
    opts: &ValidateOptions,
) -> Result<AccelChoice> {
    match requested {
        Accel::Tcg => Ok(AccelChoice {
            kind: AccelKind::Tcg,
            reason: "requested with --accel tcg".into(),
        }),
        Accel::Kvm => {
            kvm_device_usable().context("--accel kvm was requested")?;
            Ok(AccelChoice {
                kind: AccelKind::Kvm,
                reason: "requested with --accel kvm".into(),
            })
        }
        Accel::Auto => {
            static PROBED: Mutex<Option<AccelChoice>> = Mutex::new(None);
            let mut cached = PROBED.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = cached.as_ref() {
                return Ok(c.clone());
            }
            let choice = match probe_kvm(manifest, image_dir, firmware, opts) {
                Ok(()) => AccelChoice {
                    kind: AccelKind::Kvm,
                    reason: "auto: a KVM probe boot reached the kernel".into(),
                },
                Err(why) => {
                    bail_if_interrupted()?;
                    AccelChoice {
                        kind: AccelKind::Tcg,
                        reason: format!("auto: falling back to TCG because {why:#}"),
                    }
                }
            };
            *cached = Some(choice.clone());
            Ok(choice)
        }
    }
}

fn kvm_device_usable() -> Result<()> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .context("/dev/kvm cannot be opened")
}

/// Boot the image under KVM (no network, no seed) and wait for the kernel's
/// first console line. On some hosts /dev/kvm exists but guests hang.
fn probe_kvm(
    manifest: &ImageManifest,
    image_dir: &Path,
    firmware: &Firmware,
    opts: &ValidateOptions,
) -> Result<()> {
    kvm_device_usable()?;
    let work = workdir()?;
    let overlay = work.path().join("probe.qcow2");
    qemu::create_overlay(
        &manifest.disk_path(image_dir),
        &manifest.disk.format,
        manifest.disk.virtual_size,
        0,
        &overlay,
    )?;
    let spec = VmSpec {
        name: "kiln-validate".into(),
        accel: AccelKind::Kvm,
        firmware: firmware.clone(),
        disk: overlay,
        seed: None,
        net: qemu::Net::None,
        memory_mib: opts.memory_mib,
        cpus: opts.cpus,
        workdir: work.path().to_path_buf(),
        detached: false,
    };
    let pb = crate::util::progress::spinner(opts.progress, "probing KVM with a short boot");
    let mut vm = Vm::start(&spec).context("QEMU would not start with KVM")?;
    let limit = opts.kvm_probe_timeout;
    let result = loop {
        if let Err(e) = vm.alive() {
            break Err(e);
        }
        if vm.console.contains("Linux version") {
            break Ok(());
        }
        if interrupted() {
            break Err(crate::util::interrupt::Interrupted.into());
        }
        if vm.started.elapsed() >= limit {
            break Err(anyhow::anyhow!(
                "a KVM guest did not reach the kernel within {} s (KVM guests hang on this host)",
                limit.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    vm.stop();
    pb.finish_and_clear();
    result
}

fn workdir() -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("kiln-validate-")
        .tempdir()
        .context("cannot create a temp directory for the validation boot")
}

/// The disk's sha256 check, running on its own thread.
struct DigestCheck {
    handle: Option<std::thread::JoinHandle<Result<()>>>,
    /// Set once the thread finished: `Err(message)` on a mismatch.
    done: Option<Result<(), String>>,
}

impl DigestCheck {
    fn start(manifest: &ImageManifest, image_dir: &Path, enabled: bool) -> Self {
        if !enabled {
            return Self {
                handle: None,
                done: Some(Ok(())),
            };
        }
        let (m, dir) = (manifest.clone(), image_dir.to_path_buf());
        Self {
            handle: Some(std::thread::spawn(move || m.verify_disk(&dir))),
            done: None,
        }
    }

    fn collect(&mut self) {
        if let Some(h) = self.handle.take() {
            self.done = Some(match h.join() {
                Ok(r) => r.map_err(|e| format!("{e:#}")),
                Err(_) => Err("the disk digest check crashed".into()),
            });
        }
    }

    /// Fail if the check already finished with a mismatch; never blocks.
    fn poll(&mut self) -> Result<()> {
        if self.handle.as_ref().is_some_and(|h| h.is_finished()) {
            self.collect();
        }
        match &self.done {
            Some(Err(e)) => bail!("{e}"),
            _ => Ok(()),
        }
    }

    /// Wait for the check and fail on a mismatch.
    fn wait(&mut self) -> Result<()> {
        self.collect();
        self.poll()
    }
}

/// One way the image is booted: a firmware, for UEFI with the Microsoft key
/// set its vars carry, and the label its checks get when there are several.
struct Mode {
    firmware: Firmware,
    keys: Option<efivars::KeySet>,
    label: String,
}

struct BootResult {
    checks: Vec<CheckOutcome>,
    ssh_seconds: Option<f64>,
    cloud_init_seconds: Option<f64>,
    /// Why the boot itself failed (panic, hang, QEMU exit), with console tail.
    failure: Option<String>,
}

fn random_suffix() -> String {
    use ssh_key::rand_core::{OsRng, RngCore};
    format!("{:08x}", OsRng.next_u32())
}

/// One boot of the image with one firmware: boot, wait for SSH, wait for
/// cloud-init, run the checks, scan the console, power off.
#[allow(clippy::too_many_arguments)]
fn boot_and_check(
    manifest: &ImageManifest,
    image_dir: &Path,
    mode: &Mode,
    accel: AccelKind,
    opts: &ValidateOptions,
    label_checks: bool,
    digest: &mut DigestCheck,
) -> Result<BootResult> {
    let firmware = &mode.firmware;
    let fw = mode.label.as_str();
    let name = |n: &str| {
        if label_checks {
            format!("{fw}: {n}")
        } else {
            n.to_string()
        }
    };
    let work = workdir()?;
    let key = keys::ThrowawayKey::generate("kiln-validate")?;
    let suffix = random_suffix();
    let hostname = format!("kiln-validate-{suffix}");
    let seed_path = work.path().join("seed.img");
    seed::Seed {
        instance_id: format!("kiln-validate-{suffix}"),
        hostname: hostname.clone(),
        public_keys: vec![key.public_openssh().to_string()],
        user_data: manifest
            .validate
            .user_data
            .clone()
            .unwrap_or_else(|| seed::MINIMAL_USER_DATA.to_string()),
        network_config: None,
    }
    .write(&seed_path)?;
    let overlay = work.path().join("overlay.qcow2");
    qemu::create_overlay(
        &manifest.disk_path(image_dir),
        &manifest.disk.format,
        manifest.disk.virtual_size,
        opts.grow_disk,
        &overlay,
    )?;

    let pb = crate::util::progress::spinner(
        opts.progress,
        format!("{}: booting ({fw}, {})", manifest.name, accel.as_str()),
    );
    let mut attempts = 0;
    let (mut vm, port) = loop {
        attempts += 1;
        let port = match opts.ssh_port {
            Some(p) => p,
            None => qemu::free_port()?,
        };
        let spec = VmSpec {
            name: "kiln-validate".into(),
            accel,
            firmware: firmware.clone(),
            disk: overlay.clone(),
            seed: Some(qemu::SeedDrive::Disk(seed_path.clone())),
            net: qemu::Net::User { ssh_port: port },
            memory_mib: opts.memory_mib,
            cpus: opts.cpus,
            workdir: work.path().to_path_buf(),
            detached: false,
        };
        match Vm::start(&spec) {
            Ok(vm) => break (vm, port),
            // Another process took the free port between our check and QEMU's bind.
            Err(e)
                if opts.ssh_port.is_none()
                    && attempts < 3
                    && format!("{e:#}").contains("already taken") =>
            {
                continue
            }
            Err(e) => return Err(e),
        }
    };

    let mut result = BootResult {
        checks: Vec::new(),
        ssh_seconds: None,
        cloud_init_seconds: None,
        failure: None,
    };
    let outcome = drive_guest(
        &mut vm,
        port,
        &key,
        &hostname,
        manifest,
        mode,
        opts,
        &pb,
        &name,
        &mut result,
        digest,
    );
    if let Some(dir) = &opts.console_dir {
        let _ = std::fs::create_dir_all(dir);
        let _ = std::fs::copy(
            vm.console.path(),
            dir.join(format!(
                "{}-{}-{}-{suffix}.log",
                manifest.name,
                manifest.version,
                fw.replace(' ', "-")
            )),
        );
    }
    match outcome {
        // A boot that never came up is stopped at once, not politely.
        Ok(()) if result.failure.is_some() => vm.stop(),
        Ok(()) => {
            pb.set_message(format!("{}: powering off", manifest.name));
            let t = Instant::now();
            let graceful = vm.shutdown(opts.shutdown_grace);
            result.checks.push(CheckOutcome {
                name: name("powers off on ACPI request"),
                passed: graceful,
                seconds: round2(t.elapsed().as_secs_f64()),
                detail: (!graceful).then(|| {
                    format!(
                        "the guest did not power off within {} s of system_powerdown; QEMU was stopped",
                        opts.shutdown_grace.as_secs()
                    )
                }),
            });
        }
        Err(e) => {
            vm.stop();
            pb.finish_and_clear();
            bail_if_interrupted()?;
            return Err(e);
        }
    }
    pb.finish_and_clear();
    Ok(result)
}

#[allow(clippy::too_many_arguments)]
fn drive_guest(
    vm: &mut Vm,
    port: u16,
    key: &keys::ThrowawayKey,
    hostname: &str,
    manifest: &ImageManifest,
    mode: &Mode,
    opts: &ValidateOptions,
    pb: &indicatif::ProgressBar,
    name: &dyn Fn(&str) -> String,
    result: &mut BootResult,
    digest: &mut DigestCheck,
) -> Result<()> {
    // 1. Wait for SSH, watching QEMU, QMP events and the console.
    pb.set_message(format!("{}: waiting for SSH", manifest.name));
    let mut last_attempt: Option<Instant> = None;
    let mut last_ssh_error = String::from("no attempt yet");
    let mut resets = 0usize;
    let mut guest = loop {
        bail_if_interrupted()?;
        digest.poll()?;
        // A boot that fails is recorded as the failed "boot to SSH" check.
        let why = match boot_problem(vm, &mut resets)? {
            Some(why) => Some(why),
            None if vm.started.elapsed() >= opts.boot_timeout => Some(format!(
                "the guest never answered SSH within {} s (last attempt: {last_ssh_error})",
                opts.boot_timeout.as_secs()
            )),
            None => None,
        };
        if let Some(why) = why {
            let failure = format!(
                "{why}\nlast 50 serial console lines:\n{}",
                vm.console.tail(50)
            );
            result.checks.push(CheckOutcome {
                name: name("boot to SSH"),
                passed: false,
                seconds: round2(vm.started.elapsed().as_secs_f64()),
                detail: Some(failure.clone()),
            });
            result.failure = Some(failure);
            return Ok(());
        }
        if last_attempt.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            last_attempt = Some(Instant::now());
            match ssh::Guest::connect(port, &opts.ssh_user, key, Duration::from_secs(5)) {
                Ok(g) => break g,
                Err(e) => last_ssh_error = format!("{e:#}"),
            }
        } else {
            std::thread::sleep(Duration::from_millis(250));
        }
    };
    let ssh_s = vm.started.elapsed().as_secs_f64();
    result.ssh_seconds = Some(ssh_s);
    result.checks.push(CheckOutcome {
        name: name("boot to SSH"),
        passed: true,
        seconds: round2(ssh_s),
        detail: None,
    });

    // 2. cloud-init must finish without errors.
    pb.set_message(format!("{}: waiting for cloud-init", manifest.name));
    let ci_spec = CheckSpec {
        name: name("cloud-init done without errors"),
        command: "cloud-init status --wait --long".into(),
        exit: 0,
        stdout: Some("(?m)^status: done$".into()),
        timeout: opts.cloud_init_timeout.as_secs().max(1),
    };
    let ci = run_checks(&mut guest, key, vm, std::slice::from_ref(&ci_spec), false)?
        .pop()
        .expect("one check");
    if ci.passed {
        result.cloud_init_seconds = Some(vm.started.elapsed().as_secs_f64());
    }
    result.checks.push(ci);

    // 3. Default checks and the recipe's, all at once (they are independent).
    let facts = BootFacts {
        hostname: checks::expected_hostname(manifest.validate.user_data.as_deref(), hostname),
        secure_boot: manifest.boot.secure_boot && matches!(mode.firmware, Firmware::Uefi { .. }),
    };
    let mut specs = checks::default_checks(&facts);
    // Prove the firmware booted with the key set it was given.
    if let (true, Some(k)) = (facts.secure_boot, mode.keys) {
        specs.insert(2.min(specs.len()), efivars::guest_check(k));
    }
    for mut s in manifest.validate.checks.iter().cloned() {
        s.name = format!("recipe: {}", s.name);
        specs.push(s);
    }
    for spec in specs.iter_mut() {
        spec.name = name(&spec.name);
    }
    pb.set_message(format!("{}: running {} checks", manifest.name, specs.len()));
    result
        .checks
        .extend(run_checks(&mut guest, key, vm, &specs, true)?);

    // 4. The console must be free of Oopses, OOM kills and failed units.
    vm.console.poll();
    vm.console.scanner.finish();
    let findings: Vec<String> = vm
        .console
        .scanner
        .findings
        .iter()
        .map(|f| f.to_string())
        .collect();
    result.checks.push(CheckOutcome {
        name: name("serial console clean"),
        passed: findings.is_empty(),
        seconds: 0.0,
        detail: (!findings.is_empty()).then(|| findings.join("\n")),
    });
    Ok(())
}

/// Something that ends the boot: QEMU gone, a fatal QMP event, a panic or an
/// emergency shell on the console, or a guest stuck in a reset loop.
fn boot_problem(vm: &mut Vm, resets: &mut usize) -> Result<Option<String>> {
    if let Err(e) = vm.alive() {
        return Ok(Some(format!("{e:#}")));
    }
    vm.console.poll();
    if let Some(f) = vm.console.scanner.fatal() {
        return Ok(Some(format!("{}: {}", f.kind, f.line)));
    }
    if let Some(qmp) = vm.qmp.as_mut() {
        let (state, events) = qmp.status()?;
        for e in &events {
            if e.is_fatal() {
                return Ok(Some(e.describe()));
            }
            if e.name == "RESET" {
                *resets += 1;
            }
        }
        if *resets > 5 {
            return Ok(Some(format!(
                "the guest reset {resets} times (a reset loop)"
            )));
        }
        if matches!(
            state.as_str(),
            "guest-panicked" | "internal-error" | "shutdown"
        ) {
            return Ok(Some(format!("QEMU reports the guest as `{state}`")));
        }
    }
    Ok(None)
}

/// Run checks over SSH concurrently and judge them. A dropped SSH
/// connection is a failed check (the guest may have crashed; a crash shown on
/// the console is named). After a timeout the session is replaced.
fn run_checks(
    guest: &mut ssh::Guest,
    key: &keys::ThrowawayKey,
    vm: &mut Vm,
    specs: &[CheckSpec],
    as_root: bool,
) -> Result<Vec<CheckOutcome>> {
    let commands: Vec<(String, Duration)> = specs
        .iter()
        .map(|spec| {
            let command = if as_root {
                checks::remote_command(spec)
            } else {
                spec.command.clone()
            };
            (command, Duration::from_secs(spec.timeout + 10))
        })
        .collect();
    let results = guest.run_many(&commands, &interrupted);
    bail_if_interrupted()?;
    let mut reconnect = false;
    let mut outcomes = Vec::new();
    for (spec, r) in specs.iter().zip(results) {
        match r {
            Ok(mut r) => {
                // `timeout` inside the guest exits 124 when it had to stop the command.
                if as_root && r.exit == Some(124) && r.seconds >= spec.timeout as f64 {
                    r.timed_out = true;
                }
                reconnect |= r.exit.is_none();
                outcomes.push(checks::evaluate(spec, &r));
            }
            Err(e) => {
                reconnect = true;
                let mut resets = 0;
                let crash = boot_problem(vm, &mut resets).ok().flatten();
                outcomes.push(CheckOutcome {
                    name: spec.name.clone(),
                    passed: false,
                    seconds: 0.0,
                    detail: Some(match crash {
                        Some(c) => format!(
                            "{e:#}; {c}\nlast 50 serial console lines:\n{}",
                            vm.console.tail(50)
                        ),
                        None => format!("{e:#}"),
                    }),
                });
            }
        }
    }
    if reconnect {
        // The old session may still be busy; later checks get a new one.
        if let Err(e) = guest.reconnect(key, Duration::from_secs(10)) {
            if let Some(last) = outcomes.iter_mut().rev().find(|o| !o.passed) {
                let d = last.detail.get_or_insert_with(String::new);
                d.push_str(&format!("\nand SSH could not reconnect afterwards: {e:#}"));
            }
        }
    }
    Ok(outcomes)
}

/// Validate several images, `jobs` at a time. Never fails as a whole: each
/// image's error is in its result.
pub fn validate_many(
    images: &[PathBuf],
    opts: &ValidateOptions,
    jobs: usize,
    say: bool,
) -> Vec<ImageResult> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Mutex<Vec<Option<ImageResult>>> = Mutex::new(vec![None; images.len()]);
    let accel_said = AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(image) = images.get(i) else { break };
                let opts = opts.clone();
                // Probe once, say once, then give every boot the same choice.
                if opts.accel == Accel::Auto {
                    if let Ok(m) = ImageManifest::load(image) {
                        let fw = if m.boot.uefi {
                            Firmware::Uefi {
                                code: opts.ovmf_code.clone(),
                                vars_template: opts.ovmf_vars.clone(),
                            }
                        } else {
                            Firmware::Bios
                        };
                        if m.disk_path(image).is_file() {
                            if let Ok(c) = resolve_accel(Accel::Auto, &m, image, &fw, &opts) {
                                if say && !accel_said.swap(true, Ordering::SeqCst) {
                                    eprintln!("accel: {} ({})", c.kind.as_str(), c.reason);
                                }
                            }
                        }
                    }
                }
                if say && jobs > 1 {
                    eprintln!("validating {}", image.display());
                }
                let r = match validate_image(image, &opts) {
                    Ok(record) => ImageResult {
                        image: image.display().to_string(),
                        validated: true,
                        record: Some(record),
                        error: None,
                    },
                    Err(e) => {
                        let record = e
                            .downcast_ref::<ValidationFailed>()
                            .map(|f| f.record.clone());
                        ImageResult {
                            image: image.display().to_string(),
                            validated: false,
                            record,
                            error: Some(format!("{e:#}")),
                        }
                    }
                };
                results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r);
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .map(|r| r.expect("every image was validated"))
        .collect()
}
