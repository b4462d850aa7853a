"""DeepSpeed ZeRO-3 at world size 1: a value RM and an implicit PRM trained through Lightning's
DeepSpeedStrategy, the way a user runs it (``python -m agentrm.fit --config ... --config
configs/strategies/deepspeed_zero3.yaml``), on a 2-layer, 32-wide Llama.

ZeRO-3 partitions the parameters and gathers them in forward pre-hooks; the implicit PRM's fused kernel reads
``lm_head.weight`` directly (``agentrm.models.head_call``), and the export runs after training. DeepSpeed
keeps parameters under ``stage3_param_persistence_threshold`` (100k elements by default) whole, which is every
parameter of a tiny model, so the run sets it to 0 (through a DeepSpeed config file given to the strategy of
``configs/strategies/deepspeed_zero3.yaml``): every parameter is then partitioned, as an 8B model's are.
(Checked on CPU with DeepSpeed alone: after a step, ``state_dict()`` then holds 0-element tensors outside
``deepspeed.zero.GatheredParameters``, full ones inside.) The tests check that a few optimizer steps run with
finite, logged losses, and that the exported model loads with full (not partitioned-away) weights and scores. Needs CUDA, ``deepspeed`` and ``jsonargparse`` (both carried to a
bare lent machine by ``scripts/fetch_device_wheels.sh``); DeepSpeed's ops are not prebuilt and JIT-compile
on first use, so the first run may take longer.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml

from agentrm.paths import PROJECT_ROOT
from tests.lit.test_ddp import epoch_metrics, fixed_length_trajectories, run_args, write_setup

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                       reason="needs deepspeed (pip install deepspeed; scripts/fetch_device_wheels.sh builds it)"),
    pytest.mark.skipif(importlib.util.find_spec("jsonargparse") is None,
                       reason="needs jsonargparse for python -m agentrm.fit"),
]
ZERO3 = PROJECT_ROOT / "configs" / "strategies" / "deepspeed_zero3.yaml"
MODULES = {"value_rm": "agentrm.lit.value_module.ValueRMModule",
           "implicit_prm": "agentrm.lit.prm_module.ImplicitPRMModule"}
STEPS = 4
# the yaml's ZeRO settings, with every parameter partitioned (see the module docstring)
DS_CONFIG = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "overlap_comm": True,
                                   "contiguous_gradients": True},
             "zero_allow_untested_optimizer": True}
TIMEOUT_S = 180  # below the 200 s per-test limit that bench/gpu_check.py sets


@pytest.fixture(scope="module", params=sorted(MODULES))
def zero3_run(request, tmp_path_factory):
    """One ZeRO-3 fit of ``STEPS`` optimizer steps; returns ``(kind, run_dir)`` or fails with its stderr."""
    kind = request.param
    tmp = tmp_path_factory.mktemp(f"zero3_{kind}")
    cfg = write_setup(tmp, fixed_length_trajectories(32, 3, seed=1), fixed_length_trajectories(8, 3, seed=2),
                      epochs=1)
    conf = yaml.safe_load(cfg.read_text())
    conf["model"]["class_path"] = MODULES[kind]
    cfg.write_text(yaml.safe_dump(conf))
    run = tmp / "run"
    ds_config = tmp / "ds_zero3_partition_all.json"
    ds_config.write_text(json.dumps(DS_CONFIG))
    cmd = [sys.executable, "-m", "agentrm.fit", "--config", str(cfg), "--config", str(ZERO3),
           "--trainer.strategy.init_args.config", str(ds_config),
           "--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.max_steps", str(STEPS),
           "--trainer.limit_val_batches", "2", *run_args(run, 4)]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"ZeRO-3 {kind} run did not finish in {TIMEOUT_S} s: {(e.stderr or b'')[-3000:]!r}")
    assert proc.returncode == 0, f"ZeRO-3 {kind} run failed:\n{proc.stderr[-6000:]}"
    return kind, run


def test_zero3_steps_log_finite_losses(zero3_run):
    kind, run = zero3_run
    losses = epoch_metrics(run, "train/loss")
    assert len(losses) == STEPS, (kind, losses)  # log_every_n_steps is 1 in the test config
    assert all(math.isfinite(x) for x in losses), (kind, losses)


def test_zero3_export_holds_full_weights_and_scores(zero3_run):
    kind, run = zero3_run
    from agentrm.data.schema import Step
    from agentrm.models.implicit_prm import ImplicitPRM
    from agentrm.models.value_rm import ValueRewardModel
    from agentrm.paths import load_tokenizer
    from agentrm.scoring import ImplicitPRMScorer, ValueRMScorer
    from tests.conftest import make_trajectory

    cls = ValueRewardModel if kind == "value_rm" else ImplicitPRM
    model = cls.from_pretrained(run / "hf_model", device="cuda").eval()
    params = dict(model.named_parameters())
    empty = [name for name, p in params.items() if p.numel() == 0]
    assert not empty, f"{kind}: parameters saved partitioned (empty): {empty[:5]}"
    assert all(torch.isfinite(p).all() for p in params.values()), kind
    tok = load_tokenizer(str(run.parent / "tok"))
    prefix, actions = make_trajectory("p", 2), ["move forward", "turn left", "toggle"]
    if kind == "value_rm":
        scores = ValueRMScorer(model, tok).score_candidates(prefix, [Step(a, "You see the ball.") for a in actions])
    else:
        scores = ImplicitPRMScorer(model, tok, include_prefix=False).score_candidates(prefix, actions)
    scores = torch.as_tensor(scores).float()
    assert scores.shape[0] == len(actions) and torch.isfinite(scores).all(), (kind, scores)
