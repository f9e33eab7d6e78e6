"""Fakes that let a unit test run code written for MPI without starting MPI (tests/unit is the fast tier:
tests/unit/conftest.py)."""

from __future__ import annotations

import pickle
from typing import Any


class SoloComm:
    """A world of one rank, in the shape of ``MPI.COMM_SELF``: each collective returns what this rank gave.
    Objects travel through pickle, as with mpi4py, so that no caller shares an object with its result."""

    def Get_rank(self) -> int:  # noqa: N802 - mpi4py's name
        return 0

    def Get_size(self) -> int:  # noqa: N802 - mpi4py's name
        return 1

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return _copy(obj)

    def gather(self, obj: Any, root: int = 0) -> list:
        return [_copy(obj)]

    def allgather(self, obj: Any) -> list:
        return [_copy(obj)]

    def allreduce(self, obj: Any, op: object = None) -> Any:
        return _copy(obj)

    def Barrier(self) -> None:  # noqa: N802 - mpi4py's name
        return None

    def Free(self) -> None:  # noqa: N802 - mpi4py's name
        return None


def _copy(obj: Any) -> Any:
    return pickle.loads(pickle.dumps(obj))
