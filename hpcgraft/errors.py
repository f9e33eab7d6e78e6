"""The errors a user can fix, and the exit statuses every command shares.

Kept free of heavy imports (no torch, no MPI), so that any layer, the submitting process of a launcher
and the offline commands can name an error or a status without starting anything.

A :class:`UserError` is bad input: a config key, missing data, a rank count, a damaged file. It is
reported as one line that names the problem and the fix, never as a traceback.
"""

from __future__ import annotations

import sys

EXIT_OK = 0
EXIT_FAILURE = 1  # an exception on a rank, graft.on_nonfinite=stop, the watchdog
EXIT_USAGE = 2  # bad input: one line says what and how to fix it
EXIT_REQUEUE = 75  # EX_TEMPFAIL: a checkpoint was written on SIGUSR1/SIGTERM; requeue the job to continue
EXIT_NO_START = 69  # EX_UNAVAILABLE: MPI did not start on every rank in time (the launcher's wire-up); nothing ran


class UserError(Exception):
    """Bad input, reported as one line (the message) instead of a traceback."""


class ConfigError(UserError, ValueError):
    """A configuration problem: names the offending key and what is allowed."""


class DataError(UserError, ValueError):
    """A data set that is missing or not in the expected format."""


class LayoutError(UserError, ValueError):
    """A rank count that does not fit the requested peers x replicas layout."""


class PeerMismatchError(UserError, ValueError):
    """Ranks started with different configurations or models."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be written, found or read."""


class InputError(UserError, ValueError):
    """A file an offline command (graft, analyze, report) cannot use."""


class LaunchError(UserError, RuntimeError):
    """A submission that cannot work (SLURM unreachable, a request no partition can run)."""


class AgreedError(Exception):
    """An error every rank has already agreed on: each rank exits cleanly, without an abort."""


class SetupError(AgreedError):
    """A user error found while setting up, agreed on by every rank: one line, exit status 2."""


class RunError(AgreedError):
    """A failure every rank found at the same point of training (NaN weights with graft.on_nonfinite=stop):
    one line, exit status 1, and no abort, since no rank is left waiting."""


class NonFiniteWeightsError(RuntimeError):
    """A peer's weights hold NaN or Inf and the run is configured to stop on it."""


class ReplicaMismatchError(RuntimeError):
    """Replicas of one peer hold different weights (a bug; only checked with HPCGRAFT_CHECK_REPLICAS=1)."""


def report(prog: str, error: BaseException | str, status: int = EXIT_USAGE) -> int:
    """Print the one error line of a command on stderr and return the exit status to end with.

    Every command goes through here, so that scripts and schedulers can rely on one shape of line.
    """
    print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
    return status


class NoBatchNormError(UserError, ValueError):
    """A BatchNorm-based mask (the bn criterion, the early-bird monitors) asked of a model without BatchNorm2d."""
