"""``train.compile``: torch.compile of a peer's model, kept apart from the module that holds its state.

torch.compile returns a wrapper (an ``OptimizedModule``) whose ``state_dict`` keys gain ``_orig_mod.``;
checkpoints, grafting, exports and Horovod all address the weights by the plain module's names. So the
plain module stays the peer's model, and only the calls that pay for a compile (the training forward and
the evaluation during training) go through the wrapper. Both share the very same parameter and buffer
tensors: a graft, a checkpoint load or a pruning mask writes them in place, and the compiled graph reads
them as inputs on every call, so it sees every change without recompiling.

``dynamic=False``: each batch shape gets its own static graph (the training batch, the test batch and the
test set's last partial batch: three), which suits CUDA graphs (``reduce-overhead``) and stays well under
torch's recompile limit.
"""

from __future__ import annotations

import torch
from torch import nn

from hpcgraft.errors import ConfigError


def compile_model(model: nn.Module, mode: str) -> nn.Module:
    """The module training calls for ``train.compile=mode``: ``model`` itself when off, else its compiled
    wrapper (compiled lazily, at its first call)."""
    if mode == "off":
        return model
    return torch.compile(model, mode=mode, dynamic=False)


def check_compile(mode: str, device: torch.device) -> None:
    """What torch.compile needs on ``device``, decided before training: without it, every rank would fail
    alike at its first step with a compiler traceback. Probes torch's own lookups, which are private:
    where one is missing from this torch version, the first step decides instead."""
    if mode == "off":
        return
    try:
        from torch._dynamo.eval_frame import check_if_dynamo_supported
        check_if_dynamo_supported()
    except ImportError:
        pass
    except Exception as exc:  # torch raises RuntimeError or its own kinds
        raise ConfigError(f"train.compile={mode} is not available with this Python and PyTorch "
                          f"({_first_line(exc)}); use train.compile=off") from None
    if device.type == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:
            return
        if not has_triton():
            raise ConfigError(f"train.compile={mode} on {device} needs Triton, which this PyTorch cannot import; "
                              "install the triton package that matches torch, or use train.compile=off")
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:
        return
    try:
        get_cpp_compiler()
    except Exception:  # torch's InvalidCxxCompiler, or whatever probing the compiler raised
        raise ConfigError(f"train.compile={mode} on the CPU needs a C++ compiler (g++ or clang++ on PATH, or "
                          "CXX=...) and found none; install one, or use train.compile=off") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
