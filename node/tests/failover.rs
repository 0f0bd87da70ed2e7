//! Failover with real processes: a replica frozen with SIGSTOP (its sockets open, answering
//! nothing) is given up on by its silence, long before gossip calls it down, and long before the
//! request's deadline. Nothing here asserts a duration: the proofs are the status code
//! (`UNAVAILABLE`, not `DEADLINE_EXCEEDED` under a long deadline), gossip still holding the
//! frozen node not down, and the metrics.

mod common;

use std::time::Duration;

use common::*;

/// Gossip that takes tens of seconds to call a node down: what acts first is the silence
/// detector of the peer links.
const SLOW_GOSSIP: &str =
    "gossip:\n  probe_period_ms: 1000\n  probe_rtt_ms: 500\n  suspicion_mult: 60\n";

fn gossip_state(c: &Cluster, i: usize, id: &str) -> String {
    let status = c.cli_at(i, &["cluster", "status"]).ok();
    status.json["members"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["id"] == id))
        .and_then(|m| m["state"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// With n = 1: a key whose only replica is n3, written once (v0) through n1.
fn a_key_of_n3(c: &Cluster) -> String {
    (0..200)
        .map(|i| format!("f{i}"))
        .find(|k| {
            let put = c.cli_at(0, &["put", k, "v0"]).ok();
            put.json["receipt"]["coordinator"] == "n3"
        })
        .expect("one of 200 keys is n3's")
}

/// Milliseconds since the Unix epoch, as write ids are stamped.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_millis() as u64
}

/// A put sent to `target` as a forwarding node sends one: the forwarded header and `write_id`
/// (`{id:032x}-{packed hybrid time:016x}`), from a client with no credentials (the clusters
/// here require none, so it may speak for a node).
fn put_as_forwarded(
    target: &str,
    key: &str,
    value: &'static [u8],
    write_id: &str,
) -> Result<dynakv_node::proto::PutResponse, tonic::Status> {
    use dynakv_node::cli::client::Credentials;
    use dynakv_node::proto::PutRequest;
    use dynakv_node::proto::kv_client::KvClient;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let plain = Credentials::default();
        let conn = plain
            .connect(
                plain.endpoint(target).expect("endpoint"),
                Duration::from_secs(5),
            )
            .await
            .expect("connect");
        let mut req = tonic::Request::new(PutRequest {
            key: bytes::Bytes::from(key.to_string()),
            value: bytes::Bytes::from_static(value),
            ..Default::default()
        });
        req.metadata_mut()
            .insert("x-dynakv-forwarded", "1".parse().expect("header"));
        req.metadata_mut()
            .insert("x-dynakv-write-id", write_id.parse().expect("header"));
        KvClient::new(conn).put(req).await.map(|r| r.into_inner())
    })
}

#[test]
fn a_frozen_replica_is_given_up_on_by_its_silence_not_at_the_deadline() {
    let c = ClusterSpec::new(3).n(3).config_yaml(SLOW_GOSSIP).start();
    c.cli_at(0, &["put", "before", "v0", "-w", "all"]).ok();

    c.stop(2);
    // W = all (strict) needs n3: the write cannot succeed. Under a 30 s deadline it must fail
    // with UNAVAILABLE naming n3 once n3 is silent, not run into the deadline.
    let put = c.cli_at(
        0,
        &[
            "put",
            "during",
            "v1",
            "-w",
            "all",
            "--strict",
            "--timeout-ms",
            "30000",
        ],
    );
    assert_ne!(put.code, 0, "{put:?}");
    assert_eq!(put.json["error"]["code"], "UNAVAILABLE", "{put:?}");
    let message = put.json["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("n3"), "the message names n3: {put:?}");
    assert_ne!(
        gossip_state(&c, 0, "n3"),
        "down",
        "gossip had not called n3 down yet: the silence detector answered"
    );
    let metrics = c.metrics(0);
    assert_eq!(
        metric_value(&metrics, "dynakv_peer_silent", &["peer=\"n3\""]),
        Some(1.0),
        "n1 reports n3 silent"
    );
    assert!(
        metric_value(&metrics, "dynakv_fast_unavailable_total", &["op=\"write\""])
            .is_some_and(|v| v >= 1.0),
        "the fast UNAVAILABLE is counted"
    );

    // A quorum write (W = 2 of n1, n2, n3) meanwhile succeeds, n3's share going to a hint.
    let ok = c.cli_at(0, &["put", "quorum", "v2", "-w", "2"]).ok();
    assert_eq!(ok.json["receipt"]["coordinator"], "n1", "{ok:?}");

    // Thawed, n3 is heard again and gets what it missed.
    c.cont(2);
    wait_until("n1 hears n3 again", Duration::from_secs(60), || {
        metric_value(&c.metrics(0), "dynakv_peer_silent", &["peer=\"n3\""])
            .is_some_and(|v| v == 0.0)
            .then_some(())
    });
    wait_until(
        "n3 holds the quorum write",
        Duration::from_secs(120),
        || {
            let get = c.cli_at(2, &["get", "quorum", "-r", "1"]);
            (get.code == 0 && get.texts().contains(&"v2".to_string())).then_some(())
        },
    );
}

#[test]
fn quorum_reads_do_not_wait_for_a_frozen_replica() {
    // A read at R=2 asks two of the three primaries; one of them frozen must cost a speculative
    // request to the third, not the deadline. Every read here has a 30 s deadline and must
    // answer with the value while gossip still holds n3 alive.
    let c = ClusterSpec::new(3).n(3).config_yaml(SLOW_GOSSIP).start();
    let keys: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
    for k in &keys {
        c.cli_at(0, &["put", k, "v", "-w", "all"]).ok();
    }
    c.stop(2);
    for coordinator in [0, 1] {
        for k in &keys {
            let get = c.cli_at(coordinator, &["get", k, "-r", "2", "--timeout-ms", "30000"]);
            assert_eq!(get.code, 0, "{get:?}");
            assert_eq!(get.texts(), ["v"], "{get:?}");
        }
    }
    assert_ne!(
        gossip_state(&c, 0, "n3"),
        "down",
        "gossip had not called n3 down: the reads did without it on their own"
    );
    c.cont(2);
}

#[test]
fn a_write_forwarded_to_a_frozen_coordinator_fails_fast_not_at_the_deadline() {
    // With n = 1 a key has one replica, so n1 forwards writes of n3's keys to n3. Frozen after
    // getting one, n3 answers nothing: n1 must tell the client (UNAVAILABLE, the write may or
    // may not have been applied) once n3 is silent and its probes go unanswered, under a 30 s
    // deadline and while gossip still holds n3 alive, and must not send the write elsewhere.
    // (The connection's keepalive would break it after about 4 s with the same answer; the
    // metric shows which of the two ended it.)
    let c = ClusterSpec::new(3).n(1).config_yaml(SLOW_GOSSIP).start();
    let key = a_key_of_n3(&c);

    // Healthy, the forward goes through.
    let put = c.cli_at(0, &["put", &key, "v1"]).ok();
    assert_eq!(put.json["receipt"]["forwarded"], true, "{put:?}");

    c.stop(2);
    let put = c.cli_at(0, &["put", &key, "v2", "--timeout-ms", "30000"]);
    assert_ne!(put.code, 0, "{put:?}");
    assert_eq!(put.json["error"]["code"], "UNAVAILABLE", "{put:?}");
    let message = put.json["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("n3") && message.contains("may or may not have been applied"),
        "the message names n3 and says the outcome is unknown: {put:?}"
    );
    assert_ne!(
        gossip_state(&c, 0, "n3"),
        "down",
        "gossip had not called n3 down yet: the silence of n3 and its probes answered"
    );
    assert!(
        metric_value(
            &c.metrics(0),
            "dynakv_fast_unavailable_total",
            &["op=\"forward\""]
        )
        .is_some_and(|v| v >= 1.0),
        "the fast UNAVAILABLE of the forward is counted"
    );

    // Thawed, n3 coordinates forwarded writes again.
    c.cont(2);
    wait_until("n3 coordinates again", Duration::from_secs(60), || {
        let put = c.cli_at(0, &["put", &key, "v3", "--timeout-ms", "5000"]);
        (put.code == 0 && put.json["receipt"]["coordinator"] == "n3").then_some(())
    });
}

#[test]
fn a_forward_waits_for_a_coordinator_that_pauses_for_less_than_the_silence_threshold() {
    // The other side of the test above: a coordinator that stalls briefly (a GC pause, a slow
    // disk; here SIGSTOP for well under the silence threshold of at least 1 s) is probed past
    // its hedge delay, answers the probes once it runs again, and is waited for: the write
    // succeeds through it, with no fast UNAVAILABLE counted.
    let c = ClusterSpec::new(3).n(1).config_yaml(SLOW_GOSSIP).start();
    let key = a_key_of_n3(&c);
    let fetches = |c: &Cluster| {
        metric_value(
            &c.metrics(2),
            "dynakv_replica_operations_total",
            &["op=\"fetch\"", "outcome=\"ok\""],
        )
        .unwrap_or(0.0)
    };
    let probes_before = fetches(&c);

    let forwarded = |c: &Cluster| {
        metric_value(&c.metrics(0), "dynakv_forwarded_requests_total", &[]).unwrap_or(0.0)
    };
    let forwards_before = forwarded(&c);

    c.stop(2);
    let put = std::thread::scope(|s| {
        let put = s.spawn(|| c.cli_at(0, &["put", &key, "v1", "--timeout-ms", "30000"]));
        // n3 stays stopped from the moment n1 forwards for longer than any hedge delay (at
        // most 200 ms), so n1 probes it, and for well under the silence threshold.
        wait_until("n1 forwards the put", Duration::from_secs(30), || {
            (forwarded(&c) > forwards_before).then_some(())
        });
        std::thread::sleep(Duration::from_millis(400));
        c.cont(2);
        put.join().expect("the put thread")
    });
    let put = put.ok();
    assert_eq!(put.json["receipt"]["coordinator"], "n3", "{put:?}");
    assert_eq!(put.json["receipt"]["forwarded"], true, "{put:?}");
    assert!(
        fetches(&c) > probes_before,
        "n1 probed n3 while the forward waited (fetches before: {probes_before})"
    );
    assert!(
        metric_value(
            &c.metrics(0),
            "dynakv_fast_unavailable_total",
            &["op=\"forward\""]
        )
        .is_none_or(|v| v == 0.0),
        "no fast UNAVAILABLE for a coordinator that answered its probes"
    );
    let get = c.cli_at(0, &["get", &key]).ok();
    assert!(get.texts().contains(&"v1".to_string()), "{get:?}");
}

#[test]
fn writes_forwarded_while_a_replica_is_frozen_succeed_and_read_as_one_value() {
    // Four nodes, n = 2: n1 forwards the writes of keys it does not replicate. Every key here
    // has n3 as one of its two replicas; n3 is frozen. A forward that went to n3 first gets
    // company at the other replica past n3's hedge delay (the write carries one write id to
    // both), so every write succeeds, none ends in "may or may not have been applied". A
    // client that reads and overwrites meanwhile, and n3 thawed afterwards with the first
    // forward possibly still in hand, must leave exactly the overwrite: never two values, never
    // the old one back.
    let c = ClusterSpec::new(4).n(2).config_yaml(SLOW_GOSSIP).start();
    let keys: Vec<String> = (0..400)
        .map(|i| format!("fw{i}"))
        .filter(|k| {
            let put = c.cli_at(0, &["put", k, "v0", "-w", "ALL"]).ok();
            let replicas: Vec<String> = put.json["receipt"]["replicas"]
                .as_array()
                .map(|rs| {
                    rs.iter()
                        .filter_map(|r| r["node"].as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            replicas.iter().any(|r| r == "n3") && !replicas.iter().any(|r| r == "n1")
        })
        .take(8)
        .collect();
    assert_eq!(
        keys.len(),
        8,
        "eight of 400 keys are replicated by n3 and not n1"
    );

    c.stop(2);
    for key in &keys {
        let put = c.cli_at(0, &["put", key, "v1", "-w", "1", "--timeout-ms", "30000"]);
        assert_eq!(
            put.code, 0,
            "the forward of {key} succeeds with n3 frozen: {put:?}"
        );
        assert_eq!(put.json["receipt"]["forwarded"], true, "{put:?}");
        // v1 was written blind: a sibling of v0, once.
        let get = c.cli_at(0, &["get", key, "-r", "1"]).ok();
        assert_eq!(
            get.texts(),
            vec!["v0".to_string(), "v1".to_string()],
            "{get:?}"
        );
        let put = c.cli_at(
            0,
            &["put", key, "v2", "-w", "1", "--context", &get.context()],
        );
        assert_eq!(put.code, 0, "the overwrite of {key} succeeds: {put:?}");
    }
    let hedged = metric_value(
        &c.metrics(0),
        "dynakv_hedged_requests_total",
        &["kind=\"forward_write\"", "outcome=\"sent\""],
    )
    .unwrap_or(0.0);
    c.cont(2);
    // n3 handles whatever it got while frozen; then every key reads as the overwrite alone,
    // at both replicas.
    for key in &keys {
        wait_until(&format!("{key} settles"), Duration::from_secs(60), || {
            let get = c.cli_at(0, &["get", key, "-r", "ALL"]);
            (get.code == 0).then_some(get)
        });
        let get = c.cli_at(0, &["get", key, "-r", "ALL"]).ok();
        assert_eq!(
            get.texts(),
            vec!["v2".to_string()],
            "{key}: the overwrite alone ({hedged} forwards hedged): {get:?}"
        );
    }
}

#[test]
fn a_forwarded_write_id_is_checked_before_anything_is_applied() {
    // The write-id header (read only on forwarded requests) decides what a value hides, so a
    // malformed one, or one stamped further ahead than the hybrid clocks tolerate (it would
    // never age), is refused with INVALID_ARGUMENT and nothing applied; a valid one is stored
    // with the value (the context the put returns is of version 2, which carries write ids).
    let c = ClusterSpec::new(3).start();
    let target = c.nodes[0].addr.to_string();
    let now_ms = now_ms();
    let stamp = |ms: u64| format!("{:032x}-{:016x}", 7u128, ms << 16);
    let put = |key: &str, write_id: &str| put_as_forwarded(&target, key, b"v", write_id);
    for (key, id) in [
        ("wid-future", stamp(now_ms + 3_600_000)),
        ("wid-malformed", "not-a-write-id".to_string()),
    ] {
        let err = put(key, &id).expect_err(key);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{key}: {err:?}");
        let get = c.cli_at(0, &["get", key, "-r", "ALL"]).ok();
        assert!(get.texts().is_empty(), "{key}: nothing applied: {get:?}");
    }
    let ok = put("wid-valid", &stamp(now_ms)).expect("a valid write id");
    assert_eq!(ok.context[0], 2, "the value carries the write id");
}

#[test]
fn write_ids_are_used_only_while_no_peer_lacks_them() {
    // A rolling upgrade from a version before write ids has nodes side by side that refuse
    // values and contexts carrying them. Every node advertises write ids on its replica
    // streams; while a peer is known not to (here n3 restarted with `replication.write_ids:
    // false`, as a node of the older version), the others neither mint them for forwarded
    // writes nor take them from one, so the values they store carry none (the put's context is
    // of version 1); once n3 advertises them again, forwarded writes carry them (version 2).
    let mut c = ClusterSpec::new(3).n(1).start();
    let version = |put: &Out| {
        let context =
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, put.context())
                .expect("a base64 context");
        context[0]
    };
    // Waits until each of `nodes` counts `lacking` peers without write ids.
    let wait_lacking = |c: &Cluster, nodes: &[usize], lacking: f64, what: &str| {
        for &i in nodes {
            wait_until(what, Duration::from_secs(30), || {
                let seen = metric_value(&c.metrics(i), "dynakv_peers_without_write_ids", &[]);
                (seen == Some(lacking)).then_some(())
            });
        }
    };
    // A put through n1 of a fresh key that n2 coordinates (n = 1: n1 forwards it).
    let forwarded_put = |c: &Cluster, prefix: &str| {
        (0..200)
            .map(|i| {
                let key = format!("{prefix}{i}");
                let put = c.cli_at(0, &["put", &key, "v"]).ok();
                (key, put)
            })
            .find(|(_, put)| put.json["receipt"]["coordinator"] == "n2")
            .expect("one of 200 keys is n2's")
    };

    wait_lacking(&c, &[0], 0.0, "n1 knows no peer that lacks write ids");
    let (before, put) = forwarded_put(&c, "before-");
    assert_eq!(put.json["receipt"]["forwarded"], true, "{put:?}");
    assert_eq!(version(&put), 2, "every node has write ids: {put:?}");

    let off = c.scratch().join("no-write-ids.yaml");
    std::fs::write(&off, "replication:\n  write_ids: false\n").expect("write the config");
    c.restart_with(2, &["--config", off.to_str().expect("utf-8 path")]);
    wait_lacking(&c, &[0, 1], 1.0, "n1 and n2 learn that n3 lacks write ids");
    let (key, put) = forwarded_put(&c, "mixed-");
    assert_eq!(put.json["receipt"]["forwarded"], true, "{put:?}");
    assert_eq!(version(&put), 1, "no write id was taken: {put:?}");

    // Overwriting a value that has a write id, with the context of a read: the new value
    // carries none (not even the replaced value's, as superseded), the reply's context none.
    let read = c.cli_at(0, &["get", &before]).ok();
    assert_eq!(version(&read), 1, "contexts carry no ids now: {read:?}");
    let overwrite = c
        .cli_at(0, &["put", &before, "v2", "--context", &read.context()])
        .ok();
    assert_eq!(version(&overwrite), 1, "{overwrite:?}");

    // A forwarded put that carries a write id anyway (from a node that has not noticed yet):
    // n2, the coordinator, does not take it.
    let id = format!("{:032x}-{:016x}", 9u128, now_ms() << 16);
    let answer = put_as_forwarded(&c.addr(1), &key, b"late", &id);
    let answer = answer.expect("the put succeeds");
    assert_eq!(
        answer.context[0], 1,
        "n2 took a write id while n3 lacks them"
    );

    c.restart_with(2, &[]);
    wait_lacking(
        &c,
        &[0, 1],
        0.0,
        "n1 and n2 learn that n3 has write ids again",
    );
    let (_, put) = forwarded_put(&c, "after-");
    assert_eq!(version(&put), 2, "every node has write ids again: {put:?}");
    // The value overwritten meanwhile kept no id: its reads' contexts have none to carry.
    let read = c.cli_at(0, &["get", &before]).ok();
    assert_eq!(read.texts(), ["v2"], "{read:?}");
    assert_eq!(version(&read), 1, "the overwrite carried an id: {read:?}");
}
