//! [`MemoryBackend`]: BTreeMaps with crash semantics, for tests and the deterministic simulation.
//!
//! It keeps two images of every table: the live one (what a running process reads: the page cache)
//! and the durable one (what survives a crash: the disk). A commit updates both, so a crash loses
//! nothing that was committed, unless a fault toggle says otherwise. Clones share the same images,
//! so a simulated host keeps its "disk" across a crash and restart.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::{Backend, ScanLimit, ScanPage, StorageError, Table, WriteOp, range_is_empty};

type Image = [BTreeMap<Vec<u8>, Vec<u8>>; 3];

#[derive(Debug, Default)]
struct Disk {
    live: Image,
    durable: Image,
    /// Fault: commits update only the live image (an "ack before fsync" bug).
    skip_sync: bool,
    /// Fault: commits fail with an I/O error and change nothing (a failed fsync, a full disk).
    fail_commits: bool,
    /// The live image holds commits the durable one lacks.
    unsynced: bool,
    /// See [`Backend::simulated_commit_latency`].
    commit_latency: std::time::Duration,
    commits: u64,
}

/// An in-memory [`Backend`] with a live and a durable image. Cheap to clone; clones share the disk.
#[derive(Clone, Debug, Default)]
pub struct MemoryBackend {
    disk: Arc<Mutex<Disk>>,
}

impl MemoryBackend {
    /// An empty disk.
    pub fn new() -> Self {
        Self::default()
    }

    // The maps stay consistent even if a thread panicked while holding the lock: every mutation
    // below is a single BTreeMap call or a whole-image assignment.
    fn disk(&self) -> MutexGuard<'_, Disk> {
        self.disk.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Fault toggle: while on, commits reach only the live image, so [`MemoryBackend::crash`] loses
    /// them although they were acknowledged. Used to prove the simulation's checker catches "ack
    /// before fsync".
    pub fn set_skip_sync(&self, on: bool) {
        self.disk().skip_sync = on;
    }

    /// Fault toggle: while on, every commit fails with [`StorageError::Io`] and changes nothing.
    pub fn set_fail_commits(&self, on: bool) {
        self.disk().fail_commits = on;
    }

    /// Every commit takes this long in simulated time (a task writer waits before committing),
    /// so a crash can fall between a batch's apply and its commit, as on a real disk.
    pub fn set_commit_latency(&self, latency: std::time::Duration) {
        self.disk().commit_latency = latency;
    }

    /// Simulates a power cut: the live image is replaced by the durable one. Nothing that was not
    /// synced survives. A store running on this backend must be closed or dropped first.
    pub fn crash(&self) {
        let mut disk = self.disk();
        disk.live = disk.durable.clone();
        disk.unsynced = false;
    }

    /// Number of commits that succeeded so far (both durable and `skip_sync` ones).
    pub fn commits(&self) -> u64 {
        self.disk().commits
    }
}

fn apply(image: &mut Image, batch: &[WriteOp]) {
    for op in batch {
        match op {
            WriteOp::Put { table, key, value } => {
                image[table.index()].insert(key.clone(), value.clone());
            }
            WriteOp::Delete { table, key } => {
                image[table.index()].remove(key);
            }
        }
    }
}

impl Backend for MemoryBackend {
    fn simulated_commit_latency(&self) -> std::time::Duration {
        self.disk().commit_latency
    }

    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.disk().live[table.index()].get(key).cloned())
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
        let disk = self.disk();
        let mut bytes = 0usize;
        let range = disk.live[table.index()].range::<[u8], _>((from, to));
        for (key, value) in range {
            if !limit.allows(page.entries.len(), bytes) {
                page.next = page.entries.last().map(|(k, _)| k.clone());
                break;
            }
            bytes = bytes.saturating_add(key.len() + value.len());
            page.entries.push((key.clone(), value.clone()));
        }
        Ok(page)
    }

    fn len(&self, table: Table) -> Result<u64, StorageError> {
        Ok(self.disk().live[table.index()].len() as u64)
    }

    fn commit(&self, batch: &[WriteOp]) -> Result<(), StorageError> {
        let mut disk = self.disk();
        if disk.fail_commits {
            return Err(StorageError::io(
                "committing a batch to the memory backend",
                std::io::Error::other("injected commit failure"),
            ));
        }
        apply(&mut disk.live, batch);
        if disk.skip_sync {
            disk.unsynced = true;
        } else if disk.unsynced {
            // A sync flushes every dirty page of the file, as fsync does: earlier skip_sync commits
            // become durable here too.
            disk.durable = disk.live.clone();
            disk.unsynced = false;
        } else {
            apply(&mut disk.durable, batch);
        }
        disk.commits += 1;
        Ok(())
    }
}
