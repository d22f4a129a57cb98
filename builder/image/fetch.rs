//! Fetch: download pinned artifacts into a content-addressed cache
//! (`$KILN_CACHE`, default `~/.cache/kiln`), verified before they are kept.
//!
//! A download streams into a temp file in the cache while it is hashed, and is
//! renamed to `blobs/sha256/<digest>` only when the digest matches, so a
//! partial or corrupt entry is never served.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::PathBuf;
use std::time::Duration;

use crate::util::HashingWriter;

/// The content-addressed cache shared by every build.
#[derive(Debug, Clone)]
pub struct Cache {
    pub root: PathBuf,
    /// How downloads into this cache wait and retry.
    pub policy: FetchPolicy,
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
        Ok(Cache {
            root,
            policy: FetchPolicy::from_env()?,
        })
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

    /// A cached blob, if present (not verified: [`Cache::fetch`] does that).
    pub fn get(&self, sha256: &str) -> Option<PathBuf> {
        if !crate::image::recipe::is_sha256(sha256) {
            return None;
        }
        let p = self.blob_path(sha256);
        p.is_file().then_some(p)
    }

    /// Fetch `url` into the cache. With `expected`, the bytes must hash to it;
    /// a cached copy is hashed again on every use and served without touching
    /// the network when it still matches, else evicted and fetched once more.
    /// Without `expected` the digest is computed (that is how `kiln lock` pins
    /// a new artifact). Returns the blob path and its sha256.
    pub fn fetch(
        &self,
        what: &str,
        url: &str,
        expected: Option<&str>,
        show: bool,
    ) -> Result<(PathBuf, String)> {
        if let Some(want) = expected {
            // It becomes a path: nothing but a digest may name a file here.
            if !crate::image::recipe::is_sha256(want) {
                bail!("{what}: sha256 `{want}` is not 64 lowercase hex digits");
            }
            if let Some(p) = self.get(want) {
                // Every use, not only the first: a cached copy may have rotted
                // or been replaced since (an extracted archive is never hashed
                // again later). Artifacts are small next to the base rootfs,
                // so this costs a fraction of a second.
                let actual = crate::util::sha256_file(&p)?;
                if actual == want {
                    return Ok((p, actual));
                }
                if show {
                    eprintln!(
                        "{what}: the cached copy {} is corrupt (sha256 {actual}); fetching it again",
                        p.display()
                    );
                }
                self.evict(want);
            }
        }
        let mut tmp = tempfile::Builder::new()
            .prefix(".download-")
            .tempfile_in(self.root.join("tmp"))?;
        // Held while it is written, so a sweep tells it from a killed build's.
        tmp.as_file().lock()?;
        let (digest, len) = download(what, url, tmp.as_file_mut(), &self.policy, show)?;
        tmp.as_file().sync_all()?;
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

    /// Remove a blob that turned out corrupt, so it is fetched again.
    pub fn evict(&self, sha256: &str) {
        if crate::image::recipe::is_sha256(sha256) {
            let _ = std::fs::remove_file(self.blob_path(sha256));
        }
    }
}

/// How downloads wait and retry. `KILN_FETCH_CONNECT_TIMEOUT` and
/// `KILN_FETCH_READ_TIMEOUT` (seconds) override the timeouts.
#[derive(Debug, Clone, PartialEq)]
pub struct FetchPolicy {
    /// Longest wait for a TCP (and TLS) connection.
    pub connect_timeout: Duration,
    /// Longest silence while waiting for the answer or for the next bytes:
    /// a stalled server costs this long, then the download is tried again.
    pub read_timeout: Duration,
    /// Tries per download (at least 1); only transient faults are retried.
    pub attempts: u32,
    /// Pause before the second try, doubled before each further one.
    pub backoff: Duration,
}

impl Default for FetchPolicy {
    fn default() -> Self {
        FetchPolicy {
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(120),
            // Pauses of 1, 2 and 4 s: a mirror that is back within seconds
            // is waited for; one that is down fails the build soon.
            attempts: 4,
            backoff: Duration::from_secs(1),
        }
    }
}

impl FetchPolicy {
    /// The defaults, with timeouts from the environment.
    pub fn from_env() -> Result<FetchPolicy> {
        let secs = |var: &str, default: Duration| -> Result<Duration> {
            match std::env::var(var) {
                Ok(v) if !v.trim().is_empty() => v
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s > 0.0)
                    .map(Duration::from_secs_f64)
                    .with_context(|| format!("{var}=`{v}` is not a positive number of seconds")),
                _ => Ok(default),
            }
        };
        let d = FetchPolicy::default();
        Ok(FetchPolicy {
            connect_timeout: secs("KILN_FETCH_CONNECT_TIMEOUT", d.connect_timeout)?,
            read_timeout: secs("KILN_FETCH_READ_TIMEOUT", d.read_timeout)?,
            ..d
        })
    }
}

/// Why one try failed: worth another try (connection refused, reset or
/// stalled, 5xx, 429, a short body), or not (404, 403, Ctrl-C, local I/O).
enum Fault {
    Retry(anyhow::Error),
    Fatal(anyhow::Error),
}

impl Fault {
    fn into_error(self) -> anyhow::Error {
        match self {
            Fault::Retry(e) | Fault::Fatal(e) => e,
        }
    }
}

/// Download `url` (http, https or file) into `file`, with a byte progress
/// bar; returns the sha256 and length of what was written.
///
/// HTTP downloads time out per `policy` and are tried again on transient
/// faults, after a pause that doubles each time. A try that broke off after
/// some bytes resumes with a `Range` request: kept when the server answers
/// 206 for exactly the missing part, started over when it answers 200 (RFC
/// 9110 §14.2, §15.3.7). `If-Range` carries the first answer's validator, so
/// a file that changed on the server in between is sent whole instead of
/// being spliced. Ctrl-C stops the download within a fraction of a second.
pub(crate) fn download(
    what: &str,
    url: &str,
    file: &mut File,
    policy: &FetchPolicy,
    show: bool,
) -> Result<(String, u64)> {
    let mut out = HashingWriter::new(&mut *file);
    if let Some(path) = url.strip_prefix("file://") {
        let mut f = File::open(path).with_context(|| format!("{what}: cannot read {url}"))?;
        let total = f.metadata().ok().map(|m| m.len());
        let pb = crate::util::progress::bytes(show, total, format!("fetch {what}"));
        copy_with_progress(&mut f, &mut out, &pb)
            .map_err(Fault::into_error)
            .with_context(|| format!("{what}: cannot read {url}"))?;
        pb.finish_and_clear();
        let (_, digest, len) = out.finish();
        return Ok((digest, len));
    }
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        bail!("{what}: unsupported URL {url} (use http, https or file)");
    }
    let client = reqwest::blocking::Client::builder()
        .connect_timeout(policy.connect_timeout)
        // reqwest's blocking client applies this to the wait for the answer
        // and to each body read, not to the whole transfer (reqwest 0.12
        // src/blocking/response.rs, `impl Read for Response`).
        .timeout(policy.read_timeout)
        .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
        .build()?;
    // Made at the first answer, which tells the length.
    let mut pb = None;
    let mut validator = None;
    let attempts = policy.attempts.max(1);
    let mut attempt = 1;
    loop {
        let fault = match try_download(what, url, &client, &mut out, &mut validator, &mut pb, show)
        {
            Ok(()) => break,
            Err(f) => f,
        };
        match fault {
            Fault::Retry(e) if attempt < attempts && !crate::util::interrupted() => {
                let pause = policy.backoff * 2u32.saturating_pow(attempt - 1);
                // Beside the progress bars only: a failure's stderr is one line.
                let note = || {
                    eprintln!(
                        "{e:#}; trying again in {:.1} s (try {} of {attempts})",
                        pause.as_secs_f64(),
                        attempt + 1
                    )
                };
                match &pb {
                    Some(pb) if show => pb.suspend(note),
                    None if show => note(),
                    _ => {}
                }
                crate::util::sleep_interruptible(pause)?;
                attempt += 1;
            }
            Fault::Retry(e) => {
                return Err(anyhow::anyhow!("{e:#} (gave up after {attempt} attempts)"));
            }
            Fault::Fatal(e) => return Err(e),
        }
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let (_, digest, len) = out.finish();
    Ok((digest, len))
}

/// One try: continue `out` where the last try broke off, when the server
/// agrees to, else start it over.
fn try_download(
    what: &str,
    url: &str,
    client: &reqwest::blocking::Client,
    out: &mut HashingWriter<&mut File>,
    validator: &mut Option<reqwest::header::HeaderValue>,
    pb: &mut Option<indicatif::ProgressBar>,
    show: bool,
) -> Result<(), Fault> {
    use reqwest::header::{CONTENT_RANGE, ETAG, IF_RANGE, LAST_MODIFIED, RANGE};
    use reqwest::StatusCode;
    let have = out.written();
    let mut rb = client.get(url);
    if have > 0 {
        rb = rb.header(RANGE, format!("bytes={have}-"));
        if let Some(v) = validator.as_ref() {
            rb = rb.header(IF_RANGE, v.clone());
        }
    }
    let resp = crate::util::interruptible(move || rb.send())
        .map_err(Fault::Fatal)?
        .map_err(|e| {
            let msg = anyhow::anyhow!("{what}: cannot download {url}: {}", root_cause(&e));
            if e.is_builder() || e.is_redirect() {
                Fault::Fatal(msg)
            } else {
                Fault::Retry(msg)
            }
        })?;
    let status = resp.status();
    let header = |name| {
        resp.headers()
            .get(name)
            .and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok())
            .map(str::to_string)
    };
    let total = match status {
        StatusCode::PARTIAL_CONTENT if have > 0 => {
            // `bytes <first>-<last>/<complete length>`.
            let range = header(CONTENT_RANGE).unwrap_or_default();
            let (first, complete) = range
                .strip_prefix("bytes ")
                .and_then(|r| r.split_once('/'))
                .and_then(|(span, len)| {
                    Some((
                        span.split_once('-')?.0.parse::<u64>().ok()?,
                        len.parse::<u64>().ok(),
                    ))
                })
                .unzip();
            if first != Some(have) {
                restart(out).map_err(Fault::Fatal)?;
                return Err(Fault::Retry(anyhow::anyhow!(
                    "{what}: {url} answered a resume from byte {have} with the range `{range}`; starting over"
                )));
            }
            complete.flatten()
        }
        StatusCode::OK => {
            if have > 0 {
                // The server ignored the Range (or the file changed): the
                // whole file is coming again.
                restart(out).map_err(Fault::Fatal)?;
            }
            resp.content_length()
        }
        StatusCode::RANGE_NOT_SATISFIABLE if have > 0 => {
            restart(out).map_err(Fault::Fatal)?;
            return Err(Fault::Retry(anyhow::anyhow!(
                "{what}: {url} refused to resume from byte {have} (HTTP {status}); starting over"
            )));
        }
        s if s == StatusCode::TOO_MANY_REQUESTS || s.is_server_error() => {
            return Err(Fault::Retry(anyhow::anyhow!(
                "{what}: cannot download {url}: HTTP {status}"
            )))
        }
        _ => {
            return Err(Fault::Fatal(anyhow::anyhow!(
                "{what}: cannot download {url}: HTTP {status}"
            )))
        }
    };
    if status == StatusCode::OK {
        // Only a strong ETag may be sent in If-Range (RFC 9110 §13.1.5).
        *validator = resp
            .headers()
            .get(ETAG)
            .filter(|v| !v.as_bytes().starts_with(b"W/"))
            .or_else(|| resp.headers().get(LAST_MODIFIED))
            .cloned();
    }
    let pb = pb
        .get_or_insert_with(|| crate::util::progress::bytes(show, total, format!("fetch {what}")));
    if let Some(t) = total {
        pb.set_length(t);
    }
    pb.set_position(out.written());
    let mut body = crate::util::InterruptibleReader::new(resp);
    match copy_with_progress(&mut body, out, pb) {
        Ok(_) => {}
        Err(Fault::Retry(e)) => {
            return Err(Fault::Retry(anyhow::anyhow!(
                "{what}: download of {url} broke off after {} bytes: {}",
                out.written(),
                root_cause(e.as_ref())
            )))
        }
        Err(Fault::Fatal(e)) => {
            return Err(Fault::Fatal(
                e.context(format!("{what}: download of {url} failed")),
            ))
        }
    }
    if let Some(t) = total {
        if out.written() != t {
            return Err(Fault::Retry(anyhow::anyhow!(
                "{what}: download of {url} ended after {} of {t} bytes",
                out.written()
            )));
        }
    }
    Ok(())
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

/// Empty `out` for a download that starts over.
fn restart(out: &mut HashingWriter<&mut File>) -> anyhow::Result<()> {
    let f = out.get_mut();
    f.set_len(0)
        .and_then(|()| f.seek(std::io::SeekFrom::Start(0)).map(drop))
        .context("cannot truncate a download in the cache")?;
    out.reset();
    Ok(())
}

/// Copy until the end of `r`. A read error may heal on another try; a write
/// error (the cache's disk) or Ctrl-C does not.
fn copy_with_progress(
    r: &mut impl Read,
    w: &mut impl Write,
    pb: &indicatif::ProgressBar,
) -> Result<u64, Fault> {
    let mut buf = vec![0u8; 256 << 10];
    let mut n = 0u64;
    loop {
        crate::util::check_interrupted().map_err(Fault::Fatal)?;
        let k = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                crate::util::check_interrupted().map_err(Fault::Fatal)?;
                return Err(Fault::Retry(e.into()));
            }
        };
        w.write_all(&buf[..k])
            .context("cannot write to the cache")
            .map_err(Fault::Fatal)?;
        n += k as u64;
        pb.inc(k as u64);
    }
    Ok(n)
}

/// A loopback HTTP/1.1 server for tests, scripted per request: it can
/// answer, stall, or drop the connection mid-body.
#[cfg(test)]
pub(crate) mod test_http {
    use std::io::{BufRead, BufReader, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    #[derive(Debug, Clone)]
    pub(crate) struct Request {
        pub path: String,
        /// Lowercase names.
        pub headers: Vec<(String, String)>,
    }

    impl Request {
        pub(crate) fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        }
    }

    /// One connection, one request.
    pub(crate) struct Conn {
        pub stream: TcpStream,
        stop: Arc<AtomicBool>,
    }

    impl Conn {
        /// Status line, headers, `Content-Length: len` and `Connection: close`.
        pub(crate) fn head(&mut self, status: &str, headers: &[(&str, String)], len: usize) {
            let mut head =
                format!("HTTP/1.1 {status}\r\nContent-Length: {len}\r\nConnection: close\r\n");
            for (k, v) in headers {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            let _ = self.stream.write_all(head.as_bytes());
        }

        pub(crate) fn body(&mut self, bytes: &[u8]) {
            let _ = self.stream.write_all(bytes);
            let _ = self.stream.flush();
        }

        pub(crate) fn respond(&mut self, status: &str, headers: &[(&str, String)], body: &[u8]) {
            self.head(status, headers, body.len());
            self.body(body);
        }

        /// Send nothing more, keeping the connection open, until the server
        /// is dropped (at most a minute).
        pub(crate) fn stall(&mut self) {
            let end = Instant::now() + Duration::from_secs(60);
            while !self.stop.load(Ordering::SeqCst) && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub(crate) struct Server {
        pub port: u16,
        requests: Arc<Mutex<Vec<Request>>>,
        stop: Arc<AtomicBool>,
    }

    impl Server {
        /// Serve every connection on a thread of its own with
        /// `handle(n, request, conn)`, `n` counting requests from 0.
        pub(crate) fn start(
            handle: impl Fn(usize, &Request, &mut Conn) + Send + Sync + 'static,
        ) -> Server {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            let requests = Arc::new(Mutex::new(Vec::new()));
            let stop = Arc::new(AtomicBool::new(false));
            let handle = Arc::new(handle);
            let (reqs, st) = (requests.clone(), stop.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if st.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(stream) = conn else { continue };
                    let (reqs, st, handle) = (reqs.clone(), st.clone(), handle.clone());
                    std::thread::spawn(move || {
                        let Some(req) = read_request(&stream) else {
                            return;
                        };
                        let n = {
                            let mut r = reqs.lock().unwrap();
                            r.push(req.clone());
                            r.len() - 1
                        };
                        handle(n, &req, &mut Conn { stream, stop: st });
                    });
                }
            });
            Server {
                port,
                requests,
                stop,
            }
        }

        pub(crate) fn url(&self, path: &str) -> String {
            format!("http://127.0.0.1:{}{path}", self.port)
        }

        pub(crate) fn requests(&self) -> Vec<Request> {
            self.requests.lock().unwrap().clone()
        }

        /// Wait (at most 30 s) until `n` requests arrived.
        pub(crate) fn wait_for_requests(&self, n: usize) {
            let end = Instant::now() + Duration::from_secs(30);
            while self.requests.lock().unwrap().len() < n {
                assert!(Instant::now() < end, "fewer than {n} requests came");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            let _ = TcpStream::connect(("127.0.0.1", self.port));
        }
    }

    fn read_request(stream: &TcpStream) -> Option<Request> {
        let mut r = BufReader::new(stream.try_clone().ok()?);
        let mut line = String::new();
        r.read_line(&mut line).ok()?;
        let path = line.split_whitespace().nth(1)?.to_string();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            r.read_line(&mut h).ok()?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        Some(Request { path, headers })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> (tempfile::TempDir, Cache) {
        let d = tempfile::tempdir().unwrap();
        let mut c = Cache::at(d.path().join("cache")).unwrap();
        c.policy = quick();
        (d, c)
    }

    /// Short timeouts and pauses, so a test never waits for long.
    fn quick() -> FetchPolicy {
        FetchPolicy {
            connect_timeout: Duration::from_secs(2),
            read_timeout: Duration::from_millis(400),
            attempts: 3,
            backoff: Duration::from_millis(10),
        }
    }

    /// `download` of `url` into memory, failing the test (not hanging it)
    /// when it has not returned within 20 s. Also returns how long it took.
    fn download_bytes(url: &str, policy: FetchPolicy) -> (Result<Vec<u8>>, Duration) {
        let url = url.to_string();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let start = std::time::Instant::now();
            let mut f = tempfile::tempfile().unwrap();
            let r = download("blob", &url, &mut f, &policy, false).map(|(digest, len)| {
                let mut bytes = Vec::new();
                f.seek(std::io::SeekFrom::Start(0)).unwrap();
                f.read_to_end(&mut bytes).unwrap();
                assert_eq!(bytes.len() as u64, len);
                assert_eq!(crate::util::sha256_hex(&bytes), digest);
                bytes
            });
            let _ = tx.send((r, start.elapsed()));
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("the download hung")
    }

    fn body() -> Vec<u8> {
        (0..1000u32).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn err_text(r: Result<Vec<u8>>) -> String {
        format!("{:#}", r.unwrap_err())
    }

    #[test]
    fn a_stalled_body_times_out_instead_of_hanging() {
        let s = test_http::Server::start(|_, _, c| {
            c.head("200 OK", &[], 1000);
            c.body(&body()[..100]);
            c.stall();
        });
        let policy = FetchPolicy {
            attempts: 1,
            ..quick()
        };
        let (r, took) = download_bytes(&s.url("/a"), policy);
        let err = err_text(r);
        assert!(
            err.contains(&s.url("/a")) && err.contains("after 100 bytes"),
            "{err}"
        );
        assert!(took < Duration::from_secs(3), "{took:?}");
    }

    #[test]
    fn an_answer_that_never_comes_times_out() {
        let s = test_http::Server::start(|_, _, c| c.stall());
        let policy = FetchPolicy {
            attempts: 1,
            ..quick()
        };
        let (r, took) = download_bytes(&s.url("/a"), policy);
        let err = err_text(r);
        assert!(
            err.contains("cannot download") && err.contains(&s.url("/a")),
            "{err}"
        );
        assert!(took < Duration::from_secs(3), "{took:?}");
    }

    #[test]
    fn a_500_then_200_is_retried_and_succeeds() {
        let s = test_http::Server::start(|n, _, c| match n {
            0 => c.respond("500 Internal Server Error", &[], b"oops"),
            _ => c.respond("200 OK", &[], &body()),
        });
        let (r, _) = download_bytes(&s.url("/a"), quick());
        assert_eq!(r.unwrap(), body());
        assert_eq!(s.requests().len(), 2);
    }

    #[test]
    fn persistent_429_gives_up_after_the_bounded_attempts() {
        let s = test_http::Server::start(|_, _, c| c.respond("429 Too Many Requests", &[], b""));
        let (r, _) = download_bytes(&s.url("/a"), quick());
        let err = err_text(r);
        assert!(
            err.contains("429") && err.contains("gave up after 3 attempts"),
            "{err}"
        );
        assert_eq!(s.requests().len(), 3);
    }

    #[test]
    fn a_404_or_403_is_not_retried() {
        for status in ["404 Not Found", "403 Forbidden"] {
            let s = test_http::Server::start(move |_, _, c| c.respond(status, &[], b""));
            let (r, _) = download_bytes(&s.url("/a"), quick());
            let err = err_text(r);
            assert!(err.contains(status) && !err.contains("gave up"), "{err}");
            assert_eq!(s.requests().len(), 1, "{status}");
        }
    }

    #[test]
    fn a_connection_dropped_before_the_answer_is_retried() {
        let s = test_http::Server::start(|n, _, c| {
            if n > 0 {
                c.respond("200 OK", &[], &body());
            } // else: closed without a word
        });
        let (r, _) = download_bytes(&s.url("/a"), quick());
        assert_eq!(r.unwrap(), body());
        assert_eq!(s.requests().len(), 2);
    }

    #[test]
    fn a_broken_download_resumes_with_range_when_the_server_answers_206() {
        let s = test_http::Server::start(|n, req, c| {
            let etag = ("ETag", "\"v1\"".to_string());
            match (n, req.header("range")) {
                (0, _) => {
                    c.head("200 OK", &[etag], 1000);
                    c.body(&body()[..400]);
                } // and the connection drops
                (_, Some("bytes=400-")) if req.header("if-range") == Some("\"v1\"") => c.respond(
                    "206 Partial Content",
                    &[etag, ("Content-Range", "bytes 400-999/1000".into())],
                    &body()[400..],
                ),
                _ => c.respond("400 Bad Request", &[], b"unexpected request"),
            }
        });
        let (r, _) = download_bytes(&s.url("/a"), quick());
        assert_eq!(r.unwrap(), body());
        let reqs = s.requests();
        assert_eq!(reqs.len(), 2);
        assert_eq!(reqs[1].path, "/a");
        assert_eq!(reqs[1].header("range"), Some("bytes=400-"));
    }

    #[test]
    fn a_server_that_answers_a_resume_with_200_is_read_from_the_start() {
        let s = test_http::Server::start(|n, _, c| {
            if n == 0 {
                c.head("200 OK", &[], 1000);
                c.body(&body()[..400]);
            } else {
                c.respond("200 OK", &[], &body());
            }
        });
        let (r, _) = download_bytes(&s.url("/a"), quick());
        assert_eq!(r.unwrap(), body());
        assert_eq!(s.requests()[1].header("range"), Some("bytes=400-"));
    }

    #[test]
    fn ctrl_c_stops_a_stalled_download_within_a_second() {
        use crate::util::child_test::*;
        let s = test_http::Server::start(|_, _, c| {
            c.head("200 OK", &[], 1000);
            c.body(&body()[..100]);
            c.stall();
        });
        let (mut child, _lines) = spawn(
            "image::fetch::tests::child_downloads_from_a_stalled_server",
            &[("KILN_TEST_URL", s.url("/a"))],
        );
        s.wait_for_requests(1);
        // Well into the stalled read.
        std::thread::sleep(Duration::from_millis(300));
        sigint(&child);
        let (status, took) = wait_exit(&mut child, Duration::from_secs(10));
        assert!(status.success(), "the child failed: {status:?}");
        assert!(took < Duration::from_millis(1500), "{took:?}");
    }

    /// Run by `ctrl_c_stops_a_stalled_download_within_a_second`: a download
    /// that would wait a minute for the stalled server.
    #[test]
    #[ignore = "a child process of ctrl_c_stops_a_stalled_download_within_a_second"]
    fn child_downloads_from_a_stalled_server() {
        if !crate::util::child_test::is_child() {
            return;
        }
        crate::util::install_interrupt_handler();
        let (_d, mut c) = cache();
        c.policy = FetchPolicy {
            read_timeout: Duration::from_secs(60),
            ..quick()
        };
        let url = std::env::var("KILN_TEST_URL").unwrap();
        let err = c.fetch("blob", &url, None, false).unwrap_err();
        assert!(
            err.chain().any(|e| e.to_string() == "interrupted"),
            "{err:#}"
        );
        // Nothing half-downloaded is left behind.
        assert_eq!(std::fs::read_dir(c.root.join("tmp")).unwrap().count(), 0);
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

    #[test]
    fn a_corrupt_cached_artifact_is_evicted_and_fetched_again() {
        let (d, c) = cache();
        let src = d.path().join("a");
        std::fs::write(&src, b"good").unwrap();
        let want = crate::util::sha256_hex(b"good");
        std::fs::write(c.blob_path(&want), b"rotten").unwrap();
        let (p, got) = c
            .fetch(
                "a",
                &format!("file://{}", src.display()),
                Some(&want),
                false,
            )
            .unwrap();
        assert_eq!(got, want);
        assert_eq!(std::fs::read(p).unwrap(), b"good");
    }

    #[test]
    fn a_corrupt_cached_artifact_whose_refetch_is_wrong_too_names_url_and_digests() {
        let (d, c) = cache();
        let src = d.path().join("a");
        std::fs::write(&src, b"also bad").unwrap();
        let url = format!("file://{}", src.display());
        let want = crate::util::sha256_hex(b"good");
        std::fs::write(c.blob_path(&want), b"rotten").unwrap();
        let err = c
            .fetch("a", &url, Some(&want), false)
            .unwrap_err()
            .to_string();
        let actual = crate::util::sha256_hex(b"also bad");
        assert!(
            err.contains(&url) && err.contains(&want) && err.contains(&actual),
            "{err}"
        );
        // Evicted, so the next build fetches it again.
        assert!(c.get(&want).is_none());
    }

    #[test]
    fn a_sha256_that_is_not_a_digest_is_never_used_as_a_path() {
        let (d, c) = cache();
        // What `blobs/sha256/../../x.tar` names.
        std::fs::write(c.root.join("x.tar"), b"host file").unwrap();
        let src = d.path().join("a");
        std::fs::write(&src, b"a").unwrap();
        let err = c
            .fetch(
                "x",
                &format!("file://{}", src.display()),
                Some("../../x.tar"),
                false,
            )
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("../../x.tar") && err.contains("64 lowercase hex"),
            "{err}"
        );
        assert!(c.get("../../x.tar").is_none());
    }
}
