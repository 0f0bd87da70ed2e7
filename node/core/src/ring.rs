//! Consistent hashing with weighted virtual nodes: which nodes hold which keys.
//!
//! A key lives at [`crate::hash::key_position`] on a ring of 2^64 positions. Every node owns a
//! list of tokens (positions); the token ranges `(previous token, token]` tile the ring. A key's
//! preference list is found by walking clockwise from the first token at or after its position.
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
//! Tokens are chosen by a replication-aware greedy allocator (after Cassandra's
//! `ReplicationAwareTokenAllocator`), because random tokens miss the balance target: at 64 tokens
//! a node, `hash(id, i)` tokens put the fullest node's replica ownership 14% above the mean at 64
//! nodes, and up to 35% above it at fewer. A joining node places its tokens one at a time; for
//! each it scores a few positions derived from its identity, `hash(id, token index, attempt)`,
//! and takes the one that most lowers `sum over nodes of (load / target - 1)^2` (replica load,
//! plus a smaller weight of the same for primary load; targets in proportion to token counts).
//! A token changes only the preference lists of the keys just before it and of the few ranges
//! before those whose walk reaches it, so scoring a candidate walks those ranges only. The
//! joiner's own target is paced (after `i` of its `c` tokens it aims at `i / c` of its share), so
//! that each token takes about its share instead of the first ones grabbing the largest ranges
//! and the last ones overshooting. [`Ring::balanced`] joins members one by one in id order, so
//! every node computes the same ring. The scores are `f64` built from `+ - * /` only, which
//! IEEE 754 makes identical on every platform, so the allocator is deterministic everywhere.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;

use xxhash_rust::xxh3::{Xxh3Default, xxh3_64};

use crate::NodeId;

/// Tokens per node at the normal weight (100).
///
/// 64 meets the balance targets with a wide margin: with the allocator, replica ownership (N=3)
/// stays within 5% of the mean at every size from 3 to 64 nodes and a join moves within 3% of
/// its fair share, whatever the node names; at 32 some names come to 9%, too near the 10%
/// target. More tokens would enlarge what grows with them: the gossiped token list (512 bytes a
/// node), the ranges a join or drain streams, the allocator's work (tens of milliseconds for a
/// 64-node ring). Weights get a useful resolution: a token is 1.6 weight points, so ramping a
/// node in by steps of 10 moves about 6 tokens a step.
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

    /// Whether the ring has no members at all.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Digest (xxh3-64) of what the ring assigns: the ids, weights, zones and tokens of the
    /// members of weight above 0, in index order. Equal rings have equal versions however their
    /// nodes were listed. A member of weight 0 owns nothing and is left out, so a node that
    /// joins at weight 0 (or one that drained) does not make a new ring version: a ring change
    /// under way, whose proposal names the version it starts from, is not disturbed by it.
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

    /// Whether node `id` is among the `n` replicas of the key at `key_pos`.
    pub fn is_replica(&self, key_pos: u64, n: usize, id: &str) -> bool {
        let Some(node) = self.node_index(id) else {
            return false;
        };
        self.preference_list(key_pos, n).contains(&node)
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
    /// replica ownership stays balanced, giving each node a target in proportion to its token
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
        let first_index = self
            .node_index(id.as_str())
            .map_or(0, |node| self.nodes[node].tokens.len());
        let mut tokens = Vec::with_capacity(count as usize);
        for token_index in first_index..first_index + count as usize {
            // All candidates taken only if the ring is nearly full: stop short rather than loop.
            let Some(position) = allocator.best_position(token_index) else {
                break;
            };
            allocator.take(position);
            tokens.push(position);
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
    let mut moves = Vec::new();
    for_each_segment(old, new, n, |segment| {
        let from = missing_from(&segment.old, old, &segment.new, new);
        let to = missing_from(&segment.new, new, &segment.old, old);
        if !from.is_empty() || !to.is_empty() {
            push_merged(&mut moves, segment.start, segment.end, (from, to));
        }
    });
    merged_across_zero(moves)
        .into_iter()
        .map(|(start, end, (from, to))| RangeMove {
            start,
            end,
            from,
            to,
        })
        .collect()
}

/// A key range `(start, end]` that node `to` replicates in a new ring and not in the old one
/// (wrapping as [`RangeMove`]'s), with the old ring's replicas of it, in preference order: the
/// nodes that can hand it over.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Handoff {
    pub start: u64,
    pub end: u64,
    pub sources: Vec<NodeId>,
}

impl Handoff {
    /// Whether the key position `pos` lies in the range.
    pub fn contains(&self, pos: u64) -> bool {
        range_contains(self.start, self.end, pos)
    }
}

/// Whether `pos` lies in `(start, end]`, wrapping past `u64::MAX` when `start >= end`
/// (`start == end` is the whole ring).
pub fn range_contains(start: u64, end: u64, pos: u64) -> bool {
    if start < end {
        start < pos && pos <= end
    } else {
        pos > start || pos <= end
    }
}

/// The ranges node `to` gains from `old` to `new` (replica in `new`, not in `old`), in clockwise
/// order from the range that wraps past zero, adjacent ranges with the same sources merged.
/// Ranges nobody held in `old` (a ring that owned nothing yet) have nothing to hand over and are
/// left out.
pub fn handoffs(old: &Ring, new: &Ring, n: usize, to: &NodeId) -> Vec<Handoff> {
    let mut out = Vec::new();
    for_each_segment(old, new, n, |segment| {
        if segment.old.is_empty()
            || !contains_id(&segment.new, new, to)
            || contains_id(&segment.old, old, to)
        {
            return;
        }
        push_merged(
            &mut out,
            segment.start,
            segment.end,
            ids_of(&segment.old, old),
        );
    });
    merged_across_zero(out)
        .into_iter()
        .map(|(start, end, sources)| Handoff {
            start,
            end,
            sources,
        })
        .collect()
}

/// A key range `(start, end]` (wrapping as [`RangeMove`]'s) and its replicas, in preference
/// order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaRange {
    pub start: u64,
    pub end: u64,
    pub replicas: Vec<NodeId>,
}

impl ReplicaRange {
    /// Whether the key position `pos` lies in the range.
    pub fn contains(&self, pos: u64) -> bool {
        range_contains(self.start, self.end, pos)
    }
}

/// The ring cut into ranges of one preference list (of `n` replicas) each, in clockwise order
/// from the range that wraps past zero, adjacent ranges with the same list merged. Together they
/// cover the whole key space once; a ring without tokens has none.
pub fn replica_ranges(ring: &Ring, n: usize) -> Vec<ReplicaRange> {
    let mut out = Vec::new();
    for_each_segment(ring, ring, n, |segment| {
        push_merged(
            &mut out,
            segment.start,
            segment.end,
            ids_of(&segment.new, ring),
        );
    });
    merged_across_zero(out)
        .into_iter()
        .map(|(start, end, replicas)| ReplicaRange {
            start,
            end,
            replicas,
        })
        .collect()
}

/// The key ranges `(start, end]` (wrapping as [`RangeMove`]'s) whose `n` replicas do not
/// include node `id`, in clockwise order, adjacent ones merged: where every key `id` stores is
/// one it may drop. A node without tokens gets the whole ring (`start == end`); a ring without
/// tokens gives nothing.
pub fn foreign_ranges(ring: &Ring, n: usize, id: &NodeId) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for range in replica_ranges(ring, n) {
        if !range.replicas.contains(id) {
            push_merged(&mut out, range.start, range.end, ());
        }
    }
    merged_across_zero(out)
        .into_iter()
        .map(|(start, end, ())| (start, end))
        .collect()
}

/// Appends the range `(start, end]` with `key`, extending the last range instead when it ends
/// at `start` with an equal key.
fn push_merged<K: PartialEq>(out: &mut Vec<(u64, u64, K)>, start: u64, end: u64, key: K) {
    match out.last_mut() {
        Some(last) if last.1 == start && last.2 == key => last.1 = end,
        _ => out.push((start, end, key)),
    }
}

/// Merges the last range into the first when it continues it across zero with an equal key
/// (the ranges run clockwise from the one that wraps past zero).
fn merged_across_zero<K: PartialEq>(mut out: Vec<(u64, u64, K)>) -> Vec<(u64, u64, K)> {
    if out.len() > 1 {
        let (first, last) = (&out[0], &out[out.len() - 1]);
        if last.1 == first.0 && last.2 == first.2 {
            let (start, _, _) = out.pop().expect("more than one");
            out[0].0 = start;
        }
    }
    out
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
    let mut bounds: Vec<u64> = old
        .table
        .tokens
        .iter()
        .chain(&new.table.tokens)
        .copied()
        .collect();
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

/// Ids of `replicas` (indices into `ring`'s nodes), in order.
fn ids_of(replicas: &[usize], ring: &Ring) -> Vec<NodeId> {
    replicas
        .iter()
        .map(|&node| ring.nodes[node].id.clone())
        .collect()
}

fn contains_id(replicas: &[usize], ring: &Ring, id: &NodeId) -> bool {
    replicas.iter().any(|&node| ring.nodes[node].id == *id)
}

/// Ids of `replicas` (of `ring`) that are not among `others` (of `other_ring`).
fn missing_from(
    replicas: &[usize],
    ring: &Ring,
    others: &[usize],
    other_ring: &Ring,
) -> Vec<NodeId> {
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
    let weights = weights(&ring);
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
    let (replica_max_over_mean, replica_min_over_mean) = spread(&replica_ratios);
    let (primary_max_over_mean, primary_min_over_mean) = spread(&primary_ratios);
    RingReport {
        replication_factor: n,
        vnodes_per_node,
        version: ring.version,
        nodes,
        replica_max_over_mean,
        replica_min_over_mean,
        primary_max_over_mean,
        primary_min_over_mean,
        adding: report_join(&ring, vnodes_per_node, n),
        removing: report_leave(&ring, n),
    }
}

fn weights(ring: &Ring) -> Vec<u64> {
    ring.nodes
        .iter()
        .map(|node| u64::from(node.weight))
        .collect()
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
    let weights = weights(&grown);
    let moves = moved_ranges(ring, &grown, n);
    Some(ChangeReport {
        moved_fraction: moved_fraction(ring, &grown, n),
        fair_fraction: fair_replica_shares(&weights, n)[index],
        only_this_node: moves.iter().all(|m| m.to == std::slice::from_ref(&id)),
        node: id,
    })
}

fn report_leave(ring: &Ring, n: usize) -> Option<ChangeReport> {
    let (index, leaving) = ring.nodes.iter().enumerate().next_back()?;
    let shrunk = ring.without_node(&leaving.id).ok()?;
    let weights = weights(ring);
    let moves = moved_ranges(ring, &shrunk, n);
    Some(ChangeReport {
        node: leaving.id.clone(),
        moved_fraction: moved_fraction(ring, &shrunk, n),
        fair_fraction: fair_replica_shares(&weights, n)[index],
        only_this_node: moves
            .iter()
            .all(|m| m.from == std::slice::from_ref(&leaving.id)),
    })
}

impl RingReport {
    /// A fixed-width table, one line per node, then a summary (the same as `Display`).
    pub fn to_table(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for RingReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let id_width = self
            .nodes
            .iter()
            .map(|node| node.id.as_str().len())
            .max()
            .unwrap_or(0)
            .max("node".len());
        let zone_width = self
            .nodes
            .iter()
            .map(|node| node.zone.as_deref().map_or(1, str::len))
            .max()
            .unwrap_or(0)
            .max("zone".len());
        writeln!(
            f,
            "{:<id_width$}  {:>6}  {:<zone_width$}  {:>6}  {:>8}  {:>8}",
            "node", "weight", "zone", "tokens", "primary", "replica"
        )?;
        for node in &self.nodes {
            writeln!(
                f,
                "{:<id_width$}  {:>6}  {:<zone_width$}  {:>6}  {:>7.3}%  {:>7.3}%",
                node.id.as_str(),
                node.weight,
                node.zone.as_deref().unwrap_or("-"),
                node.tokens,
                node.primary * 100.0,
                node.replica * 100.0,
            )?;
        }
        writeln!(
            f,
            "{} nodes, n={}, {} vnodes per node, ring version {:016x}",
            self.nodes.len(),
            self.replication_factor,
            self.vnodes_per_node,
            self.version,
        )?;
        writeln!(
            f,
            "replica max/mean {:.3}, min/mean {:.3}; primary max/mean {:.3}, min/mean {:.3}",
            self.replica_max_over_mean,
            self.replica_min_over_mean,
            self.primary_max_over_mean,
            self.primary_min_over_mean,
        )?;
        let changes = [
            ("adding", &self.adding, "to"),
            ("removing", &self.removing, "from"),
        ];
        for (verb, change, direction) in changes {
            let Some(change) = change else {
                continue;
            };
            let all = if change.only_this_node {
                "all"
            } else {
                "NOT all"
            };
            writeln!(
                f,
                "{verb} {}: moves {:.3}% of key-replicas (fair share {:.3}%), {all} {direction} it",
                change.node,
                change.moved_fraction * 100.0,
                change.fair_fraction * 100.0,
            )?;
        }
        Ok(())
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
    let mut order: Vec<usize> = (0..amounts.len())
        .filter(|&node| amounts[node] > 0)
        .collect();
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
    nodes
        .iter()
        .map(|node| ids[&node.zone.as_deref()])
        .collect()
}

/// The canonical encoding hashed into [`Ring::version`]. Never change it: versions are compared
/// across nodes running different releases.
fn membership_digest(nodes: &[NodeSpec]) -> u64 {
    let mut digest = Xxh3Default::new();
    digest.update(b"dynakv-ring-v1");
    for node in nodes.iter().filter(|node| node.weight > 0) {
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
        if !replicas
            .iter()
            .any(|&chosen| zone_of[chosen] == zone_of[node])
        {
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
const PRIMARY_BALANCE_WEIGHT: f64 = 0.3;

/// Candidate positions scored for each new token; the allocation time grows in proportion. With
/// 16 the 64-node ring came out at replica max/mean 1.05, with 32 at 1.02, with 64 no better.
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
            let same_zone = ring
                .nodes
                .iter()
                .position(|other| other.zone.as_deref() == zone);
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::OnceLock;

    use proptest::prelude::*;

    use super::*;

    const N: usize = 3;

    fn id(name: &str) -> NodeId {
        NodeId::new(name).unwrap()
    }

    fn member(name: &str, weight: u32, zone: Option<&str>) -> Member {
        Member {
            id: id(name),
            weight,
            zone: zone.map(str::to_string),
        }
    }

    fn spec(name: &str, zone: Option<&str>, tokens: &[u64]) -> NodeSpec {
        NodeSpec {
            id: id(name),
            weight: NORMAL_WEIGHT,
            zone: zone.map(str::to_string),
            tokens: tokens.to_vec(),
        }
    }

    /// `kv-00`, `kv-01`, ...: id order is numeric order.
    fn kv_members(count: usize) -> Vec<Member> {
        (0..count)
            .map(|index| member(&format!("kv-{index:02}"), NORMAL_WEIGHT, None))
            .collect()
    }

    /// The balanced ring of 64 normal nodes, built once for all tests.
    fn sixty_four() -> &'static Ring {
        static RING: OnceLock<Ring> = OnceLock::new();
        RING.get_or_init(|| Ring::balanced(&kv_members(64), DEFAULT_VNODES_PER_NODE, N))
    }

    /// The balanced ring of the first `count` of the 64: a join never changes earlier nodes'
    /// tokens, so it is a prefix of the big one (checked by
    /// `a_balanced_ring_of_the_first_members_is_a_prefix_of_a_bigger_one`).
    fn first(count: usize) -> Ring {
        Ring::new(sixty_four().nodes()[..count].to_vec()).unwrap()
    }

    fn ids(ring: &Ring, nodes: &[usize]) -> Vec<String> {
        nodes
            .iter()
            .map(|&node| ring.nodes()[node].id.to_string())
            .collect()
    }

    fn max_over_mean(values: impl Iterator<Item = f64>) -> f64 {
        let values: Vec<f64> = values.collect();
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        values.iter().copied().fold(0.0, f64::max) / mean
    }

    fn replica_max_over_mean(ring: &Ring) -> f64 {
        max_over_mean(ring.ownership(N).iter().map(|owned| owned.replica))
    }

    /// Asserts that every replica that moved between `old` and `new` went to `joiner`.
    fn assert_moves_only_to(old: &Ring, new: &Ring, joiner: &NodeId) {
        let moves = moved_ranges(old, new, N);
        assert!(!moves.is_empty(), "{joiner} joined but nothing moved");
        for range in moves {
            assert_eq!(range.to, std::slice::from_ref(joiner), "{range:?}");
            assert!(range.from.len() <= 1, "{range:?}");
            assert!(
                range
                    .from
                    .iter()
                    .all(|from| old.node_index(from.as_str()).is_some())
            );
        }
    }

    #[test]
    fn vnode_count_rounds_to_the_nearest_token() {
        assert_eq!(vnode_count(64, 100), 64);
        assert_eq!(vnode_count(64, 0), 0);
        assert_eq!(vnode_count(64, 50), 32);
        assert_eq!(vnode_count(64, 10), 6);
        assert_eq!(vnode_count(64, 1), 1);
        assert_eq!(vnode_count(3, 50), 2);
        assert_eq!(vnode_count(64, MAX_WEIGHT), 640);
        assert_eq!(vnode_count(u32::MAX, MAX_WEIGHT), u32::MAX);
    }

    #[test]
    fn new_refuses_repeated_ids_excessive_weights_and_shared_tokens() {
        let repeated = Ring::new(vec![spec("a", None, &[1]), spec("a", None, &[2])]);
        assert_eq!(repeated, Err(RingError::DuplicateNode(id("a"))));

        let mut heavy = spec("a", None, &[1]);
        heavy.weight = MAX_WEIGHT + 1;
        assert_eq!(
            Ring::new(vec![heavy]),
            Err(RingError::WeightTooHigh {
                node: id("a"),
                weight: MAX_WEIGHT + 1
            })
        );

        let shared = Ring::new(vec![spec("b", None, &[7, 9]), spec("a", None, &[3, 7])]);
        assert_eq!(
            shared,
            Err(RingError::DuplicateToken {
                token: 7,
                first: id("a"),
                second: id("b")
            })
        );
        let twice = Ring::new(vec![spec("a", None, &[5, 5])]);
        assert!(matches!(
            twice,
            Err(RingError::DuplicateToken { token: 5, .. })
        ));
    }

    #[test]
    fn nodes_are_sorted_by_id_and_found_by_it() {
        let ring = Ring::new(vec![
            spec("c", None, &[30]),
            spec("a", None, &[10]),
            spec("b", None, &[20]),
        ])
        .unwrap();
        assert_eq!(ids(&ring, &[0, 1, 2]), ["a", "b", "c"]);
        assert_eq!(ring.node_index("b"), Some(1));
        assert_eq!(ring.node_index("d"), None);
        assert_eq!(ring.len(), 3);
        assert!(!ring.is_empty());
        assert!(Ring::new(Vec::new()).unwrap().is_empty());
    }

    #[test]
    fn version_digests_the_whole_membership_whatever_the_listing_order() {
        let nodes = vec![spec("a", Some("z1"), &[10, 40]), spec("b", None, &[20])];
        let version = Ring::new(nodes.clone()).unwrap().version();
        let reversed: Vec<NodeSpec> = nodes.iter().rev().cloned().collect();
        assert_eq!(Ring::new(reversed).unwrap().version(), version);

        let mut changes: Vec<Vec<NodeSpec>> = Vec::new();
        for change in 0..4 {
            let mut changed = nodes.clone();
            match change {
                0 => changed[0].weight = 50,
                1 => changed[0].zone = Some("z2".to_string()),
                2 => changed[0].tokens.reverse(),
                _ => changed[1].id = id("c"),
            }
            changes.push(changed);
        }
        for changed in changes {
            assert_ne!(
                Ring::new(changed.clone()).unwrap().version(),
                version,
                "{changed:?}"
            );
        }
    }

    #[test]
    fn version_leaves_out_members_of_weight_zero() {
        let nodes = vec![spec("a", Some("z1"), &[10, 40]), spec("b", None, &[20])];
        let version = Ring::new(nodes.clone()).unwrap().version();
        let mut joined = nodes.clone();
        let mut joiner = spec("c", Some("z2"), &[]);
        joiner.weight = 0;
        joined.push(joiner);
        let ring = Ring::new(joined).unwrap();
        assert_eq!(ring.len(), 3, "the weight-0 member is still listed");
        assert_eq!(ring.version(), version, "but it assigns nothing");

        let mut drained = nodes.clone();
        drained[1].weight = 0;
        drained[1].tokens.clear();
        assert_ne!(Ring::new(drained.clone()).unwrap().version(), version);
        assert_eq!(
            Ring::new(drained).unwrap().version(),
            Ring::new(vec![nodes[0].clone()]).unwrap().version(),
            "a drained member is as good as gone"
        );
    }

    #[test]
    fn preference_list_walks_clockwise_skipping_chosen_nodes_and_wraps() {
        let ring = Ring::new(vec![
            spec("a", None, &[10, 40]),
            spec("b", None, &[20]),
            spec("c", None, &[30]),
            spec("d", None, &[50]),
        ])
        .unwrap();
        let list = |key_pos| ids(&ring, &ring.preference_list(key_pos, N));
        assert_eq!(list(15), ["b", "c", "a"]);
        assert_eq!(
            list(20),
            ["b", "c", "a"],
            "a token's own position is in its range"
        );
        assert_eq!(list(35), ["a", "d", "b"], "a's second token is skipped");
        assert_eq!(list(45), ["d", "a", "b"]);
        assert_eq!(
            list(51),
            ["a", "b", "c"],
            "past the last token the walk wraps"
        );
        assert_eq!(list(0), ["a", "b", "c"]);
        assert_eq!(
            ids(&ring, &ring.preference_list(15, 9)),
            ["b", "c", "a", "d"]
        );
        assert!(ring.preference_list(15, 0).is_empty());
    }

    #[test]
    fn zones_take_a_second_replica_from_a_zone_only_once_every_zone_is_in() {
        let ring = Ring::new(vec![
            spec("a", Some("z1"), &[10]),
            spec("b", Some("z1"), &[20]),
            spec("c", Some("z2"), &[30]),
            spec("d", Some("z3"), &[40]),
            spec("e", Some("z2"), &[50]),
        ])
        .unwrap();
        let list = |key_pos, n| ids(&ring, &ring.preference_list(key_pos, n));
        assert_eq!(list(5, 3), ["a", "c", "d"]);
        assert_eq!(list(5, 4), ["a", "c", "d", "b"]);
        assert_eq!(list(5, 5), ["a", "c", "d", "b", "e"]);
        assert_eq!(list(45, 3), ["e", "a", "d"]);
        assert_eq!(list(45, 4), ["e", "a", "d", "b"]);
        assert_eq!(list(45, 2), ["e", "a"]);
    }

    #[test]
    fn nodes_of_weight_zero_are_never_chosen() {
        let mut drained = spec("b", None, &[20]);
        drained.weight = 0;
        let ring = Ring::new(vec![
            spec("a", None, &[10]),
            drained,
            spec("c", None, &[30]),
        ])
        .unwrap();
        for key_pos in [0, 15, 20, 25, 35] {
            assert_eq!(ids(&ring, &ring.preference_list(key_pos, N)).len(), 2);
            assert!(!ring.walk(key_pos, N).any(|node| node == 1));
        }
        assert_eq!(ring.ownership(N)[1].replica, 0.0);
        assert_eq!(ring.ownership(N)[1].primary, 0.0);
    }

    #[test]
    fn walk_gives_the_preference_list_then_the_other_nodes_clockwise() {
        let ring = Ring::new(vec![
            spec("a", None, &[10, 40]),
            spec("b", None, &[20]),
            spec("c", None, &[30]),
            spec("d", None, &[50]),
            spec("e", None, &[60]),
        ])
        .unwrap();
        let walk: Vec<usize> = ring.walk(15, 2).collect();
        assert_eq!(ids(&ring, &walk), ["b", "c", "a", "d", "e"]);
        let walk: Vec<usize> = ring.walk(55, 3).collect();
        assert_eq!(ids(&ring, &walk), ["e", "a", "b", "c", "d"]);
    }

    #[test]
    fn ownership_shares_sum_to_one() {
        for count in [1, 2, 3, 5, 16] {
            let ownership = first(count).ownership(N);
            let replica: f64 = ownership.iter().map(|owned| owned.replica).sum();
            let primary: f64 = ownership.iter().map(|owned| owned.primary).sum();
            assert!((replica - 1.0).abs() < 1e-9, "{count} nodes: {replica}");
            assert!((primary - 1.0).abs() < 1e-9, "{count} nodes: {primary}");
        }
    }

    #[test]
    fn a_balanced_ring_of_the_first_members_is_a_prefix_of_a_bigger_one() {
        let small = Ring::balanced(&kv_members(6), DEFAULT_VNODES_PER_NODE, N);
        assert_eq!(small, first(6));
    }

    #[test]
    fn replica_ownership_stays_within_ten_percent_of_the_mean_from_3_to_64_nodes() {
        for count in 3..=64 {
            let spread = replica_max_over_mean(&first(count));
            assert!(spread <= 1.10, "{count} nodes: replica max/mean {spread}");
        }
    }

    #[test]
    fn adding_the_kth_node_moves_at_most_1_1_over_k_of_the_replicas_all_to_it() {
        for k in 3..=64 {
            let (old, new) = (first(k - 1), first(k));
            let joiner = &new.nodes()[k - 1].id;
            assert_moves_only_to(&old, &new, joiner);
            let moved = moved_fraction(&old, &new, N);
            assert!(moved <= 1.1 / k as f64, "k={k}: moved {moved}");
        }
    }

    #[test]
    fn moved_ranges_merge_neighbours_also_across_zero() {
        const QUARTER: u64 = 1 << 62;
        let old = Ring::new(vec![
            spec("a", None, &[QUARTER]),
            spec("b", None, &[2 * QUARTER]),
        ])
        .unwrap();
        let d_tokens = [3 * QUARTER, QUARTER / 2, QUARTER / 2 * 3, QUARTER / 4 * 7];
        let mut nodes = old.nodes().to_vec();
        nodes.push(spec("d", None, &d_tokens));
        let new = Ring::new(nodes).unwrap();
        // With one replica, d takes (2Q, 3Q] and (3Q, Q/2] from a, which merge across zero (and
        // come first, wrapping), and (Q, 3Q/2] and (3Q/2, 7Q/4] from b.
        let expected = [
            RangeMove {
                start: 2 * QUARTER,
                end: QUARTER / 2,
                from: vec![id("a")],
                to: vec![id("d")],
            },
            RangeMove {
                start: QUARTER,
                end: QUARTER / 4 * 7,
                from: vec![id("b")],
                to: vec![id("d")],
            },
        ];
        assert_eq!(moved_ranges(&old, &new, 1), expected);
        assert_eq!(moved_fraction(&old, &new, 1), (2.5 + 0.75) / 4.0);
        assert!(moved_ranges(&new, &new, N).is_empty());
        assert_eq!(moved_fraction(&new, &new, N), 0.0);
    }

    #[test]
    fn foreign_ranges_are_where_a_node_is_no_replica_merged_across_zero() {
        const QUARTER: u64 = 1 << 62;
        let ring = Ring::new(vec![
            spec("a", None, &[QUARTER, 3 * QUARTER]),
            spec("b", None, &[2 * QUARTER]),
        ])
        .unwrap();
        // One replica: a holds (3Q, Q] (across zero) and (2Q, 3Q], b holds (Q, 2Q].
        assert_eq!(foreign_ranges(&ring, 1, &id("a")), [(QUARTER, 2 * QUARTER)]);
        assert_eq!(foreign_ranges(&ring, 1, &id("b")), [(2 * QUARTER, QUARTER)]);
        assert_eq!(
            replica_ranges(&ring, 1),
            [
                ReplicaRange {
                    start: 2 * QUARTER,
                    end: QUARTER,
                    replicas: vec![id("a")]
                },
                ReplicaRange {
                    start: QUARTER,
                    end: 2 * QUARTER,
                    replicas: vec![id("b")]
                },
            ]
        );
        // Two replicas: both hold everything; a stranger holds nothing, the whole ring.
        assert!(foreign_ranges(&ring, 2, &id("a")).is_empty());
        let whole = foreign_ranges(&ring, 2, &id("c"));
        assert_eq!(whole.len(), 1);
        assert_eq!(whole[0].0, whole[0].1);
        let empty = Ring::new(vec![spec("a", None, &[])]).unwrap();
        assert!(foreign_ranges(&empty, 1, &id("a")).is_empty());
        assert!(replica_ranges(&empty, 1).is_empty());
    }

    #[test]
    fn a_change_of_every_list_is_one_range_round_the_ring() {
        let old = Ring::new(vec![spec("a", None, &[100])]).unwrap();
        let new = Ring::new(vec![spec("b", None, &[100])]).unwrap();
        let moves = moved_ranges(&old, &new, N);
        assert_eq!(
            moves,
            [RangeMove {
                start: 100,
                end: 100,
                from: vec![id("a")],
                to: vec![id("b")]
            }]
        );
        assert_eq!(moved_fraction(&old, &new, N), 1.0);
    }

    #[test]
    fn changes_to_unknown_or_existing_nodes_are_refused() {
        let ring = first(4);
        let existing = member("kv-01", NORMAL_WEIGHT, None);
        assert_eq!(
            ring.with_node(&existing, DEFAULT_VNODES_PER_NODE, N),
            Err(RingError::DuplicateNode(id("kv-01")))
        );
        assert_eq!(
            ring.without_node(&id("nope")),
            Err(RingError::UnknownNode(id("nope")))
        );
        assert_eq!(
            ring.with_weight(&id("nope"), 0, DEFAULT_VNODES_PER_NODE, N),
            Err(RingError::UnknownNode(id("nope")))
        );
        assert!(matches!(
            ring.with_weight(&id("kv-01"), MAX_WEIGHT + 1, DEFAULT_VNODES_PER_NODE, N),
            Err(RingError::WeightTooHigh { .. })
        ));
        let heavy = member("new", MAX_WEIGHT + 1, None);
        assert!(matches!(
            ring.with_node(&heavy, DEFAULT_VNODES_PER_NODE, N),
            Err(RingError::WeightTooHigh { .. })
        ));
    }

    #[test]
    fn lowering_a_weight_drops_the_highest_tokens_and_moves_only_that_nodes_replicas() {
        let ring = first(8);
        let node = id("kv-03");
        let lowered = ring
            .with_weight(&node, 50, DEFAULT_VNODES_PER_NODE, N)
            .unwrap();
        let index = ring.node_index("kv-03").unwrap();
        assert_eq!(
            lowered.nodes()[index].tokens,
            ring.nodes()[index].tokens[..32]
        );
        for range in moved_ranges(&ring, &lowered, N) {
            assert_eq!(range.from, std::slice::from_ref(&node), "{range:?}");
        }
        let share = lowered.ownership(N)[index].replica * 8.0;
        assert!(
            (0.4..=0.6).contains(&share),
            "half weight holds {share} of a fair share"
        );
    }

    #[test]
    fn raising_a_weight_appends_tokens_and_moves_replicas_only_to_that_node() {
        let ring = first(8);
        let node = id("kv-05");
        let raised = ring
            .with_weight(&node, 200, DEFAULT_VNODES_PER_NODE, N)
            .unwrap();
        let index = ring.node_index("kv-05").unwrap();
        assert_eq!(
            raised.nodes()[index].tokens[..64],
            ring.nodes()[index].tokens
        );
        assert_eq!(raised.nodes()[index].tokens.len(), 128);
        assert_moves_only_to(&ring, &raised, &node);
        let fair = fair_replica_shares(&[100, 100, 100, 100, 100, 200, 100, 100], N);
        let share = raised.ownership(N)[index].replica / fair[index];
        assert!(
            (0.9..=1.1).contains(&share),
            "double weight holds {share} of its fair share"
        );
    }

    #[test]
    fn report_lists_every_node_and_what_a_join_and_a_leave_move() {
        let report = report(&kv_members(8), DEFAULT_VNODES_PER_NODE, N);
        assert_eq!(report.nodes.len(), 8);
        assert!(report.nodes.iter().all(|node| node.tokens == 64));
        assert!(report.replica_max_over_mean <= 1.10);
        assert!(report.replica_min_over_mean >= 0.9);
        let adding = report.adding.as_ref().unwrap();
        assert_eq!(adding.node, id("new-node"));
        assert!(adding.only_this_node);
        assert!(adding.moved_fraction <= 1.1 / 9.0);
        let removing = report.removing.as_ref().unwrap();
        assert_eq!(removing.node, id("kv-07"));
        assert!(removing.only_this_node);
        let table = report.to_table();
        assert_eq!(table.lines().count(), 1 + 8 + 4);
        assert!(table.contains("kv-07"));
        assert!(table.contains("replica max/mean"));
        assert!(table.contains("adding new-node: moves"));
        assert!(!table.contains("NOT all"));
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["nodes"][0]["id"], "kv-00");
    }

    #[test]
    fn the_report_names_the_new_node_so_that_it_does_not_clash() {
        let members = [
            member("new-node", NORMAL_WEIGHT, Some("z1")),
            member("other", NORMAL_WEIGHT, Some("z1")),
            member("third", NORMAL_WEIGHT, Some("z2")),
        ];
        let report = report(&members, 8, N);
        assert_eq!(report.adding.unwrap().node, id("new-node-2"));
    }

    fn node_name() -> impl Strategy<Value = String> {
        "[a-z][a-z0-9-]{0,6}"
    }

    fn zone() -> impl Strategy<Value = Option<String>> {
        prop::option::of(prop::sample::select(vec!["z1", "z2", "z3"]).prop_map(str::to_string))
    }

    /// Distinct members with any weight up to 200, some drained, some zoned.
    fn members(max: usize) -> impl Strategy<Value = Vec<Member>> {
        prop::collection::btree_map(node_name(), (0u32..=200, zone()), 1..=max).prop_map(|map| {
            map.into_iter()
                .map(|(name, (weight, zone))| Member {
                    id: id(&name),
                    weight,
                    zone,
                })
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]

        #[test]
        fn the_same_members_in_any_order_give_the_same_ring(
            members in members(8),
            vnodes in 1u32..=32,
            n in 1usize..=4,
            rotation in 0usize..8,
        ) {
            let ring = Ring::balanced(&members, vnodes, n);
            let mut reordered = members.clone();
            reordered.reverse();
            let len = reordered.len();
            reordered.rotate_left(rotation % len);
            let again = Ring::balanced(&reordered, vnodes, n);
            prop_assert_eq!(&again, &ring);
            prop_assert_eq!(again.version(), ring.version());
            for (node, member) in ring.nodes().iter().zip(&members) {
                prop_assert_eq!(node.tokens.len() as u32, vnode_count(vnodes, member.weight));
            }
        }

        #[test]
        fn preference_lists_hold_distinct_nodes_spanning_as_many_zones_as_possible(
            members in members(10),
            n in 1usize..=5,
            key_positions in prop::collection::vec(any::<u64>(), 20),
        ) {
            let ring = Ring::balanced(&members, 8, n);
            let active: Vec<usize> = (0..ring.len())
                .filter(|&node| {
                    let spec = &ring.nodes()[node];
                    spec.weight > 0 && !spec.tokens.is_empty()
                })
                .collect();
            let zones: BTreeSet<Option<&str>> =
                active.iter().map(|&node| ring.nodes()[node].zone.as_deref()).collect();
            for key_pos in key_positions {
                let list = ring.preference_list(key_pos, n);
                prop_assert_eq!(list.len(), n.min(active.len()));
                let distinct: BTreeSet<usize> = list.iter().copied().collect();
                prop_assert_eq!(distinct.len(), list.len());
                prop_assert!(list.iter().all(|node| active.contains(node)));
                let list_zones: BTreeSet<Option<&str>> =
                    list.iter().map(|&node| ring.nodes()[node].zone.as_deref()).collect();
                prop_assert_eq!(list_zones.len(), n.min(zones.len()).min(list.len()));

                let walk: Vec<usize> = ring.walk(key_pos, n).collect();
                prop_assert_eq!(&walk[..list.len()], &list[..]);
                let walked: BTreeSet<usize> = walk.iter().copied().collect();
                prop_assert_eq!(walk.len(), active.len());
                prop_assert_eq!(walked, active.iter().copied().collect::<BTreeSet<usize>>());
            }
        }

        #[test]
        fn replica_and_foreign_ranges_agree_with_preference_lists(
            members in members(8),
            n in 1usize..=4,
            key_positions in prop::collection::vec(any::<u64>(), 64),
        ) {
            let ring = Ring::balanced(&members, 8, n);
            let ranges = replica_ranges(&ring, n);
            for key_pos in key_positions {
                let list = ids(&ring, &ring.preference_list(key_pos, n));
                if ranges.is_empty() {
                    // No node has tokens: nobody holds anything.
                    prop_assert!(list.is_empty());
                    continue;
                }
                let holding: Vec<&ReplicaRange> =
                    ranges.iter().filter(|r| r.contains(key_pos)).collect();
                prop_assert_eq!(holding.len(), 1, "{} in {:?}", key_pos, ranges);
                let replicas: Vec<String> =
                    holding[0].replicas.iter().map(|r| r.to_string()).collect();
                prop_assert_eq!(&replicas, &list);
                for node in ring.nodes() {
                    let foreign = foreign_ranges(&ring, n, &node.id);
                    let outside = foreign.iter().any(|&(s, e)| range_contains(s, e, key_pos));
                    prop_assert_eq!(outside, !list.contains(&node.id.to_string()));
                }
            }
        }

        #[test]
        fn adding_a_node_moves_only_replicas_to_it(k in 3usize..=64, name in node_name()) {
            let ring = first(k - 1);
            let joiner = member(&format!("new-{name}"), NORMAL_WEIGHT, None);
            let grown = ring.with_node(&joiner, DEFAULT_VNODES_PER_NODE, N).unwrap();
            assert_moves_only_to(&ring, &grown, &joiner.id);
            let moved = moved_fraction(&ring, &grown, N);
            prop_assert!(moved <= 1.1 / k as f64, "k={} moved {}", k, moved);
        }

        #[test]
        fn adding_a_node_to_any_membership_moves_replicas_only_to_it(
            members in members(6),
            joiner_zone in zone(),
        ) {
            let ring = Ring::balanced(&members, 16, N);
            let joiner = Member { id: id("joiner"), weight: NORMAL_WEIGHT, zone: joiner_zone };
            let grown = ring.with_node(&joiner, 16, N).unwrap();
            assert_moves_only_to(&ring, &grown, &joiner.id);
        }

        #[test]
        fn draining_a_node_moves_only_ranges_it_held(
            members in members(8),
            pick in any::<prop::sample::Index>(),
        ) {
            let ring = Ring::balanced(&members, 16, N);
            let drained = &ring.nodes()[pick.index(ring.len())].id;
            let index = ring.node_index(drained.as_str()).unwrap();
            let held = ring.ownership(N)[index].replica;
            let after = ring.with_weight(drained, 0, 16, N).unwrap();
            prop_assert!(after.nodes()[index].tokens.is_empty());
            let moves = moved_ranges(&ring, &after, N);
            for range in &moves {
                prop_assert_eq!(&range.from, &vec![drained.clone()]);
            }
            prop_assert_eq!(moves.is_empty(), held == 0.0);
        }
    }
}
