"""Triton kernels on a GPU at real shapes (Llama-3-8B head: H=4096, V=128,256; N up to 8k tokens).

Forward and backward of ``step_logratio`` and ``step_values`` against the chunked torch reference run on
fp32 copies of the same inputs (exact math for bf16 inputs), in fp32 and bf16, with ignored tokens,
one-token steps and tokens outside every step. Tolerances are per dtype: bf16 operands give fp32-accumulated
logits (close to the oracle), but ``dlogits`` is rounded to bf16 for the backward dots (~2^-8 relative).
Other vocabularies, fp16, fp32 hidden states with a bf16 head and the gradient filter: test_kernels_more_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
from agentrm.kernels import step_logratio, step_values, step_values_torch
from agentrm.kernels.logratio_triton import n_bucket, triton_kernels

H, V = 4096, 128256
# relative error bounds (norm of the difference / norm of the oracle) per input dtype
REL = {
    torch.float32: {"rewards": 1e-5, "logp": 1e-5, "grad": 1e-4},
    torch.bfloat16: {"rewards": 2e-3, "logp": 1e-3, "grad": 2e-2},
    torch.float16: {"rewards": 2e-3, "logp": 1e-3, "grad": 2e-2},
}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-12))


def make_case(n: int, dtype: torch.dtype, seed: int, v: int = V, weight_dtype: torch.dtype | None = None) -> dict:
    """``n`` tokens: a 1/8 prompt outside every step, then steps of 1 to 40 tokens (every 5th of length 1)
    separated by observation gaps; ~10% of targets ignored. The weight is drawn on the GPU (fast at V=262k)."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, H, generator=g) * 1.5).to(dtype)
    gw = torch.Generator(device="cuda").manual_seed(seed)
    weight = (torch.randn(v, H, generator=gw, device="cuda") / H**0.5 * 2.0).to(weight_dtype or dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < 0.1] = -100
    step_ids = torch.full((n,), -1, dtype=torch.long)
    pos, s = n // 8, 0
    while pos < n:
        ln = 1 if s % 5 == 0 else int(torch.randint(2, 40, (), generator=g))
        step_ids[pos : pos + ln] = s
        s += 1
        pos += ln + int(torch.randint(0, 20, (), generator=g))
    ref = -torch.rand(n, generator=g) * 6.0
    dev = "cuda"
    return dict(hidden=hidden.to(dev), weight=weight.to(dev), targets=targets.to(dev),
                step_ids=step_ids.to(dev), ref=ref.to(dev), num_steps=s)


def run_logratio(c: dict, backend: str, upcast: bool):
    """Rewards, token logp and gradients under fixed non-uniform upstream gradients."""
    h = c["hidden"].float() if upcast else c["hidden"]
    w = c["weight"].float() if upcast else c["weight"]
    h = h.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    rewards, logp = step_logratio(h, w, c["targets"], c["step_ids"], c["ref"], 0.1, c["num_steps"],
                                  return_token_logp=True, backend=backend)
    g = torch.Generator(device="cuda").manual_seed(1)
    up_r = torch.randn(rewards.shape, device="cuda", generator=g)
    up_l = torch.randn(logp.shape, device="cuda", generator=g)
    ((rewards * up_r).sum() + (logp * up_l).sum()).backward()
    return rewards.detach(), logp.detach(), h.grad.float(), w.grad.float()


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    """The fp32 oracle and the fp32 kernels use IEEE fp32 dots (no TF32)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [512, 8192])
def test_step_logratio_forward_backward_at_llama3_shapes(n, dtype, seed):
    c = make_case(n, dtype, seed)
    got = run_logratio(c, "triton", upcast=False)
    want = run_logratio(c, "torch", upcast=True)  # the chunked reference on the same values in fp32
    tol = REL[dtype]
    errs = {name: rel_err(a, b) for name, a, b in zip(("rewards", "logp", "grad_h", "grad_w"), got, want)}
    print(n, dtype, errs)
    assert errs["rewards"] < tol["rewards"] and errs["logp"] < tol["logp"], errs
    assert errs["grad_h"] < tol["grad"] and errs["grad_w"] < tol["grad"], errs
    ignored = c["targets"] < 0
    assert (got[1][ignored] == 0).all() and (got[2][ignored] == 0).all()  # no logp, no gradient


def test_scoring_path_with_an_fp32_lm_head_and_bf16_hidden(seed):
    """QLoRA's k-bit preparation upcasts lm_head to fp32: the kernel rounds it to bf16 for tensor cores."""
    c = make_case(512, torch.bfloat16, seed)
    w32 = c["weight"].float() + 1e-3 * torch.randn_like(c["weight"], dtype=torch.float32)
    with torch.no_grad():
        got = step_logratio(c["hidden"], w32, c["targets"], c["step_ids"], c["ref"], 0.1, c["num_steps"],
                            backend="triton")
        want = step_logratio(c["hidden"].float(), w32, c["targets"], c["step_ids"], c["ref"], 0.1,
                             c["num_steps"], backend="torch")
    assert rel_err(got, want) < 1e-2


def test_autotune_keeps_separate_configs_for_scoring_and_training_sizes(seed):
    fwd = triton_kernels(False)["fwd"]
    for n in (64, 4096):
        c = make_case(n, torch.bfloat16, seed, v=32000)
        with torch.no_grad():
            step_logratio(c["hidden"], c["weight"], c["targets"], c["step_ids"], c["ref"], 0.1, c["num_steps"],
                          backend="triton")
    buckets = {key[2] for key in fwd.cache}  # key order: D, V, N_BUCKET, ...
    assert {n_bucket(64), n_bucket(4096)} <= buckets, fwd.cache.keys()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("sigmoid", [False, True])
def test_step_values_forward_backward_at_real_shapes(dtype, sigmoid, seed):
    n, s = 8192, 257
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g).to(dtype).cuda()
    head_w = (torch.randn(H, generator=g) / H**0.5).to(dtype).cuda()
    head_b = torch.randn(1, generator=g).to(dtype).cuda()
    idx = torch.randint(0, n, (s,), generator=g).cuda()
    idx[1], idx[-1] = idx[0], n - 1  # a duplicate step end, the last token

    def run(fn, upcast):
        xs = [t.float() if upcast else t for t in (hidden, head_w, head_b)]
        xs = [t.detach().requires_grad_(True) for t in xs]
        out = fn(*xs, idx, sigmoid=sigmoid)
        up = torch.randn(out.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))
        (out * up).sum().backward()
        return [out.detach()] + [x.grad.float() for x in xs]

    got = run(lambda *a, **k: step_values(*a, backend="triton", **k), upcast=False)
    want = run(step_values_torch, upcast=True)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, a, b in zip(("values", "grad_h", "grad_w", "grad_b"), got, want):
        assert rel_err(a, b) < tol, (name, rel_err(a, b))

