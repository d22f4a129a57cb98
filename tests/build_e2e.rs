//! End-to-end `kiln build` with real mmdebstrap, mkfs.ext4 and qemu-img:
//! reproducibility, hygiene, preserved file metadata, cache reuse, atomicity.
//! These need root (mmdebstrap --mode=root) and Debian's mirror, as CI has.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// One locked tiny project, built once; other tests reuse its cache.
struct Built {
    dir: PathBuf,
    project: PathBuf,
    cache: PathBuf,
    image: PathBuf,
    manifest: serde_json::Value,
    root_img: PathBuf,
}

fn built() -> &'static Built {
    static B: OnceLock<Built> = OnceLock::new();
    B.get_or_init(|| {
        let dir = scratch("build-e2e");
        let project = project_copy(&dir.join("project"));
        let cache = dir.join("cache-a");
        ok(kiln(&project, &cache, &["lock", "recipes/tiny.toml"]));
        let out = ok(build_tiny(&project, &cache, &["--json"]));
        let j = json(&out);
        let manifest_path = PathBuf::from(j["manifest"].as_str().unwrap());
        let manifest_path = if manifest_path.is_absolute() {
            manifest_path
        } else {
            project.join(manifest_path)
        };
        let image = manifest_path.parent().unwrap().to_path_buf();
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
        let inspect = dir.join("inspect");
        std::fs::create_dir_all(&inspect).unwrap();
        let root_img = root_partition(
            &image.join(manifest["disk"]["file"].as_str().unwrap()),
            &inspect,
        );
        Built {
            dir,
            project,
            cache,
            image,
            manifest,
            root_img,
        }
    })
}

/// A second project with the built one's lock, and a private cache holding
/// (hard links to) the same base rootfs, so tests running at once never see
/// each other's scratch files.
fn sibling(name: &str) -> (PathBuf, PathBuf) {
    let b = built();
    let p = project_copy(&b.dir.join(name));
    std::fs::copy(
        b.project.join("recipes/tiny.toml.lock"),
        p.join("recipes/tiny.toml.lock"),
    )
    .unwrap();
    let cache = b.dir.join(format!("{name}-cache"));
    std::fs::create_dir_all(cache.join("rootfs")).unwrap();
    for e in std::fs::read_dir(b.cache.join("rootfs")).unwrap() {
        let e = e.unwrap();
        std::fs::hard_link(e.path(), cache.join("rootfs").join(e.file_name())).unwrap();
    }
    (p, cache)
}

/// `kiln build recipes/tiny.toml --out images --no-validate EXTRA...` in `project`.
fn build_tiny(project: &Path, cache: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "build",
        "recipes/tiny.toml",
        "--out",
        "images",
        "--no-validate",
    ];
    args.extend_from_slice(extra);
    kiln(project, cache, &args)
}

fn nothing_published(out: &Path) {
    let left: Vec<_> = std::fs::read_dir(out)
        .map(|r| r.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "images dir should be empty, has {left:?}");
}

fn cache_tmp_is_empty(cache: &Path) {
    let left: Vec<_> = std::fs::read_dir(cache.join("tmp"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "cache tmp should be empty, has {left:?}");
}

#[test]
fn image_directory_holds_disk_manifest_and_sums() {
    let b = built();
    let m = &b.manifest;
    let disk = b.image.join(m["disk"]["file"].as_str().unwrap());
    assert_eq!(m["id"], m["disk"]["sha256"]);
    assert_eq!(
        kiln::util::sha256_file(&disk).unwrap(),
        m["id"].as_str().unwrap()
    );
    let sums = std::fs::read_to_string(b.image.join("SHA256SUMS")).unwrap();
    assert!(sums.starts_with(m["id"].as_str().unwrap()), "{sums}");
    assert_eq!(m["disk"]["format"], "qcow2");
    assert!(m["packages"]["openssh-server"].is_string());
    assert!(m["stages"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["stage"] == "rootfs"));
    assert_eq!(m["boot"]["secure_boot"], true);
}

#[test]
fn lockfile_gets_the_resolved_package_versions() {
    let b = built();
    let lock = std::fs::read_to_string(b.project.join("recipes/tiny.toml.lock")).unwrap();
    let v = b.manifest["packages"]["openssh-server"].as_str().unwrap();
    assert!(
        lock.contains(&format!("\nopenssh-server = \"{v}\"\n")),
        "{lock}"
    );
}

#[test]
fn clean_cache_rebuild_is_byte_identical() {
    let b = built();
    let p = sibling("repro").0;
    let cache = b.dir.join("cache-b");
    let out = ok(build_tiny(&p, &cache, &["--json"]));
    assert_eq!(
        json(&out)["id"],
        b.manifest["id"],
        "a clean rebuild must give the same disk bytes"
    );
}

#[test]
fn noop_rebuild_is_up_to_date() {
    let b = built();
    let out = ok(build_tiny(&b.project, &b.cache, &["--json"]));
    let j = json(&out);
    assert_eq!(j["up_to_date"], true);
    assert_eq!(j["id"], b.manifest["id"]);
}

#[test]
fn changed_overlay_reuses_the_cached_base_rootfs() {
    let (p, cache) = sibling("overlay-change");
    std::fs::write(
        p.join("overlays/base/etc/sysctl.d/60-kiln.conf"),
        "fs.inotify.max_user_watches = 1048576\n",
    )
    .unwrap();
    let out = ok(build_tiny(&p, &cache, &["--json"]));
    let j = json(&out);
    assert_ne!(j["id"], built().manifest["id"]);
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p.join(j["manifest"].as_str().unwrap())).unwrap())
            .unwrap();
    let rootfs = m["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == "rootfs")
        .unwrap();
    assert_eq!(rootfs["cached"], true, "{m}");
    let inspect = p.join("inspect");
    std::fs::create_dir_all(&inspect).unwrap();
    let root = root_partition(&p.join("images/tiny/0.1.0/tiny-0.1.0.qcow2"), &inspect);
    assert!(debugfs(&root, "cat /etc/sysctl.d/60-kiln.conf").contains("1048576"));
}

/// A sibling project of tiny with an LXC archive and one changed overlay file.
fn lxc_sibling_with_changed_overlay(name: &str) -> (PathBuf, PathBuf) {
    let (p, cache) = sibling(name);
    let recipe = p.join("recipes/tiny.toml");
    let text = std::fs::read_to_string(&recipe).unwrap();
    std::fs::write(
        &recipe,
        text.replace("version = \"0.1.0\"\n", "version = \"0.1.0\"\nlxc = true\n"),
    )
    .unwrap();
    (p, cache)
}

fn change_overlay(p: &Path) {
    std::fs::write(
        p.join("overlays/base/etc/sysctl.d/60-kiln.conf"),
        "vm.max_map_count = 262144\n",
    )
    .unwrap();
}

fn manifest_of(p: &Path, out: &std::process::Output) -> serde_json::Value {
    let path = p.join(json(out)["manifest"].as_str().unwrap());
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn stage<'a>(m: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    m["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == name)
        .unwrap_or_else(|| panic!("no {name} stage in {m}"))
}

#[test]
fn rebuild_reusing_the_last_image_equals_a_clean_build() {
    // Build, change an overlay file, rebuild: the rebuild copies unchanged
    // qcow2 clusters and LXC frames from the first build...
    let (p, cache) = lxc_sibling_with_changed_overlay("reuse");
    let first = manifest_of(&p, &ok(build_tiny(&p, &cache, &["--json"])));
    assert!(
        stage(&first, "compress")["reused"]["reused"] == 0,
        "{first}"
    );
    change_overlay(&p);
    let rebuilt = manifest_of(&p, &ok(build_tiny(&p, &cache, &["--json", "--force"])));
    for (name, unit) in [("compress", "qcow2 clusters"), ("lxc", "zstd frames")] {
        let r = &stage(&rebuilt, name)["reused"];
        assert_eq!(r["unit"], unit);
        let (reused, total) = (r["reused"].as_u64().unwrap(), r["total"].as_u64().unwrap());
        assert!(reused > total / 2 && reused < total, "{name}: {r}");
    }

    // ...and gives exactly the bytes a build without any reference gives.
    let (clean, clean_cache) = lxc_sibling_with_changed_overlay("reuse-clean");
    change_overlay(&clean);
    let cold = manifest_of(&clean, &ok(build_tiny(&clean, &clean_cache, &["--json"])));
    assert_eq!(stage(&cold, "compress")["reused"]["reused"], 0);
    assert_eq!(
        rebuilt["id"], cold["id"],
        "qcow2 differs from a clean build"
    );
    assert_eq!(
        rebuilt["lxc"], cold["lxc"],
        "LXC archive differs from a clean build"
    );

    // The archive is what `tar --zstd` (and so Proxmox) reads.
    let lxc = p
        .join("images/tiny/0.1.0")
        .join(rebuilt["lxc"]["file"].as_str().unwrap());
    let list = std::process::Command::new("tar")
        .args(["--zstd", "-xOf"])
        .arg(&lxc)
        .arg("etc/sysctl.d/60-kiln.conf")
        .output()
        .unwrap();
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    assert_eq!(list.stdout, b"vm.max_map_count = 262144\n");
}

#[test]
fn file_capabilities_survive_into_the_image() {
    let out = debugfs(&built().root_img, "ea_list /usr/bin/ping");
    assert!(out.contains("security.capability"), "{out}");
}

#[test]
fn setuid_bits_survive_into_the_image() {
    let out = debugfs(&built().root_img, "stat /usr/bin/su");
    assert!(out.contains("Mode:  04755"), "{out}");
}

#[test]
fn hard_links_and_symlinks_survive_into_the_image() {
    let img = &built().root_img;
    let a = debugfs(img, "stat /usr/bin/perl");
    let b = debugfs(img, "stat /usr/bin/perl5.36.0");
    let inode = |s: &str| s.split_whitespace().nth(1).unwrap().to_string();
    assert_eq!(
        inode(&a),
        inode(&b),
        "perl and perl5.36.0 share an inode:\n{a}\n{b}"
    );
    assert!(a.contains("Links: 2"), "{a}");
    let bin = debugfs(img, "stat /bin");
    assert!(
        bin.contains("Type: symlink") && bin.contains("usr/bin"),
        "{bin}"
    );
}

#[test]
fn hygiene_holds_in_the_image() {
    let img = &built().root_img;
    let ssh: Vec<String> = ls(img, "/etc/ssh")
        .into_iter()
        .filter(|n| n.starts_with("ssh_host_"))
        .collect();
    assert!(ssh.is_empty(), "host keys shipped: {ssh:?}");
    assert!(debugfs(img, "stat /etc/machine-id").contains("Size: 0"));
    assert!(
        ls(img, "/var/lib/apt/lists")
            .iter()
            .all(|n| n == "partial" || n == "lock"),
        "{:?}",
        ls(img, "/var/lib/apt/lists")
    );
    assert!(ls(img, "/var/lib/cloud").is_empty());
    assert!(
        debugfs(img, "stat /etc/systemd/system/apt-daily-upgrade.timer").contains("Type: symlink")
    );
    assert!(
        debugfs(img, "cat /etc/cloud/cloud.cfg.d/90-kiln.cfg").contains("package_upgrade: false")
    );
    assert!(built().manifest["hygiene"]["violations"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[test]
fn overlay_writing_through_an_escaping_symlink_is_refused() {
    let (p, cache) = sibling("escape");
    let o = p.join("overlays/base");
    std::os::unix::fs::symlink("../../../../../tmp", o.join("etc/evil")).unwrap();
    let out = build_tiny(&p, &cache, &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("overlays/base/etc/evil") && err.contains("outside the image root"),
        "{err}"
    );
    nothing_published(&p.join("images"));
    cache_tmp_is_empty(&cache);
}

#[test]
fn private_key_in_an_overlay_fails_the_build() {
    let (p, cache) = sibling("leaky");
    let key = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\nQyNTUxOQAAACBvbGQga2V5IG5vdCBhIHJlYWwgb25lIGJ1dCBsb29rcyBzbwAAAJgAAAAA\n-----END OPENSSH PRIVATE KEY-----\n";
    std::fs::write(p.join("overlays/base/etc/leaked_key"), key).unwrap();
    let out = build_tiny(&p, &cache, &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("hygiene") && err.contains("/etc/leaked_key: private key"),
        "{err}"
    );
    nothing_published(&p.join("images"));
}

#[test]
fn content_larger_than_disk_size_is_refused_cleanly() {
    let (p, cache) = sibling("too-big");
    let r = p.join("recipes/tiny.toml");
    let text = std::fs::read_to_string(&r)
        .unwrap()
        .replace("size = \"2G\"", "size = \"400M\"");
    std::fs::write(&r, text).unwrap();
    let out = build_tiny(&p, &cache, &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("does not fit") && err.contains("disk.size"),
        "{err}"
    );
    nothing_published(&p.join("images"));
    cache_tmp_is_empty(&cache);
}

#[test]
fn ctrl_c_mid_build_leaves_nothing_behind() {
    let (p, cache) = sibling("interrupt");
    let child = kiln_cmd(
        &p,
        &cache,
        &[
            "build",
            "recipes/tiny.toml",
            "--out",
            "images",
            "--no-validate",
        ],
    )
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    // Wait until the build is writing into its staging directory (not
    // only holding the image's lock, which it takes first).
    let start = std::time::Instant::now();
    while !std::fs::read_dir(p.join("images"))
        .map(|mut r| {
            r.any(|e| {
                e.is_ok_and(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(".kiln-staging-")
                })
            })
        })
        .unwrap_or(false)
    {
        assert!(
            start.elapsed().as_secs() < 120,
            "build never started staging"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    unsafe { libc_kill(child.id() as i32, 2) };
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(stderr(&out).contains("interrupted"), "{}", stderr(&out));
    nothing_published(&p.join("images"));
    cache_tmp_is_empty(&cache);
    // Nor is a raw disk left in RAM.
    let in_ram: Vec<_> = std::fs::read_dir("/dev/shm")
        .map(|r| r.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    let prefix = format!("kiln-{pid}-");
    assert!(
        !in_ram
            .iter()
            .any(|n| n.to_string_lossy().starts_with(&prefix)),
        "{in_ram:?}"
    );
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
