"""The remote scorer (``kind: remote``) through the real evaluation command, against real server processes:
the same choices as the in-process scorer on the same episodes; a server killed mid-run fails the run in one
line, and after a restart the run resumes to the summary of an uninterrupted run; the recorded fingerprint is
the served model's, so a resume against a server now serving another model is refused."""

from __future__ import annotations

import csv
import json
import threading
import time

import pytest
import yaml

from agentrm.cli_errors import BuildError
from agentrm.search.evaluate import main
from tests.search.canary_env import register_canary
from tests.serve.conftest import LIMITS
from tests.serve.server_proc import KEY_ENV, ServerProcess, free_port

SPECS = {"held_in": ["canary:corridor?max_steps=5"], "held_out": ["canary:hall?max_steps=4"]}
RESULT_KEYS = ("method", "scorer", "n", "w", "k", "env_set", "episodes", "success_rate", "avg_reward",
               "candidates_scored")


def _config(tmp_path, name: str, scorers: list[dict], **extra):
    register_canary()
    cfg = {"out_dir": str(tmp_path / name), **SPECS, "episodes": 3, "seed": 1000, "num_threads": 1,
           "policy": {"kind": "expert", "error_rate": 0.5}, "scorers": scorers, "best_of_n": [2], "beam": [[2, 2]],
           "progress": False, "show": False, **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _rows(out) -> list[dict]:
    return [json.loads(x) for x in (out / "episodes.jsonl").read_text().splitlines()]


def _summary(out) -> list[dict]:
    with open(out / "summary.csv") as f:
        return [{k: r[k] for k in RESULT_KEYS} for r in csv.DictReader(f)]


def remote(server, name: str, **extra) -> dict:
    return {"kind": "remote", "name": name, "url": server.url, "api_key_env": KEY_ENV, **extra}


def test_remote_scorers_make_the_same_choices_as_in_process(tmp_path, tiny_models, rm_server, prm_server, api_key):
    scorers = [{"kind": "value_rm", "name": "rm", "path": tiny_models["value_rm"]}, remote(rm_server, "remote_rm"),
               {"kind": "implicit_prm", "name": "prm", "path": tiny_models["implicit_prm"]},
               remote(prm_server, "remote_prm")]
    cfg = _config(tmp_path, "same", scorers, concurrency=2)
    summary = main(["--config", str(cfg)])
    rows = _rows(tmp_path / "same")
    by = {(r["method"], r["scorer"], r["n"], r["w"], r["k"], r["env_set"], r["episode"]): r for r in rows}
    compared = 0
    for (method, scorer, *rest), r in by.items():
        if scorer not in ("rm", "prm"):
            continue
        twin = by[(method, f"remote_{scorer}", *rest)]
        assert (twin["actions"], twin["chosen"], twin["success"]) == (r["actions"], r["chosen"], r["success"])
        assert twin["scores"] == pytest.approx(r["scores"], abs=1e-4) if "scores" in r else True
        assert twin["candidates_scored"] == r["candidates_scored"]
        compared += 1
    assert compared == 2 * 2 * 6  # 2 scorers x (Best-of-2, beam) x 6 episodes
    remote_rows = [s for s in summary if str(s["scorer"]).startswith("remote_")]
    assert remote_rows and all(s["server_wait_s"] > 0 for s in remote_rows)
    assert all(s["server_wait_s"] == 0 for s in summary if s["scorer"] in ("rm", "prm"))
    # the server did the work and reported it: tokens per episode of the same order as in process
    for s in remote_rows:
        local = next(x for x in summary if x["scorer"] == s["scorer"].removeprefix("remote_") and
                     all(x[k] == s[k] for k in ("method", "n", "w", "k", "env_set")))
        assert 0 < s["tokens_scored"] <= 1.3 * local["tokens_scored"] + 1


def test_killed_server_fails_in_one_line_and_the_run_resumes_to_the_same_summary(tmp_path, tiny_models, api_key):
    port = free_port()
    server = ServerProcess(tiny_models["value_rm"], LIMITS, port=port, log=tmp_path / "server.log").start()
    try:
        spec = {"kind": "remote", "name": "remote_rm", "url": server.url, "api_key_env": KEY_ENV,
                "request_deadline_s": 6}
        many = {"episodes": 12}
        reference = main(["--config", str(_config(tmp_path, "reference", [spec], **many))])
        cfg = _config(tmp_path, "killed", [spec], **many)
        out = tmp_path / "killed"
        failure: list[BaseException] = []

        def run() -> None:
            try:
                main(["--config", str(cfg)])
            except BaseException as e:  # noqa: B036 (the thread reports whatever ended it)
                failure.append(e)

        t = threading.Thread(target=run)
        t.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not ((out / "episodes.jsonl").exists() and _rows(out)):
            time.sleep(0.02)
        server.kill()
        t.join(timeout=120)
        assert failure and isinstance(failure[0], BuildError), failure
        msg = str(failure[0])
        assert "\n" not in msg and server.url in msg and ("did not answer" in msg or "failed after" in msg), msg
        kept = {(r["env_set"], r["env"], r["episode"]) for r in _rows(out)}
        assert 1 <= len(kept) < 24, len(kept)
        # a call made while the server is down is retried (with backoff) until the restarted server answers it
        from agentrm.data.schema import Step, Trajectory
        from agentrm.scoring.remote import RemoteScorer
        from agentrm.search.build import build_scorer
        from agentrm.search.specs import ScorerSpec

        traj = Trajectory("t", "task", "Go to the red ball.", [Step("move forward", "A red ball ahead.")], 0.0, False)
        scorer = RemoteScorer(server.url, api_key, info={"limits": {}}, request_deadline_s=150)
        answer: list = []
        waiting = threading.Thread(target=lambda: answer.append(scorer.score_trajectories([traj])))
        waiting.start()
        time.sleep(1.0)
        server = ServerProcess(tiny_models["value_rm"], LIMITS, port=port, log=tmp_path / "server2.log").start()
        waiting.join(timeout=150)
        local = build_scorer(ScorerSpec(path=tiny_models["value_rm"])).score_trajectories([traj])
        assert answer and answer[0].tolist() == pytest.approx(local.tolist(), abs=1e-6)
        assert scorer.counters.server_wait_ms >= 1000  # it waited through the restart
        resumed = main(["--config", str(cfg)])
        assert kept <= {(r["env_set"], r["env"], r["episode"]) for r in _rows(out)}
        assert [{k: r[k] for k in RESULT_KEYS} for r in resumed] == [{k: r[k] for k in RESULT_KEYS} for r in reference]
        assert _summary(out) == _summary(tmp_path / "reference")
    finally:
        server.stop()


def test_the_fingerprint_is_the_served_models_and_a_changed_server_refuses_the_resume(
        tmp_path, tiny_models, rm_server, prm_server, api_key):
    from agentrm.models.fingerprint import model_fingerprint
    from agentrm.search.outputs import check_resumable
    from agentrm.search.resolve import resolve_scorer
    from agentrm.search.specs import ScorerSpec

    rm = resolve_scorer(ScorerSpec(kind="remote", url=rm_server.url, api_key_env=KEY_ENV))
    prm = resolve_scorer(ScorerSpec(kind="remote", url=prm_server.url, api_key_env=KEY_ENV))
    assert rm.fingerprint.startswith(model_fingerprint(tiny_models["value_rm"]) + " (value_rm, ")
    assert prm.fingerprint.startswith(model_fingerprint(tiny_models["implicit_prm"]) + " (implicit_prm, ")
    # what evaluate does on a rerun: the same configuration, the server behind the URL now serves another model
    from agentrm.search.evaluate import EvalConfig

    config = EvalConfig(out_dir=str(tmp_path / "out"), held_in=SPECS["held_in"],
                        scorers=[ScorerSpec(kind="remote", name="r", url=rm_server.url, api_key_env=KEY_ENV)])
    check_resumable(tmp_path / "out", config, {"policy": None, "scorers": {"r": rm.fingerprint}})
    (tmp_path / "out" / "episodes.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="holds episodes of other models"):
        check_resumable(tmp_path / "out", config, {"policy": None, "scorers": {"r": prm.fingerprint}})


def test_unset_key_variable_and_wrong_key_are_one_line_errors(tmp_path, rm_server, monkeypatch):
    from agentrm.search.resolve import resolve_scorer
    from agentrm.search.specs import ScorerSpec

    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=f"api_key_env: the environment variable {KEY_ENV} is not set"):
        resolve_scorer(ScorerSpec(kind="remote", url=rm_server.url, api_key_env=KEY_ENV), "scorers[0]")
    monkeypatch.setenv(KEY_ENV, "wrong-key-but-long-enough")
    with pytest.raises(RuntimeError, match="HTTP 401: the API key is missing or wrong"):
        resolve_scorer(ScorerSpec(kind="remote", url=rm_server.url, api_key_env=KEY_ENV))
