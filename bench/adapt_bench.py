"""Domain-shift benchmark: how well the champion counter transfers to another field, and how fast it adapts.

One run, side by side:
  - the champion: `fieldkube-train` trains a counter on the first synthetic field (as `bench-accuracy`
    does) and counts held-out tiles of that field and of the shifted field (`--synthetic field-shifted`:
    other flower shape, size and colour, ground texture and light): its MAE before adaptation;
  - for each N in --sizes (4, 8, 16, 32 labelled shifted images): fine-tuning from the champion
    (`model.init_from` its bundle; Adam 1e-3 decayed along a cosine, `train.lr_schedule: cosine`; the
    decoder and head held by `model.freeze`, so only the encoder and middle adapt to the new look) and
    training from scratch on the same N images with the same number of steps and the champion's recipe
    (Adam 1e-3, constant), both counted on the same held-out shifted tiles; each arm is trained with
    every seed in --seeds (initial weights and data order) and the MAEs averaged, since one small run
    varies a lot from seed to seed. --work-dir keeps the data, the champion and the runs for another try.
Writes JSON (--out), a plot of MAE against N (--plot) and prints a table with the issue's two checks
at N = 16: fine-tuned MAE at most half the from-scratch MAE, and at most a third of the champion's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

BIN = Path(sys.executable).parent


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = str(threads)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _prepare(kind: str, out: Path, images: int, args: argparse.Namespace, seed: int, split: str) -> None:
    if (out / "manifest.json").is_file():  # kept from an earlier run in the same --work-dir
        return
    cmd = [str(BIN / "fieldkube-prepare"), "--synthetic", kind, "--num-images", str(images), "--image-size",
           args.image_size, "--tile", str(args.tile), "--seed", str(seed), "--split", split, "--no-balance",
           "--workers", "1", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(1), check=False)
    if proc.returncode != 0:
        sys.exit(f"prepare failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")


def _train(
    model: dict[str, Any],
    data: Path,
    out: Path,
    train: dict[str, Any],
    threads: int,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    from fieldkube.contract.config import apply_override

    config: dict[str, Any] = {
        "model": model,
        "data": {"path": str(data), "loader_workers": 1, "color_jitter": 0.1},
        "train": {"batch_size": 8, "loss": "pixel_mse", "evaluate": False, "seed": 0, "log_every_steps": 50,
                  **train},
        "checkpoint": {"dir": None},
        "tracking": {"uri": None},
        "metrics": {"port": 0},
        "runtime": {"threads": threads},
        "output_dir": str(out),
    }  # fmt: skip
    for assignment in overrides or []:
        apply_override(config, assignment)
    path = out.parent / f"{out.name}.yaml"
    text = yaml.safe_dump(config)
    done = out / "summary.json"
    info = {"lr": config["train"]["lr"], "lr_schedule": config["train"].get("lr_schedule", "constant"),
            "overrides": list(overrides or [])}  # fmt: skip
    if done.is_file() and path.is_file() and path.read_text() == text:  # this very run, kept in --work-dir
        trained = json.loads(done.read_text())["trained"]
        return {"steps": trained["steps"], "epochs": trained["epochs"], **info, "reused": True,
                "train_seconds": round(trained["seconds_this_run"], 1)}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    began = time.perf_counter()
    proc = subprocess.run([str(BIN / "fieldkube-train"), "--config", str(path)], capture_output=True,
                          text=True, env=_env(threads), check=False)  # fmt: skip
    if proc.returncode != 0:
        sys.exit(f"training failed ({path}):\n{proc.stderr[-4000:]}")
    trained = json.loads(done.read_text())["trained"]
    return {"steps": trained["steps"], "epochs": trained["epochs"], **info,
            "train_seconds": round(time.perf_counter() - began, 1)}  # fmt: skip


def _mae(bundle: Path, data: Path, threads: int) -> float:
    import torch

    from fieldkube.contract.config import DataConfig
    from fieldkube.trainer.evaluate import evaluate_counter
    from fieldkube.trainer.loader import PreparedDataset
    from fieldkube.vision.bundle import load_bundle

    torch.set_num_threads(threads)
    loaded = load_bundle(bundle)
    tiles = PreparedDataset(data, "test", DataConfig(), seed=0, augment=False)
    report, _ = evaluate_counter(loaded.model, tiles, torch.device("cpu"), loaded.spec.density_scale,
                                 classical=False)  # fmt: skip
    return float(report["cnn"]["overall"]["mae"])


def run(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    _prepare("field", root / "field-train", args.champion_images, args, args.train_seed, "90/10")
    _prepare("field", root / "field-eval", args.eval_images, args, args.eval_seed, "0/100")
    _prepare("field-shifted", root / "shifted-eval", args.eval_images, args, args.eval_seed, "0/100")
    params = {"base_channels": args.fcrn_width}
    schedule = {"epochs": args.champion_epochs, "lr": args.champion_lr, "early_stopping_patience": 4}
    champion = root / "champion" / "model"
    reused = root / "champion-training.json"
    recipe = {"params": params, "schedule": schedule, "images": args.champion_images}
    recorded = json.loads(reused.read_text()) if reused.is_file() else {}
    if champion.is_dir() and recorded.get("recipe") == recipe:  # the same champion, trained before
        champion_train = recorded["training"]
        print(f"champion: reusing {champion}", flush=True)
    else:
        for stale in root.glob("tuned-*"):  # fine-tuned from another champion at the same path
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        print("champion: training on the first field ...", flush=True)
        champion_train = _train({"name": "counter-fcrn", "params": params}, root / "field-train",
                                root / "champion", schedule, args.threads)  # fmt: skip
        reused.write_text(json.dumps({"recipe": recipe, "training": champion_train}))
    results: dict[str, Any] = {
        "champion_mae_first_field": _mae(champion, root / "field-eval", args.threads),
        "champion_mae_shifted": _mae(champion, root / "shifted-eval", args.threads),
        "champion_training": {**champion_train, "model": "counter-fcrn", "params": params},
        "by_size": {},
    }
    budget = {"epochs": 100_000, "max_steps": args.steps}
    source = {"init_from": str(champion), "freeze": args.finetune_freeze,
              "freeze_epochs": args.finetune_freeze_epochs}  # fmt: skip
    jobs: dict[tuple[int, str, int], Any] = {}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each training is its own process
        for n in args.sizes:
            data = root / f"shifted-{n}"
            _prepare("field-shifted", data, n, args, args.adapt_seed, "100/0")
            for seed in args.seeds:
                jobs[n, "tuned", seed] = pool.submit(
                    _train, source, data, root / f"tuned-{n}-{seed}",
                    {**budget, "lr": args.finetune_lr, "lr_schedule": args.finetune_schedule, "seed": seed},
                    args.threads, args.finetune_set)  # fmt: skip
                jobs[n, "scratch", seed] = pool.submit(
                    _train, {"name": "counter-fcrn", "params": params}, data, root / f"scratch-{n}-{seed}",
                    {**budget, "lr": args.scratch_lr, "lr_schedule": args.scratch_schedule, "seed": seed},
                    args.threads, args.scratch_set)  # fmt: skip
        print(f"{len(jobs)} runs of {args.steps} steps (sizes {args.sizes}, seeds {args.seeds}, "
              f"{args.jobs} at a time) ...", flush=True)  # fmt: skip
        for n in args.sizes:
            tuned = [jobs[n, "tuned", seed].result() for seed in args.seeds]
            scratch = [jobs[n, "scratch", seed].result() for seed in args.seeds]
            tuned_mae = [_mae(root / f"tuned-{n}-{s}" / "model", root / "shifted-eval", args.threads)
                         for s in args.seeds]  # fmt: skip
            scratch_mae = [_mae(root / f"scratch-{n}-{s}" / "model", root / "shifted-eval", args.threads)
                           for s in args.seeds]  # fmt: skip
            results["by_size"][str(n)] = {
                "images": n,
                "fine_tuned_mae": sum(tuned_mae) / len(tuned_mae),
                "scratch_mae": sum(scratch_mae) / len(scratch_mae),
                "fine_tuned_mae_by_seed": tuned_mae,
                "scratch_mae_by_seed": scratch_mae,
                "fine_tuned_training": tuned,
                "scratch_training": scratch,
            }
            row = results["by_size"][str(n)]
            print(f"  fine-tuned MAE {row['fine_tuned_mae']:.3f} {tuned_mae}, "
                  f"from scratch {row['scratch_mae']:.3f} {scratch_mae}", flush=True)  # fmt: skip
    return results


def checks(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's two checks at N = 16 (None when 16 was not among the sizes)."""
    row = results["by_size"].get("16")
    if row is None:
        return {}
    tuned, scratch, before = row["fine_tuned_mae"], row["scratch_mae"], results["champion_mae_shifted"]
    return {
        "tuned_over_scratch_16": tuned / scratch if scratch else math.inf,
        "tuned_over_champion_16": tuned / before if before else math.inf,
        "half_of_scratch": tuned <= 0.5 * scratch,
        "third_of_champion": tuned <= before / 3,
    }


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(results["by_size"].values(), key=lambda r: r["images"])
    sizes = [r["images"] for r in rows]
    figure, axes = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    axes.plot(sizes, [r["fine_tuned_mae"] for r in rows], "o-", label="fine-tuned from the champion")
    axes.plot(sizes, [r["scratch_mae"] for r in rows], "s--", label="from scratch, same steps")
    axes.axhline(results["champion_mae_shifted"], color="grey", linestyle=":", label="champion, not adapted")
    axes.axhline(results["champion_mae_first_field"], color="green", linestyle=":",
                 label="champion on its own field")  # fmt: skip
    axes.set_xscale("log", base=2)
    axes.set_xticks(sizes, [str(s) for s in sizes])
    axes.set_xlabel("labelled images of the shifted field")
    axes.set_ylabel("MAE per tile (flowers)")
    axes.set_title("Counter on a shifted field: adaptation vs training from scratch")
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def _print(results: dict[str, Any]) -> None:
    print(f"\nchampion MAE per tile: own field {results['champion_mae_first_field']:.3f}, "
          f"shifted field {results['champion_mae_shifted']:.3f}")  # fmt: skip
    print(f"  {'N images':>8} {'fine-tuned':>11} {'scratch':>9} {'ratio':>6}")
    for row in sorted(results["by_size"].values(), key=lambda r: r["images"]):
        ratio = row["fine_tuned_mae"] / row["scratch_mae"] if row["scratch_mae"] else math.inf
        print(f"  {row['images']:>8} {row['fine_tuned_mae']:>11.3f} {row['scratch_mae']:>9.3f} {ratio:>6.2f}")
    if results["checks"]:
        c = results["checks"]
        print(f"N=16: fine-tuned / scratch {c['tuned_over_scratch_16']:.2f} "
              f"(<= 0.5: {c['half_of_scratch']}), fine-tuned / champion "
              f"{c['tuned_over_champion_16']:.2f} (<= 0.33: {c['third_of_champion']})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/adapt.json"))
    parser.add_argument("--plot", type=Path, default=Path("bench/results/adapt.png"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy host)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps of every adaptation run")
    parser.add_argument("--jobs", type=int, default=1,
                        help="trainings run side by side (each a process of --threads threads)")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                        help="training seeds of each arm (weights, data order), averaged")  # fmt: skip
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--finetune-schedule", choices=["constant", "cosine"], default="cosine",
                        help="train.lr_schedule of the fine-tuned arm")  # fmt: skip
    parser.add_argument("--finetune-freeze", nargs="*", default=["decoder", "head"], metavar="GROUP",
                        help="model.freeze of the fine-tuned arm (none: pass it bare)")  # fmt: skip
    parser.add_argument("--finetune-freeze-epochs", type=int, default=100_000,
                        help="model.freeze_epochs of the fine-tuned arm (default: all)")  # fmt: skip
    parser.add_argument("--scratch-lr", type=float, default=1e-3)
    parser.add_argument(
        "--scratch-schedule",
        choices=["constant", "cosine"],
        default="constant",
        help="train.lr_schedule of the from-scratch arm (the champion's: constant)",
    )
    parser.add_argument("--finetune-set", action="append", default=[], metavar="KEY=VALUE",
                        help="training config override of the fine-tuned arm (repeatable)")  # fmt: skip
    parser.add_argument("--scratch-set", action="append", default=[], metavar="KEY=VALUE",
                        help="training config override of the from-scratch arm (repeatable)")  # fmt: skip
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep prepared data, the champion and the runs here and reuse them when present "
                             "(default: a temporary directory)")  # fmt: skip
    parser.add_argument("--train-seed", type=int, default=11)
    parser.add_argument("--eval-seed", type=int, default=23)
    parser.add_argument("--adapt-seed", type=int, default=31)
    parser.add_argument("--eval-images", type=int, default=20)
    parser.add_argument("--image-size", default="192x288")
    parser.add_argument("--tile", type=int, default=96)
    parser.add_argument("--fcrn-width", type=int, default=16)
    parser.add_argument("--champion-images", type=int, default=40)
    parser.add_argument("--champion-epochs", type=int, default=40)
    parser.add_argument("--champion-lr", type=float, default=1e-3)
    args = parser.parse_args()
    from fieldkube.trainer.dataset_format import write_json_atomic

    began = time.perf_counter()
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        results = run(args.work_dir, args)
    else:
        with tempfile.TemporaryDirectory(prefix="fieldkube-adapt-") as tmp:
            results = run(Path(tmp), args)
    results["checks"] = checks(results)
    results.update(
        {
            "train_seed": args.train_seed,
            "eval_seed": args.eval_seed,
            "adapt_seed": args.adapt_seed,
            "tile": args.tile,
            "image_size": args.image_size,
            "threads": args.threads,
            "cpu_count": os.cpu_count(),
            "device": "cpu",
            "total_seconds": round(time.perf_counter() - began, 1),
            "command": " ".join(["bench/adapt_bench.py", *sys.argv[1:]]),
        }
    )
    write_json_atomic(args.out, results)
    plot(results, args.plot)
    _print(results)
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
