#!/usr/bin/env bash
# Builds the local control plane's binaries from Go modules and caches them outside the repository,
# one directory per component and version:
#   ${FIELDKUBE_CACHE:-~/.cache/fieldkube}/bin/<component>-<version>/<component>
# Components: kube-apiserver, kube-controller-manager, kube-scheduler and kubectl (wrapper module
# hack/cluster/kube), etcd (hack/cluster/etcd), kwok (sigs.k8s.io/kwok) and mpi-operator
# (hack/cluster/mpi-operator) plus its CRD and ClusterRole copied from its module.
# A component is rebuilt only when missing or when its wrapper's sources changed, so a second run is
# instant. The Go module and build caches are Go's own (GOMODCACHE, GOCACHE), never the repository.
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

command -v go >/dev/null 2>&1 || die "go is not on PATH (Go >= 1.25 is needed; newer toolchains are fetched through the module proxy)"
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

mkdir -p "$BIN"
exec 9>"$BIN/.build.lock"
flock 9 || die "could not lock $BIN/.build.lock"

# Hash of the files a component is built from, stored next to the binary.
source_hash() { (cd "$1" && find . -type f \( -name '*.go' -o -name go.mod -o -name go.sum \) -print0 \
  | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16); }

KUBE_MINOR=${KUBERNETES_VERSION#v1.}; KUBE_MINOR=${KUBE_MINOR%%.*}
KUBE_LDFLAGS="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  KUBE_LDFLAGS+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$KUBE_MINOR"
  KUBE_LDFLAGS+=" -X $pkg.gitTreeState=clean"
done

# build <component> <version> <hash> <command...>: the command writes the binary into $OUT.
BUILT=0
build() {
  local name=$1 version=$2 hash=$3; shift 3
  local dest=$BIN/$name-$version
  if [ -x "$dest/$name" ] && [ "$(cat "$dest/.source-hash" 2>/dev/null)" = "$hash" ]; then
    log "$name $version: cached ($dest)"
    return
  fi
  log "$name $version: building (the first build of the Kubernetes components takes many minutes on 2 cores)"
  local t0; t0=$(date +%s)
  OUT=$(mktemp -d "$BIN/.$name-$version.XXXXXX")
  if ! "$@"; then
    rm -rf "$OUT"
    die "building $name $version failed (command: $*)"
  fi
  [ -x "$OUT/$name" ] || { rm -rf "$OUT"; die "building $name $version produced no $OUT/$name"; }
  echo "$hash" > "$OUT/.source-hash"
  rm -rf "$dest"
  mv "$OUT" "$dest"
  BUILT=$((BUILT + 1))
  log "$name $version: built in $(( $(date +%s) - t0 ))s ($(du -sh "$dest" | cut -f1))"
}

go_build() {  # <module dir> <package> <binary name> <ldflags>
  (cd "$ROOT/$1" && go build -trimpath -ldflags "$4" -o "$OUT/$3" "$2")
}
go_install() {  # <package@version> <ldflags>
  GOBIN=$OUT go install -trimpath -ldflags "$2" "$1"
}

KUBE_HASH=$(source_hash hack/cluster/kube)
for c in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  build "$c" "$KUBERNETES_VERSION" "$KUBE_HASH" go_build hack/cluster/kube "./cmd/$c" "$c" "$KUBE_LDFLAGS"
done
build etcd "$ETCD_VERSION" "$(source_hash hack/cluster/etcd)" go_build hack/cluster/etcd . etcd "-s -w"
build kwok "$KWOK_VERSION" "$KWOK_VERSION" go_install "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" "-s -w"

copy_mpi_operator_manifests() {
  local dir
  dir=$(cd "$ROOT/hack/cluster/mpi-operator" && go list -m -f '{{.Dir}}' github.com/kubeflow/mpi-operator) \
    || die "could not locate the github.com/kubeflow/mpi-operator module"
  for f in kubeflow.org_mpijobs.yaml cluster-role.yaml; do
    [ -f "$dir/manifests/base/$f" ] || die "$dir/manifests/base/$f is missing from the module"
    install -m 0644 "$dir/manifests/base/$f" "$OUT/$f"
  done
}
build_mpi_operator() {
  go_build hack/cluster/mpi-operator . mpi-operator "-s -w" && copy_mpi_operator_manifests
}
build mpi-operator "$MPI_OPERATOR_VERSION" "$(source_hash hack/cluster/mpi-operator)" build_mpi_operator

log "done: $BUILT built, binaries in $BIN ($(du -sh "$BIN" | cut -f1))"
