"""Batched peers (hpcgraft.training.batched): P models stepped together equal P models stepped one after
another (plain forward, cross entropy, backward, torch.optim.SGD.step) to float tolerance, in their
parameters, BatchNorm buffers and momentum, for every model the batched path claims to support."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hpcgraft.config import load_config
from hpcgraft.errors import ConfigError
from hpcgraft.method.cultivation import distillation_loss, mean_of_others
from hpcgraft.models import create_model
from hpcgraft.training.batched import BATCHABLE_MODELS, BatchedPeers, check_batchable, cultivation_loss

SHAPES = {"digits_resnet": (1, 8, 8)}  # the rest: CIFAR-shaped images (the ImageNet nets take them too)
# Float32 agrees to rounding for a few steps on the digits net; the CIFAR nets at initialisation amplify any
# rounding difference (a 1e-7 relative nudge of the weights moves some BatchNorm biases by 10% within three
# sequential steps), so they are compared in float64, where the two paths must agree to ~1e-12.
TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-5}, torch.float64: {"rtol": 1e-9, "atol": 1e-11}}


def sgd(models: list[nn.Module], nesterov: bool) -> list[torch.optim.SGD]:
    return [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
            for m in models]


def peers(name: str, count: int, nesterov: bool = False, channels_last: bool = False,  # noqa: ANN201
          dtype: torch.dtype = torch.float32):
    """The same P freshly initialised models twice, with optimizers: one set to batch, one to step alone."""
    torch.manual_seed(0)
    models = [create_model(name, 10, bn_momentum=0.3).to(dtype) for _ in range(count)]
    if channels_last:
        models = [m.to(memory_format=torch.channels_last) for m in models]
    alone = [copy.deepcopy(m) for m in models]
    return models, sgd(models, nesterov), alone, sgd(alone, nesterov)


def batches(name: str, count: int, size: int, step: int, dtype: torch.dtype = torch.float32,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return (torch.randn(count, size, *SHAPES.get(name, (3, 32, 32)), generator=gen, dtype=dtype),
            torch.randint(0, 10, (count, size), generator=gen))


def set_lrs(optimizers: list[torch.optim.SGD], step: int) -> None:
    """A different learning rate per peer and step, as train.dlr and the schedules give."""
    for i, opt in enumerate(optimizers):
        opt.param_groups[0]["lr"] = 0.1 / (1 + i) / (1 + step)


def step_alone(models, optimizers, x, y, smoothing: float = 0.0, extra=None, hook=None) -> list[torch.Tensor]:  # noqa: ANN001
    """Each peer's step on its own, as the sequential loop takes it; ``extra(i, everyone, own)`` adds a
    loss term from all peers' logits, ``hook(model)`` runs between backward and the update."""
    logits = [m.train()(x[i]) for i, m in enumerate(models)]
    everyone = torch.stack([z.detach() for z in logits])
    losses = []
    for i, (model, opt, z) in enumerate(zip(models, optimizers, logits, strict=True)):
        loss = F.cross_entropy(z, y[i], label_smoothing=smoothing)
        if extra is not None:
            loss = loss + extra(i, everyone, z)
        opt.zero_grad()
        loss.backward()
        if hook is not None:
            hook(model)
        opt.step()
        losses.append(loss.detach())
    return losses


def assert_same_state(batched, optimizers, alone, alone_optimizers, tolerance=TOL) -> None:  # noqa: ANN001
    tol = lambda t: tolerance.get(t.dtype, {"rtol": 0, "atol": 0})  # noqa: E731 - num_batches_tracked: exactly
    for model, opt, ref, ref_opt in zip(batched, optimizers, alone, alone_optimizers, strict=True):
        got, want = model.state_dict(), ref.state_dict()  # parameters and every BatchNorm buffer
        assert list(got) == list(want)
        for key in want:
            torch.testing.assert_close(got[key], want[key], **tol(want[key]), msg=lambda m, key=key: f"{key}: {m}")
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"], **tol(p))



@pytest.mark.parametrize(("name", "count", "nesterov", "dtype"), [
    ("digits_resnet", 2, False, torch.float32), ("digits_resnet", 4, True, torch.float32),
    ("resnet20", 2, True, torch.float64), ("resnet20", 4, False, torch.float64)])
def test_batched_steps_equal_sequential_steps(name, count, nesterov, dtype):
    models, opts, alone, alone_opts = peers(name, count, nesterov, dtype=dtype)
    batched = BatchedPeers(models, opts)
    for step in range(3):
        x, y = batches(name, count, 4, step, dtype)
        set_lrs(opts, step)
        set_lrs(alone_opts, step)
        losses, logits = batched.step(list(x), list(y), label_smoothing=0.1)
        want = step_alone(alone, alone_opts, x, y, smoothing=0.1)
        torch.testing.assert_close(losses, torch.stack(want), **TOL[dtype])
        assert logits.shape == (count, 4, 10)
    assert_same_state(models, opts, alone, alone_opts)
    assert int(models[0].state_dict()["bn1.num_batches_tracked"]) == 3
    # The BatchNorm statistics really moved per peer (not one shared set): the peers saw different images.
    assert not torch.equal(models[0].bn1.running_mean, models[1].bn1.running_mean)


def bn_l1(model: nn.Module) -> None:
    """A gradient change between backward and the update (as prune.bn_l1 makes)."""
    model.bn1.weight.grad.add_(torch.sign(model.bn1.weight.detach()), alpha=0.01)


def test_the_models_are_the_batched_state():
    """Whatever changes a model in place between steps (a graft, a checkpoint load, new momentum tensors) is
    what the next batched step trains; the models' gradients are filled in for a hook before the update,
    even after the loop's zero_grad (which drops them); the optimizers hold the momentum a checkpoint reads."""
    models, opts, alone, alone_opts = peers("digits_resnet", 2)
    batched = BatchedPeers(models, opts)
    for step in range(3):
        x, y = batches("digits_resnet", 2, 4, step)
        batched.step(x, y, before_update=lambda: [bn_l1(m) for m in models])
        step_alone(alone, alone_opts, x, y, hook=bn_l1)
        with torch.no_grad():
            for side in (models, alone):
                side[1].conv1.weight.mul_(0.5)  # a "graft" of peer 1
                side[0].load_state_dict(copy.deepcopy(side[0].state_dict()))
            for opt in (opts[1], alone_opts[1]):  # a checkpoint's momentum, loaded as Peer.load_state_dict does
                for state in opt.state.values():
                    state["momentum_buffer"] = state["momentum_buffer"] * 0.5
        opts[step % 2].zero_grad()
    assert_same_state(models, opts, alone, alone_opts)


def test_cultivation_distils_towards_the_other_peers():
    models, opts, alone, alone_opts = peers("digits_resnet", 3)
    batched = BatchedPeers(models, opts)

    def distil(i: int, everyone: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        return 0.5 * distillation_loss(own.float(), mean_of_others(everyone, i, 3.0), 3.0)

    for step in range(2):
        x, y = batches("digits_resnet", 3, 4, step)
        x, y = x[:1].expand_as(x), y[:1].expand_as(y)  # cultivating peers see the same batch
        losses, _ = batched.step(x, y, extra_loss=cultivation_loss(lambda z: z, [0, 1, 2], 0.5, 3.0))
        want = step_alone(alone, alone_opts, x, y, extra=distil)
        torch.testing.assert_close(losses, torch.stack(want), **TOL[torch.float32])
    assert_same_state(models, opts, alone, alone_opts)


def test_channels_last_weights_stay_channels_last():
    models, opts, alone, alone_opts = peers("digits_resnet", 2, channels_last=True)
    BatchedPeers(models, opts).step(*batches("digits_resnet", 2, 4, 0))
    step_alone(alone, alone_opts, *batches("digits_resnet", 2, 4, 0))
    assert models[1].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert_same_state(models, opts, alone, alone_opts)


LARGE = ("resnet110", "resnet18", "resnet34", "resnet50", "vgg16_bn", "mobilenetv2_ref")  # seconds each on a CPU


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in LARGE else n
                                  for n in BATCHABLE_MODELS if n not in ("digits_resnet", "resnet20")])
def test_every_batchable_model_batches(name):
    """One step of two peers on two images: the models the config accepts for train.batched do batch. On two
    32-pixel images the ImageNet nets end in BatchNorms over two values, whose gradients magnify rounding a
    millionfold: float64, compared to 1e-6."""
    models, opts, alone, alone_opts = peers(name, 2, dtype=torch.float64)
    BatchedPeers(models, opts).step(*batches(name, 2, 2, 0, torch.float64))
    step_alone(alone, alone_opts, *batches(name, 2, 2, 0, torch.float64))
    assert_same_state(models, opts, alone, alone_opts, {torch.float64: {"rtol": 1e-6, "atol": 1e-6}})


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.name=resnet18", "model.dgconv=true"], "train.batched=true cannot batch DGConv layers (model.dgconv=true)"),
    (["dist.replicas=2"], "train.batched=true does not run with dist.replicas=2"),
    (["train.compile=default"], "train.batched=true does not run with train.compile=default"),
    (["model.name=convnext"], "train.batched=true cannot batch model.name=convnext; use train.batched=false or one "
                              "of: digits_resnet, resnet20"),
])
def test_what_cannot_batch_is_refused_in_one_line(overrides, message):
    cfg = load_config(None, ["train.batched=true", *overrides])
    with pytest.raises(ConfigError) as info:
        check_batchable(cfg)
    assert message in str(info.value) and "\n" not in str(info.value)
    check_batchable(load_config(None, overrides))  # without train.batched, none of this matters here
