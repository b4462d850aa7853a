"""``python -m agentrm.trees``: MCTS trees over any environment into a resumable JSONL file (one tree a line).

Example::

    python -m agentrm.trees --out data/trees.jsonl \
        --envs '[babyai:GoToLocal?max_steps=24, sciworld:find-living-thing@train]' \
        --episodes 10 --simulations 50 --k 3 --workers 2 --flat_out data/tree_targets.jsonl
    python -m agentrm.trees --policy.kind hf --policy.model runs/tiny_policy/hf_model --envs '[babyai:GoToLocal]'

Task instances are the collector's jobs (:mod:`agentrm.data.jobs`), so trees and
collected trajectories of the same seed share episodes.  The expanding policy is a
:class:`~agentrm.search.specs.PolicySpec`: each environment's expert with ``error_rate``
(``--policy.kind expert``, the default) or an exported SFT policy (``--policy.kind hf
--policy.model <dir>``, sampled with ``temperature``).  Workers own their environments and, for an
LM policy, load it once per process.  An LM policy's weights are fingerprinted into every tree's
``meta``: a rerun with a retrained policy refuses to resume the file instead of mixing two models.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentrm.checks import ConfigError, at_least
from agentrm.cli_config import parse_config
from agentrm.cli_errors import building, run_cli
from agentrm.data.jobs import Job, JobOptions
from agentrm.data.resumable import OutputOptions, run_resumable
from agentrm.data.schema import write_jsonl
from agentrm.data.workers import WorkerOptions
from agentrm.envs.registry import check_specs, env_for
from agentrm.policies.base import Policy
from agentrm.search.build import policy_factory
from agentrm.search.resolve import ResolvedPolicy, resolve_policy
from agentrm.search.specs import PolicySpec, check_policy
from agentrm.targets.mcts import MCTS, MCTSConfig, flatten_tree, read_trees


@dataclass(frozen=True)
class TreeSettings:
    """Everything that determines the trees (recorded in each tree's ``meta``; sent to workers)."""

    mcts: MCTSConfig
    policy: ResolvedPolicy
    seed: int


_POLICY_CACHE: dict[str, Any] = {}


def _make_policy(s: TreeSettings, seed: int) -> Policy:
    """The expanding policy of one tree: the resolved policy, an LM loaded once per process."""
    policy = s.policy
    if s.mcts.parallel > 1 and policy.spec.kind == "hf":  # parallel simulations batch their replies
        policy = dataclasses.replace(policy, spec=dataclasses.replace(policy.spec, batch_requests=True))
    key = json.dumps(dataclasses.asdict(policy.spec), sort_keys=True)
    if key not in _POLICY_CACHE:  # load an LM once per process; a fresh sampler state per tree
        _POLICY_CACHE[key] = policy_factory(policy)
    return _POLICY_CACHE[key](seed, False)


def run_tree_job(job: Job, settings: TreeSettings) -> list[str]:
    """Build one tree; return it as a JSON line."""
    env = env_for(job.spec)
    env_seed, policy_seed, search_seed = job.seeds(settings.seed)
    search = MCTS(_make_policy(settings, policy_seed), settings.mcts, seed=search_seed)
    meta = {"env": str(job.spec), "env_seed": env_seed, "instance": env.instance_key(env_seed), **_settings_meta(settings)}
    tree = search.search(env, env_seed, tree_id=job.episode_id(settings.seed), task=job.spec.name, meta=meta)
    return [json.dumps(tree.to_dict(), ensure_ascii=False)]


def _policy_name(spec: PolicySpec) -> str:
    if spec.kind in ("expert", "scripted"):
        return "expert"
    return spec.model if spec.kind == "hf" else f"{spec.kind}:{spec.model}"


def _settings_meta(s: TreeSettings) -> dict[str, Any]:
    m, spec = s.mcts, s.policy.spec
    lm = spec.kind == "hf"
    return {
        "simulations": m.simulations,
        "k": m.k,
        "c": m.c,
        "max_depth": m.max_depth,
        "policy": _policy_name(spec),
        "error_rate": spec.error_rate,
        "temperature": spec.temperature,
        **({"commit": True} if m.commit else {}),  # absent when off: files written before it existed still resume
        **({"parallel": m.parallel} if m.parallel != 1 else {}),
        **({"policy_fingerprint": s.policy.fingerprint} if lm else {}),
    }


def _check_tree(path: Path, jobs: list[Job], settings: TreeSettings, rec: dict, index: int) -> int:
    want = jobs[index].episode_id(settings.seed)
    expected = {"env": str(jobs[index].spec), **_settings_meta(settings)}
    got = {k: rec.get("meta", {}).get(k) for k in expected}
    if got.get("policy_fingerprint") != expected.get("policy_fingerprint") and rec.get("id") == want:
        raise ConfigError(
            f"out: {path} was built with another policy model (fingerprint {got.get('policy_fingerprint')}, now "
            f"{expected.get('policy_fingerprint')} for {settings.policy.spec.model}): the model changed since; pass "
            "--overwrite true or choose another --out"
        )
    if rec.get("id") != want or got != expected:
        raise ConfigError(
            f"out: {path} was written with other arguments (found {rec.get('id')!r} {got}, expected "
            f"{want!r} {expected}); pass --overwrite true or choose another --out"
        )
    return 0


@dataclass
class TreesConfig(OutputOptions, JobOptions, WorkerOptions, MCTSConfig):
    """``python -m agentrm.trees``: one MCTS tree per task instance into a resumable JSONL file (one tree a line).

    Inherits :class:`~agentrm.data.jobs.JobOptions` (``envs``, ``episodes``, ``seed``),
    :class:`~agentrm.data.resumable.OutputOptions` (``out``, ``overwrite``, ``limit``, ``progress``),
    :class:`~agentrm.data.workers.WorkerOptions` (``workers``, ``backend``, ``ray_address``) and the search budget
    :class:`~agentrm.targets.mcts.MCTSConfig` (``simulations``, ``k``, ``c``, ``max_depth``, ``commit``: search while
    acting, ``simulations`` per committed step; ``parallel``: simulations in flight per tree, their policy calls
    batched).

    Attributes:
        policy: the expanding policy (:class:`~agentrm.search.specs.PolicySpec`): ``kind: expert`` (each
            environment's expert with ``error_rate``), ``kind: hf`` with ``model`` an exported SFT policy
            (sampled with ``temperature``; ``device``/``dtype``/``quantization`` as for search), or a served one.
        flat_out: also write :func:`~agentrm.targets.mcts.flatten_tree` records of all trees to this JSONL.
        min_visits: with ``flat_out``, nodes visited fewer times are not targets.
    """

    out: str = "data/trees.jsonl"
    policy: PolicySpec = field(default_factory=lambda: PolicySpec(kind="expert", error_rate=0.3))
    flat_out: str | None = None
    min_visits: int = 1

    def __post_init__(self) -> None:
        MCTSConfig.__post_init__(self)
        WorkerOptions.__post_init__(self)
        JobOptions.__post_init__(self)
        OutputOptions.__post_init__(self)
        at_least(self.min_visits, 1, "min_visits")
        check_policy(self.policy, "policy")

    @property
    def mcts(self) -> MCTSConfig:
        return MCTSConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(MCTSConfig)})


def build_trees(config: TreesConfig) -> dict[str, Any]:
    """Build one MCTS tree per task instance into a resumable JSONL file (one tree a line).

    Returns:
        ``trees``, ``nodes``, ``env_steps``, ``simulations``, ``seconds`` (this run) and
        with ``flat_out``: ``records``, ``states_visited`` (non-root nodes with a visit) and
        ``states_kept`` (the labelled states left after the ``min_visits`` filter).
    """
    with building():  # the policy's placement and model, and every env spec, before any tree
        resolved = resolve_policy(config.policy, "policy")
        check_specs(config.specs)
    settings = TreeSettings(config.mcts, resolved, config.seed)
    jobs, path = config.jobs(), Path(config.out)
    t0 = time.perf_counter()
    run_resumable(
        path, jobs, functools.partial(run_tree_job, settings=settings), functools.partial(_check_tree, path, jobs, settings),
        overwrite=config.overwrite, limit=config.limit, workers=config.pool(), progress=config.progress,
        desc="trees", unit="tree",
    )
    summary = tree_summary(read_trees(path))
    summary["seconds"] = time.perf_counter() - t0
    if config.flat_out:
        summary.update(write_targets(read_trees(path), config.flat_out, config.min_visits))
    return summary


def tree_summary(trees: list) -> dict[str, Any]:
    """``trees``, ``nodes``, ``env_steps`` and ``simulations`` of a list of trees."""
    return {
        "trees": len(trees),
        "nodes": sum(len(t.nodes) for t in trees),
        "env_steps": sum(int(t.stats.get("env_steps", 0)) for t in trees),
        "simulations": sum(int(t.stats.get("simulations", 0)) for t in trees),
    }


def write_targets(trees: list, flat_out: str, min_visits: int) -> dict[str, int]:
    """Flatten ``trees`` into value-target records at ``flat_out``; counts of records, visited and kept states."""
    records = [r for t in trees for r in flatten_tree(t, min_visits=min_visits)]
    return {
        "records": write_jsonl(flat_out, records),
        # the low-visit filter: visited states (non-root nodes) and those kept as targets
        "states_visited": sum(1 for t in trees for nd in t.nodes[1:] if nd.n >= 1),
        "states_kept": sum(1 for r in records for s in r.steps if s.value is not None),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m agentrm.trees --help``."""
    summary = run_cli("agentrm.trees", lambda a: build_trees(parse_config(TreesConfig, a, "agentrm.trees")), argv)
    print(", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
    return summary


if __name__ == "__main__":
    main()
