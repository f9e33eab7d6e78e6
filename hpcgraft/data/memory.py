"""Data sets held in memory as one uint8 tensor (digits, CIFAR): batches are slices, augmented in torch."""

from __future__ import annotations

import torch

from hpcgraft.data.transforms import normalize, random_crop, random_flip


class InMemoryImages:
    """uint8 images (N, C, H, W) and int64 labels; ``get_batch`` gathers, augments and normalises."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        mean: torch.Tensor,
        std: torch.Tensor,
        *,
        crop_padding: int = 4,
        flip: bool = True,
        pad_black: bool = False,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64)
        self.num_classes = num_classes
        self.mean = mean.to(torch.float32)
        self.std = std.to(torch.float32)
        self.crop_padding = crop_padding
        self.flip = flip
        # The authors pad the raw image with black, then normalise: the border is (0 - mean) / std, not 0.
        self.pad_fill = (torch.zeros_like(self.mean) - self.mean).div_(self.std) if pad_black else None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def get_batch(self, indices: torch.Tensor, augment: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels at ``indices``; augmented with ``augment``'s randomness when given."""
        x = normalize(self.images[indices], self.mean, self.std)
        if augment is not None:
            x = random_crop(x, self.crop_padding, augment, self.pad_fill)
            if self.flip:
                x = random_flip(x, augment)
        return x, self.labels[indices]
