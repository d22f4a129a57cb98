//! Ctrl-C and SIGTERM for every command: one process-wide flag that long work
//! polls at safe points, and one typed error, `Interrupted`, that exit codes recognise.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// The error long work returns when it stopped because of Ctrl-C or SIGTERM.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();

fn flag_cell() -> &'static Arc<AtomicBool> {
    FLAG.get_or_init(Default::default)
}

/// Catch SIGINT/SIGTERM so long work can stop at a safe point and clean up
/// (temp files, staging directories, child processes) instead of dying
/// mid-write. A second signal ends the process at once with status 130.
pub fn install_handler() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let flag = flag_cell().clone();
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            // Registered first, so it sees the flag as it was before this signal.
            let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone());
            let _ = signal_hook::flag::register(sig, flag.clone());
        }
    });
}

/// The flag itself, for readers and threads that poll it.
pub fn flag() -> Arc<AtomicBool> {
    flag_cell().clone()
}

/// True once Ctrl-C (or SIGTERM) arrived.
pub fn interrupted() -> bool {
    FLAG.get().is_some_and(|f| f.load(Ordering::Relaxed))
}

/// Fail with [`Interrupted`] once Ctrl-C arrived.
pub fn check() -> anyhow::Result<()> {
    if interrupted() {
        return Err(Interrupted.into());
    }
    Ok(())
}

/// An `io::Error` carrying [`Interrupted`], for `Read`/`Write` implementations.
pub fn io_error() -> std::io::Error {
    std::io::Error::other(Interrupted)
}

/// Whether an error (anywhere in its chain, also inside an `io::Error`) is an interrupt.
pub fn is_interrupt(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.is::<Interrupted>()
            || c.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .is_some_and(|inner| inner.is::<Interrupted>())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn an_interrupt_is_recognised_through_context_and_io_errors() {
        let e = anyhow::Error::from(Interrupted).context("upload failed");
        assert!(is_interrupt(&e));
        let io: anyhow::Result<()> = Err(io_error()).context("reading the disk");
        assert!(is_interrupt(&io.unwrap_err()));
        assert!(!is_interrupt(&anyhow::anyhow!("interrupted by the peer")));
    }
}
