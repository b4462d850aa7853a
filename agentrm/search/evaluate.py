"""``python -m agentrm.search``: greedy, sampling, Best-of-N and beam search over held-in and held-out env specs.

The command reads one :class:`EvalConfig` (YAML and flags; the Python API, :func:`evaluate`, takes the same
object). Held-in and held-out sets are lists of env specs (``babyai:GoToLocal?max_steps=24``,
``sciworld:boil@test``, ``textworld:cooking@test``). Episode seeds come from the data collector's
derivation (:meth:`agentrm.data.jobs.Job.seeds`: a pure function of ``(seed, task, index)``) with a
different base ``seed`` than the reward model's training data; :func:`check_disjoint_instances` verifies
through each environment's :meth:`~agentrm.envs.base.Env.instance_key` that no evaluation episode plays a
training task instance. What each episode runs: :mod:`agentrm.search.episodes`.

Before any episode: every spec is checked and resolved once (:mod:`agentrm.search.resolve`: placement,
reachability, the RM's recorded settings, a weights fingerprint), the environments are built and the
instances checked disjoint. Outputs in ``out_dir``: ``episodes.jsonl`` (one row per episode and method),
``summary.csv``/``.md``, ``scaling.png``, ``config.json`` (with the models' fingerprints) and
``comparisons.csv``/``.md`` (every Best-of-N and beam method against greedy and against Best-of-1, paired
bootstrap 95% intervals, :mod:`agentrm.search.compare`). The console gets one compact table (method x
held-in/held-out success, RM tokens per episode) and the names of those files; ``--verbose true`` prints
the full table and the comparisons.

Serving scale and resumption (:mod:`agentrm.search.runner`): ``concurrency`` episodes run at once on threads
(each with its own environments; scorers shared under a lock). Each finished episode is appended to
``episodes.jsonl`` at once, and a rerun of the same configuration skips the episodes already there, so a
killed evaluation resumes and ends with the summary of an uninterrupted run; a rerun whose policy or scorer
models differ from the recorded fingerprints refuses to resume (it would mix two models' results).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from agentrm.checks import at_least, each_at_least, fail, one_of
from agentrm.cli_config import parse_config
from agentrm.cli_errors import BuildError, building, one_line, run_cli
from agentrm.data.jobs import Job
from agentrm.data.splits import check_unseen
from agentrm.envs.base import Env, close_quietly
from agentrm.envs.registry import EnvSpec, check_disjoint, make_env, parse_specs
from agentrm.policies.openai_compat import EndpointError
from agentrm.search.best_of_n import TieBreak
from agentrm.search.build import build_scorer, policy_factory
from agentrm.search.episodes import Episode, EpisodeJob, Methods, episode_rows
from agentrm.search.outputs import check_resumable, write_outputs
from agentrm.search.resolve import resolve_policy, resolve_scorer
from agentrm.search.runner import EpisodeLog, SharedScorer, run_jobs
from agentrm.search.specs import PolicySpec, ScorerSpec, check_policy, check_scorer


@dataclass
class EvalConfig:
    """``python -m agentrm.search``: evaluate search methods guided by reward models (see the module doc).

    Attributes:
        out_dir: output directory.
        held_in: env specs of task types in the reward model's training data (evaluation instances: another
            split or other seeds).
        held_out: env specs of task types never seen in training. At least one set is needed.
        episodes: episodes per spec.
        seed: base seed of the evaluation episodes.
        train_envs: the specs the training data was collected from (default: ``held_in`` with split
            ``train``), checked with ``train_seed`` and ``train_episodes`` for shared task instances.
        train_seed: base seed the training data was collected with (``python -m agentrm.collect --seed``).
        train_episodes: training episodes per spec checked for overlap.
        policy: the acting policy (default: each environment's expert with error rate 0.7).
        scorers: scorers for Best-of-N and beam search (default: the value RM at runs/tiny_value_rm/hf_model).
        greedy: run the greedy baseline.
        best_of_n: N values (the largest sets the sample pool; [] skips Best-of-N, pass@N and sampling).
        beam: (W, K) pairs for beam search ([] skips it).
        beam_max_depth: step budget of a beam.
        beam_episodes: run beam search on the first this-many episodes of each spec only (None: all).
        tie_break: Best-of-N ties: ``first``, ``random`` (seeded per episode) or ``shortest``.
        num_threads: torch CPU threads (None: torch's default).
        concurrency: episodes run at once (threads; the summary does not depend on it).
        resume: skip the episodes ``out_dir/episodes.jsonl`` already holds (a run of the same configuration
            and models that was interrupted); ``False`` starts the file anew.
        progress: show a progress bar.
        show: print the results (one compact table; ``verbose``: every row and the paired comparisons).
        verbose: print the full summary table and the comparisons instead of the compact table.
    """

    out_dir: str = "runs/search/eval"
    held_in: list[str] | None = None
    held_out: list[str] | None = None
    episodes: int = 20
    seed: int = 1000
    train_envs: list[str] | None = None
    train_seed: int = 0
    train_episodes: int = 1000
    policy: PolicySpec = field(default_factory=PolicySpec)
    scorers: list[ScorerSpec] = field(default_factory=lambda: [ScorerSpec(path="runs/tiny_value_rm/hf_model")])
    greedy: bool = True
    best_of_n: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    beam: list[tuple[int, int]] = field(default_factory=lambda: [(2, 4)])
    beam_max_depth: int = 100
    beam_episodes: int | None = None
    tie_break: TieBreak = "first"
    num_threads: int | None = None
    concurrency: int = 1
    resume: bool = True
    progress: bool = True
    show: bool = True
    verbose: bool = False

    def __post_init__(self) -> None:
        self.beam = [tuple(b) for b in self.beam]
        for name in ("held_in", "held_out", "train_envs"):
            try:
                parse_specs(getattr(self, name))
            except ValueError as e:
                fail(name, str(e))
        if not self.sets["held_in"] and not self.sets["held_out"]:
            fail("held_in", "give held_in and/or held_out env specs (e.g. babyai:GoToLocal?max_steps=24)")
        for name in ("episodes", "train_episodes", "beam_max_depth", "concurrency"):
            at_least(getattr(self, name), 1, name)
        at_least(self.beam_episodes, 1, "beam_episodes", allow_none=True)
        at_least(self.num_threads, 1, "num_threads", allow_none=True)
        each_at_least(self.best_of_n, 1, "best_of_n")
        for i, b in enumerate(self.beam):
            if len(b) != 2:
                fail(f"beam[{i}]", f"a beam is [W, K], got {list(b)}")
            each_at_least(list(b), 1, f"beam[{i}]")
        one_of(self.tie_break, ("first", "random", "shortest"), "tie_break")
        check_policy(self.policy, "policy")
        for i, s in enumerate(self.scorers):
            check_scorer(s, f"scorers[{i}]")
        labels = [s.label for s in self.scorers]
        if len(set(labels)) != len(labels):
            fail("scorers", f"labels must be unique, got {labels}; set 'name'")

    @property
    def sets(self) -> dict[str, list[EnvSpec]]:
        return {"held_in": parse_specs(self.held_in), "held_out": parse_specs(self.held_out)}

    @property
    def train_specs(self) -> list[EnvSpec]:
        if self.train_envs is not None:
            return parse_specs(self.train_envs)
        return [s.with_split("train") for s in self.sets["held_in"]]

    @property
    def methods(self) -> Methods:
        return Methods(self.greedy, list(self.best_of_n), list(self.beam), self.beam_max_depth, self.beam_episodes,
                       self.tie_break)

    def jobs(self) -> list[EpisodeJob]:
        return [EpisodeJob(name, spec, i) for name, specs in self.sets.items() for spec in specs
                for i in range(self.episodes)]


def instance_keys(env: Env, spec: EnvSpec, episodes: int, seed: int) -> set[str]:
    """Task-instance keys of ``episodes`` jobs of ``spec`` with base ``seed``."""
    return {env.instance_key(Job(spec, i).seeds(seed)[0]) for i in range(episodes)}


def check_disjoint_instances(
    envs: dict[str, Env], specs: list[EnvSpec], episodes: int, seed: int, train_specs: list[EnvSpec],
    train_seed: int, train_episodes: int,
) -> None:
    """Raise ``ValueError`` if an evaluation episode plays a task instance of the training data.

    Args:
        envs: built environments by spec string (training specs not in it are built and closed here).
        specs: evaluation specs; ``episodes`` each with base ``seed``.
        train_specs: the specs the reward model's data came from; ``train_episodes`` each with ``train_seed``.
    """
    evaluation: set[str] = set()
    for spec in specs:
        evaluation |= instance_keys(envs[str(spec)], spec, episodes, seed)
    train: set[str] = set()
    for spec in train_specs:
        env = envs.get(str(spec)) or make_env(spec)
        try:
            train |= instance_keys(env, spec, train_episodes, train_seed)
        finally:
            if str(spec) not in envs:
                close_quietly(env)
    check_disjoint(train, evaluation)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run a block with ``n`` torch CPU threads (``None``: unchanged), restoring the count after."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class EnvPool:
    """The environments of a run: the main thread's, built up front, and one set per worker thread."""

    def __init__(self, specs: list[EnvSpec]):
        self.main = {str(s): make_env(s) for s in specs}
        self._main_thread, self._local, self._lock, self._extra = threading.get_ident(), threading.local(), \
            threading.Lock(), []

    def get(self, spec: EnvSpec) -> Env:
        if threading.get_ident() == self._main_thread:
            return self.main[str(spec)]
        own = self._local.__dict__.setdefault("envs", {})
        if str(spec) not in own:
            own[str(spec)] = make_env(spec)
            with self._lock:
                self._extra.append(own[str(spec)])
        return own[str(spec)]

    def close(self) -> None:
        for env in [*self.main.values(), *self._extra]:
            close_quietly(env)


def evaluate(config: EvalConfig) -> list[dict[str, Any]]:
    """Run the configured methods on every episode and write the outputs; returns the summary rows."""
    with torch_threads(config.num_threads):
        with building():  # every model checked and resolved (placement, reachable, fingerprint) before anything loads
            policy = resolve_policy(config.policy, "policy")
            resolved = [resolve_scorer(s, f"scorers[{i}]") for i, s in enumerate(config.scorers)]
        fingerprints = {"policy": policy.fingerprint, "scorers": {r.label: r.fingerprint for r in resolved}}
        out = Path(config.out_dir)
        check_resumable(out, config, fingerprints)
        envs = EnvPool([s for specs in config.sets.values() for s in specs])
        try:
            check_disjoint_instances(envs.main, [s for specs in config.sets.values() for s in specs], config.episodes,
                                     config.seed, config.train_specs, config.train_seed, config.train_episodes)
            check_unseen(config.train_specs, test=config.sets["held_out"], allow_seen_groups=True,
                         names=("dev", "held_out"))  # held-out task types: absent from the training data
            scorers = {}
            for i, r in enumerate(resolved):
                with building(f"scorers[{i}] ({r.label})"):
                    scorers[r.label] = build_scorer(r, config.seed)
            with building(f"policy ({config.policy.kind})"):
                make_lm_policy = policy_factory(policy)
            try:
                rows, made = _run_episodes(config, out, envs, scorers, make_lm_policy)
            except EndpointError as e:  # a served policy or judge gone mid-run: one line; finished episodes are kept
                raise BuildError(one_line(e)) from e
        finally:
            envs.close()
        return write_outputs(config, out, rows, made, scorers)


def _run_episodes(config: EvalConfig, out: Path, envs: EnvPool, scorers: dict, make_lm_policy) -> tuple[list, list]:
    """Play every episode not yet in ``episodes.jsonl`` (``concurrency`` at once); all rows in job order."""
    made: list[Any] = []

    def make_policy(policy_seed: int, greedy: bool):
        made.append(make_lm_policy(policy_seed, greedy))
        return made[-1]

    jobs = config.jobs()
    log = EpisodeLog(out / "episodes.jsonl", lambda r: (r["env_set"], r["env"], r["episode"]), resume=config.resume)
    todo = [j for j in jobs if not log.done(j.key)]
    scorer_lock, methods = threading.Lock(), config.methods

    def run(job: EpisodeJob) -> list[dict[str, Any]]:
        shared = {k: SharedScorer(v, scorer_lock) for k, v in scorers.items()}
        return episode_rows(Episode(envs.get(job.spec), job, config.seed, make_policy, shared), methods)

    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="episodes", unit="ep", disable=not config.progress)
    try:
        run_jobs(todo, run, log, config.concurrency, on_done=lambda: bar.update(1))
    finally:
        bar.close()
    order = {j.key: n for n, j in enumerate(jobs)}
    rows = [r for key in sorted(log.rows, key=lambda k: order.get(k, len(order))) for r in log.rows[key]]
    return rows, made


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Command-line entry point: ``python -m agentrm.search --config configs/search/demo.yaml``."""
    config = parse_config(EvalConfig, argv, "agentrm.search")
    if not config.verbose:  # transformers' "Loading weights" bars, one per model: --verbose true shows them
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return evaluate(config)


def cli(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """``python -m agentrm.search``: :func:`main`, with a config that cannot be built reported in one line (exit 2)."""
    return run_cli("agentrm.search", main, argv)
