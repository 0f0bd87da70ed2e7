//! The simulation suite (docs/testing.md).
//!
//! - CI: every hand-written scenario, plus a fixed set of nemesis seeds per profile.
//! - `#[ignore]` `long_run`: thousands of seeds (`DYNAKV_SIM_SEEDS`, default 1000).
//! - `#[ignore]` `replay`: one scenario and seed from the environment, with the full report;
//!   every failure prints the command that runs it.
//! - The checker is proven to notice broken mechanisms (`checker_catches_*`).

use std::time::Instant;

use dynakv_sim::catalog;
use dynakv_sim::report::report;
use dynakv_sim::{Breakage, Outcome, RunOptions, Settle, run_named};

fn run(name: &str, seed: u64, breakage: Option<Breakage>) -> Outcome {
    let opts = RunOptions::new(seed)
        .breakage(breakage)
        .settle(env_settle());
    run_named(name, opts).unwrap_or_else(|| {
        panic!(
            "unknown scenario {name:?}; known: {}",
            catalog::names().join(", ")
        )
    })
}

/// Runs every (scenario, seed) and fails with the report of every failing one.
fn run_all(runs: &[(&str, u64)]) {
    let mut failures = Vec::new();
    for (name, seed) in runs {
        let started = Instant::now();
        let outcome = run(name, *seed, env_breakage());
        eprintln!(
            "{name} seed {seed}: {} in {:.1?} ({} ops, {} ms simulated{})",
            if outcome.passed() { "ok" } else { "FAILED" },
            started.elapsed(),
            outcome.history.ops.len(),
            outcome.sim_ms,
            match outcome.known_bug_violations() {
                0 => String::new(),
                n => format!(", {n} violations of known bugs"),
            }
        );
        if !outcome.passed() {
            failures.push(report(&outcome));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} simulation runs failed:\n\n{}",
        failures.len(),
        runs.len(),
        failures.join("\n\n")
    );
}

fn hand_written(name: &str) {
    run_all(&[(name, 1)]);
}

#[test]
fn paused_node_is_suspected_then_down_then_back() {
    hand_written("paused-node-is-suspected-then-down-then-back");
}

#[test]
fn partition_sides_see_each_other_down_until_healed() {
    hand_written("partition-sides-see-each-other-down-until-healed");
}

#[test]
fn crashed_node_is_down_until_it_restarts() {
    hand_written("crashed-node-is-down-until-it-restarts");
}

#[test]
fn coordinator_crash_before_its_own_commit_mints_no_dot_twice() {
    hand_written("coordinator-crash-before-its-own-commit-mints-no-dot-twice");
}

#[test]
fn anti_entropy_alone_repairs_a_replica_that_missed_writes() {
    hand_written("anti-entropy-alone-repairs-a-replica-that-missed-writes");
}

#[test]
fn quorum_write_then_read() {
    hand_written("quorum-write-then-read");
}

#[test]
fn concurrent_writes_with_one_context_become_siblings() {
    hand_written("concurrent-writes-with-one-context-become-siblings");
}

#[test]
fn blind_writes_pile_up_as_siblings() {
    hand_written("blind-writes-pile-up-as-siblings");
}

#[test]
fn acknowledged_write_survives_crash_of_its_quorum() {
    hand_written("acknowledged-write-survives-crash-of-its-quorum");
}

#[test]
fn minority_partition_refuses_quorum_writes() {
    hand_written("minority-partition-refuses-quorum-writes");
}

#[test]
fn delete_is_not_undone_by_a_stale_replica() {
    hand_written("delete-is-not-undone-by-a-stale-replica");
}

#[test]
fn stale_replica_catches_up() {
    hand_written("stale-replica-catches-up");
}

#[test]
fn lww_keeps_the_newest_write() {
    hand_written("lww-keeps-the-newest-write");
}

#[test]
fn paused_node_catches_up() {
    hand_written("paused-node-catches-up");
}

#[test]
fn forwarded_writes_keep_causality() {
    hand_written("forwarded-writes-keep-causality");
}

#[test]
fn cart_under_bridge_partition() {
    run_all(&[
        ("cart-under-bridge-partition", 1),
        ("cart-under-bridge-partition", 2),
    ]);
}

#[test]
fn cart_under_loss_and_delay() {
    run_all(&[
        ("cart-under-loss-and-delay", 1),
        ("cart-under-loss-and-delay", 2),
    ]);
}

#[test]
fn whole_cluster_power_cut() {
    run_all(&[
        ("whole-cluster-power-cut", 1),
        ("whole-cluster-power-cut", 2),
    ]);
}

#[test]
fn rolling_restarts() {
    hand_written("rolling-restarts");
}

#[test]
fn majorities_ring() {
    hand_written("majorities-ring");
}

// Membership change: joins, weight ramps, drains, removals, under load and under faults.

#[test]
fn join_ramp_under_load() {
    hand_written("join-ramp-under-load");
}

#[test]
fn drain_under_load() {
    hand_written("drain-under-load");
}

#[test]
fn remove_crashed_node() {
    hand_written("remove-crashed-node");
}

#[test]
fn draining_node_crashes_mid_handoff() {
    hand_written("draining-node-crashes-mid-handoff");
}

#[test]
fn removal_under_partition_and_reboot() {
    hand_written("removal-under-partition-and-reboot");
}

#[test]
fn receiver_crash_mid_handoff() {
    hand_written("receiver-crash-mid-handoff");
}

#[test]
fn sender_crash_mid_handoff() {
    hand_written("sender-crash-mid-handoff");
}

#[test]
fn coordinator_crash_mid_change() {
    hand_written("coordinator-crash-mid-change");
}

#[test]
fn participant_crashes_twice_while_the_proposer_is_down() {
    hand_written("participant-crashes-twice-while-the-proposer-is-down");
}

#[test]
fn partition_during_change_waits_then_completes() {
    hand_written("partition-during-change-waits-then-completes");
}

#[test]
fn two_weight_changes_at_once() {
    hand_written("two-weight-changes-at-once");
}

#[test]
fn change_requested_during_a_change() {
    hand_written("change-requested-during-a-change");
}

#[test]
fn leave_while_a_join_ramps() {
    hand_written("leave-while-a-join-ramps");
}

#[test]
fn weight_asked_of_a_joiner_as_soon_as_it_serves() {
    hand_written("weight-asked-of-a-joiner-as-soon-as-it-serves");
}

#[test]
fn new_owner_serves_what_was_written_before_it_joined() {
    hand_written("new-owner-serves-what-was-written-before-it-joined");
}

/// A member that dies for good mid-change blocks that change until its removal preempts it.
/// Before the fix of `removal-queued-behind-a-change-that-waits-for-the-removed`
/// (docs/testing.md) the removal queued behind the change and neither ever completed.
#[test]
fn node_dies_for_good_mid_change_and_is_removed() {
    hand_written("node-dies-for-good-mid-change-and-is-removed");
}

/// A spare that starts while every seed is down must wait for the cluster: before the fix of
/// `lone-joiner-commits-its-own-ring` (docs/testing.md) it committed a ring of its own and
/// later entered the cluster's ring without a handoff, and reads through it missed
/// acknowledged writes.
#[test]
fn joiner_that_finds_no_seed_waits_for_the_cluster() {
    hand_written("joiner-that-finds-no-seed-waits-for-the-cluster");
}

/// Regression (seed 4653 of `nemesis-membership`): a node that joined behind a partition read
/// from the ring its view showed, after the other side had committed a change without it; and
/// members that heard of it took the change for stale and went back to the old ring.
/// Seeds 2, 4, 6 and 8 cut the cluster while the change switches, and each failed before the
/// fix (a quorum read on the second side missed a write acknowledged on the first).
#[test]
fn joiner_behind_a_partition_while_a_change_commits() {
    let name = "joiner-behind-a-partition-while-a-change-commits";
    run_all(&[(name, 2), (name, 4), (name, 6), (name, 8)]);
}

/// Nemesis profiles of the CI and how many seeds (1..=count) of each.
const CI_NEMESIS: &[(&str, u64)] = &[
    ("nemesis-mixed", 24),
    ("nemesis-lww", 8),
    ("nemesis-carts-3", 8),
];

/// The `nemesis-membership` seeds of the CI (one costs about thirty of the others; the long run
/// in docs/testing.md covers thousands). Seed 5: two drains, two joins (one given its weight
/// after it starts, one ramping itself), crashes, then a member that dies for good and is
/// removed under the faults that follow. Seed 8327: three nodes crash mid-join and restart
/// together; one that had finished its pull hears another restarted node before the proposer
/// (the bug of `RingState::knows_fate_of`).
const CI_MEMBERSHIP_SEEDS: &[u64] = &[5, 8327];

/// The CI nemesis seeds: `profile` with seeds `first..first + count`.
fn nemesis(profile: &str, first: u64, count: u64) {
    let runs: Vec<(&str, u64)> = (first..first + count).map(|s| (profile, s)).collect();
    run_all(&runs);
}

#[test]
fn nemesis_mixed_seeds_1_to_8() {
    nemesis("nemesis-mixed", 1, 8);
}

#[test]
fn nemesis_mixed_seeds_9_to_16() {
    nemesis("nemesis-mixed", 9, 8);
}

#[test]
fn nemesis_mixed_seeds_17_to_24() {
    nemesis("nemesis-mixed", 17, 8);
}

#[test]
fn nemesis_lww_seeds_1_to_8() {
    nemesis("nemesis-lww", 1, 8);
}

#[test]
fn nemesis_carts_3_seeds_1_to_8() {
    nemesis("nemesis-carts-3", 1, 8);
}

#[test]
fn nemesis_membership_seed_5() {
    nemesis("nemesis-membership", CI_MEMBERSHIP_SEEDS[0], 1);
}

#[test]
fn nemesis_membership_seed_8327() {
    nemesis("nemesis-membership", CI_MEMBERSHIP_SEEDS[1], 1);
}

/// Same seed, same run: the history, the schedule and the final storage are identical, also
/// when other runs came first in the same process (with the admin host, the status watcher and
/// a removal of a membership change too).
#[test]
fn same_seed_replays_the_same_history() {
    for (profile, seed) in [
        ("nemesis-mixed", 1),
        ("nemesis-carts-3", 2),
        ("removal-under-partition-and-reboot", 3),
    ] {
        let a = run(profile, seed, None);
        let b = run(profile, seed, None);
        for (x, y) in a.history.ops.iter().zip(&b.history.ops) {
            assert_eq!(
                x, y,
                "{profile} seed {seed}: histories diverge at op #{}:\n{x}\n{y}",
                x.id
            );
        }
        assert_eq!(a.history.ops.len(), b.history.ops.len(), "op counts differ");
        assert_eq!(a.schedule, b.schedule, "schedules differ");
        assert_eq!(a.snapshot, b.snapshot, "final storage differs");
    }
}

/// Acknowledging before fsync must be caught: the write acknowledged by n1 and n2 is gone
/// once both crash.
#[test]
fn checker_catches_ack_before_fsync() {
    let outcome = run(
        "acknowledged-write-survives-crash-of-its-quorum",
        1,
        Some(Breakage::SkipSync),
    );
    assert!(
        !outcome.passed(),
        "skip-sync went unnoticed:\n{}",
        report(&outcome)
    );
    let outcome = run("whole-cluster-power-cut", 1, Some(Breakage::SkipSync));
    assert!(
        !outcome.passed(),
        "skip-sync went unnoticed:\n{}",
        report(&outcome)
    );
}

/// Forwarded writes are hedged and retried (write ids make the second copy harmless): in the
/// 5-node mixed profile some get a copy that a replica holds hidden because a client overwrote
/// the other one, and the run passes; with the contexts' write ids dropped on the way to the
/// node, the late copies come back and the checker sees them.
#[test]
fn forward_retries_leave_late_copies_hidden_and_the_checker_catches_dropped_ids() {
    let hidden = |o: &Outcome| {
        o.notes
            .iter()
            .find_map(|n| n.split("held hidden (superseded) at some point: ").nth(1))
            .and_then(|n| n.trim().parse::<usize>().ok())
            .unwrap_or(0)
    };
    let outcome = run("nemesis-mixed", 1, None);
    assert!(outcome.passed(), "{}", report(&outcome));
    assert!(
        hidden(&outcome) > 0,
        "no late copy was hidden:\n{}",
        report(&outcome)
    );
    let caught =
        (1..=4).any(|seed| !run("nemesis-mixed", seed, Some(Breakage::DropContextIds)).passed());
    assert!(
        caught,
        "dropping the contexts' write ids went unnoticed in nemesis-mixed seeds 1-4"
    );
}

/// With one node lacking write ids (a rolling upgrade half done), no node uses them: under the
/// same faults as `nemesis-mixed`, whose runs apply forwarded writes at two coordinators, no
/// forwarded write is applied twice (a plain copy at two dots would fail check (c)), and nothing
/// acknowledged is lost.
#[test]
fn with_a_node_lacking_write_ids_forwards_are_applied_once() {
    let twice = |o: &Outcome| {
        o.notes
            .iter()
            .any(|n| n.contains("applied at two coordinators"))
    };
    let mut plain_twice = false;
    for seed in 1..=2 {
        let outcome = run("nemesis-mixed-old-node", seed, None);
        assert!(outcome.passed(), "{}", report(&outcome));
        assert!(
            !twice(&outcome),
            "write ids were used:\n{}",
            report(&outcome)
        );
        plain_twice |= twice(&run("nemesis-mixed", seed, None));
    }
    assert!(
        plain_twice,
        "nemesis-mixed seeds 1-2 applied no forwarded write twice: this test shows nothing"
    );
}

/// Writes that lose their context make siblings of values their writers had seen.
#[test]
fn checker_catches_ignored_put_context() {
    let outcome = run(
        "concurrent-writes-with-one-context-become-siblings",
        1,
        Some(Breakage::DropPutContext),
    );
    assert!(
        !outcome.passed(),
        "an ignored context went unnoticed:\n{}",
        report(&outcome)
    );
    let outcome = run("nemesis-mixed", 1, Some(Breakage::DropPutContext));
    assert!(
        !outcome.passed(),
        "an ignored context went unnoticed:\n{}",
        report(&outcome)
    );
}

/// Hints that are never handed off are noticed: after settling, hints must all be delivered.
#[test]
fn checker_catches_undelivered_hints() {
    let outcomes: Vec<Outcome> = ["majorities-ring", "rolling-restarts"]
        .iter()
        .map(|name| run(name, 1, Some(Breakage::NoHintDelivery)))
        .collect();
    assert!(
        outcomes.iter().any(|o| !o.passed()),
        "undelivered hints went unnoticed:\n{}",
        outcomes.iter().map(report).collect::<Vec<_>>().join("\n")
    );
}

/// A new owner that serves reads without the data its handoff should have brought is caught:
/// keys written at W=ALL before the join read as absent through it at R=ONE ((e), and the
/// scenario's own assertions).
#[test]
fn checker_catches_reads_before_handoff() {
    let outcome = run(
        "new-owner-serves-what-was-written-before-it-joined",
        1,
        Some(Breakage::ForgetHandoff),
    );
    assert!(
        !outcome.passed(),
        "a new owner without its ranges went unnoticed:\n{}",
        report(&outcome)
    );
    assert!(
        outcome
            .violations
            .iter()
            .any(|v| v.invariant == dynakv_sim::checker::Invariant::StaleRead),
        "(e) did not notice:\n{}",
        report(&outcome)
    );
    // The keys vanished behind the spare's back: its Merkle trees still hold them.
    assert!(
        outcome.violations.iter().any(|v| {
            v.invariant == dynakv_sim::checker::Invariant::Divergence
                && v.message.contains("Merkle tree for")
        }),
        "(d) did not notice trees that disagree with storage:\n{}",
        report(&outcome)
    );
}

/// Without anti-entropy (and with neither hints nor reads), a replica that missed writes stays
/// behind.
#[test]
fn checker_catches_disabled_anti_entropy() {
    let outcome = run(
        "anti-entropy-alone-repairs-a-replica-that-missed-writes",
        1,
        Some(Breakage::NoAntiEntropy),
    );
    assert!(
        !outcome.passed(),
        "disabled anti-entropy went unnoticed:\n{}",
        report(&outcome)
    );
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

fn env_breakage() -> Option<Breakage> {
    std::env::var("DYNAKV_SIM_BREAK").ok().map(|b| {
        Breakage::parse(&b).unwrap_or_else(|| {
            let names: Vec<&str> = Breakage::ALL.iter().map(|b| b.name()).collect();
            panic!("DYNAKV_SIM_BREAK={b:?}: use one of {}", names.join(", "))
        })
    })
}

fn env_settle() -> Settle {
    match std::env::var("DYNAKV_SIM_SETTLE") {
        Ok(s) => Settle::parse(&s)
            .unwrap_or_else(|| panic!("DYNAKV_SIM_SETTLE={s:?}: use read-repair or wait")),
        Err(_) => Settle::default(),
    }
}

/// Every CI run: (scenario, seed).
fn ci_runs() -> Vec<(String, u64)> {
    let mut runs: Vec<(String, u64)> = catalog::hand_written()
        .into_iter()
        .filter(|s| !catalog::BLOCKED_BY_KNOWN_BUGS.contains(&s.name.as_str()))
        .map(|s| (s.name, 1))
        .collect();
    for name in [
        "cart-under-bridge-partition",
        "cart-under-loss-and-delay",
        "whole-cluster-power-cut",
    ] {
        runs.push((name.to_string(), 2));
    }
    for (profile, count) in CI_NEMESIS {
        runs.extend((1..=*count).map(|s| (profile.to_string(), s)));
    }
    runs.extend(
        CI_MEMBERSHIP_SEEDS
            .iter()
            .map(|s| ("nemesis-membership".to_string(), *s)),
    );
    runs
}

/// Which CI runs notice a broken mechanism: `DYNAKV_SIM_BREAK=<breakage> cargo nextest run -p
/// dynakv-sim --run-ignored only --no-capture breakage_sweep` prints, for every CI run, whether
/// it failed and its first violation (docs/testing.md has the table). Without
/// `DYNAKV_SIM_BREAK` it sweeps whatever the node was built with (a mechanism broken in a
/// private copy of the node).
#[test]
#[ignore = "set DYNAKV_SIM_BREAK, or build a broken node"]
fn breakage_sweep() {
    let breakage = env_breakage();
    let label = breakage.map_or("node-breakage", |b| b.name());
    let mut caught = 0;
    let runs = ci_runs();
    for (name, seed) in &runs {
        let outcome = run(name, *seed, breakage);
        let first = outcome
            .violations
            .iter()
            .find(|v| v.known_bug.is_none())
            .map(|v| v.to_string())
            .unwrap_or_default();
        if !outcome.passed() {
            caught += 1;
        }
        println!(
            "{label} {name} seed {seed}: {}",
            if outcome.passed() {
                "not caught".to_string()
            } else {
                format!("CAUGHT: {}", first.chars().take(300).collect::<String>())
            }
        );
    }
    println!("{label}: caught by {caught} of {} CI runs", runs.len());
    assert!(caught > 0, "no CI run notices {label}");
}

/// Replays one run and prints its full report:
/// `DYNAKV_SIM_SCENARIO=<name> DYNAKV_SIM_SEED=<seed> cargo nextest run -p dynakv-sim
/// --run-ignored only --no-capture replay`.
#[test]
#[ignore = "replays the run named by DYNAKV_SIM_SCENARIO and DYNAKV_SIM_SEED"]
fn replay() {
    let name = std::env::var("DYNAKV_SIM_SCENARIO").unwrap_or_else(|_| "nemesis-mixed".into());
    let seed = env_u64("DYNAKV_SIM_SEED", 1);
    if let Ok(filter) = std::env::var("DYNAKV_SIM_LOG") {
        struct SimTime;
        impl tracing_subscriber::fmt::time::FormatTime for SimTime {
            fn format_time(
                &self,
                w: &mut tracing_subscriber::fmt::format::Writer<'_>,
            ) -> std::fmt::Result {
                let ms = turmoil::sim_elapsed().map_or(0, |d| d.as_millis());
                write!(w, "{ms:>8} ms")
            }
        }
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_timer(SimTime)
            .with_ansi(false)
            .try_init();
    }
    let started = Instant::now();
    let outcome = run(&name, seed, env_breakage());
    println!("{}", report(&outcome));
    if std::env::var("DYNAKV_SIM_HISTORY").is_ok() {
        for op in &outcome.history.ops {
            println!("{op}");
        }
    }
    println!("wall time: {:.1?}", started.elapsed());
    assert!(outcome.passed(), "the run failed (report above)");
}

/// Thousands of seeds: `DYNAKV_SIM_SEEDS=5000 cargo nextest run -p dynakv-sim --run-ignored
/// only long_run`. The static-cluster profiles ([`catalog::STATIC_PROFILES`]) rotate per seed
/// unless `DYNAKV_SIM_SCENARIO` names one (`nemesis-membership` for ring changes);
/// `DYNAKV_SIM_FIRST_SEED` (default 1000) and `DYNAKV_SIM_THREADS` (default: all cores). Runs
/// that pass only because their violations are known bugs are listed by bug, with their seeds.
#[test]
#[ignore = "long run; set DYNAKV_SIM_SEEDS"]
fn long_run() {
    let seeds = env_u64("DYNAKV_SIM_SEEDS", 1000);
    let first = env_u64("DYNAKV_SIM_FIRST_SEED", 1000);
    let threads = env_u64(
        "DYNAKV_SIM_THREADS",
        std::thread::available_parallelism().map_or(2, |n| n.get() as u64),
    );
    let only = std::env::var("DYNAKV_SIM_SCENARIO").ok();
    let breakage = env_breakage();
    let started = Instant::now();
    let next = std::sync::atomic::AtomicU64::new(0);
    let failures = std::sync::Mutex::new(Vec::new());
    // Runs that passed only because their violations are known bugs: bug id -> seeds.
    let known = std::sync::Mutex::new(std::collections::BTreeMap::<&str, Vec<u64>>::new());
    let ops = std::sync::atomic::AtomicU64::new(0);
    let sim_ms = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= seeds {
                        return;
                    }
                    let seed = first + i;
                    let profile = only.clone().unwrap_or_else(|| {
                        catalog::STATIC_PROFILES[(seed as usize) % catalog::STATIC_PROFILES.len()]
                            .to_string()
                    });
                    let outcome = run(&profile, seed, breakage);
                    ops.fetch_add(
                        outcome.history.ops.len() as u64,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    sim_ms.fetch_add(outcome.sim_ms, std::sync::atomic::Ordering::Relaxed);
                    if !outcome.passed() {
                        eprintln!("FAILED: {}", dynakv_sim::report::replay_command(&outcome));
                        failures
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(report(&outcome));
                    } else if outcome.known_bug_violations() > 0 {
                        let bugs: std::collections::BTreeSet<&str> = outcome
                            .violations
                            .iter()
                            .filter_map(|v| v.known_bug.map(|b| b.id))
                            .collect();
                        eprintln!(
                            "known bug {}: {}",
                            bugs.iter().copied().collect::<Vec<_>>().join(", "),
                            dynakv_sim::report::replay_command(&outcome)
                        );
                        let mut known = known.lock().unwrap_or_else(|p| p.into_inner());
                        for bug in bugs {
                            known.entry(bug).or_default().push(seed);
                        }
                    }
                    if (i + 1).is_multiple_of(100) {
                        eprintln!("{} of {seeds} seeds done, {:.0?}", i + 1, started.elapsed());
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap_or_else(|p| p.into_inner());
    let known = known.into_inner().unwrap_or_else(|p| p.into_inner());
    for (bug, seeds) in &known {
        let mut seeds = seeds.clone();
        seeds.sort_unstable();
        let shown: Vec<String> = seeds.iter().map(|s| s.to_string()).collect();
        eprintln!(
            "known bug {bug}: {} runs passed only as known-bug violations (seeds {})",
            seeds.len(),
            shown.join(" ")
        );
    }
    eprintln!(
        "long run: {seeds} seeds from {first}, {} failed, {} with known-bug violations only, {} \
         operations, {:.1} simulated hours, {:.0?} on {threads} threads",
        failures.len(),
        known
            .values()
            .flatten()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        ops.into_inner(),
        sim_ms.into_inner() as f64 / 3_600_000.0,
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} runs failed:\n\n{}",
        failures.len(),
        failures
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n\n")
    );
}
