"""Triton log-ratio kernels on a GPU beyond the Llama-3 shapes of test_kernels_gpu.py (a separate file, so
that pytest-xdist runs it beside that one): the vocabularies of other real models (SmolLM2 49,152; Qwen2.5
151,936; Gemma 3 262,144; GPT-2's odd 50,257; and Llama 3's 128,256), fp16, fp32 hidden states with a bf16
``lm_head`` (rounded to bf16 in registers), and the backward's gradient filter at its default threshold
against the float64 oracle, within the bound of what it may drop.
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu.test_kernels_gpu import REL, H, V, exact_fp32_matmuls, make_case, rel_err, run_logratio  # noqa: F401

# fp32 hidden states rounded to bf16 inside the dots: a bf16-sized error on every logit
REL_FP32_HIDDEN_BF16_HEAD = {"rewards": 1e-2, "logp": 5e-3, "grad": 3e-2}
REAL_VOCABS = [49152, 151936, 262144, 128256, 50257]  # SmolLM2, Qwen2.5, Gemma 3, Llama 3, GPT-2 (odd)


def assert_parity(c: dict, tol: dict) -> None:
    got = run_logratio(c, "triton", upcast=False)
    want = run_logratio(c, "torch", upcast=True)  # the chunked reference on the same values in fp32
    errs = {name: rel_err(a, b) for name, a, b in zip(("rewards", "logp", "grad_h", "grad_w"), got, want)}
    print(c["weight"].shape, c["hidden"].dtype, c["weight"].dtype, errs)
    assert errs["rewards"] < tol["rewards"] and errs["logp"] < tol["logp"], errs
    assert errs["grad_h"] < tol["grad"] and errs["grad_w"] < tol["grad"], errs
    ignored = c["targets"] < 0
    assert (got[1][ignored] == 0).all() and (got[2][ignored] == 0).all()


@pytest.mark.parametrize("v", REAL_VOCABS)
def test_step_logratio_at_real_vocabularies(v, seed):
    """bf16 forward and backward at vocabularies that are not multiples of every tile width."""
    assert_parity(make_case(512, torch.bfloat16, seed, v=v), REL[torch.bfloat16])


@pytest.mark.parametrize("dtype, weight_dtype", [(torch.float16, None), (torch.float32, torch.bfloat16)],
                         ids=["fp16", "fp32-hidden-bf16-head"])
def test_step_logratio_fp16_and_fp32_hidden_with_a_bf16_head(dtype, weight_dtype, seed):
    c = make_case(1024, dtype, seed, v=151936, weight_dtype=weight_dtype)
    assert_parity(c, REL_FP32_HIDDEN_BF16_HEAD if weight_dtype is not None else REL[dtype])


def test_gradient_filter_error_within_the_dropped_terms_bound(seed):
    """bf16 at V=128,256 with a peaked softmax (hidden states aligned with their target's row, as in a
    trained LM): the default filter (2**-12) skips tiles; its error against the float64 oracle stays within
    the sum of the terms it may drop plus the bf16 rounding of the gradients, and without it the gradients
    match the oracle to that rounding alone (the rule and bound are in agentrm.kernels.logratio_reference)."""
    check_filter_bound(seed, n=1024, v=V, h=H, device="cuda", backend="triton")


def check_filter_bound(seed: int, n: int, v: int, h: int, device: str, backend: str) -> None:
    from agentrm.kernels import token_logprobs
    from agentrm.kernels.logratio_reference import grad_filter_eps

    gen = torch.Generator(device=device).manual_seed(seed)
    weight = (torch.randn(v, h, generator=gen, device=device) / h**0.5).to(torch.bfloat16)
    targets = torch.randint(0, v, (n,), generator=gen, device=device)
    wt = weight[targets].float()
    hidden = (12.0 * wt / wt.norm(dim=1, keepdim=True) ** 2
              + 0.3 * torch.randn(n, h, generator=gen, device=device)).to(torch.bfloat16)
    targets[torch.rand(n, generator=gen, device=device) < 0.1] = -100
    up = torch.randn(n, generator=gen, device=device)
    eps = grad_filter_eps("auto", torch.bfloat16, torch.bfloat16)

    def grads(grad_filter):
        hh, ww = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
        (token_logprobs(hh, ww, targets, backend=backend, grad_filter=grad_filter) * up).sum().backward()
        return hh.grad.double(), ww.grad.double()

    (gh_on, gw_on), (gh_off, gw_off) = grads("auto"), grads("off")
    h64, w64 = hidden.double(), weight.double()
    p = torch.softmax(h64 @ w64.T, dim=-1)
    valid = targets >= 0
    rows, cols = valid.nonzero().squeeze(1), targets[valid]
    g = torch.where(valid, up.double(), 0.0).abs()[:, None]
    terms = p.clone()
    terms[rows, cols] += 1.0  # onehot + p: what the rounding of each summed term is relative to
    terms *= g
    p[rows, cols] -= 1.0  # p - onehot
    dl = -torch.where(valid, up.double(), 0.0)[:, None] * p
    u = p.abs_()
    negligible = float((u < eps).double().mean())
    dropped = torch.where(u < eps * (1 + 1e-3), u, 0.0) * g  # (fp32 p near eps: margin)
    del p, u
    for got_on, got_off, want, bound, mag in (
        (gh_on, gh_off, dl @ w64, dropped @ w64.abs(), terms @ w64.abs()),
        (gw_on, gw_off, dl.T @ h64, dropped.T @ h64.abs(), terms.T @ h64.abs()),
    ):
        rnd = 2.0**-7 * mag + 1e-12  # the gradients are rounded to bf16
        assert ((got_off - want).abs() <= rnd).all()
        excess = ((got_on - want).abs() - bound - rnd).max()
        assert excess <= 0, f"filtered gradient exceeds the dropped-terms bound by {excess:.3g}"
    assert negligible > 0.9, negligible
    assert not (torch.equal(gh_on, gh_off) and torch.equal(gw_on, gw_off)), "the filter skipped no tile"
