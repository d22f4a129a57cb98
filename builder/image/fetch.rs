//! Fetch: download pinned artifacts into a content-addressed cache
//! (`$KILN_CACHE`, default `~/.cache/kiln`), verified before they are kept.
//!
//! A download streams into a temp file in the cache while it is hashed, and is
//! renamed to `blobs/sha256/<digest>` only when the digest matches, so a
//! partial or corrupt entry is never served.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::util::HashingWriter;

/// The content-addressed cache shared by every build.
#[derive(Debug, Clone)]
pub struct Cache {
    pub root: PathBuf,
}

impl Cache {
    /// `$KILN_CACHE`, or `~/.cache/kiln`.
    pub fn from_env() -> Result<Cache> {
        let root = match std::env::var_os("KILN_CACHE") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => {
                let home =
                    std::env::var_os("HOME").context("neither KILN_CACHE nor HOME is set")?;
                PathBuf::from(home).join(".cache/kiln")
            }
        };
        Cache::at(root)
    }

    pub fn at(root: PathBuf) -> Result<Cache> {
        for sub in ["blobs/sha256", "rootfs", "references", "tmp"] {
            std::fs::create_dir_all(root.join(sub)).with_context(|| {
                format!("cannot create cache directory {}", root.join(sub).display())
            })?;
        }
        Ok(Cache { root })
    }

    /// Where a blob with this sha256 lives (it may not exist).
    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        self.root.join("blobs/sha256").join(sha256)
    }

    /// A scratch directory inside the cache, removed on drop. What killed
    /// builds left there (nobody holds its lock) is swept away first.
    pub fn scratch(&self, prefix: &str) -> Result<crate::util::locks::LockedDir> {
        crate::image::cachegc::sweep_tmp(self, false);
        crate::util::locks::LockedDir::new_in(&self.root.join("tmp"), prefix)
            .context("cannot create a scratch directory in the cache")
    }

    /// Where the reference copy of a recipe's last output named `name` lives:
    /// a previous output whose unchanged parts a rebuild reuses (see
    /// [`crate::image::reuse`]).
    pub fn reference(&self, name: &str) -> PathBuf {
        self.root.join("references").join(name)
    }

    /// A cached blob, if present.
    pub fn get(&self, sha256: &str) -> Option<PathBuf> {
        let p = self.blob_path(sha256);
        p.is_file().then_some(p)
    }

    /// Fetch `url` into the cache. With `expected`, the bytes must hash to it
    /// (and a cached copy is used without touching the network); without it the
    /// digest is computed (that is how `kiln lock` pins a new artifact).
    /// Returns the blob path and its sha256.
    pub fn fetch(
        &self,
        what: &str,
        url: &str,
        expected: Option<&str>,
        show: bool,
    ) -> Result<(PathBuf, String)> {
        if let Some(want) = expected {
            if let Some(p) = self.get(want) {
                return Ok((p, want.to_string()));
            }
        }
        let mut tmp = tempfile::Builder::new()
            .prefix(".download-")
            .tempfile_in(self.root.join("tmp"))?;
        // Held while it is written, so a sweep tells it from a killed build's.
        tmp.as_file().lock()?;
        let (digest, len) = {
            let mut writer = HashingWriter::new(std::io::BufWriter::new(tmp.as_file_mut()));
            download(what, url, &mut writer, show)?;
            let (w, digest, len) = writer.finish();
            w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            (digest, len)
        };
        if let Some(want) = expected {
            if digest != want {
                bail!("{what}: sha256 mismatch for {url}: got {digest}, expected {want} ({len} bytes; not cached)");
            }
        }
        let dest = self.blob_path(&digest);
        let mut perms = tmp.as_file().metadata()?.permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o444);
        tmp.as_file().set_permissions(perms)?;
        tmp.persist(&dest)
            .with_context(|| format!("cannot store {} in the cache", dest.display()))?;
        Ok((dest, digest))
    }

    /// Remove a blob that turned out corrupt, so it is fetched again next time.
    pub fn evict(&self, sha256: &str) {
        let _ = std::fs::remove_file(self.blob_path(sha256));
    }
}

/// Stream `url` (http, https or file) into `out`, with a byte progress bar.
pub fn download(what: &str, url: &str, out: &mut impl Write, show: bool) -> Result<u64> {
    if let Some(path) = url.strip_prefix("file://") {
        let mut f = File::open(path).with_context(|| format!("{what}: cannot read {url}"))?;
        let total = f.metadata().ok().map(|m| m.len());
        let pb = crate::util::progress::bytes(show, total, format!("fetch {what}"));
        let n = copy_with_progress(&mut f, out, &pb)
            .with_context(|| format!("{what}: cannot read {url}"))?;
        pb.finish_and_clear();
        return Ok(n);
    }
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        bail!("{what}: unsupported URL {url} (use http, https or file)");
    }
    let client = reqwest::blocking::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .timeout(None)
        .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
        .build()?;
    let mut resp = client
        .get(url)
        .send()
        .map_err(|e| anyhow::anyhow!("{what}: cannot download {url}: {}", root_cause(&e)))?;
    if !resp.status().is_success() {
        bail!("{what}: cannot download {url}: HTTP {}", resp.status());
    }
    let total = resp.content_length();
    let pb = crate::util::progress::bytes(show, total, format!("fetch {what}"));
    let n = copy_with_progress(&mut resp, out, &pb)
        .map_err(|e| anyhow::anyhow!("{what}: download of {url} failed: {e:#}"))?;
    pb.finish_and_clear();
    if let Some(t) = total {
        if n != t {
            bail!("{what}: download of {url} ended after {n} of {t} bytes");
        }
    }
    Ok(n)
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cur = e;
    let mut msg = e.to_string();
    while let Some(s) = cur.source() {
        msg = s.to_string();
        cur = s;
    }
    msg
}

fn copy_with_progress(
    r: &mut impl Read,
    w: &mut impl Write,
    pb: &indicatif::ProgressBar,
) -> Result<u64> {
    let mut buf = vec![0u8; 256 << 10];
    let mut n = 0u64;
    loop {
        crate::util::check_interrupted()?;
        let k = r.read(&mut buf)?;
        if k == 0 {
            break;
        }
        w.write_all(&buf[..k])?;
        n += k as u64;
        pb.set_position(n);
    }
    Ok(n)
}

/// A path is in the cache's scratch area (used by tests to look for leftovers).
pub fn is_scratch(cache: &Cache, p: &Path) -> bool {
    p.starts_with(cache.root.join("tmp"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> (tempfile::TempDir, Cache) {
        let d = tempfile::tempdir().unwrap();
        let c = Cache::at(d.path().join("cache")).unwrap();
        (d, c)
    }

    #[test]
    fn verified_file_lands_under_its_digest() {
        let (d, c) = cache();
        let src = d.path().join("a");
        std::fs::write(&src, b"hello").unwrap();
        let want = crate::util::sha256_hex(b"hello");
        let (p, got) = c
            .fetch(
                "a",
                &format!("file://{}", src.display()),
                Some(&want),
                false,
            )
            .unwrap();
        assert_eq!(got, want);
        assert_eq!(p, c.blob_path(&want));
        assert_eq!(std::fs::read(p).unwrap(), b"hello");
    }

    #[test]
    fn digest_mismatch_is_refused_and_nothing_is_cached() {
        let (d, c) = cache();
        let src = d.path().join("a");
        std::fs::write(&src, b"tampered").unwrap();
        let want = crate::util::sha256_hex(b"hello");
        let err = c
            .fetch(
                "k3s",
                &format!("file://{}", src.display()),
                Some(&want),
                false,
            )
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("k3s") && err.contains("sha256 mismatch"),
            "{err}"
        );
        assert_eq!(
            std::fs::read_dir(c.root.join("blobs/sha256"))
                .unwrap()
                .count(),
            0
        );
        assert_eq!(std::fs::read_dir(c.root.join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn unreachable_url_names_the_artifact() {
        let (_d, c) = cache();
        // Port 9 on loopback: nothing listens there.
        let err = c
            .fetch("helm", "http://127.0.0.1:9/helm.tgz", None, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("helm") && err.contains("http://127.0.0.1:9/helm.tgz"),
            "{err}"
        );
    }

    #[test]
    fn cached_blob_is_served_without_fetching() {
        let (_d, c) = cache();
        let want = crate::util::sha256_hex(b"cached");
        std::fs::write(c.blob_path(&want), b"cached").unwrap();
        let (p, _) = c
            .fetch(
                "x",
                "http://127.0.0.1:9/never-contacted",
                Some(&want),
                false,
            )
            .unwrap();
        assert_eq!(std::fs::read(p).unwrap(), b"cached");
    }
}
