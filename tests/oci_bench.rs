//! Driver for `bench/oci_pull.sh` (ignored in normal test runs): pulls the
//! pinned references in `KILN_OCI_BENCH_REFS` into `KILN_OCI_BENCH_CACHE`
//! through `kiln::image::oci::pull`; the script times it against curl.

use kiln::image::oci::{pull, ImageRef, PullOptions};

#[test]
#[ignore = "bench driver, run by bench/oci_pull.sh"]
fn bench_driver_pulls_the_images_named_in_env() {
    let refs = std::env::var("KILN_OCI_BENCH_REFS").expect("KILN_OCI_BENCH_REFS is not set");
    let cache = std::env::var("KILN_OCI_BENCH_CACHE").expect("KILN_OCI_BENCH_CACHE is not set");
    let images: Vec<ImageRef> = refs
        .split_whitespace()
        .map(|r| ImageRef::parse(r).unwrap())
        .collect();
    assert!(!images.is_empty(), "KILN_OCI_BENCH_REFS names no image");
    let mut opts = PullOptions::new(cache);
    if let Ok(c) = std::env::var("KILN_OCI_BENCH_CONCURRENCY") {
        opts.concurrency = c.parse().expect("KILN_OCI_BENCH_CONCURRENCY is a number");
    }
    let pulled = pull(&images, &opts).unwrap();
    let bytes: u64 = pulled.iter().map(|p| p.total_bytes).sum();
    println!("KILN_OCI_BENCH images={} bytes={bytes}", pulled.len());
}
