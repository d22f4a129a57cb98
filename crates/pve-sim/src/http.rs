//! A deliberately small HTTP/1.1 server layer: request heads, Content-Length bodies (chunked
//! is refused like pveproxy), JSON replies. pve-sim is a labelled STAND-IN for Proxmox VE.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

/// A connection, plain or TLS (rustls, blocking).
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ServerConnection, TcpStream>>),
}

impl Conn {
    pub fn accept(tcp: TcpStream, tls: Option<&Arc<rustls::ServerConfig>>) -> io::Result<Conn> {
        match tls {
            None => Ok(Conn::Plain(tcp)),
            Some(cfg) => {
                let conn = rustls::ServerConnection::new(cfg.clone())
                    .map_err(|e| io::Error::other(e.to_string()))?;
                Ok(Conn::Tls(Box::new(rustls::StreamOwned::new(conn, tcp))))
            }
        }
    }

    pub fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(t) => t,
            Conn::Tls(s) => &s.sock,
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(t) => t.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(t) => t.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(t) => t.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

/// The head of one request.
#[derive(Debug, Clone)]
pub struct Head {
    pub method: String,
    /// Path without the query, still percent-encoded.
    pub path: String,
    pub query: String,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn content_length(&self) -> Result<Option<u64>, String> {
        match self.header("content-length") {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| format!("bad Content-Length `{v}`")),
        }
    }

    pub fn chunked(&self) -> bool {
        self.header("transfer-encoding")
            .map(|v| v.to_ascii_lowercase().contains("chunked"))
            .unwrap_or(false)
    }

    pub fn keep_alive(&self) -> bool {
        !self
            .header("connection")
            .map(|v| v.eq_ignore_ascii_case("close"))
            .unwrap_or(false)
    }
}

/// Read one request head; `Ok(None)` on a clean end of the connection.
pub fn read_head(r: &mut BufReader<Conn>) -> io::Result<Option<Head>> {
    let mut line = String::new();
    // Skip stray blank lines between keep-alive requests.
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        if !line.trim().is_empty() {
            break;
        }
    }
    let mut parts = line.split_whitespace();
    let (method, target) = match (parts.next(), parts.next()) {
        (Some(m), Some(t)) => (m.to_string(), t.to_string()),
        _ => return Err(io::Error::other(format!("bad request line {line:?}"))),
    };
    let mut headers = Vec::new();
    let mut total = line.len();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            return Err(io::Error::other(
                "connection closed inside the request head",
            ));
        }
        total += h.len();
        if total > 64 * 1024 {
            return Err(io::Error::other("request head too large"));
        }
        let h = h.trim_end_matches(['\r', '\n']);
        if h.is_empty() {
            break;
        }
        if let Some((n, v)) = h.split_once(':') {
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (target, String::new()),
    };
    Ok(Some(Head {
        method,
        path,
        query,
        headers,
    }))
}

/// Write a complete response with a JSON body. PVE puts the error message in
/// the status line's reason phrase and (since PVE 7) in `message`.
pub fn respond(
    w: &mut impl Write,
    status: u16,
    reason: &str,
    body: &serde_json::Value,
    close: bool,
) -> io::Result<()> {
    let body = serde_json::to_vec(body).unwrap_or_default();
    // The reason phrase must stay on one line.
    let reason: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let head = format!(
        "HTTP/1.1 {status} {}\r\nServer: pve-sim (a Proxmox VE API stand-in)\r\nContent-Type: application/json;charset=UTF-8\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n",
        reason.trim(),
        body.len(),
        if close { "close" } else { "Keep-Alive" }
    );
    w.write_all(head.as_bytes())?;
    w.write_all(&body)?;
    w.flush()
}

/// Percent-decode one path segment or query component.
pub fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}
