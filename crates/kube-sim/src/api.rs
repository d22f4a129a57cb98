//! The HTTPS API: Bearer-token auth, the route table and its handlers, answering as the
//! kube-apiserver does. Part of kube-sim, a labelled STAND-IN for K3s's Kubernetes API (not Kubernetes).
//!
//! Routes (anything else: 404 as the apiserver answers an unknown path; a
//! known path with a method the stand-in does not serve: 405):
//! - `GET /api/v1/nodes` (labelSelector, fieldSelector), `GET|PATCH|DELETE /api/v1/nodes/{name}`
//! - `GET /api/v1/pods`, `GET /api/v1/namespaces/{ns}/pods` (fieldSelector
//!   `spec.nodeName=…` and the rest of the pod's selectable fields),
//!   `GET|DELETE /api/v1/namespaces/{ns}/pods/{name}`,
//!   `POST /api/v1/namespaces/{ns}/pods/{name}/eviction`
//! - `GET /api/v1/persistentvolumes[/{name}]`,
//!   `GET /api/v1[/namespaces/{ns}]/persistentvolumeclaims[/{name}]`,
//!   `DELETE` of either (a claim takes its local-path volume with it)
//! - `GET /apis/apps/v1/namespaces/{ns}/daemonsets/{name}` (kubectl drain
//!   checks a DaemonSet-owned pod's owner exists)
//! - `GET /readyz`, `GET /readyz/etcd`, `GET /version`

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use pve_sim::http::{decode, read_head, Conn, Head};

use crate::model::{self, ApiRequest, Evict, Eviction, Owner};
use crate::patch;
use crate::select::{FieldSelector, LabelSelector};
use crate::Inner;

/// The apiserver's request body limit (3 MiB).
const MAX_BODY: u64 = 3 << 20;

pub(crate) struct Reply {
    code: u16,
    content_type: &'static str,
    body: Vec<u8>,
}

fn json_reply(code: u16, v: &Value) -> Reply {
    Reply {
        code,
        content_type: "application/json",
        body: serde_json::to_vec(v).unwrap_or_default(),
    }
}

fn text_reply(code: u16, text: String) -> Reply {
    Reply {
        code,
        content_type: "text/plain; charset=utf-8",
        body: text.into_bytes(),
    }
}

/// A metav1.Status failure (k8s.io/apimachinery pkg/api/errors/errors.go).
fn status(code: u16, reason: &str, message: &str, details: Option<Value>) -> Reply {
    let mut s = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some(d) = details {
        s["details"] = d;
    }
    json_reply(code, &s)
}

/// errors.NewNotFound: `nodes "x" not found`.
fn not_found(resource: &str, name: &str, group: Option<&str>) -> Reply {
    let qualified = match group {
        Some(g) => format!("{resource}.{g}"),
        None => resource.to_string(),
    };
    let mut details = json!({ "name": name, "kind": resource });
    if let Some(g) = group {
        details["group"] = json!(g);
    }
    status(
        404,
        "NotFound",
        &format!("{qualified} \"{name}\" not found"),
        Some(details),
    )
}

fn bad_request(message: &str) -> Reply {
    status(400, "BadRequest", message, None)
}

/// What the stand-in does not implement is refused loudly, never faked.
fn not_served(method: &str, path: &str) -> Reply {
    status(
        405,
        "MethodNotAllowed",
        &format!("kube-sim (a stand-in, not Kubernetes) does not serve {method} {path}"),
        Some(json!({})),
    )
}

fn reason_phrase(code: u16) -> &'static str {
    match code {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Request Entity Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        _ => "Unknown",
    }
}

fn write_reply(w: &mut impl Write, r: &Reply, close: bool) -> io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nCache-Control: no-cache, private\r\nContent-Length: {}\r\n",
        r.code,
        reason_phrase(r.code),
        r.content_type,
        r.body.len()
    );
    if r.content_type.starts_with("text/plain") {
        head.push_str("X-Content-Type-Options: nosniff\r\n");
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    w.write_all(head.as_bytes())?;
    w.write_all(&r.body)?;
    w.flush()
}

/// The request body: Content-Length or chunked.
fn read_body(head: &Head, r: &mut BufReader<Conn>) -> Result<Vec<u8>, String> {
    if head.chunked() {
        let mut body = Vec::new();
        loop {
            let mut line = String::new();
            r.read_line(&mut line).map_err(|e| e.to_string())?;
            let size = u64::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| format!("bad chunk size {line:?}"))?;
            if body.len() as u64 + size > MAX_BODY {
                return Err("request entity too large".into());
            }
            if size == 0 {
                // Trailers end with an empty line.
                loop {
                    line.clear();
                    r.read_line(&mut line).map_err(|e| e.to_string())?;
                    if line.trim().is_empty() {
                        return Ok(body);
                    }
                }
            }
            let start = body.len();
            body.resize(start + size as usize, 0);
            r.read_exact(&mut body[start..])
                .map_err(|e| e.to_string())?;
            line.clear();
            r.read_line(&mut line).map_err(|e| e.to_string())?;
        }
    }
    let n = head.content_length()?.unwrap_or(0);
    if n > MAX_BODY {
        return Err("request entity too large".into());
    }
    let mut body = vec![0u8; n as usize];
    r.read_exact(&mut body).map_err(|e| e.to_string())?;
    Ok(body)
}

pub(crate) fn serve(inner: Arc<Inner>, tcp: TcpStream) {
    let _ = tcp.set_nodelay(true);
    // Idle keep-alive connections end, so their threads do.
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(30)));
    let conn = match Conn::accept(tcp, Some(&inner.tls)) {
        Ok(c) => c,
        Err(_) => return,
    };
    let mut r = BufReader::new(conn);
    loop {
        let head = match read_head(&mut r) {
            Ok(Some(h)) => h,
            _ => return,
        };
        let (reply, close) = match read_body(&head, &mut r) {
            Ok(body) => (handle(&inner, &head, &body), !head.keep_alive()),
            Err(e) if e.contains("too large") => (
                status(
                    413,
                    "RequestEntityTooLarge",
                    &format!("Request entity too large: {e}"),
                    None,
                ),
                true,
            ),
            Err(e) => (bad_request(&e), true),
        };
        inner.lock().requests.push(ApiRequest {
            method: head.method.clone(),
            path: decode(&head.path),
            query: head.query.clone(),
            status: reply.code,
        });
        if write_reply(r.get_mut(), &reply, close).is_err() || close {
            return;
        }
    }
}

/// The bearer token authenticator (k8s.io/apiserver
/// pkg/authentication/request/bearertoken: "Bearer" case-insensitively, then
/// a non-empty token).
fn authenticated(inner: &Inner, head: &Head) -> bool {
    let Some(v) = head.header("authorization") else {
        return false;
    };
    let mut parts = v.trim().splitn(2, ' ');
    let (Some(scheme), Some(token)) = (parts.next(), parts.next()) else {
        return false;
    };
    let token = token.trim();
    scheme.eq_ignore_ascii_case("bearer")
        && !token.is_empty()
        && token.len() == inner.token.len()
        && token
            .bytes()
            .zip(inner.token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn query(head: &Head) -> BTreeMap<String, String> {
    form_urlencoded::parse(head.query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn dry_run(q: &BTreeMap<String, String>) -> bool {
    q.get("dryRun").is_some_and(|v| v == "All")
}

fn handle(inner: &Inner, head: &Head, body: &[u8]) -> Reply {
    if !authenticated(inner, head) {
        // The authentication filter's answer (errors.NewUnauthorized("Unauthorized")).
        return status(401, "Unauthorized", "Unauthorized", None);
    }
    let path = decode(&head.path);
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let q = query(head);
    let m = head.method.as_str();
    if q.get("watch").is_some_and(|v| v == "true" || v == "1") {
        return not_served(m, &format!("{path}?watch"));
    }
    match (m, segs.as_slice()) {
        ("GET", ["api", "v1", "nodes"]) => list_nodes(inner, &q),
        ("GET", ["api", "v1", "nodes", name]) => get_node(inner, name),
        ("PATCH", ["api", "v1", "nodes", name]) => patch_node(inner, name, head, body, &q),
        ("DELETE", ["api", "v1", "nodes", name]) => delete_node(inner, name, &q),
        ("GET", ["api", "v1", "pods"]) => list_pods(inner, None, &q),
        ("GET", ["api", "v1", "namespaces", ns, "pods"]) => list_pods(inner, Some(ns), &q),
        ("GET", ["api", "v1", "namespaces", ns, "pods", name]) => get_pod(inner, ns, name),
        ("DELETE", ["api", "v1", "namespaces", ns, "pods", name]) => {
            delete_pod(inner, ns, name, &q)
        }
        ("POST", ["api", "v1", "namespaces", ns, "pods", name, "eviction"]) => {
            evict(inner, ns, name, body, &q)
        }
        ("GET", ["api", "v1", "persistentvolumes"]) => list_pvs(inner, &q),
        ("GET", ["api", "v1", "persistentvolumes", name]) => get_pv(inner, name),
        ("GET", ["api", "v1", "persistentvolumeclaims"]) => list_pvcs(inner, None, &q),
        ("GET", ["api", "v1", "namespaces", ns, "persistentvolumeclaims"]) => {
            list_pvcs(inner, Some(ns), &q)
        }
        ("GET", ["api", "v1", "namespaces", ns, "persistentvolumeclaims", name]) => {
            get_pvc(inner, ns, name)
        }
        ("DELETE", ["api", "v1", "namespaces", ns, "persistentvolumeclaims", name]) => {
            delete_pvc(inner, ns, name)
        }
        ("DELETE", ["api", "v1", "persistentvolumes", name]) => delete_pv(inner, name),
        ("POST", ["apis", "batch", "v1", "namespaces", ns, "jobs"]) => create_job(inner, ns, body),
        ("GET", ["apis", "batch", "v1", "namespaces", ns, "jobs", name]) => {
            get_job(inner, ns, name)
        }
        ("DELETE", ["apis", "batch", "v1", "namespaces", ns, "jobs", name]) => {
            delete_job(inner, ns, name)
        }
        ("GET", ["apis", "apps", "v1", "namespaces", ns, "daemonsets", name]) => {
            get_daemonset(inner, ns, name)
        }
        ("GET", ["readyz"]) => readyz(inner, &q),
        ("GET", ["readyz", "etcd"]) => readyz_etcd(inner),
        ("GET", ["version"]) => version(),
        (
            _,
            ["api", "v1", "nodes" | "pods" | "persistentvolumes" | "persistentvolumeclaims", ..]
            | ["api", "v1", "namespaces", ..]
            | ["apis", "apps", "v1", ..]
            | ["apis", "batch", "v1", ..]
            | ["readyz", ..]
            | ["version"],
        ) => not_served(m, &path),
        // The apiserver's answer for a path nothing serves.
        _ => status(
            404,
            "NotFound",
            "the server could not find the requested resource",
            Some(json!({})),
        ),
    }
}

/// A `*List` (items without kind and apiVersion, as the apiserver sends
/// them), honouring `limit` and `continue`.
fn list(inner: &Inner, kind: &str, items: Vec<Value>, q: &BTreeMap<String, String>) -> Reply {
    let rv = inner.lock().rv;
    let start: usize = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(c) => match c.parse() {
            Ok(n) => n,
            Err(_) => {
                return status(
                    400,
                    "BadRequest",
                    &format!("invalid continue token {c:?}"),
                    None,
                )
            }
        },
        None => 0,
    };
    let limit: usize = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let total = items.len();
    let page: Vec<Value> = items
        .into_iter()
        .skip(start)
        .take(limit)
        .map(|mut v| {
            if let Some(o) = v.as_object_mut() {
                o.remove("kind");
                o.remove("apiVersion");
            }
            v
        })
        .collect();
    let mut meta = json!({ "resourceVersion": rv.to_string() });
    let next = start.saturating_add(page.len());
    if next < total {
        meta["continue"] = json!(next.to_string());
        meta["remainingItemCount"] = json!(total - next);
    }
    json_reply(
        200,
        &json!({ "kind": kind, "apiVersion": "v1", "metadata": meta, "items": page }),
    )
}

fn selectors(
    q: &BTreeMap<String, String>,
    fields: &[&str],
) -> Result<(LabelSelector, FieldSelector), Reply> {
    let l = LabelSelector::parse(q.get("labelSelector").map(String::as_str).unwrap_or(""))
        .map_err(|e| bad_request(&e))?;
    let f = FieldSelector::parse(
        q.get("fieldSelector").map(String::as_str).unwrap_or(""),
        fields,
    )
    .map_err(|e| bad_request(&e))?;
    Ok((l, f))
}

// Selectable fields per resource (kubernetes pkg/registry/core/node/
// strategy.go NodeToSelectableFields; pod/strategy.go ToSelectableFields).
const NODE_FIELDS: &[&str] = &["metadata.name", "spec.unschedulable"];
const POD_FIELDS: &[&str] = &[
    "metadata.name",
    "metadata.namespace",
    "spec.nodeName",
    "spec.restartPolicy",
    "spec.schedulerName",
    "spec.serviceAccountName",
    "spec.hostNetwork",
    "status.phase",
    "status.podIP",
    "status.nominatedNodeName",
];
const NAME_FIELDS: &[&str] = &["metadata.name", "metadata.namespace"];

fn list_nodes(inner: &Inner, q: &BTreeMap<String, String>) -> Reply {
    let (l, f) = match selectors(q, NODE_FIELDS) {
        Ok(s) => s,
        Err(r) => return r,
    };
    inner.refresh_etcd_conditions();
    let items = inner
        .lock()
        .nodes
        .values()
        .filter(|n| l.matches(&n.labels))
        .filter(|n| {
            f.matches(|k| match k {
                "metadata.name" => n.name.clone(),
                _ => n.unschedulable.to_string(),
            })
        })
        .map(model::Node::to_json)
        .collect();
    list(inner, "NodeList", items, q)
}

fn get_node(inner: &Inner, name: &str) -> Reply {
    inner.refresh_etcd_conditions();
    match inner.lock().nodes.get(name) {
        Some(n) => json_reply(200, &n.to_json()),
        None => not_found("nodes", name, None),
    }
}

/// PATCH a Node. Merge patch (RFC 7386) and strategic merge patch (on the
/// modelled fields the same) are applied to the object; the fields the
/// stand-in models — metadata.labels, metadata.annotations,
/// spec.unschedulable — take the result, status is ignored as on the main
/// resource (the node strategy resets it), and a change anywhere else is
/// refused rather than silently dropped.
fn patch_node(
    inner: &Inner,
    name: &str,
    head: &Head,
    body: &[u8],
    q: &BTreeMap<String, String>,
) -> Reply {
    let ct = head
        .header("content-type")
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let strategic = match ct.as_str() {
        "application/merge-patch+json" => false,
        "application/strategic-merge-patch+json" => true,
        "application/json-patch+json" | "application/apply-patch+yaml" | "application/apply-patch+cbor" => {
            return status(
                415,
                "UnsupportedMediaType",
                &format!("kube-sim (a stand-in, not Kubernetes) does not implement {ct} patches; use application/merge-patch+json or application/strategic-merge-patch+json"),
                None,
            )
        }
        _ => {
            // The apiserver's answer to any other patch type.
            return status(
                415,
                "UnsupportedMediaType",
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json",
                None,
            );
        }
    };
    let p: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return bad_request(&format!("error decoding patch: {e}")),
    };
    if !p.is_object() {
        return bad_request("error decoding patch: the patch is not a JSON object");
    }
    if strategic {
        if let Some(d) = patch::strategic_directive(&p, "") {
            return status(
                422,
                "Invalid",
                &format!("kube-sim (a stand-in, not Kubernetes) does not implement the strategic merge patch directive {d}"),
                None,
            );
        }
    }
    inner.refresh_etcd_conditions();
    let mut st = inner.lock();
    let Some(node) = st.nodes.get(name) else {
        return not_found("nodes", name, None);
    };
    let before = node.to_json();
    if let Some(rv) = p
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
    {
        if rv != node.rv.to_string() {
            return status(
                409,
                "Conflict",
                &format!("Operation cannot be fulfilled on nodes \"{name}\": the object has been modified; please apply your changes to the latest version and try again"),
                Some(json!({ "name": name, "kind": "nodes" })),
            );
        }
    }
    let mut after = before.clone();
    patch::merge(&mut after, &p);
    if let Some(field) = patch::first_difference(
        &before,
        &after,
        "",
        &[
            "metadata.labels",
            "metadata.annotations",
            "metadata.resourceVersion",
            "metadata.managedFields",
            "spec.unschedulable",
            "status",
        ],
    ) {
        return status(
            422,
            "Invalid",
            &format!("Node \"{name}\" is invalid: {field}: kube-sim (a stand-in, not Kubernetes) does not model this field"),
            Some(json!({ "name": name, "kind": "Node" })),
        );
    }
    let strings = |v: Option<&Value>, field: &str| -> Result<BTreeMap<String, String>, Reply> {
        match v {
            None | Some(Value::Null) => Ok(BTreeMap::new()),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k.clone(), s.clone())),
                    _ => Err(bad_request(&format!(
                        "json: cannot unmarshal {v} into Go struct field ObjectMeta.metadata.{field} of type string"
                    ))),
                })
                .collect(),
            Some(v) => Err(bad_request(&format!(
                "json: cannot unmarshal {v} into Go struct field ObjectMeta.metadata.{field} of type map[string]string"
            ))),
        }
    };
    let labels = match strings(after.pointer("/metadata/labels"), "labels") {
        Ok(l) => l,
        Err(r) => return r,
    };
    let annotations = match strings(after.pointer("/metadata/annotations"), "annotations") {
        Ok(a) => a,
        Err(r) => return r,
    };
    let unschedulable = match after.pointer("/spec/unschedulable") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return bad_request(&format!(
                "json: cannot unmarshal {v} into Go struct field NodeSpec.spec.unschedulable of type bool"
            ))
        }
    };
    if dry_run(q) {
        let mut preview = before;
        preview["metadata"]["labels"] = after["metadata"]["labels"].clone();
        preview["metadata"]["annotations"] = after["metadata"]["annotations"].clone();
        preview["spec"]["unschedulable"] = json!(unschedulable);
        return json_reply(200, &preview);
    }
    let rv = st.next_rv();
    let node = st.nodes.get_mut(name).expect("checked above");
    node.labels = labels;
    node.annotations = annotations;
    node.unschedulable = unschedulable;
    node.rv = rv;
    json_reply(200, &node.to_json())
}

/// DELETE a Node. Every Node carries K3s's wrangler finalizer, so the
/// apiserver only marks it (deletionTimestamp) and answers 200 with the
/// object; K3s's member controller then removes a server's etcd member and
/// the finalizer, and the Node disappears (see `Inner::reconcile`).
fn delete_node(inner: &Inner, name: &str, q: &BTreeMap<String, String>) -> Reply {
    inner.refresh_etcd_conditions();
    let mut st = inner.lock();
    let Some(node) = st.nodes.get(name) else {
        return not_found("nodes", name, None);
    };
    if dry_run(q) {
        return json_reply(200, &node.to_json());
    }
    if node.finalizers.is_empty() {
        let n = st.nodes.remove(name).expect("present");
        st.next_rv();
        return json_reply(200, &n.to_json());
    }
    if node.deletion.is_none() {
        let rv = st.next_rv();
        let node = st.nodes.get_mut(name).expect("present");
        node.deletion = Some(model::now());
        node.rv = rv;
    }
    json_reply(200, &st.nodes[name].to_json())
}

fn pod_field(p: &model::Pod, f: &str) -> String {
    match f {
        "metadata.name" => p.name.clone(),
        "metadata.namespace" => p.namespace.clone(),
        "spec.nodeName" => p.node.clone(),
        "spec.restartPolicy" => "Always".into(),
        "spec.schedulerName" => "default-scheduler".into(),
        "spec.serviceAccountName" => "default".into(),
        "spec.hostNetwork" => "false".into(),
        "status.phase" => "Running".into(),
        _ => String::new(),
    }
}

fn list_pods(inner: &Inner, ns: Option<&str>, q: &BTreeMap<String, String>) -> Reply {
    let (l, f) = match selectors(q, POD_FIELDS) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let items = inner
        .lock()
        .pods
        .values()
        .filter(|p| ns.is_none_or(|ns| p.namespace == ns))
        .filter(|_| l.matches(&BTreeMap::new()))
        .filter(|p| f.matches(|k| pod_field(p, k)))
        .map(model::Pod::to_json)
        .collect();
    list(inner, "PodList", items, q)
}

fn get_pod(inner: &Inner, ns: &str, name: &str) -> Reply {
    match inner.lock().pods.get(&(ns.to_string(), name.to_string())) {
        Some(p) => json_reply(200, &p.to_json()),
        None => not_found("pods", name, None),
    }
}

/// DELETE a pod: answered with the object. The apiserver would keep it,
/// terminating, until its kubelet confirms; the stand-in has no kubelet, so
/// it is gone at once.
fn delete_pod(inner: &Inner, ns: &str, name: &str, q: &BTreeMap<String, String>) -> Reply {
    let mut st = inner.lock();
    let key = (ns.to_string(), name.to_string());
    let Some(p) = st.pods.get(&key) else {
        return not_found("pods", name, None);
    };
    if dry_run(q) {
        return json_reply(200, &p.to_json());
    }
    let p = st.pods.remove(&key).expect("present");
    st.next_rv();
    json_reply(200, &p.to_json())
}

/// The eviction subresource (kubernetes pkg/registry/core/pod/storage/
/// eviction.go EvictionREST.Create), answering per the pod's script:
/// success deletes the pod and answers `Status{Status: Success}` with 201
/// (the create handler fills Code with 201, staging/src/k8s.io/apiserver/
/// pkg/endpoints/handlers/create.go); a PDB refusal is
/// errors.NewTooManyRequests("Cannot evict pod as it would violate the
/// pod's disruption budget.", 0) with a DisruptionBudget cause
/// (checkAndDecrement); a failure is errors.NewInternalError. The API does
/// not treat DaemonSet or mirror pods specially: only `kubectl drain` skips
/// them.
fn evict(inner: &Inner, ns: &str, name: &str, body: &[u8], q: &BTreeMap<String, String>) -> Reply {
    let e: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(err) => return bad_request(&format!("error decoding Eviction: {err}")),
    };
    if let Some(kind) = e.get("kind").and_then(Value::as_str) {
        let av = e.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        if kind != "Eviction" || !matches!(av, "policy/v1" | "policy/v1beta1") {
            return bad_request(&format!("not a Eviction object: {av} {kind}"));
        }
    }
    if e.pointer("/metadata/name").and_then(Value::as_str) != Some(name) {
        return bad_request("name in URL does not match name in Eviction object");
    }
    let mut st = inner.lock();
    let key = (ns.to_string(), name.to_string());
    let Some(pod) = st.pods.get_mut(&key) else {
        return not_found("pods", name, None);
    };
    pod.attempts += 1;
    let pdb = match &pod.owner {
        Owner::DaemonSet(o) | Owner::ReplicaSet(o) => format!("{o}-pdb"),
        _ => format!("{name}-pdb"),
    };
    let allowed = match pod.evict {
        Evict::Allow => Ok(()),
        Evict::Pdb429 { times: None } => Err(429),
        Evict::Pdb429 { times: Some(n) } if pod.attempts <= n => Err(429),
        Evict::Pdb429 { .. } => Ok(()),
        Evict::Error500 => Err(500),
    };
    let reply = match allowed {
        Ok(()) => {
            if !dry_run(q) {
                st.pods.remove(&key);
                st.next_rv();
            }
            json_reply(
                201,
                &json!({
                    "kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Success", "code": 201,
                }),
            )
        }
        Err(429) => status(
            429,
            "TooManyRequests",
            "Cannot evict pod as it would violate the pod's disruption budget.",
            Some(json!({ "causes": [{
                "reason": "DisruptionBudget",
                "message": format!("The disruption budget {pdb} needs 1 healthy pods and has 1 currently"),
            }]})),
        ),
        Err(_) => {
            let cause = "kube-sim: this pod's eviction is scripted to fail (Evict::Error500)";
            status(
                500,
                "InternalError",
                &format!("Internal error occurred: {cause}"),
                Some(json!({ "causes": [{ "message": cause }] })),
            )
        }
    };
    st.evictions.push(Eviction {
        namespace: ns.into(),
        pod: name.into(),
        status: reply.code,
    });
    reply
}

fn list_pvs(inner: &Inner, q: &BTreeMap<String, String>) -> Reply {
    let (l, f) = match selectors(q, &["metadata.name"]) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let items = inner
        .lock()
        .pvs
        .values()
        .filter(|_| l.matches(&BTreeMap::new()))
        .filter(|p| f.matches(|_| p.name.clone()))
        .map(model::Pv::to_json)
        .collect();
    list(inner, "PersistentVolumeList", items, q)
}

fn get_pv(inner: &Inner, name: &str) -> Reply {
    match inner.lock().pvs.get(name) {
        Some(p) => json_reply(200, &p.to_json()),
        None => not_found("persistentvolumes", name, None),
    }
}

fn list_pvcs(inner: &Inner, ns: Option<&str>, q: &BTreeMap<String, String>) -> Reply {
    let (l, f) = match selectors(q, NAME_FIELDS) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let items = inner
        .lock()
        .pvs
        .values()
        .filter(|p| ns.is_none_or(|ns| p.claim.0 == ns))
        .filter(|_| l.matches(&BTreeMap::new()))
        .filter(|p| {
            f.matches(|k| match k {
                "metadata.name" => p.claim.1.clone(),
                _ => p.claim.0.clone(),
            })
        })
        .map(model::Pv::claim_json)
        .collect();
    list(inner, "PersistentVolumeClaimList", items, q)
}

fn get_pvc(inner: &Inner, ns: &str, name: &str) -> Reply {
    match inner
        .lock()
        .pvs
        .values()
        .find(|p| p.claim.0 == ns && p.claim.1 == name)
    {
        Some(p) => json_reply(200, &p.claim_json()),
        None => not_found("persistentvolumeclaims", name, None),
    }
}

/// A batch/v1 Job: stored as created and "run" by script (no kubelet):
/// after its delay it shows the status the Job controller writes
/// (kubernetes pkg/controller/job/job_controller.go: `succeeded` and a
/// `Complete` condition; `failed` and a `Failed` condition with reason
/// `BackoffLimitExceeded`, "Job has reached the specified backoff limit").
fn create_job(inner: &Inner, ns: &str, body: &[u8]) -> Reply {
    let mut job: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return bad_request(&format!("error decoding Job: {e}")),
    };
    let Some(name) = job
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .map(str::to_string)
    else {
        return status(
            422,
            "Invalid",
            "Job.batch \"\" is invalid: metadata.name: Required value",
            None,
        );
    };
    let mut st = inner.lock();
    let key = (ns.to_string(), name.clone());
    if st.jobs.contains_key(&key) {
        return status(
            409,
            "AlreadyExists",
            &format!("jobs.batch \"{name}\" already exists"),
            None,
        );
    }
    let outcome = st
        .job_scripts
        .iter()
        .find(|(prefix, _)| name.starts_with(prefix.as_str()))
        .map(|(_, o)| *o)
        .unwrap_or(model::JobOutcome::Succeed(
            std::time::Duration::from_millis(200),
        ));
    let rv = st.next_rv();
    job["metadata"]["namespace"] = json!(ns);
    job["metadata"]["uid"] = json!(pve_sim::new_uuid());
    job["metadata"]["resourceVersion"] = json!(rv.to_string());
    job["metadata"]["creationTimestamp"] = json!(model::now());
    job["apiVersion"] = json!("batch/v1");
    job["kind"] = json!("Job");
    st.jobs
        .insert(key, (job.clone(), std::time::Instant::now(), outcome));
    json_reply(201, &job)
}

fn get_job(inner: &Inner, ns: &str, name: &str) -> Reply {
    let st = inner.lock();
    let Some((job, created, outcome)) = st.jobs.get(&(ns.to_string(), name.to_string())) else {
        return not_found("jobs", name, Some("batch"));
    };
    let mut job = job.clone();
    let (done, ok) = match outcome {
        model::JobOutcome::Succeed(d) => (created.elapsed() >= *d, true),
        model::JobOutcome::Fail(d) => (created.elapsed() >= *d, false),
    };
    job["status"] = if !done {
        json!({ "active": 1 })
    } else if ok {
        json!({ "succeeded": 1, "conditions": [
            { "type": "Complete", "status": "True" }
        ]})
    } else {
        json!({ "failed": 1, "conditions": [
            { "type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
              "message": "Job has reached the specified backoff limit" }
        ]})
    };
    json_reply(200, &job)
}

fn delete_job(inner: &Inner, ns: &str, name: &str) -> Reply {
    let mut st = inner.lock();
    match st.jobs.remove(&(ns.to_string(), name.to_string())) {
        Some((job, _, _)) => {
            st.next_rv();
            json_reply(200, &job)
        }
        None => not_found("jobs", name, Some("batch")),
    }
}

/// Deleting a claim of a local-path volume: the StorageClass's reclaim
/// policy is `Delete` (rancher/local-path-provisioner deploy/
/// local-path-storage.yaml), so its PersistentVolume goes with it (the
/// stand-in has no provisioner to clean the node's directory). Answers the
/// claim as it was, as the apiserver answers a delete.
fn delete_pvc(inner: &Inner, ns: &str, name: &str) -> Reply {
    let mut st = inner.lock();
    let Some(pv) = st
        .pvs
        .values()
        .find(|p| p.claim.0 == ns && p.claim.1 == name)
        .map(|p| p.name.clone())
    else {
        return not_found("persistentvolumeclaims", name, None);
    };
    let p = st.pvs.remove(&pv).expect("present");
    st.next_rv();
    json_reply(200, &p.claim_json())
}

fn delete_pv(inner: &Inner, name: &str) -> Reply {
    let mut st = inner.lock();
    match st.pvs.remove(name) {
        Some(p) => {
            st.next_rv();
            json_reply(200, &p.to_json())
        }
        None => not_found("persistentvolumes", name, None),
    }
}

/// A DaemonSet named by some pod's owner reference (kubectl drain's
/// daemonSetFilter GETs it); the stand-in knows no more about it.
fn get_daemonset(inner: &Inner, ns: &str, name: &str) -> Reply {
    if !inner
        .lock()
        .daemonsets
        .contains(&(ns.to_string(), name.to_string()))
    {
        return not_found("daemonsets", name, Some("apps"));
    }
    json_reply(
        200,
        &json!({
            "kind": "DaemonSet", "apiVersion": "apps/v1",
            "metadata": { "name": name, "namespace": ns },
            "spec": {
                "selector": { "matchLabels": { "app": name } },
                "template": { "metadata": { "labels": { "app": name } },
                    "spec": { "containers": [{ "name": "main", "image": "registry.k8s.io/pause:3.10" }] } },
            },
        }),
    )
}

/// `/readyz` (k8s.io/apiserver pkg/server/healthz/healthz.go
/// handleRootHealth): "ok", or each check's line and "readyz check failed"
/// with 500. The stand-in's checks are ping, log and etcd.
fn readyz(inner: &Inner, q: &BTreeMap<String, String>) -> Reply {
    let excluded: Vec<&str> = q
        .iter()
        .filter(|(k, _)| *k == "exclude")
        .map(|(_, v)| v.as_str())
        .collect();
    let mut out = String::new();
    let mut failed = false;
    for check in ["ping", "log", "etcd"] {
        if excluded.contains(&check) {
            out.push_str(&format!("[+]{check} excluded: ok\n"));
            continue;
        }
        let ok = check != "etcd" || inner.etcd.health().is_ok();
        if ok {
            out.push_str(&format!("[+]{check} ok\n"));
        } else {
            out.push_str(&format!("[-]{check} failed: reason withheld\n"));
            failed = true;
        }
    }
    if failed {
        // http.Error appends a newline.
        return text_reply(500, format!("{out}readyz check failed\n"));
    }
    if q.contains_key("verbose") {
        return text_reply(200, format!("{out}readyz check passed\n"));
    }
    text_reply(200, "ok".into())
}

/// `/readyz/etcd` (healthz.go adaptCheckToHandler): "ok", or 500
/// "internal server error: <err>" where the etcd check's error is "error
/// getting data from etcd: <etcd's error>" (storagebackend/factory/etcd3.go).
fn readyz_etcd(inner: &Inner) -> Reply {
    match inner.etcd.health() {
        Ok(()) => text_reply(200, "ok".into()),
        Err(e) => text_reply(
            500,
            format!("internal server error: error getting data from etcd: {e}\n"),
        ),
    }
}

fn version() -> Reply {
    json_reply(
        200,
        &json!({
            "major": "1", "minor": "33", "gitVersion": "v1.33.4+k3s1",
            "gitCommit": "kube-sim", "gitTreeState": "clean",
            "buildDate": "2025-08-01T00:00:00Z", "goVersion": "go1.24.4",
            "compiler": "gc", "platform": "linux/amd64",
        }),
    )
}
