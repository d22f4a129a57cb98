//! The SBOM and `kiln diff` on real builds of the tiny recipe: the SBOM
//! passes the SPDX project's own validator (`pyspdxtools`, spdx-tools from
//! PyPI, which `.ci/install-deps` puts in target/spdx-venv), is an output in
//! the manifest and SHA256SUMS, and is the same bytes for the same inputs;
//! `kiln diff` of two builds that differ in one overlay file names that file
//! (and what follows from it).
//!
//! Three builds share one base rootfs from the test cache (see
//! `common::test_cache`); they need root and Debian's mirror, as CI has.
//! Without the validator the validation test is skipped with a printed
//! reason, and fails under CI=true.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The tiny image built twice from the same inputs (`a`, `a2`), and once
/// with one overlay file changed (`b`).
struct Builds {
    a: PathBuf,
    a2: PathBuf,
    b: PathBuf,
    /// The overlay file `b` changed.
    conf: PathBuf,
}

fn builds() -> &'static Builds {
    static B: OnceLock<Builds> = OnceLock::new();
    B.get_or_init(|| {
        let work = common::scratch("sbom-diff-e2e");
        let project = common::project_copy(&work.join("project"));
        std::fs::copy(
            common::repo().join("recipes/tiny.toml.lock"),
            project.join("recipes/tiny.toml.lock"),
        )
        .unwrap();
        let a = common::build_image(&project, "recipes/tiny.toml", &project.join("out-a"));
        let a2 = common::build_image(&project, "recipes/tiny.toml", &project.join("out-a2"));
        let conf = project.join("overlays/base/etc/ssh/sshd_config.d/50-kiln.conf");
        let mut s = std::fs::read_to_string(&conf).unwrap();
        s.push_str("# release b\n");
        std::fs::write(&conf, s).unwrap();
        let b = common::build_image(&project, "recipes/tiny.toml", &project.join("out-b"));
        Builds { a, a2, b, conf }
    })
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

fn sbom_path(dir: &Path) -> PathBuf {
    dir.join(
        manifest(dir)["sbom"]["file"]
            .as_str()
            .expect("manifest names the SBOM"),
    )
}

/// `pyspdxtools`: $KILN_SPDX_VALIDATOR, else the venv install-deps makes,
/// else the one on PATH.
fn validator() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("KILN_SPDX_VALIDATOR").map(PathBuf::from),
        Some(common::repo().join("target/spdx-venv/bin/pyspdxtools")),
        Some(PathBuf::from("pyspdxtools")),
    ];
    candidates.into_iter().flatten().find(|p| {
        Command::new(p)
            .arg("--help")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

#[test]
fn the_sbom_of_a_real_build_passes_the_spdx_validator() {
    let Some(pyspdxtools) = validator() else {
        let why = "pyspdxtools (spdx-tools from PyPI) not found: run .ci/install-deps";
        if std::env::var_os("CI").is_some() {
            panic!("{why}: the SBOM cannot be validated in CI");
        }
        println!("SKIPPED: {why}");
        return;
    };
    let sbom = sbom_path(&builds().a);
    let out = Command::new(&pyspdxtools)
        .arg("-i")
        .arg(&sbom)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} rejects {}:\n{}{}",
        pyspdxtools.display(),
        sbom.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // It validates: a broken licence expression is refused.
    let text = std::fs::read_to_string(&sbom).unwrap();
    let broken = sbom.with_file_name("broken.spdx.json");
    std::fs::write(
        &broken,
        text.replacen(
            "\"licenseDeclared\": \"NOASSERTION\"",
            "\"licenseDeclared\": \"LicenseRef-never-declared\"",
            1,
        ),
    )
    .unwrap();
    let out = Command::new(&pyspdxtools)
        .arg("-i")
        .arg(&broken)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the validator accepted a broken SBOM"
    );
}

#[test]
fn the_sbom_lists_the_packages_and_boot_chain_and_is_an_output_in_the_sums() {
    let dir = &builds().a;
    let m = manifest(dir);
    let sbom = sbom_path(dir);
    let bytes = std::fs::read(&sbom).unwrap();
    assert_eq!(
        kiln::util::sha256_hex(&bytes),
        m["sbom"]["sha256"].as_str().unwrap()
    );
    let sums = std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap();
    assert!(
        sums.contains(&format!(
            "{}  {}\n",
            m["sbom"]["sha256"].as_str().unwrap(),
            m["sbom"]["file"].as_str().unwrap()
        )),
        "{sums}"
    );
    let doc: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let packages = doc["packages"].as_array().unwrap();
    let find = |id: &str| packages.iter().find(|p| p["SPDXID"] == id);
    let ssh = find("SPDXRef-Deb-openssh-server").expect("openssh-server listed");
    assert_eq!(ssh["versionInfo"], m["packages"]["openssh-server"]);
    assert!(
        ssh["sourceInfo"].as_str().unwrap().contains("openssh"),
        "{ssh}"
    );
    let debs = packages
        .iter()
        .filter(|p| p["SPDXID"].as_str().unwrap().starts_with("SPDXRef-Deb-"))
        .count();
    assert_eq!(debs, m["packages"].as_object().unwrap().len());
    for c in m["boot"]["chain"].as_array().unwrap() {
        let id = format!("SPDXRef-Boot-{}", c["component"].as_str().unwrap());
        let p = find(&id).unwrap_or_else(|| panic!("{id} missing"));
        assert_eq!(p["checksums"][0]["checksumValue"], c["sha256"]);
        assert_eq!(p["versionInfo"], c["version"]);
    }
    let components: Vec<&str> = m["boot"]["chain"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["component"].as_str().unwrap())
        .collect();
    assert!(
        ["shim", "grub", "kernel"]
            .iter()
            .all(|c| components.contains(c)),
        "{components:?}"
    );
}

#[test]
fn two_builds_of_the_same_inputs_write_the_same_sbom() {
    let b = builds();
    assert_eq!(manifest(&b.a)["id"], manifest(&b.a2)["id"]);
    assert_eq!(
        std::fs::read(sbom_path(&b.a)).unwrap(),
        std::fs::read(sbom_path(&b.a2)).unwrap()
    );
}

#[test]
fn kiln_diff_of_an_overlay_change_names_the_file_and_the_new_root_uuid() {
    let b = builds();
    let cache = common::test_cache();
    let out = common::ok(common::kiln(
        &b.a,
        &cache,
        &[
            "diff",
            b.a.to_str().unwrap(),
            b.b.to_str().unwrap(),
            "--json",
        ],
    ));
    let d = common::json(&out);
    assert_ne!(d["from"]["id"], d["to"]["id"]);
    // The root filesystem's UUID is derived from the inputs, so kiln's
    // /etc/fstab and the kernel command line name a new one too.
    let changed = d["files"]["changed"].as_object().unwrap();
    assert_eq!(
        changed.keys().collect::<Vec<_>>(),
        ["/etc/fstab", "/etc/ssh/sshd_config.d/50-kiln.conf"]
    );
    assert_eq!(changed["/etc/fstab"]["to"]["origin"], "kiln defaults");
    assert_eq!(
        changed["/etc/ssh/sshd_config.d/50-kiln.conf"]["to"]["sha256"],
        kiln::util::sha256_file(&b.conf).unwrap()
    );
    let cmdline = &d["boot"]["cmdline"];
    assert!(
        cmdline["to"].as_str().unwrap().contains(&format!(
            "root=UUID={} ",
            manifest(&b.b)["disk"]["root_fs_uuid"].as_str().unwrap()
        )),
        "{cmdline}"
    );
    assert_eq!(d["files"]["added"], serde_json::json!({}));
    assert_eq!(d["files"]["removed"], serde_json::json!({}));
    for kind in ["added", "removed", "upgraded", "downgraded"] {
        assert_eq!(d["packages"][kind], serde_json::json!({}), "{kind}");
    }
    assert_eq!(d["boot"]["chain"], serde_json::json!({}));
    assert_eq!(d["boot"]["kernel"], serde_json::Value::Null);

    let text = common::stdout(&common::ok(common::kiln(
        &b.a,
        &cache,
        &["diff", b.a.to_str().unwrap(), b.b.to_str().unwrap()],
    )));
    println!("{text}");
    assert!(
        text.contains("  ~ /etc/ssh/sshd_config.d/50-kiln.conf (overlays/base/etc/ssh/sshd_config.d/50-kiln.conf): 0644 "),
        "{text}"
    );
}
