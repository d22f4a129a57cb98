//! Per-node values of every shipped role (recipes/roles/*.tera): typed and
//! checked before rendering, then quoted for their target format, so a
//! hostile value is refused naming itself and its values-file line, and a
//! value that merely looks like YAML or holds an IPv6 address renders as
//! inert text. Render-time only: `kiln cloud-init render` on the real recipes.

mod common;
use common::*;

use std::path::{Path, PathBuf};

const LB: &str = "hostname = \"lb-1\"
node_ip = \"192.0.2.11\"
vip = \"192.0.2.100\"
priority = 150
peers = [{ name = \"lb-1\", addresses = [\"192.0.2.11\"] }, { name = \"lb-2\", addresses = [\"192.0.2.12\"] }]
backends = [{ name = \"s1\", addresses = [\"192.0.2.21\"] }]
";

/// A server's values (a macro, so that server-init's can extend them).
macro_rules! server_values {
    () => {
        "name = \"k3s-1\"
generation = 1
node_ip = \"10.0.2.15\"
vip = \"10.0.2.100\"
token = \"K10token\"
service_account_issuer = \"https://oidc.kiln.test\"
service_account_key = \"-----BEGIN PUBLIC KEY-----\\nTUlJQmtpbG4=\\n-----END PUBLIC KEY-----\\n\"
service_account_signing_key = \"-----BEGIN PRIVATE KEY-----\\nTUlJRWtpbG4=\\n-----END PRIVATE KEY-----\\n\"
"
    };
}

const SERVER: &str = server_values!();

/// server-init's values: a server's, saying that it starts a new cluster.
const SERVER_INIT: &str = concat!(server_values!(), "new_cluster = true\n");

const AGENT: &str = "name = \"k3s-1\"
generation = 1
node_ip = \"10.0.2.15\"
vip = \"10.0.2.100\"
token = \"K10token\"
";

const TINY: &str = "hostname = \"tiny-1\"\n";

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";

/// (recipe, role, the role's benign values)
const ROLES: &[(&str, &str, &str)] = &[
    ("recipes/lb.toml", "lb", LB),
    ("recipes/k3s-node.toml", "server-init", SERVER_INIT),
    ("recipes/k3s-node.toml", "server-join", SERVER),
    ("recipes/k3s-node.toml", "agent", AGENT),
    ("recipes/tiny.toml", "node", TINY),
];

fn base_of(role: &str) -> (&'static str, &'static str) {
    let (recipe, _, base) = ROLES.iter().find(|(_, r, _)| *r == role).unwrap();
    (recipe, base)
}

/// `base` with `key = literal`: its line replaced, or appended. Returns the
/// text and the 1-based line `key` is on.
fn with(base: &str, key: &str, literal: &str) -> (String, usize) {
    let mut lines: Vec<String> = base.lines().map(str::to_string).collect();
    let new = format!("{key} = {literal}");
    let at = match lines
        .iter()
        .position(|l| l.starts_with(&format!("{key} = ")))
    {
        Some(i) => {
            lines[i] = new;
            i
        }
        None => {
            lines.push(new);
            lines.len() - 1
        }
    };
    (lines.join("\n") + "\n", at + 1)
}

/// `kiln cloud-init render` of `role` with `values` written to DIR/node.toml
/// (run in DIR, so errors name `node.toml`).
fn render(dir: &Path, role: &str, values: &str) -> std::process::Output {
    let (recipe, _) = base_of(role);
    std::fs::write(dir.join("node.toml"), values).unwrap();
    let recipe = repo().join(recipe);
    kiln(
        dir,
        &dir.join("cache"),
        &[
            "cloud-init",
            "render",
            "--recipe",
            &recipe.to_string_lossy(),
            "--role",
            role,
            "--values",
            "node.toml",
        ],
    )
}

/// (key, TOML literal, the value the error must name)
type Cases<'a> = &'a [(&'a str, &'a str, &'a str)];

fn dir(name: &str) -> PathBuf {
    scratch(&format!("role-values-{name}"))
}

/// Rendered user-data as JSON (it must be valid YAML).
fn yaml(text: &str) -> serde_json::Value {
    let v: serde_yaml::Value = serde_yaml::from_str(text)
        .unwrap_or_else(|e| panic!("user-data is not valid YAML ({e}):\n{text}"));
    serde_json::to_value(v).unwrap()
}

fn rendered(dir: &Path, role: &str, values: &str) -> (String, serde_json::Value) {
    let out = stdout(&ok(render(dir, role, values)));
    let doc = yaml(&out);
    (out, doc)
}

/// The content of a file the user-data writes.
fn file(doc: &serde_json::Value, path: &str) -> String {
    doc["write_files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == path)
        .unwrap_or_else(|| panic!("{path} not written: {doc}"))["content"]
        .as_str()
        .unwrap()
        .to_string()
}

/// K3s's config.yaml as written by a server or agent role (YAML in YAML).
fn k3s_config(doc: &serde_json::Value) -> serde_json::Value {
    yaml(&file(doc, "/etc/rancher/k3s/config.yaml"))
}

#[test]
fn hostile_values_are_refused_naming_the_value_and_its_line_in_every_role() {
    let d = dir("hostile");
    let lb: Cases = &[
        ("node_ip", r#""192.0.2.11\n  - path: /etc/evil""#, "node_ip"),
        ("vip", r#""192.0.2.100/24""#, "vip"),
        ("hostname", r#""lb-1\nruncmd: [reboot]""#, "hostname"),
        ("hostname", r#""lb 1""#, "hostname"),
        ("priority", "255", "priority"),
        ("priority", r#""150""#, "priority"),
        (
            "peers",
            r#"[{ name = "lb-1", addresses = ["192.0.2.11", "192.0.2.12\n          192.0.2.66"] }]"#,
            "peers[0].addresses[1]",
        ),
        ("peers", "[]", "peers"),
        (
            "peers",
            r#"[{ name = "lb-1", addresses = [] }]"#,
            "peers[0].addresses",
        ),
        // The pre-pool shape: a list of addresses.
        ("peers", r#"["192.0.2.12"]"#, "peers[0]"),
        (
            "backends",
            r#"[{ name = "s1", addresses = ["192.0.2.21:6443\n        server evil 203.0.113.66"] }]"#,
            "backends[0].addresses[0]",
        ),
        (
            "backends",
            r#"[{ name = "s1 backup", addresses = ["192.0.2.21"] }]"#,
            "backends[0].name",
        ),
        (
            "backends",
            r#"[{ name = "s1", addresses = ["192.0.2.21"], port = 0 }]"#,
            "backends[0].port",
        ),
        (
            "backends",
            r#"[{ name = "s1", addresses = ["192.0.2.21"], weight = 5 }]"#,
            "backends[0].weight",
        ),
        // The pre-pool shape: one `address` per server.
        (
            "backends",
            r#"[{ name = "s1", address = "192.0.2.21" }]"#,
            "backends[0].address",
        ),
        (
            "ntp_servers",
            r#"["ntp.example.com\nNTP=evil.example.com"]"#,
            "ntp_servers[0]",
        ),
        ("ntp_servers", r#"["*.pool.ntp.org"]"#, "ntp_servers[0]"),
        ("interface", r#""eth0 }\nvrrp_instance x {""#, "interface"),
        ("vip_prefix", "129", "vip_prefix"),
        ("virtual_router_id", "256", "virtual_router_id"),
        ("api_port", "65536", "api_port"),
        ("api_port", r#""6443""#, "api_port"),
        (
            "ssh_authorized_keys",
            &format!(r#"["{KEY}\nruncmd: [reboot]"]"#),
            "ssh_authorized_keys[0]",
        ),
        ("prority", "100", "prority"),
    ];
    let server: Cases = &[
        ("name", r#""k3s-1\nruncmd: [reboot]""#, "name"),
        ("name", r#""K3S_1""#, "name"),
        ("generation", r#""1""#, "generation"),
        ("generation", "-1", "generation"),
        (
            "node_ip",
            r#""10.0.2.15\n      cluster-init: true""#,
            "node_ip",
        ),
        ("vip", r#""10.0.2.100\n  - path: /etc/evil""#, "vip"),
        ("token", r#""K10token\n      cluster-init: true""#, "token"),
        ("token", r#""K10token with space""#, "token"),
        (
            "service_account_issuer",
            r#""https://oidc.kiln.test\n        - --anonymous-auth=true""#,
            "service_account_issuer",
        ),
        (
            "service_account_issuer",
            r#""http://oidc.kiln.test""#,
            "service_account_issuer",
        ),
        ("service_account_key", r#""not pem""#, "service_account_key"),
        (
            "service_account_signing_key",
            r#""-----BEGIN PRIVATE KEY-----\nTUlJRWtpbG4=\n-----END PRIVATE KEY-----\n  - path: /etc/evil""#,
            "service_account_signing_key",
        ),
        (
            "tls_san",
            r#"["k8s.example.com\n        - evil"]"#,
            "tls_san[0]",
        ),
        ("tls_san", r#"["*.*.example.com"]"#, "tls_san[0]"),
        (
            "validation_only_k3s_generated_keys",
            r#""yes""#,
            "validation_only_k3s_generated_keys",
        ),
        ("api_port", "0", "api_port"),
        ("cluster_init", "true", "cluster_init"),
        ("new_cluster", r#""yes""#, "new_cluster"),
        ("cilium_operator_replicas", "0", "cilium_operator_replicas"),
        ("ntp_servers", r#"["ntp 1"]"#, "ntp_servers[0]"),
    ];
    let agent: Cases = &[
        ("name", r#""k3s-1\nruncmd: [reboot]""#, "name"),
        ("generation", "1.5", "generation"),
        (
            "node_ip",
            r#""10.0.2.15\nserver: https://203.0.113.66:6443""#,
            "node_ip",
        ),
        ("vip", r#""fd00::10]:6443""#, "vip"),
        (
            "token",
            r#""K10token\nserver: https://203.0.113.66:6443""#,
            "token",
        ),
        ("api_port", "70000", "api_port"),
        (
            "ntp_servers",
            r#"["ntp.example.com NTP=x"]"#,
            "ntp_servers[0]",
        ),
        (
            "service_account_issuer",
            r#""https://oidc.kiln.test""#,
            "service_account_issuer",
        ),
    ];
    let tiny: Cases = &[
        ("hostname", r#""tiny-1\nruncmd: [reboot]""#, "hostname"),
        ("fqdn", r#""tiny.example.com""#, "fqdn"),
    ];
    let table: &[(&str, Cases)] = &[
        ("lb", lb),
        ("server-init", server),
        ("server-join", server),
        ("agent", agent),
        ("node", tiny),
    ];
    for (role, cases) in table {
        let (_, base) = base_of(role);
        for (key, literal, named) in *cases {
            let (values, line) = with(base, key, literal);
            let out = render(&d, role, &values);
            assert!(
                !out.status.success(),
                "{role}: {key} = {literal} was rendered:\n{}",
                stdout(&out)
            );
            let err = stderr(&out);
            assert_eq!(err.trim_end().lines().count(), 1, "{role}: one line: {err}");
            assert!(
                err.contains(&format!("node.toml:{line}:")) && err.contains(&format!("`{named}`")),
                "{role}: {key} = {literal}: error should name `{named}` at node.toml:{line}: {err}"
            );
            assert!(
                !err.contains("K10token"),
                "{role}: the token is shown: {err}"
            );
        }
    }
}

#[test]
fn missing_values_are_named_for_every_role() {
    let d = dir("missing");
    for (_, role, base) in ROLES {
        let first = base.lines().next().unwrap();
        let key = first.split(" = ").next().unwrap();
        let out = render(&d, role, &base.replacen(first, "", 1));
        assert!(!out.status.success(), "{role} rendered without {key}");
        let err = stderr(&out);
        assert!(
            err.contains("node.toml: missing value") && err.contains(&format!("`{key}`")),
            "{role}: {err}"
        );
    }
}

#[test]
fn benign_values_render_valid_yaml_for_every_role() {
    let d = dir("benign");
    for (_, role, base) in ROLES {
        let (_, doc) = rendered(&d, role, base);
        assert!(doc["hostname"].is_string(), "{role}: {doc}");
        if role.starts_with("server") || *role == "agent" {
            let config = k3s_config(&doc);
            assert_eq!(config["node-name"], "k3s-1-g1", "{role}");
            assert_eq!(config["token"], "K10token", "{role}");
        }
    }
}

#[test]
fn values_that_look_like_yaml_render_as_the_same_strings() {
    let d = dir("lookalike");
    // A YAML 1.1 boolean as an LB's host name.
    let (out, doc) = rendered(&d, "lb", &with(LB, "hostname", r#""on""#).0);
    assert_eq!(doc["hostname"], "on");
    assert!(out.contains("router_id on\n"), "{out}");
    let (_, doc) = rendered(&d, "node", &with(TINY, "hostname", r#""yes""#).0);
    assert_eq!(doc["hostname"], "yes");
    assert_eq!(file(&doc, "/etc/kiln-node"), "tiny 0.1.0 yes\n");
    // A wildcard SAN (a YAML alias unquoted) and more lookalikes.
    let sans = r#"["*.k8s.example.com", "on", "null", "k8s.example.com"]"#;
    for role in ["server-init", "server-join"] {
        let (_, doc) = rendered(&d, role, &with(base_of(role).1, "tls_san", sans).0);
        assert_eq!(
            k3s_config(&doc)["tls-san"],
            serde_json::json!([
                "10.0.2.100",
                "*.k8s.example.com",
                "on",
                "null",
                "k8s.example.com"
            ]),
            "{role}"
        );
    }
    // A token and a key comment full of YAML syntax.
    let token = r#"K10ab::server:p@ss#w"rd'\*&!%"#;
    let key = format!("{KEY} admin: #1 & *x");
    let (values, _) = with(AGENT, "token", &format!("{token:?}"));
    let (values, _) = with(&values, "ssh_authorized_keys", &format!("[{key:?}]"));
    let (_, doc) = rendered(&d, "agent", &values);
    assert_eq!(k3s_config(&doc)["token"], token);
    assert_eq!(doc["ssh_authorized_keys"], serde_json::json!([key]));
}

#[test]
fn an_ipv6_vip_is_bracketed_in_the_k3s_server_url() {
    let d = dir("ipv6-k3s");
    for role in ["server-join", "agent"] {
        let (_, doc) = rendered(&d, role, &with(base_of(role).1, "vip", r#""fd00::10""#).0);
        assert_eq!(
            k3s_config(&doc)["server"],
            "https://[fd00::10]:6443",
            "{role}"
        );
    }
    let (values, _) = with(SERVER_INIT, "vip", r#""fd00::10""#);
    let (values, _) = with(&values, "api_port", "7443");
    let (_, doc) = rendered(&d, "server-init", &values);
    assert_eq!(k3s_config(&doc)["tls-san"][0], "fd00::10");
    let cilium = yaml(&file(&doc, "/etc/rancher/k3s/kiln-cilium-values.yaml"));
    assert_eq!(cilium["k8sServiceHost"], "fd00::10");
    assert_eq!(cilium["k8sServicePort"], 7443);
}

#[test]
fn ipv6_lb_addresses_are_plain_words_and_bracketed_before_a_port() {
    let d = dir("ipv6-lb");
    let mut values = LB.to_string();
    for (k, v) in [
        ("node_ip", r#""fd00::11""#),
        ("vip", r#""fd00::10""#),
        ("vip_prefix", "64"),
        (
            "peers",
            r#"[{ name = "lb-1", addresses = ["fd00::11"] }, { name = "lb-2", addresses = ["fd00::12"] }]"#,
        ),
        ("backends", r#"[{ name = "s1", addresses = ["fd00::21"] }]"#),
    ] {
        values = with(&values, k, v).0;
    }
    let (_, doc) = rendered(&d, "lb", &values);
    let haproxy = file(&doc, "/etc/haproxy/haproxy.cfg");
    assert!(
        haproxy.contains("\n  server s1_fd00::21 [fd00::21]:6443 check\n"),
        "{haproxy}"
    );
    let keepalived = file(&doc, "/etc/keepalived/keepalived.conf");
    for line in [
        "unicast_src_ip fd00::11",
        "fd00::12",
        "fd00::10/64 dev eth0",
    ] {
        assert!(
            keepalived.lines().any(|l| l.trim() == line),
            "`{line}` missing:\n{keepalived}"
        );
    }
}

#[test]
fn an_ipv4_vip_with_an_ipv6_prefix_length_is_refused() {
    let d = dir("prefix");
    let out = render(&d, "lb", &with(LB, "vip_prefix", "64").0);
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(stderr(&out).contains("vip_prefix"), "{}", stderr(&out));
}

#[test]
fn a_k3s_node_name_too_long_for_a_host_name_is_refused() {
    let d = dir("long-name");
    let name = format!("{:?}", "a".repeat(62));
    for role in ["server-join", "agent"] {
        let out = render(&d, role, &with(base_of(role).1, "name", &name).0);
        assert!(!out.status.success(), "{role}: {}", stdout(&out));
        assert!(stderr(&out).contains("`name`"), "{role}: {}", stderr(&out));
    }
}

#[test]
fn a_json_values_file_is_checked_too() {
    let d = dir("json");
    std::fs::write(
        d.join("node.json"),
        r#"{"hostname": "tiny-1\nruncmd: [reboot]"}"#,
    )
    .unwrap();
    let out = kiln(
        &d,
        &d.join("cache"),
        &[
            "cloud-init",
            "render",
            "--recipe",
            &repo().join("recipes/tiny.toml").to_string_lossy(),
            "--role",
            "node",
            "--values",
            "node.json",
        ],
    );
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("node.json: value `hostname`"),
        "{}",
        stderr(&out)
    );
}

/// Every `{{ ... }}` of a shipped role template ends in a quoting filter, so
/// no value reaches user-data unquoted (`throw(...)` renders nothing).
#[test]
fn every_role_template_interpolation_ends_in_a_quoting_filter() {
    let re = regex::Regex::new(r"(?s)\{\{-?(.*?)-?\}\}").unwrap();
    let mut templates = 0;
    for e in std::fs::read_dir(repo().join("recipes/roles")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "tera") {
            continue;
        }
        templates += 1;
        let text = std::fs::read_to_string(&p).unwrap();
        for c in re.captures_iter(&text) {
            let expr = c[1].trim();
            if expr.starts_with("throw(") {
                continue;
            }
            let last = expr.rsplit('|').next().unwrap().trim();
            assert!(
                expr.contains('|') && kiln::image::values::QUOTING_FILTERS.contains(&last),
                "{}: `{{{{ {expr} }}}}` does not end in one of {:?}",
                p.display(),
                kiln::image::values::QUOTING_FILTERS
            );
        }
    }
    assert!(templates >= 4, "found {templates} templates");
}

#[test]
fn the_lb_health_check_probes_the_port_the_frontend_binds() {
    let d = dir("api-port");
    for (port, values) in [
        (6443, LB.to_string()),
        (7443, with(LB, "api_port", "7443").0),
    ] {
        let (_, doc) = rendered(&d, "lb", &values);
        let haproxy = file(&doc, "/etc/haproxy/haproxy.cfg");
        assert!(
            haproxy.contains(&format!("\n  bind *:{port}\n")),
            "{haproxy}"
        );
        let keepalived = file(&doc, "/etc/keepalived/keepalived.conf");
        assert!(
            keepalived.contains(&format!(
                "script \"/usr/local/libexec/kiln/check-haproxy {port}\""
            )),
            "{keepalived}"
        );
    }
}

/// The baked check script itself: it succeeds when its port accepts, fails
/// when it does not, whatever 6443 does (systemctl is a stand-in here).
#[test]
fn the_check_haproxy_script_connects_to_the_port_it_is_given() {
    let d = dir("check-script");
    let bin = d.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let stub = bin.join("systemctl");
    std::fs::write(&stub, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&stub, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let script = repo().join("overlays/lb/usr/local/libexec/kiln/check-haproxy");
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let run = |args: &[&str]| {
        std::process::Command::new("sh")
            .arg(&script)
            .args(args)
            .env("PATH", &path)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .code()
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let open = listener.local_addr().unwrap().port();
    assert_ne!(open, 6443);
    assert_eq!(run(&[&open.to_string()]), Some(0), "port {open} accepts");
    drop(listener);
    assert_ne!(run(&[&open.to_string()]), Some(0), "port {open} is closed");
    assert_eq!(run(&[]), Some(2), "no port given");
    assert_eq!(run(&["6443; reboot"]), Some(2), "not a port");
}

// ---------------------------------------------------------------------------
// LB address pools: every node slot lists the addresses its replacements
// take, so replacing a server or an LB changes no LB's configuration.

/// One LB's values in a three-LB, three-server topology where every slot has
/// a pool of two addresses (the second for its replacement).
fn pooled_lb(hostname: &str, node_ip: &str) -> String {
    format!(
        "hostname = \"{hostname}\"
node_ip = \"{node_ip}\"
vip = \"192.0.2.100\"
priority = 150
peers = [{{ name = \"lb-1\", addresses = [\"192.0.2.11\", \"192.0.2.21\"] }}, {{ name = \"lb-2\", addresses = [\"192.0.2.12\", \"192.0.2.22\"] }}, {{ name = \"lb-3\", addresses = [\"192.0.2.13\", \"192.0.2.23\"] }}]
backends = [{{ name = \"server-1\", addresses = [\"192.0.2.31\", \"192.0.2.41\"] }}, {{ name = \"server-2\", addresses = [\"192.0.2.32\", \"192.0.2.42\"] }}, {{ name = \"server-3\", addresses = [\"192.0.2.33\"], port = 7443 }}]
"
    )
}

/// The lines of a `{ ... }` block of keepalived.conf, trimmed.
fn keepalived_block(conf: &str, block: &str) -> Vec<String> {
    conf.lines()
        .map(str::trim)
        .skip_while(|l| *l != format!("{block} {{"))
        .skip(1)
        .take_while(|l| *l != "}")
        .map(str::to_string)
        .collect()
}

#[test]
fn lb_backends_are_every_pool_address_checked_over_tls_for_a_serving_api() {
    let d = dir("pool-backends");
    let (_, doc) = rendered(&d, "lb", &pooled_lb("lb-1", "192.0.2.11"));
    let haproxy = file(&doc, "/etc/haproxy/haproxy.cfg");
    let lines: Vec<&str> = haproxy.lines().map(str::trim).collect();
    let servers: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("server "))
        .collect();
    // The replacements' addresses (.41, .42) are backends already.
    assert_eq!(
        servers,
        [
            "server server-1_192.0.2.31 192.0.2.31:6443 check",
            "server server-1_192.0.2.41 192.0.2.41:6443 check",
            "server server-2_192.0.2.32 192.0.2.32:6443 check",
            "server server-2_192.0.2.42 192.0.2.42:6443 check",
            "server server-3_192.0.2.33 192.0.2.33:7443 check",
        ],
        "{haproxy}"
    );
    // A listening port is not enough: the check completes a TLS handshake
    // and wants /readyz answered 200 or 401 (K3s says 503 until its API
    // server runs).
    for line in [
        "option tcp-check",
        "tcp-check connect ssl",
        r#"tcp-check send "GET /readyz HTTP/1.0\r\n\r\n""#,
        r"tcp-check expect rstring '^HTTP/1\.[01] (200|401) '",
        "default-server verify none inter 2s fall 3 rise 2",
    ] {
        assert!(lines.contains(&line), "`{line}` missing:\n{haproxy}");
    }
    assert!(
        !lines.contains(&"tcp-check connect"),
        "a plain TCP connect check:\n{haproxy}"
    );
}

#[test]
fn lb_unicast_peers_are_every_pool_address_but_the_nodes_own() {
    let d = dir("pool-peers");
    for (host, ip, peers) in [
        (
            "lb-2",
            "192.0.2.12",
            [
                "192.0.2.11",
                "192.0.2.21",
                "192.0.2.22",
                "192.0.2.13",
                "192.0.2.23",
            ],
        ),
        // lb-1's replacement takes the next address of lb-1's pool; the old
        // lb-1 (.11) is its peer while both run.
        (
            "lb-1",
            "192.0.2.21",
            [
                "192.0.2.11",
                "192.0.2.12",
                "192.0.2.22",
                "192.0.2.13",
                "192.0.2.23",
            ],
        ),
    ] {
        let (_, doc) = rendered(&d, "lb", &pooled_lb(host, ip));
        let conf = file(&doc, "/etc/keepalived/keepalived.conf");
        assert_eq!(keepalived_block(&conf, "unicast_peer"), peers, "{conf}");
        let instance = keepalived_block(&conf, "vrrp_instance k3s_api");
        for line in ["state BACKUP", "nopreempt", &format!("unicast_src_ip {ip}")] {
            assert!(instance.iter().any(|l| l == line), "`{line}`:\n{conf}");
        }
        // Every LB renders the same pools: a replacement changes no other LB.
        let haproxy = file(&doc, "/etc/haproxy/haproxy.cfg");
        assert!(haproxy.contains("server server-1_192.0.2.41 "), "{haproxy}");
    }
}

#[test]
fn an_lb_address_outside_the_pools_or_listed_twice_is_refused() {
    let d = dir("pool-bad");
    let base = pooled_lb("lb-1", "192.0.2.11");
    for (values, needles) in [
        // Its peers would not send this node adverts: two masters.
        (
            pooled_lb("lb-9", "192.0.2.99"),
            &["`node_ip` 192.0.2.99 is in no `peers` pool"][..],
        ),
        (
            with(
                &base,
                "peers",
                r#"[{ name = "lb-1", addresses = ["192.0.2.11"] }, { name = "lb-2", addresses = ["192.0.2.12", "192.0.2.11"] }]"#,
            )
            .0,
            &["`peers`", "192.0.2.11 is listed twice"],
        ),
        (
            with(
                &base,
                "backends",
                r#"[{ name = "s1", addresses = ["192.0.2.31"] }, { name = "s2", addresses = ["192.0.2.31"] }]"#,
            )
            .0,
            &["`backends`", "192.0.2.31 is listed twice"],
        ),
        (
            with(
                &base,
                "peers",
                r#"[{ name = "lb-1", addresses = ["192.0.2.11"] }]"#,
            )
            .0,
            &["`peers` lists no address but node_ip"],
        ),
    ] {
        let out = render(&d, "lb", &values);
        assert!(!out.status.success(), "rendered:\n{}", stdout(&out));
        let err = stderr(&out);
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        for n in needles {
            assert!(err.contains(n), "{n:?} not in {err}");
        }
    }
}

// ---------------------------------------------------------------------------
// K3s servers.

#[test]
fn server_init_renders_only_for_a_new_cluster_and_replacements_join_through_the_vip() {
    let d = dir("server-init");
    // Without `new_cluster = true` (server 1's values reused for its
    // replacement, say), server-init would bootstrap a second cluster.
    for values in [SERVER, &with(SERVER_INIT, "new_cluster", "false").0] {
        let out = render(&d, "server-init", values);
        assert!(!out.status.success(), "rendered:\n{}", stdout(&out));
        let err = stderr(&out);
        assert!(
            err.contains("`new_cluster = true`") && err.contains("server-join"),
            "{err}"
        );
    }
    let (_, doc) = rendered(&d, "server-init", SERVER_INIT);
    let config = k3s_config(&doc);
    assert_eq!(config["cluster-init"], true);
    assert!(config.get("server").is_none(), "{config}");
    // Server 1's replacement: its values with the next generation, as
    // server-join, registering through the VIP.
    let (values, _) = with(SERVER, "generation", "2");
    let (_, doc) = rendered(&d, "server-join", &values);
    let config = k3s_config(&doc);
    assert_eq!(config["server"], "https://10.0.2.100:6443");
    assert_eq!(config["node-name"], "k3s-1-g2");
    assert!(config.get("cluster-init").is_none(), "{config}");
    // A joining server that says it starts a new cluster is refused.
    let out = render(&d, "server-join", SERVER_INIT);
    assert!(!out.status.success(), "rendered:\n{}", stdout(&out));
    assert!(
        stderr(&out).contains("`new_cluster = true`"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn servers_give_the_controller_manager_the_deploy_time_signing_key() {
    let d = dir("sa-keys");
    for role in ["server-init", "server-join"] {
        let (_, doc) = rendered(&d, role, base_of(role).1);
        let config = k3s_config(&doc);
        assert_eq!(
            config["kube-controller-manager-arg"],
            serde_json::json!([
                "service-account-private-key-file=/etc/rancher/k3s/service-account.key"
            ]),
            "{role}: {config}"
        );
        assert!(
            config["kube-apiserver-arg"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a
                    == "service-account-signing-key-file=/etc/rancher/k3s/service-account.key"),
            "{role}: {config}"
        );
        assert!(file(&doc, "/etc/rancher/k3s/service-account.key").contains("TUlJRWtpbG4="));
    }
}

#[test]
fn cilium_operator_replicas_reach_the_cilium_values_of_server_init_only() {
    let d = dir("operator-replicas");
    let (values, _) = with(SERVER_INIT, "cilium_operator_replicas", "1");
    let (_, doc) = rendered(&d, "server-init", &values);
    let cilium = yaml(&file(&doc, "/etc/rancher/k3s/kiln-cilium-values.yaml"));
    assert_eq!(cilium["operator"]["replicas"], 1, "{cilium}");
    // Without it, the chart's default stands.
    let (_, doc) = rendered(&d, "server-init", SERVER_INIT);
    let cilium = yaml(&file(&doc, "/etc/rancher/k3s/kiln-cilium-values.yaml"));
    assert!(cilium.get("operator").is_none(), "{cilium}");
    let out = render(
        &d,
        "server-join",
        &with(SERVER, "cilium_operator_replicas", "1").0,
    );
    assert!(!out.status.success(), "rendered:\n{}", stdout(&out));
    assert!(
        stderr(&out).contains("`cilium_operator_replicas`"),
        "{}",
        stderr(&out)
    );
}

// ---------------------------------------------------------------------------
// Time.

#[test]
fn every_node_role_configures_timesyncd_with_the_debian_pool_or_its_own_servers() {
    let d = dir("ntp");
    for (_, role, base) in ROLES.iter().filter(|(_, r, _)| *r != "node") {
        for (values, expected) in [
            (
                base.to_string(),
                "NTP=0.debian.pool.ntp.org 1.debian.pool.ntp.org 2.debian.pool.ntp.org 3.debian.pool.ntp.org",
            ),
            (
                with(base, "ntp_servers", r#"["192.0.2.123", "ntp.example.com"]"#).0,
                "NTP=192.0.2.123 ntp.example.com",
            ),
        ] {
            let (_, doc) = rendered(&d, role, &values);
            let conf = file(&doc, "/etc/systemd/timesyncd.conf.d/50-kiln.conf");
            let lines: Vec<&str> = conf.lines().collect();
            assert!(
                lines.contains(&"[Time]") && lines.contains(&expected),
                "{role}: {conf}"
            );
            // timesyncd started before cloud-init wrote its configuration.
            assert!(
                doc["runcmd"]
                    .as_array()
                    .unwrap()
                    .contains(&serde_json::json!(["systemctl", "restart", "systemd-timesyncd"])),
                "{role}: {doc}"
            );
        }
    }
}
