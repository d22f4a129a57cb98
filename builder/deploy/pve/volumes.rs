//! Storages and volumes on a Proxmox VE node: check a storage takes a
//! content type, find a volume, delete one. Uploads live in `upload`.

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::client::{seg, Pve};
use super::errors::is_missing;
use super::vms::as_u64;

/// Check a storage exists on the node and allows `content`; whether it is
/// shared by all nodes (its `shared` flag).
pub(crate) fn check_storage(pve: &Pve, storage: &str, content: &str, why: &str) -> Result<bool> {
    let v = pve.get(
        &format!("/nodes/{}/storage", seg(&pve.node)),
        &[("storage", storage.into())],
    )?;
    let entry = v
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|e| e.get("storage").and_then(Value::as_str) == Some(storage))
        })
        .with_context(|| {
            // PVE lists only storages the token may read (`GET
            // /nodes/{node}/storage`: Datastore.Audit or AllocateSpace).
            format!(
                "storage `{storage}` is not visible on node {}: it does not exist there, or the \
                 API token lacks Datastore.Audit on /storage/{storage}",
                pve.node
            )
        })?;
    let contents = entry.get("content").and_then(Value::as_str).unwrap_or("");
    if !contents.split(',').any(|c| c.trim() == content) {
        bail!(
            "storage `{storage}` on node {} does not allow `{content}` content ({why}); it allows: {contents}",
            pve.node
        );
    }
    let shared = entry.get("shared");
    Ok(shared.and_then(Value::as_bool).unwrap_or(false) || shared.and_then(as_u64) == Some(1))
}

/// Delete a volume (gone already counts as done).
pub(crate) fn delete_volume(pve: &Pve, storage: &str, volid: &str) -> Result<()> {
    let res = pve.delete(
        &format!(
            "/nodes/{}/storage/{}/content/{}",
            seg(&pve.node),
            seg(storage),
            seg(volid)
        ),
        &[],
    );
    let v = match res {
        Ok(v) => v,
        Err(e) if is_missing(&e) => return Ok(()),
        Err(e) => return Err(e),
    };
    if let Some(u) = v.as_str() {
        pve.wait_task(u, &format!("removing {volid}"))?;
    }
    Ok(())
}

/// The size of a volume, or None when the storage does not list it.
pub(crate) fn volume_exists(
    pve: &Pve,
    storage: &str,
    content: &str,
    volid: &str,
) -> Result<Option<u64>> {
    let v = pve.get(
        &format!("/nodes/{}/storage/{}/content", seg(&pve.node), seg(storage)),
        &[("content", content.into())],
    )?;
    Ok(v.as_array().and_then(|a| {
        a.iter()
            .find(|e| e.get("volid").and_then(Value::as_str) == Some(volid))
            .map(|e| e.get("size").and_then(as_u64).unwrap_or(0))
    }))
}
