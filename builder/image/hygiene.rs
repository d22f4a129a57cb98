//! Hygiene: what must never ship in an image (host keys, machine-id, cloud-init
//! state, apt lists, logs, histories, seeds, private keys), cleaned from the
//! base and then enforced on every entry of the final rootfs.

pub(crate) use crate::image::contract::HygieneReport;
use crate::image::contract::Node;
pub(crate) use crate::image::recipe::Hygiene;

/// Files up to this size are scanned for private-key material.
pub(crate) const SCAN_LIMIT: u64 = 4 << 20;

/// Why a base path is cleaned, or None to keep it. Device nodes are dropped
/// too: devtmpfs provides them at boot.
pub(crate) fn clean_reason(path: &str, node: &Node) -> Option<&'static str> {
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
pub(crate) struct Scanner<'a> {
    allow: &'a [String],
    pub report: HygieneReport,
}

/// Files holding a K3s cluster token: the server token K3s writes on first
/// start, its legacy `node-token` name and the agent-only token.
/// https://docs.k3s.io/cli/token ("The server token is always written to
/// /var/lib/rancher/k3s/server/token"; `--agent-token` for agents).
const K3S_TOKEN_FILES: [&str; 3] = [
    "var/lib/rancher/k3s/server/token",
    "var/lib/rancher/k3s/server/node-token",
    "var/lib/rancher/k3s/server/agent-token",
];

/// K3s's configuration file and its drop-ins; their keys are the CLI flag
/// names, so `token:` / `agent-token:` there is the cluster secret.
/// https://docs.k3s.io/installation/configuration#configuration-file
fn is_k3s_config(path: &str) -> bool {
    path == "etc/rancher/k3s/config.yaml"
        || (path.starts_with("etc/rancher/k3s/config.yaml.d/") && path.ends_with(".yaml"))
}

/// Does a K3s config file set a token? Only top-level keys count (nested
/// ones are not K3s flags); an empty or null value is no secret.
fn k3s_config_has_token(text: &[u8]) -> bool {
    text.split(|c| *c == b'\n').any(|line| {
        let line = String::from_utf8_lossy(line);
        if line.starts_with([' ', '\t', '#']) {
            return false;
        }
        let Some((key, value)) = line.split_once(':') else {
            return false;
        };
        // A key's colon is followed by a space or the end of the line.
        if !(value.is_empty() || value.starts_with([' ', '\t', '\r'])) {
            return false;
        }
        let key = key.trim().trim_matches(['"', '\'']);
        let value = value.split(" #").next().unwrap_or("").trim();
        matches!(key, "token" | "agent-token")
            && !matches!(value, "" | "\"\"" | "''" | "~" | "null" | "Null" | "NULL")
    })
}

/// Streaming search of one file's bytes for private keys and cluster
/// secrets, wherever they are embedded:
/// - PEM and OpenSSH keys (`-----BEGIN ... PRIVATE KEY-----` followed by
///   base64), also indented (YAML block scalars, Helm values) or with literal
///   `\n` escapes (JSON and YAML strings);
/// - OpenPGP secret keys (`-----BEGIN PGP PRIVATE KEY BLOCK-----`, RFC 4880 §6.2);
/// - base64 of a PEM private key (kubeconfig `client-key-data`, Secret data);
/// - PuTTY `.ppk` files (`PuTTY-User-Key-File-2:`/`-3:` with `Private-Lines:`);
/// - a `token` in K3s's config file.
///
/// (Programs that merely mention a marker, like ssh-keygen, do not count.)
/// Most files cost one SIMD substring search per needle (memchr's memmem);
/// the judges run only where a needle occurs.
pub(crate) struct ContentScan {
    path: String,
    active: bool,
    carry: Vec<u8>,
    /// Needle matches starting before this offset of `carry` were judged.
    judged: usize,
    found: Option<&'static str>,
    started: bool,
    putty_header: bool,
    putty_private: bool,
    /// The whole text of a K3s config file, judged when it ends.
    k3s_config: Option<Vec<u8>>,
}

/// `PRIVATE KEY` ends the PEM label of every private key type (PKCS#1, #8,
/// SEC1, OpenSSH) and starts the OpenPGP one (`PRIVATE KEY BLOCK`).
const MARKER: &[u8] = b"PRIVATE KEY";
/// base64 of `-----BEGI` (a PEM starting a base64 string, as in kubeconfig).
const B64_MARKER: &[u8] = b"LS0tLS1CRUdJ";
/// First line of a PuTTY key file, then the header its private half follows
/// (PuTTY manual, Appendix C "PPK file format":
/// https://the.earth.li/~sgtatham/putty/0.76/htmldoc/AppendixC.html).
const PUTTY_MARKER: &[u8] = b"PuTTY-User-Key-File-";
const PUTTY_PRIVATE: &[u8] = b"Private-Lines:";
/// Bytes after a needle needed to judge it.
const LOOKAHEAD: usize = 512;
/// Bytes before a needle a judge looks at (the `-----BEGIN ` of the label).
const LOOKBEHIND: usize = 64;

#[derive(Clone, Copy)]
enum Needle {
    Pem,
    Base64Pem,
    PuttyHeader,
    PuttyPrivate,
}

fn finders() -> &'static [(memchr::memmem::Finder<'static>, Needle); 4] {
    use memchr::memmem::Finder;
    static F: std::sync::OnceLock<[(Finder<'static>, Needle); 4]> = std::sync::OnceLock::new();
    F.get_or_init(|| {
        [
            (Finder::new(MARKER), Needle::Pem),
            (Finder::new(B64_MARKER), Needle::Base64Pem),
            (Finder::new(PUTTY_MARKER), Needle::PuttyHeader),
            (Finder::new(PUTTY_PRIVATE), Needle::PuttyPrivate),
        ]
    })
}

fn is_base64(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'=')
}

/// Does base64 key material follow the line `rest` starts in? Lines end at a
/// newline or at a literal `\n` (a PEM inside a JSON or YAML quoted string);
/// indentation is ignored, and so are PEM/armour headers (`Proc-Type:`,
/// `Version:`) and blank lines. A `\` inside a line is a JSON escape (`\/`).
fn key_material_follows(rest: &[u8]) -> bool {
    let rest = &rest[..rest.len().min(LOOKAHEAD)];
    let mut lines = Vec::new();
    let mut from = 0;
    let mut i = 0;
    while i < rest.len() {
        if rest[i] == b'\n' {
            lines.push(&rest[from..i]);
            from = i + 1;
        } else if rest[i..].starts_with(b"\\n") {
            lines.push(&rest[from..i]);
            from = i + 2;
            i += 1;
        }
        i += 1;
    }
    lines.push(&rest[from..]);
    // Every line up to the END line (or as far as the window reaches) must be
    // key material: documentation that shows a key cut short ("...", as
    // cloud-init's cc_ssh.py does) is not a key.
    let mut base64 = 0usize;
    for line in lines.into_iter().skip(1).take(8) {
        let line = line.trim_ascii();
        let line = line.strip_suffix(b"\\r").unwrap_or(line);
        if line.starts_with(b"-----END ") {
            break;
        }
        if line.contains(&b':') || line.is_empty() {
            continue;
        }
        if line.iter().all(|c| is_base64(*c) || *c == b'\\') {
            base64 += line.iter().filter(|c| is_base64(**c)).count();
        } else {
            return false;
        }
    }
    base64 >= 40
}

/// Is the `PRIVATE KEY` at `p` the label of real key material? Returns what
/// kind of key it is.
fn pem_key_at(w: &[u8], p: usize) -> Option<&'static str> {
    let after = &w[p + MARKER.len()..];
    let (what, rest) = if let Some(rest) = after.strip_prefix(b"-----") {
        ("private key", rest)
    } else if let Some(rest) = after.strip_prefix(b" BLOCK-----") {
        ("PGP private key", rest)
    } else {
        return None;
    };
    let before = &w[p.saturating_sub(LOOKBEHIND)..p];
    let b = memchr::memmem::rfind(before, b"-----BEGIN ")?;
    // Only capitals, digits and spaces between BEGIN and the marker.
    if !before[b + 11..]
        .iter()
        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == b' ')
    {
        return None;
    }
    key_material_follows(rest).then_some(what)
}

/// Is the base64 at `p` the encoding of a PEM private key?
fn base64_key_at(w: &[u8], p: usize) -> Option<&'static str> {
    use base64::Engine;
    let enc: Vec<u8> = w[p..]
        .iter()
        .take(LOOKAHEAD)
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/'))
        .copied()
        .collect();
    let whole = enc.len() / 4 * 4;
    let pem = base64::engine::general_purpose::STANDARD
        .decode(&enc[..whole])
        .ok()?;
    memchr::memmem::find_iter(&pem, MARKER)
        .find_map(|q| pem_key_at(&pem, q))
        .map(|_| "base64-encoded private key")
}

impl ContentScan {
    pub(crate) fn feed(&mut self, chunk: &[u8]) {
        if !self.active || self.found.is_some() || chunk.is_empty() {
            return;
        }
        if !self.started {
            self.started = true;
            // Compiled programs and libraries embed self-test keys (GnuTLS does);
            // a leaked key is a text file, so ELF objects are not scanned.
            if chunk.starts_with(b"\x7fELF") {
                self.active = false;
                return;
            }
        }
        if let Some(text) = &mut self.k3s_config {
            if (text.len() as u64) < SCAN_LIMIT {
                text.extend_from_slice(chunk);
            }
        }
        let mut window = std::mem::take(&mut self.carry);
        window.extend_from_slice(chunk);
        // Needles starting before `limit` have LOOKAHEAD bytes to be judged
        // by; the rest are judged once more bytes (or the end) arrive.
        let limit = window.len().saturating_sub(LOOKAHEAD);
        self.judge(&window, limit);
        let cut = limit.saturating_sub(LOOKBEHIND);
        self.carry = window[cut..].to_vec();
        self.judged = limit - cut;
    }

    /// Judge every needle in `w` starting at or after `self.judged` and before `limit`.
    fn judge(&mut self, w: &[u8], limit: usize) {
        if self.judged >= limit {
            return;
        }
        for (finder, needle) in finders() {
            for p in finder.find_iter(&w[self.judged..]) {
                let p = p + self.judged;
                if p >= limit || self.found.is_some() {
                    break;
                }
                match needle {
                    Needle::Pem => self.found = pem_key_at(w, p),
                    Needle::Base64Pem => self.found = base64_key_at(w, p),
                    Needle::PuttyHeader => {
                        let v = &w[p + PUTTY_MARKER.len()..];
                        self.putty_header |= v.starts_with(b"2:") || v.starts_with(b"3:");
                    }
                    Needle::PuttyPrivate => {
                        self.putty_private |= key_material_follows(&w[p + PUTTY_PRIVATE.len()..]);
                    }
                }
            }
        }
        if self.found.is_none() && self.putty_header && self.putty_private {
            self.found = Some("PuTTY private key");
        }
    }

    /// The file ended: judge whatever is still pending.
    fn finish(&mut self) {
        if !self.active || self.found.is_some() {
            return;
        }
        let w = std::mem::take(&mut self.carry);
        self.judge(&w, w.len());
        if self.found.is_none() && self.k3s_config.as_deref().is_some_and(k3s_config_has_token) {
            self.found = Some("K3s token in the K3s config");
        }
    }
}

impl<'a> Scanner<'a> {
    pub(crate) fn new(h: &'a Hygiene) -> Self {
        Scanner {
            allow: &h.allow_private_keys,
            report: HygieneReport::default(),
        }
    }

    /// Record a violation if `path` (normalized, image-relative) may not ship.
    pub(crate) fn check_path(&mut self, path: &str, node: &Node, size: u64) {
        if let Some(why) = path_violation(path, node, size) {
            self.report.violations.push(format!("/{path}: {why}"));
        }
        if matches!(node, Node::File | Node::HardLink(_)) && K3S_TOKEN_FILES.contains(&path) {
            self.secret(path, "K3s cluster token");
        }
    }

    /// A secret at `path`: allowed if the recipe allow-lists it, else a violation.
    fn secret(&mut self, path: &str, what: &str) {
        let p = format!("/{path}");
        if self.allow.iter().any(|a| a == &p) {
            self.report.allowed.push(p);
        } else {
            self.report.violations.push(format!(
                "{p}: {what} (allow-list it under [hygiene] allow_private_keys if it must ship)"
            ));
        }
    }

    /// Start scanning a file's content; `active` false skips the scan.
    pub(crate) fn content_scan(&self, path: &str, active: bool) -> ContentScan {
        ContentScan {
            path: path.to_string(),
            active,
            carry: Vec::new(),
            judged: 0,
            found: None,
            started: false,
            putty_header: false,
            putty_private: false,
            k3s_config: is_k3s_config(path).then(Vec::new),
        }
    }

    pub(crate) fn finish_content(&mut self, mut scan: ContentScan) {
        scan.finish();
        if let Some(what) = scan.found {
            self.secret(&scan.path, what);
        }
    }

    pub(crate) fn into_report(mut self) -> HygieneReport {
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

    /// The label shared by every private key type, kept apart from BEGIN so
    /// no source line holds a key header.
    const PK: &str = "PRIVATE KEY";

    /// `n` lines of 64 base64 characters of made-up (not key) bytes.
    fn fake_base64_lines(n: usize) -> Vec<String> {
        use base64::Engine;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let bytes: Vec<u8> = (0..n * 48)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        bytes
            .chunks(48)
            .map(|c| base64::engine::general_purpose::STANDARD.encode(c))
            .collect()
    }

    /// A PEM block with label `label` and made-up contents.
    fn fake_pem(label: &str) -> String {
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            fake_base64_lines(4).join("\n")
        )
    }

    fn found(path: &str, text: &str) -> HygieneReport {
        scan(&Hygiene::default(), path, &[text.as_bytes()])
    }

    #[test]
    fn documentation_showing_a_key_cut_short_passes() {
        // cloud-init's cc_ssh.py carries this example (one base64 line, then "...").
        let label = format!("RSA PRIVATE{}KEY", "\x20");
        let text = format!(
            "    ssh_keys:\n      rsa_private: |\n        -----BEGIN {label}-----\n        MIIBxwIBAAJhAKD0YSHy73nUgysO13XsJmd4fHiFyQ+00R7VVu2iV9Qco\n        ...\n        -----END {label}-----\n"
        );
        assert!(found(
            "/usr/lib/python3/dist-packages/cloudinit/config/cc_ssh.py",
            &text
        )
        .violations
        .is_empty());
    }

    #[test]
    fn indented_pem_in_yaml_is_found() {
        let pem = fake_pem(&format!("RSA {PK}"));
        let indented: String = pem.lines().map(|l| format!("    {l}\n")).collect();
        let yaml = format!("tls:\n  enabled: true\n  key: |\n{indented}  port: 443\n");
        let r = found("etc/app/values.yaml", &yaml);
        assert_eq!(r.violations.len(), 1, "{r:?}");
        assert!(r.violations[0].starts_with("/etc/app/values.yaml: private key"));
    }

    #[test]
    fn json_escaped_pem_is_found() {
        let pem = fake_pem(&format!("EC {PK}")).replace('\n', "\\n");
        let json = format!("{{\"name\": \"x\", \"key\": \"{pem}\"}}\n");
        assert_eq!(found("etc/app/creds.json", &json).violations.len(), 1);
        // Encoders that escape `/` too (PHP's json_encode, Go's HTML-safe mode).
        let slashed = json.replace('/', "\\/");
        assert_eq!(found("etc/app/creds.json", &slashed).violations.len(), 1);
    }

    #[test]
    fn kubeconfig_client_key_data_is_found() {
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nusers:\n- name: admin\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\n",
            b64(&fake_pem("CERTIFICATE")),
            b64(&fake_pem(&format!("EC {PK}")))
        );
        let r = found("etc/rancher/k3s/k3s.yaml", &kubeconfig);
        assert_eq!(r.violations.len(), 1, "{r:?}");
        assert!(
            r.violations[0].contains("base64-encoded private key"),
            "{r:?}"
        );
    }

    #[test]
    fn pgp_private_key_block_is_found() {
        let armour = fake_pem(&format!("PGP {PK} BLOCK")).replacen(
            "-----\n",
            "-----\nComment: made up\n\n",
            1,
        );
        let r = found("root/secret.asc", &armour);
        assert_eq!(r.violations.len(), 1, "{r:?}");
        assert!(r.violations[0].contains("PGP private key"), "{r:?}");
    }

    #[test]
    fn putty_key_files_are_found() {
        let lines = fake_base64_lines(20);
        for version in ["2", "3"] {
            let ppk = format!(
                "PuTTY-User-Key-File-{version}: ssh-rsa\nEncryption: none\nComment: made up\nPublic-Lines: 12\n{}\nPrivate-Lines: 8\n{}\nPrivate-MAC: 0123abcd\n",
                lines[..12].join("\n"),
                lines[12..].join("\n")
            );
            let r = found("home/u/id.ppk", &ppk);
            assert_eq!(r.violations.len(), 1, "version {version}: {r:?}");
            assert!(r.violations[0].contains("PuTTY private key"), "{r:?}");
        }
    }

    #[test]
    fn embedded_keys_are_found_however_the_file_is_chunked() {
        use base64::Engine;
        let kubeconfig = format!(
            "{}client-key-data: {}\n",
            "# padding\n".repeat(70),
            base64::engine::general_purpose::STANDARD.encode(fake_pem(&format!("RSA {PK}")))
        );
        let bytes = kubeconfig.as_bytes();
        for size in [1, 7, 100, 511, 512, 513, 700, 4096] {
            let chunks: Vec<&[u8]> = bytes.chunks(size).collect();
            let r = scan(&Hygiene::default(), "etc/kube.yaml", &chunks);
            assert_eq!(r.violations.len(), 1, "chunks of {size}: {r:?}");
        }
    }

    #[test]
    fn k3s_token_files_are_refused() {
        let hy = Hygiene::default();
        let mut s = Scanner::new(&hy);
        s.check_path("var/lib/rancher/k3s/server/token", &Node::File, 100);
        s.check_path("var/lib/rancher/k3s/server/agent-token", &Node::File, 100);
        s.check_path("var/lib/rancher/k3s/server/manifests", &Node::Dir, 0);
        let r = s.into_report();
        assert_eq!(r.violations.len(), 2, "{r:?}");
        assert!(r.violations[0].contains("K3s cluster token"), "{r:?}");
    }

    #[test]
    fn k3s_config_with_a_token_is_refused_and_without_one_passes() {
        let cfg = "write-kubeconfig-mode: \"0644\"\ntoken: K10abc::server:s3cret\n";
        let r = found("etc/rancher/k3s/config.yaml", cfg);
        assert_eq!(r.violations.len(), 1, "{r:?}");
        assert!(r.violations[0].contains("K3s token"), "{r:?}");
        let dropin = "\"agent-token\": \"s3cret\"\n";
        assert_eq!(
            found("etc/rancher/k3s/config.yaml.d/10-join.yaml", dropin)
                .violations
                .len(),
            1
        );
        let without = "token-file: /run/k3s-token\nnode-label:\n  - token: x\ntoken: \"\"\n";
        let r = found("etc/rancher/k3s/config.yaml", without);
        assert!(r.violations.is_empty(), "{r:?}");
        // The same text anywhere else is not K3s's.
        assert!(found("etc/other/config.yaml", cfg).violations.is_empty());
    }

    #[test]
    fn allow_list_covers_embedded_keys_and_k3s_tokens() {
        use base64::Engine;
        let hy = Hygiene {
            allow_private_keys: vec![
                "/etc/rancher/k3s/k3s.yaml".into(),
                "/var/lib/rancher/k3s/server/token".into(),
            ],
        };
        let kubeconfig = format!(
            "client-key-data: {}\n",
            base64::engine::general_purpose::STANDARD.encode(fake_pem(&format!("EC {PK}")))
        );
        let mut s = Scanner::new(&hy);
        let mut c = s.content_scan("etc/rancher/k3s/k3s.yaml", true);
        c.feed(kubeconfig.as_bytes());
        s.finish_content(c);
        s.check_path("var/lib/rancher/k3s/server/token", &Node::File, 100);
        let r = s.into_report();
        assert!(r.violations.is_empty(), "{r:?}");
        assert_eq!(
            r.allowed,
            [
                "/etc/rancher/k3s/k3s.yaml",
                "/var/lib/rancher/k3s/server/token"
            ]
        );
    }

    #[test]
    fn public_halves_of_the_embedded_formats_pass() {
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        for (path, text) in [
            (
                "etc/apt/keyrings/x.asc",
                fake_pem("PGP PUBLIC KEY BLOCK").replacen("-----\n", "-----\n\n", 1),
            ),
            (
                "etc/kube.yaml",
                format!("certificate-authority-data: {}\n", b64(&fake_pem("CERTIFICATE"))),
            ),
            (
                "usr/share/doc/putty/ppk.txt",
                "A key file starts `PuTTY-User-Key-File-3: ssh-ed25519`; then\nPrivate-Lines: gives the count.\n".to_string(),
            ),
        ] {
            let r = found(path, &text);
            assert!(r.violations.is_empty(), "{path}: {r:?}");
        }
    }

    #[test]
    fn base_cleaning_drops_host_keys_but_keeps_log_directories() {
        assert!(clean_reason("etc/ssh/ssh_host_rsa_key", &Node::File).is_some());
        assert!(clean_reason("var/log/apt/history.log", &Node::File).is_some());
        assert!(clean_reason("var/log/apt", &Node::Dir).is_none());
        assert!(clean_reason("usr/bin/ls", &Node::File).is_none());
    }
}
