//! Two `kiln build`s at once, and a build killed outright: the real kiln
//! binary, with a stand-in for mmdebstrap (first on PATH) that the test
//! holds until it says go, so each build stops where the test needs it.
//! Nothing here needs root, the network or minutes of mmdebstrap.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// Logs its pid to $FAKE_LOG, waits for $FAKE_GO, then fails if
/// $FAKE_GO.fail exists, else writes a tiny base tarball where mmdebstrap
/// would (its second-to-last argument).
const FAKE_MMDEBSTRAP: &str = r#"#!/bin/sh
echo $$ >> "$FAKE_LOG"
while [ ! -e "$FAKE_GO" ]; do sleep 0.05; done
if [ -e "$FAKE_GO.fail" ]; then echo "E: the stand-in was told to fail" >&2; exit 1; fi
prev=; out=
for a in "$@"; do out=$prev; prev=$a; done
t=$(mktemp -d)
mkdir -p "$t/var/lib/dpkg"
printf 'Package: a\nStatus: install ok installed\nVersion: 1\n\n' > "$t/var/lib/dpkg/status"
tar -C "$t" -cf "$out" .
rm -rf "$t"
"#;

struct Setup {
    dir: PathBuf,
    project: PathBuf,
    cache: PathBuf,
}

impl Setup {
    fn new(name: &str) -> Setup {
        let dir = scratch(name);
        let project = project_copy(&dir.join("project"));
        std::fs::copy(
            repo().join("recipes/tiny.toml.lock"),
            project.join("recipes/tiny.toml.lock"),
        )
        .unwrap();
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let fake = bin.join("mmdebstrap");
        std::fs::write(&fake, FAKE_MMDEBSTRAP).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let cache = dir.join("cache");
        Setup {
            dir,
            project,
            cache,
        }
    }

    /// `kiln build …/recipes/tiny.toml --out OUT --no-validate`, its stdout
    /// and stderr in `<tag>.out` and `<tag>.err`.
    fn build(&self, out: &str, tag: &str) -> Child {
        let path = format!(
            "{}:{}",
            self.dir.join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let file =
            |ext: &str| std::fs::File::create(self.dir.join(format!("{tag}.{ext}"))).unwrap();
        // The recipe by the path `fabricate_image` reads it from: its
        // digest includes the role templates' paths as spelled.
        let recipe = self.project.join("recipes/tiny.toml");
        kiln_cmd(
            &self.project,
            &self.cache,
            &[
                "build",
                recipe.to_str().unwrap(),
                "--out",
                out,
                "--no-validate",
            ],
        )
        .env("PATH", path)
        .env("FAKE_LOG", self.dir.join("mmdebstrap.log"))
        .env("FAKE_GO", self.dir.join("go"))
        .stdin(Stdio::null())
        .stdout(file("out"))
        .stderr(file("err"))
        .spawn()
        .unwrap()
    }

    fn text(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    /// The pids of the mmdebstrap runs so far.
    fn mmdebstrap_runs(&self) -> Vec<u32> {
        self.text("mmdebstrap.log")
            .lines()
            .map(|l| l.parse().unwrap())
            .collect()
    }

    /// Let the stand-in finish (or fail).
    fn go(&self, fail: bool) {
        if fail {
            std::fs::write(self.dir.join("go.fail"), b"").unwrap();
        }
        std::fs::write(self.dir.join("go"), b"").unwrap();
    }

    /// Wait until `cond` holds, failing if `child` ends first.
    fn until(&self, child: &mut Child, tag: &str, what: &str, cond: impl Fn() -> bool) {
        let start = Instant::now();
        while !cond() {
            if let Some(st) = child.try_wait().unwrap() {
                panic!(
                    "{tag} ended ({st}) before {what}:\n{}",
                    self.text(&format!("{tag}.err"))
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "timed out before {what}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        // Never leave a stand-in waiting.
        let _ = std::fs::write(self.dir.join("go"), b"");
    }
}

/// An image directory such as a build of the project's tiny recipe makes,
/// with `recipe` as its recipe digest (the real one: an image of exactly
/// these inputs).
fn fabricate_image(project: &Path, dest: &Path, recipe_digest: Option<&str>) {
    use kiln::image::manifest::*;
    let (recipe, lock) =
        kiln::image::pipeline::resolve(&project.join("recipes/tiny.toml")).unwrap();
    let mut inputs =
        kiln::image::inputs::digests(&recipe, &lock, &std::fs::read(recipe.lock_path()).unwrap())
            .unwrap();
    if let Some(d) = recipe_digest {
        inputs.recipe = d.to_string();
    }
    std::fs::create_dir_all(dest).unwrap();
    std::fs::write(dest.join("tiny.qcow2"), b"QFI\xfb").unwrap();
    let m = ImageManifest {
        name: "tiny".into(),
        version: "0.1.0".into(),
        id: "0".repeat(64),
        kiln_version: env!("CARGO_PKG_VERSION").into(),
        disk: DiskInfo {
            file: "tiny.qcow2".into(),
            format: "qcow2".into(),
            sha256: "0".repeat(64),
            size: 4,
            virtual_size: 4,
            root_fs_uuid: "00000000-0000-4000-8000-000000000000".into(),
        },
        inputs,
        source_date_epoch: lock.source_date_epoch,
        boot: BootInfo {
            uefi: true,
            secure_boot: true,
            bios: false,
            kernel: "6.1".into(),
            cmdline: String::new(),
            chain: vec![],
        },
        packages: Default::default(),
        hygiene: Default::default(),
        stages: vec![],
        roles: vec![],
        validate: Default::default(),
        lxc: None,
        sbom: None,
        added_files: vec![],
        validation: None,
    };
    m.save(dest).unwrap();
}

#[test]
fn a_second_build_of_an_image_waits_for_the_first_and_then_finds_it_up_to_date() {
    let s = Setup::new("locks-up-to-date");
    let mut a = s.build("images", "a");
    // A holds the image's lock from before its rootfs stage.
    s.until(&mut a, "a", "mmdebstrap started", || {
        !s.mmdebstrap_runs().is_empty()
    });
    let mut b = s.build("images", "b");
    let waiting = format!(
        "waiting for another kiln build of tiny 0.1.0 (pid {})",
        a.id()
    );
    s.until(&mut b, "b", "b said it waits", || {
        s.text("b.err").contains(&waiting)
    });
    // A makes exactly the image B would (as far as B can tell), then ends.
    fabricate_image(&s.project, &s.project.join("images/tiny/0.1.0"), None);
    s.go(true);
    assert!(!a.wait().unwrap().success());
    let st = b.wait().unwrap();
    assert!(st.success(), "{}", s.text("b.err"));
    assert!(
        s.text("b.out").contains("tiny 0.1.0 is up to date"),
        "{}",
        s.text("b.out")
    );
    assert_eq!(s.mmdebstrap_runs().len(), 1, "B did no work");
    // No lock file is left in images/.
    let left: Vec<_> = std::fs::read_dir(s.project.join("images"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("tiny")]);
}

#[test]
fn a_second_build_does_not_replace_an_image_the_first_made_from_other_inputs() {
    let s = Setup::new("locks-other-inputs");
    let mut a = s.build("images", "a");
    s.until(&mut a, "a", "mmdebstrap started", || {
        !s.mmdebstrap_runs().is_empty()
    });
    let mut b = s.build("images", "b");
    s.until(&mut b, "b", "b said it waits", || {
        s.text("b.err")
            .contains("waiting for another kiln build of tiny 0.1.0")
    });
    let dest = s.project.join("images/tiny/0.1.0");
    fabricate_image(&s.project, &dest, Some("sha256:other"));
    s.go(true);
    assert!(!a.wait().unwrap().success());
    assert!(!b.wait().unwrap().success());
    let err = s.text("b.err");
    assert!(err.contains("built from different inputs"), "{err}");
    assert_eq!(s.mmdebstrap_runs().len(), 1, "B did no work");
    let m = kiln::image::manifest::ImageManifest::load(&dest).unwrap();
    assert_eq!(m.inputs.recipe, "sha256:other", "A's image is untouched");
}

#[test]
fn two_builds_needing_the_same_base_run_mmdebstrap_once() {
    let s = Setup::new("locks-same-base");
    let mut a = s.build("images-a", "a");
    s.until(&mut a, "a", "mmdebstrap started", || {
        !s.mmdebstrap_runs().is_empty()
    });
    // Another image directory: only the cache is shared.
    let mut b = s.build("images-b", "b");
    s.until(&mut b, "b", "b said it waits", || {
        s.text("b.err")
            .contains("waiting for another kiln build of the base rootfs")
    });
    s.go(false);
    // The stand-in's base has no kernel: both builds stop after the rootfs
    // stage, B with the base A made.
    a.wait().unwrap();
    b.wait().unwrap();
    assert_eq!(s.mmdebstrap_runs().len(), 1, "{}", s.text("b.err"));
    let err = s.text("b.err");
    assert!(
        !err.contains("mmdebstrap failed") && !err.contains("rootfs stage failed"),
        "{err}"
    );
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        // "pid (comm) STATE …": a zombie is dead, only not reaped.
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

#[test]
fn mmdebstrap_dies_with_a_killed_build_whose_scratch_the_next_build_sweeps() {
    let s = Setup::new("locks-killed");
    let mut a = s.build("images", "a");
    s.until(&mut a, "a", "mmdebstrap started", || {
        !s.mmdebstrap_runs().is_empty()
    });
    let fake = s.mmdebstrap_runs()[0];
    a.kill().unwrap(); // SIGKILL: kiln cleans nothing up
    a.wait().unwrap();
    let start = Instant::now();
    while alive(fake) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "mmdebstrap outlived the kiln that started it"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let tmp = s.cache.join("tmp");
    let left = std::fs::read_dir(&tmp).unwrap().count();
    assert_eq!(left, 1, "the killed build's scratch is there");

    // The next build (whose own stand-in fails at once) sweeps it.
    s.go(true);
    let mut b = s.build("images", "b");
    assert!(!b.wait().unwrap().success());
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let staged: Vec<_> = std::fs::read_dir(s.project.join("images"))
        .map(|r| r.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(staged.is_empty(), "{staged:?}");
}
