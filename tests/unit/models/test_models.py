"""The registry's architectures: published parameter counts, output shapes, and how grafting groups them."""

from __future__ import annotations

import copy
from functools import cache

import pytest
import torch
from torch import nn

from hpcgraft.method.grafting import graft_state, plan_layers
from hpcgraft.models import create_model, list_models

IMAGENET = ("resnet18", "resnet34", "resnet50")
CIFAR = ("resnet20", "resnet32", "resnet56", "resnet110", "mobilenetv2", "mobilenetv2_ref", "vgg16_bn")
NORMS = (nn.BatchNorm2d,)
LAYERS = (nn.Conv2d, nn.Linear)

# Exact counts for 10 (CIFAR) or 1000 (ImageNet) classes, and the rounded figures the papers quote.
PARAMS = {
    "resnet20": (269_722, "0.27M"),
    "resnet32": (464_154, "0.46M"),
    "resnet56": (853_018, "0.85M"),
    "resnet110": (1_727_962, "1.7M"),
    "mobilenetv2": (2_236_682, "2.24M"),  # 1280-wide last conv, single linear head
    "mobilenetv2_ref": (2_296_922, "2.30M"),  # the grafting paper's CIFAR MobileNetV2 (its authors' code)
    "vgg16_bn": (14_728_266, "14.7M"),  # conv layers with bias, single 512 -> 10 linear head
    "resnet18": (11_689_512, "11.7M"),
    "resnet34": (21_797_672, "21.8M"),
    "resnet50": (25_557_032, "25.6M"),
}



def classes(name: str) -> int:
    return 1000 if name in IMAGENET else 10


@cache
def model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, classes(name))


@cache
def small(name: str, seed: int) -> nn.Module:
    """What the grafting math runs on: VGG and the ImageNet ResNets at 1/4 width (same layers, same plan)."""
    torch.manual_seed(seed)
    return create_model(name, classes(name), **({"width": 16} if name in IMAGENET + ("vgg16_bn",) else {}))


def test_all_architectures_registered():
    assert set(IMAGENET + CIFAR) <= set(list_models())


@pytest.mark.parametrize("name", PARAMS)
def test_parameter_count(name):
    exact, quoted = PARAMS[name]
    n = sum(p.numel() for p in model(name).parameters())
    assert n == exact
    decimals = len(quoted.split(".")[1]) - 1
    assert f"{n / 1e6:.{decimals}f}M" == quoted


@pytest.mark.parametrize("name", CIFAR + IMAGENET)
def test_forward_shape(name):
    size = 64 if name in IMAGENET else 32  # the ImageNet nets are fully convolutional up to the pool
    net = model(name)
    net.train()
    out = net(torch.randn(2, 3, size, size))
    assert out.shape == (2, classes(name))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ("mobilenetv2", "mobilenetv2_ref", "vgg16_bn", "resnet18"))
def test_num_classes_and_channels(name):
    net = create_model(name, 7, in_channels=1)
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def expected_groups(net: nn.Module) -> list[tuple[str, ...]]:
    """Grafting groups read off the module tree: each conv/linear with the BN registered right after it."""
    groups: list[list[str]] = []
    prev: nn.Module | None = None
    for name, m in net.named_modules():
        keys = [f"{name}.{k}" for k, t in m.state_dict().items() if t.is_floating_point() and "." not in k]
        if isinstance(m, LAYERS):
            groups.append(keys)
        elif isinstance(m, NORMS):
            assert isinstance(prev, nn.Conv2d) and prev.out_channels == m.num_features, f"{name} follows no conv"
            groups[-1] += keys
        else:
            assert not keys, f"unexpected parameters in {name}"
            continue
        prev = m
    return [tuple(g) for g in groups]


@pytest.mark.parametrize("name", CIFAR + IMAGENET + ("digits_resnet",))
def test_plan_pairs_every_conv_with_its_bn(name):
    net = model(name)
    plan = plan_layers(net.state_dict())
    assert [g.members for g in plan] == expected_groups(net)
    assert len(plan) == sum(isinstance(m, LAYERS) for m in net.modules())
    state = net.state_dict()
    for g in plan:
        w = state[g.anchor]
        assert g.anchor.endswith("weight") and g.per_filter and g.filters == w.shape[0]
        if w.dim() == 4:  # conv + BN: weight, BN weight, bias, running mean and variance
            assert len(g.members) == 5 + (name == "vgg16_bn")
        else:  # linear head: weight and bias, no norm
            assert len(g.members) == 2 and g.anchor == "fc.weight"


def grouped_shapes(name: str) -> list[tuple[int, ...]]:
    state = model(name).state_dict()
    return [tuple(state[g.anchor].shape) for g in plan_layers(state) if len(g.members) > 2]


def test_special_convs_keep_their_bn():
    """Depthwise and 1x1 convs of MobileNetV2, projection shortcuts of the ResNets each carry a BN."""
    mobile = grouped_shapes("mobilenetv2")
    assert sum(s[1] == 1 and s[2:] == (3, 3) for s in mobile) == 17  # one depthwise conv per block
    assert sum(s[2:] == (1, 1) for s in mobile) == 16 + 17 + 1  # expansions, projections, last conv
    for name, shortcuts in (("resnet18", 3), ("resnet34", 3), ("resnet50", 4)):
        state = model(name).state_dict()
        groups = [g for g in plan_layers(state) if ".shortcut." in g.anchor]
        assert len(groups) == shortcuts
        assert all(state[g.anchor].shape[2:] == (1, 1) and len(g.members) == 5 for g in groups)


@pytest.mark.parametrize("level", ("layer", "filter"))
@pytest.mark.parametrize("name", CIFAR + IMAGENET)
def test_graft_runs(name, level):
    a, b = small(name, 0).state_dict(), small(name, 1).state_dict()
    out, report = graft_state(a, b, level=level)
    plan = plan_layers(a)
    assert [g.members for g in plan] == [g.members for g in plan_layers(model(name).state_dict())]
    assert len(report.layers) == len(plan)
    assert all(0.3 < r.alpha_min <= r.alpha <= r.alpha_max < 0.7 for r in report.layers)
    if level == "layer":
        for g, r in zip(plan, report.layers, strict=True):
            for k in g.members:
                assert torch.allclose(out[k], r.alpha * a[k] + (1 - r.alpha) * b[k], atol=1e-6), k
    else:
        assert [r.filters for r in report.layers] == [g.filters for g in plan]
    copy.deepcopy(small(name, 0)).load_state_dict(out)  # strict: every key and shape fits


def test_reference_mobilenetv2_layout():
    """The paper's variant: an expansion conv in every block, ReLU, 1x1 conv + BN shortcuts on the four
    stride-1 blocks that change width; without those shortcut filters it has the paper's 17,088 filters."""
    net = model("mobilenetv2_ref")
    assert not any(isinstance(m, nn.ReLU6) for m in net.modules())
    shapes = grouped_shapes("mobilenetv2_ref")
    assert sum(s[1] == 1 and s[2:] == (3, 3) for s in shapes) == 17
    assert sum(s[2:] == (1, 1) for s in shapes) == 17 + 17 + 4 + 1  # expansions, projections, shortcuts, last
    state = net.state_dict()
    shortcuts = [g for g in plan_layers(state) if ".shortcut." in g.anchor]
    assert [g.filters for g in shortcuts] == [16, 24, 96, 320] and all(len(g.members) == 5 for g in shortcuts)
    filters = sum(t.shape[0] for k, t in state.items() if t.dim() == 4)
    assert filters - sum(g.filters for g in shortcuts) == 17_088
