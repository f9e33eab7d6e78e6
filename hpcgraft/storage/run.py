"""A run on disk, read the same way by every command: its config, its checkpoints and its peers' models.

A run is named by its directory, its ``checkpoints`` folder, one ``checkpoints/step-*`` directory or a
``peer-NNN.h5`` file of one. Each command used to find these on its own, and the copies drifted apart (a
model rebuilt without DGConv or the BatchNorm momentum; a run without config.yaml readable by one command
and refused by the next); one reader keeps them equal:

- :func:`read_config`: ``RUN_DIR/config.yaml``, else the copy in a checkpoint's run.h5 (a run whose
  config.yaml was deleted), saying which it used (:class:`RunConfig`);
- :func:`latest` / :func:`best`: a checkpoint, passing over damaged ones for the next intact one in
  both orders (newest first; a peer's metric, highest first);
- :func:`peer_states` / :func:`model_weights`: the weights a run, a checkpoint, a peer file or a .pt
  file holds;
- :func:`build_model` / :func:`load_model`: a peer's model as training builds it (architecture, init,
  BatchNorm momentum, DGConv), with weights that do not fit named in one line.

Serial and offline: no MPI (the training ranks agree on what they read through their own collectives).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from hpcgraft.config import Config, config_from_dict, parse_override, parse_yaml
from hpcgraft.errors import CheckpointError, ConfigError, InputError
from hpcgraft.models import create_model
from hpcgraft.models.dgconv import apply_dgconv
from hpcgraft.storage import atomic
from hpcgraft.storage import checkpoints as ck
from hpcgraft.storage.checkpoints import RUN_FILE, CheckpointInfo
from hpcgraft.storage.statefile import State, load_state, load_states

CONFIG = "config.yaml"  # a run directory's resolved config, written when the run starts
CHECKPOINTS = "checkpoints"


# ------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class RunConfig:
    """A run's config and the file it was read from."""

    cfg: Config
    origin: Path  # RUN_DIR/config.yaml, or a checkpoint's run.h5 when config.yaml is gone

    @property
    def from_checkpoint(self) -> bool:
        return self.origin.name == RUN_FILE

    def where(self) -> str:
        """Where the config came from, for messages."""
        if self.from_checkpoint:
            return f"in {self.origin.parent.name}/{RUN_FILE}; its {CONFIG} is gone"
        return str(self.origin)


def parse_config(text: str | bytes) -> Config:
    """A run's config from the YAML text of config.yaml or run.h5; a ConfigError says what is wrong with
    it (the caller says where, and what to do)."""
    try:
        data = parse_yaml(text) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(" ".join(str(exc).split())) from None
    if not isinstance(data, dict):
        raise ConfigError(f"a {type(data).__name__}, not a mapping")
    return config_from_dict(data)


def with_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """``cfg`` with ``key=value`` overrides applied and validated (unknown keys are one-line errors)."""
    data = cfg.to_dict()
    for text in overrides:
        key, value = parse_override(text)
        *sections, leaf = key.split(".")
        node = data
        for name in sections:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ConfigError(f"unknown config key '{key}'")
        node[leaf] = value
    return config_from_dict(data)


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run that a config can be read from (config.yaml, or checkpoints)."""
    return (run_dir / CONFIG).is_file() or (run_dir / CHECKPOINTS).is_dir()


def run_dir_of(path: Path) -> Path | None:
    """The run directory holding ``path`` (itself, or up to two levels above a step directory), or None."""
    start = path if path.is_dir() else path.parent
    return next((d for d in [start, *start.parents][:3] if holds_run(d)), None)


def config_text(run_dir: Path) -> bytes | None:
    """The raw config.yaml of a run directory; None where it has none (a new run, or a deleted one)."""
    path = run_dir / CONFIG
    return path.read_bytes() if path.is_file() else None


def write_config(run_dir: Path, cfg: Config) -> None:
    """Record the config a run starts or continues with (atomically: a torn config.yaml never exists)."""
    atomic.write_text(run_dir / CONFIG, cfg.to_yaml())


FIX = f"restore {CONFIG}, or pass --config where the command takes one"


def read_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, fix: str = FIX) -> RunConfig | None:
    """The config the run holding ``path`` was trained with (``overrides`` applied); None for a plain
    PyTorch file, which holds weights only. ``fix``: what the error of an unreadable config advises."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist; give a run directory, a checkpoint or a peer .h5 file")
    if path.is_file() and path.suffix != ".h5":
        return None
    run_dir = run_dir_of(path)
    text = config_text(run_dir) if run_dir is not None else None
    origin = (run_dir / CONFIG) if text is not None else None
    if text is None:
        info = _config_checkpoint(path, run_dir, fix)
        text, origin = ck.load_member(info, RUN_FILE).get("config"), info.path / RUN_FILE
        if not isinstance(text, str | bytes):
            raise InputError(f"{path}: its {CONFIG} is gone and {info.path.name}/{RUN_FILE} holds no copy of it; {fix}")
    try:
        cfg = parse_config(text)
    except ConfigError as exc:
        raise InputError(f"the config in {origin} is unreadable ({exc}); {fix}") from None
    return RunConfig(with_overrides(cfg, overrides) if overrides else cfg, origin)  # a bad override: its own line


def _config_checkpoint(path: Path, run_dir: Path | None, fix: str) -> CheckpointInfo:
    """The checkpoint whose run.h5 stands in for a missing config.yaml: the one given, else the run's
    newest intact one."""
    step = path if path.is_dir() else path.parent
    try:
        if ck.is_step_dir(step) or (step / ck.MANIFEST).exists():
            m = ck.read_manifest(step)
            return CheckpointInfo(step, m["step"], m["epoch"], m["peers"])
        if run_dir is not None:
            return ck.resolve(run_dir)
    except CheckpointError as exc:
        raise InputError(f"{path}: its {CONFIG} is gone and no checkpoint holds a readable copy ({exc}); "
                         f"{fix}") from None
    raise InputError(f"{path} is neither an hpcgraft run directory nor one of its checkpoints (found no {CONFIG} "
                     "beside it and no checkpoint); give the run directory the training wrote")


# ------------------------------------------------------------------------------------------ checkpoints
def checkpoints(path: Path) -> list[CheckpointInfo]:
    """The run's complete checkpoints, newest first (manifests only; :func:`latest` and :func:`best` verify)."""
    return ck.complete_checkpoints(ck.checkpoints_root(path))


def latest(path: Path) -> CheckpointInfo:
    """A checkpoint directory, or the run's newest intact checkpoint (each newer damaged one reported)."""
    return ck.resolve(path)


def best(path: Path, peer: int) -> CheckpointInfo:
    """The intact checkpoint holding ``peer``'s best weights (its highest metric, the later of equals). A
    damaged one is reported and passed over for the peer's next best, as :func:`latest` passes over a damaged
    newest checkpoint: one bad file of another peer must not cost this peer its weights."""
    root = ck.checkpoints_root(path)
    complete = ck.complete_checkpoints(root)
    if not complete:
        raise CheckpointError(f"no complete checkpoint in {root}")
    if not 0 <= peer < complete[0].peers:
        raise CheckpointError(f"the run in {path} has peers 0..{complete[0].peers - 1}; peer {peer} does not exist")
    ranked = sorted(((c.metrics[peer], c.step, i) for i, c in enumerate(complete)
                     if peer < len(c.metrics) and c.metrics[peer] is not None), reverse=True)
    if not ranked:
        raise CheckpointError(f"no checkpoint in {root} records a metric for peer {peer} (checkpoint.keep_best=false "
                              "records none after a graft); pick one by its directory instead")
    damaged = []
    for _, _, i in ranked:
        try:
            chosen = ck.resolve(complete[i].path)
        except CheckpointError as exc:
            damaged.append(str(exc))
            continue
        for problem in damaged:
            print(f"hpcgraft: {problem}; falling back to peer {peer}'s next best, {chosen.path.name}",
                  file=sys.stderr, flush=True)
        return chosen
    raise CheckpointError(f"every checkpoint in {root} that records peer {peer}'s metric is damaged (the best: "
                          f"{damaged[0]}); restore the files, or pick a checkpoint by its directory")


def model_weights(path: str | Path) -> State:
    """One model's weights: a checkpoint's peer file (checked against its manifest, as every checkpoint
    read is), or any other .pt or HDF5 file as it is."""
    path = Path(path)
    if path.is_file() and ck.peer_of_file(path.name) is not None and (path.parent / ck.MANIFEST).exists():
        return next(iter(load_states(path).values()))
    return load_state(path)


def peer_states(path: Path, *, peer: int | None = None, use_best: bool = False) -> dict[str, State]:
    """Label -> state dict of what ``path`` holds: every peer of a run's newest checkpoint (its best per
    peer with ``use_best``), of a checkpoint directory, one peer file, or a .pt state dict."""
    if not use_best:
        return load_states(path, peer)
    if not path.is_dir() or ck.is_step_dir(path) or (path / ck.MANIFEST).exists():
        raise InputError(f"--best picks checkpoints of a run: give the run directory, not {path}")
    try:
        peers = [peer] if peer is not None else range(ck.resolve(path).peers)
        out = {}
        for p in peers:
            info = best(path, p)
            label = f"peer {p} (best: {info.path.name}, epoch {info.epoch})"
            out[label] = next(iter(load_states(info.path / ck.peer_file(p)).values()))
        return out
    except CheckpointError as exc:
        raise InputError(str(exc)) from None


# ------------------------------------------------------------------------------------------ models
def build_model(cfg: Config, num_classes: int, device: torch.device | None = None) -> nn.Module:
    """A peer's model as the run's config describes it (``model.*``: architecture, init, BatchNorm
    momentum, DGConv), initialised from the current RNG state; training and every command build it here."""
    try:
        options = {} if cfg.model.init == "kaiming" else {"init": cfg.model.init}
        model = create_model(cfg.model.name, num_classes, cfg.model.bn_momentum, **options)
        if cfg.model.dgconv:
            apply_dgconv(model, cfg.model.dgconv_init)
        return model.to(device) if device is not None else model
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def state_mismatch(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor]) -> str | None:
    """The first key (in the model's order) where ``got`` does not fit the model's state, or None."""
    for name, want in expected.items():
        if name not in got:
            return f"{name} is missing"
        have = got[name]
        if tuple(have.shape) != tuple(want.shape):
            return f"{name} has shape {tuple(have.shape)}, the model's is {tuple(want.shape)}"
    extra = next((k for k in got if k not in expected), None)
    return None if extra is None else f"{extra} is not part of the model"


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, model_name: str) -> None:
    """Load ``state`` into ``model`` strictly; anything that does not fit is one line naming the first key."""
    problem = state_mismatch(model.state_dict(), state)
    if problem:
        raise ConfigError(f"the weights of {source} do not fit model.name={model_name}: {problem}; give weights "
                          "of the same architecture and number of classes (model.num_classes)")
    model.load_state_dict(dict(state))


def classes_of(state: Mapping[str, torch.Tensor]) -> int:
    """The classes a state dict's classifier scores (its last 2-D weight), for a run that left
    ``model.num_classes`` to the data."""
    matrices = [v for v in state.values() if v.dim() == 2]
    if not matrices:
        raise InputError("the weights hold no classifier (2-D weight) to tell the number of classes; set "
                         "model.num_classes")
    return matrices[-1].shape[0]


def load_model(cfg: Config, state: Mapping[str, torch.Tensor], source: str, *, num_classes: int | None = None,
               device: torch.device | None = None) -> nn.Module:
    """:func:`build_model` with ``state`` loaded (``num_classes``: the data's, else the config's, else the
    classifier's); weights that do not fit the config are one line, not a PyTorch traceback."""
    n = num_classes or cfg.model.num_classes or classes_of(state)
    model = build_model(cfg, n, device)
    load_weights(model, {k: v.to(device) if device is not None else v for k, v in state.items()}, source,
                 cfg.model.name)
    return model
