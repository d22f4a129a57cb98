//! Faults injected into the PVE simulator during `kiln publish`: every one
//! ends in a clear error and leaves no VM behind; transient ones are ridden out.

mod publish_support;
use publish_support::*;

/// Publish with one fault injected; returns (success, stderr).
fn publish_with(fault: &str) -> (bool, String, pve_sim::Sim, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(&tmp.path().join("sim"));
    s.inject(fault.parse().unwrap());
    let img = image(tmp.path(), "k3s-server", "1.0.0", true, false);
    let out = kiln(
        tmp.path(),
        &["publish", img.to_str().unwrap()],
        &env_target(&s.url()),
    );
    (out.status.success(), stderr(&out), s, tmp)
}

fn assert_nothing_left(s: &pve_sim::Sim) {
    let st = s.state();
    assert!(st.vms.is_empty(), "VMs left: {:?}", st.vms.keys());
    assert!(
        st.volumes.keys().all(|v| !v.contains(":import/")),
        "import files left: {:?}",
        st.volumes.keys()
    );
}

#[test]
fn a_500_on_upload_ends_in_a_clear_error_and_creates_nothing() {
    let (ok, err, s, _t) = publish_with("upload:500");
    assert!(!ok);
    assert!(err.contains("upload of") && err.contains("500"), "{err}");
    assert_nothing_left(&s);
}

#[test]
fn a_connection_dropped_mid_upload_ends_in_a_clear_error_and_creates_nothing() {
    let (ok, err, s, _t) = publish_with("upload:drop");
    assert!(!ok);
    assert!(
        err.contains("upload of") && err.contains("broke off"),
        "{err}"
    );
    assert_nothing_left(&s);
    // The simulator's temp area holds no half upload either.
    let tmp_files = std::fs::read_dir(_t.path().join("sim/var-tmp"))
        .unwrap()
        .count();
    assert_eq!(tmp_files, 0);
}

#[test]
fn a_failed_upload_task_ends_in_a_clear_error_and_creates_nothing() {
    let (ok, err, s, _t) = publish_with("upload:fail");
    assert!(!ok);
    assert!(
        err.contains("copying") && err.contains("No space left"),
        "{err}"
    );
    assert_nothing_left(&s);
}

#[test]
fn a_failed_create_task_ends_in_a_clear_error_and_leaves_no_vm() {
    let (ok, err, s, _t) = publish_with("create:fail");
    assert!(!ok);
    assert!(err.contains("creating VM 9000 failed"), "{err}");
    assert_nothing_left(&s);
}

#[test]
fn a_500_on_create_ends_in_a_clear_error_and_leaves_no_vm() {
    let (ok, err, s, _t) = publish_with("create:500");
    assert!(!ok);
    assert!(
        err.contains("cannot create VM 9000") && err.contains("500"),
        "{err}"
    );
    assert_nothing_left(&s);
}

#[test]
fn a_lock_timeout_on_template_conversion_destroys_the_half_made_vm() {
    let (ok, err, s, _t) = publish_with("template:lock-timeout");
    assert!(!ok);
    assert!(
        err.contains("can't lock file") && err.contains("got timeout"),
        "{err}"
    );
    assert_nothing_left(&s);
}

#[test]
fn a_failed_template_task_destroys_the_half_made_vm() {
    let (ok, err, s, _t) = publish_with("template:fail");
    assert!(!ok);
    assert!(
        err.contains("converting VM 9000 to a template failed"),
        "{err}"
    );
    assert_nothing_left(&s);
}

#[test]
fn a_slow_create_task_is_waited_for() {
    let (ok, err, s, _t) = publish_with("create:slow=1.5");
    assert!(ok, "{err}");
    assert!(s.state().vms[&9000].template);
}

#[test]
fn a_transient_400_on_task_status_is_ridden_out() {
    let (ok, err, s, _t) = publish_with("status:400*2");
    assert!(ok, "{err}");
    assert!(s.state().vms[&9000].template);
}

#[test]
fn a_failed_cleanup_is_reported_and_the_next_run_removes_the_leftover() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sim(&tmp.path().join("sim"));
    s.inject("template:fail".parse().unwrap());
    s.inject("destroy:500".parse().unwrap());
    let img = image(tmp.path(), "k3s-server", "1.0.0", true, false);
    let env = env_target(&s.url());
    let out = kiln(tmp.path(), &["publish", img.to_str().unwrap()], &env);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("VM 9000 is left behind") && err.contains("next publish removes it"),
        "{err}"
    );
    assert_eq!(plain_vms(&s), vec![9000]);
    let r = publish_json(tmp.path(), &img, &env);
    assert_eq!(r.removed_leftovers, vec![9000]);
    assert!(plain_vms(&s).is_empty());
    assert!(s.state().vms[&r.vmid].template);
}
