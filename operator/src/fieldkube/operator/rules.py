"""The CEL rules (`x-kubernetes-validations`) the API server enforces on a TrainingJob at `kubectl apply`.

Each rule's message names the field and what was expected. `spec.py` attaches them to its fields, so the
generated CRD carries them; `crd.py` puts the name rules on the object's root (only there is
`metadata.name` visible). Kept apart from the typed spec, like a controller's validation beside its types.
"""

from __future__ import annotations

from typing import Any

# Worker pods are named <name>-worker-<i> and must be DNS-1035 labels (63 characters).
MAX_NAME_LENGTH = 50
# metadata.name: the mpi-operator names Services and pods after the job, so it must be a DNS-1035 label.
DNS_1035_LABEL_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
MAX_QUANTITY_LENGTH = 64
# The trainer's model.init_from forms (fieldkube.contract.config.MODELS_URI for models:/).
MODELS_URI_PATTERN = r"^models:/[^/@]+(@[^/@]+|/[0-9]+)/?$"
RUNS_URI_PATTERN = r"^runs:/[^/]+/.+$"
LAYER_GROUP_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
MAX_FREEZE_EPOCHS = 100_000
FREEZE_EPOCHS_MESSAGE = "spec.model.freezeEpochs needs spec.model.freeze (the layer groups to hold)"


def cel(rule: str, message: str, **extra: str) -> dict[str, Any]:
    return {"rule": rule, "message": message, **extra}


def immutable(field: str) -> dict[str, Any]:
    """Schema extras of a spec field the operator reads only at creation: it may not change after."""
    message = f"spec.{field} is immutable once the job exists (the operator reads it only at creation)"
    return {"x-kubernetes-validations": [cel("self == oldSelf", message)]}


def quantity(field: str, example: str) -> dict[str, Any]:
    """Schema extras of a resource quantity: parsed by the API server's own quantity parser, positive."""
    return {
        "maxLength": MAX_QUANTITY_LENGTH,
        "x-kubernetes-validations": [
            cel(
                "isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))",
                f"spec.{field} must be a positive Kubernetes quantity (e.g. {example})",
            )
        ],
    }


NAME_RULES: list[Any] = [
    cel(
        f"self.metadata.name.matches('{DNS_1035_LABEL_PATTERN}')",
        "metadata.name must be a DNS-1035 label: lowercase letters, digits and '-', starting with a letter "
        "and ending with a letter or digit (the MPIJob's Services are named after it)",
    ),
    cel(
        f"self.metadata.name.size() <= {MAX_NAME_LENGTH}",
        f"metadata.name must be at most {MAX_NAME_LENGTH} characters (worker pods are named "
        "<name>-worker-<index>)",
    ),
]

MODEL_RULES: list[Any] = [
    cel(
        "!has(self.freezeEpochs) || (has(self.freeze) && size(self.freeze) > 0)",
        FREEZE_EPOCHS_MESSAGE,
        fieldPath=".freezeEpochs",
    )
]

INIT_FROM_RULES: list[Any] = [
    cel(
        f"!self.startsWith('models:/') || self.matches('{MODELS_URI_PATTERN}')",
        "spec.model.initFrom must be models:/NAME@alias or models:/NAME/VERSION",
    ),
    cel(
        f"!self.startsWith('runs:/') || self.matches('{RUNS_URI_PATTERN}')",
        "spec.model.initFrom must be runs:/RUN_ID/PATH (e.g. runs:/0a1b/model)",
    ),
]

# An optional field's own rule sees no oldSelf when it is added or removed: checked on its parent.
RUN_POLICY_RULES: list[Any] = [
    cel(
        "has(self.activeDeadlineSeconds) == has(oldSelf.activeDeadlineSeconds) && "
        "(!has(self.activeDeadlineSeconds) || self.activeDeadlineSeconds == oldSelf.activeDeadlineSeconds)",
        "spec.runPolicy.activeDeadlineSeconds is immutable once the job exists "
        "(the operator reads it only at creation)",
        fieldPath=".activeDeadlineSeconds",
    )
]

# The global batch is split evenly over the training processes: workers × max(1, gpusPerWorker).
_PROCESSES = "(self.workers * (self.gpusPerWorker > 0 ? self.gpusPerWorker : 1))"
_PROCESSES_TEXT = "spec.workers * max(1, spec.gpusPerWorker)"
_GLOBAL_BATCH = (
    "has(self.training.train) && has(self.training.train.batch_mode) "
    "&& self.training.train.batch_mode == 'global' && has(self.training.train.batch_size)"
)

SPEC_RULES: list[Any] = [
    cel(
        f"!({_GLOBAL_BATCH}) || self.training.train.batch_size % {_PROCESSES} == 0",
        "spec.training.train.batch_size (batch_mode: global) must be divisible by the number of training "
        f"processes ({_PROCESSES_TEXT})",
        # No messageExpression: the API server estimates its cost (string concatenation) as over budget and
        # refuses the whole CRD.
        fieldPath=".training.train.batch_size",
    ),
    cel(
        "!has(self.training.runtime) || !has(self.training.runtime.backend) "
        "|| self.training.runtime.backend != 'single' || (self.workers == 1 && self.gpusPerWorker <= 1)",
        "spec.training.runtime.backend 'single' runs one process: it needs workers: 1 and gpusPerWorker <= 1",
        fieldPath=".training.runtime.backend",
    ),
    cel(
        "!has(self.checkpoint.pvc) || has(self.checkpoint.path)",
        "spec.checkpoint.path is required when spec.checkpoint.pvc is set",
        fieldPath=".checkpoint.path",
    ),
]
