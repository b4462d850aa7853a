"""The evaluation harness: CLI with a YAML config, per-episode JSONL, CSV/Markdown summary, scaling plot."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml

from agentrm.envs.registry import make_env, parse_spec
from agentrm.models.backbone import build_backbone
from agentrm.models.value_rm import ValueRewardModel
from agentrm.paths import load_tokenizer
from agentrm.search.evaluate import check_disjoint_instances, main
from tests.lit.conftest import TINY_BACKBONE


@pytest.fixture(scope="module")
def tiny_rm_dir(tmp_path_factory):
    tok = load_tokenizer("agentrm/assets/tiny_tokenizer")
    torch.manual_seed(0)
    model = ValueRewardModel(build_backbone(config=TINY_BACKBONE, vocab_size=len(tok)))
    return model.save_pretrained(tmp_path_factory.mktemp("rm") / "hf_model", tokenizer=tok)


def test_cli_runs_config_and_writes_outputs(tmp_path, tiny_rm_dir, capsys):
    out = tmp_path / "out"
    cfg = {
        "out_dir": str(out),
        "held_in": ["babyai:GoToRedBall?max_steps=6"],
        "held_out": ["babyai:GoToRedBallGrey?max_steps=6"],
        "episodes": 1,
        "seed": 1000,
        "policy": {"kind": "expert", "error_rate": 0.5},
        "scorers": [{"kind": "value_rm", "path": str(tiny_rm_dir), "name": "rm"}, {"kind": "oracle"}],
        "best_of_n": [1, 2],
        "beam": [[2, 2]],
        "progress": False,
        "num_threads": 1,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    summary = main(["--config", str(path)])
    rows = [json.loads(x) for x in (out / "episodes.jsonl").read_text().splitlines()]
    # per episode: greedy, sampling, 2 x pass@N, 2 N x 2 scorers best_of_n, 2 scorers beam = 10 rows
    assert len(rows) == 2 * 10
    assert {r["method"] for r in rows} == {"greedy", "sampling", "pass@N", "best_of_n", "beam"}
    assert len({r["seed"] for r in rows}) == 2
    by = {(r["method"], r["scorer"], r["n"], r["env"], r["episode"]): r for r in rows}
    for lv in ("babyai:GoToRedBall?max_steps=6", "babyai:GoToRedBallGrey?max_steps=6"):
        for ep in range(1):
            # oracle Best-of-N equals pass@N; Best-of-1 equals the greedy episode (same policy seed)
            assert (
                by[("best_of_n", "oracle", 2, lv, ep)]["success"]
                == by[("pass@N", "oracle-any", 2, lv, ep)]["success"]
            )
            assert (
                by[("best_of_n", "rm", 1, lv, ep)]["actions"] == by[("greedy", None, None, lv, ep)]["actions"]
            )
    rm_rows = [r for r in rows if r["scorer"] == "rm"]
    assert all(r["tokens_scored"] > 0 and r["candidates_scored"] > 0 for r in rm_rows)
    with open(out / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(summary) == 2 * 10
    assert {"method", "n", "w", "k", "env_set", "success_rate", "tokens_scored", "wall_s"} <= set(table[0])
    assert (out / "summary.md").read_text().startswith("| method")
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "config.json").read_text())["seed"] == 1000
    assert "best_of_n" in capsys.readouterr().out


def test_help_and_seed_checks(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--best_of_n" in capsys.readouterr().out
    specs = [parse_spec("babyai:GoToRedBall"), parse_spec("babyai:PickupLoc")]
    envs = {str(s): make_env(s) for s in specs}
    with pytest.raises(ValueError, match="also training instances"):
        check_disjoint_instances(envs, specs[:1], 3, seed=0, train_specs=specs[:1], train_seed=0, train_episodes=10)
    check_disjoint_instances(envs, specs, 50, seed=1000, train_specs=specs, train_seed=0, train_episodes=500)
