//! Deterministic simulation of DynaKV clusters under faults, with an invariant checker
//! (docs/testing.md says how to run it and what it proves).
//!
//! The real node (`dynakv_node::server::run`, its tonic services, its coordinator) runs on
//! turmoil hosts over simulated TCP and simulated time; every source of randomness is seeded
//! from one `u64`, so a seed replays a run exactly.
//!
//! - [`net`]: turmoil TCP under tonic (server incoming stream, client connector) and the wall clock.
//! - [`harness`]: builds a cluster from a [`scenario::Scenario`], applies its steps, settles the
//!   cluster and snapshots every node's storage; [`harness::run`] is the entry point.
//! - [`scenario`]: the DSL (`AddNode`, `Crash`, `Restart`, `Pause`, `Partition`, `Heal`, `Delay`,
//!   `Loss`, `Put`/`Get`/`Delete`, `Wait`, `Assert`).
//! - [`nemesis`]: random fault schedules from a seed.
//! - [`workload`]: shopping carts, registers, deletes.
//! - [`client`]: simulated clients (tonic `KvClient`) that record the [`history`].
//! - [`checker`]: the invariants, checked at the end of every run; [`oracle`]: what the harness
//!   reads from the nodes' storage for it.
//! - [`catalog`]: the named scenarios; [`report`]: the failure report and its replay command.

pub mod catalog;
pub mod checker;
pub mod client;
pub mod harness;
pub mod history;
pub mod nemesis;
pub mod net;
pub mod oracle;
pub mod report;
pub mod scenario;
pub mod workload;

pub use harness::{Breakage, Outcome, RunOptions, Settle};

/// Runs the named scenario (its nemesis schedule, if any, drawn from `opts.seed`); `None` for an
/// unknown name.
pub fn run_named(name: &str, opts: RunOptions) -> Option<Outcome> {
    let scenario = catalog::scenario(name, opts.seed)?;
    Some(harness::run(&scenario, opts))
}
