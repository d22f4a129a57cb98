//! Network namespaces for the local provider, and for tests that need to act
//! inside one: `ip` (iproute2) for namespaces, bridges, addresses and taps;
//! `setns(2)` on a thread of our own for sockets inside a namespace.
//!
//! A socket belongs to the namespace it was created in, whichever thread uses
//! it later (socket(7), network_namespaces(7)). So a helper thread enters the
//! namespace, creates the socket and hands it back; no host-side interface,
//! route or NAT is ever needed to reach an environment's network.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::util::hosttools;

/// Where `ip netns add NAME` pins a namespace (iproute2 ip/ipnetns.c, NETNS_RUN_DIR).
pub fn path(ns: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(ns)
}

/// Whether the named namespace exists.
pub fn exists(ns: &str) -> bool {
    path(ns).exists()
}

/// Run `ip ARGS…`; its stdout, or an error quoting `ip`'s stderr. A missing
/// `ip` is named with its package (iproute2).
pub fn ip(args: &[&str]) -> Result<String> {
    let program = hosttools::path_of(hosttools::IP)?;
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run ip")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether a link `dev` exists inside `ns`.
pub fn link_exists(ns: &str, dev: &str) -> bool {
    exists(ns) && ip(&["-n", ns, "link", "show", "dev", dev]).is_ok()
}

/// Create the namespace `ns` with its loopback up. Fails if it exists.
pub fn create(ns: &str) -> Result<()> {
    check_name(ns)?;
    ip(&["netns", "add", ns])?;
    ip(&["-n", ns, "link", "set", "lo", "up"])?;
    Ok(())
}

/// Delete the namespace `ns` (and every link in it); gone already is fine.
pub fn delete(ns: &str) -> Result<()> {
    if exists(ns) {
        ip(&["netns", "delete", ns])?;
    }
    Ok(())
}

/// Make sure bridge `bridge` exists inside `ns` and is up (idempotent).
pub fn ensure_bridge(ns: &str, bridge: &str) -> Result<()> {
    if !link_exists(ns, bridge) {
        ip(&["-n", ns, "link", "add", bridge, "type", "bridge"])?;
    }
    ip(&["-n", ns, "link", "set", bridge, "up"])?;
    Ok(())
}

/// Put `addr/prefix` on `dev` inside `ns` (idempotent: `ip addr replace`).
pub fn add_address(ns: &str, dev: &str, addr: Ipv4Addr, prefix: u8) -> Result<()> {
    ip(&[
        "-n",
        ns,
        "addr",
        "replace",
        &format!("{addr}/{prefix}"),
        "dev",
        dev,
    ])?;
    Ok(())
}

/// Remove `addr/prefix` from `dev` inside `ns`; absent already is fine.
pub fn remove_address(ns: &str, dev: &str, addr: Ipv4Addr, prefix: u8) -> Result<()> {
    let cidr = format!("{addr}/{prefix}");
    if let Err(e) = ip(&["-n", ns, "addr", "del", &cidr, "dev", dev]) {
        // iproute2 says "Cannot assign requested address" for an absent one.
        if !format!("{e:#}").contains("Cannot assign requested address") {
            return Err(e);
        }
    }
    Ok(())
}

/// Create tap device `tap` inside `ns`, on `bridge`, up. A tap left over by
/// an interrupted run is replaced.
pub fn add_tap(ns: &str, tap: &str, bridge: &str) -> Result<()> {
    delete_link(ns, tap)?;
    ip(&["-n", ns, "tuntap", "add", "dev", tap, "mode", "tap"])?;
    ip(&["-n", ns, "link", "set", tap, "master", bridge, "up"])?;
    Ok(())
}

/// Delete link `dev` inside `ns`; gone already is fine.
pub fn delete_link(ns: &str, dev: &str) -> Result<()> {
    if link_exists(ns, dev) {
        ip(&["-n", ns, "link", "delete", dev])?;
    }
    Ok(())
}

fn check_name(ns: &str) -> Result<()> {
    if ns.is_empty() || ns.contains('/') || ns.starts_with('.') {
        bail!("`{ns}` is not a network namespace name");
    }
    Ok(())
}

fn open(ns: &str) -> Result<File> {
    check_name(ns)?;
    File::open(path(ns)).with_context(|| {
        format!(
            "network namespace {ns} does not exist ({} is missing)",
            path(ns).display()
        )
    })
}

fn enter(fd: &File) -> std::io::Result<()> {
    // SAFETY: setns(2) on a namespace fd we own; it changes only the calling thread.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Run `f` on a fresh thread that has entered network namespace `ns`, and
/// return its result. Sockets `f` creates stay in `ns` and may be used from
/// any thread afterwards. A panic in `f` is passed on.
pub fn run_in<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let fd = open(ns)?;
    std::thread::scope(|s| {
        s.spawn(move || -> Result<T> {
            enter(&fd).with_context(|| format!("cannot enter network namespace {ns}"))?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// A TCP connection to `addr` made inside network namespace `ns`.
pub fn connect(ns: &str, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    run_in(ns, || TcpStream::connect_timeout(&addr, timeout))?
        .with_context(|| format!("cannot connect to {addr} in network namespace {ns}"))
}

/// A TCP listener on `addr` inside network namespace `ns` (the address must
/// be on one of its links, or be a wildcard).
pub fn listen(ns: &str, addr: SocketAddr) -> Result<TcpListener> {
    run_in(ns, || TcpListener::bind(addr))?
        .with_context(|| format!("cannot listen on {addr} in network namespace {ns}"))
}

/// Make `cmd` run inside network namespace `ns` (entered between fork and
/// exec; only the network namespace changes, unlike `ip netns exec`, which
/// also makes a mount namespace and remounts /sys).
pub fn enter_on_exec(cmd: &mut Command, ns: &str) -> Result<()> {
    let fd = open(ns)?;
    // SAFETY: the hook only calls setns(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || enter(&fd));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespace_name_cannot_leave_the_netns_directory() {
        for bad in ["", "../etc", "a/b", ".hidden"] {
            let e = run_in(bad, || ()).unwrap_err();
            assert!(
                format!("{e:#}").contains("is not a network namespace name"),
                "{bad}: {e:#}"
            );
        }
    }

    #[test]
    fn a_missing_namespace_is_named() {
        let e = connect(
            "kiln-no-such-namespace-4711",
            "10.0.0.1:22".parse().unwrap(),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(
            format!("{e:#}")
                .contains("network namespace kiln-no-such-namespace-4711 does not exist"),
            "{e:#}"
        );
    }
}
