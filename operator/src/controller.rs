//! The controller: `reconcile` gathers the observed state (the StatefulSet, its pods, the
//! cluster's membership through a node's Admin service), asks [`crate::decisions::decide`] for
//! the next step and applies it: server-side apply of every object under one field manager,
//! the Admin requests, a pod replacement, Events, and the status.
//!
//! Order of the calls in one reconcile (the flow tests assert it):
//! 1. GET the StatefulSet (how its nodes serve settles an unset `tls`); with TLS, GET (and when
//!    missing, POST) the admin token Secret, then the certificate Secrets ([`tls`]), a Secret
//!    still missing holding every later step but the status; LIST the pods (by label).
//! 2. Admin `ClusterStatus` through the first pod that answers (ordinal order, ready first).
//! 3. PATCH (apply) ConfigMap, headless Service, client Service, StatefulSet, PDB,
//!    ServiceMonitor (when enabled) — skipped when the spec cannot be acted on.
//! 4. Admin changes; DELETE of the pod to replace.
//! 5. POST Events for the step taken (and for a refusal when it starts).
//! 6. PATCH (apply) the status subresource.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde_json::json;

use crate::FIELD_MANAGER;
use crate::admin::{AdminError, ClusterRef, NodeAdmin};
use crate::crd::{FINALIZER, KVCluster, RetentionPolicy, TlsSpec};
use crate::decisions::{
    self, ClusterView, Lifecycle, Liveness, Member, Observed, Plan, PodView, ReasonCode,
};
use crate::metrics::Metrics;
use crate::proto::ClusterStatusResponse;
use crate::resources::{
    self, BuildError, TEMPLATE_HASH_ANNOTATION, ordinal_of, selector_string,
    service_monitor_resource,
};
use crate::status::{self, StatusInput};

/// Requeue while a step is under way.
pub const REQUEUE_BUSY: Duration = Duration::from_secs(5);
/// Requeue of a settled cluster (a safety net: watches bring changes sooner).
pub const REQUEUE_IDLE: Duration = Duration::from_secs(300);

/// A reconcile that failed. Variant names are stable: [`Error::metric_label`] is a metric label.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API server request failed; what was applied before it stays applied (every step is
    /// idempotent and the next reconcile starts over).
    #[error("{what}: {source}")]
    Kube {
        what: String,
        #[source]
        source: kube::Error,
    },
    /// The objects could not be built; nothing was applied.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// A node could not be reached for a change; the change may or may not be recorded.
    #[error("Admin request failed: {0}")]
    Admin(#[source] AdminError),
    /// A certificate, key or token could not be made, or the operator's CA Secret is broken.
    #[error("TLS: {0}")]
    Pki(String),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "kube",
            Error::Build(_) => "build",
            Error::Admin(_) => "admin",
            Error::Pki(_) => "pki",
            Error::Finalizer(e) => match e.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(inner)
                | kube::runtime::finalizer::Error::CleanupFailed(inner) => inner.metric_label(),
                _ => "finalizer",
            },
        }
    }
}

mod tls;

fn kube_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let what = what.into();
    move |source| Error::Kube { what, source }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub admin: Arc<dyn NodeAdmin>,
    pub metrics: Arc<Metrics>,
    /// Wall clock for condition times (fixed in tests).
    pub clock: fn() -> Timestamp,
    /// Consecutive failures per object, for the back-off.
    failures: Mutex<HashMap<ObjectRef<KVCluster>, u32>>,
}

impl Context {
    pub fn new(
        client: Client,
        recorder: Recorder,
        admin: Arc<dyn NodeAdmin>,
        metrics: Arc<Metrics>,
        clock: fn() -> Timestamp,
    ) -> Self {
        Context {
            client,
            recorder,
            admin,
            metrics,
            clock,
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectRef<KVCluster>, u32>> {
        self.failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Back-off after `failures` consecutive failed reconciles: 5 s doubling to at most 5 minutes.
pub fn backoff(failures: u32) -> Duration {
    let secs = 5u64.saturating_mul(1u64 << failures.saturating_sub(1).min(6));
    Duration::from_secs(secs.min(300))
}

/// Entry point of the controller runtime.
pub async fn reconcile(kvc: Arc<KVCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let oref = ObjectRef::from_obj(kvc.as_ref());
    let ns = kvc.namespace().unwrap_or_else(|| "default".into());
    let api: Api<KVCluster> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, kvc, |event| async {
        match event {
            Finalizer::Apply(k) => apply(k, ctx.clone()).await,
            Finalizer::Cleanup(k) => cleanup(k, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    let outcome = match &result {
        Ok(_) => {
            ctx.failures().remove(&oref);
            "ok"
        }
        Err(e) => e.metric_label(),
    };
    ctx.metrics
        .reconciled(outcome, started.elapsed().as_secs_f64());
    result
}

/// Retries a failed reconcile with exponential back-off.
pub fn error_policy(kvc: Arc<KVCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    let oref = ObjectRef::from_obj(kvc.as_ref());
    let mut failures = ctx.failures();
    let n = failures.entry(oref).or_insert(0);
    *n = n.saturating_add(1);
    let delay = backoff(*n);
    tracing::warn!(
        kvcluster = %kvc.name_any(),
        namespace = kvc.namespace().unwrap_or_default(),
        error = %error,
        retry_in_s = delay.as_secs(),
        "reconcile failed"
    );
    Action::requeue(delay)
}

/// Reads the cluster's membership through the first pod that answers.
async fn cluster_status(
    ctx: &Context,
    cluster: &ClusterRef,
    pods: &BTreeMap<u32, PodView>,
    sts_replicas: u32,
) -> Option<(String, ClusterStatusResponse)> {
    let mut order: Vec<u32> = (0..sts_replicas).collect();
    // Ready pods first, then the rest (a joining node answers before it is ready).
    order.sort_by_key(|i| (!pods.get(i).is_some_and(|p| p.ready), *i));
    for i in order {
        let pod = resources::pod_name(&cluster.name, i);
        match ctx.admin.cluster_status(cluster, &pod).await {
            Ok(status) => {
                ctx.metrics
                    .admin_requests
                    .with_label_values(&["ClusterStatus", "ok"])
                    .inc();
                return Some((pod, status));
            }
            Err(e) => {
                ctx.metrics
                    .admin_requests
                    .with_label_values(&["ClusterStatus", outcome_label(&e)])
                    .inc();
                tracing::debug!(pod, error = %e, "no cluster status from this pod");
            }
        }
    }
    None
}

fn outcome_label(e: &AdminError) -> &'static str {
    if e.is_refusal() {
        "refused"
    } else {
        "unavailable"
    }
}

/// The membership as the decisions see it.
pub fn cluster_view(status: &ClusterStatusResponse) -> ClusterView {
    ClusterView {
        members: status
            .members
            .iter()
            .map(|m| {
                (
                    m.id.clone(),
                    Member {
                        weight: m.weight,
                        target_weight: m.target_weight,
                        lifecycle: Lifecycle::parse(&m.lifecycle),
                        liveness: Liveness::parse(&m.state),
                    },
                )
            })
            .collect(),
        rebalancing: status
            .rebalance
            .as_ref()
            .filter(|r| r.active)
            .map(|r| r.node.clone()),
    }
}

fn pod_view(p: &Pod) -> PodView {
    PodView {
        ready: p
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")),
        template_hash: p
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(TEMPLATE_HASH_ANNOTATION))
            .cloned(),
        terminating: p.metadata.deletion_timestamp.is_some(),
    }
}

async fn apply_object<K>(api: &Api<K>, name: &str, obj: &K) -> Result<(), kube::Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + Serialize + std::fmt::Debug,
{
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(name, &params, &Patch::Apply(obj))
        .await
        .map(|_| ())
}

/// Applies the desired objects. Returns warnings for optional objects that could not be applied.
async fn apply_objects(
    ctx: &Context,
    kvc: &KVCluster,
    ns: &str,
    replicas: i32,
    admin_token_sha256: Option<&str>,
) -> Result<Vec<String>, Error> {
    let name = kvc.name_any();
    let d = resources::build(kvc, replicas, admin_token_sha256)?;
    let client = ctx.client.clone();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    apply_object(&cms, &resources::config_map_name(&name), &d.config_map)
        .await
        .map_err(kube_err("apply ConfigMap"))?;
    let svcs: Api<Service> = Api::namespaced(client.clone(), ns);
    apply_object(
        &svcs,
        &resources::peers_service_name(&name),
        &d.peers_service,
    )
    .await
    .map_err(kube_err("apply headless Service"))?;
    apply_object(&svcs, &name, &d.client_service)
        .await
        .map_err(kube_err("apply client Service"))?;
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    apply_object(&sts, &resources::stateful_set_name(&name), &d.stateful_set)
        .await
        .map_err(kube_err("apply StatefulSet"))?;
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), ns);
    apply_object(&pdbs, &name, &d.pdb)
        .await
        .map_err(kube_err("apply PodDisruptionBudget"))?;
    let nps: Api<NetworkPolicy> = Api::namespaced(client.clone(), ns);
    match &d.network_policy {
        Some(np) => apply_object(&nps, &name, np)
            .await
            .map_err(kube_err("apply NetworkPolicy"))?,
        None => match nps.delete(&name, &Default::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(kube_err("delete NetworkPolicy")(e)),
        },
    }
    let mut warnings = Vec::new();
    if let Some(sm) = &d.service_monitor {
        let api: Api<DynamicObject> = Api::namespaced_with(client, ns, &service_monitor_resource());
        let params = PatchParams::apply(FIELD_MANAGER).force();
        match api.patch(&name, &params, &Patch::Apply(sm)).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => warnings.push(
                "metrics.serviceMonitor.enabled is set but the ServiceMonitor kind \
                 (monitoring.coreos.com/v1) is not installed: install the Prometheus Operator \
                 or scrape the pods with deploy/prometheus/scrape-config.yaml"
                    .to_string(),
            ),
            Err(e) => return Err(kube_err("apply ServiceMonitor")(e)),
        }
    }
    Ok(warnings)
}

async fn publish(
    ctx: &Context,
    kvc: &KVCluster,
    type_: EventType,
    reason: &str,
    action: String,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note),
        action,
        secondary: None,
    };
    // An Event that cannot be written is not worth failing the reconcile for.
    if let Err(e) = ctx.recorder.publish(&event, &kvc.object_ref(&())).await {
        tracing::warn!(error = %e, reason, "cannot publish event");
    }
}

fn previous_condition<'a>(kvc: &'a KVCluster, type_: &str) -> Option<(&'a str, &'a str)> {
    kvc.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.as_str(), c.reason.as_str()))
}

/// One pass of the Apply branch.
async fn apply(kvc: Arc<KVCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = kvc.name_any();
    let ns = kvc.namespace().unwrap_or_else(|| "default".into());
    let mut problems = kvc.spec.problems();

    // 1. Observe: the StatefulSet first, which says how the running nodes serve.
    let sts_api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &ns);
    let sts = sts_api
        .get_opt(&resources::stateful_set_name(&name))
        .await
        .map_err(kube_err("get StatefulSet"))?;
    // From here on `kvc` carries its effective `tls`.
    let kvc = match resources::effective_tls(&kvc, sts.as_ref().map(resources::serves_tls)) {
        Ok(enabled) => {
            let mut k = (*kvc).clone();
            k.spec.tls = Some(TlsSpec {
                enabled,
                ..kvc.spec.tls_spec()
            });
            Arc::new(k)
        }
        Err(problem) => {
            problems.push(problem);
            kvc
        }
    };

    // The Secrets TLS needs.
    let material = if problems.is_empty() {
        tls::ensure(&ctx, &kvc, &ns).await?
    } else {
        tls::TlsMaterial::Plain
    };
    let (credentials, token_sha256, waiting_for_tls) = match material {
        tls::TlsMaterial::Plain => (None, None, None),
        tls::TlsMaterial::Ready {
            credentials,
            token_sha256,
        } => (Some(credentials), Some(token_sha256), None),
        tls::TlsMaterial::Waiting(what) => (None, None, Some(what)),
    };
    let cluster = ClusterRef {
        name: name.clone(),
        namespace: ns.clone(),
        credentials,
    };
    let template_hash = resources::template_hash(&kvc, token_sha256.as_deref())?;

    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let pods: BTreeMap<u32, PodView> = pods_api
        .list(&ListParams::default().labels(&selector_string(&name)))
        .await
        .map_err(kube_err("list pods"))?
        .items
        .iter()
        .filter_map(|p| Some((ordinal_of(&name, &p.name_any())?, pod_view(p))))
        .collect();
    let sts_replicas = sts.as_ref().and_then(|s| s.spec.replicas);
    let sts_status = sts.as_ref().map(|s| {
        let st = s.status.as_ref();
        (
            st.map(|s| s.replicas).unwrap_or(0),
            st.and_then(|s| s.ready_replicas).unwrap_or(0),
        )
    });
    let answered = match (
        sts_replicas,
        problems.is_empty() && waiting_for_tls.is_none(),
    ) {
        (Some(r), true) => cluster_status(&ctx, &cluster, &pods, r.max(0) as u32).await,
        _ => None,
    };
    let observed = Observed {
        name: name.clone(),
        replicas: kvc.spec.replicas,
        n: kvc.spec.n(),
        steps: kvc.spec.scaling.steps(),
        template_hash,
        problems,
        waiting_for_tls,
        sts_replicas,
        pods: pods.clone(),
        cluster: answered.as_ref().map(|(_, s)| cluster_view(s)),
    };

    // 2. Decide.
    let plan: Plan = decisions::decide(&observed);
    ctx.metrics
        .decisions
        .with_label_values(&[plan.reason.code.as_str()])
        .inc();
    tracing::info!(
        kvcluster = %name,
        namespace = %ns,
        reason = plan.reason.code.as_str(),
        message = %plan.reason.message,
        sts_replicas = ?plan.sts_replicas,
        admin = ?plan.admin,
        "decided"
    );

    // 3. Apply.
    let mut warnings = Vec::new();
    if let Some(replicas) = plan.sts_replicas {
        warnings = apply_objects(&ctx, &kvc, &ns, replicas, token_sha256.as_deref()).await?;
    }
    let mut admin_refusal = None;
    if let Some((answered_by, _)) = &answered {
        for action in &plan.admin {
            let method = match action {
                decisions::AdminAction::SetWeight { .. } => "SetWeight",
                decisions::AdminAction::Leave { .. } => "Leave",
            };
            // The member concerned takes the request itself when its pod is there (it must be
            // reachable anyway, and a member that left is not forwarded to); otherwise, or when
            // it does not answer, the node that answered the status forwards it.
            let target = action.node();
            let mut vias = Vec::new();
            if ordinal_of(&name, target).is_some_and(|i| pods.contains_key(&i)) {
                vias.push(target.to_string());
            }
            if !vias.iter().any(|v| v == answered_by) {
                vias.push(answered_by.clone());
            }
            let mut outcome = None;
            for via in &vias {
                match ctx.admin.change(&cluster, via, action).await {
                    Err(e) if !e.is_refusal() && via != vias.last().unwrap_or(via) => {
                        tracing::debug!(%via, error = %e, "admin change: trying another node");
                    }
                    other => {
                        outcome = Some(other);
                        break;
                    }
                }
            }
            match outcome {
                Some(Ok(resp)) => {
                    ctx.metrics
                        .admin_requests
                        .with_label_values(&[method, "ok"])
                        .inc();
                    tracing::info!(kvcluster = %name, %action, changed = resp.changed, message = %resp.message, "admin change");
                }
                Some(Err(e)) if e.is_refusal() => {
                    ctx.metrics
                        .admin_requests
                        .with_label_values(&[method, "refused"])
                        .inc();
                    admin_refusal = Some(e.to_string());
                    break;
                }
                Some(Err(e)) => {
                    ctx.metrics
                        .admin_requests
                        .with_label_values(&[method, "unavailable"])
                        .inc();
                    return Err(Error::Admin(e));
                }
                None => {}
            }
        }
    }
    if let Some(pod) = &plan.restart_pod {
        pods_api
            .delete(pod, &DeleteParams::default())
            .await
            .map_err(kube_err(format!("delete pod {pod}")))?;
    }

    // 4. Events: every step taken, and a refusal or invalid spec when it starts.
    if let Some((also, action)) = &plan.also {
        publish(
            &ctx,
            &kvc,
            EventType::Normal,
            also.code.as_str(),
            action.clone(),
            also.message.clone(),
        )
        .await;
    }
    if plan.reason.code.is_action() {
        publish(
            &ctx,
            &kvc,
            EventType::Normal,
            plan.reason.code.as_str(),
            plan.action_label(),
            plan.reason.message.clone(),
        )
        .await;
    }
    let was = previous_condition(&kvc, "Degraded");
    if let Some(r) = &plan.refusal
        && was != Some(("True", "BelowReplicationFactor"))
    {
        publish(
            &ctx,
            &kvc,
            EventType::Warning,
            "BelowReplicationFactor",
            "Refuse".into(),
            r.clone(),
        )
        .await;
    }
    if plan.reason.code == ReasonCode::InvalidSpec && was != Some(("True", "InvalidSpec")) {
        publish(
            &ctx,
            &kvc,
            EventType::Warning,
            "InvalidSpec",
            "Refuse".into(),
            plan.reason.message.clone(),
        )
        .await;
    }
    if plan.reason.code == ReasonCode::WaitingForCertificate
        && previous_condition(&kvc, "Progressing") != Some(("True", "WaitingForCertificate"))
    {
        publish(
            &ctx,
            &kvc,
            EventType::Warning,
            "WaitingForCertificate",
            "Wait".into(),
            plan.reason.message.clone(),
        )
        .await;
    }
    if let Some(r) = &admin_refusal {
        publish(
            &ctx,
            &kvc,
            EventType::Warning,
            "ChangeRefused",
            plan.action_label(),
            r.clone(),
        )
        .await;
    }

    // 5. Status.
    ctx.metrics.rebalance(
        &ns,
        &name,
        answered
            .as_ref()
            .and_then(|(_, s)| s.rebalance.as_ref())
            .filter(|r| r.active),
    );
    let new_status = status::build(&StatusInput {
        kvc: &kvc,
        plan: &plan,
        sts: sts_status,
        pods: &pods,
        cluster: answered.as_ref().map(|(_, s)| s),
        admin_refusal: admin_refusal.as_deref(),
        warnings: &warnings,
        now: (ctx.clock)(),
    });
    let api: Api<KVCluster> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = json!({
        "apiVersion": "dynakv.io/v1alpha1",
        "kind": "KVCluster",
        "status": new_status,
    });
    api.patch_status(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(kube_err("apply KVCluster status"))?;

    let busy = plan.in_progress || admin_refusal.is_some();
    Ok(Action::requeue(if busy {
        REQUEUE_BUSY
    } else {
        REQUEUE_IDLE
    }))
}

/// The Cleanup branch: owner references delete every object the operator made; what they
/// cannot delete is volumes of nodes scaled away earlier, which `whenDeleted: Delete` asks for.
async fn cleanup(kvc: Arc<KVCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = kvc.name_any();
    let ns = kvc.namespace().unwrap_or_else(|| "default".into());
    ctx.metrics.forget(&ns, &name);
    let note = if kvc.spec.storage.retention.when_deleted == RetentionPolicy::Delete {
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
        pvcs.delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels(&selector_string(&name)),
        )
        .await
        .map_err(kube_err("delete volumes"))?;
        format!("deleting {name}: its nodes stop and their volumes are deleted")
    } else {
        format!(
            "deleting {name}: its nodes stop; their volumes are kept (storage.retention.whenDeleted: Retain)"
        )
    };
    publish(
        &ctx,
        &kvc,
        EventType::Normal,
        "Deleting",
        "Delete".into(),
        note,
    )
    .await;
    Ok(Action::await_change())
}

/// Runs the controller until `shutdown` resolves. `namespace`: watch one namespace only.
pub async fn run(
    client: Client,
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let (kvcs, sts, cms, svcs, pdbs) = match &namespace {
        Some(ns) => (
            Api::<KVCluster>::namespaced(client.clone(), ns),
            Api::<StatefulSet>::namespaced(client.clone(), ns),
            Api::<ConfigMap>::namespaced(client.clone(), ns),
            Api::<Service>::namespaced(client.clone(), ns),
            Api::<PodDisruptionBudget>::namespaced(client.clone(), ns),
        ),
        None => (
            Api::<KVCluster>::all(client.clone()),
            Api::<StatefulSet>::all(client.clone()),
            Api::<ConfigMap>::all(client.clone()),
            Api::<Service>::all(client.clone()),
            Api::<PodDisruptionBudget>::all(client.clone()),
        ),
    };
    // Only our own children: a label every object the operator makes carries.
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=dynakv-operator");
    Controller::new(kvcs, watcher::Config::default())
        .owns(sts, owned.clone())
        .owns(cms, owned.clone())
        .owns(svcs, owned.clone())
        .owns(pdbs, owned)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => tracing::debug!(kvcluster = %obj.name, "reconciled"),
                Err(e) => tracing::warn!(error = %e, "controller error"),
            }
        })
        .await;
}

#[cfg(test)]
mod tests;
