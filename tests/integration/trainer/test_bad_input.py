"""Bad input stops the CLI with one clear line naming the file or field, exit code 2, no traceback, and
nothing half-written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fieldkube.vision.imageio import write_png

BIN = Path(sys.executable).parent


def _cli(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / tool), *args], capture_output=True, text=True, timeout=180, check=False)


def _assert_clean_error(proc: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for text in expected:
        assert text in proc.stderr, proc.stderr[-2000:]


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        write_png(folder / f"{name}.png", rng.integers(40, 200, size=(64, 64, 3), dtype=np.uint8))
    return folder


def test_corrupt_image_is_named(images: Path, tmp_path: Path) -> None:
    (images / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n-truncated")
    points = tmp_path / "points.csv"
    points.write_text("image,x,y\na.png,10,12\nb.png,3,4\n")
    proc = _cli("fieldkube-prepare", "--images", str(images), "--points", str(points), "--tile", "32",
                "--workers", "1", "--out", str(tmp_path / "out"))  # fmt: skip
    _assert_clean_error(proc, "b.png")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_points_for_a_missing_image_are_named(images: Path, tmp_path: Path) -> None:
    points = tmp_path / "points.csv"
    points.write_text("image,x,y\na.png,10,12\nmissing.png,3,4\n")
    proc = _cli(
        "fieldkube-prepare", "--images", str(images), "--points", str(points), "--out", str(tmp_path / "o")
    )
    _assert_clean_error(proc, "points.csv", "missing.png")


def test_malformed_annotation_file_is_named(images: Path, tmp_path: Path) -> None:
    points = tmp_path / "points.csv"
    points.write_text("image,x,y\na.png,ten,12\n")
    proc = _cli(
        "fieldkube-prepare", "--images", str(images), "--points", str(points), "--out", str(tmp_path / "o")
    )
    _assert_clean_error(proc, "points.csv")


def test_unknown_model_name_is_named(field_dataset: Path) -> None:
    proc = _cli("fieldkube-train", "--data", str(field_dataset), "--model", "counter-resnet")
    _assert_clean_error(proc, "field 'model.name'", "counter-resnet")


def test_invalid_config_value_names_file_and_field(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text("train:\n  lr: -0.1\n  batch_mode: sideways\n")
    proc = _cli("fieldkube-train", "--config", str(config))
    _assert_clean_error(proc, "job.yaml", "field 'train.lr'", "field 'train.batch_mode'")


def test_unknown_model_parameter_is_named(field_dataset: Path, tmp_path: Path) -> None:
    proc = _cli("fieldkube-train", "--data", str(field_dataset), "--set", "model.params={petals: 3}",
                "--set", "metrics.port=0", "--set", f"output_dir={tmp_path}")  # fmt: skip
    _assert_clean_error(proc, "model.params", "petals")
    assert not (tmp_path / "model").exists()


def test_missing_dataset_is_named(tmp_path: Path) -> None:
    proc = _cli("fieldkube-train", "--data", str(tmp_path / "nowhere"), "--set", "metrics.port=0")
    _assert_clean_error(proc, "nowhere/manifest.json: not found")


def test_unusable_tracking_uri_is_named(field_dataset: Path, tmp_path: Path) -> None:
    # MLflow refuses its file store; the user sees which field to change, not MLflow's traceback.
    proc = _cli("fieldkube-train", "--data", str(field_dataset), "--set", f"tracking.uri=file://{tmp_path}/mlruns",
                "--set", "metrics.port=0", "--set", f"output_dir={tmp_path}")  # fmt: skip
    _assert_clean_error(proc, "tracking.uri", "file://")
    assert not (tmp_path / "model").exists()
