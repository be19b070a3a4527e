"""Parameter-server training (fieldkube-scale --strategy ps-sync|ps-async) with real processes over gloo
on loopback: synchronous servers reach the weights of allreduce on the same data order, asynchronous
ones keep to their staleness bound, and flags that do not fit are refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

BIN = Path(sys.executable).parent
# 2 epochs with a cosine-decaying lr: the servers must follow the trainer's schedule, not only its lr
SCHEDULE = ["--set", "train.epochs=2", "--set", "train.lr_schedule=cosine"]


def _weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def allreduce_weights(field_dataset: Path, tmp_path_factory, train_cli, fast_args) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("allreduce")
    args = ["--data", str(field_dataset), *SCHEDULE, "--set", f"output_dir={out}", *fast_args]
    proc = train_cli("ddp", args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _weights(out)


@pytest.mark.parametrize("servers", [1, 2])
def test_sync_servers_reach_the_weights_of_two_allreduce_ranks(
    servers: int, field_dataset: Path, tmp_path: Path, allreduce_weights, fast_args, env, port
) -> None:
    from fieldkube.vision.models import build_model

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(2 + servers),
           "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "fieldkube.trainer.ps_train",
           "--workers", "2", "--servers", str(servers), "--mode", "sync", "--data", str(field_dataset),
           *SCHEDULE, "--set", f"output_dir={tmp_path}", *fast_args]  # fmt: skip
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = _weights(tmp_path)
    torch.manual_seed(0)
    initial = build_model("counter-mcnn").state_dict()
    assert weights.keys() == allreduce_weights.keys() == initial.keys()
    assert max(float((weights[k] - initial[k]).abs().max()) for k in initial) > 1e-5  # training moved them
    for name, reference in allreduce_weights.items():
        torch.testing.assert_close(weights[name], reference, rtol=1e-5, atol=1e-6, msg=name)
    trained = json.loads((tmp_path / "summary.json").read_text())["trained"]
    assert trained["backend"] == "ps-sync" and trained["servers"] == servers
    assert trained["server_updates"] == [trained["steps"]] * servers  # one update per step on every shard
    assert trained["staleness_max"] == 0


def test_async_run_reports_staleness_within_its_bound(field_dataset: Path, tmp_path: Path, env) -> None:
    out = tmp_path / "scale"
    cmd = [str(BIN / "fieldkube-scale"), "--data", str(field_dataset), "--workers", "2",
           "--strategy", "ps-async", "--staleness", "1", "--steps", "5", "--batch", "2",
           "--out", str(out), "--set", "data.loader_workers=0"]  # fmt: skip
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads((out / "scale.json").read_text())["runs"]
    assert (row["strategy"], row["workers"], row["servers"]) == ("ps-async", 2, 1)
    assert row["images_per_second"] > 0
    assert row["efficiency_with_servers"] == pytest.approx(row["speedup"] / 3, abs=2e-3)
    assert row["staleness_bound"] == 1 and 0 <= row["staleness_mean"] <= row["staleness_max"] <= 1
    assert len(row["loss_curves"][0]) == 5  # 5 global batches: 2 workers x 5 steps, 2 at a time
    assert row["time_to_target_seconds"] is not None and row["time_to_target_seconds"] > 0
    assert row["final_loss"] > 0 and row["test_loss"] > 0 and row["test_mae"] >= 0
    assert (out / "scale.png").read_bytes()[:4] == b"\x89PNG"
    assert "staleness mean" in proc.stdout


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--strategy", "ps-sync", "--ps", "0"], "--ps 0: expected >= 1 parameter server"),
        (["--strategy", "ps-async", "--staleness", "-1"], "--staleness -1: expected >= 0 versions"),
        (
            ["--strategy", "allreduce", "--staleness", "2"],
            "--staleness 2: applies to --strategy ps-async only",
        ),
        (
            ["--strategy", "ps-sync", "--launcher", "ddp"],
            "--launcher ddp: applies to --strategy allreduce only (ps runs use torchrun)",
        ),
        (
            ["--strategy", "ps-sink"],
            "--strategy 'ps-sink': expected one or more of allreduce, ps-sync, ps-async, comma-separated",
        ),
    ],
)
def test_flags_that_do_not_fit_give_one_line(
    flags: list[str], message: str, field_dataset: Path, tmp_path: Path, env
) -> None:
    cmd = [str(BIN / "fieldkube-scale"), "--data", str(field_dataset), "--out", str(tmp_path), *flags]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"fieldkube-scale: error: {message}"]
