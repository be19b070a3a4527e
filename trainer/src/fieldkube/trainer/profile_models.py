"""Models the profiler studies beside fieldkube's own: seed 001's VGG-11, so its figures can be set
against the thesis on the same network.

VGG-11 is configuration "A" of Simonyan & Zisserman (2015): eight 3x3 convolutions (64, M, 128, M, 256,
256, M, 512, 512, M, 512, 512, M; M = 2x2 max-pool) with ReLU, an adaptive average pool to 7x7, then
three fully connected layers with dropout. Seed 001 trained it on 10 ImageNet classes, hence 10 outputs.
`width` scales every channel count and `hidden` the fully connected width, so a test can run the same
structure (same layers, same functional `flatten` between them) in milliseconds; torchvision is not a
dependency of the trainer, and the network is a dozen lines.
"""

from __future__ import annotations

import torch
from torch import nn

VGG11_CHANNELS: tuple[int | None, ...] = (64, None, 128, None, 256, 256, None, 512, 512, None, 512, 512, None)


class VGG11(nn.Module):
    """(B, 3, H, W) -> (B, num_classes) logits."""

    def __init__(self, num_classes: int = 10, width: float = 1.0, hidden: int = 4096, dropout: float = 0.5):
        super().__init__()
        if not 0 < width <= 4:
            raise ValueError(f"width {width}: expected 0 < width <= 4")
        if num_classes < 1 or hidden < 1:
            raise ValueError(f"num_classes {num_classes}, hidden {hidden}: expected >= 1")
        layers: list[nn.Module] = []
        channels = 3
        for spec in VGG11_CHANNELS:
            if spec is None:
                layers.append(nn.MaxPool2d(2, 2))
            else:
                out = max(1, round(spec * width))
                layers += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU(inplace=True)]
                channels = out
        self.num_classes = num_classes
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(channels * 49, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


PROFILE_MODELS = {"vgg11": VGG11}
