//! A thin blocking client for the Proxmox VE HTTP API: token auth, TLS with a
//! CA file or pinned fingerprint, PVE error decoding, task polling, streaming uploads.

use super::config::{parse_fingerprint, Target, Token};
use anyhow::{anyhow, bail, Context, Result};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{Cursor, Read};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Percent-encode one path segment (UPIDs and volume ids contain `:` and `/`).
pub fn seg(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// An error answer of the API, decoded from PVE's conventions.
#[derive(Debug, thiserror::Error)]
#[error("{method} {path}: {status} {message}{}", fmt_errors(.errors))]
pub struct ApiError {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub message: String,
    pub errors: BTreeMap<String, String>,
}

fn fmt_errors(e: &BTreeMap<String, String>) -> String {
    if e.is_empty() {
        String::new()
    } else {
        let parts: Vec<String> = e
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.trim()))
            .collect();
        format!(" ({})", parts.join("; "))
    }
}

impl ApiError {
    pub fn mentions(&self, needle: &str) -> bool {
        self.message.contains(needle) || self.errors.values().any(|v| v.contains(needle))
    }
}

/// A connected API client for one target.
pub struct Pve {
    http: reqwest::blocking::Client,
    /// Async client for uploads; keeps no idle connections because each
    /// upload runs on its own short-lived runtime.
    upload_http: reqwest::Client,
    base: String,
    token: Token,
    pub node: String,
    pub task_timeout: Duration,
}

/// Verifies the server certificate only by its pinned SHA-256 fingerprint
/// (signatures of the handshake are still checked).
#[derive(Debug)]
struct PinnedCert {
    fingerprint: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use sha2::Digest;
        let got: [u8; 32] = sha2::Sha256::digest(end_entity.as_ref()).into();
        if got == self.fingerprint {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "server certificate fingerprint {} does not match the pinned {}",
                colon_hex(&got),
                colon_hex(&self.fingerprint)
            )))
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

pub fn colon_hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// How the server certificate is checked.
enum TlsSetup {
    /// System roots (webpki roots bundled with reqwest).
    System,
    /// Extra trusted CA certificates.
    Ca(Vec<reqwest::Certificate>),
    /// Only a certificate with the pinned fingerprint.
    Pinned(Box<rustls::ClientConfig>),
}

impl TlsSetup {
    fn from_target(target: &Target) -> Result<TlsSetup> {
        let cfg = &target.cfg;
        if let Some(fp) = &cfg.fingerprint {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let verifier = PinnedCert {
                fingerprint: parse_fingerprint(fp)?,
                provider: provider.clone(),
            };
            let tls = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth();
            return Ok(TlsSetup::Pinned(Box::new(tls)));
        }
        if let Some(ca) = &cfg.ca_file {
            let pem = std::fs::read(ca)
                .with_context(|| format!("cannot read CA file {}", ca.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("{} holds no PEM certificate", ca.display()))?;
            if certs.is_empty() {
                bail!("{} holds no PEM certificate", ca.display());
            }
            return Ok(TlsSetup::Ca(certs));
        }
        Ok(TlsSetup::System)
    }
}

/// The end of a task.
#[derive(Debug, Clone)]
pub struct TaskEnd {
    pub upid: String,
    /// `OK` or `WARNINGS: N`.
    pub exitstatus: String,
}

/// Chain of everything an error says, with the token's secret removed.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        cur = s.source();
    }
    parts.join(": ")
}

impl Pve {
    pub fn connect(target: &Target) -> Result<Pve> {
        let cfg = &target.cfg;
        let tls = TlsSetup::from_target(target)?;
        let agent = concat!("kiln/", env!("CARGO_PKG_VERSION"));
        let mut b = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(15))
            .timeout(None::<Duration>)
            .user_agent(agent);
        let mut ab = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(15))
            .pool_max_idle_per_host(0)
            .user_agent(agent);
        match &tls {
            TlsSetup::Pinned(c) => {
                b = b.use_preconfigured_tls((**c).clone());
                ab = ab.use_preconfigured_tls((**c).clone());
            }
            TlsSetup::Ca(certs) => {
                for c in certs {
                    b = b.add_root_certificate(c.clone());
                    ab = ab.add_root_certificate(c.clone());
                }
            }
            TlsSetup::System => {}
        }
        let http = b.build().context("cannot set up the HTTP client")?;
        let upload_http = ab.build().context("cannot set up the upload client")?;
        Ok(Pve {
            http,
            upload_http,
            base: format!("{}/api2/json", cfg.url.trim_end_matches('/')),
            token: target.token.clone(),
            node: cfg.node.clone(),
            task_timeout: Duration::from_secs(cfg.task_timeout),
        })
    }

    pub fn token(&self) -> &Token {
        &self.token
    }

    fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        rb: reqwest::blocking::RequestBuilder,
    ) -> Result<Value> {
        let mut auth = reqwest::header::HeaderValue::from_str(&self.token.header())
            .map_err(|_| anyhow!("the API token contains characters not allowed in a header"))?;
        auth.set_sensitive(true);
        let resp = rb
            .header(reqwest::header::AUTHORIZATION, auth)
            .send()
            .map_err(|e| {
                let what = self.token.redact(&describe(&e));
                let hint = if what.contains("certificate") {
                    " (for a self-signed Proxmox certificate set ca_file or fingerprint in the target)"
                } else {
                    ""
                };
                anyhow!("{method} {path} on {}: {what}{hint}", self.base)
            })?;
        self.decode(method.as_str(), path, resp)
    }

    fn decode(&self, method: &str, path: &str, resp: reqwest::blocking::Response) -> Result<Value> {
        let status = resp.status();
        let reason = reason_of(resp.extensions());
        let text = resp
            .text()
            .with_context(|| format!("{method} {path}: cannot read the answer"))?;
        self.decode_parts(method, path, status, reason, &text)
    }

    fn decode_parts(
        &self,
        method: &str,
        path: &str,
        status: reqwest::StatusCode,
        reason: Option<String>,
        text: &str,
    ) -> Result<Value> {
        let body: Value = serde_json::from_str(text).unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(body.get("data").cloned().unwrap_or(Value::Null));
        }
        let message = body
            .get("message")
            .and_then(Value::as_str)
            .map(|s| s.trim().to_string())
            .or(reason)
            .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_string());
        let errors = body
            .get("errors")
            .and_then(Value::as_object)
            .map(|o| {
                o.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or(&v.to_string()).to_string()))
                    .collect()
            })
            .unwrap_or_default();
        Err(ApiError {
            method: method.into(),
            path: path.into(),
            status: status.as_u16(),
            message: self.token.redact(&message),
            errors,
        }
        .into())
    }

    pub fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value> {
        let rb = self
            .http
            .get(format!("{}{path}", self.base))
            .query(query)
            .timeout(Duration::from_secs(60));
        self.send(reqwest::Method::GET, path, rb)
    }

    pub fn post(&self, path: &str, form: &[(String, String)]) -> Result<Value> {
        let rb = self
            .http
            .post(format!("{}{path}", self.base))
            .form(form)
            .timeout(Duration::from_secs(120));
        self.send(reqwest::Method::POST, path, rb)
    }

    pub fn delete(&self, path: &str, query: &[(&str, String)]) -> Result<Value> {
        let rb = self
            .http
            .delete(format!("{}{path}", self.base))
            .query(query)
            .timeout(Duration::from_secs(60));
        self.send(reqwest::Method::DELETE, path, rb)
    }

    /// `(major, minor)` of the PVE release.
    pub fn version(&self) -> Result<(u32, u32, String)> {
        let v = self.get("/version", &[])?;
        let full = v
            .get("version")
            .and_then(Value::as_str)
            .context("/version has no version")?
            .to_string();
        let mut it = full
            .split(['.', '-'])
            .map(|x| x.parse::<u32>().unwrap_or(0));
        Ok((it.next().unwrap_or(0), it.next().unwrap_or(0), full))
    }

    /// Wait for a task to stop; `OK` and `WARNINGS: N` are success.
    pub fn wait_task(&self, upid: &str, what: &str) -> Result<TaskEnd> {
        let node = upid
            .split(':')
            .nth(1)
            .filter(|n| !n.is_empty())
            .unwrap_or(&self.node);
        let path = format!("/nodes/{}/tasks/{}/status", seg(node), seg(upid));
        let start = Instant::now();
        let mut delay = Duration::from_millis(100);
        let mut transient = 0;
        loop {
            if start.elapsed() > self.task_timeout {
                bail!(
                    "{what}: task {upid} did not finish within {} s",
                    self.task_timeout.as_secs()
                );
            }
            match self.get(&path, &[]) {
                Ok(v) => {
                    if v.get("status").and_then(Value::as_str) == Some("stopped") {
                        let exit = v
                            .get("exitstatus")
                            .and_then(Value::as_str)
                            .unwrap_or("unknown")
                            .to_string();
                        if exit == "OK" || exit.starts_with("WARNINGS:") {
                            return Ok(TaskEnd {
                                upid: upid.into(),
                                exitstatus: exit,
                            });
                        }
                        bail!("{what} failed: {exit}");
                    }
                }
                // A 400 right after task creation is transient.
                Err(e)
                    if transient < 5
                        && e.downcast_ref::<ApiError>()
                            .map(|a| a.status == 400)
                            .unwrap_or(false) =>
                {
                    transient += 1;
                }
                Err(e) => return Err(e.context(format!("{what}: cannot read task status"))),
            }
            std::thread::sleep(delay);
            // Cancellation is honoured only between polls: the task keeps running
            // on the server; the caller waits for it before cleaning up.
            delay = (delay.mul_f32(1.5)).min(Duration::from_secs(2));
        }
    }

    /// Stream a file as `multipart/form-data` to the upload endpoint: fields
    /// first, the file part (`filename`) last, with a Content-Length.
    pub fn upload(
        &self,
        storage: &str,
        content: &str,
        file: &Path,
        remote_name: &str,
        sha256: &str,
        progress: Option<indicatif::ProgressBar>,
    ) -> Result<UploadOutcome> {
        crate::util::check_interrupted()?;
        let path = format!("/nodes/{}/storage/{}/upload", seg(&self.node), seg(storage));
        let f =
            std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
        let file_len = f.metadata()?.len();
        let body = MultipartBody::new(
            &[
                ("content", content),
                ("checksum-algorithm", "sha256"),
                ("checksum", sha256),
            ],
            remote_name,
            file_len,
        );
        let total = body.len();
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let reader = body.reader(f, sent.clone(), progress.clone());
        let start = Instant::now();
        let res = self.send_upload(&path, &body.boundary, total, reader);
        if let Some(pb) = progress {
            pb.finish_and_clear();
        }
        let seconds = start.elapsed().as_secs_f64();
        let res = res.map_err(|e| {
            let n = sent.load(Ordering::SeqCst);
            if crate::util::interrupted() {
                anyhow::Error::from(crate::util::interrupt::Interrupted)
                    .context(format!("upload of {}", file.display()))
            } else if e.downcast_ref::<ApiError>().is_none() {
                e.context(format!(
                    "upload of {} to {}/{storage} broke off without an answer ({} of {} handed to the connection)",
                    file.display(),
                    self.node,
                    crate::util::human_bytes(n),
                    crate::util::human_bytes(total)
                ))
            } else {
                e.context(format!(
                    "upload of {} to {}/{storage} refused",
                    file.display(),
                    self.node
                ))
            }
        })?;
        let upid = res
            .as_str()
            .context("upload answered without a task id")?
            .to_string();
        Ok(UploadOutcome {
            upid,
            bytes: file_len,
            seconds,
        })
    }
}

impl Pve {
    /// POST a body of known length, streamed in 1 MiB chunks with an explicit
    /// Content-Length (never chunked, never buffered whole). Uses reqwest's
    /// async client on a private runtime: the blocking client moves bodies
    /// in 8 KiB pieces, which costs about half the loopback throughput.
    fn send_upload(
        &self,
        path: &str,
        boundary: &str,
        total: u64,
        reader: impl Read + Send + 'static,
    ) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut auth = reqwest::header::HeaderValue::from_str(&self.token.header())
            .map_err(|_| anyhow!("the API token contains characters not allowed in a header"))?;
        auth.set_sensitive(true);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the upload runtime")?;
        let chunks = futures_util::stream::unfold(reader, |mut r| async move {
            const CHUNK: u64 = 1 << 20;
            // read_to_end fills the capacity without zeroing it first; a short
            // read inside it is not the end of the body.
            let mut buf = Vec::with_capacity(CHUNK as usize);
            match (&mut r).take(CHUNK).read_to_end(&mut buf) {
                Ok(0) => None,
                Ok(_) => Some((Ok(bytes::Bytes::from(buf)), r)),
                Err(e) => Some((Err(e), r)),
            }
        });
        let (status, reason, text) = rt.block_on(async {
            let resp = self
                .upload_http
                .post(&url)
                .header(reqwest::header::AUTHORIZATION, auth)
                .header(
                    reqwest::header::CONTENT_TYPE,
                    format!("multipart/form-data; boundary={boundary}"),
                )
                .header(reqwest::header::CONTENT_LENGTH, total)
                .body(reqwest::Body::wrap_stream(chunks))
                .send()
                .await
                .map_err(|e| {
                    anyhow!(
                        "POST {path} on {}: {}",
                        self.base,
                        self.token.redact(&describe(&e))
                    )
                })?;
            let status = resp.status();
            let reason = reason_of(resp.extensions());
            let text = resp
                .text()
                .await
                .with_context(|| format!("POST {path}: cannot read the answer"))?;
            anyhow::Ok((status, reason, text))
        })?;
        self.decode_parts("POST", path, status, reason, &text)
    }
}

pub struct UploadOutcome {
    pub upid: String,
    /// Bytes of the file sent.
    pub bytes: u64,
    /// Wall time of the HTTP request.
    pub seconds: f64,
}

/// A multipart body whose length is known before a byte is sent.
pub struct MultipartBody {
    pub boundary: String,
    pub prefix: Vec<u8>,
    pub suffix: Vec<u8>,
    pub file_len: u64,
}

impl MultipartBody {
    pub fn new(fields: &[(&str, &str)], filename: &str, file_len: u64) -> MultipartBody {
        use rand_boundary as rb;
        let boundary = rb();
        let mut prefix = Vec::new();
        for (k, v) in fields {
            prefix.extend_from_slice(
                format!(
                    "--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n"
                )
                .as_bytes(),
            );
        }
        prefix.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"filename\"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
        );
        let suffix = format!("\r\n--{boundary}--\r\n").into_bytes();
        MultipartBody {
            boundary,
            prefix,
            suffix,
            file_len,
        }
    }

    pub fn len(&self) -> u64 {
        self.prefix.len() as u64 + self.file_len + self.suffix.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// A reader over the whole body that never holds more than a buffer.
    pub fn reader(
        &self,
        file: std::fs::File,
        sent: Arc<std::sync::atomic::AtomicU64>,
        progress: Option<indicatif::ProgressBar>,
    ) -> impl Read + Send + 'static {
        let inner = Cursor::new(self.prefix.clone())
            .chain(std::io::BufReader::with_capacity(1 << 20, file).take(self.file_len))
            .chain(Cursor::new(self.suffix.clone()));
        Counting {
            inner,
            sent,
            progress,
        }
    }
}

fn rand_boundary() -> String {
    // Unique enough to never occur in the data: time, pid and a counter, hashed.
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    let seed = format!(
        "{:?}-{}-{}",
        std::time::SystemTime::now(),
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    );
    format!("kiln-{}", &crate::util::sha256_hex(seed.as_bytes())[..32])
}

struct Counting<R> {
    inner: R,
    sent: Arc<std::sync::atomic::AtomicU64>,
    progress: Option<indicatif::ProgressBar>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if crate::util::interrupted() {
            // Not ErrorKind::Interrupted: readers retry on that.
            return Err(crate::util::interrupt::io_error());
        }
        let n = self.inner.read(buf)?;
        let total = self.sent.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if let Some(pb) = &self.progress {
            pb.set_position(total);
        }
        Ok(n)
    }
}

fn reason_of(ext: &http::Extensions) -> Option<String> {
    ext.get::<hyper_reason::ReasonPhrase>()
        .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned())
}

/// hyper keeps a non-canonical reason phrase (PVE's error text) in the
/// response extensions; reqwest passes extensions through.
mod hyper_reason {
    pub use hyper::ext::ReasonPhrase;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_length_is_exact_and_fields_precede_the_file() {
        let b = MultipartBody::new(&[("content", "import")], "a.qcow2", 10);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"0123456789").unwrap();
        let mut out = Vec::new();
        b.reader(std::fs::File::open(&p).unwrap(), Default::default(), None)
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out.len() as u64, b.len());
        let text = String::from_utf8_lossy(&out);
        assert!(text.find("name=\"content\"").unwrap() < text.find("name=\"filename\"").unwrap());
        assert!(text.ends_with(&format!("--{}--\r\n", b.boundary)));
    }

    #[test]
    fn path_segments_encode_volume_ids_and_upids() {
        assert_eq!(seg("local:import/a.qcow2"), "local%3Aimport%2Fa.qcow2");
        assert_eq!(seg("UPID:pve:1:"), "UPID%3Apve%3A1%3A");
    }
}
