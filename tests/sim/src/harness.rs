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
use std::sync::{Arc, Once};
use std::time::{Duration, UNIX_EPOCH};

use dynakv_core::dvvset::Clock;
use dynakv_core::ring::Ring;
use dynakv_node::config::{
    Config, ConflictMode, MemberConfig, QuorumSetting, ReplicationConfig, ValidConfig,
};
use dynakv_node::node::ClusterView;
use dynakv_node::server::{Env, StorageChoice};
use dynakv_node::storage::{Backend, MemoryBackend, ScanLimit, Table, WriteOp, WriterMode};
use turmoil::Sim;

use crate::checker::{self, Invariant, Violation};
use crate::client::{AdminQueue, AdminRecord, AdminResult, Command, CommandQueue, Level, Shared};
use crate::history::{History, OpKind, OpResult};
use crate::oracle::{self, client_key, replicas_in};
use crate::scenario::{AdminKind, AdminOp, Check, Ctx, Scenario, Step, Wait};
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

/// How long the ring must look settled, without a break, before `AwaitRing` believes it.
const RING_STABLE_MS: u64 = 1_000;

/// How long `CrashSender` waits for a status answer that shows a transfer streaming.
const CRASH_SENDER_WAIT_MS: u64 = 10_000;

/// How long the settle phase of a scenario that changes the membership waits for its ring
/// changes to finish once the faults are over; longer is a violation.
pub const RING_SETTLE_MS: u64 = 120_000;

/// How long the settle phase counts gossip packets at its end (see
/// [`Harness::check_gossip_quiet`]).
const GOSSIP_QUIET_MS: u64 = 10_000;

/// Gossip packets a node may send per second once settled: about two in steady state (a probe
/// and an ack, the answers to others' probes, an announcement every 30 s); a rejoin storm sent
/// thousands.
const MAX_QUIET_GOSSIP_PER_SEC: u64 = 50;

/// How long the settle phase waits after the ring settled for old owners to drop the ranges
/// they no longer replicate, before placement is checked.
pub const DROP_SETTLE_MS: u64 = 2_000;

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
    /// A spare's data vanishes as soon as its join commits (the harness deletes every key from
    /// its disk behind its back when a `ClusterStatus` first shows it with a weight): what a
    /// node that acknowledged "synced" without holding its ranges would leave, once reads use
    /// the new ring and old owners drop what they handed over. Its Merkle trees still believe
    /// it holds the keys, so anti-entropy does not put them back.
    ForgetHandoff,
    /// Every write reaches the node with its context's version vector but without the write
    /// ids of the values read (`dynakv_core::write_id`; emulated at the client edge): what a
    /// node that ignored them would do. A late copy of a forwarded write then comes back.
    DropContextIds,
}

impl Breakage {
    pub const ALL: [Breakage; 6] = [
        Breakage::SkipSync,
        Breakage::DropPutContext,
        Breakage::NoHintDelivery,
        Breakage::NoAntiEntropy,
        Breakage::ForgetHandoff,
        Breakage::DropContextIds,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Breakage::SkipSync => "skip-sync",
            Breakage::DropPutContext => "drop-put-context",
            Breakage::NoHintDelivery => "no-hint-delivery",
            Breakage::NoAntiEntropy => "no-anti-entropy",
            Breakage::ForgetHandoff => "forget-handoff",
            Breakage::DropContextIds => "drop-context-ids",
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
    /// The replicas of every key, by the final ring.
    pub replicas: BTreeMap<String, Vec<String>>,
    /// Every admin request and its answer.
    pub admin: Vec<AdminRecord>,
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
    /// A spare (`AddSpare`): in no member list, joins through seeds when started.
    spare: bool,
    /// Whether it was ever started (members from the beginning; spares once they `Join`).
    started: bool,
    /// Removed from the cluster for good (an accepted `Admin.Remove`): never started again,
    /// and its disk is left out of the final checks.
    gone: bool,
}

impl SimNode {
    /// Started, not crashed, not gone: it answers.
    fn running(&self) -> bool {
        self.started && !self.crashed && !self.gone
    }
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
    /// The nodes' Merkle tree resolution (`anti_entropy.leaf_bits`), for the trees check.
    leaf_bits: u8,
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
    /// Whether the scenario changes the membership (then the settle phase waits for the ring).
    membership: bool,
    admin_queue: Option<Rc<RefCell<AdminQueue>>>,
    /// Admin requests whose answers the harness has looked at.
    admin_seen: BTreeSet<usize>,
    /// Nodes removed for good whose removal every running node has been seen to commit.
    removal_committed: BTreeSet<String>,
    /// The ring every node agreed on after settling (`None`: not learned).
    final_ring: Option<Arc<Ring>>,
    /// The ring changes did not finish in the settle phase: no final-state checks.
    ring_unsettled: bool,
    /// Spares whose data [`Breakage::ForgetHandoff`] wiped.
    forgotten: BTreeSet<String>,
    /// When a status answer showed a ring change under way (from, to), and since when the one
    /// still open.
    change_windows: Vec<(u64, u64)>,
    change_open: Option<u64>,
    /// Spares seen serving a ring of their own (see [`Harness::note_lone_joiners`]).
    lone: BTreeSet<String>,
    node_reader: Rc<RefCell<crate::client::NodeReader>>,
    /// Each running node's Merkle roots per co-replica, read at the end of settling.
    node_roots: BTreeMap<String, BTreeMap<String, String>>,
    /// What the settle phase measured, for the outcome's notes.
    settle_notes: Vec<String>,
}

/// Each member's (weight, target weight, lifecycle) as one node's `ClusterStatus` shows it.
type MemberWeights = BTreeMap<String, (u32, u32, String)>;

/// A ring in one line: version, then each member's weight and token count.
pub fn describe_ring(ring: &Ring) -> String {
    let members: Vec<String> = ring
        .nodes()
        .iter()
        .map(|s| format!("{} w{} ({} tokens)", s.id, s.weight, s.tokens.len()))
        .collect();
    format!("{:016x} [{}]", ring.version(), members.join(", "))
}

/// The key of a link in `Harness::links`: the two host names in order.
fn link_key(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_string(), b.to_string())
    } else {
        (b.to_string(), a.to_string())
    }
}

/// How a node enters the cluster.
enum Entry<'a> {
    /// A member of the configured ring.
    Member(&'a [MemberConfig]),
    /// A spare: in no member list, joining through these seeds, at its first start configured
    /// with this weight (`None`: it stays at 0 until an admin gives it weight).
    Spare {
        seeds: Vec<String>,
        weight: Option<u32>,
    },
}

fn node_config(
    name: &str,
    entry: Entry<'_>,
    scenario: &Scenario,
    n: u32,
    breakage: Option<Breakage>,
) -> ValidConfig {
    let (conflict, no_hints) = (scenario.conflict, scenario.no_hints);
    let (members, seeds, weight) = match entry {
        Entry::Member(members) => (members.to_vec(), Vec::new(), None),
        Entry::Spare { seeds, weight } => (Vec::new(), seeds, weight),
    };
    let mut config = Config {
        node_id: name.to_string(),
        cluster_id: CLUSTER_ID.to_string(),
        listen: std::net::SocketAddr::from((Ipv4Addr::UNSPECIFIED, crate::net::NODE_PORT)),
        advertise: Some(format!("{name}:{}", crate::net::NODE_PORT)),
        data_dir: "/nonexistent/simulated".into(),
        members,
        seeds,
        weight,
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
    config.replication.write_ids = !scenario.without_write_ids.iter().any(|n| n == name);
    if let Some(h) = scenario.handoff {
        config.handoff.max_bytes_per_sec = h.max_bytes_per_sec;
        config.handoff.page_entries = h.page_entries;
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
        let spares = scenario.spares();
        let seeds: Vec<String> = members.iter().map(|m| m.address.clone()).collect();
        let mut nodes = Vec::new();
        let mut view = None;
        let mut leaf_bits = dynakv_core::merkle::DEFAULT_LEAF_BITS;
        for name in names.iter().chain(&spares) {
            let spare = spares.contains(name);
            let entry = if spare {
                Entry::Spare {
                    seeds: seeds.clone(),
                    weight: scenario.steps.iter().find_map(|s| match s {
                        Step::Join { node, weight } if node == name => *weight,
                        _ => None,
                    }),
                }
            } else {
                Entry::Member(&members)
            };
            let config = node_config(name, entry, scenario, n, opts.breakage);
            leaf_bits = config.raw.anti_entropy.leaf_bits;
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
                        tls: None,
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
            if spare {
                // Registered now (so its name resolves and its disk exists), started by `Join`.
                sim.crash(name.as_str());
            }
            nodes.push(SimNode {
                name: name.clone(),
                backend,
                crashed: false,
                spare,
                started: !spare,
                gone: false,
            });
        }
        let view = view.expect("a scenario has at least one node");
        let all_nodes: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();

        let shared = Rc::new(Shared {
            history: RefCell::new(History::default()),
            n,
            cluster_tag: dynakv_node::node::cluster_tag(CLUSTER_ID),
            drop_put_context: opts.breakage == Some(Breakage::DropPutContext),
            drop_context_ids: opts.breakage == Some(Breakage::DropContextIds),
            backends: nodes
                .iter()
                .map(|n| (n.name.clone(), n.backend.clone()))
                .collect(),
            dot_index: RefCell::new(Default::default()),
            members: RefCell::new(Default::default()),
            status: RefCell::new(Default::default()),
            targets: RefCell::new(names.clone()),
            watched: RefCell::new(names.clone()),
            admin: RefCell::new(Vec::new()),
            rings: RefCell::new(Default::default()),
            held_down: RefCell::new(Default::default()),
            fast_poll: RefCell::new(None),
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
                    all_nodes.clone(),
                    shared.clone(),
                    queue.clone(),
                ),
            );
            queues.insert(name.clone(), queue);
            clients.push(name);
        }
        if scenario.watches_members() {
            let poll_ms = if scenario.changes_membership() {
                crate::client::RING_POLL_MS
            } else {
                crate::client::MEMBER_POLL_MS
            };
            sim.client(
                "watch",
                crate::client::member_watcher(shared.clone(), poll_ms),
            );
            clients.push("watch".to_string());
        }
        let node_reader = Rc::new(RefCell::new(crate::client::NodeReader::default()));
        sim.client(
            "node-reader",
            crate::client::node_reader(node_reader.clone()),
        );
        clients.push("node-reader".to_string());
        let admin_queue = scenario.changes_membership().then(|| {
            let queue = Rc::new(RefCell::new(AdminQueue::default()));
            sim.client(
                "admin",
                crate::client::admin_client(shared.clone(), queue.clone()),
            );
            clients.push("admin".to_string());
            queue
        });
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
                            nodes: all_nodes.clone(),
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
            leaf_bits,
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
            membership: scenario.changes_membership(),
            admin_queue,
            admin_seen: BTreeSet::new(),
            removal_committed: BTreeSet::new(),
            final_ring: None,
            ring_unsettled: false,
            forgotten: BTreeSet::new(),
            change_windows: Vec::new(),
            change_open: None,
            lone: BTreeSet::new(),
            node_reader,
            node_roots: BTreeMap::new(),
            settle_notes: Vec::new(),
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
        if self.admin_queue.is_some() {
            self.note_admin_answers();
            self.note_removals_committed();
            self.note_ring_changes();
            self.note_lone_joiners();
            if self.opts.breakage == Some(Breakage::ForgetHandoff) {
                self.forget_handoffs();
            }
        }
        Ok(())
    }

    /// Logs (once per node) a joined spare whose status shows a ring of its own: it knows no
    /// other member, yet has a weight (what `lone-joiner-commits-its-own-ring` looks like; the
    /// log line is there to sort failing seeds).
    fn note_lone_joiners(&mut self) {
        let lone: Vec<(String, u32)> = {
            let status = self.shared.status.borrow();
            self.nodes
                .iter()
                .filter(|n| n.spare && n.started && !self.lone.contains(&n.name))
                .filter_map(|n| {
                    let (_, st) = status.get(&n.name)?;
                    let me = st.members.iter().find(|m| m.id == n.name)?;
                    (st.members.len() == 1 && me.weight > 0).then(|| (n.name.clone(), me.weight))
                })
                .collect()
        };
        for (node, weight) in lone {
            self.lone.insert(node.clone());
            self.log(format!(
                "{node} knows no other member, yet its ring gives it weight {weight} (a ring of its \
                 own)"
            ));
        }
    }

    /// Opens or closes a ring-change window: whether any node's last status shows a change
    /// under way (for the checker's note on reads during changes).
    fn note_ring_changes(&mut self) {
        let changing = self
            .shared
            .status
            .borrow()
            .values()
            .any(|(_, st)| st.rebalance.as_ref().is_some_and(|r| r.active));
        let now = self.now_ms();
        match (changing, self.change_open) {
            (true, None) => self.change_open = Some(now),
            (false, Some(from)) => {
                self.change_windows.push((from, now));
                self.change_open = None;
            }
            _ => {}
        }
    }

    /// [`Breakage::ForgetHandoff`]: wipes a spare's data once it is seen with a weight.
    fn forget_handoffs(&mut self) {
        let joined: Vec<String> = {
            let status = self.shared.status.borrow();
            status
                .values()
                .flat_map(|(_, st)| st.members.iter())
                .filter(|m| m.weight > 0)
                .filter(|m| {
                    self.node_index(&m.id)
                        .is_ok_and(|i| self.nodes[i].spare && !self.forgotten.contains(&m.id))
                })
                .map(|m| m.id.clone())
                .collect()
        };
        for node in joined {
            if !self.forgotten.insert(node.clone()) {
                continue;
            }
            let Ok(i) = self.node_index(&node) else {
                continue;
            };
            let backend = &self.nodes[i].backend;
            let mut ops = Vec::new();
            if let Ok(page) = backend.scan(
                Table::Data,
                Bound::Unbounded,
                Bound::Unbounded,
                ScanLimit::entries(1 << 20),
            ) {
                for (key, _) in page.entries {
                    ops.push(WriteOp::Delete {
                        table: Table::Data,
                        key,
                    });
                }
            }
            let _ = backend.commit(&ops);
            self.log(format!(
                "breakage forget-handoff: {node}'s {} keys vanish as its join commits",
                ops.len()
            ));
        }
    }

    /// Logs every admin answer that arrived, checks it against what the scenario expected, and
    /// takes a node whose removal was accepted out of the cluster for good.
    fn note_admin_answers(&mut self) {
        let done: Vec<AdminRecord> = self
            .shared
            .admin
            .borrow()
            .iter()
            .filter(|r| r.completed_ms.is_some() && !self.admin_seen.contains(&r.id))
            .cloned()
            .collect();
        for r in done {
            self.admin_seen.insert(r.id);
            self.log(format!("answer: {r}"));
            if !r.as_expected() {
                let mut v = Violation::new(
                    Invariant::Assertion,
                    "",
                    format!(
                        "admin request answered other than expected ({:?}): {r}",
                        r.expect
                    ),
                    vec![],
                );
                // A spare that refuses a change about itself as unknown: see the known bug.
                let subject = r.kind.node();
                if let AdminResult::Failed { code, message } = &r.result
                    && code == "InvalidArgument"
                    && message.contains(&format!("node {subject} is not a member"))
                    && self.node_index(subject).is_ok_and(|i| self.nodes[i].spare)
                    && checker::KNOWN_BUGS.contains(&&checker::JOINER_UNKNOWN_TO_ITSELF)
                {
                    v.known_bug = Some(&checker::JOINER_UNKNOWN_TO_ITSELF);
                }
                self.violations.push(v);
            }
            if let (AdminKind::Remove { node }, true) = (&r.kind, r.accepted())
                && let Ok(i) = self.node_index(node)
                && !self.nodes[i].gone
            {
                self.nodes[i].gone = true;
                self.shared.targets.borrow_mut().retain(|t| t != node);
                self.log(format!(
                    "{node} is gone for good: never started again, its disk left out of the \
                     final checks"
                ));
            }
        }
    }

    /// Notes removals every running node shows committed: from then on the removed node's
    /// absence is no longer a fault (the ring no longer counts on it).
    fn note_removals_committed(&mut self) {
        let pending: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.gone && !self.removal_committed.contains(&n.name))
            .map(|n| n.name.clone())
            .collect();
        if pending.is_empty() {
            return;
        }
        let running = self.running_names();
        let committed: Vec<String> = {
            let status = self.shared.status.borrow();
            pending
                .into_iter()
                .filter(|gone| {
                    running.iter().all(|r| {
                        status.get(r).is_some_and(|(_, st)| {
                            st.members
                                .iter()
                                .find(|m| m.id == *gone)
                                .is_none_or(|m| m.lifecycle == "removed")
                        })
                    })
                })
                .collect()
        };
        for gone in committed {
            self.log(format!("every running node holds {gone} removed"));
            self.removal_committed.insert(gone);
            self.note_faults();
        }
    }

    fn admin_idle(&self) -> bool {
        self.admin_queue.as_ref().is_none_or(|q| {
            let q = q.borrow();
            q.queue.is_empty() && q.in_flight == 0
        })
    }

    /// Waits until every admin request has been answered (they give up after
    /// [`crate::client::ADMIN_RETRY_MS`]).
    fn wait_admin_idle(&mut self) -> Result<(), String> {
        self.tick_until("admin requests", Self::admin_idle)
    }

    /// Lets simulated time pass until `done` holds, at most [`IDLE_CAP_MS`].
    fn tick_until(&mut self, what: &str, done: fn(&Self) -> bool) -> Result<(), String> {
        let start = self.now_ms();
        while !done(self) {
            if self.now_ms() - start > IDLE_CAP_MS {
                return Err(format!("{what} did not finish within {IDLE_CAP_MS} ms"));
            }
            self.tick()?;
        }
        Ok(())
    }

    /// Why the ring is not settled yet in the running nodes' last answers taken at or after
    /// `since_ms` (see [`Step::AwaitRing`]); `None` when it is.
    fn ring_unsettled(&self, since_ms: u64) -> Option<String> {
        let status = self.shared.status.borrow();
        // The first node's answer: its name, ring version, and every member's (weight, target,
        // lifecycle).
        let mut agreed: Option<(String, u64, MemberWeights)> = None;
        for node in self.nodes.iter().filter(|n| n.running()) {
            let Some((_, st)) = status.get(&node.name).filter(|(at, _)| *at >= since_ms) else {
                return Some(format!("no status from {} yet", node.name));
            };
            if let Some(r) = st.rebalance.as_ref().filter(|r| r.active) {
                return Some(format!(
                    "{} sees a change under way: {} {} {} -> {} ({}, waiting for [{}])",
                    node.name,
                    r.kind,
                    r.node,
                    r.from_weight,
                    r.to_weight,
                    r.phase,
                    r.waiting_for.join(", ")
                ));
            }
            if let Some(r) = st.rebalance.as_ref().filter(|r| !r.queued.is_empty()) {
                return Some(format!(
                    "{} sees changes queued for [{}]",
                    node.name,
                    r.queued.join(", ")
                ));
            }
            let mut members = BTreeMap::new();
            for m in &st.members {
                let gone = self.node_index(&m.id).is_ok_and(|i| self.nodes[i].gone);
                if gone && m.lifecycle != "removed" {
                    return Some(format!(
                        "{} does not hold {} removed yet ({})",
                        node.name, m.id, m.lifecycle
                    ));
                }
                if m.lifecycle == "removed" {
                    continue;
                }
                if m.weight != m.target_weight || m.lifecycle == "leaving" {
                    return Some(format!(
                        "{} sees {} {} at weight {}, target {}",
                        node.name, m.id, m.lifecycle, m.weight, m.target_weight
                    ));
                }
                members.insert(
                    m.id.clone(),
                    (m.weight, m.target_weight, m.lifecycle.clone()),
                );
            }
            match &agreed {
                None => agreed = Some((node.name.clone(), st.ring_version, members)),
                Some((first, version, seen)) => {
                    if *version != st.ring_version || *seen != members {
                        return Some(format!(
                            "{first} and {} disagree: ring {version:016x} {seen:?} vs ring {:016x} \
                             {members:?}",
                            node.name, st.ring_version
                        ));
                    }
                }
            }
        }
        None
    }

    /// Waits until the ring is settled (see [`Step::AwaitRing`]); `Err` with the last reason
    /// if that takes longer than `within_ms`.
    fn await_ring(&mut self, within_ms: u64) -> Result<u64, String> {
        let start = self.now_ms();
        self.wait_admin_idle()?;
        let since = self.now_ms();
        let mut settled_at: Option<u64> = None;
        let mut last = String::new();
        loop {
            match self.ring_unsettled(since) {
                None => {
                    let at = *settled_at.get_or_insert(self.now_ms());
                    if self.now_ms() - at >= RING_STABLE_MS {
                        return Ok(at - start);
                    }
                }
                Some(why) => {
                    settled_at = None;
                    last = why;
                }
            }
            if self.now_ms() - start > within_ms {
                return Err(last);
            }
            self.tick()?;
        }
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
        self.tick_until("client operations", Self::queues_idle)
    }

    /// Names of the nodes that answer ([`SimNode::running`]).
    fn running_names(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n.running())
            .map(|n| n.name.clone())
            .collect()
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
        // A node removed for good is a fault until every node has committed its removal (until
        // then it is a replica that does not answer).
        let active = self.partition.is_some()
            || !self.paused.is_empty()
            || self.loss_rate > 0.0
            || self.delay
            || self.nodes.iter().any(|n| {
                n.started && n.crashed && !(n.gone && self.removal_committed.contains(&n.name))
            });
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
        if !self.nodes[i].started {
            return Err(format!(
                "Crash({name}): {name} was never started (Join it first)"
            ));
        }
        if !self.nodes[i].crashed {
            self.power_cut(i);
            self.nodes[i].crashed = true;
        }
        Ok(())
    }

    fn restart(&mut self, name: &str) -> Result<(), String> {
        let i = self.node_index(name)?;
        if !self.nodes[i].started {
            return Err(format!(
                "Restart({name}): {name} was never started (a spare starts with Join)"
            ));
        }
        if self.nodes[i].gone {
            self.log(format!("{name} was removed for good: not restarted"));
            return Ok(());
        }
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
            Step::AddNode(_) | Step::AddSpare(_) => {
                return Err(
                    "AddNode/AddSpare after the first other step: every node host is declared \
                     first (a spare then joins with Join)"
                        .into(),
                );
            }
            Step::Join { node, .. } => {
                let i = self.node_index(node)?;
                if !self.nodes[i].spare || self.nodes[i].started {
                    return Err(format!(
                        "Join({node}): only a spare that was never started can join"
                    ));
                }
                self.nodes[i].started = true;
                self.sim.bounce(node.as_str());
                self.shared.targets.borrow_mut().push(node.clone());
                self.shared.watched.borrow_mut().push(node.clone());
            }
            Step::Admin(op) => self.send_admin(op)?,
            Step::AwaitPhase {
                observer,
                phase,
                keys_done,
                within_ms,
                or_later,
            } => {
                self.node_index(observer)?;
                const PHASES: [&str; 4] = ["announced", "streaming", "switching", "retiring"];
                let rank = |p: &str| PHASES.iter().position(|q| *q == p);
                if rank(phase).is_none() {
                    return Err(format!("AwaitPhase: no phase {phase:?}; one of {PHASES:?}"));
                }
                let start = self.now_ms();
                let mut seen: Vec<String> = Vec::new();
                *self.shared.fast_poll.borrow_mut() = Some(observer.clone());
                loop {
                    let now = self
                        .shared
                        .status
                        .borrow()
                        .get(observer)
                        .and_then(|(_, st)| {
                            st.rebalance
                                .as_ref()
                                .filter(|r| r.active)
                                .map(|r| (r.phase.clone(), r.keys_done))
                        });
                    if let Some((p, keys)) = &now {
                        if seen.last() != Some(p) {
                            seen.push(p.clone());
                        }
                        let later = *or_later && rank(p) > rank(phase);
                        if (p == phase || later) && keys >= keys_done {
                            self.log(format!(
                                "{observer} sees the change {p} with {keys} keys pulled"
                            ));
                            break;
                        }
                    } else if *or_later && !seen.is_empty() {
                        self.log(format!(
                            "{observer} sees the change gone after [{}]",
                            seen.join(", ")
                        ));
                        break;
                    }
                    if self.now_ms() - start > *within_ms {
                        self.violations.push(Violation::new(
                            Invariant::Assertion,
                            "",
                            format!("{step} failed: phases seen [{}]", seen.join(", ")),
                            vec![],
                        ));
                        break;
                    }
                    self.tick()?;
                }
                *self.shared.fast_poll.borrow_mut() = None;
            }
            Step::CrashSender => {
                // The first streaming transfer a status answer shows, waiting for one if need be.
                let start = self.now_ms();
                let (source, target) = loop {
                    if let Some(found) = self.streaming_transfer() {
                        break found;
                    }
                    if self.now_ms() - start > CRASH_SENDER_WAIT_MS {
                        return Err(format!(
                            "CrashSender: no transfer was seen streaming within \
                             {CRASH_SENDER_WAIT_MS} ms"
                        ));
                    }
                    self.tick()?;
                };
                self.log(format!("CrashSender: {source} (streaming to {target})"));
                self.crash(&source)?;
            }
            Step::RestartCrashed => {
                let crashed: Vec<String> = self
                    .nodes
                    .iter()
                    .filter(|n| n.started && n.crashed && !n.gone)
                    .map(|n| n.name.clone())
                    .collect();
                for n in crashed {
                    self.log(format!("Restart({n})"));
                    self.restart(&n)?;
                }
            }
            Step::AwaitRing { within_ms } => match self.await_ring(*within_ms) {
                Ok(took) => self.log(format!("the ring settled after {took} ms")),
                Err(why) => {
                    self.violations.push(Violation::new(
                        Invariant::Assertion,
                        "",
                        format!("{step} failed: the ring did not settle; last: {why}"),
                        vec![],
                    ));
                }
            },
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
                        // The known bug's signature: waiting for `alive`, the observer held the
                        // member suspect all along, and the cluster had held the observer down
                        // (so it rejoined under a renewed identity meanwhile).
                        let stuck_suspect = state == "alive"
                            && !seen.is_empty()
                            && seen.iter().all(|(_, s)| s == "suspect")
                            && self
                                .shared
                                .held_down
                                .borrow()
                                .iter()
                                .any(|(_, down)| down == observer);
                        let shown: Vec<String> =
                            seen.iter().map(|(t, s)| format!("{s} at +{t}ms")).collect();
                        let mut v = Violation::new(
                            Invariant::Assertion,
                            "",
                            format!(
                                "{step} failed: {observer} saw {member} as [{}]",
                                shown.join(", ")
                            ),
                            vec![],
                        );
                        if stuck_suspect
                            && checker::KNOWN_BUGS.contains(&&checker::SUSPICION_OUTLIVES_REJOIN)
                        {
                            v.known_bug = Some(&checker::SUSPICION_OUTLIVES_REJOIN);
                        }
                        self.violations.push(v);
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

    /// A transfer that some running node's last status shows streaming, pages pulled and
    /// ranges left: (source, target).
    fn streaming_transfer(&self) -> Option<(String, String)> {
        let status = self.shared.status.borrow();
        self.nodes
            .iter()
            .filter(|n| n.running())
            .filter_map(|n| status.get(&n.name))
            .filter_map(|(_, st)| st.rebalance.as_ref())
            .flat_map(|r| r.transfers.iter())
            // Ranges not started yet are listed under the receiver itself.
            .find(|t| {
                t.state == "streaming"
                    && t.source != t.target
                    && t.keys_done > 0
                    && t.ranges_done < t.ranges_total
            })
            .map(|t| (t.source.clone(), t.target.clone()))
    }

    /// Queues an admin request on the admin host.
    fn send_admin(&mut self, op: &AdminOp) -> Result<(), String> {
        let queue = self
            .admin_queue
            .clone()
            .ok_or("an admin request, but no admin host")?;
        let subject = op.kind.node().to_string();
        self.node_index(&subject)?;
        let via = match (&op.via, &op.kind) {
            (Some(via), _) => via.clone(),
            (None, AdminKind::Remove { .. }) => self
                .nodes
                .iter()
                .find(|n| n.running() && n.name != subject)
                .map(|n| n.name.clone())
                .ok_or("no running node to send the removal to")?,
            (None, _) => subject,
        };
        self.node_index(&via)?;
        let id = {
            let mut records = self.shared.admin.borrow_mut();
            let id = records.len();
            records.push(AdminRecord {
                id,
                kind: op.kind.clone(),
                via,
                expect: op.expect,
                attempts: 0,
                invoked_ms: self.now_ms(),
                completed_ms: None,
                result: AdminResult::Pending,
            });
            id
        };
        let mut q = queue.borrow_mut();
        q.queue.push_back(id);
        q.in_flight += 1;
        Ok(())
    }

    fn run_steps(&mut self, scenario: &Scenario) -> Result<(), String> {
        let mut steps = scenario.steps.iter().peekable();
        while let Some(Step::AddNode(_) | Step::AddSpare(_)) = steps.peek() {
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
        // A removal still in flight decides whether its node comes back.
        self.wait_admin_idle()?;
        let crashed: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.started && n.crashed && !n.gone)
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
        if self.membership {
            self.log("settle: wait for the ring changes to finish".into());
            match self.await_ring(RING_SETTLE_MS) {
                Ok(took) => self.log(format!("settle: the ring settled after {took} ms")),
                Err(why) => {
                    // The final-state checks need a settled ring: only the history checks run.
                    self.ring_unsettled = true;
                    self.violations.push(Violation::new(
                        Invariant::Placement,
                        "",
                        format!(
                            "the ring did not settle within {RING_SETTLE_MS} ms of the faults' \
                             end; last: {why}"
                        ),
                        vec![],
                    ));
                    return Ok(());
                }
            }
        }
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
        if self.membership {
            self.log("settle: let old owners drop what they no longer replicate".into());
            self.run_for(DROP_SETTLE_MS)?;
        }
        self.check_gossip_quiet()
    }

    /// (g): once nothing changes, gossip is back to its few packets a second. A rejoin storm
    /// (a node renewing its identity over and over, each renewal drawing the next) went on for
    /// minutes after a ring change on real nodes while every member looked alive; nothing else
    /// in a run shows it. The second reading's Merkle roots are kept for the checker's (d)
    /// (each node's trees against its storage).
    fn check_gossip_quiet(&mut self) -> Result<(), String> {
        let running = self.running_names();
        self.log(format!(
            "settle: count gossip packets for {GOSSIP_QUIET_MS} ms"
        ));
        let before = self.read_nodes(&running, false)?;
        self.run_for(GOSSIP_QUIET_MS)?;
        let after = self.read_nodes(&running, true)?;
        self.node_roots = after
            .iter()
            .filter_map(|(node, r)| Some((node.clone(), r.roots.clone()?)))
            .collect();
        let sent = |readings: &BTreeMap<String, crate::client::NodeReading>| {
            readings
                .iter()
                .filter_map(|(node, r)| Some((node.clone(), r.packets_sent?)))
                .collect::<BTreeMap<String, u64>>()
        };
        let (before, after) = (sent(&before), sent(&after));
        let mut loudest: Option<(String, u64)> = None;
        for (node, sent) in &after {
            let Some(first) = before.get(node) else {
                continue;
            };
            let per_sec = sent.saturating_sub(*first) * 1_000 / GOSSIP_QUIET_MS;
            if loudest.as_ref().is_none_or(|(_, most)| per_sec > *most) {
                loudest = Some((node.clone(), per_sec));
            }
            if per_sec > MAX_QUIET_GOSSIP_PER_SEC {
                self.violations.push(Violation::new(
                    Invariant::GossipStorm,
                    "",
                    format!(
                        "{node} sent {per_sec} gossip packets/s over {GOSSIP_QUIET_MS} ms once \
                         settled (at most {MAX_QUIET_GOSSIP_PER_SEC}: a probe and its ack a \
                         second, and rounds of updates)"
                    ),
                    vec![],
                ));
            }
        }
        self.settle_notes.push(match loudest {
            Some((node, per_sec)) => format!(
                "gossip once settled: {per_sec} packets/s at most ({node}), {} of {} nodes read",
                after.len(),
                running.len()
            ),
            None => "gossip once settled: no node answered".to_string(),
        });
        Ok(())
    }

    /// Reads every named node's gossip counter, and its Merkle roots if `roots`.
    fn read_nodes(
        &mut self,
        nodes: &[String],
        roots: bool,
    ) -> Result<BTreeMap<String, crate::client::NodeReading>, String> {
        {
            let mut reader = self.node_reader.borrow_mut();
            reader.ask = nodes.to_vec();
            reader.roots = roots;
            reader.done = false;
        }
        self.tick_until("reading the nodes", |h| h.node_reader.borrow().done)?;
        Ok(std::mem::take(&mut self.node_reader.borrow_mut().readings))
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
            let running = self.running_names();
            for (i, key) in pending.iter().enumerate() {
                let target = running[(i + attempt) % running.len()].clone();
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

    /// The ring now: the final one once learned, else the last committed ring the first
    /// running node recorded, else the configured one.
    fn ring_now(&self) -> Arc<Ring> {
        if let Some(ring) = &self.final_ring {
            return ring.clone();
        }
        self.nodes
            .iter()
            .filter(|n| n.running())
            .find_map(|n| oracle::committed_ring(&n.backend))
            .and_then(|specs| Ring::new(specs).ok())
            .map_or_else(|| self.view.ring.clone(), Arc::new)
    }

    fn replicas_of(&self, key: &str) -> Vec<String> {
        replicas_in(&self.ring_now(), key, self.n)
    }

    /// Learns the final ring from the nodes: the committed ring every running node recorded
    /// (the node's own record, decoded by the node's own code). They must all agree, and agree
    /// with the ring version their `ClusterStatus` reported, if the watcher ran.
    fn learn_final_ring(&mut self) -> Result<Arc<Ring>, String> {
        let mut agreed: Option<(String, Arc<Ring>)> = None;
        for node in self.nodes.iter().filter(|n| n.running()) {
            let specs = oracle::committed_ring(&node.backend)
                .ok_or_else(|| format!("{} recorded no committed ring", node.name))?;
            let ring = Arc::new(
                Ring::new(specs)
                    .map_err(|e| format!("{}'s recorded ring does not build: {e}", node.name))?,
            );
            if let Some((_, st)) = self.shared.status.borrow().get(&node.name)
                && st.ring_version != ring.version()
            {
                return Err(format!(
                    "{} reported ring {:016x} but recorded ring {:016x}",
                    node.name,
                    st.ring_version,
                    ring.version()
                ));
            }
            match &agreed {
                None => agreed = Some((node.name.clone(), ring)),
                Some((first, r)) if r.version() != ring.version() => {
                    return Err(format!(
                        "{first} and {} recorded different committed rings: {} vs {}",
                        node.name,
                        describe_ring(r),
                        describe_ring(&ring)
                    ));
                }
                Some(_) => {}
            }
        }
        agreed
            .map(|(_, r)| r)
            .ok_or_else(|| "no node is running".to_string())
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
            Check::NodeEmpty { node } => {
                let Ok(i) = self.node_index(node) else {
                    return fail("", format!("no node {node}"), vec![]);
                };
                let page = self.nodes[i].backend.scan(
                    Table::Data,
                    Bound::Unbounded,
                    Bound::Unbounded,
                    ScanLimit::entries(8),
                );
                match page {
                    Ok(p) if p.entries.is_empty() => None,
                    Ok(p) => {
                        let keys: Vec<String> = p
                            .entries
                            .iter()
                            .map(|(k, _)| String::from_utf8_lossy(client_key(k)).into_owned())
                            .collect();
                        // Copies the key's replicas already hold, left behind: the known bug.
                        let stale = p.entries.iter().all(|(k, v)| {
                            let key = String::from_utf8_lossy(client_key(k)).into_owned();
                            let clocks: Vec<Clock> = self
                                .replicas_of(&key)
                                .iter()
                                .filter_map(|r| self.node_index(r).ok())
                                .filter_map(|r| self.stored(r, &key))
                                .filter_map(|b| Clock::decode(&b).ok())
                                .collect();
                            let held = Clock::decode(v).ok();
                            held.is_some_and(|h| {
                                Clock::sync_all(clocks.iter()).join().descends(&h.join())
                            })
                        });
                        let v = fail("", format!("{node} still holds {keys:?}"), vec![]);
                        if stale && checker::KNOWN_BUGS.contains(&&checker::STALE_COPY_AFTER_DROP) {
                            v.map(|mut v| {
                                v.known_bug = Some(&checker::STALE_COPY_AFTER_DROP);
                                v
                            })
                        } else {
                            v
                        }
                    }
                    Err(e) => fail("", format!("{node}'s storage: {e}"), vec![]),
                }
            }
            Check::Member {
                observer,
                member,
                lifecycle,
                weight,
            } => {
                let status = self.shared.status.borrow();
                let Some((at, st)) = status.get(observer) else {
                    return fail("", format!("no status from {observer}"), vec![]);
                };
                let Some(m) = st.members.iter().find(|m| m.id == *member) else {
                    return fail(
                        "",
                        format!("{observer} (at {at} ms) does not list {member}"),
                        vec![],
                    );
                };
                if m.lifecycle != *lifecycle || weight.is_some_and(|w| w != m.weight) {
                    return fail(
                        "",
                        format!(
                            "{observer} (at {at} ms) shows {member} {} at weight {} (target {})",
                            m.lifecycle, m.weight, m.target_weight
                        ),
                        vec![],
                    );
                }
                None
            }
        }
    }

    fn finish(mut self) -> Outcome {
        if let Some(start) = self.fault_open.take() {
            self.fault_windows.push((start, u64::MAX));
        }
        if let Some(from) = self.change_open.take() {
            self.change_windows.push((from, u64::MAX));
        }
        let harness_failed = self
            .violations
            .iter()
            .any(|v| v.invariant == Invariant::Harness);
        // The final ring, as the nodes recorded it (every run: a static cluster's must be the
        // configured one).
        let mut settled = !harness_failed && !self.ring_unsettled;
        let mut notes = Vec::new();
        if settled {
            match self.learn_final_ring() {
                Ok(ring) => {
                    notes.push(format!("final ring {}", describe_ring(&ring)));
                    self.final_ring = Some(ring);
                }
                Err(e) => {
                    settled = false;
                    self.violations.push(Violation::new(
                        Invariant::Placement,
                        "",
                        format!("the nodes do not agree on the final ring: {e}"),
                        vec![],
                    ));
                }
            }
        }
        let snapshot = self.snapshot();
        // Nodes removed for good are gone with their disks; spares never started hold nothing.
        let gone: BTreeSet<String> = self
            .nodes
            .iter()
            .filter(|n| n.gone)
            .map(|n| n.name.clone())
            .collect();
        let checked: Snapshot = snapshot
            .iter()
            .filter(|(name, _)| {
                self.node_index(name)
                    .is_ok_and(|i| self.nodes[i].started && !self.nodes[i].gone)
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let history = self.shared.history.borrow().clone();
        let mut keys: BTreeSet<String> = history.keys().into_iter().collect();
        for node in checked.values() {
            keys.extend(node.keys().cloned());
        }
        let ring = self.ring_now();
        let replicas: BTreeMap<String, Vec<String>> = keys
            .iter()
            .map(|k| (k.clone(), replicas_in(&ring, k, self.n)))
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
            .filter(|n| checked.contains_key(&n.name))
            .map(|n| (n.name.clone(), oracle::queued_hints(&n.backend)))
            .collect();
        let (mut violations, checker_notes) = checker::check(&checker::Input {
            history: &history,
            snapshot: &checked,
            replicas: &replicas,
            n: self.n,
            lww: self.conflict == ConflictMode::Lww,
            fault_windows: &self.fault_windows,
            dot_index: &dot_index,
            hints: &hints,
            // A run that stopped early (or whose ring never settled) has no final state to
            // check: only the history checks apply.
            settled,
            placement: settled && self.final_ring.is_some(),
            gone: &gone,
            change_windows: &self.change_windows,
            node_roots: &self.node_roots,
            leaf_bits: self.leaf_bits,
        });
        notes.extend(checker_notes);
        notes.append(&mut self.settle_notes);
        let admin = self.shared.admin.borrow().clone();
        if !admin.is_empty() {
            let accepted = admin.iter().filter(|r| r.accepted()).count();
            notes.push(format!(
                "{} admin requests, {accepted} accepted",
                admin.len()
            ));
        }
        let mut all = std::mem::take(&mut self.violations);
        all.append(&mut violations);
        let sim_ms = self.now_ms();
        // Count operations that never completed (the run ended while they were in flight).
        let pending = history
            .ops
            .iter()
            .filter(|o| o.result == OpResult::Pending)
            .count();
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
            admin,
            violations: all,
            notes,
            sim_ms,
        }
    }
}
