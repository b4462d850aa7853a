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


BACKBONES = GEN / "backbones"


@pytest.mark.parametrize("name", ["tiny", "frozen_minilm", "frozen_smollm2", "lora_smollm2"])
def test_backbone_comparison_fits_share_data_and_selection(name):
    """The four RMs of the backbone comparison parse, train on the same subsample, select on the development
    set, and write under their own directory; a cached-forward RM's features are precomputed with its tokenizer,
    length and layer (every token for the top-block LoRA, step ends for a head)."""
    from tests.test_configs import parse

    path = BACKBONES / f"{name}.yaml"
    cfg = parse(path)
    raw = yaml.safe_load(path.read_text())
    assert raw["data"]["train_path"] == ["runs/generalisation/backbones/train_sub.jsonl"]
    assert raw["data"]["val_unseen_path"] == ["runs/generalisation/data/dev_unseen.jsonl"]
    monitors = {c["init_args"].get("monitor") for c in raw["trainer"]["callbacks"]} - {None}
    assert monitors == {"val_unseen/auroc"}
    assert all(name in str(v) for v in (raw["trainer"]["default_root_dir"],
                                          raw["trainer"]["callbacks"][-1]["init_args"]["dirpath"]))
    script = (PROJECT_ROOT / "scripts" / "generalisation_backbones.sh").read_text()
    if name != "tiny":
        features = raw["model"]["init_args"]["features"]
        backbone = raw["data"]["tokenizer"]
        lines = [ln.strip().removeprefix("{ ") for ln in script.splitlines()]
        line = next(ln for ln in lines if ln.startswith(f"precompute {features.rsplit('/', 1)[1]} "))
        assert line.split()[2:4] == [backbone, str(raw["data"]["max_length"])]
        assert str(raw["model"]["init_args"]["layer"]) in line.split()[4]
        top_blocks = cfg.model.class_path.endswith("TopLayersModule")
        assert ("--sequence_layers" in line.split()) is top_blocks
    assert f"fit_and_export {name} {cfg.model.class_path} {raw['data']['max_length']}" in script


def composed_on_the_test_protocol(extra: str, out: str, capsys, same=("best_of_n",), folder: str = "backbones") -> dict:
    """``configs/generalisation/<folder>/<extra>`` composed on the final evaluation's config, checked to keep its
    held-out specs, seeds, instance checks and policy (and the ``same`` keys) with its own output directory
    ``runs/generalisation/<folder>/<out>``; returns the composed config."""
    from agentrm.search import evaluate

    with pytest.raises(SystemExit) as e:
        evaluate.main(["--config", str(GEN / "test_eval.yaml"), "--config", str(GEN / folder / extra),
                       "--print_config"])
    assert e.value.code == 0
    composed = yaml.safe_load(capsys.readouterr().out)
    base = yaml.safe_load((GEN / "test_eval.yaml").read_text())
    for key in ("held_out", "seed", "train_envs", "train_seed", "train_episodes", "greedy", *same):
        assert composed[key] == base[key], key
    assert {k: composed["policy"][k] for k in base["policy"]} == base["policy"]
    assert composed["out_dir"] == f"runs/generalisation/{folder}/{out}"
    return composed


@pytest.mark.parametrize("extra,out,names", [
    ("test_eval.yaml", "test_eval", {"tiny_sub": "tiny", "frozen_minilm": "frozen_minilm",
                                     "frozen_smollm2": "frozen_smollm2"}),
    ("lora_eval.yaml", "lora_eval", {"lora_smollm2": "lora_smollm2"}),
])
def test_backbone_comparison_eval_keeps_the_test_protocol(extra, out, names, capsys):
    """Composed on the final evaluation's config: same held-out specs, seeds and checks; its own scorers (one per
    RM of the comparison, each the export of the epoch selected on the development set) and output directory."""
    composed = composed_on_the_test_protocol(extra, out, capsys)
    assert [s["name"] for s in composed["scorers"]] == list(names)
    assert all(s["path"] == f"runs/generalisation/backbones/rm/{names[s['name']]}/hf_model_selected"
               for s in composed["scorers"])


@pytest.mark.parametrize("extra,out,judges", [
    ("judge_eval.yaml", "judge_eval", {"judge_smollm2": "smollm2-135m-instruct"}),
    ("judges_eval.yaml", "judges_eval", {"judge_smollm2": "smollm2-135m-instruct", "judge_gemma3": "gemma3-270m"}),
])
def test_judge_runs_keep_the_test_protocol(extra, out, judges, capsys):
    """The LLM judges play the final evaluation's episodes (same specs, seeds, policy and checks), Best-of-5 only."""
    composed = composed_on_the_test_protocol(extra, out, capsys, same=())
    assert composed["best_of_n"] == [5] and composed["beam"] == []
    assert {s["name"]: (s["kind"], s["judge_model"], s["judge_mode"]) for s in composed["scorers"]} == {
        name: ("judge", model, "pointwise") for name, model in judges.items()}


def test_the_type_auroc_selection_composes_on_the_tiny_rm_with_its_own_directory():
    """selection/type_auroc.yaml changes what is monitored and where the run writes, nothing the model learns from."""
    from tests.test_configs import parse

    base, extra = GEN / "tiny_value_rm.yaml", GEN / "selection" / "type_auroc.yaml"
    alone, composed = parse(base), parse(base, extra)
    assert composed.model == alone.model and composed.data == alone.data
    assert composed.seed_everything == alone.seed_everything
    assert composed.trainer.max_epochs == alone.trainer.max_epochs
    callbacks = yaml.safe_load(extra.read_text())["trainer"]["callbacks"]
    monitors = [c["init_args"].get("monitor") for c in callbacks]
    assert monitors == ["val_unseen/type_auroc", "val_unseen/auroc", "val_unseen/type_auroc", None]
    dirs = [c["init_args"]["dirpath"] for c in callbacks if "dirpath" in c["init_args"]]
    assert composed.trainer.default_root_dir == "runs/generalisation/rm/tiny_type"
    assert all(d.startswith("runs/generalisation/rm/tiny_type/") for d in dirs)


def test_the_selection_rerun_keeps_the_test_protocol(capsys):
    """The RM of the complete data selected on the per-type AUROC (and the same fit's last epoch) play the final
    evaluation's episodes, each from an export under the selection fit's run directory."""
    composed = composed_on_the_test_protocol("test_eval.yaml", "test_eval", capsys, same=("best_of_n", "beam"),
                                             folder="selection")
    fit_dir = yaml.safe_load((GEN / "selection" / "type_auroc.yaml").read_text())["trainer"]["default_root_dir"]
    assert {s["name"]: s["path"] for s in composed["scorers"]} == {
        "tiny_full": f"{fit_dir}/hf_model_selected", "tiny_full_last": f"{fit_dir}/hf_model"}
