"""A bundle's golden sample: one real tile and the answer the trained model gave on it.

A zero tile only shows that a model runs and that its output has the right shape; a bundle with a wrong
``density_scale`` or with weights that do not belong to it passes that. So the trainer records one test
tile (``golden.png``) and the model's answer on it (``expected_answer``: fp32, eval mode, on the device
the model is on), and the service runs the same tile through its own path at warm-up and compares
(``compare_answers``). Both sides reduce the output map with ``summarise_map``, so what is recorded and
what is checked cannot drift apart.

The answer of a counter is ``count`` (sum of the count map, i.e. of the raw output / density_scale); of a
segmenter ``mean_probability`` (mean of the sigmoid) and ``building_fraction`` (share of pixels whose
probability reaches ``BUILDING_THRESHOLD``).

Tolerances admit what differs between a GPU in bf16/TF32 and a CPU in fp32 (a few parts per thousand of
a count; a few pixels near the threshold flipping) and refuse what a real fault does: a count may differ
by ``COUNT_RELATIVE_TOLERANCE`` of the recorded count plus ``COUNT_ABSOLUTE_TOLERANCE`` (so a density
scale off by 2x, which halves or doubles the count, fails for any recorded count above about 0.11), a
mean probability or building fraction by ``FRACTION_ABSOLUTE_TOLERANCE``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fieldkube.vision.normalize import batch_to_tensor

COUNT_RELATIVE_TOLERANCE = 0.03
"""Share of the recorded count a golden count may differ by (bf16 vs fp32 sums stay well inside)."""
COUNT_ABSOLUTE_TOLERANCE = 0.05
"""Added to the relative tolerance, so a near-empty golden tile does not fail on rounding noise."""
FRACTION_ABSOLUTE_TOLERANCE = 0.02
"""How far a segmenter's mean probability or building fraction may move (2 % of the tile's pixels)."""
BUILDING_THRESHOLD = 0.5
"""A pixel counts as building in ``building_fraction`` when its probability reaches this."""

ANSWER_FIELDS: dict[str, tuple[str, ...]] = {
    "counter": ("count",),
    "segmenter": ("mean_probability", "building_fraction"),
}
"""The numbers a golden answer holds, per task (model.json's ``golden`` holds them next to ``file``)."""


@dataclass(frozen=True, eq=False)
class GoldenSample:
    """One uint8 RGB tile (t, t, 3) of the model's tile size and the answer recorded for it at training."""

    image: np.ndarray
    answer: dict[str, float]


def _fields(task: str) -> tuple[str, ...]:
    try:
        return ANSWER_FIELDS[task]
    except KeyError:
        raise ValueError(f"no golden answer for task {task!r} (expected counter or segmenter)") from None


def summarise_map(task: str, output: np.ndarray) -> dict[str, float]:
    """The answer for one activated output map: counts per pixel (counter) or probabilities (segmenter).

    `output` is the map of one tile in any shape ((t, t), (1, t, t), (1, 1, t, t)). Sums are taken in
    float64 so that the summary adds no error of its own to what is compared.
    """
    values = np.asarray(output, dtype=np.float64)
    if task == "counter":
        return {"count": float(values.sum())}
    _fields(task)
    return {
        "mean_probability": float(values.mean()),
        "building_fraction": float(np.mean(values >= BUILDING_THRESHOLD)),
    }


def expected_answer(
    model: nn.Module, task: str, image: np.ndarray, density_scale: float = 1.0
) -> dict[str, float]:
    """The answer `model` gives on the uint8 tile `image` (t, t, 3), as recorded at training time.

    Normalised like training and serving (`batch_to_tensor`), in eval mode, without gradients and with
    autocast off (fp32), on the device the model's parameters are on; the activation serving applies is
    applied here too (counter: / density_scale, segmenter: sigmoid). The model's train/eval mode is
    restored afterwards.
    """
    _fields(task)
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            y = model(batch_to_tensor(image[None]).to(device)).float()
            y = torch.sigmoid(y) if task == "segmenter" else y / density_scale
    finally:
        model.train(was_training)
    return summarise_map(task, y.cpu().numpy())


def tolerance(task: str, name: str, recorded: float) -> float:
    """How far an observed value of answer field `name` may be from the `recorded` one."""
    if task == "counter" and name == "count":
        return COUNT_RELATIVE_TOLERANCE * abs(recorded) + COUNT_ABSOLUTE_TOLERANCE
    return FRACTION_ABSOLUTE_TOLERANCE


def compare_answers(task: str, observed: Mapping[str, float], recorded: Mapping[str, float]) -> str | None:
    """None when `observed` matches `recorded` within the tolerances, else what differs, e.g.
    ``count 12.410, recorded at training 6.200 (tolerance ±0.236)``; several fields are joined by ``; ``.

    A value that is missing or not finite never matches.
    """
    problems = []
    for name in _fields(task):
        if name not in recorded:
            problems.append(f"{name} was not recorded at training")
            continue
        want = float(recorded[name])
        if name not in observed:
            problems.append(f"{name} missing, recorded at training {want:.3f}")
            continue
        got = float(observed[name])
        allowed = tolerance(task, name, want)
        if not (math.isfinite(got) and abs(got - want) <= allowed):
            problems.append(f"{name} {got:.3f}, recorded at training {want:.3f} (tolerance ±{allowed:.3f})")
    return "; ".join(problems) or None
