"""The evaluation harness resumes a killed run and does not depend on its concurrency."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import yaml

from agentrm.search.evaluate import main
from tests.search.test_evaluate import tiny_rm_dir  # noqa: F401  (fixture)
from tests.search.test_scorer_defaults import judge_dir  # noqa: F401  (fixture)

SPECS = {"held_in": ["babyai:GoToRedBall?max_steps=8"], "held_out": ["babyai:GoToRedBallGrey?max_steps=8"]}


def _config(tmp_path, name: str, rm_dir, **extra) -> tuple:
    out = tmp_path / name
    cfg = {
        "out_dir": str(out), **SPECS, "episodes": 6, "seed": 1000,
        "policy": {"kind": "expert", "error_rate": 0.5},
        "scorers": [{"kind": "value_rm", "path": str(rm_dir), "name": "rm"}, {"kind": "oracle"}],
        "best_of_n": [1, 2], "beam": [[2, 2]], "progress": False, "show": False, "num_threads": 1, **extra,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return out, path


def _table(summary: list[dict]) -> list[dict]:
    # wall time and cache evictions are not results (evictions depend on what the process scored before)
    return [{k: v for k, v in r.items() if k not in ("wall_s", "cache_evictions")} for r in summary]


def _episodes(out) -> set:
    rows = []
    for line in (out / "episodes.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return {(r["env"], r["episode"]) for r in rows}


def test_killed_run_resumes_to_the_uninterrupted_summary(tmp_path, tiny_rm_dir):  # noqa: F811
    whole_out, whole_cfg = _config(tmp_path, "whole", tiny_rm_dir)
    expect = _table(main(["--config", str(whole_cfg)]))
    out, cfg = _config(tmp_path, "killed", tiny_rm_dir)
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentrm.search", "--config", str(cfg)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "episodes.jsonl").exists() and len(_episodes(out)) >= 2:
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    done = _episodes(out)
    assert 2 <= len(done) < 12, f"the run was not killed mid-way ({len(done)} of 12 episodes done)"
    with open(out / "episodes.jsonl", "a") as f:  # a row cut off mid-write
        f.write('{"method": "greedy", "env": "babyai:GoToRedBallGrey?max_steps=8", "episo')
    resumed = _table(main(["--config", str(cfg)]))
    assert resumed == expect
    lines = (out / "episodes.jsonl").read_text().splitlines()
    assert len(lines) == len((whole_out / "episodes.jsonl").read_text().splitlines())
    assert all(json.loads(x) for x in lines)


def test_summary_does_not_depend_on_concurrency(tmp_path, tiny_rm_dir):  # noqa: F811
    _, one = _config(tmp_path, "one", tiny_rm_dir)
    _, three = _config(tmp_path, "three", tiny_rm_dir, concurrency=3)
    a, b = _table(main(["--config", str(one)])), _table(main(["--config", str(three)]))
    assert a == b and any(r["scoring_path"] == "cached" for r in a)


def test_resume_refuses_another_configuration(tmp_path, tiny_rm_dir):  # noqa: F811
    import pytest

    out, cfg = _config(tmp_path, "a", tiny_rm_dir, episodes=1, beam=[], best_of_n=[1])
    main(["--config", str(cfg)])
    other = yaml.safe_load(cfg.read_text()) | {"seed": 7}
    cfg.write_text(yaml.safe_dump(other))
    with pytest.raises(ValueError, match=r"another configuration \(seed: \d+ there, 7 now\)"):  # names what differs
        main(["--config", str(cfg)])
    main(["--config", str(cfg), "--resume", "false"])  # starts anew


def test_batched_hf_policy_summary_does_not_depend_on_concurrency(tmp_path):
    """HF policy with batch_requests: concurrently running episodes share generate calls (one batcher),
    each reply from its own seeded stream, so 1 or 3 episodes at once give the same results."""
    import torch

    from agentrm.models.backbone import build_backbone
    from agentrm.paths import load_tokenizer
    from agentrm.policies import batcher as batcher_mod
    from tests.lit.conftest import TINY_BACKBONE

    tok = load_tokenizer("agentrm/assets/tiny_tokenizer")
    torch.manual_seed(0)
    lm = build_backbone(config=TINY_BACKBONE, vocab_size=len(tok), causal_lm=True)
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    policy = {"kind": "hf", "model": str(tmp_path / "lm"), "temperature": 1.0, "max_new_tokens": 4,
              "batch_requests": True, "batch_size": 8}
    rows = []
    run = batcher_mod.GenerateBatcher._run
    batcher_mod.GenerateBatcher._run = lambda self, batch: (rows.append(len(batch)), run(self, batch))[1]
    try:
        tables = []
        for c in (1, 3):
            _, cfg = _config(tmp_path, f"c{c}", None, policy=policy, scorers=[{"kind": "oracle"}], episodes=3,
                             best_of_n=[2], beam=[[2, 2]], concurrency=c)
            tables.append(_table(main(["--config", str(cfg)])))
            if c == 1:
                assert max(rows) == 1  # one episode at a time: nothing to share
    finally:
        batcher_mod.GenerateBatcher._run = run
    assert tables[0] == tables[1]
    assert max(rows) > 1  # with 3 episodes at once, some generate calls held requests of several episodes


def test_a_run_written_before_new_options_existed_resumes(tmp_path, tiny_rm_dir):  # noqa: F811
    import pytest

    out, cfg = _config(tmp_path, "old", tiny_rm_dir, episodes=1, beam=[], best_of_n=[1])
    expect = _table(main(["--config", str(cfg)]))
    stored = json.loads((out / "config.json").read_text())
    for key in ("batch_requests", "batch_size"):  # options added later, at their defaults
        del stored["policy"][key]
    (out / "config.json").write_text(json.dumps(stored))
    assert _table(main(["--config", str(cfg)])) == expect
    changed = yaml.safe_load(cfg.read_text())
    changed["policy"]["max_resample"] = 5  # an option that was stored, now different: refused
    cfg.write_text(yaml.safe_dump(changed))
    with pytest.raises(ValueError, match=r"another configuration \(policy: .* there, .* now\)"):
        main(["--config", str(cfg)])


def test_a_judge_run_decoded_otherwise_is_not_resumed(tmp_path, judge_dir):  # noqa: F811
    """config.json records a judge's effective temperature: a run written when a single-sample judge sampled at
    temperature 1 by default (stored ``judge_temperature: null``) is refused, not continued greedily."""
    import pytest

    judge = {"kind": "judge", "name": "judge", "judge_model": judge_dir, "judge_max_tokens": 4}
    out, cfg = _config(tmp_path, "judge", None, episodes=1, beam=[], best_of_n=[2], scorers=[judge])
    main(["--config", str(cfg)])
    stored = json.loads((out / "config.json").read_text())
    assert stored["scorers"][0]["judge_temperature"] == 0.0
    main(["--config", str(cfg)])  # the same run resumes
    stored["scorers"][0]["judge_temperature"] = None
    (out / "config.json").write_text(json.dumps(stored))
    with pytest.raises(ValueError, match=r"another configuration \(scorers: "):
        main(["--config", str(cfg)])


def test_a_sampling_judge_scores_an_episode_the_same_after_other_episodes(tmp_path):
    """A sampling judge keys its calls by prompt (the HTTP seed derives from it), so an episode's judge scores do not
    depend on what the judge was asked before: here the held-out episodes are played alone, then after the held-in
    ones, against a judge server whose rating is a function of the seed it is sent (as a sampling server's)."""
    from tests.policies.fake_openai import ChatServer

    def rating(body: dict, i: int) -> str:
        return f"Thought: looks fine.\nRating: {(body.get('seed', 0) + i) % 11}"  # no seed: the readiness probe

    with ChatServer(reply=rating) as srv:
        judge = {"kind": "judge", "name": "judge", "judge_base_url": srv.url, "judge_model": "judge",
                 "judge_temperature": 1.0, "judge_samples": 2, "judge_max_tokens": 8}
        common = dict(episodes=2, beam=[], best_of_n=[3], scorers=[judge], concurrency=2)
        alone, cfg_alone = _config(tmp_path, "alone", None, **common, held_in=[])
        after, cfg_after = _config(tmp_path, "after", None, **common)
        main(["--config", str(cfg_alone)])
        main(["--config", str(cfg_after)])
    assert len({r.get("seed") for r in srv.requests}) > 3  # the judge sampled with seeds of several prompts

    def judged(out) -> dict:
        rows = [json.loads(x) for x in (out / "episodes.jsonl").read_text().splitlines()]
        return {(r["env"], r["episode"]): (r["scores"], r["chosen"]) for r in rows
                if r["method"] == "best_of_n" and r["env"].startswith("babyai:GoToRedBallGrey")}

    scores = judged(alone)
    assert len(scores) == 2 and all(len(s) == 3 and all(0.0 <= x <= 1.0 for x in s) for s, _ in scores.values())
    assert judged(after) == scores
