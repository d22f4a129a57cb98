//! VMs on a Proxmox VE cluster: list them (with tags), read their config,
//! wait for their locks, destroy them with their disks.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::time::{Duration, Instant};

use super::client::{seg, Pve};
use super::errors::is_missing;

/// A VM as `/cluster/resources` lists it.
#[derive(Debug, Clone)]
pub(crate) struct VmEntry {
    pub vmid: u32,
    pub name: String,
    pub node: String,
    pub template: bool,
    pub tags: Vec<String>,
    /// The config lock (`create`, `clone`, ...), if any.
    pub lock: Option<String>,
    /// `status` is `running` (`/cluster/resources` reports it for VMs:
    /// pve-manager PVE/API2/Cluster.pm, `resources`).
    pub running: bool,
}

pub(crate) fn list_vms(pve: &Pve) -> Result<Vec<VmEntry>> {
    let v = pve.get("/cluster/resources", &[("type", "vm".into())])?;
    let arr = v
        .as_array()
        .context("/cluster/resources did not answer a list")?;
    Ok(arr
        .iter()
        .filter(|e| e.get("type").and_then(Value::as_str) == Some("qemu"))
        .filter_map(|e| {
            Some(VmEntry {
                vmid: as_u64(e.get("vmid")?)? as u32,
                name: e.get("name").and_then(Value::as_str).unwrap_or("").into(),
                node: e.get("node").and_then(Value::as_str).unwrap_or("").into(),
                template: e.get("template").and_then(as_u64).unwrap_or(0) == 1,
                tags: e
                    .get("tags")
                    .and_then(Value::as_str)
                    .map(|t| {
                        t.split([';', ',', ' '])
                            .filter(|x| !x.is_empty())
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default(),
                lock: e.get("lock").and_then(Value::as_str).map(str::to_string),
                running: e.get("status").and_then(Value::as_str) == Some("running"),
            })
        })
        .collect())
}

/// PVE sends numbers sometimes as strings.
pub(crate) fn as_u64(v: &Value) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

/// A VM's current configuration (`GET /nodes/{node}/qemu/{vmid}/config`).
pub(crate) fn vm_config(
    pve: &Pve,
    node: &str,
    vmid: u32,
) -> Result<serde_json::Map<String, Value>> {
    let v = pve.get(&format!("/nodes/{}/qemu/{vmid}/config", seg(node)), &[])?;
    v.as_object().cloned().context("VM config is not an object")
}

/// Wait until a VM carries no lock (a task of an earlier run may still hold it).
pub(crate) fn wait_unlocked(pve: &Pve, node: &str, vmid: u32) -> Result<()> {
    let start = Instant::now();
    loop {
        let v = match pve.get(
            &format!("/nodes/{}/qemu/{vmid}/status/current", seg(node)),
            &[],
        ) {
            Ok(v) => v,
            // Gone already.
            Err(e) if is_missing(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        match v.get("lock").and_then(Value::as_str) {
            None => return Ok(()),
            Some(l) if start.elapsed() > pve.task_timeout => {
                bail!("VM {vmid} stays locked ({l}); not touching it")
            }
            Some(_) => std::thread::sleep(Duration::from_millis(300)),
        }
    }
}

/// Destroy a VM kiln created (and its disks).
pub(crate) fn destroy_vm(pve: &Pve, node: &str, vmid: u32) -> Result<()> {
    wait_unlocked(pve, node, vmid)?;
    let res = pve.delete(
        &format!("/nodes/{}/qemu/{vmid}", seg(node)),
        &[
            ("purge", "1".into()),
            ("destroy-unreferenced-disks", "1".into()),
        ],
    );
    let upid = match res {
        Ok(v) => v,
        Err(e) if is_missing(&e) => return Ok(()),
        Err(e) => return Err(e.context(format!("cannot destroy VM {vmid}"))),
    };
    if let Some(u) = upid.as_str() {
        pve.wait_task(u, &format!("destroying VM {vmid}"))?;
    }
    Ok(())
}
