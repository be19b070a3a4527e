"""`make demo-cluster`: the example TrainingJobs go to Succeeded on the local cluster.

The API server, scheduler, controller manager, mpi-operator, fieldkube-operator, MLflow and the CPU
example's pods (containerd + kubelet on the real node) are real; the GPU examples' pods are simulated by
kwok (no GPU here), which the demo itself says in its output.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

pytestmark = [pytest.mark.cluster, pytest.mark.real_node]


def run(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "hack" / "demo_cluster.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_examples_succeed_the_cpu_job_in_real_pods_and_down_leaves_nothing(tmp_path: Path) -> None:
    state = tmp_path / "cluster"
    try:
        up = run("up", "--detach", "--state", str(state), "--timeout", "900", timeout=1500)
        assert up.returncode == 0, up.stdout[-4000:] + up.stderr[-4000:]
        assert "flower-counter-cpu trains for real" in up.stdout
        assert "pods are simulated by kwok" in up.stdout
        # The final `kubectl get tj,mpijobs,pods -o wide` table (the watch before it prints bare names).
        rows = up.stdout.splitlines()
        for name in ("flower-counter", "building-segmenter", "flower-counter-cpu"):
            line = [row for row in rows if f"trainingjob.fieldkube.io/{name} " in row][-1]
            assert "Succeeded" in line, up.stdout[-4000:]
        launcher = [row for row in rows if row.startswith("pod/flower-counter-cpu-launcher")][-1]
        assert "fieldkube-node" in launcher, launcher  # the CPU job's pods ran on the real node
    finally:
        down = run("down", "--state", str(state), timeout=300)
    assert down.returncode == 0, down.stderr
    from fieldkube.localcluster import harness, node

    assert not harness.LocalCluster(state).running(), "make demo-cluster-down left processes running"
    assert node.BRIDGE not in node.link_names(), "make demo-cluster-down left the node's bridge"
