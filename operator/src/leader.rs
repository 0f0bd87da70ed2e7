//! Leader election over a `coordination.k8s.io/v1` Lease, so that of several operator replicas
//! only one reconciles. The decision ([`lease_step`]) is pure; [`LeaderElector`] reads and
//! writes the Lease with optimistic concurrency (a write carries the resourceVersion it read,
//! so two candidates cannot both win).
//!
//! A leader that cannot renew its Lease before it expires stops: the process exits and its
//! Deployment restarts it as a candidate (as client-go's leader election does), so two replicas
//! never reconcile at once for longer than the renew deadline.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;

/// What a candidate does with the Lease it read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseStep {
    /// No Lease yet: create it, held by us.
    Create,
    /// Ours (renew) or expired (take over): write it with us as holder.
    Write { take_over: bool },
    /// Someone else holds it until `until`.
    Wait { holder: String, until: Timestamp },
}

/// Pure: the step for candidate `me` given the Lease as read.
pub fn lease_step(lease: Option<&Lease>, me: &str, now: Timestamp) -> LeaseStep {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return if lease.is_some() {
            LeaseStep::Write { take_over: true }
        } else {
            LeaseStep::Create
        };
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder == me {
        return LeaseStep::Write { take_over: false };
    }
    if holder.is_empty() {
        return LeaseStep::Write { take_over: true };
    }
    let renewed = spec
        .renew_time
        .as_ref()
        .map(|t| t.0)
        .or(spec.acquire_time.as_ref().map(|t| t.0));
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
    match renewed.and_then(|r| r.checked_add(duration).ok()) {
        Some(until) if until > now => LeaseStep::Wait { holder, until },
        _ => LeaseStep::Write { take_over: true },
    }
}

/// A Lease operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("cannot read or write Lease {name}: {source}")]
    Api {
        name: String,
        #[source]
        source: kube::Error,
    },
    /// Another replica holds the Lease now (we lost it).
    #[error("lost Lease {name} to {holder}")]
    Lost { name: String, holder: String },
}

/// Takes and keeps a Lease.
pub struct LeaderElector {
    pub api: Api<Lease>,
    pub name: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
}

impl LeaderElector {
    /// One attempt: true when we hold the Lease afterwards.
    pub async fn try_once(&self) -> Result<bool, LeaseError> {
        let api_err = |source| LeaseError::Api {
            name: self.name.clone(),
            source,
        };
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.name).await.map_err(api_err)?;
        let step = lease_step(current.as_ref(), &self.identity, now);
        let spec = |transitions: i32, acquired: Option<MicroTime>| LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.lease_duration.as_secs() as i32),
            acquire_time: acquired.or(Some(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        };
        let result = match (step, current) {
            (LeaseStep::Wait { .. }, _) => return Ok(false),
            (LeaseStep::Create, _) | (_, None) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(spec(0, None)),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            (LeaseStep::Write { take_over }, Some(mut lease)) => {
                let old = lease.spec.clone().unwrap_or_default();
                let transitions = old.lease_transitions.unwrap_or(0) + i32::from(take_over);
                let acquired = if take_over { None } else { old.acquire_time };
                lease.spec = Some(spec(transitions, acquired));
                // `replace` carries the resourceVersion read above: a concurrent writer makes
                // it fail with 409 instead of both believing they lead.
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match result {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(api_err(e)),
        }
    }

    /// Waits until we hold the Lease.
    pub async fn acquire(&self) -> Result<(), LeaseError> {
        loop {
            match self.try_once().await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader election attempt failed"),
            }
            tokio::time::sleep(self.renew_every).await;
        }
    }

    /// Renews until a renewal fails past the Lease's duration; returns why leadership ended.
    pub async fn hold(&self) -> LeaseError {
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.renew_every).await;
            match self.try_once().await {
                Ok(true) => last_renewed = tokio::time::Instant::now(),
                Ok(false) => {
                    let holder = self
                        .api
                        .get_opt(&self.name)
                        .await
                        .ok()
                        .flatten()
                        .and_then(|l| l.spec.and_then(|s| s.holder_identity))
                        .unwrap_or_default();
                    return LeaseError::Lost {
                        name: self.name.clone(),
                        holder,
                    };
                }
                Err(e) => {
                    // Renew deadline: two thirds of the Lease, so we stop before anyone may
                    // take over.
                    if last_renewed.elapsed() > self.lease_duration * 2 / 3 {
                        return e;
                    }
                    tracing::warn!(error = %e, "Lease renewal failed; retrying");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renewed: &str, secs: i32) -> Lease {
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                renew_time: Some(MicroTime(renewed.parse().unwrap())),
                lease_duration_seconds: Some(secs),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn a_live_lease_of_another_replica_is_waited_for_and_an_expired_one_taken() {
        let now: Timestamp = "2026-01-01T00:00:10Z".parse().unwrap();
        assert_eq!(lease_step(None, "a", now), LeaseStep::Create);
        let l = lease("b", "2026-01-01T00:00:00Z", 15);
        assert_eq!(
            lease_step(Some(&l), "a", now),
            LeaseStep::Wait {
                holder: "b".into(),
                until: "2026-01-01T00:00:15Z".parse().unwrap()
            }
        );
        let later: Timestamp = "2026-01-01T00:00:16Z".parse().unwrap();
        assert_eq!(
            lease_step(Some(&l), "a", later),
            LeaseStep::Write { take_over: true }
        );
        assert_eq!(
            lease_step(Some(&l), "b", now),
            LeaseStep::Write { take_over: false }
        );
    }
}
