"""Which end-to-end runs a session makes ahead of need (tests/conftest.py): the names its selected tests and their
fixtures hold, directly or through a module-level constant, so that one file or make test without the slow tier
does not make the runs only other tests need."""

from __future__ import annotations

from tests.conftest import _strings

STOPPED = "base2_stopped"


def _a_test(e2e_run):
    def reference(name: str) -> str:
        return e2e_run(name)

    return e2e_run("graft2"), reference("stepwise3"), e2e_run(STOPPED)


def test_the_runs_a_test_names_directly_in_a_nested_function_and_through_a_constant():
    found = set(_strings(_a_test.__code__, _a_test.__globals__))
    assert {"graft2", "stepwise3", "base2_stopped"} <= found
    assert "noise" not in found
