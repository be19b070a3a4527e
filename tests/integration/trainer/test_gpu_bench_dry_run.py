"""bench/train_gpu_bench.py is run on GPU hosts only now and then: its CPU dry run (small sizes, one
model) keeps it working between those runs, through the same code path (prepare, bare step, the real
fieldkube-train from src/, the summary's figures)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def test_the_gpu_benchmark_runs_end_to_end_on_a_cpu(
    run_bench: Callable[[str, list[str]], dict[str, Any]],
) -> None:
    small = "--tiles 32 --tile 32 --epochs 2 --batch 8 --steps 2 --warmup 1 --loader-workers 1 --threads 1"
    result = run_bench("train_gpu_bench.py", ["--device", "cpu", "--models", "counter-mcnn", *small.split()])
    row = result["counter-mcnn"]
    assert row["bare_images_per_second"] > 0 and row["train_images_per_second"] > 0
    assert row["run_images_per_second"] <= row["train_images_per_second"] * 1.01  # waits count in the run
    assert 0 < row["train_gflops_per_image"] < 1  # counter-mcnn at 32 px: 0.17 GFLOP per training image
    assert row["precision"] == "fp32" and row["mfu"] is None  # a CPU: no peak, so no MFU claimed
    assert row["loader_cpu_ms_per_sample"] > 0 and row["epoch_start_stall_steps"] is not None
