"""ImageNet readers on tiny real JPEG/PNG trees: folder, packed HDF5 (jpeg and array), workers, errors."""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hpcgraft.data import BatchLoader, DataError, build_datasets
from hpcgraft.data.imagenet import MEAN, STD
from hpcgraft.data.pack import pack_imagenet
from tests._util import ROOT as REPO

SIZE = 28  # evaluation resizes to round(28 * 256 / 224) = 32, so array mode packs at 32
CLASSES = ["n01", "n02", "n03"]
SHAPES = [(40, 30), (23, 57), (64, 64), (90, 45)]  # (width, height): portrait, landscape, square
SOLID = (200, 40, 90)


def _write(path: Path, rng: np.random.Generator, size: tuple[int, int], kind: str = "noise") -> None:
    w, h = size
    if kind == "solid":
        arr = np.broadcast_to(np.array(SOLID, dtype=np.uint8), (h, w, 3))
    elif kind == "halves":  # left half red, right half blue
        arr = np.zeros((h, w, 3), dtype=np.uint8)
        arr[:, : w // 2, 0] = 255
        arr[:, w // 2 :, 2] = 255
    else:
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(np.ascontiguousarray(arr))
    if path.suffix == ".png":
        img.save(path)
    elif path.stem.endswith("grey"):
        img.convert("L").save(path, quality=95)
    else:
        img.save(path, quality=95)


def _make_tree(root: Path) -> Path:
    rng = np.random.default_rng(0)
    names = ["a.JPEG", "b.jpg", "c.png", "d_grey.JPEG"]
    for cls in reversed(CLASSES):  # creation order must not matter
        for name, shape in zip(names, SHAPES, strict=True):
            (root / "train" / cls).mkdir(parents=True, exist_ok=True)
            _write(root / "train" / cls / name, rng, shape, "halves" if (cls, name) == ("n01", "a.JPEG") else "noise")
        (root / "train" / cls / "notes.txt").write_text("not an image")
        for k, shape in enumerate([(50, 38), (31, 44)]):
            (root / "val" / cls).mkdir(parents=True, exist_ok=True)
            kind = "solid" if (cls, k) == ("n02", 0) else "noise"
            _write(root / "val" / cls / f"v{k}.JPEG", rng, shape, kind)
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return _make_tree(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture(scope="module")
def packed(tree, tmp_path_factory) -> dict[str, Path]:
    """jpeg mode through the command line tool, array mode through the library call."""
    out = tmp_path_factory.mktemp("packed")
    proc = subprocess.run([sys.executable, str(REPO / "tools/pack_imagenet.py"), str(tree), str(out / "jpeg"),
                           "--shard-size", "5"], capture_output=True, text=True, check=True)
    assert "packed 18 images (jpeg mode)" in proc.stdout and "bytes" in proc.stdout
    assert "train: 12/12 images" in proc.stderr
    summary = pack_imagenet(tree, out / "array", mode="array", array_size=32, shard_size=7)
    assert summary.images == 18 and summary.bytes > 18 * 3 * 32 * 32
    return {"jpeg": out / "jpeg", "array": out / "array"}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _one_line_error(match: str, fn, *args) -> str:
    with pytest.raises(DataError) as info:
        fn(*args)
    msg = str(info.value)
    assert "\n" not in msg and match in msg, msg
    return msg


def test_folder_shapes_labels_and_classes(tree):
    train, val = build_datasets("imagenet", str(tree), SIZE)
    assert (len(train), len(val), train.num_classes, train.classes) == (12, 6, 3, CLASSES)
    assert train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert val.labels.tolist() == [0, 0, 1, 1, 2, 2]
    x, y = train.get_batch(torch.tensor([11, 0, 5]), _gen(0))
    assert x.shape == (3, 3, SIZE, SIZE) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == [2, 0, 1]
    x, y = val.get_batch(torch.arange(6), None)
    assert x.shape == (6, 3, SIZE, SIZE) and torch.isfinite(x).all()


def test_augmentation_is_a_function_of_the_generator(tree):
    train, _ = build_datasets("imagenet", str(tree), SIZE)
    idx = torch.arange(12)
    a, b, c = (train.get_batch(idx, _gen(s))[0] for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, train.get_batch(idx, None)[0])


def test_crop_and_flip_vary_across_draws(tree):
    train, _ = build_datasets("imagenet", str(tree), SIZE)
    orientation = set()
    for seed in range(24):  # train image 0 is red on the left, blue on the right
        x = train.get_batch(torch.tensor([0]), _gen(seed))[0][0] * STD.view(3, 1, 1) + MEAN.view(3, 1, 1)
        red_left = (x[0, :, : SIZE // 2].mean() - x[0, :, SIZE // 2 :].mean()).item()
        if abs(red_left) > 0.3:
            orientation.add(red_left > 0)
    assert orientation == {True, False}


def test_evaluation_is_deterministic_and_centred(tree):
    _, val = build_datasets("imagenet", str(tree), SIZE)
    a, _ = val.get_batch(torch.arange(6), None)
    assert torch.equal(a, val.get_batch(torch.arange(6), None)[0])
    solid = (torch.tensor(SOLID) / 255.0 - MEAN) / STD  # val image 2 is one colour: JPEG keeps it within 2/255
    assert torch.allclose(a[2], solid.view(3, 1, 1).expand(3, SIZE, SIZE), atol=2 / 255 / 0.224)


@pytest.mark.process  # the packed fixture runs tools/pack_imagenet.py
def test_packed_jpeg_equals_the_folder_reader(tree, packed):
    folder = build_datasets("imagenet", str(tree), SIZE)
    h5 = build_datasets("imagenet_h5", str(packed["jpeg"]), SIZE)
    assert len(list(packed["jpeg"].glob("train-*.h5"))) == 3
    for f, p in zip(folder, h5, strict=True):
        assert p.classes == CLASSES and torch.equal(f.labels, p.labels)
    idx = torch.tensor([9, 2, 4, 11])  # spans shards, out of order
    for gen in (lambda: _gen(3), lambda: None):
        xf, yf = folder[0].get_batch(idx, gen())
        xp, yp = h5[0].get_batch(idx, gen())
        assert torch.equal(xf, xp) and torch.equal(yf, yp)


@pytest.mark.process  # the packed fixture runs tools/pack_imagenet.py
def test_packed_array_matches_the_folder_evaluation_view(tree, packed):
    folder_val = build_datasets("imagenet", str(tree), SIZE)[1]
    train, val = build_datasets("imagenet_h5", str(packed["array"]), SIZE)
    assert torch.equal(val.labels, folder_val.labels) and train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # Packed at 32 = round(28 * 256 / 224) with 32 - 28 even: the stored centre square holds the exact view.
    assert torch.equal(val.get_batch(torch.arange(6), None)[0], folder_val.get_batch(torch.arange(6), None)[0])
    a, y = train.get_batch(torch.tensor([1, 10]), _gen(5))
    assert a.shape == (2, 3, SIZE, SIZE) and y.tolist() == [0, 2]
    assert torch.equal(a, train.get_batch(torch.tensor([1, 10]), _gen(5))[0])


@pytest.mark.process  # DataLoader worker processes
@pytest.mark.parametrize("kind", ["folder", "jpeg", "array"])
def test_two_workers_give_the_same_batches(tree, packed, kind):
    root, name = (tree, "imagenet") if kind == "folder" else (packed[kind], "imagenet_h5")
    train, val = build_datasets(name, str(root), SIZE)
    train.get_batch(torch.tensor([0, 7]), None)  # parent holds open files before the workers fork
    for ds, shuffle in ((train, True), (val, False)):
        runs = [list(BatchLoader(ds, 4, shuffle=shuffle, augment=True, seed=3, workers=w).epoch(1)) for w in (0, 2)]
        assert len(runs[0]) == (3 if shuffle else 2)
        for (x0, y0), (x2, y2) in zip(*runs, strict=True):
            assert torch.equal(x0, x2) and torch.equal(y0, y2)


@pytest.mark.process  # the packed fixture runs tools/pack_imagenet.py
def test_packed_reader_pickles_with_open_files(packed):
    train, _ = build_datasets("imagenet_h5", str(packed["jpeg"]), SIZE)
    expected = train.get_batch(torch.tensor([3, 8]), _gen(1))[0]
    clone = pickle.loads(pickle.dumps(train))
    assert torch.equal(clone.get_batch(torch.tensor([3, 8]), _gen(1))[0], expected)


def test_folder_errors_are_one_line(tmp_path):
    _one_line_error("needs data.root", build_datasets, "imagenet", None, SIZE)
    missing = tmp_path / "nowhere"
    _one_line_error(str(missing), build_datasets, "imagenet", str(missing), SIZE)
    root = _make_tree(tmp_path / "t")
    shutil.rmtree(root / "val")
    _one_line_error(f"{root / 'val'} is missing", build_datasets, "imagenet", str(root), SIZE)
    root = _make_tree(tmp_path / "u")
    for f in (root / "train" / "n02").iterdir():
        if f.suffix != ".txt":
            f.unlink()
    _one_line_error(f"{root / 'train' / 'n02'} holds no", build_datasets, "imagenet", str(root), SIZE)
    root = _make_tree(tmp_path / "v")
    (root / "val" / "n09").mkdir()
    _one_line_error(f"{root / 'val' / 'n09'} is not a class", build_datasets, "imagenet", str(root), SIZE)
    shutil.rmtree(root / "val" / "n09")
    bad = root / "train" / "n03" / "b.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    train, _ = build_datasets("imagenet", str(root), SIZE)
    _one_line_error(str(bad), train.get_batch, torch.tensor([9]), None)
    _one_line_error(str(bad), pack_imagenet, root, tmp_path / "p")


@pytest.mark.process  # the packed fixture runs tools/pack_imagenet.py
def test_packed_errors_are_one_line(tmp_path, tree, packed):
    _one_line_error("needs data.root", build_datasets, "imagenet_h5", None, SIZE)
    _one_line_error("pack_imagenet.py", build_datasets, "imagenet_h5", str(tmp_path / "none"), SIZE)
    (tmp_path / "empty").mkdir()
    _one_line_error("no train-*.h5 shards", build_datasets, "imagenet_h5", str(tmp_path / "empty"), SIZE)
    broken = tmp_path / "broken"
    shutil.copytree(packed["jpeg"], broken)
    (broken / "train-00001.h5").unlink()
    _one_line_error(str(broken), build_datasets, "imagenet_h5", str(broken), SIZE)
    _one_line_error("--array-size 32", build_datasets, "imagenet_h5", str(packed["array"]), 64)
    _one_line_error("already holds packed shards", pack_imagenet, tree, packed["jpeg"])


@pytest.mark.process  # the packed fixture runs tools/pack_imagenet.py
def test_packed_shards_under_the_folder_tree_name_say_which_name(packed):
    """HPCGRAFT_DATA (data.root) at packed shards with the config's data.name=imagenet: say the fix, not
    that train/ is missing."""
    msg = _one_line_error("holds hpcgraft shards (train-*.h5): add data.name=imagenet_h5",
                          build_datasets, "imagenet", str(packed["jpeg"]), SIZE)
    assert "is missing" not in msg
