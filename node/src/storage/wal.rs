//! The write-ahead log of [`RedbBackend`](super::RedbBackend): each committed batch is appended
//! as one checksummed record and synced with one `fdatasync` before the batch is acknowledged;
//! redb applies it with a non-durable commit and is made durable only at checkpoints, after which
//! the log starts over. At open, the records newer than the last checkpoint are applied again.
//!
//! # Format
//!
//! A 16-byte header (`DKVWAL01`, then the database's log id, u64 little-endian: a log is only ever
//! replayed into the database that created it), then records:
//!
//! ```text
//! [u32 payload length][u32 crc32 of lsn and payload][u64 lsn][payload]
//! payload: [u32 op count] then per op [u8 kind: 0 put, 1 delete][u8 table][u32 key length][key]
//!          and for a put [u32 value length][value]
//! ```
//!
//! All integers are little-endian. Sequence numbers (lsn) go up by one per record. Reading stops at
//! the first record that is torn (shorter than its length), fails its checksum, does not decode, or
//! does not follow its predecessor's lsn: everything after it was never acknowledged (a record is
//! acknowledged only once it and all before it are synced). A log that was reset and written again
//! may still hold records of its previous round after the new ones; their lsns are older, so the
//! sequence check ends the read there.

use std::io;

use super::{Table, WriteOp};

/// Where a log lives: a file in production, a device that forgets unsynced writes in the crash
/// tests. Offsets are bytes from the start.
// `len` is a device's size, as in `redb::StorageBackend`; there is no emptiness to ask about.
#[allow(clippy::len_without_is_empty)]
pub trait LogDevice: Send + Sync + 'static {
    /// Current length.
    fn len(&self) -> io::Result<u64>;
    /// Fills `out` from `offset`; an error if that reaches past the end.
    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()>;
    /// Writes all of `data` at `offset`, growing the device if needed.
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Truncates or extends (with zeros).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes every earlier write durable.
    fn sync_data(&self) -> io::Result<()>;
}

/// A log in a file.
#[derive(Debug)]
pub struct LogFile(pub std::fs::File);

impl LogDevice for LogFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.0, out, offset)
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.0, data, offset)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
}

const MAGIC: [u8; 8] = *b"DKVWAL01";
/// Length of the header; an empty log is exactly this long.
pub(super) const HEADER_LEN: u64 = 16;
const RECORD_HEADER_LEN: usize = 16;
/// Records longer than this are taken for damage when reading back (a batch is bounded far below
/// it by `storage.max_batch_bytes`).
const MAX_PAYLOAD_LEN: usize = 1 << 30;

const KIND_PUT: u8 = 0;
const KIND_DELETE: u8 = 1;

/// One record read back.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Record {
    pub lsn: u64,
    pub ops: Vec<WriteOp>,
}

fn table_index(table: Table) -> u8 {
    // Three tables: the index always fits.
    table.index() as u8
}

fn table_at(index: u8) -> Option<Table> {
    Table::ALL.get(usize::from(index)).copied()
}

/// Appends the record of `ops` with sequence number `lsn` to `out`.
pub(super) fn encode(lsn: u64, ops: &[WriteOp], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; RECORD_HEADER_LEN]);
    out.extend_from_slice(&(ops.len() as u32).to_le_bytes());
    for op in ops {
        match op {
            WriteOp::Put { table, key, value } => {
                out.push(KIND_PUT);
                out.push(table_index(*table));
                out.extend_from_slice(&(key.len() as u32).to_le_bytes());
                out.extend_from_slice(key);
                out.extend_from_slice(&(value.len() as u32).to_le_bytes());
                out.extend_from_slice(value);
            }
            WriteOp::Delete { table, key } => {
                out.push(KIND_DELETE);
                out.push(table_index(*table));
                out.extend_from_slice(&(key.len() as u32).to_le_bytes());
                out.extend_from_slice(key);
            }
        }
    }
    let payload_len = (out.len() - start - RECORD_HEADER_LEN) as u32;
    out[start + 8..start + 16].copy_from_slice(&lsn.to_le_bytes());
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start..start + 4].copy_from_slice(&payload_len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.bytes.len() < n {
            return None;
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("four bytes")))
    }

    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("eight bytes")))
    }

    fn bytes(&mut self) -> Option<Vec<u8>> {
        let len = usize::try_from(self.u32()?).ok()?;
        self.take(len).map(<[u8]>::to_vec)
    }
}

fn decode_payload(payload: &[u8]) -> Option<Vec<WriteOp>> {
    let mut r = Reader { bytes: payload };
    let count = r.u32()?;
    // Every op takes at least 6 bytes: a damaged count cannot make us allocate much.
    let mut ops = Vec::with_capacity((count as usize).min(payload.len() / 6));
    for _ in 0..count {
        let kind = r.u8()?;
        let table = table_at(r.u8()?)?;
        let key = r.bytes()?;
        ops.push(match kind {
            KIND_PUT => WriteOp::Put {
                table,
                key,
                value: r.bytes()?,
            },
            KIND_DELETE => WriteOp::Delete { table, key },
            _ => return None,
        });
    }
    r.bytes.is_empty().then_some(ops)
}

/// The records of a log image after its header, in order, up to the end of the valid sequence.
pub(super) fn decode_records(mut bytes: &[u8]) -> Vec<Record> {
    let mut records: Vec<Record> = Vec::new();
    while bytes.len() >= RECORD_HEADER_LEN {
        let mut r = Reader { bytes };
        let (Some(len), Some(crc), Some(lsn)) = (r.u32(), r.u32(), r.u64()) else {
            break;
        };
        let Ok(len) = usize::try_from(len) else { break };
        if len > MAX_PAYLOAD_LEN {
            break;
        }
        let Some(payload) = r.take(len) else { break };
        if crc32fast::hash(&bytes[8..RECORD_HEADER_LEN + len]) != crc {
            break;
        }
        if records.last().is_some_and(|last| lsn != last.lsn + 1) {
            break;
        }
        let Some(ops) = decode_payload(payload) else {
            break;
        };
        records.push(Record { lsn, ops });
        bytes = r.bytes;
    }
    records
}

/// What the start of a log device holds.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Header {
    /// A log of the database with this id.
    Log(u64),
    /// Nothing, or not a log header.
    NotALog,
}

pub(super) fn read_header(device: &dyn LogDevice) -> io::Result<Header> {
    if device.len()? < HEADER_LEN {
        return Ok(Header::NotALog);
    }
    let mut header = [0u8; HEADER_LEN as usize];
    device.read(0, &mut header)?;
    if header[..8] != MAGIC {
        return Ok(Header::NotALog);
    }
    Ok(Header::Log(u64::from_le_bytes(
        header[8..].try_into().expect("eight bytes"),
    )))
}

/// Every record after the header of `device`, up to the end of the valid sequence.
pub(super) fn read_records(device: &dyn LogDevice) -> io::Result<Vec<Record>> {
    let len = device.len()?;
    if len <= HEADER_LEN {
        return Ok(Vec::new());
    }
    let len = usize::try_from(len - HEADER_LEN).map_err(io::Error::other)?;
    let mut bytes = vec![0; len];
    device.read(HEADER_LEN, &mut bytes)?;
    Ok(decode_records(&bytes))
}

/// An open log, appended to by the single writer.
pub(super) struct Log {
    device: Box<dyn LogDevice>,
    /// Where the next record goes.
    end: u64,
    /// The lsn of the last record appended (or checkpointed).
    last_lsn: u64,
    /// Ops appended since the last reset.
    ops: u64,
    buffer: Vec<u8>,
}

impl Log {
    /// Writes a new, empty log of database `id` over whatever `device` holds.
    pub fn create(device: Box<dyn LogDevice>, id: u64) -> io::Result<Log> {
        let mut header = [0u8; HEADER_LEN as usize];
        header[..8].copy_from_slice(&MAGIC);
        header[8..].copy_from_slice(&id.to_le_bytes());
        device.set_len(0)?;
        device.write(0, &header)?;
        device.sync_data()?;
        Ok(Log::resume(device, 0))
    }

    /// A log that holds nothing newer than `last_lsn` (the caller has checkpointed everything in
    /// it and will [`Log::reset`] it before appending).
    pub fn resume(device: Box<dyn LogDevice>, last_lsn: u64) -> Log {
        Log {
            device,
            end: HEADER_LEN,
            last_lsn,
            ops: 0,
            buffer: Vec::new(),
        }
    }

    /// The lsn of the last record appended.
    pub fn last_lsn(&self) -> u64 {
        self.last_lsn
    }

    /// Bytes of records since the last reset.
    pub fn record_bytes(&self) -> u64 {
        self.end - HEADER_LEN
    }

    /// Ops appended since the last reset.
    pub fn ops(&self) -> u64 {
        self.ops
    }

    /// Appends `ops` as one record and syncs it; returns once it is durable.
    pub fn append(&mut self, ops: &[WriteOp]) -> io::Result<()> {
        let lsn = self.last_lsn + 1;
        self.buffer.clear();
        encode(lsn, ops, &mut self.buffer);
        self.device.write(self.end, &self.buffer)?;
        self.device.sync_data()?;
        self.end += self.buffer.len() as u64;
        self.last_lsn = lsn;
        self.ops += ops.len() as u64;
        // A batch far larger than usual should not keep its buffer alive.
        if self.buffer.capacity() > 4 * 1024 * 1024 {
            self.buffer = Vec::new();
        }
        Ok(())
    }

    /// Drops every record (the database holds them durably up to `lsn`) and goes on after
    /// `lsn`: for the log that takes over from another whose last record was `lsn`.
    pub fn reset_after(&mut self, lsn: u64) -> io::Result<()> {
        self.reset()?;
        self.last_lsn = lsn;
        Ok(())
    }

    /// Drops every record (the database holds them durably now); the lsns go on.
    pub fn reset(&mut self) -> io::Result<()> {
        self.device.set_len(HEADER_LEN)?;
        self.device.sync_data()?;
        self.end = HEADER_LEN;
        self.ops = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &str) -> WriteOp {
        WriteOp::Put {
            table: Table::Data,
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
        }
    }

    fn batch(i: u64) -> Vec<WriteOp> {
        vec![
            put(&format!("k{i}"), &"v".repeat(i as usize)),
            WriteOp::Delete {
                table: Table::Hints,
                key: format!("h{i}").into_bytes(),
            },
            WriteOp::Put {
                table: Table::Meta,
                key: vec![],
                value: vec![],
            },
        ]
    }

    fn log_of(lsns: impl IntoIterator<Item = u64>) -> Vec<u8> {
        let mut out = Vec::new();
        for lsn in lsns {
            encode(lsn, &batch(lsn), &mut out);
        }
        out
    }

    #[test]
    fn records_round_trip_in_order() {
        let records = decode_records(&log_of(5..9));
        let lsns: Vec<u64> = records.iter().map(|r| r.lsn).collect();
        assert_eq!(lsns, vec![5, 6, 7, 8]);
        for record in &records {
            assert_eq!(record.ops, batch(record.lsn));
        }
        assert_eq!(decode_records(&log_of([1]))[0].ops.len(), 3);
        let mut empty = Vec::new();
        encode(3, &[], &mut empty);
        assert_eq!(
            decode_records(&empty),
            vec![Record {
                lsn: 3,
                ops: vec![]
            }]
        );
    }

    #[test]
    fn a_torn_last_record_ends_the_log() {
        let whole = log_of(1..4);
        let two = log_of(1..3).len();
        for cut in two..whole.len() {
            let records = decode_records(&whole[..cut]);
            assert_eq!(records.len(), 2, "cut at {cut} of {}", whole.len());
        }
    }

    #[test]
    fn a_damaged_byte_ends_the_log_at_that_record() {
        let whole = log_of(1..4);
        let first = log_of([1]).len();
        for at in 0..first {
            let mut damaged = whole.clone();
            damaged[at] ^= 0x40;
            assert!(decode_records(&damaged).is_empty(), "byte {at}");
        }
        let mut damaged = whole.clone();
        damaged[first + 20] ^= 1;
        assert_eq!(decode_records(&damaged).len(), 1);
    }

    #[test]
    fn an_older_record_after_newer_ones_ends_the_log() {
        // A log reset and written again over records of its previous round.
        let mut bytes = log_of([11, 12]);
        bytes.extend(log_of([7, 8]));
        let lsns: Vec<u64> = decode_records(&bytes).iter().map(|r| r.lsn).collect();
        assert_eq!(lsns, vec![11, 12]);
        let mut gap = log_of([1]);
        gap.extend(log_of([3]));
        assert_eq!(decode_records(&gap).len(), 1);
    }

    #[test]
    fn zeros_and_garbage_are_no_records() {
        assert!(decode_records(&[0; 4096]).is_empty());
        assert!(decode_records(&[0xff; 4096]).is_empty());
        // A record claiming an absurd length.
        let mut bytes = log_of([1]);
        bytes[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_records(&bytes).is_empty());
    }

    #[test]
    fn a_checksummed_record_with_a_bad_body_is_no_record() {
        // An op count far larger than the payload, with a valid checksum.
        let mut bytes = vec![0u8; RECORD_HEADER_LEN];
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        bytes[0..4].copy_from_slice(&4u32.to_le_bytes());
        bytes[8..16].copy_from_slice(&1u64.to_le_bytes());
        let crc = crc32fast::hash(&bytes[8..]);
        bytes[4..8].copy_from_slice(&crc.to_le_bytes());
        assert!(decode_records(&bytes).is_empty());
    }
}
