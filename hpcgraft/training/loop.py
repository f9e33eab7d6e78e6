"""The training loop: K peers, one per MPI rank (or R ranks per peer), grafting at fixed points.

The story of a run, top to bottom in :func:`run`: agree on the config, build data and model, resume
from the last complete checkpoint if there is one, then for every epoch train, evaluate, graft, report
and checkpoint. SIGUSR1/SIGTERM stop every rank at the same step after a checkpoint (exit status 75,
for schedulers to requeue). When to graft and when to save are the named predicates below, so the loop
reads as the method does.
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
from hpcgraft.comm.peerset import ordered_sum
from hpcgraft.comm.world import agreed, check_peers_agree, gather_peers, init_world, log
from hpcgraft.config import Config, load_config
from hpcgraft.errors import EXIT_OK, EXIT_REQUEUE, NonFiniteWeightsError, RunError
from hpcgraft.method import grafting
from hpcgraft.models import dgconv
from hpcgraft.storage.outputs import check_run_outputs
from hpcgraft.storage.run import load_weights
from hpcgraft.storage.runlog import METRICS, epoch_table, read_jsonl
from hpcgraft.storage.tbevents import require_tensorboard
from hpcgraft.text import plural
from hpcgraft.training.batched import BatchedPeers
from hpcgraft.training.evaluation import TOP5_MIN_CLASSES, init_state, predict, topk_correct
from hpcgraft.training.faults import fault_hook
from hpcgraft.training.monitors import monitor_epoch
from hpcgraft.training.peer import Peer, build_peers, check_layout, make_exchange
from hpcgraft.training.peers import PeerSet, as_set, autocast, take_steps
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
    ps = PeerSet(agreed(comm, lambda: build_peers(cfg, world)))
    state = ps.first.model.state_dict()
    signature = grafting.plan_signature(grafting.plan_layers(state), state)
    agreed(comm, lambda: check_peers_agree(comm, cfg.flat(), signature))
    if cfg.train.batched:  # before the exchange, which keeps the models' tensors: batching moves them
        ps.batched = BatchedPeers([p.model for p in ps.peers], [p.optimizer for p in ps.peers])
    ps.exchange = make_exchange(ps.peers)
    if restart:  # only now that the job can run: a --restart refused for its data or model keeps the old run
        agreed(comm, lambda: start_over(run_dir), root_only=True)
    store = agreed(comm, lambda: RunStore(run_dir, cfg, world, extend=extend, from_step=from_step))

    t = cfg.train
    per_rank = f" ({world.per_rank} per rank{', batched' if ps.batched else ''})" if world.per_rank > 1 else ""
    log(f"hpcgraft: {plural(world.peers, 'peer')}{per_rank} x {plural(world.replicas, 'replica')}, model "
        f"{cfg.model.name}, data {cfg.data.name} ({len(ps.first.train_loader)} steps/epoch), graft {cfg.graft.mode}"
        f"{'' if cfg.graft.mode == 'none' else f'/{cfg.graft.topology}/{cfg.graft.level}'}, "
        f"cultivate {f'lambda={cfg.cultivate.lambda_:g}' if ps.logits else 'off'}, "
        f"device {ps.device}, run dir {run_dir}", world=world)
    # Launchers and the kernel name processes by pid and host only (MPICH's report, dmesg's OOM lines).
    host = mpi().Get_processor_name()
    # Where each rank runs (the SLURM node, which can differ from the host name, and the rank within it):
    # the basis of the GPU choice (cuda:<local rank>) and of the threads per rank.
    place = f"{os.environ.get('SLURMD_NODENAME') or host}:{world.local_rank}/{world.local_size},{ps.device}"
    pids, places = zip(*comm.allgather((f"{os.getpid()}@{host}", place)), strict=True)
    log(f"hpcgraft: rank pids: {' '.join(f'{r}={p}' for r, p in enumerate(pids))}", world=world)
    log(f"hpcgraft: rank places (node:local rank/ranks there,device): "
        f"{' '.join(f'{r}={p}' for r, p in enumerate(places))}", world=world)
    agreed(comm, lambda: store.resume(ps.peers))
    if t.init_from and ps.progress.step == 0:  # a fresh start only: a resumed run continues its checkpoint
        for peer in ps.peers:
            agreed(comm, lambda peer=peer: init_from(peer, t.init_from))
    for peer in ps.peers:  # every replica starts from replica 0's state
        peer.replicas.broadcast_state(peer.model, peer.optimizer)
    stop = StopRequest(comm)
    inject = fault_hook(world.rank)
    watch = RunProgress(ps.first, hosted=ps.indices)  # a bar on a terminal, plain lines every log.every_s s in a log
    header = True
    prog = ps.progress
    while prog.epoch < t.epochs:
        if prog.batch == 0:
            for peer in ps.peers:
                peer.progress.start_epoch()
        if train_one_epoch(ps, stop, inject, watch):
            # grafts of the running epoch so far (graft.interval_steps), before the checkpoint covers them
            store.log_grafts(ps.graft_rows)
            ps.graft_rows = []
            store.save(ps.peers)
            stop.close()
            log(f"hpcgraft: stopped by signal at epoch {prog.epoch + 1}, step {prog.step}; "
                f"checkpoint written, exit {EXIT_REQUEUE} (re-run the same command to resume)", world=world)
            if store.log:
                store.log.status(state="stopped", epoch=prog.epoch, step=prog.step)
            return EXIT_REQUEUE
        for peer in ps.peers:
            peer.progress.epoch += 1
            peer.progress.batch = 0
        if cfg.train.precise_bn:
            recompute_bn_statistics_of(ps)
        rows, ensemble, ens_extra = evaluate_peers(ps)
        check_some_peer_finite(ps, store)
        # prune.monitor: early-bird fields, on the weights just evaluated
        monitored = monitor_epoch([p.monitor for p in ps.peers], [p.model for p in ps.peers], prog.epoch, world,
                                  ps.watchdog, rows)
        grafted = grafts_at_epoch_end(cfg, prog.epoch)
        if grafted:
            graft(ps)
            if cfg.train.precise_bn:  # the checkpoint's statistics belong to its (grafted) weights
                recompute_bn_statistics_of(ps)
        for peer, row in zip(ps.peers, rows, strict=True):
            p = peer.progress
            row["alpha_mean"] = p.alpha_sum / p.grafts if p.grafts else None
        with ps.watchdog.guard("report: gather of metrics"):
            everyone = gather_peers(world, rows)
        if store.log and everyone:
            store.log.append(METRICS, everyone + [{"epoch": prog.epoch, "peer": None, "step": prog.step,
                                                   "ensemble_acc": ensemble, **monitored, **ens_extra}])
            store.log_grafts(ps.graft_rows)
            print(epoch_table(everyone, ensemble, t.epochs, cfg.log.thresholds, header), flush=True)
            store.log.status(state="running", epoch=prog.epoch, step=prog.step)
            header = False
        ps.graft_rows = []
        if store.save_due(prog.epoch):
            store.save(ps.peers, metrics=[stored_metric(peer, row["test_acc"], grafted, store.ranks_best)
                                          for peer, row in zip(ps.peers, rows, strict=True)])
    stop.close()
    if store.log:
        store.log.status(state="finished", epoch=prog.epoch, step=prog.step)
    log(f"hpcgraft: finished {plural(t.epochs, 'epoch')}; metrics in {run_dir / METRICS}", world=world)
    if store.log:
        print(run_summary(read_jsonl(run_dir / METRICS), time.monotonic() - started), flush=True)
    return EXIT_OK


def init_from(peer: Peer, spec: str) -> None:
    """``train.init_from``: this peer's starting weights, checked against the model before training."""
    state, source = init_state(spec, peer.index, peer.world.peers)
    load_weights(peer.model, {k: v.to(peer.device) for k, v in state.items()}, source, peer.cfg.model.name)
    log(f"hpcgraft: peer {peer.index} starts from the weights of {source}", world=peer.world, all_ranks=True)


# ------------------------------------------------------------------------------------------ one epoch
def train_one_epoch(peers: Peer | PeerSet, stop: StopRequest, inject: Callable[[nn.Module, int], None] | None = None,
                    watch: RunProgress | None = None) -> bool:
    """Train the rank's peers until the epoch ends (False) or a stop was requested (True, mid-epoch);
    ``watch`` shows the progress (every rank passes one, or none does: it meets at agreed steps)."""
    ps = as_set(peers)
    cfg, prog = ps.cfg, ps.progress
    for peer in ps.peers:
        peer.model.train()
    # Continues the epoch's sums (rather than adding new ones to them), so a resumed epoch sums bit for bit alike.
    loss_sums = [torch.tensor(p.progress.loss_sum, dtype=torch.float64, device=ps.device) for p in ps.peers]
    corrects = [torch.zeros((), dtype=torch.int64, device=ps.device) for _ in ps.peers]
    started = time.perf_counter()
    if watch is not None:
        watch.begin()
    stopped = False
    epochs = [p.train_loader.epoch(prog.epoch, start=prog.batch) for p in ps.peers]
    for batches in zip(*epochs, strict=True):
        done = take_steps(ps, list(batches))
        for peer, (loss, logits, y), loss_sum, correct in zip(ps.peers, done, loss_sums, corrects, strict=True):
            loss_sum.add_(loss, alpha=len(y))  # in float64, on the device: no sync
            correct += (logits.argmax(1) == y).sum()
            p = peer.progress
            p.seen += len(y)
            p.batch += 1
            p.step += 1
            peer.replicas.check_step(peer.model, peer.optimizer, p.step)
        if inject is not None:
            inject(ps.first.model, prog.step)
        if grafts_after_step(cfg, prog.step):
            graft(ps)
        if watch is not None:
            watch.step(loss_sums)
        with ps.watchdog.guard("training step: Iallreduce of the stop flag"):
            stopped = stop.poll()
        if stopped:
            break
    if watch is not None:
        watch.end()
    seconds = time.perf_counter() - started
    for peer, loss_sum, correct in zip(ps.peers, loss_sums, corrects, strict=True):
        sync_replicas(peer)
        peer.progress.loss_sum = float(loss_sum)
        peer.progress.correct += int(correct)
        peer.progress.seconds += seconds
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
        with autocast(peer, x):
            model(x)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    # each replica measured its own shard: the peer's statistics are their mean (the epoch's sync is spent)
    peer.replicas.sync_buffers(model, peer.progress.step, again=True)
    peer.replicas.check_synced(model, peer.optimizer, f"precise BN at step {peer.progress.step}")


def recompute_bn_statistics_of(ps: PeerSet) -> None:
    """Precise BN of every hosted peer, each in its own random streams (a dropout layer draws)."""
    for peer in ps.peers:
        with peer.running():
            recompute_bn_statistics(peer, peer.cfg.train.precise_bn)


def graft(peers: Peer | PeerSet) -> None:
    """One grafting round of the rank's peers with all the others; its reports go to graft.jsonl via rank 0."""
    ps = as_set(peers)
    for peer in ps.peers:
        sync_replicas(peer)
    prog, world = ps.progress, ps.world
    started = time.perf_counter()
    try:
        results = ps.graft_round()
    except NonFiniteWeightsError as exc:  # raised on every rank alike, after the same allgather
        raise RunError(f"grafting at step {prog.step}: {exc}") from None
    seconds = time.perf_counter() - started  # the whole round, waiting for slower peers included
    epoch = prog.epoch if prog.batch == 0 else prog.epoch + 1  # at an epoch end, ``epoch`` is already counted
    rows = []
    for peer, result in zip(ps.peers, results, strict=True):
        peer.replicas.check_synced(peer.model, peer.optimizer, f"graft at step {prog.step}")
        row: dict[str, Any] = {"epoch": epoch, "step": prog.step, "peer": peer.index,
                               "source": _source_name(peer), "mode": peer.cfg.graft.mode, "seconds": seconds}
        if result.report is None:
            row.update(skipped=result.skipped_reason, nonfinite_peers=list(result.nonfinite_peers))
            log(f"hpcgraft: peer {peer.index} skipped grafting at step {prog.step}: {result.skipped_reason}",
                world=world, all_ranks=True)
        else:
            row.update(result.report.to_dict())
            peer.progress.alpha_sum += result.report.alpha_mean
            peer.progress.grafts += 1
        rows.append(row)
    with ps.watchdog.guard("report: gather of graft reports"):
        everyone = gather_peers(world, rows)
    if world.is_root and everyone:
        ps.graft_rows.extend(everyone)


def check_some_peer_finite(ps: PeerSet, store: RunStore) -> None:
    """A run in which every peer's weights are NaN/Inf has nothing left to train or graft from: it fails
    (exit 1, status "failed") instead of "finishing" with NaN weights. Agreed through one allgather."""
    own = any(all_finite(list(peer.model.state_dict().values())) for peer in ps.peers)
    with ps.watchdog.guard("epoch end: allgather of finiteness"):
        finite = ps.world.comm.allgather(own)
    if any(finite):
        return
    prog = ps.progress
    message = (f"every peer's weights are NaN/Inf after epoch {prog.epoch} (step {prog.step}); "
               "lower train.lr (or graft.a) and start over with --restart")
    if store.log:
        store.log.status(state="failed", epoch=prog.epoch, step=prog.step, reason=message)
    raise RunError(message)


def _source_name(peer: Peer) -> str:
    g = peer.cfg.graft
    if g.mode != "peers":
        return g.mode
    return f"peer {(peer.index - 1) % peer.world.peers}" if g.topology == "ring" else "mean of others"


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
    return predict(peer.net, peer.test_loader, peer.device, channels_last=peer.cfg.dist.channels_last,
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
def evaluate(peer: Peer) -> tuple[dict[str, Any], float]:
    """A lone peer's metrics row and the ensemble's accuracy (see :func:`evaluate_peers`)."""
    rows, ensemble, _ = evaluate_peers(as_set(peer))
    return rows[0], ensemble


@torch.no_grad()
def evaluate_peers(ps: PeerSet) -> tuple[list[dict[str, Any]], float, dict[str, float]]:
    """COLLECTIVE. Every hosted peer's metrics row for the epoch (test accuracy, train statistics, invalid
    filters) and, on rank 0, the ensemble's accuracy (arg-max of the peers' summed softmax) and top-5.
    The softmax is summed in peer order along the ranks, so that the ensemble is the same on any layout."""
    world = ps.world
    preds = [_test_predictions(peer) for peer in ps.peers]
    y = preds[0][1]
    summed = torch.empty_like(preds[0][0])
    per_peer = []
    for peer, (p, _) in zip(ps.peers, preds, strict=True):
        prog = peer.progress
        per_peer += [int((p.argmax(1) == y).sum()), len(y), prog.correct, prog.seen, prog.loss_sum,
                     topk_correct(p, y, 5)]
    with ps.watchdog.guard("evaluation: sum of test predictions"):
        whole = ordered_sum(world.graft_comm, [p for p, _ in preds], summed, root=0)
        ens = [int((summed.argmax(1) == y).sum()), topk_correct(summed, y, 5)] if whole else [0, 0]
        counts = np.array(per_peer + ens, dtype=np.float64)
        totals = np.empty_like(counts)
        world.peer_comm.Allreduce(counts, totals, op=mpi().SUM)  # sum over the peers' replicas
    images = max(1.0, totals[1])
    top5 = ps.first.test_loader.dataset.num_classes >= TOP5_MIN_CLASSES
    rows = []
    for i, peer in enumerate(ps.peers):
        own, _, correct, seen, loss_sum, own5 = totals[6 * i: 6 * i + 6]
        prog, model = peer.progress, peer.model
        invalid = grafting.count_invalid_filters(model.state_dict(), peer.cfg.log.thresholds)
        groups = [m.groups() for m in dgconv.dgconv_layers(model).values()]
        rows.append({
            "epoch": prog.epoch, "peer": peer.index, "step": prog.step,
            "train_loss": loss_sum / max(1.0, seen), "train_acc": 100.0 * correct / max(1.0, seen),
            "test_acc": 100.0 * own / images, "lr": peer.schedule(max(0, prog.step - 1)),
            **({"test_top5": 100.0 * own5 / images} if top5 else {}),
            **{f"invalid_{t:g}": n for t, n in invalid.items()},
            **({"dgconv_groups": groups} if groups else {}),
            "seconds": prog.seconds,
        })
    ensemble = 100.0 * totals[-2] / images
    return rows, ensemble, ({"ensemble_top5": 100.0 * totals[-1] / images} if top5 else {})
