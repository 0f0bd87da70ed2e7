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
    // One of the two declared it down (the other may have heard it from the first).
    let declared: f64 = (0..2)
        .filter_map(|i| metric_value(&c.metrics(i), "dynakv_gossip_downs_total", &[]))
        .sum();
    assert!(declared >= 1.0, "nobody counted declaring n3 down");
    assert_eq!(
        metric_value(&c.metrics(0), "dynakv_gossip_members", &["state=\"down\""]),
        Some(1.0)
    );

    c.cont(2);
    wait_for_state(&c, &[0, 1], "n3", "alive");
    // Thawed, not restarted: the same generation, and it takes writes at W=ALL again. It
    // learned it had been declared down and renewed its identity: counted once or so, not a
    // storm of renewals.
    assert_eq!(view_of(&c, 0)["n3"].1, before);
    let rejoins = metric_value(&c.metrics(2), "dynakv_gossip_rejoins_total", &[]);
    assert!(
        rejoins.is_some_and(|r| (1.0..=3.0).contains(&r)),
        "n3 renewed its identity {rejoins:?} times after being declared down"
    );
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

#[test]
fn with_hints_disabled_anti_entropy_alone_makes_a_returning_node_identical() {
    // Four nodes, n=3: a dead primary's writes would go to a fallback as hints, but the bound is
    // 0, so every hint is refused (and counted) and only anti-entropy can bring it up.
    let mut c = ClusterSpec::new(4)
        .n(3)
        .config_yaml(&format!(
            "{FAST_GOSSIP}hints:\n  max_per_target: 0\nanti_entropy:\n  interval_ms: 500\n"
        ))
        .start();
    c.kill(3);
    wait_for_state(&c, &[0, 1, 2], "n4", "down");
    for k in 0..40 {
        let put = c.cli_at(
            k % 3,
            &["put", &format!("ae-only-{k}"), &format!("v{k}"), "-w", "2"],
        );
        put.ok();
    }
    let dropped: f64 = (0..3)
        .filter_map(|i| metric_value(&c.metrics(i), "dynakv_hints_dropped_total", &["full"]))
        .sum();
    let stored: f64 = (0..3)
        .filter_map(|i| metric_value(&c.metrics(i), "dynakv_hints_stored_total", &[]))
        .sum();
    assert!(
        dropped > 0.0,
        "no hint was refused: the test wrote nothing for n4"
    );
    assert_eq!(stored, 0.0, "a hint was stored past a bound of 0");
    let roots = c.cli(&["cluster", "roots"]);
    assert_eq!(
        roots.json["identical"], false,
        "n4 missed writes: {roots:?}"
    );

    c.restart(3);
    wait_until(
        "every pair of replicas to be identical",
        Duration::from_secs(60),
        || (c.cli(&["cluster", "roots"]).json["identical"] == true).then_some(()),
    );
    // What n4 holds came by anti-entropy: it answers alone for keys it replicates.
    for i in 0..3 {
        c.kill(i);
    }
    let status_keys = metric_value(&c.metrics(3), "dynakv_keys_stored", &[]).unwrap_or(0.0);
    assert!(status_keys > 0.0, "n4 holds nothing");
    // Strict R=ONE on n4 alone: a key n4 replicates answers from its own copy, which must be
    // there; any other key has no live primary (UNAVAILABLE).
    let mut read = 0;
    for k in 0..40 {
        let get = c.cli_at(
            3,
            &["get", &format!("ae-only-{k}"), "-r", "ONE", "--strict"],
        );
        if get.code == 0 {
            assert_eq!(
                get.texts(),
                [format!("v{k}")],
                "n4 lacks ae-only-{k}: {get:?}"
            );
            read += 1;
        } else {
            assert_eq!(get.error_code(), "UNAVAILABLE", "{get:?}");
        }
    }
    assert!(read > 0, "n4 replicates none of the keys");
    assert_eq!(
        read as f64, status_keys,
        "n4 stores exactly the keys it replicates"
    );
}

#[test]
fn a_write_forwarded_to_a_replica_that_just_died_goes_to_the_next_replica() {
    // Five nodes, n=3: find a key n1 is no replica of, so n1 forwards it.
    let mut c = ClusterSpec::new(5).n(3).start();
    let (key, first) = (0..100)
        .find_map(|i| {
            let key = format!("fwd-{i}");
            let put = c.cli_at(0, &["put", &key, "v0"]).ok();
            let receipt = &put.json["receipt"];
            (receipt["forwarded"] == true).then(|| {
                let coordinator = receipt["coordinator"].as_str().unwrap().to_string();
                (key, coordinator)
            })
        })
        .expect("some key is forwarded by n1");
    let index = |id: &str| id[1..].parse::<usize>().unwrap() - 1;
    // Killed: its connection breaks and reconnecting is refused, before gossip says anything.
    // The write certainly never reached it, so the next replica coordinates it.
    c.kill(index(&first));
    let put = c.cli_at(0, &["put", &key, "v1", "-w", "2"]).ok();
    let coordinator = put.json["receipt"]["coordinator"].as_str().unwrap();
    assert_ne!(coordinator, first, "{put:?}");
    let get = c.cli_at(0, &["get", &key, "-r", "2"]).ok();
    assert!(get.texts().contains(&"v1".to_string()), "{get:?}");
}

#[test]
fn with_one_of_three_nodes_down_quorum_writes_succeed_and_reach_it_by_coordinator_hints() {
    // Three nodes, n=3: no fallback exists, so the coordinator keeps the hint for the dead
    // replica itself. Anti-entropy is off: only hints can bring the writes to n3.
    let mut c = ClusterSpec::new(3)
        .config_yaml(&format!("{FAST_GOSSIP}anti_entropy:\n  enabled: false\n"))
        .start();
    c.kill(2);
    wait_for_state(&c, &[0, 1], "n3", "down");
    for k in 0..20 {
        c.cli_at(
            k % 2,
            &["put", &format!("hinted-{k}"), &format!("v{k}"), "-w", "2"],
        )
        .ok();
    }
    wait_until(
        "the coordinators to hold a hint per write for n3",
        Duration::from_secs(30),
        || {
            let stored: f64 = (0..2)
                .filter_map(|i| metric_value(&c.metrics(i), "dynakv_hints_stored_total", &[]))
                .sum();
            (stored >= 20.0).then_some(())
        },
    );
    c.restart(2);
    wait_until(
        "the hints to be handed to n3",
        Duration::from_secs(60),
        || {
            let keys = metric_value(&c.metrics(2), "dynakv_keys_stored", &[]).unwrap_or(0.0);
            (keys >= 20.0).then_some(())
        },
    );
    c.kill(0);
    c.kill(1);
    for k in 0..20 {
        let get = c
            .cli_at(2, &["get", &format!("hinted-{k}"), "-r", "ONE"])
            .ok();
        assert_eq!(get.texts(), [format!("v{k}")], "{get:?}");
    }
}
