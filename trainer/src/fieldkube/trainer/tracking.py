"""MLflow tracking from rank 0: run lifecycle, params, step/epoch/progress metrics, artifacts, model registry.

The run carries the TrainingJob's identity as tags (from FIELDKUBE_JOB_NAMESPACE / _NAME / _UID) and
progress metrics that the operator reads (names from `fieldkube.contract.names`). On success the model
bundle is logged as artifact path `model`, registered as a new version of `fieldkube-counter` /
`fieldkube-segmenter` and given the alias.
A resumed job continues its previous run (the run id travels in the checkpoint).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from fieldkube.contract.config import TrackingConfig, TrainingConfig
from fieldkube.contract.names import (
    INIT_FROM_TAG_PREFIX,
    JOB_NAME_ENV,
    JOB_TAG_ENV,
    MODEL_VERSION_TAG,
    REGISTERED_MODEL_TAG,
)
from fieldkube.trainer.dataset_format import write_json_atomic
from fieldkube.trainer.errors import ConfigError

log = logging.getLogger("fieldkube.tracking")

REGISTERED_NAMES = {"counter": "fieldkube-counter", "segmenter": "fieldkube-segmenter"}


def lineage_tags(lineage: dict[str, str]) -> dict[str, str]:
    """MLflow tags that name the model a run started from (`<prefix>.source`, `.registered_model`,
    `.version`, `.run_id`, on the run and on the registry version it creates); empty from scratch."""
    return {f"{INIT_FROM_TAG_PREFIX}.{key}": str(value) for key, value in lineage.items()}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def tracking_uri(config: TrackingConfig) -> str | None:
    return config.uri or os.environ.get("MLFLOW_TRACKING_URI") or None


class Tracker:
    """Rank 0's MLflow run. Every method is a no-op when tracking is off."""

    def __init__(self, config: TrainingConfig, enabled: bool) -> None:
        self.config = config.tracking
        self.uri = tracking_uri(self.config) if enabled else None
        self.run_id: str | None = None
        self._mlflow: Any = None
        self._client: Any = None

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def start(
        self, config: TrainingConfig, resume_run_id: str | None, extra_params: dict[str, Any]
    ) -> str | None:
        if self.uri is None:
            return None
        import mlflow
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        mlflow.set_tracking_uri(self.uri)
        self._mlflow = mlflow
        try:
            self._client = MlflowClient(self.uri)
            experiment = self._client.get_experiment_by_name(self.config.experiment)
        except MlflowException as exc:  # e.g. a file store MLflow refuses, or a URI that is not a server
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(
                f"field 'tracking.uri': MLflow cannot use {self.uri!r}: {first_line} "
                "(expected an http(s):// tracking server or sqlite:///path.db)"
            ) from exc
        if experiment is None:
            try:
                experiment_id = self._client.create_experiment(self.config.experiment)
            except MlflowException:  # created concurrently by another job: use it
                experiment_id = self._client.get_experiment_by_name(self.config.experiment).experiment_id
        else:
            experiment_id = experiment.experiment_id
        tags = {tag: os.environ[env] for tag, env in JOB_TAG_ENV.items() if os.environ.get(env)}
        run_name = self.config.run_name or os.environ.get(JOB_NAME_ENV) or None
        if resume_run_id:
            run = mlflow.start_run(run_id=resume_run_id, log_system_metrics=self.config.system_metrics)
            log.info("continuing MLflow run %s", resume_run_id)
        else:
            run = mlflow.start_run(
                experiment_id=experiment_id,
                run_name=run_name,
                tags=tags,
                log_system_metrics=self.config.system_metrics,
            )
            params = {k: ("" if v is None else str(v))[:500] for k, v in flatten(config.model_dump()).items()}
            params.update({k: str(v) for k, v in extra_params.items()})
            mlflow.log_params(params)
        self.run_id = run.info.run_id
        if self.config.run_id_file:
            path = Path(self.config.run_id_file)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(self.run_id + "\n")
            tmp.replace(path)
        log.info("MLflow run %s at %s (experiment %s)", self.run_id, self.uri, self.config.experiment)
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.active:
            self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifacts(self, directory: Path, artifact_path: str | None = None) -> None:
        if self.active:
            self._mlflow.log_artifacts(str(directory), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.active:
            self._mlflow.set_tags(tags)

    def register_bundle(
        self, bundle_dir: Path, task: str, lineage: dict[str, str] | None = None
    ) -> dict[str, Any] | None:
        """Log the bundle as artifact path `model`, create a registered version (tagged with the lineage of a
        fine-tuned model) and point the alias at it."""
        if not self.active:
            return None
        self._mlflow.log_artifacts(str(bundle_dir), artifact_path="model")
        if not self.config.register_model:
            return None
        from mlflow.exceptions import MlflowException

        name = self.config.registered_name or REGISTERED_NAMES[task]
        with contextlib.suppress(MlflowException):  # already registered
            self._client.create_registered_model(name)
        run = self._client.get_run(self.run_id)
        source = f"{run.info.artifact_uri.rstrip('/')}/model"
        version = self._client.create_model_version(
            name, source=source, run_id=self.run_id, tags=lineage_tags(lineage or {})
        )
        self._client.set_registered_model_alias(name, self.config.alias, version.version)
        self._mlflow.set_tags({REGISTERED_MODEL_TAG: name, MODEL_VERSION_TAG: str(version.version)})
        log.info("registered %s version %s as @%s", name, version.version, self.config.alias)
        return {"name": name, "version": str(version.version), "alias": self.config.alias, "source": source}

    def finish(self, status: str) -> None:
        if self.active:
            self._mlflow.end_run(status=status)
            self.run_id = None


def write_report(path: Path, report: dict[str, Any]) -> None:
    write_json_atomic(path, report)
