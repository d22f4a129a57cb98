//! Uploads to a Proxmox VE storage: the disk (`import`) and the LXC archive
//! (`vztmpl`) streamed as multipart with a Content-Length and a sha256 checksum.

use anyhow::{anyhow, Context, Result};
use serde_json::Value;
use std::io::{Cursor, Read};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::client::{reason_of, seg, Pve};
use super::errors::ApiError;

/// What Proxmox makes of an uploaded file's name: its last path component
/// with every character outside `[a-zA-Z0-9_.-]` replaced by `_`
/// (`PVE/Storage.pm`, `normalize_content_filename`, applied by the upload
/// handler in `PVE/API2/Storage/Status.pm` before it checks the extension).
pub(crate) fn pve_file_name(name: &str) -> String {
    let name = name.trim_end_matches('\n');
    name.rsplit(['/', '\\'])
        .next()
        .unwrap_or("")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Pve {
    /// Stream a file as `multipart/form-data` to the upload endpoint: fields
    /// first, the file part (`filename`) last, with a Content-Length.
    /// `remote_name` must be one Proxmox stores unchanged ([`pve_file_name`]).
    pub(crate) fn upload(
        &self,
        storage: &str,
        content: &str,
        file: &Path,
        remote_name: &str,
        sha256: &str,
        progress: Option<indicatif::ProgressBar>,
    ) -> Result<UploadOutcome> {
        crate::util::check_interrupted()?;
        if pve_file_name(remote_name) != remote_name {
            anyhow::bail!(
                "upload name `{remote_name}` would be stored as `{}` by Proxmox; refusing to upload under a name kiln cannot find again",
                pve_file_name(remote_name)
            );
        }
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
    /// Wait for an upload's `imgcopy` task; the file name Proxmox stored it
    /// under, from the task log's `target file: PATH` line
    /// (`PVE/API2/Storage/Status.pm`), else `asked` (the name sent).
    pub(crate) fn finish_upload(&self, upid: &str, asked: &str, what: &str) -> Result<String> {
        self.wait_task(upid, what)?;
        let node = upid
            .split(':')
            .nth(1)
            .filter(|n| !n.is_empty())
            .unwrap_or(&self.node);
        let log = self.get(
            &format!("/nodes/{}/tasks/{}/log", seg(node), seg(upid)),
            &[("limit", "100".into())],
        )?;
        Ok(stored_name(&log).unwrap_or_else(|| asked.to_string()))
    }

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
                        self.token.redact(&crate::util::error_chain(&e))
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

/// The base name in a task log's `target file: PATH` line.
fn stored_name(log: &Value) -> Option<String> {
    log.as_array()?
        .iter()
        .filter_map(|l| l.get("t").and_then(Value::as_str))
        .find_map(|t| t.strip_prefix("target file: "))
        .and_then(|p| p.trim().rsplit('/').next())
        .filter(|n| !n.is_empty())
        .map(str::to_string)
}

pub(crate) struct UploadOutcome {
    pub upid: String,
    /// Bytes of the file sent.
    pub bytes: u64,
    /// Wall time of the HTTP request.
    pub seconds: f64,
}

/// A multipart body whose length is known before a byte is sent.
pub(crate) struct MultipartBody {
    pub boundary: String,
    pub prefix: Vec<u8>,
    pub suffix: Vec<u8>,
    pub file_len: u64,
}

impl MultipartBody {
    pub(crate) fn new(fields: &[(&str, &str)], filename: &str, file_len: u64) -> MultipartBody {
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

    pub(crate) fn len(&self) -> u64 {
        self.prefix.len() as u64 + self.file_len + self.suffix.len() as u64
    }

    /// A reader over the whole body that never holds more than a buffer.
    pub(crate) fn reader(
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn the_stored_name_is_read_from_the_imgcopy_log() {
        let log = serde_json::json!([
            {"n": 1, "t": "starting file import from: /var/tmp/pveupload-1"},
            {"n": 2, "t": "target node: pve"},
            {"n": 3, "t": "target file: /var/lib/vz/import/kiln-a_b.qcow2"},
        ]);
        assert_eq!(stored_name(&log).as_deref(), Some("kiln-a_b.qcow2"));
        assert_eq!(
            stored_name(&serde_json::json!([{"n": 1, "t": "TASK OK"}])),
            None
        );
    }

    #[test]
    fn proxmox_rewrites_names_outside_its_alphabet() {
        assert_eq!(pve_file_name("a+b=c d.qcow2"), "a_b_c_d.qcow2");
        assert_eq!(pve_file_name("dir/x-1.2_3.raw"), "x-1.2_3.raw");
    }

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
}
