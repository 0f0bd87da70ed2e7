//! The operator's HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (the process runs),
//! `/readyz` (it can reach the API server and, when it leads, its controller runs).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// What the endpoints report; shared with the controller and the leader election.
#[derive(Default)]
pub struct Health {
    ready: AtomicBool,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

/// Answers one request (no I/O: testable without a socket).
pub fn respond(path: &str, metrics: &Metrics, health: &Health) -> (StatusCode, String) {
    match path {
        "/metrics" => (StatusCode::OK, metrics.render()),
        "/healthz" => (StatusCode::OK, "ok\n".into()),
        "/readyz" if health.is_ready() => (StatusCode::OK, "ok\n".into()),
        "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into()),
        _ => (StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => return,
            a = listener.accept() => a,
        };
        let Ok((stream, _)) = accepted else { continue };
        let metrics = metrics.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (status, body) = respond(req.uri().path(), &metrics, &health);
                let mut resp = Response::new(Full::new(Bytes::from(body)));
                *resp.status_mut() = status;
                if req.uri().path() == "/metrics" {
                    resp.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static(
                            "text/plain; version=0.0.4; charset=utf-8",
                        ),
                    );
                }
                async move { Ok::<_, Infallible>(resp) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readyz_follows_readiness_and_healthz_always_answers() {
        let m = Metrics::new().unwrap();
        let h = Health::default();
        assert_eq!(respond("/healthz", &m, &h).0, StatusCode::OK);
        assert_eq!(
            respond("/readyz", &m, &h).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        h.set_ready(true);
        assert_eq!(respond("/readyz", &m, &h).0, StatusCode::OK);
        assert_eq!(respond("/nope", &m, &h).0, StatusCode::NOT_FOUND);
        assert!(
            respond("/metrics", &m, &h)
                .1
                .contains("dynakv_operator_leader")
        );
    }

    #[tokio::test]
    async fn serves_over_tcp() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            Arc::new(Metrics::new().unwrap()),
            Arc::new(Health::default()),
            async {
                let _ = rx.await;
            },
        ));
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        let _ = tx.send(());
        server.await.unwrap();
    }
}
