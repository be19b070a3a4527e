"""Accuracy benchmark on held-out synthetic data: CNN counter vs the classical counter, U-Net vs seed 004.

One run, side by side:
  - counter: `fieldkube-train` trains a counter on synthetic field images (seed --train-seed) once per
    output activation in --counter-heads (model parameter `head`) and training seed in --seeds; each CNN
    and the seed-000 classical counter (Lab + sigmoid + Determinant-of-Hessian) then count the same
    held-out tiles (images drawn with --eval-seed, never seen in training): MAE overall, per seed-000
    count bin and per hazard (glare, dust, shadow, none), averaged over seeds, and the tiles each head
    counted below zero;
  - segmenter: `fieldkube-train` trains the U-Net on synthetic aerial scenes; pixel accuracy and IoU on
    held-out scenes, next to the seed's 0.95 / 0.66 (measured there on Inria, not on these scenes).
The training budget (model, tiles, epochs, steps, seconds) is written with the figures, because on a
shared 2-core CPU it is what limits the accuracy reached. Writes JSON (--out) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

BIN = Path(sys.executable).parent
SEED_SEGMENTER = {"iou": 0.66, "pixel_accuracy": 0.95}


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = str(threads)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _prepare(kind: str, out: Path, images: int, size: str, tile: int, seed: int, split: str) -> None:
    cmd = [str(BIN / "fieldkube-prepare"), "--synthetic", kind, "--num-images", str(images), "--image-size",
           size, "--tile", str(tile), "--seed", str(seed), "--split", split, "--no-balance", "--workers", "2",
           "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(1), check=False)
    if proc.returncode != 0:
        sys.exit(f"prepare failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")


def _train(config: dict[str, Any], workdir: Path, threads: int) -> dict[str, Any]:
    path = workdir / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    began = time.perf_counter()
    proc = subprocess.run([str(BIN / "fieldkube-train"), "--config", str(path)], capture_output=True,
                          text=True, env=_env(threads), check=False)  # fmt: skip
    if proc.returncode != 0:
        sys.exit(f"training failed ({path}):\n{proc.stderr[-4000:]}")
    summary = json.loads((Path(config["output_dir"]) / "summary.json").read_text())
    trained = summary["trained"]
    return {
        "model": config["model"]["name"],
        "params": config["model"].get("params", {}),
        "epochs": trained["epochs"],
        "steps": trained["steps"],
        "batch": config["train"]["batch_size"],
        "lr": config["train"]["lr"],
        "loss": config["train"]["loss"],
        "train_seconds": round(time.perf_counter() - began, 1),
        "stopped_early": trained["stopped_early"],
    }


def _job(model: str, params: dict[str, Any], data: Path, out: Path, args: argparse.Namespace,
         epochs: int, lr: float, loss: str, batch: int, seed: int) -> dict[str, Any]:  # fmt: skip
    return {
        "model": {"name": model, "params": params},
        "data": {"path": str(data), "loader_workers": 1, "color_jitter": 0.1},
        "train": {
            "epochs": epochs, "batch_size": batch, "lr": lr, "loss": loss, "evaluate": False,
            "seed": seed, "log_every_steps": 50, "early_stopping_patience": 4,
        },
        "checkpoint": {"dir": None},
        "tracking": {"uri": None},
        "metrics": {"port": 0},
        "runtime": {"threads": args.threads},
        "output_dir": str(out),
    }  # fmt: skip


def _counter_arm(
    root: Path, args: argparse.Namespace, head: str, seed: int
) -> tuple[dict[str, Any], list[Any]]:
    """One counter trained with `head` and training seed `seed`: its report and per-tile rows."""
    import torch

    from fieldkube.contract.config import DataConfig
    from fieldkube.trainer.evaluate import evaluate_counter
    from fieldkube.trainer.loader import PreparedDataset
    from fieldkube.vision.bundle import load_bundle
    from fieldkube.vision.models import build_model

    params: dict[str, Any] = {"head": head}
    if args.counter_model == "counter-fcrn":
        params["base_channels"] = args.fcrn_width
    out = root / f"counter-{head}-{seed}"
    job = _job(args.counter_model, params, root / "field-train", out, args,
               args.counter_epochs, args.counter_lr, args.counter_loss, 8, seed)  # fmt: skip
    budget = _train(job, root, args.threads)
    loaded = load_bundle(out / "model")
    held_out = PreparedDataset(root / "field-eval", "test", DataConfig(), seed=0, augment=False)
    torch.set_num_threads(args.threads)
    report, rows = evaluate_counter(loaded.model, held_out, torch.device("cpu"), loaded.spec.density_scale)
    served_as = {}
    for other in args.serve_as:  # the same weights counted through another head (it has no weights)
        model = build_model(loaded.spec.name, **{**loaded.spec.params, "head": other})
        model.load_state_dict(loaded.model.state_dict())
        served, _ = evaluate_counter(model, held_out, torch.device("cpu"), loaded.spec.density_scale,
                                     classical=False)  # fmt: skip
        served_as[other] = served["cnn"]["overall"]["mae"]
    train_tiles = len(PreparedDataset(root / "field-train", "train", DataConfig(), 0, augment=False))
    budget.update(seed=seed, tile=args.counter_tile, train_tiles=train_tiles)
    return {"report": report, "budget": budget, "served_as": served_as}, rows


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _head_summary(arms: list[tuple[dict[str, Any], list[Any]]]) -> dict[str, Any]:
    """One head over its seeds: MAE/RMSE/R² averaged, MAE per seed, per bin and hazard, counts below zero."""
    reports = [arm["report"]["cnn"] for arm, _ in arms]
    counts = [row["cnn"] for _, rows in arms for row in rows]
    return {
        "mae": _mean([r["overall"]["mae"] for r in reports]),
        "mae_by_seed": [r["overall"]["mae"] for r in reports],
        "rmse": _mean([r["overall"]["rmse"] for r in reports]),
        "r2": _mean([r["overall"]["r2"] for r in reports]),
        "by_bin": {
            label: _mean([r["by_bin"][label]["mae"] for r in reports]) if row["n"] else None
            for label, row in reports[0]["by_bin"].items()
        },
        "by_hazard": {tag: _mean([r["by_tag"][tag]["mae"] for r in reports]) for tag in reports[0]["by_tag"]},
        "tiles_below_zero": sum(count < 0 for count in counts),
        "tiles_rounded_below_zero": sum(round(count) < 0 for count in counts),
        "lowest_count": min(counts),
        "training": [arm["budget"] for arm, _ in arms],
        "served_as": {
            other: {"mae": _mean(maes), "mae_by_seed": maes}
            for other in arms[0][0]["served_as"]
            for maes in [[arm["served_as"][other] for arm, _ in arms]]
        },
    }


def counter_benchmark(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Every head in --counter-heads, each trained with every seed in --seeds on the same tiles and counted
    on the same held-out tiles (a seed gives each head the same initial weights and data order)."""
    from fieldkube.vision.models import model_params

    size, tile = args.counter_image_size, args.counter_tile
    _prepare("field", root / "field-train", args.counter_images, size, tile, args.train_seed, "90/10")
    _prepare("field", root / "field-eval", args.eval_images, size, tile, args.eval_seed, "0/100")
    heads: dict[str, dict[str, Any]] = {}
    report: dict[str, Any] = {}  # the first arm's: the classical counter's figures and the tiles per group
    for head in args.counter_heads:
        arms = []
        for seed in args.seeds:
            print(f"  counter, head {head}, seed {seed} ...", flush=True)
            arms.append(_counter_arm(root, args, head, seed))
        heads[head] = _head_summary(arms)
        report = report or arms[0][0]["report"]
    default_head = model_params(args.counter_model)["head"]
    first = heads[args.counter_heads[0]]
    shipped = heads.get(default_head) or first["served_as"].get(default_head) or first
    return {
        "counter_mae_cnn": shipped["mae"],
        "counter_mae_classical": report["classical"]["overall"]["mae"],
        "counter_rmse_classical": report["classical"]["overall"]["rmse"],
        "counter_r2_classical": report["classical"]["overall"]["r2"],
        "counter_default_head": default_head,
        "counter_heads": heads,
        "counter_seeds": list(args.seeds),
        "counter_tiles_by_bin": {label: row["n"] for label, row in report["cnn"]["by_bin"].items()},
        "counter_tiles_by_hazard": {tag: row["n"] for tag, row in report["cnn"]["by_tag"].items()},
        "counter_classical_by_bin": {
            label: row["mae"] if row["n"] else None for label, row in report["classical"]["by_bin"].items()
        },
        "counter_classical_by_hazard": {
            tag: row["mae"] for tag, row in report["classical"]["by_tag"].items()
        },
        "counter_eval_tiles": report["tiles"],
        "counter_seconds_per_tile": report["seconds_per_tile"],
    }


def segmenter_benchmark(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from fieldkube.contract.config import DataConfig
    from fieldkube.trainer.evaluate import evaluate_segmenter
    from fieldkube.trainer.loader import PreparedDataset
    from fieldkube.vision.bundle import load_bundle

    size, tile = args.aerial_image_size, args.aerial_tile
    _prepare("aerial", root / "aerial-train", args.aerial_images, size, tile, args.train_seed, "90/10")
    _prepare("aerial", root / "aerial-eval", args.eval_images, size, tile, args.eval_seed, "0/100")
    params = {"base_channels": args.unet_width, "depth": args.unet_depth}
    job = _job("segmenter-unet", params, root / "aerial-train", root / "segmenter", args,
               args.aerial_epochs, args.aerial_lr, args.aerial_loss, 8, 0)  # fmt: skip
    budget = _train(job, root, args.threads)
    loaded = load_bundle(root / "segmenter" / "model")
    held_out = PreparedDataset(root / "aerial-eval", "test", DataConfig(), seed=0, augment=False)
    torch.set_num_threads(args.threads)
    report = evaluate_segmenter(loaded.model, held_out, torch.device("cpu"))
    budget.update(tile=tile, train_tiles=len(PreparedDataset(root / "aerial-train", "train", DataConfig(), 0,
                                                             augment=False)))  # fmt: skip
    return {
        "segmenter_iou": report["iou"],
        "segmenter_pixel_accuracy": report["pixel_accuracy"],
        "segmenter_mean_iou": report["mean_iou"],
        "segmenter_f1": report["f1"],
        "segmenter_eval_tiles": report["tiles"],
        "segmenter_seed_targets": SEED_SEGMENTER,
        "segmenter_training": budget,
    }


def _print(results: dict[str, Any]) -> None:
    heads: dict[str, dict[str, Any]] = results["counter_heads"]
    seeds = ", ".join(str(seed) for seed in results["counter_seeds"])
    print(
        f"\ncounter ({results['counter_eval_tiles']} held-out tiles, MAE per tile, mean over seeds {seeds}):"
    )
    print(
        f"  {'bin / hazard':>12} {'n':>5} " + " ".join(f"{head:>9}" for head in heads) + f" {'classical':>10}"
    )

    def row(label: str, n: int, cnn: list[float | None], classical: float | None) -> None:
        cells = " ".join(f"{'-' if v is None else f'{v:.3f}':>9}" for v in cnn)
        print(f"  {label:>12} {n:>5} {cells} {'-' if classical is None else f'{classical:.3f}':>10}")

    row(
        "all",
        results["counter_eval_tiles"],
        [h["mae"] for h in heads.values()],
        results["counter_mae_classical"],
    )
    for label, n in results["counter_tiles_by_bin"].items():
        row(
            label, n, [h["by_bin"][label] for h in heads.values()], results["counter_classical_by_bin"][label]
        )
    for tag, n in results["counter_tiles_by_hazard"].items():
        row(
            tag, n, [h["by_hazard"][tag] for h in heads.values()], results["counter_classical_by_hazard"][tag]
        )
    for head, summary in heads.items():
        by_seed = ", ".join(f"{mae:.3f}" for mae in summary["mae_by_seed"])
        print(f"  {head}: MAE by seed {by_seed}; R² {summary['r2']:.3f}; tiles counted below zero "
              f"{summary['tiles_below_zero']} (rounded {summary['tiles_rounded_below_zero']}), lowest count "
              f"{summary['lowest_count']:.3f}")  # fmt: skip
        for other, served in summary["served_as"].items():
            by_seed = ", ".join(f"{mae:.3f}" for mae in served["mae_by_seed"])
            print(f"  {head} weights counted with head {other}: MAE {served['mae']:.3f} (by seed {by_seed})")
    if "segmenter_iou" in results:
        iou, accuracy = results["segmenter_iou"], results["segmenter_pixel_accuracy"]
        print(f"segmenter ({results['segmenter_eval_tiles']} held-out tiles): IoU {iou:.3f} (seed 0.66), "
              f"pixel accuracy {accuracy:.3f} (seed 0.95)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/accuracy.json"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy host)")
    parser.add_argument("--train-seed", type=int, default=11)
    parser.add_argument("--eval-seed", type=int, default=23)
    parser.add_argument("--eval-images", type=int, default=20)
    parser.add_argument("--counter-model", default="counter-fcrn")
    parser.add_argument("--fcrn-width", type=int, default=16)
    parser.add_argument("--counter-images", type=int, default=40)
    parser.add_argument("--counter-image-size", default="192x288")
    parser.add_argument("--counter-tile", type=int, default=96)
    parser.add_argument("--counter-epochs", type=int, default=15)
    parser.add_argument("--counter-lr", type=float, default=1e-3)
    parser.add_argument("--counter-loss", default="pixel_mse")
    parser.add_argument(
        "--counter-heads", nargs="+", default=["linear"],
        help="output activations compared side by side (model parameter head)",
    )  # fmt: skip
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[0, 1, 2],
        help="training seeds (weights, data order) each head is trained with; MAEs averaged",
    )  # fmt: skip
    parser.add_argument(
        "--serve-as", nargs="*", default=["eval-clamp"],
        help="also count with each trained counter's weights behind these heads (e.g. clamp)",
    )  # fmt: skip
    parser.add_argument("--no-segmenter", action="store_true", help="counter heads only")
    parser.add_argument("--aerial-images", type=int, default=24)
    parser.add_argument("--aerial-image-size", default="256x256")
    parser.add_argument("--aerial-tile", type=int, default=64)
    parser.add_argument("--aerial-epochs", type=int, default=8)
    parser.add_argument("--aerial-lr", type=float, default=1e-3)
    parser.add_argument("--aerial-loss", default="bce_dice")
    parser.add_argument("--unet-width", type=int, default=16)
    parser.add_argument("--unet-depth", type=int, default=4)
    args = parser.parse_args()
    from fieldkube.trainer.dataset_format import write_json_atomic

    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fieldkube-accuracy-") as tmp:
        root = Path(tmp)
        print("counter: preparing, training, evaluating ...", flush=True)
        results = counter_benchmark(root, args)
        if not args.no_segmenter:
            print("segmenter: preparing, training, evaluating ...", flush=True)
            results.update(segmenter_benchmark(root, args))
    results.update(
        {
            "train_seed": args.train_seed,
            "eval_seed": args.eval_seed,
            "threads": args.threads,
            "cpu_count": os.cpu_count(),
            "device": "cpu",
            "total_seconds": round(time.perf_counter() - began, 1),
            "command": " ".join(["bench/accuracy_bench.py", *sys.argv[1:]]),
        }
    )
    write_json_atomic(args.out, results)
    _print(results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
