//! The serving certificate: a self-signed CA and a server certificate it signs, made with the
//! openssl CLI. Part of kube-sim, a labelled STAND-IN for K3s's Kubernetes API (not Kubernetes).
//!
//! Like K3s (its own `k3s-server-ca` signs the apiserver's serving
//! certificate), clients trust the CA from the kubeconfig's
//! `certificate-authority-data`. The openssl CLI (already one of kiln's host
//! tools in .ci/install-deps) rather than a certificate crate: no new
//! dependency for a few test certificates.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub struct Certs {
    pub ca_pem: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .context("cannot run openssl (apt install openssl)")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed: {}",
            args.first().unwrap_or(&""),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A P-256 CA ("kube-sim-server-ca") and a serving certificate for
/// 127.0.0.1, localhost and the in-cluster apiserver names.
pub fn make(dir: &Path) -> Result<Certs> {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "30",
        "-subj",
        "/CN=kube-sim-server-ca",
    ]);
    openssl(dir, &ca)?;
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=kube-apiserver",
    ]);
    openssl(dir, &csr)?;
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\n\
         basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "30",
            "-extfile",
            "server.ext",
        ],
    )?;
    Ok(Certs {
        ca_pem: std::fs::read_to_string(dir.join("ca.pem"))?,
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
    })
}
