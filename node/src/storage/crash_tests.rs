//! Crash consistency of redb and its write-ahead log under the group-commit [`Store`], in the style
//! of redb's `tests/crash_consistency.rs`: the database and its log each run on a storage device
//! that keeps a live and a durable image, on one disk. From the N-th sync on (counted over both
//! devices), nothing becomes durable any more (the power is cut there, though the process runs on);
//! the writes issued after each device's last durable sync are kept in issue order. A crash image
//! is the durable images plus the writes issued before some point (a disk that persists writes in
//! the order they were issued may have got that far), or, for the writes issued before the cut,
//! any of them on one device and none on the other (until a sync returns, the two files are
//! written back in any order). Writes issued after the cut cannot reach the disk out of order
//! across the two files: they were issued only because a sync that the cut undid had returned.
//! Every write acknowledged before the cut must be in every crash image, and every crash image must
//! open.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use redb::StorageBackend;
use redb::backends::InMemoryBackend;

use super::{
    Backend, LogDevice, RedbBackend, RedbOptions, ScanLimit, Store, StoreConfig, StoreMetrics,
    Table, WriterMode,
};

enum Unsynced {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

#[derive(Default)]
struct DeviceState {
    live: Vec<u8>,
    durable: Vec<u8>,
    /// Writes since the last durable sync, in issue order, each with its place in the disk's
    /// issue order.
    unsynced: Vec<(u64, Unsynced)>,
}

#[derive(Default)]
struct Power {
    syncs: u64,
    /// From this sync on, nothing becomes durable.
    cut_at: Option<u64>,
    /// Writes issued to either device so far.
    writes: u64,
    /// `writes` when the first sync at or after the cut was called.
    writes_at_cut: Option<u64>,
}

#[derive(Clone, Default)]
struct Device {
    state: Arc<Mutex<DeviceState>>,
    power: Arc<Mutex<Power>>,
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

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Device {
    /// A device holding `image`, durably.
    fn with_image(image: &[u8]) -> Self {
        let device = Device::default();
        {
            let mut state = lock(&device.state);
            state.live = image.to_vec();
            state.durable = image.to_vec();
        }
        device
    }

    /// The device after the crash: the durable image plus the unsynced writes issued (to either
    /// device) before the `before`-th.
    fn crash_image(&self, before: u64) -> Vec<u8> {
        let state = lock(&self.state);
        let mut image = state.durable.clone();
        for (_, write) in state.unsynced.iter().take_while(|(seq, _)| *seq < before) {
            apply(&mut image, write);
        }
        image
    }

    fn unsynced_seqs(&self) -> Vec<u64> {
        lock(&self.state)
            .unsynced
            .iter()
            .map(|(seq, _)| *seq)
            .collect()
    }

    fn len(&self) -> u64 {
        lock(&self.state).live.len() as u64
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        let state = lock(&self.state);
        let range = offset_range(offset, out.len())?;
        let data = state
            .live
            .get(range)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        out.copy_from_slice(data);
        Ok(())
    }

    fn issue(&self, write: Unsynced) {
        let seq = {
            let mut power = lock(&self.power);
            power.writes += 1;
            power.writes - 1
        };
        let mut state = lock(&self.state);
        apply(&mut state.live, &write);
        state.unsynced.push((seq, write));
    }

    fn sync(&self) {
        let mut power = lock(&self.power);
        power.syncs += 1;
        if power.cut_at.is_some_and(|cut| power.syncs >= cut) && power.writes_at_cut.is_none() {
            power.writes_at_cut = Some(power.writes);
        }
        if power.cut_at.is_none_or(|cut| power.syncs < cut) {
            let mut state = lock(&self.state);
            state.durable = state.live.clone();
            state.unsynced.clear();
        }
    }
}

impl StorageBackend for Device {
    fn len(&self) -> std::io::Result<u64> {
        Ok(Device::len(self))
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        Device::read(self, offset, out)
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.issue(Unsynced::SetLen(len));
        Ok(())
    }

    fn sync_data(&self) -> std::io::Result<()> {
        self.sync();
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.issue(Unsynced::Write(offset, data.to_vec()));
        Ok(())
    }
}

impl LogDevice for Device {
    fn len(&self) -> std::io::Result<u64> {
        Ok(Device::len(self))
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        Device::read(self, offset, out)
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.issue(Unsynced::Write(offset, data.to_vec()));
        Ok(())
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.issue(Unsynced::SetLen(len));
        Ok(())
    }

    fn sync_data(&self) -> std::io::Result<()> {
        self.sync();
        Ok(())
    }
}

/// A crash image: the database, the log, the second log, and how it was made.
type CrashImage = (Vec<u8>, Vec<u8>, Vec<u8>, String);

/// The database's device and its two logs', on one power supply.
#[derive(Clone, Default)]
struct Disk {
    db: Device,
    log: Device,
    log2: Device,
}

impl Disk {
    fn cut_at(sync: u64) -> Self {
        let power = Arc::new(Mutex::new(Power {
            cut_at: Some(sync),
            ..Power::default()
        }));
        Disk {
            db: Device {
                power: Arc::clone(&power),
                ..Device::default()
            },
            log: Device {
                power: Arc::clone(&power),
                ..Device::default()
            },
            log2: Device {
                power,
                ..Device::default()
            },
        }
    }

    fn new() -> Self {
        Disk::cut_at(u64::MAX)
    }

    fn syncs(&self) -> u64 {
        lock(&self.db.power).syncs
    }

    /// Whether the power has been cut: nothing synced from now on is durable.
    fn is_cut(&self) -> bool {
        let power = lock(&self.db.power);
        power.cut_at.is_some_and(|cut| power.syncs >= cut)
    }

    /// The crash images to check, as `(database, log, second log, what)`: the disk got as far
    /// as some point of the issue order of all three, or the writes issued before the cut
    /// reached the database or the logs only.
    fn crash_images(&self) -> Vec<CrashImage> {
        let mut seqs = self.db.unsynced_seqs();
        seqs.extend(self.log.unsynced_seqs());
        seqs.extend(self.log2.unsynced_seqs());
        seqs.sort_unstable();
        let n = seqs.len();
        let at_cut = lock(&self.db.power).writes_at_cut.unwrap_or(u64::MAX);
        let mut images = Vec::new();
        for prefix in [0, n / 3, n / 2, n] {
            let before = seqs.get(prefix).copied().unwrap_or(u64::MAX);
            images.push((
                self.db.crash_image(before),
                self.log.crash_image(before),
                self.log2.crash_image(before),
                format!("the first {prefix} of {n} unsynced writes on disk"),
            ));
        }
        images.push((
            self.db.crash_image(at_cut),
            self.log.crash_image(0),
            self.log2.crash_image(0),
            "the database's writes issued before the cut on disk, not the logs'".to_owned(),
        ));
        images.push((
            self.db.crash_image(0),
            self.log.crash_image(at_cut),
            self.log2.crash_image(at_cut),
            "the logs' writes issued before the cut on disk, not the database's".to_owned(),
        ));
        images
    }

    fn open(&self, options: &RedbOptions) -> Result<RedbBackend, super::StorageError> {
        RedbBackend::open_on(
            self.db.clone(),
            [Box::new(self.log.clone()), Box::new(self.log2.clone())],
            options,
        )
    }
}

/// Options that make the workload checkpoint every few batches, so that cuts land in
/// checkpoints too.
fn options(checkpoint_log_ops: u64) -> RedbOptions {
    RedbOptions {
        checkpoint_log_ops,
        ..RedbOptions::default()
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
async fn workload(disk: &Disk, max_batch_ops: usize, options: &RedbOptions) -> Vec<Acked> {
    let backend = disk.open(options).expect("open");
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
            let (store, acked, disk) = (Arc::clone(&store), Arc::clone(&acked), disk.clone());
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
                    if !disk.is_cut() {
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

fn memory_device(image: &[u8]) -> InMemoryBackend {
    let storage = InMemoryBackend::new();
    storage.set_len(image.len() as u64).expect("set_len");
    storage.write(0, image).expect("write");
    storage
}

/// Opens a crash image (database and logs) and checks that it holds every acknowledged write
/// and consistent counters.
async fn verify(image: &[u8], log: &[u8], log2: &[u8], acked: &[Acked], what: &str) {
    let backend = RedbBackend::open_on(
        memory_device(image),
        [
            Box::new(Device::with_image(log)),
            Box::new(Device::with_image(log2)),
        ],
        &RedbOptions::default(),
    )
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

    // And redb itself finds the crashed file sound.
    let mut db = redb::Database::builder()
        .create_with_backend(memory_device(image))
        .expect("open for the integrity check");
    assert!(
        db.check_integrity().expect("integrity check"),
        "{what}: integrity"
    );
}

/// Syncs that opening a fresh database takes (not counting those of closing it).
fn syncs_to_create() -> u64 {
    let probe = Disk::new();
    let backend = probe.open(&RedbOptions::default()).expect("open");
    let syncs = probe.syncs();
    drop(backend);
    syncs
}

async fn power_cut_at_every_sync(max_batch_ops: usize, checkpoint_log_ops: u64) {
    let options = options(checkpoint_log_ops);
    // A probe run without a cut tells how many syncs creating the database and the workload take.
    let init_syncs = syncs_to_create();
    let probe = Disk::new();
    let acked = workload(&probe, max_batch_ops, &options).await;
    let total_syncs = probe.syncs();
    verify(
        &probe.db.crash_image(u64::MAX),
        &probe.log.crash_image(u64::MAX),
        &probe.log2.crash_image(u64::MAX),
        &acked,
        "no cut",
    )
    .await;

    // Cut at every sync after the database exists (at most ~40 runs), then crash with none, some
    // or all of the writes issued after the cut on each device.
    let step = ((total_syncs - init_syncs) / 40).max(1);
    let mut required = 0;
    for cut in (init_syncs + 1..=total_syncs).step_by(step as usize) {
        let disk = Disk::cut_at(cut);
        let acked = workload(&disk, max_batch_ops, &options).await;
        required += acked.len();
        for (db, log, log2, image) in disk.crash_images() {
            let what = format!(
                "batches of {max_batch_ops}, checkpoint every {checkpoint_log_ops} writes, \
                 cut at sync {cut} of {total_syncs}, {image}"
            );
            verify(&db, &log, &log2, &acked, &what).await;
        }
    }
    assert!(required > 0, "some cut came after some acknowledged writes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_a_power_cut_at_any_sync_with_group_commit() {
    power_cut_at_every_sync(8, 16).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_a_power_cut_at_any_sync_one_write_per_commit() {
    power_cut_at_every_sync(1, 50).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_a_power_cut_without_checkpoints() {
    // Everything stays in the log until the close.
    power_cut_at_every_sync(8, u64::MAX).await;
}

// Why RedbBackend::open creates a database under a temporary name: a file whose creation was cut
// short may not open at all. It must be refused with a typed error, never a panic.
#[test]
fn a_database_cut_short_while_being_created_is_refused_cleanly() {
    let init_syncs = syncs_to_create();
    let mut refused = 0;
    for cut in 1..=init_syncs {
        let disk = Disk::cut_at(cut);
        drop(disk.open(&RedbOptions::default()).expect("open"));
        let mut seqs = disk.db.unsynced_seqs();
        seqs.extend(disk.log.unsynced_seqs());
        seqs.extend(disk.log2.unsynced_seqs());
        seqs.sort_unstable();
        seqs.push(u64::MAX);
        for before in seqs {
            let opened = RedbBackend::open_on(
                memory_device(&disk.db.crash_image(before)),
                [
                    Box::new(Device::with_image(&disk.log.crash_image(before))),
                    Box::new(Device::with_image(&disk.log2.crash_image(before))),
                ],
                &RedbOptions::default(),
            );
            match opened {
                Ok(_) => {}
                Err(e) if e.label() == "corrupt" => refused += 1,
                Err(e) => panic!("cut at sync {cut}, unsynced writes before the {before}-th: {e}"),
            }
        }
    }
    assert!(
        refused > 0,
        "if redb now opens every such file, the temporary name is not needed"
    );
}
