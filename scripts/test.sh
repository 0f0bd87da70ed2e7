#!/usr/bin/env bash
# Every test of the workspace, on a fresh machine too: installs what the tests need, then runs
#   cargo nextest run --workspace --no-fail-fast [ARGS...]
# and, when no ARGS narrow the run, a short fuzz of every decoder that takes outside bytes
# (scripts/fuzz.sh: 10 s per target; it installs cargo-fuzz when missing).
#
# What it installs (each step is skipped when already done, so a second run starts testing at
# once):
#   - cargo-nextest (`cargo install --locked cargo-nextest`) when `cargo nextest` is missing;
#   - a real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager, kubectl),
#     helm, prometheus and promtool: `scripts/k8s-testenv.sh install` builds them with Go from
#     the Go module proxy, once per machine, cached under ~/.cache/dynakv-testenv (docs/testing.md,
#     "A real Kubernetes control plane"; about 25 minutes cold on two cores, then instant);
#   - Debian's libnss-wrapper: the kubelet stand-in of tests/k8s resolves pod DNS names per
#     process with it (docs/testing.md, "The operator end to end").
# The testenv's bin directory goes first on PATH (DYNAKV_TESTENV_BIN), as `k8s-testenv.sh env`
# says. The k8s tests fail rather than skip when CI=true and something is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { echo "test.sh: $*" >&2; }
t0=$SECONDS

if ! cargo nextest --version >/dev/null 2>&1; then
  step "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

scripts/k8s-testenv.sh install >&2

have_nss_wrapper() {
  local f
  for f in /usr/lib/libnss_wrapper.so /usr/lib/*/libnss_wrapper.so /usr/lib64/libnss_wrapper.so; do
    [[ -f $f ]] && return 0
  done
  return 1
}
if ! have_nss_wrapper; then
  step "installing libnss-wrapper"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update >&2
  apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends libnss-wrapper >&2
fi
step "tools ready after $((SECONDS - t0)) s"

eval "$(scripts/k8s-testenv.sh env)"
status=0
cargo nextest run --workspace --no-fail-fast "$@" || status=$?
if (($# == 0)); then
  scripts/fuzz.sh || status=1
fi
exit "$status"
