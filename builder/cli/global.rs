//! What every invocation shares: parsing with the `--color` the user asked
//! for, the global `-q`/`-v`/`--color` flags, and the shell completions and
//! man pages generated from the same clap definition.

use anyhow::{Context, Result};
use std::ffi::OsString;

use super::args::{CompletionsArgs, GlobalArgs, ManArgs};
use crate::util::term::{self, ColorWhen, Verbosity};

/// Parse the command line. clap prints help and usage errors while it
/// parses, before the parsed `--color` exists, so the flag is looked up in
/// the raw arguments first.
pub fn parse<P: clap::Parser>() -> P {
    let args: Vec<OsString> = std::env::args_os().collect();
    let color = color_in(&args);
    let matches = P::command().color(color.into()).get_matches_from(args);
    P::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// `--color WHEN` or `--color=WHEN` before any `--`; auto otherwise (an
/// invalid value is left for clap to report).
fn color_in(args: &[OsString]) -> ColorWhen {
    use clap::ValueEnum;
    let mut found = ColorWhen::Auto;
    let mut it = args.iter().skip(1).map(|a| a.to_string_lossy());
    while let Some(a) = it.next() {
        let value = match a.as_ref() {
            "--" => break,
            "--color" => it.next().map(|v| v.into_owned()),
            s => s.strip_prefix("--color=").map(str::to_string),
        };
        if let Some(v) = value {
            found = ColorWhen::from_str(&v, false).unwrap_or(found);
        }
    }
    found
}

/// Apply the global flags for the rest of the run.
pub fn init(g: &GlobalArgs) {
    let verbosity = if g.quiet {
        Verbosity::Quiet
    } else if g.verbose {
        Verbosity::Verbose
    } else {
        Verbosity::Normal
    };
    term::set(verbosity, g.color);
}

/// `kiln completions SHELL`: the completion script on stdout.
pub fn completions(a: CompletionsArgs, mut cmd: clap::Command) -> Result<()> {
    let name = cmd.get_name().to_string();
    clap_complete::generate(a.shell, &mut cmd, name, &mut std::io::stdout());
    Ok(())
}

/// `kiln man`: kiln(1) on stdout, or with `--out-dir` a page per verb
/// (`kiln-env-apply.1`, ...), each written atomically.
pub fn man(a: ManArgs, cmd: clap::Command) -> Result<()> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let Some(dir) = a.out_dir else {
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd).render(&mut out)?;
        use std::io::Write;
        std::io::stdout().write_all(&out)?;
        return Ok(());
    };
    let mut written = 0;
    write_pages(&cmd, &dir, &mut written)?;
    term::info(format!("{written} man pages in {}", dir.display()));
    Ok(())
}

fn write_pages(cmd: &clap::Command, dir: &std::path::Path, written: &mut usize) -> Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub, dir, written)?;
    }
    let man = clap_mangen::Man::new(cmd.clone());
    let mut page = Vec::new();
    man.render(&mut page)?;
    let path = dir.join(man.get_filename());
    crate::util::write_atomic(&path, &page)
        .with_context(|| format!("cannot write {}", path.display()))?;
    *written += 1;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn color_is_found_in_the_raw_arguments_before_any_double_dash() {
        assert_eq!(color_in(&args(&["kiln", "--help"])), ColorWhen::Auto);
        assert_eq!(
            color_in(&args(&["kiln", "--color", "never", "build", "--help"])),
            ColorWhen::Never
        );
        assert_eq!(
            color_in(&args(&["kiln", "check", "--color=always"])),
            ColorWhen::Always
        );
        assert_eq!(
            color_in(&args(&["kiln", "--", "--color=always"])),
            ColorWhen::Auto
        );
        assert_eq!(
            color_in(&args(&["kiln", "--color", "sometimes"])),
            ColorWhen::Auto
        );
    }
}
