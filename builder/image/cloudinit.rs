//! Cloud-init: the image-wide configuration kiln bakes in (NoCloud and
//! ConfigDrive datasources, no package upgrades) and per-node user-data
//! rendered from a role's template (secrets appear only there, never in images).

use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;

use crate::image::recipe::Recipe;
use crate::image::values::Values;

/// `/etc/cloud/cloud.cfg.d/90-kiln.cfg`: what every kiln image's cloud-init does.
pub(crate) const IMAGE_CONFIG_PATH: &str = "/etc/cloud/cloud.cfg.d/90-kiln.cfg";

pub(crate) fn image_config() -> String {
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
pub(crate) fn context(recipe: &Recipe, role: &str, values: &toml::Table) -> Result<tera::Context> {
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

/// Read a values file (TOML, or JSON when it ends in `.json`), keeping where
/// each value was written.
pub(crate) fn load_values(path: &Path) -> Result<Values> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read values file {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "json") {
        Values::parse_json(&text, path)
    } else {
        Values::parse_toml(&text, path)
    }
}

/// Render a role's user-data for one node. The values are checked against
/// the role's `value_types` first; the template quotes each one for its
/// target format with the filters of [`crate::image::values::register_filters`].
pub(crate) fn render(recipe: &Recipe, role: &str, values: &Values) -> Result<String> {
    let Some(r) = recipe.roles.get(role) else {
        let names: Vec<&str> = recipe.roles.keys().map(String::as_str).collect();
        let hint = crate::util::diagnostics::did_you_mean(role, &names)
            .map(|s| format!(" (did you mean `{s}`?)"))
            .unwrap_or_else(|| format!(" (roles: {})", names.join(", ")));
        bail!("{} has no role `{role}`{hint}", recipe.path.display());
    };
    let (Some(tpl), Some(types)) = (&r.user_data, &r.value_types) else {
        bail!(
            "role `{role}` in {} has no user_data template with value_types",
            recipe.path.display()
        );
    };
    types.check(values)?;
    let text =
        std::fs::read_to_string(tpl).with_context(|| format!("cannot read {}", tpl.display()))?;
    let ctx = context(recipe, role, &values.to_table())?;
    let mut tera = tera::Tera::default();
    crate::image::values::register_filters(&mut tera);
    let out = tera
        .render_str(&text, &ctx)
        .map_err(|e| anyhow::anyhow!("{}: {}", tpl.display(), template_error(e)))?;
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
pub(crate) fn render_template(text: &str, ctx: &tera::Context) -> Result<String> {
    tera::Tera::one_off(text, ctx, false).map_err(template_error)
}

/// A Tera error with its causes, on one line.
pub(crate) fn template_error(e: tera::Error) -> anyhow::Error {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe_with_role(tpl: &str) -> (tempfile::TempDir, Recipe) {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("overlays")).unwrap();
        std::fs::create_dir_all(d.path().join("recipes/roles")).unwrap();
        std::fs::write(d.path().join("recipes/roles/lb.yaml.tera"), tpl).unwrap();
        std::fs::write(
            d.path().join("recipes/roles/lb.types.toml"),
            "vip = \"ip\"\nport = \"port?\"\nname = \"hostname?\"\n",
        )
        .unwrap();
        let p = d.path().join("recipes/r.toml");
        std::fs::write(&p, "name = \"r\"\nversion = \"1\"\n[base]\nsuite = \"bookworm\"\n[vars]\nport = 6443\n[roles.lb]\nuser_data = \"roles/lb.yaml.tera\"\nvalue_types = \"roles/lb.types.toml\"\n[roles.lb.test_values]\nvip = \"192.0.2.1\"\n").unwrap();
        let r = Recipe::load(&p).unwrap();
        (d, r)
    }

    fn values(text: &str) -> Values {
        Values::parse_toml(text, Path::new("node.toml")).unwrap()
    }

    #[test]
    fn values_override_vars_when_rendering() {
        let (_d, r) = recipe_with_role(
            "#cloud-config\nvip: {{ vip }}\nport: {{ port }}\nimage: {{ recipe.name }}\n",
        );
        let out = render(&r, "lb", &values("vip = \"192.0.2.10\"\nport = 7443\n")).unwrap();
        assert!(
            out.contains("vip: 192.0.2.10\nport: 7443\nimage: r"),
            "{out}"
        );
    }

    #[test]
    fn missing_value_is_refused_before_rendering_naming_it_and_the_values_file() {
        let (_d, r) = recipe_with_role("#cloud-config\nvip: {{ vip }}\n");
        let err = render(&r, "lb", &values("")).unwrap_err().to_string();
        assert!(err.starts_with("node.toml: missing value `vip`"), "{err}");
    }

    #[test]
    fn template_error_names_the_template() {
        let (_d, r) = recipe_with_role("#cloud-config\nname: {{ name }}\n");
        let err = render(&r, "lb", &values("vip = \"192.0.2.10\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("lb.yaml.tera") && err.contains("name"),
            "{err}"
        );
    }

    #[test]
    fn quoting_filters_are_available_to_role_templates() {
        let (_d, r) = recipe_with_role(
            "#cloud-config\nhostname: {{ name | yaml_str }}\nserver: {{ vip | url_host | conf_word }}:{{ port | integer }}\n",
        );
        let out = render(
            &r,
            "lb",
            &values("vip = \"fd00::10\"\nname = \"on\"\nport = 7443\n"),
        )
        .unwrap();
        assert!(
            out.contains("hostname: \"on\"\nserver: [fd00::10]:7443\n"),
            "{out}"
        );
    }

    #[test]
    fn unknown_role_suggests_a_known_one() {
        let (_d, r) = recipe_with_role("#cloud-config\n");
        let err = render(&r, "lbb", &Values::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("did you mean `lb`?"), "{err}");
    }

    #[test]
    fn user_data_must_be_cloud_config() {
        let (_d, r) = recipe_with_role("users: []\n");
        let err = render(&r, "lb", &values("vip = \"192.0.2.10\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("#cloud-config"), "{err}");
    }
}
