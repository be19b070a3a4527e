"""Profile files of `fieldkube-profile`: the raw CSVs, and the summary and plots derived from them.

A profile directory (one per repetition and rank) holds what was measured, nothing derived:

    config.json       the settings of the run (model, tile, batch, world size, device, profiling on/off,
                      gradient bytes)
    layers.csv        iteration, rank, layer, kind, forward_s, backward_s, optimizer_s   (profiling on);
                      besides the layers, rows of kind `between` (torch functions run outside every
                      layer, e.g. `between:interpolate`) and `loss` (the loss's functions)
    iterations.csv    iteration, rank, iteration_s and one column per phase (data, zero_grad, forward,
                      loss, backward, allreduce, optimizer); the phases tile the iteration exactly

and what `summarise_directory` derives from them (also the re-parse subcommand, so the figures can be
rebuilt or changed without training again):

    totals.csv        per iteration: the accounting of the iteration (ACCOUNT_ROWS below, which sum to
                      iteration_s exactly), coverage (layer sum / iteration, seed 001's figure), its
                      percentage error, and `accounted` (the named rows without the gaps / iteration)
    summary.csv       the config, total time, time and missing time at 25/50/75/100 % of iterations,
                      mean coverage, accounted share and error, mean of each accounting row, images/s
    layers.png, iterations.png, error.png

The accounting: an iteration is its phases; inside forward, backward and optimizer, the layers' and the
functions' own marks leave gaps (the autograd engine between nodes, gradient accumulation, hook and loop
overhead), which are rows of their own (`gap_*`), so what no timer brackets is shown, not hidden.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from fieldkube.trainer.errors import DataError

PHASES = ("data", "zero_grad", "forward", "loss", "backward", "allreduce", "optimizer")
LAYER_FIELDS = ["iteration", "rank", "layer", "kind", "forward_s", "backward_s", "optimizer_s"]
ITERATION_FIELDS = ["iteration", "rank", "iteration_s", *(f"{p}_s" for p in PHASES)]
# Rows that sum to the iteration: layers, functions between them, the loss (its phase and its backward),
# the named phases, the profiler's own bookkeeping, and the gaps no timer brackets inside forward,
# backward and the optimizer phase.
NAMED_ROWS = (
    "layers_total_s",
    "between_s",
    "loss_s",
    "data_s",
    "zero_grad_s",
    "allreduce_s",
    "autograd_s",
    "profiler_s",
)
GAP_ROWS = ("gap_forward_s", "gap_backward_s", "gap_optimizer_s")
ACCOUNT_ROWS = (*NAMED_ROWS, *GAP_ROWS)
FUNCTION_KINDS = ("between", "loss", "profiler", "autograd")
TOTAL_FIELDS = [
    "iteration",
    "rank",
    "iteration_s",
    "layers_forward_s",
    "layers_backward_s",
    "layers_optimizer_s",
    "between_forward_s",
    "between_backward_s",
    "loss_backward_s",
    *ACCOUNT_ROWS,
    "unattributed_s",
    "coverage",
    "error_percent",
    "accounted",
]
MARKS = (25, 50, 75, 100)


def write_csv(path: Path, fields: list[str], rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k)) for k in fields})
    tmp.replace(path)


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.9g}"
    return "" if value is None else value


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise DataError(f"{path}: profile file not found")
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _float(row: dict[str, str], key: str, path: Path) -> float:
    try:
        return float(row[key])
    except (KeyError, ValueError):
        raise DataError(f"{path}: column {key!r} missing or not a number in row {row}") from None


def accounting(
    iteration_s: float, phases: dict[str, float], groups: dict[str, tuple[float, float, float]]
) -> dict[str, float]:
    """One iteration's ACCOUNT_ROWS (they sum to `iteration_s`) and shares, from its phase times and the
    (forward, backward, optimizer) sums of its rows per group: `layer`, `between`, `loss`, `profiler`,
    `autograd` (the backward pass's start and end)."""
    zero = (0.0, 0.0, 0.0)
    forward, backward, optimizer = groups.get("layer", zero)
    between_forward, between_backward, _ = groups.get("between", zero)
    loss_backward = groups.get("loss", zero)[1]
    bookkeeping = groups.get("profiler", zero)[0]
    autograd = groups.get("autograd", zero)[1]
    layer_sum = forward + backward + optimizer
    out = {
        "layers_forward_s": forward,
        "layers_backward_s": backward,
        "layers_optimizer_s": optimizer,
        "between_forward_s": between_forward,
        "between_backward_s": between_backward,
        "loss_backward_s": loss_backward,
        "layers_total_s": layer_sum,
        "between_s": between_forward + between_backward,
        "loss_s": phases["loss"] + loss_backward,
        "data_s": phases["data"],
        "zero_grad_s": phases["zero_grad"],
        "allreduce_s": phases["allreduce"],
        "autograd_s": autograd,
        "profiler_s": bookkeeping,
        "gap_forward_s": phases["forward"] - forward - between_forward - bookkeeping,
        "gap_backward_s": phases["backward"] - backward - between_backward - loss_backward - autograd,
        "gap_optimizer_s": phases["optimizer"] - optimizer,
    }
    named = sum(out[key] for key in NAMED_ROWS)
    positive = iteration_s > 0
    out["unattributed_s"] = iteration_s - named
    out["coverage"] = layer_sum / iteration_s if positive else math.nan
    out["error_percent"] = 100.0 * (iteration_s - layer_sum) / iteration_s if positive else math.nan
    out["accounted"] = named / iteration_s if positive else math.nan
    return out


def row_group(kind: str) -> str:
    """The accounting group of a layers.csv row: its kind when a function/profiler kind, else `layer`."""
    return kind if kind in FUNCTION_KINDS else "layer"


def per_iteration_totals(directory: Path) -> list[dict[str, Any]]:
    """iterations.csv joined with the per-iteration sums of layers.csv (when profiled): the accounting."""
    iterations_path = directory / "iterations.csv"
    iterations = read_csv(iterations_path)
    layers_path = directory / "layers.csv"
    sums: dict[int, dict[str, list[float]]] = defaultdict(dict)
    profiled = layers_path.is_file()
    if profiled:
        for row in read_csv(layers_path):
            acc = sums[int(row["iteration"])].setdefault(row_group(row["kind"]), [0.0, 0.0, 0.0])
            for i, key in enumerate(("forward_s", "backward_s", "optimizer_s")):
                acc[i] += _float(row, key, layers_path)
    totals = []
    for row in iterations:
        iteration = int(row["iteration"])
        total = _float(row, "iteration_s", iterations_path)
        out: dict[str, Any] = {"iteration": iteration, "rank": int(row["rank"]), "iteration_s": total}
        if profiled:
            phases = {p: _float(row, f"{p}_s", iterations_path) for p in PHASES}
            groups = {group: (f, b, o) for group, (f, b, o) in sums[iteration].items()}
            out.update(accounting(total, phases, groups))
        totals.append(out)
    return totals


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def summarise_directory(directory: Path, plots: bool = True) -> dict[str, Any]:
    """Write totals.csv, summary.csv (and the plots) of one profile directory; returns the summary."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise DataError(f"{config_path}: not found (not a fieldkube-profile output directory)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    totals = per_iteration_totals(directory)
    if not totals:
        raise DataError(f"{directory / 'iterations.csv'}: no iterations recorded")
    write_csv(directory / "totals.csv", TOTAL_FIELDS, totals)
    times = [t["iteration_s"] for t in totals]
    summary: dict[str, Any] = dict(config)
    summary["recorded_iterations"] = len(totals)
    summary["total_s"] = sum(times)
    summary["mean_iteration_s"] = _mean(times)
    summary["median_iteration_s"] = sorted(times)[len(times) // 2]
    summary["images_per_second"] = config["batch"] * len(times) / sum(times) if sum(times) > 0 else math.nan
    profiled = "coverage" in totals[0]
    for mark in MARKS:
        upto = max(1, math.ceil(len(totals) * mark / 100))
        summary[f"time_at_{mark}pct_s"] = sum(times[:upto])
        if profiled:
            summary[f"missing_at_{mark}pct_s"] = sum(t["unattributed_s"] for t in totals[:upto])
    if profiled:
        for key in ("layers_forward_s", "layers_backward_s", "layers_optimizer_s", "layers_total_s"):
            summary[f"mean_{key}"] = _mean([t[key] for t in totals])
        for key in ACCOUNT_ROWS:
            summary[f"mean_{key}"] = _mean([t[key] for t in totals])
        summary["coverage_mean"] = _mean([t["coverage"] for t in totals])
        summary["accounted_mean"] = _mean([t["accounted"] for t in totals])
        summary["accounted_min"] = min(t["accounted"] for t in totals)
        errors = [t["error_percent"] for t in totals]
        summary["error_percent_mean"] = _mean(errors)
        summary["error_percent_min"] = min(errors)
        summary["error_percent_max"] = max(errors)
    phases = read_csv(directory / "iterations.csv")
    for phase in PHASES:
        summary[f"mean_{phase}_s"] = _mean([float(r[f"{phase}_s"]) for r in phases])
    rows = [
        {"key": k, "value": json.dumps(v) if isinstance(v, dict | list) else v} for k, v in summary.items()
    ]
    write_csv(directory / "summary.csv", ["key", "value"], rows)
    if plots:
        plot_directory(directory, totals)
    return summary


def layer_means(directory: Path) -> list[dict[str, Any]]:
    """Mean forward/backward/optimizer seconds per layer over the recorded iterations, in layer order."""
    path = directory / "layers.csv"
    rows = read_csv(path)
    order: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = order.setdefault(
            row["layer"], {"layer": row["layer"], "kind": row["kind"], "n": 0, "f": 0.0, "b": 0.0, "o": 0.0}
        )
        entry["n"] += 1
        entry["f"] += _float(row, "forward_s", path)
        entry["b"] += _float(row, "backward_s", path)
        entry["o"] += _float(row, "optimizer_s", path)
    return [
        {
            "layer": e["layer"],
            "kind": e["kind"],
            "forward_s": e["f"] / e["n"],
            "backward_s": e["b"] / e["n"],
            "optimizer_s": e["o"] / e["n"],
        }
        for e in order.values()
    ]


def plot_directory(directory: Path, totals: list[dict[str, Any]]) -> list[Path]:
    """iterations.png (iteration time vs layer sum and all timed rows), error.png (% not in a layer),
    layers.png (fwd/bwd/opt)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    x = [t["iteration"] for t in totals]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(x, [1000 * t["iteration_s"] for t in totals], label="measured iteration")
    if "layers_total_s" in totals[0]:
        ax.plot(x, [1000 * t["layers_total_s"] for t in totals], label="sum of profiled layers")
        timed = [1000 * (t["iteration_s"] - sum(t[key] for key in GAP_ROWS)) for t in totals]
        ax.plot(x, timed, linestyle="--", label="all timed rows (layers, functions, loss, phases)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("ms")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title("Iteration time vs sum of per-layer times and of all timed rows")
    fig.tight_layout()
    written.append(directory / "iterations.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    if "error_percent" not in totals[0]:
        return written

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(x, [t["error_percent"] for t in totals], color="#a33")
    ax.set_xlabel("iteration")
    ax.set_ylabel("% of iteration not in a layer")
    ax.set_ylim(bottom=0)
    ax.set_title("Percentage error of the per-layer sum")
    fig.tight_layout()
    written.append(directory / "error.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    means = layer_means(directory)
    height = max(3.0, 0.22 * len(means) + 1)
    fig, ax = plt.subplots(figsize=(8, height))
    names = [m["layer"] for m in means]
    positions = list(range(len(means)))
    forward = [1000 * m["forward_s"] for m in means]
    backward = [1000 * m["backward_s"] for m in means]
    optimizer = [1000 * m["optimizer_s"] for m in means]
    ax.barh(positions, forward, label="forward", color="#27a")
    ax.barh(positions, backward, left=forward, label="backward", color="#a72")
    ax.barh(
        positions,
        optimizer,
        left=[f + b for f, b in zip(forward, backward, strict=True)],
        label="optimizer",
        color="#2a7",
    )
    ax.set_yticks(positions, names, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("mean ms per iteration")
    ax.legend()
    ax.set_title("Per-layer forward / backward / optimizer time")
    fig.tight_layout()
    written.append(directory / "layers.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    return written


def profile_directories(root: Path) -> list[Path]:
    """Every directory under `root` (itself included) that holds a profile (config.json + iterations.csv)."""
    if not root.is_dir():
        raise DataError(f"{root}: directory not found")
    found = [p.parent for p in sorted(root.rglob("iterations.csv")) if (p.parent / "config.json").is_file()]
    if not found:
        raise DataError(f"{root}: no fieldkube-profile output (config.json + iterations.csv) found")
    return found


def aggregate(root: Path, plots: bool = True) -> list[dict[str, Any]]:
    """Re-derive every profile under `root` and write root/overview.csv: one row per repetition and rank."""
    keys = [
        "directory",
        "repetition",
        "rank",
        "profiling",
        "world_size",
        "recorded_iterations",
        "total_s",
        "mean_iteration_s",
        "images_per_second",
        "coverage_mean",
        "accounted_mean",
        "error_percent_mean",
    ]
    rows = []
    for directory in profile_directories(root):
        summary = summarise_directory(directory, plots=plots)
        row = {k: summary.get(k) for k in keys}
        row["directory"] = str(directory.relative_to(root)) or "."
        rows.append(row)
    write_csv(root / "overview.csv", keys, rows)
    return rows
