"""GPU training throughput: fieldkube-train against the bare training step, per built-in model.

Meant for a GPU host with torch and no other project dependency installed beyond pydantic's wheels
(bench/README.md, "GPU mode"): everything runs from the packages' src/ folders. Per model, at its GPU
batch, on a prepared data set of at least 4,000 tiles:
  - bare step: forward, backward and Adam on tensors already on the GPU (same precision, same compile)
  - fieldkube-train: the real loader (workers, raw or PNG shards), loop and metrics, tracking off
Figures: bare img/s, fieldkube-train img/s (steady state and whole run, epoch starts included), ratio to
the bare step, epoch-start stall in step times, loader wait share, loader CPU ms per sample, MFU, GPU
utilisation (NVML, sampled during the run). `--device cpu` with small sizes is a dry run of the whole
script on any machine. Writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SRC = [ROOT / d / "src" for d in ("contract", "vision", "trainer")]
sys.path[:0] = [str(p) for p in SRC]

import torch  # noqa: E402

# Per model: task, batch on one GPU, torch.compile or not (as measured faster on an H200).
MODELS: dict[str, tuple[str, int, bool]] = {
    "counter-mcnn": ("counter", 128, True),
    "counter-fcrn": ("counter", 128, False),
    "segmenter-unet": ("segmenter", 64, True),
}


REPORTED = (
    "precision",
    "train_images_per_second",
    "run_images_per_second",
    "loader_wait_share",
    "epoch_start_stall_steps",
    "loader_cpu_ms_per_sample",
    "mfu",
    "run_mfu",
    "gpu_utilisation_mean",
    "train_gflops_per_image",
)


def _env(threads: int) -> dict[str, str]:
    path = os.pathsep.join([*(str(p) for p in SRC), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path.rstrip(os.pathsep), "OMP_NUM_THREADS": str(threads)}
    env.pop("MLFLOW_TRACKING_URI", None)  # tracking off: nothing but the run itself is measured
    return env


def prepare(task: str, root: Path, tiles: int, tile: int, workers: int) -> None:
    side = 4 * tile  # 16 tiles per synthetic image
    images = max(1, -(-tiles // 16))
    source = "field" if task == "counter" else "aerial"
    subprocess.run(
        [sys.executable, "-m", "fieldkube.trainer.prepare", "--synthetic", source,
         "--num-images", str(images), "--image-size", f"{side}x{side}", "--tile", str(tile),
         "--split", "100/0", "--no-balance",
         "--workers", str(workers), "--pixels", ARGS.pixels, "--out", str(root)],
        check=True, env=_env(1), capture_output=True, text=True,
    )  # fmt: skip


def bare_step(name: str, batch: int, tile: int, device: torch.device, compile_model: bool) -> float:
    """Images/s of forward + backward + Adam on fixed tensors already on the device."""
    from fieldkube.trainer.losses import resolve_loss
    from fieldkube.trainer.precision import device_precision
    from fieldkube.vision.models import build_model, task_of

    torch.manual_seed(0)
    model = build_model(name).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if compile_model and device.type == "cuda" else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    _, loss_fn = resolve_loss("auto", task_of(name))
    precision = device_precision(ARGS.precision, device)
    inputs = torch.randn(batch, 3, tile, tile, device=device)
    if device.type == "cuda":
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    targets = (torch.rand(batch, 1, tile, tile, device=device) < 0.01).float()

    def step() -> None:
        optimizer.zero_grad()
        with torch.autocast(device.type, dtype=precision.autocast_dtype, enabled=precision.autocast):
            output = forward(inputs)
        loss_fn(output.float(), targets).backward()
        optimizer.step()

    for _ in range(ARGS.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(ARGS.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * ARGS.steps / (time.perf_counter() - began)


class GpuSampler:
    """GPU utilisation (%) every 0.2 s while a run lasts (NVML; nothing on a CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._handle: Any = None
        if device.type == "cuda":
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while self._handle is not None and not self._stop.wait(0.2):
            self.samples.append(float(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu))

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def fieldkube_train(
    name: str, data: Path, out: Path, batch: int, device: torch.device, compile_model: bool
) -> dict[str, Any]:
    sets = {
        "model.name": name, "output_dir": str(out), "train.batch_size": batch, "train.epochs": ARGS.epochs,
        "train.evaluate": "false", "train.log_every_steps": 10, "data.loader_workers": ARGS.loader_workers,
        "data.prefetch": 4, "runtime.device": device.type, "runtime.precision": ARGS.precision,
        "runtime.compile": str(compile_model).lower(), "metrics.port": 0, "checkpoint.every_epochs": "null",
    }  # fmt: skip
    cmd = [sys.executable, "-m", "fieldkube.trainer.cli", "--data", str(data)]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    with GpuSampler(device) as sampler:
        proc = subprocess.run(cmd, env=_env(ARGS.threads), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"fieldkube-train failed for {name}:\n{proc.stderr[-4000:]}")
    trained = dict(json.loads((out / "summary.json").read_text())["trained"])
    busy = sampler.samples
    trained["gpu_utilisation_mean"] = sum(busy) / len(busy) if busy else None
    return trained


def main() -> None:
    device = torch.device(ARGS.device)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    }
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fieldkube-gpu-bench-") as tmp:
        datasets: dict[str, Path] = {}
        for name in ARGS.models:
            task, default_batch, default_compile = MODELS[name]
            if task not in datasets:
                datasets[task] = Path(tmp) / task
                t0 = time.perf_counter()
                prepare(task, datasets[task], ARGS.tiles, ARGS.tile, os.cpu_count() or 1)
                print(f"prepared {ARGS.tiles}+ {task} tiles in {time.perf_counter() - t0:.0f} s", flush=True)
            batch = ARGS.batch or default_batch
            compile_model = default_compile if ARGS.compile == "auto" else ARGS.compile == "on"
            bare = bare_step(name, batch, ARGS.tile, device, compile_model)
            trained = fieldkube_train(name, datasets[task], Path(tmp) / name, batch, device, compile_model)
            row = {
                "batch": batch,
                "compile": compile_model,
                "bare_images_per_second": round(bare, 1),
                **{k: trained.get(k) for k in REPORTED},
            }
            steady, whole = row["train_images_per_second"], row["run_images_per_second"]
            row["steady_ratio_to_bare"] = round(steady / bare, 3) if steady else None
            row["run_ratio_to_bare"] = round(whole / bare, 3) if whole else None
            results[name] = row
            print(f"{name}: {json.dumps(row)}", flush=True)
    results.update(
        {
            "tiles": ARGS.tiles, "tile": ARGS.tile, "epochs": ARGS.epochs, "pixels": ARGS.pixels,
            "loader_workers": ARGS.loader_workers, "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "seconds": round(time.perf_counter() - began, 1),
        }
    )  # fmt: skip
    ARGS.out.parent.mkdir(parents=True, exist_ok=True)
    ARGS.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {ARGS.out} ({results['seconds']} s)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/train_gpu.json"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--tiles", type=int, default=4096)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--batch", type=int, default=0, help="0: each model's GPU batch")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30, help="timed bare steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed bare steps (compile, autotune)")
    parser.add_argument("--loader-workers", type=int, default=8)
    parser.add_argument("--threads", type=int, default=4, help="torch CPU threads of fieldkube-train")
    parser.add_argument("--pixels", choices=["raw", "png"], default="raw")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    return parser


ARGS = _parser().parse_args() if __name__ == "__main__" else _parser().parse_args([])

if __name__ == "__main__":
    main()
