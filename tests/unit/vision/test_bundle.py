"""Model bundles: round trip, atomic replacement, clear errors for broken bundles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fieldkube.vision.bundle import BundleError, load_bundle, read_spec, save_bundle
from fieldkube.vision.models import build_model

PARAMS = {"base_channels": 4, "depth": 3}


def test_round_trip_restores_weights_spec_and_eval_mode(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("segmenter-unet", **PARAMS)
    spec = save_bundle(tmp_path / "model", model, "segmenter-unet", PARAMS, tile=128, metrics={"iou": 0.7})
    assert spec.task == "segmenter"
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["model.json", "model.safetensors"]
    stored = json.loads((tmp_path / "model" / "model.json").read_text())
    assert stored["format"] == 1 and stored["name"] == "segmenter-unet" and stored["tile"] == 128

    loaded = load_bundle(tmp_path / "model")
    assert not loaded.model.training
    assert loaded.spec == spec
    x = torch.randn(1, 3, 40, 40)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x))


def test_saving_over_a_bundle_replaces_it_and_leaves_no_temporaries(tmp_path: Path) -> None:
    save_bundle(tmp_path / "model", build_model("counter-mcnn", width=0.25), "counter-mcnn", {"width": 0.25})
    save_bundle(
        tmp_path / "model", build_model("counter-fcrn", base_channels=2), "counter-fcrn", {"base_channels": 2}
    )
    assert read_spec(tmp_path / "model").name == "counter-fcrn"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_failed_save_leaves_the_previous_bundle_intact(tmp_path: Path) -> None:
    model = build_model("counter-mcnn", width=0.25)
    save_bundle(tmp_path / "model", model, "counter-mcnn", {"width": 0.25})
    with pytest.raises(ValueError, match=r"unknown model name"):
        save_bundle(tmp_path / "model", model, "counter-nope", {})
    assert read_spec(tmp_path / "model").name == "counter-mcnn"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_bundles_are_loaded_without_pickle(tmp_path: Path) -> None:
    save_bundle(tmp_path / "b", build_model("counter-mcnn", width=0.25), "counter-mcnn", {"width": 0.25})
    head = (tmp_path / "b" / "model.safetensors").read_bytes()[:8]
    assert not head.startswith(b"\x80")  # not a pickle stream; safetensors starts with a header length


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"format": 2, "name": "counter-mcnn"}', "field 'format' is 2"),
        ('{"format": 1}', "missing field 'name'"),
        ('{"format": 1, "name": "counter-x"}', "field 'name': unknown model name"),
        ('{"format": 1, "name": "counter-mcnn", "task": "segmenter"}', "field 'task'"),
        ('{"format": 1, "name": "counter-mcnn", "params": {"width": 0.5}}', "weights do not match"),
        ('{"format": 1, "name": "counter-mcnn", "params": {"depth": 3}}', "field 'params'"),
        ('{"format": 1, "name": "counter-mcnn", "density_scale": -1}', "density_scale"),
    ],
)
def test_broken_bundles_name_the_file_and_field(tmp_path: Path, content: str, message: str) -> None:
    save_bundle(tmp_path / "b", build_model("counter-mcnn"), "counter-mcnn", {})
    (tmp_path / "b" / "model.json").write_text(content)
    with pytest.raises(BundleError, match=message) as info:
        load_bundle(tmp_path / "b")
    assert "model." in str(info.value)


def test_corrupt_or_missing_weights_are_clear_errors(tmp_path: Path) -> None:
    save_bundle(tmp_path / "b", build_model("counter-mcnn", width=0.25), "counter-mcnn", {"width": 0.25})
    weights = tmp_path / "b" / "model.safetensors"
    weights.write_bytes(b"garbage")
    with pytest.raises(BundleError, match=r"model.safetensors: not a readable safetensors file"):
        load_bundle(tmp_path / "b")
    weights.unlink()
    with pytest.raises(BundleError, match=r"model.safetensors: not found"):
        load_bundle(tmp_path / "b")
    with pytest.raises(BundleError, match=r"model.json: not found"):
        load_bundle(tmp_path / "nothing")
