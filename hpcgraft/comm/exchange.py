"""The grafting exchange: a thin MPI layer around :mod:`hpcgraft.method.grafting`.

One round, on every peer at the same moment:
  1. each peer computes the entropies of its own layers and shares them (one small ``allgather``,
     together with a flag saying whether its weights are finite);
  2. the weights travel in one contiguous buffer per dtype (large CPU tensors from their own storage):
     ``Sendrecv`` to the ring successor (topology ``ring``), or one ``Allreduce`` of entropy-weighted
     weights (topology ``allreduce``);
  3. each peer mixes the source into its own tensors in place (:func:`hpcgraft.method.grafting.mix_`).

No pickling and no per-tensor messages for small tensors; buffers are allocated once. CUDA tensors are
staged through pinned host memory unless the MPI library is CUDA-aware.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Protocol

import torch

from hpcgraft.comm import mpi
from hpcgraft.errors import NonFiniteWeightsError
from hpcgraft.method import grafting
from hpcgraft.method.grafting import GraftReport, LayerGroup

if TYPE_CHECKING:
    from mpi4py import MPI


@dataclass
class RoundResult:
    report: GraftReport | None  # None: this peer did not graft in this round
    skipped_reason: str | None = None
    nonfinite_peers: tuple[int, ...] = ()
    bytes_sent: int = 0


def cuda_aware_mpi() -> bool:
    """Whether CUDA buffers may go to MPI directly; MPI libraries cannot be asked portably, so the user
    says so with HPCGRAFT_CUDA_AWARE_MPI=1 (default: stage through pinned host memory, always correct)."""
    return os.environ.get("HPCGRAFT_CUDA_AWARE_MPI", "0") == "1"


DIRECT_BYTES = 1 << 20  # CPU tensors at least this large travel in the ring from their own storage


class PackedTensors:
    """A fixed list of tensors and, per dtype, a contiguous send and receive buffer with a slot for each.

    The ring sends the small tensors packed into one message per dtype, and every large contiguous CPU
    tensor straight from its own storage into its receive slot: packing a ResNet-50 costs about as much
    as sending it, so this saves one copy of most of the bytes. The allreduce packs every slot.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], host_staging: bool) -> None:
        self.tensors = [t.detach() for t in tensors]
        device = self.tensors[0].device if self.tensors else torch.device("cpu")
        self.staging = host_staging and device.type == "cuda"
        direct = {i for i, t in enumerate(self.tensors) if device.type == "cpu" and t.is_contiguous()
                  and t.numel() * t.element_size() >= DIRECT_BYTES}
        # per dtype: the packed (small) tensors first, so that they form one leading block to send
        self.groups: dict[torch.dtype, list[int]] = {}
        for i in sorted(range(len(self.tensors)), key=lambda i: i in direct):
            self.groups.setdefault(self.tensors[i].dtype, []).append(i)
        self.packed_numel = {dt: sum(self.tensors[i].numel() for i in idx if i not in direct)
                             for dt, idx in self.groups.items()}
        sizes = {dt: sum(self.tensors[i].numel() for i in idx) for dt, idx in self.groups.items()}
        self.send = {dt: torch.empty(n, dtype=dt, device=device) for dt, n in sizes.items()}
        self.recv = {dt: torch.empty(n, dtype=dt, device=device) for dt, n in sizes.items()}
        self.host_send = {dt: self._host(n, dt) for dt, n in sizes.items()} if self.staging else self.send
        self.host_recv = {dt: self._host(n, dt) for dt, n in sizes.items()} if self.staging else self.recv
        self.nbytes = sum(b.numel() * b.element_size() for b in self.send.values())
        self.send_views, self.recv_views = self._views(self.send), self._views(self.recv)
        small = [i for i in range(len(self.tensors)) if i not in direct]
        self._small = ([self.tensors[i] for i in small], [self.send_views[i] for i in small])
        self._large = [self.tensors[i] for i in sorted(direct)]
        self._direct = [(as_mpi(self.tensors[i]), as_mpi(self.recv_views[i])) for i in sorted(direct)]

    @staticmethod
    def _host(n: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(n, dtype=dtype, pin_memory=torch.cuda.is_available())

    def _views(self, buffers: dict[torch.dtype, torch.Tensor]) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(self.tensors)
        for dt, idx in self.groups.items():
            views = buffers[dt].split([self.tensors[i].numel() for i in idx])
            for i, v in zip(idx, views, strict=True):
                out[i] = v.view(self.tensors[i].shape)
        return out  # type: ignore[return-value]

    def pack(self, weights: Sequence[torch.Tensor] | None = None) -> None:
        """Copy every tensor into its send slot, multiplied by ``weights`` (broadcastable) if given."""
        if weights is None:
            torch._foreach_copy_(self.send_views, self.tensors)
        else:  # one pass over the weights: multiply straight into the slot
            for t, w, slot in zip(self.tensors, weights, self.send_views, strict=True):
                torch.mul(t, w, out=slot)
        self._to_host()

    def clear(self) -> None:
        """Zero the send buffers (a peer that contributes nothing to an allreduce)."""
        for b in self.send.values():
            b.zero_()
        self._to_host()

    def _to_host(self) -> None:
        if self.staging:
            for dt in self.groups:
                self.host_send[dt].copy_(self.send[dt], non_blocking=True)
            torch.cuda.current_stream().synchronize()

    def stage(self) -> None:
        """Copy the small tensors into their send slots (where the ring sends them from)."""
        if self._small[0]:
            torch._foreach_copy_(self._small[1], self._small[0])

    def all_finite(self) -> bool:
        """Whether no tensor holds NaN/Inf. Stages the small tensors and checks them as a few contiguous
        blocks: one reduction per tensor costs more than the check itself for a few hundred layers."""
        self.stage()
        return all_finite([self.send[dt][:n] for dt, n in self.packed_numel.items() if n] + self._large)

    def sendrecv(self, comm: MPI.Comm, dest: int, source: int, tag: int = 7, staged: bool = False) -> None:
        """The ring transfer: this peer's tensors to ``dest``, ``source``'s into the receive buffers.
        ``staged``: :meth:`stage` (or :meth:`all_finite`) ran since the tensors last changed."""
        if not staged:
            self.stage()
        self._to_host()
        # all large messages in flight at once (one handshake each would stall on a busy node),
        # matched in order under their own tag; the packed block goes meanwhile
        reqs = [comm.Irecv(recv, source=source, tag=tag + 1) for _, recv in self._direct]
        reqs += [comm.Isend(send, dest=dest, tag=tag + 1) for send, _ in self._direct]
        for dt, n in self.packed_numel.items():
            if n:
                comm.Sendrecv((as_mpi(self.host_send[dt][:n]), mpi_type(dt)), dest=dest, sendtag=tag,
                              recvbuf=(as_mpi(self.host_recv[dt][:n]), mpi_type(dt)), source=source, recvtag=tag)
        mpi().Request.Waitall(reqs)

    def allreduce(self, comm: MPI.Comm) -> None:
        """Sum the send buffers of all ranks into the receive buffers."""
        for send, recv in zip(self.mpi_buffers("send"), self.mpi_buffers("recv"), strict=True):
            comm.Allreduce(send, recv, op=mpi().SUM)

    def received(self, into_send: bool = False) -> list[torch.Tensor]:
        """Views, shaped like the tensors, into the receive (or send) buffers."""
        if self.staging and not into_send:
            for dt in self.groups:
                self.recv[dt].copy_(self.host_recv[dt], non_blocking=True)
        return list(self.send_views if into_send else self.recv_views)

    def mpi_buffers(self, which: str) -> list[tuple[object, MPI.Datatype]]:
        bufs = self.host_send if which == "send" else self.host_recv
        return [(as_mpi(bufs[dt]), mpi_type(dt)) for dt in self.groups]


@cache
def mpi_type(dtype: torch.dtype) -> MPI.Datatype:
    """The MPI datatype that carries ``dtype`` (half precisions travel as their 16 bits; int64 for the
    authors' reference, which mixes ``num_batches_tracked``)."""
    MPI = mpi()
    return {torch.float32: MPI.FLOAT, torch.float64: MPI.DOUBLE, torch.float16: MPI.SHORT,
            torch.bfloat16: MPI.SHORT, torch.int64: MPI.INT64_T}[dtype]


def as_mpi(t: torch.Tensor) -> object:
    """A buffer mpi4py can read: numpy on the host, the CUDA array interface on a CUDA-aware MPI."""
    if t.device.type == "cuda":
        return t
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16).numpy()
    return t.numpy()


Guard = Callable[[str], contextlib.AbstractContextManager[None]]
# mixes sources into targets in place, one coefficient per target (grafting.mix_ or the authors' arithmetic)
Mixer = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor], Sequence[torch.Tensor]], None]


class Transport(Protocol):
    """How a round's weights travel between the peers. The exchange decides what to send and how to mix
    (the method); a transport moves the packed weights: whole (one rank per peer, :class:`WholeTransport`)
    or in shares over a peer's replicas (:class:`hpcgraft.comm.replicas.ShardedTransport`)."""

    nbytes: int  # what this rank sends in a round

    def ring_transfer(self, comm: MPI.Comm, succ: int, pred: int, guard: Guard) -> None:
        """This peer's weights to ``succ``, ``pred``'s into the receive buffers."""

    def ring_mix(self, coefficients: list[torch.Tensor], guard: Guard) -> None:
        """Mix the received weights into this peer's tensors in place, with one coefficient per member
        tensor (0-d, or one per filter)."""

    def reduce(self, comm: MPI.Comm, guard: Guard) -> None:
        """The sum of every peer's send buffers into the receive buffers, whole on every rank."""


class WholeTransport:
    """One rank per peer: the whole packed model travels (ring ``Sendrecv`` or one ``Allreduce``)."""

    def __init__(self, packed: PackedTensors, tensors: list[torch.Tensor], mix: Mixer = grafting.mix_) -> None:
        self.packed, self.tensors, self.mix = packed, tensors, mix
        self.nbytes = packed.nbytes

    def ring_transfer(self, comm: MPI.Comm, succ: int, pred: int, guard: Guard) -> None:
        with guard("graft: ring Sendrecv"):
            self.packed.sendrecv(comm, succ, pred, staged=True)

    def ring_mix(self, coefficients: list[torch.Tensor], guard: Guard) -> None:
        self.mix(self.tensors, self.packed.received(), coefficients)

    def reduce(self, comm: MPI.Comm, guard: Guard) -> None:
        with guard("graft: Allreduce"):
            self.packed.allreduce(comm)


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether no tensor holds NaN or Inf: min and max of each (NaN propagates), one host sync."""
    ends = [torch.stack(torch.aminmax(t)).double() for t in tensors if t.numel()]
    return bool(torch.isfinite(torch.cat(ends)).all()) if ends else True


class GraftExchange:
    """Grafting rounds between the peers of ``comm`` (rank = peer index) for one model's state.

    ``state`` must be a state dict whose tensors share storage with the model (``model.state_dict()``),
    so that mixing in place updates the model. ``math`` is the round's arithmetic (the paper's method or the
    authors' code; level, a, c, bins; default: the paper's with its defaults), the same object an offline graft
    uses. ``source_fn`` replaces the peers as information source (noise, the network's own weights); it maps
    this peer's tensors to the source tensors. ``transport`` builds what moves the weights from the packed
    buffers and the tensors (default: whole).
    """

    def __init__(
        self,
        state: dict[str, torch.Tensor],
        comm: MPI.Comm,
        math: grafting.GraftMath | None = None,
        *,
        topology: str = "ring",
        on_nonfinite: str = "skip",
        source_fn: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
        transport: Callable[[PackedTensors, list[torch.Tensor]], Transport] = WholeTransport,
    ) -> None:
        self.state, self.comm = state, comm
        self.peer, self.peers = comm.Get_rank(), comm.Get_size()
        math = math or grafting.GraftMath()
        self.topology, self.level, self.math = topology, math.level, math
        self.on_nonfinite = on_nonfinite
        self.source_fn = source_fn
        math.check(topology=topology, mode="peers" if source_fn is None else "noise or self")
        self.plan: list[LayerGroup] = self.math.plan(state)
        self.keys = grafting.member_keys(self.plan)
        self.tensors = [state[k] for k in self.keys]
        if source_fn is None and self.peers < 2:
            raise ValueError("grafting between peers needs at least 2 peers")
        if topology == "allreduce" and any(t.dtype not in (torch.float32, torch.float64) for t in self.tensors):
            raise ValueError("graft.topology=allreduce needs float32/float64 weights; use graft.topology=ring")
        self.packed = PackedTensors(self.tensors, host_staging=not cuda_aware_mpi())
        self.transport = transport(self.packed, self.tensors, mix=self.math.mix_)

    @property
    def source_peer(self) -> int:
        """Ring: peer i grafts from peer i-1 (peer 0 from the last)."""
        return (self.peer - 1) % self.peers

    def graft(self, on_wait: Callable[[str], contextlib.AbstractContextManager[None]] | None = None) -> RoundResult:
        """One synchronous round; every peer of ``comm`` must call it at the same point."""
        guard = on_wait or (lambda what: contextlib.nullcontext())
        grafting.mask_gated_(self.state, self.plan)  # before packing: peers send only what their layers use
        h_self = self.math.entropies(self.state, self.plan)
        finite = self.packed.all_finite()  # also stages the ring's packed block
        if self.source_fn is not None:
            if not finite:
                return self._nonfinite((self.peer,), "its own weights are not finite")
            sources = self.source_fn(self.tensors)
            return self._mix(h_self, sources, self._entropies_of(sources))
        flat_h = torch.cat([h.reshape(-1) for h in h_self]).to(torch.float64).cpu()
        with guard("graft: allgather of entropies"):
            gathered = self.comm.allgather((finite, flat_h.numpy()))
        bad = tuple(p for p, (ok, _) in enumerate(gathered) if not ok)
        if bad and self.on_nonfinite == "stop":
            raise NonFiniteWeightsError(
                f"peer(s) {list(bad)} hold NaN/Inf weights; set graft.on_nonfinite=skip to continue without them")
        entropies = [self._unflatten(torch.from_numpy(h)) for _, h in gathered]
        if self.topology == "ring":
            return self._ring(h_self, entropies, bad, guard)
        return self._allreduce(h_self, entropies, bad, guard)

    # -- topologies ---------------------------------------------------------------------------------
    def _ring(self, h_self: list[torch.Tensor], entropies: list[list[torch.Tensor]], bad: tuple[int, ...],
              guard: Guard) -> RoundResult:
        succ, pred = (self.peer + 1) % self.peers, self.source_peer
        self.transport.ring_transfer(self.comm, succ, pred, guard)
        if self.peer in bad or pred in bad:
            return self._nonfinite(bad, f"peer {pred if pred in bad else self.peer} holds NaN/Inf weights")
        h_src = [h.to(hs.device) for h, hs in zip(entropies[pred], h_self, strict=True)]
        alphas = self.math.coefficients(h_self, h_src)
        self.transport.ring_mix(grafting.per_member(self.plan, alphas), guard)
        return RoundResult(grafting.make_report(self.plan, h_self, h_src, alphas, self.level),
                           nonfinite_peers=bad, bytes_sent=self.transport.nbytes)

    def _allreduce(self, h_self: list[torch.Tensor], entropies: list[list[torch.Tensor]], bad: tuple[int, ...],
                   guard: Guard) -> RoundResult:
        """Source = sum_j w_j W_j / sum_j w_j over the other finite peers j, with w = H + eps, from one
        Allreduce of w_j W_j over all peers minus this peer's own term."""
        own_ok = self.peer not in bad
        weights = [h.to(torch.float64) + grafting.WEIGHT_EPS for h in h_self]
        member_w = grafting.per_member(self.plan, weights)
        if own_ok:
            self.packed.pack([grafting.broadcast_to_filters(w.to(device=t.device, dtype=t.dtype), t)
                              for t, w in zip(self.tensors, member_w, strict=True)])
        else:
            self.packed.clear()  # NaN * 0 is NaN: a non-finite peer sends zeros, not scaled weights
        self.transport.reduce(self.comm, guard)
        others = [j for j in range(self.peers) if j != self.peer and j not in bad]
        if not own_ok or not others:
            return self._nonfinite(bad, "no finite peer to graft from" if own_ok else "its own weights are not finite")
        totals = [sum(entropies[j][g].double() + grafting.WEIGHT_EPS for j in others) for g in range(len(self.plan))]
        source = self.packed.received()
        own_scaled = self.packed.received(into_send=True)
        torch._foreach_sub_(source, own_scaled)
        divisors = [grafting.broadcast_to_filters(w.to(device=t.device, dtype=t.dtype), t)
                    for t, w in zip(source, grafting.per_member(self.plan, totals), strict=True)]
        torch._foreach_div_(source, divisors)
        result = self._mix(h_self, source, self._entropies_of(source))
        result.bytes_sent, result.nonfinite_peers = self.transport.nbytes, bad
        return result

    # -- helpers -------------------------------------------------------------------------------------
    def _mix(self, h_self: list[torch.Tensor], sources: list[torch.Tensor], h_src: list[torch.Tensor]
             ) -> RoundResult:
        alphas = self.math.coefficients(h_self, h_src)
        self.math.mix_(self.tensors, sources, grafting.per_member(self.plan, alphas))
        return RoundResult(grafting.make_report(self.plan, h_self, h_src, alphas, self.level))

    def _entropies_of(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return entropies_of(self.math, self.plan, self.keys, tensors)

    def _unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return unflatten_entropies(self.plan, self.level, flat)

    def _nonfinite(self, bad: tuple[int, ...], why: str) -> RoundResult:
        return RoundResult(None, skipped_reason=why, nonfinite_peers=bad)


def entropies_of(math: grafting.GraftMath, plan: list[LayerGroup], keys: Sequence[str],
                 tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The entropies of ``tensors`` (a source, laid out as the plan's member ``keys``)."""
    return math.entropies(dict(zip(keys, tensors, strict=True)), plan)


def unflatten_entropies(plan: list[LayerGroup], level: str, flat: torch.Tensor) -> list[torch.Tensor]:
    """One peer's entropies from the flat vector it shared: a scalar per layer, or a vector per filter."""
    sizes = [1 if level == "layer" or not g.per_filter else g.filters for g in plan]
    parts = flat.split(sizes)
    return [p.reshape(()) if level == "layer" or not g.per_filter else p for p, g in zip(parts, plan, strict=True)]
