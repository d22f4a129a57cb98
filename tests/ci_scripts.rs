//! The CI and install scripts: they fail loudly, naming the step, and never
//! die silently of SIGPIPE (hardening items 1 and 3).

use std::path::Path;
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn install_deps_never_pipes_a_command_into_head_under_pipefail() {
    let text = std::fs::read_to_string(repo().join(".ci/install-deps")).unwrap();
    assert!(text.contains("set -euo pipefail"));
    for (i, line) in text.lines().enumerate() {
        let code = line.split('#').next().unwrap_or("");
        assert!(
            !code.contains("| head"),
            ".ci/install-deps:{}: `| head` under pipefail dies of SIGPIPE (exit 141, no message): {line}",
            i + 1
        );
    }
}

/// A directory holding a copy of `.ci/` with fake commands first on PATH.
fn sandbox(fakes: &[(&str, &str)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join(".ci")).unwrap();
    std::fs::create_dir_all(d.path().join("bin")).unwrap();
    for f in ["run", "install-deps"] {
        std::fs::copy(repo().join(".ci").join(f), d.path().join(".ci").join(f)).unwrap();
    }
    for (name, body) in fakes {
        let p = d.path().join("bin").join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        Command::new("chmod").arg("+x").arg(&p).status().unwrap();
    }
    d
}

fn run(d: &Path, script: &str) -> std::process::Output {
    let path = format!(
        "{}:{}",
        d.join("bin").display(),
        std::env::var("PATH").unwrap()
    );
    Command::new("bash")
        .arg(d.join(".ci").join(script))
        .env("PATH", path)
        .output()
        .unwrap()
}

#[test]
fn install_deps_names_the_step_that_failed() {
    let d = sandbox(&[
        ("id", "echo 0"),
        ("apt-get", "echo 'E: mirror unreachable' >&2; exit 100"),
    ]);
    let out = run(d.path(), "install-deps");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("install-deps: FAILED at step: apt-get update"),
        "{err}"
    );
}

#[test]
fn ci_run_fails_loudly_when_install_deps_fails() {
    let d = sandbox(&[]);
    std::fs::write(d.path().join(".ci/install-deps"), "#!/bin/sh\nexit 7\n").unwrap();
    Command::new("chmod")
        .arg("+x")
        .arg(d.path().join(".ci/install-deps"))
        .status()
        .unwrap();
    let out = run(d.path(), "run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ci: FAILED: .ci/install-deps"), "{err}");
}
