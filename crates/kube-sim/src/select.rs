//! `labelSelector` and `fieldSelector` query parameters, parsed and matched as the apiserver does.
//! Part of kube-sim, a labelled STAND-IN for K3s's Kubernetes API (not Kubernetes).

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Eq(String),
    Ne(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    NotExists,
}

/// A parsed label selector (k8s.io/apimachinery pkg/labels/selector.go
/// Parse: `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k`, `!k`,
/// comma-separated, all must match).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<(String, Op)>);

/// Split on commas outside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 317
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

fn set_values(rest: &str, req: &str) -> Result<Vec<String>, String> {
    let inner = rest
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| {
            format!("unable to parse requirement: {req:?}: expected a set of values in parentheses")
        })?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect())
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<LabelSelector, String> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(LabelSelector(reqs));
        }
        for req in split_top(s) {
            let r = req.trim();
            let bad = || format!("unable to parse requirement: {r:?}");
            let (key, op) = if let Some(k) = r.strip_prefix('!') {
                (k.trim(), Op::NotExists)
            } else if let Some((k, v)) = r.split_once("!=") {
                (k.trim(), Op::Ne(v.trim().to_string()))
            } else if let Some((k, v)) = r.split_once("==") {
                (k.trim(), Op::Eq(v.trim().to_string()))
            } else if let Some((k, v)) = r.split_once('=') {
                (k.trim(), Op::Eq(v.trim().to_string()))
            } else if let Some((k, rest)) = r.split_once(" notin ") {
                (k.trim(), Op::NotIn(set_values(rest, r)?))
            } else if let Some((k, rest)) = r.split_once(" in ") {
                (k.trim(), Op::In(set_values(rest, r)?))
            } else {
                (r, Op::Exists)
            };
            if !valid_key(key) {
                return Err(bad());
            }
            reqs.push((key.to_string(), op));
        }
        Ok(LabelSelector(reqs))
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|(k, op)| {
            let v = labels.get(k);
            match op {
                Op::Eq(x) => v == Some(x),
                Op::Ne(x) => v != Some(x),
                Op::In(xs) => v.is_some_and(|v| xs.contains(v)),
                Op::NotIn(xs) => !v.is_some_and(|v| xs.contains(v)),
                Op::Exists => v.is_some(),
                Op::NotExists => v.is_none(),
            }
        })
    }
}

/// A parsed field selector (k8s.io/apimachinery pkg/fields/selector.go:
/// `f=v`, `f==v`, `f!=v`, comma-separated), checked against the fields the
/// resource makes selectable; any other field is refused as the apiserver
/// does ("field label not supported: f").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    pub fn parse(s: &str, selectable: &[&str]) -> Result<FieldSelector, String> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(FieldSelector(reqs));
        }
        for req in s.split(',') {
            let (f, eq, v) = if let Some((f, v)) = req.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = req.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = req.split_once('=') {
                (f, true, v)
            } else {
                return Err(format!("invalid selector: '{s}'; can't understand '{req}'"));
            };
            let f = f.trim();
            if !selectable.contains(&f) {
                return Err(format!("field label not supported: {f}"));
            }
            reqs.push((f.to_string(), eq, v.trim().to_string()));
        }
        Ok(FieldSelector(reqs))
    }

    /// `get(field)` gives the object's value of a selectable field.
    pub fn matches(&self, get: impl Fn(&str) -> String) -> bool {
        self.0.iter().all(|(f, eq, v)| (get(f) == *v) == *eq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn label_selectors_match_equality_sets_and_existence() {
        let l = labels(&[
            ("node-role.kubernetes.io/control-plane", "true"),
            ("tier", "a"),
        ]);
        for (sel, want) in [
            ("node-role.kubernetes.io/control-plane=true", true),
            ("node-role.kubernetes.io/control-plane==true", true),
            ("node-role.kubernetes.io/control-plane!=true", false),
            ("tier in (a,b)", true),
            ("tier notin (a,b)", false),
            ("tier,node-role.kubernetes.io/control-plane", true),
            ("!tier", false),
            ("missing!=x", true),
            ("", true),
        ] {
            assert_eq!(
                LabelSelector::parse(sel).unwrap().matches(&l),
                want,
                "{sel}"
            );
        }
    }

    #[test]
    fn a_malformed_label_selector_is_refused() {
        assert!(LabelSelector::parse("a b c").is_err());
        assert!(LabelSelector::parse("tier in a,b").is_err());
    }

    #[test]
    fn field_selectors_refuse_fields_the_resource_does_not_select() {
        let e = FieldSelector::parse("spec.foo=x", &["spec.nodeName"]).unwrap_err();
        assert_eq!(e, "field label not supported: spec.foo");
        let s = FieldSelector::parse("spec.nodeName=n1", &["spec.nodeName"]).unwrap();
        assert!(s.matches(|_| "n1".into()));
        assert!(!s.matches(|_| "n2".into()));
    }
}
