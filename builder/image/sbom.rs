//! The software bill of materials written beside every image: an SPDX 2.3
//! JSON document of the Debian packages, artifacts, container images and boot chain in it.
//!
//! Package data is read where the rootfs is at hand (compose indexes the base
//! tar): dpkg's status database (name, version, architecture, `Source:`),
//! dpkg's file lists (which package installed each boot file) and each
//! package's `/usr/share/doc/<package>/copyright`. A licence is declared only
//! where that file is machine-readable (copyright-format 1.0, "DEP-5"):
//! anything else is `NOASSERTION`, never a guess.
//!
//! The same inputs give the same bytes: `created` is SOURCE_DATE_EPOCH, the
//! namespace is derived from the image id, and every list is sorted.

use anyhow::{bail, Result};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::image::compose::BaseInfo;
use crate::image::manifest::{BootComponent, FileInfo};
use crate::image::recipe::Distribution;
use crate::image::rootfs::DpkgEntry;

/// Whether compose must capture `path` from the base rootfs for the SBOM
/// (and the boot chain): dpkg's status database and file lists, and the
/// packages' copyright files.
pub(crate) fn wanted(path: &str) -> bool {
    path == crate::image::rootfs::DPKG_STATUS
        || crate::image::rootfs::is_dpkg_list(path)
        || path
            .strip_prefix(DOC_DIR)
            .and_then(|rest| rest.strip_suffix("/copyright"))
            .is_some_and(|pkg| !pkg.is_empty() && !pkg.contains('/'))
}

const DOC_DIR: &str = "usr/share/doc/";

/// One installed Debian package as the SBOM lists it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DebPackage {
    pub name: String,
    pub version: String,
    pub architecture: Option<String>,
    pub source: String,
    pub source_version: String,
    /// What its machine-readable copyright file declares; None is `NOASSERTION`.
    pub license: Option<License>,
}

/// Every installed package of `dpkg` with its licence from the copyright
/// file captured in `info` (a symlinked doc directory is followed, as Debian
/// policy allows within one source package).
pub(crate) fn packages(info: &BaseInfo, dpkg: &BTreeMap<String, DpkgEntry>) -> Vec<DebPackage> {
    dpkg.iter()
        .map(|(name, e)| {
            let (source, source_version) = e.source_package(name);
            let copyright = info
                .index
                .resolve_dir(&format!("{DOC_DIR}{name}/copyright"))
                .ok()
                .and_then(|p| info.captured.get(&p));
            DebPackage {
                name: name.clone(),
                version: e.version.clone(),
                architecture: e.architecture.clone(),
                source: source.to_string(),
                source_version: source_version.to_string(),
                license: copyright.and_then(|c| declared_license(&String::from_utf8_lossy(c))),
            }
        })
        .collect()
}

/// A licence as a machine-readable copyright file states it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum License {
    /// A short name (`GPL-2+`), with its `with <keywords> exception` clause.
    Name {
        name: String,
        exception: Option<String>,
    },
    /// Every one applies (`and`).
    All(Vec<License>),
    /// Any one may be chosen (`or`).
    Any(Vec<License>),
}

/// The `Format:` values of copyright-format 1.0. Short names mean nothing
/// certain under other (draft) formats (copyright-format-1.0 §7.1: "should
/// take care not to assume anything about the meaning of license short names
/// for unknown Format versions").
const DEP5_FORMATS: &[&str] = &[
    "https://www.debian.org/doc/packaging-manuals/copyright-format/1.0",
    "http://www.debian.org/doc/packaging-manuals/copyright-format/1.0",
];

/// What a machine-readable copyright file declares for the package as a
/// whole: every Files paragraph's licence together. None when the file is not
/// in copyright-format 1.0, has no Files paragraph, or a Files paragraph's
/// licence cannot be read.
pub(crate) fn declared_license(text: &str) -> Option<License> {
    let paragraphs = deb822_paragraphs(text);
    let format = field(paragraphs.first()?, "format")?;
    if !DEP5_FORMATS.contains(&format.trim_end_matches('/')) {
        return None;
    }
    let mut terms = Vec::new();
    for p in &paragraphs[1..] {
        if field(p, "files").is_none() {
            continue; // a stand-alone License paragraph: the text of a name used elsewhere
        }
        match parse_synopsis(field(p, "license")?)? {
            License::All(v) => terms.extend(v),
            l => terms.push(l),
        }
    }
    terms.sort();
    terms.dedup();
    match terms.len() {
        0 => None,
        1 => terms.pop(),
        _ => Some(License::All(terms)),
    }
}

/// deb822 paragraphs as (lowercased field name, first line of the value).
fn deb822_paragraphs(text: &str) -> Vec<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut cur: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
        } else if line.starts_with([' ', '\t', '#']) {
            // A continuation line, or a comment.
        } else if let Some((name, value)) = line.split_once(':') {
            cur.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn field<'a>(p: &'a [(String, String)], name: &str) -> Option<&'a str> {
    p.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

/// A License field's first line (copyright-format-1.0 §7.2): short names
/// joined by `or` and `and`, `and` binding tighter unless a comma comes
/// before it ("A or B, and C" is "(A or B) and C"); a name may carry
/// `with <keywords> exception`. Names hold no spaces.
fn parse_synopsis(s: &str) -> Option<License> {
    let mut segments = s.split(',');
    let mut acc = parse_words(&segments.next()?.split_whitespace().collect::<Vec<_>>())?;
    for seg in segments {
        let words: Vec<&str> = seg.split_whitespace().collect();
        let (op, rest) = words.split_first()?;
        let right = parse_words(rest)?;
        acc = match op.to_ascii_lowercase().as_str() {
            "and" => join(true, vec![acc, right]),
            "or" => join(false, vec![acc, right]),
            _ => return None,
        };
    }
    Some(acc)
}

fn parse_words(words: &[&str]) -> Option<License> {
    let is = |w: &&str, op: &str| w.eq_ignore_ascii_case(op);
    let mut any = Vec::new();
    for group in words.split(|w| is(w, "or")) {
        let mut all = Vec::new();
        for term in group.split(|w| is(w, "and")) {
            all.push(match term {
                [name] => License::Name {
                    name: name.to_string(),
                    exception: None,
                },
                [name, with, keywords @ .., exception]
                    if is(with, "with") && is(exception, "exception") && !keywords.is_empty() =>
                {
                    License::Name {
                        name: name.to_string(),
                        exception: Some(keywords.join(" ")),
                    }
                }
                _ => return None,
            });
        }
        any.push(join(true, all));
    }
    Some(join(false, any))
}

/// `all` (or `any`) of the parts, nested lists of the same kind flattened.
fn join(all: bool, parts: Vec<License>) -> License {
    let mut flat = Vec::new();
    for p in parts {
        match p {
            License::All(v) if all => flat.extend(v),
            License::Any(v) if !all => flat.extend(v),
            p => flat.push(p),
        }
    }
    if flat.len() == 1 {
        return flat.pop().expect("one part");
    }
    if all {
        License::All(flat)
    } else {
        License::Any(flat)
    }
}

/// The SPDX identifier of a copyright-format 1.0 standard short name
/// (§7.1: case-insensitive; a missing version is the lowest listed; `+`
/// means "or any later version"; "2.0" equals "2"). Names outside that
/// list, or versions it does not define, have none.
fn spdx_id(name: &str) -> Option<String> {
    let lower = name.to_ascii_lowercase();
    let (base, later) = match lower.strip_suffix('+') {
        Some(b) => (b, true),
        None => (lower.as_str(), false),
    };
    let candidates = std::iter::once((base, "")).chain(
        base.match_indices('-')
            .map(|(i, _)| (&base[..i], &base[i + 1..])),
    );
    for (family, version) in candidates {
        let mut v = version;
        while let Some(s) = v.strip_suffix(".0") {
            v = s;
        }
        let gnu = |id: &str| Some(format!("{id}-{}", if later { "or-later" } else { "only" }));
        let other = |id: &str| {
            Some(if later {
                format!("{id}+")
            } else {
                id.to_string()
            })
        };
        let cc = |prefix: &str| match v {
            "" | "1" => other(&format!("{prefix}-1.0")),
            "2" | "3" | "4" => other(&format!("{prefix}-{v}.0")),
            "2.5" => other(&format!("{prefix}-2.5")),
            _ => None,
        };
        let id = match (family, v) {
            ("gpl", "" | "1") => gnu("GPL-1.0"),
            ("gpl", "2") => gnu("GPL-2.0"),
            ("gpl", "3") => gnu("GPL-3.0"),
            ("lgpl", "" | "2") => gnu("LGPL-2.0"),
            ("lgpl", "2.1") => gnu("LGPL-2.1"),
            ("lgpl", "3") => gnu("LGPL-3.0"),
            ("gfdl", "1.1" | "1.2" | "1.3") => gnu(&format!("GFDL-{v}")),
            ("gfdl-niv", "1.1" | "1.2" | "1.3") => gnu(&format!("GFDL-{v}-no-invariants")),
            ("apache", "" | "1") => other("Apache-1.0"),
            ("apache", "1.1") => other("Apache-1.1"),
            ("apache", "2") => other("Apache-2.0"),
            ("artistic", "" | "1") => other("Artistic-1.0"),
            ("artistic", "2") => other("Artistic-2.0"),
            ("bsd-2-clause", "") => other("BSD-2-Clause"),
            ("bsd-3-clause", "") => other("BSD-3-Clause"),
            ("bsd-4-clause", "") => other("BSD-4-Clause"),
            ("isc", "") => other("ISC"),
            ("cc-by", _) => cc("CC-BY"),
            ("cc-by-sa", _) => cc("CC-BY-SA"),
            ("cc-by-nd", _) => cc("CC-BY-ND"),
            ("cc-by-nc", _) => cc("CC-BY-NC"),
            ("cc-by-nc-sa", _) => cc("CC-BY-NC-SA"),
            ("cc-by-nc-nd", _) => cc("CC-BY-NC-ND"),
            ("cc0", "" | "1") => other("CC0-1.0"),
            ("cddl", "" | "1") => other("CDDL-1.0"),
            ("cddl", "1.1") => other("CDDL-1.1"),
            ("cpl", "" | "1") => other("CPL-1.0"),
            ("efl", "" | "1") => other("EFL-1.0"),
            ("efl", "2") => other("EFL-2.0"),
            // The Expat licence is what SPDX calls MIT.
            ("expat", "") => other("MIT"),
            ("lppl", "" | "1") => other("LPPL-1.0"),
            ("lppl", "1.1" | "1.2" | "1.3c") => other(&format!("LPPL-{v}")),
            ("mpl", "" | "1.1") => other("MPL-1.1"),
            ("mpl", "1") => other("MPL-1.0"),
            ("mpl", "2") => other("MPL-2.0"),
            ("python", "" | "2") => other("Python-2.0"),
            ("qpl", "" | "1") => other("QPL-1.0"),
            ("w3c", "") => other("W3C"),
            ("zlib", "") => other("Zlib"),
            ("zope", "1.1") => other("ZPL-1.1"),
            ("zope", "2") => other("ZPL-2.0"),
            ("zope", "2.1") => other("ZPL-2.1"),
            _ => None,
        };
        if id.is_some() {
            return id;
        }
    }
    None
}

/// The licences named outside SPDX's list (`LicenseRef-…`), gathered while
/// rendering: each one's spellings and the packages naming it.
#[derive(Default)]
struct LicenseRefs(BTreeMap<String, (BTreeSet<String>, BTreeSet<String>)>);

impl LicenseRefs {
    /// `l` as an SPDX licence expression.
    fn expression(&mut self, l: &License, package: &str) -> String {
        match l {
            License::Name { name, exception } => match (exception, spdx_id(name)) {
                (None, Some(id)) => id,
                _ => {
                    let spelled = match exception {
                        Some(e) => format!("{name} with {e} exception"),
                        None => name.clone(),
                    };
                    let id = format!("LicenseRef-{}", id_chars(&spelled.to_ascii_lowercase()));
                    let (names, packages) = self.0.entry(id.clone()).or_default();
                    names.insert(spelled);
                    packages.insert(package.to_string());
                    id
                }
            },
            License::All(v) => v
                .iter()
                .map(|x| match x {
                    License::Any(_) => format!("({})", self.expression(x, package)),
                    _ => self.expression(x, package),
                })
                .collect::<Vec<_>>()
                .join(" AND "),
            License::Any(v) => v
                .iter()
                .map(|x| self.expression(x, package))
                .collect::<Vec<_>>()
                .join(" OR "),
        }
    }

    /// `hasExtractedLicensingInfos`: SPDX requires one per LicenseRef used.
    /// The texts stay in the packages' copyright files; this says where.
    fn infos(&self) -> Vec<Value> {
        self.0
            .iter()
            .map(|(id, (names, packages))| {
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                let packages: Vec<&str> = packages.iter().map(String::as_str).collect();
                json!({
                    "licenseId": id,
                    "name": names.join(" / "),
                    "extractedText": format!(
                        "The licence named `{}` in the machine-readable copyright file /usr/share/doc/<package>/copyright of: {}",
                        names.join("` or `"),
                        packages.join(", ")
                    ),
                })
            })
            .collect()
    }
}

/// Letters, digits, `.` and `-` (what SPDX ids may hold): `+` is spelled
/// `plus`, anything else becomes `-`. (Debian package names hold only
/// `[a-z0-9+.-]`, so theirs never collide; a collision among artifact or
/// image names is refused when the document is made.)
fn id_chars(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' => out.push(c),
            '+' => out.push_str("plus"),
            _ => out.push('-'),
        }
    }
    out
}

/// An artifact as the SBOM lists it.
pub(crate) struct SbomArtifact {
    pub name: String,
    pub url: String,
    pub sha256: String,
    pub dest: String,
    pub extract: bool,
}

/// Everything the SBOM lists, as the build gathered it.
pub(crate) struct SbomInput<'a> {
    pub name: &'a str,
    pub version: &'a str,
    /// The image id (sha256 of the disk file).
    pub image_id: &'a str,
    pub disk_file: &'a str,
    pub source_date_epoch: u64,
    pub distribution: Distribution,
    pub suite: &'a str,
    pub packages: &'a [DebPackage],
    pub artifacts: Vec<SbomArtifact>,
    /// Container image reference → locked manifest digest (`sha256:…`).
    pub images: BTreeMap<String, String>,
    pub boot: &'a [BootComponent],
}

/// Characters a purl or URI path segment keeps as they are.
const PURL_KEEP: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, PURL_KEEP).to_string()
}

fn purl(locator: String) -> Value {
    json!([{
        "referenceCategory": "PACKAGE-MANAGER",
        "referenceType": "purl",
        "referenceLocator": locator,
    }])
}

/// The SPDX 2.3 JSON document (pretty, ending in a newline).
pub(crate) fn document(input: &SbomInput<'_>) -> Result<Vec<u8>> {
    const IMAGE: &str = "SPDXRef-Image";
    let mut refs = LicenseRefs::default();
    let mut packages: Vec<Value> = Vec::new();
    let mut relationships: BTreeSet<(String, &str, String)> = BTreeSet::new();
    relationships.insert(("SPDXRef-DOCUMENT".into(), "DESCRIBES", IMAGE.into()));
    let no_assertion = |mut v: Value| {
        for k in ["licenseConcluded", "licenseDeclared", "copyrightText"] {
            if v.get(k).is_none() {
                v[k] = json!("NOASSERTION");
            }
        }
        v["filesAnalyzed"] = json!(false);
        if v.get("downloadLocation").is_none() {
            v["downloadLocation"] = json!("NOASSERTION");
        }
        v
    };
    packages.push(no_assertion(json!({
        "SPDXID": IMAGE,
        "name": input.name,
        "versionInfo": input.version,
        "packageFileName": input.disk_file,
        "checksums": [{"algorithm": "SHA256", "checksumValue": input.image_id}],
        "primaryPackagePurpose": "OPERATING-SYSTEM",
        "comment": "A kiln VM image; its id is the sha256 of the disk file.",
    })));

    let distro = match input.distribution {
        Distribution::Debian => "debian",
        Distribution::Ubuntu => "ubuntu",
    };
    let deb_id = |name: &str| format!("SPDXRef-Deb-{}", id_chars(name));
    for p in input.packages {
        let id = deb_id(&p.name);
        let mut qualifiers = Vec::new();
        if let Some(a) = &p.architecture {
            qualifiers.push(format!("arch={}", enc(a)));
        }
        qualifiers.push(format!("distro={}", enc(input.suite)));
        let mut v = json!({
            "SPDXID": id,
            "name": p.name,
            "versionInfo": p.version,
            "sourceInfo": format!("built from the {distro} source package {} {}", p.source, p.source_version),
            "externalRefs": purl(format!(
                "pkg:deb/{distro}/{}@{}?{}",
                enc(&p.name),
                enc(&p.version),
                qualifiers.join("&")
            )),
        });
        if let Some(l) = &p.license {
            v["licenseDeclared"] = json!(refs.expression(l, &p.name));
        }
        packages.push(no_assertion(v));
        relationships.insert((IMAGE.into(), "CONTAINS", id));
    }

    for a in &input.artifacts {
        let id = format!("SPDXRef-Artifact-{}", id_chars(&a.name));
        packages.push(no_assertion(json!({
            "SPDXID": id,
            "name": a.name,
            "downloadLocation": a.url,
            "checksums": [{"algorithm": "SHA256", "checksumValue": a.sha256}],
            "primaryPackagePurpose": if a.extract { "ARCHIVE" } else { "FILE" },
            "comment": format!(
                "A kiln artifact, {} {}.",
                if a.extract { "unpacked into" } else { "installed as" },
                a.dest
            ),
        })));
        relationships.insert((IMAGE.into(), "CONTAINS", id));
    }

    for (reference, digest) in &input.images {
        let id = format!("SPDXRef-Container-{}", id_chars(reference));
        let image = crate::image::oci::ImageRef::parse(reference)?;
        let short = image.repository().rsplit('/').next().unwrap_or_default();
        let mut qualifiers = vec![format!("repository_url={}", image.name())];
        if let Some(t) = image.tag() {
            qualifiers.push(format!("tag={}", enc(t)));
        }
        let Some(hex) = digest.strip_prefix("sha256:") else {
            bail!("image `{reference}`: digest `{digest}` is not sha256");
        };
        packages.push(no_assertion(json!({
            "SPDXID": id,
            "name": reference,
            "versionInfo": digest,
            "checksums": [{"algorithm": "SHA256", "checksumValue": hex}],
            "primaryPackagePurpose": "CONTAINER",
            "comment": "A container image baked in for K3s to import at first boot; the checksum is its manifest digest.",
            "externalRefs": purl(format!("pkg:oci/{}@{}?{}", enc(short), enc(digest), qualifiers.join("&"))),
        })));
        relationships.insert((IMAGE.into(), "CONTAINS", id));
    }

    let installed: BTreeSet<&str> = input.packages.iter().map(|p| p.name.as_str()).collect();
    for b in input.boot {
        let id = format!("SPDXRef-Boot-{}", id_chars(&b.component));
        let mut v = json!({
            "SPDXID": id,
            "name": b.component,
            "packageFileName": b.file,
            "checksums": [{"algorithm": "SHA256", "checksumValue": b.sha256}],
            "primaryPackagePurpose": "FILE",
            "comment": format!(
                "Boot chain: {} from {}{}.",
                b.component,
                b.file,
                b.package.as_ref().map(|p| format!(", installed by the package {p}")).unwrap_or_default()
            ),
        });
        if let Some(version) = &b.version {
            v["versionInfo"] = json!(version);
        }
        packages.push(no_assertion(v));
        relationships.insert((IMAGE.into(), "CONTAINS", id.clone()));
        if let Some(p) = b.package.as_deref().filter(|p| installed.contains(p)) {
            relationships.insert((deb_id(p), "CONTAINS", id));
        }
    }

    packages.sort_by(|a, b| a["SPDXID"].as_str().cmp(&b["SPDXID"].as_str()));
    let ids: Vec<&str> = packages
        .iter()
        .filter_map(|p| p["SPDXID"].as_str())
        .collect();
    if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
        bail!("two entries of the SBOM would have the SPDX id {}", w[0]);
    }
    let doc = json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": format!("{}-{}", input.name, input.version),
        "documentNamespace": format!(
            "https://kiln.invalid/spdx/{}/{}/{}",
            enc(input.name),
            enc(input.version),
            input.image_id
        ),
        "creationInfo": {
            "created": crate::util::rfc3339(input.source_date_epoch),
            "creators": [format!("Tool: kiln-{}", env!("CARGO_PKG_VERSION"))],
            "comment": "Created at SOURCE_DATE_EPOCH, so the same inputs give the same document.",
        },
        "packages": packages,
        "relationships": relationships
            .iter()
            .map(|(a, t, b)| json!({"spdxElementId": a, "relationshipType": t, "relatedSpdxElement": b}))
            .collect::<Vec<_>>(),
        "hasExtractedLicensingInfos": refs.infos(),
    });
    let mut text = serde_json::to_string_pretty(&doc)?;
    text.push('\n');
    Ok(text.into_bytes())
}

/// Write the SBOM into `dir` as `file` and describe it for the manifest.
pub(crate) fn write(dir: &Path, file: &str, input: &SbomInput<'_>) -> Result<FileInfo> {
    let bytes = document(input)?;
    crate::util::write_atomic(&dir.join(file), &bytes)?;
    Ok(FileInfo {
        file: file.to_string(),
        sha256: crate::util::sha256_hex(&bytes),
        size: bytes.len() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::compose::{Node, TreeIndex};

    const FORMAT: &str = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\nUpstream-Name: x\n\n";

    fn spdx(copyright: &str) -> Option<String> {
        declared_license(copyright).map(|l| LicenseRefs::default().expression(&l, "p"))
    }

    #[test]
    fn a_machine_readable_copyright_declares_every_files_paragraphs_licence() {
        let text = format!(
            "{FORMAT}Files: *\nCopyright: 2020 A\nLicense: GPL-2+\n\nFiles: lib/*\nCopyright: 2021 B\nLicense: BSD-3-clause\n\nFiles: debian/*\nLicense: GPL-2+\n\nLicense: BSD-3-clause\n The text.\n .\n More text.\n"
        );
        assert_eq!(
            spdx(&text).as_deref(),
            Some("BSD-3-Clause AND GPL-2.0-or-later")
        );
    }

    #[test]
    fn a_copyright_file_not_in_copyright_format_1_0_declares_nothing() {
        assert_eq!(
            spdx("This is the Debian prepackaged version of x.\n\nLicense: GPL-2\n"),
            None
        );
        // A draft DEP-5 format: its short names mean nothing certain.
        assert_eq!(
            spdx("Format: http://dep.debian.net/deps/dep5\n\nFiles: *\nLicense: GPL-2+\n"),
            None
        );
        assert_eq!(spdx(FORMAT), None, "no Files paragraph");
    }

    #[test]
    fn a_files_paragraph_without_a_readable_licence_makes_the_package_noassertion() {
        for bad in [
            "License: BSD-3-clause and/or GPL-3+\n",
            "License:\n The text only.\n",
            "Copyright: 2020 A\n",
            "License: GPL-2+ or\n",
        ] {
            let text = format!("{FORMAT}Files: *\nLicense: GPL-2+\n\nFiles: x/*\n{bad}");
            assert_eq!(spdx(&text), None, "{bad}");
        }
    }

    #[test]
    fn a_comma_lowers_the_precedence_of_and() {
        let one = |l: &str| spdx(&format!("{FORMAT}Files: *\nLicense: {l}\n")).unwrap();
        // copyright-format-1.0 §7.2: "A or B, and C" means "(A or B) and C"
        // (the parts of an `and` come out sorted).
        assert_eq!(
            one("GPL-2+ or Artistic-2.0, and BSD-3-clause"),
            "BSD-3-Clause AND (GPL-2.0-or-later OR Artistic-2.0)"
        );
        // "A or B and C" means "A or (B and C)", as in SPDX.
        assert_eq!(
            one("GPL-1+ or Artistic and Expat"),
            "GPL-1.0-or-later OR Artistic-1.0 AND MIT"
        );
        assert_eq!(
            one("GPL-1+ or Artistic, and Expat, and Zlib"),
            "MIT AND Zlib AND (GPL-1.0-or-later OR Artistic-1.0)"
        );
    }

    #[test]
    fn standard_short_names_map_to_spdx_ids_and_the_rest_to_license_refs() {
        let one = |l: &str| spdx(&format!("{FORMAT}Files: *\nLicense: {l}\n")).unwrap();
        for (dep5, id) in [
            ("Expat", "MIT"),
            ("GPL", "GPL-1.0-only"),
            ("GPL-2.0", "GPL-2.0-only"),
            ("gpl-3+", "GPL-3.0-or-later"),
            ("LGPL-2.1+", "LGPL-2.1-or-later"),
            ("LGPL", "LGPL-2.0-only"),
            ("GFDL-NIV-1.3+", "GFDL-1.3-no-invariants-or-later"),
            ("Apache-2.0", "Apache-2.0"),
            ("MPL-2.0", "MPL-2.0"),
            ("MPL-1.1+", "MPL-1.1+"),
            ("CC-BY-SA-3.0", "CC-BY-SA-3.0"),
            ("CC0-1.0", "CC0-1.0"),
            ("ZLIB", "Zlib"),
            ("BSD-2-Clause", "BSD-2-Clause"),
            ("public-domain", "LicenseRef-public-domain"),
            ("MIT", "LicenseRef-mit"),
            ("BSD-3-clause-generic", "LicenseRef-bsd-3-clause-generic"),
            (
                "GPL-2+ with OpenSSL exception",
                "LicenseRef-gpl-2plus-with-openssl-exception",
            ),
        ] {
            assert_eq!(one(dep5), id, "{dep5}");
        }
    }

    fn base(nodes: &[(&str, Node)], files: &[(&str, &str)]) -> BaseInfo {
        BaseInfo {
            index: TreeIndex {
                nodes: nodes
                    .iter()
                    .map(|(p, n)| (p.to_string(), n.clone()))
                    .collect(),
            },
            captured: files
                .iter()
                .map(|(p, t)| (p.to_string(), t.as_bytes().to_vec()))
                .collect(),
            data_bytes: 0,
        }
    }

    #[test]
    fn a_symlinked_doc_directory_leads_to_the_copyright_it_shares() {
        let copyright = format!("{FORMAT}Files: *\nLicense: GPL-2\n");
        let info = base(
            &[
                ("usr/share/doc/openssh-client", Node::Dir),
                ("usr/share/doc/openssh-client/copyright", Node::File),
                (
                    "usr/share/doc/openssh-server",
                    Node::Symlink("openssh-client".into()),
                ),
            ],
            &[("usr/share/doc/openssh-client/copyright", &copyright)],
        );
        let dpkg = crate::image::rootfs::parse_dpkg_entries(
            "Package: openssh-server\nStatus: install ok installed\nSource: openssh\nVersion: 1:9.2p1-2\n\nPackage: nodoc\nStatus: install ok installed\nVersion: 1\n",
        );
        let p = packages(&info, &dpkg);
        assert_eq!(p[1].name, "openssh-server");
        assert_eq!(
            (p[1].source.as_str(), p[1].source_version.as_str()),
            ("openssh", "1:9.2p1-2")
        );
        assert!(p[1].license.is_some());
        assert_eq!(p[0].name, "nodoc");
        assert_eq!(p[0].license, None);
    }

    fn deb(name: &str, version: &str, license: Option<&str>) -> DebPackage {
        DebPackage {
            name: name.into(),
            version: version.into(),
            architecture: Some("amd64".into()),
            source: name.into(),
            source_version: version.into(),
            license: license
                .and_then(|l| declared_license(&format!("{FORMAT}Files: *\nLicense: {l}\n"))),
        }
    }

    const ID: &str = "abababababababababababababababababababababababababababababababab";

    fn input<'a>(packages: &'a [DebPackage], boot: &'a [BootComponent]) -> SbomInput<'a> {
        SbomInput {
            name: "tiny",
            version: "0.1.0",
            image_id: ID,
            disk_file: "tiny-0.1.0.qcow2",
            source_date_epoch: 1_700_000_000,
            distribution: Distribution::Debian,
            suite: "bookworm",
            packages,
            artifacts: vec![SbomArtifact {
                name: "k3s".into(),
                url: "https://example.org/k3s".into(),
                sha256: "cd".repeat(32),
                dest: "/usr/local/bin/k3s".into(),
                extract: false,
            }],
            images: [(
                "quay.io/cilium/cilium:v1.18.2".to_string(),
                format!("sha256:{}", "ef".repeat(32)),
            )]
            .into(),
            boot,
        }
    }

    fn doc(packages: &[DebPackage], boot: &[BootComponent]) -> Value {
        serde_json::from_slice(&document(&input(packages, boot)).unwrap()).unwrap()
    }

    fn package<'a>(d: &'a Value, id: &str) -> &'a Value {
        d["packages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["SPDXID"] == id)
            .unwrap_or_else(|| panic!("no {id}"))
    }

    #[test]
    fn every_license_ref_used_is_declared_once_with_the_packages_naming_it() {
        let d = doc(
            &[
                deb("a", "1", Some("public-domain and GPL-2+")),
                deb("b", "1", Some("Public-Domain")),
                deb("c", "1", None),
            ],
            &[],
        );
        assert_eq!(
            package(&d, "SPDXRef-Deb-a")["licenseDeclared"],
            "GPL-2.0-or-later AND LicenseRef-public-domain"
        );
        assert_eq!(
            package(&d, "SPDXRef-Deb-c")["licenseDeclared"],
            "NOASSERTION"
        );
        let infos = d["hasExtractedLicensingInfos"].as_array().unwrap();
        assert_eq!(infos.len(), 1);
        assert_eq!(infos[0]["licenseId"], "LicenseRef-public-domain");
        assert_eq!(infos[0]["name"], "Public-Domain / public-domain");
        assert!(infos[0]["extractedText"]
            .as_str()
            .unwrap()
            .ends_with("of: a, b"));
    }

    #[test]
    fn the_same_input_gives_the_same_bytes_whatever_the_order() {
        let p = [deb("b", "2", Some("GPL-2")), deb("a", "1", Some("Expat"))];
        let mut q = p.clone();
        q.reverse();
        let bytes = document(&input(&p, &[])).unwrap();
        assert_eq!(bytes, document(&input(&q, &[])).unwrap());
        let d: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(d["creationInfo"]["created"], "2023-11-14T22:13:20Z");
        assert_eq!(
            d["documentNamespace"],
            format!("https://kiln.invalid/spdx/tiny/0.1.0/{}", "ab".repeat(32))
        );
        let ids: Vec<&str> = d["packages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["SPDXID"].as_str().unwrap())
            .collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted);
    }

    #[test]
    fn packages_artifacts_images_and_the_boot_chain_are_listed_with_their_digests() {
        let boot = [BootComponent {
            component: "shim".into(),
            file: "/usr/lib/shim/shimx64.efi.signed".into(),
            sha256: "12".repeat(32),
            package: Some("shim-signed".into()),
            version: Some("1.44+15.8-1".into()),
        }];
        let d = doc(
            &[
                deb("shim-signed", "1.44+15.8-1", None),
                deb("util-linux", "2:2.38.1-5+b1", None),
            ],
            &boot,
        );
        assert_eq!(
            package(&d, "SPDXRef-Deb-util-linux")["externalRefs"][0]["referenceLocator"],
            "pkg:deb/debian/util-linux@2%3A2.38.1-5%2Bb1?arch=amd64&distro=bookworm"
        );
        let k3s = package(&d, "SPDXRef-Artifact-k3s");
        assert_eq!(k3s["downloadLocation"], "https://example.org/k3s");
        assert_eq!(k3s["checksums"][0]["checksumValue"], "cd".repeat(32));
        let cilium = package(&d, "SPDXRef-Container-quay.io-cilium-cilium-v1.18.2");
        assert_eq!(cilium["checksums"][0]["checksumValue"], "ef".repeat(32));
        assert_eq!(
            cilium["externalRefs"][0]["referenceLocator"],
            format!(
                "pkg:oci/cilium@sha256%3A{}?repository_url=quay.io/cilium/cilium&tag=v1.18.2",
                "ef".repeat(32)
            )
        );
        let shim = package(&d, "SPDXRef-Boot-shim");
        assert_eq!(shim["versionInfo"], "1.44+15.8-1");
        assert_eq!(shim["checksums"][0]["checksumValue"], "12".repeat(32));
        let rels = d["relationships"].as_array().unwrap();
        assert!(rels.contains(&json!({"spdxElementId": "SPDXRef-Deb-shim-signed", "relationshipType": "CONTAINS", "relatedSpdxElement": "SPDXRef-Boot-shim"})));
        assert!(rels.contains(&json!({"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES", "relatedSpdxElement": "SPDXRef-Image"})));
    }
}
