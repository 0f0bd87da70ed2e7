//! Merkle anti-entropy (DESIGN.md section 6).
//!
//! Every node keeps one Merkle tree per peer over exactly the keys the two of them replicate
//! (both are in the key's preference list), updated on every local write. Two replicas hold
//! identical copies of their shared keys exactly when `root(a, b) == root(b, a)`. A background
//! task compares each tree with the peer's, descends only into differing subtrees
//! (`DiffSession`), lists the (key, digest) pairs of each differing segment on both sides, and
//! syncs only the differing keys both ways. It is rate limited (keys/s, bytes/s) so it never
//! starves client traffic, and it runs at once for a peer that comes back or whose hints were
//! dropped (targeted exchange of just the affected segments).
//!
//! Trees live in memory, are rebuilt from storage at start (one scan) and follow ring changes
//! mostly without reading storage (`trees.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dynakv_core::NodeId;
use dynakv_core::dvvset::Clock;
use dynakv_core::hash::hash128;
use dynakv_core::merkle::{
    DiffRequest, DiffSession, DiffStep, LevelSlice, MerkleError, MerkleTree,
};
use tokio::time::Instant;

use crate::node::{Node, split_data_key};
use crate::proto::{
    DigestsRequest, DigestsResponse, FetchRequest, KeyDigest, MerkleRequest, StoreRequest,
    replica_request, replica_response,
};
use crate::storage::{ScanLimit, StorageError, Table};

pub use crate::config::AntiEntropyConfig;
pub use crate::trees::Trees;

/// Most segments one exchange repairs; the rest wait for the next round.
const MAX_SEGMENTS_PER_EXCHANGE: usize = 256;
/// Entries per digests page.
const DIGESTS_PAGE: usize = 1024;

/// Why an exchange stopped. Labels are metric labels.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("peer: {0}")]
    Peer(#[from] crate::peer::PeerError),
    #[error("merkle: {0}")]
    Merkle(#[from] MerkleError),
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("peer answered with an error: {0}")]
    Remote(String),
}

impl ExchangeError {
    pub fn label(&self) -> &'static str {
        match self {
            ExchangeError::Peer(_) => "unreachable",
            ExchangeError::Merkle(_) => "protocol",
            ExchangeError::Storage(_) => "storage",
            ExchangeError::Remote(_) => "remote",
        }
    }
}

/// A token bucket per second for keys and bytes.
struct RateLimit {
    keys_per_sec: u64,
    bytes_per_sec: u64,
    window_start: Instant,
    keys: u64,
    bytes: u64,
}

impl RateLimit {
    fn new(cfg: &AntiEntropyConfig) -> Self {
        RateLimit {
            keys_per_sec: cfg.max_keys_per_sec.max(1),
            bytes_per_sec: cfg.max_bytes_per_sec.max(1),
            window_start: Instant::now(),
            keys: 0,
            bytes: 0,
        }
    }

    async fn take(&mut self, keys: u64, bytes: u64) {
        if self.window_start.elapsed() >= Duration::from_secs(1) {
            self.window_start = Instant::now();
            self.keys = 0;
            self.bytes = 0;
        }
        if self.keys >= self.keys_per_sec || self.bytes >= self.bytes_per_sec {
            tokio::time::sleep_until(self.window_start + Duration::from_secs(1)).await;
            self.window_start = Instant::now();
            self.keys = 0;
            self.bytes = 0;
        }
        self.keys += keys;
        self.bytes += bytes;
    }
}

/// Serves a peer's Merkle level request against our tree of keys shared with it.
pub fn handle_merkle(
    node: &Node,
    peer: &NodeId,
    req: &MerkleRequest,
) -> Result<Bytes, MerkleError> {
    let request = DiffRequest::decode(&req.request)?;
    let slice = node.trees.answer(peer, &request)?;
    let mut out = Vec::new();
    slice.encode(&mut out);
    Ok(out.into())
}

/// The stored key range of one segment: stored keys start with the 8-byte big-endian position.
pub(crate) fn segment_bounds(
    tree: &MerkleTree,
    segment: u32,
) -> Option<(Vec<u8>, Option<Vec<u8>>)> {
    let (lo, hi) = tree.segment_range(segment)?;
    let end = hi.checked_add(1).map(|e| e.to_be_bytes().to_vec());
    Some((lo.to_be_bytes().to_vec(), end))
}

/// A page of (stored key, version digest) pairs, and whether more follow.
pub type DigestPage = (Vec<(Vec<u8>, u128)>, bool);

/// (stored key, digest) of the keys of one segment that this node shares with `peer`, after
/// `after`, at most `limit`.
pub fn local_digests(
    node: &Node,
    peer: &NodeId,
    segment: u32,
    after: &[u8],
    limit: usize,
) -> Result<DigestPage, StorageError> {
    let tree = MerkleTree::new(node.trees.leaf_bits()).map_err(|e| StorageError::Corrupt {
        detail: e.to_string(),
    })?;
    let Some((lo, hi)) = segment_bounds(&tree, segment) else {
        return Ok((Vec::new(), false));
    };
    let from = if after.is_empty() {
        Bound::Included(lo.as_slice())
    } else {
        Bound::Excluded(after)
    };
    let to = match &hi {
        Some(h) => Bound::Excluded(h.as_slice()),
        None => Bound::Unbounded,
    };
    let mut out = Vec::new();
    let mut cursor: Option<Vec<u8>> = None;
    loop {
        let from_now = match &cursor {
            Some(c) => Bound::Excluded(c.as_slice()),
            None => from,
        };
        let page = node
            .store
            .scan(Table::Data, from_now, to, ScanLimit::entries(limit))?;
        for (k, v) in &page.entries {
            if split_data_key(k).is_some_and(|(pos, _)| node.trees.shares(pos, peer)) {
                out.push((k.clone(), hash128(v)));
            }
        }
        if out.len() >= limit {
            let more = page.next.is_some() || out.len() > limit;
            out.truncate(limit);
            return Ok((out, more));
        }
        match page.next {
            Some(n) => cursor = Some(n),
            None => return Ok((out, false)),
        }
    }
}

pub fn handle_digests(
    node: &Node,
    peer: &NodeId,
    req: &DigestsRequest,
) -> Result<DigestsResponse, StorageError> {
    if req.leaf_bits != u32::from(node.trees.leaf_bits()) {
        return Err(StorageError::Corrupt {
            detail: format!(
                "peer uses {} leaf bits, this node {}",
                req.leaf_bits,
                node.trees.leaf_bits()
            ),
        });
    }
    let (entries, more) = local_digests(node, peer, req.segment, &req.after, DIGESTS_PAGE)?;
    Ok(DigestsResponse {
        entries: entries
            .into_iter()
            .map(|(key, d)| KeyDigest {
                key: key.into(),
                digest: Bytes::copy_from_slice(&d.to_le_bytes()),
            })
            .collect(),
        more,
    })
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

async fn remote_digests(
    node: &Node,
    peer: &NodeId,
    segment: u32,
) -> Result<BTreeMap<Vec<u8>, u128>, ExchangeError> {
    let mut out = BTreeMap::new();
    let mut after = Bytes::new();
    loop {
        let op = replica_request::Op::Digests(DigestsRequest {
            leaf_bits: u32::from(node.trees.leaf_bits()),
            segment,
            after: after.clone(),
        });
        let resp = match node.peers.call(peer, op, deadline()).await? {
            replica_response::Result::Digests(d) => d,
            replica_response::Result::Error(e) => return Err(ExchangeError::Remote(e.message)),
            _ => return Err(ExchangeError::Remote("unexpected reply".into())),
        };
        for e in &resp.entries {
            let digest: [u8; 16] = e
                .digest
                .as_ref()
                .try_into()
                .map_err(|_| ExchangeError::Remote("digest is not 16 bytes".into()))?;
            out.insert(e.key.to_vec(), u128::from_le_bytes(digest));
        }
        match (resp.more, resp.entries.last()) {
            (true, Some(last)) => after = last.key.clone(),
            _ => return Ok(out),
        }
    }
}

/// Syncs one differing key both ways.
async fn repair_key(
    node: &Node,
    peer: &NodeId,
    stored_key: &[u8],
    limit: &mut RateLimit,
) -> Result<(), ExchangeError> {
    let Some((_, key)) = split_data_key(stored_key) else {
        return Ok(());
    };
    let key = Bytes::copy_from_slice(key);
    let remote = match node
        .peers
        .call(
            peer,
            replica_request::Op::Fetch(FetchRequest {
                key: key.clone(),
                hint_for: String::new(),
            }),
            deadline(),
        )
        .await?
    {
        replica_response::Result::Fetch(f) if f.clock.is_empty() => None,
        replica_response::Result::Fetch(f) => Some(
            Clock::decode(&f.clock)
                .map_err(|e| ExchangeError::Remote(format!("bad clock: {e}")))?,
        ),
        replica_response::Result::Error(e) => return Err(ExchangeError::Remote(e.message)),
        _ => return Err(ExchangeError::Remote("unexpected reply".into())),
    };
    let local = node.read_local(&key)?;
    let merged = match (&local, &remote) {
        (Some(l), Some(r)) => l.sync(r),
        (Some(l), None) => l.clone(),
        (None, Some(r)) => r.clone(),
        (None, None) => return Ok(()),
    };
    let merged = node.resolve(merged);
    let encoded = merged.to_bytes();
    limit.take(1, encoded.len() as u64).await;
    node.metrics.ae_keys_repaired.inc();
    if local.as_ref().map(Clock::to_bytes).as_deref() != Some(encoded.as_slice()) {
        node.merge_local(key.to_vec(), merged.clone()).await?;
    }
    if remote.as_ref().map(Clock::to_bytes).as_deref() != Some(encoded.as_slice()) {
        node.metrics.ae_bytes_sent.inc_by(encoded.len() as u64);
        match node
            .peers
            .call(
                peer,
                replica_request::Op::Store(StoreRequest {
                    key,
                    clock: encoded.into(),
                    hint_for: String::new(),
                }),
                deadline(),
            )
            .await?
        {
            replica_response::Result::Store(_) => {}
            replica_response::Result::Error(e) => return Err(ExchangeError::Remote(e.message)),
            _ => return Err(ExchangeError::Remote("unexpected reply".into())),
        }
    }
    Ok(())
}

/// Compares the keys of the given segments with the peer and repairs every difference.
async fn repair_segments(
    node: &Node,
    peer: &NodeId,
    segments: impl IntoIterator<Item = u32>,
    limit: &mut RateLimit,
) -> Result<usize, ExchangeError> {
    let mut repaired = 0;
    for segment in segments {
        let remote = remote_digests(node, peer, segment).await?;
        let mut local = BTreeMap::new();
        let mut after = Vec::new();
        loop {
            let (page, more) = local_digests(node, peer, segment, &after, DIGESTS_PAGE)?;
            if let Some((last, _)) = page.last() {
                after = last.clone();
            }
            local.extend(page);
            if !more {
                break;
            }
        }
        let keys: BTreeSet<&Vec<u8>> = local.keys().chain(remote.keys()).collect();
        for k in keys {
            if local.get(k) != remote.get(k) {
                repair_key(node, peer, k, limit).await?;
                repaired += 1;
            }
        }
    }
    Ok(repaired)
}

/// One exchange with `peer`: Merkle diff, then repair of the differing segments.
async fn exchange(
    node: &Node,
    peer: &NodeId,
    limit: &mut RateLimit,
) -> Result<usize, ExchangeError> {
    let local = node.trees.snapshot(peer);
    let (mut session, mut request) = DiffSession::start(&local);
    let segments = loop {
        let mut buf = Vec::new();
        request.encode(&mut buf);
        let op = replica_request::Op::Merkle(MerkleRequest {
            request: buf.into(),
        });
        let slice = match node.peers.call(peer, op, deadline()).await? {
            replica_response::Result::Merkle(m) => LevelSlice::decode(&m.slice)?,
            replica_response::Result::Error(e) => return Err(ExchangeError::Remote(e.message)),
            _ => return Err(ExchangeError::Remote("unexpected reply".into())),
        };
        match session.handle_reply(&local, &slice)? {
            DiffStep::SendRequest(next) => request = next,
            DiffStep::Finished(segments) => break segments,
        }
    };
    if segments.len() > MAX_SEGMENTS_PER_EXCHANGE {
        // The rest is picked up by the next round (the trees still differ there).
        tracing::info!(%peer, differing = segments.len(), "large divergence; repairing in rounds");
    }
    repair_segments(
        node,
        peer,
        segments.into_iter().take(MAX_SEGMENTS_PER_EXCHANGE),
        limit,
    )
    .await
}

/// The background task: a full round over every peer each `interval`, and targeted exchanges
/// for queued peers every second. Ends when `stop` resolves.
pub async fn run(node: Arc<Node>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let cfg = node.config.raw.anti_entropy.clone();
    if !cfg.enabled {
        return;
    }
    let mut limit = RateLimit::new(&cfg);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut next_full = Instant::now() + Duration::from_millis(cfg.interval_ms);
    loop {
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        for peer in node.trees.queued_peers() {
            // Away by gossip's account: its queue waits until gossip sees it back.
            if node.is_down(&peer) {
                continue;
            }
            let Some(what) = node.trees.take_queued(&peer) else {
                continue;
            };
            let result = match &what {
                Some(segments) => {
                    repair_segments(&node, &peer, segments.iter().copied(), &mut limit).await
                }
                None => exchange(&node, &peer, &mut limit).await,
            };
            node.metrics
                .observe_exchange(result.as_ref().map_or_else(|e| e.label(), |_| "ok"));
            if result.is_err() {
                node.trees.requeue(&peer, what);
            }
        }
        if Instant::now() < next_full {
            continue;
        }
        let started = Instant::now();
        let peers: Vec<NodeId> = node
            .view()
            .members
            .iter()
            .map(|m| m.id.clone())
            .filter(|id| *id != node.id)
            .collect();
        let mut complete = true;
        for peer in peers {
            if *stop.borrow() {
                return;
            }
            if node.is_down(&peer) {
                // Exchanged with as soon as it is back (Node::apply_membership queues it).
                complete = false;
                continue;
            }
            let result = exchange(&node, &peer, &mut limit).await;
            complete &= result.is_ok();
            if let Err(e) = &result {
                tracing::debug!(%peer, error = %e, "anti-entropy exchange failed");
            }
            node.metrics
                .observe_exchange(result.as_ref().map_or_else(|e| e.label(), |_| "ok"));
        }
        if complete {
            node.metrics
                .ae_last_cycle_seconds
                .set(started.elapsed().as_secs_f64());
        }
        next_full = Instant::now() + Duration::from_millis(cfg.interval_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trees::MAX_QUEUED_SEGMENTS;

    fn id(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    #[test]
    fn the_same_writes_in_any_order_give_equal_roots() {
        let ring = dynakv_core::ring::Ring::new(vec![
            dynakv_core::ring::NodeSpec {
                id: id("me"),
                weight: 100,
                zone: None,
                tokens: vec![1 << 62],
            },
            dynakv_core::ring::NodeSpec {
                id: id("p"),
                weight: 100,
                zone: None,
                tokens: vec![3 << 62],
            },
        ])
        .unwrap();
        let map = || crate::trees::PeerMap::new(&ring, 2, &id("me"));
        let a = Trees::new(8).unwrap();
        let b = Trees::new(8).unwrap();
        a.reset(map());
        b.reset(map());
        let k1 = crate::node::data_key(b"k1");
        let k2 = crate::node::data_key(b"k2");
        a.record(&k1, None, Some(b"v1"));
        a.record(&k2, None, Some(b"v2"));
        a.record(&k1, Some(b"v1"), Some(b"v3"));
        b.record(&k2, None, Some(b"v2"));
        b.record(&k1, None, Some(b"v3"));
        assert_eq!(a.roots(), b.roots());
        assert_eq!(a.roots().len(), 1, "one tree, for p");
        b.record(&k2, Some(b"v2"), None);
        assert_ne!(a.roots(), b.roots(), "a deletion changes the root");
    }

    #[test]
    fn queued_segments_collapse_to_a_full_exchange_past_the_bound() {
        let t = Trees::new(12).unwrap();
        let p = id("p");
        t.queue(&p, Some(1));
        t.queue(&p, Some(2));
        assert_eq!(t.take_queued(&p), Some(Some(BTreeSet::from([1, 2]))));
        for s in 0..=MAX_QUEUED_SEGMENTS as u32 {
            t.queue(&p, Some(s));
        }
        assert_eq!(t.take_queued(&p), Some(None));
        assert_eq!(t.take_queued(&p), None);
    }

    #[test]
    fn a_failed_targeted_exchange_is_requeued_with_what_came_meanwhile() {
        let t = Trees::new(12).unwrap();
        let p = id("p");
        t.queue(&p, Some(7));
        let taken = t.take_queued(&p).unwrap();
        t.queue(&p, Some(9));
        t.requeue(&p, taken);
        assert_eq!(t.take_queued(&p), Some(Some(BTreeSet::from([7, 9]))));
    }

    #[test]
    fn segment_bounds_cover_the_first_and_last_segment() {
        let tree = MerkleTree::new(4).unwrap();
        let (lo, hi) = segment_bounds(&tree, 0).unwrap();
        assert_eq!(lo, 0u64.to_be_bytes());
        assert_eq!(hi, Some((1u64 << 60).to_be_bytes().to_vec()));
        let (_, hi) = segment_bounds(&tree, 15).unwrap();
        assert_eq!(
            hi, None,
            "the last segment runs to the end of the key space"
        );
    }
}
