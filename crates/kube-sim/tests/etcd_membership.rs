//! kube-sim (a labelled stand-in for K3s's Kubernetes API, not Kubernetes)
//! backed by a REAL etcd cluster: member removal, learners, promotion and
//! quorum loss are etcd's own behaviour.

mod common;
use common::*;
use kube_sim::{wait_until, JoinScript, KubeSim};
use std::time::{Duration, Instant};

const SERVERS: &[(&str, &str)] = &[
    ("server-1", "10.0.0.11"),
    ("server-2", "10.0.0.12"),
    ("server-3", "10.0.0.13"),
];

#[test]
fn a_three_member_cluster_starts_with_three_voters() {
    let t = Instant::now();
    let sim = KubeSim::start(SERVERS).unwrap();
    let took = t.elapsed();
    eprintln!("3-member cluster and API up in {took:?}");
    let members = sim.members().unwrap();
    assert_eq!(members.len(), 3, "{members:?}");
    assert!(members.iter().all(|m| !m.is_learner));
    for (node, _) in SERVERS {
        let m = sim.member_of(node).unwrap();
        assert!(m.starts_with(&format!("{node}-")), "{m}");
        assert!(
            members.iter().any(|x| x.name == m),
            "{m} not in {members:?}"
        );
    }
}

#[test]
fn deleting_a_server_node_removes_its_etcd_member_for_real() {
    let sim = KubeSim::start(SERVERS).unwrap();
    let http = Http::new(&sim);
    let member = sim.member_of("server-3").unwrap();
    let pids_before = sim.etcd_pids();
    let a = http.send("DELETE", "/api/v1/nodes/server-3", None, None, true);
    assert_eq!(a.status, 200, "{}", a.text);
    // K3s's wrangler finalizer holds the Node until the member is removed.
    let v = a.json();
    assert!(v["metadata"]["deletionTimestamp"].is_string(), "{v}");
    assert_eq!(
        v["metadata"]["finalizers"][0],
        "wrangler.cattle.io/managed-etcd-controller"
    );
    // etcd refuses removals until members were connected for 5s (its strict
    // reconfig check); the controller retries like K3s's.
    assert!(
        wait_until(Duration::from_secs(30), || http
            .get("/api/v1/nodes/server-3")
            .status
            == 404),
        "node still there; log: {:?}",
        sim.log()
    );
    let members = sim.members().unwrap();
    assert_eq!(members.len(), 2, "{members:?}");
    assert!(!members.iter().any(|m| m.name == member));
    let gone: Vec<u32> = pids_before
        .iter()
        .copied()
        .filter(|p| !is_running(*p))
        .collect();
    assert_eq!(gone.len(), 1, "exactly the removed member's etcd stopped");
    assert_eq!(sim.etcd_pids().len(), 2);
    // The cluster still has quorum.
    assert_eq!(http.get("/readyz/etcd").text, "ok");
}

#[test]
fn a_joined_learner_shows_etcd_is_voter_false_until_promoted() {
    let sim = KubeSim::start(SERVERS).unwrap();
    let http = Http::new(&sim);
    sim.join_server(
        "server-4",
        "10.0.0.14",
        JoinScript {
            ready_after: Duration::ZERO,
            promote_after: Some(Duration::from_secs(2)),
            ready: true,
        },
    )
    .unwrap();
    let member = sim.member_of("server-4").unwrap();
    let reason = || {
        condition(&http.get("/api/v1/nodes/server-4").json(), "EtcdIsVoter").map(|c| {
            (
                c["status"].as_str().unwrap().to_string(),
                c["reason"].as_str().unwrap().to_string(),
            )
        })
    };
    // Once the learner's etcd has published its name, K3s sees a learner.
    assert!(wait_until(Duration::from_secs(20), || reason()
        == Some(("False".into(), "MemberIsLearner".into()))));
    let m = sim
        .members()
        .unwrap()
        .into_iter()
        .find(|m| m.name == member)
        .unwrap();
    assert!(m.is_learner, "{m:?}");
    // etcd's own promotion (after it accepts: the learner is in sync).
    assert!(
        wait_until(Duration::from_secs(30), || reason()
            == Some(("True".into(), "MemberNotLearner".into()))),
        "log: {:?}",
        sim.log()
    );
    let m = sim
        .members()
        .unwrap()
        .into_iter()
        .find(|m| m.name == member)
        .unwrap();
    assert!(!m.is_learner, "{m:?}");
    assert_eq!(sim.members().unwrap().len(), 4);
}

#[test]
fn a_never_promoted_learner_stays_a_learner() {
    let sim = KubeSim::start(SERVERS).unwrap();
    let http = Http::new(&sim);
    sim.join_server(
        "server-4",
        "10.0.0.14",
        JoinScript {
            ready_after: Duration::ZERO,
            promote_after: None,
            ready: true,
        },
    )
    .unwrap();
    let member = sim.member_of("server-4").unwrap();
    let is_learner = || {
        sim.members()
            .unwrap()
            .iter()
            .any(|m| m.name == member && m.is_learner)
    };
    assert!(wait_until(Duration::from_secs(20), is_learner));
    // Long enough for a 4-member cluster's learner to be in sync: nothing
    // promotes it.
    std::thread::sleep(Duration::from_secs(3));
    assert!(is_learner());
    let c = condition(&http.get("/api/v1/nodes/server-4").json(), "EtcdIsVoter").unwrap();
    assert_eq!(c["status"], "False");
    assert_eq!(c["reason"], "MemberIsLearner");
    assert_eq!(
        c["message"],
        "Node has not been promoted to voting member of the etcd cluster"
    );
}

#[test]
fn killing_two_of_three_members_makes_readyz_etcd_fail() {
    let sim = KubeSim::start(SERVERS).unwrap();
    let http = Http::new(&sim);
    let a = http.get("/readyz/etcd");
    assert_eq!((a.status, a.text.as_str()), (200, "ok"));
    sim.kill_member("server-2").unwrap();
    sim.kill_member("server-3").unwrap();
    let a = http.get("/readyz/etcd");
    assert_eq!(a.status, 500, "{}", a.text);
    assert!(
        a.text
            .starts_with("internal server error: error getting data from etcd: "),
        "{}",
        a.text
    );
    assert!(a.content_type.starts_with("text/plain"));
    let a = http.get("/readyz");
    assert_eq!(a.status, 500);
    assert!(
        a.text.contains("[-]etcd failed: reason withheld\n"),
        "{}",
        a.text
    );
    assert!(a.text.ends_with("readyz check failed\n"), "{}", a.text);
}

#[test]
fn a_killed_member_shows_etcd_is_voter_unhealthy() {
    let sim = KubeSim::start(SERVERS).unwrap();
    let http = Http::new(&sim);
    sim.kill_member("server-2").unwrap();
    let node = http.get("/api/v1/nodes/server-2").json();
    let c = condition(&node, "EtcdIsVoter").unwrap();
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("False"), Some("Unhealthy"))
    );
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .starts_with("failed to check etcd member status: "),
        "{c}"
    );
    // Two of three still form a quorum.
    assert_eq!(http.get("/readyz/etcd").status, 200);
}

#[test]
fn deleting_a_server_node_lingers_while_etcd_refuses_to_lose_quorum() {
    let sim = KubeSim::start(SERVERS).unwrap();
    let http = Http::new(&sim);
    sim.kill_member("server-2").unwrap();
    let a = http.send("DELETE", "/api/v1/nodes/server-3", None, None, true);
    assert_eq!(a.status, 200, "{}", a.text);
    // Past etcd's 5s health interval: removing a live member while another
    // is down would leave no quorum, and etcd's strict reconfig check says no.
    std::thread::sleep(Duration::from_secs(7));
    let v = http.get("/api/v1/nodes/server-3");
    assert_eq!(v.status, 200, "the Node waits for its finalizer");
    assert!(v.json()["metadata"]["deletionTimestamp"].is_string());
    assert_eq!(sim.members().unwrap().len(), 3);
    assert!(
        sim.log()
            .iter()
            .any(|l| l.contains("etcdserver: unhealthy cluster")),
        "{:?}",
        sim.log()
    );
}

#[test]
fn the_k3s_remove_annotation_removes_the_member_and_keeps_the_node() {
    let sim = KubeSim::start(SERVERS).unwrap();
    let http = Http::new(&sim);
    let member = sim.member_of("server-3").unwrap();
    let a = http.send(
        "PATCH",
        "/api/v1/nodes/server-3",
        Some("application/merge-patch+json"),
        Some(r#"{"metadata":{"annotations":{"etcd.k3s.cattle.io/remove":"true"}}}"#),
        true,
    );
    assert_eq!(a.status, 200, "{}", a.text);
    assert!(
        wait_until(Duration::from_secs(30), || sim
            .members()
            .unwrap()
            .iter()
            .all(|m| m.name != member)),
        "log: {:?}",
        sim.log()
    );
    // k3s member_controller.go sync: removed-node-name recorded, the
    // node-name and node-address annotations dropped, the Node kept.
    assert!(wait_until(Duration::from_secs(5), || {
        let v = http.get("/api/v1/nodes/server-3").json();
        v["metadata"]["annotations"]["etcd.k3s.cattle.io/removed-node-name"] == member.as_str()
    }));
    let v = http.get("/api/v1/nodes/server-3").json();
    assert!(v["metadata"]["annotations"]
        .get("etcd.k3s.cattle.io/node-name")
        .is_none());
    let c = condition(&v, "EtcdIsVoter").unwrap();
    assert_eq!(c["reason"], "NotAMember");
}
