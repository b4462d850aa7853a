"""Import agentrm from a plain checkout, without ``pip install``: put this folder on ``PYTHONPATH``.

``pyproject.toml`` maps the top-level ``kernels/`` folder to ``agentrm.kernels`` (``package-dir``); an
installed or editable copy resolves that, a bare tree does not. Python imports a ``sitecustomize`` module
found on ``sys.path`` at start-up (``PYTHONPATH`` entries included), so every interpreter started with this
folder on ``PYTHONPATH``, subprocesses too, gets a finder that resolves

* ``agentrm`` -> ``<tree>/agentrm`` and ``agentrm.kernels`` -> ``<tree>/kernels``,

ahead of any installed agentrm. ``<tree>`` is ``$AGENTRM_TREE`` or the checkout holding this file. A
``sitecustomize`` that this one shadows (the interpreter's own) is still run. ``scripts/device_check.sh``
puts this folder on ``PYTHONPATH``; nothing else uses it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
TREE = os.path.abspath(os.environ.get("AGENTRM_TREE") or os.path.join(_HERE, "..", ".."))
PACKAGES = {"agentrm": os.path.join(TREE, "agentrm"), "agentrm.kernels": os.path.join(TREE, "kernels")}


class TreeFinder(importlib.abc.MetaPathFinder):
    """Finds the packages in :data:`PACKAGES` in the tree; their submodules follow their ``__path__``."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: D102
        where = PACKAGES.get(fullname)
        if where is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, os.path.join(where, "__init__.py"), submodule_search_locations=[where]
        )


def install() -> None:
    if not any(isinstance(f, TreeFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, TreeFinder())


def _chain_shadowed_sitecustomize() -> None:
    """Run the ``sitecustomize`` this file hides (later on ``sys.path``), if there is one."""
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None and spec.origin != os.path.abspath(__file__):
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


install()
_chain_shadowed_sitecustomize()
