"""Monte-Carlo tree search over a policy: step values (explicit RM targets) from a search tree.

One tree per task instance (environment seed).  Each *simulation*:

1. **selection** from the root by UCT, ``Q(child) + c * sqrt(ln N(parent) / N(child))``
   (unvisited children first, in creation order), stepping a clone of the root env along
   the chosen actions;
2. **expansion** of the reached leaf (non-terminal, depth ``< max_depth``, already visited
   once, or the root): ``k`` candidate actions are sampled from the policy, deduplicated
   (by the env's canonical action when it has one), and each becomes a child whose
   observation comes from stepping a clone;
3. **evaluation** by one rollout of ``rollout_policy`` to a terminal state from the reached
   leaf, or after an expansion from its first new child (a terminal node's reward is used as is);
4. **backpropagation** of the final reward to every node on the path: ``N += 1, W += r``.

A node's value is ``Q = W / N``, the mean final reward of the rollouts through it.

Nodes are compact: action text, parent index, child indices, ``N``, ``W``, the
observation reached (text, only at the node), the env reward, terminal/success flags and
the outcome of the node's first rollout.  Env states are not stored: each simulation
clones the root env (or, with ``clone_mode="replay"``, rebuilds it from the seed) and
re-applies the path's actions, so memory grows only with the node records.

Trees are written one per line (``python -m agentrm.targets.mcts``, resumable like the
collector); :func:`flatten_tree` turns a tree into trajectory records whose steps carry
``Q`` as ``value``, so the value RM trains on them unchanged.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from agentrm.data.schema import Step, Trajectory
from agentrm.envs.base import Env, replay
from agentrm.policies.base import Policy

MAX_ROLLOUT_STEPS = 10_000


@dataclass(slots=True)
class Node:
    """One tree node: the state reached by ``action`` from node ``parent`` (root: action None, parent -1)."""

    action: str | None
    parent: int
    obs: str
    reward: float = 0.0
    terminal: bool = False
    success: bool = False
    depth: int = 0
    n: int = 0
    w: float = 0.0
    first: float | None = None
    """Final reward of the first rollout through this node (its simulated outcome)."""
    children: list[int] = field(default_factory=list)
    expanded: bool = False

    @property
    def q(self) -> float:
        """Mean backed-up reward (0 for an unvisited node)."""
        return self.w / self.n if self.n else 0.0


@dataclass
class Tree:
    """A search tree for one task instance, with the counts of work spent on it."""

    id: str
    task: str
    instruction: str
    seed: int
    nodes: list[Node]
    meta: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def root(self) -> Node:
        return self.nodes[0]

    def path(self, i: int) -> list[int]:
        """Node indices from the root's first child down to node ``i`` (empty for the root)."""
        out = []
        while i > 0:
            out.append(i)
            i = self.nodes[i].parent
        return out[::-1]

    def history(self, i: int) -> Trajectory:
        """The episode up to node ``i`` as a partial trajectory (for policies)."""
        steps = [Step(self.nodes[j].action or "", self.nodes[j].obs) for j in self.path(i)]
        return Trajectory(
            id=self.id, task=self.task, instruction=self.instruction, steps=steps, reward=0.0, success=False
        )

    # ------------------------------------------------------------------ persistence
    def to_dict(self, digits: int = 4) -> dict[str, Any]:
        """Columnar JSON: one list per node field (children are implied by ``parent``)."""
        ns = self.nodes
        return {
            "id": self.id,
            "task": self.task,
            "instruction": self.instruction,
            "seed": self.seed,
            "nodes": {
                "action": [n.action for n in ns],
                "parent": [n.parent for n in ns],
                "obs": [n.obs for n in ns],
                "reward": [round(n.reward, digits) for n in ns],
                "terminal": [int(n.terminal) for n in ns],
                "success": [int(n.success) for n in ns],
                "n": [n.n for n in ns],
                "w": [round(n.w, digits) for n in ns],
                "first": [None if n.first is None else round(n.first, digits) for n in ns],
                "expanded": [int(n.expanded) for n in ns],
            },
            "meta": self.meta,
            "stats": self.stats,
        }

    @classmethod
    def from_dict(cls, rec: dict[str, Any]) -> Tree:
        c = rec["nodes"]
        nodes: list[Node] = []
        for i, parent in enumerate(c["parent"]):
            depth = 0 if parent < 0 else nodes[parent].depth + 1
            nodes.append(
                Node(
                    c["action"][i],
                    parent,
                    c["obs"][i],
                    float(c["reward"][i]),
                    bool(c["terminal"][i]),
                    bool(c["success"][i]),
                    depth,
                    int(c["n"][i]),
                    float(c["w"][i]),
                    c["first"][i],
                    [],
                    bool(c["expanded"][i]),
                )
            )
            if parent >= 0:
                nodes[parent].children.append(i)
        return cls(
            rec["id"],
            rec["task"],
            rec["instruction"],
            int(rec["seed"]),
            nodes,
            rec.get("meta", {}),
            rec.get("stats", {}),
        )


def read_trees(path: str | os.PathLike) -> list[Tree]:
    """All trees of a JSONL file written by :func:`build_trees`."""
    with open(path, encoding="utf-8") as f:
        return [Tree.from_dict(json.loads(line)) for line in f if line.strip()]


# ---------------------------------------------------------------------- search
def uct_score(parent_n: int, child_n: int, child_q: float, c: float) -> float:
    """``Q + c * sqrt(ln N_parent / N_child)``; ``inf`` for an unvisited child."""
    if child_n == 0:
        return math.inf
    return child_q + c * math.sqrt(math.log(max(parent_n, 1)) / child_n)


def select_child(tree: Tree, i: int, c: float) -> int:
    """The child of node ``i`` with the highest UCT score (first one on ties)."""
    node = tree.nodes[i]
    best, best_score = -1, -math.inf
    for j in node.children:
        ch = tree.nodes[j]
        s = uct_score(node.n, ch.n, ch.q, c)
        if s > best_score:
            best, best_score = j, s
    return best


def _canonical(env: Env) -> Callable[[str], str]:
    """Dedup key for actions: the env's normaliser if it has one (BabyAI), else stripped lower-case text."""
    try:
        from agentrm.envs.babyai import BabyAITextEnv, normalize_action

        if isinstance(env, BabyAITextEnv):
            return lambda a: normalize_action(a) or a.strip().lower()
    except ImportError:  # pragma: no cover
        pass
    return lambda a: a.strip().lower()


@dataclass
class MCTSConfig:
    """Search budget and knobs.

    Attributes:
        simulations: simulations per root (tree).
        k: candidate actions sampled per expansion (before deduplication).
        c: UCT exploration constant.
        max_depth: nodes deeper than this are not expanded (their rollout still runs to the end).
        clone_mode: ``clone`` (``env.clone()``) or ``replay`` (reset a fresh env from ``env_factory``
            and re-apply the actions, for envs that cannot be copied).
    """

    simulations: int = 50
    k: int = 3
    c: float = 1.0
    max_depth: int = 24
    clone_mode: Literal["clone", "replay"] = "clone"


class MCTS:
    """Build search trees with ``policy`` (expansion) and ``rollout_policy`` (evaluation; default ``policy``).

    Args:
        env_factory: makes a fresh env (needed for ``clone_mode="replay"``).
        seed: seeds ``self.rng`` (for subclasses, e.g. random tie-breaking); the search itself
            is deterministic given the policies (ties go to the first child).
    """

    def __init__(
        self,
        policy: Policy,
        config: MCTSConfig | None = None,
        rollout_policy: Policy | None = None,
        env_factory: Callable[[], Env] | None = None,
        seed: int = 0,
    ):
        self.policy = policy
        self.rollout_policy = rollout_policy or policy
        self.config = config or MCTSConfig()
        self.env_factory = env_factory
        self.rng = random.Random(seed)
        if self.config.clone_mode == "replay" and env_factory is None:
            raise ValueError("clone_mode='replay' needs env_factory")

    def search(
        self, env: Env, seed: int, *, tree_id: str = "", task: str = "", meta: dict | None = None
    ) -> Tree:
        """Reset ``env`` with ``seed`` and run the configured number of simulations from its first state."""
        first = env.reset(seed)
        tree = Tree(
            tree_id, task, f"{env.instruction}\n{first}", seed, [Node(None, -1, first)], dict(meta or {})
        )
        self._steps = 0
        self._key = _canonical(env)
        for _ in range(self.config.simulations):
            self.simulate(tree, env)
        # deterministic work counts only (no wall time), so resumed files equal uninterrupted ones
        tree.stats = {
            "simulations": self.config.simulations,
            "nodes": len(tree.nodes),
            "env_steps": self._steps,
        }
        return tree

    def _root_env(self, env: Env, seed: int) -> Env:
        if self.config.clone_mode == "replay":
            return replay(self.env_factory, seed, [])
        return env.clone()

    def _step(self, env: Env, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        self._steps += 1
        return env.step(action)

    def simulate(self, tree: Tree, env: Env) -> float:
        """One selection-expansion-rollout-backup pass; returns the backed-up reward.

        ``env`` must be in the tree root's state; it is not modified.
        """
        cfg, nodes = self.config, tree.nodes
        sim = self._root_env(env, tree.seed)
        path, i = [0], 0
        while nodes[i].expanded and nodes[i].children:  # selection
            i = select_child(tree, i, cfg.c)
            self._step(sim, nodes[i].action)
            path.append(i)
        node = nodes[i]
        expandable = not node.terminal and not node.expanded and node.depth < cfg.max_depth
        if expandable and (node.n > 0 or i == 0):  # expansion (a new child is first rolled out from)
            child_envs = self.expand(tree, i, sim)
            if node.children:
                j = node.children[0]  # first (unvisited) child: UCT order
                sim = child_envs[j]
                path.append(j)
                i, node = j, nodes[j]
        if node.terminal:  # evaluation
            reward = node.reward
        else:
            reward = self._rollout(sim, tree.history(i))
        if node.first is None:
            node.first = reward
        for j in path:  # backpropagation
            nodes[j].n += 1
            nodes[j].w += reward
        return reward

    def expand(self, tree: Tree, i: int, env: Env) -> dict[int, Env]:
        """Create the children of node ``i`` (deduplicated policy samples); return their envs by node index."""
        node = tree.nodes[i]
        node.expanded = True
        seen: set[str] = set()
        out: dict[int, Env] = {}
        for action in self.policy.propose(env, tree.history(i), self.config.k):
            key = self._key(action)
            if key in seen:
                continue
            seen.add(key)
            child_env = (
                env.clone()
                if self.config.clone_mode == "clone"
                else replay(self.env_factory, tree.seed, [tree.nodes[j].action for j in tree.path(i)])
            )
            obs, reward, done, info = self._step(child_env, action)
            j = len(tree.nodes)
            tree.nodes.append(
                Node(
                    action,
                    i,
                    obs,
                    float(reward),
                    bool(done),
                    bool(info.get("success", False)),
                    node.depth + 1,
                )
            )
            node.children.append(j)
            out[j] = child_env
        return out

    def _rollout(self, env: Env, history: Trajectory) -> float:
        ctx = history
        for _ in range(MAX_ROLLOUT_STEPS):
            action = self.rollout_policy.propose(env, ctx, 1)[0]
            obs, reward, done, _ = self._step(env, action)
            if done:
                return float(reward)
            ctx.steps.append(Step(action, obs))
        raise RuntimeError(f"rollout did not end within {MAX_ROLLOUT_STEPS} steps")


# ---------------------------------------------------------------------- flattening
def flatten_tree(tree: Tree, min_visits: int = 1, label_prefix: bool = False) -> list[Trajectory]:
    """Trajectory records covering every visited node of ``tree`` once, with ``value = Q``.

    The main record follows the most-visited child from the root.  Every visited node not
    on an emitted record starts a *branch record*: the path to its parent (shared prefix),
    the node itself, then its most-visited continuation.  Siblings therefore share an
    identical prefix (the trainer's ``val/rank_acc`` pairs them), and ``meta.group`` is the
    tree id so a train/validation split keeps a tree together.

    A record's outcome is the last node's if it is terminal, otherwise the first rollout
    from it (``reward = first``, ``success = first > 0``): the simulated continuation.

    Args:
        min_visits: nodes with fewer visits are left out.
        label_prefix: also put values on a branch record's shared prefix steps (by default
            only the main record labels them, so each node is supervised once).
    """
    nodes = tree.nodes

    def visited_children(i: int) -> list[int]:
        kids = [j for j in nodes[i].children if nodes[j].n >= min_visits]
        return sorted(kids, key=lambda j: (-nodes[j].n, -nodes[j].q, j))

    def descend(i: int) -> list[int]:
        out = [i]
        while kids := visited_children(out[-1]):
            out.append(kids[0])
        return out

    records: list[Trajectory] = []
    emitted: set[int] = set()
    queue: list[tuple[list[int], int]] = []  # (prefix node path, first new node)
    first = visited_children(0)
    if first:
        queue.append(([], first[0]))
    while queue:
        prefix, start = queue.pop(0)
        chain = descend(start)
        path = prefix + chain
        emitted.update(chain)
        steps = []
        for pos, j in enumerate(path):
            labelled = pos >= len(prefix) or label_prefix
            steps.append(
                Step(nodes[j].action or "", nodes[j].obs, round(nodes[j].q, 4) if labelled else None)
            )
        last = nodes[path[-1]]
        if last.terminal:
            reward, success = last.reward, last.success
        else:
            reward = last.first if last.first is not None else last.q
            success = reward > 0
        branch = len(records) > 0
        meta = {**tree.meta, "group": tree.id, "tree_nodes": len(nodes)}
        if branch:
            meta["branch_at"] = len(prefix)
        records.append(
            Trajectory(
                f"{tree.id}-p{len(records)}",
                tree.task,
                tree.instruction,
                steps,
                float(reward),
                bool(success),
                meta,
            )
        )
        for pos in range(len(path)):  # siblings of every node on this record start new branches
            parent = path[pos - 1] if pos else 0
            for s in visited_children(parent):
                if s not in emitted:
                    emitted.add(s)
                    queue.append((path[:pos], s))
    return records


# ---------------------------------------------------------------------- resumable builder
@dataclass(frozen=True)
class TreeSettings:
    """Everything that determines the trees (stored in each tree's ``meta``)."""

    simulations: int
    k: int
    c: float
    max_depth: int
    max_steps: int | None
    policy: str
    error_rate: float
    temperature: float
    seed: int


_POLICY_CACHE: dict[str, Any] = {}
_ENV_CACHE: dict[tuple[str, int | None], Any] = {}


def _make_policy(s: TreeSettings, seed: int) -> Policy:
    """``scripted`` (noisy BabyAI bot) or a path to an exported HF causal LM (SFT policy)."""
    if s.policy == "scripted":
        from agentrm.policies.scripted import ScriptedBabyAIPolicy

        return ScriptedBabyAIPolicy(s.error_rate, seed=seed)
    if s.policy not in _POLICY_CACHE:  # load the LM once per process, fresh sampler state per tree
        from agentrm.lit.sft_module import load_sft_policy

        _POLICY_CACHE[s.policy] = load_sft_policy(s.policy)
    base = _POLICY_CACHE[s.policy]
    from agentrm.policies.hf import HFPolicy

    return HFPolicy(
        base.model, base.tokenizer, temperature=s.temperature, seed=seed, max_new_tokens=base.max_new_tokens
    )


def run_tree_job(job: Any, settings: TreeSettings) -> list[str]:
    """Build one tree (job = :class:`agentrm.data.collect.Job`); return it as a JSON line."""
    from agentrm.envs.babyai import BabyAITextEnv

    key = (job.level, settings.max_steps)
    if key not in _ENV_CACHE:
        _ENV_CACHE[key] = BabyAITextEnv(job.level, max_steps=settings.max_steps)
    env_seed, policy_seed, search_seed = job.seeds(settings.seed)
    cfg = MCTSConfig(settings.simulations, settings.k, settings.c, settings.max_depth)
    search = MCTS(_make_policy(settings, policy_seed), cfg, seed=search_seed)
    meta = {"level": job.level, "env_seed": env_seed, **_settings_meta(settings)}
    tree = search.search(
        _ENV_CACHE[key],
        env_seed,
        tree_id=job.episode_id(settings.seed),
        task=f"babyai/{job.level}",
        meta=meta,
    )
    return [json.dumps(tree.to_dict(), ensure_ascii=False)]


def _settings_meta(s: TreeSettings) -> dict[str, Any]:
    return {
        "simulations": s.simulations,
        "k": s.k,
        "c": s.c,
        "max_depth": s.max_depth,
        "max_steps": s.max_steps,
        "policy": s.policy,
        "error_rate": s.error_rate,
        "temperature": s.temperature,
    }


def _check_tree(path: Path, jobs: list, settings: TreeSettings, rec: dict, index: int) -> int:
    want = jobs[index].episode_id(settings.seed)
    expected = _settings_meta(settings)
    got = {k: rec.get("meta", {}).get(k) for k in expected}
    if rec.get("id") != want or got != expected:
        raise ValueError(
            f"{path} was written with other arguments (found {rec.get('id')!r} {got}, expected "
            f"{want!r} {expected}); pass --overwrite true or choose another --out"
        )
    return 0


def build_trees(
    out: str = "data/babyai_trees.jsonl",
    levels: list[str] | None = None,
    episodes: int = 10,
    simulations: int = 50,
    k: int = 3,
    c: float = 1.0,
    max_depth: int = 24,
    max_steps: int | None = 24,
    policy: str = "scripted",
    error_rate: float = 0.3,
    temperature: float = 1.0,
    seed: int = 0,
    workers: int = 1,
    overwrite: bool = False,
    limit: int | None = None,
    flat_out: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Build one MCTS tree per BabyAI task instance into a resumable JSONL file (one tree a line).

    Task instances are the collector's jobs (round-robin over ``levels``, seeds derived from
    ``(seed, level, index)``), so trees and collected trajectories of the same seed share episodes.

    Args:
        out: output JSONL of trees.
        levels: BabyAI level names (default [GoToRedBall]).
        episodes: trees per level.
        simulations, k, c, max_depth: see :class:`MCTSConfig`.
        max_steps: env step limit per episode.
        policy: ``scripted`` (noisy BabyAI bot with ``error_rate``) or the path of an exported
            SFT policy (HF causal LM dir, sampled with ``temperature``).
        seed: base seed.
        workers: worker processes.
        overwrite: start from scratch instead of resuming.
        limit: stop after this many new trees (rerun to continue).
        flat_out: also write :func:`flatten_tree` records of all trees to this JSONL.
        progress: show a progress bar.

    Returns:
        ``trees``, ``nodes``, ``env_steps``, ``simulations``, ``seconds`` (this run) and
        ``records`` (when ``flat_out`` is given).
    """
    from agentrm.data.collect import plan_jobs
    from agentrm.data.resumable import run_resumable
    from agentrm.envs.babyai import check_levels

    levels = list(levels or ["GoToRedBall"])
    check_levels(levels)
    if simulations < 1 or k < 1 or max_depth < 1:
        raise ValueError("need simulations >= 1, k >= 1, max_depth >= 1")
    if policy != "scripted":
        from agentrm.paths import resolve_path

        policy = str(resolve_path(policy))
    settings = TreeSettings(simulations, k, c, max_depth, max_steps, policy, error_rate, temperature, seed)
    jobs = plan_jobs(levels, episodes)
    path = Path(out)
    t0 = time.perf_counter()
    run_resumable(
        path,
        jobs,
        functools.partial(run_tree_job, settings=settings),
        functools.partial(_check_tree, path, jobs, settings),
        overwrite=overwrite,
        limit=limit,
        workers=workers,
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

        summary["records"] = write_jsonl(flat_out, (r for t in trees for r in flatten_tree(t)))
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m agentrm.targets.mcts --help``."""
    from jsonargparse import auto_cli

    summary = auto_cli(build_trees, args=argv)
    print(", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
    return summary


if __name__ == "__main__":
    main()
