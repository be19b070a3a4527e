"""Benchmarks of the local control plane (`make bench-cluster`).

- start: how long `LocalCluster.start()` takes until every step is ready (etcd, API server,
  controllers, N Ready fake GPU nodes, mpi-operator, project manifests), for several node counts,
  and how long `stop()` takes.
- cold build (``--cold-build``, ~25 min on 2 cores): hack/build-cluster-bins.sh from empty Go build
  and binary caches, once one component at a time (FIELDKUBE_BUILD_SERIAL=1) and once with the
  small components built beside the Kubernetes ones (the default), back to back in one run. The Go
  module cache is shared (downloads are not what is compared).

Results are merged into ``--out`` (a JSON object with "start" and "cold_build" keys), so a run
without ``--cold-build`` keeps the last cold-build figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fieldkube.localcluster import harness

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]

# The build script's log lines: "[build-cluster-bins  12s]<colour reset> etcd v3.6.16: built in 158s (26M)".
BUILT = re.compile(r"\](?:\x1b\[0m)? (\S+) (v\S+): built in (\d+)s")


def machine() -> dict[str, Any]:
    """What the figures were taken on: the machine is shared, so its load is part of the record."""
    return {
        "cpus": os.cpu_count(),
        "load_average_1m_at_start": os.getloadavg()[0],
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def bench_start(node_counts: list[int], repeats: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for nodes in node_counts:
        runs: list[dict[str, float]] = []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory(prefix="fieldkube-bench-cluster-") as tmp:
                cluster = harness.LocalCluster(Path(tmp) / "state", nodes=nodes, die_with_parent=True)
                cluster.start()
                t0 = time.monotonic()
                cluster.stop()
                runs.append({**cluster.start_timings, "stop": round(time.monotonic() - t0, 2)})
        results[f"nodes={nodes}"] = {
            "runs": runs,
            "median_ready_s": statistics.median(r["ready"] for r in runs),
            "median_stop_s": statistics.median(r["stop"] for r in runs),
        }
        print(f"start, {nodes} nodes: {results[f'nodes={nodes}']}", flush=True)
    return results


def cold_build(mode: str, serial: bool, log_dir: Path) -> dict[str, Any]:
    """One build of every component into fresh caches; returns per-component and total seconds.

    The build's own output is kept in ``log_dir/cluster-build-<mode>.log``.
    """
    with tempfile.TemporaryDirectory(prefix=f"fieldkube-bench-build-{mode}-") as tmp:
        env = {
            **os.environ,
            "FIELDKUBE_CACHE": str(Path(tmp) / "cache"),
            "GOCACHE": str(Path(tmp) / "go-build"),
            "FIELDKUBE_BUILD_SERIAL": "1" if serial else "0",
        }
        t0 = time.monotonic()
        result = subprocess.run(
            [str(REPO_ROOT / "hack" / "build-cluster-bins.sh")],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        wall = time.monotonic() - t0
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / f"cluster-build-{mode}.log").write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            raise harness.ClusterError(f"the {mode} cold build failed:\n{result.stdout}\n{result.stderr}")
        components = {name: int(seconds) for name, _, seconds in BUILT.findall(result.stdout)}
        shutil.rmtree(tmp, ignore_errors=True)
    figures = {"components_s": components, "total_s": round(wall, 1)}
    print(f"cold build, {mode}: {figures}", flush=True)
    return figures


def bench_cold_build(log_dir: Path) -> dict[str, Any]:
    serial = cold_build("serial", serial=True, log_dir=log_dir)
    overlapped = cold_build("overlapped", serial=False, log_dir=log_dir)
    return {
        "serial": serial,
        "overlapped": overlapped,
        "serial_over_overlapped": round(serial["total_s"] / overlapped["total_s"], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--nodes", type=int, nargs="+", default=[4, 32], help="node counts to start")
    parser.add_argument("--starts", type=int, default=3, help="starts per node count")
    parser.add_argument("--cold-build", action="store_true", help="also compare cold builds (~25 min)")
    parser.add_argument("--skip-start", action="store_true", help="keep the last start figures")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "cluster.json")
    args = parser.parse_args(argv)
    if args.starts < 1 or any(n < 1 for n in args.nodes):
        parser.error("--starts and every --nodes value must be at least 1")

    results: dict[str, Any] = {}
    if args.out.exists():
        try:
            results = json.loads(args.out.read_text())
        except json.JSONDecodeError:
            print(f"{args.out} is not JSON; it will be replaced", file=sys.stderr)
    try:
        if not args.skip_start:
            results["start"] = {"machine": machine(), **bench_start(args.nodes, args.starts)}
        if args.cold_build:
            results["cold_build"] = {"machine": machine(), **bench_cold_build(args.out.parent)}
    except harness.ClusterError as exc:
        print(f"bench-cluster: error: {exc}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
