//! `kiln publish` end to end against the PVE simulator (a stand-in for
//! Proxmox VE): the template it makes, idempotency, VMIDs, LXC, bad input.

mod publish_support;
use publish_support::*;

#[test]
fn publish_creates_a_secure_boot_template_and_prints_json_for_terraform() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(&tmp.path().join("sim"));
    let img = image(tmp.path(), "k3s-server", "1.2.0", true, false);
    let r = publish_json(tmp.path(), &img, &env_target(&s.url()));
    assert!(r.created);
    assert_eq!(r.vmid, 9000);
    assert_eq!(r.name, "k3s-server-1-2-0");
    assert_eq!(r.node, "pve");
    let m = kiln::image::manifest::ImageManifest::load(&img).unwrap();
    assert_eq!(r.image_id, m.id);
    assert_eq!(r.uploaded_bytes, m.disk.size);
    let id_tag = format!("id-{}", m.short_id());
    assert_eq!(r.tags, vec!["kiln", "k3s-server", "1.2.0", id_tag.as_str()]);

    let st = s.state();
    let vm = &st.vms[&9000];
    assert!(vm.template);
    let c = &vm.config;
    assert_eq!(c["bios"], "ovmf");
    assert_eq!(c["machine"], "q35");
    assert_eq!(c["scsihw"], "virtio-scsi-single");
    assert!(c["efidisk0"].contains("efitype=4m") && c["efidisk0"].contains("pre-enrolled-keys=1"));
    assert!(
        c["scsi0"].starts_with("local-lvm:base-9000-disk-"),
        "{}",
        c["scsi0"]
    );
    assert!(c["ide2"].starts_with("local-lvm:vm-9000-cloudinit"));
    assert_eq!(c["agent"], "1");
    assert_eq!(c["serial0"], "socket");
    assert!(c["description"].contains(&format!("kiln-id: {}", m.id)));
    // The description says which Microsoft keys the image was validated under.
    assert!(
        c["description"].contains(
            "validated: yes (2026-11-25T12:00:00Z, 0 checks, tcg, Secure Boot keys 2023k)"
        ),
        "{}",
        c["description"]
    );
    assert!(!c.contains_key("lock"));
    // The import file is removed once the template exists.
    assert!(
        st.volumes.keys().all(|v| !v.contains(":import/")),
        "{:?}",
        st.volumes.keys()
    );
}

/// Proxmox VE 9.1.13 and later take the EFI disk's `ms-cert=2023k` marker
/// (the template's vars carry Microsoft's 2023 keys); older versions refuse
/// the option, so kiln leaves it off there.
#[test]
fn the_efi_disk_is_marked_ms_cert_2023k_exactly_where_pve_knows_the_marker() {
    let tmp = tempfile::tempdir().unwrap();
    for (version, marked) in [
        ("8.4.1", false),
        ("9.1.12", false),
        ("9.1.13", true),
        ("9.2.11", true),
    ] {
        let s = sim_with_config(&tmp.path().join(version), |c| c.version = version.into());
        let img = image(
            &tmp.path().join(format!("img-{version}")),
            "lb",
            "1.0.0",
            true,
            false,
        );
        let r = publish_json(tmp.path(), &img, &env_target(&s.url()));
        let efi = s.state().vms[&r.vmid].config["efidisk0"].clone();
        assert!(
            efi.contains("efitype=4m") && efi.contains("pre-enrolled-keys=1"),
            "PVE {version}: {efi}"
        );
        assert_eq!(
            efi.contains("ms-cert=2023k"),
            marked,
            "PVE {version}: {efi}"
        );
        assert_eq!(efi.contains("ms-cert"), marked, "PVE {version}: {efi}");
    }
}

#[test]
fn republishing_the_same_image_uploads_nothing_and_reports_the_template() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(&tmp.path().join("sim"));
    let img = image(tmp.path(), "k3s-agent", "1.0.0", true, false);
    let env = env_target(&s.url());
    let first = publish_json(tmp.path(), &img, &env);
    let bytes_after_first = s.state().upload_bytes;
    let second = publish_json(tmp.path(), &img, &env);
    assert!(!second.created);
    assert_eq!(second.vmid, first.vmid);
    assert_eq!(second.uploaded_bytes, 0);
    assert_eq!(s.state().upload_bytes, bytes_after_first);
    assert_eq!(s.state().vms.len(), 1);
}

#[test]
fn vmids_already_in_use_are_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(&tmp.path().join("sim"));
    s.state().add_vm(9000, "someone", "", false);
    s.state().add_vm(9001, "someone-else", "", true);
    let img = image(tmp.path(), "k3s-server", "1.0.0", true, false);
    let r = publish_json(tmp.path(), &img, &env_target(&s.url()));
    assert_eq!(r.vmid, 9002);
    assert_eq!(s.state().vms[&9000].config["name"], "someone");
}

#[test]
fn a_vmid_taken_between_listing_and_create_is_retried_with_the_next() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(&tmp.path().join("sim"));
    s.inject("create:race".parse().unwrap());
    let img = image(tmp.path(), "k3s-server", "1.0.1", true, false);
    let r = publish_json(tmp.path(), &img, &env_target(&s.url()));
    assert_eq!(r.vmid, 9001);
    assert_eq!(s.state().vms[&9000].config["name"], "someone-else");
}

/// A publish killed outright (SIGKILL: no cleanup at all) while its create
/// task runs; returns once the process is gone.
fn kill_publish_while_creating(
    s: &pve_sim::Sim,
    cwd: &std::path::Path,
    img: &std::path::Path,
    vmid: u32,
) {
    s.inject("create:slow=2".parse().unwrap());
    let mut child = kiln_command(
        cwd,
        &["publish", img.to_str().unwrap()],
        &env_target(&s.url()),
    )
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    let start = std::time::Instant::now();
    while !s.state().vms.contains_key(&vmid) {
        assert!(start.elapsed().as_secs() < 30, "VM never appeared");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn a_half_made_vm_of_an_earlier_run_is_removed_by_the_next_run() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(&tmp.path().join("sim"));
    let img = image(tmp.path(), "lb", "2.0.0", true, false);
    kill_publish_while_creating(&s, tmp.path(), &img, 9000);
    let r = publish_json(tmp.path(), &img, &env_target(&s.url()));
    assert_eq!(r.removed_leftovers, vec![9000]);
    assert!(r.created);
    let st = s.state();
    assert_eq!(st.vms.len(), 1);
    assert!(st.vms[&r.vmid].template);
}

#[test]
fn republishing_after_the_template_was_deleted_leaves_its_full_clone_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(&tmp.path().join("sim"));
    let img = image(tmp.path(), "lb", "2.1.0", true, false);
    let env = env_target(&s.url());
    let first = publish_json(tmp.path(), &img, &env);
    // The clone gets the template's tags and description (as in Proxmox).
    api_task(
        &s,
        api_post(
            &s,
            &format!("/nodes/pve/qemu/{}/clone", first.vmid),
            &[("newid", "120"), ("name", "prod-lb-1"), ("full", "1")],
        ),
    );
    api_task(
        &s,
        api_delete(&s, &format!("/nodes/pve/qemu/{}", first.vmid)),
    );
    let again = publish_json(tmp.path(), &img, &env);
    assert!(again.created);
    assert!(
        again.removed_leftovers.is_empty(),
        "{:?}",
        again.removed_leftovers
    );
    let st = s.state();
    assert_eq!(st.vms[&120].config["name"], "prod-lb-1");
    assert!(st.vms[&120].config["tags"].contains("kiln"));
}

#[test]
fn clones_full_and_linked_survive_a_republish_and_a_killed_run_beside_them() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(&tmp.path().join("sim"));
    let img = image(tmp.path(), "lb", "2.2.0", true, false);
    let env = env_target(&s.url());
    let first = publish_json(tmp.path(), &img, &env);
    let base = first.vmid.to_string();
    for (newid, name, full) in [("120", "prod-lb-1", "1"), ("121", "prod-lb-2", "0")] {
        api_task(
            &s,
            api_post(
                &s,
                &format!("/nodes/pve/qemu/{base}/clone"),
                &[("newid", newid), ("name", name), ("full", full)],
            ),
        );
    }
    // Proxmox lets the template go while its linked clone stays on LVM-thin,
    // where a linked clone keeps no visible link to its base (design.md).
    api_task(&s, api_delete(&s, &format!("/nodes/pve/qemu/{base}")));
    // A run killed while creating leaves a half-made VM beside the clones.
    kill_publish_while_creating(&s, tmp.path(), &img, 9000);
    let again = publish_json(tmp.path(), &img, &env);
    assert_eq!(again.removed_leftovers, vec![9000], "{:?}", again.warnings);
    assert!(again.created);
    let st = s.state();
    assert!(st.vms.contains_key(&120) && st.vms.contains_key(&121));
    assert!(st.vms[&again.vmid].template);
}

#[test]
fn lxc_rootfs_is_uploaded_as_a_vztmpl_template() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(&tmp.path().join("sim"));
    let img = image(tmp.path(), "lb", "1.0.0", true, true);
    let env = env_target(&s.url());
    let r = publish_json(tmp.path(), &img, &env);
    let m = kiln::image::manifest::ImageManifest::load(&img).unwrap();
    let vol = format!("local:vztmpl/kiln-lb-1.0.0-{}.tar.zst", m.short_id());
    assert_eq!(r.lxc_volume.as_deref(), Some(vol.as_str()));
    let lxc = m.lxc.unwrap();
    {
        let st = s.state();
        let v = &st.volumes[&vol];
        assert_eq!(v.content, "vztmpl");
        assert_eq!(v.size, lxc.size);
        assert_eq!(
            kiln::util::sha256_file(v.path.as_ref().unwrap()).unwrap(),
            lxc.sha256
        );
    }
    // Idempotent for the archive too.
    let again = publish_json(tmp.path(), &img, &env);
    assert_eq!(again.uploaded_bytes, 0);
}

#[test]
fn unvalidated_image_is_refused_and_nothing_reaches_proxmox() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(&tmp.path().join("sim"));
    let img = image(tmp.path(), "k3s-server", "0.9.0", false, false);
    let out = kiln(
        tmp.path(),
        &["publish", img.to_str().unwrap()],
        &env_target(&s.url()),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("has not passed `kiln validate`"),
        "{}",
        stderr(&out)
    );
    assert!(s.state().requests.is_empty());
    // --allow-unvalidated publishes it.
    let out = kiln(
        tmp.path(),
        &["publish", img.to_str().unwrap(), "--allow-unvalidated"],
        &env_target(&s.url()),
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_directory_without_a_manifest_is_not_a_kiln_image() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(&tmp.path().join("sim"));
    let out = kiln(
        tmp.path(),
        &["publish", tmp.path().to_str().unwrap()],
        &env_target(&s.url()),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is not a kiln image"),
        "{}",
        stderr(&out)
    );
    assert!(s.state().requests.is_empty());
}

#[test]
fn a_disk_that_does_not_match_its_manifest_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(&tmp.path().join("sim"));
    let img = image(tmp.path(), "k3s-server", "1.0.0", true, false);
    std::fs::OpenOptions::new()
        .append(true)
        .open(img.join("disk.qcow2"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"tampered"))
        .unwrap();
    let out = kiln(
        tmp.path(),
        &["publish", img.to_str().unwrap()],
        &env_target(&s.url()),
    );
    assert!(
        stderr(&out).contains("does not match its manifest"),
        "{}",
        stderr(&out)
    );
    assert!(s.state().vms.is_empty());
}

#[test]
fn a_wrong_token_is_refused_clearly_and_never_printed() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(&tmp.path().join("sim"));
    let img = image(tmp.path(), "k3s-server", "1.0.0", true, false);
    let mut env = env_target(&s.url());
    // The runner checks SECRET never appears; this wrong secret must not either.
    env.retain(|(k, _)| k != "KILN_PVE_TOKEN");
    env.push((
        "KILN_PVE_TOKEN".into(),
        format!("{TOKEN_ID}=wrong-{SECRET}"),
    ));
    let out = kiln(tmp.path(), &["publish", img.to_str().unwrap()], &env);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("401") && err.contains("authentication failure"),
        "{err}"
    );
    assert!(!err.contains("wrong-"), "{err}");
    assert!(s.state().vms.is_empty());
}

#[test]
fn a_missing_token_names_the_variable() {
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), "k3s-server", "1.0.0", true, false);
    let mut env = env_target("http://127.0.0.1:9");
    env.retain(|(k, _)| k != "KILN_PVE_TOKEN");
    let out = kiln(tmp.path(), &["publish", img.to_str().unwrap()], &env);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("KILN_PVE_TOKEN"), "{}", stderr(&out));
}

#[test]
fn an_unknown_target_is_named_with_the_known_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), "k3s-server", "1.0.0", true, false);
    std::fs::write(
        tmp.path().join("kiln.toml"),
        "[targets.lab]\nurl = \"https://127.0.0.1:8006\"\nnode = \"pve\"\nstorage = \"local-lvm\"\nimport_storage = \"local\"\n",
    )
    .unwrap();
    let out = kiln(
        tmp.path(),
        &["publish", img.to_str().unwrap(), "--target", "prod"],
        &[],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("unknown target `prod`") && err.contains("lab"),
        "{err}"
    );
}

#[test]
fn a_target_from_kiln_toml_with_a_token_file_publishes() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(&tmp.path().join("sim"));
    let img = image(tmp.path(), "k3s-server", "1.0.0", true, false);
    let tok = tmp.path().join("lab.token");
    std::fs::write(&tok, token()).unwrap();
    std::fs::write(
        tmp.path().join("kiln.toml"),
        format!(
            "[targets.lab]\nurl = \"{}\"\nnode = \"pve\"\nstorage = \"local-lvm\"\nimport_storage = \"local\"\nvmid_range = [8100, 8199]\ntoken_file = \"{}\"\nremove_import = false\n[targets.lab.vm]\ncores = 4\nmemory = 4096\nbridge = \"vmbr1\"\n",
            s.url(),
            tok.display()
        ),
    )
    .unwrap();
    let out = kiln(
        tmp.path(),
        &["publish", img.to_str().unwrap(), "--target", "lab"],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("vmid 8100"), "{}", stdout(&out));
    let st = s.state();
    let c = &st.vms[&8100].config;
    assert_eq!(c["cores"], "4");
    assert_eq!(c["memory"], "4096");
    // What kiln asked for; Proxmox adds a MAC address (`add_random_macs`).
    let create = st
        .requests
        .iter()
        .find(|r| r.method == "POST" && r.path == "/nodes/{node}/qemu")
        .expect("a create request");
    assert_eq!(create.params["net0"], "virtio,bridge=vmbr1");
    assert!(
        c["net0"].starts_with("virtio=BC:24:11:") && c["net0"].ends_with(",bridge=vmbr1"),
        "{}",
        c["net0"]
    );
    // remove_import = false keeps the uploaded file.
    assert!(st
        .volumes
        .keys()
        .any(|v| v.starts_with("local:import/kiln-k3s-server-1.0.0-")));
}

#[test]
fn a_storage_without_import_content_is_refused_before_any_upload() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(&tmp.path().join("sim"));
    let img = image(tmp.path(), "k3s-server", "1.0.0", true, false);
    let mut env = env_target(&s.url());
    env.retain(|(k, _)| k != "KILN_PVE_IMPORT_STORAGE");
    env.push(("KILN_PVE_IMPORT_STORAGE".into(), "local-lvm".into()));
    let out = kiln(tmp.path(), &["publish", img.to_str().unwrap()], &env);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("storage `local-lvm`") && err.contains("`import`"),
        "{err}"
    );
    assert_eq!(s.state().upload_bytes, 0);
    assert!(s.state().vms.is_empty());
}

/// The `pve-sim` binary of the workspace's `crates/pve-sim`. Cargo only sets
/// `CARGO_BIN_EXE_*` for this package's own binaries, so it is found beside
/// `kiln` in the shared target directory. Cargo builds a package's binary for
/// that package's integration tests only, so plain `cargo test` at the root
/// builds it (for pve-sim's tests/binary.rs) before any test runs; a run that
/// selects only this test needs `--test binary` too, or `cargo build -p pve-sim`.
fn pve_sim_binary() -> std::path::PathBuf {
    let kiln = std::path::Path::new(env!("CARGO_BIN_EXE_kiln"));
    let sim = kiln.with_file_name(format!("pve-sim{}", std::env::consts::EXE_SUFFIX));
    assert!(
        sim.is_file(),
        "{} is not built: run `cargo build -p pve-sim`, or add `--test binary` (plain `cargo test` at the root builds it)",
        sim.display()
    );
    sim
}

#[test]
fn the_pve_sim_binary_serves_a_publish() {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(pve_sim_binary())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--task-seconds",
            "0.05",
            "--data-dir",
        ])
        .arg(tmp.path().join("sim"))
        .env("PVE_SIM_TOKEN", token())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_string();
    let img = image(tmp.path(), "k3s-server", "1.0.0", true, false);
    let out = kiln(
        tmp.path(),
        &["publish", img.to_str().unwrap(), "--json"],
        &env_target(&url),
    );
    let _ = child.kill();
    let _ = child.wait();
    assert!(out.status.success(), "{}", stderr(&out));
    let r: kiln::deploy::publish::PublishReport = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r.vmid, 9000);
}

#[test]
fn an_older_pve_without_ssh_settings_is_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = pve_sim::SimConfig::new(&token(), &tmp.path().join("sim"));
    cfg.version = "8.3.2".into();
    let s = pve_sim::Sim::start(cfg).unwrap();
    let img = image(tmp.path(), "k3s-server", "1.0.0", true, false);
    let out = kiln(
        tmp.path(),
        &["publish", img.to_str().unwrap()],
        &env_target(&s.url()),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no [ssh] settings"),
        "{}",
        stderr(&out)
    );
    let out = kiln(
        tmp.path(),
        &["publish", img.to_str().unwrap(), "--via", "api"],
        &env_target(&s.url()),
    );
    assert!(stderr(&out).contains("needs 8.4+"), "{}", stderr(&out));
    assert!(s.state().vms.is_empty());
    assert_eq!(s.state().upload_bytes, 0);
}

#[test]
fn an_interrupted_publish_waits_for_the_running_task_then_removes_the_vm() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(&tmp.path().join("sim"));
    s.inject("create:slow=2".parse().unwrap());
    let img = image(tmp.path(), "k3s-server", "1.0.0", true, false);
    let child = kiln_command(
        tmp.path(),
        &["publish", img.to_str().unwrap()],
        &env_target(&s.url()),
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    // Interrupt while the VM exists and its create task holds the lock.
    let start = std::time::Instant::now();
    while !s.state().vms.contains_key(&9000) {
        assert!(start.elapsed().as_secs() < 30, "VM never appeared");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let st = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("interrupted"), "{}", stderr(&out));
    let st = s.state();
    assert!(st.vms.is_empty(), "VMs left: {:?}", st.vms.keys());
    assert!(st.volumes.keys().all(|v| !v.contains(":import/")));
}

#[test]
fn a_manifest_pointing_outside_its_image_directory_is_refused_before_any_upload() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(&tmp.path().join("sim"));
    let img = image(tmp.path(), "lb", "0.1.0", true, false);
    // A crafted manifest names a file beside the image directory, with that
    // file's own digest, so only the path rule can stop it.
    let m = kiln::image::manifest::ImageManifest::load(&img).unwrap();
    let outside = img.parent().unwrap().join("host-secret.qcow2");
    std::fs::copy(m.disk_path(&img), &outside).unwrap();
    let path = img.join("manifest.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json["disk"]["file"] = "../host-secret.qcow2".into();
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();

    let out = kiln(
        tmp.path(),
        &["publish", img.to_str().unwrap()],
        &env_target(&s.url()),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("`../host-secret.qcow2` is not a plain file name"),
        "{}",
        stderr(&out)
    );
    assert!(s.state().volumes.is_empty(), "something was uploaded");
}

/// Two `kiln publish` processes of one image at once against one simulator,
/// with `fault` injected; checks that both succeed and exactly one template
/// is left, made from one of the two uploads, with nothing else left behind.
fn two_publishes_at_once(fault: &str, version: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(&tmp.path().join("sim"));
    let img = image(tmp.path(), "lb", version, true, false);
    let env = env_target(&s.url());
    s.inject(fault.parse().unwrap());
    let args = ["publish", img.to_str().unwrap(), "--json"];
    let spawn = || {
        kiln_command(tmp.path(), &args, &env)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success(), "first: {}", stderr(&a));
    assert!(b.status.success(), "second: {}", stderr(&b));
    let ra: kiln::deploy::publish::PublishReport = serde_json::from_slice(&a.stdout).unwrap();
    let rb: kiln::deploy::publish::PublishReport = serde_json::from_slice(&b.stdout).unwrap();
    assert_eq!(ra.vmid, rb.vmid, "both report the one template");
    assert!(ra.created != rb.created, "exactly one run made it");
    let st = s.state();
    let templates: Vec<u32> = st
        .vms
        .values()
        .filter(|v| v.template)
        .map(|v| v.vmid)
        .collect();
    assert_eq!(templates, vec![ra.vmid]);
    assert_eq!(
        st.vms.len(),
        1,
        "no half-made VM is left: {:?}",
        st.vms.keys()
    );
    // Each run uploaded under its own name and removed only that file.
    let uploads: std::collections::BTreeSet<String> = st
        .requests
        .iter()
        .filter(|r| r.path.ends_with("/upload"))
        .map(|r| r.params["filename"].clone())
        .collect();
    let uploaded = [&ra, &rb].iter().filter(|r| r.uploaded_bytes > 0).count();
    assert_eq!(uploads.len(), uploaded, "{uploads:?}");
    assert!(
        st.volumes.keys().all(|v| !v.contains(":import/")),
        "{:?}",
        st.volumes.keys()
    );
}

#[test]
fn two_publishes_of_one_image_at_once_make_exactly_one_template_and_both_succeed() {
    // Both creates overlap: each takes a second.
    two_publishes_at_once("create:slow=1*2", "3.0.0");
}

#[test]
fn two_publishes_at_once_agree_when_the_first_create_finishes_last() {
    // Only the first create is slow: the other VM is ready first and must
    // wait for the lower one still being created.
    two_publishes_at_once("create:slow=2", "3.0.1");
}

#[test]
fn a_version_with_a_plus_publishes_and_republishes_without_uploading_again() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(&tmp.path().join("sim"));
    let img = image(tmp.path(), "lb", "2026.11+b1", true, true);
    let env = env_target(&s.url());
    let m = kiln::image::manifest::ImageManifest::load(&img).unwrap();
    let first = publish_json(tmp.path(), &img, &env);
    assert!(first.created);
    // Proxmox stores `+` as `_`: kiln names the archive that way itself.
    let vol = format!("local:vztmpl/kiln-lb-2026.11_b1-{}.tar.zst", m.short_id());
    assert_eq!(first.lxc_volume.as_deref(), Some(vol.as_str()));
    assert!(s.state().volumes.contains_key(&vol));
    let bytes = s.state().upload_bytes;
    let again = publish_json(tmp.path(), &img, &env);
    assert!(!again.created);
    assert_eq!(again.uploaded_bytes, 0);
    assert_eq!(s.state().upload_bytes, bytes, "nothing was uploaded again");
    assert_eq!(again.lxc_volume.as_deref(), Some(vol.as_str()));
}

#[test]
fn the_documented_role_is_enough_to_publish_with_lxc() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim_with_acl(&tmp.path().join("sim"), &[("/", KILN_ROLE)]);
    let img = image(tmp.path(), "lb", "4.0.0", true, true);
    let r = publish_json(tmp.path(), &img, &env_target(&s.url()));
    assert!(r.created && r.warnings.is_empty(), "{:?}", r.warnings);
    assert!(s.state().volumes.keys().all(|v| !v.contains(":import/")));
}

#[test]
fn a_missing_privilege_is_named_with_its_path_before_anything_is_uploaded() {
    let tmp = tempfile::tempdir().unwrap();
    let everywhere_else = role_without(&["Datastore.AllocateTemplate"]);
    let s = sim_with_acl(
        &tmp.path().join("sim"),
        &[
            ("/", &everywhere_else),
            ("/storage/local-lvm", &["Datastore.AllocateTemplate"]),
        ],
    );
    let img = image(tmp.path(), "lb", "4.0.1", true, false);
    let out = kiln(
        tmp.path(),
        &["publish", img.to_str().unwrap()],
        &env_target(&s.url()),
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("Datastore.AllocateTemplate on /storage/local (upload the disk)")
            && err.contains("pveum role add KilnPublish"),
        "{err}"
    );
    assert_eq!(s.state().upload_bytes, 0);
    assert!(s.state().vms.is_empty());
}

#[test]
fn a_token_that_cannot_read_the_import_storage_hears_about_datastore_audit() {
    let tmp = tempfile::tempdir().unwrap();
    let no_read = role_without(&["Datastore.Audit", "Datastore.AllocateSpace"]);
    let s = sim_with_acl(
        &tmp.path().join("sim"),
        &[
            ("/vms", KILN_ROLE),
            ("/sdn", KILN_ROLE),
            ("/storage/local-lvm", KILN_ROLE),
            ("/storage/local", &no_read),
        ],
    );
    let img = image(tmp.path(), "lb", "4.0.2", true, false);
    let out = kiln(
        tmp.path(),
        &["publish", img.to_str().unwrap()],
        &env_target(&s.url()),
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("Datastore.Audit or Datastore.AllocateSpace on /storage/local"),
        "{err}"
    );
    assert!(!err.contains("does not exist"), "{err}");
}

#[test]
fn a_token_without_vm_audit_is_refused_instead_of_publishing_a_duplicate() {
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), "lb", "4.0.3", true, false);
    let s = sim(&tmp.path().join("sim"));
    let first = publish_json(tmp.path(), &img, &env_target(&s.url()));
    // The same simulator state behind a token that cannot see VMs.
    let blind = sim_with_acl(
        &tmp.path().join("sim2"),
        &[("/", &role_without(&["VM.Audit"]))],
    );
    std::mem::swap(&mut *blind.state(), &mut *s.state());
    let out = kiln(
        tmp.path(),
        &["publish", img.to_str().unwrap()],
        &env_target(&blind.url()),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("VM.Audit on /vms/9000"),
        "{}",
        stderr(&out)
    );
    let st = blind.state();
    assert_eq!(st.vms.keys().copied().collect::<Vec<_>>(), vec![first.vmid]);
}

#[test]
fn a_failed_import_file_removal_is_a_warning_not_a_failed_publish() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(&tmp.path().join("sim"));
    s.inject("volume-delete:500".parse().unwrap());
    let img = image(tmp.path(), "lb", "4.0.4", true, false);
    let r = publish_json(tmp.path(), &img, &env_target(&s.url()));
    assert!(r.created);
    assert!(s.state().vms[&r.vmid].template);
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("removing the import file") && w.contains("pvesm free")),
        "{:?}",
        r.warnings
    );
}

#[test]
fn without_datastore_allocate_the_import_file_stays_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim_with_acl(
        &tmp.path().join("sim"),
        &[("/", &role_without(&["Datastore.Allocate"]))],
    );
    let img = image(tmp.path(), "lb", "4.0.5", true, false);
    let r = publish_json(tmp.path(), &img, &env_target(&s.url()));
    assert!(r.created);
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("Datastore.Allocate on /storage/local")),
        "{:?}",
        r.warnings
    );
}

#[test]
fn a_retry_while_the_killed_runs_create_still_runs_leaves_its_import_file_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(&tmp.path().join("sim"));
    let img = image(tmp.path(), "lb", "5.0.0", true, false);
    // The first run, killed while its create task runs, is from another
    // machine: the retry has no record of it (another HOME).
    let (here, there) = (tmp.path().join("here"), tmp.path().join("there"));
    std::fs::create_dir_all(&here).unwrap();
    std::fs::create_dir_all(&there).unwrap();
    kill_publish_while_creating(&s, &there, &img, 9000);
    // As in Proxmox, the VM shows nothing but its lock until the create
    // task ends: no name, no tags to recognise it by.
    assert_eq!(
        s.state().vms[&9000].config.keys().collect::<Vec<_>>(),
        vec!["lock"]
    );
    std::fs::write(
        here.join("kiln.toml"),
        format!(
            "[targets.lab]\nurl = \"{}\"\nnode = \"pve\"\nstorage = \"local-lvm\"\n\
             import_storage = \"local\"\nvmid_range = [9000, 9099]\ntoken_env = \"KILN_LAB_TOKEN\"\n\
             concurrent_publish_wait = 1\n",
            s.url()
        ),
    )
    .unwrap();
    let out = kiln(
        &here,
        &[
            "publish",
            img.to_str().unwrap(),
            "--json",
            "--target",
            "lab",
        ],
        &[("KILN_LAB_TOKEN".to_string(), token())],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let r: kiln::deploy::publish::PublishReport = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r.created);
    assert_ne!(r.vmid, 9000);
    // The killed run's create read its import file to the end, untouched,
    // and its VM is left alone (nothing proves its run is dead) with a word.
    let st = s.state();
    let first_create = st
        .tasks
        .values()
        .filter(|t| t.kind == "qmcreate")
        .min_by_key(|t| t.pid)
        .unwrap();
    assert_eq!(first_create.exitstatus.as_deref(), Some("OK"));
    assert!(st.vms[&r.vmid].template && !st.vms[&9000].template);
    assert!(
        r.warnings.iter().any(|w| w.contains("VM 9000")),
        "{:?}",
        r.warnings
    );
}

#[test]
fn a_target_pool_takes_the_template_and_its_privileges_suffice() {
    let tmp = tempfile::tempdir().unwrap();
    // The token may touch VMs only through the pool.
    let s = sim_with_acl(
        &tmp.path().join("sim"),
        &[
            ("/pool/kiln", KILN_ROLE),
            ("/storage", KILN_ROLE),
            ("/sdn", KILN_ROLE),
        ],
    );
    s.add_pool("kiln");
    let img = image(tmp.path(), "lb", "6.0.0", true, false);
    let env = env_target_with(&s.url(), &[("KILN_PVE_POOL", "kiln")]);
    let r = publish_json(tmp.path(), &img, &env);
    assert!(r.created);
    assert_eq!(s.pool_members("kiln"), Some(vec![r.vmid]));
    assert!(s.state().vms[&r.vmid].template);
    // Idempotent through the pool's VM.Audit too.
    let again = publish_json(tmp.path(), &img, &env);
    assert!(!again.created);
    assert_eq!(again.vmid, r.vmid);
}

#[test]
fn a_tag_policy_that_refuses_kiln_tags_stops_the_publish_before_the_upload() {
    let tmp = tempfile::tempdir().unwrap();
    // Users may set only tags some VM already carries: the new image's id
    // tag is new. The token is no Sys.Modify on / (not privileged).
    let s = sim_with_config(&tmp.path().join("sim"), |c| {
        c.datacenter = serde_json::json!({"user-tag-access": {"user-allow": "existing"}});
        c.acl = Some(
            [(
                "/".to_string(),
                KILN_ROLE.iter().map(|p| p.to_string()).collect(),
            )]
            .into(),
        );
    });
    let img = image(tmp.path(), "lb", "7.0.0", true, false);
    let m = kiln::image::manifest::ImageManifest::load(&img).unwrap();
    let out = kiln(
        tmp.path(),
        &["publish", img.to_str().unwrap()],
        &env_target(&s.url()),
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("user-allow=existing") && err.contains(&format!("`id-{}`", m.short_id())),
        "{err}"
    );
    assert_eq!(s.state().upload_bytes, 0, "refused before the upload");
    assert!(s.state().vms.is_empty());
}

#[test]
fn without_sys_audit_the_tag_policy_is_a_warning_and_the_publish_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim_with_acl(
        &tmp.path().join("sim"),
        &[("/", &role_without(&["Sys.Audit"]))],
    );
    let img = image(tmp.path(), "lb", "7.0.1", true, false);
    let r = publish_json(tmp.path(), &img, &env_target(&s.url()));
    assert!(r.created);
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("tag policy") && w.contains("Sys.Audit")),
        "{:?}",
        r.warnings
    );
}

fn two_node_sim(data: &std::path::Path) -> pve_sim::Sim {
    sim_with_config(data, |c| c.nodes = vec!["pve".into(), "pve2".into()])
}

#[test]
fn a_target_with_two_nodes_gets_one_template_on_each_and_a_republish_uploads_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let s = two_node_sim(&tmp.path().join("sim"));
    let img = image(tmp.path(), "lb", "8.0.0", true, true);
    let m = kiln::image::manifest::ImageManifest::load(&img).unwrap();
    let env = env_target_with(&s.url(), &[("KILN_PVE_NODE", "pve,pve2")]);
    let r = publish_json(tmp.path(), &img, &env);
    assert!(r.created);
    let nodes: Vec<&str> = r.nodes.iter().map(|n| n.node.as_str()).collect();
    assert_eq!(nodes, vec!["pve", "pve2"]);
    assert_ne!(r.nodes[0].vmid, r.nodes[1].vmid);
    for n in &r.nodes {
        assert!(n.created);
        assert_eq!(n.storage, "local-lvm");
        assert_eq!(n.disk_interface, "scsi0");
        assert_eq!(n.virtual_size, m.disk.virtual_size);
    }
    {
        let st = s.state();
        for n in &r.nodes {
            let vm = &st.vms[&n.vmid];
            assert!(vm.template);
            assert_eq!(vm.node, n.node);
            assert_eq!(vm.config["tags"], st.vms[&r.nodes[0].vmid].config["tags"]);
            assert!(vm.config["description"].contains(&format!("kiln-id: {}", m.id)));
        }
        // The disk went to each node's own import storage, and is gone again.
        let upload_nodes: Vec<&str> = st
            .requests
            .iter()
            .filter(|q| q.path.ends_with("/upload") && q.params["content"] == "import")
            .map(|q| q.params["node"].as_str())
            .collect();
        assert_eq!(upload_nodes, vec!["pve", "pve2"]);
        assert!(st.volumes.keys().all(|v| !v.contains(":import/")));
        // The LXC template is on each node's local storage.
        let vol = r.lxc_volume.clone().unwrap();
        assert!(st.volumes.contains_key(&st.volume_key("pve", &vol)));
        assert!(st.volumes.contains_key(&st.volume_key("pve2", &vol)));
    }
    let bytes = s.state().upload_bytes;
    let again = publish_json(tmp.path(), &img, &env);
    assert!(!again.created);
    assert!(again.nodes.iter().all(|n| !n.created));
    assert_eq!(
        again.nodes.iter().map(|n| n.vmid).collect::<Vec<_>>(),
        r.nodes.iter().map(|n| n.vmid).collect::<Vec<_>>()
    );
    assert_eq!(s.state().upload_bytes, bytes, "nothing uploaded again");
}

#[test]
fn a_shared_import_storage_gets_the_disk_once_for_all_nodes() {
    let tmp = tempfile::tempdir().unwrap();
    let s = two_node_sim(&tmp.path().join("sim"));
    let img = image(tmp.path(), "lb", "8.0.1", true, false);
    let env = env_target_with(
        &s.url(),
        &[
            ("KILN_PVE_NODE", "pve,pve2"),
            ("KILN_PVE_IMPORT_STORAGE", "nfs"),
            ("KILN_PVE_IMPORT_SHARED", "1"),
        ],
    );
    let r = publish_json(tmp.path(), &img, &env);
    assert_eq!(r.nodes.len(), 2);
    let st = s.state();
    let uploads = st
        .requests
        .iter()
        .filter(|q| q.path.ends_with("/upload"))
        .count();
    assert_eq!(uploads, 1);
    assert!(r.nodes.iter().all(|n| st.vms[&n.vmid].template));
    assert!(st.volumes.keys().all(|v| !v.contains(":import/")));
}

#[test]
fn a_node_added_to_the_target_gets_its_template_and_the_first_is_left_as_it_is() {
    let tmp = tempfile::tempdir().unwrap();
    let s = two_node_sim(&tmp.path().join("sim"));
    let img = image(tmp.path(), "lb", "8.0.2", true, false);
    let first = publish_json(tmp.path(), &img, &env_target(&s.url()));
    let uploads_before = s.state().upload_bytes;
    let both = publish_json(
        tmp.path(),
        &img,
        &env_target_with(&s.url(), &[("KILN_PVE_NODE", "pve,pve2")]),
    );
    assert!(both.created);
    assert_eq!(both.nodes[0].vmid, first.vmid);
    assert!(!both.nodes[0].created);
    assert!(both.nodes[1].created && both.nodes[1].node == "pve2");
    let m = kiln::image::manifest::ImageManifest::load(&img).unwrap();
    assert_eq!(
        s.state().upload_bytes - uploads_before,
        m.disk.size,
        "one upload, for pve2"
    );
}
