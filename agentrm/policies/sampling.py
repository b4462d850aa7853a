"""Per-reply random streams for batched sampling, so a reply does not depend on its batch-mates.

``generate(do_sample=True)`` draws every row of a batch from one RNG, so the sample a row gets
depends on how many rows came before it. :class:`PerRowSampler` is a logits processor that samples
each row from its own ``torch.Generator`` (temperature, then top-k and nucleus filtering, in the
order ``generate(do_sample=True)`` applies them, then one multinomial draw) and returns scores that are ``0`` at the drawn token and ``-inf`` elsewhere;
``generate`` run greedily then emits exactly the drawn token. A row's stream is seeded by
:func:`reply_seed` from the policy seed, the call index and the reply index, so the same logical
reply is the same sample in a batch of 1 or of 64 (up to fp32 rounding of a differently padded
batch landing on a sampling boundary).
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def reply_seed(seed: int, call: int, reply: int) -> int:
    """A 63-bit seed for reply ``reply`` of call ``call`` of a policy seeded ``seed`` (stable across runs)."""
    digest = hashlib.blake2b(f"{seed}:{call}:{reply}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class PerRowSampler:
    """Logits processor drawing row ``b``'s next token from generator ``b`` (see module doc).

    Args:
        seeds: ``[B]`` one seed per row of the ``generate`` batch (rows keep their order in greedy search).
        temperature: > 0.
        top_p: nucleus mass in ``(0, 1]`` (the smallest set of tokens whose probability reaches it).
        top_k: keep the ``top_k`` most likely tokens (``None``/``0``: all); ``generate`` samples with the
            model's ``generation_config.top_k``, 50 when unset.
        device: where the scores live (the generators are created there).
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device: torch.device | str = "cpu",
                 top_k: int | None = None):
        if temperature <= 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature > 0 and 0 < top_p <= 1; got {temperature}, {top_p}")
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        """``scores [B, V]`` -> ``[B, V]``: ``0`` at each row's drawn token, ``-inf`` elsewhere."""
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"{scores.shape[0]} rows but {len(self.generators)} generators (beams are not supported)")
        logits = scores.float() / self.temperature
        if self.top_k and self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop_sorted = cum - sorted_logits.softmax(-1) >= self.top_p  # mass before the token already reaches p
            logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
        probs = logits.softmax(-1)
        out = torch.full_like(scores, float("-inf"))
        for b, gen in enumerate(self.generators):
            token = torch.multinomial(probs[b], 1, generator=gen)
            out[b, token] = 0.0
        return out
