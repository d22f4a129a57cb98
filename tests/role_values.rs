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
peers = [\"192.0.2.12\"]
backends = [{ name = \"s1\", address = \"192.0.2.21\" }]
";

const SERVER: &str = "name = \"k3s-1\"
generation = 1
node_ip = \"10.0.2.15\"
vip = \"10.0.2.100\"
token = \"K10token\"
service_account_issuer = \"https://oidc.kiln.test\"
service_account_key = \"-----BEGIN PUBLIC KEY-----\\nTUlJQmtpbG4=\\n-----END PUBLIC KEY-----\\n\"
service_account_signing_key = \"-----BEGIN PRIVATE KEY-----\\nTUlJRWtpbG4=\\n-----END PRIVATE KEY-----\\n\"
";

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
    ("recipes/k3s-node.toml", "server-init", SERVER),
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
            r#"["192.0.2.12\n          192.0.2.66"]"#,
            "peers[0]",
        ),
        ("peers", "[]", "peers"),
        (
            "backends",
            r#"[{ name = "s1", address = "192.0.2.21:6443\n        server evil 203.0.113.66" }]"#,
            "backends[0].address",
        ),
        (
            "backends",
            r#"[{ name = "s1 backup", address = "192.0.2.21" }]"#,
            "backends[0].name",
        ),
        (
            "backends",
            r#"[{ name = "s1", address = "192.0.2.21", port = 0 }]"#,
            "backends[0].port",
        ),
        (
            "backends",
            r#"[{ name = "s1", address = "192.0.2.21", weight = 5 }]"#,
            "backends[0].weight",
        ),
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
        let (_, doc) = rendered(&d, role, &with(SERVER, "tls_san", sans).0);
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
    let (values, _) = with(SERVER, "vip", r#""fd00::10""#);
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
        ("peers", r#"["fd00::12"]"#),
        ("backends", r#"[{ name = "s1", address = "fd00::21" }]"#),
    ] {
        values = with(&values, k, v).0;
    }
    let (_, doc) = rendered(&d, "lb", &values);
    let haproxy = file(&doc, "/etc/haproxy/haproxy.cfg");
    assert!(
        haproxy.contains("\n  server s1 [fd00::21]:6443 check"),
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
