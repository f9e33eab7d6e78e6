"""ResNet-18/34/50 for 224x224 inputs (He et al. 2016), the grafting paper's ImageNet models.

Stem conv 7x7 stride 2 + BN + ReLU + max-pool, four stages of 64..512 planes (``width`` = 64 scales them,
for narrow copies that run quickly on a CPU), global average pool and a linear layer. Where a block changes
shape its shortcut is a 1x1 conv + BN (option B). The bottleneck puts its stride on the 3x3 conv (the
common "v1.5" form; parameter counts are the same either way): 11,689,512 / 21,797,672 / 25,557,032
parameters for 1000 classes.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from hpcgraft.models import cifar_resnet
from hpcgraft.models.registry import register_model
from hpcgraft.models.vgg import conv_bn, kaiming_init


def projection(in_planes: int, planes: int, stride: int) -> nn.Module:
    """Option B shortcut: 1x1 conv + BN where the shape changes, identity elsewhere."""
    if stride == 1 and in_planes == planes:
        return nn.Identity()
    return conv_bn(in_planes, planes, 1, stride, act=None)


class BasicBlock(cifar_resnet.BasicBlock):
    """The CIFAR basic block with a projection instead of a zero-padding shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__(in_planes, planes, stride)
        self.shortcut = projection(in_planes, planes, stride)  # keeps its place after bn2 in the state dict


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.body = nn.Sequential(conv_bn(in_planes, planes, 1), conv_bn(planes, planes, 3, stride),
                                  conv_bn(planes, out, 1, act=None))
        self.shortcut = projection(in_planes, out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class ImageNetResNet(nn.Module):
    def __init__(self, block: type[BasicBlock | Bottleneck], blocks: tuple[int, ...], num_classes: int = 1000,
                 in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(in_channels, width, 7, 2), nn.MaxPool2d(3, 2, 1))
        layers: list[nn.Module] = []
        in_planes = width
        for stage, (planes, n) in enumerate(zip((width, 2 * width, 4 * width, 8 * width), blocks, strict=True)):
            for i in range(n):
                layers.append(block(in_planes, planes, 2 if stage > 0 and i == 0 else 1))
                in_planes = planes * block.expansion
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(in_planes, num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


for _name, _block, _blocks in (("resnet18", BasicBlock, (2, 2, 2, 2)), ("resnet34", BasicBlock, (3, 4, 6, 3)),
                               ("resnet50", Bottleneck, (3, 4, 6, 3))):
    register_model(_name)(partial(ImageNetResNet, _block, _blocks))
