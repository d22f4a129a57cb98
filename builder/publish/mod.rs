//! `kiln publish`: turn a validated image into a versioned Proxmox VE
//! template over the PVE HTTP API, idempotently.

use anyhow::{bail, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct PublishArgs {
    /// Image directory (images/<name>/<version>).
    pub image: PathBuf,
}

#[derive(clap::Subcommand, Debug)]
pub enum TemplatesCommand {
    /// List templates kiln published.
    List,
}

pub fn run(_args: PublishArgs) -> Result<()> {
    bail!("kiln publish is under construction")
}

pub fn run_templates(_cmd: TemplatesCommand) -> Result<()> {
    bail!("kiln templates is under construction")
}
