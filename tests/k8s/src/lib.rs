//! `dynakv-k8s-tests`: the operator end to end on a real Kubernetes control plane. Test code
//! only, never shipped (`publish = false`); the tests are in `tests/e2e.rs`.
//!
//! - [`testenv`]: finds the tools (fails in CI, skips loudly elsewhere when one is missing) and
//!   runs `scripts/k8s-testenv.sh start/stop` (etcd, kube-apiserver, kube-controller-manager).
//! - [`kubelet`]: a stand-in for kubelet that runs each pod of a KVCluster's StatefulSet as a
//!   real `dynakv serve` process on a loopback address of its own and reports pod status; its
//!   module doc lists what it changes from the pod spec and why.
//! - [`operator`]: `dynakv-operator run` as a process.
//! - [`workload`]: keys, a writer, and the check that nothing acknowledged is lost.
//! - [`util`]: bounded waits, child processes with deadlines, loopback blocks.

pub mod kubelet;
pub mod operator;
pub mod testenv;
pub mod util;
pub mod workload;

use std::path::Path;

/// A kube client for a kubeconfig file.
pub async fn client(kubeconfig: &Path) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)
        .unwrap_or_else(|e| panic!("reading {}: {e}", kubeconfig.display()));
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .expect("a client configuration from the kubeconfig");
    kube::Client::try_from(config).expect("a kube client")
}
