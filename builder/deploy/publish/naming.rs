//! What a published template is called and carries: DNS-safe VM name, PVE
//! tags, upload file names, the description, and the VM create parameters.

use crate::deploy::pve::config::Target;
pub(crate) use crate::deploy::pve::upload::pve_file_name;
use crate::image::manifest::ImageManifest;

/// Tag every kiln template carries.
pub(crate) const KILN_TAG: &str = "kiln";
/// Prefix of the tag holding the short image id.
pub(crate) const ID_TAG_PREFIX: &str = "id-";

/// `<name>-<version>` as a DNS label: lowercase letters, digits and inner
/// hyphens, at most 63 characters.
pub(crate) fn vm_name(name: &str, version: &str) -> String {
    let raw = format!("{name}-{version}").to_ascii_lowercase();
    let mut out = String::new();
    for c in raw.chars() {
        let c = if c.is_ascii_alphanumeric() { c } else { '-' };
        if c == '-' && (out.is_empty() || out.ends_with('-')) {
            continue;
        }
        out.push(c);
    }
    out.truncate(63);
    let out = out.trim_end_matches('-').to_string();
    if out.is_empty() {
        "kiln-image".into()
    } else {
        out
    }
}

/// Make a string fit PVE's tag pattern `[a-z0-9_][a-z0-9_\-+.]*`.
pub(crate) fn tag(s: &str) -> String {
    let mut out: String = s
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_-+.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || !out.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
        out.insert(0, '_');
    }
    out
}

/// The id tag for an image.
pub(crate) fn id_tag(m: &ImageManifest) -> String {
    format!("{ID_TAG_PREFIX}{}", tag(m.short_id()))
}

/// Tags of a template: kiln, the image name, the version, the short id.
pub(crate) fn tags(m: &ImageManifest) -> Vec<String> {
    let mut t = vec![
        KILN_TAG.to_string(),
        tag(&m.name),
        tag(&m.version),
        id_tag(m),
    ];
    t.dedup();
    t
}

/// A piece of an upload name in PVE's file-name alphabet (`+` in a version
/// becomes `_`), so the stored name is the name kiln asked for.
fn safe_file_part(s: &str) -> String {
    pve_file_name(&s.replace(['/', '\\'], "_"))
}

/// Upload name of the disk for publish run `run`: only PVE's safe
/// characters, `.qcow2`/`.raw`, and the run's first 8 hex digits so that
/// concurrent runs never share (and overwrite or delete) one file.
pub(crate) fn import_file_name(m: &ImageManifest, run: &str) -> String {
    let ext = if m.disk.format == "raw" {
        "raw"
    } else {
        "qcow2"
    };
    format!(
        "{}-{}.{ext}",
        file_base(&m.name, &m.version, m.short_id()),
        run_tag(run)
    )
}

/// The first 8 hex digits of a run id, for names.
pub(crate) fn run_tag(run: &str) -> String {
    run.chars()
        .filter(char::is_ascii_hexdigit)
        .take(8)
        .collect()
}

/// Upload name of the LXC rootfs archive.
pub(crate) fn lxc_file_name(m: &ImageManifest) -> String {
    format!("{}.tar.zst", file_base(&m.name, &m.version, m.short_id()))
}

/// `kiln-NAME-VERSION-SHORTID` in PVE's file-name alphabet.
fn file_base(name: &str, version: &str, short_id: &str) -> String {
    format!(
        "kiln-{}-{}-{}",
        safe_file_part(name),
        safe_file_part(version),
        safe_file_part(short_id)
    )
}

/// Machine-readable lines kiln reads back from a template's description.
pub(crate) mod keys {
    pub(crate) const IMAGE: &str = "kiln-image";
    pub(crate) const VERSION: &str = "kiln-version";
    pub(crate) const ID: &str = "kiln-id";
    pub(crate) const CREATED: &str = "kiln-created";
    /// The publish run that created the VM (its SMBIOS UUID, see `run_marker_matches`).
    pub(crate) const RUN: &str = "kiln-run";
}

/// `smbios1` of a VM created by run `run`: the run id is its SMBIOS UUID.
pub(crate) fn smbios1(run: &str) -> String {
    format!("uuid={run}")
}

/// The SMBIOS UUID in a VM config's `smbios1` (`uuid=...,base64=1,...`).
pub(crate) fn smbios_uuid(cfg: &serde_json::Map<String, serde_json::Value>) -> Option<String> {
    cfg.get("smbios1")?
        .as_str()?
        .split(',')
        .find_map(|p| p.strip_prefix("uuid="))
        .map(|u| u.to_ascii_lowercase())
}

/// Whether a VM config is the very VM run `run` created, not a copy of it.
/// A clone carries the description (with `kiln-run`) but never the SMBIOS
/// UUID: `PVE/API2/Qemu.pm` `clone_vm` generates a new one ("auto generate a
/// new uuid"), and so does a create without `smbios1`.
pub(crate) fn run_marker_matches(
    cfg: &serde_json::Map<String, serde_json::Value>,
    run: &str,
) -> bool {
    let desc = cfg
        .get("description")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("");
    parse_description(desc).get(keys::RUN).map(String::as_str) == Some(run)
        && smbios_uuid(cfg).as_deref() == Some(&run.to_ascii_lowercase())
}

/// Description with the manifest summary (PVE allows 8 KiB).
pub(crate) fn description(m: &ImageManifest, created: &str, run: &str) -> String {
    let validated = match &m.validation {
        Some(v) if v.validated => {
            let keys = if v.secure_boot_keys.is_empty() {
                String::new()
            } else {
                format!(", Secure Boot keys {}", v.secure_boot_keys.join(" and "))
            };
            format!(
                "yes ({}, {} checks, {}{keys})",
                v.when,
                v.checks.len(),
                v.accel
            )
        }
        _ => "no (published with --allow-unvalidated)".into(),
    };
    let mut d =
        format!(
        "Published by kiln {kv}. Lines starting with kiln- are read by kiln; do not edit them.\n\n\
         {}: {}\n{}: {}\n{}: {}\n{}: {created}\n{}: {run}\n\n\
         built by kiln {}; disk {} ({}), virtual size {}\n\
         kernel {}; UEFI {}, Secure Boot {}\n\
         roles: {}\npackages: {}\nvalidated: {validated}\n",
        keys::IMAGE,
        m.name,
        keys::VERSION,
        m.version,
        keys::ID,
        m.id,
        keys::CREATED,
        keys::RUN,
        m.kiln_version,
        m.disk.file,
        m.disk.format,
        crate::util::human_bytes(m.disk.virtual_size),
        m.boot.kernel,
        m.boot.uefi,
        m.boot.secure_boot,
        if m.roles.is_empty() { "-".into() } else { m.roles.join(", ") },
        m.packages.len(),
        kv = env!("CARGO_PKG_VERSION"),
    );
    if d.len() > 8000 {
        d.truncate(8000);
    }
    d
}

/// Parse the `kiln-*: value` lines of a description.
pub(crate) fn parse_description(d: &str) -> std::collections::BTreeMap<String, String> {
    d.lines()
        .filter_map(|l| l.split_once(": "))
        .filter(|(k, _)| k.starts_with("kiln-"))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// `(major, minor, patch)` of a Proxmox VE version (`9.1.13`, `8.4.1-2`).
fn version_triple(v: &str) -> (u32, u32, u32) {
    let mut it = v.split(['.', '-']).map(|x| x.parse::<u32>().unwrap_or(0));
    (
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
    )
}

/// The first Proxmox VE (pve-manager, as `GET /version` reports it) that
/// accepts `ms-cert=2023k` on an EFI disk. qemu-server added the `ms-cert`
/// option in 9.0.27 (values 2011 and 2023) and the value `2023k` in 9.1.5
/// (`src/PVE/QemuServer/Drive.pm`); pve-manager requires qemu-server >= 9.1.11
/// from 9.1.13 on (its `debian/control`), the first version that guarantees it.
/// Every qemu-server with the option requires pve-edk2-firmware-ovmf >=
/// 4.2025.05-2, whose pre-enrolled vars carry the 2023 keys, so the marker
/// is true of the disk PVE creates.
pub(crate) const MS_CERT_2023K_SINCE: (u32, u32, u32) = (9, 1, 13);

/// `efidisk0` of a template: 4 MiB OVMF vars with the distribution's and
/// Microsoft's keys pre-enrolled, marked `ms-cert=2023k` where PVE knows the
/// marker (PVE 9 would set it itself; older versions refuse the option), so
/// PVE never asks for the 2023 keys to be enrolled into the template's clones
/// (qemu-server `src/PVE/QemuServer.pm`, `check_efi_vars`).
pub(crate) fn efidisk0(storage: &str, pve_version: &str) -> String {
    let mut d = format!("{storage}:1,efitype=4m,pre-enrolled-keys=1");
    if version_triple(pve_version) >= MS_CERT_2023K_SINCE {
        d.push_str(",ms-cert=2023k");
    }
    d
}

/// Parameters of `POST /nodes/{node}/qemu` for a template from an imported
/// disk on Proxmox VE `pve_version`.
pub(crate) fn create_params(
    t: &Target,
    m: &ImageManifest,
    vmid: u32,
    import_volid: &str,
    created: &str,
    run: &str,
    pve_version: &str,
) -> Vec<(String, String)> {
    let s = &t.cfg.storage;
    let vm = &t.cfg.vm;
    let mut p: Vec<(String, String)> = vec![
        ("vmid".into(), vmid.to_string()),
        ("name".into(), vm_name(&m.name, &m.version)),
        ("machine".into(), "q35".into()),
        ("bios".into(), "ovmf".into()),
        ("efidisk0".into(), efidisk0(s, pve_version)),
        ("scsihw".into(), "virtio-scsi-single".into()),
        (
            "scsi0".into(),
            format!("{s}:0,import-from={import_volid},discard=on,iothread=1"),
        ),
        ("ide2".into(), format!("{s}:cloudinit")),
        ("boot".into(), "order=scsi0".into()),
        ("agent".into(), "1".into()),
        ("serial0".into(), "socket".into()),
        ("ostype".into(), "l26".into()),
        ("cores".into(), vm.cores.to_string()),
        ("memory".into(), vm.memory.to_string()),
        ("cpu".into(), vm.cpu.clone()),
        ("net0".into(), format!("virtio,bridge={}", vm.bridge)),
        ("tags".into(), tags(m).join(";")),
        ("pool".into(), t.cfg.pool.clone().unwrap_or_default()),
        ("smbios1".into(), smbios1(run)),
        ("description".into(), description(m, created, run)),
    ];
    p.retain(|(_, v)| !v.is_empty());
    p
}

pub(crate) use crate::util::now_rfc3339;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rfc3339;

    #[test]
    fn vm_names_are_dns_labels() {
        assert_eq!(vm_name("k3s-server", "1.2.0"), "k3s-server-1-2-0");
        assert_eq!(
            vm_name("LB Appliance", "2026.11+b1"),
            "lb-appliance-2026-11-b1"
        );
        assert!(vm_name(&"x".repeat(100), "1").len() <= 63);
    }

    #[test]
    fn upload_names_are_left_unchanged_by_pve() {
        for (name, version) in [
            ("lb", "2026.11+b1"),
            ("k3s server", "1.0=x"),
            ("a/b", "1\\2"),
        ] {
            let base = file_base(name, version, "abcdef012345");
            for n in [format!("{base}-0f8e6a62.qcow2"), format!("{base}.tar.zst")] {
                assert_eq!(pve_file_name(&n), n, "{name} {version}");
            }
        }
        assert_eq!(
            file_base("lb", "2026.11+b1", "abcdef012345"),
            "kiln-lb-2026.11_b1-abcdef012345"
        );
        assert_eq!(run_tag("0f8e6a62-1c2b-4d3e"), "0f8e6a62");
    }

    #[test]
    fn tags_fit_the_pve_pattern() {
        assert_eq!(tag("K3s Server"), "k3s_server");
        assert_eq!(tag("1.2.0+build"), "1.2.0+build");
        assert_eq!(tag("-x"), "_-x");
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_651_200), "2026-11-26T00:00:00Z");
    }

    #[test]
    fn only_the_vm_a_run_created_carries_its_marker() {
        let run = "0f8e6a62-1c2b-4d3e-9f00-aabbccddeeff";
        let cfg = |smbios: &str| {
            serde_json::json!({
                "description": format!("x\nkiln-run: {run}\n"),
                "smbios1": smbios,
            })
            .as_object()
            .unwrap()
            .clone()
        };
        assert!(run_marker_matches(&cfg(&smbios1(run)), run));
        assert!(run_marker_matches(
            &cfg("uuid=0F8E6A62-1C2B-4D3E-9F00-AABBCCDDEEFF,base64=1"),
            run
        ));
        // A clone: same description, new SMBIOS UUID.
        assert!(!run_marker_matches(
            &cfg("uuid=11111111-2222-4333-8444-555555555555"),
            run
        ));
        assert!(!run_marker_matches(&cfg(&smbios1(run)), "another-run"));
    }

    #[test]
    fn the_efi_disk_is_marked_ms_cert_2023k_from_pve_9_1_13_on() {
        let plain = "local-lvm:1,efitype=4m,pre-enrolled-keys=1";
        for v in ["8.4.1", "9.0.17", "9.1.12", "9.1", "garbage"] {
            assert_eq!(efidisk0("local-lvm", v), plain, "{v}");
        }
        for v in ["9.1.13", "9.2.0", "10.0.1-1"] {
            assert_eq!(
                efidisk0("local-lvm", v),
                format!("{plain},ms-cert=2023k"),
                "{v}"
            );
        }
    }

    #[test]
    fn description_lines_round_trip() {
        let d = "intro\n\nkiln-image: lb\nkiln-id: abc\nother: x\n";
        let m = parse_description(d);
        assert_eq!(m["kiln-image"], "lb");
        assert_eq!(m["kiln-id"], "abc");
        assert!(!m.contains_key("other"));
    }
}
