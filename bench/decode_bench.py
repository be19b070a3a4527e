"""PNG decoding, side by side: the decoder `fieldkube.vision.imageio` uses for plain 8-bit PNGs (libspng
through imagecodecs) against Pillow, on a 256 px training tile and a 2048x2048 upload, in one run.

For each: CPU ms per image on one thread (`time.thread_time`, least of 3 passes), and how many times
faster the same number of images decode on every core than on one (wall time). A decoder that holds the
GIL gets no faster with threads: the service decodes concurrent uploads in threads, so that ratio is how
far its decoding scales with the host's cores. Writes JSON (--out).
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import platform
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imagecodecs
import numpy as np
from PIL import Image

from cpu_timing import least_cpu_ms
from fieldkube.vision.imageio import encode_png, read_image
from fieldkube.vision.synthetic import make_field_image

Decoder = Callable[[bytes], np.ndarray]
DECODERS: dict[str, Decoder] = {
    "imagecodecs_spng": imagecodecs.spng_decode,
    "pillow": lambda data: np.asarray(Image.open(io.BytesIO(data)).convert("RGB")),
}


def thread_speedup(decode: Decoder, data: bytes, repeats: int, threads: int) -> float:
    """Wall time of `repeats * threads` decodes on one thread over the same on `threads` threads."""

    def run(workers: int) -> float:
        with ThreadPoolExecutor(workers) as pool:
            began = time.perf_counter()
            list(pool.map(lambda _: decode(data), range(repeats * threads)))
            return time.perf_counter() - began

    run(threads)  # threads started, code warm
    return min(run(1) for _ in range(2)) / min(run(threads) for _ in range(2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/decode.json"))
    args = parser.parse_args(argv)
    threads = os.cpu_count() or 1
    rng = np.random.default_rng(0)
    results: dict[str, dict[str, float | int]] = {}
    for size, repeats in ((256, 100), (2048, 3)):
        image = make_field_image(rng, size, size, max(1, size // 16)).image
        data = encode_png(image)
        for name, decode in DECODERS.items():
            if not np.array_equal(decode(data), read_image(data)):
                raise SystemExit(f"{name} decodes the {size} px PNG to other pixels than read_image")
            one = functools.partial(decode, data)
            row = {
                "png_bytes": len(data),
                "cpu_ms": round(least_cpu_ms(one, calls=repeats, clock=time.thread_time), 3),
                "thread_speedup": round(thread_speedup(decode, data, repeats, threads), 2),
            }
            results[f"{name}_{size}px"] = row
            speedup = f"x{row['thread_speedup']} on {threads} threads"
            print(f"{name:17s} {size:5d} px: {row['cpu_ms']:8.2f} ms CPU, {speedup}")
    report = {
        "benchmark": "decode",
        "machine": {"cpus": threads, "platform": platform.platform(), "imagecodecs": imagecodecs.__version__},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
