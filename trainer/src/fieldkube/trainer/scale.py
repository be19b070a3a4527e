"""fieldkube-scale: how training throughput grows with the number of workers, per strategy (seeds 000-004).

    fieldkube-scale --data data/field --workers 1,2 --launcher horovod --steps 30 --out scale/
    fieldkube-scale --data data/field --workers 1,2 --strategy allreduce,ps-sync,ps-async --launcher ddp \\
        --ps 1 --staleness 2 --steps 30 --out scale/

Strategies: `allreduce` runs the real `fieldkube-train` under the chosen launcher (horovodrun, mpirun or
torchrun); `ps-sync` and `ps-async` run the same model, data order, loss and optimizer with --ps
parameter-server processes (`fieldkube.trainer.ps_train` under torchrun, gloo). Every run has the same
per-worker batch (weak scaling, as in the seeds) and a fixed number of steps per worker, in --repeat
rounds that alternate strategies and counts (median per strategy and count). Each run's steady-state
images/s (first step excluded) comes from its summary.json. speedup = throughput / the per-worker
throughput of the first strategy's smallest count (= T1/TN for the same amount of work; put allreduce
first and 1 worker is plain training), efficiency = speedup / workers and, seed 003's way, counting the
parameter servers: speedup / (workers + servers). Time to a target loss (--target-loss, default the
highest final loss of all runs, so that every run reaches it) and the saved model's test loss and
count MAE (IoU for a segmenter) weigh each strategy's speed against what it learned. Writes scale.json
and scale.png under --out.
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
STRATEGIES = ("allreduce", "ps-sync", "ps-async")
DEFAULT_STALENESS = 2


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


def ps_command(strategy: str, workers: int, servers: int, staleness: int) -> list[str]:
    """W workers and N parameter servers as one torchrun job of W + N processes (gloo)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(workers + servers),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
            "-m", "fieldkube.trainer.ps_train", "--workers", str(workers), "--servers", str(servers),
            "--mode", strategy.removeprefix("ps-"), "--staleness", str(staleness)]  # fmt: skip


def train_once(
    command: list[str],
    label: str,
    data: Path,
    out: Path,
    steps: int,
    batch: int,
    threads: int,
    extra: list[str],
    timeout: float,
) -> dict[str, Any]:
    """Run one training job to the end; returns its summary's `trained` section, the wall time and its
    loss curve (logged at every step)."""
    cmd = [
        *command, "--data", str(data), "--set", f"output_dir={out}",
        "--set", f"train.batch_size={batch}", "--set", "train.batch_mode=per_worker",
        "--set", f"train.max_steps={steps}", "--set", "train.epochs=100000",
        "--set", "train.evaluate=false", "--set", "train.log_every_steps=1",
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
        raise DataError(f"{label} did not finish within {timeout:.0f}s") from None
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise DataError(f"{label} failed (exit {proc.returncode}):\n{tail}")
    trained: dict[str, Any] = json.loads((out / "summary.json").read_text(encoding="utf-8"))["trained"]
    trained["wall_seconds"] = round(wall, 3)
    trained["loss_curve"] = json.loads((out / "loss_curve.json").read_text(encoding="utf-8"))
    return trained


def scaling_table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Speedup relative to the first strategy's smallest worker count, efficiency per worker and counting
    the parameter servers (seed 003's definitions), and speedup within each strategy."""
    first = runs[0]["strategy"]
    base = min((r for r in runs if r["strategy"] == first), key=lambda r: r["workers"])
    base_rate = base["images_per_second"] / base["workers"]
    table = []
    for run in runs:
        own = min((r for r in runs if r["strategy"] == run["strategy"]), key=lambda r: r["workers"])
        own_rate = own["images_per_second"] / own["workers"]
        speedup = run["images_per_second"] / base_rate if base_rate > 0 else float("nan")
        table.append(
            {
                **run,
                "speedup": round(speedup, 3),
                "efficiency": round(speedup / run["workers"], 3),
                "efficiency_with_servers": round(speedup / (run["workers"] + run["servers"]), 3),
                "speedup_in_strategy": round(run["images_per_second"] / own_rate, 3)
                if own_rate > 0
                else float("nan"),
            }
        )
    return table


def add_time_to_target(table: list[dict[str, Any]], target: float | None) -> float:
    """Time to `target` (default: the highest final loss of any round, so every run reaches it) per
    round, and its median per row; returns the target used."""
    from fieldkube.trainer.scale_quality import final_loss, time_to_loss

    curves = [curve for row in table for curve in row["loss_curves"]]
    if target is None:
        target = max(loss for c in curves if (loss := final_loss(c)) is not None)
    for row in table:
        times = [time_to_loss(c, target) for c in row["loss_curves"]]
        row["time_to_target_rounds"] = times
        reached = [t for t in times if t is not None]
        row["time_to_target_seconds"] = statistics.median(reached) if len(reached) == len(times) else None
    return target


def plot(table: list[dict[str, Any]], title: str, target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fieldkube.trainer.scale_quality import smoothed

    strategies = list(dict.fromkeys(r["strategy"] for r in table))
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(13, 3.8))
    width = 0.8 / len(strategies)
    counts = sorted({r["workers"] for r in table})
    for k, strategy in enumerate(strategies):
        rows = [r for r in table if r["strategy"] == strategy]
        xs = [counts.index(r["workers"]) + k * width for r in rows]
        left.bar(xs, [r["images_per_second"] for r in rows], width, label=strategy)
        middle.plot([r["workers"] for r in rows], [r["speedup"] for r in rows], "o-", label=strategy)
        for r in rows:
            middle.annotate(
                f"{100 * r['efficiency']:.0f}%/{100 * r['efficiency_with_servers']:.0f}%",
                (r["workers"], r["speedup"]),
                fontsize=7,
            )
            points = smoothed(r["loss_curves"][0])
            right.plot([p[0] for p in points], [p[1] for p in points], label=f"{strategy} x{r['workers']}")
    left.set_xticks(
        [i + width * (len(strategies) - 1) / 2 for i in range(len(counts))], [str(c) for c in counts]
    )
    left.set_xlabel("workers")
    left.set_ylabel("images / s")
    left.set_title("Throughput")
    left.legend(fontsize=7)
    middle.plot(counts, counts, "--", color="#888", label="ideal")
    middle.set_xticks(counts)
    middle.set_xlabel("workers")
    middle.set_ylabel("speedup")
    middle.set_title("Speedup (efficiency per worker / with servers)", fontsize=9)
    middle.legend(fontsize=7)
    right.axhline(target, color="#888", linestyle=":", label="target")
    right.set_xlabel("seconds")
    right.set_ylabel("training loss (smoothed)")
    right.set_title("Loss vs wall time (round 1)")
    right.legend(fontsize=6)
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


def _strategies(text: str) -> list[str]:
    values = list(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    unknown = [v for v in values if v not in STRATEGIES]
    if not values or unknown:
        raise ConfigError(
            f"--strategy {text!r}: expected one or more of {', '.join(STRATEGIES)}, comma-separated"
        )
    return values


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fieldkube-scale", description="Throughput vs number of workers.")
    parser.add_argument("--data", type=Path, help="prepared dataset (fieldkube-prepare); local sweeps only")
    parser.add_argument("--out", type=Path, required=True, help="output directory (scale.json, scale.png)")
    parser.add_argument("--workers", default="1,2", help="worker counts to run, e.g. 1,2,4")
    parser.add_argument(
        "--strategy", default="allreduce", help=f"one or more of {', '.join(STRATEGIES)}, comma-separated"
    )
    parser.add_argument("--launcher", choices=LAUNCHERS, help="allreduce's launcher (default horovod)")
    parser.add_argument("--ps", type=int, help="parameter servers of ps-sync/ps-async (default 1)")
    parser.add_argument(
        "--staleness", type=int, help=f"ps-async: versions a gradient may lag (default {DEFAULT_STALENESS})"
    )
    parser.add_argument(
        "--target-loss", type=float, help="training loss for time-to-target (default: see above)"
    )
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per worker per run")
    parser.add_argument("--batch", type=int, default=8, help="images per worker per step")
    parser.add_argument("--threads-per-worker", type=int, default=1, help="torch CPU threads per process")
    parser.add_argument("--repeat", type=int, default=1, help="rounds over all runs (median per run)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per run")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="passed to fieldkube-train (e.g. model.name=counter-fcrn)",
    )  # fmt: skip
    cluster = parser.add_argument_group("--cluster: one TrainingJob per worker count (scale_cluster.py)")
    cluster.add_argument("--cluster", action="store_true", help="run the sweep as TrainingJobs")
    cluster.add_argument("--template", type=Path, help="TrainingJob YAML every job starts from")
    cluster.add_argument("--kubeconfig", help="default: $KUBECONFIG or ~/.kube/config")
    cluster.add_argument("--namespace", default="default", help="where the TrainingJobs are created")
    cluster.add_argument("--image", help="trainer image (default: the template's, else the operator's)")
    cluster.add_argument("--dataset-pvc", help="claim holding the prepared dataset")
    cluster.add_argument("--dataset-path", help="dataset path inside that claim")
    cluster.add_argument("--mlflow-uri", help="MLflow server the pods and this machine reach")
    cluster.add_argument(
        "--experiment", help="MLflow experiment (default: the template's, else fieldkube-scale)"
    )
    cluster.add_argument("--cpu", default="1", help="CPU per worker without --template")
    cluster.add_argument("--memory", default="2Gi", help="memory per worker without --template")
    cluster.add_argument("--name-prefix", help="TrainingJob names start with it (default scale-MMDD-HHMMSS)")
    cluster.add_argument("--poll", type=float, default=5.0, help="seconds between status reads")
    return parser


def _check(args: argparse.Namespace, strategies: list[str]) -> tuple[str, int, int]:
    """(launcher, servers, staleness) after checking that each flag fits the strategies asked for."""
    ps = [s for s in strategies if s.startswith("ps-")]
    if args.launcher is not None and "allreduce" not in strategies:
        raise ConfigError(
            f"--launcher {args.launcher}: applies to --strategy allreduce only (ps runs use torchrun)"
        )
    if args.ps is not None and not ps:
        raise ConfigError(f"--ps {args.ps}: applies to --strategy ps-sync or ps-async only")
    if args.ps is not None and args.ps < 1:
        raise ConfigError(f"--ps {args.ps}: expected >= 1 parameter server")
    if args.staleness is not None and "ps-async" not in strategies:
        raise ConfigError(f"--staleness {args.staleness}: applies to --strategy ps-async only")
    if args.staleness is not None and args.staleness < 0:
        raise ConfigError(f"--staleness {args.staleness}: expected >= 0 versions")
    if args.steps < 2:
        raise ConfigError(f"--steps {args.steps}: expected >= 2 (the first step is not timed)")
    if args.batch < 1 or args.threads_per_worker < 1 or args.repeat < 1:
        raise ConfigError("--batch, --threads-per-worker and --repeat: expected >= 1")
    staleness = DEFAULT_STALENESS if args.staleness is None else args.staleness
    return args.launcher or "horovod", 1 if args.ps is None else args.ps, staleness


def run(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    counts = _workers(args.workers)
    strategies = _strategies(args.strategy)
    if args.cluster:
        from fieldkube.trainer.scale_cluster import run_cluster

        return run_cluster(args, counts, strategies)
    if args.data is None:
        raise ConfigError("--data: required (a prepared dataset) unless --cluster")
    launcher, servers, staleness = _check(args, strategies)
    from fieldkube.contract.config import load_config
    from fieldkube.trainer.dataset_format import read_manifest
    from fieldkube.trainer.scale_cluster import write_tables
    from fieldkube.trainer.scale_quality import final_loss, test_quality

    read_manifest(args.data)  # a clear error before any launcher starts
    config = load_config(None, [*args.overrides, f"data.path={args.data}"])
    extra = [item for assignment in args.overrides for item in ("--set", assignment)]

    def label(strategy: str) -> str:
        if strategy == "allreduce":
            return f"allreduce ({launcher})"
        return strategy + (f" (staleness <= {staleness})" if strategy == "ps-async" else "")

    # Rounds alternate strategies and worker counts (allreduce 1, 2, ps-sync 1, 2, ...) so that load from
    # other work on a shared machine falls on every run alike; each run reports the median of its rounds.
    plan = [(strategy, workers) for strategy in strategies for workers in counts]
    samples: dict[tuple[str, int], list[dict[str, Any]]] = {key: [] for key in plan}
    sweep_began, done, total = time.perf_counter(), 0, args.repeat * len(plan)
    for round_index in range(args.repeat):
        for strategy, workers in plan:
            name = f"{label(strategy)} with {workers} worker(s)"
            log.info("round %d/%d: %d steps, %s ...", round_index + 1, args.repeat, args.steps, name)
            if strategy == "allreduce":
                command = launch_command(launcher, workers)
            else:
                command = ps_command(strategy, workers, servers, staleness)
            out = args.out / f"{strategy}-workers-{workers}"
            trained = train_once(
                command,
                name,
                args.data,
                out,
                args.steps,
                args.batch,
                args.threads_per_worker,
                extra,
                args.timeout,
            )
            trained.update(test_quality(out / "model", config))
            samples[(strategy, workers)].append(trained)
            done += 1
            eta = (time.perf_counter() - sweep_began) / done * (total - done)
            log.info(
                "%s: %.2f images/s (%.0fs wall), final loss %.4g, test loss %.4g | run %d/%d, ETA %.0fs",
                name,
                trained["train_images_per_second"],
                trained["wall_seconds"],
                final_loss(trained["loss_curve"]) or float("nan"),
                trained.get("test_loss", float("nan")),
                done,
                total,
                eta,
            )
    runs = []
    for (strategy, workers), trials in samples.items():
        rates = [float(t["train_images_per_second"]) for t in trials]

        def median(key: str, trials: list[dict[str, Any]] = trials) -> float | None:
            values = [float(t[key]) for t in trials if t.get(key) is not None]
            return round(statistics.median(values), 4) if values else None

        runs.append(
            {
                "strategy": strategy,
                "workers": workers,
                "servers": servers if strategy != "allreduce" else 0,
                "images_per_second": round(statistics.median(rates), 3),
                "images_per_second_rounds": [round(r, 3) for r in rates],
                "loader_wait_share": median("loader_wait_share"),
                "wall_seconds": median("wall_seconds"),
                "backend": trials[0].get("backend"),
                "final_loss": round(statistics.median(final_loss(t["loss_curve"]) or 0.0 for t in trials), 4),
                "test_loss": median("test_loss"),
                "test_mae": median("test_mae"),
                "test_iou": median("test_iou"),
                "staleness_bound": staleness if strategy == "ps-async" else None,
                "staleness_mean": median("staleness_mean"),
                "staleness_max": max(
                    (t["staleness_max"] for t in trials if "staleness_max" in t), default=None
                ),
                "exchange_share": median("exchange_share"),
                "loss_curves": [t["loss_curve"] for t in trials],
            }
        )
    table = scaling_table(runs)
    target = add_time_to_target(table, args.target_loss)
    result = {
        "strategies": strategies,
        "launcher": launcher if "allreduce" in strategies else None,
        "servers": servers if any(s.startswith("ps-") for s in strategies) else None,
        "staleness_bound": staleness if "ps-async" in strategies else None,
        "steps": args.steps,
        "batch_per_worker": args.batch,
        "threads_per_worker": args.threads_per_worker,
        "repeat": args.repeat,
        "overrides": args.overrides,
        "target_loss": round(target, 4),
        "cpu_count": os.cpu_count(),
        "runs": table,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "scale.json", result)
    title = (
        f"{config.model.name}, batch {args.batch}/worker, {args.threads_per_worker} thread(s)/process, "
        f"{args.steps} steps/worker, {args.repeat} round(s), target loss {target:.4g}"
    )
    plot(table, title, target, args.out / "scale.png")
    write_tables(table, args.out)
    for row in table:
        reached = row["time_to_target_seconds"]
        print(
            f"{label(row['strategy']):<28} {row['workers']:>2} worker(s): "
            f"{row['images_per_second']:8.2f} img/s  "
            f"speedup {row['speedup']:.2f}x  efficiency {100 * row['efficiency']:.0f}% "
            f"({100 * row['efficiency_with_servers']:.0f}% with servers)  "
            f"to loss {target:.4g}: {'not reached' if reached is None else f'{reached:.1f}s'}  "
            f"final loss {row['final_loss']:.4g}"
            + (f"  test MAE {row['test_mae']:.3f}" if row["test_mae"] is not None else "")
            + (
                f"  staleness mean {row['staleness_mean']:.2f} max {row['staleness_max']}"
                if row["strategy"] == "ps-async"
                else ""
            )
        )
    print(f"wrote {args.out}/scale.json, scale.md, scale.csv and scale.png")
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
