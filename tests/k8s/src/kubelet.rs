//! A stand-in for kubelet, for tests only: this crate (`tests/k8s`, `dynakv-k8s-tests`) is test
//! code and is not shipped.
//!
//! It watches the pods of one KVCluster's StatefulSet (by the cluster's labels, owned by a
//! StatefulSet) and does for each what a kubelet with a container runtime would:
//!
//! 1. binds it to the node `dynakv-standin` (`pods/binding`, as the scheduler would; the
//!    stand-in registers that Node, Ready, at start), so that the API server deletes the pod
//!    gracefully and waits for this stand-in to confirm the stop;
//! 2. gives it an address of its own, `first_ip + ordinal` on loopback (127.x.y.z), and a DNS
//!    name `<hostname>.<subdomain>.<namespace>.svc` (the headless Service's) for that address;
//! 3. prepares its volumes: a `configMap` volume becomes a directory with one file per key, an
//!    `emptyDir` a fresh directory, a `persistentVolumeClaim` a directory per PVC (by uid) that
//!    outlives the process, so a pod that comes back finds its data;
//! 4. runs its container as a real `dynakv` process, from the pod's own command, args and env
//!    (`$(VAR)` expansion and the downward API as kubelet does them), output in a log file,
//!    restarted when it exits (restartPolicy Always, back-off 1 s doubling to 8 s);
//! 5. runs its gRPC probes (startup, readiness, liveness: `grpc.health.v1.Health/Check` with the
//!    probe's period, timeout and thresholds) and reports the pod's status through the `status`
//!    subresource: phase Running, podIP, conditions Ready/ContainersReady from the readiness
//!    probe, container state and restart count;
//! 6. when the pod is deleted, records what the cluster said about that node just before
//!    (its membership entry, through the node's Admin API), sends SIGTERM, SIGKILL after the
//!    grace period, and then deletes the pod for good (grace period 0, as kubelet confirms).
//!
//! What it changes from the pod spec, and why (everything else is taken as it is):
//!
//! - **The image.** There are no images here: the container's command must be `dynakv`, and
//!   the workspace's `dynakv` binary runs whatever `image` says.
//! - **Volume paths.** There are no mount namespaces for unprivileged processes: an argument
//!   that names a path under a `volumeMount` (`--config /etc/dynakv/dynakv.yaml`) is rewritten
//!   to the volume's directory, and `TMPDIR` points at the volume mounted at `/tmp`.
//! - **Addresses.** All pods share the machine's network namespace, where a pod would have its
//!   own: `0.0.0.0:7070` would be the same socket for every pod. The stand-in asks the node
//!   itself for its effective configuration (`dynakv serve <the pod's args> --print-config`)
//!   and appends `--listen`, `--metrics-listen` (the pod's address, same ports) and
//!   `--data-dir` (the same path, translated as above). The config file stays as the operator
//!   wrote it.
//! - **DNS.** No cluster DNS either. The pod keeps its names (seeds, `--advertise`), and each
//!   process resolves them through its own hosts file: `LD_PRELOAD=libnss_wrapper.so` with
//!   `NSS_WRAPPER_HOSTS` (cwrap's nss_wrapper, made for tests: it answers `getaddrinfo` from
//!   that file and passes other names to the system). The file maps the DNS name of every pod
//!   this stand-in has given an address; it is replaced atomically (nss_wrapper reloads a
//!   file whose inode changed). An entry stays after its pod is gone, pointing at an address
//!   nobody listens on (connection refused where cluster DNS would say NXDOMAIN), so a node
//!   that still dials a departed member never sends a lookup to the machine's resolver.
//!   Nothing else on the machine (no /etc/hosts) is touched.
//! - Not enforced: `securityContext` (the process runs as the test's user), `resources`,
//!   scheduling constraints (one node, everything fits). A configMap volume is written once,
//!   not refreshed (a config change replaces the pods anyway). Only `grpc` probes are run.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Node, PersistentVolumeClaim, Pod, Probe, Secret,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use dynakv_node::proto::ClusterStatusRequest;
use dynakv_node::proto::admin_client::AdminClient;

use crate::util;

/// The node pods are bound to.
pub const NODE_NAME: &str = "dynakv-standin";
/// Ordinals this stand-in gives addresses to (0..MAX_PODS).
pub const MAX_PODS: u8 = 16;

/// What to run and where.
#[derive(Debug, Clone)]
pub struct KubeletConfig {
    pub namespace: String,
    /// The KVCluster whose StatefulSet's pods are run.
    pub cluster: String,
    /// Address of ordinal 0; ordinal i gets `first_ip + i`.
    pub first_ip: Ipv4Addr,
    /// Where volumes, logs and the hosts file go.
    pub root: PathBuf,
    pub dynakv: PathBuf,
    pub nss_wrapper: PathBuf,
    pub kubeconfig: PathBuf,
}

impl KubeletConfig {
    /// The address of the pod with this ordinal.
    pub fn pod_ip(&self, ordinal: u32) -> Ipv4Addr {
        assert!(
            ordinal < u32::from(MAX_PODS),
            "ordinal {ordinal} out of range"
        );
        Ipv4Addr::from(u32::from(self.first_ip) + ordinal)
    }

    /// The hosts file the pods resolve names with (also usable by test clients).
    pub fn hosts_file(&self) -> PathBuf {
        self.root.join("hosts")
    }

    /// The environment that makes a process resolve pod names as the pods do.
    pub fn dns_env(&self) -> Vec<(String, String)> {
        vec![
            (
                "LD_PRELOAD".into(),
                self.nss_wrapper.to_string_lossy().into_owned(),
            ),
            (
                "NSS_WRAPPER_HOSTS".into(),
                self.hosts_file().to_string_lossy().into_owned(),
            ),
        ]
    }
}

/// What the cluster said about a node just before the stand-in stopped its pod.
#[derive(Debug, Clone)]
pub struct StopRecord {
    pub pod: String,
    /// The pod had been deleted (rather than the stand-in shutting down).
    pub deleted: bool,
    /// The node's own membership entry as it answered `Admin.ClusterStatus`
    /// (`None`: it did not answer).
    pub member: Option<MemberAtStop>,
}

#[derive(Debug, Clone)]
pub struct MemberAtStop {
    pub lifecycle: String,
    pub weight: u32,
    pub target_weight: u32,
    pub replica_ownership: f64,
    /// A ring change was under way, and for which member.
    pub rebalancing: Option<String>,
}

/// Why a pod's process is being stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// The pod has a deletionTimestamp: stop within the grace period, then confirm the delete.
    Deleted { grace: Duration },
    /// The pod object is gone already.
    Gone,
    /// The stand-in shuts down (end of test): kill.
    Shutdown,
}

struct PodHandle {
    name: String,
    stop: watch::Sender<Option<Stop>>,
}

struct Shared {
    cfg: KubeletConfig,
    client: Client,
    /// DNS name -> address, as written to the hosts file.
    hosts: Mutex<BTreeMap<String, Ipv4Addr>>,
    /// Pods with a runner, by uid.
    pods: Mutex<BTreeMap<String, PodHandle>>,
    stops: Mutex<Vec<StopRecord>>,
    /// What the stand-in did, with times, for failure reports.
    journal: Mutex<Vec<String>>,
    started: Instant,
}

impl Shared {
    fn note(&self, line: String) {
        let t = self.started.elapsed().as_secs_f64();
        lock(&self.journal).push(format!("{t:8.2}s {line}"));
    }

    fn pods_api(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.cfg.namespace)
    }

    fn add_host(&self, name: &str, ip: Ipv4Addr) -> std::io::Result<()> {
        let mut hosts = lock(&self.hosts);
        if hosts.get(name) == Some(&ip) {
            return Ok(());
        }
        hosts.insert(name.to_string(), ip);
        write_hosts(&self.cfg.hosts_file(), &hosts)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn write_hosts(path: &Path, hosts: &BTreeMap<String, Ipv4Addr>) -> std::io::Result<()> {
    // No comment lines: nss_wrapper refuses a file that has any ("Invalid line").
    let mut text = String::new();
    for (name, ip) in hosts {
        text.push_str(&format!("{ip} {name} {name}.cluster.local\n"));
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    // A new inode: nss_wrapper reloads the file when it sees one.
    std::fs::rename(&tmp, path)
}

/// The running stand-in; dropping it kills every process it started.
pub struct Kubelet {
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Kubelet {
    /// Starts watching the cluster's pods, on a runtime of its own.
    pub fn start(cfg: KubeletConfig) -> Kubelet {
        std::fs::create_dir_all(&cfg.root).expect("the stand-in's directory");
        write_hosts(&cfg.hosts_file(), &BTreeMap::new()).expect("an empty hosts file");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("kubelet")
            .build()
            .expect("a tokio runtime for the stand-in");
        let client = rt.block_on(crate::client(&cfg.kubeconfig));
        rt.block_on(register_node(&client));
        let shared = Arc::new(Shared {
            cfg,
            client,
            hosts: Mutex::new(BTreeMap::new()),
            pods: Mutex::new(BTreeMap::new()),
            stops: Mutex::new(Vec::new()),
            journal: Mutex::new(Vec::new()),
            started: Instant::now(),
        });
        let (tx, rx) = tokio::sync::oneshot::channel();
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("kubelet-main".into())
            .spawn(move || {
                rt.block_on(watch_pods(s.clone(), rx));
                // Shutdown: stop every process and wait until they are gone.
                rt.block_on(async {
                    let handles: Vec<_> = lock(&s.pods).values().map(|h| h.stop.clone()).collect();
                    for h in &handles {
                        let _ = h.send(Some(Stop::Shutdown));
                    }
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while !lock(&s.pods).is_empty() && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                });
                rt.shutdown_timeout(Duration::from_secs(2));
            })
            .expect("the stand-in's thread");
        Kubelet {
            shared,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn config(&self) -> &KubeletConfig {
        &self.shared.cfg
    }

    /// Every pod stopped so far, in order.
    pub fn stops(&self) -> Vec<StopRecord> {
        lock(&self.shared.stops).clone()
    }

    /// Names of the pods whose process runs now.
    pub fn running(&self) -> Vec<String> {
        let mut v: Vec<String> = lock(&self.shared.pods)
            .values()
            .map(|h| h.name.clone())
            .collect();
        v.sort();
        v
    }

    /// What the stand-in did so far, one line per step.
    pub fn journal(&self) -> String {
        lock(&self.shared.journal).join("\n")
    }

    /// Log file of a pod's process (all its runs).
    pub fn log_of(&self, pod: &str) -> Option<PathBuf> {
        let dir = self.shared.cfg.root.join("pods");
        let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .map(|e| e.path().join("container.log"))
            .filter(|p| {
                p.parent()
                    .and_then(|d| d.file_name())
                    .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{pod}_")))
                    && p.is_file()
            })
            .collect();
        logs.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
        logs.pop()
    }

    fn report(&self) {
        eprintln!("--- kubelet stand-in journal\n{}", self.journal());
        if let Ok(entries) = std::fs::read_dir(self.shared.cfg.root.join("pods")) {
            for e in entries.flatten() {
                let log = e.path().join("container.log");
                if log.is_file() {
                    eprintln!(
                        "--- last lines of {}\n{}",
                        log.display(),
                        util::tail(&log, 25)
                    );
                }
            }
        }
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.report();
        }
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Registers the Node the pods are bound to, Ready, as a kubelet does at start (the endpoint
/// controllers look it up; without it they skip every pod). Several stand-ins share it.
async fn register_node(client: &Client) {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": NODE_NAME, "labels": {"kubernetes.io/hostname": NODE_NAME}},
    }))
    .expect("a Node object");
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => return,
        Err(e) => panic!("cannot register the Node {NODE_NAME}: {e}"),
    }
    let now = now_rfc3339();
    let status = json!({"status": {
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "message": "kubelet stand-in of dynakv-k8s-tests",
                        "lastHeartbeatTime": now, "lastTransitionTime": now}],
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                      {"type": "Hostname", "address": NODE_NAME}],
        "capacity": {"pods": "110", "cpu": "2", "memory": "24Gi"},
        "allocatable": {"pods": "110", "cpu": "2", "memory": "24Gi"},
    }});
    if let Err(e) = nodes
        .patch_status(NODE_NAME, &PatchParams::default(), &Patch::Merge(&status))
        .await
    {
        panic!("cannot report the Node {NODE_NAME} Ready: {e}");
    }
}

fn owned_by_stateful_set(pod: &Pod, name: &str) -> bool {
    pod.owner_references()
        .iter()
        .any(|o| o.kind == "StatefulSet" && o.name == name)
}

async fn watch_pods(shared: Arc<Shared>, mut shutdown: tokio::sync::oneshot::Receiver<()>) {
    let selector = format!(
        "app.kubernetes.io/name=dynakv,app.kubernetes.io/instance={}",
        shared.cfg.cluster
    );
    let stream = watcher::watcher(
        shared.pods_api(),
        watcher::Config::default().labels(&selector),
    );
    let mut stream = std::pin::pin!(stream);
    loop {
        let event = tokio::select! {
            _ = &mut shutdown => return,
            e = stream.next() => e,
        };
        match event {
            Some(Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod))) => {
                on_pod(&shared, pod)
            }
            Some(Ok(watcher::Event::Delete(pod))) => on_gone(&shared, &pod),
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                shared.note(format!("watch error: {e}"));
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            None => return,
        }
    }
}

fn on_pod(shared: &Arc<Shared>, pod: Pod) {
    if !owned_by_stateful_set(&pod, &shared.cfg.cluster) {
        return;
    }
    let Some(uid) = pod.uid() else { return };
    let name = pod.name_any();
    let bound_here = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .is_some_and(|n| n == NODE_NAME);
    if pod.metadata.deletion_timestamp.is_some() {
        let grace = Duration::from_secs(
            pod.metadata
                .deletion_grace_period_seconds
                .unwrap_or(30)
                .clamp(0, 30) as u64,
        );
        let pods = lock(&shared.pods);
        if let Some(h) = pods.get(&uid) {
            h.stop.send_if_modified(|s| {
                if s.is_none() {
                    *s = Some(Stop::Deleted { grace });
                    true
                } else {
                    false
                }
            });
        } else if bound_here {
            // Never started here (or already stopped): confirm the deletion.
            let s = shared.clone();
            tokio::spawn(async move { confirm_delete(&s, &name, &uid).await });
        }
        return;
    }
    let mut pods = lock(&shared.pods);
    if pods.contains_key(&uid) {
        return;
    }
    let (tx, rx) = watch::channel(None);
    pods.insert(
        uid.clone(),
        PodHandle {
            name: name.clone(),
            stop: tx,
        },
    );
    drop(pods);
    shared.note(format!("{name}: new pod {uid}"));
    let s = shared.clone();
    tokio::spawn(async move {
        run_pod(&s, pod, rx).await;
        lock(&s.pods).remove(&uid);
    });
}

fn on_gone(shared: &Shared, pod: &Pod) {
    let Some(uid) = pod.uid() else { return };
    if let Some(h) = lock(&shared.pods).get(&uid) {
        h.stop.send_if_modified(|s| {
            if s.is_none() {
                *s = Some(Stop::Gone);
                true
            } else {
                false
            }
        });
    }
}

async fn confirm_delete(shared: &Shared, name: &str, uid: &str) {
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: Some(uid.to_string()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match shared.pods_api().delete(name, &dp).await {
        Ok(_) => shared.note(format!("{name}: deletion confirmed")),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
        Err(e) => shared.note(format!("{name}: cannot confirm the deletion: {e}")),
    }
}

/// The ordinal of a StatefulSet pod (`<set>-<ordinal>`).
fn ordinal(pod: &str) -> Option<u32> {
    pod.rsplit_once('-')?.1.parse().ok()
}

/// Runs one pod until it is deleted (or the stand-in shuts down).
async fn run_pod(shared: &Arc<Shared>, pod: Pod, mut stop: watch::Receiver<Option<Stop>>) {
    let name = pod.name_any();
    let uid = pod.uid().unwrap_or_default();
    // A pod of the same name that is still stopping holds the address: wait for it.
    loop {
        let busy = lock(&shared.pods)
            .iter()
            .any(|(u, h)| h.name == name && *u != uid);
        if !busy {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let Some(ip) = ordinal(&name)
        .filter(|o| *o < u32::from(MAX_PODS))
        .map(|o| shared.cfg.pod_ip(o))
    else {
        shared.note(format!("{name}: no ordinal in 0..{MAX_PODS}: not run"));
        let _ = stop.wait_for(Option::is_some).await;
        return;
    };
    let result = async {
        bind(shared, &pod).await?;
        let spec = pod.spec.as_ref().ok_or("pod without spec")?;
        if let (Some(host), Some(sub)) = (&spec.hostname, &spec.subdomain) {
            let dns = format!("{host}.{sub}.{}.svc", shared.cfg.namespace);
            shared
                .add_host(&dns, ip)
                .map_err(|e| format!("hosts file: {e}"))?;
        }
        let dir = shared.cfg.root.join("pods").join(format!("{name}_{uid}"));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mounts = prepare_volumes(shared, &pod, &dir, &mut stop).await?;
        let [container] = spec.containers.as_slice() else {
            return Err("the stand-in runs pods of exactly one container".to_string());
        };
        let proc = build_process(shared, &pod, container, ip, &mounts, &dir).await?;
        Ok::<_, String>((proc, container.clone(), dir))
    }
    .await;
    let (proc, container, dir) = match result {
        Ok(v) => v,
        Err(e) => {
            shared.note(format!("{name}: cannot run: {e}"));
            patch_status(
                shared,
                &name,
                json!({"phase": "Pending", "message": format!("kubelet stand-in: {e}"),
                       "reason": "StandInError"}),
            )
            .await;
            let why = stop.wait_for(Option::is_some).await.ok().and_then(|s| *s);
            if let Some(Stop::Deleted { .. }) = why {
                confirm_delete(shared, &name, &uid).await;
            }
            return;
        }
    };
    shared.note(format!("{name}: runs at {ip}: {}", proc.args.join(" ")));
    let why = supervise(shared, &name, ip, &container, &proc, &dir, &mut stop).await;
    if let Stop::Deleted { .. } = why {
        confirm_delete(shared, &name, &uid).await;
    }
}

async fn bind(shared: &Shared, pod: &Pod) -> Result<(), String> {
    let bound = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .is_some_and(|n| !n.is_empty());
    if bound {
        return Ok(());
    }
    let name = pod.name_any();
    let binding = json!({
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": name, "uid": pod.uid()},
        "target": {"apiVersion": "v1", "kind": "Node", "name": NODE_NAME},
    });
    match shared
        .pods_api()
        .create_subresource::<_, Value>("binding", &name, &PostParams::default(), &binding)
        .await
    {
        Ok(_) => {
            shared.note(format!("{name}: bound to {NODE_NAME}"));
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(format!("binding: {e}")),
    }
}

/// A projected file's mode: the item's, else the volume's default (0644), with the owner's read
/// bit.
fn item_mode(default_mode: Option<i32>, item_mode: Option<i32>) -> u32 {
    (item_mode.or(default_mode).unwrap_or(0o644) as u32 & 0o777) | 0o400
}

/// Container path -> host directory, longest mount path first.
type Mounts = Vec<(String, PathBuf)>;

async fn prepare_volumes(
    shared: &Shared,
    pod: &Pod,
    dir: &Path,
    stop: &mut watch::Receiver<Option<Stop>>,
) -> Result<Mounts, String> {
    let spec = pod.spec.as_ref().ok_or("pod without spec")?;
    let ns = &shared.cfg.namespace;
    let mut volumes: BTreeMap<String, PathBuf> = BTreeMap::new();
    for v in spec.volumes.iter().flatten() {
        let path = if let Some(cm) = &v.config_map {
            let api: Api<ConfigMap> = Api::namespaced(shared.client.clone(), ns);
            let found = wait_for_object(&api, &cm.name, stop).await?;
            let path = dir.join("volumes").join(&v.name);
            std::fs::create_dir_all(&path).map_err(|e| e.to_string())?;
            let data = found.data.unwrap_or_default();
            let items: Vec<(String, String)> = match &cm.items {
                Some(items) => items
                    .iter()
                    .map(|i| (i.key.clone(), i.path.clone()))
                    .collect(),
                None => data.keys().map(|k| (k.clone(), k.clone())).collect(),
            };
            for (key, file) in items {
                let text = data
                    .get(&key)
                    .ok_or(format!("ConfigMap {} has no key {key}", cm.name))?;
                std::fs::write(path.join(&file), text).map_err(|e| e.to_string())?;
            }
            path
        } else if let Some(secret) = &v.secret {
            let api: Api<Secret> = Api::namespaced(shared.client.clone(), ns);
            let secret_name = secret.secret_name.clone().unwrap_or_default();
            let found = wait_for_object(&api, &secret_name, stop).await?;
            let path = dir.join("volumes").join(&v.name);
            std::fs::create_dir_all(&path).map_err(|e| e.to_string())?;
            let data = found.data.unwrap_or_default();
            let items: Vec<(String, String, Option<i32>)> = match &secret.items {
                Some(items) => items
                    .iter()
                    .map(|i| (i.key.clone(), i.path.clone(), i.mode))
                    .collect(),
                None => data.keys().map(|k| (k.clone(), k.clone(), None)).collect(),
            };
            for (key, file, item) in items {
                let bytes = data
                    .get(&key)
                    .ok_or(format!("Secret {secret_name} has no key {key}"))?;
                let target = path.join(&file);
                std::fs::write(&target, &bytes.0).map_err(|e| e.to_string())?;
                // The mode Kubernetes would give the file (the stand-in's processes run as
                // this user, so a mode without the owner's read bit is not kept).
                let mode = item_mode(secret.default_mode, item);
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
                    .map_err(|e| e.to_string())?;
            }
            path
        } else if v.empty_dir.is_some() {
            let path = dir.join("volumes").join(&v.name);
            std::fs::create_dir_all(&path).map_err(|e| e.to_string())?;
            path
        } else if let Some(claim) = &v.persistent_volume_claim {
            let api: Api<PersistentVolumeClaim> = Api::namespaced(shared.client.clone(), ns);
            let pvc = wait_for_object(&api, &claim.claim_name, stop).await?;
            let path = shared.cfg.root.join("volumes").join(ns).join(format!(
                "{}_{}",
                claim.claim_name,
                pvc.uid().unwrap_or_default()
            ));
            std::fs::create_dir_all(&path).map_err(|e| e.to_string())?;
            path
        } else {
            return Err(format!(
                "volume {}: only configMap, secret, emptyDir and persistentVolumeClaim are supported",
                v.name
            ));
        };
        volumes.insert(v.name.clone(), path);
    }
    let mut mounts = Mounts::new();
    for c in &spec.containers {
        for m in c.volume_mounts.iter().flatten() {
            let host = volumes
                .get(&m.name)
                .ok_or(format!("volumeMount {} names no volume", m.name))?;
            mounts.push((m.mount_path.trim_end_matches('/').to_string(), host.clone()));
        }
    }
    mounts.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    Ok(mounts)
}

async fn wait_for_object<K>(
    api: &Api<K>,
    name: &str,
    stop: &mut watch::Receiver<Option<Stop>>,
) -> Result<K, String>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match api.get_opt(name).await {
            Ok(Some(o)) => return Ok(o),
            Ok(None) | Err(_) if Instant::now() < deadline => {}
            Ok(None) => return Err(format!("{name} does not exist")),
            Err(e) => return Err(format!("{name}: {e}")),
        }
        if stop.borrow().is_some() {
            return Err("deleted while waiting for its volumes".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The process of a container, ready to spawn.
struct Proc {
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// The node's certificate, key and CA on this machine, when it serves TLS: the stand-in
    /// asks it for its membership at a stop with them, as `dynakv` run in the pod would.
    tls: Option<NodeFiles>,
}

#[derive(Debug, Clone)]
struct NodeFiles {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    /// The pod's DNS name, which its certificate carries.
    server_name: String,
}

/// Kubernetes' `$(VAR)` expansion: `$$` is a literal `$`, an unknown `$(VAR)` stays as it is.
pub fn expand(s: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match vars.get(name) {
                Some(v) => out.push_str(v),
                None => out.push_str(&rest[i..i + 2 + end + 1]),
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The downward API's `fieldRef` paths.
fn field_ref(pod: &Pod, path: &str, ip: Ipv4Addr) -> Result<String, String> {
    let label = |map: &Option<BTreeMap<String, String>>, key: &str| {
        map.as_ref()
            .and_then(|m| m.get(key))
            .cloned()
            .unwrap_or_default()
    };
    let quoted = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|r| r.strip_prefix("['"))
            .and_then(|r| r.strip_suffix("']"))
            .map(str::to_string)
    };
    Ok(match path {
        "metadata.name" => pod.name_any(),
        "metadata.namespace" => pod.namespace().unwrap_or_default(),
        "metadata.uid" => pod.uid().unwrap_or_default(),
        "spec.nodeName" => NODE_NAME.into(),
        "spec.serviceAccountName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" => ip.to_string(),
        "status.hostIP" => "127.0.0.1".into(),
        _ => {
            if let Some(k) = quoted("metadata.labels") {
                label(&pod.metadata.labels, &k)
            } else if let Some(k) = quoted("metadata.annotations") {
                label(&pod.metadata.annotations, &k)
            } else {
                return Err(format!("fieldRef {path} is not supported"));
            }
        }
    })
}

/// Rewrites a container path under a volume mount to the volume's directory.
fn translate(arg: &str, mounts: &Mounts) -> String {
    if let Some((flag, value)) = arg.split_once('=')
        && flag.starts_with("--")
    {
        return format!("{flag}={}", translate(value, mounts));
    }
    for (mp, host) in mounts {
        if arg == mp {
            return host.to_string_lossy().into_owned();
        }
        if let Some(rest) = arg.strip_prefix(mp.as_str())
            && rest.starts_with('/')
        {
            return format!("{}{rest}", host.to_string_lossy());
        }
    }
    arg.to_string()
}

async fn build_process(
    shared: &Shared,
    pod: &Pod,
    c: &Container,
    ip: Ipv4Addr,
    mounts: &Mounts,
    dir: &Path,
) -> Result<Proc, String> {
    if c.env_from.as_ref().is_some_and(|e| !e.is_empty()) {
        return Err("envFrom is not supported".into());
    }
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    let mut env: Vec<(String, String)> = Vec::new();
    for e in c.env.iter().flatten() {
        let value = if let Some(from) = &e.value_from {
            match &from.field_ref {
                Some(f) => field_ref(pod, &f.field_path, ip)?,
                None => return Err(format!("env {}: only fieldRef is supported", e.name)),
            }
        } else {
            expand(e.value.as_deref().unwrap_or(""), &vars)
        };
        vars.insert(e.name.clone(), value.clone());
        env.push((e.name.clone(), value));
    }
    let command: Vec<String> = c
        .command
        .iter()
        .flatten()
        .map(|s| expand(s, &vars))
        .collect();
    let program = match command.first().map(String::as_str) {
        Some("dynakv" | "/dynakv" | "/usr/local/bin/dynakv") => shared.cfg.dynakv.clone(),
        other => {
            return Err(format!(
                "command {other:?}: the stand-in runs the workspace's dynakv binary only"
            ));
        }
    };
    let mut args: Vec<String> = command[1..]
        .iter()
        .cloned()
        .chain(c.args.iter().flatten().map(|s| expand(s, &vars)))
        .map(|a| translate(&a, mounts))
        .collect();
    env.push(("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()));
    if let Some((_, tmp)) = mounts.iter().find(|(p, _)| p == "/tmp") {
        env.push(("TMPDIR".into(), tmp.to_string_lossy().into_owned()));
    }
    env.extend(shared.cfg.dns_env());

    // The node's effective configuration (file and flags), to move its sockets and its data
    // directory where this machine has them.
    let mut print = Command::new(&program);
    print
        .args(&args)
        .arg("--print-config")
        .env_clear()
        .envs(env.iter().cloned())
        .current_dir(dir);
    let out = tokio::time::timeout(Duration::from_secs(30), print.output())
        .await
        .map_err(|_| "--print-config did not finish".to_string())?
        .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
    if !out.status.success() {
        return Err(format!(
            "dynakv {} --print-config failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let config: Value = serde_saphyr::from_str(&String::from_utf8_lossy(&out.stdout))
        .map_err(|e| format!("--print-config output: {e}"))?;
    let on_pod_ip = |key: &str| -> Result<Option<String>, String> {
        let Some(s) = config[key].as_str() else {
            return Ok(None);
        };
        let addr: SocketAddr = s.parse().map_err(|e| format!("{key} {s:?}: {e}"))?;
        let ip = if addr.ip().is_unspecified() {
            std::net::IpAddr::V4(ip)
        } else {
            addr.ip()
        };
        Ok(Some(SocketAddr::new(ip, addr.port()).to_string()))
    };
    if let Some(l) = on_pod_ip("listen")? {
        args.extend(["--listen".into(), l]);
    }
    if let Some(m) = on_pod_ip("metrics_listen")? {
        args.extend(["--metrics-listen".into(), m]);
    }
    let data_dir = config["data_dir"]
        .as_str()
        .ok_or("the effective config has no data_dir")?;
    let host_data = translate(data_dir, mounts);
    if host_data == data_dir {
        return Err(format!(
            "data_dir {data_dir} is on the container's root filesystem, which the stand-in does not have"
        ));
    }
    args.extend(["--data-dir".into(), host_data]);
    // The certificate files named in the configuration, where this machine has them.
    let mut tls = None;
    if config["tls"].is_object() {
        let mut files = Vec::new();
        for (key, flag) in [
            ("cert", "--tls-cert"),
            ("key", "--tls-key"),
            ("ca", "--tls-ca"),
        ] {
            let path = config["tls"][key]
                .as_str()
                .ok_or(format!("tls.{key} is not set"))?;
            let host = translate(path, mounts);
            args.extend([flag.to_string(), host.clone()]);
            files.push(PathBuf::from(host));
        }
        let spec = pod.spec.as_ref();
        let server_name = match (
            spec.and_then(|s| s.hostname.as_ref()),
            spec.and_then(|s| s.subdomain.as_ref()),
        ) {
            (Some(h), Some(sub)) => format!("{h}.{sub}.{}.svc", shared.cfg.namespace),
            _ => "localhost".into(),
        };
        let [cert, key, ca] = <[PathBuf; 3]>::try_from(files).map_err(|_| "tls files")?;
        tls = Some(NodeFiles {
            cert,
            key,
            ca,
            server_name,
        });
    }
    Ok(Proc {
        program,
        args,
        env,
        tls,
    })
}

fn spawn(proc: &Proc, dir: &Path) -> std::io::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("container.log"))?;
    let mut cmd = std::process::Command::new(&proc.program);
    cmd.args(&proc.args)
        .env_clear()
        .envs(proc.env.iter().cloned())
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    util::die_with_parent(&mut cmd);
    let mut cmd = Command::from(cmd);
    cmd.kill_on_drop(true);
    cmd.spawn()
}

/// The number of a probe's port, named or not, in container `c`.
fn probe_port(c: &Container, port: &IntOrString) -> Option<i32> {
    match port {
        IntOrString::Int(n) => Some(*n),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port),
    }
}

/// One `GET` of an `httpGet` probe: success is a status in 200..400, as kubelet has it.
async fn http_probe_ok(ip: Ipv4Addr, port: i32, path: &str, timeout: Duration) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let get = async {
        let mut s = tokio::net::TcpStream::connect((ip, u16::try_from(port).ok()?))
            .await
            .ok()?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {ip}:{port}\r\nUser-Agent: kube-probe/1.37\r\nConnection: close\r\n\r\n"
        );
        s.write_all(request.as_bytes()).await.ok()?;
        let mut head = vec![0u8; 64];
        let n = s.read(&mut head).await.ok()?;
        let line = String::from_utf8_lossy(&head[..n]);
        let code: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some((200..400).contains(&code))
    };
    tokio::time::timeout(timeout, get)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// One probe against the pod's address: `httpGet`, or `grpc.health.v1.Health/Check` (plain).
async fn probe_ok(ip: Ipv4Addr, probe: &Probe, c: &Container) -> bool {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64);
    if let Some(h) = &probe.http_get {
        let Some(port) = probe_port(c, &h.port) else {
            return false;
        };
        return http_probe_ok(ip, port, h.path.as_deref().unwrap_or("/"), timeout).await;
    }
    let Some(grpc) = &probe.grpc else {
        return false;
    };
    let Ok(endpoint) =
        tonic::transport::Endpoint::from_shared(format!("http://{ip}:{}", grpc.port))
    else {
        return false;
    };
    let check = async {
        let channel = endpoint.connect_timeout(timeout).connect().await.ok()?;
        let resp = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: grpc.service.clone().unwrap_or_default(),
            })
            .await
            .ok()?;
        Some(resp.into_inner().status == ServingStatus::Serving as i32)
    };
    tokio::time::timeout(timeout, check)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// A probe's schedule and consecutive results.
struct ProbeState {
    probe: Option<Probe>,
    next: Instant,
    successes: i32,
    failures: i32,
}

impl ProbeState {
    fn new(probe: Option<Probe>, now: Instant) -> Self {
        let delay = probe
            .as_ref()
            .and_then(|p| p.initial_delay_seconds)
            .unwrap_or(0);
        ProbeState {
            probe,
            next: now + Duration::from_secs(delay.max(0) as u64),
            successes: 0,
            failures: 0,
        }
    }

    /// Runs the probe if it is due: `Some(true)` once it has reached its success threshold,
    /// `Some(false)` once it has reached its failure threshold, `None` otherwise.
    async fn tick(&mut self, ip: Ipv4Addr, c: &Container) -> Option<bool> {
        let p = self.probe.as_ref()?;
        let now = Instant::now();
        if now < self.next {
            return None;
        }
        self.next = now + Duration::from_secs(p.period_seconds.unwrap_or(10).max(1) as u64);
        if probe_ok(ip, p, c).await {
            self.failures = 0;
            self.successes += 1;
            (self.successes >= p.success_threshold.unwrap_or(1)).then_some(true)
        } else {
            self.successes = 0;
            self.failures += 1;
            (self.failures >= p.failure_threshold.unwrap_or(3)).then_some(false)
        }
    }
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

async fn patch_status(shared: &Shared, name: &str, status: Value) {
    let patch = json!({ "status": status });
    if let Err(e) = shared
        .pods_api()
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        shared.note(format!("{name}: status not written: {e}"));
    }
}

fn running_status(
    ip: Ipv4Addr,
    c: &Container,
    ready: bool,
    started: bool,
    restarts: i32,
    since: &str,
) -> Value {
    let b = |v: bool| if v { "True" } else { "False" };
    json!({
        "phase": "Running",
        "hostIP": "127.0.0.1",
        "hostIPs": [{"ip": "127.0.0.1"}],
        "podIP": ip.to_string(),
        "podIPs": [{"ip": ip.to_string()}],
        "startTime": since,
        "conditions": [
            {"type": "PodReadyToStartContainers", "status": "True", "lastTransitionTime": since},
            {"type": "Initialized", "status": "True", "lastTransitionTime": since},
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": since},
            {"type": "ContainersReady", "status": b(ready), "lastTransitionTime": now_rfc3339()},
            {"type": "Ready", "status": b(ready), "lastTransitionTime": now_rfc3339()},
        ],
        "containerStatuses": [{
            "name": c.name,
            "image": c.image.clone().unwrap_or_default(),
            "imageID": "",
            "ready": ready,
            "started": started,
            "restartCount": restarts,
            "state": {"running": {"startedAt": now_rfc3339()}},
        }],
    })
}

/// Asks the node how the cluster sees it (for the stop record); with TLS, as the node itself
/// (its certificate may call every service).
async fn member_at_stop(
    ip: Ipv4Addr,
    port: i32,
    pod: &str,
    tls: Option<&NodeFiles>,
) -> Option<MemberAtStop> {
    let ask = async {
        let tls = match tls {
            Some(f) => Some(crate::workload::ClientTls {
                server_name: f.server_name.clone(),
                config: dynakv_node::tls::client_config_from_files(&f.ca, Some((&f.cert, &f.key)))
                    .ok()?,
                token: None,
            }),
            None => None,
        };
        let channel = crate::workload::channel(
            &format!("{ip}:{port}"),
            tls.as_ref(),
            Duration::from_secs(2),
        )
        .await?;
        let status = AdminClient::new(channel)
            .cluster_status(ClusterStatusRequest::default())
            .await
            .ok()?
            .into_inner();
        let m = status.members.iter().find(|m| m.id == pod)?;
        Some(MemberAtStop {
            lifecycle: m.lifecycle.clone(),
            weight: m.weight,
            target_weight: m.target_weight,
            replica_ownership: m.replica_ownership,
            rebalancing: status
                .rebalance
                .as_ref()
                .filter(|r| r.active)
                .map(|r| r.node.clone()),
        })
    };
    tokio::time::timeout(Duration::from_secs(4), ask)
        .await
        .ok()
        .flatten()
}

/// Runs the container, restarting it when it exits or fails its liveness probe, until the pod
/// is stopped; returns why.
async fn supervise(
    shared: &Arc<Shared>,
    name: &str,
    ip: Ipv4Addr,
    c: &Container,
    proc: &Proc,
    dir: &Path,
    stop: &mut watch::Receiver<Option<Stop>>,
) -> Stop {
    let since = now_rfc3339();
    let grpc_port = c
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("grpc"))
        .map(|p| p.container_port)
        .unwrap_or(7070);
    let mut restarts = 0;
    let mut backoff = Duration::from_secs(1);
    loop {
        let mut child = match spawn(proc, dir) {
            Ok(ch) => ch,
            Err(e) => {
                shared.note(format!("{name}: spawn failed: {e}"));
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        let mut ready = false;
        let mut started = c.startup_probe.is_none();
        patch_status(
            shared,
            name,
            running_status(ip, c, ready, started, restarts, &since),
        )
        .await;
        let now = Instant::now();
        let mut startup = ProbeState::new(c.startup_probe.clone(), now);
        let mut readiness = ProbeState::new(c.readiness_probe.clone(), now);
        let mut liveness = ProbeState::new(c.liveness_probe.clone(), now);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let outcome: Result<Stop, String> = loop {
            tokio::select! {
                biased;
                _ = stop.changed() => {
                    if let Some(why) = *stop.borrow() {
                        break Ok(why);
                    }
                }
                status = child.wait() => {
                    break Err(format!("exited: {}", status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string())));
                }
                _ = tick.tick() => {
                    if !started {
                        match startup.tick(ip, c).await {
                            Some(true) => {
                                started = true;
                                shared.note(format!("{name}: started"));
                                patch_status(shared, name, running_status(ip, c, ready, started, restarts, &since)).await;
                            }
                            Some(false) => break Err("startup probe failed".into()),
                            None => {}
                        }
                        continue;
                    }
                    if let Some(false) = liveness.tick(ip, c).await {
                        break Err("liveness probe failed".into());
                    }
                    let now_ready = match readiness.tick(ip, c).await {
                        Some(r) => r,
                        None if c.readiness_probe.is_none() => true,
                        None => ready,
                    };
                    if now_ready != ready {
                        ready = now_ready;
                        shared.note(format!("{name}: ready={ready}"));
                        patch_status(shared, name, running_status(ip, c, ready, started, restarts, &since)).await;
                    }
                }
            }
        };
        match outcome {
            Ok(why) => {
                let member = match why {
                    Stop::Shutdown => None,
                    _ => member_at_stop(ip, grpc_port, name, proc.tls.as_ref()).await,
                };
                shared.note(format!(
                    "{name}: stopping ({why:?}); member then: {member:?}"
                ));
                if why != Stop::Shutdown {
                    lock(&shared.stops).push(StopRecord {
                        pod: name.to_string(),
                        deleted: true,
                        member,
                    });
                }
                let grace = match why {
                    Stop::Deleted { grace } => grace,
                    Stop::Gone => Duration::from_secs(5),
                    Stop::Shutdown => Duration::ZERO,
                };
                stop_child(&mut child, grace).await;
                shared.note(format!("{name}: stopped"));
                return why;
            }
            Err(e) => {
                shared.note(format!("{name}: {e}; restarting in {backoff:?}"));
                let _ = child.start_kill();
                let _ = child.wait().await;
                restarts += 1;
                patch_status(
                    shared,
                    name,
                    json!({
                        "conditions": [
                            {"type": "PodReadyToStartContainers", "status": "True", "lastTransitionTime": since},
                            {"type": "Initialized", "status": "True", "lastTransitionTime": since},
                            {"type": "PodScheduled", "status": "True", "lastTransitionTime": since},
                            {"type": "ContainersReady", "status": "False", "lastTransitionTime": now_rfc3339()},
                            {"type": "Ready", "status": "False", "lastTransitionTime": now_rfc3339()},
                        ],
                        "containerStatuses": [{
                            "name": c.name, "image": c.image.clone().unwrap_or_default(), "imageID": "",
                            "ready": false, "started": false, "restartCount": restarts,
                            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": e}},
                        }],
                    }),
                )
                .await;
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    r = stop.wait_for(Option::is_some) => {
                        return r.ok().and_then(|s| *s).unwrap_or(Stop::Shutdown);
                    }
                }
                backoff = (backoff * 2).min(Duration::from_secs(8));
            }
        }
    }
}

/// SIGTERM, then SIGKILL after `grace`.
async fn stop_child(child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok())
        && !grace.is_zero()
    {
        // SAFETY: kill(2) on our own child, not yet reaped (id() is Some).
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        if tokio::time::timeout(grace, child.wait()).await.is_ok() {
            return;
        }
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion_follows_kubernetes_rules() {
        let vars = BTreeMap::from([
            ("POD_NAME".to_string(), "kv-0".to_string()),
            ("EMPTY".to_string(), String::new()),
        ]);
        assert_eq!(
            expand("$(POD_NAME).kv-peers.$(NS).svc:7070", &vars),
            "kv-0.kv-peers.$(NS).svc:7070"
        );
        assert_eq!(expand("--zone=$(EMPTY)", &vars), "--zone=");
        assert_eq!(expand("$$(POD_NAME) $ $(", &vars), "$(POD_NAME) $ $(");
    }

    #[test]
    fn paths_under_a_mount_move_to_the_volume_directory() {
        let mounts: Mounts = vec![
            ("/etc/dynakv".into(), PathBuf::from("/t/cfg")),
            ("/data".into(), PathBuf::from("/t/pvc")),
        ];
        assert_eq!(
            translate("/etc/dynakv/dynakv.yaml", &mounts),
            "/t/cfg/dynakv.yaml"
        );
        assert_eq!(translate("--data-dir=/data", &mounts), "--data-dir=/t/pvc");
        assert_eq!(translate("/database", &mounts), "/database");
        assert_eq!(translate("serve", &mounts), "serve");
    }
}
