//! Local storage of a node: three byte-keyed tables behind one [`Backend`] seam, and the
//! group-commit [`Store`] that every write goes through.
//!
//! # Map
//!
//! - this file: [`Table`], [`WriteOp`], [`ScanLimit`]/[`ScanPage`], the [`Backend`] trait and
//!   [`StorageError`].
//! - `redb_backend.rs`: [`RedbBackend`], the real one: one redb file and its write-ahead log; a
//!   commit is one log record synced with `fdatasync`, then a non-durable redb commit; periodic
//!   checkpoints (a durable redb commit) empty the log; opening replays what they did not cover.
//! - `wal.rs`: the log's record format, reading it back (up to the first torn, damaged or
//!   out-of-sequence record) and appending to it, over a [`LogDevice`].
//! - `memory.rs`: [`MemoryBackend`], for tests and the deterministic simulation: a live and a durable
//!   image, `crash()` to lose what was not synced, and fault toggles.
//! - `store.rs`: [`Store`], group commit: one writer applies queued read-modify-write updates in
//!   order, commits them as one transaction and only then acknowledges them; fail-stop on commit
//!   errors; key and byte counters; identity fencing of the data directory.
//! - `tests.rs`: the conformance suite run against both backends; `crash_tests.rs`: redb and its log
//!   over storage devices that forget unsynced writes.
//!
//! # Guarantees
//!
//! - A mutation's future resolves `Ok` only after the batch holding it was committed durably
//!   (its log record synced for redb; the durable image for [`MemoryBackend`] unless its
//!   `skip_sync` fault is on).
//! - A batch is atomic: after a crash either all of its writes are there or none.
//! - Updates of one key are serialized by the single writer: an update's closure sees the committed
//!   value plus every earlier update of the same batch.
//! - After a failed commit the [`Store`] fails every later mutation with [`StorageError::Failed`]
//!   (an ack after a failed fsync would be a lie); the node must restart and recover.
//! - Reads go straight to the backend and see committed state only (redb MVCC snapshots), never a
//!   batch in progress.
//!
//! # Reserved keys
//!
//! Keys of the [`Table::Meta`] table that start with [`RESERVED_META_PREFIX`] (`storage.`) belong to
//! this module (node identity, the byte counter); mutations of them through the [`Store`] are refused
//! with [`StorageError::ReservedKey`].

use std::ops::Bound;
use std::sync::Arc;

mod memory;
mod redb_backend;
mod store;
mod wal;

#[cfg(test)]
mod crash_tests;
#[cfg(test)]
mod tests;

pub use memory::MemoryBackend;
pub use redb_backend::{DEFAULT_CACHE_BYTES, RedbBackend, RedbOptions, log_path, second_log_path};
pub use store::{Durable, Store, StoreConfig, StoreMetrics, StoreStats, WriterMode};
pub use wal::{LogDevice, LogFile};

/// Prefix of the [`Table::Meta`] keys owned by the storage layer itself.
pub const RESERVED_META_PREFIX: &[u8] = b"storage.";

/// The tables of a node's database. Each maps byte keys to byte values, ordered by key bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    /// Replicated key-value data (the node's encoding of a key's versions).
    Data,
    /// Hinted-handoff writes held for unreachable primaries.
    Hints,
    /// Small node-local facts: identity, counters, ring state.
    Meta,
}

impl Table {
    /// Every table, in a fixed order.
    pub const ALL: [Table; 3] = [Table::Data, Table::Hints, Table::Meta];

    /// The table's stable name (also its name inside the redb file).
    pub fn name(self) -> &'static str {
        match self {
            Table::Data => "data",
            Table::Hints => "hints",
            Table::Meta => "meta",
        }
    }

    /// Position in [`Table::ALL`].
    pub(crate) fn index(self) -> usize {
        match self {
            Table::Data => 0,
            Table::Hints => 1,
            Table::Meta => 2,
        }
    }
}

/// One write of an atomic batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteOp {
    /// Insert or overwrite `key`.
    Put {
        table: Table,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    /// Remove `key`; removing a missing key is not an error.
    Delete { table: Table, key: Vec<u8> },
}

impl WriteOp {
    /// The table the op writes to.
    pub fn table(&self) -> Table {
        match self {
            WriteOp::Put { table, .. } | WriteOp::Delete { table, .. } => *table,
        }
    }
}

/// The key under which a client key is stored: its 8-byte big-endian ring position, then the
/// key, so one Merkle segment (a range of positions) is one contiguous range of stored keys.
pub fn data_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + key.len());
    k.extend_from_slice(&dynakv_core::hash::key_position(key).to_be_bytes());
    k.extend_from_slice(key);
    k
}

/// The ring position and client key of a stored key.
pub fn split_data_key(stored: &[u8]) -> Option<(u64, &[u8])> {
    let pos = u64::from_be_bytes(stored.get(..8)?.try_into().ok()?);
    Some((pos, &stored[8..]))
}

/// How much one [`Backend::scan`] page may hold. A page always holds at least one entry when the
/// range has one, so paging makes progress even past an entry larger than `max_bytes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanLimit {
    /// Most entries in a page; 0 is treated as 1.
    pub max_entries: usize,
    /// The page ends once its keys and values add up to this many bytes or more.
    pub max_bytes: usize,
}

impl ScanLimit {
    /// Byte budget of [`ScanLimit::entries`].
    pub const DEFAULT_MAX_BYTES: usize = 4 * 1024 * 1024;

    /// At most `max_entries` entries and [`ScanLimit::DEFAULT_MAX_BYTES`] bytes.
    pub fn entries(max_entries: usize) -> Self {
        ScanLimit {
            max_entries,
            max_bytes: Self::DEFAULT_MAX_BYTES,
        }
    }

    pub(crate) fn allows(&self, entries: usize, bytes: usize) -> bool {
        entries < self.max_entries.max(1) && (entries == 0 || bytes < self.max_bytes)
    }
}

/// One page of a scan, in key order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanPage {
    /// `(key, value)` pairs in ascending key order.
    pub entries: Vec<(Vec<u8>, Vec<u8>)>,
    /// `Some(last key of this page)` when the range holds more entries after this page: pass it as
    /// `Bound::Excluded` to get the next page. `None` when the range is exhausted.
    pub next: Option<Vec<u8>>,
}

/// Whether `(from, to)` can contain any key. `BTreeMap::range` panics on ranges that cannot, so every
/// backend checks first and answers such a scan with an empty page.
pub(crate) fn range_is_empty(from: Bound<&[u8]>, to: Bound<&[u8]>) -> bool {
    match (from, to) {
        (Bound::Included(a), Bound::Included(b)) => a > b,
        (Bound::Included(a), Bound::Excluded(b))
        | (Bound::Excluded(a), Bound::Included(b))
        | (Bound::Excluded(a), Bound::Excluded(b)) => a >= b,
        _ => false,
    }
}

/// The storage seam: a transactional, ordered byte map with three tables. Exactly two
/// implementations: [`RedbBackend`] and [`MemoryBackend`].
///
/// Reads may run concurrently with a commit and see either all of a batch or none of it.
/// Callers write only through the [`Store`], which keeps the counters in [`Table::Meta`] in step.
pub trait Backend: Send + Sync + std::fmt::Debug + 'static {
    /// The committed value of `key`, if any.
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;

    /// Entries with keys between `from` and `to`, in ascending key order, at most `limit` of them.
    fn scan(
        &self,
        table: Table,
        from: Bound<&[u8]>,
        to: Bound<&[u8]>,
        limit: ScanLimit,
    ) -> Result<ScanPage, StorageError>;

    /// Number of entries in `table`.
    fn len(&self, table: Table) -> Result<u64, StorageError>;

    /// Applies the whole batch atomically, in order, and returns only once it is durable.
    fn commit(&self, batch: &[WriteOp]) -> Result<(), StorageError>;

    /// Upkeep the writer runs after it has answered a committed batch (redb's checkpoint of its
    /// write-ahead log), so the batch that made it due is not held back by it.
    /// A failure here must make the next [`Backend::commit`] fail.
    fn maintain(&self) {}

    /// How long a commit takes in simulated time: a store whose writer is a task
    /// ([`WriterMode::Task`]) waits this long (tokio time) between applying a batch and
    /// committing it, as a disk's fsync would make it. Zero for real disks, whose commits take
    /// the time they take.
    fn simulated_commit_latency(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}

/// Errors of the storage layer. Variant names are stable: [`StorageError::label`] gives them as
/// metric labels. Each variant says whether state changed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    /// An I/O operation failed (read error, failed fsync, disk full). After a read nothing changed.
    /// After a failed commit the batch may or may not be on disk: nothing of it was acknowledged
    /// and the [`Store`] is now failed.
    #[error("storage I/O error while {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The database file is damaged or is not a database. Nothing was changed.
    #[error("storage is corrupt: {detail}")]
    Corrupt { detail: String },
    /// The storage engine refused an operation for a reason other than I/O or corruption (an
    /// internal limit, a poisoned transaction). Nothing was changed by it; when it comes from a
    /// commit the [`Store`] is now failed.
    #[error("storage engine error while {context}: {detail}")]
    Engine { context: String, detail: String },
    /// The database file is already opened by another process or another open in this one.
    /// Nothing was changed.
    #[error(
        "database {path} is already open elsewhere (another dynakv process on this data directory?)"
    )]
    InUse { path: String },
    /// An earlier commit failed, so this store takes no more writes until the node restarts and
    /// recovers from what is on disk. Nothing was changed.
    #[error("storage stopped taking writes after an earlier failure ({cause}); restart the node")]
    Failed {
        #[source]
        cause: Arc<StorageError>,
    },
    /// The data directory belongs to another node or cluster. Nothing was changed.
    #[error(
        "data directory belongs to node {found_node} of cluster {found_cluster}, not {expected_node} of cluster {expected_cluster}; point --data-dir elsewhere or wipe it"
    )]
    IdentityMismatch {
        expected_node: String,
        found_node: String,
        expected_cluster: String,
        found_cluster: String,
    },
    /// The key is reserved for the storage layer (see [`RESERVED_META_PREFIX`]). Nothing was
    /// changed.
    #[error("meta key {key:?} is reserved for the storage layer")]
    ReservedKey { key: String },
    /// The store was closed, or its writer went away (its runtime shut down). A mutation that
    /// gets it before it was queued changed nothing; one whose writer went away afterwards may or
    /// may not have been committed.
    #[error("storage is closed")]
    Closed,
}

impl StorageError {
    /// The variant's stable name, for metric labels.
    pub fn label(&self) -> &'static str {
        match self {
            StorageError::Io { .. } => "io",
            StorageError::Corrupt { .. } => "corrupt",
            StorageError::Engine { .. } => "engine",
            StorageError::InUse { .. } => "in_use",
            StorageError::Failed { .. } => "failed",
            StorageError::IdentityMismatch { .. } => "identity_mismatch",
            StorageError::ReservedKey { .. } => "reserved_key",
            StorageError::Closed => "closed",
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StorageError::Io {
            context: context.into(),
            source: Arc::new(source),
        }
    }
}
