//! The network seam: how a node opens channels to its peers. Real TCP (leaving from the node's
//! own listen IP, so faults can be injected per node on one machine) or, in the deterministic
//! simulation, the simulator's TCP.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// The start of the message of every status of a call that failed because no connection could be
/// made (refused, unreachable, timed out): such a call certainly never reached the peer.
pub const NOT_CONNECTED: &str = "not connected";

/// A connection attempt failed: nothing was sent. Connectors (the real one below and the
/// simulation's) return this, so a call's status tells "never sent" apart from "sent, and the
/// connection broke" (see [`never_sent`]).
#[derive(Debug, thiserror::Error)]
#[error("{NOT_CONNECTED} to {address}: {source}")]
pub struct NotConnected {
    pub address: String,
    #[source]
    pub source: std::io::Error,
}

/// Whether a failed call certainly never left this node: the channel could not connect. Any
/// other transport failure (a connection that broke, a reset stream) may have delivered it.
pub fn never_sent(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable && status.message().starts_with(NOT_CONNECTED)
}

/// A connection's byte stream: plain TCP or TLS over it.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

/// Where a dialler gets the TLS client configuration of each new connection (a node's is
/// re-read from its files; the CLI's is fixed).
pub type TlsSource = Arc<dyn Fn() -> Arc<rustls::ClientConfig> + Send + Sync>;

/// Dials `uri` over TCP from `local_ip` (when given), then runs the TLS handshake when `tls` is
/// given, all within `timeout`. A failed handshake is a [`NotConnected`] too: nothing was sent.
pub async fn dial(
    uri: Uri,
    local_ip: Option<IpAddr>,
    timeout: Duration,
    tls: Option<TlsSource>,
) -> Result<TokioIo<Box<dyn Io>>, NotConnected> {
    dial_tls(uri, local_ip, timeout, tls)
        .await
        .map(|(io, _)| io)
}

/// [`dial`], also returning the identity in the server's certificate (with TLS).
async fn dial_tls(
    uri: Uri,
    local_ip: Option<IpAddr>,
    timeout: Duration,
    tls: Option<TlsSource>,
) -> Result<(TokioIo<Box<dyn Io>>, Option<Arc<crate::auth::CertIdentity>>), NotConnected> {
    let host = uri.host().unwrap_or_default().to_string();
    let address = format!("{host}:{}", uri.port_u16().unwrap_or(80));
    let fail = |source| NotConnected {
        address: address.clone(),
        source,
    };
    let connect = async {
        let target = tokio::net::lookup_host(address.as_str())
            .await?
            .next()
            .ok_or_else(|| std::io::Error::other("the address resolves to nothing"))?;
        let socket = match target {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        if let Some(ip) = local_ip.filter(|ip| ip.is_ipv4() == target.is_ipv4()) {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        let stream = socket.connect(target).await?;
        stream.set_nodelay(true)?;
        let done: (Box<dyn Io>, _) = match &tls {
            Some(config) => {
                let stream = crate::tls::connect(config(), &host, stream)
                    .await
                    .map_err(|e| std::io::Error::other(format!("TLS handshake: {e}")))?;
                let presented =
                    crate::tls::presented_identity(stream.get_ref().1.peer_certificates());
                (Box::new(stream), presented)
            }
            None => (Box::new(stream), None),
        };
        Ok(done)
    };
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok((io, presented))) => Ok((TokioIo::new(io), presented)),
        Ok(Err(e)) => Err(fail(e)),
        Err(_) => Err(fail(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "connect timed out",
        ))),
    }
}

/// Makes a channel from a configured endpoint; the second argument is the node id the peer must
/// prove with its certificate, when known.
type MakeChannel = dyn Fn(Endpoint, Option<String>) -> Channel + Send + Sync;

/// Opens lazily-connecting gRPC channels to peer addresses.
#[derive(Clone)]
pub struct Connector {
    /// Set on the endpoint for custom transports; the TCP dialer applies its own.
    connect_timeout: Option<Duration>,
    make: Arc<MakeChannel>,
}

impl Connector {
    /// Real TCP; outgoing connections are bound to `local_ip` when given. A failed connection
    /// attempt is a [`NotConnected`].
    pub fn tcp(local_ip: Option<IpAddr>, connect_timeout: Duration) -> Connector {
        Self::tcp_tls(local_ip, connect_timeout, None)
    }

    /// Real TCP with TLS when `tls` is given (see [`dial`]).
    pub fn tcp_tls(
        local_ip: Option<IpAddr>,
        connect_timeout: Duration,
        tls: Option<TlsSource>,
    ) -> Connector {
        Connector {
            connect_timeout: None,
            make: Arc::new(move |endpoint: Endpoint, expect: Option<String>| {
                let tls = tls.clone();
                endpoint.connect_with_connector_lazy(tower::service_fn(move |uri: Uri| {
                    dial_node(uri, local_ip, connect_timeout, tls.clone(), expect.clone())
                }))
            }),
        }
    }

    /// A custom transport (the simulation): `make` turns a configured endpoint into a channel,
    /// typically with `Endpoint::connect_with_connector_lazy`.
    pub fn custom(
        connect_timeout: Duration,
        make: impl Fn(Endpoint) -> Channel + Send + Sync + 'static,
    ) -> Connector {
        Connector {
            connect_timeout: Some(connect_timeout),
            make: Arc::new(move |endpoint, _| make(endpoint)),
        }
    }

    /// A channel to `address` (host:port). Connects on first use and reconnects after failures.
    pub fn channel(&self, address: &str) -> Channel {
        self.channel_to(address, None)
    }

    /// A channel to the node `node` at `address`: with TLS, a connection whose certificate
    /// names another node is refused (a node certificate shared by every node of a cluster,
    /// `urn:dynakv:node:*`, names any).
    pub fn channel_to_node(&self, address: &str, node: &str) -> Channel {
        self.channel_to(address, Some(node.to_string()))
    }

    fn channel_to(&self, address: &str, expect: Option<String>) -> Channel {
        let endpoint = match Endpoint::from_shared(format!("http://{address}")) {
            Ok(e) => e,
            // An address that does not parse can never be reached; a channel to a reserved
            // address fails every call, which is the honest outcome.
            Err(_) => Endpoint::from_static("http://0.0.0.0:1"),
        };
        let endpoint = match self.connect_timeout {
            Some(t) => endpoint.connect_timeout(t),
            None => endpoint,
        };
        let endpoint = endpoint
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(3))
            .keep_alive_while_idle(true)
            .initial_stream_window_size(Some(4 * 1024 * 1024))
            .initial_connection_window_size(Some(16 * 1024 * 1024));
        (self.make)(endpoint, expect)
    }
}

/// [`dial`], then, with TLS and an `expect`ed node, the check that the peer's certificate
/// names that node.
async fn dial_node(
    uri: Uri,
    local_ip: Option<IpAddr>,
    timeout: Duration,
    tls: Option<TlsSource>,
    expect: Option<String>,
) -> Result<TokioIo<Box<dyn Io>>, NotConnected> {
    match (&tls, expect) {
        (Some(_), Some(node)) => {
            let address = format!(
                "{}:{}",
                uri.host().unwrap_or_default(),
                uri.port_u16().unwrap_or(80)
            );
            let (io, presented) = dial_tls(uri, local_ip, timeout, tls).await?;
            match presented.as_deref() {
                Some(crate::auth::CertIdentity::Node(id)) if *id == node || id == "*" => Ok(io),
                other => Err(NotConnected {
                    address,
                    source: std::io::Error::other(format!(
                        "the certificate presented there is not node {node}'s ({other:?})"
                    )),
                }),
            }
        }
        _ => dial(uri, local_ip, timeout, tls).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_peer_must_present_the_certificate_of_the_node_it_is_dialled_as() {
        let dir = tempfile::tempdir().unwrap();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let pki = crate::tls::write_dev_pki(dir.path(), &[("n1".into(), ip)]).unwrap();
        let tls = crate::tls::NodeTls::load(&crate::config::TlsConfig {
            cert: pki.node_cert("n1"),
            key: pki.node_key("n1"),
            ca: pki.ca.clone(),
            ..Default::default()
        })
        .unwrap();
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let uri: Uri = format!("http://{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut s) = acceptor.accept(tcp).await {
                        let _ = tokio::io::AsyncReadExt::read(&mut s, &mut [0u8; 1]).await;
                    }
                });
            }
        });
        let client = tls.clone();
        let source: TlsSource = Arc::new(move || client.client_config());
        let timeout = Duration::from_secs(5);
        let dial = |expect: Option<&str>| {
            dial_node(
                uri.clone(),
                None,
                timeout,
                Some(source.clone()),
                expect.map(str::to_string),
            )
        };
        assert!(dial(Some("n1")).await.is_ok());
        assert!(
            dial(None).await.is_ok(),
            "an address-only dial checks no id"
        );
        let err = dial(Some("n2"))
            .await
            .err()
            .expect("n1's certificate is not n2's");
        assert!(err.to_string().contains("not node n2's"), "{err}");
    }
}
