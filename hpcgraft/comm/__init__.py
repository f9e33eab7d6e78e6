"""Everything between ranks: the world and its agreement, failure handling, the grafting exchange,
replicas and the logits allgather.

Nothing here imports the config, the data or the storage layers, and nothing starts MPI at import:
``mpi4py.MPI`` is imported on first use (:func:`mpi`), so offline tools can import any module.
"""

from __future__ import annotations

from types import ModuleType

from hpcgraft.supervise import note_mpi_started, watch_supervisor

_noted = False


def mpi() -> ModuleType:
    """The ``mpi4py.MPI`` module; importing it initialises MPI, hence only when a rank needs it."""
    global _noted
    watch_supervisor()  # before MPI makes shared memory: a rank whose supervisor dies removes it
    from mpi4py import MPI

    if not _noted:  # once MPI exists: the supervisor's start-up clock stops; it removes the shared memory
        _noted = True
        note_mpi_started()
    return MPI
