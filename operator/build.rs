//! Compiles the Admin and health protos into a gRPC client with protox (a pure-Rust protobuf
//! compiler), as `node/build.rs` does, so building needs no system `protoc`. The server side is
//! generated too, for the tests that put the real gRPC client against a scripted Admin service.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let files = ["admin.proto"].map(|f| proto_root.join("dynakv/v1").join(f));
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&proto_root])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
