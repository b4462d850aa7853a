"""A tiny, fast training setup on synthetic but learnable trajectories."""

from __future__ import annotations

import random

import pytest
import yaml

from agentrm.data.schema import Step, Trajectory, write_jsonl
from agentrm.data.tiny_tokenizer import train_tiny_tokenizer, trajectory_texts

TINY_BACKBONE = {
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 256,
}


def learnable_trajectories(n: int, seed: int = 0) -> list[Trajectory]:
    """Successful episodes see the ball; failed ones walk into walls. Values follow the outcome."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        success = rng.random() < 0.5
        k = rng.randint(1, 4)
        steps = []
        for j in range(k):
            if success:
                steps.append(Step("move forward", f"You see the ball {k - j} steps ahead.", 0.6 + 0.4 * (j + 1) / k))
            else:
                steps.append(Step(rng.choice(["turn left", "toggle"]), "You face a wall.", 0.3 - 0.3 * (j + 1) / k))
        out.append(Trajectory(f"s{seed}-{i}", "GoToBall", "Go to the ball.", steps,
                              reward=0.9 if success else 0.0, success=success))
    return out


@pytest.fixture()
def tiny_setup(tmp_path):
    """Files for a 2-layer, 32-wide value RM run; returns (config_path, run_dir)."""
    trajs = learnable_trajectories(48)
    data = tmp_path / "train.jsonl"
    write_jsonl(data, trajs)
    tok = train_tiny_tokenizer(trajectory_texts(trajs), vocab_size=300)
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)
    run = tmp_path / "run"
    cfg = {
        "seed_everything": 3,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": 4, "default_root_dir": str(run),
            "enable_progress_bar": False, "log_every_n_steps": 1, "num_sanity_val_steps": 0,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(run), "name": "logs"}},
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(run / "checkpoints"), "save_last": True, "save_top_k": -1}},
                {"class_path": "agentrm.lit.callbacks.ExportHF", "init_args": {"dirpath": str(run / "hf_model")}},
            ],
        },
        "model": {"class_path": "agentrm.lit.value_module.ValueRMModule",
                  "init_args": {"backbone_config": TINY_BACKBONE, "learning_rate": 3e-3, "warmup_steps": 2}},
        "data": {"train_path": str(data), "tokenizer": str(tok_dir), "val_fraction": 0.25,
                 "max_length": 128, "batch_size": 8},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, run
