//! Gossip membership in the node: drives the pure [`dynakv_core::membership`] engine with tokio
//! time (only `tokio::time`, so it runs on turmoil's simulated clock too) and carries its
//! packets over gRPC (`dynakv.v1.Gossip`), one unary call per packet, on channels from the
//! [`Connector`] (real TCP, or the simulator's).
//!
//! One task owns the engine. It takes packets from the gRPC service, commands from [`Gossip`]
//! handles and its own due timers, and executes the engine's effects: a send becomes a short
//! task of its own (at most [`MAX_SENDS_IN_FLIGHT`]; a send that cannot start is dropped, as a
//! datagram would be: SWIM expects loss), a timer goes into a deadline set the task sleeps on,
//! and a new snapshot is published on a `watch` channel, from which the node builds its
//! ring and the coordinator reads liveness ([`Gossip::state_of`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use dynakv_core::NodeId;
use dynakv_core::membership::{
    Effect, GossipConfig, LocalNode, MemberState, Membership, MembershipError, MembershipSnapshot,
    NodeMetadata, TimerToken,
};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::net::Connector;
use crate::proto::gossip_client::GossipClient;
use crate::proto::gossip_server::{Gossip as GossipRpc, GossipServer};
use crate::proto::{
    GossipAck, GossipMember, GossipMembersRequest, GossipMembersResponse, GossipPacket,
};

pub use crate::config::GossipOptions;

/// Gossip packets being sent at once, at most; more are dropped (and counted).
pub const MAX_SENDS_IN_FLIGHT: usize = 512;

/// Received packets waiting for the engine, at most; more are dropped (and counted).
pub const INBOUND_QUEUE_LEN: usize = 1024;

/// What gossip needs to start, all validated by the caller except the engine settings
/// (checked by [`Gossip::start`]).
#[derive(Clone, Debug)]
pub struct GossipSettings {
    /// Packets from another cluster are refused.
    pub cluster_id: String,
    pub node_id: NodeId,
    /// Address the other nodes reach this node's gRPC server at.
    pub advertise: String,
    /// Higher than any earlier run of this node id: a persisted counter, or the start time in
    /// milliseconds (see [`dynakv_core::membership`]).
    pub generation: u64,
    /// Nodes to announce this one to; this node among them is skipped. Every node of a
    /// static cluster can be a seed.
    pub seeds: Vec<(NodeId, String)>,
    /// Seeds known by address only (host:port; DNS names are resolved at every attempt, so a
    /// Kubernetes pod name that moves to another IP is followed). Their node ids are asked
    /// (`Gossip.Members`) while this node knows no live member, then they join `seeds`.
    pub seed_addresses: Vec<String>,
    /// What this node gossips about itself at start.
    pub metadata: NodeMetadata,
    /// Seeds every random choice of the engine (which member to probe, whom to gossip to).
    pub rng_seed: u64,
    pub config: GossipConfig,
}

/// Why a gossip command failed. Variant names are stable (metric labels).
#[derive(Debug, thiserror::Error)]
pub enum GossipError {
    /// Refused by the engine; nothing changed.
    #[error(transparent)]
    Membership(#[from] MembershipError),
    #[error("gossip has stopped")]
    Stopped,
}

pub use crate::metrics::GossipStats;

#[derive(Default)]
struct SharedStats {
    packets_received: AtomicU64,
    packets_rejected: AtomicU64,
    packets_sent: AtomicU64,
    send_failures: AtomicU64,
    packets_dropped: AtomicU64,
    suspicions_raised: AtomicU64,
    downs_declared: AtomicU64,
    rejoins: AtomicU64,
}

impl SharedStats {
    fn read(&self) -> GossipStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        GossipStats {
            packets_received: get(&self.packets_received),
            packets_rejected: get(&self.packets_rejected),
            packets_sent: get(&self.packets_sent),
            send_failures: get(&self.send_failures),
            packets_dropped: get(&self.packets_dropped),
            suspicions_raised: get(&self.suspicions_raised),
            downs_declared: get(&self.downs_declared),
            rejoins: get(&self.rejoins),
        }
    }

    fn copy_engine(&self, engine: &Membership) {
        let s = engine.stats();
        self.packets_received
            .store(s.packets_received, Ordering::Relaxed);
        self.packets_rejected
            .store(s.packets_rejected, Ordering::Relaxed);
        self.packets_sent.store(s.packets_sent, Ordering::Relaxed);
        self.suspicions_raised
            .store(s.suspicions_raised, Ordering::Relaxed);
        self.downs_declared
            .store(s.downs_declared, Ordering::Relaxed);
        self.rejoins.store(s.rejoins, Ordering::Relaxed);
    }
}

enum Command {
    SetMetadata(NodeMetadata, oneshot::Sender<Result<(), MembershipError>>),
    Leave(oneshot::Sender<()>),
}

/// What [`Gossip::start`] returns.
pub struct GossipStarted {
    /// The handle (clone it freely).
    pub gossip: Gossip,
    /// The `dynakv.v1.Gossip` service, to add to the node's gRPC server.
    pub service: GossipServer<GossipService>,
    /// Every new membership snapshot; the first lists only this node.
    pub snapshots: watch::Receiver<Arc<MembershipSnapshot>>,
}

/// A handle on the node's gossip. Cheap to clone; the gossip task stops when the last handle
/// is dropped.
#[derive(Clone)]
pub struct Gossip {
    commands: mpsc::Sender<Command>,
    snapshots: watch::Receiver<Arc<MembershipSnapshot>>,
    stats: Arc<SharedStats>,
}

impl Gossip {
    /// Starts gossip: announces this node to the seeds and keeps going until every [`Gossip`]
    /// handle is dropped. Must be called inside a tokio runtime.
    pub fn start(
        settings: GossipSettings,
        connector: Connector,
    ) -> Result<GossipStarted, MembershipError> {
        let engine = Membership::new(
            LocalNode {
                id: settings.node_id.clone(),
                address: settings.advertise.clone(),
                generation: settings.generation,
                metadata: settings.metadata.clone(),
            },
            settings.config.clone(),
            settings.rng_seed,
        )?;
        let (snapshot_tx, snapshots) = watch::channel(engine.snapshot());
        let (commands, command_rx) = mpsc::channel(16);
        let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_QUEUE_LEN);
        let stats = Arc::new(SharedStats::default());
        let max_message = settings.config.max_packet_bytes + 64 * 1024;
        let driver = Driver {
            engine,
            start: Instant::now(),
            timers: BTreeSet::new(),
            channels: BTreeMap::new(),
            connector,
            sends: Arc::new(Semaphore::new(MAX_SENDS_IN_FLIGHT)),
            send_timeout: settings.config.probe_rtt,
            max_message,
            cluster_id: settings.cluster_id.clone(),
            node_id: settings.node_id.clone(),
            seeds: settings.seeds.clone(),
            seed_addresses: settings.seed_addresses.clone(),
            join_retry: settings.config.join_retry,
            snapshot_tx,
            stats: stats.clone(),
        };
        tokio::spawn(driver.run(command_rx, inbound_rx));
        let service = GossipService {
            cluster_id: settings.cluster_id,
            inbound: inbound_tx,
            snapshots: snapshots.clone(),
            stats: stats.clone(),
        };
        let server = GossipServer::new(service)
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message);
        Ok(GossipStarted {
            gossip: Gossip {
                commands,
                snapshots: snapshots.clone(),
                stats,
            },
            service: server,
            snapshots,
        })
    }

    /// What gossip knows now.
    pub fn snapshot(&self) -> Arc<MembershipSnapshot> {
        self.snapshots.borrow().clone()
    }

    /// A receiver of every new snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Arc<MembershipSnapshot>> {
        self.snapshots.clone()
    }

    /// Liveness of `id`; `None` if gossip has not heard of it (yet).
    pub fn state_of(&self, id: &NodeId) -> Option<MemberState> {
        self.snapshots.borrow().state_of(id)
    }

    /// Whether gossip knows `id` to be down: the coordinator skips such replicas and goes to
    /// fallbacks at once. Unknown and suspect nodes are not down.
    pub fn is_down(&self, id: &NodeId) -> bool {
        self.state_of(id) == Some(MemberState::Down)
    }

    /// Changes what this node gossips about itself (weight, zone, lifecycle, tokens).
    pub async fn set_metadata(&self, metadata: NodeMetadata) -> Result<(), GossipError> {
        let (reply, done) = oneshot::channel();
        self.commands
            .send(Command::SetMetadata(metadata, reply))
            .await
            .map_err(|_| GossipError::Stopped)?;
        done.await.map_err(|_| GossipError::Stopped)??;
        Ok(())
    }

    /// Tells a few members this node is going down, for a clean shutdown (the cluster then
    /// knows at once instead of after the suspicion timeout). Gossip stops taking part.
    pub async fn leave(&self) {
        let (reply, done) = oneshot::channel();
        if self.commands.send(Command::Leave(reply)).await.is_ok() {
            let _ = done.await;
        }
    }

    pub fn stats(&self) -> GossipStats {
        self.stats.read()
    }
}

/// Owns the engine; see the module docs.
struct Driver {
    engine: Membership,
    /// The engine's time origin.
    start: Instant,
    timers: BTreeSet<(Instant, TimerToken)>,
    channels: BTreeMap<Arc<str>, Channel>,
    connector: Connector,
    sends: Arc<Semaphore>,
    send_timeout: Duration,
    max_message: usize,
    cluster_id: String,
    node_id: NodeId,
    seeds: Vec<(NodeId, String)>,
    seed_addresses: Vec<String>,
    join_retry: Duration,
    snapshot_tx: watch::Sender<Arc<MembershipSnapshot>>,
    stats: Arc<SharedStats>,
}

impl Driver {
    fn now(&self) -> Duration {
        Instant::now().saturating_duration_since(self.start)
    }

    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut inbound: mpsc::Receiver<Bytes>,
    ) {
        let seeds = self.seeds.clone();
        let effects = self.engine.join(&seeds, self.now());
        self.execute(effects);
        let (found_tx, mut found) = mpsc::channel::<(NodeId, String)>(64);
        let mut lookup = tokio::time::interval(self.join_retry);
        loop {
            let next_timer = self.timers.first().map(|(at, _)| *at);
            tokio::select! {
                biased;
                Some((id, address)) = found.recv() => {
                    if id != self.node_id && !self.seeds.iter().any(|(i, a)| *i == id && *a == address) {
                        tracing::info!(node = %self.node_id, seed = %id, %address, "seed found");
                        self.seeds.retain(|(i, _)| *i != id);
                        self.seeds.push((id, address));
                        let seeds = self.seeds.clone();
                        let effects = self.engine.join(&seeds, self.now());
                        self.execute(effects);
                    }
                }
                _ = lookup.tick(), if !self.seed_addresses.is_empty() => {
                    let alone = self
                        .engine
                        .snapshot()
                        .members
                        .iter()
                        .all(|m| m.id == self.node_id || m.state != MemberState::Alive);
                    if alone {
                        self.look_up_seeds(&found_tx);
                    }
                }
                command = commands.recv() => match command {
                    None => break,
                    Some(Command::SetMetadata(metadata, reply)) => {
                        match self.engine.set_local_metadata(metadata, self.now()) {
                            Ok(effects) => {
                                self.execute(effects);
                                let _ = reply.send(Ok(()));
                            }
                            Err(e) => {
                                let _ = reply.send(Err(e));
                            }
                        }
                    }
                    Some(Command::Leave(reply)) => {
                        let effects = self.engine.leave(self.now());
                        self.execute(effects);
                        let _ = reply.send(());
                    }
                },
                Some(packet) = inbound.recv() => {
                    tracing::trace!(node = %self.node_id, bytes = packet.len(), "gossip packet in");
                    let effects = self.engine.handle_packet(&packet, self.now());
                    self.execute(effects);
                }
                _ = sleep_until(next_timer), if next_timer.is_some() => {
                    let now = Instant::now();
                    while let Some(&(at, token)) = self.timers.first() {
                        if at > now {
                            break;
                        }
                        self.timers.remove(&(at, token));
                        let effects = self.engine.handle_timer(token, self.now());
                        self.execute(effects);
                    }
                }
            }
        }
        tracing::debug!(node = %self.node_id, "gossip stopped");
    }

    /// Asks every address-only seed for its node id, in the background.
    fn look_up_seeds(&mut self, found: &mpsc::Sender<(NodeId, String)>) {
        for address in self.seed_addresses.clone() {
            let channel = self.connector.channel(&address);
            let found = found.clone();
            let timeout = self.join_retry;
            tokio::spawn(async move {
                let mut client = GossipClient::new(channel);
                let reply =
                    tokio::time::timeout(timeout, client.members(GossipMembersRequest {})).await;
                match reply {
                    Ok(Ok(r)) => match NodeId::new(&r.get_ref().node_id) {
                        Ok(id) => {
                            let _ = found.send((id, address)).await;
                        }
                        Err(e) => tracing::debug!(%address, error = %e, "seed sent a bad node id"),
                    },
                    _ => tracing::debug!(%address, "seed did not answer"),
                }
            });
        }
    }

    fn execute(&mut self, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::SendTo {
                    to,
                    address,
                    packet,
                } => self.send(to, address, packet),
                Effect::ScheduleTimer { after, token } => {
                    self.timers.insert((Instant::now() + after, token));
                }
                Effect::MembershipChanged(snapshot) => self.publish(snapshot),
            }
        }
        self.stats.copy_engine(&self.engine);
    }

    fn send(&mut self, to: NodeId, address: Arc<str>, payload: Bytes) {
        let Ok(permit) = self.sends.clone().try_acquire_owned() else {
            tracing::trace!(node = %self.node_id, peer = %to, "gossip send dropped: too many in flight");
            self.stats.packets_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let channel = self
            .channels
            .entry(address.clone())
            .or_insert_with(|| self.connector.channel(&address))
            .clone();
        let request = GossipPacket {
            cluster_id: self.cluster_id.clone(),
            from: self.node_id.to_string(),
            payload,
        };
        let timeout = self.send_timeout;
        let max_message = self.max_message;
        let stats = self.stats.clone();
        tracing::trace!(node = %self.node_id, peer = %to, bytes = request.payload.len(), "gossip send");
        tokio::spawn(async move {
            let _permit = permit;
            let mut client = GossipClient::new(channel)
                .max_encoding_message_size(max_message)
                .max_decoding_message_size(max_message);
            let sent = tokio::time::timeout(timeout, client.deliver(request)).await;
            if !matches!(sent, Ok(Ok(_))) {
                stats.send_failures.fetch_add(1, Ordering::Relaxed);
                tracing::trace!(peer = %to, "gossip packet not delivered");
            }
        });
    }

    fn publish(&mut self, snapshot: Arc<MembershipSnapshot>) {
        let previous = self.snapshot_tx.borrow().clone();
        for change in snapshot.changes_since(&previous) {
            let generation = snapshot.get(&change.id).map(|m| m.generation);
            match (change.was, change.now) {
                (was, Some(now)) if was != Some(now) || change.restarted => {
                    tracing::info!(
                        node = %self.node_id,
                        member = %change.id,
                        was = was.map_or("unknown", MemberState::as_str),
                        now = now.as_str(),
                        generation,
                        restarted = change.restarted,
                        "gossip: member state"
                    );
                }
                (_, Some(_)) if change.metadata_changed => {
                    tracing::info!(
                        node = %self.node_id,
                        member = %change.id,
                        generation,
                        "gossip: member metadata changed"
                    );
                }
                _ => {}
            }
        }
        // Keep channels only to addresses still in use (a restarted node may have moved).
        self.channels.retain(|address, _| {
            snapshot.members.iter().any(|m| m.address == *address)
                || self.seeds.iter().any(|(_, a)| a.as_str() == &**address)
        });
        self.snapshot_tx.send_replace(snapshot);
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The `dynakv.v1.Gossip` service: hands packets to the gossip task, answers `Members`.
pub struct GossipService {
    cluster_id: String,
    inbound: mpsc::Sender<Bytes>,
    snapshots: watch::Receiver<Arc<MembershipSnapshot>>,
    stats: Arc<SharedStats>,
}

#[tonic::async_trait]
impl GossipRpc for GossipService {
    async fn deliver(&self, request: Request<GossipPacket>) -> Result<Response<GossipAck>, Status> {
        let packet = request.into_inner();
        if packet.cluster_id != self.cluster_id {
            return Err(Status::permission_denied(format!(
                "gossip from cluster {:?} (node {:?}); this is cluster {:?}",
                packet.cluster_id, packet.from, self.cluster_id
            )));
        }
        if self.inbound.try_send(packet.payload).is_err() {
            self.stats.packets_dropped.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Response::new(GossipAck {}))
    }

    async fn members(
        &self,
        _request: Request<GossipMembersRequest>,
    ) -> Result<Response<GossipMembersResponse>, Status> {
        let snapshot = self.snapshots.borrow().clone();
        Ok(Response::new(members_response(
            &snapshot,
            &self.stats.read(),
        )))
    }
}

/// The `Members` answer for a snapshot (also usable by the admin service).
pub fn members_response(
    snapshot: &MembershipSnapshot,
    stats: &GossipStats,
) -> GossipMembersResponse {
    GossipMembersResponse {
        node_id: snapshot.local.to_string(),
        ring_digest: snapshot.ring_digest,
        members: snapshot
            .members
            .iter()
            .map(|m| GossipMember {
                id: m.id.to_string(),
                address: m.address.to_string(),
                generation: m.generation,
                version: m.version,
                state: m.state.as_str().to_string(),
                lifecycle: m.metadata.lifecycle.as_str().to_string(),
                weight: m.metadata.weight,
                zone: m.metadata.zone.clone().unwrap_or_default(),
                tokens: m.metadata.tokens.len() as u32,
            })
            .collect(),
        packets_received: stats.packets_received,
        packets_rejected: stats.packets_rejected,
        packets_sent: stats.packets_sent,
    }
}

/// `dynakv cluster status`-style table of what one node's gossip knows.
pub fn members_table(response: &GossipMembersResponse) -> String {
    let mut out = format!(
        "gossip view of {} (ring digest {:016x})\n{:<20} {:<8} {:<8} {:>6} {:>6} {:<10} {:>14} {:>4}  address\n",
        response.node_id,
        response.ring_digest,
        "id",
        "state",
        "phase",
        "weight",
        "tokens",
        "zone",
        "generation",
        "ver",
    );
    for m in &response.members {
        out.push_str(&format!(
            "{:<20} {:<8} {:<8} {:>6} {:>6} {:<10} {:>14} {:>4}  {}\n",
            m.id,
            m.state,
            m.lifecycle,
            m.weight,
            m.tokens,
            if m.zone.is_empty() { "-" } else { &m.zone },
            m.generation,
            m.version,
            m.address,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use dynakv_core::membership::Lifecycle;
    use tokio_stream::wrappers::TcpListenerStream;

    fn fast() -> GossipConfig {
        GossipConfig {
            probe_period: Duration::from_millis(200),
            probe_rtt: Duration::from_millis(80),
            gossip_interval: Duration::from_millis(50),
            suspicion_mult: 2,
            join_retry: Duration::from_millis(100),
            ..GossipConfig::lan()
        }
    }

    fn meta(weight: u32) -> NodeMetadata {
        NodeMetadata {
            weight,
            zone: None,
            lifecycle: Lifecycle::Normal,
            tokens: (0..u64::from(weight) / 10).collect(),
            change: Default::default(),
        }
    }

    struct TestNode {
        gossip: Gossip,
        stop: Option<oneshot::Sender<()>>,
    }

    async fn start(
        i: usize,
        seeds: Vec<(NodeId, String)>,
        listener: tokio::net::TcpListener,
    ) -> TestNode {
        let id = NodeId::new(format!("g{i}")).unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let started = Gossip::start(
            GossipSettings {
                cluster_id: "test".into(),
                node_id: id,
                advertise: address,
                generation: 1,
                seeds,
                seed_addresses: Vec::new(),
                metadata: meta(100),
                rng_seed: i as u64,
                config: fast(),
            },
            Connector::tcp(None, Duration::from_millis(500)),
        )
        .unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(started.service)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                }),
        );
        TestNode {
            gossip: started.gossip,
            stop: Some(stop),
        }
    }

    async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_nodes_gossip_over_grpc_on_loopback() {
        let mut listeners = Vec::new();
        for _ in 0..3 {
            listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
        }
        let seeds: Vec<(NodeId, String)> = listeners
            .iter()
            .enumerate()
            .map(|(i, l)| {
                (
                    NodeId::new(format!("g{i}")).unwrap(),
                    l.local_addr().unwrap().to_string(),
                )
            })
            .collect();
        let mut nodes = Vec::new();
        for (i, listener) in listeners.into_iter().enumerate() {
            nodes.push(start(i, seeds.clone(), listener).await);
        }
        wait_for("every node sees three alive members", || {
            nodes.iter().all(|n| {
                let s = n.gossip.snapshot();
                s.members.len() == 3 && s.count(MemberState::Alive) == 3
            })
        })
        .await;

        nodes[2].gossip.set_metadata(meta(50)).await.unwrap();
        let g2 = NodeId::new("g2").unwrap();
        wait_for("the new weight reaches everyone", || {
            nodes
                .iter()
                .all(|n| n.gossip.snapshot().get(&g2).unwrap().metadata.weight == 50)
        })
        .await;
        let digest = nodes[0].gossip.snapshot().ring_digest;
        assert!(
            nodes
                .iter()
                .all(|n| n.gossip.snapshot().ring_digest == digest)
        );

        // Node 1 stops answering: the others declare it down, and keep it in their ring.
        let g1 = NodeId::new("g1").unwrap();
        let _ = nodes[1].stop.take().unwrap().send(());
        nodes.remove(1);
        wait_for("the stopped node is down everywhere", || {
            nodes.iter().all(|n| n.gossip.is_down(&g1))
        })
        .await;
        let ring = nodes[0].gossip.snapshot().ring().unwrap();
        assert!(ring.node_index("g1").is_some());

        let table = members_table(&members_response(
            &nodes[0].gossip.snapshot(),
            &nodes[0].gossip.stats(),
        ));
        assert!(table.contains("g1") && table.contains("down"), "{table}");
        assert!(nodes[0].gossip.stats().packets_sent > 0);
    }
}
