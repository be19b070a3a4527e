"""End-to-end: `hack/demo.py up --small --detach` runs the whole flow, then `down` stops it.

Everything is real: the MLflow server, `fieldkube-prepare`, 2-rank Horovod training through `horovodrun`,
the registry alias, `fieldkube-serve` loading `models:/…@champion` and HTTP requests on new images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[3]

# The small demo trains for about a hundred steps, so its models are rough; they must still have learnt.
# The count of the new image must land within 25% of the ground truth (an untrained counter is off by far
# more: it predicts ~0, negative counts or hundreds; the trained one measured 29.6 for 30). The building
# mask must overlap the true one with IoU >= 0.25 (an empty or all-building mask scores ~0; the trained
# one measured 0.35, over-predicting building edges), and the building fraction must be within a factor of
# three of the true fraction (measured: 0.107 for 0.052).
COUNT_RELATIVE_TOLERANCE = 0.25
MIN_BUILDING_IOU = 0.25

pytestmark = pytest.mark.slow


def run_demo(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "hack" / "demo.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def prometheus_value(url: str, query: str) -> float:
    """The single value of an instant query, retried for a few scrape intervals."""
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": query})) as r:
            result = json.loads(r.read())["data"]["result"]
        if result or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert result, f"Prometheus has no data for {query}"
    return float(result[0]["value"][1])


def alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_small_demo_end_to_end(tmp_path: Path) -> None:
    state, out = tmp_path / "state", tmp_path / "out"
    common = (
        "--small",
        "--state",
        str(state),
        "--out",
        str(out),
        "--mlflow-port",
        "0",
        "--serve-port",
        "0",
        "--prometheus-port",
        "0",
    )
    first = run_demo("up", "--detach", *common, timeout=900)
    try:
        assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
        summary = json.loads((out / "summary.json").read_text())
        services = json.loads((state / "services.json").read_text())
        assert all(alive(pid) for pid in services["pids"])

        truth = summary["count_ground_truth"]
        assert truth > 0
        assert abs(summary["count"] - truth) <= COUNT_RELATIVE_TOLERANCE * truth, summary
        assert summary["count_rounded"] == round(summary["count"])
        assert summary["building_iou"] >= MIN_BUILDING_IOU, summary
        true_fraction = summary["building_fraction_ground_truth"]
        assert true_fraction / 3 <= summary["building_fraction"] <= 3 * true_fraction, summary
        assert summary["counter_model"]["name"] == "fieldkube-counter"
        assert summary["segmenter_model"]["name"] == "fieldkube-segmenter"

        for name in (
            "field-input.png",
            "field-overlay.png",
            "aerial-input.png",
            "aerial-overlay.png",
            "aerial-mask.png",
        ):
            with Image.open(out / name) as image:
                assert image.size[0] > 0
        with Image.open(out / "field-input.png") as raw, Image.open(out / "field-overlay.png") as overlay:
            assert overlay.size == raw.size
            assert not np.array_equal(np.asarray(raw.convert("RGB")), np.asarray(overlay.convert("RGB")))

        with urllib.request.urlopen(summary["urls"]["web_page"], timeout=10) as page:
            assert page.status == 200
        with urllib.request.urlopen(summary["urls"]["mlflow_ui"] + "/health", timeout=10) as health:
            assert health.status == 200
        # Prometheus scraped the training ranks while they ran, and scrapes the service.
        assert (
            prometheus_value(
                summary["urls"]["prometheus"], "max(max_over_time(fieldkube_train_steps_total[1h]))"
            )
            > 0
        )
        assert prometheus_value(summary["urls"]["prometheus"], 'max(up{job="fieldkube-serve"})') == 1

        # A second run reuses the cached datasets and the registered champions: no training again.
        second = run_demo("up", "--detach", *common, timeout=600)
        assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
        assert "dataset: cached" in second.stdout
        assert "reused" in second.stdout
        assert "train counter:" not in second.stdout
        services = json.loads((state / "services.json").read_text())
    finally:
        down = run_demo("down", "--state", str(state), timeout=120)
    assert down.returncode == 0, down.stderr
    assert not (state / "services.json").exists()
    assert not any(alive(pid) for pid in services["pids"])
