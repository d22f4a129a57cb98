//! Advisory file locks (flock(2), through std's `File::lock`) that tell
//! concurrent kiln processes apart: who builds an image, who fills or reads a
//! cache entry, which scratch directories belong to a live build.
//!
//! A lock dies with its process, however the process ends (SIGKILL too), and
//! is not fooled by PID reuse or PID namespaces, as `/proc/<pid>` checks are.
//! Lock files are only ever removed by a process that holds them; a process
//! that locked a file checks afterwards that the path still names the file it
//! locked (else it locked a removed file) and tries again.

use anyhow::{Context, Result};
use std::fs::{File, TryLockError};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Shared (many readers) or exclusive (one writer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Shared,
    Exclusive,
}

/// A held lock on a file; released when dropped.
#[derive(Debug)]
pub struct Held {
    file: File,
    path: PathBuf,
    remove_on_drop: bool,
}

/// How often a waiting process tries again (and looks at Ctrl-C).
const POLL: Duration = Duration::from_millis(100);

impl Held {
    /// Take the lock at `path` (created if missing) if nobody holds it in a
    /// conflicting mode; `None` if somebody does.
    pub fn try_acquire(path: &Path, mode: Mode) -> Result<Option<Held>> {
        loop {
            let file = open_lock_file(path)?;
            if !try_lock(&file, mode).with_context(|| format!("cannot lock {}", path.display()))? {
                return Ok(None);
            }
            if let Some(held) = Held::verified(file, path, mode)? {
                return Ok(Some(held));
            }
        }
    }

    /// Take the lock at `path`, waiting while another process holds it. The
    /// wait is announced once on stderr ("waiting for another kiln build of
    /// `what` (pid N)…") and ends early with [`Interrupted`] on Ctrl-C.
    ///
    /// [`Interrupted`]: crate::util::interrupt::Interrupted
    pub fn acquire(path: &Path, mode: Mode, what: &str) -> Result<Held> {
        let mut told = false;
        loop {
            let file = open_lock_file(path)?;
            loop {
                if try_lock(&file, mode)
                    .with_context(|| format!("cannot lock {}", path.display()))?
                {
                    break;
                }
                if !told {
                    told = true;
                    let pid = holder_pid(&file)
                        .map(|p| format!(" (pid {p})"))
                        .unwrap_or_default();
                    crate::util::term::info(format!(
                        "waiting for another kiln build of {what}{pid}…"
                    ));
                }
                crate::util::interrupt::check()?;
                std::thread::sleep(POLL);
            }
            if let Some(held) = Held::verified(file, path, mode)? {
                return Ok(held);
            }
        }
    }

    /// Remove the lock file when the lock is released: for locks on things
    /// that should leave no trace (an output directory's lock in `images/`).
    pub fn remove_on_drop(mut self) -> Held {
        self.remove_on_drop = true;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The locked file is still the one at `path` (nobody removed it while
    /// this process waited): then the lock is ours. An exclusive holder
    /// writes its pid into the file for the messages of those who wait.
    fn verified(file: File, path: &Path, mode: Mode) -> Result<Option<Held>> {
        let ours = file.metadata()?;
        match std::fs::metadata(path) {
            Ok(m) if m.dev() == ours.dev() && m.ino() == ours.ino() => {}
            _ => return Ok(None),
        }
        if mode == Mode::Exclusive {
            // Best effort: only messages read it.
            let _ = file.set_len(0);
            let _ = (&file).write_all(format!("{}\n", std::process::id()).as_bytes());
        }
        Ok(Some(Held {
            file,
            path: path.to_path_buf(),
            remove_on_drop: false,
        }))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.remove_on_drop {
            // Still locked: whoever opened this file meanwhile finds it gone
            // once it gets the lock, and starts over with a new one.
            let _ = std::fs::remove_file(&self.path);
        }
        let _ = self.file.unlock();
    }
}

fn open_lock_file(path: &Path) -> Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))
}

/// `Ok(false)` when another open file holds a conflicting lock.
fn try_lock(file: &File, mode: Mode) -> io::Result<bool> {
    let r = match mode {
        Mode::Shared => file.try_lock_shared(),
        Mode::Exclusive => file.try_lock(),
    };
    match r {
        Ok(()) => Ok(true),
        Err(TryLockError::WouldBlock) => Ok(false),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

/// Who holds a lock on `file`: from /proc/locks (exact, for shared holders
/// too), else the pid its last exclusive holder wrote into it.
fn holder_pid(file: &File) -> Option<u32> {
    let m = file.metadata().ok()?;
    let me = std::process::id();
    let id = format!(
        "{:02x}:{:02x}:{}",
        libc::major(m.dev()),
        libc::minor(m.dev()),
        m.ino()
    );
    // "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF" (proc(5)).
    let from_proc = std::fs::read_to_string("/proc/locks").ok().and_then(|t| {
        t.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (pid, dev) = (f.get(4)?, f.get(5)?);
            let pid: u32 = pid.parse().ok()?;
            (*dev == id && pid != 0 && pid != me).then_some(pid)
        })
    });
    from_proc.or_else(|| {
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 16];
        let n = file.read_at(&mut buf, 0).ok()?;
        std::str::from_utf8(&buf[..n]).ok()?.trim().parse().ok()
    })
}

/// The name of the lock file inside a [`LockedDir`].
pub const DIR_LOCK: &str = ".kiln-lock";

/// A temporary directory that its process keeps locked (`.kiln-lock` inside)
/// for as long as it lives, so [`sweep`] can tell it from what a killed build
/// left behind. Removed with everything in it when dropped.
#[derive(Debug)]
pub struct LockedDir {
    dir: Option<tempfile::TempDir>,
    lock: Option<File>,
}

impl LockedDir {
    /// A new directory `<parent>/<prefix><random>`.
    pub fn new_in(parent: &Path, prefix: &str) -> io::Result<LockedDir> {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir_in(parent)?;
        // Locked under another name, then renamed: a sweeper never finds the
        // lock file unlocked (nor takes the lock before this process does).
        let pending = dir.path().join(".kiln-lock.new");
        let lock = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&pending)?;
        lock.try_lock().map_err(|e| match e {
            TryLockError::Error(e) => e,
            TryLockError::WouldBlock => io::Error::other("a new lock file is locked"),
        })?;
        let _ = (&lock).write_all(format!("{}\n", std::process::id()).as_bytes());
        std::fs::rename(&pending, dir.path().join(DIR_LOCK))?;
        Ok(LockedDir {
            dir: Some(dir),
            lock: Some(lock),
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("present until dropped").path()
    }

    /// Keep the directory, without its lock file: for a staging directory
    /// about to be renamed into place (it is then no longer scratch).
    pub fn keep(mut self) -> io::Result<PathBuf> {
        let dir = self.dir.take().expect("present until dropped");
        std::fs::remove_file(dir.path().join(DIR_LOCK))?;
        Ok(dir.keep())
    }
}

impl Drop for LockedDir {
    fn drop(&mut self) {
        // The directory goes first, while it is still locked.
        drop(self.dir.take());
        drop(self.lock.take());
    }
}

/// A directory without a lock file (from a kiln older than these locks, or
/// killed between creating a directory and locking it) is removed only once
/// it is this old.
const LOCKLESS_AGE: Duration = Duration::from_secs(3600);
/// A lockable temp file (a download's) is removed only once it is this old:
/// it may be the moment between its creation and its locking.
const UNLOCKED_FILE_AGE: Duration = Duration::from_secs(60);

/// Something [`sweep`] removed, and how much space it held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Swept {
    pub path: PathBuf,
    pub bytes: u64,
}

/// Remove what killed builds left in `dir` under names starting with
/// `prefix`: [`LockedDir`]s whose lock nobody holds, and files (downloads,
/// which their writer keeps locked) whose lock nobody holds. `dry_run` only
/// reports. Nothing another process holds is touched.
pub fn sweep(dir: &Path, prefix: &str, dry_run: bool) -> Vec<Swept> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with(prefix) {
            continue;
        }
        let path = e.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let age = meta
            .modified()
            .ok()
            .and_then(|t| t.elapsed().ok())
            .unwrap_or_default();
        let (lock_path, is_dir) = if meta.is_dir() {
            (path.join(DIR_LOCK), true)
        } else if meta.is_file() {
            (path.clone(), false)
        } else {
            continue;
        };
        // Held while the directory or file is removed.
        let _held = match File::open(&lock_path) {
            Ok(f) => match f.try_lock() {
                Ok(()) if is_dir || age >= UNLOCKED_FILE_AGE => Some(f),
                _ => continue,
            },
            // Nothing to hold: nobody locks a directory without a lock file.
            Err(e) if e.kind() == io::ErrorKind::NotFound && is_dir => {
                if age < LOCKLESS_AGE || !lockless_owner_is_gone(prefix, &name[prefix.len()..]) {
                    continue;
                }
                None
            }
            Err(_) => continue,
        };
        let bytes = disk_usage(&path, &mut Default::default());
        let removed = dry_run
            || if is_dir {
                std::fs::remove_dir_all(&path).is_ok()
            } else {
                std::fs::remove_file(&path).is_ok()
            };
        if removed {
            out.push(Swept { path, bytes });
        }
    }
    out
}

/// Whether the build that made a directory without a lock file is gone.
/// Kilns older than these locks named such directories `<prefix><pid>-…`
/// (the old rule, still used for them); in a directory that is all kiln's
/// (`prefix` empty: the cache's scratch area) a name without a pid counts
/// as gone, elsewhere as not kiln's.
fn lockless_owner_is_gone(prefix: &str, rest: &str) -> bool {
    let pid = rest.split('-').next().unwrap_or("");
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return prefix.is_empty();
    }
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// Bytes allocated to `path` and everything under it, counting each inode
/// once across calls sharing `seen` (hard links).
pub fn disk_usage(path: &Path, seen: &mut std::collections::HashSet<(u64, u64)>) -> u64 {
    let Ok(m) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let own = if seen.insert((m.dev(), m.ino())) {
        m.blocks() * 512
    } else {
        0
    };
    if !m.is_dir() {
        return own;
    }
    let children: u64 = std::fs::read_dir(path)
        .map(|rd| {
            rd.flatten()
                .map(|e| disk_usage(&e.path(), seen))
                .sum::<u64>()
        })
        .unwrap_or(0);
    own + children
}

/// Tie a child process to this process: the kernel sends it `signal` when the
/// thread that spawned it ends, so the child does not outlive a kiln that was
/// SIGKILLed. Spawn from a thread that lives as long as the child (the main
/// thread, or one that waits for the child): PR_SET_PDEATHSIG fires when the
/// spawning *thread* exits (prctl(2)).
pub fn die_with_parent(cmd: &mut std::process::Command, signal: i32) -> &mut std::process::Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: getpid, prctl, getppid and kill are async-signal-safe, and the
    // closure touches no memory but its copied arguments.
    let parent = unsafe { libc::getpid() };
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent died before the prctl: nobody will send the signal.
            if libc::getppid() != parent {
                libc::kill(libc::getpid(), signal);
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::process::{Child, Command, Stdio};

    /// Another process: this test binary running [`helper_process`] with
    /// `job`; returns it once it printed `READY <value>`, with that value.
    fn helper(job: &str) -> (Child, String) {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "util::locks::tests::helper_process",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env("KILN_LOCKS_HELPER", job)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let value = lines
            .find_map(|l| l.unwrap().strip_prefix("READY ").map(str::to_string))
            .expect("the helper got ready");
        (child, value)
    }

    fn kill(mut child: Child) {
        child.kill().unwrap(); // SIGKILL: no destructor, no cleanup runs
        child.wait().unwrap();
    }

    /// Not a test: the other process of the tests here (see [`helper`]).
    #[test]
    #[ignore = "run by the other tests as a separate process"]
    fn helper_process() {
        let Ok(job) = std::env::var("KILN_LOCKS_HELPER") else {
            return;
        };
        let (what, arg) = job.split_once(':').unwrap();
        let _keep: Box<dyn std::any::Any> = match what {
            "dir" => {
                let d = LockedDir::new_in(Path::new(arg), "kiln-").unwrap();
                println!("READY {}", d.path().display());
                Box::new(d)
            }
            "hold" => {
                let h = Held::acquire(Path::new(arg), Mode::Exclusive, "test").unwrap();
                println!("READY {}", std::process::id());
                Box::new(h)
            }
            "child" => {
                let mut cmd = Command::new("sleep");
                cmd.arg("600");
                die_with_parent(&mut cmd, libc::SIGKILL);
                let c = cmd.spawn().unwrap();
                println!("READY {}", c.id());
                Box::new(c)
            }
            _ => panic!("unknown helper job {job}"),
        };
        std::thread::sleep(Duration::from_secs(600));
    }

    #[test]
    fn a_killed_builds_scratch_is_swept_and_a_live_ones_is_kept() {
        let d = tempfile::tempdir().unwrap();
        let (child, theirs) = helper(&format!("dir:{}", d.path().display()));
        let theirs = PathBuf::from(theirs);
        let ours = LockedDir::new_in(d.path(), "kiln-").unwrap();
        std::fs::write(theirs.join("disk.raw"), vec![1u8; 8192]).unwrap();

        assert_eq!(sweep(d.path(), "kiln-", false), vec![]);
        assert!(theirs.exists(), "a live build's directory is kept");
        kill(child);
        let swept = sweep(d.path(), "kiln-", false);
        assert_eq!(swept.len(), 1, "{swept:?}");
        assert_eq!(swept[0].path, theirs);
        assert!(swept[0].bytes >= 8192, "{swept:?}");
        assert!(!theirs.exists(), "a killed build's directory is removed");
        assert!(ours.path().join(DIR_LOCK).exists(), "ours is kept");
    }

    #[test]
    fn a_dry_sweep_removes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let (child, theirs) = helper(&format!("dir:{}", d.path().display()));
        kill(child);
        assert_eq!(sweep(d.path(), "kiln-", true).len(), 1);
        assert!(Path::new(&theirs).exists());
    }

    fn age(p: &Path, secs: u64) {
        let t = std::time::SystemTime::now() - Duration::from_secs(secs);
        File::open(p).unwrap().set_modified(t).unwrap();
    }

    #[test]
    fn a_directory_without_a_lock_is_swept_only_when_old_and_its_pid_gone() {
        let d = tempfile::tempdir().unwrap();
        let dead = d.path().join("kiln-999999999-x");
        let dead_fresh = d.path().join("kiln-999999998-x");
        let live = d.path().join(format!("kiln-{}-y", std::process::id()));
        let not_ours = d.path().join("kiln-notapid-z");
        for p in [&dead, &dead_fresh, &live, &not_ours] {
            std::fs::create_dir(p).unwrap();
        }
        for p in [&dead, &live, &not_ours] {
            age(p, 2 * 3600);
        }
        let swept: Vec<_> = sweep(d.path(), "kiln-", false)
            .into_iter()
            .map(|s| s.path)
            .collect();
        assert_eq!(swept, vec![dead.clone()]);
        assert!(dead_fresh.exists() && live.exists() && not_ours.exists());
        // In the cache's scratch area everything is kiln's: no pid needed.
        let scratch = d.path().join("build-abc");
        std::fs::create_dir(&scratch).unwrap();
        age(&scratch, 2 * 3600);
        sweep(d.path(), "", false);
        assert!(!scratch.exists());
    }

    #[test]
    fn a_download_is_swept_only_when_nobody_writes_it() {
        let d = tempfile::tempdir().unwrap();
        let (written, left) = (d.path().join(".download-a"), d.path().join(".download-b"));
        for p in [&written, &left] {
            std::fs::write(p, b"partial").unwrap();
            age(p, 120);
        }
        let writer = File::options().write(true).open(&written).unwrap();
        writer.lock().unwrap();
        let swept: Vec<_> = sweep(d.path(), ".download-", false)
            .into_iter()
            .map(|s| s.path)
            .collect();
        assert_eq!(swept, vec![left]);
        assert!(written.exists());
    }

    #[test]
    fn a_lock_held_by_another_process_is_refused_until_that_process_dies() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("x.lock");
        let (child, pid) = helper(&format!("hold:{}", path.display()));
        assert!(Held::try_acquire(&path, Mode::Shared).unwrap().is_none());
        assert!(Held::try_acquire(&path, Mode::Exclusive).unwrap().is_none());
        // The message of a waiting build names it.
        let f = File::open(&path).unwrap();
        assert_eq!(holder_pid(&f).map(|p| p.to_string()), Some(pid));
        kill(child);
        assert!(Held::try_acquire(&path, Mode::Exclusive).unwrap().is_some());
    }

    #[test]
    fn shared_locks_exclude_only_an_exclusive_one() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("x.lock");
        let a = Held::try_acquire(&path, Mode::Shared).unwrap().unwrap();
        let b = Held::try_acquire(&path, Mode::Shared).unwrap().unwrap();
        assert!(Held::try_acquire(&path, Mode::Exclusive).unwrap().is_none());
        drop((a, b));
        assert!(Held::try_acquire(&path, Mode::Exclusive).unwrap().is_some());
    }

    #[test]
    fn a_waiter_on_a_removed_lock_file_locks_the_new_one() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("out.lock");
        let first = Held::acquire(&path, Mode::Exclusive, "test")
            .unwrap()
            .remove_on_drop();
        std::thread::scope(|s| {
            // Opens the first holder's file, then waits for its lock.
            let waiter = s.spawn(|| Held::acquire(&path, Mode::Exclusive, "test").unwrap());
            std::thread::sleep(Duration::from_millis(300));
            drop(first);
            let second = waiter.join().unwrap();
            // Its lock is on the file now at `path`, so it excludes others.
            assert!(path.exists());
            assert!(Held::try_acquire(&path, Mode::Exclusive).unwrap().is_none());
            drop(second);
        });
    }

    #[test]
    fn a_child_dies_with_the_process_that_spawned_it() {
        let (parent, pid) = helper("child:");
        let proc = PathBuf::from(format!("/proc/{pid}/stat"));
        assert!(proc.exists(), "the child runs");
        kill(parent);
        let gone = |p: &Path| {
            std::fs::read_to_string(p)
                // "pid (comm) STATE …": a zombie is dead, only not reaped.
                .map(|s| {
                    s.rsplit(')')
                        .next()
                        .unwrap_or("")
                        .trim_start()
                        .starts_with('Z')
                })
                .unwrap_or(true)
        };
        let start = std::time::Instant::now();
        while !gone(&proc) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the child outlived its parent"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
