//! `kiln diff A B`: what changed between two built images, read from their
//! image directories alone (never rebuilt): packages, artifacts, container
//! images, the files overlays and kiln's defaults add, the boot chain, size.
//!
//! Everything compared is in each image's `manifest.json`: package versions
//! (from dpkg's status database), artifact and image digests (the lock's
//! pins), `added_files` (path → sha256) and `boot.chain`. Images made before
//! kiln recorded the last two say so in `notes` instead of showing a change.

use anyhow::Result;
use serde::Serialize;
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::path::Path;

use crate::image::contract::AddedFile;
use crate::image::manifest::{BootComponent, ImageManifest};

/// The difference between two images, `from` → `to`.
#[derive(Debug, Serialize, PartialEq)]
pub struct ImageDiff {
    pub from: Side,
    pub to: Side,
    /// True when nothing compared differs (the ids may still differ, e.g.
    /// when only a role template or the recipe's checks changed).
    pub same: bool,
    pub packages: PackageChanges,
    /// Artifact name → sha256.
    pub artifacts: Changes<String>,
    /// Container image reference → manifest digest.
    pub images: Changes<String>,
    /// Path → what kiln wrote there; null when an image records no file list.
    pub files: Option<Changes<FileState>>,
    pub boot: BootChanges,
    pub size: SizeChanges,
    /// What could not be compared, and why.
    pub notes: Vec<String>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Side {
    pub dir: String,
    pub name: String,
    pub version: String,
    pub id: String,
}

/// Keys added, removed and changed, each with its value(s).
#[derive(Debug, Serialize, PartialEq)]
pub struct Changes<T> {
    pub added: BTreeMap<String, T>,
    pub removed: BTreeMap<String, T>,
    pub changed: BTreeMap<String, FromTo<T>>,
}

impl<T> Changes<T> {
    fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FromTo<T> {
    pub from: T,
    pub to: T,
}

/// Package name → version; a changed version is an upgrade or a downgrade
/// by dpkg's ordering.
#[derive(Debug, Serialize, PartialEq)]
pub struct PackageChanges {
    pub added: BTreeMap<String, String>,
    pub removed: BTreeMap<String, String>,
    pub upgraded: BTreeMap<String, FromTo<String>>,
    pub downgraded: BTreeMap<String, FromTo<String>>,
}

/// A file or symlink as an image has it (its origin is shown, not compared:
/// the same bytes from another overlay are no change in the image).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FileState {
    pub origin: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

impl FileState {
    fn same_content(&self, other: &FileState) -> bool {
        (&self.mode, &self.sha256, &self.target) == (&other.mode, &other.sha256, &other.target)
    }
}

#[derive(Debug, Serialize, PartialEq)]
pub struct BootChanges {
    /// The kernel version booted, when it changed.
    pub kernel: Option<FromTo<String>>,
    pub cmdline: Option<FromTo<String>>,
    /// Component (`shim`, `grub`, `kernel`, `mok-manager`) → before and
    /// after (null where absent); null when an image records no chain.
    pub chain: Option<BTreeMap<String, FromTo<Option<BootComponent>>>>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct SizeChanges {
    /// Bytes of the disk file.
    pub disk: SizeChange,
    /// Bytes the guest sees.
    pub virtual_size: SizeChange,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct SizeChange {
    pub from: u64,
    pub to: u64,
    pub delta: i64,
}

impl SizeChange {
    fn new(from: u64, to: u64) -> SizeChange {
        SizeChange {
            from,
            to,
            delta: to as i64 - from as i64,
        }
    }
}

/// Compare the images in two directories (each must hold a kiln manifest).
pub fn diff_dirs(a: &Path, b: &Path) -> Result<ImageDiff> {
    let ma = ImageManifest::load(a)?;
    let mb = ImageManifest::load(b)?;
    Ok(diff(a, &ma, b, &mb))
}

/// Compare two manifests (`a` and `b` only name the images).
pub fn diff(a: &Path, ma: &ImageManifest, b: &Path, mb: &ImageManifest) -> ImageDiff {
    let side = |dir: &Path, m: &ImageManifest| Side {
        dir: dir.display().to_string(),
        name: m.name.clone(),
        version: m.version.clone(),
        id: m.id.clone(),
    };
    let mut notes = Vec::new();
    let mut upgraded = BTreeMap::new();
    let mut downgraded = BTreeMap::new();
    let versions = changes(&ma.packages, &mb.packages, |x, y| x == y);
    for (name, ft) in versions.changed {
        match deb_version_cmp(&ft.from, &ft.to) {
            Ordering::Greater => downgraded.insert(name, ft),
            _ => upgraded.insert(name, ft),
        };
    }
    let packages = PackageChanges {
        added: versions.added,
        removed: versions.removed,
        upgraded,
        downgraded,
    };
    let artifacts = changes(&ma.inputs.artifacts, &mb.inputs.artifacts, |x, y| x == y);
    let images = changes(&ma.inputs.images, &mb.inputs.images, |x, y| x == y);

    let unrecorded = |what: &str, dir: &Path| {
        format!(
            "{what} not compared: {} records none (built by a kiln that did not record them)",
            dir.display()
        )
    };
    let files = match (ma.added_files.is_empty(), mb.added_files.is_empty()) {
        (false, false) => Some(changes(
            &file_states(&ma.added_files),
            &file_states(&mb.added_files),
            FileState::same_content,
        )),
        (a_empty, _) => {
            notes.push(unrecorded("files", if a_empty { a } else { b }));
            None
        }
    };
    let chain = match (ma.boot.chain.is_empty(), mb.boot.chain.is_empty()) {
        (false, false) => Some(boot_chain(&ma.boot.chain, &mb.boot.chain)),
        (a_empty, _) => {
            notes.push(unrecorded("boot chain", if a_empty { a } else { b }));
            None
        }
    };
    let changed = |x: &String, y: &String| {
        (x != y).then(|| FromTo {
            from: x.clone(),
            to: y.clone(),
        })
    };
    let boot = BootChanges {
        kernel: changed(&ma.boot.kernel, &mb.boot.kernel),
        cmdline: changed(&ma.boot.cmdline, &mb.boot.cmdline),
        chain,
    };
    let size = SizeChanges {
        disk: SizeChange::new(ma.disk.size, mb.disk.size),
        virtual_size: SizeChange::new(ma.disk.virtual_size, mb.disk.virtual_size),
    };
    let same = packages.added.is_empty()
        && packages.removed.is_empty()
        && packages.upgraded.is_empty()
        && packages.downgraded.is_empty()
        && artifacts.is_empty()
        && images.is_empty()
        && files.as_ref().is_none_or(Changes::is_empty)
        && boot.kernel.is_none()
        && boot.cmdline.is_none()
        && boot.chain.as_ref().is_none_or(BTreeMap::is_empty)
        && size.disk.delta == 0
        && size.virtual_size.delta == 0;
    ImageDiff {
        from: side(a, ma),
        to: side(b, mb),
        same,
        packages,
        artifacts,
        images,
        files,
        boot,
        size,
        notes,
    }
}

fn changes<T: Clone>(
    a: &BTreeMap<String, T>,
    b: &BTreeMap<String, T>,
    same: impl Fn(&T, &T) -> bool,
) -> Changes<T> {
    let mut c = Changes {
        added: BTreeMap::new(),
        removed: BTreeMap::new(),
        changed: BTreeMap::new(),
    };
    for (k, x) in a {
        match b.get(k) {
            None => {
                c.removed.insert(k.clone(), x.clone());
            }
            Some(y) if !same(x, y) => {
                c.changed.insert(
                    k.clone(),
                    FromTo {
                        from: x.clone(),
                        to: y.clone(),
                    },
                );
            }
            Some(_) => {}
        }
    }
    for (k, y) in b {
        if !a.contains_key(k) {
            c.added.insert(k.clone(), y.clone());
        }
    }
    c
}

fn file_states(files: &[AddedFile]) -> BTreeMap<String, FileState> {
    files
        .iter()
        .map(|f| {
            (
                f.path.clone(),
                FileState {
                    origin: f.origin.clone(),
                    mode: f.mode.clone(),
                    sha256: f.sha256.clone(),
                    target: f.target.clone(),
                },
            )
        })
        .collect()
}

fn boot_chain(
    a: &[BootComponent],
    b: &[BootComponent],
) -> BTreeMap<String, FromTo<Option<BootComponent>>> {
    let by_name = |v: &[BootComponent]| -> BTreeMap<String, BootComponent> {
        v.iter().map(|c| (c.component.clone(), c.clone())).collect()
    };
    let (a, b) = (by_name(a), by_name(b));
    a.keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            (
                k.clone(),
                FromTo {
                    from: a.get(k).cloned(),
                    to: b.get(k).cloned(),
                },
            )
        })
        .collect()
}

/// Debian version order, as dpkg's `dpkg_version_compare` and `verrevcmp`
/// (dpkg, lib/dpkg/version.c): epoch numerically, then the upstream version
/// and the revision (after the last `-`) alternately comparing non-digit runs
/// (`~` before everything, even the end; letters before other characters)
/// and digit runs numerically.
pub(crate) fn deb_version_cmp(a: &str, b: &str) -> Ordering {
    fn split(v: &str) -> (u64, &str, &str) {
        let (epoch, rest) = match v.split_once(':') {
            Some((e, r)) if e.chars().all(|c| c.is_ascii_digit()) => (e.parse().unwrap_or(0), r),
            _ => (0, v),
        };
        match rest.rsplit_once('-') {
            Some((up, rev)) => (epoch, up, rev),
            None => (epoch, rest, ""),
        }
    }
    fn order(c: Option<u8>) -> i32 {
        match c {
            None => 0,
            Some(c) if c.is_ascii_digit() => 0,
            Some(c) if c.is_ascii_alphabetic() => c as i32,
            Some(b'~') => -1,
            Some(c) => c as i32 + 256,
        }
    }
    fn verrevcmp(a: &[u8], b: &[u8]) -> Ordering {
        let (mut i, mut j) = (0, 0);
        let digit = |s: &[u8], k: usize| s.get(k).is_some_and(u8::is_ascii_digit);
        while i < a.len() || j < b.len() {
            while (i < a.len() && !digit(a, i)) || (j < b.len() && !digit(b, j)) {
                let (ac, bc) = (order(a.get(i).copied()), order(b.get(j).copied()));
                if ac != bc {
                    return ac.cmp(&bc);
                }
                i += 1;
                j += 1;
            }
            while a.get(i) == Some(&b'0') {
                i += 1;
            }
            while b.get(j) == Some(&b'0') {
                j += 1;
            }
            let mut first_diff = Ordering::Equal;
            while digit(a, i) && digit(b, j) {
                if first_diff == Ordering::Equal {
                    first_diff = a[i].cmp(&b[j]);
                }
                i += 1;
                j += 1;
            }
            if digit(a, i) {
                return Ordering::Greater;
            }
            if digit(b, j) {
                return Ordering::Less;
            }
            if first_diff != Ordering::Equal {
                return first_diff;
            }
        }
        Ordering::Equal
    }
    let (ea, ua, ra) = split(a);
    let (eb, ub, rb) = split(b);
    ea.cmp(&eb)
        .then_with(|| verrevcmp(ua.as_bytes(), ub.as_bytes()))
        .then_with(|| verrevcmp(ra.as_bytes(), rb.as_bytes()))
}

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..12.min(hex.len())]
}

fn signed_bytes(delta: i64) -> String {
    let sign = if delta < 0 { "-" } else { "+" };
    format!("{sign}{}", crate::util::human_bytes(delta.unsigned_abs()))
}

/// The difference for people, one line per change.
pub fn render_text(d: &ImageDiff) -> String {
    let mut out = Vec::new();
    let head = |s: &Side| format!("{} {} ({})", s.name, s.version, short(&s.id));
    out.push(format!("{} -> {}", head(&d.from), head(&d.to)));
    let p = &d.packages;
    if !(p.added.is_empty()
        && p.removed.is_empty()
        && p.upgraded.is_empty()
        && p.downgraded.is_empty())
    {
        out.push(format!(
            "packages: {} added, {} removed, {} upgraded, {} downgraded",
            p.added.len(),
            p.removed.len(),
            p.upgraded.len(),
            p.downgraded.len()
        ));
        out.extend(p.added.iter().map(|(n, v)| format!("  + {n} {v}")));
        out.extend(p.removed.iter().map(|(n, v)| format!("  - {n} {v}")));
        for (mark, map) in [("^", &p.upgraded), ("v", &p.downgraded)] {
            out.extend(
                map.iter()
                    .map(|(n, ft)| format!("  {mark} {n} {} -> {}", ft.from, ft.to)),
            );
        }
    }
    for (title, c) in [("artifacts", &d.artifacts), ("images", &d.images)] {
        if c.is_empty() {
            continue;
        }
        out.push(format!("{title}:"));
        out.extend(c.added.iter().map(|(n, v)| format!("  + {n} {}", short(v))));
        out.extend(
            c.removed
                .iter()
                .map(|(n, v)| format!("  - {n} {}", short(v))),
        );
        out.extend(
            c.changed
                .iter()
                .map(|(n, ft)| format!("  ~ {n} {} -> {}", short(&ft.from), short(&ft.to))),
        );
    }
    if let Some(f) = d.files.as_ref().filter(|f| !f.is_empty()) {
        out.push("files (overlays, kiln defaults, units):".into());
        let what = |s: &FileState| match (&s.target, &s.sha256) {
            (Some(t), _) => format!("-> {t}"),
            (_, Some(h)) => format!("{} {}", s.mode.as_deref().unwrap_or("-"), short(h)),
            _ => String::new(),
        };
        out.extend(
            f.added
                .iter()
                .map(|(p, s)| format!("  + {p} ({})", s.origin)),
        );
        out.extend(
            f.removed
                .iter()
                .map(|(p, s)| format!("  - {p} ({})", s.origin)),
        );
        out.extend(f.changed.iter().map(|(p, ft)| {
            format!(
                "  ~ {p} ({}): {} -> {}",
                ft.to.origin,
                what(&ft.from),
                what(&ft.to)
            )
        }));
    }
    let b = &d.boot;
    let chain = b.chain.as_ref().filter(|c| !c.is_empty());
    if b.kernel.is_some() || b.cmdline.is_some() || chain.is_some() {
        out.push("boot:".into());
        if let Some(k) = &b.kernel {
            out.push(format!("  kernel {} -> {}", k.from, k.to));
        }
        if let Some(c) = &b.cmdline {
            out.push(format!("  cmdline {} -> {}", c.from, c.to));
        }
        let piece = |c: &Option<BootComponent>| match c {
            None => "(none)".to_string(),
            Some(c) => format!(
                "{} {} ({})",
                c.package.as_deref().unwrap_or("?"),
                c.version.as_deref().unwrap_or("?"),
                short(&c.sha256)
            ),
        };
        for (name, ft) in chain.into_iter().flatten() {
            out.push(format!(
                "  ~ {name} {} -> {}",
                piece(&ft.from),
                piece(&ft.to)
            ));
        }
    }
    let s = &d.size;
    let size = |c: &SizeChange| {
        if c.delta == 0 {
            format!("{} (unchanged)", crate::util::human_bytes(c.to))
        } else {
            format!(
                "{} -> {} ({})",
                crate::util::human_bytes(c.from),
                crate::util::human_bytes(c.to),
                signed_bytes(c.delta)
            )
        }
    };
    out.push(format!(
        "size: disk {}, virtual {}",
        size(&s.disk),
        size(&s.virtual_size)
    ));
    if d.same {
        out.push("no differences in packages, artifacts, images, files, boot or size".into());
    }
    out.extend(d.notes.iter().map(|n| format!("note: {n}")));
    let mut text = out.join("\n");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::manifest::*;

    /// A manifest as a build writes it, for the fields diff reads.
    fn manifest() -> ImageManifest {
        serde_json::from_value(serde_json::json!({
            "name": "tiny", "version": "0.1.0", "id": "a".repeat(64), "kiln_version": "0.1.0",
            "disk": {"file": "tiny-0.1.0.qcow2", "format": "qcow2", "sha256": "a".repeat(64),
                     "size": 1000, "virtual_size": 2147483648u64, "root_fs_uuid": "u"},
            "inputs": {"recipe": "r", "lock": "l", "artifacts": {"k3s": "1".repeat(64)},
                       "images": {"quay.io/cilium/cilium:v1.18.2": format!("sha256:{}", "2".repeat(64))},
                       "base_rootfs_key": "k", "base_rootfs": "b", "overlays": {}},
            "source_date_epoch": 1,
            "boot": {"uefi": true, "secure_boot": true, "bios": false, "kernel": "6.1.0-50-amd64",
                     "cmdline": "ro", "chain": [
                        {"component": "shim", "file": "/usr/lib/shim/shimx64.efi.signed", "sha256": "3".repeat(64),
                         "package": "shim-signed", "version": "1.44"},
                        {"component": "kernel", "file": "/boot/vmlinuz-6.1.0-50-amd64", "sha256": "4".repeat(64),
                         "package": "linux-image-6.1.0-50-amd64", "version": "6.1.176-1"}]},
            "packages": {"bash": "5.2.15-2+b13", "openssl": "3.0.16-1~deb12u1", "curl": "7.88.1-10"},
            "hygiene": {"cleaned": [], "allowed": [], "violations": []},
            "stages": [], "roles": [], "validate": {"role": null, "user_data": null, "checks": []},
            "added_files": [
                {"path": "/etc/fstab", "origin": "kiln defaults", "mode": "0644", "sha256": "5".repeat(64)},
                {"path": "/etc/motd", "origin": "overlays/base/etc/motd", "mode": "0644", "sha256": "6".repeat(64)}
            ]
        }))
        .unwrap()
    }

    fn d(a: &ImageManifest, b: &ImageManifest) -> ImageDiff {
        diff(Path::new("A"), a, Path::new("B"), b)
    }

    fn ft(from: &str, to: &str) -> FromTo<String> {
        FromTo {
            from: from.into(),
            to: to.into(),
        }
    }

    #[test]
    fn an_image_compared_with_itself_has_no_differences() {
        let m = manifest();
        let x = d(&m, &m);
        assert!(x.same);
        assert!(render_text(&x).contains("no differences"));
    }

    #[test]
    fn packages_added_and_removed_are_listed_with_their_versions() {
        let a = manifest();
        let mut b = manifest();
        b.packages.remove("curl");
        b.packages.insert("haproxy".into(), "2.6.12-1".into());
        let x = d(&a, &b);
        assert_eq!(
            x.packages.added,
            [("haproxy".into(), "2.6.12-1".into())].into()
        );
        assert_eq!(
            x.packages.removed,
            [("curl".into(), "7.88.1-10".into())].into()
        );
        assert!(!x.same);
        let text = render_text(&x);
        assert!(
            text.contains("packages: 1 added, 1 removed, 0 upgraded, 0 downgraded"),
            "{text}"
        );
        assert!(
            text.contains("  + haproxy 2.6.12-1\n") && text.contains("  - curl 7.88.1-10\n"),
            "{text}"
        );
    }

    #[test]
    fn a_changed_version_is_an_upgrade_or_a_downgrade_by_dpkg_order() {
        let a = manifest();
        let mut b = manifest();
        // Lexically smaller, but newer to dpkg: `~` sorts before the end.
        b.packages
            .insert("openssl".into(), "3.0.17-1~deb12u2".into());
        b.packages.insert("bash".into(), "5.2.15-2+b2".into());
        let x = d(&a, &b);
        assert_eq!(
            x.packages.upgraded,
            [("openssl".into(), ft("3.0.16-1~deb12u1", "3.0.17-1~deb12u2"))].into()
        );
        assert_eq!(
            x.packages.downgraded,
            [("bash".into(), ft("5.2.15-2+b13", "5.2.15-2+b2"))].into()
        );
        let text = render_text(&x);
        assert!(
            text.contains("  ^ openssl 3.0.16-1~deb12u1 -> 3.0.17-1~deb12u2\n"),
            "{text}"
        );
        assert!(
            text.contains("  v bash 5.2.15-2+b13 -> 5.2.15-2+b2\n"),
            "{text}"
        );
    }

    #[test]
    fn debian_versions_compare_as_dpkg_compares_them() {
        // Each checked with `dpkg --compare-versions`.
        for (a, b, want) in [
            ("1.0", "1.0-1", Ordering::Less),
            ("1:1.0", "2.0", Ordering::Greater),
            ("1.0~rc1", "1.0", Ordering::Less),
            ("2.36-9+deb12u13", "2.36-9+deb12u14", Ordering::Less),
            ("1.0a", "1.0+", Ordering::Less),
            ("1.0", "1.0.0", Ordering::Less),
            ("1.0-1", "1.0-1~bpo1", Ordering::Greater),
            ("0.5.12-2", "0.5.12-2+b1", Ordering::Less),
            ("9.2p1-2", "9.2p1-10", Ordering::Less),
            ("1:9.2p1-2", "9.2p1-2", Ordering::Greater),
            ("1.0~~", "1.0~", Ordering::Less),
            ("1.2.3", "1.2.10", Ordering::Less),
            ("1.02", "1.2", Ordering::Equal),
        ] {
            assert_eq!(deb_version_cmp(a, b), want, "{a} vs {b}");
            assert_eq!(deb_version_cmp(b, a), want.reverse(), "{b} vs {a}");
        }
    }

    #[test]
    fn artifact_and_image_digest_changes_are_listed() {
        let a = manifest();
        let mut b = manifest();
        b.inputs.artifacts.insert("k3s".into(), "7".repeat(64));
        b.inputs.artifacts.insert("helm".into(), "8".repeat(64));
        b.inputs.images.insert(
            "quay.io/cilium/cilium:v1.18.2".into(),
            format!("sha256:{}", "9".repeat(64)),
        );
        let x = d(&a, &b);
        assert_eq!(
            x.artifacts.changed["k3s"],
            ft(&"1".repeat(64), &"7".repeat(64))
        );
        assert_eq!(x.artifacts.added["helm"], "8".repeat(64));
        assert_eq!(
            x.images.changed["quay.io/cilium/cilium:v1.18.2"].to,
            format!("sha256:{}", "9".repeat(64))
        );
        let text = render_text(&x);
        assert!(
            text.contains(
                "artifacts:\n  + helm 888888888888\n  ~ k3s 111111111111 -> 777777777777\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "images:\n  ~ quay.io/cilium/cilium:v1.18.2 222222222222 -> 999999999999\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn changed_files_are_named_and_a_file_moved_between_overlays_is_no_change() {
        let a = manifest();
        let mut b = manifest();
        b.added_files[1].sha256 = Some("0".repeat(64));
        b.added_files[0].origin = "overlays/other/etc/fstab".into();
        b.added_files.push(AddedFile {
            path: "/etc/issue".into(),
            origin: "overlays/base/etc/issue".into(),
            mode: Some("0644".into()),
            sha256: Some("1".repeat(64)),
            target: None,
        });
        let x = d(&a, &b);
        let files = x.files.as_ref().unwrap();
        assert_eq!(files.changed.keys().collect::<Vec<_>>(), ["/etc/motd"]);
        assert_eq!(files.added.keys().collect::<Vec<_>>(), ["/etc/issue"]);
        let text = render_text(&x);
        assert!(
            text.contains(
                "  ~ /etc/motd (overlays/base/etc/motd): 0644 666666666666 -> 0644 000000000000\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn a_new_kernel_shows_in_the_kernel_and_the_boot_chain() {
        let a = manifest();
        let mut b = manifest();
        b.boot.kernel = "6.1.0-51-amd64".into();
        b.boot.chain[1] = BootComponent {
            component: "kernel".into(),
            file: "/boot/vmlinuz-6.1.0-51-amd64".into(),
            sha256: "e".repeat(64),
            package: Some("linux-image-6.1.0-51-amd64".into()),
            version: Some("6.1.180-1".into()),
        };
        let x = d(&a, &b);
        assert_eq!(x.boot.kernel, Some(ft("6.1.0-50-amd64", "6.1.0-51-amd64")));
        let chain = x.boot.chain.as_ref().unwrap();
        assert_eq!(
            chain.keys().collect::<Vec<_>>(),
            ["kernel"],
            "shim is unchanged"
        );
        let text = render_text(&x);
        assert!(
            text.contains("boot:\n  kernel 6.1.0-50-amd64 -> 6.1.0-51-amd64\n"),
            "{text}"
        );
        assert!(
            text.contains("  ~ kernel linux-image-6.1.0-50-amd64 6.1.176-1 (444444444444) -> linux-image-6.1.0-51-amd64 6.1.180-1 (eeeeeeeeeeee)\n"),
            "{text}"
        );
    }

    #[test]
    fn the_size_change_is_signed() {
        let a = manifest();
        let mut b = manifest();
        b.disk.size = 0;
        let x = d(&a, &b);
        assert_eq!(
            x.size.disk,
            SizeChange {
                from: 1000,
                to: 0,
                delta: -1000
            }
        );
        assert_eq!(x.size.virtual_size.delta, 0);
        let text = render_text(&x);
        assert!(
            text.contains("size: disk 1000 B -> 0 B (-1000 B), virtual 2.0 GiB (unchanged)"),
            "{text}"
        );
    }

    #[test]
    fn an_image_without_a_file_list_is_noted_not_shown_as_all_files_added() {
        let mut a = manifest();
        a.added_files.clear();
        a.boot.chain.clear();
        let x = d(&a, &manifest());
        assert_eq!(x.files, None);
        assert_eq!(x.boot.chain, None);
        assert_eq!(x.notes.len(), 2);
        assert!(
            x.notes[0].starts_with("files not compared: A records none"),
            "{:?}",
            x.notes
        );
        assert!(x.same);
    }
}
