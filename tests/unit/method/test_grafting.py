"""The grafting math against calculations written here from docs/method.md (numpy and plain Python, never
the code under test), and the offline command ``python -m hpcgraft.graft``."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from hpcgraft.cli import graft
from hpcgraft.method import grafting
from hpcgraft.storage.tree import write_tree
from tests._util import ROOT
from tests.reference import entropy_weighted_mean


# ------------------------------------------------------------------------------- references (numpy)
def ref_entropy(values, bins: int = 10) -> float:
    """-sum p ln p over the non-empty bins of an equal-width histogram over [min, max] (max in the
    last bin, which is what np.histogram does)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.max() == x.min():
        return 0.0
    counts, _ = np.histogram(x, bins=bins, range=(x.min(), x.max()))
    p = counts[counts > 0] / x.size
    return float(-(p * np.log(p)).sum())


def ref_alpha(h_self: float, h_source: float, a: float = 0.4, c: float = 500.0) -> float:
    return a / np.pi * np.arctan(c * (h_self - h_source)) + 0.5


def counts_entropy(counts) -> float:
    n = sum(counts)
    return -sum(k / n * math.log(k / n) for k in counts if k)


def centred_values(counts, lo: float = -2.0, width: float = 0.5) -> list[float]:
    """Values whose histogram over [min, max] has exactly ``counts``: bin 0 holds the minimum, the last
    bin the maximum, every other value sits at its bin's centre (no value near an edge). With lo and
    width powers of two every step of the binning is exact in float32."""
    assert counts[0] and counts[-1], "the first and last bins must hold the minimum and the maximum"
    bins = len(counts)
    values = [lo, lo + bins * width]
    for k, n in enumerate(counts):
        values += [lo + (k + 0.5) * width] * (n - (k == 0) - (k == bins - 1))
    return values


# ------------------------------------------------------------------------------------------ entropy
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("counts", [
    [3, 0, 1, 2, 0, 0, 5, 0, 0, 4],
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    [10, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    [2, 7, 1, 8, 2, 8, 1, 8, 2, 8],
])
def test_entropy_of_hand_made_histograms(counts, dtype):
    values = centred_values(counts)
    gen = torch.Generator().manual_seed(len(values))
    x = torch.tensor(values, dtype=dtype)[torch.randperm(len(values), generator=gen)]  # order is irrelevant
    assert grafting.entropy(x) == pytest.approx(counts_entropy(counts), rel=1e-6, abs=1e-7)
    assert grafting.entropy(x.reshape(1, -1, 1)) == pytest.approx(counts_entropy(counts), rel=1e-6, abs=1e-7)


def test_entropy_uses_the_natural_log():
    assert grafting.entropy(torch.tensor([0.0, 1.0])) == pytest.approx(math.log(2), rel=1e-6)
    assert grafting.entropy(torch.tensor(centred_values([1] * 10))) == pytest.approx(math.log(10), rel=1e-6)
    assert grafting.entropy(torch.tensor(centred_values([1] * 4)), bins=4) == pytest.approx(math.log(4), rel=1e-6)


@pytest.mark.parametrize("x", [torch.full((3, 4, 5), 0.7), torch.tensor([2.5]), torch.zeros(10, dtype=torch.float64)])
def test_entropy_of_a_constant_tensor_is_zero(x):
    assert grafting.entropy(x) == 0.0


def test_maximum_lands_in_the_last_bin():
    # 3 values at the minimum, 1 at the maximum: p = (3/4, 1/4). Dropping the maximum (x < max in
    # every bin) would give -3/4 ln 3/4 instead.
    h = grafting.entropy(torch.tensor([0.0, 0.0, 0.0, 1.0]))
    assert h == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), rel=1e-6)
    assert h != pytest.approx(-0.75 * math.log(0.75), rel=1e-3)


def test_empty_bins_are_skipped():
    # only the two extreme bins are filled: a finite entropy, that of (1/2, 1/2)
    h = grafting.entropy(torch.tensor([-1.0, -1.0, 1.0, 1.0]))
    assert math.isfinite(h) and h == pytest.approx(math.log(2), rel=1e-6)


@pytest.mark.parametrize("bins", [10, 7, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_entropy_of_random_tensors_matches_numpy_histogram(bins, dtype):
    gen = torch.Generator().manual_seed(bins)
    for shape in [(64, 16, 3, 3), (1000,), (10, 20)]:
        x = (torch.randn(shape, generator=gen) * 3 + 1).to(dtype)
        assert grafting.entropy(x, bins) == pytest.approx(ref_entropy(x.numpy(), bins), rel=1e-6, abs=1e-7)


def test_entropy_of_half_precision_is_that_of_its_values():
    x = torch.randn(500, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    assert grafting.entropy(x) == pytest.approx(ref_entropy(x.float().numpy()), rel=1e-6)


def test_filter_entropies_equal_the_entropy_of_each_row():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(12, 4, 3, 3, generator=gen) * torch.linspace(0.1, 3, 12).view(-1, 1, 1, 1)
    w[3] = 0.25  # a constant filter
    w[7] = torch.tensor(centred_values([30, 0, 0, 0, 0, 0, 0, 0, 0, 6])).view(4, 3, 3)
    rows = grafting.filter_entropies(w.reshape(12, -1))
    assert rows.dtype == torch.float32 and rows.shape == (12,)
    assert rows.tolist() == [grafting.entropy(w[i]) for i in range(12)]
    assert rows.tolist() == pytest.approx([ref_entropy(w[i].numpy()) for i in range(12)], rel=1e-6, abs=1e-7)
    assert rows[3] == 0.0


@pytest.mark.parametrize("level", ["layer", "filter"])
def test_layer_entropies_of_many_equal_layers_are_those_of_each_layer(level):
    """Equal small layers are binned together; each must still get exactly its own entropy."""
    gen = torch.Generator().manual_seed(6)
    state = {}
    for i in range(7):
        state[f"c{i}.weight"] = torch.randn(8, 4, 3, 3, generator=gen) * (i + 1) / 3
        state[f"d{i}.weight"] = torch.randn(8, 4, 3, 3, generator=gen, dtype=torch.float64)
    state["c3.weight"][2] = 1.5  # a constant filter inside a batch
    state["e.weight"] = torch.randn(10, 4, 3, 3, generator=gen)  # same size as no other
    state["big.weight"] = torch.randn(300, 300, generator=gen)  # above the batching size
    plan = grafting.plan_layers(state)
    got = grafting.layer_entropies(state, plan, level)
    for g, h in zip(plan, got, strict=True):
        w = state[g.anchor]
        if level == "layer":
            assert h.shape == () and h.item() == grafting.entropy(w) == pytest.approx(ref_entropy(w.numpy()), rel=1e-6)
        else:
            assert h.tolist() == [grafting.entropy(w[f]) for f in range(w.shape[0])]
            # float32 binning vs numpy's exact edges: a value within an ulp of an edge may switch bins
            assert h.tolist() == pytest.approx([ref_entropy(w[f].numpy()) for f in range(w.shape[0])], abs=2e-3)


def test_fewer_than_two_bins_is_an_error():
    with pytest.raises(ValueError, match="bins must be >= 2"):
        grafting.entropy(torch.randn(10), bins=1)


# -------------------------------------------------------------------------------------- coefficient
def test_coefficient_stays_in_its_range():
    for a in (0.4, 0.8, 1.0):
        for d in np.linspace(-2, 2, 81):
            alpha = grafting.coefficient(1.0 + d, 1.0, a=a, c=500)
            assert 0.5 - a / 2 <= alpha <= 0.5 + a / 2
            if abs(500 * d) < 1e6:
                assert 0.5 - a / 2 < alpha < 0.5 + a / 2
            assert alpha == pytest.approx(ref_alpha(1.0 + d, 1.0, a, 500), abs=1e-15)


def test_coefficient_known_value():
    # c * (h_self - h_source) = 1: arctan = pi/4, so alpha = 1/2 + a/4
    assert grafting.coefficient(1.002, 1.0, a=0.4, c=500) == pytest.approx(0.6, abs=1e-12)
    assert grafting.coefficient(1.0, 1.0) == 0.5


def test_a_zero_gives_exactly_one_half():
    for h1, h2 in [(0.1, 2.0), (2.0, 0.1), (1.0, 1.0), (0.0, 1e9)]:
        assert grafting.coefficient(h1, h2, a=0.0) == 0.5
    alphas = grafting.coefficients(torch.rand(50), torch.rand(50), a=0.0)
    assert bool((alphas == 0.5).all())


def test_large_c_is_a_step():
    a = 0.4
    assert grafting.coefficient(1.01, 1.0, a=a, c=1e9) == pytest.approx(0.5 + a / 2, abs=1e-7)
    assert grafting.coefficient(1.0, 1.01, a=a, c=1e9) == pytest.approx(0.5 - a / 2, abs=1e-7)


def test_coefficient_is_antisymmetric():
    rng = np.random.default_rng(0)
    for h1, h2 in rng.uniform(0, 2.3, size=(50, 2)):
        for c in (1.0, 500.0, 1e6):
            assert grafting.coefficient(h1, h2, c=c) + grafting.coefficient(h2, h1, c=c) == pytest.approx(1, abs=1e-15)


def test_tensor_coefficients_equal_the_scalar_formula():
    h1, h2 = torch.rand(40, dtype=torch.float64) * 2, torch.rand(40, dtype=torch.float64) * 2
    alphas = grafting.coefficients(h1, h2, a=0.3, c=50)
    assert alphas.dtype == torch.float64
    want = [ref_alpha(x, y, 0.3, 50) for x, y in zip(h1.tolist(), h2.tolist(), strict=True)]
    assert alphas.tolist() == pytest.approx(want, abs=1e-15)


def test_round_alpha_rounds_to_two_decimals():
    h1 = torch.tensor([1.0, 1.0005, 1.001, 1.1, 0.9, 1.0013])
    h2 = torch.ones(6)
    rounded = grafting.coefficients(h1, h2, round_alpha=True)
    exact = [ref_alpha(x, 1.0) for x in h1.double().tolist()]
    assert rounded.tolist() == pytest.approx([round(v, 2) for v in exact], abs=1e-12)
    assert rounded.tolist() != pytest.approx(exact, abs=1e-6)


# ------------------------------------------------------------------------------------- graft_state
class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, bias=True)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)


# written by hand from the architecture: anchor -> the tensors mixed with its coefficient
GROUPS = {
    "conv1.weight": ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"],
    "conv2.weight": ["conv2.weight", "conv2.bias", "bn2.weight", "bn2.bias", "bn2.running_mean", "bn2.running_var"],
    "fc.weight": ["fc.weight", "fc.bias"],
}
FILTERS = {"conv1.weight": 6, "conv2.weight": 8, "fc.weight": 5}


def small_state(seed: int, batches: int = 3) -> dict[str, torch.Tensor]:
    """A SmallCNN state with every tensor random (BN statistics too), filters of different spreads."""
    torch.manual_seed(seed)
    state = SmallCNN().state_dict()
    gen = torch.Generator().manual_seed(seed + 100)
    for k, t in state.items():
        if k.endswith("num_batches_tracked"):
            t.fill_(batches)
        elif k.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
        else:
            spread = torch.rand(t.shape[0], generator=gen) * 2 + 0.05
            t.copy_(torch.randn(t.shape, generator=gen) * spread.view(-1, *[1] * (t.dim() - 1)))
    return state


def clone(state):
    return {k: v.clone() for k, v in state.items()}


def expected_layer_graft(s_self, s_src, a, c):
    """alpha * W_self + (1 - alpha) * W_source per group, float64, alpha from numpy entropies."""
    out = {}
    for anchor, members in GROUPS.items():
        alpha = ref_alpha(ref_entropy(s_self[anchor].numpy()), ref_entropy(s_src[anchor].numpy()), a, c)
        for k in members:
            out[k] = alpha * s_self[k].double().numpy() + (1 - alpha) * s_src[k].double().numpy()
    return out


@pytest.mark.parametrize(("a", "c"), [(0.4, 500.0), (0.8, 5.0), (1.0, 50.0)])
def test_layer_level_graft_follows_the_formula(a, c):
    s1, s2 = small_state(1, batches=3), small_state(2, batches=7)
    out, report = grafting.graft_state(s1, s2, a=a, c=c)
    want = expected_layer_graft(s1, s2, a, c)
    assert sorted(want) == sorted(k for k in s1 if not k.endswith("num_batches_tracked"))
    for k, v in want.items():
        assert out[k].dtype == torch.float32
        np.testing.assert_allclose(out[k].numpy(), v, rtol=1e-5, atol=1e-5, err_msg=k)
    for k in ("bn1.num_batches_tracked", "bn2.num_batches_tracked"):
        assert out[k].item() == 3 and out[k].dtype == torch.int64
    assert [r.name for r in report.layers] == list(GROUPS)
    for r in report.layers:
        assert r.h_self == pytest.approx(ref_entropy(s1[r.name].numpy()), rel=1e-6)
        assert r.h_source == pytest.approx(ref_entropy(s2[r.name].numpy()), rel=1e-6)
        assert r.alpha == pytest.approx(ref_alpha(r.h_self, r.h_source, a, c), abs=1e-12)
        assert r.alpha_min == r.alpha_max == r.alpha and r.filters == 1


def test_filter_level_graft_follows_the_formula_per_filter():
    s1, s2 = small_state(3), small_state(4)
    out, report = grafting.graft_state(s1, s2, level="filter", c=20.0)
    for anchor, members in GROUPS.items():
        alphas = np.array([ref_alpha(ref_entropy(s1[anchor][f].numpy()), ref_entropy(s2[anchor][f].numpy()), 0.4, 20)
                           for f in range(FILTERS[anchor])])
        assert alphas.max() - alphas.min() > 0.01, "the filters should differ for this test to mean something"
        for k in members:  # BN channels, biases follow their filter
            shape = (-1,) + (1,) * (s1[k].dim() - 1)
            want = alphas.reshape(shape) * s1[k].double().numpy() + (1 - alphas.reshape(shape)) * s2[k].double().numpy()
            np.testing.assert_allclose(out[k].numpy(), want, rtol=1e-5, atol=1e-5, err_msg=k)
        layer = next(r for r in report.layers if r.name == anchor)
        assert layer.filters == FILTERS[anchor]
        assert layer.alpha == pytest.approx(alphas.mean(), abs=1e-5)
        assert (layer.alpha_min, layer.alpha_max) == pytest.approx((alphas.min(), alphas.max()), abs=1e-5)
    assert report.level == "filter"


def test_graft_does_not_modify_its_inputs():
    s1, s2 = small_state(5), small_state(6)
    c1, c2 = clone(s1), clone(s2)
    for level in ("layer", "filter"):
        out, _ = grafting.graft_state(s1, s2, level=level)
        assert all(torch.equal(s1[k], c1[k]) and torch.equal(s2[k], c2[k]) for k in s1)
        assert all(out[k].data_ptr() != s1[k].data_ptr() for k in s1)


def test_a_zero_grafts_exactly_the_mean_on_both_sides():
    s1, s2 = small_state(7), small_state(8)
    out12, rep = grafting.graft_state(s1, s2, a=0.0)
    out21, _ = grafting.graft_state(s2, s1, a=0.0)
    assert all(r.alpha == 0.5 for r in rep.layers)
    for members in GROUPS.values():
        for k in members:
            mean = ((s1[k].double() + s2[k].double()) / 2).float()  # the correctly rounded mean
            assert torch.equal(out12[k], mean), k
            assert torch.equal(out21[k], out12[k]), k


def test_round_alpha_in_graft_state():
    s1, s2 = small_state(9), small_state(10)
    out, report = grafting.graft_state(s1, s2, round_alpha=True)
    for r in report.layers:
        assert r.alpha == pytest.approx(round(ref_alpha(r.h_self, r.h_source), 2), abs=1e-12)
        for k in GROUPS[r.name]:
            want = r.alpha * s1[k].double() + (1 - r.alpha) * s2[k].double()
            np.testing.assert_allclose(out[k].numpy(), want.numpy(), rtol=1e-6, atol=1e-6)


def test_graft_keeps_float64_tensors_in_float64():
    s1 = {k: v.double() if v.is_floating_point() else v for k, v in small_state(11).items()}
    s2 = {k: v.double() if v.is_floating_point() else v for k, v in small_state(12).items()}
    out, _ = grafting.graft_state(s1, s2)
    for k, v in expected_layer_graft(s1, s2, 0.4, 500.0).items():
        assert out[k].dtype == torch.float64  # mixed in float64; the entropies (hence alpha) are float32
        np.testing.assert_allclose(out[k].numpy(), v, rtol=1e-6, atol=1e-7)


def test_mismatched_state_dicts_raise_a_clear_error():
    s1 = small_state(1)
    missing = {k: v for k, v in small_state(2).items() if k != "fc.bias"}
    with pytest.raises(ValueError, match=r"differ in their keys \(first difference: \['fc.bias'\]\)"):
        grafting.graft_state(s1, missing)
    reshaped = dict(small_state(2), **{"conv2.weight": torch.randn(8, 6, 5, 5)})
    with pytest.raises(ValueError, match=r"tensor 'conv2.weight' is \(8, 6, 3, 3\) torch.float32 in one model and "
                                         r"\(8, 6, 5, 5\)"):
        grafting.graft_state(s1, reshaped)
    retyped = dict(small_state(2), **{"fc.weight": torch.randn(5, 8, dtype=torch.float64)})
    with pytest.raises(ValueError, match="tensor 'fc.weight'.*float64"):
        grafting.graft_state(s1, retyped)


def test_entropy_weighted_mean_by_hand():
    states = [small_state(20 + i) for i in range(3)]
    for exclude in range(3):
        got = entropy_weighted_mean(states, exclude)
        others = [j for j in range(3) if j != exclude]
        for anchor, members in GROUPS.items():
            w = {j: ref_entropy(states[j][anchor].numpy()) + grafting.WEIGHT_EPS for j in others}
            for k in members:
                want = sum(w[j] * states[j][k].double().numpy() for j in others) / sum(w.values())
                np.testing.assert_allclose(got[k].numpy(), want, rtol=1e-5, atol=1e-6)
        assert torch.equal(got["bn1.num_batches_tracked"], states[exclude]["bn1.num_batches_tracked"])


# ------------------------------------------------------------------------------- invalid filters
def test_count_invalid_filters_on_hand_set_filters():
    a = torch.zeros(4, 2, 3, 3)  # filter l1 norms: 0, 0.05, 0.5, 36
    a[1] = 0.05 / 18
    a[2, 0, 0, 0], a[2, 1, 2, 2] = 0.3, -0.2
    a[3] = -2.0
    b = torch.tensor([0.005, -0.2]).view(2, 1, 1, 1)  # l1 norms 0.005 and 0.2
    state = {"a.weight": a, "a_bn.weight": torch.zeros(4), "b.weight": b, "fc.weight": torch.zeros(3, 4),
             "a_bn.num_batches_tracked": torch.tensor(0)}
    assert grafting.count_invalid_filters(state) == {0.1: 3, 0.01: 2}
    assert grafting.count_invalid_filters(state, thresholds=(1.0, 0.001)) == {1.0: 5, 0.001: 1}
    norms = grafting.filter_l1_norms(state)
    assert sorted(norms) == ["a.weight", "b.weight"]
    assert norms["a.weight"].tolist() == pytest.approx([0.0, 0.05, 0.5, 36.0], rel=1e-6)


def test_count_invalid_filters_without_convolutions():
    assert grafting.count_invalid_filters({"fc.weight": torch.zeros(3, 4)}) == {0.1: 0, 0.01: 0}


# ------------------------------------------------------------------------------- offline command
def save_layouts(tmp_path: Path, state: dict[str, torch.Tensor]) -> dict[str, Path]:
    """One model saved in the layouts the command reads."""
    files = {
        "plain": (state, "plain.pt"),
        "reference": ({"net": state, "acc": 91.5}, "reference.t7"),
        "state_dict": ({"state_dict": state, "epoch": 3, "optimizer": {"lr": 0.1}}, "ckpt.pth"),
        "dataparallel": ({"model": {f"module.{k}": v for k, v in state.items()}}, "dp.pth"),
        "nested": ({"checkpoint": 1, "model": {"net": state}}, "nested.pt"),
    }
    out = {}
    for name, (obj, fname) in files.items():
        torch.save(obj, tmp_path / fname)
        out[name] = tmp_path / fname
    return out


def run_main(capsys, *argv) -> tuple[int, str, str]:
    code = graft.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("layout", ["plain", "reference", "state_dict", "dataparallel", "nested"])
def test_graft_command_reads_common_layouts(tmp_path, capsys, layout):
    s1, s2 = small_state(30), small_state(31)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    f1, f2 = save_layouts(tmp_path / "a", s1), save_layouts(tmp_path / "b", s2)
    code, out, err = run_main(capsys, f1[layout], f2["plain"], "--out", tmp_path / "o" / "grafted.pt")
    assert code == 0, err
    got = torch.load(tmp_path / "o" / "grafted.pt", weights_only=True)
    want, report = grafting.graft_state(s1, s2)
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    for r in report.layers:
        assert r.name in out
        row = next(line for line in out.splitlines() if line.startswith(r.name + " "))
        assert row.split()[1:4] == [f"{r.h_self:.4f}", f"{r.h_source:.4f}", f"{r.alpha:.4f}"]


def test_graft_command_options_and_report(tmp_path, capsys):
    s1, s2 = small_state(32), small_state(33)
    torch.save(s1, tmp_path / "s1.pt")
    torch.save(s2, tmp_path / "s2.pt")
    code, out, err = run_main(capsys, tmp_path / "s1.pt", tmp_path / "s2.pt", "--out", tmp_path / "g.pt",
                              "--level", "filter", "--a", "0.6", "--c", "80", "--bins", "7", "--report",
                              tmp_path / "r" / "report.json")
    assert code == 0, err
    want, report = grafting.graft_state(s1, s2, level="filter", a=0.6, c=80, bins=7)
    got = torch.load(tmp_path / "g.pt", weights_only=True)
    assert all(torch.equal(got[k], want[k]) for k in want)
    doc = json.loads((tmp_path / "r" / "report.json").read_text())
    assert (doc["level"], doc["a"], doc["c"], doc["bins"]) == ("filter", 0.6, 80.0, 7)
    assert [r["name"] for r in doc["layers"]] == list(GROUPS)
    assert doc["layers"] == [{**vars(r)} for r in report.layers]
    assert "min" in out.splitlines()[0] and "filter level" in out


@pytest.mark.process  # runs the command as a user does: python -m
def test_graft_command_as_a_process(tmp_path):
    torch.save(small_state(34), tmp_path / "s1.pt")
    torch.save({"net": small_state(35)}, tmp_path / "s2.t7")
    proc = subprocess.run([sys.executable, "-m", "hpcgraft.graft", tmp_path / "s1.pt", tmp_path / "s2.t7",
                           "--out", tmp_path / "g.pt"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "conv2.weight" in proc.stdout and (tmp_path / "g.pt").is_file()


def test_graft_command_rejects_bad_input(tmp_path, capsys):
    torch.save(small_state(36), tmp_path / "s.pt")
    other = {k: v for k, v in small_state(37).items() if not k.startswith("fc.")}
    torch.save(other, tmp_path / "other.pt")
    torch.save({"epoch": 3, "optimizer": {"lr": torch.tensor(0.1)}}, tmp_path / "nostate.pt")
    torch.save(SmallCNN(), tmp_path / "module.pt")  # a pickled module: weights_only refuses it
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    (tmp_path / "empty.pt").write_bytes(b"")
    out = tmp_path / "g.pt"
    cases = [
        ([tmp_path / "missing.pt", tmp_path / "s.pt"], "missing.pt: no such file"),
        ([tmp_path / "s.pt", tmp_path / "other.pt"], "cannot be grafted: state dicts differ in their keys"),
        ([tmp_path / "nostate.pt", tmp_path / "s.pt"], "found no state dict"),
        ([tmp_path / "module.pt", tmp_path / "s.pt"], "torch.save(model.state_dict(), path)"),
        ([tmp_path / "junk.pt", tmp_path / "s.pt"], "junk.pt: not a readable PyTorch file (Unsupported operand"),
        ([tmp_path / "empty.pt", tmp_path / "s.pt"], "empty.pt: not a readable PyTorch file (EOFError)"),
        ([tmp_path / "s.pt", tmp_path / "s.pt", "--a", "1.5"], "--a must lie in [0, 1]"),
        ([tmp_path / "s.pt", tmp_path / "s.pt", "--bins", "1"], "--bins must be >= 2"),
    ]
    for argv, message in cases:
        code, _, err = run_main(capsys, *argv, "--out", out)
        assert code == 2, argv
        assert err.startswith("hpcgraft-graft: error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_graft_command_reads_hpcgraft_hdf5_peer_files(tmp_path, capsys):
    s1, s2 = small_state(38), small_state(39)
    with h5py.File(tmp_path / "peer-000.h5", "w") as f:
        write_tree(f, {"model": s1, "optimizer": {"momentum": {}}, "epoch": 4})
    torch.save(s2, tmp_path / "s2.pt")
    code, _, err = run_main(capsys, tmp_path / "peer-000.h5", tmp_path / "s2.pt", "--out", tmp_path / "g.pt")
    assert code == 0, err
    want, _ = grafting.graft_state(s1, s2)
    got = torch.load(tmp_path / "g.pt", weights_only=True)
    assert all(torch.equal(got[k], want[k]) for k in want)
