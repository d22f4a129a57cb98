//! Hygiene: what must never ship in an image (host keys, machine-id, cloud-init
//! state, apt lists, logs, histories, seeds, private keys), cleaned from the
//! base and then enforced on every entry of the final rootfs.

use serde::{Deserialize, Serialize};

use crate::image::compose::Node;
pub use crate::image::recipe::Hygiene;

/// Files up to this size are scanned for private-key material.
pub const SCAN_LIMIT: u64 = 4 << 20;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HygieneReport {
    /// Paths removed or emptied from the base rootfs.
    pub cleaned: Vec<String>,
    /// Private keys present because the recipe allow-lists them.
    pub allowed: Vec<String>,
    /// Violations found in the final rootfs (a build with any fails).
    pub violations: Vec<String>,
}

/// Why a base path is cleaned, or None to keep it. Device nodes are dropped
/// too: devtmpfs provides them at boot.
pub fn clean_reason(path: &str, node: &Node) -> Option<&'static str> {
    let is_dir = *node == Node::Dir;
    if *node == Node::Other && path.starts_with("dev/") {
        return Some("device node");
    }
    if let Some(v) = path_violation(path, node, 1) {
        // Keep directories (they carry modes packages expect); drop contents.
        if !is_dir {
            return Some(v);
        }
    }
    let dropped_contents = [
        "tmp/",
        "var/tmp/",
        "var/cache/apt/archives/",
        "var/lib/apt/lists/",
        "var/log/",
        "var/lib/cloud/",
    ];
    if !is_dir && dropped_contents.iter().any(|d| path.starts_with(d)) {
        return Some("transient build state");
    }
    if path.starts_with("var/lib/cloud/")
        || path == "etc/ssl/private/ssl-cert-snakeoil.key"
        || path == "etc/ssl/certs/ssl-cert-snakeoil.pem"
    {
        return Some("generated per machine");
    }
    if path.starts_with("var/cache/apt/") && path.ends_with(".bin") {
        return Some("apt cache");
    }
    if path == "var/lib/apt/extended_states" {
        // Auto-install marks differ between a first (unpinned) install and a
        // pinned one; nodes never autoremove, so they are not kept.
        return Some("apt auto-install marks");
    }
    if path == "etc/resolv.conf" && *node != Node::File {
        return None; // systemd-resolved's symlink is part of the image
    }
    if matches!(
        path,
        "etc/resolv.conf" | "var/lib/dbus/machine-id" | "etc/machine-id" | "etc/hostname"
    ) {
        return Some("host or machine identity");
    }
    None
}

/// A path that must not exist in a shipped image (size given for files).
fn path_violation(path: &str, node: &Node, size: u64) -> Option<&'static str> {
    let file = matches!(node, Node::File | Node::HardLink(_));
    let name = path.rsplit('/').next().unwrap_or(path);
    if path.starts_with("etc/ssh/ssh_host_") {
        return Some("SSH host key (each clone must generate its own)");
    }
    if path.starts_with("var/lib/cloud/") {
        return Some("cloud-init state");
    }
    if path.starts_with("var/lib/apt/lists/") && file && name != "lock" {
        return Some("apt list");
    }
    if path.starts_with("var/log/journal/") && *node != Node::Dir {
        return Some("journal");
    }
    if path.starts_with("var/log/") && file && size > 0 {
        return Some("log file");
    }
    if matches!(
        name,
        ".bash_history"
            | ".zsh_history"
            | ".python_history"
            | ".lesshst"
            | ".viminfo"
            | ".mysql_history"
            | ".psql_history"
    ) {
        return Some("shell history");
    }
    if matches!(
        path,
        "var/lib/systemd/random-seed"
            | "var/lib/urandom/random-seed"
            | "var/lib/systemd/credential.secret"
    ) {
        return Some("random seed");
    }
    if path == "etc/machine-id" && (size > 0 || !file) {
        return Some("machine-id must be empty so each clone gets its own");
    }
    if path == "var/lib/dbus/machine-id" && file {
        return Some("D-Bus machine-id");
    }
    if path.starts_with("var/cache/apt/archives/") && name.ends_with(".deb") {
        return Some("package cache");
    }
    None
}

/// Checks every entry written to the final rootfs.
pub struct Scanner<'a> {
    allow: &'a [String],
    pub report: HygieneReport,
}

/// Streaming search of one file's bytes for PEM or OpenSSH private keys: a
/// `-----BEGIN ... PRIVATE KEY-----` line followed by base64 key material.
/// (Programs that merely mention the marker, like ssh-keygen, do not count.)
pub struct ContentScan {
    path: String,
    active: bool,
    carry: Vec<u8>,
    found: bool,
    started: bool,
}

const MARKER: &[u8] = b"PRIVATE KEY-----";
/// Bytes after a marker needed to judge it.
const LOOKAHEAD: usize = 256;

/// Is the marker at `p` the start of real key material?
fn is_key_at(w: &[u8], p: usize) -> bool {
    let before = &w[p.saturating_sub(48)..p];
    let Some(b) = memchr::memmem::rfind(before, b"-----BEGIN ") else {
        return false;
    };
    // Only capitals, digits and spaces between BEGIN and the marker.
    if !before[b + 11..]
        .iter()
        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == b' ')
    {
        return false;
    }
    let rest = &w[(p + MARKER.len()).min(w.len())..];
    let mut lines = rest.split(|c| *c == b'\n').skip(1);
    let mut base64 = 0usize;
    for line in lines.by_ref().take(6) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.contains(&b':') || line.is_empty() {
            continue; // PEM headers (Proc-Type, DEK-Info) and blank lines
        }
        if line
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'='))
        {
            base64 += line.len();
            if base64 >= 40 {
                return true;
            }
        } else {
            return false;
        }
    }
    false
}

impl ContentScan {
    pub fn feed(&mut self, chunk: &[u8]) {
        if !self.active || self.found {
            return;
        }
        if self.carry.is_empty() && !self.started {
            self.started = true;
            // Compiled programs and libraries embed self-test keys (GnuTLS does);
            // a leaked key is a text file, so ELF objects are not scanned.
            if chunk.starts_with(b"\x7fELF") {
                self.active = false;
                return;
            }
        }
        let mut window = std::mem::take(&mut self.carry);
        window.extend_from_slice(chunk);
        let mut from = 0;
        while let Some(pos) = memchr::memmem::find(&window[from..], MARKER) {
            let p = from + pos;
            if window.len() - p < LOOKAHEAD {
                // Judge it once more bytes (or the end of the file) arrive.
                self.carry = window[p.saturating_sub(48)..].to_vec();
                return;
            }
            if is_key_at(&window, p) {
                self.found = true;
                return;
            }
            from = p + 1;
        }
        let keep = window.len().min(64);
        self.carry = window[window.len() - keep..].to_vec();
    }

    /// The file ended: judge whatever is still pending.
    fn finish(&mut self) {
        if !self.active || self.found {
            return;
        }
        let w = std::mem::take(&mut self.carry);
        self.found = memchr::memmem::find_iter(&w, MARKER).any(|p| is_key_at(&w, p));
    }
}

impl<'a> Scanner<'a> {
    pub fn new(h: &'a Hygiene) -> Self {
        Scanner {
            allow: &h.allow_private_keys,
            report: HygieneReport::default(),
        }
    }

    /// Record a violation if `path` (normalized, image-relative) may not ship.
    pub fn check_path(&mut self, path: &str, node: &Node, size: u64) {
        if let Some(why) = path_violation(path, node, size) {
            self.report.violations.push(format!("/{path}: {why}"));
        }
    }

    /// Start scanning a file's content; `active` false skips the scan.
    pub fn content_scan(&self, path: &str, active: bool) -> ContentScan {
        ContentScan {
            path: path.to_string(),
            active,
            carry: Vec::new(),
            found: false,
            started: false,
        }
    }

    pub fn finish_content(&mut self, mut scan: ContentScan) {
        scan.finish();
        if scan.found {
            let p = format!("/{}", scan.path);
            if self.allow.iter().any(|a| a == &p) {
                self.report.allowed.push(p);
            } else {
                self.report.violations.push(format!("{p}: private key (allow-list it under [hygiene] allow_private_keys if it must ship)"));
            }
        }
    }

    pub fn into_report(mut self) -> HygieneReport {
        self.report.cleaned.sort();
        self.report.violations.sort();
        self.report.allowed.sort();
        self.report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(hy: &Hygiene, path: &str, chunks: &[&[u8]]) -> HygieneReport {
        let mut s = Scanner::new(hy);
        let mut c = s.content_scan(path, true);
        for ch in chunks {
            c.feed(ch);
        }
        s.finish_content(c);
        s.into_report()
    }

    #[test]
    fn ssh_host_keys_are_violations() {
        let hy = Hygiene::default();
        let mut s = Scanner::new(&hy);
        s.check_path("etc/ssh/ssh_host_ed25519_key", &Node::File, 400);
        assert_eq!(s.into_report().violations.len(), 1);
    }

    #[test]
    fn non_empty_machine_id_is_a_violation_and_empty_is_not() {
        let hy = Hygiene::default();
        let mut s = Scanner::new(&hy);
        s.check_path("etc/machine-id", &Node::File, 0);
        assert!(s.report.violations.is_empty());
        s.check_path("etc/machine-id", &Node::File, 33);
        assert_eq!(s.report.violations.len(), 1);
    }

    #[test]
    fn logs_histories_seeds_and_cloud_state_are_violations() {
        let hy = Hygiene::default();
        let mut s = Scanner::new(&hy);
        for p in [
            "var/log/syslog",
            "root/.bash_history",
            "var/lib/systemd/random-seed",
            "var/lib/cloud/instance",
            "var/lib/apt/lists/deb.debian.org_InRelease",
        ] {
            s.check_path(p, &Node::File, 10);
        }
        assert_eq!(s.into_report().violations.len(), 5);
    }

    #[test]
    fn empty_log_files_created_by_packages_may_ship() {
        let hy = Hygiene::default();
        let mut s = Scanner::new(&hy);
        s.check_path("var/log/wtmp", &Node::File, 0);
        assert!(s.into_report().violations.is_empty());
    }

    #[test]
    fn private_key_split_across_chunks_is_found() {
        let r = scan(&Hygiene::default(), "etc/x/key.pem", &[b"junk -----BEGIN RSA PRIV", b"ATE KEY-----\nMIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\nVTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u+qKhbwKfBstIs+bMY2Zkp18gnTxK\n-----END RSA PRIVATE KEY-----\n"]);
        assert_eq!(r.violations.len(), 1, "{r:?}");
        assert!(r.violations[0].contains("/etc/x/key.pem"));
    }

    #[test]
    fn allow_listed_private_key_is_reported_not_refused() {
        let hy = Hygiene {
            allow_private_keys: vec!["/etc/x/key.pem".into()],
        };
        let r = scan(&hy, "etc/x/key.pem", &[b"-----BEGIN OPENSSH PRIVATE\x20KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n"]);
        assert!(r.violations.is_empty());
        assert_eq!(r.allowed, vec!["/etc/x/key.pem"]);
    }

    #[test]
    fn programs_that_only_mention_the_marker_pass() {
        let r = scan(&Hygiene::default(), "usr/bin/ssh-keygen", &[b"\0\0-----BEGIN OPENSSH PRIVATE\x20KEY-----\0-----END OPENSSH PRIVATE KEY-----\0%s: %s\0"]);
        assert!(r.violations.is_empty(), "{r:?}");
        let r = scan(&Hygiene::default(), "usr/lib/x.py", &[b"MARKER = '-----BEGIN RSA PRIVATE\x20KEY-----'\nif line.startswith(MARKER):\n    pass\n"]);
        assert!(r.violations.is_empty(), "{r:?}");
    }

    #[test]
    fn keys_embedded_in_elf_objects_are_not_counted() {
        let key = b"-----BEGIN PRIVATE\x20KEY-----\nMEgCAQAwHwYIKoUDBwEBAQEwEwYHKoUDAgIjAQYIKoUDBwEBAgIEIgQgKOF96tom\n-----END PRIVATE KEY-----\n";
        let r = scan(
            &Hygiene::default(),
            "usr/lib/libgnutls.so",
            &[b"\x7fELF\x02\x01", key],
        );
        assert!(r.violations.is_empty(), "{r:?}");
        let r = scan(&Hygiene::default(), "etc/leaked.pem", &[key]);
        assert_eq!(r.violations.len(), 1, "{r:?}");
    }

    #[test]
    fn public_keys_and_certificates_pass() {
        let r = scan(
            &Hygiene::default(),
            "etc/ssl/certs/ca.pem",
            &[b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"],
        );
        assert!(r.violations.is_empty());
    }

    #[test]
    fn base_cleaning_drops_host_keys_but_keeps_log_directories() {
        assert!(clean_reason("etc/ssh/ssh_host_rsa_key", &Node::File).is_some());
        assert!(clean_reason("var/log/apt/history.log", &Node::File).is_some());
        assert!(clean_reason("var/log/apt", &Node::Dir).is_none());
        assert!(clean_reason("usr/bin/ls", &Node::File).is_none());
    }
}
