//! Reconcile flows against kube's mock API service: each test lists the calls one reconcile
//! must make, in order, with method, path and body, and the Admin requests it must send.

use super::*;
use crate::fixtures::{ApiServerVerifier, Expect, FakeAdmin, Respond, member, pods, sts, verified};
use k8s_openapi::api::core::v1::Pod;
use serde_json::Value;

const NS: &str = "/api/v1/namespaces/default";
const APPS: &str = "/apis/apps/v1/namespaces/default";

fn get_sts(s: Option<StatefulSet>) -> Expect {
    let path = format!("{APPS}/statefulsets/test");
    match s {
        Some(s) => Expect::get(path, Respond::Ok(serde_json::to_value(s).unwrap())),
        None => Expect::get(path, Respond::Error(404)),
    }
}

fn list_pods(items: Vec<Pod>) -> Expect {
    Expect::get(
        format!(
            "{NS}/pods?&labelSelector=app.kubernetes.io%2Finstance%3Dtest%2Capp.kubernetes.io%2Fname%3Ddynakv"
        ),
        Respond::Ok(json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items})),
    )
}

/// The server-side applies of every object, with exact bodies, StatefulSet at `replicas`.
fn applies(kvc: &KVCluster, replicas: i32) -> Vec<Expect> {
    applies_with(kvc, replicas, None)
}

/// [`applies`] for a TLS cluster whose admin token has this digest.
fn applies_with(kvc: &KVCluster, replicas: i32, digest: Option<&str>) -> Vec<Expect> {
    let d = resources::build(kvc, replicas, digest).unwrap();
    let v = |o: &dyn erased::Ser| o.value();
    let mut out = vec![
        Expect::apply(format!("{NS}/configmaps/test-config"), v(&d.config_map)),
        Expect::apply(format!("{NS}/services/test-peers"), v(&d.peers_service)),
        Expect::apply(format!("{NS}/services/test"), v(&d.client_service)),
        Expect::apply(format!("{APPS}/statefulsets/test"), v(&d.stateful_set)),
        Expect::apply(
            "/apis/policy/v1/namespaces/default/poddisruptionbudgets/test",
            v(&d.pdb),
        ),
    ];
    if let Some(np) = &d.network_policy {
        out.push(Expect::apply(
            "/apis/networking.k8s.io/v1/namespaces/default/networkpolicies/test",
            v(np),
        ));
    }
    if let Some(sm) = &d.service_monitor {
        out.push(Expect::apply(
            "/apis/monitoring.coreos.com/v1/namespaces/default/servicemonitors/test",
            v(sm),
        ));
    }
    out
}

mod erased {
    pub trait Ser {
        fn value(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> Ser for T {
        fn value(&self) -> serde_json::Value {
            serde_json::to_value(self).unwrap()
        }
    }
}

fn status(check: impl FnOnce(&Value) + Send + 'static) -> Expect {
    let mut e = Expect::apply_with(
        "/apis/dynakv.io/v1alpha1/namespaces/default/kvclusters/test/status",
        move |body| {
            assert_eq!(body["apiVersion"], json!("dynakv.io/v1alpha1"));
            assert_eq!(body["kind"], json!("KVCluster"));
            check(&body["status"]);
        },
    );
    e.respond = Respond::Ok(serde_json::to_value(KVCluster::test()).unwrap());
    e
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == json!(type_)))
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
}

/// Runs one reconcile against `expected` calls; returns its result and the verifier.
async fn reconcile_with(
    kvc: &KVCluster,
    ctx: &Arc<Context>,
    verifier: ApiServerVerifier,
    expected: Vec<Expect>,
) -> (Result<Action, Error>, ApiServerVerifier) {
    let server = verifier.run(expected);
    let result = reconcile(Arc::new(kvc.clone()), ctx.clone()).await;
    if server.is_finished() {
        return (result, verified(server).await);
    }
    match tokio::time::timeout(Duration::from_secs(2), server).await {
        Ok(v) => (result, v.expect("the API-server verifier failed")),
        Err(_) => panic!("the reconcile made fewer calls than expected; it returned {result:?}"),
    }
}

fn full_members(n: u32) -> Vec<crate::proto::Member> {
    (0..n)
        .map(|i| member(&format!("test-{i}"), 100, 100, "normal", "alive"))
        .collect()
}

#[tokio::test]
async fn a_new_kvcluster_gets_the_finalizer_first() {
    let kvc = KVCluster::test();
    let (ctx, verifier) = Context::test(FakeAdmin::with_members([]));
    let expected = vec![Expect {
        method: http::Method::PATCH,
        path: "/apis/dynakv.io/v1alpha1/namespaces/default/kvclusters/test?".into(),
        check: Box::new(|body| {
            assert_eq!(
                body,
                &json!([
                    {"op": "test", "path": "/metadata/finalizers", "value": null},
                    {"op": "add", "path": "/metadata/finalizers", "value": ["dynakv.io/cleanup"]}
                ])
            );
        }),
        respond: Respond::Ok(serde_json::to_value(KVCluster::test().finalized()).unwrap()),
    }];
    let (result, _) = reconcile_with(&kvc, &ctx, verifier, expected).await;
    result.unwrap();
}

#[tokio::test]
async fn create_applies_every_object_and_reports_creating() {
    let kvc = KVCluster::test().finalized();
    let admin = FakeAdmin::with_members([]);
    let (ctx, verifier) = Context::test(admin.clone());
    let mut expected = vec![get_sts(None), list_pods(vec![])];
    expected.extend(applies(&kvc, 3));
    expected.push(Expect::event("Creating", "Normal"));
    expected.push(status(|s| {
        assert_eq!(s["phase"], json!("Creating"));
        assert_eq!(s["replicas"], json!(0));
        assert_eq!(
            s["selector"],
            json!("app.kubernetes.io/instance=test,app.kubernetes.io/name=dynakv")
        );
        assert_eq!(s["observedGeneration"], json!(1));
        let p = condition(s, "Progressing");
        assert_eq!(p["status"], json!("True"));
        assert_eq!(p["reason"], json!("Creating"));
        assert_eq!(condition(s, "Available")["status"], json!("False"));
    }));
    let (result, _) = reconcile_with(&kvc, &ctx, verifier, expected).await;
    assert_eq!(result.unwrap(), Action::requeue(REQUEUE_BUSY));
    assert!(admin.calls().is_empty());
}

fn secret_body(name: &str, data: &[(&str, &str)]) -> Value {
    use base64::Engine;
    let data: serde_json::Map<String, Value> = data
        .iter()
        .map(|(k, v)| {
            let b = base64::engine::general_purpose::STANDARD.encode(v);
            (k.to_string(), json!(b))
        })
        .collect();
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "default"}, "data": data})
}

fn create_secret(check: impl FnOnce(&Value) + Send + 'static) -> Expect {
    Expect {
        method: http::Method::POST,
        path: format!("{NS}/secrets?"),
        check: Box::new(check),
        respond: Respond::Echo,
    }
}

#[tokio::test]
async fn a_tls_cluster_gets_its_ca_and_node_certificate_before_anything_else() {
    let kvc = KVCluster::test_tls().finalized();
    let admin = FakeAdmin::with_members([]);
    let (ctx, verifier) = Context::test(admin.clone());
    let token = "dkv_test-token";
    let digest = crate::pki::token_sha256(token);
    let mut expected = vec![
        get_sts(None),
        Expect::get(
            format!("{NS}/secrets/test-admin-token"),
            Respond::Ok(secret_body("test-admin-token", &[("token", token)])),
        ),
        Expect::get(format!("{NS}/secrets/test-ca"), Respond::Error(404)),
        create_secret(|s| {
            assert_eq!(s["metadata"]["name"], json!("test-ca"));
            assert_eq!(
                s["metadata"]["ownerReferences"][0]["kind"],
                json!("KVCluster")
            );
            let crt = s["stringData"]["ca.crt"].as_str().unwrap();
            assert!(crt.starts_with("-----BEGIN CERTIFICATE-----"), "{crt}");
            assert!(
                s["stringData"]["ca.key"]
                    .as_str()
                    .unwrap()
                    .contains("PRIVATE KEY")
            );
        }),
        Expect::get(format!("{NS}/secrets/test-tls"), Respond::Error(404)),
        create_secret(|s| {
            assert_eq!(s["metadata"]["name"], json!("test-tls"));
            assert_eq!(s["type"], json!("kubernetes.io/tls"));
            // Issued 2026-01-01 for a year.
            assert_eq!(
                s["metadata"]["annotations"]["dynakv.io/not-after"],
                json!("1798761600")
            );
            for k in ["tls.crt", "tls.key", "ca.crt"] {
                assert!(s["stringData"][k].is_string(), "{k} in {s}");
            }
            assert!(
                s["stringData"].get("ca.key").is_none(),
                "the CA key stays in test-ca"
            );
        }),
        Expect::event("CertificateIssued", "Normal"),
        Expect::get(
            format!("{NS}/secrets/test-tls"),
            Respond::Ok(secret_body(
                "test-tls",
                &[("tls.crt", "c"), ("tls.key", "k"), ("ca.crt", "ca")],
            )),
        ),
        list_pods(vec![]),
    ];
    // Unset `tls` on a new cluster: on.
    let mut effective = kvc.clone();
    effective.spec.tls = Some(crate::crd::TlsSpec::default());
    expected.extend(applies_with(&effective, 3, Some(&digest)));
    expected.push(Expect::event("Creating", "Normal"));
    expected.push(status(|s| assert_eq!(s["phase"], json!("Creating"))));
    let (result, _) = reconcile_with(&kvc, &ctx, verifier, expected).await;
    assert_eq!(result.unwrap(), Action::requeue(REQUEUE_BUSY));
}

#[tokio::test]
async fn a_missing_user_secret_holds_the_cluster_with_a_reason_and_a_warning() {
    let mut kvc = KVCluster::test_tls().finalized();
    kvc.spec.tls = Some(crate::crd::TlsSpec {
        secret_name: Some("mine".into()),
        ..Default::default()
    });
    let admin = FakeAdmin::with_members([]);
    let (ctx, verifier) = Context::test(admin.clone());
    let expected = vec![
        get_sts(None),
        Expect::get(
            format!("{NS}/secrets/test-admin-token"),
            Respond::Ok(secret_body("test-admin-token", &[("token", "dkv_x")])),
        ),
        Expect::get(format!("{NS}/secrets/mine"), Respond::Error(404)),
        list_pods(vec![]),
        Expect::event("WaitingForCertificate", "Warning"),
        status(|s| {
            let p = condition(s, "Progressing");
            assert_eq!(p["reason"], json!("WaitingForCertificate"));
            let m = p["message"].as_str().unwrap();
            assert!(
                m.contains("Secret mine (named by tls.secretName) does not exist"),
                "{m}"
            );
        }),
    ];
    let (result, _) = reconcile_with(&kvc, &ctx, verifier, expected).await;
    assert_eq!(result.unwrap(), Action::requeue(REQUEUE_BUSY));
    assert!(admin.calls().is_empty(), "no Admin call without the CA");
}

#[tokio::test]
async fn a_namesake_secret_the_cluster_does_not_own_is_never_written() {
    // `test-tls` belongs to something else (an Ingress, say): no owner reference to the cluster.
    let kvc = KVCluster::test_tls().finalized();
    let admin = FakeAdmin::with_members([]);
    let (ctx, verifier) = Context::test(admin.clone());
    let expected = vec![
        get_sts(None),
        Expect::get(
            format!("{NS}/secrets/test-admin-token"),
            Respond::Ok(secret_body("test-admin-token", &[("token", "dkv_x")])),
        ),
        Expect::get(
            format!("{NS}/secrets/test-ca"),
            Respond::Ok(secret_body("test-ca", &[("ca.crt", "c"), ("ca.key", "k")])),
        ),
        Expect::get(
            format!("{NS}/secrets/test-tls"),
            Respond::Ok(secret_body(
                "test-tls",
                &[("tls.crt", "c"), ("tls.key", "k"), ("ca.crt", "other")],
            )),
        ),
        // No PATCH of test-tls: on to the pods, the warning and the status.
        list_pods(vec![]),
        Expect::event("WaitingForCertificate", "Warning"),
        status(|s| {
            let m = condition(s, "Progressing")["message"]
                .as_str()
                .unwrap()
                .to_string();
            assert!(
                m.contains("Secret test-tls exists and is not this cluster's"),
                "{m}"
            );
        }),
    ];
    let (result, _) = reconcile_with(&kvc, &ctx, verifier, expected).await;
    assert_eq!(result.unwrap(), Action::requeue(REQUEUE_BUSY));
}

#[tokio::test]
async fn a_running_plain_cluster_with_tls_unset_stays_plain_and_cannot_be_switched() {
    // Made by an operator before `tls` existed: its nodes run in plain text.
    let mut kvc = KVCluster::test_tls().finalized();
    kvc.spec.tls = None;
    let mut plain = kvc.clone();
    plain.spec.tls = Some(crate::crd::TlsSpec {
        enabled: false,
        ..Default::default()
    });
    let running = sts(&plain, 3);
    assert!(!resources::serves_tls(&running));
    assert_eq!(resources::effective_tls(&kvc, Some(false)), Ok(false));
    assert_eq!(resources::effective_tls(&kvc, None), Ok(true));
    assert_eq!(resources::effective_tls(&plain, Some(false)), Ok(false));

    let admin = FakeAdmin::with_members(full_members(3));
    let (ctx, verifier) = Context::test(admin.clone());
    // No Secret is read: the cluster stays in plain text, as it runs.
    let mut expected = vec![get_sts(Some(running.clone())), list_pods(pods(&plain, 3))];
    expected.extend(applies(&plain, 3));
    expected.push(status(|s| assert_eq!(s["phase"], json!("Running"), "{s}")));
    let (result, _) = reconcile_with(&kvc, &ctx, verifier, expected).await;
    result.unwrap();

    // Asking for TLS on the running plain nodes is refused, and nothing is applied.
    let mut switched = kvc.clone();
    switched.spec.tls = Some(crate::crd::TlsSpec::default());
    let (ctx, verifier) = Context::test(admin.clone());
    let expected = vec![
        get_sts(Some(running)),
        list_pods(pods(&plain, 3)),
        Expect::event("InvalidSpec", "Warning"),
        status(|s| {
            let d = condition(s, "Degraded");
            let m = d["message"].as_str().unwrap();
            assert!(
                m.contains("TLS cannot be switched on a running cluster"),
                "{m}"
            );
        }),
    ];
    let (result, _) = reconcile_with(&switched, &ctx, verifier, expected).await;
    result.unwrap();
}

#[tokio::test]
async fn create_then_bootstrap_gives_every_node_full_weight() {
    let kvc = KVCluster::test().finalized();
    let admin = FakeAdmin::with_members(
        (0..3).map(|i| member(&format!("test-{i}"), 0, 0, "joining", "alive")),
    );
    let (ctx, verifier) = Context::test(admin.clone());
    let mut expected = vec![get_sts(Some(sts(&kvc, 3))), list_pods(pods(&kvc, 3))];
    expected.extend(applies(&kvc, 3));
    expected.push(Expect::event("Bootstrapping", "Normal"));
    expected.push(status(|s| {
        assert_eq!(s["phase"], json!("Creating"));
        assert_eq!(s["nodes"].as_array().map(Vec::len), Some(3));
    }));
    let (result, verifier) = reconcile_with(&kvc, &ctx, verifier, expected).await;
    result.unwrap();
    assert_eq!(
        admin.calls(),
        vec![
            "test-0: SetWeight(test-0, 100)",
            "test-1: SetWeight(test-1, 100)",
            "test-2: SetWeight(test-2, 100)"
        ]
    );

    // Once the ring settles, the cluster is Running and the reconcile goes idle.
    admin.settle();
    let mut expected = vec![get_sts(Some(sts(&kvc, 3))), list_pods(pods(&kvc, 3))];
    expected.extend(applies(&kvc, 3));
    expected.push(status(|s| {
        assert_eq!(s["phase"], json!("Running"));
        assert_eq!(condition(s, "Available")["status"], json!("True"));
        assert_eq!(condition(s, "Progressing")["reason"], json!("Settled"));
    }));
    let (result, _) = reconcile_with(&kvc, &ctx, verifier, expected).await;
    assert_eq!(result.unwrap(), Action::requeue(REQUEUE_IDLE));
    assert!(admin.calls().is_empty());
}

#[tokio::test]
async fn scale_up_raises_the_statefulset_then_ramps_each_new_node_in_steps() {
    let kvc = KVCluster::test().finalized().with_replicas(5);
    let admin = FakeAdmin::with_members(full_members(3));
    let (ctx, mut verifier) = Context::test(admin.clone());

    // 1. The StatefulSet goes to 5; no weight change before the new nodes joined.
    let mut expected = vec![get_sts(Some(sts(&kvc, 3))), list_pods(pods(&kvc, 3))];
    expected.extend(applies(&kvc, 5));
    expected.push(Expect::event("ScalingUp", "Normal"));
    expected.push(status(|s| assert_eq!(s["phase"], json!("ScalingUp"))));
    let (result, v) = reconcile_with(&kvc, &ctx, verifier, expected).await;
    result.unwrap();
    verifier = v;
    assert!(admin.calls().is_empty());

    // 2. The new pods joined at weight 0: test-3 goes 0 -> 25 -> 50 -> 100, then test-4.
    {
        let mut s = admin.lock();
        for i in [3, 4] {
            let m = member(&format!("test-{i}"), 0, 0, "joining", "alive");
            s.members.insert(m.id.clone(), m);
        }
    }
    // Each request goes to the member concerned; when its Admin service does not answer,
    // through the node that answered the status (test-4's case here).
    admin.lock().unreachable.insert("test-4".into());
    let steps = [
        "test-3: SetWeight(test-3, 25)",
        "test-3: SetWeight(test-3, 50)",
        "test-3: SetWeight(test-3, 100)",
        "test-0: SetWeight(test-4, 25)",
    ];
    for (k, step) in steps.iter().enumerate() {
        let mut expected = vec![get_sts(Some(sts(&kvc, 5))), list_pods(pods(&kvc, 5))];
        expected.extend(applies(&kvc, 5));
        expected.push(Expect::event("RampingWeight", "Normal"));
        expected.push(status(|s| assert_eq!(s["phase"], json!("ScalingUp"))));
        let (result, v) = reconcile_with(&kvc, &ctx, verifier, expected).await;
        assert_eq!(result.unwrap(), Action::requeue(REQUEUE_BUSY));
        verifier = v;
        assert_eq!(admin.calls(), vec![step.to_string()], "step {k}");

        // While the change runs, the operator waits and shows the progress.
        if k == 0 {
            admin.lock().rebalance = Some(crate::proto::Rebalance {
                active: true,
                node: "test-3".into(),
                from_weight: 0,
                to_weight: 25,
                kind: "join".into(),
                phase: "streaming".into(),
                keys_done: 30,
                keys_total: 100,
                ..Default::default()
            });
            let mut expected = vec![get_sts(Some(sts(&kvc, 5))), list_pods(pods(&kvc, 5))];
            expected.extend(applies(&kvc, 5));
            expected.push(status(|s| {
                assert_eq!(s["rebalancing"]["progress"], json!("30%"));
                assert_eq!(condition(s, "Rebalancing")["status"], json!("True"));
                assert_eq!(
                    condition(s, "Progressing")["reason"],
                    json!("WaitingForRebalance")
                );
            }));
            let (result, v) = reconcile_with(&kvc, &ctx, verifier, expected).await;
            result.unwrap();
            verifier = v;
            assert!(admin.calls().is_empty(), "no new step while one runs");
            let text = ctx.metrics.render();
            assert!(
                text.contains(
                    "dynakv_operator_rebalance_progress_ratio{kvcluster=\"test\",namespace=\"default\"} 0.3"
                ),
                "{text}"
            );
        }
        admin.settle();
    }
}

#[tokio::test]
async fn scale_down_drains_before_lowering_the_statefulset() {
    let kvc = KVCluster::test().finalized().with_replicas(3);
    let admin = FakeAdmin::with_members(full_members(4));
    let (ctx, verifier) = Context::test(admin.clone());

    // 1. test-3 drains; the StatefulSet keeps 4 pods.
    let mut expected = vec![get_sts(Some(sts(&kvc, 4))), list_pods(pods(&kvc, 4))];
    expected.extend(applies(&kvc, 4));
    expected.push(Expect::event("Draining", "Normal"));
    expected.push(status(|s| assert_eq!(s["phase"], json!("ScalingDown"))));
    let (result, verifier) = reconcile_with(&kvc, &ctx, verifier, expected).await;
    result.unwrap();
    assert_eq!(admin.calls(), vec!["test-3: Leave(test-3)"]);

    // 2. Still handing over: nothing else happens.
    let mut expected = vec![get_sts(Some(sts(&kvc, 4))), list_pods(pods(&kvc, 4))];
    expected.extend(applies(&kvc, 4));
    expected.push(status(|s| {
        assert_eq!(
            condition(s, "Progressing")["reason"],
            json!("WaitingForDrain")
        );
    }));
    let (result, verifier) = reconcile_with(&kvc, &ctx, verifier, expected).await;
    result.unwrap();
    assert!(admin.calls().is_empty());

    // 3. Left: the StatefulSet goes to 3.
    admin.settle();
    let mut expected = vec![get_sts(Some(sts(&kvc, 4))), list_pods(pods(&kvc, 4))];
    expected.extend(applies(&kvc, 3));
    expected.push(Expect::event("RemovingNodes", "Normal"));
    expected.push(status(|_| {}));
    let (result, verifier) = reconcile_with(&kvc, &ctx, verifier, expected).await;
    result.unwrap();

    // 4. Its pod gone and the member down: settled; the left member stays a member that owns
    //    nothing (the cluster refuses to remove a left member), and no longer counts as down.
    if let Some(m) = admin.lock().members.get_mut("test-3") {
        m.state = "down".into();
    }
    let mut expected = vec![get_sts(Some(sts(&kvc, 3))), list_pods(pods(&kvc, 3))];
    expected.extend(applies(&kvc, 3));
    expected.push(status(|s| {
        assert_eq!(s["phase"], json!("Running"));
        assert_eq!(condition(s, "Available")["status"], json!("True"));
        assert_eq!(condition(s, "Degraded")["status"], json!("False"));
    }));
    let (result, _) = reconcile_with(&kvc, &ctx, verifier, expected).await;
    assert_eq!(result.unwrap(), Action::requeue(REQUEUE_IDLE));
    assert!(admin.calls().is_empty());
}

#[tokio::test]
async fn replicas_below_n_are_refused_with_a_warning_event_and_a_condition() {
    let kvc = KVCluster::test().finalized().with_replicas(2);
    let admin = FakeAdmin::with_members(full_members(3));
    let (ctx, verifier) = Context::test(admin.clone());
    let mut expected = vec![get_sts(Some(sts(&kvc, 3))), list_pods(pods(&kvc, 3))];
    expected.extend(applies(&kvc, 3));
    expected.push(Expect::event("BelowReplicationFactor", "Warning"));
    expected.push(status(|s| {
        assert_eq!(s["phase"], json!("Degraded"));
        let d = condition(s, "Degraded");
        assert_eq!(d["status"], json!("True"));
        assert_eq!(d["reason"], json!("BelowReplicationFactor"));
        assert!(
            d["message"]
                .as_str()
                .unwrap()
                .contains("set replicas to 3 or more")
        );
    }));
    let (result, _) = reconcile_with(&kvc, &ctx, verifier, expected).await;
    result.unwrap();
    assert!(admin.calls().is_empty());

    // Already reported: the next reconcile does not repeat the event.
    let mut reported = kvc.clone();
    reported.status = Some(crate::crd::KVClusterStatus {
        conditions: vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
            type_: "Degraded".into(),
            status: "True".into(),
            reason: "BelowReplicationFactor".into(),
            message: String::new(),
            observed_generation: Some(1),
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                Timestamp::UNIX_EPOCH,
            ),
        }],
        ..Default::default()
    });
    let (ctx, verifier) = Context::test(admin.clone());
    let mut expected = vec![get_sts(Some(sts(&kvc, 3))), list_pods(pods(&kvc, 3))];
    expected.extend(applies(&kvc, 3));
    expected.push(status(|s| {
        assert_eq!(
            condition(s, "Degraded")["lastTransitionTime"],
            json!("1970-01-01T00:00:00Z")
        );
    }));
    let (result, _) = reconcile_with(&reported, &ctx, verifier, expected).await;
    result.unwrap();
}

#[tokio::test]
async fn deletion_deletes_volumes_when_asked_then_releases_the_finalizer() {
    let mut kvc = KVCluster::test().finalized().deleting();
    kvc.spec.storage.retention.when_deleted = RetentionPolicy::Delete;
    let (ctx, verifier) = Context::test(FakeAdmin::with_members([]));
    let released = {
        let mut k = kvc.clone();
        k.metadata.finalizers = None;
        serde_json::to_value(k).unwrap()
    };
    let expected = vec![
        Expect {
            method: http::Method::DELETE,
            path: format!(
                "{NS}/persistentvolumeclaims?&labelSelector=app.kubernetes.io%2Finstance%3Dtest%2Capp.kubernetes.io%2Fname%3Ddynakv"
            ),
            check: Box::new(|_| {}),
            respond: Respond::Ok(json!({
                "apiVersion": "v1", "kind": "PersistentVolumeClaimList", "metadata": {}, "items": []
            })),
        },
        Expect::event("Deleting", "Normal"),
        Expect {
            method: http::Method::PATCH,
            path: "/apis/dynakv.io/v1alpha1/namespaces/default/kvclusters/test?".into(),
            check: Box::new(|body| {
                assert_eq!(
                    body,
                    &json!([
                        {"op": "test", "path": "/metadata/finalizers/0", "value": "dynakv.io/cleanup"},
                        {"op": "remove", "path": "/metadata/finalizers/0"}
                    ])
                );
            }),
            respond: Respond::Ok(released),
        },
    ];
    let (result, _) = reconcile_with(&kvc, &ctx, verifier, expected).await;
    result.unwrap();
}

#[tokio::test]
async fn deletion_keeps_volumes_by_default() {
    let kvc = KVCluster::test().finalized().deleting();
    let (ctx, verifier) = Context::test(FakeAdmin::with_members([]));
    let expected = vec![
        Expect::event("Deleting", "Normal"),
        Expect {
            method: http::Method::PATCH,
            path: "/apis/dynakv.io/v1alpha1/namespaces/default/kvclusters/test?".into(),
            check: Box::new(|_| {}),
            respond: Respond::Ok(serde_json::to_value(KVCluster::test()).unwrap()),
        },
    ];
    let (result, _) = reconcile_with(&kvc, &ctx, verifier, expected).await;
    result.unwrap();
}

#[tokio::test]
async fn an_api_error_mid_reconcile_is_retried_with_backoff_and_converges() {
    let kvc = KVCluster::test().finalized().with_replicas(5);
    let admin = FakeAdmin::with_members(full_members(3));
    let (ctx, verifier) = Context::test(admin.clone());

    // The StatefulSet apply fails: the reconcile stops there (no status, no event).
    let mut expected = vec![get_sts(Some(sts(&kvc, 3))), list_pods(pods(&kvc, 3))];
    let mut a = applies(&kvc, 5);
    a.truncate(4);
    let failing = a.pop().unwrap().fail(500);
    expected.extend(a);
    expected.push(failing);
    let (result, verifier) = reconcile_with(&kvc, &ctx, verifier, expected).await;
    let err = result.unwrap_err();
    assert_eq!(err.metric_label(), "kube");
    assert!(err.to_string().contains("apply StatefulSet"), "{err}");
    let kvc_arc = Arc::new(kvc.clone());
    assert_eq!(
        error_policy(kvc_arc.clone(), &err, ctx.clone()),
        Action::requeue(Duration::from_secs(5))
    );
    assert_eq!(
        error_policy(kvc_arc, &err, ctx.clone()),
        Action::requeue(Duration::from_secs(10)),
        "backs off"
    );

    // The retry does the whole step.
    let mut expected = vec![get_sts(Some(sts(&kvc, 3))), list_pods(pods(&kvc, 3))];
    expected.extend(applies(&kvc, 5));
    expected.push(Expect::event("ScalingUp", "Normal"));
    expected.push(status(|s| assert_eq!(s["phase"], json!("ScalingUp"))));
    let (result, _) = reconcile_with(&kvc, &ctx, verifier, expected).await;
    result.unwrap();
    let text = ctx.metrics.render();
    assert!(
        text.contains("dynakv_operator_reconcile_errors_total{error=\"kube\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("dynakv_operator_reconciles_total{outcome=\"ok\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn an_unreachable_admin_service_fails_the_reconcile_and_a_refusal_degrades_it() {
    let kvc = KVCluster::test().finalized().with_replicas(3);
    let admin = FakeAdmin::with_members(full_members(4));
    admin.lock().refuse_next = Some("fewer than 3 members of weight > 0 would remain".into());
    let (ctx, verifier) = Context::test(admin.clone());
    let mut expected = vec![get_sts(Some(sts(&kvc, 4))), list_pods(pods(&kvc, 4))];
    expected.extend(applies(&kvc, 4));
    expected.push(Expect::event("Draining", "Normal"));
    expected.push(Expect::event("ChangeRefused", "Warning"));
    expected.push(status(|s| {
        let d = condition(s, "Degraded");
        assert_eq!(d["reason"], json!("ChangeRefused"));
        assert!(d["message"].as_str().unwrap().contains("would remain"));
    }));
    let (result, _) = reconcile_with(&kvc, &ctx, verifier, expected).await;
    assert_eq!(result.unwrap(), Action::requeue(REQUEUE_BUSY));
}

#[test]
fn backoff_doubles_up_to_five_minutes() {
    let delays: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
    assert_eq!(delays, vec![5, 10, 20, 40, 80, 160, 300, 300, 300]);
}
