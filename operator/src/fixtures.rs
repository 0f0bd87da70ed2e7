//! Test helpers: KVCluster builders, a scripted Admin service, and an API-server verifier that
//! asserts the method, path and body of each call in order (controller-rs `fixtures.rs`, grown
//! to many calls per reconcile).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use http::{Request, Response, StatusCode};
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetStatus};
use k8s_openapi::api::core::v1::{Pod, PodCondition, PodStatus, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::client::Body;
use kube::runtime::events::Recorder;
use serde_json::{Value, json};

use crate::admin::{AdminError, ClusterRef, NodeAdmin};
use crate::controller::Context;
use crate::crd::{
    CertManagerSpec, ConflictMode, FINALIZER, IssuerRef, KVCluster, KVClusterSpec,
    NodeConfigOverrides, PullPolicy, Quorum, RetentionPolicy, RetentionSpec, ScalingSpec,
    ServiceMonitorSpec, StorageSpec, TlsSpec, ZoneSpread,
};
use crate::decisions::AdminAction;
use crate::metrics::Metrics;
use crate::proto::{ChangeResponse, ClusterStatusResponse, Member, Rebalance};
use crate::resources::TEMPLATE_HASH_ANNOTATION;

impl KVCluster {
    /// A KVCluster `test` in `default`, as read from the API server (uid, generation), without
    /// TLS (the flow tests script plain calls; [`KVCluster::test_tls`] has the default TLS).
    pub fn test() -> Self {
        let mut k = KVCluster::test_tls();
        k.spec.tls = Some(TlsSpec {
            enabled: false,
            ..TlsSpec::default()
        });
        k
    }

    /// [`KVCluster::test`] with the default spec: TLS from a CA the operator generates.
    pub fn test_tls() -> Self {
        let mut k = KVCluster::new("test", KVClusterSpec::default());
        k.metadata.namespace = Some("default".into());
        k.metadata.uid = Some("00000000-0000-0000-0000-000000000001".into());
        k.metadata.generation = Some(1);
        k
    }

    /// Every field of the spec set.
    pub fn test_full() -> Self {
        let mut k = KVCluster::test();
        let mut limits = serde_json::Map::new();
        limits.insert("max_value_bytes".into(), json!(4194304));
        let mut gossip = serde_json::Map::new();
        gossip.insert("probe_period_ms".into(), json!(2000));
        k.spec = KVClusterSpec {
            replicas: 5,
            image: "registry.example/dynakv:1.2.3".into(),
            image_pull_policy: PullPolicy::Always,
            image_pull_secrets: vec![k8s_openapi::api::core::v1::LocalObjectReference {
                name: "regcred".into(),
            }],
            replication_factor: 5,
            read_quorum: Quorum::Count(2),
            write_quorum: Quorum::All,
            sloppy_quorum: false,
            vnodes_per_node: 128,
            conflict_mode: ConflictMode::Lww,
            storage: StorageSpec {
                size: "100Gi".into(),
                storage_class_name: Some("fast-ssd".into()),
                retention: RetentionSpec {
                    when_scaled: RetentionPolicy::Retain,
                    when_deleted: RetentionPolicy::Delete,
                },
            },
            resources: Some(
                serde_json::from_value(json!({
                    "requests": {"cpu": "2", "memory": "4Gi"},
                    "limits": {"memory": "4Gi"}
                }))
                .unwrap(),
            ),
            scheduling: crate::crd::SchedulingSpec {
                node_selector: BTreeMap::from([("disk".to_string(), "ssd".to_string())]),
                tolerations: vec![Toleration {
                    key: Some("dedicated".into()),
                    operator: Some("Equal".into()),
                    value: Some("dynakv".into()),
                    effect: Some("NoSchedule".into()),
                    ..Toleration::default()
                }],
                affinity: Some(
                    serde_json::from_value(json!({
                        "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [{"matchExpressions": [
                                {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}
                            ]}]
                        }}
                    }))
                    .unwrap(),
                ),
                zone_topology_key: "topology.kubernetes.io/zone".into(),
                zone_spread: ZoneSpread::DoNotSchedule,
                priority_class_name: Some("high".into()),
            },
            scaling: ScalingSpec {
                weight_steps: vec![10, 50, 100],
            },
            metrics: crate::crd::MetricsSpec {
                service_monitor: ServiceMonitorSpec {
                    enabled: true,
                    labels: BTreeMap::from([("release".to_string(), "prom".to_string())]),
                    interval: Some("15s".into()),
                },
            },
            network_policy: crate::crd::NetworkPolicySpec {
                enabled: true,
                clients: Some(vec![
                    serde_json::from_value(
                        json!({"podSelector": {"matchLabels": {"app": "shop"}}}),
                    )
                    .unwrap(),
                ]),
                metrics: Some(vec![
                    serde_json::from_value(json!({"namespaceSelector": {"matchLabels": {
                        "kubernetes.io/metadata.name": "monitoring"
                    }}}))
                    .unwrap(),
                ]),
            },
            node_config: NodeConfigOverrides {
                limits: Some(limits),
                gossip: Some(gossip),
                ..NodeConfigOverrides::default()
            },
            tls: Some(TlsSpec {
                enabled: true,
                secret_name: None,
                cert_manager: Some(CertManagerSpec {
                    issuer_ref: IssuerRef {
                        name: "dynakv-ca".into(),
                        kind: "ClusterIssuer".into(),
                        group: "cert-manager.io".into(),
                    },
                }),
            }),
            termination_grace_period_seconds: 60,
        };
        k
    }

    pub fn with_replicas(mut self, n: i32) -> Self {
        self.spec.replicas = n;
        self
    }

    pub fn finalized(mut self) -> Self {
        self.metadata.finalizers = Some(vec![FINALIZER.to_string()]);
        self
    }

    pub fn deleting(mut self) -> Self {
        let t: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        self.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t));
        self
    }
}

/// The StatefulSet as the API server would return it, with `replicas` pods all ready.
pub fn sts(kvc: &KVCluster, replicas: i32) -> StatefulSet {
    let mut s = crate::resources::build(kvc, replicas, None)
        .unwrap()
        .stateful_set;
    s.spec.replicas = Some(replicas);
    s.status = Some(StatefulSetStatus {
        replicas,
        ready_replicas: Some(replicas),
        ..StatefulSetStatus::default()
    });
    s
}

/// Ready pods `0..n` on the current template.
pub fn pods(kvc: &KVCluster, n: u32) -> Vec<Pod> {
    let hash = crate::resources::template_hash(kvc, None).unwrap();
    (0..n).map(|i| pod(kvc, i, &hash, true)).collect()
}

pub fn pod(kvc: &KVCluster, i: u32, hash: &str, ready: bool) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(format!(
                "{}-{i}",
                kvc.metadata.name.as_deref().unwrap_or("test")
            )),
            namespace: Some("default".into()),
            annotations: Some(BTreeMap::from([(
                TEMPLATE_HASH_ANNOTATION.to_string(),
                hash.to_string(),
            )])),
            ..ObjectMeta::default()
        },
        spec: None,
        status: Some(PodStatus {
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..PodCondition::default()
            }]),
            ..PodStatus::default()
        }),
    }
}

/// A membership member.
pub fn member(id: &str, weight: u32, target: u32, lifecycle: &str, state: &str) -> Member {
    Member {
        id: id.into(),
        address: format!("{id}.test-peers.default.svc:7070"),
        state: state.into(),
        weight,
        target_weight: target,
        lifecycle: lifecycle.into(),
        replica_ownership: if weight > 0 { 0.6 } else { 0.0 },
        ..Member::default()
    }
}

/// A scripted cluster behind the Admin seam: answers ClusterStatus from its members, records
/// every change, and finishes a change when the test calls [`FakeAdmin::settle`].
#[derive(Default)]
pub struct FakeAdmin {
    pub state: Mutex<FakeState>,
}

#[derive(Default)]
pub struct FakeState {
    pub members: BTreeMap<String, Member>,
    pub rebalance: Option<Rebalance>,
    /// Pods whose Admin service does not answer.
    pub unreachable: BTreeSet<String>,
    /// Every change received, as `via: action`.
    pub calls: Vec<String>,
    /// Refuse the next change with FAILED_PRECONDITION and this message.
    pub refuse_next: Option<String>,
}

impl FakeAdmin {
    pub fn with_members(members: impl IntoIterator<Item = Member>) -> Arc<Self> {
        let f = FakeAdmin::default();
        f.lock().members = members.into_iter().map(|m| (m.id.clone(), m)).collect();
        Arc::new(f)
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap()
    }

    pub fn calls(&self) -> Vec<String> {
        std::mem::take(&mut self.lock().calls)
    }

    /// Every member reaches its target; a member that went to 0 by Leave is `left`.
    pub fn settle(&self) {
        let mut s = self.lock();
        s.rebalance = None;
        for m in s.members.values_mut() {
            m.weight = m.target_weight;
            if m.lifecycle == "leaving" {
                m.lifecycle = "left".into();
            } else if m.weight > 0 {
                m.lifecycle = "normal".into();
            }
        }
    }
}

impl NodeAdmin for FakeAdmin {
    fn cluster_status<'a>(
        &'a self,
        _cluster: &'a ClusterRef,
        pod: &'a str,
    ) -> BoxFuture<'a, Result<ClusterStatusResponse, AdminError>> {
        Box::pin(async move {
            let s = self.lock();
            if s.unreachable.contains(pod) || !s.members.contains_key(pod) {
                return Err(AdminError::Unavailable {
                    pod: pod.into(),
                    status: tonic::Status::unavailable("connection refused"),
                });
            }
            Ok(ClusterStatusResponse {
                cluster_id: "test.default".into(),
                node_id: pod.into(),
                replication_factor: 3,
                members: s.members.values().cloned().collect(),
                rebalance: s.rebalance.clone(),
                ..ClusterStatusResponse::default()
            })
        })
    }

    fn change<'a>(
        &'a self,
        _cluster: &'a ClusterRef,
        pod: &'a str,
        action: &'a AdminAction,
    ) -> BoxFuture<'a, Result<ChangeResponse, AdminError>> {
        Box::pin(async move {
            let mut s = self.lock();
            if s.unreachable.contains(pod) {
                return Err(AdminError::Unavailable {
                    pod: pod.into(),
                    status: tonic::Status::unavailable("connection refused"),
                });
            }
            s.calls.push(format!("{pod}: {action}"));
            if let Some(message) = s.refuse_next.take() {
                return Err(AdminError::Refused {
                    pod: pod.into(),
                    action: action.to_string(),
                    message,
                });
            }
            match action {
                AdminAction::SetWeight { node, weight } => {
                    if let Some(m) = s.members.get_mut(node) {
                        m.target_weight = *weight;
                        if m.lifecycle == "left" || m.lifecycle == "leaving" {
                            m.lifecycle = "joining".into();
                        }
                    }
                }
                AdminAction::Leave { node } => {
                    if let Some(m) = s.members.get_mut(node) {
                        m.target_weight = 0;
                        m.lifecycle = "leaving".into();
                    }
                }
            }
            Ok(ChangeResponse {
                changed: true,
                message: String::new(),
                recorded_by: pod.into(),
            })
        })
    }
}

type ApiServerHandle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// One call the API server expects, and its answer.
pub struct Expect {
    pub method: http::Method,
    pub path: String,
    pub check: Box<dyn FnOnce(&Value) + Send>,
    pub respond: Respond,
}

pub enum Respond {
    /// 200 with this body.
    Ok(Value),
    /// 200 with the request's own body (an apply, as the API server would answer it).
    Echo,
    /// An error Status with this code.
    Error(u16),
}

fn status_body(code: u16) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("mock error {code}"),
        "reason": if code == 404 { "NotFound" } else { "InternalError" },
        "code": code
    })
}

impl Expect {
    pub fn get(path: impl Into<String>, respond: Respond) -> Self {
        Expect {
            method: http::Method::GET,
            path: path.into(),
            check: Box::new(|_| {}),
            respond,
        }
    }

    /// A server-side apply of `body` (compared whole) at `path`.
    pub fn apply(path: impl Into<String>, body: Value) -> Self {
        let path = path.into();
        let p = path.clone();
        Expect {
            method: http::Method::PATCH,
            path: format!("{path}?&force=true&fieldManager=dynakv-operator"),
            check: Box::new(move |got| {
                assert_eq!(got, &body, "apply body of {p}");
            }),
            respond: Respond::Echo,
        }
    }

    /// A server-side apply whose body `check` inspects.
    pub fn apply_with(
        path: impl Into<String>,
        check: impl FnOnce(&Value) + Send + 'static,
    ) -> Self {
        Expect {
            method: http::Method::PATCH,
            path: format!("{}?&force=true&fieldManager=dynakv-operator", path.into()),
            check: Box::new(check),
            respond: Respond::Echo,
        }
    }

    pub fn event(reason: &'static str, event_type: &'static str) -> Self {
        Expect {
            method: http::Method::POST,
            path: "/apis/events.k8s.io/v1/namespaces/default/events?".into(),
            check: Box::new(move |got| {
                assert_eq!(got["reason"], json!(reason), "event {got}");
                assert_eq!(got["type"], json!(event_type), "event {got}");
            }),
            respond: Respond::Echo,
        }
    }

    pub fn fail(mut self, code: u16) -> Self {
        self.respond = Respond::Error(code);
        self
    }
}

/// Asserts the calls of a reconcile, in order.
pub struct ApiServerVerifier(ApiServerHandle);

impl ApiServerVerifier {
    /// Serves `expected` in order; panics (in the returned task) on any difference.
    pub fn run(mut self, expected: Vec<Expect>) -> tokio::task::JoinHandle<Self> {
        tokio::spawn(async move {
            for (i, e) in expected.into_iter().enumerate() {
                let (request, send) = self
                    .0
                    .next_request()
                    .await
                    .unwrap_or_else(|| panic!("call {i} ({} {}) never came", e.method, e.path));
                assert_eq!(
                    request.method(),
                    e.method,
                    "method of call {i} ({})",
                    e.path
                );
                assert_eq!(request.uri().to_string(), e.path, "path of call {i}");
                let bytes = request.into_body().collect_bytes().await.unwrap();
                let body: Value = if bytes.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&bytes).unwrap()
                };
                (e.check)(&body);
                let (code, out) = match e.respond {
                    Respond::Ok(v) => (200, v),
                    Respond::Echo => (200, body),
                    Respond::Error(c) => (c, status_body(c)),
                };
                send.send_response(
                    Response::builder()
                        .status(StatusCode::from_u16(code).unwrap())
                        .body(Body::from(serde_json::to_vec(&out).unwrap()))
                        .unwrap(),
                );
            }
            self
        })
    }
}

/// Awaits the verifier, failing the test when a call never came.
pub async fn verified(handle: tokio::task::JoinHandle<ApiServerVerifier>) -> ApiServerVerifier {
    tokio::time::timeout(Duration::from_secs(2), handle)
        .await
        .expect("timeout: the reconcile made fewer calls than expected")
        .expect("the API-server verifier failed")
}

fn fixed_now() -> Timestamp {
    "2026-01-01T00:00:00Z"
        .parse()
        .unwrap_or(Timestamp::UNIX_EPOCH)
}

impl Context {
    /// A context whose client talks to a mock API server, with a scripted Admin service.
    pub fn test(admin: Arc<FakeAdmin>) -> (Arc<Self>, ApiServerVerifier) {
        let (mock_service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(mock_service, "default");
        let recorder = Recorder::new(client.clone(), "dynakv-operator-test".into());
        let ctx = Context::new(
            client,
            recorder,
            admin,
            Arc::new(Metrics::new().unwrap()),
            fixed_now,
        );
        (Arc::new(ctx), ApiServerVerifier(handle))
    }
}
