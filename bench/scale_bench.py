"""Scaling benchmark: `fieldkube-scale` over 1 and 2 workers (Horovod and DDP) on a synthetic dataset.

Weak scaling as in seeds 002/003/004: the per-worker batch stays fixed, each worker gets
--threads-per-worker CPU threads, the counts alternate over --repeat rounds (median), and
speedup = throughput(N) / throughput(1), efficiency = speedup / N.
On a 2-core machine 2 workers is the honest ceiling. Writes bench/scale_bench.json (both launchers) and
each sweep's scale.json / scale.png under --work.
"""

from __future__ import annotations

import argparse
import json
import os
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
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=3, help="alternating rounds (median per count)")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    began = time.perf_counter()
    data = args.work / "data"
    if not (data / "manifest.json").is_file():
        subprocess.run(
            [str(BIN / "fieldkube-prepare"), "--synthetic", "field", "--num-images", "16", "--image-size",
             f"{2 * args.tile}x{3 * args.tile}", "--tile", str(args.tile), "--no-balance", "--split", "90/10",
             "--workers", "2", "--out", str(data)],
            check=True, capture_output=True, env=launcher_env(1),
        )  # fmt: skip
    sweeps = {}
    for launcher in ("horovod", "ddp"):
        print(f"{launcher}:", flush=True)
        sweeps[launcher] = scale(
            ["--data", str(data), "--out", str(args.work / launcher), "--workers", args.workers,
             "--launcher", launcher, "--steps", str(args.steps), "--batch", str(args.batch),
             "--repeat", str(args.repeat),
             "--threads-per-worker", "1", "--set", "data.loader_workers=0"]
        )  # fmt: skip
    output = {
        "sweeps": sweeps,
        "tile": args.tile,
        "cpu_count": os.cpu_count(),
        "seconds": round(time.perf_counter() - began, 1),
        "command": " ".join(["bench/scale_bench.py", *sys.argv[1:]]),
    }
    args.out.write_text(json.dumps(output, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
