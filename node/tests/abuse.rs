//! Limits under abuse: one node of a 3-node cluster is flooded with connections that send
//! nothing, garbage, a trickle of bytes, oversized and malformed requests, while a well-behaved
//! client keeps writing through new connections (the CLI) and an old one. The bound: every one
//! of its writes succeeds within its request deadline (the node's 5 s), and the node serves on.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use dynakv_node::cli::client::Credentials;
use dynakv_node::proto::kv_client::KvClient;
use dynakv_node::proto::{PutRequest, PutResponse};

/// A message the Put method cannot decode: field 1 (the key, bytes) as a varint.
#[derive(Clone, PartialEq, prost::Message)]
struct Malformed {
    #[prost(uint64, tag = "1")]
    key: u64,
}

/// Runs `attack` on its own thread until `stop`; counts its rounds.
fn attacker(
    stop: &Arc<AtomicBool>,
    rounds: &Arc<AtomicU64>,
    attack: impl Fn() + Send + 'static,
) -> std::thread::JoinHandle<()> {
    let stop = stop.clone();
    let rounds = rounds.clone();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            attack();
            rounds.fetch_add(1, Ordering::Relaxed);
        }
    })
}

fn connect(target: SocketAddr) -> Option<TcpStream> {
    let s = TcpStream::connect_timeout(&target, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(3))).ok()?;
    Some(s)
}

#[test]
fn a_flood_of_bad_connections_and_requests_does_not_stop_a_well_behaved_writer() {
    let cluster = ClusterSpec::new(3)
        .config_yaml("limits:\n  max_handshakes: 64\n  handshake_timeout_ms: 1000\n")
        .start();
    let target = cluster.nodes[0].addr;
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();

    // Connections that send nothing, 200 at a time (more than max_handshakes), held open.
    for _ in 0..2 {
        threads.push(attacker(&stop, &rounds, move || {
            // About one a millisecond per thread: the flood keeps more silent connections than
            // handshake slots (the oldest are evicted), and a real client's handshake must be
            // done before 64 newer connections arrive (tens of milliseconds). A burst of 100 at
            // once evicted a CLI write's connection on a loaded machine.
            let held: Vec<TcpStream> = (0..100)
                .filter_map(|_| {
                    std::thread::sleep(Duration::from_millis(1));
                    connect(target)
                })
                .collect();
            std::thread::sleep(Duration::from_millis(500));
            drop(held);
        }));
    }
    // Garbage and HTTP/1, then read until the node closes.
    threads.push(attacker(&stop, &rounds, move || {
        if let Some(mut s) = connect(target) {
            let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\xff garbage \x16\x03\x01");
            let _ = s.read(&mut [0u8; 1024]);
        }
    }));
    // A trickle: the preface one byte at a time, slower than the handshake timeout allows.
    threads.push(attacker(&stop, &rounds, move || {
        if let Some(mut s) = connect(target) {
            for b in b"PRI * HTTP/2.0\r\n" {
                if s.write_all(&[*b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }));
    // Oversized values and messages, and malformed requests, over gRPC.
    threads.push(attacker(&stop, &rounds, move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let plain = Credentials::default();
            let Ok(conn) = plain
                .connect(
                    plain.endpoint(&target.to_string()).unwrap(),
                    Duration::from_secs(2),
                )
                .await
            else {
                return;
            };
            let mut kv = KvClient::new(conn.clone());
            for size in [2 << 20, 8 << 20] {
                let r = kv
                    .put(PutRequest {
                        key: bytes::Bytes::from_static(b"big"),
                        value: vec![0u8; size].into(),
                        ..Default::default()
                    })
                    .await;
                assert!(r.is_err(), "an oversized put was accepted");
            }
            let mut grpc = tonic::client::Grpc::new(conn);
            if grpc.ready().await.is_ok() {
                let r: Result<tonic::Response<PutResponse>, _> = grpc
                    .unary(
                        tonic::Request::new(Malformed { key: 7 }),
                        "/dynakv.v1.KV/Put".parse().unwrap(),
                        tonic_prost::ProstCodec::default(),
                    )
                    .await;
                assert!(r.is_err(), "a malformed put was accepted");
            }
        });
    }));

    // The well-behaved writer: a new connection for every write (the CLI), and all must succeed.
    let mut written = Vec::new();
    for i in 0..60 {
        let key = format!("good-{i}");
        let out = cluster.cli_at(0, &["put", &key, "v", "-w", "2"]);
        assert_eq!(
            out.code,
            0,
            "write {i} failed under the flood: {out:#?}\n{}",
            cluster.log_tail(0, 20)
        );
        written.push(key);
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("an attacker thread panicked");
    }
    assert!(rounds.load(Ordering::Relaxed) > 0);

    // Everything written is there.
    for key in &written {
        assert_eq!(
            cluster.cli_at(0, &["get", key]).ok().texts(),
            ["v"],
            "{key}"
        );
    }
    // The flood had more silent connections at once than handshake slots: the oldest made room.
    let refused = |reason: &str| {
        let label = format!("reason=\"{reason}\"");
        metric_value(
            &cluster.metrics(0),
            "dynakv_connections_refused_total",
            &[&label],
        )
        .unwrap_or(0.0)
    };
    assert!(refused("handshakes") >= 1.0, "{}", cluster.metrics(0));
    // Once it is over (no newer connection evicts them), a connection that sends nothing is
    // closed at the handshake timeout, and one that sends something else at once.
    // At least the preface's 24 bytes of something else, so they are read and found wrong
    // (fewer would wait for the rest).
    for (sends, reason) in [
        (&b""[..], "timeout"),
        (&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], "preface"),
    ] {
        let before = refused(reason);
        let mut conn = connect(target).expect("connect after the flood");
        conn.write_all(sends).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        assert_eq!(
            conn.read(&mut [0u8; 16]).unwrap_or(0),
            0,
            "{reason}: closed"
        );
        wait_until(
            &format!("a {reason} refusal counted"),
            Duration::from_secs(10),
            || (refused(reason) > before).then_some(()),
        );
    }
}
