"""train.compile: torch.compile of the training model, with the plain module kept for the state.

One compiled run only (a first compile of the digits net takes half a minute to a minute and a half on
2 cores); the rest are the cheap checks around it."""

from __future__ import annotations

import copy

import pytest
import torch

from hpcgraft.config import load_config
from hpcgraft.errors import ConfigError
from hpcgraft.method import grafting
from hpcgraft.models import create_model
from hpcgraft.models.compiled import check_compile, compile_model
from hpcgraft.training.evaluation import predict
from tests.unit.training.test_device import CUDA, DEVICE, _peer, _train_steps

# Inductor's CPU kernels sum in float where ATen's CPU kernels sum in double: on batches whose BatchNorm
# gradient sums nearly cancel, a compiled step's gradients differ from eager ones by up to ~0.5 % (eager's
# differ from float64 by ~2e-6), and training amplifies that from step to step. So each step starts both
# peers from the same state and one step is compared (STEP); the forward of the same weights agrees to
# float rounding (TIGHT). A graft moves the weights by tens of percent: a compiled graph that missed it
# would fail both by far.
STEP = dict(rtol=1e-2, atol=1e-3)
TIGHT = dict(rtol=1e-3, atol=1e-4) if CUDA else dict(rtol=1e-4, atol=1e-5)


def _assert_close_states(got: dict, want: dict, tol: dict) -> None:
    assert list(got) == list(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], **tol, msg=lambda m, key=key: f"{key}: {m}")


def _graft_in_place(model: torch.nn.Module, source: dict) -> None:
    """A graft as the exchange makes it: the new weights copied into the model's own state tensors."""
    state = model.state_dict()
    new, _ = grafting.graft_state(state, source, a=0.4, c=500.0, bins=10, level="layer")
    torch._foreach_copy_([state[k] for k in new], [new[k] for k in new])


def _one_step_from_the_same_state(eager, compiled, epoch: int) -> None:
    """The compiled peer loads the eager one's checkpoint state (in place, as a resume does), both take the
    first step of ``epoch``; their checkpoint trees (weights, statistics, momentum) then agree."""
    compiled.load_state_dict(copy.deepcopy(eager.state_dict()))
    for p in (eager, compiled):
        p.progress.epoch, p.progress.batch = epoch, 0
        _train_steps(p, 1)
    got, want = compiled.state_dict(), eager.state_dict()
    assert not any("_orig_mod" in k for k in got["model"])  # the tree is the eager one's, key for key
    _assert_close_states(got["model"], want["model"], STEP)
    _assert_close_states(got["optimizer"]["momentum"], want["optimizer"]["momentum"], STEP)


@pytest.mark.slow
def test_compiled_training_equals_eager_and_sees_weights_written_in_place():
    """The same peer trained eagerly and compiled (train.compile=default), its state written in place
    before every step and grafted in place from another peer: every compiled step agrees with the eager
    one, and so does the compiled evaluation of the grafted weights; two compiled runs are bitwise equal."""
    twins = [_peer("train.compile=default") for _ in range(2)]
    for p in twins:  # same seed, same weights: compiled runs are deterministic among themselves
        _train_steps(p, 2)
    assert all(torch.equal(v, twins[1].model.state_dict()[k]) for k, v in twins[0].model.state_dict().items())
    eager, compiled = _peer(), _peer("train.compile=default")
    assert compiled.net is not compiled.model and eager.net is eager.model
    torch.manual_seed(1)
    other = {k: v.to(DEVICE) for k, v in create_model("digits_resnet", 10).state_dict().items()}
    for epoch in range(2):
        _one_step_from_the_same_state(eager, compiled, epoch)
    compiled.load_state_dict(copy.deepcopy(eager.state_dict()))
    before = {k: v.clone() for k, v in compiled.model.state_dict().items()}
    for p in (eager, compiled):
        _graft_in_place(p.model, other)
    moved = max(float((compiled.model.state_dict()[k] - v).abs().max()) for k, v in before.items())
    assert moved > 100 * STEP["atol"]  # the graft is far larger than the tolerances
    # evaluation during training goes through the compiled module as well (in eval mode: its own graphs)
    p_got, y_got = predict(compiled.net, compiled.test_loader, compiled.device)
    p_want, y_want = predict(eager.net, eager.test_loader, eager.device)
    assert torch.equal(y_got, y_want) and not compiled.model.training  # eval mode reached the plain module
    torch.testing.assert_close(p_got, p_want, **TIGHT)
    for p in (eager, compiled):  # training goes on from the grafted weights
        p.progress.epoch, p.progress.batch = 2, 0
        _train_steps(p, 1)
    _assert_close_states(compiled.state_dict()["model"], eager.state_dict()["model"], STEP)
    _one_step_from_the_same_state(eager, compiled, 3)


@pytest.mark.process  # a peer in a world of one rank: MPI in this process
def test_off_is_the_plain_model_and_a_replaced_model_is_compiled_anew():
    model = create_model("digits_resnet", 10)
    assert compile_model(model, "off") is model
    peer = _peer("train.compile=reduce-overhead")
    first = peer.net
    assert first._orig_mod is peer.model and peer.net is first  # compiled once, lazily
    peer.model = create_model("digits_resnet", 10).to(DEVICE)  # as tools/bench_train.py swaps a model in
    assert peer.net._orig_mod is peer.model


def test_compile_modes_are_checked_by_the_config():
    assert load_config(None, ["train.compile=off"]).train.compile == "off"  # YAML's `off` is a boolean
    assert load_config(None, ["train.compile=max-autotune"]).train.compile == "max-autotune"
    with pytest.raises(ConfigError, match="train.compile='fast' is not allowed; use one of: off, default"):
        load_config(None, ["train.compile=fast"])


@pytest.mark.process  # a peer in a world of one rank: MPI in this process
def test_compile_without_a_cpp_compiler_is_refused_before_the_model_is_built(monkeypatch):
    from torch._inductor import cpp_builder

    def no_compiler() -> str:
        raise RuntimeError("no working C++ compiler found")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    check_compile("off", torch.device("cpu"))  # nothing to check when not compiling
    with pytest.raises(ConfigError) as err:
        _peer("train.compile=default", "dist.device=cpu")
    message = str(err.value)
    assert "\n" not in message and "needs a C++ compiler" in message and "train.compile=off" in message
