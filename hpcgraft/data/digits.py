"""The UCI handwritten digits shipped inside scikit-learn: real data that works offline.

1797 grey 8x8 images, 10 classes. A fixed, seeded, stratified 80/20 split (independent of the run seed)
so every run and every peer is scored on the same test images.
"""

from __future__ import annotations

import numpy as np
import torch

from hpcgraft.data.memory import InMemoryImages

SPLIT_SEED = 20200113  # fixed: the split is part of the data set, not of the run


def load_digits_split() -> tuple[InMemoryImages, InMemoryImages]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    labels = bunch.target.astype(np.int64)
    rng = np.random.default_rng(SPLIT_SEED)
    test_idx = []
    for cls in range(10):  # stratified: 20 % of every class
        members = np.flatnonzero(labels == cls)
        test_idx.extend(rng.choice(members, size=len(members) // 5, replace=False).tolist())
    test_mask = np.zeros(len(labels), dtype=bool)
    test_mask[test_idx] = True
    train = torch.from_numpy(images[~test_mask]), torch.from_numpy(labels[~test_mask])
    test = torch.from_numpy(images[test_mask]), torch.from_numpy(labels[test_mask])
    mean = train[0].float().div(255).mean().reshape(1)
    std = train[0].float().div(255).std().reshape(1)
    # Digits are not mirror-symmetric: augmentation is a one-pixel shift, no flip.
    return (
        InMemoryImages(*train, 10, mean, std, crop_padding=1, flip=False),
        InMemoryImages(*test, 10, mean, std, crop_padding=1, flip=False),
    )
