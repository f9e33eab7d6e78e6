"""Rows 7 and 8 of the differences from the authors' code (docs/method.md) as options:
``data.reference=authors`` (the authors' CIFAR pipeline) and ``model.init=pytorch`` (the layer defaults their
VGG and MobileNetV2 start from)."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from hpcgraft.config import load_config
from hpcgraft.data import BatchLoader, build_datasets
from hpcgraft.errors import ConfigError
from hpcgraft.models import create_model

AUTHORS_MEAN, AUTHORS_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def _write(path: Path, n: int, key: bytes, classes: int, value: int | None = None) -> None:
    rng = np.random.default_rng(len(path.name))
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8) if value is None else np.full((n, 3072), value, np.uint8)
    with path.open("wb") as f:
        pickle.dump({b"data": data, key: rng.integers(0, classes, n).tolist()}, f, protocol=2)


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    c10 = tmp_path_factory.mktemp("a10") / "cifar-10-batches-py"
    c10.mkdir()
    for i in range(1, 6):
        _write(c10 / f"data_batch_{i}", 3, b"labels", 10, value=255)  # white images: the padding shows
    _write(c10 / "test_batch", 4, b"labels", 10)
    c100 = tmp_path_factory.mktemp("a100") / "cifar-100-python"
    c100.mkdir()
    _write(c100 / "train", 6, b"fine_labels", 100)
    _write(c100 / "test", 5, b"fine_labels", 100)
    return {"cifar10": c10, "cifar100": c100}


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_authors_statistics_are_cifar10s_with_their_std(roots: dict[str, Path], name: str) -> None:
    _, test = build_datasets(name, str(roots[name]), reference="authors")
    x, _ = test.get_batch(torch.tensor([0]), None)
    raw = test.images[0].to(torch.float64) / 255.0
    for c in range(3):
        expected = (raw[c] - AUTHORS_MEAN[c]) / AUTHORS_STD[c]
        assert torch.allclose(x[0, c].double(), expected, atol=1e-5)
    _, paper = build_datasets(name, str(roots[name]))
    assert not torch.allclose(paper.get_batch(torch.tensor([0]), None)[0], x, atol=1e-3)


def test_authors_pad_black_before_normalising(roots: dict[str, Path]) -> None:
    """White images cropped from a padded frame: every pixel is white or padding, and the padding is
    black normalised, (0 - mean) / std, where the paper pipeline pads the normalised image with 0."""
    for reference, fill in (("authors", [-m / s for m, s in zip(AUTHORS_MEAN, AUTHORS_STD, strict=True)]),
                            ("paper", [0.0, 0.0, 0.0])):
        train, _ = build_datasets("cifar10", str(roots["cifar10"]), reference=reference)
        x, _ = train.get_batch(torch.arange(15), torch.Generator().manual_seed(3))
        white = (1.0 - train.mean) / train.std
        padded = 0
        for c in range(3):
            is_white = torch.isclose(x[:, c], white[c])
            is_fill = torch.isclose(x[:, c], torch.tensor(fill[c]), atol=1e-6)
            assert bool((is_white | is_fill).all())
            padded += int(is_fill.sum())
        assert padded > 0


def test_the_last_partial_batch_is_kept_only_when_asked() -> None:
    train, _ = build_datasets("digits")
    n = len(train)
    kept = BatchLoader(train, 128, shuffle=True, keep_last=True)
    dropped = BatchLoader(train, 128, shuffle=True)
    assert (len(kept), len(dropped)) == (math.ceil(n / 128), n // 128)
    sizes = [len(y) for _, y in kept.epoch(0)]
    assert sizes == [128] * (n // 128) + [n % 128]
    with pytest.raises(ValueError):
        BatchLoader(train, 128, shuffle=True, keep_last=True, replicas=2)


@pytest.mark.parametrize("name", ["vgg16_bn", "mobilenetv2_ref"])
def test_pytorch_init_is_the_layer_defaults_and_deterministic(name: str) -> None:
    def build(init: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        kwargs = {"width": 8} if name == "vgg16_bn" else {}
        return create_model(name, 10, init=init, **kwargs).state_dict()

    default, again, kaiming = build("pytorch"), build("pytorch"), build("kaiming")
    convs = [k for k, t in default.items() if t.dim() == 4]
    assert all(torch.equal(default[k], again[k]) for k in default)
    for k in convs:  # kaiming_uniform(a=sqrt(5)): |w| <= 1 / sqrt(fan_in); He-normal exceeds that
        fan_in = default[k][0].numel()
        assert float(default[k].abs().max()) <= 1 / math.sqrt(fan_in) + 1e-7
    assert any(float(kaiming[k].abs().max()) > 1 / math.sqrt(kaiming[k][0].numel()) for k in convs)


@pytest.mark.parametrize("overrides, names", [
    (["data.reference=authors"], ("data.reference", "data.name", "paper")),
    (["data.name=cifar10", "data.reference=authors", "dist.replicas=2"], ("data.reference", "dist.replicas")),
    (["model.init=pytorch", "model.name=resnet32"], ("model.init", "kaiming")),
    (["model.init=xavier"], ("model.init", "kaiming, pytorch")),
])
def test_config_refusals_are_one_line(overrides: list[str], names: tuple) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value) and all(n in str(err.value) for n in names)
