//! The YAML shipped beside the operator: the CRD in `crds/` (and the chart's copy) is what the
//! code generates, and every manifest in `deploy/` parses into the typed objects it claims to be.

use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn crds_dir_holds_the_crd_the_code_generates() {
    let generated = dynakv_operator::crd_yaml().unwrap();
    for path in [
        "crds/kvcluster.yaml",
        "helm/dynakv-operator/crds/kvcluster.yaml",
    ] {
        let on_disk = std::fs::read_to_string(repo().join(path)).unwrap_or_default();
        assert!(
            on_disk == generated,
            "{path} is stale: regenerate it with \
             `cargo run -p dynakv-operator -- crd > {path}`"
        );
    }
}
