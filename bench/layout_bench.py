"""Memory layout of the convolutions, side by side: the same models, batches and weights in the
contiguous (NCHW) layout, with channels_last inputs (what the trainer feeds: parameters stay contiguous,
so Horovod can reduce their gradients), and with a channels_last model as well (what the service runs).

For each model: CPU ms per batch of an inference forward pass and of a training step (forward, backward,
Adam), least over 3 passes taken in turn across the layouts, so drift on a shared machine hits all three
alike; then each layout's speed-up over the contiguous one. CPU time of the process (`time.process_time`:
another process's load does not enter), with `--threads` torch threads. Writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cpu_timing import cpu_ms
from fieldkube.vision.models import build_model

LAYOUTS = ("contiguous", "channels_last_inputs", "channels_last_model")
# (label, architecture, params, tile, batch): the service bench's small models at its tile sizes, and
# the default-size models at the examples' 128 px training tiles.
CASES: list[tuple[str, str, dict[str, Any], int, int]] = [
    ("counter-mcnn width 0.25", "counter-mcnn", {"width": 0.25}, 224, 8),
    ("segmenter-unet base 4", "segmenter-unet", {"base_channels": 4, "depth": 4, "dropout": 0.0}, 256, 8),
    ("counter-mcnn (default)", "counter-mcnn", {}, 128, 16),
    ("segmenter-unet (default)", "segmenter-unet", {}, 128, 4),
]


Runners = dict[str, dict[str, Callable[[], object]]]


def runners(arch: str, params: dict[str, Any], tile: int, batch: int) -> Runners:
    """Per layout, an inference pass and a training step over the same weights and batch."""
    torch.manual_seed(0)
    reference = build_model(arch, **params)
    inputs = torch.randn(batch, 3, tile, tile)
    out: Runners = {}
    for layout in LAYOUTS:
        model = build_model(arch, **params)
        model.load_state_dict(reference.state_dict())
        x = inputs if layout == "contiguous" else inputs.contiguous(memory_format=torch.channels_last)
        if layout == "channels_last_model":
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

        def infer(model: torch.nn.Module = model, x: torch.Tensor = x) -> object:
            model.eval()
            with torch.inference_mode():
                return model(x)

        def train(model: torch.nn.Module = model, x: torch.Tensor = x, opt: Any = optimizer) -> object:
            model.train()
            opt.zero_grad()
            model(x).float().square().mean().backward()
            opt.step()
            return None

        out[layout] = {"infer": infer, "train": train}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/layout.json"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--passes", type=int, default=3, help="timed passes per layout (least is kept)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    started = time.perf_counter()
    for number, (label, arch, params, tile, batch) in enumerate(CASES, start=1):
        work = runners(arch, params, tile, batch)
        row: dict[str, Any] = {"model": label, "architecture": arch, "params": params, "tile": tile}
        row["batch"] = batch
        for kind in ("infer", "train"):
            for layout in LAYOUTS:
                work[layout][kind]()  # warm-up: oneDNN picks and caches its kernels
            best = dict.fromkeys(LAYOUTS, float("inf"))
            for _ in range(args.passes):
                for layout in LAYOUTS:
                    best[layout] = min(best[layout], cpu_ms(work[layout][kind]))
            row[kind] = {
                layout: {"cpu_ms": round(ms, 1), "speedup": round(best["contiguous"] / ms, 2)}
                for layout, ms in best.items()
            }
        rows.append(row)
        elapsed = time.perf_counter() - started
        eta = elapsed / number * (len(CASES) - number)
        print(
            f"[{number}/{len(CASES)}] {label} t{tile} b{batch}: "
            + "; ".join(
                f"{kind} "
                + " / ".join(f"{row[kind][layout]['cpu_ms']:.0f}" for layout in LAYOUTS)
                + f" ms (x{row[kind]['channels_last_inputs']['speedup']:.2f}, "
                f"x{row[kind]['channels_last_model']['speedup']:.2f})"
                for kind in ("infer", "train")
            )
            + f"  [{elapsed:.0f} s, ETA {eta:.0f} s]",
            flush=True,
        )
    result = {
        "layouts": list(LAYOUTS),
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
