//! End-to-end tests: real `dynakv` processes on free loopback ports, driven through the real CLI,
//! killed, frozen and restarted; every process is cleaned up, also when a test fails (see
//! `common`). Nothing here asserts a wall-clock duration; every wait is bounded polling.

mod common;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::*;

/// A normal write and read still work (after a refused request, a failure, ...).
#[track_caller]
fn assert_still_serving(c: &Cluster, tag: &str) {
    let key = format!("still-serving-{tag}");
    let value = format!("ok after {tag}");
    c.cli(&["put", &key, &value]).ok();
    assert_eq!(c.cli(&["get", &key]).ok().texts(), [value]);
}

/// The nodes a quorum error names as unreachable ("... : n3, n2 unreachable"), sorted: the order
/// in the message is the order the failures arrived in.
fn unreachable(message: &str) -> Vec<String> {
    let Some(names) = message
        .split([':', ';'])
        .find_map(|part| part.trim().strip_suffix(" unreachable"))
    else {
        return Vec::new();
    };
    let mut names: Vec<String> = names.split(", ").map(str::to_string).collect();
    names.sort();
    names
}

#[test]
fn put_get_and_delete_round_trip_through_the_cli_in_text_and_json() {
    let c = ClusterSpec::new(3).start();
    let eps = c.endpoints();

    // Text output, for people.
    let put = dynakv(&["put", "greeting", "hello world", "-e", &eps]).ok();
    let mut lines = put.stdout.lines();
    assert_eq!(lines.next(), Some("ok"), "{put:?}");
    assert!(
        lines.next().is_some_and(|l| l.starts_with("context: ")),
        "{put:?}"
    );
    assert!(
        put.stderr.contains("coordinator n"),
        "receipt on stderr: {put:?}"
    );
    let get = dynakv(&["get", "greeting", "-e", &eps]).ok();
    let lines: Vec<&str> = get.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{get:?}");
    assert_eq!(lines[0], "hello world");
    assert!(lines[1].starts_with("context: "), "{get:?}");

    // JSON output, for machines.
    let put = c.cli(&["put", "k1", "v1"]).ok();
    assert_eq!(put.json["key"], "k1");
    assert_eq!(
        put.json["receipt"]["needed"], 2,
        "default W is QUORUM of 3: {put:?}"
    );
    assert!(put.json["receipt"]["got"].as_u64() >= Some(2), "{put:?}");
    assert!(!put.context().is_empty());
    let get = c.cli(&["get", "k1"]).ok();
    assert_eq!(get.json["key"], "k1");
    assert_eq!(get.json["found"], true);
    assert_eq!(get.json["values"][0]["value"], "v1");
    assert_eq!(get.json["values"][0]["encoding"], "utf8");
    assert_eq!(get.json["values"].as_array().map(Vec::len), Some(1));

    // A write with the read's context replaces the value.
    c.cli(&["put", "k1", "v2", "--context", &get.context()])
        .ok();
    assert_eq!(c.cli(&["get", "k1"]).ok().texts(), ["v2"]);

    // Delete, then the key is gone, in both formats.
    let del = c.cli(&["delete", "k1"]).ok();
    assert_eq!(del.json["deleted"], true, "{del:?}");
    let get = c.cli(&["get", "k1"]).ok();
    assert_eq!(get.json["found"], false, "{get:?}");
    assert_eq!(get.json["values"], serde_json::json!([]));
    let text = dynakv(&["get", "k1", "-e", &eps]).ok();
    assert!(text.stderr.contains("(not found)"), "{text:?}");
    assert!(!text.stdout.contains("v2"), "{text:?}");
    let del = dynakv(&["delete", "greeting", "-e", &eps]).ok();
    assert_eq!(del.stdout.trim(), "deleted");
    assert_eq!(c.cli(&["get", "greeting"]).ok().json["found"], false);

    // A key never written is simply not found.
    let never = c.cli(&["get", "never-written"]).ok();
    assert_eq!(never.json["found"], false, "{never:?}");

    // Written again after the delete, the key lives again.
    c.cli(&["put", "k1", "v3"]).ok();
    assert_eq!(c.cli(&["get", "k1"]).ok().texts(), ["v3"]);
}

#[test]
fn binary_values_round_trip_byte_exact_via_file_and_stdin() {
    let c = ClusterSpec::new(3).start();
    // Every byte value, invalid UTF-8 sequences, NULs and line ends that a text path would mangle.
    let mut binary: Vec<u8> = (0..=255u8).collect();
    binary.extend_from_slice(b"\xff\xfe\x00\r\n\x80\n");
    binary.extend((0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    assert!(std::str::from_utf8(&binary).is_err());

    let file = c.scratch().join("value.bin");
    std::fs::write(&file, &binary).unwrap();
    c.cli(&["put", "bin-file", "--file", file.to_str().unwrap()])
        .ok();
    let get = c.cli(&["get", "bin-file"]).ok();
    assert_eq!(get.json["values"][0]["encoding"], "base64", "{get:?}");
    assert_eq!(get.values(), [binary.clone()]);
    assert_eq!(
        get.json["values"][0]["value"].as_str(),
        Some(B64.encode(&binary).as_str())
    );

    let eps = c.endpoints();
    let mut reversed = binary.clone();
    reversed.reverse();
    dynakv_with_stdin(
        &["put", "bin-stdin", "-", "-e", &eps, "-o", "json"],
        &reversed,
    )
    .ok();
    let get = c.cli(&["get", "bin-stdin"]).ok();
    assert_eq!(get.json["values"][0]["encoding"], "base64", "{get:?}");
    assert_eq!(get.values(), [reversed.clone()]);

    // Text output shows a binary value as base64, marked as such.
    let text = dynakv(&["get", "bin-stdin", "-e", &eps]).ok();
    assert_eq!(
        text.stdout.lines().next(),
        Some(format!("(base64) {}", B64.encode(&reversed)).as_str())
    );

    // UTF-8 from stdin keeps its trailing newline and comes back as utf8.
    dynakv_with_stdin(
        &["put", "utf8-stdin", "-e", &eps],
        "zwei Äpfel\n".as_bytes(),
    )
    .ok();
    let get = c.cli(&["get", "utf8-stdin"]).ok();
    assert_eq!(get.json["values"][0]["encoding"], "utf8");
    assert_eq!(get.json["values"][0]["value"], "zwei Äpfel\n");

    // The empty value is a value, not a deletion.
    dynakv_with_stdin(&["put", "empty-value", "-", "-e", &eps], b"").ok();
    let get = c.cli(&["get", "empty-value"]).ok();
    assert_eq!(get.json["found"], true, "{get:?}");
    assert_eq!(get.values(), [Vec::<u8>::new()]);
}

#[test]
fn writes_at_w2_succeed_with_one_node_dead_and_all_fails_naming_the_dead_node() {
    let mut c = ClusterSpec::new(3).start();
    c.cli(&["put", "before", "x", "-w", "ALL"]).ok();
    c.kill(2);

    let put = c.cli_at(0, &["put", "after", "y", "-w", "2"]).ok();
    assert_eq!(put.json["receipt"]["needed"], 2, "{put:?}");
    assert_eq!(put.json["receipt"]["got"], 2, "{put:?}");

    let all = c.cli_at(0, &["put", "all", "z", "-w", "ALL"]);
    assert_eq!(all.code, 4, "W=ALL with a dead node: {all:?}");
    assert_eq!(all.error_code(), "UNAVAILABLE", "{all:?}");
    let msg = all.error_message();
    assert!(msg.contains("needed W=3, got "), "{msg}");
    assert_eq!(unreachable(msg), ["n3"], "{msg}");
    assert!(
        !msg.contains("n1") && !msg.contains("n2"),
        "only the dead node is named: {msg}"
    );

    // Text output says the same on stderr.
    let text = dynakv(&["put", "all", "z", "-w", "ALL", "-e", &c.addr(1)]);
    assert_eq!(text.code, 4, "{text:?}");
    assert!(
        text.stderr.contains("UNAVAILABLE") && text.stderr.contains("n3 unreachable"),
        "{text:?}"
    );

    // Reads at QUORUM see both the old and the new write.
    assert_eq!(
        c.cli_at(0, &["get", "after", "-r", "QUORUM"]).ok().texts(),
        ["y"]
    );
    assert_eq!(
        c.cli_at(1, &["get", "before", "-r", "QUORUM"]).ok().texts(),
        ["x"]
    );
    let all = c.cli_at(1, &["get", "before", "-r", "ALL"]);
    assert_eq!(all.code, 4, "R=ALL with a dead node: {all:?}");
    assert!(all.error_message().contains("needed R=3, got "), "{all:?}");
    assert_eq!(unreachable(all.error_message()), ["n3"], "{all:?}");

    // A client whose first endpoint is dead moves on to the next one.
    let eps = format!("{},{}", c.addr(2), c.addr(0));
    let get = dynakv(&["get", "after", "-e", &eps, "-o", "json"]).ok();
    assert_eq!(get.texts(), ["y"]);
}

#[test]
fn with_two_of_three_nodes_dead_quorum_reads_and_writes_fail_naming_both() {
    let mut c = ClusterSpec::new(3).start();
    c.cli(&["put", "k", "v"]).ok();
    c.kill(1);
    c.kill(2);

    let put = c.cli_at(0, &["put", "k2", "v", "-w", "QUORUM"]);
    assert_eq!(put.code, 4, "{put:?}");
    assert_eq!(put.error_code(), "UNAVAILABLE");
    assert!(put.error_message().contains("needed W=2, got 1"), "{put:?}");
    assert_eq!(unreachable(put.error_message()), ["n2", "n3"], "{put:?}");

    let get = c.cli_at(0, &["get", "k", "-r", "QUORUM"]);
    assert_eq!(get.code, 4, "{get:?}");
    assert_eq!(get.error_code(), "UNAVAILABLE");
    assert!(get.error_message().contains("needed R=2, got 1"), "{get:?}");
    assert_eq!(unreachable(get.error_message()), ["n2", "n3"], "{get:?}");

    // ONE still works on the survivor.
    assert_eq!(c.cli_at(0, &["get", "k", "-r", "ONE"]).ok().texts(), ["v"]);
    c.cli_at(0, &["put", "k3", "w", "-w", "ONE"]).ok();

    // With no node at all, the client says so.
    c.kill(0);
    let none = c.cli(&["get", "k"]);
    assert_eq!(none.code, 4, "{none:?}");
    assert!(
        none.error_message().contains("no node reachable"),
        "{none:?}"
    );
}

#[test]
fn a_frozen_replica_times_out_all_writes_while_quorum_writes_succeed() {
    let c = ClusterSpec::new(3).start();
    c.cli(&["put", "warm", "up", "-w", "ALL"]).ok();
    c.stop(2);
    let all = c.cli_at(
        0,
        &["put", "frozen", "v", "-w", "ALL", "--timeout-ms", "1000"],
    );
    assert_eq!(
        all.code, 5,
        "W=ALL with a frozen replica times out: {all:?}"
    );
    assert_eq!(all.error_code(), "DEADLINE_EXCEEDED", "{all:?}");
    assert!(all.error_message().contains("needed W=3"), "{all:?}");
    assert!(all.error_message().contains("n3 timed out"), "{all:?}");
    // The failed write is not undone where it landed (as in Dynamo), so use another key.
    c.cli_at(
        0,
        &[
            "put",
            "quorum",
            "v2",
            "-w",
            "QUORUM",
            "--timeout-ms",
            "3000",
        ],
    )
    .ok();
    let get = c.cli_at(
        1,
        &["get", "quorum", "-r", "QUORUM", "--timeout-ms", "3000"],
    );
    assert_eq!(get.ok().texts(), ["v2"]);
    c.cont(2);
    // Thawed, it takes part again: W=ALL succeeds.
    wait_until(
        "W=ALL to succeed after SIGCONT",
        Duration::from_secs(20),
        || (c.cli_at(0, &["put", "thawed", "v", "-w", "ALL"]).code == 0).then_some(()),
    );
}

#[test]
fn every_acknowledged_write_is_readable_after_all_nodes_are_killed_and_restarted() {
    const WRITERS: usize = 4;
    const AT_LEAST: usize = 200;
    let mut c = ClusterSpec::new(3).start();
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let addrs: Vec<String> = (0..3).map(|i| c.addr(i)).collect();
    let run_id = random_u64() as u16;
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (acked, stop, addrs) = (acked.clone(), stop.clone(), addrs.clone());
            std::thread::spawn(move || {
                // Each writer starts at another node, so every node coordinates writes.
                let eps = (0..3)
                    .map(|k| addrs[(w + k) % 3].clone())
                    .collect::<Vec<_>>()
                    .join(",");
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    let (key, value) = (format!("dur-{w}-{i}"), format!("value-{run_id}-{w}-{i}"));
                    if cli(&["put", &key, &value, "-w", "QUORUM", "-e", &eps]).code == 0 {
                        acked.lock().unwrap().push((key, value));
                    }
                    i += 1;
                }
            })
        })
        .collect();
    wait_until(
        "enough acknowledged writes",
        Duration::from_secs(120),
        || (acked.lock().unwrap().len() >= AT_LEAST).then_some(()),
    );
    // Kill every node while the writers are still writing: no clean shutdown, no flush.
    c.kill_all();
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();

    for i in 0..3 {
        c.restart(i);
    }
    let acked = Arc::new(acked);
    let lost: Arc<Mutex<Vec<String>>> = Arc::default();
    let eps = c.endpoints();
    let readers: Vec<_> = (0..WRITERS)
        .map(|r| {
            let (acked, lost, eps) = (acked.clone(), lost.clone(), eps.clone());
            std::thread::spawn(move || {
                for (key, value) in acked.iter().skip(r).step_by(WRITERS) {
                    let get = cli(&["get", key, "-r", "QUORUM", "-e", &eps]);
                    if get.code != 0 || get.texts() != [value.clone()] {
                        lost.lock().unwrap().push(format!("{key}: {get:?}"));
                    }
                }
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
    let lost = lost.lock().unwrap();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged writes are not readable: {:#?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(5)]
    );
}

#[test]
fn read_repair_brings_a_restarted_replica_up_to_date() {
    // No anti-entropy and no hints (the coordinator would otherwise keep one for n3): read repair
    // is the only way for n3 to learn what it missed.
    let mut c = ClusterSpec::new(3)
        .config_yaml("anti_entropy:\n  enabled: false\nhints:\n  max_per_target: 0\n")
        .start();
    c.kill(2);
    let written = Instant::now();
    // A short deadline: the coordinators stop trying to replicate to n3 after it.
    c.cli_at(
        0,
        &["put", "rr-remote", "v1", "-w", "2", "--timeout-ms", "1000"],
    )
    .ok();
    c.cli_at(
        0,
        &["put", "rr-local", "v2", "-w", "2", "--timeout-ms", "1000"],
    )
    .ok();
    std::thread::sleep(
        (written + Duration::from_millis(1500)).saturating_duration_since(Instant::now()),
    );
    c.restart(2);
    let keys_on_n3 = |c: &Cluster| metric_value(&c.metrics(2), "dynakv_keys_stored", &[]).unwrap();
    assert_eq!(
        keys_on_n3(&c),
        0.0,
        "n3 must have missed both writes for this test to mean anything"
    );

    // A read at ALL coordinated by n1 finds n3 behind and repairs it (retried until n1 reaches n3
    // again after its reconnect back-off).
    wait_until(
        "a read at R=ALL through n1",
        Duration::from_secs(20),
        || {
            let get = c.cli_at(0, &["get", "rr-remote", "-r", "ALL"]);
            (get.code == 0).then(|| assert_eq!(get.texts(), ["v1"]))
        },
    );
    // A read coordinated by n3 itself repairs its own copy.
    wait_until(
        "a read at R=ALL through n3",
        Duration::from_secs(20),
        || {
            let get = c.cli_at(2, &["get", "rr-local", "-r", "ALL"]);
            (get.code == 0).then(|| assert_eq!(get.texts(), ["v2"]))
        },
    );
    // Repair is asynchronous: wait until n3 holds both keys.
    wait_until(
        "n3 to hold the repaired keys",
        Duration::from_secs(20),
        || (keys_on_n3(&c) >= 2.0).then_some(()),
    );
    assert!(metric_value(&c.metrics(0), "dynakv_read_repairs_total", &[]).unwrap() >= 1.0);

    // Only n3 is left: what it answers is its own copy.
    c.kill(0);
    c.kill(1);
    assert_eq!(
        c.cli_at(2, &["get", "rr-remote", "-r", "ONE"]).ok().texts(),
        ["v1"]
    );
    assert_eq!(
        c.cli_at(2, &["get", "rr-local", "-r", "ONE"]).ok().texts(),
        ["v2"]
    );
}

#[test]
fn quorum_reads_repair_the_replicas_they_ask_and_sampled_ones_every_primary() {
    // As above, n3 misses a write (no anti-entropy, no hints), then comes back.
    let spec = |every: u32| {
        ClusterSpec::new(3).config_yaml(&format!(
            "anti_entropy:\n  enabled: false\nhints:\n  max_per_target: 0\n\
             replication:\n  read_repair_every: {every}\n"
        ))
    };
    let miss_a_write = |c: &mut Cluster| {
        c.kill(2);
        let written = Instant::now();
        c.cli_at(0, &["put", "k", "v1", "-w", "2", "--timeout-ms", "1000"])
            .ok();
        std::thread::sleep(
            (written + Duration::from_millis(1500)).saturating_duration_since(Instant::now()),
        );
        c.restart(2);
    };
    let keys_on_n3 = |c: &Cluster| metric_value(&c.metrics(2), "dynakv_keys_stored", &[]).unwrap();
    let read_at_quorum_through_n1 = |c: &Cluster| {
        let get = c.cli_at(0, &["get", "k", "-r", "2"]).ok();
        assert_eq!(get.texts(), ["v1"]);
    };

    // read_repair_every = 1: every read asks all three primaries, so a read at R=2 through n1
    // repairs n3 even though n1 and n2 alone make its quorum.
    let mut c = spec(1).start();
    miss_a_write(&mut c);
    assert_eq!(keys_on_n3(&c), 0.0, "n3 missed the write");
    wait_until(
        "a quorum read to repair n3",
        Duration::from_secs(20),
        || {
            read_at_quorum_through_n1(&c);
            (keys_on_n3(&c) >= 1.0).then_some(())
        },
    );
    drop(c);

    // read_repair_every = 0: a read at R=2 asks n1's own copy and one peer; a read through n3
    // (which asks its own, empty, copy first) repairs n3.
    let mut c = spec(0).start();
    miss_a_write(&mut c);
    for _ in 0..5 {
        read_at_quorum_through_n1(&c);
    }
    wait_until(
        "a quorum read through n3 to repair it",
        Duration::from_secs(20),
        || {
            let get = c.cli_at(2, &["get", "k", "-r", "2"]);
            (get.code == 0 && get.texts() == ["v1"] && keys_on_n3(&c) >= 1.0).then_some(())
        },
    );
}

#[test]
fn concurrent_puts_with_the_same_context_become_siblings_and_a_merged_put_resolves_them() {
    let c = ClusterSpec::new(3).start();
    let base = c.cli(&["put", "cart", "[]"]).ok().context();
    // Two clients read the same version and write without seeing each other, through different
    // coordinators.
    c.cli_at(0, &["put", "cart", "[apple]", "--context", &base])
        .ok();
    c.cli_at(1, &["put", "cart", "[pear]", "--context", &base])
        .ok();
    let get = c.cli_at(2, &["get", "cart"]).ok();
    assert_eq!(get.texts(), ["[apple]", "[pear]"], "{get:?}");
    assert_eq!(get.json["receipt"]["siblings"], 2, "{get:?}");
    let text = dynakv(&["get", "cart", "-e", &c.endpoints()]).ok();
    assert!(text.stdout.contains("--- sibling 2 of 2"), "{text:?}");

    // A put with the merged context replaces both.
    c.cli(&["put", "cart", "[apple,pear]", "--context", &get.context()])
        .ok();
    let get = c.cli(&["get", "cart"]).ok();
    assert_eq!(get.texts(), ["[apple,pear]"], "{get:?}");

    // A put with the stale context does not replace the merged value: it becomes a sibling.
    c.cli(&["put", "cart", "[stale]", "--context", &base]).ok();
    assert_eq!(
        c.cli(&["get", "cart"]).ok().texts(),
        ["[apple,pear]", "[stale]"]
    );
}

#[test]
fn every_bad_input_gets_invalid_argument_and_the_node_keeps_serving() {
    let c = ClusterSpec::new(3).start();
    let foreign_context = {
        let other = ClusterSpec::new(1).cluster_id("another-cluster").start();
        other.cli(&["put", "k", "v"]).ok().context()
    };
    let long_key = "k".repeat(1025);
    let big = c.scratch().join("big.bin");
    std::fs::write(&big, vec![b'x'; 1024 * 1024 + 1]).unwrap();
    let big = big.to_str().unwrap();
    let garbage_context = B64.encode(b"\x01\x10\x00\x00\x00\xb5garbage-garbage!!\x00\x00\x00\x00");

    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        ("empty key put", vec!["put", "", "v"], "empty"),
        ("empty key get", vec!["get", ""], "empty"),
        (
            "empty key delete",
            vec!["delete", "", "--context", ""],
            "empty",
        ),
        ("long key put", vec!["put", &long_key, "v"], "1025 bytes"),
        ("long key get", vec!["get", &long_key], "1025 bytes"),
        (
            "big value",
            vec!["put", "k", "--file", big],
            "1048577 bytes",
        ),
        (
            "garbage context",
            vec!["put", "k", "v", "--context", &garbage_context],
            "context",
        ),
        (
            "foreign context",
            vec!["put", "k", "v", "--context", &foreign_context],
            "another cluster",
        ),
        (
            "foreign context delete",
            vec!["delete", "k", "--context", &foreign_context],
            "another cluster",
        ),
        (
            "non-base64 context",
            vec!["put", "k", "v", "--context", "not base64!"],
            "base64",
        ),
        ("r=0", vec!["get", "k", "-r", "0"], "r=0"),
        ("r=n+1", vec!["get", "k", "-r", "4"], "r=4"),
        ("w=0", vec!["put", "k", "v", "-w", "0"], "w=0"),
        ("w=n+1", vec!["put", "k", "v", "-w", "4"], "w=4"),
        (
            "delete w=n+1",
            vec!["delete", "k", "-w", "4", "--context", ""],
            "w=4",
        ),
    ];
    for (what, args, needle) in cases {
        let out = c.cli(&args);
        assert_eq!(out.code, 3, "{what}: exit code 3 expected: {out:?}");
        assert_eq!(out.error_code(), "INVALID_ARGUMENT", "{what}: {out:?}");
        assert!(
            out.error_message().contains(needle),
            "{what}: message should say {needle:?}: {out:?}"
        );
        assert_still_serving(&c, what);
    }
    // Nothing refused was written.
    assert_eq!(c.cli(&["get", "k"]).ok().json["found"], false);

    // The limits themselves are allowed.
    let key = "k".repeat(1024);
    c.cli(&["put", &key, "longest key"]).ok();
    assert_eq!(c.cli(&["get", &key]).ok().texts(), ["longest key"]);
    let max = c.scratch().join("max.bin");
    std::fs::write(&max, vec![b'y'; 1024 * 1024]).unwrap();
    c.cli(&["put", "largest", "--file", max.to_str().unwrap()])
        .ok();
    assert_eq!(
        c.cli(&["get", "largest"]).ok().values(),
        [vec![b'y'; 1024 * 1024]]
    );
}

/// `args` with the value of `flag` replaced.
fn with_flag(args: &[String], flag: &str, value: &str) -> Vec<String> {
    let mut out = args.to_vec();
    let i = out.iter().position(|a| a == flag).expect("flag present");
    out[i + 1] = value.to_string();
    out
}

/// Runs `dynakv serve ARGS`, expecting it to exit by itself; returns (exit code, stderr).
fn serve_expecting_exit(args: &[String], log: &Path) -> (i32, String) {
    let err = std::fs::File::create(log).unwrap();
    let mut child = Command::new(DYNAKV)
        .arg("serve")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .unwrap();
    let status = wait_child(&mut child, Duration::from_secs(30));
    let stderr = std::fs::read_to_string(log).unwrap_or_default();
    let status = status.unwrap_or_else(|| panic!("dynakv serve {args:?} kept running: {stderr}"));
    (status.code().unwrap_or(-1), stderr)
}

#[test]
fn a_data_directory_refuses_another_node_or_cluster_and_keeps_its_data() {
    let mut c = ClusterSpec::new(1).start();
    c.cli(&["put", "fenced", "mine"]).ok();
    let args = c.serve_args(0);
    let cluster_id = c.spec.cluster_id.clone();
    let ip = c.nodes[0].ip;
    let log = c.scratch().join("refused.log");

    // While n1 runs, a second process on its directory (on other ports) is refused.
    let ports = free_ports(ip, 2);
    let other_port = format!("{ip}:{}", ports[0]);
    let metrics_port = format!("{ip}:{}", ports[1]);
    let second = with_flag(
        &with_flag(&args, "--listen", &other_port),
        "--metrics-listen",
        &metrics_port,
    );
    let (code, stderr) = serve_expecting_exit(&second, &log);
    assert_ne!(code, 0, "{stderr}");
    assert!(stderr.contains("already open"), "{stderr}");

    c.kill(0);
    let (code, stderr) = serve_expecting_exit(&with_flag(&args, "--node-id", "imposter"), &log);
    assert_ne!(code, 0, "another node id must be refused: {stderr}");
    assert!(
        stderr.contains(&format!(
            "data directory belongs to node n1 of cluster {cluster_id}, not imposter"
        )),
        "{stderr}"
    );
    let (code, stderr) =
        serve_expecting_exit(&with_flag(&args, "--cluster-id", "other-cluster"), &log);
    assert_ne!(code, 0, "another cluster id must be refused: {stderr}");
    assert!(
        stderr.contains("not n1 of cluster other-cluster"),
        "{stderr}"
    );

    c.restart(0);
    assert_eq!(c.cli(&["get", "fenced"]).ok().texts(), ["mine"]);
    c.cli(&["put", "fenced-2", "still writable"]).ok();
}

#[test]
fn metrics_endpoint_serves_prometheus_text_with_the_documented_series() {
    let mut c = ClusterSpec::new(3).start();
    c.cli_at(0, &["put", "m", "v"]).ok();
    c.cli_at(0, &["get", "m"]).ok();
    c.kill(2);
    assert_eq!(c.cli_at(0, &["put", "m2", "v", "-w", "ALL"]).code, 4);

    let text = c.metrics(0);
    for (name, kind) in [
        ("dynakv_request_duration_seconds", "histogram"),
        ("dynakv_quorum_failures_total", "counter"),
        ("dynakv_read_repairs_total", "counter"),
        ("dynakv_keys_stored", "gauge"),
        ("dynakv_storage_commit_seconds", "histogram"),
        ("dynakv_ring_version", "gauge"),
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} {kind}\n")),
            "no {name} {kind} in:\n{text}"
        );
    }
    let value = |name: &str, labels: &[&str]| {
        metric_value(&text, name, labels)
            .unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{text}"))
    };
    assert!(
        value(
            "dynakv_request_duration_seconds_count",
            &["op=\"put\"", "outcome=\"ok\""]
        ) >= 1.0
    );
    assert!(
        value(
            "dynakv_request_duration_seconds_count",
            &["op=\"get\"", "outcome=\"ok\""]
        ) >= 1.0
    );
    assert!(
        value(
            "dynakv_request_duration_seconds_count",
            &["op=\"put\"", "outcome=\"unavailable\""]
        ) >= 1.0
    );
    assert!(value("dynakv_quorum_failures_total", &["op=\"put\""]) >= 1.0);
    assert!(value("dynakv_keys_stored", &[]) >= 1.0);
    assert!(value("dynakv_storage_commit_seconds_count", &[]) >= 1.0);
    let ring = value("dynakv_ring_version", &[]);
    assert!(ring > 0.0);
    assert_eq!(
        metric_value(&c.metrics(1), "dynakv_ring_version", &[]),
        Some(ring),
        "same members, same ring"
    );

    let (status, _) = http_get(c.nodes[0].metrics, "/no-such-page").unwrap();
    assert_eq!(status, 404);
    // Liveness and readiness over plain HTTP (probes of a node whose gRPC port speaks TLS).
    assert_eq!(http_get(c.nodes[0].metrics, "/healthz").unwrap().0, 200);
    assert_eq!(http_get(c.nodes[0].metrics, "/readyz").unwrap().0, 200);
}

/// A running `dynakv dev`, whose output lines arrive on a channel. Dropping it stops it with
/// SIGTERM (SIGKILL if it hangs) and SIGKILLs any node it left behind.
struct Dev {
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
    data_dir: String,
}

impl Dev {
    fn start(args: &[String], data_dir: &Path) -> Dev {
        let mut child = Command::new(DYNAKV)
            .arg("dev")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let stderr: Arc<Mutex<String>> = Arc::default();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = err.read(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Dev {
            child: Some(child),
            lines,
            seen: Vec::new(),
            stderr,
            data_dir: data_dir.display().to_string(),
        }
    }

    /// Waits for a line starting with `prefix`.
    fn expect_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "no line {prefix:?} from dynakv dev ({e}); output so far: {:#?}",
                    self.seen
                ),
            }
        }
    }

    /// The node pids it printed.
    fn node_pids(&self) -> Vec<u32> {
        self.seen
            .iter()
            .filter_map(|l| {
                l.split_once(" pid ")?
                    .1
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    }

    /// SIGTERM, then wait for it to exit by itself.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("dev running");
        signal(child.id(), libc::SIGTERM);
        wait_child(&mut child, Duration::from_secs(30))
            .expect("dynakv dev stops within 30 s of SIGTERM")
    }

    /// Whether `pid` is still a process of this dev cluster (a node serving from its data dir).
    fn is_our_node(&self, pid: u32) -> bool {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains(&self.data_dir))
            .unwrap_or(false)
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGTERM);
            if wait_child(&mut child, Duration::from_secs(15)).is_none() {
                let _ = child.kill();
            }
        }
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        for pid in self.node_pids() {
            if self.is_our_node(pid) {
                signal(pid, libc::SIGKILL);
            }
        }
    }
}

#[test]
fn dev_cluster_starts_serves_stops_cleanly_on_sigterm_and_keeps_its_data() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("dev");
    let ips = random_loopback_block(3);
    let (port, metrics_port) = free_port_pair_on_all(&ips);
    let args: Vec<String> = [
        "--data-dir",
        data.to_str().unwrap(),
        "--base-ip",
        &ips[0].to_string(),
        "--port",
        &port.to_string(),
        "--metrics-port",
        &metrics_port.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let expected_eps: Vec<String> = ips.iter().map(|ip| format!("{ip}:{port}")).collect();

    let mut dev = Dev::start(&args, &data);
    let ready = dev.expect_line("ready:", Duration::from_secs(60));
    assert!(ready.contains(&expected_eps.join(",")), "{ready}");
    let eps = expected_eps.join(",");
    cli(&["put", "dev-key", "dev-value", "-e", &eps]).ok();
    assert_eq!(
        cli(&["get", "dev-key", "-e", &eps]).ok().texts(),
        ["dev-value"]
    );
    let status = cli(&["cluster", "status", "-e", &eps]).ok();
    assert_eq!(status.json["cluster_id"], "dynakv-dev");
    assert_eq!(status.json["members"].as_array().map(Vec::len), Some(3));
    let (code, _) = http_get(
        format!("{}:{metrics_port}", ips[1]).parse().unwrap(),
        "/metrics",
    )
    .unwrap();
    assert_eq!(code, 200);

    let pids = dev.node_pids();
    assert_eq!(pids.len(), 3, "{:#?}", dev.seen);
    let status = dev.terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "dynakv dev exits 0 on SIGTERM: {status:?}"
    );
    let rest: Vec<String> = dev.lines.iter().collect();
    dev.seen.extend(rest);
    assert!(dev.seen.iter().any(|l| l == "stopped"), "{:#?}", dev.seen);
    let stderr = dev.stderr.lock().unwrap().clone();
    assert!(
        !stderr.contains("killing it"),
        "every node stops by itself on SIGTERM: {stderr}"
    );
    for pid in &pids {
        assert!(!dev.is_our_node(*pid), "node pid {pid} outlived dynakv dev");
    }
    for ep in &expected_eps {
        let addr: SocketAddr = ep.parse().unwrap();
        assert!(
            TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(),
            "{ep} still accepts connections after dynakv dev stopped"
        );
    }
    drop(dev);

    // Started again on the same directory, it has the data.
    let mut dev = Dev::start(&args, &data);
    dev.expect_line("ready:", Duration::from_secs(60));
    assert_eq!(
        cli(&["get", "dev-key", "-e", &eps]).ok().texts(),
        ["dev-value"]
    );
    assert_eq!(dev.terminate().code(), Some(0));
    let mut logs = BTreeMap::new();
    for id in ["n1", "n2", "n3"] {
        logs.insert(
            id,
            std::fs::read_to_string(data.join(id).join("node.log")).unwrap_or_default(),
        );
    }
    assert!(
        logs.values().all(|l| !l.contains("panicked")),
        "a dev node panicked: {logs:#?}"
    );
}

#[test]
fn a_node_stops_on_sigterm_while_its_peers_hold_replica_streams_to_it() {
    let mut c = ClusterSpec::new(3).start();
    // Every node coordinates a write, so every node has a replica stream to every other one.
    for i in 0..3 {
        c.cli_at(i, &["put", &format!("k{i}"), "v", "-w", "ALL"])
            .ok();
    }
    let status = c.terminate(0, Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| s.success()),
        "n1 must exit 0 by itself after SIGTERM (got {status:?}); log:\n{}",
        c.log_tail(0, 20)
    );
    // The others keep serving without it.
    c.cli_at(1, &["put", "after-stop", "v", "-w", "2"]).ok();
}

#[test]
fn anti_entropy_brings_a_replica_that_missed_writes_up_to_date_without_reads() {
    const KEYS: usize = 20;
    let mut c = ClusterSpec::new(3)
        .config_yaml("anti_entropy:\n  interval_ms: 300\n")
        .start();
    c.kill(2);
    let written = Instant::now();
    for k in 0..KEYS {
        c.cli_at(
            0,
            &[
                "put",
                &format!("ae-{k}"),
                &format!("v{k}"),
                "-w",
                "2",
                "--timeout-ms",
                "1000",
            ],
        )
        .ok();
    }
    // Past the writes' deadline, nobody retries them toward n3 on its own.
    std::thread::sleep(
        (written + Duration::from_millis(1500)).saturating_duration_since(Instant::now()),
    );
    c.restart(2);
    wait_until(
        "n3 to receive every key by anti-entropy",
        Duration::from_secs(30),
        || {
            let keys = metric_value(&c.metrics(2), "dynakv_keys_stored", &[]).unwrap_or(0.0);
            (keys >= KEYS as f64).then_some(())
        },
    );
    c.kill(0);
    c.kill(1);
    for k in 0..KEYS {
        let get = c.cli_at(2, &["get", &format!("ae-{k}"), "-r", "ONE"]).ok();
        assert_eq!(get.texts(), [format!("v{k}")]);
    }
}

#[test]
fn a_fallback_holds_a_hint_for_a_dead_primary_and_hands_it_off_when_it_returns() {
    // Four nodes, n=3: every key has a fallback. No anti-entropy, so only the hint can carry the
    // write to the primary that missed it.
    let mut c = ClusterSpec::new(4)
        .n(3)
        .config_yaml("anti_entropy:\n  enabled: false\n")
        .start();
    let first = c.cli_at(0, &["put", "hinted", "v0", "-w", "ALL"]).ok();
    let receipt = &first.json["receipt"];
    let coordinator = receipt["coordinator"].as_str().unwrap().to_string();
    let primaries: Vec<String> = receipt["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["node"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(primaries.len(), 3, "{first:?}");
    // The harness names node i "n{i+1}".
    let index = |id: &str| id[1..].parse::<usize>().unwrap() - 1;
    let victim = primaries
        .iter()
        .find(|p| **p != coordinator)
        .unwrap()
        .clone();
    let fallback = c
        .nodes
        .iter()
        .find(|n| !primaries.contains(&n.id))
        .unwrap()
        .id
        .clone();

    c.kill(index(&victim));
    let written = Instant::now();
    let put = c
        .cli_at(
            index(&coordinator),
            &[
                "put",
                "hinted",
                "v1",
                "--context",
                &first.context(),
                "-w",
                "ALL",
                "--timeout-ms",
                "1000",
            ],
        )
        .ok();
    let receipt = &put.json["receipt"];
    assert_eq!(receipt["hinted"], true, "{put:?}");
    let stand_in = receipt["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["ok"] == true && r["fallback"] == true)
        .unwrap_or_else(|| panic!("no fallback acked: {put:?}"));
    assert_eq!(stand_in["node"], fallback.as_str(), "{put:?}");
    assert_eq!(stand_in["hint_for"], victim.as_str(), "{put:?}");

    std::thread::sleep(
        (written + Duration::from_millis(1500)).saturating_duration_since(Instant::now()),
    );
    c.restart(index(&victim));
    wait_until(
        "the fallback to deliver its hint",
        Duration::from_secs(30),
        || {
            let delivered = metric_value(
                &c.metrics(index(&fallback)),
                "dynakv_hints_delivered_total",
                &[],
            );
            (delivered >= Some(1.0)).then_some(())
        },
    );
    for i in 0..4 {
        if c.nodes[i].id != victim {
            c.kill(i);
        }
    }
    let get = c
        .cli_at(index(&victim), &["get", "hinted", "-r", "ONE"])
        .ok();
    assert_eq!(get.texts(), ["v1"], "{get:?}");
}

#[test]
fn a_delete_made_while_a_replica_was_down_does_not_come_back_from_it() {
    // No anti-entropy and no hints: the read below is what brings n3 the tombstone.
    let mut c = ClusterSpec::new(3)
        .config_yaml("anti_entropy:\n  enabled: false\nhints:\n  max_per_target: 0\n")
        .start();
    let value = "x".repeat(2000);
    c.cli(&["put", "gone", &value, "-w", "ALL"]).ok();
    c.kill(2);
    let deleted = Instant::now();
    let del = c.cli_at(0, &["delete", "gone", "-w", "2", "--timeout-ms", "1000"]);
    assert_eq!(del.ok().json["deleted"], true);
    std::thread::sleep(
        (deleted + Duration::from_millis(1500)).saturating_duration_since(Instant::now()),
    );
    c.restart(2);
    let bytes_on_n3 =
        |c: &Cluster| metric_value(&c.metrics(2), "dynakv_stored_bytes", &[]).unwrap();
    assert!(bytes_on_n3(&c) >= 2000.0, "n3 still holds the old value");

    // n3 still has the value, but the tombstone covers it: not found, even at ALL.
    wait_until("a read at R=ALL", Duration::from_secs(20), || {
        let get = c.cli_at(0, &["get", "gone", "-r", "ALL"]);
        (get.code == 0).then(|| assert_eq!(get.json["found"], false, "{get:?}"))
    });
    // Read repair gives n3 the tombstone in place of the value.
    wait_until(
        "n3 to drop the deleted value",
        Duration::from_secs(20),
        || (bytes_on_n3(&c) < 1000.0).then_some(()),
    );
    c.kill(0);
    c.kill(1);
    let get = c.cli_at(2, &["get", "gone", "-r", "ONE"]).ok();
    assert_eq!(get.json["found"], false, "{get:?}");
}

#[test]
fn writes_past_the_sibling_limit_are_refused_until_a_client_resolves_them() {
    let c = ClusterSpec::new(3)
        .config_yaml("limits:\n  sibling_warn: 2\n  sibling_max: 3\n")
        .start();
    // Blind writes (no context) never replace each other.
    for v in ["a", "b", "c"] {
        c.cli(&["put", "busy", v]).ok();
    }
    let get = c.cli(&["get", "busy", "-r", "ALL"]).ok();
    assert_eq!(get.texts(), ["a", "b", "c"]);
    let refused = c.cli(&["put", "busy", "d", "-w", "ALL"]);
    assert_eq!(refused.code, 6, "{refused:?}");
    assert_eq!(refused.error_code(), "RESOURCE_EXHAUSTED", "{refused:?}");
    assert!(refused.error_message().contains("siblings"), "{refused:?}");
    assert_eq!(
        c.cli(&["get", "busy", "-r", "ALL"]).ok().texts(),
        ["a", "b", "c"],
        "the refused write changed nothing"
    );
    // A write with the read's context resolves them.
    c.cli(&["put", "busy", "abc", "--context", &get.context()])
        .ok();
    assert_eq!(c.cli(&["get", "busy"]).ok().texts(), ["abc"]);
    c.cli(&["put", "busy", "e"]).ok();
    assert_eq!(c.cli(&["get", "busy"]).ok().texts(), ["abc", "e"]);
}

#[test]
fn a_client_gives_up_on_a_frozen_endpoint_within_its_timeout() {
    let c = ClusterSpec::new(3).start();
    c.cli(&["put", "k", "v", "-w", "ALL"]).ok();
    c.stop(0);
    // n1 is frozen: the kernel still completes its TCP handshakes, but nothing answers.
    let eps = format!("{},{}", c.addr(0), c.addr(1));
    let args = ["get", "k", "-e", &eps, "-o", "json", "--timeout-ms", "2000"];
    let out = dynakv_within(&args, b"", Duration::from_secs(15)).unwrap_or_else(|hung| {
        panic!("`dynakv get --timeout-ms 2000` with a frozen first endpoint still runs after 15 s: {hung:?}")
    });
    // Either the next endpoint answered, or the deadline was reported.
    match out.code {
        0 => assert_eq!(out.texts(), ["v"]),
        _ => assert_eq!(out.error_code(), "DEADLINE_EXCEEDED", "{out:?}"),
    }
    let args = [
        "cluster",
        "status",
        "-e",
        &eps,
        "-o",
        "json",
        "--timeout-ms",
        "2000",
    ];
    let out = dynakv_within(&args, b"", Duration::from_secs(15)).unwrap_or_else(|hung| {
        panic!(
            "`dynakv cluster status` with a frozen first endpoint still runs after 15 s: {hung:?}"
        )
    });
    assert!(out.code == 0 || out.code == 5, "{out:?}");
}

/// `KV.Ring` tells a client where each key lives: `dynakv bench` sends every key straight to one
/// of its replicas, so no node forwards anything; with `--no-routing` the nodes forward the
/// writes that reach a non-replica (with 5 nodes and n = 3, about two in five).
#[test]
fn the_bench_routes_each_key_to_a_replica_and_no_node_forwards() {
    let c = ClusterSpec::new(5).n(3).start();
    let forwarded = |c: &Cluster| -> f64 {
        (0..5)
            .map(|i| metric_value(&c.metrics(i), "dynakv_forwarded_requests_total", &[]).unwrap())
            .sum()
    };
    let eps = c.endpoints();
    let bench = |extra: &[&str]| {
        let mut args = vec![
            "bench",
            "-W",
            "W",
            "-k",
            "2000",
            "--ops",
            "1500",
            "--warmup",
            "0s",
            "-c",
            "8",
            "--no-progress",
            "-e",
            &eps,
            "-o",
            "json",
        ];
        args.extend(extra);
        let out = dynakv_within(&args, b"", Duration::from_secs(120))
            .unwrap_or_else(|o| panic!("bench timed out: {o:?}"));
        assert_eq!(out.code, 0, "bench failed: {out:?}");
        let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(report["run"]["ops"], 1500, "{report}");
        assert_eq!(report["run"]["errors"], 0, "{report}");
        report
    };

    let before = forwarded(&c);
    let routed = bench(&[]);
    assert!(
        routed["target"]["consistency"]
            .as_str()
            .unwrap()
            .contains("token-aware"),
        "{routed}"
    );
    let after_routed = forwarded(&c);
    assert_eq!(
        after_routed, before,
        "a routed bench had requests forwarded: {routed}"
    );

    bench(&["--no-routing"]);
    let after_plain = forwarded(&c);
    assert!(
        after_plain - after_routed >= 200.0,
        "without routing, about 600 of 1500 writes should be forwarded; {} were",
        after_plain - after_routed
    );
}

#[test]
fn a_serving_node_has_transparent_huge_pages_off() {
    // mimalloc asks for huge pages, and each one faulted back in is zeroed whole (about 5% of a
    // node's CPU under puts, docs/benchmarks.md): `serve` turns them off for its process.
    let c = ClusterSpec::new(1).start();
    let status = std::fs::read_to_string(format!("/proc/{}/status", c.pid(0)))
        .expect("read the node's /proc status");
    let thp = status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(str::trim);
    assert_eq!(thp, Some("0"), "{status}");
}
