"""fieldkube-scale --cluster without a cluster: its flags refuse what a TrainingJob cannot express in one
line, an unreachable API server is one line, and a real trainer run's MLflow record (found by the job uid
tag the operator's environment gives it) becomes the sweep's rows, tables and sweep run in a real MLflow.
The sweep through real TrainingJobs runs in tests/integration/operator/test_scale_on_real_node.py."""

from __future__ import annotations

import csv
import json
import socket
from pathlib import Path

import pytest
from mlflow import MlflowClient

from fieldkube.trainer import scale
from fieldkube.trainer.scale_cluster import log_sweep, rows_from_results, run_results, write_tables

EXAMPLE = Path(__file__).resolve().parents[3] / "manifests/examples/counter-cpu.yaml"


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        scale.main(argv)
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--strategy", "allreduce,ps-sync"], "--strategy allreduce,ps-sync: --cluster runs allreduce only"),
        (["--ps", "1"], "--ps/--staleness: parameter servers are local-only"),
        (["--launcher", "mpirun"], "--launcher mpirun: with --cluster expected one of horovod, ddp"),
        (["--data", "data/field"], "--data: with --cluster the dataset is a PVC"),
        (["--steps", "1"], "--steps 1: expected >= 2"),
        (["--workers", "0,1"], "--workers '0,1': expected integers >= 1"),
    ],
)
def test_cluster_flags_refused_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, extra: list[str], expected: str
) -> None:
    err = one_line_error(capsys, ["--cluster", "--template", str(EXAMPLE), "--out", str(tmp_path), *extra])
    assert expected in err


def test_cluster_needs_a_dataset_an_http_mlflow_and_a_reachable_cluster(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = ["--out", str(tmp_path / "o")]
    assert "--dataset-pvc and --dataset-path: required" in one_line_error(capsys, ["--cluster", *out])
    no_mlflow = ["--cluster", "--dataset-pvc", "d", "--dataset-path", "p", *out]
    assert "--mlflow-uri: expected an http(s) MLflow server" in one_line_error(capsys, no_mlflow)
    template = tmp_path / "job.yaml"
    template.write_text("kind: Deployment\nspec: {}\n")
    assert "expected a TrainingJob" in one_line_error(
        capsys, ["--cluster", "--template", str(template), *out]
    )

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": f"https://127.0.0.1:{port}"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    argv = ["--cluster", "--template", str(EXAMPLE), "--mlflow-uri", "http://127.0.0.1:1", *out]
    err = one_line_error(capsys, [*argv, "--kubeconfig", str(kubeconfig)])
    assert f"cluster at https://127.0.0.1:{port} unreachable" in err
    err = one_line_error(capsys, [*argv, "--kubeconfig", str(tmp_path / "none")])
    assert "--kubeconfig: cannot load" in err


def test_rows_tables_and_sweep_run_from_a_real_trainer_run_in_mlflow(
    field_dataset: Path, tmp_path: Path, mlflow_server: str, train_cli, fast_args: list[str], env
) -> None:
    args = [
        "--data", str(field_dataset), "--set", "train.max_steps=4", "--set", "train.epochs=100",
        "--set", f"output_dir={tmp_path / 'out'}", *fast_args, "--set", "train.log_every_steps=1",
        "--set", "tracking.experiment=sweep-tests", "--set", "tracking.register_model=false",
    ]  # fmt: skip
    job_env = env(MLFLOW_TRACKING_URI=mlflow_server, FIELDKUBE_JOB_UID="uid-w1")
    proc = train_cli("single", args, env=job_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    client = MlflowClient(tracking_uri=mlflow_server)
    trial = run_results(client, "sweep-tests", "uid-w1")
    assert trial["images_per_second"] > 0 and trial["world_size"] == 1
    assert [p[1] for p in trial["loss_curve"]] == [1, 2, 3, 4]
    assert all(p[0] >= 0 for p in trial["loss_curve"])
    with pytest.raises(scale.DataError, match="no MLflow run in experiment 'sweep-tests' tagged"):
        run_results(client, "sweep-tests", "uid-of-no-run")

    # Two workers at twice the rate: speedup 2, efficiency 1 (the local sweep's definitions).
    twice = {**trial, "images_per_second": 2 * trial["images_per_second"]}
    samples = {
        1: [{**trial, "job": "j1", "job_seconds": 30.0}],
        2: [{**twice, "job": "j2", "job_seconds": 40.0}],
    }
    table = scale.scaling_table(rows_from_results(samples))
    assert [(r["workers"], r["speedup"], r["efficiency"]) for r in table] == [(1, 1.0, 1.0), (2, 2.0, 1.0)]
    md, csv_path = write_tables(table, tmp_path)
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["workers"] for r in rows] == ["1", "2"] and float(rows[1]["images_per_second"]) > 0
    assert "| 2 |" in md.read_text() and "2.00x" in md.read_text()

    result = {"runs": table, "steps": 4, "batch_per_worker": 4, "threads_per_worker": 1, "repeat": 1,
              "backend": "horovod", "namespace": "n"}  # fmt: skip
    run_id = log_sweep(client, "sweep-tests", "scale-test", result, [md, csv_path])
    assert {a.path for a in client.list_artifacts(run_id)} == {"scale.md", "scale.csv"}
    history = client.get_metric_history(run_id, "images_per_second")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2]
