//! Gossip membership and failure detection with real processes: a node frozen with SIGSTOP is
//! suspected, then declared down by the others, and alive again after SIGCONT; a killed node
//! comes back with a higher generation; while a node is down, the coordinator stops waiting for
//! it. Every wait is bounded polling; nothing asserts a duration.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;

/// Gossip fast enough for a test (suspicion timeout 2 s), slow enough for a loaded machine.
const FAST_GOSSIP: &str =
    "gossip:\n  probe_period_ms: 500\n  probe_rtt_ms: 200\n  suspicion_mult: 4\n";

/// (state, generation) of every member, as node `i` sees it.
fn view_of(c: &Cluster, i: usize) -> BTreeMap<String, (String, u64)> {
    let status = c.cli_at(i, &["cluster", "status"]).ok();
    status.json["members"]
        .as_array()
        .unwrap_or_else(|| panic!("no members in {status:?}"))
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap().to_string(),
                (
                    m["state"].as_str().unwrap().to_string(),
                    m["generation"].as_u64().unwrap(),
                ),
            )
        })
        .collect()
}

fn state_of(c: &Cluster, i: usize, id: &str) -> String {
    view_of(c, i)
        .get(id)
        .map(|(s, _)| s.clone())
        .unwrap_or_default()
}

fn wait_for_state(c: &Cluster, observers: &[usize], id: &str, state: &str) {
    wait_until(
        &format!("{id} to be {state} on nodes {observers:?}"),
        Duration::from_secs(60),
        || {
            observers
                .iter()
                .all(|&i| state_of(c, i, id) == state)
                .then_some(())
        },
    );
}

#[test]
fn a_paused_node_is_suspected_then_marked_down_and_is_alive_again_after_sigcont() {
    let c = ClusterSpec::new(3).config_yaml(FAST_GOSSIP).start();
    for id in ["n1", "n2", "n3"] {
        wait_for_state(&c, &[0, 1, 2], id, "alive");
    }
    let before = view_of(&c, 0)["n3"].1;
    assert!(before > 0, "gossip knows n3's generation");

    c.stop(2);
    // Suspect first (missed probes), then down (no refutation within the suspicion timeout).
    let mut seen = Vec::new();
    wait_until(
        "n1 to declare the frozen n3 down",
        Duration::from_secs(60),
        || {
            let s = state_of(&c, 0, "n3");
            if seen.last() != Some(&s) {
                seen.push(s.clone());
            }
            (s == "down").then_some(())
        },
    );
    assert!(
        seen.contains(&"suspect".to_string()),
        "n3 went {seen:?}: never suspect before down"
    );
    wait_for_state(&c, &[1], "n3", "down");
    // A down node stays in the ring: still a member, with its ownership.
    let status = c.cli_at(0, &["cluster", "status"]).ok();
    let n3 = status.json["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "n3")
        .unwrap_or_else(|| panic!("n3 left the ring: {status:?}"))
        .clone();
    assert!(n3["replica_ownership"].as_f64().unwrap() > 0.3, "{n3}");

    // Known down, it is not waited for: W=ALL fails at once as unavailable (not at the deadline),
    // naming it, and quorum writes succeed.
    let all = c.cli_at(
        0,
        &[
            "put",
            "while-down",
            "v",
            "-w",
            "ALL",
            "--timeout-ms",
            "30000",
        ],
    );
    assert_eq!(all.error_code(), "UNAVAILABLE", "{all:?}");
    assert!(all.error_message().contains("n3"), "{all:?}");
    c.cli_at(0, &["put", "while-down", "v2", "-w", "QUORUM"])
        .ok();
    let m = c.metrics(0);
    assert!(
        metric_value(&m, "dynakv_gossip_downs_total", &[]) >= Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "dynakv_gossip_members", &["state=\"down\""]),
        Some(1.0)
    );

    c.cont(2);
    wait_for_state(&c, &[0, 1], "n3", "alive");
    // Thawed, not restarted: the same generation, and it takes writes at W=ALL again.
    assert_eq!(view_of(&c, 0)["n3"].1, before);
    wait_until(
        "W=ALL to succeed after SIGCONT",
        Duration::from_secs(30),
        || (c.cli_at(0, &["put", "thawed", "v", "-w", "ALL"]).code == 0).then_some(()),
    );
}

#[test]
fn a_killed_and_restarted_node_comes_back_with_a_higher_generation() {
    let mut c = ClusterSpec::new(3).config_yaml(FAST_GOSSIP).start();
    wait_for_state(&c, &[0, 1], "n3", "alive");
    let before = view_of(&c, 0)["n3"].1;
    c.kill(2);
    wait_for_state(&c, &[0, 1], "n3", "down");
    c.restart(2);
    wait_until("n1 to see n3's new run", Duration::from_secs(60), || {
        let (state, generation) = view_of(&c, 0)["n3"].clone();
        (state == "alive" && generation > before).then_some(())
    });
    // And n3 knows the others again.
    wait_for_state(&c, &[2], "n1", "alive");
    wait_for_state(&c, &[2], "n2", "alive");
}
