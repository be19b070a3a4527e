"""Scaling benchmark: `fieldkube-scale` over 1 and 2 workers for each strategy (ring allreduce under DDP,
synchronous and asynchronous parameter servers) on a synthetic dataset.

Weak scaling as in seeds 000/002/003/004: the per-worker batch stays fixed, each process gets one CPU
thread, strategies and counts alternate over --repeat rounds (median), speedup is relative to 1 allreduce
worker (plain training), efficiency = speedup / workers and, as seed 003 counts it, speedup /
(workers + servers). Time to the common target loss and the test loss / count MAE of each run's model
weigh speed against what was learned. On a 2-core machine 2 workers is the honest ceiling (and a
parameter-server run with 2 workers already has 3 processes). Writes bench/scale_bench.json, and the
sweep's scale.json / scale.png under --work (the plot is copied beside the JSON as scale_bench.png).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from fieldkube.trainer.scale import BIN, launcher_env
from fieldkube.trainer.scale import run as scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/scale_bench.json"))
    parser.add_argument("--work", type=Path, default=Path("build/scale-bench"))
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--strategy", default="allreduce,ps-sync,ps-async")
    parser.add_argument("--launcher", default="ddp", help="allreduce's launcher")
    parser.add_argument("--staleness", type=int, default=2, help="ps-async's bound")
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--lr", type=float, default=1e-3, help="train.lr: high enough that the loss falls within --steps"
    )
    parser.add_argument("--repeat", type=int, default=3, help="alternating rounds (median per run)")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    began = time.perf_counter()
    load_before = os.getloadavg()
    data = args.work / "data"
    if not (data / "manifest.json").is_file():
        subprocess.run(
            [str(BIN / "fieldkube-prepare"), "--synthetic", "field", "--num-images", "16", "--image-size",
             f"{2 * args.tile}x{3 * args.tile}", "--tile", str(args.tile), "--no-balance", "--split", "80/20",
             "--workers", "2", "--out", str(data)],
            check=True, capture_output=True, env=launcher_env(1),
        )  # fmt: skip
    sweep_dir = args.work / "strategies"
    strategies = args.strategy.split(",")
    flags = ["--launcher", args.launcher] if "allreduce" in strategies else []
    flags += ["--ps", "1"] if any(s.startswith("ps-") for s in strategies) else []
    flags += ["--staleness", str(args.staleness)] if "ps-async" in strategies else []
    sweep = scale(
        ["--data", str(data), "--out", str(sweep_dir), "--workers", args.workers, "--strategy", args.strategy,
         *flags, "--steps", str(args.steps), "--batch", str(args.batch), "--repeat", str(args.repeat),
         "--threads-per-worker", "1", "--set", "data.loader_workers=0", "--set", f"train.lr={args.lr}"]
    )  # fmt: skip
    output = {
        "sweep": sweep,
        "tile": args.tile,
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "seconds": round(time.perf_counter() - began, 1),
        "command": " ".join(["bench/scale_bench.py", *sys.argv[1:]]),
    }
    args.out.write_text(json.dumps(output, indent=2) + "\n")
    shutil.copyfile(sweep_dir / "scale.png", args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
