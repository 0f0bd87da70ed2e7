//! `dynakv.v1.Admin`: the node's view of the cluster, and membership change (the operator's and
//! the CLI's way in).
//!
//! A weight change or a leave concerns one member, which records it in the metadata it gossips
//! (it chooses its own tokens): a node that receives such a request for another member forwards
//! it there. A removal is recorded by the node that receives it (the member is gone). Every
//! request is checked against the cluster's state first ([`RingState::check_weight`],
//! [`RingState::check_remove`]); a refused one changes nothing.

use std::sync::Arc;
use std::time::Duration;

use dynakv_core::NodeId;
use dynakv_core::membership::{AckLevel, ChangeKind, Lifecycle, MemberState, NodeMetadata};
use dynakv_core::ring::handoffs;
use dynakv_core::transition::{self, ChangeRefused, Phase, RingState};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::time::Instant;
use tonic::metadata::MetadataValue;
use tonic::{Code, Request, Response, Status};

use crate::handoff::RangeState;
use crate::kv::FORWARDED_HEADER;
use crate::node::Node;
use crate::proto::admin_client::AdminClient;
use crate::proto::admin_server::Admin;
use crate::proto::{
    ChangeResponse, ClusterStatusRequest, ClusterStatusResponse, HintQueue, LeaveRequest, Member,
    NodeStatusRequest, NodeStatusResponse, PeerRoot, Rebalance as RebalanceStatus, RemoveRequest,
    SetWeightRequest, Transfer,
};
use crate::rebalance::{self, Rebalance};

/// How long a forwarded admin request or a status fan-out waits for another node.
const PEER_TIMEOUT: Duration = Duration::from_secs(3);

pub struct AdminService {
    node: Arc<Node>,
    rebalance: Arc<Rebalance>,
}

impl AdminService {
    pub fn new(node: Arc<Node>, rebalance: Arc<Rebalance>) -> Self {
        AdminService { node, rebalance }
    }

    fn node_id(&self, raw: &str) -> Result<NodeId, Status> {
        NodeId::new(raw).map_err(|e| Status::invalid_argument(format!("node {raw:?}: {e}")))
    }

    fn client(&self, node: &NodeId) -> Result<AdminClient<tonic::transport::Channel>, Status> {
        if self.node.is_down(node) {
            return Err(Status::failed_precondition(format!(
                "{node} is down: it must be up to change its own weight (remove it if it is gone \
                 for good)"
            )));
        }
        // Not known yet is a passing state (gossip has not told this node), not a refusal.
        let channel =
            self.node.peers.channel(node).ok_or_else(|| {
                Status::unavailable(format!("no address is known for {node} yet"))
            })?;
        Ok(AdminClient::new(channel))
    }

    fn forwarded<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        req.metadata_mut()
            .insert(FORWARDED_HEADER, MetadataValue::from_static("1"));
        req.set_timeout(PEER_TIMEOUT);
        req
    }

    /// Applies `change` to this node's own metadata (under the admin lock), durably, and
    /// gossips it. Returns whether anything changed.
    async fn change_own(
        &self,
        change: impl FnOnce(&NodeMetadata) -> NodeMetadata,
    ) -> Result<bool, Status> {
        let _one = self.rebalance.admin.lock().await;
        let snapshot = self.node.gossip.snapshot();
        let me = snapshot
            .get(&self.node.id)
            .ok_or_else(|| Status::unavailable("this node's gossip has not started"))?;
        let next = change(&me.metadata);
        if next == *me.metadata {
            return Ok(false);
        }
        rebalance::save_metadata(&self.node.store, &next)
            .await
            .map_err(|e| Status::internal(format!("could not record the change: {e}")))?;
        self.node
            .gossip
            .set_metadata(next)
            .await
            .map_err(|e| Status::internal(format!("could not gossip the change: {e}")))?;
        self.rebalance.wake.notify_one();
        Ok(true)
    }

    /// What happens next, in words, after a change to `node`.
    fn what_next(&self, node: &NodeId, changed: bool, what: &str) -> String {
        let view = self.node.view();
        let running = view.rings.current().map(|c| c.proposal.subject.clone());
        let tail = match running {
            Some(s) if s == *node => "; its ring change is under way".to_string(),
            Some(s) => format!("; queued behind {s}'s ring change"),
            None if changed => "; the ring change starts now".to_string(),
            None => String::new(),
        };
        if changed {
            format!("{node}: {what}{tail}")
        } else {
            format!("{node}: {what} already{tail}")
        }
    }
}

/// A change asked of a node that has not heard from the cluster since it started: it cannot
/// tell whether the request can be honoured (a node joining through seeds does not even know
/// itself a member yet). Retryable.
fn starting(node: &NodeId) -> Status {
    Status::unavailable(format!(
        "{node} started and has not heard from the cluster yet, so it cannot check the request; \
         retry, or send it to another node"
    ))
}

fn refused(e: ChangeRefused) -> Status {
    if e.is_invalid_argument() {
        Status::invalid_argument(e.to_string())
    } else {
        Status::failed_precondition(e.to_string())
    }
}

/// Whether a request came from another node (never forwarded again).
fn is_forwarded<T>(request: &Request<T>) -> bool {
    request.metadata().contains_key(FORWARDED_HEADER)
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn set_weight(
        &self,
        request: Request<SetWeightRequest>,
    ) -> Result<Response<ChangeResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let req = request.into_inner();
        let node = self.node_id(&req.node)?;
        if !self.node.has_heard_from_cluster() {
            return Err(starting(&self.node.id));
        }
        let n = self.node.n();
        self.node
            .view()
            .rings
            .check_weight(&node, req.weight, n)
            .map_err(refused)?;
        if node != self.node.id {
            if forwarded {
                return Err(Status::failed_precondition(format!(
                    "{} was asked to change {node}, which is not itself",
                    self.node.id
                )));
            }
            let mut client = self.client(&node)?;
            return client.set_weight(self.forwarded(req)).await;
        }
        let weight = req.weight;
        let changed = self
            .change_own(|me| {
                if transition::target_of(me) == weight && me.lifecycle != Lifecycle::Left {
                    me.clone()
                } else {
                    transition::with_target_weight(me, weight)
                }
            })
            .await?;
        Ok(Response::new(ChangeResponse {
            changed,
            message: self.what_next(&node, changed, &format!("target weight {weight}")),
            recorded_by: self.node.id.to_string(),
        }))
    }

    async fn leave(
        &self,
        request: Request<LeaveRequest>,
    ) -> Result<Response<ChangeResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let req = request.into_inner();
        let node = self.node_id(&req.node)?;
        if !self.node.has_heard_from_cluster() {
            return Err(starting(&self.node.id));
        }
        let view = self.node.view();
        let already_left = self
            .node
            .gossip
            .snapshot()
            .get(&node)
            .is_some_and(|m| m.metadata.lifecycle == Lifecycle::Left);
        if !already_left {
            view.rings
                .check_weight(&node, 0, self.node.n())
                .map_err(refused)?;
        }
        if node != self.node.id {
            if forwarded {
                return Err(Status::failed_precondition(format!(
                    "{} was asked to drain {node}, which is not itself",
                    self.node.id
                )));
            }
            if already_left {
                return Ok(Response::new(ChangeResponse {
                    changed: false,
                    message: format!("{node}: left already"),
                    recorded_by: self.node.id.to_string(),
                }));
            }
            let mut client = self.client(&node)?;
            return client.leave(self.forwarded(req)).await;
        }
        let changed = self.change_own(transition::leaving).await?;
        Ok(Response::new(ChangeResponse {
            changed,
            message: self.what_next(&node, changed, "leaving (draining to weight 0)"),
            recorded_by: self.node.id.to_string(),
        }))
    }

    async fn remove(
        &self,
        request: Request<RemoveRequest>,
    ) -> Result<Response<ChangeResponse>, Status> {
        let req = request.get_ref().clone();
        let node = self.node_id(&req.node)?;
        if !self.node.has_heard_from_cluster() {
            return Err(starting(&self.node.id));
        }
        let view = self.node.view();
        if view.rings.removed().contains(&node) {
            return Ok(Response::new(ChangeResponse {
                changed: false,
                message: format!("{node}: removed already"),
                recorded_by: self.node.id.to_string(),
            }));
        }
        view.rings
            .check_remove(&node, self.node.n())
            .map_err(refused)?;
        // A node gossips one proposal at a time: while its own change is visible it could not
        // propose the removal, and that change may be the one waiting for the removed member.
        // Another member takes it.
        let snapshot = self.node.gossip.snapshot();
        let own_change = snapshot
            .get(&self.node.id)
            .is_some_and(|me| me.metadata.change.proposal.is_some());
        if own_change && !is_forwarded(&request) {
            let free = snapshot.members.iter().find(|m| {
                m.id != self.node.id
                    && m.id != node
                    && m.state == MemberState::Alive
                    && m.metadata.lifecycle == Lifecycle::Normal
                    && m.metadata.change.proposal.is_none()
            });
            let Some(free) = free else {
                return Err(Status::unavailable(format!(
                    "{} has a ring change of its own under way and no other member can take \
                     the removal now; retry, or send it to another node",
                    self.node.id
                )));
            };
            let mut client = self.client(&free.id)?;
            return client.remove(self.forwarded(req)).await;
        }
        let _one = self.rebalance.admin.lock().await;
        let mut removals = rebalance::load_removals(&self.node.store);
        let changed = !removals.contains(&node);
        if changed {
            removals.push(node.clone());
            rebalance::save_removals(&self.node.store, &removals)
                .await
                .map_err(|e| Status::internal(format!("could not record the removal: {e}")))?;
            self.rebalance.wake.notify_one();
        }
        Ok(Response::new(ChangeResponse {
            changed,
            message: self.what_next(&node, changed, "to be removed"),
            recorded_by: self.node.id.to_string(),
        }))
    }

    async fn cluster_status(
        &self,
        _request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        let view = self.node.view();
        let n = self.node.n();
        let ownership = view.ring.ownership(n);
        let gossip = self.node.gossip.snapshot();
        let mut ids: Vec<NodeId> = view.members.iter().map(|m| m.id.clone()).collect();
        for m in &gossip.members {
            if !ids.contains(&m.id) {
                ids.push(m.id.clone());
            }
        }
        ids.sort();
        let members = ids
            .iter()
            .map(|id| {
                let configured = view.members.iter().find(|m| m.id == *id);
                let idx = view.ring.node_index(id.as_str());
                let own = idx.and_then(|i| ownership.iter().find(|o| o.node == i));
                let known = gossip.get(id);
                let removed = view.rings.removed().contains(id);
                let lifecycle = match known {
                    _ if removed => "removed",
                    Some(k) => k.metadata.lifecycle.as_str(),
                    None => "unknown",
                };
                let weight = idx.map_or_else(
                    || known.map_or(0, |k| k.metadata.weight),
                    |i| view.ring.nodes()[i].weight,
                );
                Member {
                    id: id.to_string(),
                    address: known
                        .map(|k| k.address.to_string())
                        .or_else(|| configured.map(|c| c.address.clone()))
                        .unwrap_or_default(),
                    // Liveness as this node's gossip sees it; "unknown": not heard from since
                    // this node started.
                    state: self
                        .node
                        .member_state(id)
                        .map_or("unknown", |s| s.as_str())
                        .to_string(),
                    generation: known.map_or(0, |k| k.generation),
                    lifecycle: lifecycle.to_string(),
                    weight,
                    target_weight: known.map_or(weight, |k| transition::target_of(&k.metadata)),
                    zone: known
                        .and_then(|k| k.metadata.zone.clone())
                        .or_else(|| configured.and_then(|c| c.zone.clone()))
                        .unwrap_or_default(),
                    tokens: idx.map_or(0, |i| view.ring.nodes()[i].tokens.len() as u32),
                    primary_ownership: own.map_or(0.0, |o| o.primary),
                    replica_ownership: own.map_or(0.0, |o| o.replica),
                    metrics_url: configured
                        .and_then(|m| m.metrics.as_ref())
                        .map(|a| format!("http://{a}/metrics"))
                        .unwrap_or_default(),
                }
            })
            .collect();
        let rebalance = self.rebalance_status(&view.rings).await;
        let cfg = &self.node.config.raw;
        Ok(Response::new(ClusterStatusResponse {
            cluster_id: cfg.cluster_id.clone(),
            node_id: self.node.id.to_string(),
            replication_factor: cfg.replication.n,
            conflict_mode: cfg.replication.conflict_mode.as_str().to_string(),
            ring_version: view.ring.version(),
            vnodes_per_node: cfg.replication.vnodes_per_node,
            members,
            rebalance: Some(rebalance),
        }))
    }

    async fn node_status(
        &self,
        _request: Request<NodeStatusRequest>,
    ) -> Result<Response<NodeStatusResponse>, Status> {
        let stats = self.node.store.stats();
        Ok(Response::new(NodeStatusResponse {
            node_id: self.node.id.to_string(),
            roots: self
                .node
                .trees
                .roots()
                .into_iter()
                .map(|(peer, root)| PeerRoot {
                    peer: peer.to_string(),
                    root: format!("{root:032x}"),
                })
                .collect(),
            hints: self
                .node
                .hints
                .depths()
                .into_iter()
                .map(|(target, d)| HintQueue {
                    target: target.to_string(),
                    count: d.count,
                    bytes: d.bytes,
                })
                .collect(),
            keys: stats.keys,
            bytes: stats.bytes,
            transfers: self.own_transfers(),
        }))
    }
}

impl AdminService {
    /// This node's transfers for the change under way (what it receives), by source.
    fn own_transfers(&self) -> Vec<Transfer> {
        let view = self.node.view();
        let Some(change) = view.rings.current() else {
            return Vec::new();
        };
        let live = self
            .rebalance
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let now = Instant::now();
        let Some(progress) = live.progress.clone().filter(|p| p.change == change.id) else {
            return Vec::new();
        };
        crate::handoff::transfers(&self.node.id, &progress)
            .into_iter()
            .map(|(source, ranges)| Transfer {
                source: source.to_string(),
                target: self.node.id.to_string(),
                ranges_total: ranges.len() as u64,
                ranges_done: ranges
                    .iter()
                    .filter(|r| r.state == RangeState::Done)
                    .count() as u64,
                keys_done: ranges.iter().map(|r| r.keys).sum(),
                bytes_done: ranges.iter().map(|r| r.bytes).sum(),
                keys_total: ranges.iter().map(|r| r.keys_total.max(r.keys)).sum(),
                bytes_total: ranges.iter().map(|r| r.bytes_total.max(r.bytes)).sum(),
                retries: ranges.iter().map(|r| r.retries).sum(),
                bytes_per_second: live.rate_from(&source, now),
                state: if ranges.iter().all(|r| r.state == RangeState::Done) {
                    "done"
                } else if ranges.iter().any(|r| r.state == RangeState::Streaming) {
                    "streaming"
                } else {
                    "catching-up"
                }
                .to_string(),
            })
            .collect()
    }

    /// The change under way with its progress, summed over the nodes that gain ranges.
    async fn rebalance_status(&self, rings: &RingState) -> RebalanceStatus {
        let queued: Vec<String> = rings.queued().iter().map(|n| n.to_string()).collect();
        let Some(change) = rings.current() else {
            return RebalanceStatus {
                active: false,
                ring_versions: vec![rings.committed().version()],
                read_ring_version: rings.read_ring().version(),
                eta_seconds: -1.0,
                queued,
                ..Default::default()
            };
        };
        let n = self.node.n();
        let p = &change.proposal;
        let from_weight = change.from_weight(rings.committed());
        let kind = match p.kind {
            ChangeKind::Weight if from_weight == 0 => "join",
            k => k.as_str(),
        };
        // Who gains ranges, and how many each.
        let gainers: Vec<(NodeId, usize)> = change
            .ring
            .nodes()
            .iter()
            .map(|s| {
                let ranges = handoffs(rings.committed(), &change.ring, n, &s.id).len();
                (s.id.clone(), ranges)
            })
            .filter(|(_, r)| *r > 0)
            .collect();
        let mut transfers: Vec<Transfer> = Vec::new();
        let mut asks = FuturesUnordered::new();
        for (node, _) in &gainers {
            if *node == self.node.id {
                transfers.extend(self.own_transfers());
                continue;
            }
            let Ok(mut client) = self.client(node) else {
                continue;
            };
            asks.push(async move {
                let mut req = Request::new(NodeStatusRequest {});
                req.set_timeout(PEER_TIMEOUT);
                tokio::time::timeout(PEER_TIMEOUT, client.node_status(req)).await
            });
        }
        while let Some(answer) = asks.next().await {
            if let Ok(Ok(r)) = answer {
                transfers.extend(r.into_inner().transfers);
            }
        }
        let phase = rings.phase();
        let synced: u64 = gainers
            .iter()
            .filter(|(node, _)| rings.level_of(node, change.id) >= Some(AckLevel::Synced))
            .map(|(_, r)| *r as u64)
            .sum();
        let ranges_total: u64 = gainers.iter().map(|(_, r)| *r as u64).sum();
        let ranges_done = transfers
            .iter()
            .map(|t| t.ranges_done)
            .sum::<u64>()
            .max(synced)
            .min(ranges_total);
        let sum = |f: fn(&Transfer) -> u64| transfers.iter().map(f).sum::<u64>();
        let (keys_done, bytes_done) = (sum(|t| t.keys_done), sum(|t| t.bytes_done));
        let keys_total = sum(|t| t.keys_total).max(keys_done);
        let bytes_total = sum(|t| t.bytes_total).max(bytes_done);
        let rate: f64 = transfers.iter().map(|t| t.bytes_per_second).sum();
        let remaining = bytes_total.saturating_sub(bytes_done);
        let eta_seconds = if ranges_done == ranges_total && phase > Some(Phase::Streaming) {
            0.0
        } else if rate > 0.0 {
            remaining as f64 / rate
        } else {
            -1.0
        };
        RebalanceStatus {
            active: true,
            node: p.subject.to_string(),
            from_weight,
            to_weight: p.weight,
            kind: kind.to_string(),
            phase: phase.map_or("", |p| p.as_str()).to_string(),
            ring_versions: rings.write_rings().iter().map(|r| r.version()).collect(),
            read_ring_version: rings.read_ring().version(),
            ranges_total,
            ranges_done,
            keys_done,
            keys_total,
            bytes_done,
            bytes_total,
            bytes_per_second: rate,
            eta_seconds,
            transfers,
            waiting_for: rings.waiting_for().iter().map(|n| n.to_string()).collect(),
            queued,
        }
    }
}

/// Whether a status is one an admin request may be retried on (the node was unreachable).
pub fn retryable(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded)
}
