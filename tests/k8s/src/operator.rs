//! `dynakv-operator run` as a real process against a test control plane.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::kubelet::{KubeletConfig, MAX_PODS};
use crate::util;

/// The operator process; SIGTERM (then SIGKILL) on drop.
pub struct Operator {
    child: Child,
    pub log: PathBuf,
    /// Where its `/metrics` listens.
    pub http: String,
}

impl Operator {
    /// Starts `dynakv-operator run` with the kubeconfig, reaching each pod the stand-ins run
    /// through `--admin-address` (its seam for an operator outside the cluster): every ordinal
    /// a stand-in can give an address to is listed, so pods that appear later are reachable.
    pub fn start(
        binary: &Path,
        kubeconfig: &Path,
        kubelets: &[&KubeletConfig],
        http_ip: Ipv4Addr,
        dir: &Path,
    ) -> Operator {
        let log = dir.join("operator.log");
        let file = std::fs::File::create(&log).expect("the operator's log file");
        let http = format!("{http_ip}:8080");
        let mut cmd = Command::new(binary);
        cmd.arg("run")
            .arg("--http-listen")
            .arg(&http)
            .env("KUBECONFIG", kubeconfig)
            .env(
                "RUST_LOG",
                std::env::var("DYNAKV_OPERATOR_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file);
        for k in kubelets {
            for i in 0..u32::from(MAX_PODS) {
                cmd.arg("--admin-address")
                    .arg(format!("{}-{i}={}:7070", k.cluster, k.pod_ip(i)));
            }
        }
        util::die_with_parent(&mut cmd);
        let child = cmd.spawn().expect("start dynakv-operator");
        Operator { child, log, http }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        util::terminate(&mut self.child, Duration::from_secs(5));
        if std::thread::panicking() {
            eprintln!(
                "--- last lines of {}\n{}",
                self.log.display(),
                util::tail(&self.log, 40)
            );
        }
    }
}
