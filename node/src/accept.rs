//! The accept path: what a connection must do before the gRPC server sees it.
//!
//! Each accepted connection takes one of `max_connections` slots for its whole life (one more is
//! closed at once), and one of `max_handshakes` slots until it proves it speaks the protocol
//! (when they are all taken, the oldest handshake is dropped to make room):
//! with TLS, a finished handshake (the client's certificate identity goes into the connection's
//! [`ConnInfo`]); in plain text, the HTTP/2 client preface. Both run in a task per connection
//! within `handshake_timeout`, so a client that connects and sends nothing, or something else,
//! holds nothing for long and never holds up other connections. Refusals are counted in
//! `dynakv_connections_refused_total{reason}`.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use prometheus::{IntCounterVec, IntGauge};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::Connected;

use crate::tls::{ConnInfo, NodeTls};

/// What every HTTP/2 client sends first (RFC 9113, section 3.4).
pub const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Limits of the accept path.
#[derive(Debug, Clone, Copy)]
pub struct AcceptLimits {
    pub max_connections: usize,
    pub max_handshakes: usize,
    pub handshake_timeout: Duration,
}

/// The accept path's metrics.
#[derive(Clone)]
pub struct AcceptMetrics {
    /// By reason: `limit` (max_connections), `handshakes` (the oldest handshake dropped for a
    /// newer connection past max_handshakes), `timeout`,
    /// `tls` (a failed handshake), `preface` (plain text that is not HTTP/2).
    pub refused: IntCounterVec,
    /// Connections open now.
    pub open: IntGauge,
}

/// A served connection: its bytes, what the handshake said about the client, and its slot.
pub struct ServerConn<IO> {
    io: ConnIo<IO>,
    info: ConnInfo,
    _slot: Slot,
}

enum ConnIo<IO> {
    /// Plain text, with the preface read during acceptance played back first.
    Plain(Replay<IO>),
    /// TLS, likewise.
    Tls(Replay<Box<tokio_rustls::server::TlsStream<IO>>>),
}

/// A connection slot: held for the connection's life, counted in the `open` gauge.
struct Slot {
    _permit: OwnedSemaphorePermit,
    open: IntGauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// A handshake task's state: still handshaking, done, or evicted by a newer connection. The
/// task and the accept loop race to move it away from [`HANDSHAKING`]; whoever wins decides.
const HANDSHAKING: u8 = 0;
const DONE: u8 = 1;
const EVICTED: u8 = 2;

/// `io` with `prefix` read back before it.
struct Replay<IO> {
    prefix: &'static [u8],
    io: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Replay<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix = &this.prefix[n..];
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO> Connected for ServerConn<IO> {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for ServerConn<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            ConnIo::Plain(io) => Pin::new(io).poll_read(cx, buf),
            ConnIo::Tls(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ServerConn<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            ConnIo::Plain(io) => Pin::new(&mut io.io).poll_write(cx, buf),
            ConnIo::Tls(io) => Pin::new(io.io.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            ConnIo::Plain(io) => Pin::new(&mut io.io).poll_write_vectored(cx, bufs),
            ConnIo::Tls(io) => Pin::new(io.io.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            ConnIo::Plain(io) => io.io.is_write_vectored(),
            ConnIo::Tls(io) => io.io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            ConnIo::Plain(io) => Pin::new(&mut io.io).poll_flush(cx),
            ConnIo::Tls(io) => Pin::new(io.io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            ConnIo::Plain(io) => Pin::new(&mut io.io).poll_shutdown(cx),
            ConnIo::Tls(io) => Pin::new(io.io.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The connections a node serves, from the `incoming` accepted ones (see the module docs).
/// Accept errors are passed on (the server logs them and goes on accepting).
pub fn incoming<I, IO, IE>(
    incoming: I,
    tls: Option<Arc<NodeTls>>,
    limits: AcceptLimits,
    metrics: AcceptMetrics,
) -> Pin<Box<dyn Stream<Item = Result<ServerConn<IO>, io::Error>> + Send>>
where
    I: Stream<Item = Result<IO, IE>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let connections = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    tokio::spawn(async move {
        let mut incoming = std::pin::pin!(incoming);
        // Handshakes in progress, oldest first.
        let mut pending: VecDeque<(tokio::task::AbortHandle, Arc<AtomicU8>)> = VecDeque::new();
        loop {
            let accepted = tokio::select! {
                biased;
                accepted = incoming.next() => accepted,
                // The server stopped: stop accepting (and close what is still handshaking).
                _ = tx.closed() => None,
            };
            let Some(accepted) = accepted else {
                for (task, _) in pending {
                    task.abort();
                }
                return;
            };
            let io = match accepted {
                Ok(io) => io,
                Err(e) => {
                    if tx.send(Err(io::Error::other(e))).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            let Ok(connection) = connections.clone().try_acquire_owned() else {
                metrics.refused.with_label_values(&["limit"]).inc();
                tracing::debug!(
                    limit = limits.max_connections,
                    "connection closed: limits.max_connections reached"
                );
                continue;
            };
            // Full: the oldest handshake makes room. A client that connects and sends nothing
            // is evicted by the next connection, while a real client's handshake takes
            // milliseconds, so a flood of silent connections cannot lock real clients out.
            pending.retain(|(_, state)| state.load(Ordering::Acquire) == HANDSHAKING);
            while pending.len() >= limits.max_handshakes.max(1) {
                let Some((task, state)) = pending.pop_front() else {
                    break;
                };
                if state
                    .compare_exchange(HANDSHAKING, EVICTED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    task.abort();
                    metrics.refused.with_label_values(&["handshakes"]).inc();
                }
            }
            metrics.open.inc();
            let slot = Slot {
                _permit: connection,
                open: metrics.open.clone(),
            };
            let tls = tls.as_ref().map(|t| t.server_config());
            let tx = tx.clone();
            let refused = metrics.refused.clone();
            let state = Arc::new(AtomicU8::new(HANDSHAKING));
            let own = state.clone();
            let task = tokio::spawn(async move {
                let accepted =
                    tokio::time::timeout(limits.handshake_timeout, accept(io, tls)).await;
                if own
                    .compare_exchange(HANDSHAKING, DONE, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
                {
                    return; // evicted while it finished
                }
                let (io, info) = match accepted {
                    Ok(Ok(done)) => done,
                    Ok(Err(reason)) => {
                        refused.with_label_values(&[reason]).inc();
                        return;
                    }
                    Err(_) => {
                        refused.with_label_values(&["timeout"]).inc();
                        tracing::debug!("connection closed: no handshake in time");
                        return;
                    }
                };
                let _ = tx
                    .send(Ok(ServerConn {
                        io,
                        info,
                        _slot: slot,
                    }))
                    .await;
            });
            pending.push_back((task.abort_handle(), state));
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// The TLS handshake (with TLS), then the HTTP/2 preface; the refusal reason on failure. The
/// preface is read here under TLS too: a client that finishes its handshake and then sends
/// nothing must not hold a connection slot (hyper waits for the preface without a timer).
async fn accept<IO>(
    io: IO,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Result<(ConnIo<IO>, ConnInfo), &'static str>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    match tls {
        Some(config) => match tokio_rustls::TlsAcceptor::from(config).accept(io).await {
            Ok(stream) => {
                let cert = crate::tls::presented_identity(stream.get_ref().1.peer_certificates());
                let io = preface(Box::new(stream)).await?;
                Ok((ConnIo::Tls(io), ConnInfo { cert }))
            }
            Err(e) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                Err("tls")
            }
        },
        None => Ok((ConnIo::Plain(preface(io).await?), ConnInfo::default())),
    }
}

/// Reads the HTTP/2 client preface and returns `io` with it played back.
async fn preface<IO: AsyncRead + Unpin>(mut io: IO) -> Result<Replay<IO>, &'static str> {
    let mut preface = [0u8; H2_PREFACE.len()];
    match io.read_exact(&mut preface).await {
        Ok(_) if preface == *H2_PREFACE => Ok(Replay {
            prefix: H2_PREFACE,
            io,
        }),
        _ => {
            tracing::debug!("connection closed: not an HTTP/2 client");
            Err("preface")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn metrics() -> AcceptMetrics {
        AcceptMetrics {
            refused: IntCounterVec::new(prometheus::Opts::new("r", "r"), &["reason"]).unwrap(),
            open: IntGauge::new("o", "o").unwrap(),
        }
    }

    /// Polls `f` until it holds (bounded: a stuck accept path fails the test, it does not hang).
    async fn eventually(what: &str, f: impl Fn() -> bool) {
        for _ in 0..1000 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{what} never happened");
    }

    fn limits(connections: usize, handshakes: usize) -> AcceptLimits {
        AcceptLimits {
            max_connections: connections,
            max_handshakes: handshakes,
            handshake_timeout: Duration::from_millis(200),
        }
    }

    type Served = Vec<ServerConn<tokio::io::DuplexStream>>;
    type Conns =
        Pin<Box<dyn Stream<Item = Result<ServerConn<tokio::io::DuplexStream>, io::Error>> + Send>>;

    /// Feeds `clients` (their server ends) through the accept path; returns the connections
    /// served, in order, until `served` of them came out, and the stream (while it lives, the
    /// accept path runs: a server that is gone stops it).
    async fn serve(
        limits: AcceptLimits,
        m: &AcceptMetrics,
        servers: Vec<tokio::io::DuplexStream>,
        served: usize,
    ) -> (Served, Conns) {
        let stream = futures::stream::iter(servers.into_iter().map(Ok::<_, io::Error>))
            .chain(futures::stream::pending());
        let mut conns = incoming(stream, None, limits, m.clone());
        let mut out = Vec::new();
        while out.len() < served {
            out.push(conns.next().await.unwrap().unwrap());
        }
        (out, conns)
    }

    #[tokio::test]
    async fn plain_text_needs_the_http2_preface_in_time() {
        let m = metrics();
        let (mut silent, s1) = tokio::io::duplex(1024);
        let (mut http1, s2) = tokio::io::duplex(1024);
        let (mut good, s3) = tokio::io::duplex(1024);
        http1
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        good.write_all(H2_PREFACE).await.unwrap();
        good.write_all(b"rest").await.unwrap();
        let (mut served, _conns) = serve(limits(8, 8), &m, vec![s1, s2, s3], 1).await;
        // The good one comes out with its preface played back.
        let mut bytes = [0u8; 28];
        served[0].read_exact(&mut bytes).await.unwrap();
        assert_eq!(&bytes[..24], H2_PREFACE);
        assert_eq!(&bytes[24..], b"rest");
        // The silent one times out; the HTTP/1 one is refused.
        eventually("both refusals", || {
            m.refused.with_label_values(&["preface"]).get() == 1
                && m.refused.with_label_values(&["timeout"]).get() == 1
        })
        .await;
        assert_eq!(m.open.get(), 1, "only the served connection holds a slot");
        let mut buf = [0u8; 1];
        assert_eq!(silent.read(&mut buf).await.unwrap(), 0, "closed");
        drop(served);
        assert_eq!(m.open.get(), 0);
    }

    #[tokio::test]
    async fn connections_past_the_limits_are_closed_at_once() {
        let m = metrics();
        let mut clients = Vec::new();
        let mut servers = Vec::new();
        for _ in 0..4 {
            let (c, s) = tokio::io::duplex(1024);
            clients.push(c);
            servers.push(s);
        }
        // Two handshake slots and four silent connections, then a real client: the oldest silent
        // ones make room, and the real one is served.
        let (mut real, s) = tokio::io::duplex(1024);
        real.write_all(H2_PREFACE).await.unwrap();
        servers.push(s);
        let (served, _conns) = serve(limits(8, 2), &m, servers, 1).await;
        assert_eq!(served.len(), 1);
        eventually("three evictions", || {
            m.refused.with_label_values(&["handshakes"]).get() == 3
        })
        .await;
        let mut buf = [0u8; 1];
        assert_eq!(
            clients[0].read(&mut buf).await.unwrap(),
            0,
            "the oldest is closed"
        );
        // Past the connection limit: one served connection fills it, the next is refused.
        let m = metrics();
        let (mut a, sa) = tokio::io::duplex(1024);
        let (mut b, sb) = tokio::io::duplex(1024);
        a.write_all(H2_PREFACE).await.unwrap();
        b.write_all(H2_PREFACE).await.unwrap();
        let (served, _conns) = serve(limits(1, 8), &m, vec![sa, sb], 1).await;
        eventually("a refusal", || {
            m.refused.with_label_values(&["limit"]).get() == 1
        })
        .await;
        assert_eq!(served.len(), 1);
        let mut buf = [0u8; 1];
        assert_eq!(
            b.read(&mut buf).await.unwrap(),
            0,
            "the second one is closed"
        );
    }

    #[tokio::test]
    async fn a_tls_client_silent_after_its_handshake_holds_no_slot() {
        let dir = tempfile::tempdir().unwrap();
        let ip: std::net::IpAddr = "127.0.0.2".parse().unwrap();
        let pki = crate::tls::write_dev_pki(dir.path(), &[("n1".into(), ip)]).unwrap();
        let tls = NodeTls::load(&crate::config::TlsConfig {
            cert: pki.node_cert("n1"),
            key: pki.node_key("n1"),
            ca: pki.ca.clone(),
            ..Default::default()
        })
        .unwrap();
        let m = metrics();
        let (client, server) = tokio::io::duplex(64 * 1024);
        let stream =
            futures::stream::iter([Ok::<_, io::Error>(server)]).chain(futures::stream::pending());
        let _conns = incoming(stream, Some(tls.clone()), limits(8, 8), m.clone());
        // The handshake completes; then the client sends nothing.
        let _held = crate::tls::connect(tls.client_config(), "127.0.0.2", client)
            .await
            .unwrap();
        eventually("the silent client refused", || {
            m.refused.with_label_values(&["timeout"]).get() == 1
        })
        .await;
        assert_eq!(m.open.get(), 0);
    }
}
