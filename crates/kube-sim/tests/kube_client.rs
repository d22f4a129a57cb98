//! The real client crates kiln's rollout engine uses (kube 5.0, k8s-openapi
//! 0.29) against kube-sim (a labelled stand-in for K3s's Kubernetes API, not
//! Kubernetes): what they send is understood, and what the stand-in answers
//! deserializes into their types.

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, EvictParams, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use kube_sim::{wait_until, Evict, KubeSim, Owner};
use std::time::Duration;

#[tokio::test(flavor = "current_thread")]
async fn kube_rs_lists_cordons_evicts_and_deletes_a_node_through_the_stand_in() {
    let sim = KubeSim::start(&[
        ("server-1", "10.0.0.11"),
        ("server-2", "10.0.0.12"),
        ("server-3", "10.0.0.13"),
    ])
    .unwrap();
    sim.add_pod(
        "default",
        "web-1",
        "server-3",
        Owner::ReplicaSet("web-5d8f".into()),
        Evict::Allow,
    )
    .unwrap();
    sim.add_pod(
        "default",
        "db-0",
        "server-3",
        Owner::ReplicaSet("db".into()),
        Evict::Pdb429 { times: None },
    )
    .unwrap();
    let kubeconfig = Kubeconfig::from_yaml(&sim.kubeconfig()).unwrap();
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    // kube 5.0 retries 429s itself by default (client/retry.rs
    // RetryPolicy::server_retry: 15 times, backoff up to 1000s): a PDB that
    // never allows the eviction would keep evict() waiting for minutes.
    // Off, the 429 reaches the caller.
    config.default_retry = false;
    let client = Client::try_from(config).unwrap();

    // List the control plane.
    let nodes: Api<Node> = Api::all(client.clone());
    let list = nodes
        .list(&ListParams::default().labels("node-role.kubernetes.io/control-plane=true"))
        .await
        .unwrap();
    let names: Vec<String> = list
        .items
        .iter()
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    assert_eq!(names, ["server-1", "server-2", "server-3"]);
    assert!(list.metadata.resource_version.is_some());
    let conds = list.items[0]
        .status
        .as_ref()
        .unwrap()
        .conditions
        .as_ref()
        .unwrap();
    let voter = conds.iter().find(|c| c.type_ == "EtcdIsVoter").unwrap();
    assert_eq!(
        (voter.status.as_str(), voter.reason.as_deref()),
        ("True", Some("MemberNotLearner"))
    );

    // Cordon (kube-rs sends a strategic merge patch).
    let n = nodes.cordon("server-3").await.unwrap();
    assert_eq!(n.spec.unwrap().unschedulable, Some(true));

    // The pods on the node, then evict them.
    let on_node = Api::<Pod>::all(client.clone())
        .list(&ListParams::default().fields("spec.nodeName=server-3"))
        .await
        .unwrap();
    assert_eq!(on_node.items.len(), 2);
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let st = pods.evict("web-1", &EvictParams::default()).await.unwrap();
    assert_eq!((st.code, st.is_success()), (201, true));
    match pods.evict("db-0", &EvictParams::default()).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 429);
            assert_eq!(s.reason, "TooManyRequests");
        }
        other => panic!("expected a 429 Status, got {other:?}"),
    }
    match pods.get("web-1").await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 404),
        other => panic!("the evicted pod is gone, got {other:?}"),
    }

    // Delete the Node: marked for deletion, then gone once K3s's member
    // controller removed its etcd member.
    let member = sim.member_of("server-3").unwrap();
    let deleted = nodes
        .delete("server-3", &DeleteParams::default())
        .await
        .unwrap();
    let node = deleted.left().expect("the Node object, not a Status");
    assert!(node.metadata.deletion_timestamp.is_some());
    let sim = tokio::task::spawn_blocking(move || {
        assert!(
            wait_until(Duration::from_secs(30), || sim
                .members()
                .unwrap()
                .iter()
                .all(|m| m.name != member)),
            "log: {:?}",
            sim.log()
        );
        sim
    })
    .await
    .unwrap();
    let gone =
        wait_until_async(|| {
            let nodes = nodes.clone();
            async move {
                matches!(nodes.get("server-3").await, Err(kube::Error::Api(s)) if s.code == 404)
            }
        })
        .await;
    assert!(gone);
    assert_eq!(sim.members().unwrap().len(), 2);
    // Every request kube-rs made was answered without a 4xx/5xx other than
    // the scripted 429 and the 404s asked for.
    let unexpected: Vec<_> = sim
        .requests()
        .into_iter()
        .filter(|r| r.status >= 400 && r.status != 429 && r.status != 404)
        .collect();
    assert!(unexpected.is_empty(), "{unexpected:?}");
}

async fn wait_until_async<F, Fut>(mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..100 {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}
