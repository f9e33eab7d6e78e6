"""Place the unit tests in folders that mirror the package: tests/unit/<layer>/test_*.py, where <layer> is the
package folder of the module a test file exercises (hpcgraft/<layer>/); tests of a top-level module (config)
or of the package as a whole (layout, docs, install) stay in tests/unit/.

    python tools/mirror_tests.py            # git mv every file of MAPPING still at its old path, then fix the
                                            # paths that name it (docs, tools, tests) and its imports
    python tools/mirror_tests.py --check    # only list what would move and the unplaced files

A test file that sits in tests/unit/ and is neither in MAPPING nor in ROOT is listed with the layers it
imports; add it to MAPPING (or ROOT) and run the script again. tests/unit/test_layout.py checks the result:
every file in a layer folder imports that layer, and the root holds only the files of ROOT.
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UNIT = "tests/unit"

# Old file name in tests/unit/ -> its layer folder (the package folder of the module it exercises).
MAPPING = {
    "test_analyze.py": "cli",
    "test_authors_data.py": "data",
    "test_authors_reference.py": "method",
    "test_checkpoint.py": "storage",
    "test_checkpoint_space.py": "storage",
    "test_compile.py": "training",
    "test_cifar_data.py": "data",
    "test_cli.py": "cli",
    "test_data.py": "data",
    "test_device.py": "training",
    "test_dgconv.py": "models",
    "test_earlybird.py": "method",
    "test_follow.py": "storage",
    "test_grafting.py": "method",
    "test_imagenet_data.py": "data",
    "test_lean.py": "method",
    "test_loader.py": "data",
    "test_lock.py": "storage",
    "test_method_math.py": "method",
    "test_models.py": "models",
    "test_output_paths.py": "storage",
    "test_peer_streams.py": "training",
    "test_peers.py": "training",
    "test_peerset.py": "comm",
    "test_precise_bn.py": "training",
    "test_progress.py": "training",
    "test_pruning.py": "method",
    "test_redundancy.py": "method",
    "test_report_plots.py": "reporting",
    "test_run_reader.py": "storage",
    "test_rundir.py": "training",
    "test_setup_errors.py": "cli",
    "test_slurm_check.py": "slurm",
    "test_statefile_refusal.py": "storage",
    "test_sweep_table.py": "reporting",
    "test_tbevents.py": "storage",
}
# Files that stay in tests/unit/: a top-level module (config, its YAML and --print-config), the package as a
# whole (layout, docs, install), the tools, the suite's own machinery (conftest.py: the
# fast tier's rule, the runs made ahead).
ROOT = {"conftest.py", "__init__.py", "test_config.py", "test_docs.py", "test_fast_tier.py", "test_install.py",
        "test_layout.py", "test_print_config.py", "test_runs_ahead.py", "test_study_prune.py", "test_yaml_aliases.py"}
# The package's old top-level module paths that forward to a command (hpcgraft.train -> hpcgraft.cli.train).
FORWARDERS = {"train", "evaluate", "prune", "analyze", "graft", "checkpoint", "report", "sweep", "launch"}
TEXT = (".py", ".md", ".sh", ".toml", ".yaml", ".txt", "Makefile", "run")  # files whose paths are rewritten


def layers() -> set[str]:
    """The package's folders: hpcgraft/<layer>/__init__.py."""
    return {p.parent.name for p in (REPO / "hpcgraft").glob("*/__init__.py")}


def imported_layers(path: Path) -> Counter:
    """How many imports of each layer the file makes (a forwarder counts for cli; a top-level module for '')."""
    found: Counter = Counter()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" if node.module == "hpcgraft" else node.module for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] != "hpcgraft" or len(parts) < 2:
                continue
            top = parts[1]
            found["cli" if top in FORWARDERS else top if top in layers() else ""] += 1
    return found


def unplaced() -> list[str]:
    return sorted(p.name for p in (REPO / UNIT).glob("*.py") if p.name not in ROOT and p.name not in MAPPING)


def tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=REPO, check=True).stdout
    return [REPO / f for f in out.splitlines() if f.endswith(TEXT) and not f.startswith("tests/data/")]


def rewrite(moves: dict[str, str]) -> list[str]:
    """Every tracked text file: old paths (tests/unit/test_x.py) and modules (tests.unit.test_x) -> new."""
    pairs = []
    for old, new in moves.items():
        pairs.append((re.compile(rf"\b{re.escape(old)}\b"), new))
        mod_old, mod_new = old.removesuffix(".py").replace("/", "."), new.removesuffix(".py").replace("/", ".")
        pairs.append((re.compile(rf"\b{re.escape(mod_old)}\b"), mod_new))
    changed = []
    for path in tracked_text_files():
        if not path.is_file():
            continue
        text = path.read_text()
        new_text = text
        for pattern, repl in pairs:
            new_text = pattern.sub(repl, new_text)
        if new_text != text:
            path.write_text(new_text)
            changed.append(str(path.relative_to(REPO)))
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="list what would move and the unplaced files")
    check = parser.parse_args(argv).check
    moves = {f"{UNIT}/{name}": f"{UNIT}/{layer}/{name}" for name, layer in MAPPING.items()
             if (REPO / UNIT / name).exists()}
    bad = sorted(set(MAPPING.values()) - layers())
    if bad:
        print(f"mirror_tests: MAPPING names folders that are not layers of hpcgraft: {', '.join(bad)}", file=sys.stderr)
        return 2
    for old, new in moves.items():
        print(f"{old} -> {new}")
    if not check and moves:
        for folder in sorted({Path(new).parent for new in moves.values()}):
            (REPO / folder).mkdir(exist_ok=True)
            init = REPO / folder / "__init__.py"
            if not init.exists():
                init.write_text("")
                subprocess.run(["git", "add", str(init)], cwd=REPO, check=True)
        for old, new in moves.items():
            subprocess.run(["git", "mv", old, new], cwd=REPO, check=True)
    if not check:  # every mapped path, also in files merged after an earlier run moved the test they name
        for path in rewrite({f"{UNIT}/{name}": f"{UNIT}/{layer}/{name}" for name, layer in MAPPING.items()}):
            print(f"  paths fixed in {path}")
    left = unplaced()
    for name in left:
        counts = imported_layers(REPO / UNIT / name)
        guess = ", ".join(f"{layer or 'top level'} ({n})" for layer, n in counts.most_common()) or "no hpcgraft import"
        print(f"mirror_tests: {UNIT}/{name} is not placed; it imports {guess}: add it to MAPPING or ROOT",
              file=sys.stderr)
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
