//! No orphan etcd on any path: kube-sim (a labelled stand-in for K3s's
//! Kubernetes API, not Kubernetes) kills the etcd members it started when it
//! is dropped — also while a test panics — and when its binary is killed.
//! Being an integration test, this also makes `cargo test` build the binary.

mod common;
use common::is_running;
use kube_sim::{wait_until, KubeSim};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[test]
fn a_panicking_test_leaves_no_etcd_running() {
    let pids = Arc::new(Mutex::new(Vec::new()));
    let p2 = pids.clone();
    let r = std::thread::spawn(move || {
        let sim = KubeSim::start(&[("server-1", "10.0.0.11"), ("server-2", "10.0.0.12")]).unwrap();
        *p2.lock().unwrap() = sim.etcd_pids();
        panic!("a failing assertion in a test");
    })
    .join();
    assert!(r.is_err());
    let pids = pids.lock().unwrap().clone();
    assert_eq!(pids.len(), 2);
    let alive: Vec<u32> = pids.into_iter().filter(|p| is_running(*p)).collect();
    assert!(alive.is_empty(), "etcd still running: {alive:?}");
}

/// Kills the binary when the test ends, also on a failed assertion.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start the binary; its URL line and the etcd pids it printed.
fn start_binary(kubeconfig: &std::path::Path) -> (Running, String, Vec<u32>) {
    let mut child = Running(
        Command::new(env!("CARGO_BIN_EXE_kube-sim"))
            .args(["--server", "s1=10.0.0.11", "--server", "s2=10.0.0.12"])
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .env_remove("KUBE_SIM_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let out = BufReader::new(child.0.stdout.take().unwrap());
    let mut url = String::new();
    let mut pids = Vec::new();
    for line in out.lines() {
        let line = line.unwrap();
        if let Some(u) = line.split(" listening on ").nth(1) {
            url = u.to_string();
        }
        if let Some(p) = line.strip_prefix("etcd member pids: ") {
            pids = p.split(',').map(|x| x.parse().unwrap()).collect();
            break;
        }
    }
    (child, url, pids)
}

#[test]
fn killing_the_binary_leaves_no_etcd_running() {
    let tmp = tempfile::tempdir().unwrap();
    let kc = tmp.path().join("kubeconfig.yaml");
    let (mut bin, url, pids) = start_binary(&kc);
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    assert_eq!(pids.len(), 2);
    assert!(pids.iter().all(|p| is_running(*p)));
    let text = std::fs::read_to_string(&kc).unwrap();
    assert!(text.contains(&format!("server: {url}")), "{text}");
    assert_eq!(
        std::fs::metadata(&kc).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // SIGKILL: no destructor runs; the members die with the process.
    bin.0.kill().unwrap();
    bin.0.wait().unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || pids
            .iter()
            .all(|p| !is_running(*p))),
        "etcd outlived its kube-sim: {pids:?}"
    );
}

#[test]
fn the_binary_stops_its_etcd_members_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let (bin, _, pids) = start_binary(&tmp.path().join("kc.yaml"));
    assert_eq!(pids.len(), 2);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(bin.0.id() as libc::pid_t, libc::SIGTERM) };
    let mut bin = bin;
    let st = bin.0.wait().unwrap();
    assert!(st.success(), "{st}");
    assert!(pids.iter().all(|p| !is_running(*p)), "{pids:?}");
}
