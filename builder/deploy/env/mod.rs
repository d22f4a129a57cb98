//! Environments: a whole cluster as data (`model`), compared with what a
//! provider shows (`plan`), carried out step by step (`apply`) under a lock with a journal.

pub mod model;

use std::ffi::OsString;
use std::path::PathBuf;

/// The state directory of environment `env`: `$KILN_STATE/envs/<env>`, or
/// `~/.local/state/kiln/envs/<env>` (the XDG state location). It holds what
/// kiln keeps about the environment between runs; the local provider keeps
/// its VMs and network under `local/` in it.
pub fn state_dir(env: &str) -> PathBuf {
    state_dir_from(
        std::env::var_os("KILN_STATE"),
        std::env::var_os("HOME"),
        env,
    )
}

fn state_dir_from(kiln_state: Option<OsString>, home: Option<OsString>, env: &str) -> PathBuf {
    let base = match kiln_state.filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => match home.filter(|v| !v.is_empty()) {
            Some(home) => PathBuf::from(home).join(".local/state/kiln"),
            None => PathBuf::from("/var/lib/kiln"),
        },
    };
    base.join("envs").join(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_directory_is_per_environment_under_kiln_state_or_home() {
        let p = |s: &str| Some(OsString::from(s));
        assert_eq!(
            state_dir_from(p("/srv/kiln"), p("/root"), "qa"),
            PathBuf::from("/srv/kiln/envs/qa")
        );
        assert_eq!(
            state_dir_from(None, p("/root"), "qa"),
            PathBuf::from("/root/.local/state/kiln/envs/qa")
        );
        assert_eq!(
            state_dir_from(p(""), p("/home/u"), "qa"),
            PathBuf::from("/home/u/.local/state/kiln/envs/qa")
        );
    }
}
