//! The Merkle trees of one node: one per peer, over exactly the keys the two of them replicate
//! (both are in the key's preference list of the committed ring), updated on every local write,
//! and the segments queued for an exchange with a peer as soon as it is reachable. Data only:
//! the exchange itself is `antientropy.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use dynakv_core::NodeId;
use dynakv_core::hash::hash128;
use dynakv_core::merkle::{DiffRequest, LevelSlice, MerkleError, MerkleTree, entry_hash};

use crate::storage::split_data_key;

/// Most segments queued for a targeted exchange per peer; past it a full exchange is queued.
pub(crate) const MAX_QUEUED_SEGMENTS: usize = 4096;

/// The trees of one node: one per peer.
pub struct Trees {
    leaf_bits: u8,
    inner: Mutex<BTreeMap<NodeId, MerkleTree>>,
    /// Segments to exchange with a peer as soon as it is reachable (`None`: everything).
    queued: Mutex<BTreeMap<NodeId, Option<BTreeSet<u32>>>>,
}

impl Trees {
    pub fn new(leaf_bits: u8) -> Result<Trees, MerkleError> {
        MerkleTree::new(leaf_bits)?;
        Ok(Trees {
            leaf_bits,
            inner: Mutex::new(BTreeMap::new()),
            queued: Mutex::new(BTreeMap::new()),
        })
    }

    pub fn leaf_bits(&self) -> u8 {
        self.leaf_bits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<NodeId, MerkleTree>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that the stored bytes of a key changed from `old` to `new` (None: absent) for
    /// every peer in `peers`.
    pub fn record<'a>(
        &self,
        peers: impl Iterator<Item = &'a NodeId>,
        stored_key: &[u8],
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) {
        let Some((pos, _)) = split_data_key(stored_key) else {
            return;
        };
        let old = old.map(|b| entry_hash(stored_key, hash128(b)));
        let new = new.map(|b| entry_hash(stored_key, hash128(b)));
        if old == new {
            return;
        }
        let mut trees = self.lock();
        for peer in peers {
            let tree = trees.entry(peer.clone()).or_insert_with(|| {
                MerkleTree::new(self.leaf_bits).expect("leaf_bits validated in Trees::new")
            });
            tree.update(pos, old, new);
        }
    }

    /// Empties every tree (before a rebuild).
    pub fn clear(&self) {
        self.lock().clear();
    }

    pub fn snapshot(&self, peer: &NodeId) -> MerkleTree {
        self.lock().get(peer).cloned().unwrap_or_else(|| {
            MerkleTree::new(self.leaf_bits).expect("leaf_bits validated in Trees::new")
        })
    }

    pub fn roots(&self) -> Vec<(NodeId, u128)> {
        self.lock()
            .iter()
            .map(|(p, t)| (p.clone(), t.root()))
            .collect()
    }

    pub fn answer(&self, peer: &NodeId, request: &DiffRequest) -> Result<LevelSlice, MerkleError> {
        let trees = self.lock();
        match trees.get(peer) {
            Some(t) => t.answer(request),
            None => MerkleTree::new(self.leaf_bits)?.answer(request),
        }
    }

    /// Queues segments (or, with `None`, everything) for an exchange with `peer` as soon as it
    /// is reachable.
    pub fn queue(&self, peer: &NodeId, segment: Option<u32>) {
        let mut q = self.queued.lock().unwrap_or_else(|p| p.into_inner());
        let entry = q
            .entry(peer.clone())
            .or_insert_with(|| Some(BTreeSet::new()));
        match (entry.as_mut(), segment) {
            (Some(set), Some(s)) if set.len() < MAX_QUEUED_SEGMENTS => {
                set.insert(s);
            }
            _ => *entry = None,
        }
    }

    pub fn segment_of(&self, key_pos: u64) -> u32 {
        if self.leaf_bits == 0 {
            0
        } else {
            (key_pos >> (64 - u32::from(self.leaf_bits))) as u32
        }
    }

    pub(crate) fn take_queued(&self, peer: &NodeId) -> Option<Option<BTreeSet<u32>>> {
        self.queued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(peer)
    }

    pub(crate) fn requeue(&self, peer: &NodeId, what: Option<BTreeSet<u32>>) {
        let mut q = self.queued.lock().unwrap_or_else(|p| p.into_inner());
        match (q.remove(peer), what) {
            (Some(None), _) | (_, None) => {
                q.insert(peer.clone(), None);
            }
            (Some(Some(mut a)), Some(b)) => {
                a.extend(b);
                q.insert(peer.clone(), Some(a));
            }
            (None, Some(b)) => {
                q.insert(peer.clone(), Some(b));
            }
        }
    }

    pub fn queued_peers(&self) -> Vec<NodeId> {
        self.queued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }
}
