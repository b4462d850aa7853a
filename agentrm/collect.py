"""``python -m agentrm.collect``: generate BabyAI trajectories with Monte-Carlo step values.

Example::

    python -m agentrm.collect --out data/babyai.jsonl --levels '[GoToRedBall, GoToLocal]' \
        --episodes 100 --error_rate 0.3 --rollouts 4 --siblings 1 --workers 2

Re-running the same command resumes an interrupted run.  See
:func:`agentrm.data.collect.collect` for all options (``--help``).
"""

from __future__ import annotations

from agentrm.data.collect import collect, main

__all__ = ["collect", "main"]

if __name__ == "__main__":
    main()
