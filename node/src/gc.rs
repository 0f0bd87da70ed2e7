//! Tombstone garbage collection, gated by repair (as Garage and ScyllaDB's repair mode do).
//!
//! A tombstone (a key whose every sibling is a tombstone) is purged only when
//! 1. the newest of its tombstones is older than `grace_ms`, and
//! 2. every primary replica of the key answers with exactly the same version (digest), so every
//!    replica is known to hold the tombstone.
//!
//! Then each replica deletes the key only if its stored version still has that digest
//! (compare-and-delete), so a write that races with the purge survives. A replica that was away
//! still holds the old value and blocks condition 2, however long it was away, so a deleted value
//! cannot come back from it. Hints older than `hints.max_age_ms` are dropped before delivery and
//! configuration requires `grace_ms` to exceed it, so no hint older than a purged tombstone can be
//! delivered after the purge.

use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dynakv_core::NodeId;
use dynakv_core::dvvset::Clock;
use dynakv_core::hash::hash128;
use tokio::time::Instant;

use crate::node::{Node, split_data_key};
use crate::proto::{FetchRequest, PurgeRequest, replica_request, replica_response};
use crate::storage::{ScanLimit, Table};

pub use crate::config::TombstoneGcConfig;

/// Whether the ring is still the settled ring of version `version`: no change under way (while
/// the ring changes, a key's replicas are those of several rings, and a new owner may not hold
/// the tombstone yet) and none committed since.
fn settled_on(node: &Node, version: u64) -> bool {
    let view = node.view();
    view.rings.changes().is_empty() && view.ring.version() == version
}

/// Tombstones old enough to be purged, with the stored bytes, where this node is a primary, and
/// the ring version they were chosen on. The pass reads all of storage; it yields after each
/// page, so that it never holds a worker of the runtime for longer than one page (seconds at a
/// million keys otherwise), and gives up when the ring moved meanwhile.
async fn candidates(
    node: &Node,
    now_ms: u64,
    limit: usize,
) -> (u64, Vec<(Vec<u8>, Vec<u8>, Vec<NodeId>)>) {
    let view = node.view();
    let version = view.ring.version();
    if !view.rings.changes().is_empty() {
        return (version, Vec::new());
    }
    let grace = node.config.raw.tombstone_gc.grace_ms;
    let mut out = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let from = match &after {
            Some(k) => Bound::Excluded(k.as_slice()),
            None => Bound::Unbounded,
        };
        let Ok(page) = node.store.scan(
            Table::Data,
            from,
            Bound::Unbounded,
            ScanLimit::entries(1024),
        ) else {
            return (version, out);
        };
        for (k, v) in page.entries {
            let Ok(clock) = Clock::decode(&v) else {
                continue;
            };
            let newest = clock.values().map(|s| s.ts.physical_ms()).max();
            let old_enough = newest.is_some_and(|t| t.saturating_add(grace) < now_ms);
            if !clock.is_all_tombstones() || !old_enough {
                continue;
            }
            let peers = node.co_replicas(&view, &k);
            let primary = split_data_key(&k).is_some_and(|(pos, _)| {
                view.ring
                    .preference_list(pos, node.n())
                    .iter()
                    .any(|&i| view.ring.nodes()[i].id == node.id)
            });
            if primary {
                out.push((k, v, peers));
                if out.len() >= limit {
                    return (version, out);
                }
            }
        }
        match page.next {
            Some(n) => after = Some(n),
            None => return (version, out),
        }
        tokio::task::yield_now().await;
        if !settled_on(node, version) {
            return (version, Vec::new());
        }
    }
}

/// Tries to purge one tombstone everywhere; returns whether it is gone from this node.
async fn purge(node: &Node, stored_key: &[u8], stored: &[u8], peers: &[NodeId]) -> bool {
    let Some((_, key)) = split_data_key(stored_key) else {
        return false;
    };
    let key = Bytes::copy_from_slice(key);
    let digest = hash128(stored);
    let deadline = Instant::now() + Duration::from_secs(5);
    // Every other primary must hold exactly this version.
    for peer in peers {
        let op = replica_request::Op::Fetch(FetchRequest {
            key: key.clone(),
            hint_for: String::new(),
        });
        match node.peers.call(peer, op, deadline).await {
            Ok(replica_response::Result::Fetch(f)) if f.clock.as_ref() == stored => {}
            _ => return false,
        }
    }
    for peer in peers {
        let op = replica_request::Op::Purge(PurgeRequest {
            key: key.clone(),
            digest: Bytes::copy_from_slice(&digest.to_le_bytes()),
        });
        match node.peers.call(peer, op, deadline).await {
            Ok(replica_response::Result::Purge(p)) if p.purged => {}
            // A peer that did not purge keeps the tombstone; anti-entropy gives it back to the
            // others and the next pass tries again.
            _ => return false,
        }
    }
    matches!(node.purge_local(&key, digest).await, Ok(true))
}

/// The GC task. Ends when `stop` resolves.
pub async fn run(node: Arc<Node>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let cfg = node.config.raw.tombstone_gc.clone();
    let mut tick = tokio::time::interval(Duration::from_millis(cfg.interval_ms.max(10)));
    loop {
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        let now = (node.wall)();
        let (version, found) = candidates(&node, now, cfg.max_per_pass).await;
        for (k, v, peers) in found {
            // Each purge awaits its peers: a ring change may start meanwhile.
            if !settled_on(&node, version) {
                break;
            }
            if purge(&node, &k, &v, &peers).await {
                node.metrics.tombstones_purged.inc();
            }
        }
    }
}
