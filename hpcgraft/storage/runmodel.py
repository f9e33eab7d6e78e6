"""The model of a run rebuilt from its config.yaml, for the offline commands that need modules, not only
state dicts (the pruning criteria rank BatchNorm scales and follow conv -> BN order)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from hpcgraft.config import Config, load_config
from hpcgraft.errors import InputError
from hpcgraft.models import create_model

CONFIG = "config.yaml"  # a run directory's resolved config (hpcgraft.training.rundir writes it)


def find_config(path: str | Path) -> Path:
    """The config.yaml of the run holding ``path``: a run directory, a checkpoint step directory, its
    ``checkpoints`` directory, or a ``peer-NNN.h5`` file."""
    path = Path(path)
    start = path if path.is_dir() else path.parent
    for d in [start, *start.parents][:3]:
        if (d / CONFIG).is_file():
            return d / CONFIG
    raise InputError(f"{path} is neither an hpcgraft run directory nor one of its checkpoints (found no {CONFIG} "
                     "beside it); give the run directory the training wrote")


def run_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    return load_config(find_config(path), overrides)


def build_model(cfg: Config, state: dict[str, torch.Tensor]) -> nn.Module:
    """The run's model with ``state`` loaded; its classes from the classifier (the last 2-D weight)."""
    num_classes = cfg.model.num_classes or [v for v in state.values() if v.dim() == 2][-1].shape[0]
    options = {} if cfg.model.init == "kaiming" else {"init": cfg.model.init}
    model = create_model(cfg.model.name, num_classes, **options)
    model.load_state_dict(state)
    return model
