"""A policy that samples actions from a Hugging Face causal LM with ``generate``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from agentrm.data.schema import Trajectory
from agentrm.envs.base import Env
from agentrm.policies.batcher import GenerateBatcher
from agentrm.policies.chat import call_index_of_key, keys_of_prompts
from agentrm.policies.prompt import AgentPrompt, ReplyStats, propose_many_validated, propose_validated
from agentrm.policies.sampling import PerRowSampler, reply_seed


class HFPolicy:
    """Sample candidate actions from a local causal LM.

    The prompt is the tokenizer's chat template applied to ``history.to_messages()`` with
    the generation prompt (the same rendering the reward models are trained on); ``k``
    candidates are drawn with ``num_return_sequences`` in chunks of ``batch_size``
    (with temperature 0 the greedy reply is decoded once and repeated ``k`` times).  Each
    reply is reduced to its action with :func:`~agentrm.policies.chat.parse_action`.

    Sampling is reproducible: every :meth:`chat` call seeds a forked torch RNG with
    ``seed`` plus a call counter, so the global RNG is left untouched and the same
    sequence of calls gives the same samples; a keyed call (``chat(..., key=)``: the judge's)
    is seeded by its key instead, so it gets the same samples wherever it comes in the sequence.

    **Batching across requests** (``batch_requests=True``): :meth:`propose_many` / :meth:`chat_many`
    generate the replies of many prompts (the beams of a depth, the samples of Best-of-N, the trees of
    a lock-step MCTS) in shared left-padded ``generate`` calls of ``batch_size`` rows. Every reply then
    draws from its own generator, seeded by ``(seed, call index, reply index)``
    (:class:`~agentrm.policies.sampling.PerRowSampler`), so a reply does not depend on which other
    replies shared its batch: the same calls give the same replies batched or one at a time (up to
    fp32 rounding of a differently padded batch at a sampling boundary). These are other samples than
    the default per-call stream's (same distribution), which the recorded figures used.

    Args:
        model: an ``AutoModelForCausalLM`` (set to eval mode here).
        tokenizer: its tokenizer, with a chat template.
        temperature: sampling temperature; ``0`` means greedy decoding.
        top_p: nucleus sampling mass.
        max_new_tokens: generation length limit per reply.
        batch_size: replies generated per ``generate`` call.
        seed: base seed of the sampling RNG.
        system_prompt: optional system message prepended to the conversation.
        prompt: the paper-style prompt (:class:`~agentrm.policies.prompt.AgentPrompt`: rules,
            valid actions, in-context example, ``Thought:``/``Action:`` replies); ``None`` renders
            ``history.to_messages()`` as in training (what an SFT policy saw).
        max_resample: redraws of a reply without a valid action (sampling only).
        batch_requests: batch replies across requests with per-reply generators (see above).
        batcher: a :class:`~agentrm.policies.batcher.GenerateBatcher` shared by the policies of
            concurrently running episodes (one model): their replies are generated together too
            (needs ``batch_requests``).

    Attributes:
        reply_stats: :class:`~agentrm.policies.prompt.ReplyStats` (replies, invalid, unresolved).
    """

    def __init__(
        self,
        model,
        tokenizer,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 32,
        batch_size: int = 8,
        seed: int = 0,
        system_prompt: str | None = None,
        prompt: AgentPrompt | None = None,
        max_resample: int = 2,
        batch_requests: bool = False,
        batcher: GenerateBatcher | None = None,
    ):
        if batcher is not None and not batch_requests:
            raise ValueError("a shared batcher needs batch_requests=True (per-reply sampling streams)")
        if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1 or batch_size < 1:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1, max_new_tokens >= 1, batch_size >= 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.temperature = temperature
        self.top_p = top_p
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.seed = seed
        self.system_prompt = system_prompt
        self.prompt = prompt
        self.max_resample = max_resample
        self.batch_requests = batch_requests
        self.batches_requests = batch_requests  # read by agentrm.policies.base.batches_requests
        self.batcher = batcher
        self.reply_stats = ReplyStats()
        self.calls = 0
        self.generated_tokens = 0

    def propose(self, env: Env | None, history: Trajectory, k: int = 1) -> list[str]:
        """``k`` sampled actions for the state after ``history``, validated against ``env``'s actions.

        Invalid replies are counted in :attr:`reply_stats` and redrawn when sampling
        (:func:`~agentrm.policies.prompt.propose_validated`).
        """
        return propose_validated(self, self.prompt, self.reply_stats, env, history, k, self.max_resample,
                                 greedy=self.temperature == 0)

    def propose_many(self, requests: Sequence[tuple[Env | None, Trajectory, int]]) -> list[list[str]]:
        """``propose`` for each ``(env, history, k)``: with ``batch_requests``, the first replies of all
        requests in shared ``generate`` calls, then redraws of invalid replies in request order (the
        result equals calling :meth:`propose` on each request in order); else one request at a time."""
        if not self.batch_requests:
            return [self.propose(env, history, k) for env, history, k in requests]
        return propose_many_validated(self, self.prompt, self.reply_stats, requests, self.max_resample,
                                      self.temperature == 0)

    @torch.no_grad()
    def chat_many(
        self, prompts: Sequence[tuple[list[dict[str, str]], int]], temperature: float | None = None,
        keys: Sequence[str | None] | None = None,
    ) -> list[list[str]]:
        """``chat(messages, n)`` for each ``(messages, n)``; call indices assigned in prompt order (a prompt with a
        key, ``keys[i]``, is seeded by its key instead: :meth:`chat`).

        With ``batch_requests`` all replies are generated in left-padded batches of ``batch_size``
        rows, each reply with its own generator; without, one :meth:`chat` after another.
        """
        keys = keys_of_prompts(keys, len(prompts))
        if not self.batch_requests:
            return [self.chat(m, n, temperature, key=k) for (m, n), k in zip(prompts, keys)]
        temp = self.temperature if temperature is None else temperature
        device = next(self.model.parameters()).device
        rows: list[tuple[int, list[int], int]] = []  # (prompt index, prompt ids, reply seed)
        for i, ((messages, n), key) in enumerate(zip(prompts, keys)):
            ids = self._prompt_ids(messages)
            call = self.calls if key is None else call_index_of_key(key)
            self.calls += 1
            for j in range(1 if temp == 0 else n):  # greedy: decode once, repeat
                rows.append((i, ids, reply_seed(self.seed, call, j)))
        texts: list[str] = []
        for r0 in range(0, len(rows), self.batch_size):
            texts += self._generate_rows(rows[r0 : r0 + self.batch_size], temp, device)
        out: list[list[str]] = [[] for _ in prompts]
        for (i, _, _), text in zip(rows, texts):
            out[i].append(text)
        return [o * prompts[i][1] if temp == 0 else o for i, o in enumerate(out)]

    def _prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        if self.system_prompt:
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def _generate_rows(self, rows: list[tuple[int, list[int], int]], temp: float, device: torch.device) -> list[str]:
        """The decoded replies of ``rows`` (prompt ids, reply seed): one ``generate``, or through the shared batcher."""
        if self.batcher is None:
            texts, counts = self._generate_now(rows, temp, device)
        else:
            key = (id(self.model), temp, self.top_p, self.max_new_tokens)
            texts, counts = self.batcher.run(key, rows, lambda rs: self._generate_now(rs, temp, device))
        self.generated_tokens += sum(counts)
        return texts

    @torch.no_grad()
    def _generate_now(
        self, rows: list[tuple[int, list[int], int]], temp: float, device: torch.device
    ) -> tuple[list[str], list[int]]:
        """One left-padded ``generate`` of ``rows``; the decoded replies and their new-token counts."""
        width = max(len(ids) for _, ids, _ in rows)
        pad = self._pad_id()
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for b, (_, ids, _) in enumerate(rows):
            input_ids[b, width - len(ids) :] = torch.tensor(ids)
            attn[b, width - len(ids) :] = 1
        kwargs: dict[str, Any] = dict(max_new_tokens=self.max_new_tokens, pad_token_id=pad, do_sample=False)
        if temp > 0:  # sampling by the per-row processor; generate itself decodes greedily over its output
            top_k = getattr(self.model.generation_config, "top_k", None)  # as generate(do_sample=True) samples
            sampler = PerRowSampler([seed for _, _, seed in rows], temp, self.top_p, device, 50 if top_k is None else top_k)
            kwargs.update(logits_processor=[sampler], temperature=None, top_p=None, top_k=None)
        seqs = self.model.generate(input_ids=input_ids.to(device), attention_mask=attn.to(device), **kwargs)
        new = seqs[:, width:]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True), (new != pad).sum(dim=1).tolist()

    @torch.no_grad()
    def chat(
        self, messages: list[dict[str, str]], n: int = 1, temperature: float | None = None, key: str | None = None
    ) -> list[str]:
        """``n`` decoded replies (special tokens removed) to ``messages``; with ``key``, sampled from a seed of the
        key instead of the call counter (:meth:`agentrm.policies.chat.ChatClient.chat`)."""
        if self.batch_requests:
            return self.chat_many([(messages, n)], temperature, keys=[key])[0]
        temp = self.temperature if temperature is None else temperature
        if self.system_prompt:
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        device = next(self.model.parameters()).device
        input_ids = enc["input_ids"].to(device)
        attn = enc["attention_mask"].to(device)
        gen_kwargs = dict(max_new_tokens=self.max_new_tokens, pad_token_id=self._pad_id())
        if temp > 0:
            gen_kwargs.update(do_sample=True, temperature=temp, top_p=self.top_p)
        else:
            gen_kwargs.update(do_sample=False)
        out: list[str] = []
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed * 1_000_003 + (self.calls if key is None else call_index_of_key(key)))
            self.calls += 1
            while len(out) < n:
                m = min(self.batch_size, n - len(out)) if temp > 0 else 1  # greedy: decode once
                seqs = self.model.generate(
                    input_ids=input_ids, attention_mask=attn, num_return_sequences=m, **gen_kwargs
                )
                new = seqs[:, input_ids.shape[1] :]
                self.generated_tokens += int((new != self._pad_id()).sum())
                out.extend(self.tokenizer.batch_decode(new, skip_special_tokens=True))
                if temp == 0:
                    out = out * n
        return out[:n]

    def _pad_id(self) -> int:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return int(pad) if pad is not None else 0


def load_hf_policy(
    path: str | Path,
    temperature: float = 1.0,
    seed: int = 0,
    max_new_tokens: int = 16,
    batch_requests: bool = False,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    quantization: str | None = None,
    attn_implementation: str = "auto",
    **kw: Any,
) -> HFPolicy:
    """An :class:`HFPolicy` on an exported causal-LM directory (e.g. the SFT policy of ``python -m agentrm.fit``).

    ``device``, ``dtype``, ``quantization`` and ``attn_implementation`` are checked before anything
    is loaded (:func:`agentrm.models.placement.resolve_placement`: CUDA in bf16 when available, else
    CPU in fp32; ``nf4``/``int8`` through bitsandbytes on either).
    """
    from agentrm.models.backbone import build_backbone
    from agentrm.models.placement import resolve_placement
    from agentrm.paths import load_tokenizer, resolve_path

    placement = resolve_placement(device, dtype, quantization, attn_implementation, "policy")
    d = resolve_path(path)
    model = build_backbone(str(d), causal_lm=True, **placement.load_kwargs())
    return HFPolicy(
        model, load_tokenizer(str(d)), temperature=temperature, seed=seed, max_new_tokens=max_new_tokens,
        batch_requests=batch_requests, **kw,
    )
