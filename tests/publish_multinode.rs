//! A recorded multi-node publish and prune against the PVE simulator (a
//! stand-in for Proxmox VE, not Proxmox) with three nodes: images whose
//! version carries a `+` are published to every node, on each of the four
//! storage types whose linked clones look different (dir, nfs, LVM-thin,
//! ZFS); a newer version follows; VMs are cloned from the old templates on
//! two of the three nodes; `kiln templates prune` then keeps exactly the old
//! templates that have clones, per node, and needs `--force` where the
//! storage (LVM-thin) cannot show the link.
//!
//! `cargo test --test publish_multinode -- --nocapture` prints the
//! transcript: the commands and what kiln answered.

mod publish_support;
use publish_support::*;
use std::collections::BTreeMap;
use std::path::Path;

const NODES: [&str; 3] = ["pve", "pve2", "pve3"];
const OLD: &str = "2026.11+b1";
const NEW: &str = "2026.11+b2";
/// (image name, storage the target puts its templates on, storage type)
const IMAGES: [(&str, &str, &str); 4] = [
    ("app-dir", "local-dir", "dir"),
    ("app-nfs", "nfs", "nfs"),
    ("app-thin", "local-lvm", "lvmthin"),
    ("app-zfs", "local-zfs", "zfspool"),
];

/// The commands run and kiln's answers, printed as they happen.
struct Transcript(Vec<String>);

impl Transcript {
    fn say(&mut self, line: impl Into<String>) {
        let line = line.into();
        println!("{line}");
        self.0.push(line);
    }

    /// Run kiln, record the command (with the KILN_* variables that differ
    /// from the shared target) and its output; panics unless it succeeded.
    fn kiln(
        &mut self,
        root: &Path,
        args: &[&str],
        env: &[(String, String)],
        shown: &[&str],
    ) -> String {
        let vars: Vec<String> = shown
            .iter()
            .filter_map(|k| env.iter().find(|(n, _)| n == k))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let cmd = args
            .iter()
            .map(|a| {
                a.strip_prefix(&format!("{}/", root.display()))
                    .unwrap_or(a)
                    .to_string()
            })
            .collect::<Vec<_>>()
            .join(" ");
        self.say(format!(
            "$ {}kiln {cmd}",
            vars.iter().map(|v| format!("{v} ")).collect::<String>()
        ));
        let out = kiln(root, args, env);
        for l in stdout(&out).lines().chain(stderr(&out).lines()) {
            self.say(format!("  {l}"));
        }
        assert!(out.status.success(), "kiln {cmd} failed: {}", stderr(&out));
        stdout(&out)
    }
}

/// A kiln template of the simulator: (node, vmid, tags, description keys).
#[derive(Debug, Clone)]
struct Tpl {
    node: String,
    vmid: u32,
    tags: String,
    desc: BTreeMap<String, String>,
}

fn kiln_templates(s: &pve_sim::Sim, image: &str, version: &str) -> Vec<Tpl> {
    let st = s.state();
    let mut out: Vec<Tpl> = st
        .vms
        .values()
        .filter(|v| v.template)
        .map(|v| Tpl {
            node: v.node.clone(),
            vmid: v.vmid,
            tags: v.config.get("tags").cloned().unwrap_or_default(),
            desc: v
                .config
                .get("description")
                .map(|d| {
                    d.lines()
                        .filter_map(|l| l.split_once(": "))
                        .filter(|(k, _)| k.starts_with("kiln-"))
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect()
                })
                .unwrap_or_default(),
        })
        .filter(|t| {
            t.desc.get("kiln-image").map(String::as_str) == Some(image)
                && t.desc.get("kiln-version").map(String::as_str) == Some(version)
        })
        .collect();
    out.sort_by(|a, b| a.node.cmp(&b.node));
    out
}

#[test]
fn a_three_node_publish_then_prune_keeps_exactly_the_old_templates_with_linked_clones_per_node() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let s = sim_with_config(&root.join("sim"), |c| {
        c.nodes = NODES.iter().map(|n| n.to_string()).collect()
    });
    let target = env_target_with(&s.url(), &[("KILN_PVE_NODE", &NODES.join(","))]);
    let mut t = Transcript(Vec::new());
    t.say(format!(
        "# pve-sim (Proxmox VE API stand-in), nodes {}; KILN_PVE_NODE={}, KILN_PVE_IMPORT_STORAGE=local",
        NODES.join(", "),
        NODES.join(",")
    ));

    // 1. Publish the `+` version of each image to all three nodes.
    let mut old: BTreeMap<&str, Vec<Tpl>> = BTreeMap::new();
    for (image, storage, _) in IMAGES {
        let img = image_dir(root, image, OLD);
        let env = env_target_with(
            &s.url(),
            &[
                ("KILN_PVE_NODE", &NODES.join(",")),
                ("KILN_PVE_STORAGE", storage),
            ],
        );
        let requests_before = s.state().requests.len();
        t.kiln(
            root,
            &["publish", img.to_str().unwrap()],
            &env,
            &["KILN_PVE_STORAGE"],
        );
        let m = kiln::image::manifest::ImageManifest::load(&img).unwrap();
        // One template per node, with identical tags and image id.
        let tpls = kiln_templates(&s, image, OLD);
        let nodes: Vec<&str> = tpls.iter().map(|t| t.node.as_str()).collect();
        assert_eq!(nodes, NODES, "{image}: one template per node");
        for tpl in &tpls {
            assert_eq!(tpl.tags, tpls[0].tags, "{image}: tags differ across nodes");
            assert_eq!(tpl.desc["kiln-id"], m.id, "{image} on {}", tpl.node);
            assert!(tpl.tags.split(';').any(|x| x == OLD), "{}", tpl.tags);
        }
        // Each node got the disk under the name Proxmox stores: its
        // alphabet has no `+` (`normalize_content_filename`), so kiln asks
        // for `_` itself and the stored file is the one it imports from.
        let st = s.state();
        for node in NODES {
            let upload = st.requests[requests_before..]
                .iter()
                .find(|r| {
                    r.path == "/nodes/{node}/storage/{storage}/upload" && r.params["node"] == node
                })
                .unwrap_or_else(|| panic!("{image}: no upload to {node}"));
            let name = &upload.params["filename"];
            assert_eq!(&pve_sim::params::normalize_content_filename(name), name);
            assert!(
                name.contains("-2026.11_b1-") && !name.contains('+'),
                "{name}"
            );
            let create = st.requests[requests_before..]
                .iter()
                .find(|r| r.path == "/nodes/{node}/qemu" && r.params["node"] == node)
                .unwrap();
            assert!(
                create.params["scsi0"].contains(&format!("import-from=local:import/{name}")),
                "{image} on {node}: {:?}",
                create.params
            );
            let copied = st.tasks.values().any(|task| {
                task.upid.starts_with(&format!("UPID:{node}:"))
                    && task
                        .log
                        .iter()
                        .any(|l| l.starts_with("target file: ") && l.ends_with(&format!("/{name}")))
            });
            assert!(copied, "{image}: no imgcopy task stored {name} on {node}");
        }
        drop(st);
        old.insert(image, tpls.clone());
        t.say(format!(
            "# {image}: templates {} on {}, tags `{}`, upload stored as {}",
            tpls.iter()
                .map(|t| t.vmid.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            NODES.join(", "),
            tpls[0].tags,
            s.state()
                .requests
                .iter()
                .rev()
                .find(|r| r.path == "/nodes/{node}/storage/{storage}/upload")
                .map(|r| r.params["filename"].clone())
                .unwrap_or_default()
        ));
    }

    // 2. A newer version of each.
    for (image, storage, _) in IMAGES {
        let img = image_dir(root, image, NEW);
        let env = env_target_with(
            &s.url(),
            &[
                ("KILN_PVE_NODE", &NODES.join(",")),
                ("KILN_PVE_STORAGE", storage),
            ],
        );
        t.kiln(
            root,
            &["publish", img.to_str().unwrap()],
            &env,
            &["KILN_PVE_STORAGE"],
        );
        assert_eq!(kiln_templates(&s, image, NEW).len(), 3);
    }

    // 3. Linked clones of the old templates on pve and pve2 (as Terraform
    // makes them); pve3's old templates get none.
    let mut newid = 120;
    let mut cloned: BTreeMap<u32, u32> = BTreeMap::new();
    for (image, _, kind) in IMAGES {
        for tpl in old[image].iter().filter(|t| t.node != "pve3") {
            let id = newid.to_string();
            let name = format!("{image}-vm-{}", tpl.node);
            api_task(
                &s,
                api_post(
                    &s,
                    &format!("/nodes/{}/qemu/{}/clone", tpl.node, tpl.vmid),
                    &[("newid", id.as_str()), ("name", &name)],
                ),
            );
            let disk = s.state().vms[&newid].config["scsi0"].clone();
            t.say(format!(
                "$ pvesh create /nodes/{}/qemu/{}/clone --newid {newid} --name {name}   # {kind}: scsi0 {}",
                tpl.node,
                tpl.vmid,
                disk.split(',').next().unwrap()
            ));
            cloned.insert(tpl.vmid, newid);
            newid += 1;
        }
    }

    // 4. Prune, keeping the newest per image and node.
    t.kiln(root, &["templates", "prune", "--keep", "1"], &target, &[]);
    let present = |vmid: u32| s.state().vms.contains_key(&vmid);
    for (image, _, kind) in IMAGES {
        for tpl in &old[image] {
            let (node, vmid) = (tpl.node.as_str(), tpl.vmid);
            match (node, kind) {
                ("pve3", _) => assert!(!present(vmid), "{image} on pve3 has no clone: removed"),
                (_, "lvmthin") => assert!(present(vmid), "{image} on {node}: kept until --force"),
                _ => assert!(present(vmid), "{image} on {node}: its clone names it"),
            }
        }
        for tpl in kiln_templates(&s, image, NEW) {
            assert!(
                present(tpl.vmid),
                "the newest {image} on {} stays",
                tpl.node
            );
        }
    }

    // 5. --force removes the LVM-thin templates whose clones cannot show
    // their link; clones and templates whose clones name them stay.
    t.kiln(
        root,
        &["templates", "prune", "--keep", "1", "--force"],
        &target,
        &[],
    );
    for (template, clone) in &cloned {
        assert!(present(*clone), "clone {clone} stays");
        let on_thin = s.state().vms[clone].config["scsi0"].starts_with("local-lvm:");
        assert_eq!(present(*template), !on_thin, "template {template}");
    }
    t.kiln(root, &["templates", "list"], &target, &[]);
    assert!(t.0.iter().any(|l| l.contains("--force deletes it")));
}

/// Fabricate images/<name>/<version>/ (see `publish_support::image`).
fn image_dir(root: &Path, name: &str, version: &str) -> std::path::PathBuf {
    image(root, name, version, true, false)
}
