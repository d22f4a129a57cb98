//! `kiln validate`: boot images in QEMU, run their checks, print a report
//! (text, `--json`, JUnit) and fail when any image failed.

use anyhow::{bail, Result};
use std::time::Duration;

use super::args::ValidateArgs;
use crate::validate::{validate_many, ValidateOptions};

pub fn validate(args: ValidateArgs) -> Result<()> {
    // SIGINT/SIGTERM become a flag every wait loop checks, so QEMU and temp
    // files are cleaned up by the normal error path.
    if args.ssh_port.is_some() && args.image.len() > 1 {
        bail!("--ssh-port works with one image only (parallel boots need their own ports)");
    }
    let jobs = args.jobs.max(1).min(args.image.len());
    let opts = ValidateOptions {
        accel: args.accel,
        boot_timeout: Duration::from_secs(args.boot_timeout),
        cloud_init_timeout: Duration::from_secs(args.cloud_init_timeout),
        ssh_port: args.ssh_port,
        ssh_user: args.ssh_user.clone(),
        ovmf_code: args.ovmf_code.clone(),
        ovmf_vars: args.ovmf_vars.clone(),
        secure_boot_keys: args.secure_boot_keys.clone(),
        memory_mib: args.memory,
        cpus: args.cpus,
        console_dir: args.console_dir.clone(),
        record: !args.no_record,
        progress: crate::util::progress::enabled(args.json) && jobs == 1,
        ..ValidateOptions::default()
    };
    let say = !args.json && !crate::util::term::quiet();
    let results = validate_many(&args.image, &opts, jobs, say);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&crate::validate::report::json(&results))?
        );
    } else {
        print!("{}", crate::validate::report::human(&results));
    }
    if let Some(path) = &args.junit {
        crate::util::write_atomic(path, crate::validate::report::junit(&results).as_bytes())?;
    }
    crate::util::check_interrupted()?;
    let failed = results.iter().filter(|r| !r.validated).count();
    if failed > 0 {
        if results.len() == 1 {
            bail!("{}", results[0].error.clone().unwrap_or_default());
        }
        bail!("{failed} of {} images failed validation", results.len());
    }
    Ok(())
}
