"""Multi-process training on CPU (DDP over gloo), run as ``python -m agentrm.fit`` subprocesses.

Each DDP run has a timeout, so a hang (a collective that one rank skips) fails the test
instead of blocking the suite.
"""

from __future__ import annotations

import csv
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
from safetensors.torch import load_file
from torch.utils.data import DataLoader, DistributedSampler

from agentrm.data.schema import Step, Trajectory, write_jsonl
from agentrm.data.tiny_tokenizer import train_tiny_tokenizer, trajectory_texts
from agentrm.fit import main
from agentrm.lit.datamodule import DistributedEpochShuffleSampler, EpochShuffleSampler
from agentrm.models.value_rm import ValueRewardModel
from agentrm.paths import PROJECT_ROOT
from tests.lit.conftest import TINY_BACKBONE

DDP_TIMEOUT_S = 300


def fixed_length_trajectories(n: int, steps: int, seed: int, labeled: bool = True) -> list[Trajectory]:
    """Every trajectory has ``steps`` steps, so each rank's half-batch holds the same number of labels
    and the mean of the ranks' mean losses equals the global-batch mean loss."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        success = rng.random() < 0.5
        st = []
        for j in range(steps):
            value = (0.6 + 0.4 * (j + 1) / steps) if success else (0.3 - 0.3 * (j + 1) / steps)
            action = "move forward" if success else rng.choice(["turn left", "toggle"])
            obs = "You see the ball." if success else "You face a wall."
            st.append(Step(action, obs, value if labeled else None))
        out.append(
            Trajectory(
                f"d{seed}-{i}",
                "GoToBall",
                "Go to the ball.",
                st,
                reward=0.9 if success else 0.0,
                success=success,
            )
        )
    return out


def write_setup(tmp_path: Path, train: list[Trajectory], val: list[Trajectory], epochs: int) -> Path:
    """Data, tokenizer and a value-RM config (no validation split: an explicit, even-sized val file)."""
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "val.jsonl", val)
    tok = train_tiny_tokenizer(trajectory_texts(train + val), vocab_size=300)
    tok.save_pretrained(tmp_path / "tok")
    cfg = {
        "seed_everything": 5,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": epochs,
            "enable_progress_bar": False,
            "log_every_n_steps": 1,
            "num_sanity_val_steps": 0,
            "enable_checkpointing": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp_path / "unused"), "name": "logs"},
            },
        },
        "model": {
            "class_path": "agentrm.lit.value_module.ValueRMModule",
            "init_args": {
                "backbone_config": TINY_BACKBONE,
                "learning_rate": 3e-3,
                "warmup_steps": 1,
                "weight_decay": 0.01,
            },
        },
        "data": {
            "train_path": str(tmp_path / "train.jsonl"),
            "val_path": str(tmp_path / "val.jsonl"),
            "tokenizer": str(tmp_path / "tok"),
            "max_length": 256,
            "batch_size": 8,
        },
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_args(run: Path, batch_size: int) -> list[str]:
    return [
        "--trainer.default_root_dir",
        str(run),
        "--trainer.logger.init_args.save_dir",
        str(run),
        "--trainer.callbacks+=agentrm.lit.callbacks.ExportHF",
        "--trainer.callbacks.dirpath",
        str(run / "hf_model"),
        "--data.batch_size",
        str(batch_size),
    ]


def run_ddp(cfg: Path, run: Path, batch_size: int) -> subprocess.CompletedProcess:
    """``python -m agentrm.fit`` with 2 CPU processes (gloo); fails the test on timeout (a hang)."""
    cmd = [
        sys.executable,
        "-m",
        "agentrm.fit",
        "--config",
        str(cfg),
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--trainer.accelerator",
        "cpu",
        *run_args(run, batch_size),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    env.pop("MASTER_PORT", None)
    try:
        proc = subprocess.run(
            cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=DDP_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"DDP run hung (> {DDP_TIMEOUT_S}s): {(e.stderr or b'')[-3000:]!r}")
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


def epoch_metrics(run: Path, key: str) -> list[float]:
    rows = list(csv.DictReader(open(next((run / "logs").glob("version_*/metrics.csv")))))
    return [float(r[key]) for r in rows if r.get(key)]


def test_lightning_would_reshuffle_a_plain_custom_sampler():
    """Why the DataModule builds its own distributed sampler: for training Lightning wraps a custom
    sampler in a DistributedSamplerWrapper with ``shuffle=True``, which permutes the epoch order a
    second time, so the ranks' batches would not form the single-process batches."""
    dl = DataLoader(list(range(16)), batch_size=4, sampler=EpochShuffleSampler(16, 7))
    wrapped = _get_distributed_sampler(dl, shuffle=True, overfit_batches=0, num_replicas=2, rank=0)
    assert wrapped.shuffle
    assert list(wrapped) != list(EpochShuffleSampler(16, 7))[0::2]


@pytest.mark.parametrize("n", [24, 23])
def test_distributed_sampler_splits_the_global_batch(n):
    """Rank r takes every 2nd index of the epoch permutation: batch i of the two ranks together is
    exactly batch i of one process with twice the batch size; Lightning leaves the sampler alone."""
    seed = 7
    single = DataLoader(list(range(n)), batch_size=8, sampler=EpochShuffleSampler(n, seed))
    ranks = [DistributedEpochShuffleSampler(n, seed, num_replicas=2, rank=r) for r in range(2)]
    dl = DataLoader(list(range(n)), batch_size=4, sampler=ranks[0])
    assert isinstance(dl.sampler, DistributedSampler)  # so Lightning does not wrap it again
    for epoch in (0, 3):
        single.sampler.set_epoch(epoch)
        for s in ranks:
            s.set_epoch(epoch)
        per_rank = [list(s) for s in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == (n + 1) // 2
        assert set(per_rank[0] + per_rank[1]) == set(range(n))
        for i, batch in enumerate(single):
            union = per_rank[0][4 * i : 4 * i + 4] + per_rank[1][4 * i : 4 * i + 4]
            if len(batch) == 8:
                assert sorted(union) == sorted(batch.tolist())
    ranks[0].set_epoch(1)
    assert list(ranks[0]) != per_rank[0]  # a new epoch, a new order


def test_ddp_two_processes_match_one(tmp_path):
    """2 processes x batch 4 train like 1 process x batch 8: same epoch losses, same val/mse, same head."""
    train = fixed_length_trajectories(32, 3, seed=1)
    val = fixed_length_trajectories(8, 3, seed=2)
    cfg = write_setup(tmp_path, train, val, epochs=2)
    one, two = tmp_path / "one", tmp_path / "two"
    main(["--config", str(cfg), *run_args(one, 8)])
    run_ddp(cfg, two, 4)
    for key in ("train/epoch_loss", "val/mse", "val/auroc", "val/type_auroc"):
        a, b = epoch_metrics(one, key), epoch_metrics(two, key)
        assert len(a) == len(b) == 2, (key, a, b)
        assert b == pytest.approx(a, rel=2e-3, abs=1e-5), key
    head1 = load_file(str(one / "hf_model" / "value_head.safetensors"))
    head2 = load_file(str(two / "hf_model" / "value_head.safetensors"))
    for k in head1:
        torch.testing.assert_close(head2[k], head1[k], rtol=1e-3, atol=1e-4)


def test_ddp_rank_without_labels_does_not_hang(tmp_path):
    """Val item 0 (rank 0) has step values, item 1 (rank 1) has none; half the training items have none.

    The run must finish (metric computes are collective on every rank) and the logged val/mse
    must be the MSE over rank 0's labelled steps alone, recomputed here from the exported model.
    """
    train = fixed_length_trajectories(4, 2, seed=3) + fixed_length_trajectories(4, 2, seed=4, labeled=False)
    val = fixed_length_trajectories(1, 3, seed=5) + fixed_length_trajectories(1, 2, seed=6, labeled=False)
    cfg = write_setup(tmp_path, train, val, epochs=1)
    cfg.write_text(cfg.read_text().replace("data:\n", "data:\n  allow_degenerate: true\n"))  # 8 labels on purpose
    run = tmp_path / "run"
    run_ddp(cfg, run, 1)
    logged = epoch_metrics(run, "val/mse")
    assert len(logged) == 1
    assert epoch_metrics(run, "val/auroc")  # rank 1's steps still count for AUROC

    from agentrm.lit.datamodule import TrajectoryDataModule

    dm = TrajectoryDataModule(
        train_path=str(tmp_path / "train.jsonl"),
        val_path=str(tmp_path / "val.jsonl"),
        tokenizer=str(tmp_path / "tok"),
        max_length=256,
        batch_size=2,
    )
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    model = ValueRewardModel.from_pretrained(run / "hf_model").eval()
    pred = model.score(batch)
    labeled = batch["step_mask"] & ~torch.isnan(batch["step_values"])
    assert labeled[0].all() and not labeled[1].any()
    expected = torch.mean((pred[labeled] - batch["step_values"][labeled]) ** 2).item()
    assert logged[0] == pytest.approx(expected, rel=1e-4, abs=1e-6)
