//! The build pipeline: one recipe in, one image directory out
//! (`images/<name>/<version>/{disk, lxc, manifest.json, SHA256SUMS}`).
//!
//! [`build`] reads as the table of contents: resolve (recipe + lock) → fetch →
//! rootfs (cached mmdebstrap) → images (airgap) → compose (artifacts,
//! overlays, roles, kiln defaults, hygiene) → disk → compress, lxc → sbom →
//! manifest → [validate] → promote. Each stage is one function here that
//! hands the work to its module; each stage's time lands in the manifest.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::image::airgap::Baked;
use crate::image::compose::{AddKind, Addition, Composed, Content, Node};
use crate::image::disk::{BootFiles, DiskInputs, Identities, Layout};
use crate::image::fetch::Cache;
use crate::image::lock::Lockfile;
use crate::image::manifest::{
    BootComponent, BootInfo, DiskInfo, FileInfo, ImageManifest, InputDigests, StageTiming,
    ValidateSpec,
};
use crate::image::outputs::OutputKind;
use crate::image::recipe::Recipe;
use crate::image::rootfs::BaseRootfs;
use crate::util::locks::LockedDir;

/// The pipeline's stages, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildStage {
    Resolve,
    Fetch,
    Rootfs,
    Images,
    Compose,
    Disk,
    Compress,
    Lxc,
    Sbom,
    Validate,
    Promote,
}

impl BuildStage {
    pub fn name(self) -> &'static str {
        match self {
            BuildStage::Resolve => "resolve",
            BuildStage::Fetch => "fetch",
            BuildStage::Rootfs => "rootfs",
            BuildStage::Images => "images",
            BuildStage::Compose => "compose",
            BuildStage::Disk => "disk",
            BuildStage::Compress => "compress",
            BuildStage::Lxc => "lxc",
            BuildStage::Sbom => "sbom",
            BuildStage::Validate => "validate",
            BuildStage::Promote => "promote",
        }
    }
}

/// A hook run on the finished image directory before it is promoted into
/// `images/` (`kiln build` validates there, so only validated images appear).
pub type BeforePromote<'a> = &'a dyn Fn(&Path) -> Result<()>;

pub struct BuildOptions<'a> {
    /// Output root (default `images/`).
    pub out: PathBuf,
    pub cache: Cache,
    /// Replace an existing image of the same name and version built from other inputs.
    pub force: bool,
    /// Refuse to write package pins into the lockfile.
    pub locked: bool,
    pub show_progress: bool,
    /// Registry credentials for the recipe's container images.
    pub registry_auth: crate::image::oci::Auth,
    pub before_promote: Option<BeforePromote<'a>>,
}

pub struct BuildOutcome {
    pub dir: PathBuf,
    pub manifest: ImageManifest,
    /// Nothing to do: the image for these inputs already exists.
    pub up_to_date: bool,
}

/// Build a recipe into `opts.out/<name>/<version>/`.
pub fn build(recipe_path: &Path, opts: &BuildOptions<'_>) -> Result<BuildOutcome> {
    let mut timer = Timer::default();
    let (recipe, mut lock) = timer.run(BuildStage::Resolve, || {
        Ok((resolve_for_build(recipe_path)?, false))
    })?;
    let dest = opts.out.join(&recipe.name).join(&recipe.version);
    if let Some(done) = already_built(&recipe, &lock, &dest, opts)? {
        return Ok(done);
    }
    // The only build of this image from here on; the one waited for may
    // have made exactly this image, so look again.
    let _output = crate::image::promote::lock_output(&opts.out, &recipe.name, &recipe.version)?;
    if let Some(done) = already_built(&recipe, &lock, &dest, opts)? {
        return Ok(done);
    }
    let mut used = CacheUse::default();
    let artifacts = timer.run(BuildStage::Fetch, || {
        fetch_artifacts(&recipe, &lock, opts, &mut used)
    })?;
    let base = timer.run(BuildStage::Rootfs, || base_rootfs(&recipe, &lock, opts))?;
    used.usage.bases.extend(base.keys());
    pin_packages(&recipe, &mut lock, &base, opts.locked)?;
    let mut inputs =
        crate::image::inputs::digests(&recipe, &lock, &std::fs::read(recipe.lock_path())?)?;
    if let Some(done) = up_to_date(&dest, &inputs, opts)? {
        return Ok(done);
    }

    let work = Workspace::new(opts)?;
    let layout = Layout::new(recipe.disk.size, recipe.disk.esp_size, recipe.boot.bios)?;
    let baked = bake_images(
        &mut timer, &recipe, &lock, &base, &artifacts, &layout, &work, opts, &mut used,
    )?;
    let ids = Identities::derive(&crate::image::inputs::seed(&inputs)?);
    inputs.base_rootfs = base.meta.sha256.clone();
    let rootfs = timer.run(BuildStage::Compose, || {
        let r = compose_rootfs(&recipe, &lock, &base, &artifacts, &baked, &ids, &work)?;
        Ok((r, false))
    })?;
    let outputs = write_outputs(
        &mut timer,
        &recipe,
        &layout,
        &ids,
        &rootfs,
        lock.source_date_epoch,
        work,
        opts,
    )?;
    let sbom = timer.run(BuildStage::Sbom, || {
        Ok((write_sbom(&recipe, &lock, &rootfs, &outputs)?, false))
    })?;

    let mut manifest = image_manifest(
        &recipe,
        &base,
        inputs,
        &rootfs,
        &outputs,
        sbom,
        lock.source_date_epoch,
    )?;
    manifest.stages = timer.stages;
    manifest.save(outputs.staging.path())?;
    manifest.write_sums(outputs.staging.path())?;
    if let Some(validate) = opts.before_promote {
        manifest = validate_staged(validate, outputs.staging.path())?;
    }
    crate::util::check_interrupted()?;
    crate::image::promote::promote(outputs.staging, &dest)?;
    used.usage.references.extend(outputs.references);
    crate::image::cachegc::record_use(&opts.cache, &recipe.name, &used.usage);
    Ok(BuildOutcome {
        dir: dest,
        manifest,
        up_to_date: false,
    })
}

/// Load the recipe and its lock, and check they belong together.
pub fn resolve(recipe_path: &Path) -> Result<(Recipe, Lockfile)> {
    let recipe = Recipe::load(recipe_path)?;
    let lock_path = recipe.lock_path();
    let lock = Lockfile::load(&lock_path)?.with_context(|| {
        format!(
            "{} has no lockfile: run `kiln lock {}`",
            recipe.path.display(),
            recipe.path.display()
        )
    })?;
    lock.check_matches(&recipe, &lock_path)?;
    Ok((recipe, lock))
}

/// The resolve stage: the host tools first, then the recipe and its lock.
fn resolve_for_build(recipe_path: &Path) -> Result<(Recipe, Lockfile)> {
    use crate::util::hosttools;
    hosttools::require(hosttools::BUILD_TOOLS)?;
    let (recipe, lock) = resolve(recipe_path)?;
    if recipe.boot.bios {
        hosttools::require(&[hosttools::GRUB_MKIMAGE])?;
    }
    Ok((recipe, lock))
}

/// The existing image, when the lock pins every package already (so the
/// inputs are known before any work) and the image was built from them.
fn already_built(
    recipe: &Recipe,
    lock: &Lockfile,
    dest: &Path,
    opts: &BuildOptions<'_>,
) -> Result<Option<BuildOutcome>> {
    if lock.packages.is_empty() {
        return Ok(None);
    }
    let lock_bytes = std::fs::read(recipe.lock_path())?;
    let inputs = crate::image::inputs::digests(recipe, lock, &lock_bytes)?;
    up_to_date(dest, &inputs, opts)
}

/// The existing image when it was built from exactly these inputs.
fn up_to_date(
    dest: &Path,
    inputs: &InputDigests,
    opts: &BuildOptions<'_>,
) -> Result<Option<BuildOutcome>> {
    Ok(
        crate::image::promote::existing(dest, inputs, opts.force)?.map(|manifest| BuildOutcome {
            dir: dest.to_path_buf(),
            manifest,
            up_to_date: true,
        }),
    )
}

/// The cache entries a build uses: held (shared) until the build ends, so
/// `kiln cache gc` leaves them alone, and recorded for it when it succeeds.
#[derive(Default)]
struct CacheUse {
    usage: crate::image::cachegc::Usage,
    held: Vec<crate::util::locks::Held>,
}

/// The fetch stage: every artifact at its locked digest, from the cache when there.
fn fetch_artifacts(
    recipe: &Recipe,
    lock: &Lockfile,
    opts: &BuildOptions<'_>,
    used: &mut CacheUse,
) -> Result<(BTreeMap<String, PathBuf>, bool)> {
    let mut out = BTreeMap::new();
    let mut all_cached = true;
    for a in &recipe.artifacts {
        let sha = lock.artifact_sha(&a.name).expect("checked by resolve");
        all_cached &= opts.cache.get(sha).is_some();
        let what = format!("artifact `{}`", a.name);
        let fetch = || {
            opts.cache
                .fetch(&what, &a.url, Some(sha), opts.show_progress)
        };
        // One build downloads it; the others wait, then use it.
        let ((p, _), held) = crate::image::cachegc::use_entry(
            &crate::image::cachegc::blob_lock(&opts.cache, sha),
            &what,
            || match opts.cache.get(sha) {
                Some(_) => fetch().map(Some),
                None => Ok(None),
            },
            || fetch().map(drop),
        )?;
        used.held.push(held);
        used.usage.blobs.insert(sha.to_string());
        out.insert(a.name.clone(), p);
    }
    Ok((out, all_cached))
}

/// The rootfs stage: the mmdebstrap base, cached by its inputs.
fn base_rootfs(
    recipe: &Recipe,
    lock: &Lockfile,
    opts: &BuildOptions<'_>,
) -> Result<(BaseRootfs, bool)> {
    let b = crate::image::rootfs::ensure_base(recipe, lock, &opts.cache, opts.show_progress)?;
    let cached = b.cached;
    Ok((b, cached))
}

/// The first build writes the installed packages' versions into the lock.
fn pin_packages(
    recipe: &Recipe,
    lock: &mut Lockfile,
    base: &BaseRootfs,
    locked: bool,
) -> Result<()> {
    if !lock.packages.is_empty() {
        return Ok(());
    }
    let lock_path = recipe.lock_path();
    if locked {
        bail!(
            "{} has no package pins and --locked forbids writing them: build once without --locked",
            lock_path.display()
        );
    }
    lock.packages = base.meta.packages.clone();
    lock.save(&lock_path)
}

/// Where a build works before it promotes: scratch in the cache (rootfs tar,
/// raw disk) and a staging directory beside the destination in `images/`.
struct Workspace {
    scratch: LockedDir,
    staging: LockedDir,
}

impl Workspace {
    fn new(opts: &BuildOptions<'_>) -> Result<Workspace> {
        Ok(Workspace {
            scratch: opts.cache.scratch("build-")?,
            staging: crate::image::promote::staging_dir(&opts.out)?,
        })
    }
}

/// The images stage: container images pulled at their locked digests, one
/// archive each, refused before any download when they would not fit.
#[allow(clippy::too_many_arguments)]
fn bake_images(
    timer: &mut Timer,
    recipe: &Recipe,
    lock: &Lockfile,
    base: &BaseRootfs,
    artifacts: &BTreeMap<String, PathBuf>,
    layout: &Layout,
    work: &Workspace,
    opts: &BuildOptions<'_>,
    in_use: &mut CacheUse,
) -> Result<Baked> {
    if recipe.images.is_empty() {
        return Ok(Baked::default());
    }
    // The blobs stay while this build uses them: `kiln cache gc` skips
    // the OCI area while any build holds it.
    let oci = crate::image::cachegc::oci_lock(&opts.cache);
    in_use.held.push(crate::util::locks::Held::acquire(
        &oci,
        crate::util::locks::Mode::Shared,
        "the container image cache",
    )?);
    timer.run(BuildStage::Images, || {
        let used = base.meta.size
            + artifacts
                .values()
                .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
                .sum::<u64>();
        let baked = crate::image::airgap::bake(
            recipe,
            lock,
            &crate::image::airgap::BakeOptions {
                cache_root: &opts.cache.root,
                auth: opts.registry_auth.clone(),
                max_total_bytes: Some(crate::image::airgap::space_left(layout.root_size, used)),
                scratch: work.scratch.path(),
                show_progress: opts.show_progress,
            },
        )?;
        let cached = baked.all_cached;
        in_use.usage.oci.extend(baked.blobs.iter().cloned());
        Ok((baked, cached))
    })
}

/// The final root filesystem as a tar, what the disk needs from it, and what
/// the SBOM and the manifest record of it.
struct ComposedRootfs {
    tar: PathBuf,
    composed: Composed,
    boot: BootFiles,
    cmdline: String,
    packages: Vec<crate::image::sbom::DebPackage>,
    chain: Vec<BootComponent>,
}

/// The compose stage: base + artifacts + container images + overlays + kiln's
/// defaults + enabled units, cleaned by hygiene, into one tar.
fn compose_rootfs(
    recipe: &Recipe,
    lock: &Lockfile,
    base: &BaseRootfs,
    artifacts: &BTreeMap<String, PathBuf>,
    baked: &Baked,
    ids: &Identities,
    work: &Workspace,
) -> Result<ComposedRootfs> {
    use crate::image::compose::defaults;
    let unit_paths = defaults::unit_paths(recipe);
    let want = |p: &str| {
        crate::image::sbom::wanted(p)
            || crate::image::disk::boot::wanted(p, recipe.boot.bios)
            || unit_paths.iter().any(|u| u == p)
    };
    let info = crate::image::compose::index_base(&base.tar, &want)?;
    let boot = crate::image::disk::boot::files(&info, recipe, work.scratch.path())?;
    let cmdline = crate::image::disk::cmdline(ids, &recipe.boot.cmdline);
    let status = info
        .captured
        .get(crate::image::rootfs::DPKG_STATUS)
        .context("the base rootfs has no dpkg status database")?;
    let dpkg = crate::image::rootfs::parse_dpkg_entries(&String::from_utf8_lossy(status));
    let packages = crate::image::sbom::packages(&info, &dpkg);
    let chain = crate::image::disk::boot::chain(&info, &boot, &dpkg);

    let mut additions = artifact_additions(recipe, lock, artifacts, work.scratch.path())?;
    additions.extend(baked.additions.iter().cloned());
    // Artifacts and container images are recorded by their digests; every
    // other file kiln adds is listed with its own (`added_files`).
    let by_digest: std::collections::HashSet<String> =
        additions.iter().map(|a| a.origin.clone()).collect();
    let ctx = crate::image::cloudinit::context(recipe, "", &toml::Table::new())?;
    for o in recipe.all_overlays() {
        additions.extend(crate::image::compose::overlay_additions(
            &recipe.overlay_dir(&o),
            &format!("overlays/{o}"),
            &ctx,
        )?);
    }
    additions.extend(defaults::kiln_defaults(recipe, &ids.root_fs_uuid, &info));
    additions.extend(defaults::unit_additions(recipe, &info, &additions)?);

    let tar = work.scratch.path().join("rootfs.tar");
    let composed = crate::image::compose::compose(
        crate::image::compose::ComposePlan {
            base_tar: &base.tar,
            base: &info,
            drop: &|p: &str, n: &Node| {
                crate::image::hygiene::clean_reason(p, n).is_some()
                    || defaults::is_disabled_link(recipe, p)
            },
            additions,
            record: &|a: &Addition| !by_digest.contains(&a.origin),
            mtime: lock.source_date_epoch,
            hygiene: &recipe.hygiene,
        },
        &tar,
    )?;
    if !composed.report.violations.is_empty() {
        bail!(
            "hygiene check failed: {}",
            composed.report.violations.join("; ")
        );
    }
    Ok(ComposedRootfs {
        tar,
        composed,
        boot,
        cmdline,
        packages,
        chain,
    })
}

/// Each artifact as files in the image: unpacked tarballs or one file.
fn artifact_additions(
    recipe: &Recipe,
    lock: &Lockfile,
    artifacts: &BTreeMap<String, PathBuf>,
    scratch: &Path,
) -> Result<Vec<Addition>> {
    let mut additions = Vec::new();
    for a in &recipe.artifacts {
        let origin = format!("artifact `{}`", a.name);
        let path = &artifacts[&a.name];
        let sha = lock.artifact_sha(&a.name).map(str::to_string);
        if a.extract {
            additions.extend(crate::image::compose::archive_additions(
                path,
                &a.dest,
                a.strip_components,
                &origin,
                scratch,
            )?);
        } else {
            additions.push(Addition {
                path: a.dest.clone(),
                kind: AddKind::File {
                    content: Content::Path {
                        path: path.clone(),
                        sha256: sha,
                    },
                    mode: a.mode,
                },
                origin,
            });
        }
    }
    Ok(additions)
}

/// What the output stages left in the staging directory.
struct StagedOutputs {
    staging: LockedDir,
    disk: DiskInfo,
    lxc: Option<FileInfo>,
    /// The names of the references kept for the next build.
    references: Vec<String>,
}

/// The disk, compress and lxc stages: the raw disk (in RAM when there is
/// room), its qcow2, and the LXC archive compressed from the same tar at the
/// same time. Scratch is deleted in the background while the image is hashed.
#[allow(clippy::too_many_arguments)]
fn write_outputs(
    timer: &mut Timer,
    recipe: &Recipe,
    layout: &Layout,
    ids: &Identities,
    rootfs: &ComposedRootfs,
    epoch: u64,
    work: Workspace,
    opts: &BuildOptions<'_>,
) -> Result<StagedOutputs> {
    let Workspace { scratch, staging } = work;
    let data_bytes = rootfs.composed.data_bytes;
    // The raw disk lives only until it is compressed: in RAM when there is
    // room (writing and deleting it costs far less there), else in the cache.
    let ram = crate::image::disk::ram_scratch(crate::image::disk::scratch_need(layout, data_bytes));
    let raw = ram.as_ref().unwrap_or(&scratch).path().join("disk.raw");
    let qcow2_name = OutputKind::Disk.file_name(&recipe.name, &recipe.version);
    let qcow2 = staging.path().join(&qcow2_name);
    let lxc_name = OutputKind::Lxc.file_name(&recipe.name, &recipe.version);
    let lxc_path = staging.path().join(&lxc_name);
    let lxc_reference = opts.cache.reference(&crate::image::outputs::reference_name(
        OutputKind::Lxc,
        &recipe.name,
    ));
    let stop_lxc = AtomicBool::new(false);
    let lxc = std::thread::scope(|s| -> Result<Option<FileInfo>> {
        let lxc_job = recipe.lxc.then(|| {
            s.spawn(|| {
                crate::image::outputs::lxc::write(
                    &rootfs.tar,
                    &lxc_path,
                    Some(&lxc_reference),
                    &stop_lxc,
                )
            })
        });
        let disk = DiskInputs {
            layout,
            ids,
            boot: &rootfs.boot,
            cmdline: &rootfs.cmdline,
            rootfs_tar: &rootfs.tar,
            epoch,
            data_bytes,
        };
        let made = write_disk(timer, recipe, opts, &raw, &qcow2, &disk);
        if made.is_err() {
            stop_lxc.store(true, Ordering::SeqCst);
        }
        made?;
        let Some(job) = lxc_job else { return Ok(None) };
        let stats = timer.run(BuildStage::Lxc, || {
            let written = job.join().expect("LXC compression thread panicked")?;
            crate::image::reuse::keep_or_warn(&lxc_reference, &lxc_path, &written.index);
            let all = written.stats.reused == written.stats.frames;
            Ok((written.stats, all))
        })?;
        timer.reused(stats.reused, stats.frames, OutputKind::Lxc.reuse_unit());
        Ok(Some(FileInfo {
            file: lxc_name.clone(),
            sha256: stats.sha256,
            size: stats.size,
        }))
    })?;
    // Deleting gigabytes of scratch takes a while: do it while the image is
    // hashed and promoted (waited for when `build` returns).
    let _cleanup = crate::util::Background::spawn(move || {
        let _ = std::fs::remove_file(&raw);
        drop(ram);
        drop(scratch);
    });
    let id = crate::util::sha256_file(&qcow2)?;
    let disk = DiskInfo {
        file: qcow2_name,
        format: "qcow2".to_string(),
        sha256: id,
        size: std::fs::metadata(&qcow2)?.len(),
        virtual_size: crate::image::disk::virtual_size(&qcow2)?,
        root_fs_uuid: ids.root_fs_uuid.clone(),
    };
    let mut references = vec![crate::image::outputs::reference_name(
        OutputKind::Disk,
        &recipe.name,
    )];
    if recipe.lxc {
        references.push(crate::image::outputs::reference_name(
            OutputKind::Lxc,
            &recipe.name,
        ));
    }
    Ok(StagedOutputs {
        staging,
        disk,
        lxc,
        references,
    })
}

/// The disk stage (raw GPT disk) and the compress stage (qcow2, reusing the
/// recipe's last image as a reference, which this image then replaces).
fn write_disk(
    timer: &mut Timer,
    recipe: &Recipe,
    opts: &BuildOptions<'_>,
    raw: &Path,
    qcow2: &Path,
    inputs: &DiskInputs<'_>,
) -> Result<()> {
    let show = opts.show_progress;
    timer.run(BuildStage::Disk, || {
        let pb = crate::util::progress::spinner(
            show,
            if recipe.boot.bios {
                "writing disk (GPT, ESP, BIOS boot, ext4)"
            } else {
                "writing disk (GPT, ESP, ext4)"
            },
        );
        let r = crate::image::disk::assemble(raw, inputs);
        pb.finish_and_clear();
        r.map(|_| ((), false))
    })?;
    let stats = timer.run(BuildStage::Compress, || {
        let reference = opts.cache.reference(&crate::image::outputs::reference_name(
            OutputKind::Disk,
            &recipe.name,
        ));
        let written = crate::image::outputs::qcow2::write(raw, qcow2, Some(&reference), show)?;
        crate::image::reuse::keep_or_warn(&reference, qcow2, &written.index);
        let all = written.stats.reused == written.stats.data_clusters;
        Ok((written.stats, all))
    })?;
    timer.reused(
        stats.reused,
        stats.data_clusters,
        OutputKind::Disk.reuse_unit(),
    );
    Ok(())
}

/// The sbom stage: the SPDX document of the staged image, named by the
/// disk's sha256, from what compose read and what the lock pinned.
fn write_sbom(
    recipe: &Recipe,
    lock: &Lockfile,
    rootfs: &ComposedRootfs,
    outputs: &StagedOutputs,
) -> Result<FileInfo> {
    use crate::image::sbom::{SbomArtifact, SbomInput};
    let mut images = BTreeMap::new();
    for i in &recipe.images {
        let digest = lock
            .images
            .get(&i.reference)
            .with_context(|| format!("image `{}` has no digest in the lock", i.reference))?;
        images.insert(i.reference.clone(), digest.clone());
    }
    let input = SbomInput {
        name: &recipe.name,
        version: &recipe.version,
        image_id: &outputs.disk.sha256,
        disk_file: &outputs.disk.file,
        source_date_epoch: lock.source_date_epoch,
        distribution: recipe.base.distribution,
        suite: &recipe.base.suite,
        packages: &rootfs.packages,
        artifacts: recipe
            .artifacts
            .iter()
            .map(|a| SbomArtifact {
                name: a.name.clone(),
                url: a.url.clone(),
                sha256: lock.artifact_sha(&a.name).unwrap_or_default().to_string(),
                dest: a.dest.clone(),
                extract: a.extract,
            })
            .collect(),
        images,
        boot: &rootfs.chain,
    };
    crate::image::sbom::write(
        outputs.staging.path(),
        &OutputKind::Sbom.file_name(&recipe.name, &recipe.version),
        &input,
    )
}

/// The manifest of the staged image (stages are filled in by the caller).
fn image_manifest(
    recipe: &Recipe,
    base: &BaseRootfs,
    inputs: InputDigests,
    rootfs: &ComposedRootfs,
    outputs: &StagedOutputs,
    sbom: FileInfo,
    epoch: u64,
) -> Result<ImageManifest> {
    let validate = ValidateSpec {
        role: recipe.validate_role.clone(),
        user_data: match &recipe.validate_role {
            Some(role) if recipe.roles[role].user_data.is_some() => Some(
                crate::image::cloudinit::render(recipe, role, &recipe.roles[role].test_values)?,
            ),
            _ => None,
        },
        checks: recipe.checks.clone(),
    };
    Ok(ImageManifest {
        name: recipe.name.clone(),
        version: recipe.version.clone(),
        id: outputs.disk.sha256.clone(),
        kiln_version: env!("CARGO_PKG_VERSION").to_string(),
        disk: outputs.disk.clone(),
        inputs,
        source_date_epoch: epoch,
        boot: BootInfo {
            uefi: recipe.boot.uefi,
            secure_boot: recipe.boot.secure_boot,
            bios: recipe.boot.bios,
            kernel: rootfs.boot.kernel_version.clone(),
            cmdline: rootfs.cmdline.clone(),
            chain: rootfs.chain.clone(),
        },
        packages: base.meta.packages.clone(),
        hygiene: rootfs.composed.report.clone(),
        stages: Vec::new(),
        roles: recipe.roles.keys().cloned().collect(),
        validate,
        lxc: outputs.lxc.clone(),
        sbom: Some(sbom),
        added_files: rootfs.composed.added.clone(),
        validation: None,
    })
}

/// The validate stage: the hook boots the staged image and records its result
/// in the staged manifest, which gets the stage's time too.
fn validate_staged(validate: BeforePromote<'_>, staged: &Path) -> Result<ImageManifest> {
    crate::util::check_interrupted()?;
    let t = Instant::now();
    validate(staged).context("validate stage failed")?;
    let mut manifest = ImageManifest::load(staged)?;
    manifest.stages.push(StageTiming {
        stage: BuildStage::Validate.name().into(),
        seconds: crate::util::round2(t.elapsed().as_secs_f64()),
        cached: false,
        reused: None,
    });
    manifest.save(staged)?;
    Ok(manifest)
}

/// Per-stage wall time, in pipeline order, for the manifest.
#[derive(Default)]
struct Timer {
    stages: Vec<StageTiming>,
}

impl Timer {
    fn run<T>(&mut self, stage: BuildStage, f: impl FnOnce() -> Result<(T, bool)>) -> Result<T> {
        crate::util::check_interrupted()?;
        let t = Instant::now();
        let (v, cached) = f().with_context(|| format!("{} stage failed", stage.name()))?;
        self.stages.push(StageTiming {
            stage: stage.name().to_string(),
            seconds: crate::util::round2(t.elapsed().as_secs_f64()),
            cached,
            reused: None,
        });
        Ok(v)
    }

    /// Record how much the stage just run reused from the last image.
    fn reused(&mut self, reused: u64, total: u64, unit: &str) {
        if let Some(s) = self.stages.last_mut() {
            s.reused = Some(crate::image::manifest::Reuse {
                reused,
                total,
                unit: unit.to_string(),
            });
        }
    }
}
