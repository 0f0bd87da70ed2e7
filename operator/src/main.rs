//! `dynakv-operator`: `run` reconciles KVClusters; `crd` prints the CustomResourceDefinition.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use dynakv_operator::admin::{Addressing, GrpcAdmin};
use dynakv_operator::controller::{self, Context};
use dynakv_operator::crd::KVCluster;
use dynakv_operator::http::{self, Health};
use dynakv_operator::leader::LeaderElector;
use dynakv_operator::metrics::Metrics;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Client;
use kube::api::{Api, ListParams};
use kube::runtime::events::{Recorder, Reporter};

#[derive(Parser)]
#[command(
    name = "dynakv-operator",
    version,
    about = "Kubernetes operator for DynaKV clusters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the KVCluster CustomResourceDefinition as YAML.
    Crd,
    /// Run the controller.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "DYNAKV_OPERATOR_HTTP", default_value = "0.0.0.0:8080")]
    http_listen: SocketAddr,
    /// Watch this namespace only (default: all namespaces).
    #[arg(long, env = "DYNAKV_OPERATOR_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Take a Lease before reconciling, so that only one of several replicas acts.
    #[arg(long, env = "DYNAKV_OPERATOR_LEADER_ELECTION")]
    leader_election: bool,
    /// Namespace of the leader Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, default_value = "dynakv-operator-leader")]
    lease_name: String,
    /// This replica's identity in the Lease (the pod name).
    #[arg(long, env = "POD_NAME", default_value = "dynakv-operator")]
    identity: String,
    /// Dial a pod's Admin service at this address instead of its DNS name: POD=HOST:PORT,
    /// repeated (an operator run outside the cluster, tests against local processes).
    #[arg(long = "admin-address", value_name = "POD=HOST:PORT")]
    admin_addresses: Vec<String>,
    /// Deadline of one Admin request, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    admin_timeout_ms: u64,
    /// Log as JSON lines (default: text).
    #[arg(long, env = "DYNAKV_OPERATOR_LOG_JSON")]
    log_json: bool,
}

fn parse_addresses(list: &[String]) -> anyhow::Result<Addressing> {
    if list.is_empty() {
        return Ok(Addressing::ClusterDns);
    }
    let mut map = BTreeMap::new();
    for entry in list {
        let Some((pod, addr)) = entry.split_once('=') else {
            bail!("--admin-address {entry:?}: expected POD=HOST:PORT");
        };
        map.insert(pod.to_string(), addr.to_string());
    }
    Ok(Addressing::Static(map))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = ctrl_c.await;
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if args.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }

    let addressing = parse_addresses(&args.admin_addresses)?;
    let metrics = Arc::new(Metrics::new().context("registering metrics")?);
    let health = Arc::new(Health::default());
    let listener = tokio::net::TcpListener::bind(args.http_listen)
        .await
        .with_context(|| format!("binding {}", args.http_listen))?;
    tokio::spawn(http::serve(
        listener,
        metrics.clone(),
        health.clone(),
        shutdown_signal(),
    ));

    let client = Client::try_default()
        .await
        .context("no Kubernetes client configuration (in-cluster or kubeconfig)")?;
    let kvcs: Api<KVCluster> = match &args.watch_namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    kvcs.list(&ListParams::default().limit(1)).await.context(
        "cannot list KVClusters: is the CRD installed? (dynakv-operator crd | kubectl apply -f -)",
    )?;
    health.set_ready(true);

    let mut elector = None;
    if args.leader_election {
        let e = LeaderElector {
            api: Api::<Lease>::namespaced(client.clone(), &args.lease_namespace),
            name: args.lease_name.clone(),
            identity: args.identity.clone(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(4),
        };
        tracing::info!(lease = %args.lease_name, identity = %args.identity, "waiting for the leader Lease");
        tokio::select! {
            r = e.acquire() => r?,
            _ = shutdown_signal() => return Ok(()),
        }
        tracing::info!("leading");
        elector = Some(e);
    }
    metrics.leader.set(1);

    let reporter = Reporter {
        controller: "dynakv-operator".into(),
        instance: Some(args.identity.clone()),
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        Recorder::new(client.clone(), reporter),
        Arc::new(GrpcAdmin::new(
            addressing,
            Duration::from_millis(args.admin_timeout_ms),
        )),
        metrics.clone(),
        k8s_openapi::jiff::Timestamp::now,
    ));
    let controller = controller::run(client, ctx, args.watch_namespace.clone(), shutdown_signal());
    match elector {
        Some(e) => {
            tokio::select! {
                _ = controller => Ok(()),
                lost = e.hold() => {
                    metrics.leader.set(0);
                    Err(anyhow::Error::new(lost).context("leadership ended; exiting so that a new leader takes over"))
                }
            }
        }
        None => {
            controller.await;
            Ok(())
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!(
                "{}",
                dynakv_operator::crd_yaml().context("rendering the CRD")?
            );
            Ok(())
        }
        Command::Run(args) => run(args).await,
    }
}
