"""The TrainingJob status as a typed model: the CRD's status schema and what the status function returns."""

# Field names are the Kubernetes API's (camelCase), as users write them in YAML.
# ruff: noqa: N815

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Phase = Literal["Pending", "Running", "Succeeded", "Failed", "Suspended"]
TERMINAL_PHASES: frozenset[str] = frozenset({"Succeeded", "Failed"})


class _Status(BaseModel):
    model_config = ConfigDict(extra="forbid")


# metav1.Condition's reason: CamelCase, never empty (kubectl, kstatus and alerting read it).
REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
MAX_CONDITIONS = 16


class Condition(_Status):
    """One condition, shaped like metav1.Condition (the Kubernetes API conventions)."""

    type: str = Field(
        max_length=316, description="Created, Scheduled, Running, Succeeded, Failed or Suspended."
    )
    status: Literal["True", "False", "Unknown"]
    observedGeneration: int | None = Field(
        default=None, ge=0, description="The metadata.generation this condition was computed from."
    )
    reason: str = Field(
        min_length=1,
        max_length=1024,
        pattern=REASON_PATTERN,
        description="Why the condition has this status, in CamelCase (e.g. Unschedulable, PodsScheduled).",
    )
    message: str = Field(default="", max_length=32768, description="Details for a person.")
    lastTransitionTime: str | None = Field(default=None, description="When status last changed (RFC 3339).")


class WorkersStatus(_Status):
    ready: int = Field(default=0, description="Worker pods running and ready.")
    total: int = Field(default=0, description="Worker pods requested.")


class Progress(_Status):
    epoch: float | None = Field(default=None, description="Current epoch (1-based, may be fractional).")
    epochs: int | None = Field(default=None, description="Planned epochs.")
    step: int | None = Field(default=None, description="Optimizer steps done.")
    percent: float | None = Field(default=None, description="Percent of the planned steps done.")
    loss: float | None = Field(default=None, description="Last training loss.")
    imagesPerSecond: float | None = Field(default=None, description="Last global throughput.")
    updatedAt: str | None = Field(default=None, description="When the MLflow run last reported.")
    summary: str = Field(default="", description="Short text for kubectl's Progress column.")


class MlflowStatus(_Status):
    runId: str | None = None
    runUrl: str | None = None
    experimentId: str | None = None
    runStatus: str | None = Field(
        default=None, description="MLflow's run status (RUNNING, FINISHED, FAILED, KILLED)."
    )


class RegisteredModelStatus(_Status):
    name: str
    version: str
    alias: str | None = None


class Diagnosis(_Status):
    pod: str = Field(description="The pod that explains the failure.")
    role: str = Field(default="", description="launcher or worker.")
    container: str = ""
    exitCode: int | None = None
    reason: str = Field(
        default="", description="OOMKilled, Evicted, Error, Unschedulable, PendingTimeout, ..."
    )
    message: str = ""
    logTail: list[str] = Field(
        default_factory=list,
        description="Last log lines of the container, when readable and spec.diagnostics.logTail is true.",
    )


class TrainingJobStatus(_Status):
    phase: Phase = "Pending"
    reason: str = Field(default="", description="Why the job is in this phase (e.g. Unschedulable).")
    message: str = ""
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=MAX_CONDITIONS,
        description="At most one condition per type.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observedGeneration: int | None = None
    mpiJobName: str | None = None
    gpus: int = Field(default=0, description="GPUs requested by all workers.")
    workers: WorkersStatus = Field(default_factory=WorkersStatus)
    startTime: str | None = None
    completionTime: str | None = None
    progress: Progress = Field(default_factory=Progress)
    mlflow: MlflowStatus = Field(default_factory=MlflowStatus)
    registeredModel: RegisteredModelStatus | None = None
    diagnosis: Diagnosis | None = None

    def as_patch(self) -> dict[str, object]:
        """The JSON written to the status subresource."""
        return self.model_dump(mode="json", exclude_none=True)
