"""Shared pieces of the paper-analysis experiments (``bench/study_targets.py``, ``bench/data_scaling.py``,
``bench/task_specific.py``, ``bench/robustness.py``): the BabyAI level sets, a fixed-budget tiny
value-RM fit, Best-of-N evaluation read back as paired differences, and the figure they each save."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HELD_IN = ["GoToRedBall", "GoToObj", "GoToLocal", "PickupLoc"]
HELD_OUT = ["GoToRedBallGrey", "GoToRedBlueBall", "GoToObjS6", "GoToLocalS6N3", "PickupDist"]


def spec(level: str, max_steps: int = 24, extra: str = "") -> str:
    """``babyai:<level>?max_steps=24`` (plus ``&extra`` options)."""
    return f"babyai:{level}?max_steps={max_steps}" + (f"&{extra}" if extra else "")


def train_value_rm(data: Path, out: Path, steps: int) -> dict[str, float]:
    """The tiny value RM (``configs/tiny/value_rm.yaml``) on ``data`` for exactly ``steps`` optimiser steps.

    Returns the final validation metrics; the model is exported to ``out/hf_model``.
    """
    import yaml

    from agentrm.fit import main as fit_main
    from agentrm.pipeline import fit_config

    over = {"trainer": {"max_epochs": -1, "max_steps": steps, "enable_progress_bar": False}}
    cfg = fit_config("configs/tiny/value_rm.yaml", over, out, data)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fit_config.yaml").write_text(yaml.safe_dump(cfg))
    cli = fit_main(["--config", str(out / "fit_config.yaml"), "--overwrite", "true"])
    return {k: round(float(v), 4) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}


def fit_on_trees(trees: list, data: Path, out: Path, min_visits: int, steps: int) -> dict[str, Any]:
    """Flatten ``trees`` (``min_visits`` filter) into ``data`` and train the tiny value RM on it (``out``).

    Returns ``trees``, ``records``, ``states`` (labelled states) and the RM's validation metrics.
    """
    from agentrm.data.schema import write_jsonl
    from agentrm.targets.mcts import flatten_tree

    records = [r for t in trees for r in flatten_tree(t, min_visits=min_visits)]
    data.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(data, records)
    info = {"trees": len(trees), "records": len(records), "states": sum(s.value is not None for r in records for s in r.steps)}
    info.update(train_value_rm(data, out, steps))
    return info


def best_of_n_eval(
    out_dir: Path,
    scorers: dict[str, str],
    *,
    held_in: list[str],
    held_out: list[str],
    episodes: int,
    error_rate: float = 0.6,
    n: int = 5,
    seed: int = 1000,
    train_envs: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Greedy and Best-of-``n`` of the scripted agent guided by each value RM (``name -> HF dir``).

    Returns the paired comparisons (:mod:`agentrm.search.compare`) as dicts with float fields.
    """
    from agentrm.search.evaluate import EvalConfig, evaluate
    from agentrm.search.specs import PolicySpec, ScorerSpec

    evaluate(EvalConfig(
        out_dir=str(out_dir),
        held_in=held_in,
        held_out=held_out,
        train_envs=train_envs,
        episodes=episodes,
        seed=seed,
        train_seed=0,
        train_episodes=200,
        policy=PolicySpec(kind="expert", error_rate=error_rate),
        scorers=[ScorerSpec(path=path, name=name, max_length=1024, batch_size=16) for name, path in scorers.items()],
        greedy=True,
        best_of_n=[1, n],
        beam=[],
        num_threads=1,
        progress=False,
        show=False,
    ))
    floats = ("difference", "ci_low", "ci_high", "method_success", "baseline_success")
    with open(out_dir / "comparisons.csv", encoding="utf-8") as f:
        return [{**c, **{k: float(c[k]) for k in floats}} for c in csv.DictReader(f)]


def versus_greedy(comparisons: list[dict[str, Any]], scorer: str, env_set: str, n: int = 5) -> dict[str, Any]:
    """The comparison row of Best-of-``n`` with ``scorer`` against greedy in ``env_set``."""
    return next(
        c for c in comparisons
        if c["env_set"] == env_set and c["method"] == f"best_of_n[{scorer}]@{n}" and c["baseline"] == "greedy"
    )


def cell(c: dict[str, Any]) -> str:
    """``0.810 (+0.160 [+0.070, +0.250])``: Best-of-N success and its paired difference to greedy."""
    return f"{c['method_success']:.3f} ({c['difference']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}])"


@contextmanager
def figure(path: Path, figsize: tuple[float, float]) -> Iterator[tuple[Any, Any]]:
    """``(fig, ax)`` of a new matplotlib figure (Agg backend); on exit laid out, saved to ``path`` at 120 dpi
    and closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    yield fig, ax
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
