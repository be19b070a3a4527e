#!/usr/bin/env bash
# Wheels a torch-only GPU host lacks to run fieldkube-prepare and fieldkube-train from src/ (pydantic and
# its dependencies, at the versions constraints.txt pins), for that host's Python (default 3.12), into
# build/gpu-wheels/ (ignored by git; small enough to carry to the host). Cached: a second run downloads
# nothing. Usage: hack/gpu-wheels.sh [python version, e.g. 3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-3.12}"
out="build/gpu-wheels"
pins=()
for name in pydantic pydantic_core annotated-types typing-inspection typing_extensions; do
  pin="$(grep -i "^${name}==" constraints.txt)" || { echo "gpu-wheels: ${name} is not pinned in constraints.txt" >&2; exit 1; }
  pins+=("$pin")
done
mkdir -p "$out"
.venv/bin/python -m pip download --quiet --dest "$out" --only-binary=:all: --no-deps \
  --python-version "$version" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 "${pins[@]}"
echo "gpu-wheels: $(ls "$out" | wc -l) wheels for Python $version in $out ($(du -sh "$out" | cut -f1))"
