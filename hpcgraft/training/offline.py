"""Grafting two saved models, outside a run: the graft command's work. The weights are read as every
command reads them (a state dict, a checkpoint dict, an hpcgraft peer file: :mod:`hpcgraft.storage.run`),
grafted by the same :class:`~hpcgraft.method.grafting.GraftMath` a training round uses, and written whole
or not at all."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from hpcgraft.errors import InputError
from hpcgraft.method.grafting import GraftMath, GraftReport, graft_state
from hpcgraft.storage import atomic
from hpcgraft.storage.outputs import check_output_file
from hpcgraft.storage.run import model_weights


def graft_saved(self_path: str, source_path: str, math: GraftMath, out: str, report: str | None = None
                ) -> GraftReport:
    """Graft ``source_path`` into ``self_path`` and save the result at ``out`` as a plain state dict (and,
    with ``report``, the per-layer entropies and coefficients as JSON); both outputs are checked first."""
    check_output_file(out, "--out")
    if report:
        check_output_file(report, "--report")
    own, source = model_weights(self_path), model_weights(source_path)
    try:
        grafted, result = graft_state(own, source, math)
    except ValueError as exc:
        raise InputError(f"{self_path} and {source_path} cannot be grafted: {exc}") from exc
    _save_atomic(grafted, Path(out), torch.save)
    if report:
        doc = {"self": str(self_path), "source": str(source_path), "out": str(out), "a": math.a, "c": math.c,
               "bins": math.bins, "round_alpha": math.round_alpha, "reference": math.reference,
               "authors_code": math.code, **result.to_dict()}
        _save_atomic(doc, Path(report), lambda d, p: p.write_text(json.dumps(d, indent=1) + "\n"))
    return result


def _save_atomic(obj: object, path: Path, write: Any) -> None:
    """Write under a temporary name, then rename: an interrupted run leaves no half-written output."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.replace(path, lambda tmp: write(obj, tmp))
