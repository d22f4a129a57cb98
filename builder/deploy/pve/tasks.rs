//! Proxmox VE tasks: every long operation answers a UPID; this waits for
//! one to stop and tells success (`OK`, `WARNINGS: N`) from failure.

use anyhow::{bail, Result};
use serde_json::Value;
use std::time::{Duration, Instant};

use super::client::{seg, Pve};
use super::errors::ApiError;

impl Pve {
    /// Wait for a task to stop; `OK` and `WARNINGS: N` are success.
    pub(crate) fn wait_task(&self, upid: &str, what: &str) -> Result<()> {
        let node = upid
            .split(':')
            .nth(1)
            .filter(|n| !n.is_empty())
            .unwrap_or(&self.node);
        let path = format!("/nodes/{}/tasks/{}/status", seg(node), seg(upid));
        let start = Instant::now();
        let mut delay = Duration::from_millis(100);
        let mut transient = 0;
        loop {
            if start.elapsed() > self.task_timeout {
                bail!(
                    "{what}: task {upid} did not finish within {} s",
                    self.task_timeout.as_secs()
                );
            }
            match self.get(&path, &[]) {
                Ok(v) => {
                    if v.get("status").and_then(Value::as_str) == Some("stopped") {
                        let exit = v
                            .get("exitstatus")
                            .and_then(Value::as_str)
                            .unwrap_or("unknown")
                            .to_string();
                        if exit == "OK" || exit.starts_with("WARNINGS:") {
                            return Ok(());
                        }
                        bail!("{what} failed: {exit}");
                    }
                }
                // A 400 right after task creation is transient.
                Err(e)
                    if transient < 5
                        && e.downcast_ref::<ApiError>()
                            .map(|a| a.status == 400)
                            .unwrap_or(false) =>
                {
                    transient += 1;
                }
                Err(e) => return Err(e.context(format!("{what}: cannot read task status"))),
            }
            std::thread::sleep(delay);
            // Cancellation is honoured only between polls: the task keeps running
            // on the server; the caller waits for it before cleaning up.
            delay = (delay.mul_f32(1.5)).min(Duration::from_secs(2));
        }
    }
}
