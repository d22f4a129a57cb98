//! PATCH bodies: JSON merge patch (RFC 7386) and the part of strategic merge patch that equals it.
//! Part of kube-sim, a labelled STAND-IN for K3s's Kubernetes API (not Kubernetes).

use serde_json::Value;

/// RFC 7386: objects merge key by key, `null` deletes, anything else
/// replaces.
pub fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Default::default());
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// A strategic merge patch is a merge patch on maps and scalars; lists
/// merge by their patchMergeKey and `$`-directives steer it
/// (k8s.io/apimachinery pkg/util/strategicpatch). The fields the stand-in
/// models (labels, annotations, spec.unschedulable) have no lists, so a
/// patch without directives means the same under both; a directive is
/// refused with its path.
pub fn strategic_directive(patch: &Value, path: &str) -> Option<String> {
    match patch {
        Value::Object(m) => m.iter().find_map(|(k, v)| {
            let p = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            if k.starts_with('$') {
                Some(p)
            } else {
                strategic_directive(v, &p)
            }
        }),
        _ => None,
    }
}

/// The first path (dotted) where `a` and `b` differ, looking only at keys
/// other than `skip` (dotted paths).
pub fn first_difference(a: &Value, b: &Value, path: &str, skip: &[&str]) -> Option<String> {
    if skip.contains(&path) {
        return None;
    }
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                first_difference(
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                    &p,
                    skip,
                )
            })
        }
        _ if a == b => None,
        _ => Some(path.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_merges_objects_deletes_nulls_and_replaces_the_rest() {
        let mut t = json!({"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"x": [1]}});
        merge(
            &mut t,
            &json!({"metadata": {"labels": {"a": null, "c": "3"}}, "spec": {"x": [2], "unschedulable": true}}),
        );
        assert_eq!(
            t,
            json!({"metadata": {"labels": {"b": "2", "c": "3"}}, "spec": {"x": [2], "unschedulable": true}})
        );
    }

    #[test]
    fn strategic_directives_are_found_with_their_path() {
        assert_eq!(
            strategic_directive(&json!({"spec": {"taints": {"$patch": "replace"}}}), ""),
            Some("spec.taints.$patch".into())
        );
        assert_eq!(
            strategic_directive(&json!({"spec": {"unschedulable": true}}), ""),
            None
        );
    }

    #[test]
    fn differences_outside_the_skipped_paths_are_reported() {
        let a = json!({"metadata": {"labels": {"a": "1"}, "name": "n"}, "spec": {}});
        let b = json!({"metadata": {"labels": {"a": "2"}, "name": "n"}, "spec": {"taints": []}});
        assert_eq!(
            first_difference(&a, &b, "", &["metadata.labels"]),
            Some("spec.taints".into())
        );
        assert_eq!(first_difference(&a, &a, "", &[]), None);
    }
}
