"""Validation of config values at the edge: one-line errors that name the field, raised before any work.

Every command's config dataclass (and the shared groups: policy, scorers, workers, output) checks its
values in ``__post_init__`` with these helpers, so a bad value fails the same way from YAML, from a flag
and from the Python API. :class:`ConfigError` is a :class:`~agentrm.cli_errors.BuildError` (the commands
print it as ``<prog>: error: <field>: <problem>`` with exit code 2) and a ``ValueError`` (for Python callers).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from agentrm.cli_errors import BuildError


class ConfigError(BuildError, ValueError):
    """A config value is out of its range or of the wrong kind; the message names the field."""


def fail(field: str, problem: str) -> None:
    raise ConfigError(f"{field}: {problem}")


def at_least(value: float | int | None, minimum: float | int, field: str, allow_none: bool = False) -> None:
    """``value >= minimum`` (``None`` passes when ``allow_none``)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        fail(field, f"must be >= {minimum}, got {value!r}")


def in_range(value: float, low: float, high: float, field: str) -> None:
    """``low <= value <= high``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        fail(field, f"must be in [{low}, {high}], got {value!r}")


def one_of(value: Any, choices: Iterable[Any], field: str) -> None:
    choices = tuple(choices)
    if value not in choices:
        fail(field, f"must be one of {', '.join(map(repr, choices))}; got {value!r}")


def each_at_least(values: Sequence[int] | None, minimum: int, field: str) -> None:
    """Every element of ``values`` is an int ``>= minimum``."""
    for i, v in enumerate(values or []):
        at_least(v, minimum, f"{field}[{i}]")


def unique(values: Sequence[Any], field: str) -> None:
    seen = [v for i, v in enumerate(values) if v in values[:i]]
    if seen:
        fail(field, f"must be unique; {seen[0]!r} is repeated")


def differing_fields(old: Mapping[str, Any], new: Mapping[str, Any], keys: Iterable[str], limit: int = 3,
                     width: int = 60) -> str:
    """``episodes: 30 there, 10 now; seed: 0 there, 7 now and 2 more``: the ``keys`` (in order) whose values
    differ between a stored record (there) and the current one (now), the first ``limit`` named with both values
    (``repr``, shortened to ``width`` characters); ``""`` when none differ. For the one-line refusals of resumed
    outputs."""
    def short(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= width else text[: width - 3] + "..."

    diff = [k for k in dict.fromkeys(keys) if old.get(k) != new.get(k)]
    more = f" and {len(diff) - limit} more" if len(diff) > limit else ""
    return "; ".join(f"{k}: {short(old.get(k))} there, {short(new.get(k))} now" for k in diff[:limit]) + more
