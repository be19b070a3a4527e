"""Profiler benchmark: what per-layer profiling costs, how much of an iteration it accounts for, and how
well the iteration-time predictor does on configurations it did not see.

For each model, one process builds the same model twice (same seed, same synthetic batches): one with
fieldkube-profile's hooks and per-layer optimizers, one plain. After warm-up the two run in alternating
iterations (so drift on a shared machine hits both alike). Figures per model:
  - overhead = median profiled iteration / median plain iteration - 1 (seed 001: +235 % and +245 %),
    and the same ratio of the training thread's CPU time (torch uses --threads 1 by default, so all
    compute runs in that thread), which other processes on a shared machine do not distort;
  - coverage = sum of per-layer times / measured iteration (seed 001 missed 38-54 %, i.e. 46-62 %);
  - accounted = the rows a timer brackets / measured iteration: layers, functions between layers
    (padding, concatenation, interpolation, pooling, flatten), the loss with its backward, the named
    phases, the backward pass's start and end, the profiler's bookkeeping; the rest are the per-phase
    gaps (median of the iterations, and each row's median share).
Prediction (--predict-batches, after the models): counter-mcnn profiled at --fit-batches and the held-out
batch sizes in one process, iterations alternating; the 2-rank allreduce timed against message size and
2-rank profiles at the held-out sizes (torchrun, gloo); `fieldkube-profile predict` for each held-out
size at 1 and 2 workers, against the measurement.
Writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fieldkube.trainer.backends import SingleBackend
from fieldkube.trainer.launch_env import LaunchEnv
from fieldkube.trainer.profile import IterationRunner, ProfileSettings, run_profile
from fieldkube.trainer.profile_predict import Prediction, plot_predictions, predict
from fieldkube.trainer.profile_report import ACCOUNT_ROWS

MODELS: dict[str, dict[str, Any]] = {
    "counter-mcnn": {},
    "counter-fcrn": {"base_channels": 16},
    "segmenter-unet": {"base_channels": 16, "depth": 4},
    # seed 001's network at a quarter of its width (and 1024 wide fully connected layers), so that it
    # runs on 2 shared cores in the time of the others
    "vgg11": {"width": 0.25, "hidden": 1024},
}


def measure(model: str, params: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    backend = SingleBackend(LaunchEnv("single", 0, 0, 1))
    device = torch.device(args.device)
    common = {
        "model": model,
        "params": params,
        "tile": args.tile,
        "batch": args.batch,
        "threads": args.threads,
    }
    torch.set_num_threads(args.threads)
    plain = IterationRunner(ProfileSettings(**common, profiling=False), backend, device)
    profiled = IterationRunner(ProfileSettings(**common, profiling=True), backend, device)
    plain.run(0, args.warmup)
    profiled.run(0, args.warmup)
    plain_times: list[float] = []
    plain_cpu: list[float] = []
    profiled_cpu: list[float] = []
    profiled_records = []
    for block in range(args.blocks):
        for index in range(block * args.block, (block + 1) * args.block):
            began = time.thread_time()
            plain_times.append(plain.step(index).iteration_s)
            plain_cpu.append(time.thread_time() - began)
            began = time.thread_time()
            profiled_records.append(profiled.step(index))
            profiled_cpu.append(time.thread_time() - began)
    profiled.close()
    profiled_times = [r.iteration_s for r in profiled_records]
    rows = [profiled.accounting(record) for record in profiled_records]
    coverage = [r["coverage"] for r in rows]
    accounted = [r["accounted"] for r in rows]
    shares = {
        key.removesuffix("_s"): round(
            100
            * statistics.median(
                r[key] / rec.iteration_s for r, rec in zip(rows, profiled_records, strict=True)
            ),
            2,
        )
        for key in ACCOUNT_ROWS
    }
    # medians: on a shared machine a few iterations are slowed by other work, in either arm
    plain_median = statistics.median(plain_times)
    profiled_median = statistics.median(profiled_times)
    result = {
        "model": model,
        "params": params,
        "layers": len(profiled.profiler.names) if profiled.profiler else 0,
        "plain_median_ms": round(1000 * plain_median, 3),
        "profiled_median_ms": round(1000 * profiled_median, 3),
        "overhead_percent": round(100 * (profiled_median / plain_median - 1), 2),
        # CPU time of the (single-threaded) training thread: what profiling costs, whatever else runs
        "cpu_overhead_percent": round(100 * (sum(profiled_cpu) / sum(plain_cpu) - 1), 2),
        "coverage_percent": round(100 * statistics.median(coverage), 2),
        "accounted_percent": round(100 * statistics.median(accounted), 2),
        "accounted_min_percent": round(100 * min(accounted), 2),
        "row_median_percent": shares,
        "iterations_each": len(plain_times),
    }
    r = result
    print(
        f"  {model:>15}: plain {r['plain_median_ms']:.1f} ms, profiled {r['profiled_median_ms']:.1f} ms "
        f"(overhead {r['overhead_percent']:+.1f}% wall, {r['cpu_overhead_percent']:+.1f}% CPU), layers cover "
        f"{r['coverage_percent']:.1f}%, timed rows {r['accounted_percent']:.1f}% (min "
        f"{r['accounted_min_percent']:.1f}%); median shares {shares}",
        flush=True,
    )
    return result


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _torchrun(args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "fieldkube.trainer.profile", *args]  # fmt: skip
    began = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    print(f"  torchrun {args[0]}: {time.perf_counter() - began:.0f}s (load {_load()})", flush=True)


def _load() -> float:
    return round(os.getloadavg()[0], 1)


def predict_round(
    args: argparse.Namespace, root: Path, fit: list[int], held_out: list[int]
) -> list[Prediction]:
    """One round: single-worker profiles (fit + held out, alternating), the 2-rank allreduce sweep and
    2-rank profiles at the held-out sizes; then a prediction for each held-out size at 1 and 2 workers."""
    settings = ProfileSettings(
        model="counter-mcnn",
        tile=args.predict_tile,
        batch=fit[0],
        iterations=args.predict_iterations,
        warmup=2,
        threads=args.threads,
    )
    began = time.perf_counter()
    run_profile(settings, root / "single", 1, plots=False, batches=fit + held_out)
    print(f"  single-worker profiles: {time.perf_counter() - began:.0f}s (load {_load()})", flush=True)
    _torchrun(["allreduce", "--threads", "1", "--repeats", "10", "--out", str(root / "allreduce")])
    _torchrun(["run", "--model", "counter-mcnn", "--tile", str(args.predict_tile), "--batch",
               ",".join(map(str, held_out)), "--iterations", str(args.predict_iterations), "--warmup", "2",
               "--threads", "1", "--no-plots", "--out", str(root / "two")])  # fmt: skip
    return [
        predict([root], batch=batch, workers=workers, fit_batches=fit)
        for workers in (1, 2)
        for batch in held_out
    ]


def measure_prediction(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """`--predict-rounds` rounds of predict_round: the machine's load moves between the single-worker and
    the 2-rank measurements, so each round gives its own errors, and the median is reported."""
    held_out = [int(b) for b in args.predict_batches.split(",")]
    fit = [int(b) for b in args.fit_batches.split(",")]
    began = time.perf_counter()
    print(f"prediction: counter-mcnn {args.predict_tile}px, batches {fit} (fit) + {held_out} (held out), "
          f"{args.predict_iterations} alternating iterations each, {args.predict_rounds} rounds",
          flush=True)  # fmt: skip
    rounds: list[list[dict[str, Any]]] = []
    predictions: list[Prediction] = []
    for index in range(args.predict_rounds):
        predictions = predict_round(args, root / f"round-{index}", fit, held_out)
        rows = [p.as_dict() for p in predictions]
        rounds.append(rows)
        for row in rows:
            print(f"  round {index}: batch {row['batch']}, {row['workers']} worker(s): predicted "
                  f"{row['predicted_ms']:.1f} ms (allreduce {row['allreduce_ms']:.1f}), measured "
                  f"{row['measured_ms']:.1f} ms, error {row['error_percent']:+.1f} %",
                  flush=True)  # fmt: skip
    summary = []
    for position, row in enumerate(rounds[0]):
        errors = [r[position]["error_percent"] for r in rounds]
        summary.append(
            {
                "batch": row["batch"],
                "workers": row["workers"],
                "errors_percent": errors,
                "median_error_percent": round(statistics.median(errors), 2),
                "predicted_ms": [r[position]["predicted_ms"] for r in rounds],
                "measured_ms": [r[position]["measured_ms"] for r in rounds],
            }
        )
        print(f"  batch {row['batch']}, {row['workers']} worker(s): errors {errors} %, median "
              f"{summary[-1]['median_error_percent']:+.1f} %", flush=True)  # fmt: skip
    if args.plot is not None:
        print(f"  wrote {plot_predictions(predictions, args.plot)} (last round)", flush=True)
    return {
        "model": "counter-mcnn",
        "plot": None if args.plot is None else str(args.plot),
        "tile": args.predict_tile,
        "fit_batches": fit,
        "held_out_batches": held_out,
        "iterations_each": args.predict_iterations,
        "summary": summary,
        "rounds": rounds,
        "seconds": round(time.perf_counter() - began, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/profile_bench.json"))
    parser.add_argument("--tile", type=int, default=96)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--block", type=int, default=1, help="iterations per alternating block")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--predict-tile", type=int, default=64)
    parser.add_argument("--fit-batches", default="1,2,4,8")
    parser.add_argument("--predict-batches", default="6,12", help="held-out batch sizes ('' to skip)")
    parser.add_argument("--predict-iterations", type=int, default=12)
    parser.add_argument("--predict-rounds", type=int, default=3)
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: the same overhead/accounting figures with CUDA events (add --predict-batches '' "
        "to skip the CPU prediction rounds)",
    )
    parser.add_argument("--plot", type=Path, default=Path("bench/results/profile-predict.png"))
    args = parser.parse_args()
    began = time.perf_counter()
    print(
        f"profiling overhead and coverage, {args.tile}px tiles, batch {args.batch}, {args.threads} threads:"
    )
    results = [measure(name, MODELS[name], args) for name in args.models.split(",") if name]
    prediction = None
    if args.predict_batches:
        root = Path(tempfile.mkdtemp(prefix="profile-bench-"))
        try:
            prediction = measure_prediction(args, root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    output = {
        "models": results,
        "prediction": prediction,
        "tile": args.tile,
        "batch": args.batch,
        "threads": args.threads,
        "device": args.device,
        "cpu_count": os.cpu_count(),
        "seed_001": {"overhead_percent": [235, 245], "coverage_percent": [46, 62]},
        "seconds": round(time.perf_counter() - began, 1),
        "command": " ".join(["bench/profile_bench.py", *sys.argv[1:]]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(output, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
