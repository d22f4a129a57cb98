//! Storage endpoints: listing, content, volume delete and the multipart upload.
//! Part of pve-sim, a labelled STAND-IN for the Proxmox VE API (not Proxmox).

use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufReader, Read};
use std::path::Path;
use std::sync::Arc;

use crate::access;
use crate::faults::{injected_500, FaultKind, FaultOp};
use crate::http::{Conn, Head};
use crate::multipart;
use crate::params::{self, Errors};
use crate::routes::{check_node, err500, param_err, reply, ApiError, ApiResult, Outcome};
use crate::state::{lock, now, storage, Recorded, Shared, StorageDef, Volume, STORAGES};
use crate::tasks::{spawn_task, task_plan, TaskOf};

fn storage_entry(s: &StorageDef) -> Value {
    json!({
        "storage": s.id, "type": s.kind, "content": s.content.join(","),
        "active": 1, "enabled": 1, "shared": if s.shared { 1 } else { 0 },
        "total": 100u64 << 30, "used": 10u64 << 30, "avail": 90u64 << 30,
    })
}

pub(crate) fn storage_list(shared: &Shared, p: &BTreeMap<String, String>) -> ApiResult {
    check_node(shared, p)?;
    let out: Vec<Value> = STORAGES
        .iter()
        // "Only list entries where you have 'Datastore.Audit' or
        // 'Datastore.AllocateSpace' permissions on '/storage/<storage>'".
        .filter(|s| {
            access::has_any(
                shared,
                &format!("/storage/{}", s.id),
                &["Datastore.Audit", "Datastore.AllocateSpace"],
            )
        })
        .filter(|s| p.get("storage").map(|x| x == s.id).unwrap_or(true))
        .filter(|s| {
            p.get("content")
                .map(|c| {
                    params::split_tags(c)
                        .iter()
                        .all(|c| s.content.contains(&c.as_str()))
                })
                .unwrap_or(true)
        })
        .map(storage_entry)
        .collect();
    Ok(Value::Array(out))
}

pub(crate) fn known_storage(p: &BTreeMap<String, String>) -> Result<&'static StorageDef, ApiError> {
    let id = p.get("storage").map(String::as_str).unwrap_or("");
    storage(id).ok_or_else(|| err500(format!("storage '{id}' does not exist")))
}

pub(crate) fn storage_content(shared: &Shared, p: &BTreeMap<String, String>) -> ApiResult {
    check_node(shared, p)?;
    let s = known_storage(p)?;
    access::require_any(
        shared,
        &format!("/storage/{}", s.id),
        &["Datastore.Audit", "Datastore.AllocateSpace"],
    )?;
    let st = lock(shared);
    let node = p.get("node").cloned().unwrap_or_default();
    let out: Vec<Value> = st
        .volumes_on(&node, s.id)
        .filter(|v| p.get("content").map(|c| *c == v.content).unwrap_or(true))
        .map(|v| json!({"volid": v.volid, "content": v.content, "format": v.format, "size": v.size, "ctime": v.ctime}))
        .collect();
    Ok(Value::Array(out))
}

pub(crate) fn volume_delete(
    shared: &Arc<Shared>,
    p: &BTreeMap<String, String>,
    user: &str,
) -> ApiResult {
    check_node(shared, p)?;
    let s = known_storage(p)?;
    access::require(shared, &format!("/storage/{}", s.id), "Datastore.Allocate")?;
    let vol = p.get("volume").cloned().unwrap_or_default();
    let volid = if vol.contains(':') {
        vol
    } else {
        format!("{}:{vol}", s.id)
    };
    let node = p.get("node").cloned().unwrap_or_default();
    let mut st = lock(shared);
    let key = st.volume_key(&node, &volid);
    if !st.volumes.contains_key(&key) {
        return Err(err500(format!("volume '{volid}' does not exist")));
    }
    let (delay, fail, kind) = task_plan(shared, &mut st, FaultOp::VolumeDelete);
    if kind == Some(FaultKind::Http500) {
        return Err(injected_500());
    }
    let upid = spawn_task(
        shared,
        &mut st,
        TaskOf {
            node: &node,
            kind: "imgdel",
            id: &volid.clone(),
            user,
        },
        delay,
        Box::new(move |st, _log| {
            if fail {
                return Err(format!(
                    "error removing '{volid}' (fault injected by pve-sim)"
                ));
            }
            if let Some(v) = st.volumes.remove(&key) {
                if let Some(path) = v.path {
                    let _ = std::fs::remove_file(path);
                }
            }
            Ok(())
        }),
    );
    Ok(json!(upid))
}

/// The upload endpoint: the whole body lands in `var-tmp` first, then an
/// `imgcopy` task verifies the checksum and moves it into the storage.
pub(crate) fn upload(
    shared: &Arc<Shared>,
    head: &Head,
    r: &mut BufReader<Conn>,
    mut p: BTreeMap<String, String>,
    content_length: Option<u64>,
    user: &str,
) -> Outcome {
    let Some(len) = content_length else {
        return reply(
            r,
            Err(ApiError::Status(
                411,
                "Length Required: upload needs a Content-Length".into(),
            )),
            true,
        );
    };
    let Some(boundary) = head.header("content-type").and_then(multipart::boundary) else {
        return reply(
            r,
            Err(ApiError::Status(
                400,
                "upload must be multipart/form-data with a boundary".into(),
            )),
            true,
        );
    };
    // Faults of the request itself; task faults are taken when the task starts.
    let fault = lock(shared).take_fault_if(FaultOp::Upload, |k| {
        matches!(k, FaultKind::Http500 | FaultKind::Drop)
    });
    if fault == Some(FaultKind::Http500) {
        // pveproxy reads the whole body into /var/tmp before the handler runs.
        let _ = std::io::copy(&mut (&mut *r).take(len), &mut std::io::sink());
        return reply(r, Err(injected_500()), true);
    }
    let tmp_dir = shared.cfg.data_dir.join("var-tmp");
    let parsed = if fault == Some(FaultKind::Drop) {
        // Read half the body, then drop the connection.
        let mut half = (&mut *r).take(len / 2);
        let n = std::io::copy(&mut half, &mut std::io::sink()).unwrap_or(0);
        lock(shared).upload_bytes += n;
        return Outcome::Close;
    } else {
        multipart::parse((&mut *r).take(len), &boundary, &tmp_dir)
    };
    let up = match parsed {
        Ok(u) => u,
        Err(multipart::MultipartError::Io(_)) => return Outcome::Close,
        Err(multipart::MultipartError::Malformed(m)) => {
            return reply(r, Err(ApiError::Status(400, m)), true)
        }
    };
    let tmp_path = up.file.as_ref().map(|f| f.tmp_path.clone());
    let res = upload_checked(shared, &mut p, up, user);
    if res.is_err() {
        if let Some(t) = tmp_path {
            let _ = std::fs::remove_file(t);
        }
    }
    reply(r, res, !head.keep_alive())
}

fn upload_checked(
    shared: &Arc<Shared>,
    p: &mut BTreeMap<String, String>,
    up: multipart::Upload,
    user: &str,
) -> ApiResult {
    for (k, v) in &up.fields {
        p.insert(k.clone(), v.clone());
    }
    let file = up.file;
    if let Some(f) = &file {
        p.insert("filename".into(), f.filename.clone());
        lock(shared).upload_bytes += f.size;
    }
    lock(shared).requests.push(Recorded {
        method: "POST".into(),
        path: "/nodes/{node}/storage/{storage}/upload".into(),
        params: p.clone(),
    });
    check_node(shared, p)?;
    let mut e = Errors::new();
    for k in p.keys() {
        if ![
            "node",
            "storage",
            "content",
            "filename",
            "checksum",
            "checksum-algorithm",
            "tmpfilename",
        ]
        .contains(&k.as_str())
        {
            e.insert(k.clone(), "property is not defined in schema and the schema does not allow additional properties".into());
        }
    }
    match p.get("content") {
        None => {
            e.insert(
                "content".into(),
                "property is missing and it is not optional".into(),
            );
        }
        Some(c) => params::check_enum(&mut e, "content", c, &["iso", "vztmpl", "import"]),
    }
    if file.is_none() {
        e.insert(
            "filename".into(),
            "property is missing and it is not optional".into(),
        );
    }
    if p.contains_key("tmpfilename") {
        e.insert(
            "tmpfilename".into(),
            "only allowed when connecting to the trusted port on localhost".into(),
        );
    }
    match (p.get("checksum"), p.get("checksum-algorithm")) {
        (Some(_), None) => {
            e.insert(
                "checksum-algorithm".into(),
                "parameter is required by 'checksum'".into(),
            );
        }
        (None, Some(_)) => {
            e.insert(
                "checksum".into(),
                "parameter is required by 'checksum-algorithm'".into(),
            );
        }
        (Some(_), Some(a)) => params::check_enum(
            &mut e,
            "checksum-algorithm",
            a,
            &["md5", "sha1", "sha224", "sha256", "sha384", "sha512"],
        ),
        _ => {}
    }
    if !e.is_empty() {
        return Err(ApiError::Params(e));
    }
    let file = file.expect("checked above");
    let content = p["content"].clone();
    // PVE keeps only the last path component of the client's name and
    // rewrites what is outside its alphabet before any check.
    let name = params::normalize_content_filename(&file.filename);
    if name.len() > 255 {
        return Err(param_err(
            "filename",
            "value may only be 255 characters long",
        ));
    }
    match content.as_str() {
        "import" if !params::import_filename_ok(&name) => {
            return Err(param_err("filename", "invalid filename or wrong extension"))
        }
        "vztmpl" if !params::vztmpl_filename_ok(&name) => {
            return Err(param_err("filename", "wrong file extension"))
        }
        "iso" if !(name.ends_with(".iso") || name.ends_with(".img")) => {
            return Err(param_err("filename", "wrong file extension"))
        }
        _ => {}
    }
    let s = known_storage(p)?;
    access::require(
        shared,
        &format!("/storage/{}", s.id),
        "Datastore.AllocateTemplate",
    )?;
    if !s.content.contains(&content.as_str()) {
        return Err(err500(format!(
            "storage '{}' does not support '{content}' content",
            s.id
        )));
    }
    let sub = match content.as_str() {
        "import" => "import",
        "vztmpl" => "template/cache",
        _ => "template/iso",
    };
    let node = p.get("node").cloned().unwrap_or_default();
    // Other nodes' local storages live apart; shared ones are one place.
    let root = if s.shared || shared.cfg.nodes.first() == Some(&node) {
        shared.cfg.data_dir.clone()
    } else {
        shared.cfg.data_dir.join("nodes").join(&node)
    };
    let dest_dir = root.join("storage").join(s.id).join(sub);
    // Volume ids name the content type, not the directory: `local:iso/x.iso`,
    // `local:vztmpl/x.tar.zst`, `local:import/x.qcow2` (pve-storage
    // PVE/Storage/Plugin.pm, `parse_volname`).
    let volid = format!("{}:{content}/{name}", s.id);
    let checksum = p.get("checksum").cloned();
    let algo = p.get("checksum-algorithm").cloned();
    let mut st = lock(shared);
    let (delay, fail, _) = task_plan(shared, &mut st, FaultOp::Upload);
    let tmp = file.tmp_path.clone();
    let size = file.size;
    let key = st.volume_key(&node, &volid);
    let upid = spawn_task(
        shared,
        &mut st,
        TaskOf {
            node: &node.clone(),
            kind: "imgcopy",
            id: "",
            user,
        },
        delay,
        Box::new(move |st, log| {
            let cleanup = || {
                let _ = std::fs::remove_file(&tmp);
            };
            if fail {
                cleanup();
                return Err(
                    "copy failed: No space left on device (fault injected by pve-sim)".into(),
                );
            }
            if let (Some(want), Some(algo)) = (checksum, algo) {
                if algo != "sha256" {
                    cleanup();
                    return Err(format!("pve-sim only verifies sha256, not {algo}"));
                }
                let got = sha256_file(&tmp).map_err(|e| format!("{e:#}"))?;
                if got != want.to_ascii_lowercase() {
                    cleanup();
                    return Err(format!("checksum mismatch: got '{got}' != expect '{want}'"));
                }
            }
            let _ = std::fs::create_dir_all(&dest_dir);
            let dest = dest_dir.join(&name);
            // The lines PVE's imgcopy task logs (PVE/API2/Storage/Status.pm).
            log.push(format!("starting file import from: {}", tmp.display()));
            log.push(format!("target node: {node}"));
            log.push(format!("target file: {}", dest.display()));
            log.push(format!("file size is: {size}"));
            std::fs::rename(&tmp, &dest).map_err(|e| {
                cleanup();
                format!("cannot move upload to {}: {e}", dest.display())
            })?;
            let format = name.rsplit('.').next().unwrap_or("raw").to_string();
            st.volumes.insert(
                key,
                Volume {
                    volid,
                    content,
                    format,
                    size,
                    ctime: now(),
                    path: Some(dest),
                },
            );
            Ok(())
        }),
    );
    Ok(json!(upid))
}

/// Hex sha256 of a file, streamed in 1 MiB chunks (upload checksums).
fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}
