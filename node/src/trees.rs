//! The Merkle trees of one node: one per peer, over exactly the keys the two of them replicate
//! (both are in the key's preference list of the committed ring), updated on every local write,
//! and the segments queued for an exchange with a peer as soon as it is reachable. Data only:
//! the exchange itself is `antientropy.rs`.
//!
//! The trees hold the ring they follow ([`PeerMap`]) and a tree of every key stored here (the
//! *own* tree), so that a ring change does not read storage again: a segment whose positions
//! all have the same peers in the new ring gets, in each of those peers' trees, the own tree's
//! leaf, and nothing elsewhere. Only the segments a range boundary cuts are scanned
//! ([`Trees::settle`]), a few hundred of the 2^leaf_bits.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use dynakv_core::NodeId;
use dynakv_core::hash::hash128;
use dynakv_core::merkle::{DiffRequest, LevelSlice, MerkleError, MerkleTree, entry_hash};
use dynakv_core::ring::{Ring, replica_ranges};

use crate::storage::split_data_key;

/// Most segments queued for a targeted exchange per peer; past it a full exchange is queued.
pub(crate) const MAX_QUEUED_SEGMENTS: usize = 4096;

/// The peers this node shares each key position with in one ring: position intervals, each with
/// the other replicas of its keys (none where this node is no replica).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerMap {
    /// Last position of each interval, ascending; the first starts at 0, each next one after
    /// the one before, the last ends at `u64::MAX`. Empty: no ring, no peers anywhere.
    ends: Vec<u64>,
    peers: Vec<Vec<NodeId>>,
}

impl PeerMap {
    /// The peers of node `me` in `ring` with `n` replicas per key.
    pub fn new(ring: &Ring, n: usize, me: &NodeId) -> PeerMap {
        let mut intervals: Vec<(u64, u64, Vec<NodeId>)> = Vec::new();
        for range in replica_ranges(ring, n) {
            let peers: Vec<NodeId> = if range.replicas.contains(me) {
                range.replicas.into_iter().filter(|r| r != me).collect()
            } else {
                Vec::new()
            };
            let (start, end) = (range.start, range.end);
            if start < end {
                intervals.push((start + 1, end, peers));
            } else if start == u64::MAX {
                intervals.push((0, end, peers));
            } else {
                intervals.push((start + 1, u64::MAX, peers.clone()));
                intervals.push((0, end, peers));
            }
        }
        intervals.sort_by_key(|(lo, _, _)| *lo);
        let mut map = PeerMap::default();
        for (_, hi, peers) in intervals {
            match map.peers.last() {
                Some(last) if *last == peers => *map.ends.last_mut().expect("paired") = hi,
                _ => {
                    map.ends.push(hi);
                    map.peers.push(peers);
                }
            }
        }
        map
    }

    /// The interval holding `pos`.
    fn index(&self, pos: u64) -> Option<usize> {
        let i = self.ends.partition_point(|&end| end < pos);
        (i < self.ends.len()).then_some(i)
    }

    /// The peers this node shares the key at `pos` with.
    pub fn peers(&self, pos: u64) -> &[NodeId] {
        self.index(pos).map_or(&[], |i| &self.peers[i])
    }

    /// The peers of every position in `[lo, hi]` when they are the same throughout.
    fn peers_throughout(&self, lo: u64, hi: u64) -> Option<&[NodeId]> {
        match self.index(lo) {
            Some(i) if self.ends[i] >= hi => Some(&self.peers[i]),
            Some(_) => None,
            None => Some(&[]),
        }
    }

    fn all_peers(&self) -> BTreeSet<NodeId> {
        self.peers.iter().flatten().cloned().collect()
    }
}

/// What [`Trees::settle`] made of a segment's scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settled {
    /// The segment's leaves now follow the ring.
    Done,
    /// A write to the segment was on disk but not yet recorded here (or the other way round):
    /// scan it again shortly.
    Busy,
    /// The trees moved to another ring since: the scan is of no use.
    Stale,
}

struct Inner {
    map: Arc<PeerMap>,
    /// Counts the rings followed, so that a scan made for an older one is recognised.
    generation: u64,
    /// Every data key stored here.
    own: MerkleTree,
    peers: BTreeMap<NodeId, MerkleTree>,
}

/// The trees of one node: one per peer.
pub struct Trees {
    leaf_bits: u8,
    inner: Mutex<Inner>,
    /// Segments to exchange with a peer as soon as it is reachable (`None`: everything).
    queued: Mutex<BTreeMap<NodeId, Option<BTreeSet<u32>>>>,
}

impl Trees {
    pub fn new(leaf_bits: u8) -> Result<Trees, MerkleError> {
        let own = MerkleTree::new(leaf_bits)?;
        Ok(Trees {
            leaf_bits,
            inner: Mutex::new(Inner {
                map: Arc::default(),
                generation: 0,
                own,
                peers: BTreeMap::new(),
            }),
            queued: Mutex::new(BTreeMap::new()),
        })
    }

    pub fn leaf_bits(&self) -> u8 {
        self.leaf_bits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn empty_tree(&self) -> MerkleTree {
        MerkleTree::new(self.leaf_bits).expect("leaf_bits validated in Trees::new")
    }

    /// Records that the stored bytes of a key changed from `old` to `new` (None: absent), in the
    /// own tree and the tree of every peer the followed ring shares the key with.
    pub fn record(&self, stored_key: &[u8], old: Option<&[u8]>, new: Option<&[u8]>) {
        let Some((pos, _)) = split_data_key(stored_key) else {
            return;
        };
        let old = old.map(|b| entry_hash(stored_key, hash128(b)));
        let new = new.map(|b| entry_hash(stored_key, hash128(b)));
        if old == new {
            return;
        }
        let mut inner = self.lock();
        let inner = &mut *inner;
        inner.own.update(pos, old, new);
        for peer in inner.map.peers(pos) {
            let tree = inner
                .peers
                .entry(peer.clone())
                .or_insert_with(|| self.empty_tree());
            tree.update(pos, old, new);
        }
    }

    /// Empties every tree and follows `map` (before a rebuild from a full scan, which records
    /// every key).
    pub fn reset(&self, map: PeerMap) {
        let mut inner = self.lock();
        inner.own.clear();
        inner.peers.clear();
        inner.map = Arc::new(map);
        inner.generation += 1;
    }

    /// Follows a new ring: every segment whose positions have the same peers throughout is
    /// derived from the own tree at once. Returns the generation, the map, and the segments a
    /// range boundary cuts, whose leaves are zero until [`Trees::settle`] fills them from a
    /// scan of just that segment.
    pub fn follow(&self, map: PeerMap) -> (u64, Arc<PeerMap>, Vec<u32>) {
        let map = Arc::new(map);
        let mut inner = self.lock();
        let depth = usize::from(inner.own.depth());
        let own = inner.own.level(depth as u8).expect("leaf level").to_vec();
        let mut leaves: BTreeMap<NodeId, Vec<(u64, u128)>> = map
            .all_peers()
            .into_iter()
            .map(|peer| (peer, Vec::new()))
            .collect();
        let mut cut = Vec::new();
        for (segment, &leaf) in own.iter().enumerate() {
            let (lo, hi) = inner
                .own
                .segment_range(segment as u32)
                .expect("a segment of the tree");
            match map.peers_throughout(lo, hi) {
                Some(peers) => {
                    if leaf != 0 {
                        for peer in peers {
                            leaves.get_mut(peer).expect("all peers").push((lo, leaf));
                        }
                    }
                }
                None => cut.push(segment as u32),
            }
        }
        inner.peers = leaves
            .into_iter()
            .map(|(peer, leaves)| {
                let tree = MerkleTree::from_entries(self.leaf_bits, leaves)
                    .expect("leaf_bits validated in Trees::new");
                (peer, tree)
            })
            .collect();
        inner.map = map.clone();
        inner.generation += 1;
        (inner.generation, map, cut)
    }

    /// Fills one cut segment's leaves from a scan of it: `own` is the XOR of the entry hashes
    /// of every key found there, `shared` the same per peer (by the map of `generation`). The
    /// scan is trusted only when it agrees with the own tree, i.e. no write to the segment was
    /// between disk and the trees meanwhile.
    pub fn settle(
        &self,
        generation: u64,
        segment: u32,
        own: u128,
        shared: &BTreeMap<NodeId, u128>,
    ) -> Settled {
        let mut inner = self.lock();
        let inner = &mut *inner;
        if inner.generation != generation {
            return Settled::Stale;
        }
        let depth = inner.own.depth();
        let Some(&recorded) = inner.own.level(depth).and_then(|l| l.get(segment as usize)) else {
            return Settled::Done;
        };
        if recorded != own {
            return Settled::Busy;
        }
        let (lo, _) = inner.own.segment_range(segment).expect("checked above");
        for (peer, tree) in inner.peers.iter_mut() {
            let current = tree.level(depth).expect("same shape")[segment as usize];
            let wanted = shared.get(peer).copied().unwrap_or(0);
            tree.update(lo, Some(current), Some(wanted));
        }
        Settled::Done
    }

    /// Whether the followed ring shares the key at `pos` with `peer`.
    pub fn shares(&self, pos: u64, peer: &NodeId) -> bool {
        self.lock().map.peers(pos).contains(peer)
    }

    pub fn snapshot(&self, peer: &NodeId) -> MerkleTree {
        self.lock()
            .peers
            .get(peer)
            .cloned()
            .unwrap_or_else(|| self.empty_tree())
    }

    /// The root of each peer's tree that holds any key. A peer that shares no key has none:
    /// a ring change leaves it an empty tree (which [`Trees::settle`] may fill), a rebuild
    /// from storage no tree at all, and the two must read alike.
    pub fn roots(&self) -> Vec<(NodeId, u128)> {
        self.lock()
            .peers
            .iter()
            .filter(|(_, t)| t.root() != 0)
            .map(|(p, t)| (p.clone(), t.root()))
            .collect()
    }

    pub fn answer(&self, peer: &NodeId, request: &DiffRequest) -> Result<LevelSlice, MerkleError> {
        let inner = self.lock();
        match inner.peers.get(peer) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use dynakv_core::ring::Member;
    use proptest::prelude::*;

    fn id(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    fn ring(names: &[&str], vnodes: u32) -> Ring {
        let members: Vec<Member> = names
            .iter()
            .map(|n| Member {
                id: id(n),
                weight: 100,
                zone: None,
            })
            .collect();
        Ring::balanced(&members, vnodes, 3)
    }

    /// What the storage of node "a" holds: stored key -> value.
    type Disk = BTreeMap<Vec<u8>, Vec<u8>>;

    fn disk(keys: u32) -> Disk {
        (0..keys)
            .map(|i| {
                let key = crate::storage::data_key(format!("key-{i}").as_bytes());
                (key, format!("value-{i}").into_bytes())
            })
            .collect()
    }

    /// The trees a full rebuild from `disk` gives under `map`.
    fn rebuilt(leaf_bits: u8, map: PeerMap, disk: &Disk) -> Trees {
        let trees = Trees::new(leaf_bits).unwrap();
        trees.reset(map);
        for (k, v) in disk {
            trees.record(k, None, Some(v));
        }
        trees
    }

    /// Settles the cut segments from `disk` as `Node::settle_trees` does from storage.
    fn settle(trees: &Trees, generation: u64, map: &PeerMap, cut: &[u32], disk: &Disk) -> Vec<u32> {
        let shape = MerkleTree::new(trees.leaf_bits()).unwrap();
        let mut busy = Vec::new();
        for &segment in cut {
            let (lo, hi) = shape.segment_range(segment).unwrap();
            let (mut own, mut shared) = (0u128, BTreeMap::<NodeId, u128>::new());
            for (k, v) in disk {
                let (pos, _) = split_data_key(k).unwrap();
                if (lo..=hi).contains(&pos) {
                    let entry = entry_hash(k, hash128(v));
                    own ^= entry;
                    for peer in map.peers(pos) {
                        *shared.entry(peer.clone()).or_default() ^= entry;
                    }
                }
            }
            if trees.settle(generation, segment, own, &shared) == Settled::Busy {
                busy.push(segment);
            }
        }
        busy
    }

    fn assert_same(a: &Trees, b: &Trees) {
        assert_eq!(a.roots(), b.roots());
        for (peer, _) in b.roots() {
            let (x, y) = (a.snapshot(&peer), b.snapshot(&peer));
            assert_eq!(x.diff(&y).unwrap(), Vec::<u32>::new(), "{peer}");
        }
    }

    #[test]
    fn a_peer_map_gives_each_position_the_other_replicas() {
        let ring = ring(&["a", "b", "c", "d"], 8);
        let map = PeerMap::new(&ring, 3, &id("a"));
        for pos in [0, 1, u64::MAX / 3, u64::MAX / 2, u64::MAX - 1, u64::MAX] {
            let list: Vec<NodeId> = ring
                .preference_list(pos, 3)
                .into_iter()
                .map(|i| ring.nodes()[i].id.clone())
                .collect();
            let expected: Vec<NodeId> = if list.contains(&id("a")) {
                list.into_iter().filter(|p| *p != id("a")).collect()
            } else {
                Vec::new()
            };
            assert_eq!(map.peers(pos), &expected[..], "at {pos}");
        }
        assert!(PeerMap::default().peers(7).is_empty());
    }

    #[test]
    fn following_a_new_ring_equals_a_rebuild_from_storage() {
        let disk = disk(3000);
        let before = ring(&["a", "b", "c"], 16);
        let after = ring(&["a", "b", "c", "d"], 16);
        let trees = rebuilt(8, PeerMap::new(&before, 3, &id("a")), &disk);
        let map = PeerMap::new(&after, 3, &id("a"));
        let (generation, followed, cut) = trees.follow(map.clone());
        assert!(!cut.is_empty() && cut.len() < 256, "{} cut", cut.len());
        assert!(settle(&trees, generation, &followed, &cut, &disk).is_empty());
        assert_same(&trees, &rebuilt(8, map, &disk));
        // And back, to a ring where "a" holds less: its trees for "d" go.
        let map = PeerMap::new(&before, 3, &id("a"));
        let (generation, followed, cut) = trees.follow(map.clone());
        assert!(settle(&trees, generation, &followed, &cut, &disk).is_empty());
        assert_same(&trees, &rebuilt(8, map, &disk));
        assert!(trees.roots().iter().all(|(p, _)| *p != id("d")));
    }

    #[test]
    fn a_write_between_disk_and_trees_keeps_its_segment_unsettled_until_recorded() {
        let mut disk = disk(2000);
        let before = ring(&["a", "b", "c"], 16);
        let after = ring(&["a", "b", "c", "d"], 16);
        let trees = rebuilt(8, PeerMap::new(&before, 3, &id("a")), &disk);
        let map = PeerMap::new(&after, 3, &id("a"));
        let (generation, followed, cut) = trees.follow(map.clone());
        // A write to a cut segment is on disk, not yet in the trees.
        let shape = MerkleTree::new(8).unwrap();
        let (key, old) = disk
            .iter()
            .find(|(k, _)| {
                let (pos, _) = split_data_key(k).unwrap();
                cut.contains(&shape.segment_of(pos))
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .expect("a key in a cut segment");
        disk.insert(key.clone(), b"newer".to_vec());
        let busy = settle(&trees, generation, &followed, &cut, &disk);
        assert_eq!(busy, [shape.segment_of(split_data_key(&key).unwrap().0)]);
        trees.record(&key, Some(&old), Some(b"newer"));
        assert!(settle(&trees, generation, &followed, &busy, &disk).is_empty());
        assert_same(&trees, &rebuilt(8, map.clone(), &disk));
        // A scan made for an older ring is refused.
        let (_, _, _) = trees.follow(map);
        assert_eq!(
            trees.settle(generation, busy[0], 0, &BTreeMap::new()),
            Settled::Stale
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn any_ring_change_followed_equals_a_rebuild(
            before in prop::sample::subsequence(vec!["a", "b", "c", "d", "e", "f"], 1..=6),
            after in prop::sample::subsequence(vec!["a", "b", "c", "d", "e", "f"], 1..=6),
            vnodes in 1u32..=32,
            leaf_bits in 1u8..=10,
            keys in 0u32..800,
        ) {
            let disk = disk(keys);
            let me = id("a");
            let trees = rebuilt(leaf_bits, PeerMap::new(&ring(&before, vnodes), 3, &me), &disk);
            let map = PeerMap::new(&ring(&after, vnodes), 3, &me);
            let (generation, followed, cut) = trees.follow(map.clone());
            prop_assert!(settle(&trees, generation, &followed, &cut, &disk).is_empty());
            let fresh = rebuilt(leaf_bits, map, &disk);
            prop_assert_eq!(trees.roots(), fresh.roots());
        }
    }
}
