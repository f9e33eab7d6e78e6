"""The README is the front door and docs/ holds the rest: every relative link in them leads to a file that
exists and, with a #fragment, to a heading in it, so that moving a section cannot silently strand a reader."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests._util import ROOT

PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes (code fences skipped)."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    heads = re.findall(r"^#{1,6} (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file_and_heading(page: Path) -> None:
    broken = []
    for target in links(page):
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT)}")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target}: no heading '#{fragment}' in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_docs_index_and_the_readme_name_every_docs_page() -> None:
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"README.md"}
    assert pages, "docs/ holds no pages"
    index = {Path(t.partition("#")[0]).name for t in links(ROOT / "docs" / "README.md")}
    readme = {Path(t.partition("#")[0]).name for t in links(ROOT / "README.md") if t.startswith("docs/")}
    assert not pages - index, f"docs/README.md does not list {sorted(pages - index)}"
    assert not pages - readme, f"README.md does not link {sorted(pages - readme)}"


def test_the_readme_stays_a_front_door() -> None:
    """Reference, tutorial, figures and design live in docs/; the README keeps what a newcomer reads first."""
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= 300, f"README.md has {lines} lines; move sections into docs/ (at most 300)"


# An upstream project's bug tracker is a reason a reader can follow; our own tracker's numbers are not.
UPSTREAM = re.compile(r"\b(horovod|pytorch|torch|mpich|mpi4py|h5py|submitit) issue \d+", re.I)
TRACKER = re.compile(r"\b(issues?|items?|audit)\s+#?\d+\b|#\d{1,2}\b", re.I)


def test_no_text_cites_our_tracker_instead_of_saying_why() -> None:
    files = [p for d in ("hpcgraft", "tests", "tools", "docs") for p in (ROOT / d).rglob("*")
             if p.suffix in {".py", ".md", ".sh", ".yaml"} and p.relative_to(ROOT).parts[:2] != ("tests", "data")]
    cited = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in [*files, ROOT / "README.md"]
             for n, line in enumerate(p.read_text().splitlines(), 1)
             if TRACKER.search(UPSTREAM.sub("", line))]
    assert not cited, "say why, not which issue or item asked for it:\n" + "\n".join(cited)
