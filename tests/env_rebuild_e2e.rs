//! `kiln env rebuild` twice in a row on the local provider (real QEMU, TCG,
//! Secure Boot): QA from scratch. Each rebuild builds the LB image again from
//! its recipe and lock, proves the id equals the one the environment pins,
//! destroys the environment and bootstraps it again; the VIP is served after
//! each (the environment's check: VIP:6443 answers, haproxy listening on the
//! keepalived MASTER). Two rebuilds give the same image id.
//!
//! Root is required (network namespaces, taps), as in CI. Nothing leaves the
//! namespace kiln makes.

mod common;

use kiln::deploy::providers::local::namespace;
use kiln::deploy::providers::netns;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

struct Lab {
    dir: tempfile::TempDir,
    name: String,
}

impl Lab {
    fn kiln(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .env("KILN_NO_PROGRESS", "1")
            .env("KILN_STATE", self.dir.path().join("state"))
            .env("KILN_CACHE", common::test_cache())
            .output()
            .unwrap()
    }

    fn env_file(&self) -> PathBuf {
        self.dir.path().join("qa.toml")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let env = self.env_file();
        let _ = self.kiln(&["env", "destroy", env.to_str().unwrap(), "--yes"]);
        let _ = netns::delete(&namespace(&self.name));
    }
}

/// The environment: one LB slot running the pinned image, built into
/// `images/lb` by the first rebuild (it does not exist before).
fn write_env(lab: &Lab, project: &Path, pin: &str) {
    let text = format!(
        r#"name = "{name}"
[provider]
kind = "local"
[network]
cidr = "10.79.0.0/24"
gateway = "10.79.0.1"
vip = "10.79.0.10"
[roles.lb]
recipe = "{recipe}"
image = "images/lb"
image_id = "{pin}"
cores = 1
memory = 1024
skip_checks = [
  "backend servers come from user-data, every address of the pool",
  "unicast peers are the pools but this node's own address",
  "haproxy counts only a backend serving TLS",
]
[roles.lb.values]
virtual_router_id = 71
backends = [{{ name = "server-1", addresses = ["10.79.0.31"] }}]
[[roles.lb.slots]]
name = "lb-1"
addresses = ["10.79.0.11", "10.79.0.21"]
values = {{ priority = 150 }}
[[checks]]
name = "the VIP answers on the API port"
tcp = "vip:6443"
timeout = 60
"#,
        name = lab.name,
        recipe = project.join("recipes/lb.toml").display(),
    );
    std::fs::write(lab.env_file(), text).unwrap();
}

#[test]
fn two_rebuilds_from_scratch_give_the_same_image_id_and_a_serving_vip() {
    // SAFETY: geteuid(2) cannot fail.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root (network namespaces, taps), as CI has"
    );
    let dir = tempfile::Builder::new()
        .prefix("kreb")
        .tempdir_in("/tmp")
        .unwrap();
    let lab = Lab {
        dir,
        name: format!("r{}", std::process::id()),
    };
    // The recipes with their locks, as a checkout has them.
    let project = lab.dir.path().join("project");
    std::fs::create_dir_all(&project).unwrap();
    let root = common::repo();
    let st = Command::new("cp")
        .arg("-a")
        .arg(root.join("recipes"))
        .arg(root.join("overlays"))
        .arg(&project)
        .status()
        .unwrap();
    assert!(st.success());
    // The pin: the id this recipe and lock build to (any machine gives it).
    let built = common::build_image(&project, "recipes/lb.toml", &project.join("out"));
    let pin = kiln::image::manifest::ImageManifest::load(&built)
        .unwrap()
        .id;
    write_env(&lab, &project, &pin);
    let env = lab.env_file();

    let mut seen = Vec::new();
    for round in 1..=2 {
        let t = Instant::now();
        let o = lab.kiln(&[
            "env",
            "rebuild",
            env.to_str().unwrap(),
            "--yes",
            "--json",
            "--accel",
            "tcg",
        ]);
        assert!(o.status.success(), "rebuild {round} failed:\n{}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let ids: Vec<&str> = v["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["image_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, vec![pin.as_str()], "round {round}");
        let made: Vec<&str> = v["apply"]["steps"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s["vm"].as_str())
            .collect();
        eprintln!(
            "rebuild {round}: image {} (pinned), destroyed {}, created {:?} in {:.0} s",
            &ids[0][..12],
            v["destroyed"],
            made,
            t.elapsed().as_secs_f64()
        );
        seen.push((ids[0].to_string(), made.len()));
        // The environment's check passed inside apply; status agrees.
        let o = lab.kiln(&["env", "status", env.to_str().unwrap(), "--json"]);
        assert!(o.status.success(), "{}", text(&o));
        let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let lines = st.as_array().unwrap();
        assert_eq!(lines.len(), 1, "{st}");
        assert_eq!(lines[0]["image_id"], pin.as_str());
        assert_eq!(lines[0]["current"], true);
        assert_eq!(lines[0]["running"], true);
    }
    assert_eq!(seen[0], seen[1], "two rebuilds give the same result");
    assert!(
        lab.dir.path().join("images/lb/manifest.json").exists(),
        "the first rebuild filled the pinned image directory"
    );
}
