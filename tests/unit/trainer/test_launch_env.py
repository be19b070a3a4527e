"""Rank, local rank and world size come from whichever launcher started the process."""

from __future__ import annotations

import pytest

from fieldkube.trainer.backends import resolve_backend_name
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
