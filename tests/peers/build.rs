//! Compiles the etcd v3 KV subset in proto/etcd with protox (pure Rust, no system `protoc`), as
//! node/build.rs does for DynaKV's own protos.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("proto");
    let file = root.join("etcd/kv.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let fds = protox::compile([&file], [&root])?;
    tonic_prost_build::configure()
        .build_server(false)
        .bytes(".etcdserverpb")
        .compile_fds(fds)?;
    Ok(())
}
