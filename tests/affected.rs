//! `kiln affected RANGE` on a git repository holding the shipped recipes,
//! locks and overlays: which recipes a change touches.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=t", "-c", "user.email=t@example.invalid"])
        .args(args)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A repository whose first commit (tagged `base`) holds the project's
/// recipes (with their locks), overlays and a README.
fn repository(name: &str) -> PathBuf {
    let dir = scratch(name);
    project_copy(&dir);
    for e in std::fs::read_dir(repo().join("recipes")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "lock") {
            std::fs::copy(&p, dir.join("recipes").join(p.file_name().unwrap())).unwrap();
        }
    }
    std::fs::write(dir.join("README.md"), "kiln\n").unwrap();
    git(&dir, &["init", "-q", "-b", "main"]);
    git(&dir, &["add", "-A"]);
    git(&dir, &["commit", "-q", "-m", "base"]);
    git(&dir, &["tag", "base"]);
    dir
}

/// Commit `edit` on a branch from `base` and list what `kiln affected
/// base...HEAD` prints.
fn affected_after(dir: &Path, edit: impl FnOnce(&Path)) -> Vec<String> {
    git(dir, &["checkout", "-q", "-B", "change", "base"]);
    edit(dir);
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "--allow-empty", "-m", "change"]);
    let out = ok(kiln(dir, &dir.join("cache"), &["affected", "base...HEAD"]));
    stdout(&out).lines().map(str::to_string).collect()
}

fn append(path: PathBuf) {
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("\n# touched\n");
    std::fs::write(path, text).unwrap();
}

#[test]
fn a_change_to_base_toml_affects_every_recipe_that_extends_it() {
    let d = repository("affected-base");
    let got = affected_after(&d, |d| append(d.join("recipes/base.toml")));
    assert_eq!(
        got,
        [
            "recipes/k3s-node.toml",
            "recipes/lb.toml",
            "recipes/tiny.toml"
        ]
    );
}

#[test]
fn an_overlay_change_affects_only_the_recipes_that_use_it() {
    let d = repository("affected-overlay");
    let got = affected_after(&d, |d| {
        append(d.join("overlays/lb/usr/local/libexec/kiln/check-haproxy"))
    });
    assert_eq!(got, ["recipes/lb.toml"]);
    // A new file in the shared overlay reaches every recipe with it.
    let got = affected_after(&d, |d| {
        std::fs::write(d.join("overlays/base/etc/new.conf"), "x\n").unwrap()
    });
    assert_eq!(
        got,
        [
            "recipes/k3s-node.toml",
            "recipes/lb.toml",
            "recipes/tiny.toml"
        ]
    );
}

#[test]
fn a_role_template_or_its_value_types_affect_the_recipe_whose_role_uses_them() {
    let d = repository("affected-roles");
    let got = affected_after(&d, |d| append(d.join("recipes/roles/tiny-node.yaml.tera")));
    assert_eq!(got, ["recipes/tiny.toml"]);
    let got = affected_after(&d, |d| append(d.join("recipes/roles/k3s-agent.types.toml")));
    assert_eq!(got, ["recipes/k3s-node.toml"]);
}

#[test]
fn a_lock_change_affects_its_recipe_alone() {
    let d = repository("affected-lock");
    let got = affected_after(&d, |d| append(d.join("recipes/lb.toml.lock")));
    assert_eq!(got, ["recipes/lb.toml"]);
}

#[test]
fn a_change_outside_every_recipes_inputs_affects_none() {
    let d = repository("affected-none");
    let got = affected_after(&d, |d| append(d.join("README.md")));
    assert!(got.is_empty(), "{got:?}");
}

#[test]
fn a_recipe_that_does_not_load_is_an_error_naming_it() {
    let d = repository("affected-broken");
    git(&d, &["checkout", "-q", "-B", "change", "base"]);
    append(d.join("recipes/lb.toml"));
    std::fs::write(
        d.join("recipes/lb.toml"),
        std::fs::read_to_string(d.join("recipes/lb.toml"))
            .unwrap()
            .replace("[disk]", "[disks]"),
    )
    .unwrap();
    git(&d, &["commit", "-q", "-am", "break lb"]);
    let out = kiln(&d, &d.join("cache"), &["affected", "base...HEAD"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.starts_with("error: recipes/lb.toml:") && err.contains("disks"),
        "{err}"
    );
}

#[test]
fn json_names_the_changed_files_that_touch_each_recipe() {
    let d = repository("affected-json");
    git(&d, &["checkout", "-q", "-B", "change", "base"]);
    append(d.join("recipes/tiny.toml.lock"));
    append(d.join("README.md"));
    git(&d, &["commit", "-q", "-am", "two files"]);
    let out = ok(kiln(
        &d,
        &d.join("cache"),
        &["affected", "base...HEAD", "--json"],
    ));
    let v = json(&out);
    assert_eq!(
        v["changed"],
        serde_json::json!(["README.md", "recipes/tiny.toml.lock"])
    );
    assert_eq!(
        v["recipes"],
        serde_json::json!([{
            "recipe": "recipes/tiny.toml", "name": "tiny", "version": "0.1.0",
            "because": ["recipes/tiny.toml.lock"]
        }])
    );
}

#[test]
fn a_range_that_is_not_one_is_refused_naming_it() {
    let d = repository("affected-bad-range");
    for (range, says) in [
        ("--output=/tmp/x", "is not a git revision range"),
        ("nosuch...HEAD", "git diff"),
    ] {
        let out = kiln(&d, &d.join("cache"), &["affected", "--", range]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{range}: {err}");
        assert!(
            err.lines().count() == 1 && err.contains(says),
            "{range}: {err}"
        );
    }
}
