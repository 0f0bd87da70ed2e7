//! `dynakv.v1.KV`: the client service. Validates every request before anything changes, forwards
//! writes to a replica of the key when this node is not one, and maps coordinator outcomes to
//! gRPC statuses a person can act on.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dynakv_core::NodeId;
use dynakv_core::dvvset::VersionVector;
use dynakv_core::forward::{Attempt, Call, Failure, ForwardPlan, Step};
use dynakv_core::hlc::Timestamp;
use dynakv_core::membership::MemberState;
use dynakv_core::write_id::WriteId;
use futures::TryFutureExt;
use futures::future::Either;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use crate::node::{CoordinatorError, Node, Receipt, WriteOutcome, WriteRequest};
use crate::peer::{CLUSTER_HEADER, NODE_HEADER};
use crate::proto::kv_client::KvClient;
use crate::proto::kv_server::Kv;
use crate::proto::{self, ConsistencyLevel, quorum};

/// Set on a request one node forwards to another; the receiver coordinates it and never forwards
/// again (so two nodes with different ring views cannot bounce a request forever).
pub const FORWARDED_HEADER: &str = "x-dynakv-forwarded";

/// Set on the answer of a node that refuses a forwarded request because it owns no part of the
/// ring (`Node::coordinates`): it did nothing, so the forwarding node asks the next member.
pub const NOT_COORDINATING_HEADER: &str = "x-dynakv-not-coordinating";

/// Carries a forwarded write's id (`dynakv_core::write_id`): `<id, 32 hex digits>-<hybrid
/// timestamp, 16 hex digits>`. Read only on forwarded requests.
pub const WRITE_ID_HEADER: &str = "x-dynakv-write-id";

/// Least interval between probes of a coordinator that holds a forwarded write past its hedge
/// delay (see `KvService::until_silent`).
const PROBE_EVERY: Duration = Duration::from_millis(250);

pub struct KvService {
    node: Arc<Node>,
    inflight: Arc<Semaphore>,
}

impl KvService {
    pub fn new(node: Arc<Node>) -> Self {
        let permits = node.config.raw.limits.max_concurrent_requests;
        KvService {
            node,
            inflight: Arc::new(Semaphore::new(permits)),
        }
    }

    /// Whether the caller may speak for a node: a node's certificate, or any caller when this
    /// node requires no authentication (then anyone may call everything anyway).
    fn caller_is_node(&self, ext: &tonic::Extensions) -> bool {
        !self.node.config.auth_required
            || ext
                .get::<crate::auth::ConnInfo>()
                .and_then(|c| c.cert.as_deref())
                .is_some_and(|c| matches!(c, crate::auth::CertIdentity::Node(_)))
    }

    fn admit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        self.inflight.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "node {} is overloaded: {} requests in flight (limits.max_concurrent_requests); retry with back-off",
                self.node.id, self.node.config.raw.limits.max_concurrent_requests
            ))
        })
    }

    fn check_key(&self, key: &[u8]) -> Result<(), Status> {
        let max = self.node.config.raw.limits.max_key_bytes;
        if key.is_empty() {
            return Err(Status::invalid_argument("the key is empty"));
        }
        if key.len() > max {
            return Err(Status::invalid_argument(format!(
                "the key is {} bytes; the limit is {max} bytes (limits.max_key_bytes)",
                key.len()
            )));
        }
        Ok(())
    }

    fn check_value(&self, value: &[u8]) -> Result<(), Status> {
        let max = self.node.config.raw.limits.max_value_bytes;
        if value.len() > max {
            return Err(Status::invalid_argument(format!(
                "the value is {} bytes; the limit is {max} bytes (limits.max_value_bytes)",
                value.len()
            )));
        }
        Ok(())
    }

    fn context(&self, bytes: &[u8]) -> Result<(VersionVector, Vec<WriteId>), Status> {
        self.node
            .decode_context(bytes)
            .map_err(|e| Status::invalid_argument(e.to_string()))
    }

    /// Resolves a requested quorum against n, refusing 0 and anything above n.
    fn quorum(
        &self,
        q: Option<&proto::Quorum>,
        which: char,
        default: u32,
    ) -> Result<usize, Status> {
        let n = self.node.config.raw.replication.n;
        let value = match q.and_then(|q| q.value) {
            None => default,
            Some(quorum::Value::Count(c)) => c,
            Some(quorum::Value::Level(l)) => match ConsistencyLevel::try_from(l) {
                Ok(ConsistencyLevel::Unspecified) => default,
                Ok(ConsistencyLevel::One) => 1,
                Ok(ConsistencyLevel::Quorum) => n / 2 + 1,
                Ok(ConsistencyLevel::All) => n,
                Err(_) => {
                    return Err(Status::invalid_argument(format!(
                        "{which}: unknown consistency level {l}; use ONE, QUORUM, ALL or a number"
                    )));
                }
            },
        };
        if value == 0 || value > n {
            return Err(Status::invalid_argument(format!(
                "{which}={value} is not possible: the cluster keeps n={n} replicas of each key; \
                 use 1..={n}, ONE, QUORUM or ALL"
            )));
        }
        Ok(value as usize)
    }

    fn deadline(&self, c: Option<&proto::Consistency>, meta: &MetadataMap) -> Instant {
        let limits = &self.node.config.raw.limits;
        let mut ms = match c.map(|c| c.timeout_ms).unwrap_or(0) {
            0 => limits.request_timeout_ms,
            t => u64::from(t),
        };
        if let Some(grpc) = grpc_timeout(meta) {
            ms = ms.min(grpc.as_millis() as u64);
        }
        Instant::now() + Duration::from_millis(ms.min(limits.max_request_timeout_ms))
    }

    fn sloppy(&self, c: Option<&proto::Consistency>) -> bool {
        c.and_then(|c| c.sloppy)
            .unwrap_or(self.node.config.raw.replication.sloppy)
    }

    /// `(meta, from_node)`: the request's metadata, and whether its caller may speak for a node
    /// ([`KvService::caller_is_node`]).
    async fn write(
        &self,
        op: &'static str,
        (meta, from_node): (&MetadataMap, bool),
        key: Bytes,
        value: Option<Bytes>,
        context: Bytes,
        consistency: Option<proto::Consistency>,
    ) -> Result<(Vec<u8>, proto::Receipt), Status> {
        let started = std::time::Instant::now();
        let _permit = self.admit()?;
        self.check_key(&key)?;
        if let Some(v) = &value {
            self.check_value(v)?;
        }
        let (ctx, read_ids) = self.context(&context)?;
        let w = self.quorum(
            consistency.as_ref().and_then(|c| c.w.as_ref()),
            'w',
            self.node.config.write_quorum,
        )?;
        let deadline = self.deadline(consistency.as_ref(), meta);
        let forwarded = meta.contains_key(FORWARDED_HEADER);
        // A write id is taken only from a node (it decides what a value hides), never in lww
        // mode, where forwards are not sent twice, and not while a peer is known to lack write
        // ids: it would refuse the value (`Node::write` then records no ids of the context
        // either).
        let write_ids = self.node.write_ids_usable();
        let write_id = if forwarded && from_node && write_ids {
            write_id_from(meta)?
        } else {
            None
        };
        if let Some(w) = &write_id
            && !self.node.plausible_write_id(w)
        {
            return Err(Status::invalid_argument(format!(
                "{WRITE_ID_HEADER} is stamped further ahead of this node's clock than the \
                 hybrid clocks tolerate; nothing was applied"
            )));
        }
        let label = quorum_label(w, self.node.n());
        if forwarded && !self.node.coordinates() {
            let refused = self.not_coordinating(op);
            self.observe(op, &label, started, Some(&refused));
            return Err(refused);
        }
        if let Some(replicas) = (!forwarded)
            .then(|| self.node.replicas_if_not_local(&key))
            .flatten()
        {
            // Forwarded on, a context may reach a node of an older version, which refuses one
            // that carries write ids.
            let context = if write_ids || read_ids.is_empty() {
                context
            } else {
                Bytes::from(self.node.encode_plain_context(&ctx))
            };
            let minted = write_ids.then(|| self.node.mint_write_id());
            let result = self
                .forward(
                    op,
                    &replicas,
                    key,
                    value,
                    context,
                    consistency,
                    deadline,
                    minted,
                )
                .await;
            self.observe(op, &label, started, result.as_ref().err());
            return result;
        }
        let req = WriteRequest {
            key,
            value,
            context: ctx,
            read_ids,
            write_id,
            write_ids,
            w,
            sloppy: self.sloppy(consistency.as_ref()),
            deadline,
            forwarded,
        };
        // The coordination runs in its own task: a client that gives up drops this handler, and a
        // write whose local commit already happened must still update the Merkle trees and reach
        // the other replicas.
        let node = self.node.clone();
        let result = tokio::spawn(async move { node.write(req).await })
            .await
            .map_err(|e| answered(Status::internal(format!("write task failed: {e}"))))?
            .map(|WriteOutcome { context, receipt }| {
                let mut r = receipt_proto(&receipt);
                r.forwarded = forwarded;
                (context, r)
            })
            .map_err(|e| match e {
                // Its view moved on since the check above: still nothing was done.
                CoordinatorError::NotCoordinating => self.not_coordinating(op),
                e => status(e),
            });
        self.observe(op, &label, started, result.as_ref().err());
        result
    }

    /// Sends a write to a replica of the key, which coordinates it. Replicas gossip holds alive
    /// and that answer (not silent) go first, the one with the shortest expected wait first
    /// among them.
    ///
    /// With `write_id` (`siblings` mode, [`Node::write_ids_usable`]) the write carries the
    /// same write id (`dynakv_core::write_id`) to every replica it goes to, which makes a second
    /// coordinator's copy harmless: the two read as one value, and a client that read either one
    /// and overwrote it hides the other. So hedges and retries are allowed then, and not
    /// without, where a second copy would stand beside (or in `lww` mode win over) a write made
    /// after the first. Which replica gets the write next, when to stop and who may have applied
    /// it is [`ForwardPlan`]'s bookkeeping (its rules are in `dynakv_core::forward`); this makes
    /// the calls, keeps the hedge timer (within the hedge budget) and turns the outcome into the
    /// client's status (docs/ARCHITECTURE.md, "Failover").
    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        op: &'static str,
        replicas: &[NodeId],
        key: Bytes,
        value: Option<Bytes>,
        context: Bytes,
        consistency: Option<proto::Consistency>,
        deadline: Instant,
        write_id: Option<WriteId>,
    ) -> Result<(Vec<u8>, proto::Receipt), Status> {
        self.node.metrics.forwarded.inc();
        let mut replicas = replicas.to_vec();
        self.order_for_forward(&mut replicas);
        if write_id.is_some() {
            self.node.peers.earn_hedge();
        }
        let mut plan = ForwardPlan::new(replicas, write_id.is_some());
        let mut calls = futures::stream::FuturesUnordered::new();
        let mut hedge_at = None;
        loop {
            let hedge_due = hedge_at.is_some_and(|at| Instant::now() >= at);
            if let Some(Call { replica, hedge }) = plan.send(hedge_due) {
                if hedge {
                    self.node
                        .metrics
                        .hedges
                        .with_label_values(&["forward_write", "sent"])
                        .inc();
                }
                hedge_at = write_id.map(|_| Instant::now() + self.node.peers.hedge_delay(&replica));
                let write = ForwardedWrite {
                    key: key.clone(),
                    value: value.clone(),
                    context: context.clone(),
                    consistency,
                    deadline,
                    write_id,
                };
                calls.push(self.forward_one(replica, write));
            }
            if calls.is_empty() {
                break;
            }
            let hedge = self.hedge_due(hedge_at.filter(|_| plan.may_hedge()));
            let (replica, result) = tokio::select! {
                biased;
                Some(done) = futures::StreamExt::next(&mut calls) => done,
                () = hedge => continue,
            };
            match result {
                Ok(answer) => {
                    if plan.answered(&replica) {
                        self.node
                            .metrics
                            .hedges
                            .with_label_values(&["forward_write", "won"])
                            .inc();
                    }
                    return Ok(answer);
                }
                Err(attempt) => {
                    if plan.failed(&replica, attempt) == Step::Stop {
                        break;
                    }
                }
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        if plan.went_silent() {
            self.node
                .metrics
                .fast_unavailable
                .with_label_values(&["forward"])
                .inc();
        }
        let failure = plan.finish(Instant::now() >= deadline);
        tracing::debug!(op, ?failure, "forwarding failed");
        let unknown = |message: String, maybe_applied: &[NodeId]| {
            if maybe_applied.is_empty() {
                return message;
            }
            let who: Vec<String> = maybe_applied.iter().map(NodeId::to_string).collect();
            format!(
                "{message}; it may or may not have been applied (by {})",
                who.join(", ")
            )
        };
        Err(match failure {
            Failure::StoppedAnswering { replica, why } => Status::unavailable(format!(
                "replica {replica} stopped answering while coordinating the {op} ({why}); it \
                 may or may not have been applied"
            )),
            Failure::Verdict {
                verdict,
                maybe_applied,
            } if maybe_applied.is_empty() => verdict,
            Failure::Verdict {
                verdict,
                maybe_applied,
            } => Status::new(
                verdict.code(),
                unknown(verdict.message().to_string(), &maybe_applied),
            ),
            Failure::Deadline {
                failures,
                maybe_applied,
            } => Status::deadline_exceeded(unknown(
                format!(
                    "no replica of the key answered the {op} before the deadline ({})",
                    failures.join(", ")
                ),
                &maybe_applied,
            )),
            Failure::Unknown {
                failures,
                maybe_applied,
            } => Status::unavailable(unknown(
                format!(
                    "no replica of the key answered the {op}: {}",
                    failures.join(", ")
                ),
                &maybe_applied,
            )),
            Failure::NotApplied { failures } => Status::unavailable(format!(
                "no replica of the key could coordinate the {op}: {}",
                failures.join(", ")
            )),
        })
    }

    /// One forward attempt to `replica`, with its latency and silence tracked.
    async fn forward_one(
        &self,
        replica: NodeId,
        write: ForwardedWrite,
    ) -> (NodeId, Result<(Vec<u8>, proto::Receipt), Attempt<Status>>) {
        let ForwardedWrite {
            key,
            value,
            context,
            consistency,
            deadline,
            write_id,
        } = write;
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return (replica, Err(Attempt::Deadline));
        }
        let channel = match self.connected(&replica, remaining).await {
            Ok(channel) => channel,
            Err(why) => return (replica, Err(Attempt::NotSent(why))),
        };
        let mut client = KvClient::new(channel)
            .max_decoding_message_size(crate::peer::MAX_PEER_MESSAGE_BYTES)
            .max_encoding_message_size(crate::peer::MAX_PEER_MESSAGE_BYTES);
        let mut consistency = consistency.unwrap_or_default();
        consistency.timeout_ms = remaining.as_millis().min(u32::MAX as u128) as u32;
        let tracked = self.node.peers.track(&replica);
        let probe_key = key.clone();
        // A put or a delete: the same answer (context, receipt) either way.
        let call = match value {
            Some(value) => {
                let req = with_write_id(
                    self.forward_request(proto::PutRequest {
                        key,
                        value,
                        context,
                        consistency: Some(consistency),
                    }),
                    write_id.as_ref(),
                );
                Either::Left(client.put(req).map_ok(|r| {
                    let r = r.into_inner();
                    (r.context, r.receipt)
                }))
            }
            None => {
                let req = with_write_id(
                    self.forward_request(proto::DeleteRequest {
                        key,
                        context,
                        consistency: Some(consistency),
                    }),
                    write_id.as_ref(),
                );
                Either::Right(client.delete(req).map_ok(|r| {
                    let r = r.into_inner();
                    (r.context, r.receipt)
                }))
            }
        };
        let call = tokio::time::timeout(remaining, call);
        // Biased (here and in every select the simulation runs through): tokio picks an
        // unbiased select's first branch from a per-runtime RNG that is not the simulation's
        // seed, so a run would not replay. And an answer wins over a silence verdict that
        // comes due in the same poll.
        let result = tokio::select! {
            biased;
            r = call => r,
            () = self.until_silent(&replica, probe_key, deadline) => {
                let why = "silent: neither the forwarded request nor a probe sent since got an \
                           answer";
                return (replica, Err(Attempt::Silent(why.to_string())));
            }
        };
        let outcome = match result {
            Ok(Ok((context, receipt))) => {
                tracked.heard();
                Ok((context.to_vec(), receipt.unwrap_or_default()))
            }
            // It did nothing (it owns no part of the ring, is stopping or starting): the next
            // replica may coordinate.
            Ok(Err(s)) if s.metadata().contains_key(NOT_COORDINATING_HEADER) => {
                tracked.heard();
                Err(Attempt::NotSent(format!("{replica}: {}", s.message())))
            }
            // Never reached it (no connection): the next replica may coordinate.
            Ok(Err(s)) if is_transport_error(&s) && crate::net::never_sent(&s) => Err(
                Attempt::NotSent(format!("{replica} unreachable ({})", s.message())),
            ),
            // The connection broke after sending: the write may have been applied.
            Ok(Err(s)) if is_transport_error(&s) => Err(Attempt::Broken(s.message().to_string())),
            // Any other answer (a quorum failure, a refused request) is the replica's verdict.
            Ok(Err(s)) => {
                tracked.heard();
                Err(Attempt::Verdict(s))
            }
            Err(_) => Err(Attempt::Deadline),
        };
        (replica, outcome)
    }

    /// Returns once `coordinator`, which has a forwarded write in hand, is silent: nothing heard
    /// from it for the silence threshold (at least 1 s). A coordinator that is merely slow (its
    /// own replicas keep it waiting) is not: past its hedge delay it is probed with a read of
    /// the same key on the replica link, one probe at a time, and any answer shows the process
    /// is there. A paused or cut-off coordinator answers nothing, so the client learns in about a
    /// second that its write may or may not have been applied, instead of at its deadline.
    async fn until_silent(&self, coordinator: &NodeId, key: Bytes, deadline: Instant) {
        let peers = &self.node.peers;
        tokio::time::sleep(peers.hedge_delay(coordinator)).await;
        loop {
            let every = peers.hedge_delay(coordinator).max(PROBE_EVERY);
            let probe_deadline = (Instant::now() + every).min(deadline);
            let op = proto::replica_request::Op::Fetch(proto::FetchRequest {
                key: key.clone(),
                ..Default::default()
            });
            // Its answer resets the silence clock (`PeerPool::call` tracks it); at most one
            // probe per interval, answered or not.
            let _ = peers.call(coordinator, op, probe_deadline).await;
            tokio::time::sleep_until(probe_deadline).await;
            if peers.is_silent(coordinator) {
                return;
            }
            if Instant::now() >= deadline {
                // The forward's own timeout answers.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Resolves when a hedge may be sent: at `at`, if the hedge budget allows one then; never
    /// without `at` or budget (the caller's other branches decide).
    async fn hedge_due(&self, at: Option<Instant>) {
        if let Some(at) = at {
            tokio::time::sleep_until(at).await;
            if self.node.peers.try_hedge() {
                return;
            }
        }
        std::future::pending::<()>().await;
    }

    /// Orders the members a request may be forwarded to: alive ones first, then suspect or
    /// unknown, down, unreachable; by expected wait within each class, so a member with a
    /// request stuck past its hedge delay goes last among the alive ones long before it is
    /// silent.
    fn order_for_forward(&self, members: &mut [NodeId]) {
        self.node.peers.sort_by_expected_wait(members);
        members.sort_by_key(|m| {
            if self.node.is_unreachable(m) {
                return 3;
            }
            match self.node.member_state(m) {
                Some(MemberState::Alive) => 0,
                None | Some(MemberState::Suspect) => 1,
                Some(MemberState::Down) => 2,
            }
        });
    }

    /// A channel to `member` ready to send on, or why not (`unknown`, or `unreachable` within
    /// the connect bound: a dropped SYN must not eat the request's deadline).
    async fn connected(&self, member: &NodeId, remaining: Duration) -> Result<Channel, String> {
        let Some(mut channel) = self.node.peers.channel(member) else {
            return Err(format!("{member} unknown"));
        };
        let connect = self.node.config.raw.limits.peer_connect_timeout_ms;
        let ready = tokio::time::timeout(
            remaining.min(Duration::from_millis(connect)),
            tower::ServiceExt::<tonic::codegen::http::Request<tonic::body::Body>>::ready(
                &mut channel,
            ),
        )
        .await;
        match ready {
            Ok(Ok(_)) => Ok(channel),
            _ => Err(format!("{member} unreachable")),
        }
    }

    /// The answer to a request forwarded to this node while it owns no part of the ring.
    fn not_coordinating(&self, op: &str) -> Status {
        let mut s = answered(Status::unavailable(format!(
            "{} owns no part of the ring and does not coordinate forwarded requests; the {op} \
             was not applied",
            self.node.id
        )));
        s.metadata_mut()
            .insert(NOT_COORDINATING_HEADER, MetadataValue::from_static("1"));
        s
    }

    /// Has a member that owns part of the ring coordinate a read for this node, which does not
    /// (`Node::coordinates`): its view may show a ring the cluster has moved past. Candidates
    /// are the key's replicas and the ring's next members, alive ones first, the shortest
    /// expected wait first among them. Reads change nothing, so a member that cannot be reached
    /// or refuses is followed by the next, and one that has not answered within its hedge delay
    /// gets company (within the hedge budget); the first answer wins. A coordinator's own error
    /// is the answer.
    async fn forward_get(
        &self,
        key: Bytes,
        consistency: Option<proto::Consistency>,
        deadline: Instant,
    ) -> Result<proto::GetResponse, Status> {
        let mut candidates = self.node.read_coordinators(&key);
        if candidates.is_empty() {
            return Err(Status::unavailable(format!(
                "{} owns no part of the ring and knows no member that does; the read cannot be \
                 coordinated yet",
                self.node.id
            )));
        }
        self.node.metrics.forwarded.inc();
        self.order_for_forward(&mut candidates);
        self.node.peers.earn_hedge();
        let mut next = candidates.into_iter();
        let mut calls = futures::stream::FuturesUnordered::new();
        let mut failures: Vec<String> = Vec::new();
        let mut hedged = false;
        let mut replace = false;
        let mut first: Option<NodeId> = None;
        let mut hedge_at = None;
        loop {
            let hedge_due = hedge_at.is_some_and(|at| Instant::now() >= at);
            if let Some(c) = (calls.is_empty() || replace || hedge_due)
                .then(|| next.next())
                .flatten()
            {
                if !calls.is_empty() && !replace {
                    hedged = true;
                    self.node
                        .metrics
                        .hedges
                        .with_label_values(&["forward_read", "sent"])
                        .inc();
                }
                replace = false;
                hedge_at = Some(Instant::now() + self.node.peers.hedge_delay(&c));
                first.get_or_insert_with(|| c.clone());
                calls.push(self.forward_get_one(c, key.clone(), consistency, deadline));
            }
            if calls.is_empty() {
                break;
            }
            let hedge = self.hedge_due(hedge_at.filter(|_| next.len() > 0));
            tokio::select! {
                biased;
                Some((c, result)) = futures::StreamExt::next(&mut calls) => match result {
                    Ok(answer) => {
                        if hedged && first.as_ref() != Some(&c) {
                            self.node
                                .metrics
                                .hedges
                                .with_label_values(&["forward_read", "won"])
                                .inc();
                        }
                        return Ok(answer);
                    }
                    // A coordinator's own answer (a quorum it could not reach, a deadline) is
                    // the verdict: asking the next would only repeat the quorum read.
                    Err(s) if !is_transport_error(&s)
                        && !s.metadata().contains_key(NOT_COORDINATING_HEADER) =>
                    {
                        return Err(s);
                    }
                    Err(s) => {
                        failures.push(format!("{c}: {}", s.message()));
                        // It did nothing: the next one goes at once, not as a hedge.
                        replace = true;
                    }
                },
                () = hedge => {}
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        if Instant::now() >= deadline {
            return Err(Status::deadline_exceeded(format!(
                "no member that owns part of the ring answered the read before the deadline ({})",
                failures.join(", ")
            )));
        }
        Err(Status::unavailable(format!(
            "no member that owns part of the ring could coordinate the read: {}",
            failures.join(", ")
        )))
    }

    /// One read forwarded to `member`, with its latency tracked.
    async fn forward_get_one(
        &self,
        member: NodeId,
        key: Bytes,
        consistency: Option<proto::Consistency>,
        deadline: Instant,
    ) -> (NodeId, Result<proto::GetResponse, Status>) {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            let why = Status::deadline_exceeded(format!("no time left to ask {member}"));
            return (member, Err(why));
        }
        let channel = match self.connected(&member, remaining).await {
            Ok(channel) => channel,
            Err(why) => return (member, Err(Status::unavailable(why))),
        };
        let mut client = KvClient::new(channel)
            .max_decoding_message_size(crate::peer::MAX_PEER_MESSAGE_BYTES)
            .max_encoding_message_size(crate::peer::MAX_PEER_MESSAGE_BYTES);
        let mut consistency = consistency.unwrap_or_default();
        consistency.timeout_ms = remaining.as_millis().min(u32::MAX as u128) as u32;
        let req = self.forward_request(proto::GetRequest {
            key,
            consistency: Some(consistency),
        });
        let tracked = self.node.peers.track(&member);
        let result = match tokio::time::timeout(remaining, client.get(req)).await {
            Ok(Ok(r)) => {
                tracked.heard();
                Ok(r.into_inner())
            }
            Ok(Err(s)) => {
                if !is_transport_error(&s) {
                    tracked.heard();
                }
                Err(s)
            }
            Err(_) => Err(Status::deadline_exceeded(format!(
                "{member} did not answer"
            ))),
        };
        (member, result)
    }

    fn forward_request<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        let md = req.metadata_mut();
        md.insert(FORWARDED_HEADER, MetadataValue::from_static("1"));
        if let Ok(v) = MetadataValue::try_from(self.node.id.as_str()) {
            md.insert(NODE_HEADER, v);
        }
        if let Ok(v) = MetadataValue::try_from(self.node.config.raw.cluster_id.as_str()) {
            md.insert(CLUSTER_HEADER, v);
        }
        req
    }

    fn observe(
        &self,
        op: &str,
        consistency: &str,
        started: std::time::Instant,
        err: Option<&Status>,
    ) {
        let outcome = match err {
            None => "ok",
            Some(s) => code_label(s.code()),
        };
        self.node
            .metrics
            .request_seconds
            .with_label_values(&[op, consistency, outcome])
            .observe(started.elapsed().as_secs_f64());
    }
}

/// How one forward attempt failed.
/// What a forward attempt sends: the client's write, its deadline, and its write id.
struct ForwardedWrite {
    key: Bytes,
    value: Option<Bytes>,
    context: Bytes,
    consistency: Option<proto::Consistency>,
    deadline: Instant,
    write_id: Option<WriteId>,
}

/// A transport failure (connection refused or broken), as opposed to a node's answer.
fn is_transport_error(s: &Status) -> bool {
    s.metadata().get(ANSWER_HEADER).is_none()
}

/// Set on every status a DynaKV node returns, so a forwarding node can tell a replica's verdict
/// from a connection failure.
pub const ANSWER_HEADER: &str = "x-dynakv-answer";

fn answered(mut s: Status) -> Status {
    s.metadata_mut()
        .insert(ANSWER_HEADER, MetadataValue::from_static("1"));
    s
}

fn quorum_label(q: usize, n: usize) -> String {
    if q == 1 {
        "one".into()
    } else if q == n {
        "all".into()
    } else if q == n / 2 + 1 {
        "quorum".into()
    } else {
        q.to_string()
    }
}

fn code_label(c: Code) -> &'static str {
    match c {
        Code::InvalidArgument => "invalid_argument",
        Code::Unavailable => "unavailable",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::ResourceExhausted => "resource_exhausted",
        Code::Internal => "internal",
        _ => "error",
    }
}

/// Maps a coordinator failure to the status the client sees.
pub fn status(e: CoordinatorError) -> Status {
    let s = match &e {
        CoordinatorError::Invalid(m) => Status::invalid_argument(m.clone()),
        CoordinatorError::NotReplica(r) => Status::unavailable(format!(
            "this node is not a replica of the key (replicas: {r:?})"
        )),
        CoordinatorError::Quorum(q) => Status::unavailable(q.to_string()),
        CoordinatorError::Deadline(q) => Status::deadline_exceeded(q.to_string()),
        CoordinatorError::Storage(s) => Status::unavailable(format!(
            "this node's storage failed and it acknowledges no writes until restarted: {s}"
        )),
        CoordinatorError::TooManySiblings { .. } => Status::resource_exhausted(e.to_string()),
        CoordinatorError::Expired { .. } => Status::deadline_exceeded(e.to_string()),
        // Nothing was done: a node forwarding the request asks the next replica.
        CoordinatorError::Stopping | CoordinatorError::Starting => {
            let mut s = Status::unavailable(e.to_string());
            s.metadata_mut()
                .insert(NOT_COORDINATING_HEADER, MetadataValue::from_static("1"));
            s
        }
        CoordinatorError::NotCoordinating => {
            let mut s = Status::unavailable(format!("{e}; nothing was applied"));
            s.metadata_mut()
                .insert(NOT_COORDINATING_HEADER, MetadataValue::from_static("1"));
            s
        }
    };
    answered(s)
}

/// The write id a forwarding node sent ([`WRITE_ID_HEADER`]), if any.
fn write_id_from(meta: &MetadataMap) -> Result<Option<WriteId>, Status> {
    let Some(v) = meta.get(WRITE_ID_HEADER) else {
        return Ok(None);
    };
    let bad = || Status::invalid_argument(format!("malformed {WRITE_ID_HEADER} header"));
    let (id, at) = v
        .to_str()
        .map_err(|_| bad())?
        .split_once('-')
        .ok_or_else(bad)?;
    if id.len() != 32 || at.len() != 16 {
        return Err(bad());
    }
    Ok(Some(WriteId {
        id: u128::from_str_radix(id, 16).map_err(|_| bad())?,
        at: Timestamp::from_u64(u64::from_str_radix(at, 16).map_err(|_| bad())?),
    }))
}

/// `req` with `w` in its [`WRITE_ID_HEADER`].
fn with_write_id<T>(mut req: Request<T>, w: Option<&WriteId>) -> Request<T> {
    if let Some(w) = w
        && let Ok(v) = MetadataValue::try_from(format!("{:032x}-{:016x}", w.id, w.at.as_u64()))
    {
        req.metadata_mut().insert(WRITE_ID_HEADER, v);
    }
    req
}

/// Parses the standard `grpc-timeout` header ("100m", "5S", ...).
fn grpc_timeout(meta: &MetadataMap) -> Option<Duration> {
    let v = meta.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 {
        return None;
    }
    let (num, unit) = v.split_at(v.len() - 1);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

pub fn receipt_proto(r: &Receipt) -> proto::Receipt {
    proto::Receipt {
        coordinator: r.coordinator.clone(),
        needed: r.needed as u32,
        got: r.got as u32,
        replicas: r
            .replicas
            .iter()
            .map(|p| proto::ReplicaReply {
                node: p.node.to_string(),
                fallback: p.fallback,
                hint_for: p
                    .hint_for
                    .as_ref()
                    .map(|h| h.to_string())
                    .unwrap_or_default(),
                ok: p.error.is_none(),
                error: p.error.map(|e| e.label().to_string()).unwrap_or_default(),
                late: false,
            })
            .collect(),
        hinted: r.hinted,
        siblings: r.siblings as u32,
        ring_version: r.ring_version,
        forwarded: false,
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn ring(
        &self,
        _request: Request<proto::RingRequest>,
    ) -> Result<Response<proto::RingResponse>, Status> {
        if !self.node.has_heard_from_cluster() {
            return Err(status(CoordinatorError::Starting));
        }
        let view = self.node.view();
        let ring = view.rings.read_ring();
        let addresses: std::collections::HashMap<NodeId, String> =
            view.peer_addresses().into_iter().collect();
        let nodes = ring
            .nodes()
            .iter()
            .map(|spec| proto::RingNode {
                id: spec.id.to_string(),
                address: if spec.id == self.node.id {
                    self.node.config.advertise.clone()
                } else {
                    addresses.get(&spec.id).cloned().unwrap_or_default()
                },
                weight: spec.weight,
                zone: spec.zone.clone(),
                tokens: spec.tokens.clone(),
            })
            .collect();
        Ok(Response::new(proto::RingResponse {
            ring_version: view.ring.version(),
            n: self.node.n() as u32,
            nodes,
        }))
    }

    async fn put(
        &self,
        request: Request<proto::PutRequest>,
    ) -> Result<Response<proto::PutResponse>, Status> {
        let (meta, ext, req) = request.into_parts();
        let from_node = self.caller_is_node(&ext);
        let (context, receipt) = self
            .write(
                "put",
                (&meta, from_node),
                req.key,
                Some(req.value),
                req.context,
                req.consistency,
            )
            .await
            .map_err(answered)?;
        Ok(Response::new(proto::PutResponse {
            context: context.into(),
            receipt: Some(receipt),
        }))
    }

    async fn delete(
        &self,
        request: Request<proto::DeleteRequest>,
    ) -> Result<Response<proto::DeleteResponse>, Status> {
        let (meta, ext, req) = request.into_parts();
        let from_node = self.caller_is_node(&ext);
        let (context, receipt) = self
            .write(
                "delete",
                (&meta, from_node),
                req.key,
                None,
                req.context,
                req.consistency,
            )
            .await
            .map_err(answered)?;
        Ok(Response::new(proto::DeleteResponse {
            context: context.into(),
            receipt: Some(receipt),
        }))
    }

    async fn get(
        &self,
        request: Request<proto::GetRequest>,
    ) -> Result<Response<proto::GetResponse>, Status> {
        let started = std::time::Instant::now();
        let (meta, _, req) = request.into_parts();
        let _permit = self.admit().map_err(answered)?;
        self.check_key(&req.key).map_err(answered)?;
        let c = req.consistency.as_ref();
        let r = self
            .quorum(
                c.and_then(|c| c.r.as_ref()),
                'r',
                self.node.config.read_quorum,
            )
            .map_err(answered)?;
        let label = quorum_label(r, self.node.n());
        let deadline = self.deadline(c, &meta);
        // Coordinated here only while this node owns part of the ring, checked again on the
        // view the read runs on (it may move on between the two).
        let local = if self.node.coordinates() {
            match self
                .node
                .read(req.key.clone(), r, self.sloppy(c), deadline)
                .await
            {
                Err(CoordinatorError::NotCoordinating) => None,
                result => Some(result),
            }
        } else {
            None
        };
        let Some(result) = local else {
            let result = if meta.contains_key(FORWARDED_HEADER) {
                Err(self.not_coordinating("read"))
            } else {
                self.forward_get(req.key, req.consistency, deadline).await
            };
            self.observe("get", &label, started, result.as_ref().err());
            return result.map(Response::new);
        };
        let result = result.map_err(status);
        self.observe("get", &label, started, result.as_ref().err());
        let out = result?;
        Ok(Response::new(proto::GetResponse {
            values: out
                .values
                .into_iter()
                .filter_map(|s| {
                    let ts = s.ts.as_u64();
                    s.data.map(|value| proto::Sibling {
                        value,
                        timestamp: ts,
                    })
                })
                .collect(),
            context: out.context.into(),
            receipt: Some(proto::Receipt {
                forwarded: meta.contains_key(FORWARDED_HEADER),
                ..receipt_proto(&out.receipt)
            }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units_parse() {
        let mut m = MetadataMap::new();
        m.insert("grpc-timeout", MetadataValue::from_static("250m"));
        assert_eq!(grpc_timeout(&m), Some(Duration::from_millis(250)));
        m.insert("grpc-timeout", MetadataValue::from_static("2S"));
        assert_eq!(grpc_timeout(&m), Some(Duration::from_secs(2)));
        m.insert("grpc-timeout", MetadataValue::from_static("x"));
        assert_eq!(grpc_timeout(&m), None);
    }

    #[test]
    fn quorum_labels_name_levels() {
        assert_eq!(quorum_label(1, 3), "one");
        assert_eq!(quorum_label(2, 3), "quorum");
        assert_eq!(quorum_label(3, 3), "all");
        assert_eq!(quorum_label(2, 5), "2");
    }
}
