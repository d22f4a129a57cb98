//! LXC: the container template Proxmox makes LB containers from (a vztmpl
//! `.tar.zst` of the final rootfs), compressed in-process on every core.
//!
//! The archive is a series of independent zstd frames, one per [`CHUNK`] of tar
//! (zstd, and so `tar --zstd` and Proxmox, read concatenated frames as one
//! stream). A rebuild passes the previous archive of the recipe as a reference:
//! a frame whose tar bytes are unchanged (checked by decompressing the
//! reference's frame at the same position) is copied instead of compressed.
//! Compose writes the base entries first and the recipe's additions last, so a
//! changed overlay file leaves all but the last frames alone. Reused frames are
//! exactly what compressing gives (same zstd, level and chunk size, see
//! [`reference_name`]), so a rebuild equals a cold build.

use anyhow::{Context, Result};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Tar bytes per zstd frame.
pub const CHUNK: usize = 4 << 20;
/// zstd level 3: Proxmox's own default for vztmpl archives.
const LEVEL: i32 = 3;

/// The cache name of a recipe's reference archive: it names everything the
/// frames' bytes depend on, so a reference from another compressor is never
/// used.
pub fn reference_name(recipe: &str) -> String {
    format!(
        "{recipe}.lxc.{}-c{}.tar.zst",
        crate::util::zstd_id(LEVEL),
        CHUNK >> 20
    )
}

/// What was written.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Stats {
    pub sha256: String,
    pub size: u64,
    pub frames: u64,
    pub reused: u64,
}

/// One chunk of tar and, when the reference has a frame at its position,
/// that frame's bytes.
struct Job {
    data: Vec<u8>,
    reference: Option<Vec<u8>>,
}

/// Compress `tar` into `out` as zstd frames, reusing frames of `reference`
/// where the tar is unchanged. Stops early (with an error) when `stop` is set
/// or the build is interrupted.
pub fn write(tar: &Path, out: &Path, reference: Option<&Path>, stop: &AtomicBool) -> Result<Stats> {
    let mut input = File::open(tar).with_context(|| format!("cannot open {}", tar.display()))?;
    let mut frames = reference.and_then(|p| File::open(p).ok()).map(Frames::new);
    let file = File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut w = crate::util::HashingWriter::new(BufWriter::with_capacity(4 << 20, file));
    let mut stats = Stats::default();
    crate::parallel::map_ordered(
        crate::parallel::threads(),
        |send| loop {
            if stop.load(Ordering::SeqCst) {
                anyhow::bail!("stopped");
            }
            crate::util::check_interrupted()?;
            let data = read_chunk(&mut input).context("cannot read the rootfs tar")?;
            if data.is_empty() {
                return Ok(());
            }
            let reference = frames.as_mut().and_then(Frames::next);
            if !send(Job { data, reference }) {
                return Ok(());
            }
        },
        || {
            Ok((
                zstd::bulk::Compressor::new(LEVEL)?,
                zstd::bulk::Decompressor::new()?,
                Vec::with_capacity(CHUNK),
            ))
        },
        |(compressor, decompressor, scratch), job: Job| {
            if let Some(frame) = job.reference {
                scratch.clear();
                let same = decompressor
                    .decompress_to_buffer(&frame[..], scratch)
                    .is_ok_and(|n| n == job.data.len() && scratch[..] == job.data[..]);
                if same {
                    return Ok((frame, true));
                }
            }
            Ok((compressor.compress(&job.data)?, false))
        },
        |(frame, reused)| {
            w.write_all(&frame)?;
            stats.frames += 1;
            stats.reused += reused as u64;
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
    Ok(stats)
}

/// Up to [`CHUNK`] bytes (fewer only at the end).
fn read_chunk(input: &mut File) -> std::io::Result<Vec<u8>> {
    let mut data = Vec::with_capacity(CHUNK);
    input.take(CHUNK as u64).read_to_end(&mut data)?;
    Ok(data)
}

/// The frames of a reference archive, in order. Anything unreadable ends it.
struct Frames {
    file: File,
    offset: u64,
}

impl Frames {
    fn new(file: File) -> Frames {
        Frames { file, offset: 0 }
    }

    fn next(&mut self) -> Option<Vec<u8>> {
        let bound = zstd::zstd_safe::compress_bound(CHUNK);
        let mut buf = vec![0u8; bound];
        let mut got = 0;
        while got < bound {
            match self.file.read_at(&mut buf[got..], self.offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(_) => return None,
            }
        }
        let n = zstd::zstd_safe::find_frame_compressed_size(&buf[..got]).ok()?;
        buf.truncate(n);
        self.offset += n as u64;
        Some(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_like(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| ((i / 4096) as u8).wrapping_mul(31) ^ (i as u8 % 7) ^ seed)
            .collect()
    }

    fn run(data: &[u8], reference: Option<&Path>) -> (Vec<u8>, Stats) {
        let d = tempfile::tempdir().unwrap();
        let (tar, out) = (d.path().join("in.tar"), d.path().join("out.tar.zst"));
        std::fs::write(&tar, data).unwrap();
        let stats = write(&tar, &out, reference, &AtomicBool::new(false)).unwrap();
        (std::fs::read(&out).unwrap(), stats)
    }

    #[test]
    fn the_archive_decompresses_to_the_tar_and_its_digest_is_reported() {
        let data = tar_like(CHUNK * 2 + 1000, 0);
        let (zst, stats) = run(&data, None);
        assert_eq!(stats.frames, 3);
        assert_eq!(zstd::decode_all(&zst[..]).unwrap(), data);
        assert_eq!(stats.sha256, crate::util::sha256_hex(&zst));
        assert_eq!(stats.size, zst.len() as u64);
    }

    #[test]
    fn a_changed_tail_reuses_the_frames_before_it_and_equals_a_fresh_write() {
        let d = tempfile::tempdir().unwrap();
        let old = tar_like(CHUNK * 3 + 10, 0);
        let (reference, _) = run(&old, None);
        let ref_path = d.path().join("ref.tar.zst");
        std::fs::write(&ref_path, &reference).unwrap();
        let mut new = old.clone();
        new.extend_from_slice(b"an overlay file that changed");
        let (fresh, _) = run(&new, None);
        let (rebuilt, stats) = run(&new, Some(&ref_path));
        assert_eq!(stats.reused, 3, "{stats:?}");
        assert_eq!(stats.frames, 4);
        assert_eq!(fresh, rebuilt);
    }

    #[test]
    fn a_damaged_reference_frame_is_compressed_again() {
        let d = tempfile::tempdir().unwrap();
        let data = tar_like(CHUNK * 2, 0);
        let (mut reference, _) = run(&data, None);
        let ref_path = d.path().join("ref.tar.zst");
        let len = reference.len();
        reference[len - 100] ^= 0xff; // inside the last frame
        std::fs::write(&ref_path, &reference).unwrap();
        let (fresh, _) = run(&data, None);
        let (rebuilt, stats) = run(&data, Some(&ref_path));
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
