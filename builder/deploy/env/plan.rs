//! The plan: what the environment file wants (per slot: image id and values
//! digest) against what the provider shows, as create / keep / replace / destroy.
//!
//! The plan is derived from the provider's marks alone, so it is the same
//! whether or not a journal survived. A slot with two generations is a
//! replacement that was interrupted: the plan finishes it.

use serde::Serialize;
use std::collections::BTreeMap;

use super::model::RoleKind;
use crate::deploy::providers::NodeVm;

/// What one slot should run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Desired {
    pub role: String,
    pub kind: RoleKind,
    pub slot: String,
    pub image_id: String,
    pub values_digest: String,
}

/// One step of the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "lowercase")]
pub(crate) enum Action {
    /// The slot has no VM: make generation `generation`.
    Create {
        role: String,
        slot: String,
        generation: u32,
    },
    /// The slot's VM is what the file wants.
    Keep {
        role: String,
        slot: String,
        vm: NodeVm,
    },
    /// Blue-green: create `generation` beside `old`, prove it, then retire `old`.
    Replace {
        role: String,
        slot: String,
        old: NodeVm,
        generation: u32,
        reasons: Vec<String>,
    },
    /// An interrupted replacement: `new` exists and is what the file wants;
    /// prove it, then retire `old`.
    Resume {
        role: String,
        slot: String,
        old: Vec<NodeVm>,
        new: NodeVm,
    },
    /// A VM of this environment that no slot wants (its slot was removed, or
    /// a half-made generation that is not what the file wants).
    Destroy { vm: NodeVm, reason: String },
}

impl Action {
    /// One line for people.
    pub(crate) fn describe(&self) -> String {
        let short = |id: &str| id.get(..12).unwrap_or(id).to_string();
        match self {
            Action::Create {
                role,
                slot,
                generation,
            } => format!("create   {slot} ({role}) generation {generation}"),
            Action::Keep { slot, vm, .. } => {
                format!(
                    "keep     {slot}: {} (image {})",
                    vm.name,
                    short(&vm.image_id)
                )
            }
            Action::Replace {
                slot,
                old,
                generation,
                reasons,
                ..
            } => format!(
                "replace  {slot}: {} → generation {generation} ({})",
                old.name,
                reasons.join("; ")
            ),
            Action::Resume { slot, old, new, .. } if old.is_empty() => {
                format!("resume   {slot}: start {} and prove it", new.name)
            }
            Action::Resume { slot, old, new, .. } => format!(
                "resume   {slot}: prove {}, then retire {}",
                new.name,
                old.iter()
                    .map(|v| v.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Action::Destroy { vm, reason } => format!("destroy  {} ({reason})", vm.name),
        }
    }

    pub(crate) fn changes_anything(&self) -> bool {
        !matches!(self, Action::Keep { .. })
    }
}

/// The plan for a whole environment, in the order apply carries it out:
/// slots in bootstrap order (LBs, servers, agents), then leftovers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Plan {
    pub env: String,
    pub actions: Vec<Action>,
    /// The K3s rollout's steps in order, when the plan replaces or removes
    /// servers or agents (see `rollout::explain`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rollout: Vec<String>,
}

impl Plan {
    pub(crate) fn is_noop(&self) -> bool {
        !self.actions.iter().any(Action::changes_anything)
    }

    /// The plan for people, one action a line, and a summary.
    pub(crate) fn text(&self) -> String {
        let mut out = String::new();
        for a in &self.actions {
            out.push_str(&a.describe());
            out.push('\n');
        }
        if !self.rollout.is_empty() {
            out.push_str("K3s rollout, in order:\n");
            for (i, step) in self.rollout.iter().enumerate() {
                out.push_str(&format!("  {:>2}. {step}\n", i + 1));
            }
        }
        let count = |f: fn(&Action) -> bool| self.actions.iter().filter(|a| f(a)).count();
        out.push_str(&format!(
            "{}: {} to create, {} to replace, {} to resume, {} to destroy, {} unchanged\n",
            self.env,
            count(|a| matches!(a, Action::Create { .. })),
            count(|a| matches!(a, Action::Replace { .. })),
            count(|a| matches!(a, Action::Resume { .. })),
            count(|a| matches!(a, Action::Destroy { .. })),
            count(|a| matches!(a, Action::Keep { .. })),
        ));
        out
    }
}

/// Compare what is wanted with what is there. `desired` is in bootstrap order.
pub(crate) fn plan(env: &str, desired: &[Desired], actual: &[NodeVm]) -> Plan {
    let mut by_slot: BTreeMap<&str, Vec<&NodeVm>> = BTreeMap::new();
    for vm in actual {
        by_slot.entry(vm.slot.as_str()).or_default().push(vm);
    }
    for vms in by_slot.values_mut() {
        vms.sort_by_key(|v| v.generation);
    }
    let mut actions = Vec::new();
    for d in desired {
        let vms = by_slot.remove(d.slot.as_str()).unwrap_or_default();
        let matches = |v: &NodeVm| v.image_id == d.image_id && v.values_digest == d.values_digest;
        let role = d.role.clone();
        let slot = d.slot.clone();
        let Some(newest) = vms.last().copied() else {
            actions.push(Action::Create {
                role,
                slot,
                generation: 0,
            });
            continue;
        };
        let next = newest.generation + 1;
        if vms.len() == 1 {
            if matches(newest) && !newest.running {
                // Made but never (or no longer) running: an interrupted
                // create, or a VM stopped behind kiln's back. Start it and
                // prove it before counting on it.
                actions.push(Action::Resume {
                    role,
                    slot,
                    old: Vec::new(),
                    new: newest.clone(),
                });
            } else if matches(newest) {
                actions.push(Action::Keep {
                    role,
                    slot,
                    vm: newest.clone(),
                });
            } else {
                actions.push(Action::Replace {
                    role,
                    slot,
                    old: newest.clone(),
                    generation: next,
                    reasons: reasons(d, newest),
                });
            }
            continue;
        }
        // Several generations: a replacement was interrupted.
        if matches(newest) {
            actions.push(Action::Resume {
                role,
                slot,
                old: vms[..vms.len() - 1].iter().map(|v| (*v).clone()).collect(),
                new: newest.clone(),
            });
        } else {
            // The newest is not what is wanted: it never went into service
            // as the wanted generation; remove it, then replace the one before.
            actions.push(Action::Destroy {
                vm: newest.clone(),
                reason: format!(
                    "an unfinished generation of {} that the file no longer wants",
                    d.slot
                ),
            });
            let older = vms[vms.len() - 2];
            for extra in &vms[..vms.len() - 2] {
                actions.push(Action::Destroy {
                    vm: (*extra).clone(),
                    reason: format!("an old generation of {}", d.slot),
                });
            }
            if matches(older) {
                actions.push(Action::Keep {
                    role,
                    slot,
                    vm: older.clone(),
                });
            } else {
                actions.push(Action::Replace {
                    role,
                    slot,
                    old: older.clone(),
                    generation: next,
                    reasons: reasons(d, older),
                });
            }
        }
    }
    for (slot, vms) in by_slot {
        for vm in vms {
            actions.push(Action::Destroy {
                vm: vm.clone(),
                reason: format!("slot {slot} is not in the environment file"),
            });
        }
    }
    Plan {
        env: env.to_string(),
        actions,
        rollout: Vec::new(),
    }
}

fn reasons(d: &Desired, vm: &NodeVm) -> Vec<String> {
    let short = |id: &str| id.get(..12).unwrap_or(id).to_string();
    let mut r = Vec::new();
    if vm.image_id != d.image_id {
        r.push(format!(
            "image {} → {}",
            short(&vm.image_id),
            short(&d.image_id)
        ));
    }
    if vm.values_digest != d.values_digest {
        r.push("values changed".into());
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(slot: &str, image: &str) -> Desired {
        Desired {
            role: "lb".into(),
            kind: RoleKind::Lb,
            slot: slot.into(),
            image_id: image.into(),
            values_digest: "v1".into(),
        }
    }

    fn vm(slot: &str, generation: u32, image: &str) -> NodeVm {
        NodeVm {
            handle: format!("{slot}-{generation}"),
            name: format!("qa-{slot}-g{generation}"),
            slot: slot.into(),
            generation,
            image_id: image.into(),
            values_digest: "v1".into(),
            address: "10.0.0.1".parse().unwrap(),
            running: true,
        }
    }

    #[test]
    fn an_empty_provider_gets_every_slot_created_in_order() {
        let p = plan("qa", &[want("lb-1", "a"), want("lb-2", "a")], &[]);
        let slots: Vec<_> = p
            .actions
            .iter()
            .map(|a| match a {
                Action::Create {
                    slot, generation, ..
                } => (slot.as_str(), *generation),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(slots, vec![("lb-1", 0), ("lb-2", 0)]);
    }

    #[test]
    fn a_matching_vm_is_kept_and_a_changed_image_is_replaced_by_the_next_generation() {
        let p = plan(
            "qa",
            &[want("lb-1", "b"), want("lb-2", "a")],
            &[vm("lb-1", 3, "a"), vm("lb-2", 0, "a")],
        );
        assert!(
            matches!(&p.actions[0], Action::Replace { generation: 4, reasons, .. } if reasons[0].starts_with("image a → b"))
        );
        assert!(matches!(&p.actions[1], Action::Keep { .. }));
        assert!(!p.is_noop());
    }

    #[test]
    fn changed_values_alone_replace_the_vm() {
        let mut v = vm("lb-1", 0, "a");
        v.values_digest = "v0".into();
        let p = plan("qa", &[want("lb-1", "a")], &[v]);
        assert!(
            matches!(&p.actions[0], Action::Replace { reasons, .. } if reasons == &vec!["values changed".to_string()])
        );
    }

    #[test]
    fn an_interrupted_replacement_is_resumed_not_started_again() {
        let p = plan(
            "qa",
            &[want("lb-1", "b")],
            &[vm("lb-1", 0, "a"), vm("lb-1", 1, "b")],
        );
        assert!(
            matches!(&p.actions[0], Action::Resume { new, old, .. } if new.generation == 1 && old.len() == 1)
        );
    }

    #[test]
    fn a_stopped_vm_that_is_what_the_file_wants_is_started_and_proven_not_kept() {
        let mut stopped = vm("lb-1", 0, "a");
        stopped.running = false;
        let p = plan("qa", &[want("lb-1", "a")], &[stopped.clone()]);
        assert_eq!(
            p.actions,
            vec![Action::Resume {
                role: "lb".into(),
                slot: "lb-1".into(),
                old: vec![],
                new: stopped,
            }]
        );
        assert!(!p.is_noop());
        assert!(
            p.text().contains("start qa-lb-1-g0 and prove it"),
            "{}",
            p.text()
        );
    }

    #[test]
    fn an_unwanted_half_made_generation_is_destroyed_before_replacing_again() {
        let p = plan(
            "qa",
            &[want("lb-1", "c")],
            &[vm("lb-1", 0, "a"), vm("lb-1", 1, "b")],
        );
        assert!(matches!(&p.actions[0], Action::Destroy { vm, .. } if vm.generation == 1));
        assert!(
            matches!(&p.actions[1], Action::Replace { old, generation: 2, .. } if old.generation == 0)
        );
    }

    #[test]
    fn a_vm_of_a_removed_slot_is_destroyed() {
        let p = plan(
            "qa",
            &[want("lb-1", "a")],
            &[vm("lb-1", 0, "a"), vm("lb-3", 0, "a")],
        );
        assert!(matches!(&p.actions[1], Action::Destroy { vm, .. } if vm.slot == "lb-3"));
    }

    #[test]
    fn nothing_to_do_is_a_noop() {
        let p = plan("qa", &[want("lb-1", "a")], &[vm("lb-1", 0, "a")]);
        assert!(p.is_noop());
        assert!(p
            .text()
            .contains("0 to create, 0 to replace, 0 to resume, 0 to destroy, 1 unchanged"));
    }
}
