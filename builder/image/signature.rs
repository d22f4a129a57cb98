//! Signatures over an image directory's `SHA256SUMS`, made and checked with
//! stock OpenSSH (`ssh-keygen -Y sign|verify`), so anyone can check an image
//! without kiln:
//!
//! ```sh
//! ssh-keygen -Y verify -f allowed_signers -I ci@example.org -n kiln-image \
//!     -s SHA256SUMS.sig < SHA256SUMS && sha256sum -c SHA256SUMS
//! ```
//!
//! The signature covers the sums, the sums cover the outputs (disk, LXC
//! archive, whatever else the build lists), and the disk's sha256 is the
//! image id. `manifest.json` is not covered (validation results are added to
//! it later); verification therefore also requires every output the manifest
//! names to be listed in the signed sums with the same digest, so a manifest
//! cannot claim an id the signer never saw.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::image::manifest::{ImageManifest, SUMS_FILE};
use crate::util::hosttools;

/// The signature's file name, beside `SHA256SUMS`.
pub const SIG_FILE: &str = "SHA256SUMS.sig";

/// The SSHSIG namespace: a signature made for another purpose (`git`,
/// `file`, ...) with the same key does not verify as an image signature.
/// `allowed_signers` lines may restrict a key to it with
/// `namespaces="kiln-image"`.
pub const NAMESPACE: &str = "kiln-image";

/// What `kiln sign` made.
#[derive(Debug, Clone, Serialize)]
pub struct Signed {
    pub signature: PathBuf,
    /// The signing key as ssh-keygen names it (`ED25519 key SHA256:...`).
    pub key: String,
    pub files: Vec<String>,
}

/// What `kiln verify` proved.
#[derive(Debug, Clone, Serialize)]
pub struct Verified {
    pub image: PathBuf,
    pub image_id: String,
    /// The principal of the allowed signers file whose key made the signature.
    pub identity: String,
    pub key: String,
    /// Every file `SHA256SUMS` lists, each re-hashed and matching.
    pub files: Vec<String>,
}

/// Sign `dir`'s `SHA256SUMS` with the OpenSSH private key `key` (or a public
/// key whose private half ssh-agent holds) into `SHA256SUMS.sig`. A
/// directory whose files do not match its sums is refused: kiln never signs
/// what it would not verify.
pub fn sign(dir: &Path, key: &Path) -> Result<Signed> {
    let m = ImageManifest::load(dir)?;
    let sums = read_sums(dir)?;
    let files = check_contents(dir, &m, &sums)?;
    if !key.is_file() {
        bail!("signing key {} does not exist", key.display());
    }
    // ssh-keygen.c `sig_sign`: with no file operands it signs standard input
    // and writes the armored signature to standard output (openssh-portable).
    let out = ssh_keygen(
        &[
            "-Y".into(),
            "sign".into(),
            "-f".into(),
            key.into(),
            "-n".into(),
            NAMESPACE.into(),
        ],
        sums.as_bytes(),
    )?;
    if !out.status.success() || out.stdout.is_empty() {
        bail!(
            "ssh-keygen cannot sign with {}: {}",
            key.display(),
            said(&out)
        );
    }
    // Checked before it is put in place: a signature kiln writes verifies.
    let mut tmp = tempfile::Builder::new()
        .prefix(".kiln-tmp-")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temp file in {}", dir.display()))?;
    tmp.write_all(&out.stdout)?;
    tmp.as_file().sync_all()?;
    let signer = signer_key(tmp.path(), &sums)?
        .context("ssh-keygen made a signature it cannot read back")?;
    let path = dir.join(SIG_FILE);
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))?;
    }
    tmp.persist(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(Signed {
        signature: path,
        key: signer,
        files,
    })
}

/// Check `dir`'s signature against the allowed signers file (the format of
/// ssh-keygen(1) ALLOWED SIGNERS) and every file its sums list against the
/// directory and the manifest `m`. `identity` restricts the signer to one
/// principal; without it any principal whose key made the signature will do.
pub fn verify(
    dir: &Path,
    m: &ImageManifest,
    allowed_signers: &Path,
    identity: Option<&str>,
) -> Result<Verified> {
    let sig = dir.join(SIG_FILE);
    let sums_path = dir.join(SUMS_FILE);
    if !sums_path.is_file() {
        bail!("{} has no {SUMS_FILE}: nothing is signed", dir.display());
    }
    if !sig.is_file() {
        bail!(
            "{} is not signed: it has no {SIG_FILE} (`kiln sign {} --key KEY` makes one)",
            dir.display(),
            dir.display()
        );
    }
    std::fs::File::open(allowed_signers).with_context(|| {
        format!(
            "cannot read the allowed signers file {}",
            allowed_signers.display()
        )
    })?;
    let sums = read_sums(dir)?;
    let candidates: Vec<String> = match identity {
        Some(i) => vec![i.to_string()],
        None => principals(&sig, allowed_signers)?,
    };
    if candidates.is_empty() {
        let who = signer_key(&sig, &sums)?
            .map(|k| format!("{k}, which"))
            .unwrap_or_else(|| "a key that".into());
        bail!(
            "{}: signed by {who} no principal in {} has",
            sig.display(),
            allowed_signers.display()
        );
    }
    let mut last = String::new();
    let mut verified = None;
    for principal in &candidates {
        // ssh-keygen.c `sig_verify` (openssh-portable): exit 0 and
        // `Good "<ns>" signature for <principal> with <key>` on stdout.
        let out = ssh_keygen(
            &[
                "-Y".into(),
                "verify".into(),
                "-f".into(),
                allowed_signers.into(),
                "-I".into(),
                principal.into(),
                "-n".into(),
                NAMESPACE.into(),
                "-s".into(),
                sig.clone().into(),
            ],
            sums.as_bytes(),
        )?;
        if out.status.success() {
            verified = Some((principal.clone(), good_key(&out.stdout)));
            break;
        }
        last = said(&out);
    }
    let Some((identity, key)) = verified else {
        bail!(
            "{} does not verify {SUMS_FILE} as signed by {} (in {}): {last}; {SUMS_FILE} changed since it was signed, or the signature was made for another namespace or signer",
            sig.display(),
            candidates.join(" or "),
            allowed_signers.display()
        );
    };
    let files = check_contents(dir, m, &sums)?;
    Ok(Verified {
        image: dir.to_path_buf(),
        image_id: m.id.clone(),
        identity,
        key,
        files,
    })
}

fn read_sums(dir: &Path) -> Result<String> {
    let p = dir.join(SUMS_FILE);
    if !p.is_file() {
        bail!("{} has no {SUMS_FILE}", dir.display());
    }
    std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))
}

/// One `SHA256SUMS` line: `<sha256>  <file>` (or `<sha256> *<file>`, the
/// binary mode `sha256sum -c` also reads).
fn parse_sums(dir: &Path, text: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        let parsed = line
            .split_once("  ")
            .or_else(|| line.split_once(" *"))
            .filter(|(h, f)| crate::image::recipe::is_sha256(h) && is_plain_name(f));
        let Some((hash, file)) = parsed else {
            bail!(
                "{}:{}: not `<sha256>  <file>` with a file inside the image directory",
                dir.join(SUMS_FILE).display(),
                n + 1
            );
        };
        out.push((hash.to_string(), file.to_string()));
    }
    if out.is_empty() {
        bail!("{} lists no files", dir.join(SUMS_FILE).display());
    }
    Ok(out)
}

fn is_plain_name(f: &str) -> bool {
    !f.is_empty() && !f.contains('/') && !f.starts_with('.')
}

/// Every file the sums list has its digest, and every output of the
/// manifest is listed with the digest the manifest gives (the disk's being
/// the image id). Returns the files checked.
fn check_contents(dir: &Path, m: &ImageManifest, sums: &str) -> Result<Vec<String>> {
    let listed = parse_sums(dir, sums)?;
    if m.id != m.disk.sha256 {
        bail!(
            "{}: the manifest's id {} is not its disk's sha256 {}",
            dir.join(crate::image::manifest::MANIFEST_FILE).display(),
            m.id,
            m.disk.sha256
        );
    }
    for (kind, f) in m.outputs() {
        match listed.iter().find(|(_, name)| *name == f.file) {
            Some((hash, _)) if *hash == f.sha256 => {}
            Some((hash, _)) => bail!(
                "{}: the manifest's {} {} has sha256 {}, {SUMS_FILE} says {hash}",
                dir.display(),
                kind.label(),
                f.file,
                f.sha256
            ),
            None => bail!(
                "{}: the manifest's {} {} is not listed in {SUMS_FILE}",
                dir.display(),
                kind.label(),
                f.file
            ),
        }
    }
    for (hash, file) in &listed {
        let path = dir.join(file);
        let actual = crate::util::sha256_file(&path)?;
        if actual != *hash {
            bail!(
                "{} does not match {SUMS_FILE}: sha256 is {actual}, {SUMS_FILE} says {hash}",
                path.display()
            );
        }
    }
    Ok(listed.into_iter().map(|(_, f)| f).collect())
}

/// The principals of `allowed_signers` whose key made `sig` (ssh-keygen.c
/// `sig_find_principals`: one line per matching entry, each a
/// comma-separated list; exit 255 and "No principal matched." when none).
fn principals(sig: &Path, allowed_signers: &Path) -> Result<Vec<String>> {
    let out = ssh_keygen(
        &[
            "-Y".into(),
            "find-principals".into(),
            "-s".into(),
            sig.into(),
            "-f".into(),
            allowed_signers.into(),
        ],
        b"",
    )?;
    if !out.status.success() {
        let msg = said(&out);
        if msg.contains("No principal matched") {
            return Ok(Vec::new());
        }
        bail!(
            "ssh-keygen cannot match {} against {}: {msg}",
            sig.display(),
            allowed_signers.display()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .flat_map(|l| l.split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect())
}

/// The key that made `sig` over `data` (`ED25519 key SHA256:...`), from
/// `ssh-keygen -Y check-novalidate`, which checks the signature but trusts
/// any key; `None` when it does not check (wrong namespace, other data).
fn signer_key(sig: &Path, data: &str) -> Result<Option<String>> {
    let out = ssh_keygen(
        &[
            "-Y".into(),
            "check-novalidate".into(),
            "-n".into(),
            NAMESPACE.into(),
            "-s".into(),
            sig.into(),
        ],
        data.as_bytes(),
    )?;
    Ok(out.status.success().then(|| good_key(&out.stdout)))
}

/// `ED25519 key SHA256:...` from ssh-keygen's `Good "..." signature ... with <key>`.
fn good_key(stdout: &[u8]) -> String {
    let text = String::from_utf8_lossy(stdout);
    let line = text.lines().find(|l| l.starts_with("Good")).unwrap_or("");
    line.rsplit_once(" with ")
        .map(|(_, k)| k.trim().to_string())
        .unwrap_or_default()
}

/// What ssh-keygen said on failure, as one line: its standard error (less
/// its note that it reads standard input), else its standard output (where
/// `-Y verify` puts a bare "Could not verify signature.").
fn said(out: &Output) -> String {
    let lines = |bytes: &[u8]| -> Vec<String> {
        String::from_utf8_lossy(bytes)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.contains("data on standard input"))
            .map(String::from)
            .collect()
    };
    let mut said = lines(&out.stderr);
    if said.is_empty() {
        said = lines(&out.stdout);
    }
    if said.is_empty() {
        format!("ssh-keygen exited with {}", out.status)
    } else {
        said.join("; ")
    }
}

/// Run ssh-keygen with `input` on its standard input.
fn ssh_keygen(args: &[OsString], input: &[u8]) -> Result<Output> {
    let program = hosttools::path_of(hosttools::SSH_KEYGEN)?;
    crate::util::term::command_detail(&program, args);
    let mut child = Command::new(&program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", program.display()))?;
    let mut stdin = child.stdin.take().expect("piped");
    // SHA256SUMS is a few lines, far below a pipe's buffer: no deadlock
    // with ssh-keygen's own output.
    let wrote = stdin.write_all(input);
    drop(stdin);
    let out = child
        .wait_with_output()
        .with_context(|| format!("cannot run {}", program.display()))?;
    // ssh-keygen that exits before reading (a bad key) closes the pipe: its
    // message says more than EPIPE does.
    if let Err(e) = wrote {
        if out.status.success() {
            return Err(e).context("cannot write to ssh-keygen");
        }
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An ed25519 key pair made by ssh-keygen in `dir`: (private key path,
    /// allowed_signers line for `principal`).
    pub(crate) fn keypair(dir: &Path, name: &str, principal: &str) -> (PathBuf, String) {
        let key = dir.join(name);
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
            .arg(&key)
            .status()
            .expect("ssh-keygen runs (apt install openssh-client)");
        assert!(st.success());
        let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
        (key, format!("{principal} {}", public.trim()))
    }

    #[test]
    fn sums_lines_are_sha256_and_a_plain_file_name() {
        let d = Path::new("img");
        let h = "a".repeat(64);
        let ok = parse_sums(d, &format!("{h}  disk.qcow2\n{h} *rootfs.tar.zst\n")).unwrap();
        assert_eq!(ok[1].1, "rootfs.tar.zst");
        for bad in [
            format!("{h}  ../etc/passwd\n"),
            format!("{h} disk\n"),
            "xyz  disk\n".to_string(),
        ] {
            let e = format!("{:#}", parse_sums(d, &bad).unwrap_err());
            assert!(e.contains("img/SHA256SUMS:1: not"), "{e}");
        }
    }

    #[test]
    fn the_key_is_read_from_ssh_keygens_good_line() {
        let out = b"Good \"kiln-image\" signature for ci@kiln with ED25519 key SHA256:abc\n";
        assert_eq!(good_key(out), "ED25519 key SHA256:abc");
    }
}
