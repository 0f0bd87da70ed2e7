//! Per-peer latency and responsiveness: when to hedge a request, and when to stop waiting for a
//! peer that has gone silent, long before gossip calls it down.
//!
//! Pure bookkeeping over times the caller passes in (milliseconds of a monotonic clock), so it is
//! table- and property-tested without a clock.
//!
//! - **Round-trip estimate**: RFC 6298's smoothed RTT and RTT variance (`srtt`, `rttvar`). The
//!   hedge delay, `srtt + 4 * rttvar` clamped to [`HedgePolicy`]'s bounds, stands in for the
//!   peer's recent p99: TCP uses the same expression for its retransmission timeout, for the same
//!   reason (a delay past which an answer is unlikely to come).
//! - **Silence**: a peer is *silent* when a request sent to it has waited longer than
//!   [`HedgePolicy::silence_ms`] times the hedge delay (at least [`HedgePolicy::min_silence_ms`])
//!   with no reply of any kind heard since it was sent. A paused process or a cut-off link is
//!   silent within about a second (the floor keeps a peer that is merely slow on a starved
//!   machine from being called silent); gossip needs several seconds. A silent peer stays silent
//!   until it is heard again or [`HedgePolicy::silence_hold_ms`] passes (then it is tried again).
//! - **Hedge budget**: hedged requests are bounded by a token bucket that earns a fraction of a
//!   token per request, so that a slow cluster is not flooded with duplicates.

/// Bounds of hedging and silence detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HedgePolicy {
    /// Least hedge delay (ms): below it, a duplicate costs more than it saves.
    pub min_delay_ms: u64,
    /// Most hedge delay (ms), and the delay before any sample was taken.
    pub max_delay_ms: u64,
    /// A request unanswered for this many hedge delays (with nothing heard since) makes the peer
    /// silent.
    pub silence_ms: u64,
    /// Least time (ms) unanswered before a peer is called silent.
    pub min_silence_ms: u64,
    /// How long (ms) a silent peer stays silent without being heard.
    pub silence_hold_ms: u64,
    /// Hedges allowed per request, in thousandths (100 = one hedge per ten requests).
    pub budget_per_mille: u64,
    /// Most hedges saved up in the budget.
    pub budget_burst: u64,
}

impl Default for HedgePolicy {
    fn default() -> Self {
        HedgePolicy {
            min_delay_ms: 10,
            max_delay_ms: 200,
            silence_ms: 5,
            min_silence_ms: 1_000,
            silence_hold_ms: 1_000,
            budget_per_mille: 100,
            budget_burst: 50,
        }
    }
}

/// RFC 6298 round-trip estimate, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RttEstimate {
    srtt_us: u64,
    rttvar_us: u64,
    samples: u64,
}

impl RttEstimate {
    /// Takes one measured round trip.
    pub fn sample(&mut self, rtt_us: u64) {
        if self.samples == 0 {
            self.srtt_us = rtt_us;
            self.rttvar_us = rtt_us / 2;
        } else {
            // rttvar = 3/4 rttvar + 1/4 |srtt - rtt|; srtt = 7/8 srtt + 1/8 rtt
            let dev = self.srtt_us.abs_diff(rtt_us);
            self.rttvar_us = (3 * self.rttvar_us + dev) / 4;
            self.srtt_us = (7 * self.srtt_us + rtt_us) / 8;
        }
        self.samples = self.samples.saturating_add(1);
    }

    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// Smoothed round trip (µs).
    pub fn srtt_us(&self) -> u64 {
        self.srtt_us
    }

    /// `srtt + 4 * rttvar` (µs): the recent high percentile the hedge delay follows.
    pub fn high_us(&self) -> u64 {
        self.srtt_us
            .saturating_add(self.rttvar_us.saturating_mul(4))
    }
}

/// What one node knows of one peer's latency and silence.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerHealth {
    rtt: RttEstimate,
    outstanding: u64,
    /// When the oldest request sent since the peer was last heard went out.
    waiting_since_ms: Option<u64>,
    /// Silent until then, unless heard before.
    silent_until_ms: Option<u64>,
}

impl PeerHealth {
    /// A request went out at `now_ms`.
    pub fn sent(&mut self, now_ms: u64) {
        self.outstanding += 1;
        self.waiting_since_ms.get_or_insert(now_ms);
    }

    /// A reply (any answer, an error included) came back at `now_ms`, `rtt_us` after its
    /// request went out.
    pub fn heard(&mut self, now_ms: u64, rtt_us: u64) {
        self.outstanding = self.outstanding.saturating_sub(1);
        self.rtt.sample(rtt_us);
        self.silent_until_ms = None;
        // Requests still out now wait from this moment on: the peer just spoke.
        self.waiting_since_ms = (self.outstanding > 0).then_some(now_ms);
    }

    /// A request ended without a reply (its caller's deadline, a broken stream) at `now_ms`.
    pub fn unanswered(&mut self, now_ms: u64, policy: &HedgePolicy) {
        self.outstanding = self.outstanding.saturating_sub(1);
        if let Some(since) = self.waiting_since_ms
            && now_ms.saturating_sub(since) >= self.silence_after_ms(policy)
        {
            self.silent_until_ms = Some(now_ms + policy.silence_hold_ms);
        }
        if self.outstanding == 0 {
            self.waiting_since_ms = None;
        }
    }

    /// The delay after which a request to this peer is hedged (ms).
    pub fn hedge_delay_ms(&self, policy: &HedgePolicy) -> u64 {
        if self.rtt.samples() == 0 {
            return policy.max_delay_ms;
        }
        self.rtt
            .high_us()
            .div_ceil(1000)
            .clamp(policy.min_delay_ms, policy.max_delay_ms)
    }

    fn silence_after_ms(&self, policy: &HedgePolicy) -> u64 {
        (self.hedge_delay_ms(policy) * policy.silence_ms).max(policy.min_silence_ms)
    }

    /// Whether the peer is silent at `now_ms`: a request waited too long with nothing heard, or
    /// one ended so and the hold has not passed.
    pub fn is_silent(&self, now_ms: u64, policy: &HedgePolicy) -> bool {
        if self.silent_until_ms.is_some_and(|until| now_ms < until) {
            return true;
        }
        self.waiting_since_ms
            .is_some_and(|since| now_ms.saturating_sub(since) >= self.silence_after_ms(policy))
    }

    /// How long a request sent now is expected to wait for this peer (microseconds), the key by
    /// which reads choose which replicas to ask first: a silent peer waits forever; a peer with
    /// a request out for longer than its hedge delay, nothing heard since, at least as long as
    /// that request has waited already (a paused process ranks last well before it is silent);
    /// a peer never heard from, the longest hedge delay; any other, its smoothed round trip.
    pub fn expected_wait_us(&self, now_ms: u64, policy: &HedgePolicy) -> u64 {
        if self.is_silent(now_ms, policy) {
            return u64::MAX;
        }
        if self.rtt.samples() == 0 {
            return policy.max_delay_ms * 1000;
        }
        let waited_ms = self
            .waiting_since_ms
            .map_or(0, |since| now_ms.saturating_sub(since));
        if waited_ms > self.hedge_delay_ms(policy) {
            return (waited_ms * 1000).saturating_add(self.rtt.srtt_us());
        }
        self.rtt.srtt_us()
    }

    pub fn rtt(&self) -> &RttEstimate {
        &self.rtt
    }

    pub fn outstanding(&self) -> u64 {
        self.outstanding
    }
}

/// A token bucket bounding hedged requests to a share of all requests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HedgeBudget {
    /// Thousandths of a hedge saved up.
    milli: u64,
}

impl HedgeBudget {
    /// One request was made: earn its share of a hedge.
    pub fn earn(&mut self, policy: &HedgePolicy) {
        self.milli = (self.milli + policy.budget_per_mille).min(policy.budget_burst * 1000);
    }

    /// Spends one hedge if the budget has one.
    pub fn try_spend(&mut self) -> bool {
        if self.milli >= 1000 {
            self.milli -= 1000;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const P: HedgePolicy = HedgePolicy {
        min_delay_ms: 10,
        max_delay_ms: 200,
        silence_ms: 3,
        min_silence_ms: 250,
        silence_hold_ms: 1_000,
        budget_per_mille: 100,
        budget_burst: 5,
    };

    #[test]
    fn hedge_delay_follows_the_peers_round_trips_within_bounds() {
        let mut h = PeerHealth::default();
        assert_eq!(
            h.hedge_delay_ms(&P),
            200,
            "no sample yet: the longest delay"
        );
        for _ in 0..50 {
            h.sent(0);
            h.heard(0, 2_000);
        }
        assert_eq!(h.hedge_delay_ms(&P), 10, "2 ms steady: the least delay");
        for _ in 0..50 {
            h.sent(0);
            h.heard(0, 40_000);
        }
        let d = h.hedge_delay_ms(&P);
        assert!(
            (40..=200).contains(&d),
            "40 ms steady: about 40 ms, got {d}"
        );
        for _ in 0..50 {
            h.sent(0);
            h.heard(0, 5_000_000);
        }
        assert_eq!(h.hedge_delay_ms(&P), 200, "capped");
    }

    #[test]
    fn a_peer_that_stops_answering_is_silent_after_the_bound_and_not_before() {
        let mut h = PeerHealth::default();
        for t in 0..20 {
            h.sent(t);
            h.heard(t, 1_000);
        }
        h.sent(100);
        assert!(!h.is_silent(100, &P));
        assert!(!h.is_silent(349, &P), "before the 250 ms floor");
        assert!(h.is_silent(350, &P));
        // The caller gives up: it stays silent for the hold, then is tried again.
        h.unanswered(400, &P);
        assert!(h.is_silent(1_399, &P));
        assert!(!h.is_silent(1_400, &P));
    }

    #[test]
    fn hearing_anything_ends_silence_and_restarts_the_wait() {
        let mut h = PeerHealth::default();
        h.sent(0);
        h.sent(10);
        // No sample yet: the longest hedge delay (200 ms), silent after three of them.
        assert!(!h.is_silent(599, &P));
        assert!(h.is_silent(600, &P));
        h.heard(600, 600_000);
        assert!(!h.is_silent(600, &P));
        // One request is still out: it waits from the moment the peer last spoke.
        assert_eq!(h.outstanding(), 1);
        assert!(!h.is_silent(1_100, &P));
        assert!(h.is_silent(1_200, &P));
    }

    #[test]
    fn a_quick_failure_does_not_make_a_peer_silent() {
        let mut h = PeerHealth::default();
        h.sent(0);
        h.unanswered(5, &P);
        assert!(!h.is_silent(5, &P));
        assert!(
            !h.is_silent(10_000, &P),
            "nothing outstanding, nothing silent"
        );
    }

    #[test]
    fn expected_wait_ranks_fast_before_slow_before_stuck_before_silent() {
        let steady = |rtt_us| {
            let mut h = PeerHealth::default();
            for t in 0..20 {
                h.sent(t);
                h.heard(t, rtt_us);
            }
            h
        };
        let fast = steady(1_000);
        let slow = steady(30_000);
        assert!(fast.expected_wait_us(100, &P) < slow.expected_wait_us(100, &P));
        assert_eq!(
            PeerHealth::default().expected_wait_us(100, &P),
            200_000,
            "never heard from: the longest hedge delay"
        );
        // The fast peer stops answering: within its hedge delay it still ranks by its round
        // trip, past it by how long it has been stuck, and once silent it ranks last.
        let mut stuck = fast.clone();
        stuck.sent(100);
        assert_eq!(
            stuck.expected_wait_us(105, &P),
            fast.expected_wait_us(105, &P)
        );
        let after = stuck.expected_wait_us(160, &P);
        assert!(
            after > slow.expected_wait_us(160, &P),
            "stuck 60 ms: {after} us"
        );
        assert!(
            stuck.expected_wait_us(200, &P) > after,
            "the longer, the later"
        );
        assert_eq!(stuck.expected_wait_us(350, &P), u64::MAX, "silent");
        // Heard again: back to its round trip.
        stuck.heard(400, 1_000);
        assert!(stuck.expected_wait_us(400, &P) < slow.expected_wait_us(400, &P));
    }

    #[test]
    fn the_budget_allows_a_share_of_requests_and_a_bounded_burst() {
        let mut b = HedgeBudget::default();
        assert!(!b.try_spend());
        for _ in 0..10 {
            b.earn(&P);
        }
        assert!(b.try_spend());
        assert!(!b.try_spend());
        for _ in 0..1_000 {
            b.earn(&P);
        }
        let spent = (0..100).filter(|_| b.try_spend()).count();
        assert_eq!(spent, 5, "the burst bound");
    }

    proptest! {
        /// Hedges never exceed the burst plus the earned share, whatever the order of events.
        #[test]
        fn hedges_stay_within_the_budget(ops in proptest::collection::vec(any::<bool>(), 0..2_000)) {
            let mut b = HedgeBudget::default();
            let (mut requests, mut hedges) = (0u64, 0u64);
            for earn in ops {
                if earn {
                    b.earn(&P);
                    requests += 1;
                } else if b.try_spend() {
                    hedges += 1;
                }
            }
            prop_assert!(hedges * 1000 <= requests * P.budget_per_mille);
        }

        /// The delay always lies within the policy's bounds.
        #[test]
        fn delay_within_bounds(samples in proptest::collection::vec(0u64..10_000_000, 0..100)) {
            let mut h = PeerHealth::default();
            for s in samples {
                h.sent(0);
                h.heard(0, s);
            }
            let d = h.hedge_delay_ms(&P);
            prop_assert!((P.min_delay_ms..=P.max_delay_ms).contains(&d));
        }
    }
}
