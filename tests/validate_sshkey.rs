//! The throwaway key kiln generates in-process must be usable by libssh2
//! (ssh2 crate) against a real OpenSSH server. Needs openssh-server (sshd)
//! on the host; runs sshd on 127.0.0.1 only, as the current user.

use kiln::validate::keys::ThrowawayKey;
use kiln::validate::ssh::Guest;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Sshd(Child);
impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().expect("id");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn start_sshd(dir: &std::path::Path, authorized: &str) -> (Sshd, u16) {
    let sshd = kiln::util::hosttools::which("sshd")
        .expect("sshd is required for this test (apt install openssh-server)");
    // The host key is a kiln-generated key too: sshd must accept its format.
    let host = ThrowawayKey::generate("host").unwrap();
    let host_path = dir.join("host_key");
    std::fs::write(&host_path, host.private_openssh()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&host_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let auth_path = dir.join("authorized_keys");
    std::fs::write(&auth_path, format!("{authorized}\n")).unwrap();
    let port = kiln::validate::qemu::free_port().unwrap();
    let conf = dir.join("sshd_config");
    std::fs::write(
        &conf,
        format!(
            "ListenAddress 127.0.0.1:{port}\nHostKey {}\nAuthorizedKeysFile {}\nPidFile none\nUsePAM no\nStrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n",
            host_path.display(),
            auth_path.display()
        ),
    )
    .unwrap();
    std::fs::create_dir_all("/run/sshd").ok();
    let child = Command::new(sshd)
        .args(["-D", "-e", "-f"])
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("sshd.log")).unwrap())
        .spawn()
        .expect("start sshd");
    (Sshd(child), port)
}

fn connect_with_retry(port: u16, user: &str, key: &ThrowawayKey) -> anyhow::Result<Guest> {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match Guest::connect(port, user, key, Duration::from_secs(5)) {
            Ok(g) => return Ok(g),
            Err(e) if Instant::now() > until || format!("{e:#}").contains("authentication") => {
                return Err(e)
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

#[test]
fn libssh2_authenticates_with_a_generated_ed25519_key_and_runs_a_command() {
    let dir = tempfile::tempdir().unwrap();
    let key = ThrowawayKey::generate("kiln-validate").unwrap();
    let (_sshd, port) = start_sshd(dir.path(), key.public_openssh());
    let guest = connect_with_retry(port, &current_user(), &key).unwrap_or_else(|e| {
        panic!(
            "{e:#}\nsshd log:\n{}",
            std::fs::read_to_string(dir.path().join("sshd.log")).unwrap_or_default()
        )
    });
    let r = guest
        .run(
            "echo out; echo err >&2; exit 3",
            Duration::from_secs(10),
            &|| false,
        )
        .unwrap();
    assert_eq!(r.exit, Some(3));
    assert_eq!(r.stdout, "out\n");
    assert_eq!(r.stderr, "err\n");
    assert!(!r.timed_out);
}

#[test]
fn a_key_the_server_does_not_know_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let known = ThrowawayKey::generate("known").unwrap();
    let other = ThrowawayKey::generate("other").unwrap();
    let (_sshd, port) = start_sshd(dir.path(), known.public_openssh());
    let err = connect_with_retry(port, &current_user(), &other)
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("authentication"), "{err:#}");
}

#[test]
fn a_command_that_outlives_its_timeout_is_reported_as_timed_out() {
    let dir = tempfile::tempdir().unwrap();
    let key = ThrowawayKey::generate("kiln-validate").unwrap();
    let (_sshd, port) = start_sshd(dir.path(), key.public_openssh());
    let guest = connect_with_retry(port, &current_user(), &key).unwrap();
    let t = Instant::now();
    let r = guest
        .run("sleep 30", Duration::from_secs(1), &|| false)
        .unwrap();
    assert!(r.timed_out);
    assert_eq!(r.exit, None);
    assert!(t.elapsed() < Duration::from_secs(10));
}
