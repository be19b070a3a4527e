"""fieldkube-scale: how training throughput grows with the number of workers (seeds 002, 003, 004).

    fieldkube-scale --data data/field --workers 1,2 --launcher horovod --steps 30 --out scale/
    fieldkube-scale --data data/field --workers 1,2,4 --launcher ddp --set model.name=counter-fcrn ...

For each worker count N the real `fieldkube-train` runs under the chosen launcher (horovodrun, mpirun or
torchrun on this host) with the same per-worker batch (weak scaling, as in the seeds) and a fixed number
of optimizer steps, in --repeat rounds that alternate the counts (median per count). Each run's
steady-state images/s (first step excluded) comes from its summary.json;
speedup = throughput(N) / throughput(N_min) x N_min (= T1/TN for the same amount of work) and
efficiency = speedup / N, as seed 003 defines them. Writes scale.json and scale.png under --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fieldkube.trainer.dataset_format import write_json_atomic
from fieldkube.trainer.errors import ConfigError, DataError, TrainerError

log = logging.getLogger("fieldkube.scale")
BIN = Path(sys.executable).parent
LAUNCHERS = ("horovod", "mpirun", "ddp")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def launch_command(launcher: str, workers: int) -> list[str]:
    """The command that starts `workers` local fieldkube-train processes under `launcher`."""
    train = str(BIN / "fieldkube-train")
    if launcher == "horovod":
        return [str(BIN / "horovodrun"), "-np", str(workers), "-H", f"localhost:{workers}", "--gloo",
                "--network-interface", "lo", train]  # fmt: skip
    if launcher == "mpirun":
        root = ["--allow-run-as-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
        return ["mpirun", *root, "-np", str(workers), "--oversubscribe", "--bind-to", "none",
                "-x", "PATH", "-x", "OMP_NUM_THREADS", train]  # fmt: skip
    if launcher == "ddp":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(workers),
                "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                "-m", "fieldkube.trainer.cli", "--set", "runtime.backend=ddp"]  # fmt: skip
    raise ConfigError(f"--launcher {launcher!r}: expected one of {', '.join(LAUNCHERS)}")


def launcher_env(threads: int) -> dict[str, str]:
    """Loopback-only networking for Gloo/OpenMPI, one thread pool size for every process, no tracking."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        OMP_NUM_THREADS=str(threads),
        HOROVOD_GLOO_IFACE="lo",
        OMPI_MCA_btl_tcp_if_include="lo",
        OMPI_MCA_oob_tcp_if_include="lo",
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def train_once(
    launcher: str,
    workers: int,
    data: Path,
    out: Path,
    steps: int,
    batch: int,
    threads: int,
    extra: list[str],
    timeout: float,
) -> dict[str, Any]:
    """Run fieldkube-train once; returns its summary's `trained` section plus the wall time."""
    cmd = [
        *launch_command(launcher, workers), "--data", str(data), "--set", f"output_dir={out}",
        "--set", f"train.batch_size={batch}", "--set", "train.batch_mode=per_worker",
        "--set", f"train.max_steps={steps}", "--set", "train.epochs=100000",
        "--set", "train.evaluate=false", "--set", f"train.log_every_steps={max(1, steps // 4)}",
        "--set", f"runtime.threads={threads}", "--set", "metrics.port=0",
        "--set", "checkpoint.dir=null", "--set", "tracking.uri=null",
        *extra,
    ]  # fmt: skip
    began = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, env=launcher_env(threads), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise DataError(f"{launcher} with {workers} worker(s) did not finish within {timeout:.0f}s") from None
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise DataError(f"{launcher} with {workers} worker(s) failed (exit {proc.returncode}):\n{tail}")
    summary_path = out / "summary.json"
    trained: dict[str, Any] = json.loads(summary_path.read_text(encoding="utf-8"))["trained"]
    trained["wall_seconds"] = round(wall, 3)
    return trained


def scaling_table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add speedup and efficiency relative to the smallest worker count (seed 003's definitions)."""
    base = min(runs, key=lambda r: r["workers"])
    base_rate = base["images_per_second"] / base["workers"]
    table = []
    for run in sorted(runs, key=lambda r: r["workers"]):
        speedup = run["images_per_second"] / base_rate if base_rate > 0 else float("nan")
        table.append({**run, "speedup": round(speedup, 3), "efficiency": round(speedup / run["workers"], 3)})
    return table


def plot(table: list[dict[str, Any]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workers = [r["workers"] for r in table]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.bar([str(w) for w in workers], [r["images_per_second"] for r in table], color="#27a")
    left.set_xlabel("workers")
    left.set_ylabel("images / s")
    left.set_title("Throughput")
    right.plot(workers, [r["speedup"] for r in table], "o-", label="measured speedup")
    right.plot(workers, workers, "--", color="#888", label="ideal")
    for r in table:
        right.annotate(f"{100 * r['efficiency']:.0f}%", (r["workers"], r["speedup"]), fontsize=8)
    right.set_xlabel("workers")
    right.set_ylabel("speedup")
    right.set_title("Speedup (labels: efficiency)")
    right.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _workers(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise ConfigError(f"--workers {text!r}: expected comma-separated integers, e.g. 1,2,4") from None
    if not values or values[0] < 1:
        raise ConfigError(f"--workers {text!r}: expected integers >= 1")
    return values


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fieldkube-scale", description="Throughput vs number of workers.")
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset (fieldkube-prepare)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (scale.json, scale.png)")
    parser.add_argument("--workers", default="1,2", help="worker counts to run, e.g. 1,2,4")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="horovod")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    parser.add_argument("--batch", type=int, default=8, help="images per worker per step")
    parser.add_argument("--threads-per-worker", type=int, default=1, help="torch CPU threads per worker")
    parser.add_argument("--repeat", type=int, default=1, help="rounds over all counts (median per count)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per run")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="passed to fieldkube-train (e.g. model.name=counter-fcrn)",
    )  # fmt: skip
    return parser


def run(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    counts = _workers(args.workers)
    if args.steps < 2:
        raise ConfigError(f"--steps {args.steps}: expected >= 2 (the first step is not timed)")
    if args.batch < 1 or args.threads_per_worker < 1 or args.repeat < 1:
        raise ConfigError("--batch, --threads-per-worker and --repeat: expected >= 1")
    from fieldkube.trainer.dataset_format import read_manifest

    read_manifest(args.data)  # a clear error before any launcher starts
    extra = [item for assignment in args.overrides for item in ("--set", assignment)]
    # Rounds alternate the worker counts (1, 2, 1, 2, ...) so that load from other work on a shared
    # machine falls on every count alike; each count reports the median of its rounds.
    samples: dict[int, list[dict[str, Any]]] = {workers: [] for workers in counts}
    for round_index in range(args.repeat):
        for workers in counts:
            log.info(
                "round %d/%d: %d steps with %d worker(s) under %s ...",
                round_index + 1,
                args.repeat,
                args.steps,
                workers,
                args.launcher,
            )
            trained = train_once(
                args.launcher,
                workers,
                args.data,
                args.out / f"workers-{workers}",
                args.steps,
                args.batch,
                args.threads_per_worker,
                extra,
                args.timeout,
            )
            samples[workers].append(trained)
            log.info(
                "%d worker(s): %.2f images/s (%.0fs wall)",
                workers,
                trained["train_images_per_second"],
                trained["wall_seconds"],
            )
    runs = []
    for workers, trials in samples.items():
        rates = [float(t["train_images_per_second"]) for t in trials]
        runs.append(
            {
                "workers": workers,
                "images_per_second": round(statistics.median(rates), 3),
                "images_per_second_rounds": [round(r, 3) for r in rates],
                "loader_wait_share": statistics.median(float(t["loader_wait_share"]) for t in trials),
                "wall_seconds": round(statistics.median(t["wall_seconds"] for t in trials), 3),
                "backend": trials[0].get("backend"),
            }
        )
    table = scaling_table(runs)
    result = {
        "launcher": args.launcher,
        "steps": args.steps,
        "batch_per_worker": args.batch,
        "threads_per_worker": args.threads_per_worker,
        "repeat": args.repeat,
        "overrides": args.overrides,
        "cpu_count": os.cpu_count(),
        "runs": table,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "scale.json", result)
    title = (
        f"fieldkube-train under {args.launcher}, batch {args.batch}/worker, "
        f"{args.threads_per_worker} thread(s)/worker, {args.steps} steps"
    )
    plot(table, title, args.out / "scale.png")
    for row in table:
        print(
            f"{row['workers']:>3} worker(s): {row['images_per_second']:8.2f} img/s  "
            f"speedup {row['speedup']:.2f}x  efficiency {100 * row['efficiency']:.0f}%"
        )
    print(f"wrote {args.out / 'scale.json'} and {args.out / 'scale.png'}")
    return result


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    try:
        run(argv)
    except TrainerError as exc:
        print(f"fieldkube-scale: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
