//! [`RedbBackend`]: the three tables in one redb file, every commit fsynced before it returns.

use std::fmt;
use std::ops::Bound;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use redb::{Database, Durability, ReadableDatabase, ReadableTableMetadata, TableDefinition};

use super::{Backend, ScanLimit, ScanPage, StorageError, Table, WriteOp, range_is_empty};

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

/// Options of [`RedbBackend::open_with`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedbOptions {
    /// Memory redb may use to cache pages. Default 256 MiB (redb's own default is 1 GiB).
    pub cache_size_bytes: usize,
    /// Verify the checksum of every page at every open, not only after a crash. Reads the whole
    /// file, so start-up takes time proportional to its size; without it, a file damaged outside
    /// redb may fail later, when the damaged page is read. Default off.
    pub check_integrity_on_open: bool,
}

impl Default for RedbOptions {
    fn default() -> Self {
        RedbOptions {
            cache_size_bytes: 256 * 1024 * 1024,
            check_integrity_on_open: false,
        }
    }
}

/// The production [`Backend`]: one redb database file. Each [`Backend::commit`] is one write
/// transaction with [`Durability::Immediate`]: it returns after fsync. Reads use redb read
/// transactions (MVCC snapshots) and never wait for a commit.
pub struct RedbBackend {
    db: Database,
    name: String,
}

impl fmt::Debug for RedbBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbBackend")
            .field("name", &self.name)
            .finish()
    }
}

impl RedbBackend {
    /// Opens the database file at `path`, creating it (and its tables) if it does not exist. The
    /// parent directory must exist. After an unclean shutdown redb repairs the file first, which
    /// reads all of it.
    ///
    /// A new database is built as `<path>.creating` and renamed into place once its tables are
    /// durable: a crash while creating it leaves no half-written file at `path` (redb could not open
    /// one: its header would be incomplete), only a leftover that the next open deletes.
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
        Self::init(db, name)
    }

    /// Opens (or creates) a database on any redb storage device; the crash tests use one that
    /// forgets unsynced writes.
    pub fn open_on(
        storage: impl redb::StorageBackend,
        options: &RedbOptions,
    ) -> Result<Self, StorageError> {
        let name = "custom storage".to_owned();
        let builder = builder(options, &name);
        let db = open_guarded(&name, || builder.create_with_backend(storage))?;
        Self::init(db, name)
    }

    // Creates the tables, so that reads never meet a missing one.
    fn init(db: Database, name: String) -> Result<Self, StorageError> {
        let backend = RedbBackend { db, name };
        let txn = backend
            .db
            .begin_write()
            .map_err(|e| backend.error("creating tables", e))?;
        for table in Table::ALL {
            txn.open_table(definition(table))
                .map_err(|e| backend.error("creating tables", e))?;
        }
        txn.commit()
            .map_err(|e| backend.error("creating tables", e))?;
        Ok(backend)
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
    // Creating the tables commits (and syncs) the complete new file; then it may take its name.
    drop(RedbBackend::init(db, temp_display.clone())?);
    std::fs::rename(&temp, path).map_err(|e| {
        StorageError::io(format!("renaming {temp_display} to {}", path.display()), e)
    })?;
    sync_parent_dir(path)
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
        Ok(page)
    }

    fn len(&self, table: Table) -> Result<u64, StorageError> {
        let err = |e: redb::Error| self.error("counting", e);
        let txn = self.db.begin_read().map_err(|e| err(e.into()))?;
        let t = txn
            .open_table(definition(table))
            .map_err(|e| err(e.into()))?;
        t.len().map_err(|e| err(e.into()))
    }

    fn commit(&self, batch: &[WriteOp]) -> Result<(), StorageError> {
        let err = |e: redb::Error| self.error("committing", e);
        let mut txn = self.db.begin_write().map_err(|e| err(e.into()))?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| self.error_detail("committing", e))?;
        // One open per table; ops of a table keep their batch order, which is all that matters
        // inside one transaction.
        for table in Table::ALL {
            if !batch.iter().any(|op| op.table() == table) {
                continue;
            }
            let mut t = txn
                .open_table(definition(table))
                .map_err(|e| err(e.into()))?;
            for op in batch.iter().filter(|op| op.table() == table) {
                match op {
                    WriteOp::Put { key, value, .. } => {
                        t.insert(key.as_slice(), value.as_slice())
                            .map_err(|e| err(e.into()))?;
                    }
                    WriteOp::Delete { key, .. } => {
                        t.remove(key.as_slice()).map_err(|e| err(e.into()))?;
                    }
                }
            }
        }
        // Dropping `txn` on an early return above aborts it: nothing of the batch is written.
        txn.commit().map_err(|e| err(e.into()))
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
