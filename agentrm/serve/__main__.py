"""``python -m agentrm.serve --model runs/tiny_value_rm/hf_model``: serve a reward model (see docs/serving.md)."""

from __future__ import annotations

from agentrm.serve.server import cli

if __name__ == "__main__":
    cli()
