"""LEAN, IndivL1 and IndivSV (hpcgraft.method.lean): the reference's own cases, norms against the SVD of
the explicit circulant matrix, chains against a from-scratch oracle, tiny networks worked out by hand, and
every registered model family pruned to exactly the requested count."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

from hpcgraft.errors import UserError
from hpcgraft.method.lean import (
    KERNEL_CRITERIA,
    CriterionError,
    kept_count,
    kernel_masks,
    kernel_scores,
    longest_chains,
    operator_norms,
)
from hpcgraft.models import create_model, list_models, mobilenetv2
from hpcgraft.models.dgconv import DGConv2d, apply_dgconv


def chains(edges: list[tuple[int, int, float]], n_keep: int, fixed: list[bool] | None = None,
           truncate: bool = False) -> list[bool]:
    src, dst, w = (torch.tensor(c) for c in zip(*edges, strict=True))
    return longest_chains(src, dst, w, n_keep, None if fixed is None else torch.tensor(fixed),
                          truncate=truncate).tolist()


# --- the reference's own test cases (src/fast_graph.rs, tests/test_operatornorm.py) ------------------------

MULT = [(0, 1, 1.0), (0, 1, 2.0), (0, 1, 3.0), (0, 2, 7.0), (1, 2, 3.0)]


@pytest.mark.parametrize(("n_keep", "expected"), [
    (1, [False, False, True, False, True]), (2, [False, False, True, False, True]),
    (3, [False, False, True, True, True]), (4, [False, True, True, True, True]), (5, [True] * 5)])
def test_reference_multiplicative_graph(n_keep, expected):
    assert chains(MULT, n_keep) == expected


def test_reference_long_chains():
    # 5 * 0.5 * 5 = 12.5 beats any sub-chain: one path keeps all three even when one kernel is asked for.
    assert chains([(0, 1, 5.0), (1, 2, 0.5), (2, 3, 5.0)], 1) == [True, True, True]
    # 2 * 0.5 = 1 still counts as a distance, 1 * 1.5 < 2: the first edge alone is the longest path.
    c = [(0, 1, 2.0), (1, 2, 0.5), (2, 3, 1.5)]
    assert chains(c, 1) == [True, False, False]
    assert chains(c, 2) == [True, False, True]
    assert chains(c, 3) == [True, True, True]


def test_reference_fixed_edges_are_never_kept():
    # The path is the fixed edge alone: it keeps nothing, so the rest goes by weight, skipping fixed edges.
    assert chains([(0, 1, 1.1), (0, 1, 1.2), (0, 1, 1.3)], 1, [False, False, True]) == [False, True, False]


def test_reference_norms():
    assert operator_norms(torch.ones(1, 1, 3, 3), 1, 16).item() == pytest.approx(9.0)
    assert operator_norms(torch.ones(1, 1, 2, 2), 2, 16).item() == pytest.approx(2.0)


def test_truncate_stops_inside_the_last_path_from_the_input_side():
    c = [(0, 1, 5.0), (1, 2, 0.5), (2, 3, 5.0)]
    assert chains(c, 1, truncate=True) == [True, False, False]
    assert chains(c, 2, truncate=True) == [True, True, False]


# --- chains against an oracle that recomputes everything from scratch ------------------------------------

def oracle(n: int, edges: list[tuple[int, int, float]], fixed: list[bool], n_keep: int, truncate: bool) -> list[bool]:
    """The reference's loop, literally: a full longest-path pass per path (edges in (from, to) order, ">="
    replaces, the last node wins ties), then the rest by descending weight."""
    order = sorted(range(len(edges)), key=lambda e: (edges[e][0], edges[e][1], e))
    alive, kept, count = [True] * len(edges), [False] * len(edges), 0
    while count < n_keep:
        dist: list[float | None] = [None] * n
        inc: list[int | None] = [None] * n
        for e in order:
            u, v, w = edges[e]
            if not alive[e]:
                continue
            d = (1.0 if dist[u] is None else dist[u]) * w
            if (dist[v] is None and d >= 1) or (dist[v] is not None and dist[v] <= d):
                dist[v], inc[v] = d, e
        top = None
        for v in range(n):
            if dist[v] is not None and (top is None or dist[v] >= dist[top]):
                top = v
        if top is None:
            break
        path = []
        while inc[top] is not None:
            path.append(inc[top])
            top = edges[inc[top]][0]
        marked = 0
        for e in reversed(path):
            if fixed[e]:
                continue
            if truncate and count >= n_keep:
                break
            kept[e], alive[e] = True, False
            count, marked = count + 1, marked + 1
        if not marked:
            break
    rest = sorted((e for e in range(len(edges)) if alive[e] and not fixed[e]), key=lambda e: -edges[e][2])
    for e in rest[: max(0, n_keep - count)]:
        kept[e] = True
    return kept


@pytest.mark.parametrize("seed", range(12))
def test_chains_match_the_from_scratch_oracle(seed):
    rng = random.Random(seed)
    n = rng.randint(8, 25)
    edges, fixed = [], []
    for u in range(n):
        for v in range(u + 1, n):
            for _ in range(2 if rng.random() < 0.1 else 1):  # some parallel edges, as a conv's never has
                if rng.random() < 0.35:
                    is_fixed = rng.random() < 0.15
                    edges.append((u, v, 1.0 if is_fixed else rng.uniform(0.2, 3.0)))
                    fixed.append(is_fixed)
    perm = list(range(len(edges)))
    rng.shuffle(perm)  # the function sorts the edges itself
    edges, fixed = [edges[p] for p in perm], [fixed[p] for p in perm]
    total = len(edges) - sum(fixed)
    for n_keep in (1, total // 3, total // 2, total - 1):
        for truncate in (False, True):
            got = chains(edges, n_keep, fixed, truncate)
            assert got == oracle(n, edges, fixed, n_keep, truncate), (seed, n_keep, truncate)
            if truncate:
                assert sum(got) == n_keep
            assert not any(g and f for g, f in zip(got, fixed, strict=True))


# --- operator norms against the SVD of the explicit operator ---------------------------------------------

def explicit_operator(kernel: np.ndarray, stride: int, m: int) -> np.ndarray:
    """The single-channel convolution on an m x m periodic image as a matrix, rows of the strided output."""
    kh, kw = kernel.shape
    rows = []
    for r in range(0, m, stride):
        for c in range(0, m, stride):
            row = np.zeros((m, m))
            for a in range(kh):
                for b in range(kw):
                    row[(r + a) % m, (c + b) % m] += kernel[a, b]
            rows.append(row.reshape(-1))
    return np.array(rows)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 7])
def test_operator_norms_equal_the_largest_singular_value(stride, k):
    m = 8
    gen = torch.Generator().manual_seed(k * 10 + stride)
    w = torch.randn(3, 2, k, k, generator=gen, dtype=torch.float64)
    got = operator_norms(w, stride, m)
    assert got.shape == (3, 2)
    for o in range(3):
        for i in range(2):
            sv = np.linalg.norm(explicit_operator(w[o, i].numpy(), stride, m), 2)
            assert got[o, i].item() == pytest.approx(sv, rel=1e-10)


def test_operator_norms_of_float32_weights_and_rectangular_kernels():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(4, 3, 3, 2, generator=gen)
    got = operator_norms(w, 2, 16)
    for o in range(4):
        for i in range(3):
            sv = np.linalg.norm(explicit_operator(w[o, i].double().numpy(), 2, 16), 2)
            assert got[o, i].item() == pytest.approx(sv, rel=1e-5)
    assert torch.equal(operator_norms(w[:, :, :1, :1], 1, 16), w[:, :, 0, 0].abs())  # 1x1: |w|


@pytest.mark.parametrize(("args", "match"), [
    ((torch.ones(1, 1, 3, 3), 3, 16), "stride 1 and 2"),
    ((torch.ones(1, 1, 9, 9), 1, 8), "does not fit"),
    ((torch.ones(1, 1, 3, 3), 2, 15), "multiple of the stride"),
])
def test_operator_norm_refusals(args, match):
    with pytest.raises(CriterionError, match=match):
        operator_norms(*args)


# --- tiny networks by hand ---------------------------------------------------------------------------------

def bn(gammas: list[float]) -> nn.BatchNorm2d:
    """BN whose folding factor is exactly |gamma| (variance 1, eps 0)."""
    layer = nn.BatchNorm2d(len(gammas), eps=0.0)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(gammas))
    return layer


def conv1x1(weights: list[list[float]]) -> nn.Conv2d:
    layer = nn.Conv2d(len(weights[0]), len(weights), 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weights)[:, :, None, None])
    return layer


def three_layer() -> nn.Module:
    """x (node 0) -conv1-> node 1 -conv2-> nodes 2, 3 -conv3-> node 4. Edge weights |w| x |gamma|:
    0->1: 0.5 x 10 = 5; 1->2: 4 x 0.125 = 0.5, 1->3: 0.7 x 1 = 0.7; 2->4: 5, 3->4: 0.2.
    Path values: node 1: 5, node 2: 2.5, node 3: 3.5, node 4: max(2.5 x 5, 3.5 x 0.2) = 12.5 through node 2."""
    return nn.Sequential(conv1x1([[0.5]]), bn([10.0]), nn.ReLU(), conv1x1([[4.0], [0.7]]), bn([0.125, 1.0]),
                         nn.ReLU(), conv1x1([[5.0, 0.2]]), bn([1.0]))


def test_tiny_network_scores():
    m = three_layer()
    sv = kernel_scores(m, "indiv_sv")
    assert list(sv) == ["0.weight", "3.weight", "6.weight"]
    expected = {"0.weight": [[5.0]], "3.weight": [[0.5], [0.7]], "6.weight": [[5.0, 0.2]]}
    for name, value in expected.items():
        assert torch.allclose(sv[name], torch.tensor(value, dtype=torch.float64))
    assert all(torch.equal(kernel_scores(m, "lean")[n], sv[n]) for n in sv)
    l1 = kernel_scores(m, "indiv_l1")
    assert torch.allclose(l1["3.weight"], torch.tensor([[4.0], [0.7]], dtype=torch.float64))


@pytest.mark.parametrize(("criterion", "expected"), [
    # the chain 5 x 0.5 x 5 = 12.5 is the longest path: it keeps the 0.5 kernel over the 0.7 one
    ("lean", ([[True]], [[True], [False]], [[True, False]])),
    # the three largest folded norms: 5, 5, 0.7
    ("indiv_sv", ([[True]], [[False], [True]], [[True, False]])),
    # the three largest raw l1 norms: 5, 4, 0.7 (conv1's 0.5 is large only through its BatchNorm)
    ("indiv_l1", ([[False]], [[True], [True]], [[True, False]])),
])
def test_tiny_network_masks_by_hand(criterion, expected):
    masks = kernel_masks(three_layer(), criterion, 0.6)  # 3 of 5 kernels
    assert [masks[n].tolist() for n in ("0.weight", "3.weight", "6.weight")] == list(expected)
    assert all(m.dtype == torch.bool for m in masks.values())


class Residual(nn.Module):
    """x (node 0) -conv1 (3)-> node 1 -conv2 (0.5)-> node 2; 1 + 2 -> node 3 (identity edges); -conv3 (2)-> 4.
    Node 2 has value 1.5, node 3 max(3 via the shortcut, 1.5) = 3, node 4: 6 by conv1, shortcut, conv3."""

    def __init__(self, w2: float = 0.5) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3 = conv1x1([[3.0]]), conv1x1([[w2]]), conv1x1([[2.0]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        return self.conv3(torch.relu(self.conv2(out) + out))


def test_identity_shortcut_carries_paths_but_is_not_a_kernel():
    masks = kernel_masks(Residual(), "lean", 0.6)  # ceil(0.6 x 3) = 2 kernels: the path skips conv2
    assert [bool(m.item()) for m in masks.values()] == [True, False, True]
    assert len(masks) == 3  # the shortcut is no kernel: 3 prunable kernels in all
    # With a strong conv2 the path runs through it (3 x 2.5 x 2 = 15); stopped at 2 from the input side.
    masks = kernel_masks(Residual(2.5), "lean", 0.6)
    assert [bool(m.item()) for m in masks.values()] == [True, True, False]


class Padded(nn.Module):
    """The CIFAR option-A shortcut: a's 2 channels subsampled and zero-padded into channels 1, 2 of 4, added
    to b's 4 channels, read by c. Nodes: x 0; a 1, 2; b 3..6; sums 7..10; c 11."""

    def __init__(self) -> None:
        super().__init__()
        self.a = conv1x1([[1.5], [1.2]])
        self.b = nn.Conv2d(2, 4, 1, stride=2, bias=False)
        with torch.no_grad():
            self.b.weight.fill_(0.1)
        self.c = conv1x1([[0.1, 2.0, 0.1, 0.1]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        short = nn.functional.pad(h[:, :, ::2, ::2], (0, 0, 0, 0, 1, 1))
        return self.c(self.b(h) + short)


def test_zero_padded_shortcut_links_only_existing_channels():
    # a's channel 0 (1.5) reaches sum channel 1 (not 0) by the shortcut, which c weighs by 2: the path
    # 1.5 x 1 x 2 = 3 beats everything, so keep 2 of 14 takes a[0] and c[0, 1]. Had the shortcut ignored
    # the padding offset, a[1] (1.2 x 1 x 2 = 2.4) would sit under c's 2 instead (b's kernels are all 0.1).
    masks = kernel_masks(Padded(), "lean", 0.1)
    assert masks["a.weight"].tolist() == [[True], [False]] and not masks["b.weight"].any()
    assert masks["c.weight"].tolist() == [[False, True, False, False]]


def test_depthwise_conv_is_one_kernel_per_channel():
    m = nn.Sequential(conv1x1([[2.0], [3.0]]), nn.Conv2d(2, 2, 3, padding=1, groups=2, bias=False))
    with torch.no_grad():
        m[1].weight.copy_(torch.stack([torch.full((1, 3, 3), 0.01), torch.full((1, 3, 3), 0.5)]))
    # Depthwise norms 9 x 0.01 = 0.09 (channel 0 -> 0) and 4.5 (1 -> 1): the path 3 x 4.5 = 13.5 runs through
    # channel 1 twice; crossed channels would give 2 x 4.5 = 9 through conv0's channel 0 instead.
    masks = kernel_masks(m, "lean", 0.5)
    assert masks["1.weight"].shape == (2, 1)
    assert masks["0.weight"].tolist() == [[False], [True]] and masks["1.weight"].tolist() == [[False], [True]]


def test_avg_pool_is_a_fixed_edge_of_its_operator_norm():
    # 2x2 average pooling at stride 2 has norm 1/2. Without it conv0[0] -> conv2[0, 0] is worth 4 x 1.2 = 4.8
    # and is the first path (2 of 4 kernels kept: both on it); with it the chain is worth 4 x 1/2 x 1.2 = 2.4,
    # less than conv0[0] alone (4), then conv0[1] (1.5) beats what is left of the chain (1 x 1/2 x 1.2 < 1).
    pooled = nn.Sequential(conv1x1([[4.0], [1.5]]), nn.AvgPool2d(2), conv1x1([[1.2, 0.0]]))
    plain = nn.Sequential(conv1x1([[4.0], [1.5]]), nn.Identity(), conv1x1([[1.2, 0.0]]))
    assert kernel_masks(pooled, "lean", 0.5)["2.weight"].tolist() == [[False, False]]
    assert kernel_masks(plain, "lean", 0.5)["2.weight"].tolist() == [[True, False]]


# --- the registered families -------------------------------------------------------------------------------

SMALL = {"mobilenetv2": {"last_channels": 32}, "mobilenetv2_ref": {"last_channels": 32}}
# One model per family and block type; the other depths are the same classes (checked below).
FAMILIES = ("digits_resnet", "resnet20", "vgg16_bn", "mobilenetv2", "mobilenetv2_ref", "resnet18", "resnet50")


def narrow(name: str) -> dict[str, int]:
    return SMALL.get(name, {"width": {"resnet18": 4, "resnet50": 2}.get(name, 8)})


def small_model(name: str, monkeypatch: pytest.MonkeyPatch) -> nn.Module:
    """A narrow model of the family, with BN scales spread as after training so that chains form."""
    torch.manual_seed(0)
    if name.startswith("mobilenetv2"):  # no width option: narrow its stage table instead
        monkeypatch.setattr(mobilenetv2, "CIFAR_CFG", ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 2, 2), (6, 64, 1, 1)))
    model = create_model(name, 10, **narrow(name))
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.0, 2.0)
                mod.running_var.uniform_(0.2, 1.0)
    return model


def test_the_families_cover_every_registered_model(monkeypatch):
    covered = {type(small_model(n, monkeypatch)) for n in FAMILIES}
    for name in list_models():
        assert type(create_model(name, 10, **narrow(name))) in covered, name


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_keeps_exactly_the_requested_count(name, monkeypatch):
    model = small_model(name, monkeypatch)
    convs = {n: p for n, p in model.named_parameters() if p.dim() == 4}
    total = sum(p.shape[0] * p.shape[1] for p in convs.values())
    for criterion in KERNEL_CRITERIA:
        for keep in (0.03, 0.5):
            masks = kernel_masks(model, criterion, keep)
            assert set(masks) == set(convs)
            assert all(masks[n].shape == convs[n].shape[:2] for n in convs)
            assert sum(int(m.sum()) for m in masks.values()) == kept_count(keep, total), (criterion, keep)
    scores = kernel_scores(model, "lean")
    assert all(scores[n].shape == convs[n].shape[:2] for n in convs)


def test_lean_differs_from_its_baselines_on_a_real_model(monkeypatch):
    """Not a tautology: on a ResNet LEAN keeps kernels that IndivSV drops (small ones on strong chains)."""
    model = small_model("resnet20", monkeypatch)
    lean, sv = kernel_masks(model, "lean", 0.2), kernel_masks(model, "indiv_sv", 0.2)
    differ = sum(int((lean[n] != sv[n]).sum()) for n in lean)
    assert differ > 0


def test_dgconv_models_use_the_gate_masked_weights():
    torch.manual_seed(0)
    model = create_model("resnet20", 10, width=16)
    replaced = apply_dgconv(model, "depthwise")  # every gate closed: only the diagonal kernels are live
    scores = kernel_scores(model, "indiv_sv")
    for name in replaced:
        s = scores[f"{name}.weight"]
        assert isinstance(model.get_submodule(name), DGConv2d)
        assert s.diagonal().gt(0).all() and (s - torch.diag(s.diagonal())).eq(0).all()
    live = sum(int(s.gt(0).sum()) for s in scores.values())
    total = sum(s.numel() for s in scores.values())
    assert kept_count(0.05, total) < live
    masks = kernel_masks(model, "lean", 0.05)
    assert sum(int(m.sum()) for m in masks.values()) == kept_count(0.05, total)
    # Closed kernels score 0 and go last: below the live share none of them is kept.
    for name in replaced:
        m = masks[f"{name}.weight"]
        assert not (m & ~torch.eye(m.shape[0], dtype=torch.bool)).any()


# --- counting and refusals ---------------------------------------------------------------------------------

def test_kept_count_is_the_ceiling_of_the_decimal_fraction():
    assert kept_count(0.7, 10) == 7  # 0.7 * 10 is 7.000000000000001 in binary floating point
    assert kept_count(0.3, 4112) == 1234  # ceil(1233.6)
    assert kept_count(1e-9, 100) == 1 and kept_count(1.0, 100) == 100 and kept_count(1, 7) == 7
    for keep in (0.01, 0.1, 0.25, 0.33, 0.5, 0.9):
        assert kept_count(keep, 997) == math.ceil(Fraction(str(keep)) * 997)


@pytest.mark.parametrize("keep", [0, -0.5, 1.5, float("nan"), True, "0.5"])
def test_keep_outside_the_unit_interval_is_refused(keep):
    with pytest.raises(CriterionError, match="keep fraction"):
        kernel_masks(three_layer(), "lean", keep)


def test_refusals_are_one_line_user_errors():
    cases = [
        (lambda: kernel_masks(three_layer(), "lean2", 0.5), "unknown kernel pruning criterion 'lean2'"),
        (lambda: kernel_scores(three_layer(), "l1"), "use one of: lean, indiv_l1, indiv_sv"),
        (lambda: kernel_masks(nn.Sequential(nn.Conv2d(1, 2, 3, stride=3)), "lean", 0.5), "stride"),
        (lambda: kernel_masks(nn.Sequential(nn.Conv2d(1, 2, 3, dilation=2)), "indiv_sv", 0.5), "dilation"),
        (lambda: kernel_masks(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Upsample(scale_factor=2), nn.Conv2d(2, 2, 3)),
                              "lean", 0.5), "Upsample"),
        (lambda: kernel_masks(nn.Sequential(nn.Linear(3, 3)), "indiv_l1", 0.5), "no Conv2d"),
        (lambda: kernel_masks(nn.Sequential(nn.Conv2d(1, 2, 11)), "lean", 0.5, image_size=8), "raise image_size"),
    ]
    for call, match in cases:
        with pytest.raises(CriterionError, match=match) as info:
            call()
        assert isinstance(info.value, UserError) and "\n" not in str(info.value)
