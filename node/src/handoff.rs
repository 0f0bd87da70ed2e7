//! Ring-change handoff: a node that gains ranges in the change under way pulls them from their
//! old replicas (DESIGN.md section 7; the protocol is [`dynakv_core::transition`]).
//!
//! For each gained range: a **stream** of every key with its clock from one old replica
//! (`Replica.Pull`, pages of bounded entries and bytes, HTTP/2 flow control bounding what is in
//! flight), each page merged into local storage (DVVSet sync, durable) before the cursor that
//! follows it is recorded durably; then a **Merkle catch-up** with every other old replica: both
//! sides hash the range's 2^`summary_bits` sub-ranges (the XOR of their entries' `(key, version
//! digest)` hashes), and each sub-range that differs is pulled in full and merged. The catch-up
//! closes the gap a single source leaves: a write acknowledged by the other replicas while the
//! source missed it (down, or its hint not delivered yet).
//!
//! Pulls start only once every node writes to the new ring too, so after the stream and the
//! catch-up the new owner holds every write acknowledged before, and receives every write after.
//! Progress survives a crash of either side: it is recorded in the `Meta` table per change, and
//! a restarted pull resumes after the last durable key. A failed pull is retried with back-off
//! (the next attempt may take another source), never given up: the change waits.
//!
//! The module knows the node only through [`HandoffHost`] (local merges, storage, peer channels,
//! liveness, metrics), so it does not join the node's import circle.

use std::collections::BTreeMap;
use std::future::Future;
use std::ops::Bound;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dynakv_core::NodeId;
use dynakv_core::dvvset::Clock;
use dynakv_core::hash::hash128;
use dynakv_core::merkle::entry_hash;
use dynakv_core::ring::Handoff;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::time::Instant;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::metrics::Metrics;
use crate::peer::{CLUSTER_HEADER, MAX_PEER_MESSAGE_BYTES, NODE_HEADER};
use crate::proto::replica_client::ReplicaClient;
use crate::proto::{PullEntry, PullPage, PullRequest, pull_request};
use crate::storage::{ScanLimit, ScanPage, StorageError, Store, Table};

pub use crate::config::{HandoffConfig, MAX_SUMMARY_BITS};

/// Entries per page the sender sends at most, whatever the puller asks.
pub const MAX_PAGE_ENTRIES: u32 = 4096;
/// Bytes per page the sender sends at most (a page always holds at least one entry).
pub const MAX_PAGE_BYTES: u32 = 4 * 1024 * 1024;
/// The `Meta` key of the handoff's durable progress.
const PROGRESS_KEY: &[u8] = b"handoff.progress";

/// What the handoff needs from its node. `node.rs` implements it.
pub trait HandoffHost: Send + Sync + 'static {
    fn node_id(&self) -> &NodeId;
    fn cluster_id(&self) -> &str;
    fn store(&self) -> &Store;
    fn metrics(&self) -> &Metrics;
    /// A channel to `node`'s gRPC server, if its address is known.
    fn channel(&self, node: &NodeId) -> Option<Channel>;
    /// Whether gossip holds `node` down (it is not asked until it returns).
    fn is_down(&self, node: &NodeId) -> bool;
    /// Merges a clock into the local copy of a stored key, durably.
    fn merge(
        &self,
        stored_key: Vec<u8>,
        clock: Clock,
    ) -> impl Future<Output = Result<bool, StorageError>> + Send;
}

/// Why one range's pull failed this time. Variant names are stable (metric labels).
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("no old replica of the range is reachable")]
    NoSource,
    #[error("{node}: {status}")]
    Rpc { node: NodeId, status: tonic::Status },
    #[error("{node} sent a clock that does not decode: {detail}")]
    BadClock { node: NodeId, detail: String },
    #[error("{node} sent a summary of the wrong shape")]
    BadSummary { node: NodeId },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl PullError {
    pub fn label(&self) -> &'static str {
        match self {
            PullError::NoSource => "no_source",
            PullError::Rpc { .. } => "rpc",
            PullError::BadClock { .. } => "bad_clock",
            PullError::BadSummary { .. } => "bad_summary",
            PullError::Storage(_) => "storage",
        }
    }
}

/// Where one range's pull stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RangeState {
    Streaming,
    CatchingUp,
    Done,
}

/// One range's durable progress.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RangeProgress {
    pub start: u64,
    pub end: u64,
    pub state: RangeState,
    /// The last stored key of the stream made durable here (hex), to resume after.
    pub cursor: Option<String>,
    /// The node the stream comes from (the first reachable old replica).
    pub source: Option<NodeId>,
    pub keys: u64,
    pub bytes: u64,
    /// The sender's estimate of the range's keys and bytes.
    pub keys_total: u64,
    pub bytes_total: u64,
    pub retries: u64,
}

/// The durable progress of the handoff of one change.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    pub change: u64,
    pub ranges: Vec<RangeProgress>,
}

impl Progress {
    fn fresh(change: u64, plan: &[Handoff]) -> Progress {
        Progress {
            change,
            ranges: plan
                .iter()
                .map(|h| RangeProgress {
                    start: h.start,
                    end: h.end,
                    state: RangeState::Streaming,
                    cursor: None,
                    source: None,
                    keys: 0,
                    bytes: 0,
                    keys_total: 0,
                    bytes_total: 0,
                    retries: 0,
                })
                .collect(),
        }
    }

    pub fn done(&self) -> bool {
        self.ranges.iter().all(|r| r.state == RangeState::Done)
    }
}

/// Reads the recorded progress of change `change` (fresh when none or another change's).
pub fn load_progress(store: &Store, change: u64, plan: &[Handoff]) -> Progress {
    let recorded = store
        .get(Table::Meta, PROGRESS_KEY)
        .ok()
        .flatten()
        .and_then(|bytes| serde_json::from_slice::<Progress>(&bytes).ok());
    match recorded {
        Some(p)
            if p.change == change
                && p.ranges.len() == plan.len()
                && p.ranges
                    .iter()
                    .zip(plan)
                    .all(|(r, h)| r.start == h.start && r.end == h.end) =>
        {
            p
        }
        _ => Progress::fresh(change, plan),
    }
}

async fn save_progress(store: &Store, progress: &Progress) -> Result<(), StorageError> {
    let bytes = serde_json::to_vec(progress).map_err(|e| StorageError::Corrupt {
        detail: format!("handoff progress does not encode: {e}"),
    })?;
    store.put(Table::Meta, PROGRESS_KEY.to_vec(), bytes).await
}

/// Live progress for status and metrics, shared with the admin service.
#[derive(Clone, Debug, Default)]
pub struct Live {
    pub progress: Option<Progress>,
    /// Bytes pulled, with when and from which source, over the last seconds (for the rate).
    pub recent: Vec<(Instant, Option<NodeId>, u64)>,
}

/// The window the pull rate is measured over.
const RATE_WINDOW: Duration = Duration::from_secs(5);

impl Live {
    /// Bytes per second pulled from `source` over the recent window (0 when nothing moved).
    pub fn rate_from(&self, source: &NodeId, now: Instant) -> f64 {
        let bytes: u64 = self
            .recent
            .iter()
            .filter(|(at, from, _)| {
                now.duration_since(*at) <= RATE_WINDOW && from.as_ref() == Some(source)
            })
            .map(|(_, _, b)| b)
            .sum();
        bytes as f64 / RATE_WINDOW.as_secs_f64()
    }
}

/// A byte rate limit: one shared by the parallel pulls of a change's handoff, and one for each
/// sweep that deletes what a node no longer replicates after a commit.
pub struct Pacer {
    /// Since when, and how many bytes were taken since then.
    taken: Mutex<(Instant, u64)>,
    max_bytes_per_sec: u64,
}

impl Pacer {
    pub fn new(max_bytes_per_sec: u64) -> Pacer {
        Pacer {
            taken: Mutex::new((Instant::now(), 0)),
            max_bytes_per_sec: max_bytes_per_sec.max(1),
        }
    }

    /// Waits until taking `bytes` more keeps the average under the limit.
    pub async fn pace(&self, bytes: u64) {
        let wait = self.take(bytes, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Takes `bytes` at `now`: how long to wait before going on.
    fn take(&self, bytes: u64, now: Instant) -> Duration {
        let mut l = self.taken.lock().unwrap_or_else(|p| p.into_inner());
        let rate = self.max_bytes_per_sec as f64;
        // Forget idle time: a burst after a pause does not get a credit larger than 1 s.
        if now > l.0 + Duration::from_secs_f64(l.1 as f64 / rate) + Duration::from_secs(1) {
            *l = (now - Duration::from_secs(1), 0);
        }
        l.1 += bytes;
        let due = l.0 + Duration::from_secs_f64(l.1 as f64 / rate);
        due.saturating_duration_since(now)
    }
}

/// Shared between the pulls of one change: the rate limit and the live progress.
struct Shared {
    live: Arc<Mutex<Live>>,
    pacer: Pacer,
}

impl Shared {
    fn record(&self, range: usize, update: impl FnOnce(&mut RangeProgress), moved: u64) {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let mut source = None;
        if let Some(r) = live.progress.as_mut().and_then(|p| p.ranges.get_mut(range)) {
            update(r);
            source = r.source.clone();
        }
        if moved > 0 {
            let now = Instant::now();
            live.recent.push((now, source, moved));
            live.recent
                .retain(|(at, _, _)| now.duration_since(*at) <= RATE_WINDOW);
        }
    }

    fn snapshot(&self) -> Option<Progress> {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .progress
            .clone()
    }
}

/// Pulls every range of `plan` (the ranges this node gains in change `change`) until all are
/// held durably; returns once they are. `excluded` old replicas are never asked (a removed
/// node). Progress is recorded in `live` and in storage.
pub async fn run<H: HandoffHost>(
    host: Arc<H>,
    config: HandoffConfig,
    change: u64,
    plan: Vec<Handoff>,
    excluded: Vec<NodeId>,
    live: Arc<Mutex<Live>>,
) -> Result<(), StorageError> {
    let progress = load_progress(host.store(), change, &plan);
    live.lock().unwrap_or_else(|p| p.into_inner()).progress = Some(progress.clone());
    let shared = Arc::new(Shared {
        live,
        pacer: Pacer::new(config.max_bytes_per_sec),
    });
    let metrics = host.metrics().clone();
    let set_gauges = |p: &Progress| {
        let done = p
            .ranges
            .iter()
            .filter(|r| r.state == RangeState::Done)
            .count();
        metrics
            .handoff_ranges
            .with_label_values(&["done"])
            .set(done as i64);
        metrics
            .handoff_ranges
            .with_label_values(&["pending"])
            .set((p.ranges.len() - done) as i64);
    };
    set_gauges(&progress);
    let saver = Arc::new(tokio::sync::Mutex::new(()));
    let mut pending: Vec<usize> = (0..plan.len())
        .filter(|&i| progress.ranges[i].state != RangeState::Done)
        .collect();
    pending.reverse();
    let mut running = FuturesUnordered::new();
    loop {
        while running.len() < config.parallel_ranges {
            let Some(i) = pending.pop() else { break };
            let (host, shared, saver, config) =
                (host.clone(), shared.clone(), saver.clone(), config.clone());
            let handoff = plan[i].clone();
            let excluded = excluded.clone();
            running.push(async move {
                pull_range(&*host, &config, &shared, &saver, i, &handoff, &excluded).await
            });
        }
        match running.next().await {
            None => break,
            Some(result) => {
                result?;
                if let Some(p) = shared.snapshot() {
                    set_gauges(&p);
                }
            }
        }
    }
    Ok(())
}

/// Pulls one range to the end: stream, then catch-up, retrying until both are done.
async fn pull_range<H: HandoffHost>(
    host: &H,
    config: &HandoffConfig,
    shared: &Shared,
    saver: &tokio::sync::Mutex<()>,
    index: usize,
    handoff: &Handoff,
    excluded: &[NodeId],
) -> Result<(), StorageError> {
    let mut failures = 0u32;
    loop {
        let Some(state) = shared.snapshot().map(|p| p.ranges[index].clone()) else {
            return Ok(());
        };
        let attempt = match state.state {
            RangeState::Done => return Ok(()),
            RangeState::Streaming => {
                stream_range(
                    host, config, shared, saver, index, handoff, excluded, &state,
                )
                .await
            }
            RangeState::CatchingUp => {
                catch_up(
                    host, config, shared, saver, index, handoff, excluded, &state,
                )
                .await
            }
        };
        match attempt {
            Ok(()) => failures = 0,
            Err(PullError::Storage(e)) => return Err(e),
            Err(e) => {
                failures = failures.saturating_add(1);
                host.metrics()
                    .handoff_failures
                    .with_label_values(&[e.label()])
                    .inc();
                shared.record(index, |r| r.retries += 1, 0);
                tracing::debug!(range = index, error = %e, "handoff pull failed; retrying");
                let backoff =
                    Duration::from_millis(config.retry_backoff_ms) * (1 << failures.min(4));
                tokio::time::sleep(backoff).await;
            }
        }
    }
}

/// The old replicas to ask, reachable ones first (never `excluded` or this node).
fn sources<H: HandoffHost>(host: &H, handoff: &Handoff, excluded: &[NodeId]) -> Vec<NodeId> {
    let mut sources: Vec<NodeId> = handoff
        .sources
        .iter()
        .filter(|s| !excluded.contains(s) && *s != host.node_id())
        .cloned()
        .collect();
    sources.sort_by_key(|s| host.is_down(s));
    sources
}

fn client<H: HandoffHost>(host: &H, node: &NodeId) -> Result<ReplicaClient<Channel>, PullError> {
    let channel = host.channel(node).ok_or(PullError::NoSource)?;
    Ok(ReplicaClient::new(channel)
        .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES))
}

fn pull_request<H: HandoffHost>(host: &H, msg: PullRequest) -> tonic::Request<PullRequest> {
    let mut req = tonic::Request::new(msg);
    if let Ok(v) = MetadataValue::try_from(host.cluster_id()) {
        req.metadata_mut().insert(CLUSTER_HEADER, v);
    }
    if let Ok(v) = MetadataValue::try_from(host.node_id().as_str()) {
        req.metadata_mut().insert(NODE_HEADER, v);
    }
    req
}

/// Merges one page's entries concurrently (the storage writer batches them into few commits)
/// and returns the keys and bytes merged.
async fn merge_page<H: HandoffHost>(
    host: &H,
    from: &NodeId,
    entries: Vec<PullEntry>,
) -> Result<(u64, u64), PullError> {
    let mut merges = FuturesUnordered::new();
    let mut bytes = 0u64;
    let count = entries.len() as u64;
    for entry in entries {
        bytes += (entry.key.len() + entry.clock.len()) as u64;
        let clock = Clock::decode(&entry.clock).map_err(|e| PullError::BadClock {
            node: from.clone(),
            detail: e.to_string(),
        })?;
        merges.push(host.merge(entry.key.to_vec(), clock));
    }
    while let Some(r) = merges.next().await {
        r?;
    }
    Ok((count, bytes))
}

#[allow(clippy::too_many_arguments)]
async fn stream_range<H: HandoffHost>(
    host: &H,
    config: &HandoffConfig,
    shared: &Shared,
    saver: &tokio::sync::Mutex<()>,
    index: usize,
    handoff: &Handoff,
    excluded: &[NodeId],
    state: &RangeProgress,
) -> Result<(), PullError> {
    // Resume from the same source when it is still there (its order is the cursor's order).
    let candidates = sources(host, handoff, excluded);
    let source = state
        .source
        .clone()
        .filter(|s| candidates.contains(s) && !host.is_down(s))
        .or_else(|| candidates.into_iter().find(|s| !host.is_down(s)))
        .ok_or(PullError::NoSource)?;
    let after = state
        .cursor
        .as_deref()
        .and_then(hex_decode)
        .unwrap_or_default();
    let mut client = client(host, &source)?;
    let request = pull_request(
        host,
        PullRequest {
            start: handoff.start,
            end: handoff.end,
            after: after.into(),
            mode: pull_request::Mode::Full as i32,
            max_page_entries: config.page_entries,
            max_page_bytes: config.page_bytes,
            summary_bits: 0,
        },
    );
    let rpc = |status| PullError::Rpc {
        node: source.clone(),
        status,
    };
    let mut pages = client.pull(request).await.map_err(rpc)?.into_inner();
    let mut first = true;
    while let Some(page) = pages.message().await.map_err(rpc)? {
        let PullPage {
            entries,
            range_keys,
            range_bytes,
            ..
        } = page;
        let last = entries.last().map(|e| e.key.to_vec());
        let (keys, bytes) = merge_page(host, &source, entries).await?;
        let cursor = last.as_deref().map(hex_encode);
        shared.record(
            index,
            |r| {
                r.source = Some(source.clone());
                if first && (range_keys > 0 || r.keys_total == 0) {
                    r.keys_total = r.keys_total.max(range_keys);
                    r.bytes_total = r.bytes_total.max(range_bytes);
                }
                if cursor.is_some() {
                    r.cursor = cursor.clone();
                }
                r.keys += keys;
                r.bytes += bytes;
            },
            bytes,
        );
        first = false;
        persist(host, shared, saver).await?;
        host.metrics()
            .handoff_keys
            .with_label_values(&["received"])
            .inc_by(keys);
        host.metrics()
            .handoff_bytes
            .with_label_values(&["received"])
            .inc_by(bytes);
        shared.pacer.pace(bytes).await;
    }
    shared.record(
        index,
        |r| {
            r.state = RangeState::CatchingUp;
            r.source = Some(source.clone());
        },
        0,
    );
    persist(host, shared, saver).await?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn catch_up<H: HandoffHost>(
    host: &H,
    config: &HandoffConfig,
    shared: &Shared,
    saver: &tokio::sync::Mutex<()>,
    index: usize,
    handoff: &Handoff,
    excluded: &[NodeId],
    state: &RangeProgress,
) -> Result<(), PullError> {
    let bits = config.summary_bits;
    for other in sources(host, handoff, excluded) {
        if Some(&other) == state.source.as_ref() {
            continue;
        }
        let mut client = client(host, &other)?;
        let rpc = |status| PullError::Rpc {
            node: other.clone(),
            status,
        };
        let request = pull_request(
            host,
            PullRequest {
                start: handoff.start,
                end: handoff.end,
                after: Default::default(),
                mode: pull_request::Mode::Summary as i32,
                max_page_entries: 0,
                max_page_bytes: 0,
                summary_bits: bits,
            },
        );
        let mut pages = client.pull(request).await.map_err(rpc)?.into_inner();
        let theirs: Vec<u128> = match pages.message().await.map_err(rpc)? {
            Some(page) if page.summary.len() == 1 << bits => page
                .summary
                .iter()
                .map(|h| <[u8; 16]>::try_from(h.as_ref()).map(u128::from_le_bytes))
                .collect::<Result<_, _>>()
                .map_err(|_| PullError::BadSummary {
                    node: other.clone(),
                })?,
            _ => {
                return Err(PullError::BadSummary {
                    node: other.clone(),
                });
            }
        };
        let ours = summarize(host.store(), handoff.start, handoff.end, bits)?;
        for (part, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            if a == b {
                continue;
            }
            let (start, end) = sub_range(handoff.start, handoff.end, bits, part);
            // A range shorter than its part count has empty parts (start == end, which would
            // read as the whole ring); nothing maps to them.
            if start == end && !(handoff.start == handoff.end && bits == 0) {
                continue;
            }
            let request = pull_request(
                host,
                PullRequest {
                    start,
                    end,
                    after: Default::default(),
                    mode: pull_request::Mode::Full as i32,
                    max_page_entries: config.page_entries,
                    max_page_bytes: config.page_bytes,
                    summary_bits: 0,
                },
            );
            let mut pages = client.pull(request).await.map_err(rpc)?.into_inner();
            while let Some(page) = pages.message().await.map_err(rpc)? {
                let (keys, bytes) = merge_page(host, &other, page.entries).await?;
                host.metrics().handoff_caught_up.inc_by(keys);
                shared.record(index, |_| {}, bytes);
                shared.pacer.pace(bytes).await;
            }
        }
    }
    shared.record(index, |r| r.state = RangeState::Done, 0);
    persist(host, shared, saver).await?;
    Ok(())
}

/// Writes the live progress to storage (one writer at a time, the latest state wins).
async fn persist<H: HandoffHost>(
    host: &H,
    shared: &Shared,
    saver: &tokio::sync::Mutex<()>,
) -> Result<(), StorageError> {
    let _one = saver.lock().await;
    if let Some(p) = shared.snapshot() {
        save_progress(host.store(), &p).await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The sender's side and the shared range arithmetic
// ---------------------------------------------------------------------------------------------

/// The position intervals `[lo, hi]` (inclusive) that make up the ring range `(start, end]`.
fn intervals(start: u64, end: u64) -> Vec<(u64, u64)> {
    if start < end {
        vec![(start + 1, end)]
    } else if start == u64::MAX {
        vec![(0, end)]
    } else {
        vec![(start + 1, u64::MAX), (0, end)]
    }
}

/// One page of the stored keys in ring range `(start, end]`, after stored key `after` (empty:
/// from the start), in the range's order (from `start` clockwise).
pub fn scan_range(
    store: &Store,
    start: u64,
    end: u64,
    after: &[u8],
    limit: ScanLimit,
) -> Result<ScanPage, StorageError> {
    let ivs = intervals(start, end);
    let after_pos = (after.len() >= 8).then(|| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&after[..8]);
        u64::from_be_bytes(b)
    });
    let first = match after_pos {
        None => 0,
        Some(pos) => ivs
            .iter()
            .position(|(lo, hi)| (*lo..=*hi).contains(&pos))
            .unwrap_or(ivs.len()),
    };
    for (k, (lo, hi)) in ivs.iter().enumerate().skip(first) {
        let lo_key = lo.to_be_bytes();
        let hi_key = hi.wrapping_add(1).to_be_bytes();
        let from = if k == first && after_pos.is_some() {
            Bound::Excluded(after)
        } else {
            Bound::Included(&lo_key[..])
        };
        let to = if *hi == u64::MAX {
            Bound::Unbounded
        } else {
            Bound::Excluded(&hi_key[..])
        };
        let page = store.scan(Table::Data, from, to, limit)?;
        if !page.entries.is_empty() || page.next.is_some() {
            // A page ending its interval says "more" when a later interval may hold entries.
            let next = match page.next {
                Some(n) => Some(n),
                None if k + 1 < ivs.len() => page.entries.last().map(|(key, _)| key.clone()),
                None => None,
            };
            return Ok(ScanPage {
                entries: page.entries,
                next,
            });
        }
    }
    Ok(ScanPage::default())
}

/// Which of the range's 2^bits sub-ranges position `pos` falls in.
fn part_of(start: u64, end: u64, bits: u32, pos: u64) -> usize {
    let len = range_len(start, end);
    // Distance from the start, in (0, len]: the range's end is `len` away, not 0.
    let d = match pos.wrapping_sub(start) {
        0 => len,
        d => u128::from(d),
    };
    let parts = 1u128 << bits;
    ((d * parts).div_ceil(len).saturating_sub(1)) as usize
}

/// Length of `(start, end]` in positions (2^64 for the whole ring).
fn range_len(start: u64, end: u64) -> u128 {
    match end.wrapping_sub(start) {
        0 => 1u128 << 64,
        l => u128::from(l),
    }
}

/// Sub-range `part` of `(start, end]` cut into 2^bits, as a ring range.
pub fn sub_range(start: u64, end: u64, bits: u32, part: usize) -> (u64, u64) {
    let len = range_len(start, end);
    let parts = 1u128 << bits;
    let at = |i: u128| start.wrapping_add((i * len / parts) as u64);
    (at(part as u128), at(part as u128 + 1))
}

/// The 2^bits sub-range hashes of `(start, end]` over this node's storage.
pub fn summarize(
    store: &Store,
    start: u64,
    end: u64,
    bits: u32,
) -> Result<Vec<u128>, StorageError> {
    let mut hashes = vec![0u128; 1 << bits];
    let mut after: Vec<u8> = Vec::new();
    loop {
        let page = scan_range(store, start, end, &after, ScanLimit::entries(4096))?;
        for (key, value) in &page.entries {
            let Some(pos) = key.get(..8).map(|b| {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                u64::from_be_bytes(a)
            }) else {
                continue;
            };
            let part = part_of(start, end, bits, pos).min(hashes.len() - 1);
            hashes[part] ^= entry_hash(key, hash128(value));
        }
        match page.next {
            Some(n) => after = n,
            None => return Ok(hashes),
        }
    }
}

/// What the sender streams for one pull request: pages of at most the asked (and capped)
/// entries and bytes, the first with the range's size estimate.
pub fn serve_page(
    store: &Store,
    request: &PullRequest,
    after: &[u8],
    first: bool,
    estimate: impl Fn() -> (u64, u64),
) -> Result<(PullPage, Option<Vec<u8>>), StorageError> {
    let limit = ScanLimit {
        max_entries: request.max_page_entries.clamp(1, MAX_PAGE_ENTRIES) as usize,
        max_bytes: request.max_page_bytes.clamp(1, MAX_PAGE_BYTES) as usize,
    };
    let page = scan_range(store, request.start, request.end, after, limit)?;
    let (range_keys, range_bytes) = if first { estimate() } else { (0, 0) };
    Ok((
        PullPage {
            entries: page
                .entries
                .into_iter()
                .map(|(key, clock)| PullEntry {
                    key: key.into(),
                    clock: clock.into(),
                })
                .collect(),
            summary: Vec::new(),
            range_keys,
            range_bytes,
        },
        page.next,
    ))
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Ranges gained per source node, for status: (source, target) -> progress sums.
pub fn transfers(me: &NodeId, progress: &Progress) -> BTreeMap<NodeId, Vec<RangeProgress>> {
    let mut out: BTreeMap<NodeId, Vec<RangeProgress>> = BTreeMap::new();
    for r in &progress.ranges {
        let source = r.source.clone().unwrap_or_else(|| me.clone());
        out.entry(source).or_default().push(r.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pacer_holds_the_average_to_its_rate_and_forgets_idle_time() {
        let pacer = Pacer::new(1_000);
        let start = pacer.taken.lock().unwrap().0;
        let at = |ms: u64| start + Duration::from_millis(ms);
        // Half a second's worth at the start: due in half a second.
        assert_eq!(pacer.take(500, at(0)), Duration::from_millis(500));
        // 2,000 bytes in all at 1,000 B/s: due two seconds after the start.
        assert_eq!(pacer.take(1_500, at(500)), Duration::from_millis(1_500));
        assert_eq!(pacer.take(0, at(2_000)), Duration::ZERO);
        // Ten idle seconds earn a credit of one second only: 3,000 bytes then wait 2 s.
        assert_eq!(pacer.take(3_000, at(12_000)), Duration::from_secs(2));
    }

    #[test]
    fn sub_ranges_tile_the_range_and_every_position_finds_its_part() {
        for (start, end) in [
            (100u64, 1_000_000u64),
            (u64::MAX - 1000, 5000),
            (42, 42),
            (u64::MAX, 77),
        ] {
            for bits in [0u32, 1, 4, 8] {
                let parts = 1usize << bits;
                let mut prev_end = start;
                for part in 0..parts {
                    let (s, e) = sub_range(start, end, bits, part);
                    assert_eq!(s, prev_end, "parts are contiguous");
                    prev_end = e;
                    if s == e && start != end {
                        continue; // an empty part of a short range
                    }
                    for pos in [s.wrapping_add(1), e] {
                        if dynakv_core::ring::range_contains(s, e, pos) {
                            assert_eq!(
                                part_of(start, end, bits, pos),
                                part,
                                "{start} {end} {bits} {pos}"
                            );
                        }
                    }
                }
                assert_eq!(prev_end, end, "the last part ends the range");
            }
        }
    }

    #[test]
    fn hex_round_trips() {
        let k = vec![0u8, 1, 0xab, 0xff];
        assert_eq!(hex_decode(&hex_encode(&k)), Some(k));
        assert_eq!(hex_decode("abc"), None);
        assert_eq!(hex_decode("zz"), None);
    }
}
