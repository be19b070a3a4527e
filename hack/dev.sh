#!/usr/bin/env bash
# One idempotent set-up for a fresh machine: Debian packages, the .venv with the four fieldkube
# distributions (editable) and the test/lint tools, Horovod built against the pinned torch, and the
# local control plane's binaries. Everything heavy is cached outside the repository (~/.cache), so a
# second run only checks and returns.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
CACHE=${FIELDKUBE_CACHE:-$HOME/.cache/fieldkube}
export FIELDKUBE_CACHE=$CACHE
START=$(date +%s)

step() { printf '\n\033[1;34m==> [%3ss] %s\033[0m\n' "$(( $(date +%s) - START ))" "$*"; }
die() { printf '\033[31mmake dev: error:\033[0m %s\n' "$*" >&2; exit 1; }

# --- 1. Debian packages -------------------------------------------------------------------------
APT_PACKAGES=(openmpi-bin libopenmpi-dev cmake g++ prometheus chromium chromium-driver sqlite3 psmisc
  containerd runc containernetworking-plugins iptables conntrack mmdebstrap buildah jq)
step "Debian packages: ${APT_PACKAGES[*]}"
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing: ${missing[*]}"
  $SUDO apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
else
  echo "all present"
fi

# --- 2. Local Kubernetes control plane binaries, in the background ---------------------------------
# The Go builds need only the Go toolchain, so they overlap with pip (mostly downloads) and Horovod;
# their output is shown in step 5. A build that is cached returns at once.
CLUSTER_PID=""
if [ -x hack/build-cluster-bins.sh ]; then
  mkdir -p "$CACHE"
  CLUSTER_LOG="$CACHE/build-cluster-bins.log"
  hack/build-cluster-bins.sh >"$CLUSTER_LOG" 2>&1 &
  CLUSTER_PID=$!
  trap '[ -n "$CLUSTER_PID" ] && kill "$CLUSTER_PID" 2>/dev/null || true' EXIT
fi

# --- 3. Python environment ----------------------------------------------------------------------
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
  || die "Python >= 3.11 is required ($PYTHON is $("$PYTHON" --version 2>&1))"
step "Python environment in $VENV (pinned by constraints.txt)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
STAMP="$VENV/.fieldkube-deps"
WANT=$(cat constraints.txt requirements-dev.txt */pyproject.toml hack/localcluster/pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade "pip==25.3"
  "$VENV/bin/python" -m pip install --progress-bar off -c constraints.txt \
    -e contract -e vision -e trainer -e serving -e operator -e hack/localcluster -r requirements-dev.txt \
    | { grep -vE "^(Requirement already satisfied|  Using cached|Collecting|Using cached|  Downloading|Downloading)" || true; }
  [ "${PIPESTATUS[0]}" -eq 0 ] || die "pip install failed (see the messages above)"
  "$VENV/bin/python" -m pip check >/dev/null || { "$VENV/bin/python" -m pip check; die "pip check failed"; }
  echo "$WANT" > "$STAMP"
else
  echo "up to date"
fi

# --- 4. Horovod ---------------------------------------------------------------------------------
step "Horovod (built from sdist, cached in $CACHE/wheels)"
VENV=$VENV hack/build-horovod.sh

# --- 5. Container images for the local node's real pods (hack/build-images.sh, cached) ------------
# After step 4: the trainer image reuses the Horovod wheel cached there. Before waiting for the Go
# builds of step 2: a cold image build is mostly downloads and tar (I/O), the Go builds are CPU, so they
# overlap. Unchanged images: ~2 s.
step "Container images: Debian base, pause, operator, serving, trainer (buildah, saved in $CACHE/images)"
if [ "$(id -u)" -eq 0 ]; then
  hack/build-images.sh build || die "building the container images failed (see above)"
else
  echo "skipped: buildah and mmdebstrap run as root here; run 'sudo make images' for the local node's images"
fi

# --- 6. Local Kubernetes control plane binaries (started in step 2) --------------------------------
if [ -n "$CLUSTER_PID" ]; then
  step "Kubernetes control plane, kwok and mpi-operator binaries (built from Go modules, cached in $CACHE/bin)"
  status=0
  wait "$CLUSTER_PID" || status=$?
  CLUSTER_PID=""
  cat "$CLUSTER_LOG"
  [ "$status" -eq 0 ] || die "building the control plane binaries failed (exit $status; log above, also in $CLUSTER_LOG)"
fi

step "done in $(( $(date +%s) - START ))s: activate with 'source $VENV/bin/activate'"
