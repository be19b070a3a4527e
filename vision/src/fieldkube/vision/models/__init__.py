"""Build fieldkube's models by name, so trainer, serving and bundles agree on one registry.

Names: ``counter-mcnn`` (seed-000 modified MCNN), ``counter-fcrn`` (FCRN-A), ``segmenter-unet``
(seed-004 U-Net). Counters map (B, 3, H, W) -> (B, 1, H, W) density; the segmenter maps
(B, 3, H, W) -> (B, 1, H, W) logits. A counter's `head` picks its output activation (`heads`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Literal

from torch import nn

from fieldkube.vision.models.fcrn import FCRN
from fieldkube.vision.models.heads import DENSITY_HEADS, LEGACY_DENSITY_HEAD, DensityHead
from fieldkube.vision.models.mcnn import MCNN
from fieldkube.vision.models.unet import UNet

Task = Literal["counter", "segmenter"]

_REGISTRY: dict[str, tuple[Callable[..., nn.Module], Task]] = {
    "counter-mcnn": (MCNN, "counter"),
    "counter-fcrn": (FCRN, "counter"),
    "segmenter-unet": (UNet, "segmenter"),
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)

# Parameters added after bundles were first written, with the value every earlier bundle was built
# with: a bundle always records them (their default may change), one without them loads as it was trained.
_ADDED_PARAMS: dict[str, dict[str, Any]] = {
    "counter-mcnn": {"head": LEGACY_DENSITY_HEAD},
    "counter-fcrn": {"head": LEGACY_DENSITY_HEAD},
}


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


def params_to_record(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """`params` with today's default of each later-added parameter they leave unset (what a bundle writes)."""
    added = _ADDED_PARAMS.get(name, {})
    defaults = model_params(name) if added else {}
    return {**params, **{key: defaults[key] for key in added if key not in params}}


def params_as_recorded(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """`params` read from a bundle, with the value a bundle older than each later-added parameter was
    built with where it is missing (so a counter saved before `head` existed loads as `linear`)."""
    added = _ADDED_PARAMS.get(name, {})
    return {**params, **{key: value for key, value in added.items() if key not in params}}


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
    "DENSITY_HEADS",
    "FCRN",
    "MCNN",
    "MODEL_NAMES",
    "DensityHead",
    "Task",
    "UNet",
    "UnknownModelError",
    "build_model",
    "count_parameters",
    "model_params",
    "params_as_recorded",
    "params_to_record",
    "task_of",
]
