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

Trees are written one per line by ``python -m agentrm.trees`` (resumable like the
collector); :func:`flatten_tree` turns a tree into trajectory records whose steps carry
``Q`` as ``value``, so the value RM trains on them unchanged.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from agentrm.checks import ConfigError
from agentrm.data.schema import Step, Trajectory
from agentrm.envs.base import Env, replay
from agentrm.policies.base import Policy
from agentrm.targets.mcts_parallel import simulate_parallel

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
    """Dedup key for actions: the env's ``canonical_action`` if it has one, else stripped lower-case text."""
    canonical = getattr(env, "canonical_action", None)
    if callable(canonical):
        return lambda a: canonical(a) or a.strip().lower()
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
        commit: ``False``: all ``simulations`` start at the root, so the tree covers the first few
            steps of the episode only (with 32 simulations and k=3 on BabyAI, depth ~5 of 10-24).
            ``True`` (search while acting, as AlphaZero self-play): after ``simulations``
            simulations from the current search root, commit to its most-visited child and run
            ``simulations`` more from there, until a terminal node or ``max_depth``; every state
            along the committed episode then gets a well-visited value and visited siblings.  The
            statistics of nodes above the search root are frozen when the root moves on.
        parallel: simulations in flight at once per tree (virtual loss; expansions and rollouts batched
            through ``propose_many``, see :mod:`agentrm.targets.mcts_parallel`); ``1`` runs them one
            after another.
    """

    simulations: int = 50
    k: int = 3
    c: float = 1.0
    max_depth: int = 24
    clone_mode: Literal["clone", "replay"] = "clone"
    commit: bool = False
    parallel: int = 1

    def __post_init__(self) -> None:
        for name in ("simulations", "k", "max_depth", "parallel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: must be >= 1, got {value!r}")
        if isinstance(self.c, bool) or not isinstance(self.c, (int, float)) or self.c < 0:
            raise ConfigError(f"c: must be >= 0, got {self.c!r}")
        if self.clone_mode not in ("clone", "replay"):
            raise ConfigError(f"clone_mode: must be 'clone' or 'replay', got {self.clone_mode!r}")


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
        cfg, nodes = self.config, tree.nodes
        root, sims = 0, 0
        while True:
            done = 0
            while done < cfg.simulations:
                if cfg.parallel == 1:
                    self.simulate(tree, env, root)
                    done += 1
                else:
                    done += simulate_parallel(self, tree, env, root, min(cfg.parallel, cfg.simulations - done))
            sims += cfg.simulations
            if not cfg.commit or not nodes[root].children:
                break
            root = max(nodes[root].children, key=lambda j: (nodes[j].n, nodes[j].q, -j))  # most visited
            if nodes[root].terminal or nodes[root].depth >= cfg.max_depth:
                break
        # deterministic work counts only (no wall time), so resumed files equal uninterrupted ones
        tree.stats = {
            "simulations": sims,
            "nodes": len(tree.nodes),
            "env_steps": self._steps,
        }
        if cfg.commit:
            tree.stats["committed_depth"] = nodes[root].depth
        return tree

    def _root_env(self, env: Env, seed: int) -> Env:
        if self.config.clone_mode == "replay":
            return replay(self.env_factory, seed, [])
        return env.clone()

    def _step(self, env: Env, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        self._steps += 1
        return env.step(action)

    def simulate(self, tree: Tree, env: Env, start: int = 0) -> float:
        """One selection-expansion-rollout-backup pass from node ``start``; returns the backed-up reward.

        ``env`` must be in the tree root's state; it is not modified.  Backup stops at ``start``
        (the nodes above a committed search root keep their statistics).
        """
        cfg, nodes = self.config, tree.nodes
        sim = self._root_env(env, tree.seed)
        for j in tree.path(start):  # down to the search root
            self._step(sim, nodes[j].action)
        path, i = [start], start
        while nodes[i].expanded and nodes[i].children:  # selection
            i = select_child(tree, i, cfg.c)
            self._step(sim, nodes[i].action)
            path.append(i)
        node = nodes[i]
        expandable = not node.terminal and not node.expanded and node.depth < cfg.max_depth
        if expandable and (node.n > 0 or i == start):  # expansion (a new child is first rolled out from)
            child_envs = self.expand(tree, i, sim)
            if node.children:
                j = node.children[0]  # first (unvisited) child: UCT order
                sim.close()
                sim = child_envs.pop(j)
                path.append(j)
                i, node = j, nodes[j]
            for other in child_envs.values():
                other.close()
        try:
            if node.terminal:  # evaluation
                reward = node.reward
            else:
                reward = self._rollout(sim, tree.history(i))
        finally:
            sim.close()
        if node.first is None:
            node.first = reward
        for j in path:  # backpropagation
            nodes[j].n += 1
            nodes[j].w += reward
        return reward

    def expand(self, tree: Tree, i: int, env: Env) -> dict[int, Env]:
        """Create the children of node ``i`` (deduplicated policy samples); return their envs by node index."""
        return self.add_children(tree, i, env, self.policy.propose(env, tree.history(i), self.config.k))

    def add_children(self, tree: Tree, i: int, env: Env, actions: list[str]) -> dict[int, Env]:
        """Expand node ``i`` with ``actions`` (deduplicated), each stepped on a clone of ``env``."""
        node = tree.nodes[i]
        node.expanded = True
        seen: set[str] = set()
        out: dict[int, Env] = {}
        for action in actions:
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
