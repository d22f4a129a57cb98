//! Environments as data: one TOML file (`envs/qa.toml`) declares a whole
//! cluster — provider, network, VIP, roles with their images, sizes, slots and values.
//!
//! A slot (`lb-1`, `server-1`, `agent-1`) is a place in the cluster that one
//! VM fills at a time. Each slot has a pool of addresses; generation `g` of a
//! slot takes `addresses[g % len]`, so a blue-green replacement gets an
//! address its predecessor does not hold, and the LB (which lists every pool
//! address) needs no change. Secrets are only ever references (`env` or
//! `file`); they are resolved when user-data is rendered and never written to
//! VM config, tags, descriptions, the journal or output.

use anyhow::{Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use toml::Spanned;

use crate::image::values::{Pos, RawTable, Values};
use crate::util::diagnostics::{FileError, SourceFile};

/// What a role is to the cluster; it decides the order and the rollout rules.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RoleKind {
    /// HAProxy + Keepalived in front of the API servers (no cluster state).
    Lb,
    /// K3s server (embedded etcd).
    Server,
    /// K3s agent.
    Agent,
}

/// A parsed, checked environment file.
#[derive(Debug, Clone)]
pub(crate) struct Environment {
    pub name: String,
    /// The file it came from (relative paths in it are relative to its directory).
    pub path: PathBuf,
    pub provider: ProviderSpec,
    pub network: Network,
    pub access: Access,
    pub secrets: BTreeMap<String, SecretRef>,
    /// Roles in bootstrap order.
    pub roles: Vec<Role>,
    pub checks: Vec<EnvCheck>,
    pub rollout: Rollout,
    /// `[verify] allowed_signers`: every role's image must carry a
    /// SHA256SUMS.sig that verifies with a key of this file (made absolute).
    pub allowed_signers: Option<PathBuf>,
}

/// How K3s servers and agents are replaced (issue 14's rollout).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Rollout {
    /// The cluster's kubeconfig, by reference: a file, or a variable
    /// holding its path (as KUBECONFIG does).
    pub kubeconfig: Option<SecretRef>,
    /// Take an etcd snapshot on a healthy server before the first server is touched.
    pub snapshot: bool,
    /// New agents made at a time before old ones go.
    pub max_surge: u32,
    /// Seconds a drain may take (evictions refused by a PodDisruptionBudget are retried).
    pub drain_timeout: u64,
    /// Seconds a new node may take to be Ready (and, for a server, an etcd voter).
    pub join_timeout: u64,
    /// What may happen to local volumes of a replaced node, per StorageClass.
    pub storage: BTreeMap<String, VolumePolicy>,
    /// Checks that must pass before the next node is touched.
    pub gates: Vec<UserGate>,
}

impl Default for Rollout {
    fn default() -> Self {
        Rollout {
            kubeconfig: None,
            snapshot: true,
            max_surge: 1,
            drain_timeout: 600,
            join_timeout: 900,
            storage: BTreeMap::new(),
            gates: Vec::new(),
        }
    }
}

/// A StorageClass's policy for volumes on a node that is replaced.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct VolumePolicy {
    /// `recreate`: the workload accepts an empty volume on another node.
    #[serde(default)]
    pub policy: Option<String>,
    /// A command kiln runs (on this host) before the node is drained, with
    /// KILN_PVC (`namespace/name`), KILN_PV and KILN_NODE set: a backup.
    #[serde(default)]
    pub before: Option<String>,
    /// Run after the new node is in service: the restore.
    #[serde(default)]
    pub after: Option<String>,
}

/// A user gate between nodes: a command over SSH on the new node, or on this host.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UserGate {
    pub name: String,
    /// Run on the new node over SSH.
    #[serde(default)]
    pub ssh: Option<String>,
    /// Run on this host, with KILN_ENV, KILN_NODE and KILN_NODE_ADDRESS set.
    #[serde(default)]
    pub command: Option<String>,
    /// A Kubernetes Job (a batch/v1 manifest, YAML or JSON, relative to the
    /// environment file) run in the cluster; it must complete.
    #[serde(default)]
    pub job: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ProviderSpec {
    /// Real QEMU VMs on this host, in a network namespace kiln creates.
    Local,
    /// A Proxmox VE target from kiln.toml (or `KILN_PVE_*`).
    Proxmox { target: Option<String> },
}

#[derive(Debug, Clone)]
pub struct Network {
    /// Proxmox bridge (e.g. `vmbr0`); the local provider names its own bridge.
    pub bridge: String,
    pub cidr: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub dns: Vec<Ipv4Addr>,
    pub vip: Ipv4Addr,
}

impl Network {
    pub fn contains(&self, a: Ipv4Addr) -> bool {
        let mask = if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        };
        u32::from(a) & mask == u32::from(self.cidr) & mask
    }
}

/// How kiln reaches new VMs over SSH for its gates.
#[derive(Debug, Clone)]
pub(crate) struct Access {
    pub user: String,
    /// An OpenSSH private key; without one kiln keeps a key of its own in
    /// the environment's state directory.
    pub private_key: Option<PathBuf>,
}

/// A secret given by reference, never inline.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum SecretRef {
    Env(String),
    File(PathBuf),
}

impl<'de> Deserialize<'de> for SecretRef {
    /// Only `{ env = "VAR" }` or `{ file = "PATH" }`; anything else is refused
    /// without echoing it (it may be the secret itself).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = toml::Value::deserialize(d)?;
        let refuse = || {
            serde::de::Error::custom(
                "a secret must be a reference, `{ env = \"VAR\" }` or `{ file = \"PATH\" }`, never the secret itself",
            )
        };
        let toml::Value::Table(t) = v else {
            return Err(refuse());
        };
        match (t.len(), t.get("env"), t.get("file")) {
            (1, Some(toml::Value::String(var)), None) => Ok(SecretRef::Env(var.clone())),
            (1, None, Some(toml::Value::String(p))) => Ok(SecretRef::File(PathBuf::from(p))),
            _ => Err(refuse()),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Role {
    /// The role's key in the file (`lb`, `server`, `agent`, or any name with a `kind`).
    pub name: String,
    pub kind: RoleKind,
    /// The recipe the image is built from (relative to the repository root, i.e. the env file's parent's parent, or absolute).
    pub recipe: PathBuf,
    /// The cloud-init role the nodes play (default: per kind, `lb`, `server-join`, `agent`).
    pub user_data_role: String,
    /// The cloud-init role of the server that bootstraps a new cluster
    /// (default `server-init`; it gets `new_cluster = true`).
    pub init_user_data_role: String,
    /// Image directory (`images/<name>/<version>`).
    pub image: PathBuf,
    /// The image id the environment pins: apply refuses another, rebuild proves it.
    pub image_id: Option<String>,
    pub cores: u32,
    pub memory_mib: u32,
    pub disk_gib: Option<u32>,
    /// Values every slot of the role gets (before its own).
    pub values: Values,
    /// Image checks (by name) not to run as gates: those written for the
    /// image's validation values (e.g. the validation boot's backend addresses).
    pub skip_checks: Vec<String>,
    pub slots: Vec<Slot>,
}

#[derive(Debug, Clone)]
pub(crate) struct Slot {
    pub name: String,
    /// The Proxmox node it runs on (ignored by the local provider).
    pub node: Option<String>,
    pub addresses: Vec<Ipv4Addr>,
    pub values: Values,
}

impl Slot {
    /// The address generation `g` takes.
    pub(crate) fn address(&self, generation: u32) -> Ipv4Addr {
        self.addresses[generation as usize % self.addresses.len()]
    }
}

/// A check of the whole environment, run from inside its network after every
/// step (e.g. the VIP answers on the API port).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EnvCheck {
    pub name: String,
    /// `HOST:PORT` that must accept a TCP connection; `vip` stands for the VIP.
    pub tcp: String,
    #[serde(default = "default_check_timeout")]
    pub timeout: u64,
}

fn default_check_timeout() -> u64 {
    10
}

// ---------------------------------------------------------------------------
// The file format.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvFile {
    name: Spanned<String>,
    provider: ProviderFile,
    network: NetworkFile,
    #[serde(default)]
    access: Option<AccessFile>,
    #[serde(default)]
    secrets: BTreeMap<String, Spanned<SecretRef>>,
    roles: BTreeMap<String, Spanned<RoleFile>>,
    #[serde(default)]
    checks: Vec<EnvCheck>,
    #[serde(default)]
    kubernetes: Option<KubernetesFile>,
    #[serde(default)]
    rollout: Option<RolloutFile>,
    #[serde(default)]
    storage: BTreeMap<String, Spanned<VolumePolicy>>,
    #[serde(default)]
    gates: Vec<Spanned<UserGate>>,
    #[serde(default)]
    verify: Option<VerifyFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KubernetesFile {
    kubeconfig: Spanned<SecretRef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RolloutFile {
    #[serde(default)]
    snapshot: Option<bool>,
    #[serde(default)]
    max_surge: Option<Spanned<u32>>,
    #[serde(default)]
    drain_timeout: Option<u64>,
    #[serde(default)]
    join_timeout: Option<u64>,
}

/// `[verify]`: what apply demands of images before it touches anything.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyFile {
    /// An ssh-keygen(1) allowed signers file (relative to the environment file).
    allowed_signers: Spanned<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderFile {
    kind: Spanned<String>,
    #[serde(default)]
    target: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkFile {
    #[serde(default)]
    bridge: Option<String>,
    cidr: Spanned<String>,
    gateway: Spanned<Ipv4Addr>,
    #[serde(default)]
    dns: Vec<Ipv4Addr>,
    vip: Spanned<Ipv4Addr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccessFile {
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    private_key: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleFile {
    #[serde(default)]
    kind: Option<RoleKind>,
    recipe: PathBuf,
    #[serde(default)]
    user_data_role: Option<String>,
    #[serde(default)]
    init_user_data_role: Option<String>,
    image: Spanned<PathBuf>,
    #[serde(default)]
    image_id: Option<Spanned<String>>,
    cores: u32,
    memory: u32,
    #[serde(default)]
    disk: Option<u32>,
    #[serde(default)]
    values: Option<RawTable>,
    #[serde(default)]
    skip_checks: Vec<String>,
    slots: Vec<Spanned<SlotFile>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SlotFile {
    name: Spanned<String>,
    #[serde(default)]
    node: Option<String>,
    addresses: Spanned<Vec<Ipv4Addr>>,
    #[serde(default)]
    values: Option<RawTable>,
}

/// `[kubernetes]`, `[rollout]`, `[storage.<class>]` and `[[gates]]`, checked.
fn rollout(
    src: &SourceFile,
    k: &Option<KubernetesFile>,
    r: &Option<RolloutFile>,
    storage: &BTreeMap<String, Spanned<VolumePolicy>>,
    gates: &[Spanned<UserGate>],
) -> Result<Rollout, FileError> {
    let d = Rollout::default();
    let mut out = Rollout {
        kubeconfig: k.as_ref().map(|k| k.kubeconfig.get_ref().clone()),
        ..d.clone()
    };
    if let Some(r) = r {
        out.snapshot = r.snapshot.unwrap_or(d.snapshot);
        out.drain_timeout = r.drain_timeout.unwrap_or(d.drain_timeout);
        out.join_timeout = r.join_timeout.unwrap_or(d.join_timeout);
        if let Some(m) = &r.max_surge {
            if *m.get_ref() == 0 {
                return Err(src.error_at(m.span(), String::from("max_surge must be at least 1")));
            }
            out.max_surge = *m.get_ref();
        }
    }
    for (class, p) in storage {
        let v = p.get_ref();
        match (&v.policy, &v.before, &v.after) {
            (Some(x), None, None) if x == "recreate" => {}
            (Some(x), _, _) if x != "recreate" => {
                return Err(src.error_at(
                    p.span(),
                    format!("storage `{class}`: policy `{x}` is not `recreate` (or give `before`/`after` hooks)"),
                ))
            }
            (None, Some(_), _) | (None, _, Some(_)) => {}
            _ => {
                return Err(src.error_at(
                    p.span(),
                    format!("storage `{class}`: say `policy = \"recreate\"` or give `before` and `after` hooks, not both"),
                ))
            }
        }
        out.storage.insert(class.clone(), v.clone());
    }
    for g in gates {
        let v = g.get_ref();
        if [v.ssh.is_some(), v.command.is_some(), v.job.is_some()]
            .iter()
            .filter(|x| **x)
            .count()
            != 1
        {
            return Err(src.error_at(
                g.span(),
                format!(
                    "gate `{}`: give exactly one of `ssh`, `command` or `job`",
                    v.name
                ),
            ));
        }
        out.gates.push(v.clone());
    }
    Ok(out)
}

/// Names become VM names, host names and tags: lowercase letters, digits, `-`.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 40
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

impl Environment {
    /// Load and check an environment file; every problem is one line naming
    /// the file and line.
    pub(crate) fn load(path: &Path) -> Result<Environment> {
        let src = SourceFile::read(path)?;
        let file: EnvFile = src.parse_toml()?;
        Ok(Self::from_file(&src, file)?)
    }

    fn from_file(src: &SourceFile, f: EnvFile) -> Result<Environment, FileError> {
        let err = |span: std::ops::Range<usize>, msg: String| src.error_at(span, msg);
        if !is_name(f.name.get_ref()) {
            return Err(err(
                f.name.span(),
                format!(
                    "name `{}` must be lowercase letters, digits and `-` (at most 40): it becomes VM names and tags",
                    f.name.get_ref()
                ),
            ));
        }
        let provider = match f.provider.kind.get_ref().as_str() {
            "local" => ProviderSpec::Local,
            "proxmox" => ProviderSpec::Proxmox {
                target: f.provider.target.clone(),
            },
            other => {
                return Err(err(
                    f.provider.kind.span(),
                    format!("provider kind `{other}` is not `local` or `proxmox`"),
                ))
            }
        };
        let network = network(src, &f.network)?;
        let mut secrets = BTreeMap::new();
        for (name, r) in &f.secrets {
            if let SecretRef::Env(v) = r.get_ref() {
                if v.is_empty() {
                    return Err(err(
                        r.span(),
                        format!("secret `{name}`: empty variable name"),
                    ));
                }
            }
            secrets.insert(name.clone(), r.get_ref().clone());
        }

        let mut roles = Vec::new();
        let mut all_addresses: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
        all_addresses.insert(network.vip, "the VIP".into());
        all_addresses.insert(network.gateway, "the gateway".into());
        let mut slot_names: BTreeMap<String, String> = BTreeMap::new();
        for (name, r) in &f.roles {
            let span = r.span();
            let r = r.get_ref();
            let kind = match (r.kind, name.as_str()) {
                (Some(k), _) => k,
                (None, "lb") => RoleKind::Lb,
                (None, "server") => RoleKind::Server,
                (None, "agent") => RoleKind::Agent,
                (None, _) => {
                    return Err(err(
                        span,
                        format!("role `{name}`: say its `kind` (lb, server or agent)"),
                    ))
                }
            };
            if r.slots.is_empty() {
                return Err(err(span, format!("role `{name}` has no slots")));
            }
            if let Some(id) = &r.image_id {
                if !crate::image::recipe::is_sha256(id.get_ref()) {
                    return Err(err(
                        id.span(),
                        format!("role `{name}`: image_id must be the image's sha256 (64 lowercase hex digits)"),
                    ));
                }
            }
            if r.cores == 0 || r.memory < 256 {
                return Err(err(
                    span,
                    format!(
                        "role `{name}`: cores must be at least 1 and memory (MiB) at least 256"
                    ),
                ));
            }
            let mut slots = Vec::new();
            for s in &r.slots {
                let s_span = s.span();
                let s = s.get_ref();
                let sname = s.name.get_ref();
                if !is_name(sname) {
                    return Err(err(
                        s.name.span(),
                        format!("slot name `{sname}` must be lowercase letters, digits and `-`"),
                    ));
                }
                if let Some(prev) = slot_names.insert(sname.clone(), name.clone()) {
                    return Err(err(
                        s.name.span(),
                        format!("slot `{sname}` is declared twice (also in role `{prev}`)"),
                    ));
                }
                let addrs = s.addresses.get_ref();
                if addrs.len() < 2 {
                    return Err(err(
                        s.addresses.span(),
                        format!("slot `{sname}` needs at least two addresses: a replacement is created beside the VM it replaces"),
                    ));
                }
                for a in addrs {
                    if !network.contains(*a) {
                        return Err(err(
                            s.addresses.span(),
                            format!(
                                "slot `{sname}`: address {a} is outside {}/{}",
                                network.cidr, network.prefix
                            ),
                        ));
                    }
                    if let Some(owner) = all_addresses.insert(*a, format!("slot `{sname}`")) {
                        return Err(err(
                            s.addresses.span(),
                            format!("slot `{sname}`: address {a} is already {owner}'s"),
                        ));
                    }
                }
                if matches!(provider, ProviderSpec::Proxmox { .. }) && s.node.is_none() {
                    return Err(err(
                        s_span,
                        format!("slot `{sname}`: say which Proxmox `node` it runs on"),
                    ));
                }
                slots.push(Slot {
                    name: sname.clone(),
                    node: s.node.clone(),
                    addresses: addrs.clone(),
                    values: located(src, s.values.as_ref()),
                });
            }
            roles.push(Role {
                name: name.clone(),
                kind,
                recipe: r.recipe.clone(),
                user_data_role: r.user_data_role.clone().unwrap_or_else(|| {
                    match kind {
                        RoleKind::Lb => "lb",
                        RoleKind::Server => "server-join",
                        RoleKind::Agent => "agent",
                    }
                    .to_string()
                }),
                init_user_data_role: r
                    .init_user_data_role
                    .clone()
                    .unwrap_or_else(|| "server-init".into()),
                image: r.image.get_ref().clone(),
                image_id: r.image_id.as_ref().map(|s| s.get_ref().clone()),
                cores: r.cores,
                memory_mib: r.memory,
                disk_gib: r.disk,
                values: located(src, r.values.as_ref()),
                skip_checks: r.skip_checks.clone(),
                slots,
            });
        }
        roles.sort_by_key(|r| (r.kind, r.name.clone()));
        let mut allowed_signers = None;
        if let Some(v) = &f.verify {
            let p = v.allowed_signers.get_ref();
            let abs = resolve_beside(&src.path, p);
            if !abs.is_file() {
                return Err(err(
                    v.allowed_signers.span(),
                    format!(
                        "allowed_signers `{}` does not exist (it is relative to this file)",
                        p.display()
                    ),
                ));
            }
            allowed_signers = Some(abs);
        }
        let access = f.access.as_ref();
        Ok(Environment {
            name: f.name.get_ref().clone(),
            path: src.path.clone(),
            provider,
            network,
            access: Access {
                user: access
                    .and_then(|a| a.user.clone())
                    .unwrap_or_else(|| "debian".into()),
                private_key: access.and_then(|a| a.private_key.clone()),
            },
            secrets,
            roles,
            checks: f.checks,
            rollout: rollout(src, &f.kubernetes, &f.rollout, &f.storage, &f.gates)?,
            allowed_signers,
        })
    }

    /// A path written in the environment file, made absolute: relative to
    /// the directory the environment file is in.
    pub(crate) fn resolve_path(&self, p: &Path) -> PathBuf {
        resolve_beside(&self.path, p)
    }

    /// Every slot with its role, in bootstrap order.
    pub(crate) fn slots(&self) -> impl Iterator<Item = (&Role, &Slot)> {
        self.roles
            .iter()
            .flat_map(|r| r.slots.iter().map(move |s| (r, s)))
    }

    /// The value of a secret, read now. The error names the reference, never a value.
    /// The kubeconfig file the environment names (`[kubernetes] kubeconfig`).
    pub(crate) fn kubeconfig(&self) -> Result<PathBuf> {
        match &self.rollout.kubeconfig {
            None => anyhow::bail!(
                "{}: replacing K3s nodes needs the cluster's API: add `[kubernetes] kubeconfig = {{ file = \"PATH\" }}` (or `{{ env = \"VAR\" }}` naming a variable that holds its path)",
                self.path.display()
            ),
            Some(SecretRef::File(p)) => Ok(self.resolve_path(p)),
            Some(SecretRef::Env(var)) => std::env::var_os(var)
                .map(PathBuf::from)
                .with_context(|| format!("kubeconfig: environment variable {var} is not set")),
        }
    }

    pub(crate) fn secret(&self, name: &str) -> Result<String> {
        let r = self
            .secrets
            .get(name)
            .with_context(|| format!("{}: no secret `{name}` in [secrets]", self.path.display()))?;
        match r {
            SecretRef::Env(var) => std::env::var(var)
                .with_context(|| format!("secret `{name}`: environment variable {var} is not set")),
            SecretRef::File(p) => {
                let p = self.resolve_path(p);
                let text = std::fs::read_to_string(&p)
                    .with_context(|| format!("secret `{name}`: cannot read {}", p.display()))?;
                Ok(text.trim_end_matches('\n').to_string())
            }
        }
    }
}

/// `p` as written in `file`: relative to the directory `file` is in.
fn resolve_beside(file: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        return p.to_path_buf();
    }
    file.parent()
        .map(|d| d.join(p))
        .unwrap_or_else(|| p.to_path_buf())
}

/// Inline values with their positions in the environment file.
fn located(src: &SourceFile, raw: Option<&RawTable>) -> Values {
    Values {
        entries: raw
            .map(|r| r.locate(&src.path, &src.text))
            .unwrap_or_default(),
        origin: Pos {
            file: src.path.clone(),
            line_col: None,
        },
    }
}

fn network(src: &SourceFile, n: &NetworkFile) -> Result<Network, FileError> {
    let (addr, prefix) = n.cidr.get_ref().split_once('/').ok_or_else(|| {
        src.error_at(n.cidr.span(), "cidr must look like 10.0.0.0/24".to_string())
    })?;
    let cidr: Ipv4Addr = addr
        .parse()
        .map_err(|_| src.error_at(n.cidr.span(), format!("`{addr}` is not an IPv4 address")))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| (8..=30).contains(p))
        .ok_or_else(|| {
            src.error_at(
                n.cidr.span(),
                "the prefix length must be 8 to 30".to_string(),
            )
        })?;
    let net = Network {
        bridge: n.bridge.clone().unwrap_or_else(|| "vmbr0".into()),
        cidr,
        prefix,
        gateway: *n.gateway.get_ref(),
        dns: n.dns.clone(),
        vip: *n.vip.get_ref(),
    };
    for (what, a, span) in [
        ("gateway", net.gateway, n.gateway.span()),
        ("vip", net.vip, n.vip.span()),
    ] {
        if !net.contains(a) {
            return Err(src.error_at(span, format!("{what} {a} is outside {}", n.cidr.get_ref())));
        }
    }
    if net.gateway == net.vip {
        return Err(src.error_at(n.vip.span(), "the VIP cannot be the gateway".to_string()));
    }
    Ok(net)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const QA: &str = r#"
name = "qa"

[provider]
kind = "local"

[network]
cidr = "10.77.0.0/24"
gateway = "10.77.0.1"
dns = ["10.77.0.1"]
vip = "10.77.0.10"

[secrets]
token = { env = "KILN_QA_TOKEN" }

[roles.lb]
recipe = "../recipes/lb.toml"
image = "../images/lb/0.1.0"
cores = 1
memory = 1024
values = { virtual_router_id = 51 }

[[roles.lb.slots]]
name = "lb-1"
addresses = ["10.77.0.11", "10.77.0.21"]
values = { priority = 150 }

[[roles.lb.slots]]
name = "lb-2"
addresses = ["10.77.0.12", "10.77.0.22"]
values = { priority = 100 }
"#;

    pub(crate) fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("qa.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    fn qa() -> String {
        QA.to_string()
    }

    fn load_err(text: &str) -> String {
        let d = tempfile::tempdir().unwrap();
        format!(
            "{:#}",
            Environment::load(&write(d.path(), text)).unwrap_err()
        )
    }

    #[test]
    fn an_environment_file_loads_with_roles_in_bootstrap_order() {
        let d = tempfile::tempdir().unwrap();
        let text = qa().replace(
            "[roles.lb]",
            "[roles.agent]\nrecipe = \"r.toml\"\nimage = \"i\"\ncores = 1\nmemory = 512\n[[roles.agent.slots]]\nname = \"agent-1\"\naddresses = [\"10.77.0.31\", \"10.77.0.41\"]\n\n[roles.lb]",
        );
        let env = Environment::load(&write(d.path(), &text)).unwrap();
        assert_eq!(env.name, "qa");
        assert_eq!(env.provider, ProviderSpec::Local);
        let kinds: Vec<_> = env.roles.iter().map(|r| r.kind).collect();
        assert_eq!(kinds, vec![RoleKind::Lb, RoleKind::Agent]);
        assert_eq!(env.roles[1].user_data_role, "agent");
        let lb1 = &env.roles[0].slots[0];
        assert_eq!(lb1.address(0), "10.77.0.11".parse::<Ipv4Addr>().unwrap());
        assert_eq!(lb1.address(1), "10.77.0.21".parse::<Ipv4Addr>().unwrap());
        assert_eq!(lb1.address(2), lb1.address(0));
    }

    #[test]
    fn an_unknown_key_is_refused_at_its_line() {
        let e = load_err(&qa().replace("cores = 1", "cores = 1\nmemroy = 3"));
        assert!(
            e.contains("qa.toml:20:1: unknown key `memroy` (did you mean `memory`?)"),
            "{e}"
        );
    }

    #[test]
    fn a_slot_with_one_address_is_refused_because_replacement_needs_a_second() {
        let e = load_err(&qa().replace(r#"["10.77.0.11", "10.77.0.21"]"#, r#"["10.77.0.11"]"#));
        assert!(
            e.contains("qa.toml:25:13:") && e.contains("at least two addresses"),
            "{e}"
        );
    }

    #[test]
    fn an_address_used_twice_or_outside_the_network_is_refused() {
        let e = load_err(&qa().replace("10.77.0.22", "10.77.0.11"));
        assert!(e.contains("already slot `lb-1`'s"), "{e}");
        let e = load_err(&qa().replace("10.77.0.22", "10.78.0.22"));
        assert!(e.contains("outside 10.77.0.0/24"), "{e}");
        let e = load_err(&qa().replace("10.77.0.22", "10.77.0.10"));
        assert!(e.contains("already the VIP's"), "{e}");
    }

    #[test]
    fn verify_allowed_signers_must_exist_beside_the_file() {
        let e = load_err(&format!(
            "{}\n[verify]\nallowed_signers = \"keys/nope\"\n",
            qa()
        ));
        assert!(
            e.contains("qa.toml:34:19: allowed_signers `keys/nope` does not exist"),
            "{e}"
        );
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("signers"), "").unwrap();
        let text = format!("{}\n[verify]\nallowed_signers = \"signers\"\n", qa());
        let env = Environment::load(&write(d.path(), &text)).unwrap();
        assert_eq!(env.allowed_signers, Some(d.path().join("signers")));
        let e = load_err(&format!("{}\n[verify]\nallowed_signer = \"x\"\n", qa()));
        assert!(e.contains("unknown key `allowed_signer`"), "{e}");
    }

    #[test]
    fn proxmox_slots_must_name_their_node() {
        let e = load_err(&qa().replace("kind = \"local\"", "kind = \"proxmox\"\ntarget = \"lab\""));
        assert!(e.contains("say which Proxmox `node`"), "{e}");
    }

    #[test]
    fn secrets_are_references_only() {
        let e =
            load_err(&qa().replace("token = { env = \"KILN_QA_TOKEN\" }", "token = \"s3cr3t\""));
        assert!(
            e.contains("qa.toml:14:9: a secret must be a reference"),
            "{e}"
        );
        assert!(!e.contains("s3cr3t"), "the secret is echoed: {e}");
    }

    #[test]
    fn a_secret_is_read_from_its_file_or_variable_when_needed() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("tok"), "abc\n").unwrap();
        let text = qa().replace(
            "token = { env = \"KILN_QA_TOKEN\" }",
            "token = { file = \"tok\" }\nmissing = { env = \"KILN_TEST_NEVER_SET_1234\" }",
        );
        let env = Environment::load(&write(d.path(), &text)).unwrap();
        assert_eq!(env.secret("token").unwrap(), "abc");
        let e = format!("{:#}", env.secret("missing").unwrap_err());
        assert!(e.contains("KILN_TEST_NEVER_SET_1234 is not set"), "{e}");
    }

    #[test]
    fn the_shipped_environments_load_with_the_users_cluster_shapes() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for (file, servers, agents) in [("envs/prod.toml", 3, 3), ("envs/qa.toml", 1, 2)] {
            let env = Environment::load(&root.join(file)).unwrap();
            let count = |k: RoleKind| env.slots().filter(|(r, _)| r.kind == k).count();
            assert_eq!(
                (
                    count(RoleKind::Lb),
                    count(RoleKind::Server),
                    count(RoleKind::Agent)
                ),
                (3, servers, agents),
                "{file}"
            );
            assert!(
                matches!(env.provider, ProviderSpec::Proxmox { .. }),
                "{file}"
            );
        }
    }
}
