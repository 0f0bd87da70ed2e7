//! Peer database drivers for `dynakv bench`'s workload runner, so that DynaKV and its peers are
//! measured by one client harness under one workload (see docs/benchmarks.md). Not shipped: the
//! `dynakv` binary knows nothing of them.
//!
//! - [`etcd`]: etcd v3 over gRPC (KV.Range, KV.Put, KV.Txn).
//! - `src/bin/dynakv-peer-bench.rs`: the command that runs a workload against a peer.

pub mod etcd;

/// Generated code of the etcd v3 KV subset in `proto/etcd/kv.proto`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}
