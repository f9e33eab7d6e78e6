"""The grafting math exactly as the authors' code (fxmeng/filter-grafting) computes it: ``graft.reference=authors``.

The paper's method is :mod:`hpcgraft.method.grafting`. The authors' code differs from it in ways that
move their published numbers (docs/method.md, "Differences from the authors' code"); researchers reproducing
those numbers need the code's arithmetic, bit for bit on CPU, not the formulas. Three of their scripts
graft, each a little differently, and each is reproduced for the models it was written for:

``grafting_cifar`` (grafting_cifar/grafting.py: ResNets, MobileNetV2)
    A loop over the state dict in order. A key containing ``conv`` gets a coefficient from its own
    entropy; every other key (BatchNorm, ``num_batches_tracked``, the linear layer, shortcut or
    downsample convs) is mixed with the coefficient of the last such key. ``num_batches_tracked`` is
    mixed as float32 and truncated back to an integer when the state is loaded.
``grafting_imagenet`` (grafting_imagenet/grafting.py)
    The same loop with the coefficient written in another order, ``round(a*atan(c*d)/pi + 1/2, 2)``,
    which can round differently from ``round(a/pi*atan(c*d) + 0.5, 2)``.
``filter_level`` (grafting_cifar/filter_level_grafting.py's ``grafting``, their VGG16 layer level)
    A loop over modules: a conv's weight gets a coefficient, every BatchNorm's weight, bias and running
    statistics take the last conv's; conv biases, linear layers and ``num_batches_tracked`` never mix.

In all three the entropy bins values with ``x < min + (i+1)*scale`` in float32, so the maximum falls
out of the histogram whenever the last edge rounds to or below it, while p still divides by all n
values; the coefficient is rounded with Python's ``round`` on a NumPy float (2 decimals); the mixing is
``u*w + v*(1-w)`` with ``w`` and ``1-w`` rounded to float32. hpcgraft's own model names differ from the
authors', so "a key containing conv" is read as what it selects in their models: every conv weight
except projection shortcuts (``shortcut``/``downsample`` modules), and any key named ``conv``.
A constant tensor, where the authors' entropy crashes (it returns the integer 0 and calls ``.cpu()``
on it), has entropy 0 here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from hpcgraft.method.groups import LayerGroup

State = Mapping[str, torch.Tensor]
CODES = ("grafting_cifar", "grafting_imagenet", "filter_level")
SHORTCUTS = ("shortcut", "downsample")


def code_for(model: str, data: str) -> str:
    """Which of the authors' scripts grafted this model: VGG at layer level in filter_level_grafting.py,
    ImageNet in grafting_imagenet/, every other CIFAR model in grafting_cifar/grafting.py."""
    if model.startswith("vgg"):
        return "filter_level"
    return "grafting_imagenet" if data.startswith("imagenet") else "grafting_cifar"


def _module(key: str) -> str:
    return key.rpartition(".")[0]


def is_conv_key(key: str, t: torch.Tensor) -> bool:
    """What ``'conv' in key`` selects in the authors' models, on any model's names."""
    if "conv" in key:
        return True
    return t.dim() == 4 and key.endswith("weight") and not any(s in _module(key).split(".") for s in SHORTCUTS)


def plan(state: State, code: str = "grafting_cifar") -> list[LayerGroup]:
    """The tensors each coefficient mixes, in state-dict order (anchors carry the coefficient)."""
    if code not in CODES:
        raise ValueError(f"unknown authors' code {code!r}; one of {', '.join(CODES)}")
    return _module_plan(state) if code == "filter_level" else _key_plan(state)


def _key_plan(state: State) -> list[LayerGroup]:
    groups: list[tuple[str, list[str]]] = []
    for key, t in state.items():
        if is_conv_key(key, t):
            groups.append((key, [key]))
        elif not groups:  # the authors' loop would use w before assigning it (NameError)
            raise ValueError(f"'{key}' comes before any conv weight: the authors' state-dict loop has no "
                             "coefficient for it")
        else:
            groups[-1][1].append(key)
    return [LayerGroup(a, tuple(m), state[a].shape[0] if state[a].dim() else 1, False) for a, m in groups]


def _module_plan(state: State) -> list[LayerGroup]:
    """Conv weights (4-D) and every BatchNorm's float tensors after them; nothing else."""
    norm_modules = {_module(k) for k in state if k.endswith("running_mean")}
    groups: list[tuple[str, list[str]]] = []
    for key, t in state.items():
        if t.dim() == 4 and key.endswith("weight"):
            groups.append((key, [key]))
        elif groups and _module(key) in norm_modules and t.is_floating_point():
            groups[-1][1].append(key)
    return [LayerGroup(a, tuple(m), state[a].shape[0], False) for a, m in groups]


# ------------------------------------------------------------------------------------------ entropy
def entropy(x: torch.Tensor, bins: int = 10) -> torch.Tensor:
    """The authors' histogram entropy of a whole tensor, as a 0-d float32 tensor on the CPU.

    The bin counts are one searchsorted pass against the same float32 edges their loop compares with
    (``min + i*scale``); p and the log are then taken bin by bin on 0-d tensors in their order, so that
    the log runs through the same scalar kernel as theirs (a vectorised log may differ in the last bit).
    """
    x = x.detach().reshape(-1)
    lo, hi = x.min(), x.max()
    scale = (hi - lo) / bins
    edges = lo + torch.arange(bins + 1, dtype=x.dtype, device=x.device) * scale
    idx = torch.searchsorted(edges, x, right=True)  # bin i+1 for edges[i] <= x < edges[i+1]
    counts = torch.bincount(idx, minlength=bins + 2)[1 : bins + 1]
    p = counts.cpu().to(torch.float32) / x.numel()
    h = None
    for k in range(bins):
        if counts[k] != 0:
            term = p[k] * torch.log(p[k])
            h = 0 - term if h is None else h - term
    return torch.zeros((), dtype=torch.float32) if h is None else h


def entropies(state: State, groups: Sequence[LayerGroup], bins: int = 10) -> list[torch.Tensor]:
    return [entropy(state[g.anchor], bins) for g in groups]


# ------------------------------------------------------------------------------------------ coefficient
def coefficient(h_self: float, h_source: float, a: float = 0.4, c: float = 500.0,
                code: str = "grafting_cifar") -> float:
    """Their coefficient: NumPy's arctan on Python floats, rounded by ``round(numpy.float64, 2)``."""
    d = float(h_self) - float(h_source)
    if code == "grafting_imagenet":
        return float(round(a * (np.arctan(c * d)) / np.pi + 1 / 2, 2))
    return float(round(a / np.pi * np.arctan(c * d) + 0.5, 2))


def coefficients(h_self: Sequence[torch.Tensor], h_source: Sequence[torch.Tensor], a: float = 0.4,
                 c: float = 500.0, code: str = "grafting_cifar") -> list[torch.Tensor]:
    """:func:`coefficient` of every group, as 0-d float64 tensors (the exchange's currency)."""
    hs = torch.stack([h.reshape(()).double() for h in h_self]).tolist() if h_self else []
    ho = torch.stack([h.reshape(()).double() for h in h_source]).tolist() if h_source else []
    return [torch.tensor(coefficient(s, o, a, c, code), dtype=torch.float64) for s, o in zip(hs, ho, strict=True)]


# ------------------------------------------------------------------------------------------ mixing
def mix_(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], alphas: Sequence[torch.Tensor]) -> None:
    """In place: target <- target*w + source*(1-w), their expression on each tensor with Python-float
    w (rounded to float32 by the kernel) and two roundings; an integer target gets the float32 result
    truncated, as ``load_state_dict`` copies it into ``num_batches_tracked``."""
    values = torch.stack([a.reshape(()) for a in alphas]).tolist() if alphas else []
    for t, s, w in zip(targets, sources, values, strict=True):
        t.copy_(t * w + s * (1 - w))
