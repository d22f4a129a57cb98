//! Environments: a whole cluster as data (`model`), compared with what a
//! provider shows (`plan`), carried out step by step (`apply`) under a lock with a journal.
//!
//! The verbs: `plan` (what would change and why), `apply` (bootstrap from
//! scratch or blue-green replacement), `status`, `destroy`, and `rebuild`
//! (QA from scratch: rebuild every image from its lock, prove the ids equal
//! the pinned ones, destroy, bootstrap again).

pub(crate) mod apply;
pub(crate) mod gates;
pub(crate) mod journal;
pub(crate) mod model;
pub(crate) mod plan;

use anyhow::{bail, Result};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

use crate::deploy::providers::{NodeVm, Provider};
use apply::{Applier, ApplyOptions, ApplyReport};
use journal::{EnvLock, Journal};
use model::Environment;
use plan::Plan;

/// The plan for an environment: its file against what `provider` shows.
pub(crate) fn plan_for(env: &Environment, provider: &dyn Provider) -> Result<(Plan, Vec<NodeVm>)> {
    let images = apply::role_images(env)?;
    let desired = apply::desired(env, &images)?;
    let actual = provider.list()?;
    Ok((plan::plan(&env.name, &desired, &actual), actual))
}

/// Carry the plan out: one apply per environment at a time.
pub(crate) fn apply_env(
    env: &Environment,
    provider: &dyn Provider,
    opts: &ApplyOptions,
) -> Result<ApplyReport> {
    let started = Instant::now();
    let state = journal::state_dir(&env.name);
    let _lock = EnvLock::take(&state, &env.name)?;
    let images = apply::role_images(env)?;
    let key = apply::access_key(env, &state)?;
    let journal = Journal::open(&state)?;
    provider.prepare()?;
    let desired = apply::desired(env, &images)?;
    let actual = provider.list()?;
    let plan = plan::plan(&env.name, &desired, &actual);
    let gates = gates::SshGates {
        env,
        provider,
        images: &images,
        key: &key,
        opts,
    };
    let applier = Applier {
        env,
        provider,
        images: &images,
        key: &key,
        journal: &journal,
        gates: &gates,
        opts,
    };
    let steps = applier.run(&plan, &actual)?;
    Ok(ApplyReport {
        env: env.name.clone(),
        plan,
        steps,
        seconds: crate::util::round2(started.elapsed().as_secs_f64()),
    })
}

/// One VM as `kiln env status` shows it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct StatusLine {
    #[serde(flatten)]
    pub vm: NodeVm,
    /// Whether it runs what the environment file wants.
    pub current: bool,
}

/// What the provider shows, slot by slot, and whether each VM is current.
pub(crate) fn status(env: &Environment, provider: &dyn Provider) -> Result<Vec<StatusLine>> {
    let images = apply::role_images(env)?;
    let desired = apply::desired(env, &images)?;
    let mut out: Vec<StatusLine> = provider
        .list()?
        .into_iter()
        .map(|vm| {
            let current = desired.iter().any(|d| {
                d.slot == vm.slot
                    && d.image_id == vm.image_id
                    && d.values_digest == vm.values_digest
            });
            StatusLine { vm, current }
        })
        .collect();
    out.sort_by(|a, b| (&a.vm.slot, a.vm.generation).cmp(&(&b.vm.slot, b.vm.generation)));
    Ok(out)
}

/// Destroy every VM of the environment (agents, then servers, then LBs),
/// then what the provider prepared. Only VMs carrying its marks are touched.
pub(crate) fn destroy_env(env: &Environment, provider: &dyn Provider) -> Result<Vec<String>> {
    let state = journal::state_dir(&env.name);
    let _lock = EnvLock::take(&state, &env.name)?;
    let journal = Journal::open(&state)?;
    let mut vms = provider.list()?;
    let rank = |vm: &NodeVm| {
        env.slots()
            .find(|(_, s)| s.name == vm.slot)
            .map(|(r, _)| match r.kind {
                model::RoleKind::Agent => 0,
                model::RoleKind::Server => 1,
                model::RoleKind::Lb => 2,
            })
            .unwrap_or(0)
    };
    vms.sort_by_key(|v| (rank(v), v.slot.clone(), v.generation));
    let mut gone = Vec::new();
    for vm in &vms {
        crate::util::check_interrupted()?;
        journal.record(&vm.slot, "destroy", &vm.name, "kiln env destroy")?;
        provider.destroy(vm)?;
        gone.push(vm.name.clone());
    }
    if !provider.list()?.is_empty() {
        bail!("{}: VMs remain after destroy", env.name);
    }
    provider.teardown()?;
    Ok(gone)
}

/// The environment file's path with its name, for messages.
pub(crate) fn load(path: &Path) -> Result<Environment> {
    Environment::load(path)
}
