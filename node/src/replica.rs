//! The server side of `Replica.Exchange`: requests arrive in frames, run concurrently (bounded
//! per stream), and their responses are batched back into frames.

use std::sync::Arc;

use dynakv_core::dvvset::Clock;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status, Streaming};

use dynakv_core::NodeId;

use crate::antientropy;
use crate::handoff;
use crate::hint_store::HintError;
use crate::node::{Node, data_key};
use crate::peer::{CLUSTER_HEADER, NODE_HEADER};
use crate::proto::replica_server::Replica;
use crate::proto::{
    FetchResponse, MerkleResponse, PullPage, PullRequest, PurgeResponse, ReplicaError,
    ReplicaRequest, ReplicaResponse, RequestFrame, ResponseFrame, StoreResponse, pull_request,
    replica_error, replica_request, replica_response,
};
use crate::storage::StorageError;

pub struct ReplicaService {
    node: Arc<Node>,
}

impl ReplicaService {
    pub fn new(node: Arc<Node>) -> Self {
        ReplicaService { node }
    }
}

impl ReplicaService {
    /// The peer a stream or pull comes from, refused unless it belongs to this cluster.
    fn peer_of<T>(&self, request: &Request<T>) -> Result<NodeId, Status> {
        let cluster = request
            .metadata()
            .get(CLUSTER_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if cluster != self.node.config.raw.cluster_id {
            return Err(Status::permission_denied(format!(
                "this node belongs to cluster {:?}, not {cluster:?}",
                self.node.config.raw.cluster_id
            )));
        }
        request
            .metadata()
            .get(NODE_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| NodeId::new(v).ok())
            .ok_or_else(|| Status::invalid_argument("peer stream without a valid node id"))
    }
}

/// Pages a pull sends ahead of the puller, at most (HTTP/2 flow control bounds the rest).
const PULL_PAGES_AHEAD: usize = 2;

#[tonic::async_trait]
impl Replica for ReplicaService {
    type ExchangeStream = ReceiverStream<Result<ResponseFrame, Status>>;
    type PullStream = ReceiverStream<Result<PullPage, Status>>;

    async fn pull(
        &self,
        request: Request<PullRequest>,
    ) -> Result<Response<Self::PullStream>, Status> {
        let peer = self.peer_of(&request)?;
        let req = request.into_inner();
        let mode = pull_request::Mode::try_from(req.mode)
            .map_err(|_| Status::invalid_argument(format!("unknown pull mode {}", req.mode)))?;
        if req.summary_bits > handoff::MAX_SUMMARY_BITS {
            return Err(Status::invalid_argument(format!(
                "summary_bits {} is above {}",
                req.summary_bits,
                handoff::MAX_SUMMARY_BITS
            )));
        }
        let (tx, rx) = mpsc::channel(PULL_PAGES_AHEAD);
        let node = self.node.clone();
        tokio::spawn(async move {
            if mode == pull_request::Mode::Summary {
                let page = handoff::summarize(&node.store, req.start, req.end, req.summary_bits)
                    .map(|hashes| PullPage {
                        summary: hashes
                            .into_iter()
                            .map(|h| bytes::Bytes::copy_from_slice(&h.to_le_bytes()))
                            .collect(),
                        ..Default::default()
                    })
                    .map_err(|e| Status::internal(e.to_string()));
                let _ = tx.send(page).await;
                return;
            }
            let mut after = req.after.to_vec();
            let mut first = true;
            loop {
                let page = handoff::serve_page(&node.store, &req, &after, first, || {
                    node.estimate_range(req.start, req.end)
                });
                first = false;
                match page {
                    Ok((page, next)) => {
                        let keys = page.entries.len() as u64;
                        let bytes: u64 = page
                            .entries
                            .iter()
                            .map(|e| (e.key.len() + e.clock.len()) as u64)
                            .sum();
                        if tx.send(Ok(page)).await.is_err() {
                            tracing::debug!(%peer, "puller went away");
                            return;
                        }
                        node.metrics
                            .handoff_keys
                            .with_label_values(&["sent"])
                            .inc_by(keys);
                        node.metrics
                            .handoff_bytes
                            .with_label_values(&["sent"])
                            .inc_by(bytes);
                        match next {
                            Some(n) => after = n,
                            None => return,
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn exchange(
        &self,
        request: Request<Streaming<RequestFrame>>,
    ) -> Result<Response<Self::ExchangeStream>, Status> {
        let peer = self.peer_of(&request)?;
        let limits = &self.node.config.raw.limits;
        let max_frame = limits.max_frame_messages;
        let concurrency = Arc::new(Semaphore::new(limits.max_replica_ops_per_stream));
        let (resp_tx, mut resp_rx) = mpsc::channel::<ReplicaResponse>(max_frame * 4);
        let (frame_tx, frame_rx) = mpsc::channel::<Result<ResponseFrame, Status>>(16);

        // Batch responses into frames.
        tokio::spawn(async move {
            while let Some(first) = resp_rx.recv().await {
                let mut responses = vec![first];
                while responses.len() < max_frame {
                    match resp_rx.try_recv() {
                        Ok(r) => responses.push(r),
                        Err(_) => break,
                    }
                }
                if frame_tx
                    .send(Ok(ResponseFrame { responses }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });

        let node = self.node.clone();
        let mut inbound = request.into_inner();
        tokio::spawn(async move {
            loop {
                let frame = match inbound.message().await {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "replica stream ended");
                        break;
                    }
                };
                for req in frame.requests {
                    let Ok(permit) = concurrency.clone().acquire_owned().await else {
                        return;
                    };
                    let node = node.clone();
                    let resp_tx = resp_tx.clone();
                    let peer = peer.clone();
                    tokio::spawn(async move {
                        let response = handle(&node, &peer, req).await;
                        drop(permit);
                        let _ = resp_tx.send(response).await;
                    });
                }
            }
        });
        let mut response = Response::new(ReceiverStream::new(frame_rx));
        if self.node.config.raw.replication.write_ids {
            response.metadata_mut().insert(
                crate::peer::FEATURES_HEADER,
                MetadataValue::from_static(crate::peer::WRITE_IDS_FEATURE),
            );
        }
        Ok(response)
    }
}

fn error(kind: replica_error::Kind, message: impl Into<String>) -> replica_response::Result {
    replica_response::Result::Error(ReplicaError {
        kind: kind as i32,
        message: message.into(),
    })
}

fn storage_error(node: &Node, e: StorageError) -> replica_response::Result {
    node.metrics
        .replica_ops
        .with_label_values(&["store", e.label()])
        .inc();
    error(replica_error::Kind::StorageFailed, e.to_string())
}

fn ok(node: &Node, op: &str) {
    node.metrics
        .replica_ops
        .with_label_values(&[op, "ok"])
        .inc();
}

async fn handle(node: &Node, peer: &NodeId, req: ReplicaRequest) -> ReplicaResponse {
    let result = match req.op {
        Some(replica_request::Op::Store(s)) => match Clock::decode(&s.clock) {
            Err(e) => error(replica_error::Kind::Invalid, format!("bad clock: {e}")),
            Ok(clock) if s.hint_for.is_empty() => {
                match node.merge_local(s.key.to_vec(), clock).await {
                    Ok(_) => {
                        ok(node, "store");
                        replica_response::Result::Store(StoreResponse {})
                    }
                    Err(e) => storage_error(node, e),
                }
            }
            Ok(clock) => match NodeId::new(&s.hint_for) {
                Err(e) => error(replica_error::Kind::Invalid, format!("hint_for: {e}")),
                Ok(target) => match node.store_hint(target, &data_key(&s.key), clock).await {
                    Ok(()) => {
                        ok(node, "hint");
                        replica_response::Result::Store(StoreResponse {})
                    }
                    Err(HintError::Storage(e)) => storage_error(node, e),
                    Err(e) => error(replica_error::Kind::HintDropped, e.to_string()),
                },
            },
        },
        Some(replica_request::Op::Fetch(f)) => {
            let pos = dynakv_core::hash::key_position(&f.key);
            if f.hint_for.is_empty() && !node.view().rings.holds(pos, node.n()) {
                // A coordinator whose view lags behind a committed change: an answer from a
                // node that may have dropped the key must not count as "absent".
                return reply(
                    req.id,
                    error(
                        replica_error::Kind::NotReplica,
                        format!("{} does not replicate this key in its ring", node.id),
                    ),
                );
            }
            let local = if f.hint_for.is_empty() {
                node.read_local(&f.key)
            } else {
                match NodeId::new(&f.hint_for) {
                    Ok(target) => node.hints.read(&node.store, &target, &data_key(&f.key)),
                    Err(e) => {
                        return reply(
                            req.id,
                            error(replica_error::Kind::Invalid, format!("hint_for: {e}")),
                        );
                    }
                }
            };
            match local {
                Ok(v) => {
                    ok(node, "fetch");
                    replica_response::Result::Fetch(FetchResponse {
                        clock: v
                            .map(|c| bytes::Bytes::from(c.to_bytes()))
                            .unwrap_or_default(),
                    })
                }
                Err(e) => storage_error(node, e),
            }
        }
        Some(replica_request::Op::Merkle(m)) => match antientropy::handle_merkle(node, peer, &m) {
            Ok(slice) => {
                ok(node, "merkle");
                replica_response::Result::Merkle(MerkleResponse { slice })
            }
            Err(e) => error(replica_error::Kind::Invalid, e.to_string()),
        },
        Some(replica_request::Op::Digests(d)) => {
            match antientropy::handle_digests(node, peer, &d) {
                Ok(r) => {
                    ok(node, "digests");
                    replica_response::Result::Digests(r)
                }
                Err(e) => storage_error(node, e),
            }
        }
        Some(replica_request::Op::Purge(p)) => {
            let digest: Result<[u8; 16], _> = p.digest.as_ref().try_into();
            match digest {
                Err(_) => error(replica_error::Kind::Invalid, "digest is not 16 bytes"),
                Ok(d) => match node.purge_local(&p.key, u128::from_le_bytes(d)).await {
                    Ok(purged) => {
                        ok(node, "purge");
                        replica_response::Result::Purge(PurgeResponse { purged })
                    }
                    Err(e) => storage_error(node, e),
                },
            }
        }
        None => error(replica_error::Kind::Invalid, "empty request"),
    };
    reply(req.id, result)
}

fn reply(id: u64, result: replica_response::Result) -> ReplicaResponse {
    ReplicaResponse {
        id,
        result: Some(result),
    }
}
