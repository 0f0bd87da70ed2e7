//! Ring transitions: how the ring moves from one version to the next without losing an
//! acknowledged write or letting a quorum read go back in time (DESIGN.md section 7).
//!
//! # The protocol
//!
//! Membership change is declarative. An admin sets a member's *target* weight (or asks it to
//! leave, or asks the cluster to forget a member that is gone); the member records it in the
//! metadata it gossips ([`ChangeState`]). The cluster then runs **one change at a time**, each a
//! transition from the *committed* ring (built from every member's committed weight and tokens)
//! to a *proposed* ring that differs in one member:
//!
//! 1. **Propose.** When no change is visible, a member whose target differs from its weight
//!    gossips a [`Proposal`]: its next weight and tokens (tokens cut or extended, never moved:
//!    only its own ranges change hands), against the committed ring's version (`base`). A Remove
//!    is proposed by the node that took the request, about the member that is gone.
//! 2. **Writing.** Every node writes to the committed ring *and* to the ring of every proposal
//!    it sees, with W acks in each ([`crate::quorum::QuorumTracker::with_sets`]). A node acks
//!    [`AckLevel::Writing`] once the writes it started before it saw the change have finished.
//! 3. **Synced.** Once every participant is at `Writing`, no acknowledged write can miss a new
//!    owner any more: each node that gains ranges ([`RingState::gains`]) pulls them from their
//!    old replicas, durably, and acks [`AckLevel::Synced`]; a node that gains nothing acks at once.
//! 4. **Reading.** Once every participant is at `Synced`, each node reads from the proposed
//!    ring ([`RingState::read_ring`]) and acks [`AckLevel::Reading`] once its reads on the old
//!    ring have finished.
//! 5. **Commit.** Once every participant is at `Reading`, the proposer commits: the subject's
//!    weight and tokens become the proposal's (a Remove adds the subject to the removed list). The
//!    old ring is retired: nodes write only to the new one, and old owners may drop the ranges
//!    they hold in no live ring ([`RingState::holds`]).
//!
//! *Participants* are every member that has not left and is not removed (down ones included:
//! a member that may come back with writes in flight must have acked), plus configured ring
//! members gossip has not heard of. A change waits for all of them; a member gone for good is
//! removed first.
//!
//! # Who may coordinate a read
//!
//! Only a member that owns part of the committed ring (weight above 0) in its own view, and is
//! not the subject of the removal under way ([`RingState::coordinates_reads`]). Such a member is
//! a participant in every proposer's view (a proposal is made against the committed ring, and
//! that ring lists it), so no change commits before it reads from the new ring. A member of
//! weight 0 (a node that joined by seeds, or one that drained) is waited for only by proposers
//! that have heard of it: a change may commit without it while its view still shows the old
//! ring, so it forwards its reads to a replica of the key instead, and refuses requests
//! forwarded to it. One exception: the proposer of the change under way, once it reads from
//! that change's ring. Every participant acked that change up to `Synced`, so each has heard
//! of the proposer and counts it as a participant of any change that could win instead, and
//! that change cannot commit before the proposer acks it too. A member of weight 0 also does
//! not enter the ring's version ([`Ring::version`]), so one joining in the middle of a change
//! does not make that change's base stale in the views that hear of it.
//!
//! # Concurrent changes
//!
//! Proposals are made only when no other is visible (except a removal of a member the change
//! under way waits for, which overtakes it), but two nodes may propose at the same moment. Every node then takes the same *winner* ([`RingState::current`]): the first eligible
//! proposal (made against the committed ring every node agrees on) by (kind: removals first,
//! subject, id). A node acks only the winner; the others stay queued, and are still written to
//! (writing to more replicas than needed is always safe). A queued proposal whose base is no
//! longer the committed ring is withdrawn by its proposer and made anew. A node that had
//! switched its reads to a proposal that then lost switches back to the committed ring, which
//! every writer still writes to: the loser cannot commit (an overtaking removal is proposed
//! only by a node that has not acked reading from the change it overtakes, and a loser at
//! the start of its run has no reading acks). A losing proposal is withdrawn only after the
//! winner committed, by which time every participant reads from the winner's ring. The simulation's
//! concurrent-change scenarios exercise this.
//!
//! # Invariants
//!
//! - Pure: a [`RingState`] is a function of one membership snapshot (and the configured ring);
//!   every decision is a function of it and the node's [`LocalProgress`].
//! - Levels only rise for a given change ([`RingState::next_ack`] never lowers one).
//! - The read ring is the committed ring or the winner's, and it is the winner's only when every
//!   participant had synced; every write ring set contains the read ring.
//! - At commit, every participant reads from the new ring, so no read uses the ring that retires.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::NodeId;
use crate::membership::{
    Ack, AckLevel, ChangeKind, Lifecycle, MAX_REMOVED, MemberState, MembershipSnapshot,
    NodeMetadata, Proposal,
};
use crate::ring::{Handoff, MAX_WEIGHT, NodeSpec, Ring, RingError, handoffs};

/// A proposal as every node sees it: who made it, its id, and the ring it leads to.
#[derive(Clone, Debug)]
pub struct Change {
    pub proposer: NodeId,
    pub proposal: Proposal,
    /// [`Proposal::id`].
    pub id: u64,
    /// The committed ring with the change applied.
    pub ring: Arc<Ring>,
    /// Made against the committed ring (`base` is its version): only such a change may run.
    pub eligible: bool,
}

impl Change {
    /// The subject's weight before the change, in `committed`.
    pub fn from_weight(&self, committed: &Ring) -> u32 {
        committed
            .node_index(self.proposal.subject.as_str())
            .map_or(0, |i| committed.nodes()[i].weight)
    }
}

/// Where the change under way stands, from one node's view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Waiting until every participant writes to both rings.
    Announced,
    /// New owners pull their ranges.
    Streaming,
    /// Reads move to the new ring.
    Switching,
    /// Every participant reads from the new ring: the proposer commits.
    Retiring,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Announced => "announced",
            Phase::Streaming => "streaming",
            Phase::Switching => "switching",
            Phase::Retiring => "retiring",
        }
    }

    /// The level every participant must reach for the phase to end.
    fn awaits(self) -> AckLevel {
        match self {
            Phase::Announced => AckLevel::Writing,
            Phase::Streaming => AckLevel::Synced,
            Phase::Switching | Phase::Retiring => AckLevel::Reading,
        }
    }
}

/// What the node's shell knows that gossip does not: how far its own work has come. Each field
/// names the change it is true for, so a stale fact never counts for a newer change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalProgress {
    /// Every write this node started before it saw this change has finished.
    pub writes_drained: Option<u64>,
    /// This node holds every range this change gives it (its handoff is complete and durable).
    pub synced: Option<u64>,
    /// This node reads from this change's ring, and its reads on other rings have finished.
    pub reads_drained: Option<u64>,
    /// This node still holds hints for others (a leaving node hands them over before it leaves).
    pub holds_hints: bool,
    /// Members an admin asked this node to remove and that are not removed yet, to propose when
    /// the ring is free.
    pub remove_requested: Vec<NodeId>,
}

/// Why an admin request was refused. Nothing changed. Variant names are stable (metric labels).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChangeRefused {
    #[error("weight {weight} is out of range: use 0..={MAX_WEIGHT} (100 is normal)")]
    WeightOutOfRange { weight: u32 },
    #[error("node {0} is not a member of this cluster")]
    UnknownNode(NodeId),
    #[error("node {0} was removed from the cluster; start it with a new data directory to rejoin")]
    Removed(NodeId),
    #[error(
        "{node} cannot go to weight 0: only {left} members would keep a weight above 0, and \
         N={n} replicas need at least {n}; add or ramp up another node first"
    )]
    BelowReplicationFactor { node: NodeId, left: usize, n: usize },
    #[error(
        "node {node} is {state}, not down: drain a live node with `leave`; remove only a node \
         gossip holds down and that will not come back"
    )]
    RemoveAlive { node: NodeId, state: MemberState },
    #[error("node {0} has left the cluster already; it owns nothing to remove")]
    AlreadyLeft(NodeId),
}

impl ChangeRefused {
    /// Whether the request itself is malformed (INVALID_ARGUMENT) rather than impossible in the
    /// cluster's current state (FAILED_PRECONDITION).
    pub fn is_invalid_argument(&self) -> bool {
        matches!(
            self,
            ChangeRefused::WeightOutOfRange { .. } | ChangeRefused::UnknownNode(_)
        )
    }

    pub fn label(&self) -> &'static str {
        match self {
            ChangeRefused::WeightOutOfRange { .. } => "weight_out_of_range",
            ChangeRefused::UnknownNode(_) => "unknown_node",
            ChangeRefused::Removed(_) => "removed",
            ChangeRefused::BelowReplicationFactor { .. } => "below_replication_factor",
            ChangeRefused::RemoveAlive { .. } => "remove_alive",
            ChangeRefused::AlreadyLeft(_) => "already_left",
        }
    }
}

/// The rings one membership snapshot describes: committed, proposed, and which change runs.
#[derive(Clone, Debug)]
pub struct RingState {
    me: NodeId,
    committed: Arc<Ring>,
    /// Every visible, well-formed proposal; the winner first when there is one.
    changes: Vec<Change>,
    /// Whether `changes[0]` is the change under way.
    has_current: bool,
    participants: Vec<NodeId>,
    removed: BTreeSet<NodeId>,
    /// Each member's ack, as gossiped.
    acks: BTreeMap<NodeId, Ack>,
    /// Each member's metadata, as gossiped.
    members: BTreeMap<NodeId, (Arc<NodeMetadata>, MemberState)>,
}

impl RingState {
    /// The rings of `snapshot`. `defaults` are ring members gossip has not heard of yet (the
    /// configured ring of a static cluster, or the last committed ring this node knew): they
    /// keep their place until they gossip.
    pub fn new(
        snapshot: &MembershipSnapshot,
        defaults: &[NodeSpec],
    ) -> Result<RingState, RingError> {
        let removed: BTreeSet<NodeId> = snapshot
            .members
            .iter()
            .flat_map(|m| m.metadata.change.removed.iter().cloned())
            .collect();
        let mut specs: Vec<NodeSpec> = snapshot
            .ring_specs()
            .into_iter()
            .filter(|s| !removed.contains(&s.id))
            .collect();
        specs.extend(
            defaults
                .iter()
                .filter(|d| snapshot.get(&d.id).is_none() && !removed.contains(&d.id))
                .cloned(),
        );
        specs.sort_by(|a, b| a.id.cmp(&b.id));
        let mut claimed = BTreeSet::new();
        for spec in &mut specs {
            spec.tokens.retain(|t| claimed.insert(*t));
        }
        let committed = Arc::new(Ring::new(specs)?);
        let members: BTreeMap<NodeId, (Arc<NodeMetadata>, MemberState)> = snapshot
            .members
            .iter()
            .map(|m| (m.id.clone(), (m.metadata.clone(), m.state)))
            .collect();
        let acks = snapshot
            .members
            .iter()
            .filter_map(|m| m.metadata.change.ack.map(|a| (m.id.clone(), a)))
            .collect();

        // Proposals by members that are themselves the subject of a visible removal are
        // superseded by it.
        let removal_subjects: BTreeSet<&NodeId> = snapshot
            .members
            .iter()
            .filter(|m| !removed.contains(&m.id))
            .filter_map(|m| m.metadata.change.proposal.as_ref())
            .filter(|p| p.kind == ChangeKind::Remove)
            .map(|p| &p.subject)
            .collect();
        let mut changes: Vec<Change> = snapshot
            .members
            .iter()
            .filter(|m| !removed.contains(&m.id) && !removal_subjects.contains(&m.id))
            .filter_map(|m| {
                let p = m.metadata.change.proposal.as_ref()?;
                let zone = m.metadata.zone.as_deref();
                let ring = proposed_ring(&committed, &m.id, zone, p, &removed)?;
                Some(Change {
                    proposer: m.id.clone(),
                    id: p.id(&m.id),
                    eligible: p.base == committed.version(),
                    proposal: p.clone(),
                    ring: Arc::new(ring),
                })
            })
            .collect();
        changes.sort_by(|a, b| {
            (!a.eligible, a.proposal.kind, &a.proposal.subject, a.id).cmp(&(
                !b.eligible,
                b.proposal.kind,
                &b.proposal.subject,
                b.id,
            ))
        });
        let has_current = changes.first().is_some_and(|c| c.eligible);
        let removed_subject = changes
            .first()
            .filter(|c| has_current && c.proposal.kind == ChangeKind::Remove)
            .map(|c| c.proposal.subject.clone());
        let mut participants: BTreeSet<NodeId> = snapshot
            .members
            .iter()
            .filter(|m| !removed.contains(&m.id) && m.metadata.lifecycle != Lifecycle::Left)
            .map(|m| m.id.clone())
            .collect();
        participants.extend(committed.nodes().iter().map(|s| s.id.clone()));
        if let Some(subject) = &removed_subject {
            participants.remove(subject);
        }
        Ok(RingState {
            me: snapshot.local.clone(),
            committed,
            changes,
            has_current,
            participants: participants.into_iter().collect(),
            removed,
            acks,
            members,
        })
    }

    /// A settled ring with no change under way (a node's view before gossip has spoken).
    pub fn settled(me: NodeId, ring: Arc<Ring>) -> RingState {
        RingState {
            participants: ring.nodes().iter().map(|s| s.id.clone()).collect(),
            me,
            committed: ring,
            changes: Vec::new(),
            has_current: false,
            removed: BTreeSet::new(),
            acks: BTreeMap::new(),
            members: BTreeMap::new(),
        }
    }

    /// The node whose view this is.
    pub fn me(&self) -> &NodeId {
        &self.me
    }

    /// The ring every member's committed weight and tokens make.
    pub fn committed(&self) -> &Arc<Ring> {
        &self.committed
    }

    /// Every visible proposal; the change under way ([`Self::current`]) first.
    pub fn changes(&self) -> &[Change] {
        &self.changes
    }

    /// Whether this view shows what became of change `id`, which this node had acked before it
    /// stopped, given `restarted_on`, the version of the committed ring it restarted with: the
    /// change is still visible, or the committed ring has moved on (the change committed, or
    /// was overtaken and withdrawn). A view that shows neither has not heard the proposer yet:
    /// it may still be missing a ring every acknowledged write reaches.
    pub fn knows_fate_of(&self, id: u64, restarted_on: u64) -> bool {
        self.changes.iter().any(|c| c.id == id) || self.committed.version() != restarted_on
    }

    /// The change under way, if any.
    pub fn current(&self) -> Option<&Change> {
        self.changes.first().filter(|_| self.has_current)
    }

    /// Whether this node may coordinate a read from its own view: it owns part of the committed
    /// ring and is not the subject of the removal under way, or it proposed the change under way
    /// and already reads from its ring. Any other node forwards its reads (see the module
    /// documentation).
    pub fn coordinates_reads(&self) -> bool {
        let owns = |ring: &Ring| {
            ring.node_index(self.me.as_str())
                .is_some_and(|i| ring.nodes()[i].weight > 0)
        };
        if self.removed.contains(&self.me) {
            return false;
        }
        match self.current() {
            Some(c) if c.proposal.kind == ChangeKind::Remove && c.proposal.subject == self.me => {
                false
            }
            Some(c) if c.proposer == self.me && self.read_ring().version() == c.ring.version() => {
                owns(&c.ring)
            }
            _ => owns(&self.committed),
        }
    }

    /// Members that must ack the change under way.
    pub fn participants(&self) -> &[NodeId] {
        &self.participants
    }

    /// Members known to be removed.
    pub fn removed(&self) -> &BTreeSet<NodeId> {
        &self.removed
    }

    /// `node`'s level for change `id`, as gossiped.
    pub fn level_of(&self, node: &NodeId, id: u64) -> Option<AckLevel> {
        self.acks
            .get(node)
            .filter(|a| a.change == id)
            .map(|a| a.level)
    }

    fn all_at_least(&self, change: &Change, level: AckLevel) -> bool {
        self.participants
            .iter()
            .all(|p| self.level_of(p, change.id) >= Some(level))
    }

    /// Where the change under way stands.
    pub fn phase(&self) -> Option<Phase> {
        let change = self.current()?;
        Some(if !self.all_at_least(change, AckLevel::Writing) {
            Phase::Announced
        } else if !self.all_at_least(change, AckLevel::Synced) {
            Phase::Streaming
        } else if !self.all_at_least(change, AckLevel::Reading) {
            Phase::Switching
        } else {
            Phase::Retiring
        })
    }

    /// Participants the current phase waits for (below the level it needs).
    pub fn waiting_for(&self) -> Vec<NodeId> {
        let (Some(change), Some(phase)) = (self.current(), self.phase()) else {
            return Vec::new();
        };
        if phase == Phase::Retiring {
            return vec![change.proposer.clone()];
        }
        self.participants
            .iter()
            .filter(|p| self.level_of(p, change.id) < Some(phase.awaits()))
            .cloned()
            .collect()
    }

    /// The rings a write goes to: the committed ring, then the ring of every visible proposal
    /// (each once).
    pub fn write_rings(&self) -> Vec<Arc<Ring>> {
        let mut rings = vec![self.committed.clone()];
        for change in &self.changes {
            if rings.iter().all(|r| r.version() != change.ring.version()) {
                rings.push(change.ring.clone());
            }
        }
        rings
    }

    /// The ring this node reads from: the change under way's once every participant has synced
    /// (or this node already acked reading from it), the committed ring otherwise.
    pub fn read_ring(&self) -> &Arc<Ring> {
        match self.current() {
            Some(change)
                if self.level_of(&self.me, change.id) == Some(AckLevel::Reading)
                    || self.all_at_least(change, AckLevel::Synced) =>
            {
                &change.ring
            }
            _ => &self.committed,
        }
    }

    /// The ranges this node gains in the change under way, with their old replicas.
    pub fn gains(&self, n: usize) -> Vec<Handoff> {
        match self.current() {
            Some(change) => handoffs(&self.committed, &change.ring, n, &self.me),
            None => Vec::new(),
        }
    }

    /// Whether this node must hold the key at `pos`: it replicates it in some live ring (the
    /// committed one or a proposal's). Keys it holds in none may be dropped.
    pub fn holds(&self, pos: u64, n: usize) -> bool {
        self.write_rings()
            .iter()
            .any(|ring| ring.is_replica(pos, n, self.me.as_str()))
    }

    /// The level this node should gossip for the change under way, given its own progress: the
    /// highest it has earned, never lower than what it already said.
    pub fn next_ack(&self, progress: &LocalProgress, n: usize) -> Option<Ack> {
        let change = self.current()?;
        let said = self.level_of(&self.me, change.id);
        let mut level = said;
        if progress.writes_drained == Some(change.id) {
            level = level.max(Some(AckLevel::Writing));
        }
        if level >= Some(AckLevel::Writing)
            && self.all_at_least_with(change, AckLevel::Writing, level)
            && (progress.synced == Some(change.id) || self.gains(n).is_empty())
        {
            level = level.max(Some(AckLevel::Synced));
        }
        if level >= Some(AckLevel::Synced)
            && self.all_at_least_with(change, AckLevel::Synced, level)
            && progress.reads_drained == Some(change.id)
        {
            level = level.max(Some(AckLevel::Reading));
        }
        level.map(|level| Ack {
            change: change.id,
            level,
        })
    }

    /// Every participant at `level`, counting this node at `mine` (what it is about to say).
    fn all_at_least_with(&self, change: &Change, level: AckLevel, mine: Option<AckLevel>) -> bool {
        self.participants.iter().all(|p| {
            let l = if *p == self.me {
                mine.max(self.level_of(p, change.id))
            } else {
                self.level_of(p, change.id)
            };
            l >= Some(level)
        })
    }

    /// The metadata this node should gossip next, or `None` when it should stay as it is:
    /// its ack, its proposal (made, withdrawn, committed) and the removed members it knows.
    pub fn next_metadata(
        &self,
        mine: &NodeMetadata,
        progress: &LocalProgress,
        vnodes_per_node: u32,
        n: usize,
    ) -> Option<NodeMetadata> {
        let mut next = mine.clone();
        next.change.ack = self.next_ack(progress, n);
        // Removed members: everyone's, so the list survives whoever recorded it first.
        let mut removed: Vec<NodeId> = self.removed.iter().cloned().collect();
        removed.truncate(MAX_REMOVED);
        next.change.removed = removed;

        let current = self.current();
        let mine_current = current.is_some_and(|c| c.proposer == self.me);
        match &mine.change.proposal {
            Some(_) if mine_current => {
                let change = current?;
                if self.all_at_least(change, AckLevel::Reading)
                    && !(change.proposal.kind == ChangeKind::Leave && progress.holds_hints)
                {
                    commit(&mut next, &change.proposal);
                }
            }
            Some(p) => {
                // Queued behind the winner. Withdrawn only once its base is stale: by then the
                // winner committed and nobody reads from this proposal's ring.
                let visible = self.changes.iter().any(|c| c.proposer == self.me);
                if p.base != self.committed.version() || !visible {
                    next.change.proposal = None;
                }
            }
            None if self.changes.is_empty() => {
                next.change.proposal = self.propose(mine, progress, vnodes_per_node, n);
                if next.change.proposal.is_none() {
                    settle_without_change(&mut next, progress);
                }
            }
            None => {
                // A change under way waits for every participant (and its new owners for
                // every old replica), so a member gone for good blocks it for good: a
                // requested removal is proposed at once, and wins (removals sort first). The
                // overtaken change stays visible (still written to) and runs again, under a
                // new id, on the ring the removal commits (under the same id when the removed
                // member owned nothing: the ring is then the same, and every ack restarts, since
                // each node's ack moved to the removal). Only a node that has not acked
                // *reading* from it overtakes it: that change can then never commit (its
                // commit needs this node's reading ack, and this node's ack moves to the
                // removal), so nobody can come to write to its ring alone while others went
                // back to reading from the committed ring.
                let acked_reading = next.change.ack.is_some_and(|a| {
                    self.current().is_some_and(|c| c.id == a.change) && a.level >= AckLevel::Reading
                });
                if !acked_reading
                    && !self
                        .changes
                        .iter()
                        .any(|c| c.proposal.kind == ChangeKind::Remove)
                {
                    next.change.proposal = self.propose_removal(progress);
                }
            }
        }
        next.lifecycle = lifecycle_of(&next);
        (next != *mine).then_some(next)
    }

    /// The removal this node was asked for and should propose, if any.
    fn propose_removal(&self, progress: &LocalProgress) -> Option<Proposal> {
        let subject = progress
            .remove_requested
            .iter()
            .find(|s| !self.removed.contains(*s) && **s != self.me)?;
        Some(Proposal {
            kind: ChangeKind::Remove,
            subject: subject.clone(),
            weight: 0,
            tokens: Vec::new(),
            base: self.committed.version(),
        })
    }

    /// The change this node should propose now that the ring is free, if any.
    fn propose(
        &self,
        mine: &NodeMetadata,
        progress: &LocalProgress,
        vnodes_per_node: u32,
        n: usize,
    ) -> Option<Proposal> {
        let base = self.committed.version();
        // Removals first: a member gone for good blocks every other change.
        if let Some(removal) = self.propose_removal(progress) {
            return Some(removal);
        }
        // One at a time, in id order among the live members that wait, so that two nodes rarely
        // propose at the same moment (when they do, the winner rule settles it).
        let first_waiting = self.members.iter().find(|(id, (meta, state))| {
            (**id == self.me || *state == MemberState::Alive)
                && !self.removed.contains(*id)
                && needs_change(meta)
        });
        if first_waiting.is_some_and(|(id, _)| *id != self.me) {
            return None;
        }
        let leaving = matches!(mine.lifecycle, Lifecycle::Leaving);
        let target = if leaving {
            0
        } else {
            mine.change.target_weight.unwrap_or(mine.weight)
        };
        if target == mine.weight && (!leaving || mine.tokens.is_empty()) {
            return None;
        }
        let tokens = if target == 0 {
            Vec::new()
        } else {
            let ring = &self.committed;
            match ring.node_index(self.me.as_str()) {
                Some(i) => {
                    let current = &ring.nodes()[i].tokens;
                    let count = crate::ring::vnode_count(vnodes_per_node, target) as usize;
                    if count <= current.len() {
                        current[..count].to_vec()
                    } else {
                        let extra = u32::try_from(count - current.len()).unwrap_or(u32::MAX);
                        let mut t = current.clone();
                        t.extend(ring.allocate_tokens(&self.me, mine.zone.as_deref(), extra, n));
                        t
                    }
                }
                None => {
                    let count = crate::ring::vnode_count(vnodes_per_node, target);
                    ring.allocate_tokens(&self.me, mine.zone.as_deref(), count, n)
                }
            }
        };
        Some(Proposal {
            kind: if leaving {
                ChangeKind::Leave
            } else {
                ChangeKind::Weight
            },
            subject: self.me.clone(),
            weight: target,
            tokens,
            base,
        })
    }

    /// Checks an admin's request to set `node`'s target weight (a leave is weight 0).
    pub fn check_weight(&self, node: &NodeId, weight: u32, n: usize) -> Result<(), ChangeRefused> {
        if weight > MAX_WEIGHT {
            return Err(ChangeRefused::WeightOutOfRange { weight });
        }
        self.check_member(node)?;
        if weight == 0 {
            let left = self.members_with_weight_after(node);
            if left < n {
                return Err(ChangeRefused::BelowReplicationFactor {
                    node: node.clone(),
                    left,
                    n,
                });
            }
        }
        Ok(())
    }

    /// Checks an admin's request to remove `node` (gone for good).
    pub fn check_remove(&self, node: &NodeId, n: usize) -> Result<(), ChangeRefused> {
        self.check_member(node)?;
        if let Some((meta, state)) = self.members.get(node) {
            if meta.lifecycle == Lifecycle::Left {
                return Err(ChangeRefused::AlreadyLeft(node.clone()));
            }
            if *state != MemberState::Down || *node == self.me {
                return Err(ChangeRefused::RemoveAlive {
                    node: node.clone(),
                    state: if *node == self.me {
                        MemberState::Alive
                    } else {
                        *state
                    },
                });
            }
        }
        let left = self.members_with_weight_after(node);
        if left < n {
            return Err(ChangeRefused::BelowReplicationFactor {
                node: node.clone(),
                left,
                n,
            });
        }
        Ok(())
    }

    fn check_member(&self, node: &NodeId) -> Result<(), ChangeRefused> {
        if self.removed.contains(node) {
            return Err(ChangeRefused::Removed(node.clone()));
        }
        if !self.members.contains_key(node) && self.committed.node_index(node.as_str()).is_none() {
            return Err(ChangeRefused::UnknownNode(node.clone()));
        }
        Ok(())
    }

    /// Members other than `node` whose target weight is above 0.
    fn members_with_weight_after(&self, node: &NodeId) -> usize {
        let mut ids: BTreeSet<&NodeId> = BTreeSet::new();
        for (id, (meta, _)) in &self.members {
            if id != node && !self.removed.contains(id) && target_of(meta) > 0 {
                ids.insert(id);
            }
        }
        for spec in self.committed.nodes() {
            if spec.id != *node && !self.members.contains_key(&spec.id) && spec.weight > 0 {
                ids.insert(&spec.id);
            }
        }
        ids.len()
    }

    /// Members whose weight differs from their target, in the order their changes will run
    /// (by id; the one under way excluded).
    pub fn queued(&self) -> Vec<NodeId> {
        let running = self.current().map(|c| &c.proposal.subject);
        self.members
            .iter()
            .filter(|(id, (meta, _))| {
                !self.removed.contains(*id) && Some(*id) != running && needs_change(meta)
            })
            .map(|(id, _)| id.clone())
            .collect()
    }
}

/// Whether a member waits for a ring change of its own (its weight is not its target, or it is
/// leaving and still owns tokens).
fn needs_change(meta: &NodeMetadata) -> bool {
    meta.lifecycle != Lifecycle::Left
        && (target_of(meta) != meta.weight
            || (meta.lifecycle == Lifecycle::Leaving && !meta.tokens.is_empty()))
}

/// The metadata a node gossips once an admin set its target weight: a left or leaving node
/// comes back (joining), and the change runs when the ring is free.
pub fn with_target_weight(meta: &NodeMetadata, weight: u32) -> NodeMetadata {
    let mut next = meta.clone();
    next.change.target_weight = Some(weight);
    if matches!(next.lifecycle, Lifecycle::Left | Lifecycle::Leaving) {
        next.lifecycle = Lifecycle::Joining;
    }
    next.lifecycle = lifecycle_of(&next);
    next
}

/// The metadata a node gossips once an admin asked it to leave.
pub fn leaving(meta: &NodeMetadata) -> NodeMetadata {
    let mut next = meta.clone();
    if next.lifecycle != Lifecycle::Left {
        next.lifecycle = Lifecycle::Leaving;
        next.change.target_weight = Some(0);
    }
    next
}

/// A member's target weight: 0 when leaving or left.
pub fn target_of(meta: &NodeMetadata) -> u32 {
    match meta.lifecycle {
        Lifecycle::Leaving | Lifecycle::Left => 0,
        _ => meta.change.target_weight.unwrap_or(meta.weight),
    }
}

/// The lifecycle a node's metadata implies: left and leaving as recorded; otherwise joining
/// while below its target (or at weight 0), normal at it.
pub fn lifecycle_of(meta: &NodeMetadata) -> Lifecycle {
    match meta.lifecycle {
        Lifecycle::Left => Lifecycle::Left,
        Lifecycle::Leaving => Lifecycle::Leaving,
        _ if meta.weight == 0 || meta.change.target_weight.is_some_and(|t| t > meta.weight) => {
            Lifecycle::Joining
        }
        _ => Lifecycle::Normal,
    }
}

/// Applies a committed proposal to its proposer's metadata.
fn commit(meta: &mut NodeMetadata, proposal: &Proposal) {
    match proposal.kind {
        ChangeKind::Remove => {
            if !meta.change.removed.contains(&proposal.subject) {
                meta.change.removed.push(proposal.subject.clone());
                meta.change.removed.sort();
            }
        }
        ChangeKind::Leave => {
            meta.weight = 0;
            meta.tokens.clear();
            // An admin who changed their mind during the drain (a new target) gets a node at
            // weight 0 that ramps up again, not one that left.
            if meta.lifecycle == Lifecycle::Leaving {
                meta.lifecycle = Lifecycle::Left;
                meta.change.target_weight = Some(0);
            }
        }
        ChangeKind::Weight => {
            meta.weight = proposal.weight;
            meta.tokens = proposal.tokens.clone();
        }
    }
    meta.change.proposal = None;
    meta.change.ack = None;
}

/// A leaving node that owns nothing leaves without a ring change, once its hints are handed
/// over.
fn settle_without_change(meta: &mut NodeMetadata, progress: &LocalProgress) {
    if meta.lifecycle == Lifecycle::Leaving
        && meta.tokens.is_empty()
        && meta.weight == 0
        && !progress.holds_hints
    {
        meta.lifecycle = Lifecycle::Left;
    }
}

/// The committed ring with `proposal` applied; `None` when it does not make a ring (a token
/// clash, an unknown subject, a malformed proposal): such a proposal is ignored, and its
/// proposer makes it anew.
fn proposed_ring(
    committed: &Ring,
    proposer: &NodeId,
    zone: Option<&str>,
    proposal: &Proposal,
    removed: &BTreeSet<NodeId>,
) -> Option<Ring> {
    match proposal.kind {
        ChangeKind::Remove => {
            if proposal.subject == *proposer || removed.contains(&proposal.subject) {
                return None;
            }
            match committed.without_node(&proposal.subject) {
                Ok(ring) => Some(ring),
                // A member that owns nothing in the ring: removing it changes no range.
                Err(_) => Some(committed.clone()),
            }
        }
        ChangeKind::Leave | ChangeKind::Weight => {
            if proposal.subject != *proposer
                || (proposal.kind == ChangeKind::Leave && proposal.weight != 0)
            {
                return None;
            }
            let mut nodes = committed.nodes().to_vec();
            match nodes.iter_mut().find(|s| s.id == proposal.subject) {
                Some(spec) => {
                    spec.weight = proposal.weight;
                    spec.tokens = proposal.tokens.clone();
                }
                None => nodes.push(NodeSpec {
                    id: proposal.subject.clone(),
                    weight: proposal.weight,
                    zone: zone.map(str::to_string),
                    tokens: proposal.tokens.clone(),
                }),
            }
            Ring::new(nodes).ok()
        }
    }
}

#[cfg(test)]
mod tests;
