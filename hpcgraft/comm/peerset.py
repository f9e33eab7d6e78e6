"""Grafting rounds between K peers hosted P to a rank: a thin MPI layer around :mod:`hpcgraft.method.grafting`.

Rank g of ``comm`` hosts the peers g*P .. g*P+P-1. One round, on every rank at the same moment:
  1. each hosted peer computes the entropies of its layers; one ``allgather`` of the rank's P entropy
     vectors and finiteness flags gives every rank all K, in peer order;
  2. the weights travel: ring: a peer's predecessor on the same rank is read in place, and only the last
     hosted peer's weights cross to the next rank (one packed ``Sendrecv`` per rank pair; with one rank, a
     local copy); allreduce: the entropy-weighted weights of all K peers are summed in peer order along
     the ranks (:func:`ordered_sum`), so that the sum, and every bit of the result, is the same on any
     layout (an MPI ``Allreduce`` sums in an order of its own);
  3. each peer mixes its source into its own tensors in place.

Results do not depend on how the K peers are spread over the ranks: every number a peer computes comes
from the same operands in the same order wherever it runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from hpcgraft.comm.exchange import (
    Guard,
    PackedTensors,
    RoundResult,
    as_mpi,
    cuda_aware_mpi,
    entropies_of,
    mpi_type,
    unflatten_entropies,
)
from hpcgraft.errors import NonFiniteWeightsError
from hpcgraft.method import grafting

if TYPE_CHECKING:
    from mpi4py import MPI

SourceFn = Callable[[list[torch.Tensor]], list[torch.Tensor]]
_SUM_TAG = 31


def ordered_sum(comm: MPI.Comm, parts: Sequence[torch.Tensor], out: torch.Tensor, *, root: int | None = None) -> bool:
    """``out`` = the sum of every rank's ``parts`` (CPU tensors of one shape and dtype), added left to right
    in rank order, then list order: the same operands in the same order on any layout. The partial sum
    travels along the ranks; the last one holds the total and sends it to ``root`` (None: to every rank).
    Returns whether ``out`` holds the total on this rank."""
    rank, size = comm.Get_rank(), comm.Get_size()
    kind = mpi_type(out.dtype)
    rest = list(parts)
    if rank == 0:
        out.copy_(rest.pop(0))
    else:
        comm.Recv((as_mpi(out), kind), source=rank - 1, tag=_SUM_TAG)
    for part in rest:
        out.add_(part)
    if rank < size - 1:
        comm.Send((as_mpi(out), kind), dest=rank + 1, tag=_SUM_TAG)
    last = size - 1
    if root is None:
        comm.Bcast((as_mpi(out), kind), root=last)
        return True
    if root != last:
        if rank == last:
            comm.Send((as_mpi(out), kind), dest=root, tag=_SUM_TAG + 1)
        elif rank == root:
            comm.Recv((as_mpi(out), kind), source=last, tag=_SUM_TAG + 1)
    return rank == root


class PeerSetExchange:
    """Grafting rounds of this rank's peers (``states``: their state dicts, sharing storage with the models)
    with the K = ``comm`` size x P peers of the run. ``first``: the global index of the first hosted peer;
    ``source_fns`` (one per hosted peer) replace the peers as information source (noise, self)."""

    def __init__(self, states: Sequence[dict[str, torch.Tensor]], comm: MPI.Comm, first: int,
                 math: grafting.GraftMath | None = None, *, topology: str = "ring", on_nonfinite: str = "skip",
                 source_fns: Sequence[SourceFn] | None = None) -> None:
        self.states, self.comm, self.first = list(states), comm, first
        self.peers = comm.Get_size() * len(self.states)
        math = math or grafting.GraftMath()
        self.topology, self.level, self.math, self.on_nonfinite = topology, math.level, math, on_nonfinite
        self.source_fns = list(source_fns) if source_fns is not None else None
        math.check(topology=topology, mode="peers" if source_fns is None else "noise or self")
        self.plan = math.plan(self.states[0])
        self.keys = grafting.member_keys(self.plan)
        self.tensors = [[s[k] for k in self.keys] for s in self.states]
        if source_fns is None and self.peers < 2:
            raise ValueError("grafting between peers needs at least 2 peers")
        if topology == "allreduce" and any(t.dtype not in (torch.float32, torch.float64) for t in self.tensors[0]):
            raise ValueError("graft.topology=allreduce needs float32/float64 weights; use graft.topology=ring")
        self.packed = [PackedTensors(t, host_staging=not cuda_aware_mpi()) for t in self.tensors]

    def graft(self, on_wait: Guard | None = None) -> list[RoundResult]:
        """One synchronous round; every rank of ``comm`` calls it at the same point. One result per hosted
        peer, in peer order."""
        guard = on_wait or (lambda what: contextlib.nullcontext())
        for state in self.states:
            grafting.mask_gated_(state, self.plan)  # before packing: peers send only what their layers use
        h_self = [self.math.entropies(state, self.plan) for state in self.states]
        finite = [packed.all_finite() for packed in self.packed]  # also stages the ring's packed block
        if self.source_fns is not None:
            return [self._from_source(i, h_self[i], finite[i]) for i in range(len(self.states))]
        flat = [torch.cat([h.reshape(-1) for h in hs]).to(torch.float64).cpu().numpy() for hs in h_self]
        with guard("graft: allgather of entropies"):
            blocks = self.comm.allgather(list(zip(finite, flat, strict=True)))
        gathered = [item for block in blocks for item in block]
        bad = tuple(p for p, (ok, _) in enumerate(gathered) if not ok)
        if bad and self.on_nonfinite == "stop":
            raise NonFiniteWeightsError(
                f"peer(s) {list(bad)} hold NaN/Inf weights; set graft.on_nonfinite=skip to continue without them")
        entropies = [unflatten_entropies(self.plan, self.level, torch.from_numpy(h)) for _, h in gathered]
        if self.topology == "ring":
            return self._ring(h_self, entropies, bad, guard)
        return self._allreduce(h_self, entropies, bad, guard)

    # -- topologies ---------------------------------------------------------------------------------
    def _ring(self, h_self: list[list[torch.Tensor]], entropies: list[list[torch.Tensor]], bad: tuple[int, ...],
              guard: Guard) -> list[RoundResult]:
        """Peer i grafts from peer i-1. The last hosted peer's weights reach the next rank's first peer
        before anyone mixes; then the hosted peers mix from the last down, each reading its (not yet
        mixed) predecessor in place, and the first from what arrived."""
        rank, size = self.comm.Get_rank(), self.comm.Get_size()
        last = self.packed[-1]
        if size == 1:  # the ring closes on this rank: the last peer's weights, copied before anyone mixes
            torch._foreach_copy_(last.recv_views, last.tensors)
            arrived = list(last.recv_views)
        else:
            with guard("graft: ring Sendrecv"):
                last.sendrecv(self.comm, (rank + 1) % size, (rank - 1) % size, staged=True)
            arrived = last.received()
        results: list[RoundResult | None] = [None] * len(self.states)
        for i in reversed(range(len(self.states))):
            me = self.first + i
            pred = (me - 1) % self.peers
            if me in bad or pred in bad:
                results[i] = _skipped(bad, f"peer {pred if pred in bad else me} holds NaN/Inf weights")
                continue
            source = arrived if i == 0 else self.tensors[i - 1]
            h_src = [h.to(hs.device) for h, hs in zip(entropies[pred], h_self[i], strict=True)]
            alphas = self.math.coefficients(h_self[i], h_src)
            self.math.mix_(self.tensors[i], source, grafting.per_member(self.plan, alphas))
            results[i] = RoundResult(grafting.make_report(self.plan, h_self[i], h_src, alphas, self.level),
                                     nonfinite_peers=bad, bytes_sent=last.nbytes if i == 0 and size > 1 else 0)
        return results  # type: ignore[return-value]

    def _allreduce(self, h_self: list[list[torch.Tensor]], entropies: list[list[torch.Tensor]],
                   bad: tuple[int, ...], guard: Guard) -> list[RoundResult]:
        """Source of peer i = sum_j w_j W_j / sum_j w_j over the other finite peers j, with w = H + eps: the
        sum over all K peers in peer order (:func:`ordered_sum`), minus peer i's own term."""
        for i, packed in enumerate(self.packed):
            if self.first + i in bad:
                packed.clear()  # NaN * 0 is NaN: a non-finite peer adds zeros, not scaled weights
                continue
            member_w = grafting.per_member(self.plan, [h.to(torch.float64) + grafting.WEIGHT_EPS for h in h_self[i]])
            packed.pack([grafting.broadcast_to_filters(w.to(device=t.device, dtype=t.dtype), t)
                         for t, w in zip(self.tensors[i], member_w, strict=True)])
        last = self.packed[-1]
        with guard("graft: ordered sum of weighted peers"):
            for dt in last.groups:
                ordered_sum(self.comm, [p.host_send[dt] for p in self.packed], last.host_recv[dt])
                for packed in self.packed[:-1]:
                    packed.host_recv[dt].copy_(last.host_recv[dt])
        results = []
        for i, packed in enumerate(self.packed):
            me = self.first + i
            others = [j for j in range(self.peers) if j != me and j not in bad]
            if me in bad or not others:
                results.append(_skipped(bad, "its own weights are not finite" if me in bad
                                        else "no finite peer to graft from"))
                continue
            totals = [sum(entropies[j][g].double() + grafting.WEIGHT_EPS for j in others)
                      for g in range(len(self.plan))]
            source = packed.received()
            torch._foreach_sub_(source, packed.received(into_send=True))
            divisors = [grafting.broadcast_to_filters(w.to(device=t.device, dtype=t.dtype), t)
                        for t, w in zip(source, grafting.per_member(self.plan, totals), strict=True)]
            torch._foreach_div_(source, divisors)
            result = self._mix(i, h_self[i], source)
            result.bytes_sent, result.nonfinite_peers = packed.nbytes, bad
            results.append(result)
        return results

    # -- helpers -------------------------------------------------------------------------------------
    def _from_source(self, i: int, h_self: list[torch.Tensor], finite: bool) -> RoundResult:
        """noise or self: the peer's own source, no communication."""
        if not finite:
            return _skipped((self.first + i,), "its own weights are not finite")
        assert self.source_fns is not None
        return self._mix(i, h_self, self.source_fns[i](self.tensors[i]))

    def _mix(self, i: int, h_self: list[torch.Tensor], sources: list[torch.Tensor]) -> RoundResult:
        h_src = entropies_of(self.math, self.plan, self.keys, sources)
        alphas = self.math.coefficients(h_self, h_src)
        self.math.mix_(self.tensors[i], sources, grafting.per_member(self.plan, alphas))
        return RoundResult(grafting.make_report(self.plan, h_self, h_src, alphas, self.level))


def _skipped(bad: tuple[int, ...], why: str) -> RoundResult:
    return RoundResult(None, skipped_reason=why, nonfinite_peers=bad)
