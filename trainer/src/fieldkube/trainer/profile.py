"""fieldkube-profile: per-layer forward/backward/optimizer time of training, per iteration and per rank.

    fieldkube-profile run --model counter-mcnn --tile 224 --batch 8 --iterations 30 --out profiles/mcnn
    horovodrun -np 2 -H localhost:2 --gloo fieldkube-profile run --repetitions 3 --out profiles/mcnn-2
    fieldkube-profile run --no-profiling ...      # the same iterations without hooks (overhead baseline)
    fieldkube-profile parse profiles/mcnn         # rebuild totals, summaries, plots and overview.csv
    fieldkube-profile run --batch 1,2,4,8 --out profiles/sweep   # alternating iterations, batch-<b>/ each
    torchrun --nproc-per-node 2 -m fieldkube.trainer.profile allreduce --out profiles/ar   # cost vs size
    fieldkube-profile predict profiles/ --batch 6 --workers 2   # iteration time of an unseen config

Each repetition and rank writes its own directory `<out>/rep-<k>/rank-<r>/` (see profile_report for the
files and the accounting, whose rows sum to the iteration). Inputs are synthetic tensors made before
timing starts, so the figures are about the model and the framework; the host-to-device copy of each
batch is timed as the `data` phase. The gradient allreduce of a multi-rank run is one explicit phase
between backward and the optimizer (training overlaps it with backward), so it is measured instead of
hiding inside the layers' backward times.
Besides the registry's models, `--model vgg11` profiles seed 001's VGG-11 (profile_models) as a
10-class classifier (cross-entropy on synthetic labels).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fieldkube.trainer.backends import AnyBackend, create_backend, pin_device
from fieldkube.trainer.dataset_format import write_json_atomic
from fieldkube.trainer.errors import ConfigError, TrainerError
from fieldkube.trainer.launch_env import detect_launch_env
from fieldkube.trainer.losses import resolve_loss
from fieldkube.trainer.profile_hooks import (
    Clock,
    LayerProfiler,
    clock_for,
    per_layer_optimizers,
)
from fieldkube.trainer.profile_models import PROFILE_MODELS
from fieldkube.trainer.profile_report import (
    ITERATION_FIELDS,
    LAYER_FIELDS,
    PHASES,
    accounting,
    aggregate,
    row_group,
    summarise_directory,
    write_csv,
)

log = logging.getLogger("fieldkube.profile")


@dataclass(frozen=True)
class ProfileSettings:
    """What one profiling run trains; stored as config.json beside its CSVs."""

    model: str = "counter-mcnn"
    params: dict[str, Any] = field(default_factory=dict)
    tile: int = 224
    batch: int = 8
    iterations: int = 20
    warmup: int = 3
    optimizer: str = "adam"
    lr: float = 1e-4
    loss: str = "auto"
    seed: int = 0
    threads: int | None = None
    device: str = "auto"
    backend: str = "auto"
    profiling: bool = True
    clock: str = "wall"


@dataclass
class IterationRecord:
    iteration: int
    iteration_s: float
    phases: dict[str, float]
    layers: dict[str, tuple[float, float, float]] | None


def synthetic_batches(
    task: str, batch: int, tile: int, count: int, seed: int, pin: bool, classes: int = 10
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` host batches: normalised-looking images and density maps (counter), masks (segmenter) or
    class labels (classifier)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        inputs = torch.randn(batch, 3, tile, tile, generator=generator)
        noise = torch.rand(batch, 1, tile, tile, generator=generator)
        if task == "classifier":
            targets = torch.randint(0, classes, (batch,), generator=generator)
        else:
            targets = (noise > 0.7).float() if task == "segmenter" else noise * 0.01
        if pin:
            inputs, targets = inputs.pin_memory(), targets.pin_memory()
        batches.append((inputs, targets))
    return batches


def _optimizer_factory(settings: ProfileSettings) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    def make(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if settings.optimizer == "sgd":
            return torch.optim.SGD(params, lr=settings.lr, momentum=0.9)
        return torch.optim.Adam(params, lr=settings.lr)

    return make


class IterationRunner:
    """Runs timed training iterations of one model, with or without the per-layer hooks."""

    def __init__(self, settings: ProfileSettings, backend: AnyBackend, device: torch.device) -> None:
        from fieldkube.vision.models import UnknownModelError, build_model, task_of

        if settings.clock not in ("wall", "thread"):
            raise ConfigError(f"--clock {settings.clock!r}: expected wall or thread")
        if settings.clock == "thread" and device.type == "cpu" and torch.get_num_threads() != 1:
            raise ConfigError(
                f"--clock thread: needs one torch thread (--threads 1), not {torch.get_num_threads()}: "
                "other threads' work would be in no row"
            )
        self.settings = settings
        self.backend = backend
        self.device = device
        torch.manual_seed(settings.seed)
        try:
            if settings.model in PROFILE_MODELS:
                self.model: nn.Module = PROFILE_MODELS[settings.model](**settings.params).to(device)
                task = "classifier"
            else:
                self.model = build_model(settings.model, **settings.params).to(device)
                task = task_of(settings.model)
        except UnknownModelError as exc:
            raise ConfigError(f"--model/--param: {exc} (or {', '.join(PROFILE_MODELS)})") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"--param for {settings.model}: {exc}") from None
        self.task = task
        self.loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
        if task == "classifier":
            if settings.loss not in ("auto", "cross_entropy"):
                raise ConfigError(
                    f"--loss {settings.loss!r}: expected auto or cross_entropy for {settings.model}"
                )
            self.loss_name, self.loss_fn = "cross_entropy", nn.functional.cross_entropy
        elif settings.loss not in ("auto", "l2_per_image", "pixel_mse", "bce", "bce_dice"):
            raise ConfigError(
                f"--loss {settings.loss!r}: expected auto, l2_per_image, pixel_mse, bce, bce_dice"
            )
        else:
            self.loss_name, self.loss_fn = resolve_loss(settings.loss, task)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.clock: Clock = clock_for(device, settings.clock)
        factory = _optimizer_factory(settings)
        self.profiler: LayerProfiler | None = None
        if settings.profiling:
            self.profiler = LayerProfiler(self.model, self.clock)
            self.optimizers = per_layer_optimizers(self.model, factory)
            extra = [name for name, _ in self.optimizers if name not in self.profiler.names]
            self.profiler.names.extend(extra)
            self.profiler.kinds.update({name: "Parameters" for name in extra})
        else:
            self.optimizers = [("(all)", factory(self.params))]
        self.batches = synthetic_batches(
            task,
            settings.batch,
            settings.tile,
            4,
            settings.seed + backend.rank,
            device.type == "cuda",
            classes=int(getattr(self.model, "num_classes", 10)),
        )
        self.gradient_bytes = sum(p.numel() * p.element_size() for p in self.params)
        self.model.train()

    def step(self, index: int) -> IterationRecord:
        """One timed iteration: copy, zero_grad, forward, loss, backward, allreduce, optimizer."""
        clock, profiler = self.clock, self.profiler
        host_inputs, host_targets = self.batches[index % len(self.batches)]
        marks = [clock.mark()]
        inputs = host_inputs.to(self.device, non_blocking=True)
        targets = host_targets.to(self.device, non_blocking=True)
        marks.append(clock.mark())
        for _, optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        marks.append(clock.mark())
        with self._functions("between"):
            output = self.model(inputs)
        marks.append(clock.mark())
        with self._functions("loss"):
            loss = self.loss_fn(output.float(), targets)
        marks.append(clock.mark())
        loss.backward()
        marks.append(clock.mark())
        self.backend.average_gradients(self.params)
        marks.append(clock.mark())
        for name, optimizer in self.optimizers:
            if profiler is not None:
                with profiler.optimizer_step(name):
                    optimizer.step()
            else:
                optimizer.step()
        marks.append(clock.mark())
        clock.synchronize()
        phases = {phase: clock.seconds(a, b) for phase, (a, b) in zip(PHASES, pairwise(marks), strict=True)}
        layers = profiler.take(backward=(marks[4], marks[5])) if profiler is not None else None
        return IterationRecord(index, clock.seconds(marks[0], marks[-1]), phases, layers)

    def _functions(self, label: str) -> AbstractContextManager[Any]:
        """Times torch functions outside the layers (profiling on); nothing otherwise."""
        return self.profiler.functions(label) if self.profiler is not None else nullcontext()

    def run(self, iterations: int, warmup: int) -> list[IterationRecord]:
        for index in range(warmup):
            self.step(-warmup + index)
        return [self.step(index) for index in range(iterations)]

    def accounting(self, record: IterationRecord) -> dict[str, float]:
        """The record's accounting rows and shares (profile_report.accounting); profiling must be on."""
        if self.profiler is None or record.layers is None:
            raise TrainerError("accounting needs a profiled iteration (profiling on)")
        groups: dict[str, tuple[float, float, float]] = {}
        for name, times in record.layers.items():
            group = row_group(self.profiler.kinds[name])
            old = groups.get(group, (0.0, 0.0, 0.0))
            groups[group] = (old[0] + times[0], old[1] + times[1], old[2] + times[2])
        return accounting(record.iteration_s, record.phases, groups)

    def close(self) -> None:
        if self.profiler is not None:
            self.profiler.remove()


def write_profile(
    directory: Path,
    settings: ProfileSettings,
    runner: IterationRunner,
    records: list[IterationRecord],
    plots: bool = True,
) -> dict[str, Any]:
    """config.json, iterations.csv and layers.csv of one run, then the derived summary and plots."""
    rank = runner.backend.rank
    config = {
        **asdict(settings),
        "task": runner.task,
        "loss_resolved": runner.loss_name,
        "rank": rank,
        "world_size": runner.backend.size,
        "gradient_bytes": runner.gradient_bytes,
        "backend_resolved": runner.backend.name,
        "device_resolved": str(runner.device),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    write_json_atomic(directory / "config.json", config)
    iteration_rows = [
        {
            "iteration": r.iteration,
            "rank": rank,
            "iteration_s": r.iteration_s,
            **{f"{p}_s": r.phases[p] for p in PHASES},
        }
        for r in records
    ]
    write_csv(directory / "iterations.csv", ITERATION_FIELDS, iteration_rows)
    if runner.profiler is not None:
        kinds = runner.profiler.kinds
        layer_rows = [
            {
                "iteration": r.iteration,
                "rank": rank,
                "layer": name,
                "kind": kinds[name],
                "forward_s": times[0],
                "backward_s": times[1],
                "optimizer_s": times[2],
            }
            for r in records
            for name, times in (r.layers or {}).items()
        ]
        write_csv(directory / "layers.csv", LAYER_FIELDS, layer_rows)
    else:
        (directory / "layers.csv").unlink(missing_ok=True)
    return summarise_directory(directory, plots=plots)


def run_interleaved(
    runners: list[IterationRunner], iterations: int, warmup: int
) -> list[list[IterationRecord]]:
    """Iterations of several runners in turn (one step of each, then the next round), so that load
    changing on a shared machine hits every configuration alike; the records of each runner."""
    for index in range(-warmup, 0):
        for runner in runners:
            runner.step(index)
    records: list[list[IterationRecord]] = [[] for _ in runners]
    for index in range(iterations):
        for runner, kept in zip(runners, records, strict=True):
            kept.append(runner.step(index))
    return records


def run_profile(
    settings: ProfileSettings,
    out: Path,
    repetitions: int,
    plots: bool = True,
    batches: list[int] | None = None,
) -> list[dict[str, Any]]:
    """Profile `repetitions` fresh runs on this rank; returns each repetition's summary. With several
    `batches`, their iterations alternate (run_interleaved) and each batch size writes below
    `<out>/batch-<b>/`, as the predictor's input."""
    env = detect_launch_env()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = pin_device(settings.device, env.local_rank, f"--device {settings.device}")
    if settings.backend not in ("auto", "single", "horovod", "ddp"):
        raise ConfigError(f"--backend {settings.backend!r}: expected auto, single, horovod or ddp")
    backend = create_backend(settings.backend, env, device)  # type: ignore[arg-type]
    sizes = batches or [settings.batch]
    variants = [replace(settings, batch=b) for b in sizes]
    summaries = []
    try:
        for repetition in range(repetitions):
            runners = [IterationRunner(variant, backend, device) for variant in variants]
            began = time.perf_counter()
            all_records = run_interleaved(runners, settings.iterations, settings.warmup)
            seconds = time.perf_counter() - began
            for variant, runner, records in zip(variants, runners, all_records, strict=True):
                runner.close()
                base = out / f"batch-{variant.batch}" if len(sizes) > 1 else out
                directory = base / f"rep-{repetition:03d}" / f"rank-{backend.rank}"
                summary = write_profile(directory, variant, runner, records, plots)
                summary["repetition"] = repetition
                summaries.append(summary)
                shown = (
                    f", layers cover {100 * summary['coverage_mean']:.1f}%, timed rows "
                    f"{100 * summary['accounted_mean']:.1f}%"
                    if variant.profiling and summary.get("coverage_mean") is not None
                    else " (profiling off)"
                )
                log.info(
                    "rep %d rank %d batch %d: %d iterations (%.1fs for all), median %.1f ms%s -> %s",
                    repetition,
                    backend.rank,
                    variant.batch,
                    settings.iterations,
                    seconds,
                    1000 * summary["median_iteration_s"],
                    shown,
                    directory,
                )
            backend.barrier()
    finally:
        backend.shutdown()
    return summaries


def measure_allreduce(
    out: Path, sizes: list[int], repeats: int, warmup: int, device_name: str, backend_name: str
) -> Path | None:
    """Time the gradient allreduce (the backend's own `average_gradients`, as in a profiled iteration)
    for messages of `sizes` bytes; rank 0 writes out/allreduce.csv, the predictor's alpha-beta input."""
    from fieldkube.trainer.profile_predict import ALLREDUCE_FIELDS, ALLREDUCE_FILE

    env = detect_launch_env()
    device = pin_device(device_name, env.local_rank, f"--device {device_name}")
    backend = create_backend(backend_name, env, device)  # type: ignore[arg-type]
    try:
        if backend.size < 2:
            raise ConfigError(
                "allreduce: needs >= 2 ranks; run it under a launcher "
                "(torchrun --nproc-per-node 2 -m fieldkube.trainer.profile allreduce ...)"
            )
        clock = clock_for(device)
        rows: list[dict[str, Any]] = []
        for size in sizes:
            param = nn.Parameter(torch.zeros(max(1, size // 4), device=device))
            param.grad = torch.ones_like(param)
            for repeat in range(-warmup, repeats):
                backend.barrier()
                start = clock.mark()
                backend.average_gradients([param])
                end = clock.mark()
                clock.synchronize()
                if repeat >= 0:
                    seconds = clock.seconds(start, end)
                    rows.append(
                        {
                            "rank": backend.rank,
                            "world_size": backend.size,
                            "backend": backend.name,
                            "bytes": param.numel() * param.element_size(),
                            "repeat": repeat,
                            "seconds": seconds,
                        }
                    )
            if backend.rank == 0:
                nbytes = param.numel() * param.element_size()
                median = sorted(float(r["seconds"]) for r in rows if r["bytes"] == nbytes)[repeats // 2]
                log.info(
                    "allreduce of %d bytes over %d ranks: median %.3f ms", size, backend.size, 1000 * median
                )
        backend.barrier()
        if backend.rank != 0:
            return None
        path = out / ALLREDUCE_FILE
        write_csv(path, ALLREDUCE_FIELDS, rows)
        return path
    finally:
        backend.shutdown()


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(float(part)) for part in text.split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated byte counts (e.g. 4096,1e6), got {text}"
        ) from None
    if not sizes or min(sizes) < 4:
        raise argparse.ArgumentTypeError(f"expected byte counts >= 4, got {text}")
    return sizes


def _batches(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer or a comma-separated list, got {text}"
        ) from None
    if not values or min(values) < 1 or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct integers >= 1, got {text}")
    return values


def _params(values: list[str]) -> dict[str, Any]:
    from fieldkube.contract.config import parse_value

    params: dict[str, Any] = {}
    for text in values:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param {text!r}: expected name=value (e.g. base_channels=32)")
        params[key] = parse_value(value)
    return params


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fieldkube-profile", description="Per-layer forward/backward/optimizer time of training."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train a few iterations and record per-layer times")
    run.add_argument("--out", type=Path, required=True, help="output root (rep-<k>/rank-<r>/ below it)")
    run.add_argument(
        "--model",
        default="counter-mcnn",
        help="counter-mcnn, counter-fcrn, segmenter-unet or vgg11 (seed 001)",
    )
    run.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="model parameter")
    run.add_argument("--tile", type=_positive, default=224, help="input height = width (pixels)")
    run.add_argument(
        "--batch",
        type=_batches,
        default=[8],
        help="images per rank per iteration; several (e.g. 1,2,4,8) alternate iterations, one "
        "directory each (batch-<b>/), as input for `predict`",
    )
    run.add_argument("--iterations", type=_positive, default=20, help="recorded iterations")
    run.add_argument("--warmup", type=int, default=3, help="iterations run before recording")
    run.add_argument("--repetitions", type=_positive, default=1, help="fresh runs, one directory each")
    run.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    run.add_argument("--lr", type=float, default=1e-4)
    run.add_argument("--loss", default="auto", help="auto (the seed loss), l2_per_image, pixel_mse, bce, ...")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--threads", type=_positive, default=None, help="torch CPU threads per process")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    run.add_argument("--backend", choices=["auto", "single", "horovod", "ddp"], default="auto")
    run.add_argument(
        "--clock",
        choices=["wall", "thread"],
        default="wall",
        help="CPU: wall time (default) or the training thread's CPU time (--threads 1; "
        "leaves out time other processes take on a shared machine). GPU: CUDA events either way",
    )
    run.add_argument(
        "--profiling",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="per-layer hooks on (default) or off (only iteration and phase times: the overhead baseline)",
    )
    run.add_argument("--no-plots", action="store_true", help="only the CSV files (parse draws them later)")
    parse = sub.add_parser("parse", help="re-derive totals, summaries, plots and overview.csv from CSVs")
    parse.add_argument("directory", type=Path, help="a profile output root")
    parse.add_argument("--no-plots", action="store_true", help="only the CSV files")
    allreduce = sub.add_parser(
        "allreduce", help="time the gradient allreduce against message size (under a launcher, >= 2 ranks)"
    )
    allreduce.add_argument("--out", type=Path, required=True, help="directory for allreduce.csv")
    allreduce.add_argument(
        "--sizes",
        type=_sizes,
        default=[4096, 65536, 262144, 1048576, 4194304, 16777216],
        help="message sizes in bytes, comma-separated",
    )
    allreduce.add_argument("--repeats", type=_positive, default=10, help="timed allreduces per size")
    allreduce.add_argument("--warmup", type=int, default=2, help="untimed allreduces per size first")
    allreduce.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    allreduce.add_argument("--backend", choices=["auto", "horovod", "ddp"], default="auto")
    allreduce.add_argument("--threads", type=_positive, default=None, help="torch CPU threads per process")
    predict = sub.add_parser(
        "predict", help="predict the iteration time of a batch size and worker count from profiles"
    )
    predict.add_argument("directories", type=Path, nargs="+", help="profile output roots (and allreduce.csv)")
    predict.add_argument("--batch", type=_positive, required=True, help="images per worker per iteration")
    predict.add_argument("--workers", type=_positive, default=1, help="data-parallel workers")
    predict.add_argument("--model", default=None, help="which model, when the profiles hold several")
    predict.add_argument("--tile", type=_positive, default=None, help="which tile size, when several")
    predict.add_argument(
        "--fit-batches",
        type=_batches,
        default=None,
        help="fit only on these batch sizes (default: all others)",
    )
    predict.add_argument("--json", type=Path, default=None, help="also write the prediction as JSON")
    predict.add_argument(
        "--plot", type=Path, default=None, help="also draw it against the fitted profiles (PNG)"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    args = _parser().parse_args(argv)
    try:
        if args.command == "parse":
            rows = aggregate(args.directory, plots=not args.no_plots)
            for row in rows:
                coverage, accounted = row.get("coverage_mean"), row.get("accounted_mean")
                shown = f", layers cover {100 * coverage:.1f}%" if isinstance(coverage, float) else ""
                if isinstance(accounted, float):
                    shown += f", timed rows {100 * accounted:.1f}%"
                print(f"{row['directory']}: {row['mean_iteration_s'] * 1000:.2f} ms/iteration{shown}")
            print(f"wrote {args.directory / 'overview.csv'}")
            return
        if args.command == "predict":
            from fieldkube.trainer.profile_predict import describe, plot_predictions, predict

            prediction = predict(
                args.directories, args.batch, args.workers, args.model, args.tile, args.fit_batches
            )
            print("\n".join(describe(prediction)))
            if args.json is not None:
                write_json_atomic(args.json, prediction.as_dict())
            if args.plot is not None:
                print(f"wrote {plot_predictions([prediction], args.plot)}")
            return
        if args.warmup < 0:
            raise ConfigError(f"--warmup {args.warmup}: expected >= 0")
        if args.command == "allreduce":
            if args.threads:
                torch.set_num_threads(args.threads)
            path = measure_allreduce(
                args.out, args.sizes, args.repeats, args.warmup, args.device, args.backend
            )
            if path is not None:
                print(f"wrote {path}")
            return
        settings = ProfileSettings(
            model=args.model,
            params=_params(args.param),
            tile=args.tile,
            batch=args.batch[0],
            iterations=args.iterations,
            warmup=args.warmup,
            optimizer=args.optimizer,
            lr=args.lr,
            loss=args.loss,
            seed=args.seed,
            threads=args.threads,
            device=args.device,
            backend=args.backend,
            profiling=args.profiling,
            clock=args.clock,
        )
        run_profile(settings, args.out, args.repetitions, plots=not args.no_plots, batches=args.batch)
    except TrainerError as exc:
        print(f"fieldkube-profile: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
