//! `kube-sim`: a labelled STAND-IN for the Kubernetes API of a K3s HA cluster, backed by a
//! real etcd cluster, so kiln's rollouts can be tried without K3s. It is a simulator, not Kubernetes.

use anyhow::{bail, Context, Result};
use clap::Parser;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

/// A Kubernetes API simulator (a stand-in, not Kubernetes) for a K3s HA
/// cluster: each server is backed by a member of a real etcd cluster
/// (/usr/bin/etcd); nodes, pods and volumes are simulated.
#[derive(Parser)]
#[command(name = "kube-sim", version)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the URL is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    /// A server node, NAME=INTERNAL_IP (repeatable; default: server-1..3).
    #[arg(long = "server", value_name = "NAME=IP")]
    servers: Vec<String>,
    /// An agent node, NAME=INTERNAL_IP (repeatable).
    #[arg(long = "agent", value_name = "NAME=IP")]
    agents: Vec<String>,
    /// Write a kubeconfig for the stand-in here (mode 0600).
    #[arg(long)]
    kubeconfig: PathBuf,
    /// The Bearer token to accept (default: a fresh random one). Prefer the
    /// environment: argv is visible to other users.
    #[arg(long, env = "KUBE_SIM_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

fn pair(s: &str) -> Result<(String, String)> {
    match s.split_once('=') {
        Some((n, a)) if !n.is_empty() && !a.is_empty() => Ok((n.to_string(), a.to_string())),
        _ => bail!("{s:?} is not NAME=IP"),
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("kube-sim: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let a = Args::parse();
    let mut servers = a
        .servers
        .iter()
        .map(|s| pair(s))
        .collect::<Result<Vec<_>>>()?;
    if servers.is_empty() {
        servers = (1..=3)
            .map(|i| (format!("server-{i}"), format!("10.0.0.1{i}")))
            .collect();
    }
    let agents = a
        .agents
        .iter()
        .map(|s| pair(s))
        .collect::<Result<Vec<_>>>()?;
    let refs: Vec<(&str, &str)> = servers
        .iter()
        .map(|(n, a)| (n.as_str(), a.as_str()))
        .collect();
    let mut opts = kube_sim::Options::new(&refs);
    opts.listen = a.listen;
    opts.token = a.token;
    let sim = kube_sim::KubeSim::start_with(opts)?;
    for (n, addr) in &agents {
        sim.join_agent(
            n,
            addr,
            kube_sim::AgentScript {
                ready_after: Duration::ZERO,
                ready: true,
            },
        )?;
    }
    write_private(&a.kubeconfig, sim.kubeconfig().as_bytes())?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("cannot install signal handler")?;
    }
    let pids: Vec<String> = sim.etcd_pids().iter().map(u32::to_string).collect();
    println!(
        "kube-sim (a Kubernetes API stand-in backed by real etcd, not Kubernetes) listening on {}",
        sim.url()
    );
    println!("kubeconfig: {}", a.kubeconfig.display());
    println!("etcd member pids: {}", pids.join(","));
    std::io::stdout().flush()?;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(sim);
    Ok(())
}

/// Write through a temp file in the same directory, mode 0600, then rename:
/// the kubeconfig holds the token, and is never seen half-written.
fn write_private(path: &std::path::Path, data: &[u8]) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o600))?;
    tmp.write_all(data)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
