"""Against a real MLflow server: rank 0 of a 2-rank Horovod run logs params, step/progress and evaluation
metrics, artifacts (report, overlays, model bundle with its golden sample), the job's tags and run id
file, and registers the model with the requested alias, which serving then resolves and loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from mlflow import MlflowClient

from fieldkube.contract.config import DataConfig
from fieldkube.trainer.dataset_format import read_manifest
from fieldkube.trainer.loader import PreparedDataset


def test_two_rank_run_is_tracked_and_registered_with_an_alias(
    field_dataset: Path, tmp_path: Path, mlflow_server: str, train_cli, fast_args: list[str], env
) -> None:
    run_id_file = tmp_path / "run_id"
    args = [
        "--data", str(field_dataset), "--set", "train.epochs=1", "--set", f"output_dir={tmp_path / 'out'}",
        *fast_args, "--set", "train.evaluate=true", "--set", "train.eval_samples=2",
        "--set", "tracking.experiment=trainer-tests", "--set", "tracking.alias=champion",
        "--set", f"tracking.run_id_file={run_id_file}",
    ]  # fmt: skip
    job_env = env(
        MLFLOW_TRACKING_URI=mlflow_server,
        FIELDKUBE_JOB_NAMESPACE="team-a",
        FIELDKUBE_JOB_NAME="flowers-1",
        FIELDKUBE_JOB_UID="0b6d-uid",
    )
    proc = train_cli("horovod", args, env=job_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    run_id = run_id_file.read_text().strip()
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "trainer-tests"
    assert len(client.search_runs([run.info.experiment_id])) == 1  # rank 1 logged nothing
    params = run.data.params
    assert params["model.name"] == "counter-mcnn"
    assert params["world_size"] == "2" and params["backend"] == "horovod"
    assert params["loss_resolved"] == "l2_per_image"
    tags = run.data.tags
    assert tags["fieldkube.job.namespace"] == "team-a"
    assert tags["fieldkube.job.name"] == "flowers-1"
    assert tags["fieldkube.job.uid"] == "0b6d-uid"
    metrics = run.data.metrics
    assert metrics["progress_percent"] == 100.0
    steps = read_manifest(field_dataset)["splits"]["train"]["rows"] // 4  # global batch 4, one epoch
    assert metrics["progress_step"] == steps
    for key in ("train_loss", "images_per_second", "val_loss", "train_loss_epoch", "test_mae_cnn",
                "test_mae_classical"):  # fmt: skip
        assert key in metrics, key
    assert len(client.get_metric_history(run_id, "train_loss")) == (steps + 1) // 2  # every 2 steps + last

    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"model", "evaluation"} <= artifacts
    assert {a.path for a in client.list_artifacts(run_id, "model")} == {
        "model/golden.png",
        "model/model.json",
        "model/model.safetensors",
    }
    evaluation = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert "evaluation/report.json" in evaluation
    assert len(client.list_artifacts(run_id, "evaluation/overlays")) == 2

    version = client.get_model_version_by_alias("fieldkube-counter", "champion")
    assert version.run_id == run_id
    assert version.source.endswith("/model")

    import mlflow

    from fieldkube.vision.bundle import load_bundle

    mlflow.set_tracking_uri(mlflow_server)
    local = mlflow.artifacts.download_artifacts(
        "models:/fieldkube-counter@champion", dst_path=str(tmp_path / "dl")
    )
    loaded = load_bundle(local)
    assert loaded.spec.name == "counter-mcnn" and loaded.spec.density_scale == 100.0
    assert loaded.spec.trained["world_size"] == 2
    # The golden sample: the test tile with the most flowers and the trained model's count on it.
    assert loaded.spec.golden["file"] == "golden.png" and set(loaded.spec.golden) == {"file", "count"}
    assert loaded.golden is not None
    test_set = PreparedDataset(field_dataset, "test", DataConfig(), seed=0, augment=False)
    counts = [float(test_set.record(i)["count"]) for i in range(min(32, len(test_set)))]
    assert max(counts) > 0
    np.testing.assert_array_equal(loaded.golden.image, test_set.raw(int(np.argmax(counts)))[0])
    assert "golden sample: test tile" in proc.stdout + proc.stderr

    import torch

    from fieldkube.serving.served_model import load_served_model

    served = load_served_model(
        Path(local), "counter", "fieldkube-counter", version.version, torch.device("cpu"), "t"
    )
    assert served.golden is not None and served.golden.answer == loaded.golden.answer
