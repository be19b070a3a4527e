"""One optimisation step of a data-parallel rank: forward under the run's precision, loss, backward
(scaled for fp16), the backend's gradient exchange and optimizer step, then the lr schedule."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fieldkube.trainer.backends import AnyBackend
from fieldkube.trainer.errors import DataError
from fieldkube.trainer.losses import LossFn
from fieldkube.trainer.precision import PrecisionPlan


@dataclass
class TrainStep:
    model: Callable[[torch.Tensor], torch.Tensor]  # the module, or its torch.compile'd form
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: LossFn
    backend: AnyBackend
    precision: PrecisionPlan
    scaler: torch.amp.GradScaler | None
    lr: float  # train.lr, named in the error a diverging loss raises

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor, global_step: int) -> float:
        """Train on one batch; returns this rank's loss. A non-finite loss is a DataError, not a NaN model."""
        self.optimizer.zero_grad()
        with torch.autocast(
            inputs.device.type, dtype=self.precision.autocast_dtype, enabled=self.precision.autocast
        ):
            output = self.model(inputs)
        loss = self.loss_fn(output.float(), targets)
        value = float(loss.detach())
        if not torch.isfinite(loss):
            raise DataError(f"loss became {value} at step {global_step} (train.lr {self.lr} too high?)")
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        self.backend.optimizer_step(self.optimizer, self.scaler)
        self.scheduler.step()
        return value
