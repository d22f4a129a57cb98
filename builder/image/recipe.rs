//! Recipes: the TOML files in `recipes/` that describe an image, parsed with
//! unknown keys rejected, `extends` resolved, and errors shown as file:line:col.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use toml::Spanned;

use crate::image::contract::CheckSpec;
use crate::image::values::ValueTypes;
use crate::util::diagnostics::{did_you_mean, FileError as RecipeError, SourceFile as Source};

/// A recipe with `extends` resolved and every default filled in.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Recipe {
    /// The recipe file this was loaded from.
    #[serde(skip)]
    pub path: PathBuf,
    /// The project root: the nearest ancestor holding `overlays/`.
    #[serde(skip)]
    pub root: PathBuf,
    pub name: String,
    pub version: String,
    pub base: Base,
    pub artifacts: Vec<Artifact>,
    pub images: Vec<ContainerImage>,
    pub overlays: Vec<String>,
    pub vars: toml::Table,
    pub roles: BTreeMap<String, Role>,
    pub units: Units,
    pub disk: Disk,
    pub boot: Boot,
    pub hygiene: Hygiene,
    pub checks: Vec<CheckSpec>,
    pub lxc: bool,
    /// The role `kiln validate` boots the image as.
    pub validate_role: Option<String>,
    /// Every file this recipe was read from besides overlays: the `extends`
    /// chain (this file first), role templates and value types. Not in the
    /// digest (their contents are, through the settings they give).
    #[serde(skip)]
    pub sources: Vec<PathBuf>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Base {
    pub distribution: Distribution,
    pub suite: String,
    pub mirror: String,
    /// A snapshot timestamp such as `20250520T000000Z` (snapshot.debian.org).
    pub snapshot: Option<String>,
    pub architecture: String,
    pub components: Vec<String>,
    pub packages: Vec<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Distribution {
    Debian,
    Ubuntu,
}

/// A pinned file fetched over HTTP(S) and placed into the image.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Artifact {
    pub name: String,
    pub url: String,
    /// sha256 from the recipe; the lockfile pins it when the recipe does not.
    pub sha256: Option<String>,
    /// Absolute path in the image (a directory when `extract` is set).
    pub dest: String,
    pub mode: u32,
    /// Unpack a tar(.gz) archive into `dest` instead of copying the file.
    pub extract: bool,
    pub strip_components: usize,
}

/// A container image baked in for airgapped first boot.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ContainerImage {
    pub reference: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Role {
    /// Overlay directory (under `overlays/`) baked into the image for this role.
    pub overlay: Option<String>,
    /// Tera template rendered per node into user-data (path from the recipe's directory).
    pub user_data: Option<PathBuf>,
    /// The type of every value `user_data` takes (`value_types`, a file from
    /// the recipe's directory). Not in the digest: it shapes no image byte.
    #[serde(skip)]
    pub value_types: Option<ValueTypes>,
    /// Values used to render user-data for validation (never real secrets).
    pub test_values: crate::image::values::Values,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Units {
    pub enable: Vec<String>,
    pub disable: Vec<String>,
    pub mask: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Disk {
    pub size: u64,
    pub filesystem: String,
    pub esp_size: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Boot {
    pub uefi: bool,
    pub secure_boot: bool,
    pub bios: bool,
    /// Extra kernel command-line arguments.
    pub cmdline: String,
    /// Which kernel modules the initramfs carries: `virtual` (the virtio, SCSI,
    /// SATA and NVMe drivers VMs boot from: small and fast) or `most` (Debian's
    /// default, for hardware kiln does not know).
    pub initrd_modules: InitrdModules,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InitrdModules {
    #[default]
    Virtual,
    Most,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Hygiene {
    /// Paths where a private key or K3s token may ship (nothing else may hold one).
    pub allow_private_keys: Vec<String>,
}

// ---------------------------------------------------------------------------
// The file format: every field optional so `extends` can fill it in.

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RecipeFile {
    name: Option<Spanned<String>>,
    version: Option<Spanned<String>>,
    extends: Option<Spanned<String>>,
    base: Option<BaseFile>,
    #[serde(default)]
    artifacts: Vec<Spanned<ArtifactFile>>,
    #[serde(default)]
    images: Vec<Spanned<String>>,
    #[serde(default)]
    overlays: Vec<Spanned<String>>,
    #[serde(default)]
    vars: toml::Table,
    #[serde(default)]
    roles: BTreeMap<String, RoleFile>,
    units: Option<UnitsFile>,
    disk: Option<DiskFile>,
    boot: Option<BootFile>,
    hygiene: Option<HygieneFile>,
    #[serde(default)]
    checks: Vec<Spanned<CheckFile>>,
    lxc: Option<bool>,
    validate: Option<ValidateFile>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct BaseFile {
    distribution: Option<Distribution>,
    suite: Option<String>,
    mirror: Option<Spanned<String>>,
    snapshot: Option<Spanned<String>>,
    architecture: Option<Spanned<String>>,
    components: Option<Vec<String>>,
    #[serde(default)]
    packages: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ArtifactFile {
    name: String,
    url: Spanned<String>,
    sha256: Option<Spanned<String>>,
    dest: Spanned<String>,
    mode: Option<Spanned<String>>,
    #[serde(default)]
    extract: bool,
    #[serde(default)]
    strip_components: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleFile {
    overlay: Option<Spanned<String>>,
    user_data: Option<Spanned<String>>,
    value_types: Option<Spanned<String>>,
    test_values: Option<Spanned<crate::image::values::RawTable>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct UnitsFile {
    #[serde(default)]
    enable: Vec<String>,
    #[serde(default)]
    disable: Vec<String>,
    #[serde(default)]
    mask: Vec<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DiskFile {
    size: Option<Spanned<String>>,
    filesystem: Option<Spanned<String>>,
    esp_size: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct BootFile {
    uefi: Option<bool>,
    secure_boot: Option<bool>,
    bios: Option<Spanned<bool>>,
    cmdline: Option<String>,
    initrd_modules: Option<InitrdModules>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct HygieneFile {
    #[serde(default)]
    allow_private_keys: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckFile {
    name: String,
    command: String,
    #[serde(default)]
    exit: i32,
    stdout: Option<Spanned<String>>,
    timeout: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ValidateFile {
    role: Option<Spanned<String>>,
}

const MAX_EXTENDS_DEPTH: usize = 8;

impl Recipe {
    /// Load a recipe file, resolving `extends` and validating every field.
    pub fn load(path: &Path) -> Result<Recipe> {
        let path = path.to_path_buf();
        let mut chain: Vec<(Source, RecipeFile)> = Vec::new();
        let mut next = Some(path.clone());
        while let Some(p) = next.take() {
            if chain.len() >= MAX_EXTENDS_DEPTH {
                anyhow::bail!(
                    "{}: `extends` chain is longer than {MAX_EXTENDS_DEPTH} (a cycle?)",
                    path.display()
                );
            }
            if chain.iter().any(|(s, _)| s.path == p) {
                anyhow::bail!(
                    "{}: `extends` cycle through {}",
                    path.display(),
                    p.display()
                );
            }
            let text = std::fs::read_to_string(&p)
                .with_context(|| format!("cannot read recipe {}", p.display()))?;
            let source = Source {
                path: p.clone(),
                text,
            };
            let file = parse_file(&source)?;
            if let Some(parent) = &file.extends {
                let dir = p.parent().unwrap_or(Path::new("."));
                let parent_path = dir.join(parent.get_ref());
                if !parent_path.is_file() {
                    return Err(source
                        .error_at(
                            parent.span(),
                            format!(
                                "`extends` names {}, which does not exist",
                                parent_path.display()
                            ),
                        )
                        .into());
                }
                next = Some(parent_path);
            }
            chain.push((source, file));
        }
        // Resolve from the root ancestor down to the leaf.
        chain.reverse();
        resolve(path, chain).map_err(Into::into)
    }

    /// The recipe's directory (role templates are found from here).
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// Directory of a named overlay.
    pub fn overlay_dir(&self, name: &str) -> PathBuf {
        self.root.join("overlays").join(name)
    }

    /// The lockfile path that belongs to this recipe: `RECIPE.lock`.
    pub fn lock_path(&self) -> PathBuf {
        lock_path_for(&self.path)
    }

    /// Every overlay the image gets, in order: the recipe's, then each role's.
    pub fn all_overlays(&self) -> Vec<String> {
        let mut all = self.overlays.clone();
        for role in self.roles.values() {
            if let Some(o) = &role.overlay {
                if !all.contains(o) {
                    all.push(o.clone());
                }
            }
        }
        all
    }

    /// Packages kiln installs in addition to the recipe's, because its boot
    /// path and per-role cloud-init depend on them.
    pub fn implied_packages(&self) -> Vec<String> {
        let mut pkgs = vec![
            format!("linux-image-{}", self.base.architecture),
            "initramfs-tools".to_string(),
            "systemd-sysv".to_string(),
            "cloud-init".to_string(),
            "cloud-guest-utils".to_string(),
        ];
        if self.boot.uefi {
            pkgs.push(format!("grub-efi-{}-signed", self.base.architecture));
            pkgs.push("shim-signed".to_string());
        }
        if self.boot.bios {
            pkgs.push("grub-pc-bin".to_string());
        }
        pkgs
    }

    /// Every package requested: implied ones first, then the recipe's, without repeats.
    pub fn requested_packages(&self) -> Vec<String> {
        let mut all = self.implied_packages();
        for p in &self.base.packages {
            if !all.contains(p) {
                all.push(p.clone());
            }
        }
        all
    }

    /// Digest of the resolved recipe (canonical JSON of every setting).
    /// File paths count relative to the project root, so the same recipe
    /// gives the same digest (and image) however its path was typed:
    /// `recipes/lb.toml` from the checkout, or an absolute path from an
    /// environment file.
    pub fn digest(&self) -> String {
        let mut r = self.clone();
        for role in r.roles.values_mut() {
            if let Some(p) = role.user_data.take() {
                role.user_data = Some(self.project_relative(&p));
            }
        }
        crate::util::sha256_hex(
            serde_json::to_string(&r)
                .expect("recipe serializes")
                .as_bytes(),
        )
    }

    /// `p` relative to the project root (as typed when either cannot be resolved).
    fn project_relative(&self, p: &Path) -> PathBuf {
        match (p.canonicalize(), self.root.canonicalize()) {
            (Ok(file), Ok(root)) => file
                .strip_prefix(&root)
                .map(Path::to_path_buf)
                .unwrap_or(file),
            _ => p.to_path_buf(),
        }
    }
}

/// `RECIPE.lock` beside `RECIPE.toml`.
pub(crate) fn lock_path_for(recipe: &Path) -> PathBuf {
    let mut s = recipe.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

fn parse_file(source: &Source) -> Result<RecipeFile, RecipeError> {
    source.parse_toml()
}

pub(crate) fn is_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Recipe and image names become file names, VM names and tags.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
}

fn is_version(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
        && s.as_bytes()[0].is_ascii_alphanumeric()
}

fn find_root(recipe: &Path) -> PathBuf {
    let abs = std::fs::canonicalize(recipe).unwrap_or_else(|_| recipe.to_path_buf());
    let mut dir = abs.parent();
    while let Some(d) = dir {
        if d.join("overlays").is_dir() {
            return d.to_path_buf();
        }
        dir = d.parent();
    }
    abs.parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Merge the chain (root ancestor first) into one validated recipe.
fn resolve(leaf: PathBuf, chain: Vec<(Source, RecipeFile)>) -> Result<Recipe, RecipeError> {
    let leaf_source = &chain.last().expect("at least the leaf").0;
    let missing = |what: &str| RecipeError {
        file: leaf_source.path.clone(),
        line: 1,
        column: 1,
        message: format!("missing required key `{what}`"),
    };

    let mut name = None;
    let mut version = None;
    let mut distribution = None;
    let mut suite = None;
    let mut mirror = None;
    let mut snapshot = None;
    let mut architecture = None;
    let mut components = None;
    let mut packages: Vec<String> = Vec::new();
    let mut artifacts: Vec<Artifact> = Vec::new();
    let mut images: Vec<ContainerImage> = Vec::new();
    let mut overlays: Vec<String> = Vec::new();
    let mut vars = toml::Table::new();
    let mut roles: BTreeMap<String, Role> = BTreeMap::new();
    let mut units = Units::default();
    let mut disk_size = None;
    let mut filesystem = None;
    let mut esp_size = None;
    let mut uefi = None;
    let mut secure_boot = None;
    let mut bios = None;
    let mut cmdline = None;
    let mut initrd_modules = None;
    let mut hygiene = Hygiene::default();
    let mut checks: Vec<CheckSpec> = Vec::new();
    let mut lxc = None;
    let mut validate_role: Option<(String, usize, std::ops::Range<usize>)> = None;
    // Where each role's user_data and value_types were set (chain index, span).
    let mut user_data_at = BTreeMap::new();
    let mut value_types_at = BTreeMap::new();
    let mut value_types_files: BTreeMap<String, PathBuf> = BTreeMap::new();

    let root = find_root(&leaf);
    for (idx, (src, file)) in chain.iter().enumerate() {
        if let Some(n) = &file.name {
            if !is_name(n.get_ref()) {
                return Err(src.error_at(n.span(), format!("name `{}` must be lowercase letters, digits and `-` (it becomes file, VM and tag names)", n.get_ref())));
            }
            name = Some(n.get_ref().clone());
        }
        if let Some(v) = &file.version {
            if !is_version(v.get_ref()) {
                return Err(src.error_at(
                    v.span(),
                    format!(
                        "version `{}` may hold only letters, digits and . _ + -",
                        v.get_ref()
                    ),
                ));
            }
            version = Some(v.get_ref().clone());
        }
        if let Some(b) = &file.base {
            distribution = b.distribution.or(distribution);
            suite = b.suite.clone().or(suite);
            if let Some(m) = &b.mirror {
                if !(m.get_ref().starts_with("http://")
                    || m.get_ref().starts_with("https://")
                    || m.get_ref().starts_with("file://"))
                {
                    return Err(src.error_at(
                        m.span(),
                        format!(
                            "mirror `{}` must be an http(s):// or file:// URL",
                            m.get_ref()
                        ),
                    ));
                }
                mirror = Some(m.get_ref().clone());
            }
            if let Some(s) = &b.snapshot {
                let ok = s.get_ref().len() == 16
                    && s.get_ref().ends_with('Z')
                    && s.get_ref().as_bytes()[8] == b'T';
                if !ok {
                    return Err(src.error_at(
                        s.span(),
                        format!("snapshot `{}` must look like 20250520T000000Z", s.get_ref()),
                    ));
                }
                snapshot = Some(s.get_ref().clone());
            }
            if let Some(a) = &b.architecture {
                if a.get_ref() != "amd64" {
                    return Err(src.error_at(
                        a.span(),
                        format!(
                            "architecture `{}` is not supported (kiln builds amd64 images)",
                            a.get_ref()
                        ),
                    ));
                }
                architecture = Some(a.get_ref().clone());
            }
            components = b.components.clone().or(components);
            for p in &b.packages {
                let ok = !p.get_ref().is_empty()
                    && p.get_ref()
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || b"+-.:=~".contains(&c));
                if !ok {
                    return Err(
                        src.error_at(p.span(), format!("`{}` is not a package name", p.get_ref()))
                    );
                }
                if !packages.contains(p.get_ref()) {
                    packages.push(p.get_ref().clone());
                }
            }
        }
        for a in &file.artifacts {
            let art = convert_artifact(src, a)?;
            artifacts.retain(|x| x.name != art.name);
            artifacts.push(art);
        }
        for i in &file.images {
            let reference = i.get_ref().trim().to_string();
            if reference.is_empty() || reference.contains(char::is_whitespace) {
                return Err(src.error_at(
                    i.span(),
                    format!("`{}` is not an image reference", i.get_ref()),
                ));
            }
            if !images.iter().any(|x| x.reference == reference) {
                images.push(ContainerImage { reference });
            }
        }
        for o in &file.overlays {
            check_overlay_name(src, o)?;
            if !root.join("overlays").join(o.get_ref()).is_dir() {
                return Err(src.error_at(
                    o.span(),
                    format!(
                        "overlay `{}` not found: expected a directory {}",
                        o.get_ref(),
                        root.join("overlays").join(o.get_ref()).display()
                    ),
                ));
            }
            if !overlays.contains(o.get_ref()) {
                overlays.push(o.get_ref().clone());
            }
        }
        for (k, v) in &file.vars {
            vars.insert(k.clone(), v.clone());
        }
        let dir = src.path.parent().unwrap_or(Path::new("."));
        for (role_name, r) in &file.roles {
            if !is_name(role_name) {
                return Err(src.error_at(
                    0..0,
                    format!("role name `{role_name}` must be lowercase letters, digits and `-`"),
                ));
            }
            let mut role = roles.remove(role_name).unwrap_or(Role {
                overlay: None,
                user_data: None,
                value_types: None,
                test_values: crate::image::values::Values::default(),
            });
            if let Some(o) = &r.overlay {
                check_overlay_name(src, o)?;
                if !root.join("overlays").join(o.get_ref()).is_dir() {
                    return Err(src.error_at(
                        o.span(),
                        format!(
                            "overlay `{}` of role `{role_name}` not found in {}",
                            o.get_ref(),
                            root.join("overlays").display()
                        ),
                    ));
                }
                role.overlay = Some(o.get_ref().clone());
            }
            if let Some(u) = &r.user_data {
                let p = dir.join(u.get_ref());
                if !p.is_file() {
                    return Err(src.error_at(
                        u.span(),
                        format!(
                            "user_data template {} of role `{role_name}` does not exist",
                            p.display()
                        ),
                    ));
                }
                role.user_data = Some(p);
                user_data_at.insert(role_name.clone(), (idx, u.span()));
            }
            if let Some(t) = &r.value_types {
                let p = dir.join(t.get_ref());
                if !p.is_file() {
                    return Err(src.error_at(
                        t.span(),
                        format!(
                            "value_types file {} of role `{role_name}` does not exist",
                            p.display()
                        ),
                    ));
                }
                role.value_types = Some(ValueTypes::load(&p).map_err(value_error)?);
                value_types_files.insert(role_name.clone(), p);
                value_types_at.insert(role_name.clone(), (idx, t.span()));
            }
            if let Some(t) = &r.test_values {
                for (k, node) in t.get_ref().locate(&src.path, &src.text) {
                    role.test_values.set(&k, node);
                }
                role.test_values.origin = src.pos(t.span());
            }
            roles.insert(role_name.clone(), role);
        }
        if let Some(u) = &file.units {
            extend_unique(&mut units.enable, &u.enable);
            extend_unique(&mut units.disable, &u.disable);
            extend_unique(&mut units.mask, &u.mask);
        }
        if let Some(d) = &file.disk {
            if let Some(s) = &d.size {
                disk_size = Some(
                    crate::util::parse_size(s.get_ref())
                        .map_err(|m| src.error_at(s.span(), format!("disk.size: {m}")))?,
                );
            }
            if let Some(f) = &d.filesystem {
                if f.get_ref() != "ext4" {
                    return Err(src.error_at(
                        f.span(),
                        format!(
                            "disk.filesystem `{}` is not supported (use ext4)",
                            f.get_ref()
                        ),
                    ));
                }
                filesystem = Some(f.get_ref().clone());
            }
            if let Some(s) = &d.esp_size {
                esp_size = Some(
                    crate::util::parse_size(s.get_ref())
                        .map_err(|m| src.error_at(s.span(), format!("disk.esp_size: {m}")))?,
                );
            }
        }
        if let Some(b) = &file.boot {
            uefi = b.uefi.or(uefi);
            secure_boot = b.secure_boot.or(secure_boot);
            if let Some(bb) = &b.bios {
                bios = Some((*bb.get_ref(), idx, bb.span()));
            }
            cmdline = b.cmdline.clone().or(cmdline);
            initrd_modules = b.initrd_modules.or(initrd_modules);
        }
        if let Some(h) = &file.hygiene {
            extend_unique(&mut hygiene.allow_private_keys, &h.allow_private_keys);
        }
        for c in &file.checks {
            let cf = c.get_ref();
            if let Some(re) = &cf.stdout {
                if let Err(e) = regex_lite_check(re.get_ref()) {
                    return Err(src.error_at(
                        re.span(),
                        format!("check `{}`: stdout pattern: {e}", cf.name),
                    ));
                }
            }
            checks.retain(|x| x.name != cf.name);
            checks.push(CheckSpec {
                name: cf.name.clone(),
                command: cf.command.clone(),
                exit: cf.exit,
                stdout: cf.stdout.as_ref().map(|s| s.get_ref().clone()),
                timeout: cf.timeout.unwrap_or(60),
            });
        }
        lxc = file.lxc.or(lxc);
        if let Some(v) = &file.validate {
            if let Some(r) = &v.role {
                validate_role = Some((r.get_ref().clone(), idx, r.span()));
            }
        }
    }

    let uefi = uefi.unwrap_or(true);
    let secure_boot = secure_boot.unwrap_or(uefi);
    if secure_boot && !uefi {
        return Err(missing_or(
            leaf_source,
            "boot.secure_boot needs boot.uefi = true",
        ));
    }
    if let (Some((true, idx, span)), false) = (&bios, uefi) {
        return Err(chain[*idx].0.error_at(
            span.clone(),
            "boot.bios adds BIOS boot beside UEFI on the same (hybrid) disk: it needs boot.uefi = true",
        ));
    }
    if let Some((role, idx, span)) = &validate_role {
        if !roles.contains_key(role) {
            let names: Vec<&str> = roles.keys().map(String::as_str).collect();
            let hint = did_you_mean(role, &names)
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default();
            return Err(chain[*idx].0.error_at(
                span.clone(),
                format!("validate.role `{role}` is not a role of this recipe{hint}"),
            ));
        }
    }
    // Every value a template takes has a declared type, and the test values
    // that will be rendered (the validate role's, and any given) are of it.
    let rendered_role = validate_role
        .as_ref()
        .map(|(r, _, _)| r.clone())
        .or_else(|| roles.keys().next().cloned());
    for (name, role) in roles.iter_mut() {
        let user_data = user_data_at
            .get(name)
            .map(|(i, s)| (&chain[*i].0, s.clone()));
        if role.test_values.origin.file.as_os_str().is_empty() {
            role.test_values.origin = match &user_data {
                Some((src, span)) => src.pos(span.clone()),
                None => leaf_source.pos(0..0),
            };
        }
        match (&user_data, &role.value_types) {
            (Some((src, span)), None) => {
                return Err(src.error_at(
                    span.clone(),
                    format!("role `{name}`: user_data needs `value_types`, a file declaring the type of each value the template takes (see README, Per-node cloud-init)"),
                ));
            }
            (None, Some(_)) => {
                let (i, span) = &value_types_at[name];
                return Err(chain[*i].0.error_at(
                    span.clone(),
                    format!("role `{name}`: value_types without a user_data template"),
                ));
            }
            (Some(_), Some(types))
                if !role.test_values.is_empty() || rendered_role.as_deref() == Some(name) =>
            {
                types.check(&role.test_values).map_err(|e| {
                    value_error(crate::image::values::ValueError {
                        message: format!("role `{name}` test_values: {}", e.message),
                        ..e
                    })
                })?;
            }
            _ => {}
        }
    }
    let distribution = distribution.unwrap_or(Distribution::Debian);
    let default_mirror = match distribution {
        Distribution::Debian => "http://deb.debian.org/debian",
        Distribution::Ubuntu => "http://archive.ubuntu.com/ubuntu",
    };
    let recipe = Recipe {
        path: leaf.clone(),
        root,
        name: name.ok_or_else(|| missing("name"))?,
        version: version.ok_or_else(|| missing("version"))?,
        base: Base {
            distribution,
            suite: suite.ok_or_else(|| missing("base.suite"))?,
            mirror: mirror.unwrap_or_else(|| default_mirror.to_string()),
            snapshot,
            architecture: architecture.unwrap_or_else(|| "amd64".to_string()),
            components: components.unwrap_or_else(|| vec!["main".to_string()]),
            packages,
        },
        artifacts,
        images,
        overlays,
        vars,
        validate_role: validate_role
            .map(|(r, _, _)| r)
            .or_else(|| roles.keys().next().cloned()),
        roles,
        units,
        disk: Disk {
            size: disk_size.unwrap_or(4 << 30),
            filesystem: filesystem.unwrap_or_else(|| "ext4".to_string()),
            esp_size: esp_size.unwrap_or(64 << 20),
        },
        boot: Boot {
            uefi,
            secure_boot,
            bios: bios.map(|(b, _, _)| b).unwrap_or(false),
            cmdline: cmdline.unwrap_or_default(),
            initrd_modules: initrd_modules.unwrap_or_default(),
        },
        hygiene,
        checks,
        lxc: lxc.unwrap_or(false),
        sources: Vec::new(),
    };
    // The leaf first, its ancestors, then the files of the roles as merged.
    let mut sources: Vec<PathBuf> = chain.iter().rev().map(|(s, _)| s.path.clone()).collect();
    for (name, role) in &recipe.roles {
        for p in role.user_data.iter().chain(value_types_files.get(name)) {
            if !sources.contains(p) {
                sources.push(p.clone());
            }
        }
    }
    Ok(Recipe { sources, ..recipe })
}

/// A value or value-types problem as a recipe error (same file:line:col form).
fn value_error(e: crate::image::values::ValueError) -> RecipeError {
    let (line, column) = e.at.line_col.unwrap_or((1, 1));
    RecipeError {
        file: e.at.file,
        line,
        column,
        message: e.message,
    }
}

fn missing_or(src: &Source, msg: &str) -> RecipeError {
    RecipeError {
        file: src.path.clone(),
        line: 1,
        column: 1,
        message: msg.to_string(),
    }
}

fn extend_unique(into: &mut Vec<String>, from: &[String]) {
    for x in from {
        if !into.contains(x) {
            into.push(x.clone());
        }
    }
}

fn check_overlay_name(src: &Source, o: &Spanned<String>) -> Result<(), RecipeError> {
    let n = o.get_ref();
    if n.is_empty() || n.contains('/') || n.starts_with('.') {
        return Err(src.error_at(
            o.span(),
            format!("overlay `{n}` must be the name of a directory directly under overlays/"),
        ));
    }
    Ok(())
}

fn convert_artifact(src: &Source, a: &Spanned<ArtifactFile>) -> Result<Artifact, RecipeError> {
    let f = a.get_ref();
    if !is_name(&f.name) {
        return Err(src.error_at(
            a.span(),
            format!(
                "artifact name `{}` must be lowercase letters, digits and `-`",
                f.name
            ),
        ));
    }
    let url = f.url.get_ref();
    if !(url.starts_with("https://") || url.starts_with("http://") || url.starts_with("file://")) {
        return Err(src.error_at(
            f.url.span(),
            format!(
                "artifact `{}`: url `{url}` must be http(s):// or file://",
                f.name
            ),
        ));
    }
    let sha256 = match &f.sha256 {
        Some(s) if !is_sha256(s.get_ref()) => {
            return Err(src.error_at(
                s.span(),
                format!(
                    "artifact `{}`: sha256 `{}` is not 64 lowercase hex digits",
                    f.name,
                    s.get_ref()
                ),
            ));
        }
        Some(s) => Some(s.get_ref().clone()),
        None => None,
    };
    let dest = f.dest.get_ref();
    if let Err(why) = crate::image::contract::check_image_path(dest) {
        return Err(src.error_at(f.dest.span(), format!("artifact `{}`: dest: {why}", f.name)));
    }
    let mode = match &f.mode {
        Some(m) => u32::from_str_radix(m.get_ref().trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| {
                src.error_at(
                    m.span(),
                    format!(
                        "artifact `{}`: mode `{}` is not an octal mode like \"0755\"",
                        f.name,
                        m.get_ref()
                    ),
                )
            })?,
        None => 0o644,
    };
    Ok(Artifact {
        name: f.name.clone(),
        url: url.clone(),
        sha256,
        dest: dest.clone(),
        mode,
        extract: f.extract,
        strip_components: f.strip_components,
    })
}

/// Recipe check patterns are regular expressions; reject ones that cannot compile.
fn regex_lite_check(pattern: &str) -> Result<(), String> {
    regex::Regex::new(pattern).map(|_| ()).map_err(|e| {
        e.to_string()
            .lines()
            .last()
            .unwrap_or("invalid")
            .trim()
            .to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn project(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("overlays/common")).unwrap();
        std::fs::create_dir_all(dir.path().join("recipes")).unwrap();
        for (p, text) in files {
            let path = dir.path().join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        dir
    }

    const MINIMAL: &str = "name = \"tiny\"\nversion = \"1.0\"\n[base]\nsuite = \"bookworm\"\n";

    fn load_err(dir: &tempfile::TempDir, file: &str) -> String {
        Recipe::load(&dir.path().join(file))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn minimal_recipe_gets_safe_defaults() {
        let dir = project(&[("recipes/tiny.toml", MINIMAL)]);
        let r = Recipe::load(&dir.path().join("recipes/tiny.toml")).unwrap();
        assert_eq!(r.name, "tiny");
        assert_eq!(r.base.mirror, "http://deb.debian.org/debian");
        assert!(r.boot.uefi && r.boot.secure_boot);
        assert_eq!(r.disk.size, 4 << 30);
        assert_eq!(r.root, std::fs::canonicalize(dir.path()).unwrap());
    }

    #[test]
    fn bios_boot_is_accepted_and_adds_grub_pc_bin() {
        let text = format!("{MINIMAL}[boot]\nbios = true\n");
        let dir = project(&[("recipes/tiny.toml", &text)]);
        let r = Recipe::load(&dir.path().join("recipes/tiny.toml")).unwrap();
        assert!(r.boot.bios && r.boot.uefi && r.boot.secure_boot);
        assert!(r.implied_packages().contains(&"grub-pc-bin".to_string()));
    }

    #[test]
    fn bios_boot_is_inherited_from_a_parent_recipe() {
        let parent = "version = \"1\"\n[base]\nsuite = \"bookworm\"\n[boot]\nbios = true\n";
        let child = "extends = \"parent.toml\"\nname = \"c\"\n";
        let dir = project(&[("recipes/parent.toml", parent), ("recipes/c.toml", child)]);
        assert!(
            Recipe::load(&dir.path().join("recipes/c.toml"))
                .unwrap()
                .boot
                .bios
        );
    }

    #[test]
    fn bios_boot_without_uefi_is_refused_at_its_key() {
        let text = format!("{MINIMAL}[boot]\nuefi = false\nsecure_boot = false\nbios = true\n");
        let dir = project(&[("recipes/tiny.toml", &text)]);
        let msg = load_err(&dir, "recipes/tiny.toml");
        assert!(msg.contains("tiny.toml:8:"), "{msg}");
        assert!(msg.contains("needs boot.uefi = true"), "{msg}");
    }

    #[test]
    fn misspelt_key_names_file_line_and_suggestion() {
        let text =
            "name = \"tiny\"\nversion = \"1\"\n[base]\nsuite = \"bookworm\"\npakages = [\"vim\"]\n";
        let dir = project(&[("recipes/tiny.toml", text)]);
        let msg = load_err(&dir, "recipes/tiny.toml");
        assert!(msg.contains("tiny.toml:5:1"), "{msg}");
        assert!(msg.contains("unknown key `pakages`"), "{msg}");
        assert!(msg.contains("did you mean `packages`?"), "{msg}");
    }

    #[test]
    fn malformed_toml_points_at_the_line() {
        let dir = project(&[("recipes/bad.toml", "name = \"x\"\nversion = \n")]);
        let msg = load_err(&dir, "recipes/bad.toml");
        assert!(msg.contains("bad.toml:2:"), "{msg}");
    }

    #[test]
    fn bad_sha256_is_located() {
        let text = format!("{MINIMAL}[[artifacts]]\nname = \"k3s\"\nurl = \"https://example.invalid/k3s\"\nsha256 = \"abc\"\ndest = \"/usr/local/bin/k3s\"\n");
        let dir = project(&[("recipes/tiny.toml", &text)]);
        let msg = load_err(&dir, "recipes/tiny.toml");
        assert!(msg.contains("tiny.toml:8:10"), "{msg}");
        assert!(msg.contains("not 64 lowercase hex"), "{msg}");
    }

    #[test]
    fn artifact_dest_escaping_the_root_is_refused() {
        let text = format!("{MINIMAL}[[artifacts]]\nname = \"x\"\nurl = \"https://example.invalid/x\"\ndest = \"/usr/../../etc/x\"\n");
        let dir = project(&[("recipes/tiny.toml", &text)]);
        let msg = load_err(&dir, "recipes/tiny.toml");
        assert!(msg.contains("`..`"), "{msg}");
    }

    #[test]
    fn extends_merges_parent_settings_with_child_overrides() {
        let base = "version = \"1\"\n[base]\nsuite = \"bookworm\"\npackages = [\"openssh-server\"]\n[disk]\nsize = \"2G\"\n";
        let child = "extends = \"base.toml\"\nname = \"lb\"\nversion = \"2\"\n[base]\npackages = [\"haproxy\"]\n";
        let dir = project(&[("recipes/base.toml", base), ("recipes/lb.toml", child)]);
        let r = Recipe::load(&dir.path().join("recipes/lb.toml")).unwrap();
        assert_eq!(r.version, "2");
        assert_eq!(r.base.packages, vec!["openssh-server", "haproxy"]);
        assert_eq!(r.disk.size, 2 << 30);
    }

    #[test]
    fn extends_cycle_is_an_error() {
        let a = "extends = \"b.toml\"\nname = \"a\"\n";
        let b = "extends = \"a.toml\"\n";
        let dir = project(&[("recipes/a.toml", a), ("recipes/b.toml", b)]);
        let msg = load_err(&dir, "recipes/a.toml");
        assert!(msg.contains("cycle"), "{msg}");
    }

    #[test]
    fn missing_overlay_directory_is_named() {
        let text = format!("overlays = [\"nope\"]\n{MINIMAL}");
        let dir = project(&[("recipes/tiny.toml", &text)]);
        let msg = load_err(&dir, "recipes/tiny.toml");
        assert!(
            msg.contains("tiny.toml:1:") && msg.contains("overlay `nope` not found"),
            "{msg}"
        );
    }

    #[test]
    fn missing_name_is_reported() {
        let dir = project(&[(
            "recipes/tiny.toml",
            "version = \"1\"\n[base]\nsuite = \"bookworm\"\n",
        )]);
        assert!(load_err(&dir, "recipes/tiny.toml").contains("missing required key `name`"));
    }

    #[test]
    fn unknown_validate_role_suggests_the_real_one() {
        let text = format!("{MINIMAL}[roles.lb]\n[validate]\nrole = \"lbb\"\n");
        let dir = project(&[("recipes/tiny.toml", &text)]);
        let msg = load_err(&dir, "recipes/tiny.toml");
        assert!(msg.contains("did you mean `lb`?"), "{msg}");
    }

    const ROLE: &str =
        "[roles.lb]\nuser_data = \"roles/lb.yaml.tera\"\nvalue_types = \"roles/lb.types.toml\"\n";

    fn role_project(recipe_tail: &str) -> tempfile::TempDir {
        let text = format!("{MINIMAL}{recipe_tail}");
        project(&[
            ("recipes/tiny.toml", &text),
            ("recipes/roles/lb.yaml.tera", "#cloud-config\n"),
            (
                "recipes/roles/lb.types.toml",
                "node_ip = \"ip\"\npeers = \"[ip]?\"\n",
            ),
        ])
    }

    #[test]
    fn role_template_without_value_types_is_refused_at_its_user_data() {
        let dir = role_project("[roles.lb]\nuser_data = \"roles/lb.yaml.tera\"\n");
        let msg = load_err(&dir, "recipes/tiny.toml");
        assert!(msg.contains("tiny.toml:6:13:"), "{msg}");
        assert!(msg.contains("user_data needs `value_types`"), "{msg}");
    }

    #[test]
    fn test_values_not_of_their_type_are_refused_at_their_line() {
        let dir = role_project(&format!(
            "{ROLE}[roles.lb.test_values]\nnode_ip = \"10.0.2.15\"\npeers = [\"10.0.2.16\\n  - evil\"]\n"
        ));
        let msg = load_err(&dir, "recipes/tiny.toml");
        assert!(msg.contains("tiny.toml:10:10:"), "{msg}");
        assert!(
            msg.contains("role `lb` test_values: value `peers[0]`"),
            "{msg}"
        );
    }

    #[test]
    fn validate_role_without_its_test_values_is_refused_naming_them() {
        let dir = role_project(ROLE);
        let msg = load_err(&dir, "recipes/tiny.toml");
        assert!(msg.contains("tiny.toml:6:"), "{msg}");
        assert!(msg.contains("missing value `node_ip`"), "{msg}");
    }

    #[test]
    fn value_types_without_a_template_are_refused_at_their_line() {
        let dir = role_project("[roles.lb]\nvalue_types = \"roles/lb.types.toml\"\n");
        let msg = load_err(&dir, "recipes/tiny.toml");
        assert!(msg.contains("tiny.toml:6:15:"), "{msg}");
        assert!(
            msg.contains("value_types without a user_data template"),
            "{msg}"
        );
    }

    #[test]
    fn value_types_file_mistakes_are_located_in_it() {
        let dir = role_project(ROLE);
        std::fs::write(
            dir.path().join("recipes/roles/lb.types.toml"),
            "node_ip = \"ip\"\npeers = \"[ipp]\"\n",
        )
        .unwrap();
        let msg = load_err(&dir, "recipes/tiny.toml");
        assert!(msg.contains("lb.types.toml:2:9:"), "{msg}");
        assert!(msg.contains("unknown value type `ipp`"), "{msg}");
    }

    #[test]
    fn the_digest_is_the_same_whether_the_recipe_path_is_relative_or_absolute() {
        // Unit tests run in the package root, where `recipes/` is.
        let relative = Recipe::load(Path::new("recipes/lb.toml")).unwrap();
        let absolute =
            Recipe::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/lb.toml")).unwrap();
        assert_ne!(
            relative.roles["lb"].user_data, absolute.roles["lb"].user_data,
            "the paths differ as typed"
        );
        assert_eq!(relative.digest(), absolute.digest());
    }

    #[test]
    fn digest_changes_with_any_setting() {
        let dir = project(&[("recipes/tiny.toml", MINIMAL)]);
        let a = Recipe::load(&dir.path().join("recipes/tiny.toml")).unwrap();
        let mut b = a.clone();
        b.vars.insert("x".into(), toml::Value::Integer(1));
        assert_ne!(a.digest(), b.digest());
    }
}
