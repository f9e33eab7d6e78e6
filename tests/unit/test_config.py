import math

import pytest
import torch

from hpcgraft.config import config_from_dict, load_config, parse_override
from hpcgraft.errors import ConfigError
from hpcgraft.method.schedule import LRSchedule, peer_base_lr
from hpcgraft.models import create_model
from tests._util import ROOT


def test_defaults_file_and_overrides_compose(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  epochs: 7\n  weight_decay: 5e-4\ngraft:\n  level: filter\n")
    cfg = load_config(path, ["graft.a=0.3", "cultivate.lambda=0.5", "train.milestones=[2, 4]"])
    assert cfg.train.epochs == 7
    assert cfg.train.weight_decay == pytest.approx(5e-4)  # YAML 1.1 reads 5e-4 as a string
    assert cfg.graft.level == "filter" and cfg.graft.a == 0.3
    assert cfg.cultivate.lambda_ == 0.5 and cfg.to_dict()["cultivate"]["lambda"] == 0.5
    assert cfg.train.milestones == [2, 4]
    assert config_from_dict(cfg.to_dict()).flat() == cfg.flat()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trian.epochs=3", "unknown config key 'trian.epochs'; did you mean 'train.epochs'?"),
        ("graft.levl=filter", "did you mean 'graft.level'?"),
        ("graft.a=1.5", "graft.a=1.5 is outside [0, 1]"),
        ("graft.bins=1", "graft.bins=1 must be at least 2"),
        ("train.epochs=-1", "train.epochs=-1 must be >= 1"),
        ("train.epochs=0", "train.epochs=0 must be >= 1 (a run trains at least one epoch)"),
        ("graft.level=row", "graft.level='row' is not allowed; use one of: layer, filter"),
        ("train.epochs=three", "'train.epochs' must be an integer"),
        ("graft=1", "'graft' is a section"),
        ("epochs", "not of the form key=value"),
        ("data.batch_size=63", "divisible by dist.replicas"),
    ],
)
def test_bad_input_is_one_clear_line(override, message):
    overrides = [override] + (["dist.replicas=2"] if "batch_size" in override else [])
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_config_file_names_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="is neither a file nor a packaged config; give a YAML file or one of: "
                                          "cifar100_mobilenetv2, .*, digits, "):
        load_config(tmp_path / "nope.yaml")


CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "imagenet": 1000, "imagenet_h5": 1000}


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_config_loads_and_builds_its_model_for_its_data(path):
    """Each file names its data set first (cifar100_resnet56.yaml trains on cifar100); its model builds
    with that data set's classes, and the classifier really has that many outputs."""
    cfg = load_config(path)
    assert path.stem.split("_")[0] == cfg.data.name.removesuffix("_h5"), (path.stem, cfg.data.name)
    classes = cfg.model.num_classes or CLASSES[cfg.data.name]
    assert classes == CLASSES[cfg.data.name]
    with torch.device("meta"):  # shapes only: the ImageNet ResNets need no memory or time here
        model = create_model(cfg.model.name, classes)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert head.out_features == classes


def test_override_values_are_yaml():
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a.b=") == ("a.b", None)


def test_dlr_matches_the_method():
    # docs/method.md: peer i of K (i = 1..K) starts at lr * (1 + cos(pi * (K - i) / K)) / 2
    for k in (2, 3, 4, 8):
        for p in range(k):
            i = p + 1
            assert peer_base_lr(0.1, p, k, True) == pytest.approx(0.1 * (1 + math.cos(math.pi * (k - i) / k)) / 2)
    assert peer_base_lr(0.1, 0, 2, True) == pytest.approx(0.05)
    assert peer_base_lr(0.1, 1, 2, True) == pytest.approx(0.1)
    assert peer_base_lr(0.1, 0, 2, False) == 0.1


def test_schedules():
    cfg = load_config(None, ["train.epochs=10", "train.schedule=cosine"]).train
    s = LRSchedule(cfg, steps_per_epoch=5)
    assert s(0) == pytest.approx(0.1)
    assert s(25) == pytest.approx(0.05)
    assert s(49) < s(48) < s(1)
    cfg = load_config(None, ["train.epochs=10", "train.schedule=step", "train.milestones=[3, 6]"]).train
    s = LRSchedule(cfg, steps_per_epoch=5)
    assert [s(e * 5) for e in (0, 2, 3, 5, 6, 9)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    cfg = load_config(None, ["train.epochs=4", "train.warmup_epochs=1", "train.schedule=constant"]).train
    s = LRSchedule(cfg, steps_per_epoch=4)
    assert [s(i) for i in range(5)] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1])
