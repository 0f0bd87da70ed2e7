//! A DynaKV node and the `dynakv` tool.
//!
//! - [`server`]: `run(listener, config, env, shutdown)`, the whole node.
//! - [`node`]: local replica state and the coordinator (write and read paths, read repair).
//! - [`kv`], [`replica`], [`admin`]: the gRPC services (clients, peers, administration).
//! - [`antientropy`]: Merkle trees per peer and the background exchange; [`hints`]: hinted
//!   handoff storage and delivery; [`gc`]: repair-gated tombstone GC.
//! - [`peer`]: batched long-lived replica streams to every peer; [`net`]: the network seam.
//! - [`gossip`]: membership and failure detection (drives `dynakv_core::membership`).
//! - [`rebalance`]: membership change (drives `dynakv_core::transition`); [`handoff`]: the
//!   range streamer a ring change runs on the nodes that gain ranges.
//! - [`storage`]: the `Backend` seam (redb, memory) and group commit.
//! - [`config`]: the validated configuration; [`metrics`]: Prometheus metrics and `/metrics`.
//! - [`cli`]: the `dynakv` subcommands; [`proto`]: generated gRPC code.
#![allow(clippy::result_large_err)]

pub mod accept;
pub mod admin;
pub mod antientropy;
pub mod auth;
pub mod cli;
pub mod config;
pub mod gc;
pub mod gossip;
pub mod handoff;
pub mod hint_store;
pub mod hints;
pub mod kv;
pub mod metrics;
pub mod net;
pub mod node;
pub mod peer;
pub mod proto;
pub mod rebalance;
pub mod replica;
pub mod server;
pub mod storage;
pub mod tls;
pub mod trees;
