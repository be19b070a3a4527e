"""The model registry and the three architectures: parameter counts, shapes, any input size."""

from __future__ import annotations

import pytest
import torch

from fieldkube.vision.models import (
    MODEL_NAMES,
    UnknownModelError,
    build_model,
    count_parameters,
    task_of,
)


def mcnn_parameters_from_seed_table() -> int:
    """Parameter count computed by hand from reference.md §1 (seed 000 Table 3.1/3.2)."""
    # (first kernel, later kernel, conv1, conv2, conv3, conv4, deconv1, deconv2) per column
    columns = [(9, 7, 16, 32, 16, 8, 8, 16), (7, 5, 20, 40, 20, 10, 10, 20), (5, 3, 24, 48, 24, 12, 12, 24)]
    total = 0
    for k1, k, c1, c2, c3, c4, d1, d2 in columns:
        layers = [(k1, 3, c1), (k, c1, c2), (k, c2, c3), (k, c3, c4), (k, c4, d1), (k, d1, d2)]
        total += sum(kernel * kernel * cin * cout + cout for kernel, cin, cout in layers)
    return total + 60 * 1 + 1  # final 1x1 conv over the 60 concatenated channels


def test_mcnn_has_exactly_the_seed_table_parameter_count() -> None:
    expected = mcnn_parameters_from_seed_table()
    assert expected == 154_621
    assert count_parameters(build_model("counter-mcnn")) == expected


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("size", [(224, 224), (100, 130), (37, 5)])
def test_every_model_returns_one_channel_at_the_input_size(name: str, size: tuple[int, int]) -> None:
    params = {"base_channels": 4, "depth": 3} if name == "segmenter-unet" else {}
    if name == "counter-fcrn":
        params = {"base_channels": 4}
    model = build_model(name, **params).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 1, *size)
    assert torch.isfinite(out).all()


def test_unet_default_is_the_seed_five_level_network() -> None:
    model = build_model("segmenter-unet")
    widths = [block[0].out_channels for block in model.down] + [model.bottleneck[0].out_channels]
    assert widths == [64, 128, 256, 512, 1024]
    dropouts = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts == [0.5, 0.5]
    assert count_parameters(model) == 31_031_745


def test_unet_width_and_depth_are_configurable() -> None:
    small = build_model("segmenter-unet", base_channels=8, depth=3)
    assert [block[0].out_channels for block in small.down] == [8, 16]
    assert small.bottleneck[0].out_channels == 32
    assert count_parameters(small) < 50_000


def test_models_are_trainable_end_to_end() -> None:
    torch.manual_seed(0)
    model = build_model("counter-mcnn", width=0.5)
    x = torch.randn(2, 3, 32, 48)
    target = torch.rand(2, 1, 32, 48)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        optimiser.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_task_of_maps_each_name() -> None:
    assert task_of("counter-mcnn") == "counter"
    assert task_of("counter-fcrn") == "counter"
    assert task_of("segmenter-unet") == "segmenter"


def test_unknown_model_name_is_a_clear_error() -> None:
    with pytest.raises(UnknownModelError, match=r"unknown model name 'resnet'.*counter-mcnn"):
        build_model("resnet")


def test_unknown_model_parameter_names_the_accepted_ones() -> None:
    with pytest.raises(UnknownModelError, match=r"no parameter.*colour.*accepted are.*base_channels"):
        build_model("segmenter-unet", colour=3)


def test_invalid_model_parameter_values_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"depth must be >= 2"):
        build_model("segmenter-unet", depth=1)
    with pytest.raises(ValueError, match=r"width must be > 0"):
        build_model("counter-mcnn", width=0)
