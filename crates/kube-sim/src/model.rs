//! What the stand-in's API holds (nodes, pods, volumes) and how each object is rendered the way
//! the Kubernetes API serves it. Part of kube-sim, a labelled STAND-IN for K3s's API (not Kubernetes).

use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime};

use crate::etcd::Member;

// K3s's node role labels: control-plane and master on every server
// (k3s pkg/server/server.go setNodeLabelsAndAnnotations), etcd on servers
// running etcd (k3s pkg/etcd/metadata_controller.go handleSelf).
pub const CONTROL_PLANE_LABEL: &str = "node-role.kubernetes.io/control-plane";
pub const MASTER_LABEL: &str = "node-role.kubernetes.io/master";
pub const ETCD_LABEL: &str = "node-role.kubernetes.io/etcd";
// The etcd member name and address K3s records on its own Node
// (k3s pkg/etcd/etcd.go NodeNameAnnotation, NodeAddressAnnotation; set by
// metadata_controller.go handleSelf), and the member controller's removal
// annotations (k3s pkg/etcd/member_controller.go).
pub const NODE_NAME_ANNOTATION: &str = "etcd.k3s.cattle.io/node-name";
pub const NODE_ADDRESS_ANNOTATION: &str = "etcd.k3s.cattle.io/node-address";
pub const REMOVE_ANNOTATION: &str = "etcd.k3s.cattle.io/remove";
pub const REMOVED_NODE_NAME_ANNOTATION: &str = "etcd.k3s.cattle.io/removed-node-name";
/// K3s registers its member controller with wrangler's `OnRemove`, which
/// puts this finalizer on every Node (rancher/wrangler pkg/generic/remove.go:
/// "wrangler.cattle.io/" + handler name; handler "managed-etcd-controller").
pub const ETCD_FINALIZER: &str = "wrangler.cattle.io/managed-etcd-controller";
/// A mirror pod's annotation (k8s.io/api core/v1 MirrorPodAnnotationKey;
/// kubelet pkg/kubelet/pod/mirror_client.go sets it to the static pod's
/// hash); `kubectl drain` skips such pods (kubectl pkg/drain/filters.go
/// mirrorPodFilter).
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";
/// The local-path provisioner's node affinity key (rancher/local-path-provisioner
/// provisioner.go KeyNode); the kubelet's hostname label has the same key.
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

/// Who owns a pod, which is what `kubectl drain` looks at: DaemonSet-owned
/// pods are refused or skipped (`daemonSetFilter`), mirror pods skipped
/// (`mirrorPodFilter`), pods with no controller refused without --force
/// (`unreplicatedFilter`) — kubectl pkg/drain/filters.go. The eviction API
/// itself treats them all alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    DaemonSet(String),
    ReplicaSet(String),
    /// A static pod's mirror (annotation `kubernetes.io/config.mirror`).
    Mirror,
    None,
}

/// How the eviction subresource answers for a pod (scripted: the stand-in
/// has no PodDisruptionBudget objects).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evict {
    /// 201 Status Success, the pod is deleted.
    Allow,
    /// 429 TooManyRequests, "Cannot evict pod as it would violate the pod's
    /// disruption budget." — forever (`None`) or for the first N attempts.
    Pdb429 { times: Option<u32> },
    /// 500 InternalError.
    Error500,
}

/// How a joining server behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JoinScript {
    /// Its Node turns Ready this long after it registered.
    pub ready_after: Duration,
    /// K3s starts promoting the learner this long after the join (etcd
    /// refuses until it is in sync; the attempts repeat). None: never
    /// promoted, it stays a learner.
    pub promote_after: Option<Duration>,
    /// false: the Node never turns Ready.
    pub ready: bool,
}

/// How a joining agent behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentScript {
    pub ready_after: Duration,
    /// false: the Node never turns Ready.
    pub ready: bool,
}

/// One API request as the stand-in saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiRequest {
    pub method: String,
    /// Percent-decoded path, e.g. `/api/v1/nodes/server-1`.
    pub path: String,
    /// The raw query string.
    pub query: String,
    pub status: u16,
}

/// One eviction attempt and its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eviction {
    pub namespace: String,
    pub pod: String,
    pub status: u16,
}

/// A pod as a test reads it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub node: String,
}

/// The EtcdIsVoter condition K3s derives for a server's Node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EtcdCondition {
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
    pub since: String,
}

pub(crate) struct Node {
    pub name: String,
    pub uid: String,
    pub created: String,
    pub rv: u64,
    pub address: String,
    /// The etcd member name of a server (K3s: "<node>-<8 hex>").
    pub member: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub unschedulable: bool,
    pub registered: Instant,
    pub registered_wall: SystemTime,
    /// None: never Ready.
    pub ready_after: Option<Duration>,
    pub deletion: Option<String>,
    pub finalizers: Vec<String>,
    pub etcd: Option<EtcdCondition>,
}

pub(crate) struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub created: String,
    pub rv: u64,
    pub node: String,
    pub owner: Owner,
    pub owner_uid: String,
    pub evict: Evict,
    pub attempts: u32,
}

pub(crate) struct Pv {
    pub name: String,
    pub uid: String,
    pub claim_uid: String,
    pub created: String,
    pub rv: u64,
    pub storage_class: String,
    pub claim: (String, String),
    pub node: String,
}

#[derive(Default)]
pub(crate) struct State {
    pub nodes: BTreeMap<String, Node>,
    pub pods: BTreeMap<(String, String), Pod>,
    pub pvs: BTreeMap<String, Pv>,
    pub daemonsets: BTreeSet<(String, String)>,
    /// The cluster-wide resourceVersion counter.
    pub rv: u64,
    pub requests: Vec<ApiRequest>,
    pub evictions: Vec<Eviction>,
    /// What the simulated K3s controllers did or were refused.
    pub log: Vec<String>,
    /// Learners K3s will try to promote: (member name, not before).
    pub promotions: Vec<(String, Instant)>,
    /// batch/v1 Jobs, by (namespace, name): the object as created, when it
    /// was, and its scripted outcome.
    pub jobs: BTreeMap<(String, String), (Value, Instant, JobOutcome)>,
    /// Outcome of the next Jobs whose name starts with a prefix (default:
    /// succeed).
    pub job_scripts: Vec<(String, JobOutcome)>,
}

/// How a Job the stand-in "runs" ends (there is no kubelet: scripted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobOutcome {
    /// `Complete` after the delay.
    Succeed(std::time::Duration),
    /// `Failed` (BackoffLimitExceeded) after the delay.
    Fail(std::time::Duration),
}

impl State {
    pub fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }
}

/// RFC 3339 UTC to the second, as metav1.Time serializes.
pub(crate) fn timestamp(t: SystemTime) -> String {
    match jiff::Timestamp::try_from(t) {
        Ok(ts) => ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
        Err(_) => "1970-01-01T00:00:00Z".into(),
    }
}

pub(crate) fn now() -> String {
    timestamp(SystemTime::now())
}

fn string_map(m: &BTreeMap<String, String>) -> Value {
    Value::Object(
        m.iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect::<Map<_, _>>(),
    )
}

/// K3s's EtcdIsVoter rule (k3s pkg/etcd/etcd.go manageLearners and
/// setEtcdStatusCondition), for a node carrying the etcd role label:
/// the member whose name is the node's `etcd.k3s.cattle.io/node-name`
/// annotation decides; a learner is False/MemberIsLearner, a voter
/// True/MemberNotLearner, a member whose status check fails
/// False/Unhealthy with the error as message, no member False/NotAMember.
pub(crate) fn etcd_status(
    node: &Node,
    members: &[Member],
    unhealthy: &BTreeMap<String, String>,
) -> (&'static str, &'static str, String) {
    let name = node.annotations.get(NODE_NAME_ANNOTATION);
    let Some(m) = members
        .iter()
        .find(|m| !m.name.is_empty() && Some(&m.name) == name)
    else {
        return (
            "False",
            "NotAMember",
            "Node is not a member of the etcd cluster".into(),
        );
    };
    if let Some(err) = unhealthy.get(&m.name) {
        return ("False", "Unhealthy", err.clone());
    }
    if m.is_learner {
        (
            "False",
            "MemberIsLearner",
            "Node has not been promoted to voting member of the etcd cluster".into(),
        )
    } else {
        (
            "True",
            "MemberNotLearner",
            "Node is a voting member of the etcd cluster".into(),
        )
    }
}

impl Node {
    pub fn is_ready(&self) -> bool {
        self.ready_after
            .is_some_and(|d| self.registered.elapsed() >= d)
    }

    /// The Node as `GET /api/v1/nodes/{name}` returns it.
    pub fn to_json(&self) -> Value {
        let mut meta = json!({
            "name": self.name,
            "uid": self.uid,
            "resourceVersion": self.rv.to_string(),
            "creationTimestamp": self.created,
            "labels": string_map(&self.labels),
            "annotations": string_map(&self.annotations),
        });
        if !self.finalizers.is_empty() {
            meta["finalizers"] = json!(self.finalizers);
        }
        if let Some(d) = &self.deletion {
            meta["deletionTimestamp"] = json!(d);
            meta["deletionGracePeriodSeconds"] = json!(0);
        }
        let mut spec = json!({ "providerID": format!("k3s://{}", self.name) });
        if self.unschedulable {
            spec["unschedulable"] = json!(true);
        }
        // The kubelet's Ready condition (kubernetes pkg/kubelet/nodestatus/
        // setters.go ReadyCondition: KubeletReady "kubelet is posting ready
        // status", KubeletNotReady otherwise).
        let created = self.created.clone();
        let ready = if self.is_ready() {
            let since = timestamp(self.registered_wall + self.ready_after.unwrap_or_default());
            json!({
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "kubelet is posting ready status",
                "lastHeartbeatTime": now(), "lastTransitionTime": since,
            })
        } else {
            json!({
                "type": "Ready", "status": "False", "reason": "KubeletNotReady",
                "message": "container runtime network not ready: NetworkReady=false reason:NetworkPluginNotReady message:Network plugin returns error: cni plugin not initialized",
                "lastHeartbeatTime": now(), "lastTransitionTime": created,
            })
        };
        let mut conditions = vec![ready];
        if let Some(c) = &self.etcd {
            conditions.push(json!({
                "type": "EtcdIsVoter", "status": c.status, "reason": c.reason,
                "message": c.message, "lastHeartbeatTime": c.since,
                "lastTransitionTime": c.since,
            }));
        }
        json!({
            "kind": "Node",
            "apiVersion": "v1",
            "metadata": meta,
            "spec": spec,
            "status": {
                "conditions": conditions,
                "addresses": [
                    { "type": "InternalIP", "address": self.address },
                    { "type": "Hostname", "address": self.name },
                ],
                "nodeInfo": {
                    "architecture": "amd64",
                    "bootID": "",
                    "containerRuntimeVersion": "containerd://2.0.5-k3s1",
                    "kernelVersion": "6.1.0-kiln",
                    "kubeProxyVersion": "v1.33.4+k3s1",
                    "kubeletVersion": "v1.33.4+k3s1",
                    "machineID": "",
                    "operatingSystem": "linux",
                    "osImage": "kube-sim stand-in",
                    "systemUUID": "",
                },
            },
        })
    }
}

impl Pod {
    pub fn to_json(&self) -> Value {
        let mut meta = json!({
            "name": self.name,
            "namespace": self.namespace,
            "uid": self.uid,
            "resourceVersion": self.rv.to_string(),
            "creationTimestamp": self.created,
        });
        let owner = |kind: &str, name: &str| {
            json!([{
                "apiVersion": "apps/v1", "kind": kind, "name": name,
                "uid": self.owner_uid, "controller": true, "blockOwnerDeletion": true,
            }])
        };
        match &self.owner {
            Owner::DaemonSet(n) => meta["ownerReferences"] = owner("DaemonSet", n),
            Owner::ReplicaSet(n) => meta["ownerReferences"] = owner("ReplicaSet", n),
            Owner::Mirror => {
                // kubelet mirror_client.go: the static pod's annotations plus
                // the mirror annotation holding its hash.
                let hash = &self.uid[..8];
                meta["annotations"] = json!({
                    MIRROR_ANNOTATION: hash,
                    "kubernetes.io/config.hash": hash,
                    "kubernetes.io/config.source": "file",
                });
            }
            Owner::None => {}
        }
        json!({
            "kind": "Pod",
            "apiVersion": "v1",
            "metadata": meta,
            "spec": {
                "nodeName": self.node,
                "containers": [{ "name": "main", "image": "registry.k8s.io/pause:3.10" }],
            },
            "status": {
                "phase": "Running",
                "conditions": [{ "type": "Ready", "status": "True" }],
            },
        })
    }
}

impl Pv {
    /// A PersistentVolume as rancher/local-path-provisioner provisions it
    /// (provisioner.go Provision: hostPath under the node's path, node
    /// affinity `kubernetes.io/hostname In [node]`), bound to its claim.
    pub fn to_json(&self) -> Value {
        json!({
            "kind": "PersistentVolume",
            "apiVersion": "v1",
            "metadata": {
                "name": self.name,
                "uid": self.uid,
                "resourceVersion": self.rv.to_string(),
                "creationTimestamp": self.created,
                "annotations": { "pv.kubernetes.io/provisioned-by": "rancher.io/local-path" },
                "finalizers": ["kubernetes.io/pv-protection"],
            },
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "capacity": { "storage": "1Gi" },
                "claimRef": {
                    "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                    "namespace": self.claim.0, "name": self.claim.1, "uid": self.claim_uid,
                },
                "hostPath": {
                    "path": format!("/var/lib/rancher/k3s/storage/{}", self.name),
                    "type": "DirectoryOrCreate",
                },
                "nodeAffinity": { "required": { "nodeSelectorTerms": [{
                    "matchExpressions": [{
                        "key": HOSTNAME_LABEL, "operator": "In", "values": [self.node],
                    }],
                }]}},
                "persistentVolumeReclaimPolicy": "Delete",
                "storageClassName": self.storage_class,
                "volumeMode": "Filesystem",
            },
            "status": { "phase": "Bound" },
        })
    }

    /// The bound claim; the scheduler's selected-node annotation is what
    /// local-path uses to pick the node.
    pub fn claim_json(&self) -> Value {
        json!({
            "kind": "PersistentVolumeClaim",
            "apiVersion": "v1",
            "metadata": {
                "name": self.claim.1,
                "namespace": self.claim.0,
                "uid": self.claim_uid,
                "resourceVersion": self.rv.to_string(),
                "creationTimestamp": self.created,
                "annotations": {
                    "pv.kubernetes.io/bind-completed": "yes",
                    "pv.kubernetes.io/bound-by-controller": "yes",
                    "volume.beta.kubernetes.io/storage-provisioner": "rancher.io/local-path",
                    "volume.kubernetes.io/storage-provisioner": "rancher.io/local-path",
                    "volume.kubernetes.io/selected-node": self.node,
                },
                "finalizers": ["kubernetes.io/pvc-protection"],
            },
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": { "requests": { "storage": "1Gi" } },
                "storageClassName": self.storage_class,
                "volumeMode": "Filesystem",
                "volumeName": self.name,
            },
            "status": {
                "phase": "Bound",
                "accessModes": ["ReadWriteOnce"],
                "capacity": { "storage": "1Gi" },
            },
        })
    }
}
