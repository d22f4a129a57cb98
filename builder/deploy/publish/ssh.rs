//! Fallback for Proxmox VE older than 8.4 (no `import` upload content): copy
//! the disk over SSH (ssh2) and run `qm create` / `qm disk import` / `qm template`.
//!
//! NOT TESTED AGAINST PROXMOX: no PVE host exists here. Unit tests cover the
//! command lines built, and connecting and running commands against a local
//! OpenSSH server; the copy (scp) and the qm commands themselves are untested.

use super::{journal, naming, PublishReport, VmEntry};
use crate::deploy::pve::config::SshConfig;
use crate::deploy::pve::Pve;
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;

/// Quote for a POSIX shell.
pub(crate) fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@+%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// `qm create` with the API create parameters minus the imported disk.
pub(crate) fn qm_create(vmid: u32, params: &[(String, String)]) -> String {
    let mut cmd = format!("qm create {vmid}");
    for (k, v) in params {
        if k == "vmid" || k == "scsi0" {
            continue;
        }
        cmd.push_str(&format!(" --{k} {}", sh_quote(v)));
    }
    cmd
}

pub(crate) fn qm_disk_import(vmid: u32, remote_file: &str, storage: &str, format: &str) -> String {
    format!(
        "qm disk import {vmid} {} {} --format {}",
        sh_quote(remote_file),
        sh_quote(storage),
        if format == "raw" { "raw" } else { "qcow2" }
    )
}

/// The volume `qm disk import` created, from its output. Two forms
/// (`PVE/CLI/qm.pm`, `importdisk`):
/// - up to qemu-server 8.2.6: `Successfully imported disk as 'unused0:local-lvm:vm-9000-disk-1'`;
/// - since 8.2.7 (PVE 8.3): `unused0: successfully imported disk 'local-lvm:vm-9000-disk-1'`
///   (the quoted part is the drive's config value, options may follow a comma).
pub(crate) fn imported_volume(output: &str) -> Option<String> {
    output.lines().rev().find_map(|line| {
        let line = line.trim();
        if let Some(rest) = line.split_once("imported disk as '").map(|(_, r)| r) {
            let quoted = rest.split('\'').next()?;
            let (_slot, vol) = quoted.split_once(':')?;
            return Some(vol.to_string());
        }
        let (slot, rest) = line.split_once(": successfully imported disk '")?;
        if slot.is_empty() || !slot.chars().all(|c| c.is_ascii_alphanumeric()) {
            return None;
        }
        let quoted = rest.split('\'').next()?;
        let vol = quoted.split(',').next()?;
        vol.contains(':').then(|| vol.to_string())
    })
}

pub(crate) fn qm_attach(vmid: u32, volume: &str) -> String {
    format!(
        "qm set {vmid} --scsi0 {} --boot order=scsi0",
        sh_quote(&format!("{volume},discard=on,iothread=1"))
    )
}

pub(crate) fn qm_template(vmid: u32) -> String {
    format!("qm template {vmid}")
}

pub(crate) fn qm_destroy(vmid: u32) -> String {
    format!("qm destroy {vmid} --purge 1 --destroy-unreferenced-disks 1")
}

struct Remote {
    sess: ssh2::Session,
}

impl Remote {
    fn connect(c: &SshConfig) -> Result<Remote> {
        let tcp = TcpStream::connect((c.host.as_str(), c.port))
            .with_context(|| format!("cannot connect to {}:{} over SSH", c.host, c.port))?;
        let mut sess = ssh2::Session::new()?;
        sess.set_tcp_stream(tcp);
        sess.handshake().context("SSH handshake failed")?;
        verify_host_key(&sess, c)?;
        match &c.key_file {
            Some(k) => sess
                .userauth_pubkey_file(&c.user, None, k, None)
                .with_context(|| {
                    format!("SSH key {} was not accepted for {}", k.display(), c.user)
                })?,
            None => sess
                .userauth_agent(&c.user)
                .with_context(|| format!("the SSH agent has no key accepted for {}", c.user))?,
        }
        Ok(Remote { sess })
    }

    /// Run a command; Ok(stdout) on exit 0, Err(stderr) otherwise.
    fn run(&self, cmd: &str) -> Result<std::result::Result<String, String>> {
        let mut ch = self.sess.channel_session()?;
        ch.exec(cmd)?;
        // Stdout and stderr share the channel: read them in turn without
        // blocking, or a remote that fills stderr while kiln waits for the end
        // of stdout never gets to close it.
        self.sess.set_blocking(false);
        let read = read_both(&mut ch.stream(0), &mut ch.stderr(), &mut || ch.eof());
        self.sess.set_blocking(true);
        let (out, err) = read.context("reading a command's output over SSH failed")?;
        let (out, err) = (
            String::from_utf8_lossy(&out).into_owned(),
            String::from_utf8_lossy(&err).into_owned(),
        );
        ch.wait_close()?;
        Ok(if ch.exit_status()? == 0 {
            Ok(out)
        } else {
            Err(format!("{}{}", err.trim(), out.trim()))
        })
    }

    fn must(&self, cmd: &str) -> Result<String> {
        let verb: String = cmd.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
        self.run(cmd)?
            .map_err(|e| anyhow::anyhow!("`{verb} ...` failed on the PVE host: {e}"))
    }

    fn copy(&self, local: &Path, remote: &str, pb: &indicatif::ProgressBar) -> Result<u64> {
        let mut f = std::fs::File::open(local)
            .with_context(|| format!("cannot open {}", local.display()))?;
        let len = f.metadata()?.len();
        let mut ch = self
            .sess
            .scp_send(Path::new(remote), 0o600, len, None)
            .with_context(|| format!("cannot start copying to {remote}"))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut sent = 0u64;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            ch.write_all(&buf[..n])?;
            sent += n as u64;
            pb.set_position(sent);
        }
        ch.send_eof()?;
        ch.wait_eof()?;
        ch.close()?;
        ch.wait_close()?;
        Ok(sent)
    }
}

/// Read a command's stdout and stderr to their ends together, so one that
/// fills either while the other is waited for cannot stall. Both readers must
/// not block (`WouldBlock` when they have nothing yet); `ended` says the
/// command has finished writing (an SSH channel's EOF, a child's exit). It is
/// asked before each round of reads, so a round that then finds nothing has
/// read all there was.
fn read_both(
    out: &mut impl Read,
    err: &mut impl Read,
    ended: &mut dyn FnMut() -> bool,
) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    use std::io::ErrorKind;
    let (mut out_buf, mut err_buf) = (Vec::new(), Vec::new());
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let was_ended = ended();
        let mut got = false;
        for (r, buf) in [
            (&mut *out as &mut dyn Read, &mut out_buf),
            (&mut *err as &mut dyn Read, &mut err_buf),
        ] {
            match r.read(&mut chunk) {
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    got |= n > 0;
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(e) => return Err(e),
            }
        }
        if !got {
            if was_ended {
                return Ok((out_buf, err_buf));
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

fn verify_host_key(sess: &ssh2::Session, c: &SshConfig) -> Result<()> {
    let (key, _) = sess.host_key().context("the SSH server sent no host key")?;
    if let Some(want) = &c.host_key_sha256 {
        use base64_engine::encode;
        use sha2::Digest;
        let got = encode(&sha2::Sha256::digest(key));
        if got.trim_end_matches('=') != want.trim_start_matches("SHA256:").trim_end_matches('=') {
            bail!(
                "SSH host key of {} is SHA256:{got}, not the configured {want}",
                c.host
            );
        }
        return Ok(());
    }
    let mut kh = sess.known_hosts()?;
    let home =
        std::env::var_os("HOME").context("HOME is not set (needed for ~/.ssh/known_hosts)")?;
    let file = Path::new(&home).join(".ssh/known_hosts");
    kh.read_file(&file, ssh2::KnownHostFileKind::OpenSSH)
        .with_context(|| format!("cannot read {}", file.display()))?;
    match kh.check_port(&c.host, c.port, key) {
        ssh2::CheckResult::Match => Ok(()),
        ssh2::CheckResult::Mismatch => bail!(
            "SSH host key of {} does not match {}",
            c.host,
            file.display()
        ),
        _ => bail!(
            "{} is not in {}; add it or set host_key_sha256",
            c.host,
            file.display()
        ),
    }
}

/// Minimal standard base64 (no padding) for host key fingerprints.
mod base64_engine {
    pub(super) fn encode(data: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut s = String::new();
        for ch in data.chunks(3) {
            let b = [ch[0], *ch.get(1).unwrap_or(&0), *ch.get(2).unwrap_or(&0)];
            let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
            for i in 0..=ch.len() {
                s.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        s
    }
}

/// Publish over SSH: copy, create, import, attach, template. The API is
/// still used for discovery and idempotency (older PVE has those endpoints).
pub(super) fn publish(
    pve: &Pve,
    job: &super::Job,
    vms: &[VmEntry],
    run: &mut journal::Run,
    report: &mut PublishReport,
) -> Result<()> {
    let (target, dir, m) = (job.target, job.dir, job.m);
    let c = target.cfg.ssh.as_ref().with_context(|| {
        format!(
            "target `{}` has no [ssh] settings, needed for Proxmox VE older than 8.4",
            target.name
        )
    })?;
    let remote = Remote::connect(c)?;
    let remote_file = format!("/var/tmp/{}", naming::import_file_name(m, run.id()));
    let pb = crate::util::progress::bytes(
        crate::util::progress::enabled(false),
        Some(m.disk.size),
        "copying disk over SSH",
    );
    let start = std::time::Instant::now();
    let sent = remote.copy(&m.disk_path(dir), &remote_file, &pb)?;
    pb.finish_and_clear();
    report.uploaded_bytes += sent;
    report.upload_seconds = start.elapsed().as_secs_f64();
    let check = remote.must(&format!("sha256sum {}", sh_quote(&remote_file)))?;
    if !check.starts_with(&m.id) {
        let _ = remote.run(&format!("rm -f {}", sh_quote(&remote_file)));
        bail!("the copy of the disk on {} has a different sha256", c.host);
    }
    let used: std::collections::BTreeSet<u32> = vms.iter().map(|v| v.vmid).collect();
    let [lo, hi] = target.cfg.vmid_range;
    let when = naming::now_rfc3339();
    let mut vmid = None;
    let run_id = run.id().to_string();
    for id in (lo..=hi).filter(|v| !used.contains(v)) {
        run.will_create_vm(&pve.node, id)?;
        let params = naming::create_params(target, m, id, "", &when, &run_id, job.pve_version);
        match remote.run(&qm_create(id, &params))? {
            Ok(_) => {
                vmid = Some(id);
                break;
            }
            Err(e) if e.contains("already exists") => continue,
            Err(e) => bail!("qm create {id} failed: {e}"),
        }
    }
    let vmid = vmid.with_context(|| format!("no free VMID in {lo}-{hi}"))?;
    let steps = || -> Result<()> {
        let out = remote.must(&qm_disk_import(
            vmid,
            &remote_file,
            &target.cfg.storage,
            &m.disk.format,
        ))?;
        let vol =
            imported_volume(&out).context("qm disk import did not say which volume it created")?;
        remote.must(&qm_attach(vmid, &vol))?;
        remote.must(&qm_template(vmid))?;
        Ok(())
    };
    let res = steps();
    let _ = remote.run(&format!("rm -f {}", sh_quote(&remote_file)));
    if let Err(e) = res {
        if let Err(d) = remote
            .run(&qm_destroy(vmid))
            .and_then(|r| r.map_err(anyhow::Error::msg))
        {
            run.left_behind = true;
            return Err(e.context(format!(
                "VM {vmid} is left behind ({d:#}); the next publish removes it"
            )));
        }
        return Err(e);
    }
    report.vmid = vmid;
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Command construction only: these commands have not run on real Proxmox VE.
    use super::*;

    #[test]
    fn shell_quoting_survives_spaces_and_quotes() {
        assert_eq!(sh_quote("local-lvm"), "local-lvm");
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), "'it'\\''s'");
    }

    #[test]
    fn qm_create_leaves_out_the_import_disk_and_quotes_values() {
        let p = vec![
            ("vmid".to_string(), "9000".to_string()),
            ("name".into(), "k3s-1-0".into()),
            ("scsi0".into(), "local-lvm:0,import-from=x".into()),
            ("tags".into(), "kiln;k3s".into()),
            ("description".into(), "two\nlines".into()),
        ];
        let c = qm_create(9000, &p);
        assert_eq!(
            c,
            "qm create 9000 --name k3s-1-0 --tags 'kiln;k3s' --description 'two\nlines'"
        );
    }

    #[test]
    fn disk_import_and_attach_commands() {
        assert_eq!(
            qm_disk_import(9000, "/var/tmp/kiln-a.qcow2", "local-lvm", "qcow2"),
            "qm disk import 9000 /var/tmp/kiln-a.qcow2 local-lvm --format qcow2"
        );
        assert_eq!(
            qm_attach(9000, "local-lvm:vm-9000-disk-1"),
            "qm set 9000 --scsi0 local-lvm:vm-9000-disk-1,discard=on,iothread=1 --boot order=scsi0"
        );
    }

    #[test]
    fn imported_volume_is_read_from_qm_output() {
        let out = "importing disk ...\ntransferred 4.0 GiB\nSuccessfully imported disk as 'unused0:local-lvm:vm-9000-disk-1'\n";
        assert_eq!(
            imported_volume(out).as_deref(),
            Some("local-lvm:vm-9000-disk-1")
        );
        assert_eq!(imported_volume("nothing"), None);
    }

    #[test]
    fn imported_volume_is_read_from_the_output_of_qemu_server_8_2_7_and_later() {
        let out = "importing disk '/var/tmp/kiln-a.qcow2' to VM 9000 ...\n\
                   transferred 4.0 GiB of 4.0 GiB (100.00%)\n\
                   unused0: successfully imported disk 'local-lvm:vm-9000-disk-1'\n";
        assert_eq!(
            imported_volume(out).as_deref(),
            Some("local-lvm:vm-9000-disk-1")
        );
        let attached = "scsi0: successfully imported disk 'local-zfs:vm-9000-disk-1,size=4G'\n";
        assert_eq!(
            imported_volume(attached).as_deref(),
            Some("local-zfs:vm-9000-disk-1")
        );
    }

    fn non_blocking(fd: &impl std::os::fd::AsRawFd) {
        let fd = fd.as_raw_fd();
        // SAFETY: fcntl on a pipe this test owns.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            assert!(libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == 0);
        }
    }

    #[test]
    fn both_streams_of_a_child_that_fills_stderr_first_are_read_in_full() {
        use std::process::{Command, Stdio};
        // 1 MiB of stderr before a word on stdout: far more than a pipe holds,
        // so reading stdout to its end first would wait forever.
        let mut child = Command::new("sh")
            .args(["-c", "head -c 1048576 /dev/zero >&2; echo done"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        non_blocking(&out);
        non_blocking(&err);
        let (o, e) = read_both(&mut out, &mut err, &mut || {
            child.try_wait().unwrap().is_some()
        })
        .unwrap();
        assert_eq!(o, b"done\n");
        assert_eq!(e.len(), 1 << 20);
        assert!(e.iter().all(|b| *b == 0));
    }

    /// An OpenSSH server on 127.0.0.1 as the current user, for one test.
    struct Sshd {
        child: std::process::Child,
        port: u16,
        cfg: SshConfig,
        _dir: tempfile::TempDir,
    }

    impl Drop for Sshd {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn sshd() -> Sshd {
        use crate::validate::keys::ThrowawayKey;
        use base64::Engine;
        use std::os::unix::fs::PermissionsExt;
        let sshd = crate::util::hosttools::which("sshd")
            .expect("sshd is required for this test (apt install openssh-server)");
        let dir = tempfile::tempdir().unwrap();
        let write_private = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
            p
        };
        let host = ThrowawayKey::generate("host").unwrap();
        let host_path = write_private("host_key", host.private_openssh());
        let client = ThrowawayKey::generate("kiln-publish").unwrap();
        let key_file = write_private("id_ed25519", client.private_openssh());
        let auth = dir.path().join("authorized_keys");
        std::fs::write(&auth, format!("{}\n", client.public_openssh())).unwrap();
        let port = crate::validate::qemu::free_port().unwrap();
        let conf = dir.path().join("sshd_config");
        std::fs::write(
            &conf,
            format!(
                "ListenAddress 127.0.0.1:{port}\nHostKey {}\nAuthorizedKeysFile {}\nPidFile none\n\
                 UsePAM no\nStrictModes no\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n",
                host_path.display(),
                auth.display()
            ),
        )
        .unwrap();
        std::fs::create_dir_all("/run/sshd").ok();
        let child = std::process::Command::new(sshd)
            .args(["-D", "-e", "-f"])
            .arg(&conf)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("sshd.log")).unwrap())
            .spawn()
            .expect("start sshd");
        // The host key pinned as `ssh-keygen -lf` prints it.
        let blob = base64::engine::general_purpose::STANDARD
            .decode(host.public_openssh().split_whitespace().nth(1).unwrap())
            .unwrap();
        let user = String::from_utf8(
            std::process::Command::new("id")
                .arg("-un")
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        let cfg = SshConfig {
            host: "127.0.0.1".into(),
            port,
            user: user.trim().into(),
            key_file: Some(key_file),
            host_key_sha256: Some(base64_engine::encode(&{
                use sha2::Digest;
                sha2::Sha256::digest(&blob)
            })),
        };
        Sshd {
            child,
            port,
            cfg,
            _dir: dir,
        }
    }

    fn connect(s: &Sshd) -> Remote {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Remote::connect(&s.cfg) {
                Ok(r) => return r,
                Err(e) if std::time::Instant::now() > until => {
                    panic!("cannot reach sshd on port {}: {e:#}", s.port)
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
            }
        }
    }

    /// `cmd` run over SSH, or a panic when it has not finished within a minute.
    fn run_within_a_minute(
        remote: Remote,
        cmd: &'static str,
    ) -> std::result::Result<String, String> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(remote.run(cmd).map_err(|e| format!("{e:#}")));
        });
        rx.recv_timeout(std::time::Duration::from_secs(60))
            .expect("the command over SSH did not finish (deadlocked)")
            .expect("the SSH session failed")
    }

    #[test]
    fn a_remote_that_writes_much_to_stderr_before_stdout_does_not_hang() {
        let s = sshd();
        // 4 MiB of stderr before stdout closes: more than any pipe or SSH window.
        let out = run_within_a_minute(
            connect(&s),
            "head -c 4194304 /dev/zero | tr '\\0' e >&2; echo done",
        );
        assert_eq!(out, Ok("done\n".to_string()));
    }

    #[test]
    fn a_failing_remote_command_returns_its_stderr_in_full() {
        let s = sshd();
        let err = run_within_a_minute(
            connect(&s),
            "head -c 4194304 /dev/zero | tr '\\0' e >&2; echo ' is the error' >&2; exit 2",
        )
        .unwrap_err();
        assert_eq!(err.len(), 4194304 + " is the error".len());
        assert!(
            err.ends_with("e is the error"),
            "{}",
            &err[err.len() - 40..]
        );
    }

    #[test]
    fn base64_matches_openssh_style() {
        assert_eq!(base64_engine::encode(b"hello"), "aGVsbG8");
    }
}
