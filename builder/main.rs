//! `kiln`: the command-line front end. It only parses arguments and hands
//! each verb to the library; every behaviour lives in `kiln::*`.

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Recipes in, immutable and reproducible VM images out"
)]
struct Cli {
    #[command(flatten)]
    global: kiln::cli::GlobalArgs,
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
    /// Sign an image's SHA256SUMS with an OpenSSH key (SHA256SUMS.sig).
    Sign(kiln::cli::SignArgs),
    /// Check an image's signature against allowed signers, and every file it lists.
    Verify(kiln::cli::VerifyArgs),
    /// What changed between two built images: packages, artifacts, images, files, boot, size.
    Diff(kiln::cli::DiffArgs),
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
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(kiln::cli::CompletionsArgs),
    /// Print the kiln(1) man page (or write a page per verb with --out-dir).
    Man(kiln::cli::ManArgs),
}

fn main() {
    let cli: Cli = kiln::cli::parse();
    kiln::cli::init(&cli.global);
    kiln::util::install_interrupt_handler();
    let result = match cli.command {
        Command::Check(a) => kiln::cli::check(a),
        Command::Lock(a) => kiln::cli::lock(a),
        Command::Affected(a) => kiln::cli::affected(a),
        Command::Build(a) => kiln::cli::build(a),
        Command::Validate(a) => kiln::cli::validate(a),
        Command::Sign(a) => kiln::cli::sign(a),
        Command::Verify(a) => kiln::cli::verify(a),
        Command::Diff(a) => kiln::cli::diff(a),
        Command::Publish(a) => kiln::cli::publish(a),
        Command::Templates(c) => kiln::cli::templates(c),
        Command::CloudInit(c) => kiln::cli::cloud_init(c),
        Command::Env(c) => kiln::cli::env(c),
        Command::Cache(c) => kiln::cli::cache(c),
        Command::Completions(a) => kiln::cli::completions(a, Cli::command()),
        Command::Man(a) => kiln::cli::man(a, Cli::command()),
    };
    if let Err(err) = result {
        kiln::cli::report_error(&err);
        std::process::exit(kiln::cli::exit_code(&err));
    }
}
