//! kiln::image::oci against a real registry: Debian's `docker-registry` on loopback,
//! images built with umoci and pushed with skopeo, faults and the bearer-token
//! service injected by a loopback proxy (a stand-in for quay.io/ghcr.io/docker.io).

mod oci_support;

use kiln::image::oci::{pull, resolve, write_archive, Auth, ImageRef, PullOptions};
use oci_support::*;

/// Registry with one amd64 image `kiln/app:v1`; returns (registry, digest).
fn registry_with_app(test: &str) -> Option<(Registry, String)> {
    if !have_tools(test, REGISTRY_TOOLS) {
        return None;
    }
    let reg = Registry::start();
    let digest = reg.push_image("kiln/app", "v1", &[("etc/app.conf", b"answer=42\n")], None);
    Some((reg, digest))
}

fn pinned(host: &str, repo_tag: &str, digest: &str) -> ImageRef {
    ImageRef::parse(&format!("{host}/{repo_tag}@{digest}")).unwrap()
}

/// The one-line error a user sees (printed for `--nocapture` readers).
fn err_text(e: anyhow::Error) -> String {
    let text = format!("{e:#}");
    eprintln!("error: {text}");
    text
}

#[test]
fn resolve_pins_a_tag_to_the_digest_the_registry_serves() {
    let Some((reg, digest)) = registry_with_app("resolve") else {
        return;
    };
    let r = ImageRef::parse(&format!("{}/kiln/app:v1", reg.host())).unwrap();
    assert_eq!(resolve(&r, &Auth::anonymous()).unwrap(), digest);
}

#[test]
fn resolving_a_missing_tag_is_a_404_naming_the_image() {
    let Some((reg, _)) = registry_with_app("resolve 404") else {
        return;
    };
    let r = ImageRef::parse(&format!("{}/kiln/app:nope", reg.host())).unwrap();
    let err = err_text(resolve(&r, &Auth::anonymous()).unwrap_err());
    assert!(
        err.contains(&format!("{}/kiln/app:nope", reg.host())),
        "{err}"
    );
    assert!(err.contains("404"), "{err}");
}

#[test]
fn pull_caches_every_blob_under_its_verified_digest() {
    let Some((reg, digest)) = registry_with_app("pull") else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let cache = cache_in(t.path());
    let img = pinned(&reg.host(), "kiln/app:v1", &digest);
    let pulled = pull(std::slice::from_ref(&img), &PullOptions::new(&cache)).unwrap();
    assert_eq!(pulled.len(), 1);
    let p = &pulled[0];
    assert_eq!(p.target.digest, digest);
    assert_eq!(p.manifest_digest, digest);
    let mut want: Vec<String> = std::iter::once(digest.clone())
        .chain(reg.blobs_of("kiln/app", &digest))
        .map(|d| d[7..].to_string())
        .collect();
    want.sort();
    assert_eq!(cache_files(&cache), want);
    for name in cache_files(&cache) {
        let file = cache.join("blobs/sha256").join(&name);
        assert_eq!(kiln::util::sha256_file(&file).unwrap(), name);
    }
    assert_eq!(
        p.total_bytes,
        p.blobs.iter().map(|b| b.size).sum::<u64>(),
        "total_bytes is what the archive carries"
    );
}

#[test]
fn multi_platform_index_pulls_only_the_linux_amd64_manifest() {
    if !have_tools("index", REGISTRY_TOOLS) {
        return;
    }
    let reg = Registry::start();
    let amd = reg.push_image("kiln/multi", "amd64", &[("bin/tool", b"x86 tool")], None);
    let arm = reg.push_image(
        "kiln/multi",
        "arm64",
        &[("bin/tool", b"arm tool")],
        Some("arm64"),
    );
    let index = reg.push_index("kiln/multi", "v2", &[(&arm, "arm64"), (&amd, "amd64")]);
    let r = ImageRef::parse(&format!("{}/kiln/multi:v2", reg.host())).unwrap();
    assert_eq!(
        resolve(&r, &Auth::anonymous()).unwrap(),
        index,
        "lock pins the index"
    );

    let t = tempfile::tempdir().unwrap();
    let cache = cache_in(t.path());
    let pulled = pull(&[r.with_digest(&index).unwrap()], &PullOptions::new(&cache)).unwrap();
    let p = &pulled[0];
    assert_eq!(p.target.digest, index);
    assert_eq!(
        p.target.media_type,
        "application/vnd.oci.image.index.v1+json"
    );
    assert_eq!(p.manifest_digest, amd);
    let files = cache_files(&cache);
    for d in reg.blobs_of("kiln/multi", &amd) {
        assert!(
            files.contains(&d[7..].to_string()),
            "amd64 blob {d} missing"
        );
    }
    let arm_config = &reg.blobs_of("kiln/multi", &arm)[0];
    assert!(
        !files.contains(&arm_config[7..].to_string()),
        "arm64 config was pulled"
    );
    assert!(
        !files.contains(&arm[7..].to_string()),
        "arm64 manifest was pulled"
    );
}

#[test]
fn index_without_linux_amd64_is_refused_naming_the_image() {
    if !have_tools("index without amd64", REGISTRY_TOOLS) {
        return;
    }
    let reg = Registry::start();
    let arm = reg.push_image("kiln/armonly", "arm64", &[("x", b"arm")], Some("arm64"));
    let index = reg.push_index("kiln/armonly", "v1", &[(&arm, "arm64")]);
    let t = tempfile::tempdir().unwrap();
    let img = pinned(&reg.host(), "kiln/armonly:v1", &index);
    let err = err_text(
        pull(
            std::slice::from_ref(&img),
            &PullOptions::new(cache_in(t.path())),
        )
        .unwrap_err(),
    );
    assert!(err.contains(&img.to_string()), "{err}");
    assert!(err.contains("no linux/amd64 manifest"), "{err}");
    assert!(err.contains("linux/arm64"), "{err}");
}

#[test]
fn unknown_digest_is_a_404_naming_the_image() {
    let Some((reg, _)) = registry_with_app("404") else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let missing = format!("sha256:{}", "0".repeat(64));
    let img = pinned(&reg.host(), "kiln/app:v1", &missing);
    let err = err_text(
        pull(
            std::slice::from_ref(&img),
            &PullOptions::new(cache_in(t.path())),
        )
        .unwrap_err(),
    );
    assert!(err.contains(&img.to_string()), "{err}");
    assert!(err.contains("404"), "{err}");
}

#[test]
fn unpinned_tag_is_refused_before_any_request() {
    let Some((reg, _)) = registry_with_app("unpinned") else {
        return;
    };
    let proxy = Proxy::start(reg.port, Faults::default());
    let t = tempfile::tempdir().unwrap();
    let img = ImageRef::parse(&format!("{}/kiln/app:v1", proxy.host())).unwrap();
    let err = err_text(
        pull(
            std::slice::from_ref(&img),
            &PullOptions::new(cache_in(t.path())),
        )
        .unwrap_err(),
    );
    assert!(
        err.contains(&img.to_string()) && err.contains("kiln lock"),
        "{err}"
    );
    assert!(proxy.requests().is_empty(), "{:?}", proxy.requests());
}

#[test]
fn bearer_token_challenge_is_answered_anonymously() {
    let Some((reg, digest)) = registry_with_app("bearer") else {
        return;
    };
    let proxy = Proxy::start(
        reg.port,
        Faults {
            bearer_token: Some("tok-123".into()),
            ..Faults::default()
        },
    );
    let t = tempfile::tempdir().unwrap();
    let img = pinned(&proxy.host(), "kiln/app:v1", &digest);
    let pulled = pull(&[img], &PullOptions::new(cache_in(t.path()))).unwrap();
    assert_eq!(pulled[0].manifest_digest, digest);
    let log = proxy.requests();
    assert!(
        log.iter()
            .any(|l| l
                .starts_with("GET /token?service=kiln-test&scope=repository%3Akiln%2Fapp%3Apull")),
        "no token request: {log:?}"
    );
    // One challenge, then the token is reused for every other request.
    let tokens = log.iter().filter(|l| l.contains("/token")).count();
    assert_eq!(tokens, 1, "{log:?}");
}

#[test]
fn docker_config_credentials_reach_the_token_service() {
    let Some((reg, digest)) = registry_with_app("config.json") else {
        return;
    };
    let proxy = Proxy::start(
        reg.port,
        Faults {
            bearer_token: Some("tok-456".into()),
            token_basic: Some(("robot".into(), "s3cret".into())),
            ..Faults::default()
        },
    );
    let t = tempfile::tempdir().unwrap();
    let cfg = t.path().join("config.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"auths":{{"{}":{{"auth":"cm9ib3Q6czNjcmV0"}}}}}}"#,
            proxy.host()
        ),
    )
    .unwrap();
    let mut opts = PullOptions::new(cache_in(t.path()));
    opts.auth = Auth::from_docker_config(&cfg).unwrap();
    let img = pinned(&proxy.host(), "kiln/app:v1", &digest);
    assert_eq!(pull(&[img], &opts).unwrap()[0].manifest_digest, digest);
}

#[test]
fn refused_credentials_are_a_401_naming_the_image() {
    let Some((reg, digest)) = registry_with_app("401") else {
        return;
    };
    let proxy = Proxy::start(
        reg.port,
        Faults {
            bearer_token: Some("tok".into()),
            token_basic: Some(("robot".into(), "s3cret".into())),
            ..Faults::default()
        },
    );
    let t = tempfile::tempdir().unwrap();
    let img = pinned(&proxy.host(), "kiln/app:v1", &digest);
    let err = err_text(
        pull(
            std::slice::from_ref(&img),
            &PullOptions::new(cache_in(t.path())),
        )
        .unwrap_err(),
    );
    assert!(err.contains(&img.to_string()), "{err}");
    assert!(err.contains("401"), "{err}");
    assert!(err.contains("config.json"), "hint at credentials: {err}");
    assert!(cache_files(&cache_in(t.path())).is_empty());
}

#[test]
fn persistent_5xx_is_reported_naming_the_image_after_retries() {
    let Some((reg, digest)) = registry_with_app("5xx") else {
        return;
    };
    let proxy = Proxy::start(
        reg.port,
        Faults {
            status: Some(("/blobs/".into(), 503, usize::MAX)),
            ..Faults::default()
        },
    );
    let t = tempfile::tempdir().unwrap();
    let cache = cache_in(t.path());
    let img = pinned(&proxy.host(), "kiln/app:v1", &digest);
    let err = err_text(pull(std::slice::from_ref(&img), &PullOptions::new(&cache)).unwrap_err());
    assert!(err.contains(&img.to_string()), "{err}");
    assert!(err.contains("503"), "{err}");
    assert!(err.contains("3 attempts"), "{err}");
    // Only the (verified) manifest is cached; no blob, no temp file.
    assert_eq!(cache_files(&cache), vec![digest[7..].to_string()]);
}

#[test]
fn a_transient_5xx_is_retried_and_the_pull_succeeds() {
    let Some((reg, digest)) = registry_with_app("transient 5xx") else {
        return;
    };
    let proxy = Proxy::start(
        reg.port,
        Faults {
            status: Some(("/blobs/".into(), 502, 1)),
            ..Faults::default()
        },
    );
    let t = tempfile::tempdir().unwrap();
    let img = pinned(&proxy.host(), "kiln/app:v1", &digest);
    pull(&[img], &PullOptions::new(cache_in(t.path()))).unwrap();
}

#[test]
fn truncated_blob_is_reported_and_never_cached() {
    let Some((reg, digest)) = registry_with_app("truncated") else {
        return;
    };
    let proxy = Proxy::start(
        reg.port,
        Faults {
            truncate_blobs: true,
            ..Faults::default()
        },
    );
    let t = tempfile::tempdir().unwrap();
    let cache = cache_in(t.path());
    let img = pinned(&proxy.host(), "kiln/app:v1", &digest);
    let err = err_text(pull(std::slice::from_ref(&img), &PullOptions::new(&cache)).unwrap_err());
    assert!(err.contains(&img.to_string()), "{err}");
    assert!(err.contains("truncated"), "{err}");
    assert_eq!(cache_files(&cache), vec![digest[7..].to_string()]);
}

#[test]
fn corrupt_blob_is_a_digest_mismatch_and_never_cached() {
    let Some((reg, digest)) = registry_with_app("corrupt") else {
        return;
    };
    let proxy = Proxy::start(
        reg.port,
        Faults {
            corrupt_blobs: true,
            ..Faults::default()
        },
    );
    let t = tempfile::tempdir().unwrap();
    let cache = cache_in(t.path());
    let img = pinned(&proxy.host(), "kiln/app:v1", &digest);
    let err = err_text(pull(std::slice::from_ref(&img), &PullOptions::new(&cache)).unwrap_err());
    assert!(err.contains(&img.to_string()), "{err}");
    assert!(err.contains("does not match its digest"), "{err}");
    assert_eq!(cache_files(&cache), vec![digest[7..].to_string()]);
}

#[test]
fn a_second_pull_with_a_warm_cache_makes_no_requests() {
    let Some((reg, digest)) = registry_with_app("warm cache") else {
        return;
    };
    let proxy = Proxy::start(reg.port, Faults::default());
    let t = tempfile::tempdir().unwrap();
    let opts = PullOptions::new(cache_in(t.path()));
    let img = pinned(&proxy.host(), "kiln/app:v1", &digest);
    let first = pull(std::slice::from_ref(&img), &opts).unwrap();
    assert!(!proxy.requests().is_empty());
    proxy.clear_log();
    let second = pull(&[img], &opts).unwrap();
    assert_eq!(proxy.requests(), Vec::<String>::new());
    assert_eq!(first[0].blobs, second[0].blobs);
}

#[test]
fn images_over_the_disk_budget_are_refused_before_layers_download() {
    let Some((reg, digest)) = registry_with_app("budget") else {
        return;
    };
    let proxy = Proxy::start(reg.port, Faults::default());
    let t = tempfile::tempdir().unwrap();
    let mut opts = PullOptions::new(cache_in(t.path()));
    opts.max_total_bytes = Some(100);
    let img = pinned(&proxy.host(), "kiln/app:v1", &digest);
    let err = err_text(pull(std::slice::from_ref(&img), &opts).unwrap_err());
    assert!(err.contains(&img.to_string()), "{err}");
    assert!(err.contains("only 100 B is left"), "{err}");
    let blob_gets = proxy
        .requests()
        .iter()
        .filter(|l| l.contains("/blobs/"))
        .count();
    assert_eq!(blob_gets, 0, "{:?}", proxy.requests());
}

#[test]
fn blobs_shared_by_concurrently_pulled_images_are_fetched_once() {
    if !have_tools("shared blobs", REGISTRY_TOOLS) {
        return;
    }
    let reg = Registry::start();
    let base: &[(&str, &[u8])] = &[("lib/shared.so", &[7u8; 64 << 10])];
    let d1 = reg.push_image("kiln/one", "v1", base, None);
    // Another image (own config) on the very same layer, as cilium's images share theirs.
    let d2 = reg.push_variant("kiln/one", "v1", "v2");
    let l1 = reg.blobs_of("kiln/one", &d1)[1].clone();
    assert_eq!(reg.blobs_of("kiln/one", &d2)[1], l1);
    assert_ne!(d1, d2);
    let proxy = Proxy::start(reg.port, Faults::default());
    let t = tempfile::tempdir().unwrap();
    let mut opts = PullOptions::new(cache_in(t.path()));
    opts.concurrency = 4;
    let imgs = [
        pinned(&proxy.host(), "kiln/one:v1", &d1),
        pinned(&proxy.host(), "kiln/one:v2", &d2),
    ];
    let pulled = pull(&imgs, &opts).unwrap();
    assert_eq!(pulled.len(), 2);
    assert_ne!(pulled[0].config_digest, pulled[1].config_digest);
    let gets = proxy
        .requests()
        .iter()
        .filter(|l| l.starts_with("GET") && l.ends_with(&l1))
        .count();
    assert_eq!(gets, 1, "{:?}", proxy.requests());
}

#[test]
fn archives_of_the_same_pin_are_byte_identical_across_pulls() {
    let Some((reg, digest)) = registry_with_app("reproducible") else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let img = pinned(&reg.host(), "kiln/app:v1", &digest);
    let mut sums = Vec::new();
    for run in ["a", "b"] {
        let pulled = pull(
            std::slice::from_ref(&img),
            &PullOptions::new(t.path().join(run)),
        )
        .unwrap();
        let out = t.path().join(run).join("app.tar");
        let info = write_archive(&pulled[0], &out).unwrap();
        assert_eq!(info.sha256, kiln::util::sha256_file(&out).unwrap());
        sums.push(info.sha256);
    }
    assert_eq!(sums[0], sums[1]);
}

#[test]
fn basic_challenge_is_answered_with_config_json_credentials() {
    let Some((reg, digest)) = registry_with_app("basic auth") else {
        return;
    };
    let proxy = Proxy::start(
        reg.port,
        Faults {
            registry_basic: Some(("ci".into(), "pw".into())),
            ..Faults::default()
        },
    );
    let t = tempfile::tempdir().unwrap();
    let img = pinned(&proxy.host(), "kiln/app:v1", &digest);
    let anonymous = err_text(
        pull(
            std::slice::from_ref(&img),
            &PullOptions::new(cache_in(t.path())),
        )
        .unwrap_err(),
    );
    assert!(
        anonymous.contains("requires a login") && anonymous.contains(&img.to_string()),
        "{anonymous}"
    );
    let mut opts = PullOptions::new(cache_in(t.path()));
    opts.auth = Auth::anonymous()
        .add_docker_config(&format!(
            r#"{{"auths":{{"http://{}/":{{"username":"ci","password":"pw"}}}}}}"#,
            proxy.host()
        ))
        .unwrap();
    assert_eq!(pull(&[img], &opts).unwrap()[0].manifest_digest, digest);
}

#[test]
fn docker_manifest_list_and_v2_manifests_pull_like_oci() {
    if !have_tools("docker media types", REGISTRY_TOOLS) {
        return;
    }
    let reg = Registry::start();
    let amd = reg.push_image_as("kiln/dock", "amd64", &[("a", b"x86")], None, Some("v2s2"));
    let arm = reg.push_image_as(
        "kiln/dock",
        "arm64",
        &[("a", b"arm")],
        Some("arm64"),
        Some("v2s2"),
    );
    let list = reg.push_docker_list("kiln/dock", "v1", &[(&arm, "arm64"), (&amd, "amd64")]);
    let r = ImageRef::parse(&format!("{}/kiln/dock:v1", reg.host())).unwrap();
    assert_eq!(resolve(&r, &Auth::anonymous()).unwrap(), list);
    let t = tempfile::tempdir().unwrap();
    let p = pull(
        &[r.with_digest(&list).unwrap()],
        &PullOptions::new(cache_in(t.path())),
    )
    .unwrap();
    assert_eq!(
        p[0].target.media_type,
        "application/vnd.docker.distribution.manifest.list.v2+json"
    );
    assert_eq!(p[0].manifest_digest, amd);
    assert_eq!(
        p[0].blobs[1].media_type,
        "application/vnd.docker.distribution.manifest.v2+json"
    );
}

#[test]
fn an_expired_token_is_renewed_mid_pull() {
    let Some((reg, digest)) = registry_with_app("token expiry") else {
        return;
    };
    let proxy = Proxy::start(
        reg.port,
        Faults {
            bearer_token: Some("short".into()),
            token_uses: Some(1),
            ..Faults::default()
        },
    );
    let t = tempfile::tempdir().unwrap();
    let img = pinned(&proxy.host(), "kiln/app:v1", &digest);
    let pulled = pull(&[img], &PullOptions::new(cache_in(t.path()))).unwrap();
    assert_eq!(pulled[0].manifest_digest, digest);
    // manifest, config, layer: each met an expired token once and got a new one.
    let tokens = proxy
        .requests()
        .iter()
        .filter(|l| l.contains("/token"))
        .count();
    assert_eq!(tokens, 3, "{:?}", proxy.requests());
}
