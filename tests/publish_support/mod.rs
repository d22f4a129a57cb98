//! Shared fixtures for the publish tests: fabricated kiln image directories,
//! an in-process PVE simulator, and a `kiln` runner that checks for token leaks.
#![allow(dead_code)]

use kiln::image::manifest::*;
use pve_sim::{Sim, SimConfig};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

pub const TOKEN_ID: &str = "ci@pve!kiln";
pub const SECRET: &str = "5f0c1e2a-kiln-test-secret-9d8e";

pub fn token() -> String {
    format!("{TOKEN_ID}={SECRET}")
}

/// A simulator with quick tasks.
pub fn sim(data: &Path) -> Sim {
    let mut cfg = SimConfig::new(&token(), data);
    cfg.task_delay = Duration::from_millis(30);
    Sim::start(cfg).expect("simulator starts")
}

/// The privileges of the KilnPublish role README.md documents.
pub const KILN_ROLE: &[&str] = &[
    "Datastore.Allocate",
    "Datastore.AllocateSpace",
    "Datastore.AllocateTemplate",
    "Datastore.Audit",
    "SDN.Use",
    "Sys.Audit",
    "VM.Allocate",
    "VM.Audit",
    "VM.Config.CPU",
    "VM.Config.Disk",
    "VM.Config.HWType",
    "VM.Config.Memory",
    "VM.Config.Network",
    "VM.Config.Options",
];

/// A simulator whose token has exactly these privileges per path.
pub fn sim_with_acl(data: &Path, acl: &[(&str, &[&str])]) -> Sim {
    let mut cfg = SimConfig::new(&token(), data);
    cfg.task_delay = Duration::from_millis(30);
    let mut a = pve_sim::Acl::new();
    for (path, privs) in acl {
        a.entry(path.to_string())
            .or_default()
            .extend(privs.iter().map(|p| p.to_string()));
    }
    cfg.acl = Some(a);
    Sim::start(cfg).expect("simulator starts")
}

/// A simulator with quick tasks, configured by `f` first.
pub fn sim_with_config(data: &Path, f: impl FnOnce(&mut SimConfig)) -> Sim {
    let mut cfg = SimConfig::new(&token(), data);
    cfg.task_delay = Duration::from_millis(30);
    f(&mut cfg);
    Sim::start(cfg).expect("simulator starts")
}

/// The KilnPublish role's privileges without `leave_out`.
pub fn role_without(leave_out: &[&str]) -> Vec<&'static str> {
    KILN_ROLE
        .iter()
        .copied()
        .filter(|p| !leave_out.contains(p))
        .collect()
}

/// Fabricate images/<name>/<version>/ with a real (small) qcow2.
pub fn image(root: &Path, name: &str, version: &str, validated: bool, lxc: bool) -> PathBuf {
    let dir = root.join("images").join(name).join(version);
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.qcow2");
    // The virtual size differs per name and version so each image has its own id.
    let size_mb = 64
        + kiln::util::sha256_hex(format!("{name}/{version}").as_bytes())
            .bytes()
            .take(4)
            .map(|b| b as u64)
            .product::<u64>()
            % 4096;
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg(format!("{size_mb}M"))
        .status()
        .expect("qemu-img runs (apt install qemu-utils)");
    assert!(st.success());
    let id = kiln::util::sha256_file(&disk).unwrap();
    let len = std::fs::metadata(&disk).unwrap().len();
    let lxc_info = lxc.then(|| {
        let tar_path = dir.join("rootfs.tar");
        {
            let f = std::fs::File::create(&tar_path).unwrap();
            let mut b = tar::Builder::new(f);
            let data = b"nameserver 127.0.0.1\n";
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, "etc/resolv.conf", &data[..]).unwrap();
            b.finish().unwrap();
        }
        let st = Command::new("zstd")
            .args(["-q", "--rm", "-f"])
            .arg(&tar_path)
            .status()
            .expect("zstd runs (apt install zstd)");
        assert!(st.success());
        let p = dir.join("rootfs.tar.zst");
        FileInfo {
            file: "rootfs.tar.zst".into(),
            sha256: kiln::util::sha256_file(&p).unwrap(),
            size: std::fs::metadata(&p).unwrap().len(),
        }
    });
    let m = ImageManifest {
        name: name.into(),
        version: version.into(),
        id: id.clone(),
        kiln_version: "0.1.0".into(),
        disk: DiskInfo {
            file: "disk.qcow2".into(),
            format: "qcow2".into(),
            sha256: id.clone(),
            size: len,
            virtual_size: size_mb << 20,
            root_fs_uuid: "5d1c2b1e-0000-4000-8000-000000000001".into(),
        },
        inputs: InputDigests::default(),
        source_date_epoch: 1_700_000_000,
        boot: BootInfo {
            uefi: true,
            secure_boot: true,
            bios: false,
            kernel: "6.12.0-test".into(),
            cmdline: "root=UUID=x ro".into(),
            chain: vec![],
        },
        packages: [("k3s".to_string(), "1.33.0".to_string())].into(),
        hygiene: Default::default(),
        stages: vec![],
        roles: vec!["server".into()],
        validate: ValidateSpec::default(),
        lxc: lxc_info,
        sbom: None,
        added_files: vec![],
        validation: validated.then(|| ValidationRecord {
            validated: true,
            when: "2026-11-25T12:00:00Z".into(),
            kiln_version: "0.1.0".into(),
            accel: "tcg".into(),
            secure_boot_keys: vec!["2023k".into()],
            boot_to_ssh_seconds: Some(40.0),
            boot_to_cloud_init_seconds: Some(70.0),
            checks: vec![],
        }),
    };
    m.save(&dir).unwrap();
    std::fs::write(dir.join(SUMS_FILE), format!("{id}  disk.qcow2\n")).unwrap();
    dir
}

/// Environment variables that make a target for `sim`.
pub fn env_target(url: &str) -> Vec<(String, String)> {
    vec![
        ("KILN_PVE_URL".into(), url.into()),
        ("KILN_PVE_NODE".into(), "pve".into()),
        ("KILN_PVE_STORAGE".into(), "local-lvm".into()),
        ("KILN_PVE_IMPORT_STORAGE".into(), "local".into()),
        ("KILN_PVE_TOKEN".into(), token()),
        ("KILN_PVE_VMID_RANGE".into(), "9000-9099".into()),
    ]
}

/// The kiln binary with exactly these KILN_* variables, in `cwd`, with
/// `cwd` as its HOME (where it records its publish runs).
pub fn kiln_command(cwd: &Path, args: &[&str], env: &[(String, String)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.current_dir(cwd).args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("KILN_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("KILN_NO_PROGRESS", "1")
        .env("HOME", cwd)
        .env_remove("XDG_STATE_HOME");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// [`env_target`] with some variables replaced or added.
pub fn env_target_with(url: &str, vars: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = env_target(url);
    for (k, v) in vars {
        env.retain(|(x, _)| x != k);
        env.push((k.to_string(), v.to_string()));
    }
    env
}

/// Run the kiln binary (see [`kiln_command`]) and check the token's secret
/// appears in none of its output.
pub fn kiln(cwd: &Path, args: &[&str], env: &[(String, String)]) -> Output {
    let out = kiln_command(cwd, args, env).output().expect("kiln runs");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !all.contains(SECRET),
        "the token secret leaked into output:\n{all}"
    );
    out
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Publish with `--json` and return the report.
pub fn publish_json(
    cwd: &Path,
    image: &Path,
    env: &[(String, String)],
) -> kiln::deploy::publish::PublishReport {
    let out = kiln(cwd, &["publish", image.to_str().unwrap(), "--json"], env);
    assert!(out.status.success(), "publish failed: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("publish --json prints a report")
}

/// VMIDs of VMs in the simulator that are not templates.
pub fn plain_vms(s: &Sim) -> Vec<u32> {
    s.state()
        .vms
        .values()
        .filter(|v| !v.template)
        .map(|v| v.vmid)
        .collect()
}

/// `POST` a form to the simulator's API; (status, body).
pub fn api_post(s: &Sim, path: &str, form: &[(&str, &str)]) -> (u16, serde_json::Value) {
    let r = reqwest::blocking::Client::new()
        .post(format!("{}/api2/json{path}", s.url()))
        .header("Authorization", format!("PVEAPIToken={}", token()))
        .form(form)
        .send()
        .unwrap();
    (
        r.status().as_u16(),
        r.json().unwrap_or(serde_json::Value::Null),
    )
}

/// `DELETE` on the simulator's API; (status, body).
pub fn api_delete(s: &Sim, path: &str) -> (u16, serde_json::Value) {
    let r = reqwest::blocking::Client::new()
        .delete(format!("{}/api2/json{path}", s.url()))
        .header("Authorization", format!("PVEAPIToken={}", token()))
        .send()
        .unwrap();
    (
        r.status().as_u16(),
        r.json().unwrap_or(serde_json::Value::Null),
    )
}

/// Wait for a simulator task to end; its exit status.
pub fn wait_task(s: &Sim, upid: &str) -> String {
    for _ in 0..500 {
        if let Some(x) = s.state().tasks.get(upid).and_then(|t| t.exitstatus.clone()) {
            return x;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("task {upid} did not end");
}

/// Run an API task (the answer's `data` is its UPID) to its end; panics
/// unless it was accepted and ended OK.
pub fn api_task(s: &Sim, answer: (u16, serde_json::Value)) {
    let (code, v) = answer;
    assert_eq!(code, 200, "{v}");
    let upid = v["data"].as_str().expect("a task id").to_string();
    assert_eq!(wait_task(s, &upid), "OK");
}

/// An ed25519 key `dir/name` made by ssh-keygen, and an allowed signers file
/// listing its public half as `principal` for kiln's namespace.
pub fn signing_key(dir: &Path, name: &str, principal: &str) -> (PathBuf, PathBuf) {
    let key = dir.join(name);
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key)
        .status()
        .expect("ssh-keygen runs (apt install openssh-client)");
    assert!(st.success());
    let public = std::fs::read_to_string(dir.join(format!("{name}.pub"))).unwrap();
    let allowed = dir.join(format!("{name}.allowed_signers"));
    std::fs::write(
        &allowed,
        format!("{principal} namespaces=\"kiln-image\" {}", public.trim()),
    )
    .unwrap();
    (key, allowed)
}

/// `kiln sign IMAGE --key KEY`, which must succeed.
pub fn sign(cwd: &Path, image: &Path, key: &Path) {
    let out = kiln(
        cwd,
        &[
            "sign",
            image.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success(), "kiln sign: {}", stderr(&out));
}
