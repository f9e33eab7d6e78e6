"""A rank's peers trained as one: P models of one architecture take a training step together, with one
vmapped forward/backward (``torch.func``) and one optimizer update over all of them.

Peers as data: :class:`BatchedPeers` moves every peer's parameters, momentum and gradients into one flat
tensor each, parameter by parameter, every parameter stored as one contiguous ``(P, *shape)`` block (so
vmap's grouped kernels take it without a copy), and its buffers into one ``(P, ...)`` tensor per buffer;
then it points the models' own tensors at their slices. Nothing is copied per step, the SGD update is a handful of
elementwise kernels over all peers at once (not one per tensor and peer), and everything that reads or
writes a model in place (grafting, evaluation, checkpoints, pruning masks, precise BN) keeps working on
the models as before and sees, or changes, the batched state.

BatchNorm in training mode needs no special care beyond this: its running statistics and
``num_batches_tracked`` are batched buffers, so vmap updates each peer's row in place exactly as a plain
forward would update that peer's module. The step equals P sequential steps (plain ``SGD.step`` on each
peer's optimizer) to float tolerance: the optimizer's arithmetic is the same elementwise operations, the
forward/backward runs as grouped convolutions whose sums may round differently.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from hpcgraft.config import Config
from hpcgraft.errors import ConfigError
from hpcgraft.method.cultivation import distillation_loss, mean_of_others

#: Architectures whose step batches and equals the sequential one (tests/unit/test_batched.py checks each):
#: convolutions, BatchNorm, ReLU, pooling, linear heads and parameter-free shortcuts, nothing random.
BATCHABLE_MODELS = ("digits_resnet", "resnet20", "resnet32", "resnet56", "resnet110", "resnet18", "resnet34",
                    "resnet50", "vgg16_bn", "mobilenetv2", "mobilenetv2_ref")


def check_batchable(cfg: Config) -> None:
    """``train.batched=true`` asks for something the batched step cannot do exactly: one line, before
    any model is built. DGConv scales each peer's loss by a function of its own gates (a per-peer graph
    the vmapped step does not build); Horovod replicas average each model's gradients through hooks on
    its own parameters, which the batched step bypasses."""
    if not cfg.train.batched:
        return
    name = cfg.model.name
    if name not in BATCHABLE_MODELS:
        raise ConfigError(f"train.batched=true cannot batch model.name={name}; use train.batched=false or one of: "
                          f"{', '.join(BATCHABLE_MODELS)}")
    if cfg.model.dgconv:
        raise ConfigError("train.batched=true cannot batch DGConv layers (model.dgconv=true): each peer's loss is "
                          "scaled by its own gates; use train.batched=false")
    if cfg.train.compile != "off":
        raise ConfigError(f"train.batched=true does not run with train.compile={cfg.train.compile} (the batched step "
                          "calls the models through vmap, not their compiled forms); use one of the two")
    if cfg.dist.replicas > 1:
        raise ConfigError(f"train.batched=true does not run with dist.replicas={cfg.dist.replicas} (Horovod "
                          "averages each model's gradients itself); use train.batched=false or dist.replicas=1")


@dataclass(frozen=True)
class _Slot:
    """Where one parameter lives in a peer's row: offset, shape and strides (a channels-last weight keeps
    its strides, so the model sees the memory format it was given)."""

    offset: int
    shape: torch.Size
    stride: tuple[int, ...]


def _dense_strides(t: torch.Tensor) -> tuple[int, ...]:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.empty(t.shape, device="meta").contiguous(memory_format=torch.channels_last).stride()
    return torch.empty(t.shape, device="meta").stride()


@dataclass(frozen=True)
class _Hyper:
    momentum: float
    weight_decay: float
    nesterov: bool


def _hyper(optimizers: Sequence[torch.optim.Optimizer], models: Sequence[nn.Module]) -> _Hyper:
    """The SGD settings every peer shares (hpcgraft builds them from one config); the learning rates may
    differ (``train.dlr``) and are read at every step."""
    found = set()
    for opt, model in zip(optimizers, models, strict=True):
        if type(opt) is not torch.optim.SGD or len(opt.param_groups) != 1:
            raise ValueError("batched peers need plain torch.optim.SGD optimizers with one parameter group")
        g = opt.param_groups[0]
        if [id(p) for p in g["params"]] != [id(p) for p in model.parameters()]:
            raise ValueError("each optimizer must hold its model's parameters, in the model's order")
        if g["dampening"] != 0 or g["maximize"]:
            raise ValueError("batched peers support SGD without dampening or maximize, as hpcgraft builds it")
        found.add((g["momentum"], g["weight_decay"], g["nesterov"]))
    if len(found) != 1:
        raise ValueError(f"the peers' SGD settings differ: {sorted(found)}")
    return _Hyper(*found.pop())


class BatchedPeers:
    """P models (one architecture, one device, one float type) and their SGD optimizers, stepped
    together. Build it right after the models and optimizers, before anything keeps references to their
    tensors (a grafting exchange, a monitor): from here on the models' tensors are rows of the batched
    ones, and a model moved (``.to()``) or given new tensors leaves the batch."""

    def __init__(self, models: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer]) -> None:
        if not models or len(models) != len(optimizers):
            raise ValueError("batched peers need one optimizer per model and at least one model")
        self.models, self.optimizers = list(models), list(optimizers)
        self.hyper = _hyper(self.optimizers, self.models)
        first = dict(models[0].named_parameters())
        for m in models[1:]:
            other = dict(m.named_parameters())
            if [(k, v.shape) for k, v in other.items()] != [(k, v.shape) for k, v in first.items()]:
                raise ValueError("batched peers need models of one architecture (same parameter names and shapes)")
        devices = {p.device for m in models for p in m.parameters()}
        dtypes = {p.dtype for m in models for p in m.parameters()}
        if len(devices) != 1 or len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise ValueError(f"batched peers need parameters of one float type on one device, got {dtypes} on "
                             f"{devices}")
        device, dtype = devices.pop(), dtypes.pop()
        self.names = list(first)
        offset, slots = 0, []
        for p in first.values():
            slots.append(_Slot(offset, p.shape, _dense_strides(p)))
            offset += p.numel()
        self.slots = slots
        P, N = len(models), offset
        # The module that vmap calls with each peer's rows; on the meta device it holds no memory. Its tensors
        # are swapped in by plain dict stores (functional_call's general swapping costs milliseconds a step).
        self.template = copy.deepcopy(models[0]).to("meta").train()
        modules = dict(self.template.named_modules())
        self.places = [(modules[n.rpartition(".")[0]]._parameters, n.rpartition(".")[2]) for n in self.names]
        self.buffer_places = [(modules[n.rpartition(".")[0]]._buffers, n.rpartition(".")[2])
                              for n, _ in self.template.named_buffers()]
        self.count = P
        self.flat = torch.empty(P * N, device=device, dtype=dtype)
        self.grad = torch.zeros(P * N, device=device, dtype=dtype)
        self.momentum = torch.zeros(P * N, device=device, dtype=dtype) if self.hyper.momentum else None
        with torch.no_grad():
            for i, model in enumerate(models):
                for p, row, grad in zip(model.parameters(), self._rows(self.flat, i), self._rows(self.grad, i),
                                        strict=True):
                    row.copy_(p)
                    p.data = row
                    p.grad = grad
        self.momentum_rows = [self._rows(self.momentum, i) for i in range(P)]
        for i in range(P):
            self._adopt_momentum(i)
        self.params = {n: self._stacked(self.flat, s).requires_grad_() for n, s in zip(self.names, slots, strict=True)}
        for leaf, s in zip(self.params.values(), slots, strict=True):
            leaf.grad = self._stacked(self.grad, s)
        self.buffers = self._stack_buffers()
        self.leaves, self.buffer_list = list(self.params.values()), list(self.buffers.values())

    @torch.no_grad()
    def _adopt_momentum(self, i: int) -> None:
        """Peer ``i``'s momentum buffers become its rows (their values copied in): a checkpoint's load puts
        new tensors into the optimizer's state. Zeros stand for "no buffer yet": with no dampening,
        0 * momentum + g is g, SGD's first step."""
        opt = self.optimizers[i]
        for p, row in zip(self.models[i].parameters(), self.momentum_rows[i], strict=True):
            if row is None:
                continue
            old = opt.state.get(p, {}).get("momentum_buffer")
            if old is not None and old is not row:
                row.copy_(old)
            opt.state[p]["momentum_buffer"] = row

    def _rows(self, flat: torch.Tensor | None, i: int) -> list[torch.Tensor | None]:
        """Peer ``i``'s tensors: its slice of every parameter's block in ``flat`` (Nones where there is no
        such state)."""
        if flat is None:
            return [None] * len(self.slots)
        return [flat.as_strided(s.shape, s.stride, self.count * s.offset + i * s.shape.numel()) for s in self.slots]

    def _stacked(self, flat: torch.Tensor, s: _Slot) -> torch.Tensor:
        """One parameter of every peer, ``(P, *shape)``: what vmap maps over; a leaf of its own for autograd
        (the peers' gradients accumulate into ``self.grad``)."""
        return flat.detach().as_strided((self.count, *s.shape), (s.shape.numel(), *s.stride), self.count * s.offset)

    def _blocks(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Every parameter's block as ``(P, n)``: where a learning rate per peer is a column."""
        return [flat[self.count * s.offset:self.count * (s.offset + s.shape.numel())].view(self.count, -1)
                for s in self.slots]

    def _stack_buffers(self) -> dict[str, torch.Tensor]:
        stacked = {}
        owners = [dict(m.named_modules()) for m in self.models]
        for name, _ in self.models[0].named_buffers():
            module_name, _, attr = name.rpartition(".")
            rows = torch.stack([dict(m.named_buffers())[name] for m in self.models])
            for i, modules in enumerate(owners):
                modules[module_name]._buffers[attr] = rows[i]
            stacked[name] = rows
        return stacked

    def __len__(self) -> int:
        return len(self.models)

    def step(self, x: torch.Tensor | Sequence[torch.Tensor], y: torch.Tensor | Sequence[torch.Tensor], *,
             label_smoothing: float = 0.0, amp: bool = False,
             extra_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
             before_update: Callable[[], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One training step of every peer on its own batch (``x``: P batches of one shape, or a tensor
        ``(P, B, ...)``), at the learning rate each optimizer's group holds. ``extra_loss`` maps the
        logits ``(P, B, C)`` to a term per peer added to its loss (cultivation); ``before_update`` runs
        between backward and the update, with every model's ``.grad`` filled in (the BN-L1 subgradient).
        ``amp``: bf16 autocast on a GPU, as the loop's. Returns each peer's loss ``(P,)`` and logits
        ``(P, B, C)``, detached."""
        x = x if isinstance(x, torch.Tensor) else torch.stack(list(x))
        y = y if isinstance(y, torch.Tensor) else torch.stack(list(y))
        if x.shape[0] != len(self):
            raise ValueError(f"{x.shape[0]} batches for {len(self)} peers")
        self.grad.zero_()
        if self.momentum is not None:
            for i, opt in enumerate(self.optimizers):
                first = next(self.models[i].parameters())
                if opt.state.get(first, {}).get("momentum_buffer") is not self.momentum_rows[i][0]:
                    self._adopt_momentum(i)
        for i, model in enumerate(self.models):  # an optimizer's zero_grad() sets them to None: point them back
            if next(model.parameters()).grad is None:
                for p, g in zip(model.parameters(), self._rows(self.grad, i), strict=True):
                    p.grad = g
        run = torch.autocast(x.device.type, dtype=torch.bfloat16) if amp and x.is_cuda else contextlib.nullcontext()
        with run:
            logits = vmap(self._forward)(self.leaves, self.buffer_list, x)
            losses = vmap(lambda z, t: F.cross_entropy(z, t, label_smoothing=label_smoothing))(logits, y)
            if extra_loss is not None:
                losses = losses + extra_loss(logits)
        losses.sum().backward()  # the peers share no parameter: each block of self.grad holds their own gradients
        if before_update is not None:
            before_update()
        self._update()
        return losses.detach(), logits.detach()

    def _forward(self, params: list[torch.Tensor], buffers: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The template's forward on one peer's tensors (vmap passes each peer's slice)."""
        for (place, key), t in zip(self.places, params, strict=True):
            place[key] = t
        for (place, key), t in zip(self.buffer_places, buffers, strict=True):
            place[key] = t
        return self.template(x)

    @torch.no_grad()
    def _update(self) -> None:
        """torch.optim.SGD's arithmetic (weight decay, momentum, Nesterov), on every peer's row at once."""
        h, p = self.hyper, self.flat
        d = self.grad.add(p, alpha=h.weight_decay) if h.weight_decay else self.grad
        if self.momentum is not None:
            self.momentum.mul_(h.momentum).add_(d)
            d = d.add(self.momentum, alpha=h.momentum) if h.nesterov else self.momentum
        lrs = [opt.param_groups[0]["lr"] for opt in self.optimizers]
        if len(set(lrs)) == 1:
            p.add_(d, alpha=-lrs[0])
        else:  # train.dlr: a learning rate per peer, a column over each parameter's block
            column = torch.tensor(lrs, dtype=p.dtype, device=p.device).neg_().unsqueeze(1)
            torch._foreach_addcmul_(self._blocks(p), self._blocks(d), [column] * len(self.slots))


def cultivation_loss(everyone: Callable[[torch.Tensor], torch.Tensor], peers: Sequence[int], weight: float,
                     temperature: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ``extra_loss`` of cultivation for the peers ``peers`` (global indices) of this rank: each adds
    ``weight`` times the distillation towards the mean of the other peers' softened predictions.
    ``everyone`` turns this rank's logits ``(P, B, C)`` into all K peers' ``(K, B, C)`` (an allgather
    across ranks, or the identity when one rank holds every peer)."""
    def term(logits: torch.Tensor) -> torch.Tensor:
        gathered = everyone(logits.detach())
        terms = []
        for row, peer in enumerate(peers):
            target = mean_of_others(gathered, peer, temperature)
            terms.append(logits.new_zeros((), dtype=torch.float32) if target is None else
                         weight * distillation_loss(logits[row].float(), target, temperature))
        return torch.stack(terms)

    return term
