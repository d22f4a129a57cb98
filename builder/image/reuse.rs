//! Reuse: what a rebuild may copy from the recipe's previous output instead of
//! compressing again (qcow2 clusters, LXC frames), and the proof that it may.
//!
//! Beside each reference output the cache keeps an index (`<reference>.idx`):
//! for every compressed piece, its position (guest cluster or frame number),
//! where its bytes lie in the reference, and two BLAKE3 fingerprints, one of
//! the content it holds and one of its compressed bytes. A piece is reused
//! only when the new content has the recorded fingerprint and the reference's
//! bytes still hash to theirs, so a stale, damaged or mismatched reference or
//! index only costs time. Both writers are deterministic and the reference's
//! name carries the compressor's identity, so a reused piece is exactly what
//! compressing the content again would give.

use anyhow::{Context, Result};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"KILNIDX1";
/// No piece is larger (qcow2 clusters are 64 KiB, LXC frames 4 MiB of tar):
/// an index claiming more is not believed.
const MAX_PIECE: u32 = 16 << 20;
const ENTRY: usize = 8 + 8 + 4 + 1 + 32 + 32;

/// A BLAKE3 digest: fast enough to fingerprint every byte of an image on
/// each build, and collision-resistant, so equal fingerprints mean equal data.
pub(crate) type Fingerprint = [u8; 32];

pub(crate) fn fingerprint(data: &[u8]) -> Fingerprint {
    blake3::hash(data).into()
}

/// One compressed piece of an output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    /// Byte offset of the piece in the output file.
    pub offset: u64,
    pub len: u32,
    /// Stored as it is (it did not compress), not compressed.
    pub stored: bool,
    /// Fingerprint of the content the piece holds.
    pub content: Fingerprint,
    /// Fingerprint of the piece's bytes in the file.
    pub bytes: Fingerprint,
}

/// The index of an output's pieces by position.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Index {
    pieces: HashMap<u64, Piece>,
}

impl Index {
    pub(crate) fn insert(&mut self, position: u64, piece: Piece) {
        self.pieces.insert(position, piece);
    }

    /// The index file's bytes: entries sorted by position (so the same output
    /// gives the same file), then a BLAKE3 of everything before it.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut positions: Vec<_> = self.pieces.keys().copied().collect();
        positions.sort_unstable();
        let mut out = Vec::with_capacity(16 + positions.len() * ENTRY + 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(positions.len() as u64).to_le_bytes());
        for pos in positions {
            let p = &self.pieces[&pos];
            out.extend_from_slice(&pos.to_le_bytes());
            out.extend_from_slice(&p.offset.to_le_bytes());
            out.extend_from_slice(&p.len.to_le_bytes());
            out.push(p.stored as u8);
            out.extend_from_slice(&p.content);
            out.extend_from_slice(&p.bytes);
        }
        let sum = fingerprint(&out);
        out.extend_from_slice(&sum);
        out
    }

    /// Parse an index file; `None` for anything truncated or altered.
    pub(crate) fn from_bytes(data: &[u8]) -> Option<Index> {
        let (body, sum) = data.split_at_checked(data.len().checked_sub(32)?)?;
        if fingerprint(body) != sum || !body.starts_with(MAGIC) {
            return None;
        }
        let count = u64::from_le_bytes(body.get(8..16)?.try_into().ok()?) as usize;
        let entries = body.get(16..)?;
        if entries.len() != count.checked_mul(ENTRY)? {
            return None;
        }
        let mut pieces = HashMap::with_capacity(count);
        for e in entries.chunks_exact(ENTRY) {
            let pos = u64::from_le_bytes(e[0..8].try_into().ok()?);
            pieces.insert(
                pos,
                Piece {
                    offset: u64::from_le_bytes(e[8..16].try_into().ok()?),
                    len: u32::from_le_bytes(e[16..20].try_into().ok()?),
                    stored: e[20] != 0,
                    content: e[21..53].try_into().ok()?,
                    bytes: e[53..85].try_into().ok()?,
                },
            );
        }
        Some(Index { pieces })
    }
}

/// Where the index of the reference output `reference` lives.
pub(crate) fn index_path(reference: &Path) -> PathBuf {
    let mut name = reference.as_os_str().to_owned();
    name.push(".idx");
    PathBuf::from(name)
}

/// The lock that keeps a reference and its index a pair: shared while a
/// build opens them, exclusive while one replaces them.
fn lock_path(reference: &Path) -> PathBuf {
    let mut name = reference.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// A previous output and its index, opened for a rebuild.
pub(crate) struct Reference {
    file: File,
    index: Index,
}

impl Reference {
    /// The reference at `path` with its index; `None` when either is missing
    /// or unreadable (the build then compresses everything). Both are opened
    /// under the reference's shared lock, so they are one pair even while
    /// another build replaces them; the open file is read afterwards, and
    /// stays what it was when another build replaces or `gc` removes it.
    pub(crate) fn open(path: &Path) -> Option<Reference> {
        let _pair = crate::util::locks::Held::acquire(
            &lock_path(path),
            crate::util::locks::Mode::Shared,
            &reference_what(path),
        )
        .ok()?;
        let index = Index::from_bytes(&std::fs::read(index_path(path)).ok()?)?;
        let file = File::open(path).ok()?;
        Some(Reference { file, index })
    }

    /// The reference's piece at `position`, with its bytes, if it holds
    /// exactly the content fingerprinted `content` and its bytes are intact.
    pub(crate) fn piece(&self, position: u64, content: &Fingerprint) -> Option<(Piece, Vec<u8>)> {
        let p = self.index.pieces.get(&position)?;
        if p.content != *content || p.len > MAX_PIECE {
            return None;
        }
        let mut bytes = vec![0u8; p.len as usize];
        self.file.read_exact_at(&mut bytes, p.offset).ok()?;
        (fingerprint(&bytes) == p.bytes).then_some((*p, bytes))
    }
}

/// Make `output` (with `index`) the reference at `path`: the index is
/// written first, then the output is hard-linked (no copy, no space) or, on
/// another filesystem, copied; each lands with a rename. A crash between the
/// two leaves a pair that does not match, which only costs the next build
/// its reuse. On failure the temp file is removed.
pub(crate) fn keep(path: &Path, output: &Path, index: &Index) -> Result<()> {
    let _only_writer = crate::util::locks::Held::acquire(
        &lock_path(path),
        crate::util::locks::Mode::Exclusive,
        &reference_what(path),
    )?;
    // Under the lock, every temp file of this reference is a killed build's.
    remove_temp_files(path);
    crate::util::write_hint(&index_path(path), &index.to_bytes())?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let placed = (|| {
        if std::fs::hard_link(output, &tmp).is_err() {
            std::fs::copy(output, &tmp).with_context(|| {
                format!("cannot copy {} to {}", output.display(), tmp.display())
            })?;
        }
        std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))
    })();
    if placed.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    placed
}

/// `<reference>.tmp-<pid>` files: what [`keep`] was writing when its build died.
fn remove_temp_files(reference: &Path) {
    let (Some(dir), Some(name)) = (reference.parent(), reference.file_name()) else {
        return;
    };
    let prefix = format!("{}.tmp-", name.to_string_lossy());
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn reference_what(reference: &Path) -> String {
    let name = reference.file_name().unwrap_or_default().to_string_lossy();
    format!("the reference {name}")
}

/// [`keep`] for a build: the reference only speeds up the next build, so
/// failing to keep it (a full cache, say) is a warning, not a failed build.
pub(crate) fn keep_or_warn(path: &Path, output: &Path, index: &Index) {
    if let Err(e) = keep(path, output, index) {
        crate::util::term::warn(format!("cannot keep the reference for the next build: {e:#} (it will compress everything again)"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(offset: u64, content: &[u8], bytes: &[u8]) -> Piece {
        Piece {
            offset,
            len: bytes.len() as u32,
            stored: false,
            content: fingerprint(content),
            bytes: fingerprint(bytes),
        }
    }

    #[test]
    fn an_index_survives_a_round_trip_and_is_written_the_same_way_twice() {
        let mut i = Index::default();
        i.insert(7, piece(100, b"content a", b"bytes a"));
        i.insert(2, piece(0, b"content b", b"bytes b"));
        let bytes = i.to_bytes();
        assert_eq!(Index::from_bytes(&bytes), Some(i.clone()));
        assert_eq!(i.clone().to_bytes(), bytes);
    }

    #[test]
    fn a_truncated_or_altered_index_is_refused() {
        let mut i = Index::default();
        i.insert(1, piece(0, b"c", b"b"));
        let bytes = i.to_bytes();
        assert!(Index::from_bytes(&bytes[..bytes.len() - 1]).is_none());
        let mut altered = bytes.clone();
        altered[20] ^= 1;
        assert!(Index::from_bytes(&altered).is_none());
        assert!(Index::from_bytes(b"").is_none());
    }

    #[test]
    fn a_piece_is_served_only_for_its_content_and_with_intact_bytes() {
        let d = tempfile::tempdir().unwrap();
        let (out, reference) = (d.path().join("out"), d.path().join("ref"));
        std::fs::write(&out, b"....compressed....").unwrap();
        let mut i = Index::default();
        i.insert(0, piece(4, b"the content", b"compressed"));
        keep(&reference, &out, &i).unwrap();
        let r = Reference::open(&reference).unwrap();
        let (p, bytes) = r.piece(0, &fingerprint(b"the content")).unwrap();
        assert_eq!((p.offset, bytes.as_slice()), (4, &b"compressed"[..]));
        assert!(r.piece(0, &fingerprint(b"other content")).is_none());
        assert!(r.piece(1, &fingerprint(b"the content")).is_none());
        // The reference's bytes change under the index: not served.
        std::fs::write(&reference, b"....COMPRESSED....").unwrap();
        let r = Reference::open(&reference).unwrap();
        assert!(r.piece(0, &fingerprint(b"the content")).is_none());
    }

    /// The files in `dir` whose names contain `.tmp-`.
    fn temp_files(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect()
    }

    #[test]
    fn a_reference_that_cannot_replace_the_old_one_leaves_no_temp_file() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        std::fs::write(&out, b"output").unwrap();
        // A directory (not kiln's) stands where the reference goes: the rename fails.
        let reference = d.path().join("ref");
        std::fs::create_dir(&reference).unwrap();
        std::fs::write(reference.join("keep-me"), b"x").unwrap();
        assert!(keep(&reference, &out, &Index::default()).is_err());
        assert_eq!(temp_files(d.path()), Vec::<String>::new());
        assert!(reference.join("keep-me").exists());
    }

    #[test]
    fn a_failed_copy_into_the_references_leaves_no_temp_file() {
        let d = tempfile::tempdir().unwrap();
        let reference = d.path().join("ref");
        // Cannot be hard-linked (another filesystem) and fails mid-copy: reading
        // /proc/self/mem at offset 0 (unmapped) gives EIO after the copy's
        // destination was created.
        let out = Path::new("/proc/self/mem");
        let err = keep(&reference, out, &Index::default()).unwrap_err();
        assert!(format!("{err:#}").contains("cannot copy"), "{err:#}");
        assert_eq!(temp_files(d.path()), Vec::<String>::new());
        assert!(!reference.exists());
    }

    #[test]
    fn keeping_a_reference_is_best_effort() {
        let d = tempfile::tempdir().unwrap();
        let reference = d.path().join("ref");
        // Returns nothing to fail the build with; warns and cleans up.
        let () = keep_or_warn(&reference, Path::new("/proc/self/mem"), &Index::default());
        assert_eq!(temp_files(d.path()), Vec::<String>::new());
    }

    #[test]
    fn a_reference_is_opened_only_as_a_pair_not_while_another_build_replaces_it() {
        use crate::util::locks::{Held, Mode};
        let d = tempfile::tempdir().unwrap();
        let (old, new, reference) = (
            d.path().join("old"),
            d.path().join("new"),
            d.path().join("ref"),
        );
        std::fs::write(&old, b"OLD-").unwrap();
        std::fs::write(&new, b"new!").unwrap();
        let index = |b: &[u8]| {
            let mut i = Index::default();
            i.insert(0, piece(0, b"content", b));
            i
        };
        keep(&reference, &old, &index(b"OLD-")).unwrap();
        // Another build is between writing the index and the reference.
        let writer = Held::acquire(&lock_path(&reference), Mode::Exclusive, "test").unwrap();
        crate::util::write_hint(&index_path(&reference), &index(b"new!").to_bytes()).unwrap();
        std::thread::scope(|s| {
            let reader = s.spawn(|| Reference::open(&reference));
            std::thread::sleep(std::time::Duration::from_millis(300));
            assert!(!reader.is_finished(), "opened a half-replaced pair");
            std::fs::copy(&new, &reference).unwrap();
            drop(writer);
            let r = reader.join().unwrap().expect("opened");
            let (_, bytes) = r
                .piece(0, &fingerprint(b"content"))
                .expect("a matching pair");
            assert_eq!(bytes, b"new!");
        });
    }

    #[test]
    fn keeping_a_reference_removes_what_a_killed_build_left_of_it() {
        let d = tempfile::tempdir().unwrap();
        let (out, reference) = (d.path().join("out"), d.path().join("ref"));
        std::fs::write(&out, b"output").unwrap();
        std::fs::write(d.path().join("ref.tmp-999999999"), b"half").unwrap();
        std::fs::write(d.path().join("other.tmp-999999999"), b"not its").unwrap();
        keep(&reference, &out, &Index::default()).unwrap();
        assert_eq!(
            temp_files(d.path()),
            vec!["other.tmp-999999999".to_string()]
        );
    }

    #[test]
    fn a_reference_without_its_index_is_not_opened() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ref");
        std::fs::write(&p, b"x").unwrap();
        assert!(Reference::open(&p).is_none());
    }
}
