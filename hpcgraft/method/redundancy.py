"""Redundant kernels: kept by a criterion, yet on no path from the image to the end of the network.

After a criterion keeps its fraction, a kept kernel W[o, i] can still do nothing: its input channel i
is dead (every kernel into it was pruned, and no shortcut feeds it, so it is exactly zero), or its output
channel o reaches the end of the network (global pooling, the classifier) through no kept kernel and no
shortcut. Counting such kernels as kept flatters a criterion whose picks scatter (the chain criteria
less than per-kernel ones), so they are removed by default, and both counts are reported.

The LEAN reference (schoonhovenrichard/LEAN_CNN_pruning, ``Redun=True``) removes the first kind, layer
by layer; here both kinds are removed, by reachability on the channel graph of
:mod:`hpcgraft.method.channelgraph`: a kernel stays when its input channel is reachable from the image
and its output channel reaches the end, along kept kernels and fixed edges (identity shortcuts,
unfolded BatchNorms, average pooling). That is a fixed point: removing the found kernels makes no
other kernel redundant.
"""

from __future__ import annotations

import numpy as np
import torch

from hpcgraft.method.channelgraph import ChannelGraph, ConvOp


def _edges(op: object, kept: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source node, target node, kept) of every edge of one op; fixed edges are always kept."""
    if isinstance(op, ConvOp):
        per_out = op.src.shape[1]
        alive = kept.get(op.name)
        alive = np.ones(op.src.numel(), dtype=bool) if alive is None else alive.bool().cpu().numpy().reshape(-1)
        return op.src.reshape(-1).numpy(), op.out.repeat_interleave(per_out).numpy(), alive
    return op.src.numpy(), op.dst.numpy(), np.ones(len(op.src), dtype=bool)


def remove_redundant(graph: ChannelGraph, kept: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The kept kernel masks (conv weight name -> bool [O, I/groups]) without their redundant kernels.

    A conv missing from ``kept`` counts as wholly kept. Ops come in trace order (an op reads only earlier
    nodes), so one pass forwards finds the live channels and one pass backwards the useful ones."""
    edges = [_edges(op, kept) for op in graph.ops]
    live = np.zeros(graph.nodes, dtype=bool)
    live[graph.inputs.numpy()] = True
    for src, dst, alive in edges:
        live[dst[alive & live[src]]] = True
    useful = np.zeros(graph.nodes, dtype=bool)
    useful[list(graph.outputs)] = True
    for src, dst, alive in reversed(edges):
        useful[src[alive & useful[dst]]] = True
    out = {}
    for op, (src, dst, alive) in zip(graph.ops, edges, strict=True):
        if isinstance(op, ConvOp) and op.name in kept:
            stays = alive & live[src] & useful[dst]
            out[op.name] = torch.from_numpy(stays).view(kept[op.name].shape)
    return {name: out.get(name, m) for name, m in kept.items()}
