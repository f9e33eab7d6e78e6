"""One rank's run as a process runs it: the stop signals caught, an exception aborting every rank, and the
exit status (:mod:`hpcgraft.errors`) that the launchers act on. The train command and a submitit task both
end here, so a rank started by mpirun, srun or submitit behaves the same."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hpcgraft.comm import mpi
from hpcgraft.comm.failure import abort_on_error, catch_stop_signals
from hpcgraft.errors import EXIT_FAILURE, EXIT_USAGE, AgreedError, SetupError, report
from hpcgraft.training.loop import run
from hpcgraft.training.rundir import noting_interruption, release_run_dir

PROG = "hpcgraft"


def default_run_dir(config: str | None) -> Path:
    """``runs/<config name>``: where a run goes when ``--out`` is not given."""
    return Path(f"runs/{Path(config).stem if config else 'digits'}")


def train_rank(config: str | None, overrides: Sequence[str], out: str | Path | None = None, *,
               restart: bool = False, extend: bool = False, from_step: int | None = None) -> int:
    """Train (or resume) the run in ``out`` as this rank of ``COMM_WORLD``; returns the exit status. Bad
    input is one line on rank 0 and status 2 on every rank, decided before any training."""
    catch_stop_signals()
    if restart and (extend or from_step is not None):
        return report(PROG, "--restart starts over; it cannot be combined with --extend or --from-step")
    run_dir = Path(out) if out else default_run_dir(config)
    world_comm = mpi().COMM_WORLD
    try:
        with abort_on_error(world_comm), noting_interruption():
            return run(config, list(overrides), run_dir, restart, world_comm, extend=extend, from_step=from_step)
    except AgreedError as exc:
        status = EXIT_USAGE if isinstance(exc, SetupError) else EXIT_FAILURE
        return report(PROG, exc, status) if world_comm.Get_rank() == 0 else status
    finally:
        release_run_dir()
