"""Fine-tuning from a registered model through a real MLflow server: the run starts from the source's
weights (its first step's loss is the source's loss on that batch), keeps frozen layer groups fixed,
records the lineage on the run, the bundle and the new registry version, and scores the source on the
same test tiles; a config that asks for another architecture stops in one line naming both."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from fieldkube.contract.config import DataConfig
from fieldkube.trainer.loader import PreparedDataset, epoch_batches
from fieldkube.trainer.losses import resolve_loss
from fieldkube.vision.bundle import load_bundle
from fieldkube.vision.models import build_model

SOURCE_NAME = "init-from-source"
SOURCE_ARCH = ["--set", "model.name=counter-fcrn", "--set", "model.params.base_channels=4"]


@pytest.fixture(scope="module")
def source_model(
    field_dataset: Path,
    tmp_path_factory: pytest.TempPathFactory,
    mlflow_server: str,
    train_cli,
    fast_args,
    env,
) -> dict[str, Any]:
    """A small counter-fcrn trained for one epoch and registered as init-from-source@champion."""
    out = tmp_path_factory.mktemp("init-source")
    args = [
        "--data", str(field_dataset), *SOURCE_ARCH, "--set", "train.epochs=1", "--set", "train.lr=0.001",
        "--set", f"output_dir={out}", *fast_args, "--set", "tracking.experiment=init-from",
        "--set", f"tracking.registered_name={SOURCE_NAME}", "--set", "tracking.alias=champion",
        "--set", f"tracking.run_id_file={out / 'run_id'}",
    ]  # fmt: skip
    proc = train_cli("single", args, env=env(MLFLOW_TRACKING_URI=mlflow_server))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"run_id": (out / "run_id").read_text().strip(), "bundle": out / "model"}


def _first_batch_loss(model: torch.nn.Module, dataset_root: Path, global_batch: int) -> float:
    """The loss `fieldkube-train` (1 rank, seed 0, default augmentation) computes on its first batch."""
    train_set = PreparedDataset(dataset_root, "train", DataConfig(), seed=0, augment=True)
    keys = epoch_batches(len(train_set), global_batch, 0, 1, seed=0, epoch=0)[0]
    inputs = torch.stack([train_set[k][0] for k in keys])
    targets = torch.stack([train_set[k][1] for k in keys])
    _, loss_fn = resolve_loss("auto", "counter")
    model.train()
    with torch.no_grad():
        return float(loss_fn(model(inputs), targets))


def test_fine_tuning_from_a_registered_model_starts_from_its_weights_and_records_the_lineage(
    source_model: dict[str, Any],
    field_dataset: Path,
    tmp_path: Path,
    mlflow_server: str,
    train_cli,
    fast_args,
    env,
) -> None:
    out = tmp_path / "tuned"
    uri = f"models:/{SOURCE_NAME}@champion"
    args = [
        "--data", str(field_dataset), "--init-from", uri, *fast_args, "--set", "train.max_steps=3",
        "--set", "train.log_every_steps=1", "--set", "model.freeze=[encoder, middle]",
        "--set", f"output_dir={out}", "--set", "train.evaluate=true",
        "--set", "train.eval_samples=0", "--set", "tracking.experiment=init-from",
        "--set", "tracking.registered_name=init-from-tuned",
        "--set", f"tracking.run_id_file={out / 'run_id'}",
    ]  # fmt: skip
    proc = train_cli("single", args, env=env(MLFLOW_TRACKING_URI=mlflow_server))
    assert proc.returncode == 0, proc.stderr[-3000:]

    torch.set_num_threads(1)
    source = load_bundle(source_model["bundle"])
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    run_id = (out / "run_id").read_text().strip()
    first = next(m for m in client.get_metric_history(run_id, "train_loss") if m.step == 1)
    expected = _first_batch_loss(source.model, field_dataset, global_batch=4)
    assert first.value == pytest.approx(expected, rel=1e-4)
    torch.manual_seed(0)  # what a run from scratch (seed 0) would have started from
    scratch = _first_batch_loss(build_model("counter-fcrn", base_channels=4), field_dataset, global_batch=4)
    assert abs(scratch - expected) > 1e-3 * abs(expected)

    lineage = {
        "source": uri,
        "registered_model": SOURCE_NAME,
        "version": "1",
        "run_id": source_model["run_id"],
    }
    run = client.get_run(run_id)
    assert run.data.params["model.init_from"] == uri
    assert run.data.params["model.name"] == "counter-fcrn"  # taken from the source
    assert {k: run.data.tags[f"fieldkube.init_from.{k}"] for k in lineage} == lineage
    version = client.get_model_version_by_alias("init-from-tuned", "candidate")
    assert version.run_id == run_id
    assert {k: version.tags[f"fieldkube.init_from.{k}"] for k in lineage} == lineage
    assert "test_mae_source" in run.data.metrics and "test_mae_cnn" in run.data.metrics

    mlflow.set_tracking_uri(mlflow_server)
    registered = load_bundle(
        mlflow.artifacts.download_artifacts(
            "models:/init-from-tuned@candidate", dst_path=str(tmp_path / "dl")
        )
    )
    assert registered.spec.lineage == lineage
    assert json.loads((out / "model" / "model.json").read_text())["lineage"] == lineage
    tuned, before = registered.model.state_dict(), source.model.state_dict()
    for key in before:
        if key.startswith(("encoder.", "middle.")):  # frozen for the first epoch (all 3 steps)
            assert torch.equal(tuned[key], before[key]), key
    assert not torch.equal(tuned["head.weight"], before["head.weight"])


def test_an_architecture_other_than_the_sources_fails_in_one_line_naming_both(
    source_model: dict[str, Any],
    field_dataset: Path,
    tmp_path: Path,
    mlflow_server: str,
    train_cli,
    fast_args,
    env,
) -> None:
    args = [
        "--data", str(field_dataset), "--init-from", f"models:/{SOURCE_NAME}/1", "--model", "counter-mcnn",
        "--set", f"output_dir={tmp_path / 'out'}", *fast_args,
    ]  # fmt: skip
    proc = train_cli("single", args, env=env(MLFLOW_TRACKING_URI=mlflow_server))
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fieldkube-train: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"models:/{SOURCE_NAME}/1 is counter-fcrn" in errors[0]
    assert "ask for counter-mcnn" in errors[0]
    assert not (tmp_path / "out" / "model").exists()

    same_name_wider = ["--set", "model.name=counter-fcrn", "--set", "model.params.base_channels=8"]
    bundle_args = ["--data", str(field_dataset), "--init-from", str(source_model["bundle"]), *same_name_wider,
                   "--set", f"output_dir={tmp_path / 'out2'}", *fast_args]  # fmt: skip
    proc = train_cli("single", bundle_args, env=env())
    assert proc.returncode == 2
    assert "'base_channels': 4" in proc.stderr and "'base_channels': 8" in proc.stderr, proc.stderr[-2000:]
