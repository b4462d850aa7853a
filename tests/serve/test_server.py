"""``python -m agentrm.serve`` as a real process: answers equal the in-process scorer's; every bad request is a
one-line 4xx naming its field; concurrent clients mixing good and bad requests never crash it; overload is
answered 503 with Retry-After."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from agentrm.data.schema import Step, Trajectory
from agentrm.models.fingerprint import model_fingerprint
from agentrm.search.build import build_scorer
from agentrm.search.specs import ScorerSpec

INSTR = "Mission: go to the red ball. You see a wall 2 steps ahead."
PREFIX = Trajectory("p", "t", INSTR, [Step("turn left", "You see a red ball 3 steps ahead.")], 0.0, False)
CANDS = [Step("move forward", "Red ball 2 ahead."), Step("turn right", "A wall ahead."),
         Step("pick up ball", "", withheld=True), Step("déjà vu ☃ 中文", "Unicode reply ✓.")]
TRAJS = [PREFIX, Trajectory("q", "t", INSTR, [], 0.0, False),
         Trajectory("r", "t", INSTR, [Step("move forward", "ok"), Step("done", "", withheld=True)], 0.0, False)]


def wire(t: Trajectory) -> dict:
    from agentrm.scoring.remote import trajectory_json

    return trajectory_json(t)


def cand_wire(c) -> dict:
    from agentrm.scoring.remote import candidate_json

    return candidate_json(c)


@pytest.fixture(scope="module")
def local_rm(tiny_models):
    return build_scorer(ScorerSpec(path=tiny_models["value_rm"]))


def post(server, path: str, body, headers=None, **kw) -> httpx.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=data, headers=server.headers if headers is None else headers,
                      timeout=60, **kw)


def test_health_info_and_auth(rm_server, tiny_models):
    assert httpx.get(rm_server.url + "/health", headers=rm_server.headers).status_code == 200
    info = httpx.get(rm_server.url + "/info", headers=rm_server.headers).json()["model"]
    assert info["kind"] == "value_rm" and info["fingerprint"] == model_fingerprint(tiny_models["value_rm"])
    assert info["limits"]["max_candidates"] == 16 and info["outcome_blindness"]["server_withholds"] is False
    for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": rm_server.key}):
        for method, path in (("GET", "/info"), ("GET", "/health"), ("POST", "/v1/score/trajectories")):
            r = httpx.request(method, rm_server.url + path, headers=headers, json={"trajectories": [wire(PREFIX)]})
            assert r.status_code == 401, (headers, path, r.text)
            assert "Authorization: Bearer" in r.json()["detail"]


def test_scores_equal_the_in_process_scorer(rm_server, local_rm):
    r = post(rm_server, "/v1/score/trajectories", {"trajectories": [wire(t) for t in TRAJS], "return_steps": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["scores"] == pytest.approx(local_rm.score_trajectories(TRAJS).tolist(), abs=1e-6)
    steps = body["step_scores"]
    assert [len(s) for s in steps] == [1, 0, 2] and steps[2][1] is None  # a withheld last step: no value of its own
    assert steps[0][0] == pytest.approx(body["scores"][0], abs=1e-6)  # value RM "last" = the last step's value
    r = post(rm_server, "/v1/score/candidates",
             {"session": "eq-1", "items": [{"prefix": wire(PREFIX), "candidates": [cand_wire(c) for c in CANDS]},
                                           {"prefix": wire(TRAJS[1]), "candidates": [cand_wire(CANDS[0])]}]})
    assert r.status_code == 200, r.text
    want = local_rm.score_candidates_many([(PREFIX, CANDS), (TRAJS[1], CANDS[:1])])
    for got, exp in zip(r.json()["scores"], want):
        assert got == pytest.approx(exp.tolist(), abs=1e-6)
    assert r.json()["usage"]["candidates"] == 5 and r.json()["usage"]["forward_tokens"] > 0
    # the same session again: its prefixes are cached now, so fewer tokens are forwarded for the same scores
    again = post(rm_server, "/v1/score/candidates",
                 {"session": "eq-1", "items": [{"prefix": wire(PREFIX), "candidates": [cand_wire(c) for c in CANDS]}]})
    assert again.json()["scores"][0] == pytest.approx(want[0].tolist(), abs=1e-6)
    assert again.json()["usage"]["cached_tokens"] > 0
    closed = post(rm_server, "/v1/sessions/close", {"session": "eq-1"}).json()
    assert closed == {"session": "eq-1", "closed": True}


GOOD_CAND = {"items": [{"prefix": {"instruction": INSTR, "steps": []}, "candidates": [{"action": "a", "observation": "b"}]}]}
BAD = [  # (body, status, the field the one-line detail must name)
    (b"{not json", 400, "<body>: not JSON"),
    (b"\xff\xfe", 400, "<body>: not UTF-8"),
    ([1, 2], 422, "<body>: expected a JSON object"),
    ({"items": []}, 422, "items:"),
    ({"items": [{"prefix": {"instruction": INSTR}, "candidates": []}]}, 422, "items[0].candidates:"),
    ({"items": [{"prefix": {"instruction": 7}, "candidates": ["x"]}]}, 422, "items[0].prefix.instruction:"),
    ({"items": [{"prefix": {"instruction": INSTR, "steps": [{"action": "a"}]}, "candidates": ["x"]}]}, 422,
     "items[0].prefix.steps[0]: observation: required"),
    ({**GOOD_CAND, "model": "/etc/passwd"}, 422, "model: unknown field"),
    ({"items": [{"prefix": {"instruction": INSTR, "reward": 1.0}, "candidates": ["x"]}]}, 422,
     "items[0].prefix.reward: unknown field"),
    ({**GOOD_CAND, "session": "../../etc"}, 422, "session:"),
    ({"items": [{"prefix": {"instruction": INSTR}, "candidates": ["x"]}]}, 422, "candidate 0 is a bare action"),
    ({"items": [{"prefix": {"instruction": INSTR}, "candidates": [{"action": "a", "observation": "b"}] * 17}]}, 422,
     "max_candidates=16"),
    ({"items": [{"prefix": {"instruction": INSTR}, "candidates": [{"action": "a", "observation": "b"}]}] * 9}, 422,
     "max_items=8"),
    ({"items": [{"prefix": {"instruction": "word " * 2000}, "candidates": [{"action": "a", "observation": "b"}]}]},
     422, "items[0].candidates[0]: prefix and candidate are"),
    ({"items": [{"prefix": {"instruction": "x" * 70000}, "candidates": ["a"]}]}, 413, "max_request_bytes=65536"),
    ('{"items": [{"prefix": {"instruction": "\\ud800"}, "candidates": ["a"]}]}', 422,
     "items[0].prefix.instruction: Value error, not valid unicode"),
    ({"items": [{"prefix": {"instruction": INSTR, "steps": [{"action": "a", "observation": "b", "withheld": True}]},
                 "candidates": ["x"]}]}, 422, "a withheld step carries no observation"),
]


@pytest.mark.parametrize("body,status,field", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_requests_are_one_line_4xx_naming_the_field(rm_server, body, status, field):
    r = post(rm_server, "/v1/score/candidates", body)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert field.removeprefix("items[0].prefix.instruction: Value error, ") in detail and "\n" not in detail


def test_concurrent_clients_mixing_good_and_bad_requests(rm_server, local_rm):
    """8 clients x 12 requests: every good one answered with the in-process scores, every bad one refused,
    the server alive and healthy after."""
    good = [(PREFIX, CANDS[:k]) for k in (1, 2, 3, 4)] + [(TRAJS[1], CANDS[:2])]
    expected = [s.tolist() for s in local_rm.score_candidates_many(good)]
    traj_expected = local_rm.score_trajectories(TRAJS).tolist()
    failures: list[str] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        wrong = {"Authorization": "Bearer not-the-key-0123456789"}
        for i in range(12):
            kind = (c + i) % 6
            if kind in (0, 1, 2):
                j = (c * 7 + i) % len(good)
                body = {"items": [{"prefix": wire(good[j][0]), "candidates": [cand_wire(x) for x in good[j][1]]}]}
                if kind == 1:
                    body["session"] = f"client-{c}"
                r = post(rm_server, "/v1/score/candidates", body)
                ok = r.status_code == 200 and r.json()["scores"][0] == pytest.approx(expected[j], abs=1e-5)
            elif kind == 3:
                r = post(rm_server, "/v1/score/trajectories", {"trajectories": [wire(t) for t in TRAJS]})
                ok = r.status_code == 200 and r.json()["scores"] == pytest.approx(traj_expected, abs=1e-5)
            elif kind == 4:
                body, status, _ = BAD[(c + i) % len(BAD)]
                r = post(rm_server, "/v1/score/candidates", body)
                ok = r.status_code == status
            else:
                r = post(rm_server, "/v1/score/candidates", GOOD_CAND, headers=wrong)
                ok = r.status_code == 401
            if not ok:
                with lock:
                    failures.append(f"client {c} request {i} (kind {kind}): {r.status_code} {r.text[:200]}")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(client, range(8)))
    assert not failures, failures[:5]
    assert rm_server.proc.poll() is None
    assert httpx.get(rm_server.url + "/health", headers=rm_server.headers).status_code == 200


def test_overload_is_503_with_retry_after(rm_server, local_rm):
    """More simultaneous requests than max_queue=8: the excess is refused at once (503, Retry-After), the rest
    answered correctly."""
    big = {"items": [{"prefix": wire(PREFIX), "candidates": [cand_wire(c) for c in CANDS] * 4}]}
    want = local_rm.score_candidates(PREFIX, CANDS * 4).tolist()
    start = threading.Barrier(32)

    def one(_):
        start.wait()
        return post(rm_server, "/v1/score/candidates", big)

    with ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(one, range(32)))
    busy = [r for r in replies if r.status_code == 503]
    done = [r for r in replies if r.status_code == 200]
    assert len(busy) + len(done) == 32, [r.status_code for r in replies]
    assert busy, "32 simultaneous requests never exceeded max_queue=8"
    assert all(r.headers.get("Retry-After") == "1" and "max_queue=8" in r.json()["detail"] for r in busy)
    assert all(r.json()["scores"][0] == pytest.approx(want, abs=1e-5) for r in done)


def test_implicit_prm_step_rewards_and_candidates_equal_in_process(prm_server, tiny_models):
    local = build_scorer(ScorerSpec(kind="implicit_prm", path=tiny_models["implicit_prm"]))
    r = post(prm_server, "/v1/score/trajectories", {"trajectories": [wire(t) for t in TRAJS], "return_steps": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["scores"] == pytest.approx(local.score_trajectories(TRAJS).tolist(), abs=1e-6)
    assert [len(s) for s in body["step_scores"]] == [1, 0, 2] and None not in body["step_scores"][2]
    assert body["scores"][2] == pytest.approx(min(body["step_scores"][2]), abs=1e-6)  # the PRM's "min" aggregate
    cands = [*CANDS, "a bare action"]  # the implicit PRM scores action tokens: a bare action is fine
    r = post(prm_server, "/v1/score/candidates", {"items": [{"prefix": wire(PREFIX), "candidates": [cand_wire(c) for c in cands]}]})
    assert r.status_code == 200, r.text
    assert r.json()["scores"][0] == pytest.approx(local.score_candidates(PREFIX, cands).tolist(), abs=1e-6)
