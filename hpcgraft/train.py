"""Training loop: K peers, one per MPI rank (or R ranks per peer), grafting at fixed points.

    mpirun -np 2 python -m hpcgraft.train --config configs/digits.yaml --out runs/digits [key=value ...]

The story of a run, top to bottom in :func:`run`: agree on the config, build data and model, resume
from the last complete checkpoint if there is one, then for every epoch train, graft, evaluate,
report and checkpoint. SIGUSR1/SIGTERM stop every rank at the same step after a checkpoint
(exit status 75, for schedulers to requeue).
"""

from __future__ import annotations

if __name__ == "__main__":  # before MPI and torch are imported: under a launcher, become the rank's supervisor
    from hpcgraft.supervise import supervise_module

    supervise_module("hpcgraft.train")

import argparse
import contextlib
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

from hpcgraft import comm as hcomm
from hpcgraft import grafting, seeding
from hpcgraft import replicas as hreplicas
from hpcgraft.checkpoint import CheckpointError
from hpcgraft.config import Config, ConfigError, config_from_dict, load_config
from hpcgraft.cultivation import PeerLogits, distillation_loss, mean_of_others
from hpcgraft.data import BatchLoader, DataError, build_datasets
from hpcgraft.data.memory import InMemoryImages
from hpcgraft.exchange import GraftExchange, NonFiniteWeightsError
from hpcgraft.metrics import GRAFTS, METRICS, RunLog, epoch_table, read_jsonl
from hpcgraft.models import create_model
from hpcgraft.schedule import LRSchedule

EXIT_USAGE = 2


class SetupError(hcomm.AgreedError):
    """A problem found while setting up, already agreed on by every rank: one line, exit status 2."""


class RunError(hcomm.AgreedError):
    """A failure every rank found at the same point of training (NaN weights with graft.on_nonfinite=stop):
    one line, exit status 1, and no abort, since no rank is left waiting."""


# ------------------------------------------------------------------------------------------ command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m hpcgraft.train",
        description="Train K peer networks with filter grafting; one MPI rank per peer "
        "(mpirun -np K python -m hpcgraft.train ...).",
        epilog="Overrides: dotted config keys, e.g. train.epochs=3 graft.level=filter graft.mode=none",
    )
    p.add_argument("--config", help="YAML run config (default: the built-in digits defaults)")
    p.add_argument("--out", help="run directory (default: runs/<config name>); re-running resumes it")
    p.add_argument("--restart", action="store_true", help="start over, discarding the run in --out")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of every rank; returns the process exit status."""
    hcomm.catch_stop_signals()
    args = parse_args(argv)
    world_comm = MPI.COMM_WORLD
    try:
        with hcomm.abort_on_error(world_comm):
            return run(args, world_comm)
    except (SetupError, RunError) as exc:
        if world_comm.Get_rank() == 0:
            print(f"hpcgraft: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE if isinstance(exc, SetupError) else hcomm.EXIT_FAILURE


# ------------------------------------------------------------------------------------------ setup stages
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, DataError, hcomm.LayoutError, hcomm.PeerMismatchError, FileNotFoundError, CheckpointError,
)


def agreed(comm: MPI.Comm, fn: Callable[[], Any]) -> Any:
    """Run a setup step on every rank; if it fails on any, all ranks raise the same SetupError.

    Setup errors (a bad key, missing data on one node) must end the job with one clear line, not an
    abort on one rank and a hang on the others.
    """
    try:
        result, error = fn(), None
    except USER_ERRORS as exc:
        result, error = None, str(exc)
    errors = comm.allgather(error)
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        messages = {e for _, e in failed}
        if len(messages) == 1 and len(failed) == len(errors):
            raise SetupError(failed[0][1])
        raise SetupError(f"rank {failed[0][0]}: {failed[0][1]}")
    return result


def select_device(pref: str, local_rank: int) -> torch.device:
    """GPU of the local rank when there are GPUs (and not ``dist.device=cpu``), else the CPU."""
    if pref == "cuda" and not torch.cuda.is_available():
        raise ConfigError("dist.device=cuda but no CUDA device is visible; use dist.device=auto or cpu")
    if pref != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------ peer state
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
    world: hcomm.World
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    train_loader: BatchLoader
    test_loader: BatchLoader
    exchange: GraftExchange | None
    logits: PeerLogits | None
    watchdog: hcomm.Watchdog
    replicas: hreplicas.ReplicaGroup | None = None  # the peer's other ranks, when it spans several (Horovod)
    progress: Progress = field(default_factory=Progress)
    graft_rows: list[dict[str, Any]] = field(default_factory=list)


def build_peer(cfg: Config, world: hcomm.World) -> Peer:
    device = select_device(cfg.dist.device, world.local_rank)
    if device.type == "cpu":
        torch.set_num_threads(cfg.dist.threads or hcomm.torch_threads(world.local_size))
    train_set, test_set = build_datasets(cfg.data.name, cfg.data.root, cfg.data.image_size)
    num_classes = cfg.model.num_classes or train_set.num_classes
    seeding.seed_everything(seeding.derive_seed(seeding.INIT, cfg.seed, world.peer))
    try:
        model = create_model(cfg.model.name, num_classes).to(device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.dist.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum,
                                weight_decay=cfg.train.weight_decay, nesterov=cfg.train.nesterov)
    group = hreplicas.ReplicaGroup(world) if world.replicas > 1 else None
    if group is not None:
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
                               workers=cfg.data.workers, pin_memory=pin)
    test_loader = BatchLoader(test_set, cfg.data.test_batch_size, shuffle=False, replica=world.replica,
                              replicas=world.replicas, workers=cfg.data.workers, pin_memory=pin)
    schedule = LRSchedule(cfg.train, len(train_loader), world.peer, world.peers)
    return Peer(cfg, world, device, model, optimizer, schedule, train_loader, test_loader, None,
                PeerLogits(world.graft_comm) if cultivating else None,
                hcomm.Watchdog(world.comm, cfg.dist.watchdog_s), group)


def make_exchange(peer: Peer) -> GraftExchange | None:
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
    options: dict[str, Any] = dict(topology=g.topology, level=g.level, a=g.a, c=g.c, bins=g.bins,
                                   round_alpha=g.round_alpha, on_nonfinite=g.on_nonfinite)
    if world.replicas > 1 and source_fn is None:  # each replica moves its share of the peer's weights
        return hreplicas.ShardedGraftExchange(peer.model.state_dict(), world.graft_comm, world.peer_comm, **options)
    return GraftExchange(peer.model.state_dict(), world.graft_comm, source_fn=source_fn, **options)


def check_layout(cfg: Config, world: hcomm.World) -> None:
    if cfg.graft.mode == "peers" and world.peers < 2:
        raise ConfigError(
            f"grafting between peers needs at least 2 peers but this run has {world.peers}; start it with "
            f"mpirun -np K (K >= 2{f' peers x dist.replicas={world.replicas}' if world.replicas > 1 else ''}) "
            "or set graft.mode=none"
        )
    if cfg.cultivate.lambda_ > 0 and world.peers < 2:
        # With no other peer the distillation target is a mean over nothing: NaN losses, silently.
        raise ConfigError(
            f"cultivation (cultivate.lambda={cfg.cultivate.lambda_:g}) distils between peers and needs at least 2 "
            f"but this run has {world.peers}; start it with mpirun -np K (K >= 2) or set cultivate.lambda=0"
        )
    if cfg.dist.replicas > 1:
        hreplicas.require_horovod(cfg)


# ------------------------------------------------------------------------------------------ the run
def run(args: argparse.Namespace, comm: MPI.Comm) -> int:
    cfg: Config = agreed(comm, lambda: load_config(args.config, args.overrides))
    world: hcomm.World = agreed(comm, lambda: hcomm.init_world(cfg.dist.replicas, comm))
    agreed(comm, lambda: check_layout(cfg, world))
    peer: Peer = agreed(comm, lambda: build_peer(cfg, world))
    signature = grafting.plan_signature(grafting.plan_layers(peer.model.state_dict()), peer.model.state_dict())
    agreed(comm, lambda: hcomm.check_peers_agree(comm, cfg.flat(), signature))
    peer.exchange = make_exchange(peer)
    run_dir = Path(args.out or f"runs/{Path(args.config).stem if args.config else 'digits'}")
    store = agreed(comm, lambda: RunStore(run_dir, cfg, peer, restart=args.restart))
    store.record_config()  # after the agreement above: no rank is still reading the old config
    log = RunLog(run_dir) if world.is_root else None

    t = cfg.train
    hcomm.log(f"hpcgraft: {world.peers} peers x {world.replicas} replica(s), model {cfg.model.name}, data "
              f"{cfg.data.name} ({len(peer.train_loader)} steps/epoch), graft {cfg.graft.mode}"
              f"{'' if cfg.graft.mode == 'none' else f'/{cfg.graft.topology}/{cfg.graft.level}'}, "
              f"cultivate {f'lambda={cfg.cultivate.lambda_:g}' if peer.logits else 'off'}, "
              f"device {peer.device}, run dir {run_dir}", world=world)
    # Launchers and the kernel name processes by pid and host only (MPICH's report, dmesg's OOM lines).
    pids = comm.allgather(f"{os.getpid()}@{MPI.Get_processor_name()}")
    hcomm.log(f"hpcgraft: rank pids: {' '.join(f'{r}={p}' for r, p in enumerate(pids))}", world=world)
    agreed(comm, lambda: store.resume(peer))
    if peer.replicas is not None:  # every replica starts (or resumes) from replica 0's state
        peer.replicas.broadcast_state(peer.model, peer.optimizer)
    stop = hcomm.StopRequest(comm)
    header = True
    while peer.progress.epoch < t.epochs:
        if peer.progress.batch == 0:
            peer.progress.start_epoch()
        stopped = train_one_epoch(peer, stop)
        if stopped:
            if log:  # grafts of the running epoch so far (graft.interval_steps), before the checkpoint covers them
                log.append(GRAFTS, peer.graft_rows)
            peer.graft_rows = []
            store.save(peer)
            stop.close()
            hcomm.log(f"hpcgraft: stopped by signal at epoch {peer.progress.epoch + 1}, step {peer.progress.step}; "
                      f"checkpoint written, exit {hcomm.EXIT_REQUEUE} (re-run the same command to resume)",
                      world=world)
            if log:
                log.status(state="stopped", epoch=peer.progress.epoch, step=peer.progress.step)
            return hcomm.EXIT_REQUEUE
        peer.progress.epoch += 1
        peer.progress.batch = 0
        row, ensemble = evaluate(peer)
        last = peer.progress.epoch == t.epochs
        # As in the reference: evaluate, then graft at the epoch end. The last epoch ends without a graft,
        # whose result would be neither trained nor evaluated.
        if cfg.graft.mode != "none" and cfg.graft.interval_steps == 0 and not last:
            graft(peer)
        row["alpha_mean"] = peer.progress.alpha_sum / peer.progress.grafts if peer.progress.grafts else None
        with peer.watchdog.guard("report: gather of metrics"):
            rows = world.graft_comm.gather(row, root=0) if world.is_peer_lead else None
        if log and rows:
            log.append(METRICS, rows + [{"epoch": peer.progress.epoch, "peer": None, "step": peer.progress.step,
                                         "ensemble_acc": ensemble}])
            log.append(GRAFTS, peer.graft_rows)
            print(epoch_table(rows, ensemble, t.epochs, cfg.log.thresholds, header), flush=True)
            log.status(state="running", epoch=peer.progress.epoch, step=peer.progress.step)
            header = False
        peer.graft_rows = []
        if last or peer.progress.epoch % cfg.checkpoint.interval == 0:
            store.save(peer, metric=row["test_acc"])
    stop.close()
    if log:
        log.status(state="finished", epoch=peer.progress.epoch, step=peer.progress.step)
    hcomm.log(f"hpcgraft: finished {t.epochs} epochs; metrics in {run_dir / METRICS}", world=world)
    return 0


# ------------------------------------------------------------------------------------------ one epoch
def train_one_epoch(peer: Peer, stop: hcomm.StopRequest) -> bool:
    """Train until the epoch ends (False) or a stop was requested (True, mid-epoch)."""
    cfg, prog, model = peer.cfg, peer.progress, peer.model
    model.train()
    # Continues the epoch's sum (rather than adding a new one to it), so a resumed epoch sums bit for bit alike.
    loss_sum = torch.tensor(prog.loss_sum, dtype=torch.float64, device=peer.device)
    correct = torch.zeros((), dtype=torch.int64, device=peer.device)
    started = time.perf_counter()
    bar = _progress_bar(peer)
    stopped = False
    for x, y in peer.train_loader.epoch(prog.epoch, start=prog.batch):
        lr = peer.schedule(prog.step)
        for group in peer.optimizer.param_groups:
            group["lr"] = lr
        x = x.to(peer.device, non_blocking=True)
        y = y.to(peer.device, non_blocking=True)
        if cfg.dist.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(peer, x):
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.train.label_smoothing)
            if peer.logits is not None:
                with peer.watchdog.guard("cultivation: Allgather of logits"):
                    everyone = peer.logits.gather(logits)
                target = mean_of_others(everyone, peer.world.peer, cfg.cultivate.temperature)
                loss = loss + cfg.cultivate.lambda_ * distillation_loss(logits.float(), target,
                                                                        cfg.cultivate.temperature)
        peer.optimizer.zero_grad()  # sets the gradients to None (Horovod's optimizer takes no arguments here)
        loss.backward()
        peer.optimizer.step()
        loss_sum.add_(loss.detach(), alpha=len(y))  # in float64, on the device: no sync
        correct += (logits.detach().argmax(1) == y).sum()
        prog.seen += len(y)
        prog.batch += 1
        prog.step += 1
        if peer.replicas is not None:
            peer.replicas.check_step(model, peer.optimizer, prog.step)
        inject_fault(peer)
        if bar is not None:
            bar.update(1)
        if cfg.graft.mode != "none" and cfg.graft.interval_steps and prog.step % cfg.graft.interval_steps == 0:
            graft(peer)
        with peer.watchdog.guard("training step: Iallreduce of the stop flag"):
            stopped = stop.poll()
        if stopped:
            break
    if bar is not None:
        bar.close()
    sync_replicas(peer)
    prog.loss_sum = float(loss_sum)
    prog.correct += int(correct)
    prog.seconds += time.perf_counter() - started
    return stopped


def autocast(peer: Peer, x: torch.Tensor) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU with ``dist.amp``; otherwise no context at all (even a disabled one costs
    microseconds per step)."""
    if peer.cfg.dist.amp and x.is_cuda:
        return torch.autocast(x.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# Test hook: HPCGRAFT_INJECT="RANK:STEP:WHAT[,...]" makes world rank RANK, right after optimizer step STEP,
# raise an exception (WHAT=raise), stall (sleep), fill its first weight tensor with NaN (nan) or send itself
# SIGUSR1 or SIGTERM (usr1, term). tests/test_resume.py causes failures at an exact point with it; unset, it
# does nothing.
_INJECT = os.environ.get("HPCGRAFT_INJECT", "")


def inject_fault(peer: Peer) -> None:
    for item in filter(None, _INJECT.split(",")):
        rank, step, what = item.split(":")
        if int(rank) != peer.world.rank or int(step) != peer.progress.step:
            continue
        if what == "raise":
            raise RuntimeError(f"injected failure at step {step} (HPCGRAFT_INJECT)")
        if what == "sleep":
            time.sleep(3600)
        elif what == "nan":
            with torch.no_grad():
                next(peer.model.parameters()).fill_(float("nan"))
        elif what in ("usr1", "term"):
            os.kill(os.getpid(), signal.SIGUSR1 if what == "usr1" else signal.SIGTERM)
        else:
            raise ValueError(f"HPCGRAFT_INJECT: unknown fault {what!r}; use raise, sleep, nan, usr1 or term")


def _progress_bar(peer: Peer):  # noqa: ANN202 - tqdm or None
    mode = peer.cfg.log.progress
    if not peer.world.is_root or mode == "off" or (mode == "auto" and not sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=len(peer.train_loader), initial=peer.progress.batch, leave=False, dynamic_ncols=True,
                desc=f"epoch {peer.progress.epoch + 1}/{peer.cfg.train.epochs}", file=sys.stderr)


def sync_replicas(peer: Peer) -> None:
    """A peer's replicas average their BatchNorm statistics (local between syncs) before anything reads
    the peer as a whole: a graft, an evaluation, a checkpoint."""
    if peer.replicas is not None:
        peer.replicas.sync_buffers(peer.model, peer.progress.step)
        peer.replicas.check_synced(peer.model, peer.optimizer, f"buffer sync at step {peer.progress.step}")


def graft(peer: Peer) -> None:
    """One grafting round with the other peers; its report goes to graft.jsonl via rank 0."""
    assert peer.exchange is not None
    sync_replicas(peer)
    prog, world = peer.progress, peer.world
    started = time.perf_counter()
    try:
        result = peer.exchange.graft(on_wait=peer.watchdog.guard)
    except NonFiniteWeightsError as exc:  # raised on every rank alike, after the same allgather
        raise RunError(f"grafting at step {prog.step}: {exc}") from None
    seconds = time.perf_counter() - started  # the whole round, waiting for slower peers included
    if peer.replicas is not None:
        peer.replicas.check_synced(peer.model, peer.optimizer, f"graft at step {prog.step}")
    epoch = prog.epoch if prog.batch == 0 else prog.epoch + 1  # at an epoch end, ``epoch`` is already counted
    row: dict[str, Any] = {"epoch": epoch, "step": prog.step, "peer": world.peer,
                           "source": _source_name(peer), "mode": peer.cfg.graft.mode, "seconds": seconds}
    if result.report is None:
        row.update(skipped=result.skipped_reason, nonfinite_peers=list(result.nonfinite_peers))
        hcomm.log(f"hpcgraft: peer {world.peer} skipped grafting at step {prog.step}: {result.skipped_reason}",
                  world=world, all_ranks=True)
    else:
        row.update(result.report.to_dict())
        prog.alpha_sum += result.report.alpha_mean
        prog.grafts += 1
    with peer.watchdog.guard("report: gather of graft reports"):
        rows = world.graft_comm.gather(row, root=0) if world.is_peer_lead else None
    if world.is_root and rows:
        peer.graft_rows.extend(rows)


def _source_name(peer: Peer) -> str:
    g = peer.cfg.graft
    if g.mode != "peers":
        return g.mode
    return f"peer {(peer.world.peer - 1) % peer.world.peers}" if g.topology == "ring" else "mean of others"


@torch.no_grad()
def evaluate(peer: Peer) -> tuple[dict[str, Any], float]:
    """This peer's metrics row for the epoch (test accuracy, train statistics, invalid filters) and the
    ensemble's accuracy (mean of the peers' softmax)."""
    model, world, prog = peer.model, peer.world, peer.progress
    model.eval()
    probs, labels = [], []
    for x, y in peer.test_loader.epoch(0):
        x = x.to(peer.device, non_blocking=True)
        if peer.cfg.dist.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(peer, x):
            probs.append(F.softmax(model(x).float(), dim=1).cpu())
        labels.append(y.cpu())
    p = torch.cat(probs) if probs else torch.zeros(0, 1)
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
    own_correct = int((p.argmax(1) == y).sum())
    summed = torch.empty_like(p)
    with peer.watchdog.guard("evaluation: Allreduce of test predictions"):
        world.graft_comm.Allreduce(p.numpy(), summed.numpy(), op=MPI.SUM)
        ens_correct = int((summed.argmax(1) == y).sum())
        counts = np.array([own_correct, ens_correct, len(y), prog.correct, prog.seen], dtype=np.float64)
        counts = np.concatenate([counts, [prog.loss_sum]])
        totals = np.empty_like(counts)
        world.peer_comm.Allreduce(counts, totals, op=MPI.SUM)  # sum over the peer's replicas
    test_acc = 100.0 * totals[0] / max(1.0, totals[2])
    ensemble = 100.0 * totals[1] / max(1.0, totals[2])
    invalid = grafting.count_invalid_filters(model.state_dict(), peer.cfg.log.thresholds)
    row = {
        "epoch": prog.epoch, "peer": world.peer, "step": prog.step,
        "train_loss": totals[5] / max(1.0, totals[4]), "train_acc": 100.0 * totals[3] / max(1.0, totals[4]),
        "test_acc": test_acc, "lr": peer.schedule(max(0, prog.step - 1)),
        **{f"invalid_{t:g}": n for t, n in invalid.items()},
        "seconds": prog.seconds,
    }
    return row, ensemble


# ------------------------------------------------------------------------------------------ run directory
class RunStore:
    """The run directory's config check, resume and checkpoints (HDF5, see :mod:`hpcgraft.checkpoint`)."""

    def __init__(self, run_dir: Path, cfg: Config, peer: Peer, *, restart: bool) -> None:
        self.dir, self.cfg, self.world = run_dir, cfg, peer.world
        self.config_path = saved = run_dir / "config.yaml"
        if restart and self.world.is_root:
            _clear_run(run_dir)
        self.world.comm.Barrier()
        if saved.exists():
            import yaml

            old = config_from_dict(yaml.safe_load(saved.read_text()) or {}).flat()
            new = cfg.flat()
            diff = [k for k in new if old.get(k) != new[k]]
            if diff:
                k = diff[0]
                raise ConfigError(f"{run_dir} holds a run with {k}={old.get(k)!r}, not {new[k]!r}; resume it with "
                                  "the same config, pass --restart to start over, or use another --out")
            status = RunLog(run_dir).read_status()
            if status.get("state") == "finished":
                raise ConfigError(f"{run_dir} holds a finished run ({status.get('epoch')} epochs); pass --restart "
                                  "to start over or use another --out")
        self.manager = None
        if cfg.checkpoint.enabled:
            from hpcgraft.checkpoint import CheckpointManager

            self.manager = CheckpointManager(run_dir, self.world.comm, peer=self.world.peer, peers=self.world.peers,
                                             writer=self.world.is_peer_lead, keep=cfg.checkpoint.keep,
                                             keep_best=cfg.checkpoint.keep_best)

    def record_config(self) -> None:
        """Write the run's config.yaml; called once every rank has checked the old one (see ``__init__``)."""
        if self.world.is_root:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.cfg.dump(self.config_path)

    def resume(self, peer: Peer) -> None:
        info = self.manager.latest() if self.manager else None
        if info is None:
            if self.world.is_root:
                RunLog(self.dir).truncate_after(0, 0)
            return
        if info.peers != self.world.peers:
            raise ConfigError(f"the checkpoint {info.path} has {info.peers} peers; start with mpirun -np "
                             f"{info.peers * self.world.replicas} to resume it")
        load_peer_tree(peer, self.manager.load_peer(info, self.world.peer))
        if self.world.is_root:
            RunLog(self.dir).truncate_after(peer.progress.epoch, peer.progress.step)
        prog = peer.progress
        where = f"epoch {prog.epoch + 1} at batch {prog.batch}" if prog.batch else f"after epoch {prog.epoch}"
        hcomm.log(f"hpcgraft: resuming {self.dir} from {info.path.name} ({where}, step {prog.step})", world=self.world)

    def save(self, peer: Peer, *, metric: float | None = None) -> None:
        if self.manager is None:
            return
        run_tree = None
        if self.world.is_root:
            run_tree = {"config": _yaml(self.cfg), "versions": _versions(), "grafts": _graft_history(self.dir)}
        with peer.watchdog.guard("checkpoint: save"):
            self.manager.save(peer.progress.step, peer.progress.epoch, peer_tree(peer), run_tree, metric=metric)


def _graft_history(run_dir: Path) -> dict[str, Any]:
    """Alpha per layer per graft point and peer, as arrays (rows of graft.jsonl; NaN where a peer skipped)."""
    rows = read_jsonl(run_dir / GRAFTS)
    done = [r for r in rows if "layers" in r]
    if not done:
        return {}
    layers = [layer["name"] for layer in done[0]["layers"]]
    alpha = np.full((len(rows), len(layers)), np.nan)
    for i, r in enumerate(rows):
        if "layers" in r:
            alpha[i] = [layer["alpha"] for layer in r["layers"]]
    return {"layers": layers, "alpha": alpha, "step": np.array([r["step"] for r in rows], dtype=np.int64),
            "epoch": np.array([r["epoch"] for r in rows], dtype=np.int64),
            "peer": np.array([r["peer"] for r in rows], dtype=np.int64)}


def _clear_run(run_dir: Path) -> None:
    import shutil

    for name in ("config.yaml", METRICS, GRAFTS, "status.json"):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


def _yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def _versions() -> dict[str, str]:
    import h5py
    import mpi4py

    return {"torch": torch.__version__, "numpy": np.__version__, "mpi4py": mpi4py.__version__,
            "h5py": h5py.__version__, "mpi": MPI.Get_library_version().splitlines()[0].strip(),
            "python": sys.version.split()[0]}


def peer_tree(peer: Peer) -> dict[str, Any]:
    """What a peer's checkpoint holds: weights, momentum, progress and RNG states."""
    names = {p: n for n, p in peer.model.named_parameters()}
    momentum = {names[p]: s["momentum_buffer"] for p, s in peer.optimizer.state.items()
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
    if peer.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(peer.device)
    return {"model": peer.model.state_dict(), "optimizer": {"momentum": momentum},
            "progress": vars(peer.progress).copy(), "rng": rng}


def load_peer_tree(peer: Peer, tree: dict[str, Any]) -> None:
    peer.model.load_state_dict(tree["model"])
    params = dict(peer.model.named_parameters())
    for name, buf in tree["optimizer"]["momentum"].items():
        peer.optimizer.state[params[name]]["momentum_buffer"] = buf.to(peer.device)
    peer.progress = Progress(**tree["progress"])
    rng = tree["rng"]
    torch.set_rng_state(rng["torch"])
    n = rng["numpy"]
    np.random.set_state(("MT19937", np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = rng["python"]
    random.setstate((p["version"], tuple(int(v) for v in np.asarray(p["state"])), p["gauss"]))
    if "cuda" in rng and peer.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], peer.device)


if __name__ == "__main__":
    sys.exit(main())
