//! Named scenarios: the hand-written ones and the nemesis profiles. A name plus a seed is all a
//! replay needs.

use crate::client::Level;
use crate::harness;
use crate::nemesis;
use crate::scenario::{Check, Ctx, Scenario, Step};
use crate::workload::WorkloadSpec;

/// Nemesis profiles: a cluster, a workload, and a random fault schedule from the seed.
pub const NEMESIS_PROFILES: &[&str] = &["nemesis-mixed", "nemesis-lww", "nemesis-carts-3"];

/// Every hand-written scenario, by name.
pub fn hand_written() -> Vec<Scenario> {
    vec![
        quorum_write_then_read(),
        concurrent_writes_with_one_context_become_siblings(),
        blind_writes_pile_up_as_siblings(),
        acknowledged_write_survives_crash_of_its_quorum(),
        minority_partition_refuses_quorum_writes(),
        delete_is_not_undone_by_a_stale_replica(),
        stale_replica_catches_up(),
        lww_keeps_the_newest_write(),
        paused_node_catches_up(),
        forwarded_writes_keep_causality(),
        cart_under_bridge_partition(),
        cart_under_loss_and_delay(),
        whole_cluster_power_cut(),
        rolling_restarts(),
        majorities_ring(),
        paused_node_is_suspected_then_down_then_back(),
        partition_sides_see_each_other_down_until_healed(),
        crashed_node_is_down_until_it_restarts(),
        coordinator_crash_before_its_own_commit_mints_no_dot_twice(),
        anti_entropy_alone_repairs_a_replica_that_missed_writes(),
    ]
}

/// A scenario by name; nemesis profiles draw their fault schedule from `seed`.
pub fn scenario(name: &str, seed: u64) -> Option<Scenario> {
    if let Some(s) = hand_written().into_iter().find(|s| s.name == name) {
        return Some(s);
    }
    let (base, nodes) = match name {
        "nemesis-mixed" => (
            Scenario::siblings(name, 5).with_workload(WorkloadSpec::mixed()),
            5,
        ),
        "nemesis-lww" => (
            Scenario::lww(name, 5).with_workload(WorkloadSpec::registers_and_deletes()),
            5,
        ),
        "nemesis-carts-3" => (
            Scenario::siblings(name, 3).with_workload(WorkloadSpec::carts(2, 4)),
            3,
        ),
        _ => return None,
    };
    let names: Vec<String> = (1..=nodes).map(|i| format!("n{i}")).collect();
    Some(base.steps(nemesis::schedule(
        seed,
        &names,
        nemesis::DEFAULT_FAULT_PHASE_MS,
    )))
}

/// Every scenario name.
pub fn names() -> Vec<String> {
    hand_written()
        .into_iter()
        .map(|s| s.name)
        .chain(NEMESIS_PROFILES.iter().map(|s| s.to_string()))
        .collect()
}

fn values(client: usize, key: &str, expect: &[&str]) -> Step {
    Step::check(Check::Values {
        client,
        key: key.into(),
        expect: expect.iter().map(|s| s.to_string()).collect(),
    })
}

fn node_has(node: &str, key: &str, expect: &[&str]) -> Step {
    Step::check(Check::NodeHas {
        node: node.into(),
        key: key.into(),
        values: expect.iter().map(|s| s.to_string()).collect(),
    })
}

pub fn quorum_write_then_read() -> Scenario {
    Scenario::siblings("quorum-write-then-read", 3).steps(vec![
        Step::put(1, "k", "v1").via("n1"),
        Step::wait_idle(),
        Step::check(Check::LastOk { client: 1 }),
        Step::get(2, "k").via("n3"),
        Step::wait_idle(),
        values(2, "k", &["v1"]),
    ])
}

pub fn concurrent_writes_with_one_context_become_siblings() -> Scenario {
    Scenario::siblings("concurrent-writes-with-one-context-become-siblings", 3).steps(vec![
        Step::put(1, "k", "base").via("n1"),
        Step::wait_idle(),
        Step::get(1, "k").via("n1"),
        Step::get(2, "k").via("n2"),
        Step::wait_idle(),
        // Both saw `base`: each write replaces it, and the two are concurrent.
        Step::put(1, "k", "a").via("n1"),
        Step::put(2, "k", "b").via("n2"),
        Step::wait_idle(),
        Step::get(3, "k").via("n3").level(Level::All),
        Step::wait_idle(),
        values(3, "k", &["a", "b"]),
        // A write with the context of that read resolves them.
        Step::put(3, "k", "resolved").via("n3"),
        Step::wait_idle(),
        Step::get(1, "k").via("n2").level(Level::All),
        Step::wait_idle(),
        values(1, "k", &["resolved"]),
    ])
}

pub fn blind_writes_pile_up_as_siblings() -> Scenario {
    Scenario::siblings("blind-writes-pile-up-as-siblings", 3).steps(vec![
        Step::put(1, "k", "x1").via("n1").ctx(Ctx::Empty),
        Step::wait_idle(),
        Step::put(2, "k", "x2").via("n2").ctx(Ctx::Empty),
        Step::wait_idle(),
        Step::put(3, "k", "x3").via("n3").ctx(Ctx::Empty),
        Step::wait_idle(),
        Step::get(1, "k").via("n2").level(Level::All),
        Step::wait_idle(),
        Step::check(Check::SiblingCount {
            client: 1,
            key: "k".into(),
            count: 3,
        }),
        Step::put(1, "k", "x4").via("n3"),
        Step::wait_idle(),
        Step::get(2, "k").via("n1").level(Level::All),
        Step::wait_idle(),
        values(2, "k", &["x4"]),
    ])
}

/// The write reaches only n1 and n2 (n3 is cut off); both crash; the write must still be there.
/// This is the scenario that catches "acknowledge before fsync".
pub fn acknowledged_write_survives_crash_of_its_quorum() -> Scenario {
    Scenario::siblings("acknowledged-write-survives-crash-of-its-quorum", 3).steps(vec![
        Step::partition(&[&["n1", "n2"], &["n3"]]),
        Step::put(1, "k", "v1").via("n1").strict(),
        Step::wait_idle(),
        Step::check(Check::LastOk { client: 1 }),
        Step::crash("n1"),
        Step::crash("n2"),
        Step::wait_ms(500),
        Step::restart("n1"),
        Step::restart("n2"),
        Step::Heal,
        Step::wait_ms(3_000),
        Step::get(2, "k").via("n3").level(Level::All).strict(),
        Step::wait_idle(),
        values(2, "k", &["v1"]),
    ])
}

/// n1 alone cannot reach W=2; the other side can. The refused write was still applied on n1
/// (Dynamo semantics: a failed write may take effect), so after healing both values are
/// siblings.
pub fn minority_partition_refuses_quorum_writes() -> Scenario {
    Scenario::siblings("minority-partition-refuses-quorum-writes", 3).steps(vec![
        Step::partition(&[&["n1"], &["n2", "n3"]]),
        Step::put(1, "k", "lonely").via("n1").strict(),
        Step::put(2, "k", "majority").via("n2").strict(),
        Step::wait_idle(),
        Step::check(Check::LastFailed { client: 1 }),
        Step::check(Check::LastOk { client: 2 }),
        Step::Heal,
        Step::wait_ms(3_000),
        Step::get(3, "k").via("n1").level(Level::All),
        Step::wait_idle(),
        values(3, "k", &["lonely", "majority"]),
    ])
}

pub fn delete_is_not_undone_by_a_stale_replica() -> Scenario {
    Scenario::siblings("delete-is-not-undone-by-a-stale-replica", 3).steps(vec![
        Step::put(1, "k", "doomed").via("n1").level(Level::All),
        Step::wait_idle(),
        Step::get(1, "k").via("n1"),
        Step::wait_idle(),
        Step::partition(&[&["n1", "n2"], &["n3"]]),
        Step::delete(1, "k").via("n1"),
        Step::wait_idle(),
        Step::check(Check::LastOk { client: 1 }),
        // n3 still holds the value: the tombstone must win when they meet.
        node_has("n3", "k", &["doomed"]),
        Step::Heal,
        Step::wait_ms(3_000),
        Step::get(2, "k").via("n3").level(Level::All),
        Step::wait_idle(),
        values(2, "k", &[]),
        Step::wait_ms(1_000),
        Step::get(2, "k").via("n3").level(Level::One),
        Step::wait_idle(),
        values(2, "k", &[]),
    ])
}

/// n3 misses a write during a partition; once healed, a read (read repair), hinted handoff or
/// anti-entropy brings it up.
pub fn stale_replica_catches_up() -> Scenario {
    Scenario::siblings("stale-replica-catches-up", 3).steps(vec![
        Step::partition(&[&["n1", "n2"], &["n3"]]),
        Step::put(1, "k", "v1").via("n1"),
        Step::wait_idle(),
        node_has("n3", "k", &[]),
        Step::wait_ms(3_000),
        Step::Heal,
        Step::wait_ms(2_000),
        Step::get(2, "k").via("n2").level(Level::All),
        Step::wait_idle(),
        Step::wait_ms(1_000),
        node_has("n3", "k", &["v1"]),
        Step::check(Check::ReplicasEqual { key: "k".into() }),
    ])
}

pub fn lww_keeps_the_newest_write() -> Scenario {
    Scenario::lww("lww-keeps-the-newest-write", 3).steps(vec![
        Step::put(1, "k", "old").via("n1").ctx(Ctx::Empty),
        Step::wait_idle(),
        Step::wait_ms(10),
        Step::put(2, "k", "new").via("n2").ctx(Ctx::Empty),
        Step::wait_idle(),
        Step::get(3, "k").via("n3").level(Level::All),
        Step::wait_idle(),
        values(3, "k", &["new"]),
        // Concurrent blind writes: one value survives, never two.
        Step::put(1, "j", "x").via("n1").ctx(Ctx::Empty),
        Step::put(2, "j", "y").via("n3").ctx(Ctx::Empty),
        Step::wait_idle(),
        Step::get(3, "j").via("n2").level(Level::All),
        Step::wait_idle(),
        Step::check(Check::SiblingCount {
            client: 3,
            key: "j".into(),
            count: 1,
        }),
    ])
}

pub fn paused_node_catches_up() -> Scenario {
    Scenario::siblings("paused-node-catches-up", 3).steps(vec![
        Step::pause("n3"),
        Step::put(1, "a", "a1").via("n1"),
        Step::put(2, "b", "b1").via("n2"),
        Step::wait_idle(),
        Step::put(1, "a", "a2").via("n2"),
        Step::wait_idle(),
        Step::wait_ms(2_000),
        Step::Heal,
        Step::wait_ms(2_000),
        Step::get(3, "a").via("n3").level(Level::All),
        Step::get(3, "b").via("n3").level(Level::All),
        Step::wait_idle(),
        Step::wait_ms(1_000),
        Step::check(Check::ReplicasEqual { key: "a".into() }),
        Step::check(Check::ReplicasEqual { key: "b".into() }),
    ])
}

/// Five nodes: most requests go to a node that is not a replica and get forwarded.
pub fn forwarded_writes_keep_causality() -> Scenario {
    Scenario::siblings("forwarded-writes-keep-causality", 5).steps(vec![
        Step::put(1, "k", "v1").via("n1"),
        Step::wait_idle(),
        Step::get(1, "k").via("n4"),
        Step::wait_idle(),
        Step::put(1, "k", "v2").via("n5"),
        Step::wait_idle(),
        Step::get(1, "k").via("n2"),
        Step::wait_idle(),
        Step::put(1, "k", "v3").via("n3"),
        Step::wait_idle(),
        Step::get(2, "k").via("n2").level(Level::All),
        Step::wait_idle(),
        values(2, "k", &["v3"]),
    ])
}

pub fn cart_under_bridge_partition() -> Scenario {
    Scenario::siblings("cart-under-bridge-partition", 5)
        .with_workload(WorkloadSpec::carts(2, 4))
        .steps(vec![
            Step::wait_ms(1_000),
            Step::partition(&[&["n1", "n2", "n3"], &["n3", "n4", "n5"]]),
            Step::wait_ms(4_000),
            Step::Heal,
            Step::wait_ms(2_000),
        ])
}

pub fn cart_under_loss_and_delay() -> Scenario {
    Scenario::siblings("cart-under-loss-and-delay", 5)
        .with_workload(WorkloadSpec::carts(2, 4))
        .steps(vec![
            Step::wait_ms(1_000),
            Step::Loss { rate: 0.01 },
            Step::Delay { max_ms: 500 },
            Step::wait_ms(5_000),
            Step::Heal,
            Step::wait_ms(2_000),
        ])
}

/// Every node loses power at once. What was acknowledged must come back.
pub fn whole_cluster_power_cut() -> Scenario {
    Scenario::siblings("whole-cluster-power-cut", 3)
        .with_workload(WorkloadSpec::mixed())
        .steps(vec![
            Step::wait_ms(2_500),
            Step::crash("n1"),
            Step::crash("n2"),
            Step::crash("n3"),
            Step::wait_ms(500),
            Step::restart("n1"),
            Step::restart("n2"),
            Step::restart("n3"),
            Step::wait_ms(3_000),
        ])
}

pub fn rolling_restarts() -> Scenario {
    let mut steps = vec![Step::wait_ms(1_000)];
    for n in ["n1", "n2", "n3", "n4", "n5"] {
        steps.push(Step::restart(n));
        steps.push(Step::wait_ms(1_500));
    }
    Scenario::siblings("rolling-restarts", 5)
        .with_workload(WorkloadSpec::mixed())
        .steps(steps)
}

pub fn majorities_ring() -> Scenario {
    Scenario::siblings("majorities-ring", 5)
        .with_workload(WorkloadSpec::mixed())
        .steps(vec![
            Step::wait_ms(1_000),
            Step::partition(&[
                &["n1", "n2"],
                &["n2", "n3"],
                &["n3", "n4"],
                &["n4", "n5"],
                &["n5", "n1"],
            ]),
            Step::wait_ms(4_000),
            Step::Heal,
            Step::wait_ms(2_000),
        ])
}

/// Gossip's failure detector on a frozen node: suspect first, then down everywhere; while it is
/// down the coordinator does not wait for it (W=ALL fails, W=QUORUM succeeds); after the pause it
/// refutes and is alive again, and catches up.
pub fn paused_node_is_suspected_then_down_then_back() -> Scenario {
    Scenario::siblings("paused-node-is-suspected-then-down-then-back", 3).steps(vec![
        Step::await_member("n1", "n3", "alive", 5_000),
        Step::pause("n3"),
        Step::await_member("n1", "n3", "suspect", 5_000),
        Step::await_member("n1", "n3", "down", 10_000),
        Step::await_member("n2", "n3", "down", 5_000),
        Step::put(1, "all", "v1").via("n1").level(Level::All),
        Step::wait_idle(),
        Step::check(Check::LastFailed { client: 1 }),
        Step::put(2, "quorum", "w1").via("n1"),
        Step::wait_idle(),
        Step::check(Check::LastOk { client: 2 }),
        Step::Heal,
        Step::await_member("n1", "n3", "alive", 15_000),
        Step::await_member("n2", "n3", "alive", 15_000),
        Step::await_member("n3", "n1", "alive", 15_000),
        Step::wait_ms(3_000),
        Step::get(3, "quorum").via("n3").level(Level::One).strict(),
        Step::wait_idle(),
        values(3, "quorum", &["w1"]),
        Step::check(Check::ReplicasEqual {
            key: "quorum".into(),
        }),
    ])
}

/// Each side of a partition declares the other down (and keeps it in the ring: sloppy writes go
/// on with hints); after the partition heals, the periodic announcements to down members bring
/// every node back alive on both sides, and the hinted writes reach their primaries.
pub fn partition_sides_see_each_other_down_until_healed() -> Scenario {
    Scenario::siblings("partition-sides-see-each-other-down-until-healed", 5).steps(vec![
        Step::await_member("n1", "n5", "alive", 5_000),
        Step::partition(&[&["n1", "n2", "n3"], &["n4", "n5"]]),
        Step::await_member("n1", "n4", "down", 15_000),
        Step::await_member("n4", "n1", "down", 15_000),
        Step::await_member("n5", "n3", "down", 15_000),
        Step::put(1, "a", "a1").via("n1"),
        Step::put(2, "b", "b1").via("n2"),
        Step::put(3, "c", "c1").via("n3"),
        Step::wait_idle(),
        Step::check(Check::LastOk { client: 1 }),
        Step::check(Check::LastOk { client: 2 }),
        Step::check(Check::LastOk { client: 3 }),
        Step::Heal,
        Step::await_member("n1", "n4", "alive", 30_000),
        Step::await_member("n4", "n1", "alive", 30_000),
        Step::await_member("n5", "n3", "alive", 30_000),
        Step::await_member("n2", "n5", "alive", 30_000),
        Step::wait_ms(5_000),
        Step::check(Check::ReplicasEqual { key: "a".into() }),
        Step::check(Check::ReplicasEqual { key: "b".into() }),
        Step::check(Check::ReplicasEqual { key: "c".into() }),
    ])
}

/// A crashed node is declared down; restarted (a new generation), it is alive again and knows the
/// cluster.
pub fn crashed_node_is_down_until_it_restarts() -> Scenario {
    Scenario::siblings("crashed-node-is-down-until-it-restarts", 3).steps(vec![
        Step::await_member("n1", "n2", "alive", 5_000),
        Step::crash("n2"),
        Step::await_member("n1", "n2", "down", 10_000),
        Step::await_member("n3", "n2", "down", 5_000),
        Step::put(1, "k", "v1").via("n1"),
        Step::wait_idle(),
        Step::check(Check::LastOk { client: 1 }),
        Step::restart("n2"),
        Step::await_member("n1", "n2", "alive", 10_000),
        Step::await_member("n2", "n1", "alive", 10_000),
        Step::await_member("n2", "n3", "alive", 10_000),
        Step::wait_ms(3_000),
        Step::check(Check::ReplicasEqual { key: "k".into() }),
    ])
}

/// The coordinator sends a new version to the other replicas while its own copy commits. Here
/// n1's disk is slow: a W=2 write is acknowledged by n2 and n3 while n1 is still committing it,
/// and n1 loses power before its commit. Restarted, n1 must not coordinate the next write of the
/// key under the dot the lost copy had (n2 and n3 hold it for another value, and would drop the
/// new one as already seen): after an unclean stop a node takes a new dot id.
pub fn coordinator_crash_before_its_own_commit_mints_no_dot_twice() -> Scenario {
    Scenario::siblings(
        "coordinator-crash-before-its-own-commit-mints-no-dot-twice",
        3,
    )
    .steps(vec![
        Step::await_member("n2", "n1", "alive", 5_000),
        Step::DiskLatency {
            node: "n1".into(),
            commit_ms: 300,
        },
        Step::put(1, "k", "v1").via("n1").ctx(Ctx::Empty),
        Step::wait_idle(),
        Step::check(Check::LastOk { client: 1 }),
        Step::crash("n1"),
        Step::DiskLatency {
            node: "n1".into(),
            commit_ms: harness::COMMIT_LATENCY_MS,
        },
        Step::restart("n1"),
        // Long enough to start, too short for anti-entropy to bring v1 back to n1 first.
        Step::wait_ms(60),
        Step::put(2, "k", "v2")
            .via("n1")
            .level(Level::One)
            .ctx(Ctx::Empty),
        Step::wait_idle(),
        Step::check(Check::LastOk { client: 2 }),
        Step::wait_ms(3_000),
        Step::get(3, "k").via("n2").level(Level::All),
        Step::wait_idle(),
        values(3, "k", &["v1", "v2"]),
    ])
}

/// No hints and no reads: n3 misses two writes while it is down, and only anti-entropy (every
/// 10 s, and at once when gossip sees n3 back) can bring them to it.
pub fn anti_entropy_alone_repairs_a_replica_that_missed_writes() -> Scenario {
    Scenario::siblings("anti-entropy-alone-repairs-a-replica-that-missed-writes", 3)
        .without_hints()
        .steps(vec![
            Step::await_member("n1", "n3", "alive", 5_000),
            Step::crash("n3"),
            Step::await_member("n1", "n3", "down", 10_000),
            Step::put(1, "a", "a1").via("n1").level(Level::Count(2)),
            Step::put(2, "b", "b1").via("n2").level(Level::Count(2)),
            Step::wait_idle(),
            Step::check(Check::LastOk { client: 1 }),
            Step::check(Check::LastOk { client: 2 }),
            Step::restart("n3"),
            Step::await_member("n1", "n3", "alive", 10_000),
            Step::wait_ms(15_000),
            node_has("n3", "a", &["a1"]),
            node_has("n3", "b", &["b1"]),
        ])
}
