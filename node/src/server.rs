//! `run`: a whole node from a listener, a configuration and a shutdown signal. Tests, `dynakv
//! serve`, `dynakv dev` and the deterministic simulation all drive this same function.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tonic::transport::server::Connected;
use tonic_health::ServingStatus;

use crate::accept::AcceptLimits;
use crate::admin::AdminService;
use crate::config::ValidConfig;
use crate::gossip::{Gossip, GossipSettings};
use crate::kv::KvService;
use crate::metrics::Metrics;
use crate::net::Connector;
use crate::node::{ClusterView, Node, WallClock};
use crate::peer::{MAX_PEER_MESSAGE_BYTES, PeerPool, PeerSettings};
use crate::proto::admin_server::AdminServer;
use crate::proto::kv_server::KvServer;
use crate::proto::replica_server::ReplicaServer;
use crate::replica::ReplicaService;
use crate::storage::{
    Backend, MemoryBackend, RedbBackend, RedbOptions, StorageError, Store, StoreConfig, WriterMode,
};
use crate::tls::NodeTls;

/// How long a stopping node lets in-flight requests finish before it closes connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Where the node keeps its data.
pub enum StorageChoice {
    /// redb in `<data_dir>/dynakv.redb` (the real thing).
    Redb,
    /// A memory backend with crash semantics (tests, simulation).
    Memory(MemoryBackend, WriterMode),
}

/// What the node takes from its environment: time, network, storage.
pub struct Env {
    pub wall: WallClock,
    pub connector: Connector,
    pub storage: StorageChoice,
    /// The node's TLS material when its configuration asks for TLS; `connector` must then use
    /// it for peer connections.
    pub tls: Option<Arc<NodeTls>>,
}

impl Env {
    /// Real time, real TCP leaving from the listen IP (with TLS when configured), redb.
    pub fn real(config: &ValidConfig) -> Result<Env, ServeError> {
        let ip = config.raw.listen.ip();
        let tls = match &config.raw.tls {
            Some(files) => {
                Some(NodeTls::load(files).map_err(|e| ServeError::Config(format!("tls: {e}")))?)
            }
            None => None,
        };
        let source = tls
            .clone()
            .map(|t| -> crate::net::TlsSource { Arc::new(move || t.client_config()) });
        Ok(Env {
            wall: Arc::new(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0)
            }),
            connector: Connector::tcp_tls(
                (!ip.is_unspecified()).then_some(ip),
                Duration::from_millis(config.raw.limits.peer_connect_timeout_ms),
                source,
            ),
            storage: StorageChoice::Redb,
            tls,
        })
    }
}

/// Why a node could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("configuration: {0}")]
    Config(String),
    #[error("reflection service: {0}")]
    Reflection(String),
}

/// Runs a node until `shutdown` resolves. `incoming` yields accepted gRPC connections;
/// `metrics` is the listener for `/metrics`, if any.
pub async fn run<I, IO, IE>(
    incoming: I,
    metrics_listener: Option<TcpListener>,
    config: ValidConfig,
    env: Env,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError>
where
    I: futures::Stream<Item = Result<IO, IE>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    let raw = &config.raw;
    let metrics = Metrics::new();
    let tls = match (&raw.tls, env.tls) {
        (Some(_), Some(tls)) => Some(tls),
        (None, None) => {
            tracing::warn!(
                "TLS is off: clients and peers talk in plain text and anyone who can reach \
                 this port can read and write every key. Use it only to try DynaKV out; \
                 set `tls` (see docs/security.md) for anything else"
            );
            None
        }
        _ => {
            return Err(ServeError::Config(
                "the configuration's `tls` and the environment's TLS material disagree".into(),
            ));
        }
    };
    let (backend, writer): (Arc<dyn Backend>, WriterMode) = match env.storage {
        StorageChoice::Redb => {
            std::fs::create_dir_all(&raw.data_dir).map_err(|source| ServeError::DataDir {
                path: raw.data_dir.clone(),
                source,
            })?;
            let options = RedbOptions {
                checkpoint_log_ops: raw.storage.checkpoint_ops as u64,
                checkpoint_log_bytes: raw.storage.checkpoint_bytes as u64,
                cache_size_bytes: raw.storage.cache_bytes,
                ..RedbOptions::default()
            };
            let backend = RedbBackend::open_with(raw.data_dir.join("dynakv.redb"), &options)?;
            (Arc::new(backend), WriterMode::Thread)
        }
        StorageChoice::Memory(m, mode) => (Arc::new(m), mode),
    };
    let store = Store::open(
        backend,
        StoreConfig {
            max_batch_ops: raw.storage.max_batch_ops,
            max_batch_bytes: raw.storage.max_batch_bytes,
            queue_capacity: raw.storage.queue_len,
            writer,
        },
        metrics.store.clone(),
    )?;
    // Identity fencing before anything else touches the data.
    store
        .check_identity(config.node_id.as_str(), &raw.cluster_id)
        .await?;

    let clean = crate::node::take_clean_stop(&store).await?;
    let dot_id = crate::node::load_dot_id(&store, &config.node_id, (env.wall)(), !clean).await?;
    if !clean {
        tracing::info!(%dot_id, "the last run did not stop cleanly: writes coordinated here carry a new dot id");
    }
    let generation = crate::node::next_generation(&store, (env.wall)()).await?;
    // The ring this node starts with: the last committed ring it knew, or on a first start the
    // configured one (empty for a node that joins through seeds).
    let view = match crate::rebalance::load_committed_ring(&store) {
        Some(specs) => ClusterView::from_specs(&config.node_id, specs, &config.members)
            .map_err(|e| ServeError::Config(format!("the recorded ring: {e}")))?,
        None => ClusterView::from_members(
            &config.node_id,
            config.members.clone(),
            raw.replication.vnodes_per_node,
            raw.replication.n as usize,
        ),
    };
    let configured_tokens = view
        .ring
        .node_index(config.node_id.as_str())
        .map(|i| view.ring.nodes()[i].tokens.clone())
        .unwrap_or_default();
    // A node that stopped while it took part in a ring change must hear how far the change got
    // before it coordinates a write (see `Node::wait_for_cluster`).
    let restarted_mid_change = crate::rebalance::record_awaited_change(&store).await?;
    let metadata = crate::rebalance::initial_metadata(
        &store,
        config.weight,
        raw.zone.clone(),
        configured_tokens,
    );
    crate::rebalance::save_metadata(&store, &metadata).await?;
    let gossip = Gossip::start(
        GossipSettings {
            cluster_id: raw.cluster_id.clone(),
            node_id: config.node_id.clone(),
            advertise: config.advertise.clone(),
            generation,
            seeds: config
                .members
                .iter()
                .filter(|m| m.id != config.node_id)
                .map(|m| (m.id.clone(), m.address.clone()))
                .collect(),
            seed_addresses: raw.seeds.clone(),
            metadata,
            // Seeded from what makes this run unique, so runs differ and replays repeat.
            rng_seed: {
                let mut seed = dot_id.as_str().as_bytes().to_vec();
                seed.extend_from_slice(&generation.to_le_bytes());
                dynakv_core::hash::hash128(&seed) as u64
            },
            config: raw.gossip.engine(),
        },
        env.connector.clone(),
    )
    .map_err(|e| ServeError::Config(e.to_string()))?;
    let peers = PeerPool::new(
        PeerSettings {
            self_id: config.node_id.clone(),
            cluster_id: raw.cluster_id.clone(),
            queue_len: raw.limits.peer_queue_len,
            max_frame_messages: raw.limits.max_frame_messages,
            connect_timeout: Duration::from_millis(raw.limits.peer_connect_timeout_ms),
            backoff: Duration::from_millis(200),
        },
        env.connector,
    );
    let hints = crate::hint_store::Hints::open(raw.hints.clone(), &store)?;
    let node = Arc::new(
        Node::new(
            config.clone(),
            view,
            store,
            dot_id,
            hints,
            peers,
            gossip.gossip.clone(),
            metrics.clone(),
            env.wall,
        )
        .map_err(|e| ServeError::Config(e.to_string()))?,
    );
    // A node joining through seeds with no ring but its own (a first start, or a restart before
    // it heard from anyone) must hear from the cluster before it serves (see
    // `Node::wait_for_cluster`).
    let lone_joiner = !raw.seeds.is_empty()
        && node
            .view()
            .ring
            .nodes()
            .iter()
            .all(|m| m.id == config.node_id);
    if restarted_mid_change.is_some() || lone_joiner {
        node.wait_for_cluster(restarted_mid_change);
    }
    let keys = node.rebuild_trees()?;
    tracing::info!(keys, "merkle trees rebuilt from storage");

    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;

    // Room above the value limit so an oversized value reaches the handler and gets a clear
    // INVALID_ARGUMENT; far larger messages are cut off by the transport (OUT_OF_RANGE).
    let max_message = 4 * raw.limits.max_value_bytes + raw.limits.max_key_bytes + 64 * 1024;
    let kv = KvServer::new(KvService::new(node.clone()))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES);
    let replica = ReplicaServer::new(ReplicaService::new(node.clone()))
        .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES);
    let rebalance = Arc::new(crate::rebalance::Rebalance::default());
    let admin = AdminServer::new(AdminService::new(node.clone(), rebalance.clone()));

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let tls_watch = tls
        .as_ref()
        .map(|t| tokio::spawn(t.clone().watch(stop_rx.clone())));
    let auth = crate::auth::AuthLayer::new(crate::auth::AuthSettings {
        required: config.auth_required,
        tokens: Arc::new(crate::auth::Tokens::new(
            raw.auth
                .tokens
                .iter()
                .map(|t| (t.name.as_str(), t.role.as_str(), t.sha256.as_str())),
        )),
        outcomes: metrics.auth_requests.clone(),
    });
    let metrics_task = metrics_listener.map(|listener| {
        let node = node.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(crate::metrics::serve(
            listener,
            metrics.clone(),
            Arc::new(move || {
                let stats = node.store.stats();
                node.metrics.keys_stored.set(stats.keys as i64);
                node.metrics.bytes_stored.set(stats.bytes as i64);
                node.metrics
                    .observe_gossip(&node.gossip.snapshot(), &node.gossip.stats());
                node.metrics.observe_peers(&node.peers.stats());
                node.metrics
                    .peers_without_write_ids
                    .set(node.peers.without_write_ids().len() as i64);
            }),
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        ))
    });

    let background = [
        tokio::spawn(crate::antientropy::run(node.clone(), stop_rx.clone())),
        tokio::spawn(crate::hints::run(node.clone(), stop_rx.clone())),
        tokio::spawn(crate::gc::run(node.clone(), stop_rx.clone())),
        tokio::spawn(crate::node::follow_gossip(node.clone(), stop_rx.clone())),
        tokio::spawn(crate::rebalance::run(
            node.clone(),
            rebalance.clone(),
            stop_rx.clone(),
        )),
    ];

    // Storage is open and the node is in its ring: serve.
    health.set_serving::<KvServer<KvService>>().await;
    health.set_service_status("", ServingStatus::Serving).await;
    metrics
        .serving
        .store(true, std::sync::atomic::Ordering::Release);
    tracing::info!(
        node = %config.node_id,
        cluster = %raw.cluster_id,
        listen = %raw.listen,
        ring_version = format!("{:016x}", node.view().ring.version()),
        members = node.view().members.len(),
        "node serving"
    );

    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .max_concurrent_streams(Some(
            raw.limits.max_streams_per_connection.min(u32::MAX as usize) as u32,
        ))
        // Streams a client resets before this server accepted them (a caller's timeout on a busy
        // node) count toward h2's rapid-reset guard; past the limit the whole connection is
        // closed with GOAWAY, taking every peer stream on it along. h2's default of 20 was
        // reached within seconds on a loaded two-core machine, breaking handoff and
        // anti-entropy streams over and over; 1,024 keeps the guard and stops the churn.
        .http2_max_pending_accept_reset_streams(Some(1024))
        .timeout(Duration::from_millis(
            raw.limits.max_request_timeout_ms + 5_000,
        ))
        .initial_stream_window_size(Some(4 * 1024 * 1024))
        .initial_connection_window_size(Some(16 * 1024 * 1024))
        .layer(auth)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(kv)
        .add_service(replica)
        .add_service(gossip.service)
        .add_service(admin);
    // Peers keep long-lived replica streams open, so a graceful shutdown that waits for every
    // connection to close would wait for them forever: give in-flight requests a grace period,
    // then drop what is left.
    let (signal_tx, signal_rx) = tokio::sync::watch::channel(false);
    let serving = metrics.serving.clone();
    tokio::spawn(async move {
        shutdown.await;
        // Not ready from the first moment of the stop, grace period included.
        serving.store(false, std::sync::atomic::Ordering::Release);
        let _ = signal_tx.send(true);
    });
    let mut graceful = signal_rx.clone();
    let mut hard = signal_rx;
    let incoming = crate::accept::incoming(
        incoming,
        tls,
        AcceptLimits {
            max_connections: raw.limits.max_connections,
            max_handshakes: raw.limits.max_handshakes,
            handshake_timeout: Duration::from_millis(raw.limits.handshake_timeout_ms),
        },
        metrics.accept.clone(),
    );
    let serving = server.serve_with_incoming_shutdown(incoming, async move {
        let _ = graceful.wait_for(|s| *s).await;
    });
    let result = tokio::select! {
        biased;
        r = serving => r,
        _ = async {
            let _ = hard.wait_for(|s| *s).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::info!("closing the connections still open after the grace period");
            Ok(())
        }
    };
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    metrics
        .serving
        .store(false, std::sync::atomic::Ordering::Release);
    // Tell a few members this node is going, so the cluster routes around it at once instead
    // of after the suspicion timeout.
    let _ = tokio::time::timeout(Duration::from_millis(500), node.gossip.leave()).await;
    if node.stop_writes(Duration::from_secs(5)).await {
        if let Err(e) = crate::node::record_clean_stop(&node.store).await {
            tracing::warn!(error = %e, "could not record the clean stop");
        }
    } else {
        tracing::warn!("writes still committing at stop: the next start takes a new dot id");
    }
    let _ = stop_tx.send(true);
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    if let Some(t) = tls_watch {
        let _ = t.await;
    }
    for t in background {
        let _ = t.await;
    }
    tracing::info!(node = %config.node_id, "node stopped");
    result.map_err(ServeError::from)
}
