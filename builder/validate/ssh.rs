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
    port: u16,
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
        let mut session = Session::new().context("cannot create an SSH session")?;
        session.set_timeout(timeout.as_millis() as u32);
        session.set_tcp_stream(tcp);
        session
            .handshake()
            .with_context(|| format!("SSH handshake with {addr} failed"))?;
        key.authenticate(&session, user)?;
        Ok(Self {
            session,
            port,
            user: user.to_string(),
        })
    }

    /// Replace the session with a fresh one (after a command timed out, the
    /// old session may still be busy with it).
    pub fn reconnect(&mut self, key: &ThrowawayKey, timeout: Duration) -> Result<()> {
        *self = Self::connect(self.port, &self.user, key, timeout)?;
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
        let started = Instant::now();
        let deadline = started + timeout;
        self.session.set_blocking(true);
        let mut channel = self
            .session
            .channel_session()
            .context("cannot open an SSH channel")?;
        channel
            .exec(command)
            .with_context(|| format!("cannot start `{command}` over SSH"))?;
        self.session.set_blocking(false);
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let mut buf = [0u8; 16384];
        let mut timed_out = false;
        loop {
            let mut progressed = false;
            for which in 0..2 {
                let r = if which == 0 {
                    channel.read(&mut buf)
                } else {
                    channel.stderr().read(&mut buf)
                };
                match r {
                    Ok(0) => {}
                    Ok(n) => {
                        progressed = true;
                        if which == 0 { &mut stdout } else { &mut stderr }
                            .extend_from_slice(&buf[..n]);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => {
                        self.session.set_blocking(true);
                        return Err(e).context("reading a command's output over SSH failed");
                    }
                }
            }
            if channel.eof() && !progressed {
                break;
            }
            if Instant::now() >= deadline || cancelled() {
                timed_out = true;
                break;
            }
            if !progressed {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let exit = if timed_out {
            // Ask the server to close without waiting for it (the command may
            // ignore it); the session stays non-blocking so dropping the
            // channel cannot hang. Callers open a fresh session afterwards.
            let _ = channel.close();
            drop(channel);
            None
        } else {
            self.session.set_blocking(true);
            channel.wait_close().ok();
            channel.exit_status().ok()
        };
        self.session.set_blocking(true);
        Ok(CommandResult {
            exit,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
            timed_out,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// SHA-256 fingerprint of the host key the guest presented (hex).
    pub fn host_key_sha256(&self) -> Option<String> {
        self.session
            .host_key()
            .map(|(k, _)| crate::util::sha256_hex(k))
    }
}
