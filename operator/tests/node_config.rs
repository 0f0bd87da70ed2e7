//! Every ConfigMap the operator writes is a configuration the node accepts: parsed by the
//! node's own parser (which refuses unknown fields) and validated as `dynakv serve` does after
//! adding the flags the StatefulSet passes (`--node-id`, `--advertise`).

use dynakv_node::config::Config;
use dynakv_operator::crd::{KVCluster, KVClusterSpec, Quorum};
use dynakv_operator::resources;
use serde_json::json;

fn cluster(spec: KVClusterSpec) -> KVCluster {
    let mut k = KVCluster::new("kv", spec);
    k.metadata.namespace = Some("shop".into());
    k.metadata.uid = Some("00000000-0000-0000-0000-000000000002".into());
    k
}

fn config_of(kvc: &KVCluster) -> Config {
    let digest = "ab".repeat(32);
    let d = resources::build(kvc, kvc.spec.replicas, Some(&digest)).unwrap();
    let yaml = d
        .config_map
        .data
        .as_ref()
        .and_then(|d| d.get("dynakv.yaml"))
        .cloned()
        .unwrap();
    Config::from_yaml(&yaml).unwrap_or_else(|e| panic!("the node refuses:\n{yaml}\n{e}"))
}

fn valid(mut c: Config) {
    c.node_id = "kv-1".into();
    c.advertise = Some("kv-1.kv-peers.shop.svc:7070".into());
    if let Err(e) = c.validate() {
        panic!("invalid node configuration: {e}");
    }
}

#[test]
fn the_default_config_map_is_a_valid_node_config() {
    let c = config_of(&cluster(KVClusterSpec::default()));
    assert_eq!(
        c.weight,
        Some(0),
        "nodes join at weight 0; the operator raises them"
    );
    assert!(
        c.members.is_empty(),
        "nodes join through seeds, not a static member list"
    );
    assert_eq!(c.seeds.len(), 3);
    assert_eq!(c.cluster_id, "kv.shop");
    assert_eq!(c.replication.n, 3);
    assert_eq!(
        c.tls.as_ref().map(|t| t.ca.clone()),
        Some("/etc/dynakv-tls/ca.crt".into()),
        "TLS is on by default"
    );
    assert_eq!(c.auth.required, Some(true));
    assert_eq!(c.auth.tokens.len(), 1, "the first admin's token");
    valid(c);
}

#[test]
fn a_fully_specified_config_map_is_a_valid_node_config() {
    let mut spec = KVClusterSpec {
        replicas: 5,
        replication_factor: 5,
        read_quorum: Quorum::Count(2),
        write_quorum: Quorum::All,
        sloppy_quorum: false,
        vnodes_per_node: 128,
        conflict_mode: dynakv_operator::crd::ConflictMode::Lww,
        ..KVClusterSpec::default()
    };
    let obj = |v: serde_json::Value| v.as_object().cloned();
    spec.node_config.limits = obj(json!({"max_value_bytes": 4194304}));
    spec.node_config.gossip = obj(json!({"probe_period_ms": 2000}));
    spec.node_config.hints = obj(json!({"max_per_target": 1000}));
    spec.node_config.log = obj(json!({"level": "debug"}));
    let c = config_of(&cluster(spec));
    assert_eq!(c.limits.max_value_bytes, 4194304);
    assert_eq!(c.log.format, "json");
    assert_eq!(c.log.level, "debug");
    assert!(!c.replication.sloppy);
    valid(c);
}
