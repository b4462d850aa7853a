import math

import pytest
import torch

from agentrm.data.collate import collate_trajectories
from agentrm.data.tokenize import tokenize_trajectory
from agentrm.models.backbone import build_backbone, pick_attn_implementation
from agentrm.models.value_rm import ValueRewardModel, aggregate_steps
from tests.conftest import make_trajectory
from tests.lit.conftest import TINY_BACKBONE


@pytest.fixture()
def model_and_batch(tiny_tokenizer):
    torch.manual_seed(0)
    bb = build_backbone(config=TINY_BACKBONE, vocab_size=len(tiny_tokenizer))
    model = ValueRewardModel(bb).eval()
    items = [tokenize_trajectory(tiny_tokenizer, make_trajectory(f"t{i}", n)) for i, n in enumerate([3, 0, 1])]
    return model, collate_trajectories(items, tiny_tokenizer.pad_token_id)


def test_forward_reads_head_at_step_ends(model_and_batch):
    model, batch = model_and_batch
    raw = model(batch["input_ids"], batch["attention_mask"], batch["step_end_idx"])
    h = model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    for b in range(raw.shape[0]):
        for s in range(raw.shape[1]):
            idx = int(batch["step_end_idx"][b, s])
            expect = model.value_head(h[b, idx]).item() if idx >= 0 else 0.0
            assert raw[b, s].item() == pytest.approx(expect, abs=1e-5)


def test_save_load_roundtrip(model_and_batch, tmp_path, tiny_tokenizer):
    model, batch = model_and_batch
    model.save_pretrained(tmp_path / "m", tokenizer=tiny_tokenizer)
    for f in ("config.json", "model.safetensors", "value_head.safetensors", "agentrm_config.json", "tokenizer.json"):
        assert (tmp_path / "m" / f).exists(), f
    back = ValueRewardModel.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(back.score(batch), model.score(batch), equal_nan=True)
    with pytest.raises(FileNotFoundError, match="agentrm_config.json"):
        ValueRewardModel.from_pretrained(tmp_path)


def test_score_trajectory_aggregations():
    s = torch.tensor([[0.2, 0.8, math.nan], [math.nan, math.nan, math.nan], [0.5, 0.1, 0.3]])
    assert aggregate_steps(s, "last")[[0, 2]].tolist() == pytest.approx([0.8, 0.3])
    assert aggregate_steps(s, "min")[[0, 2]].tolist() == pytest.approx([0.2, 0.1])
    assert aggregate_steps(s, "mean")[[0, 2]].tolist() == pytest.approx([0.5, 0.3])
    assert all(math.isnan(aggregate_steps(s, a)[1]) for a in ("last", "min", "mean", "max"))
    with pytest.raises(ValueError, match="aggregate"):
        aggregate_steps(s, "median")


def test_attention_fallback_without_flash_attn():
    assert pick_attn_implementation("auto") == "sdpa"  # no CUDA / flash-attn on this machine
    assert pick_attn_implementation("eager") == "eager"
    with pytest.raises(ImportError, match="flash-attn"):
        pick_attn_implementation("flash_attention_2")
