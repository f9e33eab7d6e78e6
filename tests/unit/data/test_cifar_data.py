"""CIFAR-10/100 readers on tiny files written in the published python-pickle batch format."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hpcgraft.data import BatchLoader, DataError, build_datasets


def _batch(path: Path, rng: np.random.Generator, n: int, label_keys: dict[bytes, int]) -> dict:
    """One batch file: rows of 3072 bytes (1024 red, 1024 green, 1024 blue, each row-major 32x32)."""
    entry = {b"batch_label": path.name.encode(), b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    for key, classes in label_keys.items():
        entry[key] = rng.integers(0, classes, n).tolist()
    with path.open("wb") as f:
        pickle.dump(entry, f, protocol=2)
    return entry


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory) -> tuple[Path, list[dict], dict]:
    folder = tmp_path_factory.mktemp("c10") / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    train = [_batch(folder / f"data_batch_{i}", rng, 3, {b"labels": 10}) for i in range(1, 6)]
    return folder, train, _batch(folder / "test_batch", rng, 4, {b"labels": 10})


@pytest.fixture(scope="module")
def cifar100(tmp_path_factory) -> tuple[Path, dict, dict]:
    folder = tmp_path_factory.mktemp("c100") / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    keys = {b"fine_labels": 100, b"coarse_labels": 20}
    return folder, _batch(folder / "train", rng, 6, keys), _batch(folder / "test", rng, 5, keys)


def test_cifar10_pixels_and_labels(cifar10):
    folder, train_batches, test_batch = cifar10
    for root in (folder, folder.parent):  # the extracted folder itself or its parent
        train, test = build_datasets("cifar10", str(root))
        assert (len(train), len(test), train.num_classes, train.input_shape) == (15, 4, 10, (3, 32, 32))
    data = np.concatenate([b[b"data"] for b in train_batches])
    assert train.labels.tolist() == sum((b[b"labels"] for b in train_batches), [])
    assert test.labels.tolist() == test_batch[b"labels"]
    # Image 7 (row 1 of data_batch_3), channel c, row y, column x is byte c*1024 + y*32 + x of row 7.
    for c, y, x in ((0, 0, 0), (1, 5, 31), (2, 31, 2)):
        assert train.images[7, c, y, x].item() == data[7, c * 1024 + y * 32 + x]
    x, y = train.get_batch(torch.tensor([7, 0]), None)
    expected = (data[7, :1024].reshape(32, 32) / 255.0 - 0.4914) / 0.2470
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [train_batches[2][b"labels"][1], train_batches[0][b"labels"][0]]
    assert torch.allclose(x[0, 0], torch.from_numpy(expected).float(), atol=1e-5)


def test_random_crop_and_flip_move_the_pixels_as_drawn(cifar10):
    """Training batches are cut from the image zero-padded by 4 (in standardised values: the channel mean)
    at a random offset, then mirrored for a random half: every checked pixel is the source pixel the drawn
    offset and flip say, computed by hand from the raw CIFAR bytes. A no-op augmentation fails here."""
    folder, train_batches, _ = cifar10
    train, _ = build_datasets("cifar10", str(folder))
    data = np.concatenate([b[b"data"] for b in train_batches]).reshape(-1, 3, 32, 32)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    n = len(data)
    x, _ = train.get_batch(torch.arange(n), torch.Generator().manual_seed(5))
    # The reader's draws, in its order: row offsets and column offsets in 0..8, then the flips.
    g = torch.Generator().manual_seed(5)
    oy = torch.randint(0, 9, (n,), generator=g).tolist()
    ox = torch.randint(0, 9, (n,), generator=g).tolist()
    flip = (torch.rand(n, generator=g) < 0.5).tolist()
    assert any(flip) and not all(flip) and any(o != 4 for o in oy + ox)  # the seed exercises every case
    moved = 0
    for i in range(n):
        for c, y, col in ((0, 0, 0), (1, 5, 31), (2, 31, 2), (0, 16, 16), (1, 2, 29), (2, 30, 1)):
            src_col = 31 - col if flip[i] else col  # the flip mirrors the cropped window
            sy, sx = y + oy[i] - 4, src_col + ox[i] - 4  # where that pixel comes from in the unpadded image
            inside = 0 <= sy < 32 and 0 <= sx < 32
            want = (data[i, c, sy, sx] / 255.0 - mean[c]) / std[c] if inside else 0.0
            assert x[i, c, y, col].item() == pytest.approx(want, abs=1e-5), (i, c, y, col)
            moved += (sy, sx) != (y, col)
    assert moved > 0
    plain, _ = train.get_batch(torch.arange(n), None)
    assert not torch.equal(plain, x)


def test_cifar10_augmentation_reproducible(cifar10):
    train, _ = build_datasets("cifar10", str(cifar10[0]))
    loaders = [BatchLoader(train, 5, shuffle=True, augment=True, seed=2, workers=0) for _ in range(2)]
    for (xa, ya), (xb, yb) in zip(loaders[0].epoch(0), loaders[1].epoch(0), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_cifar100_uses_fine_labels(cifar100):
    folder, train_batch, test_batch = cifar100
    train, test = build_datasets("cifar100", str(folder.parent))
    assert (len(train), len(test), train.num_classes) == (6, 5, 100)
    assert train.labels.tolist() == train_batch[b"fine_labels"]
    assert test.labels.tolist() == test_batch[b"fine_labels"]
    assert torch.equal(test.images.reshape(5, -1), torch.from_numpy(test_batch[b"data"]))


def test_cifar_errors_are_one_line(tmp_path, cifar10):
    cases = [("cifar10", None, "needs data.root"), ("cifar10", str(tmp_path / "nowhere"), "no cifar10 batches"),
             ("cifar100", str(cifar10[0]), "no cifar100 batches")]
    broken = tmp_path / "cifar-10-batches-py"
    broken.mkdir()
    for f in cifar10[0].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "data_batch_3").write_bytes(b"not a pickle")
    cases.append(("cifar10", str(tmp_path), "data_batch_3 is not a CIFAR batch"))
    for name, root, match in cases:
        with pytest.raises(DataError) as info:
            build_datasets(name, root)
        assert match in str(info.value) and "\n" not in str(info.value)


def test_a_batch_file_that_would_run_code_is_refused(tmp_path, cifar10):
    """A pickle can name any callable; a CIFAR batch names numpy's array pieces only, and nothing else loads."""
    import os

    folder = tmp_path / "cifar-10-batches-py"
    shutil.copytree(cifar10[0], folder)

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "ran"),))

    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f, protocol=2)
    with pytest.raises(DataError, match=r"data_batch_2 is not a CIFAR batch file \(UnpicklingError: posix\.system "
                                        r"is not part of a CIFAR batch\)"):
        build_datasets("cifar10", str(folder))
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize(("content", "why"), [(7, "TypeError: it holds a int, not a dict"),
                                              ({b"data": 7, b"labels": [1]}, "ValueError"),
                                              ({b"data": np.zeros((320, 3072), np.uint8), b"labels": [0] * 266},
                                               "holds 320 images but 266 labels")],
                         ids=["an-int", "data-an-int", "images-and-labels-differ"])
def test_a_batch_of_the_wrong_content_is_one_line(tmp_path, cifar10, content, why):
    """Allowed types in the wrong places must end as the same one-line refusal, not a TypeError later."""
    folder = tmp_path / "cifar-10-batches-py"
    shutil.copytree(cifar10[0], folder)
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump(content, f, protocol=2)
    with pytest.raises(DataError) as info:
        build_datasets("cifar10", str(folder))
    assert "data_batch_1" in str(info.value) and why in str(info.value) and "\n" not in str(info.value)


@pytest.mark.process  # runs the documented tar command
def test_the_documented_unpack_command_gives_the_layout_the_reader_wants(tmp_path, cifar10):
    """The documented step (docs/configuration.md, "Data") for the official archive (cifar-10-python.tar.gz
    holds cifar-10-batches-py/): `mkdir -p data/cifar10 && tar -xzf cifar-10-python.tar.gz -C data/cifar10`,
    with the configs' data.root=data/cifar10, run on an archive of the same shape."""
    import subprocess
    import tarfile

    folder, train_batches, _ = cifar10
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    subprocess.run(f"mkdir -p data/cifar10 && tar -xzf {archive} -C data/cifar10", shell=True, check=True,
                   cwd=tmp_path)
    train, test = build_datasets("cifar10", str(tmp_path / "data/cifar10"))
    assert (len(train), len(test)) == (15, 4)
    assert train.labels.tolist() == sum((b[b"labels"] for b in train_batches), [])
