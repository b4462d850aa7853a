"""Several MCTS simulations of one tree in flight at once (virtual loss), with batched policy calls.

:meth:`agentrm.targets.mcts.MCTS.simulate` runs one simulation: one policy call per expansion and
one per rollout step, so a served or batched policy sees a single request at a time.
:func:`simulate_parallel` runs up to ``width`` simulations together:

1. **selection** of ``width`` leaves one after another; each selected path gets a *virtual loss*
   (``N += 1`` with reward 0 while pending), so later selections of the batch prefer other
   branches. A selection that reaches a leaf being expanded in this batch starts no simulation (it
   only adds its virtual loss; at most ``4 * width`` selections per batch); one that reaches a leaf
   another simulation rolls out from rolls out from it too, without expanding it (a node is expanded
   once, by the first simulation that finds it visited);
2. **expansion** of every leaf that needs it with one :func:`~agentrm.policies.base.propose_many`
   (``k`` candidates each); each simulation then continues from its leaf's first new child;
3. **evaluation**: the rollouts of all non-terminal leaves in lock-step
   (:func:`~agentrm.policies.rollout.rollout_many`: one ``propose_many`` per step);
4. **backup**: virtual losses removed, ``N += 1, W += r`` along each path.

Results are deterministic given the policies' seeds and ``width``, and do not depend on how many
requests a served policy keeps in flight; ``width = 1`` is the sequential search (the simulations
differ from ``simulate``'s only through the order of policy calls). Work counts (``env_steps``)
are exact.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from agentrm.envs.base import Env
from agentrm.policies.base import propose_many
from agentrm.policies.rollout import rollout_many

if TYPE_CHECKING:
    from agentrm.targets.mcts import MCTS, Tree


def _select(tree: Tree, i: int, c: float, virtual: dict[int, int]) -> int:
    """UCT child of node ``i`` counting pending simulations as visits with reward 0 (first on ties)."""
    node = tree.nodes[i]
    parent_n = node.n + virtual.get(i, 0)
    best, best_score = -1, -math.inf
    for j in node.children:
        ch = tree.nodes[j]
        n = ch.n + virtual.get(j, 0)
        s = math.inf if n == 0 else ch.w / n + c * math.sqrt(math.log(max(parent_n, 1)) / n)
        if s > best_score:
            best, best_score = j, s
    return best


def simulate_parallel(search: MCTS, tree: Tree, env: Env, start: int, width: int) -> int:
    """Run up to ``width`` simulations from node ``start`` together; return how many ran (>= 1).

    ``env`` must be in the tree root's state; it is not modified. Backup stops at ``start``.
    """
    cfg, nodes = search.config, tree.nodes
    virtual: dict[int, int] = {}
    sims: list[tuple[list[int], Env, bool]] = []  # (path, env at the path's end, expand the leaf)
    pending: set[int] = set()
    for _ in range(4 * width):  # selections; those that hit a leaf being expanded start no simulation
        if len(sims) == width:
            break
        path, i = [start], start
        while nodes[i].expanded and nodes[i].children:
            i = _select(tree, i, cfg.c, virtual)
            path.append(i)
        node = nodes[i]
        expandable = not node.terminal and not node.expanded and node.depth < cfg.max_depth
        expand = expandable and (node.n + virtual.get(i, 0) > 0 or i == start)
        if i in pending:  # being expanded by a simulation of this batch: its children exist only after it;
            for j in path:  # a virtual loss on the path steers the next selections elsewhere
                virtual[j] = virtual.get(j, 0) + 1
            continue
        if expand and any(p[-1] == i for p, _, _ in sims):
            expand = False  # another simulation of the batch rolls out from this leaf: one more rollout
        sim = search._root_env(env, tree.seed)
        for j in tree.path(start) + path[1:]:
            search._step(sim, nodes[j].action)
        sims.append((path, sim, expand))
        if expand:
            pending.add(i)
        for j in path:
            virtual[j] = virtual.get(j, 0) + 1
    rewards: list[float] = [0.0] * len(sims)
    try:
        _expand_and_evaluate(search, tree, sims, rewards)
    finally:  # every simulation's env is closed, also when a policy call fails
        for _, sim, _ in sims:
            sim.close()
    for (path, _, _), reward in zip(sims, rewards):  # backup
        leaf = nodes[path[-1]]
        if leaf.first is None:
            leaf.first = reward
        for j in path:
            nodes[j].n += 1
            nodes[j].w += reward
    return len(sims)


def _expand_and_evaluate(search: MCTS, tree: Tree, sims: list[tuple[list[int], Env, bool]], rewards: list[float]) -> None:
    """Expand the leaves marked for it (one batched policy call), then fill ``rewards``: a terminal leaf's
    reward, or the outcome of a lock-step rollout. ``sims`` is updated in place (paths extended to the
    first new child, whose env replaces the leaf's)."""
    cfg, nodes = search.config, tree.nodes
    to_expand = [s for s in range(len(sims)) if sims[s][2]]
    if to_expand:
        proposals = propose_many(
            search.policy, [(sims[s][1], tree.history(sims[s][0][-1]), cfg.k) for s in to_expand]
        )
        for s, actions in zip(to_expand, proposals):
            path, sim, _ = sims[s]
            child_envs = search.add_children(tree, path[-1], sim, actions)
            if nodes[path[-1]].children:
                j = nodes[path[-1]].children[0]
                sim.close()
                sim = child_envs.pop(j)
                path.append(j)
            for other in child_envs.values():
                other.close()
            sims[s] = (path, sim, False)
    live = []
    for s, (path, _, _) in enumerate(sims):
        if nodes[path[-1]].terminal:
            rewards[s] = nodes[path[-1]].reward
        else:
            live.append(s)
    if live:
        rolls = rollout_many(
            [sims[s][1] for s in live], search.rollout_policy, [tree.history(sims[s][0][-1]) for s in live]
        )
        for s, r in zip(live, rolls):
            rewards[s] = r.reward
            search._steps += len(r.steps)
