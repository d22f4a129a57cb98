//! What kiln itself writes into every image: identity reset, fstab,
//! cloud-init config, immutability masks, and units enabled as `systemctl enable` would.

use anyhow::{bail, Context, Result};

use super::{AddKind, Addition, BaseInfo, Content};
use crate::image::recipe::Recipe;

/// Unit files compose must capture from the base to enable the recipe's units.
pub(crate) fn unit_paths(recipe: &Recipe) -> Vec<String> {
    recipe
        .units
        .enable
        .iter()
        .flat_map(|u| {
            [
                "usr/lib/systemd/system/",
                "lib/systemd/system/",
                "etc/systemd/system/",
            ]
            .map(|d| format!("{d}{u}"))
        })
        .collect()
}

fn file(path: &str, text: String, origin: &str) -> Addition {
    Addition {
        path: path.to_string(),
        kind: AddKind::File {
            content: Content::Bytes(text.into_bytes()),
            mode: 0o644,
        },
        origin: origin.to_string(),
    }
}

fn mask(unit: &str) -> Addition {
    Addition {
        path: format!("/etc/systemd/system/{unit}"),
        kind: AddKind::Symlink {
            target: "/dev/null".into(),
        },
        origin: format!("kiln: mask {unit}"),
    }
}

/// Files kiln writes into every image: identity reset, fstab, cloud-init
/// config, and immutability (no apt timers, no unattended upgrades).
pub(crate) fn kiln_defaults(recipe: &Recipe, root_fs_uuid: &str, info: &BaseInfo) -> Vec<Addition> {
    let origin = "kiln defaults";
    let mut v = vec![
        file("/etc/machine-id", String::new(), origin),
        file("/etc/fstab", format!("# Written by kiln.\nUUID={} / ext4 errors=remount-ro 0 1\n", root_fs_uuid), origin),
        file(crate::image::cloudinit::IMAGE_CONFIG_PATH, crate::image::cloudinit::image_config(), origin),
        file("/etc/default/locale", "LANG=C.UTF-8\n".into(), origin),
        file(
            "/etc/apt/apt.conf.d/20auto-upgrades",
            "// Written by kiln: nodes are replaced, never upgraded in place.\nAPT::Periodic::Update-Package-Lists \"0\";\nAPT::Periodic::Unattended-Upgrade \"0\";\n".into(),
            origin,
        ),
        file(
            "/etc/kiln-release",
            format!("KILN_IMAGE_NAME={}\nKILN_IMAGE_VERSION={}\nKILN_RECIPE_DIGEST={}\n", recipe.name, recipe.version, recipe.digest()),
            origin,
        ),
        mask("apt-daily.timer"),
        mask("apt-daily-upgrade.timer"),
    ];
    for u in ["unattended-upgrades.service"] {
        if ["usr/lib/systemd/system/", "lib/systemd/system/"]
            .iter()
            .any(|d| info.index.nodes.contains_key(&format!("{d}{u}")))
        {
            v.push(mask(u));
        }
    }
    for u in &recipe.units.mask {
        v.push(mask(u));
    }
    v
}

/// `[Install]` targets of a unit file: (WantedBy, RequiredBy).
fn install_targets(text: &str) -> Vec<(String, &'static str)> {
    let mut in_install = false;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_install = line == "[Install]";
            continue;
        }
        if !in_install {
            continue;
        }
        for (key, kind) in [("WantedBy=", "wants"), ("RequiredBy=", "requires")] {
            if let Some(v) = line.strip_prefix(key) {
                out.extend(v.split_whitespace().map(|t| (t.to_string(), kind)));
            }
        }
    }
    out
}

/// Enable units as `systemctl enable` would (symlinks in `*.wants`), and
/// disable ones the recipe names, without running anything in the image.
pub(crate) fn unit_additions(
    recipe: &Recipe,
    info: &BaseInfo,
    added: &[Addition],
) -> Result<Vec<Addition>> {
    let mut out = Vec::new();
    for unit in &recipe.units.enable {
        let from_overlay = added.iter().find_map(|a| match &a.kind {
            AddKind::File { content, .. }
                if a.path.ends_with(&format!("/systemd/system/{unit}")) =>
            {
                Some((a.path.clone(), content.clone()))
            }
            _ => None,
        });
        let (unit_path, text) = match from_overlay {
            Some((p, Content::Bytes(b))) => (p, String::from_utf8_lossy(&b).into_owned()),
            Some((p, Content::Path { path, .. })) => (p, std::fs::read_to_string(path)?),
            None => {
                let found = [
                    "etc/systemd/system/",
                    "usr/lib/systemd/system/",
                    "lib/systemd/system/",
                ]
                .iter()
                .find_map(|d| {
                    let p = format!("{d}{unit}");
                    info.captured
                        .get(&p)
                        .map(|b| (format!("/{p}"), String::from_utf8_lossy(b).into_owned()))
                });
                found.with_context(|| format!("[units] enable: unit `{unit}` is not in the image (install its package or add it in an overlay)"))?
            }
        };
        let targets = install_targets(&text);
        if targets.is_empty() {
            bail!("[units] enable: `{unit}` has no [Install] WantedBy= or RequiredBy=, so it cannot be enabled");
        }
        for (target, kind) in targets {
            out.push(Addition {
                path: format!("/etc/systemd/system/{target}.{kind}/{unit}"),
                kind: AddKind::Symlink {
                    target: unit_path.clone(),
                },
                origin: format!("[units] enable {unit}"),
            });
        }
    }
    Ok(out)
}

/// Whether a base entry is a `*.wants`/`*.requires` link to a disabled unit.
pub(crate) fn is_disabled_link(recipe: &Recipe, path: &str) -> bool {
    path.starts_with("etc/systemd/system/")
        && (path.contains(".wants/") || path.contains(".requires/"))
        && recipe
            .units
            .disable
            .iter()
            .any(|u| path.ends_with(&format!("/{u}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_section_targets_are_read() {
        let t = install_targets("[Unit]\nWantedBy=nope\n[Install]\nWantedBy=multi-user.target sockets.target\nRequiredBy=x.target\n");
        assert_eq!(
            t,
            vec![
                ("multi-user.target".into(), "wants"),
                ("sockets.target".into(), "wants"),
                ("x.target".into(), "requires")
            ]
        );
    }
}
