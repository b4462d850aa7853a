"""step_logratio / token_logprobs: Triton (interpreter) and chunked torch paths vs the eager reference."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from agentrm.kernels import (
    BACKEND_ENV,
    interpreter_ready,
    interpreting,
    resolve_backend,
    step_logratio,
    step_logratio_chunked,
    step_logratio_eager,
    token_logprobs,
    token_logprobs_chunked,
    token_logprobs_eager,
    triton_available,
)

# the submodules (the package attribute step_logratio is the function)
slr_module = importlib.import_module("agentrm.kernels.step_logratio")
triton_module = importlib.import_module("agentrm.kernels.logratio_triton")

# The Triton paths run on CPU tensors through the interpreter; that needs triton to have been imported with
# TRITON_INTERPRET=1 (see conftest.py). If another test folder imported it first (lightning/transformers do),
# they are skipped here and test_triton_paths_in_fresh_process reruns this folder in a fresh process.
HAS_TRITON_HERE = interpreter_ready()
needs_triton = pytest.mark.skipif(
    not HAS_TRITON_HERE, reason="triton missing, or imported before TRITON_INTERPRET=1 (rerun in subprocess)"
)

INTERPRETER_TEST_FILES = ("test_step_logratio.py", "test_step_values.py", "test_grad_filter.py")
# backends: "triton" (interpreter on CPU), "chunked" (pure torch with small, odd chunks)
BACKENDS = [pytest.param("triton", marks=needs_triton), "chunked"]
TOL = {torch.float32: dict(atol=2e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-3, rtol=2e-3)}
GRAD_TOL = {torch.float32: dict(atol=2e-4, rtol=1e-3), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def make_case(
    dtype: torch.dtype = torch.float32, n_seq: int = 3, seq_len: int = 47, h: int = 31, v: int = 123
) -> dict:
    """Packed batch of ``n_seq`` sequences: seq 0 has multi-token and one-token steps, seq 1 no steps at
    all, the rest random steps; ~10% ignored targets, some tokens outside every step."""
    n = n_seq * seq_len
    hidden = (torch.randn(n, h) * 1.5).to(dtype)
    weight = (torch.randn(v, h) / h**0.5 * 2.0).to(dtype)
    targets = torch.randint(0, v, (n,))
    targets[torch.rand(n) < 0.1] = -100
    step_ids = torch.full((n,), -1, dtype=torch.long)
    s = 0
    for i in range(n_seq):
        if i == 1:
            continue  # a sequence with no steps
        pos = i * seq_len + 3  # prompt tokens (no step)
        end = (i + 1) * seq_len
        lengths = [1, 5, 1, 1, 9] if i == 0 else []
        while pos < end:
            ln = lengths.pop(0) if lengths else int(torch.randint(1, 12, ()))
            ln = min(ln, end - pos)
            step_ids[pos : pos + ln] = s
            s += 1
            pos += ln + int(torch.randint(0, 3, ()))  # gaps (observation tokens) between steps
    ref = -torch.rand(n) * 6.0
    return dict(hidden=hidden, weight=weight, targets=targets, step_ids=step_ids, ref=ref, num_steps=s)


def run(backend: str, c: dict, hidden=None, weight=None, beta=0.1, num_steps=None, **kw):
    hidden = c["hidden"] if hidden is None else hidden
    weight = c["weight"] if weight is None else weight
    args = (hidden, weight, c["targets"], c["step_ids"], c["ref"], beta)
    s = c["num_steps"] if num_steps is None else num_steps
    if backend == "chunked":
        return step_logratio_chunked(*args, s, return_token_logp=True, chunk_tokens=16, chunk_vocab=50, **kw)
    if backend == "eager":
        return step_logratio_eager(*args, s, return_token_logp=True)
    return step_logratio(*args, s, return_token_logp=True, backend=backend, **kw)


def oracle(c: dict, beta=0.1, num_steps=None):
    """Eager reference on the same values in fp32 (exact math for bf16 inputs too)."""
    return run("eager", c, c["hidden"].float(), c["weight"].float(), beta=beta, num_steps=num_steps)


@pytest.mark.skipif(
    not triton_available() or HAS_TRITON_HERE, reason="triton missing, or the Triton tests run in-process"
)
def test_triton_paths_in_fresh_process():
    """triton was imported before TRITON_INTERPRET=1 took effect: rerun this folder's interpreter tests (the
    files that run kernels on CPU tensors; the others start their own processes) where it is set first."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    files = [str(Path(__file__).with_name(f)) for f in INTERPRETER_TEST_FILES]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "1 skipped" in summary, summary  # only this test skips there


def test_interpreter_active():
    if not triton_available():
        pytest.skip("triton not installed")
    if torch.cuda.is_available() and not interpreting():
        pytest.skip("CUDA present: conftest leaves TRITON_INTERPRET unset; the fresh-process rerun interprets")
    assert interpreting(), "TRITON_INTERPRET=1 did not take effect"
    if not HAS_TRITON_HERE:
        pytest.skip("triton was imported before TRITON_INTERPRET=1; see test_triton_paths_in_fresh_process")
    kernels = triton_module.triton_kernels(True)
    assert type(kernels["fwd"]).__name__ == "InterpretedFunction"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_matches_eager(seed, backend, dtype):
    c = make_case(dtype)
    with torch.no_grad():
        rewards, logp = run(backend, c)
    ref_rewards, ref_logp = oracle(c)
    assert rewards.dtype == logp.dtype == torch.float32
    assert rewards.shape == (c["num_steps"],) and logp.shape == (c["hidden"].shape[0],)
    torch.testing.assert_close(logp, ref_logp, **TOL[dtype])
    torch.testing.assert_close(rewards, ref_rewards, **TOL[dtype])
    assert torch.all(logp[c["targets"] < 0] == 0)


def test_eager_reference_is_log_softmax(seed):
    c = make_case(n_seq=1, seq_len=20, h=8, v=17)
    _, logp = oracle(c)
    manual = torch.log_softmax(c["hidden"] @ c["weight"].T, -1)
    valid = c["targets"] >= 0
    torch.testing.assert_close(logp[valid], manual[valid, c["targets"][valid]])
    r = torch.zeros(c["num_steps"])
    for t in range(c["hidden"].shape[0]):
        if c["step_ids"][t] >= 0 and valid[t]:
            r[c["step_ids"][t]] += 0.1 * (logp[t] - c["ref"][t])
    torch.testing.assert_close(oracle(c)[0], r)


@needs_triton
@pytest.mark.parametrize("splits", [1, 3, 5])
def test_triton_vocab_splits(seed, splits):
    c = make_case(n_seq=1, seq_len=40, v=200)
    logp, lse, _ = triton_module.triton_forward(c["hidden"], c["weight"], c["targets"], num_splits=splits)
    ref_lse = torch.logsumexp(c["hidden"] @ c["weight"].T, -1)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(logp, oracle(c)[1], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(seed, backend):
    c = make_case(n_seq=1, seq_len=33, h=20, v=70)
    big = torch.randn(c["hidden"].shape[0], 45)
    hidden = big[:, 5:25]  # row stride 45
    w_t = torch.randn(20, 70)
    weight = w_t.T  # stride (1, 70)
    with torch.no_grad():
        rewards, logp = run(backend, c, hidden, weight)
    ref_rewards, ref_logp = run("eager", c, hidden.contiguous(), weight.contiguous())
    torch.testing.assert_close(logp, ref_logp, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(rewards, ref_rewards, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_eager(seed, backend, dtype):
    c = make_case(dtype)
    h = c["hidden"].clone().requires_grad_()
    w = c["weight"].clone().requires_grad_()
    rewards, logp = run(backend, c, h, w)
    g_r = torch.randn_like(rewards)  # non-uniform upstream gradients on both outputs
    g_l = torch.randn_like(logp)
    ((rewards * g_r).sum() + (logp * g_l).sum()).backward()
    h32 = c["hidden"].float().requires_grad_()
    w32 = c["weight"].float().requires_grad_()
    rr, ll = run("eager", c, h32, w32)
    ((rr * g_r).sum() + (ll * g_l).sum()).backward()
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    torch.testing.assert_close(h.grad.float(), h32.grad, **GRAD_TOL[dtype])
    torch.testing.assert_close(w.grad.float(), w32.grad, **GRAD_TOL[dtype])
    assert torch.all(h.grad[c["targets"] < 0] == 0)  # ignored tokens get no gradient


@pytest.mark.parametrize("which", ["hidden", "weight"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_of_one_input_only(seed, backend, which):
    """Frozen LM head (LoRA) or frozen hidden: only the needed gradient is computed, and it is right."""
    c = make_case(n_seq=1, seq_len=40)
    h = c["hidden"].clone().requires_grad_(which == "hidden")
    w = c["weight"].clone().requires_grad_(which == "weight")
    rewards, _ = run(backend, c, h, w)
    g = torch.randn_like(rewards)
    (rewards * g).sum().backward()
    h2 = c["hidden"].clone().requires_grad_(which == "hidden")
    w2 = c["weight"].clone().requires_grad_(which == "weight")
    (run("eager", c, h2, w2)[0] * g).sum().backward()
    got, want = (h.grad, h2.grad) if which == "hidden" else (w.grad, w2.grad)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-3)
    assert (w.grad if which == "hidden" else h.grad) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_steps_and_all_ignored(seed, backend):
    c = make_case(n_seq=1, seq_len=30, h=16, v=40)
    c["step_ids"][:] = -1
    h = c["hidden"].clone().requires_grad_()
    rewards, logp = run(backend, c, h, num_steps=0)
    assert rewards.shape == (0,)
    (rewards.sum() + logp.sum()).backward()  # token logp still differentiable
    h2 = c["hidden"].clone().requires_grad_()
    torch.testing.assert_close(run("eager", c, h2, num_steps=0)[1], logp, atol=2e-4, rtol=1e-4)
    c["targets"][:] = -1
    with torch.no_grad():
        rewards, logp = run(backend, c, num_steps=3)
    assert torch.all(rewards == 0) and torch.all(logp == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_token(seed, backend):
    c = make_case(n_seq=1, seq_len=1, h=7, v=19)
    c["targets"][0] = 3
    c["step_ids"][0] = 0
    c["num_steps"] = 1
    with torch.no_grad():
        rewards, logp = run(backend, c, beta=0.5)
    ref_rewards, ref_logp = oracle(c, beta=0.5)
    torch.testing.assert_close(rewards, ref_rewards, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "torch"])
def test_token_logprobs(seed, backend):
    c = make_case(n_seq=2, seq_len=29, h=24, v=90)
    h = c["hidden"].clone().requires_grad_()
    w = c["weight"].clone().requires_grad_()
    logp = token_logprobs(h, w, c["targets"], backend=backend)
    g = torch.rand_like(logp) * 3 - 1
    (logp * g).sum().backward()
    h2 = c["hidden"].clone().requires_grad_()
    w2 = c["weight"].clone().requires_grad_()
    ref = token_logprobs_eager(h2, w2, c["targets"])
    (ref * g).sum().backward()
    torch.testing.assert_close(logp, ref, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(h.grad, h2.grad, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(w.grad, w2.grad, atol=2e-4, rtol=1e-3)
    with torch.no_grad():
        chunked = token_logprobs_chunked(
            c["hidden"], c["weight"], c["targets"], chunk_tokens=7, chunk_vocab=13
        )
    torch.testing.assert_close(chunked, ref.detach(), atol=2e-4, rtol=1e-4)


def test_empty_batch():
    h = torch.zeros(0, 8)
    w = torch.randn(11, 8)
    t = torch.zeros(0, dtype=torch.long)
    for backend in ["torch"] + (["triton"] if HAS_TRITON_HERE else []):
        r, lp = step_logratio(h, w, t, t, torch.zeros(0), 0.1, 2, return_token_logp=True, backend=backend)
        assert r.shape == (2,) and lp.shape == (0,) and torch.all(r == 0)


def test_input_validation():
    h, w = torch.randn(4, 8), torch.randn(11, 8)
    t = torch.tensor([1, 2, 3, 4])
    with pytest.raises(ValueError):
        token_logprobs(h, torch.randn(11, 9), t)
    with pytest.raises(ValueError):
        token_logprobs(h, w, torch.tensor([1, 2, 3, 11]))
    with pytest.raises(ValueError):
        step_logratio(h, w, t, torch.tensor([0, 0, 1, 2]), torch.zeros(4), 0.1, 2)


# ---- dispatch ---------------------------------------------------------------------------------------
def test_dispatch_auto_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    x = torch.zeros(2, 2)
    assert resolve_backend(None, x) == "torch"
    assert resolve_backend("auto", x) == "torch"
    assert resolve_backend("torch", x) == "torch"


@needs_triton
def test_dispatch_env_and_explicit(monkeypatch):
    x = torch.zeros(2, 2)
    monkeypatch.setenv(BACKEND_ENV, "triton")
    assert resolve_backend(None, x) == "triton"  # env overrides auto
    assert resolve_backend("torch", x) == "torch"  # explicit argument beats env
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert resolve_backend(None, x) == "torch"
    assert resolve_backend("triton", x) == "triton"
    monkeypatch.setenv(BACKEND_ENV, "auto")
    assert resolve_backend(None, x) == "torch"
    monkeypatch.setenv(BACKEND_ENV, "cuda-magic")
    with pytest.raises(ValueError):
        resolve_backend(None, x)
    with pytest.raises(ValueError):
        resolve_backend("numpy", x)


@needs_triton
def test_dispatch_env_routes_calls_to_triton(monkeypatch, seed):
    """With the env var set, the public op really runs the Triton path (spy on the launcher)."""
    calls = []
    real = slr_module.triton_forward

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(slr_module, "triton_forward", spy)
    c = make_case(n_seq=1, seq_len=10, h=8, v=20)
    monkeypatch.setenv(BACKEND_ENV, "triton")
    with torch.no_grad():
        step_logratio(c["hidden"], c["weight"], c["targets"], c["step_ids"], c["ref"], 0.1, c["num_steps"])
    assert calls
    calls.clear()
    monkeypatch.setenv(BACKEND_ENV, "torch")
    with torch.no_grad():
        step_logratio(c["hidden"], c["weight"], c["targets"], c["step_ids"], c["ref"], 0.1, c["num_steps"])
    assert not calls


def test_dispatch_triton_on_cpu_without_interpreter_raises(monkeypatch):
    if not triton_available():
        pytest.skip("triton not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        resolve_backend("triton", torch.zeros(1))


def test_autotune_bucket_separates_scoring_from_training_sizes():
    n_bucket = triton_module.n_bucket
    assert [n_bucket(n) for n in (0, 1, 2, 3, 64, 65, 8192)] == [1, 1, 2, 4, 64, 128, 8192]
    assert n_bucket(10**6) == triton_module.N_BUCKET_CAP
    assert n_bucket(48) != n_bucket(8000)  # a beam-scoring batch and a training batch tune separately


@pytest.mark.parametrize(
    "hidden, weight, expected",
    [
        (torch.bfloat16, torch.bfloat16, (False, "ieee", False)),  # native bf16 tensor-core dots
        (torch.bfloat16, torch.float32, (False, "ieee", False)),  # QLoRA's fp32 lm_head: rounded to bf16
        (torch.float32, torch.bfloat16, (False, "ieee", True)),
        (torch.float16, torch.float32, (False, "ieee", False)),
    ],
)
def test_dot_precision_uses_tensor_cores_for_mixed_dtypes(monkeypatch, hidden, weight, expected):
    monkeypatch.delenv(triton_module.DOT_ENV, raising=False)
    assert triton_module.dot_precision(hidden, weight, interp=False) == expected
    # the interpreter and the opt-out force exact fp32 dots
    assert triton_module.dot_precision(hidden, weight, interp=True) == (True, "ieee", False)
    monkeypatch.setenv(triton_module.DOT_ENV, "ieee")
    assert triton_module.dot_precision(hidden, weight, interp=False) == (True, "ieee", False)


def test_dot_precision_fp32_follows_torch_matmul_precision(monkeypatch):
    monkeypatch.delenv(triton_module.DOT_ENV, raising=False)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert triton_module.dot_precision(torch.float32, torch.float32, False) == (True, "tf32", False)
        torch.set_float32_matmul_precision("highest")
        assert triton_module.dot_precision(torch.float32, torch.float32, False) == (True, "ieee", False)
    finally:
        torch.set_float32_matmul_precision(before)
    monkeypatch.setenv(triton_module.DOT_ENV, "fast")
    with pytest.raises(ValueError, match="AGENTRM_KERNEL_DOT"):
        triton_module.dot_precision(torch.float32, torch.float32, False)
