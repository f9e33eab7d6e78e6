"""DGConv, the learned group convolution of Zhang et al. (ICCV 2019, "GroupNet"), and the model option
that swaps it in.

The layer keeps a dense weight and K gate logits for C = 2^K channels; the gates pick, per factor of
two, whether channel halves talk to each other, so the layer learns its group count anywhere from
depthwise (2^K groups) to dense (1 group). The mask is a Kronecker product of 2x2 factors, built from
the gates on every forward, so the state dict holds only ``weight`` and ``gate``: grafting, checkpoints
and export see two ordinary tensors, and the mask can never disagree with the gates it came from.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

GATE_INIT_EPS = 1e-8  # the reference's initial |g~|: every gate sits at the sign's edge


def binary_gates(gate: torch.Tensor) -> torch.Tensor:
    """g = (sign(g~) + 1) / 2 in the forward, identity gradient in the backward (straight-through),
    because sign has zero gradient almost everywhere and the gates would never move otherwise.

    A logit of exactly 0 counts as closed (sign(0) = 0 would give g = 1/2, a mask that is no grouping):
    grafting at alpha = 1/2 mixes the reference's initial +-1e-8 gates of two peers to exactly 0."""
    hard = (gate > 0).to(gate.dtype)
    return gate + (hard - gate).detach()


def kron_mask(g: torch.Tensor) -> torch.Tensor:
    """U = U_1 kron ... kron U_K with U_k = (1 - g_k) I_2 + g_k 1_2; differentiable in g.

    Gate 1 is the outermost factor: g = [0, .., 0, 1] pairs neighbouring channels (contiguous groups),
    g = [1, 0, .., 0] pairs channel i with i + C/2 (interleaved groups)."""
    eye = torch.eye(2, dtype=g.dtype, device=g.device)
    ones = torch.ones(2, 2, dtype=g.dtype, device=g.device)
    u = torch.ones(1, 1, dtype=g.dtype, device=g.device)
    for gk in g.unbind(0):
        u = torch.kron(u, (1 - gk) * eye + gk * ones)
    return u


def effective_weight(weight: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """W~ = W * U: what the layer convolves with, and what grafting measures."""
    u = kron_mask(binary_gates(gate).to(weight.dtype))
    return weight * u.view(*u.shape, *([1] * (weight.dim() - 2)))


def group_count(gate: torch.Tensor) -> int:
    """2^(K - sum g): the number of independent channel groups the gates select."""
    return 2 ** (gate.numel() - int((gate.detach() > 0).sum()))


def gate_exponent(channels: int) -> int:
    """K with C = 2^K; anything else cannot be written as a Kronecker product of 2x2 factors."""
    k = int(math.log2(channels)) if channels > 0 else -1
    if k < 1 or 2 ** k != channels:
        raise ValueError(f"DGConv needs a power-of-two channel count >= 2, got {channels}")
    return k


class DGConv2d(nn.Module):
    """A square conv (C_in = C_out = 2^K) whose weight is masked by the learned grouping."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, dilation: int = 1, gate_init: str = "random", bias: bool = False) -> None:
        super().__init__()
        if in_channels != out_channels:
            raise ValueError(f"DGConv needs C_in == C_out, got {in_channels} -> {out_channels}")
        k = gate_exponent(in_channels)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kernel_size,) * 2
        self.stride, self.padding, self.dilation = (stride,) * 2, (padding,) * 2, (dilation,) * 2
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        if gate_init == "random":  # the reference: +-eps, random sign, from the global generator (seeded)
            signs = torch.randint(0, 2, (k,)).float() * 2 - 1
        elif gate_init == "depthwise":
            signs = -torch.ones(k)
        else:
            raise ValueError(f"model.dgconv_init must be 'random' or 'depthwise', got {gate_init!r}")
        self.gate = nn.Parameter(signs * GATE_INIT_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, effective_weight(self.weight, self.gate), self.bias, self.stride, self.padding,
                        self.dilation)

    def complexity(self) -> torch.Tensor:
        """zeta = nnz(U) = 2^(K + sum g), with the gates' straight-through gradient."""
        return 2 ** (self.gate.numel() + binary_gates(self.gate).sum())

    def groups(self) -> int:
        return group_count(self.gate)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"


def _unfit(conv: nn.Conv2d) -> str | None:
    """Why a 3x3 conv cannot become a DGConv (None when it can)."""
    c = conv.in_channels
    if conv.groups != 1:
        return f"it is already grouped (groups={conv.groups})"
    if conv.out_channels != c:
        return f"it is not square ({c} -> {conv.out_channels} channels)"
    if c < 2 or c & (c - 1):
        return f"its width {c} is not a power of two"
    if conv.padding_mode != "zeros":
        return f"its padding mode is {conv.padding_mode}"
    return None


def apply_dgconv(model: nn.Module, gate_init: str = "random") -> list[str]:
    """Replace every square 3x3 conv of power-of-two width by a DGConv2d carrying its weight.

    Stems and the channel-changing convs of downsampling blocks stay dense, as in GroupNet. A square
    3x3 conv of another width is an error naming the layer (a half-converted model is not the method
    asked for), and so is a model where nothing converts (MobileNetV2: its 3x3 convs are depthwise).
    Returns the replaced layer names.
    """
    candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    replaced = []
    for name, conv in candidates:
        why = _unfit(conv)
        if why is not None and (conv.groups != 1 or conv.out_channels != conv.in_channels):
            continue
        if why is not None:
            raise ValueError(f"model.dgconv=true cannot convert layer '{name}': {why}")
        layer = DGConv2d(conv.in_channels, conv.out_channels, 3, conv.stride[0], conv.padding[0],  # type: ignore[arg-type]
                         conv.dilation[0], gate_init, conv.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)  # type: ignore[union-attr]
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer)
        replaced.append(name)
    if not replaced:
        square = [(n, m) for n, m in candidates if m.in_channels == m.out_channels] or candidates
        first = f" (layer '{square[0][0]}': {_unfit(square[0][1])})" if square else ""
        raise ValueError(f"model.dgconv=true: the model has no square 3x3 conv of power-of-two width{first}")
    return replaced


def dgconv_layers(model: nn.Module) -> dict[str, DGConv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DGConv2d)}


def total_complexity(model: nn.Module) -> torch.Tensor | None:
    layers = list(dgconv_layers(model).values())
    return torch.stack([m.complexity() for m in layers]).sum() if layers else None


def budget_scale(model: nn.Module, budget: float, under: float = 0.0, over: float = -0.02) -> torch.Tensor | None:
    """(o / zeta)^a, the resource-constrained loss factor: a = ``under`` while zeta <= o, ``over`` above.

    With a < 0 over the budget, the factor grows with zeta, so the gradient through the straight-through
    gates pushes towards fewer connections; under it (a = 0 by default) it is 1 and gates train freely."""
    zeta = total_complexity(model)
    if zeta is None:
        return None
    a = under if float(zeta.detach()) <= budget else over
    return (budget / zeta) ** a


def default_budget(model: nn.Module) -> float:
    """The reproduction's o = sum C^2 / 32."""
    return sum(m.in_channels * m.out_channels for m in dgconv_layers(model).values()) / 32
