"""TD(λ) targets: λ=1 is the Monte-Carlo return, λ=0 the one-step bootstrap."""

from __future__ import annotations

import pytest

from agentrm.data.schema import Step, Trajectory
from agentrm.targets.td_lambda import lambda_returns, td_lambda_targets

V = [0.2, 0.5, 0.1, 0.9]


def test_lambda_one_is_mc_return():
    assert lambda_returns(V, 0.7, lam=1.0) == pytest.approx([0.7] * 4)
    assert lambda_returns(V, 1.0, lam=1.0, gamma=0.5) == pytest.approx([0.125, 0.25, 0.5, 1.0])


def test_lambda_zero_is_one_step_bootstrap():
    assert lambda_returns(V, 0.7, lam=0.0) == pytest.approx([0.5, 0.1, 0.9, 0.7])
    assert lambda_returns(V, 0.7, lam=0.0, gamma=0.9) == pytest.approx([0.45, 0.09, 0.81, 0.7])


def test_intermediate_lambda_and_truncation():
    lam = 0.5
    g3 = 0.7
    g2 = 0.5 * V[3] + 0.5 * g3
    g1 = 0.5 * V[2] + 0.5 * g2
    g0 = 0.5 * V[1] + 0.5 * g1
    assert lambda_returns(V, 0.7, lam) == pytest.approx([g0, g1, g2, g3])
    assert lambda_returns(V, 0.7, lam, terminal=False)[-1] == pytest.approx(V[-1])
    assert lambda_returns([], 1.0, 0.5) == []
    with pytest.raises(ValueError):
        lambda_returns(V, 1.0, 1.5)


def test_targets_replace_step_values():
    t = Trajectory("x", "t", "i", [Step(f"a{i}", "o") for i in range(4)], reward=0.7, success=True)
    (out,) = td_lambda_targets([t], lambda ts: [V for _ in ts], lam=0.0)
    assert [s.value for s in out.steps] == pytest.approx([0.5, 0.1, 0.9, 0.7])
    assert t.steps[0].value is None and out.meta["target"] == "td_lambda_0.0"
    with pytest.raises(ValueError, match="values"):
        td_lambda_targets([t], lambda ts: [[0.1]], lam=0.5)
