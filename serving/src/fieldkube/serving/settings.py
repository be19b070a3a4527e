"""One typed configuration for the inference service, filled from command-line flags or the environment.

Every field can be set by a flag (``--max-batch-size 16``) or an environment variable
(``FIELDKUBE_SERVE_MAX_BATCH_SIZE=16``); flags win. The MLflow tracking URI also honours MLflow's own
``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ENV_PREFIX = "FIELDKUBE_SERVE_"

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16"]


class SettingsError(ValueError):
    """Configuration that cannot be used, with a message naming the setting."""


class ServeSettings(BaseModel):
    """Settings of one `fieldkube-serve` process."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    counter: str | None = Field(
        None,
        description="counter model: models:/<name>@<alias>, models:/<name>/<version>, runs:/…, or a bundle "
        "directory",
    )
    segmenter: str | None = Field(None, description="segmenter model, same forms as --counter")
    mlflow_tracking_uri: str | None = Field(None, description="MLflow tracking server (for models:/ URIs)")
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8080, ge=0, le=65535, description="port to bind (0: any free port)")
    max_upload_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024,
        description="largest request body, bytes (/v1 uploads are streamed to disk as they arrive, so an "
        "uncompressed 5000x5000 TIFF fits; /v2 bodies are held in memory)",
    )
    upload_dir: str | None = Field(
        None, description="where /v1 uploads are spooled while served (default: the system temp directory)"
    )
    max_pixels: int = Field(
        26_000_000, ge=1, description="largest decoded image, pixels (guards against decompression bombs)"
    )
    max_inflight_pixels: int = Field(
        52_000_000,
        ge=1,
        description="pixels of images served at once; a request beyond it gets 429 + Retry-After before its "
        "image is decoded (memory above idle stays below 64 bytes per pixel admitted, 40 measured on CPU; "
        "at least max_pixels)",
    )
    default_overlap: int = Field(32, ge=0, description="tile overlap when a request does not set one")
    max_tiles_per_image: int = Field(4096, ge=1, description="largest number of tiles one image may need")
    max_batch_size: int | None = Field(
        None,
        ge=1,
        description="most tiles in one forward pass (1: no batching; default 16 on CUDA, 4 on CPU, where "
        "larger batches measured slower per tile)",
    )
    max_batch_pixels: int | None = Field(
        None,
        ge=1,
        description="most pixels in one forward pass: larger tiles run in proportionally smaller batches "
        "(one tile at least), so a request's tile size cannot multiply a pass's memory (default: "
        "max_batch_size tiles of 256x256)",
    )
    max_batch_delay_s: float = Field(
        0.004, ge=0, description="longest wait for more tiles before a partial batch runs"
    )
    max_queue_tiles: int = Field(
        4096, ge=1, description="tiles allowed to wait; beyond this requests get 429 + Retry-After"
    )
    request_timeout_s: float = Field(60.0, gt=0, description="longest a request may wait for inference")
    shutdown_timeout_s: int = Field(
        10, ge=1, description="on SIGTERM, longest wait for requests in flight before they are cancelled"
    )
    poll_interval_s: float = Field(
        30.0, ge=0, description="how often model aliases are re-resolved for hot reload (0: never)"
    )
    load_retry_initial_s: float = Field(
        1.0,
        gt=0,
        description="first wait before retrying a model load that failed for a transient reason (registry "
        "or artifact store unreachable); doubles on each further failure",
    )
    load_retry_max_s: float = Field(60.0, gt=0, description="longest wait between model load retries")
    torch_threads: int | None = Field(None, ge=1, description="CPU threads for inference (default: torch's)")
    device: Device = Field("auto", description="where models run: auto (cuda when present), cpu, cuda")
    precision: Precision = Field(
        "auto",
        description="forward-pass precision: auto (bf16 autocast on a GPU that supports it, else fp32), "
        "fp32, bf16; a model whose golden sample moves beyond its tolerance in bf16 is refused",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @model_validator(mode="after")
    def _usable(self) -> ServeSettings:
        if not self.counter and not self.segmenter:
            raise ValueError("no model configured: set --counter and/or --segmenter")
        if self.max_inflight_pixels < self.max_pixels:
            raise ValueError(
                f"max_inflight_pixels ({self.max_inflight_pixels}) is below max_pixels ({self.max_pixels}): "
                "the largest image allowed could never be admitted"
            )
        return self


def default_batch_size(device_type: str) -> int:
    """Tiles per forward pass when not set: a GPU needs wide batches to be busy; on CPU, batches past a
    few tiles only add cache misses (bench/serve_bench.py measured 16 slower per tile than 1-8)."""
    return 16 if device_type == "cuda" else 4


DEFAULT_BATCH_TILE = 256
"""The tile side the default pixel budget of a batch is counted in: the models' default tiles (224 and
256) run full batches under it."""


def default_batch_pixels(max_batch_size: int) -> int:
    """Pixels per forward pass when not set: `max_batch_size` tiles of `DEFAULT_BATCH_TILE` pixels."""
    return max_batch_size * DEFAULT_BATCH_TILE * DEFAULT_BATCH_TILE


def field_env_name(field: str) -> str:
    """The environment variable that sets `field`."""
    return ENV_PREFIX + field.upper()


def env_values(environ: Mapping[str, str]) -> dict[str, Any]:
    """Settings found in the environment (FIELDKUBE_SERVE_* and MLFLOW_TRACKING_URI)."""
    values: dict[str, Any] = {}
    if environ.get("MLFLOW_TRACKING_URI"):
        values["mlflow_tracking_uri"] = environ["MLFLOW_TRACKING_URI"]
    for field in ServeSettings.model_fields:
        raw = environ.get(field_env_name(field))
        if raw is not None and raw != "":
            values[field] = raw
    return values


def build_settings(overrides: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> ServeSettings:
    """Settings from the environment, overridden by explicit values (flags); errors name the setting."""
    values = env_values(os.environ if environ is None else environ)
    values.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return ServeSettings.model_validate(values)
    except ValidationError as error:
        raise SettingsError(describe_validation_error(error)) from None


def describe_validation_error(error: ValidationError) -> str:
    """One line per problem: 'max_batch_size: Input should be greater than or equal to 1 (got 0)'."""
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "settings"
        got = f" (got {item['input']!r})" if item.get("type") != "missing" and where != "settings" else ""
        lines.append(f"{where}: {item['msg']}{got}")
    return "; ".join(lines)
