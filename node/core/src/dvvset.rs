//! Dotted version vector sets (DVVSet): the version of every key.
//!
//! This follows Almeida et al. 2014, "Scalable and Accurate Causality Tracking for Eventually
//! Consistent Stores", operation by operation as Riak's `dvvset.erl` implements it (`new`,
//! `new_with`, `sync`, `join`, `update`, `values`, `size`, `ids`, `less`, `equal`, `lww`).
//!
//! # Representation
//! A [`Dvvset`] is a list of [`Entry`]s, one per server that coordinated a write of the key, sorted
//! by [`NodeId`], plus a list of *anonymous* values. An entry `(id, n, [v_n, v_n-1, .., v_n-k+1])`
//! says: the causal history holds the events `(id, 1..=n)`, and the `k` newest of them (the *dots*
//! `(id, n-k+1..=n)`) still hold the values listed, newest first. Older events of `id` hold no
//! value (they were overwritten). Anonymous values have no dot: they only exist in a client-side
//! clock made by [`Dvvset::new`] / [`Dvvset::new_with`] until [`Dvvset::update`] gives them one.
//!
//! # Invariants (kept by every operation and checked by [`Clock::decode`])
//! - entries sorted by id, ids unique, every counter >= 1, `values.len() <= counter`;
//! - anonymous values sorted and unique (canonical order: Riak keeps them as a set);
//! - canonical form: two replicas that hold the same logical state hold identical structures, so
//!   `==`, the encoding and [`Clock::digest`] agree between them (the Merkle trees rely on it).
//!
//! # Laws (property-tested below)
//! For every clock the node stores (anonymous list empty, as [`Dvvset::update`] produces):
//! - `sync` is commutative, associative and idempotent, and its result is structurally unique;
//! - `sync` keeps exactly the values that no other value known to either side causally covers,
//!   i.e. a value disappears only when a write whose context included it has been seen;
//! - a write whose context is `join` of a read removes every value that read returned;
//! - `k` concurrent writes with the same context leave exactly `k` siblings whatever the
//!   coordinators, because causality is tracked per coordinating server (no sibling explosion).
//!
//! With anonymous values `sync` is still commutative and idempotent, but, as in the reference
//! implementation, not associative (whether anonymous values survive depends on whether one side
//! strictly dominates the other); stored clocks never hold them.
//!
//! `lww` keeps one value and moves it to the top dot of its entry (as Riak does). The one place
//! where two replicas can then hold different values under the same `(id, counter, length)` is
//! resolved in `sync` by keeping the greater value list (by `V: Ord`), which is what `lww` itself
//! would pick, so `sync` stays commutative and associative for such states too.

use std::cmp::Ordering;

use bytes::Bytes;

use crate::NodeId;
use crate::hash::hash128;
use crate::hlc::Timestamp;
use crate::write_id::{self, WriteIds};

/// Most entries (coordinating servers) a clock may hold on disk or on the wire.
pub const MAX_CLOCK_ENTRIES: usize = 1024;
/// Most values (siblings, anonymous included) a clock may hold on disk or on the wire.
pub const MAX_CLOCK_VALUES: usize = 1024;
/// First byte of the [`Clock`] encoding when no sibling carries write ids.
pub const CLOCK_CODEC_VERSION: u8 = 1;
/// First byte of the [`Clock`] encoding when some sibling carries write ids
/// ([`crate::write_id`]).
pub const CLOCK_CODEC_VERSION_IDS: u8 = 2;

// ---------------------------------------------------------------------------------------------
// Version vectors
// ---------------------------------------------------------------------------------------------

/// A version vector: for each server, how many of its events are known. Sorted by id, no zero
/// counters (a missing id means 0). It is the causal context handed to clients
/// ([`Dvvset::join`]) and back ([`Dvvset::new_with`]).
///
/// Deserialization (and [`FromIterator`]) normalizes: sorts, keeps the largest counter of a
/// repeated id and drops zeros, so a vector can never break the invariant.
#[derive(Clone, PartialEq, Eq, Hash, Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(from = "Vec<(NodeId, u64)>", into = "Vec<(NodeId, u64)>")]
pub struct VersionVector(Vec<(NodeId, u64)>);

impl VersionVector {
    /// The empty vector (no causal past: a blind write).
    pub fn new() -> Self {
        VersionVector(Vec::new())
    }

    /// Wraps pairs already sorted by unique id with non-zero counters (decoders check that first).
    pub(crate) fn from_sorted(pairs: Vec<(NodeId, u64)>) -> Self {
        debug_assert!(pairs.windows(2).all(|w| w[0].0 < w[1].0));
        debug_assert!(pairs.iter().all(|(_, n)| *n > 0));
        VersionVector(pairs)
    }

    /// Events of `id` known (0 if none).
    pub fn get(&self, id: &NodeId) -> u64 {
        match self.0.binary_search_by(|(i, _)| i.cmp(id)) {
            Ok(at) => self.0[at].1,
            Err(_) => 0,
        }
    }

    /// `(id, counter)` pairs in id order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&NodeId, u64)> + '_ {
        self.0.iter().map(|(id, n)| (id, *n))
    }

    /// Number of ids with a non-zero counter.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `self` has seen everything `other` has (`self >= other` pointwise).
    pub fn descends(&self, other: &VersionVector) -> bool {
        other.0.iter().all(|(id, n)| self.get(id) >= *n)
    }

    /// The pointwise maximum (least upper bound).
    pub fn merge(&self, other: &VersionVector) -> VersionVector {
        let mut out = Vec::with_capacity(self.0.len() + other.0.len());
        let (mut a, mut b) = (self.0.iter().peekable(), other.0.iter().peekable());
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) => match x.0.cmp(&y.0) {
                    Ordering::Less => a.next().cloned(),
                    Ordering::Greater => b.next().cloned(),
                    Ordering::Equal => {
                        let n = x.1.max(y.1);
                        let id = x.0.clone();
                        a.next();
                        b.next();
                        Some((id, n))
                    }
                },
                (Some(_), None) => a.next().cloned(),
                (None, Some(_)) => b.next().cloned(),
                (None, None) => None,
            };
            match next {
                Some(pair) => out.push(pair),
                None => break,
            }
        }
        VersionVector(out)
    }
}

impl FromIterator<(NodeId, u64)> for VersionVector {
    fn from_iter<I: IntoIterator<Item = (NodeId, u64)>>(iter: I) -> Self {
        let mut pairs: Vec<(NodeId, u64)> = iter.into_iter().filter(|(_, n)| *n > 0).collect();
        // Largest counter first within an id, so dedup keeps it.
        pairs.sort_by(|x, y| x.0.cmp(&y.0).then(y.1.cmp(&x.1)));
        pairs.dedup_by(|later, earlier| later.0 == earlier.0);
        VersionVector(pairs)
    }
}

impl From<Vec<(NodeId, u64)>> for VersionVector {
    fn from(pairs: Vec<(NodeId, u64)>) -> Self {
        pairs.into_iter().collect()
    }
}

impl From<VersionVector> for Vec<(NodeId, u64)> {
    fn from(vv: VersionVector) -> Self {
        vv.0
    }
}

// ---------------------------------------------------------------------------------------------
// The generic DVVSet
// ---------------------------------------------------------------------------------------------

/// The events and surviving values of one coordinating server. See the module docs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Entry<V> {
    id: NodeId,
    counter: u64,
    /// Newest first; `values[i]` holds the dot `(id, counter - i)`.
    values: Vec<V>,
}

impl<V> Entry<V> {
    pub fn id(&self) -> &NodeId {
        &self.id
    }

    /// Number of events of this server in the causal history.
    pub fn counter(&self) -> u64 {
        self.counter
    }

    /// Surviving values, newest first.
    pub fn values(&self) -> &[V] {
        &self.values
    }

    /// Events up to `base` hold no value.
    fn base(&self) -> u64 {
        self.counter.saturating_sub(self.values.len() as u64)
    }
}

/// A dotted version vector set over values `V`. See the module docs for invariants and laws.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Dvvset<V> {
    /// Sorted by id, ids unique.
    entries: Vec<Entry<V>>,
    /// Sorted, unique.
    anonymous: Vec<V>,
}

impl<V> Default for Dvvset<V> {
    fn default() -> Self {
        Self::empty()
    }
}

impl<V> Dvvset<V> {
    /// No causal history, no values (what a replica holds for a key it has never seen).
    pub fn empty() -> Self {
        Dvvset {
            entries: Vec::new(),
            anonymous: Vec::new(),
        }
    }

    /// `new(V)`: a client clock for a value written with no causal past (a blind write). The value
    /// is anonymous until [`Dvvset::update`] gives it a dot.
    pub fn new(value: V) -> Self {
        Dvvset {
            entries: Vec::new(),
            anonymous: vec![value],
        }
    }

    /// `new(VV, V)`: a client clock for a value written with causal context `context` (what the
    /// client read). The context's events carry no values; the value is anonymous.
    pub fn new_with(context: &VersionVector, value: V) -> Self {
        Dvvset {
            entries: context
                .iter()
                .map(|(id, counter)| Entry {
                    id: id.clone(),
                    counter,
                    values: Vec::new(),
                })
                .collect(),
            anonymous: vec![value],
        }
    }

    /// Entries in id order.
    pub fn entries(&self) -> &[Entry<V>] {
        &self.entries
    }

    /// Values without a dot, sorted (empty in every clock the node stores).
    pub fn anonymous(&self) -> &[V] {
        &self.anonymous
    }

    /// `join`: the causal history as a version vector, i.e. the context to give a client that
    /// read this clock. A write carrying it supersedes every value of this clock that has a dot.
    pub fn join(&self) -> VersionVector {
        VersionVector::from_sorted(
            self.entries
                .iter()
                .map(|e| (e.id.clone(), e.counter))
                .collect(),
        )
    }

    /// `values`: every value (the siblings), anonymous ones first, then by entry id, newest first.
    /// The order is canonical (equal states list values in the same order).
    pub fn values(&self) -> impl Iterator<Item = &V> + '_ {
        self.anonymous
            .iter()
            .chain(self.entries.iter().flat_map(|e| e.values.iter()))
    }

    /// `size`: the number of values.
    pub fn size(&self) -> usize {
        self.anonymous.len() + self.entries.iter().map(|e| e.values.len()).sum::<usize>()
    }

    /// `ids`: the servers that appear in the causal history, in order.
    pub fn ids(&self) -> impl ExactSizeIterator<Item = &NodeId> + '_ {
        self.entries.iter().map(|e| &e.id)
    }

    /// `less`: whether `self`'s causal history is strictly contained in `other`'s (values are not
    /// compared). `a.less(b)` means `b` has seen everything `a` has, and more.
    pub fn less(&self, other: &Self) -> bool {
        let mut strict = false;
        let mut theirs = other.entries.iter().peekable();
        for mine in &self.entries {
            loop {
                match theirs.peek() {
                    Some(t) if t.id < mine.id => {
                        strict = true;
                        theirs.next();
                    }
                    Some(t) if t.id == mine.id => {
                        match mine.counter.cmp(&t.counter) {
                            Ordering::Greater => return false,
                            Ordering::Less => strict = true,
                            Ordering::Equal => {}
                        }
                        theirs.next();
                        break;
                    }
                    // `other` lacks an event `self` has.
                    _ => return false,
                }
            }
        }
        strict || theirs.next().is_some()
    }

    /// `equal`: whether both causal histories and the dots holding values are the same: same ids,
    /// same counters, same number of values per entry (values themselves are not compared; a dot
    /// names one value). Use `==` for structural equality.
    pub fn equal(&self, other: &Self) -> bool {
        self.entries.len() == other.entries.len()
            && self.entries.iter().zip(&other.entries).all(|(a, b)| {
                a.id == b.id && a.counter == b.counter && a.values.len() == b.values.len()
            })
    }

    /// Applies `f` to every value, keeping every value on its dot (anonymous values re-sorted).
    pub fn map_values<W: Ord>(self, mut f: impl FnMut(V) -> W) -> Dvvset<W> {
        let entries = self
            .entries
            .into_iter()
            .map(|e| Entry {
                id: e.id,
                counter: e.counter,
                values: e.values.into_iter().map(&mut f).collect(),
            })
            .collect();
        let mut anonymous: Vec<W> = self.anonymous.into_iter().map(f).collect();
        anonymous.sort();
        anonymous.dedup();
        Dvvset { entries, anonymous }
    }
}

impl<V: Ord + Clone> Dvvset<V> {
    /// `sync`: merges two replicas' versions of a key (read merge, replication, repair,
    /// anti-entropy). The result's causal history is the union of both; a value survives unless
    /// the other side's history includes its dot without holding it (it was overwritten there).
    /// Anonymous values: if one side's history is strictly contained in the other's, only the
    /// other side's anonymous values are kept; otherwise the union is.
    pub fn sync(&self, other: &Self) -> Self {
        let anonymous = if self.less(other) {
            other.anonymous.clone()
        } else if other.less(self) {
            self.anonymous.clone()
        } else {
            union_sorted(&self.anonymous, &other.anonymous)
        };
        let mut entries = Vec::with_capacity(self.entries.len().max(other.entries.len()));
        let (mut a, mut b) = (
            self.entries.iter().peekable(),
            other.entries.iter().peekable(),
        );
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) => match x.id.cmp(&y.id) {
                    Ordering::Less => a.next().cloned(),
                    Ordering::Greater => b.next().cloned(),
                    Ordering::Equal => {
                        let merged = merge_entry(x, y);
                        a.next();
                        b.next();
                        Some(merged)
                    }
                },
                (Some(_), None) => a.next().cloned(),
                (None, Some(_)) => b.next().cloned(),
                (None, None) => None,
            };
            match next {
                Some(entry) => entries.push(entry),
                None => break,
            }
        }
        Dvvset { entries, anonymous }
    }

    /// Folds [`Dvvset::sync`] over any number of clocks (`sync/1` of the reference); the empty
    /// clock for none.
    pub fn sync_all<'a>(clocks: impl IntoIterator<Item = &'a Self>) -> Self
    where
        V: 'a,
    {
        clocks
            .into_iter()
            .fold(Self::empty(), |acc, clock| acc.sync(clock))
    }

    /// `update(Cc, Cr, I)`: the coordinator `coordinator` registers a client write.
    ///
    /// `new` is the client clock ([`Dvvset::new`] / [`Dvvset::new_with`]); `stored` is what the
    /// coordinator holds for the key (`None` for nothing). The stored values whose dots the
    /// client's context covers are discarded (the client saw them and overwrote them), the
    /// others stay as siblings, and the new value takes the next dot of `coordinator`
    /// (`max(context, stored)[coordinator] + 1`). The result descends both inputs.
    ///
    /// `new` should hold exactly one anonymous value. If it holds several (the sync of client
    /// clocks), each gets its own dot, in sorted order; if it holds none, the result is the
    /// plain sync.
    pub fn update(new: Self, stored: Option<&Self>, coordinator: &NodeId) -> Self {
        let Dvvset { entries, anonymous } = new;
        let context = Dvvset {
            entries,
            anonymous: Vec::new(),
        };
        let mut out = match stored {
            Some(stored) => context.sync(stored),
            None => context,
        };
        for value in anonymous {
            out.event(coordinator, value);
        }
        out
    }

    /// What the node does on a client put: `update(new_with(context, value), stored, coordinator)`.
    pub fn put(
        stored: Option<&Self>,
        context: &VersionVector,
        value: V,
        coordinator: &NodeId,
    ) -> Self {
        Self::update(Self::new_with(context, value), stored, coordinator)
    }

    /// `lww(F, C)`: keeps only the greatest value by `cmp` (ties broken by `V: Ord`, then by the
    /// first in [`Dvvset::values`] order), keeping the whole causal history. As in the reference,
    /// a value with a dot moves to the top dot of its entry; an anonymous winner stays anonymous
    /// and every entry loses its values. A clock without values is returned as is.
    ///
    /// Replicas should resolve with [`Dvvset::lww`] (`cmp` = `V::cmp`): `sync` settles a moved
    /// value by `V::cmp`, which then agrees with the choice `lww` made.
    pub fn lww_by(&self, mut cmp: impl FnMut(&V, &V) -> Ordering) -> Self {
        // Location of the winner: None = anonymous, Some(i) = entry i.
        let mut best: Option<(Option<usize>, &V)> = None;
        let located = self.anonymous.iter().map(|v| (None, v)).chain(
            self.entries
                .iter()
                .enumerate()
                .flat_map(|(i, e)| e.values.iter().map(move |v| (Some(i), v))),
        );
        for (at, value) in located {
            let better = match best {
                None => true,
                Some((_, b)) => cmp(value, b).then_with(|| value.cmp(b)) == Ordering::Greater,
            };
            if better {
                best = Some((at, value));
            }
        }
        let Some((at, winner)) = best else {
            return self.clone();
        };
        let entries = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| Entry {
                id: e.id.clone(),
                counter: e.counter,
                values: if at == Some(i) {
                    vec![winner.clone()]
                } else {
                    Vec::new()
                },
            })
            .collect();
        let anonymous = if at.is_none() {
            vec![winner.clone()]
        } else {
            Vec::new()
        };
        Dvvset { entries, anonymous }
    }

    /// [`Dvvset::lww_by`] with the values' own order: keeps the greatest value.
    pub fn lww(&self) -> Self {
        self.lww_by(|a, b| a.cmp(b))
    }

    /// `event`: the next dot of `id` holds `value`.
    fn event(&mut self, id: &NodeId, value: V) {
        match self.entries.binary_search_by(|e| e.id.cmp(id)) {
            Ok(at) => {
                let entry = &mut self.entries[at];
                entry.counter = entry.counter.saturating_add(1);
                entry.values.insert(0, value);
            }
            Err(at) => self.entries.insert(
                at,
                Entry {
                    id: id.clone(),
                    counter: 1,
                    values: vec![value],
                },
            ),
        }
    }
}

/// Merges the entries of one id (`merge/5` of the reference): the larger counter wins, and values
/// whose dot the other side has seen without holding (at or below its base) are dropped.
fn merge_entry<V: Ord + Clone>(a: &Entry<V>, b: &Entry<V>) -> Entry<V> {
    let counter = a.counter.max(b.counter);
    let base = a.base().max(b.base());
    let keep = usize::try_from(counter - base).unwrap_or(usize::MAX);
    let top = |e: &Entry<V>| -> Vec<V> { e.values[..keep.min(e.values.len())].to_vec() };
    let values = match a.counter.cmp(&b.counter) {
        Ordering::Greater => top(a),
        Ordering::Less => top(b),
        // Same dots on both sides: the same values, unless an `lww` moved one (see module docs).
        Ordering::Equal => top(a).max(top(b)),
    };
    Entry {
        id: a.id.clone(),
        counter,
        values,
    }
}

/// Union of two sorted, duplicate-free lists, sorted and duplicate-free.
fn union_sorted<V: Ord + Clone>(a: &[V], b: &[V]) -> Vec<V> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            Ordering::Less => {
                out.push(a[i].clone());
                i += 1;
            }
            Ordering::Greater => {
                out.push(b[j].clone());
                j += 1;
            }
            Ordering::Equal => {
                out.push(a[i].clone());
                i += 1;
                j += 1;
            }
        }
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
    out
}

// ---------------------------------------------------------------------------------------------
// The node's clock: siblings with timestamps and tombstones
// ---------------------------------------------------------------------------------------------

/// One version of a key's value. Ordered by `(ts, data, ids)`, tombstones before live data at
/// equal timestamps, which is the order `lww` picks the winner by.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sibling {
    /// When the coordinator accepted the write (hybrid logical clock).
    pub ts: Timestamp,
    /// The value; `None` is a tombstone (a delete).
    pub data: Option<Bytes>,
    /// The forwarded write's id and the ids this write superseded ([`crate::write_id`]);
    /// `None` when it has neither (never `Some` of empty ids: the encoding is canonical).
    pub ids: Option<Box<WriteIds>>,
}

impl Sibling {
    pub fn live(ts: Timestamp, data: Bytes) -> Self {
        Sibling {
            ts,
            data: Some(data),
            ids: None,
        }
    }

    pub fn tombstone(ts: Timestamp) -> Self {
        Sibling {
            ts,
            data: None,
            ids: None,
        }
    }

    pub fn is_tombstone(&self) -> bool {
        self.data.is_none()
    }
}

/// The version of a key as the node stores it.
pub type Clock = Dvvset<Sibling>;

/// Why stored or received clock bytes were refused. Nothing is changed when this is returned.
/// Variant names are stable (metric labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("clock encoding is truncated")]
    Truncated,
    #[error("clock encoding has unknown version {0}")]
    UnknownVersion(u8),
    #[error("clock exceeds the limits ({MAX_CLOCK_ENTRIES} entries, {MAX_CLOCK_VALUES} values)")]
    TooLarge,
    #[error("clock encoding is malformed: {0}")]
    Malformed(&'static str),
    #[error("clock encoding has trailing bytes")]
    TrailingBytes,
}

impl CodecError {
    /// A fixed label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            CodecError::Truncated => "truncated",
            CodecError::UnknownVersion(_) => "unknown_version",
            CodecError::TooLarge => "too_large",
            CodecError::Malformed(_) => "malformed",
            CodecError::TrailingBytes => "trailing_bytes",
        }
    }
}

impl From<wire::WireError> for CodecError {
    fn from(e: wire::WireError) -> Self {
        match e {
            wire::WireError::Truncated => CodecError::Truncated,
            wire::WireError::BadVarint => CodecError::Malformed("bad varint"),
        }
    }
}

impl Dvvset<Sibling> {
    /// Values that are not tombstones, in [`Dvvset::values`] order (what a client read returns),
    /// without the copies of forwarded writes that a later write superseded (hidden:
    /// [`crate::write_id`]).
    pub fn live_values(&self) -> impl Iterator<Item = &Sibling> + '_ {
        let superseded = self.superseded_ids();
        self.values()
            .filter(move |s| !s.is_tombstone() && !Self::hidden(s, &superseded))
    }

    /// The live values a client read returns: [`Self::live_values`] with siblings that carry the
    /// same bytes collapsed into one (the newest), in the order of their first appearance.
    ///
    /// Equal bytes are the same value to a client, whoever wrote them: a write applied twice
    /// under two dots (a forwarded write retried or hedged at a second coordinator) reads as
    /// one value, and the context of the read covers both dots, so the next write with it
    /// replaces both. Riak's and Garage K2V's reads collapse equal siblings the same way.
    pub fn distinct_live_values(&self) -> Vec<Sibling> {
        let mut out: Vec<Sibling> = Vec::new();
        for s in self.live_values() {
            match out.iter_mut().find(|o| o.data == s.data) {
                Some(seen) if s.ts > seen.ts => seen.ts = s.ts,
                Some(_) => {}
                None => out.push(s.clone()),
            }
        }
        out
    }

    /// Whether every sibling is a tombstone or hidden (also true for a clock without values): the
    /// key reads as deleted, and may be purged once every replica holds this state and the grace
    /// period has passed.
    pub fn is_all_tombstones(&self) -> bool {
        self.live_values().next().is_none()
    }

    /// `lww` conflict mode: keeps the one sibling with the greatest `(ts, data)`, keeping the
    /// causal history, so every replica picks the same one.
    pub fn lww_resolve(&self) -> Self {
        self.lww()
    }

    /// Whether this clock fits the codec's limits ([`MAX_CLOCK_ENTRIES`], [`MAX_CLOCK_VALUES`]).
    /// [`Clock::encode`] writes any clock, but [`Clock::decode`] refuses one beyond the limits:
    /// check before making a write durable.
    pub fn check_limits(&self) -> Result<(), CodecError> {
        if self.entries.len() > MAX_CLOCK_ENTRIES || self.size() > MAX_CLOCK_VALUES {
            return Err(CodecError::TooLarge);
        }
        Ok(())
    }

    /// Appends the canonical encoding (format version 1, or 2 when some sibling carries write
    /// ids):
    ///
    /// ```text
    /// u8      version = 1 or 2
    /// varint  entry count, then per entry (ids strictly increasing):
    ///           varint id length, id bytes, varint counter (>= 1),
    ///           varint value count (<= counter), values newest first
    /// varint  anonymous value count, then the values (strictly increasing)
    /// value:  u64 LE packed timestamp, varint tag: 0 = tombstone, n + 1 = n data bytes follow,
    ///         then in version 2 only the write ids (`write_id::encode_ids`)
    /// ```
    /// Varints are unsigned LEB128, minimal length. Version 2 is written exactly when some sibling
    /// carries ids, so equal states still encode (and digest) alike.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        let ids = self.has_write_ids();
        out.push(if ids {
            CLOCK_CODEC_VERSION_IDS
        } else {
            CLOCK_CODEC_VERSION
        });
        wire::put_varint(out, self.entries.len() as u64);
        for e in &self.entries {
            wire::put_bytes(out, e.id.as_str().as_bytes());
            wire::put_varint(out, e.counter);
            wire::put_varint(out, e.values.len() as u64);
            for v in &e.values {
                encode_sibling(v, ids, out);
            }
        }
        wire::put_varint(out, self.anonymous.len() as u64);
        for v in &self.anonymous {
            encode_sibling(v, ids, out);
        }
    }

    /// The encoding as a new vector.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    /// Exact length of [`Clock::encode`]'s output.
    pub fn encoded_len(&self) -> usize {
        let ids = self.has_write_ids();
        let mut len = 1 + wire::varint_len(self.entries.len() as u64);
        for e in &self.entries {
            len += wire::bytes_len(e.id.as_str().len())
                + wire::varint_len(e.counter)
                + wire::varint_len(e.values.len() as u64)
                + e.values.iter().map(|v| sibling_len(v, ids)).sum::<usize>();
        }
        len + wire::varint_len(self.anonymous.len() as u64)
            + self
                .anonymous
                .iter()
                .map(|v| sibling_len(v, ids))
                .sum::<usize>()
    }

    /// Whether some sibling carries write ids (the encoding is then of version 2).
    fn has_write_ids(&self) -> bool {
        self.values().any(|v| v.ids.is_some())
    }

    /// Decodes and validates [`Clock::encode`]'s output: every invariant of the module docs, the
    /// limits, valid node ids, minimal varints, no trailing bytes. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<Clock, CodecError> {
        let mut r = wire::Reader::new(bytes);
        let version = r.u8()?;
        let ids = match version {
            CLOCK_CODEC_VERSION => false,
            CLOCK_CODEC_VERSION_IDS => true,
            other => return Err(CodecError::UnknownVersion(other)),
        };
        let entry_count = r.varint()?;
        if entry_count > MAX_CLOCK_ENTRIES as u64 {
            return Err(CodecError::TooLarge);
        }
        let mut total_values = 0usize;
        let mut entries: Vec<Entry<Sibling>> = Vec::new();
        for _ in 0..entry_count {
            let id = decode_node_id(&mut r)?;
            if entries.last().is_some_and(|prev| prev.id >= id) {
                return Err(CodecError::Malformed("entry ids not strictly increasing"));
            }
            let counter = r.varint()?;
            if counter == 0 {
                return Err(CodecError::Malformed("zero counter"));
            }
            let value_count = r.varint()?;
            if value_count > counter {
                return Err(CodecError::Malformed("more values than events"));
            }
            let values = decode_siblings(&mut r, value_count, ids, &mut total_values)?;
            entries.push(Entry {
                id,
                counter,
                values,
            });
        }
        let anonymous_count = r.varint()?;
        let anonymous = decode_siblings(&mut r, anonymous_count, ids, &mut total_values)?;
        if anonymous.windows(2).any(|w| w[0] >= w[1]) {
            return Err(CodecError::Malformed(
                "anonymous values not strictly increasing",
            ));
        }
        if !r.is_empty() {
            return Err(CodecError::TrailingBytes);
        }
        let clock = Dvvset { entries, anonymous };
        // Canonical form: version 2 only when some sibling needs it.
        if ids && !clock.has_write_ids() {
            return Err(CodecError::Malformed("version 2 without write ids"));
        }
        Ok(clock)
    }

    /// The version digest: xxh3-128 of the canonical encoding. Equal states have equal digests;
    /// the Merkle trees of anti-entropy hash `(key, digest)`.
    pub fn digest(&self) -> u128 {
        hash128(&self.to_bytes())
    }
}

fn encode_sibling(s: &Sibling, ids: bool, out: &mut Vec<u8>) {
    out.extend_from_slice(&s.ts.as_u64().to_le_bytes());
    match &s.data {
        None => wire::put_varint(out, 0),
        Some(data) => {
            wire::put_varint(out, data.len() as u64 + 1);
            out.extend_from_slice(data);
        }
    }
    if ids {
        write_id::encode_ids(s.ids.as_deref(), out);
    }
}

fn sibling_len(s: &Sibling, ids: bool) -> usize {
    8 + match &s.data {
        None => 1,
        Some(data) => wire::varint_len(data.len() as u64 + 1) + data.len(),
    } + if ids {
        write_id::ids_len(s.ids.as_deref())
    } else {
        0
    }
}

fn decode_node_id(r: &mut wire::Reader<'_>) -> Result<NodeId, CodecError> {
    let len = r.varint()?;
    if len > crate::node_id::MAX_NODE_ID_LEN as u64 {
        return Err(CodecError::Malformed("node id too long"));
    }
    let raw = r.take(len as usize)?;
    let text = std::str::from_utf8(raw).map_err(|_| CodecError::Malformed("node id not utf-8"))?;
    NodeId::new(text).map_err(|_| CodecError::Malformed("invalid node id"))
}

fn decode_siblings(
    r: &mut wire::Reader<'_>,
    count: u64,
    ids: bool,
    total: &mut usize,
) -> Result<Vec<Sibling>, CodecError> {
    if count > (MAX_CLOCK_VALUES - *total) as u64 {
        return Err(CodecError::TooLarge);
    }
    // `count` is bounded by the limit, so this allocation is too.
    let count = count as usize;
    *total += count;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let ts = Timestamp::from_u64(r.u64_le()?);
        let data = match r.varint()? {
            0 => None,
            tag => {
                let len = usize::try_from(tag - 1).map_err(|_| CodecError::Truncated)?;
                Some(Bytes::copy_from_slice(r.take(len)?))
            }
        };
        let ids = if ids { write_id::decode_ids(r)? } else { None };
        out.push(Sibling { ts, data, ids });
    }
    Ok(out)
}

/// Little helpers shared by the binary formats of this crate (clock and client context).
pub(crate) mod wire {
    /// Why a read ran off the buffer or hit a bad varint.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum WireError {
        Truncated,
        /// Longer than 10 bytes, over 64 bits, or not of minimal length.
        BadVarint,
    }

    pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    pub(crate) fn varint_len(v: u64) -> usize {
        let bits = 64 - (v | 1).leading_zeros() as usize;
        bits.div_ceil(7)
    }

    /// A length-prefixed byte string.
    pub(crate) fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
        put_varint(out, bytes.len() as u64);
        out.extend_from_slice(bytes);
    }

    pub(crate) fn bytes_len(len: usize) -> usize {
        varint_len(len as u64) + len
    }

    /// A cursor over untrusted bytes; every read is bounds-checked.
    pub(crate) struct Reader<'a> {
        buf: &'a [u8],
    }

    impl<'a> Reader<'a> {
        pub(crate) fn new(buf: &'a [u8]) -> Self {
            Reader { buf }
        }

        pub(crate) fn is_empty(&self) -> bool {
            self.buf.is_empty()
        }

        pub(crate) fn remaining(&self) -> usize {
            self.buf.len()
        }

        pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
            if n > self.buf.len() {
                return Err(WireError::Truncated);
            }
            let (head, tail) = self.buf.split_at(n);
            self.buf = tail;
            Ok(head)
        }

        pub(crate) fn u8(&mut self) -> Result<u8, WireError> {
            Ok(self.take(1)?[0])
        }

        pub(crate) fn u32_le(&mut self) -> Result<u32, WireError> {
            let mut b = [0u8; 4];
            b.copy_from_slice(self.take(4)?);
            Ok(u32::from_le_bytes(b))
        }

        pub(crate) fn u64_le(&mut self) -> Result<u64, WireError> {
            let mut b = [0u8; 8];
            b.copy_from_slice(self.take(8)?);
            Ok(u64::from_le_bytes(b))
        }

        pub(crate) fn varint(&mut self) -> Result<u64, WireError> {
            let mut v: u64 = 0;
            for i in 0..10 {
                let byte = self.u8()?;
                let bits = u64::from(byte & 0x7f);
                if i == 9 && bits > 1 {
                    return Err(WireError::BadVarint);
                }
                v |= bits << (7 * i);
                if byte & 0x80 == 0 {
                    if i > 0 && byte == 0 {
                        return Err(WireError::BadVarint);
                    }
                    return Ok(v);
                }
            }
            Err(WireError::BadVarint)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn varints_round_trip_at_every_length() {
            for v in [
                0,
                1,
                127,
                128,
                300,
                16_383,
                16_384,
                u64::from(u32::MAX),
                u64::MAX,
            ] {
                let mut out = Vec::new();
                put_varint(&mut out, v);
                assert_eq!(out.len(), varint_len(v), "{v}");
                let mut r = Reader::new(&out);
                assert_eq!(r.varint(), Ok(v));
                assert!(r.is_empty());
            }
        }

        #[test]
        fn overlong_and_oversized_varints_are_refused() {
            assert_eq!(
                Reader::new(&[0x80, 0x00]).varint(),
                Err(WireError::BadVarint)
            );
            let mut too_big = vec![0xff; 9];
            too_big.push(0x02);
            assert_eq!(Reader::new(&too_big).varint(), Err(WireError::BadVarint));
            assert_eq!(Reader::new(&[0xff; 11]).varint(), Err(WireError::BadVarint));
            assert_eq!(Reader::new(&[0x80]).varint(), Err(WireError::Truncated));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;
    use proptest::sample::Index;

    use super::*;

    fn node(name: &str) -> NodeId {
        NodeId::new(name).expect("valid node id")
    }

    fn replica(i: usize) -> NodeId {
        node(&format!("n{i}"))
    }

    fn entry<V>(id: &str, counter: u64, values: Vec<V>) -> Entry<V> {
        Entry {
            id: node(id),
            counter,
            values,
        }
    }

    fn clock<V>(entries: Vec<Entry<V>>, anonymous: Vec<V>) -> Dvvset<V> {
        Dvvset { entries, anonymous }
    }

    fn vv(pairs: &[(&str, u64)]) -> VersionVector {
        pairs.iter().map(|(id, n)| (node(id), *n)).collect()
    }

    fn value_set<V: Ord + Clone>(c: &Dvvset<V>) -> BTreeSet<V> {
        c.values().cloned().collect()
    }

    // --- the reference implementation's examples (dvvset.erl eunit tests) ----------------------

    #[test]
    fn update_matches_the_reference_examples() {
        let (a, b) = (node("a"), node("b"));
        let a0 = Dvvset::update(Dvvset::new("v1"), None, &a);
        let a1 = Dvvset::update(Dvvset::new_with(&a0.join(), "v2"), Some(&a0), &a);
        let a2 = Dvvset::update(Dvvset::new_with(&a1.join(), "v3"), Some(&a1), &b);
        let a3 = Dvvset::update(Dvvset::new_with(&a0.join(), "v4"), Some(&a1), &b);
        let a4 = Dvvset::update(Dvvset::new_with(&a0.join(), "v5"), Some(&a1), &a);
        assert_eq!(a0, clock(vec![entry("a", 1, vec!["v1"])], vec![]));
        assert_eq!(a1, clock(vec![entry("a", 2, vec!["v2"])], vec![]));
        assert_eq!(
            a2,
            clock(
                vec![entry("a", 2, vec![]), entry("b", 1, vec!["v3"])],
                vec![]
            )
        );
        assert_eq!(
            a3,
            clock(
                vec![entry("a", 2, vec!["v2"]), entry("b", 1, vec!["v4"])],
                vec![]
            )
        );
        assert_eq!(a4, clock(vec![entry("a", 3, vec!["v5", "v2"])], vec![]));
    }

    #[test]
    fn write_with_stale_context_becomes_a_sibling() {
        // Mary writes v1 and v2 blind; Peter read v1 and writes v3: v3 replaces v1, not v2.
        let a = node("a");
        let a0 = Dvvset::update(Dvvset::new("v1"), None, &a);
        let read = a0.join();
        let a1 = Dvvset::update(Dvvset::new("v2"), Some(&a0), &a);
        let a2 = Dvvset::update(Dvvset::new_with(&read, "v3"), Some(&a1), &a);
        assert_eq!(read, vv(&[("a", 1)]));
        assert_eq!(a1, clock(vec![entry("a", 2, vec!["v2", "v1"])], vec![]));
        assert_eq!(a2, clock(vec![entry("a", 3, vec!["v3", "v2"])], vec![]));
    }

    #[test]
    fn sync_matches_the_reference_examples() {
        let (a, b, c) = (node("a"), node("b"), node("c"));
        let w = clock(vec![entry("a", 1, vec![])], vec![]);
        let z = clock(vec![entry("a", 2, vec!["v2", "v1"])], vec![]);
        assert_eq!(w.sync(&z), clock(vec![entry("a", 2, vec!["v2"])], vec![]));
        assert_eq!(w.sync(&z), z.sync(&w));

        let x = clock(vec![entry("x", 1, vec![])], vec![]);
        let a0 = Dvvset::update(Dvvset::new("v1"), None, &a);
        let a1 = Dvvset::update(Dvvset::new_with(&a0.join(), "v2"), None, &a);
        let a3 = Dvvset::update(Dvvset::new_with(&a1.join(), "v3"), None, &b);
        let a4 = Dvvset::update(Dvvset::new_with(&a1.join(), "v3"), None, &c);
        assert_eq!(a0.sync(&a1), a1.sync(&a0));
        assert_eq!(a4.sync(&a3), a3.sync(&a4));
        assert_eq!(
            a4.sync(&a3),
            clock(
                vec![
                    entry("a", 2, vec![]),
                    entry("b", 1, vec!["v3"]),
                    entry("c", 1, vec!["v3"])
                ],
                vec![]
            )
        );
        assert_eq!(
            x.sync(&a0),
            clock(
                vec![entry("a", 1, vec!["v1"]), entry("x", 1, vec![])],
                vec![]
            )
        );
        assert_eq!(x.sync(&a0), a0.sync(&x));
    }

    #[test]
    fn less_compares_causal_histories_strictly() {
        let (a, b, c, d, z) = (node("a"), node("b"), node("c"), node("d"), node("z"));
        let ca = Dvvset::update(Dvvset::new("v1"), None, &a);
        let cb = Dvvset::update(Dvvset::new_with(&ca.join(), "v2"), None, &a);
        let cb2 = Dvvset::update(Dvvset::new_with(&ca.join(), "v2"), None, &b);
        let cb3 = Dvvset::update(Dvvset::new_with(&ca.join(), "v2"), None, &z);
        let cc = Dvvset::update(Dvvset::new_with(&cb.join(), "v3"), Some(&ca), &c);
        let cd = Dvvset::update(Dvvset::new_with(&cc.join(), "v4"), Some(&cb2), &d);
        assert!(ca.less(&cb));
        assert!(ca.less(&cc));
        assert!(cb.less(&cc));
        assert!(cb.less(&cd));
        assert!(cb2.less(&cd));
        assert!(ca.less(&cd));
        assert!(!cb2.less(&cc));
        assert!(!cb.less(&cb2));
        assert!(!cb2.less(&cb));
        assert!(!ca.less(&ca));
        assert!(!cc.less(&cc));
        assert!(!cd.less(&cb2));
        assert!(!cb3.less(&cd));
    }

    #[test]
    fn equal_compares_histories_and_dots_not_values() {
        let a = clock(
            vec![entry("a", 4, vec![5, 2]), entry("b", 1, vec![])],
            vec![],
        );
        let same_dots = clock(
            vec![entry("a", 4, vec![9, 9]), entry("b", 1, vec![])],
            vec![3],
        );
        let fewer = clock(vec![entry("a", 4, vec![5]), entry("b", 1, vec![])], vec![]);
        let other = clock(
            vec![entry("a", 4, vec![5, 2]), entry("c", 1, vec![])],
            vec![],
        );
        assert!(a.equal(&same_dots));
        assert!(!a.equal(&fewer));
        assert!(!a.equal(&other));
        assert!(!a.equal(&Dvvset::empty()));
    }

    #[test]
    fn values_size_and_ids_list_what_the_clock_holds() {
        let c = clock(
            vec![
                entry("a", 4, vec![5, 2]),
                entry("b", 1, vec![]),
                entry("c", 1, vec![3]),
            ],
            vec![0, 10],
        );
        assert_eq!(
            c.values().copied().collect::<Vec<_>>(),
            vec![0, 10, 5, 2, 3]
        );
        assert_eq!(c.size(), 5);
        assert_eq!(
            c.ids().map(NodeId::as_str).collect::<Vec<_>>(),
            vec!["a", "b", "c"]
        );
        assert_eq!(c.join(), vv(&[("a", 4), ("b", 1), ("c", 1)]));
    }

    #[test]
    fn lww_matches_the_reference_examples() {
        let a = clock(
            vec![
                entry("a", 4, vec![5, 2]),
                entry("b", 1, vec![]),
                entry("c", 1, vec![3]),
            ],
            vec![],
        );
        let b = clock(a.entries.clone(), vec![0, 10]);
        let c = clock(
            vec![
                entry("a", 4, vec![3, 2]),
                entry("b", 1, vec![]),
                entry("c", 1, vec![3]),
            ],
            vec![3],
        );
        assert_eq!(
            a.lww(),
            clock(
                vec![
                    entry("a", 4, vec![5]),
                    entry("b", 1, vec![]),
                    entry("c", 1, vec![])
                ],
                vec![]
            )
        );
        assert_eq!(
            b.lww(),
            clock(
                vec![
                    entry("a", 4, vec![]),
                    entry("b", 1, vec![]),
                    entry("c", 1, vec![])
                ],
                vec![10]
            )
        );
        // Equal by `cmp` and by `Ord`: the first in `values()` order (the anonymous one) wins.
        assert_eq!(
            c.lww_by(|x: &i32, y: &i32| (x % 2).cmp(&(y % 2))),
            clock(
                vec![
                    entry("a", 4, vec![]),
                    entry("b", 1, vec![]),
                    entry("c", 1, vec![])
                ],
                vec![3]
            )
        );
        // A losing newer value: the winner moves to the top dot of its entry.
        let d = clock(vec![entry("a", 3, vec![1, 7, 4])], vec![]);
        assert_eq!(d.lww(), clock(vec![entry("a", 3, vec![7])], vec![]));
        assert_eq!(Dvvset::<i32>::empty().lww(), Dvvset::empty());
    }

    #[test]
    fn sync_settles_a_value_moved_by_lww_the_same_way_from_both_sides() {
        let raw = clock(vec![entry("a", 3, vec![1, 7, 4])], vec![]);
        let resolved = raw.lww();
        assert_eq!(raw.sync(&resolved), resolved.sync(&raw));
        assert_eq!(raw.sync(&resolved), resolved);
    }

    #[test]
    fn blind_write_keeps_existing_values_as_siblings() {
        let (a, b) = (node("a"), node("b"));
        let s1 = Dvvset::put(None, &VersionVector::new(), 1, &a);
        let s2 = Dvvset::put(Some(&s1), &VersionVector::new(), 2, &b);
        assert_eq!(value_set(&s2), BTreeSet::from([1, 2]));
    }

    #[test]
    fn write_with_read_context_replaces_what_was_read() {
        let (a, b) = (node("a"), node("b"));
        let s1 = Dvvset::put(None, &VersionVector::new(), 1, &a);
        let s2 = Dvvset::put(Some(&s1), &VersionVector::new(), 2, &b);
        let s3 = Dvvset::put(Some(&s2), &s2.join(), 3, &a);
        assert_eq!(s3.values().copied().collect::<Vec<_>>(), vec![3]);
    }

    #[test]
    fn concurrent_writes_with_one_context_at_one_coordinator_are_all_kept() {
        let a = node("a");
        let base = Dvvset::put(None, &VersionVector::new(), 0, &a);
        let ctx = base.join();
        let mut s = base;
        for v in 1..=5 {
            s = Dvvset::put(Some(&s), &ctx, v, &a);
        }
        assert_eq!(value_set(&s), (1..=5).collect());
        assert_eq!(s.entries().len(), 1);
    }

    #[test]
    fn anonymous_values_stay_sorted_and_unique_under_sync() {
        let x = Dvvset::new(5).sync(&Dvvset::new(1));
        let y = Dvvset::new(3).sync(&Dvvset::new(5));
        assert_eq!(x.sync(&y).anonymous(), &[1, 3, 5]);
        assert_eq!(x.sync(&y), y.sync(&x));
    }

    #[test]
    fn update_gives_each_anonymous_value_its_own_dot() {
        let a = node("a");
        let both = Dvvset::new(2).sync(&Dvvset::new(1));
        let s = Dvvset::update(both, None, &a);
        assert_eq!(s, clock(vec![entry("a", 2, vec![2, 1])], vec![]));
        let nothing = Dvvset::update(Dvvset::<u8>::empty(), Some(&s), &a);
        assert_eq!(nothing.entries(), s.entries());
    }

    #[test]
    fn map_values_keeps_dots_and_resorts_anonymous_values() {
        let c = clock(vec![entry("a", 3, vec![1, 2])], vec![1, 2]);
        let m = c.map_values(|v| 10 - v);
        assert_eq!(m, clock(vec![entry("a", 3, vec![9, 8])], vec![8, 9]));
    }

    #[test]
    fn version_vectors_normalize_compare_and_merge() {
        let x: VersionVector = vec![
            (node("b"), 2),
            (node("a"), 1),
            (node("b"), 5),
            (node("c"), 0),
        ]
        .into();
        assert_eq!(x, vv(&[("a", 1), ("b", 5)]));
        assert_eq!(x.get(&node("b")), 5);
        assert_eq!(x.get(&node("c")), 0);
        assert_eq!(x.len(), 2);
        let y = vv(&[("b", 7), ("c", 1)]);
        assert!(!x.descends(&y) && !y.descends(&x));
        let m = x.merge(&y);
        assert_eq!(m, vv(&[("a", 1), ("b", 7), ("c", 1)]));
        assert!(m.descends(&x) && m.descends(&y) && m.descends(&m));
        assert!(x.descends(&VersionVector::new()));
    }

    #[test]
    fn version_vectors_deserialize_normalized() {
        let x: VersionVector =
            serde_json::from_str(r#"[["b", 2], ["a", 0], ["b", 3]]"#).expect("json");
        assert_eq!(x, vv(&[("b", 3)]));
        assert_eq!(serde_json::to_string(&x).expect("json"), r#"[["b",3]]"#);
        assert!(serde_json::from_str::<VersionVector>(r#"[["no space", 1]]"#).is_err());
    }

    // --- siblings and the node's clock --------------------------------------------------------

    fn ts(ms: u64, logical: u16) -> Timestamp {
        Timestamp::new(1_700_000_000_000 + ms, logical)
    }

    #[test]
    fn a_write_applied_at_two_coordinators_reads_as_one_value_and_is_replaced_as_one() {
        let (a, b) = (node("a"), node("b"));
        let base = Clock::put(
            None,
            &VersionVector::new(),
            Sibling::live(ts(0, 0), "v0".into()),
            &a,
        );
        let ctx = base.join();
        // The same client write, coordinated twice (a retried or hedged forward).
        let at_a = Clock::put(Some(&base), &ctx, Sibling::live(ts(5, 0), "v1".into()), &a);
        let at_b = Clock::put(Some(&base), &ctx, Sibling::live(ts(7, 0), "v1".into()), &b);
        let merged = at_a.sync(&at_b);
        assert_eq!(
            merged.live_values().count(),
            2,
            "two dots, both kept causally"
        );
        assert_eq!(
            merged.distinct_live_values(),
            vec![Sibling::live(ts(7, 0), "v1".into())],
            "one value to the client, the newest timestamp"
        );
        // A genuinely concurrent different value stays a sibling.
        let other = Clock::put(Some(&base), &ctx, Sibling::live(ts(6, 0), "w".into()), &a);
        let three = merged.sync(&other);
        let mut values: Vec<Bytes> = three
            .distinct_live_values()
            .into_iter()
            .filter_map(|s| s.data)
            .collect();
        values.sort();
        assert_eq!(values, vec![Bytes::from("v1"), Bytes::from("w")]);
        // The next write with the read's context replaces both copies.
        let next = Clock::put(
            Some(&merged),
            &merged.join(),
            Sibling::live(ts(9, 0), "v2".into()),
            &b,
        );
        assert_eq!(
            next.distinct_live_values(),
            vec![Sibling::live(ts(9, 0), "v2".into())]
        );
        assert_eq!(next.live_values().count(), 1);
    }

    #[test]
    fn tombstones_are_hidden_from_live_values() {
        let (a, b) = (node("a"), node("b"));
        let s1 = Clock::put(
            None,
            &VersionVector::new(),
            Sibling::live(ts(1, 0), "x".into()),
            &a,
        );
        let s2 = Clock::put(
            Some(&s1),
            &VersionVector::new(),
            Sibling::tombstone(ts(2, 0)),
            &b,
        );
        assert_eq!(s2.size(), 2);
        assert_eq!(
            s2.live_values().cloned().collect::<Vec<_>>(),
            vec![Sibling::live(ts(1, 0), "x".into())]
        );
        assert!(!s2.is_all_tombstones());
        let s3 = Clock::put(Some(&s2), &s2.join(), Sibling::tombstone(ts(3, 0)), &a);
        assert!(s3.is_all_tombstones());
        assert_eq!(s3.live_values().count(), 0);
        assert!(Clock::empty().is_all_tombstones());
    }

    #[test]
    fn lww_resolve_keeps_the_highest_timestamp_then_the_highest_data() {
        let (a, b, c) = (node("a"), node("b"), node("c"));
        let none = VersionVector::new();
        let s = Clock::put(None, &none, Sibling::live(ts(5, 0), "late".into()), &a);
        let s = Clock::put(Some(&s), &none, Sibling::live(ts(9, 0), "a".into()), &b);
        let s = Clock::put(Some(&s), &none, Sibling::live(ts(9, 0), "b".into()), &c);
        let s = Clock::put(Some(&s), &none, Sibling::tombstone(ts(9, 0)), &a);
        let r = s.lww_resolve();
        assert_eq!(
            r.values().cloned().collect::<Vec<_>>(),
            vec![Sibling::live(ts(9, 0), "b".into())]
        );
        assert_eq!(r.join(), s.join());
        // A tombstone wins only if it is strictly newer.
        let t = Clock::put(Some(&s), &none, Sibling::tombstone(ts(9, 1)), &b);
        assert!(t.lww_resolve().is_all_tombstones());
        assert_eq!(t.lww_resolve().size(), 1);
    }

    #[test]
    fn sibling_order_is_timestamp_then_data_with_tombstones_first() {
        assert!(Sibling::tombstone(ts(1, 0)) < Sibling::live(ts(1, 0), Bytes::new()));
        assert!(Sibling::live(ts(1, 0), "z".into()) < Sibling::tombstone(ts(1, 1)));
        assert!(Sibling::live(ts(1, 0), "a".into()) < Sibling::live(ts(1, 0), "b".into()));
    }

    // --- codec --------------------------------------------------------------------------------

    fn sample_clock() -> Clock {
        let (a, b) = (node("kv-0"), node("kv-1"));
        let none = VersionVector::new();
        let s = Clock::put(None, &none, Sibling::live(ts(1, 0), "hello".into()), &a);
        let s = Clock::put(Some(&s), &none, Sibling::tombstone(ts(2, 3)), &b);
        Clock::put(Some(&s), &none, Sibling::live(ts(4, 0), Bytes::new()), &a)
    }

    #[test]
    fn clock_encoding_is_pinned() {
        let c = clock(
            vec![entry(
                "a",
                2,
                vec![Sibling::live(Timestamp::from_u64(1), "x".into())],
            )],
            vec![Sibling::tombstone(Timestamp::from_u64(2))],
        );
        let expected: Vec<u8> = vec![
            1, // version
            1, // entries
            1, b'a', 2, 1, // id "a", counter 2, one value
            1, 0, 0, 0, 0, 0, 0, 0, 2, b'x', // ts 1, live with 1 byte
            1,    // one anonymous value
            2, 0, 0, 0, 0, 0, 0, 0, 0, // ts 2, tombstone
        ];
        assert_eq!(c.to_bytes(), expected);
        assert_eq!(c.encoded_len(), expected.len());
        assert_eq!(Clock::decode(&expected), Ok(c));
        assert_eq!(Clock::empty().to_bytes(), vec![1, 0, 0]);
    }

    #[test]
    fn clock_round_trips_through_its_encoding() {
        let c = sample_clock();
        let bytes = c.to_bytes();
        assert_eq!(bytes.len(), c.encoded_len());
        assert_eq!(Clock::decode(&bytes), Ok(c));
    }

    #[test]
    fn malformed_clock_encodings_get_typed_errors() {
        let good = sample_clock().to_bytes();
        assert_eq!(Clock::decode(&[]), Err(CodecError::Truncated));
        assert_eq!(Clock::decode(&[7]), Err(CodecError::UnknownVersion(7)));
        assert_eq!(
            Clock::decode(&good[..good.len() - 1]),
            Err(CodecError::Truncated)
        );
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(Clock::decode(&trailing), Err(CodecError::TrailingBytes));

        let bad = |entries: Vec<Entry<Sibling>>, anonymous: Vec<Sibling>| {
            Clock::decode(&clock(entries, anonymous).to_bytes())
        };
        let v = |n: u64| Sibling::live(Timestamp::from_u64(n), Bytes::new());
        assert_eq!(
            bad(vec![entry("b", 1, vec![]), entry("a", 1, vec![])], vec![]),
            Err(CodecError::Malformed("entry ids not strictly increasing"))
        );
        assert_eq!(
            bad(vec![entry("a", 1, vec![]), entry("a", 2, vec![])], vec![]),
            Err(CodecError::Malformed("entry ids not strictly increasing"))
        );
        assert_eq!(
            bad(vec![entry("a", 0, vec![])], vec![]),
            Err(CodecError::Malformed("zero counter"))
        );
        assert_eq!(
            bad(vec![entry("a", 1, vec![v(1), v(2)])], vec![]),
            Err(CodecError::Malformed("more values than events"))
        );
        assert_eq!(
            bad(vec![], vec![v(2), v(1)]),
            Err(CodecError::Malformed(
                "anonymous values not strictly increasing"
            ))
        );
        assert_eq!(
            bad(vec![], vec![v(1), v(1)]),
            Err(CodecError::Malformed(
                "anonymous values not strictly increasing"
            ))
        );
        // An invalid node id, written by hand.
        let mut raw = vec![1, 1, 3, b'a', b' ', b'b', 1, 0, 0];
        assert_eq!(
            Clock::decode(&raw),
            Err(CodecError::Malformed("invalid node id"))
        );
        raw[4] = 0xff;
        assert_eq!(
            Clock::decode(&raw),
            Err(CodecError::Malformed("node id not utf-8"))
        );
        // An overlong varint for the entry count.
        assert_eq!(
            Clock::decode(&[1, 0x80, 0x00, 0]),
            Err(CodecError::Malformed("bad varint"))
        );
    }

    #[test]
    fn clocks_beyond_the_limits_are_refused() {
        let many: Vec<Sibling> = (0..=MAX_CLOCK_VALUES as u64)
            .map(|n| Sibling::tombstone(Timestamp::from_u64(n)))
            .collect();
        let too_many_values = clock(vec![], many.clone());
        assert_eq!(too_many_values.check_limits(), Err(CodecError::TooLarge));
        assert_eq!(
            Clock::decode(&too_many_values.to_bytes()),
            Err(CodecError::TooLarge)
        );
        // The limit counts entry values and anonymous values together.
        let split = clock(
            vec![entry("a", 600, many[..600].to_vec())],
            many[600..].to_vec(),
        );
        assert_eq!(Clock::decode(&split.to_bytes()), Err(CodecError::TooLarge));
        let at_limit = clock(vec![], many[..MAX_CLOCK_VALUES].to_vec());
        assert_eq!(at_limit.check_limits(), Ok(()));
        assert_eq!(Clock::decode(&at_limit.to_bytes()), Ok(at_limit));

        let entries: Vec<Entry<Sibling>> = (0..=MAX_CLOCK_ENTRIES)
            .map(|i| entry(&format!("n{i:05}"), 1, vec![]))
            .collect();
        let too_many_entries = clock(entries, vec![]);
        assert_eq!(too_many_entries.check_limits(), Err(CodecError::TooLarge));
        assert_eq!(
            Clock::decode(&too_many_entries.to_bytes()),
            Err(CodecError::TooLarge)
        );
        // A huge claimed count is refused before anything is allocated.
        assert_eq!(
            Clock::decode(&[1, 0, 0xff, 0xff, 0xff, 0xff, 0x0f]),
            Err(CodecError::TooLarge)
        );
    }

    #[test]
    fn digest_tells_states_apart() {
        let c = sample_clock();
        assert_eq!(c.digest(), c.clone().digest());
        assert_eq!(c.digest(), hash128(&c.to_bytes()));
        assert_ne!(c.digest(), c.lww_resolve().digest());
        assert_ne!(c.digest(), Clock::empty().digest());
    }

    // --- property tests: histories of puts and syncs against a model -------------------------

    const REPLICAS: usize = 4;

    /// Where a put's context comes from.
    #[derive(Clone, Debug)]
    enum Ctx {
        /// No context (a blind write).
        Blind,
        /// A read of one replica.
        Read(usize),
        /// A read that merged two replicas' answers (R = 2).
        ReadTwo(usize, usize),
        /// A context read earlier (the client held on to it while others wrote).
        Stale(Index),
    }

    #[derive(Clone, Debug)]
    enum Op {
        Put { at: usize, ctx: Ctx },
        Sync { from: usize, to: usize },
    }

    fn ctx_strategy() -> impl Strategy<Value = Ctx> {
        prop_oneof![
            1 => Just(Ctx::Blind),
            3 => (0..REPLICAS).prop_map(Ctx::Read),
            2 => (0..REPLICAS, 0..REPLICAS).prop_map(|(a, b)| Ctx::ReadTwo(a, b)),
            2 => any::<Index>().prop_map(Ctx::Stale),
        ]
    }

    fn op_strategy() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..REPLICAS, ctx_strategy()).prop_map(|(at, ctx)| Op::Put { at, ctx }),
            2 => (0..REPLICAS, 0..REPLICAS).prop_map(|(from, to)| Op::Sync { from, to }),
        ]
    }

    fn history_strategy(max_ops: usize) -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec(op_strategy(), 0..max_ops)
    }

    /// A context as the client holds it, with the model's view of it: the puts it has seen.
    type ModelCtx = (VersionVector, BTreeSet<u32>);

    /// Replicas running the real DVVSet next to a model of causality: each replica knows a set
    /// of puts; a put obsoletes exactly the puts its context had seen. A replica must hold exactly
    /// the values it knows of that no put it knows of obsoletes.
    struct World {
        clocks: Vec<Dvvset<u32>>,
        known: Vec<BTreeSet<u32>>,
        /// Per put (by value): the puts its context had seen.
        obsoletes: Vec<BTreeSet<u32>>,
        contexts: Vec<ModelCtx>,
        /// Every state any replica went through.
        snapshots: Vec<Dvvset<u32>>,
    }

    impl World {
        fn new() -> Self {
            World {
                clocks: vec![Dvvset::empty(); REPLICAS],
                known: vec![BTreeSet::new(); REPLICAS],
                obsoletes: Vec::new(),
                contexts: vec![(VersionVector::new(), BTreeSet::new())],
                snapshots: vec![Dvvset::empty()],
            }
        }

        fn run(ops: &[Op]) -> Self {
            let mut world = World::new();
            for op in ops {
                world.apply(op);
            }
            world
        }

        fn read(&mut self, ctx: &Ctx) -> ModelCtx {
            let read = match ctx {
                Ctx::Blind => (VersionVector::new(), BTreeSet::new()),
                Ctx::Read(r) => (self.clocks[*r].join(), self.known[*r].clone()),
                Ctx::ReadTwo(a, b) => (
                    self.clocks[*a].sync(&self.clocks[*b]).join(),
                    self.known[*a].union(&self.known[*b]).copied().collect(),
                ),
                Ctx::Stale(i) => i.get(&self.contexts).clone(),
            };
            self.contexts.push(read.clone());
            read
        }

        fn put(&mut self, at: usize, (vv, seen): ModelCtx, value: u32) {
            let stored = (self.clocks[at].size() > 0 || !self.clocks[at].entries.is_empty())
                .then_some(&self.clocks[at]);
            self.clocks[at] = Dvvset::put(stored, &vv, value, &replica(at));
            self.known[at].extend(seen.iter().copied());
            self.known[at].insert(value);
            if self.obsoletes.len() <= value as usize {
                self.obsoletes.resize(value as usize + 1, BTreeSet::new());
            }
            self.obsoletes[value as usize] = seen;
            self.snapshots.push(self.clocks[at].clone());
        }

        fn sync(&mut self, from: usize, to: usize) {
            self.clocks[to] = self.clocks[to].sync(&self.clocks[from]);
            let theirs = self.known[from].clone();
            self.known[to].extend(theirs);
            self.snapshots.push(self.clocks[to].clone());
        }

        fn apply(&mut self, op: &Op) {
            match op {
                Op::Put { at, ctx } => {
                    let read = self.read(ctx);
                    let value = self.obsoletes.len() as u32;
                    self.put(*at, read, value);
                }
                Op::Sync { from, to } => self.sync(*from, *to),
            }
        }

        /// The values a state that knows `known` must hold.
        fn expected(&self, known: &BTreeSet<u32>) -> BTreeSet<u32> {
            known
                .iter()
                .copied()
                .filter(|v| {
                    !known
                        .iter()
                        .any(|w| self.obsoletes[*w as usize].contains(v))
                })
                .collect()
        }

        fn everything(&self) -> Dvvset<u32> {
            Dvvset::sync_all(&self.clocks)
        }

        fn all_known(&self) -> BTreeSet<u32> {
            self.known.iter().flatten().copied().collect()
        }
    }

    /// Values of a clock as a set, failing if a value appears twice.
    fn distinct_values(c: &Dvvset<u32>) -> Result<BTreeSet<u32>, TestCaseError> {
        let set = value_set(c);
        prop_assert_eq!(set.len(), c.size(), "a value appears twice in {:?}", c);
        Ok(set)
    }

    /// The clock states, as the node holds them: through `Sibling`, so codec tests see real data.
    fn as_siblings(c: &Dvvset<u32>) -> Clock {
        c.clone().map_values(|v| {
            let v = u64::from(v);
            Sibling {
                // Timestamps deliberately not in write order, so `lww` moves values.
                ts: Timestamp::new(1_700_000_000_000 + (v * 7919) % 13, (v % 3) as u16),
                data: (v % 5 != 0).then(|| Bytes::from(vec![v as u8; (v % 7) as usize])),
                ids: None,
            }
        })
    }

    fn config(cases: u32) -> ProptestConfig {
        ProptestConfig {
            cases,
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    proptest! {
        #![proptest_config(config(96))]

        /// Law 1: sync is commutative, associative and idempotent on every reachable state,
        /// including states resolved by `lww` (which move values between dots).
        #[test]
        fn sync_is_commutative_associative_and_idempotent(
            ops in history_strategy(24),
            picks in prop::array::uniform3((any::<Index>(), any::<bool>())),
        ) {
            let world = World::run(&ops);
            let [a, b, c] = picks.map(|(i, resolve)| {
                let s = as_siblings(i.get(&world.snapshots));
                if resolve { s.lww_resolve() } else { s }
            });
            prop_assert_eq!(a.sync(&b), b.sync(&a));
            prop_assert_eq!(a.sync(&b).sync(&c), a.sync(&b.sync(&c)));
            prop_assert_eq!(a.sync(&a), a.clone());
            prop_assert_eq!(a.sync(&b).sync(&b), a.sync(&b));
            prop_assert_eq!(a.sync(&b).to_bytes(), b.sync(&a).to_bytes());
            // The merge is an upper bound of both sides.
            let ab = a.sync(&b);
            prop_assert!(ab.join().descends(&a.join()) && ab.join().descends(&b.join()));
        }

        /// Law 1 where it is most fragile: a state against its own `lww` resolution, which
        /// holds a different value on the same dot whenever the winner was not the newest of
        /// its entry. Both orders, and with a third state, give one structure.
        #[test]
        fn sync_with_an_lww_resolved_copy_is_order_independent(
            ops in history_strategy(24),
            picks in prop::array::uniform2(any::<Index>()),
        ) {
            let world = World::run(&ops);
            let [s, t] = picks.map(|i| as_siblings(i.get(&world.snapshots)));
            let r = s.lww_resolve();
            prop_assert_eq!(s.sync(&r), r.sync(&s));
            prop_assert_eq!(s.sync(&r).sync(&t), s.sync(&r.sync(&t)));
            prop_assert_eq!(t.sync(&s).sync(&r), t.sync(&r.sync(&s)));
            // Resolving again after the merge keeps the winner `lww` had picked.
            prop_assert_eq!(s.sync(&r).lww_resolve(), r.clone());
        }

        /// Law 1, with client clocks carrying anonymous values in the mix: still commutative and
        /// idempotent, with the anonymous values in canonical order.
        #[test]
        fn sync_with_anonymous_values_is_commutative_and_idempotent(
            ops in history_strategy(16),
            picks in prop::array::uniform3(any::<Index>()),
            anonymous in prop::collection::vec((any::<Index>(), 0u32..6), 1..4),
        ) {
            let world = World::run(&ops);
            let mut states: Vec<Dvvset<u32>> =
                picks.iter().map(|i| i.get(&world.snapshots).clone()).collect();
            for (i, v) in &anonymous {
                let client = Dvvset::new_with(&i.get(&world.snapshots).join(), 1000 + v);
                let target = (*v as usize) % states.len();
                states[target] = states[target].sync(&client);
            }
            for x in &states {
                prop_assert!(x.anonymous().windows(2).all(|w| w[0] < w[1]));
                prop_assert_eq!(x.sync(x), x.clone());
                for y in &states {
                    prop_assert_eq!(x.sync(y), y.sync(x));
                }
            }
        }

        /// Law 2: after any history of puts (fresh, stale, merged or no contexts, at any
        /// coordinator) and syncs, every replica holds exactly the values it knows of that no
        /// write it knows of had seen; and so does the sync of all replicas.
        #[test]
        fn sync_keeps_exactly_the_values_no_known_write_has_overwritten(
            ops in history_strategy(40),
        ) {
            let mut world = World::new();
            for op in &ops {
                world.apply(op);
                for r in 0..REPLICAS {
                    let held = distinct_values(&world.clocks[r])?;
                    prop_assert_eq!(
                        held, world.expected(&world.known[r]), "replica {} after {:?}", r, op
                    );
                }
            }
            let all = world.everything();
            prop_assert_eq!(distinct_values(&all)?, world.expected(&world.all_known()));
            // The merged state is the same whatever the order of the syncs.
            let reversed = Dvvset::sync_all(world.clocks.iter().rev());
            prop_assert_eq!(all, reversed);
        }

        /// Law 3: a put carrying the context of a read replaces every value that read returned,
        /// at the coordinator and after everything is synced.
        #[test]
        fn put_with_a_read_context_replaces_every_value_the_read_returned(
            ops in history_strategy(30),
            read_from in (0..REPLICAS, 0..REPLICAS),
            coordinator in 0..REPLICAS,
            later in history_strategy(10),
        ) {
            let mut world = World::run(&ops);
            let read = world.clocks[read_from.0].sync(&world.clocks[read_from.1]);
            let returned = value_set(&read);
            let seen = world.known[read_from.0].union(&world.known[read_from.1]).copied().collect();
            let value = world.obsoletes.len() as u32;
            world.put(coordinator, (read.join(), seen), value);
            let at_coordinator = value_set(&world.clocks[coordinator]);
            prop_assert!(at_coordinator.contains(&value));
            prop_assert!(at_coordinator.is_disjoint(&returned));
            for op in &later {
                world.apply(op);
            }
            let all = value_set(&world.everything());
            prop_assert!(all.is_disjoint(&returned), "{:?} survived in {:?}", returned, all);
        }

        /// Law 4: k concurrent puts with the same read context leave exactly k siblings, however
        /// many and which coordinators handled them and however the replicas synced meanwhile.
        #[test]
        fn concurrent_puts_with_one_context_leave_exactly_one_sibling_each(
            ops in history_strategy(20),
            read_from in 0..REPLICAS,
            puts in prop::collection::vec(
                (0..REPLICAS, prop::collection::vec((0..REPLICAS, 0..REPLICAS), 0..3)),
                1..7,
            ),
        ) {
            let mut world = World::run(&ops);
            let everything = world.everything();
            world.clocks = vec![everything; REPLICAS];
            let ctx = world.clocks[read_from].join();
            let first = 1_000_000u32;
            for (j, (coordinator, syncs)) in puts.iter().enumerate() {
                for (from, to) in syncs {
                    world.clocks[*to] = world.clocks[*to].sync(&world.clocks[*from]);
                }
                let stored = world.clocks[*coordinator].clone();
                world.clocks[*coordinator] =
                    Dvvset::put(Some(&stored), &ctx, first + j as u32, &replica(*coordinator));
            }
            let merged = world.everything();
            let expected: BTreeSet<u32> = (0..puts.len() as u32).map(|j| first + j).collect();
            prop_assert_eq!(merged.size(), puts.len());
            prop_assert_eq!(value_set(&merged), expected);
        }

        /// Law 5: the codec round-trips every reachable state (raw, `lww`-resolved or carrying
        /// anonymous values), re-encodes decoded bytes identically, and equal states (the same
        /// merge reached in two orders) have equal digests.
        #[test]
        fn codec_round_trips_and_equal_states_have_equal_digests(
            ops in history_strategy(24),
            picks in prop::array::uniform2(any::<Index>()),
            resolve in any::<bool>(),
            anonymous in any::<bool>(),
        ) {
            let world = World::run(&ops);
            let [a, b] = picks.map(|i| as_siblings(i.get(&world.snapshots)));
            let mut a = if resolve { a.lww_resolve() } else { a };
            if anonymous {
                a = a.sync(&Clock::new(Sibling::live(Timestamp::from_u64(7), "anon".into())));
            }
            let bytes = a.to_bytes();
            prop_assert_eq!(bytes.len(), a.encoded_len());
            let decoded = Clock::decode(&bytes);
            prop_assert_eq!(decoded.as_ref(), Ok(&a));
            prop_assert_eq!(a.check_limits(), Ok(()));
            let ab = a.sync(&b);
            let ba = b.sync(&a);
            prop_assert_eq!(ab.digest(), ba.digest());
            if a != b {
                prop_assert_ne!(a.digest(), b.digest());
            }
        }

        /// Law 5: decoding arbitrary bytes never panics, and whatever decodes re-encodes to the
        /// same bytes (the encoding is canonical).
        #[test]
        fn decoding_arbitrary_bytes_never_panics(
            bytes in prop::collection::vec(any::<u8>(), 0..200),
        ) {
            if let Ok(c) = Clock::decode(&bytes) {
                prop_assert_eq!(c.to_bytes(), bytes);
            }
        }

        /// Law 5: decoding damaged encodings of real states never panics, and what decodes is
        /// canonical again.
        #[test]
        fn decoding_damaged_clocks_never_panics(
            ops in history_strategy(16),
            pick in any::<Index>(),
            damage in prop::collection::vec((any::<Index>(), any::<u8>()), 1..4),
            cut in any::<Index>(),
        ) {
            let world = World::run(&ops);
            let mut bytes = as_siblings(pick.get(&world.snapshots)).to_bytes();
            for (at, byte) in &damage {
                let i = at.index(bytes.len());
                bytes[i] = *byte;
            }
            let keep = cut.index(bytes.len() + 1);
            for candidate in [&bytes[..], &bytes[..keep]] {
                if let Ok(c) = Clock::decode(candidate) {
                    prop_assert_eq!(c.to_bytes(), candidate.to_vec());
                }
            }
        }
    }
}
