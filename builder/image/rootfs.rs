//! Rootfs: build the base root filesystem with mmdebstrap (SOURCE_DATE_EPOCH
//! set, packages pinned by the lock) and cache it by a digest of its inputs.
//!
//! The base is everything that depends on packages only, so a change to an
//! overlay, a var or a role reuses the cached tarball instead of reinstalling.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::image::fetch::Cache;
use crate::image::lock::Lockfile;
use crate::image::recipe::Recipe;

/// Bump when the way kiln calls mmdebstrap changes, to invalidate caches.
const BASE_FORMAT: u32 = 3;

/// A cached base rootfs tarball and what is known about it.
#[derive(Debug, Clone)]
pub(crate) struct BaseRootfs {
    pub tar: PathBuf,
    pub meta: BaseMeta,
    /// True when it came from the cache.
    pub cached: bool,
    /// The key it was also filed under by this build (the packages it
    /// pinned), so the next build finds it.
    pub pinned_key: Option<String>,
    /// A shared lock on the cache entry, held while the base is in use, so
    /// no other build replaces it and `kiln cache gc` leaves it alone.
    pub lock: Option<std::sync::Arc<crate::util::locks::Held>>,
}

impl BaseRootfs {
    /// The cache keys this base is filed under.
    pub(crate) fn keys(&self) -> Vec<String> {
        std::iter::once(self.meta.key.clone())
            .chain(self.pinned_key.clone())
            .collect()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BaseMeta {
    pub key: String,
    pub sha256: String,
    pub size: u64,
    pub packages: BTreeMap<String, String>,
    /// The tarball's stamp when its sha256 was last verified: while the file
    /// still has it, the 800 MB are not hashed again on every build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<crate::util::FileStamp>,
}

/// The mmdebstrap mirror argument (snapshot URL when the recipe pins one).
pub(crate) fn mirror_url(r: &Recipe) -> String {
    match (&r.base.snapshot, r.base.distribution) {
        (Some(ts), crate::image::recipe::Distribution::Debian) => {
            format!("http://snapshot.debian.org/archive/debian/{ts}")
        }
        (Some(ts), crate::image::recipe::Distribution::Ubuntu) => {
            format!("https://snapshot.ubuntu.com/ubuntu/{ts}")
        }
        (None, _) => r.base.mirror.clone(),
    }
}

/// Package arguments for mmdebstrap: pinned `name=version` for everything the
/// lock knows, otherwise the requested names.
fn include_list(r: &Recipe, lock: &Lockfile) -> Vec<String> {
    if lock.packages.is_empty() {
        r.requested_packages()
    } else {
        lock.packages
            .iter()
            .map(|(p, v)| format!("{p}={v}"))
            .collect()
    }
}

/// The cache key: a digest of every input of the base stage.
pub(crate) fn base_key(r: &Recipe, lock: &Lockfile) -> String {
    let v = serde_json::json!({
        "format": BASE_FORMAT,
        "distribution": r.base.distribution,
        "suite": r.base.suite,
        "mirror": mirror_url(r),
        "architecture": r.base.architecture,
        "components": r.base.components,
        "include": include_list(r, lock),
        "source_date_epoch": lock.source_date_epoch,
        "initrd_modules": r.boot.initrd_modules,
    });
    crate::util::sha256_hex(v.to_string().as_bytes())
}

fn paths(cache: &Cache, key: &str) -> (PathBuf, PathBuf) {
    let dir = cache.root.join("rootfs");
    (
        dir.join(format!("{key}.tar")),
        dir.join(format!("{key}.json")),
    )
}

/// The lock of the cache entry `key`.
fn lock_path(cache: &Cache, key: &str) -> PathBuf {
    cache.root.join("rootfs").join(format!("{key}.lock"))
}

/// A cached base under `key` that is untouched since its sha256 was last
/// verified: what a build may use under a shared lock (nothing is written).
fn lookup_stamped(cache: &Cache, key: &str) -> Option<BaseRootfs> {
    let (tar, meta_path) = paths(cache, key);
    let meta: BaseMeta = serde_json::from_slice(&std::fs::read(meta_path).ok()?).ok()?;
    let stamp = crate::util::FileStamp::of(&tar).ok()?;
    (meta.verified.as_ref() == Some(&stamp)).then_some(BaseRootfs {
        tar,
        meta,
        cached: true,
        pinned_key: None,
        lock: None,
    })
}

/// A cached base under `key`, if complete and intact: its sha256 matches,
/// or it is untouched since that was last verified (see [`FileStamp`]).
/// A corrupt entry is removed; a verified one is stamped. Only under the
/// entry's exclusive lock.
///
/// [`FileStamp`]: crate::util::FileStamp
fn lookup(cache: &Cache, key: &str) -> Option<BaseRootfs> {
    let (tar, meta_path) = paths(cache, key);
    let mut meta: BaseMeta = serde_json::from_slice(&std::fs::read(&meta_path).ok()?).ok()?;
    let stamp = crate::util::FileStamp::of(&tar).ok()?;
    if meta.verified.as_ref() != Some(&stamp) {
        // Truncated, replaced or rotted: never serve it.
        if stamp.size != meta.size || crate::util::sha256_file(&tar).ok()? != meta.sha256 {
            let _ = std::fs::remove_file(&tar);
            let _ = std::fs::remove_file(&meta_path);
            return None;
        }
        meta.verified = Some(stamp);
        // Only a hint: if it is lost, the next build hashes again.
        let _ = crate::util::write_hint(
            &meta_path,
            serde_json::to_string_pretty(&meta)
                .unwrap_or_default()
                .as_bytes(),
        );
    }
    Some(BaseRootfs {
        tar,
        meta,
        cached: true,
        pinned_key: None,
        lock: None,
    })
}

fn write_meta(path: &std::path::Path, meta: &BaseMeta) -> Result<()> {
    crate::util::write_atomic(path, serde_json::to_string_pretty(meta)?.as_bytes())
}

/// Return the base rootfs for this recipe and lock, building it when the
/// cache has none. The base comes with a shared lock on its cache entry;
/// it is built (or repaired) under the exclusive one, so of two builds
/// needing the same base one runs mmdebstrap and the other waits for it.
pub(crate) fn ensure_base(
    r: &Recipe,
    lock: &Lockfile,
    cache: &Cache,
    show: bool,
) -> Result<BaseRootfs> {
    let key = base_key(r, lock);
    // Some(pinned key) once this process built it.
    let mut built: Option<Option<String>> = None;
    let (mut base, held) = crate::image::cachegc::use_entry(
        &lock_path(cache, &key),
        &format!("the base rootfs {}", &key[..12]),
        || Ok(lookup_stamped(cache, &key)),
        || {
            if lookup(cache, &key).is_none() {
                built = Some(build_base(r, lock, cache, &key, show)?);
            }
            Ok(())
        },
    )?;
    if let Some(pinned_key) = built {
        base.cached = false;
        base.pinned_key = pinned_key;
    }
    base.lock = Some(std::sync::Arc::new(held));
    Ok(base)
}

/// Run mmdebstrap and file its tarball under `key` (and, when the lock has
/// no package pins yet, under the key of the pins it yields, returned).
fn build_base(
    r: &Recipe,
    lock: &Lockfile,
    cache: &Cache,
    key: &str,
    show: bool,
) -> Result<Option<String>> {
    crate::util::hosttools::require(&[crate::util::hosttools::MMDEBSTRAP])?;
    let scratch = cache.scratch("rootfs-")?;
    let out = scratch.path().join("base.tar");
    let log_path = scratch.path().join("mmdebstrap.log");
    run_mmdebstrap(r, lock, &out, &log_path, show)?;

    let packages = read_packages(&out)?;
    let sha256 = crate::util::sha256_file(&out)?;
    let size = std::fs::metadata(&out)?.len();
    let (tar, meta_path) = paths(cache, key);
    std::fs::rename(&out, &tar).context("cannot move the base rootfs into the cache")?;

    // The next build reads these package pins from the lock; file the same
    // tarball under the pinned key too so that build is a cache hit.
    let pinned_key = lock.packages.is_empty().then(|| {
        base_key(
            r,
            &Lockfile {
                packages: packages.clone(),
                ..lock.clone()
            },
        )
    });
    // (An existing entry under the pinned key is left as it is, and so is
    // one another build holds.)
    let pinned_lock = match &pinned_key {
        Some(k) => crate::util::locks::Held::try_acquire(
            &lock_path(cache, k),
            crate::util::locks::Mode::Exclusive,
        )?,
        None => None,
    };
    let pinned = pinned_key
        .filter(|_| pinned_lock.is_some())
        .map(|k| (k.clone(), paths(cache, &k)))
        .filter(|(_, (ptar, _))| !ptar.exists());
    if let Some((_, (ptar, _))) = &pinned {
        std::fs::hard_link(&tar, ptar).or_else(|_| std::fs::copy(&tar, ptar).map(|_| ()))?;
    }
    // Stamped after the last rename and link, which change the ctime.
    let meta = BaseMeta {
        key: key.to_string(),
        sha256,
        size,
        packages,
        verified: crate::util::FileStamp::of(&tar).ok(),
    };
    write_meta(&meta_path, &meta)?;
    let mut filed = None;
    if let Some((pkey, (ptar, pmeta))) = pinned {
        let m = BaseMeta {
            key: pkey.clone(),
            verified: crate::util::FileStamp::of(&ptar).ok(),
            ..meta
        };
        write_meta(&pmeta, &m)?;
        filed = Some(pkey);
    }
    Ok(filed)
}

/// The exact mmdebstrap arguments for this recipe and lock (after the program
/// name; SOURCE_DATE_EPOCH goes in the environment). The benchmark runs these
/// bare to compare against kiln.
pub(crate) fn mmdebstrap_args(r: &Recipe, lock: &Lockfile, out: &std::path::Path) -> Vec<String> {
    let mut args = vec![
        "--mode=root".to_string(),
        "--variant=apt".to_string(),
        "--format=tar".to_string(),
        format!("--architectures={}", r.base.architecture),
        format!("--components={}", r.base.components.join(",")),
        format!("--include={}", include_list(r, lock).join(",")),
        // Documentation is not shipped (licences are): smaller images, and no
        // sample keys from package examples.
        "--dpkgopt=path-exclude=/usr/share/doc/*".to_string(),
        "--dpkgopt=path-include=/usr/share/doc/*/copyright".to_string(),
        "--dpkgopt=path-exclude=/usr/share/man/*".to_string(),
        "--dpkgopt=path-exclude=/usr/share/info/*".to_string(),
    ];
    if r.boot.initrd_modules == crate::image::recipe::InitrdModules::Virtual {
        args.push(format!("--essential-hook={}", initramfs_hook()));
    }
    if r.base.snapshot.is_some() {
        args.push("--aptopt=Acquire::Check-Valid-Until \"false\"".to_string());
    }
    args.push(r.base.suite.clone());
    args.push(out.display().to_string());
    args.push(mirror_url(r));
    args
}

/// Kernel modules a VM's initramfs needs to find its root disk on the
/// controllers Proxmox and QEMU offer (dependencies are added by mkinitramfs).
pub(crate) const VIRTUAL_INITRD_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_scsi",
    "virtio_blk",
    "scsi_mod",
    "sd_mod",
    "sr_mod",
    "ahci",
    "nvme",
    "ext4",
    "crc32c_generic",
];

/// Written before the kernel is installed, so its initramfs is built small:
/// MODULES=list with the virtual-hardware drivers (not a dpkg conffile).
fn initramfs_hook() -> String {
    format!(
        "mkdir -p \"$1/etc/initramfs-tools/conf.d\" \"$1/usr/share/initramfs-tools/modules.d\" && \
         printf 'MODULES=list\\n' > \"$1/etc/initramfs-tools/conf.d/kiln.conf\" && \
         printf '%s\\n' {} > \"$1/usr/share/initramfs-tools/modules.d/kiln.conf\"",
        VIRTUAL_INITRD_MODULES.join(" ")
    )
}

fn run_mmdebstrap(
    r: &Recipe,
    lock: &Lockfile,
    out: &std::path::Path,
    log_path: &std::path::Path,
    show: bool,
) -> Result<()> {
    let mut cmd = Command::new(crate::util::hosttools::path_of(
        crate::util::hosttools::MMDEBSTRAP,
    )?);
    cmd.env("SOURCE_DATE_EPOCH", lock.source_date_epoch.to_string())
        .env("LC_ALL", "C.UTF-8")
        .args(mmdebstrap_args(r, lock, out));
    crate::util::term::command_detail(
        std::path::Path::new(cmd.get_program()),
        &cmd.get_args().collect::<Vec<_>>(),
    );
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // Stops (and cleans up its mounts) when kiln dies, even by SIGKILL.
    // Spawned on the thread that waits for it, as that requires.
    crate::util::locks::die_with_parent(&mut cmd, libc::SIGTERM);

    let total = include_list(r, lock).len() as u64;
    let pb = crate::util::progress::items(
        show,
        None,
        format!("mmdebstrap {} ({total} packages)", r.base.suite),
    );
    let mut child = cmd.spawn().context("cannot start mmdebstrap")?;
    let forward = crate::util::forward_interrupt(child.id());
    let stderr = child.stderr.take().expect("piped");
    let mut log = std::fs::File::create(log_path)?;
    let mut tail: std::collections::VecDeque<String> = Default::default();
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap_or_default();
        use std::io::Write;
        let _ = writeln!(log, "{line}");
        if line.starts_with("I: ") {
            pb.set_message(format!("mmdebstrap: {}", line.trim_start_matches("I: ")));
        }
        if line.starts_with("Unpacking ") || line.starts_with("Setting up ") {
            pb.inc(1);
        }
        tail.push_back(line);
        if tail.len() > 15 {
            tail.pop_front();
        }
    }
    let status = child.wait()?;
    drop(forward);
    pb.finish_and_clear();
    crate::util::check_interrupted()?;
    if !status.success() {
        let reason = tail
            .iter()
            .rev()
            .find(|l| l.starts_with("E: "))
            .cloned()
            .unwrap_or_else(|| tail.back().cloned().unwrap_or_default());
        bail!(
            "mmdebstrap failed ({status}): {}\n{}",
            reason.trim(),
            tail.iter()
                .map(|l| format!("  {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    Ok(())
}

/// dpkg's status database, as a path in the rootfs.
pub(crate) const DPKG_STATUS: &str = "var/lib/dpkg/status";
/// Where dpkg keeps each package's file list (`<package>[:<arch>].list`).
const DPKG_INFO: &str = "var/lib/dpkg/info/";

/// Installed packages and versions, from dpkg's status database in the tar.
pub(crate) fn read_packages(tar_path: &std::path::Path) -> Result<BTreeMap<String, String>> {
    let info = crate::image::compose::index_base(tar_path, &|p| p == DPKG_STATUS)?;
    let status = info
        .captured
        .get(DPKG_STATUS)
        .with_context(|| format!("the base rootfs has no {DPKG_STATUS}"))?;
    Ok(parse_dpkg_status(&String::from_utf8_lossy(status)))
}

/// Whether `path` is one of dpkg's per-package file lists.
pub(crate) fn is_dpkg_list(path: &str) -> bool {
    path.strip_prefix(DPKG_INFO)
        .is_some_and(|f| f.ends_with(".list") && !f.contains('/'))
}

/// The installed package whose file list (captured from the rootfs) names
/// `path` (image-relative), as dpkg -S would answer; the first by name when
/// several do.
pub(crate) fn dpkg_owner(
    captured: &std::collections::HashMap<String, Vec<u8>>,
    path: &str,
) -> Option<String> {
    let want = format!("/{path}");
    captured
        .iter()
        .filter(|(p, _)| is_dpkg_list(p))
        .filter(|(_, list)| list.split(|b| *b == b'\n').any(|l| l == want.as_bytes()))
        .filter_map(|(p, _)| {
            let file = p.strip_prefix(DPKG_INFO)?.strip_suffix(".list")?;
            Some(file.split(':').next().unwrap_or(file).to_string())
        })
        .min()
}

/// `Package` → `Version` for every installed stanza.
pub(crate) fn parse_dpkg_status(text: &str) -> BTreeMap<String, String> {
    parse_dpkg_entries(text)
        .into_iter()
        .map(|(name, e)| (name, e.version))
        .collect()
}

/// What dpkg's status database says about one installed package.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DpkgEntry {
    pub version: String,
    pub architecture: Option<String>,
    /// The `Source:` field: `name` or `name (version)`, absent when the
    /// source package has the binary's name and version (deb-control(5)).
    pub source: Option<String>,
}

impl DpkgEntry {
    /// The source package's name and version.
    pub(crate) fn source_package<'a>(&'a self, name: &'a str) -> (&'a str, &'a str) {
        match self.source.as_deref().map(str::trim) {
            None | Some("") => (name, &self.version),
            Some(s) => match s.split_once(' ') {
                Some((n, v)) => (n, v.trim().trim_start_matches('(').trim_end_matches(')')),
                None => (s, &self.version),
            },
        }
    }
}

/// Every installed stanza of dpkg's status database, by package name.
pub(crate) fn parse_dpkg_entries(text: &str) -> BTreeMap<String, DpkgEntry> {
    let mut out = BTreeMap::new();
    for stanza in text.split("\n\n") {
        let mut name = None;
        let mut version = None;
        let mut architecture = None;
        let mut source = None;
        let mut installed = false;
        for line in stanza.lines() {
            if let Some(v) = line.strip_prefix("Package: ") {
                name = Some(v.trim());
            } else if let Some(v) = line.strip_prefix("Version: ") {
                version = Some(v.trim());
            } else if let Some(v) = line.strip_prefix("Architecture: ") {
                architecture = Some(v.trim().to_string());
            } else if let Some(v) = line.strip_prefix("Source: ") {
                source = Some(v.trim().to_string());
            } else if let Some(v) = line.strip_prefix("Status: ") {
                installed = v.trim().ends_with(" installed");
            }
        }
        if let (Some(n), Some(v), true) = (name, version, installed) {
            out.insert(
                n.to_string(),
                DpkgEntry {
                    version: v.to_string(),
                    architecture,
                    source,
                },
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_status_lists_only_installed_packages() {
        let text = "Package: a\nStatus: install ok installed\nVersion: 1.0\n\nPackage: b\nStatus: deinstall ok config-files\nVersion: 2\n\nPackage: c\nStatus: install ok installed\nArchitecture: amd64\nVersion: 3:1.2-1\n";
        let m = parse_dpkg_status(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m["c"], "3:1.2-1");
    }

    #[test]
    fn the_owner_of_a_file_comes_from_dpkgs_file_lists() {
        let captured: std::collections::HashMap<String, Vec<u8>> = [
            (
                "var/lib/dpkg/info/shim-signed:amd64.list".to_string(),
                b"/.\n/usr/lib/shim\n/usr/lib/shim/shimx64.efi.signed\n".to_vec(),
            ),
            (
                "var/lib/dpkg/info/shim-helpers-amd64-signed.list".to_string(),
                b"/usr/lib/shim/mmx64.efi.signed\n".to_vec(),
            ),
            (
                "var/lib/dpkg/info/shim-signed.md5sums".to_string(),
                b"/usr/lib/shim/mmx64.efi.signed\n".to_vec(),
            ),
        ]
        .into();
        assert_eq!(
            dpkg_owner(&captured, "usr/lib/shim/shimx64.efi.signed").as_deref(),
            Some("shim-signed")
        );
        assert_eq!(
            dpkg_owner(&captured, "usr/lib/shim/mmx64.efi.signed").as_deref(),
            Some("shim-helpers-amd64-signed")
        );
        assert_eq!(
            dpkg_owner(&captured, "usr/lib/shim"),
            Some("shim-signed".into())
        );
        assert_eq!(dpkg_owner(&captured, "boot/vmlinuz-6.1.0-50-amd64"), None);
    }

    #[test]
    fn dpkg_source_field_names_the_source_package_and_its_version() {
        let text = "Package: bash\nStatus: install ok installed\nArchitecture: amd64\nSource: bash (5.2.15-2)\nVersion: 5.2.15-2+b2\n\nPackage: bsdutils\nStatus: install ok installed\nSource: util-linux\nVersion: 1:2.38.1-5\n\nPackage: dash\nStatus: install ok installed\nVersion: 0.5.12-2\n";
        let m = parse_dpkg_entries(text);
        assert_eq!(m["bash"].source_package("bash"), ("bash", "5.2.15-2"));
        assert_eq!(m["bash"].architecture.as_deref(), Some("amd64"));
        assert_eq!(
            m["bsdutils"].source_package("bsdutils"),
            ("util-linux", "1:2.38.1-5")
        );
        assert_eq!(m["dash"].source_package("dash"), ("dash", "0.5.12-2"));
    }

    /// A cache holding `bytes` as the base under key "k", with meta
    /// recording `sha256` and, optionally, the file's current stamp.
    fn cached_base(bytes: &[u8], sha256: &str, stamped: bool) -> (tempfile::TempDir, Cache) {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::at(d.path().to_path_buf()).unwrap();
        let (tar, meta) = paths(&cache, "k");
        std::fs::write(&tar, bytes).unwrap();
        let m = BaseMeta {
            key: "k".into(),
            sha256: sha256.into(),
            size: bytes.len() as u64,
            packages: BTreeMap::new(),
            verified: stamped.then(|| crate::util::FileStamp::of(&tar).unwrap()),
        };
        write_meta(&meta, &m).unwrap();
        (d, cache)
    }

    #[test]
    fn a_verified_base_is_stamped_and_served() {
        let bytes = b"base rootfs";
        let (_d, cache) = cached_base(bytes, &crate::util::sha256_hex(bytes), false);
        let b = lookup(&cache, "k").expect("served");
        let stamp = crate::util::FileStamp::of(&b.tar).unwrap();
        assert_eq!(b.meta.verified.as_ref(), Some(&stamp));
        let (_, meta) = paths(&cache, "k");
        let on_disk: BaseMeta = serde_json::from_slice(&std::fs::read(meta).unwrap()).unwrap();
        assert_eq!(on_disk.verified, Some(stamp));
    }

    #[test]
    fn an_untouched_stamped_base_is_served_without_hashing_it_again() {
        // The recorded digest is wrong on purpose: only the stamp is checked.
        let (_d, cache) = cached_base(b"base rootfs", &"0".repeat(64), true);
        assert!(lookup(&cache, "k").is_some());
    }

    #[test]
    fn a_base_changed_in_place_is_hashed_again_and_not_served() {
        use std::os::unix::fs::FileExt;
        let bytes = b"base rootfs";
        let (_d, cache) = cached_base(bytes, &crate::util::sha256_hex(bytes), true);
        let (tar, meta) = paths(&cache, "k");
        // Same size, and the mtime put back: the ctime still moves.
        let mtime = std::fs::metadata(&tar).unwrap().modified().unwrap();
        let f = std::fs::File::options().write(true).open(&tar).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        f.write_all_at(b"B", 0).unwrap();
        f.set_modified(mtime).unwrap();
        drop(f);
        assert!(lookup(&cache, "k").is_none());
        assert!(
            !tar.exists() && !meta.exists(),
            "the corrupt entry is removed"
        );
    }
}
