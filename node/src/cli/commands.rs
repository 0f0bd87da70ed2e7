//! What each subcommand does.

use std::io::{Read, Write};
use std::process::ExitCode;

use serde_json::json;

use crate::config::{Config, ConflictMode, MemberConfig, ValidConfig};
use crate::proto::admin_client::AdminClient;
use crate::proto::kv_client::KvClient;
use crate::proto::{self, ClusterStatusRequest, NodeStatusRequest};

use super::client::{self, ClientError, code_name};
use super::output::{b64, receipt_json, receipt_text, sibling_json, value_json};
use super::{
    ClientArgs, DeleteArgs, GetArgs, OutputFormat, PutArgs, RingArgs, ServeArgs, StatusArgs,
};

/// Builds the node configuration from the file (if any) and the flags, then validates it.
pub fn serve_config(args: &ServeArgs) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
            Config::from_yaml(&text)
                .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?
        }
        None => Config::default(),
    };
    macro_rules! set {
        ($field:expr, $value:expr) => {
            if let Some(v) = $value.clone() {
                $field = v;
            }
        };
    }
    set!(config.node_id, args.node_id);
    set!(config.cluster_id, args.cluster_id);
    set!(config.listen, args.listen);
    if args.advertise.is_some() {
        config.advertise = args.advertise.clone();
    }
    if args.metrics_listen.is_some() {
        config.metrics_listen = args.metrics_listen;
    }
    set!(config.data_dir, args.data_dir);
    if args.weight.is_some() {
        config.weight = args.weight;
    }
    if !args.seeds.is_empty() {
        config.seeds = args.seeds.clone();
    }
    if args.zone.is_some() {
        config.zone = args.zone.clone();
    }
    if !args.members.is_empty() {
        config.members = args
            .members
            .iter()
            .map(|m| {
                let (id, address) = m
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("--member {m:?}: expected id=host:port"))?;
                Ok(MemberConfig {
                    id: id.to_string(),
                    address: address.to_string(),
                    metrics: None,
                    weight: 100,
                    zone: None,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
    }
    set!(config.replication.n, args.n);
    set!(config.replication.read_quorum, args.read_quorum);
    set!(config.replication.write_quorum, args.write_quorum);
    if let Some(mode) = &args.conflict_mode {
        config.replication.conflict_mode = match mode.as_str() {
            "siblings" => ConflictMode::Siblings,
            "lww" => ConflictMode::Lww,
            other => anyhow::bail!("--conflict-mode {other:?}: use siblings or lww"),
        };
    }
    set!(config.replication.vnodes_per_node, args.vnodes_per_node);
    set!(config.limits.max_key_bytes, args.max_key_bytes);
    set!(config.limits.max_value_bytes, args.max_value_bytes);
    set!(config.limits.request_timeout_ms, args.request_timeout_ms);
    set!(config.log.format, args.log_format);
    if let (Some(cert), Some(key), Some(ca)) = (&args.tls_cert, &args.tls_key, &args.tls_ca) {
        config.tls = Some(crate::config::TlsConfig {
            cert: cert.clone(),
            key: key.clone(),
            ca: ca.clone(),
            ..config.tls.unwrap_or_default()
        });
    }
    Ok(config)
}

pub fn init_logging(config: &ValidConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.raw.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: node logs usually go to files (dynakv dev, Kubernetes).
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = if config.raw.log.format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

pub async fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    let config = serve_config(args)?;
    if args.print_config {
        print!("{}", config.to_yaml());
        return Ok(());
    }
    let config = config.validate()?;
    init_logging(&config);
    raise_fd_limit(config.raw.limits.max_connections);
    disable_huge_pages();
    let listener = tokio::net::TcpListener::bind(config.raw.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.raw.listen))?;
    let metrics = match config.raw.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for metrics: {e}"))?,
        ),
        None => None,
    };
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let env = crate::server::Env::real(&config)?;
    crate::server::run(incoming, metrics, config, env, shutdown_signal()).await?;
    Ok(())
}

/// `dynakv cert`: a node certificate from the CA in `args.dir`.
pub fn cert(args: super::CertArgs) -> ExitCode {
    if let Err(e) = dynakv_core::NodeId::new(&args.node) {
        eprintln!("error: --node {:?}: {e}", args.node);
        return ExitCode::from(2);
    }
    let dir = std::path::absolute(&args.dir).unwrap_or(args.dir.clone());
    match crate::tls::write_dev_pki(&dir, &[(args.node.clone(), args.ip)]) {
        Ok(pki) => {
            // Client commands on this machine find the CA for this address from now on.
            if let Err(e) = super::client::record_dev_tls_dir(&args.ip.to_string(), Some(&dir)) {
                eprintln!("warning: cannot record the CA for {}: {e}", args.ip);
            }
            println!(
                "{} {} (CA {})",
                pki.node_cert(&args.node).display(),
                pki.node_key(&args.node).display(),
                pki.ca.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `dynakv token`: `dkv_` and 32 random bytes from the operating system in base64url (the prefix
/// keeps a token from starting with `-`, which would read as a flag, and lets secret scanners
/// recognise it), and its digest.
pub fn token(args: super::TokenArgs) -> ExitCode {
    use base64::Engine as _;
    let mut bytes = [0u8; 32];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
        eprintln!("error: the operating system's random source failed");
        return ExitCode::FAILURE;
    }
    let token = format!(
        "dkv_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let sha256 = crate::auth::digest_hex(&token);
    match args.output {
        OutputFormat::Json => println!(
            "{}",
            json!({ "token": token, "name": args.name, "role": args.role, "sha256": sha256 })
        ),
        OutputFormat::Text => {
            println!(
                "token (give it to {}; it is not stored anywhere): {token}",
                args.name
            );
            println!("config entry for every node:");
            println!(
                "auth:\n  tokens:\n    - name: {:?}\n      role: {}\n      sha256: {sha256}",
                args.name, args.role
            );
        }
    }
    ExitCode::SUCCESS
}

/// Raises the soft limit of open files to the hard limit (connections, the database, the log),
/// and warns when `max_connections` does not fit under it with room for the rest.
fn raise_fd_limit(max_connections: usize) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write to and read from the struct we own.
    let raised = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        if limit.rlim_cur < limit.rlim_max {
            let wanted = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
                limit = wanted;
            }
        }
        limit.rlim_cur
    };
    if (max_connections as u64).saturating_add(256) > raised {
        tracing::warn!(
            open_files = raised,
            max_connections,
            "limits.max_connections does not fit under the open file limit: connections past \
             it fail at accept instead of being refused cleanly; lower the setting or raise \
             the limit (ulimit -n)"
        );
    }
}

/// Turns transparent huge pages off for this process, as Redis does at start. mimalloc asks for
/// them on its arenas, and every 2 MiB page faulted back in after it gave memory back is zeroed
/// whole: 5% of a node's CPU under puts, with lower throughput and a longer tail than without
/// (docs/benchmarks.md, "Transparent huge pages").
fn disable_huge_pages() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_THP_DISABLE takes integer arguments and touches no memory of ours.
        let done = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
        if done != 0 {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "could not turn transparent huge pages off"
            );
        }
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Prints a client error in the chosen format and turns it into the exit code.
fn fail(format: OutputFormat, e: ClientError) -> ExitCode {
    match format {
        OutputFormat::Json => {
            println!(
                "{}",
                json!({ "error": { "code": code_name(e.code), "message": e.message } })
            );
        }
        OutputFormat::Text => eprintln!("error: {}: {}", code_name(e.code), e.message),
    }
    ExitCode::from(e.exit_code())
}

async fn kv(args: &ClientArgs) -> Result<KvClient<client::Conn>, ClientError> {
    // The node enforces --timeout-ms; the channel bound only guards against a node that never
    // answers at all.
    let bound = args
        .timeout_ms
        .map_or(client::DEFAULT_REQUEST_TIMEOUT, |ms| {
            std::time::Duration::from_millis(u64::from(ms) + 1000)
        });
    let (channel, _) = client::connect_with_timeout(
        &args.endpoint,
        &client::Credentials::from_args(&args.credentials, &args.endpoint)?,
        bound,
    )
    .await?;
    Ok(KvClient::new(channel)
        .max_decoding_message_size(crate::peer::MAX_PEER_MESSAGE_BYTES)
        .max_encoding_message_size(crate::peer::MAX_PEER_MESSAGE_BYTES))
}

fn read_value(args: &PutArgs) -> Result<Vec<u8>, ClientError> {
    if let Some(path) = &args.file {
        return std::fs::read(path)
            .map_err(|e| ClientError::invalid(format!("cannot read {}: {e}", path.display())));
    }
    match args.value.as_deref() {
        Some("-") | None => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .map_err(|e| ClientError::invalid(format!("cannot read standard input: {e}")))?;
            Ok(buf)
        }
        Some(v) => Ok(v.as_bytes().to_vec()),
    }
}

pub async fn put(args: PutArgs) -> ExitCode {
    let format = args.client.output;
    let result = async {
        let value = read_value(&args)?;
        let context = client::decode_context(&args.context)?;
        let mut kv = kv(&args.client).await?;
        let resp = kv
            .put(proto::PutRequest {
                key: args.key.clone().into_bytes().into(),
                value: value.into(),
                context,
                consistency: Some(client::consistency(&args.client, None, args.w)),
            })
            .await?
            .into_inner();
        Ok::<_, ClientError>(resp)
    }
    .await;
    match result {
        Err(e) => fail(format, e),
        Ok(resp) => {
            match format {
                OutputFormat::Json => println!(
                    "{}",
                    json!({
                        "key": args.key,
                        "context": b64(&resp.context),
                        "receipt": receipt_json(resp.receipt.as_ref()),
                    })
                ),
                OutputFormat::Text => {
                    println!("ok");
                    println!("context: {}", b64(&resp.context));
                    eprintln!("{}", receipt_text(resp.receipt.as_ref()));
                }
            }
            ExitCode::SUCCESS
        }
    }
}

pub async fn get(args: GetArgs) -> ExitCode {
    let format = args.client.output;
    let result = async {
        let mut kv = kv(&args.client).await?;
        Ok::<_, ClientError>(
            kv.get(proto::GetRequest {
                key: args.key.clone().into_bytes().into(),
                consistency: Some(client::consistency(&args.client, args.r, None)),
            })
            .await?
            .into_inner(),
        )
    }
    .await;
    match result {
        Err(e) => fail(format, e),
        Ok(resp) => {
            match format {
                OutputFormat::Json => println!(
                    "{}",
                    json!({
                        "key": args.key,
                        "found": !resp.values.is_empty(),
                        "values": resp.values.iter().map(sibling_json).collect::<Vec<_>>(),
                        "context": b64(&resp.context),
                        "receipt": receipt_json(resp.receipt.as_ref()),
                    })
                ),
                OutputFormat::Text => {
                    if resp.values.is_empty() {
                        eprintln!("(not found)");
                    }
                    let mut out = std::io::stdout().lock();
                    for (i, s) in resp.values.iter().enumerate() {
                        if resp.values.len() > 1 {
                            let _ = writeln!(out, "--- sibling {} of {}", i + 1, resp.values.len());
                        }
                        match std::str::from_utf8(&s.value) {
                            Ok(text) => {
                                let _ = writeln!(out, "{text}");
                            }
                            Err(_) => {
                                let v = value_json(&s.value);
                                let _ =
                                    writeln!(out, "(base64) {}", v["value"].as_str().unwrap_or(""));
                            }
                        }
                    }
                    let _ = writeln!(out, "context: {}", b64(&resp.context));
                    eprintln!("{}", receipt_text(resp.receipt.as_ref()));
                }
            }
            ExitCode::SUCCESS
        }
    }
}

pub async fn delete(args: DeleteArgs) -> ExitCode {
    let format = args.client.output;
    let result = async {
        let mut kv = kv(&args.client).await?;
        // Without an explicit context, delete what a read sees now (the usual intent of
        // `dynakv delete KEY`); values written concurrently with the delete survive as siblings.
        let context = match &args.context {
            Some(c) => client::decode_context(c)?,
            None => {
                kv.get(proto::GetRequest {
                    key: args.key.clone().into_bytes().into(),
                    consistency: Some(client::consistency(&args.client, None, None)),
                })
                .await?
                .into_inner()
                .context
            }
        };
        Ok::<_, ClientError>(
            kv.delete(proto::DeleteRequest {
                key: args.key.clone().into_bytes().into(),
                context,
                consistency: Some(client::consistency(&args.client, None, args.w)),
            })
            .await?
            .into_inner(),
        )
    }
    .await;
    match result {
        Err(e) => fail(format, e),
        Ok(resp) => {
            match format {
                OutputFormat::Json => println!(
                    "{}",
                    json!({
                        "key": args.key,
                        "deleted": true,
                        "context": b64(&resp.context),
                        "receipt": receipt_json(resp.receipt.as_ref()),
                    })
                ),
                OutputFormat::Text => {
                    println!("deleted");
                    eprintln!("{}", receipt_text(resp.receipt.as_ref()));
                }
            }
            ExitCode::SUCCESS
        }
    }
}

pub async fn cluster_status(args: StatusArgs) -> ExitCode {
    let format = args.client.output;
    let result = async {
        let (channel, endpoint) = client::connect_args(&args.client).await?;
        let resp = AdminClient::new(channel)
            .cluster_status(ClusterStatusRequest {})
            .await?
            .into_inner();
        Ok::<_, ClientError>((resp, endpoint))
    }
    .await;
    let (s, endpoint) = match result {
        Err(e) => return fail(format, e),
        Ok(r) => r,
    };
    match format {
        OutputFormat::Json => println!("{}", super::cluster::status_json(&s, &endpoint)),
        OutputFormat::Text => {
            println!(
                "cluster {}  (as seen by {} at {endpoint})  n={}  conflicts={}  ring {:016x}",
                s.cluster_id, s.node_id, s.replication_factor, s.conflict_mode, s.ring_version
            );
            println!(
                "{:<12} {:<8} {:<9} {:<22} {:>6} {:>6} {:>6} {:>9} {:>9}  zone",
                "MEMBER",
                "STATE",
                "LIFECYCLE",
                "ADDRESS",
                "WEIGHT",
                "TARGET",
                "TOKENS",
                "PRIMARY",
                "REPLICA"
            );
            for m in &s.members {
                println!(
                    "{:<12} {:<8} {:<9} {:<22} {:>6} {:>6} {:>6} {:>8.2}% {:>8.2}%  {}",
                    m.id,
                    m.state,
                    m.lifecycle,
                    m.address,
                    m.weight,
                    m.target_weight,
                    m.tokens,
                    m.primary_ownership * 100.0,
                    m.replica_ownership * 100.0,
                    if m.zone.is_empty() { "-" } else { &m.zone }
                );
            }
            println!("{}", super::cluster::progress_line(&s));
        }
    }
    ExitCode::SUCCESS
}

/// Asks every member for its Merkle roots and compares each pair both ways.
pub async fn cluster_roots(args: StatusArgs) -> ExitCode {
    let format = args.client.output;
    let credentials =
        match client::Credentials::from_args(&args.client.credentials, &args.client.endpoint) {
            Ok(c) => c,
            Err(e) => return fail(format, e),
        };
    let status = async {
        let (channel, _) = client::connect(&args.client.endpoint, &credentials).await?;
        Ok::<_, ClientError>(
            AdminClient::new(channel)
                .cluster_status(ClusterStatusRequest {})
                .await?
                .into_inner(),
        )
    }
    .await;
    let status = match status {
        Ok(s) => s,
        Err(e) => return fail(format, e),
    };
    let mut nodes = Vec::new();
    for m in &status.members {
        let answer = async {
            let (channel, _) = client::connect(&m.address, &credentials).await?;
            Ok::<_, ClientError>(
                AdminClient::new(channel)
                    .node_status(NodeStatusRequest {})
                    .await?
                    .into_inner(),
            )
        }
        .await;
        nodes.push((m.id.clone(), answer.ok()));
    }
    let root = |of: &str, peer: &str| -> Option<String> {
        let (_, s) = nodes.iter().find(|(id, _)| id == of)?;
        let s = s.as_ref()?;
        Some(
            s.roots
                .iter()
                .find(|r| r.peer == peer)
                .map(|r| r.root.clone())
                .unwrap_or_else(|| format!("{:032x}", 0)),
        )
    };
    let mut pairs = Vec::new();
    for (i, (a, _)) in nodes.iter().enumerate() {
        for (b, _) in nodes.iter().skip(i + 1) {
            let (ra, rb) = (root(a, b), root(b, a));
            let state = match (&ra, &rb) {
                (Some(x), Some(y)) if x == y => "identical",
                (Some(_), Some(_)) => "differ",
                _ => "unknown",
            };
            pairs.push((a.clone(), b.clone(), ra, rb, state));
        }
    }
    let all_identical = pairs.iter().all(|p| p.4 == "identical");
    match format {
        OutputFormat::Json => println!(
            "{}",
            json!({
                "identical": all_identical,
                "pairs": pairs.iter().map(|(a, b, ra, rb, state)| json!({
                    "a": a, "b": b, "root_a": ra, "root_b": rb, "state": state,
                })).collect::<Vec<_>>(),
                "nodes": nodes.iter().map(|(id, s)| json!({
                    "id": id,
                    "reachable": s.is_some(),
                    "keys": s.as_ref().map(|s| s.keys),
                    "hints": s.as_ref().map(|s| s.hints.iter().map(|h| json!({
                        "target": h.target, "count": h.count, "bytes": h.bytes,
                    })).collect::<Vec<_>>()),
                })).collect::<Vec<_>>(),
            })
        ),
        OutputFormat::Text => {
            for (a, b, _, _, state) in &pairs {
                println!("{a} <-> {b}: {state}");
            }
            for (id, s) in &nodes {
                match s {
                    None => println!("{id}: unreachable"),
                    Some(s) => {
                        let hints: u64 = s.hints.iter().map(|h| h.count).sum();
                        println!("{id}: {} keys, {hints} hints queued", s.keys);
                    }
                }
            }
        }
    }
    if all_identical {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

pub fn ring(args: RingArgs) -> ExitCode {
    use dynakv_core::NodeId;
    use dynakv_core::ring::{Member, report};
    let members: Result<Vec<Member>, String> = if let Some(count) = args.nodes {
        if count == 0 || count > 1024 {
            Err("--nodes must be 1..=1024".into())
        } else {
            (1..=count)
                .map(|i| {
                    Ok(Member {
                        id: NodeId::new(format!("n{i}")).map_err(|e| e.to_string())?,
                        weight: 100,
                        zone: None,
                    })
                })
                .collect()
        }
    } else if !args.node.is_empty() {
        args.node
            .iter()
            .map(|spec| {
                let mut parts = spec.splitn(3, ':');
                let id = parts.next().unwrap_or_default();
                let id = NodeId::new(id).map_err(|e| format!("--node {spec:?}: {e}"))?;
                let weight = match parts.next() {
                    None | Some("") => 100,
                    Some(w) => w
                        .parse::<u32>()
                        .map_err(|_| format!("--node {spec:?}: weight {w:?} is not a number"))?,
                };
                if weight > dynakv_core::ring::MAX_WEIGHT {
                    return Err(format!(
                        "--node {spec:?}: weight above {}",
                        dynakv_core::ring::MAX_WEIGHT
                    ));
                }
                let zone = parts.next().filter(|z| !z.is_empty()).map(str::to_string);
                Ok(Member { id, weight, zone })
            })
            .collect()
    } else {
        Err("give --nodes N or one --node id[:weight[:zone]] per node".into())
    };
    let members = match members {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if args.n == 0 || args.vnodes == 0 || args.vnodes > 4096 {
        eprintln!("error: -n must be at least 1 and --vnodes 1..=4096");
        return ExitCode::from(2);
    }
    let mut ids: Vec<&NodeId> = members.iter().map(|m| &m.id).collect();
    ids.sort();
    if ids.windows(2).any(|w| w[0] == w[1]) {
        eprintln!("error: a node id is given twice");
        return ExitCode::from(2);
    }
    let r = report(&members, args.vnodes, args.n);
    match args.output {
        OutputFormat::Json => match serde_json::to_string_pretty(&r) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        },
        OutputFormat::Text => print!("{}", r.to_table()),
    }
    ExitCode::SUCCESS
}
