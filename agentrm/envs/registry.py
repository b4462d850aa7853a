"""Environment specs and the one registry that turns them into environments.

A spec names a family, a task, a split and options, as a string or a YAML mapping::

    babyai:GoToLocal                         # family:task
    sciworld:boil@train                      # @split (train | dev | test)
    textworld:cooking@test?games=4           # ?key=value&... options
    agentgym:webshop@http://127.0.0.1:36001  # @URL: a remote AgentGym server
    {env: sciworld, task: boil, split: dev, options: {simplification: easy}}

Everything above :mod:`agentrm.envs` takes specs and calls :func:`make_env`; this module
is the only one outside a family's own module that imports a concrete environment (lazily,
so an uninstalled family costs nothing until used).
"""

from __future__ import annotations

import importlib
import json
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agentrm.envs.base import Env

SPLITS = ("train", "dev", "test")

FAMILIES: dict[str, str] = {
    "babyai": "agentrm.envs.babyai:make",
    "sciworld": "agentrm.envs.sciworld:make",
    "textworld": "agentrm.envs.textworld:make",
    "agentgym": "agentrm.envs.agentgym:make",
}
"""family name -> ``module:factory``; ``factory(spec) -> Env``.  :func:`register` adds more."""

TASK_GROUPS: dict[str, str] = {
    "babyai": "agentrm.envs.babyai:task_group",
    "sciworld": "agentrm.envs.sciworld:task_group",
}
"""family name -> ``module:function``; ``function(task) -> group or None``: the coarser unit a family's task
belongs to (a BabyAI family of levels, a ScienceWorld topic; :func:`task_group`).  A family without one: each
task is its own group."""


@dataclass(frozen=True)
class EnvSpec:
    """What environment to build.

    Attributes:
        family: registered family name (``babyai``, ``sciworld``, ``textworld``, ``agentgym``).
        task: the family's task name (BabyAI level, ScienceWorld task name or number,
            TextWorld game kind, AgentGym environment name).
        split: ``train``, ``dev`` or ``test`` (families with official splits keep their task
            instances apart by it), or for ``agentgym`` the server URL.
        options: family-specific keyword options (e.g. ``max_steps``), JSON-serialisable.
    """

    family: str
    task: str
    split: str = "train"
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", dict(self.options))

    def __str__(self) -> str:
        text = f"{self.family}:{self.task}"
        if self.split != "train":
            text += f"@{self.split}"
        if self.options:
            text += "?" + urllib.parse.urlencode({k: _opt_str(v) for k, v in sorted(self.options.items())})
        return text

    def __hash__(self) -> int:
        return hash(str(self))

    @property
    def name(self) -> str:
        """``family/task``: the ``task`` field of the trajectory records this spec produces."""
        return f"{self.family}/{self.task}"

    def option(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, default)

    def with_split(self, split: str) -> EnvSpec:
        return EnvSpec(self.family, self.task, split, self.options)


def _opt_str(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _opt_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_spec(spec: str | Mapping[str, Any] | EnvSpec) -> EnvSpec:
    """Parse a spec string or mapping (see the module docstring).

    Raises:
        ValueError: naming the spec and what is wrong with it (unknown family, no task,
            unknown split, unknown mapping key).
    """
    if isinstance(spec, EnvSpec):
        return spec
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"env", "family", "task", "split", "options"}
        if unknown:
            raise ValueError(f"env spec {dict(spec)!r}: unknown key(s) {sorted(unknown)}")
        family = spec.get("env", spec.get("family"))
        if not family or not spec.get("task"):
            raise ValueError(f"env spec {dict(spec)!r}: needs 'env' (the family) and 'task'")
        parsed = EnvSpec(str(family), str(spec["task"]), str(spec.get("split", "train")), spec.get("options") or {})
    elif isinstance(spec, str):
        text = spec.strip()
        family, sep, rest = text.partition(":")
        if not sep or not family or not rest:
            raise ValueError(f"env spec {spec!r}: expected 'family:task[@split][?key=value&...]'")
        rest, _, query = rest.partition("?") if not _is_url_tail(rest) else (rest, "", "")
        task, _, split = rest.partition("@")
        options = {k: _opt_value(v) for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True)}
        parsed = EnvSpec(family.strip(), task.strip(), split.strip() or "train", options)
        if not parsed.task:
            raise ValueError(f"env spec {spec!r}: no task after '{family}:'")
    else:
        raise ValueError(f"env spec must be a string or a mapping, got {type(spec).__name__}: {spec!r}")
    if parsed.family not in FAMILIES:
        raise ValueError(f"env spec {str(spec)!r}: unknown family {parsed.family!r}; known: {', '.join(FAMILIES)}")
    if parsed.family != "agentgym" and parsed.split not in SPLITS:
        raise ValueError(f"env spec {str(spec)!r}: unknown split {parsed.split!r}; use one of {', '.join(SPLITS)}")
    _check_common_options(parsed, spec)
    return parsed


COUNT_OPTIONS = ("max_steps", "max_objects", "games")
"""Options every family that takes them reads as a positive count."""


def _check_common_options(parsed: EnvSpec, given: Any) -> None:
    """Options shared by convention across families (``max_steps``...) must be positive integers."""
    for key in COUNT_OPTIONS:
        if key in parsed.options:
            value = parsed.options[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"env spec {str(given)!r}: option {key}={value!r} must be an integer >= 1")


def _is_url_tail(rest: str) -> bool:
    """``task@http://host?x`` keeps the URL's own query (agentgym specs)."""
    _, _, where = rest.partition("@")
    return where.startswith(("http://", "https://"))


def parse_specs(specs: Iterable[str | Mapping[str, Any] | EnvSpec] | str | None) -> list[EnvSpec]:
    """Parse a list of specs (a single string is one spec); duplicates are an error."""
    if specs is None:
        return []
    if isinstance(specs, (str, Mapping, EnvSpec)):
        specs = [specs]
    out = [parse_spec(s) for s in specs]
    seen: set[str] = set()
    for s in out:
        if str(s) in seen:
            raise ValueError(f"env spec {str(s)!r} is listed twice")
        seen.add(str(s))
    return out


def register(family: str, factory: str | Callable[[EnvSpec], Env],
             task_group: str | Callable[[str], str | None] | None = None) -> None:
    """Register an environment family: ``factory`` is ``"module:function"`` or a callable ``(spec) -> Env``;
    ``task_group`` (the same forms, ``(task) -> group or None``) groups its tasks (:data:`TASK_GROUPS`)."""
    FAMILIES[family] = factory  # type: ignore[assignment]
    if task_group is not None:
        TASK_GROUPS[family] = task_group  # type: ignore[assignment]


def task_group(task_type: str) -> str:
    """The group of a task type ``family/task`` as its family defines it (:data:`TASK_GROUPS`), else the type."""
    family, _, task = task_type.partition("/")
    target = TASK_GROUPS.get(family)
    return (_load(family, target)(task) if target else None) or task_type


def _factory(family: str) -> Callable[[EnvSpec], Env]:
    return _load(family, FAMILIES[family])


def _load(family: str, target: Any) -> Callable[..., Any]:
    """``target`` itself when callable, else the function a ``"module:function"`` names (imported now)."""
    if callable(target):
        return target
    module, _, attr = target.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:  # a family whose package is not installed
        raise ImportError(
            f"environment family {family!r} needs a package that is not installed ({e}); "
            f"install the environments with: pip install 'agentrm[envs]'"
        ) from e
    return getattr(mod, attr)


def check_specs(specs: Iterable[EnvSpec]) -> None:
    """Build (and close) one environment per spec, so that a bad task or option fails before any work.

    Construction is cheap for every family (no simulator or game starts before ``reset``).
    """
    for spec in specs:
        env = make_env(spec)
        close = getattr(env, "close", None)
        if close is not None:
            close()


def make_env(spec: str | Mapping[str, Any] | EnvSpec) -> Env:
    """Build the environment ``spec`` describes (not yet reset)."""
    parsed = parse_spec(spec)
    env = _factory(parsed.family)(parsed)
    env.spec = parsed
    return env


_PROCESS_ENVS: dict[str, Env] = {}


def env_for(spec: str | Mapping[str, Any] | EnvSpec) -> Env:
    """This process's long-lived environment for ``spec`` (built on first use, then reused).

    Worker processes of the collector and the tree builder own their environments
    through this cache; each job resets the environment it gets.
    """
    key = str(parse_spec(spec))
    if key not in _PROCESS_ENVS:
        _PROCESS_ENVS[key] = make_env(key)
    return _PROCESS_ENVS[key]


def check_disjoint(train: Iterable[str], evaluation: Iterable[str], what: str = "evaluation") -> None:
    """Raise if any task instance key appears in both collections.

    Args:
        train: instance keys (:meth:`Env.instance_key`) of the training episodes.
        evaluation: instance keys of the evaluation episodes.

    Raises:
        ValueError: naming up to five shared instances and how many there are.
    """
    shared = sorted(set(train) & set(evaluation))
    if shared:
        raise ValueError(
            f"{len(shared)} {what} task instance(s) are also training instances, e.g. {shared[:5]}; "
            f"use another split or seed"
        )
