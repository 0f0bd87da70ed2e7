//! The invariant checker, run at the end of every simulation once faults have stopped and the
//! cluster has settled. It reads the history of client operations and the final storage of
//! every node.
//!
//! A write's *dot* is the event `(coordinator, counter)` it created; the checker learns it from
//! an acknowledged write's answer (the coordinator named in the receipt, its counter in the
//! returned context). Values written by the workloads are unique, so a value names its write.
//!
//! - **(a) acknowledged writes survive.** Every acknowledged write is in the final state at its
//!   dot with its value (or tombstone), or its dot is in the final causal history *and* some
//!   later write that may have taken effect carried a context covering it (it was superseded by
//!   a write that saw it). Two acknowledged writes never share a dot (a coordinator that forgot
//!   its counter lost writes). In `lww` mode a write may also lose to a newer timestamp, never to
//!   an older one. Every acknowledged cart add is in the final cart. And an acknowledgement is
//!   backed: when the answer reaches the client, every replica the receipt names holds the
//!   write (a primary in its data, a fallback as a hint).
//! - **(b) nothing overwritten or deleted comes back.** No value of the final state sits at a dot
//!   an acknowledged write's context covered; and (under the conditions of (e)) no read that
//!   started after such a write was acknowledged returns a value it overwrote or deleted.
//! - **(c) no sibling explosion.** Siblings returned together (and in the final state) are
//!   distinct, pairwise concurrent writes: none is a value another sibling's writer had seen.
//!   So the sibling count never exceeds the number of mutually concurrent writers. In `lww`
//!   mode a read returns at most one value.
//! - **(d) replicas converge.** After settling, every replica of every key holds byte-identical
//!   state, so the Merkle roots of every pair of nodes over the keys they share are equal; and no
//!   hint is still waiting for hand-off. Once the final ring is known, each node's own Merkle
//!   trees (the roots its `NodeStatus` reports, kept in memory across ring changes) equal the
//!   trees of its storage.
//! - **(e) R + W > N reads see acknowledged writes.** A read that started after a write was
//!   acknowledged, with R + W > N, returns a context covering the write's dot, when no fault was
//!   active from the write's start to the read's end, or whatever the faults when both used
//!   strict quorums and no fallback counted. A ring change is not a fault: this holds through
//!   joins, weight changes, drains and removals.
//! - **(f) placement equals the final ring.** After settling, the nodes agree on one committed
//!   ring (each node's own record of it, cross-checked with the version its `ClusterStatus`
//!   reports); (d) is checked against the replicas of that ring, and no node outside a key's
//!   final replicas holds the key (old owners dropped what they handed over; drained, left and
//!   removed nodes hold nothing). A ring change still running when settling ends breaks (f).
//! - **(g) gossip goes quiet.** Over the settle phase's last 10 s every running node sends at
//!   most 50 gossip packets a second (steady state is about two). Measured by the harness
//!   (`Gossip.Members` counters), not by this module.
//!
//! Nodes removed for good take their disks with them: a write acknowledged only by such nodes
//! is not required to survive (as a W=1 write is not when its one disk dies).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use dynakv_core::dvvset::{Clock, Sibling};
use dynakv_core::hash::{hash128, key_position};
use dynakv_core::merkle::{MerkleTree, entry_hash};
use dynakv_node::storage::data_key;

use crate::harness::Snapshot;
use crate::history::{Dot, History, Op, OpKind, OpResult, show_bytes, show_vv};
use crate::net::EPOCH_MS;
use crate::workload::cart_items;

/// Violations reported per invariant and key, at most.
const MAX_REPORTS_PER_KEY: usize = 3;

/// Which invariant a violation breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Invariant {
    /// (a)
    AckedWriteLost,
    /// (b)
    Resurrection,
    /// (c)
    SiblingExplosion,
    /// (d)
    Divergence,
    /// (e)
    StaleRead,
    /// (f)
    Placement,
    /// (g)
    GossipStorm,
    /// A scenario's own `Assert` step.
    Assertion,
    /// The run itself failed (a node stopped with an error, simulated code panicked, a wait
    /// never ended).
    Harness,
}

impl Invariant {
    pub fn label(self) -> &'static str {
        match self {
            Invariant::AckedWriteLost => "(a) acknowledged write lost",
            Invariant::Resurrection => "(b) overwritten/deleted value resurrected",
            Invariant::SiblingExplosion => "(c) siblings not concurrent",
            Invariant::Divergence => "(d) replicas diverge",
            Invariant::StaleRead => "(e) quorum read missed an acknowledged write",
            Invariant::Placement => "(f) placement differs from the final ring",
            Invariant::GossipStorm => "(g) gossip did not quiet down once settled",
            Invariant::Assertion => "scenario assertion",
            Invariant::Harness => "harness",
        }
    }
}

/// A product bug that is known, reported and not fixed yet. A violation it explains is still
/// reported, marked with it, but does not fail a run unless `DYNAKV_SIM_STRICT` is set; once
/// the bug is fixed, remove its entry and every such violation fails again.
#[derive(Debug, PartialEq, Eq)]
pub struct KnownBug {
    pub id: &'static str,
    pub summary: &'static str,
}

/// A client write applied at two dots (see docs/testing.md, "Known product bugs"). Fixed first
/// in `kv.rs` (a forwarded write went to the next replica only when the first certainly never
/// got it), then by write ids (a forwarded write's copies carry one id, read as one value and
/// are hidden together once a client overwrites either: `dynakv_core::write_id`), so it is not
/// in [`KNOWN_BUGS`]: a write applied twice without one id fails the run again.
pub const DUPLICATED_WRITE: KnownBug = KnownBug {
    id: "forward-retry-duplicates-write",
    summary: "kv.rs forward(): when the first replica applied a forwarded write but its answer \
              did not come back in time (crash, partition, pause), the next replica coordinates \
              the same write again, so one client write gets two dots; a client that read one of \
              them and overwrote it still finds the other as a sibling",
};

/// An old owner keeps a copy of a key it no longer replicates (docs/testing.md, "Known product
/// bugs"): after settling, a node outside the key's final replicas holds a version the final
/// state already contains (nothing is lost; the copy is left behind). Fixed in `22d8ab8` (a
/// replica write of a key the node holds in no live ring makes it sweep again), so it is not in
/// [`KNOWN_BUGS`]: a copy left behind fails the run again.
pub const STALE_COPY_AFTER_DROP: KnownBug = KnownBug {
    id: "drop-skips-keys-written-during-the-drop",
    summary: "rebalance.rs drop_unowned() ran once per committed ring; a replica write from a \
              coordinator whose view still held the old ring (replica.rs stores any key it is \
              sent) that landed after that sweep, or between its scan and its purge (purge_local \
              deletes only an unchanged value), was never dropped: the old owner, a left node \
              too, kept a stale copy until the next ring change",
};

/// A node that had just started and had not heard from the cluster yet refused
/// `SetWeight`/`Leave` about itself as INVALID_ARGUMENT "not a member of this cluster" (its ring
/// view was still the configured one, which a joining node is not in); a caller that does not
/// retry INVALID_ARGUMENT (the CLI, the operator) gave up on a request that would succeed a
/// few milliseconds later. Fixed (such a node answers UNAVAILABLE until it has heard from the
/// cluster), so it is not in [`KNOWN_BUGS`]: the refusal fails the run again.
pub const JOINER_UNKNOWN_TO_ITSELF: KnownBug = KnownBug {
    id: "joiner-unknown-to-itself",
    summary: "admin.rs set_weight()/leave(): check_weight() runs against the node's view, which \
              before its first gossip snapshot (node.rs follow_gossip() never applies the initial \
              one) is the configured ring; a node joining through seeds is in no member list, so \
              it calls itself unknown (INVALID_ARGUMENT, not retryable) for its first tens of ms",
};

/// A node that the cluster declared down while its links were held (paused, or cut off) held a
/// member it had suspected meanwhile as `suspect` for good after the heal (docs/testing.md,
/// "Known product bugs"). The signature: an `AwaitMember` for `alive` that saw the member
/// `suspect` all along, the observer having been seen `down` by some node before. Fixed (the
/// engine re-arms the suspicions whenever foca drops its timers), so it is not in
/// [`KNOWN_BUGS`]: such a violation fails the run again.
pub const SUSPICION_OUTLIVES_REJOIN: KnownBug = KnownBug {
    id: "suspicion-outlives-rejoin",
    summary: "core membership.rs over foca 2.0: a node learns it was declared Down and rejoins \
              (handle_self_update -> attempt_rejoin -> change_identity -> reset(), which bumps \
              timer_token); the ChangeSuspectToDown timers it armed for the members it suspected \
              while its links were held carry the old token and are ignored, and the suspicion \
              updates were spent on packets that never left, so nobody refutes them: the member \
              stays suspect in its view (Membership::drain re-evaluates the connection after a \
              rejoin, c40b2bc, but does not re-arm or re-probe the suspects)",
};

/// The known bugs the checker attributes violations to (empty once all are fixed).
pub const KNOWN_BUGS: &[&KnownBug] = &[];

/// One broken invariant, with the operations that show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub invariant: Invariant,
    pub key: String,
    pub message: String,
    pub ops: Vec<usize>,
    /// The known product bug that explains it, if any.
    pub known_bug: Option<&'static KnownBug>,
}

impl Violation {
    pub fn new(
        invariant: Invariant,
        key: &str,
        message: impl Into<String>,
        ops: Vec<usize>,
    ) -> Violation {
        Violation {
            invariant,
            key: key.to_string(),
            message: message.into(),
            ops,
            known_bug: None,
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.invariant.label())?;
        if !self.key.is_empty() {
            write!(f, " [key {}]", self.key)?;
        }
        write!(f, ": {}", self.message)?;
        if let Some(bug) = self.known_bug {
            write!(f, " [known bug: {}]", bug.id)?;
        }
        Ok(())
    }
}

/// What the checker reads.
pub struct Input<'a> {
    pub history: &'a History,
    pub snapshot: &'a Snapshot,
    /// The replicas of every key (by the ring).
    pub replicas: &'a BTreeMap<String, Vec<String>>,
    pub n: u32,
    pub lww: bool,
    /// Simulated-time windows (ms) during which some fault was active.
    pub fault_windows: &'a [(u64, u64)],
    /// Where each value was seen stored (see [`crate::oracle`]).
    pub dot_index: &'a crate::oracle::DotIndex,
    /// Hints still queued at the end, per node: (target, key).
    pub hints: &'a BTreeMap<String, Vec<(String, String)>>,
    /// Whether the run reached the settle phase (final-state checks apply only then).
    pub settled: bool,
    /// Whether `replicas` come from the final ring the nodes agreed on: then (f) is checked,
    /// every key held by no node outside its replicas.
    pub placement: bool,
    /// Nodes removed for good (their disks are gone and not in `snapshot`): a write that only
    /// they acknowledged went with them, as a write at W=1 goes with its one disk.
    pub gone: &'a BTreeSet<String>,
    /// When some node reported a ring change under way (simulated ms, from..to): only counted,
    /// for the note on how many quorum reads (e) checked during a change.
    pub change_windows: &'a [(u64, u64)],
    /// Each node's Merkle roots per co-replica as its `NodeStatus` reported them at the end
    /// (32 hex digits; nodes that did not answer are missing).
    pub node_roots: &'a BTreeMap<String, BTreeMap<String, String>>,
    /// The nodes' Merkle tree resolution (`anti_entropy.leaf_bits`): the roots above are of
    /// trees with 2^leaf_bits segments.
    pub leaf_bits: u8,
}

/// A short description of a stored clock, for reports.
pub fn describe(bytes: Option<&[u8]>) -> String {
    let Some(bytes) = bytes else {
        return "nothing".into();
    };
    match Clock::decode(bytes) {
        Err(e) => format!("undecodable ({e})"),
        Ok(c) => {
            let dots: Vec<String> = dots_of(&c)
                .into_iter()
                .map(|(d, s)| match &s.data {
                    Some(v) => format!("{d}={}", show_bytes(v)),
                    None => format!("{d}=<tombstone>"),
                })
                .collect();
            format!(
                "join {} values {{{}}} digest {:08x}",
                show_vv(&c.join()),
                dots.join(", "),
                c.digest() as u32
            )
        }
    }
}

/// Every value of a clock with its dot.
fn dots_of(clock: &Clock) -> Vec<(Dot, Sibling)> {
    let mut out = Vec::new();
    for e in clock.entries() {
        for (i, v) in e.values().iter().enumerate() {
            out.push((
                Dot {
                    node: e.id().to_string(),
                    counter: e.counter() - i as u64,
                },
                v.clone(),
            ));
        }
    }
    out
}

struct Checker<'a> {
    input: &'a Input<'a>,
    violations: Vec<Violation>,
    notes: Vec<String>,
    /// Value bytes -> the put operations that wrote it.
    writers: BTreeMap<Vec<u8>, Vec<usize>>,
    seen_memo: BTreeMap<usize, BTreeSet<Vec<u8>>>,
    /// (key, value) of writes applied more than once.
    duplicated: BTreeSet<(String, Vec<u8>)>,
    /// The known bug the violation being recorded is explained by.
    explained_by: Option<&'static KnownBug>,
    /// Quorum reads (e) checked against at least one write, and how many of them overlapped a
    /// ring change.
    reads_checked: usize,
    reads_checked_in_change: usize,
}

/// Runs every check; returns the violations and summary notes.
pub fn check(input: &Input<'_>) -> (Vec<Violation>, Vec<String>) {
    let mut writers: BTreeMap<Vec<u8>, Vec<usize>> = BTreeMap::new();
    for op in &input.history.ops {
        if let OpKind::Put { value } = &op.kind {
            writers.entry(value.clone()).or_default().push(op.id);
        }
    }
    let mut c = Checker {
        input,
        violations: Vec::new(),
        notes: Vec::new(),
        reads_checked: 0,
        reads_checked_in_change: 0,
        writers,
        seen_memo: BTreeMap::new(),
        duplicated: BTreeSet::new(),
        explained_by: None,
    };
    c.find_duplicated_writes();
    c.note_forwarded_copies();
    let finals = if input.settled {
        c.check_hints_delivered();
        let finals = c.check_convergence();
        if input.placement {
            c.check_placement(&finals);
        }
        finals
    } else {
        BTreeMap::new()
    };
    let lost_with_gone: Vec<usize> = input
        .history
        .ops
        .iter()
        .filter(|o| c.acked_only_by_gone(o))
        .map(|o| o.id)
        .collect();
    if !lost_with_gone.is_empty() {
        c.notes.push(format!(
            "writes acknowledged only by nodes removed for good (not required to survive): {}",
            lost_with_gone
                .iter()
                .map(|i| format!("#{i}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    c.check_acks_backed();
    let keys = input.history.keys();
    let mut max_siblings = 0;
    for key in &keys {
        let ops: Vec<&Op> = input.history.on_key(key).collect();
        let fin = finals.get(key);
        c.check_dots_unique(key, &ops);
        if let Some(fin) = fin {
            c.check_acked_writes_survive(key, &ops, fin);
            c.check_no_final_resurrection(key, &ops, fin);
            c.check_final_siblings(key, fin);
        }
        c.check_reads(key, &ops);
        for op in &ops {
            if let Some(v) = op.read_values() {
                max_siblings = max_siblings.max(v.len());
            }
        }
    }
    c.notes.push(format!(
        "{} keys checked, most siblings in one read: {max_siblings}",
        keys.len()
    ));
    if !input.change_windows.is_empty() {
        c.notes.push(format!(
            "(e): {} quorum reads checked against the writes acknowledged before them, {} of them \
             while a ring change was under way",
            c.reads_checked, c.reads_checked_in_change
        ));
    }
    (c.violations, c.notes)
}

impl Checker<'_> {
    fn violation(&mut self, invariant: Invariant, key: &str, message: String, ops: Vec<usize>) {
        let known = self.explained_by.take();
        // A few reports per (invariant, key) are enough to see what happened.
        let same = self
            .violations
            .iter()
            .filter(|v| v.invariant == invariant && v.key == key)
            .count();
        if same >= MAX_REPORTS_PER_KEY || self.violations.iter().any(|v| v.message == message) {
            return;
        }
        let mut v = Violation::new(invariant, key, message, ops);
        v.known_bug = known;
        self.violations.push(v);
    }

    /// Marks the next violation as explained by `bug`, while it is a known (unfixed) bug.
    fn explain(&mut self, bug: &'static KnownBug) {
        if KNOWN_BUGS.contains(&bug) {
            self.explained_by = Some(bug);
        }
    }

    /// Marks the next violation as explained by the duplicated-write bug if `value` of `key` was
    /// applied more than once.
    fn explain_if_duplicated(&mut self, key: &str, value: &[u8]) {
        if self.duplicated.contains(&(key.to_string(), value.to_vec())) {
            self.explain(&DUPLICATED_WRITE);
        }
    }

    /// How many forwarded writes were applied at two coordinators (copies with one write id at
    /// several dots), and how many had a copy held hidden (superseded) by some replica.
    fn note_forwarded_copies(&mut self) {
        let input = self.input;
        let twice = input
            .dot_index
            .dots
            .values()
            .filter(|dots| dots.len() > 1 && dots.iter().all(|(_, w)| w.is_some()))
            .count();
        let hidden = input.dot_index.hidden.len();
        if twice > 0 || hidden > 0 {
            self.notes.push(format!(
                "forwarded writes applied at two coordinators (one write id): {twice}; forwarded \
                 writes whose copy a replica held hidden (superseded) at some point: {hidden}"
            ));
        }
    }

    /// (c): a client write stored at two dots, or returned twice by one read, was applied twice.
    fn find_duplicated_writes(&mut self) {
        let input = self.input;
        let mut found: BTreeMap<(String, Vec<u8>), String> = BTreeMap::new();
        for ((key, value), dots) in &input.dot_index.dots {
            // In lww mode a winning value moves to the top dot of its own entry: only values
            // seen under two different actors were applied twice. Copies of one forwarded write
            // (the same write id) are one write, applied at two coordinators by design.
            let distinct = if input.lww {
                dots.iter()
                    .map(|(d, _)| &d.node)
                    .collect::<BTreeSet<_>>()
                    .len()
            } else {
                dots.iter()
                    .map(|(d, w)| w.map_or_else(|| Err(d), Ok))
                    .collect::<BTreeSet<_>>()
                    .len()
            };
            if distinct > 1 {
                let dots: Vec<String> = dots.iter().map(|(d, _)| d.to_string()).collect();
                found.insert(
                    (key.clone(), value.clone()),
                    format!("stored at dots {}", dots.join(", ")),
                );
            }
        }
        for op in &input.history.ops {
            let Some(values) = op.read_values() else {
                continue;
            };
            for (i, (v, _)) in values.iter().enumerate() {
                if values[..i].iter().any(|(w, _)| w == v) {
                    found
                        .entry((op.key.clone(), v.clone()))
                        .or_insert_with(|| format!("returned twice by read #{}", op.id));
                }
            }
        }
        for ((key, value), how) in found {
            let writers: Vec<usize> = self
                .writers
                .get(&value)
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|id| input.history.get(*id).key == key)
                .collect();
            self.duplicated.insert((key.clone(), value.clone()));
            self.explain(&DUPLICATED_WRITE);
            self.violation(
                Invariant::SiblingExplosion,
                &key,
                format!(
                    "one client write ({}) was applied more than once: {how}",
                    match writers.as_slice() {
                        [one] => format!("#{one} of {}", show_bytes(&value)),
                        _ => show_bytes(&value),
                    }
                ),
                writers,
            );
        }
    }

    /// An acknowledged write whose every acknowledging replica was later removed for good.
    fn acked_only_by_gone(&self, op: &Op) -> bool {
        match &op.result {
            OpResult::Ok { acked_by, .. } if op.kind.is_write() && !acked_by.is_empty() => {
                acked_by.iter().all(|(n, _)| self.input.gone.contains(n))
            }
            _ => false,
        }
    }

    /// (f): once the cluster has settled, a key is held only by its replicas in the final ring
    /// (old owners dropped what they handed over; drained, left and removed nodes hold
    /// nothing). That each replica holds it, identically, is (d).
    fn check_placement(&mut self, finals: &BTreeMap<String, Clock>) {
        let input = self.input;
        let mut outside: BTreeMap<&String, Vec<&String>> = BTreeMap::new();
        for (node, keys) in input.snapshot {
            for key in keys.keys() {
                let is_replica = input.replicas.get(key).is_some_and(|r| r.contains(node));
                if !is_replica {
                    outside.entry(node).or_default().push(key);
                }
            }
        }
        for (node, keys) in outside {
            for key in keys.iter().take(MAX_REPORTS_PER_KEY) {
                let replicas = input.replicas.get(*key).cloned().unwrap_or_default();
                let held = input
                    .snapshot
                    .get(node)
                    .and_then(|m| m.get(*key))
                    .and_then(|b| Clock::decode(b).ok());
                // A copy the final state already contains was left behind; one with more than
                // the replicas hold means the replicas are missing something.
                let stale = match (held, finals.get(*key)) {
                    (Some(h), Some(f)) => f.join().descends(&h.join()),
                    _ => false,
                };
                if stale {
                    self.explain(&STALE_COPY_AFTER_DROP);
                }
                self.violation(
                    Invariant::Placement,
                    key,
                    format!(
                        "{node} holds {key} after settling ({}), but its replicas in the final \
                         ring are [{}]",
                        if stale {
                            "a copy the replicas' final state contains"
                        } else {
                            "with versions the replicas' final state lacks"
                        },
                        replicas.join(", ")
                    ),
                    vec![],
                );
            }
            if keys.len() > MAX_REPORTS_PER_KEY {
                self.notes.push(format!(
                    "(f): {node} holds {} keys outside their final replicas",
                    keys.len()
                ));
            }
        }
    }

    /// The unique put that wrote `value`, if exactly one did.
    fn writer(&self, value: &[u8]) -> Option<&Op> {
        match self.writers.get(value).map(Vec::as_slice) {
            Some([one]) => Some(self.input.history.get(*one)),
            _ => None,
        }
    }

    /// Values the context of write `id` is known to cover: those the read it came from returned,
    /// or the write (and its own sources) it came from. Memoized.
    fn seen_values(&mut self, id: usize) -> &BTreeSet<Vec<u8>> {
        if !self.seen_memo.contains_key(&id) {
            let history = self.input.history;
            let mut out = BTreeSet::new();
            if let Some(src) = history.get(id).ctx_source {
                let s = history.get(src);
                match &s.kind {
                    OpKind::Get => {
                        if let Some(values) = s.read_values() {
                            out.extend(values.iter().map(|(v, _)| v.clone()));
                        }
                    }
                    OpKind::Put { value } => {
                        out.insert(value.clone());
                        out.extend(self.seen_values(src).iter().cloned());
                    }
                    OpKind::Delete => out.extend(self.seen_values(src).iter().cloned()),
                }
            }
            self.seen_memo.insert(id, out);
        }
        &self.seen_memo[&id]
    }

    /// Whether write `later` is known to have seen the write of `value` (whose acknowledged
    /// writer, if any, is `earlier`).
    fn saw(&mut self, later: &Op, value: &[u8], earlier: Option<&Op>) -> bool {
        if let Some(d) = earlier.and_then(Op::dot)
            && d.covered_by(&later.ctx_in)
        {
            return true;
        }
        self.seen_values(later.id).contains(value)
    }

    /// (a): every replica a receipt named as having acknowledged held the write.
    fn check_acks_backed(&mut self) {
        let retired = self
            .input
            .history
            .ops
            .iter()
            .filter(|o| !o.retired_acks.is_empty())
            .count();
        if retired > 0 {
            self.notes.push(format!(
                "{retired} writes were acknowledged by an old owner whose ring retired (and which \
                 dropped the key) before the answer arrived"
            ));
        }
        for op in &self.input.history.ops {
            if !op.unbacked_acks.is_empty() {
                self.violation(
                    Invariant::AckedWriteLost,
                    &op.key,
                    format!(
                        "write #{} was acknowledged by replicas that did not hold it when the \
                         answer arrived: {}",
                        op.id,
                        op.unbacked_acks.join("; ")
                    ),
                    vec![op.id],
                );
            }
        }
    }

    /// (d): once faults are over and every node is up, every hint has been handed off.
    fn check_hints_delivered(&mut self) {
        for (node, hints) in self.input.hints {
            if hints.is_empty() {
                continue;
            }
            let shown: Vec<String> = hints
                .iter()
                .take(5)
                .map(|(target, key)| format!("{key} for {target}"))
                .collect();
            self.violation(
                Invariant::Divergence,
                "",
                format!(
                    "{node} still holds {} hints after settling ({}{})",
                    hints.len(),
                    shown.join(", "),
                    if hints.len() > 5 { ", ..." } else { "" }
                ),
                vec![],
            );
        }
    }

    /// (d): identical replicas; returns the final (merged) state of every key.
    fn check_convergence(&mut self) -> BTreeMap<String, Clock> {
        let input = self.input;
        let mut finals = BTreeMap::new();
        for (key, replicas) in input.replicas {
            let states: Vec<(&String, Option<&Vec<u8>>)> = replicas
                .iter()
                .map(|n| (n, input.snapshot.get(n).and_then(|m| m.get(key))))
                .collect();
            if !states.windows(2).all(|w| w[0].1 == w[1].1) {
                let shown: Vec<String> = states
                    .iter()
                    .map(|(n, s)| format!("{n}: {}", describe(s.map(Vec::as_slice))))
                    .collect();
                self.violation(
                    Invariant::Divergence,
                    key,
                    format!("replicas differ after settling: {}", shown.join("; ")),
                    vec![],
                );
            }
            let mut clocks = Vec::new();
            for (n, s) in &states {
                if let Some(bytes) = s {
                    match Clock::decode(bytes) {
                        Ok(c) => clocks.push(c),
                        Err(e) => self.violation(
                            Invariant::Divergence,
                            key,
                            format!("{n} stores a clock that does not decode: {e}"),
                            vec![],
                        ),
                    }
                }
            }
            let merged = Clock::sync_all(clocks.iter());
            let merged = if input.lww {
                merged.lww_resolve()
            } else {
                merged
            };
            finals.insert(key.clone(), merged);
        }
        self.check_merkle_roots();
        finals
    }

    /// (d): the Merkle roots over the keys two nodes share, computed from their storage, are
    /// equal; and each node's own trees (the roots its `NodeStatus` reported) are the trees of
    /// its storage, co-replica by co-replica, when the final ring is known (a node's trees
    /// follow its ring changes in memory instead of being rebuilt from disk, so a move that
    /// put a key under the wrong peer would show here and nowhere else until a restart).
    fn check_merkle_roots(&mut self) {
        let input = self.input;
        let nodes: Vec<&String> = input.snapshot.keys().collect();
        let tree = |node: &String, peer: &String| -> Option<(u128, usize)> {
            let shared: Vec<(u64, u128)> = input
                .replicas
                .iter()
                .filter(|(_, r)| r.contains(node) && r.contains(peer))
                .filter_map(|(k, _)| {
                    // What the node's trees hash: the stored key and the stored bytes.
                    let bytes = input.snapshot.get(node)?.get(k)?;
                    Some((
                        key_position(k.as_bytes()),
                        entry_hash(&data_key(k.as_bytes()), hash128(bytes)),
                    ))
                })
                .collect();
            let keys = shared.len();
            MerkleTree::from_entries(input.leaf_bits, shared)
                .ok()
                .map(|t| (t.root(), keys))
        };
        let mut pairs = 0;
        let mut differing = Vec::new();
        for (i, a) in nodes.iter().enumerate() {
            for b in &nodes[i + 1..] {
                pairs += 1;
                if tree(a, b).map(|t| t.0) != tree(b, a).map(|t| t.0) {
                    differing.push(format!("{a}/{b}"));
                }
            }
        }
        self.notes.push(format!(
            "merkle roots: {pairs} node pairs compared, {} differ{}",
            differing.len(),
            if differing.is_empty() {
                String::new()
            } else {
                format!(" ({})", differing.join(" "))
            }
        ));
        if !input.placement {
            return;
        }
        // A node with no tree for a peer reports no root; it stands for an empty tree.
        let empty = MerkleTree::new(input.leaf_bits).map_or(0, |t| t.root());
        let mut trees_checked = 0;
        for (node, roots) in input.node_roots {
            if !input.snapshot.contains_key(node) {
                continue;
            }
            let peers: BTreeSet<&String> = nodes
                .iter()
                .copied()
                .filter(|p| *p != node)
                .chain(roots.keys())
                .collect();
            for peer in peers {
                let Some((expected, keys)) = tree(node, peer) else {
                    continue;
                };
                let reported = roots.get(peer).cloned().unwrap_or(format!("{empty:032x}"));
                trees_checked += 1;
                if reported != format!("{expected:032x}") {
                    self.violation(
                        Invariant::Divergence,
                        "",
                        format!(
                            "{node}'s Merkle tree for {peer} has root {reported}; the {keys} \
                             keys its storage holds for the pair give {expected:032x}"
                        ),
                        vec![],
                    );
                }
            }
        }
        self.notes.push(format!(
            "merkle trees: {trees_checked} of the nodes' own trees checked against their storage"
        ));
    }

    /// (a): no two acknowledged writes got the same dot.
    fn check_dots_unique(&mut self, key: &str, ops: &[&Op]) {
        let mut by_dot: BTreeMap<Dot, Vec<usize>> = BTreeMap::new();
        for op in ops {
            if let Some(d) = op.dot() {
                by_dot.entry(d).or_default().push(op.id);
            }
        }
        for (dot, ids) in by_dot {
            if ids.len() > 1 {
                self.violation(
                    Invariant::AckedWriteLost,
                    key,
                    format!(
                        "acknowledged writes {} were all given the dot {dot}: the coordinator \
                         forgot an acknowledged event (lost on a crash?)",
                        ids.iter()
                            .map(|i| format!("#{i}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    ids,
                );
            }
        }
    }

    /// (a): every acknowledged write is in the final state or was superseded by a write that saw
    /// it; every acknowledged cart add is in the final cart.
    fn check_acked_writes_survive(&mut self, key: &str, ops: &[&Op], fin: &Clock) {
        let final_dots: BTreeMap<Dot, Sibling> = dots_of(fin).into_iter().collect();
        let final_live: Vec<&Sibling> = fin.live_values().collect();
        let join = fin.join();
        for w in ops {
            let Some(d) = w.dot() else { continue };
            if self.acked_only_by_gone(w) {
                continue;
            }
            let payload: Option<&[u8]> = match &w.kind {
                OpKind::Put { value } => Some(value),
                _ => None,
            };
            let superseded_by = ops
                .iter()
                .find(|o| o.id != w.id && o.may_have_applied() && d.covered_by(&o.ctx_in))
                .map(|o| o.id);
            if self.input.lww {
                let present = fin.values().any(|s| s.data.as_deref() == payload);
                if present || superseded_by.is_some() {
                    continue;
                }
                // Lost to a newer timestamp is lww; lost to an older one is not.
                let lower_bound_ms = EPOCH_MS + w.invoked_ms;
                let read_ts = payload.and_then(|p| {
                    ops.iter()
                        .filter_map(|o| o.read_values())
                        .flatten()
                        .filter(|(v, _)| v.as_slice() == p)
                        .map(|(_, ts)| *ts)
                        .max()
                });
                let final_ts = fin.values().map(|s| s.ts).max();
                let older = match final_ts {
                    None => true,
                    Some(f) => {
                        f.physical_ms() < lower_bound_ms || read_ts.is_some_and(|t| f.as_u64() < t)
                    }
                };
                if older {
                    self.violation(
                        Invariant::AckedWriteLost,
                        key,
                        format!(
                            "acknowledged write #{} (dot {d}) lost in lww mode to an older \
                             value: final {}",
                            w.id,
                            describe(Some(&fin.to_bytes()))
                        ),
                        vec![w.id],
                    );
                }
                continue;
            }
            match final_dots.get(&d) {
                Some(s) if s.data.as_deref() != payload => {
                    self.violation(
                        Invariant::AckedWriteLost,
                        key,
                        format!(
                            "acknowledged write #{} was given dot {d}, but the final state holds \
                             {} there: its value was lost and the dot reused",
                            w.id,
                            s.data.as_deref().map_or("<tombstone>".into(), show_bytes)
                        ),
                        vec![w.id],
                    );
                }
                Some(_) => {}
                None if !d.covered_by(&join) => {
                    self.violation(
                        Invariant::AckedWriteLost,
                        key,
                        format!(
                            "acknowledged write #{} (dot {d}) is not in the final state and \
                             not even in its causal history {}",
                            w.id,
                            show_vv(&join)
                        ),
                        vec![w.id],
                    );
                }
                None if superseded_by.is_none() => {
                    self.violation(
                        Invariant::AckedWriteLost,
                        key,
                        format!(
                            "acknowledged write #{} (dot {d}) is gone from the final state, but \
                             no later write carried a context covering it",
                            w.id
                        ),
                        vec![w.id],
                    );
                }
                None => {}
            }
        }
        // Every acknowledged cart add is in the final cart.
        if key.starts_with("cart-") {
            let cart: BTreeSet<String> = final_live
                .iter()
                .filter_map(|s| s.data.as_deref())
                .flat_map(cart_items)
                .collect();
            for w in ops {
                if let (Some(item), true) = (&w.note, w.dot().is_some())
                    && !cart.contains(item)
                {
                    self.violation(
                        Invariant::AckedWriteLost,
                        key,
                        format!(
                            "acknowledged cart add #{} (item {item}) is not in the final cart",
                            w.id
                        ),
                        vec![w.id],
                    );
                }
            }
        }
    }

    /// (b) on the final state: no value sits at a dot an acknowledged write's context covered.
    fn check_no_final_resurrection(&mut self, key: &str, ops: &[&Op], fin: &Clock) {
        let live: Vec<(Dot, Sibling)> = dots_of(fin)
            .into_iter()
            .filter(|(_, s)| !s.is_tombstone())
            .collect();
        for w in ops {
            if w.dot().is_none() || w.ctx_in.is_empty() {
                continue;
            }
            for (e, s) in &live {
                if e.covered_by(&w.ctx_in) {
                    if let Some(data) = &s.data {
                        self.explain_if_duplicated(key, data);
                    }
                    let what = if w.kind == OpKind::Delete {
                        "deleted"
                    } else {
                        "overwrote"
                    };
                    self.violation(
                        Invariant::Resurrection,
                        key,
                        format!(
                            "the final state holds {} at dot {e}, which acknowledged write #{} \
                             {what} (its context {} covers that dot)",
                            s.data.as_deref().map(show_bytes).unwrap_or_default(),
                            w.id,
                            show_vv(&w.ctx_in)
                        ),
                        vec![w.id],
                    );
                }
            }
        }
    }

    /// (c) on the final state. Copies of one forwarded write (one write id, applied at two
    /// coordinators by design) count once, as a read returns them.
    fn check_final_siblings(&mut self, key: &str, fin: &Clock) {
        let mut ids = BTreeSet::new();
        let values: Vec<Vec<u8>> = fin
            .live_values()
            .filter(|s| s.write_id().is_none_or(|w| ids.insert(w.id)))
            .filter_map(|s| s.data.as_ref().map(|d| d.to_vec()))
            .collect();
        self.check_sibling_set(key, &values, None);
    }

    /// (c) for one set of siblings returned together.
    fn check_sibling_set(&mut self, key: &str, values: &[Vec<u8>], read: Option<usize>) {
        let r = read
            .map(|i| format!("read #{i}"))
            .unwrap_or("the final state".into());
        if self.input.lww && values.len() > 1 {
            self.violation(
                Invariant::SiblingExplosion,
                key,
                format!("{r} holds {} values in lww mode", values.len()),
                read.into_iter().collect(),
            );
        }
        let distinct: BTreeSet<&Vec<u8>> = values.iter().collect();
        if distinct.len() != values.len() {
            self.explain(&DUPLICATED_WRITE);
            self.violation(
                Invariant::SiblingExplosion,
                key,
                format!("{r} returned the same value more than once"),
                read.into_iter().collect(),
            );
        }
        'pairs: for v1 in values {
            for v2 in values {
                if v1 == v2 {
                    continue;
                }
                let (Some(w1), Some(w2)) = (self.writer(v1), self.writer(v2)) else {
                    continue;
                };
                let (w1, w2) = (w1.clone(), w2.clone());
                if self.saw(&w2, v1, Some(&w1)) {
                    self.explain_if_duplicated(key, v1);
                    let mut ops: Vec<usize> = read.into_iter().collect();
                    ops.extend([w1.id, w2.id]);
                    self.violation(
                        Invariant::SiblingExplosion,
                        key,
                        format!(
                            "{r}: {} and {} are siblings, but write #{} (of the second) had \
                             seen write #{} (of the first) in its context {}",
                            show_bytes(v1),
                            show_bytes(v2),
                            w2.id,
                            w1.id,
                            show_vv(&w2.ctx_in)
                        ),
                        ops,
                    );
                    break 'pairs;
                }
            }
        }
    }

    fn fault_free(&self, from_ms: u64, to_ms: u64) -> bool {
        !self
            .input
            .fault_windows
            .iter()
            .any(|(s, e)| *s <= to_ms && *e >= from_ms)
    }

    /// (c) per read, (e), and (b) per read.
    fn check_reads(&mut self, key: &str, ops: &[&Op]) {
        let n = self.input.n;
        for r in ops {
            let Some(values) = r.read_values() else {
                continue;
            };
            let values: Vec<Vec<u8>> = values.iter().map(|(v, _)| v.clone()).collect();
            self.check_sibling_set(key, &values, Some(r.id));
            let (Some(r_done), Some(r_ctx)) = (r.completed_ms, r.ctx_out()) else {
                continue;
            };
            let mut checked = false;
            for w in ops {
                let (Some(d), Some(w_done)) = (w.dot(), w.completed_ms) else {
                    continue;
                };
                if self.acked_only_by_gone(w) {
                    continue;
                }
                if r.invoked_ms <= w_done || r.quorum + w.quorum <= n {
                    continue;
                }
                let strict = w.strict && r.strict && !w.used_fallback() && !r.used_fallback();
                if !strict && !self.fault_free(w.invoked_ms, r_done) {
                    continue;
                }
                checked = true;
                if !d.covered_by(r_ctx) {
                    self.violation(
                        Invariant::StaleRead,
                        key,
                        format!(
                            "read #{} (R={}) started at {} ms, after write #{} (W={}, dot {d}) \
                             was acknowledged at {w_done} ms, but its context {} does not cover \
                             the write{}",
                            r.id,
                            r.quorum,
                            r.invoked_ms,
                            w.id,
                            w.quorum,
                            show_vv(r_ctx),
                            if strict {
                                " (both strict quorums)"
                            } else {
                                " (no fault was active)"
                            }
                        ),
                        vec![w.id, r.id],
                    );
                }
                // (b): the read must not return what the write overwrote or deleted.
                if w.ctx_in.is_empty() {
                    continue;
                }
                for v in &values {
                    let writer = self.writer(v).cloned();
                    if writer.as_ref().is_some_and(|x| x.id == w.id) {
                        continue;
                    }
                    if self.saw(w, v, writer.as_ref()) {
                        self.explain_if_duplicated(key, v);
                        let what = if w.kind == OpKind::Delete {
                            "deleted"
                        } else {
                            "overwrote"
                        };
                        self.violation(
                            Invariant::Resurrection,
                            key,
                            format!(
                                "read #{} returned {}, which write #{} {what} before the read \
                                 started (acknowledged at {w_done} ms)",
                                r.id,
                                show_bytes(v),
                                w.id
                            ),
                            vec![w.id, r.id],
                        );
                    }
                }
            }
            if checked {
                self.reads_checked += 1;
                if self
                    .input
                    .change_windows
                    .iter()
                    .any(|(from, to)| r.invoked_ms < *to && r_done > *from)
                {
                    self.reads_checked_in_change += 1;
                }
            }
        }
    }
}
