"""Rank, local rank and world size come from whichever launcher started the process; the backend follows."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch

from fieldkube.trainer.backends import create_backend, horovod_without_nccl_warning, resolve_backend_name
from fieldkube.trainer.launch_env import LaunchEnv, detect_launch_env


def test_no_launcher_is_a_single_process() -> None:
    assert detect_launch_env({}) == LaunchEnv("single", 0, 0, 1)


def test_horovodrun_environment() -> None:
    env = {"HOROVOD_RANK": "3", "HOROVOD_LOCAL_RANK": "1", "HOROVOD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "9"}
    assert detect_launch_env(env) == LaunchEnv("horovod", 3, 1, 4)


def test_torchrun_environment() -> None:
    env = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "x", "TORCHELASTIC_RUN_ID": "r"}
    assert detect_launch_env(env) == LaunchEnv("torchrun", 1, 1, 2)


def test_openmpi_environment_as_an_mpijob_launcher_provides() -> None:
    env = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_SIZE": "8"}
    placement = detect_launch_env(env)
    assert placement == LaunchEnv("openmpi", 2, 0, 8)
    assert not placement.is_chief


def test_garbage_values_name_the_variable() -> None:
    with pytest.raises(ValueError, match="HOROVOD_SIZE"):
        detect_launch_env({"HOROVOD_RANK": "0", "HOROVOD_LOCAL_RANK": "0", "HOROVOD_SIZE": "two"})


@pytest.mark.parametrize(
    ("launcher", "backend"),
    [("horovod", "horovod"), ("openmpi", "horovod"), ("torchrun", "ddp"), ("single", "single")],
)
def test_auto_backend_follows_the_launcher(launcher: str, backend: str) -> None:
    assert resolve_backend_name("auto", LaunchEnv(launcher, 0, 0, 1)) == backend  # type: ignore[arg-type]
    assert resolve_backend_name("ddp", LaunchEnv(launcher, 0, 0, 1)) == "ddp"


def _fake_horovod(monkeypatch: pytest.MonkeyPatch, rank: int, nccl: bool) -> None:
    """horovod.torch as HorovodBackend uses it at start-up, without starting Horovod."""
    fake = types.ModuleType("horovod.torch")
    fake.init = lambda: None  # type: ignore[attr-defined]
    fake.rank = lambda: rank  # type: ignore[attr-defined]
    fake.local_rank = lambda: rank  # type: ignore[attr-defined]
    fake.size = lambda: 2  # type: ignore[attr-defined]
    fake.nccl_built = lambda: int(nccl)  # type: ignore[attr-defined]  # Horovod returns an int
    monkeypatch.setitem(sys.modules, "horovod", types.ModuleType("horovod"))
    monkeypatch.setitem(sys.modules, "horovod.torch", fake)


def test_horovod_without_nccl_on_a_gpu_is_named_and_ddp_suggested() -> None:
    warning = horovod_without_nccl_warning(torch.device("cuda", 0), nccl_built=False)
    assert warning is not None and "\n" not in warning
    assert "without NCCL" in warning and "CPU" in warning and "runtime.backend: ddp" in warning
    assert horovod_without_nccl_warning(torch.device("cuda", 0), nccl_built=True) is None
    assert horovod_without_nccl_warning(torch.device("cpu"), nccl_built=False) is None


@pytest.mark.parametrize(
    ("rank", "device", "nccl", "warned"),
    [
        (0, "cuda", False, 1),
        (1, "cuda", False, 0),
        (0, "cuda", True, 0),
        (0, "cpu", False, 0),
    ],
)
def test_horovod_backend_logs_the_nccl_warning_once_on_rank_0(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    rank: int,
    device: str,
    nccl: bool,
    warned: int,
) -> None:
    _fake_horovod(monkeypatch, rank, nccl)
    with caplog.at_level(logging.WARNING, logger="fieldkube.backends"):
        backend = create_backend("horovod", LaunchEnv("openmpi", rank, rank, 2), torch.device(device))
    assert backend.name == "horovod" and backend.rank == rank
    assert len([r for r in caplog.records if "without NCCL" in r.getMessage()]) == warned
