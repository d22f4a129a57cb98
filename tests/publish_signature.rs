//! `kiln publish --require-signature`: only an image whose SHA256SUMS.sig
//! verifies with an allowed signer reaches Proxmox (the PVE simulator here).

mod publish_support;
use publish_support::*;

#[test]
fn publish_with_require_signature_refuses_an_unsigned_image_before_reaching_proxmox() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(&tmp.path().join("sim"));
    let img = image(tmp.path(), "k3s-server", "1.2.0", true, false);
    let (_, allowed) = signing_key(tmp.path(), "ci", "ci@example.org");
    let out = kiln(
        tmp.path(),
        &[
            "publish",
            img.to_str().unwrap(),
            "--require-signature",
            "--allowed-signers",
            allowed.to_str().unwrap(),
        ],
        &env_target(&s.url()),
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("--require-signature: ") && err.contains("is not signed"),
        "{err}"
    );
    assert!(s.state().requests.is_empty());
}

#[test]
fn publish_with_require_signature_refuses_an_image_signed_by_another_key() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(&tmp.path().join("sim"));
    let img = image(tmp.path(), "k3s-server", "1.2.0", true, false);
    let (stranger, _) = signing_key(tmp.path(), "stranger", "stranger@example.org");
    let (_, allowed) = signing_key(tmp.path(), "ci", "ci@example.org");
    sign(tmp.path(), &img, &stranger);
    let out = kiln(
        tmp.path(),
        &[
            "publish",
            img.to_str().unwrap(),
            "--require-signature",
            "--allowed-signers",
            allowed.to_str().unwrap(),
        ],
        &env_target(&s.url()),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("which no principal in"),
        "{}",
        stderr(&out)
    );
    assert!(s.state().requests.is_empty());
}

#[test]
fn publish_with_require_signature_publishes_a_signed_image() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(&tmp.path().join("sim"));
    let img = image(tmp.path(), "k3s-server", "1.2.0", true, false);
    let (key, allowed) = signing_key(tmp.path(), "ci", "ci@example.org");
    sign(tmp.path(), &img, &key);
    let out = kiln(
        tmp.path(),
        &[
            "publish",
            img.to_str().unwrap(),
            "--json",
            "--require-signature",
            "--allowed-signers",
            allowed.to_str().unwrap(),
        ],
        &env_target(&s.url()),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let r: kiln::deploy::publish::PublishReport = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r.created);
    assert!(s.state().vms[&r.vmid].template);
}

#[test]
fn require_signature_needs_an_allowed_signers_file() {
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), "k3s-server", "1.2.0", true, false);
    let out = kiln(
        tmp.path(),
        &["publish", img.to_str().unwrap(), "--require-signature"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--allowed-signers"),
        "{}",
        stderr(&out)
    );
}
