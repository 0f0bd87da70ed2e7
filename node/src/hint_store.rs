//! The hints table (DESIGN.md section 6): hints a fallback holds for unreachable primaries,
//! bounded per target (count, bytes), with the queue depths kept in memory. Data only: the
//! delivery task is `hints.rs`.
//!
//! Storage layout: key = [target id length: u8][target id][stored key];
//! value = [created at, Unix ms: u64 big-endian][encoded clock].

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex};

use dynakv_core::NodeId;
use dynakv_core::dvvset::Clock;

use crate::metrics::Metrics;
use crate::storage::{ScanLimit, StorageError, Store, Table};

pub use crate::config::HintsConfig;

/// A hint was not stored. Nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum HintError {
    #[error("hint queue for {target} is full ({count} hints, {bytes} bytes)")]
    Full {
        target: NodeId,
        count: u64,
        bytes: u64,
    },
    #[error("stored hint does not decode: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueDepth {
    pub count: u64,
    pub bytes: u64,
}

pub struct Hints {
    config: HintsConfig,
    depth: Arc<Mutex<BTreeMap<NodeId, QueueDepth>>>,
}

pub fn hint_key(target: &NodeId, stored_key: &[u8]) -> Vec<u8> {
    let t = target.as_str().as_bytes();
    let mut k = Vec::with_capacity(1 + t.len() + stored_key.len());
    k.push(t.len() as u8);
    k.extend_from_slice(t);
    k.extend_from_slice(stored_key);
    k
}

pub fn split_hint_key(k: &[u8]) -> Option<(&str, &[u8])> {
    let len = *k.first()? as usize;
    let target = std::str::from_utf8(k.get(1..1 + len)?).ok()?;
    Some((target, k.get(1 + len..)?))
}

pub fn split_value(v: &[u8]) -> Option<(u64, &[u8])> {
    let created = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    Some((created, &v[8..]))
}

impl Hints {
    /// Loads the queue depths from the hints table.
    pub fn open(config: HintsConfig, store: &Store) -> Result<Hints, StorageError> {
        let mut depth: BTreeMap<NodeId, QueueDepth> = BTreeMap::new();
        let mut from: Option<Vec<u8>> = None;
        loop {
            let lower = match &from {
                Some(k) => Bound::Excluded(k.as_slice()),
                None => Bound::Unbounded,
            };
            let page = store.scan(
                Table::Hints,
                lower,
                Bound::Unbounded,
                ScanLimit::entries(4096),
            )?;
            for (k, v) in &page.entries {
                if let Some(target) = split_hint_key(k).and_then(|(t, _)| NodeId::new(t).ok()) {
                    let d = depth.entry(target).or_default();
                    d.count += 1;
                    d.bytes += (k.len() + v.len()) as u64;
                }
            }
            match page.next {
                Some(n) => from = Some(n),
                None => break,
            }
        }
        Ok(Hints {
            config,
            depth: Arc::new(Mutex::new(depth)),
        })
    }

    pub fn depths(&self) -> Vec<(NodeId, QueueDepth)> {
        self.depth
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// The bound on hints per target (0: hints are disabled).
    pub fn max_per_target(&self) -> u64 {
        self.config.max_per_target
    }

    pub fn max_age_ms(&self) -> u64 {
        self.config.max_age_ms
    }

    pub fn delivery_interval_ms(&self) -> u64 {
        self.config.delivery_interval_ms
    }
}

impl Hints {
    /// Stores (merges) a hint for `target`, durably, created at `now_ms` (a merge keeps the
    /// first creation time). Fails with `HintError::Full` past the bounds; nothing changed then.
    #[allow(clippy::too_many_arguments)]
    pub async fn store(
        &self,
        store: &Store,
        metrics: &Metrics,
        now_ms: u64,
        lww: bool,
        target: NodeId,
        stored_key: &[u8],
        clock: Clock,
    ) -> Result<(), HintError> {
        let key = hint_key(&target, stored_key);
        let depth = self.depth.clone();
        let cfg = self.config.clone();
        let now = now_ms;
        let result = store
            .update(Table::Hints, key.clone(), move |current| {
                let (created, merged, old_len) = match current {
                    None => (now, clock, 0u64),
                    Some(v) => match split_value(v).map(|(c, b)| (c, Clock::decode(b))) {
                        Some((c, Ok(old))) => (c, old.sync(&clock), v.len() as u64),
                        _ => return (None, Err(HintError::Corrupt("bad hint value".into()))),
                    },
                };
                let merged = if lww { merged.lww_resolve() } else { merged };
                let mut value = Vec::with_capacity(8 + merged.encoded_len());
                value.extend_from_slice(&created.to_be_bytes());
                merged.encode(&mut value);
                let mut depth = depth.lock().unwrap_or_else(|p| p.into_inner());
                let d = depth.entry(target.clone()).or_default();
                let new_bytes = d.bytes + value.len() as u64 + key.len() as u64
                    - if old_len > 0 {
                        old_len + key.len() as u64
                    } else {
                        0
                    };
                let new_count = d.count + u64::from(old_len == 0);
                if new_count > cfg.max_per_target || new_bytes > cfg.max_bytes_per_target {
                    return (
                        None,
                        Err(HintError::Full {
                            target: target.clone(),
                            count: d.count,
                            bytes: d.bytes,
                        }),
                    );
                }
                d.count = new_count;
                d.bytes = new_bytes;
                (Some(Some(value)), Ok(()))
            })
            .await?;
        match &result {
            Ok(()) => metrics.hints_stored.inc(),
            Err(HintError::Full { .. }) => metrics.hints_dropped.with_label_values(&["full"]).inc(),
            Err(_) => {}
        }
        result
    }

    /// The hint this node holds for `target` of a key, if any (sloppy reads).
    pub fn read(
        &self,
        store: &Store,
        target: &NodeId,
        stored_key: &[u8],
    ) -> Result<Option<Clock>, StorageError> {
        let Some(v) = store.get(Table::Hints, &hint_key(target, stored_key))? else {
            return Ok(None);
        };
        match split_value(&v).map(|(_, b)| Clock::decode(b)) {
            Some(Ok(c)) => Ok(Some(c)),
            _ => Err(StorageError::Corrupt {
                detail: "hint does not decode".into(),
            }),
        }
    }

    /// Deletes a hint if it still holds exactly `expected` (a newer merge keeps it), keeping the
    /// queue depths in step. Returns whether it deleted it.
    pub async fn delete_if_unchanged(
        &self,
        store: &Store,
        key: Vec<u8>,
        expected: Vec<u8>,
    ) -> Result<bool, StorageError> {
        let depth = self.depth.clone();
        let klen = key.len() as u64;
        store
            .update(Table::Hints, key.clone(), move |current| {
                if current != Some(expected.as_slice()) {
                    return (None, false);
                }
                let target = split_hint_key(&key).and_then(|(t, _)| NodeId::new(t).ok());
                if let Some(t) = target {
                    let mut depth = depth.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(d) = depth.get_mut(&t) {
                        d.count = d.count.saturating_sub(1);
                        d.bytes = d.bytes.saturating_sub(expected.len() as u64 + klen);
                    }
                }
                (Some(None), true)
            })
            .await
    }
}
