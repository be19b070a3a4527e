"""Which precision a run trains in: what users of current GPUs expect without configuring anything.

bf16 autocast where the GPU has it (Ampere and later: same exponent range as fp32, so no loss scaling),
fp16 autocast with a GradScaler on older GPUs, fp32 on CPUs and when asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fieldkube.trainer.errors import ConfigError


@dataclass(frozen=True)
class PrecisionPlan:
    name: str  # bf16 | fp16 | fp32
    autocast_dtype: torch.dtype | None
    loss_scaling: bool

    @property
    def autocast(self) -> bool:
        return self.autocast_dtype is not None


FP32 = PrecisionPlan("fp32", None, False)
BF16 = PrecisionPlan("bf16", torch.bfloat16, False)
FP16 = PrecisionPlan("fp16", torch.float16, True)


def resolve_precision(requested: str, device_type: str, bf16_supported: bool) -> PrecisionPlan:
    """The plan for ``runtime.precision`` on a device; asking for bf16 where it is missing is an error."""
    if device_type != "cuda" or requested == "fp32":
        return FP32
    if requested == "fp16":
        return FP16
    if requested == "bf16" and not bf16_supported:
        raise ConfigError("runtime.precision bf16: this GPU has no bf16; use fp16 or auto")
    return BF16 if bf16_supported else FP16


def device_precision(requested: str, device: torch.device) -> PrecisionPlan:
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    return resolve_precision(requested, device.type, bf16)
