//! The seam between the operator and the nodes' Admin gRPC service.
//!
//! [`NodeAdmin`] is what the controller calls: the cluster's status as one node sees it, and
//! membership changes (`SetWeight`, `Leave`) sent through a node (any node forwards
//! to the member concerned). [`GrpcAdmin`] is the real implementation; where it dials is
//! [`Addressing`]: on Kubernetes the pod's DNS name through the headless Service, in tests a map
//! of pod names to local addresses (real `dynakv` processes). The controller's flow tests use a
//! scripted implementation instead (`fixtures.rs`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tonic::transport::{Channel, Endpoint};

use crate::decisions::AdminAction;
use crate::proto::admin_client::AdminClient;
use crate::proto::{
    ChangeResponse, ClusterStatusRequest, ClusterStatusResponse, LeaveRequest, SetWeightRequest,
};
use crate::resources::{GRPC_PORT, pod_host};

/// Which cluster a request is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterRef {
    pub name: String,
    pub namespace: String,
    /// How to reach a cluster with TLS; `None`: plain text.
    pub credentials: Option<AdminCredentials>,
}

impl ClusterRef {
    /// A cluster served in plain text.
    pub fn plain(name: impl Into<String>, namespace: impl Into<String>) -> Self {
        ClusterRef {
            name: name.into(),
            namespace: namespace.into(),
            credentials: None,
        }
    }
}

/// What the operator presents to a TLS cluster, from the Secret its nodes mount: the CA their
/// certificates chain to, and the node certificate and key, with which the operator calls as a
/// node of the cluster. Not a token: a token the user changes reaches the nodes only as they
/// restart one by one, which the operator drives and must keep calling through.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct AdminCredentials {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for AdminCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminCredentials")
            .field("ca_pem", &format_args!("{} bytes", self.ca_pem.len()))
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl AdminCredentials {
    /// A TLS client configuration trusting only the cluster's CA (every certificate in
    /// `ca.crt`, so that a CA being replaced can be listed beside its successor) and presenting
    /// the node certificate.
    fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            let cert = cert.map_err(|e| format!("the cluster's ca.crt: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("the cluster's ca.crt: {e}"))?;
        }
        if roots.is_empty() {
            return Err("the cluster's ca.crt holds no certificate".into());
        }
        let chain = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("the cluster's tls.crt: {e}"))?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| format!("the cluster's tls.key: {e}"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| format!("the cluster's tls.crt and tls.key: {e}"))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// A failed Admin request.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The address of the pod is not a valid endpoint. Nothing was sent.
    #[error("bad Admin address {address}: {source}")]
    Address {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The node refused the request (INVALID_ARGUMENT or FAILED_PRECONDITION); by the Admin
    /// contract nothing changed. The message is the node's, meant for people.
    #[error("{pod} refused {action}: {message}")]
    Refused {
        pod: String,
        action: String,
        message: String,
    },
    /// The node could not be reached or failed otherwise; the change may or may not have been
    /// recorded (every Admin request is idempotent, so it is simply sent again).
    #[error("{pod}: {status}")]
    Unavailable {
        pod: String,
        #[source]
        status: tonic::Status,
    },
}

impl AdminError {
    pub fn is_refusal(&self) -> bool {
        matches!(self, AdminError::Refused { .. })
    }

    fn from_status(pod: &str, action: String, status: tonic::Status) -> Self {
        match status.code() {
            tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => AdminError::Refused {
                pod: pod.to_string(),
                action,
                message: status.message().to_string(),
            },
            _ => AdminError::Unavailable {
                pod: pod.to_string(),
                status,
            },
        }
    }
}

/// The Admin requests the controller makes, through the node running in pod `pod`.
pub trait NodeAdmin: Send + Sync {
    fn cluster_status<'a>(
        &'a self,
        cluster: &'a ClusterRef,
        pod: &'a str,
    ) -> BoxFuture<'a, Result<ClusterStatusResponse, AdminError>>;

    fn change<'a>(
        &'a self,
        cluster: &'a ClusterRef,
        pod: &'a str,
        action: &'a AdminAction,
    ) -> BoxFuture<'a, Result<ChangeResponse, AdminError>>;
}

/// Where a pod's Admin service listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addressing {
    /// `<pod>.<name>-peers.<namespace>.svc:7070` (in the cluster).
    ClusterDns,
    /// Pod name -> host:port (tests, or an operator run outside the cluster with port-forwards).
    Static(BTreeMap<String, String>),
}

impl Addressing {
    pub fn address(&self, cluster: &ClusterRef, pod: &str) -> Option<String> {
        match self {
            Addressing::ClusterDns => Some(format!(
                "{}:{GRPC_PORT}",
                pod_host(&cluster.name, &cluster.namespace, pod)
            )),
            Addressing::Static(map) => map.get(pod).cloned(),
        }
    }
}

/// The Admin client over gRPC, one lazily connected channel per address (and credentials).
/// With TLS, the node's certificate must chain to the cluster's CA and name the pod's DNS name
/// (`<pod>.<name>-peers.<namespace>.svc`), whatever address the pod is dialled at.
pub struct GrpcAdmin {
    addressing: Addressing,
    timeout: Duration,
    channels: Mutex<BTreeMap<String, Channel>>,
}

/// TCP to `address`, then TLS with `server_name` as the name the certificate must carry.
async fn dial_tls(
    address: String,
    server_name: rustls_pki_types::ServerName<'static>,
    config: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> std::io::Result<hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>>
{
    let connect = async {
        let tcp = tokio::net::TcpStream::connect(&address).await?;
        tcp.set_nodelay(true)?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(server_name, tcp)
            .await
            .map_err(|e| std::io::Error::other(format!("TLS handshake with {address}: {e}")))?;
        Ok(hyper_util::rt::TokioIo::new(tls))
    };
    tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

impl GrpcAdmin {
    pub fn new(addressing: Addressing, timeout: Duration) -> Self {
        GrpcAdmin {
            addressing,
            timeout,
            channels: Mutex::new(BTreeMap::new()),
        }
    }

    fn client(&self, cluster: &ClusterRef, pod: &str) -> Result<AdminClient<Channel>, AdminError> {
        let Some(address) = self.addressing.address(cluster, pod) else {
            return Err(AdminError::Unavailable {
                pod: pod.to_string(),
                status: tonic::Status::unavailable("no address known for this pod"),
            });
        };
        // New credentials (a renewed certificate, a rotated CA) mean new connections.
        let key = match &cluster.credentials {
            Some(c) => {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                c.hash(&mut h);
                format!("{address} tls {:016x}", h.finish())
            }
            None => address.clone(),
        };
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(ch) = channels.get(&key) {
            return Ok(AdminClient::new(ch.clone()));
        }
        let endpoint = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|source| AdminError::Address {
                address: address.clone(),
                source,
            })?
            .connect_timeout(Duration::from_secs(2))
            .timeout(self.timeout);
        let ch = match &cluster.credentials {
            None => endpoint.connect_lazy(),
            Some(c) => {
                let unavailable = |message: String| AdminError::Unavailable {
                    pod: pod.to_string(),
                    status: tonic::Status::unavailable(message),
                };
                let config = c.client_config().map_err(unavailable)?;
                let host = pod_host(&cluster.name, &cluster.namespace, pod);
                let name = rustls_pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| unavailable(format!("{host:?} is not a TLS server name: {e}")))?;
                let dial_address = address.clone();
                endpoint.connect_with_connector_lazy(tower::service_fn(
                    move |_: tonic::codegen::http::Uri| {
                        dial_tls(
                            dial_address.clone(),
                            name.clone(),
                            config.clone(),
                            Duration::from_secs(2),
                        )
                    },
                ))
            }
        };
        // Bounded: one entry per pod address ever seen; a long-lived operator over many
        // clusters starts over rather than grow without limit.
        if channels.len() > 4096 {
            channels.clear();
        }
        channels.insert(key, ch.clone());
        Ok(AdminClient::new(ch))
    }
}

impl NodeAdmin for GrpcAdmin {
    fn cluster_status<'a>(
        &'a self,
        cluster: &'a ClusterRef,
        pod: &'a str,
    ) -> BoxFuture<'a, Result<ClusterStatusResponse, AdminError>> {
        Box::pin(async move {
            let mut client = self.client(cluster, pod)?;
            client
                .cluster_status(ClusterStatusRequest {})
                .await
                .map(|r| r.into_inner())
                .map_err(|s| AdminError::from_status(pod, "ClusterStatus".into(), s))
        })
    }

    fn change<'a>(
        &'a self,
        cluster: &'a ClusterRef,
        pod: &'a str,
        action: &'a AdminAction,
    ) -> BoxFuture<'a, Result<ChangeResponse, AdminError>> {
        Box::pin(async move {
            let mut client = self.client(cluster, pod)?;
            let result = match action {
                AdminAction::SetWeight { node, weight } => {
                    client
                        .set_weight(SetWeightRequest {
                            node: node.clone(),
                            weight: *weight,
                        })
                        .await
                }
                AdminAction::Leave { node } => {
                    client.leave(LeaveRequest { node: node.clone() }).await
                }
            };
            result
                .map(|r| r.into_inner())
                .map_err(|s| AdminError::from_status(pod, action.to_string(), s))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_dns_names_the_pod_through_the_headless_service() {
        let c = ClusterRef::plain("kv", "prod");
        assert_eq!(
            Addressing::ClusterDns.address(&c, "kv-2").as_deref(),
            Some("kv-2.kv-peers.prod.svc:7070")
        );
        let stat = Addressing::Static(BTreeMap::from([(
            "kv-0".to_string(),
            "127.0.0.1:7100".to_string(),
        )]));
        assert_eq!(stat.address(&c, "kv-0").as_deref(), Some("127.0.0.1:7100"));
        assert_eq!(stat.address(&c, "kv-1"), None);
    }

    #[test]
    fn refusals_are_told_apart_from_outages() {
        let e = AdminError::from_status(
            "kv-0",
            "Leave(kv-1)".into(),
            tonic::Status::failed_precondition("only 2 members of weight > 0 would remain"),
        );
        assert!(e.is_refusal());
        assert!(e.to_string().contains("only 2 members"), "{e}");
        let e = AdminError::from_status("kv-0", "x".into(), tonic::Status::unavailable("down"));
        assert!(!e.is_refusal());
    }

    /// A scripted Admin service behind a real gRPC server.
    struct Scripted {
        calls: Mutex<Vec<String>>,
    }

    #[tonic::async_trait]
    impl crate::proto::admin_server::Admin for Scripted {
        async fn cluster_status(
            &self,
            _: tonic::Request<ClusterStatusRequest>,
        ) -> Result<tonic::Response<ClusterStatusResponse>, tonic::Status> {
            Ok(tonic::Response::new(ClusterStatusResponse {
                node_id: "kv-0".into(),
                members: vec![crate::proto::Member {
                    id: "kv-0".into(),
                    weight: 100,
                    target_weight: 100,
                    lifecycle: "normal".into(),
                    state: "alive".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }))
        }
        async fn node_status(
            &self,
            _: tonic::Request<crate::proto::NodeStatusRequest>,
        ) -> Result<tonic::Response<crate::proto::NodeStatusResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("not scripted"))
        }
        async fn set_weight(
            &self,
            r: tonic::Request<SetWeightRequest>,
        ) -> Result<tonic::Response<ChangeResponse>, tonic::Status> {
            let r = r.into_inner();
            self.calls
                .lock()
                .unwrap()
                .push(format!("SetWeight({}, {})", r.node, r.weight));
            Ok(tonic::Response::new(ChangeResponse {
                changed: true,
                message: format!("{}: target weight {}", r.node, r.weight),
                recorded_by: "kv-0".into(),
            }))
        }
        async fn leave(
            &self,
            r: tonic::Request<LeaveRequest>,
        ) -> Result<tonic::Response<ChangeResponse>, tonic::Status> {
            let r = r.into_inner();
            self.calls
                .lock()
                .unwrap()
                .push(format!("Leave({})", r.node));
            Err(tonic::Status::failed_precondition(
                "only 2 members of weight > 0 would remain; n = 3",
            ))
        }
        async fn remove(
            &self,
            _: tonic::Request<crate::proto::RemoveRequest>,
        ) -> Result<tonic::Response<ChangeResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("not scripted"))
        }
    }

    #[tokio::test]
    async fn the_grpc_client_reads_status_sends_changes_and_tells_refusals() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let scripted = std::sync::Arc::new(Scripted {
            calls: Mutex::new(Vec::new()),
        });
        let service = crate::proto::admin_server::AdminServer::from_arc(scripted.clone());
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let admin = GrpcAdmin::new(
            Addressing::Static(BTreeMap::from([("kv-0".to_string(), addr.to_string())])),
            Duration::from_secs(5),
        );
        let c = ClusterRef::plain("kv", "default");
        let status = admin.cluster_status(&c, "kv-0").await.unwrap();
        assert_eq!(status.members[0].lifecycle, "normal");
        let resp = admin
            .change(
                &c,
                "kv-0",
                &AdminAction::SetWeight {
                    node: "kv-3".into(),
                    weight: 25,
                },
            )
            .await
            .unwrap();
        assert!(resp.changed);
        let err = admin
            .change(
                &c,
                "kv-0",
                &AdminAction::Leave {
                    node: "kv-2".into(),
                },
            )
            .await
            .unwrap_err();
        assert!(err.is_refusal(), "{err:?}");
        assert_eq!(
            err.to_string(),
            "kv-0 refused Leave(kv-2): only 2 members of weight > 0 would remain; n = 3"
        );
        assert_eq!(
            *scripted.calls.lock().unwrap(),
            vec!["SetWeight(kv-3, 25)", "Leave(kv-2)"]
        );
        server.abort();
    }

    #[tokio::test]
    async fn an_unreachable_node_is_unavailable_not_refused() {
        let admin = GrpcAdmin::new(
            Addressing::Static(BTreeMap::from([(
                "kv-0".to_string(),
                // Port 1 on loopback: nothing listens there.
                "127.0.0.1:1".to_string(),
            )])),
            Duration::from_millis(500),
        );
        let c = ClusterRef::plain("kv", "default");
        let err = admin.cluster_status(&c, "kv-0").await.unwrap_err();
        assert!(matches!(err, AdminError::Unavailable { .. }), "{err:?}");
        let err = admin.cluster_status(&c, "kv-9").await.unwrap_err();
        assert!(matches!(err, AdminError::Unavailable { .. }), "{err:?}");
    }
}
