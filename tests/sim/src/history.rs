//! The history of one simulation: every client operation with its invocation, completion,
//! inputs (context, quorum) and result, as the checker and the failure report read it.

use std::fmt;

use dynakv_core::NodeId;
use dynakv_core::dvvset::VersionVector;

/// What an operation was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpKind {
    Get,
    Put { value: Vec<u8> },
    Delete,
}

impl OpKind {
    pub fn is_write(&self) -> bool {
        !matches!(self, OpKind::Get)
    }
}

/// A dot: the event `(coordinator, counter)` a write created.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dot {
    pub node: String,
    pub counter: u64,
}

impl Dot {
    /// Whether the version vector includes this event.
    pub fn covered_by(&self, vv: &VersionVector) -> bool {
        match NodeId::new(&self.node) {
            Ok(id) => vv.get(&id) >= self.counter,
            Err(_) => false,
        }
    }
}

impl fmt::Display for Dot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.node, self.counter)
    }
}

/// How an operation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpResult {
    /// Not answered yet (the run ended first, or the client host was busy).
    Pending,
    /// Acknowledged.
    Ok {
        /// The context the node answered (a read's merge, a write's new clock's join).
        ctx_out: VersionVector,
        /// The node that coordinated (after forwarding).
        coordinator: String,
        /// Live values a read returned, with their packed HLC timestamps.
        values: Vec<(Vec<u8>, u64)>,
        /// Whether any fallback replica counted toward the quorum (sloppy quorum used).
        fallback: bool,
        /// The replicas the receipt says acknowledged, with the primary a fallback stood for.
        acked_by: Vec<(String, Option<String>)>,
    },
    /// Refused with nothing changed (`INVALID_ARGUMENT`, `RESOURCE_EXHAUSTED`).
    Rejected { code: String, message: String },
    /// Failed or timed out: a write may or may not have taken effect.
    Indeterminate { code: String, message: String },
}

/// One client operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    pub id: usize,
    pub client: String,
    pub kind: OpKind,
    pub key: String,
    /// The node the client sent the request to.
    pub target: String,
    /// R for a read, W for a write, resolved against N.
    pub quorum: u32,
    /// Strict quorum asked for (`sloppy = false`).
    pub strict: bool,
    /// The causal context the write carried (as the client meant it).
    pub ctx_in: VersionVector,
    /// The operation whose answer the context came from (a read, or a write's returned context).
    pub ctx_source: Option<usize>,
    /// A workload's note, e.g. the cart item this write adds.
    pub note: Option<String>,
    /// The id the coordinator's dots carry (its node id plus a per-data-directory suffix), read
    /// from its storage when the answer arrived.
    pub dot_actor: Option<String>,
    /// For an acknowledged write: replicas named in the receipt that did not hold the write
    /// when the answer arrived (see [`crate::oracle::audit_ack`]).
    pub unbacked_acks: Vec<String>,
    /// For an acknowledged write: replicas that acknowledged for a ring that retired before the
    /// answer arrived, and had dropped the key by then (see [`crate::oracle::AckAudit`]).
    pub retired_acks: Vec<String>,
    pub invoked_ms: u64,
    pub completed_ms: Option<u64>,
    pub result: OpResult,
}

impl Op {
    pub fn is_ok(&self) -> bool {
        matches!(self.result, OpResult::Ok { .. })
    }

    /// Acknowledged writes and indeterminate ones may have taken effect.
    pub fn may_have_applied(&self) -> bool {
        self.kind.is_write()
            && matches!(
                self.result,
                OpResult::Ok { .. } | OpResult::Indeterminate { .. } | OpResult::Pending
            )
    }

    /// The dot an acknowledged write created: the counter of the coordinator's dot id in the
    /// returned context. Without a known dot id: the one entry of the coordinator (`<node>` or
    /// `<node>.<suffix>`) that the write advanced past its context.
    pub fn dot(&self) -> Option<Dot> {
        let (
            OpKind::Put { .. } | OpKind::Delete,
            OpResult::Ok {
                ctx_out,
                coordinator,
                ..
            },
        ) = (&self.kind, &self.result)
        else {
            return None;
        };
        if let Some(actor) = &self.dot_actor {
            let counter = ctx_out.get(&NodeId::new(actor).ok()?);
            if counter > 0 {
                return Some(Dot {
                    node: actor.clone(),
                    counter,
                });
            }
        }
        let prefix = format!("{coordinator}.");
        let mut advanced = ctx_out.iter().filter(|(id, n)| {
            (id.as_str() == coordinator || id.as_str().starts_with(&prefix))
                && *n > self.ctx_in.get(id)
        });
        match (advanced.next(), advanced.next()) {
            (Some((id, counter)), None) => Some(Dot {
                node: id.to_string(),
                counter,
            }),
            _ => None,
        }
    }

    /// Values a successful read returned.
    pub fn read_values(&self) -> Option<&[(Vec<u8>, u64)]> {
        match (&self.kind, &self.result) {
            (OpKind::Get, OpResult::Ok { values, .. }) => Some(values),
            _ => None,
        }
    }

    pub fn ctx_out(&self) -> Option<&VersionVector> {
        match &self.result {
            OpResult::Ok { ctx_out, .. } => Some(ctx_out),
            _ => None,
        }
    }

    pub fn used_fallback(&self) -> bool {
        matches!(self.result, OpResult::Ok { fallback: true, .. })
    }
}

pub fn show_vv(vv: &VersionVector) -> String {
    let parts: Vec<String> = vv.iter().map(|(id, n)| format!("{id}:{n}")).collect();
    format!("[{}]", parts.join(" "))
}

pub fn show_bytes(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    if s.len() > 60 {
        format!("{}…({} bytes)", &s[..60], b.len())
    } else {
        s.into_owned()
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let done = match self.completed_ms {
            Some(t) => format!("{t}"),
            None => "-".into(),
        };
        write!(
            f,
            "#{:<5} {:>6}..{:<6}ms {:<7} ",
            self.id, self.invoked_ms, done, self.client
        )?;
        let q = if self.kind.is_write() { 'w' } else { 'r' };
        let mode = if self.strict { "strict" } else { "sloppy" };
        match &self.kind {
            OpKind::Get => write!(f, "get {}", self.key)?,
            OpKind::Put { value } => write!(f, "put {}={}", self.key, show_bytes(value))?,
            OpKind::Delete => write!(f, "delete {}", self.key)?,
        }
        write!(f, " via {} {q}={} {mode}", self.target, self.quorum)?;
        if self.kind.is_write() {
            write!(f, " ctx={}", show_vv(&self.ctx_in))?;
            if let Some(src) = self.ctx_source {
                write!(f, "(from #{src})")?;
            }
        }
        match &self.result {
            OpResult::Pending => write!(f, " -> pending"),
            OpResult::Ok {
                ctx_out,
                coordinator,
                values,
                fallback,
                acked_by,
            } => {
                write!(f, " -> ok coord={coordinator}")?;
                let acks: Vec<String> = acked_by
                    .iter()
                    .map(|(node, hint_for)| match hint_for {
                        Some(p) => format!("{node} for {p}"),
                        None => node.clone(),
                    })
                    .collect();
                write!(f, " acks=[{}]", acks.join(" "))?;
                if let Some(dot) = self.dot() {
                    write!(f, " dot={dot}")?;
                }
                if self.kind == OpKind::Get {
                    let vals: Vec<String> = values.iter().map(|(v, _)| show_bytes(v)).collect();
                    write!(f, " values={{{}}}", vals.join(", "))?;
                }
                write!(f, " ctx={}", show_vv(ctx_out))?;
                if *fallback {
                    write!(f, " (fallbacks counted)")?;
                }
                Ok(())
            }
            OpResult::Rejected { code, message } => write!(f, " -> rejected {code}: {message}"),
            OpResult::Indeterminate { code, message } => {
                write!(f, " -> indeterminate {code}: {message}")
            }
        }
    }
}

/// Every operation of a run, in invocation order (`ops[i].id == i`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct History {
    pub ops: Vec<Op>,
}

impl History {
    pub fn get(&self, id: usize) -> &Op {
        &self.ops[id]
    }

    /// Every key any operation touched, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.ops.iter().map(|o| o.key.clone()).collect();
        keys.sort();
        keys.dedup();
        keys
    }

    pub fn on_key<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a Op> + 'a {
        self.ops.iter().filter(move |o| o.key == key)
    }
}
