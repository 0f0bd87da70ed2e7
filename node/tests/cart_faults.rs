//! The shopping-cart fault test: a real 5-node cluster (n=3, W=R=QUORUM, sloppy quorum) under a
//! concurrent read-modify-write cart workload, while nodes are SIGKILLed and restarted and
//! SIGSTOPped and resumed (never more than one at a time, so a quorum is always possible).
//!
//! Workload (gRPC, straight to random nodes):
//! - cart clients loop: Get(R=QUORUM) -> union of the items of every sibling -> add a fresh,
//!   unique item -> Put with the read's context. Every acknowledged Put is an acknowledged add.
//! - a deleter writes "gone" keys (two concurrent blind puts each, so two siblings), reads them
//!   until both siblings show, and deletes them with that context. Those keys are never written
//!   again, so once a delete is acknowledged nothing of them may ever come back.
//!
//! After the faults stop and every node runs again:
//! 1. `dynakv cluster roots` must report identical replicas within a bounded wait;
//! 2. every node is killed and its redb file read directly: each key is held by exactly its n
//!    primaries (computed from the ring), in byte-identical versions; every acknowledged add is in
//!    every replica's cart; no deleted key has a live value anywhere;
//! 3. the nodes restart and every cart is read at R=ALL: every acknowledged add is there (union of
//!    siblings), nothing was invented, every deleted key has no values;
//! 4. no node crashed or panicked.
//!
//! The faults and the workload come from one seed: `DYNAKV_CART_SEED` (decimal or 0x-hex, or
//! `random`), else a fixed default. `DYNAKV_CART_SECS` overrides the workload's length. On failure
//! the seed, the fault log and every violation are printed (and the harness prints node logs).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use dynakv_core::NodeId;
use dynakv_core::dvvset::Clock;
use dynakv_core::hash::key_position;
use dynakv_core::ring::{Member, Ring};
use dynakv_node::node::split_data_key;
use dynakv_node::proto::kv_client::KvClient;
use dynakv_node::proto::{self, ConsistencyLevel, quorum};
use dynakv_node::storage::{Backend, RedbBackend, ScanLimit, Table};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tonic::transport::{Channel, Endpoint};

const NODES: usize = 5;
const N: usize = 3;
/// `replication.vnodes_per_node` default, to compute the preference lists for the disk check.
const VNODES_PER_NODE: u32 = 64;
const DEFAULT_SEED: u64 = 0x5eed_ca27;
/// Deadline the client gives the cluster (Consistency.timeout_ms).
const REQUEST_TIMEOUT_MS: u32 = 2000;
/// Longest the client waits for an answer at all (a frozen node answers nothing).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound of the wait for `cluster roots` to say identical once the faults stop.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);

const AE_ONLY: &str = "anti_entropy:\n  interval_ms: 1000\n";
/// Tombstones purged seconds after the delete (repair-gated), hints dropped after 2 s.
const FAST_GC: &str = "anti_entropy:\n  interval_ms: 1000\n\
hints:\n  max_age_ms: 2000\n\
tombstone_gc:\n  grace_ms: 3000\n  interval_ms: 500\n";

#[derive(Debug, Clone)]
struct Params {
    workload: Duration,
    carts: usize,
    clients: usize,
    gone_keys: usize,
    config_yaml: &'static str,
}

#[test]
// Fails on most runs (not all) until the bug behind
// puts_cancelled_by_the_client_leave_replicas_and_merkle_trees_consistent is fixed: `cluster
// roots` never becomes identical after the faults, although the stored replicas are.
fn acknowledged_cart_adds_survive_kills_and_pauses_and_deletes_stay_deleted() {
    run(Params {
        workload: Duration::from_secs(20),
        carts: 20,
        clients: 8,
        gone_keys: 25,
        config_yaml: AE_ONLY,
    });
}

#[test]
#[ignore = "soak: 3 minutes of faults; run with --run-ignored"]
fn soak_cart_faults_three_minutes() {
    run(Params {
        workload: Duration::from_secs(180),
        carts: 40,
        clients: 16,
        gone_keys: 200,
        config_yaml: AE_ONLY,
    });
}

#[test]
#[ignore = "variant: tombstones purged after 3 s (repair-gated GC) during the faults"]
fn cart_faults_with_fast_tombstone_gc() {
    run(Params {
        workload: Duration::from_secs(30),
        carts: 20,
        clients: 8,
        gone_keys: 40,
        config_yaml: FAST_GC,
    });
}

// ------------------------------------------------------------------------------------------------
// What the workload records.

/// An acknowledged add (`at_ms` and `receipt` are printed when the add goes missing).
#[derive(Debug, Clone)]
#[allow(dead_code)]
struct Add {
    cart: usize,
    item: String,
    at_ms: u64,
    receipt: String,
}

/// A key whose delete was acknowledged.
#[derive(Debug, Clone)]
struct Gone {
    key: String,
    at_ms: u64,
    receipt: String,
    /// What the deleter did to the key, with receipts, for the report.
    history: Vec<String>,
}

#[derive(Default)]
struct Record {
    adds: Vec<Add>,
    /// Every item ever sent in a Put, acknowledged or not (a failed Put may still be applied).
    attempted: BTreeSet<String>,
    gone: Vec<Gone>,
    /// Gone keys that are not checked, and why (a put failed, the siblings never showed, ...).
    unchecked_gone: Vec<String>,
    /// "op outcome" -> count.
    outcomes: BTreeMap<String, u64>,
}

impl Record {
    fn count(&mut self, what: String) {
        *self.outcomes.entry(what).or_default() += 1;
    }
}

struct Shared {
    t0: Instant,
    stop: AtomicBool,
    record: Mutex<Record>,
}

impl Shared {
    fn ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }
    fn count(&self, op: &str, outcome: &str) {
        self.record.lock().unwrap().count(format!("{op} {outcome}"));
    }
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// Prints the seed and the fault log if the test panics anywhere (a node that never comes back,
/// a harness timeout), not only at the final verdict.
struct PanicReport {
    seed: u64,
    faults: Arc<Mutex<Vec<String>>>,
    /// Set once the final verdict printed all of this itself.
    reported: bool,
}

impl Drop for PanicReport {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.reported {
            let faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
            eprintln!(
                "===== cart fault test failed: replay with DYNAKV_CART_SEED={} =====\nfault log:\n{}",
                self.seed,
                faults.join("\n")
            );
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Client side.

fn cart_key(cart: usize) -> String {
    format!("cart-{cart:02}")
}

fn gone_key(i: usize) -> String {
    format!("gone-{i:03}")
}

fn level(l: ConsistencyLevel) -> Option<proto::Quorum> {
    Some(proto::Quorum {
        value: Some(quorum::Value::Level(l as i32)),
    })
}

fn consistency(r: Option<ConsistencyLevel>, sloppy: Option<bool>) -> Option<proto::Consistency> {
    Some(proto::Consistency {
        r: r.and_then(level),
        w: None, // the cluster default: QUORUM
        sloppy,
        timeout_ms: REQUEST_TIMEOUT_MS,
    })
}

/// The items of a cart value ("a,b,c").
fn items_of(value: &[u8]) -> impl Iterator<Item = String> + '_ {
    std::str::from_utf8(value)
        .unwrap_or("<not utf-8>")
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

fn union_of<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> BTreeSet<String> {
    values.into_iter().flat_map(items_of).collect()
}

fn receipt_text(r: Option<&proto::Receipt>) -> String {
    let Some(r) = r else {
        return "no receipt".into();
    };
    let replicas: Vec<String> = r
        .replicas
        .iter()
        .map(|p| {
            let mut s = p.node.clone();
            if !p.hint_for.is_empty() {
                write!(s, "(for {})", p.hint_for).unwrap();
            } else if p.fallback {
                s.push_str("(fallback)");
            }
            if p.ok {
                s.push_str(" ok");
            } else {
                write!(s, " {}", p.error).unwrap();
            }
            s
        })
        .collect();
    format!(
        "coordinator {}{} got {}/{} [{}] siblings {}",
        r.coordinator,
        if r.forwarded { " (forwarded)" } else { "" },
        r.got,
        r.needed,
        replicas.join(", "),
        r.siblings
    )
}

/// The first message seen for each error code, for the summary.
static ERROR_EXAMPLES: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());

fn code_name(s: &tonic::Status) -> String {
    let code = format!("{:?}", s.code());
    ERROR_EXAMPLES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(code.clone())
        .or_insert_with(|| s.message().chars().take(200).collect());
    code
}

/// A read; `strict` counts only the key's primaries toward R (no fallbacks).
async fn kv_get(
    ch: &Channel,
    key: &str,
    r: ConsistencyLevel,
    strict: bool,
) -> Result<proto::GetResponse, String> {
    let mut client = KvClient::new(ch.clone());
    let req = proto::GetRequest {
        key: Bytes::copy_from_slice(key.as_bytes()),
        consistency: consistency(Some(r), strict.then_some(false)),
    };
    match tokio::time::timeout(CLIENT_TIMEOUT, client.get(req)).await {
        Ok(Ok(resp)) => Ok(resp.into_inner()),
        Ok(Err(s)) => Err(code_name(&s)),
        Err(_) => Err("ClientTimeout".into()),
    }
}

async fn kv_put(
    ch: &Channel,
    key: &str,
    value: String,
    context: Bytes,
) -> Result<proto::PutResponse, String> {
    let mut client = KvClient::new(ch.clone());
    let req = proto::PutRequest {
        key: Bytes::copy_from_slice(key.as_bytes()),
        value: Bytes::from(value.into_bytes()),
        context,
        consistency: consistency(None, None),
    };
    match tokio::time::timeout(CLIENT_TIMEOUT, client.put(req)).await {
        Ok(Ok(resp)) => Ok(resp.into_inner()),
        Ok(Err(s)) => Err(code_name(&s)),
        Err(_) => Err("ClientTimeout".into()),
    }
}

async fn kv_delete(
    ch: &Channel,
    key: &str,
    context: Bytes,
) -> Result<proto::DeleteResponse, String> {
    let mut client = KvClient::new(ch.clone());
    let req = proto::DeleteRequest {
        key: Bytes::copy_from_slice(key.as_bytes()),
        context,
        consistency: consistency(None, None),
    };
    match tokio::time::timeout(CLIENT_TIMEOUT, client.delete(req)).await {
        Ok(Ok(resp)) => Ok(resp.into_inner()),
        Ok(Err(s)) => Err(code_name(&s)),
        Err(_) => Err("ClientTimeout".into()),
    }
}

/// Back-off after a failed request, so a dead node does not turn a client into a busy loop.
async fn pause_after_failure(rng: &mut SmallRng) {
    tokio::time::sleep(Duration::from_millis(rng.random_range(20..80))).await;
}

/// One cart client: read, add a fresh item, write with the read's context; forever.
async fn cart_client(
    id: usize,
    seed: u64,
    carts: usize,
    channels: Arc<Vec<Channel>>,
    shared: Arc<Shared>,
) {
    let mut rng =
        SmallRng::seed_from_u64(seed ^ (0x1000 + id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut seq = 0u64;
    while !shared.stopped() {
        let cart = rng.random_range(0..carts);
        let key = cart_key(cart);
        let read_at = &channels[rng.random_range(0..channels.len())];
        let read = match kv_get(read_at, &key, ConsistencyLevel::Quorum, false).await {
            Ok(r) => {
                shared.count("get", "ok");
                r
            }
            Err(e) => {
                shared.count("get", &e);
                pause_after_failure(&mut rng).await;
                continue;
            }
        };
        let mut items = union_of(read.values.iter().map(|s| s.value.as_ref()));
        let item = format!("c{id}.{seq}");
        seq += 1;
        items.insert(item.clone());
        let value = items.into_iter().collect::<Vec<_>>().join(",");
        shared.record.lock().unwrap().attempted.insert(item.clone());
        let write_at = &channels[rng.random_range(0..channels.len())];
        match kv_put(write_at, &key, value, read.context).await {
            Ok(resp) => {
                let at_ms = shared.ms();
                let mut rec = shared.record.lock().unwrap();
                rec.count("put ok".into());
                rec.adds.push(Add {
                    cart,
                    item,
                    at_ms,
                    receipt: receipt_text(resp.receipt.as_ref()),
                });
            }
            Err(e) => {
                shared.count("put", &e);
                pause_after_failure(&mut rng).await;
            }
        }
    }
}

/// Writes each gone key as two concurrent siblings (blind puts, each issued exactly once), reads
/// until both show, deletes with that context until acknowledged.
async fn deleter(seed: u64, keys: usize, channels: Arc<Vec<Channel>>, shared: Arc<Shared>) {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0xde1e_7e00);
    let random_node = |rng: &mut SmallRng| channels[rng.random_range(0..channels.len())].clone();
    'keys: for i in 0..keys {
        if shared.stopped() {
            break;
        }
        let key = gone_key(i);
        let unchecked = |why: String| {
            shared
                .record
                .lock()
                .unwrap()
                .unchecked_gone
                .push(format!("{key}: {why}"));
        };
        let expected: BTreeSet<String> = [format!("{key}.a"), format!("{key}.b")].into();
        let mut history = Vec::new();
        for v in &expected {
            let at = shared.ms();
            match kv_put(&random_node(&mut rng), &key, v.clone(), Bytes::new()).await {
                Ok(resp) => {
                    shared.count("gone-put", "ok");
                    history.push(format!(
                        "t={at}ms put {v}: ok after {}ms, {}",
                        shared.ms() - at,
                        receipt_text(resp.receipt.as_ref())
                    ));
                }
                Err(e) => {
                    shared.count("gone-put", &e);
                    unchecked(format!("put of {v} failed ({e})"));
                    continue 'keys;
                }
            }
        }
        let mut context = None;
        let mut last = String::new();
        for _ in 0..30 {
            if shared.stopped() {
                break;
            }
            let at = shared.ms();
            let read = kv_get(
                &random_node(&mut rng),
                &key,
                ConsistencyLevel::Quorum,
                false,
            )
            .await;
            match read {
                Ok(r) => {
                    let values: Vec<String> = r
                        .values
                        .iter()
                        .map(|s| {
                            format!("{}@{}", String::from_utf8_lossy(&s.value), hlc(s.timestamp))
                        })
                        .collect();
                    let seen: BTreeSet<String> = r
                        .values
                        .iter()
                        .map(|s| String::from_utf8_lossy(&s.value).into_owned())
                        .collect();
                    history.push(format!(
                        "t={at}ms get: {values:?}, {}",
                        receipt_text(r.receipt.as_ref())
                    ));
                    if seen == expected {
                        context = Some(r.context);
                        break;
                    }
                    last = format!("read {seen:?}");
                }
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let Some(context) = context else {
            unchecked(format!(
                "both siblings never showed in a quorum read (last: {last})"
            ));
            continue;
        };
        let mut deleted = false;
        for _ in 0..30 {
            if shared.stopped() {
                break;
            }
            let at = shared.ms();
            match kv_delete(&random_node(&mut rng), &key, context.clone()).await {
                Ok(resp) => {
                    let at_ms = shared.ms();
                    let receipt = receipt_text(resp.receipt.as_ref());
                    history.push(format!(
                        "t={at}ms delete: ok after {}ms, {receipt}",
                        at_ms - at
                    ));
                    let mut rec = shared.record.lock().unwrap();
                    rec.count("delete ok".into());
                    rec.gone.push(Gone {
                        key: key.clone(),
                        at_ms,
                        receipt,
                        history,
                    });
                    deleted = true;
                    break;
                }
                Err(e) => {
                    history.push(format!("t={at}ms delete: {e}"));
                    shared.count("delete", &e);
                    pause_after_failure(&mut rng).await;
                }
            }
        }
        if !deleted {
            unchecked("no delete was acknowledged".into());
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..500))).await;
    }
}

// ------------------------------------------------------------------------------------------------
// The test.

fn seed() -> u64 {
    match std::env::var("DYNAKV_CART_SEED") {
        Err(_) => DEFAULT_SEED,
        Ok(s) if s.trim() == "random" => random_u64(),
        Ok(s) => {
            let s = s.trim();
            let parsed = match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            };
            parsed.unwrap_or_else(|e| panic!("DYNAKV_CART_SEED={s:?} is not a number: {e}"))
        }
    }
}

fn node_index(id: &str) -> usize {
    id.strip_prefix('n')
        .and_then(|n| n.parse::<usize>().ok())
        .map(|n| n - 1)
        .unwrap_or_else(|| panic!("unexpected node id {id}"))
}

/// The primaries of `key` (node indexes), as every node computes them from the static membership.
fn primaries(ring: &Ring, key: &str) -> BTreeSet<usize> {
    ring.preference_list(key_position(key.as_bytes()), N)
        .into_iter()
        .map(|i| node_index(ring.nodes()[i].id.as_str()))
        .collect()
}

fn names(nodes: &BTreeSet<usize>) -> String {
    nodes
        .iter()
        .map(|i| format!("n{}", i + 1))
        .collect::<Vec<_>>()
        .join(",")
}

/// Unix milliseconds at the workload's t=0, to show hybrid timestamps on the fault log's scale.
static T0_UNIX_MS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A hybrid timestamp (48 bits of Unix ms, 16 logical) as "t=<ms since the workload began>".
fn hlc(ts: u64) -> String {
    let ms = (ts >> 16) as i64 - *T0_UNIX_MS.get().unwrap_or(&0) as i64;
    format!("t={ms}ms")
}

/// Every entry of a clock: coordinator id, counter and its surviving values (short ones shown).
fn dots(clock: &Clock) -> String {
    let show = |s: &dynakv_core::dvvset::Sibling| match &s.data {
        None => format!("tombstone@{}", hlc(s.ts.as_u64())),
        Some(d) if d.len() <= 40 => {
            format!("{}@{}", String::from_utf8_lossy(d), hlc(s.ts.as_u64()))
        }
        Some(d) => format!("<{} bytes>@{}", d.len(), hlc(s.ts.as_u64())),
    };
    let mut out: Vec<String> = clock
        .entries()
        .iter()
        .map(|e| {
            let values: Vec<String> = e.values().iter().map(show).collect();
            format!(
                "({} counter {}: [{}])",
                e.id(),
                e.counter(),
                values.join(", ")
            )
        })
        .collect();
    if !clock.anonymous().is_empty() {
        let values: Vec<String> = clock.anonymous().iter().map(show).collect();
        out.push(format!("(anonymous: [{}])", values.join(", ")));
    }
    out.join(" ")
}

fn summarize(clock: &Clock) -> String {
    let live: Vec<String> = clock
        .live_values()
        .map(|s| {
            let items = s.data.as_deref().map(|d| items_of(d).count()).unwrap_or(0);
            format!("{items} items")
        })
        .collect();
    let tombstones = clock.values().filter(|s| s.is_tombstone()).count();
    format!(
        "{} live [{}], {} tombstones, digest {:032x}",
        live.len(),
        live.join(", "),
        tombstones,
        clock.digest()
    )
}

fn run(mut params: Params) {
    if let Ok(secs) = std::env::var("DYNAKV_CART_SECS") {
        params.workload = Duration::from_secs(secs.trim().parse().expect("DYNAKV_CART_SECS"));
    }
    let seed = seed();
    let faults: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut report = PanicReport {
        seed,
        faults: faults.clone(),
        reported: false,
    };
    eprintln!("cart fault test: seed {seed} (DYNAKV_CART_SEED), {params:?}");
    let test_started = Instant::now();

    let mut c = ClusterSpec::new(NODES)
        .n(N as u32)
        .config_yaml(params.config_yaml)
        .start();
    let started_in = test_started.elapsed();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let channels: Arc<Vec<Channel>> = {
        let _guard = rt.enter();
        Arc::new(
            (0..NODES)
                .map(|i| {
                    Endpoint::from_shared(format!("http://{}", c.addr(i)))
                        .expect("endpoint")
                        .connect_timeout(Duration::from_millis(500))
                        .timeout(CLIENT_TIMEOUT)
                        .tcp_nodelay(true)
                        .connect_lazy()
                })
                .collect(),
        )
    };

    // ---- workload + faults
    T0_UNIX_MS.get_or_init(unix_ms);
    let shared = Arc::new(Shared {
        t0: Instant::now(),
        stop: AtomicBool::new(false),
        record: Mutex::default(),
    });
    let mut tasks = Vec::new();
    for id in 0..params.clients {
        tasks.push(rt.spawn(cart_client(
            id,
            seed,
            params.carts,
            channels.clone(),
            shared.clone(),
        )));
    }
    tasks.push(rt.spawn(deleter(
        seed,
        params.gone_keys,
        channels.clone(),
        shared.clone(),
    )));

    let mut violations: Vec<String> = Vec::new();
    let mut rng = SmallRng::seed_from_u64(seed);
    let log = |what: String| {
        let line = format!("t={:>6}ms {what}", shared.ms());
        faults.lock().unwrap().push(line);
    };
    let check_crashes = |c: &mut Cluster, violations: &mut Vec<String>, when: &str| {
        for i in 0..NODES {
            if let Some(status) = c.exited(i) {
                violations.push(format!(
                    "n{} exited by itself ({status}) before {when}; log tail:\n{}",
                    i + 1,
                    c.log_tail(i, 40)
                ));
                log(format!("n{} found exited ({status}); restarting it", i + 1));
                c.restart(i);
            }
        }
    };
    let workload_end = shared.t0 + params.workload;
    // Let the workload warm up before the first fault.
    std::thread::sleep(Duration::from_millis(500));
    let mut fault_count = 0;
    while Instant::now() + Duration::from_millis(500) < workload_end {
        check_crashes(&mut c, &mut violations, "a fault");
        std::thread::sleep(Duration::from_millis(rng.random_range(200..1000)));
        let victim = rng.random_range(0..NODES);
        let down = Duration::from_millis(rng.random_range(1000..3000));
        fault_count += 1;
        if rng.random_bool(0.5) {
            log(format!("SIGKILL n{} (restart after {down:?})", victim + 1));
            c.kill(victim);
            std::thread::sleep(down);
            log(format!("restart n{}", victim + 1));
            c.restart(victim);
            log(format!("n{} serving again", victim + 1));
        } else {
            log(format!("SIGSTOP n{} for {down:?}", victim + 1));
            c.stop(victim);
            std::thread::sleep(down);
            c.cont(victim);
            log(format!("SIGCONT n{}", victim + 1));
        }
    }
    std::thread::sleep(workload_end.saturating_duration_since(Instant::now()));
    shared.stop.store(true, Ordering::SeqCst);
    log("faults and workload stopped".into());
    rt.block_on(async {
        for t in tasks {
            t.await.expect("a workload task panicked");
        }
    });
    check_crashes(&mut c, &mut violations, "the settle phase");
    let record = std::mem::take(&mut *shared.record.lock().unwrap());

    // ---- 1. anti-entropy brings every replica pair to identical roots
    let settle_started = Instant::now();
    let mut last_roots = None;
    let converged = loop {
        let out = c.cli(&["cluster", "roots"]);
        let reachable = out.json["nodes"]
            .as_array()
            .is_some_and(|ns| ns.len() == NODES && ns.iter().all(|n| n["reachable"] == true));
        // Hints still queued could change a primary after this check: wait for them too.
        let no_hints = out.json["nodes"].as_array().is_some_and(|ns| {
            ns.iter().all(|n| {
                n["hints"]
                    .as_array()
                    .is_none_or(|hs| hs.iter().all(|h| h["count"] == 0))
            })
        });
        if out.json["identical"] == true && reachable && no_hints {
            break true;
        }
        last_roots = Some(out);
        if settle_started.elapsed() > CONVERGE_TIMEOUT {
            break false;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let converged_in = settle_started.elapsed();
    log(format!(
        "cluster roots identical: {converged} after {converged_in:?}"
    ));
    if !converged {
        violations.push(format!(
            "replicas did not converge: `cluster roots` not identical (or hints still queued) within {CONVERGE_TIMEOUT:?}; last answer: {}",
            last_roots.map(|o| roots_summary(&o.json)).unwrap_or_default()
        ));
    }

    // ---- 2. every replica on disk: all nodes killed, each redb file read directly
    let members: Vec<Member> = (0..NODES)
        .map(|i| Member {
            id: NodeId::new(format!("n{}", i + 1)).unwrap(),
            weight: 100,
            zone: None,
        })
        .collect();
    let ring = Ring::balanced(&members, VNODES_PER_NODE, N);
    let mut adds_by_cart: BTreeMap<String, Vec<&Add>> = BTreeMap::new();
    for a in &record.adds {
        adds_by_cart.entry(cart_key(a.cart)).or_default().push(a);
    }
    let gone_keys: BTreeMap<&str, &Gone> =
        record.gone.iter().map(|g| (g.key.as_str(), g)).collect();
    c.kill_all();
    let disk = read_disks(&c);
    let mut keys_differing = 0;
    for (key, copies) in &disk.keys {
        let expected = primaries(&ring, key);
        let holders: BTreeSet<usize> = copies.keys().copied().collect();
        let detail = || {
            (0..NODES)
                .filter(|i| expected.contains(i) || copies.contains_key(i))
                .map(|i| match copies.get(&i) {
                    Some(c) => format!("n{}: {}", i + 1, summarize(c)),
                    None => format!("n{}: absent", i + 1),
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        let gone = gone_keys.get(key.as_str());
        // A purged tombstone (fast GC) is as good as a tombstone.
        let dead = |c: &Clock| c.live_values().next().is_none();
        let agree = if gone.is_some() {
            expected.iter().all(|i| copies.get(i).is_none_or(dead))
                || expected
                    .iter()
                    .map(|i| copies.get(i).map(Clock::to_bytes))
                    .collect::<BTreeSet<_>>()
                    .len()
                    == 1
        } else {
            holders.is_subset(&expected)
                && expected
                    .iter()
                    .map(|i| copies.get(i).map(Clock::to_bytes))
                    .collect::<BTreeSet<_>>()
                    .len()
                    == 1
        };
        if !agree {
            keys_differing += 1;
            violations.push(format!(
                "disk: the replicas of {key} differ (primaries {}): {}",
                names(&expected),
                detail()
            ));
        }
        if !holders.is_subset(&expected) {
            violations.push(format!(
                "disk: {key} is stored outside its preference list {}: {}",
                names(&expected),
                detail()
            ));
        }
        if let Some(acked) = adds_by_cart.get(key) {
            for i in &expected {
                let have = copies
                    .get(i)
                    .map(|c| union_of(c.live_values().filter_map(|s| s.data.as_deref())))
                    .unwrap_or_default();
                let missing: Vec<&&Add> =
                    acked.iter().filter(|a| !have.contains(&a.item)).collect();
                if !missing.is_empty() {
                    violations.push(format!(
                        "disk: n{} misses {} of {} acknowledged adds of {key} ({}); first: {:#?}",
                        i + 1,
                        missing.len(),
                        acked.len(),
                        detail(),
                        &missing[..missing.len().min(5)]
                    ));
                }
            }
        }
        if let Some(gone) = gone {
            let live_on: Vec<String> = copies
                .iter()
                .filter(|(_, c)| !dead(c))
                .map(|(i, _)| format!("n{}", i + 1))
                .collect();
            if !live_on.is_empty() {
                let replicas: Vec<String> = copies
                    .iter()
                    .map(|(i, c)| format!("  n{}: {}", i + 1, dots(c)))
                    .collect();
                violations.push(format!(
                    "disk: deleted key {key} has live values again on {} (primaries {}); stored versions:\n{}\n  what the deleter did:\n    {}",
                    live_on.join(","),
                    names(&expected),
                    replicas.join("\n"),
                    gone.history.join("\n    ")
                ));
            }
        }
    }
    for (key, acked) in &adds_by_cart {
        if !disk.keys.contains_key(key) {
            violations.push(format!(
                "disk: {key} ({} acknowledged adds) is stored on no node",
                acked.len()
            ));
        }
    }
    if !converged && keys_differing == 0 {
        violations.push(
            "`cluster roots` kept reporting differing replicas although every key is \
             byte-identical on its primaries on disk: the in-memory Merkle trees no longer match \
             the stored data (anti-entropy finds nothing to repair, so they never converge)"
                .into(),
        );
    }

    // ---- 3. restarted, every cart read at R=ALL, strict (only the primaries count)
    for i in 0..NODES {
        c.restart(i);
    }
    let read_deadline = Instant::now() + Duration::from_secs(30);
    let read_all = |key: &str| -> Result<proto::GetResponse, String> {
        let mut last = String::new();
        for attempt in 0.. {
            let ch = &channels[attempt % NODES];
            match rt.block_on(kv_get(ch, key, ConsistencyLevel::All, true)) {
                Ok(r) => return Ok(r),
                Err(e) => last = e,
            }
            if Instant::now() > read_deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(last)
    };
    let mut final_items = 0;
    for cart in 0..params.carts {
        let key = cart_key(cart);
        let read = match read_all(&key) {
            Ok(r) => r,
            Err(e) => {
                violations.push(format!(
                    "read of {key} at R=ALL failed after the restart: {e}"
                ));
                continue;
            }
        };
        let have = union_of(read.values.iter().map(|s| s.value.as_ref()));
        final_items += have.len();
        let acked = adds_by_cart.get(&key).map(Vec::as_slice).unwrap_or(&[]);
        let missing: Vec<&&Add> = acked.iter().filter(|a| !have.contains(&a.item)).collect();
        if !missing.is_empty() {
            violations.push(format!(
                "{key}: {} of {} acknowledged adds are not in the cart read at R=ALL ({} siblings, {} items; {}); first: {:#?}",
                missing.len(),
                acked.len(),
                read.values.len(),
                have.len(),
                receipt_text(read.receipt.as_ref()),
                &missing[..missing.len().min(5)]
            ));
        }
        let invented: Vec<&String> = have
            .iter()
            .filter(|i| !record.attempted.contains(*i))
            .collect();
        if !invented.is_empty() {
            violations.push(format!(
                "{key}: items nobody wrote: {:?}",
                &invented[..invented.len().min(5)]
            ));
        }
        if let Some(r) = &read.receipt {
            let answered: BTreeSet<usize> = r
                .replicas
                .iter()
                .filter(|p| p.ok && !p.fallback)
                .map(|p| node_index(&p.node))
                .collect();
            let expected = primaries(&ring, &key);
            if answered != expected {
                violations.push(format!(
                    "{key}: R=ALL was answered by {} but the test computed primaries {} \
                     (the disk check's preference lists are wrong, or the read used fallbacks)",
                    names(&answered),
                    names(&expected)
                ));
            }
        }
    }
    for gone in &record.gone {
        match read_all(&gone.key) {
            Ok(r) if r.values.is_empty() => {}
            Ok(r) => violations.push(format!(
                "deleted key {} came back: {:?} ({}); delete acked at t={}ms ({})",
                gone.key,
                r.values
                    .iter()
                    .map(|s| String::from_utf8_lossy(&s.value).into_owned())
                    .collect::<Vec<_>>(),
                receipt_text(r.receipt.as_ref()),
                gone.at_ms,
                gone.receipt
            )),
            Err(e) => violations.push(format!(
                "read of deleted key {} at R=ALL failed after the restart: {e}",
                gone.key
            )),
        }
    }

    // ---- 4. still identical after the restart; nobody crashed or panicked
    let identical_after = wait_roots_identical(&c, Duration::from_secs(30));
    if !identical_after {
        violations.push("`cluster roots` not identical after the final restart and reads".into());
    }
    check_crashes(&mut c, &mut violations, "the end");
    for i in 0..NODES {
        let panics: Vec<String> = c
            .log_text(i)
            .lines()
            .filter(|l| l.contains("panicked"))
            .map(str::to_string)
            .collect();
        if !panics.is_empty() {
            violations.push(format!(
                "n{} panicked: {:#?}",
                i + 1,
                &panics[..panics.len().min(5)]
            ));
        }
    }

    let purged = gone_keys
        .keys()
        .filter(|k| !disk.keys.contains_key(**k))
        .count();
    let summary = format!(
        "seed {seed}: {} faults over {:?}; {} acked adds ({} attempted) in {} carts, {} items in the \
         final carts; {} keys deleted ({} unchecked, {} purged from every node by the end); \
         outcomes {:?}; first error messages {:?}; cluster up in {started_in:?}, \
         roots identical: {converged} ({converged_in:?} after the faults); hints left at the end: [{}]; whole test {:?}",
        fault_count,
        params.workload,
        record.adds.len(),
        record.attempted.len(),
        params.carts,
        final_items,
        gone_keys.len(),
        record.unchecked_gone.len(),
        purged,
        record.outcomes,
        ERROR_EXAMPLES.lock().unwrap_or_else(|p| p.into_inner()),
        disk.hints_left.join(", "),
        test_started.elapsed(),
    );
    eprintln!("{summary}");
    if record.adds.len() < params.carts {
        violations.push(format!(
            "only {} adds were acknowledged: the workload did not run",
            record.adds.len()
        ));
    }
    if !violations.is_empty() {
        let n = violations.len();
        violations.truncate(40);
        let fault_log = faults.lock().unwrap().join("\n");
        report.reported = true;
        panic!(
            "{n} violations (replay with DYNAKV_CART_SEED={seed}):\n{}\n\nsummary: {summary}\n\
             unchecked gone keys: {:#?}\nfault log:\n{}",
            violations.join("\n\n"),
            record.unchecked_gone,
            fault_log
        );
    }
}

/// The differing pairs, unreachable nodes and queued hints of a `cluster roots -o json` answer.
fn roots_summary(json: &serde_json::Value) -> String {
    let mut parts = Vec::new();
    for p in json["pairs"].as_array().into_iter().flatten() {
        if p["state"] != "identical" {
            parts.push(format!(
                "{}<->{} {} ({} vs {})",
                p["a"].as_str().unwrap_or("?"),
                p["b"].as_str().unwrap_or("?"),
                p["state"].as_str().unwrap_or("?"),
                p["root_a"].as_str().unwrap_or("-"),
                p["root_b"].as_str().unwrap_or("-")
            ));
        }
    }
    for n in json["nodes"].as_array().into_iter().flatten() {
        let id = n["id"].as_str().unwrap_or("?");
        if n["reachable"] != true {
            parts.push(format!("{id} unreachable"));
        }
        for h in n["hints"].as_array().into_iter().flatten() {
            if h["count"] != 0 {
                parts.push(format!(
                    "{id} holds {} hints for {}",
                    h["count"], h["target"]
                ));
            }
        }
    }
    if parts.is_empty() {
        format!("{json}")
    } else {
        parts.join("; ")
    }
}

/// What every node's redb file holds after the kill.
struct Disks {
    /// client key -> node index -> stored version.
    keys: BTreeMap<String, BTreeMap<usize, Clock>>,
    /// "nX: count" for every node that still holds hints.
    hints_left: Vec<String>,
}

fn read_disks(c: &Cluster) -> Disks {
    let mut keys: BTreeMap<String, BTreeMap<usize, Clock>> = BTreeMap::new();
    let mut hints_left = Vec::new();
    for i in 0..c.nodes.len() {
        let path = c.nodes[i].data_dir.join("dynakv.redb");
        let db = RedbBackend::open(&path)
            .unwrap_or_else(|e| panic!("open {} (n{}) after the kill: {e}", path.display(), i + 1));
        let hints = db.len(Table::Hints).unwrap_or(0);
        if hints > 0 {
            hints_left.push(format!("n{}: {hints}", i + 1));
        }
        let mut after: Option<Vec<u8>> = None;
        loop {
            let from = match &after {
                Some(k) => Bound::Excluded(k.as_slice()),
                None => Bound::Unbounded,
            };
            let page = db
                .scan(
                    Table::Data,
                    from,
                    Bound::Unbounded,
                    ScanLimit::entries(1024),
                )
                .unwrap_or_else(|e| panic!("scan the data of n{}: {e}", i + 1));
            for (k, v) in &page.entries {
                let (_, key) = split_data_key(k)
                    .unwrap_or_else(|| panic!("n{} stores a malformed key {k:?}", i + 1));
                let key = String::from_utf8_lossy(key).into_owned();
                let clock = Clock::decode(v)
                    .unwrap_or_else(|e| panic!("{key} on n{} does not decode: {e}", i + 1));
                keys.entry(key).or_default().insert(i, clock);
            }
            match page.next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
    }
    Disks { keys, hints_left }
}

fn wait_roots_identical(c: &Cluster, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if c.cli(&["cluster", "roots"]).json["identical"] == true {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The smallest form of what the cart test found: a client that gives up on its Put while the
/// coordinator waits for its local commit. The coordinator's handler is dropped (tonic drops the
/// service future when the client resets the stream) after the write was queued for its local
/// commit, so the commit happens but nothing after it does. Afterwards the replicas and the
/// Merkle trees must still converge.
#[test]
fn puts_cancelled_by_the_client_leave_replicas_and_merkle_trees_consistent() {
    const KEYS: usize = 10;
    const BUSY_PUTS: usize = 400;
    const SINGLES: usize = 200;
    let mut c = ClusterSpec::new(3)
        .n(3)
        .config_yaml("anti_entropy:\n  interval_ms: 300\n")
        .start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let channels: Vec<Channel> = {
        let _g = rt.enter();
        (0..3)
            .map(|i| {
                Endpoint::from_shared(format!("http://{}", c.addr(i)))
                    .unwrap()
                    .connect_lazy()
            })
            .collect()
    };
    let mut rng = SmallRng::seed_from_u64(seed());
    let mut cancelled = 0;
    let put = |key: String, value: String, w: Option<ConsistencyLevel>| proto::PutRequest {
        key: Bytes::from(key.into_bytes()),
        value: Bytes::from(value.into_bytes()),
        context: Bytes::new(),
        consistency: Some(proto::Consistency {
            w: w.and_then(level),
            ..consistency(None, None).unwrap()
        }),
    };
    rt.block_on(async {
        // Single keys: written everywhere, then one write each that its client abandons and
        // nothing after it, so only anti-entropy can bring the replicas together.
        for i in 0..SINGLES {
            let mut client = KvClient::new(channels[i % 3].clone());
            let req = put(format!("s{i}"), "first".into(), Some(ConsistencyLevel::All));
            client.put(req).await.expect("W=ALL put with every node up");
        }
        for i in 0..SINGLES {
            let mut client = KvClient::new(channels[rng.random_range(0..3)].clone());
            let req = put(format!("s{i}"), "abandoned".into(), None);
            let give_up = Duration::from_micros(rng.random_range(0..6000));
            if tokio::time::timeout(give_up, client.put(req))
                .await
                .is_err()
            {
                cancelled += 1;
            }
        }
        // Busy keys: many writes, some abandoned, later ones merge into the same keys.
        for i in 0..BUSY_PUTS {
            let key = format!("k{}", rng.random_range(0..KEYS));
            let mut client = KvClient::new(channels[rng.random_range(0..3)].clone());
            let req = put(key, format!("v{i}"), None);
            let give_up = Duration::from_micros(rng.random_range(0..8000));
            if tokio::time::timeout(give_up, client.put(req))
                .await
                .is_err()
            {
                cancelled += 1;
            }
        }
    });
    // Quiet: nothing writes any more; anti-entropy has every chance to converge.
    let identical = wait_roots_identical(&c, Duration::from_secs(20));
    let roots = c.cli(&["cluster", "roots"]).json;
    c.kill_all();
    let disk = read_disks(&c);
    let differing: Vec<String> = disk
        .keys
        .iter()
        .filter(|(_, copies)| {
            copies.len() != 3
                || copies
                    .values()
                    .map(Clock::to_bytes)
                    .collect::<BTreeSet<_>>()
                    .len()
                    != 1
        })
        .map(|(key, copies)| {
            let detail: Vec<String> = (0..3)
                .map(|i| match copies.get(&i) {
                    Some(c) => format!("n{}: {}", i + 1, dots(c)),
                    None => format!("n{}: absent", i + 1),
                })
                .collect();
            format!("{key}: {}", detail.join("; "))
        })
        .collect();
    assert!(
        identical && differing.is_empty(),
        "after {cancelled} of {} puts were abandoned by their client and 20 s of anti-entropy \
         every 300 ms: `cluster roots` identical: {identical}; {} keys differ between replicas on \
         disk, first ones: {:#?}\nroots: {}",
        SINGLES + BUSY_PUTS,
        differing.len(),
        &differing[..differing.len().min(8)],
        roots_summary(&roots)
    );
}

/// The second thing the cart test found, made deterministic: a node that is not a replica of a
/// key forwards a Put to the key's first primary, which is frozen; after half the deadline the
/// forwarder gives up on it and has the second primary coordinate the write instead (acked).
/// The client reads the value, deletes it with that read's context (acked) and never writes the
/// key again. When the first primary thaws it still applies the forwarded Put it had queued,
/// under a dot of its own that the delete's context does not cover: the deleted value must not
/// come back.
#[test]
fn a_put_forwarded_to_a_frozen_replica_and_retried_elsewhere_does_not_undo_a_later_delete() {
    let c = ClusterSpec::new(NODES)
        .n(N as u32)
        .config_yaml("anti_entropy:\n  interval_ms: 300\n")
        .start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let channels: Vec<Channel> = {
        let _g = rt.enter();
        (0..NODES)
            .map(|i| {
                Endpoint::from_shared(format!("http://{}", c.addr(i)))
                    .unwrap()
                    .connect_lazy()
            })
            .collect()
    };
    let members: Vec<Member> = (0..NODES)
        .map(|i| Member {
            id: NodeId::new(format!("n{}", i + 1)).unwrap(),
            weight: 100,
            zone: None,
        })
        .collect();
    let ring = Ring::balanced(&members, VNODES_PER_NODE, N);
    let key = "forwarded-twice";
    // The primaries in preference-list order: the order a forwarding node tries them in.
    let prefs: Vec<usize> = ring
        .preference_list(key_position(key.as_bytes()), N)
        .into_iter()
        .map(|i| node_index(ring.nodes()[i].id.as_str()))
        .collect();
    let entry = (0..NODES).find(|i| !prefs.contains(i)).unwrap();
    let (frozen, second) = (prefs[0], prefs[1]);
    let mut steps = vec![format!(
        "primaries of {key}: {}; the client calls n{}",
        prefs
            .iter()
            .map(|i| format!("n{}", i + 1))
            .collect::<Vec<_>>()
            .join(","),
        entry + 1
    )];

    c.stop(frozen);
    steps.push(format!("SIGSTOP n{}", frozen + 1));
    let put = match rt.block_on(kv_put(&channels[entry], key, "a".into(), Bytes::new())) {
        Ok(put) => put,
        Err(e) => {
            // The forwarder did not hand the write to a second coordinator: nothing was
            // acknowledged, so there is no delete to undo (the write may still land on the thawed
            // replica, as the error says).
            eprintln!(
                "the put was not acknowledged ({e}: {:?}); no duplicate to check",
                ERROR_EXAMPLES.lock().unwrap().get(&e)
            );
            c.cont(frozen);
            return;
        }
    };
    steps.push(format!("put a: {}", receipt_text(put.receipt.as_ref())));
    let read = rt
        .block_on(kv_get(
            &channels[second],
            key,
            ConsistencyLevel::Quorum,
            false,
        ))
        .unwrap_or_else(|e| panic!("quorum read with one primary frozen: {e}; {steps:#?}"));
    let values: Vec<String> = read
        .values
        .iter()
        .map(|s| String::from_utf8_lossy(&s.value).into_owned())
        .collect();
    steps.push(format!(
        "get: {values:?} {}",
        receipt_text(read.receipt.as_ref())
    ));
    assert_eq!(values, ["a"], "{steps:#?}");
    let del = rt
        .block_on(kv_delete(&channels[second], key, read.context))
        .unwrap_or_else(|e| panic!("delete with one primary frozen: {e}; {steps:#?}"));
    steps.push(format!(
        "delete (acked): {}",
        receipt_text(del.receipt.as_ref())
    ));
    c.cont(frozen);
    steps.push(format!("SIGCONT n{}", frozen + 1));

    // Anti-entropy every 300 ms and reads at R=ALL (which repair) for 10 s: the key stays deleted.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(r) = rt.block_on(kv_get(&channels[second], key, ConsistencyLevel::All, true)) {
            let values: Vec<String> = r
                .values
                .iter()
                .map(|s| format!("{}@{}", String::from_utf8_lossy(&s.value), s.timestamp))
                .collect();
            assert!(
                values.is_empty(),
                "the deleted key came back: {values:?} ({}); what happened:\n{}",
                receipt_text(r.receipt.as_ref()),
                steps.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}
