//! How much kiln says on stderr and whether it colors it, set once from the
//! global `-q`/`-v`/`--color` flags (`cli::init`).
//!
//! Results (stdout, `--json`), warnings and errors are always printed;
//! `-q` drops progress bars and informational lines, `-v` adds detail (the
//! host-tool command lines kiln runs).

use std::ffi::OsStr;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU8, Ordering};

/// How much to say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verbosity {
    Quiet,
    Normal,
    Verbose,
}

/// `--color`: when stderr gets ANSI colors.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ColorWhen {
    /// On a terminal, unless NO_COLOR is set (non-empty) or TERM is `dumb`.
    #[default]
    Auto,
    /// Even when stderr is not a terminal.
    Always,
    /// Plain text.
    Never,
}

impl From<ColorWhen> for clap::ColorChoice {
    fn from(c: ColorWhen) -> Self {
        match c {
            ColorWhen::Auto => clap::ColorChoice::Auto,
            ColorWhen::Always => clap::ColorChoice::Always,
            ColorWhen::Never => clap::ColorChoice::Never,
        }
    }
}

static VERBOSITY: AtomicU8 = AtomicU8::new(1);
static COLOR: AtomicU8 = AtomicU8::new(0);

/// Set once at start-up from the command line.
pub fn set(verbosity: Verbosity, color: ColorWhen) {
    VERBOSITY.store(verbosity as u8, Ordering::Relaxed);
    COLOR.store(color as u8, Ordering::Relaxed);
}

pub fn verbosity() -> Verbosity {
    match VERBOSITY.load(Ordering::Relaxed) {
        0 => Verbosity::Quiet,
        1 => Verbosity::Normal,
        _ => Verbosity::Verbose,
    }
}

pub fn quiet() -> bool {
    verbosity() == Verbosity::Quiet
}

fn color_when() -> ColorWhen {
    match COLOR.load(Ordering::Relaxed) {
        1 => ColorWhen::Always,
        2 => ColorWhen::Never,
        _ => ColorWhen::Auto,
    }
}

/// The `--color auto` rule (<https://no-color.org>: NO_COLOR set to
/// anything but the empty string turns color off).
pub fn use_color(
    when: ColorWhen,
    terminal: bool,
    no_color: Option<&OsStr>,
    term: Option<&OsStr>,
) -> bool {
    match when {
        ColorWhen::Always => true,
        ColorWhen::Never => false,
        ColorWhen::Auto => {
            terminal && no_color.is_none_or(|v| v.is_empty()) && term.is_none_or(|t| t != "dumb")
        }
    }
}

/// Whether stderr gets colors now.
pub fn stderr_color() -> bool {
    use_color(
        color_when(),
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
        std::env::var_os("TERM").as_deref(),
    )
}

/// ANSI styles kiln uses.
#[derive(Debug, Clone, Copy)]
pub enum Style {
    Error,
    Warning,
    Good,
    Dim,
}

/// `text` in `style` when stderr takes colors, else as it is.
pub fn paint(style: Style, text: &str) -> String {
    if !stderr_color() {
        return text.to_string();
    }
    let code = match style {
        Style::Error => "1;31",
        Style::Warning => "1;33",
        Style::Good => "32",
        Style::Dim => "2",
    };
    format!("\x1b[{code}m{text}\x1b[0m")
}

/// An informational line on stderr (what kiln is doing), left out by `-q`.
pub fn info(msg: impl std::fmt::Display) {
    if !quiet() {
        eprintln!("{msg}");
    }
}

/// A warning on stderr: kept under `-q`.
pub fn warn(msg: impl std::fmt::Display) {
    eprintln!("{} {msg}", paint(Style::Warning, "warning:"));
}

/// With `-v`: the command line of a host tool kiln is about to run,
/// shell-quoted so it can be pasted.
pub fn command_detail(program: &std::path::Path, args: &[impl AsRef<OsStr>]) {
    if verbosity() < Verbosity::Verbose {
        return;
    }
    let mut line = quote(program.as_os_str());
    for a in args {
        line.push(' ');
        line.push_str(&quote(a.as_ref()));
    }
    eprintln!("{}", paint(Style::Dim, &format!("+ {line}")));
}

/// A word as a POSIX shell reads it back.
fn quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
    if plain {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_colors_a_terminal_unless_no_color_or_a_dumb_terminal() {
        let t = |s: &'static str| Some(OsStr::new(s));
        assert!(use_color(ColorWhen::Auto, true, None, t("xterm")));
        assert!(!use_color(ColorWhen::Auto, false, None, t("xterm")));
        assert!(!use_color(ColorWhen::Auto, true, t("1"), t("xterm")));
        // An empty NO_COLOR is no request (no-color.org).
        assert!(use_color(ColorWhen::Auto, true, t(""), t("xterm")));
        assert!(!use_color(ColorWhen::Auto, true, None, t("dumb")));
        // The flag wins over the environment.
        assert!(use_color(ColorWhen::Always, false, t("1"), t("dumb")));
        assert!(!use_color(ColorWhen::Never, true, None, t("xterm")));
    }

    #[test]
    fn command_lines_are_quoted_for_the_shell() {
        assert_eq!(quote(OsStr::new("-Y")), "-Y");
        assert_eq!(quote(OsStr::new("a b")), "'a b'");
        assert_eq!(quote(OsStr::new("it's")), r"'it'\''s'");
        assert_eq!(quote(OsStr::new("")), "''");
    }
}
