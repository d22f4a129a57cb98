//! End-to-end BIOS boot: build a copy of recipes/tiny.toml with `[boot] bios = true`
//! and boot the same hybrid disk under SeaBIOS and under OVMF with Secure Boot.
//! Needs root, Debian's mirror, grub-common, qemu-system-x86 and ovmf, as CI has.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

struct Built {
    disk: PathBuf,
    manifest: serde_json::Value,
    cache: PathBuf,
    dir: PathBuf,
}

/// The base rootfs cache all BIOS test builds share (content-addressed and
/// verified by kiln, so it is safe to keep between runs).
fn shared_cache() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bios-cache")
}

fn built() -> &'static Built {
    static B: OnceLock<Built> = OnceLock::new();
    B.get_or_init(|| {
        let dir = scratch("bios-e2e");
        let project = project_copy(&dir.join("project"));
        let tiny = std::fs::read_to_string(project.join("recipes/tiny.toml")).unwrap();
        let recipe = tiny
            .replace("name = \"tiny\"", "name = \"tiny-bios\"")
            .replace("KILN_IMAGE_NAME=tiny ", "KILN_IMAGE_NAME=tiny-bios ")
            + "\n[boot]\nbios = true\n";
        assert!(recipe.contains("name = \"tiny-bios\""), "{recipe}");
        std::fs::write(project.join("recipes/tiny-bios.toml"), recipe).unwrap();
        // Start from tiny's committed lock: the same SOURCE_DATE_EPOCH every run,
        // so the base rootfs (with grub-pc-bin) is built once per cache.
        std::fs::copy(
            repo().join("recipes/tiny.toml.lock"),
            project.join("recipes/tiny-bios.toml.lock"),
        )
        .unwrap();
        let cache = shared_cache();
        ok(kiln(&project, &cache, &["lock", "recipes/tiny-bios.toml"]));
        let out = ok(kiln(
            &project,
            &cache,
            &[
                "build",
                "recipes/tiny-bios.toml",
                "--out",
                "images",
                "--no-validate",
                "--json",
            ],
        ));
        let manifest_path = project.join(json(&out)["manifest"].as_str().unwrap());
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
        let disk = manifest_path
            .parent()
            .unwrap()
            .join(manifest["disk"]["file"].as_str().unwrap());
        Built {
            disk,
            manifest,
            cache,
            dir,
        }
    })
}

/// The raw disk of the built image, converted once.
fn raw() -> &'static PathBuf {
    static R: OnceLock<PathBuf> = OnceLock::new();
    R.get_or_init(|| {
        let b = built();
        let raw = b.dir.join("disk.raw");
        let st = Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&b.disk)
            .arg(&raw)
            .status()
            .unwrap();
        assert!(st.success());
        raw
    })
}

fn partitions(raw: &Path) -> Vec<serde_json::Value> {
    let out = Command::new("sfdisk").arg("-J").arg(raw).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .clone()
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

#[test]
fn bios_image_has_esp_then_bios_boot_then_root_last() {
    let m = &built().manifest;
    assert_eq!(m["boot"]["bios"], true);
    assert_eq!(m["boot"]["secure_boot"], true);
    let parts = partitions(raw());
    let types: Vec<&str> = parts.iter().map(|p| p["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            kiln::disk::ESP_TYPE,
            kiln::disk::BIOS_BOOT_TYPE,
            kiln::disk::ROOT_TYPE
        ],
        "{parts:?}"
    );
    let end = |p: &serde_json::Value| p["start"].as_u64().unwrap() + p["size"].as_u64().unwrap();
    assert!(end(&parts[0]) <= parts[1]["start"].as_u64().unwrap());
    assert!(end(&parts[1]) <= parts[2]["start"].as_u64().unwrap());
}

#[test]
fn protective_mbr_carries_grub_pointing_at_the_bios_boot_partition() {
    let parts = partitions(raw());
    let bios_lba = parts[1]["start"].as_u64().unwrap();
    let mbr = read_at(raw(), 0, 512);
    assert_eq!(&mbr[0x5c..0x64], &bios_lba.to_le_bytes(), "core.img LBA");
    assert_eq!(mbr[0x1c2], 0xee, "protective GPT entry kept");
    assert_eq!(&mbr[510..], &[0x55, 0xaa]);
    assert_ne!(&mbr[..0x5c], &[0u8; 0x5c][..], "boot code present");
}

#[test]
fn bios_boot_bytes_are_a_pure_function_of_the_image_grub() {
    // Make core.img twice from the base rootfs's grub-pc-bin: same bytes, and
    // exactly the bytes the build put into the BIOS boot partition.
    let b = built();
    let key = b.manifest["inputs"]["base_rootfs_key"].as_str().unwrap();
    let tar = b.cache.join("rootfs").join(format!("{key}.tar"));
    let info = kiln::compose::index_base(&tar, &kiln::disk::bios::wanted).unwrap();
    let one = kiln::disk::bios::make(&info.captured, &b.dir).unwrap();
    let two = kiln::disk::bios::make(&info.captured, &b.dir).unwrap();
    assert_eq!(one.core_img, two.core_img, "grub-mkimage is deterministic");
    let parts = partitions(raw());
    let lba = parts[1]["start"].as_u64().unwrap();
    let core = kiln::disk::bios::patch_core_img(&one.core_img, lba).unwrap();
    assert_eq!(read_at(raw(), lba * 512, core.len()), core);
}

/// A QEMU guest killed when dropped (the disk is opened with -snapshot, so the
/// image is never written).
struct Guest {
    child: Child,
    serial: PathBuf,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn boot(name: &str, firmware: &[String]) -> Guest {
    let b = built();
    let serial = b.dir.join(format!("{name}-serial.log"));
    let _ = std::fs::remove_file(&serial);
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-m", "1024", "-smp", "1"])
        .args(firmware)
        .args(["-display", "none", "-monitor", "none", "-nic", "none"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .args(["-device", "virtio-scsi-pci,id=scsi0"])
        .arg("-drive")
        .arg(format!(
            "file={},if=none,id=d0,format=qcow2,snapshot=on",
            b.disk.display()
        ))
        .args(["-device", "scsi-hd,drive=d0,bus=scsi0.0,bootindex=1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Guest {
        child: cmd.spawn().expect("qemu-system-x86_64 runs"),
        serial,
    }
}

/// Wait for the guest to reach multi-user (or a login prompt); fail on a
/// panic, an emergency shell or a timeout, showing the console's tail.
fn wait_up(g: &mut Guest) -> String {
    let start = Instant::now();
    let bad = [
        "Kernel panic",
        "emergency mode",
        "Give root password",
        "rescue mode",
    ];
    loop {
        let log = std::fs::read_to_string(&g.serial).unwrap_or_default();
        let tail = || log.lines().rev().take(40).collect::<Vec<_>>().join("\n");
        if log.contains("Multi-User System") || log.contains(" login: ") {
            return log;
        }
        if let Some(b) = bad.iter().find(|b| log.contains(*b)) {
            panic!(
                "guest failed ({b}); console tail (newest first):\n{}",
                tail()
            );
        }
        if let Ok(Some(st)) = g.child.try_wait() {
            panic!(
                "qemu exited ({st}); console tail (newest first):\n{}",
                tail()
            );
        }
        if start.elapsed() > Duration::from_secs(900) {
            panic!(
                "guest not up in 900 s; console tail (newest first):\n{}",
                tail()
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

#[test]
fn bios_image_boots_under_seabios() {
    // q35 without pflash firmware is SeaBIOS.
    let mut g = boot("seabios", &["-machine".into(), "q35".into()]);
    let log = wait_up(&mut g);
    assert!(log.contains("Linux version"), "{log}");
    assert!(
        !log.contains("efi: EFI v"),
        "the kernel was started by UEFI firmware, not SeaBIOS:\n{log}"
    );
    let cmdline = built().manifest["boot"]["cmdline"].as_str().unwrap();
    assert!(
        log.contains("Command line: BOOT_IMAGE=/boot/vmlinuz-") && log.contains(cmdline),
        "the kernel command line is not the manifest's `{cmdline}`:\n{log}"
    );
    assert!(
        log.contains("EXT4-fs (sda3): mounted filesystem"),
        "root (partition 3) not mounted:\n{log}"
    );
}

#[test]
fn bios_image_still_boots_under_ovmf_with_secure_boot() {
    let b = built();
    let vars = b.dir.join("OVMF_VARS_4M.ms.fd");
    std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.ms.fd", &vars).unwrap();
    let fw: Vec<String> = [
        "-machine",
        "q35,smm=on",
        "-global",
        "driver=cfi.pflash01,property=secure,value=on",
        "-drive",
        "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.ms.fd",
        "-drive",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!(
        "if=pflash,format=raw,unit=1,file={}",
        vars.display()
    )])
    .collect();
    let mut g = boot("ovmf-sb", &fw);
    let log = wait_up(&mut g);
    assert!(log.contains("Secure boot enabled"), "{log}");
    assert!(
        log.contains("EXT4-fs (sda3): mounted filesystem"),
        "root (partition 3) not mounted:\n{log}"
    );
}

#[test]
fn bios_recipe_without_grub_mkimage_names_grub_common() {
    let dir = scratch("bios-notools");
    let project = project_copy(&dir.join("project"));
    let r = project.join("recipes/tiny.toml");
    let text = std::fs::read_to_string(&r).unwrap() + "\n[boot]\nbios = true\n";
    std::fs::write(&r, text).unwrap();
    let cache = dir.join("cache");
    ok(kiln(&project, &cache, &["lock", "recipes/tiny.toml"]));
    // Every build tool but grub-mkimage.
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for t in kiln::hosttools::BUILD_TOOLS {
        let real = kiln::hosttools::which(t.program).expect("build tools installed");
        std::os::unix::fs::symlink(real, bin.join(t.program)).unwrap();
    }
    let out = kiln_cmd(
        &project,
        &cache,
        &["build", "recipes/tiny.toml", "--no-validate"],
    )
    .env("PATH", &bin)
    .output()
    .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("grub-mkimage") && err.contains("grub-common"),
        "{err}"
    );
    assert!(
        !project.join("images").exists()
            || std::fs::read_dir(project.join("images"))
                .unwrap()
                .next()
                .is_none()
    );
}
