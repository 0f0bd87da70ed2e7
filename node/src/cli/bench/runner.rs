//! The benchmark runner, generic over the store: a [`Driver`] hands each client task a
//! [`Session`] that can read, write and read-modify-write one key; [`run`] does the rest (load
//! phase, warm-up, duration or operation count, key choice, latency histograms per operation and
//! outcome, errors by gRPC code, the live progress line) and returns a [`Report`].
//!
//! The loop is closed: each client task has one request in flight and issues the next as soon as
//! the previous one is answered, so `clients` is the concurrency.

use std::future::Future;
use std::io::{IsTerminal, Write as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use rand::Rng;

use super::report::{ErrorCount, Latency, OpReport, PhaseReport, Report, Target};
use super::workload::{
    CART_ITEM_BYTES, KeySpace, Op, WorkloadArgs, ZIPFIAN_CONSTANT, Zipfian, cart_add, random_value,
};

/// How one operation ended.
#[derive(Debug)]
pub enum Outcome {
    /// Done: written, or read and found.
    Ok,
    /// A read found no value (the key was never written, or was deleted).
    NotFound,
    /// The store refused or failed the operation: counted by code, its latency recorded apart.
    /// A store-side conflict (etcd's failed compare of a read-modify-write) is `ABORTED`.
    Error(tonic::Status),
}

/// Outcome classes that get their own latency histogram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutcomeClass {
    Ok,
    NotFound,
    Error,
}

impl OutcomeClass {
    pub const ALL: [OutcomeClass; 3] = [
        OutcomeClass::Ok,
        OutcomeClass::NotFound,
        OutcomeClass::Error,
    ];

    pub fn name(self) -> &'static str {
        match self {
            OutcomeClass::Ok => "ok",
            OutcomeClass::NotFound => "not_found",
            OutcomeClass::Error => "error",
        }
    }

    fn index(self) -> usize {
        match self {
            OutcomeClass::Ok => 0,
            OutcomeClass::NotFound => 1,
            OutcomeClass::Error => 2,
        }
    }
}

impl Outcome {
    pub fn class(&self) -> OutcomeClass {
        match self {
            Outcome::Ok => OutcomeClass::Ok,
            Outcome::NotFound => OutcomeClass::NotFound,
            Outcome::Error(_) => OutcomeClass::Error,
        }
    }
}

/// A store under test. Implemented for DynaKV in `dynakv bench` and for peers (etcd) in the
/// `dynakv-peers` crate.
pub trait Driver: Send + Sync + 'static {
    type Session: Session;

    /// The client of task `task` (0-based). Called once per task before the clock starts;
    /// sessions should share connections (e.g. task `i` on connection `i mod channels`).
    fn session(&self, task: usize) -> Self::Session;
}

/// One client task's handle on the store. Each method runs one operation to completion and
/// reports how it ended; it never panics on a store error.
pub trait Session: Send + 'static {
    /// Reads `key` at the configured consistency.
    fn read(&mut self, key: Bytes) -> impl Future<Output = Outcome> + Send;

    /// Writes `value` under `key` without reading it first (no causal context, no revision).
    fn write(&mut self, key: Bytes, value: Bytes) -> impl Future<Output = Outcome> + Send;

    /// Reads `key`, computes the new value with `update` from every value read (several when the
    /// store returned concurrent siblings, none when the key is absent), and writes it back based
    /// on what was read (DynaKV: with the read's context; etcd: if the key's revision did not
    /// change). The whole exchange is one operation.
    fn read_modify_write<F>(
        &mut self,
        key: Bytes,
        update: F,
    ) -> impl Future<Output = Outcome> + Send
    where
        F: FnOnce(&[Bytes]) -> Bytes + Send;
}

/// After an `UNAVAILABLE` answer a client task pauses this long, so that a cluster that is down
/// is not hammered in a tight loop (the pause is not part of any latency).
const ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// Latency histograms cover 1 us to 10 min at 3 significant digits.
const HISTOGRAM_MAX_US: u64 = 600_000_000;

/// Runs the load phase (if asked) and the workload phase against `driver`.
pub async fn run<D: Driver>(driver: Arc<D>, args: &WorkloadArgs, target: Target) -> Report {
    let mut report = Report::new(args, target);
    let progress = !args.no_progress;
    if args.load || args.load_only {
        report.load = Some(load_phase(&driver, args, progress).await);
    }
    if !args.load_only {
        report.run = Some(run_phase(&driver, args, progress).await);
    }
    report
}

/// Counters shared by the client tasks and the progress line.
struct Live {
    ops: [AtomicU64; 4],
    errors: AtomicU64,
    latency_us: AtomicU64,
    done: AtomicBool,
}

impl Live {
    fn new() -> Arc<Live> {
        Arc::new(Live {
            ops: Default::default(),
            errors: AtomicU64::new(0),
            latency_us: AtomicU64::new(0),
            done: AtomicBool::new(false),
        })
    }

    fn record(&self, op: Op, class: OutcomeClass, latency: Duration) {
        self.ops[op.index()].fetch_add(1, Ordering::Relaxed);
        if class == OutcomeClass::Error {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.latency_us
            .fetch_add(latency.as_micros() as u64, Ordering::Relaxed);
    }

    fn total(&self) -> u64 {
        self.ops.iter().map(|o| o.load(Ordering::Relaxed)).sum()
    }
}

/// One task's measurements: histograms per (operation, outcome), created when first needed,
/// and errors per (operation, gRPC code) with the first message seen.
struct Recorder {
    histograms: [[Option<Histogram<u64>>; 3]; 4],
    errors: Vec<ErrorCount>,
}

impl Recorder {
    fn new() -> Recorder {
        Recorder {
            histograms: Default::default(),
            errors: Vec::new(),
        }
    }

    fn record(&mut self, op: Op, outcome: &Outcome, latency: Duration) {
        let slot = &mut self.histograms[op.index()][outcome.class().index()];
        let histogram = slot.get_or_insert_with(new_histogram);
        histogram.saturating_record((latency.as_micros() as u64).max(1));
        if let Outcome::Error(status) = outcome {
            let code = super::super::client::code_name(status.code());
            match self
                .errors
                .iter_mut()
                .find(|e| e.op == op.name() && e.code == code)
            {
                Some(e) => e.count += 1,
                None => self.errors.push(ErrorCount {
                    op: op.name(),
                    code,
                    count: 1,
                    first_message: status.message().to_string(),
                }),
            }
        }
    }

    fn merge(&mut self, other: Recorder) {
        for (mine, theirs) in self.histograms.iter_mut().zip(other.histograms) {
            for (m, t) in mine.iter_mut().zip(theirs) {
                if let Some(t) = t {
                    match m {
                        // Same bounds on both sides: adding cannot fail.
                        Some(m) => m.add(&t).unwrap_or(()),
                        None => *m = Some(t),
                    }
                }
            }
        }
        for e in other.errors {
            match self
                .errors
                .iter_mut()
                .find(|x| x.op == e.op && x.code == e.code)
            {
                Some(x) => x.count += e.count,
                None => self.errors.push(e),
            }
        }
    }

    fn report(mut self, phase: &'static str, elapsed: Duration) -> PhaseReport {
        let seconds = elapsed.as_secs_f64().max(1e-9);
        let mut by_op = Vec::new();
        let (mut ops, mut errors) = (0, 0);
        for op in Op::ALL {
            for class in OutcomeClass::ALL {
                let Some(h) = &self.histograms[op.index()][class.index()] else {
                    continue;
                };
                ops += h.len();
                if class == OutcomeClass::Error {
                    errors += h.len();
                }
                by_op.push(OpReport {
                    op: op.name(),
                    outcome: class.name(),
                    count: h.len(),
                    ops_per_s: h.len() as f64 / seconds,
                    latency_ms: latency(h),
                });
            }
        }
        self.errors
            .sort_by(|a, b| (a.op, a.code).cmp(&(b.op, b.code)));
        PhaseReport {
            phase,
            elapsed_s: seconds,
            ops,
            errors,
            ops_per_s: (ops - errors) as f64 / seconds,
            by_op,
            error_codes: self.errors,
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    // Constant, valid bounds: creation cannot fail.
    Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, 3).unwrap_or_else(|_| unreachable!())
}

fn latency(h: &Histogram<u64>) -> Latency {
    let ms = |us: u64| us as f64 / 1000.0;
    Latency {
        p50: ms(h.value_at_quantile(0.50)),
        p90: ms(h.value_at_quantile(0.90)),
        p99: ms(h.value_at_quantile(0.99)),
        p999: ms(h.value_at_quantile(0.999)),
        max: ms(h.max()),
        mean: h.mean() / 1000.0,
    }
}

fn value_seed(args: &WorkloadArgs, task: usize) -> u64 {
    super::workload::task_seed(args.seed ^ 0x5EED_0F7A_1E00, task)
}

async fn load_phase<D: Driver>(
    driver: &Arc<D>,
    args: &WorkloadArgs,
    progress: bool,
) -> PhaseReport {
    let keys = args.key_space();
    let next = Arc::new(AtomicU64::new(0));
    let live = Live::new();
    let started = Instant::now();
    let ticker = progress.then(|| {
        spawn_progress(
            Arc::clone(&live),
            "load",
            started,
            Duration::ZERO,
            Some(keys.len()),
        )
    });
    let mut tasks = Vec::with_capacity(args.clients);
    for task in 0..args.clients {
        let mut session = driver.session(task);
        let keys = keys.clone();
        let next = Arc::clone(&next);
        let live = Arc::clone(&live);
        let mut rng =
            <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(value_seed(args, task));
        let value = random_value(args.value_size, &mut rng);
        tasks.push(tokio::spawn(async move {
            let mut recorder = Recorder::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= keys.len() {
                    break;
                }
                let t0 = Instant::now();
                let outcome = session.write(keys.key(index), value.clone()).await;
                let took = t0.elapsed();
                live.record(Op::Insert, outcome.class(), took);
                recorder.record(Op::Insert, &outcome, took);
                back_off(&outcome).await;
            }
            recorder
        }));
    }
    let recorder = join_all(tasks).await;
    let elapsed = started.elapsed();
    finish_progress(&live, ticker).await;
    recorder.report("load", elapsed)
}

async fn run_phase<D: Driver>(driver: &Arc<D>, args: &WorkloadArgs, progress: bool) -> PhaseReport {
    let keys = args.key_space();
    let zipf = Arc::new(Zipfian::new(args.keys, ZIPFIAN_CONSTANT));
    let tickets = Arc::new(AtomicU64::new(0));
    let live = Live::new();
    let sessions: Vec<D::Session> = (0..args.clients).map(|t| driver.session(t)).collect();
    let started = Instant::now();
    let measure_from = started + args.warmup;
    let deadline = measure_from + args.duration;
    let ticker =
        progress.then(|| spawn_progress(Arc::clone(&live), "run", started, args.warmup, args.ops));
    let mut tasks = Vec::with_capacity(args.clients);
    for (task, mut session) in sessions.into_iter().enumerate() {
        let keys: KeySpace = keys.clone();
        let mut chooser = args.chooser(task, &zipf);
        let mut value_rng =
            <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(value_seed(args, task));
        let value = random_value(args.value_size, &mut value_rng);
        let (workload, ops, value_size) = (args.workload, args.ops, args.value_size);
        let tickets = Arc::clone(&tickets);
        let live = Arc::clone(&live);
        tasks.push(tokio::spawn(async move {
            let mut recorder = Recorder::new();
            let mut last_done = started;
            loop {
                let now = Instant::now();
                let measuring = now >= measure_from;
                if measuring {
                    let more = match ops {
                        Some(n) => tickets.fetch_add(1, Ordering::Relaxed) < n,
                        None => now < deadline,
                    };
                    if !more {
                        break;
                    }
                }
                let op = workload.next_op(chooser.rng());
                let key = keys.key(chooser.next_key());
                let t0 = Instant::now();
                let outcome = match op {
                    Op::Read => session.read(key).await,
                    Op::Update | Op::Insert => session.write(key, value.clone()).await,
                    Op::Cart => {
                        let item: [u8; CART_ITEM_BYTES] = chooser.rng().random();
                        session
                            .read_modify_write(key, move |values| {
                                cart_add(values, item, value_size)
                            })
                            .await
                    }
                };
                last_done = Instant::now();
                let took = last_done - t0;
                live.record(op, outcome.class(), took);
                if measuring {
                    recorder.record(op, &outcome, took);
                }
                back_off(&outcome).await;
            }
            (recorder, last_done)
        }));
    }
    let mut recorder = Recorder::new();
    let mut end = measure_from;
    for task in tasks {
        match task.await {
            Ok((r, last)) => {
                recorder.merge(r);
                end = end.max(last);
            }
            Err(e) => resume_or_report(e),
        }
    }
    finish_progress(&live, ticker).await;
    recorder.report("run", end.saturating_duration_since(measure_from))
}

async fn back_off(outcome: &Outcome) {
    if let Outcome::Error(s) = outcome
        && s.code() == tonic::Code::Unavailable
    {
        tokio::time::sleep(ERROR_BACKOFF).await;
    }
}

async fn join_all(tasks: Vec<tokio::task::JoinHandle<Recorder>>) -> Recorder {
    let mut all = Recorder::new();
    for task in tasks {
        match task.await {
            Ok(r) => all.merge(r),
            Err(e) => resume_or_report(e),
        }
    }
    all
}

/// A client task panicked: that is a bug in a driver, so let it surface.
fn resume_or_report(e: tokio::task::JoinError) {
    if e.is_panic() {
        std::panic::resume_unwind(e.into_panic());
    }
    eprintln!("a client task was cancelled: {e}");
}

/// The live progress line on standard error: rewritten in place each second on a terminal, a
/// new line every 5 s otherwise (logs of scripted runs stay short).
fn spawn_progress(
    live: Arc<Live>,
    phase: &'static str,
    started: Instant,
    warmup: Duration,
    total: Option<u64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let tty = std::io::stderr().is_terminal();
        let period = if tty {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(5)
        };
        let mut tick = tokio::time::interval(period);
        tick.tick().await;
        let (mut last_ops, mut last_lat, mut last_at) = (0u64, 0u64, Instant::now());
        while !live.done.load(Ordering::Relaxed) {
            tick.tick().await;
            if live.done.load(Ordering::Relaxed) {
                break;
            }
            let now = Instant::now();
            let ops = live.total();
            let lat = live.latency_us.load(Ordering::Relaxed);
            let interval = now.duration_since(last_at).as_secs_f64().max(1e-9);
            let rate = (ops - last_ops) as f64 / interval;
            let mean_ms = if ops > last_ops {
                (lat - last_lat) as f64 / (ops - last_ops) as f64 / 1000.0
            } else {
                0.0
            };
            let elapsed = now.duration_since(started);
            let label = if elapsed < warmup { "warm-up" } else { phase };
            let mut per_op = String::new();
            for op in Op::ALL {
                let n = live.ops[op.index()].load(Ordering::Relaxed);
                if n > 0 {
                    per_op.push_str(&format!(" {op} {n}"));
                }
            }
            let of_total = match total {
                Some(t) if phase == "load" => format!(" / {t}"),
                _ => String::new(),
            };
            let line = format!(
                "[{label} {:>6.1}s] {:>9.0} ops/s  mean {:>7.2} ms  ops{per_op}{of_total}  errors {}",
                elapsed.as_secs_f64(),
                rate,
                mean_ms,
                live.errors.load(Ordering::Relaxed),
            );
            let mut err = std::io::stderr().lock();
            let _ = if tty {
                write!(err, "\r{line}\x1b[K")
            } else {
                writeln!(err, "{line}")
            };
            let _ = err.flush();
            (last_ops, last_lat, last_at) = (ops, lat, now);
        }
        if tty {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
        }
    })
}

async fn finish_progress(live: &Live, ticker: Option<tokio::task::JoinHandle<()>>) {
    live.done.store(true, Ordering::Relaxed);
    if let Some(t) = ticker {
        t.abort();
        let _ = t.await;
        if std::io::stderr().is_terminal() {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use super::*;
    use crate::cli::bench::workload::{Distribution, Workload};

    /// An in-memory store that fails every write of keys ending in '7' with UNAVAILABLE.
    #[derive(Default)]
    struct Memory {
        data: Mutex<BTreeMap<Bytes, Bytes>>,
    }

    struct MemorySession(Arc<Memory>);

    impl Driver for Arc<Memory> {
        type Session = MemorySession;
        fn session(&self, _task: usize) -> MemorySession {
            MemorySession(Arc::clone(self))
        }
    }

    impl Session for MemorySession {
        async fn read(&mut self, key: Bytes) -> Outcome {
            match self.0.data.lock().unwrap().get(&key) {
                Some(_) => Outcome::Ok,
                None => Outcome::NotFound,
            }
        }

        async fn write(&mut self, key: Bytes, value: Bytes) -> Outcome {
            if key.ends_with(b"7") {
                return Outcome::Error(tonic::Status::unavailable("needed W=2, got 1 ack"));
            }
            self.0.data.lock().unwrap().insert(key, value);
            Outcome::Ok
        }

        async fn read_modify_write<F>(&mut self, key: Bytes, update: F) -> Outcome
        where
            F: FnOnce(&[Bytes]) -> Bytes + Send,
        {
            let mut data = self.0.data.lock().unwrap();
            let current: Vec<Bytes> = data.get(&key).cloned().into_iter().collect();
            data.insert(key, update(&current));
            Outcome::Ok
        }
    }

    fn args(workload: Workload) -> WorkloadArgs {
        WorkloadArgs {
            workload,
            distribution: Distribution::Uniform,
            keys: 100,
            key_prefix: "t/".into(),
            value_size: 64,
            clients: 4,
            channels: None,
            duration: Duration::from_secs(1),
            ops: Some(2_000),
            warmup: Duration::ZERO,
            load: true,
            load_only: false,
            seed: 1,
            no_progress: true,
        }
    }

    fn target() -> Target {
        Target {
            driver: "memory".into(),
            endpoints: "-".into(),
            channels: 1,
            consistency: "-".into(),
        }
    }

    #[tokio::test]
    async fn load_writes_every_key_once_and_counts_errors_by_code() {
        let store = Arc::new(Memory::default());
        let mut a = args(Workload::C);
        a.load_only = true;
        let report = run(Arc::new(Arc::clone(&store)), &a, target()).await;
        let load = report.load.expect("load phase");
        assert!(report.run.is_none());
        assert_eq!(load.ops, 100);
        // Keys ...7 fail: 10 of 100.
        assert_eq!(load.errors, 10);
        assert_eq!(store.data.lock().unwrap().len(), 90);
        assert_eq!(load.error_codes.len(), 1);
        assert_eq!(load.error_codes[0].code, "UNAVAILABLE");
        assert_eq!(load.error_codes[0].count, 10);
    }

    #[tokio::test]
    async fn op_count_is_exact_and_reads_split_by_outcome() {
        let store = Arc::new(Memory::default());
        let report = run(Arc::new(store), &args(Workload::C), target()).await;
        let run = report.run.expect("run phase");
        assert_eq!(run.ops, 2_000);
        let count = |outcome: &str| {
            run.by_op
                .iter()
                .filter(|o| o.op == "read" && o.outcome == outcome)
                .map(|o| o.count)
                .sum::<u64>()
        };
        // A tenth of the keys failed to load, so about a tenth of the reads find nothing.
        assert_eq!(count("ok") + count("not_found"), 2_000);
        assert!(count("not_found") > 100 && count("not_found") < 350);
        assert!(
            run.by_op
                .iter()
                .all(|o| o.latency_ms.max >= o.latency_ms.p50)
        );
    }

    #[tokio::test]
    async fn cart_workload_grows_carts_within_the_value_size() {
        let store = Arc::new(Memory::default());
        let mut a = args(Workload::Cart);
        a.load = false;
        let report = run(Arc::new(Arc::clone(&store)), &a, target()).await;
        assert_eq!(report.run.expect("run").ops, 2_000);
        let data = store.data.lock().unwrap();
        assert!(
            data.values()
                .all(|v| v.len() <= 64 && v.len() % CART_ITEM_BYTES == 0)
        );
        assert!(data.values().any(|v| v.len() == 64));
    }
}
