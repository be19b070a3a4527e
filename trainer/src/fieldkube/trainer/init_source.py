"""Start a training run from a trained model instead of random weights (`model.init_from`).

A new crop, camera or season needs a counter adapted from the one already serving, trained on a handful
of labelled images. The source is a registry version (`models:/NAME@alias`, `models:/NAME/version`),
another MLflow artifact URI (`runs:/RUN_ID/model`) or a bundle directory. Its model.json decides the
architecture: a model.name/params left unset in the config take the source's, a set one must name the
same model with the same effective parameters, so a mismatch stops the run before any step instead of
training a model that cannot load those weights. The lineage (where the weights came from, and which
registry version and run that was) travels with the run: MLflow tags, the bundle's model.json and the
new registry version's tags. Only rank 0 talks to MLflow; the other ranks receive what it fetched.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fieldkube.contract.config import MODELS_URI, DataConfig, ModelConfig, TrainingConfig
from fieldkube.trainer.errors import ConfigError
from fieldkube.trainer.tracking import tracking_uri
from fieldkube.vision.bundle import BundleError, BundleSpec, find_bundle_dir, load_bundle
from fieldkube.vision.models import UnknownModelError, model_params

FIELD = "model.init_from"


@dataclass(frozen=True)
class InitSource:
    """What a run starts from: the source bundle's spec, its weights (CPU tensors) and its lineage."""

    spec: BundleSpec
    weights: dict[str, torch.Tensor]
    lineage: dict[str, str]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _read_bundle(directory: Path, source: str) -> tuple[BundleSpec, dict[str, torch.Tensor]]:
    try:
        loaded = load_bundle(directory)
    except BundleError as exc:
        raise ConfigError(f"{FIELD} {source}: {exc}") from None
    weights = {k: v.detach().cpu().contiguous() for k, v in loaded.model.state_dict().items()}
    return loaded.spec, weights


def _from_mlflow(uri: str, server: str | None) -> InitSource:
    if server is None:
        raise ConfigError(
            f"{FIELD} {uri}: an MLflow source needs a tracking server (tracking.uri or MLFLOW_TRACKING_URI)"
        )
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    lineage = {"source": uri}
    artifact_uri = uri
    try:
        match = MODELS_URI.match(uri)
        if match is not None:
            client = MlflowClient(tracking_uri=server, registry_uri=server)
            if match["alias"]:
                version = client.get_model_version_by_alias(match["name"], match["alias"])
            else:
                version = client.get_model_version(match["name"], match["version"])
            artifact_uri = str(version.source)
            lineage.update(registered_model=match["name"], version=str(version.version))
            if version.run_id:
                lineage["run_id"] = str(version.run_id)
        elif uri.startswith("runs:/"):
            lineage["run_id"] = uri.removeprefix("runs:/").split("/", 1)[0]
        target = Path(tempfile.mkdtemp(prefix="fieldkube-init-from-"))
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=artifact_uri, dst_path=str(target), tracking_uri=server
            )
            try:
                bundle_dir = find_bundle_dir(Path(local))
            except FileNotFoundError as exc:
                raise ConfigError(f"{FIELD} {uri}: {exc}") from None
            spec, weights = _read_bundle(bundle_dir, uri)
        finally:
            shutil.rmtree(target, ignore_errors=True)
    except MlflowException as exc:
        raise ConfigError(f"{FIELD} {uri}: {_first_line(exc)}") from None
    return InitSource(spec, weights, lineage)


def fetch_init_source(config: TrainingConfig) -> InitSource:
    """Resolve and read `model.init_from` (rank 0 only: it may talk to MLflow)."""
    source = config.model.init_from
    if source is None:
        raise ValueError("fetch_init_source needs model.init_from")
    if MODELS_URI.match(source) or (":/" in source and not source.startswith("file:")):
        return _from_mlflow(source, tracking_uri(config.tracking))
    path = Path(source.removeprefix("file://").removeprefix("file:")).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{FIELD} {source}: no such bundle directory")
    spec, weights = _read_bundle(path, source)
    return InitSource(spec, weights, {"source": str(path.resolve())})


def _effective(name: str, params: dict[str, Any]) -> dict[str, Any]:
    try:
        return {**model_params(name), **params}
    except UnknownModelError:
        return dict(params)


def _describe(name: str, params: dict[str, Any]) -> str:
    return f"{name} {params}" if params else name


def adopt_architecture(model: ModelConfig, spec: BundleSpec, source: str) -> ModelConfig:
    """model with the source's architecture; ConfigError naming both when the config asks for another."""
    chosen = model.model_fields_set
    if "name" in chosen:  # a named model with unset params means that model's defaults
        name, params = model.name, model.params
    else:
        name, params = spec.name, model.params if "params" in chosen else spec.params
    if name != spec.name or _effective(name, params) != _effective(spec.name, spec.params):
        raise ConfigError(
            f"{FIELD} {source} is {_describe(spec.name, spec.params)} but model.name/model.params ask for "
            f"{_describe(name, params)}: leave them unset or make them equal"
        )
    return model.model_copy(update={"name": spec.name, "params": dict(spec.params)})


def adopt_density_scale(data: DataConfig, spec: BundleSpec, source: str) -> DataConfig:
    """data with the source counter's density scale (its outputs are in those units); a set, different
    data.density_scale is a ConfigError naming both: the first steps would chase a rescaled target."""
    if spec.task != "counter" or data.density_scale == spec.density_scale:
        return data
    if "density_scale" in data.model_fields_set:
        raise ConfigError(
            f"{FIELD} {source} was trained with density_scale {spec.density_scale:g} but data.density_scale "
            f"is {data.density_scale:g}: leave it unset or make them equal"
        )
    return data.model_copy(update={"density_scale": spec.density_scale})
