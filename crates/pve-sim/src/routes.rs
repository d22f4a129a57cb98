//! The route table, request handling (auth, bodies, replies) and dispatch to the handlers.
//! Part of pve-sim, a labelled STAND-IN for the Proxmox VE API (not Proxmox).

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufReader, Read};
use std::net::TcpStream;
use std::sync::Arc;

use crate::faults::add_fault;
use crate::http::{self, respond, Conn, Head};
use crate::params::{self, Errors};
use crate::state::{lock, Recorded, Shared};
use crate::storage::{storage_content, storage_list, upload, volume_delete};
use crate::tasks::{task_log, task_status};
use crate::vmconfig::{resize, shutdown, update_config};
use crate::vms::{
    clone_vm, cluster_resources, create_vm, destroy, nextid, power, template, vm_config, vm_list,
    vm_status,
};

/// A handler's failure, mapped to PVE's HTTP conventions.
pub(crate) enum ApiError {
    /// Status code and message (in the reason phrase and `message`).
    Status(u16, String),
    /// 400 Parameter verification failed.
    Params(Errors),
    /// Close the connection without an answer.
    Drop,
}

pub(crate) type ApiResult = Result<Value, ApiError>;

pub(crate) fn err500(msg: impl Into<String>) -> ApiError {
    ApiError::Status(500, msg.into())
}

pub(crate) fn param_err(name: &str, msg: impl Into<String>) -> ApiError {
    let mut e = Errors::new();
    e.insert(name.into(), msg.into());
    ApiError::Params(e)
}

const ROUTES: &[(&str, &str)] = &[
    ("GET", "/version"),
    ("GET", "/access/permissions"),
    ("GET", "/nodes"),
    ("GET", "/cluster/resources"),
    ("GET", "/cluster/nextid"),
    ("GET", "/cluster/options"),
    ("GET", "/nodes/{node}/storage"),
    ("GET", "/nodes/{node}/storage/{storage}/content"),
    ("DELETE", "/nodes/{node}/storage/{storage}/content/{volume}"),
    ("POST", "/nodes/{node}/storage/{storage}/upload"),
    ("GET", "/nodes/{node}/qemu"),
    ("POST", "/nodes/{node}/qemu"),
    ("GET", "/nodes/{node}/qemu/{vmid}/config"),
    ("POST", "/nodes/{node}/qemu/{vmid}/config"),
    ("PUT", "/nodes/{node}/qemu/{vmid}/config"),
    ("PUT", "/nodes/{node}/qemu/{vmid}/resize"),
    ("GET", "/nodes/{node}/qemu/{vmid}/status/current"),
    ("POST", "/nodes/{node}/qemu/{vmid}/status/start"),
    ("POST", "/nodes/{node}/qemu/{vmid}/status/stop"),
    ("POST", "/nodes/{node}/qemu/{vmid}/status/shutdown"),
    ("POST", "/nodes/{node}/qemu/{vmid}/template"),
    ("POST", "/nodes/{node}/qemu/{vmid}/clone"),
    ("DELETE", "/nodes/{node}/qemu/{vmid}"),
    ("GET", "/nodes/{node}/tasks/{upid}/status"),
    ("GET", "/nodes/{node}/tasks/{upid}/log"),
    ("POST", "/_sim/faults"),
];

fn route(method: &str, path: &str) -> Option<(&'static str, BTreeMap<String, String>)> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    'outer: for (m, tpl) in ROUTES {
        if *m != method {
            continue;
        }
        let tsegs: Vec<&str> = tpl.trim_matches('/').split('/').collect();
        if tsegs.len() != segs.len() {
            continue;
        }
        let mut params = BTreeMap::new();
        for (t, s) in tsegs.iter().zip(&segs) {
            if t.starts_with('{') {
                params.insert(t[1..t.len() - 1].to_string(), http::decode(s));
            } else if t != s {
                continue 'outer;
            }
        }
        return Some((tpl, params));
    }
    None
}

pub(crate) fn serve(shared: Arc<Shared>, tcp: TcpStream) {
    let _ = tcp.set_nodelay(true);
    let conn = match Conn::accept(tcp, shared.tls.as_ref()) {
        Ok(c) => c,
        Err(_) => return,
    };
    let mut r = BufReader::with_capacity(256 * 1024, conn);
    loop {
        let head = match http::read_head(&mut r) {
            Ok(Some(h)) => h,
            _ => return,
        };
        match handle(&shared, &head, &mut r) {
            Outcome::KeepAlive => {
                if !head.keep_alive() {
                    return;
                }
            }
            Outcome::Close => {
                let _ = r.get_ref().tcp().shutdown(std::net::Shutdown::Both);
                return;
            }
        }
    }
}

pub(crate) enum Outcome {
    KeepAlive,
    Close,
}

pub(crate) fn reply(r: &mut BufReader<Conn>, res: ApiResult, close: bool) -> Outcome {
    let w = r.get_mut();
    let ok = match res {
        Ok(data) => respond(w, 200, "OK", &json!({ "data": data }), close),
        Err(ApiError::Status(code, msg)) => respond(
            w,
            code,
            &msg,
            &json!({ "data": null, "message": format!("{msg}\n") }),
            close,
        ),
        Err(ApiError::Params(errs)) => respond(
            w,
            400,
            "Parameter verification failed.",
            &json!({ "data": null, "errors": errs, "message": "Parameter verification failed.\n" }),
            close,
        ),
        Err(ApiError::Drop) => return Outcome::Close,
    };
    if ok.is_err() || close {
        Outcome::Close
    } else {
        Outcome::KeepAlive
    }
}

fn parse_form(bytes: &[u8], into: &mut BTreeMap<String, String>) {
    for (k, v) in form_urlencoded::parse(bytes) {
        into.insert(k.into_owned(), v.into_owned());
    }
}

fn handle(shared: &Arc<Shared>, head: &Head, r: &mut BufReader<Conn>) -> Outcome {
    if head.chunked() {
        // pveproxy does not implement chunked request bodies.
        return reply(
            r,
            Err(ApiError::Status(
                501,
                "chunked transfer encoding not supported".into(),
            )),
            true,
        );
    }
    let content_length = match head.content_length() {
        Ok(n) => n,
        Err(e) => return reply(r, Err(ApiError::Status(400, e)), true),
    };
    let Some(api_path) = head.path.strip_prefix("/api2/json") else {
        return reply(
            r,
            Err(ApiError::Status(
                501,
                format!("Unknown API path {}", head.path),
            )),
            true,
        );
    };
    let Some((tpl, mut params)) = route(&head.method, api_path) else {
        return reply(
            r,
            Err(ApiError::Status(
                501,
                format!("Method '{} {api_path}' not implemented", head.method),
            )),
            true,
        );
    };
    // Token auth.
    let user = match check_auth(shared, head) {
        Ok(u) => u,
        Err(e) => return reply(r, Err(e), true),
    };
    parse_form(head.query.as_bytes(), &mut params);
    // Clients that wait for `100 Continue` (curl with large bodies) get it
    // once the request is authenticated and has a length.
    let expects = head
        .header("expect")
        .map(|v| v.eq_ignore_ascii_case("100-continue"))
        .unwrap_or(false);
    if expects && content_length.is_some() {
        use std::io::Write;
        let w = r.get_mut();
        if w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .and_then(|_| w.flush())
            .is_err()
        {
            return Outcome::Close;
        }
    }
    if tpl == "/nodes/{node}/storage/{storage}/upload" {
        return upload(shared, head, r, params, content_length, &user);
    }
    // Ordinary bodies are small url-encoded forms.
    let len = content_length.unwrap_or(0);
    if len > 1 << 20 {
        return reply(
            r,
            Err(ApiError::Status(413, "request too large".into())),
            true,
        );
    }
    let mut body = vec![0u8; len as usize];
    if r.read_exact(&mut body).is_err() {
        return Outcome::Close;
    }
    parse_form(&body, &mut params);
    {
        let mut st = lock(shared);
        st.requests.push(Recorded {
            method: head.method.clone(),
            path: tpl.to_string(),
            params: params.clone(),
        });
    }
    let res = dispatch(shared, &head.method, tpl, &params, &user);
    reply(r, res, !head.keep_alive())
}

fn check_auth(shared: &Shared, head: &Head) -> Result<String, ApiError> {
    let Some(value) = head.header("authorization") else {
        return Err(ApiError::Status(401, "No ticket".into()));
    };
    let Some(rest) = value.strip_prefix("PVEAPIToken=") else {
        return Err(ApiError::Status(401, "No ticket".into()));
    };
    match rest.split_once('=') {
        Some((id, secret))
            if id == shared.token_id
                && constant_time_eq(secret.as_bytes(), shared.secret.as_bytes()) =>
        {
            Ok(id.to_string())
        }
        _ => Err(ApiError::Status(401, "authentication failure".into())),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(crate) fn check_node(shared: &Shared, p: &BTreeMap<String, String>) -> Result<(), ApiError> {
    match p.get("node").map(String::as_str) {
        Some(n) if shared.cfg.nodes.iter().any(|x| x == n) => Ok(()),
        Some(n) if params::is_safe_id(n) => Err(err500(format!(
            "hostname lookup '{n}' failed - failed to get address info for: {n}: Name or service not known"
        ))),
        _ => Err(param_err("node", "invalid format - value does not look like a valid node name")),
    }
}

pub(crate) fn check_vmid(p: &BTreeMap<String, String>, key: &str) -> Result<u32, ApiError> {
    let mut e = Errors::new();
    let v = p.get(key).map(String::as_str).unwrap_or("");
    match params::check_integer(&mut e, key, v, 100, 999_999_999) {
        Some(n) => Ok(n as u32),
        None => Err(ApiError::Params(e)),
    }
}

/// Each route of [`ROUTES`] to its handler; the upload is not here: `handle`
/// streams its body to `storage::upload`.
fn dispatch(
    shared: &Arc<Shared>,
    method: &str,
    tpl: &str,
    p: &BTreeMap<String, String>,
    user: &str,
) -> ApiResult {
    match (method, tpl) {
        ("GET", "/version") => Ok(json!({
            "version": shared.cfg.version,
            "release": shared.cfg.version.rsplit_once('.').map(|(a, _)| a).unwrap_or("8.4"),
            "repoid": "5a1b2c3d",
        })),
        ("GET", "/access/permissions") => crate::access::permissions(shared, p),
        ("GET", "/nodes") => Ok(json!(shared
            .cfg
            .nodes
            .iter()
            .map(|n| json!({ "node": n, "status": "online", "type": "node" }))
            .collect::<Vec<_>>())),
        ("GET", "/cluster/resources") => cluster_resources(shared, p),
        ("GET", "/cluster/nextid") => nextid(shared, p),
        // pve-manager PVE/API2/Cluster.pm get_options: Sys.Audit on /.
        ("GET", "/cluster/options") => {
            crate::access::require(shared, "/", "Sys.Audit")?;
            Ok(shared.cfg.datacenter.clone())
        }
        ("GET", "/nodes/{node}/storage") => storage_list(shared, p),
        ("GET", "/nodes/{node}/storage/{storage}/content") => storage_content(shared, p),
        ("DELETE", "/nodes/{node}/storage/{storage}/content/{volume}") => {
            volume_delete(shared, p, user)
        }
        ("GET", "/nodes/{node}/qemu") => vm_list(shared, p),
        ("POST", "/nodes/{node}/qemu") => create_vm(shared, p, user),
        ("GET", "/nodes/{node}/qemu/{vmid}/config") => vm_config(shared, p),
        ("POST", "/nodes/{node}/qemu/{vmid}/config") => update_config(shared, p, user, false),
        ("PUT", "/nodes/{node}/qemu/{vmid}/config") => update_config(shared, p, user, true),
        ("PUT", "/nodes/{node}/qemu/{vmid}/resize") => resize(shared, p, user),
        ("GET", "/nodes/{node}/qemu/{vmid}/status/current") => vm_status(shared, p),
        ("POST", "/nodes/{node}/qemu/{vmid}/status/start") => power(shared, p, user, true),
        ("POST", "/nodes/{node}/qemu/{vmid}/status/stop") => power(shared, p, user, false),
        ("POST", "/nodes/{node}/qemu/{vmid}/status/shutdown") => shutdown(shared, p, user),
        ("POST", "/nodes/{node}/qemu/{vmid}/template") => template(shared, p, user),
        ("POST", "/nodes/{node}/qemu/{vmid}/clone") => clone_vm(shared, p, user),
        ("DELETE", "/nodes/{node}/qemu/{vmid}") => destroy(shared, p, user),
        ("GET", "/nodes/{node}/tasks/{upid}/status") => task_status(shared, p),
        ("GET", "/nodes/{node}/tasks/{upid}/log") => task_log(shared, p),
        ("POST", "/_sim/faults") => add_fault(shared, p),
        _ => Err(ApiError::Status(
            501,
            format!("Method '{method} {tpl}' not implemented"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_extract_path_parameters() {
        let (tpl, p) = route("GET", "/nodes/pve/tasks/UPID%3Apve%3A1/status").unwrap();
        assert_eq!(tpl, "/nodes/{node}/tasks/{upid}/status");
        assert_eq!(p["upid"], "UPID:pve:1");
        assert!(route("PUT", "/nodes/pve/qemu").is_none());
    }
}
