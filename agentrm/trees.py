"""``python -m agentrm.trees``: MCTS trees over any environment into a resumable JSONL file (one tree a line).

Example::

    python -m agentrm.trees --out data/trees.jsonl \
        --envs '[babyai:GoToLocal?max_steps=24, sciworld:find-living-thing@train]' \
        --episodes 10 --simulations 50 --k 3 --workers 2 --flat_out data/tree_targets.jsonl

Task instances are the collector's jobs (:mod:`agentrm.data.jobs`), so trees and
collected trajectories of the same seed share episodes.  The expanding policy is each
environment's expert with ``error_rate`` (``policy: expert``) or an exported SFT policy
(a Hugging Face causal-LM directory, sampled with ``temperature``).  Workers own their
environments and, for an LM policy, load it once per process.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentrm.cli_errors import building, run_cli
from agentrm.data.jobs import Job, plan_jobs
from agentrm.data.resumable import run_resumable
from agentrm.data.workers import Backend, make_pool
from agentrm.envs.registry import check_specs, env_for, parse_specs
from agentrm.policies.base import Policy
from agentrm.targets.mcts import MCTS, MCTSConfig, flatten_tree, read_trees


@dataclass(frozen=True)
class TreeSettings:
    """Everything that determines the trees (stored in each tree's ``meta``)."""

    simulations: int
    k: int
    c: float
    max_depth: int
    policy: str
    error_rate: float
    temperature: float
    seed: int
    device: str | None = None
    dtype: str | None = None
    quantization: str | None = None
    attn_implementation: str = "auto"
    commit: bool = False
    parallel: int = 1


_POLICY_CACHE: dict[tuple, Any] = {}


def _make_policy(s: TreeSettings, seed: int) -> Policy:
    """``expert`` (each env's noisy expert) or a path to an exported HF causal LM (SFT policy)."""
    if s.policy in ("expert", "scripted"):
        from agentrm.policies.expert import EnvExpertPolicy

        return EnvExpertPolicy(s.error_rate, seed=seed)
    from agentrm.policies.hf import HFPolicy, load_hf_policy

    key = (s.policy, s.device, s.dtype, s.quantization, s.attn_implementation)
    if key not in _POLICY_CACHE:  # load the LM once per process, fresh sampler state per tree
        _POLICY_CACHE[key] = load_hf_policy(s.policy, device=s.device, dtype=s.dtype, quantization=s.quantization,
                                            attn_implementation=s.attn_implementation)
    base = _POLICY_CACHE[key]
    return HFPolicy(  # parallel simulations batch their replies (per-reply sampling streams)
        base.model, base.tokenizer, temperature=s.temperature, seed=seed, max_new_tokens=base.max_new_tokens,
        batch_requests=s.parallel > 1,
    )


def run_tree_job(job: Job, settings: TreeSettings) -> list[str]:
    """Build one tree; return it as a JSON line."""
    env = env_for(job.spec)
    env_seed, policy_seed, search_seed = job.seeds(settings.seed)
    cfg = MCTSConfig(settings.simulations, settings.k, settings.c, settings.max_depth, commit=settings.commit,
                     parallel=settings.parallel)
    search = MCTS(_make_policy(settings, policy_seed), cfg, seed=search_seed)
    meta = {"env": str(job.spec), "env_seed": env_seed, "instance": env.instance_key(env_seed), **_settings_meta(settings)}
    tree = search.search(env, env_seed, tree_id=job.episode_id(settings.seed), task=job.spec.name, meta=meta)
    return [json.dumps(tree.to_dict(), ensure_ascii=False)]


def _settings_meta(s: TreeSettings) -> dict[str, Any]:
    return {
        "simulations": s.simulations,
        "k": s.k,
        "c": s.c,
        "max_depth": s.max_depth,
        "policy": s.policy,
        "error_rate": s.error_rate,
        "temperature": s.temperature,
        **({"commit": True} if s.commit else {}),  # absent when off: files written before it existed still resume
        **({"parallel": s.parallel} if s.parallel != 1 else {}),
    }


def _check_tree(path: Path, jobs: list[Job], settings: TreeSettings, rec: dict, index: int) -> int:
    want = jobs[index].episode_id(settings.seed)
    expected = {"env": str(jobs[index].spec), **_settings_meta(settings)}
    got = {k: rec.get("meta", {}).get(k) for k in expected}
    if rec.get("id") != want or got != expected:
        raise ValueError(
            f"{path} was written with other arguments (found {rec.get('id')!r} {got}, expected "
            f"{want!r} {expected}); pass --overwrite true or choose another --out"
        )
    return 0


def build_trees(
    out: str = "data/trees.jsonl",
    envs: list[str] | None = None,
    episodes: int = 10,
    simulations: int = 50,
    k: int = 3,
    c: float = 1.0,
    max_depth: int = 24,
    commit: bool = False,
    parallel: int = 1,
    policy: str = "expert",
    error_rate: float = 0.3,
    temperature: float = 1.0,
    seed: int = 0,
    workers: int = 1,
    backend: Backend = "local",
    ray_address: str | None = None,
    overwrite: bool = False,
    limit: int | None = None,
    flat_out: str | None = None,
    min_visits: int = 1,
    progress: bool = True,
    device: str | None = None,
    dtype: str | None = None,
    quantization: str | None = None,
    attn_implementation: str = "auto",
) -> dict[str, Any]:
    """Build one MCTS tree per task instance into a resumable JSONL file (one tree a line).

    Args:
        out: output JSONL of trees.
        envs: env specs (default ``[babyai:GoToRedBall?max_steps=24]``).
        episodes: trees per spec.
        simulations, k, c, max_depth, commit: see :class:`~agentrm.targets.mcts.MCTSConfig`
            (``commit``: search while acting, ``simulations`` per committed step; ``parallel``:
            simulations in flight per tree, their policy calls batched, see :mod:`agentrm.targets.mcts_parallel`).
        policy: ``expert`` (each environment's expert with ``error_rate``) or the path of an
            exported SFT policy (HF causal LM dir, sampled with ``temperature``).
        seed: base seed.
        workers: worker processes; backend ``local`` (spawned) or ``ray`` (``ray_address``).
        overwrite: start from scratch instead of resuming.
        limit: stop after this many new trees (rerun to continue).
        flat_out: also write :func:`~agentrm.targets.mcts.flatten_tree` records of all trees to this JSONL.
        min_visits: with ``flat_out``, nodes visited fewer times are not targets.
        progress: show a progress bar.
        device, dtype, quantization, attn_implementation: how an LM ``policy`` is loaded (default:
            CUDA in bf16 when available, else CPU in fp32; ``nf4``/``int8`` need CUDA and bitsandbytes;
            see :mod:`agentrm.models.placement`); checked before anything is built.

    Returns:
        ``trees``, ``nodes``, ``env_steps``, ``simulations``, ``seconds`` (this run) and
        with ``flat_out``: ``records``, ``states_visited`` (non-root nodes with a visit) and
        ``states_kept`` (the labelled states left after the ``min_visits`` filter).
    """
    specs = parse_specs(envs or ["babyai:GoToRedBall?max_steps=24"])
    check_specs(specs)
    if simulations < 1 or k < 1 or max_depth < 1 or parallel < 1:
        raise ValueError("need simulations >= 1, k >= 1, max_depth >= 1, parallel >= 1")
    load = dict(device=device, dtype=dtype, quantization=quantization, attn_implementation=attn_implementation)
    if policy not in ("expert", "scripted"):
        from agentrm.models.placement import resolve_placement
        from agentrm.paths import resolve_path

        with building():
            resolve_placement(**load, what="trees")
            try:
                policy = str(resolve_path(policy))
            except FileNotFoundError as e:
                raise FileNotFoundError(f"trees.policy: {e}") from None
    elif any(v is not None for k, v in load.items() if k != "attn_implementation"):
        raise ValueError("device, dtype and quantization apply to an LM policy (a path), not policy='expert'")
    settings = TreeSettings(simulations, k, c, max_depth, policy, error_rate, temperature, seed, **load, commit=commit,
                            parallel=parallel)
    jobs = plan_jobs(specs, episodes)
    path = Path(out)
    t0 = time.perf_counter()
    run_resumable(
        path,
        jobs,
        functools.partial(run_tree_job, settings=settings),
        functools.partial(_check_tree, path, jobs, settings),
        overwrite=overwrite,
        limit=limit,
        workers=make_pool(workers, backend, ray_address),
        progress=progress,
        desc="trees",
        unit="tree",
    )
    trees = read_trees(path)
    summary: dict[str, Any] = {
        "trees": len(trees),
        "nodes": sum(len(t.nodes) for t in trees),
        "env_steps": sum(int(t.stats.get("env_steps", 0)) for t in trees),
        "simulations": sum(int(t.stats.get("simulations", 0)) for t in trees),
        "seconds": time.perf_counter() - t0,
    }
    if flat_out:
        from agentrm.data.schema import write_jsonl

        records = [r for t in trees for r in flatten_tree(t, min_visits=min_visits)]
        summary["records"] = write_jsonl(flat_out, records)
        # the low-visit filter: visited states (non-root nodes) and those kept as targets
        summary["states_visited"] = sum(1 for t in trees for nd in t.nodes[1:] if nd.n >= 1)
        summary["states_kept"] = sum(1 for r in records for s in r.steps if s.value is not None)
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m agentrm.trees --help``."""
    from jsonargparse import auto_cli

    summary = run_cli("agentrm.trees", lambda a: auto_cli(build_trees, args=a), argv)
    print(", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
    return summary


if __name__ == "__main__":
    main()
