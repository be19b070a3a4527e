"""Global batch order, LR warm-up/scaling and the seed losses: the pieces that make N ranks equal 1 rank."""

from __future__ import annotations

import itertools

import pytest
import torch

from fieldkube.trainer.loader import BatchPlan, epoch_batches
from fieldkube.trainer.loop import lr_factor
from fieldkube.trainer.losses import bce, bce_dice, l2_per_image, pixel_mse, resolve_loss


def test_rank_slices_of_each_global_batch_union_to_the_single_rank_batch() -> None:
    single = epoch_batches(size=23, global_batch=6, rank=0, world=1, seed=5, epoch=2)
    halves = [epoch_batches(23, 6, rank, 2, 5, 2) for rank in range(2)]
    assert len(single) == 3  # 23 // 6, last partial batch dropped
    for step, batch in enumerate(single):
        assert halves[0][step] + halves[1][step] == batch
    assert epoch_batches(23, 6, 0, 1, 5, 3) != single  # a new permutation every epoch


def test_resuming_mid_epoch_continues_with_the_same_batches() -> None:
    full = epoch_batches(40, 4, 1, 2, seed=0, epoch=1)
    assert epoch_batches(40, 4, 1, 2, seed=0, epoch=1, start_step=6) == full[6:]


def test_a_run_plan_is_its_epochs_batches_in_order_and_resumes_mid_epoch() -> None:
    epochs = [epoch_batches(23, 6, 1, 2, seed=5, epoch=e) for e in range(4)]
    whole = [keys for batches in epochs for keys in batches]  # 3 steps per epoch
    plan = BatchPlan(23, 6, rank=1, world=2, seed=5, epochs=4, total_steps=12)
    assert list(plan) == whole and len(plan) == 12
    resumed = BatchPlan(23, 6, 1, 2, 5, epochs=4, total_steps=12, epoch=1, step_in_epoch=2)
    assert list(resumed) == whole[5:] and len(resumed) == 7
    capped = BatchPlan(23, 6, 1, 2, 5, epochs=4, total_steps=7)  # train.max_steps
    assert list(capped) == whole[:7] and len(capped) == 7


def test_global_batch_must_divide_by_world_size() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        epoch_batches(10, 5, 0, 2, 0, 0)


def test_warmup_ramps_linearly_to_the_scaled_rate() -> None:
    assert lr_factor(0, scale=4.0, warmup_steps=10) == 1.0
    assert lr_factor(5, 4.0, 10) == pytest.approx(2.5)
    assert lr_factor(10, 4.0, 10) == 4.0
    assert lr_factor(0, 2.0, 0) == 2.0


def test_cosine_decays_from_the_scaled_rate_after_warmup_to_the_floor_at_the_last_step() -> None:
    factors = [lr_factor(s, 2.0, 10, "cosine", total_steps=110, min_factor=0.1) for s in range(111)]
    assert factors[5] == pytest.approx(1.5)  # warm-up unchanged
    assert factors[10] == pytest.approx(2.0)
    assert factors[60] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))  # half-way: the midpoint
    assert factors[110] == pytest.approx(0.2)
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    assert lr_factor(500, 2.0, 10, "cosine", 110, 0.1) == pytest.approx(0.2)  # past the end: the floor
    assert lr_factor(60, 2.0, 10, "constant", 110, 0.1) == 2.0


def test_seed_losses() -> None:
    target = torch.zeros(2, 1, 4, 4)
    output = torch.zeros(2, 1, 4, 4)
    output[0, 0, 0, :] = 1.0  # image 0: L2 norm 2; image 1: 0
    assert float(l2_per_image(output, target)) == pytest.approx(1.0, abs=1e-5)
    assert float(pixel_mse(output, target)) == pytest.approx(4 / 32)
    logits = torch.full((1, 1, 2, 2), 20.0)
    ones = torch.ones(1, 1, 2, 2)
    assert float(bce(logits, ones)) < 1e-6
    assert float(bce_dice(logits, ones)) < 1e-3
    assert float(bce_dice(-logits, ones)) > 10
    assert resolve_loss("auto", "counter")[0] == "l2_per_image"
    assert resolve_loss("auto", "segmenter")[0] == "bce"
