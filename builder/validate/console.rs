//! Serial-console scanner: reads the guest's console log as it grows and finds
//! kernel panics, Oopses, emergency/rescue shells, OOM kills and failed units.

use regex::Regex;
use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// What went wrong, as seen on the console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FindingKind {
    KernelPanic,
    Oops,
    EmergencyShell,
    OomKill,
    FailedUnit,
}

impl FindingKind {
    /// Whether the boot cannot recover from it (stop waiting at once).
    pub fn is_fatal(self) -> bool {
        matches!(self, FindingKind::KernelPanic | FindingKind::EmergencyShell)
    }
}

impl fmt::Display for FindingKind {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            FindingKind::KernelPanic => "kernel panic",
            FindingKind::Oops => "kernel Oops",
            FindingKind::EmergencyShell => "emergency shell",
            FindingKind::OomKill => "OOM kill",
            FindingKind::FailedUnit => "failed unit",
        })
    }
}

/// One suspicious console line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub kind: FindingKind,
    /// 1-based line number in the console log.
    pub line_no: usize,
    /// The line, with terminal escapes removed.
    pub line: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "{} (console line {}: {})",
            self.kind, self.line_no, self.line
        )
    }
}

fn patterns() -> &'static [(FindingKind, Regex)] {
    static P: OnceLock<Vec<(FindingKind, Regex)>> = OnceLock::new();
    P.get_or_init(|| {
        let p = |k, re: &str| (k, Regex::new(re).expect("console pattern"));
        vec![
            p(FindingKind::KernelPanic, r"Kernel panic - not syncing"),
            p(
                FindingKind::Oops,
                r"\bOops: |kernel BUG at |BUG: unable to handle|BUG: kernel NULL pointer|general protection fault|Unable to handle kernel",
            ),
            p(
                FindingKind::EmergencyShell,
                r"You are in (emergency|rescue) mode|Entering (emergency|rescue) mode|Give root password for maintenance|Cannot open access to console, the root account is locked|Dropping to a shell!",
            ),
            p(
                FindingKind::OomKill,
                r"Out of memory: Kill(ed)? process|invoked oom-killer|oom-kill:",
            ),
            p(FindingKind::FailedUnit, r"^\s*\[\s*FAILED\s*\] (.+)$"),
        ]
    })
}

/// Remove ANSI escape sequences and carriage returns (systemd colours its
/// status lines; the console also carries cursor movements).
pub(crate) fn strip_escapes(line: &str) -> String {
    static ESC: OnceLock<Regex> = OnceLock::new();
    let esc = ESC.get_or_init(|| {
        Regex::new(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>c]").unwrap()
    });
    esc.replace_all(line, "")
        .chars()
        .filter(|c| *c != '\r' && (*c == '\t' || !c.is_control()))
        .collect()
}

/// Classify one (already stripped) console line.
pub(crate) fn classify(line: &str) -> Option<FindingKind> {
    patterns()
        .iter()
        .find(|(_, re)| re.is_match(line))
        .map(|(k, _)| *k)
}

/// Scan a whole console text at once.
#[cfg(test)]
pub(crate) fn scan_text(text: &str) -> Vec<Finding> {
    let mut s = Scanner::default();
    s.feed(text.as_bytes());
    s.finish();
    s.findings
}

/// Incremental scanner: feed it bytes as they arrive; complete lines are
/// classified, a partial last line waits for its newline.
#[derive(Default)]
pub struct Scanner {
    partial: Vec<u8>,
    lines: usize,
    pub findings: Vec<Finding>,
}

impl Scanner {
    /// Feed new console bytes; returns how many findings were added.
    pub fn feed(&mut self, bytes: &[u8]) -> usize {
        let before = self.findings.len();
        self.partial.extend_from_slice(bytes);
        while let Some(pos) = self.partial.iter().position(|b| *b == b'\n') {
            let raw: Vec<u8> = self.partial.drain(..=pos).collect();
            self.line(&raw[..raw.len() - 1]);
        }
        self.findings.len() - before
    }

    /// Treat a trailing partial line as complete (end of the log). Prompts such
    /// as an emergency shell's often end without a newline.
    pub fn finish(&mut self) -> usize {
        let before = self.findings.len();
        if !self.partial.is_empty() {
            let raw = std::mem::take(&mut self.partial);
            self.line(&raw);
        }
        self.findings.len() - before
    }

    /// Peek at the partial line without consuming it (for prompts).
    pub fn partial_finding(&self) -> Option<Finding> {
        if self.partial.is_empty() {
            return None;
        }
        let line = strip_escapes(&String::from_utf8_lossy(&self.partial));
        classify(&line).map(|kind| Finding {
            kind,
            line_no: self.lines + 1,
            line: line.trim().to_string(),
        })
    }

    fn line(&mut self, raw: &[u8]) {
        self.lines += 1;
        let line = strip_escapes(&String::from_utf8_lossy(raw));
        if let Some(kind) = classify(&line) {
            self.findings.push(Finding {
                kind,
                line_no: self.lines,
                line: line.trim().to_string(),
            });
        }
    }

    /// The first finding that ends a boot, if any.
    pub fn fatal(&self) -> Option<Finding> {
        self.findings
            .iter()
            .find(|f| f.kind.is_fatal())
            .cloned()
            .or_else(|| self.partial_finding().filter(|f| f.kind.is_fatal()))
    }
}

/// Follows a console log file as QEMU writes it.
pub struct ConsoleLog {
    path: PathBuf,
    offset: u64,
    pub scanner: Scanner,
}

impl ConsoleLog {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            offset: 0,
            scanner: Scanner::default(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read what was appended since the last poll and scan it.
    pub fn poll(&mut self) -> usize {
        let Ok(mut f) = File::open(&self.path) else {
            return 0;
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return 0;
        }
        let mut buf = Vec::new();
        if f.read_to_end(&mut buf).is_err() {
            return 0;
        }
        self.offset += buf.len() as u64;
        self.scanner.feed(&buf)
    }

    /// The last `n` lines of the console, escapes removed.
    pub fn tail(&self, n: usize) -> String {
        tail_lines(&self.path, n)
    }

    /// Whether the log contains this text (used by the acceleration probe).
    pub fn contains(&self, needle: &str) -> bool {
        std::fs::read(&self.path)
            .map(|b| String::from_utf8_lossy(&b).contains(needle))
            .unwrap_or(false)
    }
}

/// The last `n` lines of a console log, escapes removed.
pub(crate) fn tail_lines(path: &Path, n: usize) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<String> = text.lines().map(strip_escapes).collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_panic_is_found_and_fatal() {
        let f = scan_text(
            "[    2.1] VFS: Cannot open root device\n[    2.2] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\n",
        );
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].kind, FindingKind::KernelPanic);
        assert_eq!(f[0].line_no, 2);
        assert!(f[0].kind.is_fatal());
    }

    #[test]
    fn oops_is_found_but_not_fatal() {
        let f = scan_text("[ 5.0] BUG: kernel NULL pointer dereference, address: 0000000000000000\n[ 5.0] Oops: 0002 [#1] PREEMPT SMP NOPTI\n");
        assert_eq!(f.len(), 2);
        assert!(f.iter().all(|x| x.kind == FindingKind::Oops));
        assert!(!FindingKind::Oops.is_fatal());
    }

    #[test]
    fn soft_lockup_under_emulation_is_not_an_oops() {
        assert!(
            scan_text("watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [swapper/0:1]\n")
                .is_empty()
        );
    }

    #[test]
    fn systemd_emergency_mode_is_fatal() {
        let f = scan_text(
            "You are in emergency mode. After logging in, type \"journalctl -xb\" to view\n",
        );
        assert_eq!(f[0].kind, FindingKind::EmergencyShell);
        assert!(f[0].kind.is_fatal());
    }

    #[test]
    fn initramfs_shell_is_an_emergency_shell() {
        let f = scan_text(
            "Gave up waiting for root file system device.\nALERT!  /dev/nonexistent does not exist.  Dropping to a shell!\n",
        );
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].kind, FindingKind::EmergencyShell);
    }

    #[test]
    fn oom_kill_is_found() {
        let f = scan_text("[ 9.9] Out of memory: Killed process 512 (stress) total-vm:1000kB\n");
        assert_eq!(f[0].kind, FindingKind::OomKill);
    }

    #[test]
    fn coloured_failed_unit_line_is_found_without_escapes() {
        let f = scan_text(
            "[\x1b[0;1;31mFAILED\x1b[0m] Failed to start \x1b[0;1;39mkiln-broken.service\x1b[0m - Broken on purpose.\r\n",
        );
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].kind, FindingKind::FailedUnit);
        assert_eq!(
            f[0].line,
            "[FAILED] Failed to start kiln-broken.service - Broken on purpose."
        );
    }

    #[test]
    fn firmware_mode_switches_are_stripped() {
        assert_eq!(
            strip_escapes("\x1b[=3h\x1b[=3hBdsDxe: failed"),
            "BdsDxe: failed"
        );
    }

    #[test]
    fn healthy_boot_lines_are_not_findings() {
        let text = "[  OK  ] Started ssh.service - OpenBSD Secure Shell server.\n\
                    [  OK  ] Reached target multi-user.target - Multi-User System.\n\
                    Debian GNU/Linux 12 kiln-validate ttyS0\n\
                    cloud-init[600]: Cloud-init v. 22.4.2 finished\n\
                    EXT4-fs (sda2): resized filesystem to 1048576\n";
        assert!(scan_text(text).is_empty());
    }

    #[test]
    fn lines_split_across_reads_are_joined() {
        let mut s = Scanner::default();
        assert_eq!(s.feed(b"[ 1.0] Kernel pan"), 0);
        assert_eq!(s.feed(b"ic - not syncing: Attempted to kill init!\n"), 1);
        assert_eq!(s.findings[0].kind, FindingKind::KernelPanic);
    }

    #[test]
    fn prompt_without_newline_counts_as_fatal() {
        let mut s = Scanner::default();
        s.feed(b"boot\nGive root password for maintenance");
        assert_eq!(s.fatal().unwrap().kind, FindingKind::EmergencyShell);
        assert!(s.findings.is_empty());
    }

    #[test]
    fn console_log_follows_a_growing_file_and_tails_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        std::fs::write(&path, "one\ntwo\n").unwrap();
        let mut log = ConsoleLog::new(&path);
        assert_eq!(log.poll(), 0);
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"[FAILED] Failed to mount /data.\nthree\n")
            .unwrap();
        assert_eq!(log.poll(), 1);
        assert_eq!(log.scanner.findings[0].line_no, 3);
        assert_eq!(log.tail(2), "[FAILED] Failed to mount /data.\nthree");
    }
}
