//! Membership change in the node: the shell of [`dynakv_core::transition`].
//!
//! One task follows the view (every gossip snapshot, and a short tick for what changes without
//! one: requests draining, a handoff finishing). Each step it works out what only this node
//! knows ([`LocalProgress`]: whether the requests it started before it saw the change have
//! finished, whether its handoff is complete and durable, whether its reads moved to the new
//! ring and the older ones finished, whether it still holds hints, which removals it was asked
//! for), asks the engine for the metadata it should gossip next, and gossips it. It starts the
//! handoff ([`crate::handoff`]) once every participant writes to both rings, and after a change
//! commits it drops the keys it holds in no live ring.
//!
//! What must survive a restart is in the `Meta` table: this node's own ring metadata (weight,
//! tokens, lifecycle, target, proposal, removed members), the last committed ring (so that a
//! cluster restarted without some member keeps that member's place), and the removals an admin
//! asked this node for.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dynakv_core::NodeId;
use dynakv_core::hash::key_position;
use dynakv_core::membership::{ChangeKind, Lifecycle, NodeMetadata};
use dynakv_core::ring::NodeSpec;
use dynakv_core::transition::{LocalProgress, Phase};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::handoff::{self, Live};
use crate::node::{Node, split_data_key};
use crate::storage::{ScanLimit, StorageError, Store, Table, data_key};

const METADATA_KEY: &[u8] = b"ring.own_metadata";
const COMMITTED_RING_KEY: &[u8] = b"ring.committed";
const REMOVALS_KEY: &[u8] = b"ring.remove_requests";
const AWAITED_CHANGE_KEY: &[u8] = b"ring.awaited_change";

/// How often the driver looks again without a gossip event.
const TICK: Duration = Duration::from_millis(100);
/// Least time between two sweeps for keys held in no live ring when the sweep is due to stray
/// writes (late replica writes from coordinators whose view lagged) rather than to a commit.
const STRAY_SWEEP_SPACING: Duration = Duration::from_secs(5);

/// This node's own ring metadata as last gossiped, if it was ever recorded.
pub fn load_metadata(store: &Store) -> Option<NodeMetadata> {
    let bytes = store.get(Table::Meta, METADATA_KEY).ok()??;
    serde_json::from_slice(&bytes).ok()
}

pub async fn save_metadata(store: &Store, meta: &NodeMetadata) -> Result<(), StorageError> {
    store
        .put(Table::Meta, METADATA_KEY.to_vec(), encode(meta)?)
        .await
}

/// The committed ring this node last knew, if any: the place of members gossip has not heard
/// of since this node started.
pub fn load_committed_ring(store: &Store) -> Option<Vec<NodeSpec>> {
    let bytes = store.get(Table::Meta, COMMITTED_RING_KEY).ok()??;
    serde_json::from_slice(&bytes).ok()
}

/// The ring change this node must hear the fate of before it acts on its view (see
/// `Node::wait_for_cluster`): the one its last gossiped metadata acked, or, when it stopped
/// again before it heard, the one it was waiting for then. Recorded until it has heard.
pub async fn record_awaited_change(store: &Store) -> Result<Option<u64>, StorageError> {
    let recorded = store
        .get(Table::Meta, AWAITED_CHANGE_KEY)?
        .and_then(|b| serde_json::from_slice::<u64>(&b).ok());
    let awaited = load_metadata(store)
        .and_then(|m| m.change.ack.map(|a| a.change))
        .or(recorded);
    if let Some(id) = awaited
        && recorded != Some(id)
    {
        store
            .put(Table::Meta, AWAITED_CHANGE_KEY.to_vec(), encode(&id)?)
            .await?;
    }
    Ok(awaited)
}

/// Removals an admin asked this node for.
pub fn load_removals(store: &Store) -> Vec<NodeId> {
    store
        .get(Table::Meta, REMOVALS_KEY)
        .ok()
        .flatten()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

pub async fn save_removals(store: &Store, removals: &[NodeId]) -> Result<(), StorageError> {
    store
        .put(Table::Meta, REMOVALS_KEY.to_vec(), encode(&removals)?)
        .await
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StorageError> {
    serde_json::to_vec(value).map_err(|e| StorageError::Corrupt {
        detail: format!("ring state does not encode: {e}"),
    })
}

/// What the admin service reads: this node's handoff, and serialises admin changes.
#[derive(Default)]
pub struct Rebalance {
    /// The handoff of the change under way, as this node receives it.
    pub live: Arc<Mutex<Live>>,
    /// Admin requests that change this node's metadata run one at a time.
    pub admin: tokio::sync::Mutex<()>,
    /// Woken by an admin change, so the driver acts on it at once.
    pub wake: tokio::sync::Notify,
}

/// What the driver remembers between steps.
#[derive(Default)]
struct Driver {
    /// View seq at which each change became visible here; and at which reads moved to it.
    visible_since: BTreeMap<u64, (u64, Instant)>,
    reading_since: BTreeMap<u64, u64>,
    /// The change whose handoff is running, and the task.
    handoff: Option<(u64, JoinHandle<Result<(), StorageError>>)>,
    synced: Option<u64>,
    committed_version: Option<u64>,
    dropping: Option<JoinHandle<()>>,
    drop_due: bool,
    /// A stray write was seen: sweep again, at most once per [`STRAY_SWEEP_SPACING`].
    stray_due: bool,
    last_sweep: Option<Instant>,
    /// The record of a change this node awaited at its start is gone.
    awaited_cleared: bool,
}

/// Runs the driver until `stop`.
pub async fn run(node: Arc<Node>, rebalance: Arc<Rebalance>, mut stop: watch::Receiver<bool>) {
    let mut driver = Driver::default();
    let mut snapshots = node.gossip.subscribe();
    loop {
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            _ = snapshots.changed() => {}
            _ = rebalance.wake.notified() => {}
            _ = tokio::time::sleep(TICK) => {}
        }
        // Let the gossip follower install the view of this snapshot first.
        tokio::task::yield_now().await;
        if let Err(e) = step(&node, &rebalance, &mut driver).await {
            tracing::warn!(error = %e, "ring change step failed; retrying");
        }
    }
    if let Some((_, task)) = driver.handoff.take() {
        task.abort();
    }
    if let Some(task) = driver.dropping.take() {
        task.abort();
    }
}

async fn step(node: &Arc<Node>, rebalance: &Rebalance, d: &mut Driver) -> Result<(), StorageError> {
    let view = node.view();
    if !node.may_ack(&view) {
        // Its view may be a ring of its own, or miss a change it acked before it restarted
        // (see `Node::wait_for_cluster`): no proposal, ack or sweep on it.
        return Ok(());
    }
    let rings = &view.rings;
    let n = node.n();
    let mut progress = LocalProgress::default();
    let current = rings.current().cloned();
    if let Some(change) = &current {
        let (since, _) = *d
            .visible_since
            .entry(change.id)
            .or_insert((view.seq, Instant::now()));
        if node.drained_before(since) {
            progress.writes_drained = Some(change.id);
        }
        let gains = rings.gains(n);
        if gains.is_empty() || d.synced == Some(change.id) {
            progress.synced = Some(change.id);
        } else if rings.phase() >= Some(Phase::Streaming) {
            poll_handoff(
                node,
                rebalance,
                d,
                change.id,
                gains,
                change.proposal.kind,
                &change.proposal.subject,
            );
            if d.synced == Some(change.id) {
                progress.synced = Some(change.id);
            }
        }
        if rings.read_ring().version() == change.ring.version() {
            let since = *d.reading_since.entry(change.id).or_insert(view.seq);
            if node.drained_before(since) {
                progress.reads_drained = Some(change.id);
            }
        } else {
            // Reads went back to another ring (a removal overtook the change, which runs again
            // under the same id when the removed member owned nothing): reads started since
            // must drain again before this node acks reading from the change.
            d.reading_since.remove(&change.id);
        }
    } else if let Some((_, task)) = d.handoff.take() {
        task.abort();
    }
    // Forget what concerns changes no longer visible.
    let visible: Vec<u64> = rings.changes().iter().map(|c| c.id).collect();
    d.visible_since.retain(|id, _| visible.contains(id));
    d.reading_since.retain(|id, _| visible.contains(id));
    if d.handoff
        .as_ref()
        .is_some_and(|(id, _)| Some(*id) != current.as_ref().map(|c| c.id))
        && let Some((_, task)) = d.handoff.take()
    {
        task.abort();
    }

    progress.holds_hints = node.hints.depths().iter().any(|(_, q)| q.count > 0);
    let mut removals = load_removals(&node.store);
    if removals.iter().any(|r| rings.removed().contains(r)) {
        removals.retain(|r| !rings.removed().contains(r));
        save_removals(&node.store, &removals).await?;
    }
    progress.remove_requested = removals;

    {
        let _one = rebalance.admin.lock().await;
        let snapshot = node.gossip.snapshot();
        if let Some(me) = snapshot.get(&node.id) {
            let raw = &node.config.raw.replication;
            if let Some(next) = rings.next_metadata(&me.metadata, &progress, raw.vnodes_per_node, n)
            {
                note_commit(node, &me.metadata, &next);
                save_metadata(&node.store, &next).await?;
                if let Err(e) = node.gossip.set_metadata(next).await {
                    tracing::warn!(error = %e, "could not gossip this node's ring metadata");
                }
            }
        }
    }

    if !node.has_heard_from_cluster() {
        // Acks only, while a restarted node learns what became of its change.
        return Ok(());
    }
    if !d.awaited_cleared {
        if node.store.get(Table::Meta, AWAITED_CHANGE_KEY)?.is_some() {
            node.store
                .delete(Table::Meta, AWAITED_CHANGE_KEY.to_vec())
                .await?;
        }
        d.awaited_cleared = true;
    }
    // A new committed ring: remember it, and drop what this node holds in no live ring.
    if d.committed_version != Some(view.ring.version()) {
        node.store
            .put(
                Table::Meta,
                COMMITTED_RING_KEY.to_vec(),
                encode(&view.ring.nodes().to_vec())?,
            )
            .await?;
        d.committed_version = Some(view.ring.version());
        d.drop_due = true;
    }
    if node.take_stray_writes() {
        d.stray_due = true;
    }
    let stray_sweep = d.stray_due
        && d.last_sweep
            .is_none_or(|at| at.elapsed() >= STRAY_SWEEP_SPACING);
    if (d.drop_due || stray_sweep)
        && d.dropping.as_ref().is_none_or(|t| t.is_finished())
        && rings.changes().is_empty()
    {
        d.drop_due = false;
        d.stray_due = false;
        d.last_sweep = Some(Instant::now());
        let node = node.clone();
        d.dropping = Some(tokio::spawn(async move {
            match drop_unowned(&node).await {
                Ok(0) => {}
                Ok(keys) => tracing::info!(keys, "dropped keys this node no longer replicates"),
                Err(e) => {
                    tracing::warn!(error = %e, "could not drop keys this node no longer replicates")
                }
            }
        }));
    }
    // Late replica writes of keys this node holds in no live ring: drop them now, one by one,
    // rather than at the next full sweep.
    if d.dropping.as_ref().is_none_or(|t| t.is_finished()) && rings.changes().is_empty() {
        let keys = node.take_stray_keys();
        if !keys.is_empty() {
            let node = node.clone();
            d.dropping = Some(tokio::spawn(async move {
                match drop_stray(&node, keys).await {
                    Ok(0) => {}
                    Ok(keys) => tracing::info!(
                        keys,
                        "dropped late writes of keys this node no longer replicates"
                    ),
                    Err(e) => tracing::warn!(error = %e, "could not drop late writes"),
                }
            }));
        }
    }
    node.metrics
        .ring_versions_live
        .set(rings.write_rings().len() as i64);
    Ok(())
}

/// Deletes each of `keys` this node still holds in no live ring (each only if unchanged since
/// it was read). A change that appears meanwhile hands the rest back for later.
async fn drop_stray(node: &Node, keys: Vec<Vec<u8>>) -> Result<u64, StorageError> {
    let n = node.n();
    let mut dropped = 0u64;
    let mut keys = keys.into_iter();
    while let Some(key) = keys.next() {
        let view = node.view();
        if !view.rings.changes().is_empty() {
            node.note_stray(key);
            keys.for_each(|k| node.note_stray(k));
            break;
        }
        if view.rings.holds(key_position(&key), n) {
            continue;
        }
        let purged = match node.store.get(Table::Data, &data_key(&key)) {
            Ok(None) => Ok(false),
            Ok(Some(value)) => {
                node.purge_local(&key, dynakv_core::hash::hash128(&value))
                    .await
            }
            Err(e) => Err(e),
        };
        match purged {
            Ok(true) => {
                dropped += 1;
                node.metrics.handoff_dropped_keys.inc();
            }
            Ok(false) => {}
            Err(e) => {
                // Nothing is forgotten: this key and the rest wait for the next try.
                node.note_stray(key);
                keys.for_each(|k| node.note_stray(k));
                return Err(e);
            }
        }
    }
    Ok(dropped)
}

/// Starts the handoff of `change` if it is not running, and notes when it finished.
fn poll_handoff(
    node: &Arc<Node>,
    rebalance: &Rebalance,
    d: &mut Driver,
    change: u64,
    gains: Vec<dynakv_core::ring::Handoff>,
    kind: ChangeKind,
    subject: &NodeId,
) {
    match &d.handoff {
        Some((id, task)) if *id == change && task.is_finished() => {
            let Some((_, task)) = d.handoff.take() else {
                return;
            };
            // A finished task's result is ready: `now_or_never` does not wait.
            match futures::FutureExt::now_or_never(task) {
                Some(Ok(Ok(()))) => {
                    d.synced = Some(change);
                    if let Some((_, started)) = d.visible_since.get(&change) {
                        node.metrics
                            .handoff_seconds
                            .observe(started.elapsed().as_secs_f64());
                    }
                    tracing::info!(
                        change = format!("{change:016x}"),
                        "handoff complete: every gained range is held here"
                    );
                }
                Some(Ok(Err(e))) => {
                    tracing::error!(error = %e, "handoff stopped on a storage failure");
                }
                _ => {}
            }
        }
        Some((id, _)) if *id == change => {}
        _ => {
            let excluded = if kind == ChangeKind::Remove {
                vec![subject.clone()]
            } else {
                Vec::new()
            };
            tracing::info!(
                change = format!("{change:016x}"),
                ranges = gains.len(),
                "handoff starting: pulling the ranges this node gains"
            );
            let task = tokio::spawn(handoff::run(
                node.clone(),
                node.config.raw.handoff.clone(),
                change,
                gains,
                excluded,
                rebalance.live.clone(),
            ));
            d.handoff = Some((change, task));
        }
    }
}

/// Logs and counts a change this node commits.
fn note_commit(node: &Node, before: &NodeMetadata, after: &NodeMetadata) {
    let Some(p) = &before.change.proposal else {
        return;
    };
    if after.change.proposal.is_some() {
        return;
    }
    let committed = match p.kind {
        ChangeKind::Remove => after.change.removed.contains(&p.subject),
        ChangeKind::Leave => after.tokens.is_empty() && after.weight == 0,
        ChangeKind::Weight => after.weight == p.weight && after.tokens == p.tokens,
    };
    if committed {
        node.metrics
            .ring_changes
            .with_label_values(&[p.kind.as_str()])
            .inc();
        tracing::info!(
            kind = p.kind.as_str(),
            subject = %p.subject,
            weight = p.weight,
            lifecycle = %after.lifecycle,
            "ring change committed"
        );
    } else {
        tracing::info!(kind = p.kind.as_str(), subject = %p.subject, "ring change withdrawn (made against an older ring)");
    }
}

/// Deletes every key this node replicates in no live ring (each only if unchanged since it was
/// read). Returns how many it deleted.
///
/// Stored keys are ordered by ring position, so only the ranges this node does not replicate
/// are read: the scan meets the keys to delete and nothing else, instead of reading every value
/// stored here (which, right after a commit, every node does at once while serving clients).
/// Paced like the handoff that moved them (`handoff.max_bytes_per_sec`, bytes of the values
/// deleted) and at most `handoff.max_drop_keys_per_sec` keys a second: every old owner has its
/// whole share of the moved ranges to delete, each delete is a write through the storage writer
/// clients use, and nothing is urgent about it (the keys are served by their new owners).
async fn drop_unowned(node: &Node) -> Result<u64, StorageError> {
    let n = node.n();
    let ranges = {
        let view = node.view();
        // A change is under way: the next commit drops.
        if !view.rings.changes().is_empty() {
            return Ok(0);
        }
        dynakv_core::ring::foreign_ranges(view.rings.committed(), n, &node.id)
    };
    let bytes_pacer = handoff::Pacer::new(node.config.raw.handoff.max_bytes_per_sec);
    let keys_pacer = handoff::Pacer::new(node.config.raw.handoff.max_drop_keys_per_sec);
    let mut dropped = 0u64;
    // Keys and bytes deleted by the page before, paced before the next one: nothing waits
    // after the last page, so a short sweep ends at once.
    let (mut unpaced_keys, mut unpaced) = (0u64, 0u64);
    for (start, end) in ranges {
        let mut after: Vec<u8> = Vec::new();
        loop {
            bytes_pacer.pace(std::mem::take(&mut unpaced)).await;
            keys_pacer.pace(std::mem::take(&mut unpaced_keys)).await;
            let page =
                handoff::scan_range(&node.store, start, end, &after, ScanLimit::entries(1024))?;
            let view = node.view();
            // A change appeared meanwhile: stop; the next commit drops again.
            if !view.rings.changes().is_empty() {
                return Ok(dropped);
            }
            // A page's deletes go to the writer together, so that they share its group commits
            // instead of waiting for one fsync each.
            let mut purges = futures::stream::FuturesUnordered::new();
            for (key, value) in &page.entries {
                let Some((pos, client_key)) = split_data_key(key) else {
                    continue;
                };
                if view.rings.holds(pos, n) {
                    continue;
                }
                let digest = dynakv_core::hash::hash128(value);
                let bytes = (key.len() + value.len()) as u64;
                purges.push(futures::TryFutureExt::map_ok(
                    node.purge_local(client_key, digest),
                    move |purged| purged.then_some(bytes),
                ));
            }
            while let Some(purged) = futures::StreamExt::next(&mut purges).await {
                if let Some(bytes) = purged? {
                    dropped += 1;
                    unpaced_keys += 1;
                    unpaced += bytes;
                    node.metrics.handoff_dropped_keys.inc();
                }
            }
            match page.next {
                Some(k) => after = k,
                None => break,
            }
        }
        // Between ranges, most of which hold nothing to read: give the worker back.
        tokio::task::yield_now().await;
    }
    Ok(dropped)
}

/// The metadata this node starts with: what it last gossiped (kept across restarts), or, on
/// its first start, the configured weight with the tokens the configured ring gives it.
pub fn initial_metadata(
    store: &Store,
    configured_weight: u32,
    zone: Option<String>,
    configured_tokens: Vec<u64>,
) -> NodeMetadata {
    match load_metadata(store) {
        Some(mut meta) => {
            meta.zone = zone;
            meta.change.ack = None;
            meta
        }
        None => NodeMetadata {
            weight: if configured_tokens.is_empty() {
                0
            } else {
                configured_weight
            },
            zone,
            lifecycle: if configured_tokens.is_empty() {
                Lifecycle::Joining
            } else {
                Lifecycle::Normal
            },
            tokens: configured_tokens.clone(),
            change: dynakv_core::membership::ChangeState {
                // A node that starts without a place in the configured ring joins at weight 0
                // and moves to its configured weight through a ring change.
                target_weight: (configured_tokens.is_empty() && configured_weight > 0)
                    .then_some(configured_weight),
                ..Default::default()
            },
        },
    }
}
