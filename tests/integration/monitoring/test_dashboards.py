"""The Grafana dashboards and alert rules query metrics the components really export.

A real Prometheus (Debian's, on loopback) scrapes the real metric registries of a training rank, the
inference service and the operator; every dashboard query is then evaluated through Prometheus' HTTP API.
A renamed metric or label in any component leaves a panel empty, and fails here. The queries are read
from the dashboard JSON that ships with the chart, and hack/render_dashboards.py draws every dashboard from
the same Prometheus to PNG.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from prometheus_client import start_http_server

from fieldkube.operator import metrics as operator_metrics
from fieldkube.serving.metrics import ServeMetrics
from fieldkube.trainer.metrics import TrainingMetrics

ROOT = Path(__file__).resolve().parents[3]
SCRAPE_S = 1


DASHBOARDS = ROOT / "charts" / "fieldkube" / "files" / "dashboards"


def load_hack(name: str) -> ModuleType:
    """A script of hack/ as a module (hack/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "hack" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def load_dashboards() -> ModuleType:
    return load_hack("dashboards")


def shipped_boards() -> list[Any]:
    """The dashboards as the chart ships them (the generated JSON), parsed by the renderer."""
    render = load_hack("render_dashboards")
    boards = [render.read_board(path) for path in sorted(DASHBOARDS.glob("*.json"))]
    assert len(boards) == len(load_dashboards().DASHBOARDS)
    return boards


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_generated_files_are_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "hack" / "dashboards.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_alert_rules_pass_promtool() -> None:
    result = subprocess.run(
        [
            "promtool",
            "check",
            "rules",
            str(ROOT / "charts" / "fieldkube" / "files" / "prometheus-rules.yaml"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Prometheus scraping one training rank, the serving app's registry and the operator's registry."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is installed by `make dev` (Debian package prometheus)"
    train = TrainingMetrics(rank=0, job="tj-a", gpu_index=None)
    serve = ServeMetrics(gpu=False)
    servers = []
    targets = {}
    for name, registry in (
        ("trainer", train.registry),
        ("serving", serve.registry),
        ("operator", operator_metrics.REGISTRY),
    ):
        port = free_port()
        server, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
        servers.append(server)
        targets[name] = f"127.0.0.1:{port}"
    state = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
        "scrape_configs": [
            {"job_name": name, "static_configs": [{"targets": [target]}]} for name, target in targets.items()
        ],
    }
    (state / "prometheus.yml").write_text(json.dumps(config))
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={state / 'prometheus.yml'}",
            f"--storage.tsdb.path={state / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=(state / "prometheus.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def record(step: int) -> None:
        """One round of activity in each component, as a real run would produce."""
        train.observe_step(
            images=8, step_s=0.2, wait_s=0.02, loss=1.0 / (step + 1), epoch=step, allreduce_s=0.03
        )
        train.observe_window(images_per_second=8 / 0.22, mfu=0.3)
        for endpoint, status in (("/v1/count", "200"), ("/v1/segment", "200"), ("/v1/count", "413")):
            serve.request_seconds.labels(endpoint, "POST", status).observe(0.1 + 0.01 * step)
        for task in ("counter", "segmenter"):
            serve.queue_seconds.labels(task).observe(0.01)
            serve.batch_size.labels(task).observe(4)
            serve.rejected.labels(task, "queue_full").inc()
            serve.model_reloads.labels(task, "loaded").inc()
        serve.predicted_count.observe(42)
        serve.mask_fraction.observe(0.2)
        serve.set_model("counter", "fieldkube-counter", "3", "counter-mcnn", time.time())
        operator_metrics.RECONCILES.labels("create").inc()
        operator_metrics.RECONCILE_ERRORS.labels("create").inc(0)
        operator_metrics.RECONCILE_SECONDS.labels("create").observe(0.02)
        operator_metrics.JOBS_BY_PHASE.labels("Running").set(2)
        operator_metrics.TIME_TO_RUNNING.observe(4)
        operator_metrics.GPU_SECONDS.labels("team-a").inc(3600)
        operator_metrics.FAILURES.labels("OOMKilled").inc()

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                active = get_json(f"{url}/api/v1/targets")["data"]["activeTargets"]
                if len(active) == 3 and all(t["health"] == "up" for t in active):
                    break
            except OSError:
                pass
            assert proc.poll() is None, (state / "prometheus.log").read_text()
            assert time.monotonic() < deadline, (state / "prometheus.log").read_text()
            time.sleep(0.5)
        for step in range(6):  # several scrapes with changing values, so rate() has two points or more
            record(step)
            time.sleep(SCRAPE_S * 1.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for server in servers:
            server.shutdown()
            server.server_close()


def test_every_dashboard_query_returns_data(prometheus: str) -> None:
    empty, errors, unlabelled = [], [], []
    for board in shipped_boards():
        for panel in board.panels:
            assert panel.targets, f"{board.uid} / {panel.title} has no query"
            for target in panel.targets:
                expr = target.expr.replace("$trainingjob", ".*")
                answer = get_json(f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
                if answer["status"] != "success":
                    errors.append(f"{board.uid} / {panel.title}: {answer}")
                elif not answer["data"]["result"] and "DCGM_" not in expr:
                    # DCGM gauges exist only where a GPU and NVML do: this machine has none.
                    empty.append(f"{board.uid} / {panel.title}: {expr}")
                # Every label the legend shows must be on every series, or the panel's lines are unnamed.
                for series in answer["data"]["result"]:
                    shown = re.findall(r"{{(\w+)}}", target.legend)
                    missing = [k for k in shown if not series["metric"].get(k)]
                    if missing:
                        unlabelled.append(f"{board.uid} / {panel.title}: {missing} not in {series['metric']}")
    assert not errors, errors
    assert not unlabelled, "\n".join(unlabelled)
    assert not empty, "panels with no data:\n" + "\n".join(empty)


def test_renderer_draws_every_dashboard_with_data(prometheus: str, tmp_path: Path) -> None:
    render = load_hack("render_dashboards")
    drawn = render.render_all(DASHBOARDS, prometheus, render.window_for(2), {}, tmp_path)
    assert sorted(png.name for png in drawn) == sorted(f"{b.uid}.png" for b in shipped_boards())
    empty = []
    for png, counts in drawn.items():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert png.stat().st_size > 20_000, f"{png} is too small to hold its panels"
        if png.stem != "fieldkube-gpu":  # DCGM gauges need a GPU and NVML: none here
            empty += [f"{png.stem} / {title}" for title, n in counts.items() if n == 0]
    assert not empty, "panels drawn without a series:\n" + "\n".join(empty)


def test_rules_evaluate(prometheus: str) -> None:
    for rule in load_dashboards().ALERTS:
        answer = get_json(f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": rule["expr"]}))
        assert answer["status"] == "success", (rule["alert"], answer)
