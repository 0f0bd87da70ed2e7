//! The harness: builds a turmoil simulation of a DynaKV cluster from a [`Scenario`], runs its
//! steps (faults and client operations) beside an optional workload, settles the cluster, takes
//! a snapshot of every node's storage and hands everything to the [`checker`](crate::checker).
//!
//! Each node host runs the real `dynakv_node::server::run` over simulated TCP, with a
//! [`MemoryBackend`] that lives outside the host: a crash drops the host's tasks and whatever the
//! backend had not synced, a restart runs `server::run` again on the same "disk".

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::ops::Bound;
use std::rc::Rc;
use std::sync::Once;
use std::time::{Duration, UNIX_EPOCH};

use dynakv_core::dvvset::Clock;
use dynakv_core::hash::key_position;
use dynakv_node::config::{
    Config, ConflictMode, MemberConfig, QuorumSetting, ReplicationConfig, ValidConfig,
};
use dynakv_node::node::ClusterView;
use dynakv_node::server::{Env, StorageChoice};
use dynakv_node::storage::{Backend, MemoryBackend, ScanLimit, Table, WriterMode};
use turmoil::Sim;

use crate::checker::{self, Invariant, Violation};
use crate::client::{Command, CommandQueue, Level, Shared};
use crate::history::{History, OpKind, OpResult};
use crate::oracle::{self, client_key};
use crate::scenario::{Check, Ctx, Scenario, Step, Wait};
use crate::workload::{self, Control};

/// Convergence after faults comes from reads today: the settle phase reads every key at R=ALL
/// (which read-repairs every replica) before the replicas are compared. Once anti-entropy and
/// hinted handoff land, turn this off: the settle phase then only waits
/// ([`ANTI_ENTROPY_SETTLE_MS`]) and the replicas must converge by themselves, a stricter check.
pub const SETTLE_BY_READ_REPAIR: bool = true;

/// How long the settle phase waits for anti-entropy when [`SETTLE_BY_READ_REPAIR`] is off.
pub const ANTI_ENTROPY_SETTLE_MS: u64 = 60_000;

/// The cluster id of every simulated cluster.
pub const CLUSTER_ID: &str = "sim";

/// Simulated time per step.
pub const TICK_MS: u64 = 1;

/// Simulated time every storage commit takes (a disk's fsync), in milliseconds.
pub const COMMIT_LATENCY_MS: u64 = 2;

/// Largest message latency when no `Delay` fault is on.
pub const DEFAULT_MAX_LATENCY_MS: u64 = 20;

/// A fault window is considered over this long after the last fault ended: a connection whose
/// segments a partition dropped stalls until HTTP/2 keep-alive gives up on it (about 4 s with
/// the node's settings), and until then its peer looks down and sloppy quorums use fallbacks.
pub const FAULT_GRACE_MS: u64 = 5_000;

/// Longest wait for client queues or workloads to drain.
const IDLE_CAP_MS: u64 = 60_000;

/// A mechanism broken on purpose, to prove the checker notices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Breakage {
    /// Acknowledge writes without syncing them (`MemoryBackend::set_skip_sync`): a crash loses
    /// acknowledged writes.
    SkipSync,
    /// Every write reaches the node without its context (emulated at the client edge: the node
    /// sees exactly what it would see if it ignored the context on put).
    DropPutContext,
    /// Hints are stored but never handed off (delivery interval of a day).
    NoHintDelivery,
    /// Anti-entropy off (`anti_entropy.enabled = false`).
    NoAntiEntropy,
}

impl Breakage {
    pub const ALL: [Breakage; 4] = [
        Breakage::SkipSync,
        Breakage::DropPutContext,
        Breakage::NoHintDelivery,
        Breakage::NoAntiEntropy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Breakage::SkipSync => "skip-sync",
            Breakage::DropPutContext => "drop-put-context",
            Breakage::NoHintDelivery => "no-hint-delivery",
            Breakage::NoAntiEntropy => "no-anti-entropy",
        }
    }

    pub fn parse(s: &str) -> Option<Breakage> {
        Breakage::ALL.into_iter().find(|b| b.name() == s)
    }
}

/// How the settle phase brings replicas together before they are compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settle {
    /// Read every key at R=ALL twice (read repair), then compare.
    ReadRepair,
    /// Only wait ([`ANTI_ENTROPY_SETTLE_MS`]): hinted handoff and anti-entropy must converge
    /// the replicas on their own.
    Wait,
}

impl Settle {
    pub fn name(self) -> &'static str {
        match self {
            Settle::ReadRepair => "read-repair",
            Settle::Wait => "wait",
        }
    }

    pub fn parse(s: &str) -> Option<Settle> {
        [Settle::ReadRepair, Settle::Wait]
            .into_iter()
            .find(|m| m.name() == s)
    }
}

impl Default for Settle {
    fn default() -> Self {
        if SETTLE_BY_READ_REPAIR {
            Settle::ReadRepair
        } else {
            Settle::Wait
        }
    }
}

/// How to run a scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunOptions {
    pub seed: u64,
    pub breakage: Option<Breakage>,
    pub settle: Settle,
}

impl RunOptions {
    pub fn new(seed: u64) -> RunOptions {
        RunOptions {
            seed,
            breakage: None,
            settle: Settle::default(),
        }
    }

    pub fn breakage(mut self, breakage: Option<Breakage>) -> RunOptions {
        self.breakage = breakage;
        self
    }

    pub fn settle(mut self, settle: Settle) -> RunOptions {
        self.settle = settle;
        self
    }
}

/// Each node's data table at the end: node -> key -> encoded clock.
pub type Snapshot = BTreeMap<String, BTreeMap<String, Vec<u8>>>;

/// Everything a run produced.
#[derive(Debug)]
pub struct Outcome {
    pub scenario: String,
    pub seed: u64,
    pub breakage: Option<Breakage>,
    pub settle: Settle,
    /// Every step applied, with the simulated time (ms) it was applied at.
    pub schedule: Vec<(u64, String)>,
    pub history: History,
    pub snapshot: Snapshot,
    /// Hints still queued at the end, per node: (target, key).
    pub hints: BTreeMap<String, Vec<(String, String)>>,
    /// The replicas of every key, by the ring.
    pub replicas: BTreeMap<String, Vec<String>>,
    pub violations: Vec<Violation>,
    /// Summary lines (Merkle roots, counts).
    pub notes: Vec<String>,
    /// Simulated time the run took, in ms.
    pub sim_ms: u64,
}

impl Outcome {
    /// No violation, other than those a [known bug](checker::KNOWN_BUGS) explains (unless
    /// `DYNAKV_SIM_STRICT` is set in the environment: then none at all).
    pub fn passed(&self) -> bool {
        if std::env::var_os("DYNAKV_SIM_STRICT").is_some() {
            self.passed_strict()
        } else {
            self.violations.iter().all(|v| v.known_bug.is_some())
        }
    }

    /// No violation at all.
    pub fn passed_strict(&self) -> bool {
        self.violations.is_empty()
    }

    /// Violations explained by known bugs.
    pub fn known_bug_violations(&self) -> usize {
        self.violations
            .iter()
            .filter(|v| v.known_bug.is_some())
            .count()
    }
}

thread_local! {
    static PANICS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// Panics inside simulated tasks are swallowed by tokio (the task just ends); record them so
/// the harness can fail the run. The hook is process-wide, the record per thread.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let location = info
                .location()
                .map(|l| format!(" at {}:{}", l.file(), l.line()))
                .unwrap_or_default();
            let message = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(non-string payload)".into());
            PANICS.with(|p| p.borrow_mut().push(format!("{message}{location}")));
            previous(info);
        }));
    });
}

fn take_panics() -> Vec<String> {
    PANICS.with(|p| std::mem::take(&mut *p.borrow_mut()))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Link {
    Healthy,
    Partitioned,
    Held,
}

struct SimNode {
    name: String,
    backend: MemoryBackend,
    crashed: bool,
}

/// Runs one scenario with one seed. Never panics on a product failure: violations are in the
/// outcome.
pub fn run(scenario: &Scenario, opts: RunOptions) -> Outcome {
    install_panic_hook();
    take_panics();
    let mut h = Harness::new(scenario, opts);
    let result = h.run_steps(scenario).and_then(|()| h.settle());
    if let Err(e) = result {
        h.violations
            .push(Violation::new(Invariant::Harness, "", e, vec![]));
    }
    h.finish()
}

struct Harness {
    sim: Sim<'static>,
    scenario: String,
    opts: RunOptions,
    n: u32,
    conflict: ConflictMode,
    nodes: Vec<SimNode>,
    view: ClusterView,
    clients: Vec<String>,
    queues: BTreeMap<String, Rc<RefCell<CommandQueue>>>,
    workload: Vec<Rc<Control>>,
    shared: Rc<Shared>,
    links: BTreeMap<(String, String), Link>,
    partition: Option<Vec<Vec<String>>>,
    paused: BTreeSet<String>,
    loss_rate: f64,
    delay: bool,
    fault_open: Option<u64>,
    fault_windows: Vec<(u64, u64)>,
    schedule: Vec<(u64, String)>,
    violations: Vec<Violation>,
}

/// The key of a link in `Harness::links`: the two host names in order.
fn link_key(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_string(), b.to_string())
    } else {
        (b.to_string(), a.to_string())
    }
}

fn node_config(
    name: &str,
    members: &[MemberConfig],
    n: u32,
    conflict: ConflictMode,
    no_hints: bool,
    breakage: Option<Breakage>,
) -> ValidConfig {
    let mut config = Config {
        node_id: name.to_string(),
        cluster_id: CLUSTER_ID.to_string(),
        listen: std::net::SocketAddr::from((Ipv4Addr::UNSPECIFIED, crate::net::NODE_PORT)),
        advertise: Some(format!("{name}:{}", crate::net::NODE_PORT)),
        data_dir: "/nonexistent/simulated".into(),
        members: members.to_vec(),
        replication: ReplicationConfig {
            n,
            read_quorum: QuorumSetting::Quorum,
            write_quorum: QuorumSetting::Quorum,
            sloppy: true,
            conflict_mode: conflict,
            ..ReplicationConfig::default()
        },
        ..Config::default()
    };
    if no_hints {
        config.hints.max_per_target = 0;
    }
    match breakage {
        Some(Breakage::NoHintDelivery) => config.hints.delivery_interval_ms = 24 * 3600 * 1000,
        Some(Breakage::NoAntiEntropy) => config.anti_entropy.enabled = false,
        _ => {}
    }
    config
        .validate()
        .unwrap_or_else(|e| panic!("simulated node config is invalid: {e}"))
}

impl Harness {
    fn new(scenario: &Scenario, opts: RunOptions) -> Harness {
        let names = scenario.nodes();
        let n = scenario.n.min(names.len() as u32).max(1);
        let mut sim = turmoil::Builder::new()
            .rng_seed(opts.seed)
            .epoch(UNIX_EPOCH + Duration::from_millis(crate::net::EPOCH_MS))
            .simulation_duration(Duration::from_secs(100 * 3600))
            .tick_duration(Duration::from_millis(TICK_MS))
            .min_message_latency(Duration::from_millis(0))
            .max_message_latency(Duration::from_millis(DEFAULT_MAX_LATENCY_MS))
            .tcp_capacity(1024)
            .build();

        let members: Vec<MemberConfig> = names
            .iter()
            .map(|name| MemberConfig {
                id: name.clone(),
                address: format!("{name}:{}", crate::net::NODE_PORT),
                metrics: None,
                weight: 100,
                zone: None,
            })
            .collect();
        let mut nodes = Vec::new();
        let mut view = None;
        for name in &names {
            let config = node_config(
                name,
                &members,
                n,
                scenario.conflict,
                scenario.no_hints,
                opts.breakage,
            );
            if view.is_none() {
                view = Some(ClusterView::from_members(
                    &config.node_id,
                    config.members.clone(),
                    config.raw.replication.vnodes_per_node,
                    n as usize,
                ));
            }
            let backend = MemoryBackend::new();
            // A disk's fsync takes time: a crash can fall between a batch's apply and its commit.
            backend.set_commit_latency(Duration::from_millis(COMMIT_LATENCY_MS));
            if opts.breakage == Some(Breakage::SkipSync) {
                backend.set_skip_sync(true);
            }
            let host_backend = backend.clone();
            sim.host(name.as_str(), move || {
                let config = config.clone();
                let backend = host_backend.clone();
                async move {
                    let listener = turmoil::net::TcpListener::bind((
                        IpAddr::from(Ipv4Addr::UNSPECIFIED),
                        crate::net::NODE_PORT,
                    ))
                    .await?;
                    let connect_timeout =
                        Duration::from_millis(config.raw.limits.peer_connect_timeout_ms);
                    let env = Env {
                        wall: crate::net::wall_clock(),
                        connector: crate::net::connector(connect_timeout),
                        storage: StorageChoice::Memory(
                            backend,
                            WriterMode::Task(tokio::runtime::Handle::current()),
                        ),
                    };
                    dynakv_node::server::run(
                        crate::net::incoming(listener),
                        None,
                        config,
                        env,
                        std::future::pending::<()>(),
                    )
                    .await?;
                    Ok(())
                }
            });
            nodes.push(SimNode {
                name: name.clone(),
                backend,
                crashed: false,
            });
        }
        let view = view.expect("a scenario has at least one node");

        let shared = Rc::new(Shared {
            history: RefCell::new(History::default()),
            n,
            cluster_tag: dynakv_node::node::cluster_tag(CLUSTER_ID),
            drop_put_context: opts.breakage == Some(Breakage::DropPutContext),
            backends: nodes
                .iter()
                .map(|n| (n.name.clone(), n.backend.clone()))
                .collect(),
            dot_index: RefCell::new(Default::default()),
            members: RefCell::new(Default::default()),
        });

        let mut clients = Vec::new();
        let mut queues = BTreeMap::new();
        let command_clients = scenario
            .clients()
            .into_iter()
            .map(|c| format!("c{c}"))
            .chain(std::iter::once("settle".to_string()));
        for name in command_clients {
            let queue = Rc::new(RefCell::new(CommandQueue::default()));
            sim.client(
                name.as_str(),
                crate::client::command_client(
                    name.clone(),
                    names.clone(),
                    shared.clone(),
                    queue.clone(),
                ),
            );
            queues.insert(name.clone(), queue);
            clients.push(name);
        }
        if scenario.watches_members() {
            sim.client(
                "watch",
                crate::client::member_watcher(names.clone(), shared.clone()),
            );
            clients.push("watch".to_string());
        }
        let mut controls = Vec::new();
        if let Some(spec) = &scenario.workload {
            for (i, (name, kind, keys)) in workload::clients(spec).into_iter().enumerate() {
                let control = Rc::new(Control::default());
                let seed = opts
                    .seed
                    .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                    .wrapping_add(i as u64 + 1);
                sim.client(
                    name.as_str(),
                    workload::run(
                        workload::ClientSpec {
                            name: name.clone(),
                            kind,
                            keys,
                            nodes: names.clone(),
                            seed,
                            think_ms: spec.think_ms,
                        },
                        shared.clone(),
                        control.clone(),
                    ),
                );
                controls.push(control);
                clients.push(name);
            }
        }

        Harness {
            sim,
            scenario: scenario.name.clone(),
            opts,
            n,
            conflict: scenario.conflict,
            nodes,
            view,
            clients,
            queues,
            workload: controls,
            shared,
            links: BTreeMap::new(),
            partition: None,
            paused: BTreeSet::new(),
            loss_rate: 0.0,
            delay: false,
            fault_open: None,
            fault_windows: Vec::new(),
            schedule: Vec::new(),
            violations: Vec::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.sim.elapsed().as_millis() as u64
    }

    fn log(&mut self, what: String) {
        let now = self.now_ms();
        self.schedule.push((now, what));
    }

    fn tick(&mut self) -> Result<(), String> {
        self.sim
            .step()
            .map_err(|e| format!("the simulation stopped: {e}"))?;
        let panics = take_panics();
        if !panics.is_empty() {
            return Err(format!("simulated code panicked: {}", panics.join(" | ")));
        }
        Ok(())
    }

    fn run_for(&mut self, ms: u64) -> Result<(), String> {
        for _ in 0..ms.div_ceil(TICK_MS) {
            self.tick()?;
        }
        Ok(())
    }

    fn queues_idle(&self) -> bool {
        self.queues.values().all(|q| {
            let q = q.borrow();
            q.queue.is_empty() && !q.busy
        })
    }

    fn wait_idle(&mut self) -> Result<(), String> {
        let start = self.now_ms();
        while !self.queues_idle() {
            if self.now_ms() - start > IDLE_CAP_MS {
                return Err(format!(
                    "client operations did not finish within {IDLE_CAP_MS} ms"
                ));
            }
            self.tick()?;
        }
        Ok(())
    }

    fn node_index(&self, name: &str) -> Result<usize, String> {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .ok_or_else(|| format!("no node named {name}"))
    }

    fn is_node(&self, name: &str) -> bool {
        self.nodes.iter().any(|n| n.name == name)
    }

    fn desired_link(&self, a: &str, b: &str) -> Link {
        let both_nodes = self.is_node(a) && self.is_node(b);
        if both_nodes
            && let Some(groups) = &self.partition
            && !groups
                .iter()
                .any(|g| g.iter().any(|x| x == a) && g.iter().any(|x| x == b))
        {
            return Link::Partitioned;
        }
        if self.paused.contains(a) || self.paused.contains(b) {
            return Link::Held;
        }
        Link::Healthy
    }

    fn apply_links(&mut self) {
        let hosts = self.hosts();
        for (i, a) in hosts.iter().enumerate() {
            for b in &hosts[i + 1..] {
                if !self.is_node(a) && !self.is_node(b) {
                    continue;
                }
                let want = self.desired_link(a, b);
                let key = link_key(a, b);
                let have = self.links.get(&key).copied().unwrap_or(Link::Healthy);
                if want == have {
                    continue;
                }
                match want {
                    Link::Healthy => self.sim.release(a.as_str(), b.as_str()),
                    Link::Partitioned => self.sim.partition(a.as_str(), b.as_str()),
                    Link::Held => {
                        if have == Link::Partitioned {
                            self.sim.release(a.as_str(), b.as_str());
                        }
                        self.sim.hold(a.as_str(), b.as_str());
                    }
                }
                self.links.insert(key, want);
            }
        }
    }

    fn note_faults(&mut self) {
        let active = self.partition.is_some()
            || !self.paused.is_empty()
            || self.loss_rate > 0.0
            || self.delay
            || self.nodes.iter().any(|n| n.crashed);
        let now = self.now_ms();
        match (active, self.fault_open) {
            (true, None) => self.fault_open = Some(now),
            (false, Some(start)) => {
                self.fault_windows.push((start, now + FAULT_GRACE_MS));
                self.fault_open = None;
            }
            _ => {}
        }
    }

    /// Every host's name, nodes first.
    fn hosts(&self) -> Vec<String> {
        let mut hosts: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        hosts.extend(self.clients.iter().cloned());
        hosts
    }

    /// A power cut: the host's tasks are dropped and its storage forgets what it had not synced.
    ///
    /// The host is cut off from every other host first, so that nothing it "sends" while its
    /// tasks are torn down (FINs of dropped sockets) leaves it: a machine that loses power says
    /// nothing, and, as importantly, tokio drops a runtime's tasks in an order that depends on a
    /// process-wide task counter, so anything sent during teardown would make the run depend on
    /// what ran before it in the same process. Dropped messages draw no randomness as long as
    /// the loss rate is zero, so it is zeroed for the moment of the crash.
    fn power_cut(&mut self, i: usize) {
        let name = self.nodes[i].name.clone();
        if self.loss_rate > 0.0 {
            self.sim.set_fail_rate(0.0);
        }
        for other in self.hosts() {
            if other != name {
                self.sim.partition(name.as_str(), other.as_str());
                self.links
                    .insert(link_key(&name, &other), Link::Partitioned);
            }
        }
        self.sim.crash(name.as_str());
        self.nodes[i].backend.crash();
        self.apply_links();
        if self.loss_rate > 0.0 {
            self.sim.set_fail_rate(self.loss_rate);
        }
    }

    fn crash(&mut self, name: &str) -> Result<(), String> {
        let i = self.node_index(name)?;
        if !self.nodes[i].crashed {
            self.power_cut(i);
            self.nodes[i].crashed = true;
        }
        Ok(())
    }

    fn restart(&mut self, name: &str) -> Result<(), String> {
        let i = self.node_index(name)?;
        if !self.nodes[i].crashed {
            // A reboot: down for no simulated time, but its connections and in-flight requests
            // are gone, so it is a fault window of its own.
            self.power_cut(i);
            let now = self.now_ms();
            self.fault_windows.push((now, now + FAULT_GRACE_MS));
        }
        self.sim.bounce(name);
        self.nodes[i].crashed = false;
        Ok(())
    }

    fn heal(&mut self) {
        self.partition = None;
        self.paused.clear();
        self.apply_links();
        self.sim.set_fail_rate(0.0);
        self.loss_rate = 0.0;
        self.sim
            .set_max_message_latency(Duration::from_millis(DEFAULT_MAX_LATENCY_MS));
        self.delay = false;
    }

    fn apply(&mut self, step: &Step) -> Result<(), String> {
        match step {
            Step::AddNode(_) => {
                return Err(
                    "AddNode after the first other step: membership is static until gossip \
                     and joins land, so every AddNode must come first"
                        .into(),
                );
            }
            Step::Crash(n) => self.crash(n)?,
            Step::Restart(n) => self.restart(n)?,
            Step::Pause(n) => {
                self.node_index(n)?;
                self.paused.insert(n.clone());
                self.apply_links();
            }
            Step::Partition(groups) => {
                for n in groups.iter().flatten() {
                    self.node_index(n)?;
                }
                self.partition = Some(groups.clone());
                self.apply_links();
            }
            Step::Heal => self.heal(),
            Step::Delay { max_ms } => {
                self.sim
                    .set_max_message_latency(Duration::from_millis(*max_ms));
                self.delay = *max_ms > DEFAULT_MAX_LATENCY_MS;
            }
            Step::Loss { rate } => {
                self.sim.set_fail_rate(*rate);
                self.loss_rate = *rate;
            }
            Step::Op(op) => {
                let client = format!("c{}", op.client);
                let target = op.via.clone().unwrap_or_else(|| self.nodes[0].name.clone());
                self.node_index(&target)?;
                let queue = self
                    .queues
                    .get(&client)
                    .ok_or_else(|| format!("no client {client}"))?;
                queue.borrow_mut().queue.push_back(Command {
                    kind: op.kind.clone(),
                    key: op.key.clone(),
                    target,
                    level: op.level,
                    strict: op.strict,
                    ctx: op.ctx,
                });
            }
            Step::AwaitMember {
                observer,
                member,
                state,
                within_ms,
            } => {
                self.node_index(observer)?;
                self.node_index(member)?;
                let start = self.now_ms();
                let mut seen: Vec<(u64, String)> = Vec::new();
                loop {
                    let now = self
                        .shared
                        .members
                        .borrow()
                        .get(observer)
                        .and_then(|v| v.get(member).cloned());
                    if let Some(now) = now {
                        if seen.last().map(|(_, s)| s) != Some(&now) {
                            seen.push((self.now_ms() - start, now.clone()));
                        }
                        if now == *state {
                            break;
                        }
                    }
                    if self.now_ms() - start > *within_ms {
                        let seen: Vec<String> =
                            seen.iter().map(|(t, s)| format!("{s} at +{t}ms")).collect();
                        self.violations.push(Violation::new(
                            Invariant::Assertion,
                            "",
                            format!(
                                "{step} failed: {observer} saw {member} as [{}]",
                                seen.join(", ")
                            ),
                            vec![],
                        ));
                        break;
                    }
                    self.tick()?;
                }
                self.log(format!(
                    "{observer} sees {member} {state} after {} ms",
                    self.now_ms() - start
                ));
            }
            Step::DiskLatency { node, commit_ms } => {
                let i = self.node_index(node)?;
                self.nodes[i]
                    .backend
                    .set_commit_latency(Duration::from_millis(*commit_ms));
            }
            Step::Wait(Wait::Ms(ms)) => self.run_for(*ms)?,
            Step::Wait(Wait::Idle) => self.wait_idle()?,
            Step::Assert(check) => {
                if let Some(v) = self.evaluate(check) {
                    self.violations.push(v);
                }
            }
        }
        Ok(())
    }

    fn run_steps(&mut self, scenario: &Scenario) -> Result<(), String> {
        let mut steps = scenario.steps.iter().peekable();
        while let Some(Step::AddNode(_)) = steps.peek() {
            steps.next();
        }
        for step in steps {
            if !matches!(step, Step::Wait(_) | Step::Assert(_)) {
                self.log(step.to_string());
            }
            self.apply(step)?;
            self.note_faults();
        }
        Ok(())
    }

    /// Ends every fault, stops the workload, and brings the replicas together.
    fn settle(&mut self) -> Result<(), String> {
        self.log("settle: Heal, restart crashed nodes, stop the workload".into());
        self.heal();
        let crashed: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.crashed)
            .map(|n| n.name.clone())
            .collect();
        for n in crashed {
            self.restart(&n)?;
        }
        self.note_faults();
        for c in &self.workload {
            c.stop.set(true);
        }
        let start = self.now_ms();
        while !self.workload.iter().all(|c| c.done.get()) || !self.queues_idle() {
            if self.now_ms() - start > IDLE_CAP_MS {
                return Err("the workload did not stop".into());
            }
            self.tick()?;
        }
        self.run_for(3_000)?;
        if self.opts.settle == Settle::ReadRepair {
            for pass in 1..=2 {
                self.log(format!("settle: read every key at R=ALL (pass {pass})"));
                self.read_every_key()?;
                self.run_for(2_000)?;
            }
        } else {
            self.log("settle: wait for anti-entropy".into());
            self.run_for(ANTI_ENTROPY_SETTLE_MS)?;
        }
        Ok(())
    }

    fn read_every_key(&mut self) -> Result<(), String> {
        let keys = self.shared.history.borrow().keys();
        let mut pending = keys;
        for attempt in 0..6 {
            if pending.is_empty() {
                break;
            }
            if attempt > 0 {
                self.run_for(1_000)?;
            }
            let first = self.shared.history.borrow().ops.len();
            let queue = self.queues["settle"].clone();
            for (i, key) in pending.iter().enumerate() {
                let target = self.nodes[(i + attempt) % self.nodes.len()].name.clone();
                queue.borrow_mut().queue.push_back(Command {
                    kind: OpKind::Get,
                    key: key.clone(),
                    target,
                    level: Level::All,
                    strict: true,
                    ctx: Ctx::Empty,
                });
            }
            self.wait_idle()?;
            let h = self.shared.history.borrow();
            pending = h.ops[first..]
                .iter()
                .filter(|o| o.client == "settle" && !o.is_ok())
                .map(|o| o.key.clone())
                .collect();
        }
        Ok(())
    }

    fn replicas_of(&self, key: &str) -> Vec<String> {
        self.view
            .ring
            .preference_list(key_position(key.as_bytes()), self.n as usize)
            .into_iter()
            .map(|i| self.view.ring.nodes()[i].id.to_string())
            .collect()
    }

    fn stored(&self, node: usize, key: &str) -> Option<Vec<u8>> {
        oracle::stored_clock(&self.nodes[node].backend, key)
    }

    fn snapshot(&self) -> Snapshot {
        let mut out = Snapshot::new();
        for node in &self.nodes {
            let mut keys = BTreeMap::new();
            let mut from: Option<Vec<u8>> = None;
            loop {
                let lower = from.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
                let Ok(page) = node.backend.scan(
                    Table::Data,
                    lower,
                    Bound::Unbounded,
                    ScanLimit::entries(4096),
                ) else {
                    break;
                };
                for (k, v) in page.entries {
                    keys.insert(String::from_utf8_lossy(client_key(&k)).into_owned(), v);
                }
                match page.next {
                    Some(next) => from = Some(next),
                    None => break,
                }
            }
            out.insert(node.name.clone(), keys);
        }
        out
    }

    fn last_read<'a>(
        history: &'a History,
        client: &str,
        key: &str,
    ) -> Option<&'a crate::history::Op> {
        history
            .ops
            .iter()
            .rev()
            .find(|o| o.client == client && o.key == key && o.kind == OpKind::Get)
    }

    fn evaluate(&self, check: &Check) -> Option<Violation> {
        let history = self.shared.history.borrow();
        let fail = |key: &str, msg: String, ops: Vec<usize>| {
            Some(Violation::new(
                Invariant::Assertion,
                key,
                format!("{check:?} failed: {msg}"),
                ops,
            ))
        };
        match check {
            Check::LastOk { client } | Check::LastFailed { client } => {
                let want_ok = matches!(check, Check::LastOk { .. });
                let name = format!("c{client}");
                let last = self.queues.get(&name).and_then(|q| q.borrow().last_op);
                let Some(id) = last else {
                    return fail("", format!("{name} has run no operation"), vec![]);
                };
                let op = history.get(id);
                if op.is_ok() != want_ok {
                    return fail(&op.key, format!("last operation was {op}"), vec![id]);
                }
                None
            }
            Check::Values {
                client,
                key,
                expect,
            } => {
                let Some(op) = Self::last_read(&history, &format!("c{client}"), key) else {
                    return fail(key, "no read of the key".into(), vec![]);
                };
                let Some(values) = op.read_values() else {
                    return fail(key, format!("the last read failed: {op}"), vec![op.id]);
                };
                let mut got: Vec<String> = values
                    .iter()
                    .map(|(v, _)| String::from_utf8_lossy(v).into_owned())
                    .collect();
                got.sort();
                let mut want = expect.clone();
                want.sort();
                if got != want {
                    return fail(key, format!("read returned {got:?}"), vec![op.id]);
                }
                None
            }
            Check::SiblingCount { client, key, count } => {
                let Some(op) = Self::last_read(&history, &format!("c{client}"), key) else {
                    return fail(key, "no read of the key".into(), vec![]);
                };
                match op.read_values() {
                    Some(v) if v.len() == *count => None,
                    _ => fail(key, format!("last read: {op}"), vec![op.id]),
                }
            }
            Check::ReplicasEqual { key } => {
                let states: Vec<(String, Option<Vec<u8>>)> = self
                    .replicas_of(key)
                    .into_iter()
                    .map(|n| {
                        let i = self.node_index(&n).unwrap_or(0);
                        (n, self.stored(i, key))
                    })
                    .collect();
                if states.windows(2).all(|w| w[0].1 == w[1].1) {
                    None
                } else {
                    let shown: Vec<String> = states
                        .iter()
                        .map(|(n, s)| format!("{n}: {}", checker::describe(s.as_deref())))
                        .collect();
                    fail(key, shown.join("; "), vec![])
                }
            }
            Check::NodeHas { node, key, values } => {
                let Ok(i) = self.node_index(node) else {
                    return fail(key, format!("no node {node}"), vec![]);
                };
                let stored = self.stored(i, key);
                let mut got: Vec<String> = stored
                    .as_deref()
                    .and_then(|b| Clock::decode(b).ok())
                    .map(|c| {
                        c.live_values()
                            .filter_map(|s| s.data.as_ref())
                            .map(|d| String::from_utf8_lossy(d).into_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                got.sort();
                let mut want = values.clone();
                want.sort();
                if got != want {
                    return fail(key, format!("{node} holds {got:?}"), vec![]);
                }
                None
            }
        }
    }

    fn finish(mut self) -> Outcome {
        if let Some(start) = self.fault_open.take() {
            self.fault_windows.push((start, u64::MAX));
        }
        let snapshot = self.snapshot();
        let history = self.shared.history.borrow().clone();
        let mut keys: BTreeSet<String> = history.keys().into_iter().collect();
        for node in snapshot.values() {
            keys.extend(node.keys().cloned());
        }
        let replicas: BTreeMap<String, Vec<String>> = keys
            .iter()
            .map(|k| (k.clone(), self.replicas_of(k)))
            .collect();
        for key in &keys {
            oracle::observe(
                &mut self.shared.dot_index.borrow_mut(),
                self.nodes.iter().map(|n| &n.backend),
                key,
            );
        }
        let dot_index = self.shared.dot_index.borrow().clone();
        let hints: BTreeMap<String, Vec<(String, String)>> = self
            .nodes
            .iter()
            .map(|n| (n.name.clone(), oracle::queued_hints(&n.backend)))
            .collect();
        let harness_failed = self
            .violations
            .iter()
            .any(|v| v.invariant == Invariant::Harness);
        let (mut violations, notes) = checker::check(&checker::Input {
            history: &history,
            snapshot: &snapshot,
            replicas: &replicas,
            n: self.n,
            lww: self.conflict == ConflictMode::Lww,
            fault_windows: &self.fault_windows,
            dot_index: &dot_index,
            hints: &hints,
            // A run that stopped early never settled: only the history checks apply.
            settled: !harness_failed,
        });
        let mut all = std::mem::take(&mut self.violations);
        all.append(&mut violations);
        let sim_ms = self.now_ms();
        // Count operations that never completed (the run ended while they were in flight).
        let pending = history
            .ops
            .iter()
            .filter(|o| o.result == OpResult::Pending)
            .count();
        let mut notes = notes;
        notes.push(format!(
            "{} operations ({} pending at the end), {} ms simulated, fault windows: {:?}",
            history.ops.len(),
            pending,
            sim_ms,
            self.fault_windows
        ));
        Outcome {
            scenario: self.scenario,
            seed: self.opts.seed,
            breakage: self.opts.breakage,
            settle: self.opts.settle,
            schedule: self.schedule,
            history,
            snapshot,
            hints,
            replicas,
            violations: all,
            notes,
            sim_ms,
        }
    }
}
