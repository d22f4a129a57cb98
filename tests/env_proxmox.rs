//! `kiln env` on Proxmox VE, driven through the CLI against pve-sim (a
//! labelled stand-in for the Proxmox VE API: nothing boots in it). What the
//! simulator cannot show (VMs answering SSH) the local provider's end-to-end
//! test shows for real with the same seed ISO and the same engine.

mod publish_support;

use publish_support::{image, kiln, sim_with_config, stderr, stdout, token};
use std::path::Path;

const NODES: [&str; 3] = ["pve1", "pve2", "pve3"];

fn three_nodes(data: &Path) -> pve_sim::Sim {
    sim_with_config(data, |c| {
        c.nodes = NODES.iter().map(|n| n.to_string()).collect();
    })
}

/// kiln.toml with a target `prod` on the simulator's three nodes.
fn write_config(dir: &Path, url: &str) {
    std::fs::write(
        dir.join("kiln.toml"),
        format!(
            "[targets.prod]\nurl = \"{url}\"\nnodes = [\"pve1\", \"pve2\", \"pve3\"]\n\
             storage = \"local-lvm\"\nimport_storage = \"local\"\nvmid_range = [9000, 9099]\n"
        ),
    )
    .unwrap();
}

fn vars() -> Vec<(String, String)> {
    vec![("KILN_PVE_TOKEN".into(), token())]
}

/// The users' prod environment (envs/prod.toml) with its recipes found in
/// this repository and its images pinned by id instead of built here.
fn prod_env(dir: &Path) -> std::path::PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(repo.join("envs/prod.toml")).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("recipe = \"../") {
            out.push_str(&format!("recipe = \"{}/{rest}\n", repo.display()));
        } else if line.starts_with("image = \"../images/lb/") {
            out.push_str(&format!("{line}\nimage_id = \"{}\"\n", "1b".repeat(32)));
        } else if line.starts_with("image = \"../images/k3s-node/") {
            out.push_str(&format!("{line}\nimage_id = \"{}\"\n", "5e".repeat(32)));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    let path = dir.join("envs/prod.toml");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, out).unwrap();
    path
}

#[test]
fn the_users_prod_environment_plans_a_bootstrap_in_order_against_an_empty_proxmox() {
    let dir = tempfile::tempdir().unwrap();
    let s = three_nodes(&dir.path().join("sim"));
    write_config(dir.path(), &s.url());
    prod_env(dir.path());
    let o = kiln(dir.path(), &["env", "plan", "envs/prod.toml"], &vars());
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    println!("$ kiln env plan envs/prod.toml\n{text}");
    let order: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("create   "))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(
        order,
        vec![
            "lb-1", "lb-2", "lb-3", "server-1", "server-2", "server-3", "agent-1", "agent-2",
            "agent-3"
        ]
    );
    assert!(
        text.contains("prod: 9 to create, 0 to replace, 0 to resume, 0 to destroy, 0 unchanged"),
        "{text}"
    );
    let o = kiln(
        dir.path(),
        &["env", "plan", "envs/prod.toml", "--json"],
        &vars(),
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["actions"].as_array().unwrap().len(), 9);
    assert!(s.state().vms.is_empty(), "a plan changes nothing");
}

/// A small environment of two LB slots on two nodes; its addresses are on
/// loopback so the SSH gates' connection attempts never leave this host.
fn small_env(dir: &Path) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    image(dir, "tiny", "0.1.0", true, false);
    std::fs::write(
        dir.join("qa.toml"),
        format!(
            r#"name = "qa"
[provider]
kind = "proxmox"
target = "prod"
[network]
bridge = "vmbr0"
cidr = "127.77.0.0/24"
gateway = "127.77.0.1"
vip = "127.77.0.10"
[roles.lb]
recipe = "{}/recipes/tiny.toml"
user_data_role = "node"
image = "images/tiny/0.1.0"
cores = 1
memory = 512
[[roles.lb.slots]]
name = "lb-1"
node = "pve1"
addresses = ["127.77.0.11", "127.77.0.21"]
[[roles.lb.slots]]
name = "lb-2"
node = "pve2"
addresses = ["127.77.0.12", "127.77.0.22"]
"#,
            repo.display()
        ),
    )
    .unwrap();
}

#[test]
fn a_vm_whose_ssh_never_answers_is_destroyed_with_its_seed_and_apply_fails_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = three_nodes(&dir.path().join("sim"));
    write_config(dir.path(), &s.url());
    small_env(dir.path());
    let o = kiln(
        dir.path(),
        &["env", "apply", "qa.toml", "--yes", "--boot-timeout", "2"],
        &vars(),
    );
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("qa-lb-1-g0"), "{err}");
    assert!(err.contains("failed its gates and was destroyed"), "{err}");
    let st = s.state();
    let plain: Vec<_> = st.vms.values().filter(|v| !v.template).collect();
    assert!(plain.is_empty(), "no VM stays behind: {plain:?}");
    assert!(
        !st.volumes.keys().any(|k| k.contains(":iso/")),
        "no seed stays behind"
    );
    // The templates apply published on the slots' nodes stay for next time.
    let mut on: Vec<&str> = st
        .vms
        .values()
        .filter(|v| v.template)
        .map(|v| v.node.as_str())
        .collect();
    on.sort();
    assert_eq!(on, vec!["pve1", "pve2"]);
}

#[test]
fn env_status_and_destroy_on_an_empty_proxmox_environment_report_nothing_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let s = three_nodes(&dir.path().join("sim"));
    write_config(dir.path(), &s.url());
    small_env(dir.path());
    let o = kiln(dir.path(), &["env", "status", "qa.toml"], &vars());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("qa: no VMs"), "{}", stdout(&o));
    let o = kiln(
        dir.path(),
        &["env", "destroy", "qa.toml", "--yes", "--json"],
        &vars(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["destroyed"], serde_json::json!([]));
}

#[test]
fn an_unknown_target_is_named_with_the_environment_file() {
    let dir = tempfile::tempdir().unwrap();
    small_env(dir.path());
    std::fs::write(dir.path().join("kiln.toml"), "[targets.other]\nurl = \"https://x:8006\"\nnode = \"a\"\nstorage = \"s\"\nimport_storage = \"i\"\n").unwrap();
    let o = kiln(dir.path(), &["env", "plan", "qa.toml"], &vars());
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("qa.toml: its Proxmox target"), "{err}");
    assert!(err.contains("unknown target `prod`"), "{err}");
}
