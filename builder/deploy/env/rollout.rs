//! The K3s-aware rollout: servers replaced one at a time without losing etcd
//! quorum, agents with a surge; an old node is drained and removed from the cluster before its VM goes.
//!
//! The order follows Cluster API's KubeadmControlPlane (scale up before
//! scale down, etcd health before every step, member removal after the
//! drain) and K3s's own rules (k3s-io/k3s pkg/etcd: joiners are learners
//! until promoted, `EtcdIsVoter` says when; deleting a server's Node removes
//! its etcd member). For one server slot:
//! 1. preflight (once per apply): every server Ready and a voter,
//!    `/readyz/etcd` healthy, no member mid-join, no local volume on a node
//!    to be replaced without a policy for its StorageClass;
//! 2. an etcd snapshot on a healthy server before the first server is touched;
//! 3. the new server (server-join, through the VIP) at the slot's next address;
//! 4. wait until it is Ready and a voter; the environment's checks; user gates;
//! 5. cordon and drain the old node through the Eviction API (429 retried
//!    until the drain timeout, never forced; DaemonSet and mirror pods skipped);
//! 6. stop the old VM (never when fewer than ⌊N/2⌋+1 healthy voters would
//!    remain), delete its Node, wait for the voters to be back to N and etcd
//!    healthy, destroy the VM.
//!
//! Agents: up to `max_surge` new agents first, then each old one drained,
//! stopped, its Node deleted, destroyed. Every step is idempotent, so a
//! second apply after `kill -9` anywhere finishes the job.

use anyhow::{bail, Context, Result};
use std::time::Instant;

use super::apply::Applier;
use super::model::{Environment, RoleKind};
use super::plan::{Action, Plan};
use crate::deploy::k3s::{Cluster, Eviction, LocalVolume};
use crate::deploy::providers::NodeVm;

/// Whether an action replaces or removes a K3s node.
pub(crate) fn touches_k3s(env: &Environment, a: &Action) -> bool {
    let slot = match a {
        Action::Replace { slot, .. } => slot,
        Action::Resume { slot, old, .. } if !old.is_empty() => slot,
        Action::Destroy { vm, .. } => &vm.slot,
        _ => return false,
    };
    matches!(
        kind_of(env, slot),
        Some(RoleKind::Server | RoleKind::Agent) | None
    )
}

fn kind_of(env: &Environment, slot: &str) -> Option<RoleKind> {
    env.slots()
        .find(|(_, s)| s.name == slot)
        .map(|(r, _)| r.kind)
}

/// The rollout's steps for people, in order, as `kiln env plan` shows them.
pub(crate) fn explain(env: &Environment, plan: &Plan) -> Vec<String> {
    let mut out = Vec::new();
    let k3s: Vec<&Action> = plan
        .actions
        .iter()
        .filter(|a| touches_k3s(env, a))
        .collect();
    if k3s.is_empty() {
        return out;
    }
    out.push("preflight: every server Ready and an etcd voter, /readyz/etcd healthy, no member mid-join, local volumes covered by a storage policy".into());
    let first_server = k3s.iter().any(|a| {
        matches!(a, Action::Replace { slot, .. } | Action::Resume { slot, .. }
            if kind_of(env, slot) == Some(RoleKind::Server))
    });
    if first_server && env.rollout.snapshot {
        out.push("etcd snapshot on a healthy server (k3s etcd-snapshot save)".into());
    }
    let surge = env.rollout.max_surge as usize;
    let is_agent_replace = |a: &Action| matches!(a, Action::Replace { slot, .. } if kind_of(env, slot) == Some(RoleKind::Agent));
    let mut i = 0;
    while i < k3s.len() {
        match k3s[i] {
            Action::Replace { slot, .. } => {
                let server = kind_of(env, slot) == Some(RoleKind::Server);
                // Agents come max_surge at a time, as apply takes them.
                let mut n = 1;
                while !server && n < surge && k3s.get(i + n).is_some_and(|a| is_agent_replace(a)) {
                    n += 1;
                }
                for b in &k3s[i..i + n] {
                    if let Action::Replace {
                        slot, generation, ..
                    } = b
                    {
                        let name = super::apply::vm_name_of(env, slot, *generation);
                        out.push(format!(
                            "{slot}: create {name} ({}), wait until it is Ready{}{}",
                            if server {
                                "server-join through the VIP"
                            } else {
                                "agent"
                            },
                            if server {
                                ", an etcd voter and UP by the LBs' health check"
                            } else {
                                ""
                            },
                            if env.rollout.gates.is_empty() {
                                ""
                            } else {
                                ", run the user gates"
                            }
                        ));
                    }
                }
                for b in &k3s[i..i + n] {
                    if let Action::Replace { slot, old, .. } = b {
                        out.extend(retire_lines(slot, &old.name, server));
                    }
                }
                i += n;
                continue;
            }
            Action::Resume { slot, old, new, .. } => {
                let server = kind_of(env, slot) == Some(RoleKind::Server);
                out.push(format!(
                    "{slot}: resume: {} Ready{}",
                    new.name,
                    if server { " and a voter" } else { "" }
                ));
                for o in old {
                    out.extend(retire_lines(slot, &o.name, server));
                }
            }
            Action::Destroy { vm, .. } => {
                let server = kind_of(env, &vm.slot) != Some(RoleKind::Agent);
                out.extend(retire_lines(&vm.slot, &vm.name, server));
            }
            _ => {}
        }
        i += 1;
    }
    out
}

fn retire_lines(slot: &str, name: &str, server: bool) -> Vec<String> {
    let mut v = vec![
        format!("{slot}: cordon and drain {name} (Eviction API; PodDisruptionBudgets apply)"),
        format!(
            "{slot}: stop {name}{}",
            if server {
                " (only while ⌊N/2⌋+1 healthy voters remain)"
            } else {
                ""
            }
        ),
        format!(
            "{slot}: delete Node {name}{}",
            if server {
                " (K3s removes its etcd member); wait for N voters and etcd healthy"
            } else {
                ""
            }
        ),
    ];
    v.push(format!("{slot}: destroy {name}"));
    v
}

/// Quorum of `members` voters.
pub(crate) fn quorum(members: usize) -> usize {
    members / 2 + 1
}

impl Applier<'_> {
    fn cluster(&self) -> Result<&Cluster> {
        match self.cluster {
            Some(c) => Ok(c),
            None => Err(self
                .env
                .kubeconfig()
                .err()
                .unwrap_or_else(|| anyhow::anyhow!("no connection to the cluster's API"))),
        }
    }

    /// Step 1, once per apply, before anything is touched.
    pub(super) fn k3s_preflight(&self, plan: &Plan) -> Result<()> {
        let touching: Vec<&Action> = plan
            .actions
            .iter()
            .filter(|a| touches_k3s(self.env, a))
            .collect();
        if touching.is_empty() {
            return Ok(());
        }
        let cluster = self.cluster()?;
        // Nodes a resumed replacement is between: its new node may still be
        // joining and its old one may be stopped already.
        let in_flight: Vec<&str> = touching
            .iter()
            .flat_map(|a| match a {
                Action::Resume { old, new, .. } => {
                    let mut v: Vec<&str> = old.iter().map(|o| o.name.as_str()).collect();
                    v.push(new.name.as_str());
                    v
                }
                _ => Vec::new(),
            })
            .collect();
        let nodes = cluster.nodes()?;
        for n in nodes
            .iter()
            .filter(|n| n.control_plane && !in_flight.contains(&n.name.as_str()))
        {
            if !n.ready {
                bail!(
                    "preflight: server {} is not Ready; not starting a rollout",
                    n.name
                );
            }
            match n.voter {
                Some(true) => {}
                Some(false) => bail!(
                    "preflight: server {} is an etcd learner (a member is mid-join); not starting a rollout",
                    n.name
                ),
                None => bail!(
                    "preflight: server {} has no EtcdIsVoter condition; not starting a rollout",
                    n.name
                ),
            }
        }
        if !cluster.etcd_ready()? {
            bail!("preflight: /readyz/etcd is not healthy; not starting a rollout");
        }
        // Local volumes of every node about to go, against the policies.
        let mut refused = Vec::new();
        for a in &touching {
            let old: Vec<&NodeVm> = match a {
                Action::Replace { old, .. } => vec![old],
                Action::Resume { old, .. } => old.iter().collect(),
                Action::Destroy { vm, .. } => vec![vm],
                _ => vec![],
            };
            for o in old {
                for v in cluster.local_volumes_on(&o.name)? {
                    if !self.env.rollout.storage.contains_key(&v.storage_class) {
                        refused.push(format!(
                            "{} (PV {}, StorageClass {}) on {}",
                            v.claim, v.pv, v.storage_class, o.name
                        ));
                    }
                }
            }
        }
        if !refused.is_empty() {
            bail!(
                "preflight: replacing these nodes would lose local volumes: {}; give their StorageClass a policy in {} (`[storage.<class>] policy = \"recreate\"`, or `before`/`after` hooks)",
                refused.join("; "),
                self.env.path.display()
            );
        }
        Ok(())
    }

    /// Step 2: a snapshot on a healthy server (not one about to go), once.
    pub(super) fn etcd_snapshot(&self, actual: &[NodeVm], leaving: &[&str]) -> Result<()> {
        if !self.env.rollout.snapshot {
            return Ok(());
        }
        let cluster = self.cluster()?;
        let nodes = cluster.nodes()?;
        let healthy = |vm: &&NodeVm| {
            kind_of(self.env, &vm.slot) == Some(RoleKind::Server)
                && vm.running
                && !leaving.contains(&vm.name.as_str())
                && nodes
                    .iter()
                    .any(|n| n.name == vm.name && n.ready && n.voter == Some(true))
        };
        let vm = actual
            .iter()
            .find(healthy)
            .or_else(|| {
                actual.iter().find(|v| {
                    kind_of(self.env, &v.slot) == Some(RoleKind::Server)
                        && nodes
                            .iter()
                            .any(|n| n.name == v.name && n.ready && n.voter == Some(true))
                })
            })
            .context("no healthy server to take the etcd snapshot on")?;
        let name = format!(
            "kiln-{}-{}",
            self.env.name,
            crate::util::now_rfc3339().replace([':', '-'], "")
        );
        self.step(&vm.slot, "snapshot", &vm.name, &name)?;
        let out = self
            .gates
            .run(vm, &format!("sudo k3s etcd-snapshot save --name {name}"))
            .with_context(|| format!("etcd snapshot on {}", vm.name))?;
        self.say(&format!(
            "etcd snapshot {name} on {}: {}",
            vm.name,
            out.trim()
        ));
        Ok(())
    }

    /// Steps 3 and 4 for one slot: the new node (made if missing) is Ready
    /// (and a voter), the environment's checks and the user gates pass.
    pub(super) fn k3s_bring_up(&self, role: &str, slot: &str, generation: u32) -> Result<NodeVm> {
        let vm = self.create_and_prove(role, slot, generation, false)?;
        let server = kind_of(self.env, slot) == Some(RoleKind::Server);
        self.step(slot, "join", &vm.name, "")?;
        self.wait_joined(&vm.name, server)?;
        if server {
            // The LBs must count it UP before an old server goes.
            let timeout = std::time::Duration::from_secs(self.env.rollout.join_timeout);
            self.gates.api_server_up(&vm, timeout)?;
        }
        self.gates.env_checks().with_context(|| {
            format!(
                "{}: the environment's checks failed with it in service",
                vm.name
            )
        })?;
        for g in &self.env.rollout.gates {
            self.step(slot, "gate", &vm.name, &g.name)?;
            self.user_gate(g, &vm).with_context(|| {
                format!(
                    "gate `{}` failed for {}; stopping the rollout",
                    g.name, vm.name
                )
            })?;
        }
        self.journal.record(slot, "in-service", &vm.name, "")?;
        Ok(vm)
    }

    fn wait_joined(&self, name: &str, server: bool) -> Result<()> {
        let cluster = self.cluster()?;
        let start = Instant::now();
        loop {
            crate::util::check_interrupted()?;
            let state = cluster.node(name)?;
            let done = state
                .as_ref()
                .is_some_and(|n| n.ready && (!server || n.voter == Some(true)));
            if done {
                return Ok(());
            }
            if start.elapsed().as_secs() > self.env.rollout.join_timeout {
                let why = match state {
                    None => "never registered its Node".to_string(),
                    Some(n) if !n.ready => "is not Ready".to_string(),
                    Some(_) => "is still an etcd learner (not promoted)".to_string(),
                };
                bail!(
                    "{name} {why} after {} s; stopping the rollout without touching anything else (never rolled back during a join): the old node stays in service",
                    self.env.rollout.join_timeout
                );
            }
            std::thread::sleep(self.opts.poll);
        }
    }

    fn user_gate(&self, g: &super::model::UserGate, vm: &NodeVm) -> Result<()> {
        if let Some(cmd) = &g.ssh {
            self.gates.run(vm, cmd)?;
            return Ok(());
        }
        if let Some(path) = &g.job {
            let job = job_for(&self.env.resolve_path(path), vm)?;
            let timeout = std::time::Duration::from_secs(self.env.rollout.join_timeout);
            return self.cluster()?.run_job(&job, timeout, self.opts.poll);
        }
        let cmd = g.command.as_deref().unwrap_or("true");
        let out = std::process::Command::new("sh")
            .args(["-c", cmd])
            .env("KILN_ENV", &self.env.name)
            .env("KILN_NODE", &vm.name)
            .env("KILN_NODE_ADDRESS", vm.address.to_string())
            .output()
            .with_context(|| format!("cannot run `{cmd}`"))?;
        if !out.status.success() {
            bail!(
                "`{cmd}` exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Steps 5 and 6 for an old K3s node. Each part is skipped when a run
    /// killed after it did it already (the Node gone: drained and removed).
    pub(super) fn k3s_retire(&self, vm: &NodeVm) -> Result<()> {
        let cluster = self.cluster()?;
        let server = kind_of(self.env, &vm.slot) != Some(RoleKind::Agent);
        let registered = cluster.node(&vm.name)?.is_some();
        let volumes = cluster.local_volumes_on(&vm.name)?;
        if registered {
            self.run_volume_hooks(&volumes, vm, Hook::Before)?;
            self.step(&vm.slot, "drain", &vm.name, "")?;
            self.drain(cluster, &vm.name)?;
            if server {
                self.check_quorum_without(cluster, &vm.name)?;
            }
        }
        self.step(&vm.slot, "stop", &vm.name, "")?;
        self.provider.stop(vm, self.opts.stop_grace)?;
        if registered {
            self.step(&vm.slot, "delete-node", &vm.name, "")?;
            cluster.delete_node(&vm.name)?;
        }
        // The Node goes once K3s's controllers let it (its finalizer: for a
        // server, after the etcd member is removed); its VM stays until then.
        self.wait_node_gone(cluster, &vm.name)?;
        if server {
            self.wait_voters_back(cluster)?;
        }
        for v in &volumes {
            self.step(&vm.slot, "recreate-volume", &vm.name, &v.claim)?;
            cluster.delete_claim(v)?;
        }
        self.step(&vm.slot, "destroy", &vm.name, "")?;
        self.provider.destroy(vm)?;
        self.journal.record(&vm.slot, "destroyed", &vm.name, "")?;
        self.run_volume_hooks(&volumes, vm, Hook::After)?;
        Ok(())
    }

    fn drain(&self, cluster: &Cluster, node: &str) -> Result<()> {
        cluster.cordon(node)?;
        let start = Instant::now();
        loop {
            crate::util::check_interrupted()?;
            let pods: Vec<_> = cluster
                .pods_on(node)?
                .into_iter()
                .filter(|p| !p.skipped)
                .collect();
            if pods.is_empty() {
                return Ok(());
            }
            let mut waiting = Vec::new();
            for p in &pods {
                match cluster.evict(p) {
                    Eviction::Done => {}
                    Eviction::Blocked(m) => {
                        waiting.push(format!("{}/{}: {m}", p.namespace, p.name))
                    }
                    Eviction::Failed(m) => waiting.push(format!("{}/{}: {m}", p.namespace, p.name)),
                }
            }
            if start.elapsed().as_secs() > self.env.rollout.drain_timeout {
                bail!(
                    "draining {node} did not finish in {} s (nothing forced; the node stays cordoned and in place): {}",
                    self.env.rollout.drain_timeout,
                    if waiting.is_empty() { "pods still terminating".to_string() } else { waiting.join("; ") }
                );
            }
            std::thread::sleep(self.opts.poll);
        }
    }

    fn wait_node_gone(&self, cluster: &Cluster, name: &str) -> Result<()> {
        let start = Instant::now();
        while cluster.node(name)?.is_some() {
            crate::util::check_interrupted()?;
            if start.elapsed().as_secs() > self.env.rollout.join_timeout {
                bail!("Node {name} is still there {} s after its deletion; its VM stays until it goes", self.env.rollout.join_timeout);
            }
            std::thread::sleep(self.opts.poll);
        }
        Ok(())
    }

    /// Never stop a server when fewer than ⌊N/2⌋+1 healthy voters would remain.
    fn check_quorum_without(&self, cluster: &Cluster, leaving: &str) -> Result<()> {
        let nodes = cluster.nodes()?;
        let voters: Vec<_> = nodes
            .iter()
            .filter(|n| n.control_plane && n.voter == Some(true))
            .collect();
        let healthy_after = voters
            .iter()
            .filter(|n| n.ready && n.name != leaving)
            .count();
        let need = quorum(voters.len());
        if healthy_after < need || !cluster.etcd_ready()? {
            bail!(
                "stopping {leaving} would leave {healthy_after} healthy etcd voters of {} (quorum {need}), or etcd is unhealthy; not stopping it",
                voters.len()
            );
        }
        Ok(())
    }

    /// After a server's Node is deleted: as many voters as the file has
    /// server slots, every one Ready, and etcd healthy.
    fn wait_voters_back(&self, cluster: &Cluster) -> Result<()> {
        let want = self
            .env
            .slots()
            .filter(|(r, _)| r.kind == RoleKind::Server)
            .count();
        let start = Instant::now();
        loop {
            crate::util::check_interrupted()?;
            let nodes = cluster.nodes()?;
            let voters = nodes
                .iter()
                .filter(|n| n.control_plane && n.voter == Some(true) && n.ready)
                .count();
            if voters == want && cluster.etcd_ready()? {
                return Ok(());
            }
            if start.elapsed().as_secs() > self.env.rollout.join_timeout {
                bail!("etcd has {voters} healthy voters, not {want}, after a member's removal; stopping the rollout");
            }
            std::thread::sleep(self.opts.poll);
        }
    }

    fn run_volume_hooks(&self, volumes: &[LocalVolume], vm: &NodeVm, hook: Hook) -> Result<()> {
        for v in volumes {
            let Some(policy) = self.env.rollout.storage.get(&v.storage_class) else {
                bail!(
                    "{} on {} has no policy for StorageClass {}",
                    v.claim,
                    vm.name,
                    v.storage_class
                );
            };
            let cmd = match hook {
                Hook::Before => &policy.before,
                Hook::After => &policy.after,
            };
            let Some(cmd) = cmd else { continue };
            self.step(&vm.slot, hook.name(), &vm.name, &v.claim)?;
            let out = std::process::Command::new("sh")
                .args(["-c", cmd])
                .env("KILN_ENV", &self.env.name)
                .env("KILN_NODE", &vm.name)
                .env("KILN_PVC", &v.claim)
                .env("KILN_PV", &v.pv)
                .output()
                .with_context(|| format!("cannot run `{cmd}`"))?;
            if !out.status.success() {
                bail!(
                    "{} hook for {} (`{cmd}`) exited with {}: {}",
                    hook.name(),
                    v.claim,
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        Ok(())
    }
}

/// A gate's Job for one new node: the manifest's Job named after it
/// (`<name>-<node>`, at most 63 characters), with KILN_NODE and
/// KILN_NODE_ADDRESS in every container's environment.
fn job_for(path: &std::path::Path, vm: &NodeVm) -> Result<k8s_openapi::api::batch::v1::Job> {
    use k8s_openapi::api::core::v1::EnvVar;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the gate's Job {}", path.display()))?;
    let mut job: k8s_openapi::api::batch::v1::Job = serde_saphyr::from_str(&text)
        .with_context(|| format!("{} is not a batch/v1 Job", path.display()))?;
    let base = job
        .metadata
        .name
        .clone()
        .unwrap_or_else(|| "kiln-gate".into());
    let mut name = format!("{base}-{}", vm.name);
    name.truncate(63);
    job.metadata.name = Some(name.trim_end_matches('-').to_string());
    if let Some(spec) = job.spec.as_mut().and_then(|s| s.template.spec.as_mut()) {
        for c in &mut spec.containers {
            let env = c.env.get_or_insert_with(Vec::new);
            for (k, v) in [
                ("KILN_NODE", vm.name.clone()),
                ("KILN_NODE_ADDRESS", vm.address.to_string()),
            ] {
                env.push(EnvVar {
                    name: k.into(),
                    value: Some(v),
                    ..EnvVar::default()
                });
            }
        }
    }
    Ok(job)
}

#[derive(Clone, Copy)]
enum Hook {
    Before,
    After,
}

impl Hook {
    fn name(self) -> &'static str {
        match self {
            Hook::Before => "volume-before",
            Hook::After => "volume-after",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The users' prod environment (envs/prod.toml) running generation 0
    /// of every slot, and new K3s images for servers and agents: the plan
    /// replaces the six K3s nodes in the rollout's order, LBs kept.
    #[test]
    fn the_prod_plan_for_new_k3s_images_lists_each_rollout_step_in_order() {
        use crate::deploy::env::apply::{desired, vm_name_of};
        let env = Environment::load(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("envs/prod.toml"),
        )
        .unwrap();
        let ids = |k3s: &str| -> std::collections::BTreeMap<String, String> {
            [
                ("lb", "1b".repeat(32)),
                ("server", k3s.repeat(32)),
                ("agent", k3s.repeat(32)),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
        };
        let running: Vec<NodeVm> = desired(&env, &ids("5e"))
            .unwrap()
            .into_iter()
            .map(|d| NodeVm {
                handle: d.slot.clone(),
                name: vm_name_of(&env, &d.slot, 0),
                slot: d.slot,
                generation: 0,
                image_id: d.image_id,
                values_digest: d.values_digest,
                address: "192.168.0.250".parse().unwrap(),
                running: true,
            })
            .collect();
        let mut plan = crate::deploy::env::plan::plan(
            &env.name,
            &desired(&env, &ids("6f")).unwrap(),
            &running,
        );
        plan.rollout = explain(&env, &plan);
        let text = plan.text();
        println!("$ kiln env plan envs/prod.toml\n{text}");
        assert!(
            text.contains(
                "prod: 0 to create, 6 to replace, 0 to resume, 0 to destroy, 3 unchanged"
            ),
            "{text}"
        );
        let order: Vec<&str> = plan
            .rollout
            .iter()
            .filter_map(|l| l.split_once(": ").map(|(slot, _)| slot))
            .filter(|s| !s.contains(' ') && s.contains('-'))
            .collect();
        let mut slots = order.clone();
        slots.dedup();
        assert_eq!(
            slots,
            ["server-1", "server-2", "server-3", "agent-1", "agent-2", "agent-3"]
        );
    }

    #[test]
    fn quorum_is_a_strict_majority() {
        assert_eq!(quorum(1), 1);
        assert_eq!(quorum(3), 2);
        assert_eq!(quorum(4), 3);
        assert_eq!(quorum(5), 3);
    }
}

#[cfg(test)]
#[path = "rollout_stand_in.rs"]
mod on_the_stand_in;
