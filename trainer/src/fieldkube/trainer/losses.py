"""Training losses: the seeds' own (per-image L2 for counters, BCE for U-Net) and the better options.

All take output and target (B, 1, H, W) float and return a scalar mean over the batch, so averaging the
per-rank losses over ranks equals the loss of the whole global batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def l2_per_image(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Seed 000: batch mean of each image's L2 norm of (target - output)."""
    diff = (target - output).flatten(1)
    return torch.sqrt(diff.pow(2).sum(dim=1) + 1e-12).mean()


def pixel_mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all pixels."""
    return F.mse_loss(output, target)


def bce(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Seed 004: binary cross-entropy on logits."""
    return F.binary_cross_entropy_with_logits(output, target)


def soft_dice_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice per image on sigmoid(output), averaged over the batch."""
    prob = torch.sigmoid(output).flatten(1)
    truth = target.flatten(1)
    intersection = (prob * truth).sum(dim=1)
    dice = (2 * intersection + 1.0) / (prob.sum(dim=1) + truth.sum(dim=1) + 1.0)
    return (1 - dice).mean()


def bce_dice(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice: better than BCE alone when buildings cover few pixels."""
    return bce(output, target) + soft_dice_loss(output, target)


LOSSES: dict[str, LossFn] = {
    "l2_per_image": l2_per_image,
    "pixel_mse": pixel_mse,
    "bce": bce,
    "bce_dice": bce_dice,
}
SEED_LOSS = {"counter": "l2_per_image", "segmenter": "bce"}


def resolve_loss(name: str, task: str) -> tuple[str, LossFn]:
    """`auto` picks the seed loss of the task."""
    chosen = SEED_LOSS[task] if name == "auto" else name
    return chosen, LOSSES[chosen]
