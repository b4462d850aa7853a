"""step_values: Triton (interpreter) and torch gather-then-dot paths vs the eager reference."""

import pytest
import torch
from agentrm.kernels import (
    BACKEND_ENV,
    interpreter_ready,
    step_values,
    step_values_eager,
    step_values_torch,
)

# (see test_step_logratio.py: skipped in-process when triton was imported before TRITON_INTERPRET=1, then
# covered by test_triton_paths_in_fresh_process)
needs_triton = pytest.mark.skipif(
    not interpreter_ready(),
    reason="triton missing, or imported before TRITON_INTERPRET=1 (rerun in subprocess)",
)
BACKENDS = [pytest.param("triton", marks=needs_triton), "torch"]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


def make_case(dtype: torch.dtype, n: int = 141, h: int = 31, s: int = 13):
    hidden = torch.randn(n, h).to(dtype)
    head_w = (torch.randn(h) / h**0.5).to(dtype)
    head_b = torch.randn(1).to(dtype)  # Linear(H, 1).bias has shape [1]
    idx = torch.randint(0, n, (s,))
    if s > 2:
        idx[1] = idx[0]  # duplicate step end (grad must accumulate)
        idx[-1] = n - 1  # last token
    return hidden, head_w, head_b, idx


@pytest.mark.parametrize("sigmoid", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_values_and_grads(seed, backend, dtype, sigmoid):
    hidden, head_w, head_b, idx = make_case(dtype)
    h, w, b = (x.clone().requires_grad_() for x in (hidden, head_w, head_b))
    out = step_values(h, w, b, idx, sigmoid=sigmoid, backend=backend)
    g = torch.randn_like(out)  # non-uniform upstream gradient
    (out * g).sum().backward()
    h2, w2, b2 = (x.float().requires_grad_() for x in (hidden, head_w, head_b))
    ref = step_values_eager(h2, w2, b2, idx, sigmoid=sigmoid)
    (ref * g).sum().backward()
    assert out.dtype == torch.float32 and out.shape == idx.shape
    torch.testing.assert_close(out, ref, **TOL[dtype])
    for got, want, x in ((h.grad, h2.grad, h), (w.grad, w2.grad, w), (b.grad, b2.grad, b)):
        assert got.dtype == x.dtype and got.shape == x.shape
        torch.testing.assert_close(got.float(), want, **TOL[dtype])
    untouched = torch.ones(hidden.shape[0], dtype=torch.bool)
    untouched[idx] = False
    assert torch.all(h.grad[untouched] == 0)  # the head ran only at step ends


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_steps(seed, backend):
    hidden, head_w, head_b, _ = make_case(torch.float32)
    h = hidden.clone().requires_grad_()
    w = head_w.clone().requires_grad_()
    idx = torch.zeros(0, dtype=torch.long)
    out = step_values(h, w, head_b, idx, backend=backend)
    assert out.shape == (0,)
    out.sum().backward()
    assert torch.all(h.grad == 0) and torch.all(w.grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_bias_scalar_bias_and_strided_hidden(seed, backend):
    big = torch.randn(60, 50)
    hidden = big[:, 3:40]  # non-contiguous rows
    head_w = torch.randn(37)
    idx = torch.tensor([0, 59, 17, 17, 5])
    ref = step_values_eager(hidden.contiguous(), head_w, 0.25, idx)
    torch.testing.assert_close(step_values(hidden, head_w, 0.25, idx, backend=backend), ref)
    b0 = torch.tensor(0.25, requires_grad=True)  # 0-d bias tensor
    out = step_values(hidden, head_w, b0, idx, backend=backend)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert b0.grad.shape == () and float(b0.grad) == pytest.approx(len(idx))


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_step_single_token(seed, backend):
    hidden = torch.randn(1, 5)
    head_w = torch.randn(5)
    out = step_values(hidden, head_w, -1.0, torch.tensor([0]), sigmoid=True, backend=backend)
    torch.testing.assert_close(out, torch.sigmoid(hidden[0] @ head_w - 1.0).reshape(1))


def test_torch_path_matches_eager(seed):
    hidden, head_w, head_b, idx = make_case(torch.float32, n=300, h=64, s=40)
    torch.testing.assert_close(
        step_values_torch(hidden, head_w, head_b, idx), step_values_eager(hidden, head_w, head_b, idx)
    )


def test_validation():
    hidden, head_w = torch.randn(4, 6), torch.randn(6)
    with pytest.raises(IndexError):
        step_values(hidden, head_w, 0.0, torch.tensor([4]))
    with pytest.raises(ValueError):
        step_values(hidden, torch.randn(5), 0.0, torch.tensor([0]))
    with pytest.raises(ValueError):
        step_values(hidden, head_w, torch.zeros(2), torch.tensor([0]))


@needs_triton
def test_env_var_selects_triton_on_cpu(monkeypatch):
    """With AGENTRM_KERNEL_BACKEND=triton (and the interpreter on), CPU tensors go through the kernel."""
    import importlib

    module = importlib.import_module("agentrm.kernels.step_values")
    calls = []
    real = module._triton_forward
    monkeypatch.setattr(module, "_triton_forward", lambda *a: calls.append(1) or real(*a))
    hidden, head_w, head_b, idx = make_case(torch.float32, n=20, h=8, s=3)
    monkeypatch.setenv(BACKEND_ENV, "triton")
    step_values(hidden, head_w, head_b, idx)
    assert calls
    monkeypatch.setenv(BACKEND_ENV, "torch")
    step_values(hidden, head_w, head_b, idx)
    assert len(calls) == 1
    monkeypatch.delenv(BACKEND_ENV)
    step_values(hidden, head_w, head_b, idx)  # auto on CPU -> torch
    assert len(calls) == 1
