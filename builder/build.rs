//! Build: run the pipeline for one recipe, stage by stage, and publish the
//! result atomically as `images/<name>/<version>/{disk, manifest.json, SHA256SUMS}`.
//!
//! Stages: resolve (recipe + lock) → fetch → rootfs (cached mmdebstrap) →
//! compose (artifacts, overlays, roles, kiln defaults, hygiene) → disk →
//! compress → [validate] → publish. Each stage's time lands in the manifest.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::compose::{AddKind, Addition, Content, Node};
use crate::fetch::Cache;
use crate::lock::Lockfile;
use crate::manifest::{
    BootInfo, DiskInfo, FileInfo, ImageManifest, InputDigests, StageTiming, ValidateSpec,
};
use crate::recipe::Recipe;

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
    Validate,
    Publish,
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
            BuildStage::Validate => "validate",
            BuildStage::Publish => "publish",
        }
    }
}

/// A hook run on the finished image directory before it is published
/// (`kiln build` validates there, so only validated images appear).
pub type BeforePublish<'a> = &'a dyn Fn(&Path) -> Result<()>;

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
    pub registry_auth: crate::oci::Auth,
    pub before_publish: Option<BeforePublish<'a>>,
}

pub struct BuildOutcome {
    pub dir: PathBuf,
    pub manifest: ImageManifest,
    /// Nothing to do: the image for these inputs already exists.
    pub up_to_date: bool,
}

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
            seconds: round2(t.elapsed().as_secs_f64()),
            cached,
            reused: None,
        });
        Ok(v)
    }

    /// Record how much the stage just run reused from the last image.
    fn reused(&mut self, reused: u64, total: u64, unit: &str) {
        if let Some(s) = self.stages.last_mut() {
            s.reused = Some(crate::manifest::Reuse {
                reused,
                total,
                unit: unit.to_string(),
            });
        }
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
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

/// sha256 over an overlay tree: paths, kinds, modes, contents and link targets.
pub fn overlay_digest(dir: &Path) -> Result<String> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut stack = vec![dir.to_path_buf()];
    let mut files = Vec::new();
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("cannot read {}", d.display()))? {
            let p = e?.path();
            let m = std::fs::symlink_metadata(&p)?;
            if m.is_dir() {
                stack.push(p.clone());
            }
            files.push((p, m));
        }
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    for (p, m) in files {
        let rel = p
            .strip_prefix(dir)
            .expect("under dir")
            .to_string_lossy()
            .into_owned();
        let mode = crate::compose::overlay_mode(&m);
        h.update(format!("{rel}\0{mode:o}\0").as_bytes());
        if m.file_type().is_symlink() {
            h.update(std::fs::read_link(&p)?.to_string_lossy().as_bytes());
        } else if m.is_file() {
            h.update(crate::util::sha256_file(&p)?.as_bytes());
        }
        h.update(b"\n");
    }
    Ok(hex::encode(h.finalize()))
}

/// Inputs known before any heavy work; equal inputs mean an equal image.
fn input_digests(recipe: &Recipe, lock: &Lockfile, lock_bytes: &[u8]) -> Result<InputDigests> {
    let mut overlays = BTreeMap::new();
    for o in recipe.all_overlays() {
        overlays.insert(o.clone(), overlay_digest(&recipe.overlay_dir(&o))?);
    }
    let mut role_templates = BTreeMap::new();
    for (name, role) in &recipe.roles {
        if let Some(t) = &role.user_data {
            role_templates.insert(format!("role:{name}"), crate::util::sha256_file(t)?);
        }
    }
    overlays.extend(role_templates);
    Ok(InputDigests {
        recipe: recipe.digest(),
        lock: crate::util::sha256_hex(lock_bytes),
        artifacts: lock
            .artifacts
            .iter()
            .map(|(k, v)| (k.clone(), v.sha256.clone()))
            .collect(),
        images: lock.images.clone(),
        base_rootfs_key: crate::rootfs::base_key(recipe, lock),
        base_rootfs: String::new(),
        overlays,
    })
}

/// Build a recipe into `opts.out/<name>/<version>/`.
pub fn build(recipe_path: &Path, opts: &BuildOptions<'_>) -> Result<BuildOutcome> {
    let mut timer = Timer { stages: Vec::new() };
    let show = opts.show_progress;
    let (recipe, mut lock) = timer.run(BuildStage::Resolve, || {
        crate::hosttools::require(crate::hosttools::BUILD_TOOLS)?;
        let (recipe, lock) = resolve(recipe_path)?;
        if recipe.boot.bios {
            crate::hosttools::require(&[crate::hosttools::GRUB_MKIMAGE])?;
        }
        Ok(((recipe, lock), false))
    })?;
    let lock_path = recipe.lock_path();
    let dest = opts.out.join(&recipe.name).join(&recipe.version);

    // Up to date?
    if !lock.packages.is_empty() {
        let inputs = input_digests(&recipe, &lock, &std::fs::read(&lock_path)?)?;
        if let Some(existing) = existing_image(&dest, &inputs, opts.force)? {
            return Ok(BuildOutcome {
                dir: dest,
                manifest: existing,
                up_to_date: true,
            });
        }
    }

    // Fetch artifacts.
    let artifact_paths: BTreeMap<String, PathBuf> = timer.run(BuildStage::Fetch, || {
        let mut out = BTreeMap::new();
        let mut all_cached = true;
        for a in &recipe.artifacts {
            let sha = lock.artifact_sha(&a.name).expect("checked by resolve");
            all_cached &= opts.cache.get(sha).is_some();
            let (p, _) =
                opts.cache
                    .fetch(&format!("artifact `{}`", a.name), &a.url, Some(sha), show)?;
            out.insert(a.name.clone(), p);
        }
        Ok((out, all_cached))
    })?;

    // Base rootfs (cached by its inputs).
    let base = timer.run(BuildStage::Rootfs, || {
        let b = crate::rootfs::ensure_base(&recipe, &lock, &opts.cache, show)?;
        let cached = b.cached;
        Ok((b, cached))
    })?;
    if lock.packages.is_empty() {
        if opts.locked {
            bail!("{} has no package pins and --locked forbids writing them: build once without --locked", lock_path.display());
        }
        lock.packages = base.meta.packages.clone();
        lock.save(&lock_path)?;
    }
    let lock_bytes = std::fs::read(&lock_path)?;
    let mut inputs = input_digests(&recipe, &lock, &lock_bytes)?;
    if let Some(existing) = existing_image(&dest, &inputs, opts.force)? {
        return Ok(BuildOutcome {
            dir: dest,
            manifest: existing,
            up_to_date: true,
        });
    }

    let scratch = opts.cache.scratch("build-")?;
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("cannot create {}", opts.out.display()))?;
    crate::util::remove_stale_dirs(&opts.out, ".kiln-staging-");
    let staging = tempfile::Builder::new()
        .prefix(&format!(".kiln-staging-{}-", std::process::id()))
        .tempdir_in(&opts.out)
        .with_context(|| {
            format!(
                "cannot create a staging directory in {}",
                opts.out.display()
            )
        })?;

    // Container images: pulled at their locked digests, one archive each.
    let layout =
        crate::disk::Layout::new(recipe.disk.size, recipe.disk.esp_size, recipe.boot.bios)?;
    let baked = if recipe.images.is_empty() {
        crate::images::Baked::default()
    } else {
        timer.run(BuildStage::Images, || {
            let used = base.meta.size
                + artifact_paths
                    .values()
                    .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
                    .sum::<u64>();
            let baked = crate::images::bake(
                &recipe,
                &lock,
                &crate::images::BakeOptions {
                    cache_root: &opts.cache.root,
                    auth: opts.registry_auth.clone(),
                    max_total_bytes: Some(crate::images::space_left(layout.root_size, used)),
                    scratch: scratch.path(),
                    show_progress: show,
                },
            )?;
            let cached = baked.all_cached;
            Ok((baked, cached))
        })?
    };

    // Everything the image's identities derive from: its inputs (not the base
    // tarball's digest, which is informational; see existing_image).
    let seed = crate::util::sha256_hex(serde_json::to_string(&inputs)?.as_bytes());
    inputs.base_rootfs = base.meta.sha256.clone();
    let ids = crate::disk::Identities::derive(&seed);
    let epoch = lock.source_date_epoch;

    // Compose the final rootfs tar.
    let final_tar = scratch.path().join("rootfs.tar");
    let (composed, boot_files, kernel_cmdline) = timer.run(BuildStage::Compose, || {
        let unit_paths: Vec<String> = recipe
            .units
            .enable
            .iter()
            .flat_map(|u| {
                [
                    "usr/lib/systemd/system/",
                    "lib/systemd/system/",
                    "etc/systemd/system/",
                ]
                .map(|d| format!("{d}{u}"))
            })
            .collect();
        let want = |p: &str| {
            p == "var/lib/dpkg/status"
                || p == crate::disk::SHIM
                || p == crate::disk::GRUB_SIGNED
                || p == crate::disk::MOK_MANAGER
                || (recipe.boot.bios && crate::disk::bios::wanted(p))
                || unit_paths.iter().any(|u| u == p)
        };
        let info = crate::compose::index_base(&base.tar, &want)?;
        let boot_files = boot_files(&info, &recipe, scratch.path())?;
        let cmdline = crate::disk::cmdline(&ids, &recipe.boot.cmdline);

        let mut additions = Vec::new();
        for a in &recipe.artifacts {
            let origin = format!("artifact `{}`", a.name);
            let path = &artifact_paths[&a.name];
            let sha = lock.artifact_sha(&a.name).map(str::to_string);
            if a.extract {
                additions.extend(crate::compose::archive_additions(
                    path,
                    &a.dest,
                    a.strip_components,
                    &origin,
                    scratch.path(),
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
        additions.extend(baked.additions.iter().cloned());
        let ctx = crate::cloudinit::context(&recipe, "", &toml::Table::new())?;
        for o in recipe.all_overlays() {
            additions.extend(crate::compose::overlay_additions(
                &recipe.overlay_dir(&o),
                &format!("overlays/{o}"),
                &ctx,
            )?);
        }
        additions.extend(kiln_defaults(&recipe, &ids, &info));
        additions.extend(unit_additions(&recipe, &info, &additions)?);

        let composed = crate::compose::compose(
            crate::compose::ComposePlan {
                base_tar: &base.tar,
                base: &info,
                drop: &|p: &str, n: &Node| {
                    crate::hygiene::clean_reason(p, n).is_some() || is_disabled_link(&recipe, p)
                },
                additions,
                mtime: epoch,
                hygiene: &recipe.hygiene,
            },
            &final_tar,
        )?;
        if !composed.report.violations.is_empty() {
            bail!(
                "hygiene check failed: {}",
                composed.report.violations.join("; ")
            );
        }
        Ok(((composed, boot_files, cmdline), false))
    })?;

    let lxc_name = format!("{}-{}-lxc.tar.zst", recipe.name, recipe.version);
    let lxc_path = staging.path().join(&lxc_name);
    let lxc_reference = opts
        .cache
        .reference(&crate::lxc::reference_name(&recipe.name));
    // The raw disk lives only until it is compressed: in RAM when there is
    // room (writing and deleting it costs far less there), else in the cache.
    let ram = crate::disk::ram_scratch(crate::disk::scratch_need(&layout, composed.data_bytes));
    let raw = ram.as_ref().unwrap_or(&scratch).path().join("disk.raw");
    let disk_file = format!("{}-{}.qcow2", recipe.name, recipe.version);
    let qcow2 = staging.path().join(&disk_file);
    let stop_lxc = AtomicBool::new(false);
    let lxc = std::thread::scope(|s| -> Result<Option<FileInfo>> {
        // The LXC archive is compressed from the same tar while the disk is
        // assembled and compressed.
        let lxc_job = recipe.lxc.then(|| {
            s.spawn(|| crate::lxc::write(&final_tar, &lxc_path, Some(&lxc_reference), &stop_lxc))
        });
        let disk = disk_and_compress(
            &mut timer,
            &recipe,
            opts,
            &raw,
            &qcow2,
            &crate::disk::DiskInputs {
                layout: &layout,
                ids: &ids,
                boot: &boot_files,
                cmdline: &kernel_cmdline,
                rootfs_tar: &final_tar,
                epoch,
                data_bytes: composed.data_bytes,
            },
        );
        if disk.is_err() {
            stop_lxc.store(true, Ordering::SeqCst);
        }
        disk?;
        let Some(job) = lxc_job else { return Ok(None) };
        let stats = timer.run(BuildStage::Lxc, || {
            let written = job.join().expect("LXC compression thread panicked")?;
            crate::reuse::keep_or_warn(&lxc_reference, &lxc_path, &written.index);
            let stats = written.stats;
            let all = stats.reused == stats.frames;
            Ok((stats, all))
        })?;
        timer.reused(stats.reused, stats.frames, "zstd frames");
        Ok(Some(FileInfo {
            file: lxc_name.clone(),
            sha256: stats.sha256,
            size: stats.size,
        }))
    })?;
    // Deleting gigabytes of scratch takes a while: do it while the image is
    // hashed and published (waited for when `build` returns).
    let _cleanup = crate::util::Background::spawn(move || {
        let _ = std::fs::remove_file(&raw);
        drop(ram);
        drop(scratch);
    });

    let id = crate::util::sha256_file(&qcow2)?;
    let validate =
        ValidateSpec {
            role: recipe.validate_role.clone(),
            user_data: match &recipe.validate_role {
                Some(role) if recipe.roles[role].user_data.is_some() => Some(
                    crate::cloudinit::render(&recipe, role, &recipe.roles[role].test_values)?,
                ),
                _ => None,
            },
            checks: recipe.checks.clone(),
        };
    let mut manifest = ImageManifest {
        name: recipe.name.clone(),
        version: recipe.version.clone(),
        id: id.clone(),
        kiln_version: env!("CARGO_PKG_VERSION").to_string(),
        disk: DiskInfo {
            file: disk_file.clone(),
            format: "qcow2".to_string(),
            sha256: id.clone(),
            size: std::fs::metadata(&qcow2)?.len(),
            virtual_size: crate::disk::virtual_size(&qcow2)?,
            root_fs_uuid: ids.root_fs_uuid.clone(),
        },
        inputs,
        source_date_epoch: epoch,
        boot: BootInfo {
            uefi: recipe.boot.uefi,
            secure_boot: recipe.boot.secure_boot,
            bios: recipe.boot.bios,
            kernel: boot_files.kernel_version.clone(),
            cmdline: kernel_cmdline.clone(),
        },
        packages: base.meta.packages.clone(),
        hygiene: composed.report,
        stages: Vec::new(),
        roles: recipe.roles.keys().cloned().collect(),
        validate,
        lxc,
        validation: None,
    };
    manifest.stages = timer.stages.clone();
    manifest.save(staging.path())?;
    write_sums(staging.path(), &manifest)?;

    if let Some(hook) = opts.before_publish {
        let t = Instant::now();
        hook(staging.path()).context("validate stage failed")?;
        manifest = ImageManifest::load(staging.path())?;
        manifest.stages.push(StageTiming {
            stage: BuildStage::Validate.name().into(),
            seconds: round2(t.elapsed().as_secs_f64()),
            cached: false,
            reused: None,
        });
        manifest.save(staging.path())?;
    }

    crate::util::check_interrupted()?;
    publish(staging, &dest)?;
    Ok(BuildOutcome {
        dir: dest,
        manifest,
        up_to_date: false,
    })
}

/// The disk stage (raw GPT disk) and the compress stage (qcow2, reusing the
/// recipe's last image as a reference, which this image then replaces).
fn disk_and_compress(
    timer: &mut Timer,
    recipe: &Recipe,
    opts: &BuildOptions<'_>,
    raw: &Path,
    qcow2: &Path,
    inputs: &crate::disk::DiskInputs<'_>,
) -> Result<()> {
    let show = opts.show_progress;
    timer.run(BuildStage::Disk, || {
        let pb = crate::progress::spinner(
            show,
            if recipe.boot.bios {
                "writing disk (GPT, ESP, BIOS boot, ext4)"
            } else {
                "writing disk (GPT, ESP, ext4)"
            },
        );
        let r = crate::disk::assemble(raw, inputs);
        pb.finish_and_clear();
        r.map(|_| ((), false))
    })?;
    let stats = timer.run(BuildStage::Compress, || {
        let reference = opts
            .cache
            .reference(&crate::disk::qcow2::reference_name(&recipe.name));
        let written = crate::disk::qcow2::write(raw, qcow2, Some(&reference), show)?;
        crate::reuse::keep_or_warn(&reference, qcow2, &written.index);
        let stats = written.stats;
        let all = stats.reused == stats.data_clusters;
        Ok((stats, all))
    })?;
    timer.reused(stats.reused, stats.data_clusters, "qcow2 clusters");
    Ok(())
}

/// An existing image built from exactly these inputs, or an error if one
/// with the same name and version differs (unless `force`).
fn existing_image(
    dest: &Path,
    inputs: &InputDigests,
    force: bool,
) -> Result<Option<ImageManifest>> {
    if !dest.join(crate::manifest::MANIFEST_FILE).exists() {
        return Ok(None);
    }
    let m = ImageManifest::load(dest)?;
    // The base tarball's own digest is informational: the same inputs can
    // give a base that differs only in what compose cleans away.
    let mut a = m.inputs.clone();
    a.base_rootfs.clear();
    let same = a == *inputs && m.kiln_version == env!("CARGO_PKG_VERSION");
    let disk_ok = std::fs::metadata(m.disk_path(dest))
        .map(|md| md.len() == m.disk.size)
        .unwrap_or(false);
    if same && disk_ok {
        return Ok(Some(m));
    }
    if !force {
        bail!(
            "{} already exists and was built from different inputs: bump `version` in the recipe, or pass --force to replace it",
            dest.display()
        );
    }
    Ok(None)
}

/// Move the staging directory into place in one rename.
fn publish(staging: tempfile::TempDir, dest: &Path) -> Result<()> {
    let parent = dest.parent().expect("dest has a parent");
    std::fs::create_dir_all(parent)?;
    let staged = staging.keep();
    if dest.exists() {
        let old = parent.join(format!(".kiln-replaced-{}", std::process::id()));
        std::fs::rename(dest, &old)
            .with_context(|| format!("cannot move aside {}", dest.display()))?;
        if let Err(e) = std::fs::rename(&staged, dest) {
            let _ = std::fs::rename(&old, dest);
            let _ = std::fs::remove_dir_all(&staged);
            return Err(e).with_context(|| format!("cannot publish {}", dest.display()));
        }
        let _ = std::fs::remove_dir_all(&old);
    } else if let Err(e) = std::fs::rename(&staged, dest) {
        let _ = std::fs::remove_dir_all(&staged);
        return Err(e).with_context(|| format!("cannot publish {}", dest.display()));
    }
    Ok(())
}

/// `SHA256SUMS` in the format `sha256sum -c` reads.
fn write_sums(dir: &Path, m: &ImageManifest) -> Result<()> {
    let mut text = format!("{}  {}\n", m.disk.sha256, m.disk.file);
    if let Some(l) = &m.lxc {
        text.push_str(&format!("{}  {}\n", l.sha256, l.file));
    }
    crate::util::write_atomic(&dir.join(crate::manifest::SUMS_FILE), text.as_bytes())
}

/// Shim, signed grub, the kernel version and (for BIOS boot) GRUB's i386-pc
/// images made from the base rootfs's grub-pc-bin, in `scratch`.
fn boot_files(
    info: &crate::compose::BaseInfo,
    recipe: &Recipe,
    scratch: &Path,
) -> Result<crate::disk::BootFiles> {
    let need = |p: &str, pkg: &str| {
        info.captured.get(p).cloned().with_context(|| {
            format!("the rootfs has no /{p} (package {pkg}); it is needed to boot with Secure Boot")
        })
    };
    let mut kernels: Vec<&str> = info
        .index
        .nodes
        .iter()
        .filter(|(p, n)| **n == Node::File && p.starts_with("boot/vmlinuz-"))
        .map(|(p, _)| p.trim_start_matches("boot/vmlinuz-"))
        .collect();
    kernels.sort_by(|a, b| version_cmp(a, b));
    let kv = kernels
        .last()
        .with_context(|| {
            format!(
                "the rootfs has no kernel in /boot (package linux-image-{})",
                recipe.base.architecture
            )
        })?
        .to_string();
    if !info
        .index
        .nodes
        .contains_key(&format!("boot/initrd.img-{kv}"))
    {
        bail!("the rootfs has no /boot/initrd.img-{kv} (package initramfs-tools)");
    }
    Ok(crate::disk::BootFiles {
        shim: need(crate::disk::SHIM, "shim-signed")?,
        grub: need(crate::disk::GRUB_SIGNED, "grub-efi-amd64-signed")?,
        mok_manager: info.captured.get(crate::disk::MOK_MANAGER).cloned(),
        bios: if recipe.boot.bios {
            Some(crate::disk::bios::make(&info.captured, scratch)?)
        } else {
            None
        },
        kernel_version: kv,
    })
}

/// Compare kernel versions by their numeric parts.
fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let parts = |s: &str| {
        s.split(|c: char| !c.is_ascii_digit())
            .filter_map(|x| x.parse::<u64>().ok())
            .collect::<Vec<_>>()
    };
    parts(a).cmp(&parts(b)).then(a.cmp(b))
}

fn file(path: &str, text: String, origin: &str) -> Addition {
    Addition {
        path: path.to_string(),
        kind: AddKind::File {
            content: Content::Bytes(text.into_bytes()),
            mode: 0o644,
        },
        origin: origin.to_string(),
    }
}

fn mask(unit: &str) -> Addition {
    Addition {
        path: format!("/etc/systemd/system/{unit}"),
        kind: AddKind::Symlink {
            target: "/dev/null".into(),
        },
        origin: format!("kiln: mask {unit}"),
    }
}

/// Files kiln writes into every image: identity reset, fstab, cloud-init
/// config, and immutability (no apt timers, no unattended upgrades).
fn kiln_defaults(
    recipe: &Recipe,
    ids: &crate::disk::Identities,
    info: &crate::compose::BaseInfo,
) -> Vec<Addition> {
    let origin = "kiln defaults";
    let mut v = vec![
        file("/etc/machine-id", String::new(), origin),
        file("/etc/fstab", format!("# Written by kiln.\nUUID={} / ext4 errors=remount-ro 0 1\n", ids.root_fs_uuid), origin),
        file(crate::cloudinit::IMAGE_CONFIG_PATH, crate::cloudinit::image_config(), origin),
        file("/etc/default/locale", "LANG=C.UTF-8\n".into(), origin),
        file(
            "/etc/apt/apt.conf.d/20auto-upgrades",
            "// Written by kiln: nodes are replaced, never upgraded in place.\nAPT::Periodic::Update-Package-Lists \"0\";\nAPT::Periodic::Unattended-Upgrade \"0\";\n".into(),
            origin,
        ),
        file(
            "/etc/kiln-release",
            format!("KILN_IMAGE_NAME={}\nKILN_IMAGE_VERSION={}\nKILN_RECIPE_DIGEST={}\n", recipe.name, recipe.version, recipe.digest()),
            origin,
        ),
        mask("apt-daily.timer"),
        mask("apt-daily-upgrade.timer"),
    ];
    for u in ["unattended-upgrades.service"] {
        if ["usr/lib/systemd/system/", "lib/systemd/system/"]
            .iter()
            .any(|d| info.index.nodes.contains_key(&format!("{d}{u}")))
        {
            v.push(mask(u));
        }
    }
    for u in &recipe.units.mask {
        v.push(mask(u));
    }
    v
}

/// `[Install]` targets of a unit file: (WantedBy, RequiredBy).
fn install_targets(text: &str) -> Vec<(String, &'static str)> {
    let mut in_install = false;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_install = line == "[Install]";
            continue;
        }
        if !in_install {
            continue;
        }
        for (key, kind) in [("WantedBy=", "wants"), ("RequiredBy=", "requires")] {
            if let Some(v) = line.strip_prefix(key) {
                out.extend(v.split_whitespace().map(|t| (t.to_string(), kind)));
            }
        }
    }
    out
}

/// Enable units as `systemctl enable` would (symlinks in `*.wants`), and
/// disable ones the recipe names, without running anything in the image.
fn unit_additions(
    recipe: &Recipe,
    info: &crate::compose::BaseInfo,
    added: &[Addition],
) -> Result<Vec<Addition>> {
    let mut out = Vec::new();
    for unit in &recipe.units.enable {
        let from_overlay = added.iter().find_map(|a| match &a.kind {
            AddKind::File { content, .. }
                if a.path.ends_with(&format!("/systemd/system/{unit}")) =>
            {
                Some((a.path.clone(), content.clone()))
            }
            _ => None,
        });
        let (unit_path, text) = match from_overlay {
            Some((p, Content::Bytes(b))) => (p, String::from_utf8_lossy(&b).into_owned()),
            Some((p, Content::Path { path, .. })) => (p, std::fs::read_to_string(path)?),
            None => {
                let found = [
                    "etc/systemd/system/",
                    "usr/lib/systemd/system/",
                    "lib/systemd/system/",
                ]
                .iter()
                .find_map(|d| {
                    let p = format!("{d}{unit}");
                    info.captured
                        .get(&p)
                        .map(|b| (format!("/{p}"), String::from_utf8_lossy(b).into_owned()))
                });
                found.with_context(|| format!("[units] enable: unit `{unit}` is not in the image (install its package or add it in an overlay)"))?
            }
        };
        let targets = install_targets(&text);
        if targets.is_empty() {
            bail!("[units] enable: `{unit}` has no [Install] WantedBy= or RequiredBy=, so it cannot be enabled");
        }
        for (target, kind) in targets {
            out.push(Addition {
                path: format!("/etc/systemd/system/{target}.{kind}/{unit}"),
                kind: AddKind::Symlink {
                    target: unit_path.clone(),
                },
                origin: format!("[units] enable {unit}"),
            });
        }
    }
    Ok(out)
}

/// Whether a base entry is a `*.wants`/`*.requires` link to a disabled unit.
pub fn is_disabled_link(recipe: &Recipe, path: &str) -> bool {
    path.starts_with("etc/systemd/system/")
        && (path.contains(".wants/") || path.contains(".requires/"))
        && recipe
            .units
            .disable
            .iter()
            .any(|u| path.ends_with(&format!("/{u}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_section_targets_are_read() {
        let t = install_targets("[Unit]\nWantedBy=nope\n[Install]\nWantedBy=multi-user.target sockets.target\nRequiredBy=x.target\n");
        assert_eq!(
            t,
            vec![
                ("multi-user.target".into(), "wants"),
                ("sockets.target".into(), "wants"),
                ("x.target".into(), "requires")
            ]
        );
    }

    #[test]
    fn kernel_versions_sort_numerically() {
        let mut v = vec!["6.1.0-9-amd64", "6.1.0-50-amd64", "6.1.0-10-amd64"];
        v.sort_by(|a, b| version_cmp(a, b));
        assert_eq!(v.last(), Some(&"6.1.0-50-amd64"));
    }

    #[test]
    fn overlay_digest_changes_with_content_and_mode() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), "a").unwrap();
        let a = overlay_digest(d.path()).unwrap();
        std::fs::write(d.path().join("f"), "b").unwrap();
        let b = overlay_digest(d.path()).unwrap();
        std::fs::set_permissions(d.path().join("f"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        let c = overlay_digest(d.path()).unwrap();
        assert!(a != b && b != c);
    }

    #[test]
    fn overlay_digest_is_the_same_under_umask_022_and_002() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, "a").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let a = overlay_digest(d.path()).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o664)).unwrap();
        assert_eq!(overlay_digest(d.path()).unwrap(), a);
    }
}
