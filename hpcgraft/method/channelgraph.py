"""The channel graph of a model, read off it by torch.fx: nodes are channels, edges 2-D kernels.

Every architecture built from the supported layers works without a per-family table (docs/pruning.md
lists how each layer enters the graph): a conv adds one edge per kernel W[o, i], a BatchNorm folds its
scale into the conv before it (or becomes a fixed per-channel edge), an addition or an average pooling
is a fixed edge, and global pooling, flattening and linear layers end the graph. The channels that reach
the end are the graph's outputs.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from hpcgraft.method.opnorm import CriterionError, operator_norms
from hpcgraft.models.dgconv import DGConv2d, effective_weight


@dataclass
class ConvOp:
    name: str  # the weight's parameter name
    weight: torch.Tensor  # what the layer convolves with (DGConv: the gate-masked weight)
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    src: torch.Tensor  # [O, I/groups] node of each kernel's input channel
    out: torch.Tensor  # [O] output channel nodes
    bn: torch.Tensor | None = None  # [O] |gamma| / sqrt(var + eps) of the BatchNorm folded into it


@dataclass
class FixedOp:
    src: torch.Tensor  # [E] (-1: a zero channel, no edge)
    dst: torch.Tensor  # [E]
    weight: torch.Tensor  # [E]


@dataclass
class ChannelGraph:
    nodes: int = 0
    ops: list[ConvOp | FixedOp] = field(default_factory=list)  # in trace order: an op reads only earlier nodes
    inputs: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # the image channels
    outputs: set[int] = field(default_factory=set)  # channels the end of the graph (pooling, classifier) reads

    def read_by_the_end(self, maps: list[_Map]) -> None:
        for m in maps:
            self.outputs.update(int(v) for v in m.nodes[m.nodes >= 0])

    def new(self, count: int) -> torch.Tensor:
        self.nodes += count
        return torch.arange(self.nodes - count, self.nodes)


@dataclass
class _Map:
    """The channels of one traced value: a graph node per channel, -1 for a channel that is always zero."""

    nodes: torch.Tensor
    conv: ConvOp | None = None  # the conv that produced exactly these nodes, while a BatchNorm may fold in
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
_SHAPE_METHODS = {"size", "dim"}  # read the shape only: no channel reaches the end through them
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
    """Follows the channels of a traced model and records the graph's ops (docs/pruning.md: how layers enter)."""

    def __init__(self, model: nn.Module, image_size: int) -> None:
        self.model, self.size = model, image_size
        try:
            self.fx_graph = _Tracer().trace(model)
        except Exception as e:  # noqa: BLE001 - any tracing failure is the same answer for the user
            raise CriterionError(f"cannot follow {type(model).__name__} with torch.fx ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}); kernel criteria need a "
                                 f"traceable model of {_SUPPORTED}") from None
        self.graph = ChannelGraph()
        self.seen: set[str] = set()

    def fail(self, node: fx.Node, what: str) -> CriterionError:
        return CriterionError(f"kernel criteria cannot follow the channels of {type(self.model).__name__} "
                              f"through {what} (at '{node.name}'); supported: {_SUPPORTED}")

    def run(self) -> ChannelGraph:
        env: dict[fx.Node, Any] = {}
        first = next((n for n in self.fx_graph.nodes if n.op == "call_module"
                      and isinstance(self.model.get_submodule(str(n.target)), (nn.Conv2d, DGConv2d))), None)
        if first is None:
            raise CriterionError(f"{type(self.model).__name__} has no Conv2d layer: nothing for a kernel "
                                 "criterion to prune")
        inputs = self.graph.inputs = self.graph.new(self.model.get_submodule(str(first.target)).in_channels)
        for node in self.fx_graph.nodes:
            if node.op == "placeholder":
                env[node] = _Map(inputs)
            elif node.op == "get_attr":
                env[node] = _DEAD
            elif node.op == "output":  # a fully convolutional model: its last feature maps are the output
                self.graph.read_by_the_end([a for a in _flat_args(fx.node.map_arg(node.args, lambda n: env[n]))
                                            if isinstance(a, _Map)])
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
                self.graph.read_by_the_end(maps)
                return _DEAD
            raise self.fail(node, f"a {type(mod).__name__}")
        if not maps:
            return _DEAD
        target = node.target
        if node.op == "call_function":
            if target in _PASS_FUNCTIONS:
                return _Map(maps[0].nodes)
            if target in _END_FUNCTIONS:
                self.graph.read_by_the_end(maps)
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
                if target not in _SHAPE_METHODS:
                    self.graph.read_by_the_end(maps)
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
        conv = ConvOp(name, weight, tuple(mod.stride), tuple(mod.dilation), src, self.graph.new(out_ch))
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
        self.graph.ops.append(FixedOp(nodes[nodes >= 0], out[nodes >= 0], weight.double()[nodes >= 0]))
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
        self.graph.ops.append(FixedOp(ins_sorted[keep], dst[keep], torch.ones(int(keep.sum()), dtype=torch.float64)))
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


def read_graph(model: nn.Module, image_size: int) -> ChannelGraph:
    return _Reader(model, image_size).run()


def conv_ops(graph: ChannelGraph) -> list[ConvOp]:
    return [op for op in graph.ops if isinstance(op, ConvOp)]
