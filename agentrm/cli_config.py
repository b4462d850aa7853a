"""One typed config object per command, built from YAML files and flags by jsonargparse.

Every command (``agentrm.search``, ``collect``, ``trees``, ``pipeline``, ``plan``, ``serve``) describes its
settings as one dataclass whose fields are the flags and YAML keys (nested dataclasses are groups:
``--policy.kind hf``). :func:`parse_config` builds that object; the Python API takes the same object, so a
config means the same thing from the shell and from code. ``--config`` may be given several times:
later files and flags override earlier ones (``--config base.yaml --config override.yaml --episodes 5``).
Values are checked by the dataclasses themselves (``__post_init__``, :mod:`agentrm.checks`), before any work.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def _resolve_init_annotations(cls: type) -> None:
    """Give the dataclass ``__init__`` of ``cls`` resolved annotations.

    A dataclass's generated ``__init__`` resolves postponed (string) annotations in the globals of the
    module that defines ``cls``, so a field inherited from a shared group defined elsewhere (``backend:
    Backend``) cannot be resolved there, and jsonargparse would accept any value for every field.
    :func:`typing.get_type_hints` on the class resolves each field in its own module.
    """
    hints = typing.get_type_hints(cls)
    init = cls.__init__
    init.__annotations__ = {**{f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}, "return": None}
    for hint in hints.values():  # nested groups (``policy: PolicySpec``, ``scorers: list[ScorerSpec]``) too
        for t in (hint, *typing.get_args(hint)):
            if dataclasses.is_dataclass(t) and isinstance(t, type) and t is not cls:
                _resolve_init_annotations(t)


def config_parser(cls: type, prog: str) -> Any:
    """The jsonargparse parser of the dataclass ``cls`` (flags at the top level, ``--config`` files)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from agentrm.cli_errors import one_line_parser

    _resolve_init_annotations(cls)

    doc = (cls.__doc__ or "").strip().split("\n\n")[0]
    parser = one_line_parser(ArgumentParser, prog)(prog=prog, description=doc)  # a rejected key: one line
    parser.add_argument("--config", action=ActionConfigFile,
                        help="a YAML config; repeat to compose (later files and flags override earlier ones)")
    parser.add_class_arguments(cls, as_group=False)
    return parser


def parse_config(cls: type[T], argv: list[str] | None = None, prog: str = "agentrm") -> T:
    """Parse ``argv`` (``None``: ``sys.argv[1:]``) into an instance of the dataclass ``cls`` (checked)."""
    parser = config_parser(cls, prog)
    ns = parser.instantiate(parser.parse_args(argv))
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    return cls(**{name: ns[name] for name in fields if name in ns})


def config_dict(config: Any) -> dict[str, Any]:
    """A config as plain JSON-ready data (nested dataclasses as dicts), e.g. for ``config.json``."""
    return dataclasses.asdict(config)
