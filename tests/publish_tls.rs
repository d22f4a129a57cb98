//! TLS towards Proxmox VE (the simulator serving HTTPS with a PVE-style
//! private CA): verified by default, a CA file or a pinned fingerprint.

mod publish_support;
use publish_support::*;
use std::path::Path;
use std::process::Command;

/// A CA and a server certificate for 127.0.0.1 signed by it, like
/// pve-root-ca.pem and pve-ssl.pem. Needs the openssl CLI (apt install openssl).
fn certs(dir: &Path) {
    let run = |args: &[&str]| {
        let st = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl runs (apt install openssl)");
        assert!(st.success(), "openssl {args:?}");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=kiln test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "node.key",
        "-out",
        "node.csr",
        "-subj",
        "/CN=pve",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "node.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "node.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}

fn fingerprint(dir: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(dir.join("node.pem"))
        .output()
        .unwrap();
    let s = String::from_utf8(out.stdout).unwrap();
    s.trim().split_once('=').unwrap().1.to_string()
}

fn tls_sim(dir: &Path) -> pve_sim::Sim {
    certs(dir);
    let mut cfg = pve_sim::SimConfig::new(&token(), &dir.join("sim"));
    cfg.task_delay = std::time::Duration::from_millis(30);
    cfg.tls = Some((dir.join("node.pem"), dir.join("node.key")));
    pve_sim::Sim::start(cfg).unwrap()
}

#[test]
fn an_unknown_certificate_is_refused_by_default() {
    let tmp = tempfile::tempdir().unwrap();
    let s = tls_sim(tmp.path());
    let img = image(tmp.path(), "k3s-server", "1.0.0", true, false);
    let out = kiln(
        tmp.path(),
        &["publish", img.to_str().unwrap()],
        &env_target(&s.url()),
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    assert!(s.state().requests.is_empty());
}

#[test]
fn a_ca_file_makes_the_private_ca_trusted() {
    let tmp = tempfile::tempdir().unwrap();
    let s = tls_sim(tmp.path());
    let img = image(tmp.path(), "k3s-server", "1.0.0", true, false);
    let mut env = env_target(&s.url());
    env.push((
        "KILN_PVE_CA_FILE".into(),
        tmp.path().join("ca.pem").display().to_string(),
    ));
    let r = publish_json(tmp.path(), &img, &env);
    assert!(r.created);
}

#[test]
fn a_pinned_fingerprint_is_accepted_without_a_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let s = tls_sim(tmp.path());
    let img = image(tmp.path(), "k3s-server", "1.0.0", true, false);
    let mut env = env_target(&s.url());
    env.push(("KILN_PVE_FINGERPRINT".into(), fingerprint(tmp.path())));
    let r = publish_json(tmp.path(), &img, &env);
    assert!(r.created);
}

#[test]
fn a_fingerprint_mismatch_is_refused_and_names_both_fingerprints() {
    let tmp = tempfile::tempdir().unwrap();
    let s = tls_sim(tmp.path());
    let img = image(tmp.path(), "k3s-server", "1.0.0", true, false);
    let mut env = env_target(&s.url());
    let wrong = "AB:".repeat(31) + "AB";
    env.push(("KILN_PVE_FINGERPRINT".into(), wrong.clone()));
    let out = kiln(tmp.path(), &["publish", img.to_str().unwrap()], &env);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("does not match the pinned") && err.contains(&wrong),
        "{err}"
    );
    assert!(err.contains(&fingerprint(tmp.path())), "{err}");
    assert!(s.state().requests.is_empty());
}
