"""Who am I in the job: rank, local rank and world size from Horovod, torchrun or OpenMPI's environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Launcher = Literal["single", "horovod", "torchrun", "openmpi"]


@dataclass(frozen=True)
class LaunchEnv:
    """Process placement as the launcher announced it (before any backend is initialised)."""

    launcher: Launcher
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_chief(self) -> bool:
        return self.rank == 0


def _int(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r}: expected an integer") from None


def detect_launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read placement from the environment; order: horovodrun (gloo), torchrun, OpenMPI (mpirun/MPIJob)."""
    env = os.environ if env is None else env
    if "HOROVOD_RANK" in env:
        return LaunchEnv(
            "horovod", _int(env, "HOROVOD_RANK"), _int(env, "HOROVOD_LOCAL_RANK"), _int(env, "HOROVOD_SIZE")
        )
    if "TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "WORLD_SIZE" in env and "MASTER_ADDR" in env):
        return LaunchEnv(
            "torchrun", _int(env, "RANK"), int(env.get("LOCAL_RANK", "0")), _int(env, "WORLD_SIZE")
        )
    if "OMPI_COMM_WORLD_RANK" in env:
        return LaunchEnv(
            "openmpi",
            _int(env, "OMPI_COMM_WORLD_RANK"),
            _int(env, "OMPI_COMM_WORLD_LOCAL_RANK"),
            _int(env, "OMPI_COMM_WORLD_SIZE"),
        )
    return LaunchEnv("single", 0, 0, 1)
