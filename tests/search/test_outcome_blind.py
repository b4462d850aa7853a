"""The outcome-blindness canary, through the real evaluation CLI path.

The ``canary`` environment (:mod:`tests.search.canary_env`) puts a unique token in every reply that ends an
episode and nowhere else. The evaluation command (``agentrm.search``'s ``main``, as ``python -m agentrm.search``
runs it: YAML config, specs built into real scorers, :class:`~agentrm.search.runner.SharedScorer`, two
episodes at once, then a resume) runs Best-of-N and beam search with a value RM, an implicit PRM and a local
LLM judge, and with a remote scorer (``kind: remote``: the value RM behind a real ``python -m agentrm.serve``
process). Recorded: every argument handed to a scorer's scoring methods, every string handed to a tokenizer
(everything any of these models reads) and every request body a remote scorer sends (everything the served
model reads). With the scorers outcome-blind (the default) the token
must never be seen; with ``outcome_blind: false`` the same config must see it, for every scorer kind and
both methods, so the test can fail.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch
import yaml

from agentrm.judge import JudgeScorer
from agentrm.models.backbone import build_backbone
from agentrm.models.implicit_prm import ImplicitPRM
from agentrm.models.value_rm import ValueRewardModel
from agentrm.paths import load_tokenizer
from agentrm.scoring import ImplicitPRMScorer, ValueRMScorer
from agentrm.scoring.remote import RemoteScorer
from agentrm.search.evaluate import main
from tests.lit.conftest import TINY_BACKBONE
from tests.search.canary_env import TOKEN, register_canary
from tests.serve.server_proc import KEY, KEY_ENV, ServerProcess

TOKENIZER = "agentrm/assets/tiny_tokenizer"
SPECS = {"held_in": ["canary:corridor?max_steps=5"], "held_out": ["canary:hall?max_steps=4"]}
BACKBONE = {**TINY_BACKBONE, "max_position_embeddings": 2048}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """Exported tiny (random) value RM and implicit PRM, and a tiny causal LM as a local judge."""
    register_canary()
    root = tmp_path_factory.mktemp("canary_models")
    tok = load_tokenizer(TOKENIZER)
    torch.manual_seed(0)
    rm = ValueRewardModel(build_backbone(config=BACKBONE, vocab_size=len(tok)))
    prm = ImplicitPRM(build_backbone(config=BACKBONE, vocab_size=len(tok), causal_lm=True))
    judge = build_backbone(config=BACKBONE, vocab_size=len(tok), causal_lm=True)
    judge.save_pretrained(root / "judge")
    tok.save_pretrained(root / "judge")
    return {
        "value_rm": str(rm.save_pretrained(root / "rm", tokenizer=tok)),
        "implicit_prm": str(prm.save_pretrained(root / "prm", tokenizer=tok)),
        "judge": str(root / "judge"),
    }


@pytest.fixture(scope="module")
def served(models, tmp_path_factory):
    """The value RM behind a real server process; the remote scorer's key in the environment."""
    with pytest.MonkeyPatch.context() as mp, \
            ServerProcess(models["value_rm"], log=tmp_path_factory.mktemp("served") / "server.log") as server:
        mp.setenv(KEY_ENV, KEY)
        yield server.url


def _scorer(kind: str, models: dict[str, str], blind: bool | None, url: str | None = None) -> dict:
    spec = {"kind": kind, "name": kind}
    if kind == "remote":
        spec.update(url=url, api_key_env=KEY_ENV)
    elif kind == "judge":
        spec.update(judge_model=models["judge"], judge_max_tokens=4)
    else:
        spec["path"] = models[kind]
    if blind is not None:
        spec["outcome_blind"] = blind
    return spec


def _run(tmp_path, name: str, scorers: list[dict], **extra) -> tuple:
    out = tmp_path / name
    cfg = {"out_dir": str(out), **SPECS, "episodes": 2, "seed": 1000, "policy": {"kind": "expert", "error_rate": 0.5},
           "scorers": scorers, "best_of_n": [2], "beam": [[2, 2]], "progress": False, "show": False,
           "num_threads": 1, **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return main(["--config", str(path)]), out, path


@pytest.fixture
def sightings(monkeypatch) -> dict[str, list[str]]:
    """Where the canary token was seen: ``handed`` (in the arguments of a scorer's scoring method) and ``read``
    (in a text given to a tokenizer: ``__call__``, ``apply_chat_template``; what a model actually reads; or in a
    request a remote scorer sends: what the served model reads)."""
    seen: dict[str, list[str]] = {"handed": [], "read": []}
    lock = threading.Lock()
    import agentrm.scoring.remote as remote_module

    def sent(url, body, *args, _original=remote_module.post_json, **kwargs):
        if TOKEN in json.dumps(body):
            with lock:
                seen["read"].append(f"POST {url}: {json.dumps(body)[:300]}")
        return _original(url, body, *args, **kwargs)

    monkeypatch.setattr(remote_module, "post_json", sent)
    for cls in (ValueRMScorer, ImplicitPRMScorer, JudgeScorer, RemoteScorer):
        for name in ("score_candidates", "score_candidates_many", "score_trajectories"):
            original = getattr(cls, name, None)
            if original is None:
                continue

            def handed(self, *args, _original=original, **kwargs):
                if TOKEN in repr(args):
                    with lock:
                        seen["handed"].append(f"{type(self).__name__}: {args!r}"[:300])
                return _original(self, *args, **kwargs)

            monkeypatch.setattr(cls, name, handed)
    cls = type(load_tokenizer(TOKENIZER))
    for name in ("__call__", "apply_chat_template"):
        owner = next(c for c in cls.__mro__ if name in c.__dict__)
        original = owner.__dict__[name]

        def recording(self, first=None, *args, _original=original, **kwargs):
            text = json.dumps(first, default=str) if not isinstance(first, str) else first
            if TOKEN in text:
                with lock:
                    seen["read"].append(text)
            return _original(self, first, *args, **kwargs)

        monkeypatch.setattr(owner, name, recording)
    return seen


def test_blind_scorers_never_see_what_a_finished_step_returned(tmp_path, models, served, sightings):
    kinds = ("value_rm", "implicit_prm", "judge", "remote")
    scorers = [_scorer(k, models, None, served) for k in kinds]  # the default: blind
    summary, out, cfg = _run(tmp_path, "blind", scorers, concurrency=2)
    assert sightings == {"handed": [], "read": []}
    rows = [json.loads(x) for x in (out / "episodes.jsonl").read_text().splitlines()]
    scored = {(r["method"], r["scorer"]) for r in rows if r.get("candidates_scored")}
    assert scored == {(m, k) for m in ("best_of_n", "beam") for k in kinds}
    ended = [r for r in rows if r["method"] in ("best_of_n", "beam")]
    assert ended and all(r["steps"] >= 1 for r in ended)
    # the random tiny judge seldom writes a number in 4 tokens: most candidates it scored come out nan (ranked
    # last) and are counted unscored, in the rows and as a share in the summary; the RMs score every candidate
    for r in ended:
        assert 0 <= r["unscored"] <= r["candidates_scored"] and (r["scorer"] == "judge" or r["unscored"] == 0), r
    by_group = {}
    for r in ended:
        got = by_group.setdefault((r["env_set"], r["method"], r["scorer"]), [0, 0])
        got[0], got[1] = got[0] + r["unscored"], got[1] + r["candidates_scored"]
    assert all(u > scored / 2 for (_, _, k), (u, scored) in by_group.items() if k == "judge")
    assert {(r["env_set"], r["method"], r["scorer"]): r["unscored"] for r in summary
            if r["method"] in ("best_of_n", "beam")} == {
        key: pytest.approx(u / scored) for key, (u, scored) in by_group.items()}
    # a killed run resumes: drop the last episode's rows, rerun the same config, nothing seen either
    last = (rows[-1]["env_set"], rows[-1]["env"], rows[-1]["episode"])
    kept = [r for r in rows if (r["env_set"], r["env"], r["episode"]) != last]
    (out / "episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    resumed = main(["--config", str(cfg)])
    assert sightings == {"handed": [], "read": []}
    assert len((out / "episodes.jsonl").read_text().splitlines()) == len(rows)
    # results are equal; work counters may differ (the prefix cache is shared across episodes, so its hits
    # depend on which episodes ran before)
    keys = ("method", "scorer", "n", "w", "k", "env_set", "episodes", "success_rate", "avg_reward", "candidates_scored")
    assert [{k: r[k] for k in keys} for r in resumed] == [{k: r[k] for k in keys} for r in summary]


@pytest.mark.parametrize("kind", ["value_rm", "implicit_prm", "judge", "remote"])
@pytest.mark.parametrize("method", ["best_of_n", "beam"])
def test_the_same_run_reading_the_outcome_sees_the_canary(tmp_path, models, sightings, kind, method, request):
    """The control: with ``outcome_blind: false`` each scorer kind is handed the token in each method, and its
    model reads it (but the implicit PRM in beam search: it scores a candidate's action tokens only, so no
    candidate's reply ever reaches its model, blind or not)."""
    only = {"best_of_n": [2], "beam": []} if method == "best_of_n" else {"best_of_n": [], "beam": [[2, 2]]}
    url = request.getfixturevalue("served") if kind == "remote" else None
    _run(tmp_path, f"{kind}_{method}", [_scorer(kind, models, False, url)], greedy=False, **only)
    assert sightings["handed"], f"{kind} in {method} was never handed an episode-ending reply: the canary cannot fail"
    assert bool(sightings["read"]) != (kind == "implicit_prm" and method == "beam")
