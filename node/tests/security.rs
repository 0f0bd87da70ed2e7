//! TLS and authentication, from outside: a `dynakv dev` cluster (TLS and credentials on by
//! default) with a read token and a write token, driven by the CLI and by raw gRPC clients.

mod common;

use std::io::Read;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use dynakv_node::cli::client::Credentials;
use dynakv_node::proto::gossip_client::GossipClient;
use dynakv_node::proto::kv_client::KvClient;

/// A running `dynakv dev`; dropping it stops it (its nodes die with it).
struct Dev {
    child: Child,
    out: PathBuf,
}

impl Dev {
    fn start(data: &Path, ip: Ipv4Addr, port: u16, metrics_port: u16, extra: &[String]) -> Dev {
        let out = data.with_extension("out");
        let child = Command::new(DYNAKV)
            .arg("dev")
            .args(["--data-dir", data.to_str().unwrap()])
            .args(["--base-ip", &ip.to_string()])
            .args(["--port", &port.to_string()])
            .args(["--metrics-port", &metrics_port.to_string()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let dev = Dev { child, out };
        wait_until("dynakv dev is ready", Duration::from_secs(60), || {
            let mut text = String::new();
            std::fs::File::open(&dev.out)
                .ok()?
                .read_to_string(&mut text)
                .ok()?;
            text.contains("ready:").then_some(())
        });
        dev
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        signal(self.child.id(), libc::SIGTERM);
        if wait_child(&mut self.child, Duration::from_secs(30)).is_none() {
            let _ = self.child.kill();
        }
    }
}

fn token(role: &str) -> (String, String) {
    let out = cli(&["token", "--name", &format!("{role}-app"), "--role", role]).ok();
    // The prefix keeps a token from starting with '-' (the CLI would read it as a flag).
    assert!(out.json["token"].as_str().unwrap().starts_with("dkv_"));
    (
        out.json["token"].as_str().unwrap().to_string(),
        out.json["sha256"].as_str().unwrap().to_string(),
    )
}

#[test]
fn tls_and_roles_refuse_what_they_must_and_allow_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("dev");
    let ips = random_loopback_block(3);
    let (port, metrics_port) = free_port_pair_on_all(&ips);
    let (read_token, read_digest) = token("read");
    let (write_token, write_digest) = token("write");
    let tokens = format!(
        r#"auth.tokens=[{{"name":"reader","role":"read","sha256":"{read_digest}"}},{{"name":"writer","role":"write","sha256":"{write_digest}"}}]"#
    );
    let _dev = Dev::start(&data, ips[0], port, metrics_port, &["--set".into(), tokens]);
    let ep = format!("{}:{port}", ips[0]);
    let ca = data.join("tls/ca.pem");
    let ca = ca.to_str().unwrap();

    // The CLI on this machine finds the dev cluster's CA and admin certificate on its own.
    cli(&["put", "k", "v1", "-e", &ep]).ok();
    assert_eq!(cli(&["get", "k", "-e", &ep]).ok().texts(), ["v1"]);
    cli(&["cluster", "status", "-e", &ep]).ok();

    // Plain text is refused.
    let plain = cli(&["get", "k", "-e", &ep, "--plaintext"]);
    assert_eq!(plain.code, 4, "{plain:#?}");
    assert!(plain.error_message().contains("--ca"), "{plain:#?}");

    // A CA that did not sign the nodes: the client does not trust them.
    let other = tmp.path().join("other-ca");
    dynakv(&[
        "cert",
        "--dir",
        other.to_str().unwrap(),
        "--node",
        "x",
        "--ip",
        "127.0.0.1",
    ])
    .ok();
    let stranger = cli(&[
        "get",
        "k",
        "-e",
        &ep,
        "--ca",
        other.join("ca.pem").to_str().unwrap(),
    ]);
    assert_eq!(stranger.code, 4, "{stranger:#?}");
    assert!(
        stranger.error_message().contains("certificate"),
        "{stranger:#?}"
    );
    // A client certificate from another CA: the node refuses the handshake.
    let impostor = cli(&[
        "get",
        "k",
        "-e",
        &ep,
        "--ca",
        ca,
        "--cert",
        other.join("client.pem").to_str().unwrap(),
        "--key",
        other.join("client-key.pem").to_str().unwrap(),
    ]);
    assert_eq!(impostor.code, 4, "{impostor:#?}");

    // TLS without credentials: UNAUTHENTICATED, saying what is missing.
    let anonymous = cli(&["get", "k", "-e", &ep, "--ca", ca]);
    assert_eq!(anonymous.error_code(), "UNAUTHENTICATED", "{anonymous:#?}");
    assert_eq!(anonymous.code, 7);
    assert!(anonymous.error_message().contains("read role"));
    let unknown = cli(&["get", "k", "-e", &ep, "--ca", ca, "--token", "not-a-token"]);
    assert_eq!(unknown.error_code(), "UNAUTHENTICATED", "{unknown:#?}");

    // A read token reads and cannot write or administer.
    let read = ["-e", &ep, "--token", &read_token];
    let got = cli(&[&["get", "k"][..], &read].concat()).ok();
    assert_eq!(got.texts(), ["v1"]);
    let denied = cli(&[&["put", "k", "v2"][..], &read].concat());
    assert_eq!(denied.error_code(), "PERMISSION_DENIED", "{denied:#?}");
    assert!(denied.error_message().contains("needs the write role"));
    let denied = cli(&[&["delete", "k"][..], &read].concat());
    assert_eq!(denied.error_code(), "PERMISSION_DENIED", "{denied:#?}");
    let denied = cli(&[&["cluster", "status"][..], &read].concat());
    assert_eq!(denied.error_code(), "PERMISSION_DENIED", "{denied:#?}");
    // ... and the refused write changed nothing.
    assert_eq!(cli(&["get", "k", "-e", &ep]).ok().texts(), ["v1"]);

    // A write token writes, and still cannot administer.
    let write = ["-e", &ep, "--token", &write_token];
    cli(&[&["put", "k", "v2", "-c", &got.context()][..], &write].concat()).ok();
    assert_eq!(cli(&["get", "k", "-e", &ep]).ok().texts(), ["v2"]);
    let denied = cli(&[&["cluster", "weight", "n1", "50"][..], &write].concat());
    assert_eq!(denied.error_code(), "PERMISSION_DENIED", "{denied:#?}");

    // Raw gRPC: the peer services are for node certificates only, even for an admin client.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let admin = Credentials::from_files(
            Some(Path::new(ca)),
            Some((
                &data.join("tls/client.pem"),
                &data.join("tls/client-key.pem"),
            )),
            None,
        )
        .unwrap();
        let conn = admin
            .connect(admin.endpoint(&ep).unwrap(), Duration::from_secs(5))
            .await
            .unwrap();
        let members = GossipClient::new(conn.clone())
            .members(dynakv_node::proto::GossipMembersRequest::default())
            .await
            .unwrap_err();
        assert_eq!(members.code(), tonic::Code::PermissionDenied, "{members:?}");
        assert!(members.message().contains("cluster nodes only"));
        // The admin client may read through the same connection.
        KvClient::new(conn.clone())
            .get(dynakv_node::proto::GetRequest {
                key: bytes::Bytes::from_static(b"k"),
                ..Default::default()
            })
            .await
            .unwrap();
        // A client (not a node) that marks its put forwarded cannot give it a write id, which
        // decides what values hide: the id is ignored (the context the put returns is of
        // version 1, which carries none).
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let mut put = tonic::Request::new(dynakv_node::proto::PutRequest {
            key: bytes::Bytes::from_static(b"wid"),
            value: bytes::Bytes::from_static(b"v"),
            ..Default::default()
        });
        put.metadata_mut()
            .insert("x-dynakv-forwarded", "1".parse().unwrap());
        put.metadata_mut().insert(
            "x-dynakv-write-id",
            format!("{:032x}-{:016x}", 7u128, now_ms << 16)
                .parse()
                .unwrap(),
        );
        let put = KvClient::new(conn).put(put).await.unwrap().into_inner();
        assert_eq!(put.context[0], 1, "a client's write id was taken");

        // A plain-text client does not get a gRPC answer at all.
        let plain = Credentials::default();
        let refused = match plain
            .connect(plain.endpoint(&ep).unwrap(), Duration::from_secs(5))
            .await
        {
            Err(_) => true,
            Ok(conn) => KvClient::new(conn)
                .get(dynakv_node::proto::GetRequest {
                    key: bytes::Bytes::from_static(b"k"),
                    ..Default::default()
                })
                .await
                .is_err(),
        };
        assert!(refused, "a plain-text request was answered");
    });

    // Refusals are counted by outcome.
    let (code, metrics) = http_get(
        format!("{}:{metrics_port}", ips[0]).parse().unwrap(),
        "/metrics",
    )
    .unwrap();
    assert_eq!(code, 200);
    for outcome in ["ok", "unauthenticated", "permission_denied"] {
        let label = format!("outcome=\"{outcome}\"");
        let n = metric_value(&metrics, "dynakv_auth_requests_total", &[&label]).unwrap_or(0.0);
        assert!(
            n >= 1.0,
            "no {outcome} in dynakv_auth_requests_total:\n{metrics}"
        );
    }
}

#[test]
fn dev_insecure_serves_plain_text_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("dev");
    let ips = random_loopback_block(1);
    let (port, metrics_port) = free_port_pair_on_all(&ips);
    let dev = Dev::start(
        &data,
        ips[0],
        port,
        metrics_port,
        &[
            "--nodes".into(),
            "1".into(),
            "-n".into(),
            "1".into(),
            "--insecure".into(),
        ],
    );
    let ep = format!("{}:{port}", ips[0]);
    cli(&["put", "k", "v", "-e", &ep]).ok();
    assert!(!data.join("tls").exists());
    let log = std::fs::read_to_string(data.join("n1/node.log")).unwrap();
    assert!(log.contains("TLS is off"), "{log}");
    drop(dev);
}
