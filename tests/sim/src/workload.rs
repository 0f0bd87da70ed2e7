//! Workloads: client hosts that keep issuing operations while faults happen.
//!
//! - **Shopping cart** (`cart-*` keys): read the cart, merge the siblings (union of items), add one
//!   new item, write with the read's context. Every acknowledged add must be in the final cart.
//! - **Registers** (`reg-*` keys): read-then-write with the read's context, blind writes (empty
//!   context, so siblings appear in `siblings` mode), plain reads; R and W vary among ONE,
//!   QUORUM and ALL, strict or sloppy.
//! - **Deletes** (`del-*` keys): read, then delete with the read's context or write a new value;
//!   no deleted value may come back.
//! - **Fill** (`fill-*` keys): new keys written blind, earlier ones read back, R and W drawn
//!   from ONE, QUORUM and ALL: many keys, so that every range a ring change moves holds data.
//!
//! Every value a workload writes is unique (`<key>=<client>.<seq>`), so the checker can tell which
//! write a value came from. Each client draws from its own RNG, seeded from the run's seed.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::rc::Rc;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::client::{ClientCore, HeldContext, Level, Request, Shared};
use crate::history::{OpKind, OpResult};

/// How many keys and clients of each workload a run has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadSpec {
    pub carts: usize,
    pub cart_clients: usize,
    pub registers: usize,
    pub register_clients: usize,
    pub deletes: usize,
    pub delete_clients: usize,
    /// Clients that keep writing new keys (`fill-<client>-<seq>`, blind, W drawn from ONE,
    /// QUORUM, ALL) and reading back earlier ones: many keys, so that every range a ring change
    /// moves holds data.
    pub fill_clients: usize,
    /// Pause between two iterations of a client, drawn from `think_ms.0..=think_ms.1`.
    pub think_ms: (u64, u64),
}

impl WorkloadSpec {
    /// Carts, registers and deletes together.
    pub fn mixed() -> WorkloadSpec {
        WorkloadSpec {
            carts: 2,
            cart_clients: 3,
            registers: 3,
            register_clients: 2,
            deletes: 2,
            delete_clients: 2,
            fill_clients: 0,
            think_ms: (10, 60),
        }
    }

    /// [`WorkloadSpec::mixed`] plus a fill client: what runs beside ring changes.
    pub fn membership() -> WorkloadSpec {
        WorkloadSpec {
            fill_clients: 1,
            ..WorkloadSpec::mixed()
        }
    }

    /// Only fill clients.
    pub fn fill(clients: usize) -> WorkloadSpec {
        WorkloadSpec {
            carts: 0,
            cart_clients: 0,
            registers: 0,
            register_clients: 0,
            deletes: 0,
            delete_clients: 0,
            fill_clients: clients,
            think_ms: (10, 60),
        }
    }

    /// Only carts.
    pub fn carts(keys: usize, clients: usize) -> WorkloadSpec {
        WorkloadSpec {
            carts: keys,
            cart_clients: clients,
            registers: 0,
            register_clients: 0,
            deletes: 0,
            delete_clients: 0,
            fill_clients: 0,
            think_ms: (10, 60),
        }
    }

    /// Registers and deletes (what `lww` mode is for; carts need siblings).
    pub fn registers_and_deletes() -> WorkloadSpec {
        WorkloadSpec {
            carts: 0,
            cart_clients: 0,
            registers: 3,
            register_clients: 3,
            deletes: 2,
            delete_clients: 2,
            fill_clients: 0,
            think_ms: (10, 60),
        }
    }
}

/// Which loop a workload client runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Cart,
    Register,
    Delete,
    Fill,
}

impl Kind {
    pub fn prefix(self) -> &'static str {
        match self {
            Kind::Cart => "cart",
            Kind::Register => "reg",
            Kind::Delete => "del",
            Kind::Fill => "fill",
        }
    }
}

/// The clients a spec asks for: (name, kind, keys).
pub fn clients(spec: &WorkloadSpec) -> Vec<(String, Kind, Vec<String>)> {
    let mut out = Vec::new();
    for (kind, keys, clients) in [
        (Kind::Cart, spec.carts, spec.cart_clients),
        (Kind::Register, spec.registers, spec.register_clients),
        (Kind::Delete, spec.deletes, spec.delete_clients),
    ] {
        if keys == 0 {
            continue;
        }
        let keys: Vec<String> = (1..=keys)
            .map(|k| format!("{}-{k}", kind.prefix()))
            .collect();
        for c in 1..=clients {
            out.push((format!("{}{c}", kind.prefix()), kind, keys.clone()));
        }
    }
    // Fill clients make their keys as they go.
    for c in 1..=spec.fill_clients {
        out.push((format!("fill{c}"), Kind::Fill, Vec::new()));
    }
    out
}

/// Items of a cart value (`a,b,c`).
pub fn cart_items(value: &[u8]) -> BTreeSet<String> {
    String::from_utf8_lossy(value)
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn level(rng: &mut SmallRng) -> Level {
    match rng.random_range(0..10) {
        0 | 1 => Level::One,
        2 | 3 => Level::All,
        _ => Level::Quorum,
    }
}

/// The state a workload client shares with the driver.
#[derive(Default)]
pub struct Control {
    /// Set by the driver: finish the current iteration and stop.
    pub stop: Cell<bool>,
    /// Set by the client once it has stopped.
    pub done: Cell<bool>,
}

/// One workload client: which loop, on which keys, against which nodes, from which seed.
#[derive(Clone, Debug)]
pub struct ClientSpec {
    pub name: String,
    pub kind: Kind,
    pub keys: Vec<String>,
    pub nodes: Vec<String>,
    pub seed: u64,
    pub think_ms: (u64, u64),
}

/// The body of a workload client host.
pub async fn run(spec: ClientSpec, shared: Rc<Shared>, control: Rc<Control>) -> turmoil::Result {
    let mut w = Worker {
        core: ClientCore::new(&spec.name, &spec.nodes, shared),
        rng: SmallRng::seed_from_u64(spec.seed),
    };
    let mut seq = 0u64;
    let mut filled: Vec<String> = Vec::new();
    while !control.stop.get() {
        let think = w.rng.random_range(spec.think_ms.0..=spec.think_ms.1);
        tokio::time::sleep(Duration::from_millis(think)).await;
        if control.stop.get() {
            break;
        }
        seq += 1;
        if spec.kind == Kind::Fill {
            w.fill_step(&mut filled, seq).await;
            continue;
        }
        let key = spec.keys[w.rng.random_range(0..spec.keys.len())].clone();
        match spec.kind {
            Kind::Cart => w.cart_step(&key, seq).await,
            Kind::Register => w.register_step(&key, seq).await,
            Kind::Delete => w.delete_step(&key, seq).await,
            Kind::Fill => {}
        }
    }
    control.done.set(true);
    Ok(())
}

struct Worker {
    core: ClientCore,
    rng: SmallRng,
}

impl Worker {
    /// A node to send to, among the current [`Shared::targets`](crate::client::Shared::targets)
    /// (members and joined spares; not nodes removed for good).
    fn pick(&mut self) -> String {
        let targets = self.core.shared.targets.borrow();
        targets[self.rng.random_range(0..targets.len())].clone()
    }

    /// A read; returns the live values and the context if it succeeded.
    async fn read(&mut self, key: &str, level: Level) -> Option<(Vec<Vec<u8>>, HeldContext)> {
        let strict = self.rng.random_bool(0.5);
        let target = self.pick();
        let id = self
            .core
            .execute(Request {
                kind: OpKind::Get,
                key: key.to_string(),
                target,
                level,
                strict,
                ctx: HeldContext::default(),
                note: None,
            })
            .await;
        let values = {
            let h = self.core.shared.history.borrow();
            match &h.get(id).result {
                OpResult::Ok { values, .. } => values.iter().map(|(v, _)| v.clone()).collect(),
                _ => return None,
            }
        };
        Some((
            values,
            self.core.last_read.get(key).cloned().unwrap_or_default(),
        ))
    }

    /// A put (`Some(value)`) or a delete (`None`).
    async fn write(
        &mut self,
        key: &str,
        value: Option<Vec<u8>>,
        ctx: HeldContext,
        level: Level,
        note: Option<String>,
    ) {
        let strict = self.rng.random_bool(0.5);
        let target = self.pick();
        let kind = match value {
            Some(value) => OpKind::Put { value },
            None => OpKind::Delete,
        };
        self.core
            .execute(Request {
                kind,
                key: key.to_string(),
                target,
                level,
                strict,
                ctx,
                note,
            })
            .await;
    }

    async fn cart_step(&mut self, key: &str, seq: u64) {
        let Some((values, ctx)) = self.read(key, Level::Quorum).await else {
            return;
        };
        let mut items: BTreeSet<String> = values.iter().flat_map(|v| cart_items(v)).collect();
        let item = format!("{}.{seq}", self.core.name);
        items.insert(item.clone());
        let value = items.into_iter().collect::<Vec<_>>().join(",").into_bytes();
        self.write(key, Some(value), ctx, Level::Quorum, Some(item))
            .await;
    }

    async fn register_step(&mut self, key: &str, seq: u64) {
        let value = format!("{}.{seq}", self.core.name).into_bytes();
        match self.rng.random_range(0..10) {
            0 | 1 => {
                let w = level(&mut self.rng);
                self.write(key, Some(value), HeldContext::default(), w, None)
                    .await;
            }
            2 | 3 => {
                let r = level(&mut self.rng);
                self.read(key, r).await;
            }
            _ => {
                let r = level(&mut self.rng);
                let Some((_, ctx)) = self.read(key, r).await else {
                    return;
                };
                let w = level(&mut self.rng);
                self.write(key, Some(value), ctx, w, None).await;
            }
        }
    }

    /// A new key (blind write), or a read of an earlier one (most often a recent one).
    async fn fill_step(&mut self, filled: &mut Vec<String>, seq: u64) {
        if filled.is_empty() || self.rng.random_bool(0.5) {
            let key = format!("fill-{}-{seq}", self.core.name);
            let value = format!("{}.{seq}", self.core.name).into_bytes();
            let w = level(&mut self.rng);
            self.write(&key, Some(value), HeldContext::default(), w, None)
                .await;
            filled.push(key);
        } else {
            let back = self.rng.random_range(0..filled.len().min(20));
            let key = filled[filled.len() - 1 - back].clone();
            let r = level(&mut self.rng);
            self.read(&key, r).await;
        }
    }

    async fn delete_step(&mut self, key: &str, seq: u64) {
        let Some((values, ctx)) = self.read(key, Level::Quorum).await else {
            return;
        };
        if !values.is_empty() && self.rng.random_bool(0.6) {
            self.write(key, None, ctx, Level::Quorum, None).await;
        } else {
            let value = format!("{}.{seq}", self.core.name).into_bytes();
            self.write(key, Some(value), ctx, Level::Quorum, None).await;
        }
    }
}
