"""The training loop: K peers, one per MPI rank (or R ranks per peer), grafting at fixed points.

The story of a run, top to bottom in :func:`run`: agree on the config, build data and model, resume
from the last complete checkpoint if there is one, then for every epoch train, evaluate, graft, report
and checkpoint. SIGUSR1/SIGTERM stop every rank at the same step after a checkpoint (exit status 75,
for schedulers to requeue). When to graft and when to save are the named predicates below, so the loop
reads as the method does.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hpcgraft.comm import mpi
from hpcgraft.comm.exchange import all_finite
from hpcgraft.comm.failure import StopRequest
from hpcgraft.comm.world import agreed, check_peers_agree, init_world, log
from hpcgraft.config import Config, load_config
from hpcgraft.errors import EXIT_OK, EXIT_REQUEUE, NonFiniteWeightsError, RunError
from hpcgraft.method import grafting
from hpcgraft.method.cultivation import distillation_loss, mean_of_others
from hpcgraft.models import dgconv
from hpcgraft.storage.outputs import check_run_outputs
from hpcgraft.storage.run import load_weights
from hpcgraft.storage.runlog import METRICS, epoch_table, read_jsonl
from hpcgraft.storage.tbevents import require_tensorboard
from hpcgraft.text import plural
from hpcgraft.training.evaluation import TOP5_MIN_CLASSES, init_state, predict, topk_correct
from hpcgraft.training.faults import fault_hook
from hpcgraft.training.monitors import bn_l1_step, monitor_epoch
from hpcgraft.training.peer import Peer, build_peer, check_layout, make_exchange
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
    world = agreed(comm, lambda: init_world(cfg.dist.replicas, comm))
    agreed(comm, lambda: check_layout(cfg, world))
    # Before the data and the model (seconds to minutes): a directory this job cannot use, or another job's.
    agreed(comm, lambda: check_run_outputs(run_dir, cfg), root_only=True)
    agreed(comm, lambda: claim_run_dir(run_dir), root_only=True)
    peer: Peer = agreed(comm, lambda: build_peer(cfg, world))
    signature = grafting.plan_signature(grafting.plan_layers(peer.model.state_dict()), peer.model.state_dict())
    agreed(comm, lambda: check_peers_agree(comm, cfg.flat(), signature))
    peer.exchange = make_exchange(peer)
    if restart:  # only now that the job can run: a --restart refused for its data or model keeps the old run
        agreed(comm, lambda: start_over(run_dir), root_only=True)
    store = agreed(comm, lambda: RunStore(run_dir, cfg, world, extend=extend, from_step=from_step))

    t = cfg.train
    log(f"hpcgraft: {plural(world.peers, 'peer')} x {plural(world.replicas, 'replica')}, model {cfg.model.name}, data "
        f"{cfg.data.name} ({len(peer.train_loader)} steps/epoch), graft {cfg.graft.mode}"
        f"{'' if cfg.graft.mode == 'none' else f'/{cfg.graft.topology}/{cfg.graft.level}'}, "
        f"cultivate {f'lambda={cfg.cultivate.lambda_:g}' if peer.logits else 'off'}, "
        f"device {peer.device}, run dir {run_dir}", world=world)
    # Launchers and the kernel name processes by pid and host only (MPICH's report, dmesg's OOM lines).
    host = mpi().Get_processor_name()
    # Where each rank runs (the SLURM node, which can differ from the host name, and the rank within it):
    # the basis of the GPU choice (cuda:<local rank>) and of the threads per rank.
    place = f"{os.environ.get('SLURMD_NODENAME') or host}:{world.local_rank}/{world.local_size},{peer.device}"
    pids, places = zip(*comm.allgather((f"{os.getpid()}@{host}", place)), strict=True)
    log(f"hpcgraft: rank pids: {' '.join(f'{r}={p}' for r, p in enumerate(pids))}", world=world)
    log(f"hpcgraft: rank places (node:local rank/ranks there,device): "
        f"{' '.join(f'{r}={p}' for r, p in enumerate(places))}", world=world)
    agreed(comm, lambda: store.resume(peer))
    if t.init_from and peer.progress.step == 0:  # a fresh start only: a resumed run continues its checkpoint
        agreed(comm, lambda: init_from(peer, t.init_from))
    peer.replicas.broadcast_state(peer.model, peer.optimizer)  # every replica starts from replica 0's state
    stop = StopRequest(comm)
    inject = fault_hook(world.rank)
    watch = RunProgress(peer)  # a bar on a terminal, plain lines every log.every_s seconds in a log
    header = True
    while peer.progress.epoch < t.epochs:
        if peer.progress.batch == 0:
            peer.progress.start_epoch()
        if train_one_epoch(peer, stop, inject, watch):
            # grafts of the running epoch so far (graft.interval_steps), before the checkpoint covers them
            store.log_grafts(peer.graft_rows)
            peer.graft_rows = []
            store.save(peer)
            stop.close()
            log(f"hpcgraft: stopped by signal at epoch {peer.progress.epoch + 1}, step {peer.progress.step}; "
                f"checkpoint written, exit {EXIT_REQUEUE} (re-run the same command to resume)", world=world)
            if store.log:
                store.log.status(state="stopped", epoch=peer.progress.epoch, step=peer.progress.step)
            return EXIT_REQUEUE
        peer.progress.epoch += 1
        peer.progress.batch = 0
        if cfg.train.precise_bn:
            recompute_bn_statistics(peer, cfg.train.precise_bn)
        row, ensemble = evaluate(peer)
        check_some_peer_finite(peer, store)
        monitored = monitor_epoch(peer.monitor, peer.model, peer.progress.epoch, peer.world, peer.watchdog,
                                  row)  # prune.monitor: early-bird fields, on the weights just evaluated
        grafted = grafts_at_epoch_end(cfg, peer.progress.epoch)
        if grafted:
            graft(peer)
            if cfg.train.precise_bn:  # the checkpoint's statistics belong to its (grafted) weights
                recompute_bn_statistics(peer, cfg.train.precise_bn)
        row["alpha_mean"] = peer.progress.alpha_sum / peer.progress.grafts if peer.progress.grafts else None
        with peer.watchdog.guard("report: gather of metrics"):
            rows = world.graft_comm.gather(row, root=0) if world.is_peer_lead else None
        if store.log and rows:
            # the ensemble's top-5 rides in every peer's row (the same number); it belongs in the ensemble's
            ens_top5 = {k: r.pop(k) for r in rows for k in ("ensemble_top5",) if k in r}
            store.log.append(METRICS, rows + [{"epoch": peer.progress.epoch, "peer": None,
                                               "step": peer.progress.step, "ensemble_acc": ensemble,
                                               **monitored, **ens_top5}])
            store.log_grafts(peer.graft_rows)
            print(epoch_table(rows, ensemble, t.epochs, cfg.log.thresholds, header), flush=True)
            store.log.status(state="running", epoch=peer.progress.epoch, step=peer.progress.step)
            header = False
        peer.graft_rows = []
        if store.save_due(peer.progress.epoch):
            store.save(peer, metric=stored_metric(peer, row["test_acc"], grafted, store.ranks_best))
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
def train_one_epoch(peer: Peer, stop: StopRequest, inject: Callable[[nn.Module, int], None] | None = None,
                    watch: RunProgress | None = None) -> bool:
    """Train until the epoch ends (False) or a stop was requested (True, mid-epoch); ``watch`` shows the
    progress (every rank passes one, or none does: it meets at agreed steps)."""
    cfg, prog, model = peer.cfg, peer.progress, peer.model
    model.train()
    # Continues the epoch's sum (rather than adding a new one to it), so a resumed epoch sums bit for bit alike.
    loss_sum = torch.tensor(prog.loss_sum, dtype=torch.float64, device=peer.device)
    correct = torch.zeros((), dtype=torch.int64, device=peer.device)
    started = time.perf_counter()
    if watch is not None:
        watch.begin()
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
            logits = peer.net(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.train.label_smoothing)
            if peer.logits is not None:
                with peer.watchdog.guard("cultivation: Allgather of logits"):
                    everyone = peer.logits.gather(logits)
                target = mean_of_others(everyone, peer.world.peer, cfg.cultivate.temperature)
                if target is not None:
                    loss = loss + cfg.cultivate.lambda_ * distillation_loss(logits.float(), target,
                                                                            cfg.cultivate.temperature)
            if cfg.model.dgconv_budget is not None:
                loss = loss * dgconv.budget_scale(model, cfg.model.dgconv_budget, over=cfg.model.dgconv_exponent)
        peer.optimizer.zero_grad()  # sets the gradients to None (Horovod's optimizer takes no arguments here)
        loss.backward()
        bn_l1_step(model, cfg)
        peer.optimizer.step()
        for hook in peer.after_step:
            hook(model)
        loss_sum.add_(loss.detach(), alpha=len(y))  # in float64, on the device: no sync
        correct += (logits.detach().argmax(1) == y).sum()
        prog.seen += len(y)
        prog.batch += 1
        prog.step += 1
        peer.replicas.check_step(model, peer.optimizer, prog.step)
        if inject is not None:
            inject(model, prog.step)
        if grafts_after_step(cfg, prog.step):
            graft(peer)
        if watch is not None:
            watch.step(loss_sum)
        with peer.watchdog.guard("training step: Iallreduce of the stop flag"):
            stopped = stop.poll()
        if stopped:
            break
    if watch is not None:
        watch.end()
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
    peer.replicas.check_synced(peer.model, peer.optimizer, f"graft at step {prog.step}")
    epoch = prog.epoch if prog.batch == 0 else prog.epoch + 1  # at an epoch end, ``epoch`` is already counted
    row: dict[str, Any] = {"epoch": epoch, "step": prog.step, "peer": world.peer,
                           "source": _source_name(peer), "mode": peer.cfg.graft.mode, "seconds": seconds}
    if result.report is None:
        row.update(skipped=result.skipped_reason, nonfinite_peers=list(result.nonfinite_peers))
        log(f"hpcgraft: peer {world.peer} skipped grafting at step {prog.step}: {result.skipped_reason}",
            world=world, all_ranks=True)
    else:
        row.update(result.report.to_dict())
        prog.alpha_sum += result.report.alpha_mean
        prog.grafts += 1
    with peer.watchdog.guard("report: gather of graft reports"):
        rows = world.graft_comm.gather(row, root=0) if world.is_peer_lead else None
    if world.is_root and rows:
        peer.graft_rows.extend(rows)


def check_some_peer_finite(peer: Peer, store: RunStore) -> None:
    """A run in which every peer's weights are NaN/Inf has nothing left to train or graft from: it fails
    (exit 1, status "failed") instead of "finishing" with NaN weights. Agreed through one allgather."""
    own = all_finite(list(peer.model.state_dict().values()))
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
    """This peer's metrics row for the epoch (test accuracy, train statistics, invalid filters) and the
    ensemble's accuracy (mean of the peers' softmax)."""
    model, world, prog = peer.model, peer.world, peer.progress
    p, y = _test_predictions(peer)
    own_correct = int((p.argmax(1) == y).sum())
    summed = torch.empty_like(p)
    total = mpi().SUM
    with peer.watchdog.guard("evaluation: Allreduce of test predictions"):
        world.graft_comm.Allreduce(p.numpy(), summed.numpy(), op=total)
        ens_correct = int((summed.argmax(1) == y).sum())
        counts = np.array([own_correct, ens_correct, len(y), prog.correct, prog.seen], dtype=np.float64)
        top5 = [topk_correct(p, y, 5), topk_correct(summed, y, 5)]
        counts = np.concatenate([counts, [prog.loss_sum], top5])
        totals = np.empty_like(counts)
        world.peer_comm.Allreduce(counts, totals, op=total)  # sum over the peer's replicas
    test_acc = 100.0 * totals[0] / max(1.0, totals[2])
    ensemble = 100.0 * totals[1] / max(1.0, totals[2])
    invalid = grafting.count_invalid_filters(model.state_dict(), peer.cfg.log.thresholds)
    row = {
        "epoch": prog.epoch, "peer": world.peer, "step": prog.step,
        "train_loss": totals[5] / max(1.0, totals[4]), "train_acc": 100.0 * totals[3] / max(1.0, totals[4]),
        "test_acc": test_acc, "lr": peer.schedule(max(0, prog.step - 1)),
        **({"test_top5": 100.0 * totals[6] / max(1.0, totals[2]),
            "ensemble_top5": 100.0 * totals[7] / max(1.0, totals[2])}
           if peer.test_loader.dataset.num_classes >= TOP5_MIN_CLASSES else {}),
        **{f"invalid_{t:g}": n for t, n in invalid.items()},
        **({"dgconv_groups": groups} if (groups := [m.groups() for m in dgconv.dgconv_layers(model).values()]) else {}),
        "seconds": prog.seconds,
    }
    return row, ensemble
