//! Every verb's command-line arguments, in one place: clap parses into these,
//! and the verbs in `cli` turn them into the library's option structs.

use std::path::PathBuf;

use crate::deploy::publish::Via;
use crate::util::term::ColorWhen;
use crate::validate::efivars::SecureBootKeys;
use crate::validate::{Accel, OVMF_CODE, OVMF_VARS};

/// Flags every verb takes.
#[derive(clap::Args, Debug, Clone)]
pub struct GlobalArgs {
    /// Say less: no progress bars, no informational lines on stderr
    /// (results, warnings and errors still print).
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Say more where there is more: the host-tool command lines kiln runs.
    #[arg(short, long, global = true)]
    pub verbose: bool,
    /// Color stderr: auto (a terminal, unless NO_COLOR is set), always, never.
    #[arg(long, global = true, value_enum, value_name = "WHEN", default_value_t = ColorWhen::Auto)]
    pub color: ColorWhen,
}

#[derive(clap::Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(clap::Args, Debug)]
pub struct ManArgs {
    /// Write kiln.1 and a kiln-VERB.1 page per verb into DIR instead of
    /// printing kiln.1 on stdout.
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Recipe file (e.g. recipes/lb.toml).
    pub recipe: PathBuf,
    /// Print a JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct LockArgs {
    /// Recipe file (e.g. recipes/k3s-node.toml).
    pub recipe: Option<PathBuf>,
    /// Re-resolve pins that still apply. Alone: everything (new
    /// SOURCE_DATE_EPOCH, package pins dropped so the next build pins them
    /// again, every artifact and image re-pinned). With NAME (an artifact
    /// name, or an image reference or repository): that pin only.
    #[arg(long, value_name = "NAME", num_args = 0..=1, default_missing_value = "")]
    pub update: Option<String>,
    /// Registry credentials: a docker `config.json` (default
    /// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json` if present).
    #[arg(long, value_name = "FILE")]
    pub docker_config: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct AffectedArgs {
    /// A git revision range as `git diff` takes it: `BASE...HEAD` (what HEAD
    /// changed since it left BASE, as a pull request shows), `A..B`, or one
    /// revision (against the work tree).
    pub range: String,
    /// The directory whose `*.toml` recipes are considered.
    #[arg(long, value_name = "DIR", default_value = "recipes")]
    pub recipes: PathBuf,
    /// Print the range, the changed files and each affected recipe (with
    /// the changed files that touch it) as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct BuildArgs {
    pub recipe: PathBuf,
    /// Output directory.
    #[arg(long, default_value = "images")]
    pub out: PathBuf,
    /// Replace an existing image of the same name and version built from other inputs.
    #[arg(long)]
    pub force: bool,
    /// Never write to the lockfile (CI): fail if it lacks package pins.
    #[arg(long)]
    pub locked: bool,
    /// Registry credentials: a docker `config.json` (default
    /// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json` if present).
    #[arg(long, value_name = "FILE")]
    pub docker_config: Option<PathBuf>,
    /// Skip booting the image in QEMU before publishing it.
    #[arg(long)]
    pub no_validate: bool,
    /// Accelerator for the validation boot (auto probes KVM, falls back to TCG).
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    pub accel: Accel,
    /// Print a JSON object (manifest path, id, ...) instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct DiffArgs {
    /// The older image directory (holding manifest.json), e.g. images/lb/0.1.0.
    pub a: PathBuf,
    /// The newer image directory.
    pub b: PathBuf,
    /// Print a JSON object (for CI comments) instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Subcommand, Debug)]
pub enum CloudInitCommand {
    /// Print a node's user-data rendered from a role's template.
    Render(RenderArgs),
}

#[derive(clap::Args, Debug)]
pub struct RenderArgs {
    #[arg(long)]
    pub recipe: PathBuf,
    #[arg(long)]
    pub role: String,
    /// Per-node values (TOML, or JSON when the name ends in .json).
    #[arg(long)]
    pub values: PathBuf,
    /// Write to this file (atomically) instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct ValidateArgs {
    /// Image directory (images/<name>/<version>).
    #[arg(required = true)]
    pub image: Vec<PathBuf>,
    /// Accelerator: auto probes KVM with a short real boot and falls back to TCG.
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    pub accel: Accel,
    /// Validate this many images at once.
    #[arg(short = 'j', long, default_value_t = 1)]
    pub jobs: usize,
    /// Print the results as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Also write the results as JUnit XML to this file.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Seconds from QEMU start until SSH must answer.
    #[arg(long, default_value_t = 300)]
    pub boot_timeout: u64,
    /// Seconds `cloud-init status --wait` may take once SSH answers.
    #[arg(long, default_value_t = 300)]
    pub cloud_init_timeout: u64,
    /// Host port on 127.0.0.1 forwarded to the guest's SSH (default: a free one).
    #[arg(long)]
    pub ssh_port: Option<u16>,
    /// The guest user cloud-init gives the throwaway key to.
    #[arg(long, default_value = "debian")]
    pub ssh_user: String,
    #[arg(long, default_value = OVMF_CODE)]
    pub ovmf_code: PathBuf,
    /// OVMF vars template with the Microsoft keys enrolled (copied per boot).
    #[arg(long, default_value = OVMF_VARS)]
    pub ovmf_vars: PathBuf,
    /// Microsoft Secure Boot keys the UEFI boot has: 2011 (an EFI disk from
    /// before 2023), 2023k (the 2023 keys beside them, as Proxmox VE 9 creates
    /// EFI disks; enrolled with virt-fw-vars if the vars lack them), or auto
    /// (2023k where possible). Several, comma-separated, boot once each.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "auto")]
    pub secure_boot_keys: Vec<SecureBootKeys>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 2048)]
    pub memory: u32,
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// Keep each boot's serial console log in this directory.
    #[arg(long, value_name = "DIR")]
    pub console_dir: Option<PathBuf>,
    /// Do not record the result in manifest.json.
    #[arg(long)]
    pub no_record: bool,
}

#[derive(clap::Args, Debug, Clone)]
pub struct TargetArgs {
    /// Target name from kiln.toml or ~/.config/kiln/config.toml; without it the
    /// target comes from KILN_PVE_URL, KILN_PVE_NODE, KILN_PVE_STORAGE,
    /// KILN_PVE_IMPORT_STORAGE and KILN_PVE_TOKEN.
    #[arg(long)]
    pub target: Option<String>,
    /// Config file to read targets from (instead of the default places).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print machine-readable JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug, Clone)]
pub struct PublishArgs {
    /// Image directory (images/<name>/<version>).
    pub image: PathBuf,
    #[command(flatten)]
    pub target: TargetArgs,
    /// Publish even though `kiln validate` has not passed for this image.
    #[arg(long)]
    pub allow_unvalidated: bool,
    /// Transport for the disk.
    #[arg(long, value_enum, default_value_t = Via::Auto)]
    pub via: Via,
    /// Refuse the image unless its SHA256SUMS.sig verifies (as `kiln
    /// verify` checks it) with a key of --allowed-signers.
    #[arg(long, requires = "allowed_signers")]
    pub require_signature: bool,
    /// Allowed signers file (ssh-keygen(1) ALLOWED SIGNERS) for --require-signature.
    #[arg(long, value_name = "FILE", requires = "require_signature")]
    pub allowed_signers: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct SignArgs {
    /// Image directory (images/<name>/<version>).
    pub image: PathBuf,
    /// OpenSSH private key (or the public key of one ssh-agent holds).
    #[arg(long, value_name = "KEY")]
    pub key: PathBuf,
    /// Print a JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    /// Image directory (images/<name>/<version>).
    pub image: PathBuf,
    /// Allowed signers file (ssh-keygen(1) ALLOWED SIGNERS): lines of
    /// `<principal> [namespaces="kiln-image"] <public key>`.
    #[arg(long, value_name = "FILE")]
    pub allowed_signers: PathBuf,
    /// Accept only this principal of the file (default: the one whose key signed).
    #[arg(long)]
    pub identity: Option<String>,
    /// Print a JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Subcommand, Debug)]
pub enum TemplatesCommand {
    /// List templates kiln published.
    List(TemplatesListArgs),
    /// Delete old templates, keeping the newest N per image (and any with linked clones).
    Prune(TemplatesPruneArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct TemplatesListArgs {
    #[command(flatten)]
    pub target: TargetArgs,
}

#[derive(clap::Args, Debug, Clone)]
pub struct TemplatesPruneArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// How many of the newest templates of each image to keep.
    #[arg(long)]
    pub keep: usize,
    /// Show what would be deleted without deleting.
    #[arg(long)]
    pub dry_run: bool,
    /// Also delete templates on storage that shows no link from a linked
    /// clone to its template (LVM-thin) when VMs cloned from them exist.
    #[arg(long)]
    pub force: bool,
}

#[derive(clap::Subcommand, Debug)]
pub enum EnvCommand {
    /// What apply would do, slot by slot, and why (nothing is changed).
    Plan(EnvArgs),
    /// Bootstrap the environment or bring it to its file: new VMs first, proven, then old ones go.
    Apply(EnvChangeArgs),
    /// The environment's VMs as the provider shows them, and whether each is current.
    Status(EnvArgs),
    /// Destroy every VM of the environment (and what the provider prepared for it).
    Destroy(EnvChangeArgs),
    /// QA from scratch: rebuild every image from its lock, prove the pinned ids, destroy, bootstrap again.
    Rebuild(EnvChangeArgs),
}

#[derive(clap::Args, Debug)]
pub struct EnvArgs {
    /// Environment file (e.g. envs/qa.toml).
    pub env: PathBuf,
    /// Print JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// How the local provider runs VMs: auto probes KVM and falls back to TCG.
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    pub accel: Accel,
    /// Config file with the Proxmox target the environment names
    /// (default: ./kiln.toml, then ~/.config/kiln/config.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct EnvChangeArgs {
    #[command(flatten)]
    pub env: EnvArgs,
    /// Do not ask before replacing or destroying VMs.
    #[arg(long)]
    pub yes: bool,
    /// Seconds a new VM may take until SSH answers.
    #[arg(long, default_value_t = 600)]
    pub boot_timeout: u64,
    /// New K3s agents made at a time before old ones go (overrides the
    /// environment file's `[rollout] max_surge`, default 1).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_surge: Option<u32>,
}

#[derive(clap::Subcommand, Debug)]
pub enum CacheCommand {
    /// Space each part of the cache ($KILN_CACHE) takes: bases, blobs, oci,
    /// references, tmp.
    Du(CacheDuArgs),
    /// Remove what the N newest builds of each recipe did not use, and the
    /// scratch of killed builds; entries a running build holds are kept.
    Gc(CacheGcArgs),
}

#[derive(clap::Args, Debug)]
pub struct CacheDuArgs {
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct CacheGcArgs {
    /// Keep what this many of each recipe's newest builds used.
    #[arg(long, value_name = "N")]
    pub keep: usize,
    /// Print what would be removed, remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long)]
    pub json: bool,
}
