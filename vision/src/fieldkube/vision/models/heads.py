"""A density counter's output activation (`head`), so that a counter can be made unable to count below zero.

A density map is a count per pixel, never negative, but a linear last layer can still output negative
values, and a field's count (the map's sum) can then fall below zero on an image with nothing in it.
``head`` picks what follows the counter's last convolution:

- ``linear``: nothing (the counters before this parameter existed; bundles without it load as this);
- ``relu``: max(0, x), exactly zero wherever the layer is negative;
- ``softplus``: log(1 + e^x), positive and smooth everywhere; the last layer's bias starts at
  ``SOFTPLUS_INITIAL_BIAS`` (0.05 per pixel) rather than near 0 (0.69 per pixel, ~64 flowers on a 96 px
  tile at density scale 100), an over-count whose first steps drove every pixel deep below zero, where
  softplus has almost no gradient, in bench-accuracy;
- ``clamp``: max(0, x) as ``relu``, but trained as if linear: the gradient passes through where the layer
  is negative (straight through), so a pixel that should hold a flower but starts or falls below zero is
  pulled back up instead of staying dead. Where the target is zero too, the loss has no gradient anyway;
- ``eval-clamp``: ``linear`` while training, max(0, x) in eval mode (validation, evaluation, serving):
  trains exactly as ``linear`` and counts without the negative pixels a linear map keeps. The default.

The activation has no weights, so a model's state dict is the same for every head: weights trained with
one load into the others (their outputs then differ).
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch
from torch import nn

DensityHead = Literal["linear", "relu", "softplus", "clamp", "eval-clamp"]
DENSITY_HEADS: tuple[str, ...] = get_args(DensityHead)
# By bench-accuracy (bench/README.md): eval-clamp 0.56 MAE vs linear 0.59 over three seeds, never below
# zero; heads non-negative while training too did worse (clamp 0.79, softplus 1.79, relu 2.61).
DEFAULT_DENSITY_HEAD: DensityHead = "eval-clamp"
SOFTPLUS_INITIAL_BIAS = -3.0
# What a bundle written before `head` existed was built with.
LEGACY_DENSITY_HEAD: DensityHead = "linear"


class _ClampStraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


class ClampStraightThrough(nn.Module):
    """max(0, x) forward, identity backward. Shapes: any -> the same."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _ClampStraightThrough.apply(x)
        return out


class ClampWhenCounting(nn.Identity):
    """x while training, max(0, x) in eval mode. Shapes: any -> the same.

    An `nn.Identity` so that what skips identities while training (the per-layer profiler: an identity
    has no autograd node to time) skips it too.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.training else x.clamp(min=0)


def init_head_bias(layer: nn.Conv2d, head: str) -> None:
    """Start the last layer's bias where `head` has a small output and a gradient (softplus only)."""
    if head == "softplus" and layer.bias is not None:
        nn.init.constant_(layer.bias, SOFTPLUS_INITIAL_BIAS)


def density_activation(model: str, head: object) -> nn.Module:
    """The activation module for `head`; ValueError naming the model, the parameter and the choices."""
    if head == "linear":
        return nn.Identity()
    if head == "relu":
        return nn.ReLU()
    if head == "softplus":
        return nn.Softplus()
    if head == "clamp":
        return ClampStraightThrough()
    if head == "eval-clamp":
        return ClampWhenCounting()
    raise ValueError(f"{model}: head must be one of {', '.join(DENSITY_HEADS)}, got {head!r}")
