"""The grafting math of the papers, as pure functions on tensors and state dicts (no MPI here).

A network's floating tensors are grouped into *layers*: a conv or linear weight (the anchor), the
tensors of the same module (bias) and the normalisation layer that directly follows it (BatchNorm's
weight, bias, running mean and variance). A whole group is mixed with one coefficient, computed from
the entropies of the anchors (or one per output filter at filter level). Integer buffers are left alone.

The distributed exchange (:mod:`hpcgraft.comm.exchange`) and the offline command (:mod:`hpcgraft.graft`) both
call these functions, so a grafted peer is bit-for-bit what :func:`graft_state` computes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from hpcgraft.config import Config, authors_reference_conflict
from hpcgraft.method import authors as _authors_code
from hpcgraft.method.groups import LayerGroup
from hpcgraft.models import dgconv

__all__ = ["LayerGroup"]  # re-exported: the exchange and tools plan with it
State = Mapping[str, torch.Tensor]
WEIGHT_EPS = 1e-6  # keeps entropy weights positive in the allreduce topology


# --------------------------------------------------------------------------------------------- entropy
def filter_entropies(x: torch.Tensor, bins: int = 10) -> torch.Tensor:
    """Histogram entropy of every row of ``x`` (F, N) at once: one min/max pass, one binning pass.

    Bins are equal-width over each row's [min, max] (the maximum falls in the last bin), entropies in
    nats, empty bins skipped; a constant row has entropy 0. Returns float32 (F,) on ``x``'s device.
    """
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    x = x.detach().reshape(x.shape[0], -1)
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    f, n = x.shape
    # amin/amax along rows are vectorised where aminmax(dim=1) is not; a single row reduces globally.
    lo, hi = torch.aminmax(x) if f == 1 else (x.amin(1, keepdim=True), x.amax(1, keepdim=True))
    span = hi - lo
    scale = torch.where(span > 0, bins / span, torch.zeros_like(span))
    pos = torch.sub(x, lo).mul_(scale)  # one temporary, reused in place
    # int32 halves the traffic of the bin indices; clamp puts the maximum (and NaN) in a valid bin
    idx = pos.to(torch.int32).clamp_(0, bins - 1)
    if f > 1:
        idx += torch.arange(0, f * bins, bins, dtype=torch.int32, device=x.device)[:, None]
    counts = torch.bincount(idx.view(-1), minlength=f * bins).view(f, bins)
    p = counts.to(torch.float32) / n
    return -torch.special.xlogy(p, p).sum(dim=1)


def entropy_tensor(x: torch.Tensor, bins: int = 10) -> torch.Tensor:
    """Histogram entropy of a whole tensor, as a 0-d float32 tensor on its device (no host sync)."""
    return filter_entropies(x.reshape(1, -1), bins)[0]


def entropy(x: torch.Tensor, bins: int = 10) -> float:
    """Histogram entropy H(W) = -sum_k p_k ln p_k of a tensor's values (docs/method.md, "Entropy criterion")."""
    return float(entropy_tensor(x, bins))


# --------------------------------------------------------------------------------------- coefficient
def coefficient(h_self: float, h_source: float, a: float = 0.4, c: float = 500.0) -> float:
    """alpha = a/pi * arctan(c * (h_self - h_source)) + 1/2: the share of itself a peer keeps."""
    return a / math.pi * math.atan(c * (h_self - h_source)) + 0.5


def coefficients(
    h_self: torch.Tensor, h_source: torch.Tensor, a: float = 0.4, c: float = 500.0, round_alpha: bool = False
) -> torch.Tensor:
    """Element-wise :func:`coefficient` in float64; ``round_alpha`` reproduces the authors' 2 decimals."""
    diff = h_self.to(torch.float64) - h_source.to(torch.float64)
    alpha = a / math.pi * torch.atan(c * diff) + 0.5
    return torch.round(alpha, decimals=2) if round_alpha else alpha


def layer_coefficients(h_self: Sequence[torch.Tensor], h_source: Sequence[torch.Tensor], a: float = 0.4,
                       c: float = 500.0, round_alpha: bool = False) -> list[torch.Tensor]:
    """:func:`coefficients` of every layer (0-d or per filter) in one batched computation: a network
    has hundreds of layers and one tiny tensor op per layer costs more than the arithmetic."""
    if not h_self:
        return []
    flat = coefficients(torch.cat([h.reshape(-1) for h in h_self]), torch.cat([h.reshape(-1) for h in h_source]),
                        a, c, round_alpha)
    return [part.view(h.shape) for part, h in zip(flat.split([h.numel() for h in h_self]), h_self, strict=True)]


# ---------------------------------------------------------------------------------------------- plan
def plan_layers(state: State) -> list[LayerGroup]:
    """Group a state dict's floating tensors into layers, in state-dict (= registration) order.

    A module with a weight of two or more dimensions is a layer; a following module whose floating
    tensors are all 1-D of the layer's output size (a BatchNorm, GroupNorm, LayerNorm) joins it. Any
    other floating tensor forms a group of its own.
    """
    modules: dict[str, list[str]] = {}
    for key, t in state.items():
        if t.is_floating_point():
            modules.setdefault(key.rpartition(".")[0], []).append(key)
    groups: list[LayerGroup] = []
    open_layer: int | None = None  # index in groups of a layer still waiting for its norm
    for keys in modules.values():
        tensors = [state[k] for k in keys]
        anchors = [k for k in keys if state[k].dim() >= 2]
        if anchors:
            main = next((k for k in anchors if k.endswith("weight")), anchors[0])
            gate = gate_of(state, main)
            rest = tuple(k for k in keys if k != main and (k == gate or state[k].dim() < 2 and state[k].shape[:1] ==
                         state[main].shape[:1]))
            groups.append(LayerGroup(main, (main, *rest), state[main].shape[0], True, gate))
            open_layer = len(groups) - 1
            for k in keys:
                if k != main and k not in rest:
                    groups.append(LayerGroup(k, (k,), state[k].shape[0] if state[k].dim() else 1,
                                             state[k].dim() >= 2))
            continue
        sizes = {t.shape for t in tensors}
        if open_layer is not None and len(sizes) == 1 and tensors[0].dim() == 1:
            layer = groups[open_layer]
            if tensors[0].shape[0] == layer.filters:
                groups[open_layer] = LayerGroup(layer.anchor, layer.members + tuple(keys), layer.filters, True)
                open_layer = None
                continue
        open_layer = None
        main = next((k for k in keys if k.endswith("weight")), keys[0])
        groups.append(LayerGroup(main, (main, *[k for k in keys if k != main]), 1, False))
    return groups


def gate_of(state: State, weight_key: str) -> str | None:
    """The gate key of a DGConv weight (its module's ``gate``, K logits for 2^K square channels)."""
    gate = weight_key.rpartition(".")[0] + ".gate"
    w, g = state[weight_key], state.get(gate)
    if g is None or w.dim() != 4 or g.dim() != 1 or w.shape[0] != w.shape[1] or w.shape[0] != 2 ** g.numel():
        return None
    return gate


def used_weight(state: State, weight_key: str) -> torch.Tensor:
    """The weight a layer computes with: W * U(gate) for a DGConv, so that entropies and l1 norms see
    the grouping, not the entries it masks; any other weight as stored."""
    gate = gate_of(state, weight_key)
    w = state[weight_key].detach()
    return w if gate is None else dgconv.effective_weight(w, state[gate].detach())


def mask_gated_(state: State, plan: Sequence[LayerGroup]) -> None:
    """In place, W <- W * U(gate) for every DGConv layer, before a graft mixes W.

    Masked entries of W get no gradient and keep whatever a past grouping left there; mixed as they
    are, a peer's stale entries would enter the effective weight wherever the mixed gates open a block
    that the peer had closed. Zeroing them first (the layer's function is unchanged) makes each peer
    contribute exactly the weights it used, and zero elsewhere.
    """
    for g in plan:
        if g.gate is not None:
            w = state[g.anchor]
            w.mul_(dgconv.kron_mask(dgconv.binary_gates(state[g.gate].detach()).to(w.dtype)).view(*w.shape[:2], 1, 1))


def plan_signature(plan: Sequence[LayerGroup], state: State) -> list[tuple[str, tuple[int, ...], str]]:
    """Names, shapes and dtypes of every grouped tensor: what peers must agree on to graft."""
    return [(k, tuple(state[k].shape), str(state[k].dtype)) for g in plan for k in g.members]


# ----------------------------------------------------------------------------------------- entropies
BATCH_NUMEL = 1 << 16  # anchors up to this size share one filter_entropies call with their equals


def layer_entropies(state: State, plan: Sequence[LayerGroup], level: str = "layer", bins: int = 10
                    ) -> list[torch.Tensor]:
    """One entropy per group (0-d) at layer level; one per output filter (F,) at filter level.

    Small anchors of the same shape are stacked and binned in one call (rows of the batch are whole
    layers, or filters at filter level): a CIFAR ResNet has dozens of equal 3x3 convs, and per-call
    overhead, not arithmetic, dominates their cost. The results are the same bits as one call each.
    """
    if level not in ("layer", "filter"):
        raise ValueError(f"level must be 'layer' or 'filter', got {level!r}")
    out: list[torch.Tensor | None] = [None] * len(plan)
    batches: dict[tuple, list[int]] = {}
    for i, g in enumerate(plan):
        w = used_weight(state, g.anchor) if g.gate else state[g.anchor]
        rows = w.shape[0] if level == "filter" and g.per_filter else 1
        if w.numel() <= BATCH_NUMEL and w.numel():
            batches.setdefault((rows, w.numel(), w.dtype, w.device, w.dim() > 0), []).append(i)
        else:
            out[i] = filter_entropies(w.reshape(rows, -1), bins) if rows > 1 else entropy_tensor(w, bins)
    for (rows, _, _, _, _), idx in batches.items():
        stacked = torch.cat([(used_weight(state, plan[i].anchor) if plan[i].gate else state[plan[i].anchor]
                              ).reshape(rows, -1) for i in idx])
        for i, h in zip(idx, filter_entropies(stacked, bins).split(rows), strict=True):
            out[i] = h if rows > 1 else h.reshape(())
    return out  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ mixing
def broadcast_to_filters(alpha: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Shape a per-filter (F,) or per-layer () coefficient to broadcast over tensor ``t``."""
    if alpha.dim() == 0:
        return alpha
    return alpha.view(-1, *([1] * (t.dim() - 1)))


def mix_(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], alphas: Sequence[torch.Tensor]) -> None:
    """In place: target <- alpha * target + (1 - alpha) * source, over all tensors in two fused passes.

    ``alphas[i]`` is a 0-d or (F,) float64 coefficient for ``targets[i]`` (members of a group share
    one tensor object, converted once). Written as the papers' sum, not as a lerp, so that alpha = 1/2
    gives exactly the mean, the same bits on both peers of a pair.
    """
    if not targets:
        return
    unique = list({id(a): a for a in alphas}.values())
    complement = dict(zip((id(a) for a in unique), torch._foreach_add(torch._foreach_neg(unique), 1.0), strict=True))
    cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    keep, take = [], []
    for t, a in zip(targets, alphas, strict=True):
        key = (id(a), t.dtype, t.device)
        if key not in cache:
            cache[key] = (a.to(device=t.device, dtype=t.dtype), complement[id(a)].to(device=t.device, dtype=t.dtype))
        keep.append(broadcast_to_filters(cache[key][0], t))
        take.append(broadcast_to_filters(cache[key][1], t))
    torch._foreach_mul_(list(targets), keep)
    torch._foreach_addcmul_(list(targets), list(sources), take)


def per_member(plan: Sequence[LayerGroup], alphas: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The coefficient of every grouped tensor, in plan order (a group's members share theirs).

    A DGConv gate takes the mean of its layer's per-filter coefficients: the K gates act on all
    filters at once, so they can only follow the layer as a whole."""
    return [a.mean() if k == g.gate and a.dim() else a for g, a in zip(plan, alphas, strict=True) for k in g.members]


def member_keys(plan: Sequence[LayerGroup]) -> list[str]:
    return [k for g in plan for k in g.members]


# ------------------------------------------------------------------------------------------- report
@dataclass
class LayerReport:
    name: str
    h_self: float
    h_source: float
    alpha: float  # the coefficient (layer level) or the mean over filters (filter level)
    alpha_min: float
    alpha_max: float
    filters: int


@dataclass
class GraftReport:
    level: str
    layers: list[LayerReport] = field(default_factory=list)

    @property
    def alpha_mean(self) -> float:
        return sum(r.alpha for r in self.layers) / len(self.layers) if self.layers else float("nan")

    def to_dict(self) -> dict:
        return {"level": self.level, "alpha_mean": self.alpha_mean, "layers": [asdict(r) for r in self.layers]}

    def table(self) -> str:
        """One line per layer: name, both entropies, alpha (and its range over filters at filter level)."""
        width = max([len("layer")] + [len(r.name) for r in self.layers])
        by_filter = self.level == "filter"
        head = f"{'layer':<{width}}  {'H self':>8}  {'H source':>8}  {'alpha':>7}"
        head += f"  {'min':>7}  {'max':>7}  {'filters':>7}" if by_filter else ""
        lines = [head]
        for r in self.layers:
            line = f"{r.name:<{width}}  {r.h_self:8.4f}  {r.h_source:8.4f}  {r.alpha:7.4f}"
            lines.append(line + (f"  {r.alpha_min:7.4f}  {r.alpha_max:7.4f}  {r.filters:7d}" if by_filter else ""))
        lines.append(f"{len(self.layers)} layers, mean alpha {self.alpha_mean:.4f} ({self.level} level)")
        return "\n".join(lines)


def make_report(plan: Sequence[LayerGroup], h_self: Sequence[torch.Tensor], h_source: Sequence[torch.Tensor],
                alphas: Sequence[torch.Tensor], level: str) -> GraftReport:
    """Per-layer entropies and coefficients; one host transfer for the whole network."""
    if not plan:
        stats = []
    elif all(al.dim() == 0 for al in alphas):  # layer level: no reductions, three stacks
        hs, ho, al = (torch.stack([x.reshape(()).to(torch.float64) for x in xs]) for xs in (h_self, h_source, alphas))
        stats = torch.stack([hs, ho, al, al, al], dim=1).cpu().tolist()
    else:
        stats = torch.stack([
            torch.stack([hs.double().mean(), ho.double().mean(), al.mean(), al.min(), al.max()])
            for hs, ho, al in zip(h_self, h_source, alphas, strict=True)
        ]).cpu().tolist()
    layers = [
        LayerReport(g.anchor, s[0], s[1], s[2], s[3], s[4], int(a.numel()))
        for g, s, a in zip(plan, stats, alphas, strict=True)
    ]
    return GraftReport(level, layers)


# ------------------------------------------------------------------------------------------- graft
REFERENCES = ("paper", "authors")


@dataclass(frozen=True)
class GraftMath:
    """Which arithmetic a round uses: the paper's method (``reference="paper"``) or the authors' code
    (``"authors"``, :mod:`hpcgraft.method.authors`, with the script ``code`` that grafted the model).
    The exchange and :func:`graft_state` both go through it, so offline and live grafts agree."""

    reference: str = "paper"
    level: str = "layer"
    a: float = 0.4
    c: float = 500.0
    bins: int = 10
    round_alpha: bool = False
    code: str = "grafting_cifar"

    def __post_init__(self) -> None:
        if self.reference not in REFERENCES:
            raise ValueError(f"reference must be one of {', '.join(REFERENCES)}, got {self.reference!r}")
        self.check(level=self.level)

    @classmethod
    def from_config(cls, cfg: Config) -> GraftMath:
        """A run's grafting arithmetic: its graft section, and the authors' script for its model and data."""
        g = cfg.graft
        return cls(g.reference, g.level, g.a, g.c, g.bins, g.round_alpha,
                   _authors_code.code_for(cfg.model.name, cfg.data.name))

    def check(self, **settings: str) -> None:
        """ValueError when the authors' reference cannot do ``settings`` (graft keys: level, topology, mode)."""
        conflict = authors_reference_conflict(**settings) if self.authors else None
        if conflict:
            raise ValueError(conflict)

    @property
    def authors(self) -> bool:
        return self.reference == "authors"

    def plan(self, state: State) -> list[LayerGroup]:
        if self.authors:
            return _authors_code.plan(state, self.code)
        return plan_layers(state)

    def entropies(self, state: State, plan: Sequence[LayerGroup]) -> list[torch.Tensor]:
        if self.authors:
            return _authors_code.entropies(state, plan, self.bins)
        return layer_entropies(state, plan, self.level, self.bins)

    def coefficients(self, h_self: Sequence[torch.Tensor], h_source: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self.authors:
            return _authors_code.coefficients(h_self, h_source, self.a, self.c, self.code)
        return layer_coefficients(h_self, h_source, self.a, self.c, self.round_alpha)

    def mix_(self, targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor],
             alphas: Sequence[torch.Tensor]) -> None:
        if self.authors:
            _authors_code.mix_(targets, sources, alphas)
        else:
            mix_(targets, sources, alphas)


def graft_state(self_state: State, source_state: State, math_: GraftMath | None = None, **settings: Any
                ) -> tuple[dict[str, torch.Tensor], GraftReport]:
    """Graft ``source_state`` into ``self_state`` (same architecture); returns a new state and a report.

    W_self <- alpha * W_self + (1 - alpha) * W_source per layer (or per filter), with alpha from the
    entropies of both anchors, by ``math_`` (or, for a call by hand, a :class:`GraftMath` of ``settings``,
    e.g. ``level="filter", a=0.6``). Neither input is modified; integer buffers are copied from ``self_state``
    (``reference="authors"``: mixed and truncated, as the authors' ``code`` does).
    """
    check_compatible(self_state, source_state)
    if math_ is None:
        math_ = GraftMath(**settings)
    elif settings:
        raise TypeError("graft_state takes a GraftMath or its settings, not both")
    level = math_.level
    plan = math_.plan(self_state)
    h_self = math_.entropies(self_state, plan)
    h_source = math_.entropies(source_state, plan)
    alphas = math_.coefficients(h_self, h_source)
    out = {k: v.clone() for k, v in self_state.items()}
    source_state = {k: v.clone() for k, v in source_state.items()} if any(g.gate for g in plan) else source_state
    mask_gated_(out, plan)
    mask_gated_(source_state, plan)  # type: ignore[arg-type]
    keys = member_keys(plan)
    math_.mix_([out[k] for k in keys], [source_state[k] for k in keys], per_member(plan, alphas))
    return out, make_report(plan, h_self, h_source, alphas, level)


def check_compatible(first: State, second: State) -> None:
    """Same keys, shapes and dtypes, or a ValueError naming the first difference."""
    if list(first) != list(second):
        missing = [k for k in first if k not in second][:1] or [k for k in second if k not in first][:1]
        raise ValueError(f"state dicts differ in their keys (first difference: {missing or 'order'}); "
                         "graft models of the same architecture")
    for k, t in first.items():
        if t.shape != second[k].shape or t.dtype != second[k].dtype:
            raise ValueError(f"tensor '{k}' is {tuple(t.shape)} {t.dtype} in one model and "
                             f"{tuple(second[k].shape)} {second[k].dtype} in the other")


# ---------------------------------------------------------------------------------- invalid filters
def filter_l1_norms(state: State) -> dict[str, torch.Tensor]:
    """l1 norm of every output filter of every conv layer (4-D weights)."""
    return {k: used_weight(state, k).abs().flatten(1).sum(1) for k, t in state.items()
            if t.is_floating_point() and t.dim() == 4 and k.endswith("weight")}


def count_invalid_filters(state: State, thresholds: Sequence[float] = (0.1, 0.01)) -> dict[float, int]:
    """Conv filters whose l1 norm is below each threshold (the papers' "invalid filters")."""
    norms = filter_l1_norms(state)
    if not norms:
        return {t: 0 for t in thresholds}
    allnorms = torch.cat(list(norms.values()))
    counts = torch.stack([(allnorms < t).sum() for t in thresholds]).tolist()
    return dict(zip(thresholds, counts, strict=True))


# ------------------------------------------------------------------------- other information sources
def noise_source(tensors: Sequence[torch.Tensor], gen: torch.Generator) -> list[torch.Tensor]:
    """Gaussian noise with each tensor's own mean and standard deviation (the paper's "noise" source)."""
    out = []
    for t in tensors:
        noise = torch.randn(t.shape, generator=gen, dtype=torch.float32).to(device=t.device, dtype=t.dtype)
        std, mean = torch.std_mean(t.detach().float()) if t.numel() > 1 else (torch.zeros(()), t.detach().float())
        out.append(noise * std.to(t.dtype) + mean.to(t.dtype))
    return out


def self_source(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The network's own other filters: filter f of every layer receives filter f+1 of the same layer
    (with its bias and BatchNorm channel), the paper's "internal" information source."""
    return [t.detach().roll(-1, dims=0) if t.dim() else t.detach().clone() for t in tensors]
