"""Build fieldkube's models by name, so trainer, serving and bundles agree on one registry.

Names: ``counter-mcnn`` (seed-000 modified MCNN), ``counter-fcrn`` (FCRN-A), ``segmenter-unet``
(seed-004 U-Net). Counters map (B, 3, H, W) -> (B, 1, H, W) density; the segmenter maps
(B, 3, H, W) -> (B, 1, H, W) logits.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Literal

from torch import nn

from fieldkube.vision.models.fcrn import FCRN
from fieldkube.vision.models.mcnn import MCNN
from fieldkube.vision.models.unet import UNet

Task = Literal["counter", "segmenter"]

_REGISTRY: dict[str, tuple[Callable[..., nn.Module], Task]] = {
    "counter-mcnn": (MCNN, "counter"),
    "counter-fcrn": (FCRN, "counter"),
    "segmenter-unet": (UNet, "segmenter"),
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


class UnknownModelError(ValueError):
    """A model name or parameter that the registry does not know."""


def _entry(name: str) -> tuple[Callable[..., nn.Module], Task]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model name {name!r}: expected one of {', '.join(MODEL_NAMES)}"
        ) from None


def task_of(name: str) -> Task:
    """The task ("counter" or "segmenter") of a registered model name."""
    return _entry(name)[1]


def model_params(name: str) -> dict[str, Any]:
    """The constructor parameters a model accepts, with their defaults."""
    factory, _ = _entry(name)
    signature = inspect.signature(factory)
    return {key: p.default for key, p in signature.parameters.items()}


def build_model(name: str, **params: Any) -> nn.Module:
    """Build a registered model; unknown parameters raise UnknownModelError naming the accepted ones."""
    factory, _ = _entry(name)
    accepted = model_params(name)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise UnknownModelError(
            f"model {name!r} has no parameter(s) {', '.join(unknown)}: accepted are {', '.join(accepted)}"
        )
    return factory(**params)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "FCRN",
    "MCNN",
    "MODEL_NAMES",
    "Task",
    "UNet",
    "UnknownModelError",
    "build_model",
    "count_parameters",
    "model_params",
    "task_of",
]
