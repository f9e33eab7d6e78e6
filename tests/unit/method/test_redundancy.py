"""Redundant kernels (hpcgraft/method/redundancy.py) on graphs whose answer is known by hand: a chain cut in
the middle, a residual block whose branch dies, a depthwise layer; and the counts make_mask reports."""

from __future__ import annotations

import torch
from torch import nn

from hpcgraft.method.channelgraph import read_graph
from hpcgraft.method.pruning import make_mask
from hpcgraft.method.redundancy import remove_redundant

T, F = True, False


def conv(cin: int, cout: int, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, bias=False, groups=groups)


def masks_of(model: nn.Module, kept: dict[str, list]) -> dict[str, list]:
    result = remove_redundant(read_graph(model, 8), {k: torch.tensor(v) for k, v in kept.items()})
    return {k: v.tolist() for k, v in result.items()}


class Chain(nn.Module):
    """image (1) -a-> 2 channels -b-> 2 channels -c-> 2 channels -> pooling -> classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = conv(1, 2), conv(2, 2), conv(2, 2)
        self.fc = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c(torch.relu(self.b(torch.relu(self.a(x)))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_chain_cut_in_the_middle():
    # b keeps only b[1, 1]: b's channel 0 gets no kernel (dead), so c[:, 0] reads zeros; a's channel 0 is
    # read by no kept kernel of b (a[0] reaches nothing). c[:, 1] and a[1] stay on the path a1 -> b11 -> c*1.
    kept = {"a.weight": [[T], [T]], "b.weight": [[F, F], [F, T]], "c.weight": [[T, T], [T, T]]}
    assert masks_of(Chain(), kept) == {"a.weight": [[F], [T]], "b.weight": [[F, F], [F, T]],
                                       "c.weight": [[F, T], [F, T]]}


def test_a_chain_cut_through_removes_everything():
    kept = {"a.weight": [[T], [T]], "b.weight": [[F, F], [F, F]], "c.weight": [[T, T], [T, T]]}
    assert masks_of(Chain(), kept) == {"a.weight": [[F], [F]], "b.weight": [[F, F], [F, F]],
                                       "c.weight": [[F, F], [F, F]]}


def test_nothing_redundant_is_left_alone():
    kept = {"a.weight": [[T], [F]], "b.weight": [[T, F], [F, F]], "c.weight": [[T, F], [F, F]]}
    assert masks_of(Chain(), kept) == kept


class Block(nn.Module):
    """stem (1 -> 2), then out = stem + branch2(branch1(stem)), then pooling: a residual block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.branch1, self.branch2 = conv(1, 2), conv(2, 2), conv(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem(x))
        return (s + self.branch2(torch.relu(self.branch1(s)))).mean((2, 3))


ALL = [[T, T], [T, T]]
NONE = [[F, F], [F, F]]


def test_residual_block_whose_first_branch_conv_dies():
    # branch1 keeps nothing: branch2 reads dead channels; the stem still reaches the end by the shortcut.
    result = masks_of(Block(), {"stem.weight": [[T], [T]], "branch1.weight": NONE, "branch2.weight": ALL})
    assert result == {"stem.weight": [[T], [T]], "branch1.weight": NONE, "branch2.weight": NONE}


def test_residual_block_whose_last_branch_conv_dies():
    # branch2 keeps nothing: branch1's outputs reach no end; the shortcut keeps the stem.
    result = masks_of(Block(), {"stem.weight": [[T], [T]], "branch1.weight": ALL, "branch2.weight": NONE})
    assert result == {"stem.weight": [[T], [T]], "branch1.weight": NONE, "branch2.weight": NONE}


def test_residual_block_with_half_a_stem():
    # stem channel 1 dead: branch1's kernels reading it go; the branch's other kernels stay.
    result = masks_of(Block(), {"stem.weight": [[T], [F]], "branch1.weight": ALL, "branch2.weight": ALL})
    assert result == {"stem.weight": [[T], [F]], "branch1.weight": [[T, F], [T, F]], "branch2.weight": ALL}


class Depthwise(nn.Module):
    """image (1) -a-> 3 channels -depthwise-> 3 channels -pointwise-> 2 channels -> pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.dw = conv(1, 3), conv(3, 3, groups=3)
        self.pw = nn.Conv2d(3, 2, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(self.a(x))).mean((2, 3))


def test_depthwise_layer():
    # a's channel 1 pruned: the depthwise kernel of channel 1 reads zeros, and so do pw[:, 1];
    # pw drops channel 2 entirely, so the depthwise kernel 2 and a's kernel 2 reach nothing.
    kept = {"a.weight": [[T], [F], [T]], "dw.weight": [[T], [T], [T]], "pw.weight": [[T, T, F], [F, T, F]]}
    assert masks_of(Depthwise(), kept) == {"a.weight": [[T], [F], [F]], "dw.weight": [[T], [F], [F]],
                                           "pw.weight": [[T, F, F], [F, F, F]]}


def test_make_mask_counts_both_and_removes_by_default():
    # l1 keeps 3 of 6 filters: b's filter 1, c's filter 0 and one 0.1 filter (a's filters are smallest), so
    # a keeps nothing, every kept kernel of b and c reads a dead channel, and nothing remains.
    model = Chain()
    with torch.no_grad():
        model.a.weight.fill_(0.01)
        model.b.weight.fill_(0.1)
        model.b.weight[1].fill_(1.0)
        model.c.weight.fill_(0.1)
        model.c.weight[0].fill_(1.0)
    kept = make_mask(model, "l1", 0.34)  # ceil(0.34 x 6) = 3 filters: b1, c0 and one 0.1 filter (b0 or c1)
    assert (kept.kept, kept.total) == (3, 6)
    assert kept.kernels_by_criterion == 6 and kept.kernels_total == 10
    assert kept.kernels == 0 and not any(bool(m.any()) for m in kept.masks.values())
    raw = make_mask(model, "l1", 0.34, keep_redundant=True)
    assert raw.kernels == raw.kernels_by_criterion == 6
    assert sum(int(m.sum()) for k, m in raw.masks.items() if m.dim() == 2) == 6


def test_lean_on_a_residual_model_never_keeps_more_after_removal():
    torch.manual_seed(0)
    model = Block()
    for keep in (0.1, 0.3, 0.6):
        m = make_mask(model, "indiv_l1", keep)
        assert m.kernels <= m.kernels_by_criterion == m.kept
        assert m.kernels == sum(int(v.sum()) for v in m.masks.values() if v.dim() == 2)
