//! The operator end to end on a real control plane (kube-apiserver, etcd,
//! kube-controller-manager from `scripts/k8s-testenv.sh`), with the kubelet stand-in of
//! `dynakv_k8s_tests::kubelet` running every pod as a real `dynakv` process.
//!
//! Each test starts its own control plane (nextest runs each test in a process of its own) and
//! stops it at the end; the environment's watchdog stops it if the test process is killed.
//! A test whose tools are missing fails when `CI=true` and skips loudly otherwise.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dynakv_k8s_tests::kubelet::{Kubelet, KubeletConfig, MAX_PODS};
use dynakv_k8s_tests::operator::Operator;
use dynakv_k8s_tests::testenv::{ControlPlane, Need, Tools, repo_root};
use dynakv_k8s_tests::util::{self, Out, Steps, random_loopback_block, wait_until};
use dynakv_k8s_tests::workload::{self, ClientTls, Endpoint, Writer};
use serde_json::{Value, json};

/// Longest a cluster may take to come up (pods started, joined, weighted).
const UP: Duration = Duration::from_secs(240);
/// Longest a scaling step may take.
const SCALING: Duration = Duration::from_secs(420);
const POLL: Duration = Duration::from_millis(500);

/// A control plane with the CRD, an operator and one kubelet stand-in per cluster.
struct Env {
    // Dropped in this order: operator, stand-ins (processes stop), control plane.
    operator: Option<Operator>,
    kubelets: BTreeMap<String, Kubelet>,
    cp: ControlPlane,
    tools: Tools,
    /// Loopback address of the operator's and Prometheus' listeners.
    infra_ip: Ipv4Addr,
}

impl Env {
    fn start(tools: Tools, clusters: &[(&str, &str)]) -> Env {
        let cp = ControlPlane::start(&tools);
        cp.install_crd();
        let mut kubelets = BTreeMap::new();
        for (ns, name) in clusters {
            let cfg = KubeletConfig {
                namespace: ns.to_string(),
                cluster: name.to_string(),
                first_ip: random_loopback_block(MAX_PODS, 7070),
                root: cp.dir.path().join("kubelet").join(name),
                dynakv: tools.bins().dynakv.clone(),
                nss_wrapper: tools.nss_wrapper.clone(),
                kubeconfig: cp.kubeconfig.clone(),
            };
            kubelets.insert(name.to_string(), Kubelet::start(cfg));
        }
        let infra_ip = random_loopback_block(1, 8080);
        let configs: Vec<&KubeletConfig> = kubelets.values().map(Kubelet::config).collect();
        let operator = Operator::start(
            &tools.bins().operator,
            &cp.kubeconfig,
            &configs,
            infra_ip,
            cp.dir.path(),
        );
        Env {
            operator: Some(operator),
            kubelets,
            cp,
            tools,
            infra_ip,
        }
    }

    fn kubelet(&self, cluster: &str) -> &Kubelet {
        &self.kubelets[cluster]
    }

    /// `host:port` of a pod's gRPC service.
    fn grpc(&self, cluster: &str, ordinal: u32) -> String {
        format!("{}:7070", self.kubelet(cluster).config().pod_ip(ordinal))
    }

    /// A key of a Secret, decoded, read as a user would (`kubectl get secret`).
    fn secret_value(&self, ns: &str, secret: &str, key: &str) -> String {
        use base64::Engine;
        let s = self
            .cp
            .get_json(&["secret", secret, "-n", ns])
            .unwrap_or_else(|| panic!("Secret {ns}/{secret}"));
        let b64 = s["data"][key]
            .as_str()
            .unwrap_or_else(|| panic!("Secret {secret} has no {key}"));
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("base64");
        String::from_utf8(bytes).expect("text")
    }

    /// The cluster's CA (written to a file) and its first admin's token, from its Secrets.
    fn credentials(&self, ns: &str, cluster: &str) -> (PathBuf, String) {
        let ca = self.secret_value(ns, &format!("{cluster}-tls"), "ca.crt");
        let path = self.cp.dir.path().join(format!("{ns}-{cluster}-ca.crt"));
        std::fs::write(&path, ca).expect("write the CA");
        let token = self.secret_value(ns, &format!("{cluster}-admin-token"), "token");
        (path, token)
    }

    /// How a client reaches pod `ordinal` of a TLS cluster: its address, its DNS name for the
    /// certificate check, the CA and the admin token.
    fn endpoint(&self, ns: &str, cluster: &str, ordinal: u32) -> Endpoint {
        let (ca, token) = self.credentials(ns, cluster);
        let config = dynakv_node::tls::client_config_from_files(&ca, None).expect("the CA loads");
        Endpoint {
            addr: self.grpc(cluster, ordinal),
            tls: Some(Arc::new(ClientTls {
                server_name: format!("{cluster}-{ordinal}.{cluster}-peers.{ns}.svc"),
                config,
                token: Some(token),
            })),
        }
    }

    fn kvc(&self, ns: &str, name: &str) -> Option<Value> {
        self.cp.get_json(&["kvc", name, "-n", ns])
    }

    /// Waits until the KVCluster has settled with `replicas` nodes: phase Running, Progressing
    /// False (Settled), no ring change, `replicas` ready pods, every member that is not `left`
    /// a `normal` member at weight and target weight 100, and the StatefulSet at that size;
    /// returns its status.
    fn wait_running(&self, ns: &str, name: &str, replicas: usize, timeout: Duration) -> Value {
        wait_until(
            &format!("{ns}/{name} settled with {replicas} ready nodes at weight 100"),
            timeout,
            POLL,
            |last| {
                let kvc = self.kvc(ns, name)?;
                let s = &kvc["status"];
                *last = summary(s);
                let nodes: Vec<&Value> = s["nodes"]
                    .as_array()?
                    .iter()
                    .filter(|n| n["lifecycle"] != "left")
                    .collect();
                let ok = s["phase"] == "Running"
                    && condition(s, "Progressing")["reason"] == "Settled"
                    && s["rebalancing"].is_null()
                    && s["readyReplicas"] == json!(replicas)
                    && s["replicas"] == json!(replicas)
                    && nodes.len() == replicas
                    && nodes.iter().all(|n| {
                        n["lifecycle"] == "normal"
                            && n["weight"] == 100
                            && n["targetWeight"] == 100
                            && n["ready"] == true
                    });
                let sts = self.cp.get_json(&["statefulset", name, "-n", ns])?;
                (ok && sts["spec"]["replicas"] == json!(replicas)).then(|| s.clone())
            },
        )
    }

    /// Runs the `dynakv` CLI resolving pod names as the pods do.
    fn dynakv_cli(&self, cluster: &str, args: &[&str]) -> Out {
        let mut cmd = Command::new(&self.tools.bins().dynakv);
        cmd.args(args)
            .env_remove("DYNAKV_ENDPOINT")
            .envs(self.kubelet(cluster).config().dns_env());
        util::run(&mut cmd, Duration::from_secs(30))
    }

    fn write_manifest(&self, file: &str, yaml: &str) -> PathBuf {
        let path = self.cp.dir.path().join(file);
        std::fs::write(&path, yaml).expect("write a manifest");
        path
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.operator.take();
        self.kubelets.clear();
    }
}

/// One line about a KVCluster status, for timeouts.
fn summary(s: &Value) -> String {
    let nodes: Vec<String> = s["nodes"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|n| {
                    format!(
                        "{}:{}/{}:{}:{}",
                        n["name"].as_str().unwrap_or("?"),
                        n["weight"],
                        n["targetWeight"],
                        n["lifecycle"].as_str().unwrap_or("?"),
                        if n["ready"] == true {
                            "ready"
                        } else {
                            "unready"
                        }
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    format!(
        "phase={} progressing={} ready={} replicas={} message={} rebalancing={} nodes=[{}]",
        s["phase"],
        condition(s, "Progressing")["reason"],
        s["readyReplicas"],
        s["replicas"],
        s["message"],
        s["rebalancing"],
        nodes.join(" ")
    )
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .unwrap_or(&Value::Null)
}

/// Every object `kubectl get kvc NAME -o json --watch` streams, with the time it came.
struct StatusLog {
    child: Child,
    seen: Arc<Mutex<Vec<(Instant, Value)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StatusLog {
    fn start(env: &Env, ns: &str, name: &str) -> StatusLog {
        let mut cmd = Command::new(&env.tools.kubectl);
        cmd.args(["get", "kvc", name, "-n", ns, "-o", "json", "--watch"])
            .env("KUBECONFIG", &env.cp.kubeconfig)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        util::die_with_parent(&mut cmd);
        let mut child = cmd.spawn().expect("kubectl get --watch");
        let stdout = child.stdout.take().expect("piped");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let thread = std::thread::spawn(move || {
            let stream = serde_json::Deserializer::from_reader(stdout).into_iter::<Value>();
            for v in stream.flatten() {
                s.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((Instant::now(), v));
            }
        });
        StatusLog {
            child,
            seen,
            thread: Some(thread),
        }
    }

    /// The distinct steps the status went through, one line each, with seconds since `t0`:
    /// phase, the Progressing reason and the ring change with its progress.
    fn story(&self, t0: Instant) -> Vec<String> {
        let mut lines: Vec<String> = Vec::new();
        let mut last = String::new();
        for (at, v) in self.seen.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let s = &v["status"];
            let r = &s["rebalancing"];
            let ring = if r.is_object() {
                format!(
                    " ring: {} {} {}->{} {} {} keys {}/{}",
                    r["kind"].as_str().unwrap_or("?"),
                    r["node"].as_str().unwrap_or("?"),
                    r["fromWeight"],
                    r["toWeight"],
                    r["phase"].as_str().unwrap_or("?"),
                    r["progress"].as_str().unwrap_or("?"),
                    r["keysDone"],
                    r["keysTotal"]
                )
            } else {
                String::new()
            };
            let line = format!(
                "{} ({}){ring}",
                s["phase"].as_str().unwrap_or("?"),
                condition(s, "Progressing")["reason"]
                    .as_str()
                    .unwrap_or("?"),
            );
            if line != last {
                let t = at.saturating_duration_since(t0).as_secs_f64();
                lines.push(format!("{t:7.1}s {line}"));
                last = line;
            }
        }
        lines
    }

    fn statuses(&self) -> Vec<Value> {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(_, v)| v["status"].clone())
            .collect()
    }
}

impl Drop for StatusLog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reasons of the Events about an object.
fn event_reasons(cp: &ControlPlane, ns: &str, name: &str) -> Vec<(String, String)> {
    cp.get_json(&[
        "events",
        "-n",
        ns,
        "--field-selector",
        &format!("involvedObject.name={name},involvedObject.kind=KVCluster"),
    ])
    .and_then(|v| v["items"].as_array().cloned())
    .unwrap_or_default()
    .iter()
    .map(|e| {
        (
            e["reason"].as_str().unwrap_or_default().to_string(),
            e["message"].as_str().unwrap_or_default().to_string(),
        )
    })
    .collect()
}

/// Waits until `kubectl get ARGS` lists nothing.
fn wait_gone(cp: &ControlPlane, what: &str, args: &[&str]) {
    wait_until(what, Duration::from_secs(120), POLL, |last| {
        let names = cp.names(args);
        *last = format!("{names:?}");
        names.is_empty().then_some(())
    });
}

// ---------------------------------------------------------------------------------------------

#[test]
fn the_crd_installs_and_the_api_server_refuses_invalid_kvclusters() {
    let test = "the_crd_installs_and_the_api_server_refuses_invalid_kvclusters";
    let Some(tools) = Tools::find(test, &[Need::ControlPlane]) else {
        return;
    };
    let cp = ControlPlane::start(&tools);
    cp.install_crd();

    let crd = cp
        .get_json(&["crd", "kvclusters.dynakv.io"])
        .expect("the CRD is served");
    assert_eq!(crd["spec"]["names"]["shortNames"], json!(["kvc"]));
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert_eq!(
        version["subresources"]["scale"]["specReplicasPath"],
        ".spec.replicas"
    );
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .expect("printer columns")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        columns,
        ["Replicas", "Ready", "Phase", "Rebalancing", "Age"]
    );

    let manifest = |name: &str, spec: &str| {
        let path = cp.dir.path().join(format!("{name}.yaml"));
        std::fs::write(
            &path,
            format!(
                "apiVersion: dynakv.io/v1alpha1\nkind: KVCluster\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n{spec}"
            ),
        )
        .expect("write a manifest");
        path
    };
    let apply = |path: &Path| cp.kubectl(&["apply", "-f", &path.to_string_lossy()]);
    let refused = |out: &Out, field: &str, message: &str| {
        assert!(!out.ok(), "the API server accepted it: {out}");
        assert!(
            out.stderr.contains("is invalid")
                && out.stderr.contains(field)
                && out.stderr.contains(message),
            "expected a refusal of {field} saying {message:?}: {out}"
        );
    };

    // replicas < replicationFactor
    let out = apply(&manifest("few", "  replicas: 2\n  replicationFactor: 3\n"));
    refused(
        &out,
        "spec.replicas",
        "replicas must be at least replicationFactor: a key needs that many nodes",
    );
    // quorums larger than N
    let out = apply(&manifest(
        "bigr",
        "  replicas: 5\n  replicationFactor: 3\n  readQuorum: 4\n",
    ));
    refused(
        &out,
        "spec.readQuorum",
        "readQuorum cannot exceed replicationFactor",
    );
    let out = apply(&manifest(
        "bigw",
        "  replicas: 5\n  replicationFactor: 3\n  writeQuorum: 5\n",
    ));
    refused(
        &out,
        "spec.writeQuorum",
        "writeQuorum cannot exceed replicationFactor",
    );
    // One certificate source at most.
    let out = apply(&manifest(
        "twosources",
        "  tls:\n    secretName: mine\n    certManager:\n      issuerRef: {name: ca}\n",
    ));
    refused(
        &out,
        "spec.tls",
        "tls.secretName and tls.certManager are exclusive",
    );
    // Nothing of the refused ones was stored.
    assert!(cp.names(&["kvc"]).is_empty());

    // A valid one is stored, with the defaults filled in.
    let ok = manifest("ok", "  replicas: 3\n  replicationFactor: 3\n");
    let out = apply(&ok);
    assert!(out.ok(), "a valid KVCluster was refused: {out}");
    let stored = cp.get_json(&["kvc", "ok"]).expect("stored");
    assert_eq!(stored["spec"]["vnodesPerNode"], 64);
    assert_eq!(stored["spec"]["readQuorum"], "quorum");
    // Unset `tls` is left to the operator (on for a new cluster, as it runs for an old one);
    // once said, it cannot change (nodes could not talk across the switch).
    assert!(stored["spec"].get("tls").is_none(), "{stored}");
    let out = apply(&manifest(
        "ok",
        "  replicas: 3\n  replicationFactor: 3\n  tls: {}\n",
    ));
    assert!(out.ok(), "{out}");
    let stored = cp.get_json(&["kvc", "ok"]).expect("stored");
    assert_eq!(
        stored["spec"]["tls"],
        json!({"enabled": true}),
        "closed by default"
    );
    let out = apply(&manifest(
        "ok",
        "  replicas: 3\n  replicationFactor: 3\n  tls: {enabled: false}\n",
    ));
    refused(&out, "spec.tls.enabled", "tls.enabled is immutable");

    // replicationFactor is immutable, also when the change would be valid otherwise.
    let out = apply(&manifest("ok", "  replicas: 5\n  replicationFactor: 5\n"));
    refused(
        &out,
        "spec.replicationFactor",
        "replicationFactor is immutable",
    );
    // The scale subresource goes through the same rules.
    let out = cp.kubectl(&["scale", "kvc/ok", "--replicas=2"]);
    refused(
        &out,
        "spec.replicas",
        "replicas must be at least replicationFactor",
    );
    let out = cp.kubectl(&["scale", "kvc/ok", "--replicas=4"]);
    assert!(out.ok(), "a valid scale was refused: {out}");
    assert_eq!(
        cp.get_json(&["kvc", "ok"]).expect("stored")["spec"]["replicas"],
        4
    );
}

#[test]
fn the_helm_chart_and_the_plain_manifests_render_lint_and_pass_a_server_side_dry_run() {
    let test = "the_helm_chart_and_the_plain_manifests_render_lint_and_pass_a_server_side_dry_run";
    let Some(tools) = Tools::find(test, &[Need::ControlPlane, Need::Helm]) else {
        return;
    };
    let root = repo_root();
    let chart = root.join("helm/dynakv-operator");
    let helm = |args: &[&str]| {
        let mut cmd = Command::new(&tools.helm);
        cmd.args(args)
            // No repositories, no cache in $HOME: everything helm writes stays in /tmp.
            .env(
                "HELM_CACHE_HOME",
                std::env::temp_dir().join("dynakv-helm-cache"),
            )
            .env(
                "HELM_CONFIG_HOME",
                std::env::temp_dir().join("dynakv-helm-config"),
            )
            .env(
                "HELM_DATA_HOME",
                std::env::temp_dir().join("dynakv-helm-data"),
            );
        util::run(&mut cmd, Duration::from_secs(60))
    };
    let out = helm(&["lint", "--strict", &chart.to_string_lossy()]);
    assert!(out.ok(), "helm lint: {out}");

    // The chart's CRD is the CRD of crds/ (Helm installs it from the chart's own crds/).
    assert_eq!(
        std::fs::read_to_string(chart.join("crds/kvcluster.yaml")).expect("chart CRD"),
        std::fs::read_to_string(root.join("crds/kvcluster.yaml")).expect("crds/"),
        "helm/dynakv-operator/crds/kvcluster.yaml differs from crds/kvcluster.yaml"
    );

    let cp = ControlPlane::start(&tools);
    cp.kubectl_ok(&["create", "namespace", "dynakv-system"]);
    let dry_run = |file: &Path| {
        let out = cp.kubectl(&[
            "apply",
            "--server-side",
            "--dry-run=server",
            "-f",
            &file.to_string_lossy(),
        ]);
        assert!(out.ok(), "server-side dry run of {}: {out}", file.display());
        assert!(
            !out.stderr.contains("Warning"),
            "the API server warned about {}: {out}",
            file.display()
        );
        out.stdout
    };

    let renders: [(&str, &[&str]); 2] = [
        ("defaults", &[]),
        (
            "one-replica-one-namespace",
            &[
                "--set",
                "replicaCount=1",
                "--set",
                "leaderElection.enabled=false",
                "--set",
                "watchNamespace=shop",
            ],
        ),
    ];
    for (label, extra) in renders {
        let mut args = vec![
            "template",
            "dynakv-operator",
            chart.to_str().expect("utf-8 path"),
            "--namespace",
            "dynakv-system",
            "--include-crds",
        ];
        args.extend_from_slice(extra);
        let out = helm(&args);
        assert!(out.ok(), "helm template ({label}): {out}");
        let file = cp.dir.path().join(format!("chart-{label}.yaml"));
        std::fs::write(&file, &out.stdout).expect("write the rendered chart");
        let applied = dry_run(&file);
        for kind in [
            "customresourcedefinition.apiextensions.k8s.io/kvclusters.dynakv.io",
            "deployment.apps/dynakv-operator",
            "serviceaccount/dynakv-operator",
            "clusterrole.rbac.authorization.k8s.io/dynakv-operator",
        ] {
            assert!(
                applied.contains(kind),
                "{label}: the dry run did not include {kind}:\n{applied}"
            );
        }
    }
    // Nothing was created by the dry runs.
    assert!(cp.names(&["deployments", "-n", "dynakv-system"]).is_empty());

    // The plain manifests too (the CRD first, as their header says).
    dry_run(&root.join("crds/kvcluster.yaml"));
    let applied = dry_run(&root.join("deploy/operator.yaml"));
    assert!(
        applied.contains("deployment.apps/dynakv-operator"),
        "{applied}"
    );
}

#[test]
fn the_alert_rules_pass_promtool_check_and_a_unit_test_per_alert() {
    let test = "the_alert_rules_pass_promtool_check_and_a_unit_test_per_alert";
    let Some(tools) = Tools::find(test, &[Need::Promtool]) else {
        return;
    };
    let root = repo_root();
    let rule: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(root.join("deploy/prometheus/rules.yaml")).expect("rules.yaml"),
    )
    .expect("rules.yaml is YAML");
    assert_eq!(rule["kind"], "PrometheusRule");
    let dir = tempfile::tempdir().expect("a temporary directory");
    // The PrometheusRule's spec.groups is a plain rules file (JSON is YAML).
    let rules = json!({"groups": rule["spec"]["groups"]});
    std::fs::write(dir.path().join("rules.yaml"), rules.to_string()).expect("write rules");
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("prometheus/rules_test.yaml"),
    )
    .expect("prometheus/rules_test.yaml");
    std::fs::write(dir.path().join("rules_test.yaml"), &unit).expect("write unit tests");

    let out = util::run(
        Command::new(&tools.promtool)
            .args(["check", "rules"])
            .arg(dir.path().join("rules.yaml")),
        Duration::from_secs(60),
    );
    assert!(out.ok(), "promtool check rules: {out}");
    let out = util::run(
        Command::new(&tools.promtool)
            .args(["test", "rules"])
            .arg(dir.path().join("rules_test.yaml")),
        Duration::from_secs(120),
    );
    assert!(out.ok(), "promtool test rules: {out}");

    // Each alert has a case where it fires and one where it does not.
    let alerts: BTreeSet<String> = rules["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .filter_map(|r| r["alert"].as_str().map(str::to_string))
        .collect();
    assert!(alerts.len() >= 7, "alerts: {alerts:?}");
    let tests: Value = serde_saphyr::from_str(&unit).expect("rules_test.yaml is YAML");
    let cases: Vec<(String, bool)> = tests["tests"]
        .as_array()
        .expect("tests")
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().cloned().unwrap_or_default())
        .map(|c| {
            (
                c["alertname"].as_str().unwrap_or_default().to_string(),
                c["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()),
            )
        })
        .collect();
    for alert in &alerts {
        assert!(
            cases.iter().any(|(a, fires)| a == alert && *fires),
            "no unit test where {alert} fires"
        );
        assert!(
            cases.iter().any(|(a, fires)| a == alert && !*fires),
            "no unit test where {alert} stays silent"
        );
    }
}

/// A tiny HTTP GET (Prometheus' API), body as text.
fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.0 200")
        .then(|| body.to_string())
        .or_else(|| head.starts_with("HTTP/1.1 200").then(|| body.to_string()))
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The series a PromQL instant query returns.
fn promql(addr: &str, query: &str) -> Vec<Value> {
    http_get(
        addr,
        &format!("/api/v1/query?query={}", percent_encode(query)),
    )
    .and_then(|b| serde_json::from_str::<Value>(&b).ok())
    .and_then(|v| v["data"]["result"].as_array().cloned())
    .unwrap_or_default()
}

/// A real Prometheus with the jobs of deploy/prometheus/scrape-config.yaml.
struct Prometheus {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Prometheus {
    fn start(env: &Env) -> Prometheus {
        let root = repo_root();
        let dir = env.cp.dir.path().join("prometheus");
        std::fs::create_dir_all(&dir).expect("prometheus dir");
        let mut scrape: Value = serde_saphyr::from_str(
            &std::fs::read_to_string(root.join("deploy/prometheus/scrape-config.yaml"))
                .expect("scrape-config.yaml"),
        )
        .expect("scrape-config.yaml is YAML");
        // Prometheus runs outside the cluster here: service discovery gets the API server's
        // address and credentials from the kubeconfig, where in a pod it would use its service
        // account. Nothing else of the jobs changes.
        let kubeconfig: Value = serde_saphyr::from_str(
            &std::fs::read_to_string(&env.cp.kubeconfig).expect("kubeconfig"),
        )
        .expect("kubeconfig is YAML");
        let server = kubeconfig["clusters"][0]["cluster"]["server"].clone();
        let token = kubeconfig["users"][0]["user"]["token"]
            .as_str()
            .expect("a token")
            .to_string();
        let ca = env.cp.dir.path().join("pki/ca.crt");
        for job in scrape["scrape_configs"]
            .as_array_mut()
            .expect("scrape_configs")
        {
            for sd in job["kubernetes_sd_configs"]
                .as_array_mut()
                .expect("kubernetes_sd_configs")
            {
                sd["api_server"] = server.clone();
                sd["tls_config"] = json!({"ca_file": ca});
                sd["authorization"] = json!({"credentials": token});
            }
            job["scrape_interval"] = json!("2s");
            job["scrape_timeout"] = json!("1s");
        }
        let config = json!({
            "global": {"scrape_interval": "2s", "evaluation_interval": "2s"},
            "scrape_configs": scrape["scrape_configs"],
        });
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config.to_string()).expect("write prometheus.yml");
        let addr = format!("{}:9090", env.infra_ip);
        let log = dir.join("prometheus.log");
        let file = std::fs::File::create(&log).expect("prometheus log");
        let mut cmd = Command::new(&env.tools.prometheus);
        cmd.arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file);
        util::die_with_parent(&mut cmd);
        let child = cmd.spawn().expect("start prometheus");
        Prometheus { child, addr, log }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        util::terminate(&mut self.child, Duration::from_secs(5));
        if std::thread::panicking() {
            eprintln!(
                "--- last lines of {}\n{}",
                self.log.display(),
                util::tail(&self.log, 30)
            );
        }
    }
}

#[test]
fn the_example_cluster_serves_is_scraped_by_prometheus_and_is_collected_on_delete() {
    let test = "the_example_cluster_serves_is_scraped_by_prometheus_and_is_collected_on_delete";
    let needs = [
        Need::ControlPlane,
        Need::NssWrapper,
        Need::Prometheus,
        Need::WorkspaceBins,
    ];
    let Some(tools) = Tools::find(test, &needs) else {
        return;
    };
    let steps = Steps::start();
    let env = Env::start(tools, &[("default", "demo")]);
    steps.done("control plane, CRD, stand-in and operator started");
    let root = repo_root();

    // deploy/examples/ holds `demo` (default namespace) and `carts` (namespace shop).
    env.cp.kubectl_ok(&["create", "namespace", "shop"]);
    let out = env
        .cp
        .kubectl_in(&["apply", "-f", "deploy/examples/"], Some(&root));
    assert!(out.ok(), "kubectl apply -f deploy/examples/: {out}");
    assert!(
        out.stdout.contains("kvcluster.dynakv.io/demo created"),
        "{out}"
    );
    assert!(
        out.stdout.contains("kvcluster.dynakv.io/carts created"),
        "{out}"
    );

    let status = env.wait_running("default", "demo", 3, UP);
    steps.done("demo settled with 3 nodes");
    for (type_, want, reason) in [
        ("Available", "True", Some("QuorumsReachable")),
        ("Progressing", "False", Some("Settled")),
        ("Degraded", "False", None),
        ("Rebalancing", "False", None),
    ] {
        let c = condition(&status, type_);
        assert_eq!(c["status"], want, "{type_}: {c}");
        if let Some(r) = reason {
            assert_eq!(c["reason"], r, "{type_}: {c}");
        }
    }

    // `kubectl get kvc` shows the printer columns.
    let table = env.cp.kubectl_ok(&["get", "kvc", "demo"]);
    let mut lines = table.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "REPLICAS", "READY", "PHASE", "REBALANCING", "AGE"],
        "{table}"
    );
    let row: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(&row[..4], ["demo", "3", "3", "Running"], "{table}");
    let described = env.cp.kubectl_ok(&["describe", "kvc", "demo"]);
    assert!(described.contains("QuorumsReachable"), "{described}");

    // Each pod runs as a process on its own address, and reports it.
    for i in 0..3u32 {
        let pod = env
            .cp
            .get_json(&["pod", &format!("demo-{i}")])
            .expect("the pod");
        assert_eq!(pod["status"]["phase"], "Running");
        assert_eq!(
            pod["status"]["podIP"],
            env.kubelet("demo").config().pod_ip(i).to_string()
        );
        assert_eq!(pod["spec"]["nodeName"], "dynakv-standin");
    }

    // `dynakv put/get` through the pods' DNS names, with TLS: the CA and the first admin's
    // token come from the cluster's Secrets, as the docs tell users to get them.
    let (ca, token) = env.credentials("default", "demo");
    let ca = ca.to_string_lossy().into_owned();
    let creds = ["--ca", ca.as_str(), "--token", token.as_str()];
    let first = "demo-0.demo-peers.default.svc:7070";
    let with = |args: &[&str]| -> Vec<String> {
        args.iter()
            .chain(creds.iter())
            .map(|s| s.to_string())
            .collect()
    };
    let run = |args: Vec<String>| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        env.dynakv_cli("demo", &a)
    };
    let out = run(with(&["put", "-e", first, "greeting", "hello from k8s"]));
    assert!(out.ok(), "dynakv put: {out}");
    for i in 0..3 {
        let endpoint = format!("demo-{i}.demo-peers.default.svc:7070");
        let out = run(with(&["get", "-e", &endpoint, "greeting", "-o", "json"]));
        assert!(out.ok(), "dynakv get via {endpoint}: {out}");
        assert!(out.stdout.contains("hello from k8s"), "{out}");
    }
    // Closed by default: plain text gets nothing, and TLS without a token is unauthenticated.
    let out = env.dynakv_cli("demo", &["get", "-e", first, "greeting", "--plaintext"]);
    assert!(!out.ok(), "a plain-text client was served: {out}");
    let out = env.dynakv_cli("demo", &["get", "-e", first, "greeting", "--ca", &ca]);
    assert_eq!(out.code, 7, "TLS without a token: {out}");
    assert!(out.stderr.contains("needs the read role"), "{out}");
    let out = run(with(&[
        "cluster",
        "status",
        "-e",
        "demo-1.demo-peers.default.svc:7070",
        "-o",
        "json",
    ]));
    assert!(out.ok(), "dynakv cluster status: {out}");
    let cs: Value = serde_json::from_str(&out.stdout).expect("cluster status JSON");
    assert_eq!(cs["cluster_id"], "demo.default", "{cs}");

    // carts asks cert-manager for its certificate. Without cert-manager the operator waits and
    // says why; once the Certificate kind exists it applies the Certificate, and once the
    // Secret is there (the test stands in for cert-manager: any certificate does, carts' pods
    // never run here) it makes the rest.
    wait_until(
        "carts to wait for cert-manager",
        Duration::from_secs(60),
        POLL,
        |last| {
            let kvc = env.kvc("shop", "carts")?;
            let p = condition(&kvc["status"], "Progressing");
            *last = p.to_string();
            (p["reason"] == "WaitingForCertificate"
                && p["message"].as_str()?.contains(
                    "cert-manager's Certificate kind (cert-manager.io/v1) is not installed",
                ))
            .then_some(())
        },
    );
    assert!(
        env.cp
            .get_json(&["statefulset", "carts", "-n", "shop"])
            .is_none()
    );
    let crd = env.write_manifest("certificates-crd.yaml", CERT_MANAGER_CERTIFICATE_CRD);
    env.cp.kubectl_ok(&["apply", "-f", &crd.to_string_lossy()]);
    let cert = wait_until("carts' Certificate", Duration::from_secs(60), POLL, |_| {
        env.cp
            .get_json(&["certificates.cert-manager.io", "carts-node", "-n", "shop"])
    });
    assert_eq!(cert["spec"]["secretName"], "carts-tls", "{cert}");
    assert_eq!(cert["spec"]["uris"], json!(["urn:dynakv:node:*"]), "{cert}");
    assert_eq!(
        cert["spec"]["issuerRef"],
        json!({"name": "internal-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"})
    );
    assert!(
        cert["spec"]["dnsNames"]
            .as_array()
            .is_some_and(|n| n.contains(&json!("*.carts-peers.shop.svc"))),
        "{cert}"
    );
    let mut issued = env
        .cp
        .get_json(&["secret", "demo-tls", "-n", "default"])
        .expect("demo's certificate");
    issued["metadata"] = json!({"name": "carts-tls", "namespace": "shop"});
    let issued = env.write_manifest("carts-tls.json", &issued.to_string());
    env.cp
        .kubectl_ok(&["apply", "-f", &issued.to_string_lossy()]);

    // Then carts' objects; its pods wait for a node that matches its nodeSelector (no stand-in
    // runs them: this machine has no storage-optimized node).
    wait_until(
        "carts' StatefulSet",
        Duration::from_secs(60),
        POLL,
        |last| {
            let sts = env.cp.get_json(&["statefulset", "carts", "-n", "shop"])?;
            *last = sts["spec"].to_string();
            (sts["spec"]["replicas"] == 5).then_some(())
        },
    );

    // Prometheus with the scrape config of deploy/ finds the pods through the API server and
    // scrapes them.
    let prom = Prometheus::start(&env);
    steps.done("demo served put/get through its pods' names; Prometheus started");
    let up = wait_until(
        "Prometheus to scrape the three nodes",
        Duration::from_secs(120),
        Duration::from_secs(1),
        |last| {
            let r = promql(
                &prom.addr,
                r#"up{job="dynakv-nodes",kvcluster="demo"} == 1"#,
            );
            *last = format!("{r:?}");
            (r.len() == 3).then_some(r)
        },
    );
    let pods: BTreeSet<&str> = up
        .iter()
        .filter_map(|s| s["metric"]["pod"].as_str())
        .collect();
    assert_eq!(pods, BTreeSet::from(["demo-0", "demo-1", "demo-2"]));
    assert!(up.iter().all(|s| s["metric"]["namespace"] == "default"));
    // A node metric: the key written above, on its three replicas.
    wait_until(
        "dynakv_keys_stored to count the key on its three replicas",
        Duration::from_secs(60),
        Duration::from_secs(1),
        |last| {
            let r = promql(&prom.addr, r#"sum(dynakv_keys_stored{kvcluster="demo"})"#);
            *last = format!("{r:?}");
            (r.first()?["value"][1] == "3").then_some(())
        },
    );
    let ring = promql(&prom.addr, r#"dynakv_ring_version{kvcluster="demo"}"#);
    assert_eq!(ring.len(), 3, "{ring:?}");
    drop(prom);
    steps.done("Prometheus scraped the three nodes");

    // Delete: everything the operator made goes; the volumes stay (whenDeleted: Retain).
    let out = env
        .cp
        .kubectl(&["delete", "kvc", "demo", "--wait=true", "--timeout=120s"]);
    assert!(out.ok(), "kubectl delete kvc demo: {out}");
    steps.done("kubectl delete kvc demo returned");
    let sel = "app.kubernetes.io/instance=demo";
    wait_gone(&env.cp, "demo's pods", &["pods", "-l", sel]);
    steps.done("demo's pods gone");
    for (kind, name) in [
        ("statefulset", "demo"),
        ("configmap", "demo-config"),
        ("service", "demo"),
        ("service", "demo-peers"),
        ("pdb", "demo"),
    ] {
        wait_until(
            &format!("{kind}/{name} to be collected"),
            Duration::from_secs(120),
            POLL,
            |_| env.cp.get_json(&[kind, name]).is_none().then_some(()),
        );
    }
    wait_until(
        "the stand-in to stop demo's processes",
        Duration::from_secs(60),
        POLL,
        |last| {
            let r = env.kubelet("demo").running();
            *last = format!("{r:?}");
            r.is_empty().then_some(())
        },
    );
    let mut pvcs = env.cp.names(&["pvc", "-l", sel]);
    pvcs.sort();
    assert_eq!(pvcs, ["data-demo-0", "data-demo-1", "data-demo-2"]);
    let reasons = event_reasons(&env.cp, "default", "demo");
    assert!(reasons.iter().any(|(r, _)| r == "Deleting"), "{reasons:?}");
    steps.done("demo deleted and collected");

    let out = env.cp.kubectl(&[
        "delete",
        "kvc",
        "carts",
        "-n",
        "shop",
        "--wait=true",
        "--timeout=120s",
    ]);
    assert!(out.ok(), "kubectl delete kvc carts: {out}");
    wait_gone(
        &env.cp,
        "carts' objects",
        &[
            "statefulsets,services,configmaps,pods",
            "-n",
            "shop",
            "-l",
            "app.kubernetes.io/instance=carts",
        ],
    );
}

const SCALE_MANIFEST: &str = r#"apiVersion: dynakv.io/v1alpha1
kind: KVCluster
metadata:
  name: kv
  namespace: default
spec:
  replicas: 3
  replicationFactor: 3
  storage:
    size: 1Gi
    retention:
      whenScaled: Delete
      whenDeleted: Delete
  scaling:
    weightSteps: [25, 50, 100]
  nodeConfig:
    # Slow handoffs, so that every step lasts long enough to be seen in the status (the
    # operator looks every 5 s while a step runs).
    handoff:
      max_bytes_per_sec: 24576
"#;

/// The Certificate kind of cert-manager, schema left open: enough for the API server to store
/// what the operator applies (no cert-manager runs here).
const CERT_MANAGER_CERTIFICATE_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: certificates.cert-manager.io
spec:
  group: cert-manager.io
  names: {kind: Certificate, listKind: CertificateList, plural: certificates, singular: certificate}
  scope: Namespaced
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
"#;

#[test]
fn scaling_3_to_5_to_3_with_a_writer_loses_nothing_and_the_status_tells_the_story() {
    let test = "scaling_3_to_5_to_3_with_a_writer_loses_nothing_and_the_status_tells_the_story";
    let Some(tools) = Tools::find(
        test,
        &[Need::ControlPlane, Need::NssWrapper, Need::WorkspaceBins],
    ) else {
        return;
    };
    let steps = Steps::start();
    let env = Env::start(tools, &[("default", "kv")]);
    steps.done("control plane, CRD, stand-in and operator started");
    let manifest = env.write_manifest("kv.yaml", SCALE_MANIFEST);
    env.cp
        .kubectl_ok(&["apply", "-f", &manifest.to_string_lossy()]);
    env.wait_running("default", "kv", 3, UP);
    steps.done("kv settled with 3 nodes");

    // Keys loaded, then a writer running through the three nodes that stay.
    let stable: Vec<Endpoint> = (0..3).map(|i| env.endpoint("default", "kv", i)).collect();
    let loaded = workload::load(&stable, "key-", 300, 1024);
    let log = StatusLog::start(&env, "default", "kv");
    let writer = Writer::start(stable.clone(), "w-".into(), 256, Duration::from_millis(40));
    let t0 = Instant::now();
    steps.done("300 keys loaded; writer started");

    // 3 -> 5: the new nodes join at weight 0 and are ramped in.
    env.cp.kubectl_ok(&["scale", "kvc/kv", "--replicas=5"]);
    env.wait_running("default", "kv", 5, SCALING);
    let up_took = t0.elapsed();
    steps.done("3 -> 5 settled");
    let seen = log.statuses();
    let ramp: Vec<&Value> = seen
        .iter()
        .map(|s| &s["rebalancing"])
        .filter(|r| r.is_object() && (r["node"] == "kv-3" || r["node"] == "kv-4"))
        .collect();
    assert!(
        ramp.iter().any(|r| r["keysTotal"].as_i64().unwrap_or(0) > 0
            && r["progress"].as_str().is_some_and(|p| p.ends_with('%'))),
        "no rebalancing progress of kv-3/kv-4 in the status during the scale-up: {ramp:?}"
    );
    assert!(
        seen.iter().any(|s| s["phase"] == "ScalingUp"),
        "never ScalingUp"
    );
    assert!(
        env.kubelet("kv").stops().is_empty(),
        "{:?}",
        env.kubelet("kv").stops()
    );

    // 5 -> 3, and a changed mind in the middle of the first drain: back to 5.
    let t1 = Instant::now();
    env.cp.kubectl_ok(&["scale", "kvc/kv", "--replicas=3"]);
    wait_until(
        "the drain of kv-4 to start",
        SCALING,
        Duration::from_millis(100),
        |last| {
            let s = log.statuses().last()?.clone();
            *last = summary(&s);
            let draining = s["nodes"].as_array()?.iter().any(|n| {
                n["name"] == "kv-4" && (n["lifecycle"] == "leaving" || n["targetWeight"] == 0)
            });
            let progressing = condition(&s, "Progressing");
            (draining
                || progressing["reason"] == "Draining"
                || progressing["reason"] == "WaitingForDrain")
                .then_some(())
        },
    );
    env.cp.kubectl_ok(&["scale", "kvc/kv", "--replicas=5"]);
    steps.done("5 -> 3 called off during the drain of kv-4");
    env.wait_running("default", "kv", 5, SCALING);
    steps.done("back at 5, settled");
    assert!(
        env.kubelet("kv").stops().is_empty(),
        "a pod was removed although the drain was called off: {:?}",
        env.kubelet("kv").stops()
    );

    // 5 -> 3 for good.
    env.cp.kubectl_ok(&["scale", "kvc/kv", "--replicas=3"]);
    let status = env.wait_running("default", "kv", 3, SCALING);
    let down_took = t1.elapsed();
    steps.done("5 -> 3 settled");
    let report = writer.finish();

    // Pods went only after their node had handed everything over.
    let stops = env.kubelet("kv").stops();
    let stopped: Vec<&str> = stops.iter().map(|s| s.pod.as_str()).collect();
    assert_eq!(stopped, ["kv-4", "kv-3"], "{stops:?}");
    for s in &stops {
        let m = s
            .member
            .as_ref()
            .unwrap_or_else(|| panic!("{}: no membership answer before its stop", s.pod));
        assert!(
            m.lifecycle == "left" && m.weight == 0 && m.target_weight == 0,
            "{} was stopped before it had handed over its data: {m:?}",
            s.pod
        );
        assert!(m.replica_ownership == 0.0, "{}: {m:?}", s.pod);
    }
    let left: Vec<&str> = status["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter(|n| n["lifecycle"] == "left")
        .filter_map(|n| n["name"].as_str())
        .collect();
    assert_eq!(left, ["kv-3", "kv-4"], "{}", summary(&status));

    // Volumes as the retention policy says: whenScaled: Delete.
    wait_until(
        "the volumes of kv-3 and kv-4 to be deleted",
        Duration::from_secs(120),
        POLL,
        |last| {
            let mut pvcs = env
                .cp
                .names(&["pvc", "-l", "app.kubernetes.io/instance=kv"]);
            pvcs.sort();
            *last = format!("{pvcs:?}");
            (pvcs == ["data-kv-0", "data-kv-1", "data-kv-2"]).then_some(())
        },
    );

    steps.done("volumes of kv-3 and kv-4 deleted");

    // Nothing acknowledged is lost.
    let mut expected = loaded.clone();
    expected.extend(report.acked.clone());
    assert!(
        report.acked.len() > 50,
        "the writer got few writes through: {report:?}"
    );
    let lost = workload::lost(&stable, &expected);
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged writes lost or changed: {:?}",
        lost.len(),
        expected.len(),
        &lost[..lost.len().min(20)]
    );
    steps.done("every acknowledged write read back");

    // The Events tell the story.
    let reasons = event_reasons(&env.cp, "default", "kv");
    let have: BTreeSet<&str> = reasons.iter().map(|(r, _)| r.as_str()).collect();
    for want in ["ScalingUp", "RampingWeight", "Draining", "RemovingNodes"] {
        assert!(have.contains(want), "no {want} event: {reasons:?}");
    }
    assert!(
        have.contains("CancellingDrain") || have.contains("Rejoining"),
        "the changed mind left no event: {reasons:?}"
    );
    eprintln!(
        "scale-up took {up_took:?}, scale-down with the changed mind {down_took:?}; \
         writer: {} acknowledged, {} failed\n--- status\n{}\n--- events\n{}",
        report.acked.len(),
        report.failed,
        log.story(t0).join("\n"),
        reasons
            .iter()
            .map(|(r, m)| format!("{r}: {m}"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Delete: with whenDeleted: Delete the volumes go too.
    let out = env
        .cp
        .kubectl(&["delete", "kvc", "kv", "--wait=true", "--timeout=120s"]);
    assert!(out.ok(), "kubectl delete kvc kv: {out}");
    wait_gone(
        &env.cp,
        "everything of kv",
        &[
            "statefulsets,services,configmaps,pods,pdb,pvc",
            "-l",
            "app.kubernetes.io/instance=kv",
        ],
    );
    steps.done("kv deleted; everything it owned collected, volumes included");
}
