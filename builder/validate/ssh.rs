//! SSH into the guest with `ssh2` (libssh2): connect through the forwarded
//! port, authenticate with the throwaway key, run commands under a deadline.

use super::checks::CommandResult;
use super::keys::ThrowawayKey;
use anyhow::{Context, Result};
use ssh2::Session;
use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

pub struct Guest {
    session: Session,
    /// The forwarded port on 127.0.0.1, when the session came through one
    /// (only then can [`Guest::reconnect`] dial again by itself).
    port: Option<u16>,
    user: String,
}

impl Guest {
    /// One connection attempt. With user-mode networking the TCP connect
    /// succeeds even before sshd listens, so only a finished SSH handshake and
    /// authentication count as "SSH answers".
    pub fn connect(port: u16, user: &str, key: &ThrowawayKey, timeout: Duration) -> Result<Self> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let tcp = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("cannot connect to {addr}"))?;
        let mut guest = Self::over(tcp, user, key, timeout)?;
        guest.port = Some(port);
        Ok(guest)
    }

    /// SSH over a TCP connection the caller opened already (e.g. a provider's
    /// connection into an environment's network): handshake and authenticate.
    pub fn over(tcp: TcpStream, user: &str, key: &ThrowawayKey, timeout: Duration) -> Result<Self> {
        let peer = tcp
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "the guest".into());
        let mut session = Session::new().context("cannot create an SSH session")?;
        session.set_timeout(timeout.as_millis() as u32);
        session.set_tcp_stream(tcp);
        session
            .handshake()
            .with_context(|| format!("SSH handshake with {peer} failed"))?;
        key.authenticate(&session, user)?;
        Ok(Self {
            session,
            port: None,
            user: user.to_string(),
        })
    }

    /// Replace the session with a fresh one (after a command timed out, the
    /// old session may still be busy with it). Only for sessions made with
    /// [`Guest::connect`]; one made [`Guest::over`] a given connection needs
    /// a new connection from its caller.
    pub fn reconnect(&mut self, key: &ThrowawayKey, timeout: Duration) -> Result<()> {
        let Some(port) = self.port else {
            anyhow::bail!(
                "this SSH session came over a given connection: open a new one to reconnect"
            );
        };
        *self = Self::connect(port, &self.user, key, timeout)?;
        Ok(())
    }

    /// Run `command`; give up (and report `timed_out`) after `timeout`, or
    /// when `cancelled` says so.
    pub fn run(
        &self,
        command: &str,
        timeout: Duration,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<CommandResult> {
        self.run_many(&[(command.to_string(), timeout)], cancelled)
            .pop()
            .expect("one command, one result")
    }

    /// Run several commands at once, each on its own channel of this session
    /// and under its own deadline (checks are independent; the guest's CPUs
    /// work on them together). Results come back in the given order.
    pub fn run_many(
        &self,
        commands: &[(String, Duration)],
        cancelled: &dyn Fn() -> bool,
    ) -> Vec<Result<CommandResult>> {
        let mut results: Vec<Option<Result<CommandResult>>> =
            (0..commands.len()).map(|_| None).collect();
        // OpenSSH allows 10 sessions per connection (MaxSessions).
        let indices: Vec<usize> = (0..commands.len()).collect();
        for batch in indices.chunks(8) {
            for (i, r) in batch.iter().zip(self.run_batch(batch, commands, cancelled)) {
                results[*i] = Some(r);
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("every command ran"))
            .collect()
    }

    fn run_batch(
        &self,
        batch: &[usize],
        commands: &[(String, Duration)],
        cancelled: &dyn Fn() -> bool,
    ) -> Vec<Result<CommandResult>> {
        struct Running {
            channel: Option<ssh2::Channel>,
            started: Instant,
            deadline: Instant,
            stdout: Vec<u8>,
            stderr: Vec<u8>,
            finished: Option<Instant>,
            timed_out: bool,
            error: Option<anyhow::Error>,
        }
        self.session.set_blocking(true);
        let mut running: Vec<Running> = batch
            .iter()
            .map(|&i| {
                let (command, timeout) = &commands[i];
                let started = Instant::now();
                let mut r = Running {
                    channel: None,
                    started,
                    deadline: started + *timeout,
                    stdout: Vec::new(),
                    stderr: Vec::new(),
                    finished: None,
                    timed_out: false,
                    error: None,
                };
                let opened = self
                    .session
                    .channel_session()
                    .context("cannot open an SSH channel")
                    .and_then(|mut ch| {
                        ch.exec(command)
                            .with_context(|| format!("cannot start `{command}` over SSH"))?;
                        Ok(ch)
                    });
                match opened {
                    Ok(ch) => r.channel = Some(ch),
                    Err(e) => r.error = Some(e),
                }
                r
            })
            .collect();
        self.session.set_blocking(false);
        let mut buf = [0u8; 16384];
        loop {
            let mut pending = false;
            let mut progressed = false;
            let stop = cancelled();
            for r in running.iter_mut() {
                if r.finished.is_some() || r.timed_out || r.error.is_some() {
                    continue;
                }
                let ch = r.channel.as_mut().expect("open channel");
                let mut this = false;
                for which in 0..2 {
                    let res = if which == 0 {
                        ch.read(&mut buf)
                    } else {
                        ch.stderr().read(&mut buf)
                    };
                    match res {
                        Ok(0) => {}
                        Ok(n) => {
                            this = true;
                            if which == 0 {
                                &mut r.stdout
                            } else {
                                &mut r.stderr
                            }
                            .extend_from_slice(&buf[..n]);
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                        Err(e) => {
                            r.error = Some(
                                anyhow::Error::from(e)
                                    .context("reading a command's output over SSH failed"),
                            );
                            break;
                        }
                    }
                }
                progressed |= this;
                if r.error.is_some() {
                    continue;
                }
                if ch.eof() && !this {
                    r.finished = Some(Instant::now());
                } else if stop || Instant::now() >= r.deadline {
                    r.timed_out = true;
                    r.finished = Some(Instant::now());
                    // Ask the server to close without waiting for it (the
                    // command may ignore it); callers reconnect afterwards.
                    let _ = ch.close();
                } else {
                    pending = true;
                }
            }
            if !pending {
                break;
            }
            if !progressed {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Drop timed-out channels while non-blocking, so freeing them cannot hang.
        for r in running.iter_mut().filter(|r| r.timed_out) {
            drop(r.channel.take());
        }
        self.session.set_blocking(true);
        running
            .into_iter()
            .map(|mut r| {
                if let Some(e) = r.error.take() {
                    return Err(e);
                }
                let exit = match r.channel.as_mut() {
                    Some(ch) => {
                        ch.wait_close().ok();
                        ch.exit_status().ok()
                    }
                    None => None,
                };
                Ok(CommandResult {
                    exit,
                    stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
                    timed_out: r.timed_out,
                    seconds: r
                        .finished
                        .unwrap_or_else(Instant::now)
                        .duration_since(r.started)
                        .as_secs_f64(),
                })
            })
            .collect()
    }

    /// SHA-256 fingerprint of the host key the guest presented (hex).
    pub fn host_key_sha256(&self) -> Option<String> {
        self.session
            .host_key()
            .map(|(k, _)| crate::util::sha256_hex(k))
    }
}
