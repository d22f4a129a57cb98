//! Asynchronous UPID tasks: starting them, their fault-decided plan, status and log.
//! Part of pve-sim, a labelled STAND-IN for the Proxmox VE API (not Proxmox).

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::faults::{FaultKind, FaultOp};
use crate::routes::{check_node, param_err, ApiResult};
use crate::state::{lock, now, Shared, State, Task};

/// A task's work: it may add lines to the task log, and decides the exit status.
pub(crate) type Work = Box<dyn FnOnce(&mut State, &mut Vec<String>) -> Result<(), String> + Send>;

/// Start an asynchronous task; `work` runs after the delay and decides the
/// exit status.
/// Which task: its node, type, id (VMID or volume) and user, as in its UPID.
pub(crate) struct TaskOf<'a> {
    pub node: &'a str,
    pub kind: &'a str,
    pub id: &'a str,
    pub user: &'a str,
}

pub(crate) fn spawn_task(
    shared: &Arc<Shared>,
    st: &mut State,
    of: TaskOf<'_>,
    delay: Duration,
    work: Work,
) -> String {
    let TaskOf {
        node,
        kind,
        id,
        user,
    } = of;
    st.next_pid += 1;
    let pid = st.next_pid;
    let starttime = now();
    let pstart = 1_000_000 + pid as u64;
    let upid = format!("UPID:{node}:{pid:08X}:{pstart:08X}:{starttime:08X}:{kind}:{id}:{user}:");
    st.tasks.insert(
        upid.clone(),
        Task {
            upid: upid.clone(),
            kind: kind.into(),
            id: id.into(),
            user: user.into(),
            pid,
            pstart,
            starttime,
            exitstatus: None,
            log: vec![format!("starting task {kind} {id}")],
        },
    );
    let s2 = shared.clone();
    let u2 = upid.clone();
    std::thread::spawn(move || {
        std::thread::sleep(delay);
        let mut st = lock(&s2);
        let mut lines = Vec::new();
        let result = work(&mut st, &mut lines);
        if let Some(t) = st.tasks.get_mut(&u2) {
            t.log.extend(lines);
            match result {
                Ok(()) => {
                    t.log.push("TASK OK".into());
                    t.exitstatus = Some("OK".into());
                }
                Err(e) => {
                    t.log.push(format!("TASK ERROR: {e}"));
                    t.exitstatus = Some(e);
                }
            }
        }
    });
    upid
}

/// Delay and failure decided by faults for a task of this operation.
pub(crate) fn task_plan(
    shared: &Shared,
    st: &mut State,
    op: FaultOp,
) -> (Duration, bool, Option<FaultKind>) {
    let mut delay = shared.cfg.task_delay;
    let mut fail = false;
    let kind = st.take_fault(op);
    match kind {
        Some(FaultKind::SlowTask(s)) => delay = Duration::from_secs_f64(s),
        Some(FaultKind::FailTask) => fail = true,
        _ => {}
    }
    (delay, fail, kind)
}

pub(crate) fn task_status(shared: &Shared, p: &BTreeMap<String, String>) -> ApiResult {
    check_node(shared, p)?;
    let mut st = lock(shared);
    if st.take_fault(FaultOp::TaskStatus) == Some(FaultKind::Transient400) {
        return Err(param_err("upid", "no such task"));
    }
    let upid = p.get("upid").map(String::as_str).unwrap_or("");
    let t = st
        .tasks
        .get(upid)
        .ok_or_else(|| param_err("upid", "unable to parse worker upid or no such task"))?;
    let mut v = json!({
        "upid": t.upid, "node": t.upid.split(':').nth(1).unwrap_or(""), "pid": t.pid, "pstart": t.pstart,
        "starttime": t.starttime, "type": t.kind, "id": t.id, "user": t.user,
        "status": if t.exitstatus.is_some() { "stopped" } else { "running" },
    });
    if let Some(x) = &t.exitstatus {
        v["exitstatus"] = json!(x);
    }
    Ok(v)
}

pub(crate) fn task_log(shared: &Shared, p: &BTreeMap<String, String>) -> ApiResult {
    check_node(shared, p)?;
    let st = lock(shared);
    let t = st
        .tasks
        .get(p.get("upid").map(String::as_str).unwrap_or(""))
        .ok_or_else(|| param_err("upid", "no such task"))?;
    Ok(Value::Array(
        t.log
            .iter()
            .enumerate()
            .map(|(i, l)| json!({"n": i + 1, "t": l}))
            .collect(),
    ))
}
