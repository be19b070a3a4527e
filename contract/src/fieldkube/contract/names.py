"""Names and numbers the operator and the trainer share: change one here and both sides follow."""

from __future__ import annotations

# Built-in models (fieldkube.vision.models builds them; a unit test keeps its registry equal to this list).
BUILTIN_MODELS = ("counter-mcnn", "counter-fcrn", "segmenter-unet")
DEFAULT_MODEL = "counter-mcnn"

# Ports: the trainer's Prometheus /metrics (local rank 0; rank r uses + r) and torchrun's rendezvous.
METRICS_PORT = 9400
RDZV_PORT = 29400

# The whole training configuration as one JSON document, in this environment variable of the launcher
# (mpirun forwards it to every rank): `fieldkube-train --config-env FIELDKUBE_TRAINING_CONFIG`.
CONFIG_ENV = "FIELDKUBE_TRAINING_CONFIG"

# The TrainingJob a run belongs to: environment variables set by the operator, copied by the trainer into
# MLflow tags of the same meaning. The operator finds a job's run by its uid tag.
JOB_NAMESPACE_ENV = "FIELDKUBE_JOB_NAMESPACE"
JOB_NAME_ENV = "FIELDKUBE_JOB_NAME"
JOB_UID_ENV = "FIELDKUBE_JOB_UID"
JOB_NAMESPACE_TAG = "fieldkube.job.namespace"
JOB_NAME_TAG = "fieldkube.job.name"
JOB_UID_TAG = "fieldkube.job.uid"
JOB_TAG_ENV = {
    JOB_NAMESPACE_TAG: JOB_NAMESPACE_ENV,
    JOB_NAME_TAG: JOB_NAME_ENV,
    JOB_UID_TAG: JOB_UID_ENV,
}

# Tags the trainer sets on its run once it registered the model; the operator copies them into status.
REGISTERED_MODEL_TAG = "fieldkube.registered_model"
MODEL_VERSION_TAG = "fieldkube.model_version"
# Prefix of the lineage tags of a fine-tuned model (fieldkube.init_from.uri, .name, .version, ...).
INIT_FROM_TAG_PREFIX = "fieldkube.init_from"

# MLflow metrics the trainer logs while it runs and the operator reads into status.progress.
PROGRESS_EPOCH = "progress_epoch"
PROGRESS_STEP = "progress_step"
PROGRESS_PERCENT = "progress_percent"
TRAIN_LOSS = "train_loss"
IMAGES_PER_SECOND = "images_per_second"
PROGRESS_METRICS = (PROGRESS_EPOCH, PROGRESS_STEP, PROGRESS_PERCENT, TRAIN_LOSS, IMAGES_PER_SECOND)
