"""The UCI handwritten digits, shipped inside this package: real data that works offline.

1797 grey 8x8 images, 10 classes. A fixed, seeded, stratified 80/20 split (independent of the run seed)
so every run and every peer is scored on the same test images.

``digits.npz`` holds the images as scikit-learn ships them (``sklearn.datasets.load_digits``: uint8 pixel
counts 0-16, 45 kB compressed), so the default install needs neither scikit-learn nor scipy. Source: the
test set of "Optical Recognition of Handwritten Digits" (E. Alpaydin, C. Kaynak, 1998), UCI Machine
Learning Repository, https://doi.org/10.24432/C50P49, licensed CC BY 4.0; as distributed with scikit-learn
(BSD-3-Clause). ``digits-LICENSE.txt`` beside it travels with the data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hpcgraft.data.memory import InMemoryImages

SPLIT_SEED = 20200113  # fixed: the split is part of the data set, not of the run
DIGITS_FILE = Path(__file__).with_name("digits.npz")


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) uint8 in 0-16, labels (1797,) int64), in scikit-learn's order."""
    with np.load(DIGITS_FILE, allow_pickle=False) as f:  # arrays only: nothing in the file runs code
        return f["images"], f["labels"].astype(np.int64)


def load_digits_split() -> tuple[InMemoryImages, InMemoryImages]:
    counts, labels = digits_arrays()
    images = np.round(counts.astype(np.float64) * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
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


def load_digits32_split() -> tuple[InMemoryImages, InMemoryImages]:
    """The same split, each image resized to 32x32 (bilinear) and repeated over 3 channels.

    A CIFAR architecture (ResNet-20 with its shortcuts) then runs on the digits unchanged. A data option
    rather than a transform of one tool, because the prune and evaluate commands rebuild the test set
    from the run's config. The shift augmentation scales with the image: 4 pixels, as one of the 8x8."""
    import torch.nn.functional as F

    sets = load_digits_split()
    grown = [F.interpolate(s.images.float(), size=(32, 32), mode="bilinear", align_corners=False)
             .round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous() for s in sets]
    mean = grown[0].float().div(255).mean().repeat(3)
    std = grown[0].float().div(255).std().repeat(3)
    return tuple(InMemoryImages(g, s.labels, 10, mean, std, crop_padding=4, flip=False)  # type: ignore[return-value]
                 for g, s in zip(grown, sets, strict=True))
