//! What a failing run prints: the seed and the exact command that replays it, the fault
//! schedule, the broken invariants, the operations that broke them, and the final replicas.

use std::collections::BTreeSet;
use std::fmt::Write;

use crate::checker::describe;
use crate::harness::Outcome;

/// The command that replays a run.
pub fn replay_command(outcome: &Outcome) -> String {
    let breakage = outcome
        .breakage
        .map(|b| format!("DYNAKV_SIM_BREAK={} ", b.name()))
        .unwrap_or_default();
    let settle = if outcome.settle == crate::Settle::default() {
        String::new()
    } else {
        format!("DYNAKV_SIM_SETTLE={} ", outcome.settle.name())
    };
    format!(
        "{breakage}{settle}DYNAKV_SIM_SCENARIO={} DYNAKV_SIM_SEED={} cargo nextest run -p \
         dynakv-sim --run-ignored only --no-capture replay",
        outcome.scenario, outcome.seed
    )
}

/// How many operations of a violated key the report lists (the most recent ones).
const KEY_OPS_SHOWN: usize = 40;

/// A full report of a run (failing or not).
pub fn report(outcome: &Outcome) -> String {
    let mut out = String::new();
    let verdict = if outcome.passed_strict() {
        "passed"
    } else if outcome.passed() {
        "passed (only known bugs)"
    } else {
        "FAILED"
    };
    let _ = writeln!(
        out,
        "=== DynaKV simulation {verdict}: scenario {} seed {}{} ===",
        outcome.scenario,
        outcome.seed,
        outcome
            .breakage
            .map(|b| format!(" (breakage: {})", b.name()))
            .unwrap_or_default()
    );
    let _ = writeln!(out, "replay: {}", replay_command(outcome));
    let _ = writeln!(out, "\nschedule (simulated ms):");
    for (t, step) in &outcome.schedule {
        let _ = writeln!(out, "  {t:>6}  {step}");
    }
    for note in &outcome.notes {
        let _ = writeln!(out, "note: {note}");
    }
    if outcome.passed_strict() {
        return out;
    }
    let _ = writeln!(out, "\nviolations ({}):", outcome.violations.len());
    for v in &outcome.violations {
        let _ = writeln!(out, "- {v}");
        for id in &v.ops {
            if let Some(op) = outcome.history.ops.get(*id) {
                let _ = writeln!(out, "    {op}");
            }
        }
    }
    let keys: BTreeSet<&str> = outcome
        .violations
        .iter()
        .map(|v| v.key.as_str())
        .filter(|k| !k.is_empty())
        .collect();
    for key in keys {
        let ops: Vec<_> = outcome.history.on_key(key).collect();
        let skip = ops.len().saturating_sub(KEY_OPS_SHOWN);
        let _ = writeln!(
            out,
            "\noperations on {key} ({} in all{}):",
            ops.len(),
            if skip > 0 {
                format!(", the last {KEY_OPS_SHOWN}")
            } else {
                String::new()
            }
        );
        for op in &ops[skip..] {
            let _ = writeln!(out, "  {op}");
        }
        let _ = writeln!(out, "final replicas of {key}:");
        let replicas = outcome.replicas.get(key);
        for node in replicas.into_iter().flatten() {
            let stored = outcome.snapshot.get(node).and_then(|m| m.get(key));
            let _ = writeln!(out, "  {node}: {}", describe(stored.map(Vec::as_slice)));
        }
        // Copies on other nodes (old owners, left or removed nodes).
        for (node, keys) in &outcome.snapshot {
            if replicas.is_some_and(|r| r.contains(node)) {
                continue;
            }
            if let Some(stored) = keys.get(key) {
                let _ = writeln!(
                    out,
                    "  (not a final replica) {node}: {}",
                    describe(Some(stored))
                );
            }
        }
    }
    let bugs: BTreeSet<&str> = outcome
        .violations
        .iter()
        .filter_map(|v| v.known_bug.map(|b| b.id))
        .collect();
    for bug in crate::checker::KNOWN_BUGS {
        if bugs.contains(bug.id) {
            let _ = writeln!(out, "\nknown bug {}: {}", bug.id, bug.summary);
        }
    }
    let _ = writeln!(out, "\nreplay: {}", replay_command(outcome));
    out
}
