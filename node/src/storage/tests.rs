//! The storage conformance suite: every case in `cases` runs against both backends (the
//! `conformance!` macro at the bottom writes one test per case and backend), as Garage's
//! `db/test.rs` does. Backend-specific tests follow it.

use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tempfile::TempDir;

use super::{
    Backend, MemoryBackend, RedbBackend, RedbOptions, ScanLimit, ScanPage, StorageError, Store,
    StoreConfig, StoreMetrics, StoreStats, Table, WriteOp, WriterMode,
};

fn b(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

fn metrics() -> StoreMetrics {
    StoreMetrics::new().expect("constant histogram options are valid")
}

/// Polls `condition` until it holds; gives up after 20 s, so a hang is a failure, not a stuck run.
async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    for _ in 0..20_000 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("timed out waiting until {what}");
}

/// A fresh "disk" of one kind, from which stores can be opened (and reopened) in turn.
pub(super) struct Harness {
    disk: Disk,
}

enum Disk {
    Memory(MemoryBackend),
    Redb(TempDir),
}

impl Harness {
    pub(super) fn memory() -> Self {
        Harness {
            disk: Disk::Memory(MemoryBackend::new()),
        }
    }

    pub(super) fn redb() -> Self {
        Harness {
            disk: Disk::Redb(tempfile::tempdir().expect("temp dir")),
        }
    }

    /// Opens the backend. For redb only one may be open at a time: close stores before reopening.
    fn backend(&self) -> Arc<dyn Backend> {
        match &self.disk {
            Disk::Memory(memory) => Arc::new(memory.clone()),
            Disk::Redb(dir) => {
                Arc::new(RedbBackend::open(dir.path().join("node.redb")).expect("open redb"))
            }
        }
    }

    /// The writer each backend is meant to run with.
    fn config(&self) -> StoreConfig {
        let writer = match self.disk {
            Disk::Memory(_) => WriterMode::Task(tokio::runtime::Handle::current()),
            Disk::Redb(_) => WriterMode::Thread,
        };
        StoreConfig {
            writer,
            ..StoreConfig::default()
        }
    }

    fn store(&self) -> Store {
        Store::open(self.backend(), self.config(), metrics()).expect("open store")
    }

    /// A store on a [`Controlled`] wrapper of the backend, with a dedicated writer thread (a held
    /// commit must not block a runtime worker).
    fn controlled_store(&self, config: StoreConfig) -> (Store, Arc<Controls>) {
        let controls = Arc::new(Controls::default());
        let backend = Arc::new(Controlled {
            inner: self.backend(),
            controls: Arc::clone(&controls),
        });
        let config = StoreConfig {
            writer: WriterMode::Thread,
            ..config
        };
        let store = Store::open(backend, config, metrics()).expect("open store");
        (store, controls)
    }
}

/// Test controls of a [`Controlled`] backend.
#[derive(Debug, Default)]
struct Controls {
    held: Mutex<bool>,
    /// `Backend::maintain` waits while this is set, until [`Controls::release_maintenance`].
    maintenance_held: Mutex<bool>,
    released: Condvar,
    fail: AtomicBool,
    commits_entered: AtomicUsize,
}

impl Controls {
    /// Commits from now on wait inside `commit` until [`Controls::release`].
    fn hold(&self) {
        *self.held.lock().expect("lock") = true;
    }

    fn release(&self) {
        *self.held.lock().expect("lock") = false;
        self.released.notify_all();
    }

    fn release_maintenance(&self) {
        *self.maintenance_held.lock().expect("lock") = false;
        self.released.notify_all();
    }
}

/// Wraps a backend; commits can be held (to line mutations up in the queue) or made to fail.
#[derive(Debug)]
struct Controlled {
    inner: Arc<dyn Backend>,
    controls: Arc<Controls>,
}

impl Backend for Controlled {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.get(table, key)
    }

    fn scan(
        &self,
        table: Table,
        from: Bound<&[u8]>,
        to: Bound<&[u8]>,
        limit: ScanLimit,
    ) -> Result<ScanPage, StorageError> {
        self.inner.scan(table, from, to, limit)
    }

    fn len(&self, table: Table) -> Result<u64, StorageError> {
        self.inner.len(table)
    }

    fn commit(&self, batch: &[WriteOp]) -> Result<(), StorageError> {
        self.controls.commits_entered.fetch_add(1, Ordering::SeqCst);
        let mut held = self.controls.held.lock().expect("lock");
        while *held {
            held = self.controls.released.wait(held).expect("lock");
        }
        drop(held);
        if self.controls.fail.load(Ordering::SeqCst) {
            return Err(StorageError::io(
                "committing",
                std::io::Error::other("injected fsync failure"),
            ));
        }
        self.inner.commit(batch)
    }

    fn maintain(&self) {
        let mut held = self.controls.maintenance_held.lock().expect("lock");
        while *held {
            held = self.controls.released.wait(held).expect("lock");
        }
        drop(held);
        self.inner.maintain();
    }
}

fn counter(value: Option<&[u8]>) -> u64 {
    value
        .and_then(|v| <[u8; 8]>::try_from(v).ok())
        .map_or(0, u64::from_le_bytes)
}

async fn increment(store: &Store, key: &[u8]) -> Result<u64, StorageError> {
    store
        .update(Table::Data, key.to_vec(), |current| {
            let next = counter(current) + 1;
            (Some(Some(next.to_le_bytes().to_vec())), next)
        })
        .await
}

/// Every key of a table, through paging.
fn scan_all(backend: &dyn Backend, table: Table, limit: ScanLimit) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut all = Vec::new();
    let mut next: Option<Vec<u8>> = None;
    loop {
        let from = next.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
        let page = backend
            .scan(table, from, Bound::Unbounded, limit)
            .expect("scan");
        assert!(page.entries.len() <= limit.max_entries.max(1));
        all.extend(page.entries);
        match page.next {
            Some(key) => next = Some(key),
            None => return all,
        }
    }
}

/// Polls every future in order on one task, so they queue in order (no `futures` crate here).
pub(super) async fn join_all<F: std::future::Future>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output> {
    let mut handles: Vec<_> = futures.map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = handles.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (handle, output) in handles.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match handle.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => *output = Some(value),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

mod cases {
    use super::*;

    pub(super) async fn a_missing_key_reads_as_none(h: &Harness) {
        let store = h.store();
        assert_eq!(store.get(Table::Data, b"nothing").unwrap(), None);
        assert_eq!(store.len(Table::Data).unwrap(), 0);
        store.close().await;
    }

    pub(super) async fn put_get_delete_round_trip_in_each_table(h: &Harness) {
        let store = h.store();
        for (i, table) in [Table::Data, Table::Hints, Table::Meta]
            .into_iter()
            .enumerate()
        {
            store.put(table, b("k"), vec![i as u8; 3]).await.unwrap();
        }
        for (i, table) in [Table::Data, Table::Hints, Table::Meta]
            .into_iter()
            .enumerate()
        {
            assert_eq!(store.get(table, b"k").unwrap(), Some(vec![i as u8; 3]));
        }
        store.put(Table::Data, b("k"), b("new")).await.unwrap();
        assert_eq!(store.get(Table::Data, b"k").unwrap(), Some(b("new")));
        store.delete(Table::Hints, b("k")).await.unwrap();
        assert_eq!(store.get(Table::Hints, b"k").unwrap(), None);
        assert_eq!(store.get(Table::Data, b"k").unwrap(), Some(b("new")));
        // Deleting a missing key is fine; empty keys and values are keys and values.
        store.delete(Table::Hints, b("absent")).await.unwrap();
        store
            .put(Table::Data, Vec::new(), Vec::new())
            .await
            .unwrap();
        assert_eq!(store.get(Table::Data, b"").unwrap(), Some(Vec::new()));
        assert_eq!(store.len(Table::Data).unwrap(), 2);
        assert_eq!(store.len(Table::Hints).unwrap(), 0);
        store.close().await;
    }

    pub(super) async fn scan_returns_keys_in_order_and_pages_through_them(h: &Harness) {
        let store = h.store();
        // Inserted out of order, with keys that sort differently as bytes than as numbers.
        let mut expected = Vec::new();
        for i in (0..100u32).rev() {
            let key = format!("key-{}", i * 7 % 100).into_bytes();
            let value = vec![i as u8; (i % 5) as usize];
            store
                .put(Table::Hints, key.clone(), value.clone())
                .await
                .unwrap();
            expected.push((key, value));
        }
        expected.sort();
        expected.dedup_by(|a, b| a.0 == b.0);
        let backend: &dyn Backend = store.backend().as_ref();
        for entries in [1, 7, 100, 1000] {
            assert_eq!(
                scan_all(backend, Table::Hints, ScanLimit::entries(entries)),
                expected
            );
        }
        // A byte budget ends pages early, but never before one entry.
        let tight = ScanLimit {
            max_entries: 1000,
            max_bytes: 1,
        };
        assert_eq!(scan_all(backend, Table::Hints, tight), expected);
        let first = store
            .scan(Table::Hints, Bound::Unbounded, Bound::Unbounded, tight)
            .unwrap();
        assert_eq!(first.entries.len(), 1);
        assert_eq!(first.next.as_deref(), Some(expected[0].0.as_slice()));
        // Bounds.
        let page = store
            .scan(
                Table::Hints,
                Bound::Included(b"key-10"),
                Bound::Excluded(b"key-13"),
                ScanLimit::entries(100),
            )
            .unwrap();
        let keys: Vec<_> = page.entries.iter().map(|(k, _)| k.clone()).collect();
        assert_eq!(keys, vec![b("key-10"), b("key-11"), b("key-12")]);
        assert_eq!(page.next, None, "an exhausted range has no next page");
        let page = store
            .scan(
                Table::Hints,
                Bound::Excluded(b"key-97"),
                Bound::Unbounded,
                ScanLimit::entries(100),
            )
            .unwrap();
        assert_eq!(page.entries.len(), 2); // key-98, key-99
        // A page that ends exactly at the end of the range says so.
        let page = store
            .scan(
                Table::Hints,
                Bound::Excluded(b"key-97"),
                Bound::Unbounded,
                ScanLimit::entries(2),
            )
            .unwrap();
        assert_eq!((page.entries.len(), page.next), (2, None));
        // Empty and inverted ranges are empty, not a panic.
        for (from, to) in [
            (Bound::Included(&b"b"[..]), Bound::Included(&b"a"[..])),
            (Bound::Excluded(&b"a"[..]), Bound::Excluded(&b"a"[..])),
            (Bound::Included(&b"a"[..]), Bound::Excluded(&b"a"[..])),
        ] {
            let page = store
                .scan(Table::Hints, from, to, ScanLimit::entries(10))
                .unwrap();
            assert_eq!(page, ScanPage::default());
        }
        // Tables do not leak into each other.
        assert!(scan_all(backend, Table::Data, ScanLimit::entries(10)).is_empty());
        store.close().await;
    }

    pub(super) async fn a_batch_is_applied_whole_and_readers_never_see_half_of_it(h: &Harness) {
        let backend = h.backend();
        // Order within a batch holds.
        backend
            .commit(&[
                WriteOp::Put {
                    table: Table::Data,
                    key: b("x"),
                    value: b("1"),
                },
                WriteOp::Delete {
                    table: Table::Data,
                    key: b("x"),
                },
                WriteOp::Delete {
                    table: Table::Data,
                    key: b("y"),
                },
                WriteOp::Put {
                    table: Table::Data,
                    key: b("y"),
                    value: b("2"),
                },
            ])
            .unwrap();
        assert_eq!(backend.get(Table::Data, b"x").unwrap(), None);
        assert_eq!(backend.get(Table::Data, b"y").unwrap(), Some(b("2")));
        backend.commit(&[]).unwrap();

        // A reader scanning both keys of each batch in one snapshot always sees them equal.
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (backend, stop) = (Arc::clone(&backend), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut checks = 0u64;
                while !stop.load(Ordering::SeqCst) || checks == 0 {
                    let page = backend
                        .scan(
                            Table::Data,
                            Bound::Included(b"pair-a"),
                            Bound::Included(b"pair-b"),
                            ScanLimit::entries(10),
                        )
                        .unwrap();
                    match page.entries.as_slice() {
                        [] => {}
                        [(_, a), (_, b)] => assert_eq!(a, b, "saw half a batch"),
                        other => panic!("saw half a batch: {other:?}"),
                    }
                    checks += 1;
                }
                checks
            })
        };
        for i in 0..200u32 {
            let value = i.to_le_bytes().to_vec();
            backend
                .commit(&[
                    WriteOp::Put {
                        table: Table::Data,
                        key: b("pair-a"),
                        value: value.clone(),
                    },
                    WriteOp::Put {
                        table: Table::Hints,
                        key: b("other-table"),
                        value: value.clone(),
                    },
                    WriteOp::Put {
                        table: Table::Data,
                        key: b("pair-b"),
                        value,
                    },
                ])
                .unwrap();
        }
        stop.store(true, Ordering::SeqCst);
        assert!(reader.join().expect("reader thread") > 0);
        assert_eq!(backend.len(Table::Data).unwrap(), 3);
        assert_eq!(backend.len(Table::Hints).unwrap(), 1);
    }

    pub(super) async fn two_updates_of_one_key_in_one_batch_compose(h: &Harness) {
        let (store, controls) = h.controlled_store(StoreConfig::default());
        let store = Arc::new(store);
        store.put(Table::Data, b("warm-up"), b("x")).await.unwrap();
        // Hold the writer inside a commit, queue two updates behind it, then let go: the second
        // batch holds both, and the second update must see the first one's write.
        controls.hold();
        let first = tokio::spawn({
            let store = Arc::clone(&store);
            async move { store.put(Table::Data, b("blocker"), b("x")).await }
        });
        wait_until("the writer is inside a commit", || {
            controls.commits_entered.load(Ordering::SeqCst) == 2
        })
        .await;
        let append = |suffix: &'static str| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .update(Table::Data, b("log"), move |current| {
                        let mut value = current.map(<[u8]>::to_vec).unwrap_or_default();
                        value.extend_from_slice(suffix.as_bytes());
                        (Some(Some(value.clone())), value)
                    })
                    .await
            })
        };
        let a = append("a");
        wait_until("one update is queued", || store.queue_len() == 1).await;
        let b_ = append("b");
        wait_until("both updates are queued", || store.queue_len() == 2).await;
        controls.release();
        first.await.unwrap().unwrap();
        assert_eq!(a.await.unwrap().unwrap(), b("a"));
        assert_eq!(b_.await.unwrap().unwrap(), b("ab"));
        assert_eq!(store.get(Table::Data, b"log").unwrap(), Some(b("ab")));
        assert_eq!(
            controls.commits_entered.load(Ordering::SeqCst),
            3,
            "both updates went into one commit"
        );
        Arc::into_inner(store).expect("sole owner").close().await;
    }

    pub(super) async fn concurrent_increments_of_one_key_never_lose_an_update(h: &Harness) {
        let store = Arc::new(h.store());
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    for _ in 0..10 {
                        seen.push(increment(&store, b"counter").await.unwrap());
                    }
                    seen
                })
            })
            .collect();
        let mut seen = Vec::new();
        for task in tasks {
            seen.extend(task.await.unwrap());
        }
        seen.sort_unstable();
        // Every increment saw a distinct predecessor: 1..=640, each exactly once.
        assert_eq!(seen, (1..=640).collect::<Vec<u64>>());
        assert_eq!(
            counter(store.get(Table::Data, b"counter").unwrap().as_deref()),
            640
        );
        Arc::into_inner(store).expect("sole owner").close().await;
    }

    pub(super) async fn an_update_that_writes_nothing_hands_back_its_result(h: &Harness) {
        let store = h.store();
        store.put(Table::Data, b("k"), b("v")).await.unwrap();
        let seen = store
            .update(Table::Data, b("k"), |current| {
                (None, current.map(<[u8]>::to_vec))
            })
            .await
            .unwrap();
        assert_eq!(seen, Some(b("v")));
        assert_eq!(store.get(Table::Data, b"k").unwrap(), Some(b("v")));
        let deleted = store
            .update(Table::Data, b("k"), |current| {
                (Some(None), current.is_some())
            })
            .await
            .unwrap();
        assert!(deleted);
        assert_eq!(store.get(Table::Data, b"k").unwrap(), None);
        store.close().await;
    }

    pub(super) async fn stats_count_data_keys_and_bytes_and_survive_reopen(h: &Harness) {
        let store = h.store();
        assert_eq!(store.stats(), Default::default());
        store.put(Table::Data, b("ab"), b("123")).await.unwrap(); // 5 bytes
        store.put(Table::Data, b("c"), b("4567")).await.unwrap(); // 5 bytes
        store.put(Table::Hints, b("h"), vec![0; 100]).await.unwrap(); // not data
        store.put(Table::Data, b("ab"), b("1")).await.unwrap(); // 5 -> 3 bytes
        store.delete(Table::Data, b("c")).await.unwrap();
        store.delete(Table::Data, b("never-there")).await.unwrap();
        store.put(Table::Data, b("d"), Vec::new()).await.unwrap(); // 1 byte
        let expected = StoreStats { keys: 2, bytes: 4 };
        assert_eq!(store.stats(), expected);
        store.close().await;
        let store = h.store();
        assert_eq!(store.stats(), expected);
        assert_eq!(store.len(Table::Data).unwrap(), expected.keys);
        store.close().await;
    }

    pub(super) async fn acknowledged_writes_are_there_after_reopen(h: &Harness) {
        let store = Arc::new(h.store());
        let writes: Vec<_> = (0..50u32)
            .map(|i| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    store
                        .put(Table::Data, i.to_be_bytes().to_vec(), vec![i as u8; 100])
                        .await
                })
            })
            .collect();
        for write in writes {
            write.await.unwrap().unwrap();
        }
        Arc::into_inner(store).expect("sole owner").close().await;
        let store = h.store();
        for i in 0..50u32 {
            assert_eq!(
                store.get(Table::Data, &i.to_be_bytes()).unwrap(),
                Some(vec![i as u8; 100])
            );
        }
        store.close().await;
    }

    pub(super) async fn identity_is_recorded_on_a_fresh_directory_and_accepted_after(h: &Harness) {
        let store = h.store();
        store.check_identity("kv-1", "prod").await.unwrap();
        store.check_identity("kv-1", "prod").await.unwrap();
        store.close().await;
        let store = h.store();
        store.check_identity("kv-1", "prod").await.unwrap();
        store.close().await;
    }

    pub(super) async fn a_foreign_data_directory_is_refused_and_left_untouched(h: &Harness) {
        let store = h.store();
        store.check_identity("kv-1", "X").await.unwrap();
        store.close().await;
        let store = h.store();
        let before = scan_all(
            store.backend().as_ref(),
            Table::Meta,
            ScanLimit::entries(100),
        );
        for (node, cluster) in [("kv-2", "Y"), ("kv-2", "X"), ("kv-1", "Y")] {
            let error = store.check_identity(node, cluster).await.unwrap_err();
            assert!(
                matches!(&error, StorageError::IdentityMismatch { expected_node, found_node, expected_cluster, found_cluster }
                    if expected_node == node && found_node == "kv-1"
                    && expected_cluster == cluster && found_cluster == "X"),
                "{error:?}"
            );
            assert_eq!(error.label(), "identity_mismatch");
        }
        let error = store.check_identity("kv-2", "Y").await.unwrap_err();
        assert_eq!(
            error.to_string(),
            "data directory belongs to node kv-1 of cluster X, not kv-2 of cluster Y; \
             point --data-dir elsewhere or wipe it"
        );
        let after = scan_all(
            store.backend().as_ref(),
            Table::Meta,
            ScanLimit::entries(100),
        );
        assert_eq!(before, after, "a refused identity writes nothing");
        assert!(!store.is_failed(), "a mismatch is not a storage failure");
        store.close().await;
    }

    pub(super) async fn reserved_meta_keys_are_refused(h: &Harness) {
        let store = h.store();
        let error = store
            .put(Table::Meta, b("storage.identity"), b("forged"))
            .await
            .unwrap_err();
        assert!(
            matches!(error, StorageError::ReservedKey { .. }),
            "{error:?}"
        );
        assert!(
            store
                .delete(Table::Meta, b("storage.data_bytes"))
                .await
                .is_err()
        );
        // The same key in another table, and other meta keys, are the caller's.
        store
            .put(Table::Data, b("storage.identity"), b("x"))
            .await
            .unwrap();
        store
            .put(Table::Meta, b("ring.version"), b("7"))
            .await
            .unwrap();
        store.close().await;
    }

    pub(super) async fn a_failed_commit_fails_its_batch_and_every_later_mutation(h: &Harness) {
        let (store, controls) = h.controlled_store(StoreConfig::default());
        let store = Arc::new(store);
        store.put(Table::Data, b("before"), b("1")).await.unwrap();
        // Line up three mutations in one batch, then fail its commit.
        controls.hold();
        let blocker = tokio::spawn({
            let store = Arc::clone(&store);
            async move { store.put(Table::Data, b("blocker"), b("x")).await }
        });
        wait_until("the writer is inside a commit", || {
            controls.commits_entered.load(Ordering::SeqCst) == 2
        })
        .await;
        let queued: Vec<_> = (0..3u8)
            .map(|i| {
                let store = Arc::clone(&store);
                tokio::spawn(async move { store.put(Table::Data, vec![i], b("lost")).await })
            })
            .collect();
        wait_until("three mutations are queued", || store.queue_len() == 3).await;
        controls.fail.store(true, Ordering::SeqCst);
        controls.release();
        let blocker = blocker.await.unwrap().unwrap_err();
        assert_eq!(blocker.label(), "io");
        for write in queued {
            // The batch after the failed one is never committed.
            let error = write.await.unwrap().unwrap_err();
            assert_eq!(error.label(), "failed", "{error:?}");
        }
        assert!(store.is_failed());
        assert_eq!(controls.commits_entered.load(Ordering::SeqCst), 2);
        // Later mutations fail at once, even if the disk recovered, and nothing is written.
        controls.fail.store(false, Ordering::SeqCst);
        let error = store
            .put(Table::Data, b("after"), b("x"))
            .await
            .unwrap_err();
        assert!(matches!(&error, StorageError::Failed { cause } if cause.label() == "io"));
        assert!(error.to_string().contains("restart"), "{error}");
        assert!(store.check_identity("kv-1", "c").await.is_err());
        assert_eq!(controls.commits_entered.load(Ordering::SeqCst), 2);
        // Reads still answer from what was committed.
        assert_eq!(store.get(Table::Data, b"before").unwrap(), Some(b("1")));
        assert_eq!(store.get(Table::Data, b"blocker").unwrap(), None);
        Arc::into_inner(store).expect("sole owner").close().await;
    }

    pub(super) async fn a_full_queue_makes_callers_wait(h: &Harness) {
        let config = StoreConfig {
            queue_capacity: 2,
            max_batch_ops: 1,
            ..StoreConfig::default()
        };
        let (store, controls) = h.controlled_store(config);
        let store = Arc::new(store);
        controls.hold();
        let writes: Vec<_> = (0..6u8)
            .map(|i| {
                let store = Arc::clone(&store);
                tokio::spawn(async move { store.put(Table::Data, vec![i], vec![i]).await })
            })
            .collect();
        // One in the held commit, two queued, three waiting to get into the queue.
        wait_until("the queue is full", || {
            store.queue_len() == 2 && controls.commits_entered.load(Ordering::SeqCst) == 1
        })
        .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(store.queue_len(), 2);
        assert!(writes.iter().all(|w| !w.is_finished()));
        controls.release();
        for write in writes {
            write.await.unwrap().unwrap();
        }
        assert_eq!(store.len(Table::Data).unwrap(), 6);
        assert_eq!(controls.commits_entered.load(Ordering::SeqCst), 6);
        Arc::into_inner(store).expect("sole owner").close().await;
    }

    pub(super) async fn close_finishes_every_queued_mutation(h: &Harness) {
        let (store, controls) = h.controlled_store(StoreConfig::default());
        controls.hold();
        // Queue 20 puts whose callers then give up (their futures are dropped): the mutations
        // stay queued behind the held commit.
        let puts = (0..20u8).map(|i| store.put(Table::Data, vec![i], vec![i]));
        let gave_up = tokio::time::timeout(Duration::from_millis(50), join_all(puts)).await;
        assert!(
            gave_up.is_err(),
            "no put can finish while the commit is held"
        );
        wait_until("the writer is inside the held commit", || {
            controls.commits_entered.load(Ordering::SeqCst) == 1
        })
        .await;
        let releaser = {
            let controls = Arc::clone(&controls);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                controls.release();
            })
        };
        store.close().await;
        releaser.join().expect("releaser thread");
        // close returned only after every queued put was committed.
        let backend = h.backend();
        assert_eq!(backend.len(Table::Data).unwrap(), 20);
    }

    pub(super) async fn a_panicking_update_reaches_its_caller_and_the_writer_goes_on(h: &Harness) {
        let store = Arc::new(h.store());
        let panicking = tokio::spawn({
            let store = Arc::clone(&store);
            async move {
                store
                    .update(Table::Data, b("k"), |_| -> (Option<Option<Vec<u8>>>, ()) {
                        panic!("bug in the caller's closure")
                    })
                    .await
            }
        });
        let error = panicking.await.unwrap_err();
        assert!(error.is_panic());
        store.put(Table::Data, b("k"), b("v")).await.unwrap();
        assert_eq!(store.get(Table::Data, b"k").unwrap(), Some(b("v")));
        assert!(!store.is_failed());
        Arc::into_inner(store).expect("sole owner").close().await;
    }
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod on_memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::cases::$case(&super::Harness::memory()).await;
                }
            )*
        }
        mod on_redb {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::cases::$case(&super::Harness::redb()).await;
                }
            )*
        }
    };
}

conformance!(
    a_missing_key_reads_as_none,
    put_get_delete_round_trip_in_each_table,
    scan_returns_keys_in_order_and_pages_through_them,
    a_batch_is_applied_whole_and_readers_never_see_half_of_it,
    two_updates_of_one_key_in_one_batch_compose,
    concurrent_increments_of_one_key_never_lose_an_update,
    an_update_that_writes_nothing_hands_back_its_result,
    stats_count_data_keys_and_bytes_and_survive_reopen,
    acknowledged_writes_are_there_after_reopen,
    identity_is_recorded_on_a_fresh_directory_and_accepted_after,
    a_foreign_data_directory_is_refused_and_left_untouched,
    reserved_meta_keys_are_refused,
    a_failed_commit_fails_its_batch_and_every_later_mutation,
    a_full_queue_makes_callers_wait,
    close_finishes_every_queued_mutation,
    a_panicking_update_reaches_its_caller_and_the_writer_goes_on,
);

// ---- MemoryBackend: crash semantics and faults ----

async fn memory_store(disk: &MemoryBackend) -> Store {
    let config = StoreConfig {
        writer: WriterMode::Task(tokio::runtime::Handle::current()),
        ..StoreConfig::default()
    };
    Store::open(Arc::new(disk.clone()), config, metrics()).expect("open store")
}

#[tokio::test]
async fn memory_crash_without_skip_sync_keeps_every_acknowledged_write() {
    let disk = MemoryBackend::new();
    let store = memory_store(&disk).await;
    for i in 0..10u8 {
        store.put(Table::Data, vec![i], vec![i]).await.unwrap();
    }
    store.close().await;
    disk.crash();
    let store = memory_store(&disk).await;
    assert_eq!(store.len(Table::Data).unwrap(), 10);
    assert_eq!(store.stats().keys, 10);
    store.close().await;
}

#[tokio::test]
async fn memory_crash_with_skip_sync_loses_acknowledged_writes() {
    let disk = MemoryBackend::new();
    let store = memory_store(&disk).await;
    store.put(Table::Data, b("synced"), b("1")).await.unwrap();
    disk.set_skip_sync(true);
    store.put(Table::Data, b("unsynced"), b("2")).await.unwrap();
    // Acknowledged and readable before the crash...
    assert_eq!(store.get(Table::Data, b"unsynced").unwrap(), Some(b("2")));
    assert_eq!(store.stats().keys, 2);
    store.close().await;
    disk.crash();
    disk.set_skip_sync(false);
    // ...gone after it, with the counters consistent with what survived.
    let store = memory_store(&disk).await;
    assert_eq!(store.get(Table::Data, b"unsynced").unwrap(), None);
    assert_eq!(store.get(Table::Data, b"synced").unwrap(), Some(b("1")));
    assert_eq!(store.stats(), StoreStats { keys: 1, bytes: 7 });
    store.close().await;
}

#[tokio::test]
async fn memory_sync_after_skipped_syncs_makes_them_durable() {
    let disk = MemoryBackend::new();
    let store = memory_store(&disk).await;
    disk.set_skip_sync(true);
    store.put(Table::Data, b("a"), b("1")).await.unwrap();
    disk.set_skip_sync(false);
    store.put(Table::Data, b("b"), b("2")).await.unwrap();
    store.close().await;
    disk.crash();
    assert_eq!(disk.len(Table::Data).unwrap(), 2);
}

#[tokio::test]
async fn memory_fail_commits_fault_stops_the_store() {
    let disk = MemoryBackend::new();
    let store = memory_store(&disk).await;
    store.put(Table::Data, b("a"), b("1")).await.unwrap();
    disk.set_fail_commits(true);
    let error = store.put(Table::Data, b("b"), b("2")).await.unwrap_err();
    assert_eq!(error.label(), "io");
    assert!(store.is_failed());
    disk.set_fail_commits(false);
    let error = store.put(Table::Data, b("c"), b("3")).await.unwrap_err();
    assert_eq!(error.label(), "failed");
    assert_eq!(disk.len(Table::Data).unwrap(), 1);
    store.close().await;
}

#[tokio::test]
async fn an_unreadable_identity_is_a_corrupt_error_and_is_left_alone() {
    let disk = MemoryBackend::new();
    let garbage = WriteOp::Put {
        table: Table::Meta,
        key: b("storage.identity"),
        value: vec![1, 200, 0, 0, 0, b'k'],
    };
    disk.commit(std::slice::from_ref(&garbage)).unwrap();
    let store = memory_store(&disk).await;
    let error = store.check_identity("kv-1", "c").await.unwrap_err();
    assert_eq!(error.label(), "corrupt", "{error}");
    assert_eq!(
        disk.get(Table::Meta, b"storage.identity").unwrap(),
        Some(vec![1, 200, 0, 0, 0, b'k'])
    );
    store.close().await;
}

#[tokio::test]
async fn identities_with_any_characters_round_trip() {
    let disk = MemoryBackend::new();
    let store = memory_store(&disk).await;
    store.check_identity("", "clüster\n:0").await.unwrap();
    store.close().await;
    let store = memory_store(&disk).await;
    store.check_identity("", "clüster\n:0").await.unwrap();
    assert!(store.check_identity("", "clüster").await.is_err());
    store.close().await;
}

#[tokio::test(flavor = "current_thread")]
async fn in_task_mode_mutations_queued_together_commit_together() {
    // On one thread the writer task runs only when the callers yield, so everything they queued
    // meanwhile is one batch: this is what makes the simulation deterministic.
    let disk = MemoryBackend::new();
    let store = memory_store(&disk).await;
    let (a, b_, c) = tokio::join!(
        increment(&store, b"n"),
        increment(&store, b"n"),
        increment(&store, b"n"),
    );
    assert_eq!((a.unwrap(), b_.unwrap(), c.unwrap()), (1, 2, 3));
    assert_eq!(disk.commits(), 1);
    store.close().await;
}

#[tokio::test]
async fn batches_respect_the_operation_limit() {
    let disk = MemoryBackend::new();
    let config = StoreConfig {
        max_batch_ops: 4,
        writer: WriterMode::Task(tokio::runtime::Handle::current()),
        ..StoreConfig::default()
    };
    let store = Arc::new(Store::open(Arc::new(disk.clone()), config, metrics()).unwrap());
    let writes: Vec<_> = (0..10u8)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.put(Table::Data, vec![i], vec![i]).await })
        })
        .collect();
    for write in writes {
        write.await.unwrap().unwrap();
    }
    assert!(
        disk.commits() >= 3,
        "10 writes need at least 3 batches of 4"
    );
    Arc::into_inner(store).expect("sole owner").close().await;
}

#[tokio::test]
async fn metrics_observe_every_commit() {
    let disk = MemoryBackend::new();
    let metrics = metrics();
    let registry = prometheus::Registry::new();
    metrics.register(&registry).unwrap();
    let config = StoreConfig {
        writer: WriterMode::Task(tokio::runtime::Handle::current()),
        ..StoreConfig::default()
    };
    let store = Store::open(Arc::new(disk.clone()), config, metrics.clone()).unwrap();
    for i in 0..3u8 {
        store.put(Table::Data, vec![i], vec![i]).await.unwrap();
    }
    store.close().await;
    assert_eq!(metrics.commit_seconds.get_sample_count(), 3);
    assert_eq!(metrics.batch_ops.get_sample_count(), 3);
    assert_eq!(metrics.batch_ops.get_sample_sum(), 3.0);
    let names: Vec<_> = registry
        .gather()
        .iter()
        .map(|f| f.name().to_owned())
        .collect();
    assert!(
        names.contains(&"dynakv_storage_commit_seconds".to_owned()),
        "{names:?}"
    );
}

#[tokio::test]
async fn a_missing_byte_count_is_recounted_at_open() {
    let disk = MemoryBackend::new();
    disk.commit(&[
        WriteOp::Put {
            table: Table::Data,
            key: b("ab"),
            value: b("cd"),
        },
        WriteOp::Put {
            table: Table::Data,
            key: b("e"),
            value: Vec::new(),
        },
    ])
    .unwrap();
    let store = memory_store(&disk).await;
    assert_eq!(store.stats(), StoreStats { keys: 2, bytes: 5 });
    store.close().await;
}

#[test]
fn a_store_dropped_outside_a_runtime_finishes_its_thread() {
    let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    let store = Store::open(Arc::clone(&backend), StoreConfig::default(), metrics()).unwrap();
    drop(store);
    assert_eq!(
        Arc::strong_count(&backend),
        1,
        "the writer thread let go of the backend"
    );
}

// ---- RedbBackend: opening ----

#[test]
fn opening_a_file_that_is_not_a_database_is_a_corrupt_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.redb");
    std::fs::write(&path, vec![0x5a; 10_000]).unwrap();
    let error = RedbBackend::open(&path).unwrap_err();
    assert_eq!(error.label(), "corrupt", "{error}");
    assert!(error.to_string().contains("node.redb"), "{error}");
}

#[test]
fn opening_a_database_twice_is_an_in_use_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.redb");
    let _first = RedbBackend::open(&path).unwrap();
    let error = RedbBackend::open(&path).unwrap_err();
    assert_eq!(error.label(), "in_use", "{error}");
}

#[test]
fn opening_in_a_missing_directory_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let error = RedbBackend::open(dir.path().join("missing").join("node.redb")).unwrap_err();
    assert_eq!(error.label(), "io", "{error}");
    assert!(error.to_string().contains("missing"), "{error}");
}

#[test]
fn a_database_left_half_created_by_a_crash_is_created_again() {
    let dir = tempfile::tempdir().unwrap();
    let leftover = dir.path().join("node.redb.creating");
    std::fs::write(&leftover, b"half a header").unwrap();
    let backend = RedbBackend::open(dir.path().join("node.redb")).unwrap();
    backend
        .commit(&[WriteOp::Put {
            table: Table::Data,
            key: b("k"),
            value: b("v"),
        }])
        .unwrap();
    assert!(!leftover.exists());
    drop(backend);
    let backend = RedbBackend::open(dir.path().join("node.redb")).unwrap();
    assert_eq!(backend.get(Table::Data, b"k").unwrap(), Some(b("v")));
}

#[test]
fn a_truncated_database_fails_to_open_without_panicking() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.redb");
    {
        let backend = RedbBackend::open(&path).unwrap();
        let big: Vec<WriteOp> = (0..200u32)
            .map(|i| WriteOp::Put {
                table: Table::Data,
                key: i.to_be_bytes().to_vec(),
                value: vec![7; 1000],
            })
            .collect();
        backend.commit(&big).unwrap();
    }
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 3]).unwrap();
    // Either redb repairs to an older state or it reports an error; it must not take us down.
    if let Ok(backend) = RedbBackend::open(&path) {
        let _ = backend.len(Table::Data);
    }
}

// ---- RedbBackend: the write-ahead log ----

fn put_op(key: &str, value: &str) -> WriteOp {
    WriteOp::Put {
        table: Table::Data,
        key: b(key),
        value: b(value),
    }
}

fn no_checkpoints() -> RedbOptions {
    RedbOptions {
        checkpoint_log_bytes: u64::MAX,
        checkpoint_log_ops: u64::MAX,
        ..RedbOptions::default()
    }
}

/// Copies the database and its log as they are on disk now, while the backend is open: what a
/// crash at this moment would leave (the page cache survives a process crash).
fn copy_as_crashed(from: &std::path::Path, to: &std::path::Path) {
    std::fs::copy(from, to).unwrap();
    std::fs::copy(super::log_path(from), super::log_path(to)).unwrap();
    std::fs::copy(super::second_log_path(from), super::second_log_path(to)).unwrap();
}

/// The longer of a database's two logs.
fn log_len(path: &std::path::Path) -> u64 {
    let a = std::fs::metadata(super::log_path(path)).unwrap().len();
    let b = std::fs::metadata(super::second_log_path(path))
        .unwrap()
        .len();
    a.max(b)
}

#[test]
fn writes_only_in_the_log_are_replayed_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let (path, crashed) = (
        dir.path().join("node.redb"),
        dir.path().join("crashed.redb"),
    );
    let backend = RedbBackend::open_with(&path, &no_checkpoints()).unwrap();
    for i in 0..50 {
        backend
            .commit(&[put_op(&format!("k{i}"), &format!("v{i}"))])
            .unwrap();
    }
    backend
        .commit(&[WriteOp::Delete {
            table: Table::Data,
            key: b("k7"),
        }])
        .unwrap();
    assert!(std::fs::metadata(super::log_path(&path)).unwrap().len() > 16);
    copy_as_crashed(&path, &crashed);
    drop(backend);

    let recovered = RedbBackend::open(&crashed).unwrap();
    assert_eq!(recovered.len(Table::Data).unwrap(), 49);
    assert_eq!(recovered.get(Table::Data, b"k49").unwrap(), Some(b("v49")));
    assert_eq!(recovered.get(Table::Data, b"k7").unwrap(), None);
    // Recovery checkpointed and emptied the log; later writes go on from there.
    assert_eq!(
        std::fs::metadata(super::log_path(&crashed)).unwrap().len(),
        16
    );
    recovered.commit(&[put_op("after", "crash")]).unwrap();
    copy_as_crashed(&crashed, &path);
    drop(recovered);
    let again = RedbBackend::open(&path).unwrap();
    assert_eq!(again.len(Table::Data).unwrap(), 50);
    assert_eq!(again.get(Table::Data, b"after").unwrap(), Some(b("crash")));
}

#[test]
fn a_clean_close_leaves_an_empty_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.redb");
    let backend = RedbBackend::open_with(&path, &no_checkpoints()).unwrap();
    backend.commit(&[put_op("k", "v")]).unwrap();
    drop(backend);
    assert_eq!(std::fs::metadata(super::log_path(&path)).unwrap().len(), 16);
    let backend = RedbBackend::open(&path).unwrap();
    assert_eq!(backend.get(Table::Data, b"k").unwrap(), Some(b("v")));
}

#[test]
fn checkpoints_keep_the_log_short() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.redb");
    let options = RedbOptions {
        checkpoint_log_ops: 10,
        ..RedbOptions::default()
    };
    let backend = RedbBackend::open_with(&path, &options).unwrap();
    let mut longest = 0;
    for i in 0..100 {
        backend
            .commit(&[put_op(&format!("k{i}"), &"x".repeat(100))])
            .unwrap();
        backend.maintain();
        backend.wait_for_checkpoint();
        longest = longest.max(log_len(&path));
    }
    // Ten records of about 130 bytes at most before each checkpoint empties it.
    assert!(longest < 16 + 10 * 200, "log grew to {longest} bytes");
    let crashed = dir.path().join("crashed.redb");
    copy_as_crashed(&path, &crashed);
    drop(backend);
    let recovered = RedbBackend::open(&crashed).unwrap();
    assert_eq!(recovered.len(Table::Data).unwrap(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stores_writer_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.redb");
    let options = RedbOptions {
        checkpoint_log_ops: 10,
        ..RedbOptions::default()
    };
    let backend = Arc::new(RedbBackend::open_with(&path, &options).unwrap());
    let config = StoreConfig {
        writer: WriterMode::Thread,
        ..StoreConfig::default()
    };
    let store = Store::open(backend, config, metrics()).unwrap();
    let second = super::second_log_path(&path);
    let mut switched = false;
    for i in 0..100 {
        store
            .put(Table::Data, b(&format!("k{i}")), b(&"x".repeat(100)))
            .await
            .unwrap();
        // Only a checkpoint, which Backend::maintain from the writer starts, moves appends to
        // the second log (how long the checkpoint takes does not matter to this).
        switched |= std::fs::metadata(&second).unwrap().len() > 16;
    }
    assert!(
        switched,
        "the writer never checkpointed: every record stayed in the first log"
    );
    store.close().await;
}

#[test]
fn writes_during_a_checkpoint_are_read_over_the_database_and_survive_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let (path, crashed) = (
        dir.path().join("node.redb"),
        dir.path().join("crashed.redb"),
    );
    let options = RedbOptions {
        checkpoint_log_ops: 1,
        ..RedbOptions::default()
    };
    let backend = RedbBackend::open_with(&path, &options).unwrap();
    backend
        .commit(&[put_op("k0", "v0"), put_op("k9", "v9")])
        .unwrap();
    backend
        .hold_checkpoints
        .store(true, std::sync::atomic::Ordering::Release);
    backend.maintain();
    // The checkpoint holds redb's writer: these are logged and kept in memory.
    for i in 1..=5 {
        backend
            .commit(&[put_op(&format!("k{i}"), &format!("v{i}"))])
            .unwrap();
    }
    backend
        .commit(&[
            WriteOp::Delete {
                table: Table::Data,
                key: b("k0"),
            },
            put_op("k9", "new"),
        ])
        .unwrap();
    backend.maintain(); // nothing: one checkpoint at a time
    let check = |backend: &RedbBackend, what: &str| {
        assert_eq!(backend.get(Table::Data, b"k0").unwrap(), None, "{what}");
        assert_eq!(
            backend.get(Table::Data, b"k3").unwrap(),
            Some(b("v3")),
            "{what}"
        );
        assert_eq!(
            backend.get(Table::Data, b"k9").unwrap(),
            Some(b("new")),
            "{what}"
        );
        assert_eq!(backend.len(Table::Data).unwrap(), 6, "{what}");
        // Pages of two, merged with the deferred writes page by page.
        let mut seen = Vec::new();
        let mut from: Option<Vec<u8>> = None;
        loop {
            let page = backend
                .scan(
                    Table::Data,
                    from.as_deref().map_or(Bound::Unbounded, Bound::Excluded),
                    Bound::Unbounded,
                    ScanLimit::entries(2),
                )
                .unwrap();
            seen.extend(page.entries.iter().map(|(k, v)| {
                format!(
                    "{}={}",
                    String::from_utf8_lossy(k),
                    String::from_utf8_lossy(v)
                )
            }));
            match page.next {
                Some(next) => from = Some(next),
                None => break,
            }
        }
        assert_eq!(
            seen,
            ["k1=v1", "k2=v2", "k3=v3", "k4=v4", "k5=v5", "k9=new"],
            "{what}"
        );
    };
    check(&backend, "during the checkpoint");
    // A crash now: the database has none of them durably; the logs have them all.
    copy_as_crashed(&path, &crashed);
    backend
        .hold_checkpoints
        .store(false, std::sync::atomic::Ordering::Release);
    backend.wait_for_checkpoint();
    backend.commit(&[put_op("k6", "v6")]).unwrap();
    backend
        .commit(&[WriteOp::Delete {
            table: Table::Data,
            key: b("k6"),
        }])
        .unwrap();
    check(&backend, "after the checkpoint");
    drop(backend);
    check(
        &RedbBackend::open(&crashed).unwrap(),
        "after a crash during the checkpoint",
    );
    check(&RedbBackend::open(&path).unwrap(), "after a clean close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_answered_before_the_checkpoint_it_makes_due() {
    let dir = tempfile::tempdir().unwrap();
    let options = RedbOptions {
        checkpoint_log_ops: 1,
        ..RedbOptions::default()
    };
    let controls = Arc::new(Controls::default());
    *controls.maintenance_held.lock().unwrap() = true;
    let backend = Arc::new(Controlled {
        inner: Arc::new(RedbBackend::open_with(dir.path().join("node.redb"), &options).unwrap()),
        controls: Arc::clone(&controls),
    });
    let config = StoreConfig {
        writer: WriterMode::Thread,
        ..StoreConfig::default()
    };
    let store = Store::open(backend, config, metrics()).unwrap();
    // The checkpoint this put makes due is held: the put is answered all the same.
    let put = store.put(Table::Data, b("k"), b("v"));
    let answered = tokio::time::timeout(Duration::from_secs(30), put).await;
    controls.release_maintenance();
    answered
        .expect("the put waited for the checkpoint")
        .unwrap();
    store.close().await;
}

#[test]
fn a_database_without_its_log_is_refused_as_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.redb");
    drop(RedbBackend::open(&path).unwrap());
    std::fs::remove_file(super::log_path(&path)).unwrap();
    let error = RedbBackend::open(&path).unwrap_err();
    assert_eq!(error.label(), "corrupt", "{error}");
    assert!(error.to_string().contains("write-ahead log"), "{error}");
}

#[test]
fn a_log_of_another_database_is_refused_as_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = (dir.path().join("a.redb"), dir.path().join("b.redb"));
    drop(RedbBackend::open(&first).unwrap());
    drop(RedbBackend::open(&second).unwrap());
    std::fs::copy(super::log_path(&first), super::log_path(&second)).unwrap();
    let error = RedbBackend::open(&second).unwrap_err();
    assert_eq!(error.label(), "corrupt", "{error}");
    assert!(error.to_string().contains("another database"), "{error}");
}

#[test]
fn a_log_that_lost_records_the_database_needs_is_refused_as_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let (path, crashed) = (
        dir.path().join("node.redb"),
        dir.path().join("crashed.redb"),
    );
    let backend = RedbBackend::open_with(&path, &no_checkpoints()).unwrap();
    backend.commit(&[put_op("a", "1")]).unwrap();
    let one_record = std::fs::metadata(super::log_path(&path)).unwrap().len();
    backend.commit(&[put_op("b", "2")]).unwrap();
    copy_as_crashed(&path, &crashed);
    drop(backend);
    // Drop the first record: the log now resumes after a gap.
    let log = std::fs::read(super::log_path(&crashed)).unwrap();
    let mut cut = log[..16].to_vec();
    cut.extend_from_slice(&log[one_record as usize..]);
    std::fs::write(super::log_path(&crashed), cut).unwrap();
    let error = RedbBackend::open(&crashed).unwrap_err();
    assert_eq!(error.label(), "corrupt", "{error}");
}

#[test]
fn a_new_database_replaces_a_stale_log_of_the_same_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.redb");
    let backend = RedbBackend::open_with(&path, &no_checkpoints()).unwrap();
    backend.commit(&[put_op("old", "1")]).unwrap();
    copy_as_crashed(&path, &dir.path().join("kept.redb"));
    drop(backend);
    // The database is wiped but its log left behind, full of records.
    std::fs::remove_file(&path).unwrap();
    std::fs::copy(
        super::log_path(&dir.path().join("kept.redb")),
        super::log_path(&path),
    )
    .unwrap();
    let fresh = RedbBackend::open(&path).unwrap();
    assert_eq!(fresh.len(Table::Data).unwrap(), 0);
    drop(fresh);
    let reopened = RedbBackend::open(&path).unwrap();
    assert_eq!(reopened.len(Table::Data).unwrap(), 0);
}

// ---- properties ----

mod properties {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    #[derive(Clone, Debug)]
    enum Op {
        Put(u8, Vec<u8>),
        Delete(u8),
        Append(u8, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..16, proptest::collection::vec(any::<u8>(), 0..8))
                .prop_map(|(k, v)| Op::Put(k, v)),
            (0u8..16).prop_map(Op::Delete),
            (0u8..16, any::<u8>()).prop_map(|(k, x)| Op::Append(k, x)),
        ]
    }

    /// Runs the ops concurrently in the given groups (one group queues together, so it tends to
    /// be one batch), then compares the table, the counters and every paging with a model.
    fn check(h: &Harness, groups: Vec<Vec<Op>>, page: usize) -> Result<(), TestCaseError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        let (stats, all) = runtime.block_on(async {
            let store = h.store();
            for group in &groups {
                let futures = group.iter().cloned().map(|op| {
                    let store = &store;
                    async move {
                        match op {
                            Op::Put(k, v) => store.put(Table::Data, vec![k], v).await,
                            Op::Delete(k) => store.delete(Table::Data, vec![k]).await,
                            Op::Append(k, x) => {
                                store
                                    .update(Table::Data, vec![k], move |current| {
                                        let mut v = current.map(<[u8]>::to_vec).unwrap_or_default();
                                        v.push(x);
                                        (Some(Some(v)), ())
                                    })
                                    .await
                            }
                        }
                    }
                });
                for result in join_all(futures).await {
                    result.expect("mutation");
                }
            }
            let all = scan_all(
                store.backend().as_ref(),
                Table::Data,
                ScanLimit::entries(page),
            );
            let stats = store.stats();
            store.close().await;
            (stats, all)
        });
        // Within a group the ops apply in queue order, which is the order they were polled in.
        for op in groups.into_iter().flatten() {
            match op {
                Op::Put(k, v) => {
                    model.insert(vec![k], v);
                }
                Op::Delete(k) => {
                    model.remove(&vec![k]);
                }
                Op::Append(k, x) => model.entry(vec![k]).or_default().push(x),
            }
        }
        let expected: Vec<_> = model.into_iter().collect();
        prop_assert_eq!(&all, &expected);
        prop_assert_eq!(stats.keys, expected.len() as u64);
        let bytes: usize = expected.iter().map(|(k, v)| k.len() + v.len()).sum();
        prop_assert_eq!(stats.bytes, bytes as u64);
        Ok(())
    }

    fn groups() -> impl Strategy<Value = Vec<Vec<Op>>> {
        proptest::collection::vec(proptest::collection::vec(op(), 1..8), 1..8)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn memory_store_matches_a_model(groups in groups(), page in 1usize..6) {
            check(&Harness::memory(), groups, page)?;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        #[test]
        fn redb_store_matches_a_model(groups in groups(), page in 1usize..6) {
            check(&Harness::redb(), groups, page)?;
        }
    }
}

#[tokio::test]
async fn an_early_update_answers_before_its_commit_and_is_lost_if_the_commit_never_happens() {
    let disk = MemoryBackend::new();
    let store = memory_store(&disk).await;
    let (seen, durable) = store
        .update_early(Table::Data, b"k".to_vec(), |current| {
            (Some(Some(b"v1".to_vec())), current.is_none())
        })
        .await
        .unwrap();
    assert!(seen, "the closure saw no earlier value");
    durable.await.unwrap();
    assert_eq!(
        store.get(Table::Data, b"k").unwrap().as_deref(),
        Some(&b"v1"[..]),
        "durable means committed and readable"
    );
    // A refused update (nothing to write) is durable at once and changes nothing.
    let (_, durable) = store
        .update_early(Table::Data, b"k".to_vec(), |_| (None, ()))
        .await
        .unwrap();
    durable.await.unwrap();
    assert_eq!(
        store.get(Table::Data, b"k").unwrap().as_deref(),
        Some(&b"v1"[..])
    );
    store.close().await;
    disk.crash();
    let store = memory_store(&disk).await;
    assert_eq!(
        store.get(Table::Data, b"k").unwrap().as_deref(),
        Some(&b"v1"[..]),
        "what Durable confirmed survives a crash"
    );
}

#[tokio::test]
async fn an_early_update_of_a_failed_store_reports_the_failure() {
    let disk = MemoryBackend::new();
    let store = memory_store(&disk).await;
    disk.set_fail_commits(true);
    let (_, durable) = store
        .update_early(Table::Data, b"k".to_vec(), |_| {
            (Some(Some(b"v".to_vec())), ())
        })
        .await
        .unwrap();
    assert!(durable.await.is_err(), "a failed commit is not durable");
    assert!(
        store
            .update_early(Table::Data, b"k".to_vec(), |_| (None, ()))
            .await
            .is_err(),
        "a failed store takes no more updates"
    );
}
