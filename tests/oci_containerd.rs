//! The archives kiln writes are what containerd imports: Debian's containerd
//! runs as root with its own root/state/socket in a temp dir, `ctr images
//! import` loads each archive, and the imported digest must be the pinned one.

mod oci_support;

use kiln::oci::{pull, write_archive, ImageRef, PullOptions};
use oci_support::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A private containerd (CRI off), stopped on drop.
struct Containerd {
    child: Child,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl Containerd {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let sock = d.join("containerd.sock");
        let cfg = d.join("config.toml");
        std::fs::write(
            &cfg,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{ttrpc}\"\n[debug]\n  address = \"\"\n[metrics]\n  address = \"\"\n",
                root = d.join("root").display(),
                state = d.join("state").display(),
                sock = sock.display(),
                ttrpc = d.join("ttrpc.sock").display(),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(d.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&cfg)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let c = Self {
            child,
            sock,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !c.ctr(&["version"]).status.success() {
            assert!(Instant::now() < deadline, "containerd did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    fn ctr(&self, args: &[&str]) -> std::process::Output {
        Command::new("ctr")
            .arg("-a")
            .arg(&self.sock)
            .args(["-n", "kiln"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn import(&self, archive: &Path) {
        let out = self.ctr(&["images", "import", &archive.to_string_lossy()]);
        assert!(
            out.status.success(),
            "ctr import {}: {}",
            archive.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The digest containerd recorded for an image name (`ctr images ls`).
    fn digest_of(&self, name: &str) -> Option<String> {
        let out = self.ctr(&["images", "ls"]);
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.first() == Some(&name)).then(|| cols[2].to_string())
        })
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // SIGTERM first so containerd releases its mounts and sockets.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

#[test]
fn containerd_imports_each_archive_under_the_pinned_digest() {
    let test = "containerd import";
    if !have_tools(test, REGISTRY_TOOLS)
        || !have_tools(
            test,
            &[
                ("containerd", "containerd"),
                ("ctr", "containerd"),
                ("zstd", "zstd"),
            ],
        )
    {
        return;
    }
    if !is_root() {
        eprintln!("SKIPPED {test}: containerd needs root");
        return;
    }
    let reg = Registry::start();
    let amd = reg.push_image("kiln/multi", "amd64", &[("bin/tool", b"x86 tool")], None);
    let arm = reg.push_image(
        "kiln/multi",
        "arm64",
        &[("bin/tool", b"arm tool")],
        Some("arm64"),
    );
    let index = reg.push_index("kiln/multi", "v2", &[(&arm, "arm64"), (&amd, "amd64")]);
    let single = reg.push_image("kiln/single", "v1", &[("etc/motd", b"baked\n")], None);
    // Docker media types (manifest list + v2 manifests), as many upstream images use.
    let d_amd = reg.push_image_as("kiln/dock", "amd64", &[("a", b"x86")], None, Some("v2s2"));
    let d_arm = reg.push_image_as(
        "kiln/dock",
        "arm64",
        &[("a", b"arm")],
        Some("arm64"),
        Some("v2s2"),
    );
    let list = reg.push_docker_list("kiln/dock", "v1", &[(&d_arm, "arm64"), (&d_amd, "amd64")]);

    let t = tempfile::tempdir().unwrap();
    let multi = ImageRef::parse(&format!("{}/kiln/multi:v2@{index}", reg.host())).unwrap();
    let one = ImageRef::parse(&format!("{}/kiln/single:v1@{single}", reg.host())).unwrap();
    let dock = ImageRef::parse(&format!("{}/kiln/dock:v1@{list}", reg.host())).unwrap();
    let pulled = pull(
        &[multi.clone(), one.clone(), dock.clone()],
        &PullOptions::new(t.path().join("cache")),
    )
    .unwrap();

    let images_dir = t.path().join("agent/images");
    let tar = images_dir.join(pulled[0].archive_file_name(false));
    let zst = images_dir.join(pulled[1].archive_file_name(true));
    write_archive(&pulled[0], &tar).unwrap();
    write_archive(&pulled[1], &zst).unwrap();
    let dock_tar = images_dir.join(pulled[2].archive_file_name(false));
    write_archive(&pulled[2], &dock_tar).unwrap();
    // K3s decompresses .tar.zst itself before handing the stream to containerd;
    // Debian's ctr 1.6 does not, so this test does that step with zstd.
    let unpacked = t.path().join("single.tar");
    run(
        "zstd",
        &[
            "-q",
            "-d",
            &zst.to_string_lossy(),
            "-o",
            &unpacked.to_string_lossy(),
        ],
    );

    let ctd = Containerd::start();
    ctd.import(&tar);
    ctd.import(&unpacked);
    ctd.import(&dock_tar);
    assert_eq!(ctd.digest_of(&multi.containerd_name()), Some(index.clone()));
    assert_eq!(ctd.digest_of(&one.containerd_name()), Some(single.clone()));
    assert_eq!(ctd.digest_of(&dock.containerd_name()), Some(list.clone()));
    // Every linux/amd64 blob arrived and unpacked: containerd calls the images
    // complete and their layers unpacked.
    let check = ctd.ctr(&["images", "check"]);
    let text = String::from_utf8_lossy(&check.stdout);
    for name in [
        multi.containerd_name(),
        one.containerd_name(),
        dock.containerd_name(),
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&name))
            .unwrap_or_else(|| panic!("{name} not in {text}"));
        assert!(line.contains("complete"), "{line}");
        assert!(
            line.trim_end().ends_with("true"),
            "layers not unpacked: {line}"
        );
    }
}
