"""Fault cases for training data: labels checked against their meaning, truncation reported.

Each case runs ``python -m agentrm.fit`` on a tiny config written by its setup (2-layer, 32-wide LLaMA,
the shipped tiny tokenizer, one epoch on ~48 short trajectories): a few seconds each. The errors are
raised by the data module's setup inside ``trainer.fit`` (:class:`agentrm.data.schema.DataError`);
``agentrm.fit`` prints them as one line with exit code 2.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import yaml

from agentrm.data.schema import Trajectory, write_jsonl
from tests.faults.harness import FaultCase, Outcome
from tests.lit.conftest import TINY_BACKBONE, learnable_trajectories

TOKENIZER = "agentrm/assets/tiny_tokenizer"
N_TRAJECTORIES = 48
BAD_RECORD, BAD_STEP = 7, 0  # the record (0-based; line 8) whose first step value a case corrupts


def write_config(d: Path, model: str = "value", data: dict | None = None) -> None:
    """``{d}/cfg.yaml``: a one-epoch CPU fit of the tiny value RM (or implicit PRM) on ``{d}/train.jsonl``."""
    init = {"backbone_config": TINY_BACKBONE, "learning_rate": 3e-3, "warmup_steps": 1}
    module = "agentrm.lit.value_module.ValueRMModule"
    if model == "prm":
        module, init = "agentrm.lit.prm_module.ImplicitPRMModule", {**init, "beta": 0.5}
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": 1, "default_root_dir": str(d / "run"),
            "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
            "enable_checkpointing": False, "log_every_n_steps": 1,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(d / "run"), "name": "logs"}},
            "callbacks": [{"class_path": "agentrm.lit.callbacks.ExportHF",
                           "init_args": {"dirpath": str(d / "run" / "hf_model")}}],
        },
        "model": {"class_path": module, "init_args": init},
        "data": {"train_path": str(d / "train.jsonl"), "tokenizer": TOKENIZER, "val_fraction": 0.25,
                 "max_length": 256, "batch_size": 8, **(data or {})},
    }
    (d / "cfg.yaml").write_text(yaml.safe_dump(cfg))


def native(transform: Callable[[list[Trajectory]], list[Trajectory]] | None = None, model: str = "value",
           n: int = N_TRAJECTORIES, **data) -> Callable[[Path], None]:
    """Setup: ``n`` learnable trajectories (values in [0, 1]; ``transform`` may change them) and the config."""
    def setup(d: Path) -> None:
        trajs = learnable_trajectories(n)
        write_jsonl(d / "train.jsonl", transform(trajs) if transform else trajs)
        write_config(d, model, data)
    return setup


def corrupt_value(raw: str) -> Callable[[Path], None]:
    """Setup: the learnable file with record ``BAD_RECORD``'s first step value replaced by the JSON text ``raw``."""
    def setup(d: Path) -> None:
        native()(d)
        lines = (d / "train.jsonl").read_text().splitlines()
        rec = json.loads(lines[BAD_RECORD])
        rec["steps"][BAD_STEP]["value"] = "@@"
        lines[BAD_RECORD] = json.dumps(rec).replace('"@@"', raw)
        (d / "train.jsonl").write_text("\n".join(lines) + "\n")
    return setup


def agentgym(rewards: list[float] | None, model: str = "prm", **data) -> Callable[[Path], None]:
    """Setup: an AgentGym conversation file (``train.jsonl``) with these rewards (``None``: no reward field)."""
    def setup(d: Path) -> None:
        recs = []
        for i in range(N_TRAJECTORIES):
            reward = None if rewards is None else rewards[i % len(rewards)]
            good = reward is not None and reward >= 0.5
            conv = [{"from": "human", "value": "Go to the ball."},
                    {"from": "gpt", "value": "move forward" if good else "turn left"},
                    {"from": "human", "value": "You see the ball." if good else "You face a wall."},
                    {"from": "gpt", "value": "done" if good else "toggle"},
                    {"from": "human", "value": "You reached it." if good else "You face a wall."}]
            recs.append({"item_id": f"babyai_{i}", "conversations": conv, **({} if reward is None else {"reward": reward})})
        (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        write_config(d, model, data)
    return setup


def rescaled(trajs: list[Trajectory]) -> list[Trajectory]:
    """Values mapped from [0, 1] to [-1, 1]."""
    for t in trajs:
        for s in t.steps:
            s.value = 2 * s.value - 1
    return trajs


def all_ones(trajs: list[Trajectory]) -> list[Trajectory]:
    for t in trajs:
        for s in t.steps:
            s.value = 1.0
    return trajs


def truncating(fraction: float) -> Callable[[Path], None]:
    """Setup: max_length at the token length of the trajectory at this quantile (the longer ones lose steps)."""
    def setup(d: Path) -> None:
        from agentrm.data.tokenize import tokenize_trajectory
        from agentrm.paths import load_tokenizer

        trajs = learnable_trajectories(N_TRAJECTORIES)
        tok = load_tokenizer(TOKENIZER)
        lengths = sorted(len(tokenize_trajectory(tok, t).input_ids) for t in trajs)
        native(max_length=lengths[int(fraction * (len(lengths) - 1))])(d)
    return setup


def exported(d: Path, out: Outcome) -> None:
    assert (d / "run" / "hf_model" / "agentrm_config.json").is_file(), "no model was exported"


def output_has(pattern: str, exported_too: bool = True) -> Callable[[Path, Outcome], None]:
    import re

    def check(d: Path, out: Outcome) -> None:
        text = out.stderr + out.stdout
        assert re.search(pattern, text), f"{pattern!r} not in the output:\n{text[-2000:]}"
        if exported_too:
            exported(d, out)
    return check


FIT = "agentrm.fit"
ARGS = ["--config", "{d}/cfg.yaml"]
LINE = BAD_RECORD + 1
AT = rf"train\.jsonl:{LINE}: field 'steps\[{BAD_STEP}\]\.value': "

CASES: list[FaultCase] = [
    FaultCase("fit/value-below-range", "step value -5 refused (default range [0, 1])", FIT, ARGS,
              corrupt_value("-5"), message=AT + r"-5\.0 is outside the declared value range \[0, 1\]"),
    FaultCase("fit/value-above-range", "step value 7 refused, not clamped by BCE", FIT,
              [*ARGS, "--model.init_args.loss", "bce"], corrupt_value("7"),
              message=AT + r"7\.0 is outside the declared value range \[0, 1\]"),
    FaultCase("fit/value-nan", "NaN step value refused", FIT, ARGS, corrupt_value("NaN"),
              message=AT + "must be finite, got nan"),
    FaultCase("fit/value-string", "string step value refused", FIT, ARGS, corrupt_value('"0.9"'),
              message=AT + "expected number or null, got str"),
    FaultCase("fit/value-range-declared", "values in a declared [-1, 1] train with MSE", FIT,
              [*ARGS, "--data.value_range", "[-1, 1]"], native(rescaled), exit_code=0, check=exported),
    FaultCase("fit/value-range-bce", "BCE refused for a value range other than [0, 1]", FIT,
              [*ARGS, "--data.value_range", "[-1, 1]", "--model.init_args.loss", "bce"], native(rescaled),
              message=r"loss=bce needs value targets in \[0, 1\], but data\.value_range is \[-1, 1\]: pass "
                      r"--model\.init_args\.loss mse"),
    FaultCase("fit/value-range-invalid", "a value range with low >= high refused", FIT,
              [*ARGS, "--data.value_range", "[1, 0]"], native(), message=r"data\.value_range must have low < high"),
    FaultCase("fit/agentgym-partial-rewards", "partial rewards under success >= 1.0: one class, named rule",
              FIT, ARGS, agentgym([0.3, 0.6, 0.9, 0.0]),
              message=r"is a failure \(\d+ of them have a partial reward 0 < reward < 1, a failure by 'success = "
                      r"reward >= 1'"),
    FaultCase("fit/agentgym-success-threshold", "a declared success threshold; per-file outcome counts logged",
              FIT, [*ARGS, "--data.success_threshold", "0.5"], agentgym([0.3, 0.6, 0.9, 0.0]), exit_code=0,
              check=output_has(r"train\.jsonl \(success = reward >= 0\.5\): 48 records: 24 successes, 24 failures; "
                               r"36 partial rewards \(0 < reward < 1\), 24 counted as successes")),
    FaultCase("fit/unlabeled-success-value-rm", "demonstrations (no values) refused for a value RM, with the rule",
              FIT, [*ARGS, "--data.unlabeled", "success"], agentgym(None, model="value"),
              message=r"data\.unlabeled=success makes 48 records .* pass --data\.unlabeled success_values"),
    FaultCase("fit/one-class-values", "every step value equal: refused (a constant RM)", FIT, ARGS,
              native(all_ones), message=r"has the value 1: a value RM would learn a constant.*allow_degenerate"),
    FaultCase("fit/too-few-labels", "fewer labelled steps than data.min_labels refused", FIT, ARGS,
              native(n=6), message=r"only \d+ labelled steps .* fewer than data\.min_labels=32"),
    FaultCase("fit/allow-degenerate", "--data.allow_degenerate true trains on a tiny set", FIT,
              [*ARGS, "--data.allow_degenerate", "true"], native(n=6), exit_code=0, check=exported),
    FaultCase("fit/truncation-warning", "labels dropped by max_length counted and warned about", FIT, ARGS,
              truncating(0.5), exit_code=0,
              check=output_has(r"data\.max_length=\d+ drops \d+ of \d+ labelled steps \(\d+\.\d%\) of the train split")),
    FaultCase("fit/truncation-nothing-left", "max_length that drops every step: error naming max_length", FIT,
              [*ARGS, "--data.max_length", "8"], native(), message=r"data\.max_length=8 drops every step .*raise it"),
]
