"""The on-disk format of ``python -m agentrm.precompute`` and its reader.

A features directory holds ``manifest.json`` and shards ``shard-00000.safetensors``, ... Shard ``k`` covers the
trajectories ``k*shard_size ..`` of the input files, in order. Each trajectory is stored as tokenised for
training (:func:`agentrm.data.tokenize.tokenize_trajectory` with the manifest's tokenizer and ``max_length``:
the one truncation rule) and found again by :func:`sequence_key`, a 63-bit digest of its token ids, so a
training batch (any data module, any split, any order) finds its rows by their tokens alone and a
trajectory tokenised differently (another tokenizer, another ``max_length``) is a miss, never a wrong row.

Tensors of a shard (``n`` trajectories, ``S`` step ends and ``T`` tokens in all):

==========================  ===================  ==========================================================
``key``                     ``[n]`` int64        :func:`sequence_key` of each trajectory's token ids
``num_tokens``              ``[n]`` int64        tokens of each trajectory (after truncation)
``num_states``              ``[n]`` int64        step ends of each trajectory (surviving steps)
``step_end_idx``            ``[S]`` int64        each step end's token index in its trajectory
``states.L<l>``             ``[S, H]``           hidden state of layer ``l`` per step end (``layers``)
``tokens.L<l>``             ``[T, H]``           residual stream after block ``l``, every token (``sequence_layers``)
``ref_logprobs``            ``[T]`` float32      ``log p_ref(token t | tokens < t)``; ``0`` at each first token
==========================  ===================  ==========================================================

``states.L<l>`` of a step is what a value RM whose backbone is truncated to ``l`` blocks reads at that step end
(:mod:`agentrm.models.layers`); for a non-causal backbone it is computed from the step's own prefix only and
pooled as the manifest's ``pooling`` says. The trajectory ids are in the shard's metadata (``ids``, JSON).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agentrm.data.schema import DataError

FORMAT = "agentrm-features/1"
MANIFEST = "manifest.json"


class FeatureCacheError(DataError):
    """A features directory that cannot serve this use (incomplete, other settings, a trajectory missing): a data
    error (commands print its one line and exit with code 2)."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def states_key(layer: int) -> str:
    return f"states.L{layer}"


def tokens_key(layer: int) -> str:
    return f"tokens.L{layer}"


def sequence_key(ids) -> int:
    """63-bit digest of a token-id sequence (a list, or a 1-D integer tensor/array)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    arr = np.ascontiguousarray(np.asarray(ids, dtype=np.int64))
    return int.from_bytes(hashlib.blake2b(arr.tobytes(), digest_size=8).digest(), "little") >> 1


def tokenizer_fingerprint(tokenizer) -> str:
    """16 hex digits of the tokenizer's vocabulary, rules and chat template (what decides the token ids)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    h = hashlib.sha256(body.encode())
    h.update((getattr(tokenizer, "chat_template", None) or "").encode())
    return h.hexdigest()[:16]


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of features directory ``path``.

    Raises:
        FeatureCacheError: no manifest, or not this format.
    """
    f = Path(path) / MANIFEST
    if not f.is_file():
        raise FeatureCacheError(f"{path}: not a features directory ({MANIFEST} missing); write one with "
                                "python -m agentrm.precompute")
    manifest = json.loads(f.read_text())
    if manifest.get("format") != FORMAT:
        raise FeatureCacheError(f"{f}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


@dataclass(frozen=True)
class Entry:
    """Where one trajectory lives: shard, row in it, offsets of its states and tokens, counts."""

    shard: int
    row: int
    state_start: int
    num_states: int
    token_start: int
    num_tokens: int


class FeatureCache:
    """Read a complete features directory: look trajectories up by their token ids.

    State features and reference log-probs are loaded per shard on first use (``[S, H]`` and ``[T]``: small);
    full-sequence hidden states are read per trajectory from the memory-mapped shard.

    Args:
        path: the directory ``python -m agentrm.precompute`` wrote.
        need: what the caller reads (``"states"``, ``"tokens"``, ``"ref_logprobs"``), checked against the
            manifest with a one-line error naming the flag that writes it.
    """

    def __init__(self, path: str | Path, need: str | None = None, layer: int | None = None):
        from safetensors import safe_open

        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        m = self.manifest
        if not m.get("complete"):
            done, total = len(m.get("shards", [])), m.get("num_shards", "?")
            raise FeatureCacheError(f"{self.path}: the precompute is incomplete ({done} of {total} shards); rerun "
                                    "the same python -m agentrm.precompute command to finish it")
        if need is not None:
            self.check_provides(need, layer)
        self._open = safe_open
        self.index: dict[int, Entry] = {}
        self._shard_files = [self.path / s["file"] for s in m["shards"]]
        self._step_ends: list[torch.Tensor] = []
        for k, f in enumerate(self._shard_files):
            with safe_open(str(f), "pt") as st:
                keys, nt, ns = st.get_tensor("key"), st.get_tensor("num_tokens"), st.get_tensor("num_states")
                self._step_ends.append(st.get_tensor("step_end_idx"))
            s0 = torch.cumsum(ns, 0) - ns
            t0 = torch.cumsum(nt, 0) - nt
            for r, (key, a, b, c, d) in enumerate(zip(keys.tolist(), s0.tolist(), ns.tolist(), t0.tolist(),
                                                      nt.tolist())):
                self.index.setdefault(key, Entry(k, r, a, b, c, d))
        self._loaded: dict[tuple[str, int], torch.Tensor] = {}
        self._handles: dict[int, Any] = {}  # open (memory-mapped) shards for per-trajectory sequence reads

    def check_provides(self, need: str, layer: int | None = None) -> None:
        """Raise :class:`FeatureCacheError` unless the directory holds ``need`` (at ``layer``)."""
        m = self.manifest
        if need == "states":
            have, flag = m.get("layers", []), "--layers"
        elif need == "tokens":
            have, flag = m.get("sequence_layers", []), "--sequence_layers"
        elif need == "ref_logprobs":
            if not m.get("reference_logprobs"):
                raise FeatureCacheError(f"{self.path}: holds no reference log-probs (precompute with "
                                        "--reference_logprobs true)")
            return
        else:
            raise ValueError(f"need must be states, tokens or ref_logprobs; got {need!r}")
        if layer is None or layer not in have:
            raise FeatureCacheError(f"{self.path}: holds {need} of layers {have}, not {layer} (precompute with "
                                    f"{flag} [{layer}])")

    def __len__(self) -> int:
        return len(self.index)

    def _shard_tensor(self, name: str, shard: int) -> torch.Tensor:
        key = (name, shard)
        if key not in self._loaded:
            with self._open(str(self._shard_files[shard]), "pt") as st:
                self._loaded[key] = st.get_tensor(name)
        return self._loaded[key]

    def lookup(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               step_end_idx: torch.Tensor | None = None, rows: list[int] | None = None) -> list[Entry | None]:
        """The entry of every batch row (right-padded ``[B, T]``), ``None`` for rows not in ``rows``.

        With ``step_end_idx`` (``[B, S]``, ``-1`` pad) each found row's step ends are checked against the
        cached ones.

        Raises:
            FeatureCacheError: a row is not in the cache (other data, tokenizer or ``max_length``), or its step
                ends differ; one line with the counts and the manifest's settings.
        """
        ids, lens = input_ids.detach().cpu(), attention_mask.detach().cpu().sum(1).tolist()
        ends = step_end_idx.detach().cpu() if step_end_idx is not None else None
        out: list[Entry | None] = []
        missing = []
        for b in range(ids.shape[0]):
            if rows is not None and b not in rows:
                out.append(None)
                continue
            entry = self.index.get(sequence_key(ids[b, : int(lens[b])]))
            if entry is None:
                missing.append(b)
            elif ends is not None:
                mine = ends[b][ends[b] >= 0]
                cached = self._step_ends[entry.shard][entry.state_start : entry.state_start + entry.num_states]
                if not torch.equal(mine, cached):
                    raise FeatureCacheError(f"{self.path}: a trajectory's step ends differ from the cached ones "
                                            f"({mine.tolist()[:6]} vs {cached.tolist()[:6]}): another chat template?")
            out.append(entry)
        if missing:
            m = self.manifest
            raise FeatureCacheError(
                f"{self.path}: {len(missing)} of {ids.shape[0]} trajectories of a batch are not in the features "
                f"(first: {int(lens[missing[0]])} tokens); they were precomputed from {m.get('inputs_summary')} with "
                f"tokenizer {m.get('tokenizer')!r} and max_length {m.get('max_length')}: run python -m "
                "agentrm.precompute on the same data with the data module's tokenizer and max_length"
            )
        return out

    def states(self, entry: Entry, layer: int) -> torch.Tensor:
        """``[num_states, H]`` state features of layer ``layer`` of one trajectory."""
        t = self._shard_tensor(states_key(layer), entry.shard)
        return t[entry.state_start : entry.state_start + entry.num_states]

    def ref_logprobs(self, entry: Entry) -> torch.Tensor:
        """``[num_tokens]`` reference log-probs (``[t]``: of token ``t`` given the tokens before it)."""
        t = self._shard_tensor("ref_logprobs", entry.shard)
        return t[entry.token_start : entry.token_start + entry.num_tokens]

    def tokens(self, entry: Entry, layer: int) -> torch.Tensor:
        """``[num_tokens, H]`` residual stream after block ``layer`` of one trajectory (read from the mapped file)."""
        if entry.shard not in self._handles:
            self._handles[entry.shard] = self._open(str(self._shard_files[entry.shard]), "pt")
        sliced = self._handles[entry.shard].get_slice(tokens_key(layer))
        return sliced[entry.token_start : entry.token_start + entry.num_tokens]
