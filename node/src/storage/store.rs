//! [`Store`]: group commit over a [`Backend`].
//!
//! Callers queue mutations on a bounded channel. One writer (a dedicated thread for redb, whose
//! calls block; or a task on a given runtime for the in-memory backend in the simulation) takes the
//! first queued mutation, drains whatever else is queued up to [`StoreConfig::max_batch_ops`]
//! mutations or [`StoreConfig::max_batch_bytes`] written bytes, applies them in order to an overlay
//! (so a later update of a key sees the earlier ones of the same batch), commits the batch as one
//! transaction and only then answers each mutation. While one batch commits, the next one queues
//! up: under load a batch is as large as the queue that formed during the previous fsync.
//!
//! Invariants:
//! - No mutation is answered `Ok` before the commit holding it returned `Ok`.
//! - Mutations are applied in queue order; one writer means one update of a key at a time.
//! - After a failed commit nothing is committed again by this store (fail-stop).
//! - The counters in [`StoreStats`] are those of the last committed batch; the byte counter is
//!   stored in [`Table::Meta`] in the same transaction as the data it counts.

use std::any::Any;
use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::fmt;
use std::ops::Bound;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use prometheus::{Histogram, HistogramOpts, Registry};
use tokio::sync::{mpsc, oneshot};

use super::{Backend, RESERVED_META_PREFIX, ScanLimit, ScanPage, StorageError, Table, WriteOp};

/// [`Table::Meta`] key of the byte count of [`Table::Data`]: a little-endian u64.
const DATA_BYTES_KEY: &[u8] = b"storage.data_bytes";
/// [`Table::Meta`] key of the node and cluster the data directory belongs to.
const IDENTITY_KEY: &[u8] = b"storage.identity";

/// Where the writer runs.
#[derive(Clone, Debug, Default)]
pub enum WriterMode {
    /// A dedicated OS thread. For [`super::RedbBackend`], whose commits block for an fsync.
    #[default]
    Thread,
    /// A task spawned on this runtime. For [`super::MemoryBackend`] under a deterministic
    /// simulation: the writer then runs on the simulated host's runtime (no thread outside the
    /// simulator's control) and goes away with it when the host crashes. Commits run inline on the
    /// runtime, so never use it with a backend that blocks.
    Task(tokio::runtime::Handle),
}

/// Configuration of a [`Store`]. Values of 0 are treated as 1.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Most mutations in one commit. Default 512.
    pub max_batch_ops: usize,
    /// The writer stops adding mutations to a batch once the keys and values it writes add up to
    /// this many bytes; a batch exceeds it by at most one mutation. Default 8 MiB.
    pub max_batch_bytes: usize,
    /// Mutations that may wait for the writer; when full, callers wait (backpressure). Default 1024.
    pub queue_capacity: usize,
    /// Where the writer runs. Default [`WriterMode::Thread`].
    pub writer: WriterMode,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            max_batch_ops: 512,
            max_batch_bytes: 8 * 1024 * 1024,
            queue_capacity: 1024,
            writer: WriterMode::Thread,
        }
    }
}

/// The store's metrics. Register them with [`StoreMetrics::register`].
#[derive(Clone, Debug)]
pub struct StoreMetrics {
    /// `dynakv_storage_commit_seconds`: time of each commit, fsync included.
    pub commit_seconds: Histogram,
    /// `dynakv_storage_batch_ops`: mutations answered by each commit.
    pub batch_ops: Histogram,
}

impl StoreMetrics {
    /// Unregistered histograms with the standard names and buckets.
    pub fn new() -> prometheus::Result<Self> {
        let commit_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "dynakv_storage_commit_seconds",
                "Time of one storage commit (one batch), fsync included.",
            )
            .buckets(vec![
                0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
                0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        )?;
        let batch_ops = Histogram::with_opts(
            HistogramOpts::new(
                "dynakv_storage_batch_ops",
                "Mutations answered by one storage commit.",
            )
            .buckets(vec![
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
            ]),
        )?;
        Ok(StoreMetrics {
            commit_seconds,
            batch_ops,
        })
    }

    /// Registers both histograms.
    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.commit_seconds.clone()))?;
        registry.register(Box::new(self.batch_ops.clone()))
    }
}

/// What [`Table::Data`] holds, as of the last commit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Number of keys.
    pub keys: u64,
    /// Sum of the lengths of keys and values.
    pub bytes: u64,
}

/// What an update closure decides: `None` writes nothing, `Some(None)` deletes the key,
/// `Some(Some(value))` puts `value`.
type Write = Option<Option<Vec<u8>>>;

/// A queued mutation, erased over its closure and result types.
trait Pending: Send {
    /// Runs the closure on the current value; the returned [`Ack`] answers the caller.
    fn apply(self: Box<Self>, current: Option<&[u8]>) -> (Write, Box<dyn Ack>);
    /// Answers the caller with an error without running the closure.
    fn fail(self: Box<Self>, error: StorageError);
}

/// The answer to one applied mutation, sent once its batch's commit is over.
trait Ack: Send {
    fn complete(self: Box<Self>, commit: Result<(), StorageError>);
}

enum Outcome<R> {
    Done(R),
    Error(StorageError),
    /// The caller's closure panicked on the writer; the panic is resumed in the caller.
    Panicked(Box<dyn Any + Send>),
}

struct Update<F, R> {
    f: F,
    reply: oneshot::Sender<Outcome<R>>,
}

impl<F, R> Pending for Update<F, R>
where
    F: FnOnce(Option<&[u8]>) -> (Write, R) + Send + 'static,
    R: Send + 'static,
{
    fn apply(self: Box<Self>, current: Option<&[u8]>) -> (Write, Box<dyn Ack>) {
        let Update { f, reply } = *self;
        // The closure sees only a borrowed slice and writes nothing itself, so a panic in it
        // leaves the batch untouched; it must not take the writer down with it.
        match catch_unwind(AssertUnwindSafe(|| f(current))) {
            Ok((write, result)) => (write, Box::new(Reply { reply, result })),
            Err(panic) => (None, Box::new(PanicReply { reply, panic })),
        }
    }

    fn fail(self: Box<Self>, error: StorageError) {
        // The caller may have gone away (its future was dropped); nobody is left to tell.
        let _ = self.reply.send(Outcome::Error(error));
    }
}

/// A mutation whose closure result goes back as soon as the closure ran, before the commit; the
/// commit's outcome follows on `durable` (see [`Store::update_early`]).
struct EarlyUpdate<F, R> {
    f: F,
    early: oneshot::Sender<Outcome<R>>,
    durable: oneshot::Sender<Result<(), StorageError>>,
}

impl<F, R> Pending for EarlyUpdate<F, R>
where
    F: FnOnce(Option<&[u8]>) -> (Write, R) + Send + 'static,
    R: Send + 'static,
{
    fn apply(self: Box<Self>, current: Option<&[u8]>) -> (Write, Box<dyn Ack>) {
        let EarlyUpdate { f, early, durable } = *self;
        match catch_unwind(AssertUnwindSafe(|| f(current))) {
            Ok((write, result)) => {
                let _ = early.send(Outcome::Done(result));
                (write, Box::new(DurableReply { durable }))
            }
            Err(panic) => {
                let _ = early.send(Outcome::Panicked(panic));
                (None, Box::new(DurableReply { durable }))
            }
        }
    }

    fn fail(self: Box<Self>, error: StorageError) {
        let _ = self.durable.send(Err(error.clone()));
        let _ = self.early.send(Outcome::Error(error));
    }
}

struct DurableReply {
    durable: oneshot::Sender<Result<(), StorageError>>,
}

impl Ack for DurableReply {
    fn complete(self: Box<Self>, commit: Result<(), StorageError>) {
        let _ = self.durable.send(commit);
    }
}

/// Resolves once the batch holding an [`Store::update_early`] mutation is committed durably.
pub struct Durable(oneshot::Receiver<Result<(), StorageError>>);

impl std::future::Future for Durable {
    type Output = Result<(), StorageError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(StorageError::Closed)))
    }
}

struct Reply<R> {
    reply: oneshot::Sender<Outcome<R>>,
    result: R,
}

impl<R: Send> Ack for Reply<R> {
    fn complete(self: Box<Self>, commit: Result<(), StorageError>) {
        let Reply { reply, result } = *self;
        let _ = reply.send(match commit {
            Ok(()) => Outcome::Done(result),
            Err(e) => Outcome::Error(e),
        });
    }
}

struct PanicReply<R> {
    reply: oneshot::Sender<Outcome<R>>,
    panic: Box<dyn Any + Send>,
}

impl<R: Send> Ack for PanicReply<R> {
    fn complete(self: Box<Self>, _commit: Result<(), StorageError>) {
        let _ = self.reply.send(Outcome::Panicked(self.panic));
    }
}

struct Request {
    table: Table,
    key: Vec<u8>,
    op: Box<dyn Pending>,
}

struct Shared {
    /// Set once, by the writer, when a commit fails.
    failed: OnceLock<Arc<StorageError>>,
    stats: Mutex<StoreStats>,
}

impl Shared {
    fn failed_error(&self) -> Option<StorageError> {
        self.failed.get().map(|cause| StorageError::Failed {
            cause: Arc::clone(cause),
        })
    }
}

/// The group-commit store. Share it behind an `Arc`; close it with [`Store::close`].
///
/// Dropping it without `close` also lets the writer finish the queued mutations, but waits for it
/// only outside an async runtime (inside one, the writer finishes in the background).
pub struct Store {
    backend: Arc<dyn Backend>,
    shared: Arc<Shared>,
    sender: Option<mpsc::Sender<Request>>,
    writer_done: Option<oneshot::Receiver<()>>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend)
            .field("failed", &self.is_failed())
            .field("queue_len", &self.queue_len())
            .finish()
    }
}

impl Store {
    /// Starts a store on `backend`. Reads the counters first: the number of keys from
    /// [`Backend::len`], the byte count from [`Table::Meta`] (computed by a paged scan of
    /// [`Table::Data`] if it is missing or unreadable, and stored again by the next commit that
    /// touches data).
    pub fn open(
        backend: Arc<dyn Backend>,
        config: StoreConfig,
        metrics: StoreMetrics,
    ) -> Result<Store, StorageError> {
        let (stats, recounted) = load_stats(backend.as_ref())?;
        let shared = Arc::new(Shared {
            failed: OnceLock::new(),
            stats: Mutex::new(stats),
        });
        let (sender, receiver) = mpsc::channel(config.queue_capacity.max(1));
        let (done_tx, done_rx) = oneshot::channel();
        let writer = Writer {
            backend: Arc::clone(&backend),
            shared: Arc::clone(&shared),
            max_batch_ops: config.max_batch_ops.max(1),
            max_batch_bytes: config.max_batch_bytes.max(1),
            metrics,
            stats,
            save_bytes: recounted,
        };
        let thread = match config.writer {
            WriterMode::Thread => Some(
                std::thread::Builder::new()
                    .name("dynakv-storage-writer".to_owned())
                    .spawn(move || writer.run_blocking(receiver, done_tx))
                    .map_err(|e| StorageError::io("starting the storage writer thread", e))?,
            ),
            WriterMode::Task(runtime) => {
                runtime.spawn(writer.run_async(receiver, done_tx));
                None
            }
        };
        Ok(Store {
            backend,
            shared,
            sender: Some(sender),
            writer_done: Some(done_rx),
            thread,
        })
    }

    /// Read-modify-write of one key, serialized with every other mutation.
    ///
    /// `f` runs on the writer and sees the committed value plus the earlier mutations of its
    /// batch. It returns what to write (`None`: nothing, `Some(None)`: delete, `Some(Some(v))`:
    /// put `v`) and a result, handed back once the batch is durable. If `f` panics, nothing is
    /// written for it and the panic resumes here. If this future is dropped after the mutation was
    /// queued, the mutation may still be applied.
    pub async fn update<F, R>(&self, table: Table, key: Vec<u8>, f: F) -> Result<R, StorageError>
    where
        F: FnOnce(Option<&[u8]>) -> (Option<Option<Vec<u8>>>, R) + Send + 'static,
        R: Send + 'static,
    {
        check_not_reserved(table, &key)?;
        self.submit(table, key, f).await
    }

    /// [`Store::update`], answering as soon as `f` ran on the writer, before its batch is
    /// committed: the result comes with a [`Durable`] that resolves once the batch is on disk
    /// (or fails). Until then the mutation may still be lost (a crash, a failed commit), and
    /// reads do not see it. The coordinator uses this to send a new version to the other replicas
    /// while its own copy is being made durable.
    pub async fn update_early<F, R>(
        &self,
        table: Table,
        key: Vec<u8>,
        f: F,
    ) -> Result<(R, Durable), StorageError>
    where
        F: FnOnce(Option<&[u8]>) -> (Option<Option<Vec<u8>>>, R) + Send + 'static,
        R: Send + 'static,
    {
        check_not_reserved(table, &key)?;
        if let Some(error) = self.shared.failed_error() {
            return Err(error);
        }
        let sender = self.sender.as_ref().ok_or(StorageError::Closed)?;
        let (early, answer) = oneshot::channel();
        let (durable, committed) = oneshot::channel();
        let op = Box::new(EarlyUpdate { f, early, durable });
        sender
            .send(Request { table, key, op })
            .await
            .map_err(|_| StorageError::Closed)?;
        match answer.await {
            Ok(Outcome::Done(result)) => Ok((result, Durable(committed))),
            Ok(Outcome::Error(error)) => Err(error),
            Ok(Outcome::Panicked(panic)) => resume_unwind(panic),
            Err(_) => Err(StorageError::Closed),
        }
    }

    /// Puts `value` under `key`; resolves once durable.
    pub async fn put(
        &self,
        table: Table,
        key: Vec<u8>,
        value: Vec<u8>,
    ) -> Result<(), StorageError> {
        self.update(table, key, move |_| (Some(Some(value)), ()))
            .await
    }

    /// Deletes `key` (a missing key is not an error); resolves once durable.
    pub async fn delete(&self, table: Table, key: Vec<u8>) -> Result<(), StorageError> {
        self.update(table, key, |_| (Some(None), ())).await
    }

    /// The committed value of `key`. Goes straight to the backend (not through the queue) and
    /// may block on disk I/O briefly.
    pub fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.backend.get(table, key)
    }

    /// One page of committed entries between `from` and `to`, in key order; continue with
    /// `Bound::Excluded(page.next)` while `page.next` is `Some`. Straight to the backend.
    pub fn scan(
        &self,
        table: Table,
        from: Bound<&[u8]>,
        to: Bound<&[u8]>,
        limit: ScanLimit,
    ) -> Result<ScanPage, StorageError> {
        self.backend.scan(table, from, to, limit)
    }

    /// Number of committed entries in `table`. Straight to the backend.
    pub fn len(&self, table: Table) -> Result<u64, StorageError> {
        self.backend.len(table)
    }

    /// Keys and bytes in [`Table::Data`] as of the last commit. Cheap.
    pub fn stats(&self) -> StoreStats {
        *self
            .shared
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a commit failed: every mutation now fails with [`StorageError::Failed`].
    pub fn is_failed(&self) -> bool {
        self.shared.failed.get().is_some()
    }

    /// Mutations waiting for the writer (not counting the batch being committed).
    pub fn queue_len(&self) -> usize {
        self.sender
            .as_ref()
            .map_or(0, |s| s.max_capacity() - s.capacity())
    }

    /// Fences the data directory to one node of one cluster. On a fresh directory it records
    /// `node_id` and `cluster_id` durably; on one recorded for another node or cluster it fails
    /// with [`StorageError::IdentityMismatch`] and writes nothing.
    pub async fn check_identity(
        &self,
        node_id: &str,
        cluster_id: &str,
    ) -> Result<(), StorageError> {
        let (node, cluster) = (node_id.to_owned(), cluster_id.to_owned());
        let outcome = self
            .submit(
                Table::Meta,
                IDENTITY_KEY.to_vec(),
                move |current| match current.map(decode_identity) {
                    None => (Some(Some(encode_identity(&node, &cluster))), Ok(true)),
                    Some(Some((n, c))) if n == node && c == cluster => (None, Ok(false)),
                    Some(Some((found_node, found_cluster))) => (
                        None,
                        Err(StorageError::IdentityMismatch {
                            expected_node: node,
                            found_node,
                            expected_cluster: cluster,
                            found_cluster,
                        }),
                    ),
                    Some(None) => (
                        None,
                        Err(StorageError::Corrupt {
                            detail:
                                "the node identity recorded in the data directory is unreadable"
                                    .to_owned(),
                        }),
                    ),
                },
            )
            .await?;
        if outcome? {
            tracing::info!(
                node_id,
                cluster_id,
                "recorded node identity in a fresh data directory"
            );
        }
        Ok(())
    }

    /// Stops taking mutations, lets the writer finish every queued one and waits for it to exit.
    pub async fn close(mut self) {
        self.sender = None;
        if let Some(done) = self.writer_done.take() {
            // An error means the writer is already gone (its runtime shut down).
            let _ = done.await;
        }
        if let Some(thread) = self.thread.take() {
            // The writer signalled `done` as its last act, so this join does not wait for long.
            if thread.join().is_err() {
                tracing::error!("the storage writer thread panicked");
            }
        }
    }

    /// The backend, for tests that check it beside the store.
    #[cfg(test)]
    pub(super) fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    async fn submit<F, R>(&self, table: Table, key: Vec<u8>, f: F) -> Result<R, StorageError>
    where
        F: FnOnce(Option<&[u8]>) -> (Write, R) + Send + 'static,
        R: Send + 'static,
    {
        if let Some(error) = self.shared.failed_error() {
            return Err(error);
        }
        let sender = self.sender.as_ref().ok_or(StorageError::Closed)?;
        let (reply, answer) = oneshot::channel();
        let op = Box::new(Update { f, reply });
        sender
            .send(Request { table, key, op })
            .await
            .map_err(|_| StorageError::Closed)?;
        match answer.await {
            Ok(Outcome::Done(result)) => Ok(result),
            Ok(Outcome::Error(error)) => Err(error),
            Ok(Outcome::Panicked(panic)) => resume_unwind(panic),
            Err(_) => Err(StorageError::Closed),
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.sender = None;
        if let Some(thread) = self.thread.take() {
            // Joining would block an async runtime's worker; there the writer finishes alone.
            if tokio::runtime::Handle::try_current().is_err() && thread.join().is_err() {
                tracing::error!("the storage writer thread panicked");
            }
        }
    }
}

fn check_not_reserved(table: Table, key: &[u8]) -> Result<(), StorageError> {
    if table == Table::Meta && key.starts_with(RESERVED_META_PREFIX) {
        return Err(StorageError::ReservedKey {
            key: String::from_utf8_lossy(key).into_owned(),
        });
    }
    Ok(())
}

/// The counters, and whether the byte count had to be recounted (so it should be stored again).
fn load_stats(backend: &dyn Backend) -> Result<(StoreStats, bool), StorageError> {
    let keys = backend.len(Table::Data)?;
    let (bytes, recounted) = match backend.get(Table::Meta, DATA_BYTES_KEY)? {
        Some(stored) => match <[u8; 8]>::try_from(stored.as_slice()) {
            Ok(b) => (u64::from_le_bytes(b), false),
            Err(_) => {
                tracing::warn!("stored data byte count is unreadable; recounting");
                (count_data_bytes(backend)?, true)
            }
        },
        None if keys == 0 => (0, false),
        None => (count_data_bytes(backend)?, true),
    };
    Ok((StoreStats { keys, bytes }, recounted))
}

fn count_data_bytes(backend: &dyn Backend) -> Result<u64, StorageError> {
    let limit = ScanLimit::entries(4096);
    let mut total = 0u64;
    let mut next: Option<Vec<u8>> = None;
    loop {
        let from = next.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
        let page = backend.scan(Table::Data, from, Bound::Unbounded, limit)?;
        for (k, v) in &page.entries {
            total = total.saturating_add((k.len() + v.len()) as u64);
        }
        match page.next {
            Some(key) => next = Some(key),
            None => return Ok(total),
        }
    }
}

const IDENTITY_FORMAT: u8 = 1;

// [format 1][u32 LE length][node id][u32 LE length][cluster id]
fn encode_identity(node: &str, cluster: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + node.len() + cluster.len());
    out.push(IDENTITY_FORMAT);
    for part in [node, cluster] {
        out.extend_from_slice(&(part.len() as u32).to_le_bytes());
        out.extend_from_slice(part.as_bytes());
    }
    out
}

fn decode_identity(bytes: &[u8]) -> Option<(String, String)> {
    let (&format, mut rest) = bytes.split_first()?;
    if format != IDENTITY_FORMAT {
        return None;
    }
    let mut part = || -> Option<String> {
        let (len, tail) = rest.split_first_chunk::<4>()?;
        let len = usize::try_from(u32::from_le_bytes(*len)).ok()?;
        let (text, tail) = tail.split_at_checked(len)?;
        rest = tail;
        String::from_utf8(text.to_vec()).ok()
    };
    let node = part()?;
    let cluster = part()?;
    rest.is_empty().then_some((node, cluster))
}

/// A key's state within a batch.
struct Slot {
    /// Key plus value bytes of the committed entry, if there is one.
    committed_size: Option<u64>,
    /// The value after the batch's mutations so far.
    value: Option<Vec<u8>>,
    /// Whether a mutation wrote it.
    dirty: bool,
}

struct Writer {
    backend: Arc<dyn Backend>,
    shared: Arc<Shared>,
    max_batch_ops: usize,
    max_batch_bytes: usize,
    metrics: StoreMetrics,
    /// Counters as of the last commit; the writer is their only writer.
    stats: StoreStats,
    /// The stored byte count is missing or stale: store it with the next commit.
    save_bytes: bool,
}

/// A batch applied to the overlay, waiting for its commit.
struct Batch {
    ops: Vec<WriteOp>,
    acks: Vec<Box<dyn Ack>>,
    stats: StoreStats,
    mutations: usize,
}

impl Writer {
    fn run_blocking(mut self, mut receiver: mpsc::Receiver<Request>, done: oneshot::Sender<()>) {
        while let Some(first) = receiver.blocking_recv() {
            self.run_batch(first, &mut || receiver.try_recv().ok());
        }
        let _ = done.send(());
    }

    async fn run_async(mut self, mut receiver: mpsc::Receiver<Request>, done: oneshot::Sender<()>) {
        while let Some(first) = receiver.recv().await {
            let Some(batch) = self.prepare_batch(first, &mut || receiver.try_recv().ok()) else {
                continue;
            };
            let latency = self.backend.simulated_commit_latency();
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            self.commit_batch(batch);
        }
        let _ = done.send(());
    }

    /// Builds one batch from `first` and whatever `next` yields within the limits, commits it and
    /// answers every mutation in it.
    fn run_batch(&mut self, first: Request, next: &mut dyn FnMut() -> Option<Request>) {
        if let Some(batch) = self.prepare_batch(first, next) {
            self.commit_batch(batch);
        }
    }

    /// Applies `first` and whatever `next` yields within the limits to an overlay of committed
    /// state. Returns the batch to commit, or `None` when every mutation is already answered.
    fn prepare_batch(
        &mut self,
        first: Request,
        next: &mut dyn FnMut() -> Option<Request>,
    ) -> Option<Batch> {
        if let Some(error) = self.shared.failed_error() {
            first.op.fail(error.clone());
            while let Some(request) = next() {
                request.op.fail(error.clone());
            }
            return None;
        }
        let mut overlay: BTreeMap<(Table, Vec<u8>), Slot> = BTreeMap::new();
        let mut acks: Vec<Box<dyn Ack>> = Vec::new();
        let mut mutations = 0usize;
        let mut written_bytes = 0usize;
        let mut request = Some(first);
        while let Some(Request { table, key, op }) = request.take() {
            mutations += 1;
            let key_len = key.len();
            let slot = match overlay.entry((table, key)) {
                Entry::Occupied(slot) => Ok(slot.into_mut()),
                Entry::Vacant(vacant) => self.backend.get(table, &vacant.key().1).map(|value| {
                    let committed_size = value.as_ref().map(|v| (key_len + v.len()) as u64);
                    vacant.insert(Slot {
                        committed_size,
                        value,
                        dirty: false,
                    })
                }),
            };
            match slot {
                Ok(slot) => {
                    let (write, ack) = op.apply(slot.value.as_deref());
                    if let Some(value) = write {
                        written_bytes += key_len + value.as_ref().map_or(0, Vec::len);
                        slot.value = value;
                        slot.dirty = true;
                    }
                    acks.push(ack);
                }
                // Nothing was applied for this one; the rest of the batch goes on.
                Err(error) => op.fail(error),
            }
            if mutations < self.max_batch_ops && written_bytes < self.max_batch_bytes {
                request = next();
            }
        }

        let mut stats = self.stats;
        let mut ops = Vec::new();
        for ((table, key), slot) in overlay {
            if !slot.dirty {
                continue;
            }
            if table == Table::Data {
                let new_size = slot.value.as_ref().map(|v| (key.len() + v.len()) as u64);
                match (slot.committed_size.is_some(), new_size.is_some()) {
                    (false, true) => stats.keys = stats.keys.saturating_add(1),
                    (true, false) => stats.keys = stats.keys.saturating_sub(1),
                    _ => {}
                }
                stats.bytes = stats
                    .bytes
                    .saturating_sub(slot.committed_size.unwrap_or(0))
                    .saturating_add(new_size.unwrap_or(0));
            }
            ops.push(match slot.value {
                Some(value) => WriteOp::Put { table, key, value },
                None => WriteOp::Delete { table, key },
            });
        }
        if ops.is_empty() {
            // Every closure read committed state only (no earlier write in this batch), so its
            // answer needs no commit.
            for ack in acks {
                ack.complete(Ok(()));
            }
            return None;
        }
        if stats.bytes != self.stats.bytes || self.save_bytes {
            ops.push(WriteOp::Put {
                table: Table::Meta,
                key: DATA_BYTES_KEY.to_vec(),
                value: stats.bytes.to_le_bytes().to_vec(),
            });
        }
        Some(Batch {
            ops,
            acks,
            stats,
            mutations,
        })
    }

    /// Commits a prepared batch and answers every mutation in it.
    fn commit_batch(&mut self, batch: Batch) {
        let Batch {
            ops,
            acks,
            stats,
            mutations,
        } = batch;
        let started = Instant::now();
        let committed = self.backend.commit(&ops);
        self.metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics.batch_ops.observe(mutations as f64);
        match committed {
            Ok(()) => {
                self.stats = stats;
                self.save_bytes = false;
                *self
                    .shared
                    .stats
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = stats;
                for ack in acks {
                    ack.complete(Ok(()));
                }
                self.backend.maintain();
            }
            Err(error) => {
                tracing::error!(
                    %error,
                    mutations,
                    "storage commit failed; no further writes will be taken until restart"
                );
                // Set before answering, so a caller that sees the error also sees is_failed().
                let _ = self.shared.failed.set(Arc::new(error.clone()));
                for ack in acks {
                    ack.complete(Err(error.clone()));
                }
            }
        }
    }
}
