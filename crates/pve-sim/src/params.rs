//! Parameter checks written by hand after the Proxmox VE API's documented rules (types,
//! enums, formats); errors are per parameter. pve-sim is a labelled STAND-IN for Proxmox VE.

use std::collections::BTreeMap;

/// Per-parameter errors, as PVE returns them under `errors`.
pub type Errors = BTreeMap<String, String>;

pub fn is_safe_id(s: &str) -> bool {
    // pve-node / pve-storage-id: starts with a letter, then letters, digits, `-`, `_`, `.`
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic())
        && c.all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
}

/// `dns-name`: dot-separated labels of letters, digits and inner hyphens.
pub fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// One tag: `[a-z0-9_][a-z0-9_\-+.]*`, case-insensitive.
pub fn is_tag(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphanumeric() || ch == '_')
        && c.all(|ch| ch.is_ascii_alphanumeric() || "_-+.".contains(ch))
}

/// A UUID: `[a-fA-F0-9]{8}(-[a-fA-F0-9]{4}){3}-[a-fA-F0-9]{12}`.
pub fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Split a `pve-tag-list` (separators `;`, `,` or space).
pub fn split_tags(s: &str) -> Vec<String> {
    s.split([';', ',', ' '])
        .filter(|t| !t.is_empty())
        .map(|t| t.to_string())
        .collect()
}

/// What PVE makes of an uploaded file's name before any check: the last
/// path component, every character outside `[a-zA-Z0-9_.-]` replaced by `_`
/// (`PVE/Storage.pm`, `normalize_content_filename`, called by the upload
/// handler in `PVE/API2/Storage/Status.pm`).
pub fn normalize_content_filename(name: &str) -> String {
    let name = name.trim_end_matches('\n');
    let last = name.rsplit(['/', '\\']).next().unwrap_or("");
    last.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Safe characters for uploaded file names (PVE's SAFE_CHAR_CLASS).
pub fn is_safe_filename_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-.+=_".contains(c)
}

/// Names PVE accepts for `content=import` uploads.
pub fn import_filename_ok(name: &str) -> bool {
    let ext_ok = ["qcow2", "raw", "vmdk", "ova"]
        .iter()
        .any(|e| name.len() > e.len() + 1 && name.ends_with(&format!(".{e}")));
    ext_ok && name.chars().all(is_safe_filename_char)
}

/// Names PVE accepts for `content=vztmpl` uploads: `\.tar(\.(gz|xz|zst|bz2))?`
/// at the end, any case (`PVE/Storage.pm`, `VZTMPL_EXT_RE_1`).
pub fn vztmpl_filename_ok(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    [".tar", ".tar.gz", ".tar.xz", ".tar.zst", ".tar.bz2"]
        .iter()
        .any(|e| lower.len() > e.len() && lower.ends_with(e))
        && !name.contains('/')
}

pub fn check_integer(errs: &mut Errors, name: &str, v: &str, min: i64, max: i64) -> Option<i64> {
    match v.parse::<i64>() {
        Err(_) => {
            errs.insert(
                name.into(),
                format!("type check ('integer') failed - got '{v}'"),
            );
            None
        }
        Ok(n) if n < min => {
            errs.insert(
                name.into(),
                format!("value must have a minimum value of {min}"),
            );
            None
        }
        Ok(n) if n > max => {
            errs.insert(
                name.into(),
                format!("value must have a maximum value of {max}"),
            );
            None
        }
        Ok(n) => Some(n),
    }
}

pub fn check_boolean(errs: &mut Errors, name: &str, v: &str) -> Option<bool> {
    match v {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => {
            errs.insert(
                name.into(),
                format!("type check ('boolean') failed - got '{v}'"),
            );
            None
        }
    }
}

pub fn check_enum(errs: &mut Errors, name: &str, v: &str, allowed: &[&str]) {
    if !allowed.contains(&v) {
        errs.insert(
            name.into(),
            format!(
                "value '{v}' does not have a value in the enumeration '{}'",
                allowed.join(", ")
            ),
        );
    }
}

/// Parse a property string `[defaultkey=]v,k=v,...` into (default value, options).
pub fn property_string(
    v: &str,
    default_key: &str,
) -> Result<(Option<String>, BTreeMap<String, String>), String> {
    let mut head = None;
    let mut opts = BTreeMap::new();
    for (i, part) in v.split(',').enumerate() {
        if part.is_empty() {
            return Err("empty property".into());
        }
        match part.split_once('=') {
            Some((k, val)) if k == default_key => head = Some(val.to_string()),
            Some((k, val)) => {
                if opts.insert(k.to_string(), val.to_string()).is_some() {
                    return Err(format!(
                        "duplicate key in comma-separated list property: {k}"
                    ));
                }
            }
            None if i == 0 => head = Some(part.to_string()),
            None => {
                return Err(format!(
                    "value without key, but schema does not define a default key: {part}"
                ))
            }
        }
    }
    Ok((head, opts))
}

/// Check the keys of a property string against the allowed set.
pub fn check_keys(
    errs: &mut Errors,
    name: &str,
    opts: &BTreeMap<String, String>,
    allowed: &[&str],
) -> bool {
    for k in opts.keys() {
        if !allowed.contains(&k.as_str()) {
            errs.insert(
                name.into(),
                format!("invalid format - format error\n{name}.{k}: property is not defined in schema and the schema does not allow additional properties"),
            );
            return false;
        }
    }
    true
}

pub const DRIVE_OPTS: &[&str] = &[
    "aio",
    "backup",
    "cache",
    "discard",
    "file",
    "format",
    "import-from",
    "iothread",
    "media",
    "replicate",
    "size",
    "snapshot",
    "ssd",
    "serial",
    "wwn",
    "ro",
];

pub const MACHINE_RE_HINT: &str = "q35, pc, pc-q35-X.Y, pc-i440fx-X.Y";

pub fn machine_ok(v: &str) -> bool {
    let t = v.split(',').next().unwrap_or("");
    let t = t.strip_prefix("type=").unwrap_or(t);
    if t == "q35" || t == "pc" {
        return true;
    }
    let rest = t
        .strip_prefix("pc-q35-")
        .or_else(|| t.strip_prefix("pc-i440fx-"))
        .or_else(|| t.strip_prefix("pc-"));
    match rest {
        Some(r) => {
            let r = r.split("+pve").next().unwrap_or("");
            !r.is_empty()
                && r.split('.')
                    .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_names_follow_pve_rules() {
        assert!(import_filename_ok("kiln-k3s-1.2.0-abc.qcow2"));
        assert!(import_filename_ok("disk.raw"));
        assert!(!import_filename_ok("disk.img"));
        assert!(!import_filename_ok("my disk.qcow2"));
        assert!(!import_filename_ok(".qcow2"));
    }

    #[test]
    fn upload_names_are_normalized_like_pve() {
        assert_eq!(
            normalize_content_filename("kiln-lb-2026.11+b1-ab.tar.zst"),
            "kiln-lb-2026.11_b1-ab.tar.zst"
        );
        assert_eq!(
            normalize_content_filename("C:\\x\\my disk=1.qcow2"),
            "my_disk_1.qcow2"
        );
        assert_eq!(normalize_content_filename("../a/b.raw"), "b.raw");
    }

    #[test]
    fn uuids_are_checked() {
        assert!(is_uuid("0f8e6a62-1c2b-4d3e-9f00-aabbccddeeff"));
        assert!(!is_uuid("0f8e6a62-1c2b-4d3e-9f00"));
        assert!(!is_uuid("0f8e6a62-1c2b-4d3e-9f00-aabbccddeefg"));
    }

    #[test]
    fn tags_follow_pve_pattern() {
        assert!(is_tag("kiln"));
        assert!(is_tag("1.2.0"));
        assert!(!is_tag("-x"));
        assert!(!is_tag("a/b"));
    }

    #[test]
    fn property_strings_split_default_key_and_options() {
        let (h, o) =
            property_string("local-lvm:0,import-from=local:import/a.qcow2", "file").unwrap();
        assert_eq!(h.as_deref(), Some("local-lvm:0"));
        assert_eq!(o["import-from"], "local:import/a.qcow2");
        assert!(property_string("a,,b", "file").is_err());
    }

    #[test]
    fn machine_types_are_checked() {
        assert!(machine_ok("q35"));
        assert!(machine_ok("pc-q35-8.1+pve0"));
        assert!(!machine_ok("virt-fantasy"));
    }
}
