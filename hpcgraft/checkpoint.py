"""Checkpoints: every peer's state in its own HDF5 file, written in parallel, verified on resume.

Layout of ``RUN_DIR/checkpoints/step-000001234/``::

    peer-000.h5 ... peer-{K-1}.h5   one per peer, written by that peer's replica 0, all at the same time
    run.h5                          run-level data (config text, grafting history, versions), by rank 0
    MANIFEST.json                   size and CRC-32 of every file, the step, epoch and per-peer metric

Every file is written whole under a temporary name, fsynced and renamed into place, and MANIFEST.json
is written last: a checkpoint without a manifest never finished and does not count. A file truncated
or corrupted later is caught by its size and checksum, and :meth:`CheckpointManager.latest` falls back
to the previous checkpoint. Nothing here uses pickle: a tree is HDF5 groups and datasets that plain
h5py and ``h5ls -r`` can read, so a checkpoint cannot run code when it is loaded.

CLI::

    python -m hpcgraft.checkpoint inspect PATH [--tree]
    python -m hpcgraft.checkpoint export PATH --peer I --out model.pt
"""

from __future__ import annotations

import argparse
import io
import json
import math
import operator
import os
import re
import shutil
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
import torch

if TYPE_CHECKING:
    from mpi4py import MPI

# A tree is a nested dict (str or int keys) whose leaves are torch.Tensor, np.ndarray, numpy scalars,
# int, float, bool, str, None, or lists/tuples of those (lists may also hold dicts).
Tree = dict[str, Any]

FORMAT = "hpcgraft-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
RUN_FILE = "run.h5"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_CHUNK = 16 << 20  # bytes per os.write / os.read call


class CheckpointError(ValueError):
    """A checkpoint that cannot be written, found or read; the message is one line."""


@dataclass
class CheckpointInfo:
    path: Path  # the checkpoint directory, RUN_DIR/checkpoints/step-000001234
    step: int  # global optimizer step it was taken at
    epoch: int  # epochs completed (a mid-epoch checkpoint: the running epoch; the tree says the batch)
    peers: int


def peer_file(peer: int) -> str:
    return f"peer-{peer:03d}.h5"


def step_dir_name(step: int) -> str:
    return f"step-{step:09d}"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {text}"


# --------------------------------------------------------------------------------------------------
# Trees in HDF5. Every dict or non-uniform list is a group, every leaf a dataset (scalars too, so that
# `h5ls -r` shows the whole tree). One attribute per node, "type", says what to rebuild: "torch.<dtype>"
# for tensors (bfloat16/float8 are stored as same-width unsigned ints, bit for bit), "numpy", "int",
# "float", "bool", "str", "none", "list", "dict", ...; a group whose keys were ints lists them in
# "int_keys". Attributes cost more than data in HDF5, hence one. Names are the keys with "%" and "/"
# escaped (and "" and "." spelled out), so any str key survives.

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_SIGNED_BITS = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}  # torch has no view to uint16..64
_UNESCAPE = re.compile(r"%([0-9A-F]{2})")


def _escape(key: str) -> str:
    if key == "":
        return "%-"
    name = key.replace("%", "%25").replace("/", "%2F")
    return "%2E" if name == "." else name


def _unescape(name: str) -> str:
    if name == "%-":
        return ""
    return _UNESCAPE.sub(lambda m: chr(int(m.group(1), 16)), name)


def write_tree(group: h5py.Group, tree: Mapping) -> None:
    """Store ``tree`` under ``group``; raises CheckpointError naming the first leaf that cannot be stored."""
    if not isinstance(tree, Mapping):
        raise CheckpointError(f"a checkpoint tree must be a dict, got {type(tree).__name__}")
    group.attrs["type"] = "dict"
    _write_children(group, tree, "")


def read_tree(group: h5py.Group) -> Tree:
    """Rebuild the tree stored by :func:`write_tree`; groups and datasets without hpcgraft attributes
    come back as dicts and numpy arrays, so any HDF5 file can be read."""
    return _read_node(group)


def _write_children(group: h5py.Group, mapping: Mapping, path: str) -> None:
    names: dict[str, object] = {}
    for key, value in mapping.items():
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise CheckpointError(f"cannot store key {key!r} under '{path or '/'}': keys must be str or int")
        name = _escape(str(key))
        if name in names:
            raise CheckpointError(f"keys {names[name]!r} and {key!r} under '{path or '/'}' collide; rename one")
        names[name] = key
        _write_node(group, name, value, f"{path}/{key}")
    int_keys = [name for name, key in names.items() if isinstance(key, int)]
    if int_keys:
        group.attrs["int_keys"] = np.array(int_keys, dtype=h5py.string_dtype())


def _write_node(group: h5py.Group, name: str, value: Any, path: str) -> None:
    if isinstance(value, Mapping):
        sub = group.create_group(name, track_order=True)
        sub.attrs["type"] = "dict"
        _write_children(sub, value, path)
        return
    if isinstance(value, (list, tuple)):
        kind = "tuple" if isinstance(value, tuple) else "list"
        uniform = _uniform_array(value)
        if uniform is not None:
            group.create_dataset(name, data=uniform).attrs["type"] = kind
            return
        sub = group.create_group(name, track_order=True)
        sub.attrs["type"] = kind
        for i, item in enumerate(value):
            _write_node(sub, str(i), item, f"{path}/{i}")
        return
    kind, data = _leaf(value, path)
    try:
        ds = group.create_dataset(name, data=data)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot store {path}: {_one_line(exc)}") from exc
    ds.attrs["type"] = kind


def _leaf(value: Any, path: str) -> tuple[str, Any]:
    """(type tag, what h5py writes) of one leaf."""
    if isinstance(value, torch.Tensor):
        array, dtype = _tensor_array(value, path)
        return f"torch.{dtype}", array
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject or value.dtype.kind in "UMmV":
            raise CheckpointError(f"cannot store {path}: numpy dtype {value.dtype} has no plain HDF5 form; "
                                  "use a number array or a list of str")
        return "numpy", value
    if isinstance(value, np.generic):
        return "npscalar", _leaf(np.asarray(value), path)[1]
    if value is None:
        return "none", h5py.Empty("i1")
    if isinstance(value, bool):
        return "bool", np.bool_(value)
    if isinstance(value, int):
        if _INT64_MIN <= value <= _INT64_MAX:
            return "int", np.int64(value)
        return "bigint", _str_data(str(value))  # e.g. numpy PCG64 generator states (128 bit)
    if isinstance(value, float):
        return "float", np.float64(value)
    if isinstance(value, str):
        return "str", _str_data(value)
    raise CheckpointError(f"cannot store {path}: {type(value).__name__} is not a checkpoint leaf "
                          "(tensor, numpy array, int, float, bool, str, None, list, dict)")


def _str_data(text: str) -> Any:
    # HDF5 strings end at NUL: a str holding one is stored as its UTF-8 bytes instead.
    if "\x00" in text:
        return np.frombuffer(text.encode(), dtype=np.uint8)
    return np.array(text, dtype=h5py.string_dtype())


def _uniform_array(items: list | tuple) -> np.ndarray | None:
    """A 1-D array for a list of one plain type (the common case: ids, milestones, names), else None."""
    if not items:
        return np.zeros(0, dtype=np.int8)
    kinds = {type(v) for v in items}
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    if kind is bool:
        return np.array(items, dtype=np.bool_)
    if kind is int and all(_INT64_MIN <= v <= _INT64_MAX for v in items):
        return np.array(items, dtype=np.int64)
    if kind is float:
        return np.array(items, dtype=np.float64)
    if kind is str and not any("\x00" in v for v in items):
        return np.array(items, dtype=h5py.string_dtype())
    return None


def _tensor_array(t: torch.Tensor, path: str) -> tuple[np.ndarray, str]:
    dtype = str(t.dtype).removeprefix("torch.")
    if t.layout != torch.strided or t.is_quantized:
        kind = "quantized" if t.is_quantized else str(t.layout).removeprefix("torch.")
        raise CheckpointError(f"cannot store {path}: {kind} tensors are not supported; store a dense tensor")
    t = t.detach().cpu().resolve_conj().resolve_neg().contiguous()
    try:
        return t.numpy(), dtype
    except TypeError:
        pass
    # No numpy dtype (bfloat16, float8): keep the bits, lossless, as unsigned integers of the same width.
    size = t.element_size()
    if size not in _SIGNED_BITS:
        raise CheckpointError(f"cannot store {path}: tensor dtype {dtype} is not supported")
    try:
        bits = t.view(torch.uint8 if size == 1 else getattr(torch, f"int{size * 8}"))
    except RuntimeError as exc:
        raise CheckpointError(f"cannot store {path}: tensor dtype {dtype} is not supported ({exc})") from exc
    return bits.numpy().view(f"u{size}"), dtype


def _read_node(obj: h5py.Group | h5py.Dataset) -> Any:
    kind = obj.attrs.get("type", "")
    if isinstance(obj, h5py.Group):
        if kind in ("list", "tuple"):
            items = [_read_node(obj[str(i)]) for i in range(len(obj))]
            return tuple(items) if kind == "tuple" else items
        int_keys = set(obj.attrs.get("int_keys", ()))
        return {int(name) if name in int_keys else _unescape(name): _read_node(child) for name, child in obj.items()}
    if kind == "none":
        return None
    if kind in ("str", "bigint"):
        text = bytes(obj[()]).decode() if obj.dtype.kind == "u" else obj.asstr()[()]
        return int(text) if kind == "bigint" else text
    if kind in ("list", "tuple"):
        items = (obj.asstr()[()] if h5py.check_string_dtype(obj.dtype) else obj[()]).tolist()
        return tuple(items) if kind == "tuple" else items
    if kind.startswith("torch."):
        return _tensor_from(np.asarray(obj[()]), kind.removeprefix("torch."))
    if kind in ("int", "float", "bool"):
        return obj[()].item()
    if kind == "numpy":
        return np.asarray(obj[()])
    return obj[()]  # numpy scalars, foreign datasets


def _tensor_from(array: np.ndarray, dtype_name: str) -> torch.Tensor:
    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"unknown tensor dtype '{dtype_name}' in checkpoint")
    if not array.flags.writeable:
        array = array.copy()
    tensor = torch.from_numpy(array) if array.dtype.kind != "u" or array.dtype.itemsize == 1 else None
    if tensor is None or tensor.dtype != dtype:
        tensor = torch.from_numpy(array.view(_SIGNED_BITS[array.dtype.itemsize])).view(dtype)
    return tensor


# --------------------------------------------------------------------------------------------------
# Files: written under a temporary name in the same directory, then fsynced, checksummed and renamed.
# HDF5 writes straight to the file (the page cache) rather than through a Python file object, which
# costs more than the disk does. File locking is off: the temporary names are unique and finished
# files never change, and HDF5's locks fail on some cluster file systems.


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _crc_of(path: Path) -> tuple[int, int]:
    """(size, CRC-32) of a file, streamed: a thread reads the next chunk while this one is checksummed
    (both release the GIL), so a cold file costs about one read of the disk."""
    crc = size = 0
    buffers = (bytearray(_CHUNK), bytearray(_CHUNK))
    with open(path, "rb", buffering=0) as f, ThreadPoolExecutor(1, thread_name_prefix="hpcgraft-read") as reader:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        pending = reader.submit(f.readinto, buffers[0])
        turn = 0
        while n := pending.result():
            pending = reader.submit(f.readinto, buffers[1 - turn])
            crc = zlib.crc32(memoryview(buffers[turn])[:n], crc)
            size += n
            turn = 1 - turn
    return size, crc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, path: Path) -> dict[str, Any]:
    """Make the written file ``tmp`` durable under the name ``path``; returns its manifest entry.

    The checksum is computed by reading the file back while fsync runs in a thread: it comes from the
    page cache, so it is nearly free while the disk is busy, and it covers exactly the bytes written.
    """
    fd = os.open(tmp, os.O_WRONLY | os.O_CLOEXEC)
    try:
        failure: list[OSError] = []

        def sync() -> None:
            try:
                os.fsync(fd)
            except OSError as exc:
                failure.append(exc)

        syncer = threading.Thread(target=sync, name="hpcgraft-fsync")
        syncer.start()
        try:
            size, crc = _crc_of(tmp)
        finally:
            syncer.join()
        if failure:
            raise failure[0]
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return {"size": size, "crc32": f"{crc:08x}"}


def _write_h5(path: Path, tree: Mapping, meta: Mapping[str, Any]) -> dict[str, Any]:
    """Write one checkpoint file atomically: a crash leaves the old file or the new one, never a torn one."""
    tmp = _tmp_name(path)
    try:
        with h5py.File(tmp, "w", track_order=True, locking=False) as f:
            write_tree(f, tree)
            for key, value in meta.items():
                f.attrs[f"hpcgraft.{key}"] = h5py.Empty("f8") if value is None else value
        return _commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes | memoryview) -> dict[str, Any]:
    """Write bytes atomically, like the HDF5 files (the manifest, exported models)."""
    view = memoryview(data).cast("B")
    tmp = _tmp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            done = 0
            while done < len(view):
                done += os.write(fd, view[done:done + _CHUNK])
        finally:
            os.close(fd)
        return _commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _file_problem(path: Path, entry: Mapping[str, Any]) -> str | None:
    """Why ``path`` does not match its manifest entry; None if it does."""
    try:
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{path.name}: {size} bytes instead of {entry['size']}"
        size, crc = _crc_of(path)
    except FileNotFoundError:
        return f"{path.name}: missing"
    except OSError as exc:
        return f"{path.name}: unreadable ({exc.strerror})"
    if size != entry["size"]:  # it changed while being read
        return f"{path.name}: {size} bytes instead of {entry['size']}"
    return None if f"{crc:08x}" == entry["crc32"] else f"{path.name}: checksum mismatch"


def _open_verified(path: Path, entry: Mapping[str, Any]) -> h5py.File:
    """Open a checkpoint file after checking it against its manifest entry (the read that checks it
    also brings it into the page cache for the parse)."""
    if problem := _file_problem(path, entry):
        raise CheckpointError(f"checkpoint {path.parent.name} is damaged ({problem})")
    return _open_h5(path)


def _open_h5(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as exc:
        raise CheckpointError(f"{path} is not a readable HDF5 file ({_one_line(exc)})") from None


def _load_file(path: Path, entry: Mapping[str, Any]) -> Tree:
    with _open_verified(path, entry) as f:
        return read_tree(f)


def _stamp(path: Path) -> tuple[int, int, int, int]:
    """What identifies one version of a file: a rewrite or replacement changes it."""
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def read_manifest(ckpt_dir: Path) -> dict[str, Any]:
    """The parsed and checked manifest; CheckpointError says what is wrong with it."""
    path = ckpt_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{MANIFEST} missing: the save did not finish") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{MANIFEST} unreadable ({_one_line(exc)})") from None
    try:
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format is {manifest.get('format')!r}, not {FORMAT!r}")
        step, epoch, peers, files = (manifest[k] for k in ("step", "epoch", "peers", "files"))
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (step, epoch, peers)):
            raise ValueError("step, epoch and peers must be integers")
        for name in [peer_file(p) for p in range(peers)] + [RUN_FILE]:
            if name not in files:
                raise ValueError(f"{name} is not listed")
        for name, entry in files.items():
            if not isinstance(entry.get("size"), int) or not isinstance(entry.get("crc32"), str):
                raise ValueError(f"the entry of {name} needs a size and a crc32")
        if len(manifest.get("metrics", [])) != peers:
            raise ValueError(f"metrics must list {peers} peers")
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{MANIFEST} invalid ({_one_line(exc)})") from None
    return manifest


def _info(ckpt_dir: Path, manifest: Mapping[str, Any]) -> CheckpointInfo:
    return CheckpointInfo(path=ckpt_dir, step=manifest["step"], epoch=manifest["epoch"], peers=manifest["peers"])


def _step_dirs(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Checkpoint directories under ``ckpt_root``, newest step first."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


@dataclass
class _Candidate:
    step: int
    path: Path
    manifest: dict[str, Any] | None
    problem: str | None  # why the manifest is unusable


def _candidates(ckpt_root: Path) -> list[_Candidate]:
    out = []
    for step, path in _step_dirs(ckpt_root):
        try:
            out.append(_Candidate(step, path, read_manifest(path), None))
        except CheckpointError as exc:
            out.append(_Candidate(step, path, None, str(exc)))
    return out


def _choose(candidates: list[_Candidate], verify: Callable[[_Candidate], str | None],
            report: bool) -> _Candidate | None:
    """The newest candidate that verifies. Each damaged one newer than it is reported in one line on
    stderr (when ``report``); if only damaged complete checkpoints exist, that is an error, because
    silently starting over would throw away the run."""
    damaged: list[tuple[_Candidate, str]] = []
    chosen = None
    for cand in candidates:
        problem = cand.problem or verify(cand)
        if problem is None:
            chosen = cand
            break
        damaged.append((cand, problem))
    if report:
        tail = f"falling back to {chosen.path.name}" if chosen else "no earlier checkpoint"
        for cand, problem in damaged:
            print(f"hpcgraft: checkpoint {cand.path.name} is damaged ({problem}); {tail}", file=sys.stderr, flush=True)
    if chosen is None and any(c.manifest is not None for c, _ in damaged):
        cand, problem = damaged[0]
        raise CheckpointError(f"no intact checkpoint in {cand.path.parent}: {cand.path.name} is damaged ({problem}) "
                              "and no earlier one verifies; restore the files or start over with --restart")
    return chosen


def _verify_serial(cand: _Candidate) -> str | None:
    assert cand.manifest is not None
    for name, entry in sorted(cand.manifest["files"].items()):
        if problem := _file_problem(cand.path / name, entry):
            return problem
    return None


def _remove_dir(path: Path) -> None:
    """Rename first, so a removal cut short never leaves something that looks like a checkpoint."""
    trash = path.with_name(f".trash-{path.name}")
    os.replace(path, trash)
    shutil.rmtree(trash)


# --------------------------------------------------------------------------------------------------


class CheckpointManager:
    """Collective save/resume of a run's checkpoints; see the module docstring for the layout."""

    def __init__(self, run_dir: str | Path, comm: MPI.Comm, *, peer: int, peers: int, writer: bool,
                 keep: int = 2, keep_best: bool = True) -> None:
        if keep < 1:
            raise CheckpointError(f"checkpoint.keep must be at least 1, got {keep}")
        if not 0 <= peer < peers:
            raise CheckpointError(f"peer {peer} is outside 0..{peers - 1}")
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"
        self.comm = comm
        self.rank = comm.Get_rank()
        self.peer, self.peers, self.writer = peer, peers, writer
        self.keep, self.keep_best = keep, keep_best
        self._verified: set[tuple[int, int, int, int]] = set()  # files this rank checked in latest()

    # ---- save -------------------------------------------------------------------------------------

    def save(self, step: int, epoch: int, peer_tree: Tree, run_tree: Tree | None, *,
             metric: float | None = None) -> CheckpointInfo:
        """COLLECTIVE: write this step's checkpoint; raises CheckpointError on every rank if any rank failed."""
        step, epoch = operator.index(step), operator.index(epoch)  # the same on all ranks: no one waits alone
        ckpt_dir = self.root / step_dir_name(step)
        prepared = self._guard(lambda: self._prepare(ckpt_dir)) if self.rank == 0 else None
        layout = self.comm.allgather((step, epoch, self.peer, self.peers, self.writer, prepared))
        self._check_layout(layout)

        files: dict[str, Any] = {}
        failure = score = None
        try:
            meta = {"format": FORMAT, "step": step, "epoch": epoch, "peers": self.peers}
            if self.writer:
                score = _finite(metric)
                ckpt_dir.mkdir(parents=True, exist_ok=True)  # a shared file system may lag behind rank 0's mkdir
                name = peer_file(self.peer)
                files[name] = _write_h5(ckpt_dir / name, peer_tree, {**meta, "peer": self.peer, "metric": score})
            if self.rank == 0:
                files[RUN_FILE] = _write_h5(ckpt_dir / RUN_FILE, run_tree or {}, meta)
        except Exception as exc:  # noqa: BLE001 - reported on every rank below
            failure = f"rank {self.rank} could not write {ckpt_dir.name}: {_one_line(exc)}"
        reports = self.comm.gather((failure, files, self.peer if self.writer else None, score), root=0)

        outcome = None
        if self.rank == 0:
            outcome = self._guard(lambda: self._finish(ckpt_dir, step, epoch, reports))
        outcome = self.comm.bcast(outcome, root=0)
        if outcome is not None:
            raise CheckpointError(f"checkpoint at step {step} failed: {outcome}")
        return CheckpointInfo(path=ckpt_dir, step=step, epoch=epoch, peers=self.peers)

    @staticmethod
    def _guard(action: Callable[[], str | None]) -> str | None:
        """Run rank 0's part; a failure becomes a message to broadcast instead of leaving others waiting."""
        try:
            return action()
        except Exception as exc:  # noqa: BLE001 - every rank must learn of it
            return _one_line(exc)

    def _prepare(self, ckpt_dir: Path) -> None:
        """Make the step directory; a checkpoint of the same step being replaced stops counting first."""
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _fsync_dir(self.root)
        if (ckpt_dir / MANIFEST).exists():
            (ckpt_dir / MANIFEST).unlink()
            _fsync_dir(ckpt_dir)

    def _check_layout(self, layout: list[tuple]) -> None:
        """Same inputs on every rank and exactly one writer per peer; every rank reaches the same verdict."""
        step, epoch, _, peers, _, prepared = layout[0]
        if prepared is not None:
            raise CheckpointError(f"checkpoint at step {step} failed: rank 0 could not prepare it: {prepared}")
        for rank, (s, e, _, k, _, _) in enumerate(layout):
            if (s, e, k) != (step, epoch, peers):
                raise CheckpointError(f"save() called with step {s}, epoch {e}, peers {k} on rank {rank} but step "
                                      f"{step}, epoch {epoch}, peers {peers} on rank 0; every rank must save together")
        writers = sorted(p for _, _, p, _, w, _ in layout if w)
        if writers != list(range(peers)):
            raise CheckpointError(f"checkpoint writers cover peers {writers}, expected exactly one writer for each of "
                                  f"0..{peers - 1} (replica 0 of every peer)")

    def _finish(self, ckpt_dir: Path, step: int, epoch: int, reports: list[tuple]) -> str | None:
        failures = [f for f, *_ in reports if f]
        if failures:  # every writer has stopped: drop the partial directory, so resumes do not report it
            try:
                _remove_dir(ckpt_dir)
            except OSError:
                pass
            return "; ".join(failures)
        files: dict[str, Any] = {}
        metrics: list[float | None] = [None] * self.peers
        for _, written, peer, metric in reports:
            files.update(written)
            if peer is not None:
                metrics[peer] = metric
        manifest = {
            "format": FORMAT, "version": FORMAT_VERSION, "step": step, "epoch": epoch, "peers": self.peers,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "metrics": metrics,
            "files": dict(sorted(files.items())),
        }
        write_atomic(ckpt_dir / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
        try:
            self._prune(step)
        except OSError as exc:  # the checkpoint is complete: failing to tidy up is not a failed save
            print(f"hpcgraft: warning: could not prune {self.root}: {_one_line(exc)}", file=sys.stderr, flush=True)
        return None

    def _prune(self, step: int) -> None:
        """Keep the newest ``keep`` complete checkpoints and each peer's best; drop older unfinished ones.

        Directories of later steps than the one just written are left from before a fallback to an
        earlier checkpoint (they were damaged, or the run was rolled back): they go too, so a later
        resume cannot jump onto the abandoned timeline. A failure to delete is a warning, not an error:
        the checkpoint just written is safe either way.
        """
        # Leftovers of an interrupted removal go first, so their names are free again.
        for trash in [p for p in self.root.iterdir() if p.name.startswith(".trash-")]:
            shutil.rmtree(trash, ignore_errors=True)
        candidates = _candidates(self.root)
        current = [c for c in candidates if c.step <= step]
        complete = [c for c in current if c.manifest is not None]
        keep = {c.path for c in complete[: self.keep]}
        if self.keep_best:
            for p in range(self.peers):
                scored = [(c.manifest["metrics"][p], c.step, c.path) for c in complete
                          if p < len(c.manifest["metrics"]) and c.manifest["metrics"][p] is not None]
                if scored:
                    keep.add(max(scored)[2])
        doomed = [c.path for c in candidates if c.step > step]
        doomed += [c.path for c in current if c.path not in keep and (c.manifest is not None or c.step < step)]
        for path in doomed:
            try:
                _remove_dir(path)
            except OSError as exc:
                print(f"hpcgraft: warning: could not remove old checkpoint {path.name}: {exc.strerror}",
                      file=sys.stderr, flush=True)

    # ---- resume -----------------------------------------------------------------------------------

    def latest(self) -> CheckpointInfo | None:
        """COLLECTIVE: the newest complete checkpoint whose files verify, the same on every rank.

        The files are checked in parallel, each peer file by the rank that writes (and will load) it,
        run.h5 by rank 0, so that load_peer right after need not read the file a second time.
        """
        writer_of = {p: r for r, p in enumerate(self.comm.allgather(self.peer if self.writer else None))
                     if p is not None}
        size = self.comm.Get_size()

        def checker(index: int, name: str) -> int:
            match = re.fullmatch(r"peer-(\d+)\.h5", name)
            owner = writer_of.get(int(match.group(1))) if match else (0 if name == RUN_FILE else None)
            return index % size if owner is None else owner

        listing: list[_Candidate] | str | None = None
        if self.rank == 0:
            try:
                listing = _candidates(self.root)
            except OSError as exc:
                listing = _one_line(exc)
        listing = self.comm.bcast(listing, root=0)
        if isinstance(listing, str):
            raise CheckpointError(f"cannot list checkpoints in {self.root}: {listing}")

        def verify(cand: _Candidate) -> str | None:
            names = sorted(cand.manifest["files"])
            mine = {}
            for n in [n for i, n in enumerate(names) if checker(i, n) == self.rank]:
                path = cand.path / n
                try:
                    mine[n] = _file_problem(path, cand.manifest["files"][n])
                    if mine[n] is None:
                        self._verified.add(_stamp(path))
                except Exception as exc:  # noqa: BLE001 - must reach the allgather, or the others wait forever
                    mine[n] = f"{n}: unreadable ({_one_line(exc)})"
            found = {}
            for part in self.comm.allgather(mine):
                found.update(part)
            return next((found[n] for n in names if found[n]), None)

        # Every rank saw the same listing and verification results, so all return or raise alike.
        chosen = _choose(listing, verify, report=self.rank == 0)
        if chosen is None:
            return None
        return _info(chosen.path, chosen.manifest)  # the caller compares info.peers with its own layout

    def load_peer(self, info: CheckpointInfo, peer: int) -> Tree:
        """The tree peer ``peer`` saved; its file is checked against the manifest before it is parsed,
        unless this rank checked that very file (same inode, size and mtime) in :meth:`latest`."""
        return self._load(*_member(info, peer_file(_check_peer(info, peer))))

    def load_run(self, info: CheckpointInfo) -> Tree:
        return self._load(*_member(info, RUN_FILE))

    def _load(self, path: Path, entry: Mapping[str, Any]) -> Tree:
        try:
            checked = _stamp(path) in self._verified
        except OSError:
            checked = False
        with _open_h5(path) if checked else _open_verified(path, entry) as f:
            return read_tree(f)


def _finite(metric: float | None) -> float | None:
    """Metrics go into JSON, which has no NaN; a non-finite metric never counts as the best."""
    value = None if metric is None else float(metric)
    return value if value is not None and math.isfinite(value) else None


def _check_peer(info: CheckpointInfo, peer: int) -> int:
    if not 0 <= peer < info.peers:
        raise CheckpointError(f"checkpoint {info.path.name} has {info.peers} peers (0..{info.peers - 1}); "
                              f"peer {peer} does not exist")
    return peer


def _member(info: CheckpointInfo, name: str) -> tuple[Path, dict[str, Any]]:
    try:
        manifest = read_manifest(info.path)
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {info.path.name} is damaged ({exc})") from None
    return info.path / name, manifest["files"][name]


# --------------------------------------------------------------------------------------------------
# CLI


def _resolve(path: Path) -> CheckpointInfo:
    """A checkpoint directory, or a run directory's newest intact checkpoint, checked against its manifest."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory, a run directory or a checkpoint .h5 file")
    if _STEP_DIR.match(path.name) or (path / MANIFEST).exists():
        try:
            cand = _Candidate(0, path, read_manifest(path), None)
            problem = _verify_serial(cand)
        except CheckpointError as exc:
            problem = str(exc)
        if problem:
            raise CheckpointError(f"checkpoint {path.name} is damaged ({problem})")
        return _info(path, cand.manifest)
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    chosen = _choose(_candidates(root), _verify_serial, report=True)
    if chosen is None:
        raise CheckpointError(f"no complete checkpoint in {root}")
    return _info(chosen.path, chosen.manifest)


def _walk(group: h5py.Group, prefix: str = "") -> Iterator[tuple[str, h5py.Dataset]]:
    for name, obj in group.items():
        path = f"{prefix}/{_unescape(name)}"
        if isinstance(obj, h5py.Group):
            yield from _walk(obj, path)
        else:
            yield path, obj


def _is_array(kind: str) -> bool:
    return kind.startswith("torch.") or kind == "numpy"


def _tensor_stats(f: h5py.File) -> tuple[int, int]:
    count = nbytes = 0
    for _, ds in _walk(f):
        if _is_array(ds.attrs.get("type", "")):
            count += 1
            nbytes += ds.size * ds.dtype.itemsize
    return count, nbytes


def _describe(ds: h5py.Dataset) -> str:
    kind = ds.attrs.get("type", "dataset")
    if _is_array(kind):
        return f"{kind if kind.startswith('torch.') else f'numpy.{ds.dtype}'} {tuple(ds.shape)}"
    value = repr(_read_node(ds))
    return f"{kind} {value if len(value) <= 60 else value[:57] + '...'}"


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _keys(group: h5py.Group) -> str:
    """Top-level keys for a summary line; odd ones (empty, spaces, commas) quoted."""
    keys = [_unescape(k) for k in group]
    return ", ".join(k if k and k.strip() == k and "," not in k else repr(k) for k in keys) or "(none)"


def _inspect_file(path: Path, show_tree: bool) -> None:
    if path.suffix != ".h5":
        raise CheckpointError(f"{path} is not a checkpoint directory, a run directory or a checkpoint .h5 file")
    if (path.parent / MANIFEST).exists():  # part of a checkpoint: check it like a load would
        manifest = read_manifest(path.parent)
        if path.name not in manifest["files"]:
            raise CheckpointError(f"{path.name} is not listed in {path.parent / MANIFEST}")
        f = _open_verified(path, manifest["files"][path.name])
        note = "verified against MANIFEST.json"
    else:
        f = _open_h5(path)
        note = "no MANIFEST.json beside it: not verified"
    with f:
        meta = {k.removeprefix("hpcgraft."): f.attrs[k] for k in f.attrs if k.startswith("hpcgraft.")}
        count, nbytes = _tensor_stats(f)
        head = ", ".join(f"{k} {_plain(v)}" for k, v in meta.items() if k != "format")
        print(f"{path} ({note}): {head}")
        print(f"tensors {count}, {nbytes} bytes ({_size(nbytes)})")
        print(f"keys: {_keys(f)}")
        if show_tree:
            for name, ds in _walk(f):
                print(f"  {name}  {_describe(ds)}")


def _plain(value: Any) -> Any:
    if isinstance(value, h5py.Empty):
        return None
    return value.item() if isinstance(value, np.generic) else value


def _inspect(path: Path, show_tree: bool) -> None:
    if path.is_file():
        _inspect_file(path, show_tree)
        return
    info = _resolve(path)
    manifest = read_manifest(info.path)
    print(f"checkpoint {info.path}: step {info.step}, epoch {info.epoch}, peers {info.peers}, "
          f"created {manifest.get('created', '?')}, all files verified (crc32)")
    print(f"{'peer':>4}  {'tensors':>7}  {'bytes':>12}  {'metric':>8}  file")
    for p in range(info.peers):
        name = peer_file(p)
        with _open_h5(info.path / name) as f:
            count, nbytes = _tensor_stats(f)
        metric = manifest["metrics"][p]
        shown = "-" if metric is None else f"{metric:.4f}"
        print(f"{p:>4}  {count:>7}  {nbytes:>12}  {shown:>8}  {name} ({_size(manifest['files'][name]['size'])})")
    with _open_h5(info.path / RUN_FILE) as f:
        print(f"run.h5 keys: {_keys(f)}")
        if show_tree:
            for name, ds in _walk(f):
                print(f"  {RUN_FILE}:{name}  {_describe(ds)}")
    if show_tree:
        for p in range(info.peers):
            with _open_h5(info.path / peer_file(p)) as f:
                for name, ds in _walk(f):
                    print(f"  {peer_file(p)}:{name}  {_describe(ds)}")


def _flat_state(tree: Mapping, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat_state(value, name + "."))
        elif isinstance(value, torch.Tensor):
            out[name] = value
        else:
            raise CheckpointError(f"model entry '{name}' is a {type(value).__name__}, not a tensor; "
                                  "a state_dict holds tensors only")
    return out


def _export(path: Path, peer: int | None, out: Path) -> None:
    if path.is_file():
        match = re.fullmatch(r"peer-(\d+)\.h5", path.name)
        if not match:
            raise CheckpointError(f"{path} is not a peer file (peer-NNN.h5); pass it or its checkpoint directory")
        if peer is not None and peer != int(match.group(1)):
            raise CheckpointError(f"{path.name} holds peer {int(match.group(1))}, not --peer {peer}")
        peer, path = int(match.group(1)), path.parent
    if peer is None:
        raise CheckpointError("say which peer to export with --peer I")
    info = _resolve(path)
    tree = _load_file(*_member(info, peer_file(_check_peer(info, peer))))
    if not isinstance(tree.get("model"), Mapping):
        raise CheckpointError(f"{peer_file(peer)} of {info.path.name} has no 'model' subtree "
                              f"(keys: {', '.join(map(str, tree)) or 'none'})")
    state = _flat_state(tree["model"])
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)  # the export format: a plain state_dict for torch.load(weights_only=True)
    write_atomic(out, buffer.getbuffer())
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    print(f"wrote {out}: peer {peer} of {info.path} (step {info.step}, epoch {info.epoch}), "
          f"{len(state)} tensors, {_size(nbytes)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpcgraft.checkpoint",
                                     description="Inspect hpcgraft checkpoints or export a peer's model.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_inspect = sub.add_parser("inspect", help="show what a checkpoint holds")
    p_inspect.add_argument("path", type=Path, help="a checkpoint directory, a peer .h5 file, or a run directory")
    p_inspect.add_argument("--tree", action="store_true", help="list every dataset with its dtype and shape")
    p_export = sub.add_parser("export", help="write a peer's model as a plain PyTorch state_dict")
    p_export.add_argument("path", type=Path, help="a checkpoint directory, a peer .h5 file, or a run directory")
    p_export.add_argument("--peer", type=int, help="which peer's model to export")
    p_export.add_argument("--out", type=Path, required=True, help="the .pt file to write")
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            _inspect(args.path, args.tree)
        else:
            _export(args.path, args.peer, args.out)
    except CheckpointError as exc:
        print(f"hpcgraft: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into head: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        print(f"hpcgraft: error: {exc.filename or args.path}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
