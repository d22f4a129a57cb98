//! The VM lifecycle endpoints of pve-sim (a labelled stand-in for the
//! Proxmox VE API, not Proxmox) that an environment provider uses: config
//! update (POST async, PUT sync), resize, shutdown, status, clone across
//! nodes, destroy with an ISO attached. Each test is one rule of qemu-server
//! `PVE/API2/Qemu.pm` / `PVE/QemuServer.pm` (cited in `src/vmconfig.rs` and
//! `src/vms.rs`).

use pve_sim::{Sim, SimConfig, Volume};
use serde_json::Value;
use std::io::{Read, Write};
use std::time::Duration;

const TOKEN: &str = "kiln@pve!test=s3cret";

fn sim_with(f: impl FnOnce(&mut SimConfig)) -> (Sim, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = SimConfig::new(TOKEN, tmp.path());
    cfg.task_delay = Duration::from_millis(20);
    f(&mut cfg);
    (Sim::start(cfg).unwrap(), tmp)
}

fn sim() -> (Sim, tempfile::TempDir) {
    sim_with(|_| {})
}

/// Three nodes, as a small cluster.
fn cluster() -> (Sim, tempfile::TempDir) {
    sim_with(|c| c.nodes = vec!["pve".into(), "pve2".into(), "pve3".into()])
}

/// A token with exactly these privileges on `/`.
fn sim_with_privs(privs: &[&str]) -> (Sim, tempfile::TempDir) {
    let privs: Vec<String> = privs.iter().map(|p| p.to_string()).collect();
    sim_with(move |c| c.acl = Some([("/".to_string(), privs.into_iter().collect())].into()))
}

/// One request over a fresh connection: (status, JSON body).
fn api(s: &Sim, method: &str, path: &str, form: &[(&str, &str)]) -> (u16, Value) {
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let mut tcp = std::net::TcpStream::connect(s.addr()).unwrap();
    write!(
        tcp,
        "{method} /api2/json{path} HTTP/1.1\r\nHost: x\r\nAuthorization: PVEAPIToken={TOKEN}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).unwrap();
    let code = out[9..12].parse().unwrap();
    let json = out
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    (code, json)
}

fn post(s: &Sim, path: &str, form: &[(&str, &str)]) -> (u16, Value) {
    api(s, "POST", path, form)
}

fn put(s: &Sim, path: &str, form: &[(&str, &str)]) -> (u16, Value) {
    api(s, "PUT", path, form)
}

fn get(s: &Sim, path: &str) -> Value {
    let (code, v) = api(s, "GET", path, &[]);
    assert_eq!(code, 200, "GET {path}: {v}");
    v["data"].clone()
}

/// The exit status of the task an answer started.
fn task(s: &Sim, answer: (u16, Value)) -> String {
    let (code, v) = answer;
    assert_eq!(code, 200, "{v}");
    let upid = v["data"].as_str().expect("a UPID").to_string();
    for _ in 0..500 {
        if let Some(x) = s
            .state()
            .tasks
            .get(&upid)
            .and_then(|t| t.exitstatus.clone())
        {
            return x;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("task {upid} did not end");
}

/// The task log of the task an answer started (after it ended).
fn task_log(s: &Sim, upid: &str) -> Vec<String> {
    s.state().tasks[upid].log.clone()
}

fn config(s: &Sim, node: &str, vmid: u32) -> Value {
    get(s, &format!("/nodes/{node}/qemu/{vmid}/config"))
}

/// An ISO image in `local` of `node`, as an upload would leave it.
fn seed_iso(s: &Sim, node: &str, name: &str) -> String {
    let volid = format!("local:iso/{name}");
    let mut st = s.state();
    let key = st.volume_key(node, &volid);
    st.volumes.insert(
        key,
        Volume {
            volid: volid.clone(),
            content: "iso".into(),
            format: "iso".into(),
            size: 1 << 20,
            ctime: 0,
            path: None,
        },
    );
    volid
}

// ---- 1. POST/PUT config ----------------------------------------------------

#[test]
fn config_post_answers_a_upid_and_its_task_applies_the_change() {
    let (s, _t) = sim();
    s.state().add_vm(100, "a", "", false);
    let answer = post(
        &s,
        "/nodes/pve/qemu/100/config",
        &[("cores", "4"), ("memory", "2048"), ("sockets", "2")],
    );
    let upid = answer.1["data"].as_str().unwrap().to_string();
    assert!(upid.contains(":qmconfig:100:"), "{upid}");
    assert_eq!(task(&s, answer), "OK");
    let c = config(&s, "pve", 100);
    assert_eq!(
        (c["cores"].as_str(), c["memory"].as_str()),
        (Some("4"), Some("2048"))
    );
    assert_eq!(c["sockets"], "2");
    assert!(
        task_log(&s, &upid)
            .iter()
            .any(|l| l == "update VM 100: -cores 4 -memory 2048 -sockets 2"),
        "{:?}",
        task_log(&s, &upid)
    );
}

#[test]
fn config_put_applies_the_change_before_answering_null() {
    let (s, _t) = sim();
    s.state().add_vm(100, "a", "", false);
    let (code, v) = put(&s, "/nodes/pve/qemu/100/config", &[("name", "web-1")]);
    assert_eq!((code, &v["data"]), (200, &Value::Null), "{v}");
    assert_eq!(s.state().vms[&100].config["name"], "web-1");
    // background_delay belongs to the POST variant only.
    let (code, v) = put(
        &s,
        "/nodes/pve/qemu/100/config",
        &[("name", "web-2"), ("background_delay", "5")],
    );
    assert_eq!(code, 400, "{v}");
    assert!(v["errors"]["background_delay"].is_string(), "{v}");
}

#[test]
fn config_post_with_background_delay_answers_null_when_its_task_ended_in_time() {
    let (s, _t) = sim();
    s.state().add_vm(100, "a", "", false);
    let (code, v) = post(
        &s,
        "/nodes/pve/qemu/100/config",
        &[("cores", "2"), ("background_delay", "5")],
    );
    assert_eq!((code, &v["data"]), (200, &Value::Null), "{v}");
    assert_eq!(s.state().vms[&100].config["cores"], "2");
    let (code, v) = post(
        &s,
        "/nodes/pve/qemu/100/config",
        &[
            ("ide2", "local:iso/none.iso,media=cdrom"),
            ("background_delay", "5"),
        ],
    );
    assert_eq!(code, 500, "{v}");
    assert_eq!(
        v["message"].as_str().unwrap().trim(),
        "failed to update VM 100: volume local:iso/none.iso does not exist"
    );
}

#[test]
fn config_update_checks_option_values_as_create_does() {
    let (s, _t) = sim();
    s.state().add_vm(100, "a", "", false);
    let long = "x".repeat(8193);
    let (code, v) = post(
        &s,
        "/nodes/pve/qemu/100/config",
        &[
            ("cores", "0"),
            ("name", "not_dns"),
            ("description", &long),
            ("tags", "ok;-bad"),
            ("net0", "virtio,bridge=vmbr0,color=red"),
            ("bogus", "1"),
        ],
    );
    assert_eq!(code, 400, "{v}");
    for k in ["cores", "name", "description", "tags", "net0", "bogus"] {
        assert!(v["errors"][k].is_string(), "{k} missing in {v}");
    }
    assert_eq!(
        v["errors"]["description"],
        "value may only be 8192 characters long"
    );
    // 8 KiB exactly is fine.
    let ok = "x".repeat(8192);
    assert_eq!(
        task(
            &s,
            post(&s, "/nodes/pve/qemu/100/config", &[("description", &ok)])
        ),
        "OK"
    );
}

#[test]
fn config_update_needs_the_privilege_of_each_option_it_sets_or_deletes() {
    let (s, _t) = sim_with_privs(&["VM.Audit", "VM.Config.CPU"]);
    s.state().add_vm(100, "a", "", false);
    assert_eq!(
        task(
            &s,
            post(&s, "/nodes/pve/qemu/100/config", &[("cores", "2")])
        ),
        "OK"
    );
    for (form, privilege) in [
        (("memory", "1024"), "VM.Config.Memory"),
        (("net0", "virtio,bridge=vmbr0"), "VM.Config.Network"),
        (("description", "x"), "VM.Config.Options"),
        (("delete", "memory"), "VM.Config.Memory"),
    ] {
        let (code, v) = post(&s, "/nodes/pve/qemu/100/config", &[form]);
        assert_eq!(code, 403, "{form:?}: {v}");
        assert_eq!(
            v["message"].as_str().unwrap().trim(),
            format!("Permission check failed (/vms/100, {privilege})"),
            "{form:?}"
        );
    }
    // Without any VM.Config.* privilege the endpoint itself is refused.
    let (s, _t) = sim_with_privs(&["VM.Audit"]);
    s.state().add_vm(100, "a", "", false);
    let (code, _) = post(&s, "/nodes/pve/qemu/100/config", &[("cores", "2")]);
    assert_eq!(code, 403);
}

#[test]
fn an_iso_on_ide2_must_exist_on_the_vms_node_and_needs_vm_config_cdrom() {
    let (s, _t) = cluster();
    s.state().add_vm(100, "a", "", false);
    let iso = seed_iso(&s, "pve2", "kiln-cidata-100.iso");
    let cdrom = format!("{iso},media=cdrom");
    // The ISO is on pve2's local storage, the VM on pve.
    let exit = task(
        &s,
        post(&s, "/nodes/pve/qemu/100/config", &[("ide2", &cdrom)]),
    );
    assert_eq!(exit, format!("volume {iso} does not exist"));
    assert!(!s.state().vms[&100].config.contains_key("ide2"));
    seed_iso(&s, "pve", "kiln-cidata-100.iso");
    let exit = task(
        &s,
        post(&s, "/nodes/pve/qemu/100/config", &[("ide2", &cdrom)]),
    );
    assert_eq!(exit, "OK");
    assert_eq!(s.state().vms[&100].config["ide2"], cdrom);
    // Content other than images or iso is refused as the drive's value.
    let (code, v) = post(
        &s,
        "/nodes/pve/qemu/100/config",
        &[("ide3", "local:vztmpl/x.tar.zst,media=cdrom")],
    );
    assert_eq!(code, 400, "{v}");
    assert_eq!(
        v["errors"]["ide3"],
        "content type needs to be 'images' or 'iso'"
    );

    // VM.Config.Disk is not enough for a CD-ROM: PVE checks the drive's
    // privilege when it applies the change, in the task.
    let (s, _t) = sim_with_privs(&["VM.Audit", "VM.Config.Disk", "Datastore.Audit"]);
    s.state().add_vm(100, "a", "", false);
    let iso = seed_iso(&s, "pve", "seed.iso");
    let exit = task(
        &s,
        post(
            &s,
            "/nodes/pve/qemu/100/config",
            &[("ide2", &format!("{iso},media=cdrom"))],
        ),
    );
    assert_eq!(exit, "Permission check failed (/vms/100, VM.Config.CDROM)");
}

#[test]
fn a_locked_vm_refuses_config_changes() {
    let (s, _t) = sim();
    s.state().add_vm(100, "a", "", false);
    s.state()
        .vms
        .get_mut(&100)
        .unwrap()
        .config
        .insert("lock".into(), "clone".into());
    for (code, v) in [
        post(&s, "/nodes/pve/qemu/100/config", &[("cores", "2")]),
        put(&s, "/nodes/pve/qemu/100/config", &[("cores", "2")]),
    ] {
        assert_eq!(code, 500, "{v}");
        assert_eq!(
            v["message"].as_str().unwrap().trim(),
            "VM is locked (clone)"
        );
    }
    assert!(!s.state().vms[&100].config.contains_key("cores"));
}

#[test]
fn a_template_takes_config_changes_as_pve_refuses_none() {
    // $update_vm_api has no template check (unlike start, move_disk or
    // template itself): a template's name, tags and hardware may change.
    let (s, _t) = sim();
    s.state().add_vm(9000, "t", "kiln", true);
    let exit = task(
        &s,
        post(
            &s,
            "/nodes/pve/qemu/9000/config",
            &[("name", "t2"), ("tags", "kiln;old"), ("cores", "2")],
        ),
    );
    assert_eq!(exit, "OK");
    let c = &s.state().vms[&9000].config;
    assert_eq!((c["name"].as_str(), c["tags"].as_str()), ("t2", "kiln;old"));
    assert_eq!(c["cores"], "2");
}

#[test]
fn tags_are_normalised_and_a_tag_the_policy_refuses_fails_the_task() {
    let (s, _t) = sim_with(|c| {
        c.datacenter = serde_json::json!({"registered-tags": ["prod"]});
        c.acl = Some(
            [(
                "/".to_string(),
                ["VM.Audit", "VM.Config.Options"]
                    .iter()
                    .map(|p| p.to_string())
                    .collect(),
            )]
            .into(),
        );
    });
    s.state().add_vm(100, "a", "", false);
    assert_eq!(
        task(
            &s,
            post(
                &s,
                "/nodes/pve/qemu/100/config",
                &[("tags", "Web;kiln,web b")]
            )
        ),
        "OK"
    );
    assert_eq!(s.state().vms[&100].config["tags"], "b;kiln;web");
    let exit = task(
        &s,
        post(&s, "/nodes/pve/qemu/100/config", &[("tags", "kiln;prod")]),
    );
    assert_eq!(
        exit,
        "Permission check failed (/, Sys.Modify for modifying tag 'prod')"
    );
    // Only changed tags are checked: a VM already tagged `prod` (by an
    // administrator) keeps it through an unrelated tag change.
    s.state()
        .vms
        .get_mut(&100)
        .unwrap()
        .config
        .insert("tags".into(), "kiln;prod".into());
    assert_eq!(
        task(
            &s,
            post(
                &s,
                "/nodes/pve/qemu/100/config",
                &[("tags", "kiln;prod;new")]
            )
        ),
        "OK"
    );
}

#[test]
fn a_stale_digest_is_refused_and_the_current_one_accepted() {
    let (s, _t) = sim();
    s.state().add_vm(100, "a", "", false);
    let digest = config(&s, "pve", 100)["digest"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(digest.len(), 40, "PVE's digests are SHA-1 hex");
    assert_eq!(
        task(
            &s,
            post(
                &s,
                "/nodes/pve/qemu/100/config",
                &[("cores", "2"), ("digest", &digest)]
            )
        ),
        "OK"
    );
    let (code, v) = post(
        &s,
        "/nodes/pve/qemu/100/config",
        &[("cores", "3"), ("digest", &digest)],
    );
    assert_eq!(code, 500, "{v}");
    assert_eq!(
        v["message"].as_str().unwrap().trim(),
        "checksum mismatch (file change by other user?)"
    );
    let (code, v) = post(
        &s,
        "/nodes/pve/qemu/100/config",
        &[("cores", "3"), ("digest", &"0".repeat(41))],
    );
    assert_eq!(code, 400, "{v}");
}

#[test]
fn delete_removes_options_and_refuses_unknown_or_doubly_given_ones() {
    let (s, _t) = sim();
    s.state().add_vm(100, "a", "kiln", false);
    let iso = seed_iso(&s, "pve", "x.iso");
    assert_eq!(
        task(
            &s,
            post(
                &s,
                "/nodes/pve/qemu/100/config",
                &[
                    ("ide2", &format!("{iso},media=cdrom")),
                    ("description", "d")
                ]
            )
        ),
        "OK"
    );
    let upid = post(
        &s,
        "/nodes/pve/qemu/100/config",
        &[("delete", "cdrom,description,memory")],
    );
    let id = upid.1["data"].as_str().unwrap().to_string();
    assert_eq!(task(&s, upid), "OK");
    let c = s.state().vms[&100].config.clone();
    assert!(
        !c.contains_key("ide2") && !c.contains_key("description"),
        "{c:?}"
    );
    assert!(task_log(&s, &id)
        .contains(&"cannot delete 'memory' - not set in current configuration!".to_string()));
    // The ISO is no disk of the VM: it does not become `unused0`.
    assert!(!c.contains_key("unused0"), "{c:?}");
    let (code, v) = post(
        &s,
        "/nodes/pve/qemu/100/config",
        &[("delete", "frobnicate")],
    );
    assert_eq!(
        (code, v["errors"]["delete"].as_str()),
        (400, Some("unknown option 'frobnicate'"))
    );
    let (code, v) = post(
        &s,
        "/nodes/pve/qemu/100/config",
        &[("delete", "cores"), ("cores", "2")],
    );
    assert_eq!(code, 400, "{v}");
    let (code, v) = post(&s, "/nodes/pve/qemu/100/config", &[]);
    assert_eq!(code, 500);
    assert_eq!(
        v["message"].as_str().unwrap().trim(),
        "no options specified"
    );
}

#[test]
fn a_nic_without_a_mac_gets_one_as_pve_prints_it() {
    let (s, _t) = sim();
    s.state().add_vm(100, "a", "", false);
    assert_eq!(
        task(
            &s,
            post(
                &s,
                "/nodes/pve/qemu/100/config",
                &[("net0", "virtio,bridge=vmbr0,firewall=1")]
            )
        ),
        "OK"
    );
    let net = s.state().vms[&100].config["net0"].clone();
    let re = |n: &str| {
        let (mac, rest) = n.strip_prefix("virtio=").unwrap().split_once(',').unwrap();
        assert!(mac.starts_with("BC:24:11:") && mac.len() == 17, "{n}");
        rest.to_string()
    };
    assert_eq!(re(&net), "bridge=vmbr0,firewall=1");
    // Sent back as PVE printed it, it is accepted and keeps its MAC.
    assert_eq!(
        task(
            &s,
            post(&s, "/nodes/pve/qemu/100/config", &[("net0", &net)])
        ),
        "OK"
    );
    assert_eq!(s.state().vms[&100].config["net0"], net);
}

#[test]
fn a_running_vm_keeps_cores_pending_until_it_starts_but_takes_tags_at_once() {
    let (s, _t) = sim();
    s.state().add_vm(100, "a", "", false);
    s.state().vms.get_mut(&100).unwrap().running = true;
    assert_eq!(
        task(
            &s,
            post(
                &s,
                "/nodes/pve/qemu/100/config",
                &[("cores", "8"), ("tags", "x")]
            )
        ),
        "OK"
    );
    let current = get(&s, "/nodes/pve/qemu/100/config?current=1");
    assert!(current.get("cores").is_none(), "{current}");
    assert_eq!(current["tags"], "x");
    // Without `current` the config shows the pending values.
    assert_eq!(config(&s, "pve", 100)["cores"], "8");
    task(&s, post(&s, "/nodes/pve/qemu/100/status/stop", &[]));
    task(&s, post(&s, "/nodes/pve/qemu/100/status/start", &[]));
    assert_eq!(
        get(&s, "/nodes/pve/qemu/100/config?current=1")["cores"],
        "8"
    );
}

/// The real schema (../shared/pve-api, or PVE_API_SCHEMA_DIR); None (test
/// skipped with a reason) when it is not there, a failure under CI.
fn schema() -> Option<Value> {
    let dir = std::env::var_os("PVE_API_SCHEMA_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/pve-api")
        });
    let p = dir.join("schema-subset.json");
    match std::fs::read_to_string(&p) {
        Ok(t) => Some(serde_json::from_str(&t).unwrap()),
        Err(e) if std::env::var_os("CI").is_some() => {
            panic!("{} not readable in CI: {e}", p.display())
        }
        Err(e) => {
            eprintln!("SKIPPED: {} not readable ({e})", p.display());
            None
        }
    }
}

#[test]
fn the_config_update_parameters_kiln_sends_are_those_of_the_real_schema() {
    let Some(schema) = schema() else { return };
    let ep = &schema["/nodes/{node}/qemu/{vmid}/config"];
    let (s, _t) = sim();
    s.state().add_vm(100, "a", "", false);
    let iso = seed_iso(&s, "pve", "x.iso");
    let cdrom = format!("{iso},media=cdrom");
    let sent = [
        ("cores", "2"),
        ("memory", "2048"),
        ("sockets", "1"),
        ("tags", "kiln"),
        ("description", "d"),
        ("name", "n"),
        ("net0", "virtio,bridge=vmbr0,firewall=1"),
        ("ide2", cdrom.as_str()),
    ];
    for method in ["POST", "PUT"] {
        let props = &ep[method]["parameters"]["properties"];
        for (k, _) in sent.iter().chain(&[("delete", ""), ("digest", "")]) {
            let schema_key = k.trim_end_matches(char::is_numeric);
            let schema_key = if schema_key.len() < k.len() {
                format!("{schema_key}[n]")
            } else {
                k.to_string()
            };
            assert!(
                props.get(&schema_key).is_some(),
                "{method} has no {schema_key}"
            );
        }
        assert_eq!(
            props.get("background_delay").is_some(),
            method == "POST",
            "background_delay is POST-only"
        );
        assert_eq!(
            props["digest"]["maxLength"], 40,
            "digests are at most 40 characters"
        );
        assert_eq!(props["description"]["maxLength"], 8192);
        assert_eq!(props["tags"]["format"], "pve-tag-list");
    }
    // What the schema says each method returns: a task id (POST), null (PUT).
    assert_eq!(ep["POST"]["returns"]["type"], "string");
    assert_eq!(ep["PUT"]["returns"]["type"], "null");
    let (code, v) = put(&s, "/nodes/pve/qemu/100/config", &sent);
    assert_eq!((code, &v["data"]), (200, &Value::Null), "{v}");
    let shutdown = &schema["/nodes/{node}/qemu/{vmid}/status/shutdown"]["POST"];
    for k in ["timeout", "forceStop", "keepActive", "skiplock"] {
        assert!(shutdown["parameters"]["properties"].get(k).is_some(), "{k}");
    }
}

// ---- 2. resize --------------------------------------------------------------

#[test]
fn resize_answers_a_upid_and_grows_the_disk_relatively_or_absolutely() {
    let (s, _t) = sim();
    s.state().add_vm_on("local-zfs", 100, "a", "", false);
    let answer = put(
        &s,
        "/nodes/pve/qemu/100/resize",
        &[("disk", "scsi0"), ("size", "+2G")],
    );
    assert!(answer.1["data"].as_str().unwrap().contains(":resize:100:"));
    assert_eq!(task(&s, answer), "OK");
    assert!(s.state().vms[&100].config["scsi0"].ends_with(",size=6G"));
    assert_eq!(
        task(
            &s,
            put(
                &s,
                "/nodes/pve/qemu/100/resize",
                &[("disk", "scsi0"), ("size", "6656M")]
            )
        ),
        "OK"
    );
    assert!(s.state().vms[&100].config["scsi0"].ends_with(",size=6656M"));
}

#[test]
fn resize_refuses_to_shrink_with_pves_message() {
    let (s, _t) = sim();
    s.state().add_vm(100, "a", "", false);
    let exit = task(
        &s,
        put(
            &s,
            "/nodes/pve/qemu/100/resize",
            &[("disk", "scsi0"), ("size", "1G")],
        ),
    );
    assert_eq!(exit, "shrinking disks is not supported");
    assert!(s.state().vms[&100].config["scsi0"].ends_with(",size=4G"));
}

#[test]
fn resize_of_a_cdrom_a_missing_disk_or_a_locked_vm_fails_its_task() {
    let (s, _t) = sim();
    s.state().add_vm(100, "a", "", false);
    let iso = seed_iso(&s, "pve", "x.iso");
    s.state()
        .vms
        .get_mut(&100)
        .unwrap()
        .config
        .insert("ide2".into(), format!("{iso},media=cdrom"));
    let resize = |disk: &str| {
        task(
            &s,
            put(
                &s,
                "/nodes/pve/qemu/100/resize",
                &[("disk", disk), ("size", "+1G")],
            ),
        )
    };
    assert_eq!(resize("ide2"), "you can't resize a cdrom");
    assert_eq!(resize("scsi1"), "disk 'scsi1' does not exist");
    s.state()
        .vms
        .get_mut(&100)
        .unwrap()
        .config
        .insert("lock".into(), "backup".into());
    assert_eq!(resize("scsi0"), "VM is locked (backup)");
}

#[test]
fn resize_checks_its_disk_and_size_parameters() {
    let (s, _t) = sim();
    s.state().add_vm(100, "a", "", false);
    let (code, v) = put(
        &s,
        "/nodes/pve/qemu/100/resize",
        &[("disk", "scsi99"), ("size", "-1G")],
    );
    assert_eq!(code, 400, "{v}");
    assert!(
        v["errors"]["disk"].is_string() && v["errors"]["size"].is_string(),
        "{v}"
    );
    let (s, _t) = sim_with_privs(&["VM.Audit", "VM.Config.CPU"]);
    s.state().add_vm(100, "a", "", false);
    let (code, _) = put(
        &s,
        "/nodes/pve/qemu/100/resize",
        &[("disk", "scsi0"), ("size", "+1G")],
    );
    assert_eq!(code, 403, "resize needs VM.Config.Disk");
}

// ---- 3. shutdown ------------------------------------------------------------

#[test]
fn shutdown_stops_a_running_vm_and_is_nothing_for_a_stopped_one() {
    let (s, _t) = sim();
    s.state().add_vm(100, "a", "", false);
    s.state().vms.get_mut(&100).unwrap().running = true;
    let answer = post(
        &s,
        "/nodes/pve/qemu/100/status/shutdown",
        &[("timeout", "30")],
    );
    assert!(answer.1["data"]
        .as_str()
        .unwrap()
        .contains(":qmshutdown:100:"));
    assert_eq!(task(&s, answer), "OK");
    assert!(!s.state().vms[&100].running);
    assert_eq!(
        task(&s, post(&s, "/nodes/pve/qemu/100/status/shutdown", &[])),
        "OK"
    );
}

#[test]
fn a_guest_ignoring_acpi_fails_shutdown_with_pves_timeout_unless_force_stop() {
    let (s, _t) = sim();
    s.state().add_vm(100, "a", "", false);
    s.state().vms.get_mut(&100).unwrap().running = true;
    s.inject("shutdown:ignore-acpi*2".parse().unwrap());
    let exit = task(
        &s,
        post(
            &s,
            "/nodes/pve/qemu/100/status/shutdown",
            &[("timeout", "1")],
        ),
    );
    assert_eq!(exit, "VM quit/powerdown failed - got timeout");
    assert!(s.state().vms[&100].running, "still running");
    let answer = post(
        &s,
        "/nodes/pve/qemu/100/status/shutdown",
        &[("timeout", "1"), ("forceStop", "1")],
    );
    let upid = answer.1["data"].as_str().unwrap().to_string();
    assert_eq!(task(&s, answer), "OK");
    assert!(!s.state().vms[&100].running, "forceStop stops it");
    assert!(task_log(&s, &upid)
        .contains(&"VM still running - terminating now with SIGTERM".to_string()));
}

#[test]
fn shutdown_needs_vm_power_mgmt_and_keep_active_is_root_only() {
    let (s, _t) = sim_with_privs(&["VM.Audit", "VM.Config.CPU"]);
    s.state().add_vm(100, "a", "", false);
    let (code, v) = post(&s, "/nodes/pve/qemu/100/status/shutdown", &[]);
    assert_eq!(code, 403, "{v}");
    let (s, _t) = sim();
    s.state().add_vm(100, "a", "", false);
    let (code, v) = post(
        &s,
        "/nodes/pve/qemu/100/status/shutdown",
        &[("keepActive", "1")],
    );
    assert_eq!(code, 400, "{v}");
    assert_eq!(v["errors"]["keepActive"], "Only root may use this option.");
}

// ---- 4. status -------------------------------------------------------------

#[test]
fn status_current_answers_status_qmpstatus_name_tags_and_lock_as_pve() {
    let (s, _t) = sim();
    s.state().add_vm(100, "web-1", "kiln;web", false);
    s.state().add_vm(101, "", "", false);
    let v = get(&s, "/nodes/pve/qemu/100/status/current");
    assert_eq!(
        (v["status"].as_str(), v["qmpstatus"].as_str()),
        (Some("stopped"), Some("stopped"))
    );
    assert_eq!(
        (v["name"].as_str(), v["tags"].as_str()),
        (Some("web-1"), Some("kiln;web"))
    );
    assert!(v.get("lock").is_none() && v.get("template").is_none() && v.get("pid").is_none());
    {
        let mut st = s.state();
        let vm = st.vms.get_mut(&100).unwrap();
        vm.running = true;
        vm.config.insert("lock".into(), "backup".into());
        st.vms.get_mut(&101).unwrap().config.remove("name");
    }
    let v = get(&s, "/nodes/pve/qemu/100/status/current");
    assert_eq!(
        (v["status"].as_str(), v["qmpstatus"].as_str()),
        (Some("running"), Some("running"))
    );
    assert_eq!(v["lock"], "backup");
    assert!(v["pid"].is_u64());
    // A VM without a name is "VM <vmid>" (vmstatus).
    assert_eq!(
        get(&s, "/nodes/pve/qemu/101/status/current")["name"],
        "VM 101"
    );
}

#[test]
fn cluster_resources_show_each_vms_status() {
    let (s, _t) = cluster();
    s.state().add_vm(100, "a", "", false);
    s.state().add_vm(101, "b", "", false);
    s.state().vms.get_mut(&101).unwrap().running = true;
    let list = get(&s, "/cluster/resources?type=vm");
    let status = |id: u64| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|e| e["vmid"] == id)
            .map(|e| e["status"].as_str().unwrap().to_string())
    };
    assert_eq!(status(100).as_deref(), Some("stopped"));
    assert_eq!(status(101).as_deref(), Some("running"));
}

// ---- 5. clone across nodes ----------------------------------------------------

#[test]
fn cloning_to_another_node_is_refused_while_the_vm_uses_local_storage_even_as_a_full_clone_to_shared_storage(
) {
    let (s, _t) = cluster();
    s.state().add_vm_on("local-lvm", 9000, "t", "kiln", true);
    for form in [
        vec![("newid", "120"), ("target", "pve2")],
        vec![
            ("newid", "120"),
            ("target", "pve2"),
            ("full", "1"),
            ("storage", "nfs"),
        ],
    ] {
        let (code, v) = post(&s, "/nodes/pve/qemu/9000/clone", &form);
        assert_eq!(code, 500, "{form:?}: {v}");
        assert_eq!(
            v["message"].as_str().unwrap().trim(),
            "can't clone VM to node 'pve2' (VM uses local storage)"
        );
    }
    // An ISO on local storage makes a VM local too.
    s.state().add_vm_on("nfs", 9001, "t2", "kiln", true);
    let iso = seed_iso(&s, "pve", "x.iso");
    s.state()
        .vms
        .get_mut(&9001)
        .unwrap()
        .config
        .insert("ide2".into(), format!("{iso},media=cdrom"));
    let (code, v) = post(
        &s,
        "/nodes/pve/qemu/9001/clone",
        &[("newid", "121"), ("target", "pve2")],
    );
    assert_eq!(code, 500, "{v}");
    assert!(s.state().vms.len() == 2, "no clone was made");
}

#[test]
fn a_template_on_shared_storage_clones_to_another_node_which_then_holds_the_clone() {
    let (s, _t) = cluster();
    s.state().add_vm_on("nfs", 9000, "t", "kiln", true);
    let answer = post(
        &s,
        "/nodes/pve/qemu/9000/clone",
        &[("newid", "120"), ("name", "web-1"), ("target", "pve3")],
    );
    assert!(answer.1["data"].as_str().unwrap().starts_with("UPID:pve:"));
    assert_eq!(task(&s, answer), "OK");
    assert_eq!(s.state().vms[&120].node, "pve3");
    assert_eq!(config(&s, "pve3", 120)["name"], "web-1");
    let (code, _) = api(&s, "GET", "/nodes/pve/qemu/120/config", &[]);
    assert_eq!(code, 500, "the clone's config is on pve3, not pve");
    // A target that is no cluster node.
    let (code, v) = post(
        &s,
        "/nodes/pve/qemu/9000/clone",
        &[("newid", "121"), ("target", "pve9")],
    );
    assert_eq!(code, 500);
    assert_eq!(
        v["message"].as_str().unwrap().trim(),
        "no such cluster node 'pve9'"
    );
    // Non-shared `storage` for another node.
    let (code, v) = post(
        &s,
        "/nodes/pve/qemu/9000/clone",
        &[
            ("newid", "121"),
            ("target", "pve2"),
            ("full", "1"),
            ("storage", "local-zfs"),
        ],
    );
    assert_eq!(code, 500);
    assert_eq!(
        v["message"].as_str().unwrap().trim(),
        "can't clone to non-shared storage 'local-zfs'"
    );
}

#[test]
fn a_full_clone_goes_to_the_storage_asked_for_and_a_linked_clone_refuses_one() {
    let (s, _t) = sim();
    s.state().add_vm_on("local-lvm", 9000, "t", "kiln", true);
    let (code, v) = post(
        &s,
        "/nodes/pve/qemu/9000/clone",
        &[("newid", "120"), ("storage", "local-zfs")],
    );
    assert_eq!(code, 500, "{v}");
    assert_eq!(
        v["message"].as_str().unwrap().trim(),
        "parameter 'storage' not allowed for linked clones"
    );
    assert_eq!(
        task(
            &s,
            post(
                &s,
                "/nodes/pve/qemu/9000/clone",
                &[("newid", "120"), ("full", "1"), ("storage", "local-dir")]
            )
        ),
        "OK"
    );
    let disk = s.state().vms[&120].config["scsi0"].clone();
    assert!(
        disk.starts_with("local-dir:120/vm-120-disk-1.qcow2,"),
        "{disk}"
    );
    assert!(s
        .state()
        .volumes
        .contains_key("local-dir:120/vm-120-disk-1.qcow2"));
    let (code, v) = post(
        &s,
        "/nodes/pve/qemu/9000/clone",
        &[("newid", "121"), ("full", "1"), ("storage", "local")],
    );
    assert_eq!(code, 400, "`local` takes no VM images: {v}");
}

// ---- 6. destroy with an ISO ----------------------------------------------------

#[test]
fn destroying_a_vm_keeps_the_iso_it_had_attached() {
    let (s, _t) = sim();
    s.state().add_vm_on("local-dir", 120, "web-1", "", false);
    // Named like the VM's own volumes on purpose: still no VM owns an ISO.
    let iso = seed_iso(&s, "pve", "vm-120-cidata.iso");
    assert_eq!(
        task(
            &s,
            post(
                &s,
                "/nodes/pve/qemu/120/config",
                &[
                    ("ide2", &format!("{iso},media=cdrom")),
                    ("scsi1", "local-dir:1")
                ]
            )
        ),
        "OK"
    );
    let disk = "local-dir:120/vm-120-disk-0.qcow2";
    assert!(
        s.state().volumes.contains_key(disk),
        "{:?}",
        s.state().volumes.keys()
    );
    let exit = task(
        &s,
        api(
            &s,
            "DELETE",
            "/nodes/pve/qemu/120?purge=1&destroy-unreferenced-disks=1",
            &[],
        ),
    );
    assert_eq!(exit, "OK");
    let st = s.state();
    assert!(!st.vms.contains_key(&120));
    assert!(!st.volumes.contains_key(disk), "the VM's disk is freed");
    assert!(
        st.volumes.contains_key(&iso),
        "the ISO stays: {:?}",
        st.volumes.keys()
    );
}

#[test]
fn create_keeps_an_iso_cdrom_as_it_is_and_allocates_only_new_disks() {
    let (s, _t) = sim();
    let iso = seed_iso(&s, "pve", "x.iso");
    let cdrom = format!("{iso},media=cdrom");
    assert_eq!(
        task(
            &s,
            post(
                &s,
                "/nodes/pve/qemu",
                &[("vmid", "100"), ("ide2", &cdrom), ("scsi0", "local-lvm:4")]
            )
        ),
        "OK"
    );
    let c = s.state().vms[&100].config.clone();
    assert_eq!(c["ide2"], cdrom);
    assert!(c["scsi0"].starts_with("local-lvm:vm-100-disk-"), "{c:?}");
    let (code, v) = post(
        &s,
        "/nodes/pve/qemu",
        &[
            ("vmid", "101"),
            ("ide2", "local:iso/missing.iso,media=cdrom"),
        ],
    );
    assert_eq!(code, 500, "{v}");
    assert_eq!(
        v["message"].as_str().unwrap().trim(),
        "volume local:iso/missing.iso does not exist"
    );
}

#[test]
fn a_drive_records_its_size_an_imported_one_its_sources_virtual_size_and_a_clone_keeps_it() {
    // create_disks writes `size=` on every drive it makes; an import takes
    // the source image's virtual size (qemu-server PVE/API2/Qemu.pm,
    // `create_disks`, and PVE/QemuServer/ImportDisk.pm).
    let (s, t) = sim();
    let file = t.path().join("src.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&file)
        .arg("96M")
        .status()
        .expect("qemu-img runs (apt install qemu-utils)");
    assert!(st.success());
    s.state().volumes.insert(
        "local:import/src.qcow2".into(),
        Volume {
            volid: "local:import/src.qcow2".into(),
            content: "import".into(),
            format: "qcow2".into(),
            size: std::fs::metadata(&file).unwrap().len(),
            ctime: 0,
            path: Some(file),
        },
    );
    let answer = post(
        &s,
        "/nodes/pve/qemu",
        &[
            ("vmid", "100"),
            ("scsi0", "local-lvm:0,import-from=local:import/src.qcow2"),
            ("scsi1", "local-lvm:2"),
        ],
    );
    assert_eq!(task(&s, answer), "OK");
    let c = s.state().vms[&100].config.clone();
    assert!(c["scsi0"].ends_with(",size=96M"), "{c:?}");
    assert!(c["scsi1"].ends_with(",size=2G"), "{c:?}");
    assert_eq!(
        task(&s, post(&s, "/nodes/pve/qemu/100/template", &[])),
        "OK"
    );
    let answer = post(&s, "/nodes/pve/qemu/100/clone", &[("newid", "101")]);
    assert_eq!(task(&s, answer), "OK");
    assert!(s.state().vms[&101].config["scsi0"].ends_with(",size=96M"));
}
