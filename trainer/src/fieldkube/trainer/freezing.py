"""Keep named layer groups fixed for the first epochs of a fine-tuning run (`model.freeze`).

With a few labelled images, updating every layer of a pretrained model at once can wreck the features
that made it worth starting from; holding the early layers still while the rest adapts is the usual
remedy. A layer group is one of the model's top-level modules (`encoder`, `middle`, `decoder`, `head` in
counter-fcrn; `columns`, `fuse` in counter-mcnn), so the names need no table per model and work for
user models too.

Frozen groups get their own optimizer parameter group whose learning-rate factor is 0 until the freeze
ends. Unlike `requires_grad = False` this keeps every backend's gradient exchange unchanged (DDP and
Horovod register their hooks once, at wrap time) and a resumed run continues exactly, because the
factor depends only on the global step.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from fieldkube.trainer.errors import ConfigError


def layer_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Top-level child modules that hold parameters, by name, in definition order."""
    groups = {name: list(child.parameters()) for name, child in model.named_children()}
    return {name: params for name, params in groups.items() if params}


def split_frozen(model: nn.Module, frozen: list[str]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(trainable, frozen) parameters; ConfigError naming the unknown groups and the model's groups."""
    groups = layer_groups(model)
    unknown = [name for name in frozen if name not in groups]
    if unknown:
        raise ConfigError(
            f"model.freeze: no layer group(s) {', '.join(unknown)} in {type(model).__name__}: "
            f"expected some of {', '.join(groups)}"
        )
    held = {id(p) for name in frozen for p in groups[name]}
    params = list(model.parameters())
    return [p for p in params if id(p) not in held], [p for p in params if id(p) in held]


def frozen_factor(base: Callable[[int], float], freeze_steps: int) -> Callable[[int], float]:
    """The lr factor of a frozen group: 0 for the first `freeze_steps` steps, then the base schedule."""

    def factor(step: int) -> float:
        return 0.0 if step < freeze_steps else base(step)

    return factor
