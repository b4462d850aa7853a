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
    proc, seconds = run("agentrm.fit", "--config", "configs/llama3-8b/value_rm_qlora.yaml")
    assert_one_line_error(proc, "agentrm.fit", "configs/llama3-8b/value_rm_qlora.yaml", "model (ValueRMModule)",
                          "backbone 'meta-llama/Meta-Llama-3-8B-Instruct'", "HF_HUB_OFFLINE is set")
    assert seconds < 40  # no hub download retries (they took ~45 s before anything was checked)


def test_fit_debug_env_shows_the_traceback():
    proc, _ = run("agentrm.fit", "--config", "configs/llama3-8b/value_rm_qlora.yaml", env={"AGENTRM_DEBUG": "1"})
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ModelUnreachable" in proc.stderr


def test_fit_quantization_with_sharding_strategy_is_refused_from_the_config():
    """Checked from the parsed config before the model, the tokenizer or the trainer is built (also on a GPU host)."""
    proc, _ = run("agentrm.fit", "--config", "configs/llama3-8b/value_rm_qlora.yaml",
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
    from agentrm.pipeline import FitStage, run_pipeline

    with pytest.raises(BuildError, match=r"rm\.config: not found: .*no_such\.yaml"):
        run_pipeline(run_dir=str(tmp_path / "run"), envs=["babyai:GoToRedBall?max_steps=24"], progress=False,
                     rm=FitStage("configs/tiny/no_such.yaml"))
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
