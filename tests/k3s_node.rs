//! The K3s node image end to end, with real parts where they exist here:
//! a test recipe extending the real `base.toml` with the real `k3s` overlay
//! and role templates, images built with umoci and served by Debian's
//! `docker-registry` on loopback, `kiln lock` + `kiln build` for real
//! (mmdebstrap, mkfs.ext4), Debian's containerd importing the baked archives,
//! on the host and inside the image booted once by `kiln validate` (TCG).
//!
//! STAND-INS: K3s cannot be downloaded here, so the recipe's `k3s` artifact
//! is a tiny shell script (served by a loopback HTTP server, sha256 pinned in
//! the recipe), and the Cilium images are small umoci-built images.
//! The shipped recipes/k3s-node.toml names the real upstream URLs instead.

mod common;
mod oci_support;

use common::*;
use oci_support::containerd::{is_root, Containerd};
use oci_support::{have_tools, Faults, Proxy, Registry, REGISTRY_TOOLS};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The K3s STAND-IN: a shell script in place of the K3s binary (tests only).
/// `k3s server|agent` records its arguments and stays up, as K3s would.
const K3S_STANDIN: &[u8] = b"#!/bin/sh
# STAND-IN for the K3s binary in kiln's tests; the real one cannot be downloaded here.
case \"$1\" in
server|agent) echo \"$*\" > /run/kiln-k3s-standin; exec sleep infinity ;;
*) echo \"k3s stand-in: $*\" ;;
esac
";

/// A test-only overlay: the stand-in cannot speak sd_notify like K3s, so its
/// units run as Type=simple.
fn write_standin_overlay(project: &Path) {
    for unit in ["k3s.service", "k3s-agent.service"] {
        let d = project.join(format!("overlays/k3s-standin/etc/systemd/system/{unit}.d"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("standin.conf"),
            "# kiln tests: the K3s STAND-IN does not notify systemd.\n[Service]\nType=simple\n",
        )
        .unwrap();
    }
}

/// Secrets the tests render into user-data; none may be in the image.
const TOKEN: &str = "K10kiln-test-token-9f8e7d6c5b4a";
const SA_KEY_BODY: &str = "MIIEkilnTESTprivateSIGNINGkeyBODYdoNOTship00";
const SA_PUB_BODY: &str = "MIIBkilnTESTpublicKEYbodyONLYinUSERdata0";

fn tools_ok(test: &str) -> bool {
    if !have_tools(test, REGISTRY_TOOLS)
        || !have_tools(
            test,
            &[
                ("mmdebstrap", "mmdebstrap"),
                ("debugfs", "e2fsprogs"),
                ("containerd", "containerd"),
            ],
        )
    {
        return false;
    }
    if !is_root() {
        eprintln!("SKIPPED {test}: building images and running containerd need root");
        return false;
    }
    true
}

/// A loopback HTTP server for artifacts (one file, GET only), alive for the
/// whole test process; it is a thread, so nothing outlives the tests.
fn artifact_server() -> u16 {
    static PORT: OnceLock<u16> = OnceLock::new();
    *PORT.get_or_init(|| {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                let _ = reader.read_line(&mut line);
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                        break;
                    }
                }
                let mut conn = conn;
                let resp = if line.starts_with("GET /k3s ") {
                    let mut r = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        K3S_STANDIN.len()
                    )
                    .into_bytes();
                    r.extend_from_slice(K3S_STANDIN);
                    r
                } else {
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .to_vec()
                };
                let _ = conn.write_all(&resp);
            }
        });
        port
    })
}

/// The test recipe: the real base and `k3s` overlay and roles, the K3s
/// stand-in, Debian's containerd (to prove the archives import), `images`.
fn test_recipe(images: &[String], disk_size: &str) -> String {
    let list: Vec<String> = images.iter().map(|i| format!("  \"{i}\",")).collect();
    format!(
        r#"# TEST recipe for tests/k3s_node.rs: the K3s artifact is a STAND-IN script.
extends = "base.toml"
name = "k3s-test"
version = "0.1.0"
overlays = ["k3s", "k3s-standin"]
images = [
{list}
]

[base]
packages = ["containerd", "conntrack", "iptables", "kmod"]

[vars]
cilium_version = "0.0.0-standin"
cluster_cidr = "10.42.0.0/16"

[[artifacts]]
name = "k3s"
url = "http://127.0.0.1:{port}/k3s"
sha256 = "{sha}"
dest = "/usr/local/bin/k3s"
mode = "0755"

[units]
enable = ["k3s.service", "k3s-agent.service", "kiln-cilium-install.service"]

[disk]
size = "{disk_size}"

[roles.server-init]
user_data = "roles/k3s-server.yaml.tera"
value_types = "roles/k3s-server.types.toml"

[roles.server-join]
user_data = "roles/k3s-server.yaml.tera"
value_types = "roles/k3s-server.types.toml"

[roles.agent]
user_data = "roles/k3s-agent.yaml.tera"
value_types = "roles/k3s-agent.types.toml"

[roles.agent.test_values]
name = "k3s-test-agent"
generation = 1
node_ip = "10.0.2.15"
vip = "10.0.2.100"
token = "validate-only-token"

[validate]
role = "agent"

[[checks]]
name = "the agent role starts k3s-agent, not the server"
command = "systemctl is-active k3s-agent.service; systemctl is-active k3s.service || true; cat /run/kiln-k3s-standin"
stdout = "^active\\s+inactive\\s+agent\\s*$"
"#,
        list = list.join("\n"),
        port = artifact_server(),
        sha = kiln::util::sha256_hex(K3S_STANDIN),
    )
}

/// `kiln validate` checks: inside the booted image, Debian's containerd
/// imports each baked archive and lists it under its locked digest.
fn containerd_checks(pushed: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    for (reference, digest) in pushed {
        let file = format!(
            "{}-{}.tar",
            reference.replace([':', '/'], "_"),
            &digest[7..19]
        );
        let pattern = format!(
            "(?m)^{}\\\\s+\\\\S+\\\\s+{digest}\\\\s",
            reference.replace('.', "\\\\.")
        );
        out.push_str(&format!(
            "\n[[checks]]\nname = \"containerd imports {reference}\"\n\
             command = \"sudo /usr/bin/ctr -n k8s.io images import {AIRGAP}/{file} >/dev/null && sudo /usr/bin/ctr -n k8s.io images ls\"\n\
             stdout = \"{pattern}\"\ntimeout = 120\n"
        ));
    }
    out
}

const RECIPE: &str = "recipes/k3s-test.toml";
const LOCK: &str = "recipes/k3s-test.toml.lock";

/// The cache shared by every run of these tests (the base rootfs takes
/// minutes of mmdebstrap), and the lock whose SOURCE_DATE_EPOCH and package
/// pins keep that base's cache key stable from run to run.
fn shared_cache() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("k3s-cache")
}

fn seed_lock() -> PathBuf {
    shared_cache().join("k3s-test.lock.seed")
}

struct Built {
    dir: PathBuf,
    project: PathBuf,
    cache: PathBuf,
    image_dir: PathBuf,
    manifest: serde_json::Value,
    root_img: PathBuf,
    /// reference → digest the registry served when the images were pushed.
    pushed: BTreeMap<String, String>,
    /// Registry requests made by `kiln lock` and the first build.
    registry_requests: Vec<String>,
}

/// Lock and build the test recipe once; the registry is stopped afterwards,
/// so later builds that still needed it would fail.
fn built() -> Option<&'static Built> {
    static B: OnceLock<Option<Built>> = OnceLock::new();
    B.get_or_init(|| {
        if !tools_ok("k3s node image") {
            return None;
        }
        let dir = scratch("k3s-node");
        let project = project_copy(&dir.join("project"));
        write_standin_overlay(&project);
        let cache = shared_cache();
        std::fs::create_dir_all(&cache).unwrap();

        let reg = Registry::start();
        let amd = reg.push_image(
            "cilium/cilium",
            "amd64",
            &[("usr/bin/cilium-agent", b"stand-in agent x86\n")],
            None,
        );
        let arm = reg.push_image(
            "cilium/cilium",
            "arm64",
            &[("usr/bin/cilium-agent", b"stand-in agent arm\n")],
            Some("arm64"),
        );
        let index = reg.push_index(
            "cilium/cilium",
            "v1.18-standin",
            &[(&arm, "arm64"), (&amd, "amd64")],
        );
        let operator = reg.push_image(
            "cilium/operator-generic",
            "v1.18-standin",
            &[("usr/bin/cilium-operator-generic", b"stand-in operator\n")],
            None,
        );
        // Docker media types, as some upstream images still use.
        let relay = reg.push_image_as(
            "cilium/hubble-relay",
            "v1.18-standin",
            &[("usr/bin/hubble-relay", b"stand-in relay\n")],
            None,
            Some("v2s2"),
        );
        let mut pushed = BTreeMap::new();
        for (repo, d) in [
            ("cilium/cilium", index),
            ("cilium/operator-generic", operator),
            ("cilium/hubble-relay", relay),
        ] {
            pushed.insert(format!("{}/{repo}:v1.18-standin", reg.host()), d);
        }
        let refs: Vec<String> = pushed.keys().cloned().collect();
        let recipe = test_recipe(&refs, "3G") + &containerd_checks(&pushed);
        std::fs::write(project.join(RECIPE), recipe).unwrap();
        if seed_lock().exists() {
            std::fs::copy(seed_lock(), project.join(LOCK)).unwrap();
        }
        ok(kiln(&project, &cache, &["lock", RECIPE]));
        std::fs::copy(project.join(LOCK), seed_lock()).unwrap();
        let out = ok(kiln(
            &project,
            &cache,
            &[
                "build",
                RECIPE,
                "--out",
                "images",
                "--no-validate",
                "--json",
            ],
        ));
        std::fs::copy(project.join(LOCK), seed_lock()).unwrap();
        let registry_requests = reg.requests();
        drop(reg);

        let j = json(&out);
        let manifest_path = project.join(j["manifest"].as_str().unwrap());
        let image_dir = manifest_path.parent().unwrap().to_path_buf();
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
        let inspect = dir.join("inspect");
        std::fs::create_dir_all(&inspect).unwrap();
        let root_img = root_partition(
            &image_dir.join(manifest["disk"]["file"].as_str().unwrap()),
            &inspect,
        );
        Some(Built {
            dir,
            project,
            cache,
            image_dir,
            manifest,
            root_img,
            pushed,
            registry_requests,
        })
    })
    .as_ref()
}

fn lock_images(project: &Path) -> BTreeMap<String, String> {
    let lock: toml::Table =
        toml::from_str(&std::fs::read_to_string(project.join(LOCK)).unwrap()).unwrap();
    lock["images"]
        .as_table()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect()
}

const AIRGAP: &str = "/var/lib/rancher/k3s/agent/images";

#[test]
fn lock_pins_each_image_tag_to_the_digest_the_registry_serves() {
    let Some(b) = built() else { return };
    assert_eq!(lock_images(&b.project), b.pushed);
    // The multi-platform image is pinned to its index, not one platform's manifest.
    let cilium = b
        .pushed
        .iter()
        .find(|(k, _)| k.contains("/cilium/cilium:"))
        .unwrap();
    assert!(
        b.registry_requests
            .iter()
            .any(|r| r == "GET /v2/cilium/cilium/manifests/v1.18-standin"),
        "{:?}",
        b.registry_requests
    );
    assert!(cilium.1.starts_with("sha256:"));
}

#[test]
fn manifest_records_each_image_reference_with_its_digest() {
    let Some(b) = built() else { return };
    let recorded: BTreeMap<String, String> =
        serde_json::from_value(b.manifest["inputs"]["images"].clone()).unwrap();
    assert_eq!(recorded, b.pushed);
    let stages: Vec<&str> = b.manifest["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert!(stages.contains(&"images"), "{stages:?}");
}

/// The archives baked into the image, dumped from its root filesystem.
fn baked_archives(b: &Built, into: &Path) -> Vec<PathBuf> {
    std::fs::create_dir_all(into).unwrap();
    let mut out = Vec::new();
    for name in ls(&b.root_img, AIRGAP) {
        let dst = into.join(&name);
        debugfs(
            &b.root_img,
            &format!("dump {AIRGAP}/{name} {}", dst.display()),
        );
        assert!(dst.is_file(), "debugfs could not dump {name}");
        out.push(dst);
    }
    out.sort();
    out
}

#[test]
fn image_bakes_one_archive_per_image_in_the_airgap_directory() {
    let Some(b) = built() else { return };
    let names = ls(&b.root_img, AIRGAP);
    assert_eq!(names.len(), b.pushed.len(), "{names:?}");
    for (reference, digest) in &b.pushed {
        let stem = reference.replace([':', '/'], "_");
        let short = &digest[7..19];
        assert!(
            names.iter().any(|n| n == &format!("{stem}-{short}.tar")),
            "no archive for {reference} in {names:?}"
        );
    }
}

/// The containerd proof on the host (fast, no QEMU): the archives dumped
/// from the built image's root filesystem import into Debian's containerd
/// under their locked digests, complete. The same proof inside the booted
/// image is `booted_image_imports_every_baked_archive_into_containerd`.
#[test]
fn containerd_imports_every_baked_archive_under_its_locked_digest() {
    let Some(b) = built() else { return };
    let archives = baked_archives(b, &b.dir.join("dumped"));
    assert_eq!(archives.len(), b.pushed.len());
    let ctd = Containerd::start();
    for a in &archives {
        ctd.import(a);
    }
    for (reference, digest) in &b.pushed {
        assert_eq!(
            ctd.digest_of(reference).as_deref(),
            Some(digest.as_str()),
            "{reference}"
        );
    }
    let check = ctd.ctr(&["images", "check"]);
    let text = String::from_utf8_lossy(&check.stdout);
    for reference in b.pushed.keys() {
        let line = text
            .lines()
            .find(|l| l.starts_with(reference.as_str()))
            .unwrap_or_else(|| panic!("{reference} not in {text}"));
        assert!(line.contains("complete"), "{line}");
    }
}

#[test]
fn k3s_units_are_enabled_but_nothing_runs_or_is_configured_at_build_time() {
    let Some(b) = built() else { return };
    let wants = ls(&b.root_img, "/etc/systemd/system/multi-user.target.wants");
    for unit in [
        "k3s.service",
        "k3s-agent.service",
        "kiln-cilium-install.service",
    ] {
        assert!(
            wants.iter().any(|w| w == unit),
            "{unit} not enabled: {wants:?}"
        );
        let text = debugfs(&b.root_img, &format!("cat /etc/systemd/system/{unit}"));
        assert!(text.contains("ConditionPathExists="), "{unit}: {text}");
    }
    // Node configuration only ever comes from user-data; K3s never ran.
    for absent in [
        "/etc/rancher",
        "/var/lib/rancher/k3s/server",
        "/var/lib/kiln",
    ] {
        let out = debugfs(&b.root_img, &format!("stat {absent}"));
        assert!(
            out.contains("File not found"),
            "{absent} is in the image: {out}"
        );
    }
    let k3s = debugfs(&b.root_img, "cat /usr/local/bin/k3s");
    assert!(k3s.contains("STAND-IN for the K3s binary"), "{k3s}");
    let stat = debugfs(&b.root_img, "stat /usr/local/bin/k3s");
    assert!(stat.contains("Mode:  0755"), "{stat}");
}

#[test]
fn sysctls_and_kernel_modules_for_k3s_and_cilium_are_baked() {
    let Some(b) = built() else { return };
    let sysctl = debugfs(&b.root_img, "cat /etc/sysctl.d/61-k3s.conf");
    assert!(sysctl.contains("net.ipv4.ip_forward = 1"), "{sysctl}");
    let inotify = debugfs(&b.root_img, "cat /etc/sysctl.d/60-kiln.conf");
    assert!(
        inotify.contains("fs.inotify.max_user_instances = 8192"),
        "{inotify}"
    );
    let modules = debugfs(&b.root_img, "cat /etc/modules-load.d/k3s-cilium.conf");
    for m in ["br_netfilter", "overlay", "xt_socket"] {
        assert!(modules.lines().any(|l| l == m), "{m} missing: {modules}");
    }
    let script = debugfs(&b.root_img, "cat /usr/local/libexec/kiln/install-cilium");
    assert!(
        script.contains("chart=/usr/local/share/kiln/charts/cilium-0.0.0-standin.tgz")
            && script.contains("helm\" upgrade --install cilium \"$chart\""),
        "{script}"
    );
}

/// A node's values file for `role` (agents take no service-account values:
/// an unknown value is refused; server-init says it starts a new cluster).
fn values_file(dir: &Path, role: &str, name: &str, generation: Option<u32>) -> PathBuf {
    let p = dir.join(format!("{name}-{role}.toml"));
    let mut text = format!(
        "name = \"{name}\"\nnode_ip = \"10.0.2.15\"\nvip = \"10.0.2.100\"\ntoken = \"{TOKEN}\"\n"
    );
    if role != "agent" {
        text.push_str(&format!(
            "service_account_issuer = \"https://oidc.kiln.test\"\n\
             service_account_key = \"-----BEGIN PUBLIC KEY-----\\n{SA_PUB_BODY}\\n-----END PUBLIC KEY-----\\n\"\n\
             service_account_signing_key = \"-----BEGIN PRIVATE KEY-----\\n{SA_KEY_BODY}\\n-----END PRIVATE KEY-----\\n\"\n"
        ));
    }
    if role == "server-init" {
        text.push_str("new_cluster = true\n");
    }
    if let Some(g) = generation {
        text.push_str(&format!("generation = {g}\n"));
    }
    std::fs::write(&p, text).unwrap();
    p
}

fn render(project: &Path, role: &str, values: &Path) -> std::process::Output {
    kiln(
        project,
        &project.join("no-cache"),
        &[
            "cloud-init",
            "render",
            "--recipe",
            RECIPE,
            "--role",
            role,
            "--values",
            &values.to_string_lossy(),
        ],
    )
}

#[test]
fn the_image_holds_none_of_the_secrets_user_data_carries() {
    let Some(b) = built() else { return };
    let vals = b.dir.join("secrets");
    std::fs::create_dir_all(&vals).unwrap();
    // The secrets do reach a node, through its rendered user-data...
    for role in ["server-init", "server-join", "agent"] {
        let out = stdout(&ok(render(
            &b.project,
            role,
            &values_file(&vals, role, "k3s-node-1", Some(3)),
        )));
        assert!(out.contains(TOKEN), "{role}: {out}");
        if role != "agent" {
            assert!(
                out.contains(SA_KEY_BODY) && out.contains(SA_PUB_BODY),
                "{role}: {out}"
            );
        }
    }
    // ...and never through the image: not in any byte of its root filesystem
    // (grep over the raw ext4 partition; it does find what is in the image),
    // nor in its manifest or the lock.
    // One pass of grep per file: which of the needles occur in it.
    let control = "STAND-IN for the K3s binary";
    let found = |file: &Path| -> Vec<String> {
        let out = std::process::Command::new("grep")
            .args([
                "-a",
                "-o",
                "-F",
                "-e",
                control,
                "-e",
                TOKEN,
                "-e",
                SA_KEY_BODY,
                "-e",
                SA_PUB_BODY,
            ])
            .arg(file)
            .output()
            .unwrap();
        assert!(
            out.status.code() != Some(2),
            "grep failed on {}",
            file.display()
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    };
    let in_root = found(&b.root_img);
    assert!(
        in_root.iter().any(|m| m == control),
        "the scan finds what the image holds"
    );
    for file in [b.image_dir.join("manifest.json"), b.project.join(LOCK)] {
        let hits = found(&file);
        assert!(
            hits.iter().all(|m| m == control),
            "{hits:?} in {}",
            file.display()
        );
    }
    for secret in [TOKEN, SA_KEY_BODY, SA_PUB_BODY] {
        assert!(
            !in_root.iter().any(|m| m == secret),
            "{secret} is in the image"
        );
    }
}

#[test]
fn rendered_server_init_writes_the_k3s_config_and_cilium_values() {
    let Some(b) = built() else { return };
    let vals = b.dir.join("render-init");
    std::fs::create_dir_all(&vals).unwrap();
    let out = stdout(&ok(render(
        &b.project,
        "server-init",
        &values_file(&vals, "server-init", "k3s-server-1", Some(7)),
    )));
    let doc = parse_yaml(&out);
    assert_eq!(doc["hostname"], "k3s-server-1-g7");
    let files = doc["write_files"].as_array().unwrap();
    let content = |path: &str| {
        files
            .iter()
            .find(|f| f["path"] == path)
            .unwrap_or_else(|| panic!("{path} not written: {out}"))["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let config = parse_yaml(&content("/etc/rancher/k3s/config.yaml"));
    for (key, value) in [
        ("node-name", serde_json::json!("k3s-server-1-g7")),
        ("cluster-init", serde_json::json!(true)),
        ("flannel-backend", serde_json::json!("none")),
        ("disable-kube-proxy", serde_json::json!(true)),
        ("disable-network-policy", serde_json::json!(true)),
        ("disable-helm-controller", serde_json::json!(true)),
        ("disable", serde_json::json!(["servicelb", "traefik"])),
        ("tls-san", serde_json::json!(["10.0.2.100"])),
        (
            "kube-apiserver-arg",
            serde_json::json!([
                "service-account-issuer=https://oidc.kiln.test",
                "service-account-signing-key-file=/etc/rancher/k3s/service-account.key",
                "service-account-key-file=/etc/rancher/k3s/service-account.pub",
            ]),
        ),
    ] {
        assert_eq!(config[key], value, "{key}: {config}");
    }
    assert!(config.get("server").is_none(), "{config}");
    assert!(content("/etc/rancher/k3s/service-account.key").contains(SA_KEY_BODY));
    assert_eq!(
        parse_yaml(&content("/etc/rancher/k3s/kiln-cilium-values.yaml"))["k8sServiceHost"],
        "10.0.2.100"
    );
    assert_eq!(
        content("/etc/rancher/k3s/kiln-role-server"),
        "server-init\n"
    );
}

#[test]
fn joining_servers_and_agents_register_through_the_vip() {
    let Some(b) = built() else { return };
    let vals = b.dir.join("render-join");
    std::fs::create_dir_all(&vals).unwrap();
    for (role, marker) in [
        ("server-join", "kiln-role-server"),
        ("agent", "kiln-role-agent"),
    ] {
        let out = stdout(&ok(render(
            &b.project,
            role,
            &values_file(&vals, role, "k3s-node-2", Some(1)),
        )));
        let doc = parse_yaml(&out);
        assert_eq!(doc["hostname"], "k3s-node-2-g1");
        let files = doc["write_files"].as_array().unwrap();
        let config = parse_yaml(
            files
                .iter()
                .find(|f| f["path"] == "/etc/rancher/k3s/config.yaml")
                .unwrap()["content"]
                .as_str()
                .unwrap(),
        );
        assert_eq!(
            config["server"], "https://10.0.2.100:6443",
            "{role}: {config}"
        );
        assert!(config.get("cluster-init").is_none(), "{role}: {config}");
        assert!(
            files
                .iter()
                .any(|f| f["path"] == format!("/etc/rancher/k3s/{marker}")),
            "{role}"
        );
        assert!(
            !files
                .iter()
                .any(|f| f["path"] == "/etc/rancher/k3s/kiln-cilium-values.yaml"),
            "{role}"
        );
    }
}

#[test]
fn rendering_without_a_generation_is_refused() {
    let Some(b) = built() else { return };
    let vals = b.dir.join("render-nogen");
    std::fs::create_dir_all(&vals).unwrap();
    for role in ["server-init", "server-join", "agent"] {
        let out = render(
            &b.project,
            role,
            &values_file(&vals, role, "k3s-node-3", None),
        );
        assert!(
            !out.status.success(),
            "{role} rendered without a generation"
        );
        let err = stderr(&out);
        assert!(err.contains("generation"), "{role}: {err}");
    }
}

/// Rendered user-data as a JSON value (it must be valid YAML).
fn parse_yaml(text: &str) -> serde_json::Value {
    let v: serde_yaml::Value = serde_yaml::from_str(text)
        .unwrap_or_else(|e| panic!("user-data is not valid YAML ({e}):\n{text}"));
    serde_json::to_value(v).unwrap()
}

// ---------------------------------------------------------------------------
// Later builds and bad input, each in its own project and cache (the base
// rootfs hard-linked from the shared cache, the lock's package pins copied).

fn sibling(name: &str) -> (PathBuf, PathBuf) {
    let b = built().expect("checked by the caller");
    let p = project_copy(&b.dir.join(name));
    write_standin_overlay(&p);
    std::fs::copy(b.project.join(LOCK), p.join(LOCK)).unwrap();
    std::fs::copy(b.project.join(RECIPE), p.join(RECIPE)).unwrap();
    let cache = b.dir.join(format!("{name}-cache"));
    for sub in ["rootfs", "blobs/sha256"] {
        std::fs::create_dir_all(cache.join(sub)).unwrap();
        for e in std::fs::read_dir(b.cache.join(sub)).unwrap() {
            let e = e.unwrap();
            std::fs::hard_link(e.path(), cache.join(sub).join(e.file_name())).unwrap();
        }
    }
    (p, cache)
}

fn build(p: &Path, cache: &Path) -> std::process::Output {
    kiln(
        p,
        cache,
        &[
            "build",
            RECIPE,
            "--out",
            "images",
            "--no-validate",
            "--json",
        ],
    )
}

fn nothing_published(p: &Path) {
    let left: Vec<_> = std::fs::read_dir(p.join("images"))
        .map(|r| r.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "images/ should be empty, has {left:?}");
}

/// Every blob in the OCI cache hashes to its name; no partial files remain.
fn oci_cache_is_clean(cache: &Path) {
    let dir = cache.join("oci/blobs/sha256");
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with('.'), "temp file {name} left in the cache");
        assert_eq!(
            kiln::util::sha256_file(&e.path()).unwrap(),
            name,
            "corrupt blob kept"
        );
    }
}

#[test]
fn second_build_with_cached_images_needs_no_registry() {
    let Some(b) = built() else { return };
    // The registry that served the first build is gone: any request would fail.
    let out = ok(kiln(
        &b.project,
        &b.cache,
        &[
            "build",
            RECIPE,
            "--out",
            "images-again",
            "--no-validate",
            "--json",
        ],
    ));
    let j = json(&out);
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(b.project.join(j["manifest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    let images = m["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == "images")
        .unwrap();
    assert_eq!(images["cached"], true, "{images}");
    assert_eq!(m["id"], b.manifest["id"], "same inputs, same image");
}

#[test]
fn build_refuses_an_image_the_lock_does_not_pin() {
    let Some(b) = built() else { return };
    let (p, cache) = sibling("unpinned");
    let mut refs: Vec<String> = b.pushed.keys().cloned().collect();
    // Edit the lock, not the recipe: the fingerprint still matches, the pin is gone.
    let dropped = refs.pop().unwrap();
    let lock = std::fs::read_to_string(p.join(LOCK)).unwrap();
    let kept: String = lock
        .lines()
        .filter(|l| !l.starts_with(&format!("\"{dropped}\"")))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(p.join(LOCK), kept).unwrap();
    let out = build(&p, &cache);
    assert!(!out.status.success());
    let err = stderr(&out);
    eprintln!("{err}");
    assert!(err.contains(&dropped) && err.contains("kiln lock"), "{err}");
    nothing_published(&p);
}

/// A project whose recipe lists `images` (served through `proxy`), locked.
fn faulty_project(name: &str, images: &[String], disk: &str) -> (PathBuf, PathBuf) {
    let (p, cache) = sibling(name);
    std::fs::write(p.join(RECIPE), test_recipe(images, disk)).unwrap();
    ok(kiln(&p, &cache, &["lock", RECIPE]));
    (p, cache)
}

fn build_fails_naming(p: &Path, cache: &Path, image: &str, needle: &str) -> String {
    let out = build(p, cache);
    assert!(!out.status.success(), "build should fail");
    let err = stderr(&out);
    eprintln!("{err}");
    assert!(err.contains(image) && err.contains(needle), "{err}");
    nothing_published(p);
    oci_cache_is_clean(cache);
    err
}

#[test]
fn registry_5xx_fails_the_build_naming_the_image() {
    if built().is_none() {
        return;
    }
    let reg = Registry::start();
    reg.push_image("kiln/app", "v1", &[("etc/app", b"5xx\n")], None);
    let proxy = Proxy::start(reg.port, Faults::default());
    let image = format!("{}/kiln/app:v1", proxy.host());
    let (p, cache) = faulty_project("5xx", std::slice::from_ref(&image), "3G");
    proxy.faults.lock().unwrap().status = Some(("/blobs/".into(), 503, 1000));
    build_fails_naming(&p, &cache, &image, "503");
}

#[test]
fn corrupt_blob_fails_the_build_and_is_not_cached() {
    if built().is_none() {
        return;
    }
    let reg = Registry::start();
    reg.push_image("kiln/app", "v1", &[("etc/app", b"corrupt\n")], None);
    let proxy = Proxy::start(reg.port, Faults::default());
    let image = format!("{}/kiln/app:v1", proxy.host());
    let (p, cache) = faulty_project("corrupt", std::slice::from_ref(&image), "3G");
    proxy.faults.lock().unwrap().corrupt_blobs = true;
    build_fails_naming(&p, &cache, &image, "does not match its digest");
}

#[test]
fn truncated_blob_fails_the_build_and_is_not_cached() {
    if built().is_none() {
        return;
    }
    let reg = Registry::start();
    reg.push_image("kiln/app", "v1", &[("etc/app", b"truncated\n")], None);
    let proxy = Proxy::start(reg.port, Faults::default());
    let image = format!("{}/kiln/app:v1", proxy.host());
    let (p, cache) = faulty_project("truncated", std::slice::from_ref(&image), "3G");
    proxy.faults.lock().unwrap().truncate_blobs = true;
    build_fails_naming(&p, &cache, &image, "truncated");
}

#[test]
fn image_without_linux_amd64_fails_the_build_naming_it() {
    if built().is_none() {
        return;
    }
    let reg = Registry::start();
    let arm = reg.push_image("kiln/armonly", "arm64", &[("a", b"arm\n")], Some("arm64"));
    reg.push_index("kiln/armonly", "v1", &[(&arm, "arm64")]);
    let image = format!("{}/kiln/armonly:v1", reg.host());
    let (p, cache) = faulty_project("no-amd64", std::slice::from_ref(&image), "3G");
    build_fails_naming(&p, &cache, &image, "linux/amd64");
}

#[test]
fn images_that_do_not_fit_disk_size_are_refused_naming_them() {
    let Some(b) = built() else { return };
    let reg = Registry::start();
    // 24 MiB that gzip cannot shrink.
    let mut noise = vec![0u8; 24 << 20];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for chunk in noise.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    reg.push_image("kiln/big", "v1", &[("data/noise", &noise)], None);
    let image = format!("{}/kiln/big:v1", reg.host());
    // A disk whose root partition holds the base with ~8 MiB to spare.
    let base_sha = b.manifest["inputs"]["base_rootfs"].as_str().unwrap();
    let base_size = std::fs::read_dir(b.cache.join("rootfs"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .map(|e| {
            serde_json::from_slice::<serde_json::Value>(&std::fs::read(e.path()).unwrap()).unwrap()
        })
        .find(|m| m["sha256"] == base_sha)
        .expect("the base's metadata is in the cache")["size"]
        .as_u64()
        .unwrap();
    let root = (base_size + (8 << 20)) * 20 / 19;
    let disk_mib = (root >> 20) + 1 + 64 + 2;
    let (p, cache) = faulty_project(
        "too-big",
        std::slice::from_ref(&image),
        &format!("{disk_mib}M"),
    );
    build_fails_naming(&p, &cache, &image, "left for them in the disk");
    // Refused before any layer was downloaded.
    assert!(
        !reg.requests()
            .iter()
            .any(|r| r.starts_with("GET ") && r.contains("/blobs/")),
        "{:?}",
        reg.requests()
    );
}

#[test]
fn lock_names_an_image_whose_tag_the_registry_lacks() {
    if built().is_none() {
        return;
    }
    let reg = Registry::start();
    reg.push_image("kiln/app", "v1", &[("a", b"a\n")], None);
    let image = format!("{}/kiln/app:v2-missing", reg.host());
    let (p, cache) = sibling("missing-tag");
    std::fs::write(
        p.join(RECIPE),
        test_recipe(std::slice::from_ref(&image), "3G"),
    )
    .unwrap();
    let out = kiln(&p, &cache, &["lock", RECIPE]);
    assert!(!out.status.success());
    let err = stderr(&out);
    eprintln!("{err}");
    assert!(err.contains(&image) && err.contains("404"), "{err}");
}

#[test]
fn lock_reads_registry_credentials_from_a_docker_config() {
    if built().is_none() {
        return;
    }
    let reg = Registry::start();
    let digest = reg.push_image("kiln/private", "v1", &[("a", b"private\n")], None);
    let proxy = Proxy::start(
        reg.port,
        Faults {
            registry_basic: Some(("kiln".into(), "s3cret".into())),
            ..Faults::default()
        },
    );
    let image = format!("{}/kiln/private:v1", proxy.host());
    let (p, cache) = sibling("private");
    std::fs::write(
        p.join(RECIPE),
        test_recipe(std::slice::from_ref(&image), "3G"),
    )
    .unwrap();

    let out = kiln_cmd(&p, &cache, &["lock", RECIPE])
        .env("HOME", p.join("no-home"))
        .env_remove("DOCKER_CONFIG")
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "anonymous lock of a private image succeeded"
    );
    let err = stderr(&out);
    eprintln!("{err}");
    assert!(err.contains(&image) && err.contains("401"), "{err}");

    let docker = p.join("docker");
    std::fs::create_dir_all(&docker).unwrap();
    std::fs::write(
        docker.join("config.json"),
        format!(
            "{{\"auths\": {{\"{}\": {{\"username\": \"kiln\", \"password\": \"s3cret\"}}}}}}",
            proxy.host()
        ),
    )
    .unwrap();
    ok(kiln(
        &p,
        &cache,
        &[
            "lock",
            RECIPE,
            "--docker-config",
            &docker.join("config.json").to_string_lossy(),
        ],
    ));
    assert_eq!(lock_images(&p).get(&image), Some(&digest));

    // DOCKER_CONFIG (a directory, as docker reads it) works the same.
    std::fs::remove_file(p.join(LOCK)).unwrap();
    std::fs::copy(built().unwrap().project.join(LOCK), p.join(LOCK)).unwrap();
    ok(kiln_cmd(&p, &cache, &["lock", RECIPE])
        .env("DOCKER_CONFIG", &docker)
        .output()
        .unwrap());
    assert_eq!(lock_images(&p).get(&image), Some(&digest));
}

// ---------------------------------------------------------------------------
// The shipped recipe (no internet here: checked, rendered, never built).

#[test]
fn shipped_k3s_recipe_names_the_real_upstream_sources_and_awaits_a_lock() {
    let out = ok(kiln(
        &repo(),
        &scratch("k3s-check-cache"),
        &["check", "recipes/k3s-node.toml", "--json"],
    ));
    assert_eq!(json(&out)["lock"], "missing");
    let recipe: toml::Table =
        toml::from_str(&std::fs::read_to_string(repo().join("recipes/k3s-node.toml")).unwrap())
            .unwrap();
    let urls: Vec<&str> = recipe["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["url"].as_str().unwrap())
        .collect();
    for prefix in [
        "https://github.com/k3s-io/k3s/releases/download/",
        "https://raw.githubusercontent.com/k3s-io/k3s/",
        "https://get.helm.sh/helm-v3.",
        "https://helm.cilium.io/cilium-1.18.",
    ] {
        assert!(
            urls.iter().any(|u| u.starts_with(prefix)),
            "{prefix} not in {urls:?}"
        );
    }
    let images: Vec<&str> = recipe["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_str().unwrap())
        .collect();
    for repo in [
        "cilium",
        "operator-generic",
        "cilium-envoy",
        "hubble-relay",
        "hubble-ui",
    ] {
        assert!(
            images
                .iter()
                .any(|i| i.starts_with(&format!("quay.io/cilium/{repo}:"))),
            "{repo} not in {images:?}"
        );
    }
}

#[test]
fn shipped_k3s_roles_render_valid_user_data_with_generation_suffixed_names() {
    let dir = scratch("k3s-shipped-render");
    for role in ["server-init", "server-join", "agent"] {
        let values = values_file(&dir, role, "k3s-server-1", Some(7));
        let out = ok(kiln(
            &repo(),
            &dir.join("cache"),
            &[
                "cloud-init",
                "render",
                "--recipe",
                "recipes/k3s-node.toml",
                "--role",
                role,
                "--values",
                &values.to_string_lossy(),
            ],
        ));
        let doc = parse_yaml(&stdout(&out));
        assert_eq!(doc["hostname"], "k3s-server-1-g7", "{role}");
        let files = doc["write_files"].as_array().unwrap();
        let config = files
            .iter()
            .find(|f| f["path"] == "/etc/rancher/k3s/config.yaml")
            .unwrap();
        assert_eq!(config["permissions"], "0600", "{role}: the token is in it");
        let parsed: serde_yaml::Value =
            serde_yaml::from_str(config["content"].as_str().unwrap()).unwrap();
        assert_eq!(
            parsed["node-name"].as_str(),
            Some("k3s-server-1-g7"),
            "{role}"
        );
        assert_eq!(parsed["token"].as_str(), Some(TOKEN), "{role}");
    }
}

#[test]
fn an_image_added_without_relocking_is_refused_naming_it() {
    let Some(b) = built() else { return };
    let (p, cache) = sibling("added-image");
    let mut refs: Vec<String> = b.pushed.keys().cloned().collect();
    let added = "quay.io/cilium/hubble-ui:v0.13.3".to_string();
    refs.push(added.clone());
    std::fs::write(p.join(RECIPE), test_recipe(&refs, "3G")).unwrap();
    let out = build(&p, &cache);
    assert!(!out.status.success());
    let err = stderr(&out);
    eprintln!("{err}");
    assert!(
        err.contains(&added) && err.contains("no locked digest") && err.contains("kiln lock"),
        "{err}"
    );
    nothing_published(&p);
}

/// The containerd proof inside the booted image: `kiln validate` boots the
/// built image once under QEMU (TCG, Secure Boot) as an agent and runs the
/// test recipe's checks: Debian's containerd imports each baked archive and
/// lists it under its locked digest, and the role's K3s unit (the stand-in)
/// runs while the server's does not. Validated in place, nothing recorded
/// (the disk is never written).
#[test]
fn booted_image_imports_every_baked_archive_into_containerd() {
    use kiln::validate::{validate_image, Accel, ValidateOptions, ValidationFailed};
    let Some(b) = built() else { return };
    if !have_tools("k3s boot", &[("qemu-system-x86_64", "qemu-system-x86")]) {
        return;
    }
    let opts = ValidateOptions {
        accel: Accel::Tcg,
        console_dir: Some(b.dir.join("console")),
        record: false,
        ..ValidateOptions::default()
    };
    let record = validate_image(&b.image_dir, &opts).unwrap_or_else(|e| {
        panic!(
            "{e:#}\n{:#?}",
            e.downcast_ref::<ValidationFailed>().map(|f| &f.record)
        )
    });
    assert!(record.validated);
    for reference in b.pushed.keys() {
        let name = format!("recipe: containerd imports {reference}");
        let check = record
            .checks
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no check `{name}` in {:#?}", record.checks));
        assert!(check.passed, "{check:#?}");
    }
    let agent = record
        .checks
        .iter()
        .find(|c| c.name == "recipe: the agent role starts k3s-agent, not the server")
        .unwrap();
    assert!(agent.passed, "{agent:#?}");
}

// ---------------------------------------------------------------------------
// The shipped overlay's units and scripts, and the shipped recipe's
// validation (fast: no image is built).

fn overlay_file(rel: &str) -> String {
    std::fs::read_to_string(repo().join("overlays/k3s").join(rel)).unwrap()
}

/// `key=value` lines of a unit file's `[section]`.
fn unit_entries(text: &str, section: &str) -> Vec<String> {
    let mut inside = false;
    let mut out = Vec::new();
    for l in text.lines().map(str::trim) {
        if l.starts_with('[') {
            inside = l == format!("[{section}]");
        } else if inside && !l.is_empty() && !l.starts_with('#') {
            out.push(l.to_string());
        }
    }
    out
}

/// K3s's install.sh writes `Type=notify` for the server and `Type=exec` for
/// agents (setup_env: `SYSTEMD_TYPE=exec` unless CMD_K3S=server).
#[test]
fn k3s_units_have_the_service_types_install_sh_writes() {
    for (unit, ty) in [
        ("k3s.service", "Type=notify"),
        ("k3s-agent.service", "Type=exec"),
    ] {
        let service = unit_entries(
            &overlay_file(&format!("etc/systemd/system/{unit}")),
            "Service",
        );
        let types: Vec<&String> = service.iter().filter(|l| l.starts_with("Type=")).collect();
        assert_eq!(types, [ty], "{unit}");
    }
}

/// With Requires=, a K3s that fails or restarts once fails or stops the
/// Cilium install as a dependency, which Restart= never retries.
#[test]
fn cilium_install_unit_wants_k3s_and_never_requires_it() {
    let unit = unit_entries(
        &overlay_file("etc/systemd/system/kiln-cilium-install.service"),
        "Unit",
    );
    for l in ["Wants=k3s.service", "After=k3s.service"] {
        assert!(unit.iter().any(|u| u == l), "{l} missing: {unit:?}");
    }
    for hard in ["Requires=", "BindsTo=", "Requisite=", "PartOf="] {
        assert!(
            !unit.iter().any(|u| u.starts_with(hard)),
            "{hard}: {unit:?}"
        );
    }
}

/// install-cilium with stand-ins for K3s's kubectl and Helm (scripts that
/// log their arguments; kubectl fails its first `fail_first` calls).
struct InstallCilium {
    dir: PathBuf,
}

impl InstallCilium {
    fn new(name: &str, fail_first: u32, gateway_crds: bool) -> InstallCilium {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch(&format!("install-cilium-{name}"));
        for sub in ["bin", "state", "manifests"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let stub = |name: &str, body: String| {
            let p = dir.join("bin").join(name);
            std::fs::write(&p, body).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        let log = dir.join("calls");
        stub(
            "kubectl",
            format!(
                "#!/bin/sh\necho \"kubectl $*\" >> {log}\nn=$(grep -c '^kubectl' {log})\n[ \"$n\" -gt {fail_first} ]\n",
                log = log.display()
            ),
        );
        stub(
            "helm",
            format!("#!/bin/sh\necho \"helm $*\" >> {}\n", log.display()),
        );
        if gateway_crds {
            std::fs::write(dir.join("manifests/gateway-api-v1.3.0-standard.yaml"), "").unwrap();
        }
        let script = overlay_file("usr/local/libexec/kiln/install-cilium.tera")
            .replace("{{ cilium_version }}", "1.18.2");
        assert!(!script.contains("{{"), "{script}");
        std::fs::write(dir.join("install-cilium"), script).unwrap();
        InstallCilium { dir }
    }

    fn run(&self, tries: u32) -> std::process::Output {
        std::process::Command::new("sh")
            .arg(self.dir.join("install-cilium"))
            .env("KILN_K3S_BIN", self.dir.join("bin"))
            .env("KILN_STATE_DIR", self.dir.join("state"))
            .env("KILN_MANIFESTS_DIR", self.dir.join("manifests"))
            .env("KILN_WAIT_TRIES", tries.to_string())
            .env("KILN_WAIT_PAUSE", "0")
            .output()
            .unwrap()
    }

    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("calls"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn installed(&self) -> bool {
        self.dir.join("state/cilium-installed").exists()
    }
}

#[test]
fn install_cilium_gives_up_after_bounded_tries_saying_why_in_the_journal() {
    let t = InstallCilium::new("gives-up", u32::MAX, false);
    let out = t.run(3);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    // `<3>`: an error in the journal (systemd.exec, SyslogLevelPrefix=).
    assert!(
        err.lines().any(
            |l| l.starts_with("<3>install-cilium: giving up after 3 tries")
                && l.contains("the K3s API")
                && l.contains("Cilium is NOT installed")
        ),
        "{err}"
    );
    assert_eq!(t.calls().len(), 3, "{:?}", t.calls());
    assert!(!t.calls().iter().any(|c| c.starts_with("helm")));
    assert!(!t.installed());
}

#[test]
fn install_cilium_waits_for_the_api_and_the_gateway_crds_then_installs() {
    let t = InstallCilium::new("installs", 4, true);
    let out = t.run(10);
    assert!(out.status.success(), "{}", stderr(&out));
    let calls = t.calls();
    // The API answered at the fifth try; then the CRDs, then Helm.
    assert_eq!(
        calls
            .iter()
            .filter(|c| c.as_str() == "kubectl get --raw /readyz")
            .count(),
        5,
        "{calls:?}"
    );
    let crds = calls
        .iter()
        .position(|c| c.starts_with("kubectl wait --for=condition=Established"))
        .unwrap_or_else(|| panic!("no CRD wait: {calls:?}"));
    assert!(
        calls[crds].contains("crd/tlsroutes.gateway.networking.k8s.io"),
        "{calls:?}"
    );
    let helm = calls.last().unwrap();
    assert!(
        helm.starts_with("helm upgrade --install cilium /usr/local/share/kiln/charts/cilium-1.18.2.tgz --namespace kube-system"),
        "{helm}"
    );
    assert!(t.installed());
    // Without baked CRDs (the test image), no CRD wait.
    let t = InstallCilium::new("no-crds", 0, false);
    assert!(t.run(3).status.success());
    assert!(
        !t.calls().iter().any(|c| c.contains("crd/")),
        "{:?}",
        t.calls()
    );
}

#[test]
fn gateway_api_crds_are_baked_for_k3s_to_deploy_and_enabled_in_cilium() {
    let recipe: toml::Table =
        toml::from_str(&std::fs::read_to_string(repo().join("recipes/k3s-node.toml")).unwrap())
            .unwrap();
    let crds: Vec<&toml::Value> = recipe["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| {
            a["url"]
                .as_str()
                .unwrap()
                .contains("/kubernetes-sigs/gateway-api/")
        })
        .collect();
    assert_eq!(crds.len(), 2, "standard channel and TLSRoute: {crds:?}");
    for a in &crds {
        // Pinned by the lock (`kiln lock` on a machine with internet).
        assert!(a.get("sha256").is_none(), "{a}");
        assert!(a["url"].as_str().unwrap().contains("/v1.3.0/"), "{a}");
        assert!(
            a["dest"]
                .as_str()
                .unwrap()
                .starts_with("/var/lib/rancher/k3s/server/manifests/gateway-api-"),
            "{a}"
        );
    }
    // The baked Cilium values, rendered with the recipe's vars.
    let ctx = tera::Context::from_serialize(recipe["vars"].as_table().unwrap()).unwrap();
    let values = tera::Tera::one_off(
        &overlay_file("usr/local/share/kiln/cilium-values.yaml.tera"),
        &ctx,
        false,
    )
    .unwrap();
    let values = parse_yaml(&values);
    assert_eq!(values["gatewayAPI"]["enabled"], true, "{values}");
    assert_eq!(values["k8sClientRateLimit"]["qps"], 50, "{values}");
    assert_eq!(values["k8sClientRateLimit"]["burst"], 100, "{values}");
    assert_eq!(values["image"]["useDigest"], false, "{values}");
}

/// With the real K3s the validation boot must prove the cluster comes up
/// offline: the recipe's checks wait for the node to go Ready, for Cilium's
/// workloads to roll out and for containerd to list the locked digests; the
/// one-node cluster runs one Cilium operator.
#[test]
fn shipped_k3s_validation_proves_cilium_runs_and_the_node_goes_ready() {
    let recipe: toml::Table =
        toml::from_str(&std::fs::read_to_string(repo().join("recipes/k3s-node.toml")).unwrap())
            .unwrap();
    let commands: Vec<&str> = recipe["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["command"].as_str().unwrap())
        .collect();
    let all = commands.join("\n");
    for needle in [
        "kubectl wait --for=condition=Ready node/k3s-validate-g1",
        "rollout status",
        "ds/cilium ",
        "ds/cilium-envoy",
        "deploy/cilium-operator",
        "crictl images --digests --no-trunc",
    ] {
        assert!(all.contains(needle), "no check runs `{needle}`:\n{all}");
    }
    // Rendered as `kiln validate` renders it: the validate role's test values.
    let role = recipe["validate"]["role"].as_str().unwrap();
    let dir = scratch("k3s-validate-render");
    let values = dir.join("validate.toml");
    std::fs::write(
        &values,
        toml::to_string(&recipe["roles"][role]["test_values"]).unwrap(),
    )
    .unwrap();
    let out = ok(kiln(
        &repo(),
        &dir.join("cache"),
        &[
            "cloud-init",
            "render",
            "--recipe",
            "recipes/k3s-node.toml",
            "--role",
            role,
            "--values",
            &values.to_string_lossy(),
        ],
    ));
    let doc = parse_yaml(&stdout(&out));
    let cilium = doc["write_files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == "/etc/rancher/k3s/kiln-cilium-values.yaml")
        .unwrap()["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(parse_yaml(&cilium)["operator"]["replicas"], 1, "{cilium}");
}
