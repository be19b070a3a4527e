"""Real fieldkube processes under a short load, scraped by a real Prometheus, drawn to one PNG per dashboard.

The pictures in docs/dashboards/ are meant to show what the dashboards look like on real metrics, not on
numbers typed in for the purpose. This script starts Debian's Prometheus (1 s scrapes), trains the flower
counter with two Horovod ranks and the building segmenter with one rank (`fieldkube-train`, tiny
synthetic datasets), launches a third run that fails on a missing dataset, then serves both trained
bundles with `fieldkube-serve` and sends it concurrent count and segment requests, some too large (413)
and some bursts beyond its queue (429). The operator needs a Kubernetes API to run, so its own metric
registry is served here and fed by its own `record_phase` and reconcile timer from the real processes'
lifetimes (created at launch, Running at the first scrape, Succeeded or Failed at exit). The renderer
then draws every dashboard over the whole run. `make dashboards-example` writes docs/dashboards/*.png
(about 5 minutes on 2 cores). On a machine without a GPU the DCGM panels say "No data".
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

from fieldkube.operator import metrics as operator_metrics
from fieldkube.operator.reconcile import timed
from fieldkube.trainer.prepare import run as prepare
from fieldkube.vision.synthetic import make_aerial_scene, make_field_image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import render_dashboards  # a sibling script of hack/, not a package

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCRAPE_S = 1


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port(pair: bool = False) -> int:
    """A free loopback port; with `pair`, one whose successor is free too (two ranks serve on p and p + 1)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if not pair:
            return port
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def wait_until(check: object, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not callable(check) or not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.5)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(OMP_NUM_THREADS="1", HOROVOD_GLOO_IFACE="lo", OMPI_MCA_btl_tcp_if_include="lo")
    env.pop("MLFLOW_TRACKING_URI", None)  # no tracking: the example needs only the metrics
    return env


@dataclass
class Job:
    """One training process seen as the operator sees a TrainingJob: created, Running, then done."""

    name: str
    command: list[str]
    metrics_url: str
    log: Path
    phase: str | None = None
    created: str = ""
    started: str | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def launch(self, env: dict[str, str]) -> None:
        self.created = now_iso()
        self.proc = subprocess.Popen(
            self.command, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=env
        )
        self.move("Pending")

    def reconcile(self) -> bool:
        """The operator's timer: advance the phase from what the process shows; True while not finished."""
        assert self.proc is not None
        code = self.proc.poll()
        if code is None:
            if self.phase == "Pending" and http_ok(self.metrics_url):
                self.started = now_iso()
                self.move("Running")
            else:
                self.move(self.phase or "Pending")
            return True
        self.move("Succeeded" if code == 0 else "Failed", "" if code == 0 else "Error")
        return False

    def move(self, phase: str, reason: str = "") -> None:
        with timed("sync"):  # as the operator counts its syncs
            operator_metrics.record_phase(
                self.name, "fieldkube", self.phase, phase, self.created, self.started,
                now_iso() if phase in {"Succeeded", "Failed"} else None, 0, reason, datetime.now(UTC),
            )  # fmt: skip
        self.phase = phase


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def prepare_data(state: Path) -> dict[str, Path]:
    """Tiny synthetic field and aerial datasets of 64-pixel tiles."""
    out = {}
    for kind in ("field", "aerial"):
        path = state / "data" / kind
        shape = ["--num-images", "8", "--image-size", "128x192", "--tile", "64", "--no-balance"]
        prepare(["--synthetic", kind, *shape, "--workers", "1", "--seed", "1", "--out", str(path)])
        out[kind] = path
    return out


def train_command(task: str, data: Path, state: Path, port: int, steps: int, ranks: int) -> list[str]:
    counter = task == "counter"
    settings = {
        "model.name": "counter-mcnn" if counter else "segmenter-unet",
        "model.params": json.dumps({"width": 0.5} if counter else {"base_channels": 8, "depth": 3}),
        "data.path": str(data),
        "data.loader_workers": "0",
        "train.epochs": "1000",
        "train.max_steps": str(steps),
        "train.batch_size": "4",
        "train.loss": "pixel_mse" if counter else "bce_dice",
        "train.log_every_steps": "5",
        "train.evaluate": "false",
        "tracking.run_name": "flower-counter" if counter else "building-segmenter",
        "tracking.system_metrics": "false",
        "metrics.port": str(port),
        "metrics.address": "127.0.0.1",
        "runtime.threads": "1",
        "output_dir": str(state / "outputs" / task),
    }
    launcher = [str(BIN / "fieldkube-train")]
    if ranks > 1:
        launcher = [str(BIN / "horovodrun"), "-np", str(ranks), "-H", f"localhost:{ranks}", "--gloo",
                    "--network-interface", "lo", *launcher]  # fmt: skip
    return launcher + [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def serve_load(url: str, seconds: float, workers: int = 2) -> dict[int, int]:
    """Concurrent count and segment requests (77 and 49 tiles of 64 px); one in ten too large (413); bursts
    of 6 field images overfill the 160-tile queue (429)."""
    rng = np.random.default_rng(7)
    field_png = png_bytes(make_field_image(rng, 256, 384, 20, hazards=()).image)
    aerial_png = png_bytes(make_aerial_scene(rng, 256, 256).image)
    big_png = png_bytes(make_aerial_scene(rng, 768, 768).image)
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def post(path: str, body: bytes) -> None:
        request = urllib.request.Request(f"{url}{path}", data=body, headers={"Content-Type": "image/png"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                code = int(response.status)
        except urllib.error.HTTPError as error:
            code = error.code
        with lock:
            statuses[code] = statuses.get(code, 0) + 1

    def client(n: int) -> None:
        i = 0
        while time.monotonic() < deadline:
            i += 1
            if i % 10 == n % 10:
                post("/v1/segment", big_png)
            else:
                post("/v1/count" if (i + n) % 2 else "/v1/segment", field_png if (i + n) % 2 else aerial_png)

    with ThreadPoolExecutor(workers * 3) as pool:
        for n in range(workers):
            pool.submit(client, n)
        while time.monotonic() < deadline - 5:  # every 15 s a burst overfills the queue
            time.sleep(15)
            for _ in range(6):
                pool.submit(post, "/v1/count", field_png)
    return statuses


def start_prometheus(state: Path, targets: dict[str, list[str]]) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("prometheus is not on PATH (`make dev` installs Debian's package)")
    config = {
        "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
        "scrape_configs": [{"job_name": n, "static_configs": [{"targets": t}]} for n, t in targets.items()],
    }
    (state / "prometheus.yml").write_text(json.dumps(config))
    port = free_port()
    proc = subprocess.Popen(
        [binary, f"--config.file={state / 'prometheus.yml'}", f"--storage.tsdb.path={state / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=(state / "prometheus.log").open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_ok(f"{url}/-/ready"), "Prometheus")
    return proc, url


def run(state: Path, out: Path, train_steps: int, serve_seconds: float) -> dict[Path, dict[str, int]]:
    began = time.time()
    env = child_env()
    data = prepare_data(state)
    ports = {"counter": free_port(pair=True), "segmenter": free_port(), "failing": free_port()}
    serve_port, operator_port = free_port(), free_port()
    operator_metrics.serve(operator_port, "127.0.0.1")
    targets = {
        "fieldkube-train": [
            f"127.0.0.1:{p}" for p in (ports["counter"], ports["counter"] + 1, ports["segmenter"])
        ],
        "fieldkube-serve": [f"127.0.0.1:{serve_port}"],
        "fieldkube-operator": [f"127.0.0.1:{operator_port}"],
    }
    prometheus, prometheus_url = start_prometheus(state, targets)
    children: list[subprocess.Popen[bytes]] = [prometheus]
    try:
        say(f"Prometheus at {prometheus_url}; training the counter (2 ranks) and the segmenter (1 rank)")
        jobs = [
            Job(task, train_command(task, data[kind], state, ports[task], train_steps, ranks),
                f"http://127.0.0.1:{ports[task]}/metrics", state / f"train-{task}.log")
            for task, kind, ranks in (("counter", "field", 2), ("segmenter", "aerial", 1))
        ]  # fmt: skip
        missing = state / "data" / "missing"
        failing = train_command("counter", missing, state, ports["failing"], 10, 1)
        failing_url = f"http://127.0.0.1:{ports['failing']}/metrics"
        jobs.append(Job("failing", failing, failing_url, state / "train-failing.log"))
        for job in jobs:
            job.launch(env)
            children.append(job.proc)  # type: ignore[arg-type]
        while any([job.reconcile() for job in jobs]):  # every job advances each round
            time.sleep(2)
        for job in jobs[:2]:
            if job.phase != "Succeeded":
                raise RuntimeError(f"training {job.name} failed: {job.log.read_text()[-2000:]}")
        say(f"trained; serving both bundles for {serve_seconds:.0f} s under load")
        serve = subprocess.Popen(
            [str(BIN / "fieldkube-serve"), "--counter", str(state / "outputs" / "counter" / "model"),
             "--segmenter", str(state / "outputs" / "segmenter" / "model"), "--port", str(serve_port),
             "--max-upload-bytes", "600000", "--max-queue-tiles", "160", "--poll-interval-s", "0",
             "--torch-threads", "1"],
            stdout=(state / "serve.log").open("w"), stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        children.append(serve)
        wait_until(lambda: http_ok(f"http://127.0.0.1:{serve_port}/v2/health/ready"), "fieldkube-serve", 180)
        statuses = serve_load(f"http://127.0.0.1:{serve_port}", serve_seconds)
        say(f"responses by status: {dict(sorted(statuses.items()))}")
        time.sleep(3 * SCRAPE_S)  # the last requests scraped
        minutes = (time.time() - began) / 60
        return render_dashboards.render_all(
            render_dashboards.DASHBOARDS, prometheus_url, render_dashboards.window_for(minutes), {}, out
        )
    finally:
        for proc in reversed(children):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboards", help="folder for the PNGs")
    parser.add_argument("--train-steps", type=int, default=200, help="optimizer steps of each training run")
    parser.add_argument("--serve-seconds", type=float, default=90.0, help="how long the service is loaded")
    parser.add_argument("--keep", type=Path, help="keep the run's state (logs, TSDB) in this folder")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fieldkube-dashboards-") as tmp:
        state = args.keep or Path(tmp)
        state.mkdir(parents=True, exist_ok=True)
        drawn = run(state, args.out, args.train_steps, args.serve_seconds)
    for png, counts in drawn.items():
        empty = [title for title, n in counts.items() if n == 0]
        say(f"wrote {png}" + (f" (no data: {', '.join(empty)})" if empty else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
