"""The memory planner against published figures (all within 20%).

Figures compared against:

* Llama-3-8B has 8.03B parameters (Meta's model card lists "8B"; the HF checkpoint's
  safetensors index totals 16.06 GB in bf16, i.e. 8.03B x 2 bytes).  Weights alone in bf16:
  ~16 GB (Hugging Face "Welcome Llama 3" blog: the 8B model needs ~16 GB in 16-bit).
* Full fine-tuning with mixed-precision AdamW costs 16 bytes/param of model states
  (Rajbhandari et al., "ZeRO", SC'20, sec. 3.1: 2 (fp16 params) + 2 (fp16 grads) + 12
  (fp32 master, momentum, variance)) -> 8.03B x 16 = 128.5 GB plus activations.  The same
  paper's Figure 1, 7.5B params on 64 GPUs: 120 GB baseline, 16.6 GB with P_os+g (ZeRO-2),
  1.9 GB with P_os+g+p (ZeRO-3) per device; scaled here by 8.03/7.5.
* LoRA: the frozen base stays 16-bit (2 bytes/param, 16.06 GB) and optimizer state exists
  only for the adapters (Hu et al., "LoRA", 2021, sec. 4.2).
* QLoRA: NF4 with double quantisation stores 4 bits + 0.127 bits/param of constants
  (Dettmers et al., "QLoRA", 2023, sec. 3); for Llama-3-8B that is ~3.6 GB for the decoder
  linears plus the 16-bit embeddings/lm_head, ~5-6 GB in all (the figure bitsandbytes'
  ``get_memory_footprint`` reports for a 4-bit Llama-3-8B, ~5.6-5.7 GB).
"""

from __future__ import annotations

import json

import pytest

from agentrm.paths import PROJECT_ROOT
from agentrm.plan import (
    KNOWN,
    PlanConfig,
    Setup,
    estimate,
    estimate_search,
    fit_setup,
    kv_bytes_per_token,
    main,
    resolve_arch,
    search_config,
    search_setups,
)

LLAMA3_8B = KNOWN["meta-llama/Meta-Llama-3-8B-Instruct"]
RECIPES = PROJECT_ROOT / "configs" / "recipes"
LLAMA = PROJECT_ROOT / "configs" / "models" / "llama3-8b.yaml"
STRATEGIES = PROJECT_ROOT / "configs" / "strategies"


def composed(kind: str, method: str, *more, **flags) -> Setup:
    """The planner's setup of the shipped recipe ``kind`` x ``method`` on Llama-3-8B (+ more configs and fit flags)."""
    files = [str(RECIPES / f"{kind}.yaml"), str(RECIPES / f"{method}.yaml"), str(LLAMA), *map(str, more)]
    args = [x for k, v in flags.items() for x in (f"--{k.replace('__', '.')}", str(v))]
    return fit_setup(PlanConfig(configs=files, fit_args=args))


def within(value: float, published: float, rel: float = 0.2) -> bool:
    return abs(value - published) <= rel * published


def test_param_count_and_bf16_weights():
    assert LLAMA3_8B.params(causal_lm=True) / 1e9 == pytest.approx(8.03, abs=0.01)
    assert within(2 * LLAMA3_8B.params(causal_lm=True) / 1e9, 16.06)


def test_full_finetune_model_states_16_bytes_per_param():
    e = estimate(Setup(LLAMA3_8B, causal_lm=True, mode="full", strategy="single", devices=1))
    assert within(e.model_states, 128.5)
    # the shipped config (value RM, FSDP on 8 GPUs) shards the same 16 bytes/param
    cfg = composed("value_rm", "full")
    sharded = estimate(cfg)
    assert within(sharded.model_states * 8, 16 * sharded.params / 1e9)


@pytest.mark.parametrize(
    "strategy, published_7_5b", [("deepspeed_stage_2", 16.6), ("deepspeed_stage_3", 1.9)]
)
def test_zero_paper_figure_1(strategy, published_7_5b):
    e = estimate(Setup(LLAMA3_8B, causal_lm=True, mode="full", strategy=strategy, devices=64))
    assert within(e.model_states, published_7_5b * 8.03 / 7.5)


def test_lora_and_qlora_weights():
    lora = estimate(composed("value_rm", "lora"))
    qlora = estimate(composed("value_rm", "qlora"))
    assert within(lora.rows["weights"], 16.06)
    assert lora.trainable < 0.01 * lora.params and lora.rows["optimizer states"] < 1
    assert within(qlora.rows["weights"], 5.5)
    assert qlora.total < lora.total < estimate(Setup(LLAMA3_8B, False, "full", "single")).total


def test_activation_checkpointing_and_devices_override(capsys):
    s = composed("value_rm", "lora")
    with_ckpt = estimate(s).rows["activations"]
    s.checkpointing = False
    assert estimate(s).rows["activations"] > 10 * with_ckpt
    (est,) = main(["--config", str(RECIPES / "value_rm.yaml"), "--config", str(RECIPES / "full.yaml"),
                   "--config", str(LLAMA), "--trainer.devices", "2"])
    four = estimate(
        composed("value_rm", "full", trainer__devices=4)
    )
    assert est.rows["optimizer states"] == pytest.approx(2 * four.rows["optimizer states"])
    out = capsys.readouterr().out
    assert "devices=2" in out and "optimizer states" in out and "total" in out


def test_implicit_prm_full_reference_is_bf16_and_sharded():
    s = composed("implicit_prm", "full")
    assert s.separate_reference and s.reference_dtype == "bfloat16" and s.strategy == "fsdp"
    bf16_copy = 2 * LLAMA3_8B.params(causal_lm=True) / 1e9  # 16.06 GB
    one_layer = 2 * LLAMA3_8B.linear_params() / LLAMA3_8B.layers / 1e9
    assert estimate(s).rows["reference model"] == pytest.approx(bf16_copy / 8 + one_layer)
    # the same model replicated by DDP: a whole bf16 copy per GPU, a whole fp32 one without reference_dtype
    ddp = composed("implicit_prm", "full", STRATEGIES / "ddp.yaml")
    assert estimate(ddp).rows["reference model"] == pytest.approx(bf16_copy)
    fp32 = composed("implicit_prm", "full", STRATEGIES / "ddp.yaml", model__init_args__reference_dtype="null")
    assert estimate(fp32).rows["reference model"] == pytest.approx(2 * bf16_copy)
    s = composed("implicit_prm", "lora")
    assert estimate(s).rows["reference model"] == 0  # adapter disabled = the base


def test_arch_from_local_dir(tmp_path):
    cfg = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 100,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    arch = resolve_arch({"backbone": str(tmp_path)})
    assert (
        arch.kv_dim == 32
        and arch.params(causal_lm=False) == 100 * 64 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128) + 5 * 64
    )
    with pytest.raises(ValueError, match="unknown backbone"):
        resolve_arch({"backbone": "someone/not-a-model"})


def test_implicit_prm_host_memory_while_building_counts_the_reference_in_its_dtype():
    """Under FSDP each rank builds the whole model on its host before sharding: the fp32 policy (4P) plus the
    reference read from the weights in bf16 (2P), not a second fp32 copy (the old deepcopy: 8P)."""
    s = composed("implicit_prm", "full")
    e = estimate(s)
    P = LLAMA3_8B.params(causal_lm=True)
    assert e.host_build == pytest.approx((4 * P + 2 * P) / 1e9)
    assert within(e.host_build, 48.2)  # 32.1 GB fp32 policy + 16.1 GB bf16 reference
    lora = estimate(composed("implicit_prm", "lora", STRATEGIES / "fsdp.yaml"))
    assert lora.host_build == pytest.approx(2 * P / 1e9)  # bf16 base, no reference
    ddp = composed("implicit_prm", "full", STRATEGIES / "ddp.yaml")
    assert estimate(ddp).host_build is None  # built on each rank's GPU


SEARCH_8B = PROJECT_ROOT / "configs" / "search" / "llama3-8b_nf4.yaml"


def test_search_plan_counts_weights_scoring_batch_and_the_prefix_cache_budget(capsys):
    cfg = search_config(PlanConfig(configs=[str(SEARCH_8B)]))
    with pytest.raises(ValueError, match=r"scorers\[0\] \(value_rm_8b_nf4\): cannot tell the architecture"):
        search_setups(cfg)  # the exported directory is not here
    (s,) = search_setups(cfg, arch="meta-llama/Meta-Llama-3-8B-Instruct")
    assert kv_bytes_per_token(s.arch) == 128 * 1024  # Llama-3-8B in bf16: 32 layers x 8 kv heads x 128 x 2 x 2
    e = estimate_search(s, gpu_gb=80, reserved_gb=40)  # beside a vLLM server holding half the GPU
    # nf4 linears + bf16 embeddings: the 4-bit causal LM's ~5.65 GB (module doc) less its bf16 lm_head (1.05 GB)
    assert within(e.rows["weights"] + 2 * 128256 * 4096 / 1e9, 5.65, rel=0.1)
    assert e.rows["reference model"] == 0
    assert e.rows["scoring batch KV"] == pytest.approx(s.batch_size * s.max_length * 128 * 1024 / 1e9)
    others = e.total - e.rows["prefix KV cache"]
    assert e.rows["prefix KV cache"] == pytest.approx(0.25 * (40 - others))  # auto: a quarter of what is free
    # an explicit budget is taken as is; an implicit PRM caches (and holds) two models
    cfg["scorers"][0].update(kind="implicit_prm", cache_bytes="2GiB", base="meta-llama/Meta-Llama-3-8B-Instruct")
    (prm,) = search_setups(cfg)
    e2 = estimate_search(prm, gpu_gb=80, reserved_gb=40)
    assert e2.rows["prefix KV cache"] == pytest.approx(2**31 / 1e9)
    assert e2.rows["scoring batch KV"] == pytest.approx(2 * e.rows["scoring batch KV"])
    assert not prm.separate_reference and e2.rows["reference model"] == 0  # a LoRA export: adapter disabled
    main(["--config", str(SEARCH_8B), "--arch", "meta-llama/Meta-Llama-3-8B-Instruct", "--reserved-gb", "40"])
    out = capsys.readouterr().out
    assert "prefix KV cache" in out and "KV per token 128.0 KiB" in out and "fits beside the other processes: yes" in out
    with pytest.raises(SystemExit) as e:
        main(["--config", str(SEARCH_8B)])
    assert e.value.code == 2 and "llama3-8b_nf4.yaml: scorers[0]" in capsys.readouterr().err.splitlines()[-1]


def test_search_plan_reads_a_local_export(tmp_path):
    """A full implicit-PRM export records its reference as separate: the planner counts it."""
    cfg = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 100}
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "agentrm_config.json").write_text(json.dumps({"model_class": "ImplicitPRM", "reference": "separate"}))
    (s,) = search_setups({"scorers": [{"kind": "implicit_prm", "path": str(tmp_path), "dtype": "float32",
                                       "cache_bytes": 1000, "max_length": 64}]})
    e = estimate_search(s, gpu_gb=1)
    assert s.separate_reference and e.rows["reference model"] == e.rows["weights"] == 4 * s.arch.params(True) / 1e9
    assert kv_bytes_per_token(s.arch, 4) == 2 * 2 * 32 * 4 and e.rows["prefix KV cache"] == 1000 / 1e9
