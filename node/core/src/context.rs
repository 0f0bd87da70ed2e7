//! The opaque causal context handed to clients: a [`VersionVector`] sealed into bytes.
//!
//! A client gets a context with every read and write reply and passes it back with its next write
//! of the key; the values it covers are replaced, the others stay as siblings (DESIGN.md §2, §4).
//! Clients must treat it as opaque, so the format can change under a new version byte.
//!
//! # Format (version 1)
//! ```text
//! u8      version = 1
//! u32 LE  body length
//! u8      length check = XOR of the 4 length bytes ^ 0xA5
//! body:   u32 LE cluster tag
//!         varint entry count, then per entry (ids strictly increasing):
//!         varint id length, id bytes, varint counter (>= 1)
//! u32 LE  checksum = low 32 bits of xxh3-64 of every byte before it
//! ```
//! Varints are unsigned LEB128 of minimal length. The empty vector encodes as the empty byte
//! string, and the empty byte string decodes as the empty vector: "no context", a blind write.
//!
//! # Format (version 2)
//! A read of values that carry write ids ([`crate::write_id`]) hands them to the client too:
//! version byte 2, and the body of version 1 followed by `varint count` and the ids
//! (`u128 LE id, u64 LE timestamp` each, ids strictly increasing, at most
//! [`crate::write_id::MAX_CONTEXT_IDS`]). A context without ids is always version 1.
//!
//! # Invariants and laws (tested below)
//! - `decode_context(&encode_context(vv, tag), tag) == Ok(vv)` for every vector within the limits.
//! - Decoding never panics and never allocates more than the input allows, whatever the bytes.
//! - Every proper non-empty prefix of a token is [`ContextError::Truncated`]; every single-bit
//!   flip is [`ContextError::UnknownVersion`] (in the version byte) or
//!   [`ContextError::BadChecksum`] (anywhere else: the length has its own check byte so that a
//!   damaged length is not mistaken for truncation); a token of another cluster is
//!   [`ContextError::ForeignCluster`].
//! - Limits: at most [`MAX_CONTEXT_ENTRIES`] entries and [`MAX_CONTEXT_BYTES`] bytes. Encoding
//!   never fails; a vector beyond the limits encodes to a token that decodes as
//!   [`ContextError::TooLarge`].
//!
//! The checksum catches corruption and hand-made tokens, not forgery: it is not a MAC.

use xxhash_rust::xxh3::xxh3_64;

use crate::NodeId;
use crate::dvvset::VersionVector;
use crate::dvvset::wire::{self, Reader, WireError};
use crate::write_id::{self, ContextIdsError, WriteId};

/// First byte of a context token.
pub const CONTEXT_VERSION: u8 = 1;
/// First byte of a context token that carries write ids.
pub const CONTEXT_VERSION_IDS: u8 = 2;
/// Most entries a context may hold.
pub const MAX_CONTEXT_ENTRIES: usize = 1024;
/// Longest context token accepted, in bytes.
pub const MAX_CONTEXT_BYTES: usize = 64 * 1024;

/// Version byte, body length, length check.
const HEADER_LEN: usize = 1 + 4 + 1;
const CHECKSUM_LEN: usize = 4;
const LENGTH_CHECK_SALT: u8 = 0xa5;

/// Why a client's context was refused. Nothing is changed when this is returned; the write is
/// rejected with `INVALID_ARGUMENT`. Variant names and labels are stable (metric labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    #[error("the context is truncated; pass the whole context returned by the last read")]
    Truncated,
    #[error("the context has unknown format version {0}; pass a context returned by this cluster")]
    UnknownVersion(u8),
    #[error("the context belongs to another cluster")]
    ForeignCluster,
    #[error("the context is corrupted (checksum mismatch); pass the context exactly as returned")]
    BadChecksum,
    #[error("the context is malformed: {0}")]
    Malformed(&'static str),
    #[error(
        "the context is too large (at most {MAX_CONTEXT_ENTRIES} entries and {MAX_CONTEXT_BYTES} bytes)"
    )]
    TooLarge,
}

impl ContextError {
    /// A fixed label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            ContextError::Truncated => "truncated",
            ContextError::UnknownVersion(_) => "unknown_version",
            ContextError::ForeignCluster => "foreign_cluster",
            ContextError::BadChecksum => "bad_checksum",
            ContextError::Malformed(_) => "malformed",
            ContextError::TooLarge => "too_large",
        }
    }
}

fn length_check(len: [u8; 4]) -> u8 {
    len.iter().fold(LENGTH_CHECK_SALT, |acc, b| acc ^ b)
}

fn checksum(bytes: &[u8]) -> u32 {
    // Truncation is the point: the low 32 bits.
    xxh3_64(bytes) as u32
}

/// Seals a version vector into a context token for clients of the cluster `cluster_tag`.
/// The empty vector gives the empty token.
pub fn encode_context(vv: &VersionVector, cluster_tag: u32) -> Vec<u8> {
    encode_context_with_ids(vv, &[], cluster_tag)
}

/// Seals a version vector and the write ids of the values read (normalized as
/// [`Clock::read_ids`](crate::dvvset::Dvvset::read_ids) returns them: strictly increasing, at
/// most [`MAX_CONTEXT_IDS`](crate::write_id::MAX_CONTEXT_IDS)) into a token. Without ids it is [`encode_context`]'s token.
pub fn encode_context_with_ids(vv: &VersionVector, ids: &[WriteId], cluster_tag: u32) -> Vec<u8> {
    if vv.is_empty() && ids.is_empty() {
        return Vec::new();
    }
    let mut body = Vec::with_capacity(4 + 1 + vv.len() * 12 + ids.len() * 24);
    body.extend_from_slice(&cluster_tag.to_le_bytes());
    wire::put_varint(&mut body, vv.len() as u64);
    for (id, counter) in vv.iter() {
        wire::put_bytes(&mut body, id.as_str().as_bytes());
        wire::put_varint(&mut body, counter);
    }
    if ids.is_empty() {
        return seal(CONTEXT_VERSION, &body);
    }
    write_id::encode_context_ids(ids, &mut body);
    seal(CONTEXT_VERSION_IDS, &body)
}

/// Frames a body as a token: version, length and its check byte, the body, the checksum.
fn seal(version: u8, body: &[u8]) -> Vec<u8> {
    // A body over 4 GiB cannot exist in memory; saturating keeps this infallible.
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes();
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + CHECKSUM_LEN);
    out.push(version);
    out.extend_from_slice(&len);
    out.push(length_check(len));
    out.extend_from_slice(body);
    let sum = checksum(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

/// Frames any `body` as a token, so that a fuzzer reaches the body's decoder past the checksum.
/// Exists only in fuzzing builds.
#[cfg(fuzzing)]
pub fn seal_body_for_fuzzing(body: &[u8]) -> Vec<u8> {
    seal(CONTEXT_VERSION, body)
}

/// Opens a context token of the cluster `cluster_tag`. The empty token is the empty vector.
///
/// Checks, in order: size, version, header (length and its check byte), truncation, checksum,
/// cluster, then the body (entry count, node ids, strictly increasing ids, non-zero counters,
/// minimal varints, no trailing bytes). Never panics.
pub fn decode_context(bytes: &[u8], cluster_tag: u32) -> Result<VersionVector, ContextError> {
    decode_context_with_ids(bytes, cluster_tag).map(|(vv, _)| vv)
}

/// [`decode_context`], with the write ids a version 2 token carries (none for version 1).
pub fn decode_context_with_ids(
    bytes: &[u8],
    cluster_tag: u32,
) -> Result<(VersionVector, Vec<WriteId>), ContextError> {
    if bytes.is_empty() {
        return Ok((VersionVector::new(), Vec::new()));
    }
    if bytes.len() > MAX_CONTEXT_BYTES {
        return Err(ContextError::TooLarge);
    }
    let version = bytes[0];
    if version != CONTEXT_VERSION && version != CONTEXT_VERSION_IDS {
        return Err(ContextError::UnknownVersion(version));
    }
    let Some(header) = bytes.get(..HEADER_LEN) else {
        return Err(ContextError::Truncated);
    };
    let len = [header[1], header[2], header[3], header[4]];
    if length_check(len) != header[5] {
        return Err(ContextError::BadChecksum);
    }
    let body_len = u32::from_le_bytes(len) as usize;
    if body_len > MAX_CONTEXT_BYTES {
        return Err(ContextError::TooLarge);
    }
    let expected_len = HEADER_LEN + body_len + CHECKSUM_LEN;
    if bytes.len() < expected_len {
        return Err(ContextError::Truncated);
    }
    if bytes.len() > expected_len {
        return Err(ContextError::Malformed("trailing bytes"));
    }
    let (sealed, sum) = bytes.split_at(HEADER_LEN + body_len);
    if checksum(sealed) != u32::from_le_bytes([sum[0], sum[1], sum[2], sum[3]]) {
        return Err(ContextError::BadChecksum);
    }
    decode_body(
        &sealed[HEADER_LEN..],
        version == CONTEXT_VERSION_IDS,
        cluster_tag,
    )
}

/// The checksummed body: from here on, a problem is a bad encoder, not damage in transit.
fn decode_body(
    body: &[u8],
    with_ids: bool,
    cluster_tag: u32,
) -> Result<(VersionVector, Vec<WriteId>), ContextError> {
    let malformed = |e: WireError| match e {
        WireError::Truncated => ContextError::Malformed("body ends inside a field"),
        WireError::BadVarint => ContextError::Malformed("bad varint"),
    };
    let mut r = Reader::new(body);
    if r.u32_le().map_err(malformed)? != cluster_tag {
        return Err(ContextError::ForeignCluster);
    }
    let count = r.varint().map_err(malformed)?;
    if count > MAX_CONTEXT_ENTRIES as u64 {
        return Err(ContextError::TooLarge);
    }
    // Each entry takes at least 3 bytes, so the allocation is bounded by the input too.
    let mut pairs: Vec<(NodeId, u64)> = Vec::with_capacity((count as usize).min(r.remaining() / 3));
    for _ in 0..count {
        let id_len = r.varint().map_err(malformed)?;
        if id_len > crate::node_id::MAX_NODE_ID_LEN as u64 {
            return Err(ContextError::Malformed("node id too long"));
        }
        let raw = r.take(id_len as usize).map_err(malformed)?;
        let text =
            std::str::from_utf8(raw).map_err(|_| ContextError::Malformed("node id not utf-8"))?;
        let id = NodeId::new(text).map_err(|_| ContextError::Malformed("invalid node id"))?;
        if pairs.last().is_some_and(|(prev, _)| *prev >= id) {
            return Err(ContextError::Malformed("ids not strictly increasing"));
        }
        let counter = r.varint().map_err(malformed)?;
        if counter == 0 {
            return Err(ContextError::Malformed("zero counter"));
        }
        pairs.push((id, counter));
    }
    let ids = if with_ids {
        let ids = write_id::decode_context_ids(&mut r).map_err(|e| match e {
            ContextIdsError::TooMany => ContextError::TooLarge,
            ContextIdsError::Wire(e) => malformed(e),
            ContextIdsError::NotIncreasing => {
                ContextError::Malformed("write ids not strictly increasing")
            }
        })?;
        if ids.is_empty() {
            return Err(ContextError::Malformed("version 2 without write ids"));
        }
        ids
    } else {
        Vec::new()
    };
    if !r.is_empty() {
        return Err(ContextError::Malformed("trailing bytes in body"));
    }
    Ok((VersionVector::from_sorted(pairs), ids))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use proptest::sample::Index;

    use super::*;

    const TAG: u32 = 0xC0FF_EE01;

    fn node(name: &str) -> NodeId {
        NodeId::new(name).expect("valid node id")
    }

    fn sample() -> VersionVector {
        [(node("kv-0"), 3), (node("kv-1"), 1), (node("kv-12"), 300)]
            .into_iter()
            .collect()
    }

    fn body(tag: u32, count: u64, entries: &[(&[u8], u64)]) -> Vec<u8> {
        let mut b = tag.to_le_bytes().to_vec();
        wire::put_varint(&mut b, count);
        for (id, n) in entries {
            wire::put_bytes(&mut b, id);
            wire::put_varint(&mut b, *n);
        }
        b
    }

    #[test]
    fn context_round_trips() {
        let vv = sample();
        let token = encode_context(&vv, TAG);
        assert_eq!(token[0], CONTEXT_VERSION);
        assert_eq!(decode_context(&token, TAG), Ok(vv));
    }

    #[test]
    fn context_with_write_ids_round_trips() {
        let vv = sample();
        let ids = vec![
            WriteId {
                id: 3,
                at: crate::hlc::Timestamp::new(1_700_000_000_000, 1),
            },
            WriteId {
                id: u128::MAX,
                at: crate::hlc::Timestamp::new(1_700_000_000_001, 0),
            },
        ];
        let token = encode_context_with_ids(&vv, &ids, TAG);
        assert_eq!(token[0], CONTEXT_VERSION_IDS);
        assert_eq!(decode_context_with_ids(&token, TAG), Ok((vv.clone(), ids)));
        assert_eq!(decode_context(&token, TAG), Ok(vv.clone()));
        // Without ids: the version 1 token, which reads as no ids.
        let plain = encode_context_with_ids(&vv, &[], TAG);
        assert_eq!(plain, encode_context(&vv, TAG));
        assert_eq!(decode_context_with_ids(&plain, TAG), Ok((vv, Vec::new())));
    }

    #[test]
    fn context_ids_must_be_increasing_and_present() {
        let at = crate::hlc::Timestamp::new(1_700_000_000_000, 0);
        let mut b = body(TAG, 0, &[]);
        let mut unsorted = b.clone();
        write_id::encode_context_ids(
            &[WriteId { id: 2, at }, WriteId { id: 1, at }],
            &mut unsorted,
        );
        assert_eq!(
            decode_context_with_ids(&seal(CONTEXT_VERSION_IDS, &unsorted), TAG),
            Err(ContextError::Malformed("write ids not strictly increasing"))
        );
        wire::put_varint(&mut b, 0);
        assert_eq!(
            decode_context_with_ids(&seal(CONTEXT_VERSION_IDS, &b), TAG),
            Err(ContextError::Malformed("version 2 without write ids"))
        );
    }

    #[test]
    fn context_encoding_is_pinned() {
        let vv: VersionVector = [(node("a"), 2)].into_iter().collect();
        let token = encode_context(&vv, 1);
        assert_eq!(&token[..6], &[1, 8, 0, 0, 0, 8 ^ 0xa5]);
        assert_eq!(&token[6..14], &[1, 0, 0, 0, 1, 1, b'a', 2]);
        assert_eq!(token.len(), 18);
        assert_eq!(
            u32::from_le_bytes(token[14..].try_into().unwrap()),
            xxh3_64(&token[..14]) as u32
        );
    }

    #[test]
    fn empty_context_is_a_blind_write() {
        assert_eq!(encode_context(&VersionVector::new(), TAG), Vec::<u8>::new());
        assert_eq!(decode_context(&[], TAG), Ok(VersionVector::new()));
        // An explicitly encoded empty vector is accepted too.
        assert_eq!(
            decode_context(&seal(CONTEXT_VERSION, &body(TAG, 0, &[])), TAG),
            Ok(VersionVector::new())
        );
    }

    #[test]
    fn context_of_another_cluster_is_refused() {
        let token = encode_context(&sample(), TAG);
        assert_eq!(
            decode_context(&token, TAG + 1),
            Err(ContextError::ForeignCluster)
        );
    }

    #[test]
    fn truncated_context_is_reported_as_truncated() {
        let token = encode_context(&sample(), TAG);
        for keep in 1..token.len() {
            assert_eq!(
                decode_context(&token[..keep], TAG),
                Err(ContextError::Truncated),
                "prefix of {keep} bytes"
            );
        }
    }

    #[test]
    fn every_single_bit_flip_is_caught() {
        let token = encode_context(&sample(), TAG);
        for byte in 0..token.len() {
            for bit in 0..8 {
                let mut damaged = token.clone();
                damaged[byte] ^= 1 << bit;
                let expected = if byte == 0 {
                    ContextError::UnknownVersion(damaged[0])
                } else {
                    ContextError::BadChecksum
                };
                assert_eq!(
                    decode_context(&damaged, TAG),
                    Err(expected),
                    "byte {byte} bit {bit}"
                );
            }
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut token = encode_context(&sample(), TAG);
        token.push(0);
        assert_eq!(
            decode_context(&token, TAG),
            Err(ContextError::Malformed("trailing bytes"))
        );
    }

    #[test]
    fn oversized_contexts_are_refused() {
        assert_eq!(
            decode_context(&vec![CONTEXT_VERSION; MAX_CONTEXT_BYTES + 1], TAG),
            Err(ContextError::TooLarge)
        );
        let too_many: VersionVector = (0..=MAX_CONTEXT_ENTRIES)
            .map(|i| (node(&format!("n{i}")), 1))
            .collect();
        let token = encode_context(&too_many, TAG);
        assert!(token.len() <= MAX_CONTEXT_BYTES);
        assert_eq!(decode_context(&token, TAG), Err(ContextError::TooLarge));
        let at_limit: VersionVector = (0..MAX_CONTEXT_ENTRIES)
            .map(|i| (node(&format!("n{i}")), 1))
            .collect();
        assert_eq!(
            decode_context(&encode_context(&at_limit, TAG), TAG),
            Ok(at_limit)
        );
        // Too many bytes: long ids make a token over 64 KiB with fewer than 1024 entries.
        let long: VersionVector = (0..300).map(|i| (node(&format!("{i:0>253}")), 1)).collect();
        assert_eq!(
            decode_context(&encode_context(&long, TAG), TAG),
            Err(ContextError::TooLarge)
        );
        // A header claiming a huge body is refused before anything else.
        let len = u32::MAX.to_le_bytes();
        let mut header = vec![CONTEXT_VERSION];
        header.extend_from_slice(&len);
        header.push(length_check(len));
        assert_eq!(decode_context(&header, TAG), Err(ContextError::TooLarge));
    }

    #[test]
    fn unknown_version_is_reported_with_the_version() {
        let mut token = encode_context(&sample(), TAG);
        token[0] = 3;
        assert_eq!(
            decode_context(&token, TAG),
            Err(ContextError::UnknownVersion(3))
        );
        assert_eq!(
            decode_context(&[0], TAG),
            Err(ContextError::UnknownVersion(0))
        );
    }

    #[test]
    fn hand_made_bodies_with_a_valid_checksum_are_still_validated() {
        let cases: Vec<(Vec<u8>, ContextError)> = vec![
            (
                vec![1, 2],
                ContextError::Malformed("body ends inside a field"),
            ),
            (
                body(TAG, 2, &[(b"b", 1), (b"a", 1)]),
                ContextError::Malformed("ids not strictly increasing"),
            ),
            (
                body(TAG, 2, &[(b"a", 1), (b"a", 2)]),
                ContextError::Malformed("ids not strictly increasing"),
            ),
            (
                body(TAG, 1, &[(b"a", 0)]),
                ContextError::Malformed("zero counter"),
            ),
            (
                body(TAG, 1, &[(b"a b", 1)]),
                ContextError::Malformed("invalid node id"),
            ),
            (
                body(TAG, 1, &[(&[0xff], 1)]),
                ContextError::Malformed("node id not utf-8"),
            ),
            (
                body(TAG, 1, &[(&[b'a'; 254], 1)]),
                ContextError::Malformed("node id too long"),
            ),
            (
                body(TAG, 2, &[(b"a", 1)]),
                ContextError::Malformed("body ends inside a field"),
            ),
            (
                body(TAG, 0, &[(b"a", 1)]),
                ContextError::Malformed("trailing bytes in body"),
            ),
            (body(TAG, 1025, &[]), ContextError::TooLarge),
            (
                [TAG.to_le_bytes().as_slice(), &[0x80, 0x00]].concat(),
                ContextError::Malformed("bad varint"),
            ),
        ];
        for (b, expected) in cases {
            assert_eq!(
                decode_context(&seal(CONTEXT_VERSION, &b), TAG),
                Err(expected),
                "body {b:?}"
            );
        }
    }

    #[test]
    fn error_labels_are_distinct() {
        let all = [
            ContextError::Truncated,
            ContextError::UnknownVersion(9),
            ContextError::ForeignCluster,
            ContextError::BadChecksum,
            ContextError::Malformed("x"),
            ContextError::TooLarge,
        ];
        let labels: std::collections::BTreeSet<_> = all.iter().map(ContextError::label).collect();
        assert_eq!(labels.len(), all.len());
    }

    fn vv_strategy() -> impl Strategy<Value = VersionVector> {
        prop::collection::vec(("[a-z0-9][a-z0-9.-]{0,12}", 1u64..=u64::MAX), 0..12).prop_map(
            |pairs| {
                pairs
                    .into_iter()
                    .map(|(id, n)| (NodeId::new(id).expect("valid by the regex"), n))
                    .collect()
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

        /// Law 6: every vector round-trips, and only for its own cluster.
        #[test]
        fn contexts_round_trip_for_their_own_cluster(vv in vv_strategy(), tag: u32, other: u32) {
            let token = encode_context(&vv, tag);
            prop_assert_eq!(decode_context(&token, tag), Ok(vv.clone()));
            if tag != other && !vv.is_empty() {
                prop_assert_eq!(decode_context(&token, other), Err(ContextError::ForeignCluster));
            }
        }

        /// Law 6: damage (truncation, a flipped bit, overwritten bytes) is always caught with
        /// the right error.
        #[test]
        fn damaged_contexts_are_refused_with_the_right_error(
            vv in vv_strategy(),
            cut in any::<Index>(),
            flip in (any::<Index>(), 0u8..8),
            overwrite in prop::collection::vec((any::<Index>(), any::<u8>()), 1..4),
        ) {
            prop_assume!(!vv.is_empty());
            let token = encode_context(&vv, TAG);
            let keep = 1 + cut.index(token.len() - 1);
            prop_assert_eq!(decode_context(&token[..keep], TAG), Err(ContextError::Truncated));

            let mut flipped = token.clone();
            let at = flip.0.index(token.len());
            flipped[at] ^= 1 << flip.1;
            let expected = if at == 0 {
                ContextError::UnknownVersion(flipped[0])
            } else {
                ContextError::BadChecksum
            };
            prop_assert_eq!(decode_context(&flipped, TAG), Err(expected));

            let mut scribbled = token.clone();
            for (at, byte) in &overwrite {
                let i = at.index(scribbled.len());
                scribbled[i] = *byte;
            }
            if scribbled != token {
                // Anything but acceptance is right; xxh3's 32 bits make a false accept ~2^-32.
                prop_assert!(decode_context(&scribbled, TAG).is_err());
            }
        }

        /// Law 6: arbitrary bytes, raw or inside a valid envelope, never panic; whatever decodes
        /// re-encodes to the same token.
        #[test]
        fn arbitrary_bytes_never_panic(
            raw in prop::collection::vec(any::<u8>(), 0..64),
            sealed_body in prop::collection::vec(any::<u8>(), 0..64),
            tagged in any::<bool>(),
        ) {
            if let Ok(vv) = decode_context(&raw, TAG)
                && !vv.is_empty()
            {
                prop_assert_eq!(encode_context(&vv, TAG), raw);
            }
            let mut b = sealed_body;
            if tagged {
                // Put the right tag in front so the entry parser is reached.
                let mut with_tag = TAG.to_le_bytes().to_vec();
                with_tag.append(&mut b);
                b = with_tag;
            }
            let token = seal(CONTEXT_VERSION, &b);
            if let Ok(vv) = decode_context(&token, TAG)
                && !vv.is_empty()
            {
                prop_assert_eq!(encode_context(&vv, TAG), token);
            }
        }
    }
}
