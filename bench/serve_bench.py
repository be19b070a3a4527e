"""Load benchmark of fieldkube-serve: req/s and latency percentiles at concurrency 1, 4 and 16 on a
1280x720 count and a 2048x2048 segment, with batching on and off, side by side with the bare model's
batched forward pass over the same tiles, measured just before each level (serving overhead as a
ratio). Writes bench/results/serve.json.

It also reports the service's own CPU time per megapixel outside the forward pass (upload, decode, tile
cutting, stitching, encoding): the server process's CPU time over sequential requests minus the CPU time
of its forward passes, as the server measures it (and, as cross-checks, as its busiest thread's CPU and as
the bare forward's for the same tiles; CPU time throughout, so other load on the machine does not enter).
`--baseline-ref REF` runs a third server from that git commit's code (a worktree on PYTHONPATH, same models
and flags), measured in the same run; code without the forward CPU metric is measured by its busiest
thread: the before/after ratio.

GPU mode (`--gpu`, `make bench-serve-gpu`): the server and the bare forward run on CUDA in the service's
default GPU precision (bf16 autocast, channels_last), batching on only; each concurrency level is recorded
with its ratio to the bare forward. It runs from the packages' src/ folders, so a GPU host with torch and
the wheels of `make gpu-wheels` is enough (bench/README.md); `--gpu --device cpu` is a dry run anywhere.

Models have fixed random weights (speed does not depend on training); sizes are recorded in the output.
Traffic goes only to a server this script starts on 127.0.0.1 and stops at the end.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SRC = [ROOT / d / "src" for d in ("contract", "vision", "serving")]
sys.path[:0] = [str(p) for p in SRC]  # a GPU host runs the packages from here, not installed

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402

from cpu_timing import least_cpu_ms  # noqa: E402
from fieldkube.serving.inference import cut_tiles, plan_tiles  # noqa: E402
from fieldkube.serving.served_model import Task, pick_dtype  # noqa: E402
from fieldkube.serving.settings import default_batch_size  # noqa: E402
from fieldkube.vision.bundle import load_bundle, save_bundle  # noqa: E402
from fieldkube.vision.imageio import encode_png  # noqa: E402
from fieldkube.vision.models import build_model, count_parameters  # noqa: E402
from fieldkube.vision.normalize import batch_to_tensor  # noqa: E402
from fieldkube.vision.synthetic import make_aerial_scene, make_field_image  # noqa: E402

CONCURRENCY = (1, 4, 16)
SERVED_TASK: dict[str, Task] = {"count": "counter", "segment": "segmenter"}  # workload -> its task
WORKLOADS: dict[str, dict[str, Any]] = {
    "count": {
        "endpoint": "/v1/count",
        "model": "counter-mcnn",
        "params": {"width": 0.25},
        "tile": 224,
        "overlap": 32,
        "size": (720, 1280),
    },
    "segment": {
        "endpoint": "/v1/segment?mask=none",
        "model": "segmenter-unet",
        "params": {"base_channels": 4, "depth": 4, "dropout": 0.0},
        "tile": 256,
        "overlap": 32,
        "size": (2048, 2048),
    },
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_bundles(root: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    paths = {}
    for task, spec in WORKLOADS.items():
        model = build_model(spec["model"], **spec["params"])
        paths[task] = root / task
        save_bundle(paths[task], model, spec["model"], spec["params"], tile=spec["tile"])
    return paths


def make_image(task: str) -> np.ndarray:
    rng = np.random.default_rng(1)
    height, width = WORKLOADS[task]["size"]
    if task == "count":
        return make_field_image(rng, height, width, 80).image
    return make_aerial_scene(rng, height, width).image


class BareForward:
    """The model alone over one image's tiles (batched forward passes, no HTTP, decode or stitch), loaded
    once and measured as often as asked: next to each served measurement, so that the served / bare ratio
    compares two figures taken within seconds of each other. On a shared VM the forward's speed drifts by
    10-20 % from one minute to the next (the server's own forward CPU for the same 16 images read
    15.1-18.9 s over six runs), and one bare figure taken minutes before moved every ratio with it. The
    tiles are where the model is already, normalised, and model and tiles are channels_last, as the
    service runs them on every device, in the service's precision; on CUDA the clock stops after the
    device has finished."""

    def __init__(
        self,
        bundle: Path,
        image: np.ndarray,
        tile: int,
        overlap: int,
        batch: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.model = load_bundle(bundle, device=device).model
        plan = plan_tiles(image.shape[0], image.shape[1], tile, overlap, max_tiles=100_000)
        self.tiles = batch_to_tensor(cut_tiles(image, plan)).to(device)
        self.model.to(memory_format=torch.channels_last)
        self.batch, self.device, self.dtype = batch, device, dtype
        with torch.inference_mode():
            for _ in range(2):  # warm-up (cuDNN picks its kernels)
                self._one_image()

    def _one_image(self) -> None:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            for i in range(0, len(self.tiles), self.batch):
                self.model(self.tiles[i : i + self.batch])

    def measure(self, seconds: float) -> tuple[float, float]:
        """Images/s over at least `seconds` (two images at least), and CPU seconds per image (this
        process's CPU time: the same on a loaded machine)."""
        with torch.inference_mode():
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            images = 0
            start, cpu_start = time.perf_counter(), time.process_time()
            while images < 2 or time.perf_counter() - start < seconds:
                self._one_image()
                images += 1
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        return images / (time.perf_counter() - start), (time.process_time() - cpu_start) / images


def own_cpu_by_step(
    task: str, spec: dict[str, Any], body: bytes, batch: int, device: torch.device, repeats: int = 3
) -> dict[str, float]:
    """CPU ms of each step of the service's own work on one image, each run alone in this process (least
    of `repeats`, after a first call: steady state, e.g. the stitcher's cached blend layout): where the CPU
    outside the forward goes. The same functions the service calls, where it calls them: on CUDA the tiles
    are cut into pinned memory and normalised on the device (the host's part is the copy's and kernels'
    launch), and the maps are stitched where they are, from the batches they ran in, and counted or
    thresholded there (a device step's time includes waiting for the device). What is left of the
    server's total is HTTP, the upload, routing and the hand-offs between threads."""
    from fieldkube.serving.inference import PixelMap
    from fieldkube.serving.uploads import Upload, decode_image, read_header
    from fieldkube.vision.normalize import normalize_batch
    from fieldkube.vision.tiling import stitch

    cuda = device.type == "cuda"

    def finished(result: Any = None) -> Any:
        if cuda:
            torch.cuda.synchronize(device)
        return result

    def normalise(tiles: torch.Tensor) -> None:
        for i in range(0, len(tiles), batch):
            normalize_batch(tiles[i : i + batch].to(device, non_blocking=True))
        finished()

    with tempfile.TemporaryDirectory(prefix="serve-bench-steps-") as tmp:
        upload = Upload(Path(tmp) / "upload.png", "image/png", len(body))
        upload.path.write_bytes(body)
        header = read_header(upload, 10**9)
        image = decode_image(upload, header, 10**9)
        height, width = image.shape[:2]
        plan = plan_tiles(height, width, spec["tile"], spec["overlap"], 100_000)
        tiles = torch.from_numpy(cut_tiles(image, plan, pinned=cuda))
        size = spec["tile"]
        generator = torch.Generator().manual_seed(0)
        maps = torch.rand((len(plan.boxes), 1, size, size), generator=generator).to(device)
        pieces = list(maps.split(batch))  # as the batches return them
        stitched = PixelMap(
            stitch(pieces, plan.boxes, plan.padded_height, plan.padded_width)[0, :height, :width]
        )
        steps = {
            "read_header": lambda: read_header(upload, 10**9),
            "decode": lambda: decode_image(upload, header, 10**9),
            "cut_tiles": lambda: cut_tiles(image, plan, pinned=cuda),
            "normalise": lambda: normalise(tiles),
            "stitch": lambda: finished(stitch(pieces, plan.boxes, plan.padded_height, plan.padded_width)),
        }
        if task == "count":
            steps["counts"] = lambda: (stitched.total(), stitched.grid_counts(size))
        else:
            steps["mask"] = lambda: stitched.mask(0.5)
        return {name: least_cpu_ms(step, passes=repeats, warm_up=True) for name, step in steps.items()}


def queues_without_waiting(
    task: str, bundle: Path, image: np.ndarray, spec: dict[str, Any], args: Any
) -> str | None:
    """On CUDA: whether the service's model queues two batches (copy in, normalisation, forward) without
    the host waiting for the device, checked by torch's sync debug mode, which raises on any call that
    synchronises: "ok", or what synchronised. In the GPU mode's dry run on a CPU the same
    batches run unchecked and the answer is None; the CPU mode skips it (None)."""
    if not args.gpu:
        return None
    from fieldkube.serving.served_model import load_served_model

    cuda = args.device == "cuda"
    device = torch.device(args.device)
    model = load_served_model(bundle, SERVED_TASK[task], None, None, device, str(bundle), args.dtype)
    plan = plan_tiles(image.shape[0], image.shape[1], spec["tile"], spec["overlap"], 100_000)
    tiles = cut_tiles(image, plan, pinned=cuda)[: args.batch_size]
    model.forward(tiles)  # the caching allocators hold what the queued batches will use
    if cuda:
        torch.cuda.set_sync_debug_mode("error")
    try:
        pending = [model.prepare([tiles]), model.prepare([tiles])]
    except RuntimeError as error:
        if not cuda:
            raise
        return f"synchronised: {error}"
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
    for batch in pending:
        batch.result()
    return "ok" if cuda else None


@functools.cache
def _cli_help(pythonpath: str) -> str:
    """fieldkube-serve's --help as the code on this PYTHONPATH prints it: which flags a commit knows."""
    env = {**os.environ, "PYTHONPATH": pythonpath}
    command = [sys.executable, "-m", "fieldkube.serving.cli", "--help"]
    return subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout


class Server:
    """fieldkube-serve as a subprocess on a free loopback port."""

    def __init__(
        self,
        bundles: dict[str, Path],
        batch_size: int,
        args: Any,
        log: Path,
        code: Path | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable, "-m", "fieldkube.serving.cli",
            "--counter", str(bundles["count"]),
            "--segmenter", str(bundles["segment"]),
            "--port", str(self.port),
            "--max-batch-size", str(batch_size),
            "--max-queue-tiles", "100000",
            "--request-timeout-s", "600",
            "--torch-threads", str(args.threads),
            "--device", args.device,
            "--log-level", "warning",
        ]  # fmt: skip
        sources = SRC if code is None else [code / d / "src" for d in ("contract", "vision", "serving")]
        # this code's packages, or another commit's, ahead of the installed (editable) ones
        path = [*(str(p) for p in sources), os.environ.get("PYTHONPATH", "")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path).rstrip(os.pathsep)}
        # every closed-loop request admitted (the bench measures throughput, not shedding), in the
        # precision asked for; an older commit's server without these flags runs fp32 on a CPU, as auto does
        for flag, value in (("--precision", args.precision), ("--max-inflight-pixels", str(10**9))):
            if code is None or flag in _cli_help(env["PYTHONPATH"]):
                command += [flag, value]
        self._log = log.open("wb")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 300
        while True:
            try:
                if requests.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    return
            except requests.RequestException:  # not listening yet, or too busy to answer
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fieldkube-serve did not become ready; see {log}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


def load(url: str, body: bytes, concurrency: int, requests_total: int) -> dict[str, float]:
    """Closed-loop load: `concurrency` clients send `requests_total` requests; latency percentiles."""
    latencies: list[float] = []
    lock = threading.Lock()
    remaining = [requests_total]

    def client() -> None:
        with requests.Session() as session:
            while True:
                with lock:
                    if remaining[0] == 0:
                        return
                    remaining[0] -= 1
                start = time.perf_counter()
                response = session.post(url, data=body, headers={"Content-Type": "image/png"}, timeout=600)
                elapsed = time.perf_counter() - start
                if response.status_code != 200:
                    raise RuntimeError(f"{url}: {response.status_code} {response.text[:200]}")
                with lock:
                    latencies.append(elapsed)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for future in [pool.submit(client) for _ in range(concurrency)]:
            future.result()
    wall = time.perf_counter() - start
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    return {
        "requests": len(latencies),
        "rps": len(latencies) / wall,
        "p50_s": float(p50),
        "p95_s": float(p95),
        "p99_s": float(p99),
    }


def forward_cpu_seconds(server: Server) -> float | None:
    """The server's `fieldkube_serve_forward_cpu_seconds_total` over all tasks, or None where its code
    does not export it (a baseline from before it existed)."""
    text = requests.get(f"{server.url}/metrics", timeout=30).text
    if "# TYPE fieldkube_serve_forward_cpu_seconds" not in text:
        return None
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("fieldkube_serve_forward_cpu_seconds_total{")
    )


def thread_cpu(process: psutil.Process) -> dict[int, float]:
    """CPU seconds of each thread of `process` so far."""
    return {t.id: t.user_time + t.system_time for t in process.threads()}


def service_cpu(
    server: Server, url: str, body: bytes, megapixels: float, n: int, forward_cpu_s: float
) -> dict[str, float]:
    """CPU seconds per megapixel of the server process over `n` sequential requests: in all, in the
    model's forward passes and outside them (the service's own work). CPU time, not wall time: a loaded
    machine slows both alike.

    The forward passes' CPU is measured three ways. `forward_s_per_mp` is what the server measures on the
    thread that runs the model (exact with one torch thread), where its code exports it.
    `..._by_thread` is the busiest thread's CPU, read from the kernel's per-thread accounting: the thread
    that runs the forward passes (in this code it also normalises the tiles, so it reads a little high),
    the one exact method for code without the metric. `..._by_bare` is the bare forward's CPU for the same
    tiles in this bench process (the forward is most of a request, so a few per cent of difference between
    two processes' forwards moves that remainder a lot)."""
    process = psutil.Process(server.process.pid)
    forward_before = forward_cpu_seconds(server)
    threads_before = thread_cpu(process)
    cpu_before = sum(process.cpu_times()[:2])
    load(url, body, 1, n)
    cpu = sum(process.cpu_times()[:2]) - cpu_before
    threads_after = thread_cpu(process)
    forward_after = forward_cpu_seconds(server)
    busiest = max(used - threads_before.get(tid, 0.0) for tid, used in threads_after.items())
    served = n * megapixels
    bare = n * forward_cpu_s
    result = {
        "requests": n,
        "cpu_s_per_mp": cpu / served,
        "forward_s_per_mp_by_thread": busiest / served,
        "outside_forward_cpu_s_per_mp_by_thread": (cpu - busiest) / served,
        "forward_s_per_mp_by_bare": bare / served,
        "outside_forward_cpu_s_per_mp_by_bare": (cpu - bare) / served,
    }
    if forward_before is not None and forward_after is not None:
        forward = forward_after - forward_before
        result["forward_s_per_mp"] = forward / served
        result["outside_forward_cpu_s_per_mp"] = (cpu - forward) / served
    return result


def measure_task(
    task: str, spec: dict[str, Any], bundle: Path, body: bytes, servers: dict[str, Server], args: Any
) -> dict[str, Any]:
    """Bare forward, then each concurrency level on every server in turn (so load drift on a shared
    machine hits batching on and off alike)."""
    image = make_image(task)
    plan = plan_tiles(image.shape[0], image.shape[1], spec["tile"], spec["overlap"], 100_000)
    print(f"[{task}] bare forward ...", flush=True)
    entry: dict[str, Any] = {
        "image": f"{image.shape[1]}x{image.shape[0]}",
        "model": spec["model"],
        "model_params": spec["params"],
        "parameters": count_parameters(build_model(spec["model"], **spec["params"])),
        "tile": spec["tile"],
        "overlap": spec["overlap"],
        "tiles_per_image": len(plan.boxes),
        "png_bytes": len(body),
    }
    bare = BareForward(
        bundle, image, spec["tile"], spec["overlap"], args.batch_size, torch.device(args.device), args.dtype
    )
    entry["bare_forward_rps"], forward_cpu_s = bare.measure(args.bare_seconds)
    entry["bare_forward_cpu_s_per_image"] = forward_cpu_s
    device = torch.device(args.device)
    entry["own_cpu_ms_by_step"] = own_cpu_by_step(task, spec, body, args.batch_size, device)
    entry["prepare_queues_without_waiting"] = queues_without_waiting(task, bundle, image, spec, args)
    for server in servers.values():
        load(server.url + spec["endpoint"], body, 1, 1)  # warm-up
    for mode in servers:
        entry[mode] = {}
    megapixels = image.shape[0] * image.shape[1] / 1e6
    entry["service_cpu"] = {}
    for mode, server in servers.items():
        print(f"[{task}] {mode}: service CPU per megapixel ({args.cpu_requests} requests) ...", flush=True)
        entry["service_cpu"][mode] = service_cpu(
            server, server.url + spec["endpoint"], body, megapixels, args.cpu_requests, forward_cpu_s
        )
    for concurrency in CONCURRENCY:
        total = args.requests or max(2, concurrency) * (4 if args.gpu else 1)
        for mode, server in servers.items():
            print(f"[{task}] {mode} concurrency {concurrency}: {total} requests ...", flush=True)
            bare_rps, _ = bare.measure(args.bare_seconds)  # just before: the same state of the machine
            level = load(server.url + spec["endpoint"], body, concurrency, total)
            level["bare_forward_rps"] = bare_rps
            level["ratio_to_bare"] = level["rps"] / bare_rps
            entry[mode][str(concurrency)] = level
    return entry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/serve.json"))
    parser.add_argument(
        "--requests", type=int, default=0, help="requests per concurrency level c (default: max(2, c))"
    )
    parser.add_argument(
        "--bare-seconds",
        type=float,
        default=3.0,
        help="time spent measuring each bare forward (one before each level)",
    )
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads (server and bare)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=0, help="max batch size with batching on (default: the server's)"
    )
    parser.add_argument(
        "--cpu-requests", type=int, default=4, help="sequential requests per server for the CPU time per MP"
    )
    parser.add_argument(
        "--baseline-ref", default="", help="also serve (batching on) with this git commit's code, e.g. HEAD~3"
    )
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="GPU mode: device cuda (unless --device says otherwise), batching on only, 4x the requests",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="server and bare forward (auto: bf16 on a GPU that supports it, fp32 on CPU)",
    )
    parser.add_argument(
        "--default-models",
        action="store_true",
        help="the models at their default sizes instead of the small ones (what a trained bundle has)",
    )
    parser.add_argument(
        "--tasks",
        default=",".join(WORKLOADS),
        help="comma-separated workloads to measure (default: all; on a CPU the default-size segmenter "
        "takes minutes per request, so it is best run on its own with fewer requests)",
    )
    args = parser.parse_args()
    tasks = [task for task in args.tasks.split(",") if task]
    unknown = sorted(set(tasks) - set(WORKLOADS))
    if unknown or not tasks:
        parser.error(f"--tasks: expected some of {', '.join(WORKLOADS)}, got {args.tasks!r}")
    if args.default_models:
        for spec in WORKLOADS.values():
            spec["params"] = {}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop the server
    torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if args.gpu or torch.cuda.is_available() else "cpu"
    args.dtype = pick_dtype(args.precision, torch.device(args.device))
    args.batch_size = args.batch_size or default_batch_size(args.device)
    started = time.time()
    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        root = Path(tmp)
        bundles = make_bundles(root)
        bodies = {task: encode_png(make_image(task)) for task in tasks}
        results: dict[str, Any] = {}
        modes = {"batching_on": args.batch_size}
        if not args.gpu:  # a GPU host's minutes go to the configuration it serves with
            modes["batching_off"] = 1
        servers: dict[str, Server] = {}
        baseline = root / "baseline"
        try:
            for mode, batch_size in modes.items():  # both run at once; measurements alternate between them
                servers[mode] = Server(bundles, batch_size, args, root / f"serve-{mode}.log")
            if args.baseline_ref:
                git = ["git", "-C", str(ROOT)]
                subprocess.run(
                    [*git, "worktree", "add", "--detach", str(baseline), args.baseline_ref], check=True
                )
                servers["baseline"] = Server(
                    bundles, args.batch_size, args, root / "serve-baseline.log", code=baseline
                )
            for task in tasks:
                spec = WORKLOADS[task]
                results[task] = measure_task(task, spec, bundles[task], bodies[task], servers, args)
        finally:
            for server in servers.values():
                server.stop()
            if baseline.exists():
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline)], check=False
                )
        for task in tasks:
            entry = results[task]
            best = max(CONCURRENCY, key=lambda c: entry["batching_on"][str(c)]["rps"])
            best_on = entry["batching_on"][str(best)]["rps"]
            entry["best_concurrency"] = best
            entry["overhead_ratio"] = entry["batching_on"][str(best)]["ratio_to_bare"]
            if "batching_off" in entry:
                best_off = max(level["rps"] for level in entry["batching_off"].values())
                entry["batching_gain"] = best_on / best_off
            if "baseline" in entry:
                old = max(entry["baseline"].values(), key=lambda level: level["rps"])
                entry["baseline_overhead_ratio"] = old["ratio_to_bare"]
                used = entry["service_cpu"]
                this_code = used["batching_on"]["outside_forward_cpu_s_per_mp"]
                by_thread = used["baseline"]["outside_forward_cpu_s_per_mp_by_thread"]
                by_bare = used["baseline"]["outside_forward_cpu_s_per_mp_by_bare"]
                entry["service_cpu_reduction"] = by_thread / this_code
                entry["service_cpu_reduction_by_bare"] = (
                    by_bare / used["batching_on"]["outside_forward_cpu_s_per_mp_by_bare"]
                )
    report = {
        "benchmark": "serve",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": args.threads,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
            "precision": str(args.dtype).removeprefix("torch."),
            "load_average_at_start": load_at_start,
            "load_average_at_end": os.getloadavg()[0],
        },
        "definitions": {
            "rps": "completed requests per second (closed loop, PNG upload to JSON answer)",
            "ratio_to_bare": "rps at this concurrency / the bare forward's images per second measured just "
            "before it (the level's own bare_forward_rps)",
            "bare_forward_rps": "images per second of the model's batched forward over the same tiles alone "
            "(per task: at the start; per level: just before that level's requests)",
            "overhead_ratio": "ratio_to_bare of the served rps with batching at the best concurrency",
            "batching_gain": "best rps with batching on / best rps with batching off (max batch size 1)",
            "outside_forward_cpu_s_per_mp": "server CPU s per megapixel served, minus the CPU of its forward "
            "passes as the server measured it (fieldkube_serve_forward_cpu_seconds_total)",
            "outside_forward_cpu_s_per_mp_by_thread": "server CPU s per megapixel served, minus the CPU of "
            "its busiest thread (the one running the forward passes)",
            "outside_forward_cpu_s_per_mp_by_bare": "server CPU s per megapixel served, minus the bare "
            "forward's CPU for the same tiles",
            "service_cpu_reduction": "baseline's outside_forward_cpu_s_per_mp_by_thread / this code's "
            "outside_forward_cpu_s_per_mp (batching on)",
            "service_cpu_reduction_by_bare": "the same, both by the bare forward's CPU (noisy)",
            "own_cpu_ms_by_step": "CPU ms of each step of the service's own work on one image, each run "
            "alone in the bench process with this code (least of 3): read_header, decode, cut_tiles, "
            "normalise (in batches of max_batch_size), stitch, counts or mask",
            "prepare_queues_without_waiting": "CUDA: 'ok' when the service's model queued two batches "
            "with no call that waits for the device (torch sync debug mode); null on a CPU",
        },
        "max_batch_size": args.batch_size,
        "baseline_ref": args.baseline_ref or None,
        "results": results,
        "wall_s": time.time() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        json.dumps(
            {
                t: {
                    k: results[t][k]
                    for k in (
                        "bare_forward_rps",
                        "best_concurrency",
                        "overhead_ratio",
                        "batching_gain",
                        "baseline_overhead_ratio",
                        "service_cpu_reduction",
                        "service_cpu_reduction_by_bare",
                    )
                    if k in results[t]
                }
                for t in results
            }
        )
    )
    print(f"wrote {args.out} in {report['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
