"""VGG-16 with BatchNorm for 32x32 inputs, and the conv + BN (+ activation) unit the newer models share.

The CIFAR form used by the grafting paper's VGG16 experiments: 13 conv3x3 layers (with bias, as in the
original VGG) each followed by BN and ReLU, five max-pools that take 32x32 down to 1x1, and a single linear
layer 512 -> num_classes; 14,728,266 parameters for 10 classes (no 4096-wide ImageNet classifier).
``width`` (64) scales every layer, for narrow copies that run quickly on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hpcgraft.models.registry import register_model

VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def conv_bn(in_planes: int, planes: int, kernel: int, stride: int = 1, *, groups: int = 1, bias: bool = False,
            act: Callable[..., nn.Module] | None = nn.ReLU) -> nn.Sequential:
    """Conv, BN, optional activation, registered in that order so that grafting pairs the BN with its conv."""
    layers = [nn.Conv2d(in_planes, planes, kernel, stride, (kernel - 1) // 2, groups=groups, bias=bias),
              nn.BatchNorm2d(planes)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


def kaiming_init(model: nn.Module) -> nn.Module:
    """He-normal weights for every conv and linear layer, as the CIFAR ResNets are initialised."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
    return model


INITS = ("kaiming", "pytorch")


def initialise(model: nn.Module, init: str) -> nn.Module:
    """``kaiming``: He-normal conv and linear weights (hpcgraft's default for every model); ``pytorch``:
    the layers' own defaults, which is what the authors' VGG and MobileNetV2 train from (row 8 of the
    differences in docs/method.md): reproducing their numbers needs their starting point."""
    if init not in INITS:
        raise ValueError(f"model.init={init!r} is not allowed; use one of: {', '.join(INITS)}")
    return kaiming_init(model) if init == "kaiming" else model


class VGG(nn.Module):
    def __init__(self, cfg: tuple[int | str, ...] = VGG16, num_classes: int = 10, in_channels: int = 3,
                 width: int = 64, init: str = "kaiming") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                planes = int(v) * width // 64
                layers.append(conv_bn(in_channels, planes, 3, bias=True))
                in_channels = planes
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(in_channels, num_classes)
        initialise(self, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # At 32x32 the features are already 1x1; pooling lets larger inputs through too.
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


@register_model("vgg16_bn")
def vgg16_bn(num_classes: int = 10, **kwargs: object) -> nn.Module:
    return VGG(VGG16, num_classes, **kwargs)  # type: ignore[arg-type]
