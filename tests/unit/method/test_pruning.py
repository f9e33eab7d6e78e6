"""Pruning masks (hpcgraft/method/pruning.py): hand-computed channel masks on a tiny net, exact kept counts
on a real model of every registered family, masks that stay zero through SGD steps, state round trip."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from hpcgraft.errors import UserError
from hpcgraft.method import lean
from hpcgraft.method.pruning import (
    CRITERIA,
    Mask,
    PruneError,
    conv_bn_pairs,
    invalid_filters,
    invalid_overlap,
    make_mask,
)
from hpcgraft.models import create_model
from hpcgraft.models.dgconv import apply_dgconv


class Tiny(nn.Module):
    """conv(1->3) bn(3) conv(3->2, bias) bn(2): five filters, five BatchNorm channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 2, 1, bias=True)
        self.bn2 = nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def tiny() -> Tiny:
    m = Tiny()
    with torch.no_grad():
        m.conv1.weight.copy_(torch.tensor([1.0, -5.0, 3.0]).view(3, 1, 1, 1))  # filter l1: 1, 5, 3
        m.conv2.weight.copy_(torch.tensor([[1.0, 1.0, 0.0], [-2.0, 1.0, 1.0]]).view(2, 3, 1, 1))  # l1: 2, 4
        m.bn1.weight.copy_(torch.tensor([0.1, -2.0, 3.0]))
        m.bn2.weight.copy_(torch.tensor([0.5, 4.0]))
    return m


def test_conv_bn_pairs():
    assert conv_bn_pairs(tiny()) == {"conv1": "bn1", "conv2": "bn2"}


def test_l1_mask_by_hand():
    # keep 0.6 of 5 filters: ceil(3) = 3 kept, the largest l1 norms 5, 4, 3.
    m = make_mask(tiny(), "l1", 0.6)
    assert (m.kept, m.total, m.unit) == (3, 5, "filters")
    assert m.masks["conv1.weight"].tolist() == [[False], [True], [True]]
    # conv2's filter 1 reads conv1's pruned channel 0 through a redundant kernel: removed by default
    assert m.masks["conv2.weight"].tolist() == [[False] * 3, [False, True, True]]
    assert (m.kernels_by_criterion, m.kernels, m.kernels_total) == (5, 4, 9)
    assert make_mask(tiny(), "l1", 0.6, keep_redundant=True).masks["conv2.weight"].tolist() == [[False] * 3, [True] * 3]
    assert m.masks["conv2.bias"].tolist() == [False, True]
    assert m.masks["bn1.weight"].tolist() == m.masks["bn1.bias"].tolist() == [False, True, True]
    assert m.masks["bn2.weight"].tolist() == [False, True]


def test_entropy_mask_by_hand():
    # conv2's filter 0 has two equal weights and a zero: 2 of 3 in one bin, entropy (2/3, 1/3) = 0.64;
    # filter 1 (-2, 1, 1): also two bins, 0.64; conv1's filters are single weights: entropy 0.
    # keep 0.4 of 5: 2 kept, the two conv2 filters; conv1 loses every filter.
    m = make_mask(tiny(), "entropy", 0.4, keep_redundant=True)
    assert m.kept == 2
    assert m.masks["conv1.weight"].flatten().tolist() == [False, False, False]
    assert m.masks["conv2.weight"].all()
    assert make_mask(tiny(), "entropy", 0.4).kernels == 0  # conv2 reads only dead channels


def test_bn_mask_by_hand():
    # |gamma| 0.1, 2, 3 | 0.5, 4; keep 0.4 of 5 channels: ceil(2) = 2 kept, 4 and 3.
    m = make_mask(tiny(), "bn", 0.4)
    assert (m.kept, m.total, m.unit) == (2, 5, "BatchNorm channels")
    assert m.masks["bn1.weight"].tolist() == [False, False, True]
    assert m.masks["bn2.weight"].tolist() == [False, True]
    assert m.masks["conv1.weight"].flatten().tolist() == [False, False, True]  # the conv producing them
    assert m.masks["conv2.bias"].tolist() == [False, True]
    assert {k: v.tolist() for k, v in invalid_filters(tiny(), "bn", 0.4).items()} == {
        "conv1.weight": [True, True, False], "conv2.weight": [True, False]}


def test_bn_needs_batchnorm():
    with pytest.raises(UserError, match="BatchNorm"):
        make_mask(nn.Sequential(nn.Conv2d(1, 2, 3)), "bn", 0.5)


@pytest.mark.parametrize("criterion,keep", [("magnitude", 0.5), ("l1", 0.0), ("l1", 1.5), ("bn", -0.1)])
def test_bad_request(criterion, keep):
    with pytest.raises(PruneError):
        make_mask(tiny(), criterion, keep)


def test_pruned_stays_zero_through_sgd():
    """Momentum and weight decay move pruned weights; re-applying after each step keeps them at 0, and a
    pruned channel's output is exactly zero."""
    torch.manual_seed(0)
    model = tiny()
    mask = make_mask(model, "l1", 0.6)
    mask.apply(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(8, 1, 4, 4)).pow(2).mean().backward()
        opt.step()
        mask.apply(model)
    for name, p in model.named_parameters():
        if name in mask.masks:
            m = mask.masks[name].reshape(*mask.masks[name].shape, *([1] * (p.dim() - mask.masks[name].dim())))
            assert (p.detach() * ~m == 0).all(), name
            assert (p.detach()[m.expand_as(p)] != 0).any(), name  # kept weights trained
    out = model(torch.randn(4, 1, 4, 4))
    assert (out[:, 0] == 0).all() and (out[:, 1] != 0).any()


def test_state_round_trip():
    mask = make_mask(tiny(), "bn", 0.6)
    buf = io.BytesIO()
    torch.save(mask.state_dict(), buf)
    buf.seek(0)
    back = Mask.from_state_dict(torch.load(buf, weights_only=True))
    assert (back.criterion, back.keep, back.kept, back.total, back.unit) == ("bn", 0.6, 3, 5, "BatchNorm channels")
    assert back.masks.keys() == mask.masks.keys()
    assert all(torch.equal(back.masks[k], mask.masks[k]) for k in mask.masks)


FAMILIES = ["digits_resnet", "resnet20", "resnet18", "mobilenetv2", "vgg16_bn"]


# Kernel criteria at one keep only: LEAN and IndivSV on resnet18 / vgg16_bn take seconds per mask, so those four
# cases are in the slow tier (make test-all); the other families take the same code paths in make test-fast.
CASES = [(c, k) for c in CRITERIA for k in ((0.3,) if c in lean.KERNEL_CRITERIA else (0.02, 0.5))]
SLOW = {(c, name) for c in ("lean", "indiv_sv") for name in ("resnet18", "vgg16_bn")}  # an SVD per kernel


@pytest.mark.parametrize("criterion,keep,name", [
    pytest.param(c, k, name, id=f"{c}-{k}-{name}", marks=[pytest.mark.slow] if (c, name) in SLOW else [])
    for c, k in CASES for name in FAMILIES])
def test_exact_kept_fraction(name, keep, criterion):
    """ceil(keep N) units kept, N the criterion's units (kernels, filters or BN channels) of the network."""
    torch.manual_seed(0)
    model = create_model(name, 10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.1, 1.0)  # fresh BN gammas all equal 1: rank something
    mask = make_mask(model, criterion, keep, keep_redundant=True)
    assert make_mask(model, criterion, keep).kernels <= mask.kernels == mask.kernels_by_criterion
    convs = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    if criterion in lean.KERNEL_CRITERIA:
        n = sum(m.weight.shape[0] * m.weight.shape[1] for m in convs.values())
        counted = sum(int(mask.masks[k].sum()) for k in convs)
    elif criterion == "bn":
        bns = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
        n = sum(mask.masks[k].numel() for k in bns)
        counted = sum(int(mask.masks[k].sum()) for k in bns)
    else:
        n = sum(m.weight.shape[0] for m in convs.values())
        counted = sum(int(mask.masks[k].any(1).sum()) for k in convs)
    assert (mask.total, mask.kept, counted) == (n, math.ceil(keep * n), math.ceil(keep * n))
    mask.apply(model)
    model.train()
    x = torch.randn(2, 1 if name == "digits_resnet" else 3, *((8, 8) if name == "digits_resnet" else (32, 32)))
    model(x).sum().backward()  # the pruned model still runs forward and backward


def test_invalid_overlap_by_hand():
    # keep 0.4 of 5: l1 keeps 5, 4 (invalid: conv1 filters 0 and 2, conv2 filter 0); bn keeps |gamma| 4, 3
    # (invalid: conv1 filters 0 and 1, conv2 filter 0): 2 of bn's 3 are l1's too.
    layers = invalid_overlap(tiny(), ["bn"], 0.4)
    assert [(s.name, s.filters, s.invalid, s.with_l1) for s in layers] == [
        ("conv1.weight", 3, {"l1": 2, "bn": 2}, {"l1": 2, "bn": 1}),
        ("conv2.weight", 2, {"l1": 1, "bn": 1}, {"l1": 1, "bn": 1})]
    # l1 keeps conv2's filter 1 whole (3 kernels) and bn as well, but only the kernel reading the one kept
    # channel of conv1 (1 for l1, 2 for bn) is on a path: 3 -> 1 for both.
    assert [(s.kernels, s.kept_by_criterion, s.kept) for s in layers] == [
        (3, {"l1": 1, "bn": 1}, {"l1": 1, "bn": 1}), (6, {"l1": 3, "bn": 3}, {"l1": 1, "bn": 1})]


def test_analyze_criterion_on_a_real_checkpoint(capsys):
    from hpcgraft.cli import analyze
    from tests._util import ROOT

    run = ROOT / "tests" / "data" / "run-before-relayout"
    assert analyze.main([str(run), "--peer", "0", "--criterion", "entropy,bn", "--keep", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "entropy&l1" in out and "bn&l1" in out and out.splitlines()[-1].startswith("total")
    assert "bn kept" in out and ">" in out.splitlines()[-1]  # kernels chosen > left after removing redundant ones
    assert analyze.main([str(run), "--criterion", "magnitude"]) == 2
    assert "unknown criterion 'magnitude'" in capsys.readouterr().err


def test_lean_refuses_an_unsupported_stride():
    """A stride the operator norm does not cover is the user's error (one line, exit 2 in the command)."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3, stride=3), nn.BatchNorm2d(2))
    with pytest.raises(UserError, match="stride"):
        make_mask(model, "lean", 0.5)


def test_report_plots_prune_results(tmp_path):
    """hpcgraft.report's pruning figure: one line per (criterion, arm) from the prune.json files it finds."""
    from hpcgraft.reporting.plots import plot_pruning

    def doc(arm: str, top1: float) -> dict:
        return {"arm": arm, "results": [{"criterion": "bn", "kept_fraction": k, "top1": {"0": top1 * k, "1": top1}}
                                        for k in (0.1, 0.5)]}

    assert not plot_pruning([], tmp_path / "none.png") and not (tmp_path / "none.png").exists()
    assert plot_pruning([doc("baseline", 80.0), doc("grafted", 90.0)], tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_bn_criterion_prunes_the_dgconv_layer_that_feeds_the_batchnorm() -> None:
    """A DGConv layer is a conv: a pruned BatchNorm channel zeroes the DGConv filter that produces it."""
    torch.manual_seed(0)
    model = create_model("digits_resnet", 10)
    layers = apply_dgconv(model)
    mask = make_mask(model, "bn", 0.5)
    assert layers and all(mask.masks[f"{name}.weight"].dim() == 2 for name in layers)
    assert set(invalid_overlap(model, ["bn"], 0.5)[1].invalid) == {"l1", "bn"}
