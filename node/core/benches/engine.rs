//! Speed of the pure engine on the hot paths of a request: ring lookup and preference list,
//! DVVSet put (update) and sync (read merge), the clock codec, Merkle update and diff, and the
//! client context codec.
//!
//! Run: `cargo bench -p dynakv-core --bench engine` (about two minutes).

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use dynakv_core::NodeId;
use dynakv_core::context::{decode_context, encode_context};
use dynakv_core::dvvset::{Clock, Dvvset, Sibling, VersionVector};
use dynakv_core::hash::{hash128, key_position};
use dynakv_core::hlc::Timestamp;
use dynakv_core::merkle::{DEFAULT_LEAF_BITS, MerkleTree, entry_hash};
use dynakv_core::ring::{DEFAULT_VNODES_PER_NODE, Member, Ring};

fn node(i: usize) -> NodeId {
    NodeId::new(format!("kv-{i}")).expect("valid node id")
}

fn members(count: usize) -> Vec<Member> {
    (0..count)
        .map(|i| Member {
            id: node(i),
            weight: 100,
            zone: None,
        })
        .collect()
}

fn keys(count: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| format!("bench/{i:012}").into_bytes())
        .collect()
}

fn ring(c: &mut Criterion) {
    let keys = keys(1024);
    let mut group = c.benchmark_group("ring");
    group.throughput(Throughput::Elements(keys.len() as u64));
    for nodes in [3usize, 16, 64] {
        let ring = Ring::balanced(&members(nodes), DEFAULT_VNODES_PER_NODE, 3);
        group.bench_with_input(
            BenchmarkId::new("preference_list_n3", nodes),
            &ring,
            |b, ring| {
                b.iter(|| {
                    for k in &keys {
                        black_box(ring.preference_list(key_position(black_box(k)), 3));
                    }
                })
            },
        );
        group.bench_with_input(BenchmarkId::new("walk_first_5", nodes), &ring, |b, ring| {
            b.iter(|| {
                for k in &keys {
                    for n in ring.walk(key_position(black_box(k)), 3).take(5) {
                        black_box(n);
                    }
                }
            })
        });
    }
    group.finish();

    // Building the ring (the token allocator) happens on every membership change.
    let mut group = c.benchmark_group("ring_build");
    group.sample_size(10);
    for nodes in [3usize, 16, 64] {
        let m = members(nodes);
        group.bench_with_input(BenchmarkId::new("balanced", nodes), &m, |b, m| {
            b.iter(|| black_box(Ring::balanced(black_box(m), DEFAULT_VNODES_PER_NODE, 3)))
        });
    }
    group.finish();
}

fn value(i: u64, bytes: usize) -> Sibling {
    Sibling::live(
        Timestamp::new(1_700_000_000_000 + i, 0),
        Bytes::from(vec![7u8; bytes]),
    )
}

/// The clock of a key written `writes` times through coordinators `0..coordinators`, each write
/// with the context of the previous one (no siblings).
fn clock_after(writes: u64, coordinators: usize) -> Clock {
    let mut clock: Option<Clock> = None;
    for i in 0..writes {
        let context = clock.as_ref().map(Dvvset::join).unwrap_or_default();
        let coordinator = node(i as usize % coordinators);
        clock = Some(Dvvset::put(
            clock.as_ref(),
            &context,
            value(i, 100),
            &coordinator,
        ));
    }
    clock.unwrap_or_default()
}

fn dvvset(c: &mut Criterion) {
    let mut group = c.benchmark_group("dvvset");
    let coordinator = node(0);
    let stored = clock_after(10, 3);
    let context = stored.join();
    group.bench_function("put_with_context_3_ids", |b| {
        b.iter_batched(
            || value(99, 1024),
            |v| {
                black_box(Dvvset::put(
                    Some(black_box(&stored)),
                    &context,
                    v,
                    &coordinator,
                ))
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("put_blind_makes_sibling", |b| {
        let empty = VersionVector::new();
        b.iter_batched(
            || value(99, 1024),
            |v| {
                black_box(Dvvset::put(
                    Some(black_box(&stored)),
                    &empty,
                    v,
                    &coordinator,
                ))
            },
            BatchSize::SmallInput,
        )
    });
    // A read merge: three replicas, one of them a write behind.
    let behind = clock_after(9, 3);
    group.bench_function("sync_3_replicas", |b| {
        b.iter(|| {
            black_box(Dvvset::sync_all([
                black_box(&stored),
                black_box(&stored),
                black_box(&behind),
            ]))
        })
    });
    // Concurrent blind writes: 8 siblings from 3 coordinators.
    let mut siblings = stored.clone();
    for i in 0..8u64 {
        siblings = Dvvset::put(
            Some(&siblings),
            &VersionVector::new(),
            value(100 + i, 100),
            &node(i as usize % 3),
        );
    }
    group.bench_function("sync_8_siblings_with_behind", |b| {
        b.iter(|| black_box(black_box(&siblings).sync(black_box(&behind))))
    });
    let bytes = stored.to_bytes();
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.bench_function("encode_1_value_3_ids", |b| {
        let mut out = Vec::with_capacity(bytes.len());
        b.iter(|| {
            out.clear();
            black_box(&stored).encode(&mut out);
            black_box(out.len())
        })
    });
    group.bench_function("decode_1_value_3_ids", |b| {
        b.iter(|| black_box(Clock::decode(black_box(&bytes)).expect("valid clock")))
    });
    group.bench_function("digest_1_value_3_ids", |b| {
        b.iter(|| black_box(black_box(&stored).digest()))
    });
    group.finish();
}

fn merkle(c: &mut Criterion) {
    let mut group = c.benchmark_group("merkle");
    let keys = keys(4096);
    let entries: Vec<(u64, u128)> = keys
        .iter()
        .map(|k| (key_position(k), entry_hash(k, hash128(k))))
        .collect();
    group.throughput(Throughput::Elements(entries.len() as u64));
    group.bench_function("update_4096_keys", |b| {
        let mut tree = MerkleTree::new(DEFAULT_LEAF_BITS).expect("tree");
        b.iter(|| {
            for &(pos, entry) in &entries {
                tree.update(pos, Some(entry), Some(entry ^ 1));
            }
            black_box(tree.root())
        })
    });
    group.bench_function("entry_hash_4096_keys", |b| {
        b.iter(|| {
            for k in &keys {
                black_box(entry_hash(black_box(k), 42));
            }
        })
    });
    group.finish();

    let mut group = c.benchmark_group("merkle_diff");
    let base = MerkleTree::from_entries(DEFAULT_LEAF_BITS, entries.iter().copied()).expect("tree");
    for differing in [0usize, 1, 16, 256] {
        let mut other = base.clone();
        for &(pos, entry) in entries.iter().take(differing) {
            other.update(pos, Some(entry), None);
        }
        group.bench_with_input(
            BenchmarkId::new("local_4096_segments", differing),
            &other,
            |b, other| b.iter(|| black_box(base.diff(black_box(other)).expect("same shape"))),
        );
    }
    group.finish();
}

fn context(c: &mut Criterion) {
    let mut group = c.benchmark_group("context");
    for ids in [1usize, 3, 16] {
        let vv: VersionVector = (0..ids).map(|i| (node(i), 1000 + i as u64)).collect();
        let token = encode_context(&vv, 0xC1A5_7E12);
        group.bench_with_input(BenchmarkId::new("encode", ids), &vv, |b, vv| {
            b.iter(|| black_box(encode_context(black_box(vv), 0xC1A5_7E12)))
        });
        group.bench_with_input(BenchmarkId::new("decode", ids), &token, |b, token| {
            b.iter(|| black_box(decode_context(black_box(token), 0xC1A5_7E12).expect("valid")))
        });
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = ring, dvvset, merkle, context
}
criterion_main!(benches);
