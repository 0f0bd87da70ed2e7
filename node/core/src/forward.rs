//! Forwarding a write to a replica of its key, which coordinates it: which replica gets the
//! write next, when to stop, and what the client is told. Pure bookkeeping: the node's KV
//! service makes the calls, keeps the hedge timer and the deadline, and reports here what each
//! call came to.
//!
//! Two rules, chosen by whether the write carries a write id ([`crate::write_id`]):
//! - **with an id** (`siblings` mode) a second coordinator's copy is harmless, so a replica that
//!   has not answered within its hedge delay gets company ([`ForwardPlan::send`] with
//!   `hedge_due`), one that broke off or went silent with the write in hand is followed by the
//!   next, and the first answer wins;
//! - **without** (`lww` mode: a late copy would carry a later timestamp and win over a write
//!   made after the first) the next replica is tried only when the previous one certainly never
//!   got the write, and a broken connection or silence after sending ends the request.
//!
//! In both, a replica that certainly did nothing with the write (no connection, or it answered
//! that it does not coordinate) is followed by the next, and a replica's own error answer (a
//! quorum it could not reach) is the verdict: no further replica is asked, and the verdict is
//! returned once no call still in flight can succeed instead.
//!
//! Invariants (table tests below):
//! - a replica is sent the write at most once, in the order given;
//! - at most one call is in flight without an id;
//! - nothing is sent after a verdict;
//! - every replica that was sent the write and did not answer is named in the failure as one
//!   that may have applied it; one that certainly did not is never named.

use std::fmt;

/// What one forwarded call came to, short of an answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt<V> {
    /// The replica certainly never got the write (no connection), or did nothing with it
    /// (stopping, starting, owning no part of the ring).
    NotSent(String),
    /// The connection broke after the write was sent: it may have been applied.
    Broken(String),
    /// The replica went silent with the write in hand: it may have been applied.
    Silent(String),
    /// The replica answered with an error: its verdict on the write.
    Verdict(V),
    /// No answer before the request's deadline: it may have been applied.
    Deadline,
}

/// The next call to make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call<R> {
    pub replica: R,
    /// Sent beside a call still in flight (a hedge), not in place of one.
    pub hedge: bool,
}

/// What the service does after a call ended without an answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Send the next replica if [`ForwardPlan::send`] offers one, else wait for the calls in
    /// flight.
    Go,
    /// Stop: [`ForwardPlan::finish`] says why.
    Stop,
}

/// Why a forwarded write has no answer for the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure<R, V> {
    /// A replica's own error answer, with the replicas that may have applied the write anyway
    /// (sent it, no answer).
    Verdict { verdict: V, maybe_applied: Vec<R> },
    /// The deadline passed with no answer.
    Deadline {
        failures: Vec<String>,
        maybe_applied: Vec<R>,
    },
    /// Every replica tried stopped answering or could not be reached, and some were sent the
    /// write: it may or may not have been applied.
    Unknown {
        failures: Vec<String>,
        maybe_applied: Vec<R>,
    },
    /// No replica could be sent the write, or every one that was did nothing with it: it was
    /// not applied.
    NotApplied { failures: Vec<String> },
    /// Without a write id: the replica stopped answering after it was sent the write (its
    /// connection broke, or it went silent); it may or may not have been applied, and no other
    /// replica is asked.
    StoppedAnswering { replica: R, why: String },
}

impl<R, V> Failure<R, V> {
    /// The replicas that may have applied the write without answering.
    pub fn maybe_applied(&self) -> &[R] {
        match self {
            Failure::Verdict { maybe_applied, .. }
            | Failure::Deadline { maybe_applied, .. }
            | Failure::Unknown { maybe_applied, .. } => maybe_applied,
            Failure::StoppedAnswering { replica, .. } => std::slice::from_ref(replica),
            Failure::NotApplied { .. } => &[],
        }
    }
}

/// The bookkeeping of one forwarded write.
#[derive(Clone, Debug)]
pub struct ForwardPlan<R, V> {
    /// Replicas not sent the write yet, in the order to try them (reversed: `pop` is next).
    untried: Vec<R>,
    /// With a write id: hedges and retries after sending are allowed.
    retries: bool,
    /// Replicas with the write in hand and no answer yet.
    in_flight: Vec<R>,
    /// Sent as hedges, for the caller's `won` count.
    hedges: Vec<R>,
    /// Replicas that may have applied the write and will not answer.
    maybe_applied: Vec<R>,
    failures: Vec<String>,
    verdict: Option<V>,
    /// The last call ended without the write being applied: the next replica replaces it.
    replace: bool,
    /// A replica went silent with the write in hand (for the caller's fail-fast count).
    silent: bool,
    stopped: Option<(R, String)>,
    /// A call reported the request's deadline.
    expired: bool,
}

impl<R: Clone + PartialEq + fmt::Display, V> ForwardPlan<R, V> {
    /// `replicas` in the order to try them; `retries`: the write carries a write id.
    pub fn new(replicas: Vec<R>, retries: bool) -> ForwardPlan<R, V> {
        let mut untried = replicas;
        untried.reverse();
        ForwardPlan {
            untried,
            retries,
            in_flight: Vec::new(),
            hedges: Vec::new(),
            maybe_applied: Vec::new(),
            failures: Vec::new(),
            verdict: None,
            replace: false,
            silent: false,
            stopped: None,
            expired: false,
        }
    }

    /// The call to make now, if any: the first replica, the next one after a call that did
    /// nothing or stopped answering (with an id), or a hedge once `hedge_due` (with an id; the
    /// caller's timer and budget decide when). Records the replica as in flight.
    pub fn send(&mut self, hedge_due: bool) -> Option<Call<R>> {
        if self.verdict.is_some() || self.stopped.is_some() || self.expired {
            return None;
        }
        let idle = self.in_flight.is_empty();
        let hedge = !idle && !self.replace && hedge_due && self.retries;
        if !(idle || self.replace || hedge) {
            return None;
        }
        let replica = self.untried.pop()?;
        self.replace = false;
        if hedge {
            self.hedges.push(replica.clone());
        }
        self.in_flight.push(replica.clone());
        Some(Call { replica, hedge })
    }

    /// Whether a hedge could be sent now if its time had come: the caller keeps its timer only
    /// while this holds.
    pub fn may_hedge(&self) -> bool {
        self.retries
            && !self.untried.is_empty()
            && !self.in_flight.is_empty()
            && self.verdict.is_none()
            && self.stopped.is_none()
            && !self.expired
    }

    /// Calls in flight: while there are none and [`ForwardPlan::send`] offers nothing, the
    /// request is over.
    pub fn in_flight(&self) -> &[R] {
        &self.in_flight
    }

    /// `replica` answered: the request's answer. True if it was a hedge that won.
    pub fn answered(&mut self, replica: &R) -> bool {
        self.in_flight.retain(|r| r != replica);
        self.hedges.contains(replica)
    }

    /// `replica`'s call ended without an answer.
    pub fn failed(&mut self, replica: &R, attempt: Attempt<V>) -> Step {
        self.in_flight.retain(|r| r != replica);
        match attempt {
            Attempt::NotSent(why) => {
                self.failures.push(why);
                self.replace = true;
            }
            Attempt::Broken(why) => return self.stopped_answering(replica, why, false),
            Attempt::Silent(why) => return self.stopped_answering(replica, why, true),
            Attempt::Verdict(v) => {
                if self.verdict.is_none() {
                    self.verdict = Some(v);
                }
                if self.in_flight.is_empty() {
                    return Step::Stop;
                }
            }
            Attempt::Deadline => {
                self.maybe_applied.push(replica.clone());
                self.failures
                    .push(format!("{replica} did not answer before the deadline"));
                self.expired = true;
                return Step::Stop;
            }
        }
        Step::Go
    }

    /// `replica` broke off or went silent with the write in hand.
    fn stopped_answering(&mut self, replica: &R, why: String, silent: bool) -> Step {
        self.silent |= silent;
        if !self.retries {
            self.stopped = Some((replica.clone(), why));
            return Step::Stop;
        }
        self.failures
            .push(format!("{replica} stopped answering ({why})"));
        self.maybe_applied.push(replica.clone());
        self.replace = true;
        Step::Go
    }

    /// A replica went silent with the write in hand during the request (the caller counts a
    /// fast failure when that ends it).
    pub fn went_silent(&self) -> bool {
        self.silent
    }

    /// Why the request has no answer, once it stopped (no call in flight and nothing to send,
    /// [`Step::Stop`], or the deadline: `deadline_passed`). Calls still in flight were sent the
    /// write, so they are named as ones that may have applied it.
    pub fn finish(mut self, deadline_passed: bool) -> Failure<R, V> {
        if let Some((replica, why)) = self.stopped {
            return Failure::StoppedAnswering { replica, why };
        }
        let mut maybe_applied = std::mem::take(&mut self.maybe_applied);
        maybe_applied.append(&mut self.in_flight);
        let failures = self.failures;
        if let Some(verdict) = self.verdict {
            return Failure::Verdict {
                verdict,
                maybe_applied,
            };
        }
        if deadline_passed || self.expired {
            return Failure::Deadline {
                failures,
                maybe_applied,
            };
        }
        if maybe_applied.is_empty() {
            Failure::NotApplied { failures }
        } else {
            Failure::Unknown {
                failures,
                maybe_applied,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Plan = ForwardPlan<&'static str, &'static str>;

    fn sent(plan: &mut Plan, hedge_due: bool) -> Option<(&'static str, bool)> {
        plan.send(hedge_due).map(|s| (s.replica, s.hedge))
    }

    #[test]
    fn the_first_replica_goes_alone_and_its_answer_ends_the_request() {
        let mut plan = Plan::new(vec!["a", "b", "c"], true);
        assert_eq!(sent(&mut plan, false), Some(("a", false)));
        assert_eq!(
            sent(&mut plan, false),
            None,
            "one call until a hedge is due"
        );
        assert!(plan.may_hedge());
        assert!(!plan.answered(&"a"), "the first call is no hedge");
        assert!(plan.in_flight().is_empty());
    }

    #[test]
    fn with_a_write_id_a_slow_replica_gets_company_and_the_hedge_may_win() {
        let mut plan = Plan::new(vec!["a", "b", "c"], true);
        sent(&mut plan, false);
        assert_eq!(sent(&mut plan, true), Some(("b", true)));
        assert_eq!(plan.in_flight(), ["a", "b"]);
        assert!(plan.answered(&"b"), "the hedge won");
    }

    #[test]
    fn without_a_write_id_nothing_is_hedged() {
        let mut plan = Plan::new(vec!["a", "b", "c"], false);
        sent(&mut plan, false);
        assert!(!plan.may_hedge());
        assert_eq!(sent(&mut plan, true), None);
        assert_eq!(plan.in_flight(), ["a"]);
    }

    #[test]
    fn a_replica_that_never_got_the_write_is_followed_by_the_next_in_both_modes() {
        for retries in [true, false] {
            let mut plan = Plan::new(vec!["a", "b"], retries);
            sent(&mut plan, false);
            let why = "a: stopping, does not coordinate".to_string();
            assert_eq!(plan.failed(&"a", Attempt::NotSent(why)), Step::Go);
            assert_eq!(
                sent(&mut plan, false),
                Some(("b", false)),
                "a replacement, no hedge"
            );
            plan.failed(&"b", Attempt::NotSent("b unreachable".into()));
            assert_eq!(sent(&mut plan, false), None, "no replica left");
            assert!(plan.in_flight().is_empty());
            match plan.finish(false) {
                Failure::NotApplied { failures } => assert_eq!(failures.len(), 2),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn with_a_write_id_silence_is_followed_by_the_next_and_named_if_all_fail() {
        let mut plan = Plan::new(vec!["a", "b"], true);
        sent(&mut plan, false);
        assert_eq!(plan.failed(&"a", Attempt::Silent("quiet".into())), Step::Go);
        assert_eq!(sent(&mut plan, false), Some(("b", false)));
        plan.failed(&"b", Attempt::Broken("reset".into()));
        assert!(plan.went_silent());
        let failure = plan.finish(false);
        assert_eq!(failure.maybe_applied(), ["a", "b"]);
        assert!(matches!(failure, Failure::Unknown { .. }), "{failure:?}");
    }

    #[test]
    fn without_a_write_id_silence_or_a_broken_call_ends_the_request() {
        for attempt in [
            Attempt::Silent("quiet".into()),
            Attempt::Broken("reset".into()),
        ] {
            let silent = matches!(attempt, Attempt::Silent(_));
            let mut plan = Plan::new(vec!["a", "b"], false);
            sent(&mut plan, false);
            assert_eq!(plan.failed(&"a", attempt), Step::Stop);
            assert_eq!(sent(&mut plan, false), None, "b is never asked");
            assert_eq!(plan.went_silent(), silent);
            match plan.finish(false) {
                Failure::StoppedAnswering { replica, .. } => assert_eq!(replica, "a"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_verdict_waits_for_the_calls_in_flight_and_stops_sending() {
        let mut plan = Plan::new(vec!["a", "b", "c"], true);
        sent(&mut plan, false);
        sent(&mut plan, true);
        assert_eq!(
            plan.failed(&"a", Attempt::Verdict("quorum W=2 not reached")),
            Step::Go
        );
        assert!(!plan.may_hedge());
        assert_eq!(sent(&mut plan, true), None, "nothing after a verdict");
        assert_eq!(plan.in_flight(), ["b"], "b may still succeed");
        // b answers: that is the request's answer despite a's verdict.
        assert!(plan.answered(&"b"));
    }

    #[test]
    fn a_verdict_is_returned_once_nothing_is_in_flight_naming_who_may_have_applied() {
        let mut plan = Plan::new(vec!["a", "b", "c"], true);
        sent(&mut plan, false);
        sent(&mut plan, true);
        assert_eq!(plan.failed(&"b", Attempt::Silent("quiet".into())), Step::Go);
        // The next replaces the silent hedge.
        assert_eq!(sent(&mut plan, false), Some(("c", false)));
        assert_eq!(plan.failed(&"a", Attempt::Verdict("first")), Step::Go);
        assert_eq!(plan.failed(&"c", Attempt::Verdict("second")), Step::Stop);
        match plan.finish(false) {
            Failure::Verdict {
                verdict,
                maybe_applied,
            } => {
                assert_eq!(verdict, "first", "the first verdict is kept");
                assert_eq!(maybe_applied, ["b"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_lone_verdict_names_nobody() {
        let mut plan = Plan::new(vec!["a", "b"], false);
        sent(&mut plan, false);
        assert_eq!(plan.failed(&"a", Attempt::Verdict("refused")), Step::Stop);
        assert_eq!(
            plan.finish(false),
            Failure::Verdict {
                verdict: "refused",
                maybe_applied: vec![]
            }
        );
    }

    #[test]
    fn calls_in_flight_at_the_deadline_are_named_as_ones_that_may_have_applied() {
        let mut plan = Plan::new(vec!["a", "b", "c"], true);
        sent(&mut plan, false);
        sent(&mut plan, true);
        assert_eq!(plan.failed(&"a", Attempt::Deadline), Step::Stop);
        assert_eq!(sent(&mut plan, false), None, "nothing after the deadline");
        // b is still in flight.
        match plan.finish(false) {
            Failure::Deadline {
                failures,
                maybe_applied,
            } => {
                assert_eq!(maybe_applied, ["a", "b"]);
                assert_eq!(failures, ["a did not answer before the deadline"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_replica_is_sent_the_write_at_most_once_in_order() {
        // Every schedule of outcomes over four replicas, hedging whenever allowed.
        let outcomes = |i: u8| -> Attempt<&'static str> {
            match i % 5 {
                0 => Attempt::NotSent("not sent".into()),
                1 => Attempt::Broken("broken".into()),
                2 => Attempt::Silent("silent".into()),
                3 => Attempt::Verdict("verdict"),
                _ => Attempt::Deadline,
            }
        };
        for retries in [true, false] {
            for schedule in 0..5u16.pow(4) {
                for hedge_every in [false, true] {
                    let mut plan = Plan::new(vec!["a", "b", "c", "d"], retries);
                    let mut order = Vec::new();
                    let mut codes = schedule;
                    let mut not_sent = Vec::new();
                    let mut verdicts = Vec::new();
                    loop {
                        while let Some(s) = plan.send(hedge_every) {
                            order.push(s.replica);
                            if !retries {
                                assert!(plan.in_flight().len() <= 1);
                            }
                        }
                        let Some(&first) = plan.in_flight().first() else {
                            break;
                        };
                        let attempt = outcomes((codes % 5) as u8);
                        codes /= 5;
                        match attempt {
                            Attempt::NotSent(_) => not_sent.push(first),
                            Attempt::Verdict(_) => verdicts.push(first),
                            _ => {}
                        }
                        if plan.failed(&first, attempt) == Step::Stop {
                            break;
                        }
                    }
                    let mut sorted = order.clone();
                    sorted.sort();
                    sorted.dedup();
                    assert_eq!(sorted.len(), order.len(), "sent twice: {order:?}");
                    assert_eq!(order, ["a", "b", "c", "d"][..order.len()]);
                    let failure = plan.finish(false);
                    for r in failure.maybe_applied() {
                        assert!(order.contains(r), "{r} named but never sent");
                        assert!(!not_sent.contains(r), "{r} never got it but is named");
                    }
                    for r in &order {
                        let named = failure.maybe_applied().contains(r);
                        let answered = not_sent.contains(r) || verdicts.contains(r);
                        assert!(named || answered, "{r} got it, no answer, not named");
                    }
                }
            }
        }
    }
}
