//! `kiln sign` and `kiln verify`: an OpenSSH signature over an image
//! directory's SHA256SUMS, and its check (signature, signer, every file).

use anyhow::Result;

use super::args::{SignArgs, VerifyArgs};
use crate::image::manifest::ImageManifest;
use crate::image::signature;

pub fn sign(a: SignArgs) -> Result<()> {
    let signed = signature::sign(&a.image, &a.key)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&signed)?);
    } else {
        println!(
            "signed {} ({}) with {}: {}",
            a.image.display(),
            signed.files.join(", "),
            signed.key,
            signed.signature.display()
        );
    }
    Ok(())
}

pub fn verify(a: VerifyArgs) -> Result<()> {
    let m = ImageManifest::load(&a.image)?;
    let v = verify_image(
        &a.image,
        &m,
        &a.allowed_signers,
        a.identity.as_deref(),
        a.json,
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{}: good signature by {} ({}); {} match: image {}",
            a.image.display(),
            v.identity,
            v.key,
            v.files.join(", "),
            v.image_id
        );
    }
    Ok(())
}

/// [`signature::verify`] with a spinner while the files are hashed.
pub(crate) fn verify_image(
    dir: &std::path::Path,
    m: &ImageManifest,
    allowed_signers: &std::path::Path,
    identity: Option<&str>,
    json: bool,
) -> Result<signature::Verified> {
    let pb = crate::util::progress::spinner(
        crate::util::progress::enabled(json),
        "verifying the signature and the sha256 of every file",
    );
    let res = signature::verify(dir, m, allowed_signers, identity);
    pb.finish_and_clear();
    res
}
