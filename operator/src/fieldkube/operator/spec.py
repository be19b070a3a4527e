"""The TrainingJob spec as one typed model: parsed, defaulted and validated once, and the CRD schema's source.

Field names are the CRD's (camelCase). Limits declared here become OpenAPI bounds in the generated CRD, and
the `x-kubernetes-validations` (CEL) rules attached here (written in `rules.py`) are enforced by the API
server, so a bad spec, or an edit of a field the operator reads only at creation, is rejected at
`kubectl apply` time with a message naming the field. `spec.training` is the trainer's own
configuration schema (see `training_schema.py`), minus the sections this spec owns.
"""

# Field names are the Kubernetes API's (camelCase), as users write them in YAML.
# ruff: noqa: N815

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fieldkube.contract.names import BUILTIN_MODELS, DEFAULT_MODEL
from fieldkube.operator import rules
from fieldkube.operator.quantity import format_bytes, parse_quantity
from fieldkube.operator.training_schema import training_defaults

GROUP = "fieldkube.io"
VERSION = "v1alpha1"
KIND = "TrainingJob"
PLURAL = "trainingjobs"
SINGULAR = "trainingjob"
SHORT_NAMES = ("tj",)

MODEL_NAME_PATTERN = rf"^({'|'.join(BUILTIN_MODELS)}|[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*)$"
MAX_NAME_LENGTH = rules.MAX_NAME_LENGTH
MAX_WORKERS = 512
MAX_GPUS_PER_WORKER = 16
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


def _positive_quantity(value: str) -> str:
    if parse_quantity(value) <= 0:
        raise ValueError(f"{value!r} is not a positive quantity")
    return value


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class ModelSpec(_Spec):
    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        frozen=True,
        json_schema_extra={"x-kubernetes-validations": rules.MODEL_RULES},
    )

    name: str = Field(
        default=DEFAULT_MODEL,
        pattern=MODEL_NAME_PATTERN,
        description=f"Built-in model ({', '.join(BUILTIN_MODELS)}) or user code 'pkg.module:Class'.",
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="Architecture parameters passed to the model constructor (e.g. base_channels).",
        json_schema_extra={"maxProperties": 64},
    )
    initFrom: str | None = Field(
        default=None,
        min_length=1,
        max_length=2048,
        description="Start from a trained model instead of random weights (the trainer's model.init_from): "
        "models:/NAME@alias, models:/NAME/VERSION, runs:/RUN_ID/PATH or a bundle directory as the trainer "
        "sees it. The architecture is the source's: name/params, when not left at their defaults, must "
        "match it.",
        json_schema_extra={"x-kubernetes-validations": rules.INIT_FROM_RULES},
    )
    freeze: list[str] = Field(
        default_factory=list,
        max_length=32,
        description="Layer groups (the model's top-level modules: columns, fuse in counter-mcnn; encoder, "
        "middle, decoder, head in counter-fcrn) held fixed for the first freezeEpochs epochs.",
        json_schema_extra={
            "x-kubernetes-list-type": "set",
            "items": {"type": "string", "pattern": rules.LAYER_GROUP_PATTERN, "maxLength": 128},
        },
    )
    freezeEpochs: int | None = Field(
        default=None,
        ge=1,
        le=rules.MAX_FREEZE_EPOCHS,
        description="Epochs during which freeze applies (the trainer's default: 1).",
    )

    @field_validator("initFrom")
    @classmethod
    def _init_source_form(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if value.startswith("models:/") and not re.match(rules.MODELS_URI_PATTERN, value):
            raise ValueError(f"{value!r}: expected models:/NAME@alias or models:/NAME/VERSION")
        if value.startswith("runs:/") and not re.match(rules.RUNS_URI_PATTERN, value):
            raise ValueError(f"{value!r}: expected runs:/RUN_ID/PATH")
        return value

    @field_validator("freeze")
    @classmethod
    def _layer_groups(cls, value: list[str]) -> list[str]:
        bad = [name for name in value if not re.match(rules.LAYER_GROUP_PATTERN, name)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a layer group name (a top-level module such as encoder)")
        if len(set(value)) != len(value):
            raise ValueError("names a layer group twice")
        return value

    @model_validator(mode="after")
    def _freeze_epochs_need_freeze(self) -> ModelSpec:
        if self.freezeEpochs is not None and not self.freeze:
            raise ValueError(rules.FREEZE_EPOCHS_MESSAGE)
        return self

    @property
    def task(self) -> str:
        """counter, segmenter or custom (user code)."""
        return self.name.split("-", 1)[0] if self.name in BUILTIN_MODELS else "custom"


class DatasetSpec(_Spec):
    pvc: str | None = Field(
        default=None,
        pattern=DNS_LABEL_PATTERN,
        description="PersistentVolumeClaim holding the dataset (mounted at /data).",
    )
    path: str = Field(
        min_length=1,
        description="Prepared dataset directory: inside the PVC when pvc is set, else a path or URI as the "
        "trainer sees it.",
    )
    format: Literal["fieldkube-parquet"] = Field(
        default="fieldkube-parquet",
        description="Dataset layout: fieldkube-prepare's Parquet shards + manifest.json.",
    )


class ResourcesSpec(_Spec):
    cpu: str = Field(
        default="4",
        description="CPU request and limit of each worker.",
        json_schema_extra=rules.quantity("resources.cpu", "4, 500m"),
    )
    memory: str = Field(
        default="16Gi",
        description="Memory request and limit of each worker.",
        json_schema_extra=rules.quantity("resources.memory", "16Gi, 512Mi"),
    )
    sharedMemory: str | None = Field(
        default=None,
        json_schema_extra=rules.quantity("resources.sharedMemory", "8Gi"),
        description="Size limit of each worker's memory-backed /dev/shm (DataLoader workers and MPI's "
        "shared-memory transport use it); default: half of memory. Memory-backed shm counts against the "
        "worker's memory limit: what is stored there is memory the training processes cannot use.",
    )

    @field_validator("cpu", "memory", "sharedMemory")
    @classmethod
    def _quantity(cls, value: str | None) -> str | None:
        """What the API server's isQuantity() rule checks (sizes are also derived from memory)."""
        return None if value is None else _positive_quantity(value)

    @property
    def shared_memory(self) -> str:
        """The /dev/shm size limit: as given, else half of `memory` (written as an exact quantity)."""
        if self.sharedMemory is not None:
            return self.sharedMemory
        return format_bytes(int(parse_quantity(self.memory)) // 2)


class MlflowSpec(_Spec):
    trackingUri: str | None = Field(
        default=None, description="MLflow tracking URI; default: the operator's --mlflow-tracking-uri."
    )
    experiment: str = Field(default="fieldkube", min_length=1, description="MLflow experiment name.")
    registeredModel: str | None = Field(
        default=None,
        min_length=1,
        description="Registered model name; default fieldkube-counter / fieldkube-segmenter.",
    )
    alias: str = Field(
        default="candidate", pattern=r"^[A-Za-z][\w-]*$", description="Alias set on the new model version."
    )
    registerModel: bool = Field(
        default=True, description="Register the trained model in the MLflow model registry."
    )


class CheckpointSpec(_Spec):
    pvc: str | None = Field(
        default=None,
        pattern=DNS_LABEL_PATTERN,
        description="PersistentVolumeClaim for checkpoints (mounted at /checkpoints).",
    )
    path: str | None = Field(
        default=None,
        min_length=1,
        description="Checkpoint directory (inside the PVC when pvc is set); none = off.",
    )
    everyEpochs: int | None = Field(default=1, ge=1, description="Checkpoint at the end of every N epochs.")
    everySteps: int | None = Field(default=None, ge=1, description="Checkpoint every N optimizer steps.")
    keep: int = Field(default=2, ge=1, le=1000, description="Most recent checkpoints kept.")
    resume: bool = Field(default=True, description="Resume from the latest checkpoint when one exists.")


class RunPolicySpec(_Spec):
    """Fixed at creation except `suspend` and `ttlSecondsAfterFinished`, which the operator follows."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        frozen=True,
        json_schema_extra={"x-kubernetes-validations": rules.RUN_POLICY_RULES},
    )

    backoffLimit: int = Field(
        default=0,
        ge=0,
        le=100,
        description="Launcher retries before the job fails. Immutable.",
        json_schema_extra=rules.immutable("runPolicy.backoffLimit"),
    )
    activeDeadlineSeconds: int | None = Field(
        default=None, ge=1, description="Fail the job after this many seconds. Immutable."
    )
    ttlSecondsAfterFinished: int | None = Field(
        default=None,
        ge=0,
        description="Delete the TrainingJob (and its children) this long after it finished; may change.",
    )
    cleanPodPolicy: Literal["Running", "All", "None"] = Field(
        default="Running",
        description="Pods deleted when the job ends: Running (still running), All, or None. Immutable.",
        json_schema_extra=rules.immutable("runPolicy.cleanPodPolicy"),
    )
    suspend: bool = Field(
        default=False, description="Suspend the job (deletes its pods); set false to resume."
    )


class Toleration(_Spec):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    tolerationSeconds: int | None = None


class SchedulingSpec(_Spec):
    priorityClassName: str | None = Field(default=None, description="PriorityClass of the job's pods.")
    nodeSelector: dict[str, str] = Field(
        default_factory=dict,
        description="Node labels the workers must match (and the launcher too when gpusPerWorker is 0).",
        json_schema_extra={"maxProperties": 64},
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Tolerations of the job's pods.", json_schema_extra={"maxItems": 64}
    )
    queueName: str | None = Field(
        default=None,
        pattern=DNS_LABEL_PATTERN,
        description="Kueue LocalQueue (label kueue.x-k8s.io/queue-name).",
    )


class PodMetadataSpec(_Spec):
    labels: dict[str, str] = Field(
        default_factory=dict,
        description="Extra labels on every pod.",
        json_schema_extra={"maxProperties": 64},
    )
    annotations: dict[str, str] = Field(
        default_factory=dict,
        description="Extra annotations on every pod.",
        json_schema_extra={"maxProperties": 64},
    )


class PodsMetadataSpec(_Spec):
    launcher: PodMetadataSpec = Field(default_factory=PodMetadataSpec, description="Launcher pod metadata.")
    worker: PodMetadataSpec = Field(default_factory=PodMetadataSpec, description="Worker pod metadata.")


class DiagnosticsSpec(_Spec):
    """What the operator may copy from the pods into the status (which whoever reads the job can read)."""

    logTail: bool = Field(
        default=False,
        description="Copy the last log lines of the pod that explains a failure into "
        "status.diagnosis.logTail. Off by default: whoever can read TrainingJobs would read them.",
    )
    logTailLines: int = Field(default=20, ge=1, le=200, description="How many log lines logTail copies.")


class TrainingJobSpec(_Spec):
    """What a user asks for: one distributed training run of one model on one dataset."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        frozen=True,
        json_schema_extra={"x-kubernetes-validations": rules.SPEC_RULES},
    )

    model: ModelSpec = Field(
        default_factory=ModelSpec,
        description="What to train.",
        json_schema_extra=rules.immutable("model"),
    )
    dataset: DatasetSpec = Field(description="Training data.", json_schema_extra=rules.immutable("dataset"))
    training: dict[str, Any] = Field(
        default_factory=dict,
        description="Trainer configuration (data, train, runtime sections of fieldkube-train's config).",
        json_schema_extra=rules.immutable("training"),
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=MAX_WORKERS,
        description="Worker pods.",
        json_schema_extra=rules.immutable("workers"),
    )
    gpusPerWorker: int = Field(
        default=1,
        ge=0,
        le=MAX_GPUS_PER_WORKER,
        description="nvidia.com/gpu per worker; also the MPI slots (processes) per worker (at least 1).",
        json_schema_extra=rules.immutable("gpusPerWorker"),
    )
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec,
        description="Per-worker CPU, memory and shared memory.",
        json_schema_extra=rules.immutable("resources"),
    )
    image: str = Field(
        default="fieldkube/trainer:0.1.0",
        min_length=1,
        description="Trainer container image.",
        json_schema_extra=rules.immutable("image"),
    )
    imagePullPolicy: Literal["Always", "IfNotPresent", "Never"] = Field(
        default="IfNotPresent",
        description="Pull policy.",
        json_schema_extra=rules.immutable("imagePullPolicy"),
    )
    mlflow: MlflowSpec = Field(
        default_factory=MlflowSpec,
        description="Experiment tracking and model registry.",
        json_schema_extra=rules.immutable("mlflow"),
    )
    checkpoint: CheckpointSpec = Field(
        default_factory=CheckpointSpec,
        description="Checkpoints.",
        json_schema_extra=rules.immutable("checkpoint"),
    )
    runPolicy: RunPolicySpec = Field(
        default_factory=RunPolicySpec,
        description="Retries, deadlines and cleanup; only suspend and ttlSecondsAfterFinished may change.",
    )
    pendingTimeoutSeconds: int = Field(
        default=900,
        ge=0,
        description="Fail the job if its pods stay unscheduled this long (0 = wait forever); may change.",
    )
    scheduling: SchedulingSpec = Field(
        default_factory=SchedulingSpec,
        description="Where the pods may run.",
        json_schema_extra=rules.immutable("scheduling"),
    )
    podMetadata: PodsMetadataSpec = Field(
        default_factory=PodsMetadataSpec,
        description="Extra labels and annotations on the job's pods.",
        json_schema_extra=rules.immutable("podMetadata"),
    )
    diagnostics: DiagnosticsSpec = Field(
        default_factory=DiagnosticsSpec,
        description="What the status may show of the pods' output; may change.",
    )

    @property
    def slots_per_worker(self) -> int:
        """MPI processes per worker: one per GPU, or one on CPU-only workers."""
        return max(1, self.gpusPerWorker)

    @property
    def total_gpus(self) -> int:
        return self.workers * self.gpusPerWorker

    @property
    def world_size(self) -> int:
        return self.workers * self.slots_per_worker


def parse_spec(spec: dict[str, Any]) -> TrainingJobSpec:
    """Parse a TrainingJob's spec (as stored: defaults mostly already applied by the API server)."""
    return TrainingJobSpec.model_validate(spec)


def effective_training(spec: TrainingJobSpec) -> dict[str, Any]:
    """spec.training with the schema's defaults filled in (what the API server stores)."""
    return training_defaults(spec.training)
