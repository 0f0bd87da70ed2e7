//! The node: local replica state plus the coordinator of client requests (DESIGN.md section 5).
//!
//! Write: preference list -> (the caller forwards if this node is not a replica) -> apply the
//! update to the local DVVSet and make it durable -> send the new state to the other replicas in
//! parallel -> answer after W durable acks. Replication to the slower replicas goes on in the
//! background after the answer, until the deadline.
//!
//! Read: ask the N replicas -> answer after R -> merge (DVVSet sync) -> read-repair every replica
//! that answered with less, including answers that arrive after the reply went out.

use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use dynakv_core::NodeId;
use dynakv_core::context::{ContextError, decode_context, encode_context};
use dynakv_core::dvvset::{Clock, Sibling, VersionVector};
use dynakv_core::hash::key_position;
use dynakv_core::hlc::{HybridClock, Timestamp};
use dynakv_core::quorum::{QuorumError, QuorumKind, QuorumTracker, ReplicaFailure, Vote};
use dynakv_core::ring::{Member, Ring};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::time::Instant;

use crate::config::{ConflictMode, ValidConfig, ValidMember};
use crate::metrics::Metrics;
use crate::peer::{PeerError, PeerPool};
use crate::proto::{FetchRequest, StoreRequest, replica_request, replica_response};
use crate::storage::{StorageError, Store, Table};

/// Milliseconds since the Unix epoch, as the node's environment tells it (the simulation passes
/// simulated time).
pub type WallClock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The membership and the ring computed from it. Replaced as a whole when membership changes.
#[derive(Debug)]
pub struct ClusterView {
    pub ring: Ring,
    pub members: Vec<ValidMember>,
}

impl ClusterView {
    pub fn from_members(members: Vec<ValidMember>, vnodes_per_node: u32, n: usize) -> Self {
        let ring_members: Vec<Member> = members
            .iter()
            .map(|m| Member {
                id: m.id.clone(),
                weight: m.weight,
                zone: m.zone.clone(),
            })
            .collect();
        let ring = Ring::balanced(&ring_members, vnodes_per_node, n);
        ClusterView { ring, members }
    }

    pub fn member(&self, id: &NodeId) -> Option<&ValidMember> {
        self.members.iter().find(|m| &m.id == id)
    }
}

/// Why a coordinated request failed. Nothing was changed for `Invalid`, `NotReplica`,
/// `Overloaded` and `TooManySiblings`; a `Quorum` or `Deadline` failure may have reached fewer
/// replicas than asked (as in every Dynamo-style store). Variant names are metric labels.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("{0}")]
    Invalid(String),
    #[error("this node is not a replica of the key")]
    NotReplica(Vec<NodeId>),
    #[error("{0}")]
    Quorum(QuorumError),
    #[error("deadline exceeded: {0}")]
    Deadline(QuorumError),
    #[error("local storage failed: {0}")]
    Storage(#[from] StorageError),
    #[error(
        "the key has {have} siblings and this write would make {would}; the limit is {limit}. \
         Read the key and write with the context the read returned to resolve them"
    )]
    TooManySiblings {
        have: usize,
        would: usize,
        limit: usize,
    },
}

impl CoordinatorError {
    pub fn label(&self) -> &'static str {
        match self {
            CoordinatorError::Invalid(_) => "invalid",
            CoordinatorError::NotReplica(_) => "not_replica",
            CoordinatorError::Quorum(_) => "unavailable",
            CoordinatorError::Deadline(_) => "deadline",
            CoordinatorError::Storage(_) => "storage",
            CoordinatorError::TooManySiblings { .. } => "too_many_siblings",
        }
    }
}

/// What the client learns about how its request was served.
#[derive(Debug, Clone, Default)]
pub struct Receipt {
    pub coordinator: String,
    pub needed: usize,
    pub got: usize,
    pub replicas: Vec<ReplicaReport>,
    pub hinted: bool,
    pub siblings: usize,
    pub ring_version: u64,
}

#[derive(Debug, Clone)]
pub struct ReplicaReport {
    pub node: NodeId,
    pub fallback: bool,
    pub hint_for: Option<NodeId>,
    pub error: Option<ReplicaFailure>,
}

pub struct WriteOutcome {
    pub context: Vec<u8>,
    pub receipt: Receipt,
}

pub struct ReadOutcome {
    pub values: Vec<Sibling>,
    pub context: Vec<u8>,
    pub receipt: Receipt,
}

/// A write as the coordinator receives it, already validated.
pub struct WriteRequest {
    pub key: Bytes,
    /// `None` writes a tombstone (delete).
    pub value: Option<Bytes>,
    pub context: VersionVector,
    pub w: usize,
    pub sloppy: bool,
    pub deadline: Instant,
}

/// Everything one node holds. Shared behind an `Arc` by the services.
pub struct Node {
    pub id: NodeId,
    pub config: ValidConfig,
    pub store: Store,
    pub peers: PeerPool,
    pub metrics: Metrics,
    view: RwLock<Arc<ClusterView>>,
    clock: Mutex<HybridClock>,
    wall: WallClock,
    cluster_tag: u32,
}

/// The tag that binds client contexts to one cluster.
pub fn cluster_tag(cluster_id: &str) -> u32 {
    xxhash_tag(cluster_id.as_bytes())
}

fn xxhash_tag(bytes: &[u8]) -> u32 {
    (dynakv_core::hash::hash128(bytes) & 0xffff_ffff) as u32
}

impl Node {
    pub fn new(
        config: ValidConfig,
        store: Store,
        peers: PeerPool,
        metrics: Metrics,
        wall: WallClock,
    ) -> Node {
        let view = ClusterView::from_members(
            config.members.clone(),
            config.raw.replication.vnodes_per_node,
            config.raw.replication.n as usize,
        );
        metrics.set_ring_version(view.ring.version());
        peers.set_members(
            &view
                .members
                .iter()
                .map(|m| (m.id.clone(), m.address.clone()))
                .collect::<Vec<_>>(),
        );
        Node {
            id: config.node_id.clone(),
            cluster_tag: cluster_tag(&config.raw.cluster_id),
            config,
            store,
            peers,
            metrics,
            view: RwLock::new(Arc::new(view)),
            clock: Mutex::new(HybridClock::new()),
            wall,
        }
    }

    pub fn view(&self) -> Arc<ClusterView> {
        self.view.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn n(&self) -> usize {
        self.config.raw.replication.n as usize
    }

    pub fn decode_context(&self, bytes: &[u8]) -> Result<VersionVector, ContextError> {
        decode_context(bytes, self.cluster_tag)
    }

    fn now(&self) -> Timestamp {
        let wall = (self.wall)();
        self.clock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .now(wall)
    }

    fn observe(&self, clock: &Clock) {
        if let Some(max) = clock.values().map(|s| s.ts).max() {
            let wall = (self.wall)();
            // A remote timestamp far in the future is not adopted (drift guard); the value is
            // still stored, only our clock does not jump.
            let _ = self
                .clock
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .observe(max, wall);
        }
    }

    /// The key's replicas (indexes into the view's ring nodes), or who they are when this node is
    /// not one of them.
    fn replicas(&self, view: &ClusterView, key: &[u8]) -> Vec<NodeId> {
        let pos = key_position(key);
        view.ring
            .preference_list(pos, self.n())
            .into_iter()
            .map(|i| view.ring.nodes()[i].id.clone())
            .collect()
    }

    /// Whether this node is a replica of `key`; otherwise the replicas, to forward to.
    pub fn replicas_if_not_local(&self, key: &[u8]) -> Option<Vec<NodeId>> {
        let view = self.view();
        let replicas = self.replicas(&view, key);
        if replicas.contains(&self.id) {
            None
        } else {
            Some(replicas)
        }
    }

    /// Coordinates a put or delete. The caller has validated sizes and decoded the context.
    pub async fn write(&self, req: WriteRequest) -> Result<WriteOutcome, CoordinatorError> {
        let view = self.view();
        let replicas = self.replicas(&view, &req.key);
        let ts = self.now();
        let sibling = match req.value {
            Some(v) => Sibling::live(ts, v),
            None => Sibling::tombstone(ts),
        };
        let coordinator = self.id.clone();
        let lww = self.config.raw.replication.conflict_mode == ConflictMode::Lww;
        let limit = self.config.raw.limits.sibling_max;
        let context = req.context;
        let applied = self
            .store
            .update(Table::Data, req.key.to_vec(), move |current| {
                let stored = match current.map(Clock::decode).transpose() {
                    Ok(s) => s,
                    Err(e) => {
                        return (
                            None,
                            Err(CoordinatorError::Storage(StorageError::Corrupt {
                                detail: format!("stored clock does not decode: {e}"),
                            })),
                        );
                    }
                };
                let mut next = Clock::put(stored.as_ref(), &context, sibling, &coordinator);
                if lww {
                    next = next.lww_resolve();
                }
                let have = stored.as_ref().map_or(0, |s| s.live_values().count());
                let would = next.live_values().count();
                if would > limit && would > have {
                    return (
                        None,
                        Err(CoordinatorError::TooManySiblings { have, would, limit }),
                    );
                }
                if let Err(e) = next.check_limits() {
                    return (None, Err(CoordinatorError::Invalid(e.to_string())));
                }
                let bytes = next.to_bytes();
                (Some(Some(bytes.clone())), Ok((next, Bytes::from(bytes))))
            })
            .await?;
        let (clock, encoded) = applied?;
        let siblings = clock.live_values().count();
        if siblings > self.config.raw.limits.sibling_warn {
            self.metrics.sibling_warnings.inc();
            tracing::warn!(
                key = %String::from_utf8_lossy(&req.key),
                siblings,
                "key has many siblings; clients should write with the context of their read"
            );
        }

        let mut tracker = QuorumTracker::new(QuorumKind::Write, req.w, !req.sloppy);
        tracker.asked(self.id.clone());
        tracker.register_ack(&self.id, false);
        let mut calls = FuturesUnordered::new();
        for node in replicas.iter().filter(|n| **n != self.id) {
            tracker.asked(node.clone());
            let peers = self.peers.clone();
            let node = node.clone();
            let op = replica_request::Op::Store(StoreRequest {
                key: req.key.clone(),
                clock: encoded.clone(),
                hint_for: String::new(),
            });
            let deadline = req.deadline;
            calls.push(async move {
                let r = peers.call(&node, op, deadline).await;
                (node, r)
            });
        }
        tracker.no_more_targets();
        let verdict = drive(
            &mut tracker,
            &mut calls,
            req.deadline,
            |t, (node, r)| match r {
                Ok(replica_response::Result::Store(_)) => {
                    t.register_ack(&node, false);
                }
                Ok(_) => {
                    t.register_failure(&node, ReplicaFailure::Refused);
                }
                Err(e) => {
                    t.register_failure(&node, e.as_replica_failure());
                }
            },
        )
        .await;
        // The slower replicas still get the write, until the deadline.
        if !calls.is_empty() {
            tokio::spawn(async move { while calls.next().await.is_some() {} });
        }
        let receipt = self.receipt(&tracker, &view, siblings);
        match verdict {
            Vote::Won => Ok(WriteOutcome {
                context: encode_context(&clock.join(), self.cluster_tag),
                receipt,
            }),
            Vote::Lost(e) => Err(self.quorum_error(e)),
            Vote::Pending => unreachable_pending(tracker),
        }
    }

    /// Coordinates a read.
    pub async fn read(
        self: &Arc<Self>,
        key: Bytes,
        r: usize,
        sloppy: bool,
        deadline: Instant,
    ) -> Result<ReadOutcome, CoordinatorError> {
        let view = self.view();
        let replicas = self.replicas(&view, &key);
        let mut tracker = QuorumTracker::new(QuorumKind::Read, r, !sloppy);
        let mut calls = FuturesUnordered::new();
        for node in &replicas {
            tracker.asked(node.clone());
            let node = node.clone();
            let this = self.clone();
            let key = key.clone();
            calls.push(async move {
                let r = this.fetch(&node, key, deadline).await;
                (node, r)
            });
        }
        tracker.no_more_targets();
        let mut answers: Vec<(NodeId, Option<Clock>)> = Vec::with_capacity(replicas.len());
        let verdict = drive(&mut tracker, &mut calls, deadline, |t, (node, r)| match r {
            Ok(clock) => {
                t.register_ack(&node, false);
                answers.push((node, clock));
            }
            Err(f) => {
                t.register_failure(&node, f);
            }
        })
        .await;
        if let Vote::Lost(e) = verdict {
            return Err(self.quorum_error(e));
        }
        let merged = merge_answers(&answers);
        let lww = self.config.raw.replication.conflict_mode == ConflictMode::Lww;
        let merged = if lww { merged.lww_resolve() } else { merged };
        let values: Vec<Sibling> = merged.live_values().cloned().collect();
        self.metrics.siblings_per_read.observe(values.len() as f64);
        let receipt = self.receipt(&tracker, &view, values.len());
        let context = encode_context(&merged.join(), self.cluster_tag);

        // Read repair, in the background: wait for the late answers too, then bring every
        // replica that answered with less up to the merge of everything seen.
        let this = self.clone();
        tokio::spawn(async move {
            while let Ok(Some((node, r))) = tokio::time::timeout_at(deadline, calls.next()).await {
                if let Ok(clock) = r {
                    answers.push((node, clock));
                }
            }
            this.repair(key, answers, deadline).await;
        });
        Ok(ReadOutcome {
            values,
            context,
            receipt,
        })
    }

    async fn repair(&self, key: Bytes, answers: Vec<(NodeId, Option<Clock>)>, deadline: Instant) {
        let lww = self.config.raw.replication.conflict_mode == ConflictMode::Lww;
        let merged = merge_answers(&answers);
        let merged = if lww { merged.lww_resolve() } else { merged };
        if merged.size() == 0 && merged.join().is_empty() {
            return;
        }
        let encoded = Bytes::from(merged.to_bytes());
        let mut repairs = FuturesUnordered::new();
        for (node, clock) in &answers {
            let behind = match clock {
                None => true,
                Some(c) => c.to_bytes() != encoded.as_ref(),
            };
            if !behind {
                continue;
            }
            self.metrics.read_repairs.inc();
            let node = node.clone();
            let key = key.clone();
            let encoded = encoded.clone();
            let merged = merged.clone();
            repairs.push(async move {
                let result = if node == self.id {
                    self.merge_local(key.to_vec(), merged).await.map(|_| ())
                } else {
                    let op = replica_request::Op::Store(StoreRequest {
                        key,
                        clock: encoded,
                        hint_for: String::new(),
                    });
                    self.peers
                        .call(&node, op, deadline)
                        .await
                        .map(|_| ())
                        .map_err(|e| StorageError::Corrupt {
                            detail: e.to_string(),
                        })
                };
                if let Err(e) = result {
                    tracing::debug!(%node, error = %e, "read repair did not reach a replica");
                }
            });
        }
        while repairs.next().await.is_some() {}
    }

    /// One replica's copy of a key: local storage or a peer.
    async fn fetch(
        &self,
        node: &NodeId,
        key: Bytes,
        deadline: Instant,
    ) -> Result<Option<Clock>, ReplicaFailure> {
        if *node == self.id {
            return self.read_local(&key).map_err(|e| {
                tracing::warn!(error = %e, "local read failed");
                ReplicaFailure::Refused
            });
        }
        let op = replica_request::Op::Fetch(FetchRequest { key });
        match self.peers.call(node, op, deadline).await {
            Ok(replica_response::Result::Fetch(f)) if f.clock.is_empty() => Ok(None),
            Ok(replica_response::Result::Fetch(f)) => match Clock::decode(&f.clock) {
                Ok(c) => Ok(Some(c)),
                Err(e) => {
                    tracing::warn!(%node, error = %e, "replica sent a clock that does not decode");
                    Err(ReplicaFailure::Refused)
                }
            },
            Ok(_) => Err(ReplicaFailure::Refused),
            Err(e) => Err(PeerError::as_replica_failure(&e)),
        }
    }

    /// This node's copy of a key.
    pub fn read_local(&self, key: &[u8]) -> Result<Option<Clock>, StorageError> {
        match self.store.get(Table::Data, key)? {
            None => Ok(None),
            Some(bytes) => Clock::decode(&bytes)
                .map(Some)
                .map_err(|e| StorageError::Corrupt {
                    detail: format!("stored clock does not decode: {e}"),
                }),
        }
    }

    /// Merges a replica's state into the local copy (DVVSet sync) and makes it durable. Returns
    /// whether anything changed.
    pub async fn merge_local(&self, key: Vec<u8>, incoming: Clock) -> Result<bool, StorageError> {
        self.observe(&incoming);
        let lww = self.config.raw.replication.conflict_mode == ConflictMode::Lww;
        self.store
            .update(Table::Data, key, move |current| {
                let merged = match current {
                    None => incoming,
                    Some(bytes) => match Clock::decode(bytes) {
                        Ok(stored) => stored.sync(&incoming),
                        Err(e) => {
                            return (
                                None,
                                Err(StorageError::Corrupt {
                                    detail: format!("stored clock does not decode: {e}"),
                                }),
                            );
                        }
                    },
                };
                let merged = if lww { merged.lww_resolve() } else { merged };
                let encoded = merged.to_bytes();
                if current == Some(encoded.as_slice()) {
                    (None, Ok(false))
                } else {
                    (Some(Some(encoded)), Ok(true))
                }
            })
            .await?
    }

    fn receipt(&self, tracker: &QuorumTracker, view: &ClusterView, siblings: usize) -> Receipt {
        let mut replicas: Vec<ReplicaReport> = tracker
            .acked()
            .iter()
            .map(|(node, fallback)| ReplicaReport {
                node: node.clone(),
                fallback: *fallback,
                hint_for: None,
                error: None,
            })
            .collect();
        replicas.extend(tracker.failed().iter().map(|(node, why)| ReplicaReport {
            node: node.clone(),
            fallback: false,
            hint_for: None,
            error: Some(*why),
        }));
        Receipt {
            coordinator: self.id.to_string(),
            needed: tracker.needed(),
            got: tracker.acked().len(),
            hinted: replicas.iter().any(|r| r.hint_for.is_some()),
            replicas,
            siblings,
            ring_version: view.ring.version(),
        }
    }

    fn quorum_error(&self, e: QuorumError) -> CoordinatorError {
        let timed_out = !e.failed.is_empty()
            && e.failed
                .iter()
                .all(|(_, why)| *why == ReplicaFailure::Timeout);
        let op = match e.kind {
            QuorumKind::Read => "get",
            QuorumKind::Write => "put",
        };
        self.metrics
            .quorum_failures
            .with_label_values(&[op, e.label()])
            .inc();
        if timed_out {
            CoordinatorError::Deadline(e)
        } else {
            CoordinatorError::Quorum(e)
        }
    }
}

fn merge_answers(answers: &[(NodeId, Option<Clock>)]) -> Clock {
    Clock::sync_all(answers.iter().filter_map(|(_, c)| c.as_ref()))
}

/// Feeds replies into the tracker until it decides or the deadline passes.
async fn drive<F, T>(
    tracker: &mut QuorumTracker,
    calls: &mut FuturesUnordered<F>,
    deadline: Instant,
    mut on_reply: impl FnMut(&mut QuorumTracker, T),
) -> Vote
where
    F: std::future::Future<Output = T>,
{
    loop {
        if *tracker.vote() != Vote::Pending {
            return tracker.vote().clone();
        }
        match tokio::time::timeout_at(deadline, calls.next()).await {
            Ok(Some(reply)) => on_reply(tracker, reply),
            Ok(None) => return tracker.no_more_targets().clone(),
            Err(_) => return tracker.deadline_passed().clone(),
        }
    }
}

fn unreachable_pending(tracker: QuorumTracker) -> Result<WriteOutcome, CoordinatorError> {
    // `drive` only returns a decided vote; keep the invariant visible rather than panic.
    Err(CoordinatorError::Quorum(tracker.error()))
}
