//! The tools the tests drive and the real control plane of `scripts/k8s-testenv.sh`.
//!
//! [`Tools::find`] locates every binary a test needs. When one is missing the test fails if
//! `CI=true` (a CI run must never pass by skipping) and otherwise skips with a loud message that
//! says how to install it. [`ControlPlane`] is one `k8s-testenv.sh start DIR` (etcd,
//! kube-apiserver, kube-controller-manager) in a temporary directory, stopped on drop; the
//! environment's watchdog stops it too if the test process is killed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::util::{self, Out};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root")
}

/// What a test needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// etcd, kube-apiserver, kube-controller-manager, kubectl (scripts/k8s-testenv.sh install).
    ControlPlane,
    /// helm (scripts/k8s-testenv.sh install).
    Helm,
    /// promtool (scripts/k8s-testenv.sh install).
    Promtool,
    /// prometheus, the server, with Kubernetes service discovery (scripts/k8s-testenv.sh
    /// install; Debian's package has no Kubernetes discovery).
    Prometheus,
    /// libnss_wrapper.so (Debian's libnss-wrapper; scripts/test.sh installs it): the stand-in
    /// kubelet's per-process DNS for pod names.
    NssWrapper,
    /// The workspace's `dynakv` and `dynakv-operator` binaries ([`workspace_bins`]).
    WorkspaceBins,
}

/// Paths of everything the tests run.
#[derive(Debug, Clone)]
pub struct Tools {
    /// The testenv's bin directory (etcd, kube-apiserver, kube-controller-manager, kubectl,
    /// helm, prometheus, promtool).
    pub testenv_bin: PathBuf,
    pub kubectl: PathBuf,
    pub helm: PathBuf,
    pub promtool: PathBuf,
    pub prometheus: PathBuf,
    pub nss_wrapper: PathBuf,
    bins: Option<WorkspaceBins>,
    pub script: PathBuf,
}

/// The workspace's own binaries.
#[derive(Debug, Clone)]
pub struct WorkspaceBins {
    /// `dynakv` (the node and the CLI).
    pub dynakv: PathBuf,
    /// `dynakv-operator`.
    pub operator: PathBuf,
}

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// The testenv's bin directory: `DYNAKV_TESTENV_BIN`, or what `k8s-testenv.sh env` says.
fn testenv_bin(script: &Path) -> PathBuf {
    if let Some(dir) = std::env::var_os("DYNAKV_TESTENV_BIN") {
        return PathBuf::from(dir);
    }
    let out = util::run(
        Command::new("bash").arg(script).arg("env"),
        Duration::from_secs(30),
    );
    assert!(out.ok(), "{} env failed: {out}", script.display());
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix("export DYNAKV_TESTENV_BIN="))
        .map(|v| PathBuf::from(v.trim_matches('\'')))
        .unwrap_or_else(|| panic!("no DYNAKV_TESTENV_BIN in `{} env`", script.display()))
}

fn find_nss_wrapper() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DYNAKV_NSS_WRAPPER") {
        return Some(PathBuf::from(p));
    }
    let mut dirs = vec![
        PathBuf::from("/usr/lib"),
        PathBuf::from("/usr/lib64"),
        PathBuf::from("/lib"),
    ];
    if let Ok(entries) = std::fs::read_dir("/usr/lib") {
        dirs.extend(
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir() && p.to_string_lossy().contains("-linux-")),
        );
    }
    dirs.into_iter()
        .map(|d| d.join("libnss_wrapper.so"))
        .find(|f| f.is_file())
}

/// Newest modification time of the files under `path` (a file or a directory tree).
fn newest_mtime(path: &Path) -> Option<SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_dir() {
        return meta.modified().ok();
    }
    std::fs::read_dir(path)
        .ok()?
        .flatten()
        .filter_map(|e| newest_mtime(&e.path()))
        .max()
}

/// The workspace's `dynakv` and `dynakv-operator`, as fresh as their sources.
///
/// A test cannot use another package's `CARGO_BIN_EXE_*`, so this looks where cargo put them
/// for this test binary's profile: `<target>/<profile>/` (this binary is
/// `<target>/<profile>/deps/e2e-<hash>`). `cargo nextest run --workspace` always leaves them
/// there fresh, because `dynakv-node` and `dynakv-operator` have integration tests and cargo
/// builds a package's binaries for those. When a binary is missing, or older than any source it
/// is built from (a run of `-p dynakv-k8s-tests` alone after an edit), this runs `cargo build`
/// for the two binaries in the same target directory and profile, once per test process; cargo's
/// own lock serializes concurrent tests. `DYNAKV_BIN` and `DYNAKV_OPERATOR_BIN` name other
/// binaries and skip all of that.
pub fn workspace_bins() -> WorkspaceBins {
    static BINS: OnceLock<WorkspaceBins> = OnceLock::new();
    BINS.get_or_init(|| {
        if let (Some(d), Some(o)) = (
            std::env::var_os("DYNAKV_BIN"),
            std::env::var_os("DYNAKV_OPERATOR_BIN"),
        ) {
            return WorkspaceBins {
                dynakv: d.into(),
                operator: o.into(),
            };
        }
        let exe = std::env::current_exe().expect("the test binary's path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("the test binary lives in <target>/<profile>/deps");
        let target_dir = profile_dir.parent().expect("<target>/<profile>");
        let bins = WorkspaceBins {
            dynakv: profile_dir.join("dynakv"),
            operator: profile_dir.join("dynakv-operator"),
        };
        let root = repo_root();
        let sources = [
            "Cargo.toml",
            "Cargo.lock",
            "proto",
            "node/Cargo.toml",
            "node/build.rs",
            "node/src",
            "node/core/Cargo.toml",
            "node/core/src",
            "operator/Cargo.toml",
            "operator/build.rs",
            "operator/src",
        ];
        let newest_source = sources
            .iter()
            .filter_map(|s| newest_mtime(&root.join(s)))
            .max();
        let fresh = |bin: &Path| {
            let built = std::fs::metadata(bin).and_then(|m| m.modified()).ok();
            matches!((built, newest_source), (Some(b), Some(s)) if b >= s)
        };
        if fresh(&bins.dynakv) && fresh(&bins.operator) {
            return bins;
        }
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => "dev",
            Some(p) => p,
            None => panic!("no profile directory in {}", exe.display()),
        };
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        eprintln!(
            "dynakv-k8s-tests: {} or {} is missing or older than its sources: cargo build \
             --profile {profile} -p dynakv-node -p dynakv-operator",
            bins.dynakv.display(),
            bins.operator.display()
        );
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--profile", profile, "-p", "dynakv-node"])
            .args(["-p", "dynakv-operator", "--bin", "dynakv", "--bin"])
            .arg("dynakv-operator")
            .env("CARGO_TARGET_DIR", target_dir)
            .current_dir(&root);
        // What cargo and nextest set for this test (CARGO_PKG_NAME, CARGO_MANIFEST_DIR, ...)
        // must not reach the inner cargo: build scripts that read such a variable (ring's does,
        // with rerun-if-env-changed) would be rerun, and everything above them rebuilt, here
        // and again in the next ordinary build.
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            let set_for_a_test = k.starts_with("CARGO_PKG_")
                || k.starts_with("CARGO_BIN_")
                || k.starts_with("NEXTEST")
                || k.starts_with("__NEXTEST")
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_CRATE_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "CARGO_RUSTC_CURRENT_DIR",
                    "OUT_DIR",
                ]
                .contains(&k.as_ref());
            if set_for_a_test {
                cmd.env_remove(&key);
            }
        }
        let out = util::run(&mut cmd, Duration::from_secs(1800));
        assert!(out.ok(), "building the workspace's binaries failed: {out}");
        assert!(
            bins.dynakv.is_file() && bins.operator.is_file(),
            "cargo build left no {} or {}",
            bins.dynakv.display(),
            bins.operator.display()
        );
        bins
    })
    .clone()
}

impl Tools {
    /// Every tool in `needs`, or `None` when some are missing outside CI (the test then returns
    /// early after a loud message). In CI (`CI=true`) a missing tool fails the test.
    pub fn find(test: &str, needs: &[Need]) -> Option<Tools> {
        let root = repo_root();
        let script = root.join("scripts/k8s-testenv.sh");
        let bin = testenv_bin(&script);
        let mut tools = Tools {
            kubectl: bin.join("kubectl"),
            helm: bin.join("helm"),
            promtool: bin.join("promtool"),
            prometheus: bin.join("prometheus"),
            nss_wrapper: find_nss_wrapper()
                .unwrap_or_else(|| PathBuf::from("/usr/lib/libnss_wrapper.so")),
            bins: None,
            testenv_bin: bin.clone(),
            script,
        };
        let mut missing = Vec::new();
        for need in needs {
            let files: Vec<PathBuf> = match need {
                Need::ControlPlane => ["etcd", "kube-apiserver", "kube-controller-manager"]
                    .iter()
                    .map(|b| bin.join(b))
                    .chain([tools.kubectl.clone()])
                    .collect(),
                Need::Helm => vec![tools.helm.clone()],
                Need::Promtool => vec![tools.promtool.clone()],
                Need::Prometheus => vec![tools.prometheus.clone()],
                Need::NssWrapper => vec![tools.nss_wrapper.clone()],
                Need::WorkspaceBins => Vec::new(),
            };
            missing.extend(files.into_iter().filter(|f| !f.is_file()));
        }
        if missing.is_empty() {
            if needs.contains(&Need::WorkspaceBins) {
                tools.bins = Some(workspace_bins());
            }
            return Some(tools);
        }
        let list = missing
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let how = "scripts/test.sh installs them (scripts/k8s-testenv.sh install, and \
                   apt-get install libnss-wrapper)";
        if ci() {
            panic!("{test}: missing {list}; CI=true, so this fails instead of skipping: {how}");
        }
        eprintln!(
            "\n{bar}\nSKIPPED {test}: missing {list}\n{how}\n{bar}\n",
            bar = "!".repeat(78)
        );
        None
    }

    /// The workspace's binaries (the test must have asked for [`Need::WorkspaceBins`]).
    pub fn bins(&self) -> &WorkspaceBins {
        self.bins
            .as_ref()
            .expect("Tools::find was not asked for Need::WorkspaceBins")
    }
}

/// The controllers of kube-controller-manager the tests run: the script's default list without
/// `endpoints-controller` and `endpointslice-controller` (it keeps the PVC protection controller,
/// without which a deleted PVC would keep its finalizer for ever). The stand-in's pod IPs are loopback
/// addresses, which the API server refuses in Endpoints and EndpointSlices, so those two would
/// retry (and log a warning) on every pod change; nothing in the tests reads endpoints (there is
/// no kube-proxy or cluster DNS, and Prometheus discovers pods, not endpoints).
pub const CONTROLLERS: &str = "serviceaccount-token-controller,serviceaccount-controller,\
root-ca-certificate-publisher-controller,namespace-controller,garbage-collector-controller,\
statefulset-controller,replicaset-controller,deployment-controller,disruption-controller,\
job-controller,ttl-after-finished-controller,clusterrole-aggregation-controller,\
service-cidr-controller,persistentvolumeclaim-protection-controller";

/// One real control plane, stopped on drop.
pub struct ControlPlane {
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
    tools: Tools,
}

impl ControlPlane {
    /// `k8s-testenv.sh start DIR` in a new temporary directory, owned by this process.
    pub fn start(tools: &Tools) -> ControlPlane {
        // DYNAKV_K8S_KEEP=1 keeps the directory (logs of every process, the kubelet stand-in's
        // pod directories, volumes) after the test; the processes are stopped all the same.
        let keep = std::env::var_os("DYNAKV_K8S_KEEP").is_some_and(|v| v == "1");
        let dir = tempfile::Builder::new()
            .prefix("dynakv-k8s-")
            .disable_cleanup(keep)
            .tempdir()
            .expect("a temporary directory");
        if keep {
            eprintln!(
                "dynakv-k8s-tests: DYNAKV_K8S_KEEP=1: keeping {}",
                dir.path().display()
            );
        }
        let out = util::run(
            Command::new("bash")
                .arg(&tools.script)
                .arg("start")
                .arg(dir.path())
                .env("DYNAKV_TESTENV_OWNER_PID", std::process::id().to_string())
                .env("DYNAKV_TESTENV_CONTROLLERS", CONTROLLERS),
            Duration::from_secs(240),
        );
        assert!(out.ok(), "k8s-testenv.sh start failed: {out}");
        let kubeconfig = dir.path().join("kubeconfig");
        assert!(kubeconfig.is_file(), "no kubeconfig after start: {out}");
        ControlPlane {
            dir,
            kubeconfig,
            tools: tools.clone(),
        }
    }

    /// `kubectl ARGS` against this control plane.
    pub fn kubectl(&self, args: &[&str]) -> Out {
        self.kubectl_in(args, None)
    }

    /// `kubectl ARGS`, run in directory `cwd` (for relative paths like `deploy/examples/`).
    pub fn kubectl_in(&self, args: &[&str], cwd: Option<&Path>) -> Out {
        let mut cmd = Command::new(&self.tools.kubectl);
        cmd.args(args).env("KUBECONFIG", &self.kubeconfig);
        if let Some(d) = cwd {
            cmd.current_dir(d);
        }
        util::run(&mut cmd, Duration::from_secs(60))
    }

    /// `kubectl ARGS` that must succeed; its standard output.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(out.ok(), "kubectl {}: {out}", args.join(" "));
        out.stdout
    }

    /// `kubectl get ARGS -o json`, parsed; `None` when kubectl fails (e.g. NotFound).
    pub fn get_json(&self, args: &[&str]) -> Option<Value> {
        let mut a = vec!["get"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["-o", "json"]);
        let out = self.kubectl(&a);
        if !out.ok() {
            return None;
        }
        serde_json::from_str(&out.stdout).ok()
    }

    /// Names of the objects `kubectl get ARGS` lists.
    pub fn names(&self, args: &[&str]) -> Vec<String> {
        self.get_json(args)
            .and_then(|v| v["items"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|i| i["metadata"]["name"].as_str().map(str::to_string))
            .collect()
    }

    /// Installs the CRD from `crds/` and waits until the API server serves it.
    pub fn install_crd(&self) {
        let crd = repo_root().join("crds/kvcluster.yaml");
        self.kubectl_ok(&["apply", "--server-side", "-f", &crd.to_string_lossy()]);
        // Polled rather than `kubectl wait --for=condition=Established`, which fails at once
        // when it reads the CRD before the API server has written any condition.
        util::wait_until(
            "the KVCluster CRD to be Established",
            Duration::from_secs(60),
            Duration::from_millis(200),
            |last| {
                let crd = self.get_json(&["crd", "kvclusters.dynakv.io"])?;
                *last = crd["status"].to_string();
                crd["status"]["conditions"]
                    .as_array()?
                    .iter()
                    .any(|c| c["type"] == "Established" && c["status"] == "True")
                    .then_some(())
            },
        );
    }

    /// The log files of the control plane's processes.
    pub fn logs(&self) -> Vec<PathBuf> {
        ["etcd", "kube-apiserver", "kube-controller-manager"]
            .iter()
            .map(|n| self.dir.path().join("logs").join(format!("{n}.log")))
            .collect()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for log in self.logs() {
                if log.ends_with("kube-controller-manager.log") {
                    eprintln!("--- last lines of {}", log.display());
                    eprintln!("{}", util::tail(&log, 30));
                }
            }
        }
        let out = util::run(
            Command::new("bash")
                .arg(&self.tools.script)
                .arg("stop")
                .arg(self.dir.path()),
            Duration::from_secs(60),
        );
        if !out.ok() {
            eprintln!("k8s-testenv.sh stop: {out}");
        }
    }
}
