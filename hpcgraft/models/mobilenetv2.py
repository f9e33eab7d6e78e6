"""MobileNetV2 (Sandler et al. 2018) for 32x32 inputs, and the grafting paper's own variant of it.

``mobilenetv2``: the usual CIFAR adaptation: the stem conv and the first stride-2 stage (24 channels) use
stride 1, so the last feature map is 4x4 instead of 1x1. Otherwise the paper's network: inverted residual
blocks (1x1 expansion, depthwise 3x3, linear 1x1 projection; no expansion conv when the factor is 1),
identity residuals only where shape is kept, ReLU6, a 1280-wide last 1x1 conv. 2,236,682 parameters for
10 classes.

``mobilenetv2_ref``: the network the grafting paper's MobileNetV2 numbers were measured on (the CIFAR
model of the authors' public code, itself from a widely used CIFAR collection). Same stages and strides,
but plain ReLU, an expansion conv in every block (also where the factor is 1), and a 1x1 conv + BN
shortcut on stride-1 blocks that change the channel count, so every stride-1 block is residual.
2,296,922 parameters for 10 classes and 17,544 conv filters; the paper's invalid-filter counts are out
of 17,088, which is this network without the 456 filters of its four shortcut convs (the reference code
counted only layers named "conv"). Use this variant to compare against the published figures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hpcgraft.models.registry import register_model
from hpcgraft.models.vgg import conv_bn, initialise

# (expansion, out channels, blocks, stride of the first block); stride 2 -> 1 in the 24-channel stage for CIFAR
CIFAR_CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
             (6, 320, 1, 1))


class InvertedResidual(nn.Module):
    def __init__(self, in_planes: int, planes: int, expansion: int, stride: int, reference: bool = False) -> None:
        super().__init__()
        act = nn.ReLU if reference else nn.ReLU6
        hidden = in_planes * expansion
        expand = [conv_bn(in_planes, hidden, 1, act=act)] if expansion != 1 or reference else []
        self.body = nn.Sequential(
            *expand,
            conv_bn(hidden, hidden, 3, stride, groups=hidden, act=act),
            conv_bn(hidden, planes, 1, act=None),
        )
        self.shortcut: nn.Module = nn.Identity()
        if reference and stride == 1 and in_planes != planes:
            self.shortcut = conv_bn(in_planes, planes, 1, act=None)
        self.residual = stride == 1 and (in_planes == planes or reference)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return out + self.shortcut(x) if self.residual else out


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, last_channels: int = 1280,
                 reference: bool = False, init: str = "kaiming") -> None:
        super().__init__()
        act = nn.ReLU if reference else nn.ReLU6
        layers: list[nn.Module] = [conv_bn(in_channels, 32, 3, act=act)]
        in_planes = 32
        for expansion, planes, blocks, stride in CIFAR_CFG:
            for i in range(blocks):
                layers.append(InvertedResidual(in_planes, planes, expansion, stride if i == 0 else 1, reference))
                in_planes = planes
        layers.append(conv_bn(in_planes, last_channels, 1, act=act))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(last_channels, num_classes)
        initialise(self, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


@register_model("mobilenetv2")
def mobilenetv2(num_classes: int = 10, **kwargs: object) -> nn.Module:
    return MobileNetV2(num_classes, **kwargs)  # type: ignore[arg-type]


@register_model("mobilenetv2_ref")
def mobilenetv2_ref(num_classes: int = 10, **kwargs: object) -> nn.Module:
    return MobileNetV2(num_classes, reference=True, **kwargs)  # type: ignore[arg-type]
