"""LightningDataModule over trajectory files (native JSONL or AgentGym conversations)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from functools import partial
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from agentrm.data.agentgym import load_trajectories
from agentrm.data.collate import collate_trajectories
from agentrm.data.schema import Trajectory
from agentrm.data.tokenize import TokenizedTrajectory, tokenize_trajectory
from agentrm.paths import load_tokenizer, resolve_path


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


def apply_unlabeled_policy(trajs: list[Trajectory], path: str, policy: str) -> list[Trajectory]:
    """Refuse, label as successes, or keep records without an outcome label (``meta["unlabeled"]``).

    Raises:
        ValueError: (``policy="error"``) naming the file, how many records lack a label and the options.
    """
    missing = [t for t in trajs if t.meta.get("unlabeled")]
    if not missing or policy == "ignore":
        return trajs
    if policy == "error":
        raise ValueError(
            f"{path}: {len(missing)} of {len(trajs)} records have no 'reward' (e.g. {missing[0].id!r}; an AgentGym "
            f"AgentTraj file?); reward models need outcome labels: add 'reward' to each record, or pass "
            f"--data.unlabeled success if every record is a successful demonstration"
        )
    if policy != "success":
        raise ValueError(f"unlabeled must be 'error', 'success' or 'ignore', got {policy!r}")
    for t in missing:
        t.reward, t.success = 1.0, True
        if t.steps and t.steps[-1].value is None:
            t.steps[-1].value = 1.0
    return trajs


class TrajectoryDataModule(L.LightningDataModule):
    """Tokenised trajectories with step ends, for the value RM and the implicit PRM.

    Args:
        train_path: trajectory JSONL (or AgentGym .json/.jsonl), or a list of such files (read in
            order and concatenated, e.g. one sample per environment family).
        val_path: held-out file (or list); if ``None``, ``val_fraction`` of the trajectory groups
            of ``train_path`` are held out (split by ``meta.group``, seeded by ``split_seed``).
        tokenizer: local path or hub id of a fast tokenizer with a chat template.
        max_length: right truncation in tokens; steps beyond it lose their labels.
        batching: ``shuffle`` (items shuffled independently) or ``groups`` (:class:`GroupBatchSampler`:
            a trajectory group's records share micro-batches; use it with the value RM's
            ``pairwise_weight`` so sibling pairs meet in a batch).
        unlabeled: what to do with records that carry no outcome (AgentGym AgentTraj files have no
            ``reward``): ``error`` (default: reward models need labels), ``success`` (every such
            record is a successful demonstration: reward 1) or ``ignore`` (the labels are not used,
            as in policy SFT).
        skip_invalid: skip malformed records (a count is printed) instead of failing.
    """

    def __init__(
        self,
        train_path: str | list[str] = "agentrm/assets/babyai_sample.jsonl",
        val_path: str | list[str] | None = None,
        val_fraction: float = 0.2,
        tokenizer: str = "agentrm/assets/tiny_tokenizer",
        max_length: int = 1024,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        split_seed: int = 0,
        batching: Literal["shuffle", "groups"] = "shuffle",
        unlabeled: Literal["error", "success", "ignore"] = "error",
        skip_invalid: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = None
        self.train_items: list[TokenizedTrajectory] = []
        self.val_items: list[TokenizedTrajectory] = []

    def _load(self, paths: str | list[str]) -> list[Trajectory]:
        out: list[Trajectory] = []
        for path in [paths] if isinstance(paths, str) else paths:
            trajs = load_trajectories(resolve_path(path), skip_invalid=self.hparams.skip_invalid)
            out.extend(apply_unlabeled_policy(trajs, path, self.hparams.unlabeled))
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.train_items or self.val_items:
            return
        hp = self.hparams
        self.tokenizer = load_tokenizer(hp.tokenizer)
        trajs = self._load(hp.train_path)
        if hp.val_path:
            train, val = trajs, self._load(hp.val_path)
        else:
            train, val = split_by_group(trajs, hp.val_fraction, hp.split_seed)
        if not train:
            raise ValueError(f"{hp.train_path}: no training trajectories after the split")
        outcomes = {t.success for t in val}
        if val and len(outcomes) < 2:
            rank_zero_warn(
                f"the validation set ({len(val)} trajectories) holds only "
                f"{'successes' if True in outcomes else 'failures'}: AUROC metrics are undefined (nan)"
            )
        tok = partial(tokenize_trajectory, self.tokenizer, max_length=hp.max_length)
        self.train_items = [tok(t) for t in train]
        self.val_items = [tok(t) for t in val]
        index: dict[str, list[int]] = {}
        for i, t in enumerate(train):
            index.setdefault(t.group, []).append(i)
        self.train_groups = list(index.values())

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

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_items, False, self.hparams.eval_batch_size or self.hparams.batch_size)
