"""LLM-as-a-judge scorer: robust parsing, pointwise averaging, listwise votes, hidden outcome."""

from __future__ import annotations

import math

import pytest

from agentrm.data.schema import Step, Trajectory
from agentrm.judge import JudgeScorer, parse_index, parse_rating, render_transcript
from agentrm.scoring import Scorer


class FakeClient:
    """Replies from a function of the prompt; records calls."""

    def __init__(self, reply):
        self.reply = reply
        self.calls: list[tuple[str, int]] = []

    def chat(self, messages, n=1, temperature=None, key=None):
        prompt = messages[-1]["content"]
        assert key == prompt, "the judge keys every request by its prompt (order-free sampling seeds)"
        self.calls.append((prompt, n))
        return [self.reply(prompt, i) for i in range(n)]


def _traj(tid: str, actions: list[str], last_obs: str = "Mission complete.") -> Trajectory:
    steps = [Step(a, f"obs after {a}") for a in actions]
    steps[-1].observation = last_obs
    return Trajectory(tid, "babyai/GoToRedBall", "Mission: go to the red ball.", steps, 1.0, True)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("Rating: 7", 7.0),
        ("I'd say **Score: 8.5**", 8.5),
        ("This deserves 6/10 overall", 6.0),
        ("3 steps were wasted, so 4 out of 10", 4.0),
        ("rating: 14", 10.0),
        ("Rating 2 because of 3 errors", 2.0),
        ("no idea", math.nan),
    ],
)
def test_parse_rating(text, value):
    got = parse_rating(text)
    assert (math.isnan(got) and math.isnan(value)) or got == value


def test_parse_index():
    assert parse_index("Candidate 1 looks bad.\nBest: 2", 3) == 2
    assert parse_index("Best: [0]", 3) == 0
    assert parse_index("the best is option #1", 2) == 1
    assert parse_index("Best: 7", 3) is None


def test_pointwise_candidates_average_samples():
    ratings = {"move forward": ["Rating: 9", "Rating: 7"], "toggle": ["Rating: 1", "garbage"]}

    def reply(prompt, i):
        action = prompt.split("Proposed next action: ")[1].split("\n")[0]
        return ratings.get(action, ["nothing", "nothing"])[i]

    client = FakeClient(reply)
    judge = JudgeScorer(client, "pointwise", samples=2, temperature=0.5)
    assert isinstance(judge, Scorer)
    prefix = _traj("p", ["turn left"], "Facing east.")
    s = judge.score_candidates(prefix, ["move forward", "toggle", "drop"])
    assert s[0].item() == pytest.approx(0.8) and s[1].item() == pytest.approx(0.1) and math.isnan(s[2].item())
    assert judge.counters.forward_passes == 3 and judge.counters.candidates == 3
    assert judge.counters.forward_tokens > 0 and all(n == 2 for _, n in client.calls)
    assert "Action 1: turn left" in client.calls[0][0] and "Observation 1: Facing east." in client.calls[0][0]


def test_listwise_votes_become_scores():
    client = FakeClient(lambda prompt, i: ["Best: 1", "Best: 1", "Best: 2", "Best: 9"][i])
    judge = JudgeScorer(client, "listwise", samples=4)
    s = judge.score_candidates(_traj("p", ["turn left"]), ["a", "b", "c"])
    assert s.tolist() == pytest.approx([0.0, 2 / 3, 1 / 3])
    assert len(client.calls) == 1 and "[2] c" in client.calls[0][0]


def test_trajectory_scoring_hides_the_outcome():
    def reply(prompt, i):
        return (
            "Rating: 2"
            if "Mission complete" in prompt
            else ("Rating: 6" if "drop" in prompt else "Rating: 3")
        )

    from agentrm.search.blind import finished_view

    judge = JudgeScorer(FakeClient(reply), "pointwise")
    trajs = [finished_view(_traj("a", ["move forward", "drop"])), finished_view(_traj("b", ["turn left"]))]
    assert judge.score_trajectories(trajs).tolist() == pytest.approx([0.6, 0.3])
    assert "Mission complete" not in render_transcript(trajs[0]) and "Action 2: drop" in render_transcript(trajs[0])
    assert "Mission complete" in render_transcript(_traj("a", ["move forward", "drop"]))  # not blinded: shown
    listwise = JudgeScorer(FakeClient(lambda p, i: "Best: 0"), "listwise")
    assert listwise.score_trajectories(trajs).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError):
        JudgeScorer(FakeClient(reply), "pairwise")


def test_step_candidates_show_their_observation_but_not_the_outcome():
    client = FakeClient(lambda prompt, i: "Rating: 5")
    judge = JudgeScorer(client, "pointwise")
    judge.score_candidates(
        _traj("p", ["turn left"]),
        [Step("move forward", "Red ball 1 ahead."), Step("drop", "", withheld=True)],
    )
    assert "Proposed next action: move forward (result: Red ball 1 ahead.)" in client.calls[0][0]
    assert (
        "Proposed next action: drop\n" in client.calls[1][0]
        and "Mission complete" not in client.calls[1][0].split("Proposed")[1]
    )
