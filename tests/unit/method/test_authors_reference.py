"""``graft.reference=authors`` against a literal port of the authors' code (tests/authors_port.py), on
every model they ship, and ``graft.reference=paper`` against it row by row: each declared difference
(docs/method.md, "Differences from the authors' code") shows up where it should and nowhere else."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hpcgraft.cli import graft
from hpcgraft.config import AUTHORS_GRAFT, authors_reference_conflict, load_config
from hpcgraft.errors import ConfigError
from hpcgraft.method import authors, grafting
from hpcgraft.models import create_model
from tests import authors_port
from tests.fakes import SoloComm

# name, hpcgraft model, authors' script, torchvision-style names (downsample.0)
MODELS = {
    "resnet32": (lambda: create_model("resnet32", 10), "grafting_cifar", False),
    "resnet56": (lambda: create_model("resnet56", 100), "grafting_cifar", False),
    "mobilenetv2": (lambda: create_model("mobilenetv2_ref", 10), "grafting_cifar", False),
    "vgg16_bn": (lambda: create_model("vgg16_bn", 10, width=16), "filter_level", False),
    "resnet18": (lambda: create_model("resnet18", 1000, width=16), "grafting_imagenet", True),
}
STEPS = 391 * 7  # num_batches_tracked after 7 CIFAR epochs of 391 steps


def peer_states(build: Callable[[], nn.Module], trained: bool) -> tuple[dict, dict]:
    """Two peers' state dicts: fresh inits, or trained-like ones (filters of very different scales,
    some nearly dead; BN statistics and affine parameters moved away from their init)."""
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        state = build().state_dict()
        if trained:
            gen = torch.Generator().manual_seed(100 + seed)
            for key, t in state.items():
                if not t.is_floating_point():
                    t.fill_(STEPS)
                elif t.dim() >= 2:
                    scale = torch.rand(t.shape[0], generator=gen) ** 3
                    t.mul_(scale.view(-1, *[1] * (t.dim() - 1)))
                elif key.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=gen) + 0.05)
                else:
                    t.add_(0.3 * torch.randn(t.shape, generator=gen))
        states.append(state)
    return states[0], states[1]


def assert_same(ours: dict, theirs: dict) -> None:
    assert list(ours) == list(theirs)
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), (key, (ours[key].double() - theirs[key].double()).abs().max())


# ------------------------------------------------------------------------- authors = their code
@pytest.mark.parametrize("trained", [False, True], ids=["init", "trained"])
@pytest.mark.parametrize("name", list(MODELS))
def test_authors_reference_is_their_code_bit_for_bit(name: str, trained: bool) -> None:
    build, code, torchvision = MODELS[name]
    own, source = peer_states(build, trained)
    for a, b in ((own, source), (source, own)):
        ours, report = grafting.graft_state(a, b, reference="authors", code=code)
        assert_same(ours, authors_port.port_graft(build, a, b, code, torchvision))
        assert all(abs(r.alpha * 100 - round(r.alpha * 100)) < 1e-9 for r in report.layers)  # rounded


def test_authors_entropy_is_theirs_on_many_tensors() -> None:
    """Their binning drops the maximum unless the float32 last edge rounds above it; both cases occur."""
    gen = torch.Generator().manual_seed(0)
    kept = 0
    for i in range(400):
        x = torch.randn(int(torch.randint(2, 3000, (), generator=gen)), generator=gen) * 10.0 ** (i % 7 - 3)
        h = authors.entropy(x)
        assert h.dtype == torch.float32 and float(h) == authors_port.entropy(x)
        lo, hi = x.min(), x.max()
        kept += bool(lo + 10 * ((hi - lo) / 10) > hi)
    assert 0 < kept < 400


def test_authors_entropy_drops_the_maximum_and_divides_by_all_values() -> None:
    x = torch.arange(11, dtype=torch.float32)  # edges 0, 1, ..., 10 exactly: 10 < 10 is false
    assert float(authors.entropy(x)) == pytest.approx(10 / 11 * math.log(11), rel=1e-6)
    assert grafting.entropy(x) == pytest.approx(9 / 11 * math.log(11) + 2 / 11 * math.log(11 / 2), rel=1e-6)
    assert float(authors.entropy(torch.full((5,), 3.0))) == 0.0  # where their code crashes


def test_coefficient_rounding_is_numpys_and_the_imagenet_order_is_their_own() -> None:
    for d in np.linspace(-0.004, 0.004, 801):
        h = 1.0 + float(d)
        assert authors.coefficient(h, 1.0) == float(round(0.4 / np.pi * np.arctan(500 * (h - 1.0)) + 0.5, 2))
        assert authors.coefficient(h, 1.0, code="grafting_imagenet") == float(
            round(0.4 * np.arctan(500 * (h - 1.0)) / np.pi + 1 / 2, 2))


# --------------------------------------------------------------- paper: the declared differences
def _alpha_of(grafted: torch.Tensor, own: torch.Tensor, source: torch.Tensor) -> float:
    """The share of ``own`` in ``grafted`` = w * own + (1 - w) * source (least squares)."""
    d = (own - source).double().reshape(-1)
    return float(((grafted.double().reshape(-1) - source.double().reshape(-1)) @ d) / (d @ d))


def test_linear_layer_reuses_the_last_conv_alpha_only_in_the_authors_code() -> None:  # row 2 of the differences
    own, source = peer_states(MODELS["resnet32"][0], trained=True)
    last_conv = [k for k in own if own[k].dim() == 4][-1]
    theirs, _ = grafting.graft_state(own, source, reference="authors")
    paper, report = grafting.graft_state(own, source)
    assert _alpha_of(theirs["fc.weight"], own["fc.weight"], source["fc.weight"]) == pytest.approx(
        _alpha_of(theirs[last_conv], own[last_conv], source[last_conv]), abs=1e-6)
    by_name = {r.name: r.alpha for r in report.layers}
    assert _alpha_of(paper["fc.weight"], own["fc.weight"], source["fc.weight"]) == pytest.approx(
        by_name["fc.weight"], abs=1e-6)
    assert by_name["fc.weight"] != pytest.approx(by_name[last_conv], abs=1e-3)


@pytest.mark.parametrize("name", ["mobilenetv2", "resnet18"])
def test_shortcut_convs_reuse_the_previous_alpha_only_in_the_authors_code(name: str) -> None:  # row 3
    build, code, _ = MODELS[name]
    own, source = peer_states(build, trained=True)
    keys = list(own)
    shortcuts = [k for k in keys if ".shortcut.0." in k]
    assert shortcuts
    theirs, _ = grafting.graft_state(own, source, reference="authors", code=code)
    paper, report = grafting.graft_state(own, source)
    by_name = {r.name: r.alpha for r in report.layers}
    differs = 0
    for key in shortcuts:
        previous = [k for k in keys[: keys.index(key)] if own[k].dim() == 4][-1]
        assert _alpha_of(theirs[key], own[key], source[key]) == pytest.approx(
            _alpha_of(theirs[previous], own[previous], source[previous]), abs=1e-6)
        assert _alpha_of(paper[key], own[key], source[key]) == pytest.approx(by_name[key], abs=1e-6)
        differs += by_name[key] != pytest.approx(by_name[previous], abs=1e-3)
    assert differs


def test_vgg_conv_bias_and_linear_never_mix_in_the_authors_code() -> None:  # row 4
    own, source = peer_states(MODELS["vgg16_bn"][0], trained=True)
    theirs, _ = grafting.graft_state(own, source, reference="authors", code="filter_level")
    paper, _ = grafting.graft_state(own, source)
    untouched = [k for k in own if (own[k].dim() == 1 and k.replace("bias", "weight") in own
                                    and own[k.replace("bias", "weight")].dim() == 4) or k.startswith("fc.")]
    assert len(untouched) == 13 * 1 + 2
    for key in untouched:
        assert torch.equal(theirs[key], own[key]), key
        assert not torch.equal(paper[key], own[key]), key


def test_num_batches_tracked_is_mixed_as_float_and_truncated_only_in_the_authors_code() -> None:  # row 6
    own, source = peer_states(MODELS["resnet32"][0], trained=True)
    theirs, report = grafting.graft_state(own, source, reference="authors")
    paper, _ = grafting.graft_state(own, source)
    alphas = dict(zip([g.anchor for g in authors.plan(own)], [r.alpha for r in report.layers], strict=True))
    anchor = None
    for key, t in own.items():
        anchor = key if authors.is_conv_key(key, t) else anchor
        if key.endswith("num_batches_tracked"):
            w = alphas[anchor]
            expected = int(np.float32(np.float32(STEPS) * np.float32(w)) + np.float32(STEPS * np.float32(1 - w)))
            assert int(theirs[key]) == expected and theirs[key].dtype == torch.int64
            assert torch.equal(paper[key], t)
    # where float32 rounding makes n * w + n * (1 - w) fall short of n, the count goes down by one
    n = torch.tensor(65297)
    authors.mix_([n], [n.clone()], [torch.tensor(0.41, dtype=torch.float64)])
    assert int(n) == 65296


# ------------------------------------------------------------------------ offline command, config
def test_offline_command_grafts_as_their_code(tmp_path: Path) -> None:
    build, code, _ = MODELS["resnet32"]
    own, source = peer_states(build, trained=True)
    torch.save(own, tmp_path / "a.pt")
    torch.save(source, tmp_path / "b.pt")
    assert graft.main([str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--out", str(tmp_path / "o.pt"),
                       "--reference", "authors", "--authors-code", code]) == 0
    assert_same(torch.load(tmp_path / "o.pt", weights_only=True), authors_port.port_graft(build, own, source, code))
    assert graft.main([str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--out", str(tmp_path / "p.pt"),
                       "--reference", "authors", "--level", "filter"]) == 2


@pytest.mark.parametrize("overrides, names", [
    (["graft.level=filter_authors"], ("graft.level=filter_authors", "layer, filter")),
    (["graft.reference=authors", "graft.topology=allreduce"], ("graft.topology", "ring")),
    (["graft.reference=authors", "graft.level=filter"], ("graft.level", "layer")),
    (["graft.reference=exact"], ("graft.reference", "paper, authors")),
])
def test_config_refuses_what_the_authors_code_does_not_do_in_one_line(overrides: list[str], names: tuple) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert "\n" not in message and all(n in message for n in names)


@pytest.mark.parametrize("key, value", [("level", "filter"), ("topology", "allreduce"), ("mode", "noise")])
def test_the_authors_rules_are_one_rule_everywhere(key: str, value: str, tmp_path: Path, capsys) -> None:
    """The config, the grafting arithmetic, the exchange and the offline command refuse the same settings
    with the same sentence (each in its own spelling of a setting)."""
    from hpcgraft.comm.exchange import GraftExchange

    want = authors_reference_conflict(**{key: value})
    assert want == (f"graft.{key}={value} is not allowed with graft.reference=authors (the authors' code has only "
                    f"{' and '.join(AUTHORS_GRAFT[key])}); use one of: {', '.join(AUTHORS_GRAFT[key])}")
    with pytest.raises(ConfigError) as err:
        load_config(None, ["graft.reference=authors", f"graft.{key}={value}"])
    assert str(err.value) == want
    math_ = grafting.GraftMath("authors")
    with pytest.raises(ValueError) as err:
        math_.check(**{key: value})
    assert str(err.value) == want
    if key == "level":
        with pytest.raises(ValueError, match=re.escape(want)):
            grafting.GraftMath("authors", level=value)
        state = create_model("digits_resnet", 10).state_dict()
        torch.save(state, tmp_path / "a.pt")
        assert graft.main([str(tmp_path / "a.pt"), str(tmp_path / "a.pt"), "--out", str(tmp_path / "o.pt"),
                           "--reference", "authors", "--level", value]) == 2
        assert f"--level {value} is not allowed with --reference authors" in capsys.readouterr().err
    else:
        kwargs = {"topology": value} if key == "topology" else {"source_fn": grafting.self_source}
        with pytest.raises(ValueError) as err:
            GraftExchange(create_model("digits_resnet", 10).state_dict(), SoloComm(), math_, **kwargs)
        assert f"graft.{key}=" in str(err.value) and "is not allowed with graft.reference=authors" in str(err.value)


def test_code_for_picks_the_script_that_grafted_each_model() -> None:
    assert authors.code_for("vgg16_bn", "cifar10") == "filter_level"
    assert authors.code_for("resnet50", "imagenet_h5") == "grafting_imagenet"
    assert authors.code_for("mobilenetv2_ref", "cifar100") == "grafting_cifar"
