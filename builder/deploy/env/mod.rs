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
pub mod model;
pub(crate) mod plan;
pub(crate) mod rollout;

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
    let desired = apply::desired(env, &apply::planned_ids(env)?)?;
    let actual = provider.list()?;
    let mut plan = plan::plan(&env.name, &desired, &actual);
    plan.rollout = rollout::explain(env, &plan);
    Ok((plan, actual))
}

/// Carry the plan out: one apply per environment at a time.
pub(crate) fn apply_env(
    env: &Environment,
    provider: &dyn Provider,
    opts: &ApplyOptions,
) -> Result<ApplyReport> {
    let started = Instant::now();
    let state = journal::state_dir(&env.name)?;
    let _lock = EnvLock::take(&state, &env.name)?;
    let images = apply::role_images(env)?;
    let key = apply::access_key(env, &state)?;
    let journal = Journal::open(&state)?;
    provider.prepare()?;
    for done in provider.ensure_images(&apply::image_needs(env, &images), opts.say)? {
        if opts.say {
            eprintln!("[{}] published {done}", env.name);
        }
    }
    let desired = apply::desired(env, &apply::ids(&images))?;
    let actual = provider.list()?;
    let mut plan = plan::plan(&env.name, &desired, &actual);
    plan.rollout = rollout::explain(env, &plan);
    let gates = gates::SshGates {
        env,
        provider,
        images: &images,
        key: &key,
        opts,
    };
    let cluster = if plan.actions.iter().any(|a| rollout::touches_k3s(env, a)) {
        Some(crate::deploy::k3s::Cluster::connect(&env.kubeconfig()?)?)
    } else {
        None
    };
    let applier = Applier {
        env,
        cluster: cluster.as_ref(),
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
    let desired = apply::desired(env, &apply::planned_ids(env)?)?;
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
    destroy_env_with(env, provider, &journal::state_dir(&env.name)?)
}

/// [`destroy_env`] with the environment's state in `state`.
pub(crate) fn destroy_env_with(
    env: &Environment,
    provider: &dyn Provider,
    state: &Path,
) -> Result<Vec<String>> {
    let state = state.to_path_buf();
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

/// One role's image as `kiln env rebuild` made it again.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RebuiltImage {
    pub role: String,
    pub recipe: String,
    pub image_id: String,
    pub seconds: f64,
}

/// QA from scratch, step one: build every role's image again from its
/// recipe and lock into a fresh directory, and refuse to go on unless each
/// id equals the one the environment pins (the reproducibility promise,
/// checked). The pinned image directory is filled from the fresh build when
/// it is missing.
pub(crate) fn rebuild_images(
    env: &Environment,
    cache: crate::image::fetch::Cache,
    show_progress: bool,
) -> Result<Vec<RebuiltImage>> {
    use anyhow::Context;
    let state = journal::state_dir(&env.name)?;
    std::fs::create_dir_all(&state)
        .with_context(|| format!("cannot create {}", state.display()))?;
    let scratch = tempfile::Builder::new()
        .prefix(".kiln-rebuild-")
        .tempdir_in(&state)
        .context("cannot make a directory for the rebuild")?;
    let mut out = Vec::new();
    for role in &env.roles {
        let Some(pin) = &role.image_id else {
            bail!(
                "role `{}` pins no image_id in {}: a rebuild has nothing to prove its images against",
                role.name,
                env.path.display()
            );
        };
        let started = Instant::now();
        let recipe = env.resolve_path(&role.recipe);
        let opts = crate::image::pipeline::BuildOptions {
            out: scratch.path().join(&role.name),
            cache: cache.clone(),
            force: false,
            locked: true,
            show_progress,
            registry_auth: crate::image::airgap::registry_auth(None)?,
            before_promote: None,
        };
        let built = crate::image::pipeline::build(&recipe, &opts)
            .with_context(|| format!("role `{}`: rebuilding {}", role.name, recipe.display()))?;
        if built.manifest.id != *pin {
            bail!(
                "role `{}`: {} rebuilt to image {}, but {} pins {}: the build is not reproducible (or the pin is stale); refusing to go on",
                role.name,
                recipe.display(),
                built.manifest.id,
                env.path.display(),
                pin
            );
        }
        let dest = env.resolve_path(&role.image);
        if !dest.join(crate::image::manifest::MANIFEST_FILE).exists() {
            std::fs::create_dir_all(dest.parent().unwrap_or(Path::new(".")))?;
            copy_dir(&built.dir, &dest)?;
        }
        out.push(RebuiltImage {
            role: role.name.clone(),
            recipe: recipe.display().to_string(),
            image_id: built.manifest.id,
            seconds: crate::util::round2(started.elapsed().as_secs_f64()),
        });
    }
    Ok(out)
}

/// Copy an image directory (a few files) through a staging name, then rename.
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    use anyhow::Context;
    let parent = to.parent().unwrap_or(Path::new("."));
    let staging = tempfile::Builder::new()
        .prefix(".kiln-staging-")
        .tempdir_in(parent)
        .with_context(|| format!("cannot stage in {}", parent.display()))?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        std::fs::copy(e.path(), staging.path().join(e.file_name()))
            .with_context(|| format!("cannot copy {}", e.path().display()))?;
    }
    let staged = staging.keep();
    std::fs::rename(&staged, to).with_context(|| format!("cannot place {}", to.display()))?;
    Ok(())
}
