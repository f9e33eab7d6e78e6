"""The package's architecture, checked: no import cycles, each layer importing only the layers below it,
no MPI started by importing anything or by running the offline commands, and the unit tests in the folders
of the layers they test."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests._util import ROOT, env

PACKAGE = ROOT / "hpcgraft"

# Layers, lowest first: a module may import its own package and the layers of lower rank only.
RANK = {
    "errors": 0, "text": 0,
    "supervise": 1,  # before MPI and torch: the standard library and the exit statuses only
    "config": 1, "models": 1,
    "slurm": 2,  # the sbatch scripts (package data) and their shape check; the submit command uses the check
    "method": 2, "storage": 2,
    "comm": 3, "data": 3,
    "reporting": 3,  # what the report command reads, tabulates and plots; sweep prints its table too
    "training": 4,
    "launch": 5,  # runs as jobs: a submitit job runs a training rank; a sweep's arms and seeds
    "cli": 6,  # the commands
    # The older module paths (python -m hpcgraft.train, from hpcgraft import report) and python -m hpcgraft:
    # they forward to cli.
    **dict.fromkeys(("train", "evaluate", "prune", "analyze", "graft", "checkpoint", "report", "sweep", "__main__"),
                    7),
}
# Pairs that the ranks alone would allow but the layering forbids: the math never reaches MPI or storage, and
# the MPI layer never reads configuration, data or storage, so each can be used and tested alone.
FORBIDDEN = {
    "method": {"comm", "storage"},
    "comm": {"config", "data", "storage"},
}
# Imports between commands: `sweep` takes `submit`'s job options.
ALLOWED = {("sweep", "submit")}
OFFLINE_COMMANDS = ("graft", "analyze", "report", "checkpoint", "evaluate", "prune")  # prune: without fine-tuning


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports_of(name: str, path: Path, typing: bool = False) -> set[str]:
    """hpcgraft modules imported anywhere in the file (functions too), except for type checking unless
    ``typing``."""
    tree = ast.parse(path.read_text())
    typing_only = set()
    for node in ast.walk(tree):
        if not typing and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(n) for n in ast.walk(node))
    found = set()
    known = modules()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("hpcgraft"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if base.startswith("hpcgraft"):  # `from package import module` imports the module
                subs = {f"{base}.{a.name}" for a in node.names} & set(known)
                found.update(subs or {base})
    return {m for m in found if m in known and m != name}


def layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "hpcgraft"


def test_every_module_has_a_layer():
    assert {layer(m) for m in modules()} - {"hpcgraft"} <= set(RANK), set(map(layer, modules())) - set(RANK)


@pytest.mark.parametrize("typing", [False, True], ids=["run-time", "type-checking-too"])
def test_no_import_cycles(typing):
    """Not even through imports for type checking: two modules that know each other have one job between
    them, or a missing third."""
    graph = {name: imports_of(name, path, typing) for name, path in modules().items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_each_layer_imports_only_the_layers_below_it():
    bad = []
    for name, path in modules().items():
        mine = layer(name)
        if mine == "hpcgraft":
            continue
        for target in imports_of(name, path):
            theirs = layer(target)
            if mine == theirs == "cli" and "hpcgraft.cli" not in (name, target):  # the dispatcher is shared
                if (name.split(".")[-1], target.split(".")[-1]) not in ALLOWED:
                    bad.append(f"{name} imports {target} (one command imports another)")
                continue
            if theirs in ("hpcgraft", mine):
                continue
            if theirs in FORBIDDEN.get(mine, ()) or RANK[theirs] >= RANK[mine]:
                bad.append(f"{name} imports {target} ({mine}, rank {RANK[mine]} -> {theirs}, rank {RANK[theirs]})")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", ["supervise", "errors"])
def test_the_supervisor_imports_the_standard_library_only(module):
    """The supervisor starts before every rank, and holds the stop signals meanwhile: nothing heavy."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    ours = {"hpcgraft.errors"} if module == "supervise" else set()
    assert {n for n in names if n.split(".")[0] not in sys.stdlib_module_names} <= ours | {"__future__"}, names


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), cwd=ROOT,
                          timeout=300)


@pytest.mark.process  # a fresh interpreter
def test_importing_any_module_starts_no_mpi():
    r = _python("import importlib, sys\n"
                f"for name in {sorted(modules())!r}:\n"
                "    importlib.import_module(name)\n"
                "assert 'mpi4py.MPI' not in sys.modules, 'mpi4py.MPI imported'\n"
                "print('ok')")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.process  # a fresh interpreter
def test_offline_commands_start_no_mpi(tmp_path):
    """graft, analyze, report, evaluate and checkpoint inspect/export on a checkpoint written by a real run
    (tests/data/run-before-relayout): they work, and mpi4py.MPI is never imported in their process."""
    run = ROOT / "tests" / "data" / "run-before-relayout"
    out = tmp_path
    code = f"""
import contextlib, io, sys
import torch
from hpcgraft.cli import analyze, checkpoint, evaluate, graft, prune, report
with contextlib.redirect_stdout(io.StringIO()):
    assert checkpoint.main(["inspect", {str(run)!r}]) == 0
    assert checkpoint.main(["export", {str(run)!r}, "--peer", "0", "--out", {str(out / "p0.pt")!r}]) == 0
    assert analyze.main([{str(run)!r}]) == 0
    assert graft.main([{str(out / "p0.pt")!r}, {str(run / "checkpoints/step-000000022/peer-000.h5")!r},
                       "--out", {str(out / "g.pt")!r}]) == 0
    assert report.main([{str(run)!r}, "--out", {str(out / "report")!r}]) == 0
    assert prune.main([{str(run)!r}, "--criterion", "l1", "--keep", "0.5", "--out", {str(out / "pruned")!r}]) == 0
    assert evaluate.main([{str(run)!r}]) == 0
assert "mpi4py.MPI" not in sys.modules, "an offline command imported mpi4py.MPI"
print("ok")
"""
    r = _python(code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


# What a command module may define: its parser and the entry points that hand the parsed request down.
COMMAND_FUNCTIONS = {"main", "parse_args", "_parser", "criteria_main", "add_job_options", "job_options",
                     "_check_args", "print_config", "_node_count"}
# The layers' own libraries: a command that imports one does work a layer below should do.
WORK_LIBRARIES = {"torch", "numpy", "h5py", "submitit", "matplotlib", "mpi4py", "yaml"}


@pytest.mark.parametrize("command", sorted(p.stem for p in (PACKAGE / "cli").glob("*.py") if p.stem != "__init__"))
def test_a_command_module_only_parses(command):
    """No class, no function beyond its parser and entry points, no tensor, file-format or scheduler library:
    the work lives in training/, storage/, reporting/ or launch/, where other callers reach it too."""
    tree = ast.parse((PACKAGE / "cli" / f"{command}.py").read_text())
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    assert not {n.name for n in tree.body if isinstance(n, ast.ClassDef)}, defined
    assert defined <= COMMAND_FUNCTIONS, defined - COMMAND_FUNCTIONS
    libraries = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    libraries |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not libraries & WORK_LIBRARIES, libraries & WORK_LIBRARIES


def _mirror() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mirror_tests", ROOT / "tools" / "mirror_tests.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_unit_tests_mirror_the_package():
    """tests/unit/<layer>/test_x.py imports hpcgraft/<layer>/ (the layer it exercises); only the tests of a
    top-level module or of the package as a whole sit in tests/unit/ itself (tools/mirror_tests.py ROOT)."""
    mirror = _mirror()
    unit = ROOT / "tests" / "unit"
    bad = [f"{name}: run tools/mirror_tests.py (add it to MAPPING or ROOT)" for name in mirror.unplaced()]
    for path in sorted(unit.rglob("*.py")):
        folder = path.parent.relative_to(unit).as_posix()
        if folder == ".":
            continue
        if folder not in mirror.layers():
            bad.append(f"{path.relative_to(ROOT)}: {folder} is not a folder of hpcgraft/")
        elif path.name.startswith("test_") and not mirror.imported_layers(path)[folder]:
            bad.append(f"{path.relative_to(ROOT)} imports nothing of hpcgraft/{folder}/")
        elif not (path.parent / "__init__.py").exists():
            bad.append(f"{path.parent.relative_to(ROOT)} has no __init__.py")
    assert not bad, "\n".join(bad)
