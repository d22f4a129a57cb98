//! The local record of an environment's applies: a journal of every step
//! (append-only JSON lines) and the lock that lets one apply run at a time.
//!
//! The journal is for people and audits; apply never needs it to recover —
//! the provider's marks are the truth, so losing the journal loses no node.
//! It never holds a secret: steps name slots, VMs and addresses only.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// `<state>/envs/<env>/` (`util::state_root`): journal, lock, the access
/// key kiln keeps, the local provider's VMs.
pub(crate) fn state_dir(env: &str) -> Result<PathBuf> {
    Ok(crate::util::state_root()?.join("envs").join(env))
}

#[derive(Serialize)]
struct Entry<'a> {
    time: String,
    pid: u32,
    slot: &'a str,
    step: &'a str,
    vm: &'a str,
    detail: &'a str,
}

/// Append-only: each line is written whole and synced. Apply records each
/// step before it takes it, so the records are the step boundaries.
pub(crate) struct Journal {
    path: PathBuf,
    /// Tests: fail the n-th record (from 0), as `kill -9` would stop kiln
    /// at that step boundary.
    crash_at: Option<usize>,
    records: std::sync::atomic::AtomicUsize,
}

impl Journal {
    pub(crate) fn open(dir: &Path) -> Result<Journal> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Journal {
            path: dir.join("journal.jsonl"),
            crash_at: None,
            records: Default::default(),
        })
    }

    /// A journal whose `n`-th record stops the run (tests of `kill -9`).
    #[cfg(test)]
    pub(crate) fn crashing_at(dir: &Path, n: usize) -> Result<Journal> {
        Ok(Journal {
            crash_at: Some(n),
            ..Journal::open(dir)?
        })
    }

    pub(crate) fn record(&self, slot: &str, step: &str, vm: &str, detail: &str) -> Result<()> {
        let n = self
            .records
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.crash_at == Some(n) {
            anyhow::bail!("killed before step {n} ({step} {vm})");
        }
        let mut line = serde_json::to_string(&Entry {
            time: crate::util::now_rfc3339(),
            pid: std::process::id(),
            slot,
            step,
            vm,
            detail,
        })?;
        line.push('\n');
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("cannot open {}", self.path.display()))?;
        f.write_all(line.as_bytes())?;
        f.sync_data()?;
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.path)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }
}

/// Held while an apply (or destroy) of one environment runs; released when
/// dropped or when the process dies (flock).
pub(crate) struct EnvLock {
    _file: File,
}

impl EnvLock {
    /// Take the environment's lock, or say who holds it.
    pub(crate) fn take(dir: &Path, env: &str) -> Result<EnvLock> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join("apply.lock");
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                bail!(
                    "another kiln run is changing environment `{env}` ({}); wait for it to finish",
                    holder.trim()
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()))
            }
        }
        file.set_len(0)?;
        write!(file, "pid {}", std::process::id())?;
        Ok(EnvLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_apply_of_the_same_environment_is_refused_naming_the_holder() {
        let d = tempfile::tempdir().unwrap();
        let held = EnvLock::take(d.path(), "qa").unwrap();
        let e = format!("{:#}", EnvLock::take(d.path(), "qa").err().unwrap());
        assert!(
            e.contains("another kiln run is changing environment `qa`"),
            "{e}"
        );
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        drop(held);
        EnvLock::take(d.path(), "qa").unwrap();
    }

    #[test]
    fn the_journal_appends_one_json_line_per_step_without_secrets() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        j.record("lb-1", "create", "qa-lb-1-g0", "10.0.0.11")
            .unwrap();
        j.record("lb-1", "in-service", "qa-lb-1-g0", "").unwrap();
        let lines = j.lines();
        assert_eq!(lines.len(), 2);
        let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(v["step"], "create");
        assert_eq!(v["vm"], "qa-lb-1-g0");
    }
}
