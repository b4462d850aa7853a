"""Fault cases for the data and search commands: ``agentrm.collect``, ``trees``, ``search`` and ``pipeline``.

Bad values are refused before any work in one line naming the field; outputs of another configuration or of
other models are never resumed into (the file stays intact); a killed run resumes to the uninterrupted result.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from agentrm.paths import PROJECT_ROOT
from tests.faults.harness import FaultCase, Outcome, command_env, run_module

TOKENIZER = "agentrm/assets/tiny_tokenizer"
BACKBONE = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 512}
LEVEL = "babyai:GoToRedBall?max_steps=8"


def save_rm(path: Path, seed: int) -> None:
    """A tiny random value RM exported at ``path`` (``seed``: its weights; another seed = a retrained RM)."""
    import torch

    from agentrm.models.backbone import build_backbone
    from agentrm.models.value_rm import ValueRewardModel
    from agentrm.paths import load_tokenizer

    tok = load_tokenizer(TOKENIZER)
    torch.manual_seed(seed)
    ValueRewardModel(build_backbone(config=BACKBONE, vocab_size=len(tok))).save_pretrained(path, tokenizer=tok)


def save_lm(path: Path, seed: int) -> None:
    """A tiny random causal LM (an "SFT policy") with the tiny tokenizer at ``path``."""
    import torch

    from agentrm.models.backbone import build_backbone
    from agentrm.paths import load_tokenizer

    tok = load_tokenizer(TOKENIZER)
    torch.manual_seed(seed)
    build_backbone(config=BACKBONE, vocab_size=len(tok), causal_lm=True).save_pretrained(path)
    tok.save_pretrained(path)


def search_config(d: Path, name: str = "search.yaml", **over: Any) -> Path:
    cfg = {"out_dir": str(d / "out"), "held_in": [LEVEL], "episodes": 3, "seed": 1000, "num_threads": 1,
           "policy": {"kind": "expert", "error_rate": 0.5}, "scorers": [{"kind": "value_rm", "path": str(d / "rm")}],
           "best_of_n": [2], "beam": [[2, 2]], "progress": False, **over}
    (d / name).write_text(yaml.safe_dump(cfg))
    return d / name


def _with_rm(**over: Any) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        save_rm(d / "rm", 0)
        search_config(d, **over)

    return setup


def _search_error(id: str, covers: str, message: str, **over: Any) -> FaultCase:
    return FaultCase(id=id, covers=covers, module="agentrm.search", args=["--config", "{d}/search.yaml"],
                     setup=_with_rm(**over), message=message)


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _kill_when(module: str, args: list[str], d: Path, ready: Callable[[], bool], timeout: float = 120.0) -> None:
    """Start ``python -m module args``, SIGKILL it once ``ready()`` holds (it must not have finished)."""
    argv = [a.replace("{d}", str(d)) for a in args]
    proc = subprocess.Popen([sys.executable, "-m", module, *argv], cwd=PROJECT_ROOT, env=command_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None and not ready():
            time.sleep(0.02)
        assert proc.poll() is None, f"{module} finished before it could be killed"
        assert ready(), f"{module} wrote nothing to kill it after within {timeout:.0f} s"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _kill_and_resume(module: str, args: list[str], output: str, min_lines: int) -> Callable[[Path], Outcome]:
    """The uninterrupted run into ``ref/``, then a run killed after ``min_lines`` output lines and a rerun of it;
    the rerun must end with the uninterrupted output, byte for byte."""

    def run(d: Path) -> Outcome:
        ref = run_module(module, [a.replace("{out}", str(d / "ref")) for a in args], d)
        assert ref.returncode == 0, ref.stderr[-2000:]
        killed = [a.replace("{out}", str(d / "killed")) for a in args]
        _kill_when(module, killed, d, lambda: _lines(d / "killed" / output) >= min_lines)
        out = run_module(module, killed, d)
        if out.returncode == 0:
            got, want = (d / "killed" / output).read_bytes(), (d / "ref" / output).read_bytes()
            assert got == want, f"the resumed {output} differs from the uninterrupted one"
        return out

    return run


def _resume_refused(module: str, args: list[str], output: str, change: Callable[[Path], list[str]],
                    ) -> Callable[[Path], Outcome]:
    """Run once, then rerun with ``change(d)``'s arguments (another setting, or a retrained model): refused, and
    the output is left as it was."""

    def run(d: Path) -> Outcome:
        first = run_module(module, args, d)
        assert first.returncode == 0, first.stderr[-2000:]
        before = (d / output).read_bytes()
        out = run_module(module, change(d), d)
        assert (d / output).read_bytes() == before, f"{output} changed"
        return out

    return run


def _retrain_rm(d: Path) -> list[str]:
    save_rm(d / "rm", 1)  # same directory, new weights
    return ["--config", "{d}/search.yaml"]


def _with_judge(**options: Any) -> Callable[[Path], None]:
    """A search with one local judge (``options``: its other fields), one episode, no beam."""
    def setup(d: Path) -> None:
        save_lm(d / "judge", 0)
        search_config(d, scorers=[{"kind": "judge", "name": "judge", "judge_model": str(d / "judge"),
                                   "judge_max_tokens": 4, **options}], episodes=1, beam=[])

    return setup


def _stored_judge_edited(edit: Callable[[dict], None]) -> Callable[[Path], list[str]]:
    """Between the runs: ``edit`` the judge's entry of the run's config.json (as an older version wrote it)."""
    def run(d: Path) -> list[str]:
        path = d / "out" / "config.json"
        stored = json.loads(path.read_text())
        edit(stored["scorers"][0])
        path.write_text(json.dumps(stored))
        return ["--config", "{d}/search.yaml"]

    return run


def _as_sampled_by_default(judge: dict) -> None:
    """As written when a single-sample judge sampled at temperature 1 by default."""
    judge["judge_temperature"] = None


def _as_seeded_by_call_order(judge: dict) -> None:
    """As written when a sampling judge drew its seeds in the order calls reached it."""
    assert judge.pop("judge_seeds") == "by prompt"


def _retrain_policy(d: Path) -> list[str]:
    save_lm(d / "sft", 1)
    return TREES_LM


COLLECT = ["--out", "{d}/c.jsonl", "--envs", f"[{LEVEL}]", "--episodes", "2", "--rollouts", "1", "--progress", "false"]
TREES = ["--out", "{d}/t.jsonl", "--envs", f"[{LEVEL}]", "--episodes", "2", "--simulations", "3", "--k", "2",
         "--progress", "false"]
TREES_LM = [*TREES, "--policy.kind", "hf", "--policy.model", "{d}/sft", "--simulations", "2", "--episodes", "1",
            "--policy.max_new_tokens", "4"]


def _pipeline_config(d: Path, **over: Any) -> None:
    cfg = {"run_dir": str(d / "run"), "envs": [LEVEL], "num_threads": 1, "progress": False,
           "policy": {"kind": "expert", "error_rate": 0.5}, "trees": {"episodes": 1, "simulations": 2},
           "eval": {"episodes": 1, "best_of_n": [2]}, **over}
    (d / "pipeline.yaml").write_text(yaml.safe_dump(cfg))


def _no_stage_ran(d: Path, out: Outcome) -> None:
    assert not list((d / "run").rglob("DONE")), "a stage ran before the config was checked"


def _search_kill_resume(d: Path) -> Outcome:
    save_rm(d / "rm", 0)
    for name in ("ref", "killed"):
        search_config(d, name=f"{name}.yaml", out_dir=str(d / name), episodes=4)
    ref = run_module("agentrm.search", ["--config", "{d}/ref.yaml"], d)
    assert ref.returncode == 0, ref.stderr[-2000:]
    _kill_when("agentrm.search", ["--config", "{d}/killed.yaml"], d, lambda: _lines(d / "killed" / "episodes.jsonl") >= 7)
    out = run_module("agentrm.search", ["--config", "{d}/killed.yaml"], d)
    assert out.returncode != 0 or _results(d / "killed") == _results(d / "ref"), "the resumed results differ"
    return out


def _results(out_dir: Path) -> list[str]:
    """The summary rows that are results (success, reward, work per episode), not timings or cache-dependent counts."""
    keep = ("method", "scorer", "n", "w", "k", "env_set", "episodes", "success_rate", "avg_reward", "candidates_scored")
    return sorted(json.dumps({k: r[k] for k in keep}) for r in _csv(out_dir / "summary.csv"))


def _csv(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path) as f:
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in csv.DictReader(f)]


CASES: list[FaultCase] = [
    _search_error("search/episodes-negative", "episodes: -1 refused before any work", r"episodes: must be >= 1, got -1",
                  episodes=-1),
    _search_error("search/best-of-n-zero", "best_of_n: [0, 2] refused before any episode (crashed mid-run before)",
                  r"best_of_n\[0\]: must be >= 1, got 0", best_of_n=[0, 2]),
    _search_error("search/beam-not-a-pair", "beam: [[2]] refused (a beam is [W, K])",
                  r'"beam": Expected a tuple with 2 elements. Got value: \[2\]', beam=[[2]]),
    _search_error("search/max-steps-zero", "an env option max_steps=0 refused", r"held_in: .*max_steps=0 must be an integer >= 1",
                  held_in=["babyai:GoToRedBall?max_steps=0"]),
    _search_error("search/unknown-family", "an unknown environment family named", r"held_in: .*unknown family 'nethack'",
                  held_in=["nethack:dungeon"]),
    _search_error("search/concurrency-zero", "concurrency 0 refused", r"concurrency: must be >= 1", concurrency=0),
    _search_error("search/missing-rm", "a scorer path that does not exist", r"scorers\[0\]\.path: not found",
                  scorers=[{"kind": "value_rm", "path": "/nonexistent/rm"}]),
    _search_error("search/rm-of-the-wrong-kind", "an implicit-PRM scorer pointed at a value RM",
                  r"scorers\[0\]: .* holds a 'ValueRewardModel', kind 'implicit_prm' needs a 'ImplicitPRM'",
                  scorers=[{"kind": "implicit_prm", "path": "RM"}]),
    _search_error("search/oracle-declared-blind", "an oracle declared outcome-blind (it reads the ground truth)",
                  r"scorers\[0\]\.outcome_blind: the oracle reads", scorers=[{"kind": "oracle", "outcome_blind": True}]),
    _search_error("search/duplicate-scorer-labels", "two scorers with one label", r"scorers: labels must be unique",
                  scorers=[{"kind": "oracle"}, {"kind": "oracle"}]),
    _search_error("search/tie-break-typo", "an unknown tie-break", r"tie_break", tie_break="frist"),
    FaultCase(id="search/resume-with-another-config", covers="a rerun with other settings never mixes into episodes.jsonl",
              setup=_with_rm(), run=_resume_refused("agentrm.search", ["--config", "{d}/search.yaml"], "out/episodes.jsonl",
                                                    lambda d: ["--config", "{d}/search.yaml", "--episodes", "4"]),
              message=r"out_dir: .* holds episodes of another configuration \(episodes: \d+ there, 4 now\)"),
    FaultCase(id="search/resume-with-a-retrained-rm", covers="an RM retrained between kill and resume is refused (fingerprint)",
              setup=_with_rm(), run=_resume_refused("agentrm.search", ["--config", "{d}/search.yaml"], "out/episodes.jsonl",
                                                    _retrain_rm),
              message=r"out_dir: .* holds episodes of other models \(scorer 'value_rm' \w+ -> \w+\)"),
    FaultCase(id="search/resume-a-sampled-judge-run", covers="a judge run of the old sampling default is not continued greedily",
              setup=_with_judge(), run=_resume_refused("agentrm.search", ["--config", "{d}/search.yaml"],
                                                       "out/episodes.jsonl", _stored_judge_edited(_as_sampled_by_default)),
              message=r"out_dir: .* holds episodes of another configuration \(scorers: "),
    FaultCase(id="search/resume-a-judge-run-seeded-by-call-order",
              covers="a sampling judge's run of the call-order seeds is not continued with seeds by prompt",
              setup=_with_judge(judge_temperature=1.0),
              run=_resume_refused("agentrm.search", ["--config", "{d}/search.yaml"], "out/episodes.jsonl",
                                  _stored_judge_edited(_as_seeded_by_call_order)),
              message=r"out_dir: .* holds episodes of another configuration \(scorers: "),
    FaultCase(id="search/kill-and-resume", covers="SIGKILL mid-evaluation, rerun: the summary of an uninterrupted run",
              run=_search_kill_resume, exit_code=0),
    FaultCase(id="collect/episodes-zero", covers="episodes 0 refused", module="agentrm.collect",
              args=[*COLLECT, "--episodes", "0"], message=r"episodes: must be >= 1, got 0"),
    FaultCase(id="collect/error-rate-above-one", covers="error_rate 1.5 refused", module="agentrm.collect",
              args=[*COLLECT, "--error_rate", "1.5"], message=r"error_rate: must be in \[0.0, 1.0\], got 1.5"),
    FaultCase(id="collect/siblings-without-rollouts", covers="sibling branches with no rollouts to value them",
              module="agentrm.collect", args=[*COLLECT, "--rollouts", "0", "--siblings", "1"], message=r"siblings: "),
    FaultCase(id="collect/workers-zero", covers="workers 0 refused", module="agentrm.collect",
              args=[*COLLECT, "--workers", "0"], message=r"workers: must be >= 1, got 0"),
    FaultCase(id="collect/resume-with-other-settings", covers="an output of other settings is never appended to",
              run=_resume_refused("agentrm.collect", COLLECT, "c.jsonl", lambda d: [*COLLECT, "--error_rate", "0.1"]),
              message=r"out: .*c\.jsonl was written with other arguments"),
    FaultCase(id="collect/kill-and-resume", covers="SIGKILL mid-collection, rerun: byte-identical to an uninterrupted run",
              run=_kill_and_resume("agentrm.collect", ["--out", "{out}/c.jsonl", "--envs", "[babyai:GoToLocal?max_steps=24]",
                                                       "--episodes", "6", "--rollouts", "3", "--progress", "false"],
                                   "c.jsonl", 3), exit_code=0),
    FaultCase(id="trees/simulations-zero", covers="simulations 0 refused", module="agentrm.trees",
              args=[*TREES, "--simulations", "0"], message=r"simulations: must be >= 1, got 0"),
    FaultCase(id="trees/policy-model-missing", covers="an LM policy that is not there, named before any tree",
              module="agentrm.trees", args=[*TREES, "--policy.kind", "hf", "--policy.model", "{d}/no_sft"],
              message=r"policy\.model '.*no_sft': no such file"),
    FaultCase(id="trees/resume-with-other-settings", covers="a tree file of other settings is never appended to",
              run=_resume_refused("agentrm.trees", TREES, "t.jsonl", lambda d: [*TREES, "--k", "3"]),
              message=r"out: .*t\.jsonl was written with other arguments"),
    FaultCase(id="trees/resume-with-a-retrained-policy", covers="an SFT policy retrained between runs is refused (fingerprint)",
              setup=lambda d: save_lm(d / "sft", 0),
              run=_resume_refused("agentrm.trees", TREES_LM, "t.jsonl", _retrain_policy),
              message=r"out: .*t\.jsonl was built with another policy model"),
    FaultCase(id="trees/kill-and-resume", covers="SIGKILL mid-build, rerun: byte-identical to an uninterrupted run",
              run=_kill_and_resume("agentrm.trees", ["--out", "{out}/t.jsonl", "--envs", "[babyai:GoToLocal?max_steps=24]",
                                                     "--episodes", "8", "--simulations", "12", "--progress", "false"],
                                   "t.jsonl", 2), exit_code=0),
    FaultCase(id="pipeline/override-typo", covers="a typo in the RM stage's overrides fails before the first stage",
              module="agentrm.pipeline", args=["--config", "{d}/pipeline.yaml"],
              setup=lambda d: _pipeline_config(d, rm={"config": "configs/tiny/value_rm.yaml",
                                                      "overrides": {"model": {"init_args": {"learnig_rate": 1.0}}}}),
              message=r"rm \(configs/tiny/value_rm\.yaml with rm\.overrides\): .*'learnig_rate'", check=_no_stage_ran),
    FaultCase(id="pipeline/unknown-forced-stage", covers="--force with a stage that does not exist",
              module="agentrm.pipeline", args=["--config", "{d}/pipeline.yaml", "--force", "[treez]"],
              setup=_pipeline_config, message=r"force: unknown stage\(s\) \['treez'\]", check=_no_stage_ran),
    FaultCase(id="pipeline/no-envs", covers="a pipeline without training env specs", module="agentrm.pipeline",
              args=["--config", "{d}/pipeline.yaml", "--envs", "[]"], setup=_pipeline_config,
              message=r"envs: give the training env specs"),
    FaultCase(id="pipeline/eval-bad-value", covers="an evaluation value checked before the trees stage",
              module="agentrm.pipeline", args=["--config", "{d}/pipeline.yaml"],
              setup=lambda d: _pipeline_config(d, eval={"episodes": 0}), message=r"episodes: must be >= 1, got 0",
              check=_no_stage_ran),
]


def _fill_rm(case: FaultCase) -> FaultCase:
    """``path: RM`` in a case's scorers means the case's own tiny RM (``<dir>/rm``)."""
    setup = case.setup
    if setup is None:
        return case

    def filled(d: Path) -> None:
        setup(d)
        p = d / "search.yaml"
        if p.exists():
            p.write_text(p.read_text().replace("path: RM", f"path: {d / 'rm'}"))

    case.setup = filled
    return case


CASES = [_fill_rm(c) for c in CASES]
