"""The implicit PRM under FSDP2 (``fully_shard``, 2 CPU processes over gloo) equals one process.

The LM heads are sharded units of their own, so their weight is a shard outside their forward: the loss
is right only because the log-ratio kernel reads it inside the head's forward (``agentrm.models.head_call``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from agentrm.paths import PROJECT_ROOT

TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp2_result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp2") / "result.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), "tests/lit/fsdp2_worker.py", str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    try:
        proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"FSDP2 run hung for {TIMEOUT_S} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


def test_fsdp2_loss_and_gradients_equal_single_process(fsdp2_result):
    r = fsdp2_result
    print(r)
    assert r["lm_head_sharded_outside_forward"]  # a read outside forward would see a shard
    assert r["fsdp2_loss"] == pytest.approx(r["single_loss"], rel=1e-5, abs=1e-6)
    assert r["lm_head_grad_norm"] > 0
    assert r["max_grad_diff"] < 1e-5, r["worst_param"]


def test_fsdp2_shards_the_reference(fsdp2_result):
    r = fsdp2_result
    assert r["reference_bytes_per_rank"] <= 0.55 * r["reference_bytes_replicated"]
