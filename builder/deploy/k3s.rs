//! A K3s cluster as the rollout sees it, through the Kubernetes API (kube +
//! k8s-openapi): nodes with Ready and `EtcdIsVoter`, etcd readiness, cordon, eviction, Node deletion, local PVs.
//!
//! Blocking calls over a private single-threaded runtime, like the rest of
//! kiln. Facts this relies on, from their sources:
//! - K3s sets the Node condition `EtcdIsVoter` on servers: `True` once the
//!   node's etcd member is a voter, `False` while it is a learner
//!   (k3s-io/k3s pkg/etcd/etcd.go, `setLearnerProgress`/`EtcdIsVoter`);
//! - deleting a server's Node makes K3s remove its etcd member
//!   (pkg/etcd/member_controller.go, `onRemove`);
//! - an eviction blocked by a PodDisruptionBudget answers 429
//!   (kubernetes pkg/registry/core/pod/storage/eviction.go); drain skips
//!   DaemonSet pods and mirror pods (`kubernetes.io/config.mirror`), as
//!   kubectl does (staging/src/k8s.io/kubectl/pkg/drain/filters.go);
//! - `/readyz/etcd` is the API server's etcd health check.

use anyhow::{anyhow, Context, Result};
use k8s_openapi::api::core::v1::{Node, PersistentVolume, Pod};
use kube::api::{Api, DeleteParams, EvictParams, ListParams};
use std::path::Path;

/// The condition K3s sets on server nodes (pkg/etcd/etcd.go).
pub(crate) const ETCD_IS_VOTER: &str = "EtcdIsVoter";
/// The label K3s puts on servers.
const CONTROL_PLANE: &str = "node-role.kubernetes.io/control-plane";

/// One Node as the rollout needs it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct NodeState {
    pub name: String,
    pub ready: bool,
    pub control_plane: bool,
    /// `EtcdIsVoter`: Some(true) a voter, Some(false) a learner, None not a member.
    pub voter: Option<bool>,
    pub unschedulable: bool,
}

/// A pod on a node, and whether drain leaves it alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PodRef {
    pub namespace: String,
    pub name: String,
    /// DaemonSet-owned or a mirror (static) pod: drain skips it.
    pub skipped: bool,
}

/// What an eviction request answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Eviction {
    /// Accepted (or the pod is gone already).
    Done,
    /// 429: a PodDisruptionBudget does not allow it now.
    Blocked(String),
    /// Any other failure.
    Failed(String),
}

/// A PersistentVolume bound to one node by node affinity (local-path).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct LocalVolume {
    pub pv: String,
    pub storage_class: String,
    /// `namespace/name` of its claim.
    pub claim: String,
}

/// A connection to the cluster's API.
pub(crate) struct Cluster {
    rt: tokio::runtime::Runtime,
    client: kube::Client,
}

impl Cluster {
    /// Connect with a kubeconfig file (its current context).
    pub(crate) fn connect(kubeconfig: &Path) -> Result<Cluster> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the Kubernetes client runtime")?;
        let kc = kube::config::Kubeconfig::read_from(kubeconfig)
            .with_context(|| format!("cannot read kubeconfig {}", kubeconfig.display()))?;
        let client = rt.block_on(async {
            let mut cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("kubeconfig {}", kubeconfig.display()))?;
            // kube retries 429 by itself for minutes (client/retry.rs); the
            // drain must see a PodDisruptionBudget's 429 to keep its own
            // timeout and report it.
            cfg.default_retry = false;
            kube::Client::try_from(cfg).context("cannot build the Kubernetes client")
        })?;
        Ok(Cluster { rt, client })
    }

    fn nodes_api(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    /// Every Node, sorted by name.
    pub(crate) fn nodes(&self) -> Result<Vec<NodeState>> {
        let list = self
            .rt
            .block_on(self.nodes_api().list(&ListParams::default()))
            .map_err(|e| api_error(e, "listing nodes"))?;
        let mut out: Vec<NodeState> = list.items.iter().map(node_state).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// One Node, or None when it does not exist.
    pub(crate) fn node(&self, name: &str) -> Result<Option<NodeState>> {
        let n = self
            .rt
            .block_on(self.nodes_api().get_opt(name))
            .map_err(|e| api_error(e, &format!("reading node {name}")))?;
        Ok(n.as_ref().map(node_state))
    }

    /// Whether the API server reports its etcd healthy (`/readyz/etcd`).
    pub(crate) fn etcd_ready(&self) -> Result<bool> {
        let req = http::Request::get("/readyz/etcd")
            .body(Vec::new())
            .expect("a valid request");
        match self.rt.block_on(self.client.request_text(req)) {
            Ok(text) => Ok(text.trim() == "ok"),
            Err(kube::Error::Api(s)) if s.code >= 500 => Ok(false),
            Err(e) => Err(api_error(e, "asking /readyz/etcd")),
        }
    }

    /// Mark a node unschedulable.
    pub(crate) fn cordon(&self, name: &str) -> Result<()> {
        self.rt
            .block_on(self.nodes_api().cordon(name))
            .map_err(|e| api_error(e, &format!("cordoning {name}")))?;
        Ok(())
    }

    /// The pods scheduled on a node.
    pub(crate) fn pods_on(&self, node: &str) -> Result<Vec<PodRef>> {
        let api: Api<Pod> = Api::all(self.client.clone());
        let lp = ListParams::default().fields(&format!("spec.nodeName={node}"));
        let list = self
            .rt
            .block_on(api.list(&lp))
            .map_err(|e| api_error(e, &format!("listing pods on {node}")))?;
        Ok(list.items.iter().map(pod_ref).collect())
    }

    /// Ask the Eviction API to evict a pod (PodDisruptionBudgets apply; never forced).
    pub(crate) fn evict(&self, pod: &PodRef) -> Eviction {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        match self
            .rt
            .block_on(api.evict(&pod.name, &EvictParams::default()))
        {
            Ok(_) => Eviction::Done,
            Err(kube::Error::Api(s)) if s.code == 404 => Eviction::Done,
            Err(kube::Error::Api(s)) if s.code == 429 => Eviction::Blocked(s.message.clone()),
            Err(e) => Eviction::Failed(format!("{e}")),
        }
    }

    /// Delete a Node (for a server, K3s then removes its etcd member).
    /// Already gone is fine.
    pub(crate) fn delete_node(&self, name: &str) -> Result<()> {
        match self
            .rt
            .block_on(self.nodes_api().delete(name, &DeleteParams::default()))
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(api_error(e, &format!("deleting node {name}"))),
        }
    }

    /// PersistentVolumes bound to `node` by node affinity (`kubernetes.io/hostname`).
    pub(crate) fn local_volumes_on(&self, node: &str) -> Result<Vec<LocalVolume>> {
        let api: Api<PersistentVolume> = Api::all(self.client.clone());
        let list = self
            .rt
            .block_on(api.list(&ListParams::default()))
            .map_err(|e| api_error(e, "listing persistent volumes"))?;
        Ok(list
            .items
            .iter()
            .filter(|pv| pinned_to(pv) == Some(node))
            .map(|pv| {
                let spec = pv.spec.as_ref();
                let claim = spec
                    .and_then(|s| s.claim_ref.as_ref())
                    .map(|c| {
                        format!(
                            "{}/{}",
                            c.namespace.clone().unwrap_or_default(),
                            c.name.clone().unwrap_or_default()
                        )
                    })
                    .unwrap_or_else(|| "(unbound)".into());
                LocalVolume {
                    pv: pv.metadata.name.clone().unwrap_or_default(),
                    storage_class: spec
                        .and_then(|s| s.storage_class_name.clone())
                        .unwrap_or_default(),
                    claim,
                }
            })
            .collect())
    }
}

impl Cluster {
    /// Run a Job to its end (a user gate): delete a leftover of the same
    /// name, create it, wait until the Job controller marks it `Complete`
    /// or `Failed` (kubernetes pkg/controller/job/job_controller.go), then
    /// delete it with its pods.
    pub(crate) fn run_job(
        &self,
        job: &k8s_openapi::api::batch::v1::Job,
        timeout: std::time::Duration,
        poll: std::time::Duration,
    ) -> Result<()> {
        use k8s_openapi::api::batch::v1::Job;
        use kube::api::{PostParams, PropagationPolicy};
        let ns = job
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = job
            .metadata
            .name
            .clone()
            .context("the Job has no metadata.name")?;
        let api: Api<Job> = Api::namespaced(self.client.clone(), &ns);
        let gone = DeleteParams {
            propagation_policy: Some(PropagationPolicy::Background),
            ..DeleteParams::default()
        };
        let delete = |what: &str| match self.rt.block_on(api.delete(&name, &gone)) {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(api_error(e, &format!("{what} Job {ns}/{name}"))),
        };
        delete("removing the leftover")?;
        self.rt
            .block_on(api.create(&PostParams::default(), job))
            .map_err(|e| api_error(e, &format!("creating Job {ns}/{name}")))?;
        let start = std::time::Instant::now();
        let outcome = loop {
            crate::util::check_interrupted()?;
            let j = self
                .rt
                .block_on(api.get(&name))
                .map_err(|e| api_error(e, &format!("reading Job {ns}/{name}")))?;
            let conds = j
                .status
                .as_ref()
                .and_then(|s| s.conditions.clone())
                .unwrap_or_default();
            if conds
                .iter()
                .any(|c| c.type_ == "Complete" && c.status == "True")
            {
                break Ok(());
            }
            if let Some(c) = conds
                .iter()
                .find(|c| c.type_ == "Failed" && c.status == "True")
            {
                break Err(anyhow!(
                    "Job {ns}/{name} failed: {} ({})",
                    c.message.clone().unwrap_or_default(),
                    c.reason.clone().unwrap_or_default()
                ));
            }
            if start.elapsed() > timeout {
                break Err(anyhow!(
                    "Job {ns}/{name} did not finish within {} s",
                    timeout.as_secs()
                ));
            }
            std::thread::sleep(poll);
        };
        delete("deleting")?;
        outcome
    }

    /// Let a local volume's workload start afresh elsewhere: delete its claim
    /// (and the volume, whose node is gone). Already gone is fine.
    pub(crate) fn delete_claim(&self, v: &LocalVolume) -> Result<()> {
        use k8s_openapi::api::core::v1::PersistentVolumeClaim;
        if let Some((ns, name)) = v.claim.split_once('/') {
            let api: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), ns);
            match self.rt.block_on(api.delete(name, &DeleteParams::default())) {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(api_error(e, &format!("deleting claim {}", v.claim))),
            }
        }
        let api: Api<PersistentVolume> = Api::all(self.client.clone());
        match self
            .rt
            .block_on(api.delete(&v.pv, &DeleteParams::default()))
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(api_error(e, &format!("deleting volume {}", v.pv))),
        }
    }
}

fn node_state(n: &Node) -> NodeState {
    let conds = n
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .cloned()
        .unwrap_or_default();
    let cond = |t: &str| {
        conds
            .iter()
            .find(|c| c.type_ == t)
            .map(|c| c.status == "True")
    };
    let labels = n.metadata.labels.clone().unwrap_or_default();
    NodeState {
        name: n.metadata.name.clone().unwrap_or_default(),
        ready: cond("Ready").unwrap_or(false),
        control_plane: labels.get(CONTROL_PLANE).is_some_and(|v| v == "true"),
        voter: cond(ETCD_IS_VOTER),
        unschedulable: n
            .spec
            .as_ref()
            .and_then(|s| s.unschedulable)
            .unwrap_or(false),
    }
}

fn pod_ref(p: &Pod) -> PodRef {
    let daemonset = p
        .metadata
        .owner_references
        .as_ref()
        .is_some_and(|o| o.iter().any(|r| r.kind == "DaemonSet"));
    let mirror = p
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key("kubernetes.io/config.mirror"));
    PodRef {
        namespace: p.metadata.namespace.clone().unwrap_or_default(),
        name: p.metadata.name.clone().unwrap_or_default(),
        skipped: daemonset || mirror,
    }
}

/// The node a PV's required node affinity pins it to
/// (rancher/local-path-provisioner provisioner.go: `kubernetes.io/hostname In [node]`).
fn pinned_to(pv: &PersistentVolume) -> Option<&str> {
    let terms = &pv
        .spec
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required
        .as_ref()?
        .node_selector_terms;
    terms.iter().find_map(|t| {
        t.match_expressions.as_ref()?.iter().find_map(|e| {
            (e.key == "kubernetes.io/hostname" && e.operator == "In")
                .then(|| e.values.as_ref()?.first().map(String::as_str))
                .flatten()
        })
    })
}

fn api_error(e: kube::Error, what: &str) -> anyhow::Error {
    match e {
        kube::Error::Api(s) => anyhow!("Kubernetes API, {what}: {} ({})", s.message, s.code),
        other => anyhow!("Kubernetes API, {what}: {other}"),
    }
}
