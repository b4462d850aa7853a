"""Task-type splits for generalisation: training, development (model selection) and test task types, kept apart.

A *task type* is an environment family's task: a BabyAI level, a ScienceWorld task, a TextWorld game kind
(``babyai/GoToLocal``, ``sciworld/boil``, ``textworld/cooking``; aliases such as ScienceWorld's ``1-1`` are
resolved through :meth:`~agentrm.envs.base.Env.instance_key`).  A *group* is the coarser unit a task type
belongs to, as its environment family defines it (:func:`agentrm.envs.registry.task_group`): the ScienceWorld
topic (``sciworld topic 3 (electricity)``: the paper ids ``3-1``..``3-4``), the BabyAI family of levels that
share their mission and actions (``babyai Open``: OpenDoor, OpenDoorLoc, OpenTwoDoors...), otherwise the task
type itself.

:func:`check_unseen` refuses a development or test task type that is also a training one, a task type in
both the development and the test set, and (unless ``allow_seen_groups``) a development or test task type
whose group holds a training task type.  Development and test types may share a group (there are too few
ScienceWorld topics to split otherwise).  Task instances follow: disjoint types never share an instance
(an instance key starts with its task type); the search harness checks instances again before it runs
(:func:`agentrm.search.evaluate.check_disjoint_instances`).

:func:`check_unseen_records` applies the type rule to trajectory records (the training data against
``data.val_unseen_path`` of ``python -m agentrm.fit``).

``python -m agentrm.data.splits --train a.yaml b.yaml --dev dev.yaml --test test_eval.yaml`` checks the
configs of a generalisation experiment: collect configs (their ``envs``) for training and development,
search configs (their ``held_out``) for test; a search config must also list every training and development
spec in its ``train_envs`` (with ``train_seed`` and ``train_episodes`` covering the collect runs), so that
its own instance check covers them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agentrm.checks import ConfigError
from agentrm.data.schema import DataError, Trajectory
from agentrm.envs.base import close_quietly
from agentrm.envs.registry import EnvSpec, make_env, parse_specs, task_group


def task_type(spec: str | EnvSpec) -> str:
    """``family/task`` with the family's canonical task name (``sciworld:1-1`` -> ``sciworld/boil``).

    The environment is built (cheaply: no simulator or game starts before ``reset``) for its instance key.
    """
    parsed = parse_specs([spec])[0]
    env = make_env(parsed)
    try:
        key = env.instance_key(0)
    finally:
        close_quietly(env)
    return _type_of_instance(key) if "#" in key else parsed.name


def _type_of_instance(key: str) -> str:
    return key.split("#", 1)[0].replace(":", "/", 1)


@dataclass
class SplitReport:
    """What :func:`check_unseen` found: task types and groups per set (``train``, ``dev``, ``test``)."""

    types: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    """set -> task type -> the specs of that type."""

    def groups(self, name: str) -> dict[str, list[str]]:
        """set ``name``'s groups -> their task types."""
        out: dict[str, list[str]] = {}
        for t in self.types.get(name, {}):
            out.setdefault(task_group(t), []).append(t)
        return out

    def lines(self) -> list[str]:
        """A readable summary: per set, its task types by group."""
        out = []
        for name, types in self.types.items():
            groups = self.groups(name)
            out.append(f"{name}: {len(types)} task types in {len(groups)} groups")
            out.extend(f"  {g}: {', '.join(ts)}" for g, ts in sorted(groups.items()))
        return out


def _types(specs: Iterable[str | EnvSpec]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for spec in parse_specs(list(specs)):
        out.setdefault(task_type(spec), []).append(str(spec))
    return out


def check_unseen(
    train: Sequence[str | EnvSpec],
    dev: Sequence[str | EnvSpec] = (),
    test: Sequence[str | EnvSpec] = (),
    *,
    allow_seen_groups: bool = False,
    names: tuple[str, str] = ("dev", "test"),
) -> SplitReport:
    """Check that development and test task types are unseen in training and apart from each other.

    Args:
        train: env specs of the training data.
        dev: env specs of the development set (model selection, early stopping).
        test: env specs of the final evaluation.
        allow_seen_groups: accept a development or test task type whose group (ScienceWorld topic, BabyAI
            family) holds a training task type; by default that is refused too.
        names: what the messages call the development and the test set (e.g. the config fields).

    Returns:
        The task types of each set.

    Raises:
        ConfigError: naming the first overlapping task type (or group), the sets and the specs involved.
    """
    report = SplitReport({"train": _types(train), "dev": _types(dev), "test": _types(test)})
    label = dict(zip(("dev", "test"), names))
    seen = report.types["train"]
    seen_groups = report.groups("train")
    for name in ("dev", "test"):
        for t, specs in report.types[name].items():
            where = f"{label[name]} spec {specs[0]!r}"
            if t in seen:
                raise ConfigError(
                    f"{label[name]}: task type {t} is also a training task type ({where}, training spec "
                    f"{seen[t][0]!r}); unseen sets must hold task types absent from training"
                )
            group = task_group(t)
            if not allow_seen_groups and group in seen_groups and group != t:
                raise ConfigError(
                    f"{label[name]}: task type {t} ({where}) is in {group}, which training covers with "
                    f"{', '.join(seen_groups[group])}; choose a task type of another group or pass allow_seen_groups"
                )
    for t, specs in report.types["test"].items():
        if t in report.types["dev"]:
            raise ConfigError(
                f"{label['test']}: task type {t} is also a development task type ({label['test']} spec {specs[0]!r}, "
                f"{label['dev']} spec {report.types['dev'][t][0]!r}); the test set must hold task types model "
                "selection never saw"
            )
    return report


def record_type(traj: Trajectory) -> str:
    """A record's task type: from ``meta.instance`` (canonical) when it has one, else its ``task`` field."""
    instance = traj.meta.get("instance") if isinstance(traj.meta, dict) else None
    return _type_of_instance(instance) if isinstance(instance, str) and "#" in instance else traj.task


def check_unseen_records(train: Iterable[Trajectory], unseen: Iterable[Trajectory], source: str) -> set[str]:
    """Refuse records of ``unseen`` (from ``source``) whose task type or task instance training records have.

    Returns:
        The task types of ``unseen``.

    Raises:
        DataError: naming the shared task type (or instance) and ``source``.
    """
    train = list(train)
    seen = {record_type(t) for t in train}
    instances = {t.meta.get("instance") for t in train if isinstance(t.meta, dict)} - {None}
    types: set[str] = set()
    for t in unseen:
        kind = record_type(t)
        if kind in seen:
            raise DataError(
                f"{source}: record {t.id!r} has task type {kind}, which the training data also holds; the unseen "
                "validation set must hold task types absent from training"
            )
        if isinstance(t.meta, dict) and t.meta.get("instance") in instances:
            raise DataError(f"{source}: record {t.id!r} plays task instance {t.meta['instance']}, a training instance")
        types.add(kind)
    return types


# ------------------------------------------------------------------------------------- configs
@dataclass
class SplitsConfig:
    """``python -m agentrm.data.splits``: check a generalisation experiment's configs before any work.

    Attributes:
        train: collect configs (YAML with ``envs``) of the training data.
        dev: collect configs of the development (model selection) data.
        test: search configs (YAML with ``held_out``) of the final evaluation.
        allow_seen_groups: accept unseen task types from a group training covers (see :func:`check_unseen`).
    """

    train: list[str] = field(default_factory=list)
    dev: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    allow_seen_groups: bool = False

    def __post_init__(self) -> None:
        if not self.train:
            raise ConfigError("train: give the collect config(s) of the training data")


def _read(path: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping")
    return data


def _specs(path: str, key: str) -> list[str]:
    data = _read(path)
    if not data.get(key):
        raise ConfigError(f"{path}: field '{key}': missing or empty")
    try:
        return [str(s) for s in parse_specs(data[key])]
    except ValueError as e:
        raise ConfigError(f"{path}: field '{key}': {e}") from None


def check_configs(config: SplitsConfig) -> SplitReport:
    """Check the experiment's configs: task types (:func:`check_unseen`) and the search configs' ``train_envs``."""
    collected = {}  # spec -> (config path, seed, episodes)
    for path in [*config.train, *config.dev]:
        data = _read(path)
        for spec in _specs(path, "envs"):
            collected[spec] = (path, int(data.get("seed", 0)), int(data.get("episodes", 100)))
    train = [s for p in config.train for s in _specs(p, "envs")]
    dev = [s for p in config.dev for s in _specs(p, "envs")]
    test = [s for p in config.test for s in _specs(p, "held_out")]
    report = check_unseen(train, dev, test, allow_seen_groups=config.allow_seen_groups)
    for path in config.test:
        data = _read(path)
        listed = {str(s) for s in parse_specs(data.get("train_envs") or [])}
        for spec, (source, seed, episodes) in collected.items():
            if spec not in listed:
                raise ConfigError(f"{path}: field 'train_envs' lacks {spec!r} (collected by {source}); list every "
                                  "training and development spec so the search checks their instances")
            if int(data.get("train_seed", 0)) != seed:
                raise ConfigError(f"{path}: field 'train_seed' is {data.get('train_seed', 0)}, but {source} collects "
                                  f"with seed {seed}")
            if int(data.get("train_episodes", 1000)) < episodes:
                raise ConfigError(f"{path}: field 'train_episodes' is {data.get('train_episodes', 1000)}, fewer than "
                                  f"the {episodes} episodes per spec {source} collects")
    return report


def main(argv: list[str] | None = None) -> SplitReport:
    """Command-line entry point (``python -m agentrm.data.splits --help``)."""
    from agentrm.cli_config import parse_config
    from agentrm.cli_errors import run_cli

    report = run_cli("agentrm.data.splits", lambda a: check_configs(parse_config(SplitsConfig, a, "agentrm.data.splits")),
                     argv)
    print("\n".join(report.lines()))
    print("ok: development and test task types are unseen in training and disjoint from each other")
    return report


if __name__ == "__main__":
    main()
