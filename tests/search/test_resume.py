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
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in summary]  # wall time is not a result


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
    with pytest.raises(ValueError, match="another configuration"):
        main(["--config", str(cfg)])
    main(["--config", str(cfg), "--resume", "false"])  # starts anew
