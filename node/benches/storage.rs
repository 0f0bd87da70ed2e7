//! Group commit of the storage layer: puts per second through one [`Store`] as the number of
//! concurrent writers grows. On redb every commit is fsynced, so with one writer the rate is the
//! disk's fsync rate; with more writers a commit carries the puts that queued during the previous
//! fsync, and the rate grows with the batch size until the writer thread or the disk saturates.
//! The in-memory backend shows the cost of the batching machinery itself (no fsync).
//!
//! Two key orders: `sequential` (fresh keys in increasing order: every batch appends to the same
//! rightmost B-tree leaves) and `node_order` (overwrites of 100 000 preloaded keys chosen at
//! random, stored under `data_key`, the hash-position prefix the node uses, so each mutation
//! lands on its own leaf): the second is what a node's commits do under a uniform workload.
//!
//! Run: `cargo bench -p dynakv-node --bench storage` (a few minutes; uses a temporary directory
//! on the disk holding the system temp dir, so set TMPDIR to measure another disk).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use dynakv_node::node::data_key;
use dynakv_node::storage::{
    Backend, MemoryBackend, RedbBackend, Store, StoreConfig, StoreMetrics, Table,
};

/// Keys of the `node_order` benchmarks.
const PRELOADED_KEYS: u64 = 100_000;

/// How the benchmark picks the key of each put.
#[derive(Clone, Copy)]
enum KeyOrder {
    /// A fresh key each time, in increasing order.
    Sequential,
    /// One of [`PRELOADED_KEYS`] at random, in the node's storage order (hash position first).
    NodeOrder,
}

fn key_of(order: KeyOrder, n: u64) -> Vec<u8> {
    match order {
        KeyOrder::Sequential => format!("bench/{n:012}").into_bytes(),
        KeyOrder::NodeOrder => {
            // A cheap scramble of the counter (splitmix64) picks the key index.
            let mut z = n.wrapping_add(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            let index = (z ^ (z >> 31)) % PRELOADED_KEYS;
            data_key(format!("bench/{index:012}").as_bytes())
        }
    }
}

/// Puts of `value_bytes` from `writers` concurrent tasks, `iters` each; returns the wall time.
fn concurrent_puts(
    runtime: &tokio::runtime::Runtime,
    store: &Arc<Store>,
    next_key: &Arc<AtomicU64>,
    order: KeyOrder,
    writers: u64,
    iters: u64,
    value_bytes: usize,
) -> Duration {
    runtime.block_on(async {
        let started = Instant::now();
        let tasks: Vec<_> = (0..writers)
            .map(|_| {
                let store = Arc::clone(store);
                let next_key = Arc::clone(next_key);
                tokio::spawn(async move {
                    for _ in 0..iters {
                        let n = next_key.fetch_add(1, Ordering::Relaxed);
                        let key = key_of(order, n);
                        store
                            .put(Table::Data, key, vec![0xA5; value_bytes])
                            .await
                            .expect("put");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("writer task");
        }
        started.elapsed()
    })
}

fn group_commit(
    c: &mut Criterion,
    name: &str,
    backend: Arc<dyn Backend>,
    order: KeyOrder,
    writers: &[u64],
) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let store = Arc::new(
        Store::open(
            backend,
            StoreConfig::default(),
            StoreMetrics::new().expect("metrics"),
        )
        .expect("store"),
    );
    let next_key = Arc::new(AtomicU64::new(0));
    if let KeyOrder::NodeOrder = order {
        runtime.block_on(async {
            let tasks: Vec<_> = (0..64u64)
                .map(|t| {
                    let store = Arc::clone(&store);
                    tokio::spawn(async move {
                        for i in (t..PRELOADED_KEYS).step_by(64) {
                            let key = data_key(format!("bench/{i:012}").as_bytes());
                            store
                                .put(Table::Data, key, vec![0x5A; 1024])
                                .await
                                .expect("preload");
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.expect("preload task");
            }
        });
    }
    let mut group = c.benchmark_group(format!("group_commit/{name}"));
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(5));
    for &w in writers {
        group.throughput(Throughput::Elements(w));
        group.bench_with_input(BenchmarkId::new("writers_1KiB", w), &w, |b, &w| {
            b.iter_custom(|iters| {
                concurrent_puts(&runtime, &store, &next_key, order, w, iters, 1024)
            });
        });
    }
    group.finish();
}

fn redb(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let backend = RedbBackend::open(dir.path().join("bench.redb")).expect("redb");
    group_commit(
        c,
        "redb_fsync_sequential",
        Arc::new(backend),
        KeyOrder::Sequential,
        &[1, 16, 64, 256],
    );
}

fn redb_node_order(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let backend = RedbBackend::open(dir.path().join("bench.redb")).expect("redb");
    group_commit(
        c,
        "redb_fsync_node_order",
        Arc::new(backend),
        KeyOrder::NodeOrder,
        &[1, 16, 64, 256],
    );
}

fn memory(c: &mut Criterion) {
    group_commit(
        c,
        "memory",
        Arc::new(MemoryBackend::new()),
        KeyOrder::Sequential,
        &[1, 64],
    );
}

criterion_group!(benches, redb, redb_node_order, memory);
criterion_main!(benches);
