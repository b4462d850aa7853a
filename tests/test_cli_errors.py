"""A config whose model cannot be built ends ``fit``, ``search`` and ``pipeline`` with one clear line.

Each command runs in a subprocess as a user would start it: exit code 2, the cause as stderr's last
line (naming the config section), a short stderr and no jsonargparse ``Union subtypes`` dump;
``AGENTRM_DEBUG=1`` brings the traceback back.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import yaml

from agentrm.cli_errors import BuildError, building, one_line, root_cause
from agentrm.paths import PROJECT_ROOT


def run(module: str, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "AGENTRM_DEBUG": "", **(env or {})}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=PROJECT_ROOT, env=full_env,
                          capture_output=True, text=True, timeout=300)
    return proc, time.perf_counter() - t0


def assert_one_line_error(proc: subprocess.CompletedProcess, prog: str, *expected: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) < 10, proc.stderr
    assert "Union subtypes" not in proc.stderr and "Traceback" not in proc.stderr
    last = lines[-1]
    assert last.startswith(f"{prog}: error: "), last
    for text in expected:
        assert text in last, last
    assert any("AGENTRM_DEBUG=1" in line for line in lines[:-1])  # the hint
    return last


def test_fit_qlora_config_without_the_weights_fails_at_once_in_one_line():
    """nf4 itself runs on a CPU now (bitsandbytes); what is missing here is the 8B checkpoint."""
    proc, seconds = run("agentrm.fit", "--config", "configs/recipes/value_rm.yaml", "--config", "configs/recipes/qlora.yaml", "--config", "configs/models/llama3-8b.yaml")
    assert_one_line_error(proc, "agentrm.fit", "configs/models/llama3-8b.yaml", "model (ValueRMModule)",
                          "backbone 'meta-llama/Meta-Llama-3-8B-Instruct'", "HF_HUB_OFFLINE is set")
    assert seconds < 40  # no hub download retries (they took ~45 s before anything was checked)


def test_fit_debug_env_shows_the_traceback():
    proc, _ = run("agentrm.fit", "--config", "configs/recipes/value_rm.yaml", "--config", "configs/recipes/qlora.yaml", "--config", "configs/models/llama3-8b.yaml", env={"AGENTRM_DEBUG": "1"})
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ModelUnreachable" in proc.stderr


def test_fit_quantization_with_sharding_strategy_is_refused_from_the_config():
    """Checked from the parsed config before the model, the tokenizer or the trainer is built (also on a GPU host)."""
    proc, _ = run("agentrm.fit", "--config", "configs/recipes/value_rm.yaml", "--config", "configs/recipes/qlora.yaml", "--config", "configs/models/llama3-8b.yaml",
                  "--config", "configs/strategies/fsdp.yaml")
    assert_one_line_error(proc, "agentrm.fit", "configs/strategies/fsdp.yaml", "strategy 'fsdp'")


def test_search_nf4_scorer_on_a_device_without_a_backend_fails_before_anything_is_built(tmp_path):
    cfg = {
        "out_dir": str(tmp_path / "out"),
        "held_in": ["babyai:GoToRedBall?max_steps=24"],
        "episodes": 1,
        "policy": {"kind": "expert"},
        "scorers": [{"kind": "value_rm", "path": "runs/llama3-8b/value_rm_lora/hf_model", "quantization": "nf4",
                     "device": "mps"}],
        "best_of_n": [2],
        "beam": [],
    }
    path = tmp_path / "nf4.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc, _ = run("agentrm.search", "--config", str(path))
    assert_one_line_error(proc, "agentrm.search", "scorers[0]", "quantization='nf4' runs on a CUDA GPU or the CPU")
    assert not (tmp_path / "out").exists()  # nothing ran


def test_search_missing_rm_directory_names_the_field(tmp_path):
    cfg = {"out_dir": str(tmp_path / "out"), "held_in": ["babyai:GoToRedBall?max_steps=24"], "episodes": 1,
           "scorers": [{"kind": "value_rm", "path": str(tmp_path / "no_rm"), "device": "cpu"}], "beam": []}
    path = tmp_path / "missing.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc, _ = run("agentrm.search", "--config", str(path))
    assert_one_line_error(proc, "agentrm.search", "scorers[0].path", "no_rm")


def test_pipeline_missing_model_fails_in_one_line_naming_the_stage(tmp_path):
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "envs": ["babyai:GoToRedBall?max_steps=24"],
        "num_threads": 1,
        "progress": False,
        "expert": {"path": "agentrm/assets/babyai_expert.jsonl"},
        "sft": {"config": "configs/tiny/policy_sft.yaml",
                "overrides": {"model": {"init_args": {"backbone": str(tmp_path / "no_model"), "backbone_config": None}}}},
        "eval": {"enabled": False},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc, _ = run("agentrm.pipeline", "--config", str(path))
    assert_one_line_error(proc, "agentrm.pipeline", "sft stage", "model (PolicySFTModule)", "backbone",
                          "no_model", "no such file or directory")


def test_pipeline_checks_the_files_it_names_before_any_stage(tmp_path):
    from agentrm.pipeline import FitStage, PipelineConfig, run_pipeline

    with pytest.raises(BuildError, match=r"rm\.config: not found: .*no_such\.yaml"):
        run_pipeline(PipelineConfig(run_dir=str(tmp_path / "run"), envs=["babyai:GoToRedBall?max_steps=24"],
                                    progress=False, rm=FitStage("configs/tiny/no_such.yaml")))
    assert not (tmp_path / "run" / "expert").exists()  # no stage ran


def test_root_cause_and_building():
    try:
        try:
            raise ValueError("quantization='nf4' needs\n   a CUDA GPU")
        except ValueError as inner:
            raise TypeError("Does not validate against any of the Union subtypes") from inner
    except TypeError as outer:
        assert isinstance(root_cause(outer), ValueError)
        assert one_line(root_cause(outer)) == "quantization='nf4' needs a CUDA GPU"
    with pytest.raises(BuildError, match=r"^scorers\[1\]: boom$"):
        with building("scorers[1]"):
            raise OSError("boom")
    with pytest.raises(BuildError) as e, building("outer"):
        with building("inner"):
            raise ValueError("x")
    assert str(e.value) == "inner: x"  # an inner BuildError is not prefixed twice


# --- data errors and crashes --------------------------------------------------------------------------


def test_run_cli_prints_data_errors_in_one_line_and_keeps_crashes(capsys, monkeypatch):
    from agentrm.cli_errors import run_cli
    from agentrm.data.schema import DataFormatError

    monkeypatch.delenv("AGENTRM_DEBUG", raising=False)

    def bad_data(argv):
        raise DataFormatError("train.jsonl", 3, "steps[0].value", "must be finite, got nan")

    with pytest.raises(SystemExit) as e:
        run_cli("agentrm.fit", bad_data, [])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "agentrm.fit: error: train.jsonl:3: field 'steps[0].value': must be finite, got nan")

    def crash(argv):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):  # a genuine crash keeps its traceback (exit 1)
        run_cli("agentrm.fit", crash, [])
    monkeypatch.setenv("AGENTRM_DEBUG", "1")
    with pytest.raises(DataFormatError):
        run_cli("agentrm.fit", bad_data, [])


def test_fit_counts_errors_raised_by_agentrm_in_data_setup_as_usage_errors():
    import lightning as L

    from agentrm.fit import fit_usage_error
    from agentrm.paths import resolve_path

    class DM(L.LightningDataModule):
        def __init__(self, what):
            super().__init__()
            self.what = what

        def setup(self, stage=None):
            if self.what == "missing":
                resolve_path("no/such/train.jsonl")  # raised by agentrm code: a usage error
            int("not a number")  # a ValueError raised outside agentrm: a crash

    def caught(what):
        try:
            DM(what).setup("fit")
        except Exception as e:
            return e

    assert fit_usage_error(caught("missing"))
    assert not fit_usage_error(caught("bug"))
    assert not fit_usage_error(RuntimeError("x"))


# --- parse errors: the key, where it was given, the closest names -------------------------------------


class Head:
    def __init__(self, width: int = 4, dropout: float = 0.0):
        self.width, self.dropout = width, dropout


class WideHead(Head):
    def __init__(self, width: int = 8, activation: str = "relu"):
        super().__init__(width)


def toy(train_path: str = "x.jsonl", max_epochs: int = 1, head: Head | None = None, learning_rate: float = 0.1):
    """A toy command."""
    return {"train_path": train_path, "max_epochs": max_epochs}


def parse_error(capsys, argv) -> str:
    from agentrm.cli_errors import auto_cli

    with pytest.raises(SystemExit) as e:
        auto_cli(toy, argv, "agentrm.toy")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "usage" not in " ".join(err).lower(), err  # a hint and the error, no usage dump
    assert err[0].startswith("(--help lists every option")
    return err[1]


def test_flag_typo_names_the_flag_and_the_closest(capsys, monkeypatch):
    monkeypatch.delenv("AGENTRM_DEBUG", raising=False)
    assert parse_error(capsys, ["--max_epochz", "3"]) == (
        "agentrm.toy: error: unknown option --max_epochz; did you mean --max_epochs?")
    # an abbreviation is a typo too, not a prefix to guess (argparse would take it as --max_epochs)
    assert "did you mean --max_epochs?" in parse_error(capsys, ["--max_epoch", "3"])
    assert parse_error(capsys, ["--max_epochs", "three"]).startswith("agentrm.toy: error: ")


def test_yaml_typo_names_the_key_its_file_and_the_closest(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("AGENTRM_DEBUG", raising=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train_pth: a.jsonl\n")
    line = parse_error(capsys, ["--config", str(cfg)])
    assert line == f"agentrm.toy: error: unknown key 'train_pth' (in {cfg}); did you mean 'train_path'?", line


def test_subclass_option_typo_names_the_class_option(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("AGENTRM_DEBUG", raising=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"head:\n  class_path: {__name__}.WideHead\n  init_args:\n    activaton: gelu\n")
    line = parse_error(capsys, ["--config", str(cfg)])
    assert line == (f"agentrm.toy: error: head: unknown key 'activaton' for WideHead (in {cfg}); "
                    "did you mean 'activation'?"), line


def test_parse_error_with_debug_shows_the_parsers_full_message(capsys, monkeypatch):
    from agentrm.cli_errors import auto_cli

    monkeypatch.setenv("AGENTRM_DEBUG", "1")
    with pytest.raises(SystemExit) as e:
        auto_cli(toy, ["--max_epochz", "3"], "agentrm.toy")
    assert e.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_explain_keeps_one_line_for_other_errors():
    from agentrm.cli_errors import explain_parse_error

    msg = 'Parser key "trainer.devices":\n  Expected a <class \'int\'>. Got value: x\n  Given value: x'
    assert explain_parse_error(None, msg, []) == "Parser key \"trainer.devices\": Expected a <class 'int'>. Got value: x"


def test_fit_model_option_typo_is_one_line_with_the_closest_name(capsys, monkeypatch):
    """LightningCLI reports a subclass option typo as a dump of the whole namespace; fit names the key."""
    from agentrm.fit import main

    monkeypatch.delenv("AGENTRM_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["--config", "configs/tiny/value_rm.yaml", "--model.init_args.learnin_rate", "0.1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "agentrm.fit: error: model: unknown key 'learnin_rate' for ValueRMModule; did you mean 'learning_rate'?"
    assert len(err) == 2 and "Union subtypes" not in " ".join(err)
