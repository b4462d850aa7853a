"""``python -m agentrm.models.export --format token-classification``: the value RM as a standard
``*ForTokenClassification`` checkpoint (what vLLM's pooling runner loads), checked by loading it with
transformers' ``AutoModelForTokenClassification`` and reading its output at the step-end tokens."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForTokenClassification

from agentrm.data.collate import collate_trajectories
from agentrm.data.schema import Step, Trajectory
from agentrm.data.tokenize import tokenize_trajectory
from agentrm.models.export import main
from agentrm.models.value_rm import ValueRewardModel
from agentrm.paths import load_tokenizer

TRAJS = [Trajectory("a", "t", "Go to the red ball.", [Step("move forward", "A wall."), Step("turn left", "Red ball.")],
                    0.0, False),
         Trajectory("b", "t", "Open the door.", [Step("toggle", "The door opens. ✓")], 0.0, False)]


def test_token_classification_export_matches_the_rm_at_step_ends(tiny_models, tmp_path):
    out = main(["--format", "token-classification", tiny_models["value_rm"], str(tmp_path / "tc")])
    note = json.loads((out / "agentrm_export.json").read_text())
    assert note["value_activation"] == "sigmoid" and note["value"] == "sigmoid(output)"
    tc = AutoModelForTokenClassification.from_pretrained(out).eval()
    assert type(tc).__name__ == "LlamaForTokenClassification" and tc.config.num_labels == 1
    rm = ValueRewardModel.from_pretrained(tiny_models["value_rm"]).eval()
    tok = load_tokenizer(str(out))
    batch = collate_trajectories([tokenize_trajectory(tok, t) for t in TRAJS], tok.pad_token_id or 0)
    want = rm.score(batch)  # [B, S], sigmoid applied, nan at padded steps
    with torch.no_grad():
        logits = tc(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., 0]  # [B, T]
    ends = batch["step_end_idx"]
    got = torch.sigmoid(logits.gather(1, ends.clamp(min=0))).masked_fill(ends < 0, float("nan"))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, equal_nan=True)


def test_token_classification_export_refuses_what_it_cannot_write(tiny_models, tmp_path):
    with pytest.raises(SystemExit):
        main(["--format", "token-classification", tiny_models["implicit_prm"], str(tmp_path / "prm")])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main(["--format", "token-classification", tiny_models["value_rm"], str(tmp_path / "full")])
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
