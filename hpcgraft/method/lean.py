"""Kernel pruning criteria: LEAN (longest chains of operator norms) and its baselines IndivL1 and IndivSV.

LEAN (Schoonhoven et al., arXiv 2011.06923; reference code schoonhovenrichard/LEAN_CNN_pruning) sees a
CNN as a graph whose nodes are channels and whose edges are the 2-D kernels W[o, i] of its convolutions,
weighted by the kernel's operator norm times the BatchNorm scale of its output channel. A kernel is worth
keeping when it lies on a chain of kernels that together amplify a signal (a path whose product of edge
weights is large), not merely when it is large on its own. IndivL1 (per-kernel l1 norm) and IndivSV
(per-kernel operator norm x BN factor) rank the same kernels one at a time, under one global threshold.

The graph is read off the model by torch.fx, so every architecture built from the supported layers works
without a per-family table (docs/pruning.md, "Pruning criteria", lists how each layer enters the graph).

Pure torch and numpy on a module: no MPI, no files. The prune command builds masks with
:func:`kernel_masks`.
"""

from __future__ import annotations

import heapq
import math
import operator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from hpcgraft.errors import UserError
from hpcgraft.models.dgconv import DGConv2d, effective_weight

KERNEL_CRITERIA = ("lean", "indiv_l1", "indiv_sv")
DEFAULT_IMAGE_SIZE = 16  # M of the reference for ResNet-50 and U-Net
_CHUNK = 8192  # kernels per DFT matmul: a few MB of intermediate values


class CriterionError(UserError, ValueError):
    """A kernel-pruning request that cannot be served (criterion, keep fraction, model): one line."""


def check_criterion(criterion: str) -> None:
    if criterion not in KERNEL_CRITERIA:
        raise CriterionError(f"unknown kernel pruning criterion {criterion!r}; use one of: "
                             f"{', '.join(KERNEL_CRITERIA)}")


def kept_count(keep: float, total: int) -> int:
    """ceil(keep x total), with keep read as the decimal it prints as (0.7 x 10 is 7, not 8).

    Ceil so that any keep > 0 keeps at least one kernel; the decimal reading so that a fraction typed on
    the command line gives the count a person would compute from it, whatever its binary rounding."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise CriterionError(f"keep fraction must lie in (0, 1], got {keep!r}")
    return min(total, math.ceil(Decimal(repr(float(keep))) * total))


# ---------------------------------------------------------------------------------------------------------
# Operator norms


def _dft_basis(kh: int, kw: int, stride: int, size: int, dtype: torch.dtype) -> torch.Tensor:
    """[kh * kw, 2 * parts * F]: kernel entry -> real and imaginary parts of the DFT of its polyphase part.

    A kernel entry (a, b) belongs to part (a % s, b % s) at position (a // s, b // s), and each part is
    transformed at (size / s)^2. Only the frequencies v <= n / 2 are kept: for a real kernel |F(u, v)| =
    |F(-u, -v)|, so the other half holds the same magnitudes. One matmul then gives every spectrum."""
    n = size // stride
    a = torch.arange(kh, dtype=torch.float64)
    b = torch.arange(kw, dtype=torch.float64)
    u = torch.arange(n, dtype=torch.float64)
    v = torch.arange(n // 2 + 1, dtype=torch.float64)
    phase = 2 * math.pi / n * (u[:, None, None, None] * (a // stride)[None, None, :, None]
                               + v[None, :, None, None] * (b // stride)[None, None, None, :])  # u v a b
    phase = phase.reshape(-1, kh * kw).T  # [kh * kw, F]
    parts = (a % stride)[:, None] * stride + (b % stride)[None, :]  # part of each entry, [kh, kw]
    owner = torch.nn.functional.one_hot(parts.reshape(-1).long(), stride * stride).T.double()  # [P, kh*kw]
    cos = (owner[:, :, None] * torch.cos(phase)[None]).permute(1, 0, 2).reshape(kh * kw, -1)
    sin = (owner[:, :, None] * torch.sin(phase)[None]).permute(1, 0, 2).reshape(kh * kw, -1)
    return torch.cat([cos, sin], dim=1).to(dtype)


def operator_norms(weight: torch.Tensor, stride: int, size: int) -> torch.Tensor:
    """Spectral norms of every single-channel convolution W[o, i] on a size x size periodic image: [O, I].

    Stride 1 (Sedghi et al.): the largest |FFT2| of the kernel zero-padded to size x size. Stride 2: the
    operator is a row of four circulant blocks, one per polyphase part W[p::2, q::2] of the kernel, all
    diagonalised by the same (size/2)^2 DFT, so its singular values are sqrt(sum_p |F_p|^2) per frequency.
    A 1x1 kernel gives |w| at either stride. Computed as DFT matmuls in chunks (batched: ResNet-50's
    1.3 M 3x3 kernels take seconds), in the weight's precision (at least float32).
    """
    if weight.dim() != 4:
        raise CriterionError(f"operator norms need a conv weight [O, I, kh, kw], got shape {tuple(weight.shape)}")
    if stride not in (1, 2):
        raise CriterionError(f"the operator norm is implemented for stride 1 and 2 only, got stride {stride}")
    if size < 1 or size % stride:
        raise CriterionError(f"image size {size} must be a positive multiple of the stride {stride}")
    o, i, kh, kw = weight.shape
    w = weight.detach()
    if not w.is_floating_point() or w.dtype in (torch.float16, torch.bfloat16):
        w = w.float()
    if kh == kw == 1:
        return w.reshape(o, i).abs()
    if -(-max(kh, kw) // stride) > size // stride:
        raise CriterionError(f"a {kh}x{kw} kernel at stride {stride} does not fit the {size}x{size} image of "
                             f"the operator norm; raise image_size to at least {max(kh, kw)}")
    basis = _dft_basis(kh, kw, stride, size, w.dtype).to(w.device)
    half = basis.shape[1] // 2
    parts = stride * stride
    out = []
    for chunk in w.reshape(-1, kh * kw).split(_CHUNK):
        z = chunk @ basis
        z = z * z
        power = (z[:, :half] + z[:, half:]).view(len(chunk), parts, -1).sum(1)  # sum_p |F_p|^2 per frequency
        out.append(power.amax(1).sqrt())
    return torch.cat(out).view(o, i)


# ---------------------------------------------------------------------------------------------------------
# Longest chains


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


def _chains(n: int, src: np.ndarray, dst: np.ndarray, w: np.ndarray, fixed: np.ndarray, n_keep: int,
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
        kept[rest[_largest(w[rest], n_keep - count)]] = True
    return kept


def _largest(values: np.ndarray, k: int) -> np.ndarray:
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
    Ties go as in the reference: the last node and the last edge in (from, to) order among equal values.
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
    kept_sorted = _chains(n, s[order], d[order], w[order], f[order], int(n_keep), truncate)
    kept = np.zeros(len(s), dtype=bool)
    kept[order] = kept_sorted
    return torch.from_numpy(kept)


# ---------------------------------------------------------------------------------------------------------
# The channel graph of a model


@dataclass
class _Conv:
    name: str  # the weight's parameter name
    weight: torch.Tensor  # what the layer convolves with (DGConv: the gate-masked weight)
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    src: torch.Tensor  # [O, I/groups] node of each kernel's input channel
    out: torch.Tensor  # [O] output channel nodes
    bn: torch.Tensor | None = None  # [O] |gamma| / sqrt(var + eps) of the BatchNorm folded into it


@dataclass
class _Fixed:
    src: torch.Tensor  # [E] (-1: a zero channel, no edge)
    dst: torch.Tensor  # [E]
    weight: torch.Tensor  # [E]


@dataclass
class _Graph:
    nodes: int = 0
    ops: list[_Conv | _Fixed] = field(default_factory=list)

    def new(self, count: int) -> torch.Tensor:
        self.nodes += count
        return torch.arange(self.nodes - count, self.nodes)


@dataclass
class _Map:
    """The channels of one traced value: a graph node per channel, -1 for a channel that is always zero."""

    nodes: torch.Tensor
    conv: _Conv | None = None  # the conv that produced exactly these nodes, while a BatchNorm may fold in
    source: fx.Node | None = None


_DEAD = object()  # a value past the channel graph (pooled, flattened, classified) or a constant

_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardtanh, nn.Hardswish, nn.Tanh,
                 nn.Sigmoid, nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d)
_PASS_FUNCTIONS = {F.relu, F.relu6, torch.relu, F.leaky_relu, F.elu, F.gelu, F.silu, F.hardtanh, F.hardswish,
                   torch.tanh, torch.sigmoid, F.dropout, F.dropout2d, F.max_pool2d}
_PASS_METHODS = {"relu", "relu_", "contiguous", "clone", "sigmoid", "tanh"}
_END_MODULES = (nn.Linear, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten)
_END_FUNCTIONS = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.flatten, F.linear}
_END_METHODS = {"flatten", "view", "reshape", "mean", "size", "dim"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_SUPPORTED = ("Conv2d (DGConv too), BatchNorm2d, activations, max and average pooling, additions, channel "
              "padding, slicing and concatenation, then global pooling and linear layers at the end")


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, DGConv2d) or super().is_leaf_module(m, qualname)


def _flat_args(args: Any) -> list[Any]:
    out: list[Any] = []
    fx.node.map_aggregate(args, out.append)
    return out


class _Reader:
    """Follows the channels of a traced model and records the graph's ops (docs/pruning.md, "Pruning criteria")."""

    def __init__(self, model: nn.Module, image_size: int) -> None:
        self.model, self.size = model, image_size
        try:
            self.fx_graph = _Tracer().trace(model)
        except Exception as e:  # noqa: BLE001 - any tracing failure is the same answer for the user
            raise CriterionError(f"cannot follow {type(model).__name__} with torch.fx ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}); kernel criteria need a "
                                 f"traceable model of {_SUPPORTED}") from None
        self.graph = _Graph()
        self.seen: set[str] = set()

    def fail(self, node: fx.Node, what: str) -> CriterionError:
        return CriterionError(f"kernel criteria cannot follow the channels of {type(self.model).__name__} "
                              f"through {what} (at '{node.name}'); supported: {_SUPPORTED}")

    def run(self) -> _Graph:
        env: dict[fx.Node, Any] = {}
        first = next((n for n in self.fx_graph.nodes if n.op == "call_module"
                      and isinstance(self.model.get_submodule(str(n.target)), (nn.Conv2d, DGConv2d))), None)
        if first is None:
            raise CriterionError(f"{type(self.model).__name__} has no Conv2d layer: nothing for a kernel "
                                 "criterion to prune")
        inputs = self.graph.new(self.model.get_submodule(str(first.target)).in_channels)
        for node in self.fx_graph.nodes:
            if node.op == "placeholder":
                env[node] = _Map(inputs)
            elif node.op in ("get_attr", "output"):
                env[node] = _DEAD
            else:
                args = fx.node.map_arg(node.args, lambda n: env[n])
                kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
                env[node] = self.step(node, args, kwargs)
        return self.graph

    def step(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        maps = [a for a in _flat_args((args, kwargs)) if isinstance(a, _Map)]
        if node.op == "call_module":
            mod = self.model.get_submodule(str(node.target))
            if isinstance(mod, (nn.Conv2d, DGConv2d)):
                return self.conv(node, mod, args[0] if args else kwargs.get("input"))
            if not maps:
                return _DEAD
            if isinstance(mod, nn.BatchNorm2d):
                return self.batchnorm(node, mod, maps[0])
            if isinstance(mod, _PASS_MODULES):
                return _Map(maps[0].nodes)
            if isinstance(mod, nn.AvgPool2d):
                return self.avgpool(node, maps[0], mod.kernel_size, mod.stride)
            if isinstance(mod, _END_MODULES):
                return _DEAD
            raise self.fail(node, f"a {type(mod).__name__}")
        if not maps:
            return _DEAD
        target = node.target
        if node.op == "call_function":
            if target in _PASS_FUNCTIONS:
                return _Map(maps[0].nodes)
            if target in _END_FUNCTIONS:
                return _DEAD
            if target in _ADD_FUNCTIONS:
                return self.add(node, args)
            if target is F.avg_pool2d:
                kernel = args[1] if len(args) > 1 else kwargs.get("kernel_size")
                stride = args[2] if len(args) > 2 else kwargs.get("stride")
                return self.avgpool(node, maps[0], kernel, stride or kernel)
            if target is operator.getitem:
                return self.getitem(node, args[0], args[1])
            if target is F.pad:
                return self.pad(node, args, kwargs)
            if target is torch.cat:
                dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
                if dim in (1, -3) and all(isinstance(a, _Map) for a in args[0]):
                    return _Map(torch.cat([a.nodes for a in args[0]]))
            raise self.fail(node, getattr(target, "__name__", str(target)))
        if node.op == "call_method":
            if target in _PASS_METHODS:
                return _Map(maps[0].nodes)
            if target in _END_METHODS:
                return _DEAD
            if target in ("add", "add_"):
                return self.add(node, args)
        raise self.fail(node, f"the method .{target}()")

    def conv(self, node: fx.Node, mod: nn.Conv2d | DGConv2d, x: Any) -> _Map:
        name = f"{node.target}.weight"
        if not isinstance(x, _Map):
            raise self.fail(node, "a conv after the channel graph ended (global pooling, flatten)")
        if name in self.seen:
            raise self.fail(node, f"a second call of the same conv '{node.target}' (shared weights)")
        self.seen.add(name)
        groups = mod.groups if isinstance(mod, nn.Conv2d) else 1  # DGConv2d.groups() is its learned count
        if len(x.nodes) != mod.in_channels:
            raise self.fail(node, f"conv '{node.target}' reading {len(x.nodes)} channels instead of "
                                  f"{mod.in_channels}")
        if bool((x.nodes < 0).any()):
            raise self.fail(node, f"conv '{node.target}' reading a zero-padded channel")
        weight = mod.weight.detach()
        if isinstance(mod, DGConv2d):
            weight = effective_weight(weight, mod.gate.detach())
        out_ch, per_group = weight.shape[0], weight.shape[1]
        src = x.nodes.view(groups, per_group).repeat_interleave(out_ch // groups, dim=0)
        conv = _Conv(name, weight, tuple(mod.stride), tuple(mod.dilation), src, self.graph.new(out_ch))
        self.graph.ops.append(conv)
        return _Map(conv.out, conv, node)

    def batchnorm(self, node: fx.Node, mod: nn.BatchNorm2d, x: _Map) -> _Map:
        if mod.running_var is None:
            raise self.fail(node, f"BatchNorm '{node.target}' without running statistics")
        factor = mod.running_var.detach().double().add(mod.eps).rsqrt()
        if mod.weight is not None:
            factor = factor * mod.weight.detach().double().abs()
        conv = x.conv
        if conv is not None and conv.bn is None and x.source is not None and len(x.source.users) == 1:
            conv.bn = factor.cpu()  # folded: every edge into output channel o times |gamma_o| / sqrt(var_o + eps)
            return _Map(x.nodes)
        return self.fixed(x.nodes, factor.cpu())

    def fixed(self, nodes: torch.Tensor, weight: torch.Tensor) -> _Map:
        """A per-channel fixed edge (an unfolded BatchNorm, average pooling) into new nodes."""
        out = torch.where(nodes >= 0, self.graph.new(len(nodes)), -1)
        self.graph.ops.append(_Fixed(nodes[nodes >= 0], out[nodes >= 0], weight.double()[nodes >= 0]))
        return _Map(out)

    def avgpool(self, node: fx.Node, x: _Map, kernel: Any, stride: Any) -> _Map:
        k = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        s = (stride, stride) if isinstance(stride, int) else tuple(stride or k)
        if len(set(s)) != 1 or s[0] not in (1, 2):
            raise self.fail(node, f"average pooling with stride {s} (the operator norm takes 1 and 2)")
        uniform = torch.full((1, 1, *k), 1.0 / (k[0] * k[1]), dtype=torch.float64)
        norm = operator_norms(uniform, s[0], self.size).reshape(())
        return self.fixed(x.nodes, norm.expand(len(x.nodes)))

    def add(self, node: fx.Node, args: tuple) -> _Map:
        maps = [a for a in args if isinstance(a, _Map)]
        if len(maps) == 1:
            return _Map(maps[0].nodes)  # plus a constant: the same channels
        if len(maps) != 2 or len(maps[0].nodes) != len(maps[1].nodes):
            raise self.fail(node, "an addition of tensors with different channel counts")
        ins = torch.stack([maps[0].nodes, maps[1].nodes], dim=1)
        if bool((ins < 0).all(dim=1).any()):
            raise self.fail(node, "an addition of two zero channels")
        out = self.graph.new(len(ins))
        dst = out[:, None].expand_as(ins)
        ins_sorted = ins.sort(dim=1).values  # edges into a node in source order, as the reference sorts them
        keep = ins_sorted >= 0
        self.graph.ops.append(_Fixed(ins_sorted[keep], dst[keep], torch.ones(int(keep.sum()), dtype=torch.float64)))
        return _Map(out)

    def getitem(self, node: fx.Node, x: Any, index: Any) -> _Map:
        if not isinstance(x, _Map):
            raise self.fail(node, "indexing")
        index = index if isinstance(index, tuple) else (index,)
        if index and index[0] != slice(None):
            raise self.fail(node, "indexing the batch dimension")
        channel = index[1] if len(index) > 1 else slice(None)
        if not isinstance(channel, slice) or any(not isinstance(i, slice) for i in index[2:]):
            raise self.fail(node, "indexing other than by slices")
        return _Map(x.nodes[channel])  # spatial subsampling selects pixels: norm 1, the same channels

    def pad(self, node: fx.Node, args: tuple, kwargs: dict) -> _Map:
        x = args[0]
        pad = tuple(args[1] if len(args) > 1 else kwargs["pad"])
        mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
        value = args[3] if len(args) > 3 else kwargs.get("value", None)
        if mode != "constant" or value not in (None, 0, 0.0) or any(p < 0 for p in pad):
            raise self.fail(node, "padding other than with zeros")
        if len(pad) <= 4:
            return _Map(x.nodes)
        if len(pad) != 6:
            raise self.fail(node, "padding beyond the channel dimension")
        zeros = torch.full((pad[4],), -1), torch.full((pad[5],), -1)
        return _Map(torch.cat([zeros[0], x.nodes, zeros[1]]))


def _read(model: nn.Module, image_size: int) -> _Graph:
    return _Reader(model, image_size).run()


def _convs(graph: _Graph) -> list[_Conv]:
    return [op for op in graph.ops if isinstance(op, _Conv)]


def _edge_weights(conv: _Conv, image_size: int) -> torch.Tensor:
    """[O, I/groups]: the kernel's operator norm times the BN factor of its output channel (float64)."""
    layer = conv.name[: -len(".weight")]
    if len(set(conv.stride)) != 1:
        raise CriterionError(f"conv '{layer}' has stride {conv.stride}; the operator norm needs a square stride")
    if set(conv.dilation) != {1}:
        raise CriterionError(f"conv '{layer}' has dilation {conv.dilation}; the operator norm is implemented "
                             "for dilation 1 only")
    try:
        norms = operator_norms(conv.weight, conv.stride[0], image_size).double().cpu()
    except CriterionError as e:
        raise CriterionError(f"conv '{layer}': {e}") from None
    return norms if conv.bn is None else norms * conv.bn[:, None]


def _check_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise CriterionError(f"image_size must be a positive integer, got {image_size!r}")


def kernel_scores(model: nn.Module, criterion: str, image_size: int = DEFAULT_IMAGE_SIZE) -> dict[str, torch.Tensor]:
    """Per-kernel weights [O, I/groups] per conv weight name: l1 norms (``indiv_l1``) or operator norm x BN
    factor (``lean``, ``indiv_sv``: LEAN's edge weights), float64 on the CPU, in the graph's layer order."""
    check_criterion(criterion)
    _check_size(image_size)
    graph = _read(model, image_size)
    if criterion == "indiv_l1":
        return {c.name: c.weight.double().abs().sum(dim=(2, 3)).cpu() for c in _convs(graph)}
    return {c.name: _edge_weights(c, image_size) for c in _convs(graph)}


def _top(scores: dict[str, torch.Tensor], n_keep: int) -> dict[str, torch.Tensor]:
    """The n_keep largest scores over all layers (one global threshold); ties go to the earlier kernel."""
    return _split(_largest(_finite(torch.cat([s.reshape(-1) for s in scores.values()]).numpy()), n_keep), scores)


def _finite(values: np.ndarray) -> np.ndarray:
    if not np.isfinite(values).all():
        raise CriterionError("the model's conv or BatchNorm weights hold NaN or Inf: no kernel ranking exists")
    return values


def _split(kept: np.ndarray, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for name, s in like.items():
        out[name] = torch.from_numpy(kept[start:start + s.numel()].copy()).view(s.shape)
        start += s.numel()
    return out


def _lean(graph: _Graph, image_size: int, keep: float) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    src, dst, w, fixed = [], [], [], []
    for op in graph.ops:
        if isinstance(op, _Conv):
            weights[op.name] = ew = _edge_weights(op, image_size)
            src.append(op.src.reshape(-1))
            dst.append(op.out.repeat_interleave(op.src.shape[1]))
            w.append(ew.reshape(-1))
            fixed.append(torch.zeros(ew.numel(), dtype=torch.bool))
        else:
            src.append(op.src)
            dst.append(op.dst)
            w.append(op.weight)
            fixed.append(torch.ones(len(op.src), dtype=torch.bool))
    s, d = torch.cat(src).numpy(), torch.cat(dst).numpy()
    f = torch.cat(fixed).numpy()
    # Ops create their nodes in trace order, so the edges come out sorted by target already.
    n_keep = kept_count(keep, int((~f).sum()))
    kept = _chains(graph.nodes, s, d, _finite(torch.cat(w).numpy()), f, n_keep, truncate=True)
    return _split(kept[~f], weights)


def kernel_masks(model: nn.Module, criterion: str, keep: float, image_size: int = DEFAULT_IMAGE_SIZE
                 ) -> dict[str, torch.Tensor]:
    """Bool masks [O, I/groups] per conv weight name (as in ``model.named_parameters()``), True = kept.

    Exactly :func:`kept_count` (keep, N) kernels are kept, N counted over every conv kernel of the network
    (identity shortcuts and pooling are not kernels; the classifier is left out). LEAN stops inside its
    last path at that count (the reference's Python does; its Rust keeps the whole path).
    """
    check_criterion(criterion)
    _check_size(image_size)
    kept_count(keep, 1)  # a keep outside (0, 1] is refused before any work
    if criterion == "lean":
        return _lean(_read(model, image_size), image_size, keep)
    scores = kernel_scores(model, criterion, image_size)
    return _top(scores, kept_count(keep, sum(s.numel() for s in scores.values())))
