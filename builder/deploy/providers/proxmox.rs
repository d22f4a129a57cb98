//! The Proxmox VE provider: each VM of an environment is a linked clone of the
//! template `kiln publish` made on its slot's node, with its user-data on a NoCloud ISO uploaded through the API.
//!
//! Everything goes through the Proxmox HTTP API (no SSH into Proxmox, no
//! snippets). Per VM, in order, each step idempotent:
//! 1. clone the node's template of the image (`POST …/clone`, linked where
//!    the storage allows). The clone request already carries the VM's name
//!    and a description with kiln's marks (environment, slot, generation,
//!    image id, values digest, address, seed volume; never a secret), so a
//!    VM never exists without them once its clone task ends;
//! 2. upload the seed (`user-data` with its secrets, `meta-data`,
//!    `network-config`) as an `iso` volume and set cores, memory, tags,
//!    `net0` (with the MAC the network-config matches), `ide2` (the seed, in
//!    place of the template's Proxmox cloud-init drive) and `onboot`;
//! 3. grow the boot disk to the role's size; 4. start it.
//!
//! A clone whose task was still running when kiln died shows no config yet
//! (qemu-server PVE/API2/Qemu.pm, `clone_vm`, writes it when the task ends):
//! its VMID is noted in the environment's state directory before the clone
//! is asked for, so the next run waits for it and takes it over instead of
//! cloning again. A VM is listed only when its description carries this
//! environment's marks; stop is an ACPI shutdown with a forced stop after
//! the grace time; destroy purges the VM and then deletes its seed volume
//! (Proxmox does not: an attached ISO is not owned by the VM).

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use super::{ImageNeed, NewVm, NodeVm, Provider};
use crate::deploy::env::model::Network;
use crate::deploy::publish::naming;
use crate::deploy::pve::access::{self, Need};
use crate::deploy::pve::client::seg;
use crate::deploy::pve::config::Target;
use crate::deploy::pve::errors::{is_missing, ApiError};
use crate::deploy::pve::vms::{destroy_vm, list_vms, vm_config, wait_unlocked};
use crate::deploy::pve::volumes::{check_storage, delete_volume, volume_exists};
use crate::deploy::pve::Pve;

/// Description keys of an environment's VM (read back by `list`).
mod keys {
    pub(super) const ENV: &str = "kiln-env";
    pub(super) const SLOT: &str = "kiln-slot";
    pub(super) const GENERATION: &str = "kiln-generation";
    pub(super) const IMAGE_ID: &str = "kiln-image-id";
    pub(super) const VALUES: &str = "kiln-values";
    pub(super) const ADDRESS: &str = "kiln-address";
    pub(super) const SEED: &str = "kiln-seed";
}

/// Tag every environment VM carries (templates carry `kiln`).
pub(crate) const ENV_VM_TAG: &str = "kiln-env";

/// An environment's VMs on a Proxmox VE cluster.
pub(crate) struct ProxmoxProvider {
    env: String,
    network: Network,
    target: Target,
    pve: Pve,
    /// The nodes the environment's slots run on.
    nodes: Vec<String>,
    /// Where pending clones are noted (the environment's state directory).
    state_dir: PathBuf,
}

/// A clone asked for but not yet seen through (see the module comment).
#[derive(serde::Serialize, serde::Deserialize)]
struct Pending {
    node: String,
    vmid: u32,
}

impl ProxmoxProvider {
    pub(crate) fn new(
        env_name: &str,
        network: &Network,
        nodes: Vec<String>,
        target: Target,
        state_dir: PathBuf,
    ) -> Result<Self> {
        let pve = Pve::connect(&target)?;
        Ok(ProxmoxProvider {
            env: env_name.to_string(),
            network: network.clone(),
            target,
            pve,
            nodes,
            state_dir,
        })
    }

    fn iso_storage(&self) -> &str {
        &self.target.cfg.iso_storage
    }

    /// The description a VM is cloned with: kiln's marks, no secrets.
    fn description(&self, vm: &NewVm, seed: &str) -> String {
        format!(
            "VM of kiln environment {env}. Lines starting with kiln- are read by kiln; do not edit them.\n\n\
             {}: {env}\n{}: {}\n{}: {}\n{}: {}\n{}: {}\n{}: {}\n{}: {seed}\n",
            keys::ENV,
            keys::SLOT,
            vm.slot,
            keys::GENERATION,
            vm.generation,
            keys::IMAGE_ID,
            vm.image_id,
            keys::VALUES,
            vm.values_digest,
            keys::ADDRESS,
            vm.address,
            keys::SEED,
            env = self.env,
        )
    }

    /// Tags for people and Proxmox's UI; `list` trusts the description.
    fn tags(&self, vm: &NewVm) -> String {
        [
            ENV_VM_TAG.to_string(),
            naming::tag(&format!("env-{}", self.env)),
            naming::tag(&format!("slot-{}", vm.slot)),
            format!("gen-{}", vm.generation),
            format!(
                "{}{}",
                naming::ID_TAG_PREFIX,
                naming::tag(vm.image_id.get(..12).unwrap_or(&vm.image_id))
            ),
        ]
        .join(";")
    }

    /// The seed ISO's volume for a VM.
    fn seed_volume(&self, vm_name: &str) -> String {
        format!(
            "{}:iso/{}",
            self.iso_storage(),
            naming::pve_file_name(&format!("kiln-{vm_name}-cidata.iso"))
        )
    }

    fn pending_path(&self, name: &str) -> PathBuf {
        self.state_dir
            .join("proxmox-pending")
            .join(format!("{name}.json"))
    }

    fn note_pending(&self, name: &str, p: &Pending) -> Result<()> {
        let path = self.pending_path(name);
        std::fs::create_dir_all(path.parent().expect("has a parent"))?;
        crate::util::write_atomic(&path, &serde_json::to_vec(p)?)
    }

    fn pending(&self, name: &str) -> Option<Pending> {
        let text = std::fs::read(self.pending_path(name)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    fn forget_pending(&self, name: &str) {
        let _ = std::fs::remove_file(self.pending_path(name));
    }

    /// The template of `image_id` on `node`, made by `kiln publish`.
    fn template_on(&self, node: &str, image_id: &str) -> Result<Option<u32>> {
        Ok(
            crate::deploy::templates::list(&self.pve, &[node.to_string()])?
                .into_iter()
                .find(|t| t.image_id == image_id)
                .map(|t| t.vmid),
        )
    }

    /// The VM with this environment's marks and this name, if any.
    fn find(&self, name: &str) -> Result<Option<(NodeVm, String)>> {
        Ok(self.marked()?.into_iter().find(|(vm, _)| vm.name == name))
    }

    /// Every VM carrying this environment's marks, with its node.
    fn marked(&self) -> Result<Vec<(NodeVm, String)>> {
        let prefix = format!("{}-", self.env);
        let mut out = Vec::new();
        for e in list_vms(&self.pve)?.into_iter().filter(|e| {
            !e.template && (e.name.starts_with(&prefix) || e.tags.iter().any(|t| t == ENV_VM_TAG))
        }) {
            let cfg = match vm_config(&self.pve, &e.node, e.vmid) {
                Ok(c) => c,
                // Destroyed between the listing and now.
                Err(err) if is_missing(&err) => continue,
                Err(err) => return Err(err),
            };
            let Some(vm) = marks(&self.env, e.vmid, &cfg, e.running) else {
                continue;
            };
            out.push((vm, e.node));
        }
        Ok(out)
    }

    /// Clone the template for `vm` onto its node; the new VMID.
    fn clone_template(&self, vm: &NewVm, node: &str, seed: &str) -> Result<u32> {
        let Some(template) = self.template_on(node, &vm.image_id)? else {
            bail!(
                "no template of image {} on node {node}: publish it there first (`kiln publish {} --target {}`, with {node} in the target's nodes)",
                &vm.image_id[..12.min(vm.image_id.len())],
                vm.image_dir.display(),
                self.target.name
            );
        };
        let pn = self.pve.for_node(node);
        for _ in 0..20 {
            crate::util::check_interrupted()?;
            let next = pn.get("/cluster/nextid", &[])?;
            let newid = crate::deploy::pve::vms::as_u64(&next)
                .context("/cluster/nextid answered no number")? as u32;
            self.note_pending(
                &vm.name,
                &Pending {
                    node: node.to_string(),
                    vmid: newid,
                },
            )?;
            let mut form = vec![
                ("newid".to_string(), newid.to_string()),
                ("name".into(), vm.name.clone()),
                ("description".into(), self.description(vm, seed)),
            ];
            if let Some(pool) = &self.target.cfg.pool {
                form.push(("pool".into(), pool.clone()));
            }
            match pn.post(
                &format!("/nodes/{}/qemu/{template}/clone", seg(node)),
                &form,
            ) {
                Ok(v) => {
                    let upid = v.as_str().context("clone answered without a task id")?;
                    pn.wait_task(
                        upid,
                        &format!("cloning template {template} for {}", vm.name),
                    )?;
                    return Ok(newid);
                }
                // Another client took the id between nextid and the clone.
                Err(e)
                    if e.downcast_ref::<ApiError>()
                        .is_some_and(|a| a.mentions("already exists")) =>
                {
                    continue
                }
                Err(e) => {
                    self.forget_pending(&vm.name);
                    return Err(
                        e.context(format!("cannot clone template {template} for {}", vm.name))
                    );
                }
            }
        }
        bail!("{}: no free VMID after 20 tries", vm.name)
    }

    /// Upload the seed unless it is there already.
    fn upload_seed(&self, vm: &NewVm, node: &str, volid: &str) -> Result<()> {
        let pn = self.pve.for_node(node);
        if volume_exists(&pn, self.iso_storage(), "iso", volid)?.is_some() {
            return Ok(());
        }
        let dir = tempfile::Builder::new()
            .prefix(".kiln-seed-")
            .tempdir_in(&self.state_dir)
            .context("cannot make a directory for the seed")?;
        let iso = dir.path().join("seed.iso");
        crate::validate::seed::Seed {
            instance_id: vm.name.clone(),
            hostname: vm.name.clone(),
            public_keys: vm.ssh_public_keys.clone(),
            user_data: vm.user_data.clone(),
            network_config: Some(crate::validate::seed::static_network_config(
                &super::mac_for(&self.env, &vm.name),
                vm.address,
                self.network.prefix,
                self.network.gateway,
                &self.network.dns,
            )),
        }
        .write_iso(&iso)?;
        let sha = crate::util::sha256_file(&iso)?;
        let file = volid.rsplit('/').next().unwrap_or(volid);
        let up = pn.upload(self.iso_storage(), "iso", &iso, file, &sha, None)?;
        pn.finish_upload(
            &up.upid,
            file,
            &format!("uploading the seed of {}", vm.name),
        )?;
        Ok(())
    }

    /// Cores, memory, tags, NIC, seed drive, start on host boot.
    fn configure(&self, vm: &NewVm, node: &str, vmid: u32, volid: &str) -> Result<()> {
        let pn = self.pve.for_node(node);
        let form = vec![
            ("cores".to_string(), vm.cores.to_string()),
            ("memory".into(), vm.memory_mib.to_string()),
            ("tags".into(), self.tags(vm)),
            (
                "net0".into(),
                format!(
                    "virtio={},bridge={}",
                    super::mac_for(&self.env, &vm.name),
                    self.network.bridge
                ),
            ),
            ("ide2".into(), format!("{volid},media=cdrom")),
            ("onboot".into(), "1".into()),
        ];
        let v = pn.post(&format!("/nodes/{}/qemu/{vmid}/config", seg(node)), &form)?;
        if let Some(upid) = v.as_str() {
            pn.wait_task(upid, &format!("configuring {}", vm.name))?;
        }
        Ok(())
    }

    /// Grow the boot disk to the role's size (never shrink it).
    fn grow_disk(&self, vm: &NewVm, node: &str, vmid: u32) -> Result<()> {
        let pn = self.pve.for_node(node);
        let cfg = vm_config(&pn, node, vmid)?;
        let Some((disk, size)) = boot_disk(&cfg) else {
            bail!(
                "{}: cannot find the boot disk in VM {vmid}'s config",
                vm.name
            );
        };
        if size.is_some_and(|s| s >= vm.disk_bytes) {
            return Ok(());
        }
        // PUT /nodes/{node}/qemu/{vmid}/resize (qemu-server PVE/API2/Qemu.pm,
        // `resize_vm`): `size` absolute in bytes or with a K/M/G/T suffix.
        let v = pn.put(
            &format!("/nodes/{}/qemu/{vmid}/resize", seg(node)),
            &[
                ("disk".to_string(), disk),
                ("size".into(), format!("{}K", vm.disk_bytes.div_ceil(1024))),
            ],
        )?;
        if let Some(upid) = v.as_str() {
            pn.wait_task(upid, &format!("growing the disk of {}", vm.name))?;
        }
        Ok(())
    }

    fn power(
        &self,
        node: &str,
        vmid: u32,
        action: &str,
        form: &[(String, String)],
        what: &str,
    ) -> Result<()> {
        let pn = self.pve.for_node(node);
        let v = pn.post(
            &format!("/nodes/{}/qemu/{vmid}/status/{action}", seg(node)),
            form,
        )?;
        if let Some(upid) = v.as_str() {
            pn.wait_task(upid, what)?;
        }
        Ok(())
    }

    /// Steps 2 to 4 for a VM that exists: each done only when not done.
    fn finish(&self, vm: &NewVm, node: &str, vmid: u32) -> Result<NodeVm> {
        let volid = self.seed_volume(&vm.name);
        self.upload_seed(vm, node, &volid)?;
        let cfg = vm_config(&self.pve.for_node(node), node, vmid)?;
        let seed_attached = cfg
            .get("ide2")
            .and_then(Value::as_str)
            .is_some_and(|v| v.split(',').next() == Some(volid.as_str()));
        if !seed_attached || cfg.get("tags").and_then(Value::as_str) != Some(&self.tags(vm)) {
            self.configure(vm, node, vmid, &volid)?;
        }
        self.grow_disk(vm, node, vmid)?;
        let shown = self
            .find(&vm.name)?
            .with_context(|| format!("{} vanished while it was being made", vm.name))?;
        if !shown.0.running {
            self.power(node, vmid, "start", &[], &format!("starting {}", vm.name))?;
        }
        self.forget_pending(&vm.name);
        Ok(NodeVm {
            running: true,
            ..shown.0
        })
    }
}

/// What a VM's config says about it, when it carries `env`'s marks.
fn marks(
    env: &str,
    vmid: u32,
    cfg: &serde_json::Map<String, Value>,
    running: bool,
) -> Option<NodeVm> {
    let d = naming::parse_description(cfg.get("description").and_then(Value::as_str)?);
    if d.get(keys::ENV)? != env {
        return None;
    }
    Some(NodeVm {
        handle: vmid.to_string(),
        name: cfg.get("name").and_then(Value::as_str)?.to_string(),
        slot: d.get(keys::SLOT)?.clone(),
        generation: d.get(keys::GENERATION)?.parse().ok()?,
        image_id: d.get(keys::IMAGE_ID)?.clone(),
        values_digest: d.get(keys::VALUES)?.clone(),
        address: d.get(keys::ADDRESS)?.parse::<Ipv4Addr>().ok()?,
        running,
    })
}

/// The boot disk's key and size from a VM config (`boot: order=scsi0;…`,
/// `scsi0: local-lvm:vm-101-disk-0,size=4G`).
fn boot_disk(cfg: &serde_json::Map<String, Value>) -> Option<(String, Option<u64>)> {
    let order = cfg.get("boot").and_then(Value::as_str)?;
    let key = order
        .split(',')
        .find_map(|p| p.strip_prefix("order="))?
        .split(';')
        .find(|k| {
            cfg.get(*k)
                .and_then(Value::as_str)
                .is_some_and(|v| !v.contains("media=cdrom"))
        })?
        .to_string();
    let size = cfg
        .get(&key)
        .and_then(Value::as_str)?
        .split(',')
        .find_map(|p| p.strip_prefix("size="))
        .and_then(parse_size);
    Some((key, size))
}

/// PVE's `disk-size` (`4G`, `512M`, `1073741824`) in bytes.
fn parse_size(s: &str) -> Option<u64> {
    let (num, mult) = match s.chars().last()? {
        'K' => (&s[..s.len() - 1], 1u64 << 10),
        'M' => (&s[..s.len() - 1], 1 << 20),
        'G' => (&s[..s.len() - 1], 1 << 30),
        'T' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let n: f64 = num.parse().ok()?;
    Some((n * mult as f64) as u64)
}

impl Provider for ProxmoxProvider {
    fn kind(&self) -> &'static str {
        "proxmox"
    }

    /// Check the token may do what environments need on every node, and
    /// that the seed storage takes ISO images there.
    fn prepare(&self) -> Result<()> {
        let storage = |s: &str| format!("/storage/{s}");
        let mut needs = vec![
            Need::new("/vms", "VM.Audit", "see the environment's VMs"),
            Need::new("/vms", "VM.Clone", "clone the templates"),
            Need::new("/vms", "VM.Allocate", "create and destroy VMs")
                .or_on(self.target.cfg.pool.as_ref().map(|p| format!("/pool/{p}"))),
            Need::new("/vms", "VM.Config.CPU", "set cores"),
            Need::new("/vms", "VM.Config.Memory", "set memory"),
            Need::new("/vms", "VM.Config.Network", "attach the NIC"),
            Need::new("/vms", "VM.Config.Options", "set tags and description"),
            Need::new("/vms", "VM.Config.CDROM", "attach the seed ISO"),
            Need::new("/vms", "VM.Config.Disk", "grow the disk"),
            Need::new("/vms", "VM.PowerMgmt", "start and stop VMs"),
            Need::new(
                storage(self.iso_storage()),
                "Datastore.AllocateTemplate",
                "upload seed ISOs",
            ),
            Need::new(
                storage(&self.target.cfg.storage),
                "Datastore.AllocateSpace",
                "allocate clone disks",
            ),
            Need::new(
                format!("/sdn/zones/localnetwork/{}", self.network.bridge),
                "SDN.Use",
                "attach VMs to the bridge",
            ),
        ];
        needs.retain(|n| !n.path.is_empty());
        let checked = access::check(&self.pve, &needs)?;
        if !checked.missing.is_empty() {
            return Err(access::missing_error(
                &self.target.token.id,
                &checked.missing,
                access::KilnRole::Environments,
            ));
        }
        for node in &self.nodes {
            check_storage(
                &self.pve.for_node(node),
                self.iso_storage(),
                "iso",
                "NoCloud seeds of environment VMs",
            )?;
        }
        Ok(())
    }

    fn list(&self) -> Result<Vec<NodeVm>> {
        Ok(self.marked()?.into_iter().map(|(vm, _)| vm).collect())
    }

    fn create(&self, vm: &NewVm) -> Result<NodeVm> {
        vm.check_env(&self.env)?;
        let Some(node) = vm.node.clone() else {
            bail!("VM {}: its slot names no Proxmox node", vm.name);
        };
        // A clone an earlier run asked for: wait for its task, then take it over.
        if let Some(p) = self.pending(&vm.name) {
            wait_unlocked(&self.pve.for_node(&p.node), &p.node, p.vmid)?;
        }
        if let Some((found, on)) = self.find(&vm.name)? {
            let vmid: u32 = found.handle.parse().context("a VMID")?;
            return self.finish(vm, &on, vmid);
        }
        self.forget_pending(&vm.name);
        crate::util::check_interrupted()?;
        let volid = self.seed_volume(&vm.name);
        let vmid = self.clone_template(vm, &node, &volid)?;
        self.finish(vm, &node, vmid).inspect_err(|_| {
            // Nothing half-made stays behind when kiln can clean it now.
            let _ = destroy_vm(&self.pve.for_node(&node), &node, vmid);
            let _ = delete_volume(&self.pve.for_node(&node), self.iso_storage(), &volid);
            self.forget_pending(&vm.name);
        })
    }

    fn connect(&self, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
        // The VMs are on the operator's network: kiln reaches them directly.
        TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("cannot connect to {addr}"))
    }

    fn stop(&self, vm: &NodeVm, grace: Duration) -> Result<()> {
        let Some((now, node)) = self.find(&vm.name)? else {
            return Ok(());
        };
        if !now.running {
            return Ok(());
        }
        let vmid: u32 = now.handle.parse().context("a VMID")?;
        // ACPI shutdown (keepalived hands the VIP over), forced after the
        // grace time (qemu-server PVE/API2/Qemu.pm, `vm_shutdown`: `timeout`,
        // `forceStop`).
        self.power(
            &node,
            vmid,
            "shutdown",
            &[
                ("timeout".to_string(), grace.as_secs().max(1).to_string()),
                ("forceStop".into(), "1".into()),
            ],
            &format!("shutting {} down", vm.name),
        )
    }

    fn destroy(&self, vm: &NodeVm) -> Result<()> {
        let Some((now, node)) = self.find(&vm.name)? else {
            return Ok(());
        };
        let vmid: u32 = now.handle.parse().context("a VMID")?;
        let pn = self.pve.for_node(&node);
        let cfg = vm_config(&pn, &node, vmid)?;
        let seed =
            naming::parse_description(cfg.get("description").and_then(Value::as_str).unwrap_or(""))
                .get(keys::SEED)
                .cloned();
        if now.running {
            self.power(&node, vmid, "stop", &[], &format!("stopping {}", vm.name))?;
        }
        destroy_vm(&pn, &node, vmid)?;
        if let Some(volid) = seed {
            let storage = volid.split(':').next().unwrap_or_default().to_string();
            delete_volume(&pn, &storage, &volid)
                .with_context(|| format!("{}: cannot delete its seed {volid}", vm.name))?;
        }
        self.forget_pending(&vm.name);
        Ok(())
    }

    fn console_tail(&self, _vm: &NodeVm) -> Option<String> {
        // The serial console is reachable only through a terminal proxy.
        None
    }

    fn teardown(&self) -> Result<()> {
        Ok(())
    }

    /// Publish each image to the nodes whose slots need it and lack it
    /// (`kiln publish` is idempotent per node: nodes that have it are skipped).
    fn ensure_images(&self, needs: &[ImageNeed], progress: bool) -> Result<Vec<String>> {
        let mut done = Vec::new();
        for need in needs {
            let mut missing = Vec::new();
            for node in &need.nodes {
                if self.template_on(node, &need.image_id)?.is_none() {
                    missing.push(node.clone());
                }
            }
            if missing.is_empty() {
                continue;
            }
            let mut target = self.target.clone();
            target.cfg.nodes = missing.clone();
            target.cfg.node = missing[0].clone();
            let report = crate::deploy::publish::publish(
                &crate::deploy::publish::PublishOptions {
                    image: need.dir.clone(),
                    allow_unvalidated: false,
                    via: crate::deploy::publish::Via::Api,
                    progress,
                    // apply verified each image's signature (when the
                    // environment asks for one) before it got here.
                    allowed_signers: None,
                },
                &target,
            )
            .with_context(|| {
                format!(
                    "publishing {} to {}",
                    need.dir.display(),
                    missing.join(", ")
                )
            })?;
            for n in report.nodes.iter().filter(|n| n.created) {
                done.push(format!("{} on {} (vmid {})", n.name, n.node, n.vmid));
            }
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(pairs: &[(&str, &str)]) -> serde_json::Map<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect()
    }

    #[test]
    fn the_boot_disk_and_its_size_come_from_the_boot_order() {
        let c = cfg(&[
            ("boot", "order=scsi0;ide2;net0"),
            (
                "scsi0",
                "local-lvm:base-9000-disk-0/vm-101-disk-0,discard=on,size=4G",
            ),
            ("ide2", "local:iso/seed.iso,media=cdrom"),
        ]);
        assert_eq!(boot_disk(&c), Some(("scsi0".into(), Some(4 << 30))));
        let cd_first = cfg(&[
            ("boot", "order=ide2;scsi0"),
            ("scsi0", "local-lvm:vm-101-disk-0,size=512M"),
            ("ide2", "local:iso/seed.iso,media=cdrom"),
        ]);
        assert_eq!(
            boot_disk(&cd_first),
            Some(("scsi0".into(), Some(512 << 20)))
        );
    }

    #[test]
    fn a_vm_is_the_environments_only_when_its_description_says_so() {
        let desc = "x\n\nkiln-env: qa\nkiln-slot: lb-1\nkiln-generation: 2\nkiln-image-id: abc\nkiln-values: d1\nkiln-address: 10.0.0.5\nkiln-seed: local:iso/s.iso\n";
        let c = cfg(&[("name", "qa-lb-1-g2"), ("description", desc)]);
        let vm = marks("qa", 101, &c, true).unwrap();
        assert_eq!(
            (
                vm.handle.as_str(),
                vm.slot.as_str(),
                vm.generation,
                vm.address
            ),
            ("101", "lb-1", 2, "10.0.0.5".parse().unwrap())
        );
        assert!(
            marks("prod", 101, &c, true).is_none(),
            "another environment's VM"
        );
        let foreign = cfg(&[("name", "qa-lb-1-g2"), ("description", "made by hand")]);
        assert!(
            marks("qa", 101, &foreign, true).is_none(),
            "a VM kiln did not make"
        );
    }

    #[test]
    fn pve_disk_sizes_are_read_in_bytes() {
        assert_eq!(parse_size("4G"), Some(4 << 30));
        assert_eq!(parse_size("1.5G"), Some(3 << 29));
        assert_eq!(parse_size("1073741824"), Some(1 << 30));
        assert_eq!(parse_size("x"), None);
    }

    /// Against pve-sim, a labelled stand-in for the Proxmox VE API
    /// (crates/pve-sim): two nodes, quick tasks, everything permitted.
    mod on_the_simulator {
        use super::*;
        use crate::deploy::env::apply::tests::FakeGates;
        use crate::deploy::env::apply::{desired, ids, role_images, Applier, ApplyOptions};
        use crate::deploy::env::journal::Journal;
        use crate::deploy::env::model::Environment;
        use crate::deploy::env::plan;
        use crate::validate::keys::ThrowawayKey;
        use std::path::Path;

        const TOKEN: &str = "ci@pve!kiln=5f0c1e2a-kiln-test-secret";

        pub(super) struct Lab {
            pub dir: tempfile::TempDir,
            pub sim: pve_sim::Sim,
        }

        /// A small validated image whose disk is a real (empty) qcow2 of
        /// `mb` MiB, so `kiln publish` takes it: the engine's fixture with a
        /// real disk, its id, a validation record and SHA256SUMS.
        fn image(dir: &Path, mb: u64) {
            use crate::image::manifest::*;
            crate::deploy::env::apply::tests::image_at(dir, "0");
            let disk = dir.join("disk.qcow2");
            std::fs::remove_file(&disk).unwrap();
            let st = std::process::Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&disk)
                .arg(format!("{mb}M"))
                .status()
                .unwrap();
            assert!(st.success());
            let id = crate::util::sha256_file(&disk).unwrap();
            let mut m = ImageManifest::load(dir).unwrap();
            m.version = format!("0.{mb}.0");
            m.id = id.clone();
            m.disk.sha256 = id;
            m.disk.size = std::fs::metadata(&disk).unwrap().len();
            m.disk.virtual_size = mb << 20;
            m.validation = Some(ValidationRecord {
                validated: true,
                when: "2026-11-29T12:00:00Z".into(),
                kiln_version: "0.1.0".into(),
                accel: "tcg".into(),
                boot_to_ssh_seconds: None,
                boot_to_cloud_init_seconds: None,
                checks: vec![],
                secure_boot_keys: vec![],
            });
            m.save(dir).unwrap();
            m.write_sums(dir).unwrap();
        }

        impl Lab {
            pub(super) fn new() -> Lab {
                let dir = tempfile::tempdir().unwrap();
                let mut cfg = pve_sim::SimConfig::new(TOKEN, &dir.path().join("sim"));
                cfg.task_delay = Duration::from_millis(20);
                cfg.nodes = vec!["pve1".into(), "pve2".into()];
                let sim = pve_sim::Sim::start(cfg).unwrap();
                image(&dir.path().join("images/a"), 64);
                image(&dir.path().join("images/b"), 96);
                let lab = Lab { dir, sim };
                lab.write("a");
                lab
            }

            /// Two LB slots on two nodes running image `lb_image`.
            pub(super) fn write(&self, lb_image: &str) {
                let recipe = concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/tiny.toml");
                let text = format!(
                    r#"name = "qa"
[provider]
kind = "proxmox"
[network]
bridge = "vmbr0"
cidr = "10.77.0.0/24"
gateway = "10.77.0.1"
vip = "10.77.0.10"
[roles.lb]
recipe = "{recipe}"
user_data_role = "node"
image = "images/{lb_image}"
cores = 2
memory = 1024
disk = 4
[[roles.lb.slots]]
name = "lb-1"
node = "pve1"
addresses = ["10.77.0.11", "10.77.0.21"]
[[roles.lb.slots]]
name = "lb-2"
node = "pve2"
addresses = ["10.77.0.12", "10.77.0.22"]
"#
                );
                std::fs::write(self.dir.path().join("qa.toml"), text).unwrap();
            }

            pub(super) fn env(&self) -> Environment {
                Environment::load(&self.dir.path().join("qa.toml")).unwrap()
            }

            pub(super) fn provider(&self) -> ProxmoxProvider {
                let vars: std::collections::BTreeMap<&str, String> = [
                    ("KILN_PVE_URL", self.sim.url()),
                    ("KILN_PVE_NODE", "pve1,pve2".to_string()),
                    ("KILN_PVE_STORAGE", "local-lvm".into()),
                    ("KILN_PVE_IMPORT_STORAGE", "local".into()),
                    ("KILN_PVE_TOKEN", TOKEN.into()),
                    ("KILN_PVE_VMID_RANGE", "9000-9099".into()),
                ]
                .into();
                let target =
                    crate::deploy::pve::config::resolve(None, None, &|k| vars.get(k).cloned())
                        .unwrap();
                let env = self.env();
                ProxmoxProvider::new(
                    "qa",
                    &env.network,
                    vec!["pve1".into(), "pve2".into()],
                    target,
                    self.dir.path().join("state"),
                )
                .unwrap()
            }

            /// One `kiln env apply` as a fresh process runs it, with `gates`
            /// standing in for the SSH gates (nothing boots in the simulator).
            pub(super) fn apply(&self, gates: &FakeGates) -> Result<()> {
                let env = self.env();
                let p = self.provider();
                std::fs::create_dir_all(self.dir.path().join("state")).unwrap();
                let images = role_images(&env)?;
                let key = ThrowawayKey::generate("test").unwrap();
                let journal = Journal::open(&self.dir.path().join("state")).unwrap();
                let opts = ApplyOptions {
                    say: false,
                    ..ApplyOptions::default()
                };
                p.prepare()?;
                p.ensure_images(
                    &crate::deploy::env::apply::image_needs(&env, &images),
                    false,
                )?;
                let actual = p.list()?;
                let plan = plan::plan(&env.name, &desired(&env, &ids(&images))?, &actual);
                Applier {
                    cluster: None,
                    env: &env,
                    provider: &p,
                    images: &images,
                    key: &key,
                    journal: &journal,
                    gates,
                    opts: &opts,
                }
                .run(&plan, &actual)?;
                Ok(())
            }

            /// The simulator's VMs that are not templates: (vmid, node, config).
            pub(super) fn vms(&self) -> Vec<(u32, String, BTreeMap<String, String>)> {
                let st = self.sim.state();
                st.vms
                    .values()
                    .filter(|v| !v.template)
                    .map(|v| (v.vmid, v.node.clone(), v.config.clone()))
                    .collect()
            }

            pub(super) fn isos(&self) -> Vec<String> {
                let st = self.sim.state();
                st.volumes
                    .values()
                    .filter(|v| v.volid.contains(":iso/"))
                    .map(|v| v.volid.clone())
                    .collect()
            }
        }

        use std::collections::BTreeMap;

        fn id_of(lab: &Lab, image: &str) -> String {
            crate::image::manifest::ImageManifest::load(&lab.dir.path().join("images").join(image))
                .unwrap()
                .id
        }

        #[test]
        fn apply_publishes_missing_templates_and_clones_each_slot_on_its_node() {
            let lab = Lab::new();
            lab.apply(&FakeGates::default()).unwrap();
            let vms = lab.vms();
            let mut placed: Vec<(String, String)> = vms
                .iter()
                .map(|(_, node, c)| (c["name"].clone(), node.clone()))
                .collect();
            placed.sort();
            assert_eq!(
                placed,
                vec![
                    ("qa-lb-1-g0".to_string(), "pve1".to_string()),
                    ("qa-lb-2-g0".into(), "pve2".into())
                ]
            );
            let st = lab.sim.state();
            let templates: Vec<&String> = st
                .vms
                .values()
                .filter(|v| v.template)
                .map(|v| &v.node)
                .collect();
            assert_eq!(templates.len(), 2, "one template per node");
        }

        #[test]
        fn a_cloned_vm_carries_its_marks_size_nic_and_seed_and_runs() {
            let lab = Lab::new();
            lab.apply(&FakeGates::default()).unwrap();
            let (_, _, c) = lab
                .vms()
                .into_iter()
                .find(|(_, _, c)| c["name"] == "qa-lb-1-g0")
                .unwrap();
            assert_eq!(c["cores"], "2");
            assert_eq!(c["memory"], "1024");
            assert_eq!(c["onboot"], "1");
            let tags = &c["tags"];
            for t in ["kiln-env", "env-qa", "slot-lb-1", "gen-0"] {
                assert!(tags.split(';').any(|x| x == t), "{t} in {tags}");
            }
            let d = &c["description"];
            assert!(
                d.contains(&format!("kiln-image-id: {}", id_of(&lab, "a"))),
                "{d}"
            );
            assert!(d.contains("kiln-address: 10.77.0.11"), "{d}");
            let mac = crate::deploy::providers::mac_for("qa", "qa-lb-1-g0");
            assert_eq!(c["net0"], format!("virtio={mac},bridge=vmbr0"));
            assert_eq!(
                c["ide2"], "local:iso/kiln-qa-lb-1-g0-cidata.iso,media=cdrom",
                "the seed replaces the template's cloud-init drive"
            );
            let size = boot_disk(
                &c.iter()
                    .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                    .collect(),
            )
            .unwrap()
            .1
            .unwrap();
            assert_eq!(size, 4 << 30, "the disk grew to the role's 4 GiB");
            assert!(lab.provider().list().unwrap().iter().all(|v| v.running));
        }

        #[test]
        fn user_data_reaches_only_the_seed_iso_never_the_vm_config() {
            let lab = Lab::new();
            let p = lab.provider();
            p.prepare().unwrap();
            let env = lab.env();
            let images = role_images(&env).unwrap();
            p.ensure_images(
                &crate::deploy::env::apply::image_needs(&env, &images),
                false,
            )
            .unwrap();
            let m = &images["lb"].manifest;
            let vm = NewVm {
                env: "qa".into(),
                name: "qa-lb-1-g0".into(),
                slot: "lb-1".into(),
                generation: 0,
                image_dir: images["lb"].dir.clone(),
                image_id: m.id.clone(),
                disk_file: m.disk_path(&images["lb"].dir),
                disk_format: "qcow2".into(),
                disk_virtual_size: m.disk.virtual_size,
                uefi: true,
                node: Some("pve1".into()),
                cores: 1,
                memory_mib: 512,
                disk_bytes: 1 << 30,
                address: "10.77.0.11".parse().unwrap(),
                network: env.network.clone(),
                user_data: "#cloud-config\n# token: SEKRIT-7f3a9\n".into(),
                ssh_public_keys: vec!["ssh-ed25519 AAAA test".into()],
                values_digest: "d".into(),
            };
            p.create(&vm).unwrap();
            for (_, _, c) in lab.vms() {
                for (k, v) in &c {
                    assert!(!v.contains("SEKRIT"), "{k} holds the secret: {v}");
                }
            }
            let iso = lab
                .dir
                .path()
                .join("sim/storage/local/template/iso/kiln-qa-lb-1-g0-cidata.iso");
            let out = std::process::Command::new("isoinfo")
                .args(["-R", "-x", "/user-data", "-i"])
                .arg(&iso)
                .output()
                .expect("isoinfo (genisoimage) is installed");
            assert!(String::from_utf8_lossy(&out.stdout).contains("SEKRIT-7f3a9"));
            assert!(
                std::fs::read_dir(lab.dir.path().join("state"))
                    .unwrap()
                    .all(|e| {
                        !e.unwrap()
                            .file_name()
                            .to_string_lossy()
                            .starts_with(".kiln-seed")
                    }),
                "no seed left in the state directory"
            );
        }

        #[test]
        fn a_new_image_replaces_each_vm_and_removes_the_old_vm_with_its_seed() {
            let lab = Lab::new();
            lab.apply(&FakeGates::default()).unwrap();
            lab.write("b");
            lab.apply(&FakeGates::default()).unwrap();
            let mut names: Vec<String> = lab
                .vms()
                .into_iter()
                .map(|(_, _, c)| c["name"].clone())
                .collect();
            names.sort();
            assert_eq!(names, vec!["qa-lb-1-g1", "qa-lb-2-g1"]);
            let mut isos = lab.isos();
            isos.sort();
            assert_eq!(
                isos,
                vec![
                    "local:iso/kiln-qa-lb-1-g1-cidata.iso",
                    "local:iso/kiln-qa-lb-2-g1-cidata.iso"
                ]
            );
            let b = id_of(&lab, "b");
            assert!(lab
                .provider()
                .list()
                .unwrap()
                .iter()
                .all(|v| v.image_id == b));
        }

        #[test]
        fn a_vm_failing_its_gates_is_destroyed_with_its_seed() {
            let lab = Lab::new();
            lab.apply(&FakeGates::default()).unwrap();
            lab.write("b");
            let err = lab
                .apply(&FakeGates {
                    fail: vec!["qa-lb-1-g1".into()],
                    ..Default::default()
                })
                .unwrap_err();
            assert!(format!("{err:#}").contains("failed its gates"), "{err:#}");
            let mut names: Vec<String> = lab
                .vms()
                .into_iter()
                .map(|(_, _, c)| c["name"].clone())
                .collect();
            names.sort();
            assert_eq!(
                names,
                vec!["qa-lb-1-g0", "qa-lb-2-g0"],
                "old ones stay in service"
            );
            assert_eq!(lab.isos().len(), 2);
        }

        #[test]
        fn a_clone_left_by_a_killed_run_is_taken_over_not_cloned_again() {
            let lab = Lab::new();
            let env = lab.env();
            let images = role_images(&env).unwrap();
            let p = lab.provider();
            p.prepare().unwrap();
            p.ensure_images(
                &crate::deploy::env::apply::image_needs(&env, &images),
                false,
            )
            .unwrap();
            // The killed run got as far as the clone of lb-1's VM.
            let key = ThrowawayKey::generate("test").unwrap();
            let vm = crate::deploy::env::apply::tests::spec_for(&env, &images, &key, "lb-1", 0);
            p.clone_template(&vm, "pve1", &p.seed_volume(&vm.name))
                .unwrap();
            assert_eq!(lab.vms().len(), 1);
            // The next apply sees it (not running) and finishes it.
            lab.apply(&FakeGates::default()).unwrap();
            let vms = lab.vms();
            assert_eq!(vms.len(), 2, "{vms:?}");
            assert!(lab
                .provider()
                .list()
                .unwrap()
                .iter()
                .all(|v| v.running && v.generation == 0));
        }

        #[test]
        fn a_vm_without_the_environments_marks_is_never_listed_or_touched() {
            let lab = Lab::new();
            lab.apply(&FakeGates::default()).unwrap();
            // A VM someone made by hand, with a name in the environment's pattern.
            {
                let mut st = lab.sim.state();
                let mut config = BTreeMap::new();
                config.insert("name".to_string(), "qa-lb-9-g0".to_string());
                config.insert("description".to_string(), "made by hand".to_string());
                st.vms.insert(
                    4242,
                    pve_sim::Vm {
                        vmid: 4242,
                        node: "pve1".into(),
                        config,
                        template: false,
                        running: true,
                        pending: Default::default(),
                    },
                );
            }
            let p = lab.provider();
            assert_eq!(p.list().unwrap().len(), 2);
            crate::deploy::env::destroy_env_with(&lab.env(), &p, &lab.dir.path().join("state"))
                .unwrap();
            let left: Vec<u32> = lab.vms().into_iter().map(|(id, _, _)| id).collect();
            assert_eq!(left, vec![4242]);
            assert!(lab.isos().is_empty(), "the seeds went with their VMs");
        }
    }
}
