"""The seed-004 building segmenter: a U-Net with configurable width and depth.

Paper: O. Ronneberger, P. Fischer, T. Brox, "U-Net: Convolutional Networks for Biomedical Image
Segmentation", MICCAI 2015; configured as in N. Nguyen, "Segmentation of aerial imagery with a distributed
deep-learning pipeline" (2019): 5 levels of 64-128-256-512-1024 channels, two 3x3 same-padded conv + ReLU
per level, 2x2 max-pool, dropout 0.5 after level 4 and after the bottleneck, decoder steps of x2
upsampling + 2x2 conv halving the channels, concatenation with the skip, and a 1x1 head.

Shapes: (B, 3, H, W) float -> (B, 1, H, W) logits (apply sigmoid outside, e.g. BCEWithLogitsLoss).
`base_channels` is the width of level 1 (64 = seed) and `depth` the number of levels including the
bottleneck (5 = seed). Any H, W is accepted: padded to a multiple of 2**(depth-1), cropped back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fieldkube.vision.models.padding import crop_to, pad_to_multiple


class DoubleConv(nn.Sequential):
    """Two 3x3 same-padded conv + ReLU. Shapes: (B, in, H, W) -> (B, out, H, W)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1),
            nn.ReLU(inplace=True),
        )


class UpConv(nn.Module):
    """Nearest x2 upsampling then a 2x2 'same' conv halving channels. (B, C, H, W) -> (B, C/2, 2H, 2W)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size=2)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.interpolate(x, scale_factor=2.0, mode="nearest")
        # An even kernel has no centred padding: pad one pixel at the bottom/right to keep the size.
        y = F.pad(y, (0, 1, 0, 1))
        out: torch.Tensor = self.act(self.conv(y))
        return out


class UNet(nn.Module):
    """U-Net segmenter. Shapes: (B, 3, H, W) -> (B, 1, H, W) logits."""

    def __init__(
        self, in_channels: int = 3, base_channels: int = 64, depth: int = 5, dropout: float = 0.5
    ) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"segmenter-unet: depth must be >= 2 (levels incl. bottleneck), got {depth}")
        if base_channels < 1:
            raise ValueError(f"segmenter-unet: base_channels must be >= 1, got {base_channels}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"segmenter-unet: dropout must be in [0, 1), got {dropout}")
        self.depth = depth
        widths = [base_channels * 2**level for level in range(depth)]
        self.down = nn.ModuleList()
        in_ch = in_channels
        for width in widths[:-1]:
            self.down.append(DoubleConv(in_ch, width))
            in_ch = width
        self.bottleneck = DoubleConv(widths[-2], widths[-1])
        # Seed: dropout after the deepest encoder level (level 4 of 5) and after the bottleneck.
        self.drop_encoder = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.drop_bottleneck = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.ModuleList()
        self.decode = nn.ModuleList()
        for level in range(depth - 1, 0, -1):
            self.up.append(UpConv(widths[level], widths[level - 1]))
            self.decode.append(DoubleConv(2 * widths[level - 1], widths[level - 1]))
        self.head = nn.Conv2d(widths[0], 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        y = pad_to_multiple(x, 2 ** (self.depth - 1))
        skips: list[torch.Tensor] = []
        for index, block in enumerate(self.down):
            y = block(y)
            if index == len(self.down) - 1:
                y = self.drop_encoder(y)
            skips.append(y)
            y = F.max_pool2d(y, 2)
        y = self.drop_bottleneck(self.bottleneck(y))
        for up, decode, skip in zip(self.up, self.decode, reversed(skips), strict=True):
            y = decode(torch.cat([skip, up(y)], dim=1))
        return crop_to(self.head(y), height, width)
