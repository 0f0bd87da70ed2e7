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

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::scenario::Step;

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
