//! Hinted handoff (DESIGN.md section 6): a fallback node stores a write for an unreachable
//! primary durably in its `Hints` table, and delivers it when gossip sees the primary back (at
//! once, woken by [`crate::node::Node::member_returned`]) or, failing that, at the next delivery
//! round in which the primary is not held down. A hint
//! is deleted only after the primary's durable ack, and only if it did not change meanwhile
//! (compare-and-delete), so delivery is idempotent and never loses a newer hint.
//!
//! Hints are bounded per target (count, bytes, age). Past a bound a new hint is refused (the
//! coordinator then tries the next fallback, and queues the key's segment for a targeted
//! anti-entropy exchange with the primary); an expired hint is dropped. Both are counted.
//!
//! The table itself is `hint_store.rs`.

use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dynakv_core::NodeId;
use dynakv_core::dvvset::Clock;
use tokio::time::Instant;

pub use crate::hint_store::{HintError, Hints, HintsConfig, QueueDepth, hint_key};
use crate::hint_store::{split_hint_key, split_value};
use crate::node::{Node, split_data_key};
use crate::proto::{StoreRequest, replica_request, replica_response};
use crate::storage::{ScanLimit, Table};

/// Hints in flight to one target at once: the target's group commit batches them.
const DELIVERY_CONCURRENCY: usize = 64;

/// Delivers one hint and deletes it after the target's durable ack. Expired hints are dropped.
async fn deliver_one(node: &Node, target: &NodeId, k: Vec<u8>, v: Vec<u8>) -> Result<(), String> {
    let (Some((created, clock)), Some((_, stored_key))) = (split_value(&v), split_hint_key(&k))
    else {
        return Ok(());
    };
    if (node.wall)().saturating_sub(created) > node.hints.max_age_ms() {
        if node
            .hints
            .delete_if_unchanged(&node.store, k.clone(), v.clone())
            .await
            .map_err(|e| e.to_string())?
        {
            node.metrics
                .hints_dropped
                .with_label_values(&["expired"])
                .inc();
        }
        return Ok(());
    }
    let Some((pos, client_key)) = split_data_key(stored_key) else {
        return Ok(());
    };
    // The ring may have moved since the hint was stored: a target that no longer replicates
    // the key in any live ring (it drained, or was removed) is not where the write belongs any
    // more; the key's replicas in the ring reads use are.
    let recipients = recipients(node, target, pos);
    for recipient in &recipients {
        if *recipient == node.id {
            let clock = Clock::decode(clock).map_err(|e| e.to_string())?;
            node.merge_local(client_key.to_vec(), clock)
                .await
                .map_err(|e| e.to_string())?;
            continue;
        }
        let op = replica_request::Op::Store(StoreRequest {
            key: Bytes::copy_from_slice(client_key),
            clock: Bytes::copy_from_slice(clock),
            hint_for: String::new(),
        });
        match node
            .peers
            .call(recipient, op, Instant::now() + Duration::from_secs(5))
            .await
        {
            Ok(replica_response::Result::Store(_)) => {}
            Ok(_) => return Err(format!("{recipient} refused the hint")),
            Err(e) => return Err(e.to_string()),
        }
    }
    node.metrics.hints_delivered.inc();
    node.hints
        .delete_if_unchanged(&node.store, k, v)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Who a hint for `target` about the key at `pos` goes to: the target while it replicates the
/// key in a live ring, the key's replicas in the read ring otherwise.
fn recipients(node: &Node, target: &NodeId, pos: u64) -> Vec<NodeId> {
    let view = node.view();
    let n = node.n();
    let still = view
        .rings
        .write_rings()
        .iter()
        .any(|ring| ring.is_replica(pos, n, target.as_str()));
    if still {
        return vec![target.clone()];
    }
    view.read_walk(pos, n).0
}

/// Whether hints for `target` wait for it to come back: it is down and still a ring member (a
/// member that left or was removed never comes back; its hints go to the keys' replicas now).
fn waits_for(node: &Node, target: &NodeId) -> bool {
    let view = node.view();
    node.is_down(target)
        && view.rings.write_rings().iter().any(|ring| {
            ring.node_index(target.as_str())
                .is_some_and(|i| ring.nodes()[i].weight > 0)
        })
}

/// Delivers every hint held for `target`, a page at a time with up to
/// `DELIVERY_CONCURRENCY` in flight; stops after a page with a failure (the target is away).
async fn deliver_to(node: &Node, target: &NodeId) -> Result<(), String> {
    use futures::StreamExt;
    let prefix = hint_key(target, &[]);
    let mut after: Option<Vec<u8>> = None;
    loop {
        let lower = match &after {
            Some(k) => Bound::Excluded(k.as_slice()),
            None => Bound::Included(prefix.as_slice()),
        };
        // Hints of one target are contiguous; the first key of another target ends the scan.
        let page = node
            .store
            .scan(
                Table::Hints,
                lower,
                Bound::Unbounded,
                ScanLimit::entries(256),
            )
            .map_err(|e| e.to_string())?;
        let mut done = page.next.is_none();
        let mut mine = Vec::with_capacity(page.entries.len());
        for (k, v) in page.entries {
            if !k.starts_with(&prefix) {
                done = true;
                break;
            }
            after = Some(k.clone());
            mine.push((k, v));
        }
        let results: Vec<Result<(), String>> = futures::stream::iter(mine)
            .map(|(k, v)| deliver_one(node, target, k, v))
            .buffer_unordered(DELIVERY_CONCURRENCY)
            .collect()
            .await;
        if let Some(e) = results.into_iter().find_map(Result::err) {
            return Err(e);
        }
        if done {
            return Ok(());
        }
    }
}

/// The delivery task: every `delivery_interval_ms`, tries every target with queued hints.
pub async fn run(node: Arc<Node>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let every = Duration::from_millis(node.hints.delivery_interval_ms().max(10));
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return,
            // A member came back: hand its hints over now, not at the next tick.
            _ = node.member_returned.notified() => {}
            _ = tick.tick() => {}
        }
        let depths = node.hints.depths();
        for (target, d) in &depths {
            node.metrics
                .hint_queue_depth
                .with_label_values(&[target.as_str()])
                .set(d.count as i64);
            // Gossip says it is away: its hints wait until gossip sees it back.
            if d.count == 0 || waits_for(&node, target) {
                continue;
            }
            if let Err(e) = deliver_to(&node, target).await {
                tracing::debug!(%target, error = %e, "hint delivery paused");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hint_keys_split_back_into_target_and_stored_key() {
        let target = NodeId::new("kv-2").unwrap();
        let stored = crate::node::data_key(b"cart:1");
        let k = hint_key(&target, &stored);
        assert_eq!(split_hint_key(&k), Some(("kv-2", stored.as_slice())));
    }

    #[test]
    fn hints_of_one_target_sort_together_and_before_longer_names() {
        let a = NodeId::new("n1").unwrap();
        let b = NodeId::new("n10").unwrap();
        let mut keys = [
            hint_key(&b, &crate::node::data_key(b"x")),
            hint_key(&a, &crate::node::data_key(b"z")),
            hint_key(&a, &crate::node::data_key(b"y")),
        ];
        keys.sort();
        assert!(keys[0].starts_with(&hint_key(&a, &[])));
        assert!(keys[1].starts_with(&hint_key(&a, &[])));
        assert!(!keys[2].starts_with(&hint_key(&a, &[])));
    }

    #[test]
    fn values_carry_their_creation_time() {
        let mut v = 42u64.to_be_bytes().to_vec();
        v.extend_from_slice(b"clock");
        assert_eq!(split_value(&v), Some((42, b"clock".as_slice())));
        assert_eq!(split_value(b"short"), None);
    }
}
