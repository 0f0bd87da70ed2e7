//! Harness of the end-to-end tests: real `dynakv` processes on loopback, always cleaned up.
//!
//! - [`Cluster`]: N `dynakv serve` processes, each on its own random loopback address
//!   (127.x.y.z, x >= 16, so nothing collides with `dynakv dev`'s 127.0.0.2..) with a probed free
//!   port and its own temporary data directory. `kill`/`stop`/`cont`/`restart` act on one node;
//!   dropping the cluster SIGKILLs every node, also when the test panics (and then prints the
//!   tail of every node's log).
//! - [`dynakv`] and [`cli`]: run the real binary as a client, with a bounded wait.
//! - [`wait_until`]: bounded polling; tests never sleep for an outcome and never assert durations.
#![allow(dead_code)] // each test binary uses its own part of the harness

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The binary under test.
pub const DYNAKV: &str = env!("CARGO_BIN_EXE_dynakv");

/// Longest a node may take to start serving.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a client command may run before the harness kills it and fails the test.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// A random number that differs between test processes and between calls.
pub fn random_u64() -> u64 {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u64(CALLS.fetch_add(1, Ordering::Relaxed));
    if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(d.as_nanos());
    }
    h.finish()
}

/// `count` consecutive loopback addresses in a random block, away from 127.0.0.0/16.
pub fn random_loopback_block(count: u8) -> Vec<Ipv4Addr> {
    assert!((1..=200).contains(&count));
    let r = random_u64();
    let a = 16 + (r % 239) as u8; // 16..=254
    let b = (r >> 8) as u8;
    let c = 1 + ((r >> 16) % u64::from(254 - count)) as u8;
    (0..count)
        .map(|i| Ipv4Addr::new(127, a, b, c + i))
        .collect()
}

/// `count` distinct ports that are free on `ip` right now (bind-probed; the probes are held until
/// all are chosen, so the kernel cannot hand out the same port twice).
pub fn free_ports(ip: Ipv4Addr, count: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind((ip, 0)).expect("bind a probe listener on a loopback address"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("probe listener address").port())
        .collect()
}

/// A port that is free on `ip` right now (bind-probed).
pub fn free_port(ip: Ipv4Addr) -> u16 {
    free_ports(ip, 1)[0]
}

/// A port free on every one of `ips` (for `dynakv dev`, whose nodes share one port).
pub fn free_port_on_all(ips: &[Ipv4Addr]) -> u16 {
    for _ in 0..100 {
        let port = free_port(ips[0]);
        let held: Result<Vec<TcpListener>, _> = ips
            .iter()
            .map(|ip| TcpListener::bind((*ip, port)))
            .collect();
        if held.is_ok() {
            return port;
        }
    }
    panic!("no port free on all of {ips:?}");
}

/// Two distinct ports free on every one of `ips` (a gRPC and a metrics port).
pub fn free_port_pair_on_all(ips: &[Ipv4Addr]) -> (u16, u16) {
    let first = free_port_on_all(ips);
    loop {
        let second = free_port_on_all(ips);
        if second != first {
            return (first, second);
        }
    }
}

/// Polls `f` every 50 ms until it returns `Some` or `timeout` passes; then panics with `what`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for `child` to exit, at most `timeout`; kills it and returns `None` past that.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// What a client command did.
#[derive(Debug, Clone)]
pub struct Out {
    /// Exit code (-1 if killed by a signal).
    pub code: i32,
    /// Standard output parsed as JSON (`Value::Null` when it is not JSON).
    pub json: Value,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    /// Panics with the whole output unless the command succeeded.
    #[track_caller]
    pub fn ok(self) -> Out {
        assert_eq!(self.code, 0, "command failed: {self:#?}");
        self
    }

    /// The error code name of a failed `-o json` command ("UNAVAILABLE").
    pub fn error_code(&self) -> &str {
        self.json["error"]["code"].as_str().unwrap_or("")
    }

    pub fn error_message(&self) -> &str {
        self.json["error"]["message"].as_str().unwrap_or("")
    }

    /// `"context"` of a put/get/delete answer.
    pub fn context(&self) -> String {
        self.json["context"]
            .as_str()
            .unwrap_or_else(|| panic!("no context in {self:#?}"))
            .to_string()
    }

    /// The values of a `get -o json`, decoded to bytes.
    pub fn values(&self) -> Vec<Vec<u8>> {
        use base64::Engine as _;
        let vals = self.json["values"]
            .as_array()
            .unwrap_or_else(|| panic!("no values in {self:#?}"));
        vals.iter()
            .map(|v| {
                let text = v["value"].as_str().expect("value is a string");
                match v["encoding"].as_str() {
                    Some("utf8") => text.as_bytes().to_vec(),
                    Some("base64") => base64::engine::general_purpose::STANDARD
                        .decode(text)
                        .expect("base64 value decodes"),
                    other => panic!("unknown encoding {other:?} in {self:#?}"),
                }
            })
            .collect()
    }

    /// The values of a `get -o json` as text, sorted.
    pub fn texts(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .values()
            .into_iter()
            .map(|b| String::from_utf8(b).expect("UTF-8 value"))
            .collect();
        v.sort();
        v
    }
}

/// Runs `dynakv ARGS` with `stdin` as standard input; kills it after [`CLI_TIMEOUT`] and fails
/// the test.
pub fn dynakv_with_stdin(args: &[&str], stdin: &[u8]) -> Out {
    dynakv_within(args, stdin, CLI_TIMEOUT).unwrap_or_else(|hung| {
        panic!(
            "`dynakv {}` did not finish within {CLI_TIMEOUT:?}; stdout: {}; stderr: {}",
            args.join(" "),
            hung.stdout,
            hung.stderr
        )
    })
}

/// Runs `dynakv ARGS` with `stdin` as standard input. `Err` (with what it printed) when it had
/// to be killed after `timeout`.
pub fn dynakv_within(args: &[&str], stdin: &[u8], timeout: Duration) -> Result<Out, Out> {
    let mut child = Command::new(DYNAKV)
        .args(args)
        .env_remove("DYNAKV_ENDPOINT")
        .env_remove("DYNAKV_CONFIG")
        .env_remove("RUST_LOG")
        .env_remove("DYNAKV_CA")
        .env_remove("DYNAKV_CERT")
        .env_remove("DYNAKV_KEY")
        .env_remove("DYNAKV_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dynakv");
    // Feed stdin and drain both pipes on their own threads, so no pipe can fill up and block.
    let mut input = child.stdin.take().expect("stdin piped");
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let mut out = child.stdout.take().expect("stdout piped");
    let mut err = child.stderr.take().expect("stderr piped");
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let status = wait_child(&mut child, timeout);
    let _ = writer.join();
    let stdout = String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
    let json = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    let out = Out {
        code: status.and_then(|s| s.code()).unwrap_or(-1),
        json,
        stdout,
        stderr,
    };
    if status.is_some() { Ok(out) } else { Err(out) }
}

/// Runs `dynakv ARGS` as given (no endpoint or output flags added).
pub fn dynakv(args: &[&str]) -> Out {
    dynakv_with_stdin(args, b"")
}

/// Runs `dynakv ARGS -o json` and parses its output.
pub fn cli(args: &[&str]) -> Out {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    dynakv(&all)
}

/// GET `path` over plain HTTP/1.1; returns (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no HTTP header end in {text:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok((status, dechunk(body)));
    }
    Ok((status, body.to_string()))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The value of the first sample of `name` (exactly that name, any labels) whose label set
/// contains every `label` fragment (`op="put"`), in Prometheus text.
pub fn metric_value(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, label_set) = match series.split_once('{') {
                Some((m, rest)) => (m, rest),
                None => (series, ""),
            };
            (metric == name && labels.iter().all(|f| label_set.contains(f)))
                .then(|| value.parse().ok())
                .flatten()
        })
        .next()
}

/// Sends `signal` to `pid`.
pub fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) on a process this test started; no memory is involved.
    let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
    assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
}

/// Makes a child die with the test process even when the test process is SIGKILLed (a test
/// harness timeout), so no node outlives its test. The signal fires when the *thread* that
/// spawned the child exits, so nodes must be spawned from the test's own thread.
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// How to build a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub nodes: usize,
    /// Replication factor (`-n`); default min(3, nodes).
    pub n: Option<u32>,
    pub cluster_id: String,
    /// Extra `dynakv serve` flags for every node.
    pub extra_args: Vec<String>,
    /// A YAML config file every node is started with (`--config`); the harness's flags override
    /// its fields.
    pub config_yaml: Option<String>,
    /// Nodes beyond `nodes` that are not started with the cluster and are in nobody's member
    /// list: [`Cluster::join`] starts one with `--seed` (it joins at weight 0).
    pub spares: usize,
}

impl ClusterSpec {
    pub fn new(nodes: usize) -> Self {
        ClusterSpec {
            nodes,
            n: None,
            cluster_id: format!("e2e-{:08x}", random_u64() as u32),
            extra_args: Vec::new(),
            config_yaml: None,
            spares: 0,
        }
    }

    pub fn spares(mut self, spares: usize) -> Self {
        self.spares = spares;
        self
    }

    pub fn n(mut self, n: u32) -> Self {
        self.n = Some(n);
        self
    }

    pub fn cluster_id(mut self, id: &str) -> Self {
        self.cluster_id = id.to_string();
        self
    }

    pub fn arg(mut self, a: &str) -> Self {
        self.extra_args.push(a.to_string());
        self
    }

    pub fn config_yaml(mut self, yaml: &str) -> Self {
        self.config_yaml = Some(yaml.to_string());
        self
    }

    pub fn start(self) -> Cluster {
        Cluster::start(self)
    }
}

/// One `dynakv serve` process of a [`Cluster`].
pub struct Node {
    pub id: String,
    pub ip: Ipv4Addr,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    /// `dynakv serve` flags of this node alone, after the cluster's ([`Cluster::restart_with`]).
    pub extra_args: Vec<String>,
    child: Option<Child>,
}

/// N real nodes that all list each other as members.
pub struct Cluster {
    pub spec: ClusterSpec,
    pub nodes: Vec<Node>,
    root: tempfile::TempDir,
}

impl Cluster {
    /// Starts every node and waits until each serves.
    pub fn start(spec: ClusterSpec) -> Cluster {
        let root = tempfile::Builder::new()
            .prefix("dynakv-e2e-")
            .tempdir()
            .expect("create a temporary directory");
        let ips = random_loopback_block((spec.nodes + spec.spares) as u8);
        let nodes = ips
            .iter()
            .enumerate()
            .map(|(i, ip)| {
                let id = format!("n{}", i + 1);
                let ports = free_ports(*ip, 2);
                Node {
                    ip: *ip,
                    addr: SocketAddr::new((*ip).into(), ports[0]),
                    metrics: SocketAddr::new((*ip).into(), ports[1]),
                    data_dir: root.path().join(&id).join("data"),
                    log: root.path().join(format!("{id}.log")),
                    id,
                    extra_args: Vec::new(),
                    child: None,
                }
            })
            .collect();
        if let Some(yaml) = &spec.config_yaml {
            std::fs::write(root.path().join("config.yaml"), yaml).expect("write the config file");
        }
        let mut cluster = Cluster { spec, nodes, root };
        let members = cluster.spec.nodes;
        for i in 0..members {
            cluster.spawn(i);
        }
        for i in 0..members {
            cluster.wait_ready(i);
        }
        cluster
    }

    /// Whether node `i` is a spare (joins through seeds rather than being a configured member).
    pub fn is_spare(&self, i: usize) -> bool {
        i >= self.spec.nodes
    }

    /// Starts spare node `i` with `--seed` (the first two configured members) and waits until it
    /// serves; it joins the cluster at weight 0.
    pub fn join(&mut self, i: usize) {
        assert!(
            self.is_spare(i),
            "{} is a configured member",
            self.nodes[i].id
        );
        self.spawn(i);
        self.wait_ready(i);
    }

    /// A directory for the test's own files, removed with the cluster.
    pub fn scratch(&self) -> &Path {
        self.root.path()
    }

    /// The `dynakv serve` arguments of node `i` (without `serve`).
    pub fn serve_args(&self, i: usize) -> Vec<String> {
        let node = &self.nodes[i];
        let n = self.spec.n.unwrap_or(self.nodes.len().min(3) as u32);
        let mut args = vec![
            "--node-id".to_string(),
            node.id.clone(),
            "--cluster-id".into(),
            self.spec.cluster_id.clone(),
            "--listen".into(),
            node.addr.to_string(),
            "--metrics-listen".into(),
            node.metrics.to_string(),
            "--data-dir".into(),
            node.data_dir.display().to_string(),
            "-n".into(),
            n.to_string(),
        ];
        if self.is_spare(i) {
            for m in self.nodes.iter().take(self.spec.nodes.min(2)) {
                args.push("--seed".into());
                args.push(m.addr.to_string());
            }
        } else {
            for m in self.nodes.iter().take(self.spec.nodes) {
                args.push("--member".into());
                args.push(format!("{}={}", m.id, m.addr));
            }
        }
        if self.spec.config_yaml.is_some() {
            args.push("--config".into());
            args.push(self.root.path().join("config.yaml").display().to_string());
        }
        args.extend(self.spec.extra_args.iter().cloned());
        args.extend(node.extra_args.iter().cloned());
        args
    }

    fn spawn(&mut self, i: usize) {
        assert!(
            self.nodes[i].child.is_none(),
            "{} is already running",
            self.nodes[i].id
        );
        let args = self.serve_args(i);
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .expect("open the node log");
        let mut cmd = Command::new(DYNAKV);
        cmd.arg("serve")
            .args(&args)
            .env_remove("DYNAKV_CONFIG")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        die_with_parent(&mut cmd);
        node.child = Some(cmd.spawn().expect("spawn dynakv serve"));
    }

    /// Waits until node `i` answers `cluster status` (its gRPC services are up); panics with its
    /// log if it exits or takes longer than [`START_TIMEOUT`].
    pub fn wait_ready(&mut self, i: usize) {
        let deadline = Instant::now() + START_TIMEOUT;
        let addr = self.nodes[i].addr.to_string();
        loop {
            if let Some(Ok(Some(status))) = self.nodes[i].child.as_mut().map(|c| c.try_wait()) {
                self.nodes[i].child = None;
                panic!(
                    "{} exited during start-up ({status}); log:\n{}",
                    self.nodes[i].id,
                    self.log_tail(i, 40)
                );
            }
            let out = cli(&["cluster", "status", "-e", &addr]);
            if out.code == 0 && out.json["node_id"] == self.nodes[i].id.as_str() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} did not serve within {START_TIMEOUT:?}; last status: {out:?}; log:\n{}",
                    self.nodes[i].id,
                    self.log_tail(i, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self, i: usize) -> u32 {
        self.nodes[i]
            .child
            .as_ref()
            .unwrap_or_else(|| panic!("{} is not running", self.nodes[i].id))
            .id()
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// If node `i` exited by itself (crashed), its exit status; it then counts as not running.
    /// `None` while it runs (or when the harness never started it or already reaped it).
    pub fn exited(&mut self, i: usize) -> Option<ExitStatus> {
        let status = self.nodes[i].child.as_mut()?.try_wait().ok().flatten()?;
        self.nodes[i].child = None;
        Some(status)
    }

    /// The whole log of node `i` (every run of it).
    pub fn log_text(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    /// SIGKILLs node `i` and reaps it.
    pub fn kill(&mut self, i: usize) {
        let mut child = self.nodes[i]
            .child
            .take()
            .unwrap_or_else(|| panic!("{} is not running", self.nodes[i].id));
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGKILLs every running node, all before reaping any.
    pub fn kill_all(&mut self) {
        let pids: Vec<usize> = (0..self.nodes.len())
            .filter(|i| self.is_running(*i))
            .collect();
        for &i in &pids {
            signal(self.pid(i), libc::SIGKILL);
        }
        for i in pids {
            self.kill(i);
        }
    }

    /// Sends SIGTERM to node `i` and waits at most `timeout` for it to exit by itself. Returns
    /// its exit status, or `None` if it had to be SIGKILLed after `timeout`.
    pub fn terminate(&mut self, i: usize, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.nodes[i]
            .child
            .take()
            .unwrap_or_else(|| panic!("{} is not running", self.nodes[i].id));
        signal(child.id(), libc::SIGTERM);
        wait_child(&mut child, timeout)
    }

    /// Freezes node `i` (SIGSTOP): its sockets stay open but it answers nothing.
    pub fn stop(&self, i: usize) {
        signal(self.pid(i), libc::SIGSTOP);
    }

    /// Thaws node `i` (SIGCONT).
    pub fn cont(&self, i: usize) {
        signal(self.pid(i), libc::SIGCONT);
    }

    /// Starts node `i` again with the same id, address and data directory, and waits until it
    /// serves.
    pub fn restart(&mut self, i: usize) {
        if self.is_running(i) {
            self.kill(i);
        }
        self.spawn(i);
        self.wait_ready(i);
    }

    /// Restarts node `i` (killing it if it runs) with `args` as its own extra `serve` flags
    /// from now on.
    pub fn restart_with(&mut self, i: usize, args: &[&str]) {
        self.nodes[i].extra_args = args.iter().map(|a| a.to_string()).collect();
        self.restart(i);
    }

    /// `host:port` of node `i`.
    pub fn addr(&self, i: usize) -> String {
        self.nodes[i].addr.to_string()
    }

    /// Every node's `host:port`, comma-separated (the client tries them in order).
    pub fn endpoints(&self) -> String {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| self.is_running(*i))
            .map(|(_, n)| n.addr.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `dynakv ARGS -e <every node> -o json`.
    pub fn cli(&self, args: &[&str]) -> Out {
        let eps = self.endpoints();
        let mut all = args.to_vec();
        all.extend(["-e", &eps]);
        cli(&all)
    }

    /// `dynakv ARGS -e <node i> -o json`.
    pub fn cli_at(&self, i: usize, args: &[&str]) -> Out {
        let ep = self.addr(i);
        let mut all = args.to_vec();
        all.extend(["-e", &ep]);
        cli(&all)
    }

    /// Node `i`'s `/metrics` text.
    pub fn metrics(&self, i: usize) -> String {
        let (status, body) = http_get(self.nodes[i].metrics, "/metrics")
            .unwrap_or_else(|e| panic!("GET /metrics of {}: {e}", self.nodes[i].id));
        assert_eq!(status, 200, "GET /metrics of {}: {body}", self.nodes[i].id);
        body
    }

    /// The last `lines` lines of node `i`'s log (every run of it).
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() && std::env::var_os("DYNAKV_E2E_KEEP").is_some() {
            let kept = std::mem::replace(&mut self.root, tempfile::TempDir::new().expect("tmp"));
            eprintln!("logs and data kept in {}", kept.keep().display());
        }
        if std::thread::panicking() {
            for i in (0..self.nodes.len()).filter(|i| self.nodes[*i].log.exists()) {
                eprintln!(
                    "----- log of {} ({}) -----\n{}",
                    self.nodes[i].id,
                    self.nodes[i].addr,
                    self.log_tail(i, 30)
                );
            }
        }
    }
}
