"""A trained model on disk: ``model.safetensors`` + ``model.json``, written atomically, loaded without pickle.

The bundle is the unit the trainer logs to MLflow (artifact path ``model``) and the service loads.
model.json: {"format": 1, "name": "counter-mcnn", "task": "counter", "params": {...}, "tile": 224,
"density_scale": 1.0, "metrics": {...}, "trained": {...}, "lineage": {...}, "golden": {...}}.
``density_scale`` is the factor the training targets were multiplied by: count = sum(model output) /
density_scale. ``lineage`` names the model a fine-tuned bundle started from (``source``, and
``registered_model``/``version``/``run_id`` when it came from MLflow), so a bundle says what it was
adapted from even outside the registry; empty when trained from scratch. A counter's ``params`` always
hold its ``head`` (the output activation); a bundle written before that parameter existed has none and
loads as ``linear``, the head it was trained with.

``golden`` describes the bundle's golden sample (`fieldkube.vision.golden`): a file in the bundle, one
uint8 RGB tile of the model's tile size stored as lossless PNG (``golden.png``), and the answer the
trained model gave on it: ``{"file": "golden.png", "count": 6.2}`` for a counter, ``{"file":
"golden.png", "mean_probability": 0.41, "building_fraction": 0.38}`` for a segmenter. A loader runs the
tile and compares, which catches a wrong density_scale or wrong weights that a shape check passes. It is
optional: empty (``{}``) when the bundle has none, as in bundles written before it existed."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fieldkube.vision.golden import ANSWER_FIELDS, GoldenSample
from fieldkube.vision.imageio import ImageError, encode_png, read_image
from fieldkube.vision.models import (
    UnknownModelError,
    build_model,
    params_as_recorded,
    params_to_record,
    task_of,
)

BUNDLE_FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "model.json"
GOLDEN_FILE = "golden.png"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class BundleError(ValueError):
    """A model bundle that is missing, malformed or does not match its declared model."""


@dataclass(frozen=True)
class BundleSpec:
    """The parsed model.json of a bundle."""

    name: str
    task: str
    params: dict[str, Any]
    tile: int = 224
    density_scale: float = 1.0
    metrics: dict[str, Any] = field(default_factory=dict)
    trained: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)
    golden: dict[str, Any] = field(default_factory=dict)
    format: int = BUNDLE_FORMAT

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        return {"format": data.pop("format"), **data}


@dataclass
class LoadedModel:
    """A bundle's model (on the requested device, in eval mode), its spec and its golden sample (if any)."""

    model: nn.Module
    spec: BundleSpec
    golden: GoldenSample | None = None


def save_bundle(
    directory: str | os.PathLike[str],
    model: nn.Module,
    name: str,
    params: dict[str, Any],
    *,
    tile: int = 224,
    density_scale: float = 1.0,
    metrics: dict[str, Any] | None = None,
    trained: dict[str, Any] | None = None,
    lineage: dict[str, Any] | None = None,
    golden: GoldenSample | None = None,
) -> BundleSpec:
    """Write `model` as a bundle at `directory`, atomically replacing any previous bundle there.

    `golden` (a tile of size `tile` and the model's answer on it, see `fieldkube.vision.golden`) is
    written as ``golden.png`` and recorded in model.json. Files are written to a temporary sibling
    directory which is then renamed into place, so a reader never sees a half-written bundle.
    """
    task = task_of(name)
    target = Path(directory)
    golden_spec: dict[str, Any] = {}
    if golden is not None:
        label = target / GOLDEN_FILE
        image = golden.image
        if image.dtype != np.uint8 or image.shape != (int(tile), int(tile), 3):
            raise BundleError(
                f"{label}: a golden tile must be uint8 ({tile}, {tile}, 3) like the model's tiles, "
                f"got {image.dtype} {image.shape}"
            )
        golden_spec = _golden_field({"file": GOLDEN_FILE, **golden.answer}, task, target / SPEC_FILE)
    spec = BundleSpec(
        name=name,
        task=task,
        params=params_to_record(name, params),
        tile=int(tile),
        density_scale=float(density_scale),
        metrics=dict(metrics or {}),
        trained=dict(trained or {}),
        lineage=dict(lineage or {}),
        golden=golden_spec,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        state = {key: t.detach().cpu().contiguous() for key, t in model.state_dict().items()}
        save_file(state, str(staging / WEIGHTS_FILE), metadata={"name": name})
        if golden is not None:
            (staging / GOLDEN_FILE).write_bytes(encode_png(golden.image))
        (staging / SPEC_FILE).write_text(json.dumps(spec.to_json(), indent=2, sort_keys=False) + "\n")
        _replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return spec


def _replace_directory(staging: Path, target: Path) -> None:
    if not target.exists():
        staging.rename(target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    target.rename(old)
    try:
        staging.rename(target)
    except BaseException:
        old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _field(data: dict[str, Any], key: str, kind: type | tuple[type, ...], path: Path) -> Any:
    if key not in data:
        raise BundleError(f"{path}: missing field {key!r}")
    value = data[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BundleError(f"{path}: field {key!r} has the wrong type {type(value).__name__}")
    return value


def _golden_field(golden: Any, task: str, path: Path) -> dict[str, Any]:
    """The validated ``golden`` field of model.json: the file name and the task's answer numbers."""
    if not isinstance(golden, dict):
        raise BundleError(
            f"{path}: field 'golden' has the wrong type {type(golden).__name__}, expected an object"
        )
    if not golden:
        return {}
    fields = ANSWER_FIELDS.get(task, ())
    unexpected = sorted(set(golden) - {"file", *fields})
    if unexpected:
        expected = ", ".join(repr(k) for k in ("file", *fields))
        raise BundleError(
            f"{path}: field 'golden' has unexpected key(s) {', '.join(map(repr, unexpected))}; "
            f"a {task} golden sample holds {expected}"
        )
    file = golden.get("file")
    if (
        not isinstance(file, str)
        or not file.endswith(".png")
        or Path(file).name != file
        or file.startswith(".")
    ):
        raise BundleError(
            f"{path}: field 'golden.file' must name a PNG file in the bundle (e.g. {GOLDEN_FILE!r}), "
            f"got {file!r}"
        )
    out: dict[str, Any] = {"file": file}
    for key in fields:
        value = golden.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise BundleError(f"{path}: field 'golden.{key}' must be a finite number, got {value!r}")
        if key != "count" and not 0.0 <= value <= 1.0:
            raise BundleError(f"{path}: field 'golden.{key}' must be between 0 and 1, got {value!r}")
        out[key] = float(value)
    return out


def read_spec(directory: str | os.PathLike[str]) -> BundleSpec:
    """Parse and validate a bundle's model.json."""
    path = Path(directory) / SPEC_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(
            f"{path}: not found (a model bundle needs {SPEC_FILE} and {WEIGHTS_FILE})"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path}: expected a JSON object")
    fmt = _field(data, "format", int, path)
    if fmt != BUNDLE_FORMAT:
        raise BundleError(f"{path}: field 'format' is {fmt}, this version reads format {BUNDLE_FORMAT}")
    name = _field(data, "name", str, path)
    try:
        task = task_of(name)
    except UnknownModelError as error:
        raise BundleError(f"{path}: field 'name': {error}") from None
    if data.get("task", task) != task:
        raise BundleError(f"{path}: field 'task' is {data['task']!r} but model {name!r} is a {task}")
    tile = _field(data, "tile", int, path) if "tile" in data else 224
    if tile <= 0:
        raise BundleError(f"{path}: field 'tile' must be > 0, got {tile}")
    scale = float(_field(data, "density_scale", (int, float), path)) if "density_scale" in data else 1.0
    if not (math.isfinite(scale) and scale > 0):
        raise BundleError(f"{path}: field 'density_scale' must be a positive number, got {scale}")
    return BundleSpec(
        name=name,
        task=task,
        params=params_as_recorded(name, _field(data, "params", dict, path) if "params" in data else {}),
        tile=tile,
        density_scale=scale,
        metrics=data.get("metrics") or {},
        trained=data.get("trained") or {},
        lineage=data.get("lineage") or {},
        golden=_golden_field(data.get("golden", {}), task, path),
        format=fmt,
    )


def read_golden(directory: str | os.PathLike[str], spec: BundleSpec) -> GoldenSample | None:
    """The bundle's golden sample (tile + recorded answer), None when its spec records none.

    The tile must be a PNG of the model's tile size: a JPEG would not give back the pixels the answer
    was recorded on.
    """
    if not spec.golden:
        return None
    path = Path(directory) / spec.golden["file"]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{path}: not found ({SPEC_FILE} field 'golden' names it)") from None
    except OSError as error:
        raise BundleError(f"{path}: cannot be read ({error.strerror or error})") from None
    if not data.startswith(_PNG_SIGNATURE):
        raise BundleError(f"{path}: not a PNG file (a golden tile must be stored losslessly)")
    try:
        image = read_image(data, name=str(path))
    except ImageError as error:
        raise BundleError(str(error)) from None
    if image.shape != (spec.tile, spec.tile, 3):
        raise BundleError(
            f"{path}: golden tile is {image.shape[1]}x{image.shape[0]}, the model's tile is "
            f"{spec.tile}x{spec.tile} ({SPEC_FILE} field 'tile')"
        )
    answer = {key: float(value) for key, value in spec.golden.items() if key != "file"}
    return GoldenSample(image=image, answer=answer)


def load_bundle(directory: str | os.PathLike[str], device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild a bundle's model from its spec and load its safetensors weights (no unpickling)."""
    spec = read_spec(directory)
    weights = Path(directory) / WEIGHTS_FILE
    try:
        model = build_model(spec.name, **spec.params)
    except (UnknownModelError, TypeError, ValueError) as error:
        raise BundleError(f"{Path(directory) / SPEC_FILE}: field 'params': {error}") from None
    try:
        state = load_file(str(weights), device=str(device))
    except FileNotFoundError:
        raise BundleError(f"{weights}: not found") from None
    except (SafetensorError, OSError, ValueError) as error:
        raise BundleError(f"{weights}: not a readable safetensors file ({error})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise BundleError(f"{weights}: weights do not match {spec.name} {spec.params}: {first}") from None
    golden = read_golden(directory, spec)
    return LoadedModel(model=model.to(device).eval(), spec=spec, golden=golden)


def find_bundle_dir(root: str | os.PathLike[str]) -> Path:
    """The directory holding model.json: `root` itself or one level below (MLflow artifact layouts differ)."""
    base = Path(root)
    if (base / SPEC_FILE).is_file():
        return base
    found = sorted(path.parent for path in base.glob(f"*/{SPEC_FILE}"))
    if len(found) == 1:
        return found[0]
    raise FileNotFoundError(f"{base}: no {SPEC_FILE} found in the downloaded model artifacts")
