//! The operator's own Prometheus metrics (`dynakv_operator_*`), served on `/metrics`.
//!
//! Labels come from fixed sets only: the outcome of a reconcile is `ok` or the error's
//! [`crate::controller::Error::metric_label`], the step is a [`crate::decisions::ReasonCode`].
//! Never a label built from `Debug` output or an object name, so cardinality stays bounded.

use prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Metrics of the controller.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Reconciles by outcome (`ok` or an error label).
    pub reconciles: IntCounterVec,
    /// Failed reconciles by error label.
    pub errors: IntCounterVec,
    /// Reconcile duration by outcome.
    pub duration: HistogramVec,
    /// Decisions taken, by reason (`Draining`, `RampingWeight`, ...).
    pub decisions: IntCounterVec,
    /// Admin requests sent to nodes, by method and outcome (`ok`, `refused`, `unavailable`).
    pub admin_requests: IntCounterVec,
    /// 1 while this replica holds the leader Lease.
    pub leader: IntGauge,
    /// Per KVCluster (namespace, kvcluster): 1 while a ring change runs.
    pub rebalance_active: IntGaugeVec,
    /// Per KVCluster: bytes moved by the ring change under way (for "stuck" alerts).
    pub rebalance_bytes_done: IntGaugeVec,
    /// Per KVCluster: share of the ring change done (0..1).
    pub rebalance_progress: GaugeVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new(
                "dynakv_operator_reconciles_total",
                "Reconciles of KVClusters, by outcome",
            ),
            &["outcome"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "dynakv_operator_reconcile_errors_total",
                "Reconciles that failed, by error",
            ),
            &["error"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "dynakv_operator_reconcile_duration_seconds",
                "Time one reconcile took, by outcome",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            &["outcome"],
        )?;
        let decisions = IntCounterVec::new(
            Opts::new(
                "dynakv_operator_decisions_total",
                "Steps decided by reconciles, by reason",
            ),
            &["reason"],
        )?;
        let admin_requests = IntCounterVec::new(
            Opts::new(
                "dynakv_operator_admin_requests_total",
                "Admin requests sent to nodes, by method and outcome",
            ),
            &["method", "outcome"],
        )?;
        let leader = IntGauge::new(
            "dynakv_operator_leader",
            "1 while this operator replica holds the leader Lease",
        )?;
        let cluster = &["namespace", "kvcluster"];
        let rebalance_active = IntGaugeVec::new(
            Opts::new(
                "dynakv_operator_rebalance_active",
                "1 while a ring change runs in the KVCluster",
            ),
            cluster,
        )?;
        let rebalance_bytes_done = IntGaugeVec::new(
            Opts::new(
                "dynakv_operator_rebalance_bytes_done",
                "Bytes moved so far by the ring change under way",
            ),
            cluster,
        )?;
        let rebalance_progress = GaugeVec::new(
            Opts::new(
                "dynakv_operator_rebalance_progress_ratio",
                "Share of the ring change under way that is done (0..1)",
            ),
            cluster,
        )?;
        registry.register(Box::new(rebalance_active.clone()))?;
        registry.register(Box::new(rebalance_bytes_done.clone()))?;
        registry.register(Box::new(rebalance_progress.clone()))?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(decisions.clone()))?;
        registry.register(Box::new(admin_requests.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        Ok(Metrics {
            registry,
            reconciles,
            errors,
            duration,
            decisions,
            admin_requests,
            leader,
            rebalance_active,
            rebalance_bytes_done,
            rebalance_progress,
        })
    }

    /// Records the ring change of one cluster (None: settled, or the cluster is gone).
    pub fn rebalance(&self, namespace: &str, name: &str, r: Option<&crate::proto::Rebalance>) {
        let labels = [namespace, name];
        match r {
            Some(r) => {
                self.rebalance_active.with_label_values(&labels).set(1);
                self.rebalance_bytes_done
                    .with_label_values(&labels)
                    .set(i64::try_from(r.bytes_done).unwrap_or(i64::MAX));
                self.rebalance_progress
                    .with_label_values(&labels)
                    .set(crate::status::percent_done(r) as f64 / 100.0);
            }
            None => {
                self.rebalance_active.with_label_values(&labels).set(0);
                self.rebalance_bytes_done.with_label_values(&labels).set(0);
                self.rebalance_progress.with_label_values(&labels).set(0.0);
            }
        }
    }

    /// Drops the series of a deleted cluster.
    pub fn forget(&self, namespace: &str, name: &str) {
        let labels = [namespace, name];
        let _ = self.rebalance_active.remove_label_values(&labels);
        let _ = self.rebalance_bytes_done.remove_label_values(&labels);
        let _ = self.rebalance_progress.remove_label_values(&labels);
    }

    /// Records one finished reconcile.
    pub fn reconciled(&self, outcome: &str, seconds: f64) {
        self.reconciles.with_label_values(&[outcome]).inc();
        if outcome != "ok" {
            self.errors.with_label_values(&[outcome]).inc();
        }
        self.duration.with_label_values(&[outcome]).observe(seconds);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# cannot encode metrics: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconciles_are_counted_by_outcome_and_errors_by_label() {
        let m = Metrics::new().unwrap();
        m.reconciled("ok", 0.02);
        m.reconciled("kube", 0.5);
        let text = m.render();
        assert!(
            text.contains("dynakv_operator_reconciles_total{outcome=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("dynakv_operator_reconcile_errors_total{error=\"kube\"} 1"),
            "{text}"
        );
        assert!(!text.contains("error=\"ok\""), "{text}");
        assert!(
            text.contains("dynakv_operator_reconcile_duration_seconds_bucket"),
            "{text}"
        );
    }
}
