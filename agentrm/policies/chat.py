"""Chat clients shared by LM policies and the LLM judge, and the action-parsing convention.

A :class:`ChatClient` turns a list of chat messages into ``n`` sampled replies.  Both
LM policies (:class:`~agentrm.policies.hf.HFPolicy`,
:class:`~agentrm.policies.openai_compat.OpenAIChatPolicy`) implement it, so the same
backend can act as the agent and as the judge (:mod:`agentrm.judge`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

_ACTION_RE = re.compile(r"action\s*:\s*(.+)", flags=re.IGNORECASE)


@runtime_checkable
class ChatClient(Protocol):
    """Anything that samples chat completions."""

    def chat(
        self, messages: list[dict[str, str]], n: int = 1, temperature: float | None = None, key: str | None = None
    ) -> list[str]:
        """Return ``n`` sampled assistant replies to ``messages`` (``temperature`` None: the client's default).

        ``key`` (the judge passes its prompt) names the request: its replies are then drawn from seeds that
        derive from the client's seed and the key (:func:`call_index_of_key`), not from how many calls came
        before, so the same request gets the same replies whatever order concurrent or resumed callers ask in.
        """
        ...


KEY_INDEX_RANGE = 1 << 20
"""Call indices of keyed requests lie in ``[0, KEY_INDEX_RANGE)``: an HTTP ``seed`` of ``seed + index * 1009``
stays below 2**31 (llama.cpp reads it as 32-bit). Two keys may share an index; seeds need not be unique."""


def call_index_of_key(key: str) -> int:
    """The stable call index of a keyed request (a hash of ``key``, the same in every process and run)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % KEY_INDEX_RANGE


def keys_of_prompts(keys: Sequence[str | None] | None, prompts: int) -> list[str | None]:
    """The key of each of ``prompts`` requests of a ``chat_many`` call (``None``: unkeyed), checked one per prompt."""
    if keys is None:
        return [None] * prompts
    if len(keys) != prompts:
        raise ValueError(f"chat_many: {len(keys)} keys for {prompts} prompts")
    return list(keys)


def parse_action(text: str) -> str:
    """The action in an LM reply: what follows the last ``Action:`` if present, else the first non-empty line.

    Surrounding whitespace, quotes/backticks and a trailing period are stripped; the
    environment normalises the rest (case, aliases).  An empty reply gives ``""``
    (which the environment treats as an invalid action).
    """
    matches = _ACTION_RE.findall(text)
    if matches:
        line = matches[-1]
    else:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        line = lines[0] if lines else ""
    return line.strip().strip("`\"'").rstrip(".").strip()
