//! Gates: what a new VM must pass before it goes into service — SSH answers,
//! cloud-init finished, the image's checks and `kiln validate`'s defaults, and the environment's checks.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::apply::{ApplyOptions, RoleImage};
use super::model::Environment;
use crate::deploy::providers::{NodeVm, Provider};
use crate::validate::keys::ThrowawayKey;
use crate::validate::ssh::Guest;

/// The gates apply runs; the real ones log in over SSH.
pub(crate) trait Gates {
    /// Prove a new VM: it may go into service when this returns Ok.
    fn prove(&self, vm: &NodeVm) -> Result<()>;
    /// The environment's own checks, from inside its network.
    fn env_checks(&self) -> Result<()>;
    /// Run a command on a VM (as the access user); its output, or an error
    /// when it fails.
    fn run(&self, vm: &NodeVm, command: &str) -> Result<String>;
}

/// Gates over SSH through the provider's network.
pub(crate) struct SshGates<'a> {
    pub env: &'a Environment,
    pub provider: &'a dyn Provider,
    pub images: &'a BTreeMap<String, RoleImage>,
    pub key: &'a ThrowawayKey,
    pub opts: &'a ApplyOptions,
}

impl Gates for SshGates<'_> {
    /// The gates a VM passes before it goes into service: SSH answers,
    /// cloud-init is done, the image's checks and the defaults pass, and the
    /// environment's checks pass with it running.
    fn prove(&self, vm: &NodeVm) -> Result<()> {
        let image = self.images.values().find(|i| i.manifest.id == vm.image_id);
        let guest = self.wait_for_ssh(vm)?;
        let started = Instant::now();
        let ci = guest.run(
            "cloud-init status --wait >/dev/null 2>&1; cloud-init status --long",
            self.opts.cloud_init_timeout,
            &crate::util::interrupted,
        )?;
        crate::util::check_interrupted()?;
        if ci.timed_out || ci.exit != Some(0) {
            bail!(
                "{}: cloud-init did not finish cleanly after {:.0} s: {}",
                vm.name,
                started.elapsed().as_secs_f64(),
                ci.stdout.trim()
            );
        }
        let mut specs =
            crate::validate::checks::default_checks(&crate::validate::checks::BootFacts {
                hostname: vm.name.clone(),
                secure_boot: image
                    .is_some_and(|i| i.manifest.boot.secure_boot && i.manifest.boot.uefi),
            });
        if let Some(i) = image {
            let skip = self
                .env
                .roles
                .iter()
                .find(|r| {
                    self.images
                        .get(&r.name)
                        .is_some_and(|x| x.manifest.id == i.manifest.id)
                })
                .map(|r| r.skip_checks.clone())
                .unwrap_or_default();
            specs.extend(
                i.manifest
                    .validate
                    .checks
                    .iter()
                    .filter(|c| !skip.contains(&c.name))
                    .cloned(),
            );
        }
        let commands: Vec<(String, Duration)> = specs
            .iter()
            .map(|s| {
                (
                    crate::validate::checks::remote_command(s),
                    Duration::from_secs(s.timeout + 10),
                )
            })
            .collect();
        let results = guest.run_many(&commands, &crate::util::interrupted);
        crate::util::check_interrupted()?;
        let mut failed = Vec::new();
        for (spec, r) in specs.iter().zip(results) {
            let outcome = match r {
                Ok(r) => crate::validate::checks::evaluate(spec, &r),
                Err(e) => {
                    failed.push(format!("{}: {e:#}", spec.name));
                    continue;
                }
            };
            if !outcome.passed {
                failed.push(format!(
                    "{}: {}",
                    spec.name,
                    outcome.detail.unwrap_or_default()
                ));
            }
        }
        if !failed.is_empty() {
            bail!("{}: checks failed: {}", vm.name, failed.join("; "));
        }
        self.env_checks()
    }

    fn run(&self, vm: &NodeVm, command: &str) -> Result<String> {
        self.run_on(vm, command)
    }

    fn env_checks(&self) -> Result<()> {
        for c in &self.env.checks {
            let (host, port) = c
                .tcp
                .rsplit_once(':')
                .with_context(|| format!("check `{}`: tcp must be HOST:PORT", c.name))?;
            let ip = if host == "vip" {
                self.env.network.vip
            } else {
                host.parse().with_context(|| {
                    format!(
                        "check `{}`: `{host}` is not an IPv4 address or `vip`",
                        c.name
                    )
                })?
            };
            let port: u16 = port
                .parse()
                .with_context(|| format!("check `{}`: `{port}` is not a port", c.name))?;
            let deadline = Instant::now() + Duration::from_secs(c.timeout);
            loop {
                match self
                    .provider
                    .connect(SocketAddr::from((ip, port)), Duration::from_secs(2))
                {
                    Ok(_) => break,
                    Err(e) if Instant::now() > deadline => {
                        return Err(e.context(format!("environment check `{}` failed", c.name)))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(500)),
                }
            }
        }
        Ok(())
    }
}

impl SshGates<'_> {
    /// Run `command` on `vm` over SSH (one session, 10 minutes at most).
    fn run_on(&self, vm: &NodeVm, command: &str) -> Result<String> {
        let guest = self.wait_for_ssh(vm)?;
        let r = guest.run(command, Duration::from_secs(600), &crate::util::interrupted)?;
        crate::util::check_interrupted()?;
        if r.timed_out || r.exit != Some(0) {
            bail!(
                "{}: `{command}` failed ({}): {}",
                vm.name,
                r.exit
                    .map(|c| format!("exit {c}"))
                    .unwrap_or_else(|| "timed out".into()),
                r.stderr.trim()
            );
        }
        Ok(r.stdout)
    }

    fn wait_for_ssh(&self, vm: &NodeVm) -> Result<Guest> {
        let start = Instant::now();
        let addr = SocketAddr::from((vm.address, 22));
        let mut last;
        loop {
            crate::util::check_interrupted()?;
            match self
                .provider
                .connect(addr, Duration::from_secs(5))
                .and_then(|tcp| {
                    Guest::over(
                        tcp,
                        &self.env.access.user,
                        self.key,
                        Duration::from_secs(30),
                    )
                }) {
                Ok(g) => return Ok(g),
                Err(e) => last = format!("{e:#}"),
            }
            if start.elapsed() > self.opts.boot_timeout {
                bail!(
                    "{}: SSH on {addr} did not answer within {} s ({last})",
                    vm.name,
                    self.opts.boot_timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }
}
