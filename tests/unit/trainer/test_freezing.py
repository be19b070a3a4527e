"""model.freeze: layer groups are a model's top-level modules; frozen ones get an lr factor of 0 until the
freeze ends, and a name the model lacks is an error listing the ones it has; the lr schedule
(train.lr_schedule) applies to every group once it trains."""

from __future__ import annotations

import math

import pytest

from fieldkube.contract.config import validate_config
from fieldkube.trainer.errors import ConfigError
from fieldkube.trainer.freezing import frozen_factor, layer_groups, split_frozen
from fieldkube.trainer.loop import make_optimizer, make_scheduler
from fieldkube.vision.models import build_model


def test_layer_groups_are_the_top_level_modules() -> None:
    assert list(layer_groups(build_model("counter-fcrn", base_channels=2))) == [
        "encoder",
        "middle",
        "decoder",
        "head",
    ]
    assert list(layer_groups(build_model("counter-mcnn", width=0.25))) == ["columns", "fuse"]


def test_split_frozen_partitions_every_parameter_once() -> None:
    model = build_model("counter-fcrn", base_channels=2)
    trainable, frozen = split_frozen(model, ["encoder", "head"])
    held = {id(p) for p in model.encoder.parameters()} | {id(p) for p in model.head.parameters()}
    assert {id(p) for p in frozen} == held
    assert len(trainable) + len(frozen) == len(list(model.parameters()))


def test_an_unknown_group_names_the_field_and_the_models_groups() -> None:
    with pytest.raises(ConfigError, match=r"model\.freeze: no layer group\(s\) backbone in FCRN: expected "
                       r"some of encoder, middle, decoder, head"):  # fmt: skip
        split_frozen(build_model("counter-fcrn", base_channels=2), ["backbone"])


def test_frozen_groups_have_a_zero_lr_factor_until_the_freeze_ends() -> None:
    factor = frozen_factor(lambda step: 2.0, freeze_steps=3)
    assert [factor(s) for s in range(5)] == [0.0, 0.0, 0.0, 2.0, 2.0]


def test_the_optimizer_holds_frozen_groups_apart() -> None:
    config = validate_config({"model": {"name": "counter-fcrn", "params": {"base_channels": 2},
                                        "freeze": ["encoder"]}})  # fmt: skip
    model = build_model("counter-fcrn", base_channels=2)
    groups = make_optimizer(config, model).param_groups
    assert [g["frozen"] for g in groups] == [False, True]
    assert len(groups[1]["params"]) == len(list(model.encoder.parameters()))


def test_the_schedule_holds_frozen_groups_at_zero_then_decays_every_group_by_the_cosine() -> None:
    config = validate_config({"model": {"name": "counter-fcrn", "params": {"base_channels": 2},
                                        "freeze": ["encoder"], "freeze_epochs": 2},
                              "train": {"lr": 0.1, "lr_schedule": "cosine"}})  # fmt: skip
    optimizer = make_optimizer(config, build_model("counter-fcrn", base_channels=2))
    scheduler = make_scheduler(config, optimizer, steps_per_epoch=5, total_steps=20, scale=1.0)
    rates = []
    for _ in range(20):
        rates.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert rates[0] == [pytest.approx(0.1), 0.0]
    assert rates[9][1] == 0.0 and rates[10][1] == pytest.approx(rates[10][0])  # the freeze ends at step 10
    assert rates[10][0] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 10 / 20)))
    assert rates[19][0] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 19 / 20)))
