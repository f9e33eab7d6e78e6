"""DGConv by hand for K = 3 (8 channels), and what grafting does with its gates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hpcgraft.config import load_config
from hpcgraft.errors import ConfigError
from hpcgraft.method import grafting
from hpcgraft.models import create_model
from hpcgraft.models.dgconv import DGConv2d, apply_dgconv, budget_scale, effective_weight, kron_mask


def layer_with(gates: list[int], seed: int = 0) -> DGConv2d:
    torch.manual_seed(seed)
    layer = DGConv2d(8, 8)
    with torch.no_grad():
        layer.gate.copy_(torch.tensor([0.5 if g else -0.5 for g in gates]))
    return layer


@pytest.mark.parametrize(("gates", "nnz", "groups"), [([0, 0, 0], 8, 8), ([1, 1, 1], 64, 1), ([0, 0, 1], 16, 4),
                                                      ([1, 0, 0], 16, 4), ([0, 1, 1], 32, 2)])
def test_mask_counts(gates: list[int], nnz: int, groups: int) -> None:
    layer = layer_with(gates)
    u = kron_mask(torch.tensor(gates, dtype=torch.float32))
    assert int(u.sum()) == nnz and set(u.unique().tolist()) <= {0.0, 1.0}
    assert layer.groups() == groups
    assert float(layer.complexity().detach()) == nnz


def test_identity_and_dense() -> None:
    assert torch.equal(kron_mask(torch.zeros(3)), torch.eye(8))
    assert torch.equal(kron_mask(torch.ones(3)), torch.ones(8, 8))


def test_last_gate_gives_contiguous_pairs_equal_to_grouped_conv() -> None:
    layer = layer_with([0, 0, 1])
    expected = torch.block_diag(*[torch.ones(2, 2)] * 4)
    assert torch.equal(kron_mask(torch.tensor([0.0, 0.0, 1.0])), expected)
    grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)
    with torch.no_grad():  # group j's filters 2j, 2j+1 see input channels 2j, 2j+1
        grouped.weight.copy_(torch.stack([layer.weight[o, 2 * (o // 2):2 * (o // 2) + 2] for o in range(8)]))
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(layer(x), grouped(x), rtol=0, atol=1e-6)


def test_gradients_reach_gates_through_the_estimator() -> None:
    layer = layer_with([0, 0, 1])
    (layer(torch.randn(2, 8, 5, 5)).square().sum() + layer.complexity()).backward()
    assert layer.gate.grad is not None and bool((layer.gate.grad != 0).all())
    assert layer.weight.grad is not None


def test_complexity_gradient_pushes_gates_closed_over_budget() -> None:
    layer = layer_with([1, 1, 1])
    budget_scale(layer, budget=8.0).backward()  # zeta = 64 > 8: factor (8 / zeta)^-0.02 grows with zeta
    assert bool((layer.gate.grad > 0).all())  # SGD lowers the logits: gates close
    assert float(budget_scale(layer_with([0, 0, 0]), budget=8.0).detach()) == 1.0  # zeta = 8 <= o: a = 0


@pytest.mark.parametrize(("cin", "cout"), [(6, 6), (8, 16), (1, 1)])
def test_bad_widths(cin: int, cout: int) -> None:
    with pytest.raises(ValueError):
        DGConv2d(cin, cout)


def test_depthwise_init_and_random_init() -> None:
    assert DGConv2d(16, 16, gate_init="depthwise").groups() == 16
    gate = DGConv2d(16, 16).gate
    assert bool((gate.abs() == 1e-8).all())


@pytest.mark.parametrize(("name", "count"), [("resnet20", 16), ("vgg16_bn", 9), ("resnet18", 13), ("resnet50", 16)])
def test_models_convert_and_keep_their_function(name: str, count: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, 10).eval()
    x = torch.randn(1, 3, 32, 32)
    before = model(x)
    replaced = apply_dgconv(model)
    assert len(replaced) == count
    for layer in model.modules():
        if isinstance(layer, DGConv2d):
            layer.gate.data.fill_(1.0)  # all dense: the same function as the plain model
    torch.testing.assert_close(model(x), before)
    assert set(model.state_dict()) >= {f"{n}.gate" for n in replaced}


def test_mobilenet_is_an_error_naming_a_layer() -> None:
    with pytest.raises(ValueError, match=r"layer 'features\.1\.body\.0\.0': it is already grouped"):
        apply_dgconv(create_model("mobilenetv2", 10))


def gated_state(gates: list[int], seed: int) -> dict[str, torch.Tensor]:
    return {f"conv.{k}": v.detach().clone() for k, v in layer_with(gates, seed).state_dict().items()}


def test_plan_anchors_the_effective_weight_and_mixes_gates_with_the_layer() -> None:
    state = gated_state([0, 0, 1], 0)
    (group,) = grafting.plan_layers(state)
    assert group.members == ("conv.weight", "conv.gate") and group.gate == "conv.gate"
    (h,) = grafting.layer_entropies(state, [group])
    assert float(h) == grafting.entropy(effective_weight(state["conv.weight"], state["conv.gate"]))
    norms = grafting.filter_l1_norms(state)["conv.weight"]
    assert torch.equal(norms, effective_weight(state["conv.weight"], state["conv.gate"]).abs().flatten(1).sum(1))
    alphas = grafting.per_member([group], [torch.rand(8, dtype=torch.float64)])
    assert alphas[1].dim() == 0  # filter level: the gates follow the layer's mean coefficient


def test_masked_entries_do_not_leak_a_peers_stale_weights() -> None:
    own, peer = gated_state([1, 1, 1], 1), gated_state([0, 0, 0], 2)  # the peer is depthwise
    peer["conv.weight"].add_(1000.0)  # stale values in the entries its mask hides
    out, _ = grafting.graft_state(own, peer)
    off_diagonal = ~torch.eye(8, dtype=torch.bool)  # whatever alpha is, the peer contributes zero there
    assert float(out["conv.weight"][off_diagonal].abs().max()) <= float(own["conv.weight"].abs().max())
    assert float(peer["conv.weight"][off_diagonal].min()) > 900  # the input is untouched


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.dgconv_budget=100"], "needs model.dgconv=true"),
    (["model.dgconv=true", "model.dgconv_budget=0"], "must be > 0"),
    (["model.dgconv=true", "model.dgconv_init=dense"], "model.dgconv_init"),
])
def test_config_rejects_bad_dgconv_settings(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_config_accepts_a_budget() -> None:
    cfg = load_config(None, ["model.dgconv=true", "model.dgconv_budget=512", "model.dgconv_init=depthwise"]).model
    assert (cfg.dgconv, cfg.dgconv_budget, cfg.dgconv_init) == (True, 512.0, "depthwise")


def test_a_zero_logit_is_a_closed_gate() -> None:
    layer = layer_with([1, 1, 1])
    with torch.no_grad():
        layer.gate.copy_(torch.tensor([1e-8, -1e-8, 1e-8]) * 0.5 + torch.tensor([-1e-8, 1e-8, 1e-8]) * 0.5)
    assert set(effective_weight(torch.ones(8, 8, 1, 1), layer.gate).unique().tolist()) == {0.0, 1.0}
    assert layer.groups() == 4 and float(layer.complexity().detach()) == 16
