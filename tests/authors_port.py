"""A literal port of the authors' grafting functions (fxmeng/filter-grafting), for tests only.

Written from grafting_cifar/grafting.py, grafting_cifar/filter_level_grafting.py (``grafting``, the
module loop of their VGG runs) and grafting_imagenet/grafting.py, keeping their control flow and their
arithmetic operation by operation (Python loops, 0-d tensors, NumPy coefficients, ``round``), minus the
file polling. It is deliberately slow and independent of hpcgraft.method: hpcgraft's
``graft.reference=authors`` is checked against it.

hpcgraft's models name their tensors differently from the authors' models; :class:`AuthorsNames` shows
a model under the names the authors' models give the same tensors (a conv weight's module holds
``conv``, projection shortcuts do not; ``downsample`` for torchvision's ResNets), so that their
``'conv' in key`` test selects what it selects in their code.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn


def entropy_imagenet(x: torch.Tensor, n: int = 10) -> torch.Tensor:
    """The histogram entropy of both scripts; grafting_imagenet's returns the sum as it stands (a
    tensor; the int 0 for a constant tensor, on which both callers' ``.cpu()`` then fails)."""
    x = x.reshape(-1)
    scale = (x.max() - x.min()) / n
    entropy = 0
    for i in range(n):
        p = torch.sum((x >= x.min() + i * scale) * (x < x.min() + (i + 1) * scale), dtype=torch.float) / len(x)
        if p != 0:
            entropy -= p * torch.log(p)
    return entropy


def entropy(x: torch.Tensor, n: int = 10) -> float:
    """grafting_cifar's entropy (filter_level_grafting.py has the same): the sum above, ``float(entropy.cpu())``."""
    return float(entropy_imagenet(x, n).cpu())


def grafting_cifar(net: nn.Module, checkpoint: Mapping[str, torch.Tensor], a: float = 0.4, c: int = 500) -> None:
    """grafting_cifar/grafting.py ``grafting(net, epoch)`` once the source's state dict is loaded."""
    model = collections.OrderedDict()
    for _i, (key, u) in enumerate(net.state_dict().items()):
        if 'conv' in key:
            w = round(a / np.pi * np.arctan(c * (entropy(u) - entropy(checkpoint[key]))) + 0.5, 2)
        model[key] = u * w + checkpoint[key] * (1 - w)
    net.load_state_dict(model)


def grafting_imagenet(net: nn.Module, checkpoint: Mapping[str, torch.Tensor]) -> None:
    """grafting_imagenet/grafting.py ``outside(net, epoch)`` once the source's state dict is loaded
    (a = 0.4 and c = 500 are literals there)."""
    model = collections.OrderedDict()
    for _i, (key, u) in enumerate(net.state_dict().items()):
        if 'conv' in key:
            w = round(0.4 * (np.arctan(500 * ((float(entropy_imagenet(u).cpu())  # noqa: UP034 - theirs
                                               - float(entropy_imagenet(checkpoint[key]).cpu()))))) / np.pi + 1 / 2, 2)
        model[key] = u * w + checkpoint[key] * (1 - w)
    net.load_state_dict(model)


def grafting_modules(net: nn.Module, last_net: nn.Module, a: float = 0.4, c: int = 500) -> None:
    """grafting_cifar/filter_level_grafting.py ``grafting(epoch)`` (their VGG16 layer level), with
    ``last_net`` already holding the source's weights."""
    for m1, m2 in zip(net.modules(), last_net.modules(), strict=False):
        if isinstance(m1, nn.Conv2d):
            w = round(a / np.pi * np.arctan(c * (entropy(m1.weight.data) - entropy(m2.weight.data))) + 0.5, 2)
            m1.weight.data = m1.weight.data.clone() * w + m2.weight.data.clone() * (1 - w)
        if isinstance(m1, nn.BatchNorm2d):
            m1.weight.data = m1.weight.data.clone() * w + m2.weight.data.clone() * (1 - w)
            m1.bias.data = m1.bias.data.clone() * w + m2.bias.data.clone() * (1 - w)
            m1.running_var.data = m1.running_var.data.clone() * w + m2.running_var.data.clone() * (1 - w)
            m1.running_mean.data = m1.running_mean.data.clone() * w + m2.running_mean.data.clone() * (1 - w)


# ------------------------------------------------------------------------------------------ names
def authors_name(key: str, tensor: torch.Tensor, torchvision: bool = False) -> str:
    """The name the authors' models give this tensor's role: a conv module's name holds ``conv``
    (theirs are conv1, conv2, ...), projection shortcuts' do not, torchvision calls them downsample."""
    module, _, leaf = key.rpartition(".")
    parts = module.split(".")
    if torchvision:
        parts = ["downsample" if p == "shortcut" else p for p in parts]
    if tensor.dim() == 4 and "conv" not in module and not {"shortcut", "downsample"} & set(parts):
        parts[-1] = f"{parts[-1]}_conv"
    return ".".join([*parts, leaf])


class AuthorsNames(nn.Module):
    """``model`` seen under the authors' names: its state dict comes and goes renamed, and loading goes
    through the model's own ``load_state_dict`` (which truncates a float ``num_batches_tracked``)."""

    def __init__(self, model: nn.Module, torchvision: bool = False) -> None:
        super().__init__()
        self.inner = model
        own = model.state_dict()
        self.to_authors = {k: authors_name(k, t, torchvision) for k, t in own.items()}
        self.to_ours = {v: k for k, v in self.to_authors.items()}
        assert len(self.to_ours) == len(own)

    def state_dict(self, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return collections.OrderedDict((self.to_authors[k], v) for k, v in self.inner.state_dict().items())

    def load_state_dict(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> object:  # type: ignore[override]
        return self.inner.load_state_dict({self.to_ours[k]: v for k, v in state.items()}, strict=strict)

    def rename(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return collections.OrderedDict((self.to_authors[k], v) for k, v in state.items())


def port_graft(build: Callable[[], nn.Module], own: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor],
               code: str, torchvision: bool = False) -> dict[str, torch.Tensor]:
    """The authors' ``code`` grafting ``source`` into ``own`` (hpcgraft names in and out), run on a
    fresh model from ``build``."""
    net = build()
    net.load_state_dict(own)
    if code == "filter_level":
        last = build()
        last.load_state_dict(source)
        grafting_modules(net, last)
        return {k: v.clone() for k, v in net.state_dict().items()}
    named = AuthorsNames(net, torchvision)
    graft = grafting_imagenet if code == "grafting_imagenet" else grafting_cifar
    graft(named, named.rename(source))
    return {k: v.clone() for k, v in net.state_dict().items()}
