"""The resumable trajectory collector (python -m agentrm.collect)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agentrm.collect import CollectConfig, main, summarize
from agentrm.collect import collect as run_collect
from agentrm.data.schema import read_jsonl


def collect(**fields):
    """The Python API: one :class:`CollectConfig`."""
    return run_collect(CollectConfig(**fields))

ARGS = dict(
    envs=["babyai:GoToRedBall?max_steps=16", "babyai:PickupLoc?max_steps=16"],
    episodes=3,
    error_rate=0.6,
    rollouts=2,
    siblings=1,
    seed=5,
    progress=False,
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("ref") / "ref.jsonl"
    summary = collect(out=str(out), **ARGS)
    assert summary["episodes"] == 6 and summary["branch_records"] == 6
    return out.read_bytes()


def test_records_are_valid_and_unique(reference, tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(reference)
    trajs = read_jsonl(path)
    ids = [t.id for t in trajs]
    assert len(ids) == len(set(ids)) == 12
    mains = [t for t in trajs if "branch_at" not in t.meta]
    assert [t.meta["env"] for t in mains] == ARGS["envs"] * 3  # round-robin
    assert [t.task for t in mains] == ["babyai/GoToRedBall", "babyai/PickupLoc"] * 3
    assert all(t.meta["instance"] == f"{t.task.replace('/', ':')}#seed={t.meta['seed']}" for t in mains)
    for t in trajs:
        assert t.meta["error_rate"] == 0.6 and t.meta["group"] in ids
        assert t.steps and len(t.steps) <= 16
    summary = summarize(path)
    assert summary["success_rate"] == sum(t.success for t in mains) / 6
    assert summary["bytes"] == len(reference)


def test_stop_and_resume_equals_uninterrupted(reference, tmp_path):
    out = tmp_path / "o.jsonl"
    collect(out=str(out), limit=2, **ARGS)
    partial = out.read_bytes()
    assert 0 < len(partial) < len(reference) and reference.startswith(partial)
    collect(out=str(out), limit=1, **ARGS)
    collect(out=str(out), **ARGS)
    assert out.read_bytes() == reference
    collect(out=str(out), **ARGS)  # nothing left to do: unchanged
    assert out.read_bytes() == reference


@pytest.mark.parametrize("cut", ["mid_line", "partial_block", "garbage_tail"])
def test_resume_after_crash_artifacts(reference, tmp_path, cut):
    lines = reference.splitlines(keepends=True)
    if cut == "mid_line":  # killed while writing the 4th record
        damaged = b"".join(lines[:3]) + lines[3][: len(lines[3]) // 2]
    elif cut == "partial_block":  # main record of episode 2 written, its branch not
        damaged = b"".join(lines[:3])
    else:
        damaged = b"".join(lines[:4]) + b'{"id": "x", "ste\n'
    out = tmp_path / "d.jsonl"
    out.write_bytes(damaged)
    collect(out=str(out), **ARGS)
    assert out.read_bytes() == reference


def test_resume_after_killed_subprocess(reference, tmp_path):
    out = tmp_path / "k.jsonl"
    cmd = [sys.executable, "-m", "agentrm.collect", "--out", str(out), "--envs", "[babyai:GoToRedBall?max_steps=16, babyai:PickupLoc?max_steps=16]"]
    cmd += [
        "--episodes",
        "3",
        "--error_rate",
        "0.6",
        "--rollouts",
        "2",
        "--siblings",
        "1",
    ]
    cmd += ["--seed", "5", "--progress", "false"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=Path(__file__).parents[2]
    )
    deadline = time.time() + 20
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.01)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert out.exists()
    collect(out=str(out), **ARGS)
    assert out.read_bytes() == reference


def test_workers_give_identical_output(reference, tmp_path):
    out = tmp_path / "w.jsonl"
    collect(out=str(out), workers=2, **ARGS)
    assert out.read_bytes() == reference


def test_ray_backend_gives_identical_output(reference, tmp_path):
    import ray  # the 'ray' extra; scripts/setup.sh installs it

    out = tmp_path / "ray.jsonl"
    try:  # a local Ray (2 CPUs) started by the pool; a cluster would be ray_address="auto"
        collect(out=str(out), workers=2, backend="ray", **ARGS)
    finally:
        ray.shutdown()
    assert out.read_bytes() == reference


def test_refuses_to_mix_settings_and_overwrite_restarts(reference, tmp_path):
    out = tmp_path / "m.jsonl"
    out.write_bytes(reference)
    with pytest.raises(ValueError, match="other arguments"):
        collect(out=str(out), **{**ARGS, "error_rate": 0.2})
    with pytest.raises(ValueError, match="unknown BabyAI level"):
        collect(out=str(out), **{**ARGS, "envs": ["babyai:Nope"]})
    with pytest.raises(ValueError, match="unknown family"):
        collect(out=str(out), **{**ARGS, "envs": ["nethack:Nope"]})
    args = {**ARGS, "episodes": 1, "envs": ["babyai:GoToRedBall?max_steps=16"]}
    collect(out=str(out), overwrite=True, **args)
    assert len(read_jsonl(out)) == 2


def test_cli_main(tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    summary = main(["--out", str(out), "--envs", "[babyai:GoToObj]", "--episodes", "2", "--rollouts", "1"])
    assert "success rate" in capsys.readouterr().out
    assert summary["episodes"] == 2 and len(read_jsonl(out)) == 4


def test_killed_run_leaves_no_worker_behind(tmp_path):
    """SIGKILL the collector while 2 spawned workers run: the workers (and what they own) go too."""
    out = tmp_path / "orphans.jsonl"
    cmd = [sys.executable, "-m", "agentrm.collect", "--out", str(out), "--envs", "[babyai:GoToLocal?max_steps=24]",
           "--episodes", "400", "--rollouts", "4", "--workers", "2", "--progress", "false"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=Path(__file__).parents[1])
    deadline = time.time() + 60
    while time.time() < deadline and not (out.exists() and out.read_bytes().count(b"\n") >= 2):
        time.sleep(0.05)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert children, "no worker processes were seen"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 20
    alive = children
    while alive and time.time() < deadline:
        alive = [c for c in children if Path(f"/proc/{c}").exists() and "zombie" not in _state(c)]
        time.sleep(0.1)
    assert not alive, f"worker processes {alive} outlived the killed collector"


def _state(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return "zombie"


def test_collect_and_trees_run_on_sciworld_and_textworld(tmp_path):
    """The collector and the MCTS stage take any family's spec (resumably, like BabyAI)."""
    from agentrm.search.specs import PolicySpec
    from agentrm.trees import TreesConfig, build_trees

    envs = ["sciworld:lifespan-longest-lived?max_steps=12", "textworld:custom?games=2&max_steps=12"]
    out = tmp_path / "mixed.jsonl"
    s = collect(out=str(out), envs=envs, episodes=1, error_rate=0.2, rollouts=1, siblings=1, seed=3, progress=False)
    recs = read_jsonl(out)
    assert s["episodes"] == 2 and {r.task for r in recs} == {"sciworld/lifespan-longest-lived", "textworld/custom"}
    assert all(st.value is not None for r in recs if "branch_at" not in r.meta for st in r.steps)
    mains = [r for r in recs if "branch_at" not in r.meta]
    assert mains[0].meta["instance"].startswith("sciworld:lifespan-longest-lived#var=")
    assert collect(out=str(out), envs=envs, episodes=1, error_rate=0.2, rollouts=1, siblings=1, seed=3,
                   progress=False)["episodes"] == 2  # a rerun resumes: nothing left to do
    trees = build_trees(TreesConfig(out=str(tmp_path / "trees.jsonl"), envs=envs, episodes=1, simulations=3, k=2,
                                    max_depth=12, policy=PolicySpec(kind="expert", error_rate=0.2), seed=3,
                                    flat_out=str(tmp_path / "flat.jsonl"), progress=False))
    assert trees["trees"] == 2 and trees["simulations"] == 6 and trees["records"] >= 2


# ----------------------------------------------------------------------------------------- manifest
def _manifest(out: Path) -> dict:
    import json

    from agentrm.data.manifest import manifest_path

    return json.loads(manifest_path(out).read_text())


def test_manifest_says_what_the_file_holds_and_how_it_was_made(reference, tmp_path):
    out = tmp_path / "man.jsonl"
    summary = collect(out=str(out), **ARGS)
    m = _manifest(out)
    recs = read_jsonl(out)
    assert out.read_bytes() == reference  # the manifest lives beside the file, never in it
    for task in ("babyai/GoToRedBall", "babyai/PickupLoc"):
        mains = [r for r in recs if r.task == task and "branch_at" not in r.meta]
        branches = [r for r in recs if r.task == task and "branch_at" in r.meta]
        t = m["tasks"][task]
        assert (t["episodes"], t["records"], t["branch_records"]) == (3, 6, 3)
        # every main step is valued (rollouts >= 1) plus each branch's own step; branch prefixes repeat values
        assert t["labelled_states"] == sum(len(r.steps) for r in mains) + len(branches)
        assert t["labelled_steps"] == sum(s.value is not None for r in mains + branches for s in r.steps)
        assert t["success_rate"] == pytest.approx(sum(r.success for r in mains) / 3, abs=1e-4)
        assert t["specs"] == [e for e in ARGS["envs"] if task.split("/")[1] in e]
    assert m["totals"]["labelled_states"] == summary["labelled_states"] == sum(
        m["tasks"][t]["labelled_states"] for t in m["tasks"])
    assert m["jobs"] == {"total": 6, "done": 6, "complete": True}
    s = m["settings"]
    assert (s["error_rate"], s["rollouts"], s["siblings"], s["seed"], s["envs"]) == (0.6, 2, 1, 5, ARGS["envs"])
    assert "expert" in s["policy"] and "Monte-Carlo" in s["value_target"]
    (run,) = m["runs"]
    assert run["jobs_before"] == 0 and run["jobs_after"] == 6 and run["workers"] == 1
    assert run["wall_s"] > 0 and run["cpu_s"] > 0 and m["cpu_s"] == run["cpu_s"] and len(run["load_avg_start"]) == 3
    assert summary["cpu_seconds"] == run["cpu_s"] and summary["manifest"].endswith("man.jsonl.manifest.json")


def test_manifest_after_resumes_counts_like_an_uninterrupted_run(reference, tmp_path):
    full = tmp_path / "full.jsonl"
    collect(out=str(full), **ARGS)
    out = tmp_path / "r.jsonl"
    collect(out=str(out), limit=2, **ARGS)
    first = _manifest(out)
    assert first["jobs"] == {"total": 6, "done": 2, "complete": False} and first["totals"]["episodes"] == 2
    with open(out, "ab") as f:  # a killed run: half a block after the complete ones
        f.write(reference.splitlines(keepends=True)[len(out.read_bytes().splitlines())])
    collect(out=str(out), workers=2, **ARGS)
    m = _manifest(out)
    assert m["tasks"] == _manifest(full)["tasks"] and m["totals"] == _manifest(full)["totals"]
    assert [(r["jobs_before"], r["jobs_after"], r["workers"]) for r in m["runs"]] == [(0, 2, 1), (2, 6, 2)]
    assert m["runs"][0] == first["runs"][0]  # the earlier run is kept as it was recorded
    assert m["cpu_s"] == pytest.approx(sum(r["cpu_s"] for r in m["runs"]), abs=0.02)
    collect(out=str(out), **ARGS)  # nothing left: one more (empty) run, same counts
    assert len(_manifest(out)["runs"]) == 3 and _manifest(out)["totals"] == m["totals"]
    collect(out=str(out), overwrite=True, **{**ARGS, "episodes": 1})  # a new file: a new history
    m = _manifest(out)
    assert len(m["runs"]) == 1 and m["totals"]["episodes"] == 2 and m["jobs"]["total"] == 2


def test_manifest_counts_only_complete_blocks_of_a_damaged_file(reference, tmp_path):
    out = tmp_path / "d.jsonl"
    out.write_bytes(b"".join(reference.splitlines(keepends=True)[:3]))  # block 1 + the main record of block 2
    collect(out=str(out), **ARGS)
    (run,) = _manifest(out)["runs"]
    assert run["jobs_before"] == 1 and run["jobs_after"] == 6


def test_manifest_summary_table(reference, tmp_path, capsys):
    from agentrm.data.manifest import main as manifest_main

    out = tmp_path / "t.jsonl"
    collect(out=str(out), **ARGS)
    table = manifest_main([str(out)])
    assert "| t.jsonl | babyai/PickupLoc | 3 | 6 |" in table and "| t.jsonl | **all 2** | 6 | 12 |" in table
    assert f"total: {_manifest(out)['totals']['labelled_states']} labelled states" in capsys.readouterr().out
