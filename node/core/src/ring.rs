//! Consistent hashing with weighted virtual nodes: which nodes hold which keys.
//!
//! A key lives at `hash::key_position(key)` on a ring of 2^64 positions. Every node owns a list of
//! tokens (positions); the token ranges `(previous token, token]` tile the ring. A key's preference
//! list is found by walking clockwise from the first token at or after its position.
//!
//! Invariants:
//! - tokens are explicit, listed per node ([`NodeSpec::tokens`], gossiped with the node's
//!   metadata): every node builds the same [`Ring`] from the same membership, and
//!   [`Ring::version`] is a digest of exactly that membership;
//! - no two tokens are equal; nodes of weight 0 own no range;
//! - changing one node (join, leave, weight) changes only that node's tokens, so the only
//!   replicas that move are replicas going to or leaving that node;
//! - a preference list holds `min(n, nodes with tokens)` distinct nodes, and the first ones span
//!   as many zones as possible (see [`Ring::preference_list`]).
//!
//! Tokens are chosen by a replication-aware allocator, like Cassandra's
//! (`ReplicationAwareTokenAllocator`): random tokens leave replica ownership about 20% uneven,
//! so a joining node places its tokens one at a time, greedily. A candidate token splits one
//! existing range at the best point of its middle three quarters; the split only changes the
//! preference lists of that range and of the few ranges before it whose walk reaches it, so each
//! candidate is scored incrementally by the drop in `sum over nodes of (load / target - 1)^2`
//! (replica load, plus a tenth of the same term for primary load). Candidates sit in a max-heap
//! and are re-scored lazily when popped (scores only fall as the joiner gains load).
//! [`Ring::balanced`] joins members one by one in id order, so every node computes the same ring.
//! The scores are `f64` built from `+ - * /` only, which IEEE 754 makes identical on every
//! platform, so the allocator is deterministic everywhere.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt::Write as _;

use xxhash_rust::xxh3::{Xxh3Default, xxh3_64};

use crate::NodeId;

/// Tokens per node at the normal weight (100).
///
/// 64 meets the balance targets (replica ownership within 10% of the mean at 3..=64 nodes, N=3)
/// with room to spare once the allocator balances, while keeping what grows with it small: the
/// gossiped token list (512 bytes a node), the number of ranges a join or drain streams, and the
/// allocator's work. It also gives weights a useful resolution: one token is 1.6 weight points,
/// so an operator ramping a node in by steps of 10 moves about 6 tokens per step.
pub const DEFAULT_VNODES_PER_NODE: u32 = 64;

/// The weight of an ordinary node: it owns `vnodes_per_node` tokens.
pub const NORMAL_WEIGHT: u32 = 100;

/// The largest weight accepted (ten times a normal node). Weight 0 owns nothing (drained).
pub const MAX_WEIGHT: u32 = 1000;

/// Number of tokens a node of `weight` owns: `round(vnodes_per_node * weight / 100)`.
pub fn vnode_count(vnodes_per_node: u32, weight: u32) -> u32 {
    let normal = u64::from(NORMAL_WEIGHT);
    let rounded = (u64::from(vnodes_per_node) * u64::from(weight) + normal / 2) / normal;
    u32::try_from(rounded).unwrap_or(u32::MAX)
}

/// A ring member with its tokens, as gossiped. Token `i` is the node's `i`-th entry of `tokens`:
/// lowering the weight drops the highest indexes, raising it appends.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeSpec {
    pub id: NodeId,
    /// 0..=[`MAX_WEIGHT`]; 100 is normal, 0 owns nothing (its tokens, if any, are ignored).
    pub weight: u32,
    /// Failure domain (e.g. the Kubernetes zone); replicas of a key prefer distinct zones.
    pub zone: Option<String>,
    pub tokens: Vec<u64>,
}

/// A ring member before it has tokens: what configuration and the `dynakv ring` command know.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Member {
    pub id: NodeId,
    pub weight: u32,
    pub zone: Option<String>,
}

/// Why a ring could not be built or changed. Rings are immutable: on error, nothing changed.
/// The variant names are stable (metric labels).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("node {0} is listed more than once")]
    DuplicateNode(NodeId),
    #[error("node {node} has weight {weight}; the most allowed is {MAX_WEIGHT}")]
    WeightTooHigh { node: NodeId, weight: u32 },
    #[error("token {token} is claimed twice, by {first} and by {second}")]
    DuplicateToken {
        token: u64,
        first: NodeId,
        second: NodeId,
    },
    #[error("node {0} is not in the ring")]
    UnknownNode(NodeId),
}

/// One node's share of the ring.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Ownership {
    /// Index into [`Ring::nodes`].
    pub node: usize,
    /// Fraction of the key space whose preference list starts with this node.
    pub primary: f64,
    /// Fraction of all key-replicas this node holds (the shares of all nodes sum to 1).
    pub replica: f64,
}

/// A key range whose replicas differ between two rings: keys in `(start, end]` (wrapping past
/// `u64::MAX` when `start >= end`; `start == end` is the whole ring).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RangeMove {
    pub start: u64,
    pub end: u64,
    /// Replicas in the old ring that are not replicas in the new one (they hand the range over).
    pub from: Vec<NodeId>,
    /// Replicas in the new ring that were not replicas in the old one (they receive the range).
    pub to: Vec<NodeId>,
}

/// The consistent-hash ring: immutable, cheap to share behind an `Arc`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ring {
    /// Sorted by id; indexes into this are the node indexes every method speaks of.
    nodes: Vec<NodeSpec>,
    table: TokenTable,
    version: u64,
}

impl Ring {
    /// Builds a ring from explicit tokens. Fails on a repeated node id, a weight above
    /// [`MAX_WEIGHT`] or a token claimed twice (also by one node, also by a node of weight 0).
    pub fn new(mut nodes: Vec<NodeSpec>) -> Result<Ring, RingError> {
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        if let Some(pair) = nodes.windows(2).find(|pair| pair[0].id == pair[1].id) {
            return Err(RingError::DuplicateNode(pair[0].id.clone()));
        }
        if let Some(node) = nodes.iter().find(|node| node.weight > MAX_WEIGHT) {
            return Err(RingError::WeightTooHigh {
                node: node.id.clone(),
                weight: node.weight,
            });
        }
        let mut claims: Vec<(u64, usize)> = nodes
            .iter()
            .enumerate()
            .flat_map(|(index, node)| node.tokens.iter().map(move |&token| (token, index)))
            .collect();
        claims.sort_unstable();
        if let Some(pair) = claims.windows(2).find(|pair| pair[0].0 == pair[1].0) {
            return Err(RingError::DuplicateToken {
                token: pair[0].0,
                first: nodes[pair[0].1].id.clone(),
                second: nodes[pair[1].1].id.clone(),
            });
        }
        Ok(Ring::from_valid(nodes))
    }

    /// The ring of a statically configured cluster: members join one at a time in id order,
    /// each with `vnode_count(vnodes_per_node, weight)` tokens from [`Ring::allocate_tokens`].
    /// The same members (in any order) always give the same ring, and the ring of the first `k`
    /// members by id is this ring without the others. A repeated id joins once (its first entry);
    /// a weight above [`MAX_WEIGHT`] counts as [`MAX_WEIGHT`] (configuration validation refuses it
    /// before it gets here).
    pub fn balanced(members: &[Member], vnodes_per_node: u32, n: usize) -> Ring {
        let mut members: Vec<&Member> = members.iter().collect();
        // Stable sort: the first entry of a repeated id comes first and is the one kept.
        members.sort_by(|a, b| a.id.cmp(&b.id));
        members.dedup_by(|later, earlier| later.id == earlier.id);
        let mut ring = Ring::from_valid(Vec::new());
        for member in members {
            let weight = member.weight.min(MAX_WEIGHT);
            let count = vnode_count(vnodes_per_node, weight);
            let tokens = ring.allocate_tokens(&member.id, member.zone.as_deref(), count, n);
            let mut nodes = ring.nodes;
            // Ids arrive sorted and the allocator never reuses a token: still a valid ring.
            nodes.push(NodeSpec {
                id: member.id.clone(),
                weight,
                zone: member.zone.clone(),
                tokens,
            });
            ring = Ring::from_valid(nodes);
        }
        ring
    }

    /// Builds the lookup table of nodes that are sorted by id, unique, within weight limits and
    /// share no token.
    fn from_valid(nodes: Vec<NodeSpec>) -> Ring {
        let zone_of = intern_zones(&nodes);
        let claims = nodes
            .iter()
            .enumerate()
            .filter(|(_, node)| node.weight > 0)
            .flat_map(|(index, node)| node.tokens.iter().map(move |&token| (token, index)))
            .collect();
        let table = TokenTable::new(claims, zone_of);
        let version = membership_digest(&nodes);
        Ring {
            nodes,
            table,
            version,
        }
    }

    /// The members, sorted by id.
    pub fn nodes(&self) -> &[NodeSpec] {
        &self.nodes
    }

    /// Index of node `id` in [`Ring::nodes`].
    pub fn node_index(&self, id: &str) -> Option<usize> {
        self.nodes
            .binary_search_by(|node| node.id.as_str().cmp(id))
            .ok()
    }

    /// Number of members, drained ones included.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Digest (xxh3-64) of the whole membership (ids, weights, zones, tokens in index order).
    /// Equal rings have equal versions however their nodes were listed.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The `min(n, nodes with tokens)` distinct nodes that hold the key at `key_pos`, in order.
    ///
    /// The walk goes clockwise from the first token at or after `key_pos` (wrapping past the
    /// top), skipping tokens of nodes already chosen. Without zones that is the whole rule. With
    /// zones (a node without one counts as one more zone), the list is: the first node met of
    /// each zone, in walk order, until every zone is represented or the list is full; then the
    /// nodes skipped for being in an already used zone and those met later, in walk order. So a
    /// second node of a zone is taken only once no unused zone has a node left on the ring, and
    /// the first `n` replicas span `min(n, zones)` zones.
    pub fn preference_list(&self, key_pos: u64, n: usize) -> Vec<usize> {
        let quota = self.table.quota(n);
        let mut replicas = Vec::with_capacity(quota.replicas);
        self.table
            .replicas_of_range(self.table.range_of(key_pos), quota, &mut replicas);
        replicas
    }

    /// Every node with tokens, each once: the preference list first, then the others in the
    /// order the clockwise walk meets them (the fallbacks of a sloppy quorum).
    pub fn walk(&self, key_pos: u64, n: usize) -> impl Iterator<Item = usize> + '_ {
        let preferred = self.preference_list(key_pos, n);
        let mut met = vec![false; self.nodes.len()];
        for &node in &preferred {
            met[node] = true;
        }
        let fallbacks = self.table.active_nodes - preferred.len();
        let start = self.table.range_of(key_pos);
        let table = &self.table;
        let fallback = (0..table.len())
            .map(move |offset| table.owner(start + offset))
            .filter(move |&node| !std::mem::replace(&mut met[node], true))
            .take(fallbacks);
        preferred.into_iter().chain(fallback)
    }

    /// Primary and replica ownership of every node, in [`Ring::nodes`] order.
    pub fn ownership(&self, n: usize) -> Vec<Ownership> {
        let quota = self.table.quota(n);
        let loads = self.table.loads(quota);
        let replicas_per_key = quota.replicas.max(1) as f64;
        (0..self.nodes.len())
            .map(|node| Ownership {
                node,
                primary: loads.primary[node] as f64 / RING_SIZE,
                replica: loads.replica[node] as f64 / RING_SIZE / replicas_per_key,
            })
            .collect()
    }

    /// Chooses `count` new tokens for node `id` (which may already own tokens here) so that
    /// replica ownership stays balanced, given each node a target in proportion to its token
    /// count (the joiner's counted with the new tokens). Deterministic; never returns a token
    /// already on the ring. The zone of a node that already owns tokens is the ring's; `zone`
    /// applies to a node that owns none yet.
    pub fn allocate_tokens(
        &self,
        id: &NodeId,
        zone: Option<&str>,
        count: u32,
        n: usize,
    ) -> Vec<u64> {
        if count == 0 {
            return Vec::new();
        }
        if self.table.is_empty() {
            return spread_evenly(id, count);
        }
        let mut allocator = Allocator::new(self, id, zone, count, n);
        let first_index = self.node_index(id.as_str()).map_or(0, |node| self.nodes[node].tokens.len());
        let mut tokens = Vec::with_capacity(count as usize);
        for token_index in first_index..first_index + count as usize {
            // All candidates taken only if the ring is nearly full: stop short rather than loop.
            let Some(position) = allocator.best_position(token_index) else {
                break;
            };
            allocator.take(position);
            tokens.push(position);
            if std::env::var("RING_DEBUG").is_ok() { let x = allocator.node; eprintln!("tok {} xload/target {:.4}", tokens.len(), allocator.replica_load[x] as f64 / RING_SIZE / allocator.replica_target[x]); }
        }
        tokens
    }

    /// This ring plus `member`, with `vnode_count(vnodes_per_node, member.weight)` allocated
    /// tokens.
    pub fn with_node(
        &self,
        member: &Member,
        vnodes_per_node: u32,
        n: usize,
    ) -> Result<Ring, RingError> {
        if self.node_index(member.id.as_str()).is_some() {
            return Err(RingError::DuplicateNode(member.id.clone()));
        }
        check_weight(&member.id, member.weight)?;
        let count = vnode_count(vnodes_per_node, member.weight);
        let tokens = self.allocate_tokens(&member.id, member.zone.as_deref(), count, n);
        let mut nodes = self.nodes.clone();
        nodes.push(NodeSpec {
            id: member.id.clone(),
            weight: member.weight,
            zone: member.zone.clone(),
            tokens,
        });
        Ring::new(nodes)
    }

    /// This ring without node `id`.
    pub fn without_node(&self, id: &NodeId) -> Result<Ring, RingError> {
        let index = self.index_of(id)?;
        let mut nodes = self.nodes.clone();
        nodes.remove(index);
        Ok(Ring::from_valid(nodes))
    }

    /// This ring with node `id` at `weight`, owning `vnode_count(vnodes_per_node, weight)`
    /// tokens: lowering drops its highest-index tokens, raising appends allocated ones. No other
    /// node's tokens change.
    pub fn with_weight(
        &self,
        id: &NodeId,
        weight: u32,
        vnodes_per_node: u32,
        n: usize,
    ) -> Result<Ring, RingError> {
        let index = self.index_of(id)?;
        check_weight(id, weight)?;
        let mut nodes = self.nodes.clone();
        let node = &mut nodes[index];
        let count = vnode_count(vnodes_per_node, weight) as usize;
        if count <= node.tokens.len() {
            node.tokens.truncate(count);
        } else {
            let extra = u32::try_from(count - node.tokens.len()).unwrap_or(u32::MAX);
            let added = self.allocate_tokens(id, node.zone.as_deref(), extra, n);
            node.tokens.extend(added);
        }
        node.weight = weight;
        Ring::new(nodes)
    }

    fn index_of(&self, id: &NodeId) -> Result<usize, RingError> {
        self.node_index(id.as_str())
            .ok_or_else(|| RingError::UnknownNode(id.clone()))
    }
}

fn check_weight(id: &NodeId, weight: u32) -> Result<(), RingError> {
    if weight > MAX_WEIGHT {
        return Err(RingError::WeightTooHigh {
            node: id.clone(),
            weight,
        });
    }
    Ok(())
}

/// The key ranges whose preference lists (of `n` replicas) differ between `old` and `new`, in
/// clockwise order from the range that wraps past zero; adjacent ranges with the same change are
/// merged.
pub fn moved_ranges(old: &Ring, new: &Ring, n: usize) -> Vec<RangeMove> {
    let mut moves: Vec<RangeMove> = Vec::new();
    for_each_segment(old, new, n, |segment| {
        let from = missing_from(&segment.old, old, &segment.new, new);
        let to = missing_from(&segment.new, new, &segment.old, old);
        if from.is_empty() && to.is_empty() {
            return;
        }
        match moves.last_mut() {
            Some(last) if last.end == segment.start && last.from == from && last.to == to => {
                last.end = segment.end;
            }
            _ => moves.push(RangeMove {
                start: segment.start,
                end: segment.end,
                from,
                to,
            }),
        }
    });
    // The last range may continue into the first one across zero.
    if moves.len() > 1 {
        let (first, last) = (&moves[0], &moves[moves.len() - 1]);
        if last.end == first.start && last.from == first.from && last.to == first.to {
            let start = last.start;
            moves.pop();
            moves[0].start = start;
        }
    }
    moves
}

/// Fraction of the new ring's key-replicas that sit on a node that did not hold them in the old
/// ring: the share of the data a change has to copy.
pub fn moved_fraction(old: &Ring, new: &Ring, n: usize) -> f64 {
    let (mut moved, mut total) = (0.0, 0.0);
    for_each_segment(old, new, n, |segment| {
        let arriving = segment
            .new
            .iter()
            .filter(|&&node| !contains_id(&segment.old, old, &new.nodes[node].id))
            .count();
        moved += segment.len * arriving as f64;
        total += segment.len * segment.new.len() as f64;
    });
    if total > 0.0 { moved / total } else { 0.0 }
}

/// A stretch of the key space `(start, end]` between two consecutive tokens of either ring, and
/// its replicas (node indexes) in each.
struct Segment {
    start: u64,
    end: u64,
    /// Fraction of the key space.
    len: f64,
    old: Vec<usize>,
    new: Vec<usize>,
}

fn for_each_segment(old: &Ring, new: &Ring, n: usize, mut visit: impl FnMut(&Segment)) {
    let mut bounds: Vec<u64> = old.table.tokens.iter().chain(&new.table.tokens).copied().collect();
    bounds.sort_unstable();
    bounds.dedup();
    let Some(&last) = bounds.last() else {
        return;
    };
    let (old_quota, new_quota) = (old.table.quota(n), new.table.quota(n));
    let mut segment = Segment {
        start: last,
        end: last,
        len: 0.0,
        old: Vec::new(),
        new: Vec::new(),
    };
    for &end in &bounds {
        segment.end = end;
        segment.len = if bounds.len() == 1 {
            1.0
        } else {
            end.wrapping_sub(segment.start) as f64 / RING_SIZE
        };
        old.table
            .replicas_of_range(old.table.range_of(end), old_quota, &mut segment.old);
        new.table
            .replicas_of_range(new.table.range_of(end), new_quota, &mut segment.new);
        visit(&segment);
        segment.start = end;
    }
}

fn contains_id(replicas: &[usize], ring: &Ring, id: &NodeId) -> bool {
    replicas.iter().any(|&node| ring.nodes[node].id == *id)
}

/// Ids of `replicas` (of `ring`) that are not among `others` (of `other_ring`).
fn missing_from(replicas: &[usize], ring: &Ring, others: &[usize], other_ring: &Ring) -> Vec<NodeId> {
    replicas
        .iter()
        .map(|&node| &ring.nodes[node].id)
        .filter(|id| !contains_id(others, other_ring, id))
        .cloned()
        .collect()
}

/// What `dynakv ring` prints: the balanced ring of a membership and what one join or leave
/// would move.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RingReport {
    pub replication_factor: usize,
    pub vnodes_per_node: u32,
    pub version: u64,
    pub nodes: Vec<NodeReport>,
    /// Over nodes of weight > 0, ownership divided by the node's fair share (its weight's share,
    /// at most one replica of every key), then by the mean of that ratio.
    pub replica_max_over_mean: f64,
    pub replica_min_over_mean: f64,
    pub primary_max_over_mean: f64,
    pub primary_min_over_mean: f64,
    /// A normal-weight node named `new-node` (or `new-node-2`, ... if taken) joins, in the zone
    /// with the fewest members.
    pub adding: Option<ChangeReport>,
    /// The last member by id leaves.
    pub removing: Option<ChangeReport>,
}

/// One node's line of a [`RingReport`].
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct NodeReport {
    pub id: NodeId,
    pub weight: u32,
    pub zone: Option<String>,
    pub tokens: usize,
    pub primary: f64,
    pub replica: f64,
}

/// What one membership change moves.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ChangeReport {
    /// The node that joins or leaves.
    pub node: NodeId,
    /// See [`moved_fraction`].
    pub moved_fraction: f64,
    /// The node's fair share of key-replicas: what an ideal ring would move.
    pub fair_fraction: f64,
    /// Every moved replica went to the joining node (or came from the leaving one).
    pub only_this_node: bool,
}

/// The report for `dynakv ring`: the ring [`Ring::balanced`] builds for `members`.
pub fn report(members: &[Member], vnodes_per_node: u32, n: usize) -> RingReport {
    let ring = Ring::balanced(members, vnodes_per_node, n);
    let ownership = ring.ownership(n);
    let weights: Vec<u64> = ring.nodes.iter().map(|node| u64::from(node.weight)).collect();
    let fair_replica = fair_replica_shares(&weights, n);
    let total_weight: u64 = weights.iter().sum();
    let replica_ratios = ratios(&weights, |node| {
        ownership[node].replica / fair_replica[node]
    });
    let primary_ratios = ratios(&weights, |node| {
        ownership[node].primary * total_weight as f64 / weights[node] as f64
    });
    let nodes = ring
        .nodes
        .iter()
        .zip(&ownership)
        .map(|(node, owned)| NodeReport {
            id: node.id.clone(),
            weight: node.weight,
            zone: node.zone.clone(),
            tokens: node.tokens.len(),
            primary: owned.primary,
            replica: owned.replica,
        })
        .collect();
    RingReport {
        replication_factor: n,
        vnodes_per_node,
        version: ring.version,
        nodes,
        replica_max_over_mean: spread(&replica_ratios).0,
        replica_min_over_mean: spread(&replica_ratios).1,
        primary_max_over_mean: spread(&primary_ratios).0,
        primary_min_over_mean: spread(&primary_ratios).1,
        adding: report_join(&ring, vnodes_per_node, n),
        removing: report_leave(&ring, n),
    }
}

/// `ratio(node)` for every node of weight > 0.
fn ratios(weights: &[u64], ratio: impl Fn(usize) -> f64) -> Vec<f64> {
    (0..weights.len())
        .filter(|&node| weights[node] > 0)
        .map(ratio)
        .collect()
}

/// (max / mean, min / mean); (1, 1) when there is nothing to compare.
fn spread(values: &[f64]) -> (f64, f64) {
    let mean = values.iter().sum::<f64>() / values.len().max(1) as f64;
    if mean <= 0.0 {
        return (1.0, 1.0);
    }
    let max = values.iter().copied().fold(f64::MIN, f64::max);
    let min = values.iter().copied().fold(f64::MAX, f64::min);
    (max / mean, min / mean)
}

fn report_join(ring: &Ring, vnodes_per_node: u32, n: usize) -> Option<ChangeReport> {
    let id = (1..)
        .map(|suffix| match suffix {
            1 => "new-node".to_string(),
            _ => format!("new-node-{suffix}"),
        })
        .find(|id| ring.node_index(id).is_none())
        .and_then(|id| NodeId::new(id).ok())?;
    let mut members_per_zone: BTreeMap<Option<&str>, usize> = BTreeMap::new();
    for node in &ring.nodes {
        *members_per_zone.entry(node.zone.as_deref()).or_default() += 1;
    }
    let zone = members_per_zone
        .iter()
        .min_by_key(|(_, members)| **members)
        .and_then(|(zone, _)| zone.map(str::to_string));
    let member = Member {
        id: id.clone(),
        weight: NORMAL_WEIGHT,
        zone,
    };
    let grown = ring.with_node(&member, vnodes_per_node, n).ok()?;
    let index = grown.node_index(id.as_str())?;
    let weights: Vec<u64> = grown.nodes.iter().map(|node| u64::from(node.weight)).collect();
    let moves = moved_ranges(ring, &grown, n);
    Some(ChangeReport {
        moved_fraction: moved_fraction(ring, &grown, n),
        fair_fraction: fair_replica_shares(&weights, n)[index],
        only_this_node: moves.iter().all(|m| m.to == [id.clone()]),
        node: id,
    })
}

fn report_leave(ring: &Ring, n: usize) -> Option<ChangeReport> {
    let (index, leaving) = ring.nodes.iter().enumerate().next_back()?;
    let shrunk = ring.without_node(&leaving.id).ok()?;
    let weights: Vec<u64> = ring.nodes.iter().map(|node| u64::from(node.weight)).collect();
    let moves = moved_ranges(ring, &shrunk, n);
    Some(ChangeReport {
        node: leaving.id.clone(),
        moved_fraction: moved_fraction(ring, &shrunk, n),
        fair_fraction: fair_replica_shares(&weights, n)[index],
        only_this_node: moves.iter().all(|m| m.from == [leaving.id.clone()]),
    })
}

impl RingReport {
    /// A fixed-width table, one line per node, then the summary.
    pub fn to_table(&self) -> String {
        let id_width = self.nodes.iter().map(|node| node.id.as_str().len()).max().unwrap_or(0).max(4);
        let zone_width = self
            .nodes
            .iter()
            .map(|node| node.zone.as_deref().map_or(1, str::len))
            .max()
            .unwrap_or(0)
            .max(4);
        let mut table = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(
            table,
            "{:<id_width$}  {:>6}  {:<zone_width$}  {:>6}  {:>8}  {:>8}",
            "node", "weight", "zone", "tokens", "primary", "replica"
        );
        for node in &self.nodes {
            let _ = writeln!(
                table,
                "{:<id_width$}  {:>6}  {:<zone_width$}  {:>6}  {:>7.3}%  {:>7.3}%",
                node.id.as_str(),
                node.weight,
                node.zone.as_deref().unwrap_or("-"),
                node.tokens,
                node.primary * 100.0,
                node.replica * 100.0,
            );
        }
        let _ = writeln!(
            table,
            "{} nodes, n={}, {} vnodes per node, version {:016x}: replica max/mean {:.3} min/mean {:.3}, primary max/mean {:.3} min/mean {:.3}",
            self.nodes.len(),
            self.replication_factor,
            self.vnodes_per_node,
            self.version,
            self.replica_max_over_mean,
            self.replica_min_over_mean,
            self.primary_max_over_mean,
            self.primary_min_over_mean,
        );
        for (verb, change, direction) in [
            ("adding", &self.adding, "to"),
            ("removing", &self.removing, "from"),
        ] {
            if let Some(change) = change {
                let _ = writeln!(
                    table,
                    "{verb} {}: moves {:.3}% of key-replicas (fair share {:.3}%), {} {direction} {}",
                    change.node,
                    change.moved_fraction * 100.0,
                    change.fair_fraction * 100.0,
                    if change.only_this_node { "all" } else { "NOT all" },
                    change.node,
                );
            }
        }
        table
    }
}

/// Fair share of key-replicas of nodes of the given weights (summing to 1): in proportion to the
/// weight, except that a node holds at most one replica of each key.
fn fair_replica_shares(weights: &[u64], n: usize) -> Vec<f64> {
    let active = weights.iter().filter(|&&weight| weight > 0).count();
    let replicas_per_key = n.min(active).max(1) as f64;
    replica_targets(weights, n.min(active))
        .into_iter()
        .map(|target| target / replicas_per_key)
        .collect()
}

/// Spreads `replicas_per_key` whole rings of key-replicas over nodes in proportion to `amounts`,
/// no node getting more than one ring (it holds each key once at most): water-filling from the
/// largest amount down. In fractions of the ring.
fn replica_targets(amounts: &[u64], replicas_per_key: usize) -> Vec<f64> {
    let mut order: Vec<usize> = (0..amounts.len()).filter(|&node| amounts[node] > 0).collect();
    order.sort_by(|&a, &b| amounts[b].cmp(&amounts[a]).then(a.cmp(&b)));
    let mut remaining = replicas_per_key as f64;
    let mut remaining_amount: u64 = order.iter().map(|&node| amounts[node]).sum();
    let mut targets = vec![0.0; amounts.len()];
    for node in order {
        let target = (remaining * amounts[node] as f64 / remaining_amount as f64).min(1.0);
        targets[node] = target;
        remaining -= target;
        remaining_amount -= amounts[node];
    }
    targets
}

/// Number of positions on the ring, as a float, to turn lengths into fractions.
const RING_SIZE: f64 = 18_446_744_073_709_551_616.0;

/// Length of the range of a ring with a single token: all of it.
const WHOLE_RING: u128 = 1 << 64;

/// The first node's tokens: evenly spaced from a point derived from its id.
fn spread_evenly(id: &NodeId, count: u32) -> Vec<u64> {
    let step = WHOLE_RING / u128::from(count);
    let first = xxh3_64(id.as_str().as_bytes());
    (0..u128::from(count))
        .map(|index| first.wrapping_add((index * step) as u64))
        .collect()
}

/// Dense zone ids (in zone-name order; "no zone" is a zone of its own) for each node.
fn intern_zones(nodes: &[NodeSpec]) -> Vec<usize> {
    let mut ids: BTreeMap<Option<&str>, usize> =
        nodes.iter().map(|node| (node.zone.as_deref(), 0)).collect();
    for (id, slot) in ids.values_mut().enumerate() {
        *slot = id;
    }
    nodes.iter().map(|node| ids[&node.zone.as_deref()]).collect()
}

/// The canonical encoding hashed into [`Ring::version`]. Never change it: versions are compared
/// across nodes running different releases.
fn membership_digest(nodes: &[NodeSpec]) -> u64 {
    let mut digest = Xxh3Default::new();
    digest.update(b"dynakv-ring-v1");
    for node in nodes {
        let id = node.id.as_str().as_bytes();
        digest.update(&(id.len() as u64).to_le_bytes());
        digest.update(id);
        digest.update(&node.weight.to_le_bytes());
        match &node.zone {
            None => digest.update(&[0]),
            Some(zone) => {
                digest.update(&[1]);
                digest.update(&(zone.len() as u64).to_le_bytes());
                digest.update(zone.as_bytes());
            }
        }
        digest.update(&(node.tokens.len() as u64).to_le_bytes());
        for token in &node.tokens {
            digest.update(&token.to_le_bytes());
        }
    }
    digest.digest()
}

/// How many replicas a preference list holds, and how many of them must come from distinct
/// zones before a zone is used twice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Quota {
    replicas: usize,
    zones: usize,
}

fn quota(n: usize, active_nodes: usize, active_zones: usize) -> Quota {
    let replicas = n.min(active_nodes);
    Quota {
        replicas,
        zones: replicas.min(active_zones),
    }
}

/// The sorted token table behind lookups. Node and zone numbers index [`Ring::nodes`] and
/// [`intern_zones`]' ids; the allocator appends a joining node past the ring's nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
struct TokenTable {
    /// Tokens of nodes of weight > 0, ascending.
    tokens: Vec<u64>,
    /// `owners[i]` holds `tokens[i]`.
    owners: Vec<usize>,
    zone_of: Vec<usize>,
    tokens_per_node: Vec<usize>,
    /// Nodes with tokens, per zone.
    active_per_zone: Vec<usize>,
    /// Nodes with tokens.
    active_nodes: usize,
    /// Zones with a node with tokens.
    active_zones: usize,
}

impl TokenTable {
    fn new(mut claims: Vec<(u64, usize)>, zone_of: Vec<usize>) -> TokenTable {
        claims.sort_unstable();
        let zones = zone_of.iter().max().map_or(0, |&zone| zone + 1);
        let mut table = TokenTable {
            tokens: Vec::with_capacity(claims.len()),
            owners: Vec::with_capacity(claims.len()),
            tokens_per_node: vec![0; zone_of.len()],
            active_per_zone: vec![0; zones],
            zone_of,
            active_nodes: 0,
            active_zones: 0,
        };
        for (token, node) in claims {
            table.tokens.push(token);
            table.owners.push(node);
            table.count_token(node);
        }
        table
    }

    fn count_token(&mut self, node: usize) {
        if self.tokens_per_node[node] == 0 {
            self.active_nodes += 1;
            let zone = self.zone_of[node];
            if self.active_per_zone[zone] == 0 {
                self.active_zones += 1;
            }
            self.active_per_zone[zone] += 1;
        }
        self.tokens_per_node[node] += 1;
    }

    /// Adds `token` (not yet present) for `node`; returns its index.
    fn insert(&mut self, token: u64, node: usize) -> usize {
        let at = self.tokens.partition_point(|&t| t < token);
        self.tokens.insert(at, token);
        self.owners.insert(at, node);
        self.count_token(node);
        at
    }

    fn len(&self) -> usize {
        self.tokens.len()
    }

    fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    fn quota(&self, n: usize) -> Quota {
        quota(n, self.active_nodes, self.active_zones)
    }

    /// The quota once `node` owns at least one token.
    fn quota_with(&self, n: usize, node: usize) -> Quota {
        let joins = self.tokens_per_node[node] == 0;
        let opens_zone = self.active_per_zone[self.zone_of[node]] == 0;
        quota(
            n,
            self.active_nodes + usize::from(joins),
            self.active_zones + usize::from(joins && opens_zone),
        )
    }

    /// Owner of the token at `index`, which may run past the end once (walks wrap).
    fn owner(&self, index: usize) -> usize {
        self.owners[index % self.len()]
    }

    /// Index of the range holding `key_pos`: the range ending at the first token at or after it.
    fn range_of(&self, key_pos: u64) -> usize {
        let index = self.tokens.partition_point(|&token| token < key_pos);
        if index == self.len() { 0 } else { index }
    }

    /// The token before the range ending at `tokens[end]`.
    fn range_start(&self, end: usize) -> u64 {
        self.tokens[(end + self.len() - 1) % self.len()]
    }

    /// Number of positions in the range ending at `tokens[end]`.
    fn range_len(&self, end: usize) -> u128 {
        if self.len() == 1 {
            WHOLE_RING
        } else {
            u128::from(self.tokens[end].wrapping_sub(self.range_start(end)))
        }
    }

    /// Replicas of the keys of the range ending at `tokens[end]`; returns the last walk offset
    /// looked at.
    fn replicas_of_range(&self, end: usize, quota: Quota, replicas: &mut Vec<usize>) -> usize {
        choose_replicas(
            self.len(),
            |offset| self.owner(end + offset),
            &self.zone_of,
            quota,
            replicas,
        )
    }

    /// Replica and primary load of every node, in ring positions.
    fn loads(&self, quota: Quota) -> Loads {
        let mut loads = Loads {
            replica: vec![0; self.zone_of.len()],
            primary: vec![0; self.zone_of.len()],
        };
        let mut replicas = Vec::with_capacity(quota.replicas);
        for end in 0..self.len() {
            let len = self.range_len(end);
            self.replicas_of_range(end, quota, &mut replicas);
            for &node in &replicas {
                loads.replica[node] += len;
            }
            if let Some(&primary) = replicas.first() {
                loads.primary[primary] += len;
            }
        }
        loads
    }
}

struct Loads {
    replica: Vec<u128>,
    primary: Vec<u128>,
}

/// Fills `replicas` by the rule of [`Ring::preference_list`] from a clockwise walk of `steps`
/// tokens, `owner_at(offset)` owning the token at `offset`. Returns the last offset looked at:
/// tokens beyond it cannot change the choice.
///
/// Two passes over the walk instead of one with a list of skipped nodes, so that a lookup
/// allocates nothing but its result.
fn choose_replicas(
    steps: usize,
    owner_at: impl Fn(usize) -> usize,
    zone_of: &[usize],
    quota: Quota,
    replicas: &mut Vec<usize>,
) -> usize {
    replicas.clear();
    let mut last_offset = 0;
    if quota.replicas == 0 {
        return last_offset;
    }
    // The first node of each zone, until `quota.zones` zones are in.
    for offset in 0..steps {
        last_offset = offset;
        let node = owner_at(offset);
        if !replicas.iter().any(|&chosen| zone_of[chosen] == zone_of[node]) {
            replicas.push(node);
            if replicas.len() == quota.zones {
                break;
            }
        }
    }
    if replicas.len() == quota.replicas {
        return last_offset;
    }
    // Then every other node in walk order.
    for offset in 0..steps {
        let node = owner_at(offset);
        if !replicas.contains(&node) {
            replicas.push(node);
            if replicas.len() == quota.replicas {
                return last_offset.max(offset);
            }
        }
    }
    steps.saturating_sub(1)
}

/// Weight of primary-ownership balance against replica-ownership balance in the allocator's
/// score. Replica balance is what the targets are about, but while there are at most `n` nodes
/// (their replica loads cannot differ) primary balance is what places tokens, and coordinators
/// (the primaries) stay more even for it.
const PRIMARY_BALANCE_WEIGHT: f64 = 0.1;

/// Candidate positions scored for each new token. More candidates balance better and cost
/// proportionally more allocation time.
const CANDIDATES_PER_TOKEN: u32 = 32;

/// Candidate `attempt` for the node's token number `token_index`: `hash(id, index, attempt)`.
fn candidate_position(id: &NodeId, token_index: usize, attempt: u32) -> u64 {
    let mut hash = Xxh3Default::new();
    hash.update(id.as_str().as_bytes());
    hash.update(&(token_index as u64).to_le_bytes());
    hash.update(&attempt.to_le_bytes());
    hash.digest()
}

/// How a new token changes one node's loads, in ring positions.
#[derive(Clone, Copy, Debug)]
struct Delta {
    node: usize,
    replica: i128,
    primary: i128,
}

/// The greedy token allocator for one joining (or growing) node.
struct Allocator<'a> {
    id: &'a NodeId,
    /// The ring with the tokens chosen so far.
    table: TokenTable,
    /// The joining node.
    node: usize,
    n: usize,
    replica_load: Vec<i128>,
    primary_load: Vec<i128>,
    /// Fair loads, in fractions of the ring. The joiner's entries are paced, see
    /// [`Allocator::pace`].
    replica_target: Vec<f64>,
    primary_target: Vec<f64>,
    /// The joiner's token count once all its new tokens are placed, and its fair loads then.
    joiner_final_tokens: u64,
    joiner_final_replica: f64,
    joiner_final_primary: f64,
    // Scratch space for scoring candidates.
    deltas: Vec<Delta>,
    old_replicas: Vec<usize>,
    new_replicas: Vec<usize>,
}

impl<'a> Allocator<'a> {
    fn new(ring: &Ring, id: &'a NodeId, zone: Option<&str>, count: u32, n: usize) -> Allocator<'a> {
        let mut table = ring.table.clone();
        let node = match ring.node_index(id.as_str()) {
            Some(node) => node,
            None => {
                table.zone_of.push(0);
                table.tokens_per_node.push(0);
                table.zone_of.len() - 1
            }
        };
        if table.tokens_per_node[node] == 0 {
            let same_zone = ring.nodes.iter().position(|other| other.zone.as_deref() == zone);
            table.zone_of[node] = match same_zone {
                Some(other) => table.zone_of[other],
                None => {
                    table.active_per_zone.push(0);
                    table.active_per_zone.len() - 1
                }
            };
        }
        let mut final_tokens: Vec<u64> = table.tokens_per_node.iter().map(|&c| c as u64).collect();
        final_tokens[node] += u64::from(count);
        let replicas_per_key = table.quota_with(n, node).replicas;
        let replica_target = replica_targets(&final_tokens, replicas_per_key);
        let total_tokens: u64 = final_tokens.iter().sum();
        let primary_target: Vec<f64> = final_tokens
            .iter()
            .map(|&tokens| tokens as f64 / total_tokens as f64)
            .collect();
        let mut allocator = Allocator {
            joiner_final_tokens: final_tokens[node],
            joiner_final_replica: replica_target[node],
            joiner_final_primary: primary_target[node],
            id,
            table,
            node,
            n,
            replica_load: Vec::new(),
            primary_load: Vec::new(),
            replica_target,
            primary_target,
            deltas: Vec::new(),
            old_replicas: Vec::new(),
            new_replicas: Vec::new(),
        };
        allocator.recompute_loads();
        allocator
    }

    fn recompute_loads(&mut self) {
        let loads = self.table.loads(self.table.quota(self.n));
        self.replica_load = loads.replica.iter().map(|&load| load as i128).collect();
        self.primary_load = loads.primary.iter().map(|&load| load as i128).collect();
    }

    /// Whether the next token changes every preference list wherever it goes: the joiner's
    /// first token when there are fewer than `n` nodes, or fewer zones than `n` and the joiner
    /// opens one. It then enters every list, and its replica load does not depend on where the
    /// token lands: only the primary term of the score matters.
    fn next_token_changes_every_list(&self) -> bool {
        self.table.quota(self.n) != self.table.quota_with(self.n, self.node)
    }

    /// Sets the joiner's targets to what its tokens so far plus the next one should hold. A
    /// final target from the start would let the first tokens grab the biggest ranges and leave
    /// the last ones nothing useful to do but overshoot; paced, every token aims at its share.
    fn pace(&mut self) {
        let tokens_with_next = self.table.tokens_per_node[self.node] as f64 + 1.0;
        let fraction = (tokens_with_next / self.joiner_final_tokens as f64).min(1.0);
        self.replica_target[self.node] = self.joiner_final_replica * fraction;
        self.primary_target[self.node] = self.joiner_final_primary * fraction;
    }

    /// The best of the candidate positions for the joiner's token number `token_index`, if any
    /// is free.
    fn best_position(&mut self, token_index: usize) -> Option<u64> {
        self.pace();
        let mut best: Option<(f64, u64)> = None;
        for attempt in 0..CANDIDATES_PER_TOKEN {
            let position = candidate_position(self.id, token_index, attempt);
            // Ties keep the earlier attempt.
            if let Some(gain) = self.score(position)
                && best.is_none_or(|(best_gain, _)| gain > best_gain)
            {
                best = Some((gain, position));
            }
        }
        best.map(|(_, position)| position)
    }

    /// Adds the joiner's token at `position` (scored by [`Allocator::score`]) and updates the
    /// loads.
    fn take(&mut self, position: u64) {
        let everywhere = self.next_token_changes_every_list();
        // Re-score to fill `deltas` for this very position.
        self.score(position);
        self.table.insert(position, self.node);
        if everywhere {
            self.recompute_loads();
        } else {
            for delta in &self.deltas {
                self.replica_load[delta.node] += delta.replica;
                self.primary_load[delta.node] += delta.primary;
            }
        }
    }

    /// How much a joiner's token at `position` lowers the imbalance score
    /// `sum over nodes of (replica load / target - 1)^2 + PRIMARY_BALANCE_WEIGHT * (same for
    /// primary)`, leaving the load changes in `self.deltas`. `None` if a token is already there.
    ///
    /// Only the keys between the previous token and `position`, and the ranges before them whose
    /// walk reaches `position`, change preference lists, so only those are looked at.
    fn score(&mut self, position: u64) -> Option<f64> {
        let Allocator {
            table,
            node: joiner,
            n,
            replica_load,
            primary_load,
            replica_target,
            primary_target,
            deltas,
            old_replicas,
            new_replicas,
            ..
        } = self;
        let joiner = *joiner;
        let end = table.range_of(position);
        if table.tokens[end] == position {
            return None;
        }
        deltas.clear();
        let count = table.len();
        // Keys in (range start, position] now start their walk at the joiner.
        let split = i128::from(position.wrapping_sub(table.range_start(end)));
        let next_owner = table.owner(end);
        if next_owner != joiner {
            delta_of(deltas, joiner).primary += split;
            delta_of(deltas, next_owner).primary -= split;
        }
        let quota = table.quota(*n);
        if quota == table.quota_with(*n, joiner) {
            table.replicas_of_range(end, quota, old_replicas);
            choose_replicas(
                count + 1,
                |offset| match offset {
                    0 => joiner,
                    _ => table.owner(end + offset - 1),
                },
                &table.zone_of,
                quota,
                new_replicas,
            );
            record_change(deltas, old_replicas, new_replicas, split);
            // Earlier ranges whose walk reaches the new token (at offset `back` from them).
            // Walks from further back end no later, so the first that stops short ends the scan.
            for back in 1..count {
                let start = (end + count - back) % count;
                if table.replicas_of_range(start, quota, old_replicas) < back {
                    break;
                }
                choose_replicas(
                    count + 1,
                    |offset| match offset.cmp(&back) {
                        Ordering::Less => table.owner(start + offset),
                        Ordering::Equal => joiner,
                        Ordering::Greater => table.owner(start + offset - 1),
                    },
                    &table.zone_of,
                    quota,
                    new_replicas,
                );
                let len = table.range_len(start) as i128;
                record_change(deltas, old_replicas, new_replicas, len);
            }
        }
        let mut gain = 0.0;
        for delta in deltas.iter() {
            gain -= score_change(
                replica_load[delta.node],
                delta.replica,
                replica_target[delta.node],
            ) + PRIMARY_BALANCE_WEIGHT
                * score_change(
                    primary_load[delta.node],
                    delta.primary,
                    primary_target[delta.node],
                );
        }
        Some(gain)
    }
}

/// Change of `(load / target - 1)^2` when `load` (in ring positions) changes by `change`;
/// `target` is a fraction of the ring.
fn score_change(load: i128, change: i128, target: f64) -> f64 {
    let before = load as f64 / RING_SIZE / target - 1.0;
    let after = (load + change) as f64 / RING_SIZE / target - 1.0;
    after * after - before * before
}

/// The entry of `node` in `deltas`, added if missing.
fn delta_of(deltas: &mut Vec<Delta>, node: usize) -> &mut Delta {
    let index = match deltas.iter().position(|delta| delta.node == node) {
        Some(index) => index,
        None => {
            deltas.push(Delta {
                node,
                replica: 0,
                primary: 0,
            });
            deltas.len() - 1
        }
    };
    &mut deltas[index]
}

/// Records that `len` positions of keys change replicas from `old` to `new`.
fn record_change(deltas: &mut Vec<Delta>, old: &[usize], new: &[usize], len: i128) {
    for (list, other, sign) in [(new, old, 1), (old, new, -1)] {
        for &node in list.iter().filter(|node| !other.contains(node)) {
            delta_of(deltas, node).replica += sign * len;
        }
    }
}
