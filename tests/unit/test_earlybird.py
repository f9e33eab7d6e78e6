"""Early-bird masks, distances and detectors checked on hand-made models and hand-computed answers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hpcgraft.errors import NoBatchNormError, UserError
from hpcgraft.method.earlybird import bn_channel_masks, pruned_count


class TwoBN(nn.Module):
    """conv -> bn(3) -> conv -> bn(2), gammas set by hand."""

    def __init__(self, g1: list[float], g2: list[float]) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, len(g1), 1), nn.BatchNorm2d(len(g1))
        self.c2, self.b2 = nn.Conv2d(len(g1), len(g2), 1), nn.BatchNorm2d(len(g2))
        with torch.no_grad():
            self.b1.weight.copy_(torch.tensor(g1))
            self.b2.weight.copy_(torch.tensor(g2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))


def as_lists(masks: dict[str, torch.Tensor]) -> dict[str, list[bool]]:
    return {k: v.tolist() for k, v in masks.items()}


def test_bn_masks_global_ranking_of_abs_gamma():
    # |gamma| over both layers: 0.5 -2.0 0.1 | -0.3 1.0 -> sorted 0.1 0.3 0.5 1.0 2.0
    model = TwoBN([0.5, -2.0, 0.1], [-0.3, 1.0])
    assert as_lists(bn_channel_masks(model, 0.4)) == {"b1": [True, True, False], "b2": [False, True]}
    assert as_lists(bn_channel_masks(model, 0.6)) == {"b1": [False, True, False], "b2": [False, True]}
    # int(5 * 0.5) = 2 pruned (the reference's '>' would prune 3: 0.1, 0.3 and its threshold 0.5)
    assert as_lists(bn_channel_masks(model, 0.5)) == {"b1": [True, True, False], "b2": [False, True]}
    assert as_lists(bn_channel_masks(model, 0.0)) == {"b1": [True] * 3, "b2": [True] * 2}
    assert as_lists(bn_channel_masks(model, 1.0)) == {"b1": [False] * 3, "b2": [False] * 2}


def test_bn_masks_ties_prune_exact_count_earlier_first():
    # all gammas 1 (a fresh BatchNorm): the reference's v > sorted(v)[k] would prune every channel
    model = TwoBN([1.0, 1.0, 1.0], [1.0, 1.0])
    masks = bn_channel_masks(model, 0.5)
    assert as_lists(masks) == {"b1": [False, False, True], "b2": [True, True]}
    # a tie across layers at the cut: 0.2 (b1[0]) and -0.2 (b2[1]); b1 comes first in module order
    model = TwoBN([0.2, 3.0, 0.1], [4.0, -0.2])
    assert as_lists(bn_channel_masks(model, 0.4)) == {"b1": [False, True, False], "b2": [True, True]}
    assert as_lists(bn_channel_masks(model, 0.6)) == {"b1": [False, True, False], "b2": [True, False]}


def test_bn_masks_keep_exact_fraction_and_types():
    from hpcgraft.models import create_model
    model = create_model("digits_resnet", num_classes=10)
    total = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    for ratio in (0.3, 0.5, 0.7, 1 - 0.9):
        masks = bn_channel_masks(model, ratio)
        assert all(v.dtype == torch.bool for v in masks.values())
        assert sum(int((~v).sum()) for v in masks.values()) == int(round(total * ratio, 6))
    assert list(masks) == [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


def test_pruned_count_floor_with_tolerance():
    assert pruned_count(10, 1 - 0.9) == 1  # 0.0999... * 10 would truncate to 0
    assert pruned_count(5, 0.5) == 2
    assert pruned_count(7, 0.3) == 2
    with pytest.raises(ValueError):
        pruned_count(5, 1.5)


def test_model_without_batchnorm_is_a_one_line_user_error():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    with pytest.raises(NoBatchNormError) as info:
        bn_channel_masks(model, 0.5)
    assert isinstance(info.value, UserError)
    assert "\n" not in str(info.value) and "BatchNorm2d" in str(info.value)
