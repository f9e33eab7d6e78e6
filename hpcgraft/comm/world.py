"""The MPI world of a run, its peer/replica layout, and agreement between ranks.

Layout: K peers (``graft.peers``; default one per rank group) over G = ranks / R groups of R replica ranks
each; group g owns world ranks g*R .. g*R+R-1 (replica = rank % R) and hosts the P = K / G peers
g*P .. g*P+P-1, a contiguous block, so that ring neighbours are on the same rank except at block edges.
``graft_comm`` joins the ranks of one replica index across groups (its rank is the group index: the ring
lives there); ``peer_comm`` joins the replicas of one group (data parallelism lives there).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from hpcgraft.comm import mpi
from hpcgraft.errors import LayoutError, PeerMismatchError, SetupError, UserError
from hpcgraft.text import plural

if TYPE_CHECKING:
    from mpi4py import MPI

T = TypeVar("T")


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
    per_rank: int = 1  # P: the peers this rank (its replica group) hosts, peer .. peer+P-1

    @property
    def local_peers(self) -> range:
        """The global indices of the peers this rank hosts (``peer`` is the first)."""
        return range(self.peer, self.peer + self.per_rank)

    @property
    def group(self) -> int:
        """This rank's replica group, the unit of the ring between ranks (rank of ``graft_comm``)."""
        return self.peer // self.per_rank

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def is_peer_lead(self) -> bool:
        """Replica 0 of its peer: the rank that reports and writes for the peer."""
        return self.replica == 0


def start_ranks(count: str) -> str:
    """How to start ``count`` ranks, for the error lines that ask for another rank count: under SLURM the
    count is the job's task count, which mpirun advice would not change."""
    if "SLURM_STEP_ID" in os.environ:  # a task started by srun
        return (f"{count} SLURM tasks: sbatch --ntasks-per-node (with --nodes), or for slurm/graft_*.sh "
                "HPCGRAFT_TASKS_PER_NODE (CPU ranks) / HPCGRAFT_GPUS_PER_NODE (a rank per GPU)")
    return f"mpirun -np {count}"


def peers_per_group(peers: int | None, size: int, replicas: int) -> int:
    """P, the peers each group of ``replicas`` ranks hosts when ``size`` ranks train ``peers`` (None: one per
    group); a layout that does not fit is one line naming the rank counts that do."""
    if size % replicas:
        raise LayoutError(
            f"{plural(size, 'rank')} cannot form peers of dist.replicas={replicas} ranks each; start a multiple of "
            f"{replicas} ranks ({start_ranks(str(replicas * max(2, size // replicas)))}) or change dist.replicas"
        )
    groups = size // replicas
    if peers is None:
        return 1
    if peers < 1 or peers % groups:
        fits = [str(g * replicas) for g in range(1, max(peers, 1) + 1) if peers >= 1 and peers % g == 0]
        where = plural(groups, "rank group" if replicas > 1 else "rank")
        where += f" of dist.replicas={replicas}" if replicas > 1 else ""
        raise LayoutError(
            f"graft.peers={peers} cannot be spread evenly over {where}; rank counts that fit: "
            f"{', '.join(fits) or 'none'} ({start_ranks(fits[-1] if fits else 'N')}), or change graft.peers"
        )
    return peers // groups


def init_world(replicas: int = 1, comm: MPI.Comm | None = None, peers: int | None = None) -> World:
    """Form the peers x replicas layout over ``comm`` (default: the MPI world); ``peers``: K (``graft.peers``),
    None for one peer per group of ``replicas`` ranks."""
    MPI = mpi()
    comm = comm or MPI.COMM_WORLD
    size, rank = comm.Get_size(), comm.Get_rank()
    per_rank = peers_per_group(peers, size, replicas)
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = local.Get_rank(), local.Get_size()
    local.Free()
    group, replica = divmod(rank, replicas)
    return World(
        comm=comm, rank=rank, size=size, local_rank=local_rank, local_size=local_size,
        peer=group * per_rank, peers=size // replicas * per_rank, replica=replica, replicas=replicas,
        graft_comm=comm.Split(color=replica, key=group), peer_comm=comm.Split(color=group, key=replica),
        per_rank=per_rank,
    )


def log(message: str, *, world: World | None = None, all_ranks: bool = False) -> None:
    """Print from rank 0 (or from every rank, prefixed) with an immediate flush."""
    if world is not None and not all_ranks and not world.is_root:
        return
    prefix = f"[rank {world.rank}] " if world is not None and all_ranks else ""
    print(f"{prefix}{message}", file=sys.stderr, flush=True)


#: What a setup step may raise for :func:`agreed` to turn into one line on every rank.
AGREED_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError)


def agreed(comm: MPI.Comm, fn: Callable[[], T], *, root_only: bool = False) -> T:
    """Run a setup step on every rank (``root_only``: on rank 0, for the job as a whole); if it fails on
    any, all ranks raise the same SetupError.

    Setup errors (a bad key, missing data on one node) must end the job with one clear line, not an
    abort on one rank and a hang on the others.
    """
    try:
        result, error = (None if root_only and comm.Get_rank() != 0 else fn()), None
    except AGREED_ERRORS as exc:
        result, error = None, str(exc)
    errors = comm.allgather(error)
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        messages = {e for _, e in failed}
        if len(messages) == 1 and (root_only or len(failed) == len(errors)):
            raise SetupError(failed[0][1])
        raise SetupError(f"rank {failed[0][0]}: {failed[0][1]}")
    return result  # type: ignore[return-value]


def check_peers_agree(comm: MPI.Comm, flat_config: dict[str, Any], model_signature: list) -> None:
    """Every rank compares its resolved config and model layout with rank 0's.

    Raises on every rank (so all of them stop) with a message naming the first differing rank and key.
    """
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


def gather_peers(world: World, objs: list[T]) -> list[T] | None:
    """One object per peer (``objs``: this rank's, one per hosted peer), in peer order, on rank 0 (None
    elsewhere). Only each group's replica 0 sends: the replicas of a peer hold the same state."""
    if not world.is_peer_lead:
        return None
    blocks = world.graft_comm.gather(objs, root=0)
    return None if blocks is None else [obj for block in blocks for obj in block]
