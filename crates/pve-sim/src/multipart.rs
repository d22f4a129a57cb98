//! Streaming `multipart/form-data` parser for uploads: text fields are kept, the file part is
//! streamed to a temp file (like pveproxy). pve-sim is a labelled STAND-IN for Proxmox VE.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// The parsed upload: text fields that came before the file, the file, and
/// the names of any parts after it (which pveproxy never sees as parameters).
#[derive(Debug, Default)]
pub struct Upload {
    pub fields: Vec<(String, String)>,
    pub file: Option<UploadedFile>,
    pub ignored_after_file: Vec<String>,
}

#[derive(Debug)]
pub struct UploadedFile {
    /// Form field name of the file part.
    pub field: String,
    /// `filename=` of the part's Content-Disposition.
    pub filename: String,
    pub tmp_path: PathBuf,
    pub size: u64,
}

/// Why a body is not acceptable multipart.
#[derive(Debug)]
pub enum MultipartError {
    /// The body itself is malformed (HTTP 400).
    Malformed(String),
    /// Reading the connection failed (the client went away).
    Io(io::Error),
}

impl From<io::Error> for MultipartError {
    fn from(e: io::Error) -> Self {
        MultipartError::Io(e)
    }
}

/// `boundary=` from a Content-Type header.
pub fn boundary(content_type: &str) -> Option<String> {
    let (mime, params) = content_type.split_once(';')?;
    if !mime.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params.split(';').find_map(|p| {
        let (k, v) = p.trim().split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"').to_string())
    })
}

struct Buf<R> {
    reader: R,
    data: Vec<u8>,
    start: usize,
    eof: bool,
}

impl<R: Read> Buf<R> {
    fn avail(&self) -> &[u8] {
        &self.data[self.start..]
    }
    fn consume(&mut self, n: usize) {
        self.start += n;
    }
    /// Read more data; false at end of input.
    fn fill(&mut self) -> io::Result<bool> {
        if self.eof {
            return Ok(false);
        }
        if self.start > 0 && self.start >= self.data.len() / 2 {
            self.data.drain(..self.start);
            self.start = 0;
        }
        let old = self.data.len();
        self.data.resize(old + 256 * 1024, 0);
        let n = loop {
            match self.reader.read(&mut self.data[old..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.data.truncate(old);
                    return Err(e);
                }
            }
        };
        self.data.truncate(old + n);
        if n == 0 {
            self.eof = true;
        }
        Ok(n > 0)
    }
}

fn malformed(msg: impl Into<String>) -> MultipartError {
    MultipartError::Malformed(msg.into())
}

/// Parse a multipart body, streaming the file part into `tmp_dir`. On error
/// the temp file is removed.
pub fn parse(body: impl Read, boundary: &str, tmp_dir: &Path) -> Result<Upload, MultipartError> {
    let delim = format!("\r\n--{boundary}").into_bytes();
    let finder = memchr::memmem::Finder::new(&delim);
    // A virtual CRLF lets the first delimiter match like the others.
    let mut buf = Buf {
        reader: body,
        data: b"\r\n".to_vec(),
        start: 0,
        eof: false,
    };
    let mut upload = Upload::default();
    let mut tmp_guard: Option<PathBuf> = None;
    let result = (|| -> Result<(), MultipartError> {
        // Skip the preamble up to the first delimiter.
        loop {
            if let Some(i) = finder.find(buf.avail()) {
                buf.consume(i + delim.len());
                break;
            }
            let keep = delim.len().saturating_sub(1);
            let drop = buf.avail().len().saturating_sub(keep);
            buf.consume(drop);
            if !buf.fill()? {
                return Err(malformed("no multipart boundary found in the body"));
            }
        }
        loop {
            // After a delimiter: `--` ends the body, CRLF starts a part.
            while buf.avail().len() < 2 {
                if !buf.fill()? {
                    return Err(malformed("multipart body ended early"));
                }
            }
            if buf.avail().starts_with(b"--") {
                return Ok(());
            }
            if !buf.avail().starts_with(b"\r\n") {
                return Err(malformed("malformed multipart delimiter line"));
            }
            buf.consume(2);
            // Part headers.
            let headers = loop {
                if let Some(i) = memchr::memmem::find(buf.avail(), b"\r\n\r\n") {
                    let text = String::from_utf8_lossy(&buf.avail()[..i]).into_owned();
                    buf.consume(i + 4);
                    break text;
                }
                if buf.avail().len() > 16 * 1024 {
                    return Err(malformed("multipart part headers too large"));
                }
                if !buf.fill()? {
                    return Err(malformed("multipart body ended inside part headers"));
                }
            };
            let (name, filename) = disposition(&headers)
                .ok_or_else(|| malformed("multipart part without Content-Disposition name"))?;
            let file_done = upload.file.is_some();
            let mut sink: Option<File> = None;
            let mut text = Vec::new();
            if filename.is_some() && !file_done {
                let tmp = tempfile::Builder::new()
                    .prefix("pveupload-")
                    .tempfile_in(tmp_dir)?;
                let (f, p) = tmp.keep().map_err(|e| MultipartError::Io(e.error))?;
                tmp_guard = Some(p);
                sink = Some(f);
            }
            let mut size = 0u64;
            // Part body up to the next delimiter.
            loop {
                let found = finder.find(buf.avail());
                let take = match found {
                    Some(i) => i,
                    None => buf.avail().len().saturating_sub(delim.len() - 1),
                };
                {
                    let chunk = &buf.avail()[..take];
                    size += chunk.len() as u64;
                    if let Some(f) = sink.as_mut() {
                        f.write_all(chunk)?;
                    } else if !file_done {
                        if text.len() + chunk.len() > 1 << 20 {
                            return Err(malformed(format!("form field `{name}` is too large")));
                        }
                        text.extend_from_slice(chunk);
                    }
                }
                buf.consume(take);
                if found.is_some() {
                    buf.consume(delim.len());
                    break;
                }
                if !buf.fill()? {
                    return Err(malformed(
                        "multipart body ended before its closing boundary",
                    ));
                }
            }
            if file_done {
                upload.ignored_after_file.push(name);
            } else if let Some(f) = sink {
                f.sync_all().ok();
                upload.file = Some(UploadedFile {
                    field: name,
                    filename: filename.unwrap_or_default(),
                    tmp_path: tmp_guard.clone().expect("temp file exists"),
                    size,
                });
            } else {
                upload
                    .fields
                    .push((name, String::from_utf8_lossy(&text).into_owned()));
            }
        }
    })();
    match result {
        Ok(()) => Ok(upload),
        Err(e) => {
            if let Some(p) = tmp_guard {
                let _ = std::fs::remove_file(p);
            }
            Err(e)
        }
    }
}

/// `name` and `filename` of a part's Content-Disposition header.
fn disposition(headers: &str) -> Option<(String, Option<String>)> {
    let line = headers.lines().find(|l| {
        l.split_once(':')
            .map(|(n, _)| n.trim().eq_ignore_ascii_case("content-disposition"))
            .unwrap_or(false)
    })?;
    let value = line.split_once(':')?.1;
    let mut name = None;
    let mut filename = None;
    for p in value.split(';').skip(1) {
        if let Some((k, v)) = p.trim().split_once('=') {
            let v = v.trim().trim_matches('"').to_string();
            match k.trim().to_ascii_lowercase().as_str() {
                "name" => name = Some(v),
                "filename" => filename = Some(v),
                _ => {}
            }
        }
    }
    Some((name?, filename))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
        let mut b = Vec::new();
        for (name, file, data) in parts {
            b.extend_from_slice(b"--XyZ\r\n");
            match file {
                Some(f) => b.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
                ),
                None => b.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
                ),
            }
            b.extend_from_slice(data);
            b.extend_from_slice(b"\r\n");
        }
        b.extend_from_slice(b"--XyZ--\r\n");
        b
    }

    #[test]
    fn fields_and_file_are_separated_and_file_is_streamed_to_disk() {
        let dir = tempfile::tempdir().unwrap();
        // File data that contains a near-delimiter must survive intact.
        let data: Vec<u8> = b"ab\r\n--XyWq\r\n--Xy"
            .iter()
            .cycle()
            .take(700_000)
            .copied()
            .collect();
        let b = body(&[
            ("content", None, b"import"),
            ("filename", Some("a.qcow2"), &data),
        ]);
        let up = parse(&b[..], "XyZ", dir.path()).unwrap();
        assert_eq!(up.fields, vec![("content".into(), "import".into())]);
        let f = up.file.unwrap();
        assert_eq!(f.filename, "a.qcow2");
        assert_eq!(f.size, data.len() as u64);
        assert_eq!(std::fs::read(f.tmp_path).unwrap(), data);
    }

    #[test]
    fn fields_after_the_file_part_are_not_parameters() {
        let dir = tempfile::tempdir().unwrap();
        let b = body(&[
            ("filename", Some("a.qcow2"), b"disk"),
            ("content", None, b"import"),
        ]);
        let up = parse(&b[..], "XyZ", dir.path()).unwrap();
        assert!(up.fields.is_empty());
        assert_eq!(up.ignored_after_file, vec!["content".to_string()]);
    }

    #[test]
    fn truncated_body_is_malformed_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let b = body(&[("filename", Some("a.qcow2"), &[7u8; 10_000])]);
        let cut = &b[..5_000];
        assert!(matches!(
            parse(cut, "XyZ", dir.path()),
            Err(MultipartError::Malformed(_))
        ));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn boundary_is_read_from_content_type() {
        assert_eq!(
            boundary("multipart/form-data; boundary=\"abc\"").as_deref(),
            Some("abc")
        );
        assert_eq!(boundary("application/json"), None);
    }
}
