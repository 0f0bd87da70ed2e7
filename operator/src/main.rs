//! `dynakv-operator`: reconciles `KVCluster` resources into StatefulSets of DynaKV nodes.
//!
//! The controller is not built yet (see the operator issue); this binary only says so, so that
//! nobody mistakes it for a working operator.

fn main() -> std::process::ExitCode {
    eprintln!("dynakv-operator: the KVCluster controller is not implemented in this version");
    std::process::ExitCode::from(2)
}
