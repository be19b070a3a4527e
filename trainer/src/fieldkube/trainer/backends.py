"""Data-parallel backends behind one small interface: single process, Horovod, or torch DDP."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from fieldkube.contract.config import Backend
from fieldkube.trainer.errors import ConfigError
from fieldkube.trainer.launch_env import LaunchEnv

log = logging.getLogger("fieldkube.backends")


class SingleBackend:
    """One process: no communication."""

    name = "single"

    def __init__(self, env: LaunchEnv) -> None:
        self.rank = 0
        self.local_rank = env.local_rank
        self.size = 1
        self.last_allreduce_s: float | None = None

    def wrap(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        return model, optimizer

    def broadcast_object(self, obj: Any) -> Any:
        return obj

    def allreduce_sum(self, values: list[float]) -> list[float]:
        return list(values)

    def broadcast_initial_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        return None

    @contextmanager
    def no_sync(self, model: nn.Module) -> Iterator[None]:
        yield

    def optimizer_step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()

    def average_gradients(self, params: list[nn.Parameter]) -> None:
        """Average `.grad` of `params` over ranks as one explicit, separately timed phase (the profiler's
        use; training overlaps it with backward instead)."""
        return None

    def barrier(self) -> None:
        return None

    def shutdown(self) -> None:
        return None


class HorovodBackend(SingleBackend):
    """Horovod ring-allreduce: DistributedOptimizer, broadcast of parameters and optimizer state."""

    name = "horovod"

    def __init__(self, env: LaunchEnv, device: torch.device) -> None:
        super().__init__(env)
        try:
            import horovod.torch as hvd
        except ImportError as exc:
            raise ConfigError(
                f"runtime.backend 'horovod': horovod.torch cannot be imported ({exc})"
            ) from None
        self.hvd = hvd
        hvd.init()
        self.rank = hvd.rank()
        self.local_rank = hvd.local_rank()
        self.size = hvd.size()
        warning = horovod_without_nccl_warning(device, bool(hvd.nccl_built()))
        if warning and self.rank == 0:
            log.warning(warning)

    def wrap(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        wrapped = self.hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
        return model, wrapped

    def broadcast_initial_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        # Horovod initialises an empty optimizer state with a zero-gradient step, which would advance
        # Adam's step counter; a fresh state is identical on every rank anyway, so only a resumed one is sent.
        if optimizer.state_dict()["state"]:
            self.hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    def broadcast_object(self, obj: Any) -> Any:
        # Horovod matches collectives by name and defaults this one's to the object's type, which
        # differs between the root (e.g. a checkpoint dict) and the others (None): name it explicitly.
        return self.hvd.broadcast_object(obj, root_rank=0, name="fieldkube.broadcast_object")

    def allreduce_sum(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64)
        reduced = self.hvd.allreduce(tensor, op=self.hvd.Sum, name="fieldkube.allreduce_sum")
        return [float(v) for v in reduced]

    def optimizer_step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
        # Synchronise explicitly so the allreduce time is measured apart from the update itself.
        start = time.perf_counter()
        optimizer.synchronize()  # type: ignore[attr-defined]
        self.last_allreduce_s = time.perf_counter() - start
        with optimizer.skip_synchronize():  # type: ignore[attr-defined]
            if scaler is not None:
                scaler.unscale_(optimizer)
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()

    def average_gradients(self, params: list[nn.Parameter]) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        handles = [
            self.hvd.allreduce_async_(g, op=self.hvd.Average, name=f"fieldkube.grad.{i}")
            for i, g in enumerate(grads)
        ]
        for handle in handles:
            self.hvd.synchronize(handle)

    def barrier(self) -> None:
        self.hvd.allreduce(torch.zeros(1), name="fieldkube.barrier")

    def shutdown(self) -> None:
        self.hvd.shutdown()


class DDPBackend(SingleBackend):
    """torch.distributed DistributedDataParallel: gloo on CPU, NCCL on CUDA."""

    name = "ddp"

    def __init__(self, env: LaunchEnv, device: torch.device) -> None:
        super().__init__(env)
        import torch.distributed as dist

        self.dist = dist
        if env.launcher == "openmpi":
            os.environ.setdefault("RANK", str(env.rank))
            os.environ.setdefault("WORLD_SIZE", str(env.world_size))
            os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
            if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
                raise ConfigError("runtime.backend 'ddp' under mpirun needs MASTER_ADDR and MASTER_PORT set")
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        self.rank = dist.get_rank()
        self.size = dist.get_world_size()
        self.device = device

    def wrap(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids), optimizer

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def allreduce_sum(self, values: list[float]) -> list[float]:
        device = self.device if self.device.type == "cuda" else torch.device("cpu")
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        self.dist.all_reduce(tensor, op=self.dist.ReduceOp.SUM)
        return [float(v) for v in tensor.cpu()]

    def average_gradients(self, params: list[nn.Parameter]) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.dist.all_reduce(flat, op=self.dist.ReduceOp.SUM)
        flat /= self.size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def barrier(self) -> None:
        self.dist.barrier()

    def shutdown(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


AnyBackend = SingleBackend | HorovodBackend | DDPBackend


def pin_device(wanted: str, local_rank: int, setting: str) -> torch.device:
    """One process per GPU: the CUDA device of this local rank when wanted and present, else the CPU.

    `setting` names where `wanted` came from (config field or flag), for the error when CUDA is absent.
    """
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting}: no CUDA device is available on this host")
    if wanted in ("cuda", "auto") and torch.cuda.is_available():
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def resolve_backend_name(requested: Backend, env: LaunchEnv) -> str:
    """`auto` follows the launcher: horovodrun/mpirun -> horovod, torchrun -> ddp, nothing -> single.

    The process cannot choose its launcher, so the choice between DDP and Horovod is the launcher's: the
    operator launches GPU jobs with torchrun (DDP over NCCL) and CPU jobs with mpirun ranks (Horovod over
    MPI/Gloo) when a TrainingJob says `auto` (`fieldkube.operator.mpijob_builder.backend_of`), and this
    function then agrees with it.
    """
    if requested != "auto":
        return requested
    return {"horovod": "horovod", "openmpi": "horovod", "torchrun": "ddp"}.get(env.launcher, "single")


def horovod_without_nccl_warning(device: torch.device, nccl_built: bool) -> str | None:
    """The warning rank 0 logs when Horovod runs on a GPU without NCCL (None when all is well).

    Such a Horovod (the trainer image's: it is built where there is no CUDA toolkit) reduces gradients in
    host memory over MPI/Gloo, not between the GPUs; DDP's NCCL does.
    """
    if device.type != "cuda" or nccl_built:
        return None
    return (
        "Horovod was built without NCCL: allreduce runs on the CPU, not between the GPUs; "
        "set runtime.backend: ddp (NCCL) for GPU training"
    )


def create_backend(requested: Backend, env: LaunchEnv, device: torch.device) -> AnyBackend:
    name = resolve_backend_name(requested, env)
    if name == "horovod":
        return HorovodBackend(env, device)
    if name == "ddp":
        if env.launcher == "single":
            raise ConfigError(
                "runtime.backend 'ddp': start the trainer with torchrun (or mpirun + MASTER_ADDR)"
            )
        return DDPBackend(env, device)
    if env.world_size > 1:
        raise ConfigError(
            f"runtime.backend 'single' but the launcher ({env.launcher}) started {env.world_size} processes"
        )
    return SingleBackend(env)
