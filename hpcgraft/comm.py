"""Communication: the MPI world of a run, its peer/replica layout, and failure handling.

Layout: with R replicas per peer, peer p owns world ranks p*R .. p*R+R-1 (replica = rank % R).
``graft_comm`` joins the ranks of one replica index across peers (its rank is the peer index: the ring
lives there); ``peer_comm`` joins the replicas of one peer (data parallelism lives there).

Failures must not hang an allocation: an exception on any rank aborts the whole job, and a watchdog
aborts a collective that takes far longer than it should.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from mpi4py import MPI

EXIT_FAILURE = 1
EXIT_REQUEUE = 75  # EX_TEMPFAIL: a checkpoint was written on SIGUSR1/SIGTERM; requeue the job to continue


@dataclass
class World:
    comm: MPI.Comm
    rank: int
    size: int
    local_rank: int
    local_size: int
    peer: int
    peers: int
    replica: int
    replicas: int
    graft_comm: MPI.Comm
    peer_comm: MPI.Comm

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def is_peer_lead(self) -> bool:
        """Replica 0 of its peer: the rank that reports and writes for the peer."""
        return self.replica == 0


class AgreedError(Exception):
    """An error every rank has already agreed on: each rank exits cleanly, without an abort."""


class LayoutError(ValueError):
    """A rank count that does not fit the requested peers x replicas layout."""


def init_world(replicas: int = 1, comm: MPI.Comm | None = None) -> World:
    """Form the peers x replicas layout over ``comm`` (default: the MPI world)."""
    comm = comm or MPI.COMM_WORLD
    size, rank = comm.Get_size(), comm.Get_rank()
    if size % replicas:
        raise LayoutError(
            f"{size} ranks cannot form peers of dist.replicas={replicas} ranks each; start a multiple of "
            f"{replicas} ranks (mpirun -np {replicas * max(2, size // replicas)}) or change dist.replicas"
        )
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = local.Get_rank(), local.Get_size()
    local.Free()
    peer, replica = divmod(rank, replicas)
    return World(
        comm=comm, rank=rank, size=size, local_rank=local_rank, local_size=local_size,
        peer=peer, peers=size // replicas, replica=replica, replicas=replicas,
        graft_comm=comm.Split(color=replica, key=peer), peer_comm=comm.Split(color=peer, key=replica),
    )


def log(message: str, *, world: World | None = None, all_ranks: bool = False) -> None:
    """Print from rank 0 (or from every rank, prefixed) with an immediate flush."""
    if world is not None and not all_ranks and not world.is_root:
        return
    prefix = f"[rank {world.rank}] " if world is not None and all_ranks else ""
    print(f"{prefix}{message}", file=sys.stderr, flush=True)


def abort(comm: MPI.Comm, message: str, code: int = EXIT_FAILURE) -> None:
    """Print one line naming this rank, then take every rank of the job down."""
    print(f"hpcgraft: rank {comm.Get_rank()}: {message}", file=sys.stderr, flush=True)
    if comm.Get_size() > 1:
        comm.Abort(code)
    sys.exit(code)


@contextlib.contextmanager
def abort_on_error(comm: MPI.Comm) -> Iterator[None]:
    """Run the body; an exception on this rank logs its traceback and aborts the communicator, so
    the other ranks stop at once instead of waiting forever in their next collective."""
    try:
        yield
    except (SystemExit, AgreedError):
        raise
    except KeyboardInterrupt:
        abort(comm, "interrupted")
    except BaseException as exc:  # noqa: BLE001 - any failure must take the job down
        from hpcgraft.config import ConfigError
        from hpcgraft.data import DataError

        if isinstance(exc, (ConfigError, DataError, LayoutError, PeerMismatchError)):
            abort(comm, f"error: {exc}")
        traceback.print_exc(file=sys.stderr)
        abort(comm, f"failed with {type(exc).__name__}: {exc}")


class Watchdog:
    """Aborts the job when one guarded collective lasts longer than ``timeout`` seconds.

    A lost node leaves its partners blocked in MPI forever; this turns that into a clean abort that
    names the stuck operation, so the allocation is released and the job can be resubmitted.
    """

    def __init__(self, comm: MPI.Comm, timeout: float) -> None:
        self.comm, self.timeout = comm, timeout
        self._lock = threading.Lock()
        self._what: str | None = None
        self._since = 0.0
        self._thread = threading.Thread(target=self._watch, name="hpcgraft-watchdog", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        with self._lock:
            self._what, self._since = what, time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._what = None

    def _watch(self) -> None:
        tick = min(1.0, self.timeout / 4)
        while True:
            time.sleep(tick)
            with self._lock:
                what, since = self._what, self._since
            if what is not None and time.monotonic() - since > self.timeout:
                abort(self.comm, f"watchdog: '{what}' took longer than dist.watchdog_s={self.timeout:g} s; "
                                 "a peer is lost or stuck, aborting the job")


class PeerMismatchError(ValueError):
    """Ranks started with different configurations or models."""


def check_peers_agree(comm: MPI.Comm, flat_config: dict[str, Any], model_signature: list) -> None:
    """Every rank compares its resolved config and model layout with rank 0's.

    Raises on every rank (so all of them stop) with a message naming the first differing rank and key.
    """
    import hashlib
    import json

    sig_hash = hashlib.sha256(json.dumps(model_signature).encode()).hexdigest()
    everything = comm.allgather((flat_config, sig_hash, model_signature))
    ref_cfg, ref_hash, ref_sig = everything[0]
    for rank, (cfg, h, sig) in enumerate(everything[1:], start=1):
        keys = sorted(set(ref_cfg) | set(cfg))
        diff = [k for k in keys if ref_cfg.get(k) != cfg.get(k)]
        if diff:
            k = diff[0]
            raise PeerMismatchError(
                f"rank {rank} was started with a different config: {k}={cfg.get(k)!r} there, "
                f"{ref_cfg.get(k)!r} on rank 0; start every rank with the same config and overrides"
            )
        if h != ref_hash:
            first = next((a, b) for a, b in zip(ref_sig + [None], sig + [None], strict=False) if a != b)
            raise PeerMismatchError(
                f"rank {rank} built a different model: {first[1]} there, {first[0]} on rank 0; "
                "every peer must have the same architecture"
            )


def torch_threads(local_size: int) -> int:
    """CPU threads per rank: the cores this process may use, shared by the ranks of the node."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_size))


_stop_signal: int | None = None


def _on_stop_signal(signum: int, frame: object) -> None:
    global _stop_signal
    _stop_signal = signum


def catch_stop_signals() -> None:
    """Record SIGUSR1/SIGTERM instead of dying; call first thing, so a signal during set-up is kept too."""
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _on_stop_signal)


class StopRequest:
    """SIGUSR1/SIGTERM on any rank -> every rank sees ``poll() == True`` at the same step.

    SLURM sends USR1 before a time limit (``--signal``) and TERM on preemption, to each rank at a
    slightly different moment. A pipelined non-blocking MAX-allreduce of the local flag, started at one
    step and completed at the next, makes all ranks agree on where to stop at no cost to the step.
    """

    def __init__(self, comm: MPI.Comm) -> None:
        catch_stop_signals()
        self.comm = comm.Dup()
        self._send = np.zeros(1, dtype=np.int32)
        self._recv = np.zeros(1, dtype=np.int32)
        self._req: MPI.Request | None = None

    @property
    def received(self) -> int | None:
        return _stop_signal

    def poll(self) -> bool:
        """Collective: call once per step on every rank."""
        if self._req is not None:
            self._req.Wait()
            self._req = None
            if self._recv[0]:
                return True
        self._send[0] = 1 if self.received is not None else 0
        self._req = self.comm.Iallreduce(self._send, self._recv, op=MPI.MAX)
        return False

    def close(self) -> None:
        if self._req is not None:
            self._req.Wait()
            self._req = None
