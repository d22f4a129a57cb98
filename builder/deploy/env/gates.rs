//! Gates: what a new VM must pass before it goes into service — SSH answers,
//! cloud-init finished, the image's checks and `kiln validate`'s defaults, and the environment's checks.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::apply::{ApplyOptions, RoleImage};
use super::model::Environment;
use crate::deploy::providers::{NodeVm, Provider};
use crate::validate::keys::ThrowawayKey;
use crate::validate::ssh::Guest;

/// The gates apply runs; the real ones log in over SSH.
pub(crate) trait Gates {
    /// Prove a new VM: it may go into service when this returns Ok.
    fn prove(&self, vm: &NodeVm) -> Result<()>;
    /// The environment's own checks, from inside its network.
    fn env_checks(&self) -> Result<()>;
    /// Run a command on a VM (as the access user); its output, or an error
    /// when it fails.
    fn run(&self, vm: &NodeVm, command: &str) -> Result<String>;
    /// Wait until the LBs' health check would count a new K3s server UP
    /// (see [`api_server_answers`]).
    fn api_server_up(&self, vm: &NodeVm, timeout: Duration) -> Result<()>;
}

/// The LBs' health check of a K3s server (recipes/roles/lb.yaml.tera,
/// backend `k3s-servers`): a TLS handshake without verifying the
/// certificate (`verify none`), `GET /readyz`, and `200` or `401` back
/// (K3s answers 503 until its API server runs; anonymous-auth is off).
pub(crate) fn api_server_answers(tcp: std::net::TcpStream) -> Result<()> {
    use std::io::{Read, Write};
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(5)))?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(VerifyNone(provider)))
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("kubernetes")?.to_owned();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name)?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(b"GET /readyz HTTP/1.0\r\n\r\n")?;
    let mut head = [0u8; 16];
    let mut got = 0;
    while got < head.len() {
        match tls.read(&mut head[got..])? {
            0 => break,
            n => got += n,
        }
    }
    let head = String::from_utf8_lossy(&head[..got]);
    let ok = ["200", "401"].iter().any(|c| {
        head.starts_with(&format!("HTTP/1.0 {c} ")) || head.starts_with(&format!("HTTP/1.1 {c} "))
    });
    if !ok {
        bail!(
            "GET /readyz answered `{}`",
            head.lines().next().unwrap_or("")
        );
    }
    Ok(())
}

/// haproxy's `verify none`: any certificate (K3s's CA is made at first boot).
#[derive(Debug)]
struct VerifyNone(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for VerifyNone {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Gates over SSH through the provider's network.
pub(crate) struct SshGates<'a> {
    pub env: &'a Environment,
    pub provider: &'a dyn Provider,
    pub images: &'a BTreeMap<String, RoleImage>,
    pub key: &'a ThrowawayKey,
    pub opts: &'a ApplyOptions,
}

impl Gates for SshGates<'_> {
    /// The gates a VM passes before it goes into service: SSH answers,
    /// cloud-init is done, the image's checks and the defaults pass, and the
    /// environment's checks pass with it running.
    fn prove(&self, vm: &NodeVm) -> Result<()> {
        let image = self.images.values().find(|i| i.manifest.id == vm.image_id);
        let guest = self.wait_for_ssh(vm)?;
        let started = Instant::now();
        let ci = guest.run(
            "cloud-init status --wait >/dev/null 2>&1; cloud-init status --long",
            self.opts.cloud_init_timeout,
            &crate::util::interrupted,
        )?;
        crate::util::check_interrupted()?;
        if ci.timed_out || ci.exit != Some(0) {
            bail!(
                "{}: cloud-init did not finish cleanly after {:.0} s: {}",
                vm.name,
                started.elapsed().as_secs_f64(),
                ci.stdout.trim()
            );
        }
        let mut specs =
            crate::validate::checks::default_checks(&crate::validate::checks::BootFacts {
                hostname: vm.name.clone(),
                secure_boot: image
                    .is_some_and(|i| i.manifest.boot.secure_boot && i.manifest.boot.uefi),
            });
        if let Some(i) = image {
            let skip = self
                .env
                .roles
                .iter()
                .find(|r| {
                    self.images
                        .get(&r.name)
                        .is_some_and(|x| x.manifest.id == i.manifest.id)
                })
                .map(|r| r.skip_checks.clone())
                .unwrap_or_default();
            specs.extend(
                i.manifest
                    .validate
                    .checks
                    .iter()
                    .filter(|c| !skip.contains(&c.name))
                    .cloned(),
            );
        }
        let commands: Vec<(String, Duration)> = specs
            .iter()
            .map(|s| {
                (
                    crate::validate::checks::remote_command(s),
                    Duration::from_secs(s.timeout + 10),
                )
            })
            .collect();
        let results = guest.run_many(&commands, &crate::util::interrupted);
        crate::util::check_interrupted()?;
        let mut failed = Vec::new();
        for (spec, r) in specs.iter().zip(results) {
            let outcome = match r {
                Ok(r) => crate::validate::checks::evaluate(spec, &r),
                Err(e) => {
                    failed.push(format!("{}: {e:#}", spec.name));
                    continue;
                }
            };
            if !outcome.passed {
                failed.push(format!(
                    "{}: {}",
                    spec.name,
                    outcome.detail.unwrap_or_default()
                ));
            }
        }
        if !failed.is_empty() {
            bail!("{}: checks failed: {}", vm.name, failed.join("; "));
        }
        self.env_checks()
    }

    fn run(&self, vm: &NodeVm, command: &str) -> Result<String> {
        self.run_on(vm, command)
    }

    fn api_server_up(&self, vm: &NodeVm, timeout: Duration) -> Result<()> {
        let addr = SocketAddr::from((vm.address, 6443));
        let start = Instant::now();
        loop {
            crate::util::check_interrupted()?;
            let r = self
                .provider
                .connect(addr, Duration::from_secs(5))
                .and_then(api_server_answers);
            match r {
                // The LBs count it UP after `rise 2` checks `inter 2s` apart.
                Ok(()) => {
                    std::thread::sleep(Duration::from_secs(5));
                    return Ok(());
                }
                Err(e) if start.elapsed() > timeout => {
                    return Err(e.context(format!(
                        "{}: its API server on {addr} is not what the LBs' health check counts UP",
                        vm.name
                    )))
                }
                Err(_) => std::thread::sleep(Duration::from_secs(2)),
            }
        }
    }

    fn env_checks(&self) -> Result<()> {
        for c in &self.env.checks {
            let (host, port) = c
                .tcp
                .rsplit_once(':')
                .with_context(|| format!("check `{}`: tcp must be HOST:PORT", c.name))?;
            let ip = if host == "vip" {
                self.env.network.vip
            } else {
                host.parse().with_context(|| {
                    format!(
                        "check `{}`: `{host}` is not an IPv4 address or `vip`",
                        c.name
                    )
                })?
            };
            let port: u16 = port
                .parse()
                .with_context(|| format!("check `{}`: `{port}` is not a port", c.name))?;
            let deadline = Instant::now() + Duration::from_secs(c.timeout);
            loop {
                match self
                    .provider
                    .connect(SocketAddr::from((ip, port)), Duration::from_secs(2))
                {
                    Ok(_) => break,
                    Err(e) if Instant::now() > deadline => {
                        return Err(e.context(format!("environment check `{}` failed", c.name)))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(500)),
                }
            }
        }
        Ok(())
    }
}

impl SshGates<'_> {
    /// Run `command` on `vm` over SSH (one session, 10 minutes at most).
    fn run_on(&self, vm: &NodeVm, command: &str) -> Result<String> {
        let guest = self.wait_for_ssh(vm)?;
        let r = guest.run(command, Duration::from_secs(600), &crate::util::interrupted)?;
        crate::util::check_interrupted()?;
        if r.timed_out || r.exit != Some(0) {
            bail!(
                "{}: `{command}` failed ({}): {}",
                vm.name,
                r.exit
                    .map(|c| format!("exit {c}"))
                    .unwrap_or_else(|| "timed out".into()),
                r.stderr.trim()
            );
        }
        Ok(r.stdout)
    }

    fn wait_for_ssh(&self, vm: &NodeVm) -> Result<Guest> {
        let start = Instant::now();
        let addr = SocketAddr::from((vm.address, 22));
        let mut last;
        loop {
            crate::util::check_interrupted()?;
            match self
                .provider
                .connect(addr, Duration::from_secs(5))
                .and_then(|tcp| {
                    Guest::over(
                        tcp,
                        &self.env.access.user,
                        self.key,
                        Duration::from_secs(30),
                    )
                }) {
                Ok(g) => return Ok(g),
                Err(e) => last = format!("{e:#}"),
            }
            if start.elapsed() > self.opts.boot_timeout {
                bail!(
                    "{}: SSH on {addr} did not answer within {} s ({last})",
                    vm.name,
                    self.opts.boot_timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A TLS listener on loopback answering every request with `status`.
    fn api_stand_in(status: &'static str) -> SocketAddr {
        let dir = tempfile::tempdir().unwrap();
        let (key, cert) = (dir.path().join("k.pem"), dir.path().join("c.pem"));
        let st = std::process::Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=k3s",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl runs");
        assert!(st.success());
        use rustls::pki_types::pem::PemObject;
        let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(&cert)
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&key).unwrap();
        let cfg = std::sync::Arc::new(
            rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
        );
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for tcp in l.incoming().flatten() {
                let conn = rustls::ServerConnection::new(cfg.clone()).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let mut buf = [0u8; 512];
                if tls.read(&mut buf).unwrap_or(0) > 0 {
                    let _ = tls.write_all(
                        format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes(),
                    );
                    let _ = tls.flush();
                }
            }
        });
        addr
    }

    #[test]
    fn a_k3s_api_server_answering_401_counts_as_up_as_haproxy_counts_it() {
        let addr = api_stand_in("401 Unauthorized");
        api_server_answers(std::net::TcpStream::connect(addr).unwrap()).unwrap();
    }

    #[test]
    fn a_k3s_api_server_still_starting_with_503_does_not_count_as_up() {
        let addr = api_stand_in("503 Service Unavailable");
        let e = api_server_answers(std::net::TcpStream::connect(addr).unwrap()).unwrap_err();
        assert!(format!("{e:#}").contains("503"), "{e:#}");
    }
}
