"""``scripts/device_check.sh --dry-run``: what CI can check of the GPU run without a GPU.

The dry run goes through the same steps as the run on a lent machine (wheels into a temporary site, agentrm
imported from the tree through ``scripts/device_site/sitecustomize.py``, ``TRITON_INTERPRET`` unset) and
lists every GPU test (``pytest --collect-only``, so a GPU test module that no longer imports fails here) and
every kernel-sweep row. The tests compare that listing with the test files and with ``bench/gpu_check.py``'s
plan, and check that the bootstrap, not an installed copy, is what imports the tree.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys

import pytest

from agentrm.paths import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "scripts" / "device_check.sh"
BOOTSTRAP = PROJECT_ROOT / "scripts" / "device_site"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check")
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_INTERPRET")}
    env["PYTHON"] = sys.executable
    cmd = ["bash", str(SCRIPT), "--dry-run", "--out", str(out), "--wheels", str(out / "no_wheels")]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout, out


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_for_dry_run", PROJECT_ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gpu_test_functions() -> list[str]:
    """``tests/gpu/<file>::<test function>`` for every test function in the GPU test files."""
    out = []
    for path in sorted((PROJECT_ROOT / "tests" / "gpu").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        out += [f"tests/gpu/{path.name}::{node.name}" for node in tree.body
                if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")]
    return out


def test_dry_run_lists_every_gpu_test(dry_run):
    stdout, out = dry_run
    listed = [ln for ln in stdout.splitlines() if ln.startswith("tests/gpu/")]
    missing = [t for t in gpu_test_functions() if not any(ln == t or ln.startswith(t + "[") for ln in listed)]
    assert not missing, missing
    for vocab in (49152, 151936, 262144, 128256):  # the real vocabularies, as test parameters
        assert f"test_step_logratio_at_real_vocabularies[{vocab}]" in stdout
    assert "test_deepspeed_gpu.py::test_zero3_steps_log_finite_losses[value_rm]" in stdout
    assert "test_deepspeed_gpu.py::test_zero3_steps_log_finite_losses[implicit_prm]" in stdout
    assert f"{len(listed)} tests collected" in stdout
    assert (out / "device_check.log").read_text().count("tests/gpu/") >= len(listed)  # the log holds the listing


def test_dry_run_lists_every_sweep_row(dry_run, gpu_check):
    stdout, _ = dry_run
    plan = gpu_check.sweep_plan(gpu_check._bench_kernels())
    rows = [ln.strip() for ln in stdout.splitlines() if ln.startswith("  step_")]
    assert rows == [gpu_check.describe(spec).strip() for spec in plan]
    cases = [spec["case"] for spec in plan]
    assert {49152, 151936, 262144, 128256} <= {c["vocab"] for c in cases}
    assert {"float16", "bfloat16"} <= {c["dtype"] for c in cases}
    assert any(c["dtype"] == "float32" and c.get("weight_dtype") == "bfloat16" for c in cases)
    backends = {spec["backend"] for spec in plan}
    assert {"eager", "triton", "triton-nofilter", "liger", "cce"} <= backends
    # the peers and the filter-off rows stand beside ours in the same cases
    for c in cases:
        if c["op"] == "step_logratio" and c.get("weight_dtype") is None:
            same = {s["backend"] for s in plan if s["case"] is c}
            assert {"triton", "liger", "cce"} <= same, c
    assert f"kernel sweep: {len(plan)} rows" in stdout


def test_dry_run_imports_the_tree_through_the_bootstrap(dry_run):
    stdout, _ = dry_run
    assert f"agentrm.kernels from {PROJECT_ROOT / 'kernels'} (found by TreeFinder)" in stdout
    assert "optional packages" in stdout and "device_check: dry run finished with status 0" in stdout


def _import_kernels(tmp_path, with_bootstrap: bool) -> subprocess.CompletedProcess:
    """Import agentrm.kernels from a directory outside the tree with any editable-install finder removed."""
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path\n"
        "    if not (f.__module__ if isinstance(f, type) else type(f).__module__).startswith('__editable__')]\n"
        "import agentrm.kernels.logratio_triton as m\n"
        "print(m.__file__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if with_bootstrap:
        env["PYTHONPATH"] = str(BOOTSTRAP)
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_bootstrap_is_what_imports_agentrm_kernels_from_a_plain_tree(tmp_path):
    got = _import_kernels(tmp_path, with_bootstrap=True)
    assert got.returncode == 0, got.stderr[-3000:]
    assert got.stdout.strip() == str(PROJECT_ROOT / "kernels" / "logratio_triton.py")
    control = _import_kernels(tmp_path, with_bootstrap=False)  # no install, no bootstrap: not from the tree
    assert control.returncode != 0 or control.stdout.strip() != got.stdout.strip(), control.stdout


def test_unknown_option_is_refused_in_one_line():
    proc = subprocess.run(["bash", str(SCRIPT), "--gpu-please"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "device_check: unknown option --gpu-please (see --help)"]
