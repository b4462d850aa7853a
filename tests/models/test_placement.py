"""Device, dtype, quantisation and attention are checked and defaulted before anything loads; models are
checked to be reachable before anything is fetched."""

from __future__ import annotations

import time

import pytest
import torch

from agentrm.models import backbone as backbone_mod
from agentrm.models.backbone import build_backbone, pick_attn_implementation
from agentrm.models.placement import DeviceUnavailable, resolve_device, resolve_placement
from agentrm.models.quant import QuantizationUnavailable
from agentrm.models.value_rm import ValueRewardModel
from agentrm.paths import ModelUnreachable, check_model_reachable, load_tokenizer
from tests.lit.conftest import TINY_BACKBONE

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


@no_cuda
def test_defaults_without_cuda_are_cpu_fp32_sdpa():
    p = resolve_placement()
    assert (p.device, p.dtype, p.quantization, p.attn_implementation) == (torch.device("cpu"), torch.float32, None, "sdpa")
    assert p.load_kwargs() == {"device": torch.device("cpu"), "dtype": torch.float32, "quantization": None,
                               "attn_implementation": "sdpa"}


def test_defaults_with_cuda_are_bf16_on_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    p = resolve_placement(attn_implementation="eager")
    assert p.device == torch.device("cuda", 1) and p.dtype == torch.bfloat16
    cpu = resolve_placement(device="cpu")  # an explicit CPU placement on a GPU host stays fp32
    assert cpu.device == torch.device("cpu") and cpu.dtype == torch.float32
    with pytest.raises(DeviceUnavailable, match="only 2 CUDA device"):
        resolve_placement(device="cuda:5", what="scorers[0]")


@no_cuda
def test_cuda_and_quantization_without_cuda_fail_naming_the_field():
    with pytest.raises(DeviceUnavailable, match=r"scorers\[0\]\.device='cuda:0' but no CUDA GPU"):
        resolve_placement(device="cuda:0", what="scorers[0]")
    # nf4/int8 run on the CPU too (bitsandbytes' CPU backend, tests/models/test_quant_cpu.py); other devices fail
    assert resolve_placement(quantization="nf4", what="policy").device == torch.device("cpu")
    with pytest.raises(QuantizationUnavailable, match=r"^policy: quantization='int8' runs on a CUDA GPU or the CPU"):
        resolve_placement(device="mps", quantization="int8", what="policy")


def test_bad_values_fail_naming_the_field(monkeypatch):
    with pytest.raises(ValueError, match=r"judge\.dtype: unknown dtype 'bf17'"):
        resolve_placement(device="cpu", dtype="bf17", what="judge")
    with pytest.raises(ValueError, match=r"m\.attn_implementation='flash'"):
        resolve_placement(device="cpu", attn_implementation="flash", what="m")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_placement(device="cpu", attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="quantization must be one of"):
        resolve_placement(device="cpu", quantization="nf3")
    with pytest.raises(ValueError, match="is not a device"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # an explicit CPU placement on a GPU host
    assert resolve_placement(device="cpu", quantization="nf4").device == torch.device("cpu")


def test_auto_attention_follows_the_model_device(monkeypatch):
    monkeypatch.setattr(backbone_mod.importlib.util, "find_spec", lambda name: object())  # flash-attn "installed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_attn_implementation("auto", "cuda:0") == "flash_attention_2"
    assert pick_attn_implementation("auto", "cpu") == "sdpa"  # a CPU model on a GPU host
    assert pick_attn_implementation("auto") == "flash_attention_2"


def test_value_rm_loads_in_the_requested_dtype_and_scores(tmp_path):
    tok = load_tokenizer("agentrm/assets/tiny_tokenizer")
    torch.manual_seed(0)
    d = ValueRewardModel(build_backbone(config=TINY_BACKBONE, vocab_size=len(tok))).save_pretrained(tmp_path / "rm", tok)
    batch = {"input_ids": torch.randint(0, len(tok), (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long),
             "step_end_idx": torch.tensor([[3, 11], [5, -1]])}
    ref = ValueRewardModel.from_pretrained(d, **resolve_placement(device="cpu").load_kwargs())
    half = ValueRewardModel.from_pretrained(d, **resolve_placement(device="cpu", dtype="bf16").load_kwargs())
    assert next(ref.backbone.parameters()).dtype == torch.float32
    assert next(half.backbone.parameters()).dtype == torch.bfloat16
    assert half.value_head.weight.device == next(half.backbone.parameters()).device
    a, b = ref.score(batch), half.score(batch)
    assert torch.isnan(b[1, 1]) and torch.allclose(a[~torch.isnan(a)], b[~torch.isnan(b)], atol=0.05)


def test_reachable_local_known_and_missing(tmp_path):
    check_model_reachable("agentrm/assets/tiny_tokenizer")
    check_model_reachable("smollm2-135m-instruct")  # known: imported on first use
    check_model_reachable(tmp_path)
    with pytest.raises(ModelUnreachable, match=r"backbone '.*/nope/deeper/dir': no such file or directory"):
        check_model_reachable(tmp_path / "nope" / "deeper" / "dir", "backbone")


def test_hub_id_offline_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ModelUnreachable, match="HF_HUB_OFFLINE is set"):
        load_tokenizer("agentrm-tests/not-a-cached-model")
    assert time.perf_counter() - t0 < 2


def test_hub_id_with_hub_unreachable_fails_after_one_request(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    t0 = time.perf_counter()
    with pytest.raises(ModelUnreachable, match=r"http://127\.0\.0\.1:9 cannot be reached"):
        check_model_reachable("agentrm-tests/not-a-cached-model", "model.backbone")
    assert time.perf_counter() - t0 < 6


def test_hub_id_in_the_cache_passes_offline(monkeypatch, tmp_path):
    from huggingface_hub import constants

    repo = tmp_path / "models--agentrm-tests--cached"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check_model_reachable("agentrm-tests/cached")
    with pytest.raises(ModelUnreachable):
        check_model_reachable("agentrm-tests/uncached")
