//! `kiln`: the command-line front end. It only parses arguments and hands
//! each verb to the library; every behaviour lives in `kiln::*`.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Recipes in, immutable and reproducible VM images out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Parse and validate a recipe (and its lockfile) without building.
    Check(kiln::cli::CheckArgs),
    /// Resolve a recipe's pins (artifact digests, image digests) into RECIPE.lock.
    Lock(kiln::cli::LockArgs),
    /// The recipes a git diff range touches (file, lock, base, role files, overlays).
    Affected(kiln::cli::AffectedArgs),
    /// Build a recipe into images/<name>/<version>/.
    Build(kiln::cli::BuildArgs),
    /// Boot an image in QEMU and run its checks.
    Validate(kiln::cli::ValidateArgs),
    /// Publish an image as a Proxmox VE template.
    Publish(kiln::cli::PublishArgs),
    /// List or prune published templates.
    #[command(subcommand)]
    Templates(kiln::cli::TemplatesCommand),
    /// Environments: whole clusters as data, bootstrapped and replaced VM by VM.
    #[command(subcommand)]
    Env(kiln::cli::EnvCommand),
    /// Per-node cloud-init.
    #[command(subcommand, name = "cloud-init")]
    CloudInit(kiln::cli::CloudInitCommand),
    /// Inspect or trim the build cache ($KILN_CACHE).
    #[command(subcommand)]
    Cache(kiln::cli::CacheCommand),
}

fn main() {
    let cli = Cli::parse();
    kiln::util::install_interrupt_handler();
    let result = match cli.command {
        Command::Check(a) => kiln::cli::check(a),
        Command::Lock(a) => kiln::cli::lock(a),
        Command::Affected(a) => kiln::cli::affected(a),
        Command::Build(a) => kiln::cli::build(a),
        Command::Validate(a) => kiln::cli::validate(a),
        Command::Publish(a) => kiln::cli::publish(a),
        Command::Templates(c) => kiln::cli::templates(c),
        Command::CloudInit(c) => kiln::cli::cloud_init(c),
        Command::Env(c) => kiln::cli::env(c),
        Command::Cache(c) => kiln::cli::cache(c),
    };
    if let Err(err) = result {
        kiln::cli::report_error(&err);
        std::process::exit(kiln::cli::exit_code(&err));
    }
}
