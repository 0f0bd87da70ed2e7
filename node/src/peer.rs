//! Outgoing replica traffic: one long-lived `Replica.Exchange` stream per peer, carrying batched
//! request frames, with replies matched to callers by request id.
//!
//! A busy coordinator pays one HTTP/2 frame for many replica messages instead of one RPC each.
//! Every queue here is bounded: callers wait for room until their deadline, and a peer that
//! cannot be reached fails fast for a short back-off instead of making every caller wait for a
//! connect timeout.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dynakv_core::NodeId;
use dynakv_core::latency::{HedgeBudget, HedgePolicy, PeerHealth};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::net::Connector;
use crate::proto::replica_client::ReplicaClient;
use crate::proto::{
    ReplicaRequest, RequestFrame, ResponseFrame, replica_error, replica_request, replica_response,
};

/// Metadata keys on every peer stream and forwarded request.
pub const CLUSTER_HEADER: &str = "x-dynakv-cluster";
pub const NODE_HEADER: &str = "x-dynakv-node";

/// Response metadata of a replica stream: the optional features of the answering node,
/// comma-separated. Nodes from before it send none, and a node ignores features it does not know.
pub const FEATURES_HEADER: &str = "x-dynakv-features";

/// The feature of write ids (`dynakv_core::write_id`): the node stores and reads values and
/// contexts that carry them (encoding version 2), which a node from before them refuses.
pub const WRITE_IDS_FEATURE: &str = "write-ids";

/// What a link knows of its peer's features: nothing yet (its stream never opened), or what the
/// peer advertised when it last did.
const FEATURES_UNKNOWN: u8 = 0;
const FEATURES_NO_WRITE_IDS: u8 = 1;
const FEATURES_WRITE_IDS: u8 = 2;

/// Largest message accepted on peer connections (a clock with many siblings of 1 MiB values must fit).
pub const MAX_PEER_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// How a replica call failed. Labels are stable (metrics).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error("unreachable: {0}")]
    Unreachable(String),
    #[error("no reply before the deadline")]
    Timeout,
    #[error("refused: {0}")]
    Refused(String),
    #[error("unknown peer {0}")]
    UnknownPeer(NodeId),
}

impl PeerError {
    pub fn as_replica_failure(&self) -> dynakv_core::quorum::ReplicaFailure {
        use dynakv_core::quorum::ReplicaFailure;
        match self {
            PeerError::Unreachable(_) | PeerError::UnknownPeer(_) => ReplicaFailure::Unreachable,
            PeerError::Timeout => ReplicaFailure::Timeout,
            PeerError::Refused(_) => ReplicaFailure::Refused,
        }
    }
}

/// Settings of the peer links.
#[derive(Debug, Clone)]
pub struct PeerSettings {
    pub self_id: NodeId,
    pub cluster_id: String,
    pub queue_len: usize,
    pub max_frame_messages: usize,
    pub connect_timeout: Duration,
    /// How long a peer that could not be reached fails calls at once before the next attempt.
    pub backoff: Duration,
}

type Reply = oneshot::Sender<Result<replica_response::Result, PeerError>>;

struct Outgoing {
    op: replica_request::Op,
    timeout_ms: u32,
    reply: Reply,
    /// Sent only to open the stream ([`PeerPool::nudge`]): nobody waits for its answer.
    probe: bool,
}

struct Link {
    address: String,
    tx: mpsc::Sender<Outgoing>,
    channel: Channel,
    /// `FEATURES_*`, set by the link's task each time the stream opens.
    features: Arc<AtomicU8>,
}

/// The links to every peer. Cheap to clone.
#[derive(Clone)]
pub struct PeerPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    settings: PeerSettings,
    connector: Connector,
    links: Mutex<BTreeMap<NodeId, Link>>,
    /// Latency and silence of each peer, from replica calls and forwarded requests alike.
    health: Mutex<Health>,
}

struct Health {
    epoch: Instant,
    policy: HedgePolicy,
    peers: BTreeMap<NodeId, PeerHealth>,
    budget: HedgeBudget,
}

impl Health {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

/// One peer's latency figures, for the metrics.
#[derive(Debug, Clone)]
pub struct PeerStat {
    pub peer: NodeId,
    pub srtt: Duration,
    pub hedge_delay: Duration,
    pub silent: bool,
}

/// One request to a peer in flight, for its latency and silence bookkeeping: [`Tracked::heard`]
/// when the peer answered (whatever the answer); dropped unheard, it counts as unanswered.
pub struct Tracked {
    pool: Arc<PoolInner>,
    peer: NodeId,
    sent: Instant,
    done: bool,
}

impl Tracked {
    /// The peer answered.
    pub fn heard(mut self) {
        self.done = true;
        let rtt_us = self.sent.elapsed().as_micros() as u64;
        let mut h = self.pool.health.lock().unwrap_or_else(|p| p.into_inner());
        let now = h.now_ms();
        h.peers
            .entry(self.peer.clone())
            .or_default()
            .heard(now, rtt_us);
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut h = self.pool.health.lock().unwrap_or_else(|p| p.into_inner());
        let (now, policy) = (h.now_ms(), h.policy);
        h.peers
            .entry(self.peer.clone())
            .or_default()
            .unanswered(now, &policy);
    }
}

impl PeerPool {
    pub fn new(settings: PeerSettings, connector: Connector) -> PeerPool {
        PeerPool {
            inner: Arc::new(PoolInner {
                settings,
                connector,
                links: Mutex::new(BTreeMap::new()),
                health: Mutex::new(Health {
                    epoch: Instant::now(),
                    policy: HedgePolicy::default(),
                    peers: BTreeMap::new(),
                    budget: HedgeBudget::default(),
                }),
            }),
        }
    }

    /// Starts the bookkeeping of one request to `peer` (see [`Tracked`]).
    pub fn track(&self, peer: &NodeId) -> Tracked {
        let mut h = self.inner.health.lock().unwrap_or_else(|p| p.into_inner());
        let now = h.now_ms();
        h.peers.entry(peer.clone()).or_default().sent(now);
        Tracked {
            pool: self.inner.clone(),
            peer: peer.clone(),
            sent: Instant::now(),
            done: false,
        }
    }

    /// Whether `peer` left a request unanswered too long, with nothing heard since: a paused
    /// process or a cut-off link, seconds before gossip calls it down.
    pub fn is_silent(&self, peer: &NodeId) -> bool {
        let h = self.inner.health.lock().unwrap_or_else(|p| p.into_inner());
        let now = h.now_ms();
        h.peers
            .get(peer)
            .is_some_and(|p| p.is_silent(now, &h.policy))
    }

    /// How long to wait for `peer` before asking another replica too: its recent high
    /// percentile of response time, within the policy's bounds.
    pub fn hedge_delay(&self, peer: &NodeId) -> Duration {
        let h = self.inner.health.lock().unwrap_or_else(|p| p.into_inner());
        let ms = h
            .peers
            .get(peer)
            .map_or(h.policy.max_delay_ms, |p| p.hedge_delay_ms(&h.policy));
        Duration::from_millis(ms)
    }

    /// Sorts `peers` by how long a request sent now is expected to wait for each (see
    /// `PeerHealth::expected_wait_us`), keeping the given order among equals.
    pub fn sort_by_expected_wait(&self, peers: &mut [NodeId]) {
        let h = self.inner.health.lock().unwrap_or_else(|p| p.into_inner());
        let now = h.now_ms();
        let never_heard = PeerHealth::default();
        peers.sort_by_cached_key(|peer| {
            h.peers
                .get(peer)
                .unwrap_or(&never_heard)
                .expected_wait_us(now, &h.policy)
        });
    }

    /// Counts one request that may be hedged, earning its share of the hedge budget.
    pub fn earn_hedge(&self) {
        let mut h = self.inner.health.lock().unwrap_or_else(|p| p.into_inner());
        let policy = h.policy;
        h.budget.earn(&policy);
    }

    /// Takes one hedge from the budget, if it has one.
    pub fn try_hedge(&self) -> bool {
        let mut h = self.inner.health.lock().unwrap_or_else(|p| p.into_inner());
        h.budget.try_spend()
    }

    /// Every tracked peer's latency figures.
    pub fn stats(&self) -> Vec<PeerStat> {
        let h = self.inner.health.lock().unwrap_or_else(|p| p.into_inner());
        let now = h.now_ms();
        h.peers
            .iter()
            .map(|(peer, p)| PeerStat {
                peer: peer.clone(),
                srtt: Duration::from_micros(p.rtt().srtt_us()),
                hedge_delay: Duration::from_millis(p.hedge_delay_ms(&h.policy)),
                silent: p.is_silent(now, &h.policy),
            })
            .collect()
    }

    /// Makes the pool match the membership: new peers get a link, moved peers a new one, removed
    /// peers lose theirs (their link task ends when the last sender is dropped).
    pub fn set_members(&self, members: &[(NodeId, String)]) {
        let mut links = self.inner.links.lock().unwrap_or_else(|p| p.into_inner());
        links.retain(|id, link| {
            members
                .iter()
                .any(|(m, addr)| m == id && *addr == link.address)
        });
        for (id, address) in members {
            if *id == self.inner.settings.self_id || links.contains_key(id) {
                continue;
            }
            let channel = self.inner.connector.channel_to_node(address, id.as_str());
            let (tx, rx) = mpsc::channel(self.inner.settings.queue_len);
            let features = Arc::new(AtomicU8::new(FEATURES_UNKNOWN));
            tokio::spawn(link_task(
                self.inner.settings.clone(),
                id.clone(),
                channel.clone(),
                rx,
                features.clone(),
            ));
            self.nudge(&tx);
            links.insert(
                id.clone(),
                Link {
                    address: address.clone(),
                    tx,
                    channel,
                    features,
                },
            );
        }
    }

    /// Has the link to `peer` (re)open its stream if it is not open, and so learn what the
    /// peer advertises now: called when gossip sees it restart or come back.
    pub fn reprobe(&self, peer: &NodeId) {
        let links = self.inner.links.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(link) = links.get(peer) {
            self.nudge(&link.tx);
        }
    }

    /// Queues a read of the empty key that nobody waits for: it opens the link's stream if it
    /// is not open, so the peer's features are known before a write needs them, even from a
    /// peer this node would not otherwise call. Dropped when the queue is full. It is tried
    /// during a back-off, and its failure to open the stream (a peer not up yet) starts none:
    /// the next real call tries again.
    fn nudge(&self, tx: &mpsc::Sender<Outgoing>) {
        let (reply, _) = oneshot::channel();
        let _ = tx.try_send(Outgoing {
            op: replica_request::Op::Fetch(crate::proto::FetchRequest::default()),
            timeout_ms: self.inner.settings.connect_timeout.as_millis() as u32,
            reply,
            probe: true,
        });
    }

    /// Peers known to lack write ids: their replica stream last opened without advertising
    /// them (a node of an older version, or with `replication.write_ids: false`). A peer whose
    /// stream has not opened yet is not counted (its link opens it as soon as it is added).
    pub fn without_write_ids(&self) -> Vec<NodeId> {
        let links = self.inner.links.lock().unwrap_or_else(|p| p.into_inner());
        links
            .iter()
            .filter(|(_, link)| link.features.load(Ordering::Relaxed) == FEATURES_NO_WRITE_IDS)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The gRPC channel to a peer (for forwarded client requests).
    pub fn channel(&self, node: &NodeId) -> Option<Channel> {
        let links = self.inner.links.lock().unwrap_or_else(|p| p.into_inner());
        links.get(node).map(|l| l.channel.clone())
    }

    /// Sends one replica operation and waits for its reply until `deadline`.
    pub async fn call(
        &self,
        node: &NodeId,
        op: replica_request::Op,
        deadline: Instant,
    ) -> Result<replica_response::Result, PeerError> {
        let tx = {
            let links = self.inner.links.lock().unwrap_or_else(|p| p.into_inner());
            match links.get(node) {
                Some(l) => l.tx.clone(),
                None => return Err(PeerError::UnknownPeer(node.clone())),
            }
        };
        let timeout_ms = deadline
            .saturating_duration_since(Instant::now())
            .as_millis()
            .min(u32::MAX as u128) as u32;
        let (reply, rx) = oneshot::channel();
        let msg = Outgoing {
            op,
            timeout_ms,
            reply,
            probe: false,
        };
        let tracked = self.track(node);
        match tokio::time::timeout_at(deadline, tx.send(msg)).await {
            Err(_) => return Err(PeerError::Timeout),
            Ok(Err(_)) => return Err(PeerError::Unreachable("link closed".into())),
            Ok(Ok(())) => {}
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Err(_) => Err(PeerError::Timeout),
            Ok(Err(_)) => Err(PeerError::Unreachable("link dropped the request".into())),
            Ok(Ok(r)) => {
                // An answer from the peer (an error it sent included) means it is there; a
                // failure of the link itself does not.
                if !matches!(r, Err(PeerError::Unreachable(_))) {
                    tracked.heard();
                }
                r
            }
        }
    }
}

type Pending = Arc<Mutex<BTreeMap<u64, Reply>>>;

/// Owns the stream to one peer: connects on demand, batches outgoing requests into frames, and
/// reconnects after a failure (failing calls at once during a short back-off).
async fn link_task(
    settings: PeerSettings,
    peer: NodeId,
    channel: Channel,
    mut rx: mpsc::Receiver<Outgoing>,
    features: Arc<AtomicU8>,
) {
    let mut next_id: u64 = 1;
    let mut backoff_until: Option<Instant> = None;
    loop {
        let Some(first) = rx.recv().await else {
            return;
        };
        // A probe tries even during the back-off: it is sent when gossip sees the peer back.
        if !first.probe && backoff_until.is_some_and(|until| Instant::now() < until) {
            fail(first, &peer, "unreachable (retrying shortly)");
            continue;
        }
        let (frame_tx, frame_rx) = mpsc::channel::<RequestFrame>(64);
        let mut request = tonic::Request::new(ReceiverStream::new(frame_rx));
        if let (Ok(c), Ok(n)) = (
            MetadataValue::try_from(settings.cluster_id.as_str()),
            MetadataValue::try_from(settings.self_id.as_str()),
        ) {
            request.metadata_mut().insert(CLUSTER_HEADER, c);
            request.metadata_mut().insert(NODE_HEADER, n);
        }
        let mut client = ReplicaClient::new(channel.clone())
            .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES);
        let opened = tokio::time::timeout(settings.connect_timeout, client.exchange(request)).await;
        let inbound = match opened {
            Ok(Ok(resp)) => {
                let advertised = resp
                    .metadata()
                    .get(FEATURES_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.split(',').any(|f| f.trim() == WRITE_IDS_FEATURE));
                let known = if advertised {
                    FEATURES_WRITE_IDS
                } else {
                    FEATURES_NO_WRITE_IDS
                };
                if features.swap(known, Ordering::Relaxed) != known && !advertised {
                    tracing::info!(
                        %peer,
                        "peer does not advertise write ids: forwarded writes go without them \
                         (no hedge or retry once sent) while it is a member"
                    );
                }
                resp.into_inner()
            }
            Ok(Err(status)) => {
                tracing::debug!(%peer, error = %status.message(), "peer stream refused");
                if !first.probe {
                    backoff_until = Some(Instant::now() + settings.backoff);
                }
                fail(first, &peer, status.message());
                continue;
            }
            Err(_) => {
                tracing::debug!(%peer, "peer connect timed out");
                if !first.probe {
                    backoff_until = Some(Instant::now() + settings.backoff);
                }
                fail(first, &peer, "connect timed out");
                continue;
            }
        };
        let pending: Pending = Arc::new(Mutex::new(BTreeMap::new()));
        let (closed_tx, mut closed_rx) = oneshot::channel::<()>();
        tokio::spawn(read_replies(inbound, pending.clone(), closed_tx));

        let mut batch = vec![first];
        let mut sweep = tokio::time::interval(Duration::from_secs(1));
        'connected: loop {
            while batch.len() < settings.max_frame_messages {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                let mut frame = RequestFrame {
                    requests: Vec::with_capacity(batch.len()),
                };
                {
                    let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
                    for m in batch.drain(..) {
                        let id = next_id;
                        next_id += 1;
                        p.insert(id, m.reply);
                        frame.requests.push(ReplicaRequest {
                            id,
                            timeout_ms: m.timeout_ms,
                            op: Some(m.op),
                        });
                    }
                }
                tokio::select! {
                    biased;
                    sent = frame_tx.send(frame) => if sent.is_err() { break 'connected; },
                    _ = &mut closed_rx => break 'connected,
                }
            }
            tokio::select! {
                biased;
                m = rx.recv() => match m {
                    Some(m) => batch.push(m),
                    None => return,
                },
                _ = &mut closed_rx => break 'connected,
                _ = sweep.tick() => {
                    // Callers that gave up (deadline) leave entries behind; drop them.
                    let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
                    p.retain(|_, reply| !reply.is_closed());
                }
            }
        }
        let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
        for (_, reply) in std::mem::take(&mut *p) {
            let _ = reply.send(Err(PeerError::Unreachable(format!(
                "stream to {peer} broke"
            ))));
        }
        backoff_until = Some(Instant::now() + settings.backoff);
    }
}

fn fail(msg: Outgoing, peer: &NodeId, why: &str) {
    let _ = msg
        .reply
        .send(Err(PeerError::Unreachable(format!("{peer}: {why}"))));
}

async fn read_replies(
    mut inbound: tonic::Streaming<ResponseFrame>,
    pending: Pending,
    closed: oneshot::Sender<()>,
) {
    while let Ok(Some(frame)) = inbound.message().await {
        let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
        for r in frame.responses {
            let Some(reply) = p.remove(&r.id) else {
                continue;
            };
            let result = match r.result {
                Some(replica_response::Result::Error(e)) => {
                    Err(match replica_error::Kind::try_from(e.kind) {
                        Ok(replica_error::Kind::Timeout) => PeerError::Timeout,
                        _ => PeerError::Refused(e.message),
                    })
                }
                Some(ok) => Ok(ok),
                None => Err(PeerError::Refused("empty reply".into())),
            };
            let _ = reply.send(result);
        }
    }
    let _ = closed.send(());
}
