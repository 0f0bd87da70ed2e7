//! `dynakv-operator`: reconciles `KVCluster` resources into running, scalable DynaKV clusters.
//!
//! The shape is controller-rs grown up: pure builders and pure decisions, a thin reconcile.
//!
//! - [`crd`]: the `KVCluster` resource (spec, status, conditions) and its schema.
//! - [`resources`]: pure builders, KVCluster -> ConfigMap, Services, StatefulSet, PDB,
//!   ServiceMonitor.
//! - [`decisions`]: pure, observed state -> the next step and the reason for it.
//! - [`status`]: pure, observed state and the step taken -> the status written back.
//! - [`pki`]: the CA, node certificate and admin token of clusters that name no certificate
//!   source (a shell: randomness), with the pure renewal rule.
//! - [`admin`]: the seam to the nodes' Admin gRPC service (DNS names on Kubernetes, a map of
//!   local addresses in tests).
//! - [`controller`]: gathers the observed state, calls the decisions, applies the result.
//! - [`leader`]: Lease-based leader election, so that only one replica reconciles.
//! - [`metrics`], [`http`]: the operator's own Prometheus metrics, `/healthz`, `/readyz`.

pub mod admin;
pub mod controller;
pub mod crd;
pub mod decisions;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod pki;
pub mod resources;
pub mod status;

#[cfg(test)]
pub mod fixtures;

/// Client of the node's Admin service, generated from `proto/dynakv/v1/admin.proto`.
pub mod proto {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("dynakv.v1");
}

/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "dynakv-operator";

/// The CRD as YAML, exactly as `dynakv-operator crd` prints it and `crds/` holds it.
pub fn crd_yaml() -> Result<String, serde_saphyr::SerializeError> {
    use kube::CustomResourceExt;
    serde_saphyr::to_string(&crd::KVCluster::crd())
}
