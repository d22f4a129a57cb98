//! `kiln validate`: boot an image in QEMU the way Proxmox does and prove it
//! works (QMP control, serial-console scan, checks over SSH).

use anyhow::{bail, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct ValidateArgs {
    /// Image directory (images/<name>/<version>).
    pub image: Vec<PathBuf>,
}

pub fn run(_args: ValidateArgs) -> Result<()> {
    bail!("kiln validate is under construction")
}
