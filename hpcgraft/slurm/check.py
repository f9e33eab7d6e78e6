"""Is a job shape runnable on this SLURM cluster? Asked before submitting, by ``hpcgraft.launch`` and by the
sbatch scripts (``python -m hpcgraft.slurm.check``), so that a request no node can satisfy fails in seconds
with the line that fixes it, instead of being rejected (``Invalid generic resource``) or pending forever
(``PartitionConfig``).

Kept free of heavy imports: the scripts run it on a login node before every submission.

    python -m hpcgraft.slurm.check --nodes N|MIN-MAX --gpus-per-node G --tasks-per-node T --cpus-per-task C
        [--partition P] [--command "bash slurm/graft_cifar.sh" -- ARGS...]

exits 0 when the shape fits, 2 with one line on stderr when it cannot start, naming the variables
(``HPCGRAFT_NODES=1 ...``) and, with ``--command``, the whole corrected command line.

    python -m hpcgraft.slurm.check --layout --ranks R --first-ranks F [--config C] -- ARGS...

inside a job, before each training step: the ranks the step starts and the peers they host, printed as
``RANKS|4 peers, 2 per rank``, or one line and exit 2 where the config's peers do not fit what SLURM gave.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Collection

from hpcgraft.config import Config, load_config
from hpcgraft.errors import EXIT_USAGE, ConfigError, LaunchError, LayoutError, report
from hpcgraft.text import plural


@dataclasses.dataclass
class Partition:
    name: str
    nodes: int
    cpus: int  # per node, the largest node
    gpus: int  # per node, the largest node
    default: bool


@dataclasses.dataclass(frozen=True)
class Shape:
    """A job's shape: ``nodes`` x ranks per node, a rank per GPU, or ``tasks_per_node`` CPU ranks without GPUs."""

    nodes: int
    gpus_per_node: int
    tasks_per_node: int  # CPU ranks per node; only used when gpus_per_node is 0
    cpus_per_task: int
    partition: str | None = None

    @property
    def ranks_per_node(self) -> int:
        return self.gpus_per_node if self.gpus_per_node > 0 else self.tasks_per_node


# How a fix is spelled: as hpcgraft.launch's options, or as the scripts' HPCGRAFT_<NAME> variables.
LAUNCH_OPTIONS = {"nodes": "--nodes {}", "gpus_per_node": "--gpus-per-node {}",
                  "tasks_per_node": "--tasks-per-node {}", "cpus_per_task": "--cpus-per-task {}",
                  "partition": "--partition {}"}
SCRIPT_VARIABLES = {"nodes": "HPCGRAFT_NODES={}", "gpus_per_node": "HPCGRAFT_GPUS_PER_NODE={}",
                    "tasks_per_node": "HPCGRAFT_TASKS_PER_NODE={}", "cpus_per_task": "HPCGRAFT_CPUS_PER_TASK={}",
                    "partition": "HPCGRAFT_PARTITION={}"}


def _run(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise LaunchError(f"'{' '.join(cmd)}' did not answer within 60 s; is slurmctld up?") from None
    if r.returncode:
        detail = (r.stderr or r.stdout).strip().splitlines()
        why = detail[-1] if detail else f"exit status {r.returncode}"
        raise LaunchError(f"SLURM is not reachable: '{' '.join(cmd)}' failed ({why}); "
                          "check that slurmctld is up and SLURM_CONF points at its slurm.conf "
                          "(a local test cluster: tools/slurm_local.sh start)")
    return r.stdout


def slurm_partitions() -> dict[str, Partition]:
    """The partitions SLURM reports, with their node count and the CPUs and GPUs of their largest node."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        raise LaunchError("SLURM is not available here (no sbatch/sinfo on PATH); run on a login node, "
                          "use --executor local, or start a local test cluster with tools/slurm_local.sh start")
    parts: dict[str, Partition] = {}
    seen: set[tuple[str, str]] = set()
    for line in _run(["sinfo", "-h", "-N", "-o", "%P|%N|%c|%G"]).splitlines():
        name, node, cpus, gres = line.strip().split("|")
        default = name.endswith("*")
        name = name.rstrip("*")
        p = parts.setdefault(name, Partition(name, 0, 0, 0, default))
        if (name, node) in seen:
            continue
        seen.add((name, node))
        gpus = sum(int(n) for n in re.findall(r"gpu(?::[^:,()]+)?:(\d+)", gres))
        p.nodes, p.cpus, p.gpus = p.nodes + 1, max(p.cpus, int(cpus.rstrip("+"))), max(p.gpus, gpus)
    return parts


def _partition(parts: dict[str, Partition], name: str | None, spell: dict[str, str]) -> Partition:
    if not parts:
        raise LaunchError("SLURM reports no partitions (sinfo is empty); ask the administrators or check SLURM_CONF")
    if name is None:
        defaults = [p for p in parts.values() if p.default]
        if not defaults:
            raise LaunchError(f"this cluster has no default partition; set {spell['partition'].format('NAME')} "
                              f"(one of {', '.join(parts)})")
        return defaults[0]
    if name not in parts:
        raise LaunchError(f"partition '{name}' does not exist; sinfo lists: {', '.join(sorted(parts))}")
    return parts[name]


def fit(shape: Shape, part: Partition) -> tuple[list[str], Shape]:
    """Why ``shape`` can never start on ``part`` (empty: it can), and the nearest shape that can."""
    problems: list[str] = []
    fixed = shape
    if shape.nodes > part.nodes:
        problems.append(f"{{nodes}}: partition '{part.name}' has {plural(part.nodes, 'node')}")
        fixed = dataclasses.replace(fixed, nodes=part.nodes)
    if shape.gpus_per_node > part.gpus:
        problems.append(f"{{gpus_per_node}}: the nodes of partition '{part.name}' have at most "
                        f"{plural(part.gpus, 'GPU')}")
        fixed = dataclasses.replace(fixed, gpus_per_node=part.gpus)
    ranks = fixed.ranks_per_node
    if ranks * shape.cpus_per_task > part.cpus:
        problems.append(f"{{cpus_per_task}} for {plural(ranks, 'rank')} per node: the nodes of partition "
                        f"'{part.name}' have at most {plural(part.cpus, 'CPU')}")
        cpus = part.cpus // ranks
        fixed = dataclasses.replace(fixed, cpus_per_task=max(cpus, 1))
        if cpus < 1 and fixed.gpus_per_node == 0:
            fixed = dataclasses.replace(fixed, tasks_per_node=part.cpus)
    return problems, fixed


def refusal(shape: Shape, part: Partition, spell: dict[str, str] = LAUNCH_OPTIONS,
            command: list[str] | None = None, given: Collection[str] = ()) -> str | None:
    """The one line that says why ``shape`` can never start on ``part`` and what would, or None if it can.

    ``spell`` names the knobs in the fix (:data:`LAUNCH_OPTIONS` or :data:`SCRIPT_VARIABLES`); with
    ``command`` the fix is that command line behind the corrected variables and those in ``given`` (the
    ones the user set), so that it can be run as printed.
    """
    problems, fixed = fit(shape, part)
    if not problems:
        return None
    asked = {k: spell[k].format(getattr(shape, k)) for k in ("nodes", "gpus_per_node", "cpus_per_task")}
    cpu_instead = fixed.gpus_per_node == 0 < shape.gpus_per_node
    changed = {k for k in ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task")
               if getattr(fixed, k) != getattr(shape, k) or (k == "tasks_per_node" and cpu_instead)}
    said = [k for k in spell if k in changed or (command and k in given)]  # in the order of spell
    changes = " ".join(spell[k].format(getattr(fixed, k)) for k in said if getattr(fixed, k) is not None)
    if command:
        fix = f"run: {changes} {shlex.join(command)}"
    else:
        fix = f"ask for {changes}" + (" (CPU ranks)" if cpu_instead else "")
    return "; ".join(p.format(**asked) for p in problems) + f"; this can never start; {fix}"


def check_slurm_request(partition: str | None, nodes: int, gpus_per_node: int, tasks_per_node: int,
                        cpus_per_task: int, spell: dict[str, str] = LAUNCH_OPTIONS,
                        command: list[str] | None = None, given: Collection[str] = ()) -> Partition:
    """Fail now, with the reason and the fix (:func:`refusal`), instead of a job pending forever or rejected."""
    part = _partition(slurm_partitions(), partition, spell)
    why = refusal(Shape(nodes, gpus_per_node, tasks_per_node, cpus_per_task, partition), part, spell, command, given)
    if why:
        raise LaunchError(why)
    return part


def parse_nodes(text: str) -> tuple[int, int]:
    """SLURM's ``--nodes``: ``N``, or ``MIN-MAX`` for a job that may start (or go on) with fewer nodes."""
    lo, sep, hi = text.partition("-")
    try:
        low, high = int(lo), int(hi if sep else lo)
    except ValueError:
        low = high = 0
    if not 1 <= low <= high:
        raise LaunchError(f"nodes {text!r} is not a node count: N or MIN-MAX (e.g. 2, or 2-4), at least 1")
    return low, high


def fits(peers: int, replicas: int, ranks: int) -> bool:
    """Whether ``peers`` peers of ``replicas`` ranks each can spread evenly over ``ranks`` ranks."""
    return ranks % replicas == 0 and peers % (ranks // replicas) == 0


def fitting_ranks(peers: int, replicas: int) -> list[int]:
    """The rank counts that ``peers`` peers fit: every divisor of the peers, times the replicas."""
    return [d * replicas for d in range(1, peers + 1) if peers % d == 0]


def job_layout(peers: int | None, replicas: int, ranks: int, first_ranks: int) -> tuple[int, str]:
    """The ranks a job step starts on the ``ranks`` tasks SLURM gave, and the peers they host.

    With ``graft.peers`` the peers are fixed and each rank hosts its share; they must divide evenly.
    Without it every rank is a peer (of ``replicas`` ranks), so a step on fewer nodes than the first one
    starts as many ranks as the first (``first_ranks``), packed onto the nodes left, to continue its run.
    """
    if peers is None:
        count = first_ranks // max(replicas, 1)
        return first_ranks, f"{plural(count, 'peer')}, 1 per rank" + (f" of {replicas}" if replicas > 1 else "")
    if not fits(peers, replicas, ranks):
        of = f" of dist.replicas={replicas}" if replicas > 1 else ""
        raise LayoutError(f"graft.peers={peers}{of} does not fit the {plural(ranks, 'rank')} SLURM gave; rank counts "
                          f"that fit: {', '.join(map(str, fitting_ranks(peers, replicas)))}; resubmit with a node "
                          "count that gives one of them, the run resumes")
    return ranks, f"{plural(peers, 'peer')}, {peers // (ranks // replicas)} per rank"


def check_node_range(cfg: Config, nodes: tuple[int, int], ranks_per_node: int, spell: dict[str, str]) -> None:
    """A job of MIN-MAX nodes may run on any node count in between: the peers must fit every one of them."""
    peers, replicas = cfg.graft.peers, cfg.dist.replicas
    if peers is None:
        return
    bad = [n for n in range(nodes[0], nodes[1] + 1) if not fits(peers, replicas, n * ranks_per_node)]
    if bad:
        good = [n for n in range(1, nodes[1] + 1) if fits(peers, replicas, n * ranks_per_node)]
        said = spell["nodes"].format("-".join(map(str, nodes)) if nodes[0] < nodes[1] else nodes[0])
        raise LaunchError(f"{said}: graft.peers={peers} does not fit {', '.join(map(str, bad))} nodes x "
                          f"{plural(ranks_per_node, 'rank')} per node; node counts that fit: "
                          f"{', '.join(map(str, good)) or 'none up to ' + str(nodes[1])}")


def layout_main(a: argparse.Namespace) -> int:
    """``--layout``: inside a job, the step's ranks and peers, or one line and exit 2."""
    try:
        cfg = load_config(a.config, [x for x in a.args if "=" in x])
        ranks, what = job_layout(cfg.graft.peers, cfg.dist.replicas, a.ranks, a.first_ranks or a.ranks)
    except (LayoutError, ConfigError) as exc:
        return report(a.prog, exc, EXIT_USAGE)
    print(f"{ranks}|{what}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The scripts' check before sbatch: exit 0 if the config and the shape can run, else one line and exit 2."""
    p = argparse.ArgumentParser(prog="python -m hpcgraft.slurm.check", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", default="1", help="N, or MIN-MAX")
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--tasks-per-node", type=int, default=1, help="CPU ranks per node when --gpus-per-node is 0")
    p.add_argument("--cpus-per-task", type=int, default=1)
    p.add_argument("--partition", default="", help="empty: the cluster's default")
    p.add_argument("--config", help="the run's config, checked with the overrides among the arguments")
    p.add_argument("--prog", default="hpcgraft.slurm.check", help="the name the error line starts with")
    p.add_argument("--command", help="the submitting command, shown with the fixed variables")
    p.add_argument("--layout", action="store_true", help="inside a job: the ranks and peers of its next step")
    p.add_argument("--ranks", type=int, default=0, help="--layout: the tasks SLURM gave the step")
    p.add_argument("--first-ranks", type=int, default=0, help="--layout: the ranks of the job's first step")
    p.add_argument("args", nargs="*", help="the command's arguments: config overrides")
    a = p.parse_args(argv)
    if a.layout:
        return layout_main(a)
    given = [k for k, var in SCRIPT_VARIABLES.items() if var.split("=")[0] in os.environ]
    try:
        cfg = load_config(a.config, [x for x in a.args if "=" in x])
        nodes = parse_nodes(a.nodes)
        check_node_range(cfg, nodes, Shape(1, a.gpus_per_node, a.tasks_per_node, 1).ranks_per_node, SCRIPT_VARIABLES)
        check_slurm_request(a.partition or None, nodes[1], a.gpus_per_node, a.tasks_per_node, a.cpus_per_task,
                            SCRIPT_VARIABLES, [*shlex.split(a.command), *a.args] if a.command else None, given)
    except (LaunchError, ConfigError) as exc:
        return report(a.prog, exc, EXIT_USAGE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
