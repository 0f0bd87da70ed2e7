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
use dynakv_core::context::{ContextError, decode_context_with_ids, encode_context_with_ids};
use dynakv_core::dvvset::{Clock, Sibling, VersionVector};
use dynakv_core::hash::key_position;
use dynakv_core::hlc::{HybridClock, Timestamp};
use dynakv_core::membership::{MemberState, MembershipSnapshot};
use dynakv_core::merkle::{MerkleTree, entry_hash};
use dynakv_core::quorum::{QuorumError, QuorumKind, QuorumTracker, ReplicaFailure, Vote};
use dynakv_core::ring::{Member, NodeSpec, Ring};
use dynakv_core::transition::RingState;
use dynakv_core::write_id::{Carry, WriteId};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use std::collections::BTreeMap;
use tokio::time::Instant;

use crate::config::{ConflictMode, ValidConfig, ValidMember};
use crate::gossip::Gossip;
use crate::hint_store::{HintError, Hints};
use crate::metrics::Metrics;
use crate::peer::{PeerError, PeerPool};
use crate::proto::{FetchRequest, StoreRequest, replica_error, replica_request, replica_response};
use crate::storage::{StorageError, Store, Table};
pub use crate::storage::{data_key, split_data_key};
use crate::trees::{PeerMap, Settled, Trees};

/// Milliseconds since the Unix epoch, as the node's environment tells it (the simulation passes
/// simulated time).
pub type WallClock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The membership and the rings computed from it. Replaced as a whole when membership changes.
#[derive(Debug)]
pub struct ClusterView {
    /// The committed ring (what Merkle trees, anti-entropy and tombstone GC follow).
    pub ring: Arc<Ring>,
    pub members: Vec<ValidMember>,
    /// The committed ring, the rings of proposed changes, and the change under way: which rings
    /// a write goes to and which one a read uses ([`RingState::write_rings`],
    /// [`RingState::read_ring`]).
    pub rings: RingState,
    /// Grows with every view this node installs; requests remember the view they started on,
    /// so a ring change can wait for the requests of older views ([`Node::drained_before`]).
    pub seq: u64,
    /// Every member gossip knows that is not in the ring (left, or weight 0 and not yet
    /// heard of by the ring's builder): still reachable, for admin requests and handoffs.
    pub others: Vec<(NodeId, String)>,
}

/// The replicas one key's write goes to while the ring may be changing.
pub struct WriteTargets {
    /// Each live ring's replicas of the key (the committed ring's first): W acks in each.
    pub sets: Vec<Vec<NodeId>>,
    /// Every replica of every set, each once, the committed ring's first.
    pub targets: Vec<NodeId>,
    /// The committed ring's walk past every target: stand-ins for a replica that fails.
    pub fallbacks: Vec<NodeId>,
}

impl ClusterView {
    pub fn from_members(
        me: &NodeId,
        members: Vec<ValidMember>,
        vnodes_per_node: u32,
        n: usize,
    ) -> Self {
        let ring_members: Vec<Member> = members
            .iter()
            .map(|m| Member {
                id: m.id.clone(),
                weight: m.weight,
                zone: m.zone.clone(),
            })
            .collect();
        let ring = Arc::new(Ring::balanced(&ring_members, vnodes_per_node, n));
        ClusterView {
            rings: RingState::settled(me.clone(), ring.clone()),
            ring,
            members,
            seq: 0,
            others: Vec::new(),
        }
    }

    /// Where every member this view knows is reached (ring members and the others).
    pub fn peer_addresses(&self) -> Vec<(NodeId, String)> {
        self.members
            .iter()
            .map(|m| (m.id.clone(), m.address.clone()))
            .chain(self.others.iter().cloned())
            .filter(|(_, address)| !address.is_empty())
            .collect()
    }

    /// The view of a recorded ring (the last committed ring a node knew), with the configured
    /// members' addresses where known (gossip supplies the others).
    pub fn from_specs(
        me: &NodeId,
        specs: Vec<NodeSpec>,
        configured: &[ValidMember],
    ) -> Result<Self, dynakv_core::ring::RingError> {
        let ring = Arc::new(Ring::new(specs)?);
        let members = ring
            .nodes()
            .iter()
            .map(|spec| {
                let config = configured.iter().find(|m| m.id == spec.id);
                ValidMember {
                    id: spec.id.clone(),
                    address: config.map(|c| c.address.clone()).unwrap_or_default(),
                    metrics: config.and_then(|c| c.metrics.clone()),
                    weight: spec.weight,
                    zone: spec.zone.clone(),
                }
            })
            .collect();
        Ok(ClusterView {
            rings: RingState::settled(me.clone(), ring.clone()),
            ring,
            members,
            seq: 0,
            others: Vec::new(),
        })
    }

    /// The replicas of `key` in every live ring (see [`WriteTargets`]).
    pub fn write_targets(&self, key_pos: u64, n: usize) -> WriteTargets {
        let rings = self.rings.write_rings();
        let ids = |ring: &Ring, nodes: Vec<usize>| -> Vec<NodeId> {
            nodes
                .into_iter()
                .map(|i| ring.nodes()[i].id.clone())
                .collect()
        };
        let sets: Vec<Vec<NodeId>> = rings
            .iter()
            .map(|ring| ids(ring, ring.preference_list(key_pos, n)))
            .collect();
        let mut targets: Vec<NodeId> = Vec::new();
        for node in sets.iter().flatten() {
            if !targets.contains(node) {
                targets.push(node.clone());
            }
        }
        let fallbacks = self
            .ring
            .walk(key_pos, n)
            .map(|i| self.ring.nodes()[i].id.clone())
            .filter(|id| !targets.contains(id))
            .collect();
        WriteTargets {
            sets,
            targets,
            fallbacks,
        }
    }

    /// The key's replicas in the ring reads use, then the fallbacks of that ring's walk.
    pub fn read_walk(&self, key_pos: u64, n: usize) -> (Vec<NodeId>, Vec<NodeId>) {
        let ring = self.rings.read_ring();
        let all: Vec<NodeId> = ring
            .walk(key_pos, n)
            .map(|i| ring.nodes()[i].id.clone())
            .collect();
        let split = n.min(all.len());
        let fallbacks = all[split..].to_vec();
        let mut primaries = all;
        primaries.truncate(split);
        (primaries, fallbacks)
    }

    pub fn member(&self, id: &NodeId) -> Option<&ValidMember> {
        self.members.iter().find(|m| &m.id == id)
    }

    /// The view gossip describes: the ring of what every member gossips about itself (weight,
    /// zone, tokens), with the configured members gossip has not heard of yet keeping the place
    /// `defaults` (the configured ring) gives them. Addresses are the gossiped ones; the metrics
    /// address comes from the configuration.
    pub fn from_snapshot(
        snapshot: &MembershipSnapshot,
        defaults: &[NodeSpec],
        configured: &[ValidMember],
    ) -> Result<Self, dynakv_core::ring::RingError> {
        let rings = RingState::new(snapshot, defaults)?;
        let ring = rings.committed().clone();
        let members = ring
            .nodes()
            .iter()
            .map(|spec| {
                let config = configured.iter().find(|m| m.id == spec.id);
                let address = match (snapshot.get(&spec.id), config) {
                    (Some(info), _) => info.address.to_string(),
                    (None, Some(c)) => c.address.clone(),
                    (None, None) => String::new(),
                };
                ValidMember {
                    id: spec.id.clone(),
                    address,
                    metrics: config.and_then(|c| c.metrics.clone()),
                    weight: spec.weight,
                    zone: spec.zone.clone(),
                }
            })
            .collect();
        let others = snapshot
            .members
            .iter()
            .filter(|m| ring.node_index(m.id.as_str()).is_none())
            .map(|m| (m.id.clone(), m.address.to_string()))
            .collect();
        Ok(ClusterView {
            ring,
            members,
            rings,
            seq: 0,
            others,
        })
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
    #[error("this node is stopping; send the request to another node")]
    Stopping,
    /// This node owns no part of the ring in the view the request was to be coordinated on
    /// (`RingState::coordinates_reads`): nothing was done, another member may coordinate.
    #[error("this node owns no part of the ring and does not coordinate this request")]
    NotCoordinating,
    #[error(
        "this node started and has not heard from the cluster yet (it does not know whether the \
         ring is changing); send the request to another node or retry"
    )]
    Starting,
    #[error(
        "the key has {have} siblings and this write would make {would}; the limit is {limit}. \
         Read the key and write with the context the read returned to resolve them"
    )]
    TooManySiblings {
        have: usize,
        would: usize,
        limit: usize,
    },
    /// A forwarded write that reached its coordinator after the forward's lifetime (the node
    /// that forwarded it has given up on this coordinator): nothing was applied.
    #[error(
        "the forwarded write reached this node after its lifetime ({lifetime_ms} ms); nothing \
         was applied"
    )]
    Expired { lifetime_ms: u64 },
}

impl CoordinatorError {
    pub fn label(&self) -> &'static str {
        match self {
            CoordinatorError::Invalid(_) => "invalid",
            CoordinatorError::NotReplica(_) => "not_replica",
            CoordinatorError::Quorum(_) => "unavailable",
            CoordinatorError::Deadline(_) => "deadline",
            CoordinatorError::Storage(_) => "storage",
            CoordinatorError::Stopping => "stopping",
            CoordinatorError::NotCoordinating => "not_coordinating",
            CoordinatorError::Starting => "starting",
            CoordinatorError::TooManySiblings { .. } => "too_many_siblings",
            CoordinatorError::Expired { .. } => "expired",
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
    /// The write ids the client's context carries (of the values it read): this write supersedes
    /// them (`dynakv_core::write_id`).
    pub read_ids: Vec<WriteId>,
    /// A forwarded write's id, the same at every coordinator it is sent to.
    pub write_id: Option<WriteId>,
    /// Whether the write may carry write ids ([`Node::write_ids_usable`], read once when the
    /// request came in): without, it carries none and its reply's context none.
    pub write_ids: bool,
    pub w: usize,
    pub sloppy: bool,
    pub deadline: Instant,
    /// Forwarded by another node: coordinated only while this node owns part of the ring in the
    /// view it coordinates on ([`CoordinatorError::NotCoordinating`] otherwise).
    pub forwarded: bool,
}

/// Background tasks (late replica answers, read repair) a node keeps at once, at most.
const MAX_BACKGROUND_TASKS: usize = 16 * 1024;
/// Stray keys remembered one by one; past it a full sweep finds them.
const MAX_STRAY_KEYS: usize = 4096;

/// Everything one node holds. Shared behind an `Arc` by the services and background tasks.
pub struct Node {
    pub id: NodeId,
    pub config: ValidConfig,
    pub store: Store,
    pub peers: PeerPool,
    pub metrics: Metrics,
    pub trees: Trees,
    pub hints: Hints,
    /// Membership and failure detection: who is alive, and what the ring is built from.
    pub gossip: Gossip,
    /// Woken when gossip sees a member come back (alive again, or restarted): hint delivery
    /// and anti-entropy go to it at once instead of at their next round.
    pub member_returned: Arc<tokio::sync::Notify>,
    /// The configured ring: the place of members gossip has not heard of yet.
    configured_ring: Vec<NodeSpec>,
    /// The id this node's dots carry in version vectors: the node id plus a suffix drawn when its
    /// data directory was created. A node whose disk was wiped comes back with a new one, so it
    /// can never mint a dot (id, counter) that replicas already hold for a different value.
    pub dot_id: NodeId,
    /// Bounds the background tasks requests leave behind (late replicas, read repair).
    background: Arc<tokio::sync::Semaphore>,
    /// Reads coordinated so far, to pick the ones that ask every primary (`read_order`).
    reads: std::sync::atomic::AtomicU64,
    /// Writes whose local copy is not durable yet (see [`Node::stop_writes`]).
    unsynced: std::sync::atomic::AtomicUsize,
    /// Set by [`Node::stop_writes`]: no new write starts.
    stopping: std::sync::atomic::AtomicBool,
    /// Whether gossip has heard from another member since this node started, for a start that
    /// must (see [`Node::wait_for_cluster`]). Until then the node knows nothing of a ring change
    /// under way, or nothing of the ring at all: it coordinates no request and drives no change.
    heard_from_cluster: std::sync::atomic::AtomicBool,
    /// For a restart in the middle of a ring change: that change's id and the version of the
    /// committed ring this node restarted with, until its view shows what became of the change
    /// (see [`Node::wait_for_cluster`]).
    awaited_change: Mutex<Option<(u64, u64)>>,
    /// Keys a replica write stored although this node holds them in no live ring (a
    /// coordinator whose view lagged behind a committed change), for the rebalance driver to
    /// drop within a tick; at most [`MAX_STRAY_KEYS`].
    stray_keys: Mutex<Vec<Vec<u8>>>,
    /// Set when a stray key did not fit in `stray_keys`: the rebalance driver sweeps all of
    /// storage again.
    stray_writes: std::sync::atomic::AtomicBool,
    view: RwLock<Arc<ClusterView>>,
    /// Coordinated requests in flight, by the view seq they started on.
    inflight: Mutex<BTreeMap<u64, usize>>,
    clock: Mutex<HybridClock>,
    pub(crate) wall: WallClock,
    cluster_tag: u32,
    /// Forwarded writes' ids minted so far, and the wall time this node started at: with the
    /// node's dot id they make every write id unique.
    write_ids: std::sync::atomic::AtomicU64,
    started_ms: u64,
}

/// The tag that binds client contexts to one cluster.
pub fn cluster_tag(cluster_id: &str) -> u32 {
    (dynakv_core::hash::hash128(cluster_id.as_bytes()) & 0xffff_ffff) as u32
}

/// [`Table::Meta`] key of the clean-stop marker: `[1]` after a stop in which every write's local
/// copy became durable ([`Node::stop_writes`]), `[0]` while the node runs.
const CLEAN_STOP_KEY: &[u8] = b"node.clean_stop";

/// Whether the node's last run ended with a clean stop, and marks this run as running (durably,
/// before the node serves).
pub async fn take_clean_stop(store: &Store) -> Result<bool, StorageError> {
    let clean = store.get(Table::Meta, CLEAN_STOP_KEY)?.as_deref() == Some(&[1][..]);
    store
        .put(Table::Meta, CLEAN_STOP_KEY.to_vec(), vec![0])
        .await?;
    Ok(clean)
}

/// Records a clean stop: called once [`Node::stop_writes`] saw every write durable.
pub async fn record_clean_stop(store: &Store) -> Result<(), StorageError> {
    store
        .put(Table::Meta, CLEAN_STOP_KEY.to_vec(), vec![1])
        .await
}

/// Loads the node's dot id from its data directory, or draws and persists one on first start
/// and whenever `fresh` is set. The coordinator sends a new version to the other replicas
/// while its own copy is being committed, so after a crash the other replicas may hold dots of
/// this id that its own disk never recorded; a node that did not stop cleanly therefore
/// coordinates under a new dot id, never reusing a counter another replica may hold for a
/// different value. (Only unclean stops add an id to version vectors.)
pub async fn load_dot_id(
    store: &Store,
    node_id: &NodeId,
    wall_ms: u64,
    fresh: bool,
) -> Result<NodeId, StorageError> {
    const KEY: &[u8] = b"node.dot_id";
    let candidate = {
        let mut seed = node_id.as_str().as_bytes().to_vec();
        seed.extend_from_slice(&wall_ms.to_le_bytes());
        let suffix = (dynakv_core::hash::hash128(&seed) & 0xffff_ffff) as u32;
        format!("{node_id}.{suffix:08x}")
    };
    let stored = store
        .update(Table::Meta, KEY.to_vec(), move |current| match current {
            Some(v) if !fresh || v == candidate.as_bytes() => {
                (None, String::from_utf8(v.to_vec()).ok())
            }
            _ => (Some(Some(candidate.clone().into_bytes())), Some(candidate)),
        })
        .await?;
    stored
        .and_then(|s| NodeId::new(s).ok())
        .ok_or_else(|| StorageError::Corrupt {
            detail: "the dot id recorded in the data directory is unreadable".into(),
        })
}

/// Bumps and returns this node's gossip generation, persisted in the data directory: above
/// every earlier start of this data directory, and at least the wall clock in milliseconds, so
/// a node whose disk was wiped still outranks what the cluster remembers of its earlier runs.
pub async fn next_generation(store: &Store, wall_ms: u64) -> Result<u64, StorageError> {
    const KEY: &[u8] = b"node.generation";
    store
        .update(Table::Meta, KEY.to_vec(), move |current| {
            let previous = current
                .and_then(|v| <[u8; 8]>::try_from(v).ok())
                .map_or(0, u64::from_be_bytes);
            let next = previous.saturating_add(1).max(wall_ms);
            (Some(Some(next.to_be_bytes().to_vec())), next)
        })
        .await
}

/// Counts the coordinator's own commit as a reply; returns the storage error if it failed.
fn register_local_commit(
    me: &NodeId,
    tracker: &mut QuorumTracker,
    committed: Result<Result<(), StorageError>, tokio::task::JoinError>,
) -> Option<StorageError> {
    match committed {
        Ok(Ok(())) => {
            tracker.register_ack(me, false);
            None
        }
        Ok(Err(e)) => {
            tracker.register_failure(me, ReplicaFailure::Refused);
            Some(e)
        }
        Err(e) => {
            tracing::error!(error = %e, "local commit task failed");
            tracker.register_failure(me, ReplicaFailure::Refused);
            None
        }
    }
}

/// How often a write whose quorum is pending checks its outstanding replicas for silence.
const SILENCE_CHECK: std::time::Duration = std::time::Duration::from_millis(200);

/// What the write coordinator waits for next: its own commit, a replica's reply, or the time to
/// hedge (and check for silent replicas).
enum WriteEvent<R> {
    Local(Result<Result<(), StorageError>, tokio::task::JoinError>),
    Reply(Option<R>),
    /// The hedge delay passed with the quorum still pending.
    Hedge,
}

/// What the read coordinator waits for next: a replica's reply, or the time to ask one more.
enum ReadEvent<R> {
    Reply(Option<R>),
    /// The hedge delay of the replicas asked passed with the quorum still pending.
    Hedge,
}

/// Counts a write whose local copy is not yet durable while its new version may already be on
/// other replicas (see [`Node::stop_writes`]). Dropped once the local commit is over.
struct UnsyncedGuard {
    node: Arc<Node>,
}

impl UnsyncedGuard {
    fn enter(node: &Arc<Node>) -> Result<UnsyncedGuard, CoordinatorError> {
        use std::sync::atomic::Ordering::SeqCst;
        node.unsynced.fetch_add(1, SeqCst);
        let guard = UnsyncedGuard { node: node.clone() };
        if node.stopping.load(SeqCst) {
            return Err(CoordinatorError::Stopping);
        }
        Ok(guard)
    }
}

impl Drop for UnsyncedGuard {
    fn drop(&mut self) {
        self.node
            .unsynced
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl crate::handoff::HandoffHost for Node {
    fn node_id(&self) -> &NodeId {
        &self.id
    }

    fn cluster_id(&self) -> &str {
        &self.config.raw.cluster_id
    }

    fn store(&self) -> &Store {
        &self.store
    }

    fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn channel(&self, node: &NodeId) -> Option<tonic::transport::Channel> {
        self.peers.channel(node)
    }

    fn is_down(&self, node: &NodeId) -> bool {
        Node::is_down(self, node)
    }

    async fn merge(&self, stored_key: Vec<u8>, clock: Clock) -> Result<bool, StorageError> {
        let Some((_, key)) = split_data_key(&stored_key) else {
            return Err(StorageError::Corrupt {
                detail: "a stored key shorter than its position".into(),
            });
        };
        self.merge_local(key.to_vec(), clock).await
    }
}

/// Follows gossip for the node: every new snapshot goes to [`Node::apply_membership`], and a
/// changed ring moves the Merkle trees to it (their peer sets follow the ring). Stops with
/// `stop`.
///
/// The move reads only the tree segments a range boundary cuts (see [`Trees::follow`]), but that
/// is still thousands of keys on every node at once right after a commit, so on a
/// multi-threaded runtime it runs on a thread of its own while views go on being applied: a view
/// that waited for it would hold back the next ring change's acks and every liveness change for
/// as long. Moves run one at a time; ring changes during one are folded into one more after it.
/// Segments a write in flight kept from settling are scanned again shortly after ([`TreeJobs`]
/// holds these rules).
pub async fn follow_gossip(node: Arc<Node>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut snapshots = node.gossip.subscribe();
    let mut previous = snapshots.borrow_and_update().clone();
    // Take in the snapshot gossip holds now too: it may have met the cluster already (gossip
    // starts before this task), and a quiet cluster publishes no new one soon.
    snapshots.mark_changed();
    let background = matches!(
        tokio::runtime::Handle::current().runtime_flavor(),
        tokio::runtime::RuntimeFlavor::MultiThread
    );
    let mut moving: Option<tokio::task::JoinHandle<(Option<TreeWork>, std::time::Duration)>> = None;
    let mut jobs = TreeJobs::default();
    let finished = |jobs: &mut TreeJobs, work: Option<TreeWork>, wait: std::time::Duration| {
        if let Some(segments) = jobs.finished(work, wait, Instant::now()) {
            tracing::warn!(
                segments,
                "merkle tree segments still have writes in flight; trying again"
            );
        }
    };
    loop {
        let retry_at = jobs.retry_at();
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            changed = snapshots.changed() => {
                if changed.is_err() {
                    break;
                }
                let snapshot = snapshots.borrow_and_update().clone();
                jobs.viewed(node.apply_membership(&previous, &snapshot));
                previous = snapshot;
            }
            done = async { moving.as_mut().expect("guarded").await }, if moving.is_some() => {
                // A panic of the scan's thread counts as a failed move.
                let (work, wait) = done.unwrap_or((None, TREE_SETTLE_RETRY[0]));
                moving = None;
                finished(&mut jobs, work, wait);
            }
            _ = async { tokio::time::sleep_until(retry_at.expect("guarded")).await },
                if retry_at.is_some() && moving.is_none() => {}
        }
        if moving.is_some() {
            continue;
        }
        let Some((next, wait)) = jobs.next(Instant::now()) else {
            continue;
        };
        let node = node.clone();
        let job: Box<dyn FnOnce() -> Option<TreeWork> + Send> = match next {
            TreeJob::Move => Box::new(move || match node.retarget_trees() {
                Ok(work) => {
                    tracing::info!(
                        scanned = work.scanned,
                        unsettled = work.unsettled.len(),
                        "merkle trees moved to the new ring"
                    );
                    Some(work)
                }
                Err(e) => {
                    tracing::error!(error = %e, "merkle trees not moved to the new ring");
                    None
                }
            }),
            TreeJob::Settle(work) => Box::new(move || {
                match node.settle_trees(work.generation, work.map, work.unsettled) {
                    Ok(work) => Some(work),
                    Err(e) => {
                        tracing::error!(error = %e, "merkle tree segments not settled");
                        None
                    }
                }
            }),
        };
        if background {
            // On a thread of its own at a lower CPU priority: client requests must not queue
            // behind the scan (docs/benchmarks.md, "A node joins a loaded cluster").
            moving = Some(tokio::task::spawn_blocking(move || {
                let work = std::thread::Builder::new()
                    .name("dynakv-tree-move".into())
                    .spawn(move || {
                        lower_thread_priority();
                        job()
                    })
                    .ok()
                    .and_then(|scan| scan.join().ok().flatten());
                (work, wait)
            }));
        } else {
            // A current-thread runtime (the simulation): inline, so the run stays deterministic.
            finished(&mut jobs, job(), wait);
        }
    }
    // As when the move ran inside this task: stopped means no scan still running.
    if let Some(running) = moving.take() {
        let _ = running.await;
    }
}

/// Waits before scanning again the segments a write in flight kept from settling: doubling
/// from the first to the last, then every last (a few segments' scan, until they settle).
const TREE_SETTLE_RETRY: [std::time::Duration; 2] = [
    std::time::Duration::from_millis(50),
    std::time::Duration::from_secs(5),
];

/// What [`follow_gossip`] runs on the Merkle trees next.
enum TreeJob {
    /// Move the trees to the view's ring ([`Node::retarget_trees`]).
    Move,
    /// Scan again the cut segments a move or a settle left unsettled.
    Settle(TreeWork),
}

/// [`follow_gossip`]'s choice between moving the trees and settling what a move left, without
/// the I/O (time comes in as an argument), so that its rules are table-tested: a ring change
/// moves the trees as soon as no job runs, and drops any settle retry (the move redoes the
/// segments); a failed job moves again, but only after the next view (no tight loop on a
/// storage error); unsettled segments are tried again after a wait that doubles from 50 ms to
/// 5 s, unless a move is due.
#[derive(Default)]
struct TreeJobs {
    move_due: bool,
    /// The last job failed: the next move waits for the next view.
    held: bool,
    /// Cut segments left to settle, when to try again, and the wait after that.
    unsettled: Option<(TreeWork, Instant, std::time::Duration)>,
}

impl TreeJobs {
    /// A view was applied; `ring_moved`: its ring differs from the one the trees follow.
    fn viewed(&mut self, ring_moved: bool) {
        self.move_due |= ring_moved;
        self.held = false;
    }

    /// When a settle retry is due (none while a move is).
    fn retry_at(&self) -> Option<Instant> {
        if self.move_due {
            return None;
        }
        self.unsettled.as_ref().map(|u| u.1)
    }

    /// The job to start at `now`, if any, with the wait before retrying what it leaves
    /// unsettled. Call only when no job runs.
    fn next(&mut self, now: Instant) -> Option<(TreeJob, std::time::Duration)> {
        if self.move_due {
            if self.held {
                return None;
            }
            self.move_due = false;
            self.unsettled = None;
            return Some((TreeJob::Move, TREE_SETTLE_RETRY[0]));
        }
        let (work, _, wait) = self.unsettled.take_if(|u| u.1 <= now)?;
        Some((TreeJob::Settle(work), wait))
    }

    /// A job ended at `now` (`None`: it failed); `wait` is what [`TreeJobs::next`] gave with
    /// it. Returns the segments still unsettled once the wait has reached its longest (worth a
    /// warning).
    fn finished(
        &mut self,
        work: Option<TreeWork>,
        wait: std::time::Duration,
        now: Instant,
    ) -> Option<usize> {
        let Some(work) = work else {
            self.move_due = true;
            self.held = true;
            return None;
        };
        if work.unsettled.is_empty() {
            return None;
        }
        let segments = work.unsettled.len();
        let next_wait = (wait * 2).min(TREE_SETTLE_RETRY[1]);
        self.unsettled = Some((work, now + wait, next_wait));
        (wait >= TREE_SETTLE_RETRY[1]).then_some(segments)
    }
}

/// Lowers the calling thread's CPU priority (nice + 10; on Linux the nice value is per thread).
/// Best effort: a refusal leaves it as it was.
fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: plain system calls on the calling thread, no memory handed over.
    unsafe {
        let tid = libc::gettid() as libc::id_t;
        *libc::__errno_location() = 0;
        let current = libc::getpriority(libc::PRIO_PROCESS as _, tid);
        if *libc::__errno_location() == 0 {
            let _ = libc::setpriority(libc::PRIO_PROCESS as _, tid, (current + 10).min(19));
        }
    }
}

/// What a move of the Merkle trees to a new ring did (see [`Node::retarget_trees`]).
#[derive(Debug)]
pub struct TreeWork {
    /// The trees' ring the work was for.
    pub generation: u64,
    pub map: Arc<PeerMap>,
    /// Keys read from storage.
    pub scanned: u64,
    /// Cut segments a write in flight kept from settling: try again shortly.
    pub unsettled: Vec<u32>,
}

/// Counts one coordinated request against the view it started on.
struct InflightGuard {
    node: Arc<Node>,
    seq: u64,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        let mut inflight = self.node.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = inflight.get_mut(&self.seq) {
            *count -= 1;
            if *count == 0 {
                inflight.remove(&self.seq);
            }
        }
    }
}

/// A replica call's target and what it stands for: `hint_for` is the primary a fallback covers.
struct Sent {
    node: NodeId,
    hint_for: Option<NodeId>,
}

impl Node {
    /// A node serving `view` (the configured ring, [`ClusterView::from_members`]) until gossip
    /// tells it more.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: ValidConfig,
        view: ClusterView,
        store: Store,
        dot_id: NodeId,
        hints: Hints,
        peers: PeerPool,
        gossip: Gossip,
        metrics: Metrics,
        wall: WallClock,
    ) -> Result<Node, dynakv_core::merkle::MerkleError> {
        metrics.set_ring_version(view.ring.version());
        peers.set_members(&view.peer_addresses());
        Ok(Node {
            id: config.node_id.clone(),
            cluster_tag: cluster_tag(&config.raw.cluster_id),
            trees: Trees::new(config.raw.anti_entropy.leaf_bits)?,
            config,
            store,
            hints,
            gossip,
            member_returned: Arc::new(tokio::sync::Notify::new()),
            configured_ring: view.ring.nodes().to_vec(),
            dot_id,
            background: Arc::new(tokio::sync::Semaphore::new(MAX_BACKGROUND_TASKS)),
            reads: Default::default(),
            unsynced: Default::default(),
            stopping: Default::default(),
            heard_from_cluster: std::sync::atomic::AtomicBool::new(true),
            awaited_change: Mutex::new(None),
            stray_keys: Mutex::new(Vec::new()),
            stray_writes: std::sync::atomic::AtomicBool::new(false),
            peers,
            metrics,
            view: RwLock::new(Arc::new(view)),
            inflight: Mutex::new(BTreeMap::new()),
            clock: Mutex::new(HybridClock::new()),
            write_ids: std::sync::atomic::AtomicU64::new(0),
            started_ms: wall(),
            wall,
        })
    }

    pub fn view(&self) -> Arc<ClusterView> {
        self.view.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Makes this node wait until gossip hears from another member before it coordinates a
    /// request, takes an admin change or drives a ring change. Two starts need it:
    /// - a restart in the middle of ring change `acked`, which it had acked: the others may
    ///   have gone on to stream the moving ranges, and a write it coordinated on the old ring
    ///   alone could miss the new owners, and a sweep on the old ring alone would drop keys it
    ///   holds in the new one (whose pull it may have finished before it stopped). Hearing one
    ///   member is not enough: that one may not carry the proposal (it restarted too, say). The
    ///   node waits until its view shows the change or a committed ring past the one it
    ///   restarted with ([`RingState::knows_fate_of`]). Meanwhile it acks another change it
    ///   sees (a removal of that change's proposer, which it may never hear of, needs it), but
    ///   coordinates nothing and drops nothing. (A node that was down when a change began
    ///   cannot miss it: the change waits for its ack before anything streams.)
    /// - a node joining through seeds that knows no other member yet: its view is a ring of
    ///   its own. Were it to serve or commit on it, it would answer reads as the only replica
    ///   of every key, acknowledge writes no other node holds, and bring its own ring into the
    ///   cluster's without a handoff.
    ///
    /// A node alone in its ring whose seeds are only itself (the first node of a new cluster
    /// of one) does not wait: there is nobody to hear from.
    pub fn wait_for_cluster(&self, acked: Option<u64>) {
        let view = self.view();
        let seeds = &self.config.raw.seeds;
        let alone = view.ring.nodes().iter().all(|m| m.id == self.id)
            && seeds.iter().all(|s| *s == self.config.advertise);
        if !alone {
            if let Some(id) = acked {
                tracing::info!(
                    change = format!("{id:016x}"),
                    "restarted in the middle of a ring change: coordinating nothing until this \
                     node hears how the change went"
                );
            }
            *self
                .awaited_change
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = acked.map(|id| (id, view.ring.version()));
            self.heard_from_cluster
                .store(false, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Whether the rebalance driver may ack the changes of its view: once the node heard from
    /// the cluster, or, while a restarted node waits to hear what became of its change, for a
    /// change it sees (see [`Node::wait_for_cluster`]).
    pub fn may_ack(&self, view: &ClusterView) -> bool {
        self.has_heard_from_cluster()
            || (self
                .awaited_change
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some()
                && !view.rings.changes().is_empty())
    }

    /// Whether this node may act on its view (see [`Node::wait_for_cluster`]).
    pub fn has_heard_from_cluster(&self) -> bool {
        self.heard_from_cluster
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The current view, registered as in use by one coordinated request until the guard drops.
    fn enter_view(self: &Arc<Self>) -> (Arc<ClusterView>, InflightGuard) {
        let view = self.view();
        *self
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(view.seq)
            .or_insert(0) += 1;
        let guard = InflightGuard {
            node: self.clone(),
            seq: view.seq,
        };
        (view, guard)
    }

    /// The stray keys noted since the last call (see [`Node::note_stray`]).
    pub fn take_stray_keys(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.stray_keys.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Notes a key stored here that this node holds in no live ring, to be dropped; past
    /// [`MAX_STRAY_KEYS`] only the mark for a full sweep is set.
    pub fn note_stray(&self, key: Vec<u8>) {
        let mut keys = self.stray_keys.lock().unwrap_or_else(|p| p.into_inner());
        if keys.contains(&key) {
            return;
        }
        if keys.len() < MAX_STRAY_KEYS {
            keys.push(key);
        } else {
            self.stray_writes
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Whether stray keys overflowed [`MAX_STRAY_KEYS`] since the last call (a full sweep is
    /// due); clears the mark.
    pub fn take_stray_writes(&self) -> bool {
        self.stray_writes
            .swap(false, std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether every request that started on a view older than `seq` has finished.
    pub fn drained_before(&self, seq: u64) -> bool {
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .range(..seq)
            .next()
            .is_none()
    }

    pub fn n(&self) -> usize {
        self.config.raw.replication.n as usize
    }

    /// Stops new writes from starting, then waits up to `within` until every started write's
    /// local copy is durable. Returns whether none is left; only then may the next start keep
    /// this node's dot id ([`record_clean_stop`]).
    pub async fn stop_writes(&self, within: std::time::Duration) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        self.stopping.store(true, SeqCst);
        let deadline = Instant::now() + within;
        while self.unsynced.load(SeqCst) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        true
    }

    /// Whether gossip holds `id` to be down. The coordinator then does not wait for it: its
    /// share goes to a fallback at once. Suspect and not-yet-heard-of members are not down;
    /// this node never is.
    pub fn is_down(&self, id: &NodeId) -> bool {
        *id != self.id && self.gossip.is_down(id)
    }

    /// Whether requests to `id` should not be waited for now: gossip holds it down, or it left a
    /// request unanswered too long with nothing heard since (silent: paused, or cut off, seconds
    /// before gossip notices). A silent peer is tried again after a short hold.
    pub fn is_unreachable(&self, id: &NodeId) -> bool {
        self.is_down(id) || (*id != self.id && self.peers.is_silent(id))
    }

    /// Liveness of `id` as gossip sees it (`None`: not heard of yet).
    pub fn member_state(&self, id: &NodeId) -> Option<MemberState> {
        if *id == self.id {
            return Some(MemberState::Alive);
        }
        self.gossip.state_of(id)
    }

    /// Takes in a new membership snapshot: members that came back wake hint delivery and
    /// anti-entropy, and a changed ring replaces the view (and the Merkle trees, whose peer
    /// sets follow the ring). Returns whether the ring changed.
    pub fn apply_membership(
        &self,
        previous: &MembershipSnapshot,
        snapshot: &MembershipSnapshot,
    ) -> bool {
        // Set once the view below is installed, so nothing acts on the view from before.
        let heard = snapshot
            .members
            .iter()
            .any(|m| m.id != self.id && m.state == MemberState::Alive);
        let changed = self.follow_snapshot(previous, snapshot);
        if heard && changed.is_some() {
            let mut awaited = self
                .awaited_change
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let knows = awaited
                .is_none_or(|(id, restarted_on)| self.view().rings.knows_fate_of(id, restarted_on));
            if knows {
                if let Some((id, _)) = awaited.take() {
                    tracing::info!(
                        change = format!("{id:016x}"),
                        "heard how the ring change this node restarted in went"
                    );
                }
                self.heard_from_cluster
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        changed.unwrap_or(false)
    }

    /// Installs the view of `snapshot`. Returns whether the committed ring changed, or `None`
    /// when the snapshot makes no ring (the view stays as it was).
    fn follow_snapshot(
        &self,
        previous: &MembershipSnapshot,
        snapshot: &MembershipSnapshot,
    ) -> Option<bool> {
        let mut returned = false;
        for change in snapshot.changes_since(previous) {
            if change.id != self.id
                && change.now == Some(MemberState::Alive)
                && (change.was != Some(MemberState::Alive) || change.restarted)
            {
                // Whatever it missed while away: hints cover what fallbacks took, a full
                // exchange the rest.
                self.trees.queue(&change.id, None);
                returned = true;
                // It may run another version now: learn what it advertises.
                self.peers.reprobe(&change.id);
            }
        }
        if returned {
            self.member_returned.notify_one();
        }
        let current = self.view();
        let view = match ClusterView::from_snapshot(
            snapshot,
            &self.configured_ring,
            &self.config.members,
        ) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "gossiped membership does not make a ring; keeping the current one");
                return None;
            }
        };
        if view.ring.version() == current.ring.version() {
            // Proposals, acks and liveness change the rings reads and writes use, not the
            // committed ring: install the new view, keep the trees.
            self.set_view(view);
            return Some(false);
        }
        tracing::info!(
            from = format!("{:016x}", current.ring.version()),
            to = format!("{:016x}", view.ring.version()),
            members = view.members.len(),
            "ring changed"
        );
        self.set_view(view);
        Some(true)
    }

    fn set_view(&self, mut view: ClusterView) {
        view.seq = self.view().seq + 1;
        self.metrics.set_ring_version(view.ring.version());
        self.metrics
            .ring_versions_live
            .set(view.rings.write_rings().len() as i64);
        self.peers.set_members(&view.peer_addresses());
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(view);
    }

    pub fn is_lww(&self) -> bool {
        self.config.raw.replication.conflict_mode == ConflictMode::Lww
    }

    /// Whether writes may carry write ids (`dynakv_core::write_id`): `siblings` mode, this
    /// node's `replication.write_ids`, and no peer known to lack them (a node of an older
    /// version refuses values and contexts that carry them: docs/kubernetes.md, "Upgrade").
    pub fn write_ids_usable(&self) -> bool {
        !self.is_lww()
            && self.config.raw.replication.write_ids
            && self.peers.without_write_ids().is_empty()
    }

    /// Applies the cluster's conflict policy to a merged clock.
    pub fn resolve(&self, clock: Clock) -> Clock {
        if self.is_lww() {
            clock.lww_resolve()
        } else {
            clock
        }
    }

    /// The context a client gets for `clock`: its version vector, and the write ids of its
    /// values unless a peer lacks write ids (a node of an older version refuses a context
    /// that carries them).
    pub fn encode_context(&self, clock: &Clock) -> Vec<u8> {
        self.context_of(clock, self.write_ids_usable())
    }

    /// `clock`'s context, with its values' write ids if `with_ids`.
    fn context_of(&self, clock: &Clock, with_ids: bool) -> Vec<u8> {
        let ids = if with_ids {
            clock.read_ids()
        } else {
            Vec::new()
        };
        encode_context_with_ids(&clock.join(), &ids, self.cluster_tag)
    }

    /// `vv` as a context without write ids, for a node that may not know them.
    pub fn encode_plain_context(&self, vv: &VersionVector) -> Vec<u8> {
        encode_context_with_ids(vv, &[], self.cluster_tag)
    }

    /// A client's context: the version vector, and the write ids of the values it read.
    pub fn decode_context(
        &self,
        bytes: &[u8],
    ) -> Result<(VersionVector, Vec<WriteId>), ContextError> {
        decode_context_with_ids(bytes, self.cluster_tag)
    }

    /// How long after a forwarding node first sent a write a coordinator may still apply it:
    /// the longest request deadline, plus the clock drift the hybrid clocks tolerate.
    pub fn forward_lifetime_ms(&self) -> u64 {
        let drift = self
            .clock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .max_drift_ms();
        self.config.raw.limits.max_request_timeout_ms + drift
    }

    /// Which superseded ids a new value carries: those younger than the grace period (and at
    /// least twice the forward lifetime), all of those younger than twice the lifetime
    /// (`dynakv_core::write_id`, "Bounds").
    fn carry(&self) -> Carry {
        let young_ms = self.forward_lifetime_ms().saturating_mul(2);
        Carry {
            horizon_ms: self.config.raw.tombstone_gc.grace_ms.max(young_ms),
            young_ms,
        }
    }

    /// A new forwarded write's id: unique (a hash of this node's dot id, process, start, a
    /// counter and the hybrid time) and stamped with the hybrid time it is first sent at.
    pub fn mint_write_id(&self) -> WriteId {
        let n = self
            .write_ids
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let at = self.now();
        let mut seed = Vec::with_capacity(64);
        seed.extend_from_slice(self.dot_id.as_str().as_bytes());
        seed.extend_from_slice(&std::process::id().to_le_bytes());
        seed.extend_from_slice(&self.started_ms.to_le_bytes());
        seed.extend_from_slice(&n.to_le_bytes());
        seed.extend_from_slice(&at.as_u64().to_le_bytes());
        WriteId {
            id: dynakv_core::hash::hash128(&seed),
            at,
        }
    }

    /// Whether a write id a forwarding node sent may be taken: not stamped further ahead of this
    /// node's wall clock than the hybrid clocks tolerate (an id from the future would never age).
    pub fn plausible_write_id(&self, w: &WriteId) -> bool {
        let drift = self
            .clock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .max_drift_ms();
        w.at.physical_ms() <= (self.wall)().saturating_add(drift)
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

    /// Whether this node is a replica of `key` in the ring reads use (only those coordinate
    /// writes: they hold the key's history, so the dots they mint are new); otherwise those
    /// replicas, to forward to.
    pub fn replicas_if_not_local(&self, key: &[u8]) -> Option<Vec<NodeId>> {
        let (primaries, _) = self.view().read_walk(key_position(key), self.n());
        if primaries.contains(&self.id) {
            None
        } else {
            Some(primaries)
        }
    }

    /// Whether this node may coordinate requests on its own view of the ring: it owns part of
    /// the committed ring (see `RingState::coordinates_reads`). A node of weight 0 (joined by
    /// seeds, or drained) forwards its reads, and refuses requests forwarded to it: a ring
    /// change may commit without its ack while its view still shows the old ring.
    pub fn coordinates(&self) -> bool {
        self.view().rings.coordinates_reads()
    }

    /// Members that may coordinate a read of `key` for a node that does not ([`Self::coordinates`]):
    /// the key's replicas in its read ring, then the ring's next members, at most N + 2, without
    /// itself.
    pub fn read_coordinators(&self, key: &[u8]) -> Vec<NodeId> {
        let (mut all, fallbacks) = self.view().read_walk(key_position(key), self.n());
        all.extend(fallbacks);
        all.retain(|n| *n != self.id);
        all.truncate(self.n() + 2);
        all
    }

    /// Peers this node shares a stored key with (both in its preference list).
    pub fn co_replicas(&self, view: &ClusterView, stored_key: &[u8]) -> Vec<NodeId> {
        let Some((pos, _)) = split_data_key(stored_key) else {
            return Vec::new();
        };
        let prefs: Vec<NodeId> = view
            .ring
            .preference_list(pos, self.n())
            .into_iter()
            .map(|i| view.ring.nodes()[i].id.clone())
            .collect();
        if !prefs.contains(&self.id) {
            return Vec::new();
        }
        prefs.into_iter().filter(|p| *p != self.id).collect()
    }

    /// The keys and bytes this node likely holds in ring range `(start, end]`: its totals scaled
    /// by the range's share of the key space it replicates (for handoff progress estimates).
    pub fn estimate_range(&self, start: u64, end: u64) -> (u64, u64) {
        let stats = self.store.stats();
        let view = self.view();
        let n = self.n();
        let share = view
            .ring
            .node_index(self.id.as_str())
            .and_then(|i| view.ring.ownership(n).into_iter().find(|o| o.node == i))
            .map_or(0.0, |o| o.replica * n.min(view.ring.len()).max(1) as f64);
        let len = match end.wrapping_sub(start) {
            0 => 1.0,
            l => l as f64 / 18_446_744_073_709_551_616.0,
        };
        let fraction = if share > 0.0 {
            (len / share).min(1.0)
        } else {
            1.0
        };
        (
            (stats.keys as f64 * fraction) as u64,
            (stats.bytes as f64 * fraction) as u64,
        )
    }

    /// The peers the Merkle trees follow: this node's co-replicas in the committed ring of `view`.
    pub fn peer_map(&self, view: &ClusterView) -> PeerMap {
        PeerMap::new(&view.ring, self.n(), &self.id)
    }

    /// Rebuilds the Merkle trees from a scan of all of storage (at start, before serving).
    pub fn rebuild_trees(&self) -> Result<u64, StorageError> {
        use std::ops::Bound;
        self.trees.reset(self.peer_map(&self.view()));
        let mut count = 0;
        let mut after: Option<Vec<u8>> = None;
        loop {
            let from = match &after {
                Some(k) => Bound::Excluded(k.as_slice()),
                None => Bound::Unbounded,
            };
            let page = self.store.scan(
                Table::Data,
                from,
                Bound::Unbounded,
                crate::storage::ScanLimit::entries(4096),
            )?;
            for (k, v) in &page.entries {
                self.trees.record(k, None, Some(v));
                count += 1;
            }
            match page.next {
                Some(n) => after = Some(n),
                None => return Ok(count),
            }
        }
    }

    /// Moves the Merkle trees to the committed ring of the current view (after a ring change):
    /// in memory, but for the segments a range boundary cuts, which are scanned (see
    /// [`Trees::follow`]).
    pub fn retarget_trees(&self) -> Result<TreeWork, StorageError> {
        let (generation, map, cut) = self.trees.follow(self.peer_map(&self.view()));
        self.settle_trees(generation, map, cut)
    }

    /// Fills the leaves of cut segments from a scan of each; those with a write in flight are
    /// returned to be tried again shortly.
    pub fn settle_trees(
        &self,
        generation: u64,
        map: Arc<PeerMap>,
        segments: Vec<u32>,
    ) -> Result<TreeWork, StorageError> {
        use std::ops::Bound;
        let mut work = TreeWork {
            generation,
            map: map.clone(),
            scanned: 0,
            unsettled: Vec::new(),
        };
        let shape = MerkleTree::new(self.trees.leaf_bits()).map_err(|e| StorageError::Corrupt {
            detail: e.to_string(),
        })?;
        for segment in segments {
            let Some((lo_key, hi_key)) = crate::antientropy::segment_bounds(&shape, segment) else {
                continue;
            };
            let to = match &hi_key {
                Some(h) => Bound::Excluded(h.as_slice()),
                None => Bound::Unbounded,
            };
            let mut own = 0u128;
            let mut shared: BTreeMap<NodeId, u128> = BTreeMap::new();
            let mut after: Option<Vec<u8>> = None;
            loop {
                let from = match &after {
                    Some(k) => Bound::Excluded(k.as_slice()),
                    None => Bound::Included(lo_key.as_slice()),
                };
                let page = self.store.scan(
                    Table::Data,
                    from,
                    to,
                    crate::storage::ScanLimit::entries(4096),
                )?;
                for (k, v) in &page.entries {
                    let Some((pos, _)) = split_data_key(k) else {
                        continue;
                    };
                    let entry = entry_hash(k, dynakv_core::hash::hash128(v));
                    own ^= entry;
                    for peer in map.peers(pos) {
                        *shared.entry(peer.clone()).or_default() ^= entry;
                    }
                    work.scanned += 1;
                }
                match page.next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
            match self.trees.settle(generation, segment, own, &shared) {
                Settled::Done => {}
                Settled::Busy => work.unsettled.push(segment),
                // A newer ring's move took over.
                Settled::Stale => return Ok(work),
            }
        }
        Ok(work)
    }

    /// Coordinates a put or delete. The caller has validated sizes and decoded the context.
    pub async fn write(
        self: &Arc<Self>,
        req: WriteRequest,
    ) -> Result<WriteOutcome, CoordinatorError> {
        if !self.has_heard_from_cluster() {
            return Err(CoordinatorError::Starting);
        }
        let (view, _inflight) = self.enter_view();
        if req.forwarded && !view.rings.coordinates_reads() {
            return Err(CoordinatorError::NotCoordinating);
        }
        let n = self.n();
        let pos = key_position(&req.key);
        let (read_primaries, _) = view.read_walk(pos, n);
        if !read_primaries.contains(&self.id) {
            return Err(CoordinatorError::NotReplica(read_primaries));
        }
        let WriteTargets {
            sets,
            targets,
            fallbacks,
        } = view.write_targets(pos, n);
        let stored_key = data_key(&req.key);
        let ts = self.now();
        // While a peer lacks write ids the new value carries none (no id, nothing superseded),
        // so it encodes as version 1 unless other values of the key still carry theirs.
        let ids_usable = req.write_ids;
        let write_id = req.write_id.filter(|_| ids_usable);
        let sibling = match req.value {
            Some(v) => Sibling::live(ts, v),
            None => Sibling::tombstone(ts),
        }
        .with_ids(write_id, Vec::new());
        let coordinator = self.dot_id.clone();
        let lww = self.is_lww();
        let limit = self.config.raw.limits.sibling_max;
        let context = req.context;
        let read_ids = if ids_usable { req.read_ids } else { Vec::new() };
        let lifetime_ms = self.forward_lifetime_ms();
        let carry = if ids_usable {
            self.carry()
        } else {
            Carry::NOTHING
        };
        let this = self.clone();
        // From here until its local copy is durable, this write's dot may be known to other
        // replicas but not to our own disk; a clean stop waits for that (see `Node::stop_writes`).
        let unsynced = UnsyncedGuard::enter(self)?;
        let (applied, durable) = self
            .store
            .update_early(Table::Data, stored_key.clone(), move |current| {
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
                // Checked here, on the writer, as late as it can be before the commit: a
                // forwarded write is applied only within its lifetime.
                if let Some(w) = write_id
                    && !w.may_mint(this.now(), lifetime_ms)
                {
                    return (None, Err(CoordinatorError::Expired { lifetime_ms }));
                }
                let mut next = Clock::put_superseding(
                    stored.as_ref(),
                    &context,
                    &read_ids,
                    sibling,
                    &coordinator,
                    ts,
                    carry,
                );
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
                let old = current.map(<[u8]>::to_vec);
                (
                    Some(Some(bytes.clone())),
                    Ok((next, Bytes::from(bytes), old)),
                )
            })
            .await?;
        let (clock, encoded, old) = applied?;
        // The local copy becomes durable on its own task, whatever happens to this request; the
        // Merkle trees learn the write only once it is on disk.
        let local = {
            let this = self.clone();
            let (stored_key, encoded) = (stored_key.clone(), encoded.clone());
            tokio::spawn(async move {
                let committed = durable.await;
                if committed.is_ok() {
                    this.trees
                        .record(&stored_key, old.as_deref(), Some(&encoded));
                }
                drop(unsynced);
                committed
            })
        };
        let siblings = clock.live_values().count();
        if siblings > self.config.raw.limits.sibling_warn {
            self.metrics.sibling_warnings.inc();
            tracing::warn!(
                key = %String::from_utf8_lossy(&req.key),
                siblings,
                "key has many siblings; clients should write with the context of their read"
            );
        }

        let segment = self.trees.segment_of(key_position(&req.key));
        let mut tracker = QuorumTracker::with_sets(QuorumKind::Write, req.w, !req.sloppy, sets);
        tracker.asked(self.id.clone());
        let mut fallbacks = fallbacks.into_iter();
        let mut hinted: BTreeMap<NodeId, NodeId> = BTreeMap::new();
        let mut calls = FuturesUnordered::new();
        let send = |sent: Sent| {
            let peers = self.peers.clone();
            // A replica gossip holds down, or one that is silent, is not waited for: its share
            // goes to a fallback now.
            let down = self.is_unreachable(&sent.node);
            let op = replica_request::Op::Store(StoreRequest {
                key: req.key.clone(),
                clock: encoded.clone(),
                hint_for: sent
                    .hint_for
                    .as_ref()
                    .map(|h| h.to_string())
                    .unwrap_or_default(),
            });
            let deadline = req.deadline;
            async move {
                let r = if down {
                    Err(PeerError::Unreachable(format!(
                        "{} is down or not answering",
                        sent.node
                    )))
                } else {
                    peers.call(&sent.node, op, deadline).await
                };
                (sent, r)
            }
        };
        // The local commit counts like a replica's durable ack: one more reply to wait for.
        let mut local = Some(local);
        let mut local_failed: Option<StorageError> = None;
        for node in targets.iter().filter(|n| **n != self.id) {
            tracker.asked(node.clone());
            calls.push(send(Sent {
                node: node.clone(),
                hint_for: None,
            }));
        }
        // Hedging: once the slowest remote target's recent high percentile has passed with the
        // quorum still pending, each primary not heard from gets a fallback too (a hint, the
        // same clock: no duplicate), within the node's hedge budget. From then on, every
        // SILENCE_CHECK, a primary that has become silent counts as failed (its share goes to a
        // fallback, or the quorum is lost at once) instead of being waited for until the deadline.
        self.peers.earn_hedge();
        let mut hedge_at = targets
            .iter()
            .filter(|t| **t != self.id)
            .map(|t| self.peers.hedge_delay(t))
            .max()
            .map(|delay| Instant::now() + delay);
        let mut hedged_for: Vec<NodeId> = Vec::new();
        let mut given_up: Vec<NodeId> = Vec::new();
        let mut synthetic: Vec<(Sent, Result<replica_response::Result, PeerError>)> = Vec::new();
        let verdict = loop {
            if *tracker.vote() != Vote::Pending {
                break tracker.vote().clone();
            }
            // A primary given up on for its silence is handled like a failed reply.
            let event = if let Some(reply) = synthetic.pop() {
                Ok(WriteEvent::Reply(Some(reply)))
            } else {
                tokio::time::timeout_at(req.deadline, async {
                    let hedge = async {
                        match hedge_at {
                            Some(at) => tokio::time::sleep_until(at).await,
                            None => std::future::pending().await,
                        }
                    };
                    match local.as_mut() {
                        Some(handle) if !calls.is_empty() => tokio::select! {
                            biased;
                            committed = handle => WriteEvent::Local(committed),
                            reply = calls.next() => WriteEvent::Reply(reply),
                            _ = hedge => WriteEvent::Hedge,
                        },
                        Some(handle) => WriteEvent::Local(handle.await),
                        None if !calls.is_empty() => tokio::select! {
                            biased;
                            reply = calls.next() => WriteEvent::Reply(reply),
                            _ = hedge => WriteEvent::Hedge,
                        },
                        None => WriteEvent::Reply(None),
                    }
                })
                .await
            };
            let (sent, result) = match event {
                Ok(WriteEvent::Local(committed)) => {
                    local = None;
                    local_failed = register_local_commit(&self.id, &mut tracker, committed);
                    continue;
                }
                Ok(WriteEvent::Hedge) => {
                    hedge_at = Some(Instant::now() + SILENCE_CHECK);
                    let slow: Vec<NodeId> = tracker
                        .outstanding()
                        .iter()
                        .filter(|n| targets.contains(n) && **n != self.id)
                        .cloned()
                        .collect();
                    for primary in &slow {
                        if self.peers.is_silent(primary) && !given_up.contains(primary) {
                            given_up.push(primary.clone());
                            let why = format!("{primary} is not answering");
                            synthetic.push((
                                Sent {
                                    node: primary.clone(),
                                    hint_for: None,
                                },
                                Err(PeerError::Unreachable(why)),
                            ));
                        }
                    }
                    for primary in slow {
                        if !req.sloppy
                            || given_up.contains(&primary)
                            || hedged_for.contains(&primary)
                            || !self.peers.try_hedge()
                        {
                            continue;
                        }
                        let Some(f) = fallbacks.by_ref().find(|f| *f != self.id) else {
                            break;
                        };
                        self.metrics
                            .hedges
                            .with_label_values(&["write", "sent"])
                            .inc();
                        hedged_for.push(primary.clone());
                        tracker.asked_for(f.clone(), primary.clone());
                        calls.push(send(Sent {
                            node: f,
                            hint_for: Some(primary),
                        }));
                    }
                    continue;
                }
                Ok(WriteEvent::Reply(Some(reply))) => reply,
                Ok(WriteEvent::Reply(None)) => break tracker.no_more_targets().clone(),
                Err(_) => break tracker.deadline_passed().clone(),
            };
            match classify(result) {
                Ok(()) => {
                    if let Some(primary) = &sent.hint_for {
                        hinted.insert(sent.node.clone(), primary.clone());
                        if hedged_for.contains(primary) && tracker.outstanding().contains(primary) {
                            self.metrics
                                .hedges
                                .with_label_values(&["write", "won"])
                                .inc();
                        }
                    }
                    tracker.register_ack(&sent.node, sent.hint_for.is_some());
                }
                Err(why) => {
                    // The primary this target stood for still needs the write: hand it to the
                    // next fallback as a hint (sloppy quorum), and queue the key's segment for
                    // a targeted anti-entropy exchange with that primary once it is back.
                    let primary = sent.hint_for.clone().unwrap_or_else(|| sent.node.clone());
                    self.trees.queue(&primary, Some(segment));
                    let fallback = req
                        .sloppy
                        .then(|| fallbacks.by_ref().find(|f| *f != self.id))
                        .flatten();
                    match fallback {
                        Some(f) => {
                            tracker.asked_for(f.clone(), primary.clone());
                            calls.push(send(Sent {
                                node: f,
                                hint_for: Some(primary),
                            }));
                        }
                        // No node left to stand in: the coordinator keeps the hint itself.
                        None => self.hint_locally(primary, &stored_key, &clock),
                    }
                    tracker.register_failure(&sent.node, why);
                }
            }
        };
        // Lost before our own commit finished (the other replicas failed fast): wait for it, so
        // the error tells how many copies there are, ours included.
        if let (Vote::Lost(_), Some(handle)) = (&verdict, local.as_mut())
            && let Ok(committed) = tokio::time::timeout_at(req.deadline, handle).await
        {
            local_failed = register_local_commit(&self.id, &mut tracker, committed);
        }
        // The slower replicas still get the write, until the deadline; a primary that fails now
        // gets a local hint and a targeted anti-entropy exchange.
        if !calls.is_empty() {
            match self.background.clone().try_acquire_owned() {
                Ok(permit) => {
                    let this = self.clone();
                    let (stored_key, clock) = (stored_key.clone(), clock.clone());
                    tokio::spawn(async move {
                        while let Some((sent, result)) = calls.next().await {
                            if classify(result).is_err() {
                                let primary = sent.hint_for.unwrap_or(sent.node);
                                this.trees.queue(&primary, Some(segment));
                                this.hint_locally(primary, &stored_key, &clock);
                            }
                        }
                        drop(permit);
                    });
                }
                // Too much background work already: stop waiting for these replicas and let
                // anti-entropy make sure they got the write.
                Err(_) => {
                    for peer in tracker.outstanding() {
                        self.trees.queue(peer, Some(segment));
                    }
                }
            }
        }
        self.note_fast_unavailable("write", &verdict, &tracker);
        let receipt = self.receipt(&tracker, &view, siblings, &hinted);
        match verdict {
            Vote::Won => Ok(WriteOutcome {
                context: self.context_of(&clock, ids_usable),
                receipt,
            }),
            // Our own disk failed: say that, not only that the quorum was missed.
            Vote::Lost(_) | Vote::Pending if local_failed.is_some() => Err(
                CoordinatorError::Storage(local_failed.unwrap_or(StorageError::Closed)),
            ),
            Vote::Lost(_) => Err(self.quorum_error(tracker.error())),
            Vote::Pending => Err(CoordinatorError::Quorum(tracker.error())),
        }
    }

    /// Counts a quorum lost without waiting: every replica that failed was unreachable (down,
    /// silent, or refusing connections), none timed out.
    fn note_fast_unavailable(&self, op: &str, verdict: &Vote, tracker: &QuorumTracker) {
        if matches!(verdict, Vote::Lost(_))
            && tracker
                .failed()
                .iter()
                .all(|(_, why)| *why == ReplicaFailure::Unreachable)
        {
            self.metrics.fast_unavailable.with_label_values(&[op]).inc();
        }
    }

    /// Keeps a hint for `primary` on this node, the coordinator, when no fallback took the
    /// write for it (every fallback failed, none exists as with n = the cluster size, or the
    /// request was strict), as Cassandra's coordinators do. It does not count toward W; it only
    /// brings the write to `primary` as soon as gossip sees it back, instead of at the targeted
    /// anti-entropy exchange already queued for it. Stored in the background, within the bound on
    /// background work and the hint queue bounds.
    fn hint_locally(self: &Arc<Self>, primary: NodeId, stored_key: &[u8], clock: &Clock) {
        if primary == self.id || self.hints.max_per_target() == 0 {
            return;
        }
        let Ok(permit) = self.background.clone().try_acquire_owned() else {
            return;
        };
        let this = self.clone();
        let (stored_key, clock) = (stored_key.to_vec(), clock.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = this.store_hint(primary.clone(), &stored_key, clock).await {
                tracing::debug!(%primary, error = %e, "no local hint; anti-entropy will repair");
            }
        });
    }

    /// Coordinates a read.
    pub async fn read(
        self: &Arc<Self>,
        key: Bytes,
        r: usize,
        sloppy: bool,
        deadline: Instant,
    ) -> Result<ReadOutcome, CoordinatorError> {
        if !self.has_heard_from_cluster() {
            return Err(CoordinatorError::Starting);
        }
        let (view, _inflight) = self.enter_view();
        // Checked on the view the read is coordinated on, not only on the one the service saw.
        if !view.rings.coordinates_reads() {
            return Err(CoordinatorError::NotCoordinating);
        }
        let (primaries, fallbacks) = view.read_walk(key_position(&key), self.n());
        let mut fallbacks = fallbacks.into_iter();
        let mut tracker = QuorumTracker::new(QuorumKind::Read, r, !sloppy);
        let (first, spare) = self.read_order(&primaries, r);
        let mut spare = spare.into_iter();
        let mut calls = FuturesUnordered::new();
        let ask = |sent: Sent| {
            let this = self.clone();
            let key = key.clone();
            async move {
                let r = this.fetch(&sent, key, deadline).await;
                (sent, r)
            }
        };
        // Speculative retry: once the slowest remote replica asked has had its hedge delay with
        // the quorum still pending, the next primary is asked too. Not budgeted: a read asks at
        // most the key's N primaries, as many as a read that asks them all at once.
        let hedge_delay = |nodes: &[NodeId]| {
            nodes
                .iter()
                .filter(|n| **n != self.id)
                .map(|n| self.peers.hedge_delay(n))
                .max()
                .map(|delay| Instant::now() + delay)
        };
        let mut hedge_at = hedge_delay(&first);
        for node in first {
            tracker.asked(node.clone());
            calls.push(ask(Sent {
                node,
                hint_for: None,
            }));
        }
        let mut speculative: Vec<NodeId> = Vec::new();
        let mut answers: Vec<(NodeId, Option<Clock>)> = Vec::with_capacity(primaries.len());
        let mut fallback_answers: Vec<Clock> = Vec::new();
        let mut hinted: BTreeMap<NodeId, NodeId> = BTreeMap::new();
        let verdict = loop {
            if *tracker.vote() != Vote::Pending {
                break tracker.vote().clone();
            }
            let event = tokio::time::timeout_at(deadline, async {
                let hedge = async {
                    match hedge_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    reply = calls.next() => ReadEvent::Reply(reply),
                    _ = hedge => ReadEvent::Hedge,
                }
            })
            .await;
            let (sent, result) = match event {
                Ok(ReadEvent::Reply(Some(reply))) => reply,
                Ok(ReadEvent::Hedge) => {
                    hedge_at = None;
                    if let Some(next) = spare.next() {
                        self.metrics
                            .hedges
                            .with_label_values(&["read", "sent"])
                            .inc();
                        hedge_at = hedge_delay(std::slice::from_ref(&next));
                        speculative.push(next.clone());
                        tracker.asked(next.clone());
                        calls.push(ask(Sent {
                            node: next,
                            hint_for: None,
                        }));
                    }
                    continue;
                }
                Ok(ReadEvent::Reply(None)) => break tracker.no_more_targets().clone(),
                Err(_) => break tracker.deadline_passed().clone(),
            };
            match result {
                Ok(clock) => {
                    if speculative.contains(&sent.node)
                        && tracker
                            .outstanding()
                            .iter()
                            .any(|n| !speculative.contains(n))
                    {
                        self.metrics
                            .hedges
                            .with_label_values(&["read", "won"])
                            .inc();
                    }
                    tracker.register_ack(&sent.node, sent.hint_for.is_some());
                    match &sent.hint_for {
                        None => answers.push((sent.node, clock)),
                        Some(primary) => {
                            hinted.insert(sent.node.clone(), primary.clone());
                            fallback_answers.extend(clock);
                        }
                    }
                }
                Err(why) => {
                    // A primary not asked yet first; once none is left, a fallback for the
                    // failed primary's hint (sloppy quorum).
                    if sent.hint_for.is_none() {
                        if let Some(next) = spare.next() {
                            tracker.asked(next.clone());
                            calls.push(ask(Sent {
                                node: next,
                                hint_for: None,
                            }));
                        } else if let Some(f) = sloppy
                            .then(|| fallbacks.by_ref().find(|f| !primaries.contains(f)))
                            .flatten()
                        {
                            tracker.asked(f.clone());
                            calls.push(ask(Sent {
                                node: f,
                                hint_for: Some(sent.node.clone()),
                            }));
                        }
                    }
                    tracker.register_failure(&sent.node, why);
                }
            }
        };
        self.note_fast_unavailable("read", &verdict, &tracker);
        if let Vote::Lost(e) = verdict {
            return Err(self.quorum_error(e));
        }
        let merged = self.resolve(Clock::sync_all(
            answers
                .iter()
                .filter_map(|(_, c)| c.as_ref())
                .chain(fallback_answers.iter()),
        ));
        // Equal values under several dots (a write coordinated twice) read as one.
        let values: Vec<Sibling> = merged.distinct_live_values();
        self.metrics.siblings_per_read.observe(values.len() as f64);
        let receipt = self.receipt(&tracker, &view, values.len(), &hinted);
        let context = self.encode_context(&merged);

        // Read repair, in the background: wait for the late answers too, then bring every
        // primary that answered with less up to the merge of everything seen.
        // Past the bound on background work the read goes unrepaired; anti-entropy covers it.
        let Ok(permit) = self.background.clone().try_acquire_owned() else {
            return Ok(ReadOutcome {
                values,
                context,
                receipt,
            });
        };
        let this = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            while let Ok(Some((sent, r))) = tokio::time::timeout_at(deadline, calls.next()).await {
                match (r, sent.hint_for) {
                    (Ok(clock), None) => answers.push((sent.node, clock)),
                    (Ok(Some(clock)), Some(_)) => fallback_answers.push(clock),
                    _ => {}
                }
            }
            this.repair(key, answers, fallback_answers, deadline).await;
        });
        Ok(ReadOutcome {
            values,
            context,
            receipt,
        })
    }

    /// Which of a key's primaries a read asks at once, and the spares it asks next (when one
    /// fails or is slow), in order. This node's own copy comes first, then the peers by how long
    /// a request is expected to wait for them; a read asks R of them, or every one for one read
    /// in `replication.read_repair_every` (and whenever R is all of them), so that read repair
    /// keeps visiting every replica.
    fn read_order(&self, primaries: &[NodeId], r: usize) -> (Vec<NodeId>, Vec<NodeId>) {
        let mut remote: Vec<NodeId> = primaries
            .iter()
            .filter(|p| **p != self.id)
            .cloned()
            .collect();
        self.peers.sort_by_expected_wait(&mut remote);
        let local = primaries.contains(&self.id).then(|| self.id.clone());
        let every = u64::from(self.config.raw.replication.read_repair_every);
        let sampled = every > 0
            && self
                .reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .is_multiple_of(every);
        dynakv_core::quorum::read_targets(local, remote, r, sampled)
    }

    async fn repair(
        &self,
        key: Bytes,
        answers: Vec<(NodeId, Option<Clock>)>,
        extra: Vec<Clock>,
        deadline: Instant,
    ) {
        let merged = self.resolve(Clock::sync_all(
            answers
                .iter()
                .filter_map(|(_, c)| c.as_ref())
                .chain(extra.iter()),
        ));
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
            if !behind || self.is_down(node) {
                continue;
            }
            self.metrics.read_repairs.inc();
            let node = node.clone();
            let key = key.clone();
            let encoded = encoded.clone();
            let merged = merged.clone();
            repairs.push(async move {
                let result = if node == self.id {
                    self.merge_local(key.to_vec(), merged)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                } else {
                    let op = replica_request::Op::Store(StoreRequest {
                        key,
                        clock: encoded,
                        hint_for: String::new(),
                    });
                    classify(self.peers.call(&node, op, deadline).await)
                        .map_err(|e| e.as_str().to_string())
                };
                if let Err(e) = result {
                    tracing::debug!(%node, error = %e, "read repair did not reach a replica");
                }
            });
        }
        while repairs.next().await.is_some() {}
    }

    /// One replica's copy of a key (or a fallback's hint for a primary): local or a peer.
    async fn fetch(
        &self,
        sent: &Sent,
        key: Bytes,
        deadline: Instant,
    ) -> Result<Option<Clock>, ReplicaFailure> {
        if sent.node == self.id {
            let local = match &sent.hint_for {
                None => self.read_local(&key),
                Some(p) => self.hints.read(&self.store, p, &data_key(&key)),
            };
            return local.map_err(|e| {
                tracing::warn!(error = %e, "local read failed");
                ReplicaFailure::Refused
            });
        }
        if self.is_unreachable(&sent.node) {
            return Err(ReplicaFailure::Unreachable);
        }
        let op = replica_request::Op::Fetch(FetchRequest {
            key,
            hint_for: sent
                .hint_for
                .as_ref()
                .map(|h| h.to_string())
                .unwrap_or_default(),
        });
        match self.peers.call(&sent.node, op, deadline).await {
            Ok(replica_response::Result::Fetch(f)) if f.clock.is_empty() => Ok(None),
            Ok(replica_response::Result::Fetch(f)) => match Clock::decode(&f.clock) {
                Ok(c) => Ok(Some(c)),
                Err(e) => {
                    tracing::warn!(node = %sent.node, error = %e, "replica sent a clock that does not decode");
                    Err(ReplicaFailure::Refused)
                }
            },
            Ok(_) => Err(ReplicaFailure::Refused),
            Err(e) => Err(PeerError::as_replica_failure(&e)),
        }
    }

    /// Stores (merges) a hint for `target`, durably (see [`Hints::store`]).
    pub async fn store_hint(
        &self,
        target: NodeId,
        stored_key: &[u8],
        clock: Clock,
    ) -> Result<(), HintError> {
        self.hints
            .store(
                &self.store,
                &self.metrics,
                (self.wall)(),
                self.is_lww(),
                target,
                stored_key,
                clock,
            )
            .await
    }

    /// This node's copy of a key.
    pub fn read_local(&self, key: &[u8]) -> Result<Option<Clock>, StorageError> {
        match self.store.get(Table::Data, &data_key(key))? {
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
        let lww = self.is_lww();
        let stored_key = data_key(&key);
        let changed = self
            .store
            .update(Table::Data, stored_key.clone(), move |current| {
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
                    (None, Ok(None))
                } else {
                    let old = current.map(<[u8]>::to_vec);
                    (Some(Some(encoded.clone())), Ok(Some((old, encoded))))
                }
            })
            .await??;
        match changed {
            None => Ok(false),
            Some((old, new)) => {
                let view = self.view();
                if !view.rings.holds(key_position(&key), self.n()) {
                    self.note_stray(key.clone());
                }
                self.trees.record(&stored_key, old.as_deref(), Some(&new));
                Ok(true)
            }
        }
    }

    /// Deletes a key if its stored version still has `digest` (tombstone GC). Returns whether it
    /// was deleted.
    pub async fn purge_local(&self, key: &[u8], digest: u128) -> Result<bool, StorageError> {
        let stored_key = data_key(key);
        let purged = self
            .store
            .update(
                Table::Data,
                stored_key.clone(),
                move |current| match current {
                    Some(v) if dynakv_core::hash::hash128(v) == digest => {
                        (Some(None), Some(v.to_vec()))
                    }
                    _ => (None, None),
                },
            )
            .await?;
        match purged {
            None => Ok(false),
            Some(old) => {
                self.trees.record(&stored_key, Some(&old), None);
                Ok(true)
            }
        }
    }

    fn receipt(
        &self,
        tracker: &QuorumTracker,
        view: &ClusterView,
        siblings: usize,
        hinted: &BTreeMap<NodeId, NodeId>,
    ) -> Receipt {
        let mut replicas: Vec<ReplicaReport> = tracker
            .acked()
            .iter()
            .map(|(node, fallback)| ReplicaReport {
                node: node.clone(),
                fallback: *fallback,
                hint_for: hinted.get(node).cloned(),
                error: None,
            })
            .collect();
        replicas.extend(tracker.failed().iter().map(|(node, why)| ReplicaReport {
            node: node.clone(),
            fallback: hinted.contains_key(node),
            hint_for: hinted.get(node).cloned(),
            error: Some(*why),
        }));
        Receipt {
            coordinator: self.id.to_string(),
            needed: tracker.needed(),
            got: tracker.acked().len(),
            hinted: replicas
                .iter()
                .any(|r| r.hint_for.is_some() && r.error.is_none()),
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

/// A replica's answer to a Store: acked, or why not.
fn classify(result: Result<replica_response::Result, PeerError>) -> Result<(), ReplicaFailure> {
    match result {
        Ok(replica_response::Result::Store(_)) => Ok(()),
        Ok(replica_response::Result::Error(e)) if e.kind == replica_error::Kind::Timeout as i32 => {
            Err(ReplicaFailure::Timeout)
        }
        Ok(_) => Err(ReplicaFailure::Refused),
        Err(e) => Err(e.as_replica_failure()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{MemoryBackend, StoreConfig, StoreMetrics, WriterMode};

    fn work(unsettled: &[u32]) -> TreeWork {
        TreeWork {
            generation: 1,
            map: Arc::default(),
            scanned: 0,
            unsettled: unsettled.to_vec(),
        }
    }

    fn is_move(next: &Option<(TreeJob, std::time::Duration)>) -> bool {
        matches!(next, Some((TreeJob::Move, _)))
    }

    #[test]
    fn tree_jobs_move_on_a_ring_change_and_retry_unsettled_segments_with_a_doubling_wait() {
        let ms = std::time::Duration::from_millis;
        let t0 = Instant::now();
        let mut jobs = TreeJobs::default();
        // A view that changes nothing starts nothing.
        jobs.viewed(false);
        assert!(jobs.next(t0).is_none());
        assert_eq!(jobs.retry_at(), None);
        // A ring change: one move, with the first wait.
        jobs.viewed(true);
        let next = jobs.next(t0);
        assert!(is_move(&next));
        assert_eq!(next.unwrap().1, ms(50));
        assert!(jobs.next(t0).is_none(), "one move per ring change");
        // It left two segments unsettled: retried after 50 ms, then 100, 200, ... up to 5 s.
        assert_eq!(jobs.finished(Some(work(&[3, 9])), ms(50), t0), None);
        assert_eq!(jobs.retry_at(), Some(t0 + ms(50)));
        assert!(jobs.next(t0 + ms(49)).is_none(), "not before its time");
        let mut now = t0 + ms(50);
        let mut expected = ms(100);
        for _ in 0..10 {
            let Some((TreeJob::Settle(left), wait)) = jobs.next(now) else {
                panic!("a settle retry is due at {now:?}");
            };
            assert_eq!(left.unsettled, vec![3, 9]);
            assert_eq!(wait, expected);
            let warned = jobs.finished(Some(left), wait, now);
            // Worth a warning only once the wait has reached its longest.
            assert_eq!(warned, (wait == ms(5_000)).then_some(2));
            now += wait;
            assert_eq!(jobs.retry_at(), Some(now));
            expected = (expected * 2).min(ms(5_000));
        }
        // Settled at last: nothing more to do.
        let Some((TreeJob::Settle(left), wait)) = jobs.next(now) else {
            panic!("a settle retry is due");
        };
        assert_eq!(
            jobs.finished(
                Some(TreeWork {
                    unsettled: vec![],
                    ..left
                }),
                wait,
                now
            ),
            None
        );
        assert_eq!(jobs.retry_at(), None);
        assert!(jobs.next(now + ms(60_000)).is_none());
    }

    #[test]
    fn tree_jobs_a_ring_change_replaces_a_pending_retry_and_a_failure_waits_for_the_next_view() {
        let ms = std::time::Duration::from_millis;
        let t0 = Instant::now();
        let mut jobs = TreeJobs::default();
        jobs.viewed(true);
        assert!(is_move(&jobs.next(t0)));
        jobs.finished(Some(work(&[1])), ms(50), t0);
        // A newer ring arrives before the retry: no retry (the move redoes the segments).
        jobs.viewed(true);
        assert_eq!(jobs.retry_at(), None, "no retry timer while a move is due");
        assert!(is_move(&jobs.next(t0 + ms(50))));
        assert!(
            jobs.next(t0 + ms(10_000)).is_none(),
            "the old retry is gone"
        );
        // The move fails (a storage error): moving again waits for the next view.
        jobs.finished(None, ms(50), t0);
        assert!(
            jobs.next(t0 + ms(10_000)).is_none(),
            "no tight loop on a failure"
        );
        jobs.viewed(false);
        assert!(is_move(&jobs.next(t0)), "any view releases the held move");
        // A failed settle also moves again.
        jobs.finished(Some(work(&[2])), ms(50), t0);
        let Some((TreeJob::Settle(_), _)) = jobs.next(t0 + ms(50)) else {
            panic!("a settle retry is due");
        };
        jobs.finished(None, ms(100), t0 + ms(50));
        jobs.viewed(false);
        assert!(is_move(&jobs.next(t0 + ms(60))));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_tree_move_thread_runs_at_a_lower_priority_and_only_it() {
        // SAFETY: getpriority on the calling thread.
        let nice =
            || unsafe { libc::getpriority(libc::PRIO_PROCESS as _, libc::gettid() as libc::id_t) };
        let before = nice();
        let lowered = std::thread::spawn(move || {
            lower_thread_priority();
            nice()
        })
        .join()
        .expect("the thread");
        assert_eq!(lowered, (before + 10).min(19));
        assert_eq!(nice(), before, "the caller's thread keeps its priority");
    }

    fn open(disk: &MemoryBackend) -> Store {
        let config = StoreConfig {
            writer: WriterMode::Task(tokio::runtime::Handle::current()),
            ..StoreConfig::default()
        };
        Store::open(Arc::new(disk.clone()), config, StoreMetrics::new().unwrap()).unwrap()
    }

    /// A start after a clean stop keeps the dot id; a start after a crash (no clean-stop record)
    /// draws a new one, so counters the other replicas may hold for writes this disk never
    /// recorded are never minted again under the same id.
    #[tokio::test]
    async fn only_a_clean_stop_keeps_the_dot_id() {
        let id = NodeId::new("n1").unwrap();
        let disk = MemoryBackend::new();
        let store = open(&disk);
        let clean = take_clean_stop(&store).await.unwrap();
        assert!(!clean, "a fresh data directory has no clean stop");
        let first = load_dot_id(&store, &id, 1_000, !clean).await.unwrap();
        record_clean_stop(&store).await.unwrap();
        store.close().await;
        disk.crash();

        let store = open(&disk);
        let clean = take_clean_stop(&store).await.unwrap();
        assert!(clean);
        let kept = load_dot_id(&store, &id, 2_000, !clean).await.unwrap();
        assert_eq!(kept, first, "a clean stop keeps the id");
        store.close().await;
        disk.crash(); // no clean stop recorded this time

        let store = open(&disk);
        let clean = take_clean_stop(&store).await.unwrap();
        assert!(!clean, "the run that crashed was marked running");
        let fresh = load_dot_id(&store, &id, 3_000, !clean).await.unwrap();
        assert_ne!(fresh, first, "a crash draws a new id");
        assert!(fresh.as_str().starts_with("n1."), "{fresh}");
    }

    #[tokio::test]
    async fn generations_grow_across_starts_whatever_the_clock() {
        let disk = MemoryBackend::new();
        let store = open(&disk);
        let a = next_generation(&store, 5_000).await.unwrap();
        let b = next_generation(&store, 10).await.unwrap();
        let c = next_generation(&store, 9_000).await.unwrap();
        assert_eq!(a, 5_000);
        assert_eq!(b, 5_001, "a clock that went back does not lower it");
        assert_eq!(c, 9_000);
    }
}
