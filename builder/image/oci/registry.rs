//! The registry HTTP client (OCI distribution API v2, blocking reqwest): GETs
//! with the 401 → bearer-token (or Basic) dance, and status codes as errors.

use super::auth::{parse_challenge, Auth};
use super::reference::ImageRef;
use anyhow::{anyhow, Context, Error};
use reqwest::blocking::{Client, Response};
use reqwest::header::{ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::StatusCode;
use std::collections::HashMap;
use std::sync::Mutex;

/// Whether trying again may help (5xx, 429, dropped connections, short
/// bodies) or cannot (401/404, digest mismatch, malformed documents).
#[derive(Debug)]
pub(crate) enum Fault {
    Retry(Error),
    Fatal(Error),
}

impl Fault {
    pub(super) fn into_error(self) -> Error {
        match self {
            Fault::Retry(e) | Fault::Fatal(e) => e,
        }
    }
}

impl From<Error> for Fault {
    fn from(e: Error) -> Self {
        Fault::Fatal(e)
    }
}

/// One client for all pulls: connection pool, credentials, and the
/// `Authorization` value that last worked per (registry, repository).
pub(crate) struct Registry {
    http: Client,
    auth: Auth,
    authorizations: Mutex<HashMap<(String, String), String>>,
}

impl Registry {
    pub(super) fn new(auth: &Auth) -> anyhow::Result<Self> {
        // The artifact downloads' timeouts (and their environment overrides).
        let policy = crate::image::fetch::FetchPolicy::from_env()?;
        let http = Client::builder()
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(policy.connect_timeout)
            // Per read, not per request: big layers may take minutes.
            .timeout(policy.read_timeout)
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Self {
            http,
            auth: auth.clone(),
            authorizations: Mutex::new(HashMap::new()),
        })
    }

    /// `GET /v2/<repo>/<kind>/<reference>`, authorizing when challenged.
    /// `what` names the object in errors ("manifest sha256:…", "tag v1").
    pub(super) fn get(
        &self,
        image: &ImageRef,
        kind: &str,
        reference: &str,
        accept: Option<&str>,
        what: &str,
    ) -> Result<Response, Fault> {
        let url = format!(
            "{}://{}/v2/{}/{kind}/{reference}",
            self.auth.scheme_for(image.registry()),
            image.endpoint(),
            image.repository()
        );
        let send = |authz: Option<&str>| {
            let mut rb = self.http.get(&url);
            if let Some(a) = accept {
                rb = rb.header(ACCEPT, a);
            }
            if let Some(z) = authz {
                rb = rb.header(AUTHORIZATION, z);
            }
            send(rb)?.map_err(|e| {
                Fault::Retry(anyhow!(
                    "cannot reach registry {}: {}",
                    image.registry(),
                    crate::util::error_chain(&e)
                ))
            })
        };
        let key = (image.registry().to_string(), image.repository().to_string());
        let known = self.authorizations.lock().unwrap().get(&key).cloned();
        let mut resp = send(known.as_deref())?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            // No token yet, or it expired: answer the challenge and try once more.
            let authz = self.authorize(image, &resp)?;
            self.authorizations
                .lock()
                .unwrap()
                .insert(key, authz.clone());
            resp = send(Some(&authz))?;
        }
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let registry = image.registry();
        Err(match status.as_u16() {
            401 | 403 => Fault::Fatal(anyhow!(
                "registry {registry} refused access to {what} ({status}){}",
                self.credential_hint(registry)
            )),
            404 => Fault::Fatal(anyhow!(
                "{what} not found in {}/{} ({status})",
                registry,
                image.repository()
            )),
            429 | 500..=599 => {
                Fault::Retry(anyhow!("registry {registry} answered {status} for {what}"))
            }
            _ => Fault::Fatal(anyhow!("registry {registry} answered {status} for {what}")),
        })
    }

    fn credential_hint(&self, registry: &str) -> String {
        if self.auth.has_credentials_for(registry) {
            format!("; the credentials given for {registry} were used")
        } else {
            format!("; no credentials were given for {registry} (add them to a docker config.json)")
        }
    }

    /// The `Authorization` header value answering a 401's challenge.
    fn authorize(&self, image: &ImageRef, resp: &Response) -> Result<String, Fault> {
        let registry = image.registry();
        let header = resp
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|h| h.to_str().ok())
            .ok_or_else(|| {
                Fault::Fatal(anyhow!(
                    "registry {registry} answered 401 without a WWW-Authenticate challenge"
                ))
            })?;
        let challenge = parse_challenge(header).ok_or_else(|| {
            Fault::Fatal(anyhow!(
                "registry {registry} sent an unreadable challenge `{header}`"
            ))
        })?;
        let cred = self.auth.credential_for(registry);
        match challenge.scheme.as_str() {
            "basic" => cred.map(|c| c.basic_header()).ok_or_else(|| {
                Fault::Fatal(anyhow!(
                    "registry {registry} requires a login (401, Basic); give credentials for {registry} in a docker config.json"
                ))
            }),
            "bearer" => {
                let realm = challenge.params.get("realm").ok_or_else(|| {
                    Fault::Fatal(anyhow!(
                        "registry {registry} sent a Bearer challenge without a realm"
                    ))
                })?;
                let mut url = reqwest::Url::parse(realm).map_err(|e| {
                    Fault::Fatal(anyhow!(
                        "registry {registry} names a bad token realm `{realm}`: {e}"
                    ))
                })?;
                let scope = challenge
                    .params
                    .get("scope")
                    .cloned()
                    .unwrap_or_else(|| format!("repository:{}:pull", image.repository()));
                {
                    let mut q = url.query_pairs_mut();
                    if let Some(service) = challenge.params.get("service") {
                        q.append_pair("service", service);
                    }
                    q.append_pair("scope", &scope);
                }
                let mut rb = self.http.get(url.clone());
                if let Some(c) = cred {
                    rb = rb.header(AUTHORIZATION, c.basic_header());
                }
                let token_resp = send(rb)?.map_err(|e| {
                    Fault::Retry(anyhow!(
                        "cannot reach the token service {realm} of {registry}: {}",
                        crate::util::error_chain(&e)
                    ))
                })?;
                let status = token_resp.status();
                if !status.is_success() {
                    let msg = anyhow!(
                        "token service {realm} refused a token for {scope} ({status}){}",
                        self.credential_hint(registry)
                    );
                    return Err(if status.is_server_error() {
                        Fault::Retry(msg)
                    } else {
                        Fault::Fatal(msg)
                    });
                }
                #[derive(serde::Deserialize)]
                struct Token {
                    token: Option<String>,
                    access_token: Option<String>,
                }
                let t: Token = token_resp.json().map_err(|e| {
                    Fault::Fatal(anyhow!(
                        "token service {realm} sent an unreadable answer: {e}"
                    ))
                })?;
                let token = t
                    .token
                    .or(t.access_token)
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| {
                        Fault::Fatal(anyhow!("token service {realm} sent no token"))
                    })?;
                Ok(format!("Bearer {token}"))
            }
            other => Err(Fault::Fatal(anyhow!(
                "registry {registry} asks for `{other}` authentication, which kiln does not speak"
            ))),
        }
    }
}

/// Send a request, giving up at once on Ctrl-C (a stalled registry would
/// otherwise hold the pull until the read timeout).
fn send(rb: reqwest::blocking::RequestBuilder) -> Result<reqwest::Result<Response>, Fault> {
    crate::util::interruptible(move || rb.send()).map_err(Fault::Fatal)
}
