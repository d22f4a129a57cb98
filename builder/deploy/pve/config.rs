//! Publish targets: Proxmox VE endpoints from `kiln.toml`, the user config or
//! `KILN_PVE_*` environment variables, and the API token (env or file, never argv).

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub(crate) const DEFAULT_TOKEN_ENV: &str = "KILN_PVE_TOKEN";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConfigFile {
    #[serde(default)]
    pub targets: BTreeMap<String, TargetConfig>,
}

/// One Proxmox VE target as written in the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// `https://pve.example.lan:8006`.
    pub url: String,
    /// The node that gets the template (or use `nodes`).
    #[serde(default)]
    pub node: String,
    /// Several nodes, one template on each (local storage cannot be cloned
    /// across nodes, Proxmox bug 2059).
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Storage for VM disks (content `images`), e.g. `local-lvm`.
    pub storage: String,
    /// File-based storage with `import` content for the upload, e.g. `local`.
    pub import_storage: String,
    /// `import_storage` is shared by all nodes (NFS, CephFS...): the disk is
    /// uploaded once, not once per node.
    #[serde(default)]
    pub shared_import_storage: bool,
    /// Storage with `vztmpl` content for LXC templates (default: import_storage).
    #[serde(default)]
    pub lxc_storage: Option<String>,
    /// Storage with `iso` content for the NoCloud seeds of environment VMs
    /// (each holds its VM's user-data, secrets included, until the VM goes).
    #[serde(default = "default_iso_storage")]
    pub iso_storage: String,
    /// Resource pool the templates go into (it must exist). VM privileges
    /// may then be granted on `/pool/<pool>` instead of `/vms`.
    #[serde(default)]
    pub pool: Option<String>,
    /// Inclusive VMID range kiln may use for templates.
    #[serde(default = "default_range")]
    pub vmid_range: [u32; 2],
    /// Environment variable holding `USER@REALM!TOKENID=SECRET`.
    #[serde(default)]
    pub token_env: Option<String>,
    /// File holding the token (used when the variable is unset).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// PEM CA certificate(s) to trust (e.g. Proxmox's pve-root-ca.pem).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// SHA-256 fingerprint of the server certificate (`AA:BB:...`), pinned.
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// Delete the uploaded import file once the template exists.
    #[serde(default = "yes")]
    pub remove_import: bool,
    /// Seconds to wait for one Proxmox task.
    #[serde(default = "default_task_timeout")]
    pub task_timeout: u64,
    /// Seconds another publish of the same image may leave its VM unconverted
    /// (with nothing below it being created) before kiln takes it for the
    /// leftover of a run that died on another machine and stops waiting.
    #[serde(default = "default_concurrent_publish_wait")]
    pub concurrent_publish_wait: u64,
    #[serde(default)]
    pub vm: VmDefaults,
    /// SSH access for Proxmox VE older than 8.4 (no import content).
    #[serde(default)]
    pub ssh: Option<SshConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmDefaults {
    #[serde(default = "default_cores")]
    pub cores: u32,
    /// MiB.
    #[serde(default = "default_memory")]
    pub memory: u32,
    #[serde(default = "default_bridge")]
    pub bridge: String,
    #[serde(default = "default_cpu")]
    pub cpu: String,
}

impl Default for VmDefaults {
    fn default() -> Self {
        VmDefaults {
            cores: default_cores(),
            memory: default_memory(),
            bridge: default_bridge(),
            cpu: default_cpu(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshConfig {
    pub host: String,
    #[serde(default = "default_ssh_port")]
    pub port: u16,
    #[serde(default = "default_ssh_user")]
    pub user: String,
    /// Private key; without it the SSH agent is used.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Host key SHA-256 (base64 as `ssh-keygen -lf` prints it, without
    /// `SHA256:`); without it ~/.ssh/known_hosts must know the host.
    #[serde(default)]
    pub host_key_sha256: Option<String>,
}

fn default_range() -> [u32; 2] {
    [9000, 9999]
}
fn yes() -> bool {
    true
}
fn default_task_timeout() -> u64 {
    1800
}
fn default_iso_storage() -> String {
    "local".into()
}

fn default_concurrent_publish_wait() -> u64 {
    120
}
fn default_cores() -> u32 {
    2
}
fn default_memory() -> u32 {
    8192
}
fn default_bridge() -> String {
    "vmbr0".into()
}
fn default_cpu() -> String {
    "host".into()
}
fn default_ssh_port() -> u16 {
    22
}
fn default_ssh_user() -> String {
    "root".into()
}

/// An API token. Its secret is never shown by `Debug` or in errors.
#[derive(Clone)]
pub struct Token {
    /// `USER@REALM!TOKENID`.
    pub id: String,
    secret: String,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token({}=<redacted>)", self.id)
    }
}

impl Token {
    /// Parse `USER@REALM!TOKENID=SECRET`; `source` names where it came from.
    pub fn parse(raw: &str, source: &str) -> Result<Token> {
        let raw = raw.trim();
        let raw = raw.strip_prefix("PVEAPIToken=").unwrap_or(raw);
        match raw.split_once('=') {
            Some((id, secret))
                if id.contains('@')
                    && id.contains('!')
                    && !secret.is_empty()
                    && !secret.contains(char::is_whitespace) =>
            {
                Ok(Token {
                    id: id.to_string(),
                    secret: secret.to_string(),
                })
            }
            _ => bail!("the API token in {source} is not of the form USER@REALM!TOKENID=SECRET"),
        }
    }

    /// The `Authorization` header value.
    pub fn header(&self) -> String {
        format!("PVEAPIToken={}={}", self.id, self.secret)
    }

    /// Replace the secret wherever it appears in `text`.
    pub fn redact(&self, text: &str) -> String {
        if self.secret.is_empty() {
            text.to_string()
        } else {
            text.replace(&self.secret, "<redacted>")
        }
    }
}

/// A resolved target, ready to connect.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub cfg: TargetConfig,
    pub token: Token,
}

impl Target {
    /// The nodes that get a template, in order.
    pub fn nodes(&self) -> Vec<String> {
        if self.cfg.nodes.is_empty() {
            vec![self.cfg.node.clone()]
        } else {
            self.cfg.nodes.clone()
        }
    }

    pub fn lxc_storage(&self) -> &str {
        self.cfg
            .lxc_storage
            .as_deref()
            .unwrap_or(&self.cfg.import_storage)
    }
}

/// Where config files are looked for, in order.
pub(crate) fn config_candidates(explicit: Option<&Path>) -> Vec<PathBuf> {
    if let Some(p) = explicit {
        return vec![p.to_path_buf()];
    }
    let mut v = vec![PathBuf::from("kiln.toml")];
    if let Some(home) = std::env::var_os("HOME") {
        v.push(PathBuf::from(home).join(".config/kiln/config.toml"));
    }
    v
}

pub(crate) fn load_config(path: &Path) -> Result<ConfigFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("{} is not a valid kiln config", path.display()))
}

/// Resolve `--target NAME` from the config, or without it a target made
/// wholly from `KILN_PVE_*` variables. `env` is the environment lookup.
pub(crate) fn resolve(
    target: Option<&str>,
    config: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Target> {
    match target {
        Some(name) => {
            let candidates = config_candidates(config);
            let Some(path) = candidates.iter().find(|p| p.is_file()) else {
                bail!(
                    "unknown target `{name}`: no config file found (looked for {})",
                    candidates
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            };
            let file = load_config(path)?;
            let Some(mut cfg) = file.targets.get(name).cloned() else {
                let known: Vec<&str> = file.targets.keys().map(String::as_str).collect();
                bail!(
                    "unknown target `{name}` in {} (known: {})",
                    path.display(),
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                );
            };
            cfg.ca_file = cfg.ca_file.map(|p| expand_home(&p, env));
            if let Some(ssh) = cfg.ssh.as_mut() {
                ssh.key_file = ssh.key_file.take().map(|p| expand_home(&p, env));
            }
            check_target(name, &cfg)?;
            let token = token_for(name, &cfg, env)?;
            Ok(Target {
                name: name.to_string(),
                cfg,
                token,
            })
        }
        None => from_env(env),
    }
}

fn token_for(
    name: &str,
    cfg: &TargetConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Token> {
    let var = cfg.token_env.as_deref().unwrap_or(DEFAULT_TOKEN_ENV);
    if let Some(v) = env(var).filter(|v| !v.trim().is_empty()) {
        return Token::parse(&v, &format!("${var}"));
    }
    if let Some(file) = &cfg.token_file {
        let file = expand_home(file, env);
        let raw = std::fs::read_to_string(&file)
            .with_context(|| format!("cannot read token file {}", file.display()))?;
        return Token::parse(&raw, &file.display().to_string());
    }
    bail!("missing API token for target `{name}`: set ${var} or token_file in the config")
}

fn expand_home(p: &Path, env: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    match (p.strip_prefix("~"), env("HOME")) {
        (Ok(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => p.to_path_buf(),
    }
}

fn check_target(name: &str, cfg: &TargetConfig) -> Result<()> {
    let url = reqwest::Url::parse(&cfg.url).map_err(|e| {
        anyhow::anyhow!(
            "target `{name}`: url `{}` is not a URL ({e}); write https://HOST:8006",
            cfg.url
        )
    })?;
    match url.scheme() {
        "https" => {}
        // The API token travels in a header of every request: over plain http
        // only to this machine (pve-sim listens on loopback).
        "http" if is_loopback(&url) => {}
        "http" => bail!(
            "target `{name}`: url `{}` must start with https:// (plain http:// would send \
             the API token in clear; it is allowed only on loopback: 127.0.0.0/8, [::1], localhost)",
            cfg.url
        ),
        _ => bail!(
            "target `{name}`: url `{}` must start with https://",
            cfg.url
        ),
    }
    match (cfg.node.is_empty(), cfg.nodes.is_empty()) {
        (true, true) => bail!("target `{name}`: set `node` (or `nodes` for several)"),
        (false, false) if !cfg.nodes.contains(&cfg.node) => bail!(
            "target `{name}`: node `{}` is not among nodes {:?}; set one of them",
            cfg.node,
            cfg.nodes
        ),
        _ => {}
    }
    for n in cfg
        .nodes
        .iter()
        .chain(Some(&cfg.node).filter(|n| !n.is_empty()))
    {
        // pve-node: a letter or digit first, then letters, digits, `-`, `.`.
        let ok = n.starts_with(|c: char| c.is_ascii_alphanumeric())
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-.".contains(c));
        if !ok {
            bail!("target `{name}`: `{n}` is not a Proxmox node name");
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(dup) = cfg.nodes.iter().find(|n| !seen.insert(*n)) {
        bail!("target `{name}`: node `{dup}` is listed twice");
    }
    let [lo, hi] = cfg.vmid_range;
    if lo < 100 || hi < lo || hi > 999_999_999 {
        bail!("target `{name}`: vmid_range [{lo}, {hi}] must lie within 100..=999999999 with low <= high");
    }
    if let Some(fp) = &cfg.fingerprint {
        parse_fingerprint(fp).with_context(|| format!("target `{name}`: bad fingerprint"))?;
    }
    if let Some(p) = &cfg.pool {
        // pve-poolid: a letter, then letters, digits, `-`, `_`, `.`.
        let ok = p.starts_with(|c: char| c.is_ascii_alphabetic())
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !ok {
            bail!("target `{name}`: pool `{p}` is not a Proxmox pool id (a letter, then letters, digits, -, _, .)");
        }
    }
    Ok(())
}

/// Whether `url` names this machine: 127.0.0.0/8, ::1 or `localhost`.
fn is_loopback(url: &reqwest::Url) -> bool {
    // The parser has already normalised the host: IPv6 in brackets, IPv4 in
    // dotted form (`127.1` becomes `127.0.0.1`), domains in lower case.
    let Some(host) = url.host_str() else {
        return false;
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host == "localhost",
    }
}

/// Parse a SHA-256 fingerprint written `AA:BB:...` or as 64 hex digits.
pub(crate) fn parse_fingerprint(s: &str) -> Result<[u8; 32]> {
    let hexs: String = s.chars().filter(|c| *c != ':').collect();
    let bytes = hex::decode(hexs.trim())
        .ok()
        .filter(|b| b.len() == 32)
        .with_context(|| format!("`{s}` is not a SHA-256 fingerprint (32 bytes, AA:BB:...)"))?;
    let mut out = [0u8; 32];
    out.copy_from_slice(&bytes);
    Ok(out)
}

fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<Target> {
    let vars = [
        "KILN_PVE_URL",
        "KILN_PVE_NODE",
        "KILN_PVE_STORAGE",
        "KILN_PVE_IMPORT_STORAGE",
        "KILN_PVE_TOKEN",
    ];
    let missing: Vec<&str> = vars
        .iter()
        .copied()
        .filter(|v| env(v).map(|x| x.trim().is_empty()).unwrap_or(true))
        .collect();
    if !missing.is_empty() {
        bail!(
            "no --target given and the environment does not define a target: {} not set",
            missing.join(", ")
        );
    }
    let get = |v: &str| env(v).unwrap_or_default().trim().to_string();
    let vmid_range = match env("KILN_PVE_VMID_RANGE") {
        Some(r) => {
            let (a, b) = r
                .split_once('-')
                .context("KILN_PVE_VMID_RANGE must look like 9000-9099")?;
            [
                a.trim()
                    .parse()
                    .context("KILN_PVE_VMID_RANGE: bad low end")?,
                b.trim()
                    .parse()
                    .context("KILN_PVE_VMID_RANGE: bad high end")?,
            ]
        }
        None => default_range(),
    };
    // KILN_PVE_NODE may list several nodes: `pve1,pve2`.
    let node_list: Vec<String> = get("KILN_PVE_NODE")
        .split(',')
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .collect();
    let (node, nodes) = if node_list.len() > 1 {
        (String::new(), node_list)
    } else {
        (get("KILN_PVE_NODE"), Vec::new())
    };
    let cfg = TargetConfig {
        url: get("KILN_PVE_URL"),
        node,
        nodes,
        shared_import_storage: matches!(
            env("KILN_PVE_IMPORT_SHARED").as_deref().map(str::trim),
            Some("1" | "true" | "yes")
        ),
        storage: get("KILN_PVE_STORAGE"),
        import_storage: get("KILN_PVE_IMPORT_STORAGE"),
        lxc_storage: env("KILN_PVE_LXC_STORAGE"),
        iso_storage: env("KILN_PVE_ISO_STORAGE").unwrap_or_else(default_iso_storage),
        pool: env("KILN_PVE_POOL").filter(|p| !p.trim().is_empty()),
        vmid_range,
        token_env: None,
        token_file: None,
        ca_file: env("KILN_PVE_CA_FILE").map(PathBuf::from),
        fingerprint: env("KILN_PVE_FINGERPRINT"),
        remove_import: true,
        task_timeout: default_task_timeout(),
        concurrent_publish_wait: default_concurrent_publish_wait(),
        vm: VmDefaults::default(),
        ssh: None,
    };
    check_target("(environment)", &cfg)?;
    let token = Token::parse(&get("KILN_PVE_TOKEN"), "$KILN_PVE_TOKEN")?;
    Ok(Target {
        name: "(environment)".into(),
        cfg,
        token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: BTreeMap<String, String> = pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    const FULL_ENV: &[(&str, &str)] = &[
        ("KILN_PVE_URL", "https://127.0.0.1:8006"),
        ("KILN_PVE_NODE", "pve"),
        ("KILN_PVE_STORAGE", "local-lvm"),
        ("KILN_PVE_IMPORT_STORAGE", "local"),
        ("KILN_PVE_TOKEN", "ci@pve!kiln=abc-123"),
    ];

    #[test]
    fn environment_alone_defines_a_target() {
        let t = resolve(None, None, &env_of(FULL_ENV)).unwrap();
        assert_eq!(t.cfg.node, "pve");
        assert_eq!(t.cfg.import_storage, "local");
        assert_eq!(t.token.id, "ci@pve!kiln");
    }

    #[test]
    fn several_nodes_come_from_the_node_variable_or_the_config() {
        let mut e: Vec<(&str, &str)> = FULL_ENV.to_vec();
        e[1] = ("KILN_PVE_NODE", "pve1, pve2");
        let t = resolve(None, None, &env_of(&e)).unwrap();
        assert_eq!(t.nodes(), vec!["pve1", "pve2"]);
        let t = resolve(None, None, &env_of(FULL_ENV)).unwrap();
        assert_eq!(t.nodes(), vec!["pve"]);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kiln.toml");
        let base =
            "url = \"https://h:8006\"\nstorage = \"local-lvm\"\nimport_storage = \"local\"\n";
        for (extra, want) in [
            ("nodes = [\"a\", \"b\"]\n", Ok(vec!["a", "b"])),
            ("", Err("set `node`")),
            (
                "node = \"c\"\nnodes = [\"a\", \"b\"]\n",
                Err("not among nodes"),
            ),
            ("nodes = [\"a\", \"a\"]\n", Err("listed twice")),
        ] {
            std::fs::write(&p, format!("[targets.lab]\n{base}{extra}")).unwrap();
            let got = resolve(
                Some("lab"),
                Some(&p),
                &env_of(&[("KILN_PVE_TOKEN", "a@pve!b=c")]),
            );
            match want {
                Ok(n) => assert_eq!(got.unwrap().nodes(), n),
                Err(msg) => {
                    let e = format!("{:#}", got.unwrap_err());
                    assert!(e.contains(msg), "{e}");
                }
            }
        }
    }

    #[test]
    fn missing_environment_variables_are_named() {
        let err = resolve(None, None, &env_of(&FULL_ENV[..2])).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("KILN_PVE_STORAGE"), "{msg}");
        assert!(msg.contains("KILN_PVE_TOKEN"), "{msg}");
    }

    #[test]
    fn token_debug_and_errors_hide_the_secret() {
        let t = Token::parse("a@pam!x=supersecret", "test").unwrap();
        assert!(!format!("{t:?}").contains("supersecret"));
        let err = Token::parse("a@pam!x supersecret", "test").unwrap_err();
        assert!(!format!("{err:#}").contains("supersecret"));
        assert_eq!(t.redact("x supersecret y"), "x <redacted> y");
    }

    #[test]
    fn unknown_target_lists_the_known_ones() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kiln.toml");
        std::fs::write(
            &p,
            "[targets.lab]\nurl = \"https://h:8006\"\nnode = \"pve\"\nstorage = \"local-lvm\"\nimport_storage = \"local\"\n",
        )
        .unwrap();
        let err = resolve(Some("prod"), Some(&p), &env_of(&[])).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("unknown target `prod`") && msg.contains("lab"),
            "{msg}"
        );
    }

    #[test]
    fn token_file_is_used_when_the_variable_is_unset() {
        let dir = tempfile::tempdir().unwrap();
        let tf = dir.path().join("tok");
        std::fs::write(&tf, "u@pve!t=sec\n").unwrap();
        let p = dir.path().join("kiln.toml");
        std::fs::write(
            &p,
            format!("[targets.lab]\nurl = \"https://h:8006\"\nnode = \"pve\"\nstorage = \"local-lvm\"\nimport_storage = \"local\"\ntoken_file = \"{}\"\n", tf.display()),
        )
        .unwrap();
        let t = resolve(Some("lab"), Some(&p), &env_of(&[])).unwrap();
        assert_eq!(t.token.id, "u@pve!t");
        assert_eq!(t.cfg.vmid_range, [9000, 9999]);
    }

    #[test]
    fn the_documented_example_config_parses() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("kiln.example.toml");
        let f = load_config(&p).unwrap();
        let lab = &f.targets["lab"];
        assert_eq!(lab.vmid_range, [9000, 9099]);
        assert_eq!(lab.ssh.as_ref().unwrap().port, 22);
        let t = resolve(
            Some("lab"),
            Some(&p),
            &env_of(&[
                ("KILN_LAB_TOKEN", "kiln@pve!publish=s"),
                ("HOME", "/home/op"),
            ]),
        )
        .unwrap();
        assert_eq!(
            t.cfg.ssh.unwrap().key_file.unwrap(),
            PathBuf::from("/home/op/.ssh/id_ed25519")
        );
    }

    fn env_with_url(url: &str) -> Vec<(&str, &str)> {
        let mut e: Vec<(&str, &str)> = FULL_ENV.to_vec();
        e[0] = ("KILN_PVE_URL", url);
        e
    }

    #[test]
    fn http_target_off_loopback_is_refused() {
        for url in [
            "http://pve.example.lan:8006",
            "http://192.168.1.10:8006",
            "http://127.0.0.1.example.com:8006",
            "http://localhost.example.com:8006",
            "http://[fe80::1]:8006",
        ] {
            let err = resolve(None, None, &env_of(&env_with_url(url))).unwrap_err();
            let msg = format!("{err:#}");
            assert!(
                msg.contains(url) && msg.contains("https://") && msg.contains("loopback"),
                "{url}: {msg}"
            );
        }
    }

    #[test]
    fn http_target_on_loopback_is_accepted() {
        for url in [
            "http://127.0.0.1:8006",
            "http://127.3.2.1:8006",
            "http://[::1]:8006",
            "http://localhost:8006",
            "HTTP://LocalHost:8006/",
        ] {
            let t = resolve(None, None, &env_of(&env_with_url(url)));
            assert!(t.is_ok(), "{url}: {:#}", t.unwrap_err());
        }
    }

    #[test]
    fn https_target_anywhere_is_accepted() {
        let t = resolve(
            None,
            None,
            &env_of(&env_with_url("https://pve.example.lan:8006")),
        );
        assert!(t.is_ok(), "{:#}", t.unwrap_err());
    }

    #[test]
    fn fingerprints_accept_colon_form() {
        let fp = "AB:".repeat(31) + "AB";
        assert_eq!(parse_fingerprint(&fp).unwrap(), [0xAB; 32]);
        assert!(parse_fingerprint("AB:CD").is_err());
    }
}
