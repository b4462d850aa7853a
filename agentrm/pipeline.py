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

Before the first stage runs, every stage's command config is built and checked (:func:`plan_stages`: the
collector's, the tree builder's and the evaluation's config objects; each fit config merged with its
overrides and parsed by ``agentrm.fit``'s parser), so a typo in an override or a bad value fails at once in
one line, not after an hour of trees. An interrupted stage restarts from scratch on rerun, except
``expert`` and ``trees``, which resume their JSONL files.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from tqdm import tqdm

from agentrm.checks import ConfigError, at_least, fail, in_range, one_of
from agentrm.cli_config import parse_config
from agentrm.cli_errors import BuildError, building, run_cli
from agentrm.collect import CollectConfig
from agentrm.envs.registry import parse_spec, parse_specs
from agentrm.paths import resolve_path
from agentrm.search.evaluate import EvalConfig
from agentrm.search.specs import PolicySpec, ScorerSpec
from agentrm.targets.mcts import MCTSConfig
from agentrm.trees import TreesConfig

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
class TreeStage(MCTSConfig):
    """The trees stage: the MCTS budget per tree (:class:`~agentrm.targets.mcts.MCTSConfig`) and the stage's own.

    ``commit``: search while acting (``simulations`` per committed step, so the targets cover whole
    episodes); ``min_visits``: states visited fewer times are not targets (the stage reports how many
    visited states were kept); ``parallel``: simulations in flight per tree with batched policy calls
    (virtual loss; worth it for a served or GPU policy); ``temperature``: the SFT policy's sampling.
    """

    simulations: int = 30
    commit: bool = True
    episodes: int = 20
    min_visits: int = 2
    temperature: float = 1.0
    workers: int = 1


@dataclass
class EvalStage:
    """Search evaluation (see :class:`agentrm.search.evaluate.EvalConfig`); ``enabled: false`` skips it."""

    enabled: bool = True
    episodes: int = 25
    seed: int = 1000
    held_out: list[str] = field(default_factory=list)
    best_of_n: list[int] = field(default_factory=lambda: [1, 5])
    beam: list[list[int]] = field(default_factory=list)
    temperature: float = 1.0
    max_new_tokens: int = 8
    num_threads: int | None = 1


@dataclass
class PipelineConfig:
    """``python -m agentrm.pipeline``: expert data -> policy SFT -> MCTS trees -> value RM -> Best-of-N evaluation.

    Attributes:
        run_dir: every stage's outputs go to ``<run_dir>/<stage>/``.
        envs: training env specs (held-in task types), e.g. ``babyai:GoToLocal?max_steps=24``.
        seed: base seed of the expert episodes and the trees (evaluation uses ``eval.seed``).
        policy: the SFT LM (``sft``, default) or the environments' scripted expert with an error rate.
        expert, sft, trees, rm, eval: stage settings.
        force: stages to redo even if finished (and every stage after them).
        num_threads: torch CPU threads for the whole run (1 is much faster on a busy machine).
        progress: progress bars and the per-stage tables.
    """

    run_dir: str = "runs/pipeline_tiny"
    envs: list[str] = field(default_factory=list)
    seed: int = 0
    policy: PolicyChoice = field(default_factory=PolicyChoice)
    expert: ExpertStage = field(default_factory=ExpertStage)
    sft: FitStage = field(default_factory=lambda: FitStage("configs/tiny/policy_sft.yaml"))
    trees: TreeStage = field(default_factory=TreeStage)
    rm: FitStage = field(default_factory=lambda: FitStage("configs/tiny/value_rm.yaml"))
    eval: EvalStage = field(default_factory=EvalStage)
    force: list[str] = field(default_factory=list)
    num_threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        try:
            if not parse_specs(self.envs):
                fail("envs", "give the training env specs (e.g. '[babyai:GoToLocal?max_steps=24]')")
        except ValueError as e:
            if isinstance(e, ConfigError):
                raise
            fail("envs", str(e))
        unknown = sorted(set(self.force) - set(STAGES))
        if unknown:
            fail("force", f"unknown stage(s) {unknown}; stages: {', '.join(STAGES)}")
        one_of(self.policy.kind, ("sft", "expert"), "policy.kind")
        in_range(self.policy.error_rate, 0.0, 1.0, "policy.error_rate")
        at_least(self.expert.episodes, 1, "expert.episodes")
        at_least(self.num_threads, 1, "num_threads", allow_none=True)

    @property
    def scripted(self) -> bool:
        return self.policy.kind == "expert"

    def stage_dir(self, stage: str) -> Path:
        return Path(self.run_dir) / stage


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def fit_config(base: str, overrides: dict[str, Any], out_dir: Path, train_path: Path) -> dict[str, Any]:
    """The YAML config of a fit stage, with every output path moved under ``out_dir``."""
    cfg = _merge(yaml.safe_load(resolve_path(base).read_text()), overrides)
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


def check_fit_config(path: Path, what: str) -> None:
    """Parse a fit config with ``agentrm.fit``'s parser, building nothing; a bad key or value raises one line."""
    from agentrm.lit.cli import parse_fit_config

    try:
        parse_fit_config(["--config", str(path)])
    except BuildError as e:
        raise ConfigError(f"{what}: {e}") from None


@dataclass
class StagePlan:
    """Every stage's command config, built and checked before the first stage runs."""

    expert: CollectConfig | None
    sft_config: Path | None
    trees: TreesConfig
    rm_config: Path
    eval: EvalConfig | None


def plan_stages(cfg: PipelineConfig) -> StagePlan:
    """Build each stage's config object (a later stage's inputs at the paths the earlier stages will write)."""
    d, specs = cfg.stage_dir, [str(s) for s in parse_specs(cfg.envs)]
    with building():
        if cfg.expert.path:
            resolve_path(cfg.expert.path)
        expert = None if cfg.scripted or cfg.expert.path else CollectConfig(
            out=str(d("expert") / "expert.jsonl"), envs=specs, episodes=cfg.expert.episodes, error_rate=0.0,
            rollouts=0, siblings=0, seed=cfg.seed, progress=cfg.progress)
        demos = Path(cfg.expert.path) if cfg.expert.path else d("expert") / "expert.jsonl"
        sft_config = None if cfg.scripted else _write_fit_config(cfg.sft, d("sft"), demos, "sft")
        t = cfg.trees
        budget = {f.name: getattr(t, f.name) for f in dataclasses.fields(MCTSConfig)}
        trees = TreesConfig(
            out=str(d("trees") / "trees.jsonl"), envs=specs, episodes=t.episodes, seed=cfg.seed, workers=t.workers,
            **budget, policy=_policy(cfg, t.temperature, max_new_tokens=16), flat_out=str(d("trees") / "targets.jsonl"),
            min_visits=t.min_visits, progress=cfg.progress)
        rm_config = _write_fit_config(cfg.rm, d("rm"), d("trees") / "targets.jsonl", "rm")
        return StagePlan(expert, sft_config, trees, rm_config, _eval_config(cfg, specs) if cfg.eval.enabled else None)


def _policy(cfg: PipelineConfig, temperature: float, max_new_tokens: int) -> PolicySpec:
    if cfg.scripted:
        return PolicySpec(kind="expert", error_rate=cfg.policy.error_rate)
    return PolicySpec(kind="hf", model=str(cfg.stage_dir("sft") / "hf_model"), error_rate=cfg.policy.error_rate,
                      temperature=temperature, max_new_tokens=max_new_tokens)


def _eval_config(cfg: PipelineConfig, specs: list[str]) -> EvalConfig:
    ev = cfg.eval
    return EvalConfig(
        out_dir=str(cfg.stage_dir("eval")),
        # the training task types on their evaluation instances: the test split where a family has
        # official splits (ScienceWorld variations, TextWorld games), other seeds for BabyAI
        held_in=[str(parse_spec(sp).with_split("test")) for sp in specs], train_envs=specs, held_out=ev.held_out,
        episodes=ev.episodes, seed=ev.seed, train_seed=cfg.seed,
        policy=_policy(cfg, ev.temperature, ev.max_new_tokens),
        scorers=[ScorerSpec(path=str(cfg.stage_dir("rm") / "hf_model"), name="value_rm")],
        best_of_n=ev.best_of_n, beam=[tuple(b) for b in ev.beam], num_threads=ev.num_threads,
        progress=cfg.progress, show=cfg.progress)


def _write_fit_config(stage: FitStage, out_dir: Path, train_path: Path, name: str) -> Path:
    """The stage's merged fit config written to ``out_dir/fit_config.yaml`` and parsed (nothing built)."""
    try:
        resolve_path(stage.config)
    except FileNotFoundError as e:
        raise ConfigError(f"{name}.config: {e}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "fit_config.yaml"
    path.write_text(yaml.safe_dump(fit_config(stage.config, stage.overrides, out_dir, train_path)))
    check_fit_config(path, f"{name} ({stage.config} with {name}.overrides)")
    return path


def _fit(config_path: Path, out_dir: Path) -> dict[str, Any]:
    from agentrm.fit import main as fit_main

    t0 = time.perf_counter()
    cli = fit_main(["--config", str(config_path), "--overwrite", "true"])  # a stage reruns only when not DONE or forced
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    return {"hf_model": str(out_dir / "hf_model"), "seconds": round(time.perf_counter() - t0, 1), **metrics}


def _expert(cfg: PipelineConfig, plan: StagePlan) -> dict[str, Any]:
    if cfg.scripted:
        return {"skipped": "policy.kind is expert: no demonstrations needed"}
    if plan.expert is None:
        return {"path": str(resolve_path(cfg.expert.path))}
    from agentrm.collect import collect

    return {"path": plan.expert.out, **collect(plan.expert)}


def _trees(plan: StagePlan) -> dict[str, Any]:
    from agentrm.trees import build_trees

    return {"targets": plan.trees.flat_out, **build_trees(plan.trees)}


def _eval(plan: StagePlan) -> dict[str, Any]:
    if plan.eval is None:
        return {"skipped": True}
    from agentrm.search.evaluate import evaluate

    rows = evaluate(plan.eval)
    keep = ("env_set", "method", "scorer", "n", "success_rate", "avg_reward")
    comp_path = Path(plan.eval.out_dir) / "comparisons.csv"  # Best-of-N vs greedy / Best-of-1, with CIs
    return {"out_dir": plan.eval.out_dir, "rows": [{k: r.get(k) for k in keep} for r in rows],
            "comparisons": list(csv.DictReader(comp_path.open())) if comp_path.exists() else []}


def _stage_actions(cfg: PipelineConfig, plan: StagePlan) -> dict[str, Callable[[], dict[str, Any]]]:
    return {
        "expert": lambda: _expert(cfg, plan),
        "sft": lambda: {"skipped": "policy.kind is expert"} if cfg.scripted else _fit(plan.sft_config, cfg.stage_dir("sft")),
        "trees": lambda: _trees(plan),
        "rm": lambda: _fit(plan.rm_config, cfg.stage_dir("rm")),
        "eval": lambda: _eval(plan),
    }


def run_pipeline(cfg: PipelineConfig) -> dict[str, dict[str, Any]]:
    """Run (or resume) the stages; returns each stage's summary (also in ``<stage>/DONE`` and ``summary.json``)."""
    plan = plan_stages(cfg)  # every stage's config checked before the first stage runs
    if cfg.num_threads:
        import torch

        torch.set_num_threads(cfg.num_threads)
    root, force = Path(cfg.run_dir), set(cfg.force)
    actions, summary = _stage_actions(cfg, plan), {}
    bar = tqdm(STAGES, desc="pipeline", unit="stage", disable=not cfg.progress)
    for stage in bar:
        marker = cfg.stage_dir(stage) / "DONE"
        if marker.exists() and stage not in force:
            summary[stage] = {**json.loads(marker.read_text()), "skipped": True}
            bar.write(f"[pipeline] {stage}: done already ({marker}), skipping")
            continue
        bar.set_postfix_str(stage)
        marker.parent.mkdir(parents=True, exist_ok=True)
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
    (root / "pipeline_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    return summary


def print_summary(summary: dict[str, dict[str, Any]]) -> None:
    """One line per stage, then the evaluation's success rates and paired differences."""
    for stage, s in summary.items():
        brief = {k: v for k, v in s.items() if k not in ("rows",) and not isinstance(v, (list, dict))}
        print(f"{stage:7s}: {brief}")
    for r in summary.get("eval", {}).get("rows", []):
        print(f"  {r['env_set']:8s} {r['method']:10s} {r['scorer'] or '':9s} n={r['n'] or '':<3} "
              f"success {r['success_rate']:.3f}")
    for c in summary.get("eval", {}).get("comparisons", []):
        print(f"  {c['env_set']:8s} {c['method']} - {c['baseline']}: {float(c['difference']):+.3f} "
              f"[95% CI {float(c['ci_low']):+.3f}, {float(c['ci_high']):+.3f}] over {c['episodes']} episodes")


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Command-line entry point (``python -m agentrm.pipeline --help``)."""
    summary = run_cli("agentrm.pipeline", lambda a: run_pipeline(parse_config(PipelineConfig, a, "agentrm.pipeline")),
                      argv)
    print_summary(summary)
    return summary


if __name__ == "__main__":
    main()
