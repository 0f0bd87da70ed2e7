//! The `dynakv` command line: the server (`serve`, `dev`) and the client tools (`put`, `get`,
//! `delete`, `cluster status`, `ring`).

pub mod bench;
pub mod client;
pub mod cluster;
pub mod commands;
pub mod dev;
pub mod output;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::QuorumSetting;

/// Default client endpoints: the nodes of a `dynakv dev` cluster.
pub const DEFAULT_ENDPOINTS: &str = "127.0.0.2:7100,127.0.0.3:7100,127.0.0.4:7100";

#[derive(Parser, Debug)]
#[command(
    name = "dynakv",
    version,
    about = "DynaKV: a Dynamo-style key-value store",
    long_about = "DynaKV: a Dynamo-style key-value store.\n\n\
        Start a local cluster with `dynakv dev`, then `dynakv put KEY VALUE` and `dynakv get KEY`.",
    after_help = "Exit codes of client commands: 0 ok, 1 other error, 2 usage, 3 invalid argument, \
        4 unavailable (quorum not reached or no node reachable), 5 deadline exceeded, \
        6 resource exhausted (overloaded or too many siblings), 7 unauthenticated or permission \
        denied."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a node.
    Serve(Box<ServeArgs>),
    /// Run a local cluster on loopback (one address per node), for trying DynaKV out.
    Dev(dev::DevArgs),
    /// Write a value.
    Put(PutArgs),
    /// Read every sibling of a key and its context.
    Get(GetArgs),
    /// Delete a key (writes a tombstone covering the given context).
    Delete(DeleteArgs),
    /// Cluster administration.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Measure throughput and latency with YCSB-style workloads (default target: the dev cluster).
    Bench(bench::BenchArgs),
    /// Print the ring's ownership table for a set of nodes (no cluster needed).
    Ring(RingArgs),
    /// Issue a node certificate from a local throwaway CA (the one `dynakv dev` made), for a
    /// node added to a dev cluster by hand: writes `<dir>/<node>.pem` and `<dir>/<node>-key.pem`.
    Cert(CertArgs),
    /// Make a bearer token for a client: prints the token (give it to the client) and the
    /// `auth.tokens` entry that holds only its SHA-256 (put it in every node's config).
    Token(TokenArgs),
}

#[derive(Args, Debug)]
pub struct TokenArgs {
    /// Who holds the token (shown in errors and logs, never the token itself).
    #[arg(long)]
    pub name: String,
    /// read, write or admin.
    #[arg(long, value_parser = ["read", "write", "admin"])]
    pub role: String,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Members (state, lifecycle, weight and target, ownership), the ring version, and the ring
    /// change under way with its progress, as the node sees them.
    Status(StatusArgs),
    /// Ramp a member that joined through --seed (at weight 0) up to a weight in steps, each
    /// step's handoff done before the next (waits until the last step is done).
    Join(cluster::JoinArgs),
    /// Set a member's weight (one ring change; --wait follows it to the end).
    Weight(cluster::WeightArgs),
    /// Drain a member: weight 0, every range handed over, then lifecycle "left".
    Leave(cluster::NodeArgs),
    /// Forget a member that is down for good; its ranges are re-replicated from the survivors.
    Remove(cluster::NodeArgs),
    /// Compare every pair of replicas' Merkle roots (identical roots = identical shared keys) and
    /// show hint queues.
    Roots(StatusArgs),
}

/// How a client proves who it is and checks whom it talks to.
#[derive(Args, Debug, Clone, Default)]
pub struct CredentialArgs {
    /// CA certificate (PEM) that signed the nodes' certificates; turns TLS on. Default: the CA
    /// of the `dynakv dev` cluster serving the endpoint on this machine, if any.
    #[arg(long, env = "DYNAKV_CA")]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) naming a role (URI SAN urn:dynakv:role:<role>). Default with
    /// a dev cluster's CA and no --token: that cluster's admin certificate.
    #[arg(long, env = "DYNAKV_CERT", requires = "cert_key")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long = "key", id = "cert_key", env = "DYNAKV_KEY", requires = "cert")]
    pub cert_key: Option<PathBuf>,
    /// Bearer token, sent as `authorization: Bearer <token>`.
    #[arg(long, env = "DYNAKV_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Plain text, without looking for a dev cluster's CA.
    #[arg(long, conflicts_with = "ca")]
    pub plaintext: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// Node(s) to talk to, comma-separated host:port; the next is tried when one is unreachable.
    #[arg(long, short = 'e', env = "DYNAKV_ENDPOINT", default_value = DEFAULT_ENDPOINTS)]
    pub endpoint: String,
    #[command(flatten)]
    pub credentials: CredentialArgs,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    /// Request deadline in milliseconds (default: the node's).
    #[arg(long)]
    pub timeout_ms: Option<u32>,
    /// Count only the key's primary replicas (no fallbacks) toward the quorum.
    #[arg(long)]
    pub strict: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Args, Debug)]
pub struct PutArgs {
    pub key: String,
    /// The value; omit it with --file, or pass "-" to read standard input (binary-safe).
    pub value: Option<String>,
    /// Read the value from this file (binary-safe).
    #[arg(long, short = 'f', conflicts_with = "value")]
    pub file: Option<PathBuf>,
    /// Context from the read this write is based on (base64, as `get` prints it).
    #[arg(long, short = 'c', default_value = "")]
    pub context: String,
    /// Write quorum: ONE, QUORUM, ALL or a number of replicas.
    #[arg(long, short = 'w')]
    pub w: Option<QuorumSetting>,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args, Debug)]
pub struct GetArgs {
    pub key: String,
    /// Read quorum: ONE, QUORUM, ALL or a number of replicas.
    #[arg(long, short = 'r')]
    pub r: Option<QuorumSetting>,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    pub key: String,
    /// Context from the read the delete is based on (base64). Without it, the delete covers
    /// whatever a read at the same consistency returns first.
    #[arg(long, short = 'c')]
    pub context: Option<String>,
    #[arg(long, short = 'w')]
    pub w: Option<QuorumSetting>,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args, Debug)]
pub struct RingArgs {
    /// Number of equally weighted nodes, named n1..nN.
    #[arg(long, conflicts_with = "node")]
    pub nodes: Option<usize>,
    /// A node as id[:weight[:zone]]; repeat for each node.
    #[arg(long)]
    pub node: Vec<String>,
    /// Virtual nodes of a node of weight 100.
    #[arg(long, default_value_t = dynakv_core::ring::DEFAULT_VNODES_PER_NODE)]
    pub vnodes: u32,
    /// Replication factor.
    #[arg(long, short = 'n', default_value_t = 3)]
    pub n: usize,
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

/// `dynakv serve`: every flag overrides the config file's field of the same name.
#[derive(Args, Debug, Default)]
#[command(
    after_help = "Every config field, its default and meaning: docs/configuration.md, or \
        `dynakv serve --print-config` for the effective YAML."
)]
pub struct ServeArgs {
    /// YAML config file (see --print-config for every field with its default and meaning).
    #[arg(long, short = 'c', env = "DYNAKV_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration as YAML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Stable node name (config: node_id). Persisted in the data directory.
    #[arg(long)]
    pub node_id: Option<String>,
    /// Cluster name (config: cluster_id). Persisted in the data directory.
    #[arg(long)]
    pub cluster_id: Option<String>,
    /// gRPC listen address, also the source IP of peer connections (config: listen).
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// Address peers and clients use to reach this node (config: advertise; default: listen).
    #[arg(long)]
    pub advertise: Option<String>,
    /// HTTP address for /metrics (config: metrics_listen).
    #[arg(long)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Database directory (config: data_dir).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Ring weight at the first start, 100 normal, 0 owns nothing (config: weight; default 100,
    /// or 0 for a node that joins through --seed).
    #[arg(long)]
    pub weight: Option<u32>,
    /// A node of a running cluster to join through, as host:port (DNS names allowed); repeat
    /// for several (config: seeds). A node not in any --member list joins at weight 0.
    #[arg(long = "seed")]
    pub seeds: Vec<String>,
    /// Failure zone (config: zone).
    #[arg(long)]
    pub zone: Option<String>,
    /// A cluster member as id=host:port; repeat for each (config: members). Include this node.
    #[arg(long = "member")]
    pub members: Vec<String>,
    /// Replicas per key (config: replication.n).
    #[arg(long, short = 'n')]
    pub n: Option<u32>,
    /// Default read quorum (config: replication.read_quorum).
    #[arg(long)]
    pub read_quorum: Option<QuorumSetting>,
    /// Default write quorum (config: replication.write_quorum).
    #[arg(long)]
    pub write_quorum: Option<QuorumSetting>,
    /// "siblings" or "lww" (config: replication.conflict_mode).
    #[arg(long)]
    pub conflict_mode: Option<String>,
    /// Virtual nodes per node of weight 100 (config: replication.vnodes_per_node).
    #[arg(long)]
    pub vnodes_per_node: Option<u32>,
    /// Largest key in bytes (config: limits.max_key_bytes).
    #[arg(long)]
    pub max_key_bytes: Option<usize>,
    /// Largest value in bytes (config: limits.max_value_bytes).
    #[arg(long)]
    pub max_value_bytes: Option<usize>,
    /// Default request deadline in ms (config: limits.request_timeout_ms).
    #[arg(long)]
    pub request_timeout_ms: Option<u64>,
    /// "text" or "json" logs (config: log.format).
    #[arg(long)]
    pub log_format: Option<String>,
    /// This node's certificate chain, PEM (config: tls.cert); with --tls-key and --tls-ca,
    /// turns TLS and authentication on.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// Private key of --tls-cert (config: tls.key).
    #[arg(long, requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,
    /// CA that signs node and client certificates (config: tls.ca).
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct CertArgs {
    /// Directory of the CA (`ca.pem`, `ca-key.pem`), created with a new throwaway CA if it
    /// has none; `dynakv dev` keeps its CA in `<data-dir>/tls`.
    #[arg(long, default_value = ".dynakv/dev/tls")]
    pub dir: PathBuf,
    /// Node id the certificate names (URI SAN urn:dynakv:node:<id>).
    #[arg(long)]
    pub node: String,
    /// IP address the node listens on (the certificate is valid for it and for localhost).
    #[arg(long)]
    pub ip: std::net::IpAddr,
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_definition_is_consistent() {
        // Clap checks argument ids, conflicts and requirements only when a command is parsed;
        // this checks every subcommand at once.
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
