//! The hash functions every node must agree on, forever: changing one reshuffles every key.

use xxhash_rust::xxh3::{xxh3_64, xxh3_128};

/// Position of a key on the ring: xxh3-64 of its bytes (stable across platforms and versions).
pub fn key_position(key: &[u8]) -> u64 {
    xxh3_64(key)
}

/// 128-bit hash of a byte string, used for Merkle leaves and digests.
pub fn hash128(bytes: &[u8]) -> u128 {
    xxh3_128(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The values are pinned: a change here would move every key of every existing cluster.
    #[test]
    fn key_positions_are_pinned() {
        assert_eq!(key_position(b""), 0x2d06800538d394c2);
        assert_eq!(key_position(b"cart:42"), key_position(b"cart:42"));
        assert_ne!(key_position(b"cart:42"), key_position(b"cart:43"));
    }
}
