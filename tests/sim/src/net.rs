//! The simulator's TCP under tonic: the accepted-connection stream a node's `server::run` serves,
//! the connector its peer channels (and the simulated clients) dial with, and the wall clock.
//!
//! Everything goes through tonic's real transport (`Endpoint`, its timeouts, HTTP/2 keep-alive,
//! the tower buffer); only the byte pipe underneath is turmoil's.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use dynakv_node::net::{Connector, NotConnected};
use dynakv_node::node::WallClock;
use futures::Stream;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint, Uri};

/// The port every simulated node listens on.
pub const NODE_PORT: u16 = 7100;

/// Unix time (ms) at which every simulation starts: wall clocks are this plus simulated time.
pub const EPOCH_MS: u64 = 1_700_000_000_000;

/// A simulated TCP connection, as tonic's server and client want it.
pub struct SimStream(pub turmoil::net::TcpStream);

impl Connected for SimStream {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for SimStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for SimStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The stream of accepted connections of a simulated listener, for `server::run`.
pub fn incoming(
    listener: turmoil::net::TcpListener,
) -> impl Stream<Item = io::Result<SimStream>> + Send + 'static {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(s, _)| SimStream(s));
        Some((accepted, listener))
    })
}

/// Dials `uri` (`http://host:port`) over the simulated network. A failed attempt is the node's
/// [`NotConnected`], as on real TCP.
async fn dial(uri: Uri) -> Result<TokioIo<SimStream>, NotConnected> {
    let host = uri.host().unwrap_or_default().to_string();
    let port = uri.port_u16().unwrap_or(80);
    match turmoil::net::TcpStream::connect((host.as_str(), port)).await {
        Ok(stream) => Ok(TokioIo::new(SimStream(stream))),
        Err(source) => Err(NotConnected {
            address: format!("{host}:{port}"),
            source,
        }),
    }
}

/// A lazily connecting channel over the simulated network, from a configured endpoint.
pub fn channel(endpoint: Endpoint) -> Channel {
    endpoint.connect_with_connector_lazy(tower::service_fn(dial))
}

/// The node's network seam in the simulation.
pub fn connector(connect_timeout: Duration) -> Connector {
    Connector::custom(connect_timeout, channel)
}

/// A client channel to `node` with the settings a careful client uses: connect timeout and
/// HTTP/2 keep-alive, so that a connection whose segments a partition dropped is noticed and
/// replaced (turmoil's TCP has no retransmission).
pub fn client_channel(node: &str) -> Channel {
    let endpoint = Endpoint::from_shared(format!("http://{node}:{NODE_PORT}"))
        .unwrap_or_else(|_| Endpoint::from_static("http://0.0.0.0:1"))
        .connect_timeout(Duration::from_millis(500))
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(2))
        .keep_alive_while_idle(true);
    channel(endpoint)
}

/// Milliseconds since the Unix epoch in simulated time (the host's own timer).
pub fn sim_now_ms() -> u64 {
    EPOCH_MS
        + turmoil::sim_elapsed()
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
}

/// The node's wall clock: [`EPOCH_MS`] plus simulated time.
pub fn wall_clock() -> WallClock {
    Arc::new(sim_now_ms)
}
