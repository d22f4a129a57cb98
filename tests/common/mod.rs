//! Shared helpers for kiln's integration tests: throwaway project copies,
//! running the real `kiln` binary, and looking inside built disk images.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root (where recipes/ and overlays/ live).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A scratch directory under target/tmp that survives the test (for debugging)
/// and is emptied first.
pub fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn copy_tree(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        let t = dst.join(e.file_name());
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            copy_tree(&p, &t);
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&p).unwrap(), &t).unwrap();
        } else {
            std::fs::copy(&p, &t).unwrap();
        }
    }
}

/// Copy the project's recipes and overlays into `dir` (lockfiles excluded, so
/// each test decides how it locks).
pub fn project_copy(dir: &Path) -> PathBuf {
    copy_tree(&repo().join("recipes"), &dir.join("recipes"));
    copy_tree(&repo().join("overlays"), &dir.join("overlays"));
    for e in std::fs::read_dir(dir.join("recipes")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "lock") {
            std::fs::remove_file(p).unwrap();
        }
    }
    dir.to_path_buf()
}

/// Run the kiln binary in `cwd` with `KILN_CACHE=cache`.
pub fn kiln(cwd: &Path, cache: &Path, args: &[&str]) -> Output {
    kiln_cmd(cwd, cache, args).output().expect("kiln runs")
}

pub fn kiln_cmd(cwd: &Path, cache: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.current_dir(cwd)
        .env("KILN_CACHE", cache)
        .env("KILN_NO_PROGRESS", "1")
        .args(args);
    c
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Assert success, showing stderr otherwise.
pub fn ok(o: Output) -> Output {
    assert!(
        o.status.success(),
        "kiln failed ({}):\n{}",
        o.status,
        stderr(&o)
    );
    o
}

/// Parse `--json` output.
pub fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(o)))
}

/// Extract the root filesystem (GPT partition 2) of a qcow2 into `dir/root.img`.
pub fn root_partition(qcow2: &Path, dir: &Path) -> PathBuf {
    let raw = dir.join("disk.raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(qcow2)
        .arg(&raw)
        .status()
        .unwrap();
    assert!(st.success());
    let out = Command::new("sfdisk").arg("-J").arg(&raw).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let part = &v["partitiontable"]["partitions"][1];
    let (start, size) = (
        part["start"].as_u64().unwrap() * 512,
        part["size"].as_u64().unwrap() * 512,
    );
    let root = dir.join("root.img");
    let st = Command::new("dd")
        .arg(format!("if={}", raw.display()))
        .arg(format!("of={}", root.display()))
        .args([
            "bs=1M",
            "conv=sparse",
            "status=none",
            "iflag=skip_bytes,count_bytes",
        ])
        .arg(format!("skip={start}"))
        .arg(format!("count={size}"))
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::remove_file(raw).unwrap();
    root
}

/// Run a debugfs request against an ext4 image and return its output.
pub fn debugfs(img: &Path, request: &str) -> String {
    let o = Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(img)
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Entries of a directory in an ext4 image.
pub fn ls(img: &Path, dir: &str) -> Vec<String> {
    debugfs(img, &format!("ls -p {dir}"))
        .lines()
        .filter_map(|l| l.split('/').nth(5).map(str::to_string))
        .filter(|n| !n.is_empty() && n != "." && n != "..")
        .collect()
}

/// The kiln cache the tests share (`KILN_CACHE`, default target/kiln-cache),
/// so the base rootfs is debootstrapped once per suite.
pub fn test_cache() -> PathBuf {
    std::env::var_os("KILN_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/kiln-cache"))
}

/// Build `recipe` (relative to `project`) without validating it into `out`;
/// returns the image directory. `out` is test scratch: an image left there
/// by an earlier build from other inputs is replaced (`--force`).
pub fn build_image(project: &Path, recipe: &str, out: &Path) -> PathBuf {
    let o = kiln_cmd(
        project,
        &test_cache(),
        &["build", recipe, "--no-validate", "--force", "--out"],
    )
    .arg(out)
    .output()
    .expect("run kiln build");
    assert!(
        o.status.success(),
        "kiln build {recipe} failed; this test needs the image:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    find_manifest_dir(out).expect("kiln build wrote no manifest.json")
}

/// The newest image directory (holding manifest.json) under `dir`.
pub fn find_manifest_dir(dir: &Path) -> Option<PathBuf> {
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).ok()?.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n == "manifest.json") {
                let t = e.metadata().ok()?.modified().ok()?;
                if best.as_ref().is_none_or(|(bt, _)| t > *bt) {
                    best = Some((t, d.clone()));
                }
            }
        }
    }
    best.map(|(_, p)| p)
}
