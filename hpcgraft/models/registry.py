"""The registry of architectures by name (the architecture modules register into it, the package
imports them all; kept apart so that they need not import their own package)."""

from __future__ import annotations

import difflib
from collections.abc import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is registered twice")
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int, bn_momentum: float | None = None, **kwargs: object) -> nn.Module:
    """Build a registered model; an unknown name is an error that lists the near matches. ``bn_momentum``
    sets every BatchNorm's running-statistics momentum (None: PyTorch's 0.1)."""
    if name not in _REGISTRY:
        near = difflib.get_close_matches(name, list_models(), n=3)
        hint = f"did you mean {', '.join(near)}?" if near else f"available: {', '.join(list_models())}"
        raise ValueError(f"unknown model '{name}' (model.name); {hint}")
    model = _REGISTRY[name](num_classes=num_classes, **kwargs)
    if bn_momentum is not None:
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)):
                m.momentum = bn_momentum
    return model
