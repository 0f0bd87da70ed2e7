//! Named scenarios: the hand-written ones and the nemesis profiles. A name plus a seed is all a
//! replay needs.

use crate::client::Level;
use crate::harness;
use crate::nemesis;
use crate::scenario::{Check, Ctx, Expect, Scenario, Step};
use crate::workload::WorkloadSpec;

/// Nemesis profiles: a cluster, a workload, and a random fault schedule from the seed.
pub const NEMESIS_PROFILES: &[&str] = &[
    "nemesis-mixed",
    "nemesis-mixed-old-node",
    "nemesis-lww",
    "nemesis-carts-3",
    "nemesis-membership",
];

/// The profiles of a static cluster (faults only), which a long run rotates through unless told
/// otherwise. `nemesis-membership` (ring changes beside the faults) costs about eight times as
/// much per seed and has long runs of its own (docs/testing.md).
pub const STATIC_PROFILES: &[&str] = &["nemesis-mixed", "nemesis-lww", "nemesis-carts-3"];

/// Hand-written scenarios left out of the CI set because a known node bug makes them fail (each
/// has an `#[ignore]`d test that names the bug; docs/testing.md, "Known product bugs"). Take a
/// name out of here once its bug is fixed.
pub const BLOCKED_BY_KNOWN_BUGS: &[&str] = &[];

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
        join_ramp_under_load(),
        drain_under_load(),
        remove_crashed_node(),
        draining_node_crashes_mid_handoff(),
        removal_under_partition_and_reboot(),
        receiver_crash_mid_handoff(),
        sender_crash_mid_handoff(),
        coordinator_crash_mid_change(),
        participant_crashes_twice_while_the_proposer_is_down(),
        partition_during_change_waits_then_completes(),
        two_weight_changes_at_once(),
        change_requested_during_a_change(),
        leave_while_a_join_ramps(),
        weight_asked_of_a_joiner_as_soon_as_it_serves(),
        node_dies_for_good_mid_change_and_is_removed(),
        new_owner_serves_what_was_written_before_it_joined(),
        joiner_that_finds_no_seed_waits_for_the_cluster(),
        joiner_behind_a_partition_while_a_change_commits(),
    ]
}

/// A scenario by name; nemesis profiles draw their fault schedule from `seed`.
pub fn scenario(name: &str, seed: u64) -> Option<Scenario> {
    if let Some(s) = hand_written().into_iter().find(|s| s.name == name) {
        return Some(s);
    }
    if name == "nemesis-membership" {
        // 5 members and 2 spares, carts, registers, deletes and new keys; ring changes mixed
        // with every fault.
        let base = Scenario::siblings(name, 5)
            .with_spares(2)
            .with_workload(WorkloadSpec::membership());
        let names = base.nodes();
        let spares = base.spares();
        let n = base.n as usize;
        return Some(base.steps(nemesis::membership_schedule(
            seed,
            &names,
            &spares,
            n,
            nemesis::MEMBERSHIP_FAULT_PHASE_MS,
        )));
    }
    let (base, nodes) = match name {
        "nemesis-mixed" => (
            Scenario::siblings(name, 5).with_workload(WorkloadSpec::mixed()),
            5,
        ),
        // As `nemesis-mixed`, with n5 looking to its peers like a node from before write ids
        // (a rolling upgrade half done): nobody uses them, forwards are not sent twice.
        "nemesis-mixed-old-node" => (
            Scenario::siblings(name, 5)
                .with_workload(WorkloadSpec::mixed())
                .without_write_ids_on("n5"),
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

/// How long a scenario gives one ring change (announce, stream, switch, commit) to finish.
const CHANGE_MS: u64 = 30_000;

/// The workload beside the hand-written membership scenarios: [`WorkloadSpec::membership`] at
/// about half its rate (the CI set stays cheap; `nemesis-membership` runs the full rate).
fn membership_load() -> WorkloadSpec {
    WorkloadSpec {
        think_ms: (20, 100),
        ..WorkloadSpec::membership()
    }
}

fn member(observer: &str, member: &str, lifecycle: &str, weight: Option<u32>) -> Step {
    Step::check(Check::Member {
        observer: observer.into(),
        member: member.into(),
        lifecycle: lifecycle.into(),
        weight,
    })
}

/// A spare joins through seeds at weight 0 and is ramped 0 -> 25 -> 50 -> 100 while carts,
/// registers, deletes and new keys are written: each step's handoff finishes before the next,
/// no acknowledged write is lost, quorum reads see every acknowledged write throughout, and the
/// final placement is the ring with n4 at 100.
pub fn join_ramp_under_load() -> Scenario {
    Scenario::siblings("join-ramp-under-load", 3)
        .with_spares(1)
        .with_workload(membership_load())
        .steps(vec![
            Step::wait_ms(1_500),
            Step::join("n4"),
            Step::await_member("n1", "n4", "alive", 10_000),
            Step::await_member("n4", "n1", "alive", 10_000),
            member("n1", "n4", "joining", Some(0)),
            Step::set_weight("n4", 25),
            Step::await_ring(CHANGE_MS),
            member("n3", "n4", "normal", Some(25)),
            Step::set_weight("n4", 50),
            Step::await_ring(CHANGE_MS),
            member("n2", "n4", "normal", Some(50)),
            Step::set_weight("n4", 100),
            Step::await_ring(CHANGE_MS),
            member("n3", "n4", "normal", Some(100)),
            Step::wait_ms(1_000),
        ])
}

/// n4 drains out under load (Leave: weight 0, every range handed over, then `left`); it still
/// answers clients (it coordinates) and holds nothing once the cluster settles. With three
/// members left at N=3, draining another is refused and changes nothing.
pub fn drain_under_load() -> Scenario {
    Scenario::siblings("drain-under-load", 4)
        .with_workload(membership_load())
        .steps(vec![
            Step::wait_ms(2_000),
            Step::leave("n4"),
            Step::await_ring(CHANGE_MS),
            member("n1", "n4", "left", Some(0)),
            member("n4", "n4", "left", Some(0)),
            Step::leave("n3").expect(Expect::Refused),
            Step::set_weight("n2", 0).via("n1").expect(Expect::Refused),
            Step::wait_ms(2_000),
            member("n2", "n3", "normal", Some(100)),
            Step::check(Check::NodeEmpty { node: "n4".into() }),
        ])
}

/// A node crashes for good; a removal of a live node is refused first; the crashed one, once
/// gossip holds it down, is removed, and its ranges are re-replicated from the surviving
/// replicas while the workload runs.
pub fn remove_crashed_node() -> Scenario {
    Scenario::siblings("remove-crashed-node", 4)
        .with_workload(membership_load())
        .steps(vec![
            Step::wait_ms(1_500),
            Step::remove("n3").via("n1").expect(Expect::Refused),
            Step::crash("n4"),
            Step::await_member("n1", "n4", "down", 15_000),
            Step::await_member("n2", "n4", "down", 15_000),
            Step::remove("n4").via("n1"),
            Step::await_ring(CHANGE_MS),
            member("n2", "n4", "removed", None),
            member("n3", "n4", "removed", None),
            Step::wait_ms(1_000),
        ])
}

/// The draining node itself loses power in the middle of its drain (it is an old replica of
/// every range that moves, so pulls from it break): the change waits for it, it restarts, the
/// pulls resume, and it ends `left` and empty.
pub fn draining_node_crashes_mid_handoff() -> Scenario {
    Scenario::siblings("draining-node-crashes-mid-handoff", 4)
        .with_slow_handoff()
        .with_workload(membership_load())
        .steps(vec![
            Step::wait_ms(3_000),
            Step::leave("n4").via("n2"),
            Step::await_phase("n1", "streaming", 4, 20_000),
            Step::crash("n4"),
            Step::wait_ms(1_500),
            Step::restart("n4"),
            Step::await_ring(60_000),
            member("n1", "n4", "left", Some(0)),
            Step::wait_ms(1_000),
        ])
}

/// A member dies for good and is removed; while its ranges are copied again from the
/// survivors, a partition cuts the node that took the removal off from the others (the change
/// waits), then heals, and a surviving replica reboots mid-stream: the removal completes and
/// nothing acknowledged is lost.
pub fn removal_under_partition_and_reboot() -> Scenario {
    Scenario::siblings("removal-under-partition-and-reboot", 4)
        .with_slow_handoff()
        .with_workload(membership_load())
        .steps(vec![
            Step::wait_ms(2_000),
            Step::crash("n4"),
            Step::await_member("n1", "n4", "down", 15_000),
            Step::remove("n4").via("n1"),
            Step::await_phase("n2", "streaming", 1, 20_000),
            Step::partition(&[&["n1"], &["n2", "n3"]]),
            Step::wait_ms(2_500),
            Step::Heal,
            Step::wait_ms(500),
            Step::restart("n3"),
            Step::await_ring(60_000),
            // (n3, restarted after the removal, no longer lists n4 at all.)
            member("n1", "n4", "removed", None),
            member("n2", "n4", "removed", None),
            Step::wait_ms(1_000),
        ])
}

/// The joining node (the receiver) loses power in the middle of its handoff, pages of its
/// ranges pulled and others not; restarted, it resumes after the last durable page and the
/// change completes.
pub fn receiver_crash_mid_handoff() -> Scenario {
    Scenario::siblings("receiver-crash-mid-handoff", 3)
        .with_spares(1)
        .with_slow_handoff()
        .with_workload(membership_load())
        .steps(vec![
            Step::wait_ms(3_000),
            Step::join("n4"),
            Step::await_member("n1", "n4", "alive", 10_000),
            Step::await_member("n4", "n1", "alive", 10_000),
            Step::set_weight("n4", 100),
            Step::await_phase("n1", "streaming", 4, 20_000),
            Step::crash("n4"),
            Step::wait_ms(1_500),
            Step::restart("n4"),
            Step::await_ring(60_000),
            member("n1", "n4", "normal", Some(100)),
            Step::wait_ms(1_000),
        ])
}

/// A node a range is being pulled from loses power mid-stream; the change waits for it (a down
/// participant), it restarts, and the pull resumes (from it or another old replica).
pub fn sender_crash_mid_handoff() -> Scenario {
    Scenario::siblings("sender-crash-mid-handoff", 3)
        .with_spares(1)
        .with_slow_handoff()
        .with_workload(membership_load())
        .steps(vec![
            Step::wait_ms(3_000),
            Step::join("n4"),
            Step::await_member("n1", "n4", "alive", 10_000),
            Step::await_member("n4", "n1", "alive", 10_000),
            Step::set_weight("n4", 100),
            Step::await_phase("n4", "streaming", 4, 20_000),
            Step::CrashSender,
            Step::wait_ms(2_000),
            Step::RestartCrashed,
            Step::await_ring(60_000),
            member("n2", "n4", "normal", Some(100)),
            Step::wait_ms(1_000),
        ])
}

/// A node clients send to (it coordinates their writes to both rings) loses power in the middle
/// of a change, with writes in flight through it, after it acknowledged the change; restarted,
/// it must hear how far the change got before it coordinates again.
pub fn coordinator_crash_mid_change() -> Scenario {
    Scenario::siblings("coordinator-crash-mid-change", 4)
        .with_spares(1)
        .with_slow_handoff()
        .with_workload(membership_load())
        .steps(vec![
            Step::wait_ms(2_000),
            Step::join("n5"),
            Step::await_member("n1", "n5", "alive", 10_000),
            Step::await_member("n5", "n1", "alive", 10_000),
            Step::set_weight("n5", 100),
            Step::await_phase("n1", "streaming", 1, 20_000),
            Step::put(1, "k", "v1").via("n2").level(Level::All),
            Step::put(2, "j", "w1").via("n2"),
            Step::wait_ms(5),
            Step::crash("n2"),
            Step::wait_idle(),
            Step::wait_ms(1_000),
            Step::restart("n2"),
            Step::put(1, "k", "v2").via("n2").level(Level::All),
            Step::get(2, "j").via("n2"),
            Step::await_ring(60_000),
            member("n2", "n5", "normal", Some(100)),
            Step::get(3, "k").via("n5").level(Level::All).strict(),
            Step::wait_idle(),
            Step::wait_ms(1_000),
        ])
}

/// A node that acked a change loses power while the change's proposer is down too, restarts
/// where only another restarted node can reach it (which knows nothing of the change), loses
/// power again before it hears how the change went, and restarts once more: its record of the
/// change it acked must keep it waiting through both restarts (coordinating nothing, dropping
/// nothing), until the proposer is back and the change completes. Nothing acknowledged is lost.
pub fn participant_crashes_twice_while_the_proposer_is_down() -> Scenario {
    Scenario::siblings("participant-crashes-twice-while-the-proposer-is-down", 4)
        .with_spares(1)
        .with_slow_handoff()
        .with_workload(membership_load())
        .steps(vec![
            Step::wait_ms(2_000),
            Step::join("n5"),
            Step::await_member("n1", "n5", "alive", 10_000),
            Step::await_member("n5", "n1", "alive", 10_000),
            Step::set_weight("n5", 100),
            Step::await_phase("n1", "streaming", 1, 20_000),
            Step::crash("n5"),
            Step::partition(&[&["n1", "n4", "n5"], &["n2", "n3"]]),
            Step::crash("n2"),
            Step::crash("n3"),
            Step::wait_ms(500),
            Step::restart("n2"),
            Step::restart("n3"),
            Step::wait_ms(1_500),
            Step::crash("n3"),
            Step::wait_ms(500),
            Step::restart("n3"),
            Step::wait_ms(1_000),
            Step::Heal,
            Step::wait_ms(500),
            Step::restart("n5"),
            Step::await_ring(60_000),
            member("n1", "n5", "normal", Some(100)),
            member("n3", "n5", "normal", Some(100)),
            Step::wait_ms(1_000),
        ])
}

/// A partition splits the cluster right after a change was asked for: the change cannot move
/// past a phase every participant must reach, so it waits (n5 still at weight 0 while cut off),
/// and completes once the partition heals.
pub fn partition_during_change_waits_then_completes() -> Scenario {
    Scenario::siblings("partition-during-change-waits-then-completes", 4)
        .with_spares(1)
        .with_workload(membership_load())
        .steps(vec![
            Step::wait_ms(1_500),
            Step::join("n5"),
            Step::await_member("n1", "n5", "alive", 10_000),
            Step::await_member("n5", "n1", "alive", 10_000),
            Step::await_member("n3", "n5", "alive", 10_000),
            Step::set_weight("n5", 100),
            Step::wait_ms(20),
            Step::partition(&[&["n1", "n2"], &["n3", "n4", "n5"]]),
            Step::wait_ms(6_000),
            member("n5", "n5", "joining", Some(0)),
            member("n1", "n5", "joining", Some(0)),
            Step::Heal,
            Step::await_ring(60_000),
            member("n1", "n5", "normal", Some(100)),
            member("n4", "n5", "normal", Some(100)),
            Step::wait_ms(1_000),
        ])
}

/// Two members are given new weights at the same moment: both propose, every node takes the
/// same winner, the other waits (its writes still go to its ring) and runs next.
pub fn two_weight_changes_at_once() -> Scenario {
    Scenario::siblings("two-weight-changes-at-once", 5)
        .with_workload(membership_load())
        .steps(vec![
            Step::wait_ms(1_500),
            Step::set_weight("n4", 150),
            Step::set_weight("n5", 50),
            Step::await_ring(2 * CHANGE_MS),
            member("n1", "n4", "normal", Some(150)),
            member("n1", "n5", "normal", Some(50)),
            Step::wait_ms(1_000),
        ])
}

/// While n5's ramp to 50 streams, its target is raised to 100 and another member's weight is
/// changed: the running change finishes, then the queued ones run, one at a time.
pub fn change_requested_during_a_change() -> Scenario {
    Scenario::siblings("change-requested-during-a-change", 4)
        .with_spares(1)
        .with_slow_handoff()
        .with_workload(membership_load())
        .steps(vec![
            Step::wait_ms(2_000),
            Step::join("n5"),
            Step::await_member("n1", "n5", "alive", 10_000),
            Step::await_member("n5", "n1", "alive", 10_000),
            Step::set_weight("n5", 50),
            Step::await_phase("n1", "streaming", 1, 20_000),
            Step::set_weight("n5", 100),
            Step::set_weight("n2", 150).via("n3"),
            Step::await_ring(3 * CHANGE_MS),
            member("n1", "n5", "normal", Some(100)),
            member("n1", "n2", "normal", Some(150)),
            Step::wait_ms(1_000),
        ])
}

/// A spare configured with weight 100 ramps itself in; while its handoff streams, another
/// member is asked to leave: the leave waits for the join, then drains.
pub fn leave_while_a_join_ramps() -> Scenario {
    Scenario::siblings("leave-while-a-join-ramps", 4)
        .with_spares(1)
        .with_slow_handoff()
        .with_workload(membership_load())
        .steps(vec![
            Step::wait_ms(2_000),
            Step::join_at("n5", 100),
            Step::await_phase("n1", "streaming", 1, 20_000),
            Step::leave("n2"),
            Step::await_ring(3 * CHANGE_MS),
            member("n1", "n5", "normal", Some(100)),
            member("n1", "n2", "left", Some(0)),
            Step::wait_ms(1_000),
        ])
}

/// The operator asks a new node for its weight as soon as it serves (its readiness probe). The
/// node should take it (or answer UNAVAILABLE, which callers retry), not refuse it for good.
/// Today it refuses it as INVALID_ARGUMENT until it has heard from the cluster (known bug
/// `joiner-unknown-to-itself`); the retry once it has, as a careful caller would make, works.
pub fn weight_asked_of_a_joiner_as_soon_as_it_serves() -> Scenario {
    Scenario::siblings("weight-asked-of-a-joiner-as-soon-as-it-serves", 3)
        .with_spares(1)
        .steps(vec![
            Step::wait_ms(500),
            Step::join("n4"),
            Step::wait_ms(12),
            Step::set_weight("n4", 100),
            Step::await_member("n4", "n1", "alive", 10_000),
            Step::set_weight("n4", 100),
            Step::await_ring(CHANGE_MS),
            member("n1", "n4", "normal", Some(100)),
        ])
}

/// A member dies for good in the middle of a join (it never acknowledges the change's later
/// phases); an admin removes it once gossip holds it down. The removal must not wait behind the
/// change that waits for the dead member: both complete.
pub fn node_dies_for_good_mid_change_and_is_removed() -> Scenario {
    Scenario::siblings("node-dies-for-good-mid-change-and-is-removed", 4)
        .with_spares(1)
        .with_slow_handoff()
        .with_workload(membership_load())
        .steps(vec![
            Step::wait_ms(2_000),
            Step::join("n5"),
            Step::await_member("n1", "n5", "alive", 10_000),
            Step::await_member("n5", "n1", "alive", 10_000),
            Step::set_weight("n5", 100),
            Step::await_phase("n1", "streaming", 1, 20_000),
            Step::crash("n4"),
            Step::await_member("n1", "n4", "down", 15_000),
            Step::remove("n4").via("n1"),
            Step::await_ring(3 * CHANGE_MS),
            member("n1", "n4", "removed", None),
            member("n1", "n5", "normal", Some(100)),
            Step::wait_ms(1_000),
        ])
}

/// Keys written at W=ALL before a node joins are read through the new node at R=ONE once it
/// owns them (R + W > N): it answers from its own copy, which the handoff must have filled
/// before reads moved to the new ring. The scenario `checker_catches_reads_before_handoff`
/// runs with the handoff's data taken away ([`crate::Breakage::ForgetHandoff`]).
pub fn new_owner_serves_what_was_written_before_it_joined() -> Scenario {
    let keys: Vec<String> = (1..=8).map(|i| format!("k{i}")).collect();
    let mut steps = Vec::new();
    for k in &keys {
        steps.push(
            Step::put(1, k, &format!("{k}-v1"))
                .via("n1")
                .level(Level::All)
                .ctx(Ctx::Empty),
        );
    }
    steps.extend([
        Step::wait_idle(),
        Step::join("n4"),
        Step::await_member("n1", "n4", "alive", 10_000),
        Step::await_member("n4", "n1", "alive", 10_000),
        Step::set_weight("n4", 100),
        Step::await_ring(CHANGE_MS),
    ]);
    for k in &keys {
        steps.push(Step::get(2, k).via("n4").level(Level::One).strict());
    }
    steps.push(Step::wait_idle());
    for k in &keys {
        steps.push(values(2, k, &[&format!("{k}-v1")]));
    }
    Scenario::siblings("new-owner-serves-what-was-written-before-it-joined", 3)
        .with_spares(1)
        .steps(steps)
}

/// A spare configured with weight 100 starts while every member is down (a power cut of the
/// cluster): it finds no seed. It must wait for the cluster, then join through a ring change
/// that hands it its ranges. Keys written at W=ALL before are read through it at R=ONE, strict
/// (R + W > N, so (e) holds whatever the faults): 100 ms after the members restart, when it may
/// not have heard from them yet (it may refuse, it must not answer without the writes), and
/// again once the ring settled. `nemesis-membership` seed 1111 found that it answers: alone, it
/// commits a ring of its own and serves from it (docs/testing.md, known bug
/// `lone-joiner-commits-its-own-ring`).
pub fn joiner_that_finds_no_seed_waits_for_the_cluster() -> Scenario {
    let keys: Vec<String> = (1..=8).map(|i| format!("k{i}")).collect();
    let mut steps = Vec::new();
    for k in &keys {
        steps.push(
            Step::put(1, k, &format!("{k}-v1"))
                .via("n1")
                .level(Level::All)
                .strict()
                .ctx(Ctx::Empty),
        );
    }
    steps.extend([
        Step::wait_idle(),
        Step::crash("n1"),
        Step::crash("n2"),
        Step::crash("n3"),
        Step::join_at("n4", 100),
        Step::wait_ms(3_000),
        Step::restart("n1"),
        Step::restart("n2"),
        Step::restart("n3"),
        Step::wait_ms(100),
    ]);
    for k in &keys {
        steps.push(Step::get(2, k).via("n4").level(Level::One).strict());
    }
    steps.extend([
        Step::wait_idle(),
        Step::await_member("n4", "n1", "alive", 15_000),
        Step::await_ring(CHANGE_MS),
        member("n1", "n4", "normal", Some(100)),
    ]);
    for k in &keys {
        steps.push(Step::get(3, k).via("n4").level(Level::One).strict());
    }
    steps.push(Step::wait_idle());
    for k in &keys {
        steps.push(values(3, k, &[&format!("{k}-v1")]));
    }
    Scenario::siblings("joiner-that-finds-no-seed-waits-for-the-cluster", 3)
        .with_spares(1)
        .steps(steps)
}

/// A node joins through seeds behind a partition just as a ring change is about to commit on
/// the other side (what seed 4653 of `nemesis-membership` found): once n1 sees the participants
/// of n4's join switch their reads to the new ring (or the change done), {n1, n4} are cut from
/// {n2, n3}, and n5 joins on the second side. When n4 commits then, it never hears of n5 and
/// writes go to the new ring only. (Whether the commit lands before the cut depends on the seed;
/// the exact state is staged in `dynakv_core::transition`'s tests.) n5 owns nothing and
/// must not read from the old ring its view still shows, and n2 and n3, hearing of a new member
/// of weight 0, must not fall back to reading from the old ring either. The workload's quorum
/// reads (n5 is one of its targets once it joins) are checked against every write acknowledged
/// before them.
pub fn joiner_behind_a_partition_while_a_change_commits() -> Scenario {
    let mut steps = vec![
        Step::wait_ms(1_500),
        Step::join("n4"),
        Step::await_member("n1", "n4", "alive", 10_000),
        Step::await_member("n4", "n1", "alive", 10_000),
        Step::await_member("n3", "n4", "alive", 10_000),
        Step::set_weight("n4", 100),
        Step::await_phase_or_later("n1", "switching", CHANGE_MS),
        Step::partition(&[&["n1", "n4"], &["n2", "n3", "n5"]]),
        Step::join("n5"),
        Step::await_member("n5", "n2", "alive", 10_000),
    ];
    for (i, key) in ["j1", "j2", "j3", "j4"].iter().enumerate() {
        steps.push(Step::put(0, key, &format!("a{i}")).via("n1").strict());
        steps.push(Step::wait_ms(300));
        steps.push(Step::get(1, key).via("n5").strict());
        steps.push(Step::get(2, key).via("n2").strict());
        steps.push(Step::wait_ms(300));
    }
    steps.extend([
        Step::wait_ms(2_000),
        Step::Heal,
        Step::await_ring(60_000),
        member("n1", "n4", "normal", Some(100)),
        member("n5", "n5", "joining", Some(0)),
        Step::wait_ms(1_000),
    ]);
    Scenario::siblings("joiner-behind-a-partition-while-a-change-commits", 3)
        .with_spares(2)
        .with_workload(membership_load())
        .steps(steps)
}
