//! Membership change with real processes on loopback: nodes join through seeds and are ramped in
//! by weight, drained out, with a writer and a reader running; the receiving and the sending node
//! of a handoff are killed mid-stream; and every admin request that cannot be honoured is refused
//! and changes nothing.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Cluster, ClusterSpec, dynakv_within, metric_value, wait_until};
use dynakv_node::proto::admin_client::AdminClient;
use dynakv_node::proto::kv_client::KvClient;
use dynakv_node::proto::{
    ClusterStatusRequest, ClusterStatusResponse, Consistency, ConsistencyLevel, GetRequest,
    NodeStatusRequest, PutRequest, Quorum, quorum,
};
use serde_json::Value;

/// Longest a ring change may take in these tests: a liveness bound, not a speed check. They move
/// little data and take seconds on an idle machine, but CI runs them beside the simulation on two
/// cores, where a debug-built five-node cluster has been seen to take over a minute per ramp.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(300);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn quorum_level() -> Option<Quorum> {
    Some(Quorum {
        value: Some(quorum::Value::Level(ConsistencyLevel::Quorum as i32)),
    })
}

async fn kv(addr: &str) -> Option<KvClient<tonic::transport::Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .ok()?;
    Some(KvClient::new(channel))
}

fn consistency() -> Option<Consistency> {
    Some(Consistency {
        r: quorum_level(),
        w: quorum_level(),
        sloppy: None,
        timeout_ms: 3000,
    })
}

async fn put(client: &mut KvClient<tonic::transport::Channel>, key: &str, value: &str) -> bool {
    client
        .put(PutRequest {
            key: key.as_bytes().to_vec().into(),
            value: value.as_bytes().to_vec().into(),
            context: Default::default(),
            consistency: consistency(),
        })
        .await
        .is_ok()
}

/// The values a quorum read returns (`None`: the read failed).
async fn get(client: &mut KvClient<tonic::transport::Channel>, key: &str) -> Option<Vec<String>> {
    let r = client
        .get(GetRequest {
            key: key.as_bytes().to_vec().into(),
            consistency: consistency(),
        })
        .await
        .ok()?;
    Some(
        r.into_inner()
            .values
            .into_iter()
            .map(|s| String::from_utf8_lossy(&s.value).into_owned())
            .collect(),
    )
}

/// A writer of unique keys that reads each key back at once (and an older one), recording what
/// was acknowledged and every read that missed an acknowledged write.
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<(String, String)>>>,
    missed: Arc<Mutex<Vec<String>>>,
    failed: Arc<AtomicU64>,
    /// Writes that failed: each may or may not have been applied.
    maybe: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(endpoints: Vec<String>, prefix: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let missed = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(AtomicU64::new(0));
        let maybe = Arc::new(AtomicU64::new(0));
        let (s, a, m, f) = (stop.clone(), acked.clone(), missed.clone(), failed.clone());
        let mb = maybe.clone();
        let prefix = prefix.to_string();
        let thread = std::thread::spawn(move || {
            runtime().block_on(async move {
                let mut clients = Vec::new();
                for e in &endpoints {
                    if let Some(c) = kv(e).await {
                        clients.push(c);
                    }
                }
                assert!(!clients.is_empty(), "the load reaches no node");
                let mut i = 0u64;
                while !s.load(Ordering::Relaxed) {
                    i += 1;
                    let (key, value) = (format!("{prefix}-{i:06}"), format!("value-{i}"));
                    let w = (i as usize) % clients.len();
                    if !put(&mut clients[w], &key, &value).await {
                        f.fetch_add(1, Ordering::Relaxed);
                        mb.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    a.lock().unwrap().push((key.clone(), value.clone()));
                    // Read it back through another node, and an older acknowledged key too.
                    let older = {
                        let acked = a.lock().unwrap();
                        acked[(i as usize * 7919) % acked.len()].clone()
                    };
                    // A steady stream, not a flood: the cluster shares two cores with the
                    // other tests.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    for (k, v) in [(key, value), older] {
                        let r = (w + 1) % clients.len();
                        match get(&mut clients[r], &k).await {
                            Some(values) if values.contains(&v) => {}
                            Some(_) => m.lock().unwrap().push(k),
                            None => {
                                f.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            });
        });
        Load {
            stop,
            acked,
            missed,
            failed,
            maybe,
            thread: Some(thread),
        }
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Stops the load; returns the acknowledged writes and how many writes failed (each may or
    /// may not have been applied).
    fn finish(mut self) -> (Vec<(String, String)>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("the load thread");
        }
        let missed = self.missed.lock().unwrap().clone();
        assert!(
            missed.is_empty(),
            "quorum reads missed acknowledged writes: {missed:?}"
        );
        eprintln!(
            "load: {} writes acknowledged, {} requests failed",
            self.acked(),
            self.failed.load(Ordering::Relaxed)
        );
        (
            self.acked.lock().unwrap().clone(),
            self.maybe.load(Ordering::Relaxed),
        )
    }
}

fn status(c: &Cluster, i: usize) -> ClusterStatusResponse {
    let addr = c.addr(i);
    runtime().block_on(async move {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .expect("connect for the status");
        AdminClient::new(channel)
            .cluster_status(ClusterStatusRequest {})
            .await
            .expect("cluster status")
            .into_inner()
    })
}

fn keys_on(c: &Cluster, i: usize) -> u64 {
    let addr = c.addr(i);
    runtime().block_on(async move {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .expect("connect for the node status");
        AdminClient::new(channel)
            .node_status(NodeStatusRequest {})
            .await
            .expect("node status")
            .into_inner()
            .keys
    })
}

/// `dynakv cluster ARGS -e <node i> -o json`, allowed to run as long as a ring change may.
fn admin(c: &Cluster, i: usize, args: &[&str]) -> common::Out {
    let ep = c.addr(i);
    let mut all = vec!["cluster"];
    all.extend_from_slice(args);
    all.extend(["-e", &ep, "-o", "json"]);
    match dynakv_within(&all, b"", CHANGE_TIMEOUT + Duration::from_secs(30)) {
        Ok(out) | Err(out) => out,
    }
}

fn member<'a>(s: &'a ClusterStatusResponse, id: &str) -> &'a dynakv_node::proto::Member {
    s.members
        .iter()
        .find(|m| m.id == id)
        .unwrap_or_else(|| panic!("{id} is not in the status: {s:?}"))
}

/// Loads `count` keys of `size` bytes with `dynakv bench --load-only`.
fn preload(c: &Cluster, prefix: &str, count: u64, size: usize) {
    let eps = c.endpoints();
    let out = dynakv_within(
        &[
            "bench",
            "--load-only",
            "--keys",
            &count.to_string(),
            "--key-prefix",
            prefix,
            "--value-size",
            &size.to_string(),
            "--clients",
            "16",
            "--no-progress",
            "-e",
            &eps,
            "-o",
            "json",
        ],
        b"",
        Duration::from_secs(120),
    )
    .unwrap_or_else(|o| panic!("bench load timed out: {o:?}"));
    assert_eq!(out.code, 0, "bench load failed: {out:?}");
}

/// Every preloaded key (bench names them `<prefix><12 digits>`) and every acknowledged write is
/// readable with a quorum read.
fn check_everything_readable(c: &Cluster, prefix: &str, count: u64, acked: &[(String, String)]) {
    use futures::StreamExt;
    let eps: Vec<String> = (0..c.spec.nodes).map(|i| c.addr(i)).collect();
    let mut expected: Vec<(String, Option<String>)> = (0..count)
        .map(|i| (format!("{prefix}{i:012}"), None))
        .collect();
    expected.extend(acked.iter().map(|(k, v)| (k.clone(), Some(v.clone()))));
    runtime().block_on(async move {
        let client = kv(&eps[0]).await.expect("connect");
        let lost: Vec<_> = futures::stream::iter(expected)
            .map(|(key, value)| {
                let mut client = client.clone();
                async move {
                    // A failed request (a timeout on a starved machine) is not a lost key: ask
                    // again a few times; only an answer can say "lost".
                    let mut got = get(&mut client, &key).await;
                    for _ in 0..5 {
                        if got.is_some() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        got = get(&mut client, &key).await;
                    }
                    let ok = match (&got, &value) {
                        (Some(v), None) => !v.is_empty(),
                        (Some(v), Some(want)) => v.contains(want),
                        (None, _) => false,
                    };
                    (!ok).then_some((key, got))
                }
            })
            .buffer_unordered(16)
            .filter_map(|x| async move { x })
            .collect()
            .await;
        assert!(
            lost.is_empty(),
            "keys lost (Some: the values read) or unreadable (None: six requests failed): {lost:?}"
        );
    });
}

#[test]
fn a_cluster_grows_by_ramps_and_shrinks_by_drains_under_load_losing_nothing() {
    let started = std::time::Instant::now();
    let phase = |what: &str| eprintln!("[{:>6.1}s] {what}", started.elapsed().as_secs_f64());
    let mut c = ClusterSpec::new(3).n(3).spares(2).start();
    preload(&c, "pre-", 1500, 200);
    let load = Load::start((0..3).map(|i| c.addr(i)).collect(), "live");
    wait_until("the load writes", Duration::from_secs(30), || {
        (load.acked() > 20).then_some(())
    });

    // Grow: two nodes join through seeds at weight 0, then are ramped in.
    for (i, id) in [(3, "n4"), (4, "n5")] {
        c.join(i);
        wait_until(&format!("{id} joins at weight 0"), CHANGE_TIMEOUT, || {
            let s = status(&c, 0);
            s.members
                .iter()
                .find(|m| m.id == id && m.state == "alive")
                .map(|m| (m.weight, m.lifecycle.clone()))
                .filter(|(w, l)| *w == 0 && l == "joining")
        });
        phase(&format!("{id} joined at weight 0"));
        let out = admin(&c, 0, &["join", id, "--step", "50"]);
        phase(&format!("{id} ramped to 100"));
        assert_eq!(out.code, 0, "join {id}: {out:?}");
        assert_eq!(
            out.json["rebalance"]["active"],
            Value::Bool(false),
            "{out:?}"
        );
        let s = status(&c, 1);
        assert_eq!(member(&s, id).weight, 100);
        assert_eq!(member(&s, id).lifecycle, "normal");
    }
    let grown = status(&c, 2);
    assert_eq!(grown.members.len(), 5);
    for m in &grown.members {
        assert_eq!((m.weight, m.lifecycle.as_str()), (100, "normal"), "{m:?}");
        assert!(m.replica_ownership > 0.1, "{m:?}");
    }
    let held = (keys_on(&c, 3), keys_on(&c, 4));
    let written = 1500 + load.acked() as u64 + load.maybe.load(Ordering::Relaxed);
    eprintln!("n4 and n5 hold {held:?} of {written} keys");
    assert!(held.0 > 0 && held.1 > 0, "the new nodes hold keys");
    assert!(
        held.0 <= written && held.1 <= written,
        "no node holds more keys than were written"
    );

    // Shrink: drain the two new nodes again.
    for id in ["n5", "n4"] {
        let out = admin(&c, 0, &["leave", id, "--wait"]);
        phase(&format!("{id} left"));
        assert_eq!(out.code, 0, "leave {id}: {out:?}");
        let s = status(&c, 0);
        assert_eq!(member(&s, id).lifecycle, "left");
        assert_eq!(member(&s, id).weight, 0);
    }
    let (acked, maybe) = load.finish();
    assert!(acked.len() > 20, "the load kept writing");

    // Drained nodes hold nothing; the three that stay hold every key (n = 3): the same keys on
    // each, every acknowledged one among them (a failed write may or may not have been applied).
    for i in [3, 4] {
        wait_until(
            &format!("{} drops what it handed over", c.nodes[i].id),
            CHANGE_TIMEOUT,
            || (keys_on(&c, i) == 0).then_some(()),
        );
    }
    phase("drained nodes hold nothing");
    let total = 1500 + acked.len() as u64;
    wait_until(
        &format!("n1, n2 and n3 each hold the {total} keys (+ up to {maybe} failed writes)"),
        CHANGE_TIMEOUT,
        || {
            let held: Vec<u64> = (0..3).map(|i| keys_on(&c, i)).collect();
            (held.iter().all(|k| *k == held[0]) && (total..=total + maybe).contains(&held[0]))
                .then_some(())
        },
    );
    phase("every node holds every key");
    check_everything_readable(&c, "pre-", 1500, &acked);
    phase("everything readable");
    let metrics = c.metrics(0);
    assert!(
        metric_value(
            &metrics,
            "dynakv_ring_changes_committed_total",
            &["kind=\"leave\""]
        )
        .is_some()
            || metric_value(&c.metrics(3), "dynakv_ring_changes_committed_total", &[]).is_some(),
        "ring changes are counted"
    );
}

/// A cluster whose handoffs are slow (a low rate limit), so a test can act mid-stream.
fn slow_handoff_cluster() -> Cluster {
    let c = ClusterSpec::new(3)
        .n(3)
        .spares(1)
        .config_yaml(
            "handoff:\n  max_bytes_per_sec: 65536\n  page_entries: 32\n  page_bytes: 16384\n",
        )
        .start();
    preload(&c, "slow-", 1500, 512);
    c
}

/// Starts n4's join to weight 100 and waits until it is streaming with some keys received.
fn join_until_streaming(c: &mut Cluster) {
    c.join(3);
    wait_until("n4 is known", CHANGE_TIMEOUT, || {
        status(c, 0)
            .members
            .iter()
            .any(|m| m.id == "n4" && m.state == "alive")
            .then_some(())
    });
    let out = admin(c, 0, &["weight", "n4", "100"]);
    assert_eq!(out.code, 0, "{out:?}");
    wait_until("n4 streams its ranges", CHANGE_TIMEOUT, || {
        let s = status(c, 0);
        let r = s.rebalance.unwrap_or_default();
        (r.active && r.phase == "streaming" && r.keys_done > 50).then_some(())
    });
}

fn wait_for_weight(c: &Cluster, at: usize, id: &str, weight: u32) {
    wait_until(
        &format!("{id} reaches weight {weight}"),
        CHANGE_TIMEOUT * 2,
        || {
            let s = status(c, at);
            let m = s.members.iter().find(|m| m.id == id)?;
            let settled = !s.rebalance.as_ref().is_some_and(|r| r.active);
            (m.weight == weight && settled).then_some(())
        },
    );
}

#[test]
fn a_handoff_resumes_after_the_receiving_node_is_killed_mid_stream() {
    let mut c = slow_handoff_cluster();
    join_until_streaming(&mut c);
    c.kill(3);
    c.join(3);
    wait_for_weight(&c, 0, "n4", 100);
    // After the restart n4 pulled only what its recorded progress did not cover.
    let received = metric_value(
        &c.metrics(3),
        "dynakv_handoff_keys_total",
        &["direction=\"received\""],
    )
    .unwrap_or(0.0);
    let held = keys_on(&c, 3);
    assert!(held > 0, "n4 holds its share");
    assert!(
        (received as u64) < held,
        "n4 resumed (received {received} keys after its restart, holds {held})"
    );
    check_everything_readable(&c, "slow-", 1500, &[]);
}

#[test]
fn a_handoff_completes_after_a_sending_node_is_killed_mid_stream() {
    let started = std::time::Instant::now();
    let phase = |what: &str| eprintln!("[{:>6.1}s] {what}", started.elapsed().as_secs_f64());
    let mut c = slow_handoff_cluster();
    join_until_streaming(&mut c);
    phase("streaming");
    c.kill(1);
    std::thread::sleep(Duration::from_millis(500));
    c.restart(1);
    phase("n2 restarted");
    wait_for_weight(&c, 0, "n4", 100);
    phase("n4 at 100");
    assert!(keys_on(&c, 3) > 0, "n4 holds its share");
    let retries = status(&c, 0);
    assert!(!retries.rebalance.unwrap_or_default().active);
    check_everything_readable(&c, "slow-", 1500, &[]);
}

#[test]
fn admin_requests_that_cannot_be_honoured_are_refused_and_change_nothing() {
    let c = ClusterSpec::new(3).n(3).start();
    let before = status(&c, 0);
    let unchanged = |what: &str| {
        let after = status(&c, 1);
        assert_eq!(
            after.ring_version, before.ring_version,
            "{what} changed the ring"
        );
        for m in &before.members {
            let now = member(&after, &m.id);
            assert_eq!(
                (now.weight, now.target_weight, &now.lifecycle),
                (m.weight, m.target_weight, &m.lifecycle),
                "{what} changed {}",
                m.id
            );
        }
        assert!(
            !after.rebalance.unwrap_or_default().active,
            "{what} started a change"
        );
    };
    for (args, code, needle) in [
        (
            vec!["weight", "n1", "1001"],
            "INVALID_ARGUMENT",
            "out of range",
        ),
        (
            vec!["weight", "n9", "50"],
            "INVALID_ARGUMENT",
            "not a member",
        ),
        (vec!["weight", "bad id!", "50"], "INVALID_ARGUMENT", "node"),
        (vec!["weight", "n1", "0"], "FAILED_PRECONDITION", "N=3"),
        (vec!["leave", "n2"], "FAILED_PRECONDITION", "N=3"),
        (vec!["remove", "n3"], "FAILED_PRECONDITION", "not down"),
        (vec!["remove", "n9"], "INVALID_ARGUMENT", "not a member"),
    ] {
        let out = admin(&c, 0, &args);
        assert_eq!(out.code, 3, "{args:?}: {out:?}");
        assert_eq!(out.error_code(), code, "{args:?}: {out:?}");
        assert!(
            out.error_message().contains(needle),
            "{args:?}: message {:?} should say {needle:?}",
            out.error_message()
        );
        unchanged(&format!("{args:?}"));
    }
    // Asking for what is already so is a success that changes nothing.
    let out = admin(&c, 2, &["weight", "n1", "100"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json["changed"], Value::Bool(false), "{out:?}");
    unchanged("an idempotent weight");
}

#[test]
fn a_node_gone_for_good_is_removed_and_its_ranges_re_replicated() {
    let mut c = ClusterSpec::new(4).n(3).start();
    preload(&c, "rm-", 1000, 200);
    c.kill(3);
    wait_until("n4 is down", CHANGE_TIMEOUT, || {
        (member(&status(&c, 0), "n4").state == "down").then_some(())
    });
    let out = admin(&c, 0, &["remove", "n4", "--wait"]);
    assert_eq!(out.code, 0, "{out:?}");
    let s = status(&c, 1);
    assert_eq!(member(&s, "n4").lifecycle, "removed");
    assert!(!s.rebalance.clone().unwrap_or_default().active);
    // The three that stay hold every key again (n = 3), as the survivors copied them.
    for i in 0..3 {
        wait_until(
            &format!("{} holds every key", c.nodes[i].id),
            CHANGE_TIMEOUT,
            || (keys_on(&c, i) == 1000).then_some(()),
        );
    }
    check_everything_readable(&c, "rm-", 1000, &[]);
    // Removing it again is a no-op that says so.
    let again = admin(&c, 2, &["remove", "n4"]);
    assert_eq!(again.code, 0, "{again:?}");
    assert_eq!(again.json["changed"], Value::Bool(false), "{again:?}");
}

/// A node of weight 0 may have a view of the ring the cluster has moved past (a change can
/// commit without a member its proposer never heard of), so it coordinates no reads: it has a
/// member that owns part of the ring do it, and refuses requests other nodes forward to it,
/// doing nothing. Once it owns part of the ring it reads for itself.
#[test]
fn a_node_of_weight_zero_forwards_its_reads_and_refuses_forwarded_requests() {
    let mut c = ClusterSpec::new(3).n(3).spares(1).start();
    c.join(3);
    wait_until("n4 joins at weight 0", CHANGE_TIMEOUT, || {
        status(&c, 0)
            .members
            .iter()
            .any(|m| m.id == "n4" && m.state == "alive" && m.weight == 0)
            .then_some(())
    });
    let (n1, n4) = (c.addr(0), c.addr(3));
    runtime().block_on(async {
        let mut at_n1 = kv(&n1).await.expect("n1 answers");
        let mut at_n4 = kv(&n4).await.expect("n4 answers");
        assert!(put(&mut at_n1, "zero-key", "v1").await);
        let read = |forwarded: bool| {
            let mut req = tonic::Request::new(GetRequest {
                key: b"zero-key".to_vec().into(),
                consistency: consistency(),
            });
            if forwarded {
                req.metadata_mut()
                    .insert(dynakv_node::kv::FORWARDED_HEADER, "1".parse().unwrap());
            }
            req
        };

        let r = at_n4
            .get(read(false))
            .await
            .expect("a read via n4")
            .into_inner();
        let values: Vec<&[u8]> = r.values.iter().map(|s| s.value.as_ref()).collect();
        assert_eq!(values, [b"v1".as_slice()]);
        let receipt = r.receipt.expect("a receipt");
        assert!(receipt.forwarded, "{receipt:?}");
        assert_ne!(receipt.coordinator, "n4", "{receipt:?}");
        let forwarded = metric_value(&c.metrics(3), "dynakv_forwarded_requests_total", &[]);
        assert!(forwarded >= Some(1.0), "{forwarded:?}");

        let refused = at_n4.get(read(true)).await.expect_err("refused");
        assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
        assert!(
            refused.message().contains("owns no part of the ring"),
            "{refused:?}"
        );
        assert!(
            refused
                .metadata()
                .contains_key(dynakv_node::kv::NOT_COORDINATING_HEADER)
        );
        let mut write = tonic::Request::new(PutRequest {
            key: b"zero-key".to_vec().into(),
            value: b"v2".to_vec().into(),
            context: Default::default(),
            consistency: consistency(),
        });
        write
            .metadata_mut()
            .insert(dynakv_node::kv::FORWARDED_HEADER, "1".parse().unwrap());
        let refused = at_n4.put(write).await.expect_err("refused");
        assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
        assert!(refused.message().contains("was not applied"), "{refused:?}");
        assert_eq!(
            get(&mut at_n1, "zero-key").await,
            Some(vec!["v1".to_string()]),
            "the refused write changed nothing"
        );

        let r = at_n1
            .get(read(false))
            .await
            .expect("a read via n1")
            .into_inner();
        assert!(!r.receipt.expect("a receipt").forwarded);
    });

    // Ramped in, n4 coordinates its own reads.
    let out = admin(&c, 0, &["weight", "n4", "100", "--wait"]);
    assert_eq!(out.code, 0, "{out:?}");
    wait_for_weight(&c, 3, "n4", 100);
    runtime().block_on(async {
        let mut at_n4 = kv(&n4).await.expect("n4 answers");
        let r = at_n4
            .get(GetRequest {
                key: b"zero-key".to_vec().into(),
                consistency: consistency(),
            })
            .await
            .expect("a read via n4")
            .into_inner();
        let receipt = r.receipt.expect("a receipt");
        assert!(!receipt.forwarded, "{receipt:?}");
        assert_eq!(receipt.coordinator, "n4");
    });
}
