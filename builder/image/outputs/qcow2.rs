//! qcow2: write the raw disk as a compressed qcow2 (version 3, zstd clusters)
//! in-process, on every core, byte-for-byte the same for the same input.
//!
//! Each 64 KiB cluster is compressed on its own, as qcow2 requires, so the work
//! spreads over worker threads while one writer lays the clusters out in disk
//! order (the output never depends on thread timing). Zero clusters stay
//! unallocated; a cluster zstd cannot shrink is stored as a normal cluster, as
//! `qemu-img convert -c` does. Metadata (L2 tables, L1 table, refcounts) follows
//! the data, and the header is written last.
//!
//! A rebuild passes the recipe's previous image as a *reference* (see
//! [`crate::image::reuse`]): a cluster whose content is unchanged at the same position
//! copies the reference's compressed bytes instead of compressing again. The
//! reference must come from the same compressor ([`reference_name`]), so a
//! rebuild equals a cold build byte for byte.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};

use crate::image::reuse::{fingerprint, Fingerprint};
use std::path::Path;

/// Cluster size: 64 KiB, qemu-img's default.
pub(crate) const CLUSTER: u64 = 1 << CLUSTER_BITS;
const CLUSTER_BITS: u32 = 16;
/// zstd level: 3, the level qemu uses for qcow2 zstd clusters.
const LEVEL: i32 = 3;
/// Bumped whenever the bytes this writer produces change for the same input.
const WRITER_VERSION: u32 = 1;
/// Clusters per unit of work handed to a worker (1 MiB).
const BATCH: u64 = 16;

const MAGIC: u32 = 0x5146_49fb; // "QFI\xfb"
const HEADER_LEN: u32 = 112;
const INCOMPAT_COMPRESSION_TYPE: u64 = 1 << 3;
const COMPRESSION_ZSTD: u8 = 1;
const REFCOUNT_ORDER: u32 = 4; // 16-bit refcounts
const L2_ENTRIES: u64 = CLUSTER / 8;
const REFCOUNTS_PER_BLOCK: u64 = CLUSTER / 2;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
/// Bits of a compressed cluster descriptor that hold the host offset.
const CSIZE_SHIFT: u32 = 62 - (CLUSTER_BITS - 8);
/// Compressed clusters must start below this offset (16 PiB).
const OFFSET_LIMIT: u64 = 1 << CSIZE_SHIFT;

/// The cache name of a recipe's reference image: it names everything the
/// clusters' bytes depend on (zstd's version, the level, this writer's layout),
/// so a reference from another compressor is never used.
pub(crate) fn reference_name(recipe: &str) -> String {
    format!(
        "{recipe}.{}-w{WRITER_VERSION}.qcow2",
        crate::util::zstd_id(LEVEL)
    )
}

/// What the writer did, for the build's summary.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Stats {
    pub virtual_size: u64,
    /// Clusters holding data (the rest read as zeros).
    pub data_clusters: u64,
    /// Of those, how many were compressed now.
    pub compressed: u64,
    /// Of those, how many reused the reference's bytes.
    pub reused: u64,
    /// Of those, how many zstd could not shrink (stored as they are).
    pub stored: u64,
}

/// How one cluster ends up in the file.
enum Cluster {
    Zero,
    Compressed(Vec<u8>),
    Stored(Vec<u8>),
}

/// A cluster as a worker hands it to the writer.
struct Done {
    cluster: Cluster,
    reused: bool,
    content: Fingerprint,
    bytes: Fingerprint,
}

/// What [`write`] made: its stats and the index that lets the next build
/// reuse its clusters.
pub(crate) struct Written {
    pub stats: Stats,
    pub index: crate::image::reuse::Index,
}

/// Write `raw` (a raw disk image) to `out` as a compressed qcow2, reusing
/// clusters from `reference` where they are unchanged. A reference that cannot
/// be read is ignored (the build only gets slower).
pub(crate) fn write(
    raw: &Path,
    out: &Path,
    reference: Option<&Path>,
    show: bool,
) -> Result<Written> {
    let input = File::open(raw).with_context(|| format!("cannot open {}", raw.display()))?;
    let virtual_size = input.metadata()?.len();
    if virtual_size % 512 != 0 {
        bail!("{} is not a whole number of sectors", raw.display());
    }
    let reference = reference.and_then(crate::image::reuse::Reference::open);
    let ranges = data_ranges(&input, virtual_size)?;

    let data_bytes: u64 = ranges.iter().map(|(a, b)| (b - a) * CLUSTER).sum();
    let pb = crate::util::progress::bytes(show, Some(data_bytes), "compressing qcow2");

    let file = File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut w = Writer::new(BufWriter::with_capacity(4 << 20, file), virtual_size)?;
    let mut stats = Stats {
        virtual_size,
        ..Stats::default()
    };
    let mut index = crate::image::reuse::Index::default();
    crate::util::parallel::map_ordered(
        crate::util::parallel::threads(),
        |send| batches(&ranges, send),
        || Ok(zstd::bulk::Compressor::new(LEVEL)?),
        |compressor, batch: Batch| {
            // Each batch is read straight from the page cache through its own
            // mapping, unmapped when done (so it never adds up in memory).
            let offset = batch.first * CLUSTER;
            let len = (batch.end * CLUSTER).min(virtual_size) - offset;
            // SAFETY: the raw disk is this build's own scratch file; nothing
            // writes or truncates it while it is mapped.
            let disk = unsafe {
                memmap2::MmapOptions::new()
                    .offset(offset)
                    .len(len as usize)
                    .map(&input)
            }
            .context("cannot map the raw disk")?;
            let mut clusters = Vec::new();
            for position in batch.first..batch.end {
                let start = ((position - batch.first) * CLUSTER) as usize;
                let end = (start + CLUSTER as usize).min(disk.len());
                // The last cluster may be partial: it reads as zero-padded.
                let padded;
                let data = if end - start == CLUSTER as usize {
                    &disk[start..end]
                } else {
                    let mut p = disk[start..end].to_vec();
                    p.resize(CLUSTER as usize, 0);
                    padded = p;
                    &padded[..]
                };
                clusters.push(cluster(position, data, reference.as_ref(), compressor));
            }
            Ok((batch.first, clusters))
        },
        |(first, clusters)| {
            for (i, d) in clusters.iter().enumerate() {
                let position = first + i as u64;
                let (offset, len, stored) = match &d.cluster {
                    Cluster::Zero => continue,
                    Cluster::Compressed(b) => (w.compressed(position, b)?, b.len(), false),
                    Cluster::Stored(b) => (w.stored(position, b)?, b.len(), true),
                };
                index.insert(
                    position,
                    crate::image::reuse::Piece {
                        offset,
                        len: len as u32,
                        stored,
                        content: d.content,
                        bytes: d.bytes,
                    },
                );
                stats.data_clusters += 1;
                stats.stored += stored as u64;
                if d.reused {
                    stats.reused += 1;
                } else if !stored {
                    stats.compressed += 1;
                }
            }
            pb.inc(clusters.len() as u64 * CLUSTER);
            Ok(())
        },
    )?;
    crate::util::check_interrupted()?;
    w.finish()
        .with_context(|| format!("cannot write {}", out.display()))?;
    pb.finish_and_clear();
    Ok(Written { stats, index })
}

/// One cluster: zero, the reference's bytes when its content is unchanged,
/// or compressed now.
fn cluster(
    position: u64,
    data: &[u8],
    reference: Option<&crate::image::reuse::Reference>,
    compressor: &mut zstd::bulk::Compressor<'_>,
) -> Done {
    if is_zero(data) {
        return Done {
            cluster: Cluster::Zero,
            reused: false,
            content: [0; 32],
            bytes: [0; 32],
        };
    }
    let content = fingerprint(data);
    let reusable = |(p, b): &(crate::image::reuse::Piece, Vec<u8>)| {
        // Stored clusters are whole; compressed ones are smaller than that.
        (b.len() == CLUSTER as usize) == p.stored
    };
    if let Some((piece, bytes)) = reference
        .and_then(|r| r.piece(position, &content))
        .filter(reusable)
    {
        let stored = piece.stored;
        return Done {
            cluster: if stored {
                Cluster::Stored(bytes)
            } else {
                Cluster::Compressed(bytes)
            },
            reused: true,
            content,
            bytes: piece.bytes,
        };
    }
    let cluster = compress(compressor, data);
    let bytes = match &cluster {
        Cluster::Compressed(b) | Cluster::Stored(b) => fingerprint(b),
        Cluster::Zero => unreachable!("zero clusters returned above"),
    };
    Done {
        cluster,
        reused: false,
        content,
        bytes,
    }
}

/// zstd in less than a cluster, or the cluster as it is when it does not fit.
fn compress(compressor: &mut zstd::bulk::Compressor<'_>, data: &[u8]) -> Cluster {
    let mut out = Vec::with_capacity(CLUSTER as usize - 1);
    match compressor.compress_to_buffer(data, &mut out) {
        Ok(_) => Cluster::Compressed(out),
        Err(_) => Cluster::Stored(data.to_vec()),
    }
}

/// Cluster ranges `[first, end)` that may hold data: the file's data extents
/// (SEEK_DATA/SEEK_HOLE) widened to whole clusters. Holes read as zeros and
/// need no reading at all.
fn data_ranges(f: &File, size: u64) -> Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < size {
        // SAFETY: lseek on an open descriptor; errors are checked.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after pos
            }
            // No SEEK_DATA here: treat the whole file as data.
            return Ok(vec![(0, size.div_ceil(CLUSTER))]);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let hole = if hole < 0 { size as i64 } else { hole };
        let first = data as u64 / CLUSTER;
        let end = (hole as u64).div_ceil(CLUSTER);
        match ranges.last_mut() {
            Some(last) if last.1 >= first => last.1 = last.1.max(end),
            _ => ranges.push((first, end)),
        }
        pos = hole;
    }
    Ok(ranges)
}

/// Consecutive clusters `first..end` for one worker.
struct Batch {
    first: u64,
    end: u64,
}

/// The data ranges in batches of [`BATCH`] clusters, in order.
fn batches(ranges: &[(u64, u64)], send: &mut dyn FnMut(Batch) -> bool) -> Result<()> {
    for &(first, end) in ranges {
        for c in (first..end).step_by(BATCH as usize) {
            crate::util::check_interrupted()?;
            if !send(Batch {
                first: c,
                end: (c + BATCH).min(end),
            }) {
                return Ok(()); // stopped; the failing side reports why
            }
        }
    }
    Ok(())
}

fn is_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(16);
    words.all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

/// Lays clusters out in the file and keeps the tables that describe them.
struct Writer<W> {
    out: W,
    /// Next free byte in the file.
    pos: u64,
    /// One L2 entry per guest cluster.
    l2: Vec<u64>,
    /// One refcount per host cluster.
    refcounts: Vec<u16>,
    virtual_size: u64,
}

impl<W: Write + Seek> Writer<W> {
    fn new(mut out: W, virtual_size: u64) -> Result<Writer<W>> {
        // The header's cluster is written last; reserve it now.
        out.seek(SeekFrom::Start(CLUSTER))?;
        Ok(Writer {
            out,
            pos: CLUSTER,
            l2: vec![0; virtual_size.div_ceil(CLUSTER) as usize],
            refcounts: vec![1],
            virtual_size,
        })
    }

    /// One more reference to each host cluster of `start..start + len`.
    fn count(&mut self, start: u64, len: u64) {
        let last = ((start + len - 1) / CLUSTER) as usize;
        if self.refcounts.len() <= last {
            self.refcounts.resize(last + 1, 0);
        }
        for c in (start / CLUSTER) as usize..=last {
            self.refcounts[c] += 1;
        }
    }

    /// Returns where the bytes went.
    fn compressed(&mut self, index: u64, bytes: &[u8]) -> Result<u64> {
        let off = self.pos;
        let len = bytes.len() as u64;
        if off + len > OFFSET_LIMIT {
            bail!(
                "the qcow2 would exceed the {} its compressed clusters can address",
                crate::util::human_bytes(OFFSET_LIMIT)
            );
        }
        let extra_sectors = ((off + len - 1) >> 9) - (off >> 9);
        self.l2[index as usize] = COMPRESSED | (extra_sectors << CSIZE_SHIFT) | off;
        self.out.write_all(bytes)?;
        self.count(off, len);
        self.pos += len;
        Ok(off)
    }

    /// Zero-fill to the next cluster boundary.
    fn align(&mut self) -> Result<()> {
        let pad = self.pos.next_multiple_of(CLUSTER) - self.pos;
        self.out.write_all(&vec![0u8; pad as usize])?;
        self.pos += pad;
        Ok(())
    }

    /// Whole clusters at an aligned offset, each referenced once.
    fn clusters(&mut self, bytes: &[u8]) -> Result<u64> {
        self.align()?;
        let off = self.pos;
        self.out.write_all(bytes)?;
        let len = (bytes.len() as u64).next_multiple_of(CLUSTER);
        self.out
            .write_all(&vec![0u8; (len - bytes.len() as u64) as usize])?;
        self.count(off, len);
        self.pos += len;
        Ok(off)
    }

    /// Returns where the cluster went.
    fn stored(&mut self, index: u64, bytes: &[u8]) -> Result<u64> {
        let off = self.clusters(bytes)?;
        self.l2[index as usize] = COPIED | off;
        Ok(off)
    }

    /// L2 tables, the L1 table, the refcount table and blocks, then the header.
    fn finish(mut self) -> Result<()> {
        let l1_size = (self.l2.len() as u64).div_ceil(L2_ENTRIES);
        let mut l1 = Vec::with_capacity(l1_size as usize);
        let l2 = std::mem::take(&mut self.l2);
        for table in l2.chunks(L2_ENTRIES as usize) {
            if table.iter().all(|&e| e == 0) {
                l1.push(0);
                continue;
            }
            let off = self.clusters(&be_u64s(table))?;
            l1.push(COPIED | off);
        }
        let l1_offset = self.clusters(&be_u64s(&l1))?;

        // The refcount blocks must also count themselves and the table.
        self.align()?;
        let before = self.pos / CLUSTER;
        let mut blocks = 1u64;
        let table_clusters = loop {
            let table_clusters = (blocks * 8).div_ceil(CLUSTER);
            let need = (before + table_clusters + blocks).div_ceil(REFCOUNTS_PER_BLOCK);
            if need <= blocks {
                break table_clusters;
            }
            blocks = need;
        };
        let table_offset = before * CLUSTER;
        let blocks_offset = table_offset + table_clusters * CLUSTER;
        let total = before + table_clusters + blocks;
        self.refcounts.resize(total as usize, 0);
        for c in before..total {
            self.refcounts[c as usize] = 1;
        }
        let table: Vec<u64> = (0..blocks).map(|b| blocks_offset + b * CLUSTER).collect();
        self.clusters_unreferenced(&be_u64s(&table), table_clusters)?;
        let mut counts = Vec::with_capacity((blocks * CLUSTER) as usize);
        for b in 0..blocks * REFCOUNTS_PER_BLOCK {
            let r = self.refcounts.get(b as usize).copied().unwrap_or(0);
            counts.extend_from_slice(&r.to_be_bytes());
        }
        self.clusters_unreferenced(&counts, blocks)?;

        let mut header = vec![0u8; HEADER_LEN as usize];
        let mut put = |at: usize, bytes: &[u8]| header[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, &MAGIC.to_be_bytes());
        put(4, &3u32.to_be_bytes()); // version
        put(20, &CLUSTER_BITS.to_be_bytes());
        put(24, &self.virtual_size.to_be_bytes());
        put(36, &(l1_size as u32).to_be_bytes());
        put(40, &l1_offset.to_be_bytes());
        put(48, &table_offset.to_be_bytes());
        put(56, &(table_clusters as u32).to_be_bytes());
        put(72, &INCOMPAT_COMPRESSION_TYPE.to_be_bytes());
        put(96, &REFCOUNT_ORDER.to_be_bytes());
        put(100, &HEADER_LEN.to_be_bytes());
        put(104, &[COMPRESSION_ZSTD]);
        self.out.seek(SeekFrom::Start(0))?;
        self.out.write_all(&header)?;
        self.out.flush()?;
        Ok(())
    }

    /// Whole clusters at the current (aligned) position whose refcounts are
    /// already set.
    fn clusters_unreferenced(&mut self, bytes: &[u8], clusters: u64) -> Result<()> {
        self.out.write_all(bytes)?;
        let len = clusters * CLUSTER;
        self.out
            .write_all(&vec![0u8; (len - bytes.len() as u64) as usize])?;
        self.pos += len;
        Ok(())
    }
}

fn be_u64s(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|e| e.to_be_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use std::process::Command;

    /// Cheap deterministic noise that zstd cannot shrink.
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// A raw disk with zero, text, noise and sparse regions, and a tail that
    /// ends mid-cluster (the virtual size need not be a cluster multiple).
    fn raw_disk(dir: &Path, name: &str, patch: Option<(u64, &[u8])>) -> std::path::PathBuf {
        let p = dir.join(name);
        let f = File::create(&p).unwrap();
        let size = 6 * (1 << 20) + 3 * 512;
        f.set_len(size).unwrap();
        let text: Vec<u8> = (0..300_000u32)
            .flat_map(|i| format!("line {i} of a config file\n").into_bytes())
            .take(2 << 20)
            .collect();
        f.write_all_at(&text, 0).unwrap();
        f.write_all_at(&noise(7, 3 * CLUSTER as usize), 3 << 20)
            .unwrap();
        f.write_all_at(b"tail", size - 4).unwrap();
        if let Some((at, bytes)) = patch {
            f.write_all_at(bytes, at).unwrap();
        }
        p
    }

    fn qemu_img(args: &[&str]) -> std::process::Output {
        Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img runs")
    }

    fn assert_same_content(raw: &Path, qcow2: &Path) {
        let check = qemu_img(&["check", qcow2.to_str().unwrap()]);
        assert!(
            check.status.success(),
            "qemu-img check: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let cmp = qemu_img(&[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            raw.to_str().unwrap(),
            qcow2.to_str().unwrap(),
        ]);
        assert!(
            cmp.status.success(),
            "{}",
            String::from_utf8_lossy(&cmp.stdout)
        );
    }

    /// Write `raw` and keep the result (with its index) as the reference at `path`.
    fn keep_reference(raw: &Path, path: &Path) {
        let out = path.with_extension("out");
        let w = write(raw, &out, None, false).unwrap();
        crate::image::reuse::keep(path, &out, &w.index).unwrap();
    }

    #[test]
    fn reference_names_say_which_compressor_made_them() {
        let name = reference_name("lb");
        assert!(
            name.starts_with("lb.zstd") && name.contains("-l3-w"),
            "{name}"
        );
    }

    #[test]
    fn the_qcow2_passes_qemu_img_check_and_holds_the_raw_disk() {
        let d = tempfile::tempdir().unwrap();
        let raw = raw_disk(d.path(), "a.raw", None);
        let out = d.path().join("a.qcow2");
        let stats = write(&raw, &out, None, false).unwrap().stats;
        assert_same_content(&raw, &out);
        assert_eq!(stats.virtual_size, std::fs::metadata(&raw).unwrap().len());
        assert_eq!(stats.stored, 3, "noise clusters are stored as they are");
        assert_eq!(stats.reused, 0);
        let info = String::from_utf8(qemu_img(&["info", out.to_str().unwrap()]).stdout).unwrap();
        assert!(info.contains("compression type: zstd"), "{info}");
        assert!(
            std::fs::metadata(&out).unwrap().len() < 1 << 20,
            "zeros take no space"
        );
    }

    #[test]
    fn the_same_raw_disk_gives_the_same_bytes() {
        let d = tempfile::tempdir().unwrap();
        let raw = raw_disk(d.path(), "a.raw", None);
        let (a, b) = (d.path().join("a.qcow2"), d.path().join("b.qcow2"));
        write(&raw, &a, None, false).unwrap();
        write(&raw, &b, None, false).unwrap();
        assert_eq!(std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    }

    #[test]
    fn a_rebuild_reuses_unchanged_clusters_and_equals_a_fresh_write() {
        let d = tempfile::tempdir().unwrap();
        let reference = d.path().join("old.qcow2");
        keep_reference(&raw_disk(d.path(), "old.raw", None), &reference);
        let new = raw_disk(d.path(), "new.raw", Some((CLUSTER * 5 + 100, b"changed")));
        let (fresh, rebuilt) = (d.path().join("fresh.qcow2"), d.path().join("rebuilt.qcow2"));
        write(&new, &fresh, None, false).unwrap();
        let stats = write(&new, &rebuilt, Some(&reference), false)
            .unwrap()
            .stats;
        assert_eq!(
            stats.compressed, 1,
            "only the changed cluster is compressed: {stats:?}"
        );
        assert_eq!(stats.reused + stats.compressed, stats.data_clusters);
        assert_eq!(
            std::fs::read(&fresh).unwrap(),
            std::fs::read(&rebuilt).unwrap()
        );
        assert_same_content(&new, &rebuilt);
    }

    #[test]
    fn a_damaged_reference_is_never_trusted() {
        let d = tempfile::tempdir().unwrap();
        let raw = raw_disk(d.path(), "a.raw", None);
        let (reference, fresh) = (d.path().join("ref.qcow2"), d.path().join("fresh.qcow2"));
        keep_reference(&raw, &reference);
        write(&raw, &fresh, None, false).unwrap();
        // Flip bytes inside the compressed data (after the header cluster).
        let f = File::options().write(true).open(&reference).unwrap();
        for at in (CLUSTER + 40..CLUSTER + 60_000).step_by(997) {
            f.write_all_at(&[0x5a], at).unwrap();
        }
        let out = d.path().join("out.qcow2");
        let stats = write(&raw, &out, Some(&reference), false).unwrap().stats;
        assert!(stats.reused > 0, "intact clusters were reused: {stats:?}");
        assert!(
            stats.compressed > 0,
            "damaged clusters were compressed again: {stats:?}"
        );
        assert_eq!(std::fs::read(&fresh).unwrap(), std::fs::read(&out).unwrap());
    }

    #[test]
    fn a_reference_without_an_index_is_ignored() {
        let d = tempfile::tempdir().unwrap();
        let raw = raw_disk(d.path(), "a.raw", None);
        let junk = d.path().join("junk");
        std::fs::write(&junk, noise(3, 200_000)).unwrap();
        let out = d.path().join("out.qcow2");
        let stats = write(&raw, &out, Some(&junk), false).unwrap().stats;
        assert_eq!(stats.reused, 0);
        assert_same_content(&raw, &out);
    }
}
