"""Errors met while building what a CLI config describes reach the user as one clear line.

A model that cannot be built from a config (4-bit without CUDA, a model that is not there, a
device that does not exist) is a usage error, not a crash: :func:`run_cli` ends the process with
exit code 2, a hint line and, as the last line of stderr, ``<prog>: error: <section>: <cause>``.
Set ``AGENTRM_DEBUG=1`` to get the full traceback instead.

* :class:`BuildError` marks such an error; :func:`building` wraps a block that builds something
  (``with building("scorers[0] (value_rm)"): ...``) and turns any exception into a
  :class:`BuildError` naming the config section.
* :func:`root_cause` digs the original exception out of the chain that jsonargparse builds around an
  exception raised while it instantiates a class (its ``Does not validate against any of the Union
  subtypes`` dump of the whole namespace).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

DEBUG_ENV = "AGENTRM_DEBUG"
EXIT_CODE = 2


class BuildError(RuntimeError):
    """Building something a CLI config describes failed; the message names the config section and the cause."""


def debug() -> bool:
    """``AGENTRM_DEBUG`` is set (to anything but ``0``/empty): show tracebacks."""
    return os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def one_line(exc: BaseException) -> str:
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


def run_cli(prog: str, main: Callable[..., Any], argv: list[str] | None = None) -> Any:
    """``main(argv)``; a :class:`BuildError` exits with code 2 and its message as stderr's last line.

    Other exceptions propagate with their tracebacks (a failure while running is not a config error).
    """
    try:
        return main(argv)
    except BuildError as e:
        if debug():
            raise
        print(f"({DEBUG_ENV}=1 shows the full traceback)", file=sys.stderr)
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_CODE) from None
