"""MCTS trees: UCT selection, backed-up values and visit counts, dedup expansion, flattening, resumable builds."""

from __future__ import annotations

import copy
import math

import pytest

from agentrm.data.schema import read_jsonl
from agentrm.search.specs import PolicySpec
from agentrm.targets.mcts import (
    MCTS,
    MCTSConfig,
    Node,
    Tree,
    flatten_tree,
    read_trees,
    select_child,
    uct_score,
)
from agentrm.trees import TreesConfig
from agentrm.trees import build_trees as run_trees


def build_trees(error_rate: float = 0.3, **fields):
    """The Python API: one :class:`TreesConfig` (the expert policy with ``error_rate``)."""
    return run_trees(TreesConfig(policy=PolicySpec(kind="expert", error_rate=error_rate), **fields))


class ChainEnv:
    """Depth-``D`` binary game: reward 1 iff the first action is ``a`` (and 0.5 if also the second is)."""

    live = 0  # environments built (or cloned) and not closed yet, across instances

    def __init__(self, depth: int = 3):
        self.depth, self.actions, self.closed = depth, [], False
        ChainEnv.live += 1

    instruction = "Pick letters."
    valid_actions = ["a", "b"]

    def reset(self, seed: int) -> str:
        self.actions = []
        return "start"

    def step(self, action: str):
        self.actions.append(action.strip().lower())
        done = len(self.actions) >= self.depth
        reward = 0.0
        if done:
            reward = 1.0 if self.actions[0] == "a" else (0.5 if self.actions[1:2] == ["a"] else 0.0)
        return f"seen {''.join(self.actions)}", reward, done, {"success": reward > 0}

    def clone(self):
        ChainEnv.live += 1
        return copy.deepcopy(self)

    def close(self):
        if not self.closed:
            self.closed = True
            ChainEnv.live -= 1


class ListPolicy:
    """Proposes a fixed list (cycled to ``k``); rollouts always take ``b``."""

    def __init__(self, proposals):
        self.proposals, self.calls = proposals, 0

    def propose(self, env, history, k=1):
        self.calls += 1
        if k == 1:
            return ["b"]
        return [self.proposals[i % len(self.proposals)] for i in range(k)]


def _tree(sims: int, k: int = 2, c: float = 1.0, depth: int = 3, proposals=("a", "b")) -> Tree:
    m = MCTS(ListPolicy(list(proposals)), MCTSConfig(simulations=sims, k=k, c=c, max_depth=10), seed=0)
    return m.search(ChainEnv(depth), 0, tree_id="T", task="chain")


def test_uct_picks_per_formula():
    nodes = [Node(None, -1, "r", n=10, w=5.0, expanded=True, children=[1, 2, 3])]
    nodes += [Node("x", 0, "", n=6, w=4.2), Node("y", 0, "", n=3, w=1.2), Node("z", 0, "", n=1, w=0.0)]
    tree = Tree("t", "", "", 0, nodes)
    for c in (0.0, 0.5, 2.0):
        scores = [q + c * math.sqrt(math.log(10) / n) for q, n in ((0.7, 6), (0.4, 3), (0.0, 1))]
        assert select_child(tree, 0, c) == 1 + max(range(3), key=lambda i: scores[i])
        assert uct_score(10, 6, 0.7, c) == pytest.approx(scores[0])
    assert select_child(tree, 0, 0.0) == 1  # pure exploitation
    assert select_child(tree, 0, 2.0) == 3  # heavy exploration of the rarely visited child
    tree.nodes.append(Node("u", 0, ""))
    tree.nodes[0].children.append(4)
    assert select_child(tree, 0, 0.0) == 4  # unvisited first


def test_values_are_means_of_backed_up_rewards_and_counts_sum():
    tree = _tree(sims=30)
    root, nodes = tree.root, tree.nodes
    assert root.n == 30 and tree.stats["simulations"] == 30
    for i, nd in enumerate(nodes):
        if nd.expanded and nd.children:
            # a non-root node was evaluated once as a leaf (its first rollout) before its expansion
            own_n, own_w = (0, 0.0) if i == 0 else (1, nd.first)
            assert nd.n == own_n + sum(nodes[j].n for j in nd.children), i
            assert nd.w == pytest.approx(own_w + sum(nodes[j].w for j in nd.children)), i
        if nd.terminal:  # deterministic env: every visit backs up the node's own reward
            assert nd.w == pytest.approx(nd.n * nd.reward)
    a = next(j for j in root.children if nodes[j].action == "a")
    b = next(j for j in root.children if nodes[j].action == "b")
    assert nodes[a].q == pytest.approx(1.0)  # every path under `a` pays 1
    assert 0.0 < nodes[b].q < 1.0  # under `b` only `ba?` pays (0.5)
    assert root.q == pytest.approx(root.w / root.n)
    assert nodes[a].n > nodes[b].n  # the search concentrates on the better arm


def test_every_clone_is_closed():
    before = ChainEnv.live
    root = ChainEnv(3)
    MCTS(ListPolicy(["a", "b"]), MCTSConfig(20, 2, 1.0, 10)).search(root, 0)
    assert ChainEnv.live == before + 1  # only the caller's root env is still open
    root.close()


def test_expansion_deduplicates_candidates():
    tree = _tree(sims=3, k=4, proposals=("a", "A ", "a", "b"))
    assert [tree.nodes[j].action for j in tree.root.children] == ["a", "b"]


def test_flatten_gives_valued_records_with_shared_prefixes():
    tree = _tree(sims=25)
    recs = flatten_tree(tree)
    assert recs[0].id == "T-p0" and "branch_at" not in recs[0].meta
    assert all(r.meta["group"] == "T" for r in recs)
    labelled = [(r, t) for r in recs for t, s in enumerate(r.steps) if s.value is not None]
    visited = [i for i in range(1, len(tree.nodes)) if tree.nodes[i].n > 0]
    assert len(labelled) == len(visited)  # every visited node supervised exactly once
    main = recs[0]
    assert [s.action for s in main.steps] == ["a", "b", "b"] or main.steps[0].action == "a"
    assert main.steps[0].value == pytest.approx(1.0) and main.success
    for r in recs[1:]:
        t = r.meta["branch_at"]
        assert all(s.value is None for s in r.steps[:t]) and r.steps[t].value is not None
        # the prefix is a path some earlier record took, and the branch's step differs there
        others = [
            o
            for o in recs
            if o is not r and [s.action for s in o.steps[:t]] == [s.action for s in r.steps[:t]]
        ]
        assert others and any(len(o.steps) > t and o.steps[t].action != r.steps[t].action for o in others)
    again = Tree.from_dict(tree.to_dict())
    assert [(n.action, n.parent, n.n, n.children) for n in again.nodes] == [
        (n.action, n.parent, n.n, n.children) for n in tree.nodes
    ]


def test_replay_mode_matches_clone_mode():
    a = _tree(sims=12)
    m = MCTS(
        ListPolicy(["a", "b"]),
        MCTSConfig(12, 2, 1.0, 10, clone_mode="replay"),
        env_factory=lambda: ChainEnv(3),
    )
    b = m.search(ChainEnv(3), 0, tree_id="T", task="chain")
    assert [(n.action, n.n, n.w) for n in a.nodes] == [(n.action, n.n, n.w) for n in b.nodes]


def test_commit_mode_searches_from_each_committed_state_down_to_the_end():
    depth, sims = 6, 8
    m = MCTS(ListPolicy(["a", "b"]), MCTSConfig(simulations=sims, k=2, c=1.0, max_depth=10, commit=True), seed=0)
    tree = m.search(ChainEnv(depth), 0, tree_id="T", task="chain")
    nodes = tree.nodes
    # the committed path: most-visited child from the root down to a terminal node
    path, i = [], 0
    while nodes[i].children:
        i = max(nodes[i].children, key=lambda j: nodes[j].n)
        path.append(i)
    assert nodes[path[-1]].terminal and len(path) == depth
    assert tree.stats["committed_depth"] == depth and tree.stats["simulations"] == sims * depth
    # every committed state got its own budget: at least `sims` visits, and a visited sibling where one exists
    for j in path[:-1]:
        assert nodes[j].n >= sims, j
    # a root-only search with the same total budget stays shallow, so its deep states have few visits
    flat = _tree(sims=sims * depth, depth=depth)
    deepest = max(nd.depth for nd in flat.nodes if nd.n >= sims)
    assert deepest < depth - 1
    # statistics above the search root stay frozen after it moves on: the root saw only its own sims
    assert nodes[0].n == sims
    before = ChainEnv.live
    root = ChainEnv(depth)
    MCTS(ListPolicy(["a", "b"]), MCTSConfig(5, 2, 1.0, 10, commit=True)).search(root, 0)
    assert ChainEnv.live == before + 1  # clones closed in commit mode too
    root.close()


def test_min_visits_filter_is_reported(tmp_path):
    args = {**ARGS, "simulations": 10}
    a = build_trees(out=str(tmp_path / "a.jsonl"), flat_out=str(tmp_path / "fa.jsonl"), **args)
    b = build_trees(out=str(tmp_path / "b.jsonl"), flat_out=str(tmp_path / "fb.jsonl"), min_visits=3, **args)
    assert a["states_kept"] == a["states_visited"]  # min_visits 1: every visited state is a target
    assert b["states_visited"] == a["states_visited"] and 0 < b["states_kept"] < a["states_kept"]
    kept = [s for r in read_jsonl(tmp_path / "fb.jsonl") for s in r.steps if s.value is not None]
    assert len(kept) == b["states_kept"]
    c = build_trees(out=str(tmp_path / "c.jsonl"), commit=True, **args)
    assert c["env_steps"] > a["env_steps"]  # a budget per committed step
    with pytest.raises(ValueError, match="other arguments"):  # commit changes the trees: no silent resume
        build_trees(out=str(tmp_path / "a.jsonl"), commit=True, **args)


ARGS = dict(
    envs=["babyai:GoToRedBall?max_steps=12", "babyai:PickupLoc?max_steps=12"],
    episodes=2,
    simulations=6,
    k=2,
    error_rate=0.5,
    seed=3,
    progress=False,
)


def test_build_trees_resumes_to_identical_file(tmp_path):
    ref = tmp_path / "ref.jsonl"
    s = build_trees(out=str(ref), flat_out=str(tmp_path / "flat.jsonl"), **ARGS)
    assert s["trees"] == 4 and s["simulations"] == 24 and s["env_steps"] > 24 and s["records"] >= 4
    flat = read_jsonl(tmp_path / "flat.jsonl")
    assert {r.group for r in flat} == {t.id for t in read_trees(ref)}
    assert all(any(st.value is not None for st in r.steps) for r in flat)
    out = tmp_path / "o.jsonl"
    build_trees(out=str(out), limit=1, **ARGS)
    lines = ref.read_bytes().splitlines(keepends=True)
    assert out.read_bytes() == lines[0]
    out.write_bytes(lines[0] + lines[1][:50])  # killed mid-write
    build_trees(out=str(out), **ARGS)
    assert out.read_bytes() == ref.read_bytes()
    with pytest.raises(ValueError, match="other arguments"):
        build_trees(out=str(out), **{**ARGS, "simulations": 7})
    with pytest.raises(ValueError, match="other arguments"):  # parallel simulations give other trees
        build_trees(out=str(out), **{**ARGS, "parallel": 3})


def test_build_trees_with_parallel_simulations_resumes_to_identical_file(tmp_path):
    args = {**ARGS, "parallel": 3}
    ref = tmp_path / "ref.jsonl"
    s = build_trees(out=str(ref), **args)
    assert s["trees"] == 4 and s["simulations"] == 24
    assert all(t.meta["parallel"] == 3 for t in read_trees(ref))
    out = tmp_path / "o.jsonl"
    build_trees(out=str(out), limit=2, **args)
    build_trees(out=str(out), **args)
    assert out.read_bytes() == ref.read_bytes()


def test_flattened_siblings_feed_the_pairwise_loss(tiny_tokenizer):
    import torch

    from agentrm.data.collate import collate_trajectories
    from agentrm.data.tokenize import tokenize_trajectory
    from agentrm.lit.value_module import sibling_pair_loss

    recs = flatten_tree(_tree(sims=25))
    b = collate_trajectories(
        [tokenize_trajectory(tiny_tokenizer, r) for r in recs], tiny_tokenizer.pad_token_id
    )
    labeled = b["step_mask"] & ~torch.isnan(b["step_values"])
    good = torch.nan_to_num(b["step_values"]).clone().requires_grad_(True)  # predictions = targets
    bad = (-good).detach().requires_grad_(True)  # reversed order
    assert float(sibling_pair_loss(good, b, labeled)) < float(sibling_pair_loss(bad, b, labeled))
    sibling_pair_loss(bad, b, labeled).backward()
    assert bad.grad.abs().sum() > 0
    none = torch.zeros_like(good, requires_grad=True)
    single = b["step_parent"].clone()
    single[:] = torch.arange(single.numel()).view_as(single)  # no shared prefixes: no pairs
    assert float(sibling_pair_loss(none, {**b, "step_parent": single}, labeled)) == 0.0


def test_value_module_adds_the_pairwise_loss(tiny_tokenizer, tmp_path):
    import torch

    from agentrm.data.collate import collate_trajectories
    from agentrm.data.tokenize import tokenize_trajectory
    from agentrm.lit.value_module import ValueRMModule
    from tests.lit.conftest import TINY_BACKBONE

    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    recs = flatten_tree(_tree(sims=25))
    b = collate_trajectories(
        [tokenize_trajectory(tiny_tokenizer, r) for r in recs], tiny_tokenizer.pad_token_id
    )
    losses = []
    for w in (0.0, 1.0):
        torch.manual_seed(0)
        m = ValueRMModule(str(tmp_path / "tok"), backbone_config=TINY_BACKBONE, pairwise_weight=w)
        m.log = lambda *a, **k: None
        losses.append(float(m.training_step(b, 0)))
    assert losses[1] > losses[0]  # same model and batch: the pairwise term is added


class BatchListPolicy(ListPolicy):
    """ListPolicy with ``propose_many``: records how many requests arrive together."""

    def __init__(self, proposals):
        super().__init__(proposals)
        self.batches = []

    def propose_many(self, requests):
        self.batches.append(len(requests))
        return [self.propose(env, h, k) for env, h, k in requests]


@pytest.mark.parametrize("commit", [False, True])
def test_parallel_simulations_batch_policy_calls_and_keep_the_statistics(commit):
    """parallel=4: simulations in flight together (virtual loss), expansions and rollouts in batched calls;
    the counts still sum, values are means of backed-up rewards, the better arm wins, all clones close."""
    before = ChainEnv.live
    trees = []
    for _ in range(2):
        pol = BatchListPolicy(["a", "b"])
        cfg = MCTSConfig(simulations=24, k=2, c=1.0, max_depth=10, commit=commit, parallel=4)
        root = ChainEnv(4)
        trees.append(MCTS(pol, cfg).search(root, 0, tree_id="T", task="chain"))
        root.close()
        assert max(pol.batches) > 1  # several requests per policy call
    assert ChainEnv.live == before
    tree = trees[0]
    assert tree.to_dict() == trees[1].to_dict()  # deterministic
    nodes = tree.nodes
    assert tree.stats["env_steps"] > 0
    if commit:  # searched from each committed state to the end (statistics above the search root frozen)
        assert nodes[0].n == 24 and tree.stats["simulations"] == 24 * tree.stats["committed_depth"] == 24 * 4
    else:
        assert nodes[0].n == 24 and tree.stats["simulations"] == 24
    for i, nd in enumerate(nodes):
        if nd.expanded and nd.children and not commit:
            # a node's own rollouts (1 sequentially; more when simulations of one batch shared the leaf)
            own = nd.n - sum(nodes[j].n for j in nd.children)
            assert (own == 0) if i == 0 else (1 <= own <= 4), i
            assert nd.w >= sum(nodes[j].w for j in nd.children) - 1e-9, i
        if nd.terminal:
            assert nd.w == pytest.approx(nd.n * nd.reward)
    a = next(j for j in nodes[0].children if nodes[j].action == "a")
    b = next(j for j in nodes[0].children if nodes[j].action == "b")
    assert nodes[a].q == pytest.approx(1.0) and nodes[a].n > nodes[b].n


def test_parallel_must_be_positive():
    with pytest.raises(ValueError, match="parallel"):
        MCTSConfig(parallel=0)


@pytest.mark.parametrize("fail_k", [1, 2])  # a rollout step fails / an expansion fails
def test_parallel_simulations_close_their_envs_when_the_policy_fails(fail_k):
    class Failing(BatchListPolicy):
        def propose_many(self, requests):
            if any(k == fail_k for _, _, k in requests):
                raise RuntimeError("server gone")
            return super().propose_many(requests)

    before = ChainEnv.live
    root = ChainEnv(4)
    with pytest.raises(RuntimeError, match="server gone"):
        MCTS(Failing(["a", "b"]), MCTSConfig(simulations=8, k=2, parallel=4)).search(root, 0)
    root.close()
    assert ChainEnv.live == before
