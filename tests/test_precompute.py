"""``python -m agentrm.precompute``: cached states, sequence states and reference log-probs equal the uncached
forward on small models; no cached feature depends on later steps; resume, refusals, one-line errors."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM

from agentrm.checks import ConfigError
from agentrm.data.collate import collate_trajectories
from agentrm.data.tokenize import tokenize_trajectory
from agentrm.models.feature_cache import MANIFEST, FeatureCache, FeatureCacheError, read_manifest
from agentrm.models.layers import top_layers_model, truncate_backbone
from agentrm.models.value_rm import pool_rows
from agentrm.precompute import main
from tests.feature_fixtures import run_precompute, save_tiny, varied_trajectories, write_jsonl

ATOL = 1e-5  # fp32 on CPU: batched vs single-row forwards differ by float rounding only


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("backbones")
    return {arch: save_tiny(arch, tiny_tokenizer, root / arch) for arch in ("llama", "gemma3", "bert")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"base": write_jsonl(varied_trajectories(), root / "base.jsonl"),
            "later": write_jsonl(varied_trajectories(later_text=" and then a long, different ending"),
                                 root / "later.jsonl")}


def _items(tok, path, max_length):
    from agentrm.data.agentgym import load_trajectories

    return [tokenize_trajectory(tok, t, max_length) for t in load_trajectories(path)]


def _entry(cache, it):
    batch = collate_trajectories([it], 0)
    return cache.lookup(batch["input_ids"], batch["attention_mask"], batch["step_end_idx"])[0]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_states_are_the_truncated_backbones_output(arch, models, data, tiny_tokenizer, tmp_path):
    """Layer ``l``'s cached state at a step end == last_hidden_state of the backbone cut to ``l`` blocks, there
    (max_length 48 truncates the longer trajectories: the one truncation rule)."""
    run_precompute(data=[str(data["base"])], out=str(tmp_path / "f"), backbone=str(models[arch]), max_length=48,
                   layers=[1, 2, 3], shard_size=4, batch_tokens=100)
    cache = FeatureCache(tmp_path / "f", "states", 2)
    items = _items(tiny_tokenizer, data["base"], 48)
    assert any(it.first_step > 0 for it in items)  # truncation happened
    for layer in (1, 2, 3):
        cut = truncate_backbone(AutoModel.from_pretrained(models[arch]), layer).eval()
        for it in items:
            ids = torch.tensor([it.input_ids])
            with torch.no_grad():
                h = cut(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
            cached = cache.states(_entry(cache, it), layer)
            torch.testing.assert_close(cached, h[it.step_end_idx], atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_reference_logprobs_equal_the_uncached_forward(arch, models, data, tiny_tokenizer, tmp_path):
    run_precompute(data=[str(data["base"])], out=str(tmp_path / "f"), backbone=str(models[arch]), max_length=64,
                   reference_logprobs=True, layers=[2], shard_size=3, batch_tokens=90)
    cache = FeatureCache(tmp_path / "f", "ref_logprobs")
    lm = AutoModelForCausalLM.from_pretrained(models[arch]).eval()
    for it in _items(tiny_tokenizer, data["base"], 64):
        ids = torch.tensor([it.input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(lm(input_ids=ids).logits[0].float(), -1)
        expect = torch.cat([torch.zeros(1), logp[:-1].gather(1, ids[0, 1:, None])[:, 0]])
        torch.testing.assert_close(cache.ref_logprobs(_entry(cache, it)), expect, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("dtype,atol", [("float32", ATOL), ("bfloat16", 0.1)])
def test_sequence_states_feed_the_top_blocks(arch, dtype, atol, models, data, tiny_tokenizer, tmp_path):
    """The top blocks run on the cached block-1 output == the full backbone (fp32 storage: rounding only;
    bf16 storage: its 8-bit mantissa, |err| < 0.1 on states of scale ~1)."""
    run_precompute(data=[str(data["base"])], out=str(tmp_path / "f"), backbone=str(models[arch]), max_length=64,
                   sequence_layers=[1], sequence_dtype=dtype, shard_size=5)
    cache = FeatureCache(tmp_path / "f", "tokens", 1)
    full = AutoModel.from_pretrained(models[arch]).eval()
    top = top_layers_model(AutoModel.from_pretrained(models[arch]), 1).eval()
    assert len(top.layers) == 2
    for it in _items(tiny_tokenizer, data["base"], 64):
        ids = torch.tensor([it.input_ids])
        h_in = cache.tokens(_entry(cache, it), 1)
        assert h_in.dtype == getattr(torch, dtype)
        with torch.no_grad():
            want = full(input_ids=ids).last_hidden_state[0]
            got = top(inputs_embeds=h_in[None].float()).last_hidden_state[0]
        torch.testing.assert_close(got, want, atol=atol, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_no_feature_depends_on_later_steps(arch, models, data, tiny_tokenizer, tmp_path):
    """Change the last step's text: every earlier step's features are unchanged, the last one's change."""
    for name in ("base", "later"):
        run_precompute(data=[str(data[name])], out=str(tmp_path / name), backbone=str(models[arch]), max_length=512,
                       layers=[2, 3], batch_tokens=400)
    base, later = FeatureCache(tmp_path / "base"), FeatureCache(tmp_path / "later")
    pairs = list(zip(_items(tiny_tokenizer, data["base"], 512), _items(tiny_tokenizer, data["later"], 512)))
    assert sum(len(a.step_end_idx) >= 2 for a, _ in pairs) >= 4
    for a, b in pairs:
        if not a.step_end_idx:
            continue
        for layer in (2, 3):
            fa, fb = base.states(_entry(base, a), layer), later.states(_entry(later, b), layer)
            torch.testing.assert_close(fa[:-1], fb[:-1], atol=ATOL, rtol=0)
            assert (fa[-1] - fb[-1]).abs().max() > 1e-3


def test_encoder_states_come_from_each_steps_own_prefix(models, data, tiny_tokenizer, tmp_path):
    """A bidirectional encoder's cached state = its prefix encoded alone and mean-pooled; read from a
    whole-trajectory forward instead, the same step's state differs (it would see the later steps)."""
    run_precompute(data=[str(data["base"])], out=str(tmp_path / "f"), backbone=str(models["bert"]), max_length=512,
                   layers=[3])
    cache = FeatureCache(tmp_path / "f")
    assert cache.manifest["causal"] is False and cache.manifest["pooling"] == "mean"
    bert = AutoModel.from_pretrained(models["bert"]).eval()
    leaked = 0
    for it in _items(tiny_tokenizer, data["base"], 512):
        cached = cache.states(_entry(cache, it), 3)
        ids = torch.tensor([it.input_ids])
        with torch.no_grad():
            whole = bert(input_ids=ids).last_hidden_state
        for s, end in enumerate(it.step_end_idx):
            with torch.no_grad():
                h = bert(input_ids=ids[:, : end + 1]).last_hidden_state
            alone = pool_rows(h, torch.ones(1, end + 1), torch.tensor([end]), "mean")[0]
            torch.testing.assert_close(cached[s], alone, atol=ATOL, rtol=0)
            if end + 1 < ids.shape[1]:
                seen_all = pool_rows(whole, torch.ones_like(ids), torch.tensor([end]), "mean")[0]
                leaked += bool((seen_all - alone).abs().max() > 1e-3)
    assert leaked > 0  # the control: a whole-sequence encoder forward does see later tokens


def test_stop_and_resume_equals_one_run(models, data, tmp_path):
    args = dict(data=[str(data["base"])], backbone=str(models["llama"]), max_length=64, layers=[1, 3],
                sequence_layers=[2], reference_logprobs=True, shard_size=3)
    run_precompute(out=str(tmp_path / "one"), **args)
    part = run_precompute(out=str(tmp_path / "two"), limit=2, **args)
    assert not part["complete"] and part["shards_done"] == 2
    with pytest.raises(FeatureCacheError, match="incomplete .2 of 4 shards"):
        FeatureCache(tmp_path / "two")
    (tmp_path / "two" / ".shard-00002.safetensors.tmp-1").write_bytes(b"half a shard")  # a killed write
    rest = run_precompute(out=str(tmp_path / "two"), **args)
    assert rest["complete"] and rest["new_shards"] == 2 and rest["trajectories"] == 10
    assert not list((tmp_path / "two").glob(".*tmp*"))
    for k in range(4):
        a = load_file(str(tmp_path / "one" / f"shard-{k:05d}.safetensors"))
        b = load_file(str(tmp_path / "two" / f"shard-{k:05d}.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    again = run_precompute(out=str(tmp_path / "two"), **args)
    assert again["new_shards"] == 0


def test_refuses_other_settings_unless_overwrite(models, data, tmp_path):
    args = dict(data=[str(data["base"])], out=str(tmp_path / "f"), max_length=64, layers=[1])
    run_precompute(backbone=str(models["llama"]), **args)
    with pytest.raises(ConfigError, match="backbone: .*pass --overwrite true"):
        run_precompute(backbone=str(models["gemma3"]), **args)
    with pytest.raises(ConfigError, match="layers: \\[1\\] there, \\[2\\] now"):
        run_precompute(backbone=str(models["llama"]), **{**args, "layers": [2]})
    with pytest.raises(ConfigError, match="inputs"):
        run_precompute(backbone=str(models["llama"]), **{**args, "data": [str(data["later"])]})
    run_precompute(backbone=str(models["gemma3"]), overwrite=True, **args)
    assert read_manifest(tmp_path / "f")["model_type"] == "gemma3_text"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a features directory"):
        run_precompute(backbone=str(models["llama"]), **{**args, "out": str(tmp_path / "other")})


def test_lookup_miss_names_the_settings(models, data, tiny_tokenizer, tmp_path):
    run_precompute(data=[str(data["base"])], out=str(tmp_path / "f"), backbone=str(models["llama"]), max_length=48,
                   layers=[1])
    cache = FeatureCache(tmp_path / "f", "states", 1)
    other = [it for it in _items(tiny_tokenizer, data["base"], 512) if it.first_step == 0 and len(it.input_ids) > 48]
    batch = collate_trajectories(other[:1], 0)
    with pytest.raises(FeatureCacheError, match="not in the features.*max_length 48"):
        cache.lookup(batch["input_ids"], batch["attention_mask"])
    with pytest.raises(FeatureCacheError, match="holds states of layers \\[1\\], not 2"):
        FeatureCache(tmp_path / "f", "states", 2)
    with pytest.raises(FeatureCacheError, match="--reference_logprobs true"):
        FeatureCache(tmp_path / "f", "ref_logprobs")


def test_cli_errors_are_one_line(models, data, tiny_tokenizer, tmp_path, capsys):
    base = ["--data", f"[{data['base']}]", "--out", str(tmp_path / "f"), "--max_length", "64"]
    for extra, message in (
        (["--backbone", str(models["bert"]), "--layers", "[1]", "--reference_logprobs", "true"],
         "reference_logprobs: .* bidirectional encoder"),
        (["--backbone", str(models["llama"]), "--layers", "[4]"], "layers: \\[4\\] out of range"),
        (["--backbone", str(models["llama"])], "layers: nothing to compute"),
        (["--backbone", str(models["llama"]), "--layers", "[1]", "--pooling", "mean"], "pooling: .* is causal"),
    ):
        with pytest.raises(SystemExit) as e:
            main(base + extra)
        assert e.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("agentrm.precompute: error: ")
        assert re.search(message, last), last
    main(base + ["--backbone", str(models["llama"]), "--layers", "[2]", "--progress", "false"])
    assert "complete; 10 trajectories" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "f" / MANIFEST).read_text())
    kept = sum(len(it.step_end_idx) for it in _items(tiny_tokenizer, data["base"], 64))
    assert manifest["counts"]["states"] == kept and manifest["complete"]
