#!/usr/bin/env bash
# Build Horovod 0.28.1 from its PyPI sdist against the venv's torch, with Gloo and MPI controllers,
# and cache the wheel outside the repository keyed by the torch version, so a second run is instant.
#
# Horovod 0.28.1 asks CMake for C++14, which current torch headers reject: torch 2.15 needs C++20
# (std::bit_width, std::strong_ordering), torch 2.13 needs C++17. We patch the standard and build with
# --no-build-isolation so the build sees the venv's torch.
set -euo pipefail

VENV=${VENV:-.venv}
PY="$VENV/bin/python"
HOROVOD_VERSION=${HOROVOD_VERSION:-0.28.1}
CACHE=${FIELDKUBE_CACHE:-$HOME/.cache/fieldkube}

log() { printf '\033[1m[horovod]\033[0m %s\n' "$*"; }
die() { printf '\033[31m[horovod] error:\033[0m %s\n' "$*" >&2; exit 1; }

[ -x "$PY" ] || die "no virtual environment at $VENV (run make dev)"
TORCH_VERSION=$("$PY" -c 'import importlib.metadata as m; print(m.version("torch").split("+")[0])') \
  || die "torch is not installed in $VENV"
HAVE_NVCC=$(command -v nvcc >/dev/null 2>&1 && echo nvcc || echo nonvcc)
KEY="horovod-$HOROVOD_VERSION-torch$TORCH_VERSION-$HAVE_NVCC"
WHEELDIR="$CACHE/wheels/$KEY"

installed=$("$PY" -c 'import importlib.metadata as m; print(m.version("horovod"))' 2>/dev/null || true)
if [ "$installed" = "$HOROVOD_VERSION" ] \
   && [ -f "$WHEELDIR/.installed-into" ] && [ "$(cat "$WHEELDIR/.installed-into")" = "$(cd "$VENV" && pwd)" ]; then
  log "horovod $HOROVOD_VERSION already installed for torch $TORCH_VERSION"
  exit 0
fi

case "$TORCH_VERSION" in
  2.1[5-9]*|2.[2-9]*|[3-9]*) CXXSTD=20 ;;
  *) CXXSTD=17 ;;
esac

if ! ls "$WHEELDIR"/horovod-*.whl >/dev/null 2>&1; then
  for tool in cmake g++ mpicc; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found: install Debian packages cmake g++ libopenmpi-dev (make dev does)"
  done
  log "building horovod $HOROVOD_VERSION for torch $TORCH_VERSION with C++$CXXSTD; this takes ~10 minutes once"
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
  "$PY" -m pip download --no-deps --no-binary :all: -d "$WORK" "horovod==$HOROVOD_VERSION" -q
  tar -xzf "$WORK"/horovod-"$HOROVOD_VERSION".tar.gz -C "$WORK"
  SRC="$WORK/horovod-$HOROVOD_VERSION"
  sed -i "s/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD $CXXSTD)/" \
    "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"
  grep -q "CMAKE_CXX_STANDARD $CXXSTD" "$SRC/horovod/torch/CMakeLists.txt" \
    || die "could not patch the C++ standard in horovod/torch/CMakeLists.txt"
  "$PY" -m pip install -q -c constraints.txt "setuptools<81" wheel cloudpickle psutil pyyaml packaging
  export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1
  export HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
  export CMAKE_POLICY_VERSION_MINIMUM=3.5
  export MAKEFLAGS="-j$(nproc)"
  if [ "$HAVE_NVCC" = nvcc ]; then
    CUDA_ROOT=$(dirname "$(dirname "$(command -v nvcc)")")
    export CUDA_HOME=${CUDA_HOME:-$CUDA_ROOT} HOROVOD_CUDA_HOME=${HOROVOD_CUDA_HOME:-$CUDA_ROOT}
  fi
  mkdir -p "$WHEELDIR.tmp"
  start=$(date +%s)
  "$PY" -m pip wheel --no-build-isolation --no-deps -w "$WHEELDIR.tmp" "$SRC" > "$WORK/build.log" 2>&1 \
    || { tail -40 "$WORK/build.log" >&2; die "horovod build failed (full log above)"; }
  rm -rf "$WHEELDIR" && mv "$WHEELDIR.tmp" "$WHEELDIR"
  log "built $(ls "$WHEELDIR") in $(( $(date +%s) - start ))s"
fi

"$PY" -m pip install -q --force-reinstall --no-deps "$WHEELDIR"/horovod-*.whl
"$PY" -m pip install -q -c constraints.txt cloudpickle psutil pyyaml packaging
"$PY" -c "import horovod.torch as hvd; assert hvd.gloo_built() and hvd.mpi_built(), 'horovod lacks gloo or mpi'" \
  || die "installed horovod lacks Gloo or MPI support"
(cd "$VENV" && pwd) > "$WHEELDIR/.installed-into"
log "horovod $HOROVOD_VERSION installed (gloo + mpi) for torch $TORCH_VERSION"
