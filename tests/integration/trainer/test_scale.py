"""fieldkube-scale runs the real trainer with 1 and 2 workers under a launcher and reports images/s,
speedup and efficiency as seed 003 defines them, as JSON and a plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def test_scale_sweep_over_one_and_two_workers(field_dataset: Path, tmp_path: Path, env) -> None:
    out = tmp_path / "scale"
    cmd = [str(BIN / "fieldkube-scale"), "--data", str(field_dataset), "--workers", "2,1",
           "--launcher", "horovod", "--steps", "3", "--batch", "2", "--out", str(out),
           "--set", "data.loader_workers=0"]  # fmt: skip
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "scale.json").read_text())
    runs = result["runs"]
    assert [r["workers"] for r in runs] == [1, 2]
    assert all(r["backend"] == "horovod" and r["images_per_second"] > 0 for r in runs)
    assert runs[0]["speedup"] == 1.0 and runs[0]["efficiency"] == 1.0
    expected = runs[1]["images_per_second"] / runs[0]["images_per_second"]
    assert runs[1]["speedup"] == pytest.approx(expected, abs=2e-3)
    assert runs[1]["efficiency"] == pytest.approx(runs[1]["speedup"] / 2, abs=2e-3)
    assert (out / "scale.png").read_bytes()[:4] == b"\x89PNG"
    assert "speedup" in proc.stdout


def test_scale_refuses_a_missing_dataset_before_launching(tmp_path: Path, env) -> None:
    proc = subprocess.run([str(BIN / "fieldkube-scale"), "--data", str(tmp_path / "none"), "--out",
                           str(tmp_path / "o")], env=env(), capture_output=True, text=True, timeout=60,
                          check=False)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "none/manifest.json: not found" in proc.stderr
