"""Grafting rounds between K peers hosted P to a rank (``graft.peers``), wherever each peer lives.

The same round as :class:`hpcgraft.comm.exchange.GraftExchange` (whose arithmetic it shares through
:mod:`hpcgraft.method.grafting`), for a block of peers per rank:
  1. every peer computes its entropies and finiteness; one ``allgather`` between ranks carries the rank's
     peers' (finite, entropies) in peer order;
  2. ring: peer g grafts from peer g-1. Inside a rank's block the source is the neighbour's tensors as they
     are (peers are mixed last to first, so each source is still unmixed); only the block's first peer
     needs the previous rank's last peer: ONE packed ``Sendrecv`` per rank pair, whatever P is;
  3. allreduce: every rank gathers the peers' entropy-weighted weights in peer order (one ``Allgather`` of
     the rank's P peers packed together) and sums them in that order, so that the source, and every bit of
     the result, is the same on any layout (an MPI ``Allreduce`` sums in an order that depends on it).

``noise`` and ``self`` sources need no other peer: each peer mixes alone.
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
    _as_mpi,
    cuda_aware_mpi,
    mpi_type,
    unflatten_entropies,
)
from hpcgraft.errors import NonFiniteWeightsError
from hpcgraft.method import grafting

if TYPE_CHECKING:
    from mpi4py import MPI

SourceFn = Callable[[list[torch.Tensor]], list[torch.Tensor]]


class PeerSetExchange:
    """Grafting rounds of the rank's peers ``first .. first+P-1`` (``states``, each sharing storage with its
    model) with the other ranks' peers over ``comm`` (one rank per block of P peers, rank = block index)."""

    def __init__(self, states: Sequence[dict[str, torch.Tensor]], comm: MPI.Comm, peers: int,
                 math: grafting.GraftMath | None = None, *, topology: str = "ring", on_nonfinite: str = "skip",
                 source_fns: Sequence[SourceFn] | None = None) -> None:
        self.states, self.comm, self.peers = list(states), comm, peers
        self.hosted = len(self.states)
        self.first = comm.Get_rank() * self.hosted
        if self.hosted * comm.Get_size() != peers:
            raise ValueError(f"{peers} peers do not fill {comm.Get_size()} ranks of {self.hosted} peers each")
        self.math = math or grafting.GraftMath()
        self.topology, self.level, self.on_nonfinite = topology, self.math.level, on_nonfinite
        self.source_fns = source_fns
        self.math.check(topology=topology, mode="peers" if source_fns is None else "noise or self")
        if source_fns is None and peers < 2:
            raise ValueError("grafting between peers needs at least 2 peers")
        self.plan = self.math.plan(self.states[0])
        self.keys = grafting.member_keys(self.plan)
        self.tensors = [[state[k] for k in self.keys] for state in self.states]
        if topology == "allreduce" and any(t.dtype not in (torch.float32, torch.float64) for t in self.tensors[0]):
            raise ValueError("graft.topology=allreduce needs float32/float64 weights; use graft.topology=ring")
        self.packed = [PackedTensors(ts, host_staging=not cuda_aware_mpi()) for ts in self.tensors]
        self.nbytes = self.packed[0].nbytes
        self._gathered: dict[torch.dtype, torch.Tensor] = {}  # allreduce: every peer's scaled weights, by dtype

    def graft(self, on_wait: Guard | None = None) -> list[RoundResult]:
        """One synchronous round, a result per hosted peer; every rank of ``comm`` calls it at the same point."""
        guard = on_wait or (lambda what: contextlib.nullcontext())
        h_self, finite = [], []
        for state, packed in zip(self.states, self.packed, strict=True):
            grafting.mask_gated_(state, self.plan)  # before packing: peers send only what their layers use
            h_self.append(self.math.entropies(state, self.plan))
            finite.append(packed.all_finite())  # also stages the ring's packed block
        if self.source_fns is not None:
            return [self._alone(i, h, ok) for i, (h, ok) in enumerate(zip(h_self, finite, strict=True))]
        mine = [(ok, torch.cat([h.reshape(-1) for h in hs]).to(torch.float64).cpu().numpy())
                for ok, hs in zip(finite, h_self, strict=True)]
        with guard("graft: allgather of entropies"):
            gathered = [item for part in self.comm.allgather(mine) for item in part]
        bad = tuple(p for p, (ok, _) in enumerate(gathered) if not ok)
        if bad and self.on_nonfinite == "stop":
            raise NonFiniteWeightsError(
                f"peer(s) {list(bad)} hold NaN/Inf weights; set graft.on_nonfinite=skip to continue without them")
        entropies = [unflatten_entropies(torch.from_numpy(h), self.plan, self.level) for _, h in gathered]
        if self.topology == "ring":
            return self._ring(h_self, entropies, bad, guard)
        return self._allreduce(h_self, entropies, bad, guard)

    # -- topologies ---------------------------------------------------------------------------------
    def _ring(self, h_self: list[list[torch.Tensor]], entropies: list[list[torch.Tensor]], bad: tuple[int, ...],
              guard: Guard) -> list[RoundResult]:
        last = self.packed[-1]  # the block's last peer is the next block's first peer's source
        ranks = self.comm.Get_size()
        if ranks > 1:
            me = self.comm.Get_rank()
            with guard("graft: ring Sendrecv"):
                last.sendrecv(self.comm, (me + 1) % ranks, (me - 1) % ranks, staged=True)
            edge = last.received()
        else:  # the ring closes on this rank: the first peer's source is the last one's (still unmixed) copy
            edge = last.received()
            torch._foreach_copy_(edge, self.tensors[-1])
        results: list[RoundResult] = [RoundResult(None)] * self.hosted
        for i in reversed(range(self.hosted)):  # last to first: every local source is still unmixed
            peer, pred = self.first + i, (self.first + i - 1) % self.peers
            if peer in bad or pred in bad:
                results[i] = RoundResult(None, f"peer {pred if pred in bad else peer} holds NaN/Inf weights",
                                         nonfinite_peers=bad)
                continue
            source = edge if i == 0 else self.tensors[i - 1]
            h_src = [h.to(hs.device) for h, hs in zip(entropies[pred], h_self[i], strict=True)]
            alphas = self.math.coefficients(h_self[i], h_src)
            self.math.mix_(self.tensors[i], source, grafting.per_member(self.plan, alphas))
            results[i] = RoundResult(grafting.make_report(self.plan, h_self[i], h_src, alphas, self.level),
                                     nonfinite_peers=bad, bytes_sent=self.nbytes if i == self.hosted - 1 else 0)
        return results

    def _allreduce(self, h_self: list[list[torch.Tensor]], entropies: list[list[torch.Tensor]],
                   bad: tuple[int, ...], guard: Guard) -> list[RoundResult]:
        """Source of peer g = sum_j w_j W_j / sum_j w_j over the other finite peers j, w = H + eps; the sum
        over all peers is formed in peer order on every rank, then g's own term is taken out."""
        for i, packed in enumerate(self.packed):
            if self.first + i in bad:
                packed.clear()  # NaN * 0 is NaN: a non-finite peer contributes zeros, not scaled weights
                continue
            weights = grafting.per_member(self.plan, [h.to(torch.float64) + grafting.WEIGHT_EPS for h in h_self[i]])
            packed.pack([grafting.broadcast_to_filters(w.to(device=t.device, dtype=t.dtype), t)
                         for t, w in zip(self.tensors[i], weights, strict=True)])
        with guard("graft: Allgather of the peers' weighted weights"):
            totals = self._ordered_sums()
        results = []
        for i, packed in enumerate(self.packed):
            peer = self.first + i
            others = [j for j in range(self.peers) if j != peer and j not in bad]
            if peer in bad or not others:
                why = "no finite peer to graft from" if peer not in bad else "its own weights are not finite"
                results.append(RoundResult(None, why, nonfinite_peers=bad))
                continue
            for dt, total in totals.items():
                torch.sub(total, packed.send[dt], out=packed.recv[dt])
            divisors = [sum(entropies[j][g].double() + grafting.WEIGHT_EPS for j in others)
                        for g in range(len(self.plan))]
            source = packed.recv_views
            torch._foreach_div_(source, [grafting.broadcast_to_filters(w.to(device=t.device, dtype=t.dtype), t)
                                         for t, w in zip(source, grafting.per_member(self.plan, divisors),
                                                         strict=True)])
            view = dict(zip(self.keys, source, strict=True))
            h_src = self.math.entropies(view, self.plan)
            alphas = self.math.coefficients(h_self[i], h_src)
            self.math.mix_(self.tensors[i], source, grafting.per_member(self.plan, alphas))
            results.append(RoundResult(grafting.make_report(self.plan, h_self[i], h_src, alphas, self.level),
                                       nonfinite_peers=bad, bytes_sent=self.nbytes))
        return results

    def _ordered_sums(self) -> dict[torch.dtype, torch.Tensor]:
        """Per dtype, the sum of every peer's send buffer, added in peer order (0, 1, ..., K-1)."""
        sums = {}
        for dt, own in self.packed[0].send.items():
            n = own.numel()
            if dt not in self._gathered:
                self._gathered[dt] = torch.empty((self.peers, n), dtype=dt)
            everyone = self._gathered[dt]
            mine = torch.stack([p.send[dt].cpu() for p in self.packed])
            self.comm.Allgather((_as_mpi(mine), mpi_type(dt)), (_as_mpi(everyone), mpi_type(dt)))
            total = everyone[0].clone()
            for row in everyone[1:]:
                total += row
            sums[dt] = total.to(own.device)
        return sums

    # -- helpers -------------------------------------------------------------------------------------
    def _alone(self, i: int, h_self: list[torch.Tensor], finite: bool) -> RoundResult:
        """``noise``/``self``: the peer's own source, no other peer involved."""
        if not finite:
            return RoundResult(None, "its own weights are not finite", nonfinite_peers=(self.first + i,))
        assert self.source_fns is not None
        sources = self.source_fns[i](self.tensors[i])
        h_src = self.math.entropies(dict(zip(self.keys, sources, strict=True)), self.plan)
        alphas = self.math.coefficients(h_self, h_src)
        self.math.mix_(self.tensors[i], sources, grafting.per_member(self.plan, alphas))
        return RoundResult(grafting.make_report(self.plan, h_self, h_src, alphas, self.level))
