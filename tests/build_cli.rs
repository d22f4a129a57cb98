//! `kiln` on bad input: each mistake ends with one clear line naming the
//! culprit, before any expensive work, and leaves nothing behind.

mod common;
use common::*;

use std::path::{Path, PathBuf};

fn project(name: &str) -> (PathBuf, PathBuf) {
    let d = scratch(&format!("cli-{name}"));
    let p = project_copy(&d.join("project"));
    (p, d.join("cache"))
}

fn fails_with(out: std::process::Output, needles: &[&str]) -> String {
    assert!(
        !out.status.success(),
        "expected failure, got success:\n{}",
        stdout(&out)
    );
    let err = stderr(&out);
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "error should be one line:\n{err}"
    );
    for n in needles {
        assert!(err.contains(n), "error lacks {n:?}:\n{err}");
    }
    err
}

fn edit(path: &Path, from: &str, to: &str) {
    let t = std::fs::read_to_string(path).unwrap();
    assert!(t.contains(from), "{from:?} not in {}", path.display());
    std::fs::write(path, t.replacen(from, to, 1)).unwrap();
}

#[test]
fn misspelt_key_is_reported_with_file_line_and_suggestion() {
    let (p, cache) = project("misspelt");
    edit(&p.join("recipes/tiny.toml"), "[disk]\nsize", "[disk]\nsise");
    let out = kiln(&p, &cache, &["check", "recipes/tiny.toml"]);
    fails_with(
        out,
        &[
            "recipes/tiny.toml:",
            "unknown key `sise`",
            "did you mean `size`?",
        ],
    );
}

#[test]
fn malformed_recipe_names_the_line() {
    let (p, cache) = project("malformed");
    std::fs::write(
        p.join("recipes/broken.toml"),
        "name = \"broken\"\nversion = [\n",
    )
    .unwrap();
    fails_with(
        kiln(&p, &cache, &["check", "recipes/broken.toml"]),
        &["recipes/broken.toml:"],
    );
}

#[test]
fn check_accepts_the_shipped_recipes() {
    for r in ["recipes/tiny.toml", "recipes/lb.toml"] {
        let out = ok(kiln(
            &repo(),
            &scratch("cli-check-cache"),
            &["check", r, "--json"],
        ));
        assert_eq!(json(&out)["lock"], "ok", "{r}");
    }
}

#[test]
fn build_without_lockfile_names_the_fix() {
    let (p, cache) = project("nolock");
    fails_with(
        kiln(&p, &cache, &["build", "recipes/tiny.toml", "--no-validate"]),
        &["has no lockfile", "kiln lock recipes/tiny.toml"],
    );
    assert!(!p.join("images").exists());
}

#[test]
fn lock_that_no_longer_matches_is_refused() {
    let (p, cache) = project("stale");
    ok(kiln(&p, &cache, &["lock", "recipes/tiny.toml"]));
    edit(
        &p.join("recipes/tiny.toml"),
        "packages = [\"iputils-ping\"]",
        "packages = [\"iputils-ping\", \"curl\"]",
    );
    fails_with(
        kiln(&p, &cache, &["build", "recipes/tiny.toml", "--no-validate"]),
        &["does not match", "kiln lock recipes/tiny.toml"],
    );
}

fn with_artifact(p: &Path, url: &str, sha: Option<&str>) {
    let sha = sha
        .map(|s| format!("sha256 = \"{s}\"\n"))
        .unwrap_or_default();
    let t = std::fs::read_to_string(p.join("recipes/tiny.toml")).unwrap();
    std::fs::write(p.join("recipes/tiny.toml"), format!("{t}\n[[artifacts]]\nname = \"tool\"\nurl = \"{url}\"\n{sha}dest = \"/usr/local/bin/tool\"\nmode = \"0755\"\n")).unwrap();
}

#[test]
fn wrong_artifact_sha256_is_refused_and_not_cached() {
    let (p, cache) = project("badsha");
    let file = p.join("tool.bin");
    std::fs::write(&file, b"not the pinned bytes").unwrap();
    with_artifact(
        &p,
        &format!("file://{}", file.display()),
        Some(&"0".repeat(64)),
    );
    ok(kiln(&p, &cache, &["lock", "recipes/tiny.toml"]));
    fails_with(
        kiln(&p, &cache, &["build", "recipes/tiny.toml", "--no-validate"]),
        &["artifact `tool`", "sha256 mismatch"],
    );
    assert_eq!(
        std::fs::read_dir(cache.join("blobs/sha256"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(std::fs::read_dir(cache.join("tmp")).unwrap().count(), 0);
}

#[test]
fn unreachable_artifact_url_names_the_artifact() {
    let (p, cache) = project("unreachable");
    with_artifact(&p, "http://127.0.0.1:9/tool", Some(&"1".repeat(64)));
    ok(kiln(&p, &cache, &["lock", "recipes/tiny.toml"]));
    fails_with(
        kiln(&p, &cache, &["build", "recipes/tiny.toml", "--no-validate"]),
        &["artifact `tool`", "http://127.0.0.1:9/tool"],
    );
}

#[test]
fn lock_pins_an_artifact_that_has_no_digest() {
    let (p, cache) = project("pin");
    let file = p.join("tool.bin");
    std::fs::write(&file, b"tool v1").unwrap();
    with_artifact(&p, &format!("file://{}", file.display()), None);
    ok(kiln(&p, &cache, &["lock", "recipes/tiny.toml"]));
    let lock = std::fs::read_to_string(p.join("recipes/tiny.toml.lock")).unwrap();
    assert!(lock.contains(&kiln::util::sha256_hex(b"tool v1")), "{lock}");
}

#[test]
fn missing_host_tool_is_named_with_its_package() {
    let (p, cache) = project("notools");
    ok(kiln(&p, &cache, &["lock", "recipes/tiny.toml"]));
    let out = kiln_cmd(&p, &cache, &["build", "recipes/tiny.toml", "--no-validate"])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    fails_with(
        out,
        &["missing host tools", "mmdebstrap (apt install mmdebstrap)"],
    );
}

/// `kiln cloud-init render` of recipes/lb.toml's `lb` role with `node.toml`.
fn render_lb(p: &Path, cache: &Path) -> std::process::Output {
    kiln(
        p,
        cache,
        &[
            "cloud-init",
            "render",
            "--recipe",
            "recipes/lb.toml",
            "--role",
            "lb",
            "--values",
            "node.toml",
        ],
    )
}

#[test]
fn cloud_init_render_prints_per_node_user_data() {
    let (p, cache) = project("render");
    std::fs::write(
        p.join("node.toml"),
        "hostname = \"lb-2\"\nnode_ip = \"192.0.2.12\"\nvip = \"192.0.2.210\"\npriority = 100\npeers = [{ name = \"lb-1\", addresses = [\"192.0.2.11\"] }, { name = \"lb-2\", addresses = [\"192.0.2.12\"] }, { name = \"lb-3\", addresses = [\"192.0.2.13\"] }]\nbackends = [{ name = \"s1\", addresses = [\"192.0.2.21\"] }]\n",
    )
    .unwrap();
    let out = ok(render_lb(&p, &cache));
    let ud = stdout(&out);
    assert!(ud.starts_with("#cloud-config"), "{ud}");
    assert!(
        ud.contains("server s1_192.0.2.21 192.0.2.21:6443 check"),
        "{ud}"
    );
    assert!(
        ud.contains("unicast_peer {\n          192.0.2.11\n          192.0.2.13\n        }"),
        "{ud}"
    );
    assert!(ud.contains("192.0.2.210/24 dev eth0"), "{ud}");
}

#[test]
fn cloud_init_render_out_file_is_readable_by_its_owner_only() {
    // User-data holds the node's secrets: unlike lockfiles and manifests
    // (0644), it stays 0600.
    use std::os::unix::fs::PermissionsExt;
    let (p, cache) = project("render-out");
    std::fs::write(
        p.join("node.toml"),
        "hostname = \"lb-2\"\nnode_ip = \"192.0.2.12\"\nvip = \"192.0.2.210\"\npriority = 100\npeers = [{ name = \"lb-1\", addresses = [\"192.0.2.11\", \"192.0.2.12\"] }]\nbackends = [{ name = \"s1\", addresses = [\"192.0.2.21\"] }]\n",
    )
    .unwrap();
    let ud = p.join("ud.yaml");
    ok(kiln(
        &p,
        &cache,
        &[
            "cloud-init",
            "render",
            "--recipe",
            "recipes/lb.toml",
            "--role",
            "lb",
            "--values",
            "node.toml",
            "--out",
            ud.to_str().unwrap(),
        ],
    ));
    let mode = std::fs::metadata(&ud).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(std::fs::read_to_string(&ud)
        .unwrap()
        .starts_with("#cloud-config"));
}

#[test]
fn cloud_init_render_names_a_missing_value() {
    let (p, cache) = project("render-missing");
    std::fs::write(p.join("node.toml"), "hostname = \"lb-2\"\n").unwrap();
    fails_with(
        render_lb(&p, &cache),
        &["node.toml: missing value `node_ip`", "`backends`"],
    );
}

#[test]
fn check_refuses_test_values_not_of_their_type_at_their_line() {
    let (p, cache) = project("bad-test-values");
    edit(
        &p.join("recipes/lb.toml"),
        "node_ip = \"10.0.2.15\"",
        "node_ip = \"10.0.2.15\\n  - path: /etc/evil\"",
    );
    let line = std::fs::read_to_string(p.join("recipes/lb.toml"))
        .unwrap()
        .lines()
        .position(|l| l.starts_with("node_ip = "))
        .unwrap()
        + 1;
    fails_with(
        kiln(&p, &cache, &["check", "recipes/lb.toml"]),
        &[
            &format!("recipes/lb.toml:{line}:11:"),
            "role `lb` test_values: value `node_ip`",
        ],
    );
}

/// Proxmox gives containers no cloud-init, only hostname, network, SSH keys
/// and a password: a shipped recipe whose nodes take their configuration
/// from a role's user-data (the LB's haproxy.cfg and keepalived.conf, K3s's
/// config.yaml) is published as a VM template only, never as an LXC one.
#[test]
fn shipped_recipes_configured_by_user_data_are_not_lxc_templates() {
    fn table(path: &Path) -> toml::Table {
        toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }
    let mut checked = 0;
    for e in std::fs::read_dir(repo().join("recipes")).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_none_or(|x| x != "toml") {
            continue;
        }
        // The recipe and the ones it extends.
        let mut chain = vec![table(&path)];
        while let Some(parent) = chain
            .last()
            .unwrap()
            .get("extends")
            .and_then(|v| v.as_str())
        {
            chain.push(table(&path.parent().unwrap().join(parent)));
        }
        let lxc = chain
            .iter()
            .find_map(|t| t.get("lxc"))
            .and_then(|v| v.as_bool());
        let user_data = chain.iter().any(|t| {
            t.get("roles")
                .and_then(|r| r.as_table())
                .is_some_and(|r| r.values().any(|role| role.get("user_data").is_some()))
        });
        if user_data {
            checked += 1;
            assert_ne!(lxc, Some(true), "{} is an LXC template", path.display());
        }
    }
    assert!(checked >= 3, "checked {checked} recipes");
}
