//! kube-sim: a labelled STAND-IN for the Kubernetes API of a K3s HA cluster, so kiln's
//! blue-green rollout can be tested without K3s. It is a simulator, not Kubernetes.
//!
//! Its etcd is REAL: each server node is backed by an `etcd` member process
//! (Debian's etcd-server 3.4) on loopback, so member removal, learners,
//! promotion refusals and quorum loss are etcd's own behaviour. Around it
//! the stand-in plays K3s's controllers: the member controller that removes
//! a server's etcd member when its Node is deleted (k3s
//! pkg/etcd/member_controller.go), learner promotion (k3s pkg/etcd/etcd.go
//! manageLearners) and the `EtcdIsVoter` node condition derived from the
//! live member list.
//!
//! The API is served over HTTPS with a self-signed CA and one Bearer token
//! (401 otherwise; K3s runs the apiserver with `anonymous-auth=false`,
//! k3s pkg/daemons/control/server.go), answering what kube-rs sends the way
//! the apiserver does (see `api` for the routes). Scripted parts: when a
//! joining node turns Ready, when K3s starts promoting its learner, and how
//! each pod's eviction is answered.
//!
//! Modules: `etcd` (the real cluster), `model` (objects and their JSON),
//! `api` (routes and handlers), `select`, `patch`, `tls`.

mod api;
mod etcd;
mod model;
mod patch;
mod select;
mod tls;

pub use etcd::Member;
pub use model::{
    AgentScript, ApiRequest, Evict, Eviction, JobOutcome, JoinScript, Owner, PodInfo,
    CONTROL_PLANE_LABEL, ETCD_FINALIZER, ETCD_LABEL, MASTER_LABEL, MIRROR_ANNOTATION,
    NODE_ADDRESS_ANNOTATION, NODE_NAME_ANNOTATION, REMOVED_NODE_NAME_ANNOTATION, REMOVE_ANNOTATION,
};

use anyhow::{bail, Context, Result};
use base64::Engine;
use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use model::{Node, Pod, Pv, State};

/// How to start the stand-in.
#[derive(Debug, Clone)]
pub struct Options {
    /// The initial servers, (node name, node InternalIP), each with an etcd
    /// member; together they form a new etcd cluster of voters.
    pub servers: Vec<(String, String)>,
    /// The one Bearer token accepted (default: a fresh random one).
    pub token: Option<String>,
    /// Where the API listens (port 0: a free port).
    pub listen: SocketAddr,
}

impl Options {
    pub fn new(servers: &[(&str, &str)]) -> Options {
        Options {
            servers: servers
                .iter()
                .map(|(n, a)| (n.to_string(), a.to_string()))
                .collect(),
            token: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        }
    }
}

pub(crate) struct Inner {
    pub token: String,
    pub tls: Arc<rustls::ServerConfig>,
    pub state: Mutex<State>,
    pub etcd: etcd::Cluster,
    pub stopped: AtomicBool,
}

impl Inner {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Record what a simulated controller did, once per distinct message
    /// per subject (retries repeat the same refusal).
    pub fn note(&self, subject: &str, msg: String) {
        let mut st = self.lock();
        let prefix = format!("{subject}: ");
        let last = st.log.iter().rev().find(|l| l.starts_with(&prefix));
        let line = format!("{prefix}{msg}");
        if last != Some(&line) {
            st.log.push(line);
        }
    }

    /// Re-derive every etcd node's EtcdIsVoter condition from the live
    /// member list, as K3s's manageLearners does (k3s pkg/etcd/etcd.go):
    /// only nodes labelled `node-role.kubernetes.io/etcd=true`; when the
    /// member list cannot be had the conditions stay as they were.
    pub fn refresh_etcd_conditions(&self) {
        if !self
            .lock()
            .nodes
            .values()
            .any(|n| n.labels.get(ETCD_LABEL).map(String::as_str) == Some("true"))
        {
            return;
        }
        let members = match self.etcd.members() {
            Ok(m) => m,
            Err(e) => {
                self.note(
                    "etcd-status",
                    format!("Failed to get etcd members for learner management: {e}"),
                );
                return;
            }
        };
        let mut unhealthy = BTreeMap::new();
        for m in &members {
            if let Some(url) = m.client_urls.first().filter(|_| !m.name.is_empty()) {
                if let Err(e) = etcd::Cluster::probe(url) {
                    unhealthy.insert(m.name.clone(), e);
                }
            }
        }
        let mut st = self.lock();
        let mut changed = Vec::new();
        for (name, n) in st.nodes.iter() {
            if n.labels.get(ETCD_LABEL).map(String::as_str) != Some("true") {
                continue;
            }
            let (status, reason, message) = model::etcd_status(n, &members, &unhealthy);
            let same = n
                .etcd
                .as_ref()
                .is_some_and(|c| c.status == status && c.reason == reason && c.message == message);
            if !same {
                changed.push((name.clone(), status, reason, message));
            }
        }
        for (name, status, reason, message) in changed {
            let rv = st.next_rv();
            if let Some(n) = st.nodes.get_mut(&name) {
                n.etcd = Some(model::EtcdCondition {
                    status,
                    reason,
                    message,
                    since: model::now(),
                });
                n.rv = rv;
            }
        }
    }

    /// K3s's RemovePeer (k3s pkg/etcd/etcd.go): remove the member with this
    /// name; none left to remove is success. (K3s also matches the peer URL's
    /// host to the node-address annotation; the stand-in's members listen on
    /// loopback ports, so the name alone decides.)
    fn remove_peer(&self, member: &str) -> std::result::Result<(), String> {
        self.etcd.remove(member).map(|_| ())
    }

    /// One pass of the simulated K3s controllers; errors are retried on the
    /// next pass, as wrangler requeues a failed handler.
    fn reconcile(&self) {
        // Learner promotion (k3s pkg/etcd/etcd.go trackLearnerProgress: try
        // MemberPromote each tick; etcd refuses until the learner is in sync).
        let due: Vec<String> = {
            let st = self.lock();
            st.promotions
                .iter()
                .filter(|(_, at)| Instant::now() >= *at)
                .map(|(m, _)| m.clone())
                .collect()
        };
        for m in due {
            match self.etcd.promote(&m) {
                Ok(()) => {
                    self.note(&m, "Promoted learner".into());
                    self.lock().promotions.retain(|(x, _)| *x != m);
                }
                Err(e) => self.note(&m, format!("Unable to promote learner: {e}")),
            }
        }
        // The member controller's OnRemove (k3s pkg/etcd/member_controller.go
        // onRemove): a deleted Node with the etcd role label has its member
        // removed (by the node-name annotation), then wrangler drops its
        // finalizer and the Node is gone; other Nodes just lose the finalizer.
        type Deleting = (String, Option<String>, bool, Option<String>);
        let deleting: Vec<Deleting> = {
            let st = self.lock();
            st.nodes
                .values()
                .filter(|n| {
                    n.deletion.is_some() && n.finalizers.iter().any(|f| f == ETCD_FINALIZER)
                })
                .map(|n| {
                    let already_removed = n
                        .annotations
                        .get(REMOVE_ANNOTATION)
                        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
                        && n.annotations
                            .get(REMOVED_NODE_NAME_ANNOTATION)
                            .is_some_and(|v| !v.is_empty());
                    let etcd = n.labels.contains_key(ETCD_LABEL) && !already_removed;
                    (
                        n.name.clone(),
                        n.annotations.get(NODE_NAME_ANNOTATION).cloned(),
                        etcd,
                        n.member.clone(),
                    )
                })
                .collect()
        };
        for (node, member, etcd, own_member) in deleting {
            if etcd {
                let Some(member) = member else {
                    self.note(
                        &node,
                        format!("node name annotation for node {node} not found"),
                    );
                    continue;
                };
                if let Err(e) = self.remove_peer(&member) {
                    self.note(&node, format!("Removing etcd member {member} failed: {e}"));
                    continue;
                }
                self.note(&node, format!("Removed etcd member {member} from cluster"));
            }
            let mut st = self.lock();
            st.nodes.remove(&node);
            st.promotions
                .retain(|(m, _)| Some(m) != own_member.as_ref());
            st.next_rv();
        }
        // The member controller's sync (k3s pkg/etcd/member_controller.go
        // sync): `etcd.k3s.cattle.io/remove: "true"` removes the member
        // without deleting the Node, then records removed-node-name and drops
        // the node-name and node-address annotations.
        let marked: Vec<(String, Option<String>)> = {
            let st = self.lock();
            st.nodes
                .values()
                .filter(|n| {
                    n.deletion.is_none()
                        && n.labels.contains_key(ETCD_LABEL)
                        && n.annotations
                            .get(REMOVE_ANNOTATION)
                            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
                        && !n.annotations.contains_key(REMOVED_NODE_NAME_ANNOTATION)
                })
                .map(|n| {
                    (
                        n.name.clone(),
                        n.annotations.get(NODE_NAME_ANNOTATION).cloned(),
                    )
                })
                .collect()
        };
        for (node, member) in marked {
            let Some(member) = member else {
                self.note(
                    &node,
                    format!("node name annotation for node {node} not found"),
                );
                continue;
            };
            if let Err(e) = self.remove_peer(&member) {
                self.note(&node, format!("Removing etcd member {member} failed: {e}"));
                continue;
            }
            self.note(
                &node,
                format!("Removed etcd member {member} via annotation"),
            );
            let mut st = self.lock();
            let rv = st.next_rv();
            if let Some(n) = st.nodes.get_mut(&node) {
                n.annotations
                    .insert(REMOVED_NODE_NAME_ANNOTATION.into(), member.clone());
                n.annotations.remove(NODE_NAME_ANNOTATION);
                n.annotations.remove(NODE_ADDRESS_ANNOTATION);
                n.rv = rv;
            }
        }
    }
}

/// A running stand-in; stops, and kills every etcd it started, when dropped.
pub struct KubeSim {
    inner: Arc<Inner>,
    addr: SocketAddr,
    ca_pem: String,
    threads: Vec<std::thread::JoinHandle<()>>,
    // Last: data dirs and certificates go after the processes.
    _dir: tempfile::TempDir,
}

impl KubeSim {
    /// Start with these servers, (node name, InternalIP), each backed by a
    /// member of a new, real etcd cluster.
    pub fn start(servers: &[(&str, &str)]) -> Result<KubeSim> {
        KubeSim::start_with(Options::new(servers))
    }

    pub fn start_with(opts: Options) -> Result<KubeSim> {
        let dir = tempfile::Builder::new()
            .prefix("kube-sim-")
            .tempdir()
            .context("cannot create a temp dir")?;
        let certs = tls::make(dir.path())?;
        let tls = pve_sim::load_tls(&certs.cert, &certs.key)?;
        let mut seen = std::collections::BTreeSet::new();
        for (n, _) in &opts.servers {
            check_name(n)?;
            if !seen.insert(n.clone()) {
                bail!("server {n} is listed twice");
            }
        }
        let members: Vec<String> = opts.servers.iter().map(|(n, _)| member_name(n)).collect();
        let etcd_dir = dir.path().join("etcd");
        std::fs::create_dir_all(&etcd_dir)?;
        let token = opts
            .token
            .clone()
            .unwrap_or_else(|| format!("kube-sim-{}", pve_sim::new_uuid()));
        if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            bail!("the Bearer token must be non-empty printable text without spaces");
        }
        let cluster = etcd::Cluster::start(
            &etcd_dir,
            &format!("kube-sim-{}", pve_sim::new_uuid()),
            &members,
        )?;
        let listener = TcpListener::bind(opts.listen)
            .with_context(|| format!("cannot listen on {}", opts.listen))?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            token,
            tls,
            state: Mutex::new(State::default()),
            etcd: cluster,
            stopped: AtomicBool::new(false),
        });
        {
            let mut st = inner.lock();
            for ((name, address), member) in opts.servers.iter().zip(members) {
                let node = new_node(&mut st, name, address, Some(member), Some(Duration::ZERO));
                st.nodes.insert(name.clone(), node);
            }
        }
        let mut threads = Vec::new();
        let acc = inner.clone();
        threads.push(std::thread::spawn(move || {
            for conn in listener.incoming() {
                if acc.stopped.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(tcp) = conn {
                    let i = acc.clone();
                    std::thread::spawn(move || api::serve(i, tcp));
                }
            }
        }));
        let ctl = inner.clone();
        threads.push(std::thread::spawn(move || {
            while !ctl.stopped.load(Ordering::SeqCst) {
                ctl.reconcile();
                std::thread::sleep(Duration::from_millis(100));
            }
        }));
        Ok(KubeSim {
            inner,
            addr,
            ca_pem: certs.ca_pem,
            threads,
            _dir: dir,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn token(&self) -> &str {
        &self.inner.token
    }

    /// The CA (PEM) that signed the serving certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A kubeconfig (YAML) for this stand-in: server URL, CA data, token;
    /// cluster, user and context are all "default", as in K3s's k3s.yaml.
    pub fn kubeconfig(&self) -> String {
        let ca = base64::engine::general_purpose::STANDARD.encode(self.ca_pem.as_bytes());
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: default\n  cluster:\n    server: {}\n    certificate-authority-data: {ca}\nusers:\n- name: default\n  user:\n    token: {}\ncontexts:\n- name: default\n  context:\n    cluster: default\n    user: default\ncurrent-context: default\npreferences: {{}}\n",
            self.url(),
            self.inner.token
        )
    }

    /// A server joins as K3s's does (k3s pkg/etcd/etcd.go join): `member add
    /// --learner` (retried while etcd answers "too many learner members" or
    /// "unhealthy cluster", as K3s retries), its etcd started for real with
    /// state "existing", then its Node registers. Returns once the learner
    /// runs; promotion and readiness follow the script.
    pub fn join_server(&self, name: &str, address: &str, script: JoinScript) -> Result<()> {
        check_name(name)?;
        if self.inner.lock().nodes.contains_key(name) {
            bail!("node {name} already exists");
        }
        let member = member_name(name);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.inner.etcd.add_learner(&member) {
                Ok(()) => break,
                Err(e)
                    if (e.contains("too many learner members")
                        || e.contains("unhealthy cluster"))
                        && Instant::now() < deadline =>
                {
                    self.inner.note(
                        &member,
                        format!("Waiting for other members to finish joining etcd cluster: {e}"),
                    );
                    std::thread::sleep(Duration::from_millis(250));
                }
                Err(e) => bail!("etcd refused to add {member} as a learner: {e}"),
            }
        }
        self.inner
            .note(&member, "Added as a learner and started".into());
        let mut st = self.inner.lock();
        let node = new_node(
            &mut st,
            name,
            address,
            Some(member.clone()),
            script.ready.then_some(script.ready_after),
        );
        st.nodes.insert(name.to_string(), node);
        if let Some(d) = script.promote_after {
            st.promotions.push((member, Instant::now() + d));
        }
        Ok(())
    }

    /// An agent (no etcd) registers its Node; Ready per the script.
    pub fn join_agent(&self, name: &str, address: &str, script: AgentScript) -> Result<()> {
        check_name(name)?;
        let mut st = self.inner.lock();
        if st.nodes.contains_key(name) {
            bail!("node {name} already exists");
        }
        let node = new_node(
            &mut st,
            name,
            address,
            None,
            script.ready.then_some(script.ready_after),
        );
        st.nodes.insert(name.to_string(), node);
        Ok(())
    }

    /// A Running pod on `node`, its owner and how its eviction is answered.
    pub fn add_pod(
        &self,
        namespace: &str,
        name: &str,
        node: &str,
        owner: Owner,
        eviction: Evict,
    ) -> Result<()> {
        check_name(namespace)?;
        check_name(name)?;
        let mut st = self.inner.lock();
        if !st.nodes.contains_key(node) {
            bail!("no node {node} for pod {namespace}/{name}");
        }
        let key = (namespace.to_string(), name.to_string());
        if st.pods.contains_key(&key) {
            bail!("pod {namespace}/{name} already exists");
        }
        if let Owner::DaemonSet(ds) = &owner {
            st.daemonsets.insert((namespace.to_string(), ds.clone()));
        }
        let rv = st.next_rv();
        st.pods.insert(
            key,
            Pod {
                namespace: namespace.into(),
                name: name.into(),
                uid: pve_sim::new_uuid(),
                created: model::now(),
                rv,
                node: node.into(),
                owner,
                owner_uid: pve_sim::new_uuid(),
                evict: eviction,
                attempts: 0,
            },
        );
        Ok(())
    }

    /// A local-path PersistentVolume on `node`, bound to `claim`
    /// (namespace, name), which is created with it.
    pub fn add_local_pv(
        &self,
        name: &str,
        storage_class: &str,
        claim: (&str, &str),
        node: &str,
    ) -> Result<()> {
        check_name(name)?;
        check_name(claim.0)?;
        check_name(claim.1)?;
        let mut st = self.inner.lock();
        if st.pvs.contains_key(name) {
            bail!("persistent volume {name} already exists");
        }
        let rv = st.next_rv();
        st.pvs.insert(
            name.to_string(),
            Pv {
                name: name.into(),
                uid: pve_sim::new_uuid(),
                claim_uid: pve_sim::new_uuid(),
                created: model::now(),
                rv,
                storage_class: storage_class.into(),
                claim: (claim.0.into(), claim.1.into()),
                node: node.into(),
            },
        );
        Ok(())
    }

    /// How Jobs whose name starts with `prefix` end (default: they succeed
    /// after 200 ms).
    pub fn script_jobs(&self, prefix: &str, outcome: JobOutcome) {
        self.inner
            .lock()
            .job_scripts
            .push((prefix.to_string(), outcome));
    }

    /// The Jobs that exist now, as (namespace, name).
    pub fn jobs(&self) -> Vec<(String, String)> {
        self.inner.lock().jobs.keys().cloned().collect()
    }

    /// SIGKILL the etcd member of a server node: a real member failure.
    pub fn kill_member(&self, node: &str) -> Result<()> {
        let member = self
            .member_of(node)
            .with_context(|| format!("node {node} has no etcd member"))?;
        self.inner.etcd.kill(&member)
    }

    /// The etcd member name of a server node.
    pub fn member_of(&self, node: &str) -> Option<String> {
        self.inner
            .lock()
            .nodes
            .get(node)
            .and_then(|n| n.member.clone())
    }

    /// The members as etcd lists them.
    pub fn members(&self) -> Result<Vec<Member>> {
        self.inner
            .etcd
            .members()
            .map_err(|e| anyhow::anyhow!("etcd member list failed: {e}"))
    }

    /// The apiserver's etcd check (what `/readyz/etcd` answers).
    pub fn etcd_health(&self) -> std::result::Result<(), String> {
        self.inner.etcd.health()
    }

    /// Process ids of the etcd members still running.
    pub fn etcd_pids(&self) -> Vec<u32> {
        self.inner.etcd.pids()
    }

    pub fn node_names(&self) -> Vec<String> {
        self.inner.lock().nodes.keys().cloned().collect()
    }

    /// A Node exactly as `GET /api/v1/nodes/{name}` would return it now.
    pub fn node(&self, name: &str) -> Option<serde_json::Value> {
        self.inner.refresh_etcd_conditions();
        self.inner.lock().nodes.get(name).map(Node::to_json)
    }

    pub fn pods(&self) -> Vec<PodInfo> {
        self.inner
            .lock()
            .pods
            .values()
            .map(|p| PodInfo {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                node: p.node.clone(),
            })
            .collect()
    }

    pub fn evictions(&self) -> Vec<Eviction> {
        self.inner.lock().evictions.clone()
    }

    /// Every API request in arrival order, with the status answered.
    pub fn requests(&self) -> Vec<ApiRequest> {
        self.inner.lock().requests.clone()
    }

    /// What the simulated K3s controllers did or were refused by etcd.
    pub fn log(&self) -> Vec<String> {
        self.inner.lock().log.clone()
    }

    pub fn stop(&self) {
        if !self.inner.stopped.swap(true, Ordering::SeqCst) {
            let _ = TcpStream::connect(self.addr);
        }
    }
}

impl Drop for KubeSim {
    fn drop(&mut self) {
        self.stop();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Connection threads may still hold the shared state: kill the
        // members now rather than when the last of them lets go.
        self.inner.etcd.shutdown();
    }
}

/// Poll `f` every 50ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An RFC 1123 name, as Kubernetes requires of node, pod and namespace names.
fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !ok {
        bail!("{name:?} is not a valid Kubernetes name (lowercase letters, digits, '-', '.')");
    }
    Ok(())
}

/// K3s names a server's etcd member "<node name>-<first 8 of a uuid>"
/// (k3s pkg/etcd/etcd.go setName).
fn member_name(node: &str) -> String {
    format!("{node}-{}", &pve_sim::new_uuid()[..8])
}

fn new_node(
    st: &mut State,
    name: &str,
    address: &str,
    member: Option<String>,
    ready_after: Option<Duration>,
) -> Node {
    let mut labels = BTreeMap::from([
        ("beta.kubernetes.io/arch".to_string(), "amd64".to_string()),
        ("beta.kubernetes.io/os".into(), "linux".into()),
        ("kubernetes.io/arch".into(), "amd64".into()),
        ("kubernetes.io/os".into(), "linux".into()),
        (model::HOSTNAME_LABEL.into(), name.into()),
        ("node.kubernetes.io/instance-type".into(), "k3s".into()),
    ]);
    let mut annotations = BTreeMap::new();
    if let Some(m) = &member {
        for l in [CONTROL_PLANE_LABEL, MASTER_LABEL, ETCD_LABEL] {
            labels.insert(l.to_string(), "true".to_string());
        }
        annotations.insert(NODE_NAME_ANNOTATION.to_string(), m.clone());
        annotations.insert(NODE_ADDRESS_ANNOTATION.to_string(), address.to_string());
    }
    let rv = st.next_rv();
    let wall = SystemTime::now();
    Node {
        name: name.into(),
        uid: pve_sim::new_uuid(),
        created: model::timestamp(wall),
        rv,
        address: address.into(),
        member,
        labels,
        annotations,
        unschedulable: false,
        registered: Instant::now(),
        registered_wall: wall,
        ready_after,
        deletion: None,
        finalizers: vec![ETCD_FINALIZER.to_string()],
        etcd: None,
    }
}
