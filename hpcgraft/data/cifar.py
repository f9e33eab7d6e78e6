"""CIFAR-10 and CIFAR-100 from their standard python-pickle batches on disk.

``data.root`` may point at the extracted folder itself (``cifar-10-batches-py``, ``cifar-100-python``) or
at its parent. These files are the data sets' published format; they are read, never written, here.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from hpcgraft.data.memory import InMemoryImages
from hpcgraft.errors import DataError

# Per-channel statistics of the CIFAR training sets, the values every CIFAR recipe uses.
_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
# The authors' CIFAR pipeline (grafting_cifar/*.py): a std that is not the training set's, and CIFAR-10's
# statistics for CIFAR-100 too (``data.reference=authors``).
_AUTHORS_STATS = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}


def _find_dir(name: str, root: str | None) -> Path:
    folder, train_files, test_files, _ = _LAYOUT[name]
    if root is None:
        raise DataError(f"data.name={name} needs data.root: the directory holding {folder}/ (python version)")
    base = Path(root).expanduser()
    for cand in (base, base / folder):
        if all((cand / f).is_file() for f in train_files + test_files):
            return cand
    raise DataError(
        f"data.root={root}: no {name} batches found (expected {', '.join(train_files + test_files)} in "
        f"{base} or {base / folder}); download the python version of {name} and set data.root"
    )


class _BatchUnpickler(pickle.Unpickler):
    """The CIFAR batches are pickles; this reads them without letting one run code: only the numpy
    array pieces a batch consists of may be named, anything else is an error."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR batch")
        return super().find_class(module, name)


def _read(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as f:
            entry = _BatchUnpickler(f, encoding="bytes").load()
        if not isinstance(entry, dict):
            raise TypeError(f"it holds a {type(entry).__name__}, not a dict")
        data = np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(entry[label_key], dtype=np.int64).reshape(-1)
    except (pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError, AttributeError) as exc:
        raise DataError(f"{path} is not a CIFAR batch file ({type(exc).__name__}: {exc}); replace it with the "
                        "python version of the data set") from None
    if len(data) != len(labels):
        raise DataError(f"{path} holds {len(data)} images but {len(labels)} labels; the file is damaged, replace it "
                        "with the python version of the data set")
    return data, labels


def load_cifar(name: str, root: str | None, reference: str = "paper") -> tuple[InMemoryImages, InMemoryImages]:
    """Train and test splits of ``cifar10`` or ``cifar100`` with crop(4)+flip augmentation;
    ``reference="authors"``: with the authors' statistics and black crop padding."""
    directory = _find_dir(name, root)
    _, train_files, test_files, label_key = _LAYOUT[name]
    num_classes = 10 if name == "cifar10" else 100
    authors = reference == "authors"
    mean, std = (torch.tensor(v) for v in (_AUTHORS_STATS if authors else _STATS[name]))

    def split(files: list[str]) -> InMemoryImages:
        parts = [_read(directory / f, label_key) for f in files]
        images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise DataError(f"{directory}: labels outside 0..{num_classes - 1}; is this really {name}?")
        return InMemoryImages(images, labels, num_classes, mean, std, crop_padding=4, flip=True, pad_black=authors)

    return split(train_files), split(test_files)
