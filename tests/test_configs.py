"""Every YAML under configs/ parses against the fit CLI's parser, without building any model.

``configs/search/``, ``configs/paper/`` (search configs) and ``configs/pipeline/`` belong to other CLIs and parse against those;
``configs/generalisation/`` mixes collect, search and fit configs (tests/test_generalisation_configs.py parses each by kind); ``configs/strategies/`` holds
trainer fragments, parsed composed after a model config (as the docs tell users to run them).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agentrm.lit.cli import parse_fit_config
from agentrm.paths import PROJECT_ROOT

CONFIGS = PROJECT_ROOT / "configs"
SKIP_DIRS = {"search", "pipeline", "paper", "generalisation"}
STRATEGY_DIR = CONFIGS / "strategies"


def parse(*config_files: Path, extra: tuple[str, ...] = ()):
    """The fit CLI's parse (checked: keys, types, class paths, links, output paths), building nothing."""
    return parse_fit_config([a for f in config_files for a in ("--config", str(f))] + list(extra))


KINDS = ("value_rm", "implicit_prm")
METHODS = ("full", "lora", "qlora")
FAMILIES = ("llama3-8b", "qwen2.5-7b")


def fit_configs() -> list[Path]:
    """Stand-alone fit configs (tiny, smollm2); the recipes and model families compose (below)."""
    return sorted(
        p
        for p in CONFIGS.rglob("*.yaml")
        if p.relative_to(CONFIGS).parts[0] not in SKIP_DIRS | {"strategies", "recipes", "models"}
    )


def composition(kind: str, method: str, family: str) -> list[Path]:
    return [CONFIGS / "recipes" / f"{kind}.yaml", CONFIGS / "recipes" / f"{method}.yaml",
            CONFIGS / "models" / f"{family}.yaml"]


def test_configs_found():
    assert {p.stem for p in (CONFIGS / "recipes").glob("*.yaml")} == set(KINDS) | set(METHODS)
    assert {p.stem for p in (CONFIGS / "models").glob("*.yaml")} == set(FAMILIES)
    assert {p.stem for p in STRATEGY_DIR.glob("*.yaml")} == {
        "ddp",
        "fsdp",
        "deepspeed_zero2",
        "deepspeed_zero3",
    }


@pytest.mark.parametrize("path", fit_configs(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_fit_config_parses(path):
    cfg = parse(path)
    assert cfg.model.class_path.startswith("agentrm.lit.")
    assert cfg.model.init_args.tokenizer == cfg.data.tokenizer  # the CLI's link applied


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_composition_parses(kind, method, family):
    """Every kind x method x model family is one command line; each file sets its own part only."""
    root = f"runs/{family}/{kind}_{method}"
    cfg = parse(*composition(kind, method, family), extra=("--trainer.default_root_dir", root))
    init = cfg.model.init_args
    assert cfg.model.class_path.endswith("ValueRMModule" if kind == "value_rm" else "ImplicitPRMModule")
    assert init.backbone == cfg.data.tokenizer == init.tokenizer and "/" in init.backbone
    assert cfg.data.max_length == 4096 and cfg.data.train_path
    assert bool(init.lora) == (method != "full") and (init.quantization == "nf4") == (method == "qlora")
    assert str(cfg.trainer.devices) == {"full": "8", "lora": "4", "qlora": "1"}[method]
    # every output path follows the run's root: checkpoints, export, metrics
    paths = {cb.class_path.rsplit(".", 1)[-1]: cb.init_args.get("dirpath") for cb in cfg.trainer.callbacks
             if cb.init_args is not None}
    assert paths["ResumableCheckpoint"] == f"{root}/checkpoints" and paths["ExportHF"] == f"{root}/hf_model"
    assert cfg.trainer.logger.init_args.save_dir == root


def test_fsdp_policy_wraps_decoder_layers_of_any_family():
    from transformers import AutoConfig, AutoModelForCausalLM

    from agentrm.lit.fsdp import decoder_layer_policy

    for model_type in ("llama", "qwen2"):
        cfg = AutoConfig.for_model(
            model_type,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=64,
        )
        model = AutoModelForCausalLM.from_config(cfg)
        wrapped = [m for m in model.modules() if decoder_layer_policy(m, recurse=False)]
        assert len(wrapped) == 2 and all(decoder_layer_policy(m, recurse=True) for m in model.modules())


@pytest.mark.parametrize(
    "path",
    sorted(CONFIGS.glob("search/*.yaml")) + sorted(CONFIGS.glob("paper/*.yaml")) + sorted(CONFIGS.glob("pipeline/*.yaml")),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_search_and_pipeline_configs_parse(path, capsys):
    """``--print_config`` parses and validates the whole config against its CLI, then exits 0 without running."""
    from agentrm import pipeline
    from agentrm.search import evaluate

    main = pipeline.main if path.parent.name == "pipeline" else evaluate.main
    with pytest.raises(SystemExit) as e:
        main(["--config", str(path), "--print_config"])
    assert e.value.code == 0
    assert "seed" in capsys.readouterr().out


def test_single_gpu_nf4_search_example(capsys):
    """The 8B nf4 search example keeps its loading fields through the search CLI's parser."""
    import yaml

    from agentrm.search import evaluate

    with pytest.raises(SystemExit) as e:
        evaluate.main(["--config", str(CONFIGS / "search" / "llama3-8b_nf4.yaml"), "--print_config"])
    assert e.value.code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    (rm,) = cfg["scorers"]
    assert (rm["kind"], rm["device"], rm["dtype"], rm["quantization"]) == ("value_rm", "cuda:0", "bfloat16", "nf4")
    assert rm["path"].startswith("runs/llama3-8b/value_rm_lora") and cfg["policy"]["kind"] == "openai"
