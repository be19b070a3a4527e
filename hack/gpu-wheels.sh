#!/usr/bin/env bash
# Wheels a torch-only GPU host lacks to run fieldkube-prepare, fieldkube-train and fieldkube-serve from src/
# and the GPU benchmarks (pydantic, FastAPI, uvicorn with httptools and uvloop, the benchmark's HTTP client
# and their dependencies, at the versions constraints.txt pins), for that host's Python (default 3.12), into
# build/gpu-wheels/ (ignored by git; small enough to carry to the host). Install there with
# `pip install --no-index --no-deps --target DIR build/gpu-wheels/*.whl`: the list is the whole closure
# above what the host has (torch, numpy, Pillow, PyYAML, httpx...). Cached: a second run downloads nothing.
# Usage: hack/gpu-wheels.sh [python version, e.g. 3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-3.12}"
out="build/gpu-wheels"
pins=()
names=(
  pydantic pydantic_core annotated-types typing-inspection typing_extensions       # the settings models
  fastapi starlette anyio idna uvicorn click h11 python-multipart annotated-doc    # the service
  httptools uvloop                                                                 # uvicorn's C parser and event loop
  opentelemetry-api importlib_metadata zipp affine attrs
  psutil requests urllib3 certifi charset-normalizer                               # bench/serve_bench.py
  imagecodecs                                                                      # PNG decoding, compressed TIFF (fieldkube.vision)
)
for name in "${names[@]}"; do
  pattern="^$(sed 's/[-_.]/[-_.]/g' <<<"$name")=="  # pip's name normalisation: - _ . are one
  pin="$(grep -i -E "$pattern" constraints.txt)" || { echo "gpu-wheels: ${name} is not pinned in constraints.txt" >&2; exit 1; }
  pins+=("$pin")
done
mkdir -p "$out"
.venv/bin/python -m pip download --quiet --dest "$out" --only-binary=:all: --no-deps \
  --python-version "$version" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 "${pins[@]}"
echo "gpu-wheels: $(ls "$out" | wc -l) wheels for Python $version in $out ($(du -sh "$out" | cut -f1))"
