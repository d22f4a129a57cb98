//! The blob cache: `<cache_dir>/blobs/sha256/<hex>`, written only through a
//! temp file that is renamed into place after its sha256 and size checked out.
//!
//! Policy: a name in the cache is trusted once its size matches, because
//! nothing but verified bytes is ever renamed to it (pulls with a warm cache
//! then read nothing and ask the network nothing). Bytes are verified again
//! where they are read anyway: small manifests on every load, layers while
//! `write_archive` copies them. A mismatch there deletes the entry, so a
//! corrupt entry (disk fault, crash before writeback, tampering) is never
//! served into an image; it costs one re-download.

use super::reference::check_digest;
use crate::util::sha256_hex;
use anyhow::{anyhow, Context, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub(crate) struct BlobCache {
    dir: PathBuf,
}

/// Why storing a blob failed; `Short` and `Read` may heal on a retry.
#[derive(Debug)]
pub(crate) enum StoreError {
    /// The stream ended early.
    Short {
        got: u64,
        want: u64,
    },
    /// The connection broke mid-stream.
    Read {
        got: u64,
        error: String,
    },
    /// More bytes than declared.
    Long {
        want: u64,
    },
    /// All bytes arrived but hash to something else.
    Mismatch {
        actual: String,
    },
    Io(anyhow::Error),
}

impl BlobCache {
    pub(super) fn open(cache_dir: &Path) -> Result<Self> {
        let dir = cache_dir.join("blobs").join("sha256");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create the image cache {}", dir.display()))?;
        Ok(Self { dir })
    }

    #[cfg(test)]
    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of a blob; the digest is checked so it cannot name anything else.
    pub(super) fn path(&self, digest: &str) -> Result<PathBuf> {
        check_digest(digest).map_err(|e| anyhow!(e))?;
        Ok(self.dir.join(&digest["sha256:".len()..]))
    }

    /// Whether the blob is cached with the expected size (see the module policy).
    pub(super) fn has(&self, digest: &str, size: u64) -> bool {
        self.path(digest)
            .ok()
            .and_then(|p| p.metadata().ok())
            .is_some_and(|m| m.is_file() && m.len() == size)
    }

    /// A small cached blob (a manifest), re-verified; a corrupt entry is removed.
    pub(super) fn read_verified(&self, digest: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path(digest)?;
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        if format!("sha256:{}", sha256_hex(&bytes)) == digest {
            Ok(Some(bytes))
        } else {
            let _ = std::fs::remove_file(&path);
            Ok(None)
        }
    }

    /// Keep verified bytes already in memory (manifests).
    pub(super) fn put_verified(&self, digest: &str, bytes: &[u8]) -> Result<()> {
        crate::util::write_atomic(&self.path(digest)?, bytes)
    }

    /// Stream `size` bytes from `reader` into the cache, hashing as they pass;
    /// the entry appears only if size and digest match. `progress` sees each chunk.
    pub(super) fn store(
        &self,
        digest: &str,
        size: u64,
        reader: &mut dyn Read,
        progress: &dyn Fn(u64),
    ) -> Result<(), StoreError> {
        let path = self.path(digest).map_err(StoreError::Io)?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".partial-")
            .tempfile_in(&self.dir)
            .with_context(|| format!("cannot create a temp file in {}", self.dir.display()))
            .map_err(StoreError::Io)?;
        let mut hasher = Sha256::new();
        let mut got: u64 = 0;
        // Fill a large buffer from the (small) network chunks, then hash and
        // write it in one go: one copy, one write call per 1 MiB.
        let mut buf = vec![0u8; 1 << 20];
        let out = tmp.as_file_mut();
        let mut eof = false;
        while !eof {
            let mut filled = 0;
            while filled < buf.len() {
                // Ctrl-C stops the pull here; `reader` returns within a
                // fraction of a second of it even when the registry stalls
                // (see `util::InterruptibleReader`).
                crate::util::check_interrupted().map_err(StoreError::Io)?;
                match reader.read(&mut buf[filled..]) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(n) => {
                        filled += n;
                        progress(n as u64);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        crate::util::check_interrupted().map_err(StoreError::Io)?;
                        return Err(StoreError::Read {
                            got: got + filled as u64,
                            error: crate::util::error_chain(&e),
                        });
                    }
                }
                if got + filled as u64 > size {
                    return Err(StoreError::Long { want: size });
                }
            }
            hasher.update(&buf[..filled]);
            out.write_all(&buf[..filled])
                .context("cannot write to the image cache")
                .map_err(StoreError::Io)?;
            got += filled as u64;
        }
        if got < size {
            return Err(StoreError::Short { got, want: size });
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != digest {
            return Err(StoreError::Mismatch { actual });
        }
        // No fsync: a crash may leave a renamed entry whose bytes never hit the
        // disk, but every byte is hashed again where it is used (see the module
        // policy), so that costs a re-download, never a bad image. Skipping it
        // keeps the pull at network speed instead of disk-flush speed.
        tmp.persist(&path)
            .with_context(|| format!("cannot write {}", path.display()))
            .map_err(StoreError::Io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_of(b: &[u8]) -> String {
        format!("sha256:{}", sha256_hex(b))
    }

    fn leftovers(c: &BlobCache) -> usize {
        std::fs::read_dir(c.dir()).unwrap().count()
    }

    #[test]
    fn a_verified_blob_lands_under_its_digest() {
        let t = tempfile::tempdir().unwrap();
        let c = BlobCache::open(t.path()).unwrap();
        let data = b"layer bytes".to_vec();
        let d = digest_of(&data);
        c.store(&d, data.len() as u64, &mut &data[..], &|_| {})
            .unwrap();
        assert!(c.has(&d, data.len() as u64));
        let p = t.path().join("blobs/sha256").join(&d[7..]);
        assert_eq!(std::fs::read(p).unwrap(), data);
    }

    #[test]
    fn a_blob_with_the_wrong_digest_leaves_nothing_behind() {
        let t = tempfile::tempdir().unwrap();
        let c = BlobCache::open(t.path()).unwrap();
        let d = digest_of(b"expected");
        let err = c.store(&d, 8, &mut &b"tampered"[..], &|_| {}).unwrap_err();
        assert!(matches!(err, StoreError::Mismatch { .. }), "{err:?}");
        assert!(!c.has(&d, 8));
        assert_eq!(leftovers(&c), 0);
    }

    #[test]
    fn a_short_blob_leaves_nothing_behind() {
        let t = tempfile::tempdir().unwrap();
        let c = BlobCache::open(t.path()).unwrap();
        let d = digest_of(b"0123456789");
        let err = c.store(&d, 10, &mut &b"01234"[..], &|_| {}).unwrap_err();
        assert!(
            matches!(err, StoreError::Short { got: 5, want: 10 }),
            "{err:?}"
        );
        assert_eq!(leftovers(&c), 0);
    }

    #[test]
    fn a_blob_longer_than_declared_is_cut_off() {
        let t = tempfile::tempdir().unwrap();
        let c = BlobCache::open(t.path()).unwrap();
        let d = digest_of(b"0123");
        let err = c
            .store(&d, 4, &mut &b"0123456789"[..], &|_| {})
            .unwrap_err();
        assert!(matches!(err, StoreError::Long { want: 4 }), "{err:?}");
        assert_eq!(leftovers(&c), 0);
    }

    #[test]
    fn a_corrupt_cached_manifest_is_dropped_not_served() {
        let t = tempfile::tempdir().unwrap();
        let c = BlobCache::open(t.path()).unwrap();
        let d = digest_of(b"{}");
        std::fs::write(c.path(&d).unwrap(), b"{ }").unwrap();
        assert_eq!(c.read_verified(&d).unwrap(), None);
        assert!(!c.path(&d).unwrap().exists());
    }
}
