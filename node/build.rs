//! Compiles proto/dynakv/v1/*.proto with protox (a pure-Rust protobuf compiler), so building needs
//! no system `protoc`. The encoded descriptor set is also written to OUT_DIR for server reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let files = ["kv.proto", "replica.proto", "admin.proto", "gossip.proto"]
        .map(|f| proto_root.join("dynakv/v1").join(f));
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&proto_root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("dynakv_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .bytes(".dynakv.v1")
        .compile_fds(fds)?;
    Ok(())
}
