//! `dynakv.v1.Admin`: the node's view of the cluster.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::node::Node;
use crate::proto::admin_server::Admin;
use crate::proto::{
    ClusterStatusRequest, ClusterStatusResponse, HintQueue, Member, NodeStatusRequest,
    NodeStatusResponse, PeerRoot,
};

pub struct AdminService {
    node: Arc<Node>,
}

impl AdminService {
    pub fn new(node: Arc<Node>) -> Self {
        AdminService { node }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn cluster_status(
        &self,
        _request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        let view = self.node.view();
        let n = self.node.n();
        let ownership = view.ring.ownership(n);
        let gossip = self.node.gossip.snapshot();
        let members = view
            .members
            .iter()
            .map(|m| {
                let idx = view.ring.node_index(m.id.as_str());
                let own = idx.and_then(|i| ownership.iter().find(|o| o.node == i));
                let known = gossip.get(&m.id);
                Member {
                    id: m.id.to_string(),
                    address: m.address.clone(),
                    // Liveness as this node's gossip sees it; "unknown": not heard from since
                    // this node started.
                    state: self
                        .node
                        .member_state(&m.id)
                        .map_or("unknown", |s| s.as_str())
                        .to_string(),
                    generation: known.map_or(0, |k| k.generation),
                    lifecycle: known
                        .map_or("unknown", |k| k.metadata.lifecycle.as_str())
                        .to_string(),
                    weight: m.weight,
                    zone: m.zone.clone().unwrap_or_default(),
                    tokens: idx.map_or(0, |i| view.ring.nodes()[i].tokens.len() as u32),
                    primary_ownership: own.map_or(0.0, |o| o.primary),
                    replica_ownership: own.map_or(0.0, |o| o.replica),
                    metrics_url: m
                        .metrics
                        .as_ref()
                        .map(|a| format!("http://{a}/metrics"))
                        .unwrap_or_default(),
                }
            })
            .collect();
        let cfg = &self.node.config.raw;
        Ok(Response::new(ClusterStatusResponse {
            cluster_id: cfg.cluster_id.clone(),
            node_id: self.node.id.to_string(),
            replication_factor: cfg.replication.n,
            conflict_mode: cfg.replication.conflict_mode.as_str().to_string(),
            ring_version: view.ring.version(),
            vnodes_per_node: cfg.replication.vnodes_per_node,
            members,
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
        }))
    }
}
