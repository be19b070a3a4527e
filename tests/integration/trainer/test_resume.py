"""A run killed with SIGKILL mid-epoch restarts from its last checkpoint and ends with exactly the weights
of an uninterrupted run; while it runs, its Prometheus endpoint serves the training metrics.

Run as one process and as two Horovod ranks under mpirun (as the MPIJob's launcher starts them): rank 0
alone reads the checkpoint and broadcasts it, which once hung because the ranks named that collective
differently."""

from __future__ import annotations

import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from fieldkube.trainer.checkpoint import list_checkpoints

BIN = Path(sys.executable).parent


def _mpirun() -> list[str]:
    """Two ranks on this host with the MPI controller, as the MPIJob's launcher runs them."""
    mpirun = shutil.which("mpirun") or "mpirun"
    return [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2", "--bind-to", "none",
            "-x", "PATH", "-x", "OMP_NUM_THREADS", "--mca", "btl_tcp_if_include", "lo",
            "--mca", "oob_tcp_if_include", "lo"]  # fmt: skip


LAUNCH = {"single": list[str](), "horovod-2-ranks": _mpirun()}


def _cmd(launch: str, data: Path, out: Path, port: int, fast_args: list[str]) -> list[str]:
    backend = ["--set", "runtime.backend=horovod"] if LAUNCH[launch] else []
    return [
        *LAUNCH[launch], str(BIN / "fieldkube-train"), *backend,
        "--data", str(data), "--set", "train.epochs=4",
        "--set", f"output_dir={out}", "--set", f"checkpoint.dir={out / 'ckpt'}",
        "--set", "checkpoint.every_steps=2", "--set", "checkpoint.keep=3",
        *fast_args, "--set", f"metrics.port={port}", "--set", "metrics.address=127.0.0.1",
    ]  # fmt: skip


def _kill_ranks(out: Path) -> None:
    """SIGKILL every training process writing to ``out`` (not the launcher: it sees its ranks die)."""
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if any(str(out) in arg for arg in cmdline) and not Path(cmdline[0]).name.startswith("mpirun"):
            proc.kill()


@pytest.mark.parametrize("launch", sorted(LAUNCH))
def test_killed_run_resumes_to_the_same_final_weights(
    launch: str, field_dataset: Path, tmp_path: Path, env, fast_args: list[str], port: int
) -> None:
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    proc = subprocess.run(_cmd(launch, field_dataset, reference, port, fast_args), env=env(),
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]

    # Kill the second run right after its step-8 checkpoint (mid epoch 2 of 4: 6 steps per epoch).
    victim = subprocess.Popen(_cmd(launch, field_dataset, resumed, port, fast_args), env=env(), text=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    assert victim.stderr is not None
    scraped = ""
    for line in victim.stderr:
        if "checkpoint saved" in line and line.rstrip().endswith("ckpt-000000008.pt"):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                scraped = response.read().decode()
            _kill_ranks(resumed)
            break
    victim.communicate(timeout=60)  # drains what the launcher prints as its ranks die
    assert victim.returncode != 0, "the run finished before it could be killed"
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

    newest = list_checkpoints(resumed / "ckpt")[-1]
    newest_step = int(newest.stem.removeprefix("ckpt-"))
    restarted = subprocess.run(_cmd(launch, field_dataset, resumed, port, fast_args), env=env(),
                               capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert f"resuming from {newest} (step {newest_step})" in restarted.stderr, restarted.stderr[-3000:]
    assert "resumed at step" in restarted.stderr
    expected = load_file(str(reference / "model" / "model.safetensors"))
    actual = load_file(str(resumed / "model" / "model.safetensors"))
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=0, msg=name)
