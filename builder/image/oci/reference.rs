//! `ImageRef`: a container image reference (`registry/repository:tag@digest`)
//! parsed with Docker's defaults, and the digest syntax kiln accepts.

use anyhow::Result;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// The registry name Docker uses when a reference names none.
pub(super) const DOCKER_HUB: &str = "docker.io";
/// Where Docker Hub's registry API actually answers.
pub(super) const DOCKER_HUB_ENDPOINT: &str = "registry-1.docker.io";

/// A parsed image reference. Registry names are canonical (`docker.io`, never
/// `index.docker.io`); Docker Hub's one-component names gain `library/`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageRef {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<String>,
}

impl ImageRef {
    /// Parse `[registry/]repository[:tag][@sha256:<64 hex>]`.
    ///
    /// The first path component is a registry when it contains `.` or `:` or
    /// is `localhost` (Docker's rule); otherwise the registry is `docker.io`.
    pub fn parse(input: &str) -> Result<Self> {
        let s = input.trim();
        let bad = |why: &str| anyhow::anyhow!("`{input}` is not an image reference: {why}");
        if s.is_empty() {
            return Err(bad("it is empty"));
        }
        let (rest, digest) = match s.rsplit_once('@') {
            Some((r, d)) => {
                check_digest(d).map_err(|e| bad(&e))?;
                (r, Some(d.to_string()))
            }
            None => (s, None),
        };
        // A tag is a `:` after the last `/` (a `:` before it is a port).
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let at = last_slash + i;
                (&rest[..at], Some(rest[at + 1..].to_string()))
            }
            None => (rest, None),
        };
        if let Some(t) = &tag {
            check_tag(t).map_err(|e| bad(&e))?;
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (canonical_registry(first), path.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        if registry.is_empty() || registry.chars().any(|c| c.is_whitespace() || c == '@') {
            return Err(bad("the registry name is malformed"));
        }
        check_repository(&repository).map_err(|e| bad(&e))?;
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        Ok(Self {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// Registry name as written in references (`docker.io`, `quay.io`, `127.0.0.1:5000`).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// Host (and port) the registry API answers on: Docker Hub's differs from its name.
    pub fn endpoint(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_ENDPOINT
        } else {
            &self.registry
        }
    }

    /// Repository path inside the registry (`cilium/cilium`, `library/alpine`).
    pub fn repository(&self) -> &str {
        &self.repository
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// `sha256:<hex>` when the reference is pinned.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// The same reference pinned to `digest` (the tag, if any, is kept for people).
    pub fn with_digest(&self, digest: &str) -> Result<Self> {
        check_digest(digest).map_err(|e| anyhow::anyhow!("{self}: {e}"))?;
        Ok(Self {
            digest: Some(digest.to_string()),
            ..self.clone()
        })
    }

    /// `registry/repository`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The name containerd (and so the kubelet) knows the image by:
    /// `name:tag` when tagged, else `name@digest`.
    pub fn containerd_name(&self) -> String {
        match (&self.tag, &self.digest) {
            (Some(t), _) => format!("{}:{t}", self.name()),
            (None, Some(d)) => format!("{}@{d}", self.name()),
            (None, None) => format!("{}:latest", self.name()),
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl FromStr for ImageRef {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl Serialize for ImageRef {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ImageRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Docker Hub answers to several names; kiln writes one.
pub(crate) fn canonical_registry(host: &str) -> String {
    let h = host.trim().to_ascii_lowercase();
    match h.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            DOCKER_HUB.to_string()
        }
        _ => h,
    }
}

/// Only sha256 digests: `sha256:` and 64 lowercase hex digits. Checked before a
/// digest ever becomes a file name, so a hostile manifest cannot escape the cache.
pub fn check_digest(d: &str) -> std::result::Result<(), String> {
    let Some((algo, hex)) = d.split_once(':') else {
        return Err(format!("digest `{d}` lacks an algorithm (sha256:…)"));
    };
    if algo != "sha256" {
        return Err(format!(
            "digest `{d}` uses {algo}; kiln verifies sha256 digests only"
        ));
    }
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(format!(
            "digest `{d}` is not sha256 followed by 64 lowercase hex digits"
        ));
    }
    Ok(())
}

fn check_tag(t: &str) -> std::result::Result<(), String> {
    let ok = !t.is_empty()
        && t.len() <= 128
        && t.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!("tag `{t}` is malformed"))
    }
}

fn check_repository(r: &str) -> std::result::Result<(), String> {
    if r.is_empty() {
        return Err("the repository name is empty".into());
    }
    for comp in r.split('/') {
        let ok = !comp.is_empty()
            && comp
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
            && comp.starts_with(|c: char| c.is_ascii_alphanumeric())
            && comp.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !ok {
            return Err(format!(
                "repository component `{comp}` must be lowercase letters, digits and . _ -"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn quay_reference_with_tag_and_digest_parses() {
        let r = ImageRef::parse(&format!("quay.io/cilium/cilium:v1.18.2@{D}")).unwrap();
        assert_eq!(r.registry(), "quay.io");
        assert_eq!(r.endpoint(), "quay.io");
        assert_eq!(r.repository(), "cilium/cilium");
        assert_eq!(r.tag(), Some("v1.18.2"));
        assert_eq!(r.digest(), Some(D));
        assert_eq!(r.to_string(), format!("quay.io/cilium/cilium:v1.18.2@{D}"));
        assert_eq!(r.containerd_name(), "quay.io/cilium/cilium:v1.18.2");
    }

    #[test]
    fn docker_hub_short_names_get_library_and_the_api_host() {
        let r = ImageRef::parse("alpine:3.20").unwrap();
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(r.endpoint(), "registry-1.docker.io");
        assert_eq!(r.repository(), "library/alpine");
        assert_eq!(r.to_string(), "docker.io/library/alpine:3.20");
        let r = ImageRef::parse("index.docker.io/rancher/mirrored-pause:3.6").unwrap();
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(r.repository(), "rancher/mirrored-pause");
    }

    #[test]
    fn a_port_is_not_mistaken_for_a_tag() {
        let r = ImageRef::parse("127.0.0.1:5000/kiln/busy").unwrap();
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "kiln/busy");
        assert_eq!(r.tag(), None);
        assert_eq!(r.containerd_name(), "127.0.0.1:5000/kiln/busy:latest");
        let r = ImageRef::parse("localhost/x:1").unwrap();
        assert_eq!((r.registry(), r.tag()), ("localhost", Some("1")));
    }

    #[test]
    fn digest_only_reference_is_named_by_digest_in_containerd() {
        let r = ImageRef::parse(&format!("ghcr.io/a/b@{D}")).unwrap();
        assert_eq!(r.tag(), None);
        assert_eq!(r.containerd_name(), format!("ghcr.io/a/b@{D}"));
    }

    #[test]
    fn malformed_references_are_refused_with_the_reason() {
        for (input, why) in [
            ("", "empty"),
            ("quay.io/Cilium/cilium:v1", "lowercase"),
            ("quay.io/cilium/cilium:v1@sha256:abc", "64 lowercase hex"),
            ("quay.io/cilium/cilium@sha512:abc", "sha256 digests only"),
            ("quay.io/cilium/cilium:bad tag", "malformed"),
            ("quay.io//cilium", "repository component"),
        ] {
            let err = ImageRef::parse(input).unwrap_err().to_string();
            assert!(err.contains(why), "{input:?}: {err}");
        }
    }

    #[test]
    fn pinning_keeps_the_tag_and_checks_the_digest() {
        let r = ImageRef::parse("quay.io/cilium/hubble-ui:v0.13.3").unwrap();
        let p = r.with_digest(D).unwrap();
        assert_eq!(p.tag(), Some("v0.13.3"));
        assert_eq!(p.digest(), Some(D));
        assert!(r.with_digest("sha256:../../etc/passwd").is_err());
    }

    #[test]
    fn references_round_trip_through_serde_as_strings() {
        let r = ImageRef::parse(&format!("quay.io/cilium/cilium:v1.18.2@{D}")).unwrap();
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(json, format!("\"quay.io/cilium/cilium:v1.18.2@{D}\""));
        let back: ImageRef = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
    }
}
