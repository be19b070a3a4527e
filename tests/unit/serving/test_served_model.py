"""Loading a bundle for serving: the task is checked and the model warmed up before it can serve; a
bundle with a golden sample must give the answer recorded at training on it."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fieldkube.serving.served_model import ModelCheckError, load_served_model, pick_dtype
from fieldkube.vision.bundle import SPEC_FILE, WEIGHTS_FILE, save_bundle
from fieldkube.vision.density import density_map_from_points
from fieldkube.vision.golden import GoldenSample, expected_answer
from fieldkube.vision.models import build_model
from fieldkube.vision.normalize import batch_to_tensor
from fieldkube.vision.synthetic import make_aerial_scene, make_field_image

PARAMS = {"width": 0.25}
SEGMENTER_PARAMS = {"base_channels": 4, "depth": 3}
TILE = 32
DENSITY_SCALE = 100.0
CPU = torch.device("cpu")


@pytest.fixture
def counter_bundle(tmp_path):
    torch.manual_seed(0)
    save_bundle(tmp_path / "counter", build_model("counter-mcnn", **PARAMS), "counter-mcnn", PARAMS, tile=32)
    return tmp_path / "counter"


def test_bundle_of_the_other_task_is_refused(counter_bundle) -> None:
    with pytest.raises(ModelCheckError, match="is a counter model, expected a segmenter model"):
        load_served_model(counter_bundle, "segmenter", None, None, torch.device("cpu"), str(counter_bundle))


def test_local_bundle_is_versioned_by_its_weights_and_serves_tiles(counter_bundle) -> None:
    model = load_served_model(counter_bundle, "counter", None, None, torch.device("cpu"), "here")
    assert (model.name, model.architecture, model.tile) == ("counter-mcnn", "counter-mcnn", 32)
    assert model.version.startswith("local-") and len(model.version) == len("local-") + 12
    out = model.forward(np.zeros((3, 32, 32, 3), dtype=np.uint8))
    assert out.shape == (3, 1, 32, 32) and np.isfinite(out).all()


def test_a_prepared_batch_is_its_parts_in_order_and_reports_the_models_cpu_time(counter_bundle) -> None:
    """Its maps are a float32 tensor where the model runs (stitched there, not copied back per batch)."""
    model = load_served_model(counter_bundle, "counter", None, None, torch.device("cpu"), "here")
    tiles = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    pending = model.prepare([tiles[:40], tiles[40:]])
    began = time.thread_time()
    out, model_cpu_s = pending.result()
    result_cpu_s = time.thread_time() - began
    assert isinstance(out, torch.Tensor) and out.device == model.device and out.dtype == torch.float32
    np.testing.assert_array_equal(out.numpy(), model.forward(tiles))
    assert 0 < model_cpu_s <= result_cpu_s


def test_the_model_and_its_batches_are_channels_last_and_answer_as_the_contiguous_model(
    counter_bundle,
) -> None:
    """The served layout changes the speed, not the answer: the maps equal the plain model's on the same
    normalised tiles (the convolutions' summation order may differ in the last bits)."""
    from fieldkube.vision.bundle import load_bundle

    model = load_served_model(counter_bundle, "counter", None, None, CPU, "here")
    conv = next(m for m in model.module.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    tiles = np.random.default_rng(3).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    plain = load_bundle(counter_bundle, device=CPU).model.eval()
    with torch.inference_mode():
        expected = (plain(batch_to_tensor(tiles).contiguous()) / model.density_scale).numpy()
    np.testing.assert_allclose(model.forward(tiles), expected, rtol=1e-5, atol=1e-6)


def _trained_counter(steps: int = 30) -> torch.nn.Module:
    """A small MCNN trained for a few Adam steps on synthetic field tiles (targets x DENSITY_SCALE)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    model = build_model("counter-mcnn", **PARAMS)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(steps):
        samples = [make_field_image(rng, TILE, TILE, int(rng.integers(1, 6)), hazards=()) for _ in range(4)]
        images = batch_to_tensor(np.stack([s.image for s in samples]))
        targets = np.stack([density_map_from_points(s.points, (TILE, TILE), sigma=2.0) for s in samples])
        loss = torch.nn.functional.mse_loss(model(images), torch.from_numpy(targets)[:, None] * DENSITY_SCALE)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def golden_counter_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained counter's bundle whose golden tile (5 flowers) has a clearly non-zero recorded count."""
    model = _trained_counter()
    image = make_field_image(np.random.default_rng(7), TILE, TILE, 5, hazards=()).image
    answer = expected_answer(model, "counter", image, DENSITY_SCALE)
    assert answer["count"] > 1.0, answer  # else a density_scale error could hide in the tolerance
    path = tmp_path_factory.mktemp("golden") / "counter"
    save_bundle(
        path,
        model,
        "counter-mcnn",
        PARAMS,
        tile=TILE,
        density_scale=DENSITY_SCALE,
        golden=GoldenSample(image, answer),
    )
    return path


def _copy(bundle: Path, to: Path) -> Path:
    to.mkdir()
    for item in bundle.iterdir():
        (to / item.name).write_bytes(item.read_bytes())
    return to


def test_a_bundle_whose_golden_sample_answers_as_recorded_loads(golden_counter_bundle, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="fieldkube.serving.served_model"):
        model = load_served_model(golden_counter_bundle, "counter", "fieldkube-counter", "3", CPU, "here")
    assert model.golden is not None and model.golden.image.shape == (TILE, TILE, 3)
    assert "golden sample matches the answer recorded at training (count " in caplog.text


def test_a_doubled_density_scale_is_refused_by_the_golden_sample(golden_counter_bundle, tmp_path) -> None:
    bundle = _copy(golden_counter_bundle, tmp_path / "doubled")
    spec = json.loads((bundle / SPEC_FILE).read_text())
    spec["density_scale"] = 2 * DENSITY_SCALE
    (bundle / SPEC_FILE).write_text(json.dumps(spec))
    recorded = spec["golden"]["count"]
    with pytest.raises(ModelCheckError) as info:
        load_served_model(bundle, "counter", "fieldkube-counter", "3", CPU, str(bundle))
    message = str(info.value)
    assert message.startswith(f"fieldkube-counter v3: golden sample count {recorded / 2:.3f}, ")
    assert f"recorded at training {recorded:.3f} (tolerance" in message
    assert message.endswith("wrong density_scale or weights?")


def test_a_segmenter_with_perturbed_weights_is_refused(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model("segmenter-unet", **SEGMENTER_PARAMS)
    image = make_aerial_scene(np.random.default_rng(3), TILE, TILE).image
    golden = GoldenSample(image, expected_answer(model, "segmenter", image))
    bundle = tmp_path / "segmenter"
    save_bundle(bundle, model, "segmenter-unet", SEGMENTER_PARAMS, tile=TILE, golden=golden)
    assert load_served_model(bundle, "segmenter", None, None, CPU, "here").golden is not None

    weights = load_file(str(bundle / WEIGHTS_FILE))
    weights["head.bias"] = weights["head.bias"] + 0.5  # the last layer's bias shifted: every logit +0.5
    save_file(weights, str(bundle / WEIGHTS_FILE))
    with pytest.raises(ModelCheckError, match=r"v\S+: golden sample mean_probability .*: wrong weights\?$"):
        load_served_model(bundle, "segmenter", None, None, CPU, "here")


def test_a_bundle_without_a_golden_sample_still_loads_and_says_so(counter_bundle, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="fieldkube.serving.served_model"):
        model = load_served_model(counter_bundle, "counter", "fieldkube-counter", "1", CPU, "here")
    assert model.golden is None
    assert "fieldkube-counter v1: the bundle has no golden sample" in caplog.text


def test_a_golden_sample_failure_is_rejected_by_the_registry_not_retried(golden_counter_bundle, tmp_path):
    from prometheus_client import generate_latest

    from fieldkube.serving.metrics import ServeMetrics
    from fieldkube.serving.registry import ModelRegistry
    from fieldkube.serving.settings import build_settings

    bundle = _copy(golden_counter_bundle, tmp_path / "doubled")
    spec = json.loads((bundle / SPEC_FILE).read_text())
    spec["density_scale"] = 2 * DENSITY_SCALE
    (bundle / SPEC_FILE).write_text(json.dumps(spec))
    metrics = ServeMetrics(gpu=False)
    registry = ModelRegistry(build_settings({"counter": str(bundle)}, {}), metrics)
    try:
        assert registry.refresh("counter") is False
        assert registry.next_retry_in_s() is None
        text = generate_latest(metrics.registry).decode()
        assert 'fieldkube_serve_model_reloads_total{outcome="rejected",task="counter"} 1.0' in text
        assert "golden sample count" in registry.last_error["counter"]
    finally:
        registry.close()


def test_auto_precision_is_fp32_on_cpu_and_explicit_choices_hold() -> None:
    assert pick_dtype("auto", CPU) == torch.float32
    assert pick_dtype("bf16", CPU) == torch.bfloat16
    assert pick_dtype("fp32", CPU) == torch.float32


def test_a_bf16_forward_passes_the_golden_sample_and_returns_float32_maps(golden_counter_bundle) -> None:
    """The precision a GPU serves in by default, run here under CPU autocast: the golden check holds (its
    tolerance is sized for bf16), maps come back float32 and close to fp32's."""
    fp32 = load_served_model(golden_counter_bundle, "counter", None, None, CPU, "here")
    bf16 = load_served_model(golden_counter_bundle, "counter", None, None, CPU, "here", torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    assert bf16.golden is not None
    tiles = np.stack([bf16.golden.image] * 2)
    exact, approx = fp32.forward(tiles), bf16.forward(tiles)
    assert approx.dtype == np.float32 and approx.shape == exact.shape
    assert not np.array_equal(approx, exact)  # bf16 did run
    assert abs(approx.sum() - exact.sum()) <= 0.03 * abs(exact.sum()) + 0.05
