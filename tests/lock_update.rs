//! `kiln lock --update [NAME]` through the real binary: one pin re-resolved
//! while every other line of the lock stays, the old `--update RECIPE` form,
//! and an unknown NAME. Artifacts are file:// URLs: no network.

mod common;
use common::*;

use std::path::{Path, PathBuf};

/// A project holding `r.toml` with two file:// artifacts, locked once.
fn locked_project(name: &str) -> (PathBuf, PathBuf) {
    let dir = scratch(name);
    std::fs::create_dir_all(dir.join("overlays")).unwrap();
    for f in ["a.bin", "b.bin"] {
        std::fs::write(dir.join(f), format!("{f} v1")).unwrap();
    }
    std::fs::write(
        dir.join("r.toml"),
        format!(
            "name = \"r\"\nversion = \"1\"\n[base]\nsuite = \"bookworm\"\n\
             [[artifacts]]\nname = \"tool-a\"\nurl = \"file://{d}/a.bin\"\ndest = \"/a\"\n\
             [[artifacts]]\nname = \"tool-b\"\nurl = \"file://{d}/b.bin\"\ndest = \"/b\"\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let cache = dir.join("cache");
    ok(kiln(&dir, &cache, &["lock", "r.toml"]));
    // As after a first build: package pins and an old SOURCE_DATE_EPOCH.
    let lock = dir.join("r.toml.lock");
    let text = std::fs::read_to_string(&lock)
        .unwrap()
        .replace("[packages]\n", "[packages]\nlibc6 = \"2.36-9\"\n");
    let text = regex::Regex::new(r"(?m)^source_date_epoch = \d+$")
        .unwrap()
        .replace(&text, "source_date_epoch = 1700000000")
        .into_owned();
    std::fs::write(&lock, text).unwrap();
    // Upstream moved on: both files now hold other bytes.
    for f in ["a.bin", "b.bin"] {
        std::fs::write(dir.join(f), format!("{f} v2")).unwrap();
    }
    (dir, cache)
}

fn lock_lines(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("r.toml.lock"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn lock_update_name_rewrites_only_that_artifacts_line() {
    let (dir, cache) = locked_project("lock-update-one");
    let before = lock_lines(&dir);
    ok(kiln(
        &dir,
        &cache,
        &["lock", "r.toml", "--update", "tool-a"],
    ));
    let after = lock_lines(&dir);
    assert_eq!(before.len(), after.len());
    let changed: Vec<(&String, &String)> =
        before.iter().zip(&after).filter(|(b, a)| b != a).collect();
    assert_eq!(changed.len(), 1, "{changed:?}");
    let (old, new) = changed[0];
    let sha = |s: &[u8]| kiln::util::sha256_hex(s);
    assert!(
        old.starts_with("tool-a = ") && old.contains(&sha(b"a.bin v1")),
        "{old}"
    );
    assert!(
        new.starts_with("tool-a = ") && new.contains(&sha(b"a.bin v2")),
        "{new}"
    );
}

#[test]
fn lock_update_with_the_recipe_after_it_still_re_resolves_everything() {
    let (dir, cache) = locked_project("lock-update-all");
    ok(kiln(&dir, &cache, &["lock", "--update", "r.toml"]));
    let text = lock_lines(&dir).join("\n");
    let sha = |s: &[u8]| kiln::util::sha256_hex(s);
    assert!(text.contains(&sha(b"a.bin v2")) && text.contains(&sha(b"b.bin v2")));
    assert!(!text.contains("source_date_epoch = 1700000000"), "{text}");
    assert!(!text.contains("libc6"), "package pins are dropped: {text}");
}

#[test]
fn lock_update_of_an_unknown_name_is_one_line_listing_the_known_ones() {
    let (dir, cache) = locked_project("lock-update-unknown");
    let before = lock_lines(&dir);
    let out = kiln(&dir, &cache, &["lock", "r.toml", "--update", "tool-c"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: --update tool-c: ")
            && err.trim_end().ends_with("known: tool-a, tool-b"),
        "{err}"
    );
    assert_eq!(lock_lines(&dir), before, "the lock is left alone");
}
