//! Cloud-init: the image-wide configuration kiln bakes in (NoCloud and
//! ConfigDrive datasources, no package upgrades) and per-node user-data
//! rendered from a role's template (secrets appear only there, never in images).

use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;

use crate::image::recipe::Recipe;

/// `/etc/cloud/cloud.cfg.d/90-kiln.cfg`: what every kiln image's cloud-init does.
pub const IMAGE_CONFIG_PATH: &str = "/etc/cloud/cloud.cfg.d/90-kiln.cfg";

pub fn image_config() -> String {
    "# Written by kiln. Nodes are immutable images: nothing is upgraded at boot.\n\
     # Proxmox's cloud-init drive is NoCloud (or ConfigDrive for some setups).\n\
     datasource_list: [ NoCloud, ConfigDrive, None ]\n\
     package_update: false\n\
     package_upgrade: false\n\
     package_reboot_if_required: false\n\
     apt:\n  preserve_sources_list: true\n\
     # Grow the root partition and filesystem to the VM's disk.\n\
     growpart:\n  mode: auto\n  devices: ['/']\n\
     resize_rootfs: true\n\
     # Host keys are never shipped; each clone generates its own.\n\
     ssh_deletekeys: true\n\
     ssh_genkeytypes: [ed25519, ecdsa, rsa]\n\
     ssh_pwauth: false\n\
     disable_root: true\n\
     # Only the modules an immutable node uses: no package installs, snaps,\n\
     # configuration-management agents or keyboard/locale generation at boot.\n\
     # (Each module is Python work on every first boot.)\n\
     cloud_init_modules: [migrator, seed_random, bootcmd, write-files, growpart, resizefs,\n\
       disk_setup, mounts, set_hostname, update_hostname, update_etc_hosts, ca-certs,\n\
       users-groups, ssh]\n\
     cloud_config_modules: [set-passwords, ntp, timezone, runcmd]\n\
     cloud_final_modules: [write-files-deferred, scripts-vendor, scripts-per-once,\n\
       scripts-per-boot, scripts-per-instance, scripts-user, ssh-authkey-fingerprints,\n\
       keys-to-console, final-message, power-state-change]\n"
        .to_string()
}

/// Values for rendering a role: the recipe's vars, overridden by `values`.
pub fn context(recipe: &Recipe, role: &str, values: &toml::Table) -> Result<tera::Context> {
    let mut merged = recipe.vars.clone();
    for (k, v) in values {
        merged.insert(k.clone(), v.clone());
    }
    let mut ctx = tera::Context::from_serialize(&merged).context("role values must be a table")?;
    ctx.insert(
        "recipe",
        &serde_json::json!({ "name": recipe.name, "version": recipe.version }),
    );
    ctx.insert("role", role);
    Ok(ctx)
}

/// Read a values file (TOML, or JSON when it ends in `.json`).
pub fn load_values(path: &Path) -> Result<toml::Table> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read values file {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "json") {
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}:{}:{}: {e}", path.display(), e.line(), e.column()))?;
        let t: toml::Table = serde_json::from_value(v)
            .with_context(|| format!("{}: values must be a JSON object", path.display()))?;
        return Ok(t);
    }
    toml::from_str(&text).map_err(|e| {
        let start = e.span().map(|s| s.start).unwrap_or(0);
        let before = &text[..start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        anyhow::anyhow!("{}:{line}: {}", path.display(), e.message().trim())
    })
}

/// Render a role's user-data for one node.
pub fn render(recipe: &Recipe, role: &str, values: &toml::Table) -> Result<String> {
    let Some(r) = recipe.roles.get(role) else {
        let names: Vec<&str> = recipe.roles.keys().map(String::as_str).collect();
        let hint = crate::image::recipe::did_you_mean(role, &names)
            .map(|s| format!(" (did you mean `{s}`?)"))
            .unwrap_or_else(|| format!(" (roles: {})", names.join(", ")));
        bail!("{} has no role `{role}`{hint}", recipe.path.display());
    };
    let Some(tpl) = &r.user_data else {
        bail!(
            "role `{role}` in {} has no user_data template",
            recipe.path.display()
        );
    };
    let text =
        std::fs::read_to_string(tpl).with_context(|| format!("cannot read {}", tpl.display()))?;
    let ctx = context(recipe, role, values)?;
    let out =
        render_template(&text, &ctx).map_err(|e| anyhow::anyhow!("{}: {e}", tpl.display()))?;
    let first = out.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    if !(first.starts_with("#cloud-config")
        || first.starts_with("#!")
        || first.starts_with("Content-Type:"))
    {
        bail!(
            "{}: rendered user-data must start with `#cloud-config` (it starts with `{}`)",
            tpl.display(),
            first.chars().take(40).collect::<String>()
        );
    }
    Ok(out)
}

/// Render a Tera template; errors carry Tera's whole explanation on one line.
pub fn render_template(text: &str, ctx: &tera::Context) -> Result<String> {
    tera::Tera::one_off(text, ctx, false).map_err(|e| {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        anyhow!(
            "template error: {}",
            msg.replace('\n', " ")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe_with_role(tpl: &str) -> (tempfile::TempDir, Recipe) {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("overlays")).unwrap();
        std::fs::create_dir_all(d.path().join("recipes/roles")).unwrap();
        std::fs::write(d.path().join("recipes/roles/lb.yaml.tera"), tpl).unwrap();
        let p = d.path().join("recipes/r.toml");
        std::fs::write(&p, "name = \"r\"\nversion = \"1\"\n[base]\nsuite = \"bookworm\"\n[vars]\nport = 6443\n[roles.lb]\nuser_data = \"roles/lb.yaml.tera\"\n").unwrap();
        let r = Recipe::load(&p).unwrap();
        (d, r)
    }

    #[test]
    fn values_override_vars_when_rendering() {
        let (_d, r) = recipe_with_role(
            "#cloud-config\nvip: {{ vip }}\nport: {{ port }}\nimage: {{ recipe.name }}\n",
        );
        let values: toml::Table = toml::from_str("vip = \"192.0.2.10\"\nport = 7443\n").unwrap();
        let out = render(&r, "lb", &values).unwrap();
        assert!(
            out.contains("vip: 192.0.2.10\nport: 7443\nimage: r"),
            "{out}"
        );
    }

    #[test]
    fn missing_value_names_the_variable_and_template() {
        let (_d, r) = recipe_with_role("#cloud-config\nvip: {{ vip }}\n");
        let err = render(&r, "lb", &toml::Table::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("lb.yaml.tera") && err.contains("vip"), "{err}");
    }

    #[test]
    fn unknown_role_suggests_a_known_one() {
        let (_d, r) = recipe_with_role("#cloud-config\n");
        let err = render(&r, "lbb", &toml::Table::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("did you mean `lb`?"), "{err}");
    }

    #[test]
    fn user_data_must_be_cloud_config() {
        let (_d, r) = recipe_with_role("users: []\n");
        let err = render(&r, "lb", &toml::Table::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("#cloud-config"), "{err}");
    }
}
