//! Pure builders: a `KVCluster` (and the StatefulSet size the decisions chose) in, the objects
//! the operator applies out. No I/O: the same input always gives byte-identical objects, which
//! is what the golden tests and the template hash rely on.
//!
//! Every object carries the cluster's labels and a controller owner reference to the KVCluster,
//! so that deleting the KVCluster deletes them.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
    StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvVar, EnvVarSource, HTTPGetAction, KeyToPath, ObjectFieldSelector, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile,
    Secret, SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec,
    TopologySpreadConstraint, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use crate::crd::KVCluster;

/// gRPC port of every node (KV, Admin, Replica, Gossip, Health).
pub const GRPC_PORT: i32 = 7070;
/// HTTP port of the node's `/metrics`.
pub const METRICS_PORT: i32 = 9090;
/// Where the node's volume is mounted.
pub const DATA_DIR: &str = "/data";
/// Where the ConfigMap is mounted.
pub const CONFIG_DIR: &str = "/etc/dynakv";
/// Where the node certificate Secret is mounted (`tls.crt`, `tls.key`, `ca.crt`).
pub const TLS_DIR: &str = "/etc/dynakv-tls";
/// The name of the first admin's token in the nodes' configuration.
pub const ADMIN_TOKEN_NAME: &str = "admin";
/// Annotation on the pod template: hash of the template (and so of the config) it was built
/// from. A pod whose annotation differs from the current hash runs an old template.
pub const TEMPLATE_HASH_ANNOTATION: &str = "dynakv.io/template-hash";
/// User and group the node runs as (the image's non-root user).
pub const NODE_UID: i64 = 65532;

/// A builder input that cannot be turned into objects. Nothing was applied.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The KVCluster has no namespace or uid yet (not read from the API server).
    #[error("KVCluster {0} has no {1}: it was not read from the API server")]
    MissingMetadata(String, &'static str),
    #[error("cannot render the node configuration: {0}")]
    Config(#[source] serde_saphyr::SerializeError),
}

/// Everything the operator applies for one KVCluster.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub config_map: ConfigMap,
    pub peers_service: Service,
    pub client_service: Service,
    pub stateful_set: StatefulSet,
    pub pdb: PodDisruptionBudget,
    pub service_monitor: Option<DynamicObject>,
    /// `None` when `networkPolicy.enabled` is false.
    pub network_policy: Option<NetworkPolicy>,
    /// The cert-manager `Certificate` of the nodes, when `tls.certManager` asks for one.
    pub certificate: Option<DynamicObject>,
}

/// Names of the objects of a cluster named `name`.
pub fn config_map_name(name: &str) -> String {
    format!("{name}-config")
}
pub fn peers_service_name(name: &str) -> String {
    format!("{name}-peers")
}
/// The Secret the nodes' certificate is mounted from.
pub fn tls_secret_name(kvc: &KVCluster) -> String {
    kvc.spec
        .tls_spec()
        .secret_name
        .unwrap_or_else(|| format!("{}-tls", kvc.name_any()))
}

/// Whether the nodes of a StatefulSet serve TLS: their pods mount the certificate.
pub fn serves_tls(sts: &StatefulSet) -> bool {
    sts.spec
        .template
        .spec
        .as_ref()
        .and_then(|p| p.volumes.as_ref())
        .is_some_and(|v| v.iter().any(|v| v.name == "tls"))
}

/// Whether the cluster runs TLS, from its spec and (when it has nodes) how they serve now: an
/// unset `tls` is on for a new cluster and keeps a running one as it is; a spec that would
/// switch running nodes is refused with the reason.
pub fn effective_tls(kvc: &KVCluster, running: Option<bool>) -> Result<bool, String> {
    let said = kvc.spec.tls.as_ref().map(|t| t.enabled);
    match (said, running) {
        (None, None) => Ok(true),
        (None, Some(r)) => Ok(r),
        (Some(s), None) => Ok(s),
        (Some(s), Some(r)) if s == r => Ok(s),
        (Some(s), Some(_)) => Err(format!(
            "tls.enabled is {s} but the nodes run {}: TLS cannot be switched on a running \
             cluster (nodes with and without it cannot talk to each other); set it back, or \
             make a new cluster and copy the data",
            if s { "in plain text" } else { "with TLS" }
        )),
    }
}

/// The Secret with the CA the operator generates (when no other source is named); the nodes
/// never see its key.
pub fn ca_secret_name(name: &str) -> String {
    format!("{name}-ca")
}

/// The Secret with the first admin's bearer token (key `token`).
pub fn admin_token_secret_name(name: &str) -> String {
    format!("{name}-admin-token")
}

/// The cert-manager `Certificate` of the nodes.
pub fn certificate_name(name: &str) -> String {
    format!("{name}-node")
}

/// The DNS names a node certificate must carry: every pod through the headless Service, the
/// client Service, and `localhost` (for `kubectl port-forward`).
pub fn node_dns_names(name: &str, namespace: &str) -> Vec<String> {
    let peers = peers_service_name(name);
    vec![
        format!("*.{peers}.{namespace}.svc"),
        format!("*.{peers}.{namespace}.svc.cluster.local"),
        format!("{name}.{namespace}.svc"),
        format!("{name}.{namespace}.svc.cluster.local"),
        format!("{name}.{namespace}"),
        name.to_string(),
        "localhost".into(),
    ]
}

/// The URI SAN every node certificate of a cluster carries (any node may present it).
pub const NODE_URI_SAN: &str = "urn:dynakv:node:*";

pub fn stateful_set_name(name: &str) -> String {
    name.to_string()
}
/// Node id and pod name of ordinal `i`.
pub fn pod_name(name: &str, ordinal: u32) -> String {
    format!("{name}-{ordinal}")
}
/// The ordinal of a pod of this cluster, from its name.
pub fn ordinal_of(name: &str, pod: &str) -> Option<u32> {
    let rest = pod.strip_prefix(name)?.strip_prefix('-')?;
    if rest.is_empty() || (rest.len() > 1 && rest.starts_with('0')) {
        return None;
    }
    rest.parse().ok()
}
/// DNS name of a pod through the headless Service (`<pod>.<name>-peers.<ns>.svc`).
pub fn pod_host(name: &str, namespace: &str, pod: &str) -> String {
    format!("{pod}.{}.{namespace}.svc", peers_service_name(name))
}

/// Labels shared by every object of the cluster; the first two are the pod selector.
pub fn selector_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "dynakv".to_string()),
        ("app.kubernetes.io/instance".to_string(), name.to_string()),
    ])
}

/// The pod selector as a string (`status.selector`, for the scale subresource).
pub fn selector_string(name: &str) -> String {
    selector_labels(name)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn labels(name: &str, component: &str) -> BTreeMap<String, String> {
    let mut l = selector_labels(name);
    l.insert("app.kubernetes.io/component".into(), component.into());
    l.insert(
        "app.kubernetes.io/managed-by".into(),
        crate::FIELD_MANAGER.into(),
    );
    l
}

struct Ctx<'a> {
    name: String,
    namespace: String,
    owner: OwnerReference,
    kvc: &'a KVCluster,
}

impl<'a> Ctx<'a> {
    fn new(kvc: &'a KVCluster) -> Result<Self, BuildError> {
        let name = kvc.name_any();
        let namespace = kvc
            .namespace()
            .ok_or_else(|| BuildError::MissingMetadata(name.clone(), "namespace"))?;
        let owner = kvc
            .controller_owner_ref(&())
            .ok_or_else(|| BuildError::MissingMetadata(name.clone(), "uid"))?;
        Ok(Ctx {
            name,
            namespace,
            owner,
            kvc,
        })
    }

    fn meta(&self, name: String, component: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(labels(&self.name, component)),
            owner_references: Some(vec![self.owner.clone()]),
            ..ObjectMeta::default()
        }
    }
}

/// Builds every object, with the StatefulSet at `replicas` pods. `admin_token_sha256` is the
/// digest of the first admin's token (from its Secret) when TLS is on.
pub fn build(
    kvc: &KVCluster,
    replicas: i32,
    admin_token_sha256: Option<&str>,
) -> Result<Desired, BuildError> {
    let cx = Ctx::new(kvc)?;
    let config_map = build_config_map(&cx, admin_token_sha256)?;
    let template = pod_template(&cx, &config_map);
    Ok(Desired {
        peers_service: peers_service(&cx),
        client_service: client_service(&cx),
        stateful_set: stateful_set(&cx, template, replicas),
        pdb: pdb(&cx),
        service_monitor: service_monitor(&cx),
        network_policy: network_policy(&cx),
        certificate: certificate(&cx),
        config_map,
    })
}

/// The hash pods built from the current spec carry in [`TEMPLATE_HASH_ANNOTATION`].
pub fn template_hash(
    kvc: &KVCluster,
    admin_token_sha256: Option<&str>,
) -> Result<String, BuildError> {
    let cx = Ctx::new(kvc)?;
    let config_map = build_config_map(&cx, admin_token_sha256)?;
    let template = pod_template(&cx, &config_map);
    Ok(template
        .metadata
        .and_then(|m| m.annotations)
        .and_then(|mut a| a.remove(TEMPLATE_HASH_ANNOTATION))
        .unwrap_or_default())
}

/// FNV-1a, 64 bits: a hash whose value never changes with the Rust version (the std hasher's
/// may), so an operator upgrade does not by itself restart every node.
fn fnv1a(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The seeds every node is given: the first N pods, which exist whenever the cluster does
/// (replicas never go below N). Stable across scaling, so scaling does not change the config
/// (which would restart every node).
pub fn seeds(name: &str, namespace: &str, n: u32) -> Vec<String> {
    (0..n)
        .map(|i| {
            format!(
                "{}:{GRPC_PORT}",
                pod_host(name, namespace, &pod_name(name, i))
            )
        })
        .collect()
}

/// The node configuration (`dynakv.yaml`) as JSON: generated fields, then the overrides merged
/// in section by section. With TLS, the first admin's token (by its digest) is kept among
/// `auth.tokens` whatever the overrides say.
pub fn node_config(kvc: &KVCluster, namespace: &str, admin_token_sha256: Option<&str>) -> Value {
    let name = kvc.name_any();
    let s = &kvc.spec;
    let mut config = json!({
        "cluster_id": format!("{name}.{namespace}"),
        "listen": format!("0.0.0.0:{GRPC_PORT}"),
        "metrics_listen": format!("0.0.0.0:{METRICS_PORT}"),
        "data_dir": DATA_DIR,
        "seeds": seeds(&name, namespace, s.n()),
        "weight": 0,
        "replication": {
            "n": s.n(),
            "read_quorum": s.read_quorum.to_node_value(),
            "write_quorum": s.write_quorum.to_node_value(),
            "sloppy": s.sloppy_quorum,
            "conflict_mode": s.conflict_mode.as_str(),
            "vnodes_per_node": s.vnodes_per_node,
        },
        "log": {"format": "json"},
    });
    let tls = s.tls_spec();
    if tls.enabled
        && let Value::Object(root) = &mut config
    {
        root.insert(
            "tls".into(),
            json!({
                "cert": format!("{TLS_DIR}/tls.crt"),
                "key": format!("{TLS_DIR}/tls.key"),
                "ca": format!("{TLS_DIR}/ca.crt"),
            }),
        );
        root.insert("auth".into(), json!({"required": true, "tokens": []}));
    }
    if let Value::Object(root) = &mut config {
        for (section, over) in s.node_config.sections() {
            let Some(over) = over else { continue };
            let entry = root
                .entry(section.to_string())
                .or_insert_with(|| Value::Object(Default::default()));
            if let Value::Object(target) = entry {
                for (k, v) in over {
                    target.insert(k.clone(), v.clone());
                }
            }
        }
    }
    if let (true, Some(digest)) = (tls.enabled, admin_token_sha256)
        && let Some(Value::Object(auth)) = config.get_mut("auth")
    {
        let tokens = auth
            .entry("tokens")
            .or_insert_with(|| Value::Array(Vec::new()));
        if !tokens.is_array() {
            *tokens = Value::Array(Vec::new());
        }
        if let Value::Array(list) = tokens {
            list.retain(|t| t.get("name") != Some(&json!(ADMIN_TOKEN_NAME)));
            list.insert(
                0,
                json!({"name": ADMIN_TOKEN_NAME, "role": "admin", "sha256": digest}),
            );
        }
    }
    config
}

fn build_config_map(cx: &Ctx, admin_token_sha256: Option<&str>) -> Result<ConfigMap, BuildError> {
    let yaml = serde_saphyr::to_string(&node_config(cx.kvc, &cx.namespace, admin_token_sha256))
        .map_err(BuildError::Config)?;
    Ok(ConfigMap {
        metadata: cx.meta(config_map_name(&cx.name), "config"),
        data: Some(BTreeMap::from([("dynakv.yaml".to_string(), yaml)])),
        ..ConfigMap::default()
    })
}

fn port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::String(name.into())),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    }
}

/// Headless Service: one DNS name per pod, ready or not (a node must be reachable by its peers
/// and the operator while it joins, before it is ready).
fn peers_service(cx: &Ctx) -> Service {
    Service {
        metadata: cx.meta(peers_service_name(&cx.name), "peers"),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(&cx.name)),
            ports: Some(vec![port("grpc", GRPC_PORT), port("metrics", METRICS_PORT)]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The Service clients use: ready nodes only.
fn client_service(cx: &Ctx) -> Service {
    Service {
        metadata: cx.meta(cx.name.clone(), "client"),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector_labels(&cx.name)),
            ports: Some(vec![port("grpc", GRPC_PORT)]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn env_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// An HTTP probe of the node's metrics port: `/readyz` answers 200 while the gRPC port serves
/// (with or without TLS, which a gRPC probe could not speak), `/healthz` while the process runs.
fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("metrics".into()),
            scheme: Some("HTTP".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

fn pod_template(cx: &Ctx, config_map: &ConfigMap) -> PodTemplateSpec {
    let s = &cx.kvc.spec;
    let peers = peers_service_name(&cx.name);
    let zone_key = s.scheduling.zone_topology_key.trim();
    let mut env = vec![
        env_field("POD_NAME", "metadata.name"),
        env_field("POD_NAMESPACE", "metadata.namespace"),
    ];
    let mut args = vec![
        "serve".to_string(),
        "--config".into(),
        format!("{CONFIG_DIR}/dynakv.yaml"),
        "--node-id".into(),
        "$(POD_NAME)".into(),
        "--advertise".into(),
        format!("$(POD_NAME).{peers}.$(POD_NAMESPACE).svc:{GRPC_PORT}"),
    ];
    let mut spread = Vec::new();
    if !zone_key.is_empty() {
        // The pod's copy of its node's zone label (set by the API server's pod topology
        // labels admission for the well-known keys); empty when absent, which every node
        // then shares.
        env.push(env_field(
            "DYNAKV_ZONE",
            &format!("metadata.labels['{zone_key}']"),
        ));
        args.push("--zone=$(DYNAKV_ZONE)".into());
        spread.push(TopologySpreadConstraint {
            max_skew: 1,
            topology_key: zone_key.to_string(),
            when_unsatisfiable: s.scheduling.zone_spread.as_str().into(),
            label_selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&cx.name)),
                ..LabelSelector::default()
            }),
            ..TopologySpreadConstraint::default()
        });
    }
    spread.push(TopologySpreadConstraint {
        max_skew: 1,
        topology_key: "kubernetes.io/hostname".into(),
        when_unsatisfiable: "ScheduleAnyway".into(),
        label_selector: Some(LabelSelector {
            match_labels: Some(selector_labels(&cx.name)),
            ..LabelSelector::default()
        }),
        ..TopologySpreadConstraint::default()
    });

    let mut mounts = vec![
        VolumeMount {
            name: "data".into(),
            mount_path: DATA_DIR.into(),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "config".into(),
            mount_path: CONFIG_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "tmp".into(),
            mount_path: "/tmp".into(),
            ..VolumeMount::default()
        },
    ];
    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: config_map_name(&cx.name),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(Quantity("64Mi".into())),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        },
    ];
    if s.tls_spec().enabled {
        mounts.push(VolumeMount {
            name: "tls".into(),
            mount_path: TLS_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        // Only the three files the node reads (a cert-manager Secret may hold more), readable
        // by the node's group (fsGroup) and nobody else.
        volumes.push(Volume {
            name: "tls".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(tls_secret_name(cx.kvc)),
                default_mode: Some(0o440),
                items: Some(
                    ["tls.crt", "tls.key", "ca.crt"]
                        .into_iter()
                        .map(|k| KeyToPath {
                            key: k.into(),
                            path: k.into(),
                            ..KeyToPath::default()
                        })
                        .collect(),
                ),
                optional: Some(false),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
    }

    let container = Container {
        name: "dynakv".into(),
        image: Some(s.image.clone()),
        image_pull_policy: Some(s.image_pull_policy.as_str().into()),
        command: Some(vec!["dynakv".into()]),
        args: Some(args),
        env: Some(env),
        ports: Some(vec![
            ContainerPort {
                name: Some("grpc".into()),
                container_port: GRPC_PORT,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("metrics".into()),
                container_port: METRICS_PORT,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
        ]),
        resources: s.resources.clone(),
        // Startup: up to 5 minutes to open (and replay the log of) a large database.
        startup_probe: Some(http_probe("/readyz", 2, 150)),
        readiness_probe: Some(http_probe("/readyz", 5, 2)),
        liveness_probe: Some(http_probe("/healthz", 10, 6)),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(NODE_UID),
            run_as_group: Some(NODE_UID),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(mounts),
        ..Container::default()
    };

    let pod_spec = PodSpec {
        containers: vec![container],
        // A node stops cleanly on SIGTERM (finishes its writes, records a clean stop) well
        // within this.
        termination_grace_period_seconds: Some(s.termination_grace_period_seconds),
        enable_service_links: Some(false),
        automount_service_account_token: Some(false),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(NODE_UID),
            run_as_group: Some(NODE_UID),
            fs_group: Some(NODE_UID),
            fs_group_change_policy: Some("OnRootMismatch".into()),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..PodSecurityContext::default()
        }),
        volumes: Some(volumes),
        node_selector: (!s.scheduling.node_selector.is_empty())
            .then(|| s.scheduling.node_selector.clone()),
        tolerations: (!s.scheduling.tolerations.is_empty())
            .then(|| s.scheduling.tolerations.clone()),
        affinity: s.scheduling.affinity.clone(),
        priority_class_name: s.scheduling.priority_class_name.clone(),
        image_pull_secrets: (!s.image_pull_secrets.is_empty())
            .then(|| s.image_pull_secrets.clone()),
        topology_spread_constraints: Some(spread),
        ..PodSpec::default()
    };

    let mut pod_labels = labels(&cx.name, "node");
    pod_labels.remove("app.kubernetes.io/managed-by");
    let config_hash = fnv1a(
        serde_json::to_string(&config_map.data)
            .unwrap_or_default()
            .as_bytes(),
    );
    let mut template = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(pod_labels),
            annotations: Some(BTreeMap::from([(
                "dynakv.io/config-hash".to_string(),
                config_hash,
            )])),
            ..ObjectMeta::default()
        }),
        spec: Some(pod_spec),
    };
    let hash = fnv1a(
        serde_json::to_string(&template)
            .unwrap_or_default()
            .as_bytes(),
    );
    if let Some(a) = template
        .metadata
        .as_mut()
        .and_then(|m| m.annotations.as_mut())
    {
        a.insert(TEMPLATE_HASH_ANNOTATION.into(), hash);
    }
    template
}

fn stateful_set(cx: &Ctx, template: PodTemplateSpec, replicas: i32) -> StatefulSet {
    let s = &cx.kvc.spec;
    let claim = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some("data".into()),
            labels: Some(selector_labels(&cx.name)),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: s.storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(s.storage.size.clone()),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    };
    StatefulSet {
        metadata: cx.meta(stateful_set_name(&cx.name), "node"),
        spec: StatefulSetSpec {
            replicas: Some(replicas),
            service_name: Some(peers_service_name(&cx.name)),
            selector: LabelSelector {
                match_labels: Some(selector_labels(&cx.name)),
                ..LabelSelector::default()
            },
            // Pods start together; the order of joins and drains is the operator's, through the
            // Admin API, not the StatefulSet's.
            pod_management_policy: Some("Parallel".into()),
            // The operator replaces pods itself, one at a time, while the cluster is healthy.
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("OnDelete".into()),
                rolling_update: None,
            }),
            persistent_volume_claim_retention_policy: Some(
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some(s.storage.retention.when_deleted.as_str().into()),
                    when_scaled: Some(s.storage.retention.when_scaled.as_str().into()),
                },
            ),
            template,
            volume_claim_templates: Some(vec![claim]),
            ..StatefulSetSpec::default()
        },
        ..StatefulSet::default()
    }
}

/// How many nodes a voluntary disruption (a drain, an eviction) may take at once so that no
/// key loses its read or write quorum: the worst case takes replicas of one key only, which
/// leaves `n - k` of them, and both `r` and `w` must still be met. 0 when R or W is N (every
/// replica must answer: no eviction is safe).
pub fn pdb_max_unavailable(n: u32, read: u32, write: u32) -> i32 {
    let needed = read.max(write);
    n.saturating_sub(needed) as i32
}

fn pdb(cx: &Ctx) -> PodDisruptionBudget {
    let s = &cx.kvc.spec;
    let n = s.n();
    PodDisruptionBudget {
        metadata: cx.meta(cx.name.clone(), "node"),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(pdb_max_unavailable(
                n,
                s.read_quorum.resolve(n),
                s.write_quorum.resolve(n),
            ))),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&cx.name)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

/// Ingress to the nodes: the gRPC port from the clients (any source unless
/// `networkPolicy.clients` says, and then the cluster's own nodes too), the metrics port from any
/// source unless `networkPolicy.metrics` says (an empty list: nobody); nothing else. Egress is
/// left open (peers, DNS).
fn network_policy(cx: &Ctx) -> Option<NetworkPolicy> {
    let np = &cx.kvc.spec.network_policy;
    if !np.enabled {
        return None;
    }
    let tcp = |port: i32| NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".into()),
        ..NetworkPolicyPort::default()
    };
    // Named clients: the cluster's own nodes stay admitted beside them (replication, gossip,
    // handoff). The operator is not added by label (any pod may carry any label): name its
    // namespace among the clients.
    let grpc_from = np.clients.as_ref().map(|clients| {
        let mut from = vec![NetworkPolicyPeer {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&cx.name)),
                ..LabelSelector::default()
            }),
            ..NetworkPolicyPeer::default()
        }];
        from.extend(clients.iter().cloned());
        from
    });
    let mut ingress = vec![NetworkPolicyIngressRule {
        ports: Some(vec![tcp(GRPC_PORT)]),
        from: grpc_from,
    }];
    // An empty list would read as "from anywhere": it means nobody, so no rule.
    if np.metrics.as_ref().is_none_or(|m| !m.is_empty()) {
        ingress.push(NetworkPolicyIngressRule {
            ports: Some(vec![tcp(METRICS_PORT)]),
            from: np.metrics.clone(),
        });
    }
    Some(NetworkPolicy {
        metadata: cx.meta(cx.name.clone(), "network"),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&cx.name)),
                ..LabelSelector::default()
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(ingress),
            ..NetworkPolicySpec::default()
        }),
    })
}

/// Annotation on a node certificate Secret the operator issued: when the certificate ends
/// (unix seconds).
pub const NOT_AFTER_ANNOTATION: &str = "dynakv.io/not-after";

/// A Secret the operator makes for the cluster (`component`: `ca`, `tls`, `admin-token`),
/// owned by the KVCluster so that it goes with it.
pub fn secret(
    kvc: &KVCluster,
    name: String,
    component: &str,
    type_: &str,
    data: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
) -> Result<Secret, BuildError> {
    let cx = Ctx::new(kvc)?;
    let mut metadata = cx.meta(name, component);
    if !annotations.is_empty() {
        metadata.annotations = Some(annotations);
    }
    Ok(Secret {
        metadata,
        type_: Some(type_.into()),
        string_data: Some(data),
        ..Secret::default()
    })
}

/// cert-manager's Certificate kind.
pub fn certificate_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "cert-manager.io",
        "v1",
        "Certificate",
    ))
}

/// The cert-manager `Certificate` of the nodes, when `tls.certManager` asks for one.
pub fn certificate_of(kvc: &KVCluster) -> Result<Option<DynamicObject>, BuildError> {
    Ok(certificate(&Ctx::new(kvc)?))
}

/// The nodes' certificate as cert-manager should issue it into [`tls_secret_name`]: every
/// pod's name, the Services', and the URI SAN that makes it a node certificate.
fn certificate(cx: &Ctx) -> Option<DynamicObject> {
    let tls = cx.kvc.spec.tls_spec();
    let cm = tls.cert_manager.as_ref().filter(|_| tls.enabled)?;
    let mut obj =
        DynamicObject::new(&certificate_name(&cx.name), &certificate_resource()).data(json!({
            "spec": {
                "secretName": tls_secret_name(cx.kvc),
                "dnsNames": node_dns_names(&cx.name, &cx.namespace),
                "ipAddresses": ["127.0.0.1"],
                "uris": [NODE_URI_SAN],
                "usages": ["server auth", "client auth", "digital signature", "key encipherment"],
                "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
                "issuerRef": {
                    "name": cm.issuer_ref.name,
                    "kind": cm.issuer_ref.kind,
                    "group": cm.issuer_ref.group,
                },
            }
        }));
    obj.metadata = cx.meta(certificate_name(&cx.name), "tls");
    Some(obj)
}

/// The Prometheus Operator's ServiceMonitor kind.
pub fn service_monitor_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "monitoring.coreos.com",
        "v1",
        "ServiceMonitor",
    ))
}

fn service_monitor(cx: &Ctx) -> Option<DynamicObject> {
    let sm = &cx.kvc.spec.metrics.service_monitor;
    if !sm.enabled {
        return None;
    }
    let mut meta = cx.meta(cx.name.clone(), "metrics");
    if let Some(l) = meta.labels.as_mut() {
        l.extend(sm.labels.clone());
    }
    let mut endpoint = json!({
        "port": "metrics",
        "path": "/metrics",
        // The cluster's name on every series, as deploy/prometheus/scrape-config.yaml does.
        "relabelings": [{
            "sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_instance"],
            "targetLabel": "kvcluster",
        }],
    });
    if let (Some(i), Value::Object(e)) = (&sm.interval, &mut endpoint) {
        e.insert("interval".into(), json!(i));
    }
    let mut selector = selector_labels(&cx.name);
    selector.insert("app.kubernetes.io/component".into(), "peers".into());
    let mut obj = DynamicObject::new(&cx.name, &service_monitor_resource()).data(json!({
        "spec": {
            "selector": {"matchLabels": selector},
            "namespaceSelector": {"matchNames": [cx.namespace]},
            "endpoints": [endpoint],
        }
    }));
    obj.metadata = meta;
    Some(obj)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{KVClusterSpec, Quorum};

    #[test]
    fn pdb_keeps_every_quorum_for_n3_and_n5() {
        // (n, r, w) -> max unavailable
        let table = [
            (3, Quorum::Quorum, Quorum::Quorum, 1),
            (3, Quorum::One, Quorum::One, 2),
            (3, Quorum::One, Quorum::Quorum, 1),
            (3, Quorum::Quorum, Quorum::One, 1),
            (3, Quorum::All, Quorum::One, 0),
            (3, Quorum::One, Quorum::All, 0),
            (3, Quorum::All, Quorum::All, 0),
            (3, Quorum::Count(2), Quorum::Count(1), 1),
            (5, Quorum::Quorum, Quorum::Quorum, 2),
            (5, Quorum::One, Quorum::One, 4),
            (5, Quorum::One, Quorum::Quorum, 2),
            (5, Quorum::All, Quorum::Quorum, 0),
            (5, Quorum::Count(2), Quorum::Count(4), 1),
            (5, Quorum::Count(2), Quorum::Count(2), 3),
        ];
        for (n, r, w, want) in table {
            assert_eq!(
                pdb_max_unavailable(n, r.resolve(n), w.resolve(n)),
                want,
                "n={n} r={r} w={w}"
            );
            // The property itself: taking `want` replicas of one key away leaves both quorums.
            let left = n as i32 - want;
            assert!(left >= r.resolve(n) as i32 && left >= w.resolve(n) as i32);
            // And one more would break one of them (unless nothing at all may go).
            assert!(left - 1 < r.resolve(n).max(w.resolve(n)) as i32);
        }
    }

    #[test]
    fn the_network_policy_admits_only_the_grpc_and_metrics_ports() {
        let kvc = KVCluster::test();
        let np = build(&kvc, 3, None)
            .unwrap()
            .network_policy
            .expect("on by default");
        let spec = np.spec.unwrap();
        assert_eq!(spec.policy_types, Some(vec!["Ingress".to_string()]));
        assert_eq!(
            spec.pod_selector.unwrap().match_labels,
            Some(selector_labels("test"))
        );
        let rules = spec.ingress.unwrap();
        let ports: Vec<_> = rules
            .iter()
            .map(|r| r.ports.as_ref().unwrap()[0].port.clone())
            .collect();
        assert_eq!(
            ports,
            [
                Some(IntOrString::Int(GRPC_PORT)),
                Some(IntOrString::Int(METRICS_PORT))
            ]
        );
        // Unrestricted sources by default.
        assert!(rules.iter().all(|r| r.from.is_none()));

        // Named clients: the nodes themselves stay admitted beside them.
        let mut restricted = kvc.clone();
        let app = NetworkPolicyPeer {
            pod_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([("app".into(), "shop".into())])),
                ..LabelSelector::default()
            }),
            ..NetworkPolicyPeer::default()
        };
        restricted.spec.network_policy.clients = Some(vec![app.clone()]);
        let np = build(&restricted, 3, None).unwrap().network_policy.unwrap();
        let from = np.spec.unwrap().ingress.unwrap()[0].from.clone().unwrap();
        assert_eq!(from.len(), 2);
        assert_eq!(
            from[0].pod_selector.as_ref().unwrap().match_labels,
            Some(selector_labels("test"))
        );
        assert_eq!(from[1], app);
        // An empty metrics list admits nobody (an empty `from` would admit everyone).
        restricted.spec.network_policy.metrics = Some(Vec::new());
        let np = build(&restricted, 3, None).unwrap().network_policy.unwrap();
        assert_eq!(np.spec.unwrap().ingress.unwrap().len(), 1);

        let mut off = kvc;
        off.spec.network_policy.enabled = false;
        assert!(build(&off, 3, None).unwrap().network_policy.is_none());
    }

    #[test]
    fn ordinals_are_read_back_from_pod_names_only_of_this_cluster() {
        assert_eq!(ordinal_of("kv", "kv-0"), Some(0));
        assert_eq!(ordinal_of("kv", "kv-12"), Some(12));
        assert_eq!(ordinal_of("kv", "kv-01"), None);
        assert_eq!(ordinal_of("kv", "kvx-1"), None);
        assert_eq!(ordinal_of("kv", "kv-"), None);
        assert_eq!(ordinal_of("kv-a", "kv-a-3"), Some(3));
    }

    #[test]
    fn seeds_are_the_first_n_pods_and_do_not_move_with_replicas() {
        let mut kvc = KVCluster::test();
        let a = node_config(&kvc, "default", None);
        kvc.spec.replicas = 7;
        let b = node_config(&kvc, "default", None);
        assert_eq!(a, b);
        assert_eq!(
            a["seeds"],
            json!([
                "test-0.test-peers.default.svc:7070",
                "test-1.test-peers.default.svc:7070",
                "test-2.test-peers.default.svc:7070"
            ])
        );
    }

    #[test]
    fn a_new_image_changes_the_template_hash_and_replicas_do_not() {
        let kvc = KVCluster::test();
        let h = template_hash(&kvc, None).unwrap();
        assert_eq!(
            h,
            template_hash(&kvc.clone().with_replicas(9), None).unwrap()
        );
        let mut other = kvc.clone();
        other.spec.image = "dynakv/dynakv:0.2.0".into();
        assert_ne!(h, template_hash(&other, None).unwrap());
    }

    #[test]
    fn overrides_merge_into_their_section_and_keep_generated_fields() {
        let mut kvc = KVCluster::test();
        let mut limits = serde_json::Map::new();
        limits.insert("max_value_bytes".into(), json!(4194304));
        kvc.spec.node_config.limits = Some(limits);
        let mut log = serde_json::Map::new();
        log.insert("level".into(), json!("debug"));
        kvc.spec.node_config.log = Some(log);
        let c = node_config(&kvc, "default", None);
        assert_eq!(c["limits"]["max_value_bytes"], json!(4194304));
        assert_eq!(c["log"], json!({"format": "json", "level": "debug"}));
        assert_eq!(c["replication"]["n"], json!(3));
    }

    #[test]
    fn with_tls_the_config_keeps_the_admin_token_and_the_pods_mount_only_the_three_files() {
        let mut kvc = KVCluster::test_tls();
        let mut auth = serde_json::Map::new();
        auth.insert(
            "tokens".into(),
            json!([
                {"name": "admin", "role": "read", "sha256": "00".repeat(32)},
                {"name": "app", "role": "write", "sha256": "11".repeat(32)},
            ]),
        );
        kvc.spec.node_config.auth = Some(auth);
        let digest = "ab".repeat(32);
        let c = node_config(&kvc, "default", Some(&digest));
        assert_eq!(c["tls"]["cert"], json!("/etc/dynakv-tls/tls.crt"));
        assert_eq!(c["auth"]["required"], json!(true));
        // The user's "admin" entry cannot take the first admin's place; other tokens stay.
        assert_eq!(
            c["auth"]["tokens"],
            json!([
                {"name": "admin", "role": "admin", "sha256": digest},
                {"name": "app", "role": "write", "sha256": "11".repeat(32)},
            ])
        );
        let d = build(&kvc, 3, Some(&digest)).unwrap();
        let pod = d.stateful_set.spec.template.spec.unwrap();
        let tls = pod
            .volumes
            .unwrap()
            .into_iter()
            .find(|v| v.name == "tls")
            .unwrap()
            .secret
            .unwrap();
        assert_eq!(tls.secret_name.as_deref(), Some("test-tls"));
        assert_eq!(tls.default_mode, Some(0o440));
        assert_eq!(tls.items.unwrap().len(), 3);
        let probe = pod.containers[0].readiness_probe.clone().unwrap();
        assert_eq!(
            probe.http_get.unwrap().path.as_deref(),
            Some("/readyz"),
            "a TLS port cannot be probed by a plain gRPC probe"
        );
        // A new token restarts the nodes (they read tokens at start).
        assert_ne!(
            template_hash(&kvc, Some(&digest)).unwrap(),
            template_hash(&kvc, Some(&"cd".repeat(32))).unwrap()
        );
        let mut plain = KVCluster::test();
        plain.spec.node_config.auth = None;
        let c = node_config(&plain, "default", Some(&digest));
        assert!(c.get("tls").is_none() && c.get("auth").is_none());
    }

    #[test]
    fn a_cluster_without_uid_cannot_be_built() {
        let mut kvc = KVCluster::test();
        kvc.metadata.uid = None;
        assert!(matches!(
            build(&kvc, 3, None),
            Err(BuildError::MissingMetadata(_, "uid"))
        ));
        let _ = KVClusterSpec::default();
    }

    fn golden(name: &str, kvc: &KVCluster) {
        let d = build(kvc, kvc.spec.replicas, None).unwrap();
        let objects: Vec<Value> = vec![
            serde_json::to_value(&d.config_map).unwrap(),
            serde_json::to_value(&d.peers_service).unwrap(),
            serde_json::to_value(&d.client_service).unwrap(),
            serde_json::to_value(&d.stateful_set).unwrap(),
            serde_json::to_value(&d.pdb).unwrap(),
        ]
        .into_iter()
        .chain(
            d.network_policy
                .iter()
                .map(|s| serde_json::to_value(s).unwrap()),
        )
        .chain(
            d.service_monitor
                .iter()
                .map(|s| serde_json::to_value(s).unwrap()),
        )
        .chain(
            d.certificate
                .iter()
                .map(|s| serde_json::to_value(s).unwrap()),
        )
        .collect();
        let text = serde_saphyr::to_string_multiple(&objects).unwrap();
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(name);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &text).unwrap();
        }
        let want = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            want == text,
            "{} differs from the builders' output; rerun with UPDATE_GOLDEN=1 and review the diff",
            path.display()
        );
    }

    #[test]
    fn golden_default_cluster() {
        golden("default.yaml", &KVCluster::test_tls());
    }

    #[test]
    fn golden_fully_specified_cluster() {
        golden("full.yaml", &KVCluster::test_full());
    }
}
