//! [`RedbBackend`]: the three tables in one redb file, with a write-ahead log beside it: every
//! commit is synced to the log before it returns, and redb makes it durable at checkpoints, which
//! run on a thread of their own.

use std::collections::BTreeMap;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::ops::Bound;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::thread::JoinHandle;

use redb::{Database, Durability, ReadableDatabase, ReadableTableMetadata, TableDefinition};

use super::wal::{self, Header, Log, LogDevice, LogFile};
use super::{Backend, ScanLimit, ScanPage, StorageError, Table, WriteOp, range_is_empty};

/// The [`Table::Meta`] key holding the log's id and the lsn of the last checkpoint (two u64 LE).
const LOG_STATE_KEY: &[u8] = b"storage.wal";

type Def = TableDefinition<'static, &'static [u8], &'static [u8]>;

const DATA: Def = TableDefinition::new("data");
const HINTS: Def = TableDefinition::new("hints");
const META: Def = TableDefinition::new("meta");

fn definition(table: Table) -> Def {
    match table {
        Table::Data => DATA,
        Table::Hints => HINTS,
        Table::Meta => META,
    }
}

/// Deferred writes by table and key (`None`: deleted).
type Deferred = BTreeMap<(Table, Vec<u8>), Option<Vec<u8>>>;

/// Logged writes a checkpoint may leave waiting for redb before commits wait for it instead.
const MAX_DEFERRED_BYTES: u64 = 64 * 1024 * 1024;

/// Default of [`RedbOptions::cache_size_bytes`] (and of the node's `storage.cache_bytes`): with
/// it a node holding 1 M keys of 100 bytes stays under 300 MiB (docs/benchmarks.md).
pub const DEFAULT_CACHE_BYTES: usize = 160 * 1024 * 1024;

/// Options of [`RedbBackend::open_with`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedbOptions {
    /// Memory redb may use to cache pages. Default [`DEFAULT_CACHE_BYTES`] (redb's own default
    /// is 1 GiB).
    pub cache_size_bytes: usize,
    /// Verify the checksum of every page at every open, not only after a crash. Reads the whole
    /// file, so start-up takes time proportional to its size; without it, a file damaged outside
    /// redb may fail later, when the damaged page is read. Default off.
    pub check_integrity_on_open: bool,
    /// Checkpoint (one durable redb commit, then the log starts over) once the write-ahead log
    /// holds this many bytes of records. Bounds the log's size and the work of replaying it at
    /// open. Default 16 MiB.
    pub checkpoint_log_bytes: u64,
    /// ... or this many writes, whichever comes first. Bounds the memory of the pages redb keeps
    /// changed between checkpoints and the length of one checkpoint (each random write dirties a
    /// page or more). Default 8 192.
    pub checkpoint_log_ops: u64,
}

impl Default for RedbOptions {
    fn default() -> Self {
        RedbOptions {
            cache_size_bytes: DEFAULT_CACHE_BYTES,
            check_integrity_on_open: false,
            checkpoint_log_bytes: 16 * 1024 * 1024,
            checkpoint_log_ops: 8192,
        }
    }
}

/// The production [`Backend`]: one redb database file and its write-ahead log, two files
/// (`<file>.wal`, `<file>.wal.1`) used in turn.
///
/// Each [`Backend::commit`] applies the batch in a redb write transaction, appends it to the
/// active log as one record and syncs the log (`fdatasync`), and only then commits the
/// transaction, with [`Durability::None`]: one sequential append and sync per batch instead of
/// writing every B-tree page the batch touched. Once the active log holds
/// [`RedbOptions::checkpoint_log_bytes`] or [`RedbOptions::checkpoint_log_ops`], the next
/// [`Backend::maintain`] (which the store's writer calls after it has answered the batch)
/// checkpoints: it switches appends to the other log (emptied: everything in it is durable
/// since the previous checkpoint) and, on a thread of its own, commits durably, writing the lsn
/// of the last record of the log it left into [`Table::Meta`] in the same transaction.
///
/// redb has one writer at a time, and the checkpoint's commit holds it while it writes and syncs
/// the pages: commits meanwhile are appended to the log and synced (so acknowledged) but kept in
/// memory, where reads see them over the database, and applied to redb by the first commit after
/// the checkpoint. So no write waits for a checkpoint unless these deferred writes reach
/// [`MAX_DEFERRED_BYTES`].
///
/// Opening replays the records of both logs newer than the last checkpoint's lsn, so after a
/// crash the database holds every acknowledged batch. Reads use redb read transactions (MVCC
/// snapshots) and the deferred writes, never wait for a commit, and see only batches whose
/// record is durable.
pub struct RedbBackend {
    db: Arc<Database>,
    name: String,
    log: Mutex<LogState>,
    /// The deferred writes by key (`None`: deleted), newest value only. Empty outside
    /// checkpoints.
    deferred: RwLock<Deferred>,
    checkpoint_log_bytes: u64,
    checkpoint_log_ops: u64,
    /// Tests: checkpoint threads wait while this is set.
    #[cfg(test)]
    pub(super) hold_checkpoints: Arc<std::sync::atomic::AtomicBool>,
}

struct LogState {
    /// The two logs; appends go to `logs[active]`.
    logs: [Log; 2],
    active: usize,
    id: u64,
    /// Set when the log or a checkpoint failed: nothing more is committed.
    failed: Option<String>,
    /// Memory taken by the deferred writes (the log's batches a checkpoint kept out of redb,
    /// whose last state per key the `deferred` map holds), estimated by [`op_bytes`].
    pending_bytes: u64,
    /// The checkpoint under way.
    checkpoint: Option<JoinHandle<Result<(), StorageError>>>,
}

impl LogState {
    fn active_log(&mut self) -> &mut Log {
        &mut self.logs[self.active]
    }
}

impl fmt::Debug for RedbBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbBackend")
            .field("name", &self.name)
            .finish()
    }
}

impl RedbBackend {
    /// Opens the database file at `path` and its write-ahead log `<path>.wal`, creating them (and
    /// the tables) if the database does not exist, and applies the log's records that the last
    /// checkpoint did not cover. The parent directory must exist. After an unclean shutdown redb
    /// repairs the file first, which reads all of it.
    ///
    /// A new database is built as `<path>.creating` and renamed into place once its tables are
    /// durable: a crash while creating it leaves no half-written file at `path` (redb could not open
    /// one: its header would be incomplete), only a leftover that the next open deletes.
    ///
    /// A database whose log is missing, or belongs to another database, is refused as corrupt: its
    /// acknowledged writes might be lost.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StorageError> {
        Self::open_with(path, &RedbOptions::default())
    }

    /// [`RedbBackend::open`] with options.
    pub fn open_with(path: impl AsRef<Path>, options: &RedbOptions) -> Result<Self, StorageError> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let exists = path
            .try_exists()
            .map_err(|e| StorageError::io(format!("looking for {name}"), e))?;
        if !exists {
            create_fresh(path, options)?;
        }
        let builder = builder(options, &name);
        let db = open_guarded(&name, || builder.open(path))?;
        // redb holds the database's lock from here, so no other open reaches the logs.
        let logs = [
            Box::new(open_log_file(&log_path(path))?) as Box<dyn LogDevice>,
            Box::new(open_log_file(&second_log_path(path))?),
        ];
        Self::init(db, logs, name, options)
    }

    /// Opens (or creates) a database on any redb storage device with its log on `log`; the crash
    /// tests use devices that forget unsynced writes.
    pub fn open_on(
        storage: impl redb::StorageBackend,
        logs: [Box<dyn LogDevice>; 2],
        options: &RedbOptions,
    ) -> Result<Self, StorageError> {
        let name = "custom storage".to_owned();
        let builder = builder(options, &name);
        let db = open_guarded(&name, || builder.create_with_backend(storage))?;
        Self::init(db, logs, name, options)
    }

    // Creates the tables, so that reads never meet a missing one, then sets up the log: a new one
    // for a database without, or recovery from the one it has.
    fn init(
        db: Database,
        devices: [Box<dyn LogDevice>; 2],
        name: String,
        options: &RedbOptions,
    ) -> Result<Self, StorageError> {
        let err = |doing: &str, e: redb::Error| map_error(&format!("{doing} in {name}"), e);
        let txn = db
            .begin_write()
            .map_err(|e| err("creating tables", e.into()))?;
        for table in Table::ALL {
            txn.open_table(definition(table))
                .map_err(|e| err("creating tables", e.into()))?;
        }
        txn.commit().map_err(|e| err("creating tables", e.into()))?;

        let state = read_log_state(&db).map_err(|e| err("reading the log state", e))?;
        let state = match state {
            LogMeta::Absent => {
                // A new database (or one written before the log existed, all of it durable): the
                // log is made before the database names it, so a crash in between leaves a
                // database without a log state, which starts over here.
                let id = new_log_id();
                let [a, b] = devices;
                let create = |device| {
                    Log::create(device, id).map_err(|e| {
                        StorageError::io(format!("creating the write-ahead log of {name}"), e)
                    })
                };
                let logs = [create(a)?, create(b)?];
                write_log_state(&db, id, 0).map_err(|e| err("creating the log state", e))?;
                LogState::new(logs, id)
            }
            LogMeta::Damaged => {
                return Err(StorageError::Corrupt {
                    detail: format!(
                        "{name}: the write-ahead log state in the meta table is damaged"
                    ),
                });
            }
            LogMeta::At { id, lsn } => recover(&db, devices, &name, id, lsn)?,
        };
        Ok(RedbBackend {
            db: Arc::new(db),
            name,
            log: Mutex::new(state),
            deferred: RwLock::new(BTreeMap::new()),
            #[cfg(test)]
            hold_checkpoints: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            checkpoint_log_bytes: options.checkpoint_log_bytes.max(1),
            checkpoint_log_ops: options.checkpoint_log_ops.max(1),
        })
    }

    fn error(&self, doing: &str, error: impl Into<redb::Error>) -> StorageError {
        map_error(&format!("{doing} in {}", self.name), error.into())
    }
}

// Builds a new database beside `path` and renames it into place once it is complete and durable.
fn create_fresh(path: &Path, options: &RedbOptions) -> Result<(), StorageError> {
    let Some(file_name) = path.file_name() else {
        return Err(StorageError::io(
            format!("creating a database at {}", path.display()),
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
        ));
    };
    let mut temp_name = file_name.to_os_string();
    temp_name.push(".creating");
    let temp = path.with_file_name(temp_name);
    let temp_display = temp.display().to_string();
    match std::fs::remove_file(&temp) {
        Ok(()) => tracing::warn!(
            path = %temp_display,
            "removed a database left half-created by an earlier crash"
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(StorageError::io(format!("removing {temp_display}"), e)),
    }
    let builder = builder(options, &temp_display);
    let db = open_guarded(&temp_display, || builder.create(&temp))?;
    // Creating the tables commits (and syncs) the complete new file, and writes a new log over any
    // left from an earlier database of this name; then the file may take its name.
    let logs = [
        Box::new(open_log_file(&log_path(path))?) as Box<dyn LogDevice>,
        Box::new(open_log_file(&second_log_path(path))?),
    ];
    drop(RedbBackend::init(db, logs, temp_display.clone(), options)?);
    std::fs::rename(&temp, path).map_err(|e| {
        StorageError::io(format!("renaming {temp_display} to {}", path.display()), e)
    })?;
    sync_parent_dir(path)
}

/// The write-ahead log of the database at `path`: `<path>.wal`.
pub fn log_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(".wal");
    PathBuf::from(name)
}

/// The second write-ahead log of the database at `path`: `<path>.wal.1`.
pub fn second_log_path(path: &Path) -> PathBuf {
    let mut name = log_path(path).into_os_string();
    name.push(".1");
    PathBuf::from(name)
}

fn open_log_file(path: &Path) -> Result<LogFile, StorageError> {
    let existed = path
        .try_exists()
        .map_err(|e| StorageError::io(format!("looking for {}", path.display()), e))?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| StorageError::io(format!("opening {}", path.display()), e))?;
    if !existed {
        sync_parent_dir(path)?;
    }
    Ok(LogFile(file))
}

// Distinct for every database created: std's RandomState is seeded from the OS once per process
// and differs per instance; the clock and pid separate processes that might share a seed.
fn new_log_id() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    hasher.write_u128(nanos);
    hasher.write_u32(std::process::id());
    hasher.finish()
}

enum LogMeta {
    Absent,
    Damaged,
    At { id: u64, lsn: u64 },
}

fn read_log_state(db: &Database) -> Result<LogMeta, redb::Error> {
    let txn = db.begin_read()?;
    let meta = txn.open_table(META)?;
    let Some(value) = meta.get(LOG_STATE_KEY)? else {
        return Ok(LogMeta::Absent);
    };
    let value = value.value();
    let (Some(id), Some(lsn)) = (
        value.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()),
        value.get(8..16).and_then(|b| <[u8; 8]>::try_from(b).ok()),
    ) else {
        return Ok(LogMeta::Damaged);
    };
    if value.len() != 16 {
        return Ok(LogMeta::Damaged);
    }
    Ok(LogMeta::At {
        id: u64::from_le_bytes(id),
        lsn: u64::from_le_bytes(lsn),
    })
}

fn log_state_value(id: u64, lsn: u64) -> [u8; 16] {
    let mut value = [0u8; 16];
    value[..8].copy_from_slice(&id.to_le_bytes());
    value[8..].copy_from_slice(&lsn.to_le_bytes());
    value
}

// One durable commit recording that everything up to `lsn` is in the database.
fn write_log_state(db: &Database, id: u64, lsn: u64) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    {
        let mut meta = txn.open_table(META)?;
        meta.insert(LOG_STATE_KEY, log_state_value(id, lsn).as_slice())?;
    }
    txn.commit()?;
    Ok(())
}

// Applies `ops` to an open write transaction, one table at a time; ops of a table keep their
// batch order, which is all that matters inside one transaction.
fn apply(txn: &redb::WriteTransaction, ops: &[WriteOp]) -> Result<(), redb::Error> {
    for table in Table::ALL {
        write_table(
            txn,
            table,
            ops.iter()
                .filter(|op| op.table() == table)
                .map(|op| match op {
                    WriteOp::Put { key, value, .. } => (key.as_slice(), Some(value.as_slice())),
                    WriteOp::Delete { key, .. } => (key.as_slice(), None),
                }),
        )?;
    }
    Ok(())
}

/// Puts (`Some`) and removes (`None`) keys of one table, in the order given; opens the table only
/// when there is something to write.
fn write_table<'a>(
    txn: &redb::WriteTransaction,
    table: Table,
    entries: impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)>,
) -> Result<(), redb::Error> {
    let mut entries = entries.peekable();
    if entries.peek().is_none() {
        return Ok(());
    }
    let mut t = txn.open_table(definition(table))?;
    for (key, value) in entries {
        match value {
            Some(value) => {
                t.insert(key, value)?;
            }
            None => {
                t.remove(key)?;
            }
        }
    }
    Ok(())
}

fn apply_deferred(txn: &redb::WriteTransaction, deferred: &Deferred) -> Result<(), redb::Error> {
    for table in Table::ALL {
        write_table(
            txn,
            table,
            deferred
                .range((table, Vec::new())..)
                .take_while(|((t, _), _)| *t == table)
                .map(|((_, key), value)| (key.as_slice(), value.as_deref())),
        )?;
    }
    Ok(())
}

// Brings the database up to the end of its logs: the records of both after the last
// checkpoint are applied again in lsn order (they are blind puts and deletes, so applying them
// over a database that already holds some of them gives the same result), in one durable commit
// with the new checkpoint lsn, and both logs start over.
fn recover(
    db: &Database,
    devices: [Box<dyn LogDevice>; 2],
    name: &str,
    id: u64,
    checkpoint: u64,
) -> Result<LogState, StorageError> {
    let io_err = |e| StorageError::io(format!("reading the write-ahead log of {name}"), e);
    let mut records = Vec::new();
    let mut logs = Vec::new();
    for (i, device) in devices.into_iter().enumerate() {
        match wal::read_header(device.as_ref()).map_err(io_err)? {
            Header::Log(found) if found == id => {
                records.extend(wal::read_records(device.as_ref()).map_err(io_err)?);
                logs.push(Log::resume(device, checkpoint));
            }
            Header::Log(_) => {
                return Err(StorageError::Corrupt {
                    detail: format!(
                        "{name}: its write-ahead log belongs to another database; restore the \
                         files together, or wipe the data directory and let the node recover \
                         from its replicas"
                    ),
                });
            }
            // The second log of a database written before there were two: made here.
            Header::NotALog if i == 1 => logs.push(Log::create(device, id).map_err(|e| {
                StorageError::io(format!("creating the write-ahead log of {name}"), e)
            })?),
            Header::NotALog => {
                return Err(StorageError::Corrupt {
                    detail: format!(
                        "{name}: its write-ahead log is missing or damaged, so acknowledged writes \
                         may be lost; restore it, or wipe the data directory and let the node \
                         recover from its replicas"
                    ),
                });
            }
        }
    }
    let mut newer: Vec<_> = records.iter().filter(|r| r.lsn > checkpoint).collect();
    newer.sort_by_key(|r| r.lsn);
    for (expect, r) in (checkpoint + 1..).zip(newer.iter()) {
        if r.lsn != expect {
            return Err(StorageError::Corrupt {
                detail: format!(
                    "{name}: its write-ahead log resumes at record {} but the database holds \
                     records up to {} only; writes in between are lost",
                    r.lsn,
                    expect - 1
                ),
            });
        }
    }
    let last = newer.last().map_or(checkpoint, |r| r.lsn);
    if !newer.is_empty() {
        let err = |e: redb::Error| map_error(&format!("replaying the log into {name}"), e);
        let ops: usize = newer.iter().map(|r| r.ops.len()).sum();
        tracing::info!(
            database = %name,
            records = newer.len(),
            writes = ops,
            "replaying the write-ahead log after an unclean shutdown"
        );
        let txn = db.begin_write().map_err(|e| err(e.into()))?;
        for record in &newer {
            apply(&txn, &record.ops).map_err(err)?;
        }
        {
            let mut meta = txn.open_table(META).map_err(|e| err(e.into()))?;
            meta.insert(LOG_STATE_KEY, log_state_value(id, last).as_slice())
                .map_err(|e| err(e.into()))?;
        }
        txn.commit().map_err(|e| err(e.into()))?;
    }
    let [mut a, mut b] = <[Log; 2]>::try_from(logs)
        .map_err(|_| StorageError::io(name.to_string(), std::io::Error::other("two logs")))?;
    for log in [&mut a, &mut b] {
        log.reset_after(last)
            .map_err(|e| StorageError::io(format!("emptying the write-ahead log of {name}"), e))?;
    }
    Ok(LogState::new([a, b], id))
}

impl LogState {
    fn new(logs: [Log; 2], id: u64) -> Self {
        LogState {
            logs,
            active: 0,
            id,
            failed: None,
            pending_bytes: 0,
            checkpoint: None,
        }
    }
}

fn builder(options: &RedbOptions, name: &str) -> redb::Builder {
    let mut builder = Database::builder();
    builder.set_cache_size(options.cache_size_bytes);
    builder.set_check_integrity_on_open(options.check_integrity_on_open);
    let name = name.to_owned();
    let last_decile = AtomicU32::new(u32::MAX);
    builder.set_repair_callback(move |session| {
        // Progress is reported often; log each tenth once.
        let decile = (session.progress() * 10.0) as u32;
        if last_decile.swap(decile, Ordering::Relaxed) != decile {
            tracing::warn!(
                database = %name,
                progress = session.progress(),
                "repairing database after an unclean shutdown"
            );
        }
    });
    builder
}

// redb may panic on a file damaged outside redb (its own documentation says so for `open`); turn
// that into an error instead of taking the process down.
fn open_guarded(
    name: &str,
    open: impl FnOnce() -> Result<Database, redb::DatabaseError>,
) -> Result<Database, StorageError> {
    match catch_unwind(AssertUnwindSafe(open)) {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => Err(StorageError::InUse {
            path: name.to_owned(),
        }),
        Ok(Err(e)) => match map_error(&format!("opening {name}"), e.into()) {
            StorageError::Io { source, .. } if source.kind() == std::io::ErrorKind::InvalidData => {
                Err(StorageError::Corrupt {
                    detail: format!("{name} is not a redb database or is damaged: {source}"),
                })
            }
            other => Err(other),
        },
        Err(_) => Err(StorageError::Corrupt {
            detail: format!(
                "opening {name} panicked inside redb; the file is probably damaged \
                 (restore it from a replica by wiping the data directory)"
            ),
        }),
    }
}

// A new file's directory entry is durable only once its directory is synced.
fn sync_parent_dir(path: &Path) -> Result<(), StorageError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(parent)
        .and_then(|dir| dir.sync_all())
        .map_err(|e| StorageError::io(format!("syncing directory {}", parent.display()), e))
}

fn map_error(context: &str, error: redb::Error) -> StorageError {
    match error {
        redb::Error::Io(e) => StorageError::io(context, e),
        redb::Error::Corrupted(detail) => StorageError::Corrupt {
            detail: format!("{context}: {detail}"),
        },
        redb::Error::DatabaseAlreadyOpen => StorageError::InUse {
            path: context.to_owned(),
        },
        other => StorageError::Engine {
            context: context.to_owned(),
            detail: other.to_string(),
        },
    }
}

impl Backend for RedbBackend {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        {
            let deferred = self.deferred();
            if !deferred.is_empty()
                && let Some(value) = deferred.get(&(table, key.to_vec()))
            {
                return Ok(value.clone());
            }
        }
        let err = |e: redb::Error| self.error("reading", e);
        let txn = self.db.begin_read().map_err(|e| err(e.into()))?;
        let t = txn
            .open_table(definition(table))
            .map_err(|e| err(e.into()))?;
        let value = t.get(key).map_err(|e| err(e.into()))?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    fn scan(
        &self,
        table: Table,
        from: Bound<&[u8]>,
        to: Bound<&[u8]>,
        limit: ScanLimit,
    ) -> Result<ScanPage, StorageError> {
        let mut page = ScanPage::default();
        if range_is_empty(from, to) {
            return Ok(page);
        }
        // Deferred writes in the range, taken before the database is read: one applied in
        // between is then in both, with the same value.
        let deferred: Vec<(Vec<u8>, Option<Vec<u8>>)> = {
            let d = self.deferred();
            if d.is_empty() {
                Vec::new()
            } else {
                let own = |b: Bound<&[u8]>| match b {
                    Bound::Included(k) => Bound::Included((table, k.to_vec())),
                    Bound::Excluded(k) => Bound::Excluded((table, k.to_vec())),
                    Bound::Unbounded => Bound::Unbounded,
                };
                d.range((own(from), own(to)))
                    .filter(|((t, _), _)| *t == table)
                    .map(|((_, k), v)| (k.clone(), v.clone()))
                    .collect()
            }
        };
        let err = |e: redb::Error| self.error("scanning", e);
        let txn = self.db.begin_read().map_err(|e| err(e.into()))?;
        let t = txn
            .open_table(definition(table))
            .map_err(|e| err(e.into()))?;
        let mut bytes = 0usize;
        for entry in t.range::<&[u8]>((from, to)).map_err(|e| err(e.into()))? {
            if !limit.allows(page.entries.len(), bytes) {
                page.next = page.entries.last().map(|(k, _)| k.clone());
                break;
            }
            let (key, value) = entry.map_err(|e| err(e.into()))?;
            let (key, value) = (key.value().to_vec(), value.value().to_vec());
            bytes = bytes.saturating_add(key.len() + value.len());
            page.entries.push((key, value));
        }
        if !deferred.is_empty() {
            merge_deferred(&mut page, deferred);
        }
        Ok(page)
    }

    fn len(&self, table: Table) -> Result<u64, StorageError> {
        let err = |e: redb::Error| self.error("counting", e);
        let deferred: Vec<(Vec<u8>, bool)> = self
            .deferred()
            .iter()
            .filter(|((t, _), _)| *t == table)
            .map(|((_, k), v)| (k.clone(), v.is_some()))
            .collect();
        let txn = self.db.begin_read().map_err(|e| err(e.into()))?;
        let t = txn
            .open_table(definition(table))
            .map_err(|e| err(e.into()))?;
        let mut len = t.len().map_err(|e| err(e.into()))?;
        for (key, present) in deferred {
            let stored = t.get(key.as_slice()).map_err(|e| err(e.into()))?.is_some();
            match (stored, present) {
                (false, true) => len += 1,
                (true, false) => len = len.saturating_sub(1),
                _ => {}
            }
        }
        Ok(len)
    }

    fn commit(&self, batch: &[WriteOp]) -> Result<(), StorageError> {
        let mut state = self.log_state();
        self.collect_checkpoint(&mut state, false);
        if state.checkpoint.is_some() && state.pending_bytes >= MAX_DEFERRED_BYTES {
            // Bounded: wait for the checkpoint rather than keep more in memory.
            self.collect_checkpoint(&mut state, true);
        }
        if let Some(cause) = &state.failed {
            return Err(StorageError::Engine {
                context: format!("committing in {}", self.name),
                detail: format!("the write-ahead log failed earlier ({cause}); restart the node"),
            });
        }
        if state.checkpoint.is_some() {
            // The checkpoint holds redb's writer: log the batch, keep it for reads and for redb.
            self.append(&mut state, batch)?;
            {
                let mut deferred = self.deferred_mut();
                for op in batch {
                    match op {
                        WriteOp::Put { table, key, value } => {
                            deferred.insert((*table, key.clone()), Some(value.clone()))
                        }
                        WriteOp::Delete { table, key } => {
                            deferred.insert((*table, key.clone()), None)
                        }
                    };
                }
            }
            state.pending_bytes += batch.iter().map(op_bytes).sum::<u64>();
            return Ok(());
        }
        self.apply_pending(&mut state)?;
        let err = |e: redb::Error| self.error("committing", e);
        let mut txn = self.db.begin_write().map_err(|e| err(e.into()))?;
        txn.set_durability(Durability::None)
            .map_err(|e| self.error_detail("committing", e))?;
        // Dropping `txn` on an early return aborts it: nothing of the batch is written.
        apply(&txn, batch).map_err(err)?;
        self.append(&mut state, batch)?;
        // The batch is durable from here: a crash replays it from the log.
        if let Err(e) = txn.commit() {
            let error = err(e.into());
            state.failed = Some(error.to_string());
            return Err(error);
        }
        Ok(())
    }

    fn maintain(&self) {
        let mut state = self.log_state();
        self.collect_checkpoint(&mut state, false);
        if state.failed.is_some() || state.checkpoint.is_some() {
            return;
        }
        let log = state.active_log();
        if log.record_bytes() < self.checkpoint_log_bytes && log.ops() < self.checkpoint_log_ops {
            return;
        }
        // Everything logged goes into redb before the checkpoint that says so.
        if self.apply_pending(&mut state).is_err() {
            return;
        }
        let covered = state.active_log().last_lsn();
        let next = 1 - state.active;
        // The other log holds only records the previous checkpoint made durable (it finished).
        if let Err(e) = state.logs[next].reset_after(covered) {
            let error =
                StorageError::io(format!("emptying the write-ahead log of {}", self.name), e);
            tracing::error!(database = %self.name, %error, "write-ahead log checkpoint failed");
            state.failed = Some(error.to_string());
            return;
        }
        state.active = next;
        let (db, id, name) = (Arc::clone(&self.db), state.id, self.name.clone());
        #[cfg(test)]
        let hold = Arc::clone(&self.hold_checkpoints);
        let run = move || {
            #[cfg(test)]
            while hold.load(Ordering::Acquire) {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            checkpoint_to(&db, &name, id, covered)
        };
        match std::thread::Builder::new()
            .name("dynakv-checkpoint".into())
            .spawn(run)
        {
            Ok(handle) => state.checkpoint = Some(handle),
            Err(e) => {
                // No thread to be had: checkpoint here (the old way, the writer waits).
                tracing::warn!(database = %self.name, error = %e, "checkpoint thread not started");
                if let Err(error) = checkpoint_to(&self.db, &self.name, state.id, covered) {
                    tracing::error!(database = %self.name, %error, "write-ahead log checkpoint failed");
                    state.failed = Some(error.to_string());
                }
            }
        }
    }
}

/// The checkpoint itself: one durable commit saying the database holds every record up to
/// `covered`.
fn checkpoint_to(db: &Database, name: &str, id: u64, covered: u64) -> Result<(), StorageError> {
    write_log_state(db, id, covered).map_err(|e| map_error(&format!("checkpointing {name}"), e))
}

/// Memory a deferred write takes: its bytes, plus its map entry and two allocations.
fn op_bytes(op: &WriteOp) -> u64 {
    const ENTRY: usize = 96;
    match op {
        WriteOp::Put { key, value, .. } => (key.len() + value.len() + ENTRY) as u64,
        WriteOp::Delete { key, .. } => (key.len() + ENTRY) as u64,
    }
}

/// Puts deferred writes (`None`: deleted) into a page read from the database: those up to the
/// page's last key when it is cut short (later ones belong to later pages), all otherwise. A
/// page may grow by the deferred writes it takes in, which are bounded.
fn merge_deferred(page: &mut ScanPage, deferred: Vec<(Vec<u8>, Option<Vec<u8>>)>) {
    let limit = page.next.clone();
    let mut merged: BTreeMap<Vec<u8>, Vec<u8>> =
        std::mem::take(&mut page.entries).into_iter().collect();
    for (key, value) in deferred {
        if limit.as_ref().is_some_and(|last| key > *last) {
            break;
        }
        match value {
            Some(v) => merged.insert(key, v),
            None => merged.remove(&key),
        };
    }
    page.entries = merged.into_iter().collect();
}

impl RedbBackend {
    fn log_state(&self) -> MutexGuard<'_, LogState> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn deferred(&self) -> std::sync::RwLockReadGuard<'_, Deferred> {
        self.deferred.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn deferred_mut(&self) -> std::sync::RwLockWriteGuard<'_, Deferred> {
        self.deferred
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Tests: waits for the checkpoint under way, if any.
    #[cfg(test)]
    pub(super) fn wait_for_checkpoint(&self) {
        let mut state = self.log_state();
        self.collect_checkpoint(&mut state, true);
    }

    /// Appends a batch to the active log and syncs it; a failure stops every later commit.
    fn append(&self, state: &mut LogState, batch: &[WriteOp]) -> Result<(), StorageError> {
        if let Err(e) = state.active_log().append(batch) {
            let error = StorageError::io(
                format!("appending to the write-ahead log of {}", self.name),
                e,
            );
            state.failed = Some(error.to_string());
            return Err(error);
        }
        Ok(())
    }

    /// Takes the outcome of the checkpoint under way once it is done (with `wait`, waits for it).
    fn collect_checkpoint(&self, state: &mut LogState, wait: bool) {
        if !state
            .checkpoint
            .as_ref()
            .is_some_and(|h| wait || h.is_finished())
        {
            return;
        }
        let Some(handle) = state.checkpoint.take() else {
            return;
        };
        let outcome = handle.join().unwrap_or_else(|_| {
            Err(StorageError::Engine {
                context: format!("checkpointing {}", self.name),
                detail: "the checkpoint thread panicked".into(),
            })
        });
        if let Err(error) = outcome {
            // Every batch in the logs is acknowledged already; nothing more is committed.
            tracing::error!(database = %self.name, %error, "write-ahead log checkpoint failed");
            state.failed = Some(error.to_string());
        }
    }

    /// Applies the writes logged while a checkpoint held redb's writer (not durably: they are
    /// in the log), then drops them from memory. The deferred map holds the last of them per
    /// key, which is what applying every batch in order would leave, so it is all that is
    /// applied (in key order, and kept once in memory, not once per batch as well).
    fn apply_pending(&self, state: &mut LogState) -> Result<(), StorageError> {
        if self.deferred().is_empty() {
            return Ok(());
        }
        let err = |e: redb::Error| self.error("applying logged writes", e);
        let applied = (|| {
            let mut txn = self.db.begin_write().map_err(|e| err(e.into()))?;
            txn.set_durability(Durability::None)
                .map_err(|e| self.error_detail("applying logged writes", e))?;
            apply_deferred(&txn, &self.deferred()).map_err(err)?;
            txn.commit().map_err(|e| err(e.into()))
        })();
        if let Err(error) = applied {
            tracing::error!(database = %self.name, %error, "applying logged writes failed");
            state.failed = Some(error.to_string());
            return Err(error);
        }
        // In redb now: reads find them there.
        state.pending_bytes = 0;
        self.deferred_mut().clear();
        Ok(())
    }
}

impl Drop for RedbBackend {
    // A clean close leaves empty logs, so the next open has nothing to replay.
    fn drop(&mut self) {
        let mut guard = self.log_state();
        let state = &mut *guard;
        self.collect_checkpoint(state, true);
        if state.failed.is_some() || self.apply_pending(state).is_err() {
            return;
        }
        if state.logs.iter().all(|l| l.record_bytes() == 0) {
            return;
        }
        let covered = state.active_log().last_lsn();
        let done = checkpoint_to(&self.db, &self.name, state.id, covered).and_then(|()| {
            for log in &mut state.logs {
                log.reset_after(covered).map_err(|e| {
                    StorageError::io(format!("emptying the write-ahead log of {}", self.name), e)
                })?;
            }
            Ok(())
        });
        if let Err(error) = done {
            tracing::warn!(
                database = %self.name,
                %error,
                "checkpoint at close failed; the next open replays the log"
            );
        }
    }
}

impl RedbBackend {
    fn error_detail(&self, doing: &str, error: impl fmt::Display) -> StorageError {
        StorageError::Engine {
            context: format!("{doing} in {}", self.name),
            detail: error.to_string(),
        }
    }
}
