//! Pure: what was observed and the plan chosen -> the status written back.
//!
//! Conditions (Available, Progressing, Degraded, Rebalancing) keep their `lastTransitionTime`
//! while their status does not change, so `kubectl describe` shows since when something holds.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::crd::{KVCluster, KVClusterStatus, NodeState, Phase, RebalanceProgress};
use crate::decisions::{Plan, PodView, ReasonCode, Work};
use crate::proto::{ClusterStatusResponse, Rebalance};
use crate::resources::{ordinal_of, selector_string};

/// Inputs of [`build`].
pub struct StatusInput<'a> {
    pub kvc: &'a KVCluster,
    pub plan: &'a Plan,
    /// (replicas, readyReplicas) of the StatefulSet's status.
    pub sts: Option<(i32, i32)>,
    pub pods: &'a BTreeMap<u32, PodView>,
    pub cluster: Option<&'a ClusterStatusResponse>,
    /// A node refused the plan's Admin request: its message.
    pub admin_refusal: Option<&'a str>,
    /// Other problems worth a Degraded condition (a ServiceMonitor that cannot be created).
    pub warnings: &'a [String],
    pub now: Timestamp,
}

/// Share done of a ring change: bytes when known, else keys, else ranges (0..=100).
pub fn percent_done(r: &Rebalance) -> u64 {
    let (done, total) = if r.bytes_total > 0 {
        (r.bytes_done, r.bytes_total)
    } else if r.keys_total > 0 {
        (r.keys_done, r.keys_total)
    } else {
        (r.ranges_done, r.ranges_total)
    };
    if total == 0 {
        return 0;
    }
    (done.min(total).saturating_mul(100)) / total
}

/// The API's integer formats are int32 and int64 (unsigned ones draw warnings).
fn int(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}
fn long(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn rebalance_progress(r: &Rebalance) -> RebalanceProgress {
    RebalanceProgress {
        node: r.node.clone(),
        kind: r.kind.clone(),
        phase: r.phase.clone(),
        from_weight: int(r.from_weight),
        to_weight: int(r.to_weight),
        progress: format!("{}%", percent_done(r)),
        keys_done: long(r.keys_done),
        keys_total: long(r.keys_total),
        bytes_done: long(r.bytes_done),
        bytes_total: long(r.bytes_total),
        ranges_done: long(r.ranges_done),
        ranges_total: long(r.ranges_total),
        bytes_per_second: if r.bytes_per_second.is_finite() {
            r.bytes_per_second.max(0.0)
        } else {
            0.0
        },
        eta_seconds: (r.eta_seconds.is_finite() && r.eta_seconds >= 0.0)
            .then(|| r.eta_seconds.round() as i64),
        waiting_for: r.waiting_for.clone(),
        queued: r.queued.clone(),
    }
}

fn rebalance_message(r: &Rebalance) -> String {
    let mut m = format!(
        "{} {} {} -> {}: {}, {}% (keys {}/{}, bytes {}/{})",
        r.node,
        r.kind,
        r.from_weight,
        r.to_weight,
        r.phase,
        percent_done(r),
        r.keys_done,
        r.keys_total,
        r.bytes_done,
        r.bytes_total
    );
    if r.eta_seconds.is_finite() && r.eta_seconds >= 0.0 {
        m.push_str(&format!(", about {}s left", r.eta_seconds.round() as i64));
    }
    if !r.waiting_for.is_empty() {
        m.push_str(&format!(", waiting for {}", r.waiting_for.join(", ")));
    }
    m
}

struct Conditions<'a> {
    previous: &'a [Condition],
    generation: Option<i64>,
    now: Timestamp,
    out: Vec<Condition>,
}

impl Conditions<'_> {
    fn set(&mut self, type_: &str, status: bool, reason: &str, message: String) {
        let status = if status { "True" } else { "False" }.to_string();
        let since = self
            .previous
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or(Time(self.now));
        self.out.push(Condition {
            type_: type_.to_string(),
            status,
            reason: reason.to_string(),
            message,
            observed_generation: self.generation,
            last_transition_time: since,
        });
    }
}

/// The status for this reconcile.
pub fn build(input: &StatusInput) -> KVClusterStatus {
    let kvc = input.kvc;
    let name = kvc.name_any();
    let plan = input.plan;
    let n = kvc.spec.n();
    let previous = kvc
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let (replicas, ready_replicas) = input.sts.unwrap_or((0, 0));

    let mut nodes: Vec<NodeState> = input
        .cluster
        .map(|c| {
            c.members
                .iter()
                .map(|m| NodeState {
                    name: m.id.clone(),
                    weight: int(m.weight),
                    target_weight: int(m.target_weight),
                    lifecycle: m.lifecycle.clone(),
                    liveness: m.state.clone(),
                    owned_fraction: if m.replica_ownership.is_finite() {
                        m.replica_ownership
                    } else {
                        0.0
                    },
                    ready: ordinal_of(&name, &m.id)
                        .and_then(|i| input.pods.get(&i))
                        .is_some_and(|p| p.ready),
                })
                .collect()
        })
        .unwrap_or_default();
    nodes.sort_by_key(|s| {
        (
            ordinal_of(&name, &s.name).unwrap_or(u32::MAX),
            s.name.clone(),
        )
    });
    let rebalance = input
        .cluster
        .and_then(|c| c.rebalance.as_ref())
        .filter(|r| r.active);

    let down: Vec<&str> = nodes
        .iter()
        .filter(|s| (s.weight > 0 || s.target_weight > 0) && s.liveness != "alive")
        .filter(|s| !matches!(s.lifecycle.as_str(), "left" | "removed"))
        .map(|s| s.name.as_str())
        .collect();

    let mut c = Conditions {
        previous,
        generation: kvc.metadata.generation,
        now: input.now,
        out: Vec::new(),
    };

    // Available: the cluster answers and no member that owns data is down.
    let (available, reason, message) = if input.cluster.is_none() {
        (
            false,
            "NoNodeAnswers",
            format!(
                "no node answered Admin.ClusterStatus ({ready_replicas} of {replicas} pods ready)"
            ),
        )
    } else if (ready_replicas.max(0) as u32) < n {
        (
            false,
            "TooFewReadyNodes",
            format!("{ready_replicas} pods are ready; a key needs {n}"),
        )
    } else if !down.is_empty() {
        (
            false,
            "NodesDown",
            format!(
                "{} own data and are not alive: keys they replicate have fewer replicas",
                down.join(", ")
            ),
        )
    } else {
        (
            true,
            "QuorumsReachable",
            format!(
                "{ready_replicas} of {replicas} nodes ready, every member that owns data is alive"
            ),
        )
    };
    c.set("Available", available, reason, message);

    c.set(
        "Progressing",
        plan.in_progress,
        plan.reason.code.as_str(),
        plan.reason.message.clone(),
    );

    let mut degraded: Vec<(&str, String)> = Vec::new();
    if plan.reason.code == ReasonCode::InvalidSpec {
        degraded.push(("InvalidSpec", plan.reason.message.clone()));
    }
    if let Some(r) = &plan.refusal {
        degraded.push(("BelowReplicationFactor", r.clone()));
    }
    if let Some(r) = input.admin_refusal {
        degraded.push((
            "ChangeRefused",
            format!("the cluster refused a membership change: {r}"),
        ));
    }
    if input.cluster.is_some() && !down.is_empty() {
        degraded.push((
            "NodesDown",
            format!("{} own data and are not alive", down.join(", ")),
        ));
    }
    for w in input.warnings {
        degraded.push(("ObjectNotApplied", w.clone()));
    }
    match degraded.first() {
        Some((reason, _)) => {
            let message = degraded
                .iter()
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
                .join("; ");
            c.set("Degraded", true, reason, message);
        }
        None => c.set("Degraded", false, "AsExpected", "nothing to report".into()),
    }

    match rebalance {
        Some(r) => c.set("Rebalancing", true, "RingChange", rebalance_message(r)),
        None => c.set(
            "Rebalancing",
            false,
            "RingSettled",
            "no ring change under way".into(),
        ),
    }

    let phase = if kvc.metadata.deletion_timestamp.is_some() {
        Phase::Terminating
    } else if plan.reason.code == ReasonCode::InvalidSpec
        || plan.refusal.is_some()
        || input.admin_refusal.is_some()
    {
        Phase::Degraded
    } else if plan.reason.code == ReasonCode::NoNodeAnswers {
        // Nobody answers: still starting if the cluster never ran, otherwise an outage.
        match kvc.status.as_ref().map(|s| s.phase) {
            None | Some(Phase::Pending) | Some(Phase::Creating) => Phase::Creating,
            Some(_) => Phase::Degraded,
        }
    } else {
        match plan.work {
            Work::Invalid => Phase::Degraded,
            Work::Creating => Phase::Creating,
            Work::ScalingUp => Phase::ScalingUp,
            Work::ScalingDown => Phase::ScalingDown,
            Work::Upgrading => Phase::Upgrading,
            Work::None => Phase::Running,
        }
    };

    KVClusterStatus {
        replicas,
        ready_replicas,
        selector: selector_string(&name),
        phase,
        observed_generation: kvc.metadata.generation,
        conditions: c.out,
        message: Some(plan.reason.message.clone()).filter(|m| !m.is_empty()),
        nodes,
        rebalancing: rebalance.map(rebalance_progress),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decisions::{Reason, ReasonCode};
    use crate::proto::Member;

    fn plan(code: ReasonCode, work: Work, in_progress: bool) -> Plan {
        Plan {
            sts_replicas: Some(3),
            admin: vec![],
            restart_pod: None,
            reason: Reason {
                code,
                message: format!("{code:?}"),
            },
            also: None,
            work,
            refusal: None,
            in_progress,
        }
    }

    fn member(id: &str, weight: u32, state: &str) -> Member {
        Member {
            id: id.into(),
            state: state.into(),
            weight,
            target_weight: weight,
            lifecycle: "normal".into(),
            replica_ownership: 1.0,
            ..Member::default()
        }
    }

    fn now() -> Timestamp {
        "2026-01-01T00:00:00Z".parse().unwrap()
    }

    #[test]
    fn a_settled_cluster_is_available_and_running() {
        let kvc = KVCluster::test();
        let p = plan(ReasonCode::Settled, Work::None, false);
        let pods = BTreeMap::new();
        let cs = ClusterStatusResponse {
            members: vec![
                member("test-1", 100, "alive"),
                member("test-0", 100, "alive"),
            ],
            ..Default::default()
        };
        let s = build(&StatusInput {
            kvc: &kvc,
            plan: &p,
            sts: Some((3, 3)),
            pods: &pods,
            cluster: Some(&cs),
            admin_refusal: None,
            warnings: &[],
            now: now(),
        });
        assert_eq!(s.phase, Phase::Running);
        assert_eq!(
            s.selector,
            "app.kubernetes.io/instance=test,app.kubernetes.io/name=dynakv"
        );
        let get = |t: &str| s.conditions.iter().find(|c| c.type_ == t).unwrap().clone();
        assert_eq!(get("Available").status, "True");
        assert_eq!(get("Progressing").status, "False");
        assert_eq!(get("Degraded").status, "False");
        assert_eq!(get("Rebalancing").status, "False");
        assert_eq!(s.nodes[0].name, "test-0", "nodes sorted by ordinal");
    }

    #[test]
    fn a_ring_change_shows_numeric_progress_and_keeps_its_transition_time() {
        let mut kvc = KVCluster::test();
        let p = plan(ReasonCode::WaitingForRebalance, Work::ScalingUp, true);
        let pods = BTreeMap::new();
        let cs = ClusterStatusResponse {
            members: vec![member("test-3", 25, "alive")],
            rebalance: Some(Rebalance {
                active: true,
                node: "test-3".into(),
                from_weight: 25,
                to_weight: 50,
                kind: "weight".into(),
                phase: "streaming".into(),
                keys_done: 10,
                keys_total: 100,
                bytes_done: 420,
                bytes_total: 1000,
                bytes_per_second: 10.0,
                eta_seconds: 58.0,
                ..Default::default()
            }),
            ..Default::default()
        };
        let input = |kvc: &KVCluster, now: Timestamp| {
            build(&StatusInput {
                kvc,
                plan: &p,
                sts: Some((4, 4)),
                pods: &pods,
                cluster: Some(&cs),
                admin_refusal: None,
                warnings: &[],
                now,
            })
        };
        let s = input(&kvc, now());
        let r = s.rebalancing.clone().unwrap();
        assert_eq!(r.progress, "42%");
        assert_eq!(r.eta_seconds, Some(58));
        assert_eq!(s.phase, Phase::ScalingUp);
        let reb = s
            .conditions
            .iter()
            .find(|c| c.type_ == "Rebalancing")
            .unwrap();
        assert!(
            reb.message
                .contains("test-3 weight 25 -> 50: streaming, 42%"),
            "{}",
            reb.message
        );
        // A later reconcile with the same condition keeps its transition time.
        kvc.status = Some(s.clone());
        let later: Timestamp = "2026-01-01T00:05:00Z".parse().unwrap();
        let s2 = input(&kvc, later);
        let reb2 = s2
            .conditions
            .iter()
            .find(|c| c.type_ == "Rebalancing")
            .unwrap();
        assert_eq!(reb2.last_transition_time, Time(now()));
    }

    #[test]
    fn refusal_below_n_is_degraded_with_an_actionable_message() {
        let kvc = KVCluster::test().with_replicas(2);
        let mut p = plan(ReasonCode::Settled, Work::None, false);
        p.refusal = Some("spec.replicas 2 is below replicationFactor 3".into());
        let pods = BTreeMap::new();
        let s = build(&StatusInput {
            kvc: &kvc,
            plan: &p,
            sts: Some((3, 3)),
            pods: &pods,
            cluster: Some(&ClusterStatusResponse::default()),
            admin_refusal: None,
            warnings: &[],
            now: now(),
        });
        assert_eq!(s.phase, Phase::Degraded);
        let d = s.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
        assert_eq!(d.status, "True");
        assert_eq!(d.reason, "BelowReplicationFactor");
    }

    #[test]
    fn no_answer_is_creating_for_a_new_cluster_and_degraded_for_one_that_ran() {
        let mut kvc = KVCluster::test();
        let p = plan(ReasonCode::NoNodeAnswers, Work::None, true);
        let pods = BTreeMap::new();
        let phase = |kvc: &KVCluster| {
            build(&StatusInput {
                kvc,
                plan: &p,
                sts: Some((3, 0)),
                pods: &pods,
                cluster: None,
                admin_refusal: None,
                warnings: &[],
                now: now(),
            })
            .phase
        };
        assert_eq!(phase(&kvc), Phase::Creating);
        kvc.status = Some(KVClusterStatus {
            phase: Phase::Running,
            ..Default::default()
        });
        assert_eq!(phase(&kvc), Phase::Degraded);
    }

    #[test]
    fn percent_prefers_bytes_then_keys_then_ranges() {
        let r = Rebalance {
            ranges_done: 1,
            ranges_total: 4,
            ..Default::default()
        };
        assert_eq!(percent_done(&r), 25);
        let r = Rebalance {
            keys_done: 5,
            keys_total: 10,
            ranges_total: 4,
            ..Default::default()
        };
        assert_eq!(percent_done(&r), 50);
        let r = Rebalance {
            bytes_done: 20,
            bytes_total: 10,
            ..Default::default()
        };
        assert_eq!(percent_done(&r), 100);
        assert_eq!(percent_done(&Rebalance::default()), 0);
    }
}
