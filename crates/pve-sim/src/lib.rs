//! A stand-in for the Proxmox VE HTTP API (one node `pve`), so `kiln publish`
//! can be tested and tried without Proxmox. It is a simulator, not Proxmox.
//!
//! What it reproduces: API-token auth (401 otherwise), the upload endpoint's
//! multipart rules (Content-Length required, chunked refused, fields before
//! the file part, PVE's file name rules), asynchronous UPID tasks, config
//! locks while tasks run, template rules, `400 Parameter verification failed`
//! with per-parameter errors, and injectable faults (see [`Fault`]).
//! Storages: `local` (dir: iso, vztmpl, import, backup) and `local-lvm`
//! (lvmthin: images, rootdir). Disk contents are not converted: an imported
//! disk is recorded with its size, nothing boots.

pub mod http;
pub mod multipart;
pub mod params;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{respond, Conn, Head};
use params::Errors;

pub const NODE: &str = "pve";

/// A storage of the simulated node.
#[derive(Debug, Clone, Copy)]
pub struct StorageDef {
    pub id: &'static str,
    pub kind: &'static str,
    pub content: &'static [&'static str],
}

pub const STORAGES: &[StorageDef] = &[
    StorageDef {
        id: "local",
        kind: "dir",
        content: &["iso", "vztmpl", "import", "backup"],
    },
    StorageDef {
        id: "local-lvm",
        kind: "lvmthin",
        content: &["images", "rootdir"],
    },
];

fn storage(id: &str) -> Option<&'static StorageDef> {
    STORAGES.iter().find(|s| s.id == id)
}

/// Which API operation a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    Upload,
    Create,
    Template,
    Clone,
    Destroy,
    VolumeDelete,
    TaskStatus,
}

/// What goes wrong.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FaultKind {
    /// Answer `500 Internal Server Error` instead of doing the work.
    Http500,
    /// Close the connection mid-request (for uploads: after half the body).
    Drop,
    /// The task starts but ends with an error.
    FailTask,
    /// The task takes this many seconds.
    SlowTask(f64),
    /// `can't lock file ... - got timeout`.
    LockTimeout,
    /// A transient `400` (e.g. task status polled right after creation).
    Transient400,
    /// Another client takes the requested VMID just before this create.
    Race,
}

/// An injected fault: `op:kind[*count]`, e.g. `upload:500`, `create:fail`,
/// `template:lock-timeout`, `upload:drop`, `create:slow=5`, `status:400*2`,
/// `create:race`.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub op: FaultOp,
    pub kind: FaultKind,
    pub remaining: u32,
}

impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (spec, count) = match s.split_once('*') {
            Some((a, n)) => (
                a,
                n.parse().map_err(|_| format!("bad fault count in `{s}`"))?,
            ),
            None => (s, 1),
        };
        let (op, kind) = spec
            .split_once(':')
            .ok_or_else(|| format!("fault `{s}` is not OP:KIND"))?;
        let op = match op {
            "upload" => FaultOp::Upload,
            "create" => FaultOp::Create,
            "template" => FaultOp::Template,
            "clone" => FaultOp::Clone,
            "destroy" => FaultOp::Destroy,
            "volume-delete" => FaultOp::VolumeDelete,
            "status" => FaultOp::TaskStatus,
            other => return Err(format!("unknown fault operation `{other}` (upload, create, template, clone, destroy, volume-delete, status)")),
        };
        let kind = match kind {
            "500" => FaultKind::Http500,
            "drop" => FaultKind::Drop,
            "fail" => FaultKind::FailTask,
            "lock-timeout" => FaultKind::LockTimeout,
            "400" => FaultKind::Transient400,
            "race" => FaultKind::Race,
            k if k.starts_with("slow=") => FaultKind::SlowTask(
                k[5..].parse().map_err(|_| format!("bad seconds in `{s}`"))?,
            ),
            other => return Err(format!("unknown fault kind `{other}` (500, drop, fail, slow=SECS, lock-timeout, 400, race)")),
        };
        Ok(Fault {
            op,
            kind,
            remaining: count,
        })
    }
}

/// How to run a simulator.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub listen: SocketAddr,
    /// `USER@REALM!TOKENID=SECRET`.
    pub token: String,
    /// Where uploads and volumes live (`var-tmp/`, `storage/<id>/`).
    pub data_dir: PathBuf,
    /// PEM certificate chain and key: serve HTTPS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// How long each task runs.
    pub task_delay: Duration,
    /// Reported by `/version`.
    pub version: String,
    pub faults: Vec<Fault>,
}

impl SimConfig {
    pub fn new(token: &str, data_dir: &Path) -> Self {
        SimConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            token: token.to_string(),
            data_dir: data_dir.to_path_buf(),
            tls: None,
            task_delay: Duration::from_millis(100),
            version: "8.4.1".into(),
            faults: Vec::new(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Vm {
    pub vmid: u32,
    /// Config keys as `qm config` shows them (`lock` while a task runs).
    pub config: BTreeMap<String, String>,
    pub template: bool,
    pub running: bool,
}

#[derive(Debug, Clone)]
pub struct Volume {
    pub volid: String,
    pub content: String,
    pub format: String,
    pub size: u64,
    pub ctime: u64,
    /// The file on disk for file-based storage.
    pub path: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct Task {
    pub upid: String,
    pub kind: String,
    pub id: String,
    pub user: String,
    pub pid: u32,
    pub pstart: u64,
    pub starttime: u64,
    /// None while running.
    pub exitstatus: Option<String>,
    pub log: Vec<String>,
}

/// One API request as the simulator saw it (after auth), for conformance tests.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// The API path template, e.g. `/nodes/{node}/qemu`.
    pub path: String,
    /// Path, query and body parameters, merged.
    pub params: BTreeMap<String, String>,
}

/// Everything the simulator knows; tests may inspect or seed it.
#[derive(Debug, Default)]
pub struct State {
    pub vms: BTreeMap<u32, Vm>,
    pub volumes: BTreeMap<String, Volume>,
    pub tasks: HashMap<String, Task>,
    pub faults: Vec<Fault>,
    pub requests: Vec<Recorded>,
    /// Bytes of upload file parts received (also for failed uploads).
    pub upload_bytes: u64,
    next_pid: u32,
}

impl State {
    fn take_fault(&mut self, op: FaultOp) -> Option<FaultKind> {
        self.take_fault_if(op, |_| true)
    }

    fn take_fault_if(
        &mut self,
        op: FaultOp,
        want: impl Fn(FaultKind) -> bool,
    ) -> Option<FaultKind> {
        let i = self
            .faults
            .iter()
            .position(|f| f.op == op && f.remaining > 0 && want(f.kind))?;
        let f = &mut self.faults[i];
        f.remaining -= 1;
        let kind = f.kind;
        if f.remaining == 0 {
            self.faults.remove(i);
        }
        Some(kind)
    }

    /// Seed a VM (as if someone else created it), e.g. to occupy a VMID.
    pub fn add_vm(&mut self, vmid: u32, name: &str, tags: &str, template: bool) {
        let mut config = BTreeMap::new();
        config.insert("name".into(), name.into());
        if !tags.is_empty() {
            config.insert("tags".into(), normalize_tags(tags));
        }
        let disk = if template {
            format!("local-lvm:base-{vmid}-disk-1,size=4G")
        } else {
            format!("local-lvm:vm-{vmid}-disk-1,size=4G")
        };
        config.insert("scsi0".into(), disk);
        self.vms.insert(
            vmid,
            Vm {
                vmid,
                config,
                template,
                running: false,
            },
        );
    }

    /// Seed a linked clone of template `base`.
    pub fn add_linked_clone(&mut self, base: u32, vmid: u32, name: &str) {
        self.add_vm(vmid, name, "", false);
        self.vms.get_mut(&vmid).unwrap().config.insert(
            "scsi0".into(),
            format!("local-lvm:base-{base}-disk-1/vm-{vmid}-disk-1,size=4G"),
        );
    }
}

struct Shared {
    cfg: SimConfig,
    token_id: String,
    secret: String,
    state: Mutex<State>,
    tls: Option<Arc<rustls::ServerConfig>>,
    stopped: AtomicBool,
}

/// A running simulator; stops when dropped.
pub struct Sim {
    addr: SocketAddr,
    shared: Arc<Shared>,
    https: bool,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn normalize_tags(s: &str) -> String {
    let mut t: Vec<String> = params::split_tags(s)
        .into_iter()
        .map(|t| t.to_ascii_lowercase())
        .collect();
    t.sort();
    t.dedup();
    t.join(";")
}

fn load_tls(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read certificate {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad PEM in {}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("cannot read private key {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("certificate and key do not fit together")?;
    Ok(Arc::new(cfg))
}

impl Sim {
    /// Bind, then serve on background threads.
    pub fn start(cfg: SimConfig) -> Result<Sim> {
        let (token_id, secret) = cfg
            .token
            .split_once('=')
            .filter(|(id, s)| id.contains('@') && id.contains('!') && !s.is_empty())
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .context("--token must look like USER@REALM!TOKENID=SECRET")?;
        for d in [
            "var-tmp",
            "storage/local/import",
            "storage/local/template/cache",
        ] {
            std::fs::create_dir_all(cfg.data_dir.join(d))
                .with_context(|| format!("cannot create {}", cfg.data_dir.join(d).display()))?;
        }
        let tls = match &cfg.tls {
            Some((c, k)) => Some(load_tls(c, k)?),
            None => None,
        };
        let listener = TcpListener::bind(cfg.listen)
            .with_context(|| format!("cannot listen on {}", cfg.listen))?;
        let addr = listener.local_addr()?;
        let https = tls.is_some();
        let state = State {
            faults: cfg.faults.clone(),
            next_pid: 4000,
            ..State::default()
        };
        let shared = Arc::new(Shared {
            cfg,
            token_id,
            secret,
            state: Mutex::new(state),
            tls,
            stopped: AtomicBool::new(false),
        });
        let s2 = shared.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s2.stopped.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(tcp) = conn {
                    let s3 = s2.clone();
                    std::thread::spawn(move || serve(s3, tcp));
                }
            }
        });
        Ok(Sim {
            addr,
            shared,
            https,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL, e.g. `https://127.0.0.1:8006`.
    pub fn url(&self) -> String {
        format!(
            "{}://{}",
            if self.https { "https" } else { "http" },
            self.addr
        )
    }

    /// Inspect or seed the simulator's state.
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn inject(&self, fault: Fault) {
        self.state().faults.push(fault);
    }

    /// Block until the simulator is stopped by a signal or by `stop`.
    pub fn wait(&self) {
        while !self.shared.stopped.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn stop(&self) {
        if !self.shared.stopped.swap(true, Ordering::SeqCst) {
            // Wake the accept loop so it sees the flag.
            let _ = TcpStream::connect(self.addr);
        }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A handler's failure, mapped to PVE's HTTP conventions.
enum ApiError {
    /// Status code and message (in the reason phrase and `message`).
    Status(u16, String),
    /// 400 Parameter verification failed.
    Params(Errors),
    /// Close the connection without an answer.
    Drop,
}

type ApiResult = Result<Value, ApiError>;

fn err500(msg: impl Into<String>) -> ApiError {
    ApiError::Status(500, msg.into())
}

fn param_err(name: &str, msg: impl Into<String>) -> ApiError {
    let mut e = Errors::new();
    e.insert(name.into(), msg.into());
    ApiError::Params(e)
}

const ROUTES: &[(&str, &str)] = &[
    ("GET", "/version"),
    ("GET", "/nodes"),
    ("GET", "/cluster/resources"),
    ("GET", "/cluster/nextid"),
    ("GET", "/nodes/{node}/storage"),
    ("GET", "/nodes/{node}/storage/{storage}/content"),
    ("DELETE", "/nodes/{node}/storage/{storage}/content/{volume}"),
    ("POST", "/nodes/{node}/storage/{storage}/upload"),
    ("GET", "/nodes/{node}/qemu"),
    ("POST", "/nodes/{node}/qemu"),
    ("GET", "/nodes/{node}/qemu/{vmid}/config"),
    ("GET", "/nodes/{node}/qemu/{vmid}/status/current"),
    ("POST", "/nodes/{node}/qemu/{vmid}/status/start"),
    ("POST", "/nodes/{node}/qemu/{vmid}/status/stop"),
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

fn serve(shared: Arc<Shared>, tcp: TcpStream) {
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

enum Outcome {
    KeepAlive,
    Close,
}

fn reply(r: &mut BufReader<Conn>, res: ApiResult, close: bool) -> Outcome {
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

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    shared.state.lock().unwrap_or_else(|e| e.into_inner())
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

fn check_node(p: &BTreeMap<String, String>) -> Result<(), ApiError> {
    match p.get("node").map(String::as_str) {
        Some(NODE) => Ok(()),
        Some(n) if params::is_safe_id(n) => Err(err500(format!(
            "hostname lookup '{n}' failed - failed to get address info for: {n}: Name or service not known"
        ))),
        _ => Err(param_err("node", "invalid format - value does not look like a valid node name")),
    }
}

fn check_vmid(p: &BTreeMap<String, String>, key: &str) -> Result<u32, ApiError> {
    let mut e = Errors::new();
    let v = p.get(key).map(String::as_str).unwrap_or("");
    match params::check_integer(&mut e, key, v, 100, 999_999_999) {
        Some(n) => Ok(n as u32),
        None => Err(ApiError::Params(e)),
    }
}

fn vm_missing(vmid: u32) -> ApiError {
    err500(format!(
        "Configuration file 'nodes/{NODE}/qemu-server/{vmid}.conf' does not exist"
    ))
}

/// The request-level faults (a lock timeout, a 500) injected for this call.
fn refuse_injected(kind: Option<FaultKind>, vmid: u32) -> Result<(), ApiError> {
    match kind {
        Some(FaultKind::LockTimeout) => Err(lock_timeout(vmid)),
        Some(FaultKind::Http500) => {
            Err(err500("Internal Server Error (fault injected by pve-sim)"))
        }
        _ => Ok(()),
    }
}

fn lock_timeout(vmid: u32) -> ApiError {
    err500(format!(
        "can't lock file '/var/lock/qemu-server/lock-{vmid}.conf' - got timeout"
    ))
}

type Work = Box<dyn FnOnce(&mut State) -> Result<(), String> + Send>;

/// Start an asynchronous task; `work` runs after the delay and decides the
/// exit status.
fn spawn_task(
    shared: &Arc<Shared>,
    st: &mut State,
    kind: &str,
    id: &str,
    user: &str,
    delay: Duration,
    work: Work,
) -> String {
    st.next_pid += 1;
    let pid = st.next_pid;
    let starttime = now();
    let pstart = 1_000_000 + pid as u64;
    let upid = format!("UPID:{NODE}:{pid:08X}:{pstart:08X}:{starttime:08X}:{kind}:{id}:{user}:");
    st.tasks.insert(
        upid.clone(),
        Task {
            upid: upid.clone(),
            kind: kind.into(),
            id: id.into(),
            user: user.into(),
            pid,
            pstart,
            starttime,
            exitstatus: None,
            log: vec![format!("starting task {kind} {id}")],
        },
    );
    let s2 = shared.clone();
    let u2 = upid.clone();
    std::thread::spawn(move || {
        std::thread::sleep(delay);
        let mut st = lock(&s2);
        let result = work(&mut st);
        if let Some(t) = st.tasks.get_mut(&u2) {
            match result {
                Ok(()) => {
                    t.log.push("TASK OK".into());
                    t.exitstatus = Some("OK".into());
                }
                Err(e) => {
                    t.log.push(format!("TASK ERROR: {e}"));
                    t.exitstatus = Some(e);
                }
            }
        }
    });
    upid
}

/// Delay and failure decided by faults for a task of this operation.
fn task_plan(shared: &Shared, st: &mut State, op: FaultOp) -> (Duration, bool, Option<FaultKind>) {
    let mut delay = shared.cfg.task_delay;
    let mut fail = false;
    let kind = st.take_fault(op);
    match kind {
        Some(FaultKind::SlowTask(s)) => delay = Duration::from_secs_f64(s),
        Some(FaultKind::FailTask) => fail = true,
        _ => {}
    }
    (delay, fail, kind)
}

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
        ("GET", "/nodes") => Ok(json!([{ "node": NODE, "status": "online", "type": "node" }])),
        ("GET", "/cluster/resources") => cluster_resources(shared, p),
        ("GET", "/cluster/nextid") => nextid(shared, p),
        ("GET", "/nodes/{node}/storage") => storage_list(p),
        ("GET", "/nodes/{node}/storage/{storage}/content") => storage_content(shared, p),
        ("DELETE", "/nodes/{node}/storage/{storage}/content/{volume}") => {
            volume_delete(shared, p, user)
        }
        ("GET", "/nodes/{node}/qemu") => {
            check_node(p)?;
            let st = lock(shared);
            Ok(Value::Array(st.vms.values().map(vm_summary).collect()))
        }
        ("POST", "/nodes/{node}/qemu") => create_vm(shared, p, user),
        ("GET", "/nodes/{node}/qemu/{vmid}/config") => {
            check_node(p)?;
            let vmid = check_vmid(p, "vmid")?;
            let st = lock(shared);
            let vm = st.vms.get(&vmid).ok_or_else(|| vm_missing(vmid))?;
            let mut m = serde_json::Map::new();
            for (k, v) in &vm.config {
                m.insert(k.clone(), Value::String(v.clone()));
            }
            if vm.template {
                m.insert("template".into(), json!(1));
            }
            m.insert(
                "digest".into(),
                json!(sha256_hex(format!("{:?}", vm.config).as_bytes())),
            );
            Ok(Value::Object(m))
        }
        ("GET", "/nodes/{node}/qemu/{vmid}/status/current") => {
            check_node(p)?;
            let vmid = check_vmid(p, "vmid")?;
            let st = lock(shared);
            let vm = st.vms.get(&vmid).ok_or_else(|| vm_missing(vmid))?;
            Ok(vm_summary(vm))
        }
        ("POST", "/nodes/{node}/qemu/{vmid}/status/start") => power(shared, p, user, true),
        ("POST", "/nodes/{node}/qemu/{vmid}/status/stop") => power(shared, p, user, false),
        ("POST", "/nodes/{node}/qemu/{vmid}/template") => template(shared, p, user),
        ("POST", "/nodes/{node}/qemu/{vmid}/clone") => clone_vm(shared, p, user),
        ("DELETE", "/nodes/{node}/qemu/{vmid}") => destroy(shared, p, user),
        ("GET", "/nodes/{node}/tasks/{upid}/status") => task_status(shared, p),
        ("GET", "/nodes/{node}/tasks/{upid}/log") => {
            check_node(p)?;
            let st = lock(shared);
            let t = st
                .tasks
                .get(p.get("upid").map(String::as_str).unwrap_or(""))
                .ok_or_else(|| param_err("upid", "no such task"))?;
            Ok(Value::Array(
                t.log
                    .iter()
                    .enumerate()
                    .map(|(i, l)| json!({"n": i + 1, "t": l}))
                    .collect(),
            ))
        }
        ("POST", "/_sim/faults") => {
            let spec = p.get("spec").cloned().unwrap_or_default();
            let f: Fault = spec.parse().map_err(|e: String| param_err("spec", e))?;
            lock(shared).faults.push(f);
            Ok(Value::Null)
        }
        _ => Err(ApiError::Status(
            501,
            format!("Method '{method} {tpl}' not implemented"),
        )),
    }
}

fn vm_summary(vm: &Vm) -> Value {
    let mut v = json!({
        "vmid": vm.vmid,
        "name": vm.config.get("name").cloned().unwrap_or_default(),
        "status": if vm.running { "running" } else { "stopped" },
        "template": if vm.template { 1 } else { 0 },
        "maxmem": 8u64 << 30,
        "maxdisk": 4u64 << 30,
    });
    if let Some(t) = vm.config.get("tags") {
        v["tags"] = json!(t);
    }
    if let Some(l) = vm.config.get("lock") {
        v["lock"] = json!(l);
    }
    v
}

fn cluster_resources(shared: &Shared, p: &BTreeMap<String, String>) -> ApiResult {
    if let Some(t) = p.get("type") {
        let mut e = Errors::new();
        params::check_enum(&mut e, "type", t, &["vm", "storage", "node", "sdn"]);
        if !e.is_empty() {
            return Err(ApiError::Params(e));
        }
    }
    let st = lock(shared);
    let mut out = Vec::new();
    let want = p.get("type").map(String::as_str);
    if want.is_none() || want == Some("vm") {
        for vm in st.vms.values() {
            let mut v = vm_summary(vm);
            v["id"] = json!(format!("qemu/{}", vm.vmid));
            v["type"] = json!("qemu");
            v["node"] = json!(NODE);
            out.push(v);
        }
    }
    if want.is_none() || want == Some("storage") {
        for s in STORAGES {
            out.push(json!({"id": format!("storage/{NODE}/{}", s.id), "type": "storage", "storage": s.id, "node": NODE, "content": s.content.join(","), "status": "available"}));
        }
    }
    if want.is_none() || want == Some("node") {
        out.push(
            json!({"id": format!("node/{NODE}"), "type": "node", "node": NODE, "status": "online"}),
        );
    }
    Ok(Value::Array(out))
}

fn nextid(shared: &Shared, p: &BTreeMap<String, String>) -> ApiResult {
    let st = lock(shared);
    if p.contains_key("vmid") {
        let vmid = check_vmid(p, "vmid")?;
        if st.vms.contains_key(&vmid) {
            return Err(param_err("vmid", format!("VM {vmid} already exists")));
        }
        return Ok(json!(vmid.to_string()));
    }
    let id = (100u32..).find(|i| !st.vms.contains_key(i)).unwrap();
    // Real PVE returns the number as a string.
    Ok(json!(id.to_string()))
}

fn storage_entry(s: &StorageDef) -> Value {
    json!({
        "storage": s.id, "type": s.kind, "content": s.content.join(","),
        "active": 1, "enabled": 1, "shared": 0,
        "total": 100u64 << 30, "used": 10u64 << 30, "avail": 90u64 << 30,
    })
}

fn storage_list(p: &BTreeMap<String, String>) -> ApiResult {
    check_node(p)?;
    let out: Vec<Value> = STORAGES
        .iter()
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

fn known_storage(p: &BTreeMap<String, String>) -> Result<&'static StorageDef, ApiError> {
    let id = p.get("storage").map(String::as_str).unwrap_or("");
    storage(id).ok_or_else(|| err500(format!("storage '{id}' does not exist")))
}

fn storage_content(shared: &Shared, p: &BTreeMap<String, String>) -> ApiResult {
    check_node(p)?;
    let s = known_storage(p)?;
    let st = lock(shared);
    let prefix = format!("{}:", s.id);
    let out: Vec<Value> = st
        .volumes
        .values()
        .filter(|v| v.volid.starts_with(&prefix))
        .filter(|v| p.get("content").map(|c| *c == v.content).unwrap_or(true))
        .map(|v| json!({"volid": v.volid, "content": v.content, "format": v.format, "size": v.size, "ctime": v.ctime}))
        .collect();
    Ok(Value::Array(out))
}

fn volume_delete(shared: &Arc<Shared>, p: &BTreeMap<String, String>, user: &str) -> ApiResult {
    check_node(p)?;
    let s = known_storage(p)?;
    let vol = p.get("volume").cloned().unwrap_or_default();
    let volid = if vol.contains(':') {
        vol
    } else {
        format!("{}:{vol}", s.id)
    };
    let mut st = lock(shared);
    if !st.volumes.contains_key(&volid) {
        return Err(err500(format!("volume '{volid}' does not exist")));
    }
    let (delay, fail, kind) = task_plan(shared, &mut st, FaultOp::VolumeDelete);
    if kind == Some(FaultKind::Http500) {
        return Err(err500("Internal Server Error (fault injected by pve-sim)"));
    }
    let v2 = volid.clone();
    let upid = spawn_task(
        shared,
        &mut st,
        "imgdel",
        &volid,
        user,
        delay,
        Box::new(move |st| {
            if fail {
                return Err(format!("error removing '{v2}' (fault injected by pve-sim)"));
            }
            if let Some(v) = st.volumes.remove(&v2) {
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
fn upload(
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
        return reply(
            r,
            Err(err500("Internal Server Error (fault injected by pve-sim)")),
            true,
        );
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
    check_node(p)?;
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
    // PVE keeps only the last path component of the client's name.
    let name = file
        .filename
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or("")
        .to_string();
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
    let dest_dir = shared.cfg.data_dir.join("storage").join(s.id).join(sub);
    let volid = format!(
        "{}:{}/{}",
        s.id,
        if content == "vztmpl" { "vztmpl" } else { sub },
        name
    );
    let checksum = p.get("checksum").cloned();
    let algo = p.get("checksum-algorithm").cloned();
    let mut st = lock(shared);
    let (delay, fail, _) = task_plan(shared, &mut st, FaultOp::Upload);
    let tmp = file.tmp_path.clone();
    let size = file.size;
    let upid = spawn_task(
        shared,
        &mut st,
        "imgcopy",
        "",
        user,
        delay,
        Box::new(move |st| {
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
            std::fs::rename(&tmp, &dest).map_err(|e| {
                cleanup();
                format!("cannot move upload to {}: {e}", dest.display())
            })?;
            let format = name.rsplit('.').next().unwrap_or("raw").to_string();
            st.volumes.insert(
                volid.clone(),
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

const CREATE_KEYS: &[&str] = &[
    "vmid",
    "node",
    "name",
    "tags",
    "description",
    "bios",
    "machine",
    "efidisk0",
    "scsihw",
    "boot",
    "agent",
    "cores",
    "sockets",
    "memory",
    "cpu",
    "ostype",
    "vga",
    "onboot",
    "start",
    "pool",
    "storage",
    "ciuser",
    "sshkeys",
    "ipconfig0",
    "numa",
    "template",
    "tpmstate0",
];

fn is_indexed(k: &str, prefix: &str, max: u32) -> bool {
    k.strip_prefix(prefix)
        .and_then(|n| n.parse::<u32>().ok())
        .map(|n| n <= max && k == format!("{prefix}{n}"))
        .unwrap_or(false)
}

/// Check one disk option: a new volume (`STORAGE:SIZE`), an import
/// (`STORAGE:0,import-from=VOLUME`), `STORAGE:cloudinit`, or `none`.
fn check_disk(st: &State, e: &mut Errors, key: &str, v: &str, efi: bool) -> Result<(), ApiError> {
    let (file, opts) = match params::property_string(v, "file") {
        Ok(x) => x,
        Err(m) => {
            e.insert(key.into(), format!("invalid format - {m}"));
            return Ok(());
        }
    };
    let allowed: Vec<&str> = if efi {
        vec![
            "file",
            "efitype",
            "pre-enrolled-keys",
            "ms-cert",
            "format",
            "size",
            "import-from",
        ]
    } else {
        params::DRIVE_OPTS.to_vec()
    };
    if !params::check_keys(e, key, &opts, &allowed) {
        return Ok(());
    }
    let file = file.unwrap_or_default();
    if efi {
        if let Some(t) = opts.get("efitype") {
            params::check_enum(e, key, t, &["2m", "4m"]);
        }
        if let Some(b) = opts.get("pre-enrolled-keys") {
            params::check_boolean(e, key, b);
        }
    }
    if file == "none" {
        return Ok(());
    }
    let Some((sid, rest)) = file.split_once(':') else {
        e.insert(
            key.into(),
            format!("invalid format - unable to parse volume '{file}'"),
        );
        return Ok(());
    };
    let Some(s) = storage(sid) else {
        return Err(err500(format!("storage '{sid}' does not exist")));
    };
    if rest == "cloudinit" {
        if !s.content.contains(&"images") {
            return Err(err500(format!(
                "storage '{sid}' does not support content-type 'images'"
            )));
        }
        return Ok(());
    }
    if let Some(src) = opts.get("import-from") {
        if rest != "0" {
            e.insert(
                key.into(),
                "import-from requires the special syntax STORAGE:0".into(),
            );
            return Ok(());
        }
        if src.starts_with('/') {
            return Err(ApiError::Status(
                403,
                format!(
                    "Permission check failed (only root may import from an absolute path '{src}')"
                ),
            ));
        }
        if !st.volumes.contains_key(src) {
            return Err(err500(format!("volume '{src}' does not exist")));
        }
    } else if rest.parse::<f64>().is_err() {
        // An existing volume used directly: import volumes cannot be.
        if rest.starts_with("import/") {
            e.insert(
                key.into(),
                format!("'{file}' is an import volume; use STORAGE:0,import-from={file}"),
            );
            return Ok(());
        }
        if !st.volumes.contains_key(&file) {
            return Err(err500(format!("volume '{file}' does not exist")));
        }
    }
    if !s.content.contains(&"images") {
        return Err(err500(format!(
            "storage '{sid}' does not support content-type 'images'"
        )));
    }
    Ok(())
}

fn check_create_params(st: &State, p: &BTreeMap<String, String>) -> Result<u32, ApiError> {
    let mut e = Errors::new();
    for k in p.keys() {
        let known = CREATE_KEYS.contains(&k.as_str())
            || is_indexed(k, "scsi", 30)
            || is_indexed(k, "ide", 3)
            || is_indexed(k, "sata", 5)
            || is_indexed(k, "virtio", 15)
            || is_indexed(k, "net", 31)
            || is_indexed(k, "serial", 3);
        if !known {
            e.insert(k.clone(), "property is not defined in schema and the schema does not allow additional properties".into());
        }
    }
    let vmid = match p.get("vmid") {
        None => {
            e.insert(
                "vmid".into(),
                "property is missing and it is not optional".into(),
            );
            None
        }
        Some(v) => params::check_integer(&mut e, "vmid", v, 100, 999_999_999),
    };
    if let Some(n) = p.get("name") {
        if !params::is_dns_name(n) {
            e.insert(
                "name".into(),
                "invalid format - value does not look like a valid DNS name".into(),
            );
        }
    }
    if let Some(t) = p.get("tags") {
        if let Some(bad) = params::split_tags(t)
            .into_iter()
            .find(|t| !params::is_tag(t))
        {
            e.insert(
                "tags".into(),
                format!("invalid format - invalid tag '{bad}'"),
            );
        }
    }
    if let Some(d) = p.get("description") {
        if d.chars().count() > 8192 {
            e.insert(
                "description".into(),
                "value may only be 8192 characters long".into(),
            );
        }
    }
    if let Some(v) = p.get("bios") {
        params::check_enum(&mut e, "bios", v, &["seabios", "ovmf"]);
    }
    if let Some(v) = p.get("scsihw") {
        params::check_enum(
            &mut e,
            "scsihw",
            v,
            &[
                "lsi",
                "lsi53c810",
                "virtio-scsi-pci",
                "virtio-scsi-single",
                "megasas",
                "pvscsi",
            ],
        );
    }
    if let Some(v) = p.get("ostype") {
        params::check_enum(
            &mut e,
            "ostype",
            v,
            &[
                "other", "wxp", "w2k", "w2k3", "w2k8", "wvista", "win7", "win8", "win10", "win11",
                "l24", "l26", "solaris",
            ],
        );
    }
    if let Some(v) = p.get("machine") {
        if !params::machine_ok(v) {
            e.insert(
                "machine".into(),
                format!(
                    "invalid format - value does not match the regex pattern ({})",
                    params::MACHINE_RE_HINT
                ),
            );
        }
    }
    for k in ["cores", "sockets"] {
        if let Some(v) = p.get(k) {
            params::check_integer(&mut e, k, v, 1, 4096);
        }
    }
    if let Some(v) = p.get("memory") {
        let v = v.strip_prefix("current=").unwrap_or(v);
        params::check_integer(&mut e, "memory", v, 16, 1 << 30);
    }
    if let Some(v) = p.get("agent") {
        match params::property_string(v, "enabled") {
            Ok((h, o)) => {
                if params::check_keys(
                    &mut e,
                    "agent",
                    &o,
                    &["enabled", "freeze-fs", "fstrim_cloned_disks", "type"],
                ) {
                    params::check_boolean(&mut e, "agent", h.as_deref().unwrap_or(""));
                }
            }
            Err(m) => {
                e.insert("agent".into(), format!("invalid format - {m}"));
            }
        }
    }
    for (k, v) in p {
        if is_indexed(k, "serial", 3) && !(v == "socket" || v.starts_with("/dev/")) {
            e.insert(
                k.clone(),
                "value does not match the regex pattern (/dev/.+|socket)".into(),
            );
        }
        if is_indexed(k, "net", 31) {
            match params::property_string(v, "model") {
                Ok((h, o)) => {
                    let model = h.unwrap_or_default();
                    let model = model.split('=').next().unwrap_or("");
                    if params::check_keys(
                        &mut e,
                        k,
                        &o,
                        &[
                            "bridge",
                            "firewall",
                            "link_down",
                            "macaddr",
                            "mtu",
                            "queues",
                            "rate",
                            "tag",
                            "trunks",
                            "model",
                        ],
                    ) {
                        params::check_enum(
                            &mut e,
                            k,
                            model,
                            &["e1000", "e1000e", "rtl8139", "virtio", "vmxnet3"],
                        );
                    }
                }
                Err(m) => {
                    e.insert(k.clone(), format!("invalid format - {m}"));
                }
            }
        }
        if k == "boot" && !(v.starts_with("order=") || v.chars().all(|c| "acdn".contains(c))) {
            e.insert(k.clone(), "invalid format - format error".into());
        }
    }
    // Disks last: they may fail with non-400 errors (storage, permissions).
    let mut hard = None;
    for (k, v) in p {
        let is_disk = is_indexed(k, "scsi", 30)
            || is_indexed(k, "ide", 3)
            || is_indexed(k, "sata", 5)
            || is_indexed(k, "virtio", 15)
            || k == "efidisk0";
        if is_disk {
            if let Err(x) = check_disk(st, &mut e, k, v, k == "efidisk0") {
                hard.get_or_insert(x);
            }
        }
    }
    if !e.is_empty() {
        return Err(ApiError::Params(e));
    }
    if let Some(x) = hard {
        return Err(x);
    }
    Ok(vmid.expect("checked") as u32)
}

fn create_vm(shared: &Arc<Shared>, p: &BTreeMap<String, String>, user: &str) -> ApiResult {
    check_node(p)?;
    let mut st = lock(shared);
    let vmid = check_create_params(&st, p)?;
    let (delay, fail, kind) = task_plan(shared, &mut st, FaultOp::Create);
    if kind == Some(FaultKind::Race) {
        st.add_vm(vmid, "someone-else", "", false);
    }
    if st.vms.contains_key(&vmid) {
        return Err(err500(format!("VM {vmid} already exists on node '{NODE}'")));
    }
    match kind {
        Some(FaultKind::Http500) => {
            return Err(err500("Internal Server Error (fault injected by pve-sim)"))
        }
        Some(FaultKind::Drop) => return Err(ApiError::Drop),
        _ => {}
    }
    let mut config = BTreeMap::new();
    for (k, v) in p {
        if k == "vmid" || k == "node" || k == "start" {
            continue;
        }
        let v = if k == "tags" {
            normalize_tags(v)
        } else {
            v.clone()
        };
        config.insert(k.clone(), v);
    }
    config.insert("lock".into(), "create".into());
    st.vms.insert(
        vmid,
        Vm {
            vmid,
            config,
            template: false,
            running: false,
        },
    );
    let lock_timeout_fault = kind == Some(FaultKind::LockTimeout);
    let upid = spawn_task(
        shared,
        &mut st,
        "qmcreate",
        &vmid.to_string(),
        user,
        delay,
        Box::new(move |st| {
            if fail || lock_timeout_fault {
                // PVE removes the config of a VM whose creation failed.
                st.vms.remove(&vmid);
                return Err(if lock_timeout_fault {
                    format!("unable to create VM {vmid} - can't lock file '/var/lock/qemu-server/lock-{vmid}.conf' - got timeout")
                } else {
                    format!(
                        "unable to create VM {vmid} - import failed (fault injected by pve-sim)"
                    )
                });
            }
            let Some(vm) = st.vms.get_mut(&vmid) else {
                return Err(format!("VM {vmid} vanished during creation"));
            };
            let mut new_vols = Vec::new();
            let mut n = 0;
            let keys: Vec<String> = vm.config.keys().cloned().collect();
            for k in keys {
                let v = vm.config[&k].clone();
                let is_disk = is_indexed(&k, "scsi", 30)
                    || is_indexed(&k, "ide", 3)
                    || is_indexed(&k, "sata", 5)
                    || is_indexed(&k, "virtio", 15)
                    || k == "efidisk0";
                if !is_disk {
                    continue;
                }
                let (file, opts) = params::property_string(&v, "file").unwrap_or_default();
                let file = file.unwrap_or_default();
                let Some((sid, rest)) = file.split_once(':') else {
                    continue;
                };
                let new = if rest == "cloudinit" {
                    format!("{sid}:vm-{vmid}-cloudinit,media=cdrom")
                } else {
                    n += 1;
                    let vol = format!("{sid}:vm-{vmid}-disk-{}", n - 1);
                    let mut extra: Vec<String> = opts
                        .iter()
                        .filter(|(k, _)| k.as_str() != "import-from")
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    extra.insert(0, vol.clone());
                    new_vols.push(vol);
                    extra.join(",")
                };
                vm.config.insert(k, new);
            }
            vm.config.remove("lock");
            for vol in new_vols {
                st.volumes.insert(
                    vol.clone(),
                    Volume {
                        volid: vol,
                        content: "images".into(),
                        format: "raw".into(),
                        size: 4 << 30,
                        ctime: now(),
                        path: None,
                    },
                );
            }
            Ok(())
        }),
    );
    Ok(json!(upid))
}

fn template(shared: &Arc<Shared>, p: &BTreeMap<String, String>, user: &str) -> ApiResult {
    check_node(p)?;
    let vmid = check_vmid(p, "vmid")?;
    let mut st = lock(shared);
    let vm = st.vms.get(&vmid).ok_or_else(|| vm_missing(vmid))?;
    if vm.template {
        return Err(err500("you can't convert a template to a template"));
    }
    if vm.running {
        return Err(err500(
            "you can't convert a VM to template if VM is running",
        ));
    }
    if let Some(l) = vm.config.get("lock") {
        return Err(err500(format!("VM is locked ({l})")));
    }
    let (delay, fail, kind) = task_plan(shared, &mut st, FaultOp::Template);
    refuse_injected(kind, vmid)?;
    let upid = spawn_task(
        shared,
        &mut st,
        "qmtemplate",
        &vmid.to_string(),
        user,
        delay,
        Box::new(move |st| {
            if fail {
                return Err(format!(
                    "converting VM {vmid} to a template failed (fault injected by pve-sim)"
                ));
            }
            let vm = st.vms.get_mut(&vmid).ok_or(format!("VM {vmid} vanished"))?;
            vm.template = true;
            let renamed: Vec<(String, String)> = vm
                .config
                .iter()
                .filter(|(_, v)| v.contains(&format!(":vm-{vmid}-disk-")))
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.replace(&format!(":vm-{vmid}-disk-"), &format!(":base-{vmid}-disk-")),
                    )
                })
                .collect();
            for (k, v) in renamed {
                vm.config.insert(k, v);
            }
            Ok(())
        }),
    );
    Ok(json!(upid))
}

fn clone_vm(shared: &Arc<Shared>, p: &BTreeMap<String, String>, user: &str) -> ApiResult {
    check_node(p)?;
    let vmid = check_vmid(p, "vmid")?;
    let newid = check_vmid(p, "newid")?;
    let mut e = Errors::new();
    for k in p.keys() {
        if ![
            "node",
            "vmid",
            "newid",
            "name",
            "full",
            "storage",
            "target",
            "pool",
            "description",
            "format",
            "snapname",
            "bwlimit",
        ]
        .contains(&k.as_str())
        {
            e.insert(k.clone(), "property is not defined in schema and the schema does not allow additional properties".into());
        }
    }
    if let Some(n) = p.get("name") {
        if !params::is_dns_name(n) {
            e.insert(
                "name".into(),
                "invalid format - value does not look like a valid DNS name".into(),
            );
        }
    }
    let full = match p.get("full") {
        Some(v) => params::check_boolean(&mut e, "full", v),
        None => None,
    };
    if !e.is_empty() {
        return Err(ApiError::Params(e));
    }
    let mut st = lock(shared);
    let src = st.vms.get(&vmid).ok_or_else(|| vm_missing(vmid))?.clone();
    if st.vms.contains_key(&newid) {
        return Err(err500(format!(
            "unable to create VM {newid}: config file already exists"
        )));
    }
    if let Some(l) = src.config.get("lock") {
        return Err(err500(format!("VM is locked ({l})")));
    }
    let full = full.unwrap_or(!src.template);
    if !full && !src.template {
        return Err(err500(
            "Linked clone feature is not supported for a VM that is not a template",
        ));
    }
    let (delay, fail, kind) = task_plan(shared, &mut st, FaultOp::Clone);
    if kind == Some(FaultKind::Http500) {
        return Err(err500("Internal Server Error (fault injected by pve-sim)"));
    }
    let mut config = src.config.clone();
    config.remove("template");
    if let Some(n) = p.get("name") {
        config.insert("name".into(), n.clone());
    }
    for v in config.values_mut() {
        if v.contains(&format!(":base-{vmid}-disk-")) || v.contains(&format!(":vm-{vmid}-disk-")) {
            let (vol, rest) = v
                .split_once(',')
                .map(|(a, b)| (a.to_string(), format!(",{b}")))
                .unwrap_or((v.clone(), String::new()));
            let disk_no = vol.rsplit('-').next().unwrap_or("0").to_string();
            let sid = vol.split(':').next().unwrap_or("local-lvm");
            *v = if full {
                format!("{sid}:vm-{newid}-disk-{disk_no}{rest}")
            } else {
                format!("{vol}/vm-{newid}-disk-{disk_no}{rest}")
            };
        }
    }
    config.insert("lock".into(), "clone".into());
    st.vms.insert(
        newid,
        Vm {
            vmid: newid,
            config,
            template: false,
            running: false,
        },
    );
    if !src.template {
        st.vms
            .get_mut(&vmid)
            .unwrap()
            .config
            .insert("lock".into(), "clone".into());
    }
    let upid = spawn_task(
        shared,
        &mut st,
        "qmclone",
        &vmid.to_string(),
        user,
        delay,
        Box::new(move |st| {
            if let Some(s) = st.vms.get_mut(&vmid) {
                if s.config.get("lock").map(|l| l == "clone").unwrap_or(false) {
                    s.config.remove("lock");
                }
            }
            if fail {
                st.vms.remove(&newid);
                return Err("clone failed (fault injected by pve-sim)".into());
            }
            if let Some(n) = st.vms.get_mut(&newid) {
                n.config.remove("lock");
            }
            Ok(())
        }),
    );
    Ok(json!(upid))
}

fn power(shared: &Arc<Shared>, p: &BTreeMap<String, String>, user: &str, on: bool) -> ApiResult {
    check_node(p)?;
    let vmid = check_vmid(p, "vmid")?;
    let mut st = lock(shared);
    let vm = st.vms.get(&vmid).ok_or_else(|| vm_missing(vmid))?;
    if on && vm.template {
        return Err(err500("you can't start a vm if it's a template"));
    }
    if let Some(l) = vm.config.get("lock") {
        return Err(err500(format!("VM is locked ({l})")));
    }
    let delay = shared.cfg.task_delay;
    let upid = spawn_task(
        shared,
        &mut st,
        if on { "qmstart" } else { "qmstop" },
        &vmid.to_string(),
        user,
        delay,
        Box::new(move |st| {
            let vm = st.vms.get_mut(&vmid).ok_or(format!("VM {vmid} vanished"))?;
            vm.running = on;
            Ok(())
        }),
    );
    Ok(json!(upid))
}

fn destroy(shared: &Arc<Shared>, p: &BTreeMap<String, String>, user: &str) -> ApiResult {
    check_node(p)?;
    let vmid = check_vmid(p, "vmid")?;
    let mut e = Errors::new();
    for k in ["purge", "destroy-unreferenced-disks", "skiplock"] {
        if let Some(v) = p.get(k) {
            params::check_boolean(&mut e, k, v);
        }
    }
    if !e.is_empty() {
        return Err(ApiError::Params(e));
    }
    let mut st = lock(shared);
    let vm = st.vms.get(&vmid).ok_or_else(|| vm_missing(vmid))?;
    if vm.running {
        return Err(err500(format!("VM {vmid} is running - destroy failed")));
    }
    let skiplock = p.get("skiplock").map(|v| v == "1").unwrap_or(false);
    if let (Some(l), false) = (vm.config.get("lock"), skiplock) {
        return Err(err500(format!("VM is locked ({l})")));
    }
    let (delay, fail, kind) = task_plan(shared, &mut st, FaultOp::Destroy);
    refuse_injected(kind, vmid)?;
    let upid = spawn_task(
        shared,
        &mut st,
        "qmdestroy",
        &vmid.to_string(),
        user,
        delay,
        Box::new(move |st| {
            if fail {
                return Err(format!(
                    "destroying VM {vmid} failed (fault injected by pve-sim)"
                ));
            }
            let base = format!(":base-{vmid}-disk-");
            let in_use = st.vms.values().any(|o| {
                o.vmid != vmid
                    && o.config
                        .values()
                        .any(|v| v.contains(&base) && v.contains('/'))
            });
            if in_use {
                return Err(format!(
                    "base volume 'local-lvm:base-{vmid}-disk-1' is still in use by linked cloned"
                ));
            }
            st.vms.remove(&vmid);
            let prefix_vm = format!(":vm-{vmid}-");
            st.volumes
                .retain(|k, _| !k.contains(&prefix_vm) && !k.contains(&base));
            Ok(())
        }),
    );
    Ok(json!(upid))
}

fn task_status(shared: &Shared, p: &BTreeMap<String, String>) -> ApiResult {
    check_node(p)?;
    let mut st = lock(shared);
    if st.take_fault(FaultOp::TaskStatus) == Some(FaultKind::Transient400) {
        return Err(param_err("upid", "no such task"));
    }
    let upid = p.get("upid").map(String::as_str).unwrap_or("");
    let t = st
        .tasks
        .get(upid)
        .ok_or_else(|| param_err("upid", "unable to parse worker upid or no such task"))?;
    let mut v = json!({
        "upid": t.upid, "node": NODE, "pid": t.pid, "pstart": t.pstart,
        "starttime": t.starttime, "type": t.kind, "id": t.id, "user": t.user,
        "status": if t.exitstatus.is_some() { "stopped" } else { "running" },
    });
    if let Some(x) = &t.exitstatus {
        v["exitstatus"] = json!(x);
    }
    Ok(v)
}

/// Hex sha256 of bytes (the simulator's config digests).
fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
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

/// Parse `--fault` specs for the binary.
pub fn parse_faults(specs: &[String]) -> Result<Vec<Fault>> {
    specs
        .iter()
        .map(|s| s.parse::<Fault>().map_err(anyhow::Error::msg))
        .collect()
}

/// Fail early on a token that cannot work.
pub fn check_token_shape(token: &str) -> Result<()> {
    if !token.contains('@') || !token.contains('!') || !token.contains('=') {
        bail!("--token must look like USER@REALM!TOKENID=SECRET");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_specs_parse() {
        let f: Fault = "upload:drop*2".parse().unwrap();
        assert_eq!(f.op, FaultOp::Upload);
        assert_eq!(f.kind, FaultKind::Drop);
        assert_eq!(f.remaining, 2);
        let f: Fault = "create:slow=1.5".parse().unwrap();
        assert_eq!(f.kind, FaultKind::SlowTask(1.5));
        assert!("nothing:500".parse::<Fault>().is_err());
    }

    #[test]
    fn routes_extract_path_parameters() {
        let (tpl, p) = route("GET", "/nodes/pve/tasks/UPID%3Apve%3A1/status").unwrap();
        assert_eq!(tpl, "/nodes/{node}/tasks/{upid}/status");
        assert_eq!(p["upid"], "UPID:pve:1");
        assert!(route("PUT", "/nodes/pve/qemu").is_none());
    }

    #[test]
    fn tags_are_stored_lowercased_and_sorted() {
        assert_eq!(normalize_tags("Kiln;b,a a"), "a;b;kiln");
    }
}
