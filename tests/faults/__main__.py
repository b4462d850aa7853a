"""``python -m tests.faults [--run] [-k PATTERN]``: the fault-injection suite's table (``--run``: with results)."""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

from tests.faults.harness import all_cases, execute, summary_table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="store_true", help="run the cases (subprocesses; minutes) and show results")
    ap.add_argument("-k", default=None, help="only cases whose id matches this regex")
    a = ap.parse_args(argv)
    cases = [c for c in all_cases() if a.k is None or re.search(a.k, c.id)]
    results = None
    if a.run:
        results = {}
        with tempfile.TemporaryDirectory() as tmp:
            for c in cases:
                try:
                    execute(c, Path(tmp) / c.id.replace("/", "__"))
                    results[c.id] = True
                except AssertionError as e:
                    results[c.id] = False
                    print(f"FAILED {c.id}: {str(e).splitlines()[0]}")
    print(summary_table(cases, results))
    return 0 if results is None or all(results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
