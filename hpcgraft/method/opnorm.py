"""Operator norms of single-channel convolutions: the edge weights of LEAN's graph.

A 2-D kernel W[o, i] convolving a periodic M x M image is a linear operator; its spectral norm (the
largest factor by which it can amplify a signal) is what LEAN multiplies along a chain. Pure torch.
"""

from __future__ import annotations

import math

import torch

from hpcgraft.errors import UserError

_CHUNK = 8192  # kernels per DFT matmul: a few MB of intermediate values


class CriterionError(UserError, ValueError):
    """A kernel-pruning request that cannot be served (criterion, keep fraction, model): one line."""



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
