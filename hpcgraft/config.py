"""Run configuration: a typed schema, YAML files, dotted ``key=value`` overrides and validation.

Every error here is one line that names the offending key and what is allowed, because a typo in a
200-epoch cluster job should cost seconds, not a queue wait.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from hpcgraft.errors import ConfigError


@dataclass
class ModelConfig:
    name: str = "digits_resnet"
    num_classes: int | None = None  # None: taken from the data set
    init: str = "kaiming"  # kaiming (He-normal) | pytorch (layer defaults: the authors' VGG and MobileNetV2)
    bn_momentum: float | None = None  # BatchNorm running-statistics momentum; None: PyTorch's 0.1
    dgconv: bool = False  # square 3x3 convs of power-of-two width become DGConv (learned groups, GroupNet)
    dgconv_init: str = "random"  # random: gates +-1e-8 with random sign (the reference) | depthwise: all closed
    dgconv_budget: float | None = None  # o of the loss factor (o / zeta)^a; None: no resource constraint
    dgconv_exponent: float = -0.02  # a while zeta > o (a = 0 under the budget), the reproduction's value


@dataclass
class DataConfig:
    name: str = "digits"  # digits | digits32 | cifar10 | cifar100 | imagenet | imagenet_h5
    root: str | None = None  # directory of the data set on disk (not needed for digits)
    reference: str = "paper"  # paper | authors: the authors' CIFAR pipeline (hpcgraft.data.cifar)
    batch_size: int = 64  # per peer, summed over its replicas
    test_batch_size: int = 256
    augment: bool = True
    workers: int = 0  # loader worker processes (ImageNet readers)
    image_size: int = 224  # ImageNet crop size


@dataclass
class TrainConfig:
    epochs: int = 10
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "cosine"  # cosine (per step) | step | constant
    milestones: list[int] = field(default_factory=lambda: [60, 120, 180])
    gamma: float = 0.1
    warmup_epochs: int = 0
    dlr: bool = False  # peer i of K starts at lr * (1 + cos(pi * (K - i) / K)) / 2
    label_smoothing: float = 0.0
    precise_bn: int = 0  # > 0: BatchNorm statistics recomputed over this many training batches before each evaluation
    init_from: str | None = None  # starting weights: a .pt, a peer .h5, a checkpoint or run dir; {peer}: per peer
    compile: str = "off"  # off | default | reduce-overhead (CUDA graphs) | max-autotune: torch.compile of the model
    batched: bool = False  # a rank's peers step together, one vmapped forward/backward (training.batched)


@dataclass
class GraftConfig:
    mode: str = "peers"  # peers (the method) | noise | self | none (independent baseline)
    topology: str = "ring"  # ring | allreduce
    level: str = "layer"  # layer | filter
    a: float = 0.4
    c: float = 500.0
    bins: int = 10
    interval_steps: int = 0  # 0: graft at the end of every epoch; n > 0: every n optimizer steps
    round_alpha: bool = False  # the authors' code rounds alpha to 2 decimals
    reference: str = "paper"  # paper (the method) | authors (the authors' code's arithmetic, hpcgraft.method.authors)
    on_nonfinite: str = "skip"  # skip | stop: what a peer holding NaN/Inf weights does to the run
    peers: int | None = None  # K peers, spread over the ranks (K / (ranks / dist.replicas) each); None: one per rank


@dataclass
class CultivateConfig:
    # The config key is ``cultivate.lambda``; ``lambda`` is a Python keyword, hence the field name.
    lambda_: float = 0.0  # weight of the mutual-distillation term; 0 turns cultivation off
    temperature: float = 3.0


@dataclass
class DistConfig:
    replicas: int = 1  # data-parallel ranks per peer (Horovod when > 1)
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # CPU threads per rank; 0: the cores of the node divided by its ranks
    watchdog_s: float = 600.0  # a collective slower than this aborts the job
    channels_last: bool = False
    amp: bool = False  # bf16/fp16 autocast on GPU


@dataclass
class CheckpointConfig:
    enabled: bool = True
    interval: int = 1  # epochs between checkpoints
    keep: int = 2  # complete checkpoints kept, besides the best
    keep_best: bool = True


@dataclass
class LogConfig:
    progress: str = "auto"  # auto | on: a bar on a terminal, plain lines (every_s) elsewhere | off: neither
    every_s: float = 60.0  # off a terminal: one plain progress line on rank 0 every N seconds (0: none)
    thresholds: list[float] = field(default_factory=lambda: [0.1, 0.01])  # invalid-filter l1 norms
    tensorboard: bool = False  # also write TensorBoard event files into RUN/tensorboard/ (hpcgraft[tensorboard])


@dataclass
class PruneConfig:
    monitor: str = "off"  # off | bn (BatchNorm-gamma channel masks) | spline (sign patterns of BN outputs)
    ratio: float = 0.5  # fraction of BN channels the bn masks prune; the paper's options: 0.3, 0.5, 0.7
    bn_l1: float = 0.0  # s of the L1 subgradient on BN gammas, grad += s sign(gamma); 0: off, reference 1e-4
    window: int = 5  # bn: masks kept; early bird when the newest is within `threshold` of the window-1 older
    threshold: float = 0.1  # bn: the mask distance of an early bird (reference 0.1)
    spline_grid: int = 100  # spline: N of the N x N inputs a*img0 + b*img1, a, b in [0, 1] (reference 100)
    spline_lookback: int = 3  # spline: epochs compared with the newest (reference 3)
    spline_threshold: float = 0.16  # spline: early bird when the largest distance is below it (reference 0.16)


@dataclass
class Config:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    graft: GraftConfig = field(default_factory=GraftConfig)
    cultivate: CultivateConfig = field(default_factory=CultivateConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict with the user-facing key names (``cultivate.lambda``)."""
        return _to_user_dict(self)

    def flat(self) -> dict[str, Any]:
        """``{"graft.a": 0.4, ...}``: what config hashes and peer comparisons are made of."""
        return _flatten(self.to_dict())

    def to_yaml(self) -> str:
        """The YAML text of config.yaml and of a checkpoint's run.h5 (keys in schema order), without anchors:
        :func:`parse_yaml` refuses them, and this text is read back on every resume."""
        return yaml.dump(self.to_dict(), Dumper=_PlainDumper, sort_keys=False)


class _PlainDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


class YamlAliasError(yaml.YAMLError):
    """A YAML anchor or alias: refused, since a few hundred bytes of nested aliases expand to gigabytes."""

    def __init__(self, line: int) -> None:
        super().__init__(f"YAML anchors and aliases (&name, *name, <<: *name) are not allowed (line {line}); "
                         "write each value out")


class _PlainLoader(yaml.SafeLoader):
    """The safe loader, refusing anchors and aliases as the parser meets them, before a node is composed:
    expanding an alias is what costs the memory, and no hpcgraft file needs one."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise YamlAliasError(event.start_mark.line + 1)
        return super().compose_node(parent, index)


def parse_yaml(text: str | bytes) -> Any:
    """Every YAML text hpcgraft reads (configs, overrides, a run's config.yaml or run.h5 copy) is parsed here:
    safe types only, no anchors or aliases, so the result is never larger than the text."""
    return yaml.load(text, Loader=_PlainLoader)


_RENAMED = {"lambda_": "lambda"}
_FIELD_OF = {v: k for k, v in _RENAMED.items()}


def _to_user_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {_RENAMED.get(f.name, f.name): _to_user_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return list(obj)
    return obj


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def valid_keys() -> list[str]:
    return list(Config().flat())


def _unknown_key(key: str) -> ConfigError:
    near = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean '{near[0]}'?" if near else "; see configs/digits.yaml for all keys"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check a leaf value against its annotated type; YAML already parsed numbers and booleans."""
    text = str(typ)
    if value is None:
        if "None" in text:
            return None
        raise ConfigError(f"config key '{key}' must not be empty")
    if text.startswith("list"):
        items = value if isinstance(value, list) else [value]
        inner = float if "float" in text else int
        return [_coerce(key, v, inner) for v in items]
    if typ is bool or text == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if typ is int or text.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if typ is float or text == "float":
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if typ is str or text.startswith("str"):
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans
            return "on" if value else "off"
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return str(value)
    return value


def _apply(cfg: Any, key: str, value: Any, prefix: str = "") -> None:
    head, _, rest = key.partition(".")
    name = _FIELD_OF.get(head, head)
    full = f"{prefix}{head}"
    if not dataclasses.is_dataclass(cfg) or name not in {f.name for f in dataclasses.fields(cfg)}:
        raise _unknown_key(f"{prefix}{key}")
    current = getattr(cfg, name)
    if dataclasses.is_dataclass(current):
        if rest:
            _apply(current, rest, value, full + ".")
        elif isinstance(value, dict):
            for k, v in value.items():
                _apply(current, str(k), v, full + ".")
        else:
            raise ConfigError(f"config key '{full}' is a section; set one of its keys, e.g. '{full}.<key>=...'")
        return
    if rest:
        raise _unknown_key(f"{prefix}{key}")
    setattr(cfg, name, _coerce(full, value, get_type_hints(type(cfg))[name]))


def parse_override(text: str) -> tuple[str, Any]:
    """``"graft.level=filter"`` -> ``("graft.level", "filter")``; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. train.epochs=3)")
    try:
        value = parse_yaml(raw) if raw.strip() else None
    except YamlAliasError as exc:
        raise ConfigError(f"override '{text}': {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': the value is not valid YAML ({exc.problem})") from None
    return key.strip(), value


#: The configs that ship inside the package (``--config cifar10_resnet32``); ``configs/`` of a checkout links here.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def config_names() -> list[str]:
    """Names of the packaged configs, usable as ``--config NAME`` wherever the package is installed."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config(path: str | Path) -> Path:
    """The YAML file that ``--config`` names: an existing file, else a packaged config's name (``digits``,
    ``digits.yaml``), so that an installed package needs no checkout. One line lists the names otherwise."""
    p = Path(path)
    if p.is_file():
        return p
    name = p.name.removesuffix(".yaml").removesuffix(".yml")
    packaged = CONFIG_DIR / f"{name}.yaml"
    # A bare name, or a path into a configs/ folder that is not here (a checkout's path outside the checkout)
    if packaged.is_file() and (len(p.parts) == 1 or p.parent.name == "configs"):
        return packaged
    raise ConfigError(f"config '{path}' is neither a file nor a packaged config; give a YAML file or one of: "
                      f"{', '.join(config_names())}")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file (a path or a packaged config's name), then the overrides, then validation."""
    cfg = Config()
    if path is not None:
        p = resolve_config(path)
        try:
            data = parse_yaml(p.read_text(encoding="utf-8")) or {}
        except YamlAliasError as exc:
            raise ConfigError(f"config file '{p}': {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{p}' is not valid YAML: {' '.join(str(exc).split())}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file '{p}' is not a text (UTF-8) file; pass a YAML file such as "
                              "configs/digits.yaml") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{p}' must hold a mapping of sections, not {type(data).__name__}")
        for k, v in data.items():
            _apply(cfg, str(k), v)
    for text in overrides:
        _apply(cfg, *parse_override(text))
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = Config()
    for k, v in data.items():
        _apply(cfg, str(k), v)
    validate(cfg)
    return cfg


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; use one of: {', '.join(allowed)}")


#: What the authors' code can do (graft.reference=authors): the graft settings it has, and their values.
AUTHORS_GRAFT = {"mode": ("peers", "none"), "topology": ("ring",), "level": ("layer",)}


def authors_reference_conflict(spell: Callable[[str, str], str] = lambda key, value: f"graft.{key}={value}",
                               **settings: str) -> str | None:
    """The one check of the authors' reference (the config, the offline graft command and the exchange all
    ask it): the first of ``settings`` (graft keys) their code lacks, as a message that names settings the
    way the caller's user writes them (``spell(key, value)``); None when their code has them all."""
    for key, value in settings.items():
        allowed = AUTHORS_GRAFT[key]
        if value not in allowed:
            return (f"{spell(key, value)} is not allowed with {spell('reference', 'authors')} (the authors' code has "
                    f"only {' and '.join(allowed)}); use one of: {', '.join(allowed)}")
    return None


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Value checks that do not need the data or the MPI world (those come at start-up)."""
    g, t, d = cfg.graft, cfg.train, cfg.data
    _choice("graft.mode", g.mode, ("peers", "noise", "self", "none"))
    _choice("graft.topology", g.topology, ("ring", "allreduce"))
    _check(g.level != "filter_authors", "graft.level=filter_authors is not available: the authors' filter level "
           "(filter_level_grafting.py, BN()) applies each channel's |gamma| weight to the whole BatchNorm vector and "
           "conv slice in turn, leaving ~1e-20 of the peer's own BN; it is declared, not reproduced (docs/method.md); "
           "use one of: layer, filter")
    _choice("graft.level", g.level, ("layer", "filter"))
    _choice("graft.reference", g.reference, ("paper", "authors"))
    if g.reference == "authors":
        conflict = authors_reference_conflict(mode=g.mode, topology=g.topology, level=g.level)
        _check(conflict is None, conflict or "")
    _choice("graft.on_nonfinite", g.on_nonfinite, ("skip", "stop"))
    _choice("model.init", cfg.model.init, ("kaiming", "pytorch"))
    _choice("model.dgconv_init", cfg.model.dgconv_init, ("random", "depthwise"))
    _check(cfg.model.dgconv_budget is None or (cfg.model.dgconv and cfg.model.dgconv_budget > 0),
           "model.dgconv_budget must be > 0 and needs model.dgconv=true")
    _check(cfg.model.init == "kaiming" or cfg.model.name in ("vgg16_bn", "mobilenetv2", "mobilenetv2_ref"),
           f"model.init={cfg.model.init!r} is not allowed for model.name={cfg.model.name!r} (the authors' ResNets "
           "use kaiming too); use one of: kaiming")
    _check(cfg.model.bn_momentum is None or 0 < cfg.model.bn_momentum <= 1,
           f"model.bn_momentum={cfg.model.bn_momentum} must be in (0, 1], or left unset for PyTorch's 0.1")
    _choice("data.reference", d.reference, ("paper", "authors"))
    _check(d.reference == "paper" or d.name in ("cifar10", "cifar100"),
           f"data.reference={d.reference!r} is not allowed for data.name={d.name!r} (the authors' pipeline is "
           "their CIFAR one); use one of: paper")
    _check(d.reference == "paper" or cfg.dist.replicas == 1,
           f"data.reference={d.reference!r} is not allowed with dist.replicas={cfg.dist.replicas} (it keeps the "
           "last partial batch, which replicas cannot share evenly); use one of: paper")
    _choice("train.schedule", t.schedule, ("cosine", "step", "constant"))
    _choice("train.compile", t.compile, ("off", "default", "reduce-overhead", "max-autotune"))
    _choice("dist.device", cfg.dist.device, ("auto", "cpu", "cuda"))
    _choice("log.progress", cfg.log.progress, ("auto", "on", "off"))
    _check(0.0 <= g.a <= 1.0, f"graft.a={g.a} is outside [0, 1]; the paper uses 0.4")
    _check(g.c >= 0 and math.isfinite(g.c), f"graft.c={g.c} must be a finite number >= 0; the paper uses 500")
    _check(g.bins >= 2, f"graft.bins={g.bins} must be at least 2; the paper uses 10")
    _check(g.peers is None or g.peers >= 1, f"graft.peers={g.peers} must be >= 1, or left unset for one peer per "
           "rank (per dist.replicas ranks)")
    _check(g.interval_steps >= 0, f"graft.interval_steps={g.interval_steps} must be >= 0 (0: every epoch end)")
    _check(t.epochs >= 1, f"train.epochs={t.epochs} must be >= 1 (a run trains at least one epoch)")
    _check(t.lr > 0 and math.isfinite(t.lr), f"train.lr={t.lr} must be a finite number > 0")
    _check(0 <= t.momentum < 1, f"train.momentum={t.momentum} must be in [0, 1)")
    _check(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay} must be >= 0")
    _check(0 < t.gamma <= 1, f"train.gamma={t.gamma} must be in (0, 1]")
    _check(t.warmup_epochs >= 0, f"train.warmup_epochs={t.warmup_epochs} must be >= 0")
    _check(0 <= t.label_smoothing < 1, f"train.label_smoothing={t.label_smoothing} must be in [0, 1)")
    _check(t.precise_bn >= 0, f"train.precise_bn={t.precise_bn} must be >= 0 (0: the running averages)")
    _check(cfg.model.num_classes is None or cfg.model.num_classes >= 1,
           f"model.num_classes={cfg.model.num_classes} must be >= 1, or left unset to take the data set's classes")
    _check(len(cfg.log.thresholds) > 0 and all(math.isfinite(x) and x >= 0 for x in cfg.log.thresholds),
           f"log.thresholds={cfg.log.thresholds} must list at least one l1 norm >= 0, e.g. [0.1, 0.01]")
    _check(cfg.log.every_s >= 0 and math.isfinite(cfg.log.every_s),
           f"log.every_s={cfg.log.every_s} must be a number of seconds >= 0 (0: no progress lines)")
    _check(d.batch_size >= 1, f"data.batch_size={d.batch_size} must be >= 1")
    _check(d.test_batch_size >= 1, f"data.test_batch_size={d.test_batch_size} must be >= 1")
    _check(d.workers >= 0, f"data.workers={d.workers} must be >= 0")
    _check(cfg.cultivate.lambda_ >= 0, f"cultivate.lambda={cfg.cultivate.lambda_} must be >= 0 (0: off)")
    _check(cfg.cultivate.temperature > 0, f"cultivate.temperature={cfg.cultivate.temperature} must be > 0")
    _check(cfg.dist.replicas >= 1, f"dist.replicas={cfg.dist.replicas} must be >= 1")
    _check(cfg.dist.threads >= 0, f"dist.threads={cfg.dist.threads} must be >= 0 (0: cores / ranks per node)")
    _check(cfg.dist.watchdog_s > 0, f"dist.watchdog_s={cfg.dist.watchdog_s} must be > 0 seconds")
    _check(cfg.checkpoint.interval >= 1, f"checkpoint.interval={cfg.checkpoint.interval} must be >= 1 epoch")
    _check(cfg.checkpoint.keep >= 1, f"checkpoint.keep={cfg.checkpoint.keep} must be >= 1")
    _check(
        d.batch_size % cfg.dist.replicas == 0,
        f"data.batch_size={d.batch_size} must be divisible by dist.replicas={cfg.dist.replicas}",
    )
    _validate_prune(cfg)


def _validate_prune(cfg: Config) -> None:
    p = cfg.prune
    _choice("prune.monitor", p.monitor, ("off", "bn", "spline"))
    _check(0 < p.ratio < 1, f"prune.ratio={p.ratio} must be in (0, 1); the paper uses 0.3, 0.5 or 0.7")
    _check(p.bn_l1 >= 0 and math.isfinite(p.bn_l1), f"prune.bn_l1={p.bn_l1} must be a finite number >= 0 "
           "(0: off; the reference uses 1e-4)")
    _check(p.bn_l1 == 0 or cfg.dist.replicas == 1, f"prune.bn_l1={p.bn_l1} is not supported with "
           f"dist.replicas={cfg.dist.replicas} (Horovod would overwrite the added subgradient); use prune.bn_l1=0")
    _check(p.window >= 2, f"prune.window={p.window} must be >= 2 masks (the reference keeps 5)")
    _check(0 <= p.threshold <= 1, f"prune.threshold={p.threshold} must be in [0, 1] (the reference uses 0.1)")
    _check(p.spline_grid >= 2, f"prune.spline_grid={p.spline_grid} must be >= 2 (the reference uses 100)")
    _check(p.spline_lookback >= 1, f"prune.spline_lookback={p.spline_lookback} must be >= 1 (the reference uses 3)")
    _check(0 <= p.spline_threshold <= 1,
           f"prune.spline_threshold={p.spline_threshold} must be in [0, 1] (the reference uses 0.16)")
