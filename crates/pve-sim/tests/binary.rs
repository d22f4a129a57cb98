//! The `pve-sim` binary (a labelled stand-in for the Proxmox VE API, not
//! Proxmox): its command line, the URL line it prints, and token auth.
//! Being an integration test, this also makes `cargo test` build the binary
//! that kiln's tests/publish_e2e.rs runs.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};

const TOKEN: &str = "kiln@pve!test=s3cret";

/// Kills the simulator when the test ends, also on a failed assertion.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One `GET` over a fresh connection; the whole response as text.
fn get(addr: &str, path: &str, auth: Option<&str>) -> String {
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(token) = auth {
        req.push_str(&format!("Authorization: PVEAPIToken={token}\r\n"));
    }
    req.push_str("\r\n");
    tcp.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn the_binary_prints_its_url_and_answers_only_its_token() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sim = Running(
        Command::new(env!("CARGO_BIN_EXE_pve-sim"))
            .args(["--listen", "127.0.0.1:0", "--pve-version", "8.4.7"])
            .arg("--data-dir")
            .arg(tmp.path().join("sim"))
            .env("PVE_SIM_TOKEN", TOKEN)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(sim.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|u| u.strip_prefix("http://"))
        .unwrap_or_else(|| panic!("no http:// URL in {line:?}"))
        .to_string();

    let anonymous = get(&addr, "/api2/json/version", None);
    assert!(anonymous.starts_with("HTTP/1.1 401 "), "{anonymous}");
    let wrong = get(&addr, "/api2/json/version", Some("kiln@pve!test=other"));
    assert!(wrong.starts_with("HTTP/1.1 401 "), "{wrong}");
    let ok = get(&addr, "/api2/json/version", Some(TOKEN));
    assert!(ok.starts_with("HTTP/1.1 200 "), "{ok}");
    assert!(ok.contains(r#""version":"8.4.7""#), "{ok}");
}

#[test]
fn the_binary_refuses_a_token_without_a_secret() {
    let out = Command::new(env!("CARGO_BIN_EXE_pve-sim"))
        .args(["--listen", "127.0.0.1:0"])
        .env("PVE_SIM_TOKEN", "kiln@pve!test")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--token must look like USER@REALM!TOKENID=SECRET"),
        "{err}"
    );
}
