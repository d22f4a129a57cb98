//! End-to-end BIOS boot: build a copy of recipes/tiny.toml with `[boot] bios = true`
//! and let `kiln validate` boot the same hybrid disk under OVMF with Secure
//! Boot and under SeaBIOS (two TCG boots in all).
//! Needs root, Debian's mirror, grub-common, qemu-system-x86 and ovmf, as CI has.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

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
            kiln::image::disk::ESP_TYPE,
            kiln::image::disk::BIOS_BOOT_TYPE,
            kiln::image::disk::ROOT_TYPE
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
    let info = kiln::image::compose::index_base(&tar, &kiln::image::disk::bios::wanted).unwrap();
    let one = kiln::image::disk::bios::make(&info.captured, &b.dir).unwrap();
    let two = kiln::image::disk::bios::make(&info.captured, &b.dir).unwrap();
    assert_eq!(one.core_img, two.core_img, "grub-mkimage is deterministic");
    let parts = partitions(raw());
    let lba = parts[1]["start"].as_u64().unwrap();
    let core = kiln::image::disk::bios::patch_core_img(&one.core_img, lba).unwrap();
    assert_eq!(read_at(raw(), lba * 512, core.len()), core);
}

#[test]
fn kiln_validate_boots_the_hybrid_image_under_ovmf_secure_boot_and_seabios() {
    // The same disk, booted twice by `kiln validate`: OVMF with Secure Boot
    // enforced, then SeaBIOS (no pflash); the Secure Boot check only under UEFI.
    let b = built();
    let image = b.disk.parent().unwrap();
    let out = kiln(
        &b.dir,
        &b.cache,
        &[
            "validate",
            image.to_str().unwrap(),
            "--accel",
            "tcg",
            "--json",
        ],
    );
    let j = json(&out);
    let result = &j["images"][0];
    let checks = result["record"]["checks"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let passed = |name: &str| {
        checks
            .iter()
            .any(|c| c["name"] == name && c["passed"] == true)
    };
    let summary: Vec<String> = checks
        .iter()
        .map(|c| format!("{} {}", c["passed"], c["name"]))
        .collect();
    assert!(
        out.status.success() && result["validated"] == true,
        "validate failed: {}\n{summary:#?}\n{}",
        result["error"],
        stderr(&out)
    );
    for name in [
        "uefi: Secure Boot enabled",
        "uefi: root filesystem grown to the disk",
        "bios: boot to SSH",
        "bios: system running, no failed units",
        "bios: root filesystem grown to the disk",
        "bios: serial console clean",
    ] {
        assert!(passed(name), "`{name}` did not pass: {summary:#?}");
    }
    assert!(
        !checks
            .iter()
            .any(|c| c["name"] == "bios: Secure Boot enabled"),
        "Secure Boot is not checked under SeaBIOS: {summary:#?}"
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
    for t in kiln::util::hosttools::BUILD_TOOLS {
        let real = kiln::util::hosttools::which(t.program).expect("build tools installed");
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
