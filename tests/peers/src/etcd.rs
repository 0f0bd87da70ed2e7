//! etcd v3 as a benchmark [`Driver`]: reads are `Range` (linearizable unless `serializable`),
//! writes are `Put`, and the cart read-modify-write is `Range` then a `Txn` that puts the new
//! value only if the key's `mod_revision` is still the one read: etcd's optimistic concurrency,
//! the counterpart of writing back with DynaKV's context. A failed compare is reported as
//! `ABORTED` (DynaKV keeps both writes as siblings instead; etcd makes the client retry).

use std::time::Duration;

use bytes::Bytes;
use dynakv_node::cli::bench::{Driver, Outcome, Session, connect_channels};
use dynakv_node::cli::client::{Conn, Credentials};

use crate::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use crate::etcdserverpb::kv_client::KvClient;
use crate::etcdserverpb::request_op::Request;
use crate::etcdserverpb::{Compare, PutRequest, RangeRequest, RequestOp, TxnRequest};

/// An etcd cluster under test: `channels` connections spread over its members.
pub struct EtcdDriver {
    channels: Vec<Conn>,
    serializable: bool,
}

impl EtcdDriver {
    /// Connects `channels` connections, connection `j` to member `j mod endpoints` (or the next
    /// one that answers). `serializable` reads are served by the member asked, without a
    /// round to the leader (stale reads possible); the default is linearizable.
    pub async fn connect(
        endpoints: &[String],
        channels: usize,
        request_timeout: Duration,
        serializable: bool,
    ) -> Result<EtcdDriver, tonic::Status> {
        Ok(EtcdDriver {
            channels: connect_channels(
                endpoints,
                channels,
                request_timeout,
                &Credentials::default(),
            )
            .await?,
            serializable,
        })
    }
}

impl Driver for EtcdDriver {
    type Session = EtcdSession;

    fn session(&self, task: usize) -> EtcdSession {
        EtcdSession {
            client: KvClient::new(self.channels[task % self.channels.len()].clone()),
            serializable: self.serializable,
        }
    }
}

/// One client task on one connection.
pub struct EtcdSession {
    client: KvClient<Conn>,
    serializable: bool,
}

impl EtcdSession {
    fn range(&self, key: Bytes) -> RangeRequest {
        RangeRequest {
            key,
            serializable: self.serializable,
            ..RangeRequest::default()
        }
    }
}

impl Session for EtcdSession {
    async fn read(&mut self, key: Bytes) -> Outcome {
        let request = self.range(key);
        match self.client.range(request).await {
            Ok(r) if r.get_ref().kvs.is_empty() => Outcome::NotFound,
            Ok(_) => Outcome::Ok,
            Err(s) => Outcome::Error(s),
        }
    }

    async fn write(&mut self, key: Bytes, value: Bytes) -> Outcome {
        let request = PutRequest {
            key,
            value,
            ..PutRequest::default()
        };
        match self.client.put(request).await {
            Ok(_) => Outcome::Ok,
            Err(s) => Outcome::Error(s),
        }
    }

    async fn read_modify_write<F>(&mut self, key: Bytes, update: F) -> Outcome
    where
        F: FnOnce(&[Bytes]) -> Bytes + Send,
    {
        let request = self.range(key.clone());
        let read = match self.client.range(request).await {
            Ok(r) => r.into_inner(),
            Err(s) => return Outcome::Error(s),
        };
        // A key that does not exist has mod_revision 0 in a compare.
        let (values, revision) = match read.kvs.into_iter().next() {
            Some(kv) => (vec![kv.value], kv.mod_revision),
            None => (Vec::new(), 0),
        };
        let txn = TxnRequest {
            compare: vec![Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Mod as i32,
                key: key.clone(),
                target_union: Some(TargetUnion::ModRevision(revision)),
                range_end: Bytes::new(),
            }],
            success: vec![RequestOp {
                request: Some(Request::RequestPut(PutRequest {
                    key,
                    value: update(&values),
                    ..PutRequest::default()
                })),
            }],
            failure: Vec::new(),
        };
        match self.client.txn(txn).await {
            Ok(r) if r.get_ref().succeeded => Outcome::Ok,
            Ok(_) => Outcome::Error(tonic::Status::aborted(
                "the key changed between the read and the write (mod_revision compare failed)",
            )),
            Err(s) => Outcome::Error(s),
        }
    }
}
