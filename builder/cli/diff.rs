//! `kiln diff A B`: compare two image directories (their manifests only,
//! nothing is rebuilt) and print the changes as text or `--json`.

use anyhow::Result;

use super::args::DiffArgs;

pub fn diff(a: DiffArgs) -> Result<()> {
    let d = crate::image::diff::diff_dirs(&a.a, &a.b)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&d)?);
    } else {
        print!("{}", crate::image::diff::render_text(&d));
    }
    Ok(())
}
