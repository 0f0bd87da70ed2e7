//! The scenario DSL: a table of [`Step`]s run in order against a simulated cluster, in the
//! manner of chitchat's `cluster_test.rs` (but in simulated time, so `Wait` costs nothing real).
//!
//! ```
//! use dynakv_sim::scenario::{Check, Scenario, Step};
//! let s = Scenario::siblings("example", 3).steps(vec![
//!     Step::put(1, "k", "v1").via("n1"),
//!     Step::wait_idle(),
//!     Step::get(2, "k").via("n3"),
//!     Step::wait_idle(),
//!     Step::check(Check::Values { client: 2, key: "k".into(), expect: vec!["v1".into()] }),
//! ]);
//! assert_eq!(s.nodes().len(), 3);
//! ```
//!
//! Client operations are queued on a client host (`client` is its number: host `c<client>`) and
//! run one at a time per client, concurrently across clients; `Wait::Idle` waits for every
//! queue to drain. Faults apply at once. A background [`WorkloadSpec`] may run beside the steps.
//! At the end of every scenario the harness settles the cluster and runs the checker.

use std::fmt;

use dynakv_node::config::ConflictMode;

use crate::client::Level;
use crate::history::OpKind;
use crate::workload::WorkloadSpec;

/// Which context a write carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ctx {
    /// None: a blind write.
    Empty,
    /// The context of this client's last successful read of the key.
    LastRead,
    /// The context returned by this client's last successful write of the key.
    LastWrite,
}

/// How long to wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// This many milliseconds of simulated time.
    Ms(u64),
    /// Until every client's queue is empty and no operation is in flight.
    Idle,
}

/// A check made at that point of the scenario (the invariant checker runs at the end anyway).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// The client's last operation succeeded.
    LastOk { client: usize },
    /// The client's last operation failed (any error).
    LastFailed { client: usize },
    /// The client's last read of `key` returned exactly these values (in any order).
    Values {
        client: usize,
        key: String,
        expect: Vec<String>,
    },
    /// The client's last read of `key` returned this many siblings.
    SiblingCount {
        client: usize,
        key: String,
        count: usize,
    },
    /// Every replica of `key` holds the same state now.
    ReplicasEqual { key: String },
    /// `node`'s storage holds exactly these live values for `key` now.
    NodeHas {
        node: String,
        key: String,
        values: Vec<String>,
    },
    /// `node`'s storage holds no key at all now (a drained or left node).
    NodeEmpty { node: String },
    /// `observer`'s last `Admin.ClusterStatus` shows `member` with this lifecycle ("joining",
    /// "normal", "leaving", "left", "removed") and, if given, this weight.
    Member {
        observer: String,
        member: String,
        lifecycle: String,
        weight: Option<u32>,
    },
}

/// What a scenario expects of an admin request's answer (checked when it arrives).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Accepted (changed or an idempotent repeat).
    Ok,
    /// Refused: `FAILED_PRECONDITION` or `INVALID_ARGUMENT` (nothing changed).
    Refused,
    /// Either; the answer is only recorded (the nemesis, which cannot know).
    Any,
}

/// A membership change an admin asks for, through the real `Admin` gRPC service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminKind {
    /// `Admin.SetWeight`: the member's target weight (a join ramp, a weight change).
    SetWeight { node: String, weight: u32 },
    /// `Admin.Leave`: drain the member to weight 0, then `left`.
    Leave { node: String },
    /// `Admin.Remove`: forget a member that is gone for good. Once accepted, the harness never
    /// starts the node again and leaves its disk out of the final checks (it is gone).
    Remove { node: String },
}

impl AdminKind {
    /// The member the request concerns.
    pub fn node(&self) -> &str {
        match self {
            AdminKind::SetWeight { node, .. }
            | AdminKind::Leave { node }
            | AdminKind::Remove { node } => node,
        }
    }
}

impl fmt::Display for AdminKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminKind::SetWeight { node, weight } => write!(f, "SetWeight({node}, {weight})"),
            AdminKind::Leave { node } => write!(f, "Leave({node})"),
            AdminKind::Remove { node } => write!(f, "Remove({node})"),
        }
    }
}

/// An admin request of a scenario: sent by the admin host (`admin`) with the real tonic
/// `AdminClient`, concurrently with any other; retried while the answer is `UNAVAILABLE` or
/// `DEADLINE_EXCEEDED` (as the CLI and the operator do), for at most
/// [`crate::client::ADMIN_RETRY_MS`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminOp {
    pub kind: AdminKind,
    /// The node to send to; `None`: the member concerned (for a removal: the first node).
    pub via: Option<String>,
    pub expect: Expect,
}

/// One step of a scenario.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// A member of the cluster. Membership is static until gossip lands: every `AddNode` must
    /// come before any other step (the harness refuses a later one).
    AddNode(String),
    /// A spare: a node host that is not started with the cluster and is in no member list.
    /// [`Step::Join`] starts it; it then joins through the members as seeds, at weight 0.
    /// Like `AddNode`, every `AddSpare` comes before any other step.
    AddSpare(String),
    /// Starts a spare for the first time: its configuration names every `AddNode` member as a
    /// seed (`seeds`, not `members`), so it joins the running cluster at weight 0; with
    /// `weight`, it is configured with that weight and ramps itself to it through a ring change.
    Join {
        node: String,
        weight: Option<u32>,
    },
    /// A membership change through the `Admin` service (see [`AdminOp`]).
    Admin(AdminOp),
    /// Waits until `observer`'s `ClusterStatus` shows a ring change under way in `phase`
    /// ("announced", "streaming", "switching", "retiring") with at least `keys_done` keys
    /// pulled; a violation if not seen within `within_ms`. Used to strike in the middle of a
    /// handoff (tune it slow with [`Scenario::with_slow_handoff`]).
    AwaitPhase {
        observer: String,
        phase: String,
        keys_done: u64,
        within_ms: u64,
        /// A later phase, or the change gone (committed) after some phase was seen, does too:
        /// the last phases can pass between two looks.
        or_later: bool,
    },
    /// Crashes the node a range is being pulled from right now: the source of a transfer that
    /// is still streaming, as the last `ClusterStatus` of a running node reports it (the
    /// harness logs which node that was), waiting up to 10 s for one to show. An error if
    /// none does.
    CrashSender,
    /// Restarts every crashed node (not those removed for good).
    RestartCrashed,
    /// Waits until the ring is settled: every running node's `Admin.ClusterStatus` (polled by
    /// the watcher host) says no change is active or queued, every member's weight equals its
    /// target and none is leaving, and all of them agree on the ring version and on every
    /// member's weight, target and lifecycle, for a whole second, in answers taken after the
    /// wait began and after every admin request had been answered. A violation, with what the
    /// nodes said last, if that takes longer than `within_ms`.
    AwaitRing {
        within_ms: u64,
    },
    /// Power loss: the host stops, and what its storage had not synced is gone.
    Crash(String),
    /// Starts a crashed node again on the same storage; reboots (crash + start) a running one.
    Restart(String),
    /// Freezes every link of the node (peers and clients): messages wait until `Heal`.
    Pause(String),
    /// Two nodes can talk iff some group holds both; a node in no group is isolated.
    /// Replaces any earlier partition.
    Partition(Vec<Vec<String>>),
    /// Ends partitions and pauses (held messages are delivered), message loss and delay.
    /// Crashed nodes stay down until `Restart`.
    Heal,
    /// Message latency up to `max_ms` on every link.
    Delay {
        max_ms: u64,
    },
    /// Each message breaks its link with probability `rate` (turmoil's TCP then loses the
    /// connection; the node reconnects).
    Loss {
        rate: f64,
    },
    /// From now on every storage commit of the node takes `commit_ms` of simulated time (a slow
    /// disk; the default is `harness::COMMIT_LATENCY_MS`).
    DiskLatency {
        node: String,
        commit_ms: u64,
    },
    /// A client operation (see [`Step::put`], [`Step::get`], [`Step::delete`]).
    Op(ClientOp),
    /// Waits until `observer`'s gossip (its `Admin.ClusterStatus`, polled by a watcher host)
    /// holds `member` in `state` ("alive", "suspect", "down"); a violation if that takes longer
    /// than `within_ms`. The states seen meanwhile are reported.
    AwaitMember {
        observer: String,
        member: String,
        state: String,
        within_ms: u64,
    },
    Wait(Wait),
    Assert(Check),
}

/// A client operation of a scenario.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientOp {
    pub client: usize,
    pub kind: OpKind,
    pub key: String,
    /// The node to send to; `None`: the first node.
    pub via: Option<String>,
    pub level: Level,
    pub strict: bool,
    pub ctx: Ctx,
}

impl Step {
    fn op(client: usize, kind: OpKind, key: &str, ctx: Ctx) -> Step {
        Step::Op(ClientOp {
            client,
            kind,
            key: key.to_string(),
            via: None,
            level: Level::Quorum,
            strict: false,
            ctx,
        })
    }

    /// A put with the context of the client's last read of the key (empty if none), W=QUORUM.
    pub fn put(client: usize, key: &str, value: &str) -> Step {
        Step::op(
            client,
            OpKind::Put {
                value: value.as_bytes().to_vec(),
            },
            key,
            Ctx::LastRead,
        )
    }

    /// A read, R=QUORUM.
    pub fn get(client: usize, key: &str) -> Step {
        Step::op(client, OpKind::Get, key, Ctx::Empty)
    }

    /// A delete with the context of the client's last read of the key, W=QUORUM.
    pub fn delete(client: usize, key: &str) -> Step {
        Step::op(client, OpKind::Delete, key, Ctx::LastRead)
    }

    pub fn wait_ms(ms: u64) -> Step {
        Step::Wait(Wait::Ms(ms))
    }

    pub fn wait_idle() -> Step {
        Step::Wait(Wait::Idle)
    }

    pub fn await_member(observer: &str, member: &str, state: &str, within_ms: u64) -> Step {
        Step::AwaitMember {
            observer: observer.to_string(),
            member: member.to_string(),
            state: state.to_string(),
            within_ms,
        }
    }

    /// Starts spare `node`: it joins at weight 0.
    pub fn join(node: &str) -> Step {
        Step::Join {
            node: node.to_string(),
            weight: None,
        }
    }

    /// Starts spare `node` configured with `weight`: it joins at 0 and ramps itself there.
    pub fn join_at(node: &str, weight: u32) -> Step {
        Step::Join {
            node: node.to_string(),
            weight: Some(weight),
        }
    }

    fn admin(kind: AdminKind) -> Step {
        Step::Admin(AdminOp {
            kind,
            via: None,
            expect: Expect::Ok,
        })
    }

    /// `Admin.SetWeight`, expected to be accepted.
    pub fn set_weight(node: &str, weight: u32) -> Step {
        Step::admin(AdminKind::SetWeight {
            node: node.to_string(),
            weight,
        })
    }

    /// `Admin.Leave`, expected to be accepted.
    pub fn leave(node: &str) -> Step {
        Step::admin(AdminKind::Leave {
            node: node.to_string(),
        })
    }

    /// `Admin.Remove`, expected to be accepted.
    pub fn remove(node: &str) -> Step {
        Step::admin(AdminKind::Remove {
            node: node.to_string(),
        })
    }

    pub fn await_ring(within_ms: u64) -> Step {
        Step::AwaitRing { within_ms }
    }

    /// Waits until `observer` sees the change under way in `phase` with `keys_done` keys pulled.
    pub fn await_phase(observer: &str, phase: &str, keys_done: u64, within_ms: u64) -> Step {
        Step::AwaitPhase {
            observer: observer.to_string(),
            phase: phase.to_string(),
            keys_done,
            within_ms,
            or_later: false,
        }
    }

    /// Waits until `observer` sees the change under way in `phase` or a later one, or sees it
    /// gone after some phase of it.
    pub fn await_phase_or_later(observer: &str, phase: &str, within_ms: u64) -> Step {
        Step::AwaitPhase {
            observer: observer.to_string(),
            phase: phase.to_string(),
            keys_done: 0,
            within_ms,
            or_later: true,
        }
    }

    /// What the admin request's answer should be.
    pub fn expect(self, expect: Expect) -> Step {
        match self {
            Step::Admin(mut op) => {
                op.expect = expect;
                Step::Admin(op)
            }
            other => other,
        }
    }

    pub fn check(check: Check) -> Step {
        Step::Assert(check)
    }

    pub fn crash(node: &str) -> Step {
        Step::Crash(node.to_string())
    }

    pub fn restart(node: &str) -> Step {
        Step::Restart(node.to_string())
    }

    pub fn pause(node: &str) -> Step {
        Step::Pause(node.to_string())
    }

    pub fn partition(groups: &[&[&str]]) -> Step {
        Step::Partition(
            groups
                .iter()
                .map(|g| g.iter().map(|n| n.to_string()).collect())
                .collect(),
        )
    }

    fn map_op(self, f: impl FnOnce(&mut ClientOp)) -> Step {
        match self {
            Step::Op(mut op) => {
                f(&mut op);
                Step::Op(op)
            }
            other => other,
        }
    }

    /// Sends the operation (or admin request) to `node`.
    pub fn via(self, node: &str) -> Step {
        match self {
            Step::Admin(mut op) => {
                op.via = Some(node.to_string());
                Step::Admin(op)
            }
            other => other.map_op(|op| op.via = Some(node.to_string())),
        }
    }

    /// R or W of the operation.
    pub fn level(self, level: Level) -> Step {
        self.map_op(|op| op.level = level)
    }

    /// Asks for a strict quorum (only the key's primary replicas count).
    pub fn strict(self) -> Step {
        self.map_op(|op| op.strict = true)
    }

    /// The context a write carries.
    pub fn ctx(self, ctx: Ctx) -> Step {
        self.map_op(|op| op.ctx = ctx)
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::AddNode(n) => write!(f, "AddNode({n})"),
            Step::AddSpare(n) => write!(f, "AddSpare({n})"),
            Step::Join { node, weight } => match weight {
                Some(w) => write!(f, "Join({node}, configured weight {w})"),
                None => write!(f, "Join({node})"),
            },
            Step::Admin(op) => {
                write!(f, "Admin {}", op.kind)?;
                if let Some(via) = &op.via {
                    write!(f, " via {via}")?;
                }
                match op.expect {
                    Expect::Ok => Ok(()),
                    Expect::Refused => write!(f, " (expect refused)"),
                    Expect::Any => write!(f, " (any answer)"),
                }
            }
            Step::AwaitRing { within_ms } => write!(f, "AwaitRing(within {within_ms}ms)"),
            Step::AwaitPhase {
                observer,
                phase,
                keys_done,
                within_ms,
                or_later,
            } => write!(
                f,
                "AwaitPhase({observer} sees a change {phase}{} with >= {keys_done} keys pulled, \
                 within {within_ms}ms)",
                if *or_later { " or later" } else { "" }
            ),
            Step::CrashSender => write!(f, "CrashSender"),
            Step::RestartCrashed => write!(f, "RestartCrashed"),
            Step::Crash(n) => write!(f, "Crash({n})"),
            Step::Restart(n) => write!(f, "Restart({n})"),
            Step::Pause(n) => write!(f, "Pause({n})"),
            Step::Partition(groups) => {
                let g: Vec<String> = groups
                    .iter()
                    .map(|g| format!("[{}]", g.join(",")))
                    .collect();
                write!(f, "Partition({})", g.join(" "))
            }
            Step::Heal => write!(f, "Heal"),
            Step::Delay { max_ms } => write!(f, "Delay(max {max_ms}ms)"),
            Step::Loss { rate } => write!(f, "Loss({rate})"),
            Step::Op(op) => {
                let what = match &op.kind {
                    OpKind::Get => format!("Get({})", op.key),
                    OpKind::Put { value } => {
                        format!("Put({}={})", op.key, String::from_utf8_lossy(value))
                    }
                    OpKind::Delete => format!("Delete({})", op.key),
                };
                write!(
                    f,
                    "c{}: {what} via {} {:?}{} ctx={:?}",
                    op.client,
                    op.via.as_deref().unwrap_or("n1"),
                    op.level,
                    if op.strict { " strict" } else { "" },
                    op.ctx
                )
            }
            Step::AwaitMember {
                observer,
                member,
                state,
                within_ms,
            } => write!(
                f,
                "AwaitMember({observer} sees {member} {state}, within {within_ms}ms)"
            ),
            Step::DiskLatency { node, commit_ms } => {
                write!(f, "DiskLatency({node}: {commit_ms}ms per commit)")
            }
            Step::Wait(Wait::Ms(ms)) => write!(f, "Wait({ms}ms)"),
            Step::Wait(Wait::Idle) => write!(f, "Wait(idle)"),
            Step::Assert(c) => write!(f, "Assert({c:?})"),
        }
    }
}

/// Handoff settings of the simulated nodes (`handoff.*` in the node's configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandoffTuning {
    pub max_bytes_per_sec: u64,
    pub page_entries: u32,
}

/// A whole scenario: the cluster, the steps, and an optional background workload.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: String,
    /// Replication factor.
    pub n: u32,
    pub conflict: ConflictMode,
    pub workload: Option<WorkloadSpec>,
    /// Nodes store no hints (`hints.max_per_target = 0`): only read repair and anti-entropy
    /// repair a replica that missed writes.
    pub no_hints: bool,
    /// Handoff rate limit and page size of every node (`None`: the node's defaults, which move
    /// a simulated cluster's few keys in an instant).
    pub handoff: Option<HandoffTuning>,
    /// Nodes started with `replication.write_ids: false`: to their peers they look like nodes
    /// from before write ids, so no node uses them (forwards are not hedged or retried).
    pub without_write_ids: Vec<String>,
    pub steps: Vec<Step>,
}

impl Scenario {
    /// A `siblings`-mode cluster of `nodes` nodes (n1..), N=3 (or fewer nodes).
    pub fn siblings(name: &str, nodes: usize) -> Scenario {
        Scenario::new(name, nodes, ConflictMode::Siblings)
    }

    /// An `lww`-mode cluster.
    pub fn lww(name: &str, nodes: usize) -> Scenario {
        Scenario::new(name, nodes, ConflictMode::Lww)
    }

    fn new(name: &str, nodes: usize, conflict: ConflictMode) -> Scenario {
        Scenario {
            name: name.to_string(),
            n: (nodes as u32).min(3),
            conflict,
            workload: None,
            no_hints: false,
            handoff: None,
            without_write_ids: Vec::new(),
            steps: (1..=nodes)
                .map(|i| Step::AddNode(format!("n{i}")))
                .collect(),
        }
    }

    /// Appends steps.
    pub fn steps(mut self, steps: Vec<Step>) -> Scenario {
        self.steps.extend(steps);
        self
    }

    /// A slow handoff (1 KB per second, a few keys per page), so that a ring change spends
    /// seconds streaming, page by page, and a fault can strike in the middle.
    pub fn with_slow_handoff(mut self) -> Scenario {
        self.handoff = Some(HandoffTuning {
            max_bytes_per_sec: 1_000,
            page_entries: 4,
        });
        self
    }

    /// See [`Scenario::without_write_ids`].
    pub fn without_write_ids_on(mut self, node: &str) -> Scenario {
        self.without_write_ids.push(node.to_string());
        self
    }

    /// See [`Scenario::no_hints`].
    pub fn without_hints(mut self) -> Scenario {
        self.no_hints = true;
        self
    }

    /// Runs a workload beside the steps (from the start until the last step).
    pub fn with_workload(mut self, workload: WorkloadSpec) -> Scenario {
        self.workload = Some(workload);
        self
    }

    /// The nodes its `AddNode` steps declare.
    pub fn nodes(&self) -> Vec<String> {
        self.steps
            .iter()
            .filter_map(|s| match s {
                Step::AddNode(n) => Some(n.clone()),
                _ => None,
            })
            .collect()
    }

    /// Adds `count` spares after the members (`n<k+1>`, ...): see [`Step::AddSpare`].
    pub fn with_spares(mut self, count: usize) -> Scenario {
        let declared = self
            .steps
            .iter()
            .take_while(|s| matches!(s, Step::AddNode(_) | Step::AddSpare(_)))
            .count();
        let first = declared + 1;
        for (i, k) in (first..first + count).enumerate() {
            self.steps
                .insert(declared + i, Step::AddSpare(format!("n{k}")));
        }
        self
    }

    /// The spares its `AddSpare` steps declare.
    pub fn spares(&self) -> Vec<String> {
        self.steps
            .iter()
            .filter_map(|s| match s {
                Step::AddSpare(n) => Some(n.clone()),
                _ => None,
            })
            .collect()
    }

    /// Whether it changes the membership (spares, admin requests, ring waits).
    pub fn changes_membership(&self) -> bool {
        self.steps.iter().any(|s| {
            matches!(
                s,
                Step::AddSpare(_) | Step::Join { .. } | Step::Admin(_) | Step::AwaitRing { .. }
            )
        })
    }

    /// Whether it waits on gossip's view (then a watcher host polls every node's status).
    pub fn watches_members(&self) -> bool {
        self.changes_membership()
            || self.steps.iter().any(|s| {
                matches!(
                    s,
                    Step::AwaitMember { .. } | Step::Assert(Check::Member { .. })
                )
            })
    }

    /// The command clients its operations use.
    pub fn clients(&self) -> Vec<usize> {
        let mut c: Vec<usize> = self
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Op(op) => Some(op.client),
                _ => None,
            })
            .collect();
        c.sort_unstable();
        c.dedup();
        c
    }
}
