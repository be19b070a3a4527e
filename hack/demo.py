"""`make demo`: the whole fieldkube flow on one machine, so a newcomer sees the system do its job.

MLflow server (SQLite + local artifacts) → synthetic field and aerial datasets prepared with
`fieldkube-prepare` → counter and segmenter trained with 2 Horovod ranks each (`horovodrun`, Gloo,
localhost) and registered as `@champion` → `fieldkube-serve` loading both from the registry → a new field
image and a new aerial image (seeds neither model trained on) sent over HTTP → overlays and
`summary.json` in the output directory. What is expensive (datasets, trained models) is cached in the
state directory and reused when the demo runs again with the same settings.

    python hack/demo.py up [--small] [--detach]     # start (Ctrl-C stops, unless --detach)
    python hack/demo.py down                         # stop a detached demo
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEFAULT_STATE = Path(os.environ.get("FIELDKUBE_CACHE", Path.home() / ".cache" / "fieldkube")) / "demo"
START = time.monotonic()


@dataclass(frozen=True)
class Size:
    """How much data and training the demo spends; `small` is the end-to-end test's size."""

    field_images: int
    field_image_size: str
    aerial_images: int
    aerial_image_size: str
    counter_epochs: int
    segmenter_epochs: int
    counter_params: dict[str, Any]
    segmenter_params: dict[str, Any]
    counter_lr: float
    segmenter_lr: float


FULL = Size(
    field_images=64,
    field_image_size="448x672",
    aerial_images=16,
    aerial_image_size="512x512",
    counter_epochs=10,
    segmenter_epochs=8,
    counter_params={"width": 1.0},
    segmenter_params={"base_channels": 8, "depth": 3},
    counter_lr=1.5e-3,
    segmenter_lr=2e-3,
)
SMALL = Size(
    field_images=48,
    field_image_size="224x448",
    aerial_images=24,
    aerial_image_size="256x256",
    counter_epochs=12,
    segmenter_epochs=12,
    counter_params={"width": 0.5},
    segmenter_params={"base_channels": 8, "depth": 3},
    counter_lr=1.5e-3,
    segmenter_lr=2e-3,
)


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and where its log is."""


def say(message: str) -> None:
    print(f"[demo {time.monotonic() - START:6.1f}s] {message}", flush=True)


def free_port(preferred: int) -> int:
    """`preferred` if it is free on loopback, else any free port."""
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise DemoError("no free TCP port on 127.0.0.1")


def tool_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    env["HOROVOD_GLOO_IFACE"] = "lo"
    env.update(extra or {})
    return env


def run_step(title: str, cmd: list[str], log: Path, env: dict[str, str]) -> None:
    """Run one command to completion, streaming its progress lines and keeping a full log."""
    say(f"{title}: {' '.join(cmd)}")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as sink:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            sink.write(line)
            stripped = line.rstrip()
            if stripped:
                print(f"    {stripped[-160:]}", flush=True)
        code = proc.wait()
    if code != 0:
        raise DemoError(f"{title} failed (exit {code}); full log: {log}")


def start_service(name: str, cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    say(f"starting {name}: {' '.join(cmd)}")
    with log.open("wb") as sink:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_http(url: str, proc: subprocess.Popen[bytes], name: str, log: Path, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"{name} exited with {proc.returncode} before it was ready; log: {log}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise DemoError(f"{name} not ready at {url} after {timeout_s:.0f}s; log: {log}")


def stop(pids: list[int]) -> None:
    """Stop service process groups: SIGTERM, then SIGKILL after a grace period."""
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + 15
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


def prepare(state: Path, size: Size, env: dict[str, str]) -> dict[str, Path]:
    """Generate and prepare both synthetic datasets once per size (cached)."""
    datasets = {}
    for kind, count, image_size, split in (
        ("field", size.field_images, size.field_image_size, "70/30"),
        ("aerial", size.aerial_images, size.aerial_image_size, "60/20/20"),
    ):
        key = hashlib.sha256(f"{kind}-{count}-{image_size}-{split}-nobalance".encode()).hexdigest()[:10]
        out = state / "data" / f"{kind}-{key}"
        if (out / "manifest.json").exists():
            say(f"{kind} dataset: cached at {out}")
        else:
            cmd = [str(BIN / "fieldkube-prepare"), "--synthetic", kind, "--num-images", str(count)]
            cmd += [
                "--image-size",
                image_size,
                "--split",
                split,
                "--workers",
                "2",
                "--seed",
                "1",
                "--no-balance",  # keep every tile: the demo's datasets are small
                "--out",
                str(out),
            ]
            run_step(f"prepare {kind} dataset", cmd, state / "logs" / f"prepare-{kind}.log", env)
        datasets[kind] = out
    return datasets


def train_config(task: str, size: Size, data: Path, state: Path, metrics_port: int) -> dict[str, Any]:
    counter = task == "counter"
    return {
        "model": {
            "name": "counter-mcnn" if counter else "segmenter-unet",
            "params": size.counter_params if counter else size.segmenter_params,
        },
        "data": {"path": str(data), "loader_workers": 0},
        "train": {
            "epochs": size.counter_epochs if counter else size.segmenter_epochs,
            "batch_size": 4,
            "lr": size.counter_lr if counter else size.segmenter_lr,
            "loss": "pixel_mse" if counter else "bce_dice",
            "log_every_steps": 5,
            "seed": 0,
        },
        "checkpoint": {"dir": str(state / "checkpoints" / task), "every_epochs": 1},
        "tracking": {
            "experiment": "fieldkube-demo",
            "run_name": f"demo-{task}",
            "alias": "champion",
            "run_id_file": str(state / f"{task}.run_id"),
            "system_metrics": False,
        },
        "metrics": {"port": metrics_port, "address": "127.0.0.1"},
        "runtime": {"backend": "horovod", "threads": 1},
        "output_dir": str(state / "outputs" / task),
    }


def free_port_pair(preferred: int) -> int:
    """A port p with p and p + 1 both free (the two ranks of one training run serve on p + local_rank)."""
    for candidate in (preferred, *range(20000, 30000, 7)):
        if free_port(candidate) == candidate and free_port(candidate + 1) == candidate + 1:
            return candidate
    raise DemoError("no two consecutive free TCP ports on 127.0.0.1")


def write_prometheus_config(state: Path, serve_port: int, metrics_ports: dict[str, int]) -> Path:
    """Scrape the serving app and every training rank every 2 s; load the project's alert rules."""
    training_targets = [f"127.0.0.1:{port + rank}" for port in metrics_ports.values() for rank in (0, 1)]
    config = {
        "global": {"scrape_interval": "2s", "evaluation_interval": "10s"},
        "rule_files": [str(ROOT / "charts" / "fieldkube" / "files" / "prometheus-rules.yaml")],
        "scrape_configs": [
            {"job_name": "fieldkube-serve", "static_configs": [{"targets": [f"127.0.0.1:{serve_port}"]}]},
            {"job_name": "fieldkube-train", "static_configs": [{"targets": training_targets}]},
        ],
    }
    path = state / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def registered_champion(mlflow_uri: str, name: str, config_hash: str) -> str | None:
    """The champion version of `name` if it was trained from exactly this configuration."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    try:
        version = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None
    if version.run_id is None:
        return None
    run = client.get_run(version.run_id)
    return str(version.version) if run.data.tags.get("fieldkube.demo.config") == config_hash else None


def train(
    state: Path,
    size: Size,
    datasets: dict[str, Path],
    mlflow_uri: str,
    env: dict[str, str],
    metrics_ports: dict[str, int],
) -> dict[str, Any]:
    """Train (or reuse) both models with 2 Horovod ranks each and register them as @champion."""
    trained: dict[str, Any] = {}
    for task, kind, registered in (
        ("counter", "field", "fieldkube-counter"),
        ("segmenter", "aerial", "fieldkube-segmenter"),
    ):
        metrics_port = metrics_ports[task]
        config = train_config(task, size, datasets[kind], state, metrics_port)
        stable = {k: v for k, v in config.items() if k not in ("metrics",)}
        config_hash = hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:12]
        version = registered_champion(mlflow_uri, registered, config_hash)
        if version is not None:
            say(f"{task}: {registered} v{version} @champion was trained from this configuration: reused")
            trained[task] = {"registered_model": registered, "version": version, "reused": True}
            continue
        config_path = state / f"{task}.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        say(
            f"{task}: training with 2 Horovod ranks; rank metrics at http://127.0.0.1:{metrics_port}/metrics "
            f"and :{metrics_port + 1}/metrics while it runs (scraped by Prometheus)"
        )
        cmd = [
            str(BIN / "horovodrun"),
            "-np",
            "2",
            "-H",
            "localhost:2",
            "--gloo",
            "--network-interface",
            "lo",
        ]
        cmd += [str(BIN / "fieldkube-train"), "--config", str(config_path)]
        train_env = {**env, "MLFLOW_TRACKING_URI": mlflow_uri, "FIELDKUBE_DEMO_CONFIG": config_hash}
        run_step(f"train {task}", cmd, state / "logs" / f"train-{task}.log", train_env)
        run_id = (state / f"{task}.run_id").read_text().strip()
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
        client.set_tag(run_id, "fieldkube.demo.config", config_hash)
        champion = client.get_model_version_by_alias(registered, "champion")
        if champion.run_id != run_id:
            raise DemoError(f"{registered}@champion points at run {champion.run_id}, expected {run_id}")
        trained[task] = {"registered_model": registered, "version": str(champion.version), "run_id": run_id}
    return trained


def post_image(url: str, png: bytes) -> dict[str, Any]:
    request = urllib.request.Request(url, data=png, headers={"Content-Type": "image/png"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return dict(json.loads(response.read()))
    except urllib.error.HTTPError as err:
        raise DemoError(f"POST {url} failed: {err.code} {err.read().decode(errors='replace')}") from err


def fetch_bytes(url: str, png: bytes) -> bytes:
    request = urllib.request.Request(url, data=png, headers={"Content-Type": "image/png"}, method="POST")
    with urllib.request.urlopen(request, timeout=300) as response:
        return bytes(response.read())


def query_service(serve_url: str, out: Path, small: bool) -> dict[str, Any]:
    """Send a new field image and a new aerial image; save overlays; return the measured results."""
    from fieldkube.vision.imageio import encode_png
    from fieldkube.vision.synthetic import make_aerial_scene, make_field_image

    rng = np.random.default_rng(20261123)  # neither dataset used this seed
    field_h, field_w = (448, 448) if small else (720, 1280)
    field = make_field_image(rng, field_h, field_w, n_flowers=30 if small else 60)
    aerial = make_aerial_scene(rng, 512 if small else 1024, 512 if small else 1024)
    out.mkdir(parents=True, exist_ok=True)
    field_png, aerial_png = encode_png(field.image), encode_png(aerial.image)
    (out / "field-input.png").write_bytes(field_png)
    (out / "aerial-input.png").write_bytes(aerial_png)

    say("asking the service to count flowers in a new 1280x720 field image" if not small else "counting")
    counted = post_image(f"{serve_url}/v1/count?output=json", field_png)
    (out / "field-overlay.png").write_bytes(fetch_bytes(f"{serve_url}/v1/count?output=overlay", field_png))
    say("asking the service to segment buildings in a new aerial image")
    segmented = post_image(f"{serve_url}/v1/segment?output=json", aerial_png)
    mask_png = fetch_bytes(f"{serve_url}/v1/segment?output=png", aerial_png)
    (out / "aerial-mask.png").write_bytes(mask_png)
    predicted = np.asarray(Image.open(io.BytesIO(mask_png)).convert("L")) > 127
    truth = np.asarray(aerial.mask) > 0
    union = int(np.logical_or(predicted, truth).sum())
    iou = float(np.logical_and(predicted, truth).sum() / union) if union else 1.0
    (out / "aerial-overlay.png").write_bytes(
        fetch_bytes(f"{serve_url}/v1/segment?output=overlay", aerial_png)
    )
    return {
        "count": counted["count"],
        "count_rounded": counted.get("count_rounded"),
        "count_ground_truth": len(field.points),
        "counter_model": counted.get("model"),
        "building_fraction": segmented["building_fraction"],
        "building_fraction_ground_truth": float(truth.mean()),
        "building_iou": iou,
        "segmenter_model": segmented.get("model"),
    }


def up(args: argparse.Namespace) -> int:
    size = SMALL if args.small else FULL
    state: Path = args.state
    out: Path = args.out
    state.mkdir(parents=True, exist_ok=True)
    if (state / "services.json").exists():
        stop(json.loads((state / "services.json").read_text())["pids"])
    env = tool_env()
    pids: list[int] = []
    try:
        mlflow_port = free_port(args.mlflow_port)
        mlflow_uri = f"http://127.0.0.1:{mlflow_port}"
        mlflow_log = state / "logs" / "mlflow.log"
        mlflow_cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port)]
        mlflow_cmd += ["--backend-store-uri", f"sqlite:///{state / 'mlflow.db'}"]
        mlflow_cmd += ["--artifacts-destination", str(state / "mlartifacts"), "--workers", "1"]
        mlflow = start_service("MLflow", mlflow_cmd, mlflow_log, env)
        pids.append(mlflow.pid)
        wait_http(f"{mlflow_uri}/health", mlflow, "MLflow", mlflow_log)
        say(f"MLflow tracking server ready at {mlflow_uri}")

        serve_port = free_port(args.serve_port)
        metrics_ports = {"counter": free_port_pair(9400), "segmenter": free_port_pair(9410)}
        prometheus_port = free_port(args.prometheus_port)
        prometheus_url = f"http://127.0.0.1:{prometheus_port}"
        prometheus_log = state / "logs" / "prometheus.log"
        prometheus_cmd = [
            "prometheus",
            f"--config.file={write_prometheus_config(state, serve_port, metrics_ports)}",
            f"--storage.tsdb.path={state / 'prometheus'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
        ]
        prometheus = start_service("Prometheus", prometheus_cmd, prometheus_log, env)
        pids.append(prometheus.pid)
        wait_http(f"{prometheus_url}/-/ready", prometheus, "Prometheus", prometheus_log)
        say(f"Prometheus ready at {prometheus_url} (scraping the training ranks and the service)")

        datasets = prepare(state, size, env)
        trained = train(state, size, datasets, mlflow_uri, env, metrics_ports)

        serve_url = f"http://127.0.0.1:{serve_port}"
        serve_log = state / "logs" / "serve.log"
        serve_cmd = [str(BIN / "fieldkube-serve"), "--host", "127.0.0.1", "--port", str(serve_port)]
        serve_cmd += ["--counter", "models:/fieldkube-counter@champion"]
        serve_cmd += ["--segmenter", "models:/fieldkube-segmenter@champion"]
        serve = start_service(
            "fieldkube-serve", serve_cmd, serve_log, tool_env({"MLFLOW_TRACKING_URI": mlflow_uri})
        )
        pids.append(serve.pid)
        wait_http(f"{serve_url}/v2/health/ready", serve, "fieldkube-serve", serve_log)
        say(f"inference service ready at {serve_url}")

        results = query_service(serve_url, out, args.small)
        summary = {
            **results,
            "trained": trained,
            "urls": {
                "mlflow_ui": mlflow_uri,
                "prometheus": prometheus_url,
                "web_page": f"{serve_url}/",
                "api_docs": f"{serve_url}/docs",
                "serving_metrics": f"{serve_url}/metrics",
            },
            "outputs": {p.name: str(p) for p in sorted(out.glob("*.png"))},
            "size": asdict(size),
        }
        tmp = out / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(out / "summary.json")
        (state / "services.json").write_text(json.dumps({"pids": pids, "urls": summary["urls"]}))
    except (DemoError, OSError, KeyError) as err:
        stop(pids)
        print(f"make demo: error: {err}", file=sys.stderr)
        return 1

    print()
    print(f"  flowers counted : {results['count']:.1f} (ground truth {results['count_ground_truth']})")
    print(
        f"  building share  : {results['building_fraction']:.3f} "
        f"(ground truth {results['building_fraction_ground_truth']:.3f}, IoU {results['building_iou']:.2f})"
    )
    print(f"  MLflow UI       : {mlflow_uri}")
    print(f"  Prometheus      : {prometheus_url}   (dashboards: charts/fieldkube/files/dashboards/)")
    print(f"  web page        : {serve_url}/   (upload an image, see the overlay)")
    print(f"  API docs        : {serve_url}/docs")
    print(f"  outputs         : {out}/field-overlay.png, aerial-overlay.png, summary.json")
    print()
    if args.detach:
        say(f"services left running (pids {pids}); stop them with: make demo-down")
        return 0
    say("services running; press Ctrl-C to stop")
    try:
        while all(p.poll() is None for p in (mlflow, prometheus, serve)):
            time.sleep(1)
        say("a service exited; stopping the demo")
    except KeyboardInterrupt:
        print()
    stop(pids)
    (state / "services.json").unlink(missing_ok=True)
    say("stopped")
    return 0


def down(args: argparse.Namespace) -> int:
    services = args.state / "services.json"
    if not services.exists():
        say("no detached demo is running")
        return 0
    stop(json.loads(services.read_text())["pids"])
    services.unlink()
    say("demo services stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["up", "down"])
    parser.add_argument("--small", action="store_true", help="reduced size (the end-to-end test's)")
    parser.add_argument("--detach", action="store_true", help="leave the services running and return")
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE, help="cache and service state directory")
    parser.add_argument("--out", type=Path, default=ROOT / "demo-output", help="where results are written")
    parser.add_argument("--mlflow-port", type=int, default=5000)
    parser.add_argument("--serve-port", type=int, default=8080)
    parser.add_argument("--prometheus-port", type=int, default=9090)
    args = parser.parse_args(argv)
    return up(args) if args.command == "up" else down(args)


if __name__ == "__main__":
    sys.exit(main())
