//! How kiln may talk to registries: credentials (from a docker `config.json`),
//! which hosts speak plain HTTP, and the `WWW-Authenticate` challenge parser.

use super::reference::canonical_registry;
use anyhow::{bail, Context, Result};
use base64::Engine as _;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

/// Credentials per registry plus the transport policy. `Auth::anonymous()`
/// pulls public images (bearer tokens are still fetched when a registry asks).
#[derive(Clone, Default)]
pub struct Auth {
    credentials: BTreeMap<String, Credential>,
    insecure: BTreeSet<String>,
}

#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Credential {
    pub username: String,
    pub password: String,
}

impl Credential {
    /// The `Authorization: Basic …` header value.
    pub(crate) fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print secrets: only which registries have credentials.
        f.debug_struct("Auth")
            .field(
                "credentials_for",
                &self.credentials.keys().collect::<Vec<_>>(),
            )
            .field("insecure", &self.insecure)
            .finish()
    }
}

impl Auth {
    /// No credentials; HTTPS everywhere except loopback.
    pub fn anonymous() -> Self {
        Self::default()
    }

    /// Read `auths` from a docker `config.json`: each entry's `auth`
    /// (base64 `user:password`) or `username` + `password`. Entries with
    /// neither (credential helpers) are skipped: kiln runs no helpers.
    pub fn from_docker_config(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read registry credentials {}", path.display()))?;
        Self::anonymous()
            .add_docker_config(&text)
            .with_context(|| format!("registry credentials {}", path.display()))
    }

    /// Merge the `auths` of a docker `config.json` given as text.
    pub fn add_docker_config(mut self, json: &str) -> Result<Self> {
        #[derive(serde::Deserialize)]
        struct Config {
            #[serde(default)]
            auths: BTreeMap<String, Entry>,
        }
        #[derive(serde::Deserialize)]
        struct Entry {
            auth: Option<String>,
            username: Option<String>,
            password: Option<String>,
        }
        let cfg: Config = serde_json::from_str(json).context("not a docker config.json")?;
        for (key, e) in cfg.auths {
            let host = registry_key(&key);
            let cred = if let Some(a) = e.auth.filter(|a| !a.is_empty()) {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(a.trim())
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .with_context(|| format!("auths.{key}.auth is not base64 of user:password"))?;
                let Some((u, p)) = raw.split_once(':') else {
                    bail!("auths.{key}.auth does not decode to user:password");
                };
                Credential {
                    username: u.to_string(),
                    password: p.to_string(),
                }
            } else if let (Some(u), Some(p)) = (e.username, e.password) {
                Credential {
                    username: u,
                    password: p,
                }
            } else {
                continue;
            };
            self.credentials.insert(host, cred);
        }
        Ok(self)
    }

    /// Use `username`/`password` for `registry` (`quay.io`, `127.0.0.1:5000`).
    pub fn with_credentials(mut self, registry: &str, username: &str, password: &str) -> Self {
        self.credentials.insert(
            registry_key(registry),
            Credential {
                username: username.into(),
                password: password.into(),
            },
        );
        self
    }

    /// Talk plain HTTP to `registry` (loopback registries always do).
    pub fn with_insecure_registry(mut self, registry: &str) -> Self {
        self.insecure.insert(registry_key(registry));
        self
    }

    pub fn has_credentials_for(&self, registry: &str) -> bool {
        self.credentials.contains_key(&registry_key(registry))
    }

    pub(crate) fn credential_for(&self, registry: &str) -> Option<&Credential> {
        self.credentials.get(&registry_key(registry))
    }

    /// `http` for loopback and registries marked insecure, else `https`.
    pub fn scheme_for(&self, registry: &str) -> &'static str {
        let key = registry_key(registry);
        let host = if let Some(rest) = key.strip_prefix('[') {
            rest.split(']').next().unwrap_or("")
        } else {
            key.split(':').next().unwrap_or("")
        };
        let loopback = host == "localhost"
            || host == "::1"
            || host
                .parse::<std::net::Ipv4Addr>()
                .is_ok_and(|ip| ip.is_loopback());
        if loopback || self.insecure.contains(&key) {
            "http"
        } else {
            "https"
        }
    }
}

/// `https://index.docker.io/v1/` → `docker.io`; `quay.io/` → `quay.io`.
fn registry_key(key: &str) -> String {
    let k = key.trim();
    let k = k
        .strip_prefix("https://")
        .or_else(|| k.strip_prefix("http://"))
        .unwrap_or(k);
    canonical_registry(k.split('/').next().unwrap_or(k))
}

/// One `WWW-Authenticate` challenge: scheme and its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Challenge {
    pub scheme: String,
    pub params: BTreeMap<String, String>,
}

/// Parse `Bearer realm="…",service="…",scope="repository:a/b:pull"`.
/// Quoted values may hold commas (`scope="repository:x:pull,push"`).
pub(crate) fn parse_challenge(header: &str) -> Option<Challenge> {
    let h = header.trim();
    let (scheme, rest) = match h.split_once(char::is_whitespace) {
        Some((s, r)) => (s, r),
        None => (h, ""),
    };
    if scheme.is_empty() {
        return None;
    }
    let mut params = BTreeMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let key: String = chars
            .by_ref()
            .take_while(|c| *c != '=')
            .collect::<String>()
            .trim()
            .to_ascii_lowercase();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek().copied() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
            value = value.trim().to_string();
        }
        params.insert(key, value);
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenge_with_commas_in_scope_parses() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull,push""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "https://auth.docker.io/token");
        assert_eq!(c.params["service"], "registry.docker.io");
        assert_eq!(c.params["scope"], "repository:library/alpine:pull,push");
    }

    #[test]
    fn basic_challenge_parses_without_quotes() {
        let c = parse_challenge("Basic realm=registry").unwrap();
        assert_eq!(c.scheme, "basic");
        assert_eq!(c.params["realm"], "registry");
    }

    #[test]
    fn docker_config_auth_field_and_plain_fields_both_work() {
        let json = r#"{"auths":{
            "https://index.docker.io/v1/":{"auth":"dXNlcjpwYTpzcw=="},
            "quay.io":{"username":"robot","password":"tok"},
            "ghcr.io":{}
        },"credsStore":"desktop"}"#;
        let a = Auth::anonymous().add_docker_config(json).unwrap();
        let hub = a.credential_for("docker.io").unwrap();
        assert_eq!(
            (hub.username.as_str(), hub.password.as_str()),
            ("user", "pa:ss")
        );
        let q = a.credential_for("quay.io").unwrap();
        assert_eq!((q.username.as_str(), q.password.as_str()), ("robot", "tok"));
        assert!(!a.has_credentials_for("ghcr.io"));
        assert!(
            !format!("{a:?}").contains("tok"),
            "Debug must not leak secrets"
        );
    }

    #[test]
    fn docker_config_with_undecodable_auth_is_refused() {
        let err = Auth::anonymous()
            .add_docker_config(r#"{"auths":{"quay.io":{"auth":"!!!"}}}"#)
            .unwrap_err();
        assert!(format!("{err:#}").contains("auths.quay.io.auth"), "{err:#}");
    }

    #[test]
    fn only_loopback_and_marked_registries_use_plain_http() {
        let a = Auth::anonymous().with_insecure_registry("registry.lan:5000");
        assert_eq!(a.scheme_for("127.0.0.1:5000"), "http");
        assert_eq!(a.scheme_for("localhost:5000"), "http");
        assert_eq!(a.scheme_for("[::1]:5000"), "http");
        assert_eq!(a.scheme_for("registry.lan:5000"), "http");
        assert_eq!(a.scheme_for("quay.io"), "https");
        assert_eq!(a.scheme_for("127.example.com"), "https");
    }
}
