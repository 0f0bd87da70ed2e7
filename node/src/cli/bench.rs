//! `dynakv bench`: YCSB-style workloads against a cluster (by default the `dynakv dev` cluster).
//!
//! - [`workload`]: the operation mixes (A, B, C, W, cart), uniform and zipfian key choice, the
//!   workload flags shared with the peer drivers ([`WorkloadArgs`]).
//! - [`runner`]: the store-independent runner: the [`Driver`] / [`Session`] seam, load phase,
//!   warm-up, duration or operation count, HdrHistogram latencies per operation and outcome,
//!   errors by gRPC code, the live progress line.
//! - [`report`]: the final table and `-o json`.
//! - [`route`]: token-aware routing (each key to one of its replicas among the endpoints).
//! - this file: the DynaKV driver and the command itself.
//!
//! Peer databases (etcd) have their drivers in the `dynakv-peers` crate under `tests/peers`, run
//! by the same [`runner::run`], so a comparison is one client harness under one workload.

pub mod report;
pub mod route;
pub mod runner;
pub mod workload;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use super::client::{Conn, Credentials};
use bytes::Bytes;
use clap::Args;

pub use report::{Report, Target};
pub use runner::{Driver, Outcome, Session, run as run_workload};
pub use workload::{Distribution, Op, Workload, WorkloadArgs};

use super::client::{code_name, exit_code, quorum_proto};
use super::{DEFAULT_ENDPOINTS, OutputFormat};
use crate::config::QuorumSetting;
use crate::proto::kv_client::KvClient;
use crate::proto::{self, GetRequest, PutRequest};

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    dynakv bench --load -W C -k 100000                 # load 100k keys, then read only\n  \
    dynakv bench -W W -c 64 -w 2 -t 30s                # puts from 64 clients, W=2\n  \
    dynakv bench -W A -d uniform -r one -w one -o json # update heavy, ONE/ONE, JSON report\n  \
    dynakv bench -W cart -c 16                         # read, add an item, write with context")]
pub struct BenchArgs {
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Nodes to talk to, comma-separated host:port; connections are spread over them.
    #[arg(long, short = 'e', env = "DYNAKV_ENDPOINT", default_value = DEFAULT_ENDPOINTS)]
    pub endpoint: String,
    #[command(flatten)]
    pub credentials: super::CredentialArgs,
    /// Read quorum of every Get: ONE, QUORUM, ALL or a number (default: the cluster's).
    #[arg(long, short = 'r')]
    pub r: Option<QuorumSetting>,
    /// Write quorum of every Put: ONE, QUORUM, ALL or a number (default: the cluster's).
    #[arg(long, short = 'w')]
    pub w: Option<QuorumSetting>,
    /// Count only the key's primary replicas (no fallbacks) toward the quorum.
    #[arg(long)]
    pub strict: bool,
    /// Deadline of each request in milliseconds (default: the node's).
    #[arg(long)]
    pub timeout_ms: Option<u32>,
    /// Updates without a causal context. By default an update carries the newest context this
    /// process saw for the key (from an earlier write or read), so it replaces the value instead
    /// of adding a sibling; blind updates of existing keys pile up siblings.
    #[arg(long)]
    pub blind_writes: bool,
    /// Send each request on the client's own connection and let the node forward it to a
    /// replica of the key, as a client that knows no ring does. By default the bench asks a node
    /// for the ring (`KV.Ring`) and sends each key straight to one of its replicas among the
    /// endpoints.
    #[arg(long)]
    pub no_routing: bool,
    /// Report format (the progress line always goes to standard error).
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

/// DynaKV under test: `channels` connections spread over the endpoints.
pub struct DynaKvDriver {
    channels: Vec<Conn>,
    credentials: Credentials,
    consistency: proto::Consistency,
    contexts: Option<Arc<ContextCache>>,
    router: Option<Arc<route::Router>>,
}

impl DynaKvDriver {
    /// Connects `channels` connections, connection `j` to endpoint `j mod endpoints` (or the
    /// next endpoint that answers). Fails only if no endpoint accepts a connection.
    /// `contexts`: the shared context cache of updates (`None`: blind writes).
    pub async fn connect(
        endpoints: &[String],
        channels: usize,
        request_timeout: Duration,
        consistency: proto::Consistency,
        contexts: Option<Arc<ContextCache>>,
        credentials: &Credentials,
    ) -> Result<DynaKvDriver, tonic::Status> {
        let channels = connect_channels(endpoints, channels, request_timeout, credentials).await?;
        Ok(DynaKvDriver {
            channels,
            credentials: credentials.clone(),
            consistency,
            contexts,
            router: None,
        })
    }

    /// Sends each key straight to one of its replicas among `endpoints` ([`route`]).
    pub async fn with_routing(
        mut self,
        endpoints: &[String],
        request_timeout: Duration,
    ) -> Result<DynaKvDriver, tonic::Status> {
        self.router = Some(
            route::Router::start(endpoints, request_timeout, &self.credentials)
                .await
                .map_err(tonic::Status::invalid_argument)?,
        );
        Ok(self)
    }
}

/// The newest context this process saw for each key (from a write's or a read's answer), so that
/// an update can replace what is there in one round trip, as a client that knows what it
/// overwrites does. Without it every update of an existing key is a blind write, which DynaKV
/// keeps as one more sibling (that is the point of causal contexts), and a key updated often
/// soon holds `limits.sibling_max` siblings and refuses writes.
///
/// A fixed table of slots indexed by the key's hash; a slot holds one key, so two keys that share
/// a slot evict each other (the write is then blind). Two updates of one key in flight at once
/// still become siblings, and the next update with the newer context replaces both only if that
/// context covered both: under contention, `cart` (read, then write with the read's context)
/// is the workload that shows what a Dynamo store does.
pub struct ContextCache {
    slots: Vec<std::sync::Mutex<Option<(Bytes, Bytes)>>>,
    mask: usize,
}

impl ContextCache {
    /// Most slots: 2^18 (about 12 MiB of slots plus the contexts).
    const MAX_SLOTS: u64 = 1 << 18;

    /// A cache sized for `keys` keys (up to [`Self::MAX_SLOTS`] slots).
    pub fn new(keys: u64) -> ContextCache {
        let slots = keys.clamp(1, Self::MAX_SLOTS).next_power_of_two() as usize;
        ContextCache {
            slots: (0..slots).map(|_| std::sync::Mutex::new(None)).collect(),
            mask: slots - 1,
        }
    }

    fn slot(&self, key: &[u8]) -> &std::sync::Mutex<Option<(Bytes, Bytes)>> {
        &self.slots[dynakv_core::hash::key_position(key) as usize & self.mask]
    }

    /// The context last seen for `key`; empty if none.
    pub fn get(&self, key: &[u8]) -> Bytes {
        let slot = self.slot(key).lock().unwrap_or_else(|e| e.into_inner());
        match &*slot {
            Some((k, context)) if k == key => context.clone(),
            _ => Bytes::new(),
        }
    }

    /// Remembers `context` as the newest for `key`.
    pub fn put(&self, key: Bytes, context: Bytes) {
        let mut slot = self.slot(&key).lock().unwrap_or_else(|e| e.into_inner());
        *slot = Some((key, context));
    }
}

/// Opens `count` HTTP/2 connections, connection `j` to `endpoints[j mod len]`, falling back to
/// the following endpoints when that one does not answer. Shared with the peer drivers.
pub async fn connect_channels(
    endpoints: &[String],
    count: usize,
    request_timeout: Duration,
    credentials: &Credentials,
) -> Result<Vec<Conn>, tonic::Status> {
    if endpoints.is_empty() {
        return Err(tonic::Status::invalid_argument("no endpoint given"));
    }
    let mut channels = Vec::with_capacity(count);
    let mut failures = Vec::new();
    for j in 0..count.max(1) {
        let mut connected = None;
        for k in 0..endpoints.len() {
            let ep = &endpoints[(j + k) % endpoints.len()];
            let endpoint = match credentials.endpoint(ep) {
                Ok(e) => e,
                Err(e) => return Err(tonic::Status::invalid_argument(e)),
            };
            let endpoint = endpoint.timeout(request_timeout).tcp_nodelay(true);
            match credentials.connect(endpoint, Duration::from_secs(2)).await {
                Ok(ch) => {
                    connected = Some(ch);
                    break;
                }
                Err(e) => failures.push(format!("{ep}: {e}")),
            }
        }
        match connected {
            Some(ch) => channels.push(ch),
            None => {
                return Err(tonic::Status::unavailable(format!(
                    "no endpoint reachable ({})",
                    failures.join("; ")
                )));
            }
        }
    }
    Ok(channels)
}

/// Splits a comma-separated endpoint list.
pub fn split_endpoints(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_string)
        .collect()
}

impl Driver for DynaKvDriver {
    type Session = DynaKvSession;

    fn session(&self, task: usize) -> DynaKvSession {
        let channel = self.channels[task % self.channels.len()].clone();
        DynaKvSession {
            client: KvClient::new(channel)
                .max_decoding_message_size(crate::peer::MAX_PEER_MESSAGE_BYTES)
                .max_encoding_message_size(crate::peer::MAX_PEER_MESSAGE_BYTES),
            consistency: self.consistency,
            contexts: self.contexts.clone(),
            router: self.router.clone(),
            task,
        }
    }
}

/// One client task on one connection (and, when routing, the router's connections).
pub struct DynaKvSession {
    client: KvClient<Conn>,
    consistency: proto::Consistency,
    contexts: Option<Arc<ContextCache>>,
    router: Option<Arc<route::Router>>,
    task: usize,
}

impl DynaKvSession {
    /// The client to send `key` with: a replica's connection when routing knows one, else the
    /// session's own; with the endpoint it goes to, if routed.
    fn client_for(&self, key: &[u8]) -> (KvClient<Conn>, Option<usize>) {
        if let Some(router) = &self.router
            && let Some(endpoint) = router.pick(key, self.task)
        {
            return (router.client(endpoint), Some(endpoint));
        }
        (self.client.clone(), None)
    }

    /// Lets the router learn from an answer: its receipt, or the failure of a routed request.
    fn learn(
        &self,
        endpoint: Option<usize>,
        result: Result<Option<&proto::Receipt>, &tonic::Status>,
    ) {
        let Some(router) = &self.router else { return };
        match result {
            Ok(receipt) => router.note(receipt),
            Err(status) => {
                if let Some(e) = endpoint {
                    router.failed(e, status);
                }
            }
        }
    }
}

impl Session for DynaKvSession {
    async fn read(&mut self, key: Bytes) -> Outcome {
        let request = GetRequest {
            key: key.clone(),
            consistency: Some(self.consistency),
        };
        let (mut client, endpoint) = self.client_for(&key);
        let answer = client.get(request).await;
        self.learn(
            endpoint,
            answer.as_ref().map(|r| r.get_ref().receipt.as_ref()),
        );
        match answer {
            Ok(r) => {
                let r = r.into_inner();
                if let Some(cache) = &self.contexts {
                    cache.put(key, r.context);
                }
                if r.values.is_empty() {
                    Outcome::NotFound
                } else {
                    Outcome::Ok
                }
            }
            Err(s) => Outcome::Error(s),
        }
    }

    async fn write(&mut self, key: Bytes, value: Bytes) -> Outcome {
        let context = match &self.contexts {
            Some(cache) => cache.get(&key),
            None => Bytes::new(),
        };
        let request = PutRequest {
            key: key.clone(),
            value,
            context,
            consistency: Some(self.consistency),
        };
        let (mut client, endpoint) = self.client_for(&key);
        let answer = client.put(request).await;
        self.learn(
            endpoint,
            answer.as_ref().map(|r| r.get_ref().receipt.as_ref()),
        );
        match answer {
            Ok(r) => {
                if let Some(cache) = &self.contexts {
                    cache.put(key, r.into_inner().context);
                }
                Outcome::Ok
            }
            Err(s) => Outcome::Error(s),
        }
    }

    async fn read_modify_write<F>(&mut self, key: Bytes, update: F) -> Outcome
    where
        F: FnOnce(&[Bytes]) -> Bytes + Send,
    {
        let read = GetRequest {
            key: key.clone(),
            consistency: Some(self.consistency),
        };
        let (mut client, endpoint) = self.client_for(&key);
        let answer = client.get(read).await;
        self.learn(
            endpoint,
            answer.as_ref().map(|r| r.get_ref().receipt.as_ref()),
        );
        let got = match answer {
            Ok(r) => r.into_inner(),
            Err(s) => return Outcome::Error(s),
        };
        let values: Vec<Bytes> = got.values.into_iter().map(|s| s.value).collect();
        let write = PutRequest {
            key,
            value: update(&values),
            context: got.context,
            consistency: Some(self.consistency),
        };
        let answer = client.put(write).await;
        self.learn(
            endpoint,
            answer.as_ref().map(|r| r.get_ref().receipt.as_ref()),
        );
        match answer {
            Ok(_) => Outcome::Ok,
            Err(s) => Outcome::Error(s),
        }
    }
}

/// Runs a workload with `driver` and prints the report; shared with `dynakv-peer-bench`.
/// Exit code: 0 when at least some operations succeeded, else the code of the main error.
pub async fn run_and_print<D: Driver>(
    driver: D,
    args: &WorkloadArgs,
    target: Target,
    output: OutputFormat,
) -> ExitCode {
    let mut report = runner::run(Arc::new(driver), args, target).await;
    report.finished_unix_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    match output {
        OutputFormat::Json => println!("{}", report.to_json()),
        OutputFormat::Text => print!("{report}"),
    }
    if report.all_failed() {
        let code = report
            .main_error()
            .and_then(|e| code_from_name(e.code))
            .unwrap_or(tonic::Code::Unknown);
        eprintln!("error: every operation failed ({})", code_name(code));
        return ExitCode::from(exit_code(code).max(1));
    }
    ExitCode::SUCCESS
}

fn code_from_name(name: &str) -> Option<tonic::Code> {
    (0..=16)
        .map(tonic::Code::from_i32)
        .find(|c| code_name(*c) == name)
}

/// Reports a usage or connection error the way the other client commands do.
pub fn fail(format: OutputFormat, code: tonic::Code, message: &str) -> ExitCode {
    match format {
        OutputFormat::Json => println!(
            "{}",
            serde_json::json!({ "error": { "code": code_name(code), "message": message } })
        ),
        OutputFormat::Text => eprintln!("error: {}: {message}", code_name(code)),
    }
    ExitCode::from(exit_code(code).max(1))
}

pub async fn run(args: BenchArgs) -> ExitCode {
    if let Err(e) = args.workload.validate() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let endpoints = split_endpoints(&args.endpoint);
    let channels = args.workload.channels.unwrap_or(endpoints.len().max(1));
    let consistency = proto::Consistency {
        r: quorum_proto(args.r),
        w: quorum_proto(args.w),
        sloppy: if args.strict { Some(false) } else { None },
        timeout_ms: args.timeout_ms.unwrap_or(0),
    };
    // The client-side deadline only catches a node that never answers; the node's own deadline
    // (or --timeout-ms) is the one that applies.
    let client_timeout = Duration::from_millis(u64::from(args.timeout_ms.unwrap_or(0)) + 30_000);
    let contexts = (!args.blind_writes).then(|| Arc::new(ContextCache::new(args.workload.keys)));
    let credentials = match Credentials::from_args(&args.credentials, &args.endpoint) {
        Ok(c) => c,
        Err(e) => return fail(args.output, e.code, &e.message),
    };
    let driver = match DynaKvDriver::connect(
        &endpoints,
        channels,
        client_timeout,
        consistency,
        contexts,
        &credentials,
    )
    .await
    {
        Ok(d) => d,
        Err(s) => return fail(args.output, s.code(), s.message()),
    };
    let driver = if args.no_routing {
        driver
    } else {
        match driver.with_routing(&endpoints, client_timeout).await {
            Ok(d) => d,
            Err(s) => return fail(args.output, s.code(), s.message()),
        }
    };
    let quorum = |q: Option<QuorumSetting>| q.map_or("default".to_string(), |q| q.to_string());
    let target = Target {
        driver: "dynakv".into(),
        endpoints: endpoints.join(","),
        channels,
        consistency: format!(
            "r={} w={}{}; {}",
            quorum(args.r),
            quorum(args.w),
            if args.strict { " strict" } else { "" },
            if args.blind_writes {
                "blind updates"
            } else {
                "updates carry the newest context seen"
            }
        ) + if args.no_routing {
            "; sent on the connection's own node (forwarded by it)"
        } else {
            "; sent to a replica of the key (token-aware)"
        },
    };
    run_and_print(driver, &args.workload, target, args.output).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    #[test]
    fn defaults_target_the_dev_cluster_with_workload_a() {
        let cli = Cli::try_parse_from(["bench"]).unwrap();
        assert_eq!(cli.bench.endpoint, DEFAULT_ENDPOINTS);
        assert_eq!(cli.bench.workload.workload, Workload::A);
        assert_eq!(cli.bench.workload.distribution, Distribution::Zipfian);
        assert_eq!(cli.bench.workload.duration, Duration::from_secs(10));
        assert!(cli.bench.r.is_none() && cli.bench.w.is_none());
    }

    #[test]
    fn flags_parse() {
        let cli = Cli::try_parse_from([
            "bench",
            "-W",
            "cart",
            "-d",
            "uniform",
            "-k",
            "500",
            "-s",
            "100",
            "-c",
            "64",
            "--channels",
            "8",
            "-t",
            "30s",
            "--warmup",
            "500ms",
            "-r",
            "one",
            "-w",
            "2",
            "--load",
            "-o",
            "json",
        ])
        .unwrap();
        let b = cli.bench;
        assert_eq!(b.workload.workload, Workload::Cart);
        assert_eq!(b.workload.clients, 64);
        assert_eq!(b.workload.channels, Some(8));
        assert_eq!(b.workload.warmup, Duration::from_millis(500));
        assert_eq!(b.r, Some(QuorumSetting::One));
        assert_eq!(b.w, Some(QuorumSetting::Count(2)));
        assert!(b.workload.load);
        assert_eq!(b.output, OutputFormat::Json);
    }

    #[test]
    fn context_cache_keeps_the_newest_context_per_key() {
        let cache = ContextCache::new(4);
        assert!(cache.get(b"a").is_empty());
        cache.put(Bytes::from_static(b"a"), Bytes::from_static(b"ctx1"));
        cache.put(Bytes::from_static(b"a"), Bytes::from_static(b"ctx2"));
        assert_eq!(cache.get(b"a"), Bytes::from_static(b"ctx2"));
        // Another key never gets a's context, even when it shares a's slot.
        assert!(cache.get(b"b").is_empty());
    }

    #[test]
    fn grpc_code_names_round_trip() {
        assert_eq!(
            code_from_name("UNAVAILABLE"),
            Some(tonic::Code::Unavailable)
        );
        assert_eq!(code_from_name("ABORTED"), Some(tonic::Code::Aborted));
        assert_eq!(code_from_name("nope"), None);
    }
}
