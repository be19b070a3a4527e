"""Counter heads: a non-negative head never counts below zero, a bad head is one clear error, a bundle
saved before `head` existed loads as the linear head it was trained with."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fieldkube.vision.bundle import load_bundle, read_spec, save_bundle
from fieldkube.vision.models import DENSITY_HEADS, build_model, model_params
from fieldkube.vision.models.heads import SOFTPLUS_INITIAL_BIAS, density_activation
from fieldkube.vision.predict import predict_tiled

SMALL = {"counter-mcnn": {"width": 0.25}, "counter-fcrn": {"base_channels": 4}}
NON_NEGATIVE = [head for head in DENSITY_HEADS if head != "linear"]


def _last_conv(model: nn.Module) -> nn.Conv2d:
    layer = getattr(model, "fuse", None) or model.head
    assert isinstance(layer, nn.Conv2d)
    return layer


def _force_negative(model: nn.Module) -> nn.Module:
    """Weights that make the last layer's output negative at every pixel of every input."""
    last = _last_conv(model)
    with torch.no_grad():
        last.weight.fill_(-1.0)  # its inputs come out of a ReLU: >= 0, so weight * input <= 0
        assert last.bias is not None
        last.bias.fill_(-30.0)
    return model.eval()


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("head", NON_NEGATIVE)
def test_a_non_negative_head_never_counts_below_zero(name: str, head: str) -> None:
    torch.manual_seed(0)
    model = _force_negative(build_model(name, **SMALL[name], head=head))
    x = torch.randn(3, 3, 50, 70) * 10
    with torch.no_grad():
        density = model(x)
    assert (density >= 0).all()
    assert (density.sum(dim=(1, 2, 3)) >= 0).all()
    image = np.random.default_rng(0).integers(0, 256, (150, 230, 3), dtype=np.uint8)
    stitched = predict_tiled(model, image, tile=64, overlap=16)
    assert (stitched >= 0).all() and round(float(stitched.sum())) >= 0


@pytest.mark.parametrize("name", SMALL)
def test_the_same_weights_count_below_zero_with_the_linear_head(name: str) -> None:
    torch.manual_seed(0)
    model = _force_negative(build_model(name, **SMALL[name], head="linear"))
    with torch.no_grad():
        assert (model(torch.randn(1, 3, 32, 32)) < 0).all()


@pytest.mark.parametrize("name", SMALL)
def test_every_head_has_the_same_weights(name: str) -> None:
    shapes = {
        head: {k: v.shape for k, v in build_model(name, **SMALL[name], head=head).state_dict().items()}
        for head in DENSITY_HEADS
    }
    assert all(keys == shapes["linear"] for keys in shapes.values())


@pytest.mark.parametrize("name", SMALL)
def test_only_softplus_starts_its_bias_low_and_every_other_weight_is_as_linear(name: str) -> None:
    initial = {}
    for head in DENSITY_HEADS:
        torch.manual_seed(3)
        initial[head] = build_model(name, **SMALL[name], head=head).state_dict()
    bias = f"{'fuse' if name == 'counter-mcnn' else 'head'}.bias"
    assert initial["softplus"][bias].tolist() == [SOFTPLUS_INITIAL_BIAS]
    for head, state in initial.items():
        for key, value in state.items():
            if not (head == "softplus" and key == bias):
                assert torch.equal(value, initial["linear"][key]), (head, key)


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("head", ["sigmoid", "", None, 1])
def test_an_unknown_head_is_one_error_naming_the_parameter_and_the_choices(name: str, head: object) -> None:
    with pytest.raises(
        ValueError,
        match=rf"^{name}: head must be one of linear, relu, softplus, clamp, eval-clamp, got {head!r}$",
    ):
        build_model(name, head=head)


def test_clamp_counts_like_relu_but_passes_the_gradient_where_relu_has_none() -> None:
    x = torch.tensor([-2.0, -0.5, 0.0, 1.5])
    target = torch.tensor([0.0, 1.0, 0.0, 1.0])
    grads = {}
    for head in ("relu", "clamp"):
        leaf = x.clone().requires_grad_()
        out = density_activation("counter-fcrn", head)(leaf)
        assert out.tolist() == [0.0, 0.0, 0.0, 1.5]
        ((out - target) ** 2).sum().backward()
        assert leaf.grad is not None
        grads[head] = leaf.grad.tolist()
    assert grads["relu"] == [0.0, 0.0, 0.0, 1.0]
    assert grads["clamp"] == [0.0, -2.0, 0.0, 1.0]  # the flower pixel at -0.5 is pulled up


@pytest.mark.parametrize("name", SMALL)
def test_eval_clamp_trains_as_linear_and_counts_without_negative_pixels(name: str) -> None:
    torch.manual_seed(0)
    linear = _force_negative(build_model(name, **SMALL[name], head="linear"))
    clamped = build_model(name, **SMALL[name], head="eval-clamp")
    clamped.load_state_dict(linear.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clamped.train()(x), linear.train()(x))
        assert (clamped.eval()(x) == 0).all()


@pytest.mark.parametrize("name", SMALL)
def test_a_bundle_from_before_head_loads_as_the_linear_head(tmp_path: Path, name: str) -> None:
    torch.manual_seed(1)
    trained = _force_negative(build_model(name, **SMALL[name], head="linear"))
    save_bundle(tmp_path / "b", trained, name, SMALL[name])
    spec_file = tmp_path / "b" / "model.json"
    stored = json.loads(spec_file.read_text())
    stored["params"].pop("head")  # model.json as written before the parameter existed
    spec_file.write_text(json.dumps(stored))

    loaded = load_bundle(tmp_path / "b")
    assert loaded.spec.params == {**SMALL[name], "head": "linear"}
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), trained(x))  # negative, as it was trained


@pytest.mark.parametrize("name", SMALL)
def test_a_new_bundle_records_its_head_even_when_left_to_the_default(tmp_path: Path, name: str) -> None:
    default = model_params(name)["head"]
    save_bundle(tmp_path / "default", build_model(name, **SMALL[name]), name, SMALL[name])
    assert json.loads((tmp_path / "default" / "model.json").read_text())["params"]["head"] == default
    save_bundle(tmp_path / "relu", build_model(name, **SMALL[name], head="relu"), name,
                {**SMALL[name], "head": "relu"})  # fmt: skip
    assert read_spec(tmp_path / "relu").params["head"] == "relu"
    assert isinstance(load_bundle(tmp_path / "relu").model.activation, nn.ReLU)


def test_the_segmenter_has_no_head_parameter_and_its_bundle_params_are_unchanged(tmp_path: Path) -> None:
    params = {"base_channels": 4, "depth": 3}
    save_bundle(tmp_path / "s", build_model("segmenter-unet", **params), "segmenter-unet", params)
    assert read_spec(tmp_path / "s").params == params
