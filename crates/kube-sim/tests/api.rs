//! kube-sim's API (a labelled stand-in for K3s's Kubernetes API, not
//! Kubernetes): auth, lists and selectors, patches, evictions, volumes —
//! answered as the kube-apiserver answers.

mod common;
use common::*;
use kube_sim::{AgentScript, Evict, KubeSim, Owner};
use serde_json::json;
use std::time::Duration;

fn one_server() -> KubeSim {
    KubeSim::start(&[("server-1", "10.0.0.11")]).unwrap()
}

fn agent(sim: &KubeSim, name: &str, ip: &str) {
    sim.join_agent(
        name,
        ip,
        AgentScript {
            ready_after: Duration::ZERO,
            ready: true,
        },
    )
    .unwrap();
}

#[test]
fn requests_without_the_bearer_token_get_401() {
    let sim = one_server();
    let http = Http::new(&sim);
    for path in ["/api/v1/nodes", "/readyz", "/api/v1/nodes/server-1"] {
        let a = http.send("GET", path, None, None, false);
        assert_eq!(a.status, 401, "{path}");
        let v = a.json();
        assert_eq!(v["kind"], "Status");
        assert_eq!(v["reason"], "Unauthorized");
        assert_eq!(v["message"], "Unauthorized");
        assert_eq!(v["code"], 401);
    }
    // A wrong token is no better.
    let client = reqwest::blocking::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(sim.ca_pem().as_bytes()).unwrap())
        .build()
        .unwrap();
    let res = client
        .get(format!("{}/api/v1/nodes", sim.url()))
        .bearer_auth("not-the-token")
        .send()
        .unwrap();
    assert_eq!(res.status().as_u16(), 401);
    assert_eq!(http.get("/api/v1/nodes").status, 200);
}

#[test]
fn node_list_selects_control_plane_nodes_by_label() {
    let sim = one_server();
    agent(&sim, "agent-1", "10.0.0.21");
    let http = Http::new(&sim);
    let all = http.get("/api/v1/nodes").json();
    assert_eq!(all["kind"], "NodeList");
    assert_eq!(all["apiVersion"], "v1");
    assert!(all["metadata"]["resourceVersion"].is_string());
    assert_eq!(all["items"].as_array().unwrap().len(), 2);
    let cp = http
        .get("/api/v1/nodes?labelSelector=node-role.kubernetes.io%2Fcontrol-plane%3Dtrue")
        .json();
    let items = cp["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    let n = &items[0];
    assert_eq!(n["metadata"]["name"], "server-1");
    // K3s's server labels and etcd annotations.
    for l in [
        "node-role.kubernetes.io/control-plane",
        "node-role.kubernetes.io/etcd",
        "node-role.kubernetes.io/master",
    ] {
        assert_eq!(n["metadata"]["labels"][l], "true", "{l}");
    }
    assert_eq!(
        n["metadata"]["annotations"]["etcd.k3s.cattle.io/node-name"],
        sim.member_of("server-1").unwrap()
    );
    assert_eq!(
        n["status"]["addresses"][0],
        json!({"type": "InternalIP", "address": "10.0.0.11"})
    );
    assert_eq!(condition(n, "Ready").unwrap()["status"], "True");
    assert_eq!(condition(n, "EtcdIsVoter").unwrap()["status"], "True");
    // The agent has neither the labels nor the condition.
    let a = http.get("/api/v1/nodes/agent-1").json();
    assert!(a["metadata"]["labels"]
        .get("node-role.kubernetes.io/control-plane")
        .is_none());
    assert!(condition(&a, "EtcdIsVoter").is_none());
    // An unparseable selector is a 400 Status.
    let bad = http.get("/api/v1/nodes?labelSelector=a%20b");
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["reason"], "BadRequest");
}

#[test]
fn merge_patch_cordon_sets_spec_unschedulable() {
    let sim = one_server();
    let http = Http::new(&sim);
    let a = http.send(
        "PATCH",
        "/api/v1/nodes/server-1",
        Some("application/merge-patch+json"),
        Some(r#"{"spec":{"unschedulable":true},"metadata":{"annotations":{"kiln.dev/rollout":"r1"}}}"#),
        true,
    );
    assert_eq!(a.status, 200, "{}", a.text);
    let v = a.json();
    assert_eq!(v["spec"]["unschedulable"], true);
    assert_eq!(v["metadata"]["annotations"]["kiln.dev/rollout"], "r1");
    let v = http.get("/api/v1/nodes/server-1").json();
    assert_eq!(v["spec"]["unschedulable"], true);
    // K3s's own annotations survive a merge patch.
    assert!(v["metadata"]["annotations"]["etcd.k3s.cattle.io/node-name"].is_string());
    // Uncordon with null deletes the field.
    let a = http.send(
        "PATCH",
        "/api/v1/nodes/server-1",
        Some("application/merge-patch+json"),
        Some(r#"{"spec":{"unschedulable":null}}"#),
        true,
    );
    assert!(a.json()["spec"].get("unschedulable").is_none());
}

#[test]
fn a_patch_to_a_field_the_stand_in_does_not_model_is_refused() {
    let sim = one_server();
    let http = Http::new(&sim);
    let a = http.send(
        "PATCH",
        "/api/v1/nodes/server-1",
        Some("application/merge-patch+json"),
        Some(r#"{"spec":{"taints":[{"key":"k","effect":"NoSchedule"}]}}"#),
        true,
    );
    assert_eq!(a.status, 422, "{}", a.text);
    assert!(a.json()["message"]
        .as_str()
        .unwrap()
        .contains("spec.taints"));
    let a = http.send(
        "PATCH",
        "/api/v1/nodes/server-1",
        Some("application/apply-patch+yaml"),
        Some("{}"),
        true,
    );
    assert_eq!(a.status, 415);
    assert_eq!(a.json()["reason"], "UnsupportedMediaType");
}

#[test]
fn pods_list_by_node_with_a_field_selector() {
    let sim = one_server();
    agent(&sim, "agent-1", "10.0.0.21");
    sim.add_pod(
        "default",
        "web-1",
        "agent-1",
        Owner::ReplicaSet("web-5d8f".into()),
        Evict::Allow,
    )
    .unwrap();
    sim.add_pod(
        "kube-system",
        "cilium-a",
        "agent-1",
        Owner::DaemonSet("cilium".into()),
        Evict::Allow,
    )
    .unwrap();
    sim.add_pod(
        "kube-system",
        "cilium-s",
        "server-1",
        Owner::DaemonSet("cilium".into()),
        Evict::Allow,
    )
    .unwrap();
    let http = Http::new(&sim);
    let v = http
        .get("/api/v1/pods?fieldSelector=spec.nodeName%3Dagent-1")
        .json();
    assert_eq!(v["kind"], "PodList");
    let mut names: Vec<&str> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["cilium-a", "web-1"]);
    let ds = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["metadata"]["name"] == "cilium-a")
        .unwrap();
    assert_eq!(ds["metadata"]["ownerReferences"][0]["kind"], "DaemonSet");
    assert_eq!(ds["metadata"]["ownerReferences"][0]["controller"], true);
    assert_eq!(ds["spec"]["nodeName"], "agent-1");
    // Namespaced list, and a field pods cannot be selected by.
    let v = http
        .get("/api/v1/namespaces/kube-system/pods?fieldSelector=spec.nodeName%3Dagent-1")
        .json();
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
    let bad = http.get("/api/v1/pods?fieldSelector=spec.nodeNam%3Dagent-1");
    assert_eq!(bad.status, 400);
    assert_eq!(
        bad.json()["message"],
        "field label not supported: spec.nodeNam"
    );
}

fn evict(http: &Http, ns: &str, name: &str) -> Answer {
    let body = json!({
        "apiVersion": "policy/v1", "kind": "Eviction",
        "metadata": { "name": name, "namespace": ns },
    })
    .to_string();
    http.send(
        "POST",
        &format!("/api/v1/namespaces/{ns}/pods/{name}/eviction"),
        Some("application/json"),
        Some(&body),
        true,
    )
}

#[test]
fn an_allowed_eviction_answers_201_success_and_removes_the_pod() {
    let sim = one_server();
    sim.add_pod(
        "default",
        "web-1",
        "server-1",
        Owner::ReplicaSet("web-5d8f".into()),
        Evict::Allow,
    )
    .unwrap();
    let http = Http::new(&sim);
    let a = evict(&http, "default", "web-1");
    assert_eq!(a.status, 201, "{}", a.text);
    let v = a.json();
    assert_eq!(v["kind"], "Status");
    assert_eq!(v["status"], "Success");
    assert_eq!(v["code"], 201);
    assert_eq!(
        http.get("/api/v1/namespaces/default/pods/web-1").status,
        404
    );
    assert!(sim.pods().is_empty());
    assert_eq!(sim.evictions()[0].status, 201);
}

#[test]
fn an_eviction_blocked_by_a_pdb_answers_429_with_the_disruption_budget_status() {
    let sim = one_server();
    sim.add_pod(
        "default",
        "db-0",
        "server-1",
        Owner::ReplicaSet("db".into()),
        Evict::Pdb429 { times: None },
    )
    .unwrap();
    let http = Http::new(&sim);
    for _ in 0..3 {
        let a = evict(&http, "default", "db-0");
        assert_eq!(a.status, 429, "{}", a.text);
        let v = a.json();
        assert_eq!(v["kind"], "Status");
        assert_eq!(v["status"], "Failure");
        assert_eq!(v["reason"], "TooManyRequests");
        assert_eq!(
            v["message"],
            "Cannot evict pod as it would violate the pod's disruption budget."
        );
        assert_eq!(v["details"]["causes"][0]["reason"], "DisruptionBudget");
        assert_eq!(v["code"], 429);
    }
    assert_eq!(sim.pods().len(), 1, "the pod stays");
}

#[test]
fn an_eviction_blocked_for_the_first_attempts_succeeds_after_them() {
    let sim = one_server();
    sim.add_pod(
        "default",
        "db-0",
        "server-1",
        Owner::ReplicaSet("db".into()),
        Evict::Pdb429 { times: Some(2) },
    )
    .unwrap();
    let http = Http::new(&sim);
    let codes: Vec<u16> = (0..3)
        .map(|_| evict(&http, "default", "db-0").status)
        .collect();
    assert_eq!(codes, [429, 429, 201]);
    let seen: Vec<u16> = sim.evictions().iter().map(|e| e.status).collect();
    assert_eq!(seen, codes);
    assert!(sim.pods().is_empty());
}

#[test]
fn an_eviction_scripted_to_fail_answers_500() {
    let sim = one_server();
    sim.add_pod("default", "x", "server-1", Owner::None, Evict::Error500)
        .unwrap();
    let http = Http::new(&sim);
    let a = evict(&http, "default", "x");
    assert_eq!(a.status, 500);
    let v = a.json();
    assert_eq!(v["reason"], "InternalError");
    assert!(v["message"]
        .as_str()
        .unwrap()
        .starts_with("Internal error occurred: "));
    assert_eq!(sim.pods().len(), 1);
    // A name that does not match the URL is a 400, an unknown pod a 404.
    let a = http.send(
        "POST",
        "/api/v1/namespaces/default/pods/x/eviction",
        Some("application/json"),
        Some(r#"{"apiVersion":"policy/v1","kind":"Eviction","metadata":{"name":"y"}}"#),
        true,
    );
    assert_eq!(a.status, 400);
    assert_eq!(
        a.json()["message"],
        "name in URL does not match name in Eviction object"
    );
    let a = evict(&http, "default", "nope");
    assert_eq!(a.status, 404);
    assert_eq!(a.json()["message"], "pods \"nope\" not found");
}

#[test]
fn mirror_and_daemonset_pods_carry_what_kubectl_drain_looks_at() {
    let sim = one_server();
    sim.add_pod(
        "kube-system",
        "etcd-x",
        "server-1",
        Owner::Mirror,
        Evict::Allow,
    )
    .unwrap();
    sim.add_pod(
        "kube-system",
        "cilium-s",
        "server-1",
        Owner::DaemonSet("cilium".into()),
        Evict::Allow,
    )
    .unwrap();
    let http = Http::new(&sim);
    let m = http
        .get("/api/v1/namespaces/kube-system/pods/etcd-x")
        .json();
    assert!(m["metadata"]["annotations"]["kubernetes.io/config.mirror"].is_string());
    assert!(m["metadata"].get("ownerReferences").is_none());
    // drain's daemonSetFilter GETs the owning DaemonSet.
    assert_eq!(
        http.get("/apis/apps/v1/namespaces/kube-system/daemonsets/cilium")
            .status,
        200
    );
    assert_eq!(
        http.get("/apis/apps/v1/namespaces/kube-system/daemonsets/other")
            .status,
        404
    );
    // The API itself evicts them like any pod.
    assert_eq!(evict(&http, "kube-system", "etcd-x").status, 201);
}

#[test]
fn persistent_volumes_list_with_local_path_node_affinity() {
    let sim = one_server();
    agent(&sim, "agent-1", "10.0.0.21");
    sim.add_local_pv(
        "pvc-0a1b",
        "local-path",
        ("default", "data-db-0"),
        "agent-1",
    )
    .unwrap();
    let http = Http::new(&sim);
    let v = http.get("/api/v1/persistentvolumes").json();
    assert_eq!(v["kind"], "PersistentVolumeList");
    let pv = &v["items"][0];
    assert_eq!(pv["metadata"]["name"], "pvc-0a1b");
    assert_eq!(pv["spec"]["storageClassName"], "local-path");
    assert_eq!(pv["spec"]["claimRef"]["namespace"], "default");
    assert_eq!(pv["spec"]["claimRef"]["name"], "data-db-0");
    assert_eq!(
        pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0],
        json!({"key": "kubernetes.io/hostname", "operator": "In", "values": ["agent-1"]})
    );
    let pvc = http
        .get("/api/v1/namespaces/default/persistentvolumeclaims/data-db-0")
        .json();
    assert_eq!(pvc["spec"]["volumeName"], "pvc-0a1b");
    assert_eq!(pvc["status"]["phase"], "Bound");
    let list = http.get("/api/v1/persistentvolumeclaims").json();
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
}

#[test]
fn the_request_log_keeps_method_path_and_order() {
    let sim = one_server();
    let http = Http::new(&sim);
    http.get("/api/v1/nodes");
    http.send("DELETE", "/api/v1/nodes/nope", None, None, true);
    let log: Vec<(String, String, u16)> = sim
        .requests()
        .into_iter()
        .map(|r| (r.method, r.path, r.status))
        .collect();
    assert_eq!(
        log,
        [
            ("GET".to_string(), "/api/v1/nodes".to_string(), 200),
            ("DELETE".into(), "/api/v1/nodes/nope".into(), 404),
        ]
    );
}

#[test]
fn deleting_a_pod_answers_the_object_and_removes_it() {
    let sim = one_server();
    sim.add_pod(
        "default",
        "web-1",
        "server-1",
        Owner::ReplicaSet("web-5d8f".into()),
        Evict::Allow,
    )
    .unwrap();
    let http = Http::new(&sim);
    let a = http.send(
        "DELETE",
        "/api/v1/namespaces/default/pods/web-1",
        None,
        None,
        true,
    );
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json()["metadata"]["name"], "web-1");
    assert_eq!(
        http.get("/api/v1/namespaces/default/pods/web-1").status,
        404
    );
    assert!(sim.pods().is_empty());
}

#[test]
fn a_joined_node_turns_ready_after_its_scripted_delay() {
    let sim = one_server();
    sim.join_agent(
        "agent-1",
        "10.0.0.21",
        AgentScript {
            ready_after: Duration::from_millis(1500),
            ready: true,
        },
    )
    .unwrap();
    let http = Http::new(&sim);
    let ready = || condition(&http.get("/api/v1/nodes/agent-1").json(), "Ready").unwrap();
    let c = ready();
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("False"), Some("KubeletNotReady"))
    );
    assert!(kube_sim::wait_until(Duration::from_secs(10), || ready()
        ["status"]
        == "True"));
    assert_eq!(ready()["reason"], "KubeletReady");
}

#[test]
fn a_node_scripted_never_ready_stays_not_ready() {
    let sim = one_server();
    sim.join_agent(
        "agent-1",
        "10.0.0.21",
        AgentScript {
            ready_after: Duration::ZERO,
            ready: false,
        },
    )
    .unwrap();
    let http = Http::new(&sim);
    std::thread::sleep(Duration::from_millis(500));
    let c = condition(&http.get("/api/v1/nodes/agent-1").json(), "Ready").unwrap();
    assert_eq!(c["status"], "False");
}
