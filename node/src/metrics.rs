//! Prometheus metrics of a node and the HTTP endpoint that serves them (`GET /metrics`).
//!
//! Names follow Prometheus conventions: `dynakv_` prefix, `_total` for counters, `_seconds` and
//! `_bytes` units last. Label values come from fixed sets (error variant labels), never from
//! free text, so cardinality stays bounded.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;

use crate::storage::StoreMetrics;

/// Counters of the gossip shell, exported at scrape time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GossipStats {
    pub packets_received: u64,
    pub packets_rejected: u64,
    pub packets_sent: u64,
    /// Sends that failed (unreachable peer, timeout): expected while a peer is down.
    pub send_failures: u64,
    /// Packets dropped because too many sends were in flight or the inbound queue was full.
    pub packets_dropped: u64,
    pub suspicions_raised: u64,
    pub downs_declared: u64,
    pub rejoins: u64,
}

/// Every metric of one node, registered in its own registry (so tests can run many nodes in one
/// process).
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Client request latency by op (put/get/delete), consistency (one/quorum/all/<n>) and
    /// outcome (ok or an error label).
    pub request_seconds: HistogramVec,
    /// Quorums not reached, by op and reason.
    pub quorum_failures: IntCounterVec,
    /// Replicas sent the merged state after a read found them behind.
    pub read_repairs: IntCounter,
    /// Requests forwarded: writes to a replica of the key, reads by a node of weight 0.
    pub forwarded: IntCounter,
    /// Hedged requests (a second replica asked because the first was slow or silent), by kind
    /// (`read`, `write`, `forward_read`) and outcome (`sent`, `won`: the hedge answered first).
    pub hedges: IntCounterVec,
    /// Requests refused at once because too few replicas were reachable, by op.
    pub fast_unavailable: IntCounterVec,
    /// Calls checked against the node's auth settings, by outcome (`ok`, `unauthenticated`,
    /// `permission_denied`). Nothing is counted on a node that does not require auth.
    pub auth_requests: IntCounterVec,
    /// `dynakv_connections_refused_total{reason}` and `dynakv_connections_open`.
    pub accept: crate::accept::AcceptMetrics,
    /// Whether the gRPC port serves (what `/readyz` answers): set once storage is open and the
    /// node is in its ring, cleared when it starts to stop.
    pub serving: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Per peer: smoothed round trip of replica calls and forwards (seconds), the hedge delay in
    /// use (seconds), and whether the peer is silent (1) to this node (set at scrape time).
    pub peer_rtt: GaugeVec,
    pub peer_hedge_delay: GaugeVec,
    pub peer_silent: IntGaugeVec,
    pub peers_without_write_ids: IntGauge,
    /// Replica operations served to peers, by op and outcome.
    pub replica_ops: IntCounterVec,
    /// Live siblings returned per read.
    pub siblings_per_read: Histogram,
    /// Writes that left a key with more siblings than `limits.sibling_warn`.
    pub sibling_warnings: IntCounter,
    /// Keys and bytes in the data table.
    pub keys_stored: IntGauge,
    pub bytes_stored: IntGauge,
    /// Low 52 bits of the ring version digest (the full value is in `dynakv_ring_info`).
    pub ring_version: IntGauge,
    pub ring_info: IntGaugeVec,
    pub store: StoreMetrics,
    /// Anti-entropy exchanges by outcome.
    pub ae_exchanges: IntCounterVec,
    pub ae_keys_repaired: IntCounter,
    pub ae_bytes_sent: IntCounter,
    /// Duration of the last complete round over every peer.
    pub ae_last_cycle_seconds: prometheus::Gauge,
    pub hints_stored: IntCounter,
    pub hints_delivered: IntCounter,
    /// Hints dropped, by reason (full, expired).
    pub hints_dropped: IntCounterVec,
    /// Hints queued per target.
    pub hint_queue_depth: IntGaugeVec,
    /// Tombstones purged by GC after every replica held them and the grace period passed.
    pub tombstones_purged: IntCounter,
    /// Members by liveness as this node's gossip sees them (this node included).
    pub gossip_members: IntGaugeVec,
    /// Gossip packets by what happened to them (received, rejected, sent, send_failed, dropped).
    pub gossip_packets: IntCounterVec,
    /// Members this node suspected, and declared down.
    pub gossip_suspicions: IntCounter,
    pub gossip_downs: IntCounter,
    pub gossip_rejoins: IntCounter,
    /// Rings writes go to (1 when settled, 2 or more while the ring changes).
    pub ring_versions_live: IntGauge,
    /// Keys and bytes streamed by ring-change handoffs, by direction (sent, received).
    pub handoff_keys: IntCounterVec,
    pub handoff_bytes: IntCounterVec,
    /// Ranges this node is to receive in the change under way, by state (pending, done).
    pub handoff_ranges: IntGaugeVec,
    /// Per-range transfer failures (each is retried, resuming where it stopped), by reason.
    pub handoff_failures: IntCounterVec,
    /// Keys found different (and fetched) by the Merkle catch-up after a range's stream.
    pub handoff_caught_up: IntCounter,
    /// Time from a change's start (as this node saw it) to its handoff being complete here.
    pub handoff_seconds: Histogram,
    /// Ring changes this node committed (its own, or removals it proposed), by kind.
    pub ring_changes: IntCounterVec,
    /// Keys dropped after a committed change left this node holding them in no live ring.
    pub handoff_dropped_keys: IntCounter,
    /// The gossip counters already exported (they are read from gossip at scrape time).
    gossip_exported: Arc<std::sync::Mutex<GossipStats>>,
}

fn latency_buckets() -> Vec<f64> {
    vec![
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0,
    ]
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let request_seconds = HistogramVec::new(
            HistogramOpts::new(
                "dynakv_request_duration_seconds",
                "Client request latency by operation, consistency and outcome",
            )
            .buckets(latency_buckets()),
            &["op", "consistency", "outcome"],
        )
        .expect("static metric definition");
        let quorum_failures = IntCounterVec::new(
            Opts::new(
                "dynakv_quorum_failures_total",
                "Requests that did not reach their quorum, by operation and reason",
            ),
            &["op", "reason"],
        )
        .expect("static metric definition");
        let read_repairs = IntCounter::new(
            "dynakv_read_repairs_total",
            "Replicas sent the merged state after a read found them behind",
        )
        .expect("static metric definition");
        let forwarded = IntCounter::new(
            "dynakv_forwarded_requests_total",
            "Client writes forwarded to a replica of the key",
        )
        .expect("static metric definition");
        let replica_ops = IntCounterVec::new(
            Opts::new(
                "dynakv_replica_operations_total",
                "Replica operations served to peers, by operation and outcome",
            ),
            &["op", "outcome"],
        )
        .expect("static metric definition");
        let siblings_per_read = Histogram::with_opts(
            HistogramOpts::new(
                "dynakv_siblings_per_read",
                "Live siblings returned by each read",
            )
            .buckets(vec![1.0, 2.0, 3.0, 5.0, 10.0, 25.0, 50.0, 100.0]),
        )
        .expect("static metric definition");
        let sibling_warnings = IntCounter::new(
            "dynakv_sibling_warnings_total",
            "Writes that left a key with more siblings than limits.sibling_warn",
        )
        .expect("static metric definition");
        let keys_stored = IntGauge::new("dynakv_keys_stored", "Keys held by this node")
            .expect("static metric definition");
        let bytes_stored = IntGauge::new(
            "dynakv_stored_bytes",
            "Bytes of keys and versions held by this node",
        )
        .expect("static metric definition");
        let ring_version = IntGauge::new(
            "dynakv_ring_version",
            "Low 52 bits of the digest of the ring this node uses",
        )
        .expect("static metric definition");
        let ring_info = IntGaugeVec::new(
            Opts::new("dynakv_ring_info", "The ring this node uses (value is 1)"),
            &["version"],
        )
        .expect("static metric definition");
        let store = StoreMetrics::new().expect("static metric definition");
        let counter =
            |name: &str, help: &str| IntCounter::new(name, help).expect("static metric definition");
        let ae_exchanges = IntCounterVec::new(
            Opts::new(
                "dynakv_antientropy_exchanges_total",
                "Anti-entropy exchanges with a peer, by outcome",
            ),
            &["outcome"],
        )
        .expect("static metric definition");
        let ae_keys_repaired = counter(
            "dynakv_antientropy_keys_repaired_total",
            "Keys found different by anti-entropy and synced both ways",
        );
        let ae_bytes_sent = counter(
            "dynakv_antientropy_sent_bytes_total",
            "Bytes of versions sent to peers by anti-entropy",
        );
        let ae_last_cycle_seconds = prometheus::Gauge::new(
            "dynakv_antientropy_last_cycle_duration_seconds",
            "Duration of the last complete anti-entropy round over every peer",
        )
        .expect("static metric definition");
        let hints_stored = counter(
            "dynakv_hints_stored_total",
            "Hints stored for unreachable primaries",
        );
        let hints_delivered = counter(
            "dynakv_hints_delivered_total",
            "Hints delivered to their primary and deleted",
        );
        let hints_dropped = IntCounterVec::new(
            Opts::new(
                "dynakv_hints_dropped_total",
                "Hints not stored (queue full) or dropped (expired), by reason",
            ),
            &["reason"],
        )
        .expect("static metric definition");
        let hint_queue_depth = IntGaugeVec::new(
            Opts::new("dynakv_hint_queue_depth", "Hints held for each target"),
            &["target"],
        )
        .expect("static metric definition");
        let tombstones_purged = counter(
            "dynakv_tombstones_purged_total",
            "Tombstones purged once every replica held them and the grace period had passed",
        );
        let gossip_members = IntGaugeVec::new(
            Opts::new(
                "dynakv_gossip_members",
                "Members by liveness (alive, suspect, down) as this node's gossip sees them",
            ),
            &["state"],
        )
        .expect("static metric definition");
        let gossip_packets = IntCounterVec::new(
            Opts::new(
                "dynakv_gossip_packets_total",
                "Gossip packets by outcome (received, rejected, sent, send_failed, dropped)",
            ),
            &["outcome"],
        )
        .expect("static metric definition");
        let gossip_suspicions = counter(
            "dynakv_gossip_suspicions_total",
            "Members this node's gossip suspected of having failed",
        );
        let gossip_downs = counter(
            "dynakv_gossip_downs_total",
            "Members this node's gossip declared down",
        );
        let gossip_rejoins = counter(
            "dynakv_gossip_rejoins_total",
            "Times this node renewed its gossip identity because the cluster had declared it down",
        );
        let ring_versions_live = IntGauge::new(
            "dynakv_ring_versions_live",
            "Rings writes go to: 1 when the ring is settled, more while it changes",
        )
        .expect("static metric definition");
        let handoff_keys = IntCounterVec::new(
            Opts::new(
                "dynakv_handoff_keys_total",
                "Keys streamed by ring-change handoffs, by direction (sent, received)",
            ),
            &["direction"],
        )
        .expect("static metric definition");
        let handoff_bytes = IntCounterVec::new(
            Opts::new(
                "dynakv_handoff_bytes_total",
                "Bytes of versions streamed by ring-change handoffs, by direction",
            ),
            &["direction"],
        )
        .expect("static metric definition");
        let hedges = IntCounterVec::new(
            Opts::new(
                "dynakv_hedged_requests_total",
                "Hedged requests (another replica asked because the first was slow or silent), \
                 by kind (read, write, forward_read, forward_write) and outcome (sent, won)",
            ),
            &["kind", "outcome"],
        )
        .expect("static metric definition");
        let fast_unavailable = IntCounterVec::new(
            Opts::new(
                "dynakv_fast_unavailable_total",
                "Requests answered UNAVAILABLE without waiting out their deadline, by op: read and \
                 write (too few replicas reachable), forward (the replica coordinating a \
                 forwarded write went silent)",
            ),
            &["op"],
        )
        .expect("static metric definition");
        let auth_requests = IntCounterVec::new(
            Opts::new(
                "dynakv_auth_requests_total",
                "Calls checked for credentials, by outcome (ok, unauthenticated, permission_denied)",
            ),
            &["outcome"],
        )
        .expect("static metric definition");
        let accept = crate::accept::AcceptMetrics {
            refused: IntCounterVec::new(
                Opts::new(
                    "dynakv_connections_refused_total",
                    "Connections closed before serving, by reason (limit, handshakes, timeout, \
                     tls, preface)",
                ),
                &["reason"],
            )
            .expect("static metric definition"),
            open: IntGauge::new(
                "dynakv_connections_open",
                "Connections open on the gRPC port (clients and peers)",
            )
            .expect("static metric definition"),
        };
        let peer_rtt = GaugeVec::new(
            Opts::new(
                "dynakv_peer_rtt_seconds",
                "Smoothed round trip of requests to each peer",
            ),
            &["peer"],
        )
        .expect("static metric definition");
        let peer_hedge_delay = GaugeVec::new(
            Opts::new(
                "dynakv_peer_hedge_delay_seconds",
                "Delay after which a request to each peer is hedged (its recent high percentile)",
            ),
            &["peer"],
        )
        .expect("static metric definition");
        let peers_without_write_ids = IntGauge::new(
            "dynakv_peers_without_write_ids",
            "Peers known to lack write ids (older versions, or replication.write_ids false): \
             while above 0 forwarded writes go without them, and are not hedged or retried",
        )
        .expect("static metric definition");
        let peer_silent = IntGaugeVec::new(
            Opts::new(
                "dynakv_peer_silent",
                "1 while a peer has left a request unanswered too long (before gossip notices)",
            ),
            &["peer"],
        )
        .expect("static metric definition");
        let handoff_ranges = IntGaugeVec::new(
            Opts::new(
                "dynakv_handoff_ranges",
                "Ranges this node receives in the ring change under way, by state (pending, done)",
            ),
            &["state"],
        )
        .expect("static metric definition");
        let handoff_failures = IntCounterVec::new(
            Opts::new(
                "dynakv_handoff_failures_total",
                "Range transfers that failed and were retried, by reason",
            ),
            &["reason"],
        )
        .expect("static metric definition");
        let handoff_caught_up = counter(
            "dynakv_handoff_caught_up_keys_total",
            "Keys the Merkle catch-up after a range's stream found different and fetched",
        );
        let handoff_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "dynakv_handoff_duration_seconds",
                "Time from a ring change's start to this node holding every range it gains",
            )
            .buckets(vec![
                0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0,
            ]),
        )
        .expect("static metric definition");
        let ring_changes = IntCounterVec::new(
            Opts::new(
                "dynakv_ring_changes_committed_total",
                "Ring changes this node committed, by kind (weight, leave, remove)",
            ),
            &["kind"],
        )
        .expect("static metric definition");
        let handoff_dropped_keys = counter(
            "dynakv_handoff_dropped_keys_total",
            "Keys dropped once a committed change left this node holding them in no live ring",
        );
        let m = Metrics {
            ring_versions_live,
            handoff_keys,
            handoff_bytes,
            handoff_ranges,
            handoff_failures,
            handoff_caught_up,
            handoff_seconds,
            ring_changes,
            handoff_dropped_keys,
            gossip_members,
            gossip_packets,
            gossip_suspicions,
            gossip_downs,
            gossip_rejoins,
            gossip_exported: Default::default(),
            tombstones_purged,
            ae_exchanges,
            ae_keys_repaired,
            ae_bytes_sent,
            ae_last_cycle_seconds,
            hints_stored,
            hints_delivered,
            hints_dropped,
            hint_queue_depth,
            registry,
            request_seconds,
            quorum_failures,
            read_repairs,
            forwarded,
            hedges,
            fast_unavailable,
            auth_requests,
            accept,
            serving: Default::default(),
            peer_rtt,
            peer_hedge_delay,
            peer_silent,
            peers_without_write_ids,
            replica_ops,
            siblings_per_read,
            sibling_warnings,
            keys_stored,
            bytes_stored,
            ring_version,
            ring_info,
            store,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.request_seconds.clone()),
            Box::new(m.quorum_failures.clone()),
            Box::new(m.read_repairs.clone()),
            Box::new(m.forwarded.clone()),
            Box::new(m.hedges.clone()),
            Box::new(m.fast_unavailable.clone()),
            Box::new(m.auth_requests.clone()),
            Box::new(m.accept.refused.clone()),
            Box::new(m.accept.open.clone()),
            Box::new(m.peer_rtt.clone()),
            Box::new(m.peer_hedge_delay.clone()),
            Box::new(m.peer_silent.clone()),
            Box::new(m.peers_without_write_ids.clone()),
            Box::new(m.replica_ops.clone()),
            Box::new(m.siblings_per_read.clone()),
            Box::new(m.sibling_warnings.clone()),
            Box::new(m.keys_stored.clone()),
            Box::new(m.bytes_stored.clone()),
            Box::new(m.ring_version.clone()),
            Box::new(m.ring_info.clone()),
            Box::new(m.ae_exchanges.clone()),
            Box::new(m.ae_keys_repaired.clone()),
            Box::new(m.ae_bytes_sent.clone()),
            Box::new(m.ae_last_cycle_seconds.clone()),
            Box::new(m.hints_stored.clone()),
            Box::new(m.hints_delivered.clone()),
            Box::new(m.hints_dropped.clone()),
            Box::new(m.hint_queue_depth.clone()),
            Box::new(m.tombstones_purged.clone()),
            Box::new(m.gossip_members.clone()),
            Box::new(m.gossip_packets.clone()),
            Box::new(m.gossip_suspicions.clone()),
            Box::new(m.gossip_downs.clone()),
            Box::new(m.gossip_rejoins.clone()),
            Box::new(m.ring_versions_live.clone()),
            Box::new(m.handoff_keys.clone()),
            Box::new(m.handoff_bytes.clone()),
            Box::new(m.handoff_ranges.clone()),
            Box::new(m.handoff_failures.clone()),
            Box::new(m.handoff_caught_up.clone()),
            Box::new(m.handoff_seconds.clone()),
            Box::new(m.ring_changes.clone()),
            Box::new(m.handoff_dropped_keys.clone()),
        ];
        for c in collectors {
            m.registry
                .register(c)
                .expect("metric names are unique within a node registry");
        }
        m.store
            .register(&m.registry)
            .expect("metric names are unique within a node registry");
        m
    }

    /// Records the ring in use.
    pub fn set_ring_version(&self, version: u64) {
        self.ring_version.set((version & ((1 << 52) - 1)) as i64);
        self.ring_info.reset();
        self.ring_info
            .with_label_values(&[&format!("{version:016x}")])
            .set(1);
    }

    /// Counts one anti-entropy exchange by outcome ("ok" or the error's label).
    pub fn observe_exchange(&self, outcome: &'static str) {
        self.ae_exchanges.with_label_values(&[outcome]).inc();
    }

    /// Copies the peer links' latency and silence into the metrics (at scrape time).
    pub fn observe_peers(&self, peers: &[crate::peer::PeerStat]) {
        self.peer_rtt.reset();
        self.peer_hedge_delay.reset();
        self.peer_silent.reset();
        for p in peers {
            let id = p.peer.as_str();
            self.peer_rtt
                .with_label_values(&[id])
                .set(p.srtt.as_secs_f64());
            self.peer_hedge_delay
                .with_label_values(&[id])
                .set(p.hedge_delay.as_secs_f64());
            self.peer_silent
                .with_label_values(&[id])
                .set(i64::from(p.silent));
        }
    }

    /// Copies what gossip knows and counts into the metrics (at scrape time).
    pub fn observe_gossip(
        &self,
        snapshot: &dynakv_core::membership::MembershipSnapshot,
        stats: &GossipStats,
    ) {
        use dynakv_core::membership::MemberState;
        for state in [MemberState::Alive, MemberState::Suspect, MemberState::Down] {
            self.gossip_members
                .with_label_values(&[state.as_str()])
                .set(snapshot.count(state) as i64);
        }
        let mut seen = self
            .gossip_exported
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for (outcome, now, before) in [
            ("received", stats.packets_received, seen.packets_received),
            ("rejected", stats.packets_rejected, seen.packets_rejected),
            ("sent", stats.packets_sent, seen.packets_sent),
            ("send_failed", stats.send_failures, seen.send_failures),
            ("dropped", stats.packets_dropped, seen.packets_dropped),
        ] {
            self.gossip_packets
                .with_label_values(&[outcome])
                .inc_by(now.saturating_sub(before));
        }
        self.gossip_suspicions.inc_by(
            stats
                .suspicions_raised
                .saturating_sub(seen.suspicions_raised),
        );
        self.gossip_downs
            .inc_by(stats.downs_declared.saturating_sub(seen.downs_declared));
        self.gossip_rejoins
            .inc_by(stats.rejoins.saturating_sub(seen.rejoins));
        *seen = stats.clone();
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buf) {
            return format!("# encoding failed: {e}\n");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Serves `GET /metrics` until `shutdown` resolves. `before_scrape` refreshes gauges that are
/// cheaper to read at scrape time than to maintain (keys and bytes stored).
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    before_scrape: Arc<dyn Fn() + Send + Sync>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer): (_, SocketAddr) = tokio::select! {
            biased;
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        let before_scrape = before_scrape.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                let before_scrape = before_scrape.clone();
                async move {
                    let resp = match req.uri().path() {
                        "/metrics" => {
                            before_scrape();
                            Response::builder()
                                .header("content-type", "text/plain; version=0.0.4")
                                .body(Full::new(Bytes::from(metrics.render())))
                        }
                        "/healthz" => Response::builder().body(Full::new(Bytes::from("ok\n"))),
                        "/readyz" if metrics.serving.load(std::sync::atomic::Ordering::Acquire) => {
                            Response::builder().body(Full::new(Bytes::from("ok\n")))
                        }
                        "/readyz" => Response::builder()
                            .status(StatusCode::SERVICE_UNAVAILABLE)
                            .body(Full::new(Bytes::from("not serving\n"))),
                        _ => Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::from("try /metrics\n"))),
                    };
                    Ok::<_, Infallible>(resp.unwrap_or_else(|_| Response::new(Full::default())))
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn status(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out.lines().next().unwrap_or_default().to_string()
    }

    #[tokio::test]
    async fn readyz_follows_the_grpc_port_and_healthz_always_answers() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Metrics::new();
        let (_stop, stop) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(listener, metrics.clone(), Arc::new(|| {}), async {
            let _ = stop.await;
        }));
        assert!(status(addr, "/readyz").await.contains("503"));
        assert!(status(addr, "/healthz").await.contains("200"));
        metrics
            .serving
            .store(true, std::sync::atomic::Ordering::Release);
        assert!(status(addr, "/readyz").await.contains("200"));
    }
}
