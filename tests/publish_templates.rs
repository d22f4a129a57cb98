//! `kiln templates list|prune` against the PVE simulator (a stand-in for
//! Proxmox VE): what is listed, and what prune must keep.

mod publish_support;
use publish_support::*;
use serde_json::Value;

/// Publish versions 1.0.0..=n of `name`; returns their VMIDs, oldest first.
fn publish_versions(
    root: &std::path::Path,
    env: &[(String, String)],
    name: &str,
    n: u32,
) -> Vec<u32> {
    (0..n)
        .map(|i| {
            let img = image(root, name, &format!("1.{i}.0"), true, false);
            publish_json(root, &img, env).vmid
        })
        .collect()
}

#[test]
fn list_shows_image_version_id_vmid_node_and_created() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(&tmp.path().join("sim"));
    let env = env_target(&s.url());
    let img = image(tmp.path(), "k3s-server", "1.0.0", true, false);
    let r = publish_json(tmp.path(), &img, &env);
    // A template someone else made is not listed.
    s.state().add_vm(500, "other", "", true);
    let out = kiln(tmp.path(), &["templates", "list", "--json"], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 1);
    let t = &list[0];
    assert_eq!(t["image"], "k3s-server");
    assert_eq!(t["version"], "1.0.0");
    assert_eq!(t["image_id"], r.image_id.as_str());
    assert_eq!(t["vmid"], r.vmid);
    assert_eq!(t["node"], "pve");
    assert!(t["created"].as_str().unwrap().ends_with('Z'));
    let table = kiln(tmp.path(), &["templates", "list"], &env);
    let text = stdout(&table);
    assert!(
        text.starts_with("IMAGE") && text.contains("k3s-server"),
        "{text}"
    );
}

#[test]
fn prune_keeps_the_newest_n_per_image_and_deletes_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(&tmp.path().join("sim"));
    let env = env_target(&s.url());
    let a = publish_versions(tmp.path(), &env, "k3s-server", 3);
    let b = publish_versions(tmp.path(), &env, "lb", 1);
    let out = kiln(tmp.path(), &["templates", "prune", "--keep", "1"], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let st = s.state();
    assert!(!st.vms.contains_key(&a[0]) && !st.vms.contains_key(&a[1]));
    assert!(
        st.vms.contains_key(&a[2]),
        "the newest k3s-server template must stay"
    );
    assert!(st.vms.contains_key(&b[0]), "the only lb template must stay");
}

#[test]
fn prune_never_deletes_a_template_with_linked_clones() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(&tmp.path().join("sim"));
    let env = env_target(&s.url());
    let a = publish_versions(tmp.path(), &env, "k3s-server", 2);
    s.state().add_linked_clone(a[0], 120, "node-a-g1");
    let out = kiln(tmp.path(), &["templates", "prune", "--keep", "1"], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("linked clones [120]"),
        "{}",
        stdout(&out)
    );
    let st = s.state();
    assert!(st.vms.contains_key(&a[0]) && st.vms.contains_key(&a[1]) && st.vms.contains_key(&120));
}

#[test]
fn prune_dry_run_deletes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(&tmp.path().join("sim"));
    let env = env_target(&s.url());
    let a = publish_versions(tmp.path(), &env, "k3s-server", 2);
    let out = kiln(
        tmp.path(),
        &["templates", "prune", "--keep", "1", "--dry-run"],
        &env,
    );
    assert!(
        stdout(&out).contains(&format!("would delete k3s-server 1.0.0 (vmid {})", a[0])),
        "{}",
        stdout(&out)
    );
    assert_eq!(s.state().vms.len(), 2);
}

#[test]
fn prune_keeps_templates_whose_linked_clones_name_them_on_zfs_and_directory_storage() {
    for storage in ["local-zfs", "nfs"] {
        let tmp = tempfile::tempdir().unwrap();
        let s = sim(&tmp.path().join("sim"));
        let env = env_target_with(&s.url(), &[("KILN_PVE_STORAGE", storage)]);
        let a = publish_versions(tmp.path(), &env, "k3s-server", 2);
        // A Terraform-made clone: its own name and description; only its
        // disks' names tell which template it is a linked clone of.
        api_task(
            &s,
            api_post(
                &s,
                &format!("/nodes/pve/qemu/{}/clone", a[0]),
                &[
                    ("newid", "120"),
                    ("name", "node-a"),
                    ("description", "managed by terraform"),
                ],
            ),
        );
        let out = kiln(tmp.path(), &["templates", "prune", "--keep", "1"], &env);
        assert!(out.status.success(), "{storage}: {}", stderr(&out));
        assert!(
            stdout(&out).contains("linked clones [120] use it"),
            "{storage}: {}",
            stdout(&out)
        );
        assert!(s.state().vms.contains_key(&a[0]), "{storage}");
    }
}

#[test]
fn prune_on_lvm_thin_keeps_a_template_that_vms_were_cloned_from_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(&tmp.path().join("sim"));
    let env = env_target(&s.url());
    let a = publish_versions(tmp.path(), &env, "k3s-server", 2);
    api_task(
        &s,
        api_post(
            &s,
            &format!("/nodes/pve/qemu/{}/clone", a[0]),
            &[("newid", "120"), ("name", "node-a")],
        ),
    );
    // LVM-thin: the clone's disk is a plain vm-120-disk-N.
    assert!(s.state().vms[&120].config["scsi0"].starts_with("local-lvm:vm-120-disk-"));
    let out = kiln(tmp.path(), &["templates", "prune", "--keep", "1"], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("linked clones [120] may use it") && stdout(&out).contains("--force"),
        "{}",
        stdout(&out)
    );
    assert!(s.state().vms.contains_key(&a[0]));
    let out = kiln(
        tmp.path(),
        &["templates", "prune", "--keep", "1", "--force"],
        &env,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let st = s.state();
    assert!(!st.vms.contains_key(&a[0]), "--force deletes it");
    assert!(st.vms.contains_key(&120), "the clone stays");
}

#[test]
fn prune_keeps_a_template_proxmox_refuses_to_free_for_a_clone_kiln_cannot_see() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim_with_acl(
        &tmp.path().join("sim"),
        &[
            ("/storage", KILN_ROLE),
            ("/sdn", KILN_ROLE),
            ("/vms/9000", KILN_ROLE),
            ("/vms/9001", KILN_ROLE),
        ],
    );
    let env = env_target_with(&s.url(), &[("KILN_PVE_STORAGE", "local-zfs")]);
    let a = publish_versions(tmp.path(), &env, "k3s-server", 2);
    // Another team's linked clone, which kiln's token may not see.
    s.state().add_linked_clone(a[0], 120, "their-vm");
    let out = kiln(tmp.path(), &["templates", "prune", "--keep", "1"], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("Proxmox says linked clones use it"),
        "{}",
        stdout(&out)
    );
    assert!(s.state().vms.contains_key(&a[0]));
}

#[test]
fn list_and_prune_cover_every_node_of_the_target_and_keep_n_on_each() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim_with_config(&tmp.path().join("sim"), |c| {
        c.nodes = vec!["pve".into(), "pve2".into()]
    });
    let env = env_target_with(&s.url(), &[("KILN_PVE_NODE", "pve,pve2")]);
    let mut vmids = Vec::new();
    for v in ["1.0.0", "1.1.0"] {
        let img = image(tmp.path(), "k3s-server", v, true, false);
        let r = publish_json(tmp.path(), &img, &env);
        vmids.push(r.nodes.iter().map(|n| n.vmid).collect::<Vec<_>>());
    }
    let out = kiln(tmp.path(), &["templates", "list", "--json"], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut nodes: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["node"].as_str().unwrap())
        .collect();
    nodes.sort();
    assert_eq!(nodes, vec!["pve", "pve", "pve2", "pve2"]);
    let out = kiln(tmp.path(), &["templates", "prune", "--keep", "1"], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let st = s.state();
    for old in &vmids[0] {
        assert!(!st.vms.contains_key(old), "old template {old} stays");
    }
    for new in &vmids[1] {
        assert!(st.vms.contains_key(new), "newest template {new} is gone");
    }
}
