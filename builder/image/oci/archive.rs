//! One OCI image-layout tar per pulled image, as `ctr images import` and K3s's
//! airgap loader read it; byte-for-byte reproducible, optionally zstd.
//!
//! Layout: `blobs/sha256/<hex>` (sorted), `index.json` (one entry: the pinned
//! digest, named by `io.containerd.image.name`), `oci-layout`. Every entry has
//! mtime 0, uid/gid 0, mode 0644/0755 and no user names.

use super::cache::BlobCache;
use super::manifest::OCI_INDEX;
use super::PulledImage;
use crate::util::HashingWriter;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{BufWriter, Read, Write};
use std::path::Path;

/// What [`write_archive`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArchiveInfo {
    /// Hex sha256 of the archive file.
    pub sha256: String,
    /// Bytes of the archive file.
    pub bytes: u64,
    pub zstd: bool,
}

/// Write `image` as an OCI-layout tar to `out` (`.tar`, or `.tar.zst` for
/// zstd, compressed in-process). Every cached blob is hashed again while it
/// is copied; a corrupt cache entry is deleted and the write fails. `out`
/// appears only complete (temp file + rename).
pub fn write_archive(image: &PulledImage, out: &Path) -> Result<ArchiveInfo> {
    let name = out.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let zstd = if name.ends_with(".tar.zst") {
        true
    } else if name.ends_with(".tar") {
        false
    } else {
        bail!(
            "archive {} must end in .tar or .tar.zst (what K3s imports)",
            out.display()
        );
    };
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".kiln-tmp-")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temp file in {}", dir.display()))?;
    let ctx = || {
        format!(
            "cannot write the archive of {} to {}",
            image.reference,
            out.display()
        )
    };

    let w = HashingWriter::new(BufWriter::with_capacity(1 << 20, tmp.as_file()));
    let w = if zstd {
        // One thread and a fixed level with the crate's pinned zstd: the same
        // input gives the same bytes on any host.
        let encoder = zstd::stream::write::Encoder::new(w, 3).with_context(ctx)?;
        write_layout(image, encoder)
            .and_then(|e| Ok(e.finish()?))
            .with_context(ctx)?
    } else {
        write_layout(image, w).with_context(ctx)?
    };
    let (buf, sha256, _) = w.finish();
    buf.into_inner()
        .map_err(|e| e.into_error())
        .with_context(ctx)?;
    tmp.as_file().sync_all().with_context(ctx)?;
    let bytes = tmp.as_file().metadata()?.len();
    tmp.persist(out)
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(ArchiveInfo {
        sha256,
        bytes,
        zstd,
    })
}

/// The tar stream itself; returns the writer once the archive is finished.
fn write_layout<W: Write>(image: &PulledImage, w: W) -> Result<W> {
    let cache = BlobCache::open(&image.cache_dir)?;
    let mut tar = tar::Builder::new(w);
    dir_entry(&mut tar, "blobs/")?;
    dir_entry(&mut tar, "blobs/sha256/")?;
    let mut blobs: Vec<_> = image.blobs.iter().collect();
    blobs.sort_by(|a, b| a.digest.cmp(&b.digest));
    for b in blobs {
        let path = cache.path(&b.digest)?;
        let file = std::fs::File::open(&path).with_context(|| {
            format!(
                "blob {} of {} is not in the cache {} (pull first)",
                b.digest,
                image.reference,
                path.display()
            )
        })?;
        let len = file.metadata()?.len();
        if len != b.size {
            let _ = std::fs::remove_file(&path);
            bail!(
                "cached blob {} of {} is {len} bytes, not {}: removed it, pull again",
                b.digest,
                image.reference,
                b.size
            );
        }
        let mut reader = Verifying {
            inner: file.take(b.size),
            hasher: Sha256::new(),
        };
        let header = file_header(&format!("blobs/sha256/{}", &b.digest[7..]), b.size)?;
        tar.append(&header, &mut reader)?;
        let actual = format!("sha256:{}", hex::encode(reader.hasher.finalize()));
        if actual != b.digest {
            let _ = std::fs::remove_file(&path);
            bail!(
                "cached blob {} of {} is corrupt (hashes to {actual}): removed it, pull again",
                b.digest,
                image.reference
            );
        }
    }
    let index = index_json(image)?;
    tar.append(&file_header("index.json", index.len() as u64)?, &index[..])?;
    let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
    tar.append(
        &file_header("oci-layout", layout.len() as u64)?,
        &layout[..],
    )?;
    Ok(tar.into_inner()?)
}

/// `index.json`: one entry, the pinned document, named for containerd (full
/// name) and for OCI tools (`ref.name`: the tag, when there is one).
fn index_json(image: &PulledImage) -> Result<Vec<u8>> {
    #[derive(Serialize)]
    struct Index<'a> {
        #[serde(rename = "schemaVersion")]
        schema_version: u32,
        #[serde(rename = "mediaType")]
        media_type: &'a str,
        manifests: Vec<Entry<'a>>,
    }
    #[derive(Serialize)]
    struct Entry<'a> {
        #[serde(rename = "mediaType")]
        media_type: &'a str,
        digest: &'a str,
        size: u64,
        annotations: BTreeMap<&'a str, String>,
    }
    let mut annotations = BTreeMap::new();
    annotations.insert(
        "io.containerd.image.name",
        image.reference.containerd_name(),
    );
    if let Some(tag) = image.reference.tag() {
        annotations.insert("org.opencontainers.image.ref.name", tag.to_string());
    }
    let index = Index {
        schema_version: 2,
        media_type: OCI_INDEX,
        manifests: vec![Entry {
            media_type: &image.target.media_type,
            digest: &image.target.digest,
            size: image.target.size,
            annotations,
        }],
    };
    Ok(serde_json::to_vec(&index)?)
}

fn file_header(path: &str, size: u64) -> Result<tar::Header> {
    let mut h = tar::Header::new_ustar();
    h.set_path(path)?;
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(size);
    h.set_mode(0o644);
    fixed(&mut h);
    Ok(h)
}

fn dir_entry<W: Write>(tar: &mut tar::Builder<W>, path: &str) -> Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_path(path)?;
    h.set_entry_type(tar::EntryType::Directory);
    h.set_size(0);
    h.set_mode(0o755);
    fixed(&mut h);
    tar.append(&h, std::io::empty())?;
    Ok(())
}

/// Owner, time and names fixed, so the same blobs give the same bytes.
fn fixed(h: &mut tar::Header) {
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    let _ = h.set_username("");
    let _ = h.set_groupname("");
    h.set_cksum();
}

struct Verifying<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for Verifying<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::oci::manifest::{Descriptor, OCI_MANIFEST};
    use crate::image::oci::ImageRef;
    use crate::util::sha256_hex;

    /// A fake "pulled" image whose blobs sit in a temp cache.
    fn cached_image(dir: &Path, blobs: &[&[u8]]) -> PulledImage {
        let cache = BlobCache::open(dir).unwrap();
        let descs: Vec<Descriptor> = blobs
            .iter()
            .map(|b| {
                let digest = format!("sha256:{}", sha256_hex(b));
                std::fs::write(cache.path(&digest).unwrap(), b).unwrap();
                Descriptor {
                    media_type: OCI_MANIFEST.into(),
                    digest,
                    size: b.len() as u64,
                    platform: None,
                    annotations: Default::default(),
                }
            })
            .collect();
        let target = descs[0].clone();
        PulledImage {
            reference: ImageRef::parse(&format!("127.0.0.1:5000/kiln/t:v1@{}", target.digest))
                .unwrap(),
            manifest_digest: target.digest.clone(),
            config_digest: descs[1].digest.clone(),
            total_bytes: descs.iter().map(|d| d.size).sum(),
            target,
            blobs: descs,
            cache_dir: dir.to_path_buf(),
        }
    }

    fn entries(archive: &Path) -> Vec<(String, u64, u64, u32)> {
        let mut a = tar::Archive::new(std::fs::File::open(archive).unwrap());
        a.entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    h.mtime().unwrap(),
                    h.uid().unwrap(),
                    h.mode().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn archive_is_a_sorted_oci_layout_with_fixed_metadata() {
        let t = tempfile::tempdir().unwrap();
        let img = cached_image(t.path(), &[b"{\"m\":1}", b"config", b"layer"]);
        let out = t.path().join("out/img.tar");
        write_archive(&img, &out).unwrap();
        let e = entries(&out);
        let names: Vec<&str> = e.iter().map(|x| x.0.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        assert_eq!(names.len(), 2 + 3 + 2);
        assert_eq!(names[names.len() - 2..], ["index.json", "oci-layout"]);
        assert!(e.iter().all(|x| x.1 == 0 && x.2 == 0));
    }

    #[test]
    fn index_json_names_the_pinned_digest_for_containerd() {
        let t = tempfile::tempdir().unwrap();
        let img = cached_image(t.path(), &[b"{\"m\":1}", b"config"]);
        let json: serde_json::Value = serde_json::from_slice(&index_json(&img).unwrap()).unwrap();
        let m = &json["manifests"][0];
        assert_eq!(m["digest"], img.target.digest.as_str());
        assert_eq!(
            m["annotations"]["io.containerd.image.name"],
            "127.0.0.1:5000/kiln/t:v1"
        );
        assert_eq!(m["annotations"]["org.opencontainers.image.ref.name"], "v1");
    }

    #[test]
    fn the_same_image_gives_the_same_archive_bytes() {
        let t = tempfile::tempdir().unwrap();
        let img = cached_image(t.path(), &[b"{\"m\":1}", b"config", b"layer", b"layer2"]);
        let a = write_archive(&img, &t.path().join("a.tar")).unwrap();
        let b = write_archive(&img, &t.path().join("b.tar")).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            a.sha256,
            crate::util::sha256_file(&t.path().join("a.tar")).unwrap()
        );
    }

    #[test]
    fn a_corrupt_cache_entry_fails_the_archive_and_is_removed() {
        let t = tempfile::tempdir().unwrap();
        let img = cached_image(t.path(), &[b"{\"m\":1}", b"config", b"layer"]);
        let layer = img.blob_path(&img.blobs[2].digest).unwrap();
        std::fs::write(&layer, b"LAYER").unwrap(); // same size, other bytes
        let out = t.path().join("img.tar");
        let err = format!("{:#}", write_archive(&img, &out).unwrap_err());
        assert!(err.contains("corrupt"), "{err}");
        assert!(err.contains("127.0.0.1:5000/kiln/t:v1"), "{err}");
        assert!(!layer.exists(), "corrupt entry must be dropped");
        assert!(!out.exists(), "no half-written archive");
        let leftovers = std::fs::read_dir(t.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(".kiln-tmp")
            })
            .count();
        assert_eq!(leftovers, 0);
    }

    #[test]
    fn zstd_archive_decompresses_to_the_plain_archive() {
        let t = tempfile::tempdir().unwrap();
        let img = cached_image(t.path(), &[b"{\"m\":1}", b"config", b"layer"]);
        let plain = write_archive(&img, &t.path().join("a.tar")).unwrap();
        let z = write_archive(&img, &t.path().join("a.tar.zst")).unwrap();
        assert!(z.zstd);
        // Decoded by the zstd tool, independently of the crate that encoded it.
        let out = std::process::Command::new("zstd")
            .args(["-d", "-c"])
            .arg(t.path().join("a.tar.zst"))
            .output()
            .expect("the zstd tool runs (.ci/install-deps installs it)");
        assert!(out.status.success());
        assert_eq!(sha256_hex(&out.stdout), plain.sha256);
        let again = write_archive(&img, &t.path().join("b.tar.zst")).unwrap();
        assert_eq!(again.sha256, z.sha256);
    }

    #[test]
    fn other_extensions_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let img = cached_image(t.path(), &[b"{\"m\":1}", b"config"]);
        let err = write_archive(&img, &t.path().join("img.tgz"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(".tar or .tar.zst"), "{err}");
    }
}
