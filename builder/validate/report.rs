//! Validation output: the human summary, `--json`, and JUnit XML for CI,
//! one result per image with its checks and timings.

use crate::image::manifest::ValidationRecord;
use serde::Serialize;
use std::fmt::Write;

/// The result of validating one image directory.
#[derive(Debug, Clone, Serialize)]
pub struct ImageResult {
    pub image: String,
    pub validated: bool,
    /// Present when the boot ran (passed or failed).
    pub record: Option<ValidationRecord>,
    /// Why validation failed or could not run.
    pub error: Option<String>,
}

/// A readable summary: one line per image, one per check with its time.
pub(crate) fn human(results: &[ImageResult]) -> String {
    let mut s = String::new();
    for r in results {
        let verdict = if r.validated { "PASSED" } else { "FAILED" };
        let _ = write!(s, "{}: {verdict}", r.image);
        if let Some(rec) = &r.record {
            let _ = write!(s, " (accel {}", rec.accel);
            if !rec.secure_boot_keys.is_empty() {
                let _ = write!(
                    s,
                    ", Secure Boot keys {}",
                    rec.secure_boot_keys.join(" and ")
                );
            }
            if let Some(t) = rec.boot_to_ssh_seconds {
                let _ = write!(s, ", boot to SSH {t:.1} s");
            }
            if let Some(t) = rec.boot_to_cloud_init_seconds {
                let _ = write!(s, ", to cloud-init done {t:.1} s");
            }
            s.push(')');
        }
        s.push('\n');
        if let Some(rec) = &r.record {
            for c in &rec.checks {
                let mark = if c.passed { "ok  " } else { "FAIL" };
                let _ = writeln!(s, "  {mark} {:<48} {:>7.2} s", c.name, c.seconds);
                if let Some(d) = &c.detail {
                    for line in d.lines() {
                        let _ = writeln!(s, "         {line}");
                    }
                }
            }
        }
        if let Some(e) = &r.error {
            if r.record.is_none() {
                for line in e.lines() {
                    let _ = writeln!(s, "  {line}");
                }
            }
        }
    }
    s
}

/// Machine-readable output for `--json`.
pub(crate) fn json(results: &[ImageResult]) -> serde_json::Value {
    serde_json::json!({ "images": results })
}

fn xml_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            // XML 1.0 forbids most control characters even escaped.
            c if (c as u32) < 0x20 && !matches!(c, '\n' | '\r' | '\t') => o.push('?'),
            c => o.push(c),
        }
    }
    o
}

/// JUnit XML: a testsuite per image, a testcase per check. An image that
/// could not boot gets a single failing `boot` testcase carrying the error.
pub(crate) fn junit(results: &[ImageResult]) -> String {
    let mut s = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let total: usize = results.iter().map(|r| cases(r).len()).sum();
    let failed: usize = results
        .iter()
        .map(|r| cases(r).iter().filter(|c| c.2.is_some()).count())
        .sum();
    let _ = writeln!(
        s,
        "<testsuites name=\"kiln validate\" tests=\"{total}\" failures=\"{failed}\">"
    );
    for r in results {
        let cs = cases(r);
        let time: f64 = cs.iter().map(|c| c.1).sum();
        let _ = writeln!(
            s,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" errors=\"0\" time=\"{time:.2}\">",
            xml_escape(&r.image),
            cs.len(),
            cs.iter().filter(|c| c.2.is_some()).count()
        );
        for (name, secs, failure) in cs {
            let _ = write!(
                s,
                "    <testcase classname=\"{}\" name=\"{}\" time=\"{secs:.2}\"",
                xml_escape(&r.image),
                xml_escape(&name)
            );
            match failure {
                None => s.push_str("/>\n"),
                Some(msg) => {
                    let first = msg.lines().next().unwrap_or("failed");
                    let _ = writeln!(
                        s,
                        ">\n      <failure message=\"{}\">{}</failure>\n    </testcase>",
                        xml_escape(first),
                        xml_escape(&msg)
                    );
                }
            }
        }
        s.push_str("  </testsuite>\n");
    }
    s.push_str("</testsuites>\n");
    s
}

fn cases(r: &ImageResult) -> Vec<(String, f64, Option<String>)> {
    match &r.record {
        Some(rec) if !rec.checks.is_empty() => rec
            .checks
            .iter()
            .map(|c| {
                let failure =
                    (!c.passed).then(|| c.detail.clone().unwrap_or_else(|| "failed".into()));
                (c.name.clone(), c.seconds, failure)
            })
            .collect(),
        _ => vec![(
            "boot".into(),
            0.0,
            Some(
                r.error
                    .clone()
                    .unwrap_or_else(|| "validation did not run".into()),
            ),
        )],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::manifest::CheckOutcome;

    fn result(passed: bool) -> ImageResult {
        ImageResult {
            image: "images/tiny/1".into(),
            validated: passed,
            record: Some(ValidationRecord {
                validated: passed,
                when: "2026-11-26T00:00:00Z".into(),
                kiln_version: "0.1.0".into(),
                accel: "tcg".into(),
                secure_boot_keys: vec!["2023k".into()],
                boot_to_ssh_seconds: Some(41.5),
                boot_to_cloud_init_seconds: Some(60.25),
                checks: vec![
                    CheckOutcome {
                        name: "hostname <applied>".into(),
                        passed: true,
                        seconds: 0.2,
                        detail: None,
                    },
                    CheckOutcome {
                        name: "haproxy listening".into(),
                        passed,
                        seconds: 1.0,
                        detail: (!passed)
                            .then(|| "exit status 1, expected 0\nstdout: \"x\" & y".into()),
                    },
                ],
            }),
            error: (!passed).then(|| "check failed".into()),
        }
    }

    #[test]
    fn human_summary_lists_every_check_with_its_time() {
        let s = human(&[result(false)]);
        assert!(s.starts_with("images/tiny/1: FAILED (accel tcg, Secure Boot keys 2023k, boot to SSH 41.5 s, to cloud-init done 60.2 s)\n"), "{s}");
        assert!(s.contains("  ok   hostname <applied>"), "{s}");
        assert!(s.contains("  FAIL haproxy listening"), "{s}");
        assert!(s.contains("         exit status 1, expected 0"), "{s}");
    }

    #[test]
    fn junit_counts_failures_and_escapes_text() {
        let x = junit(&[result(false), result(true)]);
        assert!(
            x.contains("<testsuites name=\"kiln validate\" tests=\"4\" failures=\"1\">"),
            "{x}"
        );
        assert!(x.contains("name=\"hostname &lt;applied&gt;\""), "{x}");
        assert!(x.contains("<failure message=\"exit status 1, expected 0\">exit status 1, expected 0\nstdout: &quot;x&quot; &amp; y</failure>"), "{x}");
    }

    #[test]
    fn junit_reports_an_image_that_never_booted_as_a_failing_boot_case() {
        let r = ImageResult {
            image: "x".into(),
            validated: false,
            record: None,
            error: Some("QEMU exited\x01".into()),
        };
        let x = junit(&[r]);
        assert!(
            x.contains("<testcase classname=\"x\" name=\"boot\" time=\"0.00\">"),
            "{x}"
        );
        assert!(x.contains("QEMU exited?"), "{x}");
    }

    #[test]
    fn json_output_carries_the_record() {
        let v = json(&[result(true)]);
        assert_eq!(v["images"][0]["validated"], true);
        assert_eq!(v["images"][0]["record"]["accel"], "tcg");
    }
}
