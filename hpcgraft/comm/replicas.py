"""Peers that span several ranks: R data-parallel replicas per peer, with Horovod.

Layout (:func:`hpcgraft.comm.world.init_world`): peer p owns world ranks p*R .. p*R+R-1, replica r = rank % R.
Within a peer, :class:`ReplicaGroup` is the peer's Horovod process set: ``horovod.torch.DistributedOptimizer``
averages the gradients over it, so replicas that start from the same (broadcast) state stay identical
step after step. Between peers, the exchange with a :class:`ShardedTransport` grafts over ``graft_comm`` (replica r of
every peer), each replica moving only its 1/R share of the packed weights, and the peer reassembles the
whole within ``peer_comm``.

BatchNorm: replicas normalise with their own shard's batch statistics (as in standard data-parallel
training; no extra communication per layer), so their running mean/variance drift apart between
synchronisations. :meth:`ReplicaGroup.sync_buffers` averages them over the peer before anything reads
them as a whole: a graft, an evaluation, a checkpoint. The average of the replicas' running variances is
the running variance of the peer's batches up to the spread of the replicas' means, the usual reduction
of data-parallel BN statistics; SyncBatchNorm would make each step more expensive for no gain in what
grafting and evaluation see.

Horovod is imported only here and only when a run has R > 1, so the one-rank-per-peer mode never needs it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from hpcgraft.comm import mpi
from hpcgraft.comm.exchange import GraftExchange, Guard, Mixer, PackedTensors
from hpcgraft.comm.world import World, log
from hpcgraft.errors import ConfigError, ReplicaMismatchError
from hpcgraft.method import grafting

if TYPE_CHECKING:
    from mpi4py import MPI

CHECK_ENV = "HPCGRAFT_CHECK_REPLICAS"  # =1: assert after every step and graft that replicas are identical
INSTALL_HINT = "bash tools/build_horovod.sh .venv (part of make setup)"

SourceFn = Callable[[list[torch.Tensor]], list[torch.Tensor]]


class DistOptions(Protocol):
    """The ``dist`` section of a run's config, as far as replicas read it (the dist layer never imports
    the config module)."""

    replicas: int
    device: str
    channels_last: bool


def require_horovod(dist: DistOptions) -> None:
    """Horovod with PyTorch and MPI support (and NCCL on GPUs) must be importable, and the config one it
    can train; otherwise one line naming the fix."""
    replicas = dist.replicas
    try:
        import horovod.torch as hvd
    except ImportError as exc:
        raise ConfigError(
            f"dist.replicas={replicas} needs Horovod, but 'import horovod.torch' failed ({exc}); install it with "
            f"{INSTALL_HINT}, or run one rank per peer with dist.replicas=1"
        ) from None
    if not hvd.mpi_built():
        raise ConfigError(
            f"dist.replicas={replicas} needs Horovod built with MPI (HOROVOD_WITH_MPI=1), and this one is not; "
            f"rebuild it with {INSTALL_HINT}"
        )
    if dist.device != "cpu" and torch.cuda.is_available() and not hvd.nccl_built():
        raise ConfigError(
            f"dist.replicas={replicas} on GPUs needs Horovod built with NCCL, and this one is not; rebuild it with "
            "HOROVOD_GPU_OPERATIONS=NCCL bash tools/build_horovod.sh .venv (see docs/cluster.md), or set "
            "dist.device=cpu"
        )
    if dist.channels_last:
        raise ConfigError(
            f"dist.channels_last=true does not work with dist.replicas={replicas}: Horovod 0.28.1 reduces only "
            "contiguous tensors (horovod issue 3491); set dist.channels_last=false"
        )


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) of each shard of n elements; sizes differ by at most one."""
    return [(r * n // shards, (r + 1) * n // shards) for r in range(shards)]


def _digest(tensors: Iterable[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().reshape(-1).cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ReplicaGroup:
    """This rank's peer as a Horovod process set: gradient averaging, state broadcast, buffer sync.

    Horovod runs on the MPI world the run already has (``hvd.init(comm=...)``), so one ``mpirun`` or
    ``srun`` starts everything; every peer's replicas form one process set, declared on every rank.
    """

    def __init__(self, world: World) -> None:
        import horovod.torch as hvd

        self.hvd, self.world = hvd, world
        r = world.replicas
        if world.peers > 1:
            sets = [hvd.ProcessSet(list(range(p * r, (p + 1) * r))) for p in range(world.peers)]
            hvd.init(comm=world.comm, process_sets=sets)
            self.process_set = sets[world.peer]
        else:  # one peer: its process set is the whole world, which Horovod does not accept twice
            hvd.init(comm=world.comm)
            self.process_set = hvd.global_process_set
        self.root = world.peer * r  # global rank of replica 0, the broadcast root
        self.checking = os.environ.get(CHECK_ENV, "0") == "1"
        self.steps_checked = 0
        self._synced_step: int | None = None

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
        """The same optimizer, with gradients averaged over the peer's replicas before each step."""
        return self.hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                             process_set=self.process_set)

    def broadcast_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Replica 0's weights, buffers and momentum to every replica of the peer (start and resume)."""
        tensors = dict(model.state_dict())
        names = {p: n for n, p in model.named_parameters()}
        for p, state in optimizer.state.items():
            for key, value in state.items():
                if torch.is_tensor(value) and value.dim() > 0:
                    tensors[f"optimizer.{names[p]}.{key}"] = value
        handles = []
        for name, t in tensors.items():
            buf = t if t.is_contiguous() else t.contiguous()
            handles.append((t, buf, self.hvd.broadcast_async_(buf, self.root, name=f"hpcgraft.broadcast.{name}",
                                                              process_set=self.process_set)))
        for t, buf, handle in handles:
            self.hvd.synchronize(handle)
            if buf is not t:
                t.copy_(buf)
        self._synced_step = None

    def sync_buffers(self, model: nn.Module, step: int, again: bool = False) -> None:
        """Average the floating buffers (BatchNorm running statistics) over the peer; once per step, unless
        ``again``: the buffers were recomputed since this step's sync (train.precise_bn)."""
        if self._synced_step == step and not again:
            return
        buffers = [b for b in model.buffers() if b.is_floating_point()]
        if buffers:
            name = f"hpcgraft.buffers.{step}{'.again' if again else ''}"
            self.hvd.grouped_allreduce_(buffers, name=name, op=self.hvd.Average, process_set=self.process_set)
        self._synced_step = step

    # -- HPCGRAFT_CHECK_REPLICAS=1 ----------------------------------------------------------------------
    def check_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """After an optimizer step: parameters and momentum identical on every replica (buffers are
        local between synchronisations)."""
        if self.checking:
            self._check(list(model.parameters()) + _optimizer_tensors(optimizer), f"step {step}")
            self.steps_checked += 1

    def check_synced(self, model: nn.Module, optimizer: torch.optim.Optimizer, what: str) -> None:
        """After a graft or a buffer sync: the whole state identical on every replica."""
        if self.checking:
            self._check(list(model.state_dict().values()) + _optimizer_tensors(optimizer), what)
            log(f"hpcgraft: {CHECK_ENV}: peer {self.world.peer}: {self.world.replicas} replicas identical "
                      f"after {what} ({self.steps_checked} steps checked)", world=self.world,
                      all_ranks=self.world.is_peer_lead)

    def _check(self, tensors: list[torch.Tensor], what: str) -> None:
        digests = self.world.peer_comm.allgather(_digest(tensors))
        if len(set(digests)) != 1:
            raise ReplicaMismatchError(f"replicas of peer {self.world.peer} differ after {what}: "
                                       f"digests {[d[:12] for d in digests]}")


    def exchange(self, state: dict[str, torch.Tensor], source_fn: SourceFn | None, math: grafting.GraftMath,
                 **options: Any) -> GraftExchange:
        """The peer's grafting exchange: sharded over the replicas between peers, whole for other sources."""
        if source_fn is None:  # each replica moves its share of the peer's weights
            return GraftExchange(state, self.world.graft_comm, math, **options,
                                 transport=partial(ShardedTransport, peer_comm=self.world.peer_comm))
        return GraftExchange(state, self.world.graft_comm, math, source_fn=source_fn, **options)


class SingleReplica:
    """A peer of one rank: nothing to average, broadcast or compare. It answers the same calls as
    :class:`ReplicaGroup`, so the training loop reads the same whatever the layout."""

    def __init__(self, world: World) -> None:
        self.world = world

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
        return optimizer

    def broadcast_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        pass

    def sync_buffers(self, model: nn.Module, step: int, again: bool = False) -> None:
        pass

    def check_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        pass

    def check_synced(self, model: nn.Module, optimizer: torch.optim.Optimizer, what: str) -> None:
        pass

    def exchange(self, state: dict[str, torch.Tensor], source_fn: SourceFn | None, math: grafting.GraftMath,
                 **options: Any) -> GraftExchange:
        return GraftExchange(state, self.world.graft_comm, math, source_fn=source_fn, **options)


def replica_group(world: World) -> ReplicaGroup | SingleReplica:
    """This rank's peer: a Horovod process set when it spans several ranks, else a no-op group."""
    return ReplicaGroup(world) if world.replicas > 1 else SingleReplica(world)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]


class ShardedTransport:
    """The transport between peers of R replicas each: replica r moves only share r of the packed weights.

    Every replica holds its peer's whole (identical) weights, so entropies, finiteness and coefficients
    are computed on whole tensors exactly as with one rank per peer, and shared over ``graft_comm``
    (replica r of every peer) as there. Then

    - ring: replica r sends share r of its packed weights to replica r of the successor, receives share
      r of its source, mixes that share with the per-element coefficients :func:`grafting.graft_state`
      uses, and the peer's replicas reassemble the grafted whole (an allgather on ``peer_comm``):
      bit for bit what one rank per peer computes;
    - allreduce: replica r allreduces share r of the entropy-weighted weights; the peer reassembles the
      sum and every replica mixes the whole, because the coefficient needs the entropy of the whole
      source tensor. Bit for bit the unsharded result with 2 peers; with more, up to the order in
      which the MPI library sums each share.

    Every replica ends a round with identical weights, whatever the topology.
    """

    def __init__(self, packed: PackedTensors, tensors: list[torch.Tensor], peer_comm: MPI.Comm,
                 mix: Mixer = grafting.mix_) -> None:
        self.packed, self.tensors, self.peer_comm, self.mix = packed, tensors, peer_comm, mix
        self.replica, self.replicas = peer_comm.Get_rank(), peer_comm.Get_size()
        self.bounds = {dt: shard_bounds(buf.numel(), self.replicas) for dt, buf in packed.send.items()}
        self.nbytes = sum((self.bounds[dt][self.replica][1] - self.bounds[dt][self.replica][0])
                          * buf.element_size() for dt, buf in packed.send.items())
        # (tensor index, dtype, start and stop in the packed buffer, start in the tensor) of this share
        self.pieces: list[tuple[int, torch.dtype, int, int, int]] = []
        for dt, idx in packed.groups.items():
            lo, hi = self.bounds[dt][self.replica]
            offset = 0
            for i in idx:
                n = tensors[i].numel()
                a, b = max(lo, offset), min(hi, offset + n)
                if a < b:
                    self.pieces.append((i, dt, a, b, a - offset))
                offset += n

    def ring_transfer(self, comm: MPI.Comm, succ: int, pred: int, guard: Guard) -> None:
        self._pack_share()
        with guard("graft: ring Sendrecv"):  # of this replica's share
            for send, recv in zip(self._shares("send"), self._shares("recv"), strict=True):
                comm.Sendrecv(send, dest=succ, sendtag=7, recvbuf=recv, source=pred, recvtag=7)

    def ring_mix(self, coefficients: list[torch.Tensor], guard: Guard) -> None:
        self.packed.received()  # staged: brings the received share to the device
        send, recv = self.packed.send, self.packed.recv
        self.mix([send[dt][a:b] for _, dt, a, b, _ in self.pieces],
                      [recv[dt][a:b] for _, dt, a, b, _ in self.pieces],
                      [_coefficient_slice(coefficients[i], self.tensors[i], start, b - a)
                       for i, _, a, b, start in self.pieces])
        self._stage_share_to_host()
        self._gather_shares("send", guard)
        if self.packed.staging:
            for dt in self.packed.groups:
                send[dt].copy_(self.packed.host_send[dt])
        torch._foreach_copy_(self.tensors, self.packed.received(into_send=True))

    def reduce(self, comm: MPI.Comm, guard: Guard) -> None:
        with guard("graft: Allreduce"):  # of this replica's share
            for send, recv in zip(self._shares("send"), self._shares("recv"), strict=True):
                comm.Allreduce(send, recv, op=mpi().SUM)
        self._gather_shares("recv", guard)

    def _shares(self, which: str) -> list[tuple[Any, MPI.Datatype]]:
        """This replica's share of each packed host buffer, as MPI messages."""
        return [[buf[slice(*self.bounds[dt][self.replica])], mpitype]
                for (buf, mpitype), dt in zip(self.packed.mpi_buffers(which), self.packed.groups, strict=True)]

    def _gather_shares(self, which: str, guard: Guard) -> None:
        """Each replica contributes its share of the ``which`` host buffers; all end with the whole.

        An allgather, done as one non-blocking broadcast per share from its owner: with the MPICH wheel,
        ``Allgatherv`` of a ResNet-50's weights took 2-4 times as long as these broadcasts (measured on
        2 and 4 ranks, in place or not, with every ALLGATHERV algorithm)."""
        with guard("graft: reassembly of the shares within the peer"):
            requests = [self.peer_comm.Ibcast([buf[lo:hi], mpitype], root=owner)
                        for (buf, mpitype), dt in zip(self.packed.mpi_buffers(which), self.packed.groups, strict=True)
                        for owner, (lo, hi) in enumerate(self.bounds[dt])]
            mpi().Request.Waitall(requests)

    def _pack_share(self) -> None:
        """Copy this replica's share of the tensors (and only that) into the send buffers."""
        send = self.packed.send
        torch._foreach_copy_([send[dt][a:b] for _, dt, a, b, _ in self.pieces],
                             [self.tensors[i].reshape(-1)[start:start + b - a] for i, _, a, b, start in self.pieces])
        self._stage_share_to_host()

    def _stage_share_to_host(self) -> None:
        """Make this replica's share of the send buffers readable by MPI: copied to the host buffers
        (staging), or at least finished on the GPU (CUDA-aware MPI reads device memory directly)."""
        if self.packed.staging:
            for dt in self.packed.groups:
                lo, hi = self.bounds[dt][self.replica]
                self.packed.host_send[dt][lo:hi].copy_(self.packed.send[dt][lo:hi], non_blocking=True)
        if any(buf.is_cuda for buf in self.packed.send.values()):
            torch.cuda.current_stream().synchronize()


def _coefficient_slice(alpha: torch.Tensor, t: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """The coefficients of elements [start, start+length) of ``t`` flattened: the layer's one (0-d), or
    each element's filter's (per filter: filter f owns a contiguous run of numel/F elements)."""
    if alpha.dim() == 0:
        return alpha
    per = t.numel() // alpha.numel()
    first, last = start // per, (start + length - 1) // per + 1
    skip = start - first * per
    return alpha[first:last].repeat_interleave(per)[skip : skip + length]
