//! Keys and a writer through the nodes' KV API (quorum reads and writes), and the check that
//! every acknowledged write is still there.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dynakv_node::proto::kv_client::KvClient;
use dynakv_node::proto::{Consistency, ConsistencyLevel, GetRequest, PutRequest, Quorum, quorum};
use tonic::transport::Channel;

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

async fn client(addr: &str) -> Option<KvClient<Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .ok()?;
    Some(KvClient::new(channel))
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

async fn put(endpoints: &[String], turn: usize, key: &str, value: &str) -> bool {
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
    endpoints: &[String],
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
    pub fn start(endpoints: Vec<String>, prefix: String, size: usize, pause: Duration) -> Writer {
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
pub fn lost(endpoints: &[String], expected: &BTreeMap<String, String>) -> Vec<String> {
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
