//! Crash consistency of redb under the group-commit [`Store`], in the style of redb's
//! `tests/crash_consistency.rs`: redb runs on a storage device that keeps a live and a durable
//! image. From the N-th sync on, the device stops making anything durable (the power is cut there,
//! though the process runs on); the writes issued after the last durable sync are kept in order,
//! and a crash image is the durable image plus any prefix of them (a disk that persists writes in
//! the order they were issued may have got that far). Every write acknowledged before the cut must
//! be in every crash image, and every crash image must open.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use redb::StorageBackend;
use redb::backends::InMemoryBackend;

use super::{
    Backend, RedbBackend, RedbOptions, ScanLimit, Store, StoreConfig, StoreMetrics, Table,
    WriterMode,
};

enum Unsynced {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

#[derive(Default)]
struct DeviceState {
    live: Vec<u8>,
    durable: Vec<u8>,
    /// Writes since the last durable sync, in issue order.
    unsynced: Vec<Unsynced>,
    syncs: u64,
    /// From this sync on, nothing becomes durable.
    cut_at: Option<u64>,
}

#[derive(Clone, Default)]
struct Device {
    state: Arc<Mutex<DeviceState>>,
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Device")
    }
}

fn offset_range(offset: u64, len: usize) -> std::io::Result<std::ops::Range<usize>> {
    let start = usize::try_from(offset).map_err(std::io::Error::other)?;
    Ok(start..start + len)
}

fn apply(image: &mut Vec<u8>, write: &Unsynced) {
    match write {
        Unsynced::Write(offset, data) => {
            let range = offset_range(*offset, data.len()).expect("offset fits");
            if image.len() < range.end {
                image.resize(range.end, 0);
            }
            image[range].copy_from_slice(data);
        }
        Unsynced::SetLen(len) => image.resize(usize::try_from(*len).expect("length fits"), 0),
    }
}

impl Device {
    fn cut_at(sync: u64) -> Self {
        let device = Device::default();
        device.state().cut_at = Some(sync);
        device
    }

    fn state(&self) -> MutexGuard<'_, DeviceState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn syncs(&self) -> u64 {
        self.state().syncs
    }

    /// Whether the power has been cut: nothing synced from now on is durable.
    fn is_cut(&self) -> bool {
        let state = self.state();
        state.cut_at.is_some_and(|cut| state.syncs >= cut)
    }

    fn unsynced_writes(&self) -> usize {
        self.state().unsynced.len()
    }

    /// The disk after the crash: the durable image plus the first `prefix` unsynced writes.
    fn crash_image(&self, prefix: usize) -> Vec<u8> {
        let state = self.state();
        let mut image = state.durable.clone();
        for write in state.unsynced.iter().take(prefix) {
            apply(&mut image, write);
        }
        image
    }
}

impl StorageBackend for Device {
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.state().live.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        let state = self.state();
        let range = offset_range(offset, out.len())?;
        let data = state
            .live
            .get(range)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        out.copy_from_slice(data);
        Ok(())
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        let mut state = self.state();
        let write = Unsynced::SetLen(len);
        apply(&mut state.live, &write);
        state.unsynced.push(write);
        Ok(())
    }

    fn sync_data(&self) -> std::io::Result<()> {
        let mut state = self.state();
        state.syncs += 1;
        if state.cut_at.is_none_or(|cut| state.syncs < cut) {
            state.durable = state.live.clone();
            state.unsynced.clear();
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut state = self.state();
        let write = Unsynced::Write(offset, data.to_vec());
        apply(&mut state.live, &write);
        state.unsynced.push(write);
        Ok(())
    }
}

/// A write that was acknowledged before the power cut.
#[derive(Clone, Debug)]
enum Acked {
    /// A put; `true` if the workload deletes the key later (unless the delete is acknowledged too,
    /// the key may or may not be there).
    Put(Vec<u8>, Vec<u8>, bool),
    Delete(Vec<u8>),
    /// The counter had reached at least this value.
    Counter(Vec<u8>, u64),
}

fn counter(value: Option<&[u8]>) -> u64 {
    value
        .and_then(|v| <[u8; 8]>::try_from(v).ok())
        .map_or(0, u64::from_le_bytes)
}

fn put_key(task: usize, i: usize) -> Vec<u8> {
    format!("t{task}-{i:03}").into_bytes()
}

/// Six writers: puts of values up to 6 KB (so the file grows), increments of two shared counters,
/// and deletes of their own earlier puts. Returns the writes acknowledged before the cut.
async fn workload(device: &Device, max_batch_ops: usize) -> Vec<Acked> {
    let backend = RedbBackend::open_on(device.clone(), &RedbOptions::default()).expect("open");
    let config = StoreConfig {
        max_batch_ops,
        writer: WriterMode::Thread,
        ..StoreConfig::default()
    };
    let metrics = StoreMetrics::new().expect("metrics");
    let store = Arc::new(Store::open(Arc::new(backend), config, metrics).expect("store"));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let tasks: Vec<_> = (0..6)
        .map(|task| {
            let (store, acked, device) = (Arc::clone(&store), Arc::clone(&acked), device.clone());
            tokio::spawn(async move {
                for i in 0..30 {
                    let write = match i % 3 {
                        0 => {
                            let (key, value) = (put_key(task, i), vec![i as u8; 50 + i * 200]);
                            store
                                .put(Table::Data, key.clone(), value.clone())
                                .await
                                .map(|()| Acked::Put(key, value, i % 6 == 0))
                        }
                        1 => {
                            let key = format!("counter-{}", task % 2).into_bytes();
                            store
                                .update(Table::Data, key.clone(), |current| {
                                    let next = counter(current) + 1;
                                    (Some(Some(next.to_le_bytes().to_vec())), next)
                                })
                                .await
                                .map(|n| Acked::Counter(key, n))
                        }
                        _ if i % 6 == 2 => {
                            let key = put_key(task, i - 2);
                            store
                                .delete(Table::Data, key.clone())
                                .await
                                .map(|()| Acked::Delete(key))
                        }
                        _ => {
                            let key = format!("hint-{task}-{i}").into_bytes();
                            store.put(Table::Hints, key, vec![1; 10]).await.map(|()| {
                                let key = format!("hint-{task}-{i}").into_bytes();
                                Acked::Put(key, vec![1; 10], false)
                            })
                        }
                    };
                    let write = write.expect("the device never fails a write");
                    // Checked after the ack: if the power was not cut yet, the sync behind this
                    // ack was durable.
                    if !device.is_cut() {
                        acked.lock().expect("lock").push(write);
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("writer task");
    }
    Arc::into_inner(store).expect("sole owner").close().await;
    acked.lock().expect("lock").clone()
}

/// Opens a crash image and checks that it holds every acknowledged write and consistent counters.
async fn verify(image: &[u8], acked: &[Acked], what: &str) {
    let storage = InMemoryBackend::new();
    storage.set_len(image.len() as u64).expect("set_len");
    storage.write(0, image).expect("write");
    let backend = RedbBackend::open_on(storage, &RedbOptions::default())
        .unwrap_or_else(|e| panic!("{what}: the crash image does not open: {e}"));
    for write in acked {
        match write {
            Acked::Put(key, value, false) => {
                let table = if key.starts_with(b"hint") {
                    Table::Hints
                } else {
                    Table::Data
                };
                assert_eq!(
                    backend.get(table, key).expect("get").as_ref(),
                    Some(value),
                    "{what}: lost acknowledged put of {}",
                    String::from_utf8_lossy(key)
                );
            }
            Acked::Put(..) => {}
            Acked::Delete(key) => assert_eq!(
                backend.get(Table::Data, key).expect("get"),
                None,
                "{what}: acknowledged delete of {} undone",
                String::from_utf8_lossy(key)
            ),
            Acked::Counter(key, at_least) => {
                let value = counter(backend.get(Table::Data, key).expect("get").as_deref());
                assert!(
                    value >= *at_least,
                    "{what}: counter {} is {value}, but {at_least} was acknowledged",
                    String::from_utf8_lossy(key)
                );
            }
        }
    }
    // The byte counter is committed with the data it counts.
    let mut bytes = 0u64;
    let mut from: Option<Vec<u8>> = None;
    loop {
        let page = backend
            .scan(
                Table::Data,
                from.as_deref()
                    .map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded),
                std::ops::Bound::Unbounded,
                ScanLimit::entries(64),
            )
            .expect("scan");
        bytes += page
            .entries
            .iter()
            .map(|(k, v)| (k.len() + v.len()) as u64)
            .sum::<u64>();
        match page.next {
            Some(next) => from = Some(next),
            None => break,
        }
    }
    let keys = backend.len(Table::Data).expect("len");
    let metrics = StoreMetrics::new().expect("metrics");
    let store = Store::open(Arc::new(backend), StoreConfig::default(), metrics).expect("store");
    assert_eq!(
        (store.stats().keys, store.stats().bytes),
        (keys, bytes),
        "{what}: counters"
    );
    store.close().await;

    // And redb itself finds the recovered file sound.
    let storage = InMemoryBackend::new();
    storage.set_len(image.len() as u64).expect("set_len");
    storage.write(0, image).expect("write");
    let mut db = redb::Database::builder()
        .create_with_backend(storage)
        .expect("open for the integrity check");
    assert!(
        db.check_integrity().expect("integrity check"),
        "{what}: integrity"
    );
}

/// Syncs that opening a fresh database takes (not counting those of closing it).
fn syncs_to_create() -> u64 {
    let probe = Device::default();
    let backend = RedbBackend::open_on(probe.clone(), &RedbOptions::default()).expect("open");
    let syncs = probe.syncs();
    drop(backend);
    syncs
}

async fn power_cut_at_every_sync(max_batch_ops: usize) {
    // A probe run without a cut tells how many syncs creating the database and the workload take.
    let init_syncs = syncs_to_create();
    let probe = Device::default();
    let acked = workload(&probe, max_batch_ops).await;
    let total_syncs = probe.syncs();
    verify(&probe.crash_image(usize::MAX), &acked, "no cut").await;

    // Cut at every sync after the database exists (at most ~40 runs), then crash with 0, some or
    // all of the writes issued after the cut on disk.
    let step = ((total_syncs - init_syncs) / 40).max(1);
    let mut required = 0;
    for cut in (init_syncs + 1..=total_syncs).step_by(step as usize) {
        let device = Device::cut_at(cut);
        let acked = workload(&device, max_batch_ops).await;
        required += acked.len();
        let unsynced = device.unsynced_writes();
        for prefix in [0, unsynced / 3, unsynced / 2, unsynced] {
            let what = format!(
                "batches of {max_batch_ops}, cut at sync {cut} of {total_syncs}, \
                 {prefix}/{unsynced} later writes on disk"
            );
            verify(&device.crash_image(prefix), &acked, &what).await;
        }
    }
    assert!(required > 0, "some cut came after some acknowledged writes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_a_power_cut_at_any_sync_with_group_commit() {
    power_cut_at_every_sync(8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_a_power_cut_at_any_sync_one_write_per_commit() {
    power_cut_at_every_sync(1).await;
}

// Why RedbBackend::open creates a database under a temporary name: a file whose creation was cut
// short may not open at all. It must be refused with a typed error, never a panic.
#[test]
fn a_database_cut_short_while_being_created_is_refused_cleanly() {
    let init_syncs = syncs_to_create();
    let mut refused = 0;
    for cut in 1..=init_syncs {
        let device = Device::cut_at(cut);
        drop(RedbBackend::open_on(device.clone(), &RedbOptions::default()).expect("open"));
        let unsynced = device.unsynced_writes();
        for prefix in 0..=unsynced {
            let image = device.crash_image(prefix);
            let storage = InMemoryBackend::new();
            storage.set_len(image.len() as u64).expect("set_len");
            storage.write(0, &image).expect("write");
            match RedbBackend::open_on(storage, &RedbOptions::default()) {
                Ok(_) => {}
                Err(e) if e.label() == "corrupt" => refused += 1,
                Err(e) => panic!("cut at sync {cut}, {prefix}/{unsynced} later writes: {e}"),
            }
        }
    }
    assert!(
        refused > 0,
        "if redb now opens every such file, the temporary name is not needed"
    );
}
