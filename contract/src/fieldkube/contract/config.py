"""The one training configuration schema: YAML file, `--set key=value` flags, one JSON document (how the
operator passes a job's), a TrainingJob's spec.training.

Part of the contract because both sides read it: the operator generates `spec.training`'s schema in the
TrainingJob CRD from `TrainingConfig` and builds documents it must accept; the trainer parses them. Free of
torch, like the rest of the contract.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fieldkube.contract.errors import ConfigError
from fieldkube.contract.names import BUILTIN_MODELS, DEFAULT_MODEL, METRICS_PORT

USER_CLASS_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))/?$")

Backend = Literal["auto", "single", "horovod", "ddp"]
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
LossName = Literal["auto", "l2_per_image", "pixel_mse", "bce", "bce_dice"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = Field(
        DEFAULT_MODEL,
        description="Built-in model (counter-mcnn, counter-fcrn, segmenter-unet) or user pkg.module:Class.",
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments for the model constructor (e.g. base_channels)."
    )
    user_code_dir: str | None = Field(
        None, description="Directory added to the import path for user model/dataset code (a mounted volume)."
    )
    init_from: str | None = Field(
        None,
        description="Start from a trained model: models:/NAME@alias, models:/NAME/version, "
        "runs:/RUN_ID/model or a bundle directory; its architecture must match model.name/params "
        "(or is taken when unset).",
    )
    freeze: list[str] = Field(
        default_factory=list,
        description="Layer groups (the model's top-level modules, e.g. encoder, middle) kept fixed during "
        "the first model.freeze_epochs epochs.",
    )
    freeze_epochs: int = Field(1, ge=1, le=100_000, description="Epochs during which model.freeze applies.")

    @field_validator("init_from")
    @classmethod
    def _init_source_form(cls, value: str | None) -> str | None:
        if value is None:
            return None
        text = value.strip()
        if not text:
            raise ValueError("is empty: expected models:/NAME@alias, models:/NAME/version, runs:/… or a path")
        if text.startswith("models:/") and not MODELS_URI.match(text):
            raise ValueError(f"{text!r} is malformed: expected models:/NAME@alias or models:/NAME/version")
        return text

    @field_validator("name")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value in BUILTIN_MODELS or USER_CLASS_PATTERN.match(value):
            return value
        raise ValueError(
            f"unknown model {value!r}: expected one of {', '.join(BUILTIN_MODELS)} or 'pkg.module:Class'"
        )


class DataConfig(_Section):
    path: str = Field("data/prepared", description="Prepared dataset directory (fieldkube-prepare output).")
    dataset: str | None = Field(
        None, description="User dataset class 'pkg.module:Class', called as Class(path, split) per split."
    )
    sigma: float = Field(4.0, gt=0, le=64, description="Gaussian sigma (pixels) of counter density maps.")
    density_scale: float = Field(
        100.0, gt=0, description="Density targets are multiplied by this; counts divide it back out."
    )
    hflip: bool = Field(True, description="Random horizontal flips.")
    vflip: bool = Field(True, description="Random vertical flips.")
    rot90: bool = Field(True, description="Random 90-degree rotations (square tiles only).")
    color_jitter: float = Field(
        0.1, ge=0, le=1, description="Brightness/contrast/saturation jitter strength."
    )
    loader_workers: int = Field(2, ge=0, le=64, description="Data loader worker processes (0 = in the loop).")
    prefetch: int = Field(2, ge=1, le=64, description="Batches prefetched per loader worker.")


class TrainConfig(_Section):
    epochs: int = Field(10, ge=1, le=100_000, description="Maximum number of epochs.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (all epochs)."
    )
    batch_size: int = Field(
        8, ge=1, le=65_536, description="Images per step: per worker or global (batch_mode)."
    )
    batch_mode: Literal["per_worker", "global"] = Field(
        "per_worker", description="per_worker: batch_size per rank; global: batch_size split across ranks."
    )
    loss: LossName = Field(
        "auto",
        description="auto = the seed loss (l2_per_image counters, bce segmenters); also pixel_mse, bce_dice.",
    )
    optimizer: Literal["adam", "adamw", "sgd"] = Field("adam", description="Optimizer.")
    lr: float = Field(1e-4, gt=0, le=10, description="Base learning rate for one worker's batch.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="Weight decay.")
    momentum: float = Field(0.9, ge=0, lt=1, description="Momentum (sgd only).")
    lr_scaling: Literal["linear", "none"] = Field(
        "linear", description="linear: lr multiplied by the global batch / batch_size ratio (world size)."
    )
    warmup_epochs: float = Field(0.0, ge=0, le=1000, description="Linear warm-up from lr to the scaled lr.")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="After warm-up: constant keeps the scaled lr; cosine decays it along a half cosine to "
        "train.lr_min_factor times that at the last step (train.max_steps or train.epochs).",
    )
    lr_min_factor: float = Field(
        0.0, ge=0, le=1, description="cosine only: the final lr as a fraction of the scaled lr."
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many epochs without validation improvement."
    )
    early_stopping_min_delta: float = Field(0.0, ge=0, description="Minimum validation improvement.")
    seed: int = Field(0, ge=0, description="Seed of weights, data order and augmentation.")
    log_every_steps: int = Field(10, ge=1, description="Progress log and step metrics every N steps.")
    eval_samples: int = Field(4, ge=0, le=64, description="Overlay images written by the final evaluation.")
    evaluate: bool = Field(True, description="Evaluate on the test split after training (report + overlays).")


class CheckpointConfig(_Section):
    dir: str | None = Field(
        None, description="Checkpoint directory (a PVC in a cluster); none = no checkpoints."
    )
    every_steps: int | None = Field(None, ge=1, description="Checkpoint every N optimizer steps.")
    every_epochs: int | None = Field(1, ge=1, description="Checkpoint at the end of every N epochs.")
    keep: int = Field(2, ge=1, le=1000, description="Most recent checkpoints kept.")
    resume: bool = Field(True, description="Resume from the latest checkpoint in dir when one exists.")


class TrackingConfig(_Section):
    uri: str | None = Field(
        None, description="MLflow tracking URI; default: $MLFLOW_TRACKING_URI; none = off."
    )
    experiment: str = Field("fieldkube", min_length=1, description="MLflow experiment name.")
    run_name: str | None = Field(None, description="MLflow run name (default: the TrainingJob name).")
    register_model: bool = Field(
        True, description="Register the model (fieldkube-counter / fieldkube-segmenter)."
    )
    registered_name: str | None = Field(None, description="Override the registered model name.")
    alias: str = Field("candidate", pattern=r"^[A-Za-z][\w-]*$", description="Alias set on the new version.")
    system_metrics: bool = Field(True, description="MLflow system metrics (CPU, memory, GPU) sampling.")
    run_id_file: str | None = Field(None, description="File that receives the MLflow run id.")


class MetricsConfig(_Section):
    port: int = Field(
        METRICS_PORT, ge=0, le=65_535, description="Prometheus port of local rank 0 (+local rank); 0 = off."
    )
    address: str = Field("0.0.0.0", description="Address the metrics server binds.")


class RuntimeConfig(_Section):
    backend: Backend = Field("auto", description="auto: horovod under horovodrun/mpirun, ddp under torchrun.")
    device: Device = Field("auto", description="auto: one CUDA device per process when present, else CPU.")
    precision: Precision = Field(
        "auto",
        description="Training precision on CUDA: auto = bf16 autocast where the GPU supports it, else "
        "fp16 autocast with loss scaling; fp32 turns autocast off. CPU training is fp32.",
    )
    channels_last: bool = Field(
        True, description="Feed the model channels_last (NHWC) batches: faster convolutions on CPU and GPU."
    )
    compile: bool = Field(
        False, description="torch.compile the model (CUDA only); faster for some models, slower for others."
    )
    peak_tflops: float | None = Field(
        None,
        gt=0,
        description="Dense bf16 peak of one device in TFLOP/s for the MFU figure; default: known from the "
        "GPU's name (no MFU on CPUs or unknown GPUs without it).",
    )
    threads: int | None = Field(None, ge=1, le=512, description="torch CPU threads per process.")


class TrainingConfig(_Section):
    """Everything `fieldkube-train` needs; also the TrainingJob's `spec.training`."""

    model: ModelConfig = Field(default_factory=ModelConfig)  # type: ignore[arg-type]
    data: DataConfig = Field(default_factory=DataConfig)  # type: ignore[arg-type]
    train: TrainConfig = Field(default_factory=TrainConfig)  # type: ignore[arg-type]
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)  # type: ignore[arg-type]
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)  # type: ignore[arg-type]
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)  # type: ignore[arg-type]
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)  # type: ignore[arg-type]
    output_dir: str = Field("outputs", description="Where the final model bundle and reports are written.")


def _describe(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(root)"
        lines.append(f"{source}: field '{field}': {item['msg']}")
    return "\n".join(lines)


def parse_value(text: str) -> Any:
    """A `--set` value: JSON first, then a YAML scalar/list (`true`, `[1,2]`), else the raw string.

    JSON first because the operator sends each section as JSON, and YAML 1.1 (PyYAML) reads a number
    without a dot, such as the `1e-06` json.dumps writes for 1e-6, as a string.
    """
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one `section.key=value` override to a nested dict in place."""
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected key=value (e.g. train.lr=0.001)")
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: '{part}' is not a section")
        node = child
    node[parts[-1]] = parse_value(value)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainingConfig:
    """Read a YAML file (optional), apply `key=value` overrides, and validate; errors name file and field."""
    tree: dict[str, Any] = {}
    source = "config"
    if path is not None:
        file = Path(path)
        source = str(file)
        if not file.is_file():
            raise ConfigError(f"{file}: config file not found")
        try:
            loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{file}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{file}: expected a mapping of sections (model, data, train, ...)")
        tree = loaded
    for assignment in overrides or []:
        apply_override(tree, assignment)
    if overrides:
        source += " (with --set overrides)"
    return validate_config(tree, source)


def validate_config(tree: dict[str, Any], source: str = "config") -> TrainingConfig:
    """Validate a plain dict (e.g. a TrainingJob's spec.training) into a TrainingConfig."""
    try:
        return TrainingConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def _inline_refs(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            target = defs[node["$ref"].rsplit("/", 1)[-1]]
            merged = {k: v for k, v in node.items() if k != "$ref"}
            return _inline_refs({**target, **merged}, defs)
        return {k: _inline_refs(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline_refs(v, defs) for v in node]
    return node


def training_config_json_schema() -> dict[str, Any]:
    """JSON schema of TrainingConfig with every `$ref` inlined (Kubernetes structural schemas forbid refs)."""
    schema = TrainingConfig.model_json_schema()
    result: dict[str, Any] = _inline_refs(schema, schema.get("$defs", {}))
    return result


def load_config_document(text: str, source: str, overrides: list[str] | None = None) -> TrainingConfig:
    """The whole configuration as one JSON document (how the operator passes a job's), then overrides.

    JSON, not YAML: a YAML 1.1 reader turns `1e-6` into a string, JSON keeps every number a number.
    """
    try:
        tree = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{source}: not a JSON document: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: expected a JSON object of sections (model, data, train, ...)")
    for assignment in overrides or []:
        apply_override(tree, assignment)
    return validate_config(tree, source + (" (with --set overrides)" if overrides else ""))
