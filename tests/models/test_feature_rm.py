"""Value RMs on cached features: the exported RM (truncated backbone + head, or merged top blocks) scores exactly
what was trained on the cache, through the ordinary scorer; a non-causal backbone never leaks later steps."""

from __future__ import annotations

import copy

import pytest
import torch

from agentrm.data.agentgym import load_trajectories
from agentrm.data.collate import collate_trajectories
from agentrm.data.schema import Step, Trajectory
from agentrm.data.tokenize import tokenize_trajectory
from agentrm.models.backbone import build_backbone
from agentrm.models.feature_cache import FeatureCache
from agentrm.models.feature_rm import CachedFeatureHead, CachedTopLayersRM, head_rm, merged_top_rm
from agentrm.models.value_rm import ValueRewardModel, aggregate_steps
from agentrm.scoring import ValueRMScorer
from tests.feature_fixtures import run_precompute, save_tiny, varied_trajectories, write_jsonl

TOL = dict(atol=1e-5, rtol=0)  # fp32 CPU: a batched forward vs the cached one, float rounding only


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("feature_rm")
    data = write_jsonl(varied_trajectories(), root / "data.jsonl")
    models = {arch: save_tiny(arch, tiny_tokenizer, root / arch, seed=1) for arch in ("llama", "gemma3", "bert")}
    feats = {}
    for arch in ("llama", "gemma3"):
        feats[arch] = root / f"f_{arch}"
        run_precompute(data=[str(data)], out=str(feats[arch]), backbone=str(models[arch]), max_length=48,
                       layers=[1, 2], sequence_layers=[1], sequence_dtype="float32")
    for pooling in ("mean", "last"):
        feats[f"bert-{pooling}"] = root / f"f_bert_{pooling}"
        run_precompute(data=[str(data)], out=str(feats[f"bert-{pooling}"]), backbone=str(models["bert"]),
                       max_length=48, layers=[2], pooling=pooling)
    return {"data": data, "models": models, "feats": feats, "root": root}


def _batch(tok, trajs, max_length):
    return collate_trajectories([tokenize_trajectory(tok, t, max_length) for t in trajs], tok.pad_token_id)


@pytest.mark.parametrize("which,layer", [("llama", 1), ("gemma3", 2), ("bert-mean", 2), ("bert-last", 2)])
@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_exported_head_rm_scores_the_cached_features(which, layer, head, setup, tiny_tokenizer, tmp_path):
    """ValueRMScorer on the export (backbone cut to ``layer`` blocks + the head) == the head on the cached states,
    step by step (every aggregation) and per candidate (tolerance 1e-5)."""
    torch.manual_seed(0)
    cache = FeatureCache(setup["feats"][which])
    model = CachedFeatureHead(cache, layer, head, head_width=8).eval()
    trajs = load_trajectories(setup["data"])
    batch = _batch(tiny_tokenizer, trajs, 48)
    with torch.no_grad():
        want = torch.sigmoid(model(batch["input_ids"], batch["attention_mask"], batch["step_end_idx"]))
    want = want.masked_fill(batch["step_end_idx"] < 0, float("nan"))
    rm = head_rm(cache.manifest, layer, model.value_head, head, value_activation="sigmoid")
    rm.save_pretrained(tmp_path / "rm", tokenizer=tiny_tokenizer, max_length=48)
    back = ValueRewardModel.from_pretrained(tmp_path / "rm")
    assert back.backbone.config.num_hidden_layers == layer and back.head_type == head
    assert back.causal is (not which.startswith("bert")) and back.pooling == cache.manifest["pooling"]
    scorer = ValueRMScorer(back, tiny_tokenizer, max_length=48, batch_size=3)
    has = ~torch.isnan(want).all(1)
    for agg in ("last", "min", "max", "mean"):
        scorer.aggregate = agg
        torch.testing.assert_close(scorer.score_trajectories(trajs)[has], aggregate_steps(want, agg)[has], **TOL)
    # candidates: each scored as the last step of prefix + candidate, which the cache holds as that trajectory
    long = [t for t in trajs if len(t.steps) >= 2]
    for t in long[:3]:
        prefix = Trajectory(t.id, t.task, t.instruction, t.steps[:-1], t.reward, t.success)
        got = scorer.score_candidates(prefix, [t.steps[-1]])
        i = trajs.index(t)
        assert got[0].item() == pytest.approx(aggregate_steps(want[i : i + 1], "last").item(), abs=1e-5)


@pytest.mark.parametrize("depth", [3, 2])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_top_blocks_on_cached_inputs_equal_the_full_model(arch, depth, setup, tiny_tokenizer, tmp_path):
    """CachedTopLayersRM (blocks 2..depth fed with the cached block-1 output) == ValueRewardModel on the backbone of
    ``depth`` blocks with the same head; after a LoRA update, the merged export (``depth`` blocks) equals the
    trained model (tolerance 1e-5)."""
    from peft import LoraConfig, get_peft_model

    from agentrm.models.layers import truncate_backbone

    def backbone():
        return truncate_backbone(build_backbone(str(setup["models"][arch])), depth)

    cache = FeatureCache(setup["feats"][arch])
    trajs = load_trajectories(setup["data"])
    batch = _batch(tiny_tokenizer, trajs, 48)
    args = (batch["input_ids"], batch["attention_mask"], batch["step_end_idx"])
    torch.manual_seed(0)
    plain = CachedTopLayersRM(backbone(), cache, 1).eval()
    full = ValueRewardModel(backbone()).eval()
    full.value_head.load_state_dict(plain.rm.value_head.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(*args), full(*args), **TOL)

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    trained = CachedTopLayersRM(backbone(), cache, 1, wrap=lambda top: get_peft_model(top, lora)).eval()
    with torch.no_grad():
        moved = trained(*args)
        assert (moved - full(*args)).abs().max() > 1e-3  # the adapter changed something
    merged = merged_top_rm(cache.manifest, trained)
    merged.save_pretrained(tmp_path / "rm", tokenizer=tiny_tokenizer)
    back = ValueRewardModel.from_pretrained(tmp_path / "rm").eval()
    assert back.backbone.config.num_hidden_layers == depth
    with torch.no_grad():
        torch.testing.assert_close(back(*args), moved, **TOL)


def test_non_causal_value_rm_reads_each_step_from_its_prefix(setup, tiny_tokenizer):
    """causal=False (BERT): a step's value is unchanged when a later step changes and equals its prefix scored
    alone; the scorer takes the plain path and candidates equal whole-trajectory scores."""
    torch.manual_seed(0)
    rm = ValueRewardModel(build_backbone(str(setup["models"]["bert"])), pooling="mean").eval()
    assert rm.causal is False
    base = varied_trajectories()
    later = varied_trajectories(later_text=" and then a long, different ending")
    a, b = _batch(tiny_tokenizer, base, 512), _batch(tiny_tokenizer, later, 512)
    va, vb = rm.score(a), rm.score(b)
    mask = a["step_mask"]
    last = mask.sum(1) - 1
    earlier = mask.clone()
    earlier[torch.arange(len(base))[mask.any(1)], last[mask.any(1)]] = False
    assert earlier.sum() >= 6
    torch.testing.assert_close(va[earlier], vb[earlier], **TOL)
    assert (va[mask & ~earlier] - vb[mask & ~earlier]).abs().max() > 1e-4
    for i, t in enumerate(base):  # each step == its prefix as a trajectory of its own
        for s in range(len(t.steps)):
            alone = _batch(tiny_tokenizer, [Trajectory(t.id, t.task, t.instruction, t.steps[: s + 1], 0.0, False)], 512)
            assert rm.score(alone)[0, s].item() == pytest.approx(va[i, s].item(), abs=1e-5)

    scorer = ValueRMScorer(rm, tiny_tokenizer, batch_size=2)
    t = next(t for t in base if len(t.steps) >= 3)
    prefix = Trajectory(t.id, t.task, t.instruction, t.steps[:2], t.reward, t.success)
    cands = [t.steps[2], Step("go west", "you see a wall"), Step("go north 2", "nothing here")]
    got = scorer.score_candidates(prefix, cands)
    assert scorer.last_path == "plain"
    whole = scorer.score_trajectories([Trajectory(t.id, t.task, t.instruction, t.steps[:2] + [c], 0.0, False)
                                       for c in cands])
    torch.testing.assert_close(got, whole, **TOL)
    for path in ("cached", "packed"):
        with pytest.raises(ValueError, match="non-causal"):
            ValueRMScorer(rm, tiny_tokenizer, path=path).score_candidates(prefix, cands)


def test_mean_pooling_is_refused_for_a_causal_backbone(setup):
    with pytest.raises(ValueError, match="pooling='mean' is for non-causal"):
        ValueRewardModel(build_backbone(str(setup["models"]["llama"])), pooling="mean")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("lora", [False, True], ids=["separate-reference", "lora"])
def test_implicit_prm_on_cached_reference_logprobs_equals_the_reference_forward(arch, lora, setup, tiny_tokenizer,
                                                                                tmp_path):
    """Step rewards (and their gradients) with reference log-probs read from the precompute == with the reference
    forward: a separate frozen reference, or the LoRA policy with its adapter disabled (tolerance 1e-5)."""
    from peft import LoraConfig, get_peft_model

    from agentrm.models.implicit_prm import ImplicitPRM

    run_precompute(data=[str(setup["data"])], out=str(tmp_path / "ref"), backbone=str(setup["models"][arch]),
                   max_length=48, reference_logprobs=True)
    cache = FeatureCache(tmp_path / "ref", "ref_logprobs")
    batch = _batch(tiny_tokenizer, load_trajectories(setup["data"]), 48)
    torch.manual_seed(0)

    def policy():
        p = build_backbone(str(setup["models"][arch]), causal_lm=True)
        if lora:
            p = get_peft_model(p, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False))
        else:
            with torch.no_grad():  # the policy has moved away from the reference
                for prm in p.parameters():
                    prm.add_(0.02 * torch.randn_like(prm))
        return p

    pol = policy()
    ref = None if lora else build_backbone(str(setup["models"][arch]), causal_lm=True)
    uncached = ImplicitPRM(pol, ref, beta=0.5)
    cached = ImplicitPRM(copy.deepcopy(pol), None, beta=0.5, reference_cache=cache)
    assert cached.reference is None
    r_uncached, r_cached = uncached.step_rewards(batch), cached.step_rewards(batch)
    assert r_uncached[batch["step_mask"]].abs().max() > 1e-3  # policy != reference: rewards are not all zero
    torch.testing.assert_close(r_cached, r_uncached, **TOL)
    r_uncached.sum().backward()
    r_cached.sum().backward()
    for (name, a), (_, b) in zip(uncached.policy.named_parameters(), cached.policy.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)
    if lora:  # the reference is the base with the adapter disabled: the directory is complete
        assert (cached.save_pretrained(tmp_path / "prm") / "policy" / "adapter_config.json").exists()
    else:  # the reference was never loaded: saving without it would write a PRM that cannot score
        with pytest.raises(ValueError, match="no reference model to save"):
            cached.save_pretrained(tmp_path / "prm")


def _minilm_tokenizer():
    from tests.real_models import real_tokenizer

    return real_tokenizer("all-minilm-l6-v2")


def test_minilm_template_gives_exact_step_ends():
    """The imported all-MiniLM-L6-v2 tokenizer (WordPiece, no template of its own) with the supplied one: every step
    ends at its [SEP], actions span their own (lower-cased) words, the head is kept under truncation."""
    tok = _minilm_tokenizer()
    sep = tok.convert_tokens_to_ids("[SEP]")
    trajs = load_trajectories("agentrm/assets/sciworld_sample.jsonl")[:5]
    for t in trajs:
        for max_length in (None, 256):
            it = tokenize_trajectory(tok, t, max_length)
            assert it.input_ids[0] == tok.cls_token_id and len(it.input_ids) <= (max_length or 10**9)
            assert all(it.input_ids[e] == sep for e in it.step_end_idx + it.action_end_idx)
            for s, (a, e) in enumerate(zip(it.step_start_idx, it.action_end_idx)):
                action = t.steps[it.first_step + s].action
                assert tok.decode(it.input_ids[a:e]) == tok.decode(tok(action, add_special_tokens=False)["input_ids"])


@pytest.mark.slow
def test_minilm_head_rm_end_to_end(tmp_path):
    """Real all-MiniLM-L6-v2 (512 positions): precompute (own-prefix states, mean pooled) -> head -> export truncated
    to 3 of 6 layers -> ValueRMScorer scores the head on the cached states (1e-5)."""
    tok = _minilm_tokenizer()
    data = tmp_path / "d.jsonl"
    trajs = load_trajectories("agentrm/assets/sciworld_sample.jsonl")[:3]
    write_jsonl(trajs, data)
    run_precompute(data=[str(data)], out=str(tmp_path / "f"), backbone="all-minilm-l6-v2", max_length=512, layers=[3])
    cache = FeatureCache(tmp_path / "f")
    assert cache.manifest["causal"] is False and cache.manifest["pooling"] == "mean"
    torch.manual_seed(0)
    model = CachedFeatureHead(cache, 3).eval()
    batch = _batch(tok, trajs, 512)
    with torch.no_grad():
        want = model(batch["input_ids"], batch["attention_mask"], batch["step_end_idx"])
    rm = head_rm(cache.manifest, 3, model.value_head, "linear")
    rm.save_pretrained(tmp_path / "rm", tokenizer=tok)
    back = ValueRewardModel.from_pretrained(tmp_path / "rm")
    assert back.backbone.config.num_hidden_layers == 3 and back.causal is False
    scorer = ValueRMScorer(back, tok, max_length=512, aggregate="min")
    want = want.masked_fill(batch["step_end_idx"] < 0, float("nan"))
    assert int((batch["step_end_idx"] >= 0).sum()) >= 10
    torch.testing.assert_close(scorer.score_trajectories(trajs), aggregate_steps(want, "min"), atol=1e-5, rtol=0)


def test_token_classification_export_refuses_what_it_cannot_hold(setup, tiny_tokenizer, tmp_path):
    from agentrm.models.export import export_token_classification

    for name, rm in (("mlp", ValueRewardModel(build_backbone(str(setup["models"]["llama"])), head="mlp", head_width=4)),
                     ("encoder", ValueRewardModel(build_backbone(str(setup["models"]["bert"]))))):
        rm.save_pretrained(tmp_path / name, tokenizer=tiny_tokenizer)
        with pytest.raises(ValueError, match="mlp value head" if name == "mlp" else "non-causal"):
            export_token_classification(tmp_path / name, tmp_path / f"{name}-tc")
