#!/usr/bin/env bash
# Builds the local control plane's binaries from Go modules and caches them outside the repository,
# one directory per component and version:
#   ${FIELDKUBE_CACHE:-~/.cache/fieldkube}/bin/<component>-<version>/<component>
# Components: kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, and the real node's
# kubelet and kube-proxy (wrapper module hack/cluster/kube), etcd (hack/cluster/etcd), CoreDNS
# (hack/cluster/coredns), kwok (sigs.k8s.io/kwok), mpi-operator (hack/cluster/mpi-operator) plus
# its CRD and ClusterRole copied from its module, and helm (hack/cluster/helm). The prometheus-operator
# CRDs the chart's tests install are copied from that release's Go module into
#   ${FIELDKUBE_CACHE:-~/.cache/fieldkube}/crds/prometheus-operator-<version>/
# A component is rebuilt only when missing or when its wrapper's sources changed, so a second run is
# instant. The Go module and build caches are Go's own (GOMODCACHE, GOCACHE), never the repository.
#
# Why it is shaped this way (a cold build on 2 cores is dominated by compiling k8s.io/kubernetes):
# - the modules of every component are downloaded first, all at once: downloads are network-bound;
# - the four Kubernetes binaries come from one `go build` so their shared packages compile once and
#   one binary links while the next one's packages compile;
# - etcd, CoreDNS, mpi-operator and kwok build one after another *beside* the Kubernetes build, filling the
#   cores during its serial stretches (large single packages, linking).
# Set FIELDKUBE_BUILD_SERIAL=1 to build one component at a time (for comparing timings).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

CACHE=${FIELDKUBE_CACHE:-$HOME/.cache/fieldkube}
BIN=$CACHE/bin
# shellcheck source=cluster/versions.env
source hack/cluster/versions.env

START=$(date +%s)
log() { printf '\033[1;34m[build-cluster-bins %4ss]\033[0m %s\n' "$(( $(date +%s) - START ))" "$*"; }
die() { printf '\033[31mbuild-cluster-bins: error:\033[0m %s\n' "$*" >&2; exit 1; }

command -v go >/dev/null 2>&1 || die "go is not on PATH (Go >= 1.26 is needed; newer toolchains are fetched through the module proxy)"
export GOTOOLCHAIN=${GOTOOLCHAIN:-auto}
export GOFLAGS="-buildvcs=false -mod=readonly"
export CGO_ENABLED=0

# The wrapper modules must pin the same versions as versions.env.
check_pin() {  # <go.mod> <module path> <version>
  grep -Eq "^[[:space:]]*(require[[:space:]]+)?$2 $3\b" "$1" \
    || die "$1 does not require $2 $3 (versions.env and the wrapper module disagree: update both)"
}
check_pin hack/cluster/kube/go.mod k8s.io/kubernetes "$KUBERNETES_VERSION"
check_pin hack/cluster/etcd/go.mod go.etcd.io/etcd/server/v3 "$ETCD_VERSION"
check_pin hack/cluster/mpi-operator/go.mod github.com/kubeflow/mpi-operator "$MPI_OPERATOR_VERSION"
check_pin hack/cluster/coredns/go.mod github.com/coredns/coredns "$COREDNS_VERSION"
check_pin hack/cluster/helm/go.mod helm.sh/helm/v3 "$HELM_VERSION"

mkdir -p "$BIN"
exec 9>"$BIN/.build.lock"
flock 9 || die "could not lock $BIN/.build.lock"
LOGS=$(mktemp -d "$BIN/.logs.XXXXXX")
trap 'rm -rf "$LOGS"' EXIT

# Hash of the files a component is built from, stored next to the binary.
source_hash() { (cd "$1" && find . -type f \( -name '*.go' -o -name go.mod -o -name go.sum \) -print0 \
  | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16); }

KUBE_MINOR=${KUBERNETES_VERSION#v1.}; KUBE_MINOR=${KUBE_MINOR%%.*}
KUBE_LDFLAGS="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  KUBE_LDFLAGS+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$KUBE_MINOR"
  KUBE_LDFLAGS+=" -X $pkg.gitTreeState=clean"
done
KUBE_COMPONENTS=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy)
KUBE_HASH=$(source_hash hack/cluster/kube)
ETCD_HASH=$(source_hash hack/cluster/etcd)
MPI_HASH=$(source_hash hack/cluster/mpi-operator)
COREDNS_HASH=$(source_hash hack/cluster/coredns)
HELM_HASH=$(source_hash hack/cluster/helm)
# helm reports its release, and `helm template`/`helm lint` assume the control plane's Kubernetes minor.
HELM_LDFLAGS="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
HELM_LDFLAGS+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
  HELM_LDFLAGS+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$KUBE_MINOR"
done

cached() {  # <name> <version> <hash>: is the cached binary current?
  local dest=$BIN/$1-$2
  [ -x "$dest/$1" ] && [ "$(cat "$dest/.source-hash" 2>/dev/null)" = "$3" ]
}

# build <label> <version> <hash> <names> <command...>: the command writes binary <name> (and any
# files that go with it) into $OUT/<name>/ for each of the space-separated <names>; each one is then
# moved into place as a whole, so an interrupted build never leaves a half-written cache entry.
build() {
  local label=$1 version=$2 hash=$3 names=$4; shift 4
  local name todo=0
  for name in $names; do cached "$name" "$version" "$hash" || todo=1; done
  if [ $todo = 0 ]; then
    log "$label $version: cached ($BIN/{${names// /,}}-$version)"
    return
  fi
  log "$label $version: building"
  local t0; t0=$(date +%s)
  OUT=$(mktemp -d "$BIN/.$label-$version.XXXXXX")
  for name in $names; do mkdir -p "$OUT/$name"; done
  if ! "$@" > "$LOGS/$label.log" 2>&1; then
    cat "$LOGS/$label.log" >&2
    rm -rf "$OUT"
    die "building $label $version failed (command: $*)"
  fi
  for name in $names; do
    [ -x "$OUT/$name/$name" ] || { rm -rf "$OUT"; die "building $label $version produced no $name"; }
    echo "$hash" > "$OUT/$name/.source-hash"
    rm -rf "$BIN/$name-$version"
    mv "$OUT/$name" "$BIN/$name-$version"
  done
  rm -rf "$OUT"
  log "$label $version: built in $(( $(date +%s) - t0 ))s ($(cd "$BIN" && du -shc $(printf "%s-$version " $names) | tail -1 | cut -f1))"
}

go_build() {  # <module dir> <ldflags> <name>...: builds ./cmd/<name> (or . for a single name) of the module
  local dir=$1 ldflags=$2; shift 2
  if [ $# = 1 ] && [ ! -d "$ROOT/$dir/cmd/$1" ]; then
    (cd "$ROOT/$dir" && go build -trimpath -ldflags "$ldflags" -o "$OUT/$1/$1" .) || return 1
    return 0
  fi
  local pkgs=() name
  for name in "$@"; do pkgs+=("./cmd/$name"); done
  # `go build -o DIR` with several main packages writes DIR/<name> for each.
  (cd "$ROOT/$dir" && go build -trimpath -ldflags "$ldflags" -o "$OUT/.bin/" "${pkgs[@]}") || return 1
  for name in "$@"; do mv "$OUT/.bin/$name" "$OUT/$name/$name" || return 1; done
}

build_kube() { go_build hack/cluster/kube "$KUBE_LDFLAGS" "${KUBE_COMPONENTS[@]}"; }
build_etcd() { go_build hack/cluster/etcd "-s -w" etcd; }
build_coredns() { go_build hack/cluster/coredns "-s -w" coredns; }
# The helm wrapper module declares helm's main package as a tool; build it from there.
build_helm() {
  (cd "$ROOT/hack/cluster/helm" && go build -trimpath -ldflags "$HELM_LDFLAGS" -o "$OUT/helm/helm" \
    helm.sh/helm/v3/cmd/helm)
}
build_kwok() { GOBIN=$OUT/kwok go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"; }
build_mpi_operator() {
  go_build hack/cluster/mpi-operator "-s -w" mpi-operator || return 1
  local dir f
  dir=$(cd "$ROOT/hack/cluster/mpi-operator" && go list -m -f '{{.Dir}}' github.com/kubeflow/mpi-operator) || return 1
  for f in kubeflow.org_mpijobs.yaml cluster-role.yaml; do
    [ -f "$dir/manifests/base/$f" ] || { echo "$dir/manifests/base/$f is missing from the module"; return 1; }
    install -m 0644 "$dir/manifests/base/$f" "$OUT/mpi-operator/$f" || return 1
  done
}

kube_job() { build kubernetes "$KUBERNETES_VERSION" "$KUBE_HASH" "${KUBE_COMPONENTS[*]}" build_kube; }
others_job() {
  build etcd "$ETCD_VERSION" "$ETCD_HASH" etcd build_etcd
  build coredns "$COREDNS_VERSION" "$COREDNS_HASH" coredns build_coredns
  build mpi-operator "$MPI_OPERATOR_VERSION" "$MPI_HASH" mpi-operator build_mpi_operator
  build helm "$HELM_VERSION" "$HELM_HASH" helm build_helm
  build kwok "$KWOK_VERSION" "$KWOK_VERSION" kwok build_kwok
}

# The prometheus-operator CRDs (ServiceMonitor, PodMonitor, PrometheusRule, ...) from the pinned release's
# Go module, checksummed by the Go module machinery like every other module; no binary is built.
PROM_CRDS=$CACHE/crds/prometheus-operator-$PROMETHEUS_OPERATOR_VERSION
fetch_prometheus_operator_crds() {
  if [ -f "$PROM_CRDS/.complete" ]; then
    log "prometheus-operator CRDs $PROMETHEUS_OPERATOR_VERSION: cached ($PROM_CRDS)"
    return
  fi
  local dir tmp
  dir=$(cd "$LOGS" && GOFLAGS=-mod=mod go mod download -json \
    "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p') \
    || die "downloading the prometheus-operator module $PROMETHEUS_OPERATOR_VERSION failed"
  [ -d "$dir/example/prometheus-operator-crd" ] \
    || die "$dir/example/prometheus-operator-crd is missing from the prometheus-operator module"
  mkdir -p "$CACHE/crds"
  tmp=$(mktemp -d "$CACHE/crds/.prometheus-operator.XXXXXX")
  install -m 0644 "$dir"/example/prometheus-operator-crd/*.yaml "$tmp/"
  touch "$tmp/.complete"
  rm -rf "$PROM_CRDS"
  mv "$tmp" "$PROM_CRDS"
  log "prometheus-operator CRDs $PROMETHEUS_OPERATOR_VERSION: copied to $PROM_CRDS"
}

# Download the modules of everything that needs building, concurrently (kwok's through a dry run).
download() {  # <component>
  if [ "$1" = kwok ]; then
    GOBIN=$LOGS go install -n "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" >/dev/null
  else
    (cd "hack/cluster/$1" && go mod download)
  fi
}
prefetch=()
for c in "${KUBE_COMPONENTS[@]}"; do cached "$c" "$KUBERNETES_VERSION" "$KUBE_HASH" || { prefetch+=(kube); break; }; done
cached etcd "$ETCD_VERSION" "$ETCD_HASH" || prefetch+=(etcd)
cached coredns "$COREDNS_VERSION" "$COREDNS_HASH" || prefetch+=(coredns)
cached mpi-operator "$MPI_OPERATOR_VERSION" "$MPI_HASH" || prefetch+=(mpi-operator)
cached helm "$HELM_VERSION" "$HELM_HASH" || prefetch+=(helm)
cached kwok "$KWOK_VERSION" "$KWOK_VERSION" || prefetch+=(kwok)
if [ ${#prefetch[@]} -gt 0 ]; then
  log "downloading the modules of ${prefetch[*]}"
  pids=()
  for m in "${prefetch[@]}"; do
    download "$m" > "$LOGS/download-$m.log" 2>&1 & pids+=($!)
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || { cat "$LOGS/download-${prefetch[$i]}.log" >&2; die "downloading the modules of ${prefetch[$i]} failed"; }
  done
  log "modules downloaded"
fi

fetch_prometheus_operator_crds

if [ "${FIELDKUBE_BUILD_SERIAL:-0}" = 1 ]; then
  kube_job
  others_job
else
  # Both run in the background so that `set -e` holds inside them and a failure of one lets the
  # other finish (its result is cached) before this script fails.
  kube_job & kube=$!
  others_job & others=$!
  status=0
  wait $kube || status=1
  wait $others || status=1
  [ $status = 0 ] || die "some components failed to build (see above)"
fi

log "done in $(( $(date +%s) - START ))s, binaries in $BIN ($(du -sh "$BIN" | cut -f1))"
