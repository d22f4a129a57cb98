//! The rollout against kube-sim, a labelled STAND-IN for the Kubernetes API
//! of a K3s cluster whose etcd membership is a real etcd cluster (crates/kube-sim), through kiln's real client.
//!
//! VMs are in memory (the engine's FakeProvider); creating a server VM joins
//! it to the stand-in as K3s would (an etcd learner, promoted when scripted),
//! stopping one powers its etcd member off for real. What K3s itself would
//! do on a real VM is the stand-in's script; quorum, learners and member
//! removal are etcd's own behaviour.

use super::*;
use crate::deploy::env::apply::tests::{FakeGates, FakeProvider};
use crate::deploy::env::apply::{desired, ids, role_images, Applier, ApplyOptions};
use crate::deploy::env::journal::Journal;
use crate::deploy::env::model::Environment;
use crate::deploy::env::plan;
use crate::deploy::providers::{NewVm, Provider};
use crate::validate::keys::ThrowawayKey;
use kube_sim::{AgentScript, Evict, JoinScript, KubeSim, Owner};
use std::cell::RefCell;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// How the next VMs kiln creates behave once they boot.
#[derive(Clone, Copy)]
struct Script {
    promote: bool,
    ready: bool,
}

/// The in-memory provider, joined to the stand-in: a server VM's boot is
/// K3s joining it (server-join) as a learner, an agent's a new Node.
struct ClusterProvider<'a> {
    vms: FakeProvider,
    sim: &'a KubeSim,
    script: RefCell<Script>,
}

impl Provider for ClusterProvider<'_> {
    fn kind(&self) -> &'static str {
        "fake+kube-sim"
    }
    fn prepare(&self) -> Result<()> {
        Ok(())
    }
    fn list(&self) -> Result<Vec<NodeVm>> {
        self.vms.list()
    }
    fn create(&self, vm: &NewVm) -> Result<NodeVm> {
        let existed = self.vms.list()?.iter().any(|v| v.name == vm.name);
        let shown = self.vms.create(vm)?;
        if !existed {
            let s = *self.script.borrow();
            let addr = vm.address.to_string();
            if vm.slot.starts_with("server") {
                self.sim.join_server(
                    &vm.name,
                    &addr,
                    JoinScript {
                        ready_after: Duration::from_millis(200),
                        promote_after: s.promote.then_some(Duration::from_millis(300)),
                        ready: s.ready,
                    },
                )?;
            } else {
                self.sim.join_agent(
                    &vm.name,
                    &addr,
                    AgentScript {
                        ready_after: Duration::from_millis(200),
                        ready: s.ready,
                    },
                )?;
            }
        }
        Ok(shown)
    }
    fn connect(&self, addr: SocketAddr, t: Duration) -> Result<TcpStream> {
        self.vms.connect(addr, t)
    }
    fn stop(&self, vm: &NodeVm, grace: Duration) -> Result<()> {
        let was_running = self
            .vms
            .list()?
            .iter()
            .any(|v| v.name == vm.name && v.running);
        self.vms.stop(vm, grace)?;
        // The VM powers off: a server's etcd member dies with it, for real.
        if was_running && self.sim.member_of(&vm.name).is_some() {
            self.sim.kill_member(&vm.name)?;
        }
        Ok(())
    }
    fn destroy(&self, vm: &NodeVm) -> Result<()> {
        self.vms.destroy(vm)
    }
    fn console_tail(&self, _: &NodeVm) -> Option<String> {
        None
    }
    fn teardown(&self) -> Result<()> {
        Ok(())
    }
}

const SERVERS: [&str; 3] = ["server-1", "server-2", "server-3"];
const AGENTS: [&str; 2] = ["agent-1", "agent-2"];

struct Lab {
    dir: tempfile::TempDir,
    sim: KubeSim,
}

impl Lab {
    /// Three servers and two agents at generation 0, their images `a…`,
    /// running; the stand-in's cluster has their Nodes (servers: voters).
    fn new() -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let servers: Vec<(String, String)> = SERVERS
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("qa-{s}-g0"), format!("10.77.0.{}", 31 + i)))
            .collect();
        let refs: Vec<(&str, &str)> = servers
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        let sim = KubeSim::start(&refs).expect("the stand-in and its etcd start");
        for (i, a) in AGENTS.iter().enumerate() {
            sim.join_agent(
                &format!("qa-{a}-g0"),
                &format!("10.77.0.{}", 51 + i),
                AgentScript {
                    ready_after: Duration::ZERO,
                    ready: true,
                },
            )
            .unwrap();
        }
        std::fs::write(dir.path().join("kubeconfig"), sim.kubeconfig()).unwrap();
        crate::deploy::env::apply::tests::image_at(&dir.path().join("images/a"), &"a".repeat(64));
        crate::deploy::env::apply::tests::image_at(&dir.path().join("images/b"), &"b".repeat(64));
        let lab = Lab { dir, sim };
        lab.write("a", "a", "");
        lab
    }

    fn write(&self, server_image: &str, agent_image: &str, extra: &str) {
        let recipe = concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/tiny.toml");
        let mut text = format!(
            r#"name = "qa"
[provider]
kind = "local"
[network]
cidr = "10.77.0.0/24"
gateway = "10.77.0.1"
vip = "10.77.0.10"
[kubernetes]
kubeconfig = {{ file = "kubeconfig" }}
[rollout]
drain_timeout = 3
join_timeout = 20
[roles.server]
recipe = "{recipe}"
user_data_role = "node"
init_user_data_role = "node"
image = "images/{server_image}"
cores = 1
memory = 512
[roles.agent]
recipe = "{recipe}"
user_data_role = "node"
image = "images/{agent_image}"
cores = 1
memory = 512
"#
        );
        for (i, s) in SERVERS.iter().enumerate() {
            text.push_str(&format!(
                "[[roles.server.slots]]\nname = \"{s}\"\naddresses = [\"10.77.0.{}\", \"10.77.0.{}\"]\n",
                31 + i,
                41 + i
            ));
        }
        for (i, a) in AGENTS.iter().enumerate() {
            text.push_str(&format!(
                "[[roles.agent.slots]]\nname = \"{a}\"\naddresses = [\"10.77.0.{}\", \"10.77.0.{}\"]\n",
                51 + i,
                61 + i
            ));
        }
        text.push_str(extra);
        std::fs::write(self.dir.path().join("qa.toml"), text).unwrap();
    }

    fn env(&self) -> Environment {
        Environment::load(&self.dir.path().join("qa.toml")).unwrap()
    }

    /// The provider with generation 0 of every slot running.
    fn provider(&self) -> ClusterProvider<'_> {
        let env = self.env();
        let images = role_images(&env).unwrap();
        let key = ThrowawayKey::generate("test").unwrap();
        let vms = FakeProvider::default();
        for (_, s) in env.slots() {
            let spec = crate::deploy::env::apply::tests::spec_for(&env, &images, &key, &s.name, 0);
            vms.vms
                .borrow_mut()
                .push(spec.shown(spec.name.clone(), true));
        }
        ClusterProvider {
            vms,
            sim: &self.sim,
            script: RefCell::new(Script {
                promote: true,
                ready: true,
            }),
        }
    }

    /// One `kiln env apply` as a fresh process runs it; `journal` decides
    /// where it is killed.
    fn apply_with(
        &self,
        p: &ClusterProvider<'_>,
        gates: &FakeGates,
        journal: &Journal,
    ) -> Result<()> {
        let env = self.env();
        let images = role_images(&env)?;
        let key = ThrowawayKey::generate("test").unwrap();
        let opts = ApplyOptions {
            say: false,
            poll: Duration::from_millis(100),
            ..ApplyOptions::default()
        };
        let actual = p.list()?;
        let mut plan = plan::plan(&env.name, &desired(&env, &ids(&images))?, &actual);
        plan.rollout = explain(&env, &plan);
        let cluster = Cluster::connect(&env.kubeconfig()?)?;
        Applier {
            env: &env,
            cluster: Some(&cluster),
            provider: p,
            images: &images,
            key: &key,
            journal,
            gates,
            opts: &opts,
        }
        .run(&plan, &actual)?;
        Ok(())
    }

    fn apply(&self, p: &ClusterProvider<'_>, gates: &FakeGates) -> Result<()> {
        self.apply_with(
            p,
            gates,
            &Journal::open(&self.dir.path().join("state")).unwrap(),
        )
    }

    fn nodes(&self) -> Vec<String> {
        let mut v = self.sim.node_names();
        v.sort();
        v
    }

    /// The invariants that hold after any step: no Node without its VM, no
    /// VM without its slot, and etcd answering (quorum).
    fn check_invariants(&self, p: &ClusterProvider<'_>) {
        let vms: Vec<String> = p.list().unwrap().into_iter().map(|v| v.name).collect();
        for n in self.sim.node_names() {
            assert!(vms.contains(&n), "Node {n} has no VM (VMs: {vms:?})");
        }
        let env = self.env();
        for v in p.list().unwrap() {
            assert!(
                env.slots().any(|(_, s)| s.name == v.slot),
                "VM {} has no slot",
                v.name
            );
        }
        assert_eq!(self.sim.etcd_health(), Ok(()), "etcd lost quorum");
    }
}

fn voters(sim: &KubeSim) -> usize {
    sim.members()
        .unwrap()
        .iter()
        .filter(|m| !m.is_learner)
        .count()
}

#[test]
fn three_servers_are_replaced_one_at_a_time_and_etcd_keeps_three_voters() {
    let lab = Lab::new();
    let p = lab.provider();
    lab.sim
        .add_pod(
            "default",
            "web-1",
            "qa-server-1-g0",
            Owner::ReplicaSet("web".into()),
            Evict::Allow,
        )
        .unwrap();
    lab.sim
        .add_pod(
            "kube-system",
            "cilium-x",
            "qa-server-1-g0",
            Owner::DaemonSet("cilium".into()),
            Evict::Allow,
        )
        .unwrap();
    lab.write("b", "a", "");
    let gates = FakeGates::default();
    lab.apply(&p, &gates).unwrap();
    assert_eq!(
        lab.nodes(),
        vec![
            "qa-agent-1-g0",
            "qa-agent-2-g0",
            "qa-server-1-g1",
            "qa-server-2-g1",
            "qa-server-3-g1"
        ]
    );
    assert_eq!(voters(&lab.sim), 3);
    assert_eq!(lab.sim.members().unwrap().len(), 3);
    lab.check_invariants(&p);
    // One snapshot, on a server that stayed, before anything was touched.
    let ran = gates.ran.borrow();
    assert_eq!(ran.len(), 1, "{ran:?}");
    assert!(ran[0].contains("k3s etcd-snapshot save"), "{ran:?}");
    // The ReplicaSet pod was evicted, the DaemonSet pod left alone.
    let evicted: Vec<String> = lab.sim.evictions().into_iter().map(|e| e.pod).collect();
    assert_eq!(evicted, vec!["web-1"]);
}

#[test]
fn a_learner_that_is_never_promoted_stops_the_rollout_with_the_old_server_in_service() {
    let lab = Lab::new();
    let p = lab.provider();
    p.script.borrow_mut().promote = false;
    lab.write("b", "a", "");
    let e = format!("{:#}", lab.apply(&p, &FakeGates::default()).unwrap_err());
    assert!(e.contains("qa-server-1-g1 is still an etcd learner"), "{e}");
    assert!(e.contains("never rolled back during a join"), "{e}");
    let names: Vec<String> = p
        .list()
        .unwrap()
        .iter()
        .filter(|v| v.running)
        .map(|v| v.name.clone())
        .collect();
    assert!(names.contains(&"qa-server-1-g0".to_string()), "{names:?}");
    assert!(
        names.contains(&"qa-server-1-g1".to_string()),
        "the joiner is left as it is: {names:?}"
    );
    assert_eq!(voters(&lab.sim), 3);
    lab.check_invariants(&p);
}

#[test]
fn a_node_that_never_goes_ready_stops_the_rollout() {
    let lab = Lab::new();
    let p = lab.provider();
    p.script.borrow_mut().ready = false;
    lab.write("a", "b", "");
    let e = format!("{:#}", lab.apply(&p, &FakeGates::default()).unwrap_err());
    assert!(e.contains("qa-agent-1-g1 is not Ready"), "{e}");
    assert!(lab.nodes().contains(&"qa-agent-1-g0".to_string()));
    lab.check_invariants(&p);
}

#[test]
fn a_pdb_that_never_allows_eviction_stops_the_drain_without_forcing() {
    let lab = Lab::new();
    let p = lab.provider();
    lab.sim
        .add_pod(
            "default",
            "db-0",
            "qa-agent-1-g0",
            Owner::ReplicaSet("db".into()),
            Evict::Pdb429 { times: None },
        )
        .unwrap();
    lab.write("a", "b", "");
    let e = format!("{:#}", lab.apply(&p, &FakeGates::default()).unwrap_err());
    assert!(e.contains("draining qa-agent-1-g0 did not finish"), "{e}");
    assert!(e.contains("disruption budget"), "{e}");
    // Nothing forced: the pod is still there, the old agent still runs.
    assert!(lab.sim.pods().iter().any(|p| p.name == "db-0"));
    assert!(p
        .list()
        .unwrap()
        .iter()
        .any(|v| v.name == "qa-agent-1-g0" && v.running));
    lab.check_invariants(&p);
}

#[test]
fn a_pdb_that_relents_is_retried_until_the_pod_is_evicted() {
    let lab = Lab::new();
    let p = lab.provider();
    lab.sim
        .add_pod(
            "default",
            "db-0",
            "qa-agent-1-g0",
            Owner::ReplicaSet("db".into()),
            Evict::Pdb429 { times: Some(3) },
        )
        .unwrap();
    lab.write("a", "b", "");
    lab.apply(&p, &FakeGates::default()).unwrap();
    let answers: Vec<u16> = lab.sim.evictions().into_iter().map(|e| e.status).collect();
    assert_eq!(&answers[..3], &[429, 429, 429]);
    assert!(!lab.sim.pods().iter().any(|p| p.name == "db-0"));
}

#[test]
fn a_local_volume_without_a_policy_is_refused_before_anything_is_touched() {
    let lab = Lab::new();
    let p = lab.provider();
    lab.sim
        .add_local_pv(
            "pvc-1234",
            "local-path",
            ("default", "data-db-0"),
            "qa-agent-1-g0",
        )
        .unwrap();
    lab.write("a", "b", "");
    let e = format!("{:#}", lab.apply(&p, &FakeGates::default()).unwrap_err());
    assert!(
        e.contains("default/data-db-0 (PV pvc-1234, StorageClass local-path) on qa-agent-1-g0"),
        "{e}"
    );
    assert_eq!(*p.vms.changes.borrow(), 0, "nothing touched");
}

#[test]
fn a_local_volume_whose_class_may_be_recreated_lets_the_node_go_and_its_claim_is_deleted() {
    let lab = Lab::new();
    let p = lab.provider();
    lab.sim
        .add_local_pv(
            "pvc-1234",
            "local-path",
            ("default", "data-db-0"),
            "qa-agent-1-g0",
        )
        .unwrap();
    lab.write("a", "b", "[storage.local-path]\npolicy = \"recreate\"\n");
    lab.apply(&p, &FakeGates::default()).unwrap();
    let deleted: Vec<String> = lab
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.method == "DELETE")
        .map(|r| r.path)
        .collect();
    assert!(
        deleted
            .contains(&"/api/v1/namespaces/default/persistentvolumeclaims/data-db-0".to_string()),
        "{deleted:?}"
    );
}

#[test]
fn agents_are_replaced_max_surge_at_a_time() {
    let lab = Lab::new();
    let p = lab.provider();
    lab.write("a", "b", "");
    let mut text = std::fs::read_to_string(lab.dir.path().join("qa.toml")).unwrap();
    text = text.replace("drain_timeout = 3", "drain_timeout = 3\nmax_surge = 2");
    std::fs::write(lab.dir.path().join("qa.toml"), text).unwrap();
    lab.apply(&p, &FakeGates::default()).unwrap();
    // Both new agents existed before the first old one was drained.
    let reqs = lab.sim.requests();
    let first_cordon = reqs
        .iter()
        .position(|r| r.method == "PATCH" && r.path.ends_with("qa-agent-1-g0"))
        .unwrap();
    let second_ready = reqs
        .iter()
        .position(|r| r.method == "GET" && r.path.ends_with("qa-agent-2-g1"))
        .unwrap();
    assert!(
        second_ready < first_cordon,
        "surge: both new agents before any old one goes"
    );
    assert_eq!(
        lab.nodes(),
        vec![
            "qa-agent-1-g1",
            "qa-agent-2-g1",
            "qa-server-1-g0",
            "qa-server-2-g0",
            "qa-server-3-g0"
        ]
    );
}

#[test]
fn the_plan_shows_the_rollouts_steps_in_order() {
    let lab = Lab::new();
    let p = lab.provider();
    lab.write("b", "a", "");
    let env = lab.env();
    let images = role_images(&env).unwrap();
    let mut plan = plan::plan(
        &env.name,
        &desired(&env, &ids(&images)).unwrap(),
        &p.list().unwrap(),
    );
    plan.rollout = explain(&env, &plan);
    let text = plan.text();
    let pos = |s: &str| {
        text.find(s)
            .unwrap_or_else(|| panic!("`{s}` not in:\n{text}"))
    };
    assert!(pos("preflight") < pos("etcd snapshot"));
    assert!(pos("etcd snapshot") < pos("server-1: create qa-server-1-g1"));
    assert!(
        pos("server-1: create qa-server-1-g1") < pos("server-1: cordon and drain qa-server-1-g0")
    );
    assert!(pos("server-1: destroy qa-server-1-g0") < pos("server-2: create qa-server-2-g1"));
}

/// `kill -9` at every step boundary of a server's replacement, then a second
/// apply: after each kill and at the end the invariants hold, and the end
/// state is the same as without a kill.
#[test]
fn killed_at_every_step_boundary_a_second_apply_completes_the_server_replacement() {
    // Replace one server (of three): every kind of step, in one slot.
    let mut boundary = 0;
    loop {
        let lab = Lab::new();
        let p = lab.provider();
        lab.write("a", "a", "");
        // Only server-1 changes: its values.
        let text = std::fs::read_to_string(lab.dir.path().join("qa.toml"))
            .unwrap()
            .replacen(
                "name = \"server-1\"\n",
                "name = \"server-1\"\nvalues = { hostname = \"qa-server-1-new\" }\n",
                1,
            );
        std::fs::write(lab.dir.path().join("qa.toml"), text).unwrap();
        let journal = Journal::crashing_at(&lab.dir.path().join("state"), boundary).unwrap();
        let first = lab.apply_with(&p, &FakeGates::default(), &journal);
        let crashed = first.is_err();
        if let Err(e) = &first {
            assert!(
                format!("{e:#}").contains("killed before step"),
                "boundary {boundary}: {e:#}"
            );
        }
        lab.check_invariants(&p);
        lab.apply(&p, &FakeGates::default())
            .unwrap_or_else(|e| panic!("boundary {boundary}: the second apply failed: {e:#}"));
        lab.check_invariants(&p);
        assert_eq!(
            lab.nodes(),
            vec![
                "qa-agent-1-g0",
                "qa-agent-2-g0",
                "qa-server-1-g1",
                "qa-server-2-g0",
                "qa-server-3-g0"
            ],
            "boundary {boundary}"
        );
        assert_eq!(voters(&lab.sim), 3, "boundary {boundary}");
        if !crashed {
            eprintln!("killed at each of {boundary} step boundaries; every second apply completed");
            assert!(boundary >= 6, "a replacement has at least six steps");
            break;
        }
        boundary += 1;
    }
}

#[test]
fn a_volumes_backup_hook_runs_before_the_drain_and_its_restore_after_the_old_node_is_gone() {
    let lab = Lab::new();
    let p = lab.provider();
    lab.sim
        .add_local_pv(
            "pvc-77",
            "local-path",
            ("default", "data-db-0"),
            "qa-agent-1-g0",
        )
        .unwrap();
    let log = lab.dir.path().join("hooks.log");
    lab.write(
        "a",
        "b",
        &format!(
            "[storage.local-path]\nbefore = \"echo before $KILN_PVC $KILN_PV $KILN_NODE >> {0}\"\nafter = \"echo after $KILN_PVC >> {0}\"\n",
            log.display()
        ),
    );
    lab.apply(&p, &FakeGates::default()).unwrap();
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "before default/data-db-0 pvc-77 qa-agent-1-g0\nafter default/data-db-0\n"
    );
}

#[test]
fn an_eviction_the_api_answers_500_is_retried_and_reported_never_forced() {
    let lab = Lab::new();
    let p = lab.provider();
    lab.sim
        .add_pod(
            "default",
            "api-0",
            "qa-agent-1-g0",
            Owner::ReplicaSet("api".into()),
            Evict::Error500,
        )
        .unwrap();
    lab.write("a", "b", "");
    let e = format!("{:#}", lab.apply(&p, &FakeGates::default()).unwrap_err());
    assert!(e.contains("draining qa-agent-1-g0 did not finish"), "{e}");
    assert!(e.contains("default/api-0"), "{e}");
    assert!(lab.sim.evictions().len() > 1, "retried");
    assert!(lab.sim.pods().iter().any(|p| p.name == "api-0"));
    lab.check_invariants(&p);
}

/// A gate's Job for the tests: a batch/v1 manifest as an operator writes it.
fn write_job(lab: &Lab) {
    std::fs::write(
        lab.dir.path().join("smoke-job.yaml"),
        "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: smoke\n  namespace: default\nspec:\n  backoffLimit: 0\n  template:\n    spec:\n      restartPolicy: Never\n      containers:\n        - name: smoke\n          image: busybox\n          command: [\"sh\", \"-c\", \"test -n \\\"$KILN_NODE\\\"\"]\n",
    )
    .unwrap();
}

#[test]
fn a_job_gate_runs_in_the_cluster_for_each_new_node_and_is_cleaned_up() {
    let lab = Lab::new();
    let p = lab.provider();
    write_job(&lab);
    lab.write(
        "a",
        "b",
        "[[gates]]\nname = \"smoke\"\njob = \"smoke-job.yaml\"\n",
    );
    lab.apply(&p, &FakeGates::default()).unwrap();
    let created: Vec<String> = lab
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/jobs"))
        .map(|r| r.path)
        .collect();
    assert_eq!(created.len(), 2, "one Job per new agent: {created:?}");
    assert!(lab.sim.jobs().is_empty(), "the Jobs were deleted");
}

#[test]
fn a_failing_job_gate_stops_the_rollout_before_the_old_node_goes() {
    let lab = Lab::new();
    let p = lab.provider();
    write_job(&lab);
    lab.sim.script_jobs(
        "smoke-qa-agent-1-g1",
        kube_sim::JobOutcome::Fail(Duration::from_millis(100)),
    );
    lab.write(
        "a",
        "b",
        "[[gates]]\nname = \"smoke\"\njob = \"smoke-job.yaml\"\n",
    );
    let e = format!("{:#}", lab.apply(&p, &FakeGates::default()).unwrap_err());
    assert!(e.contains("gate `smoke` failed for qa-agent-1-g1"), "{e}");
    assert!(e.contains("BackoffLimitExceeded"), "{e}");
    assert!(
        lab.nodes().contains(&"qa-agent-1-g0".to_string()),
        "the old agent stays"
    );
    lab.check_invariants(&p);
}
