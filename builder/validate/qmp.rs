//! QMP driver (sync, `qapi` crate): capability negotiation, status queries,
//! guest events, graceful `system_powerdown` and `quit`.

use anyhow::{bail, Context, Result};
use qapi::qmp;
use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

type Stream = qapi::Stream<BufReader<UnixStream>, UnixStream>;

/// One asynchronous event QEMU reported about the guest.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestEvent {
    /// QMP event name, e.g. `SHUTDOWN`, `RESET`, `GUEST_PANICKED`.
    pub name: String,
    pub data: serde_json::Value,
}

impl GuestEvent {
    fn from_qmp(e: &qmp::Event) -> Self {
        let v = serde_json::to_value(e).unwrap_or_default();
        GuestEvent {
            name: v["event"].as_str().unwrap_or("?").to_string(),
            data: v.get("data").cloned().unwrap_or(serde_json::Value::Null),
        }
    }

    /// Whether this event means the guest is gone or broken.
    pub fn is_fatal(&self) -> bool {
        self.name == "GUEST_PANICKED" || (self.name == "SHUTDOWN" && self.data["guest"] == true)
    }

    pub fn describe(&self) -> String {
        match self.name.as_str() {
            "GUEST_PANICKED" => "the guest kernel panicked (QMP GUEST_PANICKED)".into(),
            "SHUTDOWN" => format!(
                "the guest shut down by itself (QMP SHUTDOWN, reason {})",
                self.data["reason"].as_str().unwrap_or("unknown")
            ),
            other => format!("QMP event {other} {}", self.data),
        }
    }
}

pub struct QmpClient {
    qmp: qapi::Qmp<Stream>,
    /// Every event seen so far, in order.
    pub events: Vec<GuestEvent>,
}

impl QmpClient {
    /// Connect to QEMU's QMP socket and negotiate capabilities. Retries until
    /// `deadline` because QEMU creates the socket shortly after it starts;
    /// `alive` fails fast when QEMU has already exited.
    pub fn connect(
        socket: &Path,
        deadline: Instant,
        mut alive: impl FnMut() -> Result<()>,
    ) -> Result<Self> {
        let stream = loop {
            alive()?;
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(e).with_context(|| {
                        format!("QEMU's QMP socket {} never came up", socket.display())
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(15)))?;
        stream.set_write_timeout(Some(Duration::from_secs(15)))?;
        let reader = BufReader::new(stream.try_clone()?);
        let mut qmp = qapi::Qmp::new(qapi::Stream::new(reader, stream));
        qmp.handshake()
            .context("QMP capability negotiation with QEMU failed")?;
        Ok(Self {
            qmp,
            events: Vec::new(),
        })
    }

    fn drain(&mut self) -> Vec<GuestEvent> {
        let new: Vec<GuestEvent> = self
            .qmp
            .events()
            .map(|e| GuestEvent::from_qmp(&e))
            .collect();
        self.events.extend(new.iter().cloned());
        new
    }

    /// `query-status`: the run state (`running`, `paused`, `guest-panicked`,
    /// `shutdown`, …) plus any events that arrived since the last call.
    pub fn status(&mut self) -> Result<(String, Vec<GuestEvent>)> {
        let info = self
            .qmp
            .execute(&qmp::query_status {})
            .context("QMP query-status failed")?;
        let state = serde_json::to_value(info.status)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_else(|| "unknown".into());
        Ok((state, self.drain()))
    }

    /// Ask the guest to power off (ACPI power button).
    pub fn powerdown(&mut self) -> Result<()> {
        self.qmp
            .execute(&qmp::system_powerdown {})
            .context("QMP system_powerdown failed")?;
        self.drain();
        Ok(())
    }

    /// Stop QEMU at once.
    pub fn quit(&mut self) -> Result<()> {
        match self.qmp.execute(&qmp::quit {}) {
            Ok(_) => Ok(()),
            // QEMU may close the socket before its reply arrives.
            Err(qapi::ExecuteError::Io(_)) => Ok(()),
            Err(e) => bail!("QMP quit failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, Write};
    use std::os::unix::net::UnixListener;

    /// A scripted QMP server on a Unix socket, standing in for QEMU.
    fn fake_qemu(dir: &Path, replies: Vec<&'static str>) -> std::thread::JoinHandle<Vec<String>> {
        let path = dir.join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = std::io::BufReader::new(s);
            w.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}, \"package\": \"\"}, \"capabilities\": [\"oob\"]}}\r\n").unwrap();
            let mut seen = Vec::new();
            for reply in replies {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap() == 0 {
                    break;
                }
                seen.push(line.trim().to_string());
                w.write_all(reply.as_bytes()).unwrap();
            }
            seen
        })
    }

    #[test]
    fn handshake_status_and_events_are_understood() {
        let dir = tempfile::tempdir().unwrap();
        let server = fake_qemu(
            dir.path(),
            vec![
                "{\"return\": {}}\r\n",
                "{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"RESET\", \"data\": {\"guest\": true, \"reason\": \"guest-reset\"}}\r\n{\"timestamp\": {\"seconds\": 1, \"microseconds\": 3}, \"event\": \"GUEST_PANICKED\", \"data\": {\"action\": \"pause\"}}\r\n{\"return\": {\"status\": \"guest-panicked\", \"singlestep\": false, \"running\": false}}\r\n",
            ],
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut c = QmpClient::connect(&dir.path().join("qmp.sock"), deadline, || Ok(())).unwrap();
        let (state, events) = c.status().unwrap();
        assert_eq!(state, "guest-panicked");
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].name, "RESET");
        assert!(!events[0].is_fatal());
        assert_eq!(events[1].name, "GUEST_PANICKED");
        assert!(events[1].is_fatal());
        let seen = server.join().unwrap();
        assert!(seen[0].contains("qmp_capabilities"), "{seen:?}");
        assert!(seen[1].contains("query-status"), "{seen:?}");
    }

    #[test]
    fn guest_initiated_shutdown_is_fatal_but_host_one_is_not() {
        let ev = |guest: bool| GuestEvent {
            name: "SHUTDOWN".into(),
            data: serde_json::json!({"guest": guest, "reason": "guest-shutdown"}),
        };
        assert!(ev(true).is_fatal());
        assert!(!ev(false).is_fatal());
        assert!(ev(true).describe().contains("guest-shutdown"));
    }

    #[test]
    fn connect_gives_up_when_qemu_died() {
        let dir = tempfile::tempdir().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let err = QmpClient::connect(&dir.path().join("none.sock"), deadline, || {
            bail!("QEMU exited")
        })
        .err()
        .unwrap();
        assert_eq!(err.to_string(), "QEMU exited");
    }

    #[test]
    fn powerdown_and_quit_send_their_commands() {
        let dir = tempfile::tempdir().unwrap();
        let server = fake_qemu(
            dir.path(),
            vec![
                "{\"return\": {}}\r\n",
                "{\"return\": {}}\r\n",
                "{\"return\": {}}\r\n",
            ],
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut c = QmpClient::connect(&dir.path().join("qmp.sock"), deadline, || Ok(())).unwrap();
        c.powerdown().unwrap();
        c.quit().unwrap();
        let seen = server.join().unwrap();
        assert!(seen[1].contains("system_powerdown"), "{seen:?}");
        assert!(seen[2].contains("\"quit\""), "{seen:?}");
    }
}
