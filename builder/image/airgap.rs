//! Container images in `kiln lock` and `kiln build`: registry credentials,
//! pinning tags to digests, and baking one archive per locked image into K3s's airgap directory.
//!
//! The registry protocol itself lives in [`crate::image::oci`]; this module is the
//! glue between it and the lock, the cache and compose.

use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::image::compose::{AddKind, Addition, Content};
use crate::image::lock::Lockfile;
use crate::image::oci::{Auth, ImageRef, PullOptions};
use crate::image::recipe::Recipe;

/// Where K3s's containerd imports image archives from at start (airgap).
pub(crate) const AIRGAP_DIR: &str = "/var/lib/rancher/k3s/agent/images";

/// Registry credentials: `--docker-config FILE` when given, else
/// `$DOCKER_CONFIG/config.json` when `DOCKER_CONFIG` is set, else
/// `~/.docker/config.json` when it exists, else anonymous (public images;
/// bearer tokens are still fetched when a registry asks for them).
/// Registries on loopback are spoken to over plain HTTP.
pub(crate) fn registry_auth(docker_config: Option<&Path>) -> Result<Auth> {
    let path = match docker_config {
        Some(p) => Some(p.to_path_buf()),
        None => default_docker_config(
            std::env::var_os("DOCKER_CONFIG").map(PathBuf::from),
            std::env::var_os("HOME").map(PathBuf::from),
        ),
    };
    match path {
        Some(p) => Auth::from_docker_config(&p),
        None => Ok(Auth::anonymous()),
    }
}

fn default_docker_config(docker_config: Option<PathBuf>, home: Option<PathBuf>) -> Option<PathBuf> {
    if let Some(dir) = docker_config.filter(|d| !d.as_os_str().is_empty()) {
        // Docker's own rule: DOCKER_CONFIG names the directory, and it must hold config.json.
        return Some(dir.join("config.json"));
    }
    home.map(|h| h.join(".docker/config.json"))
        .filter(|p| p.is_file())
}

/// Pin one recipe reference (`kiln lock`): a tag is resolved to the digest
/// the registry serves now; a reference with a digest keeps it.
pub(crate) fn resolve_reference(reference: &str, auth: &Auth) -> Result<String> {
    let image = ImageRef::parse(reference)
        .with_context(|| format!("image `{reference}` is not a valid reference"))?;
    crate::image::oci::resolve(&image, auth)
}

/// The recipe's images pinned to their locked digests, in recipe order.
pub(crate) fn locked_refs(recipe: &Recipe, lock: &Lockfile) -> Result<Vec<ImageRef>> {
    recipe
        .images
        .iter()
        .map(|i| {
            let image = ImageRef::parse(&i.reference)
                .with_context(|| format!("image `{}` is not a valid reference", i.reference))?;
            match lock.images.get(&i.reference) {
                Some(d) => image.with_digest(d),
                // pull() refuses it, naming the image and `kiln lock`.
                None => Ok(image),
            }
        })
        .collect()
}

/// Bytes `disk.size` leaves for image archives: the root partition less the
/// base rootfs and the artifacts, with 5 % kept for ext4's own metadata.
pub(crate) fn space_left(root_size: u64, used: u64) -> u64 {
    (root_size - root_size / 20).saturating_sub(used)
}

/// What [`bake`] produced: archives written under `scratch`, as compose additions.
#[derive(Default)]
pub(crate) struct Baked {
    pub additions: Vec<Addition>,
    /// No blob had to be downloaded.
    pub all_cached: bool,
    /// Every OCI blob the archives carry (hex sha256), for the cache's records.
    pub blobs: Vec<String>,
}

/// Settings for [`bake`].
pub(crate) struct BakeOptions<'a> {
    /// The kiln cache root; blobs live in `<cache>/oci/blobs/sha256/`.
    pub cache_root: &'a Path,
    pub auth: Auth,
    /// Refuse (naming the images) when they need more bytes than this.
    pub max_total_bytes: Option<u64>,
    /// Where the archives are written before compose streams them in.
    pub scratch: &'a Path,
    pub show_progress: bool,
}

/// Pull the recipe's images at their locked digests (blobs cached by digest;
/// cached blobs and manifests are not fetched again, so a build whose images
/// are all cached makes no request), then write one OCI-layout `.tar` per
/// image for [`AIRGAP_DIR`]. Plain `.tar`, not `.tar.zst`: the layers are
/// already compressed, and Debian's `ctr` imports a plain tar directly.
pub(crate) fn bake(recipe: &Recipe, lock: &Lockfile, opts: &BakeOptions<'_>) -> Result<Baked> {
    let refs = locked_refs(recipe, lock)?;
    if refs.is_empty() {
        return Ok(Baked {
            all_cached: true,
            ..Baked::default()
        });
    }
    let cache_dir = oci_cache_dir(opts.cache_root);
    let before = cached_blobs(&cache_dir);
    let mut pull = PullOptions::new(&cache_dir);
    pull.auth = opts.auth.clone();
    pull.progress = opts.show_progress;
    pull.max_total_bytes = opts.max_total_bytes;
    let pulled = crate::image::oci::pull(&refs, &pull)?;
    let all_cached = cached_blobs(&cache_dir) == before;

    let dir = opts.scratch.join("airgap-images");
    let bar = crate::util::progress::items(
        opts.show_progress,
        Some(pulled.len() as u64),
        "writing image archives",
    );
    let mut additions = Vec::new();
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    for (spec, p) in recipe.images.iter().zip(&pulled) {
        crate::util::check_interrupted()?;
        let file = p.archive_file_name(false);
        if let Some(other) = names.insert(file.clone(), spec.reference.clone()) {
            anyhow::bail!(
                "images `{other}` and `{}` would both be baked as {file}",
                spec.reference
            );
        }
        let host = dir.join(&file);
        let info = crate::image::oci::write_archive(p, &host)?;
        let path = format!("{AIRGAP_DIR}/{file}");
        additions.push(Addition {
            path,
            kind: AddKind::File {
                content: Content::Path {
                    path: host,
                    sha256: Some(info.sha256),
                },
                mode: 0o644,
            },
            origin: format!("image `{}`", spec.reference),
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    let blobs = pulled
        .iter()
        .flat_map(|p| &p.blobs)
        .filter_map(|d| d.digest.strip_prefix("sha256:").map(str::to_string))
        .collect();
    Ok(Baked {
        additions,
        all_cached,
        blobs,
    })
}

/// How many blobs the OCI cache holds (to tell whether a pull downloaded any).
fn cached_blobs(cache_dir: &Path) -> usize {
    std::fs::read_dir(cache_dir.join("blobs/sha256"))
        .map(|rd| rd.count())
        .unwrap_or(0)
}

/// The OCI blob cache inside the kiln cache.
pub(crate) fn oci_cache_dir(cache_root: &Path) -> PathBuf {
    cache_root.join("oci")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe(dir: &Path, images: &str) -> Recipe {
        std::fs::create_dir_all(dir.join("overlays")).unwrap();
        let p = dir.join("r.toml");
        std::fs::write(
            &p,
            format!("name = \"r\"\nversion = \"1\"\nimages = [{images}]\n[base]\nsuite = \"bookworm\"\n"),
        )
        .unwrap();
        Recipe::load(&p).unwrap()
    }

    #[test]
    fn docker_config_env_names_a_directory_holding_config_json() {
        let p = default_docker_config(Some("/etc/kiln-docker".into()), Some("/root".into()));
        assert_eq!(p, Some(PathBuf::from("/etc/kiln-docker/config.json")));
    }

    #[test]
    fn no_docker_config_anywhere_means_anonymous() {
        let home = tempfile::tempdir().unwrap();
        assert_eq!(
            default_docker_config(None, Some(home.path().to_path_buf())),
            None
        );
        std::fs::create_dir_all(home.path().join(".docker")).unwrap();
        std::fs::write(home.path().join(".docker/config.json"), "{}").unwrap();
        assert_eq!(
            default_docker_config(None, Some(home.path().to_path_buf())),
            Some(home.path().join(".docker/config.json"))
        );
    }

    #[test]
    fn locked_refs_carry_the_lock_digest_and_keep_the_tag() {
        let d = tempfile::tempdir().unwrap();
        let r = recipe(d.path(), "\"quay.io/cilium/cilium:v1.18.2\"");
        let mut lock = Lockfile::default();
        let digest = format!("sha256:{}", "ab".repeat(32));
        lock.images
            .insert("quay.io/cilium/cilium:v1.18.2".into(), digest.clone());
        let refs = locked_refs(&r, &lock).unwrap();
        assert_eq!(refs[0].digest(), Some(digest.as_str()));
        assert_eq!(refs[0].containerd_name(), "quay.io/cilium/cilium:v1.18.2");
    }

    #[test]
    fn an_image_missing_from_the_lock_is_refused_by_bake_naming_it() {
        let d = tempfile::tempdir().unwrap();
        let r = recipe(d.path(), "\"127.0.0.1:9/kiln/app:v1\"");
        let err = bake(
            &r,
            &Lockfile::default(),
            &BakeOptions {
                cache_root: d.path(),
                auth: Auth::anonymous(),
                max_total_bytes: None,
                scratch: d.path(),
                show_progress: false,
            },
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            err.contains("127.0.0.1:9/kiln/app:v1") && err.contains("kiln lock"),
            "{err}"
        );
    }

    #[test]
    fn space_left_keeps_room_for_filesystem_metadata() {
        assert_eq!(space_left(2000, 500), 1400);
        assert_eq!(space_left(2000, 5000), 0);
    }
}
