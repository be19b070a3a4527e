"""fieldkube-profile under a real launcher: every rank writes its own profile directory, the gradient
allreduce is timed as its own phase, and `parse` lists both ranks."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent

PROFILE = ["run", "--tile", "32", "--batch", "2", "--iterations", "3", "--warmup", "1", "--threads", "1"]


@pytest.mark.parametrize("launcher", ["horovod", "ddp"])
def test_two_ranks_each_write_a_profile_with_an_allreduce_phase(launcher: str, tmp_path: Path, env) -> None:
    from fieldkube.trainer.scale import free_port

    if launcher == "horovod":
        cmd = [str(BIN / "horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo",
               "--network-interface", "lo", str(BIN / "fieldkube-profile")]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), "-m", "fieldkube.trainer.profile"]  # fmt: skip
    proc = subprocess.run([*cmd, *PROFILE, "--out", str(tmp_path)], env=env(), capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        directory = tmp_path / "rep-000" / f"rank-{rank}"
        with (directory / "iterations.csv").open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert [int(r["rank"]) for r in rows] == [rank] * 3
        assert all(float(r["allreduce_s"]) > 0 for r in rows)
        summary = (directory / "summary.csv").read_text()
        assert "world_size,2" in summary and f"backend_resolved,{launcher}" in summary
    parsed = subprocess.run([str(BIN / "fieldkube-profile"), "parse", str(tmp_path), "--no-plots"], env=env(),
                            capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    assert "rep-000/rank-0" in parsed.stdout and "rep-000/rank-1" in parsed.stdout
