//! The nemesis: a random fault schedule drawn from the seed, as scenario [`Step`]s.
//!
//! The schedule alternates fault windows and healthy gaps (so that both "under faults" and
//! "fault-free" phases occur). A window holds one fault, sometimes two at once:
//!
//! - partitions: a minority cut off; the cluster split in two halves; *majorities ring* (each
//!   node sees only its two ring neighbours: everyone sees a majority, no two the same one);
//!   *bridge* (two halves that meet only through one node);
//! - crashes with loss of unsynced data: one node, two, a majority, or every node at once (a
//!   power cut of the whole cluster), restarted at the end of the window; or a quick reboot;
//! - a paused node (every link of it frozen, then released);
//! - message loss (links break and reconnect) and message delay.
//!
//! [`membership_schedule`] adds ring changes to the same faults: spares join (at weight 0, then
//! given a weight, or configured with one and ramping themselves), members get new weights
//! (sometimes two at once), members leave; each request goes out at the start of a fault
//! window or of a healthy gap, so changes run under crashes, partitions, pauses, loss and
//! delay, and concurrently with each other. In about two runs in five a member with a weight
//! dies for good and is removed, its ranges copied again from the survivors under the fault
//! windows that follow (at least two). Faults strike only nodes that run (members and joined spares).
//! Admin answers are recorded, never required: a request may be refused (fewer than N members
//! would keep a weight) or time out under a partition.

use std::collections::BTreeMap;

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::scenario::{Expect, Step};

/// How long the fault phase of a nemesis run lasts, in simulated ms.
pub const DEFAULT_FAULT_PHASE_MS: u64 = 20_000;

/// A fault schedule for `nodes`, about `duration_ms` long.
pub fn schedule(seed: u64, nodes: &[String], duration_ms: u64) -> Vec<Step> {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x6e65_6d65_7369_7321);
    let mut steps = Vec::new();
    let mut t = 0;
    let first = rng.random_range(300..1_500);
    steps.push(Step::wait_ms(first));
    t += first;
    while t < duration_ms {
        let window = rng.random_range(500..4_000);
        let mut end = Vec::new();
        fault(&mut rng, nodes, &mut steps, &mut end);
        if rng.random_bool(0.25) {
            // A second fault in the middle of the first.
            let half = window / 2;
            steps.push(Step::wait_ms(half));
            fault(&mut rng, nodes, &mut steps, &mut end);
            steps.push(Step::wait_ms(window - half));
        } else {
            steps.push(Step::wait_ms(window));
        }
        end.sort_by_key(|s| matches!(s, Step::Restart(_)));
        end.dedup();
        steps.extend(end);
        let gap = rng.random_range(300..3_000);
        steps.push(Step::wait_ms(gap));
        t += window + gap;
    }
    steps
}

fn shuffled(rng: &mut SmallRng, nodes: &[String]) -> Vec<String> {
    let mut v = nodes.to_vec();
    v.shuffle(rng);
    v
}

/// Appends one fault's start to `steps` and what ends it to `end`.
fn fault(rng: &mut SmallRng, nodes: &[String], steps: &mut Vec<Step>, end: &mut Vec<Step>) {
    let k = nodes.len();
    let minority = (k - 1) / 2;
    match rng.random_range(0..100) {
        // Partitions.
        0..=11 if minority > 0 => {
            let v = shuffled(rng, nodes);
            let cut = rng.random_range(1..=minority);
            steps.push(Step::Partition(vec![v[..cut].to_vec(), v[cut..].to_vec()]));
            end.push(Step::Heal);
        }
        12..=21 => {
            let v = shuffled(rng, nodes);
            let half = k / 2;
            steps.push(Step::Partition(vec![
                v[..half].to_vec(),
                v[half..].to_vec(),
            ]));
            end.push(Step::Heal);
        }
        22..=29 if k >= 4 => {
            let v = shuffled(rng, nodes);
            let groups = (0..k)
                .map(|i| vec![v[i].clone(), v[(i + 1) % k].clone()])
                .collect();
            steps.push(Step::Partition(groups));
            end.push(Step::Heal);
        }
        30..=37 if k >= 3 => {
            let v = shuffled(rng, nodes);
            let bridge = v[0].clone();
            let rest = &v[1..];
            let half = rest.len() / 2;
            let mut left = rest[..half].to_vec();
            let mut right = rest[half..].to_vec();
            left.push(bridge.clone());
            right.push(bridge);
            steps.push(Step::Partition(vec![left, right]));
            end.push(Step::Heal);
        }
        // Crashes.
        38..=69 => {
            let v = shuffled(rng, nodes);
            let count = match rng.random_range(0..100) {
                0..=44 => 1,
                45..=69 => 2.min(k),
                70..=87 => k / 2 + 1,
                _ => k,
            };
            for n in &v[..count] {
                steps.push(Step::Crash(n.clone()));
                end.push(Step::Restart(n.clone()));
            }
        }
        70..=75 => {
            // A quick reboot: crash and start again at once.
            let n = nodes[rng.random_range(0..k)].clone();
            steps.push(Step::Restart(n));
        }
        76..=83 => {
            let n = nodes[rng.random_range(0..k)].clone();
            steps.push(Step::Pause(n));
            end.push(Step::Heal);
        }
        84..=91 => {
            let rate = [0.002, 0.005, 0.01, 0.03][rng.random_range(0..4)];
            steps.push(Step::Loss { rate });
            end.push(Step::Heal);
        }
        _ => {
            let max_ms = [100, 300, 800, 1_500][rng.random_range(0..4)];
            steps.push(Step::Delay { max_ms });
            end.push(Step::Heal);
        }
    }
}

/// How long the fault phase of a membership nemesis run lasts, in simulated ms.
pub const MEMBERSHIP_FAULT_PHASE_MS: u64 = 24_000;

/// Chance that a healthy gap after the first third of a membership schedule starts with a
/// member dying for good (at most one per run): about two runs in five have one.
const GONE_FOR_GOOD_P: f64 = 0.12;

/// Weights the membership schedule asks for (25 and 50 are steps of a ramp).
const WEIGHTS: [u32; 5] = [25, 50, 100, 100, 150];

/// A fault schedule mixed with ring changes, for `nodes` (the members) and `spares`.
pub fn membership_schedule(
    seed: u64,
    nodes: &[String],
    spares: &[String],
    n: usize,
    duration_ms: u64,
) -> Vec<Step> {
    let mut p = Plan {
        rng: SmallRng::seed_from_u64(seed ^ 0x6d65_6d62_6572_7321),
        steps: Vec::new(),
        running: nodes.to_vec(),
        unstarted: spares.to_vec(),
        target: nodes.iter().map(|n| (n.clone(), 100)).collect(),
        n,
        frozen: false,
    };
    let mut t = 0;
    let first = p.rng.random_range(1_000..2_500);
    p.steps.push(Step::wait_ms(first));
    t += first;
    // Fault windows still to come after a member died for good, so that its removal runs
    // under faults too.
    let mut after_gone: Option<u32> = None;
    while t < duration_ms || after_gone.is_some_and(|w| w > 0) {
        if let Some(w) = &mut after_gone {
            *w = w.saturating_sub(1);
        }
        let window = p.rng.random_range(1_000..5_000);
        if p.rng.random_bool(0.6) {
            p.change();
        }
        let mut end = Vec::new();
        fault(&mut p.rng, &p.running, &mut p.steps, &mut end);
        if p.rng.random_bool(0.25) {
            let half = window / 2;
            p.steps.push(Step::wait_ms(half));
            if p.rng.random_bool(0.5) {
                p.change();
            } else {
                fault(&mut p.rng, &p.running, &mut p.steps, &mut end);
            }
            p.steps.push(Step::wait_ms(window - half));
        } else {
            p.steps.push(Step::wait_ms(window));
        }
        end.sort_by_key(|s| matches!(s, Step::Restart(_)));
        end.dedup();
        p.steps.extend(end);
        if t > duration_ms / 3 && !p.frozen && p.rng.random_bool(GONE_FOR_GOOD_P) {
            if p.gone_for_good() {
                after_gone = Some(WINDOWS_AFTER_GONE);
            }
        } else if p.rng.random_bool(0.4) {
            p.change();
        }
        let gap = p.rng.random_range(500..4_000);
        p.steps.push(Step::wait_ms(gap));
        t += window + gap;
    }
    p.steps
}

/// A membership schedule being drawn.
struct Plan {
    rng: SmallRng,
    steps: Vec<Step>,
    /// The nodes that run: members and the spares started so far, not the one gone for good.
    running: Vec<String>,
    /// Spares not started yet.
    unstarted: Vec<String>,
    /// What the schedule asked of each running node: its target weight (0: leaving). Requests
    /// may be refused, so the cluster may differ; refusals change nothing.
    target: BTreeMap<String, u32>,
    n: usize,
    /// A member died for good and was removed: no more ring changes this run (see
    /// [`Plan::gone_for_good`]), only faults.
    frozen: bool,
}

fn admin(step: Step) -> Step {
    step.expect(Expect::Any)
}

impl Plan {
    fn pick<'a>(&mut self, from: &'a [String]) -> &'a String {
        &from[self.rng.random_range(0..from.len())]
    }

    /// A weight for `node` other than the one the schedule last asked of it.
    fn new_weight(&mut self, node: &str) -> u32 {
        let now = self.target.get(node).copied();
        let choices: Vec<u32> = WEIGHTS.into_iter().filter(|w| Some(*w) != now).collect();
        choices[self.rng.random_range(0..choices.len())]
    }

    fn weighted(&self) -> usize {
        self.target.values().filter(|w| **w > 0).count()
    }

    /// Appends one ring change request (or two at once).
    fn change(&mut self) {
        if self.frozen {
            return;
        }
        let n = self.n;
        match self.rng.random_range(0..100) {
            // A spare joins: at weight 0 and given a weight soon after (its request may come
            // before it has heard from the cluster, and be refused), or configured with a weight
            // it ramps itself to.
            0..=24 if !self.unstarted.is_empty() => {
                let i = self.rng.random_range(0..self.unstarted.len());
                let spare = self.unstarted.remove(i);
                self.running.push(spare.clone());
                let w = self.new_weight(&spare);
                if self.rng.random_bool(0.5) {
                    self.steps.push(Step::join_at(&spare, w));
                } else {
                    self.steps.push(Step::join(&spare));
                    let after = self.rng.random_range(50..500);
                    self.steps.push(Step::wait_ms(after));
                    self.steps.push(admin(Step::set_weight(&spare, w)));
                }
                self.target.insert(spare, w);
            }
            // A member leaves (drains), if enough would keep a weight.
            25..=44 if self.weighted() > n + 1 => {
                let candidates: Vec<String> = self
                    .target
                    .iter()
                    .filter(|(_, w)| **w > 0)
                    .map(|(id, _)| id.clone())
                    .collect();
                let running = self.running.clone();
                let node = self.pick(&candidates).clone();
                let via = self.pick(&running).clone();
                self.steps.push(admin(Step::leave(&node).via(&via)));
                self.target.insert(node, 0);
            }
            // Two weight changes at once.
            45..=59 if self.running.len() >= 2 => {
                let v = shuffled(&mut self.rng, &self.running);
                for node in &v[..2] {
                    let w = self.new_weight(node);
                    self.steps.push(admin(Step::set_weight(node, w)));
                    self.target.insert(node.clone(), w);
                }
            }
            // One weight change (a left or leaving member is brought back, too), sent to any
            // node.
            _ => {
                let running = self.running.clone();
                let node = self.pick(&running).clone();
                let via = self.pick(&running).clone();
                let w = self.new_weight(&node);
                self.steps.push(admin(Step::set_weight(&node, w).via(&via)));
                self.target.insert(node, w);
            }
        }
    }

    /// A member with a weight dies for good (a crash it never comes back from) and is removed
    /// once the node taking the removal holds it down; its ranges are copied again from the
    /// survivors while the faults go on. The ring is first let settle (every change finished),
    /// and no change is asked for afterwards: a change that waits for a member that then dies
    /// waits for good (docs/testing.md, known bug `removal-queued-behind-a-change-that-waits-
    /// for-the-removed`, which `node-dies-for-good-mid-change-and-is-removed` shows).
    fn gone_for_good(&mut self) -> bool {
        if self.weighted() <= self.n || self.running.len() < 2 {
            return false;
        }
        let candidates: Vec<String> = self
            .running
            .iter()
            .filter(|r| self.target.get(*r).is_some_and(|w| *w > 0))
            .cloned()
            .collect();
        if candidates.is_empty() {
            return false;
        }
        let victim = self.pick(&candidates).clone();
        self.running.retain(|r| *r != victim);
        self.target.remove(&victim);
        let running = self.running.clone();
        let via = self.pick(&running).clone();
        self.frozen = true;
        self.steps.push(Step::await_ring(GONE_RING_WAIT_MS));
        self.steps.push(Step::Crash(victim.clone()));
        self.steps
            .push(Step::await_member(&via, &victim, "down", GONE_DOWN_WAIT_MS));
        self.steps.push(admin(Step::remove(&victim).via(&via)));
        true
    }
}

/// Fault windows a membership schedule still draws after a member died for good (its removal
/// and the copies it makes run under them), however late that was.
const WINDOWS_AFTER_GONE: u32 = 2;

/// How long the schedule waits for the ring to settle before a member dies for good.
const GONE_RING_WAIT_MS: u64 = 60_000;

/// How long the node that takes the removal may take to hold the dead member down.
const GONE_DOWN_WAIT_MS: u64 = 20_000;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::AdminKind;

    fn names(prefix: &str, range: std::ops::RangeInclusive<usize>) -> Vec<String> {
        range.map(|i| format!("{prefix}{i}")).collect()
    }

    #[test]
    fn some_membership_schedules_remove_a_member_under_later_faults_and_change_nothing_after() {
        let (members, spares) = (names("n", 1..=5), names("n", 6..=7));
        let mut with_removal = 0;
        for seed in 0..200 {
            let steps = membership_schedule(seed, &members, &spares, 3, MEMBERSHIP_FAULT_PHASE_MS);
            let Some(at) = steps.iter().position(
                |s| matches!(s, Step::Admin(op) if matches!(op.kind, AdminKind::Remove { .. })),
            ) else {
                continue;
            };
            with_removal += 1;
            let Step::Admin(op) = &steps[at] else {
                unreachable!()
            };
            let victim = op.kind.node().to_string();
            // The ring settles, then the victim dies, then the node taking the removal holds it
            // down.
            assert!(
                matches!(&steps[at - 3], Step::AwaitRing { .. }),
                "seed {seed}"
            );
            assert_eq!(steps[at - 2], Step::Crash(victim.clone()), "seed {seed}");
            assert!(
                matches!(&steps[at - 1], Step::AwaitMember { member, .. } if *member == victim),
                "seed {seed}"
            );
            let after = &steps[at + 1..];
            assert!(
                !after
                    .iter()
                    .any(|s| matches!(s, Step::Admin(_) | Step::Join { .. })),
                "seed {seed}: a change after the removal"
            );
            assert!(
                !after.iter().any(|s| format!("{s}").contains(&victim)),
                "seed {seed}: {victim} is gone, yet a later step names it"
            );
            let windows = after.iter().filter(|s| matches!(s, Step::Wait(_))).count();
            assert!(
                windows >= 4,
                "seed {seed}: too few fault windows after the removal"
            );
        }
        assert!(
            (40..=120).contains(&with_removal),
            "{with_removal} of 200 schedules remove a member"
        );
    }
}
