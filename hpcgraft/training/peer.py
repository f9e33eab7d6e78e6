"""A peer: its model, optimizer, data, schedule and random streams, built from the config, and its state as
a checkpoint holds it (:meth:`Peer.state_dict` / :meth:`Peer.load_state_dict`). A rank hosts one or more
(:func:`build_peers`); nothing of a peer depends on the rank hosting it."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from hpcgraft.comm.exchange import GraftExchange
from hpcgraft.comm.failure import Watchdog
from hpcgraft.comm.logits import PeerLogits
from hpcgraft.comm.peerset import PeerSetExchange
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
from hpcgraft.text import plural
from hpcgraft.training.batched import check_batchable
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


def rng_state(device: torch.device) -> dict[str, Any]:
    """The process's random generators (torch, numpy, python; CUDA on a GPU) as a checkpoint holds them."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    rng: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": np_state[1], "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "python": {"state": np.array(py_state[1], dtype=np.int64), "version": py_state[0], "gauss": py_state[2]},
    }
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def set_rng_state(rng: dict[str, Any], device: torch.device) -> None:
    """Make ``rng`` (as :func:`rng_state` returns it, or as a checkpoint read it back) the process's state."""
    torch.set_rng_state(rng["torch"])
    n = rng["numpy"]
    np.random.set_state(("MT19937", np.asarray(n["keys"], dtype=np.uint32), int(n["pos"]), int(n["has_gauss"]),
                         float(n["cached_gaussian"])))
    p = rng["python"]
    random.setstate((int(p["version"]), tuple(int(v) for v in np.asarray(p["state"])), p["gauss"]))
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)


@dataclass
class Peer:
    """Everything one peer trains and grafts; ``index`` is its place among the run's peers."""

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
    index: int = 0  # the peer's global index (0..K-1), whichever rank hosts it
    # The peer's own random streams while another peer of its rank runs; None: the process's generators are
    # its own (the only peer of its rank, which then pays nothing for switching).
    rng: dict[str, Any] | None = None
    _compiled: nn.Module | None = field(default=None, repr=False)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Whatever draws random numbers for this peer (dropout, DGConv) draws them from its own streams."""
        if self.rng is None:
            yield
            return
        set_rng_state(self.rng, self.device)
        try:
            yield
        finally:
            self.rng = rng_state(self.device)

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
        rng = self.rng if self.rng is not None else rng_state(self.device)
        return {"model": self.model.state_dict(), "optimizer": {"momentum": momentum},
                "progress": vars(self.progress).copy(), "rng": rng,
                **({"monitor": self.monitor.state_dict()} if self.monitor is not None else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        params = dict(self.model.named_parameters())
        for name, buf in state["optimizer"]["momentum"].items():
            self.optimizer.state[params[name]]["momentum_buffer"] = buf.to(self.device)
        self.progress = Progress(**state["progress"])
        set_rng_state(state["rng"], self.device)
        if self.rng is not None:  # one of several on its rank: the streams are its own, kept aside
            self.rng = rng_state(self.device)
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
    check_batchable(cfg)
    if cfg.dist.replicas > 1 and world.per_rank > 1:
        # Horovod averages the gradients of one model per process set; several models per rank would need a
        # process set per peer and a replica group's steps in lockstep per peer.
        raise ConfigError(
            f"graft.peers={cfg.graft.peers} on {plural(world.size, 'rank')} with dist.replicas={world.replicas} puts "
            f"{world.per_rank} peers on each replica group, and replicas train one peer per group; set graft.peers="
            f"{world.size // world.replicas} (one per group), or dist.replicas=1 to host several peers per rank")
    if cfg.dist.replicas > 1:
        require_horovod(cfg.dist)


def check_peer_count(cfg: Config, peers: int, replicas: int = 1) -> None:
    """Grafting between peers and cultivation need at least 2 peers; one line saying how to start."""
    def how(per_peer: str = "") -> str:
        if cfg.graft.peers is not None:
            return "set graft.peers=K (K >= 2)"
        return f"start it with {start_ranks('K (K >= 2' + per_peer + ')')}"

    if cfg.graft.mode == "peers" and peers < 2:
        raise ConfigError(
            f"grafting between peers needs at least 2 peers but this run has {peers}; "
            f"{how(f' peers x dist.replicas={replicas}' if replicas > 1 else '')} or set graft.mode=none"
        )
    if cfg.cultivate.lambda_ > 0 and peers < 2:
        # With no other peer the distillation target is a mean over nothing: NaN losses, silently.
        raise ConfigError(
            f"cultivation (cultivate.lambda={cfg.cultivate.lambda_:g}) distils between peers and needs at least 2 "
            f"but this run has {peers}; {how()} or set cultivate.lambda=0"
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


def build_peers(cfg: Config, world: World) -> list[Peer]:
    """The peers this rank hosts (``world.local_peers``), sharing the data sets, the test loader, the replica
    group and the watchdog; with several, each keeps its random streams aside (:meth:`Peer.running`)."""
    device = select_device(cfg.dist.device, world.local_rank)
    check_compile(cfg.train.compile, device)
    if device.type == "cpu":
        torch.set_num_threads(cfg.dist.threads or torch_threads(world.local_size))
    train_set, test_set = build_datasets(cfg.data.name, cfg.data.root, cfg.data.image_size, cfg.data.reference)
    pin = device.type == "cuda"
    if pin and cfg.data.workers == 0:  # in-memory sets build their batches on the GPU (workers cannot)
        for dataset in (train_set, test_set):
            if isinstance(dataset, InMemoryImages):
                dataset.to(device)
        pin = False
    test_loader = BatchLoader(test_set, cfg.data.test_batch_size, shuffle=False, replica=world.replica,
                              replicas=world.replicas, workers=cfg.data.workers, pin_memory=pin)
    group = replica_group(world)
    watchdog = Watchdog(world.comm, cfg.dist.watchdog_s)
    peers = []
    for index in world.local_peers:
        peer = _build_one(cfg, world, index, device, train_set, test_loader, pin, group, watchdog)
        if world.per_rank > 1:
            peer.rng = rng_state(device)
        peers.append(peer)
    return peers


def build_peer(cfg: Config, world: World) -> Peer:
    """The one peer of a rank that hosts one (``world.peer``)."""
    if world.per_rank != 1:
        raise ValueError(f"this rank hosts {world.per_rank} peers; use build_peers")
    return build_peers(cfg, world)[0]


def _build_one(cfg: Config, world: World, index: int, device: torch.device, train_set: ImageSet,
               test_loader: BatchLoader, pin: bool, group: ReplicaGroup | SingleReplica, watchdog: Watchdog) -> Peer:
    num_classes = cfg.model.num_classes or train_set.num_classes
    seeding.seed_everything(seeding.derive_seed(seeding.INIT, cfg.seed, index))
    model = build_model(cfg, num_classes, device)
    check_model_fits_data(cfg, model, test_loader.dataset, device)
    if cfg.dist.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum,
                                weight_decay=cfg.train.weight_decay, nesterov=cfg.train.nesterov)
    optimizer = group.wrap_optimizer(optimizer, model)
    cultivating = cfg.cultivate.lambda_ > 0
    # Peers draw their own data order, except while cultivating: distillation compares predictions
    # on the same images.
    stream = 0 if cultivating else index
    train_loader = BatchLoader(train_set, cfg.data.batch_size, shuffle=True, seed=cfg.seed, stream=stream,
                               replica=world.replica, replicas=world.replicas, augment=cfg.data.augment,
                               workers=cfg.data.workers, pin_memory=pin,
                               keep_last=cfg.data.reference == "authors")
    schedule = LRSchedule(cfg.train, len(train_loader), index, world.peers)
    return Peer(cfg, world, device, model, optimizer, schedule, train_loader, test_loader, None,
                PeerLogits(world.graft_comm) if cultivating else None, watchdog,
                group, monitor=build_monitor(cfg, model, test_loader.dataset, device), index=index)


def make_exchange(peers: Peer | list[Peer]) -> PeerSetExchange | GraftExchange | None:
    """The grafting exchange of this rank's peers for ``graft.mode`` (None for the baseline, which never
    grafts): one peer per replica group shards its weights over the group (Horovod); otherwise the peers'
    exchange, whatever the layout."""
    peers = [peers] if isinstance(peers, Peer) else peers
    first = peers[0]
    g, world, cfg = first.cfg.graft, first.world, first.cfg
    if g.mode == "none":
        return None
    math = grafting.GraftMath.from_config(cfg)

    def source_fn(peer: Peer) -> Callable[[list[torch.Tensor]], list[torch.Tensor]] | None:
        if g.mode == "noise":
            def noise(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
                gen = seeding.generator(seeding.NOISE, cfg.seed, peer.index, peer.progress.step)
                return grafting.noise_source(tensors, gen)
            return noise
        return grafting.self_source if g.mode == "self" else None

    if world.replicas > 1:
        return first.replicas.exchange(first.model.state_dict(), source_fn(first), math, topology=g.topology,
                                       on_nonfinite=g.on_nonfinite)
    fns = [source_fn(p) for p in peers] if g.mode in ("noise", "self") else None
    return PeerSetExchange([p.model.state_dict() for p in peers], world.graft_comm, first.index, math,
                           topology=g.topology, on_nonfinite=g.on_nonfinite, source_fns=fns)
