"""bench/serve_bench.py --gpu runs on GPU hosts only now and then, with minutes of device time: its CPU
dry run keeps that mode working between those runs, through the same code path (the models, the server
started from src/, the closed-loop levels and the bare forward they are compared with)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def test_the_gpu_serving_benchmark_runs_end_to_end_on_a_cpu(
    run_bench: Callable[[str, list[str]], dict[str, Any]],
) -> None:
    args = ["--gpu", "--device", "cpu", "--requests", "2", "--bare-seconds", "1", "--cpu-requests", "1"]
    result = run_bench("serve_bench.py", args)
    assert result["machine"]["device"] == "cpu" and result["machine"]["gpu"] is None
    for task in ("count", "segment"):
        row = result["results"][task]
        assert row["bare_forward_rps"] > 0
        assert set(row["batching_on"]) == {"1", "4", "16"}
        for level in row["batching_on"].values():
            assert level["rps"] > 0 and level["bare_forward_rps"] > 0  # its own, measured just before it
            assert level["ratio_to_bare"] == level["rps"] / level["bare_forward_rps"]
            assert 0 < level["p50_s"] <= level["p95_s"] <= level["p99_s"]
        assert "batching_off" not in row and "baseline" not in row  # GPU minutes go to batching on only
        assert row["prepare_queues_without_waiting"] is None  # checked on CUDA only, run here unchecked
        steps = row["own_cpu_ms_by_step"]
        assert {"read_header", "decode", "cut_tiles", "normalise", "stitch"} <= set(steps)
        assert steps["decode"] > 0 and steps["stitch"] > 0
