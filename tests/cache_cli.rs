//! `kiln cache du` and `kiln cache gc` on a fabricated cache: the real kiln
//! binary, with this test process playing a running build that holds locks.

mod common;
use common::*;

use kiln::util::locks::{Held, LockedDir, Mode};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

fn id(label: &str) -> String {
    kiln::util::sha256_hex(label.as_bytes())
}

fn write(path: &Path, bytes: usize, age_secs: u64) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, vec![7u8; bytes]).unwrap();
    let t = SystemTime::now() - Duration::from_secs(age_secs);
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

const KIB: usize = 1024;

/// A cache two recipes used: lb twice (an old and a new build), tiny once;
/// plus entries no build recorded (`d` older than `e`), and scratch a killed
/// build left.
struct Fab {
    dir: PathBuf,
    cache: PathBuf,
}

fn fabricate(name: &str) -> Fab {
    let dir = scratch(name);
    let c = dir.join("cache");
    for (label, age) in [("a", 500), ("b", 400), ("c", 300), ("d", 9000), ("e", 100)] {
        write(&c.join(format!("rootfs/{}.tar", id(label))), 256 * KIB, age);
        write(&c.join(format!("rootfs/{}.json", id(label))), 100, age);
    }
    write(&c.join(format!("blobs/sha256/{}", id("x"))), 128 * KIB, 500);
    write(&c.join(format!("blobs/sha256/{}", id("y"))), 128 * KIB, 400);
    write(
        &c.join(format!("oci/blobs/sha256/{}", id("o1"))),
        64 * KIB,
        400,
    );
    write(
        &c.join(format!("oci/blobs/sha256/{}", id("o2"))),
        64 * KIB,
        400,
    );
    write(&c.join("oci/blobs/sha256/.partial-abc"), 64 * KIB, 400);
    for r in ["lb.old.qcow2", "lb.new.qcow2"] {
        write(&c.join("references").join(r), 192 * KIB, 400);
        write(&c.join("references").join(format!("{r}.idx")), 100, 400);
    }
    // A killed build's scratch: its lock file, which nobody holds.
    write(&c.join("tmp/build-dead/.kiln-lock"), 0, 0);
    write(&c.join("tmp/build-dead/rootfs.tar"), 512 * KIB, 0);
    let record = |recipe: &str, n: u32, v: serde_json::Value| {
        let p = c.join(format!("usage/{recipe}/{n:020}-1.json"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, v.to_string()).unwrap();
    };
    record(
        "lb",
        1,
        serde_json::json!({"bases": [id("a")], "blobs": [id("x")], "references": ["lb.old.qcow2"]}),
    );
    record(
        "lb",
        2,
        serde_json::json!({"bases": [id("b")], "blobs": [id("y")], "oci": [id("o1")], "references": ["lb.new.qcow2"]}),
    );
    record("tiny", 1, serde_json::json!({"bases": [id("c")]}));
    Fab { dir, cache: c }
}

fn cache_cmd(f: &Fab, args: &[&str]) -> std::process::Output {
    let mut all = vec!["cache"];
    all.extend_from_slice(args);
    kiln(&f.dir, &f.cache, &all)
}

fn exists(f: &Fab, rel: &str) -> bool {
    f.cache.join(rel).exists()
}

#[test]
fn cache_du_reports_the_size_of_each_area() {
    let f = fabricate("cache-du");
    let out = ok(cache_cmd(&f, &["du", "--json"]));
    let j = json(&out);
    let area = |name: &str| {
        j["areas"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["area"] == name)
            .unwrap_or_else(|| panic!("no area {name} in {j}"))
            .clone()
    };
    // Allocated bytes: at least the data, at most a few blocks more per file.
    let near = |name: &str, data: usize, entries: u64| {
        let a = area(name);
        let bytes = a["bytes"].as_u64().unwrap() as usize;
        assert!(
            bytes >= data && bytes <= data + 64 * KIB,
            "{name}: {bytes} for {data} of data"
        );
        assert_eq!(a["entries"], entries, "{name}");
    };
    near("bases", 5 * 256 * KIB, 5);
    near("blobs", 2 * 128 * KIB, 2);
    near("oci", 3 * 64 * KIB, 2);
    near("references", 2 * 192 * KIB, 2);
    near("tmp", 512 * KIB, 1);
    let sum: u64 = j["areas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(j["total_bytes"], sum + j["other_bytes"].as_u64().unwrap());

    let text = stdout(&ok(cache_cmd(&f, &["du"])));
    for name in ["bases", "blobs", "oci", "references", "tmp", "total"] {
        assert!(text.contains(name), "{text}");
    }
}

#[test]
fn cache_gc_keeps_what_each_recipes_newest_builds_used_and_removes_the_rest() {
    let f = fabricate("cache-gc");
    let out = ok(cache_cmd(&f, &["gc", "--keep", "1"]));
    let text = stdout(&out);
    // lb's older build only: its base, its artifact, its reference.
    assert!(!exists(&f, &format!("rootfs/{}.tar", id("a"))), "{text}");
    assert!(!exists(&f, &format!("rootfs/{}.json", id("a"))));
    assert!(!exists(&f, &format!("blobs/sha256/{}", id("x"))));
    assert!(!exists(&f, "references/lb.old.qcow2"));
    assert!(!exists(&f, "references/lb.old.qcow2.idx"));
    // Of what no build recorded, the newest of each area stays.
    assert!(!exists(&f, &format!("rootfs/{}.tar", id("d"))));
    assert!(exists(&f, &format!("rootfs/{}.tar", id("e"))));
    assert!(exists(&f, &format!("oci/blobs/sha256/{}", id("o2"))));
    // What the newest builds used stays.
    for kept in [
        format!("rootfs/{}.tar", id("b")),
        format!("rootfs/{}.tar", id("c")),
        format!("blobs/sha256/{}", id("y")),
        format!("oci/blobs/sha256/{}", id("o1")),
        "references/lb.new.qcow2".to_string(),
        "references/lb.new.qcow2.idx".to_string(),
    ] {
        assert!(exists(&f, &kept), "{kept} was removed:\n{text}");
    }
    // A killed build's scratch and a half-written pull go too.
    assert!(!exists(&f, "tmp/build-dead"));
    assert!(!exists(&f, "oci/blobs/sha256/.partial-abc"));
    assert!(text.contains("freed "), "{text}");
    let j = json(&ok(cache_cmd(&f, &["gc", "--keep", "1", "--json"])));
    assert_eq!(
        j["removed"].as_array().unwrap().len(),
        0,
        "nothing left to do: {j}"
    );
    // The older record is gone with what only it named.
    assert_eq!(
        std::fs::read_dir(f.cache.join("usage/lb")).unwrap().count(),
        1
    );
}

#[test]
fn cache_gc_reports_the_space_it_freed() {
    let f = fabricate("cache-gc-freed");
    let j = json(&ok(cache_cmd(&f, &["gc", "--keep", "1", "--json"])));
    let freed = j["freed_bytes"].as_u64().unwrap() as usize;
    // 2 bases, a blob, a reference, the scratch, the partial pull.
    let data = 2 * 256 * KIB + 128 * KIB + 192 * KIB + 512 * KIB + 64 * KIB;
    assert!(
        freed >= data && freed <= data + 64 * KIB,
        "{freed} for {data}: {j}"
    );
    let removed: Vec<String> = j["removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            format!(
                "{} {}",
                r["area"].as_str().unwrap(),
                r["id"].as_str().unwrap()
            )
        })
        .collect();
    assert!(
        removed.contains(&format!("bases {}", id("a"))),
        "{removed:?}"
    );
    assert!(
        removed.contains(&"references lb.old.qcow2".to_string()),
        "{removed:?}"
    );
    assert!(
        removed.contains(&"tmp build-dead".to_string()),
        "{removed:?}"
    );
}

#[test]
fn cache_gc_dry_run_removes_nothing() {
    let f = fabricate("cache-gc-dry");
    let text = stdout(&ok(cache_cmd(&f, &["gc", "--keep", "1", "--dry-run"])));
    assert!(
        text.contains(&format!("would remove bases {}", id("a"))),
        "{text}"
    );
    assert!(text.contains("would free"), "{text}");
    assert!(exists(&f, &format!("rootfs/{}.tar", id("a"))));
    assert!(exists(&f, "tmp/build-dead/rootfs.tar"));
    assert!(exists(&f, "references/lb.old.qcow2"));
    assert_eq!(
        std::fs::read_dir(f.cache.join("usage/lb")).unwrap().count(),
        2
    );
    // Nor leaves lock files behind.
    let locks: Vec<_> = std::fs::read_dir(f.cache.join("locks"))
        .map(|r| r.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(locks.is_empty(), "{locks:?}");
}

#[test]
fn cache_gc_never_removes_what_a_running_build_holds() {
    let f = fabricate("cache-gc-held");
    // This process plays a build using base a, blob x, the OCI area and
    // its own scratch directory.
    let _base = Held::try_acquire(
        &f.cache.join(format!("rootfs/{}.lock", id("a"))),
        Mode::Shared,
    )
    .unwrap()
    .unwrap();
    let _blob = Held::try_acquire(
        &f.cache.join(format!("locks/blobs/{}.lock", id("x"))),
        Mode::Shared,
    )
    .unwrap()
    .unwrap();
    let _oci = Held::try_acquire(&f.cache.join("locks/oci.lock"), Mode::Shared)
        .unwrap()
        .unwrap();
    let live = LockedDir::new_in(&f.cache.join("tmp"), "build-").unwrap();

    let out = ok(cache_cmd(&f, &["gc", "--keep", "0"]));
    let text = stdout(&out);
    assert!(exists(&f, &format!("rootfs/{}.tar", id("a"))), "{text}");
    assert!(exists(&f, &format!("blobs/sha256/{}", id("x"))), "{text}");
    assert!(
        exists(&f, &format!("oci/blobs/sha256/{}", id("o1"))),
        "{text}"
    );
    assert!(exists(&f, "oci/blobs/sha256/.partial-abc"), "{text}");
    assert!(live.path().exists(), "{text}");
    assert!(
        text.contains(&format!(
            "kept bases {} (in use by a running build)",
            id("a")
        )),
        "{text}"
    );
    // What nobody holds goes.
    assert!(!exists(&f, &format!("rootfs/{}.tar", id("b"))), "{text}");
    assert!(!exists(&f, "tmp/build-dead"), "{text}");
}

#[test]
fn cache_gc_needs_keep() {
    let f = fabricate("cache-gc-usage");
    let out = cache_cmd(&f, &["gc"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--keep"), "{}", stderr(&out));
}
