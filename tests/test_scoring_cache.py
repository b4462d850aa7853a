"""The cached path: prefix keys/values reused across calls and beam depths, scores equal to scoring alone."""

from __future__ import annotations

import pytest
import torch

from agentrm.data.schema import Step, Trajectory
from agentrm.scoring import (
    ImplicitPRMScorer,
    PrefixCache,
    ScoringCounters,
    ValueRMScorer,
    tokenize_candidates,
)
from agentrm.scoring.cache import AUTO_CUDA_FRACTION, CPU_DEFAULT_BYTES, Segment, auto_budget, parse_bytes
from tests.conftest import make_trajectory
from tests.test_scoring import ATOL, STEPS5, _alone, _prm, _value_rm


def _extend(t: Trajectory, step: Step) -> Trajectory:
    return Trajectory(t.id, t.task, t.instruction, [*t.steps, step], 0.0, False)


def _walk(scorer_cached, scorer_ref, model, tok, depths: int = 3):
    """Score STEPS5 at each depth of a beam-like walk (choosing a different candidate each depth)."""
    hist = make_trajectory("p", 0)
    for d in range(depths):
        got = scorer_cached.score_candidates(hist, STEPS5)
        ref = scorer_ref.score_candidates(hist, STEPS5)
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
        if model is not None:
            torch.testing.assert_close(got, _alone(model, tok, hist, STEPS5)[:, -1], atol=ATOL, rtol=0)
        hist = _extend(hist, STEPS5[(2 * d + 1) % len(STEPS5)])
    return hist


@pytest.mark.parametrize("rows", ["per_candidate", "per_prefix"])
def test_value_rm_cache_across_depths_forwards_only_new_tokens(tiny_tokenizer, rows):
    model = _value_rm(tiny_tokenizer, "sdpa")
    cached = ValueRMScorer(model, tiny_tokenizer, path="cached")
    cached.cache_rows = rows
    packed = ValueRMScorer(model, tiny_tokenizer, path="packed")
    hist = _walk(cached, packed, model, tiny_tokenizer)
    # one more depth: the chosen candidate's keys/values were stored, so only the generation prompt
    # (and the K candidate rows) are forwarded, never the history again
    toks = tokenize_candidates(tiny_tokenizer, hist, STEPS5)
    before = cached.counters.as_dict()
    cached.score_candidates(hist, STEPS5)
    after = cached.counters.as_dict()
    K, P, L = len(toks.cand_ids), len(toks.prefix_ids), sum(len(c) for c in toks.cand_ids)
    fwd = after["forward_tokens"] - before["forward_tokens"]
    if rows == "per_candidate":
        held, rest = divmod(fwd - L, K)  # prefix tokens forwarded in each candidate row
    else:
        held, rest = fwd - L, 0  # ... once, in the prefix's packed row
    assert rest == 0 and 1 <= held <= 5, (fwd, held)  # the last token and the generation prompt
    assert after["cached_tokens"] - before["cached_tokens"] == P - held
    assert after["forward_passes"] - before["forward_passes"] == 1  # no forward of the prefix alone
    assert cached.counters.cached_calls == 4 and packed.counters.packed_calls == 3
    assert cached.counters.forward_tokens < packed.counters.forward_tokens + len(toks.prefix_ids)


def test_prm_cache_across_depths_policy_and_reference(tiny_tokenizer):
    prm = _prm(tiny_tokenizer, "eager")
    cached = ImplicitPRMScorer(prm, tiny_tokenizer, include_prefix=False, path="cached")
    _walk(cached, ImplicitPRMScorer(prm, tiny_tokenizer, include_prefix=False, path="packed"), prm, tiny_tokenizer)
    keys = set(cached.prefix_cache._entries)
    assert keys == {"policy", "reference"}  # both models' prefixes are cached
    assert cached.counters.cached_tokens > 0


def test_small_batches_and_evicting_cache_stay_exact(tiny_tokenizer):
    model = _value_rm(tiny_tokenizer, "eager")
    tiny = ValueRMScorer(model, tiny_tokenizer, path="cached", batch_size=2, cache_entries=1)
    _walk(tiny, ValueRMScorer(model, tiny_tokenizer, path="plain"), None, tiny_tokenizer)
    assert len(tiny.prefix_cache) == 1
    none = ValueRMScorer(model, tiny_tokenizer, path="cached", cache_entries=0)
    _walk(none, ValueRMScorer(model, tiny_tokenizer, path="packed"), None, tiny_tokenizer, depths=2)
    assert none.counters.cached_tokens == 0 and len(none.prefix_cache) == 0


def test_truncated_prefixes_hit_only_matching_tokens(tiny_tokenizer):
    model = _value_rm(tiny_tokenizer, "sdpa")
    prefix = make_trajectory("p", 4)
    full = tokenize_candidates(tiny_tokenizer, prefix, STEPS5)
    max_length = len(full.prefix_ids) + max(len(c) for c in full.cand_ids) - 5
    cached = ValueRMScorer(model, tiny_tokenizer, max_length=max_length, path="cached")
    ref = ValueRMScorer(model, tiny_tokenizer, max_length=max_length, path="packed")
    cached.score_candidates(make_trajectory("p", 3), STEPS5)  # untruncated shorter history first
    torch.testing.assert_close(cached.score_candidates(prefix, STEPS5), ref.score_candidates(prefix, STEPS5),
                               atol=ATOL, rtol=0)


def test_flash_like_attention_does_not_repeat_the_prefix(tiny_tokenizer, monkeypatch):
    """Without custom-mask support (flash-attention), auto scoring used to repeat the prefix K times."""
    model = _value_rm(tiny_tokenizer, "sdpa")
    monkeypatch.setattr(
        "agentrm.scoring.driver.packing_unsupported_reason", lambda cfg, ctx=None: "flash_attention_2: no 4D mask"
    )
    prefix = make_trajectory("p", 3)
    toks = tokenize_candidates(tiny_tokenizer, prefix, STEPS5)
    P, K = len(toks.prefix_ids), len(STEPS5)
    auto = ValueRMScorer(model, tiny_tokenizer)  # what a flash-attention model gets
    plain = ValueRMScorer(model, tiny_tokenizer, path="plain")  # what it got before the cache
    torch.testing.assert_close(auto.score_candidates(prefix, STEPS5), plain.score_candidates(prefix, STEPS5),
                               atol=ATOL, rtol=0)
    assert auto.last_path == "cached" and plain.last_path == "plain"
    # plain: K (P + L_k); cached: (P - 1) + K (1 + L_k): the prefix once
    assert plain.counters.forward_tokens - auto.counters.forward_tokens == (K - 1) * (P - 1)
    auto.score_candidates(prefix, STEPS5)  # and a rescore forwards the candidates only
    assert auto.counters.cached_tokens == P - 1
    # a new prefix longer than fold_tokens is forwarded once on its own; a short one in every row
    folded = ValueRMScorer(model, tiny_tokenizer, fold_tokens=P)
    folded.score_candidates(prefix, STEPS5)
    assert folded.counters.forward_passes == 1 and folded.counters.forward_tokens == plain.counters.forward_tokens


def _kv(n: int, fill: float = 0.0, layers: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``layers`` of keys/values for ``n`` positions, ``[1, 2 heads, n, 4]`` fp32 (32 bytes per position each)."""
    return [(torch.full((1, 2, n, 4), fill), torch.full((1, 2, n, 4), fill + 1)) for _ in range(layers)]


def _seg(n: int, fill: float = 0.0) -> tuple[Segment, int]:
    return Segment.copy_of(_kv(n, fill), 0, 0, n), n


def test_prefix_cache_lookup_and_lru():
    c = PrefixCache(max_entries=2, max_bytes="1MiB")
    c.store_kv("m", (1, 2, 3, 4, 5), _kv(5))
    got, n = c.lookup_kv("m", (1, 2, 3, 9))
    assert got is None and n == 0 and c.misses == 1
    got, n = c.lookup_kv("m", (1, 2, 3, 4, 5, 6, 7))
    assert n == 5 and got[0][0].shape[2] == 5
    got, n = c.lookup_kv("m", (1, 2, 3))  # a longer entry is cropped
    assert n == 3 and got[0][1].shape[2] == 3
    assert c.lookup("other", (1, 2))[1] == 0  # per model
    c.store_kv("m", (7,), _kv(1))
    c.store_kv("m", (8,), _kv(1))
    assert len(c) == 2 and c.lookup("m", (1, 2, 3, 4, 5))[1] == 0  # evicted (least recently used)
    assert c.evictions == c.entry_cap_drops == 1 and c.budget_evictions == 0 and c.nbytes == 2 * 2 * (2 * 1 * 4 * 4)


def test_byte_accounting_counts_shared_segments_once_and_equals_owned_storage():
    c = PrefixCache(max_bytes=10_000)
    prefix, held = _seg(10), _seg(3, 5.0)
    for k in range(4):  # four candidates after one prefix: they share its segments
        c.store("m", tuple(range(13)) + (100 + k,) * 2, (prefix, held, _seg(2, 9.0 + k)))
    assert c.nbytes == (10 + 3 + 4 * 2) * 64 == c.storage_nbytes() == c.peak_bytes
    # the materialised entry is the concatenation, cropped where the lookup asks for less
    kv, n = c.lookup_kv("m", tuple(range(13)) + (102, 102, 7))
    assert n == 15 and kv[0][0].shape[2] == 15 and kv[0][0][0, 0, -1, 0] == 11.0 and kv[0][0][0, 0, 10, 0] == 5.0
    parts, n = c.lookup("m", tuple(range(12)))
    assert n == 12 and [u for _, u in parts] == [10, 2]
    # an entry built on a cropped lookup uses the start of a segment in its middle
    c.store("m", tuple(range(12)) + (55,), parts + (_seg(1, 7.0),))
    kv, n = c.lookup_kv("m", tuple(range(12)) + (55,))
    assert n == 13 and kv[0][1][0, 0, :, 0].tolist() == [1.0] * 10 + [6.0, 6.0, 8.0]
    assert c.nbytes == (10 + 3 + 4 * 2 + 1) * 64 == c.storage_nbytes()
    c._evict(*next(reversed(c._lru)))
    # evicting one candidate frees only its own segment; the shared ones go with the last user
    for left in (3, 2, 1):
        c._evict(*next(iter(c._lru)))
        assert c.nbytes == (13 + left * 2) * 64 == c.storage_nbytes()
    c._evict(*next(iter(c._lru)))
    assert c.nbytes == 0 == c.storage_nbytes() and len(c) == 0


def test_lru_eviction_by_bytes_and_oversized_entries():
    counters = ScoringCounters()
    c = PrefixCache(max_bytes=10 * 64, counters=counters)  # ten positions of _kv
    c.store("m", (1,) * 4, (_seg(4),))
    c.store("r", (2,) * 4, (_seg(4),))  # one budget over every model
    assert c.lookup("m", (1,) * 4)[1] == 4  # "m" used: "r" is now the least recently used
    assert c.store("m", (3,) * 4, (_seg(4),))
    assert c.lookup("r", (2,) * 4)[1] == 0 and c.lookup("m", (1,) * 4)[1] == 4
    assert c.nbytes == 8 * 64 <= c.budget and c.evictions == 1
    assert not c.store("m", (4,) * 11, (_seg(11),))  # alone larger than the budget: not stored, counted
    assert c.oversized == 1 and len(c) == 2
    assert (counters.cache_evictions, counters.cache_oversized, counters.cache_peak_bytes) == (1, 1, 8 * 64)
    assert not PrefixCache(max_bytes=0).store("m", (1,), (_seg(1),))  # 0 disables storing
    with pytest.raises(ValueError, match="parts hold 4 positions for 3 ids"):
        c.store("m", (1, 2, 3), (_seg(4),))


def test_parse_bytes_and_automatic_budget(monkeypatch):
    assert parse_bytes(None) is None and parse_bytes("auto") is None
    assert parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("1.5 GB") == 1_500_000_000 and parse_bytes(7) == 7
    for bad in ("lots", "-1GB", -3, True, "2 parsecs"):
        with pytest.raises(ValueError, match="cache_bytes"):
            parse_bytes(bad)
    c = PrefixCache()
    assert c.budget is None
    c.store("m", (1,), (_seg(1),))
    assert c.budget == CPU_DEFAULT_BYTES == 2**30  # resolved from the device of the first entry
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (8 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 1 * 2**30)
    assert auto_budget(torch.device("cuda", 0)) == int(AUTO_CUDA_FRACTION * 10 * 2**30)


class _CheckedCache(PrefixCache):
    """Checks after every store that the budget holds and the accounting equals the owned storage."""

    def store(self, model, ids, parts):
        stored = super().store(model, ids, parts)
        assert self.nbytes <= self.budget and self.nbytes == self.storage_nbytes()
        return stored


@pytest.mark.parametrize("rows", ["per_candidate", "per_prefix"])
def test_tiny_budget_evicts_and_keeps_scores_exact(tiny_tokenizer, rows):
    """A budget of a few entries forces evictions at every depth; scores stay those of uncached scoring."""
    model = _value_rm(tiny_tokenizer, "sdpa")
    ref = ValueRMScorer(model, tiny_tokenizer, path="plain")

    def walk(scorer):
        scorer.cache_rows = rows
        beams = _beams(2)
        for depth in range(3):
            for h, g in zip(beams, scorer.score_candidates_many([(h, STEPS5) for h in beams])):
                torch.testing.assert_close(g, ref.score_candidates(h, STEPS5), atol=ATOL, rtol=0)
            beams = [_extend(h, STEPS5[(depth + i) % len(STEPS5)]) for i, h in enumerate(beams)]
        return scorer.counters

    unbounded = walk(ValueRMScorer(model, tiny_tokenizer, path="cached"))
    budget = unbounded.cache_peak_bytes // 3
    cached = ValueRMScorer(model, tiny_tokenizer, path="cached", cache_bytes=budget)
    cached.prefix_cache.__class__ = _CheckedCache
    c = walk(cached)
    assert unbounded.cache_evictions == 0 and c.cache_evictions == cached.prefix_cache.evictions > 0
    assert 0 < c.cache_peak_bytes <= budget and cached.prefix_cache.nbytes <= budget
    assert c.forward_tokens > unbounded.forward_tokens  # what was evicted is forwarded again


def test_entries_own_their_memory_and_share_the_prefix(tiny_tokenizer):
    """No entry keeps a batched forward's cache alive: every stored tensor's storage is exactly its size,
    and the K candidates of a prefix hold its tokens once."""
    model = _value_rm(tiny_tokenizer, "sdpa")
    for rows in ("per_candidate", "per_prefix"):
        s = ValueRMScorer(model, tiny_tokenizer, path="cached")
        s.cache_rows = rows
        prefix = make_trajectory("p", 3)
        toks = tokenize_candidates(tiny_tokenizer, prefix, STEPS5)
        s.score_candidates(prefix, STEPS5)
        cfg = model.backbone.config
        per_token = 2 * 4 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
        P, L = len(toks.prefix_ids), sum(len(c) for c in toks.cand_ids)
        pc = s.prefix_cache
        assert pc.nbytes == pc.storage_nbytes() == (P + L) * per_token, rows  # not K * P
        assert len(pc) == len(STEPS5) + (rows == "per_candidate")  # + the prefix forwarded on its own


def test_prm_budget_covers_policy_and_reference(tiny_tokenizer):
    prm = _prm(tiny_tokenizer, "sdpa")
    unbounded = ImplicitPRMScorer(prm, tiny_tokenizer, include_prefix=False, path="cached")
    _walk(unbounded, ImplicitPRMScorer(prm, tiny_tokenizer, include_prefix=False, path="plain"), None, tiny_tokenizer)
    budget = unbounded.prefix_cache.peak_bytes // 3
    small = ImplicitPRMScorer(prm, tiny_tokenizer, include_prefix=False, path="cached", cache_bytes=budget)
    small.prefix_cache.__class__ = _CheckedCache
    _walk(small, ImplicitPRMScorer(prm, tiny_tokenizer, include_prefix=False, path="plain"), None, tiny_tokenizer)
    assert small.counters.cache_evictions > 0 and small.prefix_cache.peak_bytes <= budget
    assert small.counters.forward_tokens > unbounded.counters.forward_tokens  # evicted prefixes were reforwarded


def test_shared_scorer_counts_evictions_per_episode(tiny_tokenizer):
    """The search harness reads counter deltas through SharedScorer: evictions reach its episode counters."""
    import threading

    from agentrm.search.runner import SharedScorer

    model = _value_rm(tiny_tokenizer, "sdpa")
    scorer = ValueRMScorer(model, tiny_tokenizer, path="cached", cache_bytes="60KiB")
    lock = threading.Lock()
    views = [SharedScorer(scorer, lock) for _ in range(2)]
    for d in range(3):
        for i, view in enumerate(views):
            view.score_candidates(make_trajectory(f"e{i}", d), STEPS5)
    assert scorer.counters.cache_evictions > 0
    assert sum(v.counters.cache_evictions for v in views) == scorer.counters.cache_evictions
    assert sum(v.counters.cache_peak_bytes for v in views) == scorer.counters.cache_peak_bytes


def _beams(depths: int):
    """Three beam histories of different lengths (and a shared start), as at one beam-search depth."""
    base = make_trajectory("p", 0)
    a = _extend(base, STEPS5[0])
    b = _extend(_extend(base, STEPS5[1]), STEPS5[2])
    c = make_trajectory("q", depths)
    return [a, b, c]


@pytest.mark.parametrize("rows", ["per_candidate", "per_prefix"])
def test_many_prefixes_in_one_forward_equal_scoring_alone(tiny_tokenizer, rows):
    """Every beam of a depth in one forward (left-padded pasts, own positions) = each scored alone."""
    for attn in ("sdpa", "eager"):
        model = _value_rm(tiny_tokenizer, attn)
        many = ValueRMScorer(model, tiny_tokenizer, path="cached")
        many.cache_rows = rows
        ref = ValueRMScorer(model, tiny_tokenizer, path="packed")
        beams = _beams(2)
        for depth in range(2):
            got = many.score_candidates_many([(h, STEPS5) for h in beams])
            assert len(got) == len(beams)
            for h, g in zip(beams, got):
                torch.testing.assert_close(g, ref.score_candidates(h, STEPS5), atol=ATOL, rtol=0)
                torch.testing.assert_close(g, _alone(model, tiny_tokenizer, h, STEPS5)[:, -1], atol=ATOL, rtol=0)
            beams = [_extend(h, STEPS5[(depth + i) % len(STEPS5)]) for i, h in enumerate(beams)]
        # depth 2 found each beam's chosen candidate row in the cache (one forward for all three beams)
        assert many.counters.cached_calls == 6 and many.counters.cached_tokens > 0


@pytest.mark.parametrize("rows", ["per_candidate", "per_prefix"])
def test_many_prefixes_forward_once_per_batch_and_handle_empty_requests(tiny_tokenizer, rows):
    model = _value_rm(tiny_tokenizer, "sdpa")
    many = ValueRMScorer(model, tiny_tokenizer, path="cached", batch_size=4)
    many.cache_rows = rows
    beams = _beams(1)
    many.score_candidates_many([(h, STEPS5[:2]) for h in beams])  # fill the caches
    beams = [_extend(h, STEPS5[0]) for h in beams]
    before = many.counters.forward_passes
    got = many.score_candidates_many([(beams[0], STEPS5[:2]), (beams[1], []), (beams[2], STEPS5[:2])])
    assert many.counters.forward_passes - before == 1  # 4 rows of two prefixes, one batch, no prefix forward
    assert [len(g) for g in got] == [2, 0, 2]
    ref = ValueRMScorer(model, tiny_tokenizer, path="plain")
    torch.testing.assert_close(got[2], ref.score_candidates(beams[2], STEPS5[:2]), atol=ATOL, rtol=0)


@pytest.mark.parametrize("rows", ["per_candidate", "per_prefix"])
def test_prm_many_prefixes_policy_and_reference(tiny_tokenizer, rows):
    prm = _prm(tiny_tokenizer, "sdpa")
    many = ImplicitPRMScorer(prm, tiny_tokenizer, include_prefix=False, path="cached", batch_size=5)
    many.cache_rows = rows
    ref = ImplicitPRMScorer(prm, tiny_tokenizer, include_prefix=False, path="plain")
    beams = _beams(3)
    for _ in range(2):
        for h, g in zip(beams, many.score_candidates_many([(h, STEPS5) for h in beams])):
            torch.testing.assert_close(g, ref.score_candidates(h, STEPS5), atol=ATOL, rtol=0)
        beams = [_extend(h, STEPS5[3]) for h in beams]
