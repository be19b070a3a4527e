"""Accuracy benchmark on held-out synthetic data: CNN counter vs the classical counter, U-Net vs seed 004.

One run, side by side:
  - counter: `fieldkube-train` trains a counter on synthetic field images (seed --train-seed); the CNN and
    the seed-000 classical counter (Lab + sigmoid + Determinant-of-Hessian) then count the same held-out
    tiles (images drawn with --eval-seed, never seen in training): MAE overall, per seed-000 count bin and
    per hazard (glare, dust, shadow, none);
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
         epochs: int, lr: float, loss: str, batch: int) -> dict[str, Any]:  # fmt: skip
    return {
        "model": {"name": model, "params": params},
        "data": {"path": str(data), "loader_workers": 1, "color_jitter": 0.1},
        "train": {
            "epochs": epochs, "batch_size": batch, "lr": lr, "loss": loss, "evaluate": False,
            "seed": 0, "log_every_steps": 50, "early_stopping_patience": 4,
        },
        "checkpoint": {"dir": None},
        "tracking": {"uri": None},
        "metrics": {"port": 0},
        "runtime": {"threads": args.threads},
        "output_dir": str(out),
    }  # fmt: skip


def counter_benchmark(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from fieldkube.trainer.config import DataConfig
    from fieldkube.trainer.evaluate import evaluate_counter
    from fieldkube.trainer.loader import PreparedDataset
    from fieldkube.vision.bundle import load_bundle

    size, tile = args.counter_image_size, args.counter_tile
    _prepare("field", root / "field-train", args.counter_images, size, tile, args.train_seed, "90/10")
    _prepare("field", root / "field-eval", args.eval_images, size, tile, args.eval_seed, "0/100")
    params = {"base_channels": args.fcrn_width} if args.counter_model == "counter-fcrn" else {}
    job = _job(args.counter_model, params, root / "field-train", root / "counter", args,
               args.counter_epochs, args.counter_lr, args.counter_loss, 8)  # fmt: skip
    budget = _train(job, root, args.threads)
    loaded = load_bundle(root / "counter" / "model")
    held_out = PreparedDataset(root / "field-eval", "test", DataConfig(), seed=0, augment=False)
    torch.set_num_threads(args.threads)
    report, _ = evaluate_counter(loaded.model, held_out, torch.device("cpu"), loaded.spec.density_scale)
    budget.update(tile=tile, train_tiles=len(PreparedDataset(root / "field-train", "train", DataConfig(), 0,
                                                             augment=False)))  # fmt: skip
    by_bin = {
        label: {
            "n": report["cnn"]["by_bin"][label]["n"],
            "cnn": report["cnn"]["by_bin"][label]["mae"],
            "classical": report["classical"]["by_bin"][label]["mae"],
        }
        for label in report["cnn"]["by_bin"]
    }
    by_tag = {
        tag: {
            "n": report["cnn"]["by_tag"][tag]["n"],
            "cnn": report["cnn"]["by_tag"][tag]["mae"],
            "classical": report["classical"]["by_tag"][tag]["mae"],
        }
        for tag in report["cnn"]["by_tag"]
    }
    return {
        "counter_mae_cnn": report["cnn"]["overall"]["mae"],
        "counter_mae_classical": report["classical"]["overall"]["mae"],
        "counter_rmse_cnn": report["cnn"]["overall"]["rmse"],
        "counter_rmse_classical": report["classical"]["overall"]["rmse"],
        "counter_r2_cnn": report["cnn"]["overall"]["r2"],
        "counter_r2_classical": report["classical"]["overall"]["r2"],
        "counter_mae_by_bin": by_bin,
        "counter_mae_by_hazard": by_tag,
        "counter_eval_tiles": report["tiles"],
        "counter_seconds_per_tile": report["seconds_per_tile"],
        "counter_training": budget,
    }


def segmenter_benchmark(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from fieldkube.trainer.config import DataConfig
    from fieldkube.trainer.evaluate import evaluate_segmenter
    from fieldkube.trainer.loader import PreparedDataset
    from fieldkube.vision.bundle import load_bundle

    size, tile = args.aerial_image_size, args.aerial_tile
    _prepare("aerial", root / "aerial-train", args.aerial_images, size, tile, args.train_seed, "90/10")
    _prepare("aerial", root / "aerial-eval", args.eval_images, size, tile, args.eval_seed, "0/100")
    params = {"base_channels": args.unet_width, "depth": args.unet_depth}
    job = _job("segmenter-unet", params, root / "aerial-train", root / "segmenter", args,
               args.aerial_epochs, args.aerial_lr, args.aerial_loss, 8)  # fmt: skip
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
    cnn, classical = results["counter_mae_cnn"], results["counter_mae_classical"]
    print(
        f"\ncounter ({results['counter_eval_tiles']} held-out tiles): "
        f"MAE CNN {cnn:.3f} vs classical {classical:.3f}"
    )
    print(f"  {'bin / hazard':>12} {'n':>5} {'CNN':>8} {'classical':>10}")
    rows = {**results["counter_mae_by_bin"], **results["counter_mae_by_hazard"]}
    for label, row in rows.items():
        cnn = "-" if not row["n"] else f"{row['cnn']:.3f}"
        classical = "-" if not row["n"] else f"{row['classical']:.3f}"
        print(f"  {label:>12} {row['n']:>5} {cnn:>8} {classical:>10}")
    print(f"segmenter ({results['segmenter_eval_tiles']} held-out tiles): IoU {results['segmenter_iou']:.3f} "
          f"(seed 0.66), pixel accuracy {results['segmenter_pixel_accuracy']:.3f} (seed 0.95)")  # fmt: skip


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
