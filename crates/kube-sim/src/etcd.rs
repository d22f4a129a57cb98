//! The REAL etcd cluster behind the server nodes: one `etcd` process per member on loopback
//! ports, driven with `etcdctl`. Part of kube-sim, a labelled STAND-IN for K3s's API (not Kubernetes).
//!
//! Membership changes, learners, promotion refusals and quorum loss are
//! etcd's own behaviour (Debian's etcd-server 3.4): nothing here decides
//! them. Differences from K3s, which are the stand-in's: plain HTTP on
//! 127.0.0.1 with ports chosen free (K3s: TLS on the node address, ports
//! 2379/2380), and every process is started by this module.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The etcd and etcdctl programs (Debian: etcd-server, etcd-client).
const ETCD: &str = "etcd";
const ETCDCTL: &str = "etcdctl";

/// One member as etcd reports it (`etcdctl member list`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: u64,
    /// Empty until the member's process has started and published its name
    /// (etcd lists an added, not yet started member without a name).
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
    pub is_learner: bool,
}

/// A process this cluster started.
struct Proc {
    name: String,
    client_url: String,
    peer_url: String,
    child: Option<Child>,
    /// Added with `--learner` and not yet promoted (as far as we know).
    learner: bool,
    killed: bool,
}

/// Spawns every etcd from one long-lived thread, so that
/// `PR_SET_PDEATHSIG` (which fires when the *thread* that forked exits)
/// kills the members exactly when the whole process dies, whatever thread
/// asked for the spawn: no orphan etcd even on SIGKILL or abort.
struct Spawner {
    tx: Option<mpsc::Sender<(Command, mpsc::Sender<std::io::Result<Child>>)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Spawner {
    fn new() -> Spawner {
        let (tx, rx) = mpsc::channel::<(Command, mpsc::Sender<std::io::Result<Child>>)>();
        let thread = std::thread::Builder::new()
            .name("kube-sim-etcd-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawn the etcd spawner thread");
        Spawner {
            tx: Some(tx),
            thread: Some(thread),
        }
    }

    fn spawn(&self, mut cmd: Command) -> std::io::Result<Child> {
        use std::os::unix::process::CommandExt;
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: prctl and getppid are async-signal-safe; nothing else runs
        // between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died before prctl took effect.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let (rtx, rrx) = mpsc::channel();
        self.tx
            .as_ref()
            .ok_or_else(|| std::io::Error::other("spawner stopped"))?
            .send((cmd, rtx))
            .map_err(|_| std::io::Error::other("spawner stopped"))?;
        rrx.recv()
            .map_err(|_| std::io::Error::other("spawner stopped"))?
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A real etcd cluster on loopback; every member process is killed on drop.
pub struct Cluster {
    dir: PathBuf,
    token: String,
    procs: Mutex<Vec<Proc>>,
    spawner: Spawner,
}

/// How long one etcdctl request may take; the apiserver's etcd health check
/// uses 2s (storagebackend.DefaultHealthcheckTimeout).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

impl Cluster {
    /// Start a new cluster with these member names, all voters (as a formed
    /// K3s HA control plane has), and wait until it serves a linearizable read.
    pub fn start(dir: &Path, token: &str, names: &[String]) -> Result<Cluster> {
        let c = Cluster {
            dir: dir.to_path_buf(),
            token: token.to_string(),
            procs: Mutex::new(Vec::new()),
            spawner: Spawner::new(),
        };
        if names.is_empty() {
            return Ok(c);
        }
        let ports = free_ports(names.len() * 2)?;
        let mut procs = Vec::new();
        for (i, name) in names.iter().enumerate() {
            procs.push(Proc {
                name: name.clone(),
                client_url: format!("http://127.0.0.1:{}", ports[2 * i]),
                peer_url: format!("http://127.0.0.1:{}", ports[2 * i + 1]),
                child: None,
                learner: false,
                killed: false,
            });
        }
        let initial: Vec<String> = procs
            .iter()
            .map(|p| format!("{}={}", p.name, p.peer_url))
            .collect();
        let initial = initial.join(",");
        for p in &mut procs {
            p.child = Some(c.spawn_member(p, &initial, "new")?);
        }
        *c.lock() = procs;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match c.health() {
                Ok(()) => break,
                Err(e) if Instant::now() > deadline => {
                    bail!("the etcd cluster did not become healthy in 60s: {e}")
                }
                Err(_) => {
                    c.check_alive()?;
                    std::thread::sleep(Duration::from_millis(50))
                }
            }
        }
        Ok(c)
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Proc>> {
        self.procs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fail early when a member we started has exited on its own (a port
    /// taken, a bad flag): its log says why.
    fn check_alive(&self) -> Result<()> {
        let mut procs = self.lock();
        for p in procs.iter_mut().filter(|p| !p.killed) {
            if let Some(child) = p.child.as_mut() {
                if let Ok(Some(st)) = child.try_wait() {
                    let log = std::fs::read_to_string(self.dir.join(format!("{}.log", p.name)))
                        .unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(3).collect();
                    bail!(
                        "etcd member {} exited ({st}): {}",
                        p.name,
                        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                    );
                }
            }
        }
        Ok(())
    }

    fn spawn_member(&self, p: &Proc, initial_cluster: &str, state: &str) -> Result<Child> {
        let data = self.dir.join(&p.name);
        let log = self.dir.join(format!("{}.log", p.name));
        let mut cmd = Command::new(ETCD);
        cmd.arg("--name")
            .arg(&p.name)
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen-client-urls")
            .arg(&p.client_url)
            .arg("--advertise-client-urls")
            .arg(&p.client_url)
            .arg("--listen-peer-urls")
            .arg(&p.peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&p.peer_url)
            .arg("--initial-cluster")
            .arg(initial_cluster)
            .arg("--initial-cluster-state")
            .arg(state)
            .arg("--initial-cluster-token")
            .arg(&self.token)
            // Lightweight: a small backend quota and frequent snapshots
            // (K3s uses 10000); raft timing stays etcd's default
            // (100ms heartbeat, 1s election).
            .arg("--quota-backend-bytes")
            .arg("16777216")
            .arg("--snapshot-count")
            .arg("1000")
            .arg("--logger")
            .arg("zap")
            .arg("--log-level")
            .arg("warn")
            .arg("--log-outputs")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.spawner
            .spawn(cmd)
            .with_context(|| format!("cannot run {ETCD} (apt install etcd-server)"))
    }

    /// Client URLs of the voters we have not killed: where etcdctl is pointed
    /// (a learner answers most requests with "rpc not supported for learner").
    fn endpoints(&self) -> Vec<String> {
        let procs = self.lock();
        let live: Vec<String> = procs
            .iter()
            .filter(|p| !p.killed && !p.learner)
            .map(|p| p.client_url.clone())
            .collect();
        if live.is_empty() {
            procs.iter().map(|p| p.client_url.clone()).collect()
        } else {
            live
        }
    }

    /// Run etcdctl; Ok(stdout) or Err(etcd's error text, e.g.
    /// "etcdserver: unhealthy cluster").
    fn ctl(&self, args: &[&str]) -> std::result::Result<String, String> {
        let endpoints = self.endpoints();
        if endpoints.is_empty() {
            return Err("no etcd members".into());
        }
        let out = Command::new(ETCDCTL)
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .arg("--dial-timeout=1s")
            .arg(format!("--command-timeout={}s", COMMAND_TIMEOUT.as_secs()))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {ETCDCTL} (apt install etcd-client): {e}"))?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        let err = String::from_utf8_lossy(&out.stderr);
        // etcdctl ends with "Error: <text>" after its JSON warning lines.
        let msg = err
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("Error: "))
            .unwrap_or_else(|| err.trim())
            .to_string();
        Err(msg)
    }

    /// The member list as etcd reports it. In etcd 3.4 it is served from the
    /// answering member's local state, so it works without quorum.
    pub fn members(&self) -> std::result::Result<Vec<Member>, String> {
        let out = self.ctl(&["member", "list", "-w", "json"])?;
        let v: Value = serde_json::from_str(&out).map_err(|e| format!("etcdctl output: {e}"))?;
        let strings = |m: &Value, k: &str| -> Vec<String> {
            m[k].as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        let list = v["members"].as_array().cloned().unwrap_or_default();
        let members: Vec<Member> = list
            .iter()
            .map(|m| Member {
                id: m["ID"].as_u64().unwrap_or(0),
                name: m["name"].as_str().unwrap_or("").to_string(),
                peer_urls: strings(m, "peerURLs"),
                client_urls: strings(m, "clientURLs"),
                is_learner: m["isLearner"].as_bool().unwrap_or(false),
            })
            .collect();
        // Keep our own view of who is a learner in step with etcd's.
        let mut procs = self.lock();
        for p in procs.iter_mut() {
            if let Some(m) = members.iter().find(|m| m.peer_urls.contains(&p.peer_url)) {
                p.learner = m.is_learner;
            }
        }
        Ok(members)
    }

    /// The id of the member with this name (or, not yet started, our peer URL).
    fn find(&self, name: &str) -> std::result::Result<Option<u64>, String> {
        let peer = self
            .lock()
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.peer_url.clone());
        Ok(self
            .members()?
            .into_iter()
            .find(|m| m.name == name || peer.as_ref().is_some_and(|u| m.peer_urls.contains(u)))
            .map(|m| m.id))
    }

    /// The kube-apiserver's etcd check: a linearizable Get through the
    /// client with a 2s timeout (k8s.io/apiserver
    /// pkg/storage/storagebackend/factory/etcd3.go newETCD3Check); it fails
    /// for real when the cluster has no quorum.
    pub fn health(&self) -> std::result::Result<(), String> {
        self.ctl(&["get", "/registry/health"]).map(|_| ())
    }

    /// `etcdctl member add NAME --learner`, then start the member's etcd with
    /// the initial cluster etcd printed, state "existing" — as K3s's join does
    /// (k3s pkg/etcd/etcd.go join: MemberAddAsLearner, then
    /// InitialOptions{Cluster, State: "existing"}). etcd's refusals come
    /// back as Err (K3s retries "too many learner members" and "unhealthy
    /// cluster").
    pub fn add_learner(&self, name: &str) -> std::result::Result<(), String> {
        let ports = free_ports(2).map_err(|e| e.to_string())?;
        let client_url = format!("http://127.0.0.1:{}", ports[0]);
        let peer_url = format!("http://127.0.0.1:{}", ports[1]);
        let out = self.ctl(&[
            "member",
            "add",
            name,
            "--learner",
            &format!("--peer-urls={peer_url}"),
        ])?;
        let initial = out
            .lines()
            .find_map(|l| l.strip_prefix("ETCD_INITIAL_CLUSTER=\""))
            .and_then(|l| l.strip_suffix('"'))
            .ok_or_else(|| format!("etcdctl member add printed no ETCD_INITIAL_CLUSTER: {out}"))?
            .to_string();
        let mut p = Proc {
            name: name.to_string(),
            client_url,
            peer_url,
            child: None,
            learner: true,
            killed: false,
        };
        p.child = Some(
            self.spawn_member(&p, &initial, "existing")
                .map_err(|e| format!("{e:#}"))?,
        );
        self.lock().push(p);
        Ok(())
    }

    /// `etcdctl member promote`: etcd refuses ("can only promote a learner
    /// member which is in sync with leader") until the learner caught up.
    pub fn promote(&self, name: &str) -> std::result::Result<(), String> {
        let id = self
            .find(name)?
            .ok_or_else(|| format!("etcdserver: member {name} not found"))?;
        self.ctl(&["member", "promote", &format!("{id:x}")])?;
        if let Some(p) = self.lock().iter_mut().find(|p| p.name == name) {
            p.learner = false;
        }
        Ok(())
    }

    /// `etcdctl member remove`, then stop that member's process (a removed
    /// etcd 3.4 member shuts itself down; whatever is left is killed).
    /// Ok(false): no such member.
    pub fn remove(&self, name: &str) -> std::result::Result<bool, String> {
        let Some(id) = self.find(name)? else {
            return Ok(false);
        };
        match self.ctl(&["member", "remove", &format!("{id:x}")]) {
            Ok(_) => {}
            Err(e) if e.contains("member not found") => return Ok(false),
            Err(e) => return Err(e),
        }
        let mut procs = self.lock();
        if let Some(i) = procs.iter().position(|p| p.name == name) {
            let mut p = procs.remove(i);
            drop(procs);
            if let Some(mut child) = p.child.take() {
                let deadline = Instant::now() + Duration::from_secs(2);
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = child.try_wait() {
                        return Ok(true);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        Ok(true)
    }

    /// SIGKILL a member's process: a real, abrupt member failure.
    pub fn kill(&self, name: &str) -> Result<()> {
        let mut procs = self.lock();
        let p = procs
            .iter_mut()
            .find(|p| p.name == name)
            .with_context(|| format!("no etcd member process named {name}"))?;
        if let Some(child) = p.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        p.killed = true;
        Ok(())
    }

    /// Whether the member answers on its client URL, as K3s checks each
    /// member before setting EtcdIsVoter (k3s pkg/etcd/etcd.go
    /// manageLearners → getETCDStatus on member.ClientURLs[0]). Err carries
    /// K3s's wording: "failed to check etcd member status: <cause>".
    pub fn probe(client_url: &str) -> std::result::Result<(), String> {
        let wrap = |e: String| format!("failed to check etcd member status: {e}");
        let hostport = client_url
            .strip_prefix("http://")
            .ok_or_else(|| wrap(format!("unsupported URL {client_url}")))?;
        let addr = hostport
            .parse()
            .map_err(|e| wrap(format!("bad address {hostport}: {e}")))?;
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))
            .map_err(|e| wrap(e.to_string()))?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        s.write_all(format!("GET /version HTTP/1.0\r\nHost: {hostport}\r\n\r\n").as_bytes())
            .map_err(|e| wrap(e.to_string()))?;
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        if buf.starts_with(b"HTTP/1.0 200") || buf.starts_with(b"HTTP/1.1 200") {
            Ok(())
        } else {
            Err(wrap("context deadline exceeded".into()))
        }
    }

    /// Process ids of the members still running (for tests: no orphans).
    pub fn pids(&self) -> Vec<u32> {
        self.lock()
            .iter()
            .filter(|p| !p.killed)
            .filter_map(|p| p.child.as_ref().map(|c| c.id()))
            .collect()
    }
}

impl Cluster {
    /// Kill every member process (idempotent).
    pub fn shutdown(&self) {
        let mut procs = self.lock();
        for p in procs.iter_mut() {
            if let Some(mut child) = p.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            p.killed = true;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Loopback ports free right now, all held open together while chosen so
/// they are distinct.
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()
        .context("cannot pick free loopback ports")?;
    Ok(listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()).unwrap_or(0))
        .collect())
}
