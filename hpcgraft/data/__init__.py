"""Data: data sets by name, and a deterministic, resumable batch loader shared by all of them.

The order of every epoch and the augmentation of every batch are derived from (seed, stream, epoch,
batch), so a peer resumed mid-epoch sees exactly the batches it would have seen, and peers that must
see the same batches (cultivation) only need the same stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

from hpcgraft.data.cifar import load_cifar
from hpcgraft.data.digits import load_digits32_split, load_digits_split
from hpcgraft.errors import DataError
from hpcgraft.method import seeding

__all__ = ["BatchLoader", "DataError", "ImageSet", "build_datasets", "list_datasets"]


class ImageSet(Protocol):
    """What the loader needs from a data set."""

    num_classes: int

    def __len__(self) -> int: ...

    def get_batch(self, indices: torch.Tensor, augment: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        ...


def list_datasets() -> list[str]:
    return ["digits", "digits32", "cifar10", "cifar100", "imagenet", "imagenet_h5"]


def build_datasets(name: str, root: str | None = None, image_size: int = 224,
                   reference: str = "paper") -> tuple[ImageSet, ImageSet]:
    """(train, test) of a data set by name; a missing or malformed data set raises :class:`DataError`.
    ``reference="authors"``: CIFAR as the authors' code prepares it (``data.reference``)."""
    if name == "digits":
        return load_digits_split()
    if name == "digits32":
        return load_digits32_split()
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, root, reference)
    if name in ("imagenet", "imagenet_h5"):
        from hpcgraft.data.imagenet import load_imagenet

        return load_imagenet(name, root, image_size)
    raise DataError(f"data.name={name!r} is not known; use one of: {', '.join(list_datasets())}")


class BatchLoader:
    """Batches of a data set for one rank: peer-level order, replica-level shard, optional workers.

    Training: each epoch is a permutation drawn from ``(seed, stream, epoch)``; the peer's global batch
    of ``batch_size`` is cut into ``replicas`` equal slices and this rank takes slice ``replica``.
    Incomplete last batches are dropped so every peer and replica takes the same number of steps, unless
    ``keep_last`` (one replica only): the authors' loader keeps it (391 CIFAR steps of 128, not 390).
    Evaluation (``shuffle=False``): the data in order, every ``replicas``-th image from ``replica``.
    """

    def __init__(
        self,
        dataset: ImageSet,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        stream: int = 0,
        replica: int = 0,
        replicas: int = 1,
        augment: bool = False,
        workers: int = 0,
        pin_memory: bool = False,
        keep_last: bool = False,
    ) -> None:
        if keep_last and replicas > 1:
            raise ValueError("keep_last needs one replica: a partial batch cannot be split evenly")
        if batch_size % replicas:
            raise ValueError(f"batch size {batch_size} is not divisible by {replicas} replicas")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed, self.stream = seed, stream
        self.replica, self.replicas = replica, replicas
        self.augment = augment
        self.workers = workers
        self.pin_memory = pin_memory
        self.keep_last = keep_last
        self._requests = _Epoch()
        self._loader: torch.utils.data.DataLoader | None = None
        if shuffle and len(dataset) < batch_size:
            raise DataError(f"the training set has {len(dataset)} images, fewer than one batch of {batch_size}")

    def __len__(self) -> int:
        if self.shuffle:
            return -(-len(self.dataset) // self.batch_size) if self.keep_last else len(self.dataset) // self.batch_size
        n = len(range(self.replica, len(self.dataset), self.replicas))
        per_rank = self.batch_size // self.replicas
        return (n + per_rank - 1) // per_rank

    def _index_batches(self, epoch: int) -> list[torch.Tensor]:
        if not self.shuffle:
            own = torch.arange(self.replica, len(self.dataset), self.replicas)
            return list(own.split(self.batch_size // self.replicas))
        order = torch.randperm(len(self.dataset), generator=seeding.generator(seeding.DATA_ORDER, self.seed,
                                                                              self.stream, epoch))
        if self.keep_last:
            return list(order.split(self.batch_size))
        per_rank = self.batch_size // self.replicas
        batches = order[: len(self) * self.batch_size].view(len(self), self.batch_size)
        return list(batches[:, self.replica * per_rank : (self.replica + 1) * per_rank])

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of ``epoch`` from batch number ``start`` on (resume mid-epoch)."""
        requests = [
            (idx, self._augment_keys(epoch, b)) for b, idx in enumerate(self._index_batches(epoch)) if b >= start
        ]
        if self.workers == 0:
            for idx, keys in requests:
                yield self._load(idx, keys)
            return
        self._requests.current = requests
        yield from self._workers()

    def _workers(self) -> torch.utils.data.DataLoader:
        """One DataLoader for the whole run: its worker processes start with the first epoch and are reused, so
        an epoch does not wait for the workers to start (and a reader to reopen its files) again. The requests
        travel as the sampler's items, so the workers hold no per-epoch state."""
        if self._loader is None:
            self._loader = torch.utils.data.DataLoader(
                _Requests(self), batch_size=None, sampler=self._requests, num_workers=self.workers,
                pin_memory=self.pin_memory, persistent_workers=True, prefetch_factor=4,
            )
        return self._loader

    def __getstate__(self) -> dict:
        """What a worker started by spawn receives: everything but the DataLoader (it runs in the parent)."""
        return {**self.__dict__, "_loader": None}

    def _augment_keys(self, epoch: int, batch: int) -> tuple[int, ...] | None:
        if not (self.shuffle and self.augment):
            return None
        return (seeding.AUGMENT, self.seed, self.stream, epoch, batch, self.replica)

    def _load(self, idx: torch.Tensor, keys: tuple[int, ...] | None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dataset.get_batch(idx, seeding.generator(*keys) if keys is not None else None)


class _Epoch(torch.utils.data.Sampler):
    """The requests (indices, augmentation keys) of the epoch being read, in order."""

    def __init__(self) -> None:
        self.current: list[tuple[torch.Tensor, tuple[int, ...] | None]] = []

    def __len__(self) -> int:
        return len(self.current)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, tuple[int, ...] | None]]:
        return iter(self.current)


class _Requests(torch.utils.data.Dataset):
    """Batch requests as a map-style data set, so DataLoader workers can decode them in parallel."""

    def __init__(self, loader: BatchLoader) -> None:
        self.loader = loader

    def __getitem__(self, request: tuple[torch.Tensor, tuple[int, ...] | None]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loader._load(*request)
