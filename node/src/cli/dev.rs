//! `dynakv dev`: a local cluster on loopback, one address per node (127.0.0.2, 127.0.0.3, ...),
//! each node a real `dynakv serve` process with its own data directory under one root. Started
//! again with the same root, it keeps its data.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use tokio::process::{Child, Command};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::client::{Credentials, record_dev_tls_dir};
use crate::config::{Config, ConflictMode, MemberConfig, QuorumSetting, TlsConfig};
use crate::tls::DevPki;

#[derive(Args, Debug, Clone)]
pub struct DevArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    pub nodes: u8,
    /// Replicas per key (at most the number of nodes).
    #[arg(short = 'n', long, default_value_t = 3)]
    pub n: u32,
    /// Root of the nodes' data directories (and their generated config files).
    #[arg(long, default_value = ".dynakv/dev")]
    pub data_dir: PathBuf,
    /// Address of the first node; node i listens on this address plus i.
    #[arg(long, default_value = "127.0.0.2")]
    pub base_ip: Ipv4Addr,
    /// gRPC port of every node.
    #[arg(long, default_value_t = 7100)]
    pub port: u16,
    /// Metrics port of every node.
    #[arg(long, default_value_t = 9100)]
    pub metrics_port: u16,
    /// "siblings" or "lww".
    #[arg(long, default_value = "siblings")]
    pub conflict_mode: String,
    /// Default read quorum.
    #[arg(long, default_value = "quorum")]
    pub read_quorum: QuorumSetting,
    /// Default write quorum.
    #[arg(long, default_value = "quorum")]
    pub write_quorum: QuorumSetting,
    /// Set any node config field, e.g. `--set anti_entropy.interval_ms=1000` (repeatable; see
    /// docs/configuration.md).
    #[arg(long = "set", value_name = "FIELD=VALUE")]
    pub set: Vec<String>,
    /// Plain text and no authentication. By default the cluster uses TLS everywhere, with a
    /// throwaway CA, node certificates and an admin client certificate written to
    /// `<data-dir>/tls`, and requires credentials; client commands on this machine find them on
    /// their own.
    #[arg(long)]
    pub insecure: bool,
}

/// Applies `field.path=value` overrides to a config through its serialized form, so every field
/// is reachable and validated exactly as in a config file.
pub fn apply_overrides(config: &Config, sets: &[String]) -> Result<Config, String> {
    let mut value = serde_json::to_value(config).map_err(|e| e.to_string())?;
    for set in sets {
        let (path, raw) = set
            .split_once('=')
            .ok_or_else(|| format!("--set {set:?}: expected FIELD=VALUE"))?;
        let new: serde_json::Value =
            serde_json::from_str(raw).unwrap_or_else(|_| serde_json::Value::String(raw.into()));
        let mut slot = &mut value;
        for part in path.split('.') {
            slot = slot.get_mut(part).ok_or_else(|| {
                format!("--set {set:?}: no field {path:?} (see docs/configuration.md)")
            })?;
        }
        *slot = new;
    }
    serde_json::from_value(value).map_err(|e| format!("--set: {e}"))
}

#[derive(Debug)]
struct DevNode {
    id: String,
    grpc: SocketAddr,
    metrics: SocketAddr,
    config_path: PathBuf,
}

fn plan(args: &DevArgs) -> Result<(Vec<DevNode>, Vec<Config>), String> {
    if args.nodes == 0 || args.nodes > 100 {
        return Err("--nodes must be 1..=100".into());
    }
    if args.n == 0 || args.n > u32::from(args.nodes) {
        return Err(format!(
            "-n {} is not possible with {} nodes: use 1..={}",
            args.n, args.nodes, args.nodes
        ));
    }
    let conflict_mode = match args.conflict_mode.as_str() {
        "siblings" => ConflictMode::Siblings,
        "lww" => ConflictMode::Lww,
        other => return Err(format!("--conflict-mode {other:?}: use siblings or lww")),
    };
    let base = u32::from(args.base_ip);
    let nodes: Vec<DevNode> = (0..args.nodes)
        .map(|i| {
            let ip = IpAddr::V4(Ipv4Addr::from(base + u32::from(i)));
            let id = format!("n{}", i + 1);
            DevNode {
                config_path: args.data_dir.join(&id).join("config.yaml"),
                grpc: SocketAddr::new(ip, args.port),
                metrics: SocketAddr::new(ip, args.metrics_port),
                id,
            }
        })
        .collect();
    let members: Vec<MemberConfig> = nodes
        .iter()
        .map(|n| MemberConfig {
            id: n.id.clone(),
            address: n.grpc.to_string(),
            metrics: Some(n.metrics.to_string()),
            weight: 100,
            zone: None,
        })
        .collect();
    let pki = tls_dir(args).map(|dir| DevPki::at(&dir));
    let configs = nodes
        .iter()
        .map(|n| {
            let mut c = Config {
                node_id: n.id.clone(),
                cluster_id: "dynakv-dev".into(),
                listen: n.grpc,
                metrics_listen: Some(n.metrics),
                data_dir: args.data_dir.join(&n.id).join("data"),
                members: members.clone(),
                ..Config::default()
            };
            c.replication.n = args.n;
            c.replication.conflict_mode = conflict_mode;
            c.replication.read_quorum = args.read_quorum;
            c.replication.write_quorum = args.write_quorum;
            c.tls = pki.as_ref().map(|pki| TlsConfig {
                cert: pki.node_cert(&n.id),
                key: pki.node_key(&n.id),
                ca: pki.ca.clone(),
                ..TlsConfig::default()
            });
            apply_overrides(&c, &args.set)
        })
        .collect::<Result<Vec<_>, String>>()?;
    for c in &configs {
        c.clone().validate().map_err(|e| e.to_string())?;
    }
    Ok((nodes, configs))
}

/// Where the cluster's certificates go (absolute, as client commands find it from anywhere), or
/// `None` with `--insecure`.
fn tls_dir(args: &DevArgs) -> Option<PathBuf> {
    (!args.insecure).then(|| {
        let dir = args.data_dir.join("tls");
        std::path::absolute(&dir).unwrap_or(dir)
    })
}

fn write_config(path: &Path, config: &Config) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let text = format!(
        "# Written by `dynakv dev`; regenerated at every start.\n# Run this node alone with: dynakv serve --config {}\n{}",
        path.display(),
        config.to_yaml()
    );
    std::fs::write(path, text)
}

async fn wait_serving(addr: SocketAddr, credentials: &Credentials, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if serving(addr, credentials).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

async fn serving(addr: SocketAddr, credentials: &Credentials) -> bool {
    let Ok(ep) = credentials.endpoint(&addr.to_string()) else {
        return false;
    };
    let Ok(ch) = credentials.connect(ep, Duration::from_millis(300)).await else {
        return false;
    };
    let check = HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await;
    matches!(check, Ok(r) if r.get_ref().status == ServingStatus::Serving as i32)
}

fn terminate(child: &Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) with a pid we spawned and still own; no memory is touched.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
}

pub async fn run(args: DevArgs) -> ExitCode {
    let (nodes, configs) = match plan(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: cannot find the dynakv binary: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut children: Vec<(String, Child)> = Vec::new();
    println!(
        "dynakv dev: {} nodes, n={}, data in {}",
        args.nodes,
        args.n,
        args.data_dir.display()
    );
    let credentials = match prepare_tls(&args, &nodes) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    for (node, config) in nodes.iter().zip(&configs) {
        if let Err(e) = write_config(&node.config_path, config) {
            eprintln!("error: cannot write {}: {e}", node.config_path.display());
            stop_all(&mut children).await;
            return ExitCode::FAILURE;
        }
        let log_path = node.config_path.with_file_name("node.log");
        let log = match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
        {
            Ok(f) => f,
            Err(e) => {
                eprintln!("error: cannot open {}: {e}", log_path.display());
                stop_all(&mut children).await;
                return ExitCode::FAILURE;
            }
        };
        let mut command = Command::new(&exe);
        command
            .arg("serve")
            .arg("--config")
            .arg(&node.config_path)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        // A node must not outlive `dynakv dev`, however it ends (kill -9 included): a node left
        // on these addresses would take part in the next dev cluster with its old data.
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn();
        match child {
            Ok(c) => {
                println!(
                    "  {:<4} grpc {}  metrics http://{}/metrics  pid {}  log {}",
                    node.id,
                    node.grpc,
                    node.metrics,
                    c.id().unwrap_or(0),
                    log_path.display()
                );
                children.push((node.id.clone(), c));
            }
            Err(e) => {
                eprintln!("error: cannot start {}: {e}", node.id);
                stop_all(&mut children).await;
                return ExitCode::FAILURE;
            }
        }
    }
    for node in &nodes {
        if !wait_serving(node.grpc, &credentials, Duration::from_secs(30)).await {
            eprintln!(
                "error: {} did not become ready within 30 s; see {}",
                node.id,
                node.config_path.with_file_name("node.log").display()
            );
            stop_all(&mut children).await;
            return ExitCode::FAILURE;
        }
    }
    let endpoints: Vec<String> = nodes.iter().map(|n| n.grpc.to_string()).collect();
    println!(
        "ready: {} nodes serving at {}",
        nodes.len(),
        endpoints.join(",")
    );
    println!("try: dynakv put hello world && dynakv get hello && dynakv cluster status");
    println!(
        "Ctrl-C stops the cluster; its data stays in {}",
        args.data_dir.display()
    );

    // Run until Ctrl-C / SIGTERM; report nodes that exit on their own.
    let shutdown = super::commands::shutdown_signal();
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => {
                for (id, child) in children.iter_mut() {
                    if let Ok(Some(status)) = child.try_wait() {
                        println!("node {id} exited ({status})");
                    }
                }
                children.retain_mut(|(_, c)| !matches!(c.try_wait(), Ok(Some(_))));
            }
        }
    }
    println!("stopping {} nodes...", children.len());
    stop_all(&mut children).await;
    for node in &nodes {
        let _ = record_dev_tls_dir(&node.grpc.to_string(), None);
    }
    println!("stopped");
    ExitCode::SUCCESS
}

/// Writes the throwaway CA and certificates (unless `--insecure`), records where they are for
/// client commands on this machine, and returns the credentials to check the nodes with.
fn prepare_tls(args: &DevArgs, nodes: &[DevNode]) -> Result<Credentials, String> {
    let Some(dir) = tls_dir(args) else {
        eprintln!(
            "WARNING: --insecure: TLS and authentication are OFF. Anyone who can reach these \
             addresses can read and write every key. Use it only on a machine of your own."
        );
        for node in nodes {
            record_dev_tls_dir(&node.grpc.to_string(), None)
                .map_err(|e| format!("cannot clear the dev cluster registry: {e}"))?;
        }
        return Ok(Credentials::default());
    };
    let ids: Vec<(String, IpAddr)> = nodes.iter().map(|n| (n.id.clone(), n.grpc.ip())).collect();
    let pki = crate::tls::write_dev_pki(&dir, &ids).map_err(|e| e.to_string())?;
    for node in nodes {
        record_dev_tls_dir(&node.grpc.to_string(), Some(&dir)).map_err(|e| {
            format!(
                "cannot record the cluster's TLS directory in {}: {e}",
                super::client::dev_registry().display()
            )
        })?;
    }
    println!(
        "  TLS on, credentials required: CA {}, admin client certificate {} (client commands on \
         this machine use them on their own; elsewhere pass --ca, --cert and --key)",
        pki.ca.display(),
        pki.client_cert.display()
    );
    Credentials::from_files(
        Some(&pki.ca),
        Some((&pki.client_cert, &pki.client_key)),
        None,
    )
    .map_err(|e| e.message)
}

async fn stop_all(children: &mut Vec<(String, Child)>) {
    for (_, c) in children.iter() {
        terminate(c);
    }
    for (id, c) in children.iter_mut() {
        match tokio::time::timeout(Duration::from_secs(10), c.wait()).await {
            Ok(_) => {}
            Err(_) => {
                eprintln!("{id} did not stop within 10 s; killing it");
                let _ = c.kill().await;
            }
        }
    }
    children.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> DevArgs {
        DevArgs {
            nodes: 3,
            n: 3,
            data_dir: PathBuf::from("/tmp/x"),
            base_ip: Ipv4Addr::new(127, 0, 0, 2),
            port: 7100,
            metrics_port: 9100,
            conflict_mode: "siblings".into(),
            read_quorum: QuorumSetting::Quorum,
            write_quorum: QuorumSetting::Quorum,
            set: Vec::new(),
            insecure: false,
        }
    }

    #[test]
    fn set_reaches_nested_fields_and_refuses_unknown_ones() {
        let mut a = args();
        a.set = vec!["hints.max_per_target=0".into(), "log.format=json".into()];
        let (_, configs) = plan(&a).unwrap();
        assert_eq!(configs[0].hints.max_per_target, 0);
        assert_eq!(configs[0].log.format, "json");
        a.set = vec!["hints.max_per_targt=0".into()];
        assert!(plan(&a).unwrap_err().contains("no field"));
    }

    #[test]
    fn each_dev_node_gets_its_own_loopback_address() {
        let (nodes, configs) = plan(&args()).unwrap();
        let ips: Vec<String> = nodes.iter().map(|n| n.grpc.ip().to_string()).collect();
        assert_eq!(ips, ["127.0.0.2", "127.0.0.3", "127.0.0.4"]);
        assert!(configs.iter().all(|c| c.members.len() == 3));
        let tls = configs[1].tls.as_ref().expect("TLS by default");
        assert_eq!(tls.cert, PathBuf::from("/tmp/x/tls/n2.pem"));
        assert_eq!(tls.ca, PathBuf::from("/tmp/x/tls/ca.pem"));
        let mut insecure = args();
        insecure.insecure = true;
        assert!(plan(&insecure).unwrap().1.iter().all(|c| c.tls.is_none()));
    }

    #[test]
    fn n_larger_than_the_cluster_is_refused() {
        let mut a = args();
        a.n = 4;
        assert!(plan(&a).unwrap_err().contains("-n 4"));
    }
}
