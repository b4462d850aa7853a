"""TD(λ) / GAE-style bootstrapped step-value targets from a trained value model.

Step ``t``'s value is the value of the state *after* action ``t``.  With no intermediate
rewards (BabyAI pays only at the end) and discount ``gamma``, the λ-return is

    G_{T-1} = R                                   (terminal step: the final reward)
    G_t     = gamma * ((1 - λ) * V_{t+1} + λ * G_{t+1})

where ``V_{t+1}`` is the value model's estimate after step ``t+1``.  ``λ = 1`` gives the
Monte-Carlo return ``gamma^(T-1-t) * R``; ``λ = 0`` the one-step bootstrap
``gamma * V_{t+1}``.  (Equivalently ``G_t = V_t + Σ_l (gamma λ)^l δ_{t+l}``: GAE's
advantage plus the baseline.)  A trajectory cut off before termination bootstraps its
last step from ``V_{T-1}`` instead of ``R`` (``terminal=False``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from agentrm.data.schema import Step, Trajectory

ValueFn = Callable[[Sequence[Trajectory]], list[list[float]]]
"""Trajectories -> per-step values (one list per trajectory, one value per step)."""


def lambda_returns(
    values: Sequence[float], final_reward: float, lam: float, gamma: float = 1.0, terminal: bool = True
) -> list[float]:
    """λ-returns for each step of one trajectory.

    Args:
        values: ``[T]`` value estimates of the state after each step (``values[0]`` is
            not used for bootstrapping; only ``values[1:]`` are).
        final_reward: the episode's final reward.
        lam: λ in ``[0, 1]``.
        gamma: discount per step.
        terminal: whether the episode ended after the last step (else its last value bootstraps).
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    n = len(values)
    if n == 0:
        return []
    out = [0.0] * n
    out[-1] = float(final_reward) if terminal else float(values[-1])
    for t in range(n - 2, -1, -1):
        out[t] = gamma * ((1.0 - lam) * float(values[t + 1]) + lam * out[t + 1])
    return out


def td_lambda_targets(
    trajectories: Sequence[Trajectory], value_fn: ValueFn, lam: float = 0.8, gamma: float = 1.0
) -> list[Trajectory]:
    """Copies of ``trajectories`` with every step's ``value`` replaced by its λ-return.

    A record is treated as terminal when its last observation ended the episode, which
    the schema does not record, so all records are assumed complete episodes (the
    collector and :func:`~agentrm.targets.mcts.flatten_tree` main records are).
    """
    preds = value_fn(trajectories)
    out = []
    for traj, v in zip(trajectories, preds):
        if len(v) != len(traj.steps):
            raise ValueError(f"{traj.id}: value_fn gave {len(v)} values for {len(traj.steps)} steps")
        g = lambda_returns(v, traj.reward, lam, gamma)
        steps = [Step(s.action, s.observation, round(x, 4)) for s, x in zip(traj.steps, g)]
        out.append(
            Trajectory(
                traj.id,
                traj.task,
                traj.instruction,
                steps,
                traj.reward,
                traj.success,
                {**traj.meta, "target": f"td_lambda_{lam}"},
            )
        )
    return out


def value_model_fn(model, tokenizer, max_length: int | None = 1024, batch_size: int = 16) -> ValueFn:
    """A :data:`ValueFn` from a :class:`~agentrm.models.value_rm.ValueRewardModel` (steps cut off by
    ``max_length`` repeat the last available value)."""
    import torch

    from agentrm.data.collate import collate_trajectories
    from agentrm.data.tokenize import tokenize_trajectory

    @torch.no_grad()
    def fn(trajs: Sequence[Trajectory]) -> list[list[float]]:
        model.eval()
        out: list[list[float]] = []
        for i in range(0, len(trajs), batch_size):
            items = [
                tokenize_trajectory(tokenizer, t, max_length=max_length) for t in trajs[i : i + batch_size]
            ]
            b = collate_trajectories(items, tokenizer.pad_token_id)
            v = model.score(b).clamp(0.0, 1.0)
            for row, it, t in zip(v.tolist(), items, trajs[i : i + batch_size]):
                vals = row[: len(it.step_end_idx)] or [0.0]
                out.append(vals + [vals[-1]] * (len(t.steps) - len(vals)))
        return out

    return fn
