//! `kiln publish`: turn a validated image into a versioned Proxmox VE
//! template over the PVE HTTP API, idempotently.
//!
//! Flow (PVE >= 8.4): check the image, the target and the token's
//! privileges; then on each node of the target: find an existing template
//! with the image id (then skip the node), upload the disk as `import`
//! content (once, when the import storage is shared), create the VM with
//! `import-from`, settle with concurrent publishes of the same image, convert
//! it to a template, remove the import file; the LB appliance's LXC rootfs
//! goes up as `vztmpl`. What this run made and does not keep is destroyed on
//! failure; what a dead run left is removed by the next run on that machine
//! (see `journal`).

pub(crate) mod journal;
pub(crate) mod naming;
pub(crate) mod ssh;

use crate::deploy::pve::access::{self, Need};
use crate::deploy::pve::client::{seg, Pve};
use crate::deploy::pve::config::Target;
use crate::deploy::pve::errors::{is_missing, ApiError};
use crate::deploy::pve::vms::{destroy_vm, list_vms, vm_config, wait_unlocked, VmEntry};
use crate::deploy::pve::volumes::{check_storage, delete_volume, volume_exists};
use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use serde_json::Value;
use std::path::{Path, PathBuf};

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

/// What to publish and how.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// Image directory (images/<name>/<version>).
    pub image: PathBuf,
    /// Publish even though `kiln validate` has not passed for this image.
    pub allow_unvalidated: bool,
    pub via: Via,
    /// Draw progress bars on stderr.
    pub progress: bool,
    /// Refuse the image unless its SHA256SUMS.sig verifies with a key of
    /// this allowed signers file (`kiln publish --require-signature`).
    pub allowed_signers: Option<PathBuf>,
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
    /// True when another publish of the same image, running at the same
    /// time, made the template this run reports (`created` is then false).
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub created_by_other: bool,
    /// What the operator should know although the publish succeeded.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub warnings: Vec<String>,
    /// The template on each node of the target, in the target's order (the
    /// fields above describe the first).
    #[serde(default)]
    pub nodes: Vec<NodeReport>,
}

/// One node's template: what a Terraform `clone { vm_id, node_name }` needs.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct NodeReport {
    pub node: String,
    pub vmid: u32,
    pub name: String,
    /// False when the template already existed (or another run made it).
    pub created: bool,
    /// Storage of the template's boot disk (linked clones stay on it).
    pub storage: String,
    /// The disk the template boots from, e.g. `scsi0`.
    pub disk_interface: String,
    /// Bytes the guest sees on that disk.
    pub virtual_size: u64,
}

/// Load the image and check it may be published: validated, every output
/// the one its manifest names and, with `allowed_signers`, signed by one of them.
pub fn load_image(
    dir: &Path,
    allow_unvalidated: bool,
    allowed_signers: Option<&Path>,
    json: bool,
) -> Result<ImageManifest> {
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
        "verifying sha256 of every output",
    );
    // A signature check re-hashes every listed file against the signed sums
    // and ties the manifest's outputs to them: the outputs are verified too.
    let res = match allowed_signers {
        Some(allowed) => crate::image::signature::verify(dir, &m, allowed, None)
            .map(drop)
            .context("--require-signature"),
        None => m.verify_outputs(dir),
    };
    pb.finish_and_clear();
    res?;
    if let Some(l) = &m.lxc {
        let p = dir.join(&l.file);
        if !l.file.ends_with(".tar.zst") {
            bail!("{}: the LXC rootfs must be a .tar.zst", p.display());
        }
    }
    Ok(m)
}

/// The privileges a publish uses, on the paths it uses them (see
/// `access::KILN_PUBLISH_PRIVS` for the role that has them all). VM ones are
/// checked on the first VMID of the range (an ACL on `/vms` or `/` covers it).
fn needs(target: &Target, m: &ImageManifest, via: Via) -> Vec<Need> {
    let c = &target.cfg;
    let vms = format!("/vms/{}", c.vmid_range[0]);
    let st = |s: &str| format!("/storage/{s}");
    // In a pool, a VM has the pool's privileges too (`check_vm_perm`).
    let pool = c.pool.as_ref().map(|p| format!("/pool/{p}"));
    let mut n = vec![Need::new(
        &vms,
        "VM.Audit",
        "read VMs; without it Proxmox silently leaves them out of every list",
    )
    .or_on(pool.clone())];
    let read_storage = |s: &str, why: &str| Need {
        any_of: vec!["Datastore.Audit", "Datastore.AllocateSpace"],
        ..Need::new(st(s), "Datastore.Audit", why)
    };
    n.push(read_storage(
        &c.storage,
        "see the storage for the template's disks",
    ));
    if via == Via::Api {
        for (p, why) in [
            (
                "VM.Allocate",
                "create VMs, make them templates, remove half-made ones",
            ),
            (
                "VM.Config.Options",
                "name, description, tags, BIOS, agent, OS type",
            ),
            (
                "VM.Config.HWType",
                "machine, SCSI controller, SMBIOS, serial port",
            ),
            ("VM.Config.CPU", "cores and CPU type"),
            ("VM.Config.Memory", "memory"),
            ("VM.Config.Disk", "boot order"),
            ("VM.Config.Network", "the network device"),
        ] {
            n.push(Need::new(&vms, p, why).or_on(pool.clone()));
        }
        n.push(Need::new(
            format!("/sdn/zones/localnetwork/{}", c.vm.bridge),
            "SDN.Use",
            "attach the network device to the bridge",
        ));
        n.push(Need::new(
            st(&c.storage),
            "Datastore.AllocateSpace",
            "create the template's disks",
        ));
        n.push(read_storage(&c.import_storage, "import the uploaded disk"));
        n.push(Need::new(
            st(&c.import_storage),
            "Datastore.AllocateTemplate",
            "upload the disk",
        ));
        if c.remove_import {
            n.push(
                Need::new(
                    st(&c.import_storage),
                    "Datastore.Allocate",
                    "the uploaded disk will stay on the storage (remove_import)",
                )
                .optional(),
            );
        }
    }
    if m.lxc.is_some() {
        n.push(read_storage(target.lxc_storage(), "find the LXC template"));
        n.push(Need::new(
            st(target.lxc_storage()),
            "Datastore.AllocateTemplate",
            "upload the LXC template",
        ));
    }
    n
}

/// A template already published from this image on `pve`'s node, if any.
fn find_existing(pve: &Pve, vms: &[VmEntry], m: &ImageManifest) -> Result<Option<VmEntry>> {
    let id_tag = naming::id_tag(m);
    for vm in vms
        .iter()
        .filter(|v| v.node == pve.node && v.template && v.tags.contains(&id_tag))
    {
        let cfg = vm_config(pve, &vm.node, vm.vmid)?;
        let desc = cfg.get("description").and_then(Value::as_str).unwrap_or("");
        if naming::parse_description(desc).get(naming::keys::ID) == Some(&m.id) {
            return Ok(Some(vm.clone()));
        }
    }
    Ok(None)
}

/// Everything of `kiln publish` after the target is resolved: a template on
/// each node of the target (local storage cannot be cloned to another node,
/// Proxmox bug 2059), each node idempotent on its own.
pub fn publish(args: &PublishOptions, target: &Target) -> Result<PublishReport> {
    let json = !args.progress;
    let m = load_image(
        &args.image,
        args.allow_unvalidated,
        args.allowed_signers.as_deref(),
        json,
    )?;
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
    let nodes = target.nodes();
    if via == Via::Ssh && nodes.len() > 1 {
        bail!(
            "target `{}` has {} nodes; the SSH path (PVE older than 8.4) publishes to one node only",
            target.name,
            nodes.len()
        );
    }
    let checked = access::check(&pve, &needs(target, &m, via))?;
    if !checked.missing.is_empty() {
        return Err(access::missing_error(
            &target.token.id,
            &checked.missing,
            access::KilnRole::Publish,
        ));
    }
    let mut lxc_shared = false;
    for node in &nodes {
        let pn = pve.for_node(node);
        check_storage(&pn, &target.cfg.storage, "images", "VM disks")?;
        if via == Via::Api {
            let shared = check_storage(&pn, &target.cfg.import_storage, "import", "disk upload")?;
            if target.cfg.shared_import_storage && !shared {
                bail!(
                    "target `{}` declares shared_import_storage, but Proxmox says storage `{}` is not shared",
                    target.name,
                    target.cfg.import_storage
                );
            }
        }
        if m.lxc.is_some() {
            lxc_shared = check_storage(&pn, target.lxc_storage(), "vztmpl", "LXC template")?;
        }
    }
    let mut report = PublishReport {
        vmid: 0,
        name: naming::vm_name(&m.name, &m.version),
        node: nodes[0].clone(),
        image_id: m.id.clone(),
        tags: naming::tags(&m),
        created: false,
        uploaded_bytes: 0,
        upload_seconds: 0.0,
        via: if via == Via::Ssh { "ssh" } else { "api" }.into(),
        lxc_volume: None,
        removed_leftovers: Vec::new(),
        created_by_other: false,
        warnings: checked.warnings,
        nodes: Vec::new(),
    };
    remove_dead_runs(&pve, target, &mut report)?;
    let job = Job {
        target,
        dir: &args.image,
        m: &m,
        json,
        pve_version: &full,
    };
    let mut run: Option<journal::Run> = None;
    let mut shared_upload: Option<Upload> = None;
    let mut tags_checked = false;
    let mut res = (|| -> Result<()> {
        for node in &nodes {
            let pn = pve.for_node(node);
            let vms = list_vms(&pve)?;
            if let Some(existing) = find_existing(&pn, &vms, &m)? {
                report
                    .nodes
                    .push(node_report(&pn, &existing.name, existing.vmid, &m, false)?);
                continue;
            }
            warn_about_foreign_half_made(&pn, &vms, &m, &mut report);
            if !tags_checked {
                check_tag_policy(&pve, &vms, &report.tags.clone(), &mut report)?;
                tags_checked = true;
            }
            if run.is_none() {
                run = Some(journal::Run::start(&target.cfg.url, &m.id)?);
            }
            let r = run.as_mut().expect("started above");
            let nr = match via {
                Via::Ssh => {
                    ssh::publish(&pn, &job, &vms, r, &mut report)?;
                    node_report(&pn, &report.name.clone(), report.vmid, &m, true)?
                }
                _ => publish_on_node(&pn, &job, &vms, r, &mut report, &mut shared_upload)?,
            };
            report.nodes.push(nr);
        }
        Ok(())
    })();
    // A disk uploaded once to shared storage serves every node: it goes
    // when all are done (or one failed).
    if let Some(up) = shared_upload.take() {
        if target.cfg.remove_import || res.is_err() {
            if let Err(e) = delete_volume(&pve.for_node(&up.node), &up.storage, &up.volid) {
                let note = format!(
                    "removing the import file {} failed ({e:#}); remove it by hand (`pvesm free {}`)",
                    up.volid, up.volid
                );
                match &mut res {
                    Ok(()) => report.warnings.push(note),
                    Err(err) => {
                        if let Some(r) = run.as_mut() {
                            r.left_behind = true;
                        }
                        *err = anyhow!("{err:#}; {note}");
                    }
                }
            }
        }
    }
    if let Some(r) = run {
        // A failed run whose cleanup failed too stays recorded: the next
        // publish removes what it left.
        if res.is_ok() || !r.left_behind {
            r.finish();
        }
    }
    if let Err(e) = res {
        if report.nodes.is_empty() {
            return Err(e);
        }
        let done: Vec<String> = report
            .nodes
            .iter()
            .map(|n| format!("{} (vmid {})", n.node, n.vmid))
            .collect();
        return Err(e.context(format!(
            "templates are ready on {}; publishing again finishes the rest",
            done.join(", ")
        )));
    }
    let first = report.nodes[0].clone();
    report.vmid = first.vmid;
    report.name = first.name;
    report.node = first.node;
    report.created = report.nodes.iter().any(|n| n.created);
    if !report.created {
        report.via = "existing".into();
    }
    if let Some(lxc) = &m.lxc {
        let storage = target.lxc_storage();
        let name = naming::lxc_file_name(&m);
        let volid = format!("{storage}:vztmpl/{name}");
        // Once when the storage is shared, else once per node.
        let lxc_nodes = if lxc_shared { &nodes[..1] } else { &nodes[..] };
        for node in lxc_nodes {
            let pn = pve.for_node(node);
            if volume_exists(&pn, storage, "vztmpl", &volid)? == Some(lxc.size) {
                report.lxc_volume = Some(volid.clone());
                continue;
            }
            let pb = crate::util::progress::bytes(
                crate::util::progress::enabled(json),
                Some(lxc.size),
                "uploading LXC rootfs",
            );
            let up = pn.upload(
                storage,
                "vztmpl",
                &args.image.join(&lxc.file),
                &name,
                &lxc.sha256,
                Some(pb),
            )?;
            let stored = pn.finish_upload(
                &up.upid,
                &name,
                &format!("copying {name} into {storage} on {node}"),
            )?;
            report.uploaded_bytes += up.bytes;
            report.lxc_volume = Some(format!("{storage}:vztmpl/{stored}"));
        }
    }
    Ok(report)
}

/// A template's entry in the report: its boot disk, that disk's storage.
fn node_report(
    pve: &Pve,
    name: &str,
    vmid: u32,
    m: &ImageManifest,
    created: bool,
) -> Result<NodeReport> {
    let cfg = vm_config(pve, &pve.node, vmid)?;
    // `boot: order=scsi0;ide2`: the first entry that is a disk, not a CD.
    let disk = cfg
        .get("boot")
        .and_then(Value::as_str)
        .and_then(|b| b.strip_prefix("order="))
        .and_then(|order| {
            order.split(';').find(|d| {
                cfg.get(*d)
                    .and_then(Value::as_str)
                    .is_some_and(|v| !v.contains("media=cdrom"))
            })
        })
        .unwrap_or("scsi0")
        .to_string();
    let storage = cfg
        .get(&disk)
        .and_then(Value::as_str)
        .and_then(|v| v.split(',').next()?.split_once(':'))
        .map(|(s, _)| s.to_string())
        .unwrap_or_default();
    Ok(NodeReport {
        node: pve.node.clone(),
        vmid,
        name: name.to_string(),
        created,
        storage,
        disk_interface: disk,
        virtual_size: m.disk.virtual_size,
    })
}

/// Remove what publish runs on this machine left when they died: each VM a
/// run recorded before creating it, if it still is that very VM (see
/// [`journal`]) and no template, and each file it uploaded. What cannot be
/// removed now is a warning; its record stays for the next run.
fn remove_dead_runs(pve: &Pve, target: &Target, report: &mut PublishReport) -> Result<()> {
    for dead in journal::dead_runs(&journal::dir()?, &target.cfg.url)? {
        let run = dead.entry.run.clone();
        let mut done = true;
        for v in &dead.entry.vms {
            match remove_if_made_by(pve, &v.node, v.vmid, &run) {
                Ok(true) => report.removed_leftovers.push(v.vmid),
                Ok(false) => {}
                Err(e) => {
                    done = false;
                    report.warnings.push(format!(
                        "VM {} on {} left by an interrupted publish (run {run}) could not be removed: {e:#}",
                        v.vmid, v.node
                    ));
                }
            }
        }
        for u in &dead.entry.uploads {
            if let Err(e) = delete_volume(&pve.for_node(&u.node), &u.storage, &u.volid) {
                done = false;
                report.warnings.push(format!(
                    "{} left by an interrupted publish (run {run}) could not be removed: {e:#}",
                    u.volid
                ));
            }
        }
        if done {
            dead.forget();
        }
    }
    Ok(())
}

/// Destroy VM `vmid` if it is the non-template VM run `run` created;
/// Ok(false) when it is gone, a template, or another VM by now.
fn remove_if_made_by(pve: &Pve, node: &str, vmid: u32, run: &str) -> Result<bool> {
    // The dead run's create task may still be running on the node.
    wait_unlocked(pve, node, vmid)?;
    let cfg = match vm_config(pve, node, vmid) {
        Ok(c) => c,
        Err(e) if is_missing(&e) => return Ok(false),
        Err(e) => return Err(e),
    };
    let template = cfg
        .get("template")
        .map(|t| t.as_u64() == Some(1) || t.as_str() == Some("1"))
        .unwrap_or(false);
    if template || !naming::run_marker_matches(&cfg, run) {
        return Ok(false);
    }
    destroy_vm(pve, node, vmid)?;
    Ok(true)
}

/// Refuse before any upload when the datacenter's tag policy would refuse
/// the template's tags: Proxmox checks them inside the create task, after
/// the import (PVE/API2/Qemu.pm create_vm), so the whole upload and import
/// would be lost. Reading the policy needs Sys.Audit on `/` (pve-manager
/// PVE/API2/Cluster.pm get_options); without it this is a warning.
fn check_tag_policy(
    pve: &Pve,
    vms: &[VmEntry],
    tags: &[String],
    report: &mut PublishReport,
) -> Result<()> {
    let options = match pve.get("/cluster/options", &[]) {
        Ok(v) => v,
        Err(e) => {
            report.warnings.push(format!(
                "the datacenter tag policy could not be read ({e:#}; needs Sys.Audit on /): \
                 if it restricts tags, the create fails after the upload"
            ));
            return Ok(());
        }
    };
    let privileged = access::has(pve, "/", "Sys.Modify")?;
    let existing: std::collections::BTreeSet<String> =
        vms.iter().flat_map(|v| v.tags.iter().cloned()).collect();
    let (refused, policy) = access::refused_tags(&options, privileged, tags, &existing);
    if !refused.is_empty() {
        bail!(
            "the datacenter tag policy ({policy}) does not let this API token set the tag(s) {} \
             kiln gives the template: allow them (Datacenter > Options > User Tag Access, e.g. \
             user-allow-list) or give the token Sys.Modify on /",
            refused
                .iter()
                .map(|t| format!("`{t}`"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// Non-template VMs of this image made by some kiln run on another machine
/// (or by a run that is still going): never removed, but worth a word.
/// Clones carry the same tags and description and are not mentioned.
fn warn_about_foreign_half_made(
    pve: &Pve,
    vms: &[VmEntry],
    m: &ImageManifest,
    report: &mut PublishReport,
) {
    let id_tag = naming::id_tag(m);
    for vm in vms
        .iter()
        .filter(|v| v.node == pve.node && !v.template && v.tags.contains(&id_tag))
    {
        let Ok(cfg) = vm_config(pve, &vm.node, vm.vmid) else {
            continue;
        };
        let desc = cfg.get("description").and_then(Value::as_str).unwrap_or("");
        let d = naming::parse_description(desc);
        if let Some(run) = d.get(naming::keys::RUN) {
            if naming::run_marker_matches(&cfg, run) {
                report.warnings.push(format!(
                    "VM {} on {} is a half-made template of this image from kiln publish run {run} \
                     (started {}), which this machine did not run or which is still running; \
                     it is left alone: remove it by hand if that run is dead",
                    vm.vmid,
                    vm.node,
                    d.get(naming::keys::CREATED).map(String::as_str).unwrap_or("?")
                ));
            }
        }
    }
}

/// Choose VMIDs from the range and create the VM, retrying when another
/// client took the id first (`nextid` reserves nothing). Each VMID is
/// recorded in the run's journal before it is asked for.
fn create_vm(
    pve: &Pve,
    target: &Target,
    vms: &[VmEntry],
    run: &mut journal::Run,
    params_for: &dyn Fn(u32) -> Vec<(String, String)>,
) -> Result<(u32, String)> {
    let [lo, hi] = target.cfg.vmid_range;
    let used: std::collections::BTreeSet<u32> = vms.iter().map(|v| v.vmid).collect();
    let path = format!("/nodes/{}/qemu", seg(&pve.node));
    for vmid in (lo..=hi).filter(|v| !used.contains(v)) {
        crate::util::check_interrupted()?;
        run.will_create_vm(&pve.node, vmid)?;
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

/// Who publishes the template when several runs publish one image at once.
enum Settled {
    /// This run's VM becomes the template.
    Mine,
    /// Another run's template (made or being made) is used instead.
    Theirs(VmEntry),
}

/// Decide, after this run's VM `mine` is created, whether it becomes the
/// template. Proxmox has no lock kiln could take across runs, but the
/// creates themselves order them: among VMs of this image made by kiln runs
/// (not clones, see `naming::run_marker_matches`) the lowest VMID wins; a
/// run waits for lower ones to become a template (then uses that) or to go.
/// VMs below `mine` whose create task still runs show no name or tags yet
/// (PVE/API2/Qemu.pm create_vm writes the config at the end), so they are
/// waited for too.
fn settle(pve: &Pve, job: &Job, mine: u32, report: &mut PublishReport) -> Result<Settled> {
    let [lo, _] = job.target.cfg.vmid_range;
    // How long a lower competitor may stay unconverted, with nothing below
    // it still being created, before it is taken for the leftover of a dead
    // run on another machine (a live run converts within one template task).
    let stale_after = std::time::Duration::from_secs(job.target.cfg.concurrent_publish_wait);
    let id_tag = naming::id_tag(job.m);
    let mut unconverted_since: std::collections::BTreeMap<u32, std::time::Instant> =
        Default::default();
    let mut stale_noted = std::collections::BTreeSet::new();
    loop {
        crate::util::check_interrupted()?;
        // A competitor that ran on this machine and died is removed at once.
        remove_dead_runs(pve, job.target, report)?;
        let vms = list_vms(pve)?;
        if let Some(t) = find_existing(pve, &vms, job.m)? {
            return Ok(Settled::Theirs(t));
        }
        let below = |v: &&VmEntry| v.node == pve.node && v.vmid >= lo && v.vmid < mine;
        let creating = vms
            .iter()
            .filter(below)
            .any(|v| v.lock.as_deref() == Some("create"));
        let mut waiting = creating;
        for v in vms
            .iter()
            .filter(below)
            .filter(|v| !v.template && v.lock.is_none() && v.tags.contains(&id_tag))
        {
            let cfg = match vm_config(pve, &v.node, v.vmid) {
                Ok(c) => c,
                Err(e) if is_missing(&e) => continue,
                Err(e) => return Err(e),
            };
            let d = naming::parse_description(
                cfg.get("description").and_then(Value::as_str).unwrap_or(""),
            );
            let made_by_a_run = d.get(naming::keys::ID) == Some(&job.m.id)
                && d.get(naming::keys::RUN)
                    .is_some_and(|r| naming::run_marker_matches(&cfg, r));
            if !made_by_a_run {
                continue;
            }
            let since = unconverted_since
                .entry(v.vmid)
                .or_insert_with(std::time::Instant::now);
            if creating {
                *since = std::time::Instant::now();
            }
            if since.elapsed() < stale_after {
                waiting = true;
            } else if stale_noted.insert(v.vmid) {
                report.warnings.push(format!(
                    "VM {} on {} of another publish of this image has not become a template \
                     for {} s; taken for the leftover of a dead run and not waited for",
                    v.vmid,
                    v.node,
                    stale_after.as_secs()
                ));
            }
        }
        if !waiting {
            return Ok(Settled::Mine);
        }
        crate::util::sleep_interruptible(std::time::Duration::from_millis(300))?;
    }
}

/// What one publish works on: the target, the image and how to show progress.
struct Job<'a> {
    target: &'a Target,
    dir: &'a Path,
    m: &'a ImageManifest,
    json: bool,
    /// As `GET /version` reported it: decides the EFI disk options.
    pve_version: &'a str,
}

/// A disk uploaded to an import storage.
#[derive(Debug, Clone)]
struct Upload {
    node: String,
    storage: String,
    volid: String,
}

/// Publish on one node: upload (or use the one shared upload), make the
/// template, remove the node's own upload.
fn publish_on_node(
    pve: &Pve,
    job: &Job,
    vms: &[VmEntry],
    run: &mut journal::Run,
    report: &mut PublishReport,
    shared: &mut Option<Upload>,
) -> Result<NodeReport> {
    let target = job.target;
    let own = !target.cfg.shared_import_storage;
    let upload = match shared {
        Some(u) if !own => u.clone(),
        _ => {
            let u = upload_disk(pve, job, run, report)?;
            if !own {
                *shared = Some(u.clone());
            }
            u
        }
    };
    let res = make_template(pve, job, vms, run, report, &upload.volid);
    if !own {
        return res;
    }
    // This node's own upload: not needed once its template exists, nor when
    // another run made the template, nor after a failure.
    let needed_after =
        target.cfg.remove_import || res.as_ref().is_err() || res.as_ref().is_ok_and(|n| !n.created);
    if !needed_after {
        return res;
    }
    match (delete_volume(pve, &upload.storage, &upload.volid), res) {
        (Ok(()), res) => res,
        (Err(e), Ok(n)) => {
            // The template is made: a file left over is no failure.
            report.warnings.push(format!(
                "template {} is ready, but removing the import file {} failed ({e:#}); remove it \
                 by hand (`pvesm free {}`)",
                n.vmid, upload.volid, upload.volid
            ));
            Ok(n)
        }
        (Err(c), Err(e)) => {
            run.left_behind = true;
            Err(anyhow!(
                "{e:#}; import file {} is left behind ({c:#})",
                upload.volid
            ))
        }
    }
}

/// Upload the disk to the node's import storage under this run's name and
/// wait until Proxmox has it; a failed copy is cleaned up.
fn upload_disk(
    pve: &Pve,
    job: &Job,
    run: &mut journal::Run,
    report: &mut PublishReport,
) -> Result<Upload> {
    let (target, m) = (job.target, job.m);
    let storage = &target.cfg.import_storage;
    // Per run: a concurrent publish of the same image never overwrites or
    // deletes this upload (an upload replaces a file of the same name).
    let file_name = naming::import_file_name(m, run.id());
    let volid = format!("{storage}:import/{file_name}");
    run.will_upload(&pve.node, storage, &volid)?;
    let pb = crate::util::progress::bytes(
        crate::util::progress::enabled(job.json),
        Some(m.disk.size),
        "uploading disk",
    );
    let up = pve.upload(
        storage,
        "import",
        &m.disk_path(job.dir),
        &file_name,
        &m.id,
        Some(pb),
    )?;
    report.uploaded_bytes += up.bytes;
    report.upload_seconds += up.seconds;
    match pve.finish_upload(
        &up.upid,
        &file_name,
        &format!("copying {file_name} into {storage}"),
    ) {
        Ok(stored) => {
            let mut volid = volid;
            if stored != file_name {
                // Not expected (the name is in PVE's alphabet), but the file
                // is where the task says it is.
                volid = format!("{storage}:import/{stored}");
                run.will_upload(&pve.node, storage, &volid)?;
            }
            Ok(Upload {
                node: pve.node.clone(),
                storage: storage.clone(),
                volid,
            })
        }
        Err(e) => match delete_volume(pve, storage, &volid) {
            Ok(()) => Err(e),
            Err(c) => {
                run.left_behind = true;
                Err(anyhow!("{e:#}; import file {volid} is left behind ({c:#})"))
            }
        },
    }
}

/// Create the VM on `pve`'s node from the uploaded disk, settle with other
/// runs publishing the same image, make it a template. A VM this run made
/// and does not keep is destroyed (or, if that fails, left to the next run).
fn make_template(
    pve: &Pve,
    job: &Job,
    vms: &[VmEntry],
    run: &mut journal::Run,
    report: &mut PublishReport,
    volid: &str,
) -> Result<NodeReport> {
    let (target, m) = (job.target, job.m);
    let mut created: Option<u32> = None;
    let result = (|| -> Result<Settled> {
        let when = naming::now_rfc3339();
        let run_id = run.id().to_string();
        let (vmid, upid) = create_vm(pve, target, vms, run, &|id| {
            naming::create_params(target, m, id, volid, &when, &run_id, job.pve_version)
        })?;
        created = Some(vmid);
        pve.wait_task(&upid, &format!("creating VM {vmid}"))?;
        crate::util::check_interrupted()?;
        if let Settled::Theirs(t) = settle(pve, job, vmid, report)? {
            return Ok(Settled::Theirs(t));
        }
        let t = pve.post(
            &format!("/nodes/{}/qemu/{vmid}/template", seg(&pve.node)),
            &[],
        )?;
        if let Some(u) = t.as_str() {
            pve.wait_task(u, &format!("converting VM {vmid} to a template"))?;
        }
        // A publish that chose a lower free VMID after this one looked (a
        // gap in the range) may have converted too: the lowest one stays.
        match find_existing(pve, &list_vms(pve)?, m)? {
            Some(t) if t.vmid < vmid => Ok(Settled::Theirs(t)),
            _ => Ok(Settled::Mine),
        }
    })();
    match result {
        Ok(Settled::Mine) => {
            let vmid = created.expect("a VM was created");
            node_report(pve, &naming::vm_name(&m.name, &m.version), vmid, m, true)
        }
        Ok(Settled::Theirs(t)) => {
            let mine = created.expect("a VM was created");
            report.warnings.push(format!(
                "another kiln publish of this image finished first: its template {} on {} is \
                 used; this run's VM {mine} is removed",
                t.vmid, t.node
            ));
            report.created_by_other = true;
            if let Err(c) = destroy_vm(pve, &pve.node, mine) {
                run.left_behind = true;
                report.warnings.push(format!(
                    "VM {mine} is left behind ({c:#}); the next publish removes it"
                ));
            }
            node_report(pve, &t.name, t.vmid, m, false)
        }
        Err(e) => {
            if let Some(vmid) = created {
                if let Err(c) = destroy_vm(pve, &pve.node, vmid) {
                    run.left_behind = true;
                    return Err(anyhow!(
                        "{e:#}; VM {vmid} is left behind ({c:#}); the next publish removes it"
                    ));
                }
            }
            Err(e)
        }
    }
}
