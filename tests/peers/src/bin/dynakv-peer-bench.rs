//! `dynakv-peer-bench`: runs a `dynakv bench` workload against a peer database, with the same
//! flags, runner and report, so the two can be compared line by line.
//!
//! ```text
//! dynakv-peer-bench etcd --endpoints 127.0.0.1:2379,127.0.0.1:22379,127.0.0.1:32379 -W W -c 64
//! ```

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use dynakv_node::cli::OutputFormat;
use dynakv_node::cli::bench::{Target, WorkloadArgs, fail, run_and_print, split_endpoints};
use dynakv_peers::etcd::EtcdDriver;

/// Client ports of the three members `scripts/etcd-cluster.sh` starts.
const DEFAULT_ETCD_ENDPOINTS: &str = "127.0.0.1:2379,127.0.0.1:22379,127.0.0.1:32379";

#[derive(Parser, Debug)]
#[command(
    name = "dynakv-peer-bench",
    about = "Run a `dynakv bench` workload against a peer database"
)]
struct Cli {
    #[command(subcommand)]
    peer: Peer,
}

#[derive(Subcommand, Debug)]
enum Peer {
    /// etcd v3 (gRPC): Range / Put / Txn.
    Etcd(EtcdArgs),
}

#[derive(clap::Args, Debug)]
struct EtcdArgs {
    #[command(flatten)]
    workload: WorkloadArgs,
    /// etcd members' client URLs or host:port, comma-separated.
    #[arg(long, short = 'e', default_value = DEFAULT_ETCD_ENDPOINTS)]
    endpoint: String,
    /// Serializable reads (served by the member asked; may be stale) instead of linearizable.
    #[arg(long)]
    serializable: bool,
    /// Per-request client deadline in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    timeout_ms: u64,
    /// Report format.
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
}

#[tokio::main]
async fn main() -> ExitCode {
    let Peer::Etcd(args) = Cli::parse().peer;
    if let Err(e) = args.workload.validate() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let endpoints = split_endpoints(&args.endpoint);
    let channels = args.workload.channels.unwrap_or(endpoints.len().max(1));
    let driver = match EtcdDriver::connect(
        &endpoints,
        channels,
        Duration::from_millis(args.timeout_ms),
        args.serializable,
    )
    .await
    {
        Ok(d) => d,
        Err(s) => return fail(args.output, s.code(), s.message()),
    };
    let target = Target {
        driver: "etcd".into(),
        endpoints: endpoints.join(","),
        channels,
        consistency: if args.serializable {
            "serializable reads; writes committed by raft (fsync on a majority)".into()
        } else {
            "linearizable reads; writes committed by raft (fsync on a majority)".into()
        },
    };
    run_and_print(driver, &args.workload, target, args.output).await
}
