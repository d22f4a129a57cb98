//! `kiln env plan|apply|status|destroy|rebuild`: load the environment file,
//! open its provider, ask before anything destructive, print text or `--json`.

use anyhow::{bail, Result};
use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

use super::args::{EnvArgs, EnvChangeArgs, EnvCommand};
use crate::deploy::env::{self, apply::ApplyOptions, model::Environment};
use crate::deploy::providers::{self, Provider};

pub fn env(cmd: EnvCommand) -> Result<()> {
    match cmd {
        EnvCommand::Plan(a) => plan(&a),
        EnvCommand::Apply(a) => apply(&a),
        EnvCommand::Status(a) => status(&a),
        EnvCommand::Destroy(a) => destroy(&a),
        EnvCommand::Rebuild(a) => rebuild(&a),
    }
}

fn open(a: &EnvArgs) -> Result<(Environment, Box<dyn Provider>)> {
    let e = env::load(&a.env)?;
    let p = providers::open(&e, a.accel, a.config.as_deref())?;
    Ok((e, p))
}

/// [`open`] for the verbs that change VMs, with their command-line overrides.
fn open_change(a: &EnvChangeArgs) -> Result<(Environment, Box<dyn Provider>)> {
    let (mut e, p) = open(&a.env)?;
    if let Some(n) = a.max_surge {
        e.rollout.max_surge = n;
    }
    Ok((e, p))
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn plan(a: &EnvArgs) -> Result<()> {
    let (e, p) = open(a)?;
    let (plan, _) = env::plan_for(&e, p.as_ref())?;
    if a.json {
        return print_json(&plan);
    }
    print!("{}", plan.text());
    Ok(())
}

/// Ask on the terminal; without one, only `--yes` goes ahead.
fn confirm(question: &str, yes: bool) -> Result<()> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        bail!("{question}: pass --yes to go ahead without a terminal to ask on");
    }
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    if !matches!(line.trim(), "y" | "Y" | "yes") {
        bail!("{question}: not confirmed, nothing changed");
    }
    Ok(())
}

fn options(a: &EnvChangeArgs) -> ApplyOptions {
    ApplyOptions {
        boot_timeout: Duration::from_secs(a.boot_timeout),
        say: !crate::util::term::quiet(),
        ..ApplyOptions::default()
    }
}

fn apply(a: &EnvChangeArgs) -> Result<()> {
    let (e, p) = open_change(a)?;
    let (plan, _) = env::plan_for(&e, p.as_ref())?;
    if !a.env.json && !crate::util::term::quiet() {
        eprint!("{}", plan.text());
    }
    if plan.is_noop() && !a.env.json {
        println!("{}: nothing to do", e.name);
    }
    let destructive = plan.actions.iter().any(|x| {
        !matches!(
            x,
            env::plan::Action::Create { .. } | env::plan::Action::Keep { .. }
        )
    });
    if destructive {
        confirm(
            &format!("apply replaces or destroys VMs of `{}`", e.name),
            a.yes,
        )?;
    }
    let report = env::apply_env(&e, p.as_ref(), &options(a))?;
    if a.env.json {
        return print_json(&report);
    }
    println!(
        "{}: {} steps in {:.0} s",
        e.name,
        report.steps.len(),
        report.seconds
    );
    Ok(())
}

fn status(a: &EnvArgs) -> Result<()> {
    let (e, p) = open(a)?;
    let lines = env::status(&e, p.as_ref())?;
    if a.json {
        return print_json(&lines);
    }
    if lines.is_empty() {
        println!("{}: no VMs", e.name);
    }
    for l in lines {
        println!(
            "{:<10} {:<24} {:<15} {:<8} image {} {}",
            l.vm.slot,
            l.vm.name,
            l.vm.address,
            if l.vm.running { "running" } else { "stopped" },
            &l.vm.image_id[..12.min(l.vm.image_id.len())],
            if l.current { "current" } else { "OUTDATED" }
        );
    }
    Ok(())
}

fn destroy(a: &EnvChangeArgs) -> Result<()> {
    let (e, p) = open_change(a)?;
    confirm(&format!("destroy every VM of `{}`", e.name), a.yes)?;
    let gone = env::destroy_env(&e, p.as_ref())?;
    if a.env.json {
        return print_json(&serde_json::json!({ "env": e.name, "destroyed": gone }));
    }
    println!("{}: destroyed {} VMs", e.name, gone.len());
    Ok(())
}

fn rebuild(a: &EnvChangeArgs) -> Result<()> {
    let (e, p) = open_change(a)?;
    let show = crate::util::progress::enabled(a.env.json);
    let images = env::rebuild_images(&e, crate::image::fetch::Cache::from_env()?, show)?;
    for i in &images {
        crate::util::term::info(format!(
            "[{}] {}: rebuilt to the pinned image {}",
            e.name, i.role, i.image_id
        ));
    }
    // Every image apply will need (and its signature, with `[verify]`),
    // checked before the environment is destroyed rather than after.
    env::apply::role_images(&e)?;
    confirm(
        &format!(
            "destroy `{}` and bootstrap it again from these images",
            e.name
        ),
        a.yes,
    )?;
    let destroyed = env::destroy_env(&e, p.as_ref())?;
    let report = env::apply_env(&e, p.as_ref(), &options(a))?;
    if a.env.json {
        return print_json(&serde_json::json!({
            "env": e.name,
            "images": images,
            "destroyed": destroyed,
            "apply": report,
        }));
    }
    println!(
        "{}: rebuilt from {} identical images, {} VMs bootstrapped",
        e.name,
        images.len(),
        report.steps.len()
    );
    Ok(())
}
