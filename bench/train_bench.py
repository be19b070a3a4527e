"""Training throughput benchmark: fieldkube-train vs a bare PyTorch loop, Horovod vs DDP at 2 ranks.

One run, side by side, on the same model (counter-mcnn), tile and per-worker batch:
  - fieldkube-train, 1 process (real Parquet shards, augmentation, prefetching loader, metrics; no
    checkpoints)
  - a minimal hand-written loop (same model, optimizer, loss, batch; pre-made tensors, no data loading)
  - fieldkube-train under horovodrun -np 2 (Gloo) and under torchrun --nproc-per-node 2 (DDP, gloo)
Figures: steady-state images/s (first step excluded), overhead ratio = fieldkube / bare, loader wait share.
The 1-process run and the bare loop alternate (bare first and last, `--rounds` of each in between) and the
ratio is of their means: this VM's speed drifts by 10-20 % between minutes, which one bare run taken
after the trainer's put into the ratio.
Writes JSON (--out) and a bar chart next to it (.png).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fieldkube.trainer.scale import BIN, launch_command, launcher_env


def _train(
    label: str, launcher: list[str], data: Path, out: Path, args: argparse.Namespace, threads: int
) -> dict:
    cmd = [
        *launcher, "--data", str(data), "--set", f"output_dir={out}",
        "--set", f"train.batch_size={args.batch}", "--set", f"train.max_steps={args.steps}",
        "--set", "train.epochs=1000", "--set", "train.evaluate=false", "--set", "train.log_every_steps=5",
        "--set", f"data.loader_workers={args.loader_workers}", "--set", f"runtime.threads={threads}",
        "--set", "metrics.port=0", "--set", "checkpoint.every_epochs=null",
    ]  # fmt: skip
    began = time.perf_counter()
    proc = subprocess.run(cmd, env=launcher_env(threads), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"benchmark run failed: {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    trained = json.loads((out / "summary.json").read_text())["trained"]
    print(
        f"  {label:>22}: {trained['train_images_per_second']:.1f} img/s, "
        f"loader wait {100 * trained['loader_wait_share']:.1f}% ({time.perf_counter() - began:.0f}s wall)"
    )
    return dict(trained)


def bare_loop(args: argparse.Namespace, threads: int) -> float:
    """Images/s of the plainest loop: fixed tensors, forward, per-image L2 loss, backward, Adam step. The
    inputs are channels_last, as fieldkube-train lays them out on every device (oneDNN's convolutions are
    1.2-1.9x faster in that layout here): the ratio is then the trainer's overhead, not the layout's gain."""
    import torch

    from fieldkube.trainer.losses import l2_per_image
    from fieldkube.vision.models import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model("counter-mcnn")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    inputs = torch.randn(args.batch, 3, args.tile, args.tile).contiguous(memory_format=torch.channels_last)
    targets = torch.rand(args.batch, 1, args.tile, args.tile) * 0.01
    elapsed = 0.0
    for step in range(args.steps):
        began = time.perf_counter()
        optimizer.zero_grad()
        loss = l2_per_image(model(inputs), targets)
        loss.backward()
        optimizer.step()
        if step > 0:
            elapsed += time.perf_counter() - began
    rate = args.batch * (args.steps - 1) / elapsed
    print(f"  {'bare PyTorch loop':>22}: {rate:.1f} img/s")
    return rate


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["bare loop", "fieldkube (1)", "Horovod (2)", "DDP (2)"]
    keys = ["bare_loop_images_per_s", "fieldkube_images_per_s", "horovod_images_per_s", "ddp_images_per_s"]
    values = [results[k] for k in keys]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(labels, values, color=["#888", "#2a7", "#27a", "#a72"])
    ax.set_ylabel("images / s")
    ax.set_title(f"counter-mcnn, {results['tile']}px tiles, batch {results['batch_per_worker']}/worker (CPU)")
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.1f}", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/train.json"))
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="images per worker per step")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the 1-process runs")
    parser.add_argument("--loader-workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="1-process runs, each between two bare loops")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fieldkube-bench-") as tmp:
        root = Path(tmp)
        data = root / "data"
        print(f"preparing synthetic field data ({args.tile}px tiles) ...")
        subprocess.run(
            [str(BIN / "fieldkube-prepare"), "--synthetic", "field", "--num-images", "16", "--image-size",
             f"{2 * args.tile}x{3 * args.tile}", "--tile", str(args.tile), "--no-balance", "--split", "90/10",
             "--workers", "2", "--out", str(data)],
            check=True, capture_output=True, env=launcher_env(1),
        )  # fmt: skip
        print(f"training {args.steps} steps each:")
        bares = [bare_loop(args, args.threads)]
        singles = []
        for round_ in range(args.rounds):
            command = [str(BIN / "fieldkube-train")]
            singles.append(
                _train("fieldkube-train", command, data, root / f"single{round_}", args, args.threads)
            )
            bares.append(bare_loop(args, args.threads))
        horovod = _train(
            "horovodrun -np 2",
            launch_command("horovod", 2),
            data,
            root / "horovod",
            args,
            max(1, args.threads // 2),
        )
        ddp = _train(
            "torchrun DDP x2", launch_command("ddp", 2), data, root / "ddp", args, max(1, args.threads // 2)
        )
    single_rates = [run["train_images_per_second"] for run in singles]
    single, bare = statistics.mean(single_rates), statistics.mean(bares)
    results = {
        "fieldkube_images_per_s": round(single, 2),
        "bare_loop_images_per_s": round(bare, 2),
        "overhead_ratio": round(single / bare, 3),
        "fieldkube_images_per_s_runs": [round(rate, 2) for rate in single_rates],
        "bare_loop_images_per_s_runs": [round(rate, 2) for rate in bares],
        "horovod_images_per_s": round(horovod["train_images_per_second"], 2),
        "ddp_images_per_s": round(ddp["train_images_per_second"], 2),
        "loader_wait_share": round(statistics.mean(run["loader_wait_share"] for run in singles), 4),
        "horovod_loader_wait_share": round(horovod["loader_wait_share"], 4),
        "ddp_loader_wait_share": round(ddp["loader_wait_share"], 4),
        "model": "counter-mcnn",
        "tile": args.tile,
        "batch_per_worker": args.batch,
        "steps": args.steps,
        "threads": args.threads,
        "loader_workers": args.loader_workers,
        "cpu_count": os.cpu_count(),
        "device": "cpu",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(results, indent=2) + "\n")
    tmp_out.replace(args.out)
    plot(results, args.out.with_suffix(".png"))
    print(json.dumps(results, indent=2))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
