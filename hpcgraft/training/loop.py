"""The training loop: K peers, P of them on each MPI rank (or R ranks per peer), grafting at fixed points.

The story of a run, top to bottom in :func:`run`: agree on the config, build data and model, resume
from the last complete checkpoint if there is one, then for every epoch train, evaluate, graft, report
and checkpoint, each of the rank's peers in peer order. SIGUSR1/SIGTERM stop every rank at the same step
after a checkpoint (exit status 75, for schedulers to requeue). When to graft and when to save are the
named predicates below, so the loop reads as the method does.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from hpcgraft.comm import mpi
from hpcgraft.comm.exchange import all_finite
from hpcgraft.comm.failure import StopRequest
from hpcgraft.comm.world import World, agreed, check_peers_agree, gather_peers, init_world, log
from hpcgraft.config import Config, load_config
from hpcgraft.errors import EXIT_OK, EXIT_REQUEUE, NonFiniteWeightsError, RunError
from hpcgraft.method import grafting
from hpcgraft.models import dgconv
from hpcgraft.storage.outputs import check_run_outputs
from hpcgraft.storage.run import load_weights
from hpcgraft.storage.runlog import METRICS, epoch_table, read_jsonl
from hpcgraft.storage.tbevents import require_tensorboard
from hpcgraft.text import plural
from hpcgraft.training.evaluation import TOP5_MIN_CLASSES, init_state, predict, topk_correct
from hpcgraft.training.faults import fault_hook
from hpcgraft.training.monitors import monitor_epoch
from hpcgraft.training.peer import Peer, build_peers, check_layout
from hpcgraft.training.peers import RankPeers, autocast, make_peer_exchange, step_peers
from hpcgraft.training.progress import RunProgress, run_summary
from hpcgraft.training.rundir import RunStore, claim_run_dir, start_over

if TYPE_CHECKING:
    from mpi4py import MPI


# ------------------------------------------------------------------------------------------ when
def grafts_at_epoch_end(cfg: Config, epochs_done: int) -> bool:
    """As in the reference: evaluate, then graft at the epoch end. The last epoch ends without a graft,
    whose result would be neither trained nor evaluated."""
    return cfg.graft.mode != "none" and cfg.graft.interval_steps == 0 and epochs_done < cfg.train.epochs


def grafts_after_step(cfg: Config, step: int) -> bool:
    """``graft.interval_steps=n``: a round after every n-th optimizer step instead of at epoch ends."""
    n = cfg.graft.interval_steps
    return cfg.graft.mode != "none" and n > 0 and step % n == 0


# ------------------------------------------------------------------------------------------ the run
def run(config: str | None, overrides: list[str], run_dir: Path, restart: bool, comm: MPI.Comm, *,
        extend: bool = False, from_step: int | None = None) -> int:
    started = time.monotonic()
    cfg: Config = agreed(comm, lambda: load_config(config, overrides))
    agreed(comm, lambda: require_tensorboard(cfg))
    world = agreed(comm, lambda: init_world(cfg.dist.replicas, comm, cfg.graft.peers))
    agreed(comm, lambda: check_layout(cfg, world))
    # Before the data and the model (seconds to minutes): a directory this job cannot use, or another job's.
    agreed(comm, lambda: check_run_outputs(run_dir, cfg), root_only=True)
    agreed(comm, lambda: claim_run_dir(run_dir), root_only=True)
    host = RankPeers(agreed(comm, lambda: build_peers(cfg, world)), world)
    peer = host.lead  # the rank's loop follows its first peer's progress (every peer's is the same)
    signature = grafting.plan_signature(grafting.plan_layers(peer.model.state_dict()), peer.model.state_dict())
    agreed(comm, lambda: check_peers_agree(comm, cfg.flat(), signature))
    make_peer_exchange(host)
    if restart:  # only now that the job can run: a --restart refused for its data or model keeps the old run
        agreed(comm, lambda: start_over(run_dir), root_only=True)
    store = agreed(comm, lambda: RunStore(run_dir, cfg, world, extend=extend, from_step=from_step))

    t = cfg.train
    log(f"hpcgraft: {plural(world.peers, 'peer')} ({world.hosted} per rank) x {plural(world.replicas, 'replica')}, "
        f"model {cfg.model.name}, data "
        f"{cfg.data.name} ({len(peer.train_loader)} steps/epoch), graft {cfg.graft.mode}"
        f"{'' if cfg.graft.mode == 'none' else f'/{cfg.graft.topology}/{cfg.graft.level}'}, "
        f"cultivate {f'lambda={cfg.cultivate.lambda_:g}' if peer.logits else 'off'}, "
        f"device {peer.device}, run dir {run_dir}", world=world)
    # Launchers and the kernel name processes by pid and host only (MPICH's report, dmesg's OOM lines).
    node = mpi().Get_processor_name()
    # Where each rank runs (the SLURM node, which can differ from the host name, and the rank within it):
    # the basis of the GPU choice (cuda:<local rank>) and of the threads per rank.
    place = f"{os.environ.get('SLURMD_NODENAME') or node}:{world.local_rank}/{world.local_size},{peer.device}"
    pids, places = zip(*comm.allgather((f"{os.getpid()}@{node}", place)), strict=True)
    log(f"hpcgraft: rank pids: {' '.join(f'{r}={p}' for r, p in enumerate(pids))}", world=world)
    log(f"hpcgraft: rank places (node:local rank/ranks there,device): "
        f"{' '.join(f'{r}={p}' for r, p in enumerate(places))}", world=world)
    agreed(comm, lambda: store.resume(host.peers))
    if t.init_from and peer.progress.step == 0:  # a fresh start only: a resumed run continues its checkpoint
        agreed(comm, lambda: [init_from(p, t.init_from) for p in host.peers])
    for p in host.peers:
        p.replicas.broadcast_state(p.model, p.optimizer)  # every replica starts from replica 0's state
    stop = StopRequest(comm)
    inject = fault_hook(world.rank)
    watch = RunProgress(peer)  # a bar on a terminal, plain lines every log.every_s seconds in a log
    header = True
    while peer.progress.epoch < t.epochs:
        if peer.progress.batch == 0:
            for p in host.peers:
                p.progress.start_epoch()
        if train_one_epoch(host, stop, inject, watch):
            # grafts of the running epoch so far (graft.interval_steps), before the checkpoint covers them
            store.log_grafts(host.graft_rows)
            host.graft_rows = []
            store.save(host.peers)
            stop.close()
            log(f"hpcgraft: stopped by signal at epoch {peer.progress.epoch + 1}, step {peer.progress.step}; "
                f"checkpoint written, exit {EXIT_REQUEUE} (re-run the same command to resume)", world=world)
            if store.log:
                store.log.status(state="stopped", epoch=peer.progress.epoch, step=peer.progress.step)
            return EXIT_REQUEUE
        for p in host.peers:
            p.progress.epoch += 1
            p.progress.batch = 0
            if cfg.train.precise_bn:
                recompute_bn_statistics(p, cfg.train.precise_bn)
        mine, ensemble = evaluate(host)
        check_some_peer_finite(host, store)
        # prune.monitor: early-bird fields, on the weights just evaluated
        monitored = monitor_epoch([p.monitor for p in host.peers], [p.model for p in host.peers],
                                  peer.progress.epoch, world, peer.watchdog, mine)
        grafted = grafts_at_epoch_end(cfg, peer.progress.epoch)
        if grafted:
            graft(host)
            if cfg.train.precise_bn:  # the checkpoint's statistics belong to its (grafted) weights
                for p in host.peers:
                    recompute_bn_statistics(p, cfg.train.precise_bn)
        for p, row in zip(host.peers, mine, strict=True):
            row["alpha_mean"] = p.progress.alpha_sum / p.progress.grafts if p.progress.grafts else None
        with peer.watchdog.guard("report: gather of metrics"):
            rows = gather_peers(world, mine)
        if store.log and rows:
            # the ensemble's top-5 rides in every peer's row (the same number); it belongs in the ensemble's
            ens_top5 = {k: r.pop(k) for r in rows for k in ("ensemble_top5",) if k in r}
            store.log.append(METRICS, rows + [{"epoch": peer.progress.epoch, "peer": None,
                                               "step": peer.progress.step, "ensemble_acc": ensemble,
                                               **monitored, **ens_top5}])
            store.log_grafts(host.graft_rows)
            print(epoch_table(rows, ensemble, t.epochs, cfg.log.thresholds, header), flush=True)
            store.log.status(state="running", epoch=peer.progress.epoch, step=peer.progress.step)
            header = False
        host.graft_rows = []
        if store.save_due(peer.progress.epoch):
            store.save(host.peers, metrics=[stored_metric(p, row["test_acc"], grafted, store.ranks_best)
                                            for p, row in zip(host.peers, mine, strict=True)])
    stop.close()
    if store.log:
        store.log.status(state="finished", epoch=peer.progress.epoch, step=peer.progress.step)
    log(f"hpcgraft: finished {plural(t.epochs, 'epoch')}; metrics in {run_dir / METRICS}", world=world)
    if store.log:
        print(run_summary(read_jsonl(run_dir / METRICS), time.monotonic() - started), flush=True)
    return EXIT_OK


def init_from(peer: Peer, spec: str) -> None:
    """``train.init_from``: this peer's starting weights, checked against the model before training."""
    state, source = init_state(spec, peer.world.peer, peer.world.peers)
    load_weights(peer.model, {k: v.to(peer.device) for k, v in state.items()}, source, peer.cfg.model.name)
    log(f"hpcgraft: peer {peer.world.peer} starts from the weights of {source}", world=peer.world, all_ranks=True)


# ------------------------------------------------------------------------------------------ one epoch
def train_one_epoch(host: RankPeers | Peer, stop: StopRequest, inject: Callable[[nn.Module, int], None] | None = None,
                    watch: RunProgress | None = None) -> bool:
    """Train the rank's peers until the epoch ends (False) or a stop was requested (True, mid-epoch);
    ``watch`` shows the progress (every rank passes one, or none does: it meets at agreed steps);
    ``inject`` acts on the rank's first peer."""
    host = host if isinstance(host, RankPeers) else RankPeers.of(host)
    peers, lead = host.peers, host.lead
    cfg = lead.cfg
    for p in peers:
        p.model.train()
    # Continues the epoch's sum (rather than adding a new one to it), so a resumed epoch sums bit for bit alike.
    loss_sums = [torch.tensor(p.progress.loss_sum, dtype=torch.float64, device=p.device) for p in peers]
    corrects = [torch.zeros((), dtype=torch.int64, device=p.device) for p in peers]
    started = time.perf_counter()
    if watch is not None:
        watch.begin()
    stopped = False
    epochs = [p.train_loader.epoch(p.progress.epoch, start=p.progress.batch) for p in peers]
    for batches in zip(*epochs, strict=True):
        done = step_peers(host, batches)
        for p, (logits, loss, y), loss_sum, correct in zip(peers, done, loss_sums, corrects, strict=True):
            loss_sum.add_(loss, alpha=len(y))  # in float64, on the device: no sync
            correct += (logits.argmax(1) == y).sum()
            prog = p.progress
            prog.seen += len(y)
            prog.batch += 1
            prog.step += 1
            p.replicas.check_step(p.model, p.optimizer, prog.step)
        if inject is not None:
            inject(lead.model, lead.progress.step)
        if grafts_after_step(cfg, lead.progress.step):
            graft(host)
        if watch is not None:
            watch.step(loss_sums[0])
        with host.watchdog.guard("training step: Iallreduce of the stop flag"):
            stopped = stop.poll()
        if stopped:
            break
    if watch is not None:
        watch.end()
    seconds = time.perf_counter() - started
    for p, loss_sum, correct in zip(peers, loss_sums, corrects, strict=True):
        sync_replicas(p)
        p.progress.loss_sum = float(loss_sum)
        p.progress.correct += int(correct)
        p.progress.seconds += seconds
    return stopped


def sync_replicas(peer: Peer) -> None:
    """A peer's replicas average their BatchNorm statistics (local between syncs) before anything reads
    the peer as a whole: a graft, an evaluation, a checkpoint."""
    peer.replicas.sync_buffers(peer.model, peer.progress.step)
    peer.replicas.check_synced(peer.model, peer.optimizer, f"buffer sync at step {peer.progress.step}")


BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@torch.no_grad()
def recompute_bn_statistics(peer: Peer, batches: int) -> None:
    """BatchNorm statistics of the weights as they are now, averaged over ``batches`` training batches
    ("precise BN"). The running averages describe the weights of the last few steps; where each step
    moves the weights far (the digits demo's heavy weight decay), evaluation with them swings wildly
    although the weights are good. The batches replay the epoch just trained (its order and augmentation,
    so a resumed run recomputes the same statistics), and training never reads these buffers."""
    model = peer.model
    norms = [m for m in model.modules() if isinstance(m, BATCH_NORMS)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    model.train()
    for i, (x, _) in enumerate(peer.train_loader.epoch(peer.progress.epoch - 1)):
        if i == batches:
            break
        x = x.to(peer.device, non_blocking=True)
        if peer.cfg.dist.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with peer.streams(), autocast(peer, x):
            model(x)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    # each replica measured its own shard: the peer's statistics are their mean (the epoch's sync is spent)
    peer.replicas.sync_buffers(model, peer.progress.step, again=True)
    peer.replicas.check_synced(model, peer.optimizer, f"precise BN at step {peer.progress.step}")


def graft(host: RankPeers | Peer) -> None:
    """One grafting round of every peer with its source; the reports go to graft.jsonl via rank 0, in peer
    order."""
    host = host if isinstance(host, RankPeers) else RankPeers.of(host)
    for p in host.peers:
        sync_replicas(p)
    prog, world = host.lead.progress, host.world
    started = time.perf_counter()
    try:
        results = host.graft_round()
    except NonFiniteWeightsError as exc:  # raised on every rank alike, after the same allgather
        raise RunError(f"grafting at step {prog.step}: {exc}") from None
    seconds = time.perf_counter() - started  # the whole round, waiting for slower peers included
    epoch = prog.epoch if prog.batch == 0 else prog.epoch + 1  # at an epoch end, ``epoch`` is already counted
    mine = []
    for p, result in zip(host.peers, results, strict=True):
        p.replicas.check_synced(p.model, p.optimizer, f"graft at step {prog.step}")
        row: dict[str, Any] = {"epoch": epoch, "step": prog.step, "peer": p.world.peer,
                               "source": _source_name(p), "mode": p.cfg.graft.mode, "seconds": seconds}
        if result.report is None:
            row.update(skipped=result.skipped_reason, nonfinite_peers=list(result.nonfinite_peers))
            log(f"hpcgraft: peer {p.world.peer} skipped grafting at step {prog.step}: {result.skipped_reason}",
                world=world, all_ranks=True)
        else:
            row.update(result.report.to_dict())
            p.progress.alpha_sum += result.report.alpha_mean
            p.progress.grafts += 1
        mine.append(row)
    with host.watchdog.guard("report: gather of graft reports"):
        rows = gather_peers(world, mine)
    if world.is_root and rows:
        host.graft_rows.extend(rows)


def check_some_peer_finite(host: RankPeers, store: RunStore) -> None:
    """A run in which every peer's weights are NaN/Inf has nothing left to train or graft from: it fails
    (exit 1, status "failed") instead of "finishing" with NaN weights. Agreed through one allgather."""
    own = any(all_finite(list(p.model.state_dict().values())) for p in host.peers)
    peer = host.lead
    with peer.watchdog.guard("epoch end: allgather of finiteness"):
        finite = peer.world.comm.allgather(own)
    if any(finite):
        return
    message = (f"every peer's weights are NaN/Inf after epoch {peer.progress.epoch} (step {peer.progress.step}); "
               "lower train.lr (or graft.a) and start over with --restart")
    if store.log:
        store.log.status(state="failed", epoch=peer.progress.epoch, step=peer.progress.step, reason=message)
    raise RunError(message)


def _source_name(peer: Peer) -> str:
    g = peer.cfg.graft
    if g.mode != "peers":
        return g.mode
    return f"peer {(peer.world.peer - 1) % peer.world.peers}" if g.topology == "ring" else "mean of others"


def stored_metric(peer: Peer, test_acc: float, grafted: bool, ranks_best: bool) -> float | None:
    """The metric a checkpoint is ranked by must belong to the weights it stores. The epoch's test
    accuracy was measured before the graft; a checkpoint written after one holds other weights, so those
    are evaluated again (only where the best checkpoint is kept: otherwise no metric is recorded rather
    than a wrong one)."""
    if not grafted:
        return test_acc
    return stored_accuracy(peer) if ranks_best else None


def _test_predictions(peer: Peer) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of this peer's model on its share of the test set, and the labels."""
    return predict(peer.model, peer.test_loader, peer.device, channels_last=peer.cfg.dist.channels_last,
                   autocast=lambda x: autocast(peer, x))


def stored_accuracy(peer: Peer) -> float:
    """Test accuracy (percent) of the peer's weights as they are now, over all its replicas."""
    p, y = _test_predictions(peer)
    counts = np.array([int((p.argmax(1) == y).sum()), len(y)], dtype=np.float64)
    totals = np.empty_like(counts)
    with peer.watchdog.guard("checkpoint metric: Allreduce of test counts"):
        peer.world.peer_comm.Allreduce(counts, totals, op=mpi().SUM)
    return 100.0 * totals[0] / max(1.0, totals[1])


@torch.no_grad()
def evaluate(host: RankPeers) -> tuple[list[dict[str, Any]], float]:
    """The metrics row of each of the rank's peers for the epoch (test accuracy, train statistics, invalid
    filters) and the ensemble's accuracy (the peers' summed softmax, added in peer order on every rank, so
    that the number does not depend on the layout)."""
    world = host.world
    predictions = [_test_predictions(p) for p in host.peers]
    y = predictions[0][1]
    with host.watchdog.guard("evaluation: Allgather of test predictions"):
        everyone = torch.from_numpy(_allgather_rows(world, torch.stack([p for p, _ in predictions]).numpy()))
    summed = everyone[0].clone()
    for p in everyone[1:]:
        summed += p
    ens_correct = int((summed.argmax(1) == y).sum())
    rows = [_metrics_row(peer, p, y, summed, ens_correct) for peer, (p, _) in zip(host.peers, predictions, strict=True)]
    return [row for row, _ in rows], rows[0][1]


def _allgather_rows(world: World, mine: np.ndarray) -> np.ndarray:
    """Every peer's array (``mine``: the rank's peers', stacked), stacked in peer order on every rank."""
    out = np.empty((world.graft_comm.Get_size() * mine.shape[0], *mine.shape[1:]), dtype=mine.dtype)
    world.graft_comm.Allgather(np.ascontiguousarray(mine), out)
    return out


def _metrics_row(peer: Peer, p: torch.Tensor, y: torch.Tensor, summed: torch.Tensor, ens_correct: int
                 ) -> tuple[dict[str, Any], float]:
    """One peer's row and the ensemble's accuracy, their counts summed over the peer's replicas (each
    evaluated its share)."""
    model, world, prog = peer.model, peer.world, peer.progress
    own_correct = int((p.argmax(1) == y).sum())
    counts = np.array([own_correct, ens_correct, len(y), prog.correct, prog.seen], dtype=np.float64)
    top5 = [topk_correct(p, y, 5), topk_correct(summed, y, 5)]
    counts = np.concatenate([counts, [prog.loss_sum], top5])
    totals = np.empty_like(counts)
    with peer.watchdog.guard("evaluation: Allreduce of test counts"):
        world.peer_comm.Allreduce(counts, totals, op=mpi().SUM)  # sum over the peer's replicas
    test_acc = 100.0 * totals[0] / max(1.0, totals[2])
    invalid = grafting.count_invalid_filters(model.state_dict(), peer.cfg.log.thresholds)
    return {
        "epoch": prog.epoch, "peer": world.peer, "step": prog.step,
        "train_loss": totals[5] / max(1.0, totals[4]), "train_acc": 100.0 * totals[3] / max(1.0, totals[4]),
        "test_acc": test_acc, "lr": peer.schedule(max(0, prog.step - 1)),
        **({"test_top5": 100.0 * totals[6] / max(1.0, totals[2]),
            "ensemble_top5": 100.0 * totals[7] / max(1.0, totals[2])}
           if peer.test_loader.dataset.num_classes >= TOP5_MIN_CLASSES else {}),
        **{f"invalid_{t:g}": n for t, n in invalid.items()},
        **({"dgconv_groups": groups} if (groups := [m.groups() for m in dgconv.dgconv_layers(model).values()]) else {}),
        "seconds": prog.seconds,
    }, 100.0 * totals[1] / max(1.0, totals[2])
