//! Generated protobuf and gRPC code for `dynakv.v1` (see proto/dynakv/v1).

#![allow(clippy::all, clippy::pedantic, missing_docs)]

tonic::include_proto!("dynakv.v1");

/// Encoded file descriptor set of the dynakv.v1 protos, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("dynakv_descriptor");
