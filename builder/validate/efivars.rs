//! Which Microsoft Secure Boot keys an OVMF variable store carries, and the
//! store a validation boot uses for a chosen key set.
//!
//! Microsoft's 2011 UEFI CA expired in 2026. Proxmox VE 9 creates EFI disks
//! from a template that holds the 2023 certificates beside the 2011 ones
//! (pve-edk2-firmware >= 4.2025.05-1, `debian/rules` `enroll_vendor`:
//! `virt-fw-vars --enroll-cert`, which adds both generations to KEK and db)
//! and marks them `ms-cert=2023k`; disks made before carry the 2011 set only.
//! `kiln validate --secure-boot-keys` boots the image under either.

use crate::util::hosttools;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// `--secure-boot-keys`: the Microsoft key set the firmware boots with.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SecureBootKeys {
    /// The newest set this host can provide (2023k when it can, else 2011).
    #[default]
    Auto,
    /// Microsoft's 2011 keys only: an EFI disk made before the 2023 certificates.
    #[value(name = "2011")]
    Ms2011,
    /// The 2023 keys beside the 2011 ones, as Proxmox VE 9 enrolls them
    /// (`ms-cert=2023k`).
    #[value(name = "2023k", alias = "2023")]
    Ms2023k,
}

/// A key set a variable store was found to carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum KeySet {
    Ms2011,
    Ms2023k,
}

/// A Secure Boot variable that holds certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyVar {
    Pk,
    Kek,
    Db,
}

impl KeyVar {
    /// The file under `/sys/firmware/efi/efivars/` that holds it in a guest.
    pub fn efivarfs_name(self) -> &'static str {
        match self {
            KeyVar::Pk => "PK-8be4df61-93ca-11d2-aa0d-00e098032b8c",
            KeyVar::Kek => "KEK-8be4df61-93ca-11d2-aa0d-00e098032b8c",
            KeyVar::Db => "db-d719b2cb-3d3a-4596-a3bc-dad00e67656f",
        }
    }
    fn name(self) -> &'static str {
        match self {
            KeyVar::Pk => "PK",
            KeyVar::Kek => "KEK",
            KeyVar::Db => "db",
        }
    }
}

/// Subjects (CN) of Microsoft's certificates, as enrolled by virt-firmware
/// (`virt/firmware/efi/certs.py`) and named in qemu-server's `ms-cert`
/// description (`src/PVE/QemuServer/Drive.pm`).
pub const MS_KEK_2011: &str = "Microsoft Corporation KEK CA 2011";
pub const MS_KEK_2023: &str = "Microsoft Corporation KEK 2K CA 2023";
pub const MS_WINDOWS_2011: &str = "Microsoft Windows Production PCA 2011";
pub const MS_WINDOWS_2023: &str = "Windows UEFI CA 2023";
pub const MS_UEFI_CA_2011: &str = "Microsoft Corporation UEFI CA 2011";
pub const MS_UEFI_CA_2023: &str = "Microsoft UEFI CA 2023";

const SET_2011: &[(KeyVar, &str)] = &[
    (KeyVar::Kek, MS_KEK_2011),
    (KeyVar::Db, MS_WINDOWS_2011),
    (KeyVar::Db, MS_UEFI_CA_2011),
];
const SET_2023: &[(KeyVar, &str)] = &[
    (KeyVar::Kek, MS_KEK_2023),
    (KeyVar::Db, MS_WINDOWS_2023),
    (KeyVar::Db, MS_UEFI_CA_2023),
];

impl KeySet {
    /// The name Proxmox VE's `ms-cert` marker uses for it.
    pub fn label(self) -> &'static str {
        match self {
            KeySet::Ms2011 => "2011",
            KeySet::Ms2023k => "2023k",
        }
    }

    /// Certificates the set has. 2023k is what qemu-server's `ms-cert`
    /// description says the marker means: the three 2023 certificates are
    /// included. Proxmox enrolls them beside the 2011 ones, but a store
    /// without the 2011 ones (where Microsoft is heading) carries it too.
    pub fn required(self) -> &'static [(KeyVar, &'static str)] {
        match self {
            KeySet::Ms2011 => SET_2011,
            KeySet::Ms2023k => SET_2023,
        }
    }

    /// Certificates the set must not have: the 2011 set is a store from
    /// before the 2023 certificates.
    pub fn excluded(self) -> &'static [(KeyVar, &'static str)] {
        match self {
            KeySet::Ms2011 => SET_2023,
            KeySet::Ms2023k => &[],
        }
    }
}

impl SecureBootKeys {
    fn wanted(self) -> Option<KeySet> {
        match self {
            SecureBootKeys::Auto => None,
            SecureBootKeys::Ms2011 => Some(KeySet::Ms2011),
            SecureBootKeys::Ms2023k => Some(KeySet::Ms2023k),
        }
    }
}

/// The certificate subjects (CN) in a store's PK, KEK and db.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreKeys {
    pub pk: Vec<String>,
    pub kek: Vec<String>,
    pub db: Vec<String>,
}

impl StoreKeys {
    fn var(&self, v: KeyVar) -> &[String] {
        match v {
            KeyVar::Pk => &self.pk,
            KeyVar::Kek => &self.kek,
            KeyVar::Db => &self.db,
        }
    }

    fn has(&self, v: KeyVar, cn: &str) -> bool {
        self.var(v).iter().any(|s| s == cn)
    }

    /// Whether the store holds exactly what `set` needs.
    pub fn carries(&self, set: KeySet) -> bool {
        set.required().iter().all(|(v, cn)| self.has(*v, cn))
            && !set.excluded().iter().any(|(v, cn)| self.has(*v, cn))
    }

    /// The set it carries, newest first.
    pub fn key_set(&self) -> Option<KeySet> {
        [KeySet::Ms2023k, KeySet::Ms2011]
            .into_iter()
            .find(|s| self.carries(*s))
    }

    /// `KEK: a, b; db: c, d` for messages.
    pub fn describe(&self) -> String {
        [KeyVar::Pk, KeyVar::Kek, KeyVar::Db]
            .iter()
            .map(|v| {
                let l = self.var(*v);
                format!(
                    "{}: {}",
                    v.name(),
                    if l.is_empty() {
                        "-".into()
                    } else {
                        l.join(", ")
                    }
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

/// GUIDs in their on-disk (mixed-endian) byte order.
const AUTH_VARIABLE_STORE: [u8; 16] = guid(
    0xaaf32c78,
    0x947b,
    0x439a,
    [0xa1, 0x80, 0x2e, 0x14, 0x4e, 0xc3, 0x77, 0x92],
);
const EFI_GLOBAL_VARIABLE: [u8; 16] = guid(
    0x8be4df61,
    0x93ca,
    0x11d2,
    [0xaa, 0x0d, 0x00, 0xe0, 0x98, 0x03, 0x2b, 0x8c],
);
const IMAGE_SECURITY_DATABASE: [u8; 16] = guid(
    0xd719b2cb,
    0x3d3a,
    0x4596,
    [0xa3, 0xbc, 0xda, 0xd0, 0x0e, 0x67, 0x65, 0x6f],
);
const CERT_X509: [u8; 16] = guid(
    0xa5c059a1,
    0x94e4,
    0x4aa7,
    [0x87, 0xb5, 0xab, 0x15, 0x5c, 0x2b, 0xf0, 0x72],
);

const fn guid(a: u32, b: u16, c: u16, d: [u8; 8]) -> [u8; 16] {
    let (a, b, c) = (a.to_le_bytes(), b.to_le_bytes(), c.to_le_bytes());
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

/// Read the Secure Boot certificates of an edk2 variable store (an
/// `OVMF_VARS*.fd` file): firmware volume header, authenticated variable
/// store, variables `PK`, `KEK`, `db` holding EFI_SIGNATURE_LISTs of X.509
/// certificates. Layout: edk2 `MdePkg/Include/Pi/PiFirmwareVolume.h`,
/// `MdeModulePkg/Include/Guid/VariableFormat.h`, `MdePkg/Include/Guid/ImageAuthentication.h`.
pub fn read_store(path: &Path) -> Result<StoreKeys> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_store(&bytes).with_context(|| {
        format!(
            "{} is not an OVMF variable store with Secure Boot keys",
            path.display()
        )
    })
}

pub(crate) fn parse_store(b: &[u8]) -> Result<StoreKeys> {
    if b.get(40..44) != Some(b"_FVH") {
        bail!("no firmware volume header");
    }
    let fv_len = u64_at(b, 32).unwrap_or(0) as usize;
    let end = fv_len.min(b.len());
    let hdr = u16_at(b, 48).context("truncated header")? as usize;
    if b.get(hdr..hdr + 16) != Some(&AUTH_VARIABLE_STORE[..]) {
        bail!("no authenticated variable store");
    }
    let store_size = u32_at(b, hdr + 16).context("truncated store header")? as usize;
    let end = end.min(hdr + store_size);
    let mut keys = StoreKeys::default();
    // AUTHENTICATED_VARIABLE_HEADER: StartId u16, State u8, Reserved u8,
    // Attributes u32, MonotonicCount u64, TimeStamp 16, PubKeyIndex u32,
    // NameSize u32, DataSize u32, VendorGuid 16 (60 bytes).
    const VAR_HEADER: usize = 60;
    const VAR_ADDED: u8 = 0x3f;
    const VAR_ADDED_IN_DELETED_TRANSITION: u8 = 0x3e;
    let mut off = hdr + 28;
    while off + VAR_HEADER <= end && u16_at(b, off) == Some(0x55aa) {
        let state = b[off + 2];
        let name_size = u32_at(b, off + 36).unwrap_or(0) as usize;
        let data_size = u32_at(b, off + 40).unwrap_or(0) as usize;
        let vendor = &b[off + 44..off + 60];
        let name_at = off + VAR_HEADER;
        let data_at = name_at + name_size;
        let next = data_at + data_size;
        if next > end {
            bail!("variable at offset {off:#x} runs past the store");
        }
        if state == VAR_ADDED || state == VAR_ADDED_IN_DELETED_TRANSITION {
            let name: Vec<u16> = b[name_at..data_at]
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .take_while(|c| *c != 0)
                .collect();
            let name = String::from_utf16_lossy(&name);
            let target = match (name.as_str(), vendor) {
                ("PK", v) if v == EFI_GLOBAL_VARIABLE => Some(&mut keys.pk),
                ("KEK", v) if v == EFI_GLOBAL_VARIABLE => Some(&mut keys.kek),
                ("db", v) if v == IMAGE_SECURITY_DATABASE => Some(&mut keys.db),
                _ => None,
            };
            if let Some(list) = target {
                list.extend(x509_subjects(&b[data_at..next])?);
            }
        }
        off = (next + 3) & !3;
    }
    Ok(keys)
}

/// Subject CNs of the X.509 entries in a run of EFI_SIGNATURE_LISTs.
fn x509_subjects(mut d: &[u8]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    while d.len() >= 28 {
        let list_size = u32_at(d, 16).unwrap_or(0) as usize;
        let header_size = u32_at(d, 20).unwrap_or(0) as usize;
        let sig_size = u32_at(d, 24).unwrap_or(0) as usize;
        if list_size < 28 + header_size || list_size > d.len() || sig_size <= 16 {
            bail!("malformed signature list");
        }
        if d[..16] == CERT_X509 {
            for sig in d[28 + header_size..list_size].chunks_exact(sig_size) {
                // EFI_SIGNATURE_DATA: owner GUID, then the DER certificate.
                out.push(subject_cn(&sig[16..]).unwrap_or_else(|| "(no subject CN)".into()));
            }
        }
        d = &d[list_size..];
    }
    Ok(out)
}

/// One DER TLV: (tag, contents, rest).
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *b.first()?;
    let first = *b.get(1)? as usize;
    let (len, start) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let len = b
            .get(2..2 + n)?
            .iter()
            .fold(0usize, |a, x| (a << 8) | *x as usize);
        (len, 2 + n)
    };
    let content = b.get(start..start + len)?;
    Some((tag, content, &b[start + len..]))
}

/// The subject's commonName of a DER certificate.
fn subject_cn(der: &[u8]) -> Option<String> {
    let (_, cert, _) = tlv(der)?;
    let (_, tbs, _) = tlv(cert)?;
    let mut rest = tbs;
    // [0] version is optional; then serial, signature algorithm, issuer, validity, subject.
    if rest.first() == Some(&0xa0) {
        rest = tlv(rest)?.2;
    }
    for _ in 0..4 {
        rest = tlv(rest)?.2;
    }
    let (_, mut name, _) = tlv(rest)?;
    while let Some((_, set, more)) = tlv(name) {
        let (_, atv, _) = tlv(set)?;
        let (_, oid, value) = tlv(atv)?;
        if oid == [0x55, 0x04, 0x03] {
            let (_, v, _) = tlv(value)?;
            return Some(String::from_utf8_lossy(v).into_owned());
        }
        name = more;
    }
    None
}

/// virt-firmware, which Proxmox VE uses to enroll the 2023 certificates.
pub const VIRT_FW_VARS: hosttools::Tool = hosttools::Tool {
    program: "virt-fw-vars",
    package: "python3-virt-firmware, from bookworm-backports on Debian 12",
};

/// Where Debian's python3-virt-firmware keeps Microsoft's certificates (the
/// path qemu-server uses in `src/PVE/QemuServer/OVMF.pm`).
pub const VIRT_FIRMWARE_CERTS: &str = "/usr/lib/python3/dist-packages/virt/firmware/certs";

/// Owner GUID of Microsoft's entries (`virt/firmware/efi/guids.py`,
/// `MicrosoftVendor`; the value qemu-server passes).
const MICROSOFT_OWNER: &str = "77fa9abd-0359-4d32-bd60-28f4e78f784b";

/// Enroll the 2023 set into a copy of `from` at `to`, with the command
/// Proxmox VE runs on an EFI disk that lacks it (qemu-server
/// `src/PVE/QemuServer/OVMF.pm`, `ensure_ms_2023_cert_enrolled`, used by
/// `qm enroll-efi-keys`): virt-fw-vars adds the Microsoft UEFI CA and
/// Windows CA 2023 to db (`--distro-keys ms-uefi`, `--distro-keys windows`)
/// and the KEK 2K CA 2023 to KEK. The certificates come from the
/// python3-virt-firmware package; nothing is downloaded.
pub fn enroll_2023(from: &Path, to: &Path) -> Result<()> {
    let tool = hosttools::path_of(VIRT_FW_VARS)?;
    let kek = Path::new(VIRT_FIRMWARE_CERTS).join("MicrosoftCorporationKEK2KCA2023.pem");
    if !kek.is_file() {
        bail!(
            "{} is missing: this virt-fw-vars cannot enroll the 2023 KEK (apt install {})",
            kek.display(),
            VIRT_FW_VARS.package
        );
    }
    let tmp = to.with_extension("tmp");
    let out = Command::new(&tool)
        .arg("--input")
        .arg(from)
        .arg("--output")
        .arg(&tmp)
        .args(["--distro-keys", "ms-uefi", "--distro-keys", "windows"])
        .args(["--add-kek", MICROSOFT_OWNER])
        .arg(&kek)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", tool.display()))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        bail!(
            "virt-fw-vars could not enroll the 2023 keys into a copy of {}: {}",
            from.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    std::fs::rename(&tmp, to).with_context(|| format!("cannot write {}", to.display()))?;
    Ok(())
}

/// The variable store a UEFI boot uses, and the key set it was found to carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChosenVars {
    pub vars: PathBuf,
    /// None: the store carries neither Microsoft set exactly (custom keys).
    pub keys: Option<KeySet>,
    /// Why `auto` settled for less than the 2023k set, worth telling once.
    pub note: Option<String>,
}

/// The stores to boot with for the requested sets (in order, each store
/// once). `host_vars` is never changed; a copy with the 2023 set enrolled
/// by [`enroll_2023`] is written into `scratch` when needed.
pub fn choose(
    requested: &[SecureBootKeys],
    host_vars: &Path,
    scratch: &Path,
) -> Result<Vec<ChosenVars>> {
    choose_with(requested, host_vars, scratch, &enroll_2023)
}

fn choose_with(
    requested: &[SecureBootKeys],
    host_vars: &Path,
    scratch: &Path,
    enroll_2023: &dyn Fn(&Path, &Path) -> Result<()>,
) -> Result<Vec<ChosenVars>> {
    let host = read_store(host_vars)?;
    let host_set = host.key_set();
    let as_is = |keys| ChosenVars {
        vars: host_vars.to_path_buf(),
        keys,
        note: None,
    };
    let derived = scratch.join("OVMF_VARS_4M.2023k.fd");
    let mut enrolled: Option<Result<(), String>> = None;
    let mut enroll = || -> Result<ChosenVars, String> {
        enrolled
            .get_or_insert_with(|| {
                (|| {
                    enroll_2023(host_vars, &derived)?;
                    let got = read_store(&derived)?;
                    if !got.carries(KeySet::Ms2023k) {
                        bail!(
                            "virt-fw-vars enrolled an incomplete 2023 set ({}); a newer {} is needed",
                            got.describe(),
                            VIRT_FW_VARS.package
                        );
                    }
                    Ok(())
                })()
                .map_err(|e: anyhow::Error| format!("{e:#}"))
            })
            .clone()
            .map(|()| ChosenVars {
                vars: derived.clone(),
                keys: Some(KeySet::Ms2023k),
                note: None,
            })
    };
    let neither = |want: KeySet| {
        anyhow::anyhow!(
            "--secure-boot-keys {}: {} carries neither of Microsoft's key sets ({})",
            want.label(),
            host_vars.display(),
            host.describe()
        )
    };
    let mut out: Vec<ChosenVars> = Vec::new();
    for r in requested {
        let chosen = match (r.wanted(), host_set) {
            (None, None) => as_is(None),
            (None | Some(KeySet::Ms2023k), Some(KeySet::Ms2023k)) => as_is(host_set),
            (None, Some(KeySet::Ms2011)) => enroll().unwrap_or_else(|why| ChosenVars {
                note: Some(format!(
                    "Secure Boot keys 2011 only: {} carries Microsoft's 2011 keys, and the 2023 set \
                     Proxmox VE 9 enrolls could not be added: {why}",
                    host_vars.display()
                )),
                ..as_is(host_set)
            }),
            (Some(KeySet::Ms2023k), Some(KeySet::Ms2011)) => enroll().map_err(|why| {
                anyhow::anyhow!(
                    "--secure-boot-keys 2023k: {} carries only Microsoft's 2011 keys, and {why}",
                    host_vars.display()
                )
            })?,
            (Some(KeySet::Ms2011), Some(KeySet::Ms2011)) => as_is(host_set),
            (Some(KeySet::Ms2011), Some(KeySet::Ms2023k)) => bail!(
                "--secure-boot-keys 2011: {} carries Microsoft's 2023 keys; pass --ovmf-vars \
                 with a store that has only the 2011 set (Debian 12's ovmf package ships one)",
                host_vars.display()
            ),
            (Some(want), None) => return Err(neither(want)),
        };
        if !out.iter().any(|c| c.vars == chosen.vars) {
            out.push(chosen);
        }
    }
    Ok(out)
}

/// A guest check that the firmware really booted with `set`: the
/// certificates' subjects are in the guest's KEK and db (efivarfs holds
/// each variable's raw EFI_SIGNATURE_LISTs, DER subjects included).
pub(crate) fn guest_check(set: KeySet) -> crate::image::manifest::CheckSpec {
    let dir = "/sys/firmware/efi/efivars";
    let mut cmd = String::from("fail=0; ");
    for (v, cn) in set.required().iter().copied() {
        cmd.push_str(&format!(
            "grep -qaF '{cn}' {dir}/{f} && echo 'has {n}: {cn}' || {{ echo 'missing from {n}: {cn}'; fail=1; }}; ",
            f = v.efivarfs_name(),
            n = v.name()
        ));
    }
    for (v, cn) in set.excluded().iter().copied() {
        cmd.push_str(&format!(
            "! grep -qaF '{cn}' {dir}/{f} || {{ echo 'unexpected in {n}: {cn}'; fail=1; }}; ",
            f = v.efivarfs_name(),
            n = v.name()
        ));
    }
    cmd.push_str("exit $fail");
    crate::image::manifest::CheckSpec {
        name: format!("firmware has Microsoft's {} Secure Boot keys", set.label()),
        command: cmd,
        exit: 0,
        stdout: None,
        timeout: 30,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn der(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        if content.len() < 0x80 {
            v.push(content.len() as u8);
        } else {
            v.extend([0x82, (content.len() >> 8) as u8, content.len() as u8]);
        }
        v.extend_from_slice(content);
        v
    }

    fn name(cn: &str) -> Vec<u8> {
        let mut atv = der(0x06, &[0x55, 0x04, 0x03]);
        atv.extend(der(0x0c, cn.as_bytes()));
        der(0x30, &der(0x31, &der(0x30, &atv)))
    }

    /// A DER certificate skeleton: what the parser reads of a real one.
    pub(crate) fn cert(subject: &str, issuer: &str) -> Vec<u8> {
        let mut tbs = der(0xa0, &der(0x02, &[2]));
        tbs.extend(der(0x02, &[1, 2, 3]));
        tbs.extend(der(0x30, &der(0x06, &[0x2a, 0x86, 0x48])));
        tbs.extend(name(issuer));
        tbs.extend(der(0x30, &[]));
        tbs.extend(name(subject));
        tbs.extend(der(0x30, &[0; 40]));
        der(0x30, &der(0x30, &tbs))
    }

    fn siglist(certs: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for c in certs {
            let sig_size = 16 + c.len();
            out.extend(CERT_X509);
            out.extend(((28 + sig_size) as u32).to_le_bytes());
            out.extend(0u32.to_le_bytes());
            out.extend((sig_size as u32).to_le_bytes());
            out.extend([0x11; 16]);
            out.extend(c);
        }
        out
    }

    /// An edk2 authenticated variable store with these variables
    /// (name, vendor GUID, state, data).
    pub(crate) fn store(vars: &[(&str, [u8; 16], u8, Vec<u8>)]) -> Vec<u8> {
        let mut b = vec![0u8; 0x48];
        b[32..40].copy_from_slice(&(0x40000u64).to_le_bytes());
        b[40..44].copy_from_slice(b"_FVH");
        b[48..50].copy_from_slice(&0x48u16.to_le_bytes());
        b.extend(AUTH_VARIABLE_STORE);
        b.extend((0x40000u32 - 0x48).to_le_bytes());
        b.extend([0x5a, 0xfe, 0, 0, 0, 0, 0, 0]);
        for (n, guid, state, data) in vars {
            let name: Vec<u8> = n
                .encode_utf16()
                .chain([0])
                .flat_map(|c| c.to_le_bytes())
                .collect();
            b.extend(0x55aau16.to_le_bytes());
            b.push(*state);
            b.push(0);
            b.extend(0x27u32.to_le_bytes());
            b.extend([0u8; 8 + 16 + 4]);
            b.extend((name.len() as u32).to_le_bytes());
            b.extend((data.len() as u32).to_le_bytes());
            b.extend(guid);
            b.extend(&name);
            b.extend(data);
            while !b.len().is_multiple_of(4) {
                b.push(0xff);
            }
        }
        b.resize(0x40000, 0xff);
        b
    }

    pub(crate) fn store_with(kek: &[&str], db: &[&str]) -> Vec<u8> {
        let certs = |l: &[&str]| l.iter().map(|cn| cert(cn, "Some Root")).collect::<Vec<_>>();
        store(&[
            (
                "PK",
                EFI_GLOBAL_VARIABLE,
                0x3f,
                siglist(&certs(&["Debian PK"])),
            ),
            ("KEK", EFI_GLOBAL_VARIABLE, 0x3f, siglist(&certs(kek))),
            ("db", IMAGE_SECURITY_DATABASE, 0x3f, siglist(&certs(db))),
        ])
    }

    #[test]
    fn a_store_with_only_the_2011_certificates_carries_the_2011_set() {
        let k = parse_store(&store_with(
            &["Debian KEK", MS_KEK_2011],
            &[MS_WINDOWS_2011, MS_UEFI_CA_2011],
        ))
        .unwrap();
        assert_eq!(k.pk, ["Debian PK"]);
        assert_eq!(k.kek, ["Debian KEK", MS_KEK_2011]);
        assert_eq!(k.key_set(), Some(KeySet::Ms2011));
        assert!(!k.carries(KeySet::Ms2023k));
    }

    #[test]
    fn the_2023k_set_needs_the_2023_kek_and_both_2023_db_certificates() {
        let all_db = [
            MS_WINDOWS_2011,
            MS_UEFI_CA_2011,
            MS_UEFI_CA_2023,
            MS_WINDOWS_2023,
        ];
        let k = parse_store(&store_with(&[MS_KEK_2011, MS_KEK_2023], &all_db)).unwrap();
        assert_eq!(k.key_set(), Some(KeySet::Ms2023k));
        // A store with some 2023 certificates is neither set.
        let partial = parse_store(&store_with(&[MS_KEK_2011], &all_db)).unwrap();
        assert_eq!(partial.key_set(), None);
        let no_windows = parse_store(&store_with(
            &[MS_KEK_2011, MS_KEK_2023],
            &[MS_WINDOWS_2011, MS_UEFI_CA_2011, MS_UEFI_CA_2023],
        ))
        .unwrap();
        assert_eq!(no_windows.key_set(), None);
        // Without the 2011 certificates it is still the 2023k set, never 2011.
        let only_2023 = parse_store(&store_with(
            &[MS_KEK_2023],
            &[MS_UEFI_CA_2023, MS_WINDOWS_2023],
        ))
        .unwrap();
        assert_eq!(only_2023.key_set(), Some(KeySet::Ms2023k));
        assert!(!only_2023.carries(KeySet::Ms2011));
    }

    #[test]
    fn deleted_variables_and_foreign_vendors_are_ignored() {
        let old_db = siglist(&[cert(MS_UEFI_CA_2023, "x")]);
        let b = store(&[
            ("db", IMAGE_SECURITY_DATABASE, 0x3c, old_db.clone()),
            ("db", EFI_GLOBAL_VARIABLE, 0x3f, old_db),
            (
                "db",
                IMAGE_SECURITY_DATABASE,
                0x3f,
                siglist(&[cert(MS_UEFI_CA_2011, "x")]),
            ),
        ]);
        let k = parse_store(&b).unwrap();
        assert_eq!(k.db, [MS_UEFI_CA_2011]);
    }

    #[test]
    fn a_file_that_is_no_variable_store_is_refused() {
        let e = parse_store(&[0u8; 4096]).unwrap_err();
        assert!(
            format!("{e:#}").contains("no firmware volume header"),
            "{e:#}"
        );
        let mut b = store_with(&[], &[]);
        b[0x48] ^= 0xff;
        let e = parse_store(&b).unwrap_err();
        assert!(
            format!("{e:#}").contains("no authenticated variable store"),
            "{e:#}"
        );
    }

    /// The real stores on this host, where Debian's ovmf is installed.
    #[test]
    fn debian_12_ovmf_ms_vars_carry_microsofts_2011_set() {
        let p = Path::new(crate::validate::OVMF_VARS);
        if !p.is_file() {
            println!("SKIPPED: {} missing (apt install ovmf)", p.display());
            return;
        }
        let k = read_store(p).unwrap();
        assert!(k.kek.iter().any(|s| s == MS_KEK_2011), "{}", k.describe());
        assert!(
            k.db.iter().any(|s| s == MS_UEFI_CA_2011),
            "{}",
            k.describe()
        );
        assert!(k.pk.len() == 1, "{}", k.describe());
    }

    /// Proxmox's enrollment, run on a copy of Debian's 2011 store, gives the
    /// 2023k set and leaves the host's store as it was.
    #[test]
    fn auto_and_2023k_enroll_the_2023_set_into_a_copy_of_a_2011_store() {
        let host = Path::new(crate::validate::OVMF_VARS);
        if !host.is_file() || hosttools::which(VIRT_FW_VARS.program).is_none() {
            println!(
                "SKIPPED: needs {} (apt install ovmf) and virt-fw-vars (apt install {})",
                host.display(),
                VIRT_FW_VARS.package
            );
            return;
        }
        let before = std::fs::read(host).unwrap();
        let t = tempfile::tempdir().unwrap();
        let c = choose(
            &[
                SecureBootKeys::Auto,
                SecureBootKeys::Ms2023k,
                SecureBootKeys::Ms2011,
            ],
            host,
            t.path(),
        )
        .unwrap();
        assert_eq!(c.len(), 2, "{c:?}");
        assert_eq!(c[0].keys, Some(KeySet::Ms2023k));
        assert_eq!(c[0].vars, t.path().join("OVMF_VARS_4M.2023k.fd"));
        assert_eq!(c[0].note, None);
        let k = read_store(&c[0].vars).unwrap();
        assert!(k.carries(KeySet::Ms2023k), "{}", k.describe());
        // The platform key stays the host's.
        assert_eq!(k.pk, read_store(host).unwrap().pk);
        assert_eq!(
            (c[1].keys, c[1].vars.as_path()),
            (Some(KeySet::Ms2011), host)
        );
        assert_eq!(std::fs::read(host).unwrap(), before);
    }

    /// Without a way to enroll the 2023 set, `auto` boots with the 2011 set
    /// and says why, while an explicit `2023k` is refused with the reason.
    #[test]
    fn without_virt_fw_vars_auto_settles_for_2011_and_2023k_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let p = write(
            t.path(),
            "v.fd",
            &store_with(&[MS_KEK_2011], &[MS_WINDOWS_2011, MS_UEFI_CA_2011]),
        );
        let missing = |_: &Path, _: &Path| -> Result<()> {
            bail!(
                "missing host tools: virt-fw-vars (apt install {})",
                VIRT_FW_VARS.package
            )
        };
        let c = choose_with(&[SecureBootKeys::Auto], &p, t.path(), &missing).unwrap();
        assert_eq!(
            (c[0].keys, c[0].vars.as_path()),
            (Some(KeySet::Ms2011), p.as_path())
        );
        let note = c[0].note.clone().unwrap();
        assert!(note.contains("Secure Boot keys 2011 only"), "{note}");
        assert!(note.contains("apt install python3-virt-firmware"), "{note}");
        let e = choose_with(&[SecureBootKeys::Ms2023k], &p, t.path(), &missing).unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.starts_with(&format!(
                "--secure-boot-keys 2023k: {} carries only Microsoft's 2011 keys, and missing host tools: virt-fw-vars (apt install python3-virt-firmware",
                p.display()
            )),
            "{e}"
        );
        assert!(!e.contains('\n'), "one line: {e}");
        // An enrollment that leaves the set incomplete is no 2023k store.
        let partial = |_: &Path, to: &Path| -> Result<()> {
            std::fs::write(
                to,
                store_with(&[MS_KEK_2011], &[MS_UEFI_CA_2011, MS_UEFI_CA_2023]),
            )?;
            Ok(())
        };
        let e = choose_with(&[SecureBootKeys::Ms2023k], &p, t.path(), &partial).unwrap_err();
        assert!(
            format!("{e:#}").contains("enrolled an incomplete 2023 set"),
            "{e:#}"
        );
    }

    fn write(dir: &Path, name: &str, b: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, b).unwrap();
        p
    }

    #[test]
    fn a_store_with_the_2023_set_is_used_as_it_is_for_auto_and_2023k() {
        let t = tempfile::tempdir().unwrap();
        let p = write(
            t.path(),
            "v.fd",
            &store_with(
                &[MS_KEK_2011, MS_KEK_2023],
                &[
                    MS_WINDOWS_2011,
                    MS_UEFI_CA_2011,
                    MS_UEFI_CA_2023,
                    MS_WINDOWS_2023,
                ],
            ),
        );
        for r in [SecureBootKeys::Auto, SecureBootKeys::Ms2023k] {
            let c = choose(&[r], &p, t.path()).unwrap();
            assert_eq!(c.len(), 1);
            assert_eq!(c[0].vars, p);
            assert_eq!(c[0].keys, Some(KeySet::Ms2023k));
        }
        let e = choose(&[SecureBootKeys::Ms2011], &p, t.path()).unwrap_err();
        assert!(
            format!("{e:#}").contains("carries Microsoft's 2023 keys; pass --ovmf-vars"),
            "{e:#}"
        );
    }

    #[test]
    fn a_store_with_neither_set_is_refused_for_a_named_set_and_used_for_auto() {
        let t = tempfile::tempdir().unwrap();
        let p = write(t.path(), "v.fd", &store_with(&["SnakeOil"], &["SnakeOil"]));
        let c = choose(&[SecureBootKeys::Auto], &p, t.path()).unwrap();
        assert_eq!(c[0].keys, None);
        let e = choose(&[SecureBootKeys::Ms2011], &p, t.path()).unwrap_err();
        assert!(
            format!("{e:#}").contains("carries neither of Microsoft's key sets (PK: Debian PK; KEK: SnakeOil; db: SnakeOil)"),
            "{e:#}"
        );
    }

    #[test]
    fn the_guest_check_looks_for_every_certificate_of_the_set_and_for_no_newer_one() {
        let c = guest_check(KeySet::Ms2011);
        assert!(
            c.command.contains(&format!(
                "grep -qaF '{MS_UEFI_CA_2011}' /sys/firmware/efi/efivars/db-d719b2cb"
            )),
            "{}",
            c.command
        );
        assert!(
            c.command
                .contains(&format!("! grep -qaF '{MS_UEFI_CA_2023}'")),
            "{}",
            c.command
        );
        let c = guest_check(KeySet::Ms2023k);
        assert!(
            c.command.contains(&format!(
                "grep -qaF '{MS_KEK_2023}' /sys/firmware/efi/efivars/KEK-8be4df61"
            )),
            "{}",
            c.command
        );
        assert!(!c.command.contains("! grep"), "{}", c.command);
        assert_eq!(c.name, "firmware has Microsoft's 2023k Secure Boot keys");
    }
}
