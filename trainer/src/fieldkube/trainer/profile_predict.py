"""Iteration time of a batch size and worker count not measured, from `fieldkube-profile` output.

Seed 001 left this as future work. The model is deliberately simple, so every figure can be traced back:

- Compute: each row of the accounting (every layer's forward, backward and optimizer time, each
  function between layers, the loss, zero_grad, data copy, the profiler's bookkeeping and the gaps) is
  fitted as `a + b * batch` by least squares over single-worker profiles at other batch sizes. Per-sample
  work (convolutions, activations, their gradients) grows with the batch; per-iteration work (the
  optimizer update, zero_grad, Python and launch overhead) does not, and lands in the intercept. The rows
  sum to the iteration exactly, so the prediction is the sum of the rows' predictions and the breakdown
  says which layers the time goes to. A linear fit predicts best inside or near the fitted range: on a
  GPU, small batches that do not fill the device bend the curve (fit on the sizes you will use).
- Communication: each data-parallel step adds one allreduce of all gradients (`fieldkube-profile` times
  it as its own phase, without overlap). Its cost is the alpha-beta model of a ring allreduce over `w`
  workers, `2 (w - 1) alpha + 2 (w - 1) / w * bytes * beta`, with alpha (per-message latency) and beta
  (seconds per byte) fitted by least squares to `fieldkube-profile allreduce` measurements at several
  message sizes; one worker needs none. Each worker is assumed to have its own compute (a GPU, or its
  own cores), so its compute time is that of one worker at the same per-worker batch.

Each row is the median over a run's iterations (robust to the odd slow iteration on a shared machine),
scaled so that the rows of a run sum to its median iteration.
The configuration predicted is held out of the fit: profiles at the requested batch size are not used for
the compute rows, so a measurement at that configuration, when present, gives an honest error.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fieldkube.trainer.errors import ConfigError, DataError
from fieldkube.trainer.profile_report import (
    ACCOUNT_ROWS,
    FUNCTION_KINDS,
    _float,
    per_iteration_totals,
    profile_directories,
    read_csv,
)

ALLREDUCE_FILE = "allreduce.csv"
ALLREDUCE_FIELDS = ["rank", "world_size", "backend", "bytes", "repeat", "seconds"]
# Accounting rows fitted besides the per-layer rows (their sum is layers_total_s); allreduce: alpha-beta.
PHASE_ROWS = tuple(r for r in ACCOUNT_ROWS if r not in ("layers_total_s", "allreduce_s"))


@dataclass
class ProfileRun:
    """One profile directory, reduced to per-row medians (seconds per iteration)."""

    directory: Path
    model: str
    tile: int
    params: str
    batch: int
    world_size: int
    profiling: bool
    gradient_bytes: int | None
    iteration_s: list[float]
    rows: dict[str, float] = field(default_factory=dict)


def load_run(directory: Path) -> ProfileRun:
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    totals = per_iteration_totals(directory)
    if not totals:
        raise DataError(f"{directory / 'iterations.csv'}: no iterations recorded")
    run = ProfileRun(
        directory=directory,
        model=str(config["model"]),
        tile=int(config["tile"]),
        params=json.dumps(config.get("params", {}), sort_keys=True),
        batch=int(config["batch"]),
        world_size=int(config.get("world_size", 1)),
        profiling=bool(config.get("profiling", True)),
        gradient_bytes=config.get("gradient_bytes"),
        iteration_s=[float(t["iteration_s"]) for t in totals],
    )
    if run.profiling and (directory / "layers.csv").is_file():
        per_row: dict[str, list[float]] = defaultdict(list)
        path = directory / "layers.csv"
        for row in read_csv(path):
            if row["kind"] in FUNCTION_KINDS:
                continue  # in the accounting's between/loss/autograd/profiler rows below
            for part in ("forward", "backward", "optimizer"):
                per_row[f"{row['layer']}/{part}"].append(_float(row, f"{part}_s", path))
        for key in PHASE_ROWS:
            per_row[key] = [float(t[key]) for t in totals]
        medians = {key: statistics.median(values) for key, values in per_row.items()}
        # A sum of medians falls short of the median sum (timing noise is skewed upwards): the medians
        # give each row's share, the median iteration (without its allreduce) their total.
        level = statistics.median(float(t["iteration_s"]) - float(t["allreduce_s"]) for t in totals)
        scale = level / sum(medians.values()) if sum(medians.values()) > 0 else 1.0
        run.rows = {key: value * scale for key, value in medians.items()}
    return run


def load_runs(roots: list[Path]) -> list[ProfileRun]:
    """Every profile under the roots (a root may hold only allreduce.csv)."""
    for root in roots:
        if not root.is_dir():
            raise DataError(f"{root}: directory not found")
    directories = [p.parent for root in roots for p in sorted(root.rglob("config.json"))]
    directories = [d for d in directories if (d / "iterations.csv").is_file()]
    if not directories:
        profile_directories(roots[0])  # raises the error that names what is missing
    return [load_run(directory) for directory in directories]


@dataclass
class LinearRow:
    name: str
    intercept: float
    slope: float

    def at(self, batch: float) -> float:
        return self.intercept + self.slope * batch


def fit_rows(runs: list[ProfileRun]) -> list[LinearRow]:
    """Least-squares `a + b * batch` for every row, over the runs (one point per run)."""
    batches = np.array([run.batch for run in runs], dtype=float)
    design = np.stack([np.ones_like(batches), batches], axis=1)
    names = sorted({name for run in runs for name in run.rows})
    fitted = []
    for name in names:
        values = np.array([run.rows.get(name, 0.0) for run in runs])
        (intercept, slope), *_ = np.linalg.lstsq(design, values, rcond=None)
        fitted.append(LinearRow(name, float(intercept), float(slope)))
    return fitted


@dataclass
class AlphaBeta:
    """Ring allreduce cost: 2 (w-1) alpha + 2 (w-1)/w * bytes * beta (seconds)."""

    alpha_s: float
    beta_s_per_byte: float
    points: int
    world_sizes: list[int]

    def seconds(self, message_bytes: float, workers: int) -> float:
        if workers <= 1:
            return 0.0
        steps = 2 * (workers - 1)
        return steps * self.alpha_s + steps / workers * message_bytes * self.beta_s_per_byte


def read_allreduce(roots: list[Path]) -> list[tuple[int, int, float]]:
    """(world size, bytes, median seconds) per measured size, from every allreduce.csv under the roots."""
    samples: dict[tuple[int, int], list[float]] = defaultdict(list)
    for root in roots:
        for path in sorted(root.rglob(ALLREDUCE_FILE)):
            for row in read_csv(path):
                key = (int(row["world_size"]), int(row["bytes"]))
                samples[key].append(_float(row, "seconds", path))
    return [(w, b, statistics.median(s)) for (w, b), s in sorted(samples.items())]


def fit_alpha_beta(points: list[tuple[int, int, float]]) -> AlphaBeta:
    """Least squares of the ring model over (world size, bytes, seconds); negative terms clamp to 0."""
    usable = [(w, b, s) for w, b, s in points if w > 1]
    if len({(w, b) for w, b, _ in usable}) < 2:
        raise DataError(
            "allreduce model: need measurements at >= 2 message sizes with >= 2 workers "
            "(run `fieldkube-profile allreduce` under a launcher)"
        )
    design = np.array([[2 * (w - 1), 2 * (w - 1) / w * b] for w, b, _ in usable], dtype=float)
    seconds = np.array([s for _, _, s in usable])
    # Relative least squares: each size counts alike, not only the largest messages.
    weights = 1.0 / seconds
    (alpha, beta), *_ = np.linalg.lstsq(design * weights[:, None], seconds * weights, rcond=None)
    return AlphaBeta(
        max(0.0, float(alpha)), max(0.0, float(beta)), len(usable), sorted({w for w, _, _ in usable})
    )


@dataclass
class Prediction:
    """One configuration's predicted iteration (per-row breakdown), and the measurement when one exists."""

    model: str
    tile: int
    batch: int
    workers: int
    compute_s: float
    allreduce_s: float
    rows: dict[str, float]
    fitted_batches: list[int]
    alpha_beta: AlphaBeta | None
    gradient_bytes: int | None
    measured_s: float | None = None
    measured_iterations: int = 0
    measured_runs: int = 0
    fit_points: list[tuple[int, float]] = field(default_factory=list)  # (batch, median iteration) fitted on

    @property
    def iteration_s(self) -> float:
        return self.compute_s + self.allreduce_s

    @property
    def error_percent(self) -> float | None:
        if self.measured_s is None:
            return None
        return 100.0 * (self.iteration_s - self.measured_s) / self.measured_s

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "tile": self.tile,
            "batch": self.batch,
            "workers": self.workers,
            "predicted_ms": round(1000 * self.iteration_s, 3),
            "compute_ms": round(1000 * self.compute_s, 3),
            "allreduce_ms": round(1000 * self.allreduce_s, 3),
            "measured_ms": None if self.measured_s is None else round(1000 * self.measured_s, 3),
            "error_percent": None if self.error_percent is None else round(self.error_percent, 2),
            "measured_iterations": self.measured_iterations,
            "fitted_batches": self.fitted_batches,
            "gradient_bytes": self.gradient_bytes,
            "alpha_us": None if self.alpha_beta is None else round(1e6 * self.alpha_beta.alpha_s, 3),
            "beta_ns_per_byte": None
            if self.alpha_beta is None
            else round(1e9 * self.alpha_beta.beta_s_per_byte, 5),
        }


def _select(runs: list[ProfileRun], model: str | None, tile: int | None) -> tuple[str, int, str]:
    keys = {(r.model, r.tile, r.params) for r in runs if r.profiling}
    keys = {k for k in keys if (model is None or k[0] == model) and (tile is None or k[1] == tile)}
    if not keys:
        raise DataError(
            f"no profiled runs{f' of {model}' if model else ''}{f' at tile {tile}' if tile else ''}"
        )
    if len(keys) > 1:
        shown = ", ".join(f"{m} tile {t} params {p}" for m, t, p in sorted(keys))
        raise ConfigError(f"--model/--tile: the profiles hold several configurations ({shown}); pick one")
    return next(iter(keys))


def predict(
    roots: list[Path],
    batch: int,
    workers: int,
    model: str | None = None,
    tile: int | None = None,
    fit_batches: list[int] | None = None,
) -> Prediction:
    """Fit on the profiles under `roots` (the requested batch size held out; only `fit_batches` when
    given) and predict one configuration."""
    if batch < 1:
        raise ConfigError(f"--batch {batch}: expected an integer >= 1")
    if workers < 1:
        raise ConfigError(f"--workers {workers}: expected an integer >= 1")
    runs = load_runs(roots)
    chosen = _select(runs, model, tile)
    same = [r for r in runs if (r.model, r.tile, r.params) == chosen]
    fit_on = [r for r in same if r.profiling and r.world_size == 1 and r.batch != batch and r.rows]
    if fit_batches:
        fit_on = [r for r in fit_on if r.batch in fit_batches]
    fitted_batches = sorted({r.batch for r in fit_on})
    if len(fitted_batches) < 2:
        raise DataError(
            f"--batch {batch}: need single-worker profiles of {chosen[0]} at >= 2 other batch sizes "
            f"(found {fitted_batches or 'none'})"
        )
    fitted = fit_rows(fit_on)
    rows = {row.name: row.at(batch) for row in fitted}
    gradient_bytes = next((r.gradient_bytes for r in same if r.gradient_bytes is not None), None)
    alpha_beta = None
    allreduce_s = 0.0
    if workers > 1:
        if gradient_bytes is None:
            raise DataError(
                "the profiles record no gradient_bytes (profiled before it was recorded): re-run them"
            )
        alpha_beta = fit_alpha_beta(read_allreduce(roots))
        allreduce_s = alpha_beta.seconds(gradient_bytes, workers)
    prediction = Prediction(
        model=chosen[0],
        tile=chosen[1],
        batch=batch,
        workers=workers,
        compute_s=sum(rows.values()),
        allreduce_s=allreduce_s,
        rows=rows,
        fitted_batches=fitted_batches,
        alpha_beta=alpha_beta,
        gradient_bytes=gradient_bytes,
        fit_points=[(r.batch, sum(r.rows.values())) for r in fit_on],
    )
    measured = [r for r in same if r.batch == batch and r.world_size == workers]
    # Compare like with like: profiled runs when there are any (the fit is of profiled iterations).
    measured = [r for r in measured if r.profiling] or measured
    if measured:
        times = [t for r in measured for t in r.iteration_s]
        prediction.measured_s = statistics.median(times)
        prediction.measured_iterations = len(times)
        prediction.measured_runs = len(measured)
    return prediction


def describe(prediction: Prediction, top: int = 5) -> list[str]:
    """The printed report: prediction, its parts, the heaviest layers and, when measured, the error."""
    p = prediction
    rows = p.rows
    layers = {k: v for k, v in rows.items() if "/" in k}
    by_layer: dict[str, float] = defaultdict(float)
    for key, value in layers.items():
        by_layer[key.rsplit("/", 1)[0]] += value
    ms = 1000.0
    lines = [
        f"{p.model}, tile {p.tile}, batch {p.batch} per worker, {p.workers} worker(s): "
        f"predicted {ms * p.iteration_s:.2f} ms/iteration",
        f"  fitted on single-worker profiles at batch {', '.join(map(str, p.fitted_batches))} "
        f"(each row linear in batch, least squares)",
        f"  compute {ms * p.compute_s:.2f} ms: layers {ms * sum(layers.values()):.2f}, "
        + ", ".join(f"{k.removesuffix('_s')} {ms * rows.get(k, 0.0):.2f}" for k in PHASE_ROWS),
    ]
    heaviest = sorted(by_layer.items(), key=lambda item: -item[1])[:top]
    lines.append("  heaviest layers: " + ", ".join(f"{name} {ms * value:.2f}" for name, value in heaviest))
    if p.alpha_beta is not None:
        ab = p.alpha_beta
        lines.append(
            f"  allreduce {ms * p.allreduce_s:.2f} ms: {p.gradient_bytes} gradient bytes, alpha "
            f"{1e6 * ab.alpha_s:.1f} us, beta {1e9 * ab.beta_s_per_byte:.3f} ns/byte "
            f"(fitted on {ab.points} sizes at {', '.join(map(str, ab.world_sizes))} workers)"
        )
    if p.measured_s is not None and p.error_percent is not None:
        lines.append(
            f"  measured {ms * p.measured_s:.2f} ms (median of {p.measured_iterations} iterations, "
            f"{p.measured_runs} run(s)): error {p.error_percent:+.1f} %"
        )
    else:
        lines.append("  no measurement of this configuration under the given directories")
    return lines


def plot_predictions(predictions: list[Prediction], path: Path) -> Path:
    """Iteration time against batch size: the points fitted on, the fitted line, and each prediction with
    its measurement (one colour per worker count)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    first = predictions[0]
    xs = [b for b, _ in first.fit_points]
    ax.scatter(
        xs, [1000 * t for _, t in first.fit_points], color="#555", label="profiled (fitted on), 1 worker"
    )
    top = max([*xs, *(p.batch for p in predictions)])
    if len(first.fit_points) >= 2:
        design = np.stack([np.ones(len(xs)), np.array(xs, dtype=float)], axis=1)
        (a, b), *_ = np.linalg.lstsq(design, np.array([t for _, t in first.fit_points]), rcond=None)
        line = np.linspace(0, top * 1.05, 50)
        ax.plot(line, 1000 * (a + b * line), color="#999", linestyle=":", label="fit: a + b * batch")
    colours = {1: "#27a", 2: "#a33", 4: "#2a7", 8: "#a72"}
    for p in predictions:
        colour = colours.get(p.workers, "#333")
        ax.scatter([p.batch], [1000 * p.iteration_s], marker="x", s=60, color=colour)
        if p.measured_s is not None:
            ax.scatter(
                [p.batch], [1000 * p.measured_s], marker="o", facecolors="none", s=60, edgecolors=colour
            )
            offset = (6, -12 if p.workers > 1 else 6)
            where = (p.batch, 1000 * p.iteration_s)
            label = f"{p.error_percent:+.1f}%"
            ax.annotate(label, where, textcoords="offset points", xytext=offset, fontsize=8, color=colour)
    for workers in sorted({p.workers for p in predictions}):
        colour = colours.get(workers, "#333")
        ax.scatter([], [], marker="x", color=colour, label=f"predicted, {workers} worker(s)")
        ax.scatter(
            [], [], marker="o", facecolors="none", edgecolors=colour, label=f"measured, {workers} worker(s)"
        )
    ax.set_xlabel("batch per worker")
    ax.set_ylabel("ms per iteration")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.set_title(
        f"{first.model}, {first.tile} px: held-out configurations, predicted vs measured", fontsize=10
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
