//! Keys and a writer through the nodes' KV API (quorum reads and writes), and the check that
//! every acknowledged write is still there.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dynakv_node::proto::kv_client::KvClient;
use dynakv_node::proto::{Consistency, ConsistencyLevel, GetRequest, PutRequest, Quorum, quorum};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint as GrpcEndpoint};

/// A node as a client reaches it: the address to dial and, with TLS, the name its certificate
/// must carry (the pod's DNS name: the test has no DNS of its own) with the CA and a token.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub addr: String,
    pub tls: Option<Arc<ClientTls>>,
}

impl Endpoint {
    pub fn plain(addr: impl Into<String>) -> Self {
        Endpoint {
            addr: addr.into(),
            tls: None,
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.tls {
            Some(t) => write!(f, "{} ({}, TLS)", self.addr, t.server_name),
            None => write!(f, "{}", self.addr),
        }
    }
}

/// How to reach a TLS node.
pub struct ClientTls {
    pub server_name: String,
    pub config: Arc<rustls::ClientConfig>,
    /// A bearer token; `None`: only the client certificate in `config`, if any.
    pub token: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientTls({})", self.server_name)
    }
}

/// A gRPC channel to `addr`: plain, or TLS checking `tls.server_name`.
pub async fn channel(addr: &str, tls: Option<&ClientTls>, timeout: Duration) -> Option<Channel> {
    let endpoint = GrpcEndpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(timeout)
        .timeout(Duration::from_secs(5));
    let Some(tls) = tls else {
        return endpoint.connect().await.ok();
    };
    let name = rustls_pki_types::ServerName::try_from(tls.server_name.clone()).ok()?;
    let config = tls.config.clone();
    let addr = addr.to_string();
    endpoint
        .connect_with_connector(tower::service_fn(move |_: tonic::codegen::http::Uri| {
            let (addr, name, config) = (addr.clone(), name.clone(), config.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(&addr).await?;
                let stream = tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .ok()
}

/// Adds the bearer token to every request.
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    }
}

pub type Kv = KvClient<InterceptedService<Channel, Bearer>>;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn consistency() -> Option<Consistency> {
    let q = Some(Quorum {
        value: Some(quorum::Value::Level(ConsistencyLevel::Quorum as i32)),
    });
    Some(Consistency {
        r: q,
        w: q,
        sloppy: None,
        timeout_ms: 3000,
    })
}

pub async fn client(e: &Endpoint) -> Option<Kv> {
    let tls = e.tls.as_deref();
    let channel = channel(&e.addr, tls, Duration::from_secs(1)).await?;
    let token = tls
        .and_then(|t| t.token.as_ref())
        .and_then(|t| format!("Bearer {t}").parse().ok());
    Some(KvClient::with_interceptor(channel, Bearer(token)))
}

/// A value of about `size` bytes that names its key's write.
pub fn value(key: &str, size: usize) -> String {
    let mut v = format!("{key}=");
    while v.len() < size {
        v.push_str("0123456789abcdef");
    }
    v.truncate(size.max(key.len() + 1));
    v
}

async fn put(endpoints: &[Endpoint], turn: usize, key: &str, value: &str) -> bool {
    let addr = &endpoints[turn % endpoints.len()];
    let Some(mut c) = client(addr).await else {
        return false;
    };
    c.put(PutRequest {
        key: key.as_bytes().to_vec().into(),
        value: value.as_bytes().to_vec().into(),
        context: Default::default(),
        consistency: consistency(),
    })
    .await
    .is_ok()
}

/// Writes `count` keys `<prefix><i>`, each retried until acknowledged; returns them.
pub fn load(
    endpoints: &[Endpoint],
    prefix: &str,
    count: usize,
    size: usize,
) -> BTreeMap<String, String> {
    runtime().block_on(async {
        let mut acked = BTreeMap::new();
        for i in 0..count {
            let key = format!("{prefix}{i:05}");
            let v = value(&key, size);
            let mut tries = 0;
            while !put(endpoints, i + tries, &key, &v).await {
                tries += 1;
                assert!(
                    tries < 20,
                    "{key}: no write acknowledged after {tries} tries"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            acked.insert(key, v);
        }
        acked
    })
}

/// What a writer did.
#[derive(Debug, Default)]
pub struct WriterReport {
    /// Acknowledged writes, key -> value.
    pub acked: BTreeMap<String, String>,
    /// Writes that failed or timed out (their outcome is unknown; not checked).
    pub failed: u64,
}

/// Writes new keys one after another until stopped.
pub struct Writer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<WriterReport>>,
}

impl Writer {
    pub fn start(endpoints: Vec<Endpoint>, prefix: String, size: usize, pause: Duration) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            runtime().block_on(async {
                let mut report = WriterReport::default();
                let mut i = 0usize;
                while !s.load(Ordering::Relaxed) {
                    let key = format!("{prefix}{i:06}");
                    let v = value(&key, size);
                    if put(&endpoints, i, &key, &v).await {
                        report.acked.insert(key, v);
                    } else {
                        report.failed += 1;
                    }
                    i += 1;
                    tokio::time::sleep(pause).await;
                }
                report
            })
        });
        Writer {
            stop,
            thread: Some(thread),
        }
    }

    pub fn finish(mut self) -> WriterReport {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("joined once")
            .join()
            .expect("the writer thread")
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Keys whose quorum read does not return exactly the acknowledged value (each read is retried
/// a few times while it fails outright), with what was read.
pub fn lost(endpoints: &[Endpoint], expected: &BTreeMap<String, String>) -> Vec<String> {
    runtime().block_on(async {
        let mut clients = Vec::new();
        for e in endpoints {
            clients.push(
                client(e)
                    .await
                    .unwrap_or_else(|| panic!("cannot connect to {e}")),
            );
        }
        let mut bad = Vec::new();
        for (n, (key, want)) in expected.iter().enumerate() {
            let mut got = None;
            for attempt in 0..5 {
                let c = &mut clients[(n + attempt) % endpoints.len()];
                match c
                    .get(GetRequest {
                        key: key.as_bytes().to_vec().into(),
                        consistency: consistency(),
                    })
                    .await
                {
                    Ok(r) => {
                        got = Some(
                            r.into_inner()
                                .values
                                .iter()
                                .map(|s| String::from_utf8_lossy(&s.value).into_owned())
                                .collect::<Vec<_>>(),
                        );
                        break;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
            match got {
                Some(values) if values.len() == 1 && &values[0] == want => {}
                Some(values) => bad.push(format!(
                    "{key}: read {} values {:?}",
                    values.len(),
                    values
                        .iter()
                        .map(|v| &v[..v.len().min(24)])
                        .collect::<Vec<_>>()
                )),
                None => bad.push(format!("{key}: every read failed")),
            }
        }
        bad
    })
}
