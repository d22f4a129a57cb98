//! `kiln diff` from the command line on fabricated image directories (a
//! manifest each, no disk: diff reads nothing else): the `--json` shape CI
//! comments rely on, and bad input. Real builds: tests/sbom_diff_e2e.rs.

mod common;

use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// An image directory holding only a manifest.json: `base` with `patch`'s
/// top-level keys replaced.
fn image(dir: &Path, patch: Value) -> PathBuf {
    let mut m = json!({
        "name": "tiny", "version": "0.1.0", "id": "a".repeat(64), "kiln_version": "0.1.0",
        "disk": {"file": "tiny-0.1.0.qcow2", "format": "qcow2", "sha256": "a".repeat(64),
                 "size": 1000, "virtual_size": 2147483648u64, "root_fs_uuid": "u"},
        "inputs": {"recipe": "r", "lock": "l", "artifacts": {"k3s": "1".repeat(64)},
                   "images": {}, "base_rootfs_key": "k", "base_rootfs": "b", "overlays": {}},
        "source_date_epoch": 1,
        "boot": {"uefi": true, "secure_boot": true, "bios": false, "kernel": "6.1.0-50-amd64",
                 "cmdline": "ro", "chain": [{"component": "kernel", "file": "/boot/vmlinuz-6.1.0-50-amd64",
                 "sha256": "4".repeat(64), "package": "linux-image-6.1.0-50-amd64", "version": "6.1.176-1"}]},
        "packages": {"bash": "5.2.15-2+b13", "curl": "7.88.1-10"},
        "hygiene": {"cleaned": [], "allowed": [], "violations": []},
        "stages": [], "roles": [], "validate": {"role": null, "user_data": null, "checks": []},
        "added_files": [{"path": "/etc/motd", "origin": "overlays/base/etc/motd", "mode": "0644", "sha256": "6".repeat(64)}]
    });
    for (k, v) in patch.as_object().unwrap() {
        m[k] = v.clone();
    }
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("manifest.json"), m.to_string()).unwrap();
    dir.to_path_buf()
}

fn keys(v: &Value) -> Vec<&str> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .map(String::as_str)
        .collect()
}

#[test]
fn kiln_diff_json_has_one_object_per_kind_of_change() {
    let d = common::scratch("image-diff-json");
    let a = image(&d.join("a"), json!({}));
    let b = image(
        &d.join("b"),
        json!({
            "id": "b".repeat(64),
            "packages": {"bash": "5.2.15-2+b14", "haproxy": "2.6.12-1"},
            "disk": {"file": "tiny-0.1.0.qcow2", "format": "qcow2", "sha256": "b".repeat(64),
                     "size": 3000, "virtual_size": 2147483648u64, "root_fs_uuid": "u"},
        }),
    );
    let out = common::ok(common::kiln(
        &d,
        &d.join("cache"),
        &["diff", a.to_str().unwrap(), b.to_str().unwrap(), "--json"],
    ));
    let j = common::json(&out);
    assert_eq!(
        keys(&j),
        [
            "artifacts",
            "boot",
            "files",
            "from",
            "images",
            "notes",
            "packages",
            "same",
            "size",
            "to"
        ]
    );
    assert_eq!(
        keys(&j["packages"]),
        ["added", "downgraded", "removed", "upgraded"]
    );
    for kind in ["artifacts", "images", "files"] {
        assert_eq!(keys(&j[kind]), ["added", "changed", "removed"], "{kind}");
    }
    assert_eq!(keys(&j["boot"]), ["chain", "cmdline", "kernel"]);
    assert_eq!(keys(&j["size"]), ["disk", "virtual_size"]);
    assert_eq!(keys(&j["from"]), ["dir", "id", "name", "version"]);
    assert_eq!(j["packages"]["added"], json!({"haproxy": "2.6.12-1"}));
    assert_eq!(j["packages"]["removed"], json!({"curl": "7.88.1-10"}));
    assert_eq!(
        j["packages"]["upgraded"],
        json!({"bash": {"from": "5.2.15-2+b13", "to": "5.2.15-2+b14"}})
    );
    assert_eq!(
        j["size"]["disk"],
        json!({"from": 1000, "to": 3000, "delta": 2000})
    );
    assert_eq!(j["same"], false);
    assert_eq!(j["to"]["id"], "b".repeat(64));
}

#[test]
fn kiln_diff_of_a_directory_that_is_not_an_image_is_one_line_naming_it() {
    let d = common::scratch("image-diff-bad");
    let a = image(&d.join("a"), json!({}));
    let not_image = d.join("not-an-image");
    std::fs::create_dir_all(&not_image).unwrap();
    for (x, y, culprit) in [
        (&a, &not_image, &not_image),
        (&not_image, &a, &not_image),
        (&a, &d.join("missing"), &d.join("missing")),
    ] {
        let out = common::kiln(
            &d,
            &d.join("cache"),
            &["diff", x.to_str().unwrap(), y.to_str().unwrap()],
        );
        assert_eq!(out.status.code(), Some(1));
        let err = common::stderr(&out);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with("error: ") && err.contains(&culprit.display().to_string()),
            "{err}"
        );
        assert!(out.stdout.is_empty());
    }
    // A manifest kiln cannot read is named too.
    std::fs::write(not_image.join("manifest.json"), "{}").unwrap();
    let out = common::kiln(
        &d,
        &d.join("cache"),
        &["diff", a.to_str().unwrap(), not_image.to_str().unwrap()],
    );
    let err = common::stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&not_image.join("manifest.json").display().to_string()),
        "{err}"
    );
}
