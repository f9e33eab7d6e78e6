"""One rank's peer: its model, optimizer, data and schedule, built from the config, and its state as a
checkpoint holds it (:meth:`Peer.state_dict` / :meth:`Peer.load_state_dict`)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from hpcgraft.comm.exchange import GraftExchange
from hpcgraft.comm.failure import Watchdog
from hpcgraft.comm.logits import PeerLogits
from hpcgraft.comm.replicas import ReplicaGroup, SingleReplica, replica_group, require_horovod
from hpcgraft.comm.world import World, start_ranks, torch_threads
from hpcgraft.config import Config
from hpcgraft.data import BatchLoader, ImageSet, build_datasets
from hpcgraft.data.memory import InMemoryImages
from hpcgraft.errors import ConfigError
from hpcgraft.method import grafting, seeding
from hpcgraft.method.schedule import LRSchedule
from hpcgraft.models.compiled import check_compile, compile_model
from hpcgraft.storage.run import build_model
from hpcgraft.training.monitors import EarlyBirdMonitor, build_monitor


@dataclass
class Progress:
    """Where a peer is in the run; saved in checkpoints, so a resumed run continues mid-epoch."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches done in the running epoch
    step: int = 0  # optimizer steps done in the whole run
    loss_sum: float = 0.0  # running sums of the current epoch
    correct: int = 0
    seen: int = 0
    alpha_sum: float = 0.0
    grafts: int = 0
    seconds: float = 0.0

    def start_epoch(self) -> None:
        self.batch, self.loss_sum, self.correct, self.seen = 0, 0.0, 0, 0
        self.alpha_sum, self.grafts, self.seconds = 0.0, 0, 0.0


@dataclass
class Peer:
    """Everything one rank trains and grafts."""

    cfg: Config
    world: World
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    train_loader: BatchLoader
    test_loader: BatchLoader
    exchange: GraftExchange | None
    logits: PeerLogits | None
    watchdog: Watchdog
    replicas: ReplicaGroup | SingleReplica  # the peer's ranks; a no-op group when it has only this one
    progress: Progress = field(default_factory=Progress)
    graft_rows: list[dict[str, Any]] = field(default_factory=list)
    monitor: EarlyBirdMonitor | None = None  # prune.monitor: its window of masks is checkpointed
    # Called with the model after every optimizer step (the pruning command re-applies its masks there).
    after_step: list[Callable[[nn.Module], None]] = field(default_factory=list)
    _compiled: nn.Module | None = field(default=None, repr=False)

    @property
    def net(self) -> nn.Module:
        """The module the training step and the evaluation call: ``model`` compiled for ``train.compile``,
        else ``model`` itself. Its state is ``model``'s (the same tensors); everything that reads or writes
        weights goes through ``model``. Compiled at first use, and again if ``model`` was replaced."""
        if self.cfg.train.compile == "off":
            return self.model
        if self._compiled is None or getattr(self._compiled, "_orig_mod", None) is not self.model:
            self._compiled = compile_model(self.model, self.cfg.train.compile)
        return self._compiled

    def state_dict(self) -> dict[str, Any]:
        """What a peer's checkpoint holds: weights, momentum, progress and RNG states (the layout of
        every peer-NNN.h5; changing it breaks resuming older runs)."""
        names = {p: n for n, p in self.model.named_parameters()}
        momentum = {names[p]: s["momentum_buffer"] for p, s in self.optimizer.state.items()
                    if s.get("momentum_buffer") is not None}
        np_state = np.random.get_state()
        py_state = random.getstate()
        rng: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": {"keys": np_state[1], "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                      "cached_gaussian": float(np_state[4])},
            "python": {"state": np.array(py_state[1], dtype=np.int64), "version": py_state[0],
                       "gauss": py_state[2]},
        }
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"model": self.model.state_dict(), "optimizer": {"momentum": momentum},
                "progress": vars(self.progress).copy(), "rng": rng,
                **({"monitor": self.monitor.state_dict()} if self.monitor is not None else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        params = dict(self.model.named_parameters())
        for name, buf in state["optimizer"]["momentum"].items():
            self.optimizer.state[params[name]]["momentum_buffer"] = buf.to(self.device)
        self.progress = Progress(**state["progress"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        n = rng["numpy"]
        np.random.set_state(("MT19937", np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
        p = rng["python"]
        random.setstate((p["version"], tuple(int(v) for v in np.asarray(p["state"])), p["gauss"]))
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        if self.monitor is not None and "monitor" in state:
            self.monitor.load_state_dict(state["monitor"])


def select_device(pref: str, local_rank: int) -> torch.device:
    """GPU of the local rank when there are GPUs (and not ``dist.device=cpu``), else the CPU."""
    if pref == "cuda" and not torch.cuda.is_available():
        raise ConfigError("dist.device=cuda but no CUDA device is visible; use dist.device=auto or cpu")
    if pref != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def check_layout(cfg: Config, world: World) -> None:
    """The run's rank count fits what the config asks of it (decided before any MPI work on the peers)."""
    check_peer_count(cfg, world.peers, world.replicas)
    if cfg.dist.replicas > 1:
        require_horovod(cfg.dist)


def check_peer_count(cfg: Config, peers: int, replicas: int = 1) -> None:
    """Grafting between peers and cultivation need at least 2 peers; one line saying how to start."""
    if cfg.graft.mode == "peers" and peers < 2:
        raise ConfigError(
            f"grafting between peers needs at least 2 peers but this run has {peers}; start it with "
            f"{start_ranks('K (K >= 2' + (f' peers x dist.replicas={replicas}' if replicas > 1 else '') + ')')} "
            "or set graft.mode=none"
        )
    if cfg.cultivate.lambda_ > 0 and peers < 2:
        # With no other peer the distillation target is a mean over nothing: NaN losses, silently.
        raise ConfigError(
            f"cultivation (cultivate.lambda={cfg.cultivate.lambda_:g}) distils between peers and needs at least 2 "
            f"but this run has {peers}; start it with {start_ranks('K (K >= 2)')} or set cultivate.lambda=0"
        )


@torch.no_grad()
def check_model_fits_data(cfg: Config, model: nn.Module, data: ImageSet, device: torch.device) -> None:
    """A model with too few outputs or the wrong input channels fails only at the first step, on each rank
    at its own moment (an IndexError deep in the loss, or a message lost to the abort); one image through
    the model in eval mode (no statistics updated, no randomness drawn) decides it before training."""
    need = data.num_classes
    if cfg.model.num_classes is not None and cfg.model.num_classes < need:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} is fewer than the {need} classes of "
                          f"data.name={cfg.data.name}; set model.num_classes>={need} or leave it unset")
    if len(data) == 0:
        return
    x, _ = data.get_batch(torch.zeros(1, dtype=torch.int64), None)
    was_training = model.training
    model.eval()
    try:
        out = model(x.to(device))
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"model.name={cfg.model.name} does not take the images of data.name={cfg.data.name} "
                          f"(shape {tuple(x.shape[1:])}): {first}; pick a model made for this data") from None
    finally:
        model.train(was_training)
    if out.dim() != 2 or out.shape[1] < need:
        raise ConfigError(f"model.name={cfg.model.name} gives outputs of shape {tuple(out.shape[1:])} for "
                          f"data.name={cfg.data.name} with {need} classes; pick a model made for this data")


def build_peer(cfg: Config, world: World) -> Peer:
    device = select_device(cfg.dist.device, world.local_rank)
    check_compile(cfg.train.compile, device)
    if device.type == "cpu":
        torch.set_num_threads(cfg.dist.threads or torch_threads(world.local_size))
    train_set, test_set = build_datasets(cfg.data.name, cfg.data.root, cfg.data.image_size, cfg.data.reference)
    num_classes = cfg.model.num_classes or train_set.num_classes
    seeding.seed_everything(seeding.derive_seed(seeding.INIT, cfg.seed, world.peer))
    model = build_model(cfg, num_classes, device)
    check_model_fits_data(cfg, model, test_set, device)
    if cfg.dist.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum,
                                weight_decay=cfg.train.weight_decay, nesterov=cfg.train.nesterov)
    group = replica_group(world)
    optimizer = group.wrap_optimizer(optimizer, model)
    cultivating = cfg.cultivate.lambda_ > 0
    # Peers draw their own data order, except while cultivating: distillation compares predictions
    # on the same images.
    stream = 0 if cultivating else world.peer
    pin = device.type == "cuda"
    if pin and cfg.data.workers == 0:  # in-memory sets build their batches on the GPU (workers cannot)
        for dataset in (train_set, test_set):
            if isinstance(dataset, InMemoryImages):
                dataset.to(device)
        pin = False
    train_loader = BatchLoader(train_set, cfg.data.batch_size, shuffle=True, seed=cfg.seed, stream=stream,
                               replica=world.replica, replicas=world.replicas, augment=cfg.data.augment,
                               workers=cfg.data.workers, pin_memory=pin,
                               keep_last=cfg.data.reference == "authors")
    test_loader = BatchLoader(test_set, cfg.data.test_batch_size, shuffle=False, replica=world.replica,
                              replicas=world.replicas, workers=cfg.data.workers, pin_memory=pin)
    schedule = LRSchedule(cfg.train, len(train_loader), world.peer, world.peers)
    return Peer(cfg, world, device, model, optimizer, schedule, train_loader, test_loader, None,
                PeerLogits(world.graft_comm) if cultivating else None, Watchdog(world.comm, cfg.dist.watchdog_s),
                group, monitor=build_monitor(cfg, model, test_set, device))


def make_exchange(peer: Peer) -> GraftExchange | None:
    """The peer's grafting exchange for ``graft.mode`` (None for the baseline, which never grafts)."""
    g, world = peer.cfg.graft, peer.world
    if g.mode == "none":
        return None
    source_fn = None
    if g.mode == "noise":
        def source_fn(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
            gen = seeding.generator(seeding.NOISE, peer.cfg.seed, world.peer, peer.progress.step)
            return grafting.noise_source(tensors, gen)
    elif g.mode == "self":
        source_fn = grafting.self_source
    return peer.replicas.exchange(peer.model.state_dict(), source_fn, grafting.GraftMath.from_config(peer.cfg),
                                  topology=g.topology, on_nonfinite=g.on_nonfinite)
