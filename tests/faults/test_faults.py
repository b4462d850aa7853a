"""Every fault-injection case (``tests/faults/cases_*.py``), through the real command-line entry points."""

from __future__ import annotations

import pytest

from tests.faults.harness import all_cases, execute

CASES = all_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault_case(case, tmp_path):
    execute(case, tmp_path / "case")


def test_the_suite_is_large_enough_and_covers_every_command():
    assert len(CASES) >= 40, len(CASES)
    assert {"fit", "search", "collect", "trees", "pipeline", "plan"} <= {c.command for c in CASES}
