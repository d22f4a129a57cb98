//! `kiln env` end to end on the local provider: real LB VMs (QEMU, TCG,
//! Secure Boot) in a network namespace kiln makes, in front of two K3s API
//! server STAND-INS (TLS listeners on the servers' pool addresses inside the
//! namespace that answer `/readyz` with 401, as K3s does to anonymous clients;
//! they are not K3s).
//!
//! One test, because every boot costs a minute or more under TCG:
//! 1. `kiln env apply` bootstraps two LB slots (keepalived VRRP between them);
//! 2. a new LB image is rolled out blue-green while a probe inside the
//!    namespace opens a TCP connection to VIP:6443 every 100 ms: no probe
//!    fails, and the longest gap between answered probes is printed;
//! 3. another rollout is cut off with `kill -9` once its first new VM
//!    exists, and a second `kiln env apply` completes it;
//! 4. `kiln env destroy` leaves no VM, QEMU process or namespace.
//!
//! Root is required (namespaces, taps), as in CI. Nothing leaves the namespace.

mod common;

use kiln::deploy::providers::local::namespace;
use kiln::deploy::providers::netns;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 10);
const SERVERS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 78, 0, 31), Ipv4Addr::new(10, 78, 0, 41)];

fn kiln() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.env("KILN_NO_PROGRESS", "1");
    c
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Two LB images with different ids: the recipe as it is, and with one
/// overlay file changed (as a new release would change it).
fn lb_images(work: &Path) -> (PathBuf, PathBuf) {
    let root = common::repo();
    let project = work.join("project");
    std::fs::create_dir_all(&project).unwrap();
    let st = Command::new("cp")
        .arg("-a")
        .arg(root.join("recipes"))
        .arg(root.join("overlays"))
        .arg(&project)
        .status()
        .unwrap();
    assert!(st.success());
    let a = common::build_image(&project, "recipes/lb.toml", &project.join("out-a"));
    let conf = project.join("overlays/base/etc/ssh/sshd_config.d/50-kiln.conf");
    let mut s = std::fs::read_to_string(&conf).unwrap();
    s.push_str("# release b\n");
    std::fs::write(&conf, s).unwrap();
    let b = common::build_image(&project, "recipes/lb.toml", &project.join("out-b"));
    (a, b)
}

fn env_file(dir: &Path, name: &str, image: &Path, file: &str) -> PathBuf {
    let recipe = dir.join("project/recipes/lb.toml");
    let text = format!(
        r#"name = "{name}"
[provider]
kind = "local"
[network]
cidr = "10.78.0.0/24"
gateway = "10.78.0.1"
vip = "{VIP}"
[roles.lb]
recipe = "{recipe}"
image = "{image}"
cores = 1
memory = 1024
skip_checks = [
  "backend servers come from user-data, every address of the pool",
  "unicast peers are the pools but this node's own address",
  "haproxy counts only a backend serving TLS",
]
[roles.lb.values]
virtual_router_id = 61
backends = [{{ name = "server-1", addresses = ["{s1}"] }}, {{ name = "server-2", addresses = ["{s2}"] }}]
[[roles.lb.slots]]
name = "lb-1"
addresses = ["10.78.0.11", "10.78.0.21", "10.78.0.51"]
values = {{ priority = 150 }}
[[roles.lb.slots]]
name = "lb-2"
addresses = ["10.78.0.12", "10.78.0.22", "10.78.0.52"]
values = {{ priority = 100 }}
[[checks]]
name = "the VIP answers on the API port"
tcp = "vip:6443"
timeout = 30
"#,
        recipe = recipe.display(),
        image = image.display(),
        s1 = SERVERS[0],
        s2 = SERVERS[1],
    );
    let p = dir.join(file);
    std::fs::write(&p, text).unwrap();
    p
}

/// The K3s API server stand-ins: TLS on :6443 of each server address (a
/// throwaway self-signed certificate), answering every request with 401 as
/// K3s answers an anonymous `/readyz`.
fn start_api_stand_ins(ns: &str, dir: &Path, stop: Arc<AtomicBool>) {
    let key = dir.join("stand-in.key");
    let cert = dir.join("stand-in.crt");
    let st = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=k3s-stand-in",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl runs (apt install openssl)");
    assert!(st.success());
    let certs = rustls_pemfile_certs(&cert);
    let key = rustls_pemfile_key(&key);
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap(),
    );
    for addr in SERVERS {
        netns::add_address(ns, "kbr0", addr, 24).unwrap();
        let listener = netns::listen(ns, SocketAddr::from((addr, 6443))).unwrap();
        listener.set_nonblocking(true).unwrap();
        let (config, stop) = (config.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((tcp, _)) => {
                        let config = config.clone();
                        std::thread::spawn(move || serve_401(tcp, config));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        });
    }
}

fn rustls_pemfile_certs(p: &Path) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_file_iter(p)
        .unwrap()
        .map(|c| c.unwrap())
        .collect()
}

fn rustls_pemfile_key(p: &Path) -> rustls::pki_types::PrivateKeyDer<'static> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::PrivateKeyDer::from_pem_file(p).unwrap()
}

fn serve_401(tcp: TcpStream, config: Arc<rustls::ServerConfig>) {
    use std::io::{Read, Write};
    let _ = tcp.set_nonblocking(false);
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
    let Ok(conn) = rustls::ServerConnection::new(config) else {
        return;
    };
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut buf = [0u8; 4096];
    if tls.read(&mut buf).unwrap_or(0) > 0 {
        let _ = tls.write_all(
            b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
        );
        let _ = tls.flush();
    }
}

/// Connections to VIP:6443 from inside the namespace, every 100 ms, each
/// with a 3 s connect timeout (a graceful VRRP handover takes about one
/// advert interval).
struct Probe {
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<(u64, u64, Duration)>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Probe {
    fn start(ns: &str) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new((0u64, 0u64, Duration::ZERO)));
        let (s, st, ns) = (stop.clone(), stats.clone(), ns.to_string());
        let handle = std::thread::spawn(move || {
            let mut last_ok = Instant::now();
            while !s.load(Ordering::SeqCst) {
                let t = Instant::now();
                let ok = netns::connect(&ns, SocketAddr::from((VIP, 6443)), Duration::from_secs(3))
                    .is_ok();
                let mut g = st.lock().unwrap();
                if ok {
                    g.0 += 1;
                    g.2 = g.2.max(last_ok.elapsed());
                    last_ok = Instant::now();
                } else {
                    g.1 += 1;
                }
                drop(g);
                std::thread::sleep(Duration::from_millis(100).saturating_sub(t.elapsed()));
            }
        });
        Probe {
            stop,
            stats,
            handle: Some(handle),
        }
    }

    /// (answered, failed, longest gap between answered probes)
    fn finish(mut self) -> (u64, u64, Duration) {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.take().unwrap().join().unwrap();
        *self.stats.lock().unwrap()
    }
}

struct Lab {
    dir: tempfile::TempDir,
    state: PathBuf,
    name: String,
    stop: Arc<AtomicBool>,
}

impl Lab {
    fn run(&self, args: &[&str]) -> Output {
        kiln()
            .args(args)
            .env("KILN_STATE", &self.state)
            .output()
            .unwrap()
    }

    fn apply(&self, env: &Path) -> Output {
        self.run(&[
            "env",
            "apply",
            env.to_str().unwrap(),
            "--yes",
            "--accel",
            "tcg",
        ])
    }

    fn vms(&self, env: &Path) -> Vec<(String, String, bool)> {
        let o = self.run(&[
            "env",
            "status",
            env.to_str().unwrap(),
            "--json",
            "--accel",
            "tcg",
        ]);
        assert!(o.status.success(), "{}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let mut out: Vec<_> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                (
                    l["name"].as_str().unwrap().to_string(),
                    l["image_id"].as_str().unwrap().to_string(),
                    l["current"].as_bool().unwrap(),
                )
            })
            .collect();
        out.sort();
        out
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let env = self.dir.path().join("lab-a.toml");
        let _ = self.run(&[
            "env",
            "destroy",
            env.to_str().unwrap(),
            "--yes",
            "--accel",
            "tcg",
        ]);
        let _ = netns::delete(&namespace(&self.name));
    }
}

fn qemu_processes_of(name: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .filter(|c| {
            let c = String::from_utf8_lossy(c);
            c.contains("qemu-system") && c.contains(name)
        })
        .count()
}

#[test]
fn lbs_are_bootstrapped_replaced_blue_green_without_losing_the_vip_and_recover_from_kill_9() {
    // SAFETY: geteuid(2) cannot fail.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root (network namespaces, taps), as CI has"
    );
    let dir = tempfile::Builder::new()
        .prefix("kenv")
        .tempdir_in("/tmp")
        .unwrap();
    let name = format!("e{}", std::process::id());
    let lab = Lab {
        state: dir.path().join("s"),
        name: name.clone(),
        stop: Arc::new(AtomicBool::new(false)),
        dir,
    };
    let (image_a, image_b) = lb_images(lab.dir.path());
    let env_a = env_file(lab.dir.path(), &name, &image_a, "lab-a.toml");

    // 1. Bootstrap.
    let t = Instant::now();
    let o = lab.apply(&env_a);
    assert!(o.status.success(), "bootstrap failed:\n{}", text(&o));
    eprintln!(
        "bootstrap of two LB slots: {:.0} s",
        t.elapsed().as_secs_f64()
    );
    let ns = namespace(&name);
    start_api_stand_ins(&ns, lab.dir.path(), lab.stop.clone());
    let first = lab.vms(&env_a);
    assert_eq!(
        first.iter().map(|v| v.0.as_str()).collect::<Vec<_>>(),
        vec![format!("{name}-lb-1-g0"), format!("{name}-lb-2-g0")]
    );

    // 2. A new image, rolled out while the VIP is probed.
    let env_b = env_file(lab.dir.path(), &name, &image_b, "lab-b.toml");
    let plan = lab.run(&["env", "plan", env_b.to_str().unwrap(), "--accel", "tcg"]);
    assert!(text(&plan).contains("2 to replace"), "{}", text(&plan));
    let probe = Probe::start(&ns);
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    let o = lab.apply(&env_b);
    let rollout = t.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let (answered, failed, gap) = probe.finish();
    assert!(o.status.success(), "rollout failed:\n{}", text(&o));
    eprintln!(
        "rollout of two LB slots: {:.0} s ({:.0} s a slot); VIP probes: {answered} answered, {failed} failed, longest gap {:.2} s",
        rollout.as_secs_f64(),
        rollout.as_secs_f64() / 2.0,
        gap.as_secs_f64()
    );
    assert_eq!(failed, 0, "the VIP stopped answering during the rollout");
    let second = lab.vms(&env_b);
    assert_eq!(
        second.iter().map(|v| v.0.as_str()).collect::<Vec<_>>(),
        vec![format!("{name}-lb-1-g1"), format!("{name}-lb-2-g1")],
        "only the new generation remains"
    );
    assert!(second.iter().all(|v| v.2), "every VM runs the new image");

    // 3. kill -9 in the middle of the next rollout; apply again completes it.
    let mut child = kiln()
        .args([
            "env",
            "apply",
            env_a.to_str().unwrap(),
            "--yes",
            "--accel",
            "tcg",
        ])
        .env("KILN_STATE", &lab.state)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let marker = lab
        .state
        .join(format!("envs/{name}/local/vms/{name}-lb-1-g2/vm.json"));
    let deadline = Instant::now() + Duration::from_secs(300);
    while !marker.exists() {
        assert!(
            Instant::now() < deadline,
            "the rollout never created its first VM"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(5));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let o = lab.apply(&env_a);
    assert!(
        o.status.success(),
        "apply after kill -9 failed:\n{}",
        text(&o)
    );
    let third = lab.vms(&env_a);
    assert_eq!(
        third.iter().map(|v| v.0.as_str()).collect::<Vec<_>>(),
        vec![format!("{name}-lb-1-g2"), format!("{name}-lb-2-g2")]
    );
    assert!(netns::connect(&ns, SocketAddr::from((VIP, 6443)), Duration::from_secs(3)).is_ok());

    // 4. Destroy leaves nothing.
    let o = lab.run(&[
        "env",
        "destroy",
        env_a.to_str().unwrap(),
        "--yes",
        "--accel",
        "tcg",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(qemu_processes_of(&name), 0);
    assert!(!netns::exists(&ns));
}
