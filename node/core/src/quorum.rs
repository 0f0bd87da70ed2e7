//! Quorum bookkeeping for one request: which replicas were asked, which answered, which failed,
//! and whether the request has won (`needed` successes) or lost (too many failures to win).
//!
//! The failure is a typed value ([`QuorumError`]) carrying needed, got and who failed why, so the
//! client's message and the metric label come from one place.
//!
//! Invariants:
//! - a node is counted at most once (a second reply from the same node is ignored);
//! - once [`Vote::Won`] or [`Vote::Lost`], the verdict never changes: later replies are recorded
//!   (for read repair and receipts) but do not flip it;
//! - `Lost` is declared as soon as `acks + outstanding < needed`, never earlier.

use std::fmt;

use crate::NodeId;

/// Which side of the request the quorum counts: the letter in "needed W=2".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QuorumKind {
    Read,
    Write,
}

impl QuorumKind {
    fn letter(self) -> char {
        match self {
            QuorumKind::Read => 'R',
            QuorumKind::Write => 'W',
        }
    }
}

/// Why a replica did not count toward the quorum. The names are stable: they are metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ReplicaFailure {
    /// No connection could be made or it broke.
    Unreachable,
    /// No answer before the request's deadline.
    Timeout,
    /// The replica answered with an error (storage failed, overloaded, refused).
    Refused,
    /// Failure detection already marks it down; it was not asked.
    Down,
}

impl ReplicaFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaFailure::Unreachable => "unreachable",
            ReplicaFailure::Timeout => "timed out",
            ReplicaFailure::Refused => "refused",
            ReplicaFailure::Down => "down",
        }
    }

    /// Metric label (no spaces).
    pub fn label(self) -> &'static str {
        match self {
            ReplicaFailure::Unreachable => "unreachable",
            ReplicaFailure::Timeout => "timeout",
            ReplicaFailure::Refused => "refused",
            ReplicaFailure::Down => "down",
        }
    }
}

/// The verdict so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vote {
    Pending,
    Won,
    Lost(QuorumError),
}

/// A quorum that was not reached. Nothing about it says the write was not applied on some replicas:
/// a failed write may still have reached fewer than `needed` replicas (as in every Dynamo-style store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuorumError {
    pub kind: QuorumKind,
    pub needed: usize,
    pub got: usize,
    /// Who failed and why, in the order the failures were registered.
    pub failed: Vec<(NodeId, ReplicaFailure)>,
    /// Only primaries counted (strict quorum).
    pub strict: bool,
}

impl QuorumError {
    /// Metric label: the reason of the first failure, or `insufficient_replicas` when the ring had too few.
    pub fn label(&self) -> &'static str {
        self.failed
            .first()
            .map(|(_, f)| f.label())
            .unwrap_or("insufficient_replicas")
    }
}

impl fmt::Display for QuorumError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let noun = match (self.kind, self.got) {
            (QuorumKind::Write, 1) => "ack",
            (QuorumKind::Write, _) => "acks",
            (QuorumKind::Read, 1) => "reply",
            (QuorumKind::Read, _) => "replies",
        };
        write!(
            f,
            "needed {}={}, got {} {}",
            self.kind.letter(),
            self.needed,
            self.got,
            noun
        )?;
        if self.strict {
            f.write_str(" (strict: primaries only)")?;
        }
        if self.failed.is_empty() {
            return f.write_str(": not enough replicas in the ring");
        }
        // Group by reason so the message reads "n2, n3 unreachable; n4 timed out".
        let mut reasons: Vec<ReplicaFailure> = self.failed.iter().map(|(_, r)| *r).collect();
        reasons.sort();
        reasons.dedup();
        f.write_str(": ")?;
        for (i, reason) in reasons.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            let mut nodes: Vec<&str> = self
                .failed
                .iter()
                .filter(|(_, r)| r == reason)
                .map(|(n, _)| n.as_str())
                .collect();
            nodes.sort_unstable();
            write!(f, "{} {}", nodes.join(", "), reason.as_str())?;
        }
        Ok(())
    }
}

impl std::error::Error for QuorumError {}

/// One request's replies. The coordinator registers each target it asks, then each reply.
///
/// With [`QuorumTracker::with_sets`] the request must win in each of several replica sets at
/// once (one per live ring version while the ring changes, as Garage's
/// `QuorumSetResultTracker` does per layout version): a reply counts in every set that holds the
/// primary it answers for (itself, or the primary a fallback stands for).
#[derive(Debug, Clone)]
pub struct QuorumTracker {
    kind: QuorumKind,
    needed: usize,
    strict: bool,
    asked: Vec<NodeId>,
    acked: Vec<(NodeId, bool)>,
    failed: Vec<(NodeId, ReplicaFailure)>,
    verdict: Vote,
    /// Replica sets that must each reach `needed`; empty: every ack counts (one set).
    sets: Vec<Vec<NodeId>>,
    /// Target -> the primary it answers for (fallbacks only; a primary answers for itself).
    stands_for: Vec<(NodeId, NodeId)>,
}

impl QuorumTracker {
    /// `needed` successes win. `strict` only records how fallbacks were treated (for the message):
    /// the coordinator decides which nodes it asks.
    pub fn new(kind: QuorumKind, needed: usize, strict: bool) -> Self {
        let mut t = QuorumTracker {
            kind,
            needed,
            strict,
            asked: Vec::new(),
            acked: Vec::new(),
            failed: Vec::new(),
            verdict: Vote::Pending,
            sets: Vec::new(),
            stands_for: Vec::new(),
        };
        if needed == 0 {
            t.verdict = Vote::Won;
        }
        t
    }

    /// A tracker that wins only once `needed` primaries of *each* of `sets` acknowledged
    /// (directly or through a fallback standing for them). One set behaves like [`Self::new`]
    /// with those primaries as the only targets.
    pub fn with_sets(
        kind: QuorumKind,
        needed: usize,
        strict: bool,
        sets: Vec<Vec<NodeId>>,
    ) -> Self {
        let mut t = QuorumTracker::new(kind, needed, strict);
        t.sets = sets;
        t
    }

    /// A request was sent to `node`.
    pub fn asked(&mut self, node: NodeId) {
        if !self.knows(&node) {
            self.asked.push(node);
        }
    }

    /// A request was sent to fallback `node`, standing for `primary`.
    pub fn asked_for(&mut self, node: NodeId, primary: NodeId) {
        if !self.knows(&node) {
            self.stands_for.push((node.clone(), primary));
            self.asked.push(node);
        }
    }

    /// The primary `node` answers for.
    fn primary_of<'a>(&'a self, node: &'a NodeId) -> &'a NodeId {
        self.stands_for
            .iter()
            .find(|(n, _)| n == node)
            .map_or(node, |(_, p)| p)
    }

    /// Acks and still-possible acks of each set (distinct primaries each).
    fn set_counts(&self) -> Vec<(usize, usize)> {
        let primaries = |nodes: Vec<&NodeId>, set: &[NodeId]| -> Vec<NodeId> {
            let mut out: Vec<NodeId> = nodes
                .into_iter()
                .map(|n| self.primary_of(n).clone())
                .filter(|p| set.contains(p))
                .collect();
            out.sort();
            out.dedup();
            out
        };
        self.sets
            .iter()
            .map(|set| {
                let acked = primaries(self.acked.iter().map(|(n, _)| n).collect(), set);
                let pending = primaries(self.asked.iter().collect(), set);
                let possible = pending.iter().filter(|p| !acked.contains(p)).count();
                (acked.len(), possible)
            })
            .collect()
    }

    fn won(&self) -> bool {
        if self.sets.is_empty() {
            self.acked.len() >= self.needed
        } else {
            self.set_counts()
                .iter()
                .all(|(acked, _)| *acked >= self.needed)
        }
    }

    fn cannot_win(&self) -> bool {
        if self.sets.is_empty() {
            self.acked.len() + self.asked.len() < self.needed
        } else {
            self.set_counts()
                .iter()
                .any(|(acked, possible)| acked + possible < self.needed)
        }
    }

    /// Acks that count: all of them, or, with several sets, those of the set with fewest.
    fn counted(&self) -> usize {
        if self.sets.is_empty() {
            self.acked.len()
        } else {
            self.set_counts()
                .iter()
                .map(|(acked, _)| *acked)
                .min()
                .unwrap_or(0)
        }
    }

    /// `node` acknowledged (a write durable, or a read answer). `fallback` marks a sloppy-quorum stand-in.
    pub fn register_ack(&mut self, node: &NodeId, fallback: bool) -> &Vote {
        if self.answered(node) {
            return &self.verdict;
        }
        self.asked.retain(|n| n != node);
        self.acked.push((node.clone(), fallback));
        if self.verdict == Vote::Pending && self.won() {
            self.verdict = Vote::Won;
        }
        &self.verdict
    }

    /// `node` failed. A target that was never asked (e.g. known down) may be registered directly.
    pub fn register_failure(&mut self, node: &NodeId, why: ReplicaFailure) -> &Vote {
        if self.answered(node) {
            return &self.verdict;
        }
        self.asked.retain(|n| n != node);
        self.failed.push((node.clone(), why));
        self.check_lost();
        &self.verdict
    }

    /// No more targets will be added (no fallback left): lose now if the outstanding ones cannot win.
    pub fn no_more_targets(&mut self) -> &Vote {
        self.check_lost();
        &self.verdict
    }

    /// The deadline passed: every outstanding target counts as timed out.
    pub fn deadline_passed(&mut self) -> &Vote {
        let outstanding = std::mem::take(&mut self.asked);
        for node in outstanding {
            self.failed.push((node, ReplicaFailure::Timeout));
        }
        self.check_lost();
        &self.verdict
    }

    fn check_lost(&mut self) {
        if self.verdict == Vote::Pending && self.cannot_win() {
            self.verdict = Vote::Lost(self.error());
        }
    }

    /// The error as it stands now (used when the verdict is lost, or to describe a partial result).
    pub fn error(&self) -> QuorumError {
        QuorumError {
            kind: self.kind,
            needed: self.needed,
            got: self.counted(),
            failed: self.failed.clone(),
            strict: self.strict,
        }
    }

    pub fn vote(&self) -> &Vote {
        &self.verdict
    }

    pub fn needed(&self) -> usize {
        self.needed
    }

    /// Nodes that acknowledged, with whether each was a fallback, in reply order.
    pub fn acked(&self) -> &[(NodeId, bool)] {
        &self.acked
    }

    pub fn failed(&self) -> &[(NodeId, ReplicaFailure)] {
        &self.failed
    }

    /// Asked and not yet answered.
    pub fn outstanding(&self) -> &[NodeId] {
        &self.asked
    }

    fn answered(&self, node: &NodeId) -> bool {
        self.acked.iter().any(|(n, _)| n == node) || self.failed.iter().any(|(n, _)| n == node)
    }

    fn knows(&self, node: &NodeId) -> bool {
        self.answered(node) || self.asked.contains(node)
    }
}

/// Which replicas a read asks at once and which it keeps as spares, in the order it asks
/// them: `local` (the coordinator's own copy, when it is a replica) first, then `remote` in the
/// order given (the caller sorts them by expected wait). A read asks `r` of them, or all of them
/// when `ask_all` (a read sampled for full read repair); the spares go out one at a time, when
/// an asked replica fails or is slow.
pub fn read_targets(
    local: Option<NodeId>,
    remote: Vec<NodeId>,
    r: usize,
    ask_all: bool,
) -> (Vec<NodeId>, Vec<NodeId>) {
    let mut order: Vec<NodeId> = local.into_iter().chain(remote).collect();
    let first = if ask_all {
        order.len()
    } else {
        r.min(order.len())
    };
    let spare = order.split_off(first);
    (order, spare)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ask_r_replicas_their_own_copy_first() {
        let ids = |names: &[&str]| names.iter().map(|n| id(n)).collect::<Vec<_>>();
        type Row<'a> = (
            Option<&'a str>,
            &'a [&'a str],
            usize,
            bool,
            &'a [&'a str],
            &'a [&'a str],
        );
        let table: &[Row] = &[
            // local, remote (sorted), r, ask_all => asked, spares
            (Some("n1"), &["n3", "n2"], 2, false, &["n1", "n3"], &["n2"]),
            (Some("n1"), &["n3", "n2"], 1, false, &["n1"], &["n3", "n2"]),
            (
                Some("n1"),
                &["n3", "n2"],
                3,
                false,
                &["n1", "n3", "n2"],
                &[],
            ),
            (Some("n1"), &["n3", "n2"], 1, true, &["n1", "n3", "n2"], &[]),
            (None, &["n3", "n2", "n4"], 2, false, &["n3", "n2"], &["n4"]),
            (None, &["n3"], 2, false, &["n3"], &[]),
        ];
        for (local, remote, r, all, asked, spare) in table {
            let got = read_targets(local.map(id), ids(remote), *r, *all);
            assert_eq!(
                got,
                (ids(asked), ids(spare)),
                "{local:?} {remote:?} r={r} all={all}"
            );
        }
    }

    fn id(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    fn tracker(needed: usize, nodes: &[&str]) -> QuorumTracker {
        let mut t = QuorumTracker::new(QuorumKind::Write, needed, false);
        for n in nodes {
            t.asked(id(n));
        }
        t
    }

    #[test]
    fn quorum_is_won_at_the_needed_ack() {
        let mut t = tracker(2, &["n1", "n2", "n3"]);
        assert_eq!(t.register_ack(&id("n1"), false), &Vote::Pending);
        assert_eq!(t.register_ack(&id("n2"), false), &Vote::Won);
        assert_eq!(t.acked().len(), 2);
    }

    #[test]
    fn duplicate_replies_count_once() {
        let mut t = tracker(2, &["n1", "n2", "n3"]);
        t.register_ack(&id("n1"), false);
        assert_eq!(t.register_ack(&id("n1"), false), &Vote::Pending);
        t.register_failure(&id("n1"), ReplicaFailure::Timeout);
        assert!(t.failed().is_empty());
    }

    #[test]
    fn quorum_is_lost_as_soon_as_it_cannot_be_won() {
        let mut t = tracker(2, &["n1", "n2", "n3"]);
        t.register_ack(&id("n1"), false);
        assert_eq!(
            t.register_failure(&id("n2"), ReplicaFailure::Unreachable),
            &Vote::Pending
        );
        let Vote::Lost(err) = t
            .register_failure(&id("n3"), ReplicaFailure::Unreachable)
            .clone()
        else {
            panic!("expected lost");
        };
        assert_eq!(err.needed, 2);
        assert_eq!(err.got, 1);
        assert_eq!(err.to_string(), "needed W=2, got 1 ack: n2, n3 unreachable");
        assert_eq!(err.label(), "unreachable");
    }

    #[test]
    fn verdict_never_flips_after_it_is_reached() {
        let mut t = tracker(1, &["n1", "n2"]);
        t.register_ack(&id("n1"), false);
        t.register_failure(&id("n2"), ReplicaFailure::Refused);
        assert_eq!(t.vote(), &Vote::Won);
        assert_eq!(t.failed().len(), 1, "late failures are still recorded");
    }

    #[test]
    fn deadline_turns_outstanding_targets_into_timeouts() {
        let mut t = QuorumTracker::new(QuorumKind::Read, 2, true);
        t.asked(id("n1"));
        t.asked(id("n2"));
        t.register_ack(&id("n1"), false);
        let Vote::Lost(err) = t.deadline_passed().clone() else {
            panic!("expected lost");
        };
        assert_eq!(
            err.to_string(),
            "needed R=2, got 1 reply (strict: primaries only): n2 timed out"
        );
        assert_eq!(err.label(), "timeout");
    }

    #[test]
    fn mixed_reasons_are_grouped_in_the_message() {
        let mut t = tracker(2, &["n1", "n2", "n3"]);
        t.register_failure(&id("n1"), ReplicaFailure::Unreachable);
        t.register_failure(&id("n2"), ReplicaFailure::Timeout);
        let Vote::Lost(err) = t.vote().clone() else {
            panic!("expected lost");
        };
        assert_eq!(
            err.to_string(),
            "needed W=2, got 0 acks: n1 unreachable; n2 timed out"
        );
    }

    #[test]
    fn a_fallback_added_after_a_failure_can_still_win() {
        let mut t = tracker(2, &["n1", "n2"]);
        t.register_ack(&id("n1"), false);
        // n2 fails, but the coordinator adds a fallback before checking the verdict.
        t.asked(id("n4"));
        assert_eq!(
            t.register_failure(&id("n2"), ReplicaFailure::Unreachable),
            &Vote::Pending
        );
        assert_eq!(t.register_ack(&id("n4"), true), &Vote::Won);
        assert_eq!(t.acked()[1], (id("n4"), true));
    }

    #[test]
    fn needing_more_than_the_ring_has_is_lost_when_targets_run_out() {
        let mut t = tracker(3, &["n1", "n2"]);
        assert_eq!(t.no_more_targets().clone(), Vote::Lost(t.error()));
        assert_eq!(
            t.error().to_string(),
            "needed W=3, got 0 acks: not enough replicas in the ring"
        );
    }

    fn sets(sets: &[&[&str]]) -> Vec<Vec<NodeId>> {
        sets.iter()
            .map(|s| s.iter().map(|n| id(n)).collect())
            .collect()
    }

    #[test]
    fn with_two_rings_a_write_wins_only_with_a_quorum_in_each() {
        // Old ring n1 n2 n3, new ring n1 n2 n4 (n4 takes n3's place).
        let mut t = QuorumTracker::with_sets(
            QuorumKind::Write,
            2,
            false,
            sets(&[&["n1", "n2", "n3"], &["n1", "n2", "n4"]]),
        );
        for n in ["n1", "n2", "n3", "n4"] {
            t.asked(id(n));
        }
        assert_eq!(t.register_ack(&id("n1"), false), &Vote::Pending);
        assert_eq!(
            t.register_ack(&id("n3"), false),
            &Vote::Pending,
            "old ring only"
        );
        assert_eq!(t.register_ack(&id("n4"), false), &Vote::Won);
    }

    #[test]
    fn with_two_rings_losing_one_ring_loses_the_write() {
        let mut t = QuorumTracker::with_sets(
            QuorumKind::Write,
            2,
            true,
            sets(&[&["n1", "n2", "n3"], &["n1", "n4", "n5"]]),
        );
        for n in ["n1", "n2", "n3", "n4", "n5"] {
            t.asked(id(n));
        }
        t.register_ack(&id("n1"), false);
        t.register_ack(&id("n2"), false);
        assert_eq!(
            t.register_failure(&id("n4"), ReplicaFailure::Timeout),
            &Vote::Pending
        );
        let Vote::Lost(e) = t
            .register_failure(&id("n5"), ReplicaFailure::Unreachable)
            .clone()
        else {
            panic!("the new ring cannot reach W=2");
        };
        assert_eq!(e.got, 1, "the worse ring's count");
        assert_eq!(
            e.to_string(),
            "needed W=2, got 1 ack (strict: primaries only): n5 unreachable; n4 timed out"
        );
    }

    #[test]
    fn a_fallback_counts_in_every_ring_of_the_primary_it_stands_for() {
        let mut t = QuorumTracker::with_sets(
            QuorumKind::Write,
            2,
            false,
            sets(&[&["n1", "n2", "n3"], &["n1", "n3", "n4"]]),
        );
        for n in ["n1", "n3", "n4"] {
            t.asked(id(n));
        }
        t.asked_for(id("n9"), id("n3"));
        t.register_ack(&id("n1"), false);
        assert_eq!(
            t.register_ack(&id("n9"), true),
            &Vote::Won,
            "n9 answers for n3 in both"
        );
    }
}
