//! The checks `kiln validate` runs inside a booted guest: the defaults every
//! image must pass, and the evaluator that turns a command's result into a verdict.

use crate::image::manifest::{CheckOutcome, CheckSpec};
use anyhow::{Context, Result};
use regex::Regex;

/// What running one check's command produced.
#[derive(Debug, Clone, Default)]
pub struct CommandResult {
    /// Exit status; `None` when the command did not finish.
    pub exit: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
    pub seconds: f64,
}

/// Facts about this boot the default checks compare against.
#[derive(Debug, Clone)]
pub(crate) struct BootFacts {
    /// The hostname given to cloud-init in the seed's meta-data.
    pub hostname: String,
    /// Whether the image claims Secure Boot (and this boot is UEFI).
    pub secure_boot: bool,
}

/// Checks every image must pass. They run as root (through `sudo -n`).
pub(crate) fn default_checks(facts: &BootFacts) -> Vec<CheckSpec> {
    let mut checks = vec![
        CheckSpec {
            name: "system running, no failed units".into(),
            command: concat!(
                "state=$(systemctl is-system-running --wait 2>&1); echo \"state: $state\"; ",
                "failed=$(systemctl list-units --failed --no-legend --plain --no-pager); ",
                "[ -z \"$failed\" ] || echo \"failed units: $failed\"; ",
                "[ \"$state\" = running ] && [ -z \"$failed\" ]"
            )
            .into(),
            exit: 0,
            stdout: Some("(?m)^state: running$".into()),
            timeout: 120,
        },
        CheckSpec {
            name: "machine-id generated at first boot".into(),
            // An image ships an empty /etc/machine-id; systemd then treats the
            // boot as a first boot and generates a fresh id, so the id differs
            // from the image's. ConditionFirstBoot units prove it was this boot.
            command: concat!(
                "id=$(cat /etc/machine-id); echo \"machine-id: $id\"; ",
                "echo \"$id\" | grep -Eqx '[0-9a-f]{32}' || { echo 'not a machine id'; exit 1; }; ",
                "{ dmesg; journalctl -b -o cat --no-pager; } 2>/dev/null | grep -m1 'Initializing machine ID' ",
                "|| { echo 'systemd did not initialise the machine ID at this boot (the image must ship an empty /etc/machine-id)'; exit 1; }"
            )
            .into(),
            exit: 0,
            stdout: Some("(?m)^machine-id: [0-9a-f]{32}$".into()),
            timeout: 30,
        },
        CheckSpec {
            name: "SSH host keys generated at this boot".into(),
            command: concat!(
                "bt=$(awk '/^btime/ {print $2}' /proc/stat); n=0; ",
                "for k in /etc/ssh/ssh_host_*_key; do [ -f \"$k\" ] || continue; n=$((n+1)); ",
                "m=$(stat -c %Y \"$k\"); echo \"$k mtime=$m boot=$bt\"; ",
                "[ \"$m\" -ge \"$bt\" ] || { echo \"$k predates this boot\"; exit 1; }; done; ",
                "[ $n -gt 0 ] || { echo 'no SSH host keys'; exit 1; }"
            )
            .into(),
            exit: 0,
            stdout: None,
            timeout: 30,
        },
        CheckSpec {
            name: "root filesystem grown to the disk".into(),
            command: concat!(
                "src=$(findmnt -no SOURCE /); part=$(basename \"$src\"); ",
                "disk=$(basename \"$(readlink -f /sys/class/block/$part/..)\"); ",
                "ds=$(cat /sys/class/block/$disk/size); ps=$(cat /sys/class/block/$part/start); ",
                "pz=$(cat /sys/class/block/$part/size); ",
                "bc=$(dumpe2fs -h \"$src\" 2>/dev/null | awk -F: '/^Block count/ {gsub(/ /,\"\",$2); print $2}'); ",
                "bs=$(dumpe2fs -h \"$src\" 2>/dev/null | awk -F: '/^Block size/ {gsub(/ /,\"\",$2); print $2}'); ",
                "fsz=$((bc*bs)); echo \"disk=$((ds*512)) partition_end=$(((ps+pz)*512)) partition=$((pz*512)) fs=$fsz\"; ",
                // The partition must end within 8 MiB of the disk's end (GPT
                // backup header and alignment) and the fs must fill it (1 MiB).
                "[ $(( (ds-ps-pz)*512 )) -le 8388608 ] || { echo 'partition not grown to the disk'; exit 1; }; ",
                "[ $(( pz*512 - fsz )) -le 1048576 ] || { echo 'filesystem not grown to the partition'; exit 1; }"
            )
            .into(),
            exit: 0,
            stdout: None,
            timeout: 30,
        },
        CheckSpec {
            name: "no apt or unattended-upgrade timers active".into(),
            command: concat!(
                "t=$(systemctl list-units --type=timer --state=active --no-legend --plain --no-pager ",
                "| grep -Ei 'apt|unattended' || true); ",
                "[ -z \"$t\" ] || { echo \"active: $t\"; exit 1; }; echo none active"
            )
            .into(),
            exit: 0,
            stdout: None,
            timeout: 30,
        },
        CheckSpec {
            name: "hostname from cloud-init applied".into(),
            command: "hostname".into(),
            exit: 0,
            stdout: Some(format!("^{}\\s*$", regex::escape(&facts.hostname))),
            timeout: 30,
        },
    ];
    if facts.secure_boot {
        checks.insert(
            1,
            CheckSpec {
                name: "Secure Boot enabled".into(),
                command: concat!(
                    "v=$(od -An -tu1 -j4 -N1 /sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c 2>/dev/null | tr -d ' '); ",
                    "echo \"SecureBoot=${v:-absent}\""
                )
                .into(),
                exit: 0,
                stdout: Some("^SecureBoot=1\\s*$".into()),
                timeout: 30,
            },
        );
    }
    checks
}

/// The hostname cloud-init should apply: user-data's `hostname:` wins over
/// the seed's `local-hostname` (as cloud-init's set_hostname module does).
pub(crate) fn expected_hostname(user_data: Option<&str>, seeded: &str) -> String {
    let re =
        Regex::new(r#"(?m)^hostname:[ \t]*["']?([A-Za-z0-9][A-Za-z0-9.-]*)["']?[ \t]*(#.*)?$"#)
            .expect("hostname pattern");
    user_data
        .filter(|u| u.starts_with("#cloud-config"))
        .and_then(|u| re.captures(u))
        .map(|c| c[1].to_string())
        .unwrap_or_else(|| seeded.to_string())
}

/// Check that a recipe's checks are well formed (names unique, regexes valid)
/// before booting anything.
pub(crate) fn check_specs(specs: &[CheckSpec]) -> Result<()> {
    let mut seen = std::collections::BTreeSet::new();
    for s in specs {
        if !seen.insert(s.name.as_str()) {
            anyhow::bail!("check `{}` is declared twice", s.name);
        }
        if let Some(p) = &s.stdout {
            Regex::new(p)
                .with_context(|| format!("check `{}`: stdout pattern `{p}` is invalid", s.name))?;
        }
        if s.timeout == 0 {
            anyhow::bail!("check `{}`: timeout must be at least 1 second", s.name);
        }
    }
    Ok(())
}

/// Decide whether a command's result satisfies a check.
pub(crate) fn evaluate(spec: &CheckSpec, result: &CommandResult) -> CheckOutcome {
    let verdict: Result<(), String> = (|| {
        if result.timed_out {
            return Err(format!("timed out after {} s", spec.timeout));
        }
        let exit = result
            .exit
            .ok_or_else(|| "the command ended without an exit status".to_string())?;
        if exit != spec.exit {
            return Err(format!("exit status {exit}, expected {}", spec.exit));
        }
        if let Some(pattern) = &spec.stdout {
            let re = Regex::new(pattern).map_err(|e| format!("bad stdout pattern: {e}"))?;
            // Commands end their output with a newline; `^active$` should match "active\n".
            if !re.is_match(result.stdout.trim_end_matches(['\n', '\r'])) {
                return Err(format!("stdout does not match /{pattern}/"));
            }
        }
        Ok(())
    })();
    let detail = match &verdict {
        Ok(()) => None,
        Err(why) => Some(with_output(why, result)),
    };
    CheckOutcome {
        name: spec.name.clone(),
        passed: verdict.is_ok(),
        seconds: crate::util::round2(result.seconds),
        detail,
    }
}

fn with_output(why: &str, r: &CommandResult) -> String {
    let mut s = why.to_string();
    for (label, text) in [("stdout", &r.stdout), ("stderr", &r.stderr)] {
        let t = text.trim();
        if !t.is_empty() {
            s.push_str(&format!("\n{label}: {}", clip(t, 2000)));
        }
    }
    s
}

fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Quote a string for a POSIX shell.
pub(crate) fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The remote command line for a check: root through sudo, bounded by
/// `timeout` inside the guest as well as by the SSH deadline outside it.
pub(crate) fn remote_command(spec: &CheckSpec) -> String {
    format!(
        "sudo -n timeout -k 5 {} sh -c {}",
        spec.timeout,
        shell_quote(&spec.command)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(exit: i32, stdout: Option<&str>) -> CheckSpec {
        CheckSpec {
            name: "c".into(),
            command: "true".into(),
            exit,
            stdout: stdout.map(String::from),
            timeout: 10,
        }
    }

    fn ran(exit: i32, stdout: &str) -> CommandResult {
        CommandResult {
            exit: Some(exit),
            stdout: stdout.into(),
            stderr: String::new(),
            timed_out: false,
            seconds: 0.123,
        }
    }

    #[test]
    fn matching_exit_and_stdout_passes() {
        let o = evaluate(&spec(0, Some("^active$")), &ran(0, "active\n"));
        assert!(o.passed, "{o:?}");
        assert_eq!(o.detail, None);
        assert_eq!(o.seconds, 0.12);
    }

    #[test]
    fn wrong_exit_status_fails_naming_both_statuses() {
        let o = evaluate(&spec(0, None), &ran(3, "inactive\n"));
        assert!(!o.passed);
        let d = o.detail.unwrap();
        assert!(d.contains("exit status 3, expected 0"), "{d}");
        assert!(d.contains("stdout: inactive"), "{d}");
    }

    #[test]
    fn expected_nonzero_exit_passes() {
        assert!(evaluate(&spec(1, None), &ran(1, "")).passed);
    }

    #[test]
    fn stdout_not_matching_pattern_fails() {
        let o = evaluate(&spec(0, Some("LISTEN.*:6443")), &ran(0, "nothing here"));
        assert!(!o.passed);
        assert!(o.detail.unwrap().contains("does not match /LISTEN.*:6443/"));
    }

    #[test]
    fn stdout_pattern_may_match_any_line() {
        let o = evaluate(
            &spec(0, Some("(?m)^LISTEN .*:6443")),
            &ran(0, "State\nLISTEN 0 4096 *:6443 *:*\n"),
        );
        assert!(o.passed);
    }

    #[test]
    fn timeout_fails_even_with_matching_output() {
        let mut r = ran(0, "ok");
        r.timed_out = true;
        let o = evaluate(&spec(0, None), &r);
        assert!(!o.passed);
        assert!(o.detail.unwrap().starts_with("timed out after 10 s"));
    }

    #[test]
    fn missing_exit_status_fails() {
        let mut r = ran(0, "");
        r.exit = None;
        assert!(!evaluate(&spec(0, None), &r).passed);
    }

    #[test]
    fn invalid_pattern_is_refused_before_booting() {
        let err = check_specs(&[spec(0, Some("(unclosed"))]).unwrap_err();
        assert!(format!("{err:#}").contains("stdout pattern `(unclosed` is invalid"));
    }

    #[test]
    fn duplicate_check_names_are_refused() {
        let err = check_specs(&[spec(0, None), spec(0, None)]).unwrap_err();
        assert!(err.to_string().contains("declared twice"));
    }

    #[test]
    fn secure_boot_check_only_when_image_claims_it() {
        let names = |sb| -> Vec<String> {
            default_checks(&BootFacts {
                hostname: "h".into(),
                secure_boot: sb,
            })
            .into_iter()
            .map(|c| c.name)
            .collect()
        };
        assert!(names(true).iter().any(|n| n == "Secure Boot enabled"));
        assert!(!names(false).iter().any(|n| n == "Secure Boot enabled"));
    }

    #[test]
    fn hostname_check_matches_only_the_seeded_name() {
        let checks = default_checks(&BootFacts {
            hostname: "kiln-v.1".into(),
            secure_boot: false,
        });
        let c = checks
            .iter()
            .find(|c| c.name.starts_with("hostname"))
            .unwrap();
        assert!(evaluate(c, &ran(0, "kiln-v.1\n")).passed);
        assert!(!evaluate(c, &ran(0, "kiln-vx1\n")).passed);
        assert!(!evaluate(c, &ran(0, "debian\n")).passed);
    }

    #[test]
    fn user_data_hostname_wins_over_the_seeded_one() {
        let ud = "#cloud-config\n# comment\nhostname: tiny-test\nusers:\n  - default\n";
        assert_eq!(expected_hostname(Some(ud), "kiln-validate-1"), "tiny-test");
        let quoted = "#cloud-config\nhostname: \"lb-1\" # node\n";
        assert_eq!(expected_hostname(Some(quoted), "kiln-validate-1"), "lb-1");
    }

    #[test]
    fn seeded_hostname_is_expected_without_one_in_user_data() {
        assert_eq!(
            expected_hostname(None, "kiln-validate-1"),
            "kiln-validate-1"
        );
        let ud = "#cloud-config\nwrite_files: []\n  hostname: nested\n";
        assert_eq!(
            expected_hostname(Some(ud), "kiln-validate-1"),
            "kiln-validate-1"
        );
    }

    #[test]
    fn remote_command_quotes_single_quotes() {
        let mut s = spec(0, None);
        s.command = "echo 'a b'".into();
        assert_eq!(
            remote_command(&s),
            r"sudo -n timeout -k 5 10 sh -c 'echo '\''a b'\'''"
        );
    }
}
