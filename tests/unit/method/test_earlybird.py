"""Early-bird masks, distances and detectors checked on hand-made models and hand-computed answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hpcgraft.config import Config, load_config
from hpcgraft.errors import ConfigError, NoBatchNormError, UserError
from hpcgraft.method import earlybird as eb
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


# ------------------------------------------------------------------------------------------ distance, detection
def m(bits: str) -> torch.Tensor:
    return torch.tensor([c == "1" for c in bits])


def test_mask_distance_is_normalised_hamming():
    assert eb.mask_distance(m("1011"), m("1101")) == 0.5
    assert eb.mask_distance(m("1111100000"), m("1111100000")) == 0.0
    assert eb.mask_distance(m("1111100000"), m("0111100001")) == pytest.approx(0.2)
    assert eb.flat_mask({"a": m("10"), "b": m("011")}).tolist() == [True, False, False, True, True]
    with pytest.raises(ValueError):
        eb.mask_distance(m("10"), m("100"))


def test_bn_detector_finds_the_first_epoch_within_threshold_of_the_four_older_masks():
    # 10 channels; each row is the mask at the end of epochs 1..8
    seq = ["0000011111",  # 1
           "1100011100",  # 2
           "1111100000",  # 3: the masks settle from here on, but 1 and 2 are far
           "1111100000",  # 4
           "1111100001",  # 5: window 1..5: vs 1, 2, 3, 4: 0.9 0.7 0.1 0.1 -> no
           "1111100000",  # 6: window 2..6: vs 2 is 0.6 -> no
           "1111010000",  # 7: window 3..7: 0.2 0.2 0.3 0.2 -> no at 0.1
           "1111100000"]  # 8: window 4..8: 0 0.1 0 0.2 -> no; 0.2 at threshold 0.2 -> epoch 8
    det = eb.bn_detector(5, 0.1)
    got = [det.update(m(s), e) for e, s in enumerate(seq, start=1)]
    assert [g["dist_prev"] for g in got] == pytest.approx([None, 0.4, 0.6, 0.0, 0.1, 0.1, 0.2, 0.2])
    assert [g["dist_max"] for g in got[:4]] == [None] * 4
    assert [g["dist_max"] for g in got[4:]] == pytest.approx([0.9, 0.6, 0.3, 0.2])
    assert not any(g["flag"] for g in got) and det.eb_epoch is None
    det = eb.bn_detector(5, 0.2)
    got = [det.update(m(s), e) for e, s in enumerate(seq, start=1)]
    assert [g["flag"] for g in got] == [False] * 7 + [True]  # within 0.2 counts (the reference fails on > only)
    assert got[-1]["eb_epoch"] == 8
    # later epochs measure on; the early-bird epoch stays the first one
    after = det.update(m("0000000000"), 9)
    assert after["flag"] is False and after["eb_epoch"] == 8
    assert det.epochs == [6, 7, 8, 9] and len(det.items) == 4  # all a next window compares with


def test_spline_detector_compares_with_the_previous_three_and_is_strict():
    det = eb.EarlyBirdDetector(4, 0.25, eb.mask_distance, strict=True)
    seq = ["0000", "1100", "1110", "1111", "1111", "1110", "1111"]
    got = [det.update(m(s), e) for e, s in enumerate(seq, start=1)]
    # epoch 4: vs 1,2,3 -> 1.0; epoch 5: vs 2,3,4 -> 0.5; 6: vs 3,4,5 -> 0.25 (not < 0.25); 7: vs 4,5,6 -> 0.25
    assert [g["dist_max"] for g in got] == [None, None, None, 1.0, 0.5, 0.25, 0.25]
    assert det.eb_epoch is None
    assert eb.spline_detector(3, 0.16).window == 4


# ------------------------------------------------------------------------------------------ spline view
class LineNet(nn.Module):
    """x (1x1x1) -> conv 1x1 (w, c) -> BN2d -> conv 1x1 (-1, 0) -> BN2d; fresh BN statistics (mean 0, var
    1) and gamma 1, beta 0, so in eval mode each BN output has the sign of its input."""

    def __init__(self, w: float, c: float) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)
        self.c2, self.b2 = nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)
        with torch.no_grad():
            self.c1.weight.fill_(w)
            self.c1.bias.fill_(c)
            self.c2.weight.fill_(-1.0)
            self.c2.bias.fill_(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b2(self.c2(self.b1(self.c1(x))))


def test_grid_inputs_in_the_reference_order():
    n = 4
    img0, img1 = torch.tensor([[[1.0]]]), torch.tensor([[[10.0]]])
    x = eb.grid_inputs(img0, img1, n, 0, n * n).flatten()
    grid = np.meshgrid(np.linspace(0, 1, n), np.linspace(0, 1, n))  # the reference's canvas
    want = grid[0].reshape(-1) * 1.0 + grid[1].reshape(-1) * 10.0
    assert x.double().numpy() == pytest.approx(want, abs=1e-6)
    assert eb.grid_inputs(img0, img1, n, 5, 9).flatten().tolist() == pytest.approx(want[5:9].tolist(), abs=1e-6)


def test_sign_patterns_and_distance_by_hand():
    # img0 = 1, img1 = -1: the grid point (a, b) gives x = a - b; n = 3: a, b in {0, 0.5, 1}
    img0, img1 = torch.ones(1, 1, 1), -torch.ones(1, 1, 1)
    pa = eb.sign_patterns(LineNet(1.0, 0.0), img0, img1, n=3, chunk=2)
    # b1 > 0 where a - b > 0: (a, b) = (.5, 0), (1, 0), (1, .5) = points 1, 2, 5; b2 = -b1 > 0 where a - b < 0
    rows = {k: [int(v) for v in p.bits[:, 0]] for k, p in pa.items()}
    assert rows == {"b1": [0, 128, 128, 0, 0, 128, 0, 0, 0], "b2": [0, 0, 0, 128, 0, 0, 128, 128, 0]}
    assert {k: p.features for k, p in pa.items()} == {"b1": 1, "b2": 1}
    # c = 0.25: b1 > 0 where a - b > -0.25, 3 more points (a = b); b2 > 0 where a - b < -0.25: unchanged
    pb = eb.sign_patterns(LineNet(1.0, 0.25), img0, img1, n=3)
    assert eb.pattern_distance(pa, pb) == pytest.approx((3 / 9 + 0 / 9) / 2)
    # w = -1: b1 flips wherever a != b (6 points), b2 too
    pc = eb.sign_patterns(LineNet(-1.0, 0.0), img0, img1, n=3)
    assert eb.pattern_distance(pa, pc) == pytest.approx(6 / 9)
    assert eb.pattern_distance(pa, pa) == 0.0


def test_pack_signs_and_popcount():
    out = torch.tensor([[1.0, -1.0, 0.0, 2.0, 3.0, 0.5, -0.1, 9.0, 4.0], [-1.0] * 9])
    packed = eb.pack_signs(out)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0b10011101, 0b10000000], [0, 0]]
    assert eb.bits_differing(packed[0], packed[1]) == 6
    assert eb.bits_differing(packed[0], packed[1], chunk=1) == 6


def test_sign_patterns_of_a_real_model_restore_its_mode_and_stay_small():
    from hpcgraft.models import create_model
    model = create_model("digits_resnet", num_classes=10).train()
    img0, img1 = torch.randn(1, 8, 8), torch.randn(1, 8, 8)
    p = eb.sign_patterns(model, img0, img1, n=5, chunk=7)
    assert model.training
    assert list(p) == [n for n, mod in model.named_modules() if isinstance(mod, nn.BatchNorm2d)]
    assert p["bn1"].bits.shape == (25, 16 * 8 * 8 // 8) and p["bn1"].features == 16 * 64


# ------------------------------------------------------------------------------------------ bn_l1, config
def test_bn_l1_adds_s_sign_gamma_to_the_gradient():
    model = TwoBN([0.5, -2.0, 0.0], [-0.3, 1.0])
    model(torch.randn(4, 1, 2, 2)).sum().backward()
    before = {n: mod.weight.grad.clone() for n, mod in model.named_modules() if isinstance(mod, nn.BatchNorm2d)}
    eb.add_bn_l1_subgradient(model, 1e-4)
    assert (model.b1.weight.grad - before["b1"]).tolist() == pytest.approx([1e-4, -1e-4, 0.0])
    assert (model.b2.weight.grad - before["b2"]).tolist() == pytest.approx([-1e-4, 1e-4])
    eb.add_bn_l1_subgradient(model, 0.0)
    assert (model.b2.weight.grad - before["b2"]).tolist() == pytest.approx([-1e-4, 1e-4])


def test_prune_config_defaults_and_one_line_errors():
    p = Config().prune
    assert (p.monitor, p.ratio, p.bn_l1, p.window, p.threshold) == ("off", 0.5, 0.0, 5, 0.1)
    assert (p.spline_grid, p.spline_lookback, p.spline_threshold) == (100, 3, 0.16)
    assert load_config(None, ["prune.monitor=spline", "prune.ratio=0.3"]).prune.ratio == 0.3
    for bad, words in ((["prune.monitor=lean"], "prune.monitor"), (["prune.ratio=1"], "prune.ratio"),
                       (["prune.ratio=0"], "prune.ratio"), (["prune.bn_l1=-1"], "prune.bn_l1"),
                       (["prune.window=1"], "prune.window"), (["prune.spline_grid=1"], "prune.spline_grid"),
                       (["prune.bn_l1=1e-4", "dist.replicas=2"], "dist.replicas")):
        with pytest.raises(ConfigError) as info:
            load_config(None, bad)
        assert words in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------ monitor state
@pytest.mark.parametrize("kind", ["bn", "spline"])
def test_monitor_state_survives_an_hdf5_round_trip(tmp_path, kind):
    import h5py

    from hpcgraft.data import build_datasets
    from hpcgraft.models import create_model
    from hpcgraft.storage.tree import read_tree, write_tree
    from hpcgraft.training.monitors import build_monitor

    cfg = load_config(None, [f"prune.monitor={kind}", "prune.spline_grid=6", "prune.window=3",
                             "prune.spline_lookback=2"])
    _, test_set = build_datasets("digits")
    torch.manual_seed(0)
    model = create_model("digits_resnet", num_classes=10)
    first = build_monitor(cfg, model, test_set, torch.device("cpu"))
    second = build_monitor(cfg, model, test_set, torch.device("cpu"))
    for monitor in (first, second):  # an empty window is a state too (a stop during epoch 1)
        with h5py.File(tmp_path / f"{kind}0.h5", "w") as f:
            write_tree(f, monitor.state_dict())
        with h5py.File(tmp_path / f"{kind}0.h5") as f:
            monitor.load_state_dict(read_tree(f))
    for epoch in range(1, 4):
        with torch.no_grad():
            for mod in model.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.weight.mul_(torch.rand_like(mod.weight) + 0.5)
                    mod.running_mean.add_(torch.randn_like(mod.running_mean) * 0.3)
        a = first.detector.update(first.measure(model), epoch)
    # second takes first's window through a checkpoint file, then both go on alike
    with h5py.File(tmp_path / f"{kind}.h5", "w") as f:
        write_tree(f, first.state_dict())
    with h5py.File(tmp_path / f"{kind}.h5") as f:
        second.load_state_dict(read_tree(f))
    assert second.detector.epochs == first.detector.epochs == [2, 3]  # window 3: the 2 a next epoch compares with
    assert second.detector.eb_epoch == first.detector.eb_epoch
    nxt = [mon.detector.update(mon.measure(model), 4) for mon in (first, second)]
    assert nxt[0] == nxt[1] and nxt[0]["dist_prev"] == 0.0
    assert a["dist_max"] is not None and nxt[0]["dist_max"] > 0


def test_monitor_on_a_model_without_batchnorm_is_refused_before_training():
    from hpcgraft.data import build_datasets
    from hpcgraft.training.monitors import build_monitor

    _, test_set = build_datasets("digits")
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    for kind in ("bn", "spline"):
        with pytest.raises(NoBatchNormError, match="prune.monitor=off"):
            build_monitor(load_config(None, [f"prune.monitor={kind}"]), model, test_set, torch.device("cpu"))
    assert build_monitor(Config(), model, test_set, torch.device("cpu")) is None
