"""A density counter's output activation (`head`), so that a counter can be made unable to count below zero.

A density map is a count per pixel, never negative, but a linear last layer can still output negative
values, and a field's count (the map's sum) can then fall below zero on an image with nothing in it.
``head`` picks what follows the counter's last convolution:

- ``linear``: nothing (the counters before this parameter existed; bundles without it load as this);
- ``relu``: max(0, x), exactly zero wherever the layer is negative;
- ``softplus``: log(1 + e^x), positive and smooth everywhere.

The activation has no weights, so a model's state dict is the same for every head: weights trained with
one load into the others (their outputs then differ).
"""

from __future__ import annotations

from typing import Literal, get_args

from torch import nn

DensityHead = Literal["linear", "relu", "softplus"]
DENSITY_HEADS: tuple[str, ...] = get_args(DensityHead)
DEFAULT_DENSITY_HEAD: DensityHead = "linear"
# What a bundle written before `head` existed was built with.
LEGACY_DENSITY_HEAD: DensityHead = "linear"


def density_activation(model: str, head: object) -> nn.Module:
    """The activation module for `head`; ValueError naming the model, the parameter and the choices."""
    if head == "linear":
        return nn.Identity()
    if head == "relu":
        return nn.ReLU()
    if head == "softplus":
        return nn.Softplus()
    raise ValueError(f"{model}: head must be one of {', '.join(DENSITY_HEADS)}, got {head!r}")
