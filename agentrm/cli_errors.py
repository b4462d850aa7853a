"""Usage errors reach the user as one clear line, for every command.

Three kinds of mistakes are usage errors, not crashes: a config that cannot be built (4-bit without
CUDA, a model that is not there), training data that cannot be trained on (a malformed JSONL line, a
NaN value, an empty file) and a command line or config file the parser rejects (a mistyped key). Each
ends the process with exit code 2, a hint line and, as the last line of stderr,
``<prog>: error: <where>: <cause>``. Set ``AGENTRM_DEBUG=1`` for the full traceback (or the parser's
full message) instead. A genuine crash keeps its traceback and exit code 1.

* :class:`BuildError` marks a config error; :func:`building` wraps a block that builds something
  (``with building("scorers[0] (value_rm)"): ...``) and turns any exception into a
  :class:`BuildError` naming the config section.
* :func:`run_cli` runs a command's ``main`` and prints what :func:`is_usage_error` accepts
  (:class:`BuildError`, :class:`agentrm.data.schema.DataError`) in one line.
* :class:`OneLineErrors` makes a jsonargparse parser report a rejected key in one line with the
  closest valid names (``unknown key 'trainer.max_epochz' (in cfg.yaml); did you mean 'trainer.max_epochs'?``)
  instead of the usage and a dump of the namespace; :func:`auto_cli` is ``jsonargparse.auto_cli`` with it.
* :func:`root_cause` digs the original exception out of the chain that jsonargparse builds around an
  exception raised while it instantiates a class (its ``Does not validate against any of the Union
  subtypes`` dump of the whole namespace).
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DEBUG_ENV = "AGENTRM_DEBUG"
EXIT_CODE = 2


class BuildError(RuntimeError):
    """Building something a CLI config describes failed; the message names the config section and the cause."""


def debug() -> bool:
    """``AGENTRM_DEBUG`` is set (to anything but ``0``/empty): show tracebacks."""
    return os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def one_line(exc: BaseException | str) -> str:
    """``exc``'s message with its whitespace (newlines included) collapsed to single spaces."""
    return " ".join(str(exc).split()) or type(exc).__name__


def root_cause(exc: BaseException) -> BaseException:
    """The outermost :class:`BuildError` in ``exc``'s chain (``__cause__``/``__context__``), else its deepest exception."""
    chain = [exc]
    while True:
        cur = chain[-1]
        nxt = cur.__cause__ or (None if cur.__suppress_context__ else cur.__context__)
        if nxt is None or nxt in chain:
            break
        chain.append(nxt)
    return next((e for e in chain if isinstance(e, BuildError)), chain[-1])


@contextmanager
def building(what: str | None = None) -> Iterator[None]:
    """Re-raise any exception of the block as :class:`BuildError` ``"<what>: <message>"`` (chained).

    ``what=None`` keeps the message as it is (for checks whose messages already name the field).
    """
    try:
        yield
    except BuildError:
        raise
    except Exception as e:
        raise BuildError(f"{what}: {one_line(e)}" if what else one_line(e)) from e


def is_usage_error(exc: BaseException) -> bool:
    """A config error (:class:`BuildError`) or a data error (:class:`agentrm.data.schema.DataError`:
    a malformed record, labels that cannot train, a file with nothing in it)."""
    from agentrm.data.schema import DataError  # lazy: keeps this module importable from any layer

    return isinstance(exc, (BuildError, DataError))


def fail_in_one_line(prog: str, message: str, hint: str = f"({DEBUG_ENV}=1 shows the full traceback)") -> None:
    """Print ``hint`` and ``<prog>: error: <message>`` (one line) to stderr; exit with code 2."""
    print(hint, file=sys.stderr)
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    raise SystemExit(EXIT_CODE)


def run_cli(prog: str, main: Callable[..., Any], argv: list[str] | None = None,
            usage_error: Callable[[BaseException], bool] = is_usage_error) -> Any:
    """``main(argv)``; an exception ``usage_error`` accepts exits with code 2 and its message as stderr's last line.

    Other exceptions propagate with their tracebacks (a failure while running is not a usage error).
    """
    try:
        return main(argv)
    except Exception as e:
        if not usage_error(e) or debug():
            raise
        fail_in_one_line(prog, str(e))


# --- parser errors -------------------------------------------------------------------------------------


class OneLineErrors:
    """Mixin for a jsonargparse ``ArgumentParser``: a rejected command line or config file ends the process
    with one line naming the key (and the config file holding it) and the closest valid names, exit code 2.

    Abbreviated options are refused (``allow_abbrev=False``): ``--trainer.max_epoch`` is a typo to be
    named, not a prefix to be guessed. Set ``command`` to the program name printed before ``error:``.
    """

    command = "agentrm"

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args: Any = None, *rest: Any, **kwargs: Any) -> Any:
        self._given_args = list(args) if isinstance(args, (list, tuple)) else sys.argv[1:] if args is None else []
        return super().parse_args(args, *rest, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> Any:
        if not getattr(self, "exit_on_error", True) or debug() or os.environ.get("JSONARGPARSE_DEBUG"):
            return super().error(message, ex)
        line = explain_parse_error(self, message, getattr(self, "_given_args", []))
        fail_in_one_line(self.command, line, f"(--help lists every option; {DEBUG_ENV}=1 shows the parser's full message)")


def one_line_parser(base: type, command: str) -> type:
    """``base`` (a jsonargparse ``ArgumentParser`` class) with :class:`OneLineErrors`, printing ``command``."""
    return type(f"OneLine{base.__name__}", (OneLineErrors, base), {"command": command})


def auto_cli(component: Any, argv: list[str] | None, command: str, **kwargs: Any) -> Any:
    """``jsonargparse.auto_cli(component, args=argv)`` whose parse errors are one line (:class:`OneLineErrors`)."""
    from jsonargparse import ArgumentParser
    from jsonargparse import auto_cli as jsonargparse_auto_cli

    return jsonargparse_auto_cli(component, args=argv, parser_class=one_line_parser(ArgumentParser, command), **kwargs)


_UNRECOGNIZED = re.compile(r"unrecognized arguments: (.*)", re.S)
_GROUP_OPTION = re.compile(r"Group '([^']+)' does not accept (?:nested key|option) '([^']+)'")
_NOT_ACCEPTED = re.compile(r"(?:Key|Option) '([^']+)' is not (?:accepted|expected)")
_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
_CLASS_PROBLEM = re.compile(r"Problem with given class_path '([^']+)':\s*(.*?)(?:\n\s*- |\Z)", re.S)


def explain_parse_error(parser: Any, message: str, argv: list[str]) -> str:
    """One line for a jsonargparse error ``message``: the rejected key, where it was given and the closest names."""
    m = _UNRECOGNIZED.search(message)
    if m:
        flags = [t for t in m.group(1).split() if t.startswith("-")]
        if flags:
            names = parser_keys(parser)
            return "; ".join(unknown_key(f.lstrip("-").split("=", 1)[0], names, argv, flag=True) for f in flags)
        return one_line(message)
    outer = _PARSER_KEY.match(message.strip())
    cls = _CLASS_PROBLEM.search(message)
    if outer and cls:  # a subclass-typed key (model, trainer.callbacks...): name the class's own options
        section, class_path, inner = outer.group(1), cls.group(1), cls.group(2)
        short = class_path.rsplit(".", 1)[-1]
        bad = _NOT_ACCEPTED.search(inner) or _GROUP_OPTION.search(inner)
        if bad:
            key = bad.group(bad.lastindex)
            where = key_source(f"{section}.{key}", argv)
            close = difflib.get_close_matches(key, class_keys(class_path), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            return f"{section}: unknown key {key!r} for {short}{where}{hint}"
        inner_key = _PARSER_KEY.search(inner)
        detail = one_line(_PARSER_KEY.sub("", inner, count=1)).lstrip(": ") if inner_key else one_line(inner)
        field = f"{section}.init_args.{inner_key.group(1)}" if inner_key else f"{section} ({short})"
        return f"{field}: {detail}"
    for pattern in (_GROUP_OPTION, _NOT_ACCEPTED):
        m = pattern.search(message)
        if m:
            key = ".".join(m.groups())
            return unknown_key(key, parser_keys(parser), argv)
    first = message.strip().splitlines()[0] if message.strip() else message
    rest = [ln.strip() for ln in message.strip().splitlines()[1:] if ln.strip() and not ln.strip().startswith("Given value")]
    return one_line(" ".join([first, *rest[:3]]))


def unknown_key(key: str, names: list[str], argv: list[str], flag: bool = False) -> str:
    """``unknown key 'k' (in <file>); did you mean 'a', 'b'?`` (``--k`` for a command-line flag)."""
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    if not close:  # compare the last part within the same section (``trainer.max_epochz`` vs trainer.*)
        section, _, leaf = key.rpartition(".")
        same = [n.rpartition(".")[2] for n in names if n.rpartition(".")[0] == section]
        close = [f"{section}.{c}" if section else c for c in difflib.get_close_matches(leaf, same, n=3, cutoff=0.5)]
    shown = (lambda k: f"--{k}") if flag else repr
    hint = f"; did you mean {', '.join(shown(c) for c in close)}?" if close else ""
    return f"unknown {'option' if flag else 'key'} {shown(key)}{key_source(key, argv)}{hint}"


def parser_keys(parser: Any) -> list[str]:
    """Every key the parser accepts (``trainer.max_epochs``, ``data.train_path``, ``ckpt_path``...)."""
    keys = []
    for action in getattr(parser, "_actions", []):
        dest = getattr(action, "dest", None)
        if dest and dest not in ("help", "config", "print_config") and not dest.startswith("=="):
            keys.append(dest)
    return keys


def class_keys(class_path: str) -> list[str]:
    """The init options of ``class_path`` as jsonargparse reads them (``[]`` if it cannot be imported)."""
    try:
        from jsonargparse import ArgumentParser

        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        p = ArgumentParser(exit_on_error=False)
        p.add_class_arguments(cls, fail_untyped=False)
        return parser_keys(p)
    except Exception:
        return []


def key_source(key: str, argv: list[str]) -> str:
    """`` (in <config file>)`` for the first ``--config`` file of ``argv`` that holds ``key``, else ``""``."""
    parts = [p for p in key.split(".") if p != "init_args"]
    files = [a.split("=", 1)[1] if a.startswith("--config=") else argv[i + 1] for i, a in enumerate(argv)
             if (a == "--config" and i + 1 < len(argv)) or a.startswith("--config=")]
    for f in files:
        try:
            import yaml

            data = yaml.safe_load(Path(f).read_text())
        except Exception:
            continue
        if _holds(data, parts):
            return f" (in {f})"
    return ""


def _holds(data: Any, parts: list[str]) -> bool:
    if not parts:
        return True
    if isinstance(data, list):
        return any(_holds(x, parts) for x in data)
    if not isinstance(data, dict):
        return False
    if parts[0] in data:
        return _holds(data[parts[0]], parts[1:])
    return "init_args" in data and _holds(data["init_args"], parts)
