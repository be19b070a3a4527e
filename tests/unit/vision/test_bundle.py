"""Model bundles: round trip, atomic replacement, golden samples, clear errors for broken bundles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fieldkube.vision.bundle import BundleError, load_bundle, read_spec, save_bundle
from fieldkube.vision.golden import GoldenSample, expected_answer
from fieldkube.vision.imageio import encode_png
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
        (
            '{"format": 1, "name": "counter-mcnn", "golden": ["golden.png"]}',
            "field 'golden' has the wrong type",
        ),
        ('{"format": 1, "name": "counter-mcnn", "golden": {"file": "golden.png"}}', "field 'golden.count'"),
        (
            '{"format": 1, "name": "counter-mcnn", "golden": {"file": "golden.png", "count": "6"}}',
            "golden.count",
        ),
        (
            '{"format": 1, "name": "counter-mcnn", "golden": {"file": "../g.png", "count": 1}}',
            "'golden.file'",
        ),
        ('{"format": 1, "name": "counter-mcnn", "golden": {"file": "g.jpg", "count": 1}}', "'golden.file'"),
        (
            '{"format": 1, "name": "counter-mcnn", '
            '"golden": {"file": "g.png", "count": 1, "building_fraction": 0}}',
            "field 'golden' has unexpected key\\(s\\) 'building_fraction'",
        ),
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


def _field_tile(rng: np.random.Generator, tile: int) -> np.ndarray:
    """A uint8 tile with some structure (PNG round trips must give back every pixel)."""
    yy, xx = np.mgrid[0:tile, 0:tile]
    base = np.stack([xx * 255 // tile, yy * 255 // tile, (xx + yy) * 127 // tile], axis=-1)
    noise = rng.integers(0, 40, (tile, tile, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def test_golden_sample_round_trips_through_the_bundle(tmp_path: Path, rng: np.random.Generator) -> None:
    torch.manual_seed(0)
    model = build_model("counter-mcnn", width=0.25)
    image = _field_tile(rng, 32)
    answer = expected_answer(model, "counter", image, density_scale=4.0)
    spec = save_bundle(
        tmp_path / "b",
        model,
        "counter-mcnn",
        {"width": 0.25},
        tile=32,
        density_scale=4.0,
        golden=GoldenSample(image, answer),
    )
    files = sorted(p.name for p in (tmp_path / "b").iterdir())
    assert files == ["golden.png", "model.json", "model.safetensors"]
    stored = json.loads((tmp_path / "b" / "model.json").read_text())["golden"]
    assert stored == {"file": "golden.png", "count": answer["count"]}
    assert read_spec(tmp_path / "b") == spec

    loaded = load_bundle(tmp_path / "b")
    assert loaded.golden is not None
    np.testing.assert_array_equal(loaded.golden.image, image)  # lossless: the pixels the answer is for
    assert loaded.golden.answer == answer
    again = expected_answer(loaded.model, "counter", loaded.golden.image, loaded.spec.density_scale)
    assert again["count"] == pytest.approx(answer["count"], rel=1e-5, abs=1e-6)


def test_a_bundle_without_a_golden_sample_still_loads(tmp_path: Path) -> None:
    save_bundle(tmp_path / "b", build_model("counter-mcnn", width=0.25), "counter-mcnn", {"width": 0.25})
    spec_file = tmp_path / "b" / "model.json"
    data = json.loads(spec_file.read_text())
    assert data["golden"] == {}
    del data["golden"]  # as written before golden samples existed
    spec_file.write_text(json.dumps(data))
    loaded = load_bundle(tmp_path / "b")
    assert loaded.golden is None and loaded.spec.golden == {}


def test_a_segmenter_golden_answer_must_be_fractions(tmp_path: Path, rng: np.random.Generator) -> None:
    model = build_model("segmenter-unet", **PARAMS)
    image = _field_tile(rng, 32)
    answer = expected_answer(model, "segmenter", image)
    assert set(answer) == {"mean_probability", "building_fraction"}
    save_bundle(tmp_path / "b", model, "segmenter-unet", PARAMS, tile=32, golden=GoldenSample(image, answer))
    assert load_bundle(tmp_path / "b").golden is not None
    spec_file = tmp_path / "b" / "model.json"
    data = json.loads(spec_file.read_text())
    data["golden"]["building_fraction"] = 1.5
    spec_file.write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"model.json: field 'golden.building_fraction' must be between 0"):
        read_spec(tmp_path / "b")
    data["golden"] = {"file": "golden.png", "count": 3.0}
    spec_file.write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"unexpected key\(s\) 'count'"):
        read_spec(tmp_path / "b")


def test_a_golden_tile_that_is_missing_lossy_or_the_wrong_size_is_a_clear_error(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    model = build_model("counter-mcnn", width=0.25)
    image = _field_tile(rng, 32)
    golden = GoldenSample(image, expected_answer(model, "counter", image))
    save_bundle(tmp_path / "b", model, "counter-mcnn", {"width": 0.25}, tile=32, golden=golden)
    tile_file = tmp_path / "b" / "golden.png"

    tile_file.write_bytes(encode_png(image[:16, :16]))
    with pytest.raises(BundleError, match=r"golden.png: golden tile is 16x16, the model's tile is 32x32"):
        load_bundle(tmp_path / "b")
    from PIL import Image

    Image.fromarray(image).save(tile_file, format="JPEG")
    with pytest.raises(BundleError, match=r"golden.png: not a PNG file"):
        load_bundle(tmp_path / "b")
    tile_file.unlink()
    with pytest.raises(BundleError, match=r"golden.png: not found \(model.json field 'golden' names it\)"):
        load_bundle(tmp_path / "b")

    with pytest.raises(BundleError, match=r"golden tile must be uint8 \(64, 64, 3\)"):
        save_bundle(tmp_path / "c", model, "counter-mcnn", {"width": 0.25}, tile=64, golden=golden)
    assert not (tmp_path / "c").exists()
