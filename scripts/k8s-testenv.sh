#!/usr/bin/env bash
# A real Kubernetes control plane for tests: etcd, kube-apiserver and kube-controller-manager,
# built from the Go module proxy, plus kubectl, helm, prometheus and promtool.
#
#   scripts/k8s-testenv.sh install      # build once per machine, cached (a second run takes seconds)
#   scripts/k8s-testenv.sh start DIR    # start etcd, kube-apiserver, kube-controller-manager
#   scripts/k8s-testenv.sh stop DIR     # stop what `start DIR` started (idempotent)
#   scripts/k8s-testenv.sh env          # `export` lines for the cached binaries
#
# Binaries are cached under ${DYNAKV_TESTENV_DIR:-$HOME/.cache/dynakv-testenv}/<k8s version>/bin.
# k8s.io/kubernetes cannot be `go install`ed (its go.mod replaces every staging module with
# ./staging/src/...), so `install` builds it through a generated wrapper module that requires the
# release and replaces each staging module with its published v0.Y.Z. etcd's server module has
# replace lines too, so it gets a wrapper module of its own. Helm, prometheus and promtool are
# plain `go install`s (Debian's prometheus lacks Kubernetes service discovery).
#
# `start DIR` writes DIR/kubeconfig (server https://127.0.0.1:PORT, CA data, bearer token of a user
# in group system:masters), DIR/env (ports and paths as shell assignments), DIR/pids (NAME PID per
# line) and DIR/logs/*.log; the processes are detached from the caller (own session, stdio on
# files), so a test may run `start` with captured output. There is no kubelet, scheduler,
# kube-proxy or container runtime: pods are created by the controllers and stay Pending.
# If DYNAKV_TESTENV_OWNER_PID is set, a watchdog stops the environment when that process exits.
#
# Versions (override with the environment variables of the same name):
#   DYNAKV_K8S_VERSION   v1.37.2   (kube-apiserver, kube-controller-manager, kubectl)
#   DYNAKV_ETCD_VERSION  v3.6.17
#   DYNAKV_HELM_VERSION  v4.3.2
#   DYNAKV_PROMETHEUS_VERSION 3.16.0 (prometheus and promtool, Kubernetes discovery only)
set -euo pipefail

K8S_VERSION=${DYNAKV_K8S_VERSION:-v1.37.2}
ETCD_VERSION=${DYNAKV_ETCD_VERSION:-v3.6.17}
HELM_VERSION=${DYNAKV_HELM_VERSION:-v4.3.2}
PROMETHEUS_VERSION=${DYNAKV_PROMETHEUS_VERSION:-3.16.0}
# Prometheus 3.Y.Z is the Go module version v0.3YY.Z (no `v3` module path).
PROMETHEUS_MODULE_VERSION=$(awk -F. '{printf "v0.%d%02d.%d", $1, $2, $3}' <<<"$PROMETHEUS_VERSION")
CACHE_ROOT=${DYNAKV_TESTENV_DIR:-$HOME/.cache/dynakv-testenv}
VDIR="$CACHE_ROOT/$K8S_VERSION"
BIN="$VDIR/bin"
START_TIMEOUT=${DYNAKV_TESTENV_START_TIMEOUT:-180}
# Controllers of kube-controller-manager (canonical names: cmd/kube-controller-manager/names).
# Left out on purpose: pod-garbage-collector-controller (it deletes pods bound to a node that has
# no Node object, which a kubelet stand-in may do), node-lifecycle and node-ipam (no nodes), the
# persistent-volume binder and expander (no storage provisioner), certificate signing, bootstrap
# tokens. persistentvolumeclaim-protection-controller stays: the API server gives every PVC the
# kubernetes.io/pvc-protection finalizer, and without the controller that removes it no PVC
# could ever be deleted.
CONTROLLERS=${DYNAKV_TESTENV_CONTROLLERS:-serviceaccount-token-controller,serviceaccount-controller,root-ca-certificate-publisher-controller,namespace-controller,garbage-collector-controller,statefulset-controller,replicaset-controller,deployment-controller,disruption-controller,endpoints-controller,endpointslice-controller,job-controller,ttl-after-finished-controller,clusterrole-aggregation-controller,service-cidr-controller,persistentvolumeclaim-protection-controller}

# Never let `go` fetch another toolchain: a release that needs a newer Go must fail here, loudly.
export GOTOOLCHAIN=local
export CGO_ENABLED=0

log() { echo "k8s-testenv: $*" >&2; }
die() {
  log "error: $*"
  exit 1
}

usage() {
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# --- install -------------------------------------------------------------------------------------

# A stamp records which version a cached binary was built from, so a changed version rebuilds it.
stamp_ok() { [[ -x "$BIN/$1" && -f "$VDIR/stamps/$1" && "$(cat "$VDIR/stamps/$1")" == "$2" ]]; }
stamp_set() {
  mkdir -p "$VDIR/stamps"
  echo "$2" >"$VDIR/stamps/$1"
}

build_kubernetes() {
  local want="$K8S_VERSION"
  if stamp_ok kube-apiserver "$want" && stamp_ok kube-controller-manager "$want" && stamp_ok kubectl "$want"; then
    return
  fi
  command -v go >/dev/null || die "go not found (Go $K8S_VERSION's go.mod asks for is needed)"
  local minor=${K8S_VERSION#v1.}
  minor=${minor%%.*}
  local staging_version="v0.${K8S_VERSION#v1.}"
  local src="$VDIR/src/kubernetes"
  mkdir -p "$src" "$BIN"
  log "building kube-apiserver, kube-controller-manager, kubectl $K8S_VERSION in $src"

  # The staging modules: the release's own go.mod replaces each with ./staging/src/<module>.
  local gomod
  gomod=$(cd "$src" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" |
    sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
  [[ -f "$gomod" ]] || die "go mod download k8s.io/kubernetes@$K8S_VERSION gave no go.mod"
  local go_line
  go_line=$(grep -m1 '^go ' "$gomod")
  local -a staging
  mapfile -t staging < <(sed -n 's|^[[:space:]]*\(k8s.io/[^[:space:]]*\)[[:space:]]*=>[[:space:]]*\./staging/.*|\1|p' "$gomod")
  ((${#staging[@]} > 0)) || die "no staging replace lines in $gomod"

  {
    echo "// Generated by scripts/k8s-testenv.sh: builds k8s.io/kubernetes $K8S_VERSION from the module proxy."
    echo "module dynakv.test/k8s-testenv"
    echo
    echo "$go_line"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    echo "replace ("
    local m
    for m in "${staging[@]}"; do
      echo "	$m => $m $staging_version"
    done
    echo ")"
  } >"$src/go.mod"
  rm -f "$src/go.sum"

  local pkgs=(k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kubectl)
  # `go get` of the commands (not of the module) resolves the graph and fills go.sum. Two staging
  # modules (sample-cli-plugin, sample-controller) are not published; nothing imports them, so
  # their replace lines are never followed.
  (cd "$src" && go get "${pkgs[@]/%/@$K8S_VERSION}")

  local ldflags="-s -w" pkg
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  (cd "$src" && nice -n 10 go build -trimpath -tags selinux,notest -ldflags "$ldflags" -o "$BIN/" "${pkgs[@]}")
  local b
  for b in kube-apiserver kube-controller-manager kubectl; do stamp_set "$b" "$want"; done
}

build_etcd() {
  stamp_ok etcd "$ETCD_VERSION" && return
  local src="$VDIR/src/etcd"
  mkdir -p "$src" "$BIN"
  log "building etcd $ETCD_VERSION in $src"
  # go.etcd.io/etcd/server/v3 is `package main` at its root; its go.mod has replace lines
  # (../api, ../pkg, ...), which a wrapper module ignores: the required versions are published.
  local go_line
  go_line=$(grep -m1 '^go ' "$(cd "$src" && go mod download -json "go.etcd.io/etcd/server/v3@$ETCD_VERSION" |
    sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')")
  printf '// Generated by scripts/k8s-testenv.sh: builds etcd %s from the module proxy.\nmodule dynakv.test/etcd-testenv\n\n%s\n\nrequire go.etcd.io/etcd/server/v3 %s\n' \
    "$ETCD_VERSION" "$go_line" "$ETCD_VERSION" >"$src/go.mod"
  rm -f "$src/go.sum"
  (cd "$src" && go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION")
  (cd "$src" && nice -n 10 go build -trimpath -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3)
  stamp_set etcd "$ETCD_VERSION"
}

build_helm() {
  stamp_ok helm "$HELM_VERSION" && return
  mkdir -p "$BIN"
  log "building helm $HELM_VERSION"
  # Helm reads its version from an ldflag; without it, `helm version` prints a placeholder.
  GOBIN="$BIN" nice -n 10 go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
  stamp_set helm "$HELM_VERSION"
}

build_prometheus() {
  if stamp_ok prometheus "$PROMETHEUS_VERSION" && stamp_ok promtool "$PROMETHEUS_VERSION"; then
    return
  fi
  mkdir -p "$BIN"
  log "building prometheus and promtool $PROMETHEUS_VERSION"
  # Debian's prometheus package is built without Kubernetes service discovery (its scrape
  # configs cannot hold kubernetes_sd_configs), so both come from the module proxy. Prometheus
  # v3.Y.Z is published as module version v0.3YY.Z. The build tags keep Kubernetes discovery
  # only (the other SD plugins pull in every cloud SDK); without `builtinassets` the web UI is
  # not embedded, which the HTTP API does not need.
  local tags=remove_all_sd,enable_kubernetes_sd
  local v="github.com/prometheus/common/version"
  GOBIN="$BIN" nice -n 10 go install -trimpath -tags "$tags" \
    -ldflags "-s -w -X $v.Version=$PROMETHEUS_VERSION -X $v.Branch=module-proxy" \
    "github.com/prometheus/prometheus/cmd/prometheus@$PROMETHEUS_MODULE_VERSION" \
    "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_MODULE_VERSION"
  stamp_set prometheus "$PROMETHEUS_VERSION"
  stamp_set promtool "$PROMETHEUS_VERSION"
}

cmd_install() {
  local t0=$SECONDS
  mkdir -p "$BIN"
  build_kubernetes
  build_etcd
  build_helm
  build_prometheus
  log "ready in $((SECONDS - t0)) s"
  local b
  for b in etcd kube-apiserver kube-controller-manager kubectl helm prometheus promtool; do
    printf '%-24s %s\n' "$b" "$BIN/$b"
  done
}

cmd_env() {
  echo "export DYNAKV_TESTENV_BIN='$BIN'"
  echo "export DYNAKV_K8S_VERSION='$K8S_VERSION'"
  # controller-runtime's envtest looks for etcd, kube-apiserver and kubectl here.
  echo "export KUBEBUILDER_ASSETS='$BIN'"
  echo "export PATH='$BIN':\"\$PATH\""
}

# --- start / stop --------------------------------------------------------------------------------

# N free TCP ports on 127.0.0.1, one per line (all bound at once, so they differ).
free_ports() {
  local n=$1
  if command -v python3 >/dev/null && python3 -c 'pass' 2>/dev/null; then
    python3 - "$n" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
for s in socks:
    print(s.getsockname()[1])
EOF
    return
  fi
  # No python3: random ports nobody answers on.
  local -a got=()
  while ((${#got[@]} < n)); do
    local p=$((20000 + RANDOM % 40000))
    [[ " ${got[*]-} " == *" $p "* ]] && continue
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then got+=("$p"); fi
  done
  printf '%s\n' "${got[@]}"
}

# The processes of a DIR that are still alive (a pid is ours only if its command line names DIR,
# which guards against a reused pid).
live_pids() {
  local dir=$1 name pid
  [[ -f "$dir/pids" ]] || return 0
  while read -r name pid; do
    [[ -n "${pid:-}" && -r "/proc/$pid/cmdline" ]] || continue
    # The watchdog execs `stop` in its own process: never count ourselves.
    [[ $pid != "$$" ]] || continue
    if tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$dir"; then echo "$name $pid"; fi
  done <"$dir/pids"
}

# Whether the process NAME that this shell spawned in DIR is still running. It asks the kernel
# about the recorded pid (a child of this shell, so not reused before this shell reaps it), not
# the command line: while a process execs, /proc/PID/cmdline reads empty for a moment, and a
# freshly spawned server would look dead.
spawned_alive() {
  local dir=$1 want=$2 name pid state
  [[ -f "$dir/pids" ]] || return 1
  while read -r name pid; do
    [[ $name == "$want" ]] || continue
    kill -0 "$pid" 2>/dev/null || return 1
    # `$(<file)` on a file that is gone ends the whole script under `set -e`; `cat` only fails.
    state=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    state=${state##*) }
    state=${state%% *}
    [[ $state != Z && $state != X ]]
    return
  done <"$dir/pids"
  return 1
}

# TERM a process, wait up to 10 s for it to exit, then KILL it.
stop_pid() {
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  log "pid $pid did not stop within 10 s of SIGTERM: SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
}

cmd_stop() {
  local dir
  dir=$(cd "${1:?usage: stop DIR}" 2>/dev/null && pwd) || return 0
  local -a live
  mapfile -t live < <(live_pids "$dir")
  local entry i
  # The watchdog first, so it does not run a second stop; then one by one in reverse order of
  # start (controller manager, apiserver, etcd): an apiserver whose etcd is gone hangs on TERM.
  for entry in "${live[@]}"; do
    if [[ $entry == watchdog* ]]; then stop_pid "${entry#* }"; fi
  done
  for ((i = ${#live[@]} - 1; i >= 0; i--)); do stop_pid "${live[i]#* }"; done
  rm -f "$dir/pids"
  ((${#live[@]} == 0)) || log "stopped ${#live[@]} processes of $dir"
}

# Start a detached process: own session, no terminal, stdio on a log file; record its pid.
spawn() {
  local dir=$1 name=$2
  shift 2
  setsid "$@" </dev/null >>"$dir/logs/$name.log" 2>&1 &
  echo "$name $!" >>"$dir/pids"
}

# Wait until `curl ARGS` succeeds (HTTP < 400: a failing /readyz lists checks that say "ok")
# with output that contains WANT, or NAME's process died.
wait_for() {
  local dir=$1 name=$2 want=$3 what=$4
  shift 4
  local deadline=$((SECONDS + START_TIMEOUT)) out
  while ((SECONDS < deadline)); do
    out=$(curl -sf --max-time 5 "$@" 2>/dev/null || true)
    [[ "$out" == *"$want"* ]] && return 0
    if ! spawned_alive "$dir" "$name"; then
      log "$name exited; last lines of $dir/logs/$name.log:"
      tail -n 30 "$dir/logs/$name.log" >&2 || true
      return 1
    fi
    sleep 0.5
  done
  log "timed out after $START_TIMEOUT s waiting for $what; last lines of $dir/logs/$name.log:"
  tail -n 30 "$dir/logs/$name.log" >&2 || true
  return 1
}

make_pki() {
  local pki=$1
  mkdir -p "$pki"
  (
    cd "$pki"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 -sha256 \
      -subj "/CN=dynakv-testenv-ca" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -sha256 \
      -subj "/CN=kube-apiserver" 2>/dev/null
    cat >apiserver.ext <<'EOF'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
EOF
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -sha256 \
      -extfile apiserver.ext -out apiserver.crt 2>/dev/null
    # Service-account token signing key pair.
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    chmod 600 ./*.key
  )
}

cmd_start() {
  local dir=${1:?usage: start DIR}
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  local b
  for b in etcd kube-apiserver kube-controller-manager; do
    [[ -x "$BIN/$b" ]] || die "$BIN/$b missing: run '$0 install' first"
  done
  command -v openssl >/dev/null || die "openssl not found"
  command -v curl >/dev/null || die "curl not found"
  [[ -z "$(live_pids "$dir")" ]] || die "an environment is already running in $dir: '$0 stop $dir' first"

  # A fresh start: data, keys and logs of an earlier run in DIR are dropped.
  rm -rf "$dir/etcd" "$dir/pki" "$dir/kcm-certs" "$dir/logs" "$dir/pids" "$dir/kubeconfig" "$dir/env"
  mkdir -p "$dir/logs"
  local -a ports
  mapfile -t ports < <(free_ports 4)
  local etcd_port=${ports[0]} etcd_peer_port=${ports[1]} api_port=${ports[2]} kcm_port=${ports[3]}
  make_pki "$dir/pki"
  local token
  token=$(openssl rand -hex 24)
  echo "$token,admin,admin,system:masters" >"$dir/pki/tokens.csv"
  chmod 600 "$dir/pki/tokens.csv"

  local ca_data
  ca_data=$(base64 -w0 <"$dir/pki/ca.crt")
  cat >"$dir/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: dynakv-testenv
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority-data: $ca_data
users:
- name: admin
  user:
    token: $token
contexts:
- name: dynakv-testenv
  context:
    cluster: dynakv-testenv
    user: admin
    namespace: default
current-context: dynakv-testenv
EOF
  chmod 600 "$dir/kubeconfig"
  cat >"$dir/env" <<EOF
KUBECONFIG='$dir/kubeconfig'
DYNAKV_TESTENV_APISERVER='https://127.0.0.1:$api_port'
DYNAKV_TESTENV_ETCD='http://127.0.0.1:$etcd_port'
DYNAKV_TESTENV_KCM='https://127.0.0.1:$kcm_port'
DYNAKV_TESTENV_BIN='$BIN'
EOF

  # Anything that fails from here on stops what was started.
  trap 'cmd_stop "$dir"' ERR

  spawn "$dir" etcd "$BIN/etcd" --name testenv --data-dir "$dir/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-cluster "testenv=http://127.0.0.1:$etcd_peer_port" \
    --unsafe-no-fsync --log-level warn
  wait_for "$dir" etcd '"health":"true"' "etcd /health" "http://127.0.0.1:$etcd_port/health"

  spawn "$dir" kube-apiserver "$BIN/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
    --endpoint-reconciler-type none \
    --cert-dir "$dir/pki" \
    --tls-cert-file "$dir/pki/apiserver.crt" --tls-private-key-file "$dir/pki/apiserver.key" \
    --client-ca-file "$dir/pki/ca.crt" \
    --token-auth-file "$dir/pki/tokens.csv" \
    --authorization-mode RBAC \
    --service-cluster-ip-range 10.0.0.0/24 \
    --allow-privileged=true \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$dir/pki/sa.pub" \
    --service-account-signing-key-file "$dir/pki/sa.key"
  wait_for "$dir" kube-apiserver ok "kube-apiserver /readyz" \
    --cacert "$dir/pki/ca.crt" -H "Authorization: Bearer $token" "https://127.0.0.1:$api_port/readyz"

  spawn "$dir" kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig "$dir/kubeconfig" \
    --authentication-kubeconfig "$dir/kubeconfig" --authorization-kubeconfig "$dir/kubeconfig" \
    --authentication-skip-lookup \
    --bind-address 127.0.0.1 --secure-port "$kcm_port" --cert-dir "$dir/kcm-certs" \
    --leader-elect=false \
    --controllers "$CONTROLLERS" \
    --service-account-private-key-file "$dir/pki/sa.key" \
    --root-ca-file "$dir/pki/ca.crt"
  wait_for "$dir" kube-controller-manager ok "kube-controller-manager /healthz" \
    -k "https://127.0.0.1:$kcm_port/healthz"
  # The service-account controller at work: pods cannot be created before this account exists.
  wait_for "$dir" kube-controller-manager '"name": "default"' "the default service account" \
    --cacert "$dir/pki/ca.crt" -H "Authorization: Bearer $token" \
    "https://127.0.0.1:$api_port/api/v1/namespaces/default/serviceaccounts/default"
  trap - ERR

  if [[ -n "${DYNAKV_TESTENV_OWNER_PID:-}" ]]; then
    local owner=$DYNAKV_TESTENV_OWNER_PID
    # The script path and DIR are in the watchdog's command line, so `stop` recognises it.
    # shellcheck disable=SC2016 # $1..$3 are the watchdog's own arguments
    spawn "$dir" watchdog bash -c 'while kill -0 "$1" 2>/dev/null; do sleep 1; done; exec "$2" stop "$3"' \
      watchdog "$owner" "$(cd "$(dirname "$0")" && pwd)/$(basename "$0")" "$dir"
  fi
  log "control plane up: apiserver https://127.0.0.1:$api_port, etcd http://127.0.0.1:$etcd_port"
  echo "$dir/kubeconfig"
}

case "${1:-}" in
install) cmd_install ;;
start) cmd_start "${2:?usage: $0 start DIR}" ;;
stop) cmd_stop "${2:?usage: $0 stop DIR}" ;;
env) cmd_env ;;
*) usage ;;
esac
