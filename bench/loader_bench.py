"""Loader CPU cost per sample: the batched data path against the per-sample path it replaced.

One run, side by side, on the same prepared tiles (synthetic field data, counter task, default
augmentation plus colour jitter), one process, one torch thread, CPU time (not wall time, so other
load on the machine does not count):
  - per-sample (before): one Parquet row to Python objects, PNG decode by Pillow, density map in numpy,
    flips/turn/jitter in numpy, to_tensor, torch's default collate (kept here as the reference)
  - batched, finished on the CPU (what a CPU run's loader workers do now), PNG and raw-pixel shards
  - batched, raw batch only (what a GPU run's loader workers do now: the rest runs on the GPU)
Writes JSON (--out) and a bar chart next to it (.png).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cpu_timing import least_cpu_ms
from fieldkube.contract.config import DataConfig
from fieldkube.trainer.augment import Augment
from fieldkube.trainer.loader import PreparedDataset, epoch_batches
from fieldkube.trainer.scale import BIN, launcher_env
from fieldkube.vision.density import density_map_from_points
from fieldkube.vision.normalize import to_tensor


def per_sample(dataset: PreparedDataset, key: tuple[int, int], augment: Augment) -> tuple[torch.Tensor, ...]:
    """The loader's work per sample before batching (the reference this benchmark compares against)."""
    epoch, index = key
    file_index, row = dataset.index[index]
    rec = dataset._table(file_index).slice(row, 1).to_pylist()[0]
    image = np.asarray(Image.open(io.BytesIO(rec["image"])).convert("RGB"))  # the decoder before: Pillow
    points = np.asarray(rec["points"] or [], dtype=np.float64).reshape(-1, 2)
    target = density_map_from_points(points, image.shape[:2], sigma=dataset.sigma)
    rng = np.random.default_rng([dataset.seed, epoch, index])
    if augment.hflip and rng.random() < 0.5:
        image, target = image[:, ::-1], target[:, ::-1]
    if augment.vflip and rng.random() < 0.5:
        image, target = image[::-1], target[::-1]
    if augment.rot90:
        turns = int(rng.integers(0, 4))
        image, target = np.rot90(image, turns), np.rot90(target, turns)
    if augment.color_jitter > 0:
        pixels = image.astype(np.float32)
        brightness, contrast, saturation = 1 + rng.uniform(-augment.color_jitter, augment.color_jitter, 3)
        gray = pixels.mean(axis=2, keepdims=True)
        pixels = gray + (pixels - gray) * saturation
        pixels = (pixels - pixels.mean()) * contrast + pixels.mean()
        image = np.clip(pixels * brightness, 0, 255).astype(np.uint8)
    target = np.ascontiguousarray(target) * dataset.density_scale
    return to_tensor(np.ascontiguousarray(image)), torch.from_numpy(target.astype(np.float32))[None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/loader.json"))
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=16, help="synthetic images of 3x3 tiles each")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = DataConfig(color_jitter=0.2)
    augment = Augment.from_config(data)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fieldkube-loader-bench-") as tmp:
        sets = {}
        for pixels in ("png", "raw"):
            root = Path(tmp) / pixels
            size = f"{3 * args.tile}x{3 * args.tile}"
            subprocess.run(
                [str(BIN / "fieldkube-prepare"), "--synthetic", "field", "--num-images", str(args.images),
                 "--image-size", size, "--tile", str(args.tile), "--no-balance", "--split", "100/0",
                 "--workers", "1", "--pixels", pixels, "--out", str(root)],
                check=True, capture_output=True, env=launcher_env(1),
            )  # fmt: skip
            sets[pixels] = PreparedDataset(root, "train", data, seed=0, augment=True)
            results[f"shard_bytes_per_tile_{pixels}"] = round(
                sum(p.stat().st_size for p in root.glob("shards/*.parquet")) / len(sets[pixels])
            )
        png, raw = sets["png"], sets["raw"]
        batch = min(args.batch, len(png))
        batches = epoch_batches(len(png), batch, 0, 1, seed=0, epoch=1)
        what = f"{len(png)} tiles of {args.tile} px, batches of {batch}"
        print(f"{what}, CPU ms per sample (least of {args.rounds} passes):")
        runs = {
            "per_sample_before": lambda keys: torch.utils.data.default_collate(
                [per_sample(png, k, augment) for k in keys]
            ),
            "batched_cpu_png": png.batch,
            "batched_cpu_raw": raw.batch,
            "gpu_worker_png": png.__getitems__,
            "gpu_worker_raw": raw.__getitems__,
        }
        samples = sum(len(keys) for keys in batches)
        for name, run_batch in runs.items():
            run_batch(batches[0])  # warm: shards mapped, lazy imports done
            per_pass = least_cpu_ms(lambda run=run_batch: [run(keys) for keys in batches], passes=args.rounds)
            results[f"{name}_ms"] = round(per_pass / samples, 3)
            print(f"  {name:>20}: {results[f'{name}_ms']:.3f} ms")
    before = results["per_sample_before_ms"]
    for name in list(runs)[1:]:
        results[f"{name}_reduction"] = round(before / results[f"{name}_ms"], 2)
    results.update(
        {"tile": args.tile, "batch": batch, "tiles": len(png), "threads": 1, "cpu_count": os.cpu_count()}
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(results, indent=2) + "\n")
    tmp_out.replace(args.out)
    plot(results, list(runs), args.out.with_suffix(".png"))
    print(json.dumps(results, indent=2))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def plot(results: dict[str, Any], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [results[f"{n}_ms"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh(names[::-1], values[::-1], color=["#27a", "#27a", "#2a7", "#2a7", "#888"])
    ax.set_xlabel("CPU ms per sample (1 thread)")
    ax.set_title(f"loader CPU cost, {results['tile']} px tiles, batch {results['batch']}")
    for i, v in enumerate(values[::-1]):
        ax.text(v, i, f" {v:.2f}", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
