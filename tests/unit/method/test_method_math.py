"""The method's math checked against independent calculations, grafted real models that still train, and
the paper configs (in process: no MPI)."""

from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hpcgraft.config import load_config
from hpcgraft.data import list_datasets
from hpcgraft.method.cultivation import distillation_loss, mean_of_others
from hpcgraft.method.grafting import graft_state
from hpcgraft.models import create_model, list_models
from tests._util import ROOT


def softmax64(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("temperature", [1.0, 3.0, 0.5])
def test_distillation_loss_is_t2_kl_others_to_self(temperature):
    gen = torch.Generator().manual_seed(0)
    logits, other = torch.randn(5, 7, generator=gen) * 3, torch.randn(5, 7, generator=gen) * 3
    target = torch.from_numpy(softmax64(other.double().numpy() / temperature)).float()
    p = target.double().numpy()
    q = softmax64(logits.double().numpy() / temperature)
    expected = temperature**2 * np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1))  # KL(p || q) * T^2
    got = distillation_loss(logits, target, temperature)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # No pull when the peers already agree.
    own = F.softmax(logits / temperature, dim=1)
    assert float(distillation_loss(logits, own, temperature)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("peers", [2, 3, 5])
def test_mean_of_others_excludes_the_peer_itself(peers):
    logits = torch.randn(peers, 4, 6, generator=torch.Generator().manual_seed(peers))
    probs = softmax64(logits.double().numpy() / 2.0)
    for own in range(peers):
        expected = np.mean([probs[k] for k in range(peers) if k != own], axis=0)
        got = mean_of_others(logits, own, 2.0)
        assert got.shape == (4, 6)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-7)


def test_mean_of_others_leaves_out_non_finite_peers():
    """One NaN peer must not make every distillation target NaN: its logits are left out of the mean."""
    logits = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(0))
    logits[2, 1, 3] = float("nan")
    np.testing.assert_array_equal(mean_of_others(logits, 0, 2.0).numpy(), mean_of_others(logits[:2], 0, 2.0).numpy())
    logits[1, 0, 0] = float("inf")
    assert mean_of_others(logits, 0, 2.0) is None  # no finite other peer: no target at all


# ------------------------------------------------------------------------------------ real models
SMALL = {"vgg16_bn": {"width": 16}}



def trained_a_little(name: str, seed: int) -> torch.nn.Module:
    """A model after one SGD step in train mode, so its BatchNorm statistics are its own."""
    torch.manual_seed(seed)
    net = create_model(name, 10, **SMALL.get(name, {}))
    sgd_step(net, seed)
    return net


def sgd_step(net: torch.nn.Module, seed: int) -> float:
    gen = torch.Generator().manual_seed(100 + seed)
    x, y = torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    net.train()
    loss = F.cross_entropy(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


@pytest.mark.parametrize("level", ["layer", "filter"])
@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2", "mobilenetv2_ref", "vgg16_bn"])
def test_grafted_real_model_trains_and_evaluates(name, level):
    a, b = trained_a_little(name, 0), trained_a_little(name, 1)
    state, report = graft_state(a.state_dict(), b.state_dict(), level=level)
    assert len(report.layers) == sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in a.modules())
    net = copy.deepcopy(a)
    net.load_state_dict(state)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert bool((m.running_var > 0).all())
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    net.eval()
    with torch.no_grad():
        out = net(x)
        assert out.shape == (4, 10) and bool(torch.isfinite(out).all())
        assert not torch.allclose(out, a.eval()(x)) and not torch.allclose(out, b.eval()(x))
    before = [p.detach().clone() for p in net.parameters()]
    assert math.isfinite(sgd_step(net, 3))
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(net.parameters(), before, strict=True))


# ------------------------------------------------------------------------------------ paper configs
PAPER_CONFIGS = [f"cifar{c}_{m}" for c in (10, 100) for m in ("resnet32", "resnet56", "resnet110", "mobilenetv2",
                                                            "vgg16")] + [f"imagenet_resnet{d}" for d in (18, 34, 50)]


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_loads_with_known_model_and_data(name):
    path = ROOT / "configs" / f"{name}.yaml"
    cfg = load_config(path)
    assert cfg.model.name in list_models() and cfg.data.name in list_datasets()
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert "Published results" in header and "mpirun -np" in header
    numbers = re.findall(r"\d+\.\d\d", header)  # the published top-1 figures it reproduces
    assert len(numbers) >= 2, header
    if "mobilenetv2" in name:
        assert cfg.model.name == "mobilenetv2_ref"
    if name.startswith("imagenet"):
        assert (cfg.train.epochs, cfg.data.batch_size, cfg.train.schedule) == (90, 256, "cosine")
        assert cfg.train.weight_decay == pytest.approx(1e-4)
