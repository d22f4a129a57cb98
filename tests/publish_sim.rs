//! The PVE simulator's own rules (a stand-in for Proxmox VE): auth, upload
//! framing and field order, file names, task locks and template rules.

mod publish_support;
use publish_support::*;
use serde_json::Value;
use std::io::{Read, Write};

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::new()
}

fn auth() -> String {
    format!("PVEAPIToken={}", token())
}

fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
    let mut b = Vec::new();
    for (name, file, data) in parts {
        b.extend_from_slice(b"--BND\r\n");
        match file {
            Some(f) => b.extend_from_slice(
                format!(
                    "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n\r\n"
                )
                .as_bytes(),
            ),
            None => b.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            ),
        }
        b.extend_from_slice(data);
        b.extend_from_slice(b"\r\n");
    }
    b.extend_from_slice(b"--BND--\r\n");
    b
}

fn upload(s: &pve_sim::Sim, body: Vec<u8>) -> (u16, Value) {
    let r = client()
        .post(format!(
            "{}/api2/json/nodes/pve/storage/local/upload",
            s.url()
        ))
        .header("Authorization", auth())
        .header("Content-Type", "multipart/form-data; boundary=BND")
        .body(body)
        .send()
        .unwrap();
    let code = r.status().as_u16();
    (code, r.json().unwrap_or(Value::Null))
}

fn wait(s: &pve_sim::Sim, upid: &str) -> String {
    for _ in 0..200 {
        if let Some(x) = s.state().tasks.get(upid).and_then(|t| t.exitstatus.clone()) {
            return x;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("task {upid} did not end");
}

#[test]
fn requests_without_a_valid_token_get_401() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(tmp.path());
    let url = format!("{}/api2/json/version", s.url());
    assert_eq!(client().get(&url).send().unwrap().status().as_u16(), 401);
    let r = client()
        .get(&url)
        .header("Authorization", format!("PVEAPIToken={TOKEN_ID}=nope"))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = client()
        .get(&url)
        .header("Authorization", auth())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

#[test]
fn chunked_upload_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(tmp.path());
    // Raw HTTP: a client library may still be sending the chunked body when
    // the refusal arrives and report a broken pipe instead of the answer.
    let mut c = std::net::TcpStream::connect(s.addr()).unwrap();
    write!(
        c,
        "POST /api2/json/nodes/pve/storage/local/upload HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nContent-Type: multipart/form-data; boundary=BND\r\nTransfer-Encoding: chunked\r\n\r\n",
        auth()
    )
    .unwrap();
    let mut resp = String::new();
    c.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 501"), "{resp}");
    assert!(s.state().volumes.is_empty());
}

#[test]
fn upload_without_content_length_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(tmp.path());
    let mut c = std::net::TcpStream::connect(s.addr()).unwrap();
    write!(
        c,
        "POST /api2/json/nodes/pve/storage/local/upload HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nContent-Type: multipart/form-data; boundary=BND\r\n\r\n",
        auth()
    )
    .unwrap();
    let mut resp = String::new();
    c.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 411"), "{resp}");
}

#[test]
fn upload_with_fields_after_the_file_misses_them() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(tmp.path());
    let (code, v) = upload(
        &s,
        multipart(&[
            ("filename", Some("a.qcow2"), b"x"),
            ("content", None, b"import"),
        ]),
    );
    assert_eq!(code, 400);
    assert!(
        v["errors"]["content"].as_str().unwrap().contains("missing"),
        "{v}"
    );
}

#[test]
fn import_upload_named_img_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(tmp.path());
    let (code, v) = upload(
        &s,
        multipart(&[
            ("content", None, b"import"),
            ("filename", Some("disk.img"), b"x"),
        ]),
    );
    assert_eq!(code, 400);
    assert!(v["errors"]["filename"].is_string(), "{v}");
    assert!(std::fs::read_dir(tmp.path().join("var-tmp"))
        .unwrap()
        .next()
        .is_none());
}

#[test]
fn checksum_mismatch_fails_the_upload_task() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(tmp.path());
    let (code, v) = upload(
        &s,
        multipart(&[
            ("content", None, b"import"),
            ("checksum-algorithm", None, b"sha256"),
            ("checksum", None, &[b'0'; 64]),
            ("filename", Some("a.qcow2"), b"data"),
        ]),
    );
    assert_eq!(code, 200);
    let exit = wait(&s, v["data"].as_str().unwrap());
    assert!(exit.contains("checksum mismatch"), "{exit}");
    assert!(s.state().volumes.is_empty());
}

#[test]
fn checksum_without_algorithm_is_a_parameter_error() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(tmp.path());
    let (code, v) = upload(
        &s,
        multipart(&[
            ("content", None, b"import"),
            ("checksum", None, b"abc"),
            ("filename", Some("a.qcow2"), b"data"),
        ]),
    );
    assert_eq!(code, 400);
    assert!(v["errors"]["checksum-algorithm"].is_string(), "{v}");
}

fn post(s: &pve_sim::Sim, path: &str, form: &[(&str, &str)]) -> (u16, Value) {
    let r = client()
        .post(format!("{}/api2/json{path}", s.url()))
        .header("Authorization", auth())
        .form(form)
        .send()
        .unwrap();
    (r.status().as_u16(), r.json().unwrap_or(Value::Null))
}

#[test]
fn create_with_bad_parameters_answers_400_per_parameter() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(tmp.path());
    let (code, v) = post(
        &s,
        "/nodes/pve/qemu",
        &[
            ("vmid", "99"),
            ("name", "not_dns"),
            ("bios", "uefi"),
            ("bogus", "1"),
        ],
    );
    assert_eq!(code, 400);
    for k in ["vmid", "name", "bios", "bogus"] {
        assert!(v["errors"][k].is_string(), "{k} missing in {v}");
    }
    assert!(s.state().vms.is_empty());
}

#[test]
fn an_import_volume_used_as_a_disk_directly_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(tmp.path());
    let (code, v) = post(
        &s,
        "/nodes/pve/qemu",
        &[("vmid", "100"), ("scsi0", "local:import/a.qcow2")],
    );
    assert_eq!(code, 400, "{v}");
    let (code, _) = post(
        &s,
        "/nodes/pve/qemu",
        &[
            ("vmid", "100"),
            ("scsi0", "local-lvm:0,import-from=/var/tmp/a.qcow2"),
        ],
    );
    assert_eq!(code, 403);
}

#[test]
fn a_vm_is_locked_while_its_create_task_runs_and_cannot_become_a_template() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(tmp.path());
    s.inject("create:slow=1".parse().unwrap());
    let (code, v) = post(&s, "/nodes/pve/qemu", &[("vmid", "100"), ("name", "a")]);
    assert_eq!(code, 200, "{v}");
    assert_eq!(s.state().vms[&100].config["lock"], "create");
    let (code, _) = post(&s, "/nodes/pve/qemu/100/template", &[]);
    assert_eq!(code, 500);
    assert_eq!(wait(&s, v["data"].as_str().unwrap()), "OK");
    assert!(!s.state().vms[&100].config.contains_key("lock"));
    let (code, _) = post(&s, "/nodes/pve/qemu/100/template", &[]);
    assert_eq!(code, 200);
}

#[test]
fn a_running_vm_cannot_become_a_template() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(tmp.path());
    s.state().add_vm(100, "a", "", false);
    s.state().vms.get_mut(&100).unwrap().running = true;
    let (code, _) = post(&s, "/nodes/pve/qemu/100/template", &[]);
    assert_eq!(code, 500);
    assert!(!s.state().vms[&100].template);
}

#[test]
fn a_template_with_a_linked_clone_cannot_be_destroyed() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(tmp.path());
    // On ZFS (as on RBD and directories) a linked clone's disk names its
    // base; LVM-thin shows no link and lets the template go.
    s.state().add_vm_on("local-zfs", 100, "t", "kiln", true);
    let (code, v) = post(
        &s,
        "/nodes/pve/qemu/100/clone",
        &[("newid", "101"), ("name", "c")],
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(s.state().vms[&101].config["lock"], "clone");
    assert_eq!(wait(&s, v["data"].as_str().unwrap()), "OK");
    let r = client()
        .delete(format!("{}/api2/json/nodes/pve/qemu/100", s.url()))
        .header("Authorization", auth())
        .send()
        .unwrap();
    let v: Value = r.json().unwrap();
    let exit = wait(&s, v["data"].as_str().unwrap());
    assert!(exit.contains("still in use by linked clone"), "{exit}");
    assert!(s.state().vms.contains_key(&100));
}

#[test]
fn a_clone_gets_a_new_smbios_uuid_and_keeps_the_description() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(tmp.path());
    let uuid = "0f8e6a62-1c2b-4d3e-9f00-aabbccddeeff";
    let (code, v) = post(
        &s,
        "/nodes/pve/qemu",
        &[
            ("vmid", "100"),
            ("smbios1", &format!("uuid={uuid}")),
            ("description", "kiln-run: x"),
        ],
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(wait(&s, v["data"].as_str().unwrap()), "OK");
    let (code, v) = post(
        &s,
        "/nodes/pve/qemu/100/clone",
        &[("newid", "101"), ("name", "c"), ("full", "1")],
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(wait(&s, v["data"].as_str().unwrap()), "OK");
    let st = s.state();
    assert_eq!(st.vms[&100].config["smbios1"], format!("uuid={uuid}"));
    let cloned = &st.vms[&101].config["smbios1"];
    assert!(
        cloned.starts_with("uuid=") && !cloned.contains(uuid),
        "{cloned}"
    );
    assert_eq!(st.vms[&101].config["description"], "kiln-run: x");
}

#[test]
fn a_create_without_smbios1_gets_a_uuid_and_a_bad_uuid_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(tmp.path());
    let (code, v) = post(&s, "/nodes/pve/qemu", &[("vmid", "100")]);
    assert_eq!(code, 200, "{v}");
    assert_eq!(wait(&s, v["data"].as_str().unwrap()), "OK");
    assert!(s.state().vms[&100].config["smbios1"].starts_with("uuid="));
    let (code, v) = post(
        &s,
        "/nodes/pve/qemu",
        &[("vmid", "101"), ("smbios1", "uuid=not-a-uuid")],
    );
    assert_eq!(code, 400);
    assert!(v["errors"]["smbios1"].is_string(), "{v}");
}

#[test]
fn an_upload_name_outside_pves_alphabet_is_stored_rewritten_and_logged() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(tmp.path());
    let (code, v) = upload(
        &s,
        multipart(&[
            ("content", None, b"vztmpl"),
            ("filename", Some("lb-2026.11+b1 x.tar.zst"), b"data"),
        ]),
    );
    assert_eq!(code, 200, "{v}");
    let upid = v["data"].as_str().unwrap().to_string();
    assert_eq!(wait(&s, &upid), "OK");
    let st = s.state();
    assert!(
        st.volumes
            .contains_key("local:vztmpl/lb-2026.11_b1_x.tar.zst"),
        "{:?}",
        st.volumes.keys()
    );
    assert!(
        st.tasks[&upid]
            .log
            .iter()
            .any(|l| l.starts_with("target file: ") && l.ends_with("/lb-2026.11_b1_x.tar.zst")),
        "{:?}",
        st.tasks[&upid].log
    );
}

#[test]
fn vms_the_token_may_not_audit_are_left_out_and_creating_needs_vm_allocate() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim_with_acl(
        tmp.path(),
        &[
            ("/vms/100", &["VM.Audit"]),
            ("/storage", &["Datastore.Audit"]),
        ],
    );
    s.state().add_vm(100, "seen", "", false);
    s.state().add_vm(101, "hidden", "", false);
    let r = client()
        .get(format!("{}/api2/json/cluster/resources?type=vm", s.url()))
        .header("Authorization", auth())
        .send()
        .unwrap();
    let v: Value = r.json().unwrap();
    let ids: Vec<u64> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["vmid"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![100]);
    let (code, v) = post(&s, "/nodes/pve/qemu", &[("vmid", "102")]);
    assert_eq!(code, 403, "{v}");
    let r = client()
        .get(format!(
            "{}/api2/json/access/permissions?path=/vms/100",
            s.url()
        ))
        .header("Authorization", auth())
        .send()
        .unwrap();
    let v: Value = r.json().unwrap();
    assert_eq!(v["data"]["/vms/100"]["VM.Audit"], 1, "{v}");
    assert!(v["data"]["/vms/100"].get("VM.Allocate").is_none(), "{v}");
}

fn delete(s: &pve_sim::Sim, path: &str) -> (u16, Value) {
    let r = client()
        .delete(format!("{}/api2/json{path}", s.url()))
        .header("Authorization", auth())
        .send()
        .unwrap();
    (r.status().as_u16(), r.json().unwrap_or(Value::Null))
}

#[test]
fn linked_clones_are_named_per_storage_type_and_only_lvm_thin_lets_their_template_go() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(tmp.path());
    for (storage, base, linked, refused) in [
        (
            "local-zfs",
            "local-zfs:base-100-disk-1",
            "local-zfs:base-100-disk-1/vm-101-disk-1",
            true,
        ),
        (
            "nfs",
            "nfs:100/base-100-disk-1.qcow2",
            "nfs:100/base-100-disk-1.qcow2/101/vm-101-disk-1.qcow2",
            true,
        ),
        (
            "local-lvm",
            "local-lvm:base-100-disk-1",
            "local-lvm:vm-101-disk-1",
            false,
        ),
    ] {
        s.state().vms.clear();
        s.state().add_vm_on(storage, 100, "t", "kiln", true);
        assert!(s.state().vms[&100].config["scsi0"].starts_with(base));
        let (code, v) = post(&s, "/nodes/pve/qemu/100/clone", &[("newid", "101")]);
        assert_eq!(code, 200, "{v}");
        assert_eq!(wait(&s, v["data"].as_str().unwrap()), "OK");
        let disk = s.state().vms[&101].config["scsi0"].clone();
        assert!(disk.starts_with(&format!("{linked},")), "{storage}: {disk}");
        let (code, v) = delete(&s, "/nodes/pve/qemu/100");
        assert_eq!(code, 200, "{v}");
        let exit = wait(&s, v["data"].as_str().unwrap());
        assert_eq!(
            exit.contains("still in use by linked clone"),
            refused,
            "{storage}: {exit}"
        );
        assert_eq!(s.state().vms.contains_key(&100), refused, "{storage}");
    }
}

#[test]
fn a_tag_the_policy_refuses_fails_the_create_task_after_the_import() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim_with_config(tmp.path(), |c| {
        c.datacenter = serde_json::json!({"registered-tags": ["prod"]});
        c.acl = Some(
            [(
                "/".to_string(),
                KILN_ROLE.iter().map(|p| p.to_string()).collect(),
            )]
            .into(),
        );
    });
    let (code, v) = post(
        &s,
        "/nodes/pve/qemu",
        &[("vmid", "100"), ("tags", "kiln;prod")],
    );
    assert_eq!(code, 200, "{v}");
    let exit = wait(&s, v["data"].as_str().unwrap());
    assert!(
        exit.contains("Sys.Modify for modifying tag 'prod'"),
        "{exit}"
    );
    assert!(s.state().vms.is_empty());
}

#[test]
fn each_node_has_its_own_local_storage_and_vms_while_shared_storage_is_one() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim_with_config(tmp.path(), |c| c.nodes = vec!["pve".into(), "pve2".into()]);
    let body = |name: &str| {
        multipart(&[
            ("content", None, b"import"),
            ("filename", Some(name), b"data"),
        ])
    };
    for (node, storage, name) in [("pve2", "local", "a.qcow2"), ("pve2", "nfs", "b.qcow2")] {
        let r = client()
            .post(format!(
                "{}/api2/json/nodes/{node}/storage/{storage}/upload",
                s.url()
            ))
            .header("Authorization", auth())
            .header("Content-Type", "multipart/form-data; boundary=BND")
            .body(body(name))
            .send()
            .unwrap();
        let v: Value = r.json().unwrap();
        assert_eq!(wait(&s, v["data"].as_str().unwrap()), "OK");
    }
    let content = |node: &str, storage: &str| -> Vec<String> {
        let r = client()
            .get(format!(
                "{}/api2/json/nodes/{node}/storage/{storage}/content",
                s.url()
            ))
            .header("Authorization", auth())
            .send()
            .unwrap();
        let v: Value = r.json().unwrap();
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["volid"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(content("pve2", "local"), vec!["local:import/a.qcow2"]);
    assert!(content("pve", "local").is_empty(), "pve's local is its own");
    assert_eq!(content("pve", "nfs"), vec!["nfs:import/b.qcow2"]);
    let (code, v) = post(&s, "/nodes/pve2/qemu", &[("vmid", "100")]);
    assert_eq!(code, 200, "{v}");
    assert_eq!(wait(&s, v["data"].as_str().unwrap()), "OK");
    assert!(v["data"].as_str().unwrap().starts_with("UPID:pve2:"));
    let r = client()
        .get(format!("{}/api2/json/nodes/pve/qemu/100/config", s.url()))
        .header("Authorization", auth())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 500, "VM 100 is on pve2, not pve");
    let (code, _) = post(&s, "/nodes/pve/qemu", &[("vmid", "100")]);
    assert_eq!(code, 500, "VMIDs are unique in the cluster");
}

/// `ms-cert` on an EFI disk exists from qemu-server 9.0.27 (values 2011 and
/// 2023), `2023k` from 9.1.5; the sim answers as the oldest qemu-server its
/// pve-manager version requires (9.0.28 from 9.0.17, 9.1.11 from 9.1.13).
#[test]
fn efidisk_ms_cert_is_refused_before_pve_9_0_17_and_2023k_before_9_1_13() {
    let tmp = tempfile::tempdir().unwrap();
    let efi = |c: &str| format!("local-lvm:1,efitype=4m,pre-enrolled-keys=1,ms-cert={c}");
    for (version, value, accepted, error) in [
        (
            "8.4.1",
            "2023k",
            false,
            "efidisk0.ms-cert: property is not defined in schema",
        ),
        (
            "9.0.16",
            "2011",
            false,
            "efidisk0.ms-cert: property is not defined in schema",
        ),
        ("9.0.17", "2023", true, ""),
        (
            "9.1.12",
            "2023k",
            false,
            "value '2023k' does not have a value in the enumeration '2011, 2023'",
        ),
        ("9.1.13", "2023k", true, ""),
        ("9.2.11", "2023w", true, ""),
        (
            "9.2.11",
            "2024",
            false,
            "value '2024' does not have a value in the enumeration '2011, 2023, 2023w, 2023k'",
        ),
    ] {
        let s = sim_with_config(&tmp.path().join(format!("{version}-{value}")), |c| {
            c.version = version.into()
        });
        let (code, v) = post(
            &s,
            "/nodes/pve/qemu",
            &[("vmid", "100"), ("efidisk0", &efi(value))],
        );
        if accepted {
            assert_eq!(code, 200, "PVE {version}, ms-cert={value}: {v}");
        } else {
            assert_eq!(code, 400, "PVE {version}, ms-cert={value}: {v}");
            let e = v["errors"]["efidisk0"].as_str().unwrap_or_default();
            assert!(e.contains(error), "PVE {version}, ms-cert={value}: {v}");
            assert!(s.state().vms.is_empty());
        }
    }
}
