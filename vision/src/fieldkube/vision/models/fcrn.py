"""A stronger density regressor for counting: the FCRN-A fully convolutional regression network.

Paper: W. Xie, J. A. Noble, A. Zisserman, "Microscopy Cell Counting with Fully Convolutional Regression
Networks", MICCAI workshop 2015 / Computer Methods in Biomechanics and Biomedical Engineering 2018.
FCRN-A: three 3x3 conv + 2x2 max-pool stages (32, 64, 128 channels), a wide 3x3 conv (512) at 1/8
resolution, then three stages of bilinear x2 upsampling + 3x3 conv (128, 64, 32) and a 1x1 head.

Shapes: (B, 3, H, W) float -> (B, 1, H, W) density map. Any H, W is accepted (padded to a multiple of 8
and cropped back). `base_channels` scales every width (32 = paper); `batch_norm` adds BatchNorm after
each conv (off by default so that multi-worker runs reproduce single-worker weights exactly). `head`
is the activation after the 1x1 head (`linear`, `relu`, `softplus`; see `heads`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fieldkube.vision.models.heads import DEFAULT_DENSITY_HEAD, density_activation, init_head_bias
from fieldkube.vision.models.padding import crop_to, pad_to_multiple


def _conv_block(in_ch: int, out_ch: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_ch))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class FCRN(nn.Module):
    """FCRN-A density regressor. Shapes: (B, 3, H, W) -> (B, 1, H, W)."""

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 32,
        batch_norm: bool = False,
        head: str = DEFAULT_DENSITY_HEAD,
    ) -> None:
        super().__init__()
        if base_channels < 1:
            raise ValueError(f"counter-fcrn: base_channels must be >= 1, got {base_channels}")
        activation = density_activation("counter-fcrn", head)
        c = base_channels
        self.encoder = nn.ModuleList(
            [
                _conv_block(in_channels, c, batch_norm),
                _conv_block(c, 2 * c, batch_norm),
                _conv_block(2 * c, 4 * c, batch_norm),
            ]
        )
        self.middle = _conv_block(4 * c, 16 * c, batch_norm)
        self.decoder = nn.ModuleList(
            [
                _conv_block(16 * c, 4 * c, batch_norm),
                _conv_block(4 * c, 2 * c, batch_norm),
                _conv_block(2 * c, c, batch_norm),
            ]
        )
        self.head = nn.Conv2d(c, 1, kernel_size=1)
        init_head_bias(self.head, head)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        y = pad_to_multiple(x, 8)
        for block in self.encoder:
            y = F.max_pool2d(block(y), 2)
        y = self.middle(y)
        for block in self.decoder:
            y = block(F.interpolate(y, scale_factor=2.0, mode="bilinear", align_corners=False))
        return crop_to(self.activation(self.head(y)), height, width)
