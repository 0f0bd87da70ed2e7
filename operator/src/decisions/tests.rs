//! Table tests for every flow (create, scale up with ramps, scale down with drains, refusal
//! below N, changes of mind, rolling replacement), and a property test: from arbitrary observed
//! states and changes of mind, following the decisions reaches the spec without ever draining
//! a node while it would be the last holder of a range.

use super::*;
use proptest::prelude::*;

const HASH: &str = "current";

/// Observed state with `sts` ready pods on the current template and no answering node.
fn obs(replicas: i32, sts: Option<i32>) -> Observed {
    Observed {
        name: "kv".into(),
        replicas,
        n: 3,
        steps: vec![25, 50, 100],
        template_hash: HASH.into(),
        problems: vec![],
        waiting_for_tls: None,
        sts_replicas: sts,
        pods: (0..sts.unwrap_or(0).max(0) as u32)
            .map(|i| {
                (
                    i,
                    PodView {
                        ready: true,
                        template_hash: Some(HASH.into()),
                        terminating: false,
                    },
                )
            })
            .collect(),
        cluster: None,
    }
}

/// Members by ordinal from tokens `<weight>[><target>][flags]`, `_` for no member. Flags:
/// `j` joining, `l` leaving, `x` left, `r` removed, `d` down, `s` suspect. Without a flag the
/// lifecycle is normal for weight > 0 and joining for 0.
fn members(o: Observed, spec: &str) -> Observed {
    let mut view = ClusterView::default();
    for (i, tok) in spec.split_whitespace().enumerate() {
        if tok == "_" {
            continue;
        }
        let digits_end = tok
            .find(|c: char| !c.is_ascii_digit() && c != '>')
            .unwrap_or(tok.len());
        let (nums, flags) = tok.split_at(digits_end);
        let (w, t) = match nums.split_once('>') {
            Some((w, t)) => (w.parse().unwrap(), t.parse().unwrap()),
            None => {
                let w: u32 = nums.parse().unwrap();
                (w, w)
            }
        };
        let mut lifecycle = if w > 0 {
            Lifecycle::Normal
        } else {
            Lifecycle::Joining
        };
        let mut liveness = Liveness::Alive;
        for f in flags.chars() {
            match f {
                'j' => lifecycle = Lifecycle::Joining,
                'l' => lifecycle = Lifecycle::Leaving,
                'x' => lifecycle = Lifecycle::Left,
                'r' => lifecycle = Lifecycle::Removed,
                'd' => liveness = Liveness::Down,
                's' => liveness = Liveness::Suspect,
                other => panic!("flag {other}"),
            }
        }
        view.members.insert(
            format!("kv-{i}"),
            Member {
                weight: w,
                target_weight: t,
                lifecycle,
                liveness,
            },
        );
    }
    Observed {
        cluster: Some(view),
        ..o
    }
}

fn set_weight(node: &str, weight: u32) -> AdminAction {
    AdminAction::SetWeight {
        node: node.into(),
        weight,
    }
}
fn leave(node: &str) -> AdminAction {
    AdminAction::Leave { node: node.into() }
}

#[test]
fn create_makes_the_statefulset_at_the_spec_size() {
    let p = decide(&obs(5, None));
    assert_eq!(p.sts_replicas, Some(5));
    assert_eq!(p.reason.code, ReasonCode::Creating);
    assert!(p.admin.is_empty() && p.in_progress);
}

#[test]
fn a_new_cluster_waits_for_every_node_then_gives_each_full_weight_at_once() {
    let p = decide(&members(obs(3, Some(3)), "0 0 _"));
    assert_eq!(p.reason.code, ReasonCode::WaitingForNodes);
    assert!(p.reason.message.contains("kv-2"), "{}", p.reason.message);
    assert!(p.admin.is_empty());

    let p = decide(&members(obs(3, Some(3)), "0 0 0"));
    assert_eq!(p.reason.code, ReasonCode::Bootstrapping);
    assert_eq!(p.work, Work::Creating);
    assert_eq!(
        p.admin,
        vec![
            set_weight("kv-0", 100),
            set_weight("kv-1", 100),
            set_weight("kv-2", 100)
        ]
    );
    // While the first weights are being taken, it is still creation.
    let p = decide(&members(obs(3, Some(3)), "0>100 0>100 0>100"));
    assert_eq!(p.work, Work::Creating);
    assert_eq!(p.reason.code, ReasonCode::WaitingForRebalance);
}

#[test]
fn without_an_answering_node_the_statefulset_keeps_its_size_or_grows() {
    let p = decide(&obs(3, Some(3)));
    assert_eq!(p.reason.code, ReasonCode::NoNodeAnswers);
    assert_eq!(p.sts_replicas, Some(3));
    let p = decide(&obs(3, Some(5)));
    assert_eq!(p.sts_replicas, Some(5), "never shrink blind");
    let p = decide(&obs(5, Some(3)));
    assert_eq!(p.sts_replicas, Some(5));
}

#[test]
fn scale_up_raises_the_statefulset_first() {
    let p = decide(&members(obs(5, Some(3)), "100 100 100"));
    assert_eq!(p.sts_replicas, Some(5));
    assert_eq!(p.reason.code, ReasonCode::ScalingUp);
    assert!(p.admin.is_empty());
    assert_eq!(p.work, Work::ScalingUp);
}

#[test]
fn scale_up_ramps_new_nodes_one_step_at_a_time_lowest_ordinal_first() {
    let table: &[(&str, Option<AdminAction>, ReasonCode)] = &[
        (
            "100 100 100 0 0",
            Some(set_weight("kv-3", 25)),
            ReasonCode::RampingWeight,
        ),
        ("100 100 100 0>25 0", None, ReasonCode::WaitingForRebalance),
        (
            "100 100 100 25 0",
            Some(set_weight("kv-3", 50)),
            ReasonCode::RampingWeight,
        ),
        (
            "100 100 100 50 0",
            Some(set_weight("kv-3", 100)),
            ReasonCode::RampingWeight,
        ),
        (
            "100 100 100 100 0",
            Some(set_weight("kv-4", 25)),
            ReasonCode::RampingWeight,
        ),
        // A wanted member whose target was lowered behind the operator's back is restored.
        ("100 100>50 100 100 25", None, ReasonCode::CancellingDrain),
        ("100 100 100 100 100", None, ReasonCode::Settled),
    ];
    for (spec, action, code) in table {
        let p = decide(&members(obs(5, Some(5)), spec));
        assert_eq!(p.reason.code, *code, "{spec}: {}", p.reason.message);
        if *code != ReasonCode::CancellingDrain {
            assert_eq!(
                p.admin,
                action.iter().cloned().collect::<Vec<_>>(),
                "{spec}"
            );
        }
        assert_eq!(p.sts_replicas, Some(5), "{spec}");
    }
}

#[test]
fn a_step_waits_while_a_member_that_owns_data_is_down_or_busy() {
    let p = decide(&members(obs(5, Some(5)), "100 100d 100 25 0"));
    assert_eq!(p.reason.code, ReasonCode::WaitingForHealthy);
    assert!(p.reason.message.contains("kv-1"), "{}", p.reason.message);
    assert!(p.admin.is_empty());
    let p = decide(&members(obs(5, Some(5)), "100 100 100 25 0>25"));
    assert_eq!(p.reason.code, ReasonCode::WaitingForRebalance);
    assert!(p.admin.is_empty());
}

#[test]
fn scale_down_drains_the_highest_ordinal_first_and_keeps_the_statefulset() {
    let p = decide(&members(obs(3, Some(5)), "100 100 100 100 100"));
    assert_eq!(p.admin, vec![leave("kv-4")]);
    assert_eq!(p.reason.code, ReasonCode::Draining);
    assert_eq!(p.sts_replicas, Some(5));
    assert_eq!(p.work, Work::ScalingDown);
}

#[test]
fn scale_down_lowers_the_statefulset_only_past_drained_nodes() {
    let p = decide(&members(obs(3, Some(5)), "100 100 100 100 100>0l"));
    assert_eq!(p.reason.code, ReasonCode::WaitingForDrain);
    assert_eq!(p.sts_replicas, Some(5));
    assert!(p.admin.is_empty());

    let p = decide(&members(obs(3, Some(5)), "100 100 100 100 0x"));
    assert_eq!(p.sts_replicas, Some(4));
    assert_eq!(p.admin, vec![leave("kv-3")]);
    // Both steps are reported: the drain as the reason, the removal of kv-4 beside it.
    assert_eq!(p.reason.code, ReasonCode::Draining);
    let (removal, action) = p.also.as_ref().expect("the removal is reported too");
    assert_eq!(removal.code, ReasonCode::RemovingNodes);
    assert_eq!(action, "StatefulSet(4)");
    assert!(removal.message.contains("kv-4"), "{}", removal.message);
    assert!(
        p.reason.message.starts_with(&removal.message),
        "{}",
        p.reason.message
    );

    let p = decide(&members(obs(3, Some(4)), "100 100 100 0>0l 0x"));
    assert_eq!(
        p.reason.code,
        ReasonCode::WaitingForDrain,
        "leaving is not left yet"
    );
    assert_eq!(p.sts_replicas, Some(4));

    let p = decide(&members(obs(3, Some(4)), "100 100 100 0x 0xd"));
    assert_eq!(p.sts_replicas, Some(3));
    assert_eq!(p.reason.code, ReasonCode::RemovingNodes);
}

#[test]
fn a_node_that_never_joined_or_owns_nothing_goes_without_a_drain() {
    let p = decide(&members(obs(3, Some(5)), "100 100 100 0 _"));
    assert_eq!(p.sts_replicas, Some(3));
    assert!(p.admin.is_empty());
}

#[test]
fn members_scaled_away_stay_members_that_own_nothing() {
    // Neither left nor weight-0 members are removed: the node refuses to remove a left member,
    // and a removed one could not take a weight again after a later scale-up.
    let p = decide(&members(obs(3, Some(3)), "100 100 100 0x 0xd 0d"));
    assert!(p.admin.is_empty());
    assert_eq!(p.reason.code, ReasonCode::Settled);
    // And they do not hold up the next step.
    let p = decide(&members(obs(4, Some(4)), "100 100 100 0 0xd"));
    assert_eq!(p.admin, vec![set_weight("kv-3", 25)]);
}

#[test]
fn replicas_below_n_are_refused_and_the_cluster_keeps_n_nodes() {
    let p = decide(&members(obs(2, Some(3)), "100 100 100"));
    assert!(
        p.refusal
            .as_deref()
            .unwrap()
            .contains("below replicationFactor 3")
    );
    assert_eq!(p.sts_replicas, Some(3));
    assert!(p.admin.is_empty());
    assert!(!p.in_progress);

    // From 5, a request for 1 drains down to 3 and no further.
    let p = decide(&members(obs(1, Some(5)), "100 100 100 100 100"));
    assert_eq!(p.admin, vec![leave("kv-4")]);
    let p = decide(&members(obs(1, Some(3)), "100 100 100 0xd 0xd"));
    assert_eq!(p.sts_replicas, Some(3));
    assert!(
        !p.admin
            .iter()
            .any(|a| matches!(a, AdminAction::Leave { .. }))
    );

    let p = decide(&obs(1, None));
    assert_eq!(p.sts_replicas, Some(3));
    assert!(p.refusal.is_some());
}

#[test]
fn changed_mind_during_a_drain_cancels_it() {
    // 5 -> 4 (kv-4 draining), then 5 again.
    let p = decide(&members(obs(5, Some(5)), "100 100 100 100 100>0l"));
    assert_eq!(p.admin, vec![set_weight("kv-4", 100)]);
    assert_eq!(p.reason.code, ReasonCode::CancellingDrain);
    assert_eq!(p.sts_replicas, Some(5));
    // The drain finished before the change of mind was seen: it rejoins through the ramp.
    let p = decide(&members(obs(5, Some(5)), "100 100 100 100 0x"));
    assert_eq!(p.admin, vec![set_weight("kv-4", 25)]);
    assert_eq!(p.reason.code, ReasonCode::Rejoining);
    // ... once its pod runs again (the StatefulSet had already let it go).
    let p = decide(&members(obs(5, Some(4)), "100 100 100 100 0xd"));
    assert_eq!(p.sts_replicas, Some(5));
    assert!(p.admin.is_empty());
    assert_eq!(p.reason.code, ReasonCode::WaitingForNodes);
}

#[test]
fn changed_mind_3_to_5_to_4_to_5_converges() {
    // 3 -> 5: raised, kv-3 ramping, kv-4 joined at 0.
    let p = decide(&members(obs(5, Some(5)), "100 100 100 25 0"));
    assert_eq!(p.admin, vec![set_weight("kv-3", 50)]);
    // -> 4: kv-4 owns nothing and goes at once; kv-3 keeps ramping.
    let p = decide(&members(obs(4, Some(5)), "100 100 100 25>50 0"));
    assert_eq!(p.sts_replicas, Some(4));
    assert!(p.admin.is_empty());
    // -> 5 again: raised again, kv-4 (down since its pod went) waits for its pod.
    let p = decide(&members(obs(5, Some(4)), "100 100 100 50 0d"));
    assert_eq!(p.sts_replicas, Some(5));
    assert_eq!(p.admin, vec![set_weight("kv-3", 100)]);
}

#[test]
fn scale_up_during_a_drain_of_a_higher_node() {
    // 5 -> 3 while kv-4 drains; then 4: kv-3 stays, kv-4 finishes draining and goes.
    let p = decide(&members(obs(4, Some(5)), "100 100 100 100 100>0l"));
    assert_eq!(p.reason.code, ReasonCode::WaitingForDrain);
    let p = decide(&members(obs(4, Some(5)), "100 100 100 100>0l 100>0l"));
    assert_eq!(
        p.admin,
        vec![set_weight("kv-3", 100)],
        "kv-3 is wanted: cancel first"
    );
}

#[test]
fn a_drain_waits_when_too_few_nodes_that_stay_own_data_and_ramps_them_first() {
    let p = decide(&members(obs(3, Some(4)), "100 100 0 100"));
    assert_eq!(p.admin, vec![set_weight("kv-2", 25)]);
    assert_eq!(p.sts_replicas, Some(4));
    let p = decide(&members(obs(3, Some(4)), "100 100 0>25 100"));
    assert_eq!(p.reason.code, ReasonCode::WaitingForRebalance);
    assert!(p.admin.is_empty());
}

#[test]
fn a_down_node_that_owns_data_is_not_scaled_away_blindly() {
    let p = decide(&members(obs(3, Some(4)), "100 100 100 100d"));
    assert!(p.admin.is_empty());
    assert_eq!(p.sts_replicas, Some(4));
    assert_eq!(p.reason.code, ReasonCode::WaitingForHealthy);
    assert!(
        p.reason.message.contains("dynakv cluster remove kv-3"),
        "{}",
        p.reason.message
    );
}

#[test]
fn an_image_change_replaces_one_pod_at_a_time_while_healthy() {
    let mut o = members(obs(3, Some(3)), "100 100 100");
    for p in o.pods.values_mut() {
        p.template_hash = Some("old".into());
    }
    let p = decide(&o);
    assert_eq!(p.restart_pod.as_deref(), Some("kv-2"));
    assert_eq!(p.reason.code, ReasonCode::RollingPod);
    assert_eq!(p.work, Work::Upgrading);

    // kv-2 recreated on the new template but not ready yet: wait.
    if let Some(pod) = o.pods.get_mut(&2) {
        pod.template_hash = Some(HASH.into());
        pod.ready = false;
    }
    let p = decide(&o);
    assert_eq!(p.restart_pod, None);
    assert_eq!(p.reason.code, ReasonCode::WaitingForHealthy);

    // Ready again, but a member is down: wait.
    if let Some(pod) = o.pods.get_mut(&2) {
        pod.ready = true;
    }
    let down = members(o.clone(), "100 100d 100");
    assert_eq!(decide(&down).restart_pod, None);

    // Healthy: next one down.
    assert_eq!(decide(&o).restart_pod.as_deref(), Some("kv-1"));
}

#[test]
fn an_image_change_waits_until_membership_is_settled() {
    let mut o = members(obs(4, Some(4)), "100 100 100 25");
    for p in o.pods.values_mut() {
        p.template_hash = Some("old".into());
    }
    let p = decide(&o);
    assert_eq!(p.restart_pod, None);
    assert_eq!(p.admin, vec![set_weight("kv-3", 50)]);
}

#[test]
fn an_invalid_spec_applies_nothing() {
    let mut o = obs(3, Some(3));
    o.problems = vec!["writeQuorum 4 needs 4 replicas".into()];
    let p = decide(&o);
    assert_eq!(p.sts_replicas, None);
    assert_eq!(p.reason.code, ReasonCode::InvalidSpec);
    assert!(!p.in_progress);
}

#[test]
fn a_missing_certificate_holds_everything_until_it_is_there() {
    for sts in [None, Some(3)] {
        let mut o = obs(5, sts);
        o.waiting_for_tls = Some("Secret kv-tls (tls.secretName) does not exist".into());
        let p = decide(&o);
        assert_eq!(p.sts_replicas, None, "nothing is applied");
        assert!(p.admin.is_empty() && p.restart_pod.is_none());
        assert_eq!(p.reason.code, ReasonCode::WaitingForCertificate);
        assert!(p.reason.message.contains("kv-tls"), "{}", p.reason.message);
        assert!(p.in_progress);
    }
}

// ---- property test -------------------------------------------------------------------------

/// A small model of the cluster and the StatefulSet controller: applies plans, then lets time
/// pass (pods start, nodes join, one ring change completes per tick).
#[derive(Debug, Clone)]
struct Sim {
    o: Observed,
    members: BTreeMap<String, Member>,
    flaps: Vec<(usize, String)>,
}

impl Sim {
    fn observe(&self) -> Observed {
        let mut o = self.o.clone();
        o.cluster = if self.members.values().any(|m| m.liveness == Liveness::Alive) {
            let rebalancing = self
                .members
                .iter()
                .find(|(_, m)| m.changing())
                .map(|(id, _)| id.clone());
            Some(ClusterView {
                members: self.members.clone(),
                rebalancing,
            })
        } else {
            None
        };
        o
    }

    fn check_and_apply(&mut self, plan: &Plan) -> Result<(), TestCaseError> {
        let n = self.o.n as usize;
        for a in &plan.admin {
            match a {
                AdminAction::Leave { node } => {
                    // The invariant: at least N other members keep owning data, all alive.
                    let others: Vec<_> = self
                        .members
                        .iter()
                        .filter(|(id, m)| {
                            id.as_str() != node
                                && m.target_weight > 0
                                && !m.lifecycle.gone()
                                && m.lifecycle != Lifecycle::Leaving
                        })
                        .collect();
                    prop_assert!(
                        others.len() >= n,
                        "Leave({node}) with only {} other owners: {:?}",
                        others.len(),
                        self.members
                    );
                    prop_assert!(
                        self.members
                            .iter()
                            .filter(|(id, m)| id.as_str() != node && m.holds_data())
                            .all(|(_, m)| m.liveness == Liveness::Alive),
                        "Leave({node}) while an owner is not alive: {:?}",
                        self.members
                    );
                    let m = self.members.get_mut(node).unwrap();
                    prop_assert_eq!(m.liveness, Liveness::Alive, "Leave of a down node");
                    m.target_weight = 0;
                    m.lifecycle = Lifecycle::Leaving;
                }
                AdminAction::SetWeight { node, weight } => {
                    let m = self.members.get_mut(node).unwrap();
                    prop_assert!(
                        *weight >= m.target_weight || m.lifecycle == Lifecycle::Leaving,
                        "SetWeight({node}, {weight}) lowers a target outside a drain"
                    );
                    m.target_weight = *weight;
                    if m.lifecycle.gone() || m.lifecycle == Lifecycle::Leaving {
                        m.lifecycle = Lifecycle::Joining;
                    }
                }
            }
        }
        if let Some(r) = plan.sts_replicas {
            prop_assert!(r >= self.o.n as i32, "StatefulSet below N");
            let old = self.o.sts_replicas.unwrap_or(0);
            if r < old {
                for i in r..old {
                    let m = self.members.get(&pod_name("kv", i as u32));
                    prop_assert!(
                        m.is_none_or(|m| m.drained()),
                        "pod kv-{i} removed while it owns data: {m:?}"
                    );
                }
            }
            self.o.sts_replicas = Some(r);
            self.o.pods.retain(|i, _| (*i as i32) < r);
            for (id, m) in self.members.iter_mut() {
                if crate::resources::ordinal_of("kv", id).is_some_and(|i| i as i32 >= r) {
                    m.liveness = Liveness::Down;
                }
            }
            for i in 0..r as u32 {
                self.o.pods.entry(i).or_insert(PodView {
                    ready: false,
                    template_hash: Some(self.o.template_hash.clone()),
                    terminating: false,
                });
            }
        }
        if let Some(pod) = &plan.restart_pod {
            let i = crate::resources::ordinal_of("kv", pod).unwrap();
            let p = self.o.pods.get_mut(&i).unwrap();
            p.template_hash = Some(self.o.template_hash.clone());
            p.ready = false;
        }
        Ok(())
    }

    fn tick(&mut self, round: usize) {
        // Pods start and (re)join; a member whose pod exists is alive unless flapping.
        for (i, p) in self.o.pods.iter_mut() {
            p.ready = true;
            let id = pod_name("kv", *i);
            let flapping = self.flaps.iter().any(|(r, f)| *r == round && *f == id);
            let m = self.members.entry(id).or_insert(Member {
                weight: 0,
                target_weight: 0,
                lifecycle: Lifecycle::Joining,
                liveness: Liveness::Alive,
            });
            m.liveness = if flapping {
                Liveness::Down
            } else {
                Liveness::Alive
            };
            if m.lifecycle == Lifecycle::Removed {
                m.lifecycle = Lifecycle::Joining;
            }
        }
        // A drain whose ring change is over ends in `left`.
        for m in self.members.values_mut() {
            if m.lifecycle == Lifecycle::Leaving && m.weight == 0 && m.target_weight == 0 {
                m.lifecycle = Lifecycle::Left;
            }
            // A member at its (non-zero) target is a normal member (a cancelled drain too).
            if !m.changing() && m.weight > 0 && !m.lifecycle.gone() {
                m.lifecycle = Lifecycle::Normal;
            }
        }
        // One ring change completes per tick.
        if let Some(m) = self.members.values_mut().find(|m| m.changing()) {
            m.weight = m.target_weight;
            m.lifecycle = match (m.lifecycle, m.weight) {
                (Lifecycle::Leaving, 0) => Lifecycle::Left,
                (_, 0) => Lifecycle::Joining,
                _ => Lifecycle::Normal,
            };
        }
    }

    fn settled(&self) -> bool {
        let t = self.o.replicas.max(self.o.n as i32);
        self.o.sts_replicas == Some(t)
            && self.members.iter().all(|(id, m)| {
                crate::resources::ordinal_of("kv", id).is_some_and(|i| (i as i32) < t)
                    || (m.drained() && m.liveness == Liveness::Down)
            })
            && (0..t as u32).all(|i| {
                self.members.get(&pod_name("kv", i)).is_some_and(|m| {
                    m.weight == FULL_WEIGHT
                        && m.target_weight == FULL_WEIGHT
                        && m.lifecycle == Lifecycle::Normal
                })
            })
            && self
                .o
                .pods
                .values()
                .all(|p| p.template_hash.as_deref() == Some(self.o.template_hash.as_str()))
    }
}

fn member_strategy() -> impl Strategy<Value = Member> {
    let w = prop::sample::select(vec![0u32, 25, 50, 100]);
    (w.clone(), w, 0..4u8).prop_map(|(weight, target, kind)| {
        let (target, lifecycle) = match kind {
            0 => (
                weight,
                if weight > 0 {
                    Lifecycle::Normal
                } else {
                    Lifecycle::Joining
                },
            ),
            1 => (
                target,
                if weight > 0 {
                    Lifecycle::Normal
                } else {
                    Lifecycle::Joining
                },
            ),
            2 => (
                0,
                if weight > 0 {
                    Lifecycle::Leaving
                } else {
                    Lifecycle::Left
                },
            ),
            _ => (
                weight,
                if weight > 0 {
                    Lifecycle::Normal
                } else {
                    Lifecycle::Joining
                },
            ),
        };
        let target = if lifecycle == Lifecycle::Left {
            0
        } else {
            target
        };
        Member {
            weight: if lifecycle == Lifecycle::Left {
                0
            } else {
                weight
            },
            target_weight: target,
            lifecycle,
            liveness: Liveness::Alive,
        }
    })
}

fn sim_strategy() -> impl Strategy<Value = (Sim, Vec<(usize, i32)>)> {
    (
        1u32..=5,
        0u32..=4,
        1i32..=8,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_flat_map(|(n, extra, replicas, fresh, old_template, full_first)| {
            let sts = n + extra;
            (
                Just((
                    n,
                    sts,
                    replicas,
                    fresh && !full_first,
                    old_template,
                    full_first,
                )),
                prop::collection::vec(member_strategy(), sts as usize),
                prop::collection::vec((0usize..30, 1i32..=8), 0..4),
                prop::collection::vec((0usize..30, 0u32..9), 0..4),
            )
        })
        .prop_map(
            |((n, sts, replicas, fresh, old_template, full_first), ms, changes, flaps)| {
                let mut o = obs(replicas, Some(sts as i32));
                o.n = n;
                o.name = "kv".into();
                if old_template {
                    for p in o.pods.values_mut() {
                        p.template_hash = Some("old".into());
                    }
                }
                let members: BTreeMap<String, Member> = if fresh {
                    (0..sts)
                        .map(|i| {
                            (
                                pod_name("kv", i),
                                Member {
                                    weight: 0,
                                    target_weight: 0,
                                    lifecycle: Lifecycle::Joining,
                                    liveness: Liveness::Alive,
                                },
                            )
                        })
                        .collect()
                } else {
                    // A cluster with data: some members own data (the first N at full weight, or
                    // anything: after failures and changes of mind, fewer than N may).
                    ms.into_iter()
                        .enumerate()
                        .map(|(i, mut m)| {
                            if (i as u32) < n && (full_first || i == 0) {
                                m = Member {
                                    weight: FULL_WEIGHT,
                                    target_weight: FULL_WEIGHT,
                                    lifecycle: Lifecycle::Normal,
                                    liveness: Liveness::Alive,
                                };
                            }
                            (pod_name("kv", i as u32), m)
                        })
                        .collect()
                };
                let flaps = flaps
                    .into_iter()
                    .map(|(r, i)| (r, pod_name("kv", i)))
                    .collect();
                (Sim { o, members, flaps }, changes)
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn following_the_decisions_reaches_the_spec_and_never_drains_a_last_holder(
        (mut sim, changes) in sim_strategy()
    ) {
        let mut settled_at = None;
        for round in 0..600 {
            for (r, replicas) in &changes {
                if *r == round {
                    sim.o.replicas = *replicas;
                    settled_at = None;
                }
            }
            let plan = decide(&sim.observe());
            sim.check_and_apply(&plan)?;
            if !plan.in_progress && round > 30 {
                prop_assert!(sim.settled(), "decisions settled on a state off the spec: {:?} {:?}", sim.o, sim.members);
                settled_at = Some(round);
                break;
            }
            sim.tick(round);
        }
        prop_assert!(settled_at.is_some(), "did not converge: {:?} {:?} last plan {:?}", sim.o, sim.members, decide(&sim.observe()));
    }
}
