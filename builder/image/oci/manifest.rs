//! OCI and Docker v2 manifest and index documents: media types, parsing, and
//! choosing the manifest for one platform (linux/amd64) out of an index.

use super::reference::check_digest;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

pub(super) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(super) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(super) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub(super) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// The `Accept` header for manifest requests: every type kiln understands.
pub(super) const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// Manifests and indexes are small; a registry sending more is refused.
pub(super) const MAX_MANIFEST_BYTES: u64 = 4 << 20;

/// A content descriptor: what a manifest says about a blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An OS/architecture pair (plus optional variant), as in index entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// The platform kiln's nodes run.
    pub fn linux_amd64() -> Self {
        Self {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }

    /// `linux/amd64` or `linux/arm64/v8`.
    pub fn parse(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Self {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, v] if !os.is_empty() && !arch.is_empty() && !v.is_empty() => Ok(Self {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: Some(v.to_string()),
            }),
            _ => bail!("`{s}` is not a platform (os/architecture[/variant], e.g. linux/amd64)"),
        }
    }
}

impl Default for Platform {
    fn default() -> Self {
        Self::linux_amd64()
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// A parsed manifest document: either an index of per-platform manifests or
/// one image manifest (config + layers).
#[derive(Debug, Clone)]
pub(super) enum Document {
    Index {
        media_type: String,
        manifests: Vec<Descriptor>,
    },
    Image {
        media_type: String,
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
}

impl Document {
    /// Parse manifest bytes. The media type comes from the document's own
    /// `mediaType`, else from the HTTP `Content-Type`, else from its shape.
    pub(super) fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<Self> {
        #[derive(Deserialize)]
        struct Raw {
            #[serde(rename = "schemaVersion")]
            schema_version: Option<u32>,
            #[serde(rename = "mediaType")]
            media_type: Option<String>,
            manifests: Option<Vec<Descriptor>>,
            config: Option<Descriptor>,
            layers: Option<Vec<Descriptor>>,
        }
        let raw: Raw = serde_json::from_slice(bytes).context("manifest is not valid JSON")?;
        if raw.schema_version != Some(2) {
            bail!(
                "manifest schemaVersion is {:?}; only schema 2 (OCI or Docker v2) is supported",
                raw.schema_version
            );
        }
        let content_type = content_type
            .map(|c| c.split(';').next().unwrap_or("").trim())
            .filter(|c| [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST].contains(c));
        let media_type = raw
            .media_type
            .clone()
            .or(content_type.map(str::to_string))
            .unwrap_or_else(|| {
                if raw.manifests.is_some() {
                    OCI_INDEX.into()
                } else {
                    OCI_MANIFEST.into()
                }
            });
        let doc = match media_type.as_str() {
            OCI_INDEX | DOCKER_LIST => Document::Index {
                manifests: raw
                    .manifests
                    .ok_or_else(|| anyhow!("index lacks `manifests`"))?,
                media_type,
            },
            OCI_MANIFEST | DOCKER_MANIFEST => Document::Image {
                config: raw
                    .config
                    .ok_or_else(|| anyhow!("manifest lacks `config`"))?,
                layers: raw
                    .layers
                    .ok_or_else(|| anyhow!("manifest lacks `layers`"))?,
                media_type,
            },
            other => bail!("unsupported manifest media type `{other}`"),
        };
        for d in doc.descriptors() {
            check_digest(&d.digest).map_err(|e| anyhow!("manifest refers to a bad blob: {e}"))?;
        }
        Ok(doc)
    }

    pub(super) fn media_type(&self) -> &str {
        match self {
            Document::Index { media_type, .. } | Document::Image { media_type, .. } => media_type,
        }
    }

    fn descriptors(&self) -> Vec<&Descriptor> {
        match self {
            Document::Index { manifests, .. } => manifests.iter().collect(),
            Document::Image { config, layers, .. } => {
                std::iter::once(config).chain(layers.iter()).collect()
            }
        }
    }
}

/// The index entry for `want`. An entry without a variant matches any
/// wanted variant-less platform; when several match, the first one wins.
pub(super) fn select_platform<'a>(
    manifests: &'a [Descriptor],
    want: &Platform,
) -> Result<&'a Descriptor> {
    let matches = |d: &&Descriptor| {
        d.platform.as_ref().is_some_and(|p| {
            p.os == want.os
                && p.architecture == want.architecture
                && (want.variant.is_none() || p.variant == want.variant)
        })
    };
    // Prefer an exact variant match (none wanted → none given) over a looser one.
    manifests
        .iter()
        .filter(matches)
        .find(|d| d.platform.as_ref().unwrap().variant == want.variant)
        .or_else(|| manifests.iter().find(matches))
        .ok_or_else(|| {
            let have: Vec<String> = manifests
                .iter()
                .filter_map(|d| d.platform.as_ref().map(|p| p.to_string()))
                .collect();
            anyhow!(
                "the index has no {want} manifest (it has: {})",
                if have.is_empty() {
                    "no platforms".to_string()
                } else {
                    have.join(", ")
                }
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: char) -> String {
        format!("sha256:{}", n.to_string().repeat(64))
    }

    fn entry(digest: String, os: &str, arch: &str, variant: Option<&str>) -> Descriptor {
        Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest,
            size: 1,
            platform: Some(Platform {
                os: os.into(),
                architecture: arch.into(),
                variant: variant.map(Into::into),
            }),
            annotations: Default::default(),
        }
    }

    #[test]
    fn linux_amd64_is_chosen_out_of_a_multi_platform_index() {
        let list = vec![
            entry(d('a'), "linux", "arm64", Some("v8")),
            entry(d('b'), "linux", "amd64", None),
            entry(d('c'), "unknown", "unknown", None),
        ];
        assert_eq!(
            select_platform(&list, &Platform::linux_amd64())
                .unwrap()
                .digest,
            d('b')
        );
    }

    #[test]
    fn an_index_without_the_platform_names_what_it_has() {
        let list = vec![entry(d('a'), "linux", "arm64", Some("v8"))];
        let err = select_platform(&list, &Platform::linux_amd64())
            .unwrap_err()
            .to_string();
        assert!(err.contains("no linux/amd64 manifest"), "{err}");
        assert!(err.contains("linux/arm64/v8"), "{err}");
    }

    #[test]
    fn docker_manifest_list_parses_as_an_index() {
        let json = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_LIST}","manifests":[{{"mediaType":"{DOCKER_MANIFEST}","digest":"{}","size":7,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#,
            d('e')
        );
        let doc = Document::parse(json.as_bytes(), None).unwrap();
        assert!(matches!(doc, Document::Index { .. }));
        assert_eq!(doc.media_type(), DOCKER_LIST);
    }

    #[test]
    fn media_type_falls_back_to_content_type_then_shape() {
        let json = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"x","digest":"{}","size":1}},"layers":[]}}"#,
            d('f')
        );
        let doc = Document::parse(json.as_bytes(), Some(DOCKER_MANIFEST)).unwrap();
        assert_eq!(doc.media_type(), DOCKER_MANIFEST);
        let doc = Document::parse(json.as_bytes(), Some("text/plain")).unwrap();
        assert_eq!(doc.media_type(), OCI_MANIFEST);
    }

    #[test]
    fn a_manifest_pointing_outside_the_cache_is_refused() {
        let json = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"x","digest":"sha256:../../../etc/passwd","size":1},"layers":[]}"#;
        let err = Document::parse(json.as_bytes(), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad blob"), "{err}");
    }

    #[test]
    fn schema1_manifests_are_refused() {
        let err = Document::parse(br#"{"schemaVersion":1,"fsLayers":[]}"#, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("schema 2"), "{err}");
    }

    #[test]
    fn platforms_parse_and_print() {
        assert_eq!(
            Platform::parse("linux/amd64").unwrap(),
            Platform::linux_amd64()
        );
        assert_eq!(
            Platform::parse("linux/arm64/v8").unwrap().to_string(),
            "linux/arm64/v8"
        );
        assert!(Platform::parse("linux").is_err());
    }
}
