//! The YAML shipped beside the operator: the CRD in `crds/` (and the chart's copy) is what the
//! code generates, and every manifest in `deploy/` (and the chart, rendered with its default
//! values when `helm` is at hand) parses into the typed object its `kind` names, with no field
//! the type does not know (a typo would otherwise be dropped silently).

use std::path::{Path, PathBuf};

use dynakv_operator::crd::KVCluster;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::DynamicObject;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn crds_dir_holds_the_crd_the_code_generates() {
    let generated = dynakv_operator::crd_yaml().unwrap();
    for path in [
        "crds/kvcluster.yaml",
        "helm/dynakv-operator/crds/kvcluster.yaml",
    ] {
        let on_disk = std::fs::read_to_string(repo().join(path)).unwrap_or_default();
        assert!(
            on_disk == generated,
            "{path} is stale: regenerate it with \
             `cargo run -p dynakv-operator -- crd > {path}`"
        );
    }
}

/// Every field of `original` is in `typed` with the same value (`typed` may add defaults).
fn assert_contained(original: &Value, typed: &Value, at: &str) {
    match (original, typed) {
        (Value::Object(o), Value::Object(t)) => {
            for (k, v) in o {
                match t.get(k) {
                    Some(tv) => assert_contained(v, tv, &format!("{at}.{k}")),
                    None => panic!("{at}.{k} is not a field of the type (a typo?)"),
                }
            }
        }
        (Value::Array(o), Value::Array(t)) => {
            assert_eq!(o.len(), t.len(), "{at}: list length");
            for (i, (a, b)) in o.iter().zip(t).enumerate() {
                assert_contained(a, b, &format!("{at}[{i}]"));
            }
        }
        (Value::Number(a), Value::Number(b)) => {
            assert_eq!(a.as_f64(), b.as_f64(), "{at}")
        }
        (a, b) => assert_eq!(a, b, "{at}"),
    }
}

fn typed<T: DeserializeOwned + Serialize>(doc: &Value, at: &str) -> T {
    let t: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{at}: does not parse as its kind: {e}"));
    assert_contained(doc, &serde_json::to_value(&t).unwrap(), at);
    t
}

/// Parses one manifest document by its kind; returns the kind.
fn check_document(doc: &Value, at: &str) -> String {
    let kind = doc["kind"].as_str().unwrap_or_default().to_string();
    match kind.as_str() {
        "Namespace" => drop(typed::<Namespace>(doc, at)),
        "ServiceAccount" => drop(typed::<ServiceAccount>(doc, at)),
        "ClusterRole" => drop(typed::<ClusterRole>(doc, at)),
        "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(doc, at)),
        "Role" => drop(typed::<Role>(doc, at)),
        "RoleBinding" => drop(typed::<RoleBinding>(doc, at)),
        "Deployment" => drop(typed::<Deployment>(doc, at)),
        "Service" => drop(typed::<Service>(doc, at)),
        "CustomResourceDefinition" => drop(typed::<CustomResourceDefinition>(doc, at)),
        "KVCluster" => {
            let k: KVCluster = typed(doc, at);
            assert!(
                k.spec.problems().is_empty(),
                "{at}: {:?}",
                k.spec.problems()
            );
        }
        "ServiceMonitor" => {
            let o: DynamicObject = typed(doc, at);
            let endpoints = o.data["spec"]["endpoints"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            assert!(!endpoints.is_empty(), "{at}: no endpoints");
            assert!(o.data["spec"]["selector"].is_object(), "{at}: no selector");
        }
        "PrometheusRule" => {
            let o: DynamicObject = typed(doc, at);
            let groups = o.data["spec"]["groups"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            assert!(!groups.is_empty(), "{at}: no rule groups");
            for g in groups {
                for r in g["rules"].as_array().cloned().unwrap_or_default() {
                    assert!(r["alert"].is_string() && r["expr"].is_string(), "{at}: {r}");
                }
            }
        }
        other => panic!("{at}: no typed check for kind {other:?}"),
    }
    kind
}

fn yaml_documents(text: &str, at: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(text)
        .unwrap_or_else(|e| panic!("{at}: not YAML: {e}"))
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

fn files(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            files(&p, ext, out);
        } else if p.extension().is_some_and(|e| e == ext) {
            out.push(p);
        }
    }
}

#[test]
fn every_manifest_in_deploy_parses_into_its_typed_object() {
    let mut yamls = Vec::new();
    files(&repo().join("deploy"), "yaml", &mut yamls);
    yamls.sort();
    let mut kinds = Vec::new();
    for path in &yamls {
        let at = path
            .strip_prefix(repo())
            .unwrap_or(path)
            .display()
            .to_string();
        let text = read(path);
        if at.ends_with("scrape-config.yaml") {
            // Not a Kubernetes object: a prometheus.yml fragment.
            let doc: Value = serde_saphyr::from_str(&text).unwrap();
            let jobs = doc["scrape_configs"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            assert_eq!(jobs.len(), 2, "{at}");
            continue;
        }
        for (i, doc) in yaml_documents(&text, &at).iter().enumerate() {
            kinds.push(check_document(doc, &format!("{at}#{i}")));
        }
    }
    for kind in [
        "Deployment",
        "ClusterRole",
        "KVCluster",
        "ServiceMonitor",
        "PrometheusRule",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} in deploy/");
    }
    check_document(
        &yaml_documents(&read(&repo().join("crds/kvcluster.yaml")), "crds")[0],
        "crds/kvcluster.yaml",
    );
}

/// Metric names a dashboard or alert uses, without histogram suffixes.
fn metric_names(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("dynakv_") {
        let start = i + pos;
        if start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
            i = start + 7;
            continue;
        }
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(text.len(), |e| start + e);
        let mut name = text[start..end].to_string();
        for suffix in ["_bucket", "_count", "_sum"] {
            if let Some(s) = name.strip_suffix(suffix) {
                name = s.to_string();
            }
        }
        out.push(name);
        i = end;
    }
    out.sort();
    out.dedup();
    out
}

#[test]
fn dashboard_and_alerts_use_metrics_that_exist() {
    let node_metrics = read(&repo().join("node/src/metrics.rs"));
    let operator_metrics = dynakv_operator::metrics::Metrics::new().unwrap();
    operator_metrics.reconciled("ok", 0.1);
    operator_metrics.reconciled("kube", 0.1);
    operator_metrics.rebalance("ns", "c", None);
    operator_metrics
        .decisions
        .with_label_values(&["Settled"])
        .inc();
    operator_metrics
        .admin_requests
        .with_label_values(&["SetWeight", "ok"])
        .inc();
    let operator_text = operator_metrics.render();

    let dashboard_text = read(&repo().join("deploy/grafana/dynakv-dashboard.json"));
    let dashboard: Value = serde_json::from_str(&dashboard_text).unwrap();
    let panels = dashboard["panels"].as_array().cloned().unwrap_or_default();
    assert!(panels.len() >= 8);
    for p in &panels {
        assert!(
            p["targets"].as_array().is_some_and(|t| !t.is_empty()),
            "panel {} has no query",
            p["title"]
        );
    }
    let rules_text = read(&repo().join("deploy/prometheus/rules.yaml"));
    let mut names = metric_names(&dashboard_text);
    names.extend(metric_names(&rules_text));
    assert!(names.len() > 10, "{names:?}");
    for name in names {
        if name.starts_with("dynakv_operator_") {
            assert!(
                operator_text.contains(&name),
                "{name} is not an operator metric"
            );
        } else {
            assert!(
                node_metrics.contains(&format!("\"{name}\"")),
                "{name} is not a metric of node/src/metrics.rs"
            );
        }
    }
}

fn helm() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(bin) = std::env::var_os("DYNAKV_TESTENV_BIN") {
        candidates.push(PathBuf::from(bin).join("helm"));
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("helm")));
    }
    if let Some(home) = std::env::var_os("HOME") {
        let cache = PathBuf::from(home).join(".cache/dynakv-testenv");
        if let Ok(entries) = std::fs::read_dir(cache) {
            candidates.extend(entries.flatten().map(|e| e.path().join("bin/helm")));
        }
    }
    candidates.into_iter().find(|p| p.is_file())
}

#[test]
fn the_chart_rendered_with_default_values_parses_into_typed_objects() {
    let Some(helm) = helm() else {
        eprintln!(
            "helm not found (scripts/k8s-testenv.sh install builds it): chart rendering not checked"
        );
        return;
    };
    let chart = repo().join("helm/dynakv-operator");
    for extra in [
        &[][..],
        &[
            "--set",
            "metrics.serviceMonitor.enabled=true",
            "--set",
            "watchNamespace=shop",
        ][..],
    ] {
        let out = std::process::Command::new(&helm)
            .args(["template", "dynakv", chart.to_str().unwrap_or_default()])
            .args(["--namespace", "dynakv-system"])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "helm template failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let kinds: Vec<String> = yaml_documents(&text, "chart")
            .iter()
            .enumerate()
            .map(|(i, d)| check_document(d, &format!("chart#{i}")))
            .collect();
        for kind in [
            "Deployment",
            "ClusterRole",
            "Role",
            "ServiceAccount",
            "Service",
        ] {
            assert!(kinds.iter().any(|k| k == kind), "chart renders no {kind}");
        }
    }
    // More than one replica without leader election is refused.
    let out = std::process::Command::new(&helm)
        .args(["template", "dynakv", chart.to_str().unwrap_or_default()])
        .args(["--set", "leaderElection.enabled=false"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn alert_rules_pass_promtool() {
    let Some(promtool) = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("promtool"))
            .find(|p| p.is_file())
    }) else {
        eprintln!("promtool not found (Debian's prometheus package has it): rules not checked");
        return;
    };
    let doc: Value =
        serde_saphyr::from_str(&read(&repo().join("deploy/prometheus/rules.yaml"))).unwrap();
    let plain = serde_saphyr::to_string(&doc["spec"]).unwrap();
    let path = std::env::temp_dir().join(format!("dynakv-rules-{}.yaml", std::process::id()));
    std::fs::write(&path, plain).unwrap();
    let out = std::process::Command::new(promtool)
        .args(["check", "rules"])
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
