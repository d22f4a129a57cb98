//! Apply: carry an environment's plan out, one slot at a time, new VM first.
//!
//! Bootstrap order is the plan's (LBs, the first server with `new_cluster`,
//! the other servers joining through the VIP, agents). A replacement is
//! blue-green: the new generation is created beside the old one at the slot's
//! next pool address, proven over SSH (the image's checks and the defaults
//! `kiln validate` runs) and by the environment's checks, and only then is the
//! old VM stopped gracefully (so keepalived hands the VIP over) and
//! destroyed. A failed gate destroys the new VM and leaves the old one in
//! service. Every step can be cut off (`kill -9`) and run again: the plan is
//! re-derived from what the provider shows.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::gates::Gates;
use super::journal::Journal;
use super::model::{Environment, Role, RoleKind, Slot};
use super::plan::{Action, Desired, Plan};
use super::rollout;
use crate::deploy::providers::{NewVm, NodeVm, Provider};
use crate::image::manifest::ImageManifest;
use crate::image::recipe::Recipe;
use crate::image::values::{Node, Pos, Values};
use crate::validate::keys::ThrowawayKey;

/// How patient apply is.
#[derive(Debug, Clone)]
pub(crate) struct ApplyOptions {
    /// From a VM's start until SSH answers.
    pub boot_timeout: Duration,
    /// For `cloud-init status --wait` once SSH answers.
    pub cloud_init_timeout: Duration,
    /// How long a retired VM may take to power off before it is stopped hard.
    pub stop_grace: Duration,
    /// Say each step on stderr.
    pub say: bool,
    /// How often the rollout looks at the cluster while it waits.
    pub poll: Duration,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            boot_timeout: Duration::from_secs(600),
            cloud_init_timeout: Duration::from_secs(600),
            stop_grace: Duration::from_secs(60),
            say: true,
            poll: Duration::from_secs(2),
        }
    }
}

/// What one role's slots are made from.
pub(crate) struct RoleImage {
    pub recipe: Recipe,
    pub dir: PathBuf,
    pub manifest: ImageManifest,
}

/// Load every role's image (and recipe) and check the environment's pins:
/// an image whose id differs from the one the file pins is refused, and with
/// `[verify] allowed_signers` so is one without a valid signature.
pub(crate) fn role_images(env: &Environment) -> Result<BTreeMap<String, RoleImage>> {
    let mut out = BTreeMap::new();
    for role in &env.roles {
        let dir = env.resolve_path(&role.image);
        let manifest = ImageManifest::load(&dir)
            .with_context(|| format!("role `{}`: cannot use its image", role.name))?;
        check_pin(env, role, &dir, &manifest.id)?;
        if let Some(allowed) = &env.allowed_signers {
            crate::image::signature::verify(&dir, &manifest, allowed, None).with_context(|| {
                format!(
                    "role `{}`: {} wants images signed by {}",
                    role.name,
                    env.path.display(),
                    allowed.display()
                )
            })?;
        }
        for name in &role.skip_checks {
            if !manifest.validate.checks.iter().any(|c| c.name == *name) {
                let known: Vec<&str> = manifest
                    .validate
                    .checks
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect();
                bail!(
                    "role `{}`: skip_checks names `{name}`, which {} has no check of (its checks: {})",
                    role.name,
                    dir.display(),
                    known.join("; ")
                );
            }
        }
        let recipe = Recipe::load(&env.resolve_path(&role.recipe))
            .with_context(|| format!("role `{}`", role.name))?;
        out.insert(
            role.name.clone(),
            RoleImage {
                recipe,
                dir,
                manifest,
            },
        );
    }
    Ok(out)
}

/// What every slot should run, in bootstrap order. `image_ids` maps each
/// role to the id its slots should carry.
pub(crate) fn desired(
    env: &Environment,
    image_ids: &BTreeMap<String, String>,
) -> Result<Vec<Desired>> {
    let mut out = Vec::new();
    for (role, slot) in env.slots() {
        let values = slot_values(env, role, slot, None)?;
        out.push(Desired {
            role: role.name.clone(),
            kind: role.kind,
            slot: slot.name.clone(),
            image_id: image_ids[&role.name].clone(),
            values_digest: values_digest(&values)?,
        });
    }
    Ok(out)
}

/// Each role's image id from its loaded image.
/// Each role's image and the Proxmox nodes its slots run on.
pub(crate) fn image_needs(
    env: &Environment,
    images: &BTreeMap<String, RoleImage>,
) -> Vec<crate::deploy::providers::ImageNeed> {
    env.roles
        .iter()
        .filter_map(|r| {
            let image = images.get(&r.name)?;
            let mut nodes: Vec<String> = r.slots.iter().filter_map(|s| s.node.clone()).collect();
            nodes.sort();
            nodes.dedup();
            Some(crate::deploy::providers::ImageNeed {
                dir: image.dir.clone(),
                image_id: image.manifest.id.clone(),
                nodes,
            })
        })
        .collect()
}

pub(crate) fn ids(images: &BTreeMap<String, RoleImage>) -> BTreeMap<String, String> {
    images
        .iter()
        .map(|(k, v)| (k.clone(), v.manifest.id.clone()))
        .collect()
}

/// Each role's image id for a plan: the image's own when it is built (and
/// agrees with the pin), else the pin, so a plan can be made before any
/// image exists on this machine.
pub(crate) fn planned_ids(env: &Environment) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for role in &env.roles {
        let dir = env.resolve_path(&role.image);
        let id = if dir.join(crate::image::manifest::MANIFEST_FILE).exists() {
            let id = ImageManifest::load(&dir)?.id;
            check_pin(env, role, &dir, &id)?;
            id
        } else if let Some(pin) = &role.image_id {
            pin.clone()
        } else {
            bail!(
                "role `{}`: {} is not built and {} pins no image_id: build it (`kiln build {}`) or pin its id",
                role.name,
                dir.display(),
                env.path.display(),
                role.recipe.display()
            );
        };
        out.insert(role.name.clone(), id);
    }
    Ok(out)
}

/// Refuse an image whose id is not the one the environment pins.
fn check_pin(env: &Environment, role: &Role, dir: &std::path::Path, id: &str) -> Result<()> {
    if let Some(pin) = role.image_id.as_ref().filter(|p| *p != id) {
        bail!(
            "role `{}`: {} is image {}, but {} pins {}; build the pinned image or update the pin",
            role.name,
            dir.display(),
            &id[..12.min(id.len())],
            env.path.display(),
            &pin[..12]
        );
    }
    Ok(())
}

/// The short digest of a slot's values as written (secret references, not
/// secrets), so the provider's marks can say when they changed.
fn values_digest(v: &Values) -> Result<String> {
    let json = serde_json::to_string(v)?;
    Ok(crate::util::sha256_hex(json.as_bytes())[..12].to_string())
}

/// The VM name of a slot's generation: `<env>-<slot>-g<generation>`. K3s
/// refuses a reused node name, so every generation has a new one.
pub(crate) fn vm_name(env: &Environment, slot: &Slot, generation: u32) -> String {
    vm_name_of(env, &slot.name, generation)
}

/// [`vm_name`] by the slot's name.
pub(crate) fn vm_name_of(env: &Environment, slot: &str, generation: u32) -> String {
    format!("{}-{slot}-g{generation}", env.name)
}

/// One slot's values: what kiln knows about the environment (only the keys
/// the role's value types declare), then the role's values, then the slot's.
/// With `generation`, the per-VM facts too (host name, address, generation).
fn slot_values(
    env: &Environment,
    role: &Role,
    slot: &Slot,
    generation: Option<u32>,
) -> Result<Values> {
    let at = Pos {
        file: env.path.clone(),
        line_col: None,
    };
    let mut facts: Vec<(&str, toml::Value)> = vec![
        ("vip", toml::Value::String(env.network.vip.to_string())),
        (
            "vip_prefix",
            toml::Value::Integer(env.network.prefix.into()),
        ),
        (
            "name",
            toml::Value::String(format!("{}-{}", env.name, slot.name)),
        ),
    ];
    let pools = |kind: RoleKind, skip: &str| -> toml::Value {
        toml::Value::Array(
            env.slots()
                .filter(|(r, s)| r.kind == kind && s.name != skip)
                .map(|(_, s)| {
                    let mut t = toml::Table::new();
                    t.insert("name".into(), toml::Value::String(s.name.clone()));
                    t.insert(
                        "addresses".into(),
                        toml::Value::Array(
                            s.addresses
                                .iter()
                                .map(|a| toml::Value::String(a.to_string()))
                                .collect(),
                        ),
                    );
                    toml::Value::Table(t)
                })
                .collect(),
        )
    };
    if role.kind == RoleKind::Lb {
        facts.push(("backends", pools(RoleKind::Server, "")));
        facts.push(("peers", pools(RoleKind::Lb, "")));
    }
    if let Some(g) = generation {
        facts.push(("hostname", toml::Value::String(vm_name(env, slot, g))));
        facts.push(("node_ip", toml::Value::String(slot.address(g).to_string())));
        facts.push(("generation", toml::Value::Integer(g.into())));
    }
    let mut v = Values {
        entries: Vec::new(),
        origin: at.clone(),
    };
    for (k, val) in facts {
        v.set(k, Node::from_toml(&val, &at));
    }
    for (k, n) in role.values.entries.iter().chain(&slot.values.entries) {
        v.set(k, n.clone());
    }
    Ok(v)
}

/// Replace `"secret:NAME"` strings with the secret (read now, never stored).
fn resolve_secrets(env: &Environment, v: &mut Values) -> Result<()> {
    fn walk(env: &Environment, n: &mut Node) -> Result<()> {
        use crate::image::values::Val;
        match &mut n.value {
            Val::Scalar(toml::Value::String(s)) => {
                if let Some(name) = s.strip_prefix("secret:") {
                    *s = env.secret(name)?;
                }
            }
            Val::Scalar(_) => {}
            Val::List(items) => {
                for i in items {
                    walk(env, i)?;
                }
            }
            Val::Table(entries) => {
                for (_, e) in entries {
                    walk(env, e)?;
                }
            }
        }
        Ok(())
    }
    for (_, n) in &mut v.entries {
        walk(env, n)?;
    }
    Ok(())
}

/// Keep only the keys a role's value types declare (kiln's facts are offered
/// to every role; a role takes the ones it names).
fn declared_only(
    recipe: &Recipe,
    user_data_role: &str,
    v: &mut Values,
    written: &Values,
) -> Result<()> {
    let role = recipe
        .roles
        .get(user_data_role)
        .with_context(|| format!("{} has no role `{user_data_role}`", recipe.path.display()))?;
    let Some(types) = &role.value_types else {
        return Ok(());
    };
    v.entries
        .retain(|(k, _)| types.decls.iter().any(|(d, _)| d == k) || written.get(k).is_some());
    Ok(())
}

/// Everything the provider needs to make generation `generation` of a slot.
fn new_vm(
    env: &Environment,
    role: &Role,
    slot: &Slot,
    generation: u32,
    image: &RoleImage,
    key: &ThrowawayKey,
    new_cluster: bool,
) -> Result<NewVm> {
    let user_data_role = if new_cluster {
        role.init_user_data_role.clone()
    } else {
        role.user_data_role.clone()
    };
    let mut values = slot_values(env, role, slot, Some(generation))?;
    let digest = values_digest(&slot_values(env, role, slot, None)?)?;
    if new_cluster {
        values.set(
            "new_cluster",
            Node::from_toml(&toml::Value::Boolean(true), &values.origin),
        );
    }
    let mut written = role.values.clone();
    written.entries.extend(slot.values.entries.iter().cloned());
    declared_only(&image.recipe, &user_data_role, &mut values, &written)?;
    resolve_secrets(env, &mut values)?;
    let user_data = crate::image::cloudinit::render(&image.recipe, &user_data_role, &values)
        .with_context(|| format!("slot `{}`: cannot render its user-data", slot.name))?;
    let m = &image.manifest;
    let disk_bytes = role
        .disk_gib
        .map(|g| u64::from(g) << 30)
        .unwrap_or(0)
        .max(m.disk.virtual_size + (1 << 30));
    Ok(NewVm {
        env: env.name.clone(),
        name: vm_name(env, slot, generation),
        slot: slot.name.clone(),
        generation,
        image_dir: image.dir.clone(),
        image_id: m.id.clone(),
        disk_file: m.disk_path(&image.dir),
        disk_format: m.disk.format.clone(),
        disk_virtual_size: m.disk.virtual_size,
        uefi: m.boot.uefi,
        node: slot.node.clone(),
        cores: role.cores,
        memory_mib: role.memory_mib,
        disk_bytes,
        address: slot.address(generation),
        network: env.network.clone(),
        user_data,
        ssh_public_keys: vec![key.public_openssh().to_string()],
        values_digest: digest,
    })
}

/// The environment's access key: the file named in `[access]`, else one kiln
/// keeps (0600) in the environment's state directory.
pub(crate) fn access_key(env: &Environment, state: &std::path::Path) -> Result<ThrowawayKey> {
    if let Some(p) = &env.access.private_key {
        return ThrowawayKey::load(&env.resolve_path(p));
    }
    let path = state.join("id_ed25519");
    if path.exists() {
        return ThrowawayKey::load(&path);
    }
    let key = ThrowawayKey::generate(&format!("kiln-env-{}", env.name))?;
    crate::util::write_private(&path, key.private_openssh().as_bytes())?;
    Ok(key)
}

/// What apply did, for `--json`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ApplyReport {
    pub env: String,
    pub plan: Plan,
    pub steps: Vec<StepReport>,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct StepReport {
    pub slot: String,
    pub action: String,
    /// The VM that went into service.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// VMs taken out of service and destroyed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<String>,
    pub seconds: f64,
}

/// Carries a plan out against one provider.
pub(crate) struct Applier<'a> {
    pub env: &'a Environment,
    /// The K3s cluster's API, when the plan replaces or removes K3s nodes.
    pub cluster: Option<&'a crate::deploy::k3s::Cluster>,
    pub provider: &'a dyn Provider,
    pub images: &'a BTreeMap<String, RoleImage>,
    pub key: &'a ThrowawayKey,
    pub journal: &'a Journal,
    pub gates: &'a dyn Gates,
    pub opts: &'a ApplyOptions,
}

impl Applier<'_> {
    pub(super) fn say(&self, msg: &str) {
        if self.opts.say {
            eprintln!("[{}] {msg}", self.env.name);
        }
    }

    fn role(&self, name: &str) -> (&Role, &RoleImage) {
        let role = self
            .env
            .roles
            .iter()
            .find(|r| r.name == name)
            .expect("plan roles come from the environment");
        (role, &self.images[name])
    }

    fn slot<'r>(role: &'r Role, name: &str) -> &'r Slot {
        role.slots
            .iter()
            .find(|s| s.name == name)
            .expect("plan slots come from the environment")
    }

    /// Carry out every action of `plan` in order. `actual` is what the
    /// provider showed when the plan was made. Replacing or removing K3s
    /// servers and agents goes through the K3s-aware rollout (`rollout`).
    pub(crate) fn run(&self, plan: &Plan, actual: &[NodeVm]) -> Result<Vec<StepReport>> {
        refuse_unknown_removals(self.env, plan)?;
        self.k3s_preflight(plan)?;
        // A new cluster: no server VM exists anywhere, so the first server
        // created bootstraps it; every other server joins through the VIP.
        let mut cluster_exists = actual.iter().any(|vm| {
            self.env
                .slots()
                .any(|(r, s)| r.kind == RoleKind::Server && s.name == vm.slot)
        });
        let mut snapshot_taken = false;
        let mut steps = Vec::new();
        let mut actions = plan.actions.iter().peekable();
        while let Some(action) = actions.next() {
            crate::util::check_interrupted()?;
            let t = Instant::now();
            let k3s = rollout::touches_k3s(self.env, action);
            if k3s && !snapshot_taken && self.is_server_change(action) {
                self.etcd_snapshot(actual, &leaving(plan))?;
                snapshot_taken = true;
            }
            let (slot, vm, retired) = match action {
                Action::Keep { .. } => continue,
                Action::Create {
                    role,
                    slot,
                    generation,
                } => {
                    let (r, _) = self.role(role);
                    let new_cluster = r.kind == RoleKind::Server && !cluster_exists;
                    let vm = self.create_and_prove(role, slot, *generation, new_cluster)?;
                    if r.kind == RoleKind::Server {
                        cluster_exists = true;
                    }
                    (slot.clone(), Some(vm.name), Vec::new())
                }
                Action::Replace {
                    role,
                    slot,
                    old,
                    generation,
                    ..
                } if k3s && self.role(role).0.kind == RoleKind::Agent => {
                    // Agents: up to max_surge new ones first, then the old go.
                    let mut batch = vec![(role, slot, old, *generation)];
                    while batch.len() < self.env.rollout.max_surge as usize {
                        match actions.peek() {
                            Some(Action::Replace {
                                role,
                                slot,
                                old,
                                generation,
                                ..
                            }) if self.role(role).0.kind == RoleKind::Agent => {
                                batch.push((role, slot, old, *generation));
                                actions.next();
                            }
                            _ => break,
                        }
                    }
                    let mut made = Vec::new();
                    for (role, slot, old, generation) in &batch {
                        self.say(&format!(
                            "{slot}: replacing {} (surge {})",
                            old.name,
                            batch.len()
                        ));
                        made.push(self.k3s_bring_up(role, slot, *generation)?);
                    }
                    for (_, _, old, _) in &batch {
                        self.k3s_retire(old)?;
                    }
                    for ((_, slot, old, _), vm) in batch.iter().zip(&made).skip(1) {
                        steps.push(StepReport {
                            slot: (*slot).clone(),
                            action: "replace".into(),
                            vm: Some(vm.name.clone()),
                            retired: vec![old.name.clone()],
                            seconds: crate::util::round2(t.elapsed().as_secs_f64()),
                        });
                    }
                    (
                        slot.clone(),
                        Some(made[0].name.clone()),
                        vec![old.name.clone()],
                    )
                }
                Action::Replace {
                    role,
                    slot,
                    old,
                    generation,
                    reasons,
                } => {
                    self.say(&format!(
                        "{slot}: replacing {} ({})",
                        old.name,
                        reasons.join("; ")
                    ));
                    let vm = if k3s {
                        let vm = self.k3s_bring_up(role, slot, *generation)?;
                        self.k3s_retire(old)?;
                        vm
                    } else {
                        let vm = self.create_and_prove(role, slot, *generation, false)?;
                        self.retire(old)?;
                        vm
                    };
                    (slot.clone(), Some(vm.name), vec![old.name.clone()])
                }
                Action::Resume {
                    role,
                    slot,
                    old,
                    new,
                } => {
                    self.say(&format!("{slot}: resuming: proving {}", new.name));
                    if k3s {
                        self.k3s_bring_up(role, slot, new.generation)?;
                        for o in old {
                            self.k3s_retire(o)?;
                        }
                    } else {
                        // Create is idempotent: it finishes a half-made VM and
                        // starts a stopped one; then the gates prove it.
                        let (r, _) = self.role(role);
                        let first_server = r.kind == RoleKind::Server
                            && !actual.iter().any(|vm| {
                                vm.name != new.name
                                    && self.env.slots().any(|(r, s)| {
                                        r.kind == RoleKind::Server && s.name == vm.slot
                                    })
                            });
                        self.create_and_prove(role, slot, new.generation, first_server)
                            .with_context(|| {
                                if old.is_empty() {
                                    format!("{slot}: resuming {}", new.name)
                                } else {
                                    format!(
                                        "{slot}: the new generation was not proven; {} stays in service",
                                        old.iter().map(|v| v.name.as_str()).collect::<Vec<_>>().join(", ")
                                    )
                                }
                            })?;
                        for o in old {
                            self.retire(o)?;
                        }
                    }
                    (
                        slot.clone(),
                        Some(new.name.clone()),
                        old.iter().map(|v| v.name.clone()).collect(),
                    )
                }
                Action::Destroy { vm, reason } => {
                    self.say(&format!("destroying {} ({reason})", vm.name));
                    if k3s {
                        self.k3s_retire(vm)?;
                    } else {
                        self.journal.record(&vm.slot, "destroy", &vm.name, reason)?;
                        self.provider.destroy(vm)?;
                    }
                    (vm.slot.clone(), None, vec![vm.name.clone()])
                }
            };
            steps.push(StepReport {
                slot,
                action: action_name(action).into(),
                vm,
                retired,
                seconds: crate::util::round2(t.elapsed().as_secs_f64()),
            });
        }
        Ok(steps)
    }

    fn is_server_change(&self, a: &Action) -> bool {
        let slot = match a {
            Action::Replace { slot, .. } | Action::Resume { slot, .. } => slot,
            Action::Destroy { vm, .. } => &vm.slot,
            _ => return false,
        };
        self.env
            .slots()
            .any(|(r, s)| s.name == *slot && r.kind == RoleKind::Server)
    }

    /// Record a step in the journal before it is taken (a step boundary).
    pub(super) fn step(&self, slot: &str, step: &str, vm: &str, detail: &str) -> Result<()> {
        self.journal.record(slot, step, vm, detail)
    }

    /// Create a slot's generation and prove it; a VM that fails its gates is
    /// destroyed and the error says why (check output and console tail).
    pub(super) fn create_and_prove(
        &self,
        role: &str,
        slot: &str,
        generation: u32,
        new_cluster: bool,
    ) -> Result<NodeVm> {
        let (r, image) = self.role(role);
        let s = Self::slot(r, slot);
        let spec = new_vm(self.env, r, s, generation, image, self.key, new_cluster)?;
        self.say(&format!(
            "{slot}: creating {} at {}{}",
            spec.name,
            spec.address,
            if new_cluster { " (new cluster)" } else { "" }
        ));
        self.journal
            .record(slot, "create", &spec.name, &spec.address.to_string())?;
        let vm = self.provider.create(&spec)?;
        if let Err(e) = self.gates.prove(&vm) {
            self.journal
                .record(slot, "gate-failed", &vm.name, &format!("{e:#}"))?;
            let console = self.provider.console_tail(&vm);
            // A K3s node that registered is left in place: destroying its VM
            // would leave a Node (and an etcd member) without a VM.
            if r.kind != RoleKind::Lb {
                if let Some(c) = self.cluster {
                    if c.node(&vm.name)?.is_some() {
                        return Err(e.context(format!(
                            "{}: failed its gates after joining the cluster; left in place for inspection (nothing else touched)",
                            vm.name
                        )));
                    }
                }
            }
            self.provider.destroy(&vm)?;
            let mut e = e.context(format!("{}: failed its gates and was destroyed", vm.name));
            if let Some(c) = console {
                e = e.context(format!("console tail of {}:\n{c}", vm.name));
            }
            return Err(e);
        }
        self.journal.record(slot, "in-service", &vm.name, "")?;
        Ok(vm)
    }

    /// Take a VM out of service: a graceful stop first (keepalived sends
    /// priority 0 and the VIP moves at once), the environment's checks with
    /// it stopped, then destroy it.
    fn retire(&self, vm: &NodeVm) -> Result<()> {
        self.say(&format!("{}: retiring {}", vm.slot, vm.name));
        self.journal.record(&vm.slot, "retire", &vm.name, "")?;
        self.provider.stop(vm, self.opts.stop_grace)?;
        self.gates
            .env_checks()
            .with_context(|| format!("the environment is unhealthy after stopping {}", vm.name))?;
        self.provider.destroy(vm)?;
        self.journal.record(&vm.slot, "destroyed", &vm.name, "")?;
        Ok(())
    }
}

fn action_name(a: &Action) -> &'static str {
    match a {
        Action::Create { .. } => "create",
        Action::Keep { .. } => "keep",
        Action::Replace { .. } => "replace",
        Action::Resume { .. } => "resume",
        Action::Destroy { .. } => "destroy",
    }
}

/// A VM of a slot no longer in the file: its kind is unknown, so only an
/// explicit destroy of the whole environment may remove it.
pub(crate) fn refuse_unknown_removals(env: &Environment, plan: &Plan) -> Result<()> {
    for a in &plan.actions {
        if let Action::Destroy { vm, .. } = a {
            if !env.slots().any(|(_, s)| s.name == vm.slot) {
                bail!(
                    "the plan would remove `{}`, a slot no longer in {}; kiln does not remove cluster nodes outside `kiln env destroy`",
                    vm.slot,
                    env.path.display()
                );
            }
        }
    }
    Ok(())
}

/// The VMs the plan takes away (old generations and destroyed ones).
fn leaving(plan: &Plan) -> Vec<&str> {
    plan.actions
        .iter()
        .flat_map(|a| match a {
            Action::Replace { old, .. } => vec![old.name.as_str()],
            Action::Resume { old, .. } => old.iter().map(|o| o.name.as_str()).collect(),
            Action::Destroy { vm, .. } => vec![vm.name.as_str()],
            _ => vec![],
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::deploy::env::journal::Journal;
    use crate::deploy::env::plan;
    use std::cell::RefCell;
    use std::net::{SocketAddr, TcpStream};

    /// A provider that keeps its VMs in memory and can be "killed" before
    /// its n-th change, as `kill -9` would stop kiln between two steps.
    #[derive(Default)]
    pub(crate) struct FakeProvider {
        pub vms: RefCell<Vec<NodeVm>>,
        pub changes: RefCell<usize>,
        pub crash_before: Option<usize>,
        /// After every change: whether each slot that had a running VM still has one.
        pub gaps: RefCell<Vec<String>>,
    }

    impl FakeProvider {
        fn change(&self) -> Result<()> {
            let mut n = self.changes.borrow_mut();
            if Some(*n) == self.crash_before {
                bail!("killed");
            }
            *n += 1;
            Ok(())
        }

        fn watch(&self, before: &[NodeVm]) {
            let vms = self.vms.borrow();
            for b in before.iter().filter(|v| v.running) {
                if !vms.iter().any(|v| v.slot == b.slot && v.running) {
                    self.gaps.borrow_mut().push(b.slot.clone());
                }
            }
        }
    }

    impl Provider for FakeProvider {
        fn kind(&self) -> &'static str {
            "fake"
        }
        fn prepare(&self) -> Result<()> {
            Ok(())
        }
        fn list(&self) -> Result<Vec<NodeVm>> {
            Ok(self.vms.borrow().clone())
        }
        fn create(&self, vm: &NewVm) -> Result<NodeVm> {
            if let Some(v) = self.vms.borrow().iter().find(|v| v.name == vm.name) {
                return Ok(v.clone());
            }
            self.change()?;
            let shown = vm.shown(vm.name.clone(), true);
            self.vms.borrow_mut().push(shown.clone());
            Ok(shown)
        }
        fn connect(&self, addr: SocketAddr, _: Duration) -> Result<TcpStream> {
            bail!("the fake provider has no network ({addr})")
        }
        fn stop(&self, vm: &NodeVm, _: Duration) -> Result<()> {
            self.change()?;
            let before = self.vms.borrow().clone();
            for v in self
                .vms
                .borrow_mut()
                .iter_mut()
                .filter(|v| v.name == vm.name)
            {
                v.running = false;
            }
            self.watch(&before);
            Ok(())
        }
        fn destroy(&self, vm: &NodeVm) -> Result<()> {
            self.change()?;
            let before = self.vms.borrow().clone();
            self.vms.borrow_mut().retain(|v| v.name != vm.name);
            self.watch(&before);
            Ok(())
        }
        fn console_tail(&self, vm: &NodeVm) -> Option<String> {
            Some(format!("{} login:", vm.name))
        }
        fn teardown(&self) -> Result<()> {
            Ok(())
        }
    }

    /// What apply would ask the provider to make for `slot`'s `generation`.
    pub(crate) fn spec_for(
        env: &Environment,
        images: &BTreeMap<String, RoleImage>,
        key: &ThrowawayKey,
        slot: &str,
        generation: u32,
    ) -> NewVm {
        let (role, s) = env.slots().find(|(_, s)| s.name == slot).unwrap();
        new_vm(env, role, s, generation, &images[&role.name], key, false).unwrap()
    }

    /// Gates that pass except for the VM names listed; commands run on VMs
    /// are recorded (`vm: command`) and answer `ok`.
    #[derive(Default)]
    pub(crate) struct FakeGates {
        pub fail: Vec<String>,
        pub ran: RefCell<Vec<String>>,
    }

    impl Gates for FakeGates {
        fn prove(&self, vm: &NodeVm) -> Result<()> {
            if self.fail.contains(&vm.name) {
                bail!("check `haproxy and keepalived active` failed: inactive");
            }
            Ok(())
        }
        fn env_checks(&self) -> Result<()> {
            Ok(())
        }
        fn run(&self, vm: &NodeVm, command: &str) -> Result<String> {
            self.ran
                .borrow_mut()
                .push(format!("{}: {command}", vm.name));
            Ok("ok".into())
        }
        fn api_server_up(&self, _: &NodeVm, _: Duration) -> Result<()> {
            Ok(())
        }
    }

    /// A fake image directory whose manifest has `id`.
    pub(crate) fn image_at(dir: &Path, id: &str) -> PathBuf {
        use crate::image::manifest::*;
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("disk.qcow2"), b"not a disk").unwrap();
        let m = ImageManifest {
            name: "tiny".into(),
            version: "0.1.0".into(),
            id: id.into(),
            kiln_version: "0.1.0".into(),
            disk: DiskInfo {
                file: "disk.qcow2".into(),
                format: "qcow2".into(),
                sha256: id.into(),
                size: 10,
                virtual_size: 2 << 30,
                root_fs_uuid: "x".into(),
            },
            inputs: InputDigests::default(),
            source_date_epoch: 1,
            boot: BootInfo {
                uefi: true,
                secure_boot: true,
                bios: false,
                kernel: "k".into(),
                cmdline: String::new(),
                chain: vec![],
            },
            packages: Default::default(),
            hygiene: Default::default(),
            stages: vec![],
            roles: vec!["node".into()],
            validate: ValidateSpec::default(),
            lxc: None,
            sbom: None,
            added_files: vec![],
            validation: None,
        };
        m.save(dir).unwrap();
        dir.to_path_buf()
    }

    use std::path::Path;

    pub(crate) struct Lab {
        pub dir: tempfile::TempDir,
    }

    impl Lab {
        /// An environment of two LB slots and one server slot made from the
        /// tiny recipe, its images with ids `a…` (and `b…` ready).
        pub(crate) fn new() -> Lab {
            let dir = tempfile::tempdir().unwrap();
            image_at(&dir.path().join("images/a"), &"a".repeat(64));
            image_at(&dir.path().join("images/b"), &"b".repeat(64));
            let lab = Lab { dir };
            lab.write("a", "a");
            lab
        }

        pub(crate) fn write(&self, lb_image: &str, server_image: &str) {
            let recipe = concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/tiny.toml");
            let text = format!(
                r#"name = "qa"
[provider]
kind = "local"
[network]
cidr = "10.77.0.0/24"
gateway = "10.77.0.1"
vip = "10.77.0.10"
[roles.lb]
recipe = "{recipe}"
user_data_role = "node"
image = "images/{lb_image}"
cores = 1
memory = 512
[[roles.lb.slots]]
name = "lb-1"
addresses = ["10.77.0.11", "10.77.0.21"]
[[roles.lb.slots]]
name = "lb-2"
addresses = ["10.77.0.12", "10.77.0.22"]
[roles.server]
recipe = "{recipe}"
user_data_role = "node"
init_user_data_role = "node"
image = "images/{server_image}"
cores = 1
memory = 512
[[roles.server.slots]]
name = "server-1"
addresses = ["10.77.0.31", "10.77.0.41"]
"#
            );
            std::fs::write(self.dir.path().join("qa.toml"), text).unwrap();
        }

        pub(crate) fn env(&self) -> Environment {
            Environment::load(&self.dir.path().join("qa.toml")).unwrap()
        }

        /// One `kiln env apply`, as a fresh process would run it.
        pub(crate) fn apply(
            &self,
            provider: &FakeProvider,
            gates: &FakeGates,
        ) -> Result<Vec<StepReport>> {
            let env = self.env();
            let images = role_images(&env)?;
            let key = ThrowawayKey::generate("test").unwrap();
            let journal = Journal::open(&self.dir.path().join("state")).unwrap();
            let opts = ApplyOptions {
                say: false,
                ..ApplyOptions::default()
            };
            let actual = provider.list()?;
            let plan = plan::plan(&env.name, &desired(&env, &ids(&images))?, &actual);
            Applier {
                cluster: None,
                env: &env,
                provider,
                images: &images,
                key: &key,
                journal: &journal,
                gates,
                opts: &opts,
            }
            .run(&plan, &actual)
        }
    }

    /// Lab's image `a` made consistent (its id the sha256 of its disk, with
    /// SHA256SUMS) and the environment wanting images signed by `ci`'s key.
    fn lab_wanting_signatures() -> (Lab, PathBuf) {
        use crate::image::signature::tests::keypair;
        let lab = Lab::new();
        let dir = lab.dir.path().join("images/a");
        image_at(&dir, &crate::util::sha256_hex(b"not a disk"));
        ImageManifest::load(&dir).unwrap().write_sums(&dir).unwrap();
        let (key, line) = keypair(lab.dir.path(), "ci", "ci@example.org");
        std::fs::write(lab.dir.path().join("allowed_signers"), line).unwrap();
        let env = lab.dir.path().join("qa.toml");
        let text = std::fs::read_to_string(&env).unwrap();
        std::fs::write(
            &env,
            format!("{text}[verify]\nallowed_signers = \"allowed_signers\"\n"),
        )
        .unwrap();
        (lab, key)
    }

    #[test]
    fn an_unsigned_image_is_refused_before_anything_is_touched_when_signatures_are_wanted() {
        let (lab, _) = lab_wanting_signatures();
        let p = FakeProvider::default();
        let e = format!("{:#}", lab.apply(&p, &FakeGates::default()).unwrap_err());
        assert!(e.contains("role `lb`: "), "{e}");
        assert!(
            e.contains("images/a is not signed: it has no SHA256SUMS.sig"),
            "{e}"
        );
        assert_eq!(*p.changes.borrow(), 0);
        assert!(names(&p).is_empty());
    }

    #[test]
    fn a_signed_image_is_applied_when_signatures_are_wanted() {
        let (lab, key) = lab_wanting_signatures();
        crate::image::signature::sign(&lab.dir.path().join("images/a"), &key).unwrap();
        let p = FakeProvider::default();
        lab.apply(&p, &FakeGates::default()).unwrap();
        assert_eq!(
            names(&p),
            vec!["qa-lb-1-g0", "qa-lb-2-g0", "qa-server-1-g0"]
        );
    }

    fn names(p: &FakeProvider) -> Vec<String> {
        let mut v: Vec<String> = p.vms.borrow().iter().map(|v| v.name.clone()).collect();
        v.sort();
        v
    }

    #[test]
    fn an_empty_environment_is_bootstrapped_lbs_first() {
        let lab = Lab::new();
        let p = FakeProvider::default();
        let steps = lab.apply(&p, &FakeGates::default()).unwrap();
        let order: Vec<_> = steps.iter().map(|s| s.slot.as_str()).collect();
        assert_eq!(order, vec!["lb-1", "lb-2", "server-1"]);
        assert_eq!(
            names(&p),
            vec!["qa-lb-1-g0", "qa-lb-2-g0", "qa-server-1-g0"]
        );
        // Applying again changes nothing.
        assert!(lab.apply(&p, &FakeGates::default()).unwrap().is_empty());
    }

    #[test]
    fn a_new_lb_image_replaces_each_lb_blue_green_at_the_next_pool_address() {
        let lab = Lab::new();
        let p = FakeProvider::default();
        lab.apply(&p, &FakeGates::default()).unwrap();
        lab.write("b", "a");
        let steps = lab.apply(&p, &FakeGates::default()).unwrap();
        assert_eq!(steps.len(), 2);
        assert_eq!(steps[0].vm.as_deref(), Some("qa-lb-1-g1"));
        assert_eq!(steps[0].retired, vec!["qa-lb-1-g0".to_string()]);
        assert_eq!(
            names(&p),
            vec!["qa-lb-1-g1", "qa-lb-2-g1", "qa-server-1-g0"]
        );
        let lb1 = p
            .vms
            .borrow()
            .iter()
            .find(|v| v.slot == "lb-1")
            .cloned()
            .unwrap();
        assert_eq!(lb1.address.to_string(), "10.77.0.21");
        assert!(
            p.gaps.borrow().is_empty(),
            "a slot had no running VM: {:?}",
            p.gaps.borrow()
        );
    }

    #[test]
    fn a_failed_gate_destroys_the_new_vm_and_leaves_the_old_in_service() {
        let lab = Lab::new();
        let p = FakeProvider::default();
        lab.apply(&p, &FakeGates::default()).unwrap();
        lab.write("b", "a");
        let gates = FakeGates {
            fail: vec!["qa-lb-1-g1".into()],
            ..Default::default()
        };
        let e = format!("{:#}", lab.apply(&p, &gates).unwrap_err());
        assert!(
            e.contains("qa-lb-1-g1: failed its gates and was destroyed"),
            "{e}"
        );
        assert!(e.contains("haproxy and keepalived active"), "{e}");
        assert!(e.contains("qa-lb-1-g1 login:"), "no console tail: {e}");
        assert_eq!(
            names(&p),
            vec!["qa-lb-1-g0", "qa-lb-2-g0", "qa-server-1-g0"]
        );
    }

    #[test]
    fn a_changed_server_image_without_the_clusters_api_is_refused_before_anything_is_touched() {
        let lab = Lab::new();
        let p = FakeProvider::default();
        lab.apply(&p, &FakeGates::default()).unwrap();
        lab.write("b", "b");
        let e = format!("{:#}", lab.apply(&p, &FakeGates::default()).unwrap_err());
        assert!(
            e.contains("replacing K3s nodes needs the cluster's API"),
            "{e}"
        );
        assert_eq!(
            names(&p),
            vec!["qa-lb-1-g0", "qa-lb-2-g0", "qa-server-1-g0"]
        );
    }

    #[test]
    fn killed_at_any_step_of_a_replacement_a_second_apply_completes_it() {
        // Count the changes one uninterrupted replacement makes.
        let lab = Lab::new();
        let p = FakeProvider::default();
        lab.apply(&p, &FakeGates::default()).unwrap();
        let base = *p.changes.borrow();
        lab.write("b", "a");
        lab.apply(&p, &FakeGates::default()).unwrap();
        let total = *p.changes.borrow() - base;
        let want = names(&p);
        assert!(total >= 6, "{total}");

        for k in 0..total {
            let lab = Lab::new();
            let mut p = FakeProvider::default();
            lab.apply(&p, &FakeGates::default()).unwrap();
            lab.write("b", "a");
            p.crash_before = Some(*p.changes.borrow() + k);
            let e = format!("{:#}", lab.apply(&p, &FakeGates::default()).unwrap_err());
            assert!(e.contains("killed"), "{e}");
            p.crash_before = None;
            lab.apply(&p, &FakeGates::default())
                .unwrap_or_else(|e| panic!("re-apply after a kill before change {k}: {e:#}"));
            assert_eq!(names(&p), want, "after a kill before change {k}");
            assert!(
                p.gaps.borrow().is_empty(),
                "kill before change {k}: a slot had no running VM"
            );
            let mut seen = std::collections::BTreeSet::new();
            assert!(p.vms.borrow().iter().all(|v| seen.insert(v.name.clone())));
        }
    }
}
