//! Container images for airgapped nodes: resolve references to digests and
//! pull them from OCI registries into archives containerd imports.
//!
//! `kiln lock` calls [`resolve`] to pin each tag to a digest; `kiln build`
//! calls [`pull`] (refuses unpinned references, verifies every blob, caches
//! blobs by digest, pulls concurrently) and then [`write_archive`] once per
//! image into `/var/lib/rancher/k3s/agent/images/`.

mod archive;
mod auth;
mod cache;
mod manifest;
mod reference;
mod registry;

pub use archive::{write_archive, ArchiveInfo};
pub use auth::Auth;
pub use manifest::{Descriptor, Platform};
pub use reference::{check_digest, ImageRef};

use anyhow::{anyhow, bail, Context, Result};
use cache::{BlobCache, StoreError};
use manifest::{select_platform, Document, MANIFEST_ACCEPT, MAX_MANIFEST_BYTES};
use registry::{Fault, Registry};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often a request is tried when the fault may be transient (5xx, 429,
/// dropped connection, short body), with 250 ms, 500 ms, … between tries.
const ATTEMPTS: u32 = 3;

/// Settings for [`pull`].
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Blobs land in `<cache_dir>/blobs/sha256/<hex>`.
    pub cache_dir: PathBuf,
    /// The platform picked out of image indexes (linux/amd64).
    pub platform: Platform,
    /// Blob downloads in flight at once (at least 1).
    pub concurrency: usize,
    pub auth: Auth,
    /// Draw a progress bar (see `progress::enabled`).
    pub progress: bool,
    /// Refuse before downloading layers when the images together need more
    /// bytes than this (the caller passes what `disk.size` leaves for them).
    pub max_total_bytes: Option<u64>,
}

impl PullOptions {
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            platform: Platform::linux_amd64(),
            concurrency: 4,
            auth: Auth::anonymous(),
            progress: false,
            max_total_bytes: None,
        }
    }
}

/// An image whose blobs are all in the cache, verified.
#[derive(Debug, Clone, Serialize)]
pub struct PulledImage {
    /// The pinned reference as given.
    pub reference: ImageRef,
    /// The pinned digest's document (an index or a manifest): what the archive's
    /// `index.json` points at, so containerd records the digest that was pinned.
    pub target: Descriptor,
    /// The chosen platform's image manifest (the target itself when it is one).
    pub manifest_digest: String,
    /// The image config (containerd's and CRI's image id).
    pub config_digest: String,
    /// Every blob the archive carries, each once: target, platform manifest,
    /// config, layers.
    pub blobs: Vec<Descriptor>,
    /// Sum of the blob sizes: about the archive's size, less tar headers.
    pub total_bytes: u64,
    #[serde(skip)]
    cache_dir: PathBuf,
}

impl PulledImage {
    /// Where a blob of this image sits in the cache.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        BlobCache::open(&self.cache_dir)?.path(digest)
    }

    /// A file name for this image's archive: `quay.io_cilium_cilium_v1.18.2-<12 hex>.tar[.zst]`.
    pub fn archive_file_name(&self, zstd: bool) -> String {
        let name: String = self
            .reference
            .containerd_name()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let short = &self.target.digest["sha256:".len()..][..12];
        format!("{name}-{short}.tar{}", if zstd { ".zst" } else { "" })
    }
}

/// Pin `image`'s tag (`latest` when it has none) to the digest the registry
/// serves for it now: the index digest for multi-platform images. A reference
/// that already carries a digest is returned as is, without asking the network.
/// The manifest is downloaded and hashed, so the registry's
/// `Docker-Content-Digest` claim is checked, not trusted.
pub fn resolve(image: &ImageRef, auth: &Auth) -> Result<String> {
    if let Some(d) = image.digest() {
        return Ok(d.to_string());
    }
    let tag = image.tag().unwrap_or("latest");
    let reg = Registry::new(auth)?;
    let what = format!("tag {tag}");
    with_retries(|| {
        let resp = reg.get(image, "manifests", tag, Some(MANIFEST_ACCEPT), &what)?;
        let claimed = header(&resp, "docker-content-digest");
        let content_type = header(&resp, "content-type");
        let bytes = read_limited(resp, MAX_MANIFEST_BYTES, &what)?;
        let digest = format!("sha256:{}", crate::util::sha256_hex(&bytes));
        if let Some(c) = claimed.filter(|c| c.starts_with("sha256:")) {
            if c != digest {
                return Err(Fault::Fatal(anyhow!(
                    "the registry says {what} is {c} but its bytes hash to {digest}"
                )));
            }
        }
        Document::parse(&bytes, content_type.as_deref())
            .with_context(|| format!("{what} is not a usable manifest"))?;
        Ok(digest)
    })
    .with_context(|| format!("cannot resolve {image}"))
}

/// Pull pinned images into the cache: each index is narrowed to
/// `opts.platform`, every blob is verified against its digest while it
/// streams, blobs shared between images are fetched once, and up to
/// `opts.concurrency` downloads run at once. Refuses references without a
/// digest, and sets larger than `opts.max_total_bytes`, before downloading
/// any layer. Cached blobs are not fetched again.
pub fn pull(images: &[ImageRef], opts: &PullOptions) -> Result<Vec<PulledImage>> {
    let unpinned: Vec<String> = images
        .iter()
        .filter(|i| i.digest().is_none())
        .map(|i| i.to_string())
        .collect();
    if !unpinned.is_empty() {
        let (noun, verb, it) = if unpinned.len() == 1 {
            ("image", "has", "it")
        } else {
            ("images", "have", "them")
        };
        bail!(
            "{noun} {} {verb} no locked digest (run `kiln lock` to pin {it})",
            unpinned.join(", ")
        );
    }
    let cache = BlobCache::open(&opts.cache_dir)?;
    let reg = Registry::new(&opts.auth)?;
    let workers = opts.concurrency.max(1);

    // Phase 1: manifests (small, cached by digest too), to learn every blob.
    let pulled = crate::util::parallel::map_slice(images, workers, |image| {
        plan_image(&reg, &cache, &opts.cache_dir, image, &opts.platform)
            .with_context(|| format!("cannot pull {image}"))
    })?;

    let total: u64 = pulled.iter().map(|p| p.total_bytes).sum();
    if let Some(max) = opts.max_total_bytes {
        if total > max {
            let mut sizes: Vec<&PulledImage> = pulled.iter().collect();
            sizes.sort_by_key(|p| std::cmp::Reverse(p.total_bytes));
            let list: Vec<String> = sizes
                .iter()
                .map(|p| {
                    format!(
                        "{} ({})",
                        p.reference,
                        crate::util::human_bytes(p.total_bytes)
                    )
                })
                .collect();
            bail!(
                "the images need {} but only {} is left for them in the disk: {}",
                crate::util::human_bytes(total),
                crate::util::human_bytes(max),
                list.join(", ")
            );
        }
    }

    // Phase 2: every missing blob once, whichever image first needs it.
    let mut missing: BTreeMap<&str, (&Descriptor, &ImageRef)> = BTreeMap::new();
    for p in &pulled {
        for b in &p.blobs {
            if !cache.has(&b.digest, b.size) {
                missing
                    .entry(b.digest.as_str())
                    .or_insert((b, &p.reference));
            }
        }
    }
    let mut todo: Vec<(&Descriptor, &ImageRef)> = missing.into_values().collect();
    // Biggest first: the long downloads start early and overlap the small ones.
    todo.sort_by_key(|(d, _)| std::cmp::Reverse(d.size));
    let bytes: u64 = todo.iter().map(|(d, _)| d.size).sum();
    let bar = crate::util::progress::bytes(opts.progress, Some(bytes), "pulling images");
    let fetched = crate::util::parallel::map_slice(&todo, workers, |(desc, image)| {
        fetch_blob(&reg, &cache, image, desc, &bar).with_context(|| format!("cannot pull {image}"))
    });
    bar.finish_and_clear();
    fetched?;
    Ok(pulled)
}

/// Load the target document (and, for an index, the platform's manifest)
/// and list the blobs the image needs.
fn plan_image(
    reg: &Registry,
    cache: &BlobCache,
    cache_dir: &Path,
    image: &ImageRef,
    platform: &Platform,
) -> Result<PulledImage> {
    let digest = image.digest().expect("pull checks pins first");
    let bytes = load_manifest(reg, cache, image, digest)?;
    let doc = Document::parse(&bytes, None)
        .with_context(|| format!("manifest {digest} is not usable"))?;
    let target = Descriptor {
        media_type: doc.media_type().to_string(),
        digest: digest.to_string(),
        size: bytes.len() as u64,
        platform: None,
        annotations: Default::default(),
    };
    let mut blobs = vec![target.clone()];
    let (manifest_digest, config, layers) = match doc {
        Document::Image { config, layers, .. } => (digest.to_string(), config, layers),
        Document::Index { manifests, .. } => {
            let entry = select_platform(&manifests, platform)?;
            let mbytes = load_manifest(reg, cache, image, &entry.digest)?;
            if mbytes.len() as u64 != entry.size {
                bail!(
                    "manifest {} is {} bytes but the index says {}",
                    entry.digest,
                    mbytes.len(),
                    entry.size
                );
            }
            match Document::parse(&mbytes, Some(&entry.media_type))
                .with_context(|| format!("manifest {} is not usable", entry.digest))?
            {
                Document::Image { config, layers, .. } => {
                    blobs.push(Descriptor {
                        platform: None,
                        annotations: Default::default(),
                        ..entry.clone()
                    });
                    (entry.digest.clone(), config, layers)
                }
                Document::Index { .. } => bail!(
                    "the {platform} entry {} of the index is itself an index",
                    entry.digest
                ),
            }
        }
    };
    let config_digest = config.digest.clone();
    for b in std::iter::once(config).chain(layers) {
        if !blobs.iter().any(|x| x.digest == b.digest) {
            blobs.push(Descriptor {
                platform: None,
                ..b
            });
        }
    }
    let total_bytes = blobs.iter().map(|b| b.size).sum();
    Ok(PulledImage {
        reference: image.clone(),
        target,
        manifest_digest,
        config_digest,
        blobs,
        total_bytes,
        cache_dir: cache_dir.to_path_buf(),
    })
}

/// A manifest by digest: from the cache (re-hashed) or the registry (hashed,
/// then cached).
fn load_manifest(
    reg: &Registry,
    cache: &BlobCache,
    image: &ImageRef,
    digest: &str,
) -> Result<Vec<u8>> {
    if let Some(bytes) = cache.read_verified(digest)? {
        return Ok(bytes);
    }
    let what = format!("manifest {digest}");
    let bytes = with_retries(|| {
        // Always offer every type: a registry may rewrite a manifest into a
        // type the client accepts, which would change its digest.
        let resp = reg.get(image, "manifests", digest, Some(MANIFEST_ACCEPT), &what)?;
        let bytes = read_limited(resp, MAX_MANIFEST_BYTES, &what)?;
        let actual = format!("sha256:{}", crate::util::sha256_hex(&bytes));
        if actual != digest {
            return Err(Fault::Fatal(anyhow!(
                "{what} does not match its digest (the registry sent bytes hashing to {actual})"
            )));
        }
        Ok(bytes)
    })?;
    cache.put_verified(digest, &bytes)?;
    Ok(bytes)
}

/// Stream one blob into the cache, retrying transient faults.
fn fetch_blob(
    reg: &Registry,
    cache: &BlobCache,
    image: &ImageRef,
    desc: &Descriptor,
    bar: &indicatif::ProgressBar,
) -> Result<()> {
    let what = format!("blob {}", desc.digest);
    with_retries(|| {
        let resp = reg.get(image, "blobs", &desc.digest, None, &what)?;
        let mut body = crate::util::InterruptibleReader::new(resp);
        let credited = std::cell::Cell::new(0u64);
        let result = cache.store(&desc.digest, desc.size, &mut body, &|n| {
            credited.set(credited.get() + n);
            bar.inc(n);
        });
        if result.is_err() {
            bar.set_position(bar.position().saturating_sub(credited.get()));
        }
        result.map_err(|e| match e {
            StoreError::Short { got, want } => Fault::Retry(anyhow!(
                "{what} is truncated: the registry sent {got} of {want} bytes; nothing was cached"
            )),
            StoreError::Read { got, error } => Fault::Retry(anyhow!(
                "{what} is truncated: the connection broke after {got} of {} bytes ({error}); nothing was cached",
                desc.size
            )),
            StoreError::Long { want } => Fault::Fatal(anyhow!(
                "{what} is longer than the {want} bytes its manifest declares; nothing was cached"
            )),
            StoreError::Mismatch { actual } => Fault::Fatal(anyhow!(
                "{what} does not match its digest (the registry sent bytes hashing to {actual}); nothing was cached"
            )),
            StoreError::Io(e) => Fault::Fatal(e),
        })
    })
}

fn with_retries<T>(mut f: impl FnMut() -> Result<T, Fault>) -> Result<T> {
    let mut attempt = 1;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(Fault::Retry(_)) if attempt < ATTEMPTS && !crate::util::interrupted() => {
                crate::util::sleep_interruptible(Duration::from_millis(250 << (attempt - 1)))?;
                attempt += 1;
            }
            Err(Fault::Retry(e)) => {
                return Err(e.context(format!("gave up after {ATTEMPTS} attempts")))
            }
            Err(f) => return Err(f.into_error()),
        }
    }
}

fn header(resp: &reqwest::blocking::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// A whole (small) body, refused beyond `limit` bytes; a broken connection is
/// a transient fault.
fn read_limited(
    resp: reqwest::blocking::Response,
    limit: u64,
    what: &str,
) -> Result<Vec<u8>, Fault> {
    let mut bytes = Vec::new();
    let body = crate::util::InterruptibleReader::new(resp);
    body.take(limit + 1).read_to_end(&mut bytes).map_err(|e| {
        if let Err(stop) = crate::util::check_interrupted() {
            return Fault::Fatal(stop);
        }
        Fault::Retry(anyhow!(
            "{what} is truncated: {}",
            crate::util::error_chain(&e)
        ))
    })?;
    if bytes.len() as u64 > limit {
        return Err(Fault::Fatal(anyhow!(
            "{what} is larger than {} bytes; refused",
            limit
        )));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_refuses_an_unpinned_reference_before_any_network() {
        let t = tempfile::tempdir().unwrap();
        // Port 9 on loopback: nothing listens, so any request would fail differently.
        let refs = [ImageRef::parse("127.0.0.1:9/kiln/app:v1").unwrap()];
        let err = pull(&refs, &PullOptions::new(t.path()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("127.0.0.1:9/kiln/app:v1"), "{err}");
        assert!(err.contains("no locked digest"), "{err}");
    }

    #[test]
    fn ctrl_c_stops_a_pull_whose_blob_stalls_within_a_second() {
        use crate::util::child_test::*;
        use crate::util::sha256_hex;
        let digest = |b: &[u8]| format!("sha256:{}", sha256_hex(b));
        let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
        let layer = vec![7u8; 1000];
        let desc = |media: &str, b: &[u8]| serde_json::json!({"mediaType": media, "digest": digest(b), "size": b.len()});
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": manifest::OCI_MANIFEST,
            "config": desc("application/vnd.oci.image.config.v1+json", &config),
            "layers": [desc("application/vnd.oci.image.layer.v1.tar", &layer)],
        }))
        .unwrap();
        let (m, c, l) = (digest(&manifest), digest(&config), digest(&layer));
        let layer_path = format!("/v2/kiln/app/blobs/{l}");
        let routes = (m.clone(), c.clone(), layer_path.clone());
        // A registry that stalls in the middle of the layer.
        let s = crate::image::fetch::test_http::Server::start(move |_, req, conn| {
            let (m, c, l) = &routes;
            if req.path == format!("/v2/kiln/app/manifests/{m}") {
                let ct = ("Content-Type", manifest::OCI_MANIFEST.to_string());
                conn.respond("200 OK", &[ct], &manifest);
            } else if req.path == format!("/v2/kiln/app/blobs/{c}") {
                conn.respond("200 OK", &[], &config);
            } else if &req.path == l {
                conn.head("200 OK", &[], 1000);
                conn.body(&[7u8; 100]);
                conn.stall();
            } else {
                conn.respond("404 Not Found", &[], b"");
            }
        });
        let (mut child, _lines) = spawn(
            "image::oci::tests::child_pulls_from_a_stalled_registry",
            &[(
                "KILN_TEST_IMAGE",
                format!("127.0.0.1:{}/kiln/app@{m}", s.port),
            )],
        );
        let end = std::time::Instant::now() + Duration::from_secs(30);
        while !s.requests().iter().any(|r| r.path == layer_path) {
            assert!(
                std::time::Instant::now() < end,
                "the layer was never asked for"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // Well into the stalled read.
        std::thread::sleep(Duration::from_millis(300));
        sigint(&child);
        let (status, took) = wait_exit(&mut child, Duration::from_secs(10));
        assert!(status.success(), "the child failed: {status:?}");
        assert!(took < Duration::from_millis(1500), "{took:?}");
    }

    /// Run by `ctrl_c_stops_a_pull_whose_blob_stalls_within_a_second`.
    #[test]
    #[ignore = "a child process of ctrl_c_stops_a_pull_whose_blob_stalls_within_a_second"]
    fn child_pulls_from_a_stalled_registry() {
        if !crate::util::child_test::is_child() {
            return;
        }
        crate::util::install_interrupt_handler();
        let t = tempfile::tempdir().unwrap();
        let image = ImageRef::parse(&std::env::var("KILN_TEST_IMAGE").unwrap()).unwrap();
        let err = pull(&[image], &PullOptions::new(t.path())).unwrap_err();
        assert!(
            err.chain().any(|e| e.to_string() == "interrupted"),
            "{err:#}"
        );
        // Only the verified manifest and config are cached, no partial layer.
        let cache = BlobCache::open(t.path()).unwrap();
        assert_eq!(std::fs::read_dir(cache.dir()).unwrap().count(), 2);
    }

    #[test]
    fn resolve_returns_an_existing_pin_without_the_network() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let r = ImageRef::parse(&format!("127.0.0.1:9/kiln/app:v1@{d}")).unwrap();
        assert_eq!(resolve(&r, &Auth::anonymous()).unwrap(), d);
    }

    #[test]
    fn archive_file_names_are_plain_and_carry_the_digest() {
        let d = format!("sha256:{}", "0123456789ab".repeat(6).get(..64).unwrap());
        let p = PulledImage {
            reference: ImageRef::parse(&format!("quay.io/cilium/cilium:v1.18.2@{d}")).unwrap(),
            target: Descriptor {
                media_type: manifest::OCI_INDEX.into(),
                digest: d.clone(),
                size: 1,
                platform: None,
                annotations: Default::default(),
            },
            manifest_digest: d.clone(),
            config_digest: d,
            blobs: vec![],
            total_bytes: 0,
            cache_dir: PathBuf::new(),
        };
        assert_eq!(
            p.archive_file_name(true),
            "quay.io_cilium_cilium_v1.18.2-0123456789ab.tar.zst"
        );
    }
}
