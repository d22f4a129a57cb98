//! `pve-sim`: a labelled STAND-IN for the Proxmox VE API, so publishing can be
//! tested and tried without a Proxmox cluster. It is a simulator, not Proxmox.

use anyhow::{Context, Result};
use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;

/// A Proxmox VE API simulator (a stand-in, not Proxmox): node `pve` (or
/// --nodes), storages `local` (iso, vztmpl, import), `local-dir`,
/// `local-lvm` and `local-zfs` (images) on each node, and `nfs` shared by all.
#[derive(Parser)]
#[command(name = "pve-sim", version)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the address is printed).
    #[arg(long, default_value = "127.0.0.1:8006")]
    listen: std::net::SocketAddr,
    /// The one API token accepted, USER@REALM!TOKENID=SECRET. Prefer
    /// PVE_SIM_TOKEN in the environment: argv is visible to other users.
    #[arg(long, env = "PVE_SIM_TOKEN", hide_env_values = true)]
    token: String,
    /// Directory for uploads and volumes (default: a temp dir removed on exit).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// PEM certificate (chain) to serve HTTPS, with --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Seconds each task runs.
    #[arg(long, default_value_t = 0.2)]
    task_seconds: f64,
    /// Node names of the simulated cluster, comma-separated (default: pve).
    #[arg(long, value_delimiter = ',', default_value = "pve")]
    nodes: Vec<String>,
    /// PVE version reported by /version.
    #[arg(long, default_value = "8.4.1")]
    pve_version: String,
    /// Inject a fault, OP:KIND[*COUNT]; OP is upload, create, template, clone,
    /// destroy, volume-delete, status or shutdown; KIND is 500, drop, fail,
    /// slow=SECS, lock-timeout, 400, race or (shutdown) ignore-acpi: the
    /// guest ignores the power button. Repeatable. At runtime (simulator-only
    /// endpoint, not part of PVE): POST /api2/json/_sim/faults with spec=....
    #[arg(long)]
    fault: Vec<String>,
    /// Give the token only these privileges, PATH=PRIV[,PRIV...], inherited
    /// below PATH (repeatable). Without --acl the token may do everything.
    #[arg(long)]
    acl: Vec<String>,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("pve-sim: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let a = Args::parse();
    pve_sim::check_token_shape(&a.token)?;
    let tmp;
    let data_dir = match a.data_dir {
        Some(d) => d,
        None => {
            tmp = tempfile::Builder::new().prefix("pve-sim-").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let mut cfg = pve_sim::SimConfig::new(&a.token, &data_dir);
    cfg.listen = a.listen;
    cfg.tls = a.tls_cert.zip(a.tls_key);
    cfg.task_delay = Duration::from_secs_f64(a.task_seconds);
    cfg.version = a.pve_version;
    cfg.nodes = a.nodes;
    cfg.faults = pve_sim::parse_faults(&a.fault)?;
    if !a.acl.is_empty() {
        cfg.acl = Some(pve_sim::parse_acl(&a.acl).map_err(anyhow::Error::msg)?);
    }
    let sim = std::sync::Arc::new(pve_sim::Sim::start(cfg)?);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("cannot install signal handler")?;
    }
    println!(
        "pve-sim (Proxmox VE API stand-in) listening on {}",
        sim.url()
    );
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
    sim.stop();
    Ok(())
}
