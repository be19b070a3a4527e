"""`make demo-cluster`: the example TrainingJobs go to Succeeded through the real local control plane.

The API server, scheduler, controller manager, mpi-operator and fieldkube-operator are real; pods are
simulated by kwok (no container runtime here), which the demo itself says in its output.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.cluster


def run(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "hack" / "demo_cluster.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_examples_succeed_and_the_output_says_pods_are_simulated(tmp_path: Path) -> None:
    state = tmp_path / "cluster"
    try:
        up = run("up", "--detach", "--state", str(state), "--timeout", "240", timeout=420)
        assert up.returncode == 0, up.stdout[-4000:] + up.stderr[-4000:]
        assert "pods are simulated by kwok" in up.stdout
        final = up.stdout[up.stdout.rindex("trainingjob.fieldkube.io/") - 200 :]
        for name in ("flower-counter", "building-segmenter"):
            line = next(row for row in final.splitlines() if f"trainingjob.fieldkube.io/{name}" in row)
            assert "Succeeded" in line, final
    finally:
        down = run("down", "--state", str(state), timeout=120)
    assert down.returncode == 0, down.stderr
    harness = sys.modules.get("fieldkube_cluster_harness")
    assert harness is not None, "tests/integration/conftest.py loads hack/cluster/harness.py"
    assert not harness.LocalCluster(state).running(), "make demo-cluster-down left processes running"
