//! Node configuration: one YAML file plus command-line flags, validated once at start-up and then
//! passed into constructors. No module reads environment variables on its own.
//!
//! `dynakv serve --print-config` prints the effective configuration with every default filled in.

use std::net::SocketAddr;
use std::path::PathBuf;

use std::time::Duration;

use dynakv_core::NodeId;
use dynakv_core::membership::GossipConfig;
use dynakv_core::ring::{DEFAULT_VNODES_PER_NODE, MAX_WEIGHT};
use serde::{Deserialize, Serialize};

/// Everything a node needs to start. Every field has a default except `node_id` and `data_dir`
/// in a real deployment (the defaults suit a single local node).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Stable name of this node (the pod name on Kubernetes). Persisted in the data directory:
    /// a data directory of another node is refused.
    pub node_id: String,
    /// Name of the cluster. Persisted in the data directory and checked on every peer stream and
    /// client context: data of one cluster never mixes with another's.
    pub cluster_id: String,
    /// gRPC listen address (clients and peers). Its IP is also the source address of outgoing
    /// peer connections, so a node on 127.0.0.3 talks to its peers from 127.0.0.3.
    pub listen: SocketAddr,
    /// Address other nodes and clients use to reach this node. Default: `listen`.
    pub advertise: Option<String>,
    /// HTTP address of `/metrics` (Prometheus text format). Unset: no metrics endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// Directory of the node's database (created if missing).
    pub data_dir: PathBuf,
    /// Ring weight of this node at its first start: 100 is normal, 0 owns nothing (at most
    /// 1000). Unset: 100 for a member of `members` (or a lone node), 0 for a node that joins
    /// through `seeds`. A node that joins starts at weight 0 and moves to this weight through
    /// a ring change. Later starts keep the weight the cluster last gave the node (`dynakv
    /// cluster weight`); this setting no longer applies.
    pub weight: Option<u32>,
    /// Failure zone (rack, availability zone). Replicas of a key prefer distinct zones.
    pub zone: Option<String>,
    /// The cluster's nodes at its creation, this one included: gossip's seeds and the first
    /// ring (a member gossip has not heard of keeps its configured place until the cluster
    /// commits another ring). Every node must be given the same list. Leave it empty for a
    /// node that joins a running cluster through `seeds`.
    pub members: Vec<MemberConfig>,
    /// Addresses (host:port; DNS names are re-resolved at every attempt) of nodes of a running
    /// cluster to join through. A node in no `members` list joins at weight 0 (see `weight`).
    pub seeds: Vec<String>,
    pub replication: ReplicationConfig,
    pub limits: LimitsConfig,
    pub storage: StorageConfig,
    pub anti_entropy: AntiEntropyConfig,
    pub hints: HintsConfig,
    pub gossip: GossipOptions,
    pub tombstone_gc: TombstoneGcConfig,
    pub handoff: HandoffConfig,
    /// TLS on the gRPC port, for clients and peers alike. Unset: plain text (a loud warning at
    /// start; only for trying DynaKV out on one machine).
    pub tls: Option<TlsConfig>,
    pub auth: AuthConfig,
    pub log: LogConfig,
}

/// Certificate files (PEM). They are re-read every `reload_interval_ms`; a change takes effect
/// for new connections without a restart, and a file that does not load keeps the previous ones
/// in use (with an error in the log).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// This node's certificate chain: the node's serving certificate, also presented as its
    /// client certificate to peers. It must name the node with the URI SAN `urn:dynakv:node:<id>`
    /// and carry the DNS names or IPs peers and clients dial.
    pub cert: PathBuf,
    /// The private key of `cert`.
    pub key: PathBuf,
    /// The CA (one or more certificates) that signs node and client certificates.
    pub ca: PathBuf,
    /// How often the files are checked for changes. Default 10 s.
    #[serde(default = "default_tls_reload_ms")]
    pub reload_interval_ms: u64,
}

impl Default for TlsConfig {
    /// Empty paths and the default limits (for `..TlsConfig::default()`).
    fn default() -> Self {
        TlsConfig {
            cert: PathBuf::new(),
            key: PathBuf::new(),
            ca: PathBuf::new(),
            reload_interval_ms: default_tls_reload_ms(),
        }
    }
}

fn default_tls_reload_ms() -> u64 {
    10_000
}

/// Who may call what. With `required`, every call but the health check needs a principal:
/// a client certificate (signed by `tls.ca`, with the URI SAN `urn:dynakv:role:<role>`) or a
/// bearer token listed here; peers need a node certificate. Roles: `read` (Get, Ring), `write`
/// (also Put, Delete), `admin` (also the Admin service).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Default: true when `tls` is set, false otherwise. Needs `tls`.
    pub required: Option<bool>,
    /// Bearer tokens, stored as SHA-256 digests (`dynakv token new` makes one).
    pub tokens: Vec<TokenConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds the token (in logs and errors; never the token itself).
    pub name: String,
    /// `read`, `write` or `admin`.
    pub role: String,
    /// Lower-case hex SHA-256 of the token.
    pub sha256: String,
}

/// One member of the static membership list.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    pub id: String,
    /// gRPC address (host:port).
    pub address: String,
    /// HTTP metrics address, for `dynakv cluster status` (optional).
    #[serde(default)]
    pub metrics: Option<String>,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub zone: Option<String>,
}

/// Replication settings: these must be equal on every node of a cluster.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationConfig {
    /// N: replicas of every key.
    pub n: u32,
    /// Default R when a request names none: "one", "quorum", "all" or a number.
    pub read_quorum: QuorumSetting,
    /// Default W when a request names none.
    pub write_quorum: QuorumSetting,
    /// Default for requests that do not say: fallback nodes count toward R/W (sloppy quorum).
    pub sloppy: bool,
    /// "siblings" (keep concurrent values, Dynamo) or "lww" (last write wins by hybrid timestamp).
    pub conflict_mode: ConflictMode,
    /// Virtual nodes of a node of weight 100.
    pub vnodes_per_node: u32,
    /// One read in this many asks every primary and read-repairs them all; the others ask R
    /// (the fastest first, one more when a replica is slow or fails). 1: every read asks all;
    /// 0: only the replicas a read asked are repaired. May differ between nodes.
    pub read_repair_every: u32,
    /// Write ids on forwarded writes (`siblings` mode, `dynakv_core::write_id`): this node
    /// advertises them to its peers, and takes and mints them while no peer is known to lack
    /// them, which lets a forwarded write be hedged and retried. `false`: it stops advertising,
    /// taking and minting them, so its peers stop too (what a node from before write ids looks
    /// like to them). May differ between nodes (a rolling upgrade has both).
    pub write_ids: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ConflictMode {
    Siblings,
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

/// A quorum as written in the config: a level name or a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuorumSetting {
    One,
    Quorum,
    All,
    Count(u32),
}

impl QuorumSetting {
    /// The number of replies this setting needs with replication factor `n`.
    pub fn resolve(self, n: u32) -> u32 {
        match self {
            QuorumSetting::One => 1,
            QuorumSetting::Quorum => n / 2 + 1,
            QuorumSetting::All => n,
            QuorumSetting::Count(c) => c,
        }
    }
}

impl std::str::FromStr for QuorumSetting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "one" => Ok(QuorumSetting::One),
            "quorum" => Ok(QuorumSetting::Quorum),
            "all" => Ok(QuorumSetting::All),
            other => other.parse::<u32>().map(QuorumSetting::Count).map_err(|_| {
                format!("{s:?} is not a quorum: use ONE, QUORUM, ALL or a number of replicas")
            }),
        }
    }
}

impl std::fmt::Display for QuorumSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QuorumSetting::One => f.write_str("one"),
            QuorumSetting::Quorum => f.write_str("quorum"),
            QuorumSetting::All => f.write_str("all"),
            QuorumSetting::Count(c) => write!(f, "{c}"),
        }
    }
}

impl Serialize for QuorumSetting {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            QuorumSetting::Count(c) => s.serialize_u32(*c),
            other => s.serialize_str(&other.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for QuorumSetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u32),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) => Ok(QuorumSetting::Count(n)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Limits that keep one bad client from taking a node down.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest key accepted, in bytes.
    pub max_key_bytes: usize,
    /// Largest value accepted, in bytes.
    pub max_value_bytes: usize,
    /// Deadline of a request that names none, in milliseconds.
    pub request_timeout_ms: u64,
    /// Longest deadline a request may ask for, in milliseconds.
    pub max_request_timeout_ms: u64,
    /// Client requests in flight on this node; past it, requests get RESOURCE_EXHAUSTED.
    pub max_concurrent_requests: usize,
    /// Concurrent replica operations served per peer stream.
    pub max_replica_ops_per_stream: usize,
    /// Replica requests queued per peer before callers wait.
    pub peer_queue_len: usize,
    /// Replica messages packed into one stream frame.
    pub max_frame_messages: usize,
    /// Connect timeout for peer connections, in milliseconds.
    pub peer_connect_timeout_ms: u64,
    /// Live siblings of one key past which a warning is logged and counted.
    pub sibling_warn: usize,
    /// Live siblings of one key past which writes are refused until a client resolves them.
    pub sibling_max: usize,
    /// Requests (HTTP/2 streams) open at once on one connection; the client is told to wait
    /// (HTTP/2 flow control: its next stream is refused until one ends).
    pub max_streams_per_connection: usize,
    /// Connections open at once (clients and peers); one more is closed at once. Keep it below
    /// the process's file descriptor limit (raised to its hard limit at start).
    pub max_connections: usize,
    /// Connections still in their TLS handshake or, in plain text, before the HTTP/2 preface;
    /// one more is closed at once.
    pub max_handshakes: usize,
    /// A connection that has not finished its TLS handshake, or in plain text sent the HTTP/2
    /// preface, by then is closed (a client that connects and sends nothing).
    pub handshake_timeout_ms: u64,
}

/// Group commit settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Writes committed together (one write-ahead log record, one fsync), at most.
    pub max_batch_ops: usize,
    /// Bytes committed together, at most.
    pub max_batch_bytes: usize,
    /// Writes queued for the committer before callers wait.
    pub queue_len: usize,
    /// Writes in the write-ahead log that trigger a checkpoint (a durable commit of the database
    /// file, then the log starts over).
    pub checkpoint_ops: usize,
    /// Bytes of write-ahead log records that trigger a checkpoint.
    pub checkpoint_bytes: usize,
    /// Memory the database may use to cache its pages (most of a node's memory).
    pub cache_bytes: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// "text" or "json".
    pub format: String,
    /// A tracing filter such as "info" or "dynakv_node=debug,info". RUST_LOG overrides it.
    pub level: String,
}

fn default_weight() -> u32 {
    100
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: "n1".into(),
            cluster_id: "dynakv".into(),
            listen: "127.0.0.1:7100".parse().expect("literal address"),
            advertise: None,
            metrics_listen: None,
            data_dir: PathBuf::from("./dynakv-data"),
            weight: None,
            zone: None,
            members: Vec::new(),
            seeds: Vec::new(),
            replication: ReplicationConfig::default(),
            limits: LimitsConfig::default(),
            storage: StorageConfig::default(),
            anti_entropy: Default::default(),
            hints: Default::default(),
            gossip: Default::default(),
            tombstone_gc: Default::default(),
            handoff: Default::default(),
            tls: None,
            auth: AuthConfig::default(),
            log: LogConfig::default(),
        }
    }
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            n: 3,
            read_quorum: QuorumSetting::Quorum,
            write_quorum: QuorumSetting::Quorum,
            sloppy: true,
            conflict_mode: ConflictMode::Siblings,
            vnodes_per_node: DEFAULT_VNODES_PER_NODE,
            read_repair_every: 10,
            write_ids: true,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_key_bytes: 1024,
            max_value_bytes: 1024 * 1024,
            request_timeout_ms: 5_000,
            max_request_timeout_ms: 60_000,
            max_concurrent_requests: 4096,
            max_replica_ops_per_stream: 4096,
            peer_queue_len: 8192,
            max_frame_messages: 256,
            peer_connect_timeout_ms: 1_000,
            sibling_warn: 25,
            sibling_max: 100,
            max_streams_per_connection: 4096,
            max_connections: 4096,
            max_handshakes: 256,
            handshake_timeout_ms: 5_000,
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            max_batch_ops: 1024,
            max_batch_bytes: 16 * 1024 * 1024,
            queue_len: 8192,
            checkpoint_ops: 8192,
            checkpoint_bytes: 16 * 1024 * 1024,
            cache_bytes: crate::storage::DEFAULT_CACHE_BYTES,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

/// A configuration that failed validation; the message names the field and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

/// The configuration after validation, with typed ids.
#[derive(Debug, Clone)]
pub struct ValidConfig {
    pub raw: Config,
    pub node_id: NodeId,
    /// The configured ring's members (empty for a node that joins through seeds).
    pub members: Vec<ValidMember>,
    /// This node's weight at its first start (see [`Config::weight`]).
    pub weight: u32,
    /// The node has no place in the configured ring: it joins through `seeds` at weight 0.
    pub joins: bool,
    pub advertise: String,
    pub read_quorum: u32,
    pub write_quorum: u32,
    /// Every call but the health check needs a principal (see [`AuthConfig`]).
    pub auth_required: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ValidMember {
    pub id: NodeId,
    pub address: String,
    pub metrics: Option<String>,
    pub weight: u32,
    pub zone: Option<String>,
}

impl Config {
    /// Reads a YAML file. Unknown fields are errors (a typo must not silently fall back to a default).
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        serde_saphyr::from_str(text).map_err(|e| ConfigError(e.to_string()))
    }

    pub fn to_yaml(&self) -> String {
        serde_saphyr::to_string(self).unwrap_or_else(|e| format!("# cannot render: {e}"))
    }

    /// Checks every field once; the rest of the node trusts the result.
    pub fn validate(mut self) -> Result<ValidConfig, ConfigError> {
        let err = |s: String| Err(ConfigError(s));
        // `--zone=` (an empty label, as a pod without a zone gets) means no zone.
        if self.zone.as_deref() == Some("") {
            self.zone = None;
        }
        let node_id =
            NodeId::new(&self.node_id).map_err(|e| ConfigError(format!("node_id: {e}")))?;
        if self.cluster_id.is_empty() || self.cluster_id.len() > 253 {
            return err("cluster_id must be 1..=253 bytes".into());
        }
        let r = &self.replication;
        if r.n == 0 || r.n > 16 {
            return err(format!("replication.n = {}: must be 1..=16", r.n));
        }
        let read_quorum = r.read_quorum.resolve(r.n);
        let write_quorum = r.write_quorum.resolve(r.n);
        for (name, q) in [("read_quorum", read_quorum), ("write_quorum", write_quorum)] {
            if q == 0 || q > r.n {
                return err(format!(
                    "replication.{name} = {q}: must be between 1 and n = {}",
                    r.n
                ));
            }
        }
        if r.vnodes_per_node == 0 || r.vnodes_per_node > 4096 {
            return err(format!(
                "replication.vnodes_per_node = {}: must be 1..=4096",
                r.vnodes_per_node
            ));
        }
        if let Some(w) = self.weight
            && w > MAX_WEIGHT
        {
            return err(format!("weight = {w}: at most {MAX_WEIGHT}"));
        }
        for seed in &self.seeds {
            if seed
                .rsplit_once(':')
                .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
            {
                return err(format!("seeds: {seed:?} is not host:port"));
            }
        }
        if let Err(e) = self.handoff.validate() {
            return err(e);
        }
        let auth_required = self.auth.required.unwrap_or(self.tls.is_some());
        if let Some(tls) = &self.tls {
            if tls.reload_interval_ms == 0 {
                return err("tls.reload_interval_ms must be above 0".into());
            }
        } else if auth_required || !self.auth.tokens.is_empty() {
            return err(
                "auth needs tls: without it, tokens and identities would cross the \
                 network in clear text and peers could not prove who they are"
                    .into(),
            );
        }
        for token in &self.auth.tokens {
            if crate::auth::Role::parse(&token.role).is_none() {
                return err(format!(
                    "auth.tokens {:?}: role {:?} is not read, write or admin",
                    token.name, token.role
                ));
            }
            if crate::auth::parse_digest(&token.sha256).is_none() {
                return err(format!(
                    "auth.tokens {:?}: sha256 must be 64 hex digits (`dynakv token new` prints one)",
                    token.name
                ));
            }
        }
        let l = &self.limits;
        if l.max_key_bytes == 0 || l.max_key_bytes > 64 * 1024 {
            return err("limits.max_key_bytes must be 1..=65536".into());
        }
        if l.max_value_bytes == 0 || l.max_value_bytes > 64 * 1024 * 1024 {
            return err("limits.max_value_bytes must be 1..=67108864".into());
        }
        if l.request_timeout_ms == 0 || l.request_timeout_ms > l.max_request_timeout_ms {
            return err(
                "limits.request_timeout_ms must be >= 1 and <= limits.max_request_timeout_ms"
                    .into(),
            );
        }
        for (name, v) in [
            ("limits.max_concurrent_requests", l.max_concurrent_requests),
            (
                "limits.max_replica_ops_per_stream",
                l.max_replica_ops_per_stream,
            ),
            ("limits.peer_queue_len", l.peer_queue_len),
            ("limits.max_frame_messages", l.max_frame_messages),
            ("limits.sibling_max", l.sibling_max),
            ("limits.max_connections", l.max_connections),
            (
                "limits.max_streams_per_connection",
                l.max_streams_per_connection,
            ),
            ("limits.max_handshakes", l.max_handshakes),
            (
                "limits.handshake_timeout_ms",
                l.handshake_timeout_ms as usize,
            ),
            ("storage.max_batch_ops", self.storage.max_batch_ops),
            ("storage.max_batch_bytes", self.storage.max_batch_bytes),
            ("storage.queue_len", self.storage.queue_len),
            ("storage.checkpoint_ops", self.storage.checkpoint_ops),
            ("storage.checkpoint_bytes", self.storage.checkpoint_bytes),
            ("storage.cache_bytes", self.storage.cache_bytes),
        ] {
            if v == 0 {
                return err(format!("{name} must be at least 1"));
            }
        }
        if l.sibling_warn > l.sibling_max {
            return err("limits.sibling_warn must not exceed limits.sibling_max".into());
        }
        let ae = &self.anti_entropy;
        if !(1..=20).contains(&ae.leaf_bits) {
            return err(format!(
                "anti_entropy.leaf_bits = {}: must be 1..=20",
                ae.leaf_bits
            ));
        }
        if ae.interval_ms == 0 {
            return err("anti_entropy.interval_ms must be at least 1".into());
        }
        if self.tombstone_gc.grace_ms <= self.hints.max_age_ms {
            return err(format!(
                "tombstone_gc.grace_ms = {} must exceed hints.max_age_ms = {}: a hint older than \
                 a purged tombstone could bring a deleted value back",
                self.tombstone_gc.grace_ms, self.hints.max_age_ms
            ));
        }
        if self.hints.delivery_interval_ms == 0 {
            return err("hints.delivery_interval_ms must be at least 1".into());
        }
        if let Err(e) = self.gossip.engine().validate() {
            return err(format!("gossip: {e}"));
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return err(format!(
                "log.format = {:?}: use \"text\" or \"json\"",
                self.log.format
            ));
        }
        let advertise = self
            .advertise
            .clone()
            .unwrap_or_else(|| self.listen.to_string());
        let mut members = Vec::with_capacity(self.members.len().max(1));
        for m in &self.members {
            let id = NodeId::new(&m.id).map_err(|e| ConfigError(format!("members: {e}")))?;
            if members.iter().any(|v: &ValidMember| v.id == id) {
                return err(format!("members: {id} is listed twice"));
            }
            if m.weight > MAX_WEIGHT {
                return err(format!(
                    "members: {id} has weight {} > {MAX_WEIGHT}",
                    m.weight
                ));
            }
            if m.address.is_empty() {
                return err(format!("members: {id} has no address"));
            }
            members.push(ValidMember {
                id,
                address: m.address.clone(),
                metrics: m.metrics.clone(),
                weight: m.weight,
                zone: m.zone.clone(),
            });
        }
        // A node listed nowhere but given seeds joins a running cluster; otherwise it is a
        // member of the configured ring (a lone node is its own ring).
        let joins = !self.seeds.is_empty() && members.iter().all(|m| m.id != node_id);
        let weight = self.weight.unwrap_or(if joins { 0 } else { 100 });
        match members.iter().find(|m| m.id == node_id) {
            Some(me) if self.weight.is_some_and(|w| w != me.weight) || me.zone != self.zone => {
                return err(format!(
                    "members: the entry for this node ({node_id}) says weight {} zone {:?}, \
                     but weight/zone are {} {:?}",
                    me.weight, me.zone, weight, self.zone
                ));
            }
            Some(_) => {}
            None if joins => {}
            None => members.push(ValidMember {
                id: node_id.clone(),
                address: advertise.clone(),
                metrics: self.metrics_listen.map(|a| a.to_string()),
                weight,
                zone: self.zone.clone(),
            }),
        }
        let weight = members
            .iter()
            .find(|m| m.id == node_id)
            .map_or(weight, |m| m.weight);
        members.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(ValidConfig {
            node_id,
            weight,
            joins,
            members,
            advertise,
            read_quorum,
            write_quorum,
            auth_required,
            raw: self,
        })
    }
}

// The sections of the background tasks. They live here, not in the tasks' modules, so that
// the configuration is read by everything and reads nothing of the node (no import circle).

/// Anti-entropy settings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AntiEntropyConfig {
    /// Run anti-entropy at all.
    pub enabled: bool,
    /// Time between two full rounds over every peer, in milliseconds.
    pub interval_ms: u64,
    /// Keys repaired per second, at most.
    pub max_keys_per_sec: u64,
    /// Bytes of clocks sent or fetched per second, at most.
    pub max_bytes_per_sec: u64,
    /// Segments of each tree: 2^leaf_bits (1..=20).
    pub leaf_bits: u8,
}

impl Default for AntiEntropyConfig {
    fn default() -> Self {
        AntiEntropyConfig {
            enabled: true,
            interval_ms: 10_000,
            max_keys_per_sec: 5_000,
            max_bytes_per_sec: 32 * 1024 * 1024,
            leaf_bits: dynakv_core::merkle::DEFAULT_LEAF_BITS,
        }
    }
}

/// Tombstone GC settings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TombstoneGcConfig {
    /// A tombstone younger than this is never purged, in milliseconds. Must exceed
    /// `hints.max_age_ms`.
    pub grace_ms: u64,
    /// Time between two GC passes over the local data, in milliseconds.
    pub interval_ms: u64,
    /// Tombstones examined per pass, at most.
    pub max_per_pass: usize,
}

impl Default for TombstoneGcConfig {
    fn default() -> Self {
        TombstoneGcConfig {
            grace_ms: 24 * 3600 * 1000,
            interval_ms: 60_000,
            max_per_pass: 1000,
        }
    }
}

/// Hint queue bounds and delivery pace.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HintsConfig {
    /// Hints held for one target, at most (0: never store hints).
    pub max_per_target: u64,
    /// Bytes of hints held for one target, at most.
    pub max_bytes_per_target: u64,
    /// A hint older than this is dropped (and anti-entropy repairs the key instead). Keep it
    /// below the tombstone grace period.
    pub max_age_ms: u64,
    /// How often delivery is attempted, in milliseconds.
    pub delivery_interval_ms: u64,
}

impl Default for HintsConfig {
    fn default() -> Self {
        HintsConfig {
            max_per_target: 100_000,
            max_bytes_per_target: 256 * 1024 * 1024,
            max_age_ms: 3 * 3600 * 1000,
            delivery_interval_ms: 1000,
        }
    }
}

/// Gossip and failure detection settings of a node (the `gossip` section of the config file).
/// Every node of a cluster should use the same. The defaults are the LAN preset
/// ([`GossipConfig::lan`]): a member that stops answering is suspect after about one probe
/// period and down `suspicion_mult` probe periods later (about 5 s at up to 10 nodes).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GossipOptions {
    /// Every node probes one member per period, in milliseconds.
    pub probe_period_ms: u64,
    /// Wait for a direct ack before asking others to probe, in milliseconds (< probe period).
    pub probe_rtt_ms: u64,
    /// Members asked to probe a member that did not answer directly.
    pub indirect_probes: usize,
    /// How often pending membership updates are pushed to random members, in milliseconds.
    pub gossip_interval_ms: u64,
    /// Random members each gossip round goes to (1..=3).
    pub peers_per_round: usize,
    /// Suspicion timeout = suspicion_mult * max(1, log10(members)) * probe period.
    pub suspicion_mult: u32,
    /// Each update is forwarded retransmit_mult * ceil(log10(members + 1)) times.
    pub retransmit_mult: u32,
    /// Largest gossip packet, in bytes.
    pub max_packet_bytes: usize,
    /// While a node knows no live member, it announces itself to the seeds this often (ms).
    pub join_retry_ms: u64,
    /// How often a node announces itself to one random member (ms).
    pub announce_interval_ms: u64,
    /// How often a node announces itself to two members it believes down, which heals
    /// partitions (ms).
    pub announce_down_interval_ms: u64,
}

impl Default for GossipOptions {
    fn default() -> Self {
        let lan = GossipConfig::lan();
        let ms = |d: Duration| d.as_millis() as u64;
        GossipOptions {
            probe_period_ms: ms(lan.probe_period),
            probe_rtt_ms: ms(lan.probe_rtt),
            indirect_probes: lan.indirect_probes,
            gossip_interval_ms: ms(lan.gossip_interval),
            peers_per_round: lan.peers_per_round,
            suspicion_mult: lan.suspicion_mult,
            retransmit_mult: lan.retransmit_mult,
            max_packet_bytes: lan.max_packet_bytes,
            join_retry_ms: ms(lan.join_retry),
            announce_interval_ms: ms(lan.announce_interval),
            announce_down_interval_ms: ms(lan.announce_down_interval),
        }
    }
}

impl GossipOptions {
    /// The engine's configuration; [`GossipConfig::validate`] says whether it is usable.
    pub fn engine(&self) -> GossipConfig {
        let ms = Duration::from_millis;
        GossipConfig {
            probe_period: ms(self.probe_period_ms),
            probe_rtt: ms(self.probe_rtt_ms),
            indirect_probes: self.indirect_probes,
            gossip_interval: ms(self.gossip_interval_ms),
            peers_per_round: self.peers_per_round,
            suspicion_mult: self.suspicion_mult,
            retransmit_mult: self.retransmit_mult,
            max_packet_bytes: self.max_packet_bytes,
            join_retry: ms(self.join_retry_ms),
            announce_interval: ms(self.announce_interval_ms),
            announce_down_interval: ms(self.announce_down_interval_ms),
        }
    }
}

/// Largest `handoff.summary_bits` accepted.
pub const MAX_SUMMARY_BITS: u32 = 12;

/// Handoff settings (the `handoff` section of the config file).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HandoffConfig {
    /// Bytes of versions pulled per second, at most, over all ranges (the rate limit that keeps
    /// client traffic fast while a node joins or drains).
    pub max_bytes_per_sec: u64,
    /// Ranges pulled at once.
    pub parallel_ranges: usize,
    /// Entries and bytes per page asked of the sender.
    pub page_entries: u32,
    pub page_bytes: u32,
    /// The catch-up compares 2^summary_bits sub-range hashes per range.
    pub summary_bits: u32,
    /// Back-off after a failed pull, in milliseconds (doubling up to 16x).
    pub retry_backoff_ms: u64,
    /// Keys an old owner deletes per second, at most, once a change has committed and it no
    /// longer replicates them (each delete is a write through the storage writer clients use).
    pub max_drop_keys_per_sec: u64,
}

impl Default for HandoffConfig {
    fn default() -> Self {
        HandoffConfig {
            max_bytes_per_sec: 64 * 1024 * 1024,
            parallel_ranges: 2,
            page_entries: 1024,
            page_bytes: 1024 * 1024,
            summary_bits: 8,
            retry_backoff_ms: 200,
            max_drop_keys_per_sec: 2_000,
        }
    }
}

impl HandoffConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_bytes_per_sec == 0 {
            return Err("handoff.max_bytes_per_sec must be above 0".into());
        }
        if !(1..=64).contains(&self.parallel_ranges) {
            return Err("handoff.parallel_ranges must be 1..=64".into());
        }
        if self.page_entries == 0 || self.page_bytes == 0 {
            return Err("handoff.page_entries and page_bytes must be above 0".into());
        }
        if self.summary_bits > MAX_SUMMARY_BITS {
            return Err(format!(
                "handoff.summary_bits must be 0..={MAX_SUMMARY_BITS}"
            ));
        }
        if self.retry_backoff_ms == 0 {
            return Err("handoff.retry_backoff_ms must be above 0".into());
        }
        if self.max_drop_keys_per_sec == 0 {
            return Err("handoff.max_drop_keys_per_sec must be above 0".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every setting's default in docs/configuration.md's tables is the one the node uses.
    #[test]
    fn the_documented_defaults_are_the_defaults() {
        fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
            match v {
                serde_json::Value::Object(m) => {
                    for (k, v) in m {
                        let key = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        flatten(&key, v, out);
                    }
                }
                serde_json::Value::String(s) => out.push((prefix.to_string(), s.clone())),
                other => out.push((prefix.to_string(), other.to_string())),
            }
        }
        let mut defaults = Vec::new();
        let value = serde_json::to_value(Config::default()).expect("config serializes");
        flatten("", &value, &mut defaults);
        let doc = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/configuration.md"
        ))
        .expect("read docs/configuration.md");
        // Documented as what they stand for rather than as a literal.
        let described = [("advertise", "listen")];
        let mut checked = 0;
        for line in doc.lines() {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let (Some(key), Some(default)) = (cells.get(1), cells.get(2)) else {
                continue;
            };
            let (Some(key), Some(default)) = (
                key.strip_prefix('`').and_then(|k| k.strip_suffix('`')),
                default.strip_prefix('`').and_then(|d| d.strip_suffix('`')),
            ) else {
                continue;
            };
            // One code span only: "`true` with `tls`, else `false`" is prose.
            if described.contains(&(key, default)) || default.contains('`') {
                continue;
            }
            if let Some((_, code)) = defaults.iter().find(|(k, _)| k == key) {
                assert_eq!(default, code, "docs/configuration.md: default of `{key}`");
                checked += 1;
            }
        }
        assert!(checked >= 20, "only {checked} documented defaults found");
    }

    #[test]
    fn auth_needs_tls_and_well_formed_tokens() {
        let token = |role: &str, sha256: &str| TokenConfig {
            name: "app".into(),
            role: role.into(),
            sha256: sha256.into(),
        };
        let digest = crate::auth::digest_hex("t");
        let mut c = Config::default();
        assert!(!c.clone().validate().unwrap().auth_required, "no TLS: open");
        c.auth.required = Some(true);
        assert!(
            c.clone()
                .validate()
                .unwrap_err()
                .0
                .contains("auth needs tls")
        );
        c.auth.required = None;
        c.auth.tokens = vec![token("read", &digest)];
        assert!(
            c.clone()
                .validate()
                .unwrap_err()
                .0
                .contains("auth needs tls")
        );
        c.tls = Some(TlsConfig::default());
        let v = c.clone().validate().unwrap();
        assert!(v.auth_required, "TLS: credentials required by default");
        c.auth.tokens = vec![token("root", &digest)];
        assert!(
            c.clone()
                .validate()
                .unwrap_err()
                .0
                .contains("not read, write or admin")
        );
        c.auth.tokens = vec![token("write", "abc")];
        assert!(
            c.clone()
                .validate()
                .unwrap_err()
                .0
                .contains("64 hex digits")
        );
        c.auth.tokens = Vec::new();
        c.auth.required = Some(false);
        assert!(!c.validate().unwrap().auth_required, "TLS without auth");
    }

    #[test]
    fn defaults_are_valid() {
        let v = Config::default().validate().unwrap();
        assert_eq!(v.read_quorum, 2);
        assert_eq!(v.write_quorum, 2);
        assert_eq!(v.members.len(), 1, "a lone node is its own member");
    }

    #[test]
    fn yaml_round_trips_with_levels_and_numbers() {
        let text = "node_id: kv-0\nreplication:\n  n: 5\n  read_quorum: ONE\n  write_quorum: 4\n";
        let c = Config::from_yaml(text).unwrap();
        assert_eq!(c.replication.read_quorum, QuorumSetting::One);
        assert_eq!(c.replication.write_quorum, QuorumSetting::Count(4));
        let again = Config::from_yaml(&c.to_yaml()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn typos_are_errors_not_defaults() {
        let e = Config::from_yaml("replicaton:\n  n: 3\n").unwrap_err();
        assert!(e.to_string().contains("replicaton"), "{e}");
    }

    /// docs/configuration.md lists exactly the fields the code has.
    #[test]
    fn configuration_doc_lists_every_field() {
        fn paths(prefix: &str, v: &serde_json::Value, out: &mut Vec<String>) {
            if let serde_json::Value::Object(map) = v {
                for (k, child) in map {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    if matches!(child, serde_json::Value::Object(_)) {
                        paths(&p, child, out);
                    } else {
                        out.push(p);
                    }
                }
            }
        }
        let doc = include_str!("../../docs/configuration.md");
        let mut fields = Vec::new();
        paths(
            "",
            &serde_json::to_value(Config::default()).unwrap(),
            &mut fields,
        );
        for f in &fields {
            assert!(
                doc.contains(&format!("| `{f}` |")),
                "docs/configuration.md lacks `{f}`"
            );
        }
        let documented = doc.lines().filter(|l| l.starts_with("| `")).count();
        assert_eq!(
            documented,
            fields.len(),
            "docs/configuration.md lists fields the code lacks"
        );
    }

    #[test]
    fn quorum_larger_than_n_is_refused() {
        let mut c = Config::default();
        c.replication.write_quorum = QuorumSetting::Count(4);
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("write_quorum = 4"), "{e}");
    }
}
