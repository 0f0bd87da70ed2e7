//! The pure engine of DynaKV. No sockets, no disk, no clock reads, no unseeded randomness:
//! every input (including `now`) is passed in and every effect is returned, so the node's shell,
//! the tests and the deterministic simulation drive exactly the same logic.
//!
//! - [`node_id`]: node identity.
//! - [`hash`]: the stable hash functions (key position, 128-bit digests).
//! - [`hlc`]: hybrid logical clock, wall time passed in.
//! - [`dvvset`]: dotted version vector sets (causality, siblings) and their binary codec.
//! - [`context`]: the opaque client context: a version vector sealed to one cluster.
//! - [`ring`]: consistent hashing with weighted virtual nodes and balancing token allocation.
//! - [`merkle`]: Merkle trees over fixed segments of the hash space, and the step-wise remote diff.
//! - [`quorum`]: per-request reply bookkeeping and the typed quorum failure.
//! - [`membership`]: gossip membership and failure detection (SWIM via foca), node metadata.
//! - [`transition`]: ring transitions (membership change one change at a time, losing nothing).
//! - [`write_id`]: write ids, which make a forwarded write safe to apply at two coordinators.
#![deny(clippy::disallowed_methods, clippy::disallowed_types)]

pub mod context;
pub mod dvvset;
pub mod forward;
pub mod hash;
pub mod hlc;
pub mod latency;
pub mod membership;
pub mod merkle;
pub mod node_id;
pub mod quorum;
pub mod ring;
pub mod transition;
pub mod write_id;

pub use node_id::NodeId;
