"""Nested trees in HDF5: what a checkpoint file holds, readable by plain h5py and ``h5ls -r``.

Every dict or non-uniform list is a group, every leaf a dataset (scalars too, so that `h5ls -r` shows
the whole tree). One attribute per node, "type", says what to rebuild: "torch.<dtype>" for tensors
(bfloat16/float8 are stored as same-width unsigned ints, bit for bit), "numpy", "int", "float", "bool",
"str", "none", "list", "dict", ...; a group whose keys were ints lists them in "int_keys". Attributes
cost more than data in HDF5, hence one. Names are the keys with "%" and "/" escaped (and "" and "."
spelled out), so any str key survives. Nothing here uses pickle: reading a tree cannot run code.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import h5py
import numpy as np
import torch

from hpcgraft.errors import CheckpointError

# A tree is a nested dict (str or int keys) whose leaves are torch.Tensor, np.ndarray, numpy scalars,
# int, float, bool, str, None, or lists/tuples of those (lists may also hold dicts).
Tree = dict[str, Any]


def one_line(exc: BaseException) -> str:
    """An exception as one line: its message, prefixed by its type unless it is a CheckpointError."""
    text = " ".join(str(exc).split())
    return text if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {text}"


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
        raise CheckpointError(f"cannot store {path}: {one_line(exc)}") from exc
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



def read_node(obj: h5py.Group | h5py.Dataset) -> Any:
    """One node of a tree (a group or a single dataset), rebuilt like :func:`read_tree` does."""
    return _read_node(obj)


def key_of(name: str) -> str:
    """The tree key an HDF5 member name stands for."""
    return _unescape(name)


def walk(group: h5py.Group, prefix: str = "") -> Iterator[tuple[str, h5py.Dataset]]:
    """(key path, dataset) of every leaf under ``group``, depth first."""
    for name, obj in group.items():
        path = f"{prefix}/{_unescape(name)}"
        if isinstance(obj, h5py.Group):
            yield from walk(obj, path)
        else:
            yield path, obj
