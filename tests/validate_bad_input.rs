//! `kiln validate` on bad input: clear one-line errors, and no QEMU process
//! or temp file left behind. These need QEMU and OVMF but no built image: a
//! blank qcow2 with a hand-written manifest stands in for one.

use kiln::image::manifest::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A blank 64 MiB qcow2 and a manifest that describes it correctly. It boots
/// (to the firmware's "no bootable device"), but never runs an OS.
fn blank_image(dir: &Path) -> PathBuf {
    blank_image_named(dir, "img")
}

fn blank_image_named(dir: &Path, name: &str) -> PathBuf {
    let img = dir.join(name);
    std::fs::create_dir_all(&img).unwrap();
    let disk = img.join("disk.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("64M")
        .status()
        .unwrap();
    assert!(st.success());
    let sha = kiln::util::sha256_file(&disk).unwrap();
    let m = ImageManifest {
        name: "blank".into(),
        version: "0".into(),
        id: sha.clone(),
        kiln_version: "0.1.0".into(),
        disk: DiskInfo {
            file: "disk.qcow2".into(),
            format: "qcow2".into(),
            sha256: sha,
            size: std::fs::metadata(&disk).unwrap().len(),
            virtual_size: 64 << 20,
            root_fs_uuid: "00000000-0000-0000-0000-000000000000".into(),
        },
        inputs: InputDigests::default(),
        source_date_epoch: 0,
        boot: BootInfo {
            uefi: true,
            secure_boot: true,
            bios: false,
            kernel: "none".into(),
            cmdline: "console=ttyS0".into(),
            chain: vec![],
        },
        packages: Default::default(),
        hygiene: Default::default(),
        stages: vec![],
        roles: vec![],
        validate: ValidateSpec::default(),
        lxc: None,
        sbom: None,
        added_files: vec![],
        validation: None,
    };
    m.save(&img).unwrap();
    img
}

/// Run `kiln validate` with its own TMPDIR so leftovers can be counted.
fn kiln(tmp: &Path, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.arg("validate")
        .args(["--accel", "tcg"])
        .args(args)
        .env("TMPDIR", tmp)
        .env("KILN_NO_PROGRESS", "1")
        .stdin(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_nothing_left(tmp: &Path) {
    let left: Vec<_> = std::fs::read_dir(tmp)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "temp files left behind: {left:?}");
    assert!(qemu_processes_under(tmp).is_empty(), "QEMU left running");
}

/// QEMU processes whose command line mentions `dir` (their temp files).
fn qemu_processes_under(dir: &Path) -> Vec<u32> {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    let c = String::from_utf8_lossy(&c);
                    c.contains("qemu-system") && c.contains(&needle)
                })
                .unwrap_or(false)
        })
        .collect()
}

#[test]
fn a_directory_without_a_manifest_is_not_an_image() {
    let t = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let o = kiln(tmp.path(), &[t.path().to_str().unwrap()], &[]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("is not a kiln image: it has no manifest.json"),
        "{}",
        stderr(&o)
    );
    assert_nothing_left(tmp.path());
}

#[test]
fn a_disk_that_does_not_match_its_digest_is_refused_and_nothing_is_recorded() {
    let t = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let img = blank_image(t.path());
    // Change one byte after the manifest was written.
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(img.join("disk.qcow2"))
        .unwrap();
    f.seek(SeekFrom::Start(1 << 16)).unwrap();
    f.write_all(b"x").unwrap();
    drop(f);
    let o = kiln(tmp.path(), &[img.to_str().unwrap()], &[]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("does not match its manifest"),
        "{}",
        stderr(&o)
    );
    assert_nothing_left(tmp.path());
    // The manifest records nothing about a validation that never ran.
    assert!(ImageManifest::load(&img).unwrap().validation.is_none());
}

#[test]
fn missing_ovmf_firmware_is_named_with_its_package() {
    let t = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let img = blank_image(t.path());
    let o = kiln(
        tmp.path(),
        &[
            img.to_str().unwrap(),
            "--ovmf-code",
            "/nonexistent/OVMF_CODE_4M.ms.fd",
        ],
        &[],
    );
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("missing firmware /nonexistent/OVMF_CODE_4M.ms.fd (apt install ovmf)"),
        "{e}"
    );
    assert_nothing_left(tmp.path());
}

/// Debian 12's ovmf carries Microsoft's 2011 keys only; without virt-fw-vars
/// the 2023 set Proxmox VE 9 enrolls cannot be added, and asking for it says
/// so in one line naming the package, before anything boots.
#[test]
fn asking_for_the_2023_keys_without_virt_fw_vars_names_the_package() {
    let t = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let img = blank_image(t.path());
    // A PATH with QEMU but no virt-fw-vars.
    let bin = t.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    for tool in ["qemu-system-x86_64", "qemu-img"] {
        let real = kiln::util::hosttools::which(tool).expect("QEMU is installed");
        std::os::unix::fs::symlink(real, bin.join(tool)).unwrap();
    }
    let o = kiln(
        tmp.path(),
        &[img.to_str().unwrap(), "--secure-boot-keys", "2023k"],
        &[("PATH", bin.to_str().unwrap())],
    );
    assert!(!o.status.success());
    let e = stderr(&o);
    let line = e
        .lines()
        .find(|l| l.contains("--secure-boot-keys 2023k"))
        .unwrap_or_else(|| panic!("{e}"));
    assert!(
        line.contains(&format!(
            "{} carries only Microsoft's 2011 keys, and missing host tools: virt-fw-vars (apt install python3-virt-firmware",
            kiln::validate::OVMF_VARS
        )),
        "{e}"
    );
    assert!(qemu_processes_under(tmp.path()).is_empty());
    assert_nothing_left(tmp.path());
    assert!(ImageManifest::load(&img).unwrap().validation.is_none());
}

#[test]
fn missing_qemu_is_named_with_its_package() {
    let t = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let img = blank_image(t.path());
    let o = kiln(
        tmp.path(),
        &[img.to_str().unwrap()],
        &[("PATH", "/nonexistent")],
    );
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("qemu-system-x86_64 (apt install qemu-system-x86)"),
        "{e}"
    );
    assert_nothing_left(tmp.path());
}

#[test]
fn a_taken_ssh_port_is_refused_with_a_clear_error() {
    let t = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let img = blank_image(t.path());
    let l = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = l.local_addr().unwrap().port().to_string();
    let o = kiln(
        tmp.path(),
        &[img.to_str().unwrap(), "--ssh-port", &port],
        &[],
    );
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains(&format!("port 127.0.0.1:{port} is already taken")),
        "{e}"
    );
    assert_nothing_left(tmp.path());
}

#[test]
fn a_guest_that_never_boots_fails_within_the_timeout_showing_the_console() {
    let t = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let img = blank_image(t.path());
    let junit = t.path().join("junit.xml");
    let started = Instant::now();
    let o = kiln(
        tmp.path(),
        &[
            img.to_str().unwrap(),
            "--boot-timeout",
            "40",
            "--junit",
            junit.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!o.status.success());
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    let e = stderr(&o);
    assert!(
        e.contains("the guest never answered SSH within 40 s"),
        "{e}"
    );
    assert!(e.contains("last 50 serial console lines:"), "{e}");
    // OVMF finds nothing to boot on a blank disk and says so on the console.
    assert!(e.contains("BdsDxe"), "{e}");
    assert_nothing_left(tmp.path());
    let m = ImageManifest::load(&img).unwrap();
    let v = m.validation.expect("a failed validation is recorded");
    assert!(!v.validated);
    assert_eq!(v.accel, "tcg");
    assert_eq!(
        m.id,
        kiln::util::sha256_file(&img.join("disk.qcow2")).unwrap()
    );
    let x = std::fs::read_to_string(&junit).unwrap();
    assert!(
        x.contains("<testcase classname=") && x.contains("name=\"boot to SSH\""),
        "{x}"
    );
    assert!(
        x.contains("<failure message=\"the guest never answered SSH within 40 s"),
        "{x}"
    );
}

#[test]
fn ctrl_c_stops_qemu_and_removes_temp_files() {
    let t = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let img = blank_image(t.path());
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["validate", "--accel", "tcg", "--boot-timeout", "120"])
        .arg(&img)
        .env("TMPDIR", tmp.path())
        .env("KILN_NO_PROGRESS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    while qemu_processes_under(tmp.path()).is_empty() {
        assert!(Instant::now() < until, "QEMU never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let until = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < until, "kiln did not stop after SIGINT");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    let mut err = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("interrupted"), "{err}");
    assert_nothing_left(tmp.path());
}

#[test]
fn j2_boots_two_images_at_once_and_reports_both() {
    let t = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let a = blank_image_named(t.path(), "a");
    let b = blank_image_named(t.path(), "b");
    let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "validate",
            "--accel",
            "tcg",
            "--boot-timeout",
            "10",
            "--json",
            "-j",
            "2",
        ])
        .arg(&a)
        .arg(&b)
        .env("TMPDIR", tmp.path())
        .env("KILN_NO_PROGRESS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut most = 0;
    while std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
    {
        most = most.max(qemu_processes_under(tmp.path()).len());
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = child.wait_with_output().unwrap();
    assert!(!o.status.success());
    assert_eq!(most, 2, "both guests should run at the same time");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let images = v["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    for (r, dir) in images.iter().zip([&a, &b]) {
        assert_eq!(r["image"], dir.display().to_string());
        assert_eq!(r["validated"], false);
        assert!(
            r["error"]
                .as_str()
                .unwrap()
                .contains("never answered SSH within 10 s"),
            "{r}"
        );
    }
    assert!(
        stderr(&o).contains("2 of 2 images failed validation"),
        "{}",
        stderr(&o)
    );
    assert_nothing_left(tmp.path());
}
