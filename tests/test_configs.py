"""Every YAML under configs/ parses against the fit CLI's parser, without building any model.

``configs/search/``, ``configs/paper/`` (search configs) and ``configs/pipeline/`` belong to other CLIs and parse against those; ``configs/strategies/`` holds
trainer fragments, parsed composed after a model config (as the docs tell users to run them).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest

from agentrm.fit import AgentRMCLI
from agentrm.lit.datamodule import TrajectoryDataModule
from agentrm.paths import PROJECT_ROOT

CONFIGS = PROJECT_ROOT / "configs"
SKIP_DIRS = {"search", "pipeline", "paper"}
STRATEGY_DIR = CONFIGS / "strategies"


class ParseOnlyCLI(AgentRMCLI):
    """Parses and validates (class paths, init args, links) but instantiates nothing."""

    def instantiate_classes(self) -> None:
        pass


def parse(*config_files: Path, extra: tuple[str, ...] = ()):
    args = [a for f in config_files for a in ("--config", str(f))] + list(extra)
    cli = ParseOnlyCLI(
        L.LightningModule,
        TrajectoryDataModule,
        subclass_mode_model=True,
        run=False,
        args=args,
        save_config_kwargs={"overwrite": True},
    )
    return cli.config


def fit_configs() -> list[Path]:
    return sorted(
        p
        for p in CONFIGS.rglob("*.yaml")
        if p.relative_to(CONFIGS).parts[0] not in SKIP_DIRS | {"strategies"}
    )


def test_configs_found():
    names = {str(p.relative_to(CONFIGS)) for p in fit_configs()}
    for fam in ("llama3-8b", "qwen2.5-7b"):
        for task in ("value_rm", "implicit_prm"):
            for mode in ("full", "lora", "qlora"):
                assert f"{fam}/{task}_{mode}.yaml" in names
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
    if "qlora" in path.stem:
        assert cfg.model.init_args.quantization == "nf4" and cfg.model.init_args.lora
        assert cfg.trainer.devices == 1  # QLoRA: one GPU


@pytest.mark.parametrize("strategy", sorted(STRATEGY_DIR.glob("*.yaml")), ids=lambda p: p.stem)
@pytest.mark.parametrize("model", ["llama3-8b/value_rm_full.yaml", "llama3-8b/implicit_prm_lora.yaml"])
def test_strategy_composes_with_model_config(strategy, model):
    """A strategy file given after a model config replaces its strategy, class and init args."""
    cfg = parse(CONFIGS / model, strategy, extra=("--trainer.devices", "4", "--trainer.num_nodes", "2"))
    expected = {
        "ddp": "DDPStrategy",
        "fsdp": "FSDPStrategy",
        "deepspeed_zero2": "DeepSpeedStrategy",
        "deepspeed_zero3": "DeepSpeedStrategy",
    }[strategy.stem]
    assert cfg.trainer.strategy.class_path.endswith(expected)
    assert str(cfg.trainer.devices) == "4" and cfg.trainer.num_nodes == 2  # devices is list | str | int
    if strategy.stem.startswith("deepspeed"):
        assert cfg.trainer.strategy.init_args.stage == int(strategy.stem[-1])
    if strategy.stem == "fsdp":
        assert cfg.trainer.strategy.init_args.auto_wrap_policy is not None


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
