//! `kiln publish` and `kiln templates list|prune`: resolve the target, call
//! the deployment layer, print a summary or `--json`, never the token.

use anyhow::{anyhow, Context, Result};

use super::args::{PublishArgs, TemplatesCommand};
use crate::deploy::publish::PublishOptions;
use crate::deploy::pve::{config, Pve};

fn env_lookup(k: &str) -> Option<String> {
    std::env::var(k).ok()
}

pub fn publish(args: PublishArgs) -> Result<()> {
    let target = config::resolve(
        args.target.target.as_deref(),
        args.target.config.as_deref(),
        &env_lookup,
    )?;
    let token = target.token.clone();
    let opts = PublishOptions {
        image: args.image.clone(),
        allow_unvalidated: args.allow_unvalidated,
        via: args.via,
        progress: crate::util::progress::enabled(args.target.json),
        allowed_signers: args.allowed_signers.clone(),
    };
    let report = crate::deploy::publish::publish(&opts, &target)
        .map_err(|e| anyhow!("{}", token.redact(&format!("{e:#}"))))?;
    if args.target.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if report.nodes.len() > 1 {
        for n in &report.nodes {
            println!(
                "{} template {} (vmid {}) on {} [{}]",
                if n.created {
                    "published"
                } else {
                    "already published:"
                },
                n.name,
                n.vmid,
                n.node,
                report.tags.join(";")
            );
        }
        println!(
            "image {}: {} uploaded in {:.1} s",
            report.image_id,
            crate::util::human_bytes(report.uploaded_bytes),
            report.upload_seconds
        );
    } else if report.created {
        println!(
            "published {} as template {} (vmid {}) on {} [{}], {} uploaded in {:.1} s",
            report.image_id,
            report.name,
            report.vmid,
            report.node,
            report.tags.join(";"),
            crate::util::human_bytes(report.uploaded_bytes),
            report.upload_seconds
        );
    } else {
        println!(
            "already published: template {} (vmid {}) on {} carries image {}; nothing uploaded",
            report.name, report.vmid, report.node, report.image_id
        );
    }
    if !args.target.json {
        if let Some(v) = &report.lxc_volume {
            println!("LXC template: {v}");
        }
        for w in &report.warnings {
            crate::util::term::warn(w);
        }
    }
    Ok(())
}

pub fn templates(cmd: TemplatesCommand) -> Result<()> {
    let t = match &cmd {
        TemplatesCommand::List(a) => &a.target,
        TemplatesCommand::Prune(a) => &a.target,
    };
    let target = config::resolve(t.target.as_deref(), t.config.as_deref(), &env_lookup)?;
    let token = target.token.clone();
    let res = (|| -> Result<()> {
        let pve = Pve::connect(&target)?;
        pve.version().context("cannot reach the Proxmox VE API")?;
        match cmd {
            TemplatesCommand::List(a) => {
                let list = crate::deploy::templates::list(&pve, &target.nodes())?;
                if a.target.json {
                    println!("{}", serde_json::to_string_pretty(&list)?);
                } else {
                    print!("{}", crate::deploy::templates::table(&list));
                }
            }
            TemplatesCommand::Prune(a) => {
                let outcome = crate::deploy::templates::prune(
                    &pve,
                    &target.nodes(),
                    crate::deploy::templates::PruneOptions {
                        keep: a.keep,
                        dry_run: a.dry_run,
                        force: a.force,
                    },
                )?;
                if a.target.json {
                    println!("{}", serde_json::to_string_pretty(&outcome)?);
                } else {
                    print!(
                        "{}",
                        crate::deploy::templates::prune_summary(&outcome, a.dry_run)
                    );
                }
            }
        }
        Ok(())
    })();
    res.map_err(|e| anyhow!("{}", token.redact(&format!("{e:#}"))))
}
