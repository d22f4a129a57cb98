//! Real parts for the OCI tests: Debian's `docker-registry` on a loopback
//! port, images built with umoci and pushed with skopeo, and a loopback proxy
//! that injects faults and plays a bearer-token service (a stand-in for the
//! token services of quay.io/ghcr.io/docker.io, which are unreachable here).
#![allow(dead_code)]

pub mod containerd;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Whether every tool is on PATH; prints the reason a test skips when not.
pub fn have_tools(test: &str, tools: &[(&str, &str)]) -> bool {
    for (prog, pkg) in tools {
        if kiln::util::hosttools::which(prog).is_none() {
            eprintln!("SKIPPED {test}: `{prog}` is not installed (apt install {pkg})");
            return false;
        }
    }
    true
}

pub const REGISTRY_TOOLS: &[(&str, &str)] = &[
    ("docker-registry", "docker-registry"),
    ("umoci", "umoci"),
    ("skopeo", "skopeo"),
];

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A CNCF distribution registry on loopback, killed on drop.
pub struct Registry {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Registry {
    /// Start on a free port; if another process takes the port between our
    /// probe and the registry's bind, the registry exits and we try another.
    pub fn start() -> Self {
        for _ in 0..5 {
            if let Some(reg) = Self::try_start() {
                return reg;
            }
        }
        panic!("docker-registry did not start (see its log in the test temp dir)");
    }

    fn try_start() -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let cfg = dir.path().join("config.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog: {{level: info}}\nstorage: {{filesystem: {{rootdirectory: {}}}}}\nhttp: {{addr: 127.0.0.1:{port}}}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let mut reg = Self { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(_)) = reg.child.try_wait() {
                return None; // exited: most likely the port was taken
            }
            // The registry answers /v2/ with 200 once it serves.
            if let Ok(r) = reqwest::blocking::get(format!("http://127.0.0.1:{port}/v2/")) {
                if r.status().is_success() {
                    return Some(reg);
                }
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not answer on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Requests the registry served, from its access log (`"GET /v2/... HTTP/1.1"`).
    pub fn requests(&self) -> Vec<String> {
        let log = std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default();
        log.lines()
            .filter_map(|l| l.split_once("] \"").map(|(_, r)| r))
            .filter_map(|r| r.split_once(" HTTP/").map(|(m, _)| m.to_string()))
            .collect()
    }

    /// Build an image with umoci whose one layer holds `files`, optionally
    /// for another architecture, push it as `repo:tag`; returns its digest.
    pub fn push_image(
        &self,
        repo: &str,
        tag: &str,
        files: &[(&str, &[u8])],
        arch: Option<&str>,
    ) -> String {
        self.push_image_as(repo, tag, files, arch, None)
    }

    /// As `push_image`, converted by `skopeo copy --format` (`v2s2` gives the
    /// Docker media types many upstream images still use).
    pub fn push_image_as(
        &self,
        repo: &str,
        tag: &str,
        files: &[(&str, &[u8])],
        arch: Option<&str>,
        format: Option<&str>,
    ) -> String {
        let work = self
            .dir
            .path()
            .join("build")
            .join(repo.replace('/', "_"))
            .join(tag);
        std::fs::create_dir_all(&work).unwrap();
        let layout = work.join("layout");
        let bundle = work.join("bundle");
        let img = format!("{}:{tag}", layout.display());
        run("umoci", &["init", "--layout", &layout.to_string_lossy()]);
        run("umoci", &["new", "--image", &img]);
        run(
            "umoci",
            &[
                "unpack",
                "--rootless",
                "--image",
                &img,
                &bundle.to_string_lossy(),
            ],
        );
        for (name, data) in files {
            let p = bundle.join("rootfs").join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, data).unwrap();
        }
        run(
            "umoci",
            &["repack", "--image", &img, &bundle.to_string_lossy()],
        );
        if let Some(a) = arch {
            run("umoci", &["config", "--image", &img, "--architecture", a]);
        }
        self.copy_in_as(&format!("oci:{img}"), repo, tag, &work, format)
    }

    /// Push `repo:new_tag`: the image `repo:from_tag` (pushed by
    /// `push_image`) with another config label but the very same layers.
    pub fn push_variant(&self, repo: &str, from_tag: &str, new_tag: &str) -> String {
        let work = self
            .dir
            .path()
            .join("build")
            .join(repo.replace('/', "_"))
            .join(from_tag);
        let layout = work.join("layout");
        let img = format!("{}:{from_tag}", layout.display());
        run(
            "umoci",
            &[
                "config",
                "--image",
                &img,
                "--tag",
                new_tag,
                "--config.label",
                &format!("variant={new_tag}"),
            ],
        );
        self.copy_in(
            &format!("oci:{}:{new_tag}", layout.display()),
            repo,
            new_tag,
            &work,
        )
    }

    fn copy_in(&self, src: &str, repo: &str, tag: &str, work: &Path) -> String {
        self.copy_in_as(src, repo, tag, work, None)
    }

    fn copy_in_as(
        &self,
        src: &str,
        repo: &str,
        tag: &str,
        work: &Path,
        format: Option<&str>,
    ) -> String {
        let digest_file = work.join(format!("{tag}.digest"));
        let digest_arg = digest_file.to_string_lossy().into_owned();
        let dest = format!("docker://{}/{repo}:{tag}", self.host());
        let mut args = vec![
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--digestfile",
            &digest_arg,
        ];
        if let Some(f) = format {
            args.extend(["--format", f]);
        }
        args.extend([src, dest.as_str()]);
        run("skopeo", &args);
        std::fs::read_to_string(digest_file)
            .unwrap()
            .trim()
            .to_string()
    }

    /// Size in bytes of a manifest the registry holds.
    pub fn manifest_size(&self, repo: &str, digest: &str) -> u64 {
        self.get(&format!("/v2/{repo}/manifests/{digest}")).len() as u64
    }

    pub fn get(&self, path: &str) -> Vec<u8> {
        let resp = reqwest::blocking::Client::new()
            .get(format!("http://{}{path}", self.host()))
            .header(
                "Accept",
                "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, \
                 application/vnd.docker.distribution.manifest.v2+json, \
                 application/vnd.docker.distribution.manifest.list.v2+json",
            )
            .send()
            .unwrap();
        assert!(resp.status().is_success(), "GET {path}: {}", resp.status());
        resp.bytes().unwrap().to_vec()
    }

    /// PUT an OCI index over `(digest, architecture)` manifests as `repo:tag`;
    /// returns the index digest.
    pub fn push_index(&self, repo: &str, tag: &str, entries: &[(&str, &str)]) -> String {
        self.push_list(
            repo,
            tag,
            entries,
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.oci.image.manifest.v1+json",
        )
    }

    /// A Docker manifest list over Docker v2 manifests (pushed with `v2s2`).
    pub fn push_docker_list(&self, repo: &str, tag: &str, entries: &[(&str, &str)]) -> String {
        self.push_list(
            repo,
            tag,
            entries,
            "application/vnd.docker.distribution.manifest.list.v2+json",
            "application/vnd.docker.distribution.manifest.v2+json",
        )
    }

    fn push_list(
        &self,
        repo: &str,
        tag: &str,
        entries: &[(&str, &str)],
        list_type: &str,
        entry_type: &str,
    ) -> String {
        let manifests: Vec<serde_json::Value> = entries
            .iter()
            .map(|(digest, arch)| {
                serde_json::json!({
                    "mediaType": entry_type,
                    "digest": digest,
                    "size": self.manifest_size(repo, digest),
                    "platform": {"os": "linux", "architecture": arch},
                })
            })
            .collect();
        let body = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": list_type,
            "manifests": manifests,
        }))
        .unwrap();
        let resp = reqwest::blocking::Client::new()
            .put(format!("http://{}/v2/{repo}/manifests/{tag}", self.host()))
            .header("Content-Type", list_type)
            .body(body.clone())
            .send()
            .unwrap();
        assert!(resp.status().is_success(), "PUT index: {}", resp.status());
        format!("sha256:{}", kiln::util::sha256_hex(&body))
    }

    /// Blobs (config + layers) of a single-platform manifest.
    pub fn blobs_of(&self, repo: &str, manifest_digest: &str) -> Vec<String> {
        let m: serde_json::Value =
            serde_json::from_slice(&self.get(&format!("/v2/{repo}/manifests/{manifest_digest}")))
                .unwrap();
        std::iter::once(&m["config"])
            .chain(m["layers"].as_array().unwrap().iter())
            .map(|d| d["digest"].as_str().unwrap().to_string())
            .collect()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn run(prog: &str, args: &[&str]) {
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What the proxy does to traffic. Fields may change while it runs.
#[derive(Default, Clone)]
pub struct Faults {
    /// Answer this status to requests whose path contains the pattern, this many times.
    pub status: Option<(String, u16, usize)>,
    /// Send only half of each blob body (the header still promises all of it).
    pub truncate_blobs: bool,
    /// Flip one byte of each blob body.
    pub corrupt_blobs: bool,
    /// Require `Authorization: Bearer <token>` on /v2/, answering 401 with a
    /// challenge pointing at the proxy's own `/token` service.
    pub bearer_token: Option<String>,
    /// The token service requires these Basic credentials.
    pub token_basic: Option<(String, String)>,
    /// Each issued token is good for this many requests, then expires (401).
    pub token_uses: Option<usize>,
    /// Tokens issued under `token_uses`, with the requests each has left.
    pub issued: std::collections::HashMap<String, usize>,
    /// Require these Basic credentials on /v2/ itself (`WWW-Authenticate: Basic`).
    pub registry_basic: Option<(String, String)>,
}

/// A one-request-per-connection HTTP proxy on loopback in front of a registry.
/// It logs every request line it sees (`GET /v2/...`).
pub struct Proxy {
    pub port: u16,
    pub faults: Arc<Mutex<Faults>>,
    pub log: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    pub fn start(upstream: u16, faults: Faults) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let faults = Arc::new(Mutex::new(faults));
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (f, l, s) = (faults.clone(), log.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (f, l) = (f.clone(), l.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, upstream, port, &f, &l);
                });
            }
        });
        Self {
            port,
            faults,
            log,
            stop,
            thread: Some(thread),
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn clear_log(&self) {
        self.log.lock().unwrap().clear();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn respond(
    conn: &mut TcpStream,
    status: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes())?;
    conn.write_all(body)?;
    conn.flush()
}

fn serve(
    mut conn: TcpStream,
    upstream: u16,
    own_port: u16,
    faults: &Mutex<Faults>,
    log: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end().to_string();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    log.lock().unwrap().push(format!("{method} {path}"));
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let f = faults.lock().unwrap().clone();

    // The stand-in token service.
    if path.starts_with("/token") {
        if let Some((u, p)) = &f.token_basic {
            use base64::Engine as _;
            let want = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            );
            if header("authorization").as_deref() != Some(want.as_str()) {
                return respond(
                    &mut conn,
                    "401 Unauthorized",
                    &[],
                    b"{\"errors\":[{\"code\":\"UNAUTHORIZED\"}]}",
                );
            }
        }
        let ok_query = path.contains("service=kiln-test") && path.contains("scope=repository%3A");
        if !ok_query {
            return respond(&mut conn, "400 Bad Request", &[], b"bad token query");
        }
        let mut token = f.bearer_token.clone().unwrap_or_default();
        if let Some(uses) = f.token_uses {
            let mut live = faults.lock().unwrap();
            token = format!("{token}-{}", live.issued.len());
            live.issued.insert(token.clone(), uses);
        }
        let body = serde_json::to_vec(&serde_json::json!({"token": token})).unwrap();
        return respond(
            &mut conn,
            "200 OK",
            &[("Content-Type", "application/json".into())],
            &body,
        );
    }
    if let Some((u, p)) = &f.registry_basic {
        use base64::Engine as _;
        let want = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        );
        if header("authorization").as_deref() != Some(want.as_str()) {
            return respond(
                &mut conn,
                "401 Unauthorized",
                &[("WWW-Authenticate", "Basic realm=\"kiln-test\"".into())],
                b"{\"errors\":[{\"code\":\"UNAUTHORIZED\"}]}",
            );
        }
    }
    if let Some(token) = &f.bearer_token {
        let presented = header("authorization").unwrap_or_default();
        let valid = if f.token_uses.is_some() {
            let mut live = faults.lock().unwrap();
            match presented
                .strip_prefix("Bearer ")
                .and_then(|t| live.issued.get_mut(t))
            {
                Some(left) if *left > 0 => {
                    *left -= 1;
                    true
                }
                _ => false,
            }
        } else {
            presented == format!("Bearer {token}")
        };
        if !valid {
            let repo = path
                .trim_start_matches("/v2/")
                .rsplitn(3, '/')
                .nth(2)
                .unwrap_or("")
                .to_string();
            let challenge = format!(
                "Bearer realm=\"http://127.0.0.1:{own_port}/token\",service=\"kiln-test\",scope=\"repository:{repo}:pull\""
            );
            return respond(
                &mut conn,
                "401 Unauthorized",
                &[("WWW-Authenticate", challenge)],
                b"{\"errors\":[{\"code\":\"UNAUTHORIZED\"}]}",
            );
        }
    }
    if let Some((pattern, code, times)) = &f.status {
        if *times > 0 && path.contains(pattern.as_str()) {
            if let Some((_, _, t)) = faults.lock().unwrap().status.as_mut() {
                *t = t.saturating_sub(1);
            }
            return respond(&mut conn, &format!("{code} Injected"), &[], b"");
        }
    }

    // Forward to the registry, one request per connection.
    let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{upstream}\r\nConnection: close\r\n");
    if let Some(a) = header("accept") {
        req.push_str(&format!("Accept: {a}\r\n"));
    }
    req.push_str("\r\n");
    up.write_all(req.as_bytes())?;
    let mut resp = Vec::new();
    up.read_to_end(&mut resp)?;
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
        .unwrap_or(resp.len());
    let (head, body) = resp.split_at(split);
    let is_blob = method == "GET" && path.contains("/blobs/") && head.starts_with(b"HTTP/1.1 200");
    if is_blob && f.truncate_blobs {
        conn.write_all(head)?;
        conn.write_all(&body[..body.len() / 2])?;
        return Ok(()); // closing early: the promised length never arrives
    }
    if is_blob && f.corrupt_blobs && !body.is_empty() {
        let mut b = body.to_vec();
        let last = b.len() - 1;
        b[last] ^= 0xff;
        conn.write_all(head)?;
        return conn.write_all(&b);
    }
    conn.write_all(&resp)
}

/// A fresh cache directory name under `dir`.
pub fn cache_in(dir: &Path) -> PathBuf {
    dir.join("cache")
}

/// Every file in the cache's blob directory (temp files included).
pub fn cache_files(cache: &Path) -> Vec<String> {
    match std::fs::read_dir(cache.join("blobs/sha256")) {
        Ok(rd) => {
            let mut v: Vec<String> = rd
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        }
        Err(_) => vec![],
    }
}
