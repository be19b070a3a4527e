"""bench/serve_bench.py --gpu runs on GPU hosts only now and then, with minutes of device time: its CPU
dry run keeps that mode working between those runs, through the same code path (the models, the server
started from src/, the closed-loop levels and the bare forward they are compared with)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_the_gpu_serving_benchmark_runs_end_to_end_on_a_cpu(tmp_path: Path) -> None:
    out = tmp_path / "serve_gpu.json"
    args = ["--gpu", "--device", "cpu", "--requests", "2", "--bare-seconds", "1", "--cpu-requests", "1"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench/serve_bench.py"), *args, "--out", str(out)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["machine"]["device"] == "cpu" and result["machine"]["gpu"] is None
    for task in ("count", "segment"):
        row = result["results"][task]
        assert row["bare_forward_rps"] > 0
        assert set(row["batching_on"]) == {"1", "4", "16"}
        for level in row["batching_on"].values():
            assert level["rps"] > 0 and level["ratio_to_bare"] > 0
            assert 0 < level["p50_s"] <= level["p95_s"] <= level["p99_s"]
        assert "batching_off" not in row and "baseline" not in row  # GPU minutes go to batching on only
        assert row["prepare_queues_without_waiting"] is None  # checked on CUDA only, run here unchecked
