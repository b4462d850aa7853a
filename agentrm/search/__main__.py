"""``python -m agentrm.search``: evaluate search methods guided by reward models.

Example::

    python -m agentrm.search --config configs/search/demo.yaml
    python -m agentrm.search --config configs/search/babyai_eval.yaml --episodes 5

See :func:`agentrm.search.evaluate.evaluate` for all options (``--help``).
"""

from __future__ import annotations

from agentrm.search.evaluate import cli

if __name__ == "__main__":
    cli()
