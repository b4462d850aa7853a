"""The layering is a contract: ``lint-imports`` checks it (contracts in pyproject.toml, [tool.importlinter])."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _lint_imports() -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert exe, "lint-imports (import-linter) is not installed; scripts/setup.sh installs the dev extra"
    return subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_import_contracts_are_kept():
    out = _lint_imports()
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "BROKEN" not in out.stdout and out.stdout.count("KEPT") >= 2


def test_contract_catches_a_violation(tmp_path):
    """The contract is live: a generic module importing a concrete environment breaks it."""
    bad = ROOT / "agentrm" / "search" / "_contract_probe.py"
    bad.write_text("from agentrm.envs.babyai import BabyAITextEnv  # noqa: F401\nfrom agentrm.pipeline import run_pipeline  # noqa: F401\n")
    try:
        out = _lint_imports()
    finally:
        bad.unlink()
    assert out.returncode != 0
    assert "agentrm.search._contract_probe" in out.stdout and out.stdout.count("BROKEN") >= 2
