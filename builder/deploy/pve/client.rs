//! Requests to the Proxmox VE HTTP API: token auth, TLS with a CA file or a
//! pinned fingerprint, PVE's `{"data": ...}` answers and error decoding.

use super::config::{parse_fingerprint, Target, Token};
use super::errors::ApiError;
use anyhow::{anyhow, bail, Context, Result};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Percent-encode one path segment (UPIDs and volume ids contain `:` and `/`).
pub(crate) fn seg(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// A connected API client for one target; node-level requests go to `node`.
#[derive(Clone)]
pub(crate) struct Pve {
    pub(super) http: reqwest::blocking::Client,
    /// Async client for uploads; keeps no idle connections because each
    /// upload runs on its own short-lived runtime.
    pub(super) upload_http: reqwest::Client,
    pub(super) base: String,
    pub(super) token: Token,
    pub node: String,
    pub task_timeout: Duration,
}

/// Verifies the server certificate only by its pinned SHA-256 fingerprint
/// (signatures of the handshake are still checked).
#[derive(Debug)]
struct PinnedCert {
    fingerprint: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use sha2::Digest;
        let got: [u8; 32] = sha2::Sha256::digest(end_entity.as_ref()).into();
        if got == self.fingerprint {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "server certificate fingerprint {} does not match the pinned {}",
                colon_hex(&got),
                colon_hex(&self.fingerprint)
            )))
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

pub(crate) fn colon_hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// How the server certificate is checked.
enum TlsSetup {
    /// System roots (webpki roots bundled with reqwest).
    System,
    /// Extra trusted CA certificates.
    Ca(Vec<reqwest::Certificate>),
    /// Only a certificate with the pinned fingerprint.
    Pinned(Box<rustls::ClientConfig>),
}

impl TlsSetup {
    fn from_target(target: &Target) -> Result<TlsSetup> {
        let cfg = &target.cfg;
        if let Some(fp) = &cfg.fingerprint {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let verifier = PinnedCert {
                fingerprint: parse_fingerprint(fp)?,
                provider: provider.clone(),
            };
            let tls = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth();
            return Ok(TlsSetup::Pinned(Box::new(tls)));
        }
        if let Some(ca) = &cfg.ca_file {
            let pem = std::fs::read(ca)
                .with_context(|| format!("cannot read CA file {}", ca.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("{} holds no PEM certificate", ca.display()))?;
            if certs.is_empty() {
                bail!("{} holds no PEM certificate", ca.display());
            }
            return Ok(TlsSetup::Ca(certs));
        }
        Ok(TlsSetup::System)
    }
}

impl Pve {
    pub(crate) fn connect(target: &Target) -> Result<Pve> {
        let cfg = &target.cfg;
        let tls = TlsSetup::from_target(target)?;
        let agent = concat!("kiln/", env!("CARGO_PKG_VERSION"));
        let mut b = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(15))
            .timeout(None::<Duration>)
            .user_agent(agent);
        let mut ab = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(15))
            .pool_max_idle_per_host(0)
            .user_agent(agent);
        match &tls {
            TlsSetup::Pinned(c) => {
                b = b.use_preconfigured_tls((**c).clone());
                ab = ab.use_preconfigured_tls((**c).clone());
            }
            TlsSetup::Ca(certs) => {
                for c in certs {
                    b = b.add_root_certificate(c.clone());
                    ab = ab.add_root_certificate(c.clone());
                }
            }
            TlsSetup::System => {}
        }
        let http = b.build().context("cannot set up the HTTP client")?;
        let upload_http = ab.build().context("cannot set up the upload client")?;
        Ok(Pve {
            http,
            upload_http,
            base: format!("{}/api2/json", cfg.url.trim_end_matches('/')),
            token: target.token.clone(),
            node: target.nodes().first().cloned().unwrap_or_default(),
            task_timeout: Duration::from_secs(cfg.task_timeout),
        })
    }

    /// The same client for node-level requests to another node of the cluster.
    pub(crate) fn for_node(&self, node: &str) -> Pve {
        Pve {
            node: node.to_string(),
            ..self.clone()
        }
    }

    fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        rb: reqwest::blocking::RequestBuilder,
    ) -> Result<Value> {
        let mut auth = reqwest::header::HeaderValue::from_str(&self.token.header())
            .map_err(|_| anyhow!("the API token contains characters not allowed in a header"))?;
        auth.set_sensitive(true);
        let resp = rb
            .header(reqwest::header::AUTHORIZATION, auth)
            .send()
            .map_err(|e| {
                let what = self.token.redact(&crate::util::error_chain(&e));
                let hint = if what.contains("certificate") {
                    " (for a self-signed Proxmox certificate set ca_file or fingerprint in the target)"
                } else {
                    ""
                };
                anyhow!("{method} {path} on {}: {what}{hint}", self.base)
            })?;
        self.decode(method.as_str(), path, resp)
    }

    fn decode(&self, method: &str, path: &str, resp: reqwest::blocking::Response) -> Result<Value> {
        let status = resp.status();
        let reason = reason_of(resp.extensions());
        let text = resp
            .text()
            .with_context(|| format!("{method} {path}: cannot read the answer"))?;
        self.decode_parts(method, path, status, reason, &text)
    }

    pub(super) fn decode_parts(
        &self,
        method: &str,
        path: &str,
        status: reqwest::StatusCode,
        reason: Option<String>,
        text: &str,
    ) -> Result<Value> {
        let body: Value = serde_json::from_str(text).unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(body.get("data").cloned().unwrap_or(Value::Null));
        }
        let message = body
            .get("message")
            .and_then(Value::as_str)
            .map(|s| s.trim().to_string())
            .or(reason)
            .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_string());
        let errors = body
            .get("errors")
            .and_then(Value::as_object)
            .map(|o| {
                o.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or(&v.to_string()).to_string()))
                    .collect()
            })
            .unwrap_or_default();
        Err(ApiError {
            method: method.into(),
            path: path.into(),
            status: status.as_u16(),
            message: self.token.redact(&message),
            errors,
        }
        .into())
    }

    pub(crate) fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value> {
        let rb = self
            .http
            .get(format!("{}{path}", self.base))
            .query(query)
            .timeout(Duration::from_secs(60));
        self.send(reqwest::Method::GET, path, rb)
    }

    pub(crate) fn post(&self, path: &str, form: &[(String, String)]) -> Result<Value> {
        let rb = self
            .http
            .post(format!("{}{path}", self.base))
            .form(form)
            .timeout(Duration::from_secs(120));
        self.send(reqwest::Method::POST, path, rb)
    }

    pub(crate) fn put(&self, path: &str, form: &[(String, String)]) -> Result<Value> {
        let rb = self
            .http
            .put(format!("{}{path}", self.base))
            .form(form)
            .timeout(Duration::from_secs(120));
        self.send(reqwest::Method::PUT, path, rb)
    }

    pub(crate) fn delete(&self, path: &str, query: &[(&str, String)]) -> Result<Value> {
        let rb = self
            .http
            .delete(format!("{}{path}", self.base))
            .query(query)
            .timeout(Duration::from_secs(60));
        self.send(reqwest::Method::DELETE, path, rb)
    }

    /// `(major, minor)` of the PVE release.
    pub(crate) fn version(&self) -> Result<(u32, u32, String)> {
        let v = self.get("/version", &[])?;
        let full = v
            .get("version")
            .and_then(Value::as_str)
            .context("/version has no version")?
            .to_string();
        let mut it = full
            .split(['.', '-'])
            .map(|x| x.parse::<u32>().unwrap_or(0));
        Ok((it.next().unwrap_or(0), it.next().unwrap_or(0), full))
    }
}

pub(super) fn reason_of(ext: &http::Extensions) -> Option<String> {
    ext.get::<hyper_reason::ReasonPhrase>()
        .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned())
}

/// hyper keeps a non-canonical reason phrase (PVE's error text) in the
/// response extensions; reqwest passes extensions through.
mod hyper_reason {
    pub(super) use hyper::ext::ReasonPhrase;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_encode_volume_ids_and_upids() {
        assert_eq!(seg("local:import/a.qcow2"), "local%3Aimport%2Fa.qcow2");
        assert_eq!(seg("UPID:pve:1:"), "UPID%3Apve%3A1%3A");
    }
}
