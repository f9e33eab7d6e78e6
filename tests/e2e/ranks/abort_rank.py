"""A tiny rank for the abort-message test: rank 1 fails inside ``abort_on_error`` while rank 0 waits in a
collective, as a training rank does, without the seconds of a training start-up.

    mpirun -np 2 python tests/e2e/ranks/abort_rank.py TAG
"""

import sys

if __name__ == "__main__":
    from hpcgraft.supervise import should_supervise, supervise

    if should_supervise():  # as the training command runs under a launcher
        sys.exit(supervise([sys.executable, __file__, *sys.argv[1:]]))

    from hpcgraft.comm import mpi
    from hpcgraft.comm.failure import abort_on_error

    def fail(depth: int) -> None:
        """As deep as a training step's traceback: many lines, each one a write of an unpatched abort."""
        if depth == 0:
            raise RuntimeError(f"injected cause {sys.argv[1]}")
        fail(depth - 1)

    comm = mpi().COMM_WORLD
    with abort_on_error(comm):
        if comm.Get_rank() == 1:
            fail(40)
        comm.Barrier()
