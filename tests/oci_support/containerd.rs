//! A private containerd for tests: Debian's `containerd` as root with its own
//! root/state/socket in a temp dir, driven with `ctr`; stopped on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A private containerd (CRI off), stopped on drop.
pub struct Containerd {
    child: Child,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl Containerd {
    pub fn start() -> Self {
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

    pub fn ctr(&self, args: &[&str]) -> std::process::Output {
        Command::new("ctr")
            .arg("-a")
            .arg(&self.sock)
            .args(["-n", "kiln"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    pub fn import(&self, archive: &Path) {
        let out = self.ctr(&["images", "import", &archive.to_string_lossy()]);
        assert!(
            out.status.success(),
            "ctr import {}: {}",
            archive.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The digest containerd recorded for an image name (`ctr images ls`).
    pub fn digest_of(&self, name: &str) -> Option<String> {
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

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
