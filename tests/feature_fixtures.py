"""Tiny saved backbones and trajectory files for the precompute / cached-feature tests (no hub, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from agentrm.data.schema import Step, Trajectory
from agentrm.precompute import PrecomputeConfig, precompute

ARCHS = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False),
    "gemma3": dict(model_type="gemma3_text", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                   sliding_window=512, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                   max_position_embeddings=512, tie_word_embeddings=True),
    "bert": dict(model_type="bert", hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 max_position_embeddings=512),
}


def save_tiny(arch: str, tokenizer, path: Path, seed: int = 0) -> Path:
    """A randomly initialised ``arch`` model with ``tokenizer``'s vocabulary saved (with the tokenizer) at ``path``.

    Decoders are saved as causal LMs (they load as base models too); the encoder as a base model.
    """
    cfg = dict(ARCHS[arch])
    model_type = cfg.pop("model_type")
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **cfg)
    model = (AutoModel if arch == "bert" else AutoModelForCausalLM).from_config(config)
    with torch.no_grad():  # norms away from 1 so a wrongly placed final norm shows
        for name, p in model.named_parameters():
            if "norm" in name.lower() and p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def varied_trajectories(n: int = 10, later_text: str = "") -> list[Trajectory]:
    """``n`` trajectories of 0..4 steps with labels, both outcomes, texts of different lengths; ``later_text``
    is appended to every last step's observation (to change what comes after the earlier steps)."""
    out = []
    for i in range(n):
        k = i % 5
        steps = [Step(f"go {'north' if (i + j) % 2 else 'east'} {j}", f"you see {'a ball ' * (1 + (i + j) % 3)}{j}",
                      value=round((j + 1) / (k + 1), 3)) for j in range(k)]
        if steps and later_text:
            steps[-1] = Step(steps[-1].action, steps[-1].observation + later_text, value=steps[-1].value)
        out.append(Trajectory(f"t{i}", "GoToRedBall", f"Go to the red ball. Room {i}.", steps,
                              reward=float(i % 2 == 0), success=i % 2 == 0, meta={"group": f"g{i // 2}"}))
    return out


def write_jsonl(trajs: list[Trajectory], path: Path) -> Path:
    path.write_text("".join(json.dumps(t.to_dict()) + "\n" for t in trajs))
    return path


def run_precompute(**fields) -> dict:
    return precompute(PrecomputeConfig(progress=False, **fields))
