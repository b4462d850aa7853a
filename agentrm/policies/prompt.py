"""The paper-style agent prompt (ReAct, as in AgentGym/AgentRM) and validation of LM replies.

Zero-shot, a real instruct model given only the environment's text answers with prose
("You're now in the game of ...") that is no action at all.  :class:`AgentPrompt` builds the
conversation the paper uses:

* a **system** message: the rules, the reply format ``Thought: <reasoning>`` then
  ``Action: <action>``, and (when the environment lists them) the valid actions;
* an **in-context example**: a worked episode as alternating turns, from the environment's
  optional ``prompt_example``: ``(instruction, [(reply, observation), ...])`` where each reply
  is a full ``Thought: ... Action: ...`` answer;
* the episode so far: the instruction, then one assistant turn per step (``Action: <action>``;
  thoughts are not kept) and the environment's replies.

Templates without a system role (Gemma) put the system text at the head of the first user
turn (the supplied Gemma template does; see :mod:`agentrm.models.import_gguf`).

:func:`validate_reply` extracts the action (:func:`~agentrm.policies.chat.parse_action`) and
checks it against the environment: its ``canonical_action(text)`` when it has one (BabyAI
accepts aliases and case), else membership in ``valid_actions`` after normalising case and
whitespace.  LM policies count replies and invalid replies (:class:`ReplyStats`), resample an
invalid reply up to ``max_resample`` times when sampling, and report what they could not fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from agentrm.data.schema import Trajectory
from agentrm.policies.chat import parse_action

SYSTEM_RULES = (
    "You are an agent acting in a text environment. Each turn you receive an observation. "
    "Reply with exactly two lines:\n"
    "Thought: <one short sentence of reasoning>\n"
    "Action: <one action>\n"
    "The action must be one of the valid actions, written exactly as listed."
)


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" .!\"'`*")


@dataclass
class ReplyStats:
    """Replies seen by an LM policy and those that held no valid action.

    Attributes:
        replies: replies parsed (resamples included).
        invalid: replies whose action was not valid.
        unresolved: proposals still invalid after resampling (these reach the environment, which
            answers with its invalid-action feedback; counted, never silent).
        examples: up to 5 invalid replies, verbatim, for the report.
    """

    replies: int = 0
    invalid: int = 0
    unresolved: int = 0
    examples: list[str] = field(default_factory=list)

    def record(self, reply: str, valid: bool) -> None:
        self.replies += 1
        if not valid:
            self.invalid += 1
            if len(self.examples) < 5:
                self.examples.append(reply[:200])

    def as_dict(self) -> dict[str, Any]:
        return {"replies": self.replies, "invalid": self.invalid, "unresolved": self.unresolved,
                "invalid_examples": list(self.examples)}


def validate_reply(reply: str, env: Any | None) -> tuple[str, bool]:
    """``(action, valid)`` for an LM reply in the state of ``env``.

    The action is the canonical form when the environment has ``canonical_action``, else the
    matching entry of ``valid_actions`` (case and whitespace ignored).  Without an environment
    (or one that lists no actions) every non-empty action counts as valid.
    """
    action = parse_action(reply)
    if env is None:
        return action, bool(action)
    canon = getattr(env, "canonical_action", None)
    if callable(canon):
        c = canon(action)
        return (c, True) if c is not None else (action, False)
    valid = getattr(env, "valid_actions", None) or []
    by_norm = {_norm(v): v for v in valid}
    if not by_norm:
        return action, bool(action)
    hit = by_norm.get(_norm(action))
    return (hit, True) if hit is not None else (action, False)


@dataclass
class AgentPrompt:
    """Builds the paper-style conversation for an LM policy (see module doc).

    Args:
        system: the rules and reply format (default :data:`SYSTEM_RULES`).
        list_actions: append the environment's valid actions to the system message (up to
            ``max_listed``; environments with thousands of actions list none).
        use_example: include the environment's ``prompt_example`` when it has one.
    """

    system: str = SYSTEM_RULES
    list_actions: bool = True
    max_listed: int = 50
    use_example: bool = True

    def messages(self, history: Trajectory, env: Any | None = None) -> list[dict[str, str]]:
        """Chat messages for the next action after ``history``: system, example turns, the episode."""
        system = self.system
        valid = list(getattr(env, "valid_actions", None) or []) if (env is not None and self.list_actions) else []
        if valid and len(valid) <= self.max_listed:
            system += "\nValid actions: " + ", ".join(valid) + "."
        msgs = [{"role": "system", "content": system}]
        example = getattr(env, "prompt_example", None) if (env is not None and self.use_example) else None
        if example is not None:
            instruction, turns = example
            msgs.append({"role": "user", "content": "Here is an example episode.\n" + instruction})
            for reply, observation in turns:
                msgs.append({"role": "assistant", "content": reply})
                msgs.append({"role": "user", "content": observation})
            msgs[-1]["content"] += "\n\nThe example is over. Now the real task.\n" + history.instruction
        else:
            msgs.append({"role": "user", "content": history.instruction})
        for s in history.steps:
            msgs.append({"role": "assistant", "content": f"Action: {s.action}"})
            msgs.append({"role": "user", "content": s.observation})
        return msgs


def propose_validated(client, prompt: AgentPrompt | None, stats: ReplyStats, env: Any | None,
                      history: Trajectory, k: int, max_resample: int, greedy: bool) -> list[str]:
    """``k`` actions from a :class:`~agentrm.policies.chat.ChatClient`, validated against ``env``.

    Invalid replies are counted; when sampling (not ``greedy``: a greedy reply would repeat) each
    invalid one is redrawn up to ``max_resample`` times.  A proposal still invalid is counted in
    ``stats.unresolved`` and returned as parsed (the environment answers it with its feedback).
    """
    messages = agent_messages(prompt, history, env)
    return resample_invalid(client, messages, client.chat(messages, n=k), env, stats, max_resample, greedy)


def propose_many_validated(client, prompt: AgentPrompt | None, stats: ReplyStats, requests, max_resample: int,
                           greedy: bool) -> list[list[str]]:
    """:func:`propose_validated` for each ``(env, history, k)``: the first replies of all requests through
    ``client.chat_many`` (batched or concurrent), then redraws of invalid replies in request order, so the
    result equals proposing request by request (given the client's per-call seeding)."""
    msgs = [agent_messages(prompt, h, env) for env, h, _ in requests]
    first = client.chat_many([(m, k) for m, (_, _, k) in zip(msgs, requests)])
    return [
        resample_invalid(client, m, replies, env, stats, max_resample, greedy)
        for m, replies, (env, _, _) in zip(msgs, first, requests)
    ]


def agent_messages(prompt: AgentPrompt | None, history: Trajectory, env: Any | None) -> list[dict[str, str]]:
    """The chat a policy sends: the paper-style prompt, or the episode as rendered in training."""
    return prompt.messages(history, env) if prompt is not None else history.to_messages()


def resample_invalid(client, messages: list[dict[str, str]], replies: list[str], env: Any | None,
                     stats: ReplyStats, max_resample: int, greedy: bool) -> list[str]:
    """Validate a first round of ``replies`` to ``messages``; redraw the invalid ones (see :func:`propose_validated`)."""
    out: list[str | None] = [None] * len(replies)
    pending = list(range(len(replies)))
    for round_ in range(1 + (0 if greedy else max_resample)):
        if round_:
            replies = client.chat(messages, n=len(pending))
        still = []
        for i, reply in zip(pending, replies):
            action, ok = validate_reply(reply, env)
            stats.record(reply, ok)
            if ok or out[i] is None:
                out[i] = action
            if not ok:
                still.append(i)
        pending = still
        if not pending:
            break
    stats.unresolved += len(pending)
    return [a or "" for a in out]
