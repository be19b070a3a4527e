"""The training loop's small units: precision choice, throughput meter (rates with every wait, MFU,
epoch-start stall), FLOPs count, early stopping, checkpoint policy and the step itself."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fieldkube.trainer.backends import SingleBackend
from fieldkube.trainer.checkpoint import CheckpointPolicy
from fieldkube.trainer.early_stopping import EarlyStopping
from fieldkube.trainer.errors import ConfigError, DataError
from fieldkube.trainer.launch_env import LaunchEnv
from fieldkube.trainer.precision import BF16, FP16, FP32, resolve_precision
from fieldkube.trainer.step import TrainStep
from fieldkube.trainer.throughput import PEAK_BF16_TFLOPS, ThroughputMeter, train_flops_per_image


@pytest.mark.parametrize(
    ("requested", "device", "bf16", "expected"),
    [
        ("auto", "cuda", True, BF16),
        ("auto", "cuda", False, FP16),
        ("fp16", "cuda", True, FP16),
        ("fp32", "cuda", True, FP32),
        ("bf16", "cuda", True, BF16),
        ("auto", "cpu", True, FP32),
        ("bf16", "cpu", False, FP32),
    ],
)
def test_precision_is_bf16_where_the_gpu_has_it_fp16_with_scaling_else_fp32_on_cpus(
    requested: str, device: str, bf16: bool, expected: object
) -> None:
    assert resolve_precision(requested, device, bf16) == expected
    assert FP16.loss_scaling and not BF16.loss_scaling and not FP32.autocast


def test_asking_for_bf16_on_a_gpu_without_it_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"runtime.precision bf16: this GPU has no bf16"):
        resolve_precision("bf16", "cuda", bf16_supported=False)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_window_rates_count_every_second_between_log_points_and_mfu_uses_the_peak() -> None:
    clock = Clock()
    meter = ThroughputMeter(world=2, flops_per_image=1e10, peak_tflops_per_device=100.0, clock=clock)
    meter.epoch_starts()
    for wait in (0.5, 0.0, 0.0, 0.0):  # 4 steps of 8 images per rank, 0.1 s of compute each
        clock.now += wait + 0.1
        meter.step(8, wait, 0.1)
    clock.now += 3.0  # validation and a checkpoint: not in any step, still in the window
    window = meter.window()
    seconds = 0.5 + 4 * 0.1 + 3.0
    assert window.images_per_second == pytest.approx(4 * 16 / seconds)
    assert window.loader_wait_share == pytest.approx(0.5 / seconds)
    assert window.tflops == pytest.approx(4 * 16 / seconds * 1e10 / 1e12)
    assert window.tflops is not None and window.mfu == pytest.approx(window.tflops / 200.0)
    summary = meter.summary()
    assert summary["train_images_per_second"] == pytest.approx(3 * 16 / 0.3)  # first step excluded
    assert summary["run_images_per_second"] == pytest.approx(4 * 16 / seconds)


def test_the_epoch_start_stall_is_the_slowest_first_step_in_median_steps() -> None:
    meter = ThroughputMeter(world=1)
    for epoch in range(3):
        meter.epoch_starts()
        for step in range(5):
            stall = 0.4 if (step == 0 and epoch == 2) else 0.0
            meter.step(4, stall, 0.1)
    assert meter.epoch_start_stall() == pytest.approx(0.5 / 0.1)
    assert meter.summary()["mfu"] is None  # no FLOPs count, no peak: no MFU claimed


def test_flops_of_a_training_step_are_counted_once_per_model_and_tile() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    forward = 2 * 3 * 4 * 9 * 16 * 16  # multiply-adds x 2 per output pixel
    assert train_flops_per_image(conv, 16) == pytest.approx(2 * forward)  # backward: input grad not needed

    class Untraceable(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * float(x.sum())  # needs real data: not countable on the meta device

    assert train_flops_per_image(Untraceable(), 16) is None
    assert dict(PEAK_BF16_TFLOPS)["H200"] == pytest.approx(989.4)


def test_early_stopping_counts_epochs_without_improvement_beyond_min_delta() -> None:
    early = EarlyStopping(patience=2, min_delta=0.01)
    best, bad, stop = early.update(math.inf, 0, 1.0)
    assert (best, bad, stop) == (1.0, 0, False)
    best, bad, stop = early.update(best, bad, 0.995)  # not better by min_delta
    assert (best, bad, stop) == (1.0, 1, False)
    assert early.update(best, bad, 0.999) == (1.0, 2, True)
    assert EarlyStopping(patience=0, min_delta=0.0).update(1.0, 5, 2.0)[2] is False


def test_checkpoints_are_due_every_n_steps_every_n_epochs_and_on_a_stop_request() -> None:
    policy = CheckpointPolicy(every_steps=10, every_epochs=2)
    assert [s for s in range(1, 31) if policy.after_step(s, False)] == [10, 20, 30]
    assert policy.after_step(7, stop_requested=True)
    assert [e for e in range(1, 6) if policy.after_epoch(e)] == [2, 4]
    assert not CheckpointPolicy(None, None).after_step(10, False)


def test_a_step_that_diverges_is_a_data_error_and_leaves_the_weights_alone() -> None:
    model = nn.Linear(2, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    step = TrainStep(
        model,
        optimizer,
        scheduler,
        lambda out, tgt: ((out - tgt) ** 2).mean(),
        SingleBackend(LaunchEnv("single", 0, 0, 1)),
        FP32,
        None,
        0.1,
    )
    inputs, targets = torch.ones(4, 2), torch.zeros(4, 1)
    assert step(inputs, targets, 0) > 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    moved = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DataError, match=r"loss became nan at step 7 \(train.lr 0.1 too high\?\)"):
        step(inputs, torch.full((4, 1), math.nan), 7)
    assert all(torch.equal(moved[k], v) for k, v in model.state_dict().items())
