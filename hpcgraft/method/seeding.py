"""Seeds derived from the run seed, so every random stream is a pure function of (seed, purpose, ...).

Deriving instead of drawing from one global generator is what makes runs reproducible per peer and
resumable mid-epoch without replaying the past: the stream of epoch 7, batch 12 is known directly.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys; different key tuples give independent streams."""
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def generator(*keys: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(derive_seed(*keys))
    return g


def seed_everything(seed: int) -> None:
    """Seed the global generators (torch, CUDA, numpy, python) for code that draws from them."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# Purposes: the first key of every derived stream.
INIT, DATA_ORDER, AUGMENT, NOISE = 1, 2, 3, 4
