//! Small shared helpers: sha256 digests of files and streams, and writes that
//! land atomically (temp file in the same directory, fsync, rename).

pub(crate) mod diagnostics;
pub mod hosttools;
pub mod interrupt;
pub mod locks;
pub(crate) mod parallel;
pub(crate) mod progress;
pub mod term;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

/// Hex sha256 of a byte slice.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Hex sha256 of a file, streamed in 1 MiB chunks.
pub fn sha256_file(path: &Path) -> Result<String> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    sha256_reader(file).with_context(|| format!("cannot read {}", path.display()))
}

/// Hex sha256 of everything a reader yields.
pub fn sha256_reader(mut reader: impl Read) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Names a zstd compressor (library version and level): two compressors with
/// the same id give the same bytes for the same input.
pub fn zstd_id(level: i32) -> String {
    format!("zstd{}-l{level}", zstd::zstd_safe::version_number())
}

/// What the filesystem says about a file: any write, truncation, replacement
/// or new link changes it (the ctime cannot be set back from user space).
/// Recorded after a file's digest was verified, it lets a later use skip
/// hashing the file again while the file is provably untouched.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileStamp {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl FileStamp {
    pub fn of(path: &Path) -> io::Result<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        let ns = |s: i64, n: i64| s as i128 * 1_000_000_000 + n as i128;
        Ok(FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        })
    }
}

/// Work handed to a thread that is waited for when this is dropped, so the
/// process never exits with it half done (deleting scratch files while the
/// build finishes, for one).
pub struct Background(Option<std::thread::JoinHandle<()>>);

impl Background {
    pub fn spawn(work: impl FnOnce() + Send + 'static) -> Background {
        Background(Some(std::thread::spawn(work)))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            let _ = h.join();
        }
    }
}

/// A writer that hashes what passes through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            written: 0,
        }
    }
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
    /// Forget what was hashed, for an inner writer that starts over.
    pub fn reset(&mut self) {
        self.hasher = Sha256::new();
        self.written = 0;
    }
    /// The inner writer, the hex digest and the byte count.
    pub fn finish(self) -> (W, String, u64) {
        (
            self.inner,
            hex::encode(self.hasher.finalize()),
            self.written,
        )
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Mode of the files kiln writes (lockfiles, manifests, SHA256SUMS, reports):
/// readable by other users and CI artifact steps. The umask still narrows it.
const SHARED_MODE: u32 = 0o644;
/// Mode of files that hold secrets: the owner's only.
const PRIVATE_MODE: u32 = 0o600;

/// Write `contents` to `path` through a temp file in the same directory and a
/// rename, so readers see the old file or the new one, never half of one.
/// The file is 0644 (less what the umask removes): never use it for secrets.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    replace_file(path, contents, true, SHARED_MODE)
}

/// [`write_atomic`] for files holding secrets (rendered user-data): 0600.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<()> {
    replace_file(path, contents, true, PRIVATE_MODE)
}

/// [`write_atomic`] without the fsync, for cache hints whose loss after a
/// crash only costs time (their readers verify what they use): an fsync can
/// wait for gigabytes of unrelated dirty data on the same filesystem.
pub fn write_hint(path: &Path, contents: &[u8]) -> Result<()> {
    replace_file(path, contents, false, SHARED_MODE)
}

fn replace_file(path: &Path, contents: &[u8], durable: bool, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // The mode is given at creation (open(2) applies the umask to it), so a
    // secret is never readable by others, not even for a moment.
    let mut tmp = tempfile::Builder::new()
        .prefix(".kiln-tmp-")
        .permissions(std::fs::Permissions::from_mode(mode))
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temp file in {}", dir.display()))?;
    tmp.write_all(contents)?;
    if durable {
        tmp.as_file().sync_all()?;
    }
    tmp.persist(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Human-readable byte size (binary units), for summaries and errors.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// Parse sizes such as `4G`, `512M`, `64MiB`, `1024` (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (try 4G or 512M)"))?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        other => {
            return Err(format!(
                "unknown size unit `{other}` in `{s}` (use K, M, G or T)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size `{s}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4G").unwrap(), 4 << 30);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert!(parse_size("4X").is_err());
        assert!(parse_size("G").is_err());
    }

    /// The mode a file created with `mode` gets under this process's umask.
    fn masked(mode: u32) -> u32 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let umask = status
            .lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .map(|v| u32::from_str_radix(v.trim(), 8).unwrap())
            .unwrap();
        mode & !umask
    }

    fn mode_of(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn atomic_writes_are_readable_by_other_users() {
        // Lockfiles, manifests and SHA256SUMS: other users and CI steps read them.
        let dir = tempfile::tempdir().unwrap();
        let (a, h) = (dir.path().join("a"), dir.path().join("h"));
        write_atomic(&a, b"x").unwrap();
        write_hint(&h, b"x").unwrap();
        assert_eq!(mode_of(&a), masked(0o644));
        assert_eq!(mode_of(&h), masked(0o644));
        // Replacing a file does not keep the old file's mode either.
        write_atomic(&a, b"y").unwrap();
        assert_eq!(mode_of(&a), masked(0o644));
    }

    #[test]
    fn private_writes_are_for_the_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("user-data");
        write_private(&p, b"token: s3cret").unwrap();
        assert_eq!(mode_of(&p), 0o600 & masked(0o600));
        assert_eq!(std::fs::read(&p).unwrap(), b"token: s3cret");
    }

    #[test]
    fn a_second_ctrl_c_exits_at_once() {
        use child_test::*;
        let (mut child, lines) = spawn("util::tests::child_ignores_the_first_ctrl_c", &[]);
        wait_for_line(&lines, "READY");
        sigint(&child);
        // The first one only sets the flag (the child goes on working)...
        wait_for_line(&lines, "FLAG SET");
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(
            child.try_wait().unwrap().is_none(),
            "one Ctrl-C ended the child"
        );
        // ...the second ends the process without waiting for the work.
        sigint(&child);
        let (status, took) = wait_exit(&mut child, std::time::Duration::from_secs(10));
        assert_eq!(status.code(), Some(130), "{status:?}");
        assert!(took < std::time::Duration::from_secs(1), "{took:?}");
    }

    /// Run by `a_second_ctrl_c_exits_at_once`: slow work that does not look
    /// at the flag for 20 s (installing the handler twice, as nested
    /// commands may, must not make the first Ctrl-C fatal).
    #[test]
    #[ignore = "a child process of a_second_ctrl_c_exits_at_once"]
    fn child_ignores_the_first_ctrl_c() {
        if !child_test::is_child() {
            return;
        }
        install_interrupt_handler();
        install_interrupt_handler();
        println!("READY");
        let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut said = false;
        while std::time::Instant::now() < end {
            if interrupted() && !said {
                println!("FLAG SET");
                said = true;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn atomic_write_replaces_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}

pub use interrupt::{
    check as check_interrupted, install_handler as install_interrupt_handler, interrupted,
};

/// Where kiln keeps state on this machine: `$KILN_STATE`, else
/// `$XDG_STATE_HOME/kiln`, else `~/.local/state/kiln` (publish runs,
/// environments' journals, locks and keys).
pub fn state_root() -> Result<std::path::PathBuf> {
    use std::path::PathBuf;
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(s) = var("KILN_STATE") {
        return Ok(PathBuf::from(s));
    }
    if let Some(s) = var("XDG_STATE_HOME") {
        return Ok(PathBuf::from(s).join("kiln"));
    }
    let home = var("HOME").context(
        "neither KILN_STATE, XDG_STATE_HOME nor HOME is set: kiln has nowhere to keep its state",
    )?;
    Ok(PathBuf::from(home).join(".local/state/kiln"))
}

/// Seconds rounded to hundredths, for reports.
pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Everything an error says, its sources joined by `: `, each said once.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        src = s.source();
    }
    parts.join(": ")
}

/// How often work blocked on the network looks for Ctrl-C.
const INTERRUPT_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Run `work` (a blocking network call) on a thread of its own and wait for
/// it, giving up with "interrupted" within a tenth of a second of Ctrl-C. A
/// blocked socket call cannot be cancelled: the abandoned thread ends at its
/// own timeout, or with the process.
pub fn interruptible<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::spawn(move || {
        let _ = tx.send(work());
    });
    loop {
        check_interrupted()?;
        match rx.recv_timeout(INTERRUPT_POLL) {
            Ok(v) => return Ok(v),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                anyhow::bail!("a network worker thread panicked")
            }
        }
    }
}

/// Sleep for `d`, but fail with "interrupted" within a tenth of a second of Ctrl-C.
pub fn sleep_interruptible(d: std::time::Duration) -> Result<()> {
    let end = std::time::Instant::now() + d;
    loop {
        check_interrupted()?;
        let left = end.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(INTERRUPT_POLL));
    }
}

/// A reader over a network stream that Ctrl-C can stop even while a read is
/// stuck on a stalled peer: the stream is read on a thread of its own, and
/// `read` fails with "interrupted" within a tenth of a second of Ctrl-C
/// (callers then see [`interrupted`] true). Errors and the end of the stream
/// pass through unchanged; timeouts are the stream's own.
pub struct InterruptibleReader {
    rx: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    chunk: Vec<u8>,
    pos: usize,
    done: bool,
}

impl InterruptibleReader {
    pub fn new(mut inner: impl Read + Send + 'static) -> Self {
        // A few chunks ahead at most: memory stays bounded when the consumer
        // is slower than the network. The thread ends at the end of the
        // stream, on an error, or when the reader is dropped (its next send fails).
        let (tx, rx) = std::sync::mpsc::sync_channel(4);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 << 10];
            loop {
                let msg = match inner.read(&mut buf) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Ok(n) => Ok(buf[..n].to_vec()),
                    Err(e) => Err(e),
                };
                let last = !matches!(&msg, Ok(b) if !b.is_empty());
                if tx.send(msg).is_err() || last {
                    return;
                }
            }
        });
        InterruptibleReader {
            rx,
            chunk: Vec::new(),
            pos: 0,
            done: false,
        }
    }
}

impl Read for InterruptibleReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            if self.done {
                return Ok(0);
            }
            if interrupted() {
                // Not ErrorKind::Interrupted: std's read loops retry that.
                return Err(io::Error::other("interrupted"));
            }
            match self.rx.recv_timeout(INTERRUPT_POLL) {
                Ok(Ok(bytes)) => {
                    self.done = bytes.is_empty();
                    self.chunk = bytes;
                    self.pos = 0;
                }
                Ok(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    self.done = true;
                    return Err(io::Error::other("the network reader thread panicked"));
                }
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Tests of real signal handling: a signal would reach every test of the
/// process, so such a test runs in a child process (this test binary running
/// one `#[ignore]`d test, with `KILN_TEST_CHILD` set) and the parent signals it.
#[cfg(test)]
pub(crate) mod child_test {
    use std::io::BufRead;
    use std::process::{Child, Command, ExitStatus, Stdio};
    use std::time::{Duration, Instant};

    /// Whether this process is the child of [`spawn`] (the ignored test
    /// should then run; otherwise it returns at once).
    pub(crate) fn is_child() -> bool {
        std::env::var_os("KILN_TEST_CHILD").is_some()
    }

    /// Run the ignored test `name` (its full path) alone in a child process,
    /// with `envs` set; its stdout lines arrive on the returned channel.
    pub(crate) fn spawn(
        name: &str,
        envs: &[(&str, String)],
    ) -> (Child, std::sync::mpsc::Receiver<String>) {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                name,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("KILN_TEST_CHILD", "1")
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        (child, rx)
    }

    /// Wait (at most 30 s) for a stdout line of the child containing `marker`.
    pub(crate) fn wait_for_line(lines: &std::sync::mpsc::Receiver<String>, marker: &str) {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(l) if l.contains(marker) => return,
                Ok(_) => {}
                Err(_) => panic!("the child never printed `{marker}`"),
            }
        }
    }

    pub(crate) fn sigint(child: &Child) {
        // SAFETY: kill(2) on our own child, not yet reaped.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    }

    /// The child's exit status and how long it took to come, killing it
    /// after `limit`.
    pub(crate) fn wait_exit(child: &mut Child, limit: Duration) -> (ExitStatus, Duration) {
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return (status, start.elapsed());
            }
            if start.elapsed() > limit {
                let _ = child.kill();
                let status = child.wait().unwrap();
                return (status, start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// This process's peak resident set size (VmHWM), for `--json` summaries.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// While the returned guard lives, pass Ctrl-C/SIGTERM on to child `pid` as
/// SIGINT, so a long child (mmdebstrap) stops and cleans up after itself.
pub fn forward_interrupt(pid: u32) -> InterruptForwarder {
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = done.clone();
    std::thread::spawn(move || {
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            if interrupted() {
                // SAFETY: kill(2) on a child pid we spawned and have not reaped.
                unsafe { libc::kill(pid as i32, libc::SIGINT) };
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    });
    InterruptForwarder { done }
}

pub struct InterruptForwarder {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for InterruptForwarder {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A UTC calendar date and time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Civil {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

/// The UTC calendar date of a Unix timestamp (Howard Hinnant's days-to-civil).
pub fn civil(secs: u64) -> Civil {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    Civil {
        year,
        month,
        day,
        hour: (rem / 3600) as u32,
        minute: (rem % 3600 / 60) as u32,
        second: (rem % 60) as u32,
    }
}

/// RFC 3339 UTC time of a Unix timestamp, to the second.
pub fn rfc3339(secs: u64) -> String {
    let c = civil(secs);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        c.year, c.month, c.day, c.hour, c.minute, c.second
    )
}

/// The current UTC time, RFC 3339.
pub fn now_rfc3339() -> String {
    rfc3339(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    )
}
