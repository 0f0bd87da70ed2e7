//! The operator's own Prometheus metrics (`dynakv_operator_*`), served on `/metrics`.
//!
//! Labels come from fixed sets only: the outcome of a reconcile is `ok` or the error's
//! [`crate::controller::Error::metric_label`], the step is a [`crate::decisions::ReasonCode`].
//! Never a label built from `Debug` output or an object name, so cardinality stays bounded.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
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
        })
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
