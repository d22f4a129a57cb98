//! LXC: the container template Proxmox makes LB containers from (a vztmpl
//! `.tar.zst` of the final rootfs), compressed in-process on every core.
//!
//! The archive is a series of independent zstd frames, one per [`CHUNK`] of tar
//! (zstd, and so `tar --zstd` and Proxmox, read concatenated frames as one
//! stream). A rebuild passes the recipe's previous archive as a reference (see
//! [`crate::image::reuse`]): a frame whose tar bytes are unchanged at the same position
//! is copied instead of compressed. Compose writes the base entries first and
//! the recipe's additions last, so a changed overlay file leaves all but the
//! last frames alone. Reused frames are exactly what compressing gives (same
//! zstd, level and chunk size, see [`reference_name`]), so a rebuild equals a
//! cold build.

use anyhow::{Context, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::image::reuse::{fingerprint, Fingerprint};

/// Tar bytes per zstd frame.
pub(crate) const CHUNK: usize = 4 << 20;
/// zstd level 3: Proxmox's own default for vztmpl archives.
const LEVEL: i32 = 3;
/// Bumped whenever the bytes this writer produces change for the same input.
const WRITER_VERSION: u32 = 1;

/// The cache name of a recipe's reference archive: it names everything the
/// frames' bytes depend on, so a reference from another compressor is never
/// used.
pub(crate) fn reference_name(recipe: &str) -> String {
    format!(
        "{recipe}.lxc.{}-c{}-w{WRITER_VERSION}.tar.zst",
        crate::util::zstd_id(LEVEL),
        CHUNK >> 20
    )
}

/// What was written.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Stats {
    pub sha256: String,
    pub size: u64,
    pub frames: u64,
    pub reused: u64,
}

/// The archive's stats and the index that lets the next build reuse its frames.
pub(crate) struct Written {
    pub stats: Stats,
    pub index: crate::image::reuse::Index,
}

/// One compressed frame on its way to the writer.
struct Frame {
    bytes: Vec<u8>,
    reused: bool,
    content: Fingerprint,
    fingerprint: Fingerprint,
}

/// Compress `tar` into `out` as zstd frames, reusing frames of `reference`
/// where the tar is unchanged. Stops early (with an error) when `stop` is set
/// or the build is interrupted.
pub(crate) fn write(
    tar: &Path,
    out: &Path,
    reference: Option<&Path>,
    stop: &AtomicBool,
) -> Result<Written> {
    let input = File::open(tar).with_context(|| format!("cannot open {}", tar.display()))?;
    let tar_len = input.metadata()?.len();
    let reference = reference.and_then(crate::image::reuse::Reference::open);
    let file = File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut w = crate::util::HashingWriter::new(BufWriter::with_capacity(4 << 20, file));
    let mut stats = Stats::default();
    let mut index = crate::image::reuse::Index::default();
    crate::util::parallel::map_ordered(
        crate::util::parallel::threads(),
        |send| {
            for position in 0..tar_len.div_ceil(CHUNK as u64) {
                if stop.load(Ordering::SeqCst) {
                    anyhow::bail!("stopped");
                }
                crate::util::check_interrupted()?;
                if !send(position) {
                    break;
                }
            }
            Ok(())
        },
        || Ok(zstd::bulk::Compressor::new(LEVEL)?),
        |compressor, position: u64| {
            let offset = position * CHUNK as u64;
            let len = (CHUNK as u64).min(tar_len - offset) as usize;
            // Read straight from the page cache; unmapped when done.
            // SAFETY: the tar is this build's own scratch file; nothing writes
            // or truncates it while it is mapped.
            let data = unsafe {
                memmap2::MmapOptions::new()
                    .offset(offset)
                    .len(len)
                    .map(&input)
            }
            .context("cannot map the rootfs tar")?;
            let content = fingerprint(&data);
            if let Some((piece, bytes)) =
                reference.as_ref().and_then(|r| r.piece(position, &content))
            {
                return Ok(Frame {
                    bytes,
                    reused: true,
                    content,
                    fingerprint: piece.bytes,
                });
            }
            let bytes = compressor.compress(&data)?;
            Ok(Frame {
                fingerprint: fingerprint(&bytes),
                bytes,
                reused: false,
                content,
            })
        },
        |frame| {
            index.insert(
                stats.frames,
                crate::image::reuse::Piece {
                    offset: stats.size,
                    len: frame.bytes.len() as u32,
                    stored: false,
                    content: frame.content,
                    bytes: frame.fingerprint,
                },
            );
            w.write_all(&frame.bytes)?;
            stats.size += frame.bytes.len() as u64;
            stats.frames += 1;
            stats.reused += frame.reused as u64;
            Ok(())
        },
    )
    .with_context(|| format!("cannot write the LXC archive {}", out.display()))?;
    let (buffered, sha256, size) = w.finish();
    buffered
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("cannot write {}", out.display()))?;
    stats.sha256 = sha256;
    stats.size = size;
    Ok(Written { stats, index })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_like(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| ((i / 4096) as u8).wrapping_mul(31) ^ (i as u8 % 7) ^ seed)
            .collect()
    }

    /// Compress `data`; with `keep_as`, keep the archive as a reference there.
    fn run(data: &[u8], reference: Option<&Path>, keep_as: Option<&Path>) -> (Vec<u8>, Stats) {
        let d = tempfile::tempdir().unwrap();
        let (tar, out) = (d.path().join("in.tar"), d.path().join("out.tar.zst"));
        std::fs::write(&tar, data).unwrap();
        let w = write(&tar, &out, reference, &AtomicBool::new(false)).unwrap();
        if let Some(path) = keep_as {
            crate::image::reuse::keep(path, &out, &w.index).unwrap();
        }
        (std::fs::read(&out).unwrap(), w.stats)
    }

    #[test]
    fn the_archive_decompresses_to_the_tar_and_its_digest_is_reported() {
        let data = tar_like(CHUNK * 2 + 1000, 0);
        let (zst, stats) = run(&data, None, None);
        assert_eq!(stats.frames, 3);
        assert_eq!(zstd::decode_all(&zst[..]).unwrap(), data);
        assert_eq!(stats.sha256, crate::util::sha256_hex(&zst));
        assert_eq!(stats.size, zst.len() as u64);
    }

    #[test]
    fn a_changed_tail_reuses_the_frames_before_it_and_equals_a_fresh_write() {
        let d = tempfile::tempdir().unwrap();
        let old = tar_like(CHUNK * 3 + 10, 0);
        let ref_path = d.path().join("ref.tar.zst");
        run(&old, None, Some(&ref_path));
        let mut new = old.clone();
        new.extend_from_slice(b"an overlay file that changed");
        let (fresh, _) = run(&new, None, None);
        let (rebuilt, stats) = run(&new, Some(&ref_path), None);
        assert_eq!(stats.reused, 3, "{stats:?}");
        assert_eq!(stats.frames, 4);
        assert_eq!(fresh, rebuilt);
    }

    #[test]
    fn a_damaged_reference_frame_is_compressed_again() {
        let d = tempfile::tempdir().unwrap();
        let data = tar_like(CHUNK * 2, 0);
        let ref_path = d.path().join("ref.tar.zst");
        let (mut reference, _) = run(&data, None, Some(&ref_path));
        let len = reference.len();
        reference[len - 100] ^= 0xff; // inside the last frame
        std::fs::write(&ref_path, &reference).unwrap();
        let (fresh, _) = run(&data, None, None);
        let (rebuilt, stats) = run(&data, Some(&ref_path), None);
        assert_eq!(stats.reused, 1, "{stats:?}");
        assert_eq!(fresh, rebuilt);
    }

    #[test]
    fn a_stop_request_ends_the_write_with_an_error() {
        let d = tempfile::tempdir().unwrap();
        let (tar, out) = (d.path().join("in.tar"), d.path().join("out.tar.zst"));
        std::fs::write(&tar, tar_like(CHUNK, 0)).unwrap();
        assert!(write(&tar, &out, None, &AtomicBool::new(true)).is_err());
    }
}
