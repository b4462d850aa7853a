"""Validation metrics beyond torchmetrics: the per-task-type AUROC."""

import math

import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from agentrm.data.collate import collate_trajectories
from agentrm.data.tokenize import tokenize_trajectory
from agentrm.lit.metrics import PerTypeAUROC
from agentrm.paths import load_tokenizer
from tests.lit.conftest import learnable_trajectories


def test_per_type_auroc_averages_within_type_aurocs_and_skips_one_class_types():
    # type 11: mostly successes, high values, its failure highest; type 22: mostly failures, low values, its
    # success lowest; type 44: half right; type 33: one class (skipped)
    preds = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.95, 0.05, 0.2, 0.15, 0.3, 0.1, 0.5, 0.4, 0.45, 0.3, 0.35])
    target = torch.tensor([1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 1, 1, 0, 1, 1])
    groups = torch.tensor([11, 11, 11, 11, 11, 22, 22, 22, 22, 22, 44, 44, 44, 33, 33])
    metric = PerTypeAUROC()
    metric.update(preds[:7], target[:7], groups[:7])  # the state spans updates
    metric.update(preds[7:], target[7:], groups[7:])
    assert metric.per_group() == {11: pytest.approx(0.0), 22: pytest.approx(0.0), 44: pytest.approx(0.5)}
    assert float(metric.compute()) == pytest.approx(0.5 / 3)
    assert metric.groups_averaged == 3
    # the pooled AUROC rewards telling the types apart, the per-type one does not
    assert float(binary_auroc(preds, target)) > 0.55


def test_per_type_auroc_is_nan_with_a_warning_when_no_type_has_both_classes():
    metric = PerTypeAUROC("val_unseen/type_auroc")
    metric.update(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([1, 1, 0]), torch.tensor([1, 1, 2]))
    with pytest.warns(UserWarning, match="val_unseen/type_auroc is undefined"):
        assert math.isnan(float(metric.compute()))
    assert metric.groups_averaged == 0


def test_batches_carry_a_task_key_per_trajectory():
    tok = load_tokenizer("agentrm/assets/tiny_tokenizer")
    trajs = learnable_trajectories(4)
    trajs[1].task = "OpenBall"
    batch = collate_trajectories([tokenize_trajectory(tok, t, 512) for t in trajs], tok.pad_token_id)
    keys = batch["task_key"].tolist()
    assert batch["task_key"].shape == (4,) and batch["task_key"].dtype == torch.long
    assert keys[0] == keys[2] == keys[3] != keys[1] and all(k > 0 for k in keys)
