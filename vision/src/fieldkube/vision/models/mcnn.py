"""The seed-000 flower counter: a modified multi-column CNN (MCNN) that outputs a full-size density map.

Paper: Y. Zhang, D. Zhou, S. Chen, S. Gao, Y. Ma, "Single-Image Crowd Counting via Multi-Column
Convolutional Neural Network", CVPR 2016; modified as in S. Chowdhury, "Scaling a convolutional neural
network based flower counting application in a distributed GPU cluster" (2019): each column is
conv-pool-conv-pool-conv-conv followed by two stride-2 transposed convolutions that restore the input
resolution; the three column outputs (16 + 20 + 24 = 60 channels) are fused by a 1x1 convolution.

Shapes: (B, 3, H, W) float -> (B, 1, H, W) density map; the count is the sum of the map. Any H, W is
accepted: the input is zero-padded at the bottom/right to a multiple of 4 and the output cropped back.
`head` is the activation after the 1x1 fusion (`linear`, `relu`, `softplus`; see `heads`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fieldkube.vision.models.heads import DEFAULT_DENSITY_HEAD, density_activation, init_head_bias
from fieldkube.vision.models.padding import crop_to, pad_to_multiple


@dataclass(frozen=True)
class ColumnSpec:
    """Kernel size and channel widths of one column, as in the seed table (conv1..conv4, deconv2)."""

    kernel: int
    conv1: int
    conv2: int
    conv3: int
    conv4: int
    deconv2: int


# Seed 000, Table 3.1: columns with 9/7/5, 7/5/3 kernels and the channel widths below. conv1 uses the
# larger kernel of each column (9x9, 7x7, 5x5); every later layer uses the column's second kernel size.
SEED_COLUMNS: tuple[tuple[int, ColumnSpec], ...] = (
    (9, ColumnSpec(kernel=7, conv1=16, conv2=32, conv3=16, conv4=8, deconv2=16)),
    (7, ColumnSpec(kernel=5, conv1=20, conv2=40, conv3=20, conv4=10, deconv2=20)),
    (5, ColumnSpec(kernel=3, conv1=24, conv2=48, conv3=24, conv4=12, deconv2=24)),
)


def _conv(in_ch: int, out_ch: int, kernel: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2), nn.ReLU(inplace=True))


def _deconv(in_ch: int, out_ch: int, kernel: int) -> nn.Module:
    # Stride-2 transposed conv that exactly doubles H and W for odd kernels: (n-1)*2 - 2p + k + 1 = 2n.
    layer = nn.ConvTranspose2d(in_ch, out_ch, kernel, stride=2, padding=kernel // 2, output_padding=1)
    return nn.Sequential(layer, nn.ReLU(inplace=True))


class MCNNColumn(nn.Module):
    """One column: conv1 - pool - conv2 - pool - conv3 - conv4 - deconv1 (x2) - deconv2 (x2).

    Shapes: (B, 3, H, W) with H, W multiples of 4 -> (B, spec.deconv2, H, W).
    """

    def __init__(self, in_channels: int, first_kernel: int, spec: ColumnSpec, width: float = 1.0) -> None:
        super().__init__()

        def ch(n: int) -> int:
            return max(1, round(n * width))

        k = spec.kernel
        self.out_channels = ch(spec.deconv2)
        self.body = nn.Sequential(
            _conv(in_channels, ch(spec.conv1), first_kernel),
            nn.MaxPool2d(2),
            _conv(ch(spec.conv1), ch(spec.conv2), k),
            nn.MaxPool2d(2),
            _conv(ch(spec.conv2), ch(spec.conv3), k),
            _conv(ch(spec.conv3), ch(spec.conv4), k),
            _deconv(ch(spec.conv4), ch(spec.conv4), k),
            _deconv(ch(spec.conv4), self.out_channels, k),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(x)
        return out


class MCNN(nn.Module):
    """Modified MCNN density regressor (seed 000). `width` scales every column's channel count (1.0 = seed).

    Shapes: (B, 3, H, W) -> (B, 1, H, W); counts are the sum of the map. `head` is the activation after
    the fusion; the default `eval-clamp` trains linear, as in the seed, so that training starts with a
    gradient everywhere, and counts with max(0, x).
    """

    def __init__(self, in_channels: int = 3, width: float = 1.0, head: str = DEFAULT_DENSITY_HEAD) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"counter-mcnn: width must be > 0, got {width}")
        activation = density_activation("counter-mcnn", head)
        columns = [MCNNColumn(in_channels, first_kernel, spec, width) for first_kernel, spec in SEED_COLUMNS]
        self.columns = nn.ModuleList(columns)
        self.fuse = nn.Conv2d(sum(column.out_channels for column in columns), 1, kernel_size=1)
        init_head_bias(self.fuse, head)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        padded = pad_to_multiple(x, 4)
        features = torch.cat([column(padded) for column in self.columns], dim=1)
        return crop_to(self.activation(self.fuse(features)), height, width)
