//! Compose: turn the cached base rootfs tarball plus artifacts, overlays
//! (`.tera` rendered), role files and kiln's defaults into the final rootfs tar.
//!
//! Nothing is extracted to the host: the base tar is indexed, entries that
//! survive are copied byte for byte (xattrs such as file capabilities, setuid
//! bits, symlinks and hard links stay exactly as dpkg made them), and the
//! additions are appended in sorted order with fixed timestamps. Every path an
//! addition writes is resolved through the image's own symlinks; anything that
//! would land outside the root is refused with its origin named.

pub(crate) mod defaults;

use anyhow::{anyhow, bail, Context, Result};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::image::cloudinit::render_template;
pub use crate::image::contract::Node;
use crate::image::contract::{check_image_path, overlay_mode, AddedFile, HygieneReport};
use crate::image::recipe::Hygiene;

/// Normalize a tar member name to the image-relative form used here: no
/// leading `./` or `/`, no trailing `/` (the root is the empty string).
pub fn norm(name: &str) -> String {
    let s = name.trim_start_matches("./").trim_start_matches('/');
    let s = if s == "." { "" } else { s };
    s.trim_end_matches('/').to_string()
}

/// The image tree as far as paths are concerned (no contents).
#[derive(Debug, Default)]
pub struct TreeIndex {
    pub nodes: HashMap<String, Node>,
}

const MAX_SYMLINK_HOPS: usize = 40;

impl TreeIndex {
    /// Resolve `path` (normalized) following symlinks in every component but
    /// the last, as the kernel would inside the image. A relative link that
    /// climbs above the root is an escape and is refused.
    pub fn resolve_parent(&self, path: &str) -> Result<String, String> {
        self.resolve(path, false)
    }

    /// Resolve `path` following symlinks in every component, the last one
    /// too: where a directory written at `path` lands (an overlay's `lib/`
    /// is the image's `usr/lib` when the base has `lib -> usr/lib`).
    pub fn resolve_dir(&self, path: &str) -> Result<String, String> {
        self.resolve(path, true)
    }

    fn resolve(&self, path: &str, follow_last: bool) -> Result<String, String> {
        let mut hops = 0;
        let mut pending: Vec<String> = path
            .split('/')
            .filter(|s| !s.is_empty())
            .rev()
            .map(str::to_string)
            .collect();
        let mut cur: Vec<String> = Vec::new();
        let mut via: Option<(String, String)> = None;
        while let Some(part) = pending.pop() {
            if part == "." {
                continue;
            }
            if part == ".." {
                if cur.pop().is_none() {
                    return Err(match &via {
                        Some((link, target)) => format!("/{link} is a symlink to `{target}`, which leads outside the image root"),
                        None => format!("/{path} leads outside the image root"),
                    });
                }
                continue;
            }
            cur.push(part);
            if pending.is_empty() && !follow_last {
                break; // the last component is replaced, never followed
            }
            let joined = cur.join("/");
            if let Some(Node::Symlink(target)) = self.nodes.get(&joined) {
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    return Err(format!("too many symlinks resolving /{path}"));
                }
                cur.pop();
                if target.starts_with('/') {
                    cur.clear();
                }
                pending.extend(
                    target
                        .split('/')
                        .filter(|s| !s.is_empty())
                        .rev()
                        .map(str::to_string),
                );
                via = Some((joined, target.clone()));
            }
        }
        Ok(cur.join("/"))
    }
}

/// Where an addition's bytes come from.
#[derive(Debug, Clone)]
pub enum Content {
    Bytes(Vec<u8>),
    /// A file on the host, streamed; `sha256` is checked while streaming when set.
    Path {
        path: PathBuf,
        sha256: Option<String>,
    },
}

#[derive(Debug, Clone)]
pub enum AddKind {
    File { content: Content, mode: u32 },
    Dir { mode: u32 },
    Symlink { target: String },
}

/// One path kiln adds to the image, with where it came from for errors.
#[derive(Debug, Clone)]
pub struct Addition {
    /// Absolute path in the image as requested.
    pub path: String,
    pub kind: AddKind,
    pub origin: String,
}

/// What was learned about the base while indexing it.
pub struct BaseInfo {
    pub index: TreeIndex,
    /// Contents of small files compose needs to read (dpkg status, unit files, boot files).
    pub captured: HashMap<String, Vec<u8>>,
    /// Total bytes of file data (for the disk-size check).
    pub data_bytes: u64,
}

/// Index a base tarball and capture the contents of `want(path)` files.
pub fn index_base(tar_path: &Path, want: &dyn Fn(&str) -> bool) -> Result<BaseInfo> {
    let file = File::open(tar_path)
        .with_context(|| format!("cannot open base rootfs {}", tar_path.display()))?;
    let mut archive = tar::Archive::new(file);
    let mut index = TreeIndex::default();
    let mut captured = HashMap::new();
    let mut data_bytes = 0u64;
    for entry in archive
        .entries_with_seek()
        .context("cannot read base rootfs tar")?
    {
        let mut entry = entry.context("corrupt base rootfs tar")?;
        let name = norm(&String::from_utf8_lossy(&entry.path_bytes()));
        let kind = entry.header().entry_type();
        let node = match kind {
            tar::EntryType::Directory => Node::Dir,
            tar::EntryType::Regular | tar::EntryType::Continuous => Node::File,
            tar::EntryType::Symlink => Node::Symlink(
                String::from_utf8_lossy(&entry.link_name_bytes().unwrap_or_default()).into_owned(),
            ),
            tar::EntryType::Link => Node::HardLink(norm(&String::from_utf8_lossy(
                &entry.link_name_bytes().unwrap_or_default(),
            ))),
            _ => Node::Other,
        };
        if node == Node::File {
            data_bytes += entry.size();
            if want(&name) {
                let mut buf = Vec::new();
                entry.read_to_end(&mut buf)?;
                captured.insert(name.clone(), buf);
            }
        }
        index.nodes.insert(name, node);
    }
    Ok(BaseInfo {
        index,
        captured,
        data_bytes,
    })
}

/// Everything compose needs to know to write the final tar.
pub struct ComposePlan<'a> {
    pub base_tar: &'a Path,
    pub base: &'a BaseInfo,
    /// Base paths to drop (cleaned for hygiene), with the reason recorded.
    pub drop: &'a dyn Fn(&str, &Node) -> bool,
    pub additions: Vec<Addition>,
    /// Additions whose path and digest the result lists (`Composed::added`).
    pub record: &'a dyn Fn(&Addition) -> bool,
    pub mtime: u64,
    pub hygiene: &'a Hygiene,
}

/// The result of writing the final rootfs tar.
pub struct Composed {
    pub report: HygieneReport,
    /// Bytes of file data in the final tree.
    pub data_bytes: u64,
    pub entries: u64,
    /// The recorded additions' files and symlinks as written, by path.
    pub added: Vec<AddedFile>,
}

/// Resolve additions against the tree: symlinks followed, escapes refused,
/// missing parent directories created, later additions win over earlier ones.
fn plan_additions(
    index: &TreeIndex,
    additions: Vec<Addition>,
) -> Result<BTreeMap<String, Addition>> {
    let mut planned: BTreeMap<String, Addition> = BTreeMap::new();
    for add in additions {
        check_image_path(&add.path).map_err(|e| anyhow!("{}: {e}", add.origin))?;
        // A directory merges with what the image has at its path, through a
        // symlink to a directory too (merged /usr: `lib -> usr/lib`); files
        // and symlinks replace the last component.
        let resolved = match add.kind {
            AddKind::Dir { .. } => index.resolve_dir(&norm(&add.path)),
            _ => index.resolve_parent(&norm(&add.path)),
        }
        .map_err(|e| anyhow!("{}: refused: {e}", add.origin))?;
        // The parent chain must also not pass through symlinks added by us.
        let mut parent = String::new();
        for part in resolved
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .map(|(_, rest)| rest.to_vec())
            .unwrap_or_default()
        {
            parent = if parent.is_empty() {
                part.to_string()
            } else {
                format!("{parent}/{part}")
            };
            match (index.nodes.get(&parent), planned.get(&parent)) {
                (Some(Node::Dir), _) => {}
                (Some(other), _) => bail!(
                    "{}: refused: /{parent} in the image is not a directory ({other:?})",
                    add.origin
                ),
                (
                    None,
                    Some(Addition {
                        kind: AddKind::Dir { .. },
                        ..
                    }),
                ) => {}
                (None, Some(p)) => bail!(
                    "{}: refused: /{parent} is added as a non-directory by {}",
                    add.origin,
                    p.origin
                ),
                (None, None) => {
                    planned.insert(
                        parent.clone(),
                        Addition {
                            path: format!("/{parent}"),
                            kind: AddKind::Dir { mode: 0o755 },
                            origin: add.origin.clone(),
                        },
                    );
                }
            }
        }
        match (&add.kind, index.nodes.get(&resolved)) {
            (AddKind::Dir { .. }, _) if resolved.is_empty() => continue, // the root (via `x -> /`)
            (AddKind::Dir { .. }, Some(Node::Dir)) => continue, // keep the base's directory as it is
            (AddKind::Dir { .. }, Some(_)) => bail!(
                "{}: refused: /{resolved} exists in the image and is not a directory",
                add.origin
            ),
            (_, Some(Node::Dir)) => bail!(
                "{}: refused: /{resolved} is a directory in the image",
                add.origin
            ),
            _ => {}
        }
        if let Some(prev) = planned.get(&resolved) {
            if matches!(prev.kind, AddKind::Dir { .. }) != matches!(add.kind, AddKind::Dir { .. }) {
                bail!(
                    "{}: refused: /{resolved} is also added by {} as a different kind",
                    add.origin,
                    prev.origin
                );
            }
        }
        planned.insert(resolved, add);
    }
    Ok(planned)
}

/// Write the final rootfs tar to `out`: surviving base entries byte for byte,
/// then the additions. Hygiene is enforced on everything written.
pub fn compose(plan: ComposePlan<'_>, out: &Path) -> Result<Composed> {
    let planned = plan_additions(&plan.base.index, plan.additions)?;
    let mut scanner = crate::image::hygiene::Scanner::new(plan.hygiene);

    // Base entries replaced by additions, and those dropped for hygiene.
    let mut skipped: HashSet<String> = HashSet::new();
    for (path, node) in &plan.base.index.nodes {
        if planned.contains_key(path) && *node != Node::Dir {
            skipped.insert(path.clone());
        } else if (plan.drop)(path, node) {
            skipped.insert(path.clone());
            scanner.report.cleaned.push(format!("/{path}"));
        }
    }
    // A hard link whose target is skipped would dangle.
    for (path, node) in &plan.base.index.nodes {
        if let Node::HardLink(target) = node {
            if skipped.contains(target) && !skipped.contains(path) {
                bail!("cannot replace or drop /{target}: /{path} is a hard link to it");
            }
        }
    }

    let out_file = File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut builder = tar::Builder::new(std::io::BufWriter::with_capacity(1 << 20, out_file));
    let mut data_bytes = 0u64;
    let mut entries = 0u64;
    let mut added = Vec::new();

    // Pass over the base: copy every surviving entry's raw bytes (extension
    // headers included) from `start` to the end of its padded data.
    let src = File::open(plan.base_tar)?;
    let mut raw = File::open(plan.base_tar)?;
    let mut archive = tar::Archive::new(src);
    let mut start = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for entry in archive.entries_with_seek()? {
        let entry = entry?;
        if entries.is_multiple_of(1024) {
            crate::util::check_interrupted()?;
        }
        let name = norm(&String::from_utf8_lossy(&entry.path_bytes()));
        let size = entry.size();
        let end = entry.raw_file_position() + size.div_ceil(512) * 512;
        let keep = !skipped.contains(&name);
        if keep {
            let is_file = matches!(
                entry.header().entry_type(),
                tar::EntryType::Regular | tar::EntryType::Continuous
            );
            scanner.check_path(&name, &plan.base.index.nodes[&name], size);
            raw.seek(SeekFrom::Start(start))?;
            let header_len = entry.raw_file_position() - start;
            copy_exact(
                &mut raw,
                builder.get_mut(),
                header_len,
                &mut buf,
                &mut |_| {},
            )?;
            let mut scan =
                scanner.content_scan(&name, is_file && size <= crate::image::hygiene::SCAN_LIMIT);
            copy_exact(
                &mut raw,
                builder.get_mut(),
                end - entry.raw_file_position(),
                &mut buf,
                &mut |chunk| scan.feed(chunk),
            )?;
            scanner.finish_content(scan);
            if is_file {
                data_bytes += size;
            }
            entries += 1;
        }
        start = end;
    }

    // The additions, sorted by path so parents come first.
    for (path, add) in &planned {
        let mut header = tar::Header::new_gnu();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(plan.mtime);
        let recorded = (plan.record)(add);
        let mut record = |mode: Option<u32>, sha256: Option<String>, target: Option<String>| {
            if recorded {
                added.push(AddedFile {
                    path: format!("/{path}"),
                    origin: add.origin.clone(),
                    mode: mode.map(|m| format!("{m:04o}")),
                    sha256,
                    target,
                });
            }
        };
        match &add.kind {
            AddKind::Dir { mode } => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(*mode);
                header.set_size(0);
                builder.append_data(&mut header, format!("./{path}/"), std::io::empty())?;
                scanner.check_path(path, &Node::Dir, 0);
            }
            AddKind::Symlink { target } => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_mode(0o777);
                header.set_size(0);
                builder.append_link(&mut header, format!("./{path}"), target)?;
                scanner.check_path(path, &Node::Symlink(target.clone()), 0);
                record(None, None, Some(target.clone()));
            }
            AddKind::File { content, mode } => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(*mode);
                let mut scan = scanner.content_scan(path, true);
                match content {
                    Content::Bytes(bytes) => {
                        header.set_size(bytes.len() as u64);
                        scanner.check_path(path, &Node::File, bytes.len() as u64);
                        scan.feed(bytes);
                        builder.append_data(&mut header, format!("./{path}"), bytes.as_slice())?;
                        data_bytes += bytes.len() as u64;
                        if recorded {
                            record(Some(*mode), Some(crate::util::sha256_hex(bytes)), None);
                        }
                    }
                    Content::Path { path: src, sha256 } => {
                        let f = File::open(src).with_context(|| {
                            format!("{}: cannot read {}", add.origin, src.display())
                        })?;
                        let len = f.metadata()?.len();
                        header.set_size(len);
                        scanner.check_path(path, &Node::File, len);
                        let mut reader = ScanningReader {
                            inner: f,
                            scan: &mut scan,
                            hasher: (sha256.is_some() || recorded).then(sha2::Sha256::default),
                        };
                        builder.append_data(&mut header, format!("./{path}"), &mut reader)?;
                        let got = reader.hasher.take().map(|h| {
                            use sha2::Digest;
                            hex::encode(h.finalize())
                        });
                        if let (Some(want), Some(got)) = (sha256, &got) {
                            if got != want {
                                bail!("{}: {} has sha256 {got}, expected {want} (the cached copy is corrupt; it was not used)", add.origin, src.display());
                            }
                        }
                        data_bytes += len;
                        record(Some(*mode), got, None);
                    }
                }
                scanner.finish_content(scan);
            }
        }
        entries += 1;
    }
    let mut w = builder.into_inner()?;
    w.flush()?;
    w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(Composed {
        report: scanner.into_report(),
        data_bytes,
        entries,
        added,
    })
}

struct ScanningReader<'a, R> {
    inner: R,
    scan: &'a mut crate::image::hygiene::ContentScan,
    hasher: Option<sha2::Sha256>,
}

impl<R: Read> Read for ScanningReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.scan.feed(&buf[..n]);
        if let Some(h) = &mut self.hasher {
            use sha2::Digest;
            h.update(&buf[..n]);
        }
        Ok(n)
    }
}

fn copy_exact(
    src: &mut File,
    dst: &mut impl Write,
    mut len: u64,
    buf: &mut [u8],
    on_chunk: &mut dyn FnMut(&[u8]),
) -> Result<()> {
    while len > 0 {
        let n = (buf.len() as u64).min(len) as usize;
        src.read_exact(&mut buf[..n])
            .context("base rootfs tar ended early")?;
        on_chunk(&buf[..n]);
        dst.write_all(&buf[..n])?;
        len -= n as u64;
    }
    Ok(())
}

/// Walk an overlay directory into additions: plain files keep their modes,
/// `*.tera` files are rendered with `ctx` and lose the suffix, symlinks are
/// copied as symlinks (never followed).
pub fn overlay_additions(dir: &Path, label: &str, ctx: &tera::Context) -> Result<Vec<Addition>> {
    let mut out = Vec::new();
    walk_overlay(dir, dir, label, ctx, &mut out)?;
    Ok(out)
}

fn walk_overlay(
    root: &Path,
    dir: &Path,
    label: &str,
    ctx: &tera::Context,
    out: &mut Vec<Addition>,
) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read overlay directory {}", dir.display()))?
        .collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let rel = path
            .strip_prefix(root)
            .expect("under root")
            .to_string_lossy()
            .into_owned();
        let origin = format!("{label}/{rel}");
        let meta = std::fs::symlink_metadata(&path)?;
        let mode = overlay_mode(&meta) & 0o7777;
        let ft = meta.file_type();
        if ft.is_dir() {
            out.push(Addition {
                path: format!("/{rel}"),
                kind: AddKind::Dir { mode },
                origin,
            });
            walk_overlay(root, &path, label, ctx, out)?;
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&path)?.to_string_lossy().into_owned();
            check_symlink_target(&rel, &target).map_err(|e| anyhow!("{origin}: refused: {e}"))?;
            out.push(Addition {
                path: format!("/{rel}"),
                kind: AddKind::Symlink { target },
                origin,
            });
        } else if ft.is_file() {
            if let Some(stripped) = rel.strip_suffix(".tera") {
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("{origin}: not UTF-8 text"))?;
                let rendered = render_template(&text, ctx).map_err(|e| anyhow!("{origin}: {e}"))?;
                out.push(Addition {
                    path: format!("/{stripped}"),
                    kind: AddKind::File {
                        content: Content::Bytes(rendered.into_bytes()),
                        mode,
                    },
                    origin,
                });
            } else {
                out.push(Addition {
                    path: format!("/{rel}"),
                    kind: AddKind::File {
                        content: Content::Path {
                            path: path.clone(),
                            sha256: None,
                        },
                        mode,
                    },
                    origin,
                });
            }
        } else {
            bail!("{origin}: refused: only files, directories and symlinks may be in an overlay");
        }
    }
    Ok(())
}

/// A relative symlink placed at `rel` must not climb above the image root.
pub fn check_symlink_target(rel: &str, target: &str) -> Result<(), String> {
    if target.starts_with('/') {
        return Ok(());
    }
    let mut depth = rel.split('/').count() as i64 - 1;
    for part in target.split('/') {
        match part {
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return Err(format!(
                        "symlink /{rel} -> {target} points outside the image root"
                    ));
                }
            }
            "" | "." => {}
            _ => depth += 1,
        }
    }
    Ok(())
}

/// Additions from a tar(.gz) artifact unpacked under `dest`, every member
/// checked: no absolute paths, no `..`, no links leaving the root.
pub fn archive_additions(
    archive: &Path,
    dest: &str,
    strip: usize,
    origin: &str,
    scratch: &Path,
) -> Result<Vec<Addition>> {
    let f = File::open(archive)
        .with_context(|| format!("{origin}: cannot open {}", archive.display()))?;
    let mut magic = [0u8; 2];
    let mut probe = File::open(archive)?;
    let _ = probe.read(&mut magic);
    let reader: Box<dyn Read> = if magic == [0x1f, 0x8b] {
        Box::new(flate2::read::GzDecoder::new(f))
    } else {
        Box::new(f)
    };
    let mut ar = tar::Archive::new(reader);
    let mut out = Vec::new();
    for (i, entry) in ar
        .entries()
        .with_context(|| format!("{origin}: not a tar archive"))?
        .enumerate()
    {
        let mut entry = entry.with_context(|| format!("{origin}: corrupt archive"))?;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        if raw.starts_with('/') || raw.split('/').any(|p| p == "..") {
            bail!("{origin}: refused: archive member `{raw}` would land outside the image root");
        }
        let parts: Vec<&str> = raw
            .split('/')
            .filter(|p| !p.is_empty() && *p != ".")
            .collect();
        if parts.len() <= strip {
            continue;
        }
        let rel = parts[strip..].join("/");
        let path = format!("{}/{rel}", dest.trim_end_matches('/'));
        let member = format!("{origin}: {raw}");
        let mode = entry.header().mode().unwrap_or(0o644) & 0o7777;
        match entry.header().entry_type() {
            tar::EntryType::Directory => out.push(Addition {
                path,
                kind: AddKind::Dir { mode },
                origin: member,
            }),
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let tmp = scratch.join(format!(
                    "artifact-{}-{i}",
                    crate::util::sha256_hex(origin.as_bytes())[..8].to_owned()
                ));
                let mut w = File::create(&tmp)?;
                std::io::copy(&mut entry, &mut w)?;
                out.push(Addition {
                    path,
                    kind: AddKind::File {
                        content: Content::Path {
                            path: tmp,
                            sha256: None,
                        },
                        mode,
                    },
                    origin: member,
                });
            }
            tar::EntryType::Symlink => {
                let target = String::from_utf8_lossy(&entry.link_name_bytes().unwrap_or_default())
                    .into_owned();
                let rel_in_image = norm(&path);
                check_symlink_target(&rel_in_image, &target)
                    .map_err(|e| anyhow!("{member}: refused: {e}"))?;
                out.push(Addition {
                    path,
                    kind: AddKind::Symlink { target },
                    origin: member,
                });
            }
            other => {
                bail!("{member}: refused: {other:?} members are not supported in artifact archives")
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(nodes: &[(&str, Node)]) -> TreeIndex {
        TreeIndex {
            nodes: nodes
                .iter()
                .map(|(p, n)| (p.to_string(), n.clone()))
                .collect(),
        }
    }

    #[test]
    fn image_paths_with_dotdot_are_refused() {
        assert!(check_image_path("/etc/../../x")
            .unwrap_err()
            .contains("`..`"));
        assert!(check_image_path("etc/x").is_err());
        assert!(check_image_path("/etc/x").is_ok());
    }

    #[test]
    fn merged_usr_symlinks_resolve_inside_the_root() {
        let idx = index(&[
            ("lib", Node::Symlink("usr/lib".into())),
            ("usr", Node::Dir),
            ("usr/lib", Node::Dir),
        ]);
        assert_eq!(
            idx.resolve_parent("lib/systemd/x.service").unwrap(),
            "usr/lib/systemd/x.service"
        );
    }

    #[test]
    fn absolute_symlinks_resolve_from_the_image_root() {
        let idx = index(&[
            ("etc", Node::Dir),
            ("etc/alt", Node::Symlink("/opt/real".into())),
        ]);
        assert_eq!(idx.resolve_parent("etc/alt/f").unwrap(), "opt/real/f");
    }

    #[test]
    fn write_through_symlink_leaving_the_root_is_refused() {
        let idx = index(&[
            ("etc", Node::Dir),
            ("etc/evil", Node::Symlink("../../../host".into())),
        ]);
        let err = idx.resolve_parent("etc/evil/passwd").unwrap_err();
        assert!(err.contains("outside the image root"), "{err}");
    }

    #[test]
    fn symlink_loops_are_refused() {
        let idx = index(&[
            ("a", Node::Symlink("b".into())),
            ("b", Node::Symlink("a".into())),
        ]);
        assert!(idx
            .resolve_parent("a/x")
            .unwrap_err()
            .contains("too many symlinks"));
    }

    /// An overlay directory holding `lib/x.conf`, and the image tree of a
    /// merged-/usr base with `lib` pointing at `target`.
    fn lib_overlay_over(target: &str) -> (tempfile::TempDir, TreeIndex) {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("lib")).unwrap();
        std::fs::write(d.path().join("lib/x.conf"), "x").unwrap();
        let idx = index(&[
            ("lib", Node::Symlink(target.into())),
            ("usr", Node::Dir),
            ("usr/lib", Node::Dir),
        ]);
        (d, idx)
    }

    #[test]
    fn overlay_lib_dir_merges_into_usr_lib_on_merged_usr_bases() {
        let (d, idx) = lib_overlay_over("usr/lib");
        let adds = overlay_additions(d.path(), "overlays/m", &tera::Context::new()).unwrap();
        let planned = plan_additions(&idx, adds).unwrap();
        assert_eq!(planned.keys().collect::<Vec<_>>(), ["usr/lib/x.conf"]);
    }

    #[test]
    fn overlay_dir_over_a_symlink_to_the_root_adds_no_root_entry() {
        let (d, idx) = lib_overlay_over("/");
        let adds = overlay_additions(d.path(), "overlays/m", &tera::Context::new()).unwrap();
        let planned = plan_additions(&idx, adds).unwrap();
        assert_eq!(planned.keys().collect::<Vec<_>>(), ["x.conf"]);
    }

    #[test]
    fn overlay_dir_over_a_symlink_leaving_the_root_is_refused() {
        let (d, idx) = lib_overlay_over("../../host/lib");
        let adds = overlay_additions(d.path(), "overlays/m", &tera::Context::new()).unwrap();
        let err = plan_additions(&idx, adds).unwrap_err().to_string();
        assert!(
            err.contains("overlays/m/lib") && err.contains("outside the image root"),
            "{err}"
        );
    }

    #[test]
    fn overlay_dir_over_a_symlink_loop_is_refused() {
        let (d, mut idx) = lib_overlay_over("lib2");
        idx.nodes.insert("lib2".into(), Node::Symlink("lib".into()));
        let adds = overlay_additions(d.path(), "overlays/m", &tera::Context::new()).unwrap();
        let err = plan_additions(&idx, adds).unwrap_err().to_string();
        assert!(
            err.contains("overlays/m/lib") && err.contains("too many symlinks"),
            "{err}"
        );
    }

    /// A base tar holding `usr/lib/` and the merged-usr `lib -> usr/lib`.
    fn merged_usr_base(dir: &Path) -> PathBuf {
        let base = dir.join("base.tar");
        {
            let mut b = tar::Builder::new(File::create(&base).unwrap());
            for dir in ["usr/", "usr/lib/"] {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, format!("./{dir}"), std::io::empty())
                    .unwrap();
            }
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, "./lib", "usr/lib").unwrap();
            b.finish().unwrap();
        }
        base
    }

    #[test]
    fn composed_tar_keeps_the_lib_symlink_and_puts_overlay_files_in_usr_lib() {
        let d = tempfile::tempdir().unwrap();
        let base = merged_usr_base(d.path());
        let ov = d.path().join("ov");
        std::fs::create_dir_all(ov.join("lib/systemd")).unwrap();
        std::fs::write(ov.join("lib/systemd/x.conf"), "x").unwrap();
        let info = index_base(&base, &|_| false).unwrap();
        let out = d.path().join("out.tar");
        compose(
            ComposePlan {
                base_tar: &base,
                base: &info,
                drop: &|_: &str, _: &Node| false,
                additions: overlay_additions(&ov, "overlays/m", &tera::Context::new()).unwrap(),
                record: &|_| false,
                mtime: 0,
                hygiene: &Hygiene::default(),
            },
            &out,
        )
        .unwrap();
        let mut got: Vec<(String, tar::EntryType)> = tar::Archive::new(File::open(&out).unwrap())
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    norm(&e.path().unwrap().to_string_lossy()),
                    e.header().entry_type(),
                )
            })
            .collect();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            got,
            [
                ("lib".to_string(), tar::EntryType::Symlink),
                ("usr".to_string(), tar::EntryType::Directory),
                ("usr/lib".to_string(), tar::EntryType::Directory),
                ("usr/lib/systemd".to_string(), tar::EntryType::Directory),
                (
                    "usr/lib/systemd/x.conf".to_string(),
                    tar::EntryType::Regular
                ),
            ]
        );
    }

    #[test]
    fn recorded_additions_are_listed_where_they_land_with_their_digest() {
        let d = tempfile::tempdir().unwrap();
        let base = merged_usr_base(d.path());
        let ov = d.path().join("ov");
        std::fs::create_dir_all(ov.join("lib/systemd")).unwrap();
        std::fs::write(ov.join("lib/systemd/x.conf"), "x").unwrap();
        std::os::unix::fs::symlink("x.conf", ov.join("lib/systemd/y.conf")).unwrap();
        let mut additions = overlay_additions(&ov, "overlays/m", &tera::Context::new()).unwrap();
        additions.push(Addition {
            path: "/etc/kiln".into(),
            kind: AddKind::File {
                content: Content::Bytes(b"k".to_vec()),
                mode: 0o600,
            },
            origin: "kiln defaults".into(),
        });
        additions.push(Addition {
            path: "/usr/local/bin/tool".into(),
            kind: AddKind::File {
                content: Content::Bytes(b"t".to_vec()),
                mode: 0o755,
            },
            origin: "artifact `tool`".into(),
        });
        let info = index_base(&base, &|_| false).unwrap();
        let composed = compose(
            ComposePlan {
                base_tar: &base,
                base: &info,
                drop: &|_: &str, _: &Node| false,
                additions,
                record: &|a| !a.origin.starts_with("artifact"),
                mtime: 0,
                hygiene: &Hygiene::default(),
            },
            &d.path().join("out.tar"),
        )
        .unwrap();
        let file = |path: &str, origin: &str, mode: &str, content: &[u8]| AddedFile {
            path: path.into(),
            origin: origin.into(),
            mode: Some(mode.into()),
            sha256: Some(crate::util::sha256_hex(content)),
            target: None,
        };
        assert_eq!(
            composed.added,
            [
                file("/etc/kiln", "kiln defaults", "0600", b"k"),
                file(
                    "/usr/lib/systemd/x.conf",
                    "overlays/m/lib/systemd/x.conf",
                    &format!(
                        "{:04o}",
                        overlay_mode(&std::fs::metadata(ov.join("lib/systemd/x.conf")).unwrap())
                            & 0o7777
                    ),
                    b"x"
                ),
                AddedFile {
                    path: "/usr/lib/systemd/y.conf".into(),
                    origin: "overlays/m/lib/systemd/y.conf".into(),
                    mode: None,
                    sha256: None,
                    target: Some("x.conf".into()),
                },
            ]
        );
    }

    #[test]
    fn relative_symlink_targets_may_not_climb_out() {
        assert!(check_symlink_target("etc/x", "../usr/bin/y").is_ok());
        assert!(check_symlink_target("etc/x", "../../y").is_err());
        assert!(check_symlink_target("etc/x", "/anything").is_ok());
    }

    #[test]
    fn overlay_modes_do_not_depend_on_the_checkouts_umask() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("etc")).unwrap();
        std::fs::write(d.path().join("etc/a.conf"), "a").unwrap();
        std::fs::write(d.path().join("etc/run.sh"), "#!/bin/sh").unwrap();
        let set = |p: &str, m| {
            std::fs::set_permissions(d.path().join(p), std::fs::Permissions::from_mode(m)).unwrap()
        };
        // As a clone under umask 002 leaves them.
        set("etc", 0o775);
        set("etc/a.conf", 0o664);
        set("etc/run.sh", 0o775);
        let adds = overlay_additions(d.path(), "overlays/x", &tera::Context::new()).unwrap();
        let modes: Vec<(String, u32)> = adds
            .iter()
            .map(|a| match &a.kind {
                AddKind::Dir { mode } | AddKind::File { mode, .. } => (a.path.clone(), *mode),
                AddKind::Symlink { .. } => unreachable!(),
            })
            .collect();
        assert_eq!(
            modes,
            [
                ("/etc".to_string(), 0o755),
                ("/etc/a.conf".to_string(), 0o644),
                ("/etc/run.sh".to_string(), 0o755)
            ]
        );
    }

    #[test]
    fn tera_files_render_and_lose_the_suffix() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        std::fs::write(dir.path().join("etc/motd.tera"), "hello {{ who }}\n").unwrap();
        std::fs::write(dir.path().join("etc/plain"), "{{ untouched }}").unwrap();
        let mut ctx = tera::Context::new();
        ctx.insert("who", "node");
        let adds = overlay_additions(dir.path(), "overlays/t", &ctx).unwrap();
        let motd = adds
            .iter()
            .find(|a| a.path == "/etc/motd")
            .expect("rendered without suffix");
        match &motd.kind {
            AddKind::File {
                content: Content::Bytes(b),
                ..
            } => assert_eq!(b, b"hello node\n"),
            other => panic!("{other:?}"),
        }
        assert!(adds.iter().any(|a| a.path == "/etc/plain"));
    }

    #[test]
    fn tera_error_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bad.tera"), "{{ missing_var }}").unwrap();
        let err = overlay_additions(dir.path(), "overlays/t", &tera::Context::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("overlays/t/bad.tera"), "{err}");
        assert!(err.contains("missing_var"), "{err}");
    }

    #[test]
    fn overlay_symlink_escaping_the_root_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        std::os::unix::fs::symlink("../../../../etc/shadow", dir.path().join("etc/link")).unwrap();
        let err = overlay_additions(dir.path(), "overlays/t", &tera::Context::new())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("overlays/t/etc/link") && err.contains("outside the image root"),
            "{err}"
        );
    }

    #[test]
    fn archive_member_with_dotdot_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ar = dir.path().join("a.tar");
        {
            let mut b = tar::Builder::new(File::create(&ar).unwrap());
            let mut h = tar::Header::new_gnu();
            h.set_size(1);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            // set_path refuses `..`, so write the name bytes directly as a hostile archive would.
            h.as_old_mut().name[..9].copy_from_slice(b"../escape");
            h.set_cksum();
            b.append(&h, &b"x"[..]).unwrap();
            b.finish().unwrap();
        }
        let err = archive_additions(&ar, "/opt", 0, "artifact helm", dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("../escape") && err.contains("outside the image root"),
            "{err}"
        );
    }
}
