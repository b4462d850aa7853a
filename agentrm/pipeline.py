"""``python -m agentrm.pipeline --config configs/pipeline/tiny.yaml``: the whole method from one config.

Stages, each writing under ``<run_dir>/<stage>/`` and finishing with a ``DONE`` marker
(JSON summary), so a rerun skips finished stages (``--force '[trees, rm]'`` redoes some):

1. ``expert``: BabyAI bot demonstrations (error rate 0, no value estimates), or a given file;
2. ``sft``: behaviour cloning of the policy LM (``agentrm.fit`` with ``PolicySFTModule``);
3. ``trees``: MCTS trees with the policy on the training levels, flattened to value targets
   (search while acting with ``trees.commit``; states visited fewer than ``trees.min_visits`` times dropped);
4. ``rm``: the value RM trained on the tree targets (``agentrm.fit`` with ``ValueRMModule``);
5. ``eval``: greedy, sampling and Best-of-N of the policy guided by the RM (``agentrm.search``), with
   paired differences and bootstrap intervals (``comparisons.md``).

``policy.kind`` is ``sft`` (the LM of stage 2, the paper's pipeline) or ``expert`` (each environment's
scripted expert with ``policy.error_rate``; stages 1-2 are then skipped).

An interrupted stage restarts from scratch on rerun, except ``expert`` and ``trees``,
which resume their JSONL files.  The files the config names (demonstrations, fit configs) are checked
before any stage runs; a model a stage cannot build ends the command with one line naming the stage
(:mod:`agentrm.cli_errors`; ``AGENTRM_DEBUG=1`` for the traceback).
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from tqdm import tqdm

from agentrm.cli_errors import BuildError, building, run_cli
from agentrm.paths import resolve_path

STAGES = ("expert", "sft", "trees", "rm", "eval")


@dataclass
class ExpertStage:
    """Demonstrations: ``path`` uses an existing file; otherwise ``episodes`` per level are collected."""

    path: str | None = None
    episodes: int = 180


@dataclass
class FitStage:
    """An ``agentrm.fit`` run: a base YAML config with nested ``overrides`` merged into it."""

    config: str = "configs/tiny/policy_sft.yaml"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class PolicyChoice:
    """The policy whose trees train the RM and which the RM then guides.

    ``sft``: the LM behaviour-cloned in the ``sft`` stage (the paper's pipeline); ``expert``: each
    environment's scripted expert acting with ``error_rate`` (no ``expert``/``sft`` stages; the fast
    laptop-scale path).
    """

    kind: Literal["sft", "expert"] = "sft"
    error_rate: float = 0.6


@dataclass
class TreeStage:
    """MCTS budget per tree (see :func:`agentrm.trees.build_trees`).

    ``commit``: search while acting (``simulations`` per committed step, so the targets cover whole
    episodes); ``min_visits``: states visited fewer times are not targets (the stage reports how many
    visited states were kept); ``parallel``: simulations in flight per tree with batched policy calls
    (virtual loss; worth it for a served or GPU policy).
    """

    episodes: int = 20
    simulations: int = 30
    k: int = 3
    c: float = 1.0
    max_depth: int = 24
    commit: bool = True
    parallel: int = 1
    min_visits: int = 2
    temperature: float = 1.0
    workers: int = 1


@dataclass
class EvalStage:
    """Search evaluation (see :func:`agentrm.search.evaluate.evaluate`); ``enabled: false`` skips it."""

    enabled: bool = True
    episodes: int = 25
    seed: int = 1000
    held_out: list[str] = field(default_factory=list)
    best_of_n: list[int] = field(default_factory=lambda: [1, 5])
    beam: list[list[int]] = field(default_factory=list)
    temperature: float = 1.0
    max_new_tokens: int = 8
    num_threads: int | None = 1


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def fit_config(base: str, overrides: dict[str, Any], out_dir: Path, train_path: Path) -> dict[str, Any]:
    """The YAML config of a fit stage, with every output path moved under ``out_dir``."""
    cfg = yaml.safe_load(resolve_path(base).read_text())
    cfg = _merge(cfg, overrides)
    t = cfg.setdefault("trainer", {})
    t["default_root_dir"] = str(out_dir)
    t["enable_progress_bar"] = t.get("enable_progress_bar", True)
    if isinstance(t.get("logger"), dict):
        t["logger"].setdefault("init_args", {})["save_dir"] = str(out_dir)
    for cb in t.get("callbacks") or []:
        args = cb.setdefault("init_args", {})
        if cb["class_path"].endswith("ModelCheckpoint"):
            args["dirpath"] = str(out_dir / "checkpoints")
        elif cb["class_path"].endswith("ExportHF"):
            args["dirpath"] = str(out_dir / "hf_model")
    cfg.setdefault("data", {})["train_path"] = str(train_path)
    return cfg


def _fit(stage: FitStage, out_dir: Path, train_path: Path) -> dict[str, Any]:
    from agentrm.fit import main as fit_main

    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = out_dir / "fit_config.yaml"
    cfg_path.write_text(yaml.safe_dump(fit_config(stage.config, stage.overrides, out_dir, train_path)))
    t0 = time.perf_counter()
    cli = fit_main(["--config", str(cfg_path), "--overwrite", "true"])  # a stage reruns only when not DONE or forced
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    return {"hf_model": str(out_dir / "hf_model"), "seconds": round(time.perf_counter() - t0, 1), **metrics}


def run_pipeline(
    run_dir: str = "runs/pipeline_tiny",
    envs: list[str] | None = None,
    seed: int = 0,
    policy: PolicyChoice | None = None,
    expert: ExpertStage | None = None,
    sft: FitStage | None = None,
    trees: TreeStage | None = None,
    rm: FitStage | None = None,
    eval: EvalStage | None = None,  # noqa: A002  (the config section's name)
    force: list[str] | None = None,
    num_threads: int | None = None,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Run (or resume) expert data -> policy SFT -> MCTS trees -> value RM -> Best-of-N evaluation.

    Args:
        run_dir: every stage's outputs go to ``<run_dir>/<stage>/``.
        envs: training env specs (held-in task types), e.g. ``babyai:GoToLocal?max_steps=24``;
            required (the shipped tiny config lists four BabyAI levels).
        seed: base seed of the expert episodes and the trees (evaluation uses ``eval.seed``).
        policy: the SFT LM (``sft``, default) or the environments' scripted expert with an error rate.
        expert, sft, trees, rm, eval: stage settings.
        force: stages to redo even if finished.
        num_threads: torch CPU threads for the whole run (1 is much faster on a busy machine).
        progress: progress bars.

    Returns:
        Each stage's summary (also in ``<run_dir>/<stage>/DONE`` and ``<run_dir>/summary.json``).
    """
    from agentrm.envs.registry import parse_spec, parse_specs

    specs = [str(s) for s in parse_specs(envs)]
    if not specs:
        raise ValueError("pipeline: give the training env specs with --envs (e.g. '[babyai:GoToLocal?max_steps=24]')")
    policy = policy or PolicyChoice()
    expert = expert or ExpertStage()
    sft = sft or FitStage("configs/tiny/policy_sft.yaml")
    trees = trees or TreeStage()
    rm = rm or FitStage("configs/tiny/value_rm.yaml")
    ev = eval or EvalStage()
    force = set(force or [])
    if force - set(STAGES):
        raise ValueError(f"unknown stage(s) {sorted(force - set(STAGES))}; stages: {STAGES}")
    with building():  # the files the config names exist, before any stage runs
        for field_name, value in (("expert.path", expert.path), ("sft.config", sft.config), ("rm.config", rm.config)):
            if value:
                try:
                    resolve_path(value)
                except FileNotFoundError as e:
                    raise FileNotFoundError(f"{field_name}: {e}") from None
    if num_threads:
        import torch

        torch.set_num_threads(num_threads)
    root = Path(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    d = {s: root / s for s in STAGES}

    scripted = policy.kind == "expert"

    def do_expert() -> dict[str, Any]:
        if scripted:
            return {"skipped": "policy.kind is expert: no demonstrations needed"}
        if expert.path:
            return {"path": str(resolve_path(expert.path))}
        from agentrm.collect import collect

        out = d["expert"] / "expert.jsonl"
        s = collect(
            out=str(out),
            envs=specs,
            episodes=expert.episodes,
            error_rate=0.0,
            rollouts=0,
            siblings=0,
            seed=seed,
            progress=progress,
        )
        return {"path": str(out), **s}

    def do_trees() -> dict[str, Any]:
        from agentrm.trees import build_trees

        s = build_trees(
            out=str(d["trees"] / "trees.jsonl"),
            envs=specs,
            episodes=trees.episodes,
            simulations=trees.simulations,
            k=trees.k,
            c=trees.c,
            max_depth=trees.max_depth,
            commit=trees.commit,
            parallel=trees.parallel,
            policy="expert" if scripted else summary["sft"]["hf_model"],
            error_rate=policy.error_rate,
            temperature=trees.temperature,
            seed=seed,
            workers=trees.workers,
            flat_out=str(d["trees"] / "targets.jsonl"),
            min_visits=trees.min_visits,
            progress=progress,
        )
        return {"targets": str(d["trees"] / "targets.jsonl"), **s}

    def do_eval() -> dict[str, Any]:
        if not ev.enabled:
            return {"skipped": True}
        from agentrm.search.evaluate import evaluate
        from agentrm.search.specs import PolicySpec, ScorerSpec

        rows = evaluate(
            out_dir=str(d["eval"]),
            # the training task types on their evaluation instances: the test split where a family has
            # official splits (ScienceWorld variations, TextWorld games), other seeds for BabyAI
            held_in=[str(parse_spec(sp).with_split("test")) for sp in specs],
            train_envs=specs,
            held_out=ev.held_out,
            episodes=ev.episodes,
            seed=ev.seed,
            train_seed=seed,
            policy=PolicySpec(kind="expert", error_rate=policy.error_rate)
            if scripted
            else PolicySpec(
                kind="hf",
                model=summary["sft"]["hf_model"],
                temperature=ev.temperature,
                max_new_tokens=ev.max_new_tokens,
            ),
            scorers=[ScorerSpec(path=summary["rm"]["hf_model"], name="value_rm")],
            best_of_n=ev.best_of_n,
            beam=[tuple(b) for b in ev.beam],
            num_threads=ev.num_threads,
            progress=progress,
            show=progress,
        )
        keep = ("env_set", "method", "scorer", "n", "success_rate", "avg_reward")
        comp_path = d["eval"] / "comparisons.csv"  # written by evaluate: Best-of-N vs greedy / Best-of-1, with CIs
        comparisons = list(csv.DictReader(comp_path.open())) if comp_path.exists() else []
        return {
            "out_dir": str(d["eval"]),
            "rows": [{k: r.get(k) for k in keep} for r in rows],
            "comparisons": comparisons,
        }

    actions: dict[str, Callable[[], dict[str, Any]]] = {
        "expert": do_expert,
        "sft": lambda: {"skipped": "policy.kind is expert"}
        if scripted
        else _fit(sft, d["sft"], Path(summary["expert"]["path"])),
        "trees": do_trees,
        "rm": lambda: _fit(rm, d["rm"], Path(summary["trees"]["targets"])),
        "eval": do_eval,
    }
    summary: dict[str, dict[str, Any]] = {}
    bar = tqdm(STAGES, desc="pipeline", unit="stage", disable=not progress)
    for stage in bar:
        marker = d[stage] / "DONE"
        if marker.exists() and stage not in force:
            summary[stage] = {**json.loads(marker.read_text()), "skipped": True}
            bar.write(f"[pipeline] {stage}: done already ({marker}), skipping")
            continue
        bar.set_postfix_str(stage)
        d[stage].mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        try:
            result = actions[stage]()
        except BuildError as e:
            raise BuildError(f"{stage} stage: {e}") from e
        result["stage_seconds"] = round(time.perf_counter() - t0, 1)
        marker.write_text(json.dumps(result, indent=2, default=str))
        summary[stage] = result
        force |= set(STAGES[STAGES.index(stage) + 1 :])  # later stages depend on this new output
    (root / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (root / "pipeline_config.json").write_text(
        json.dumps(
            {
                "envs": specs,
                "seed": seed,
                "policy": asdict(policy),
                "expert": asdict(expert),
                "sft": asdict(sft),
                "trees": asdict(trees),
                "rm": asdict(rm),
                "eval": asdict(ev),
            },
            indent=2,
        )
    )
    return summary


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Command-line entry point (``python -m agentrm.pipeline --help``)."""
    from jsonargparse import auto_cli

    summary = run_cli("agentrm.pipeline", lambda a: auto_cli(run_pipeline, args=a), argv)
    for stage, s in summary.items():
        brief = {k: v for k, v in s.items() if k not in ("rows",) and not isinstance(v, (list, dict))}
        print(f"{stage:7s}: {brief}")
    for r in summary.get("eval", {}).get("rows", []):
        print(
            f"  {r['env_set']:8s} {r['method']:10s} {r['scorer'] or '':9s} n={r['n'] or '':<3} "
            f"success {r['success_rate']:.3f}"
        )
    for c in summary.get("eval", {}).get("comparisons", []):
        print(
            f"  {c['env_set']:8s} {c['method']} - {c['baseline']}: {float(c['difference']):+.3f} "
            f"[95% CI {float(c['ci_low']):+.3f}, {float(c['ci_high']):+.3f}] over {c['episodes']} episodes"
        )
    return summary


if __name__ == "__main__":
    main()
