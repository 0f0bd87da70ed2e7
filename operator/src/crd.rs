//! The `KVCluster` custom resource (`dynakv.io/v1alpha1`): spec, status and conditions.
//!
//! The schema is generated from these types (kube derive + schemars) and carries the validation
//! the API server can do on its own: defaults, enums, ranges and CEL rules (`replicas >=
//! replicationFactor`, quorums within `replicationFactor`, the ring settings immutable). The
//! operator checks the same rules again ([`KVClusterSpec::problems`]) because a CRD may have been
//! installed without them, and says what is wrong in a condition instead of acting.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, LocalObjectReference, ResourceRequirements, Toleration,
};
use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// Finalizer that removes retained volumes when `storage.retention.whenDeleted` is `Delete`
/// (owner references cannot: volumes of nodes scaled away earlier have no owner left).
pub const FINALIZER: &str = "dynakv.io/cleanup";

/// Weight of a node that carries its full share of the ring.
pub const FULL_WEIGHT: u32 = 100;

/// A DynaKV cluster: a StatefulSet of nodes, their configuration, Services and disruption budget,
/// with membership changes (joins, drains) driven through the nodes' Admin API.
// clippy reads the repeated `type_ = ...` of the printcolumns as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "dynakv.io",
    version = "v1alpha1",
    kind = "KVCluster",
    plural = "kvclusters",
    shortname = "kvc",
    category = "dynakv",
    namespaced,
    status = "KVClusterStatus",
    derive = "PartialEq",
    doc = "A DynaKV cluster managed by dynakv-operator.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Rebalancing",
        type_ = "string",
        json_path = ".status.rebalancing.progress",
        description = "Progress of the ring change under way"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(
    validation = Rule::new("self.replicas >= self.replicationFactor")
        .message("replicas must be at least replicationFactor: a key needs that many nodes")
        .field_path(".replicas"),
    validation = Rule::new("type(self.readQuorum) != int || int(self.readQuorum) <= self.replicationFactor")
        .message("readQuorum cannot exceed replicationFactor")
        .field_path(".readQuorum"),
    validation = Rule::new("type(self.writeQuorum) != int || int(self.writeQuorum) <= self.replicationFactor")
        .message("writeQuorum cannot exceed replicationFactor")
        .field_path(".writeQuorum"),
)]
#[serde(rename_all = "camelCase")]
pub struct KVClusterSpec {
    /// Number of nodes (pods). At least `replicationFactor`. `kubectl scale` and a
    /// HorizontalPodAutoscaler change it through the scale subresource.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub replicas: i32,
    /// Container image of the nodes (runs `dynakv serve`).
    #[serde(default = "default_image")]
    pub image: String,
    /// Image pull policy of the node containers.
    #[serde(default)]
    pub image_pull_policy: PullPolicy,
    /// Secrets for pulling the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// N: the number of replicas of every key. Immutable.
    #[serde(default = "default_replication_factor")]
    #[schemars(range(min = 1, max = 16))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("replicationFactor is immutable"))]
    pub replication_factor: i32,
    /// Default R of requests that name none: `one`, `quorum` (N/2+1), `all`, or a number <= N.
    #[serde(default)]
    pub read_quorum: Quorum,
    /// Default W of requests that name none, likewise.
    #[serde(default)]
    pub write_quorum: Quorum,
    /// Whether requests that do not say may count fallback nodes toward R/W (sloppy quorum).
    #[serde(default = "default_true")]
    pub sloppy_quorum: bool,
    /// Virtual nodes of a node of weight 100. Immutable (every node must agree on it).
    #[serde(default = "default_vnodes")]
    #[schemars(range(min = 1, max = 4096))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("vnodesPerNode is immutable"))]
    pub vnodes_per_node: i32,
    /// How concurrent writes are resolved: `siblings` (keep both, Dynamo) or `lww`. Immutable.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("conflictMode is immutable"))]
    pub conflict_mode: ConflictMode,
    /// Persistent volumes, one per node.
    #[serde(default)]
    pub storage: StorageSpec,
    /// CPU and memory of each node container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Where the nodes run.
    #[serde(default)]
    pub scheduling: SchedulingSpec,
    /// How membership changes proceed.
    #[serde(default)]
    pub scaling: ScalingSpec,
    /// Prometheus integration.
    #[serde(default)]
    pub metrics: MetricsSpec,
    /// The NetworkPolicy that lets only client, peer and metrics traffic reach the nodes.
    #[serde(default)]
    pub network_policy: NetworkPolicySpec,
    /// Sections merged into each node's `dynakv.yaml` (keys as in docs/configuration.md).
    #[serde(default, skip_serializing_if = "NodeConfigOverrides::is_empty")]
    pub node_config: NodeConfigOverrides,
    /// TLS on every gRPC port and authenticated clients. Unset: on for a new cluster; a cluster
    /// whose nodes already run keeps how they serve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
    /// Seconds a node gets to stop cleanly after SIGTERM.
    #[serde(default = "default_grace")]
    #[schemars(range(min = 1, max = 3600))]
    pub termination_grace_period_seconds: i64,
}

fn default_replicas() -> i32 {
    3
}
fn default_image() -> String {
    "dynakv/dynakv:0.1.0".into()
}
fn default_replication_factor() -> i32 {
    3
}
fn default_vnodes() -> i32 {
    64
}
fn default_true() -> bool {
    true
}
fn default_grace() -> i64 {
    30
}

impl Default for KVClusterSpec {
    fn default() -> Self {
        KVClusterSpec {
            replicas: default_replicas(),
            image: default_image(),
            image_pull_policy: PullPolicy::default(),
            image_pull_secrets: Vec::new(),
            replication_factor: default_replication_factor(),
            read_quorum: Quorum::default(),
            write_quorum: Quorum::default(),
            sloppy_quorum: true,
            vnodes_per_node: default_vnodes(),
            conflict_mode: ConflictMode::default(),
            storage: StorageSpec::default(),
            resources: None,
            scheduling: SchedulingSpec::default(),
            scaling: ScalingSpec::default(),
            metrics: MetricsSpec::default(),
            network_policy: NetworkPolicySpec::default(),
            node_config: NodeConfigOverrides::default(),
            tls: None,
            termination_grace_period_seconds: default_grace(),
        }
    }
}

impl KVClusterSpec {
    /// What makes this spec impossible to act on, for people; empty when it is fine. The API
    /// server refuses these already when the CRD carries its CEL rules; this covers a CRD
    /// installed without them.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let n = self.replication_factor;
        if !(1..=16).contains(&n) {
            out.push(format!("replicationFactor {n} is outside 1..=16"));
        }
        for (name, q) in [
            ("readQuorum", self.read_quorum),
            ("writeQuorum", self.write_quorum),
        ] {
            let needed = q.resolve(n.max(0) as u32);
            if needed == 0 || needed as i64 > n as i64 {
                out.push(format!(
                    "{name} {q} needs {needed} replicas but replicationFactor is {n}"
                ));
            }
        }
        if !(1..=4096).contains(&self.vnodes_per_node) {
            out.push(format!(
                "vnodesPerNode {} is outside 1..=4096",
                self.vnodes_per_node
            ));
        }
        let tls = self.tls_spec();
        if tls.secret_name.is_some() && tls.cert_manager.is_some() {
            out.push("tls.secretName and tls.certManager are exclusive: name one source".into());
        }
        if !tls.enabled && self.node_config.auth.is_some() {
            out.push(
                "nodeConfig.auth needs tls.enabled: tokens are never sent in plain text".into(),
            );
        }
        if tls.secret_name.as_deref() == Some("") {
            out.push("tls.secretName is empty".into());
        }
        if tls
            .cert_manager
            .as_ref()
            .is_some_and(|c| c.issuer_ref.name.is_empty())
        {
            out.push("tls.certManager.issuerRef.name is empty".into());
        }
        if self.image.is_empty() {
            out.push("image is empty".into());
        }
        out
    }

    /// `tls` with its defaults (TLS on) when unset.
    pub fn tls_spec(&self) -> TlsSpec {
        self.tls.clone().unwrap_or_default()
    }

    /// The replication factor as a count (the schema keeps it in 1..=16).
    pub fn n(&self) -> u32 {
        self.replication_factor.clamp(1, 16) as u32
    }
}

/// When the kubelet pulls the node image.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum PullPolicy {
    Always,
    #[default]
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// How a key's concurrent writes are resolved.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ConflictMode {
    /// Keep concurrent values as siblings for the client to merge (Dynamo).
    #[default]
    Siblings,
    /// Keep the value with the highest hybrid timestamp.
    Lww,
}

impl ConflictMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ConflictMode::Siblings => "siblings",
            ConflictMode::Lww => "lww",
        }
    }
}

/// A quorum: a level (`one`, `quorum`, `all`) or a number of replicas. In YAML either a string
/// or an integer, as the node's own config takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Quorum {
    One,
    #[default]
    Quorum,
    All,
    Count(u32),
}

impl Quorum {
    /// Replies needed with replication factor `n`.
    pub fn resolve(self, n: u32) -> u32 {
        match self {
            Quorum::One => 1,
            Quorum::Quorum => n / 2 + 1,
            Quorum::All => n,
            Quorum::Count(c) => c,
        }
    }

    /// The value as the node's YAML config takes it.
    pub fn to_node_value(self) -> serde_json::Value {
        match self {
            Quorum::Count(c) => serde_json::Value::from(c),
            other => serde_json::Value::from(other.to_string()),
        }
    }
}

impl std::fmt::Display for Quorum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Quorum::One => f.write_str("one"),
            Quorum::Quorum => f.write_str("quorum"),
            Quorum::All => f.write_str("all"),
            Quorum::Count(c) => write!(f, "{c}"),
        }
    }
}

impl Serialize for Quorum {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Quorum::Count(c) => s.serialize_u32(*c),
            other => s.serialize_str(&other.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for Quorum {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u32),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) => Ok(Quorum::Count(n)),
            Raw::Text(t) => match t.to_ascii_lowercase().as_str() {
                "one" => Ok(Quorum::One),
                "quorum" => Ok(Quorum::Quorum),
                "all" => Ok(Quorum::All),
                other => other.parse().map(Quorum::Count).map_err(|_| {
                    serde::de::Error::custom(format!(
                        "{t:?} is not a quorum: use one, quorum, all or a number of replicas"
                    ))
                }),
            },
        }
    }
}

impl JsonSchema for Quorum {
    fn schema_name() -> Cow<'static, str> {
        "Quorum".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "`one`, `quorum` (N/2+1), `all`, or a number of replicas.",
            "x-kubernetes-int-or-string": true,
            "nullable": false,
            "default": "quorum",
            "x-kubernetes-validations": [{
                "rule": "type(self) == int ? int(self) >= 1 : string(self) in ['one', 'quorum', 'all']",
                "message": "a quorum is one, quorum, all or a number of replicas >= 1"
            }]
        })
    }
}

/// Persistent volumes of the nodes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Size of each node's volume.
    #[serde(default = "default_size")]
    pub size: String,
    /// StorageClass of the volumes (unset: the cluster's default class).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// What happens to a node's volume when the node is scaled away or the cluster deleted.
    #[serde(default)]
    pub retention: RetentionSpec,
}

fn default_size() -> String {
    "10Gi".into()
}

impl Default for StorageSpec {
    fn default() -> Self {
        StorageSpec {
            size: default_size(),
            storage_class_name: None,
            retention: RetentionSpec::default(),
        }
    }
}

/// PersistentVolumeClaim retention, as the StatefulSet's `persistentVolumeClaimRetentionPolicy`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetentionSpec {
    /// After a scale-down: the node handed all its data over before it stopped, so its volume
    /// holds nothing the cluster needs. Default `Delete`.
    #[serde(default = "delete")]
    pub when_scaled: RetentionPolicy,
    /// After the KVCluster is deleted. Default `Retain`: recreating the cluster with the same
    /// name finds its data again.
    #[serde(default = "retain")]
    pub when_deleted: RetentionPolicy,
}

fn delete() -> RetentionPolicy {
    RetentionPolicy::Delete
}
fn retain() -> RetentionPolicy {
    RetentionPolicy::Retain
}

impl Default for RetentionSpec {
    fn default() -> Self {
        RetentionSpec {
            when_scaled: RetentionPolicy::Delete,
            when_deleted: RetentionPolicy::Retain,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RetentionPolicy {
    Retain,
    Delete,
}

impl RetentionPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RetentionPolicy::Retain => "Retain",
            RetentionPolicy::Delete => "Delete",
        }
    }
}

/// Placement of the nodes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SchedulingSpec {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Node label that names a failure zone. Pods are spread across its values, and each node
    /// is told its zone from the pod's copy of that label, so that the replicas of a key
    /// prefer distinct zones. Empty: no zone spreading, nodes get no zone.
    #[serde(default = "default_zone_key")]
    pub zone_topology_key: String,
    /// Whether a pod may be placed in a zone that already has more pods than another.
    #[serde(default)]
    pub zone_spread: ZoneSpread,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
}

fn default_zone_key() -> String {
    "topology.kubernetes.io/zone".into()
}

impl Default for SchedulingSpec {
    fn default() -> Self {
        SchedulingSpec {
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            affinity: None,
            zone_topology_key: default_zone_key(),
            zone_spread: ZoneSpread::default(),
            priority_class_name: None,
        }
    }
}

/// `whenUnsatisfiable` of the zone spread constraint.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ZoneSpread {
    /// Prefer an even spread, but schedule anyway.
    #[default]
    ScheduleAnyway,
    /// Never place a pod where it would unbalance the zones by more than one.
    DoNotSchedule,
}

impl ZoneSpread {
    pub fn as_str(self) -> &'static str {
        match self {
            ZoneSpread::ScheduleAnyway => "ScheduleAnyway",
            ZoneSpread::DoNotSchedule => "DoNotSchedule",
        }
    }
}

/// How nodes enter the ring.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScalingSpec {
    /// Weights a new node is raised through when it joins a cluster that holds data, each step
    /// waiting until its handoff is done. Ascending, each in 1..=100; 100 is always the last
    /// step. A new cluster's first nodes go straight to 100.
    #[serde(default = "default_steps")]
    #[x_kube(validation = Rule::new("self.all(w, w >= 1 && w <= 100)").message("weight steps are in 1..=100"))]
    #[x_kube(validation = Rule::new("self.isSorted()").message("weight steps must be ascending"))]
    #[schemars(length(max = 10), extend("x-kubernetes-list-type" = "set"))]
    pub weight_steps: Vec<i32>,
}

fn default_steps() -> Vec<i32> {
    vec![25, 50, 100]
}

impl Default for ScalingSpec {
    fn default() -> Self {
        ScalingSpec {
            weight_steps: default_steps(),
        }
    }
}

impl ScalingSpec {
    /// The steps actually used: ascending, within 1..=100, ending at 100.
    pub fn steps(&self) -> Vec<u32> {
        let mut out: Vec<u32> = self
            .weight_steps
            .iter()
            .filter(|w| (1..=100).contains(*w))
            .map(|w| *w as u32)
            .collect();
        out.sort_unstable();
        out.dedup();
        if out.last() != Some(&FULL_WEIGHT) {
            out.push(FULL_WEIGHT);
        }
        out
    }
}

/// Prometheus integration.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetricsSpec {
    #[serde(default)]
    pub service_monitor: ServiceMonitorSpec,
}

/// A `networking.k8s.io/v1` NetworkPolicy for the nodes: ingress only to the gRPC port (from
/// clients and the cluster's own nodes) and to the metrics port. Enforced only where the
/// cluster's network plugin enforces NetworkPolicies.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Who may reach the gRPC port besides the cluster's own nodes (unset: any source), as
    /// NetworkPolicy peers. Include the operator's namespace (it calls the nodes' Admin service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients: Option<Vec<NetworkPolicyPeer>>,
    /// Who may scrape the metrics port (unset: any source; empty: nobody).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Vec<NetworkPolicyPeer>>,
}

impl Default for NetworkPolicySpec {
    fn default() -> Self {
        NetworkPolicySpec {
            enabled: true,
            clients: None,
            metrics: None,
        }
    }
}

/// A `monitoring.coreos.com/v1` ServiceMonitor for the nodes (needs the Prometheus Operator).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceMonitorSpec {
    #[serde(default)]
    pub enabled: bool,
    /// Labels of the ServiceMonitor (what your Prometheus' `serviceMonitorSelector` matches).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Scrape interval, such as `30s` (unset: Prometheus' default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
}

/// Sections of the node configuration merged over what the operator generates. Keys are the
/// node's own (docs/configuration.md), so `limits: {max_value_bytes: 4194304}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
pub struct NodeConfigOverrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub limits: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub storage: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub anti_entropy: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub hints: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub gossip: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub tombstone_gc: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub handoff: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub log: Option<serde_json::Map<String, serde_json::Value>>,
    /// With TLS: more tokens (`tokens: [{name, role, sha256}]`, see `dynakv token`); the first
    /// admin's token is kept whatever this says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub auth: Option<serde_json::Map<String, serde_json::Value>>,
}

impl NodeConfigOverrides {
    pub fn is_empty(&self) -> bool {
        self.sections().all(|(_, s)| s.is_none())
    }

    /// (section name in the node config, override)
    pub fn sections(
        &self,
    ) -> impl Iterator<
        Item = (
            &'static str,
            Option<&serde_json::Map<String, serde_json::Value>>,
        ),
    > {
        [
            ("limits", self.limits.as_ref()),
            ("storage", self.storage.as_ref()),
            ("anti_entropy", self.anti_entropy.as_ref()),
            ("hints", self.hints.as_ref()),
            ("gossip", self.gossip.as_ref()),
            ("tombstone_gc", self.tombstone_gc.as_ref()),
            ("handoff", self.handoff.as_ref()),
            ("log", self.log.as_ref()),
            ("auth", self.auth.as_ref()),
        ]
        .into_iter()
    }
}

fn free_form_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

/// TLS on the nodes' gRPC port (clients, peers, the operator) and authenticated clients.
///
/// Unset, a new cluster gets TLS and a cluster already running keeps how its nodes serve (a
/// cluster made before this field existed stays in plain text). Whichever it is, it cannot
/// change while the cluster runs: nodes with and without TLS cannot talk to each other.
///
/// Where the node certificate comes from: a Secret the user names (`secretName`), a cert-manager
/// `Certificate` the operator creates (`certManager`), or, when neither is set, a CA the
/// operator generates and keeps in the Secret `<name>-ca`. Either way the nodes mount the Secret
/// `tls.crt`, `tls.key` and `ca.crt`; the certificate must carry the URI SAN
/// `urn:dynakv:node:*` and the DNS names `*.<name>-peers.<namespace>.svc` (docs/security.md).
/// The first admin's token is in the Secret `<name>-admin-token` (key `token`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!(has(self.secretName) && has(self.certManager))")
        .message("tls.secretName and tls.certManager are exclusive: name one source")
)]
pub struct TlsSpec {
    /// TLS and client authentication on every node. Immutable: nodes with and without TLS
    /// cannot talk to each other, so it cannot change on a running cluster.
    #[serde(default = "default_true")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("tls.enabled is immutable"))]
    pub enabled: bool,
    /// A Secret in the cluster's namespace with `tls.crt`, `tls.key` and `ca.crt`, managed by
    /// the user; rotated files are picked up by the nodes without a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: Option<String>,
    /// Have cert-manager issue the node certificate (a `Certificate` named `<name>-node`,
    /// renewed by cert-manager).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_manager: Option<CertManagerSpec>,
}

impl Default for TlsSpec {
    fn default() -> Self {
        TlsSpec {
            enabled: true,
            secret_name: None,
            cert_manager: None,
        }
    }
}

/// Which cert-manager issuer signs the node certificate.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CertManagerSpec {
    pub issuer_ref: IssuerRef,
}

/// A cert-manager issuer (`Issuer` in the cluster's namespace or a `ClusterIssuer`). It must put
/// its CA in the Secret's `ca.crt` (CA and self-signed issuers do).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IssuerRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// `Issuer` or `ClusterIssuer`.
    #[serde(default = "default_issuer_kind")]
    pub kind: String,
    #[serde(default = "default_issuer_group")]
    pub group: String,
}

fn default_issuer_kind() -> String {
    "Issuer".into()
}
fn default_issuer_group() -> String {
    "cert-manager.io".into()
}

/// What the operator last saw and did.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KVClusterStatus {
    /// Pods of the StatefulSet (scale subresource).
    #[serde(default)]
    pub replicas: i32,
    /// Pods that pass their readiness probe.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector of the pods (scale subresource, for HorizontalPodAutoscalers).
    #[serde(default)]
    pub selector: String,
    #[serde(default)]
    pub phase: Phase,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Available, Progressing, Degraded, Rebalancing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The step under way or the reason for waiting, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Each node as the cluster's membership sees it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeState>,
    /// The ring change under way, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebalancing: Option<RebalanceProgress>,
}

fn conditions_schema(generator: &mut SchemaGenerator) -> Schema {
    let mut schema = generator.subschema_for::<Vec<Condition>>();
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert(
        "x-kubernetes-list-map-keys".into(),
        serde_json::json!(["type"]),
    );
    schema
}

/// Coarse state for `kubectl get`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum Phase {
    /// Nothing created yet.
    #[default]
    Pending,
    /// The first nodes are starting and taking their share.
    Creating,
    /// Every node is in the ring at full weight, on the current template.
    Running,
    /// New nodes are joining.
    ScalingUp,
    /// Nodes are draining before they are removed.
    ScalingDown,
    /// Pods are being replaced one at a time with a new template.
    Upgrading,
    /// The spec cannot be acted on, or the cluster refused a change.
    Degraded,
    /// The KVCluster is being deleted.
    Terminating,
}

/// One node, as the answering node's gossip sees it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeState {
    pub name: String,
    pub weight: i32,
    pub target_weight: i32,
    /// joining, normal, leaving, left, removed, unknown.
    pub lifecycle: String,
    /// alive, suspect, down, unknown.
    pub liveness: String,
    /// Share of all key-replicas this node holds (0..1).
    pub owned_fraction: f64,
    /// Whether its pod passes its readiness probe (false: no pod).
    pub ready: bool,
}

/// A ring change and its progress (from `Admin.ClusterStatus`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RebalanceProgress {
    /// The member whose weight changes.
    pub node: String,
    /// join, weight, leave, remove.
    pub kind: String,
    /// announced, streaming, switching, retiring.
    pub phase: String,
    pub from_weight: i32,
    pub to_weight: i32,
    /// Percentage done, for `kubectl get` ("42%").
    pub progress: String,
    pub keys_done: i64,
    pub keys_total: i64,
    pub bytes_done: i64,
    pub bytes_total: i64,
    pub ranges_done: i64,
    pub ranges_total: i64,
    /// Bytes streamed per second lately (0: unknown yet).
    pub bytes_per_second: f64,
    /// Seconds until done at that rate (unset: unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<i64>,
    /// Members the current phase waits for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting_for: Vec<String>,
    /// Members whose changes run after this one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queued: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quorum_reads_levels_and_numbers() {
        let q: Quorum = serde_json::from_str("\"ALL\"").unwrap();
        assert_eq!(q, Quorum::All);
        let q: Quorum = serde_json::from_str("2").unwrap();
        assert_eq!(q, Quorum::Count(2));
        let q: Quorum = serde_json::from_str("\"2\"").unwrap();
        assert_eq!(q, Quorum::Count(2));
        assert!(serde_json::from_str::<Quorum>("\"most\"").is_err());
        assert_eq!(
            serde_json::to_string(&Quorum::Quorum).unwrap(),
            "\"quorum\""
        );
        assert_eq!(Quorum::Quorum.resolve(5), 3);
    }

    #[test]
    fn an_empty_spec_takes_every_default() {
        let spec: KVClusterSpec = serde_json::from_str("{}").unwrap();
        assert_eq!(spec, KVClusterSpec::default());
        assert!(spec.problems().is_empty());
    }

    #[test]
    fn weight_steps_always_end_at_full_weight() {
        let s = ScalingSpec {
            weight_steps: vec![50, 10, 0, 50, 300],
        };
        assert_eq!(s.steps(), vec![10, 50, 100]);
        assert_eq!(ScalingSpec::default().steps(), vec![25, 50, 100]);
    }

    #[test]
    fn problems_name_the_quorum_above_n() {
        let spec = KVClusterSpec {
            write_quorum: Quorum::Count(4),
            ..KVClusterSpec::default()
        };
        let p = spec.problems();
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("writeQuorum 4"), "{p:?}");
    }
}
