//! What every kiln invocation shares: shell completions and man pages made
//! from the parser's own definition, `-q`/`-v`, `--color` (and NO_COLOR),
//! and progress drawn only on a terminal. Terminals are real ones: the
//! commands run under util-linux `script`, which gives them a pty.

mod publish_support;
use publish_support::{image, kiln, sign, signing_key, stderr, stdout};
use std::path::Path;
use std::process::Command;

/// The verbs `kiln --help` lists (but `help`).
fn verbs() -> Vec<String> {
    let out = kiln(Path::new("."), &["--help"], &[]);
    let help = stdout(&out);
    let list: Vec<String> = help
        .split("Commands:\n")
        .nth(1)
        .expect("kiln --help lists its commands")
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|v| *v != "help")
        .map(String::from)
        .collect();
    assert!(list.len() >= 12, "{list:?}");
    list
}

/// Run `command` (shell words) on a pseudo-terminal; its output, as the
/// terminal showed it (stdout and stderr together).
fn on_a_terminal(cwd: &Path, command: &str, env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new("script");
    cmd.current_dir(cwd)
        .args(["-q", "-e", "-c", command, "/dev/null"])
        .env_remove("KILN_NO_PROGRESS")
        .env_remove("NO_COLOR")
        .env("TERM", "xterm");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("script runs (apt install util-linux)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn kiln_bin() -> &'static str {
    env!("CARGO_BIN_EXE_kiln")
}

#[test]
fn bash_completion_completes_every_subcommand() {
    let out = kiln(Path::new("."), &["completions", "bash"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("kiln.bash");
    std::fs::write(&script, &out.stdout).unwrap();
    // What bash offers after `kiln <TAB>`, from the script as a user sources it.
    let offered = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source '{}' && COMP_WORDS=(kiln '') && COMP_CWORD=1 && _kiln kiln '' kiln && printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script.display()
        ))
        .output()
        .unwrap();
    assert!(
        offered.status.success(),
        "{}",
        String::from_utf8_lossy(&offered.stderr)
    );
    let offered: Vec<String> = String::from_utf8_lossy(&offered.stdout)
        .lines()
        .map(String::from)
        .collect();
    for v in verbs() {
        assert!(
            offered.contains(&v),
            "`kiln <TAB>` does not offer {v}: {offered:?}"
        );
    }
}

#[test]
fn zsh_and_fish_completions_name_every_subcommand() {
    for shell in ["zsh", "fish"] {
        let out = kiln(Path::new("."), &["completions", shell], &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        for v in verbs() {
            assert!(text.contains(&v), "{shell} completion lacks {v}");
        }
    }
}

/// A man page as a reader sees it: `man -l`, else `groff -man`, else (no
/// formatter on this machine) its roff source with the dashes unescaped.
fn render(page: &Path) -> String {
    let have = |p: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {p}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let out = if have("man") {
        Command::new("man")
            .arg("-l")
            .arg(page)
            .env("MANWIDTH", "120")
            .output()
            .unwrap()
    } else if have("groff") {
        Command::new("groff")
            .args(["-man", "-Tutf8"])
            .arg(page)
            .output()
            .unwrap()
    } else {
        return std::fs::read_to_string(page).unwrap().replace("\\-", "-");
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_man_page_renders_and_names_every_subcommand() {
    let tmp = tempfile::tempdir().unwrap();
    let out = kiln(tmp.path(), &["man"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let page = tmp.path().join("kiln.1");
    std::fs::write(&page, &out.stdout).unwrap();
    let text = render(&page);
    assert!(
        text.contains("NAME") && text.contains("SUBCOMMANDS"),
        "{text}"
    );
    assert!(
        text.contains("--quiet") && text.contains("--color"),
        "{text}"
    );
    for v in verbs() {
        assert!(text.contains(&format!("kiln-{v}(1)")), "no {v} in:\n{text}");
    }
}

#[test]
fn man_out_dir_writes_a_page_per_verb() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("man1");
    let out = kiln(
        tmp.path(),
        &["man", "--out-dir", dir.to_str().unwrap()],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    for v in verbs() {
        assert!(dir.join(format!("kiln-{v}.1")).is_file(), "no page for {v}");
    }
    let apply = std::fs::read_to_string(dir.join("kiln-env-apply.1")).unwrap();
    assert!(apply.contains("\\-\\-yes"), "{apply}");
}

/// A signed image and its allowed signers file, in `tmp`.
fn signed_image(tmp: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let img = image(tmp, "lb", "0.1.0", true, false);
    let (key, allowed) = signing_key(tmp, "ci", "ci@example.org");
    sign(tmp, &img, &key);
    (img, allowed)
}

#[test]
fn verbose_prints_the_host_tool_command_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let (img, allowed) = signed_image(tmp.path());
    let args = [
        "verify",
        img.to_str().unwrap(),
        "--allowed-signers",
        allowed.to_str().unwrap(),
    ];
    let plain = kiln(tmp.path(), &args, &[]);
    assert!(plain.status.success(), "{}", stderr(&plain));
    assert_eq!(stderr(&plain), "");
    let verbose = kiln(tmp.path(), &[&["-v"], &args[..]].concat(), &[]);
    let err = stderr(&verbose);
    assert!(
        err.contains("ssh-keygen -Y verify -f ") && err.contains(" -n kiln-image -s "),
        "{err}"
    );
    assert_eq!(stdout(&verbose), stdout(&plain));
}

#[test]
fn progress_is_drawn_on_a_terminal_only_and_never_with_quiet() {
    let tmp = tempfile::tempdir().unwrap();
    let (img, allowed) = signed_image(tmp.path());
    let cmd = |flags: &str| {
        format!(
            "{} {flags} verify '{}' --allowed-signers '{}'",
            kiln_bin(),
            img.display(),
            allowed.display()
        )
    };
    let bar = "verifying the signature";
    let tty = on_a_terminal(tmp.path(), &cmd(""), &[]);
    assert!(tty.contains(bar), "no progress on a terminal: {tty:?}");
    assert!(tty.contains("good signature"), "{tty:?}");
    let quiet = on_a_terminal(tmp.path(), &cmd("-q"), &[]);
    assert!(!quiet.contains(bar), "-q drew progress: {quiet:?}");
    assert!(
        quiet.contains("good signature"),
        "-q hid the result: {quiet:?}"
    );
    let off = on_a_terminal(tmp.path(), &cmd(""), &[("KILN_NO_PROGRESS", "1")]);
    assert!(!off.contains(bar), "{off:?}");
    // stderr a pipe: no bar, no control characters.
    let piped = Command::new(kiln_bin())
        .args([
            "verify",
            img.to_str().unwrap(),
            "--allowed-signers",
            allowed.to_str().unwrap(),
        ])
        .env_remove("KILN_NO_PROGRESS")
        .output()
        .unwrap();
    assert!(piped.status.success());
    assert!(piped.stderr.is_empty(), "{}", stderr(&piped));
}

#[test]
fn errors_are_colored_per_color_and_no_color() {
    let tmp = tempfile::tempdir().unwrap();
    let red = "\x1b[1;31merror:\x1b[0m";
    let always = kiln(
        tmp.path(),
        &[
            "--color",
            "always",
            "verify",
            "nope",
            "--allowed-signers",
            "x",
        ],
        &[],
    );
    assert!(stderr(&always).starts_with(red), "{:?}", stderr(&always));
    // Not a terminal: auto is plain.
    let auto = kiln(
        tmp.path(),
        &["verify", "nope", "--allowed-signers", "x"],
        &[],
    );
    assert!(stderr(&auto).starts_with("error: "), "{:?}", stderr(&auto));
    let cmd = |flags: &str| format!("{} {flags} verify nope --allowed-signers x", kiln_bin());
    let tty = on_a_terminal(tmp.path(), &cmd(""), &[]);
    assert!(tty.contains(red), "{tty:?}");
    let no_color = on_a_terminal(tmp.path(), &cmd(""), &[("NO_COLOR", "1")]);
    assert!(
        no_color.contains("error: ") && !no_color.contains('\x1b'),
        "{no_color:?}"
    );
    let never = on_a_terminal(tmp.path(), &cmd("--color=never"), &[]);
    assert!(
        never.contains("error: ") && !never.contains('\x1b'),
        "{never:?}"
    );
}

#[test]
fn help_on_a_terminal_follows_color_never() {
    let tmp = tempfile::tempdir().unwrap();
    let styled = on_a_terminal(tmp.path(), &format!("{} --help", kiln_bin()), &[]);
    assert!(
        styled.contains('\x1b'),
        "clap styles help on a terminal: {styled:?}"
    );
    let plain = on_a_terminal(
        tmp.path(),
        &format!("{} --color never --help", kiln_bin()),
        &[],
    );
    assert!(
        plain.contains("Usage:") && !plain.contains('\x1b'),
        "{plain:?}"
    );
}

#[test]
fn quiet_hides_the_plan_env_apply_prints_but_not_its_error() {
    // Root only: the local provider makes network namespaces (CI runs as root).
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), "lb", "0.1.0", true, false);
    let (_, allowed) = signing_key(tmp.path(), "ci", "ci@example.org");
    let recipe = concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/tiny.toml");
    std::fs::write(
        tmp.path().join("qa.toml"),
        format!(
            r#"name = "qa"
[provider]
kind = "local"
[network]
cidr = "10.77.0.0/24"
gateway = "10.77.0.1"
vip = "10.77.0.10"
[verify]
allowed_signers = "{}"
[roles.lb]
recipe = "{recipe}"
user_data_role = "node"
image = "{}"
cores = 1
memory = 512
[[roles.lb.slots]]
name = "lb-1"
addresses = ["10.77.0.11", "10.77.0.21"]
"#,
            allowed.display(),
            img.display()
        ),
    )
    .unwrap();
    let state = tmp.path().join("state");
    let env = [("KILN_STATE".to_string(), state.display().to_string())];
    let normal = kiln(tmp.path(), &["env", "apply", "qa.toml", "--yes"], &env);
    let err = stderr(&normal);
    assert!(!normal.status.success());
    assert!(err.contains("lb-1"), "no plan on stderr: {err}");
    assert!(err.contains("is not signed"), "{err}");
    let quiet = kiln(
        tmp.path(),
        &["-q", "env", "apply", "qa.toml", "--yes"],
        &env,
    );
    let err = stderr(&quiet);
    assert!(!quiet.status.success());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: role `lb`: ") && err.contains("is not signed"),
        "{err}"
    );
    // Refused before anything was made.
    assert!(!state.join("envs/qa/local/vms").exists());
}
