"""Validation metrics that need more than torchmetrics ships."""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.classification import BinaryAUROC
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.utilities import dim_zero_cat, rank_zero_warn


class AUROCOrNaN(BinaryAUROC):
    """Binary AUROC that is ``nan`` (with a one-line warning naming the metric) when the targets hold one class.

    torchmetrics returns 0 there, which reads as "perfectly wrong"; an AUROC over one class
    is undefined (e.g. a validation split with only successful trajectories).
    """

    def __init__(self, name: str = "auroc", **kwargs):
        super().__init__(**kwargs)
        self.metric_name = name

    def compute(self) -> torch.Tensor:
        target = dim_zero_cat(self.target) if isinstance(self.target, list) else self.target
        classes = torch.unique(target).numel() if target.numel() else 0
        if classes < 2:
            rank_zero_warn(
                f"{self.metric_name} is undefined: the validation targets hold {classes} class(es) "
                f"({target.numel()} items); reporting nan (use a validation set with both successes and failures)"
            )
            return torch.tensor(float("nan"))
        return super().compute()


class PairwiseRankingAccuracy(Metric):
    """Accuracy of ordering sibling steps (same prefix, different action) by predicted value.

    Each update takes flat ``[M]`` tensors: predictions, targets, a parent key (hash of
    everything before the step) and an action key.  At compute time duplicate
    ``(parent, action)`` entries are merged, and every pair of siblings whose targets
    differ by more than ``margin`` counts: 1 when the prediction orders them like the
    targets, 0.5 on a prediction tie, 0 otherwise.  States are concatenated across
    processes, so the result is exact under DDP.  Returns ``nan`` without any pair.
    """

    full_state_update = False

    def __init__(self, margin: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.margin = margin
        for name in ("preds", "targets", "parents", "actions"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, targets: torch.Tensor, parents: torch.Tensor, actions: torch.Tensor) -> None:
        self.preds.append(preds.detach().float().flatten())
        self.targets.append(targets.detach().float().flatten())
        self.parents.append(parents.flatten())
        self.actions.append(actions.flatten())

    def pair_count_and_correct(self) -> tuple[int, float]:
        # a list of tensors locally; one concatenated tensor while synced across DDP ranks
        if len(self.preds) == 0:
            return 0, 0.0
        preds, targets = dim_zero_cat(self.preds).cpu(), dim_zero_cat(self.targets).cpu()
        parents, actions = dim_zero_cat(self.parents).cpu(), dim_zero_cat(self.actions).cpu()
        seen: dict[tuple[int, int], int] = {}
        for i, key in enumerate(zip(parents.tolist(), actions.tolist())):
            seen.setdefault(key, i)
        by_parent: dict[int, list[int]] = {}
        for (parent, _), i in seen.items():
            by_parent.setdefault(parent, []).append(i)
        pairs, correct = 0, 0.0
        for idx in by_parent.values():
            if len(idx) < 2:
                continue
            ix = torch.tensor(idx)
            dt = targets[ix][:, None] - targets[ix][None, :]
            dp = preds[ix][:, None] - preds[ix][None, :]
            upper = torch.triu(torch.ones_like(dt, dtype=torch.bool), diagonal=1) & (dt.abs() > self.margin)
            pairs += int(upper.sum())
            agree = (dt * dp > 0).float() + 0.5 * (dp == 0).float()
            correct += float(agree[upper].sum())
        return pairs, correct

    def compute(self) -> torch.Tensor:
        pairs, correct = self.pair_count_and_correct()
        return torch.tensor(correct / pairs if pairs else float("nan"))


class PerTypeAUROC(Metric):
    """Macro AUROC over groups (task types): the mean, over the groups whose targets hold both classes, of the
    binary AUROC within the group; ``nan`` (with a one-line warning) when no group does.

    A pooled AUROC also rewards telling the task types apart (an easy type with high values, a hard one
    with low values scores well with no ordering inside either); this one asks, within each type, whether
    steps of successful trajectories score above those of failed ones. Each update takes flat ``[M]``
    tensors: predictions, binary targets and a group key per item (:attr:`TokenizedTrajectory.task_key`).
    States are concatenated across processes, so the result is exact under DDP. After :meth:`compute`,
    ``groups_averaged`` holds the number of groups in the mean.
    """

    full_state_update = False

    def __init__(self, name: str = "type_auroc", **kwargs):
        super().__init__(**kwargs)
        self.metric_name = name
        self.groups_averaged = 0
        for state in ("preds", "target", "groups"):
            self.add_state(state, default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, target: torch.Tensor, groups: torch.Tensor) -> None:
        self.preds.append(preds.detach().float().flatten())
        self.target.append(target.detach().long().flatten())
        self.groups.append(groups.flatten())

    def per_group(self) -> dict[int, float]:
        """``{group key: AUROC}`` for every group whose targets hold both classes."""
        if len(self.preds) == 0:
            return {}
        preds, target, groups = (dim_zero_cat(x).cpu() for x in (self.preds, self.target, self.groups))
        out = {}
        for key in torch.unique(groups).tolist():
            sel = groups == key
            if torch.unique(target[sel]).numel() == 2:
                out[key] = float(binary_auroc(preds[sel], target[sel]))
        return out

    def compute(self) -> torch.Tensor:
        values = list(self.per_group().values())
        self.groups_averaged = len(values)
        if not values:
            rank_zero_warn(f"{self.metric_name} is undefined: no group's validation targets hold both classes; "
                           "reporting nan")
            return torch.tensor(float("nan"))
        return torch.tensor(sum(values) / len(values))
