"""Gradient filtering in the log-ratio backward (both backends) against the eager reference.

The filter skips the products of ``dlogits = g * (onehot - p)`` wherever ``|onehot - p|`` is below the
threshold for a whole block (a Triton tile, or a vocabulary column of a torch chunk). Its error is then at
most the sum of the dropped terms, ``|d grad_hidden[n, k]| <= |g_n| sum_{v: u_nv < eps} u_nv |W[v, k]|``
with ``u = |onehot - p|`` (and symmetrically for ``grad_weight``): the tests check the filtered gradients
against the float64 oracle within exactly that bound (plus the unfiltered path's own rounding), and that
with the filter off the gradients are the unfiltered ones.
"""

import importlib

import pytest
import torch
from agentrm.kernels import interpreter_ready, token_logprobs

ref_module = importlib.import_module("agentrm.kernels.logratio_reference")
grad_filter_eps = ref_module.grad_filter_eps

needs_triton = pytest.mark.skipif(
    not interpreter_ready(), reason="triton missing, or imported before TRITON_INTERPRET=1 (rerun in subprocess)"
)
BACKENDS = [pytest.param("triton", marks=needs_triton), "chunked"]


def run(backend: str, hidden, weight, targets, up, grad_filter):
    """logp and fp32 gradients of ``sum(logp * up)``."""
    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)
    kw = dict(chunk_tokens=24, chunk_vocab=200) if backend == "chunked" else {}
    be = "torch" if backend == "chunked" else backend
    logp = token_logprobs(h, w, targets, backend=be, grad_filter=grad_filter, **kw)
    (logp * up).sum().backward()
    return logp.detach(), h.grad.float(), w.grad.float()


def peaked_case(dtype: torch.dtype, n: int = 32, h: int = 32, v: int = 640, scale: float = 20.0):
    """Hidden states aligned with their target's weight row, as in a trained LM: the softmax is peaked and
    most ``p`` are tiny. Targets are sorted, so the 16 tokens of an interpreter tile row point into a narrow
    vocabulary range and most of their tiles hold nothing above the threshold (the filter must skip some).
    V is not a multiple of the tile width."""
    weight = torch.randn(v, h) / h**0.5
    targets = torch.randint(0, v, (n,)).sort().values
    wt = weight[targets]
    hidden = scale * wt / wt.norm(dim=1, keepdim=True) ** 2 + 0.3 * torch.randn(n, h)
    targets[torch.rand(n) < 0.1] = -100
    up = torch.randn(n)
    return hidden.to(dtype), weight.to(dtype), targets, up


def oracle_and_bound(hidden, weight, targets, up, eps: float):
    """float64 gradients of the unfiltered op, the bound on what a filter at ``eps`` may drop, the fraction
    of negligible entries, and the magnitudes ``|g| (onehot + p) @ |W|`` (and for ``grad_weight``) that
    floating-point rounding of the unfiltered sums is relative to."""
    h64, w64 = hidden.double(), weight.double()
    p = torch.softmax(h64 @ w64.T, dim=-1)
    valid = targets >= 0
    onehot = torch.zeros_like(p)
    onehot[valid.nonzero().squeeze(1), targets[valid]] = 1.0
    g = torch.where(valid, up.double(), 0.0)
    dl = g[:, None] * (onehot - p)
    u = (onehot - p).abs()
    dropped = torch.where(u < eps * (1 + 1e-3), u, 0.0) * g.abs()[:, None]  # (fp32 p near eps: margin)
    terms = (onehot + p) * g.abs()[:, None]
    return (
        (dl @ w64, dl.T @ h64),
        (dropped @ w64.abs(), dropped.T @ h64.abs()),
        (u < eps).double().mean(),
        (terms @ w64.abs(), terms.T @ h64.abs()),
    )


@pytest.mark.parametrize(
    "setting, hidden_dtype, weight_dtype, expected",
    [
        ("auto", torch.bfloat16, torch.bfloat16, 2.0**-12),  # Cut Cross-Entropy's value for bf16
        ("on", torch.float16, torch.float16, 2.0**-15),
        (True, torch.float32, torch.float32, 0.0),  # fp32: auto is off (2**-28 would drop almost nothing)
        ("auto", torch.float32, torch.bfloat16, 2.0**-12),  # the coarser dtype decides
        ("off", torch.bfloat16, torch.bfloat16, 0.0),
        (False, torch.bfloat16, torch.bfloat16, 0.0),
        (0, torch.bfloat16, torch.bfloat16, 0.0),
        (1e-3, torch.float32, torch.float32, 1e-3),
        ("0.004", torch.float32, torch.float32, 0.004),
    ],
)
def test_threshold_policy(monkeypatch, setting, hidden_dtype, weight_dtype, expected):
    monkeypatch.delenv(ref_module.GRAD_FILTER_ENV, raising=False)
    assert grad_filter_eps(setting, hidden_dtype, weight_dtype) == expected


def test_threshold_from_the_environment_and_bad_values(monkeypatch):
    monkeypatch.delenv(ref_module.GRAD_FILTER_ENV, raising=False)
    assert grad_filter_eps(None, torch.bfloat16, torch.bfloat16) == 2.0**-12  # default: auto
    monkeypatch.setenv(ref_module.GRAD_FILTER_ENV, "off")
    assert grad_filter_eps(None, torch.bfloat16, torch.bfloat16) == 0.0
    assert grad_filter_eps("auto", torch.bfloat16, torch.bfloat16) == 2.0**-12  # an argument wins
    monkeypatch.setenv(ref_module.GRAD_FILTER_ENV, "sometimes")
    with pytest.raises(ValueError, match="AGENTRM_KERNEL_GRAD_FILTER"):
        grad_filter_eps(None, torch.float32, torch.float32)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        grad_filter_eps(1.5, torch.float32, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_filtered_gradients_within_the_dropped_terms_bound(seed, backend, dtype):
    hidden, weight, targets, up = peaked_case(dtype)
    # fp32 inputs: an explicit threshold (auto is off for fp32); bf16: auto
    setting = 2.0**-12 if dtype == torch.float32 else "auto"
    eps = grad_filter_eps(setting, dtype, dtype)
    (want_h, want_w), (bound_h, bound_w), negligible, (mag_h, mag_w) = oracle_and_bound(
        hidden, weight, targets, up, eps
    )
    assert negligible > 0.5, f"case not peaked enough: {negligible:.2f} of |onehot - p| below {eps}"
    logp_on, gh_on, gw_on = run(backend, hidden, weight, targets, up, setting)
    logp_off, gh_off, gw_off = run(backend, hidden, weight, targets, up, "off")
    assert torch.equal(logp_on, logp_off)  # the forward is untouched
    # the unfiltered path's own rounding, relative to the magnitude of the summed terms: fp32 softmax of
    # logits up to ~25, and for bf16 the final cast of the gradient to bf16
    rnd = 1e-4 if dtype == torch.float32 else 2.0**-7
    for got_off, want, mag in ((gh_off, want_h, mag_h), (gw_off, want_w, mag_w)):
        assert ((got_off.double() - want).abs() <= rnd * mag + 1e-12).all()
    for got, want, bound, mag in ((gh_on, want_h, bound_h, mag_h), (gw_on, want_w, bound_w, mag_w)):
        excess = (got.double() - want).abs() - bound - rnd * mag - 1e-12
        assert excess.max() <= 0, f"filtered gradient exceeds the dropped-terms bound by {excess.max():.3g}"
    # the filter did skip work: the gradients differ from the unfiltered ones somewhere
    assert not (torch.equal(gh_on, gh_off) and torch.equal(gw_on, gw_off))


@pytest.mark.parametrize("backend", BACKENDS)
def test_off_is_the_unfiltered_computation(seed, backend):
    """A threshold below every |onehot - p| filters nothing: bitwise the same as off (deterministic on
    CPU). With the filter off, the gradients match the oracle to fp32 rounding (test above)."""
    hidden, weight, targets, up = peaked_case(torch.float32)
    _, gh_off, gw_off = run(backend, hidden, weight, targets, up, "off")
    _, gh_tiny, gw_tiny = run(backend, hidden, weight, targets, up, 1e-30)
    assert torch.equal(gh_off, gh_tiny) and torch.equal(gw_off, gw_tiny)


def test_chunk_with_every_column_dropped_contributes_nothing(seed):
    """A chunk whose columns are all negligible is skipped whole; the others still accumulate."""
    hidden, weight, targets, up = peaked_case(torch.float32, n=8, v=600)
    targets[:] = targets[0]  # every target in one chunk of 200 columns
    _, gh, gw = run("chunked", hidden, weight, targets, up, 0.5)  # a coarse threshold: most chunks dropped
    (want_h, want_w), (bound_h, bound_w), _, (mag_h, mag_w) = oracle_and_bound(hidden, weight, targets, up, 0.5)
    assert ((gh.double() - want_h).abs() <= bound_h + 1e-4 * mag_h + 1e-12).all()
    assert ((gw.double() - want_w).abs() <= bound_w + 1e-4 * mag_w + 1e-12).all()
