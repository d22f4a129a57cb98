//! `kiln publish`: turn a validated image into a versioned Proxmox VE
//! template over the PVE HTTP API, idempotently.
//!
//! Flow (PVE >= 8.4): check the image and the target, find an existing
//! template with the image id (then stop), upload the disk as `import`
//! content, create the VM with `import-from`, convert it to a template,
//! remove the import file; the LB appliance's LXC rootfs goes up as
//! `vztmpl`. Anything half-made is destroyed on failure or by the next run.

pub mod naming;
pub mod ssh;
pub mod templates;

use crate::deploy::pve::api::{seg, ApiError, Pve};
use crate::deploy::pve::config::{self, Target};
use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::image::manifest::ImageManifest;

/// How the disk reaches Proxmox.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// The HTTP API on PVE >= 8.4, SSH on older releases.
    Auto,
    /// The HTTP API only.
    Api,
    /// SSH + `qm disk import` (for PVE < 8.4; needs `ssh` in the target).
    Ssh,
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
}

/// What `kiln publish --json` prints.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct PublishReport {
    pub vmid: u32,
    pub name: String,
    pub node: String,
    pub image_id: String,
    pub tags: Vec<String>,
    /// False when a template with this image id already existed.
    pub created: bool,
    /// Bytes of disk (and LXC archive) uploaded by this run.
    pub uploaded_bytes: u64,
    /// Wall time of the disk upload request.
    pub upload_seconds: f64,
    pub via: String,
    /// The LXC template volume, when the image has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lxc_volume: Option<String>,
    /// Half-made VMs of an earlier run that were removed.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub removed_leftovers: Vec<u32>,
}

fn env_lookup(k: &str) -> Option<String> {
    std::env::var(k).ok()
}

pub fn run(args: PublishArgs) -> Result<()> {
    let target = config::resolve(
        args.target.target.as_deref(),
        args.target.config.as_deref(),
        &env_lookup,
    )?;
    let token = target.token.clone();
    let report =
        publish(&args, &target).map_err(|e| anyhow!("{}", token.redact(&format!("{e:#}"))))?;
    if args.target.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if report.created {
        println!(
            "published {} as template {} (vmid {}) on {} [{}], {} uploaded in {:.1} s",
            report.image_id,
            report.name,
            report.vmid,
            report.node,
            report.tags.join(";"),
            crate::util::human_bytes(report.uploaded_bytes),
            report.upload_seconds
        );
    } else {
        println!(
            "already published: template {} (vmid {}) on {} carries image {}; nothing uploaded",
            report.name, report.vmid, report.node, report.image_id
        );
    }
    if let Some(v) = &report.lxc_volume {
        if !args.target.json {
            println!("LXC template: {v}");
        }
    }
    Ok(())
}

pub fn run_templates(cmd: TemplatesCommand) -> Result<()> {
    let t = match &cmd {
        TemplatesCommand::List(a) => &a.target,
        TemplatesCommand::Prune(a) => &a.target,
    };
    let target = config::resolve(t.target.as_deref(), t.config.as_deref(), &env_lookup)?;
    let token = target.token.clone();
    let res = (|| -> Result<()> {
        let pve = Pve::connect(&target)?;
        pve.version().context("cannot reach the Proxmox VE API")?;
        match cmd {
            TemplatesCommand::List(a) => {
                let list = templates::list(&pve)?;
                if a.target.json {
                    println!("{}", serde_json::to_string_pretty(&list)?);
                } else {
                    print!("{}", templates::table(&list));
                }
            }
            TemplatesCommand::Prune(a) => {
                let outcome = templates::prune(&pve, a.keep, a.dry_run)?;
                if a.target.json {
                    println!("{}", serde_json::to_string_pretty(&outcome)?);
                } else {
                    print!("{}", templates::prune_summary(&outcome, a.dry_run));
                }
            }
        }
        Ok(())
    })();
    res.map_err(|e| anyhow!("{}", token.redact(&format!("{e:#}"))))
}

/// Load the image and check it may be published.
pub fn load_image(dir: &Path, allow_unvalidated: bool, json: bool) -> Result<ImageManifest> {
    let m = ImageManifest::load(dir)?;
    if !allow_unvalidated && !m.validation.as_ref().map(|v| v.validated).unwrap_or(false) {
        bail!(
            "{} ({} {}) has not passed `kiln validate`; run it first or pass --allow-unvalidated",
            dir.display(),
            m.name,
            m.version
        );
    }
    if m.disk.format != "qcow2" && m.disk.format != "raw" {
        bail!(
            "{}: disk format `{}` cannot be imported (qcow2 or raw)",
            dir.display(),
            m.disk.format
        );
    }
    let pb = crate::util::progress::spinner(
        crate::util::progress::enabled(json),
        "verifying disk sha256",
    );
    let res = m.verify_disk(dir);
    pb.finish_and_clear();
    res?;
    if let Some(l) = &m.lxc {
        let p = dir.join(&l.file);
        let got = crate::util::sha256_file(&p)?;
        if got != l.sha256 {
            bail!(
                "{} does not match its manifest: sha256 is {got}, manifest says {}",
                p.display(),
                l.sha256
            );
        }
        if !l.file.ends_with(".tar.zst") {
            bail!("{}: the LXC rootfs must be a .tar.zst", p.display());
        }
    }
    Ok(m)
}

/// A VM as `/cluster/resources` lists it.
#[derive(Debug, Clone)]
pub struct VmEntry {
    pub vmid: u32,
    pub name: String,
    pub node: String,
    pub template: bool,
    pub tags: Vec<String>,
    pub lock: Option<String>,
}

pub fn list_vms(pve: &Pve) -> Result<Vec<VmEntry>> {
    let v = pve.get("/cluster/resources", &[("type", "vm".into())])?;
    let arr = v
        .as_array()
        .context("/cluster/resources did not answer a list")?;
    Ok(arr
        .iter()
        .filter(|e| e.get("type").and_then(Value::as_str) == Some("qemu"))
        .filter_map(|e| {
            Some(VmEntry {
                vmid: as_u64(e.get("vmid")?)? as u32,
                name: e.get("name").and_then(Value::as_str).unwrap_or("").into(),
                node: e.get("node").and_then(Value::as_str).unwrap_or("").into(),
                template: e.get("template").and_then(as_u64).unwrap_or(0) == 1,
                tags: e
                    .get("tags")
                    .and_then(Value::as_str)
                    .map(|t| {
                        t.split([';', ',', ' '])
                            .filter(|x| !x.is_empty())
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default(),
                lock: e.get("lock").and_then(Value::as_str).map(str::to_string),
            })
        })
        .collect())
}

/// PVE sends numbers sometimes as strings.
pub fn as_u64(v: &Value) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

pub fn vm_config(pve: &Pve, node: &str, vmid: u32) -> Result<serde_json::Map<String, Value>> {
    let v = pve.get(&format!("/nodes/{}/qemu/{vmid}/config", seg(node)), &[])?;
    v.as_object().cloned().context("VM config is not an object")
}

/// Check a storage exists on the node and allows `content`.
fn check_storage(pve: &Pve, storage: &str, content: &str, why: &str) -> Result<()> {
    let v = pve.get(
        &format!("/nodes/{}/storage", seg(&pve.node)),
        &[("storage", storage.into())],
    )?;
    let entry = v
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|e| e.get("storage").and_then(Value::as_str) == Some(storage))
        })
        .with_context(|| format!("storage `{storage}` does not exist on node {}", pve.node))?;
    let contents = entry.get("content").and_then(Value::as_str).unwrap_or("");
    if !contents.split(',').any(|c| c.trim() == content) {
        bail!(
            "storage `{storage}` on node {} does not allow `{content}` content ({why}); it allows: {contents}",
            pve.node
        );
    }
    Ok(())
}

/// A template already published from this image, if any.
fn find_existing(pve: &Pve, vms: &[VmEntry], m: &ImageManifest) -> Result<Option<VmEntry>> {
    let id_tag = naming::id_tag(m);
    for vm in vms
        .iter()
        .filter(|v| v.template && v.tags.contains(&id_tag))
    {
        let cfg = vm_config(pve, &vm.node, vm.vmid)?;
        let desc = cfg.get("description").and_then(Value::as_str).unwrap_or("");
        if naming::parse_description(desc).get(naming::keys::ID) == Some(&m.id) {
            return Ok(Some(vm.clone()));
        }
    }
    Ok(None)
}

/// Wait until a VM carries no lock (a task of an earlier run may still hold it).
fn wait_unlocked(pve: &Pve, node: &str, vmid: u32) -> Result<()> {
    let start = Instant::now();
    loop {
        let v = match pve.get(
            &format!("/nodes/{}/qemu/{vmid}/status/current", seg(node)),
            &[],
        ) {
            Ok(v) => v,
            // Gone already.
            Err(e)
                if e.downcast_ref::<ApiError>()
                    .map(|a| a.mentions("does not exist"))
                    .unwrap_or(false) =>
            {
                return Ok(())
            }
            Err(e) => return Err(e),
        };
        match v.get("lock").and_then(Value::as_str) {
            None => return Ok(()),
            Some(l) if start.elapsed() > pve.task_timeout => {
                bail!("VM {vmid} stays locked ({l}); not touching it")
            }
            Some(_) => std::thread::sleep(Duration::from_millis(300)),
        }
    }
}

/// Destroy a VM kiln created (and its disks).
pub fn destroy_vm(pve: &Pve, node: &str, vmid: u32) -> Result<()> {
    wait_unlocked(pve, node, vmid)?;
    let res = pve.delete(
        &format!("/nodes/{}/qemu/{vmid}", seg(node)),
        &[
            ("purge", "1".into()),
            ("destroy-unreferenced-disks", "1".into()),
        ],
    );
    let upid = match res {
        Ok(v) => v,
        Err(e)
            if e.downcast_ref::<ApiError>()
                .map(|a| a.mentions("does not exist"))
                .unwrap_or(false) =>
        {
            return Ok(())
        }
        Err(e) => return Err(e.context(format!("cannot destroy VM {vmid}"))),
    };
    if let Some(u) = upid.as_str() {
        pve.wait_task(u, &format!("destroying VM {vmid}"))?;
    }
    Ok(())
}

fn delete_volume(pve: &Pve, storage: &str, volid: &str) -> Result<()> {
    let res = pve.delete(
        &format!(
            "/nodes/{}/storage/{}/content/{}",
            seg(&pve.node),
            seg(storage),
            seg(volid)
        ),
        &[],
    );
    let v = match res {
        Ok(v) => v,
        Err(e)
            if e.downcast_ref::<ApiError>()
                .map(|a| a.mentions("does not exist"))
                .unwrap_or(false) =>
        {
            return Ok(())
        }
        Err(e) => return Err(e),
    };
    if let Some(u) = v.as_str() {
        pve.wait_task(u, &format!("removing {volid}"))?;
    }
    Ok(())
}

fn volume_exists(pve: &Pve, storage: &str, content: &str, volid: &str) -> Result<Option<u64>> {
    let v = pve.get(
        &format!("/nodes/{}/storage/{}/content", seg(&pve.node), seg(storage)),
        &[("content", content.into())],
    )?;
    Ok(v.as_array().and_then(|a| {
        a.iter()
            .find(|e| e.get("volid").and_then(Value::as_str) == Some(volid))
            .map(|e| e.get("size").and_then(as_u64).unwrap_or(0))
    }))
}

/// Everything of `kiln publish` after the target is resolved.
pub fn publish(args: &PublishArgs, target: &Target) -> Result<PublishReport> {
    let json = args.target.json;
    let m = load_image(&args.image, args.allow_unvalidated, json)?;
    let pve = Pve::connect(target)?;
    let (major, minor, full) = pve.version().with_context(|| {
        format!(
            "cannot reach the Proxmox VE API of target `{}` at {}",
            target.name, target.cfg.url
        )
    })?;
    let api_ok = (major, minor) >= (8, 4);
    let via = match args.via {
        Via::Api if !api_ok => {
            bail!("Proxmox VE {full} cannot import disks over the API (needs 8.4+); use --via ssh")
        }
        Via::Auto if !api_ok => Via::Ssh,
        Via::Auto => Via::Api,
        v => v,
    };
    check_storage(&pve, &target.cfg.storage, "images", "VM disks")?;
    if via == Via::Api {
        check_storage(&pve, &target.cfg.import_storage, "import", "disk upload")?;
    }
    if m.lxc.is_some() {
        check_storage(&pve, target.lxc_storage(), "vztmpl", "LXC template")?;
    }
    let vms = list_vms(&pve)?;
    let mut report = PublishReport {
        vmid: 0,
        name: naming::vm_name(&m.name, &m.version),
        node: pve.node.clone(),
        image_id: m.id.clone(),
        tags: naming::tags(&m),
        created: false,
        uploaded_bytes: 0,
        upload_seconds: 0.0,
        via: if via == Via::Ssh { "ssh" } else { "api" }.into(),
        lxc_volume: None,
        removed_leftovers: Vec::new(),
    };
    if let Some(existing) = find_existing(&pve, &vms, &m)? {
        report.vmid = existing.vmid;
        report.name = existing.name;
        report.node = existing.node;
        report.via = "existing".into();
    } else {
        // Half-made VMs of an interrupted run carry our id tag but are no template.
        let id_tag = naming::id_tag(&m);
        for vm in vms.iter().filter(|v| {
            !v.template && v.tags.contains(&id_tag) && v.tags.iter().any(|t| t == naming::KILN_TAG)
        }) {
            destroy_vm(&pve, &vm.node, vm.vmid).with_context(|| {
                format!("cannot remove VM {} left by an earlier publish", vm.vmid)
            })?;
            report.removed_leftovers.push(vm.vmid);
        }
        let vms = list_vms(&pve)?;
        match via {
            Via::Ssh => ssh::publish(&pve, target, &args.image, &m, &vms, &mut report)?,
            _ => publish_api(&pve, target, &args.image, &m, &vms, &mut report, json)?,
        }
        report.created = true;
    }
    if let Some(lxc) = &m.lxc {
        let storage = target.lxc_storage();
        let name = naming::lxc_file_name(&m);
        let volid = format!("{storage}:vztmpl/{name}");
        if volume_exists(&pve, storage, "vztmpl", &volid)? != Some(lxc.size) {
            let pb = crate::util::progress::bytes(
                crate::util::progress::enabled(json),
                Some(lxc.size),
                "uploading LXC rootfs",
            );
            let up = pve.upload(
                storage,
                "vztmpl",
                &args.image.join(&lxc.file),
                &name,
                &lxc.sha256,
                Some(pb),
            )?;
            pve.wait_task(&up.upid, &format!("copying {name} into {storage}"))?;
            report.uploaded_bytes += up.bytes;
        }
        report.lxc_volume = Some(volid);
    }
    Ok(report)
}

/// Choose VMIDs from the range and create the VM, retrying when another
/// client took the id first (`nextid` reserves nothing).
fn create_vm(
    pve: &Pve,
    target: &Target,
    vms: &[VmEntry],
    params_for: &dyn Fn(u32) -> Vec<(String, String)>,
) -> Result<(u32, String)> {
    let [lo, hi] = target.cfg.vmid_range;
    let used: std::collections::BTreeSet<u32> = vms.iter().map(|v| v.vmid).collect();
    let path = format!("/nodes/{}/qemu", seg(&pve.node));
    for vmid in (lo..=hi).filter(|v| !used.contains(v)) {
        crate::util::check_interrupted()?;
        match pve.post(&path, &params_for(vmid)) {
            Ok(v) => {
                let upid = v.as_str().context("create answered without a task id")?;
                return Ok((vmid, upid.to_string()));
            }
            Err(e)
                if e.downcast_ref::<ApiError>()
                    .map(|a| a.mentions("already exists"))
                    .unwrap_or(false) =>
            {
                continue
            }
            Err(e) => return Err(e.context(format!("cannot create VM {vmid}"))),
        }
    }
    bail!(
        "no free VMID in the range {lo}-{hi} of target `{}`",
        target.name
    )
}

fn publish_api(
    pve: &Pve,
    target: &Target,
    dir: &Path,
    m: &ImageManifest,
    vms: &[VmEntry],
    report: &mut PublishReport,
    json: bool,
) -> Result<()> {
    let storage = &target.cfg.import_storage;
    let file_name = naming::import_file_name(m);
    let volid = format!("{storage}:import/{file_name}");
    let disk = m.disk_path(dir);
    let pb = crate::util::progress::bytes(
        crate::util::progress::enabled(json),
        Some(m.disk.size),
        "uploading disk",
    );
    let up = pve.upload(storage, "import", &disk, &file_name, &m.id, Some(pb))?;
    report.uploaded_bytes += up.bytes;
    report.upload_seconds = up.seconds;
    let mut created: Option<u32> = None;
    let result = (|| -> Result<u32> {
        pve.wait_task(&up.upid, &format!("copying {file_name} into {storage}"))?;
        let when = naming::now_rfc3339();
        let (vmid, upid) = create_vm(pve, target, vms, &|id| {
            naming::create_params(target, m, id, &volid, &when)
        })?;
        created = Some(vmid);
        pve.wait_task(&upid, &format!("creating VM {vmid}"))?;
        crate::util::check_interrupted()?;
        let t = pve.post(
            &format!("/nodes/{}/qemu/{vmid}/template", seg(&pve.node)),
            &[],
        )?;
        if let Some(u) = t.as_str() {
            pve.wait_task(u, &format!("converting VM {vmid} to a template"))?;
        }
        Ok(vmid)
    })();
    match result {
        Ok(vmid) => {
            report.vmid = vmid;
            if target.cfg.remove_import {
                delete_volume(pve, storage, &volid).with_context(|| {
                    format!("template {vmid} is ready, but removing the import file {volid} failed")
                })?;
            }
            Ok(())
        }
        Err(e) => {
            let mut notes = Vec::new();
            if let Some(vmid) = created {
                if let Err(c) = destroy_vm(pve, &pve.node, vmid) {
                    notes.push(format!(
                        "VM {vmid} is left behind ({c:#}); the next publish removes it"
                    ));
                }
            }
            if target.cfg.remove_import {
                if let Err(c) = delete_volume(pve, storage, &volid) {
                    notes.push(format!("import file {volid} is left behind ({c:#})"));
                }
            }
            if notes.is_empty() {
                Err(e)
            } else {
                Err(anyhow!("{e:#}; {}", notes.join("; ")))
            }
        }
    }
}
