"""A run killed with SIGKILL mid-epoch restarts from its last checkpoint and ends with exactly the weights
of an uninterrupted run; while it runs, its Prometheus endpoint serves the training metrics."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

import torch
from safetensors.torch import load_file

from fieldkube.trainer.checkpoint import list_checkpoints

BIN = Path(sys.executable).parent


def _cmd(data: Path, out: Path, port: int, fast_args: list[str]) -> list[str]:
    return [
        str(BIN / "fieldkube-train"), "--data", str(data), "--set", "train.epochs=4",
        "--set", f"output_dir={out}", "--set", f"checkpoint.dir={out / 'ckpt'}",
        "--set", "checkpoint.every_steps=2", "--set", "checkpoint.keep=3",
        *fast_args, "--set", f"metrics.port={port}", "--set", "metrics.address=127.0.0.1",
    ]  # fmt: skip


def test_killed_run_resumes_to_the_same_final_weights(
    field_dataset: Path, tmp_path: Path, env, fast_args: list[str], port: int
) -> None:
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    proc = subprocess.run(_cmd(field_dataset, reference, port, fast_args), env=env(), capture_output=True,
                          text=True, timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]

    # Kill the second run right after its step-8 checkpoint (mid epoch 2 of 4: 6 steps per epoch).
    victim = subprocess.Popen(_cmd(field_dataset, resumed, port, fast_args), env=env(), text=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    assert victim.stderr is not None
    scraped = ""
    for line in victim.stderr:
        if "checkpoint saved" in line and line.rstrip().endswith("ckpt-000000008.pt"):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                scraped = response.read().decode()
            victim.kill()
            break
    victim.wait(timeout=60)
    assert victim.returncode == -9, "the run finished before it could be killed"
    assert not (resumed / "model").exists()
    assert list_checkpoints(resumed / "ckpt")[-1].name >= "ckpt-000000008.pt"

    for metric in (
        'fieldkube_train_samples_total{rank="0",trainingjob="fieldkube"}',
        "fieldkube_train_step_duration_seconds_bucket",
        "fieldkube_train_loader_wait_seconds_count",
        "fieldkube_train_images_per_second",
        "fieldkube_train_loss",
        'fieldkube_train_epoch{rank="0",trainingjob="fieldkube"} 1.0',
    ):
        assert metric in scraped, metric

    restarted = subprocess.run(_cmd(field_dataset, resumed, port, fast_args), env=env(), capture_output=True,
                               text=True, timeout=300, check=False)  # fmt: skip
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "resuming from" in restarted.stderr
    assert "resumed at step" in restarted.stderr
    expected = load_file(str(reference / "model" / "model.safetensors"))
    actual = load_file(str(resumed / "model" / "model.safetensors"))
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=0, msg=name)
