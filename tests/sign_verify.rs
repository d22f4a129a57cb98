//! `kiln sign` and `kiln verify`: an OpenSSH signature over SHA256SUMS that
//! stock `ssh-keygen -Y verify` accepts, and a verify that fails with one
//! line for every way an image can differ from what was signed.

mod publish_support;
use publish_support::{image, kiln, sign, signing_key as key, stderr, stdout};
use std::path::PathBuf;
use std::process::{Command, Stdio};

const SIGNER: &str = "ci@example.org";

struct Signed {
    tmp: tempfile::TempDir,
    img: PathBuf,
    allowed: PathBuf,
}

/// A fabricated image with an LXC archive (two files in SHA256SUMS), signed
/// by `kiln sign`.
fn signed() -> Signed {
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), "lb", "0.1.0", true, true);
    std::fs::write(
        img.join("SHA256SUMS"),
        format!(
            "{}  disk.qcow2\n{}  rootfs.tar.zst\n",
            kiln::util::sha256_file(&img.join("disk.qcow2")).unwrap(),
            kiln::util::sha256_file(&img.join("rootfs.tar.zst")).unwrap()
        ),
    )
    .unwrap();
    let (k, allowed) = key(tmp.path(), "ci", SIGNER);
    sign(tmp.path(), &img, &k);
    assert!(img.join("SHA256SUMS.sig").is_file());
    Signed { tmp, img, allowed }
}

fn verify(s: &Signed) -> std::process::Output {
    kiln(
        s.tmp.path(),
        &[
            "verify",
            s.img.to_str().unwrap(),
            "--allowed-signers",
            s.allowed.to_str().unwrap(),
        ],
        &[],
    )
}

/// Verification fails with exactly one line on stderr that contains `want`.
fn fails_with(s: &Signed, want: &str) -> String {
    let out = verify(s);
    let err = stderr(&out);
    assert!(!out.status.success(), "verify passed: {}", stdout(&out));
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    assert!(err.starts_with("error: ") && err.contains(want), "{err}");
    err
}

#[test]
fn a_signed_image_verifies_naming_its_signer_and_files() {
    let s = signed();
    let out = verify(&s);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("good signature by ci@example.org"), "{text}");
    assert!(text.contains("disk.qcow2, rootfs.tar.zst"), "{text}");
}

#[test]
fn plain_ssh_keygen_verifies_kilns_signature() {
    // The README's line, as an operator without kiln runs it.
    let s = signed();
    let out = Command::new("ssh-keygen")
        .current_dir(&s.img)
        .args(["-Y", "verify", "-f"])
        .arg(&s.allowed)
        .args(["-I", SIGNER, "-n", "kiln-image", "-s", "SHA256SUMS.sig"])
        .stdin(std::fs::File::open(s.img.join("SHA256SUMS")).unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.starts_with(
            "Good \"kiln-image\" signature for ci@example.org with ED25519 key SHA256:"
        ),
        "{said}"
    );
    // And the sums cover the files, as `sha256sum -c` checks them.
    let st = Command::new("sha256sum")
        .current_dir(&s.img)
        .args(["--quiet", "-c", "SHA256SUMS"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn a_changed_sha256sums_fails_verification() {
    let s = signed();
    let sums = std::fs::read_to_string(s.img.join("SHA256SUMS")).unwrap();
    // A consistent edit: the archive swapped and its new digest written.
    std::fs::write(s.img.join("rootfs.tar.zst"), b"another archive").unwrap();
    let new = kiln::util::sha256_file(&s.img.join("rootfs.tar.zst")).unwrap();
    let edited: String = sums
        .lines()
        .map(|l| {
            if l.ends_with("rootfs.tar.zst") {
                format!("{new}  rootfs.tar.zst\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(s.img.join("SHA256SUMS"), edited).unwrap();
    fails_with(&s, "SHA256SUMS.sig does not verify SHA256SUMS");
}

#[test]
fn a_changed_listed_file_fails_verification() {
    let s = signed();
    std::fs::OpenOptions::new()
        .append(true)
        .open(s.img.join("disk.qcow2"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"swapped"))
        .unwrap();
    fails_with(&s, "disk.qcow2 does not match SHA256SUMS: sha256 is");
}

#[test]
fn a_manifest_claiming_another_disk_fails_verification() {
    // The signed sums and files untouched; the manifest says the disk is
    // something the signer never saw.
    let s = signed();
    let path = s.img.join("manifest.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let m = kiln::image::manifest::ImageManifest::load(&s.img).unwrap();
    std::fs::write(&path, text.replace(&m.id, &"e".repeat(64))).unwrap();
    fails_with(&s, "the manifest's disk disk.qcow2 has sha256 eeee");
}

#[test]
fn a_signature_by_a_key_not_allowed_fails_verification() {
    let s = signed();
    let (_, other) = key(s.tmp.path(), "other", SIGNER);
    let s = Signed {
        allowed: other,
        ..s
    };
    let err = fails_with(&s, "signed by ED25519 key SHA256:");
    assert!(err.contains("which no principal in"), "{err}");
}

#[test]
fn a_signature_for_another_namespace_fails_verification() {
    let s = signed();
    let st = Command::new("ssh-keygen")
        .args(["-q", "-Y", "sign", "-n", "file", "-f"])
        .arg(s.tmp.path().join("ci"))
        .stdin(std::fs::File::open(s.img.join("SHA256SUMS")).unwrap())
        .stdout(std::fs::File::create(s.img.join("SHA256SUMS.sig")).unwrap())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    fails_with(&s, "namespace");
}

#[test]
fn a_missing_signature_fails_verification() {
    let s = signed();
    std::fs::remove_file(s.img.join("SHA256SUMS.sig")).unwrap();
    fails_with(&s, "is not signed: it has no SHA256SUMS.sig");
}

#[test]
fn sign_refuses_a_directory_whose_files_do_not_match_its_sums() {
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), "lb", "0.1.0", true, true);
    // The fixture's SHA256SUMS lists the disk only: the LXC archive the
    // manifest names would go unsigned.
    let (k, _) = key(tmp.path(), "ci", SIGNER);
    let out = kiln(
        tmp.path(),
        &["sign", img.to_str().unwrap(), "--key", k.to_str().unwrap()],
        &[],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("the manifest's lxc rootfs.tar.zst is not listed in SHA256SUMS"),
        "{}",
        stderr(&out)
    );
    assert!(!img.join("SHA256SUMS.sig").exists());
}
