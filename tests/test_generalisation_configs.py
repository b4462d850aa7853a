"""Every YAML of configs/generalisation/ parses against its own command: collect, search or fit (by its keys)."""

from __future__ import annotations

import pytest
import yaml

from agentrm.cli_config import parse_config
from agentrm.collect import CollectConfig
from agentrm.paths import PROJECT_ROOT

GEN = PROJECT_ROOT / "configs" / "generalisation"


def kind(path) -> str:
    keys = set(yaml.safe_load(path.read_text()))
    if keys & {"trainer", "model", "data"}:
        return "fit"
    if "envs" in keys:
        return "collect"
    if keys & {"held_in", "held_out"}:
        return "search"
    raise AssertionError(f"{path}: not a fit, collect or search config (keys {sorted(keys)})")


CONFIGS = sorted(GEN.glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_against_its_command(path, capsys):
    what = kind(path)
    if what == "collect":
        config = parse_config(CollectConfig, ["--config", str(path)])
        assert config.out.startswith("runs/generalisation/data/") and len(config.jobs()) >= 50
    elif what == "search":
        from agentrm.search import evaluate

        with pytest.raises(SystemExit) as e:
            evaluate.main(["--config", str(path), "--print_config"])
        assert e.value.code == 0 and "held_out" in capsys.readouterr().out
    else:
        from tests.test_configs import parse

        cfg = parse(path)
        assert cfg.model.class_path.startswith("agentrm.lit.")


def test_the_data_configs_feed_the_fit_and_test_configs():
    """The fit config trains on the training outputs and validates on the development output; the test config
    lists every collected spec in train_envs (python -m agentrm.data.splits checks more: tests/data/test_splits.py)."""
    by_kind: dict[str, list] = {}
    for path in CONFIGS:
        by_kind.setdefault(kind(path), []).append(yaml.safe_load(path.read_text()))
    outs = {c["out"]: c for c in by_kind["collect"]}
    dev = [o for o in outs if "dev" in o]
    for fit in by_kind["fit"]:
        assert set(fit["data"]["train_path"]) == set(outs) - set(dev)
        assert fit["data"]["val_unseen_path"] == dev
    (search,) = by_kind["search"]
    assert {s for c in outs.values() for s in c["envs"]} == set(search["train_envs"])
    assert search["episodes"] >= 30 and search["best_of_n"] == [1, 5] and search["beam"] == [[5, 5]]
