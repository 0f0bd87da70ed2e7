//! Merkle trees over fixed segments of the 64-bit key-position space, for anti-entropy between two
//! replicas of the same keys (DESIGN.md section 6).
//!
//! # Shape
//!
//! A tree with `leaf_bits = b` cuts the ring into `2^b` *segments*: the segment of a key is the top
//! `b` bits of its ring position ([`crate::hash::key_position`]), so every segment is a contiguous
//! range of the hash space ([`MerkleTree::segment_range`]). Level `depth` holds one leaf per
//! segment; every level above groups [`FANOUT`] nodes into one parent, up to the single root at
//! level 0. When `b` is not a multiple of 4 the root has fewer children (`2^(b mod 4)`); every
//! other inner node has exactly [`FANOUT`].
//!
//! At [`DEFAULT_LEAF_BITS`] (12) a tree holds 1 + 16 + 256 + 4096 = 4369 nodes of 16 bytes:
//! 69,904 bytes (68.3 KiB) in one allocation per level, whatever the number of keys.
//!
//! # Invariants
//!
//! - A leaf is the XOR of [`entry_hash`]`(key, version_digest)` over the entries of its segment;
//!   an inner node is the XOR of its children, so every node is the XOR of the entry hashes in its
//!   range of the hash space and the root is the XOR of all of them.
//! - Hence every level (root included) is a function of the *set* of entries only: it does not
//!   depend on insertion order, and removing an entry after inserting it restores the tree exactly.
//!   A write costs O(depth) XORs ([`MerkleTree::update`]), no hashing of siblings.
//! - The tree trusts its caller: inserting the same entry twice cancels it (XOR), and removing an
//!   entry that was never inserted adds it. The storage layer passes the entry hash it replaced.
//! - [`MerkleTree::diff`] and [`DiffSession`] descend only into nodes that differ, so `d` differing
//!   segments cost at most `1 + d * FANOUT * depth` node comparisons (49 for one difference at the
//!   default shape), and equal trees cost one.
//! - Everything that comes off the wire ([`DiffRequest::decode`], [`LevelSlice::decode`]) is
//!   validated against the shape it names before use; decoding never panics and never allocates
//!   more than [`MAX_NODES_PER_REQUEST`] entries.
//!
//! # Collisions: the price of XOR
//!
//! XOR makes updates O(1) per level and roots order-independent, but it is linear: a set of
//! differences whose XOR is zero is invisible at every common ancestor. For honest inputs that
//! needs a 128-bit coincidence (probability about 2^-128 per compared node). xxh3 is not a
//! cryptographic hash, so a client able to choose keys *and* predict version digests could in
//! principle craft a cancelling pair; the consequence is only that anti-entropy misses that pair
//! until one of the keys is written again (read repair and hinted handoff still work). Hashing the
//! children instead of XOR-ing them would confine cancellations to one segment but cost
//! O(depth * FANOUT) bytes hashed per write and gives no protection within a leaf; it was not worth
//! it for a background repair path.
//!
//! # The remote exchange (sans-IO)
//!
//! The local side runs a [`DiffSession`]: it asks for the root ([`DiffRequest`] at level 0), the
//! remote answers with [`MerkleTree::answer`] (a [`LevelSlice`]), the session compares those hashes
//! with its own tree and asks for the children of the nodes that differ, one level at a time, at
//! most [`MAX_NODES_PER_REQUEST`] nodes per request, until it reaches the leaves and returns the
//! differing segments. Both trees keep taking writes during the exchange, so the result is a
//! best-effort snapshot: a segment written meanwhile may be reported or missed, and the next round
//! catches it.
//!
//! Wire form (all integers little-endian, varints are canonical unsigned LEB128 of a `u32`):
//!
//! ```text
//! request: 0x01 leaf_bits level count:varint first_index:varint (gap-1:varint)*
//! slice:   0x02 leaf_bits level count:varint first_index:varint (gap-1:varint)* hash:u128*count
//! ```
//!
//! Indexes are strictly increasing, so consecutive nodes (siblings) cost one byte each.

use std::fmt;

use crate::hash::hash128;

/// Bits of the hash space consumed by one tree level: a fanout of 16.
const FANOUT_BITS: u8 = 4;

/// Children per inner node (the root has fewer when `leaf_bits` is not a multiple of 4).
pub const FANOUT: usize = 1 << FANOUT_BITS;

/// Default number of segments, as a power of two: 4096 segments, 68.3 KiB per tree.
pub const DEFAULT_LEAF_BITS: u8 = 12;

/// Smallest accepted `leaf_bits` (two segments).
pub const MIN_LEAF_BITS: u8 = 1;

/// Largest accepted `leaf_bits`: 2^20 segments, about 17 MiB per tree.
pub const MAX_LEAF_BITS: u8 = 20;

/// Most nodes in one [`DiffRequest`] or [`LevelSlice`]: a full slice is about 17 KiB on the wire.
pub const MAX_NODES_PER_REQUEST: usize = 1024;

const TAG_REQUEST: u8 = 0x01;
const TAG_LEVEL_SLICE: u8 = 0x02;

/// What went wrong in the Merkle module. Variant names are stable (they become metric labels,
/// see [`MerkleError::label`]). No error changes any tree or session state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MerkleError {
    /// A tree shape was asked for outside `MIN_LEAF_BITS..=MAX_LEAF_BITS`.
    #[error("leaf_bits {leaf_bits} is outside {MIN_LEAF_BITS}..={MAX_LEAF_BITS}")]
    LeafBitsOutOfRange { leaf_bits: u8 },
    /// The two sides cut the hash space differently; their nodes cannot be compared.
    #[error(
        "Merkle trees have different shapes: local leaf_bits {local_leaf_bits}, remote {remote_leaf_bits}"
    )]
    ShapeMismatch {
        local_leaf_bits: u8,
        remote_leaf_bits: u8,
    },
    /// A level below the leaves was named.
    #[error("level {level} does not exist; the tree has levels 0..={depth}")]
    LevelOutOfRange { level: u8, depth: u8 },
    /// A node index past the end of its level was named.
    #[error("node {index} does not exist at level {level}, which has {level_len} nodes")]
    IndexOutOfRange {
        level: u8,
        index: u32,
        level_len: u32,
    },
    /// Node indexes must be strictly increasing (sorted, no duplicates).
    #[error("node indexes at level {level} are not strictly increasing")]
    IndexesNotIncreasing { level: u8 },
    /// A level slice must carry exactly one hash per index.
    #[error("level slice has {indexes} indexes but {hashes} hashes")]
    HashCountMismatch { indexes: usize, hashes: usize },
    /// More nodes than [`MAX_NODES_PER_REQUEST`] in one message.
    #[error("{count} nodes in one message; the limit is {max}")]
    TooManyNodes { count: usize, max: usize },
    /// Bytes that are not a valid encoding (truncated, trailing bytes, bad tag, bad varint).
    #[error("malformed Merkle message: {reason}")]
    Malformed { reason: &'static str },
    /// A reply that does not answer the request the session is waiting for.
    #[error("unexpected Merkle reply: {reason}")]
    UnexpectedReply { reason: &'static str },
    /// The session already returned its result.
    #[error("the Merkle diff session is already finished")]
    SessionFinished,
}

impl MerkleError {
    /// Metric label: fixed, lowercase, no data in it.
    pub fn label(&self) -> &'static str {
        match self {
            MerkleError::LeafBitsOutOfRange { .. } => "leaf_bits_out_of_range",
            MerkleError::ShapeMismatch { .. } => "shape_mismatch",
            MerkleError::LevelOutOfRange { .. } => "level_out_of_range",
            MerkleError::IndexOutOfRange { .. } => "index_out_of_range",
            MerkleError::IndexesNotIncreasing { .. } => "indexes_not_increasing",
            MerkleError::HashCountMismatch { .. } => "hash_count_mismatch",
            MerkleError::TooManyNodes { .. } => "too_many_nodes",
            MerkleError::Malformed { .. } => "malformed",
            MerkleError::UnexpectedReply { .. } => "unexpected_reply",
            MerkleError::SessionFinished => "session_finished",
        }
    }
}

/// The 128-bit hash of one entry: xxh3-128 of the key bytes followed by the version digest
/// (16 bytes little-endian). The digest has a fixed width, so the concatenation is unambiguous.
pub fn entry_hash(key: &[u8], version_digest: u128) -> u128 {
    let mut bytes = Vec::with_capacity(key.len() + 16);
    bytes.extend_from_slice(key);
    bytes.extend_from_slice(&version_digest.to_le_bytes());
    hash128(&bytes)
}

// ---------------------------------------------------------------------------------------------
// Shape arithmetic, shared by trees, sessions and the wire validation.

fn check_leaf_bits(leaf_bits: u8) -> Result<(), MerkleError> {
    if (MIN_LEAF_BITS..=MAX_LEAF_BITS).contains(&leaf_bits) {
        Ok(())
    } else {
        Err(MerkleError::LeafBitsOutOfRange { leaf_bits })
    }
}

/// Levels below the root (the leaves are at level `depth`). `leaf_bits` must be valid.
fn depth_of(leaf_bits: u8) -> u8 {
    leaf_bits.div_ceil(FANOUT_BITS)
}

/// log2 of the number of nodes at `level` (`level <= depth`).
fn level_bits(leaf_bits: u8, level: u8) -> u8 {
    leaf_bits.saturating_sub(FANOUT_BITS * (depth_of(leaf_bits) - level))
}

fn level_len(leaf_bits: u8, level: u8) -> u32 {
    1u32 << level_bits(leaf_bits, level)
}

/// log2 of the number of children of a node at `level` (`level < depth`).
fn child_shift(leaf_bits: u8, level: u8) -> u8 {
    level_bits(leaf_bits, level + 1) - level_bits(leaf_bits, level)
}

/// Checks that `indexes` name distinct nodes of one level of a valid shape, in increasing order,
/// and that there are not too many of them.
fn check_nodes(leaf_bits: u8, level: u8, indexes: &[u32]) -> Result<(), MerkleError> {
    check_leaf_bits(leaf_bits)?;
    let depth = depth_of(leaf_bits);
    if level > depth {
        return Err(MerkleError::LevelOutOfRange { level, depth });
    }
    if indexes.len() > MAX_NODES_PER_REQUEST {
        return Err(MerkleError::TooManyNodes {
            count: indexes.len(),
            max: MAX_NODES_PER_REQUEST,
        });
    }
    if indexes.windows(2).any(|pair| pair[0] >= pair[1]) {
        return Err(MerkleError::IndexesNotIncreasing { level });
    }
    let len = level_len(leaf_bits, level);
    match indexes.last() {
        Some(&index) if index >= len => Err(MerkleError::IndexOutOfRange {
            level,
            index,
            level_len: len,
        }),
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// The tree.

/// A Merkle tree over `2^leaf_bits` fixed segments of the hash space. See the module docs for the
/// invariants. Equality compares the shape and every node.
#[derive(Clone, PartialEq, Eq)]
pub struct MerkleTree {
    leaf_bits: u8,
    /// `levels[0]` is the root (one node), `levels[depth]` the leaves (one per segment).
    levels: Vec<Box<[u128]>>,
}

impl fmt::Debug for MerkleTree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MerkleTree")
            .field("leaf_bits", &self.leaf_bits)
            .field("root", &format_args!("{:032x}", self.root()))
            .finish()
    }
}

impl MerkleTree {
    /// An empty tree of `2^leaf_bits` segments; `leaf_bits` must be within
    /// `MIN_LEAF_BITS..=MAX_LEAF_BITS`.
    pub fn new(leaf_bits: u8) -> Result<Self, MerkleError> {
        check_leaf_bits(leaf_bits)?;
        let levels = (0..=depth_of(leaf_bits))
            .map(|level| vec![0u128; level_len(leaf_bits, level) as usize].into_boxed_slice())
            .collect();
        Ok(MerkleTree { leaf_bits, levels })
    }

    /// Rebuilds a tree from `(key_pos, entry_hash)` pairs, e.g. a scan of storage at start-up.
    /// Costs one XOR per entry plus one pass over the inner nodes.
    pub fn from_entries(
        leaf_bits: u8,
        entries: impl IntoIterator<Item = (u64, u128)>,
    ) -> Result<Self, MerkleError> {
        let mut tree = MerkleTree::new(leaf_bits)?;
        let depth = usize::from(tree.depth());
        let shift = 64 - u32::from(leaf_bits);
        for (key_pos, entry) in entries {
            tree.levels[depth][(key_pos >> shift) as usize] ^= entry;
        }
        for level in (0..depth).rev() {
            let shift = child_shift(leaf_bits, level as u8);
            let (upper, lower) = tree.levels.split_at_mut(level + 1);
            let (parents, children) = (&mut upper[level], &lower[0]);
            for (index, parent) in parents.iter_mut().enumerate() {
                let first = index << shift;
                *parent = children[first..first + (1 << shift)]
                    .iter()
                    .fold(0, |acc, child| acc ^ child);
            }
        }
        Ok(tree)
    }

    /// Bits of the key position that select a segment; there are `2^leaf_bits` segments.
    pub fn leaf_bits(&self) -> u8 {
        self.leaf_bits
    }

    /// Levels below the root: the leaves are `level(depth())`.
    pub fn depth(&self) -> u8 {
        depth_of(self.leaf_bits)
    }

    /// Number of segments (leaves).
    pub fn segment_count(&self) -> u32 {
        level_len(self.leaf_bits, self.depth())
    }

    /// The segment holding a key position: its top `leaf_bits` bits.
    pub fn segment_of(&self, key_pos: u64) -> u32 {
        (key_pos >> (64 - u32::from(self.leaf_bits))) as u32
    }

    /// Inclusive bounds `(first, last)` of the key positions in `segment`, or `None` past the last
    /// segment. Segments are contiguous and together cover the whole `u64` range.
    pub fn segment_range(&self, segment: u32) -> Option<(u64, u64)> {
        if segment >= self.segment_count() {
            return None;
        }
        let first = u64::from(segment) << (64 - u32::from(self.leaf_bits));
        Some((first, first | (u64::MAX >> self.leaf_bits)))
    }

    /// XOR of all entry hashes in the tree.
    pub fn root(&self) -> u128 {
        self.levels[0][0]
    }

    /// The nodes of one level (0 is the root, `depth()` the leaves), or `None` below the leaves.
    pub fn level(&self, level: u8) -> Option<&[u128]> {
        self.levels.get(usize::from(level)).map(|nodes| &nodes[..])
    }

    /// True when the tree equals a new one: every leaf is zero. O(segments).
    pub fn is_empty(&self) -> bool {
        self.levels[usize::from(self.depth())]
            .iter()
            .all(|&leaf| leaf == 0)
    }

    /// Forgets every entry (the shape stays).
    pub fn clear(&mut self) {
        for level in &mut self.levels {
            level.fill(0);
        }
    }

    /// Records a write of the key at `key_pos`: XORs out the entry hash it replaced (`None` if the
    /// key was absent) and XORs in the new one (`None` if the key is gone). O(depth).
    pub fn update(&mut self, key_pos: u64, old: Option<u128>, new: Option<u128>) {
        let delta = old.unwrap_or(0) ^ new.unwrap_or(0);
        if delta == 0 {
            return;
        }
        let mut index = self.segment_of(key_pos) as usize;
        for level in (0..=self.depth()).rev() {
            self.levels[usize::from(level)][index] ^= delta;
            if level > 0 {
                index >>= child_shift(self.leaf_bits, level - 1);
            }
        }
    }

    /// Adds an entry that was not in the tree.
    pub fn insert(&mut self, key_pos: u64, entry: u128) {
        self.update(key_pos, None, Some(entry));
    }

    /// Removes an entry that was in the tree.
    pub fn remove(&mut self, key_pos: u64, entry: u128) {
        self.update(key_pos, Some(entry), None);
    }

    /// The segments whose leaves differ between `self` and `other`, in increasing order, found by
    /// descending only into differing subtrees: at most `1 + d * FANOUT * depth` comparisons for
    /// `d` differing segments.
    pub fn diff(&self, other: &MerkleTree) -> Result<Vec<u32>, MerkleError> {
        self.diff_counting(other).map(|(segments, _)| segments)
    }

    /// [`MerkleTree::diff`] plus the number of node comparisons it made.
    fn diff_counting(&self, other: &MerkleTree) -> Result<(Vec<u32>, usize), MerkleError> {
        self.check_same_shape(other.leaf_bits)?;
        let mut compared = 1;
        let mut differing: Vec<u32> = if self.root() == other.root() {
            Vec::new()
        } else {
            vec![0]
        };
        for level in 0..self.depth() {
            let shift = child_shift(self.leaf_bits, level);
            let (mine, theirs) = (
                &self.levels[usize::from(level) + 1],
                &other.levels[usize::from(level) + 1],
            );
            let mut next = Vec::new();
            for parent in differing {
                for child in parent << shift..(parent + 1) << shift {
                    compared += 1;
                    if mine[child as usize] != theirs[child as usize] {
                        next.push(child);
                    }
                }
            }
            differing = next;
        }
        Ok((differing, compared))
    }

    /// Answers a remote [`DiffRequest`] from this tree: the hashes of the nodes it names.
    pub fn answer(&self, request: &DiffRequest) -> Result<LevelSlice, MerkleError> {
        self.check_same_shape(request.leaf_bits)?;
        let nodes = &self.levels[usize::from(request.level)];
        Ok(LevelSlice {
            leaf_bits: self.leaf_bits,
            level: request.level,
            indexes: request.indexes.clone(),
            hashes: request
                .indexes
                .iter()
                .map(|&index| nodes[index as usize])
                .collect(),
        })
    }

    fn check_same_shape(&self, remote_leaf_bits: u8) -> Result<(), MerkleError> {
        if self.leaf_bits == remote_leaf_bits {
            Ok(())
        } else {
            Err(MerkleError::ShapeMismatch {
                local_leaf_bits: self.leaf_bits,
                remote_leaf_bits,
            })
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Wire messages.

/// "Send me your hashes of these nodes": a level and strictly increasing node indexes on it, for a
/// tree of `leaf_bits`. Always valid for that shape (checked on construction and decoding).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiffRequest {
    leaf_bits: u8,
    level: u8,
    indexes: Vec<u32>,
}

impl DiffRequest {
    /// A request for `indexes` (strictly increasing, at most [`MAX_NODES_PER_REQUEST`]) at `level`
    /// of a tree with `leaf_bits`. A session builds these itself; this is for targeted exchanges.
    pub fn new(leaf_bits: u8, level: u8, indexes: Vec<u32>) -> Result<Self, MerkleError> {
        check_nodes(leaf_bits, level, &indexes)?;
        Ok(DiffRequest {
            leaf_bits,
            level,
            indexes,
        })
    }

    pub fn leaf_bits(&self) -> u8 {
        self.leaf_bits
    }

    pub fn level(&self) -> u8 {
        self.level
    }

    pub fn indexes(&self) -> &[u32] {
        &self.indexes
    }

    /// Appends the wire form to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        encode_header(TAG_REQUEST, self.leaf_bits, self.level, &self.indexes, out);
    }

    /// Parses and validates a request; never panics, rejects trailing bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, MerkleError> {
        let mut input = bytes;
        let (leaf_bits, level, indexes) = decode_header(TAG_REQUEST, &mut input)?;
        if !input.is_empty() {
            return Err(MerkleError::Malformed {
                reason: "trailing bytes",
            });
        }
        Ok(DiffRequest {
            leaf_bits,
            level,
            indexes,
        })
    }
}

/// Hashes of some nodes of one level, the answer to a [`DiffRequest`]. Always valid for its shape:
/// strictly increasing indexes, one hash each, at most [`MAX_NODES_PER_REQUEST`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LevelSlice {
    leaf_bits: u8,
    level: u8,
    indexes: Vec<u32>,
    hashes: Vec<u128>,
}

impl LevelSlice {
    /// A slice of `level` of a tree with `leaf_bits`; [`MerkleTree::answer`] builds these.
    pub fn new(
        leaf_bits: u8,
        level: u8,
        indexes: Vec<u32>,
        hashes: Vec<u128>,
    ) -> Result<Self, MerkleError> {
        check_nodes(leaf_bits, level, &indexes)?;
        if indexes.len() != hashes.len() {
            return Err(MerkleError::HashCountMismatch {
                indexes: indexes.len(),
                hashes: hashes.len(),
            });
        }
        Ok(LevelSlice {
            leaf_bits,
            level,
            indexes,
            hashes,
        })
    }

    pub fn leaf_bits(&self) -> u8 {
        self.leaf_bits
    }

    pub fn level(&self) -> u8 {
        self.level
    }

    pub fn indexes(&self) -> &[u32] {
        &self.indexes
    }

    /// `hashes()[i]` is the hash of node `indexes()[i]`.
    pub fn hashes(&self) -> &[u128] {
        &self.hashes
    }

    /// Appends the wire form to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        encode_header(
            TAG_LEVEL_SLICE,
            self.leaf_bits,
            self.level,
            &self.indexes,
            out,
        );
        out.reserve(self.hashes.len() * 16);
        for hash in &self.hashes {
            out.extend_from_slice(&hash.to_le_bytes());
        }
    }

    /// Parses and validates a slice; never panics, rejects trailing bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, MerkleError> {
        let mut input = bytes;
        let (leaf_bits, level, indexes) = decode_header(TAG_LEVEL_SLICE, &mut input)?;
        if input.len() != indexes.len() * 16 {
            return Err(MerkleError::Malformed {
                reason: if input.len() < indexes.len() * 16 {
                    "truncated hashes"
                } else {
                    "trailing bytes"
                },
            });
        }
        let hashes = input
            .chunks_exact(16)
            .map(|chunk| {
                let mut bytes = [0u8; 16];
                bytes.copy_from_slice(chunk);
                u128::from_le_bytes(bytes)
            })
            .collect();
        Ok(LevelSlice {
            leaf_bits,
            level,
            indexes,
            hashes,
        })
    }
}

fn encode_header(tag: u8, leaf_bits: u8, level: u8, indexes: &[u32], out: &mut Vec<u8>) {
    out.extend_from_slice(&[tag, leaf_bits, level]);
    write_varint(indexes.len() as u32, out);
    let mut previous: Option<u32> = None;
    for &index in indexes {
        // Strictly increasing (a type invariant), so the gap minus one never underflows.
        write_varint(previous.map_or(index, |p| index - p - 1), out);
        previous = Some(index);
    }
}

fn decode_header(tag: u8, input: &mut &[u8]) -> Result<(u8, u8, Vec<u32>), MerkleError> {
    let [found_tag, leaf_bits, level] = take::<3>(input)?;
    if found_tag != tag {
        return Err(MerkleError::Malformed {
            reason: "wrong message tag",
        });
    }
    check_nodes(leaf_bits, level, &[])?;
    let count = read_varint(input)? as usize;
    if count > MAX_NODES_PER_REQUEST {
        return Err(MerkleError::TooManyNodes {
            count,
            max: MAX_NODES_PER_REQUEST,
        });
    }
    // Every index takes at least one byte: refuse to allocate for bytes that are not there.
    if input.len() < count {
        return Err(MerkleError::Malformed {
            reason: "truncated indexes",
        });
    }
    let len = level_len(leaf_bits, level);
    let mut indexes = Vec::with_capacity(count);
    let mut previous: Option<u32> = None;
    for _ in 0..count {
        let value = read_varint(input)?;
        let index = match previous {
            None => Some(value),
            Some(p) => p.checked_add(1).and_then(|next| next.checked_add(value)),
        };
        let index = match index {
            Some(index) if index < len => index,
            Some(index) => {
                return Err(MerkleError::IndexOutOfRange {
                    level,
                    index,
                    level_len: len,
                });
            }
            None => {
                return Err(MerkleError::IndexOutOfRange {
                    level,
                    index: u32::MAX,
                    level_len: len,
                });
            }
        };
        indexes.push(index);
        previous = Some(index);
    }
    Ok((leaf_bits, level, indexes))
}

fn take<const N: usize>(input: &mut &[u8]) -> Result<[u8; N], MerkleError> {
    match input.split_first_chunk::<N>() {
        Some((head, rest)) => {
            *input = rest;
            Ok(*head)
        }
        None => Err(MerkleError::Malformed {
            reason: "truncated header",
        }),
    }
}

fn write_varint(mut value: u32, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Canonical LEB128 of a `u32`: at most 5 bytes, no redundant trailing zero groups.
fn read_varint(input: &mut &[u8]) -> Result<u32, MerkleError> {
    let mut value: u64 = 0;
    for group in 0..5 {
        let Some((&byte, rest)) = input.split_first() else {
            return Err(MerkleError::Malformed {
                reason: "truncated varint",
            });
        };
        *input = rest;
        value |= u64::from(byte & 0x7f) << (7 * group);
        if byte & 0x80 == 0 {
            if group > 0 && byte == 0 {
                return Err(MerkleError::Malformed {
                    reason: "non-canonical varint",
                });
            }
            return u32::try_from(value).map_err(|_| MerkleError::Malformed {
                reason: "varint overflows u32",
            });
        }
    }
    Err(MerkleError::Malformed {
        reason: "varint longer than 5 bytes",
    })
}

// ---------------------------------------------------------------------------------------------
// The step-wise remote diff.

/// What the local side of an exchange does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiffStep {
    /// Send this request to the remote and feed its answer to [`DiffSession::handle_reply`].
    SendRequest(DiffRequest),
    /// The exchange is over: these segments differ (increasing order; empty if the trees agree).
    Finished(Vec<u32>),
}

/// The local side of a remote tree comparison, sans-IO: it produces [`DiffRequest`]s and consumes
/// [`LevelSlice`]s, one level at a time from the root down, asking only for the children of nodes
/// that differed (at most [`MAX_NODES_PER_REQUEST`] per request). The local tree is passed in at
/// every step because it keeps taking writes; see the module docs for what that means.
#[derive(Debug, Clone)]
pub struct DiffSession {
    leaf_bits: u8,
    /// Level of the nodes in `pending` and `outstanding`.
    level: u8,
    /// Nodes of `level` still to ask for, in increasing order, from `next_pending` on.
    pending: Vec<u32>,
    next_pending: usize,
    /// Nodes of `level` already found to differ, in increasing order.
    differing: Vec<u32>,
    /// The request sent and not yet answered; `None` once finished.
    outstanding: Option<DiffRequest>,
    nodes_requested: usize,
}

impl DiffSession {
    /// Starts a comparison of `local` with a remote tree of the same shape; the first request asks
    /// for the remote root.
    pub fn start(local: &MerkleTree) -> (DiffSession, DiffRequest) {
        let request = DiffRequest {
            leaf_bits: local.leaf_bits,
            level: 0,
            indexes: vec![0],
        };
        let session = DiffSession {
            leaf_bits: local.leaf_bits,
            level: 0,
            pending: vec![0],
            next_pending: 1,
            differing: Vec::new(),
            outstanding: Some(request.clone()),
            nodes_requested: 1,
        };
        (session, request)
    }

    /// The request awaiting its reply (to resend after a timeout), or `None` once finished.
    pub fn outstanding(&self) -> Option<&DiffRequest> {
        self.outstanding.as_ref()
    }

    pub fn is_finished(&self) -> bool {
        self.outstanding.is_none()
    }

    /// Nodes asked for so far, over all requests.
    pub fn nodes_requested(&self) -> usize {
        self.nodes_requested
    }

    /// Compares the remote's answer with `local` and says what to do next. A reply that does not
    /// answer the outstanding request exactly (shape, level, indexes) is refused and changes nothing.
    pub fn handle_reply(
        &mut self,
        local: &MerkleTree,
        reply: &LevelSlice,
    ) -> Result<DiffStep, MerkleError> {
        let Some(request) = &self.outstanding else {
            return Err(MerkleError::SessionFinished);
        };
        local.check_same_shape(self.leaf_bits)?;
        if reply.leaf_bits != self.leaf_bits {
            return Err(MerkleError::ShapeMismatch {
                local_leaf_bits: self.leaf_bits,
                remote_leaf_bits: reply.leaf_bits,
            });
        }
        if reply.level != request.level {
            return Err(MerkleError::UnexpectedReply {
                reason: "reply is for another level",
            });
        }
        if reply.indexes != request.indexes {
            return Err(MerkleError::UnexpectedReply {
                reason: "reply is for other nodes",
            });
        }

        let mine = &local.levels[usize::from(self.level)];
        for (&index, &theirs) in reply.indexes.iter().zip(&reply.hashes) {
            if mine[index as usize] != theirs {
                self.differing.push(index);
            }
        }

        if self.next_pending == self.pending.len() {
            if self.level == local.depth() || self.differing.is_empty() {
                self.outstanding = None;
                return Ok(DiffStep::Finished(std::mem::take(&mut self.differing)));
            }
            let shift = child_shift(self.leaf_bits, self.level);
            self.pending = self
                .differing
                .drain(..)
                .flat_map(|parent| parent << shift..(parent + 1) << shift)
                .collect();
            self.next_pending = 0;
            self.level += 1;
        }
        let end = self
            .pending
            .len()
            .min(self.next_pending + MAX_NODES_PER_REQUEST);
        let request = DiffRequest {
            leaf_bits: self.leaf_bits,
            level: self.level,
            indexes: self.pending[self.next_pending..end].to_vec(),
        };
        self.nodes_requested += request.indexes.len();
        self.next_pending = end;
        self.outstanding = Some(request.clone());
        Ok(DiffStep::SendRequest(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// Key -> version digest: one replica's view of its keys.
    type Replica = BTreeMap<Vec<u8>, u128>;

    fn tree_of(leaf_bits: u8, replica: &Replica) -> MerkleTree {
        let mut tree = MerkleTree::new(leaf_bits).unwrap();
        for (key, &digest) in replica {
            tree.insert(crate::hash::key_position(key), entry_hash(key, digest));
        }
        tree
    }

    /// Segments of the keys whose entries differ: present on one side only, or other versions.
    fn segments_that_differ(tree: &MerkleTree, a: &Replica, b: &Replica) -> Vec<u32> {
        let mut segments: Vec<u32> = a
            .keys()
            .chain(b.keys())
            .filter(|key| a.get(*key) != b.get(*key))
            .map(|key| tree.segment_of(crate::hash::key_position(key)))
            .collect();
        segments.sort_unstable();
        segments.dedup();
        segments
    }

    /// Drives a session of `local` against `remote` through the wire form, checking every request
    /// only names nodes whose parent differs. Returns the segments and the nodes requested.
    fn remote_diff(local: &MerkleTree, remote: &MerkleTree) -> (Vec<u32>, usize) {
        let (mut session, mut request) = DiffSession::start(local);
        let mut rounds = 0;
        loop {
            rounds += 1;
            assert!(rounds < 10_000, "session does not terminate");
            assert!(request.indexes().len() <= MAX_NODES_PER_REQUEST);
            if request.level() > 0 {
                let shift = child_shift(local.leaf_bits(), request.level() - 1);
                let parents_mine = local.level(request.level() - 1).unwrap();
                let parents_theirs = remote.level(request.level() - 1).unwrap();
                for &index in request.indexes() {
                    let parent = (index >> shift) as usize;
                    assert_ne!(
                        parents_mine[parent], parents_theirs[parent],
                        "asked for a child of an equal node"
                    );
                }
            }
            let mut wire = Vec::new();
            request.encode(&mut wire);
            let received = DiffRequest::decode(&wire).unwrap();
            assert_eq!(received, request);

            let answer = remote.answer(&received).unwrap();
            wire.clear();
            answer.encode(&mut wire);
            let reply = LevelSlice::decode(&wire).unwrap();
            assert_eq!(reply, answer);

            match session.handle_reply(local, &reply).unwrap() {
                DiffStep::SendRequest(next) => {
                    assert_eq!(session.outstanding(), Some(&next));
                    request = next;
                }
                DiffStep::Finished(segments) => {
                    assert!(session.is_finished());
                    return (segments, session.nodes_requested());
                }
            }
        }
    }

    fn entries() -> impl Strategy<Value = Vec<(u64, u128)>> {
        prop::collection::vec((any::<u64>(), any::<u128>()), 0..64)
    }

    fn leaf_bits() -> impl Strategy<Value = u8> {
        prop_oneof![
            Just(1u8),
            Just(4),
            Just(6),
            Just(DEFAULT_LEAF_BITS),
            Just(13)
        ]
    }

    /// Two replicas sharing most keys: some only on one side, some with other versions.
    fn replica_pair() -> impl Strategy<Value = (Replica, Replica)> {
        let key = prop::collection::vec(any::<u8>(), 0..12);
        (
            prop::collection::btree_map(key.clone(), any::<u128>(), 0..80),
            prop::collection::btree_map(key.clone(), any::<u128>(), 0..8),
            prop::collection::btree_map(key, any::<u128>(), 0..8),
            prop::collection::vec(any::<prop::sample::Index>(), 0..4),
        )
            .prop_map(|(shared, only_a, only_b, rewrites)| {
                let mut a = shared.clone();
                let mut b = shared;
                a.extend(only_a);
                b.extend(only_b);
                let keys: Vec<Vec<u8>> = b.keys().cloned().collect();
                if !keys.is_empty() {
                    for pick in rewrites {
                        if let Some(digest) = b.get_mut(pick.get(&keys)) {
                            *digest = digest.wrapping_add(1);
                        }
                    }
                }
                (a, b)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn roots_do_not_depend_on_insertion_order(
            leaf_bits in leaf_bits(),
            (entries, shuffled) in entries().prop_flat_map(|e| (Just(e.clone()), Just(e).prop_shuffle())),
        ) {
            let mut forward = MerkleTree::new(leaf_bits).unwrap();
            for &(pos, entry) in &entries {
                forward.insert(pos, entry);
            }
            let mut other = MerkleTree::new(leaf_bits).unwrap();
            for &(pos, entry) in &shuffled {
                other.insert(pos, entry);
            }
            let rebuilt = MerkleTree::from_entries(leaf_bits, shuffled.iter().copied()).unwrap();
            prop_assert_eq!(forward.root(), other.root());
            for level in 0..=forward.depth() {
                prop_assert_eq!(forward.level(level), other.level(level));
                prop_assert_eq!(forward.level(level), rebuilt.level(level));
            }
            let xor_of_all = entries.iter().fold(0, |acc, &(_, entry)| acc ^ entry);
            prop_assert_eq!(forward.root(), xor_of_all);
        }

        #[test]
        fn removing_after_inserting_restores_the_previous_tree(
            leaf_bits in leaf_bits(),
            base in entries(),
            (extra, extra_shuffled) in entries().prop_flat_map(|e| (Just(e.clone()), Just(e).prop_shuffle())),
            rewrite in any::<u128>(),
        ) {
            let before = MerkleTree::from_entries(leaf_bits, base).unwrap();
            let mut tree = before.clone();
            for &(pos, entry) in &extra {
                tree.insert(pos, entry);
            }
            if let Some(&(pos, entry)) = extra.first() {
                tree.update(pos, Some(entry), Some(rewrite));
                tree.update(pos, Some(rewrite), Some(entry));
            }
            for &(pos, entry) in &extra_shuffled {
                tree.remove(pos, entry);
            }
            prop_assert_eq!(&tree, &before);
        }

        #[test]
        fn diff_finds_exactly_the_segments_of_differing_keys(
            leaf_bits in leaf_bits(),
            (a, b) in replica_pair(),
        ) {
            let (ta, tb) = (tree_of(leaf_bits, &a), tree_of(leaf_bits, &b));
            let expected = segments_that_differ(&ta, &a, &b);
            prop_assert_eq!(ta.diff(&tb).unwrap(), expected.clone());
            prop_assert_eq!(tb.diff(&ta).unwrap(), expected.clone());
            prop_assert_eq!(remote_diff(&ta, &tb).0, expected.clone());
            prop_assert_eq!(remote_diff(&tb, &ta).0, expected);
            prop_assert!(ta.diff(&ta).unwrap().is_empty());
            prop_assert_eq!(remote_diff(&ta, &ta.clone()), (vec![], 1));
        }

        #[test]
        fn diff_work_is_bounded_by_differences_times_fanout_times_depth(
            leaf_bits in leaf_bits(),
            (a, b) in replica_pair(),
        ) {
            let (ta, tb) = (tree_of(leaf_bits, &a), tree_of(leaf_bits, &b));
            let (segments, compared) = ta.diff_counting(&tb).unwrap();
            let bound = 1 + segments.len() * FANOUT * usize::from(ta.depth());
            prop_assert!(compared <= bound, "{} comparisons > {}", compared, bound);
            let (_, requested) = remote_diff(&ta, &tb);
            prop_assert!(requested <= bound, "{} nodes requested > {}", requested, bound);
        }

        #[test]
        fn decode_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(request) = DiffRequest::decode(&bytes) {
                let mut again = Vec::new();
                request.encode(&mut again);
                prop_assert_eq!(again, bytes.clone());
            }
            if let Ok(slice) = LevelSlice::decode(&bytes) {
                let mut again = Vec::new();
                slice.encode(&mut again);
                prop_assert_eq!(again, bytes);
            }
        }

        #[test]
        fn decode_never_panics_on_damaged_messages(
            indexes in prop::collection::btree_set(0u32..4096, 0..40),
            cut in any::<prop::sample::Index>(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        ) {
            let indexes: Vec<u32> = indexes.into_iter().collect();
            let hashes = indexes.iter().map(|&i| u128::from(i) * 0x9e37_79b9).collect();
            let slice = LevelSlice::new(DEFAULT_LEAF_BITS, 3, indexes.clone(), hashes).unwrap();
            let request = DiffRequest::new(DEFAULT_LEAF_BITS, 3, indexes).unwrap();
            let (mut slice_wire, mut request_wire) = (Vec::new(), Vec::new());
            slice.encode(&mut slice_wire);
            request.encode(&mut request_wire);
            for bytes in [&mut slice_wire, &mut request_wire] {
                for (at, value) in &flips {
                    let at = at.index(bytes.len());
                    bytes[at] ^= value;
                }
                let cut = cut.index(bytes.len() + 1);
                for bytes in [&bytes[..cut], &bytes[..]] {
                    let _ = LevelSlice::decode(bytes);
                    let _ = DiffRequest::decode(bytes);
                }
            }
        }
    }

    #[test]
    fn a_single_difference_costs_one_root_and_fanout_nodes_per_level() {
        let base: Replica = (0..500u32)
            .map(|i| (format!("cart:{i}").into_bytes(), u128::from(i)))
            .collect();
        let mut changed = base.clone();
        changed.insert(b"cart:7".to_vec(), 99);
        let (ta, tb) = (
            tree_of(DEFAULT_LEAF_BITS, &base),
            tree_of(DEFAULT_LEAF_BITS, &changed),
        );
        let expected = vec![ta.segment_of(crate::hash::key_position(b"cart:7"))];
        let (segments, requested) = remote_diff(&ta, &tb);
        assert_eq!(segments, expected);
        assert_eq!(requested, 1 + FANOUT * 3);
        assert_eq!(ta.diff_counting(&tb).unwrap(), (expected, 1 + FANOUT * 3));
    }

    #[test]
    fn equal_trees_are_settled_by_their_roots() {
        let tree = MerkleTree::from_entries(DEFAULT_LEAF_BITS, [(1, 2), (u64::MAX, 3)]).unwrap();
        assert_eq!(tree.diff_counting(&tree.clone()).unwrap(), (vec![], 1));
        assert_eq!(remote_diff(&tree, &tree.clone()), (vec![], 1));
    }

    #[test]
    fn large_differences_are_split_into_bounded_requests() {
        let mut a = MerkleTree::new(DEFAULT_LEAF_BITS).unwrap();
        let b = MerkleTree::new(DEFAULT_LEAF_BITS).unwrap();
        for segment in 0..a.segment_count() {
            let (first, _) = a.segment_range(segment).unwrap();
            a.insert(first, u128::from(segment) + 1);
        }
        let (segments, requested) = remote_diff(&a, &b);
        assert_eq!(segments, (0..4096).collect::<Vec<u32>>());
        assert_eq!(requested, 1 + 16 + 256 + 4096);
    }

    #[test]
    fn segments_are_contiguous_and_cover_the_hash_space() {
        for leaf_bits in [MIN_LEAF_BITS, 4, 6, DEFAULT_LEAF_BITS, MAX_LEAF_BITS] {
            let tree = MerkleTree::new(leaf_bits).unwrap();
            let mut next_first = 0u64;
            for segment in 0..tree.segment_count() {
                let (first, last) = tree.segment_range(segment).unwrap();
                assert_eq!(first, next_first);
                assert!(first <= last);
                assert_eq!(tree.segment_of(first), segment);
                assert_eq!(tree.segment_of(last), segment);
                next_first = last.wrapping_add(1);
            }
            assert_eq!(next_first, 0, "the last segment ends at u64::MAX");
            assert_eq!(tree.segment_range(tree.segment_count()), None);
        }
    }

    #[test]
    fn shapes_outside_the_supported_range_are_refused() {
        assert_eq!(
            MerkleTree::new(0),
            Err(MerkleError::LeafBitsOutOfRange { leaf_bits: 0 })
        );
        assert_eq!(
            MerkleTree::new(MAX_LEAF_BITS + 1),
            Err(MerkleError::LeafBitsOutOfRange { leaf_bits: 21 })
        );
        let tree = MerkleTree::new(6).unwrap();
        assert_eq!(tree.depth(), 2);
        assert_eq!(tree.level(0).unwrap().len(), 1);
        assert_eq!(tree.level(1).unwrap().len(), 4);
        assert_eq!(tree.level(2).unwrap().len(), 64);
        assert_eq!(tree.level(3), None);
    }

    #[test]
    fn the_default_tree_takes_less_than_100_kib() {
        let tree = MerkleTree::new(DEFAULT_LEAF_BITS).unwrap();
        let nodes: usize = (0..=tree.depth())
            .map(|l| tree.level(l).unwrap().len())
            .sum();
        assert_eq!(nodes, 1 + 16 + 256 + 4096);
        assert_eq!(nodes * 16, 69_904);
        assert!(nodes * 16 < 100 * 1024);
    }

    #[test]
    fn trees_of_different_shapes_cannot_be_compared() {
        let a = MerkleTree::new(12).unwrap();
        let b = MerkleTree::new(8).unwrap();
        let mismatch = MerkleError::ShapeMismatch {
            local_leaf_bits: 12,
            remote_leaf_bits: 8,
        };
        assert_eq!(a.diff(&b), Err(mismatch.clone()));
        let (mut session, request) = DiffSession::start(&a);
        assert_eq!(b.answer(&request).unwrap_err().label(), "shape_mismatch");
        let foreign = b.answer(&DiffRequest::new(8, 0, vec![0]).unwrap()).unwrap();
        assert_eq!(session.handle_reply(&a, &foreign), Err(mismatch));
        assert_eq!(
            session.outstanding(),
            Some(&request),
            "an error changes nothing"
        );
    }

    #[test]
    fn replies_that_do_not_answer_the_request_are_refused() {
        let a = MerkleTree::from_entries(DEFAULT_LEAF_BITS, [(5, 6)]).unwrap();
        let b = MerkleTree::new(DEFAULT_LEAF_BITS).unwrap();
        let (mut session, _) = DiffSession::start(&a);
        let wrong = b
            .answer(&DiffRequest::new(12, 1, vec![0]).unwrap())
            .unwrap();
        assert_eq!(
            session.handle_reply(&a, &wrong).unwrap_err().label(),
            "unexpected_reply"
        );
        let root = b
            .answer(&DiffRequest::new(12, 0, vec![0]).unwrap())
            .unwrap();
        let DiffStep::SendRequest(next) = session.handle_reply(&a, &root).unwrap() else {
            panic!("roots differ, the session must descend");
        };
        assert_eq!(next.level(), 1);
        assert_eq!(next.indexes(), (0..16).collect::<Vec<u32>>());
        assert_eq!(
            session.handle_reply(&a, &root).unwrap_err().label(),
            "unexpected_reply"
        );
    }

    #[test]
    fn a_finished_session_refuses_more_replies() {
        let tree = MerkleTree::new(4).unwrap();
        let (mut session, request) = DiffSession::start(&tree);
        let reply = tree.answer(&request).unwrap();
        assert_eq!(
            session.handle_reply(&tree, &reply),
            Ok(DiffStep::Finished(vec![]))
        );
        assert_eq!(
            session.handle_reply(&tree, &reply),
            Err(MerkleError::SessionFinished)
        );
    }

    #[test]
    fn invalid_messages_are_refused_on_construction_and_decoding() {
        assert_eq!(
            DiffRequest::new(12, 1, vec![3, 3]),
            Err(MerkleError::IndexesNotIncreasing { level: 1 })
        );
        assert_eq!(
            DiffRequest::new(12, 1, vec![16]),
            Err(MerkleError::IndexOutOfRange {
                level: 1,
                index: 16,
                level_len: 16
            })
        );
        assert_eq!(
            DiffRequest::new(12, 4, vec![]),
            Err(MerkleError::LevelOutOfRange { level: 4, depth: 3 })
        );
        assert!(matches!(
            DiffRequest::new(12, 3, (0..=MAX_NODES_PER_REQUEST as u32).collect()),
            Err(MerkleError::TooManyNodes { .. })
        ));
        assert_eq!(
            LevelSlice::new(12, 0, vec![0], vec![]),
            Err(MerkleError::HashCountMismatch {
                indexes: 1,
                hashes: 0
            })
        );
        // Tag, leaf_bits, level, count 1, index 0x80 0x00 (non-canonical zero continuation).
        assert_eq!(
            DiffRequest::decode(&[TAG_REQUEST, 12, 3, 1, 0x80, 0x00])
                .unwrap_err()
                .label(),
            "malformed"
        );
        // A huge count with no bytes behind it must not allocate.
        assert!(DiffRequest::decode(&[TAG_REQUEST, 12, 3, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
        let mut wire = Vec::new();
        DiffRequest::new(12, 3, vec![1, 2, 4000])
            .unwrap()
            .encode(&mut wire);
        assert_eq!(wire, [TAG_REQUEST, 12, 3, 3, 1, 0, 0x9d, 0x1f]);
        assert!(
            LevelSlice::decode(&wire).is_err(),
            "a request is not a slice"
        );
        wire.push(0);
        assert!(DiffRequest::decode(&wire).is_err(), "trailing bytes");
    }

    #[test]
    fn entry_hashes_depend_on_key_and_version() {
        let h = entry_hash(b"cart:1", 7);
        assert_eq!(h, entry_hash(b"cart:1", 7));
        assert_ne!(h, entry_hash(b"cart:1", 8));
        assert_ne!(h, entry_hash(b"cart:2", 7));
        assert!(MerkleTree::new(DEFAULT_LEAF_BITS).unwrap().is_empty());
        let mut tree = MerkleTree::new(DEFAULT_LEAF_BITS).unwrap();
        tree.insert(crate::hash::key_position(b"cart:1"), h);
        assert!(!tree.is_empty());
        assert_eq!(tree.root(), h);
        tree.clear();
        assert_eq!(tree, MerkleTree::new(DEFAULT_LEAF_BITS).unwrap());
    }
}
