//! Providers: where an environment's VMs live, behind one interface — the
//! `local` provider (QEMU on this host, in a network namespace) and Proxmox VE.
//!
//! A provider only creates, lists, stops and destroys VMs and opens TCP
//! connections into the environment's network; everything about order,
//! gates and safety lives in `deploy::env`. What a provider shows is the
//! truth: each VM carries its environment, slot, generation, image id and
//! values digest (as Proxmox tags, or in the local provider's VM record), so
//! the state is recoverable without any journal. A provider never touches a
//! VM that does not carry its environment's marks.

use anyhow::{Context, Result};
use serde::Serialize;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use crate::deploy::env::model::Network;

pub mod local;
pub mod netns;
pub(crate) mod proxmox;

/// One VM of an environment as its provider shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeVm {
    /// The provider's handle: a Proxmox VMID, a local VM's directory name.
    pub handle: String,
    /// Host name and VM name: `<env>-<slot>-g<generation>`.
    pub name: String,
    pub slot: String,
    pub generation: u32,
    /// The image's id (sha256 of its disk).
    pub image_id: String,
    /// Digest of the slot's values (secret references, never secret values).
    pub values_digest: String,
    pub address: Ipv4Addr,
    pub running: bool,
}

/// Everything a provider needs to make one VM.
#[derive(Debug, Clone)]
pub struct NewVm {
    pub env: String,
    pub name: String,
    pub slot: String,
    pub generation: u32,
    /// The image directory (`images/<name>/<version>`) and what its manifest says.
    pub image_dir: PathBuf,
    pub image_id: String,
    pub disk_file: PathBuf,
    pub disk_format: String,
    pub disk_virtual_size: u64,
    pub uefi: bool,
    /// The Proxmox node (ignored by the local provider).
    pub node: Option<String>,
    pub cores: u32,
    pub memory_mib: u32,
    /// The disk the VM sees, at least the image's virtual size.
    pub disk_bytes: u64,
    pub address: Ipv4Addr,
    pub network: Network,
    /// The rendered user-data (may hold secrets: never logged, never in VM config).
    pub user_data: String,
    /// Keys for the access user, so kiln's gates can log in.
    pub ssh_public_keys: Vec<String>,
    pub values_digest: String,
}

impl NewVm {
    /// Refuse a VM meant for another environment than the provider serves.
    pub fn check_env(&self, serves: &str) -> Result<()> {
        if self.env != serves {
            anyhow::bail!(
                "VM {} is for environment `{}`, this provider serves `{serves}`",
                self.name,
                self.env
            );
        }
        Ok(())
    }

    /// What the provider will show for this VM once it exists.
    pub fn shown(&self, handle: String, running: bool) -> NodeVm {
        NodeVm {
            handle,
            name: self.name.clone(),
            slot: self.slot.clone(),
            generation: self.generation,
            image_id: self.image_id.clone(),
            values_digest: self.values_digest.clone(),
            address: self.address,
            running,
        }
    }
}

/// A MAC address for VM `name` of environment `env`, the same every time:
/// QEMU's 52:54:00 prefix (locally administered, unicast) and three bytes of
/// the name's sha256.
pub(crate) fn mac_for(env: &str, name: &str) -> String {
    let h = crate::util::sha256_hex(format!("{env}/{name}").as_bytes());
    format!("52:54:00:{}:{}:{}", &h[0..2], &h[2..4], &h[4..6])
}

/// Where an environment's VMs live. One value serves one environment.
pub trait Provider {
    /// `local` or `proxmox`, for messages.
    fn kind(&self) -> &'static str;

    /// Prepare what every VM needs (the local provider's network namespace
    /// and bridge); idempotent.
    fn prepare(&self) -> Result<()>;

    /// The environment's VMs (only those carrying its marks).
    fn list(&self) -> Result<Vec<NodeVm>>;

    /// Create and start a VM. Idempotent: when a VM of this name exists
    /// already (an interrupted earlier run), it is returned as it is.
    fn create(&self, vm: &NewVm) -> Result<NodeVm>;

    /// A TCP connection to `addr` inside the environment's network.
    fn connect(&self, addr: SocketAddr, timeout: Duration) -> Result<TcpStream>;

    /// Stop a VM gracefully (ACPI power-down, so keepalived hands the VIP
    /// over), then hard after `grace`. Already stopped is fine.
    fn stop(&self, vm: &NodeVm, grace: Duration) -> Result<()>;

    /// Destroy a VM and its disks. Already gone is fine.
    fn destroy(&self, vm: &NodeVm) -> Result<()>;

    /// The last lines of the VM's console, to explain a failed gate.
    fn console_tail(&self, vm: &NodeVm) -> Option<String>;

    /// Remove what `prepare` made, once the environment has no VMs left.
    fn teardown(&self) -> Result<()>;

    /// Make the images available where the slots need them (Proxmox: publish
    /// a template to each node that lacks one); what was done, for people.
    /// The local provider boots image directories as they are.
    fn ensure_images(&self, _needs: &[ImageNeed], _progress: bool) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
}

/// An image an environment runs and the Proxmox nodes its slots are on.
#[derive(Debug, Clone)]
pub struct ImageNeed {
    pub dir: PathBuf,
    pub image_id: String,
    pub nodes: Vec<String>,
}

/// The provider an environment file names; `accel` is how the local
/// provider runs its VMs (KVM when it works, else TCG); `config` is the
/// kiln.toml holding Proxmox targets (default: `./kiln.toml`, then
/// `~/.config/kiln/config.toml`).
pub(crate) fn open(
    env: &crate::deploy::env::model::Environment,
    accel: crate::validate::Accel,
    config: Option<&std::path::Path>,
) -> Result<Box<dyn Provider>> {
    use crate::deploy::env::model::ProviderSpec;
    match &env.provider {
        ProviderSpec::Local => Ok(Box::new(
            local::LocalProvider::new(
                &env.name,
                &env.network,
                crate::deploy::env::journal::state_dir(&env.name)?,
            )?
            .with_accel(accel),
        )),
        ProviderSpec::Proxmox { target } => {
            let target = crate::deploy::pve::config::resolve(target.as_deref(), config, &|k| {
                std::env::var(k).ok()
            })
            .with_context(|| format!("{}: its Proxmox target", env.path.display()))?;
            let mut nodes: Vec<String> = env.slots().filter_map(|(_, s)| s.node.clone()).collect();
            nodes.sort();
            nodes.dedup();
            Ok(Box::new(proxmox::ProxmoxProvider::new(
                &env.name,
                &env.network,
                nodes,
                target,
                crate::deploy::env::journal::state_dir(&env.name)?,
            )?))
        }
    }
}
