//! Simulated clients: the real tonic `KvClient` over simulated TCP, recording every operation
//! in the shared [`History`].
//!
//! A client host runs either a workload (see [`crate::workload`]) or the commands a scenario
//! queues for it (see [`crate::scenario`]); both go through [`ClientCore::execute`].

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use dynakv_core::context::decode_context;
use dynakv_core::dvvset::VersionVector;
use dynakv_node::proto::kv_client::KvClient;
use dynakv_node::proto::{
    self, ClusterStatusResponse, Consistency, ConsistencyLevel, DeleteRequest, GetRequest,
    PutRequest, quorum,
};
use dynakv_node::storage::MemoryBackend;
use tonic::Code;
use tonic::transport::Channel;

use crate::history::{History, Op, OpKind, OpResult};
use crate::oracle::{self, DotIndex};
use crate::scenario::{AdminKind, Expect};

/// Deadline the client asks the node for (`timeout_ms`).
pub const REQUEST_TIMEOUT_MS: u64 = 2_000;
/// How long the client itself waits before calling an operation indeterminate.
pub const CLIENT_TIMEOUT_MS: u64 = 3_000;

/// A quorum as a client names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    One,
    Quorum,
    All,
    Count(u32),
}

impl Level {
    pub fn resolve(self, n: u32) -> u32 {
        match self {
            Level::One => 1,
            Level::Quorum => n / 2 + 1,
            Level::All => n,
            Level::Count(c) => c,
        }
    }

    fn proto(self) -> proto::Quorum {
        let value = match self {
            Level::One => quorum::Value::Level(ConsistencyLevel::One as i32),
            Level::Quorum => quorum::Value::Level(ConsistencyLevel::Quorum as i32),
            Level::All => quorum::Value::Level(ConsistencyLevel::All as i32),
            Level::Count(c) => quorum::Value::Count(c),
        };
        proto::Quorum { value: Some(value) }
    }
}

/// A context a client holds: the opaque token and what it means.
#[derive(Clone, Debug, Default)]
pub struct HeldContext {
    pub bytes: Bytes,
    pub vv: VersionVector,
    /// The operation that answered it.
    pub source: Option<usize>,
}

/// One request, before it is sent.
#[derive(Clone, Debug)]
pub struct Request {
    pub kind: OpKind,
    pub key: String,
    pub target: String,
    pub level: Level,
    pub strict: bool,
    pub ctx: HeldContext,
    pub note: Option<String>,
}

/// What every client of a run shares.
pub struct Shared {
    pub history: RefCell<History>,
    /// Replication factor, to resolve levels.
    pub n: u32,
    pub cluster_tag: u32,
    /// Fault emulation: send every write without its context (the node then sees blind writes),
    /// while the history records the context the client meant.
    pub drop_put_context: bool,
    /// Fault emulation: send every write's context without its write ids.
    pub drop_context_ids: bool,
    /// Every node's storage, for the [oracle](crate::oracle) (no real client can look there).
    pub backends: BTreeMap<String, MemoryBackend>,
    /// Where each value has been seen stored (see [`crate::oracle`]).
    pub dot_index: RefCell<DotIndex>,
    /// Each node's gossip view as the member watcher last read it: observer -> member -> state.
    pub members: RefCell<BTreeMap<String, BTreeMap<String, String>>>,
    /// Each node's last `Admin.ClusterStatus` answer, with the simulated time (ms) it arrived.
    pub status: RefCell<BTreeMap<String, (u64, ClusterStatusResponse)>>,
    /// The nodes workload clients send to: the members, plus spares once they joined, minus
    /// nodes removed for good. The harness keeps it current.
    pub targets: RefCell<Vec<String>>,
    /// The nodes the member watcher polls (running or not): members and started spares.
    pub watched: RefCell<Vec<String>>,
    /// Every admin request of the run, in the order sent.
    pub admin: RefCell<Vec<AdminRecord>>,
    /// Committed rings the nodes recorded, decoded.
    pub rings: RefCell<oracle::RingCache>,
    /// (observer, member) pairs the watcher has seen `down` at least once.
    pub held_down: RefCell<BTreeSet<(String, String)>>,
    /// The node a `Step::AwaitPhase` waits on, polled every [`FAST_POLL_MS`] meanwhile: the
    /// last phases of a change can pass within one [`RING_POLL_MS`].
    pub fast_poll: RefCell<Option<String>>,
}

/// A client's connections and what it remembers of each key.
pub struct ClientCore {
    pub name: String,
    pub shared: Rc<Shared>,
    channels: BTreeMap<String, KvClient<Channel>>,
    /// Last context per key from a read, and from a write.
    pub last_read: BTreeMap<String, HeldContext>,
    pub last_write: BTreeMap<String, HeldContext>,
    /// The id of this client's last completed operation.
    pub last_op: Option<usize>,
}

impl ClientCore {
    /// Must be called inside the client's host (channels spawn onto its runtime).
    pub fn new(name: &str, nodes: &[String], shared: Rc<Shared>) -> ClientCore {
        let channels = nodes
            .iter()
            .map(|n| (n.clone(), KvClient::new(crate::net::client_channel(n))))
            .collect();
        ClientCore {
            name: name.to_string(),
            shared,
            channels,
            last_read: BTreeMap::new(),
            last_write: BTreeMap::new(),
            last_op: None,
        }
    }

    pub(crate) fn now_ms() -> u64 {
        turmoil::sim_elapsed()
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    /// Sends one request, records it in the history and returns its id.
    pub async fn execute(&mut self, req: Request) -> usize {
        let n = self.shared.n;
        let id = {
            let mut h = self.shared.history.borrow_mut();
            let id = h.ops.len();
            h.ops.push(Op {
                id,
                client: self.name.clone(),
                kind: req.kind.clone(),
                key: req.key.clone(),
                target: req.target.clone(),
                quorum: req.level.resolve(n),
                strict: req.strict,
                ctx_in: if req.kind.is_write() {
                    req.ctx.vv.clone()
                } else {
                    VersionVector::new()
                },
                ctx_source: if req.kind.is_write() {
                    req.ctx.source
                } else {
                    None
                },
                note: req.note.clone(),
                dot_actor: None,
                unbacked_acks: Vec::new(),
                retired_acks: Vec::new(),
                invoked_ms: Self::now_ms(),
                completed_ms: None,
                result: OpResult::Pending,
            });
            id
        };
        let result = self.call(&req).await;
        let result = match result {
            Ok((ctx_bytes, receipt, values)) => {
                let ctx_out = decode_context(&ctx_bytes, self.shared.cluster_tag)
                    .unwrap_or_else(|_| VersionVector::new());
                let held = HeldContext {
                    bytes: ctx_bytes,
                    vv: ctx_out.clone(),
                    source: Some(id),
                };
                if req.kind.is_write() {
                    self.last_write.insert(req.key.clone(), held);
                } else {
                    self.last_read.insert(req.key.clone(), held);
                }
                let receipt = receipt.unwrap_or_default();
                let fallback = receipt.replicas.iter().any(|p| p.fallback && p.ok);
                let acked_by = receipt
                    .replicas
                    .iter()
                    .filter(|p| p.ok)
                    .map(|p| {
                        (
                            p.node.clone(),
                            (!p.hint_for.is_empty()).then(|| p.hint_for.clone()),
                        )
                    })
                    .collect();
                OpResult::Ok {
                    ctx_out,
                    coordinator: receipt.coordinator,
                    values,
                    fallback,
                    acked_by,
                }
            }
            Err(status) => {
                let code = format!("{:?}", status.code());
                let message = status.message().to_string();
                match status.code() {
                    Code::InvalidArgument | Code::ResourceExhausted => {
                        OpResult::Rejected { code, message }
                    }
                    _ => OpResult::Indeterminate { code, message },
                }
            }
        };
        let dot_actor = match &result {
            OpResult::Ok { coordinator, .. } if req.kind.is_write() => self
                .shared
                .backends
                .get(coordinator)
                .and_then(oracle::dot_actor),
            _ => None,
        };
        oracle::observe(
            &mut self.shared.dot_index.borrow_mut(),
            self.shared.backends.values(),
            &req.key,
        );
        let mut h = self.shared.history.borrow_mut();
        let op = &mut h.ops[id];
        op.dot_actor = dot_actor;
        op.completed_ms = Some(Self::now_ms());
        op.result = result;
        if let (Some(dot), OpResult::Ok { acked_by, .. }) = (op.dot(), &op.result) {
            let audit = oracle::audit_ack(
                &self.shared.backends,
                &req.key,
                &dot,
                acked_by,
                self.shared.n,
                &mut self.shared.rings.borrow_mut(),
            );
            op.unbacked_acks = audit.unbacked;
            op.retired_acks = audit.retired;
        }
        self.last_op = Some(id);
        id
    }

    #[allow(clippy::type_complexity)]
    async fn call(
        &mut self,
        req: &Request,
    ) -> Result<(Bytes, Option<proto::Receipt>, Vec<(Vec<u8>, u64)>), tonic::Status> {
        let mut client = self
            .channels
            .entry(req.target.clone())
            .or_insert_with(|| KvClient::new(crate::net::client_channel(&req.target)))
            .clone();
        let level = Some(req.level.proto());
        let consistency = |read: bool| Consistency {
            r: if read { level } else { None },
            w: if read { None } else { level },
            sloppy: Some(!req.strict),
            timeout_ms: REQUEST_TIMEOUT_MS as u32,
        };
        let ctx = if self.shared.drop_put_context {
            Bytes::new()
        } else if self.shared.drop_context_ids {
            let tag = self.shared.cluster_tag;
            match dynakv_core::context::decode_context(&req.ctx.bytes, tag) {
                Ok(vv) => Bytes::from(dynakv_core::context::encode_context(&vv, tag)),
                Err(_) => req.ctx.bytes.clone(),
            }
        } else {
            req.ctx.bytes.clone()
        };
        let key = Bytes::from(req.key.clone().into_bytes());
        let timeout = Duration::from_millis(CLIENT_TIMEOUT_MS);
        let answer = match &req.kind {
            OpKind::Get => {
                let r = GetRequest {
                    key,
                    consistency: Some(consistency(true)),
                };
                tokio::time::timeout(timeout, client.get(r)).await.map(|r| {
                    r.map(|r| {
                        let r = r.into_inner();
                        let values = r
                            .values
                            .into_iter()
                            .map(|s| (s.value.to_vec(), s.timestamp))
                            .collect();
                        (r.context, r.receipt, values)
                    })
                })
            }
            OpKind::Put { value } => {
                let r = PutRequest {
                    key,
                    value: Bytes::from(value.clone()),
                    context: ctx,
                    consistency: Some(consistency(false)),
                };
                tokio::time::timeout(timeout, client.put(r)).await.map(|r| {
                    r.map(|r| {
                        let r = r.into_inner();
                        (r.context, r.receipt, Vec::new())
                    })
                })
            }
            OpKind::Delete => {
                let r = DeleteRequest {
                    key,
                    context: ctx,
                    consistency: Some(consistency(false)),
                };
                tokio::time::timeout(timeout, client.delete(r))
                    .await
                    .map(|r| {
                        r.map(|r| {
                            let r = r.into_inner();
                            (r.context, r.receipt, Vec::new())
                        })
                    })
            }
        };
        match answer {
            Ok(r) => r,
            Err(_) => Err(tonic::Status::deadline_exceeded("client timeout")),
        }
    }
}

/// A command a scenario queues for a client host.
#[derive(Clone, Debug)]
pub struct Command {
    pub kind: OpKind,
    pub key: String,
    pub target: String,
    pub level: Level,
    pub strict: bool,
    pub ctx: crate::scenario::Ctx,
}

/// The queue between the driver and a command client host.
#[derive(Default)]
pub struct CommandQueue {
    pub queue: VecDeque<Command>,
    pub busy: bool,
    /// The last operation this client completed.
    pub last_op: Option<usize>,
}

/// The body of a command client host: runs queued commands one at a time, forever.
pub async fn command_client(
    name: String,
    nodes: Vec<String>,
    shared: Rc<Shared>,
    queue: Rc<RefCell<CommandQueue>>,
) -> turmoil::Result {
    let mut core = ClientCore::new(&name, &nodes, shared);
    loop {
        let next = {
            let mut q = queue.borrow_mut();
            let next = q.queue.pop_front();
            q.busy = next.is_some();
            next
        };
        let Some(cmd) = next else {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        };
        let ctx = match cmd.ctx {
            crate::scenario::Ctx::Empty => HeldContext::default(),
            crate::scenario::Ctx::LastRead => {
                core.last_read.get(&cmd.key).cloned().unwrap_or_default()
            }
            crate::scenario::Ctx::LastWrite => {
                core.last_write.get(&cmd.key).cloned().unwrap_or_default()
            }
        };
        let id = core
            .execute(Request {
                kind: cmd.kind,
                key: cmd.key,
                target: cmd.target,
                level: cmd.level,
                strict: cmd.strict,
                ctx,
                note: None,
            })
            .await;
        let mut q = queue.borrow_mut();
        q.last_op = Some(id);
        q.busy = false;
    }
}

/// How often the member watcher asks every node for its view.
pub const MEMBER_POLL_MS: u64 = 100;

/// How often it asks in a scenario that changes the membership: a node's `ClusterStatus` during
/// a change asks every node that gains ranges for its progress, and the ring steps it waits for
/// take seconds.
pub const RING_POLL_MS: u64 = 250;

/// How often the node a `Step::AwaitPhase` waits on is asked (see [`Shared::fast_poll`]).
pub const FAST_POLL_MS: u64 = 10;

/// How long the watcher waits for one `ClusterStatus` answer (a node with a change under way
/// asks the receiving nodes for their progress first, for up to 3 s when one is cut off). Longer
/// than any answer takes: a request given up on is reset (RST_STREAM), and what h2 does with
/// frames that arrive on a reset stream depends on real time (it remembers reset streams for
/// one second of the machine's clock), which would make runs differ between replays.
pub const MEMBER_POLL_TIMEOUT_MS: u64 = 10_000;

/// The body of the member watcher host: reads every watched node's `Admin.ClusterStatus` (what
/// its gossip knows, and the ring change under way) every `poll_ms` ([`MEMBER_POLL_MS`],
/// [`RING_POLL_MS`]) into
/// [`Shared::status`] and [`Shared::members`], forever; one poller per node, so a slow node does
/// not hold the others up. A node that does not answer keeps its last view.
pub async fn member_watcher(shared: Rc<Shared>, poll_ms: u64) -> turmoil::Result {
    let mut polling: Vec<String> = Vec::new();
    loop {
        let watched = shared.watched.borrow().clone();
        for node in watched {
            if polling.contains(&node) {
                continue;
            }
            polling.push(node.clone());
            tokio::task::spawn_local(poll_status(node, shared.clone(), poll_ms));
        }
        tokio::time::sleep(Duration::from_millis(poll_ms)).await;
    }
}

async fn poll_status(node: String, shared: Rc<Shared>, poll_ms: u64) {
    use dynakv_node::proto::ClusterStatusRequest;
    use dynakv_node::proto::admin_client::AdminClient;
    let client = AdminClient::new(crate::net::client_channel(&node));
    loop {
        let mut c = client.clone();
        let asked = c.cluster_status(ClusterStatusRequest {});
        if let Ok(Ok(status)) =
            tokio::time::timeout(Duration::from_millis(MEMBER_POLL_TIMEOUT_MS), asked).await
        {
            let status = status.into_inner();
            let view = status
                .members
                .iter()
                .map(|m| (m.id.clone(), m.state.clone()))
                .collect();
            for m in status.members.iter().filter(|m| m.state == "down") {
                shared
                    .held_down
                    .borrow_mut()
                    .insert((node.clone(), m.id.clone()));
            }
            shared.members.borrow_mut().insert(node.clone(), view);
            shared
                .status
                .borrow_mut()
                .insert(node.clone(), (ClientCore::now_ms(), status));
        }
        let fast = shared.fast_poll.borrow().as_deref() == Some(node.as_str());
        let every = if fast { FAST_POLL_MS } else { poll_ms };
        tokio::time::sleep(Duration::from_millis(every)).await;
    }
}

/// What the settle phase reads of one node: its gossip counter (`Gossip.Members`'
/// `packets_sent`) and the roots of its Merkle trees (`Admin.NodeStatus`).
#[derive(Clone, Debug, Default)]
pub struct NodeReading {
    /// Gossip packets sent since the node started (`None`: no answer).
    pub packets_sent: Option<u64>,
    /// Root of its tree per co-replica, 32 hex digits (`None`: not asked, or no answer).
    pub roots: Option<BTreeMap<String, String>>,
}

/// The settle phase's reads of the nodes the harness names, for the checks that gossip goes
/// quiet and that each node's Merkle trees match its storage.
#[derive(Default)]
pub struct NodeReader {
    /// Nodes to read next; the reader takes them and answers in `readings`.
    pub ask: Vec<String>,
    /// Whether to read the Merkle roots too (else only the gossip counter).
    pub roots: bool,
    pub readings: BTreeMap<String, NodeReading>,
    /// Set when `readings` holds the answer to the last `ask`.
    pub done: bool,
}

/// Reads the nodes the harness asks for (see [`NodeReader`]); idle otherwise (it sends
/// nothing, so it changes no run until asked).
pub async fn node_reader(reader: Rc<RefCell<NodeReader>>) -> turmoil::Result {
    use dynakv_node::proto::admin_client::AdminClient;
    use dynakv_node::proto::gossip_client::GossipClient;
    use dynakv_node::proto::{GossipMembersRequest, NodeStatusRequest};
    let timeout = Duration::from_millis(MEMBER_POLL_TIMEOUT_MS);
    loop {
        let (ask, with_roots) = {
            let mut r = reader.borrow_mut();
            (std::mem::take(&mut r.ask), r.roots)
        };
        if ask.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let mut readings = BTreeMap::new();
        for node in ask {
            let channel = crate::net::client_channel(&node);
            let mut reading = NodeReading::default();
            let mut gossip = GossipClient::new(channel.clone());
            if let Ok(Ok(answer)) =
                tokio::time::timeout(timeout, gossip.members(GossipMembersRequest {})).await
            {
                reading.packets_sent = Some(answer.into_inner().packets_sent);
            }
            let mut admin = AdminClient::new(channel);
            if with_roots
                && let Ok(Ok(answer)) =
                    tokio::time::timeout(timeout, admin.node_status(NodeStatusRequest {})).await
            {
                reading.roots = Some(
                    answer
                        .into_inner()
                        .roots
                        .into_iter()
                        .map(|r| (r.peer, r.root))
                        .collect(),
                );
            }
            readings.insert(node, reading);
        }
        let mut r = reader.borrow_mut();
        r.readings = readings;
        r.done = true;
    }
}

/// How long an admin request is retried while the answer is `UNAVAILABLE` or
/// `DEADLINE_EXCEEDED` (no address known yet, the member concerned unreachable), as the CLI's
/// and the operator's retries do.
pub const ADMIN_RETRY_MS: u64 = 15_000;

/// Pause between two attempts of an admin request.
const ADMIN_BACKOFF_MS: u64 = 500;

/// Deadline of one admin attempt: the node forwards to the member concerned within 3 s, and an
/// attempt given up on early would make the run depend on real time (see
/// [`MEMBER_POLL_TIMEOUT_MS`]).
const ADMIN_TIMEOUT_MS: u64 = 10_000;

/// How an admin request ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminResult {
    Pending,
    /// Accepted: `changed` false for an idempotent repeat.
    Ok {
        changed: bool,
        message: String,
        recorded_by: String,
    },
    /// Refused or failed, with the gRPC code (after the last retry).
    Failed {
        code: String,
        message: String,
    },
}

/// One admin request and its answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminRecord {
    pub id: usize,
    pub kind: AdminKind,
    pub via: String,
    pub expect: Expect,
    pub attempts: u32,
    pub invoked_ms: u64,
    pub completed_ms: Option<u64>,
    pub result: AdminResult,
}

impl AdminRecord {
    /// Whether the answer is what the scenario expected.
    pub fn as_expected(&self) -> bool {
        match (&self.expect, &self.result) {
            (_, AdminResult::Pending) => false,
            (Expect::Any, _) => true,
            (Expect::Ok, AdminResult::Ok { .. }) => true,
            (Expect::Refused, AdminResult::Failed { code, .. }) => {
                code == "FailedPrecondition" || code == "InvalidArgument"
            }
            _ => false,
        }
    }

    pub fn accepted(&self) -> bool {
        matches!(self.result, AdminResult::Ok { .. })
    }
}

impl std::fmt::Display for AdminRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "admin #{} {} via {} ({} attempt{}, {}..{} ms) -> ",
            self.id,
            self.kind,
            self.via,
            self.attempts,
            if self.attempts == 1 { "" } else { "s" },
            self.invoked_ms,
            self.completed_ms
                .map_or_else(|| "?".to_string(), |t| t.to_string()),
        )?;
        match &self.result {
            AdminResult::Pending => write!(f, "pending"),
            AdminResult::Ok {
                changed,
                message,
                recorded_by,
            } => write!(
                f,
                "ok{} (recorded by {recorded_by}): {message}",
                if *changed { "" } else { ", unchanged" }
            ),
            AdminResult::Failed { code, message } => write!(f, "{code}: {message}"),
        }
    }
}

/// The queue between the driver and the admin host.
#[derive(Default)]
pub struct AdminQueue {
    pub queue: VecDeque<usize>,
    /// Requests sent and not answered yet.
    pub in_flight: usize,
}

/// The body of the admin host: sends every queued request (by its id in [`Shared::admin`]) in
/// a task of its own, so requests run concurrently, forever.
pub async fn admin_client(shared: Rc<Shared>, queue: Rc<RefCell<AdminQueue>>) -> turmoil::Result {
    loop {
        let next = queue.borrow_mut().queue.pop_front();
        let Some(id) = next else {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        };
        let shared = shared.clone();
        let queue = queue.clone();
        tokio::task::spawn_local(async move {
            send_admin(&shared, id).await;
            queue.borrow_mut().in_flight -= 1;
        });
    }
}

async fn send_admin(shared: &Shared, id: usize) {
    use dynakv_node::proto::admin_client::AdminClient;
    use dynakv_node::proto::{LeaveRequest, RemoveRequest, SetWeightRequest};
    let (kind, via) = {
        let records = shared.admin.borrow();
        (records[id].kind.clone(), records[id].via.clone())
    };
    let client = AdminClient::new(crate::net::client_channel(&via));
    let started = ClientCore::now_ms();
    let mut attempts = 0;
    let result = loop {
        attempts += 1;
        let mut c = client.clone();
        let timeout = Duration::from_millis(ADMIN_TIMEOUT_MS);
        let answer = match &kind {
            AdminKind::SetWeight { node, weight } => {
                let req = SetWeightRequest {
                    node: node.clone(),
                    weight: *weight,
                };
                tokio::time::timeout(timeout, c.set_weight(req)).await
            }
            AdminKind::Leave { node } => {
                let req = LeaveRequest { node: node.clone() };
                tokio::time::timeout(timeout, c.leave(req)).await
            }
            AdminKind::Remove { node } => {
                let req = RemoveRequest { node: node.clone() };
                tokio::time::timeout(timeout, c.remove(req)).await
            }
        };
        let status = match answer {
            Ok(Ok(r)) => {
                let r = r.into_inner();
                break AdminResult::Ok {
                    changed: r.changed,
                    message: r.message,
                    recorded_by: r.recorded_by,
                };
            }
            Ok(Err(status)) => status,
            Err(_) => tonic::Status::deadline_exceeded("admin client timeout"),
        };
        let retry = matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded);
        if !retry || ClientCore::now_ms() - started >= ADMIN_RETRY_MS {
            break AdminResult::Failed {
                code: format!("{:?}", status.code()),
                message: status.message().to_string(),
            };
        }
        tokio::time::sleep(Duration::from_millis(ADMIN_BACKOFF_MS)).await;
    };
    let mut records = shared.admin.borrow_mut();
    let r = &mut records[id];
    r.attempts = attempts;
    r.completed_ms = Some(ClientCore::now_ms());
    r.result = result;
}
