//! What the harness learns by looking into the nodes' storage (no real client could): the id a
//! coordinator's dots carry, and at which dots each value has been stored.
//!
//! The dot index is filled after every client operation (for its key) and once at the end: a
//! value ever stored at two different dots was applied twice, which the checker reports on its
//! own and uses to explain the violations that follow from it, unless every copy carries the
//! same write id (a forwarded write sent to a second coordinator, by design: its copies read as
//! one value and are hidden together, `dynakv_core::write_id`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use dynakv_core::dvvset::Clock;
use dynakv_core::hash::key_position;
use std::ops::Bound;

use dynakv_core::ring::{NodeSpec, Ring};
use dynakv_node::storage::{
    Backend, MemoryBackend, ScanLimit, Store, StoreConfig, Table, WriteOp, WriterMode,
};

use crate::history::Dot;

/// Where the node keeps the id its dots carry.
const DOT_ID_META_KEY: &[u8] = b"node.dot_id";

/// Where the node keeps the last committed ring it knew (`rebalance.rs`).
const COMMITTED_RING_META_KEY: &[u8] = b"ring.committed";

/// The last committed ring `backend`'s node recorded, decoded by the node's own code
/// (`rebalance::load_committed_ring`), so the simulation rebuilds the ring exactly as a node
/// restarted on that disk would.
pub fn committed_ring(backend: &MemoryBackend) -> Option<Vec<NodeSpec>> {
    decode_ring(committed_ring_record(backend)?)
}

/// The raw record of the last committed ring `backend`'s node recorded (see [`decode_ring`]).
/// The node writes it before it drops anything the ring no longer gives it.
pub fn committed_ring_record(backend: &MemoryBackend) -> Option<Vec<u8>> {
    backend.get(Table::Meta, COMMITTED_RING_META_KEY).ok()?
}

/// Decodes a committed-ring record with the node's own code: the record is copied into a
/// scratch store, which `rebalance::load_committed_ring` then reads (the node's disk is only
/// read).
pub fn decode_ring(record: Vec<u8>) -> Option<Vec<NodeSpec>> {
    let scratch = MemoryBackend::new();
    scratch
        .commit(&[WriteOp::Put {
            table: Table::Meta,
            key: COMMITTED_RING_META_KEY.to_vec(),
            value: record,
        }])
        .ok()?;
    let store = Store::open(
        Arc::new(scratch),
        StoreConfig {
            writer: WriterMode::Thread,
            ..StoreConfig::default()
        },
        dynakv_node::metrics::Metrics::new().store,
    )
    .ok()?;
    dynakv_node::rebalance::load_committed_ring(&store)
}

/// Committed rings already decoded, by record (decoding opens a scratch store).
#[derive(Default)]
pub struct RingCache(BTreeMap<Vec<u8>, Option<Arc<Ring>>>);

impl RingCache {
    /// The last committed ring `backend`'s node recorded.
    pub fn recorded(&mut self, backend: &MemoryBackend) -> Option<Arc<Ring>> {
        let record = committed_ring_record(backend)?;
        self.0
            .entry(record)
            .or_insert_with_key(|r| {
                decode_ring(r.clone())
                    .and_then(|specs| Ring::new(specs).ok())
                    .map(Arc::new)
            })
            .clone()
    }
}

/// The replicas of `key` in `ring` (its preference list of `n` nodes).
pub fn replicas_in(ring: &Ring, key: &str, n: u32) -> Vec<String> {
    ring.preference_list(key_position(key.as_bytes()), n as usize)
        .into_iter()
        .map(|i| ring.nodes()[i].id.to_string())
        .collect()
}

/// How the node stores a client key in its data table: the key's ring position (big-endian)
/// then the key, so that a range of the ring is a range of storage.
pub fn stored_key(key: &[u8]) -> Vec<u8> {
    let mut k = key_position(key).to_be_bytes().to_vec();
    k.extend_from_slice(key);
    k
}

/// The client key of a stored key (either layout: with or without the position prefix).
pub fn client_key(stored: &[u8]) -> &[u8] {
    match stored.split_at_checked(8) {
        Some((pos, key)) if pos == key_position(key).to_be_bytes() => key,
        _ => stored,
    }
}

/// A node's stored clock for `key`, in either key layout.
pub fn stored_clock(backend: &MemoryBackend, key: &str) -> Option<Vec<u8>> {
    [stored_key(key.as_bytes()), key.as_bytes().to_vec()]
        .iter()
        .find_map(|k| backend.get(Table::Data, k).ok().flatten())
}

/// The id `backend`'s node puts in its dots, if it recorded one.
pub fn dot_actor(backend: &MemoryBackend) -> Option<String> {
    let bytes = backend.get(Table::Meta, DOT_ID_META_KEY).ok()??;
    String::from_utf8(bytes).ok()
}

/// The key of a hint for `target` in the Hints table: `[target id length: u8][target id]`
/// then the stored key.
fn hint_key(target: &str, key: &str) -> Vec<u8> {
    let mut k = vec![target.len() as u8];
    k.extend_from_slice(target.as_bytes());
    k.extend_from_slice(&stored_key(key.as_bytes()));
    k
}

/// A hint's clock: the value is `[created at: u64 big-endian][encoded clock]`.
fn hint_clock(backend: &MemoryBackend, target: &str, key: &str) -> Option<Clock> {
    let bytes = backend.get(Table::Hints, &hint_key(target, key)).ok()??;
    Clock::decode(bytes.get(8..)?).ok()
}

fn covers(clock: Option<Clock>, dot: &Dot) -> bool {
    clock.is_some_and(|c| dot.covered_by(&c.join()))
}

/// What [`audit_ack`] found about the replicas that acknowledged a write.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AckAudit {
    /// Acknowledged, but the write is not where the ack says it is.
    pub unbacked: Vec<String>,
    /// Acknowledged by an old owner that no longer holds the write because a ring change
    /// committed meanwhile: the node's own committed ring no longer makes it (or the primary it
    /// stood for) a replica of the key, and old owners drop what they hold in no live ring.
    /// Their acks counted for the retired ring; the write's W acks in the new ring are what
    /// (a) and (e) go on to check.
    pub retired: Vec<String>,
}

/// "An ack means the write is on disk on that replica" (DESIGN.md section 5), checked when the
/// answer reaches the client: every replica the receipt names as having acknowledged holds the
/// write's dot, a primary in its data, a fallback as a hint for the primary it stood for (or
/// already delivered); or it is an old owner whose ring retired in the meantime
/// ([`AckAudit::retired`]).
pub fn audit_ack(
    backends: &BTreeMap<String, MemoryBackend>,
    key: &str,
    dot: &Dot,
    acked_by: &[(String, Option<String>)],
    n: u32,
    rings: &mut RingCache,
) -> AckAudit {
    let data = |node: &str| {
        backends.get(node).is_some_and(|b| {
            covers(
                stored_clock(b, key).and_then(|c| Clock::decode(&c).ok()),
                dot,
            )
        })
    };
    let mut audit = AckAudit::default();
    for (node, hint_for) in acked_by {
        let held = match hint_for {
            None => data(node),
            Some(primary) => {
                data(node)
                    || data(primary)
                    || backends
                        .get(node)
                        .is_some_and(|b| covers(hint_clock(b, primary, key), dot))
            }
        };
        if held {
            continue;
        }
        let replica = hint_for.as_deref().unwrap_or(node);
        let retired = backends
            .get(node)
            .and_then(|b| rings.recorded(b))
            .filter(|ring| !replicas_in(ring, key, n).iter().any(|r| r == replica));
        match (retired, hint_for) {
            (Some(ring), _) => audit.retired.push(format!(
                "{node} acknowledged{} but dropped {dot} once its committed ring became {:016x}",
                hint_for
                    .as_ref()
                    .map(|p| format!(" as fallback for {p}"))
                    .unwrap_or_default(),
                ring.version()
            )),
            (None, None) => audit
                .unbacked
                .push(format!("{node} acknowledged but does not hold {dot}")),
            (None, Some(p)) => audit.unbacked.push(format!(
                "{node} acknowledged as fallback for {p} but holds no hint of {dot}"
            )),
        }
    }
    audit
}

/// Hints still queued on a node: (target, client key) of each.
pub fn queued_hints(backend: &MemoryBackend) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut from: Option<Vec<u8>> = None;
    loop {
        let lower = from.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
        let Ok(page) = backend.scan(
            Table::Hints,
            lower,
            Bound::Unbounded,
            ScanLimit::entries(4096),
        ) else {
            break;
        };
        for (k, _) in &page.entries {
            let Some((&len, rest)) = k.split_first() else {
                continue;
            };
            let Some((target, stored)) = rest.split_at_checked(len as usize) else {
                continue;
            };
            out.push((
                String::from_utf8_lossy(target).into_owned(),
                String::from_utf8_lossy(client_key(stored)).into_owned(),
            ));
        }
        match page.next {
            Some(next) => from = Some(next),
            None => break,
        }
    }
    out
}

/// A value's copy: its dot, and the write id stored with it.
pub type StoredCopy = (Dot, Option<u128>);

/// Where values were seen stored.
#[derive(Clone, Debug, Default)]
pub struct DotIndex {
    /// (key, value) -> every copy of the value seen stored.
    pub dots: BTreeMap<(String, Vec<u8>), BTreeSet<StoredCopy>>,
    /// (key, write id) of every copy of a forwarded write seen held hidden (superseded) by a
    /// replica at some point.
    pub hidden: BTreeSet<(String, u128)>,
}

/// Every value of a clock with its dot and write id (tombstones have no value and are left out).
pub fn live_dots(clock: &Clock) -> Vec<(Dot, Vec<u8>, Option<u128>)> {
    let mut out = Vec::new();
    for e in clock.entries() {
        for (i, v) in e.values().iter().enumerate() {
            if let Some(data) = &v.data {
                out.push((
                    Dot {
                        node: e.id().to_string(),
                        counter: e.counter() - i as u64,
                    },
                    data.to_vec(),
                    v.write_id().map(|w| w.id),
                ));
            }
        }
    }
    out
}

/// Records where every replica holds the values of `key` now. (In lww mode a winning value moves
/// to the top dot of its own entry, so several dots of one actor are normal there; the checker
/// then counts actors.)
pub fn observe<'a>(
    index: &mut DotIndex,
    backends: impl IntoIterator<Item = &'a MemoryBackend>,
    key: &str,
) {
    for backend in backends {
        let Some(clock) = stored_clock(backend, key).and_then(|b| Clock::decode(&b).ok()) else {
            continue;
        };
        for (dot, value, write) in live_dots(&clock) {
            index
                .dots
                .entry((key.to_string(), value))
                .or_default()
                .insert((dot, write));
        }
        let superseded = clock.superseded_ids();
        for w in clock.values().filter_map(|s| s.write_id()) {
            if superseded.contains(&w.id) {
                index.hidden.insert((key.to_string(), w.id));
            }
        }
    }
}
