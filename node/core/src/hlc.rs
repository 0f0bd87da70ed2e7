//! Hybrid logical clock (Kulkarni et al. 2014), with time passed in.
//!
//! A [`Timestamp`] packs 48 bits of physical milliseconds since the Unix epoch (enough until the
//! year 10889) above a 16-bit logical counter, so that comparing the packed `u64` compares
//! `(physical_ms, logical)` lexicographically. `lww` conflict resolution orders siblings by it.
//!
//! Invariants of a [`HybridClock`]:
//! - Every timestamp it returns is strictly greater than every timestamp it returned before and
//!   every remote timestamp it accepted, whatever wall time is passed in (a wall clock that steps
//!   backwards only makes the logical counter run). The one exception is the saturation point
//!   (physical `2^48 - 1`, logical `u16::MAX`), which a real clock never reaches.
//! - A logical counter that overflows carries into the physical part: the timestamp runs ahead of
//!   the wall clock by at most the number of events over 65,535 per millisecond.
//! - It never reads a clock: `wall_ms` is an input, so the simulation drives it with virtual time.
//! - It refuses ([`ClockError::RemoteTooFarAhead`]) to adopt a remote timestamp more than
//!   `max_drift_ms` ahead of the local wall clock, so one node with a wild clock cannot drag every
//!   other node's timestamps (and the `lww` winner) into the future.

/// Bits of the logical counter in a packed [`Timestamp`].
pub const LOGICAL_BITS: u32 = 16;
/// Largest physical time a [`Timestamp`] can hold; larger wall times are saturated to it.
pub const MAX_PHYSICAL_MS: u64 = (1 << (64 - LOGICAL_BITS)) - 1;
/// How far ahead of the local wall clock a remote timestamp may be by default: one minute.
pub const DEFAULT_MAX_DRIFT_MS: u64 = 60_000;

/// A hybrid logical timestamp: physical milliseconds (48 bits) then a logical counter (16 bits).
/// The derived order is the order of `(physical_ms, logical)`.
#[derive(
    Copy,
    Clone,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Debug,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The smallest timestamp (the epoch, logical 0).
    pub const ZERO: Timestamp = Timestamp(0);

    /// Packs a timestamp. A `physical_ms` beyond [`MAX_PHYSICAL_MS`] is saturated to it.
    pub const fn new(physical_ms: u64, logical: u16) -> Self {
        let physical_ms = if physical_ms > MAX_PHYSICAL_MS {
            MAX_PHYSICAL_MS
        } else {
            physical_ms
        };
        Timestamp((physical_ms << LOGICAL_BITS) | logical as u64)
    }

    /// Milliseconds since the Unix epoch.
    pub const fn physical_ms(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }

    /// The logical counter within the millisecond.
    pub const fn logical(self) -> u16 {
        // Truncation is the point: the low 16 bits are the counter.
        (self.0 & 0xffff) as u16
    }

    /// The packed form (what goes on the wire and to disk).
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// Unpacks [`Timestamp::as_u64`]. Every `u64` is a valid timestamp.
    pub const fn from_u64(packed: u64) -> Self {
        Timestamp(packed)
    }

    /// The next timestamp: logical + 1, carrying into the physical part; saturates at the maximum.
    const fn successor(self) -> Self {
        Timestamp(self.0.saturating_add(1))
    }
}

/// Why a remote timestamp was refused. The clock's state is unchanged when this is returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClockError {
    #[error(
        "remote timestamp is {ahead_ms} ms ahead of the local wall clock; at most {max_drift_ms} ms is accepted"
    )]
    RemoteTooFarAhead { ahead_ms: u64, max_drift_ms: u64 },
}

/// A hybrid logical clock. Pure: the caller passes the wall time in on every call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HybridClock {
    last: Timestamp,
    max_drift_ms: u64,
}

impl Default for HybridClock {
    fn default() -> Self {
        Self::new()
    }
}

impl HybridClock {
    /// A clock that has issued nothing yet, accepting remote timestamps up to
    /// [`DEFAULT_MAX_DRIFT_MS`] ahead of the wall clock.
    pub fn new() -> Self {
        Self::with_max_drift_ms(DEFAULT_MAX_DRIFT_MS)
    }

    /// A clock that has issued nothing yet, accepting remote timestamps up to `max_drift_ms` ahead.
    pub fn with_max_drift_ms(max_drift_ms: u64) -> Self {
        HybridClock {
            last: Timestamp::ZERO,
            max_drift_ms,
        }
    }

    /// The last timestamp issued (or [`Timestamp::ZERO`]); persist it to stay monotonic across a
    /// restart whose wall clock went backwards, and feed it back through [`HybridClock::observe`].
    pub fn last(&self) -> Timestamp {
        self.last
    }

    /// The largest accepted lead of a remote timestamp over the wall clock.
    pub fn max_drift_ms(&self) -> u64 {
        self.max_drift_ms
    }

    /// A timestamp for a local event (a write this node coordinates): the wall time if it is
    /// ahead of everything issued so far, else the successor of the last timestamp.
    pub fn now(&mut self, wall_ms: u64) -> Timestamp {
        let wall = Timestamp::new(wall_ms, 0);
        self.last = if wall > self.last {
            wall
        } else {
            self.last.successor()
        };
        self.last
    }

    /// Merges a timestamp received from another node and returns a timestamp for the receive
    /// event, greater than both `remote` and everything issued before.
    ///
    /// Refuses a `remote` whose physical part is more than `max_drift_ms` ahead of `wall_ms`; the
    /// clock is then unchanged.
    pub fn observe(&mut self, remote: Timestamp, wall_ms: u64) -> Result<Timestamp, ClockError> {
        let limit_ms = wall_ms.saturating_add(self.max_drift_ms);
        if remote.physical_ms() > limit_ms {
            return Err(ClockError::RemoteTooFarAhead {
                ahead_ms: remote.physical_ms() - wall_ms,
                max_drift_ms: self.max_drift_ms,
            });
        }
        let wall = Timestamp::new(wall_ms, 0);
        let seen = self.last.max(remote);
        self.last = if wall > seen { wall } else { seen.successor() };
        Ok(self.last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000_000;

    #[test]
    fn timestamps_pack_physical_above_logical() {
        let ts = Timestamp::new(T0, 7);
        assert_eq!(ts.physical_ms(), T0);
        assert_eq!(ts.logical(), 7);
        assert_eq!(ts.as_u64(), (T0 << 16) | 7);
        assert_eq!(Timestamp::from_u64(ts.as_u64()), ts);
        assert!(Timestamp::new(T0, u16::MAX) < Timestamp::new(T0 + 1, 0));
    }

    #[test]
    fn physical_time_beyond_48_bits_saturates() {
        let ts = Timestamp::new(u64::MAX, 3);
        assert_eq!(ts.physical_ms(), MAX_PHYSICAL_MS);
        assert_eq!(ts.logical(), 3);
    }

    #[test]
    fn now_follows_the_wall_clock_when_it_moves_forward() {
        let mut clock = HybridClock::new();
        assert_eq!(clock.now(T0), Timestamp::new(T0, 0));
        assert_eq!(clock.now(T0 + 5), Timestamp::new(T0 + 5, 0));
    }

    #[test]
    fn now_never_goes_backwards_when_the_wall_clock_does() {
        let mut clock = HybridClock::new();
        let a = clock.now(T0);
        let b = clock.now(T0);
        let c = clock.now(T0 - 10_000);
        assert!(a < b && b < c);
        assert_eq!(c, Timestamp::new(T0, 2));
        assert_eq!(clock.now(T0 + 1), Timestamp::new(T0 + 1, 0));
    }

    #[test]
    fn logical_overflow_carries_into_physical_time() {
        let mut clock = HybridClock::new();
        clock.observe(Timestamp::new(T0, u16::MAX - 1), T0).unwrap();
        assert_eq!(clock.last(), Timestamp::new(T0, u16::MAX));
        let next = clock.now(T0);
        assert_eq!(next, Timestamp::new(T0 + 1, 0));
        assert!(next > Timestamp::new(T0, u16::MAX));
    }

    #[test]
    fn observe_moves_past_a_remote_timestamp_ahead_of_us() {
        let mut clock = HybridClock::new();
        clock.now(T0);
        let remote = Timestamp::new(T0 + 30_000, 4);
        let got = clock.observe(remote, T0).unwrap();
        assert_eq!(got, Timestamp::new(T0 + 30_000, 5));
        assert!(clock.now(T0) > got);
    }

    #[test]
    fn observe_of_an_old_remote_still_advances_the_clock() {
        let mut clock = HybridClock::new();
        let local = clock.now(T0);
        let got = clock.observe(Timestamp::new(T0 - 1, 9), T0).unwrap();
        assert!(got > local);
        assert_eq!(got, Timestamp::new(T0, 1));
        let later = clock.observe(Timestamp::new(T0 - 1, 9), T0 + 3).unwrap();
        assert_eq!(later, Timestamp::new(T0 + 3, 0));
    }

    #[test]
    fn remote_too_far_ahead_is_refused_and_leaves_the_clock_unchanged() {
        let mut clock = HybridClock::with_max_drift_ms(1_000);
        clock.now(T0);
        let before = clock.clone();
        let err = clock
            .observe(Timestamp::new(T0 + 1_001, 0), T0)
            .unwrap_err();
        assert_eq!(
            err,
            ClockError::RemoteTooFarAhead {
                ahead_ms: 1_001,
                max_drift_ms: 1_000
            }
        );
        assert_eq!(clock, before);
        assert!(clock.observe(Timestamp::new(T0 + 1_000, 0), T0).is_ok());
    }

    #[test]
    fn default_drift_limit_is_one_minute() {
        let mut clock = HybridClock::default();
        assert_eq!(clock.max_drift_ms(), DEFAULT_MAX_DRIFT_MS);
        assert!(clock.observe(Timestamp::new(T0 + 60_000, 0), T0).is_ok());
        assert!(clock.observe(Timestamp::new(T0 + 60_001, 0), T0).is_err());
    }

    #[test]
    fn timestamps_are_strictly_increasing_under_any_wall_and_remote_sequence() {
        // A fixed pseudo-random walk (seeded, so the test is reproducible).
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut clock = HybridClock::new();
        let mut prev = Timestamp::ZERO;
        let mut wall = T0;
        for _ in 0..10_000 {
            let r = next();
            wall = (wall + r % 5).saturating_sub((r >> 8) % 4);
            let ts = if r % 3 == 0 {
                let remote = Timestamp::new(wall + (r >> 16) % 50, (r >> 32) as u16);
                let got = clock.observe(remote, wall).unwrap();
                assert!(got > remote);
                got
            } else {
                clock.now(wall)
            };
            assert!(ts > prev, "{ts:?} after {prev:?}");
            prev = ts;
        }
    }
}
