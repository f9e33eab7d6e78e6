"""LEAN's selection on an explicit graph: repeatedly keep the kernels of the longest multiplicative chain.

Pure numpy on an edge list (the channel graph of :mod:`hpcgraft.method.channelgraph`, or any DAG whose
edges point forward); no torch modules, no files.
"""

from __future__ import annotations

import heapq

import numpy as np
import torch

from hpcgraft.method.opnorm import CriterionError


def _recompute(lo: int, hi: int, src: np.ndarray, w: np.ndarray, alive: np.ndarray,
               dist: np.ndarray) -> tuple[float, int]:
    """(dist, best incoming edge) of a node from its incoming edges lo:hi (edges sorted by target), live
    ones only."""
    if hi - lo <= 8:  # sums, depthwise and narrow convs: a plain loop beats numpy's per-call cost
        top, arg = 0.0, -1
        for e in range(lo, hi):
            if alive[e]:
                d = dist[src[e]]
                c = (d if d > 1.0 else 1.0) * w[e]
                if c >= top:
                    top, arg = float(c), e
        return (top, arg) if top >= 1.0 else (0.0, -1)
    cand = np.maximum(dist[src[lo:hi]], 1.0) * w[lo:hi] * alive[lo:hi]  # no distance counts as 1; dead: 0
    k = hi - lo - 1 - int(cand[::-1].argmax())  # the last edge among equal values, as the reference's ">="
    top = float(cand[k])
    return (top, lo + k) if top >= 1.0 else (0.0, -1)


def _initial_distances(n: int, src: np.ndarray, dst: np.ndarray, w: np.ndarray,
                       in_ptr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every node's path value and best incoming edge, a block of nodes at a time.

    A block is a run of consecutive nodes none of which feeds another (a conv's output channels, a sum's),
    so its incoming edges read only finished distances and the whole block is one vectorised step."""
    dist = np.zeros(n)
    best = np.full(n, -1, dtype=np.int64)
    has_in = in_ptr[1:] > in_ptr[:-1]
    max_src = np.full(n, -1, dtype=np.int64)
    if len(src):
        starts = in_ptr[:-1][has_in]
        max_src[has_in] = np.maximum.reduceat(src, starts)
    block_starts = [0]
    for v in np.flatnonzero(max_src >= 0):  # a node fed from inside the current block opens a new one
        if max_src[v] >= block_starts[-1]:
            block_starts.append(int(v))
    block_starts.append(n)
    for a, b in zip(block_starts[:-1], block_starts[1:], strict=True):
        lo, hi = int(in_ptr[a]), int(in_ptr[b])
        if lo == hi:
            continue
        d = dist[src[lo:hi]]
        cand = np.where(d > 0, d, 1.0) * w[lo:hi]
        nodes = np.flatnonzero(has_in[a:b]) + a
        seg = in_ptr[nodes] - lo
        top = np.maximum.reduceat(cand, seg)
        per_edge_top = np.repeat(top, np.diff(np.append(seg, hi - lo)))
        last = np.maximum.reduceat(np.where(cand == per_edge_top, np.arange(lo, hi), -1), seg)
        ok = top >= 1.0
        dist[nodes[ok]] = top[ok]
        best[nodes[ok]] = last[ok]
    return dist, best


def select_chains(n: int, src: np.ndarray, dst: np.ndarray, w: np.ndarray, fixed: np.ndarray, n_keep: int,
            truncate: bool) -> np.ndarray:
    """LEAN on edges sorted by target (src < dst): the kept mask. See :func:`longest_chains`.

    Lazy, where the reference's Rust recomputes every node downstream of a removed edge at once: removing
    edges only lowers path values, so a stored value is an upper bound of the true one. A max-heap of
    stored values yields a candidate; it is the true largest node once its own best path is checked to be
    intact (every edge alive, every value on it the product of its predecessor's and the edge's). When it
    is not, the nodes from the first break onwards are recomputed and the heap is asked again. Nodes far
    below the top are never recomputed, which makes deep residual graphs (a removal early changes the value
    of almost every later node) cheap enough for Python."""
    in_ptr = np.searchsorted(dst, np.arange(n + 1))
    alive = np.ones(len(src), dtype=bool)
    kept = np.zeros(len(src), dtype=bool)
    dist, best = _initial_distances(n, src, dst, w, in_ptr)
    heap = [(-float(dist[v]), -int(v)) for v in np.flatnonzero(dist > 0)]
    heapq.heapify(heap)

    def path_to(v: int) -> list[int]:
        edges = []
        e = int(best[v])
        while e >= 0:
            edges.append(e)
            e = int(best[src[e]])
        return edges[::-1]  # from the input side

    def first_break(path: list[int]) -> int:
        value = 1.0  # the path's first node has no distance
        for j, e in enumerate(path):
            if not alive[e] or value * w[e] != dist[dst[e]]:
                return j
            value = dist[dst[e]]
        return -1

    count = 0
    while count < n_keep:
        while heap and (dist[-heap[0][1]] != -heap[0][0] or dist[-heap[0][1]] <= 0):
            heapq.heappop(heap)  # stale: the node's value changed after this entry was pushed
        if not heap:
            break
        v = -heap[0][1]
        path = path_to(v)
        j = first_break(path)
        if j >= 0:  # recompute from the break on; the node's (lower) value goes back to the heap
            for e in path[j:]:
                u = int(dst[e])
                new_dist, best[u] = _recompute(int(in_ptr[u]), int(in_ptr[u + 1]), src, w, alive, dist)
                if new_dist != dist[u]:
                    dist[u] = new_dist
                    if new_dist > 0:
                        heapq.heappush(heap, (-new_dist, -u))
            continue
        marked = 0
        for e in path:  # from the input side, where the reference's Python stops at the target
            if fixed[e]:
                continue
            if truncate and count >= n_keep:
                break
            kept[e], alive[e] = True, False
            count += 1
            marked += 1
        if not marked:
            break  # the path holds only shortcuts: no path can add a kernel any more
    if count < n_keep:  # no path adds anything: the rest by descending weight
        rest = np.flatnonzero(alive & ~fixed)
        kept[rest[largest(w[rest], n_keep - count)]] = True
    return kept


def largest(values: np.ndarray, k: int) -> np.ndarray:
    """Mask of the k largest values, ties going to the earlier index (a stable descending sort's first k,
    found by one partition instead of a sort: ResNet-50 has 13 M kernels)."""
    if k >= len(values):
        return np.ones(len(values), dtype=bool)
    if k <= 0:
        return np.zeros(len(values), dtype=bool)
    threshold = np.partition(values, len(values) - k)[len(values) - k]
    kept = values > threshold
    kept[np.flatnonzero(values == threshold)[: k - int(kept.sum())]] = True
    return kept


def longest_chains(src: torch.Tensor, dst: torch.Tensor, weight: torch.Tensor, n_keep: int,
                   fixed: torch.Tensor | None = None, *, truncate: bool = False) -> torch.Tensor:
    """The LEAN selection on an explicit edge list (edges i -> j with i < j): a bool tensor, True = kept.

    Repeatedly takes the node with the largest multiplicative path value (dist(v) = max over live edges
    (u, v) of dist(u) x w, a node without a distance counting as 1, and a node getting a distance only when
    that product is >= 1), keeps the non-fixed edges of its path and removes them, until n_keep edges are
    kept or a path keeps nothing; then keeps the remaining non-fixed edges by descending weight up to
    n_keep. ``fixed`` edges (identity shortcuts, pooling) carry paths but are never kept or counted.
    ``truncate=False`` keeps a whole last path as the reference's Rust code does (it may keep more than
    n_keep); ``truncate=True`` stops inside it at exactly n_keep, as the reference's Python code does.
    Ties: the last node and the last edge in (from, to) order among equal values, as the reference's first
    pass; its recomputations take ties in hash-set order (docs/pruning.md, "Smaller differences").
    """
    s = src.detach().cpu().long().numpy().reshape(-1)
    d = dst.detach().cpu().long().numpy().reshape(-1)
    w = weight.detach().cpu().double().numpy().reshape(-1)
    f = (np.zeros(len(s), dtype=bool) if fixed is None
         else fixed.detach().cpu().bool().numpy().reshape(-1))
    if not len(s) == len(d) == len(w) == len(f):
        raise CriterionError("src, dst, weight and fixed must have one entry per edge")
    if len(s) and (s.min() < 0 or bool((d <= s).any())):
        raise CriterionError("edges must point forward (0 <= src < dst)")
    order = np.lexsort((s, d))  # by target, then source; stable for parallel edges
    n = int(d.max()) + 1 if len(d) else 0
    kept_sorted = select_chains(n, s[order], d[order], w[order], f[order], int(n_keep), truncate)
    kept = np.zeros(len(s), dtype=bool)
    kept[order] = kept_sorted
    return torch.from_numpy(kept)
