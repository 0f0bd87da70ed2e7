//! Pure decisions: the observed state of one cluster in, the next step out, with the reason for
//! it (which becomes an Event and the Progressing condition).
//!
//! Invariants the decisions keep (the property test in this module checks them over arbitrary
//! observed states and changes of mind):
//! - One membership change at a time: a new weight change is asked for only while no other
//!   member's change is queued or under way. Redirecting the change of the member already
//!   changing (a changed mind) is allowed.
//! - A drain (Leave) is asked for only when at least N other members keep a weight above 0 and
//!   are not draining themselves, and every member that owns data is alive: the draining node
//!   is never the last holder of a range.
//! - The StatefulSet shrinks only past nodes that own nothing (left, never joined, or weight 0
//!   with nothing pending), highest ordinals first, and never below N.
//! - Members scaled away are not removed from the membership: a left member cannot be
//!   removed, and a removed one could not take a weight again when a later scale-up brings its
//!   pod back; left and weight-0 members own nothing, and `SetWeight` brings them back.
//! - A pod is replaced for a new template only when membership is settled, every pod is ready,
//!   every member alive and no ring change is under way: one pod at a time.

use std::collections::BTreeMap;

use crate::crd::FULL_WEIGHT;
use crate::resources::pod_name;

/// A member's place in the ring, as it says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    Joining,
    Normal,
    Leaving,
    Left,
    Removed,
    Unknown,
}

impl Lifecycle {
    pub fn parse(s: &str) -> Self {
        match s {
            "joining" => Lifecycle::Joining,
            "normal" => Lifecycle::Normal,
            "leaving" => Lifecycle::Leaving,
            "left" => Lifecycle::Left,
            "removed" => Lifecycle::Removed,
            _ => Lifecycle::Unknown,
        }
    }
    fn gone(self) -> bool {
        matches!(self, Lifecycle::Left | Lifecycle::Removed)
    }
}

/// Liveness of a member as gossip sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    Suspect,
    Down,
    Unknown,
}

impl Liveness {
    pub fn parse(s: &str) -> Self {
        match s {
            "alive" => Liveness::Alive,
            "suspect" => Liveness::Suspect,
            "down" => Liveness::Down,
            _ => Liveness::Unknown,
        }
    }
}

/// One member of the cluster's membership.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub weight: u32,
    pub target_weight: u32,
    pub lifecycle: Lifecycle,
    pub liveness: Liveness,
}

impl Member {
    /// Owns part of the ring now or is about to.
    fn holds_data(&self) -> bool {
        (self.weight > 0 || self.target_weight > 0) && !self.lifecycle.gone()
    }
    /// Owns nothing and nothing is pending for it: its pod may go.
    fn drained(&self) -> bool {
        self.lifecycle.gone()
            || (self.weight == 0 && self.target_weight == 0 && self.lifecycle != Lifecycle::Leaving)
    }
    fn changing(&self) -> bool {
        self.weight != self.target_weight && !self.lifecycle.gone()
    }
}

/// The membership as one node answered `Admin.ClusterStatus`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClusterView {
    pub members: BTreeMap<String, Member>,
    /// The member whose ring change is under way, if any.
    pub rebalancing: Option<String>,
}

/// A pod of the StatefulSet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    pub ready: bool,
    /// Its `dynakv.io/template-hash` annotation.
    pub template_hash: Option<String>,
    /// Being deleted.
    pub terminating: bool,
}

/// Everything a decision looks at.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    /// The KVCluster's name (pods are `<name>-<ordinal>`).
    pub name: String,
    /// `spec.replicas`.
    pub replicas: i32,
    /// `spec.replicationFactor`.
    pub n: u32,
    /// Weights a joining node goes through (ascending, ending at 100).
    pub steps: Vec<u32>,
    /// Hash of the pod template the spec gives.
    pub template_hash: String,
    /// Why the spec cannot be acted on (empty: it can).
    pub problems: Vec<String>,
    /// What the nodes' certificate waits for (a Secret not there yet), for people; `None`: it
    /// is there, or TLS is off.
    pub waiting_for_tls: Option<String>,
    /// `spec.replicas` of the StatefulSet (None: no StatefulSet).
    pub sts_replicas: Option<i32>,
    /// Pods by ordinal.
    pub pods: BTreeMap<u32, PodView>,
    /// None: no node answered.
    pub cluster: Option<ClusterView>,
}

/// A request to the nodes' Admin service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminAction {
    SetWeight { node: String, weight: u32 },
    Leave { node: String },
}

impl AdminAction {
    /// The member the request is about.
    pub fn node(&self) -> &str {
        match self {
            AdminAction::SetWeight { node, .. } | AdminAction::Leave { node } => node,
        }
    }
}

impl std::fmt::Display for AdminAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdminAction::SetWeight { node, weight } => write!(f, "SetWeight({node}, {weight})"),
            AdminAction::Leave { node } => write!(f, "Leave({node})"),
        }
    }
}

/// Why the plan is what it is. The variant name is the Event and condition reason (stable:
/// it is also a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasonCode {
    InvalidSpec,
    WaitingForCertificate,
    Creating,
    NoNodeAnswers,
    WaitingForNodes,
    Bootstrapping,
    ScalingUp,
    RampingWeight,
    WaitingForRebalance,
    WaitingForHealthy,
    CancellingDrain,
    Rejoining,
    Draining,
    WaitingForDrain,
    UnsafeDrain,
    RemovingNodes,
    RollingPod,
    Settled,
}

impl ReasonCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ReasonCode::InvalidSpec => "InvalidSpec",
            ReasonCode::WaitingForCertificate => "WaitingForCertificate",
            ReasonCode::Creating => "Creating",
            ReasonCode::NoNodeAnswers => "NoNodeAnswers",
            ReasonCode::WaitingForNodes => "WaitingForNodes",
            ReasonCode::Bootstrapping => "Bootstrapping",
            ReasonCode::ScalingUp => "ScalingUp",
            ReasonCode::RampingWeight => "RampingWeight",
            ReasonCode::WaitingForRebalance => "WaitingForRebalance",
            ReasonCode::WaitingForHealthy => "WaitingForHealthy",
            ReasonCode::CancellingDrain => "CancellingDrain",
            ReasonCode::Rejoining => "Rejoining",
            ReasonCode::Draining => "Draining",
            ReasonCode::WaitingForDrain => "WaitingForDrain",
            ReasonCode::UnsafeDrain => "UnsafeDrain",
            ReasonCode::RemovingNodes => "RemovingNodes",
            ReasonCode::RollingPod => "RollingPod",
            ReasonCode::Settled => "Settled",
        }
    }

    /// Whether this reason is a step the operator took (an Event of its own), as opposed to
    /// waiting.
    pub fn is_action(self) -> bool {
        matches!(
            self,
            ReasonCode::Creating
                | ReasonCode::Bootstrapping
                | ReasonCode::ScalingUp
                | ReasonCode::RampingWeight
                | ReasonCode::CancellingDrain
                | ReasonCode::Rejoining
                | ReasonCode::Draining
                | ReasonCode::RemovingNodes
                | ReasonCode::RollingPod
        )
    }
}

/// A reason with a message a person can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason {
    pub code: ReasonCode,
    pub message: String,
}

fn reason(code: ReasonCode, message: impl Into<String>) -> Reason {
    Reason {
        code,
        message: message.into(),
    }
}

/// The coarse kind of work under way (for the phase).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    None,
    Invalid,
    Creating,
    ScalingUp,
    ScalingDown,
    Upgrading,
}

/// What to do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Replicas of the StatefulSet to apply (with every other object). None: apply nothing.
    pub sts_replicas: Option<i32>,
    /// Admin requests, in order.
    pub admin: Vec<AdminAction>,
    /// A pod to delete so that the StatefulSet recreates it from the current template.
    pub restart_pod: Option<String>,
    pub reason: Reason,
    /// A step this plan takes besides the one `reason` names: lowering the StatefulSet past
    /// drained nodes while the next drain starts or is waited for. It gets its own Event, and
    /// its message leads the status message.
    pub also: Option<(Reason, String)>,
    pub work: Work,
    /// Set when `spec.replicas` is below N: the operator keeps N nodes and says so.
    pub refusal: Option<String>,
    /// True until the cluster matches the spec: check again soon.
    pub in_progress: bool,
}

impl Plan {
    /// What the step does, for the Event's `action` (Events of one reason and action are
    /// folded into a series, so each distinct step gets its own).
    pub fn action_label(&self) -> String {
        if let Some(a) = self.admin.first() {
            return a.to_string();
        }
        if let Some(p) = &self.restart_pod {
            return format!("Replace({p})");
        }
        match self.sts_replicas {
            Some(r) => format!("StatefulSet({r})"),
            None => self.reason.code.as_str().to_string(),
        }
    }
}

impl Observed {
    fn member(&self, i: u32) -> Option<&Member> {
        self.cluster
            .as_ref()
            .and_then(|c| c.members.get(&pod_name(&self.name, i)))
    }
}

/// The weight a joining node goes to after `weight`.
pub fn next_step(steps: &[u32], weight: u32) -> u32 {
    steps
        .iter()
        .copied()
        .find(|s| *s > weight)
        .unwrap_or(FULL_WEIGHT)
}

/// Members whose change is queued or under way, other than `except`.
fn busy_except(c: &ClusterView, except: &str) -> Option<String> {
    if let Some(n) = &c.rebalancing
        && n != except
    {
        return Some(n.clone());
    }
    c.members
        .iter()
        .find(|(id, m)| id.as_str() != except && m.changing())
        .map(|(id, _)| id.clone())
}

/// Members that own data but are not alive.
fn unhealthy(c: &ClusterView, except: &str) -> Vec<String> {
    c.members
        .iter()
        .filter(|(id, m)| id.as_str() != except && m.holds_data() && m.liveness != Liveness::Alive)
        .map(|(id, _)| id.clone())
        .collect()
}

/// `plan` (a drain step) with the StatefulSet lowered in the same plan reported beside it.
fn with_removal(mut plan: Plan, removing: Option<(Reason, String)>) -> Plan {
    if let Some((removal, action)) = removing
        && plan.reason.code != ReasonCode::RemovingNodes
    {
        plan.reason.message = format!("{}; {}", removal.message, plan.reason.message);
        plan.also = Some((removal, action));
    }
    plan
}

/// The next step for one cluster.
pub fn decide(o: &Observed) -> Plan {
    let mut plan = next_step_of(o);
    // Until some member owns part of the ring, the cluster is still being created.
    let nobody_owns = o
        .cluster
        .as_ref()
        .is_some_and(|c| c.members.values().all(|m| m.weight == 0));
    if plan.work == Work::ScalingUp && nobody_owns {
        plan.work = Work::Creating;
    }
    plan
}

fn next_step_of(o: &Observed) -> Plan {
    let mut plan = Plan {
        sts_replicas: None,
        admin: Vec::new(),
        restart_pod: None,
        reason: reason(ReasonCode::Settled, ""),
        also: None,
        work: Work::None,
        refusal: None,
        in_progress: true,
    };
    if !o.problems.is_empty() {
        plan.reason = reason(
            ReasonCode::InvalidSpec,
            format!(
                "the spec cannot be acted on: {}; nothing is changed until it is fixed",
                o.problems.join("; ")
            ),
        );
        plan.work = Work::Invalid;
        plan.in_progress = false;
        return plan;
    }
    if let Some(what) = &o.waiting_for_tls {
        // Nodes without their certificate cannot start, and the operator cannot reach running
        // ones: nothing changes until it is there.
        plan.reason = reason(
            ReasonCode::WaitingForCertificate,
            format!("waiting for the nodes' certificate: {what}"),
        );
        plan.work = if o.sts_replicas.is_none() {
            Work::Creating
        } else {
            Work::None
        };
        return plan;
    }
    let n = o.n;
    let target = if o.replicas < n as i32 {
        plan.refusal = Some(format!(
            "spec.replicas {} is below replicationFactor {n}: a key needs {n} nodes, so the \
             cluster keeps {n}; set replicas to {n} or more",
            o.replicas
        ));
        n
    } else {
        o.replicas as u32
    };

    let Some(sts) = o.sts_replicas else {
        plan.sts_replicas = Some(target as i32);
        plan.work = Work::Creating;
        plan.reason = reason(
            ReasonCode::Creating,
            format!("creating a StatefulSet of {target} nodes"),
        );
        return plan;
    };
    let current = sts.max(0) as u32;
    plan.sts_replicas = Some(current.max(target) as i32);
    if target > current {
        plan.work = Work::ScalingUp;
    } else if target < current {
        plan.work = Work::ScalingDown;
    }

    let Some(c) = &o.cluster else {
        let ready = o.pods.values().filter(|p| p.ready).count();
        plan.reason = reason(
            ReasonCode::NoNodeAnswers,
            format!(
                "no node answered Admin.ClusterStatus yet ({ready} of {} pods ready)",
                o.pods.len()
            ),
        );
        if target > current {
            plan.reason = reason(
                ReasonCode::ScalingUp,
                format!("raising the StatefulSet from {current} to {target} nodes"),
            );
        }
        return plan;
    };

    // 1. A new cluster: nobody owns anything yet, so there is no data to move and the first
    //    nodes go straight to full weight (all at once: the cluster queues the changes).
    if c.members.values().all(|m| !m.holds_data()) {
        plan.work = Work::Creating;
        let missing: Vec<String> = (0..target)
            .filter(|i| o.member(*i).is_none_or(|m| m.liveness != Liveness::Alive))
            .map(|i| pod_name(&o.name, i))
            .collect();
        if !missing.is_empty() {
            plan.reason = reason(
                ReasonCode::WaitingForNodes,
                format!(
                    "waiting for {} to join ({} of {target} nodes have)",
                    missing.join(", "),
                    target as usize - missing.len()
                ),
            );
            return plan;
        }
        plan.admin = (0..target)
            .map(|i| AdminAction::SetWeight {
                node: pod_name(&o.name, i),
                weight: FULL_WEIGHT,
            })
            .collect();
        plan.reason = reason(
            ReasonCode::Bootstrapping,
            format!("new cluster: giving {target} nodes their full weight"),
        );
        return plan;
    }

    // 2. A node that should stay but was being drained (a changed mind): cancel the drain.
    for i in 0..target {
        let name = pod_name(&o.name, i);
        let Some(m) = o.member(i) else { continue };
        if m.lifecycle.gone() {
            // Drained already but wanted again: it rejoins through the ramp, once its pod runs
            // (the member takes the request itself: nobody forwards to a member that left).
            plan.work = Work::ScalingUp;
            if m.liveness != Liveness::Alive || !o.pods.contains_key(&i) {
                plan.reason = reason(
                    ReasonCode::WaitingForNodes,
                    format!(
                        "{name} left earlier and is wanted again; it rejoins once its pod runs"
                    ),
                );
                return plan;
            }
            if let Some(busy) = busy_except(c, &name) {
                plan.reason = reason(
                    ReasonCode::WaitingForRebalance,
                    format!(
                        "{name} left earlier and is wanted again; it rejoins after {busy}'s change"
                    ),
                );
                return plan;
            }
            plan.admin.push(AdminAction::SetWeight {
                node: name.clone(),
                weight: next_step(&o.steps, 0),
            });
            plan.reason = reason(
                ReasonCode::Rejoining,
                format!(
                    "{name} left earlier and is wanted again: weight 0 -> {}",
                    next_step(&o.steps, 0)
                ),
            );
            return plan;
        }
        if m.target_weight < m.weight || (m.lifecycle == Lifecycle::Leaving && m.target_weight == 0)
        {
            let weight = if m.weight > 0 {
                m.weight
            } else {
                next_step(&o.steps, 0)
            };
            plan.admin.push(AdminAction::SetWeight {
                node: name.clone(),
                weight,
            });
            plan.reason = reason(
                ReasonCode::CancellingDrain,
                format!(
                    "{name} is wanted again (spec.replicas {target}): its drain is cancelled, target weight {weight}"
                ),
            );
            return plan;
        }
    }

    // 3. Shrink past the highest ordinals that own nothing any more.
    let mut keep = current;
    while keep > target && o.member(keep - 1).is_none_or(|m| m.drained()) {
        keep -= 1;
    }
    if keep < current {
        plan.sts_replicas = Some(keep as i32);
        plan.reason = reason(
            ReasonCode::RemovingNodes,
            format!(
                "{} drained: lowering the StatefulSet from {current} to {keep}",
                (keep..current)
                    .map(|i| pod_name(&o.name, i))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
    }
    let shrinking = keep < current;
    let removing = shrinking.then(|| (plan.reason.clone(), format!("StatefulSet({keep})")));

    // 4. Drain the highest ordinal above the target that still owns data, one at a time.
    //    When the StatefulSet is lowered in the same plan, whatever this step says keeps that
    //    removal in the report (`also`).
    let mut unsafe_drain = None;
    if keep > target {
        let i = keep - 1;
        let name = pod_name(&o.name, i);
        if let Some(m) = o.member(i) {
            if m.target_weight == 0 {
                plan.reason = reason(
                    ReasonCode::WaitingForDrain,
                    format!(
                        "{name} is handing its data over (weight {} -> 0) before it is removed",
                        m.weight
                    ),
                );
                return with_removal(plan, removing);
            }
            let remaining = c
                .members
                .iter()
                .filter(|(id, m)| {
                    m.holds_data()
                        && m.target_weight > 0
                        && m.lifecycle != Lifecycle::Leaving
                        && crate::resources::ordinal_of(&o.name, id).is_none_or(|k| k < target)
                })
                .count();
            if remaining < n as usize {
                unsafe_drain = Some(reason(
                    ReasonCode::UnsafeDrain,
                    format!(
                        "{name} waits to drain: only {remaining} of the nodes that stay own data, \
                         and every key needs {n}"
                    ),
                ));
            } else if m.liveness != Liveness::Alive {
                plan.reason = reason(
                    ReasonCode::WaitingForHealthy,
                    format!(
                        "{name} is {:?} and still owns data: it cannot hand it over. The \
                         scale-down waits for it to come back (if it never will, remove it \
                         with `dynakv cluster remove {name}`)",
                        m.liveness
                    )
                    .to_lowercase(),
                );
                return with_removal(plan, removing);
            } else if let Some(busy) = busy_except(c, &name) {
                plan.reason = reason(
                    ReasonCode::WaitingForRebalance,
                    format!("{name} drains after {busy}'s change is done"),
                );
                return with_removal(plan, removing);
            } else if let Some(down) = unhealthy(c, &name).first() {
                plan.reason = reason(
                    ReasonCode::WaitingForHealthy,
                    format!("{name} drains once {down} is alive again"),
                );
                return with_removal(plan, removing);
            } else {
                plan.admin.push(AdminAction::Leave { node: name.clone() });
                plan.reason = reason(
                    ReasonCode::Draining,
                    format!(
                        "scaling down to {target}: {name} hands its data over (weight {} -> 0)",
                        m.weight
                    ),
                );
                return with_removal(plan, removing);
            }
        }
    }
    if shrinking {
        return plan;
    }

    // 5. Ramp the lowest ordinal below the target that is not at full weight yet.
    for i in 0..target {
        let name = pod_name(&o.name, i);
        let Some(m) = o.member(i) else {
            if plan.work == Work::None {
                plan.work = Work::ScalingUp;
            }
            plan.reason = reason(
                ReasonCode::WaitingForNodes,
                format!("waiting for {name} to start and join"),
            );
            if target > current {
                plan.reason = reason(
                    ReasonCode::ScalingUp,
                    format!("raising the StatefulSet from {current} to {target} nodes"),
                );
            }
            return plan;
        };
        if m.weight >= FULL_WEIGHT && m.target_weight >= FULL_WEIGHT {
            continue;
        }
        if plan.work == Work::None {
            plan.work = Work::ScalingUp;
        }
        if m.target_weight > m.weight {
            plan.reason = reason(
                ReasonCode::WaitingForRebalance,
                format!(
                    "{name} is taking its share (weight {} -> {})",
                    m.weight, m.target_weight
                ),
            );
            return plan;
        }
        if let Some(busy) = busy_except(c, &name) {
            plan.reason = reason(
                ReasonCode::WaitingForRebalance,
                format!("{name}'s next weight step waits for {busy}'s change"),
            );
            return plan;
        }
        if m.liveness != Liveness::Alive {
            plan.reason = reason(
                ReasonCode::WaitingForHealthy,
                format!("{name} is not alive; its weight is raised once it is"),
            );
            return plan;
        }
        if let Some(down) = unhealthy(c, &name).first() {
            plan.reason = reason(
                ReasonCode::WaitingForHealthy,
                format!("{name}'s next weight step waits until {down} is alive again"),
            );
            return plan;
        }
        let next = next_step(&o.steps, m.weight);
        plan.admin.push(AdminAction::SetWeight {
            node: name.clone(),
            weight: next,
        });
        plan.reason = reason(
            ReasonCode::RampingWeight,
            format!("{name} joins: weight {} -> {next}", m.weight),
        );
        return plan;
    }
    if let Some(r) = unsafe_drain {
        plan.reason = r;
        return plan;
    }
    if let Some(busy) = busy_except(c, "") {
        plan.reason = reason(
            ReasonCode::WaitingForRebalance,
            format!("{busy}'s ring change is under way"),
        );
        return plan;
    }

    // 6. Replace pods that run an old template, highest ordinal first, one at a time.
    let outdated: Vec<u32> = (0..target)
        .filter(|i| {
            o.pods
                .get(i)
                .is_some_and(|p| p.template_hash.as_deref() != Some(o.template_hash.as_str()))
        })
        .collect();
    if let Some(&i) = outdated.last() {
        plan.work = Work::Upgrading;
        let name = pod_name(&o.name, i);
        let updated = target as usize - outdated.len();
        if let Some((k, _)) = o.pods.iter().find(|(_, p)| p.terminating || !p.ready) {
            plan.reason = reason(
                ReasonCode::WaitingForHealthy,
                format!(
                    "{} is not ready; the next pod is replaced once it is ({updated} of {target} on the current template)",
                    pod_name(&o.name, *k)
                ),
            );
            return plan;
        }
        if let Some(down) = unhealthy(c, "").first() {
            plan.reason = reason(
                ReasonCode::WaitingForHealthy,
                format!("{down} is not alive; the next pod is replaced once it is"),
            );
            return plan;
        }
        plan.restart_pod = Some(name.clone());
        plan.reason = reason(
            ReasonCode::RollingPod,
            format!(
                "replacing {name} with the current template ({updated} of {target} pods have it)"
            ),
        );
        return plan;
    }
    let missing_pods = (0..target).filter(|i| !o.pods.contains_key(i)).count();
    if missing_pods > 0 {
        plan.reason = reason(
            ReasonCode::WaitingForNodes,
            format!("{missing_pods} pods do not exist yet"),
        );
        return plan;
    }

    plan.in_progress = false;
    plan.reason = reason(
        ReasonCode::Settled,
        format!("{target} nodes at full weight on the current template"),
    );
    plan
}

#[cfg(test)]
mod tests;
