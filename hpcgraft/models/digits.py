"""A small residual CNN sized for the 8x8 UCI digits: the demo's and the tests' model.

Two stages (16 and 32 channels) of the CIFAR basic block; about 30k parameters, so that a CPU epoch
takes well under a second and grafting still sees conv layers, BatchNorms and a linear head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hpcgraft.models.cifar_resnet import BasicBlock
from hpcgraft.models.registry import register_model


class DigitsResNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layers = nn.Sequential(
            BasicBlock(width, width), BasicBlock(width, 2 * width, stride=2), BasicBlock(2 * width, 2 * width)
        )
        self.fc = nn.Linear(2 * width, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


@register_model("digits_resnet")
def digits_resnet(num_classes: int = 10, **kwargs: object) -> nn.Module:
    return DigitsResNet(num_classes, **kwargs)  # type: ignore[arg-type]
