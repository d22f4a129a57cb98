//! placeholder
use anyhow::Result;
#[derive(clap::Args, Debug)]
pub struct CheckArgs {}
#[derive(clap::Args, Debug)]
pub struct LockArgs {}
#[derive(clap::Args, Debug)]
pub struct BuildArgs {}
#[derive(clap::Subcommand, Debug)]
pub enum CloudInitCommand {
    Render,
}
pub fn check(_: CheckArgs) -> Result<()> {
    Ok(())
}
pub fn lock(_: LockArgs) -> Result<()> {
    Ok(())
}
pub fn build(_: BuildArgs) -> Result<()> {
    Ok(())
}
pub fn cloud_init(_: CloudInitCommand) -> Result<()> {
    Ok(())
}
pub fn report_error(e: &anyhow::Error) {
    eprintln!("error: {e:#}");
}
pub fn exit_code(_: &anyhow::Error) -> i32 {
    1
}
