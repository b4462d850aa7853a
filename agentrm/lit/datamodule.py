"""LightningDataModule over trajectory files (native JSONL or AgentGym conversations)."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from functools import partial
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from agentrm.data.agentgym import is_agentgym_file, load_trajectories, outcome_summary, success_rule
from agentrm.data.collate import collate_trajectories
from agentrm.data.labels import (
    LabelError,
    UnlabeledPolicy,
    apply_unlabeled_policy,
    check_outcomes,
    check_step_values,
    check_steps_left,
    check_unlabeled_for,
    truncation_warning,
)
from agentrm.data.schema import DataError, Trajectory, format_range, parse_value_range
from agentrm.data.splits import check_unseen_records
from agentrm.data.tokenize import TokenizedTrajectory, TruncationCounts, tokenize_trajectory
from agentrm.paths import load_tokenizer, resolve_path

__all__ = ["TrajectoryDataModule", "apply_unlabeled_policy", "split_by_group"]


def split_by_group(trajs: list[Trajectory], val_fraction: float, seed: int) -> tuple[list[Trajectory], list[Trajectory]]:
    """Deterministic split on ``Trajectory.group`` so branches never straddle train and validation."""
    train, val = [], []
    for t in trajs:
        h = int.from_bytes(hashlib.blake2b(f"{seed}:{t.group}".encode(), digest_size=8).digest(), "little")
        (val if (h % 1_000_000) < val_fraction * 1_000_000 else train).append(t)
    return train, val


class EpochShuffleSampler(Sampler[int]):
    """A permutation that depends only on ``(seed, epoch)``, so a resumed run sees the same order.

    Lightning calls ``set_epoch`` before each epoch (and wraps this sampler for DDP).
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class DistributedEpochShuffleSampler(DistributedSampler):
    """:class:`EpochShuffleSampler`'s permutation strided over ranks: rank ``r`` takes positions ``r, r+R, ...``.

    With a per-rank batch of ``B/R``, batch ``i`` of the ``R`` ranks together is exactly
    batch ``i`` of one process with batch ``B``, so a DDP run follows the single-process
    run.  (Left alone, Lightning wraps a custom sampler in a ``DistributedSamplerWrapper``
    that, for training, shuffles the permutation a second time; being a
    ``DistributedSampler``, this one is used as is.)  The tail is padded by wrapping
    around, like ``DistributedSampler`` with ``drop_last=False``.
    """

    def __init__(self, n: int, seed: int, num_replicas: int, rank: int):
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.base = EpochShuffleSampler(n, seed)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.base.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        perm = list(self.base)
        while perm and len(perm) < self.total_size:
            perm += perm[: self.total_size - len(perm)]
        return iter(perm[self.rank : self.total_size : self.num_replicas])


class GroupBatchSampler(Sampler[list[int]]):
    """Batches that keep each trajectory group (an episode with its sibling branches, or one tree's
    records) together, so the sibling pairwise loss sees same-parent steps in one micro-batch.

    Per epoch the groups are permuted with a generator seeded by ``(seed, epoch)`` (a resumed run
    sees the same order) and packed in that order into batches of at most ``batch_size`` items; a
    group larger than ``batch_size`` is cut into consecutive chunks (records of one group are in
    tree/branch order, so siblings mostly stay adjacent).  Under DDP rank ``r`` takes batches
    ``r, r+R, ...``; the list is padded by wrapping around so every rank runs the same number of
    steps, and no group is split across ranks.

    Args:
        groups: item indices per group.
        batch_size: items per batch (per rank).
    """

    def __init__(self, groups: list[list[int]], batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.groups, self.batch_size, self.seed = [g for g in groups if g], batch_size, seed
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        batches: list[list[int]] = []
        current: list[int] = []
        for gi in torch.randperm(len(self.groups), generator=g).tolist():
            group = self.groups[gi]
            if len(current) + len(group) > self.batch_size and current:
                batches.append(current)
                current = []
            for start in range(0, len(group), self.batch_size):
                chunk = group[start : start + self.batch_size]
                if len(chunk) == self.batch_size:
                    batches.append(chunk)
                else:  # the group's remainder: it fits next to what ``current`` holds
                    current = current + chunk
        if current:
            batches.append(current)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._batches()
        total = -(-len(batches) // self.num_replicas) * self.num_replicas
        while batches and len(batches) < total:
            batches += batches[: total - len(batches)]
        return iter(batches[self.rank : total : self.num_replicas])

    def __len__(self) -> int:
        return -(-len(self._batches()) // self.num_replicas)


def _describe(paths: str | list[str]) -> str:
    """A path option (one file or a list) as messages name it."""
    return paths if isinstance(paths, str) else ", ".join(paths)


class TrajectoryDataModule(L.LightningDataModule):
    """Tokenised trajectories with step ends, for the value RM and the implicit PRM.

    Labels are checked against what the model trains on before training starts (see
    :mod:`agentrm.data.labels`): the model declares it in a ``trains_on`` class attribute
    (``"step_values"``: the value RM; ``"outcomes"``: the implicit PRM; absent: no label check, as
    for policy SFT). Every error is one line (a :class:`~agentrm.data.schema.DataError`).

    Args:
        train_path: trajectory JSONL (or AgentGym .json/.jsonl), or a list of such files (read in
            order and concatenated, e.g. one sample per environment family).
        val_path: held-out file (or list); if ``None``, ``val_fraction`` of the trajectory groups
            of ``train_path`` are held out (split by ``meta.group``, seeded by ``split_seed``).
        val_unseen_path: file (or list) of trajectories of task types the training data does not hold
            (checked: a shared task type or instance is an error, :func:`~agentrm.data.splits.check_unseen_records`),
            validated as a second set: the value RM logs its metrics as ``val_unseen/*`` beside the held-in
            ``val/*`` (checkpoints can monitor ``val_unseen/auroc``). The model must report validation sets
            separately (its ``validation_step`` takes ``dataloader_idx``); see :attr:`val_set_names`.
        tokenizer: local path or hub id of a fast tokenizer with a chat template.
        max_length: context budget in tokens; over it, the oldest whole steps are dropped with their
            labels. What it drops is counted per split (``truncation``, printed at setup and logged as
            ``data/<split>/...`` metrics), warned about above ``truncation_warning`` and an error when
            it leaves nothing to train on.
        batching: ``shuffle`` (items shuffled independently) or ``groups`` (:class:`GroupBatchSampler`:
            a trajectory group's records share micro-batches; use it with the value RM's
            ``pairwise_weight`` so sibling pairs meet in a batch).
        unlabeled: what to do with records that carry no outcome (AgentGym AgentTraj files have no
            ``reward``): ``error`` (default: reward models need labels), ``success`` (every such
            record is a successful demonstration: reward 1, no step values: for the implicit PRM),
            ``success_values`` (as ``success``, and each of its steps gets the value
            ``value_range[1]``: for a value RM, mixed with failures) or ``ignore`` (kept as reward 0:
            only for policy SFT, which uses no labels; reward models refuse it).
        skip_invalid: skip malformed records (a count is printed) instead of failing.
        value_range: ``[low, high]`` every step value must lie in (default ``[0, 1]``); a value
            outside fails naming file, line and field. The value RM's loss must fit it (BCE: ``[0, 1]``).
        success_threshold: AgentGym records are successes when ``reward >= success_threshold``
            (default 1.0: only full rewards; lower it for environments with partial rewards).
        success_field: name of a boolean field of AgentGym records that says success instead.
        min_labels: a value RM needs at least this many labelled training steps, an implicit PRM this
            many training trajectories with a step.
        allow_degenerate: train anyway on fewer than ``min_labels`` labels or on labels of one class
            (all step values equal, or all outcomes the same).
        truncation_warning: warn when truncation drops more than this fraction of a split's labelled
            steps (value RM) or steps (other models).
    """

    def __init__(
        self,
        train_path: str | list[str] = "agentrm/assets/babyai_sample.jsonl",
        val_path: str | list[str] | None = None,
        val_fraction: float = 0.2,
        val_unseen_path: str | list[str] | None = None,
        tokenizer: str = "agentrm/assets/tiny_tokenizer",
        max_length: int = 1024,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        split_seed: int = 0,
        batching: Literal["shuffle", "groups"] = "shuffle",
        unlabeled: UnlabeledPolicy = "error",
        skip_invalid: bool = False,
        value_range: tuple[float, float] = (0.0, 1.0),
        success_threshold: float = 1.0,
        success_field: str | None = None,
        min_labels: int = 32,
        allow_degenerate: bool = False,
        truncation_warning: float = 0.05,
    ):
        super().__init__()
        value_range = parse_value_range(value_range)
        if not math.isfinite(success_threshold):
            raise ValueError(f"data.success_threshold must be a finite number, got {success_threshold}")
        if min_labels < 0:
            raise ValueError(f"data.min_labels must be >= 0, got {min_labels}")
        if not 0.0 <= truncation_warning <= 1.0:
            raise ValueError(f"data.truncation_warning must be a fraction in [0, 1], got {truncation_warning}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"data.max_length must be >= 1, got {max_length}")
        self.save_hyperparameters()
        self.hparams.value_range = value_range
        self.tokenizer = None
        self.train_items: list[TokenizedTrajectory] = []
        self.val_items: list[TokenizedTrajectory] = []
        self.val_unseen_items: list[TokenizedTrajectory] = []
        self.truncation: dict[str, TruncationCounts] = {}
        """Per split (``train``, ``val``, ``val_unseen``): what ``max_length`` truncation dropped (set by :meth:`setup`)."""
        self.summary_lines: list[str] = []
        """The data report printed at setup (per file, per split), for the end-of-run report."""
        self._unlabeled = 0
        self._success_rule: str | None = None

    def _load(self, paths: str | list[str]) -> list[Trajectory]:
        hp = self.hparams
        out: list[Trajectory] = []
        for path in [paths] if isinstance(paths, str) else paths:
            resolved = resolve_path(path)
            agentgym = resolved.exists() and is_agentgym_file(resolved)
            trajs = load_trajectories(
                resolved, skip_invalid=hp.skip_invalid, value_range=hp.value_range,
                success_threshold=hp.success_threshold, success_field=hp.success_field,
            )
            rule = success_rule(hp.success_threshold, hp.success_field) if agentgym else None
            self._success_rule = self._success_rule or rule
            self._unlabeled += sum(bool(t.meta.get("unlabeled")) for t in trajs)
            self._say(outcome_summary(path, trajs, rule) + (f" (data.unlabeled={hp.unlabeled})" if any(
                t.meta.get("unlabeled") for t in trajs) else ""))
            out.extend(apply_unlabeled_policy(trajs, path, hp.unlabeled, top_value=hp.value_range[1]))
        return out

    def _say(self, line: str) -> None:
        self.summary_lines.append(line)
        if rank_zero_only.rank == 0:  # always shown (Lightning's info messages are hidden unless --verbose)
            print(f"data: {line}", flush=True)

    def _trains_on(self) -> str | None:
        """What the attached model trains on (its ``trains_on`` attribute); ``None`` outside a trainer."""
        trainer = getattr(self, "trainer", None)
        return getattr(getattr(trainer, "lightning_module", None), "trains_on", None) if trainer is not None else None

    @property
    def val_set_names(self) -> list[str]:
        """The metric prefix of each validation dataloader, in order: ``["val"]``, plus ``"val_unseen"`` when
        ``val_unseen_path`` is set (a LightningModule logs dataloader ``i``'s metrics under ``val_set_names[i]``)."""
        return ["val", "val_unseen"] if self.hparams.get("val_unseen_path") else ["val"]

    def _check_model_reports_sets(self) -> None:
        """A second validation set needs a model that tells the sets apart (``validation_step(..., dataloader_idx)``)."""
        import inspect

        trainer = getattr(self, "trainer", None)
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        step = getattr(module, "validation_step", None)
        if step is not None and "dataloader_idx" not in inspect.signature(step).parameters:
            raise DataError(
                f"data.val_unseen_path: {type(module).__name__} does not report validation sets separately (its "
                "validation_step takes no dataloader_idx), so unseen task types would mix into val/*; drop "
                "data.val_unseen_path or train a model that reports them (ValueRMModule)"
            )

    def setup(self, stage: str | None = None) -> None:
        if self.train_items or self.val_items or self.val_unseen_items:
            return
        hp = self.hparams
        trains_on = self._trains_on()
        source = _describe(hp.train_path)
        self.tokenizer = load_tokenizer(hp.tokenizer)
        self.summary_lines, self._unlabeled, self._success_rule = [], 0, None
        trajs = self._load(hp.train_path)
        if hp.val_path:
            train, val = trajs, self._load(hp.val_path)
        else:
            train, val = split_by_group(trajs, hp.val_fraction, hp.split_seed)
        if not train:
            raise LabelError(f"{source}: no training trajectories after the split (data.val_fraction={hp.val_fraction})")
        if trains_on:
            check_unlabeled_for(trains_on, hp.unlabeled, self._unlabeled, source, hp.value_range[1])
        unseen: list[Trajectory] = []
        if hp.get("val_unseen_path"):
            self._check_model_reports_sets()
            unseen_source = _describe(hp.val_unseen_path)
            unseen = self._load(hp.val_unseen_path)
            if not unseen:
                raise DataError(f"data.val_unseen_path: {unseen_source} holds no trajectories")
            types = check_unseen_records([*train, *val], unseen, unseen_source)
            self._say(f"val_unseen: {len(unseen)} trajectories of {len(types)} task types absent from training "
                      f"({', '.join(sorted(types))})")
        for name, split in (("validation set", val), ("unseen validation set", unseen)):
            outcomes = {t.success for t in split}
            if split and len(outcomes) < 2:
                rank_zero_warn(
                    f"the {name} ({len(split)} trajectories) holds only "
                    f"{'successes' if True in outcomes else 'failures'}: AUROC metrics are undefined (nan)"
                )
        tok = partial(tokenize_trajectory, self.tokenizer, max_length=hp.max_length)
        train_items, val_items = [tok(t) for t in train], [tok(t) for t in val]
        unseen_items = [tok(t) for t in unseen]
        self.truncation = {"train": TruncationCounts.of(train_items), "val": TruncationCounts.of(val_items)}
        if unseen_items:
            self.truncation["val_unseen"] = TruncationCounts.of(unseen_items)
        self._report_truncation(trains_on)
        check_steps_left(self.truncation["train"], source, hp.max_length)
        if trains_on == "step_values":
            note = (f" (data.unlabeled=success_values gives every demonstration step {hp.value_range[1]:g})"
                    if hp.unlabeled == "success_values" and self._unlabeled else "")
            check_step_values(train_items, self.truncation["train"], source, hp.max_length, hp.min_labels,
                              hp.allow_degenerate, note)
        elif trains_on == "outcomes":
            check_outcomes(train_items, source, hp.min_labels, hp.allow_degenerate, self._success_rule)
        self.train_items, self.val_items, self.val_unseen_items = train_items, val_items, unseen_items
        index: dict[str, list[int]] = {}
        for i, t in enumerate(train):
            index.setdefault(t.group, []).append(i)
        self.train_groups = list(index.values())

    def _report_truncation(self, trains_on: str | None) -> None:
        """One line per split, ``data/<split>/...`` metrics to the logger, a warning above the threshold."""
        hp = self.hparams
        what = "labels" if trains_on == "step_values" else "steps"
        for split, counts in self.truncation.items():
            if not counts.trajectories:
                continue
            self._say(f"{split}: {counts.summary()} (data.max_length={hp.max_length}, values in "
                      f"{format_range(hp.value_range)})")
            warning = truncation_warning(counts, split, hp.max_length, hp.truncation_warning, what)
            if warning:
                rank_zero_warn(warning)
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.logger is not None and trainer.is_global_zero:
            metrics = {k: v for split, c in self.truncation.items() for k, v in c.as_metrics(f"data/{split}").items()}
            trainer.logger.log_metrics(metrics, step=0)

    def _loader(self, items: list[TokenizedTrajectory], shuffle: bool, batch_size: int) -> DataLoader:
        seed = int(os.environ.get("PL_GLOBAL_SEED", self.hparams.split_seed))
        sampler, batch_sampler = None, None
        if shuffle:
            trainer = getattr(self, "trainer", None)
            world = trainer.world_size if trainer is not None else 1
            rank = trainer.global_rank if trainer is not None else 0
            if self.hparams.get("batching", "shuffle") == "groups":
                batch_sampler = GroupBatchSampler(self.train_groups, batch_size, seed, world, rank)
            elif world > 1:
                sampler = DistributedEpochShuffleSampler(len(items), seed, world, rank)
            else:
                sampler = EpochShuffleSampler(len(items), seed)
        batching = {"batch_sampler": batch_sampler} if batch_sampler is not None else {"batch_size": batch_size}
        return DataLoader(
            items,
            **batching,
            sampler=sampler,
            num_workers=self.hparams.num_workers,
            collate_fn=partial(collate_trajectories, pad_token_id=self.tokenizer.pad_token_id),
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_items, True, self.hparams.batch_size)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """The held-in validation loader; with ``val_unseen_path``, ``[held-in, unseen]`` (see :attr:`val_set_names`)."""
        size = self.hparams.eval_batch_size or self.hparams.batch_size
        if len(self.val_set_names) == 1:
            return self._loader(self.val_items, False, size)
        return [self._loader(self.val_items, False, size), self._loader(self.val_unseen_items, False, size)]
