//! .github/workflows/images.yml: actionlint (with shellcheck) finds nothing,
//! and its `run:` steps run here as GitHub would run them (`bash -eo pipefail`,
//! GITHUB_OUTPUT / GITHUB_PATH, `if:` conditions, `env:` with `${{ }}`
//! filled in), for a pull request and for a tag, in clones of a scratch
//! repository: the pull request changes tiny's role template, so it builds
//! and boots tiny (TCG); the tag publishes tiny (KILN_RELEASE_RECIPES) to
//! pve-sim, the labelled Proxmox VE stand-in. `uses:` steps are stood in for
//! (checkout) or their inputs checked (cache key, artifact and release files).

mod common;
mod publish_support;

use serde_yaml::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const WORKFLOW: &str = ".github/workflows/images.yml";

/// `run:` steps that do not run here, and why.
const NOT_HERE: &[(&str, &str)] = &[
    (
        "Install Rust",
        "rustup's server is not reachable here; the suite already runs on Rust",
    ),
    (
        "Build kiln",
        "the test's own kiln binary stands in (a release build takes minutes)",
    ),
];

fn workflow() -> Value {
    serde_yaml::from_str(&std::fs::read_to_string(common::repo().join(WORKFLOW)).unwrap())
        .expect("the workflow is YAML")
}

fn steps(w: &Value) -> Vec<Value> {
    w["jobs"]["images"]["steps"]
        .as_sequence()
        .expect("jobs.images.steps")
        .clone()
}

fn name_of(step: &Value) -> String {
    step["name"]
        .as_str()
        .or_else(|| step["uses"].as_str())
        .unwrap()
        .to_string()
}

#[test]
fn the_images_workflow_passes_actionlint_and_shellcheck() {
    for (tool, arg) in [("actionlint", "-version"), ("shellcheck", "--version")] {
        let ok = Command::new(tool)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(ok, "{tool} is not installed: run ./.ci/install-deps");
    }
    let out = Command::new("actionlint")
        .args(["-color=false", "-shellcheck=shellcheck", WORKFLOW])
        .current_dir(common::repo())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "actionlint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_workflow_runs_in_debian_12_privileged_and_boots_under_tcg() {
    let w = workflow();
    let job = &w["jobs"]["images"];
    assert_eq!(job["container"]["image"], "debian:bookworm");
    assert!(job["container"]["options"]
        .as_str()
        .unwrap()
        .contains("--privileged"));
    let runs: String = steps(&w).iter().filter_map(|s| s["run"].as_str()).collect();
    assert!(runs.contains("./.ci/install-deps"));
    assert!(runs.contains("kiln validate") && runs.contains("--accel tcg"));
    for s in steps(&w) {
        if let Some(run) = s["run"].as_str() {
            assert!(
                !run.contains("${{"),
                "{}: pass `${{{{ }}}}` values through env:, not into the script",
                name_of(&s)
            );
        }
    }
    let names: Vec<String> = steps(&w).iter().map(name_of).collect();
    for (n, _) in NOT_HERE {
        assert!(names.contains(&n.to_string()), "no step `{n}`");
    }
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=t", "-c", "user.email=t@example.invalid"])
        .args(args)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn copy_tree(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let t = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &t);
        } else if e.file_type().unwrap().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(e.path()).unwrap(), &t).unwrap();
        } else {
            std::fs::copy(e.path(), &t).unwrap();
        }
    }
}

/// A repository with what the workflow reads (its own file, .ci/, recipes
/// with locks, overlays): `base` the first commit, `head` a change to tiny's
/// role template on top.
fn origin(dir: &Path) -> (String, String) {
    for d in [".github", ".ci", "recipes", "overlays"] {
        copy_tree(&common::repo().join(d), &dir.join(d));
    }
    git(dir, &["init", "-q", "-b", "main"]);
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "-m", "base"]);
    let base = git(dir, &["rev-parse", "HEAD"]);
    let t = dir.join("recipes/roles/tiny-node.yaml.tera");
    let mut text = std::fs::read_to_string(&t).unwrap();
    text.push_str("{# a change only tiny uses #}\n");
    std::fs::write(&t, text).unwrap();
    git(dir, &["commit", "-q", "-am", "change tiny's role template"]);
    (base, git(dir, &["rev-parse", "HEAD"]))
}

/// What one simulated run knows: the event, `${{ }}` values, step outputs.
struct Run {
    tag: bool,
    workspace: PathBuf,
    home: PathBuf,
    exprs: BTreeMap<String, String>,
    env: BTreeMap<String, String>,
    path: Vec<PathBuf>,
    outputs: BTreeMap<String, BTreeMap<String, String>>,
    log: Vec<String>,
}

impl Run {
    fn expr(&self, e: &str) -> String {
        self.exprs
            .get(e.trim())
            .unwrap_or_else(|| panic!("the test knows no value for `${{{{ {e} }}}}`"))
            .clone()
    }

    /// `${{ x }}` in a value filled in.
    fn fill(&self, v: &str) -> String {
        let mut out = String::new();
        let mut rest = v;
        while let Some(i) = rest.find("${{") {
            out.push_str(&rest[..i]);
            let j = rest[i..].find("}}").expect("a closed expression") + i;
            out.push_str(&self.expr(&rest[i + 3..j]));
            rest = &rest[j + 2..];
        }
        out.push_str(rest);
        out
    }

    /// The step's `if:`, for the conditions the workflow uses.
    fn condition(&self, cond: &str) -> bool {
        let count = self
            .outputs
            .get("recipes")
            .and_then(|o| o.get("count"))
            .cloned()
            .unwrap_or_default();
        match cond.trim() {
            "steps.recipes.outputs.count != '0'"
            | "${{ !cancelled() && steps.recipes.outputs.count != '0' }}" => count != "0",
            "startsWith(github.ref, 'refs/tags/')" => self.tag,
            other => panic!("the test does not know the condition `{other}`"),
        }
    }

    fn run_step(&mut self, step: &Value, script: &str) {
        let name = name_of(step);
        let scratch = self.home.join("steps");
        std::fs::create_dir_all(&scratch).unwrap();
        let file = scratch.join(format!("step-{}.sh", self.log.len()));
        std::fs::write(&file, script).unwrap();
        let output = scratch.join(format!("output-{}", self.log.len()));
        let path_file = scratch.join(format!("path-{}", self.log.len()));
        std::fs::write(&output, "").unwrap();
        std::fs::write(&path_file, "").unwrap();
        let mut cmd = Command::new("bash");
        cmd.args(["--noprofile", "--norc", "-eo", "pipefail"])
            .arg(&file)
            .current_dir(&self.workspace);
        for (k, _) in std::env::vars() {
            if k.starts_with("KILN_") || k.starts_with("GITHUB_") || k.starts_with("RUNNER_") {
                cmd.env_remove(k);
            }
        }
        let path = std::env::join_paths(
            self.path
                .iter()
                .cloned()
                .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap())),
        )
        .unwrap();
        cmd.env("PATH", path)
            .env("HOME", &self.home)
            .env("CI", "true")
            .env("GITHUB_WORKSPACE", &self.workspace)
            .env("GITHUB_OUTPUT", &output)
            .env("GITHUB_PATH", &path_file)
            .env("RUNNER_TEMP", self.home.join("runner-temp"))
            .envs(&self.env);
        if let Some(env) = step["env"].as_mapping() {
            for (k, v) in env {
                cmd.env(k.as_str().unwrap(), self.fill(v.as_str().unwrap()));
            }
        }
        let started = Instant::now();
        let out = cmd.output().unwrap();
        let secs = started.elapsed().as_secs_f64();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !text.contains(publish_support::SECRET),
            "{name}: the token leaked:\n{text}"
        );
        assert!(
            out.status.success(),
            "step `{name}` failed ({}):\n{text}",
            out.status
        );
        if let Some(id) = step["id"].as_str() {
            let o = std::fs::read_to_string(&output).unwrap();
            let map = o
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            self.outputs.insert(id.to_string(), map);
        }
        for p in std::fs::read_to_string(&path_file).unwrap().lines() {
            self.path.insert(0, PathBuf::from(p));
        }
        let last = text.trim_end().lines().last().unwrap_or("").to_string();
        self.log
            .push(format!("ran     {name} ({secs:.0}s): {last}"));
    }

    /// Every step in order: `run:` steps run (but NOT_HERE), `uses:` steps
    /// stood in for.
    fn all(&mut self, w: &Value, origin: &Path, head: &str) {
        for step in steps(w) {
            let name = name_of(&step);
            if let Some(cond) = step["if"].as_str() {
                if !self.condition(cond) {
                    self.log.push(format!("skipped {name} (if: {cond})"));
                    continue;
                }
            }
            if let Some(script) = step["run"].as_str() {
                if let Some((_, why)) = NOT_HERE.iter().find(|(n, _)| *n == name) {
                    self.log.push(format!("not run {name}: {why}"));
                    continue;
                }
                self.run_step(&step, script);
                continue;
            }
            let uses = step["uses"].as_str().unwrap();
            let with = &step["with"];
            match uses.split('@').next().unwrap() {
                "actions/checkout" => {
                    assert_eq!(
                        with["fetch-depth"].as_u64(),
                        Some(0),
                        "kiln affected needs history"
                    );
                    let ws = self.workspace.to_str().unwrap();
                    git(
                        Path::new("/"),
                        &["clone", "-q", origin.to_str().unwrap(), ws],
                    );
                    git(&self.workspace, &["checkout", "-q", head]);
                    self.log
                        .push(format!("stood in {name}: git clone + checkout {head:.12}"));
                }
                "actions/cache" => {
                    assert_eq!(
                        self.fill(with["path"].as_str().unwrap()),
                        self.env["KILN_CACHE"]
                    );
                    let key = with["key"].as_str().unwrap();
                    assert!(key.contains("hashFiles('recipes/*.lock')"), "{key}");
                    let locks = std::fs::read_dir(self.workspace.join("recipes"))
                        .unwrap()
                        .filter(|e| {
                            e.as_ref()
                                .unwrap()
                                .path()
                                .extension()
                                .is_some_and(|x| x == "lock")
                        })
                        .count();
                    assert!(locks > 0, "the cache key hashes no lock");
                    self.log
                        .push(format!("checked {name}: key hashes {locks} locks"));
                }
                "actions/upload-artifact" => {
                    let dir = self.workspace.join(with["path"].as_str().unwrap());
                    let files: Vec<_> = std::fs::read_dir(&dir)
                        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                        .collect();
                    assert!(!files.is_empty(), "nothing to upload in {}", dir.display());
                    self.log
                        .push(format!("checked {name}: would upload {files:?}"));
                }
                "softprops/action-gh-release" => {
                    let pattern = with["files"].as_str().unwrap();
                    let dir = pattern.strip_suffix("/*").expect("files: DIR/*");
                    let mut files: Vec<String> = std::fs::read_dir(self.workspace.join(dir))
                        .unwrap()
                        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                        .collect();
                    files.sort();
                    self.log
                        .push(format!("checked {name}: would attach {files:?}"));
                }
                other => panic!("the test does not know the action {other}"),
            }
        }
    }
}

fn run_for(dir: &Path, tag: bool, exprs: BTreeMap<String, String>) -> Run {
    let home = dir.join(if tag { "home-tag" } else { "home-pr" });
    std::fs::create_dir_all(home.join("runner-temp")).unwrap();
    let w = workflow();
    let mut env: BTreeMap<String, String> = w["env"]
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            let v = v
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| serde_yaml::to_string(v).unwrap().trim().to_string());
            (k.as_str().unwrap().to_string(), v)
        })
        .collect();
    // The test's recipe (tiny builds and boots fastest) and the suite's cache.
    assert!(env.contains_key("KILN_RELEASE_RECIPES") && env.contains_key("KILN_CACHE"));
    env.insert("KILN_RELEASE_RECIPES".into(), "recipes/tiny.toml".into());
    env.insert(
        "KILN_CACHE".into(),
        common::test_cache().to_string_lossy().into_owned(),
    );
    // The runner makes the (empty) workspace before the first step.
    let workspace = dir.join(if tag { "ws-tag" } else { "ws-pr" });
    std::fs::create_dir_all(&workspace).unwrap();
    let kiln_dir = Path::new(env!("CARGO_BIN_EXE_kiln"))
        .parent()
        .unwrap()
        .to_path_buf();
    Run {
        tag,
        workspace,
        home,
        exprs,
        env,
        path: vec![kiln_dir],
        outputs: BTreeMap::new(),
        log: Vec::new(),
    }
}

#[test]
fn the_images_workflow_runs_here_for_a_pull_request_and_for_a_tag() {
    let dir = common::scratch("ci-workflow");
    let origin_dir = dir.join("origin");
    std::fs::create_dir_all(&origin_dir).unwrap();
    let (base, head) = origin(&origin_dir);
    let w = workflow();

    // A pull request: build and boot what it changed.
    let exprs: BTreeMap<String, String> = [
        ("github.event_name", "pull_request"),
        ("github.event.pull_request.base.sha", base.as_str()),
        ("github.event.pull_request.head.sha", head.as_str()),
        ("env.KILN_CACHE", ""),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let mut pr = run_for(&dir, false, exprs);
    pr.exprs
        .insert("env.KILN_CACHE".into(), pr.env["KILN_CACHE"].clone());
    pr.all(&w, &origin_dir, &head);
    eprintln!("pull request:\n  {}", pr.log.join("\n  "));
    let listed = std::fs::read_to_string(pr.workspace.join("recipes.txt")).unwrap();
    assert_eq!(listed, "recipes/tiny.toml\n");
    let junit = std::fs::read_to_string(pr.workspace.join("junit/images.xml")).unwrap();
    assert!(
        junit.contains("<testsuite") && junit.contains("failures=\"0\""),
        "{junit}"
    );
    assert!(pr.log.iter().any(|l| l.starts_with("skipped Publish")));

    // A tag: the release recipes, published to pve-sim.
    let sim = publish_support::sim(&dir.join("sim"));
    let mut exprs: BTreeMap<String, String> = [
        ("github.event_name", "push"),
        ("github.event.pull_request.base.sha", ""),
        ("github.event.pull_request.head.sha", ""),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in publish_support::env_target(&sim.url()) {
        exprs.insert(format!("secrets.{k}"), v);
    }
    for k in ["KILN_PVE_FINGERPRINT", "KILN_PVE_POOL", "KILN_PVE_CA_PEM"] {
        exprs.insert(format!("secrets.{k}"), String::new());
    }
    // The signing key secret: an OpenSSH key made for this run.
    let key = dir.join("signing-key");
    let st = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "ci@kiln.test", "-f"])
        .arg(&key)
        .status()
        .expect("ssh-keygen runs (apt install openssh-client)");
    assert!(st.success());
    exprs.insert(
        "secrets.KILN_SIGNING_KEY".into(),
        std::fs::read_to_string(&key).unwrap(),
    );
    let mut tag = run_for(&dir, true, exprs);
    tag.exprs
        .insert("env.KILN_CACHE".into(), tag.env["KILN_CACHE"].clone());
    git(&origin_dir, &["tag", "v0.1.0"]);
    tag.all(&w, &origin_dir, "v0.1.0");
    eprintln!("tag:\n  {}", tag.log.join("\n  "));
    let release = tag.workspace.join("release");
    let mut files: Vec<String> = std::fs::read_dir(&release)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "tiny-0.1.0.SHA256SUMS",
            "tiny-0.1.0.SHA256SUMS.sig",
            "tiny-0.1.0.manifest.json",
            "tiny-0.1.0.publish.json",
            "tiny-0.1.0.spdx.json"
        ]
    );
    // The attached signature verifies with plain OpenSSH against the key.
    let public = std::fs::read_to_string(dir.join("signing-key.pub")).unwrap();
    let allowed = dir.join("allowed_signers");
    std::fs::write(&allowed, format!("ci@kiln.test {}", public.trim())).unwrap();
    let sums = std::fs::File::open(release.join("tiny-0.1.0.SHA256SUMS")).unwrap();
    let out = std::process::Command::new("ssh-keygen")
        .args(["-Y", "verify", "-f"])
        .arg(&allowed)
        .args(["-I", "ci@kiln.test", "-n", "kiln-image", "-s"])
        .arg(release.join("tiny-0.1.0.SHA256SUMS.sig"))
        .stdin(sums)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: kiln::deploy::publish::PublishReport = serde_json::from_str(
        &std::fs::read_to_string(release.join("tiny-0.1.0.publish.json")).unwrap(),
    )
    .unwrap();
    let st = sim.state();
    assert!(
        st.vms[&report.vmid].template,
        "the image is a template in pve-sim"
    );
}
