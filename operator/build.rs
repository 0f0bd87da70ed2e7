//! Compiles the Admin and health protos into a gRPC client with protox (a pure-Rust protobuf
//! compiler), as `node/build.rs` does, so building needs no system `protoc`. Only the client side
//! is generated: the operator never serves these services.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let files = ["admin.proto"].map(|f| proto_root.join("dynakv/v1").join(f));
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&proto_root])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}
