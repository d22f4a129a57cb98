//! renovate.json's custom regex manager, run over the shipped recipes with
//! the `regex` crate (its syntax and Renovate's RE2/JavaScript share the
//! subset renovate.json uses: named groups, classes, lazy repeats): every
//! artifact URL and container image is found with its datasource, depName
//! and current version, and every other copy of a found version is found too,
//! so a bump moves them all.

mod common;
use common::*;

use regex::Regex;

/// One dependency occurrence the manager extracts.
#[derive(Debug)]
struct Found {
    /// 0-based line holding the current value.
    line: usize,
    /// 0-based line of the `# renovate:` comment.
    comment_line: usize,
    datasource: String,
    dep_name: String,
    registry_url: Option<String>,
    current_value: String,
}

fn renovate() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(repo().join("renovate.json")).unwrap())
        .expect("renovate.json is JSON")
}

/// The custom manager's file pattern (`/regex/` as Renovate writes it) and
/// its match strings.
fn manager() -> (Regex, Vec<Regex>) {
    let r = renovate();
    let managers = r["customManagers"].as_array().expect("customManagers");
    assert_eq!(managers.len(), 1, "one custom manager for the recipes");
    let m = &managers[0];
    assert_eq!(m["customType"], "regex");
    let pattern = m["managerFilePatterns"][0].as_str().unwrap();
    let pattern = pattern
        .strip_prefix('/')
        .and_then(|p| p.strip_suffix('/'))
        .expect("managerFilePatterns entries are /regex/");
    let strings = m["matchStrings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| Regex::new(s.as_str().unwrap()).expect("a match string compiles"))
        .collect();
    (Regex::new(pattern).unwrap(), strings)
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset].matches('\n').count()
}

/// What Renovate extracts from `text`: every match of every match string.
fn extract(text: &str, strings: &[Regex]) -> Vec<Found> {
    let mut found = Vec::new();
    for re in strings {
        for c in re.captures_iter(text) {
            let group = |n: &str| c.name(n).map(|m| m.as_str().to_string());
            let value = c.name("currentValue").expect("currentValue is captured");
            found.push(Found {
                line: line_of(text, value.start()),
                comment_line: line_of(text, c.get(0).unwrap().start()),
                datasource: group("datasource").expect("datasource is captured"),
                dep_name: group("depName").expect("depName is captured"),
                registry_url: group("registryUrl"),
                current_value: value.as_str().to_string(),
            });
        }
    }
    found
}

fn is_comment(line: &str) -> bool {
    line.trim_start().starts_with('#')
}

/// Every pin of a recipe file (its artifact URLs and images, as written in
/// this file) is found by the manager with a consistent depName; every
/// `# renovate:` comment is understood; and every other line carrying a
/// found version is found as well. The first problem, as `file:line: why`.
fn check(file: &str, text: &str, strings: &[Regex]) -> Result<Vec<Found>, String> {
    let found = extract(text, strings);
    let lines: Vec<&str> = text.lines().collect();
    let at = |i: usize, why: String| format!("{file}:{}: {why}", i + 1);
    let value: toml::Table = toml::from_str(text).map_err(|e| format!("{file}: {e}"))?;
    let mut pins: Vec<(String, bool)> = Vec::new();
    for a in value
        .get("artifacts")
        .and_then(|a| a.as_array())
        .into_iter()
        .flatten()
    {
        pins.push((a["url"].as_str().unwrap().to_string(), false));
    }
    for i in value
        .get("images")
        .and_then(|a| a.as_array())
        .into_iter()
        .flatten()
    {
        pins.push((i.as_str().unwrap().to_string(), true));
    }
    for (pin, is_image) in &pins {
        let quoted = format!("\"{pin}\"");
        let i = lines
            .iter()
            .position(|l| !is_comment(l) && l.contains(&quoted))
            .ok_or_else(|| format!("{file}: {pin} is not written on a line of its own"))?;
        let f = found.iter().find(|f| f.line == i).ok_or_else(|| {
            at(
                i,
                format!("{pin} has no `# renovate: datasource=... depName=...` comment above it"),
            )
        })?;
        if *is_image
            && (f.datasource != "docker" || *pin != format!("{}:{}", f.dep_name, f.current_value))
        {
            return Err(at(
                i,
                format!(
                    "{pin}: the comment says {} {}:{}",
                    f.datasource, f.dep_name, f.current_value
                ),
            ));
        }
        if pin.contains("github")
            && f.datasource == "github-releases"
            && !pin.contains(&format!("/{}/", f.dep_name))
        {
            return Err(at(i, format!("{pin} is not a release of {}", f.dep_name)));
        }
    }
    for (i, l) in lines.iter().enumerate() {
        if l.trim_start().starts_with("# renovate:") && !found.iter().any(|f| f.comment_line == i) {
            return Err(at(
                i,
                "this renovate comment matches no match string".into(),
            ));
        }
    }
    for f in &found {
        match f.datasource.as_str() {
            "docker" | "github-releases" => {}
            "helm" if f.registry_url.is_some() => {}
            other => return Err(at(f.comment_line, format!("datasource `{other}` needs more (helm: registryUrl) or is not one kiln's pins use"))),
        }
        for (i, l) in lines.iter().enumerate() {
            if !is_comment(l) && l.contains(&f.current_value) && !found.iter().any(|g| g.line == i)
            {
                return Err(at(
                    i,
                    format!(
                        "carries {} {} but no renovate comment: a bump would leave it behind",
                        f.dep_name, f.current_value
                    ),
                ));
            }
        }
    }
    Ok(found)
}

fn shipped_recipes() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(repo().join("recipes")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let name = format!("recipes/{}", p.file_name().unwrap().to_string_lossy());
            out.push((name, std::fs::read_to_string(&p).unwrap()));
        }
    }
    out.sort();
    out
}

#[test]
fn renovate_finds_every_pin_of_the_shipped_recipes_and_every_copy_of_its_version() {
    let (files, strings) = manager();
    let mut deps = std::collections::BTreeSet::new();
    for (name, text) in shipped_recipes() {
        assert!(files.is_match(&name), "managerFilePatterns misses {name}");
        let found = check(&name, &text, &strings).unwrap_or_else(|e| panic!("{e}"));
        deps.extend(
            found
                .into_iter()
                .map(|f| (f.datasource, f.dep_name, f.current_value)),
        );
    }
    let deps: Vec<String> = deps
        .into_iter()
        .map(|(d, n, v)| format!("{d} {n} {v}"))
        .collect();
    // K3s, Helm, the Cilium chart, Gateway API and each container image.
    assert_eq!(
        deps,
        [
            "docker quay.io/cilium/cilium v1.18.2",
            "docker quay.io/cilium/cilium-envoy v1.34.7-1757592137-1a52bb680a956879722f48c591a2ca90f7791324",
            "docker quay.io/cilium/hubble-relay v1.18.2",
            "docker quay.io/cilium/hubble-ui v0.13.3",
            "docker quay.io/cilium/hubble-ui-backend v0.13.3",
            "docker quay.io/cilium/operator-generic v1.18.2",
            "github-releases helm/helm v3.19.0",
            "github-releases k3s-io/k3s v1.33.5+k3s1",
            "github-releases kubernetes-sigs/gateway-api v1.3.0",
            "helm cilium 1.18.2",
        ]
    );
    assert!(
        !files.is_match("recipes/k3s-node.toml.lock")
            && !files.is_match("recipes/roles/lb.types.toml")
    );
}

#[test]
fn a_pin_without_its_renovate_comment_is_named() {
    let (_, strings) = manager();
    let text = std::fs::read_to_string(repo().join("recipes/k3s-node.toml")).unwrap();
    let without = text.replacen(
        "  # renovate: datasource=docker depName=quay.io/cilium/hubble-ui\n",
        "",
        1,
    );
    assert_ne!(without, text);
    let err = check("recipes/k3s-node.toml", &without, &strings).unwrap_err();
    assert!(
        err.contains("quay.io/cilium/hubble-ui:v0.13.3 has no `# renovate:"),
        "{err}"
    );
}

#[test]
fn a_copy_of_a_pinned_version_without_its_comment_is_named() {
    let (_, strings) = manager();
    let text = std::fs::read_to_string(repo().join("recipes/k3s-node.toml")).unwrap();
    let comment = "# renovate: datasource=helm depName=cilium registryUrl=https://helm.cilium.io\n";
    let dest = "dest = \"/usr/local/share/kiln/charts/cilium-1.18.2.tgz\"";
    let without = text.replacen(&format!("{comment}{dest}"), dest, 1);
    assert_ne!(without, text);
    let err = check("recipes/k3s-node.toml", &without, &strings).unwrap_err();
    assert!(
        err.contains("carries cilium 1.18.2 but no renovate comment"),
        "{err}"
    );
}

#[test]
fn renovate_versioning_rules_parse_the_versions_they_govern() {
    let (_, strings) = manager();
    let text = std::fs::read_to_string(repo().join("recipes/k3s-node.toml")).unwrap();
    let found = extract(&text, &strings);
    let r = renovate();
    let mut checked = 0;
    for rule in r["packageRules"].as_array().unwrap() {
        let Some(v) = rule["versioning"].as_str() else {
            continue;
        };
        let re = Regex::new(v.strip_prefix("regex:").expect("regex versioning")).unwrap();
        for dep in rule["matchDepNames"].as_array().unwrap() {
            let dep = dep.as_str().unwrap();
            let mine: Vec<&Found> = found.iter().filter(|f| f.dep_name == dep).collect();
            assert!(!mine.is_empty(), "{dep} is in no recipe");
            for f in mine {
                assert!(
                    re.is_match(&f.current_value),
                    "{dep} {} against {v}",
                    f.current_value
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 2, "the K3s and cilium-envoy rules apply");
}
