//! Progress reporting for long stages: indicatif bars on a terminal, quiet
//! (or JSON-friendly) elsewhere. Every long loop reports through here.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::Duration;

/// Whether bars are drawn: only on a terminal, and not with `--json`, `-q`
/// or KILN_NO_PROGRESS.
pub(crate) fn enabled(json: bool) -> bool {
    !json
        && !crate::util::term::quiet()
        && std::io::stderr().is_terminal()
        && std::env::var_os("KILN_NO_PROGRESS").is_none()
}

fn target(show: bool) -> ProgressDrawTarget {
    if show {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    }
}

/// A byte counter (downloads, uploads, copies).
pub(crate) fn bytes(show: bool, total: Option<u64>, msg: impl Into<String>) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(total, target(show));
    let style = if total.is_some() {
        "{spinner} {msg:30} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
    } else {
        "{spinner} {msg:30} {bytes} {bytes_per_sec}"
    };
    pb.set_style(
        ProgressStyle::with_template(style)
            .unwrap()
            .progress_chars("=> "),
    );
    pb.set_message(msg.into());
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

/// A counter of items (packages, files, checks).
pub(crate) fn items(show: bool, total: Option<u64>, msg: impl Into<String>) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(total, target(show));
    let style = if total.is_some() {
        "{spinner} {msg:30} [{bar:30}] {pos}/{len} {elapsed}"
    } else {
        "{spinner} {msg:30} {pos} {wide_msg} {elapsed}"
    };
    pb.set_style(
        ProgressStyle::with_template(style)
            .unwrap()
            .progress_chars("=> "),
    );
    pb.set_message(msg.into());
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

/// A spinner for work with no countable unit (a child process).
pub(crate) fn spinner(show: bool, msg: impl Into<String>) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(None, target(show));
    pb.set_style(ProgressStyle::with_template("{spinner} {msg} {elapsed}").unwrap());
    pb.set_message(msg.into());
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}
