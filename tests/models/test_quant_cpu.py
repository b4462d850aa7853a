"""nf4 / int8 on the CPU through bitsandbytes' CPU backend, end to end: loading, QLoRA fit steps of both
reward models through ``python -m agentrm.fit``'s entry point, and nf4 scoring in ``agentrm.search``.

The base is a 2-layer LLaMA (random weights, the tiny tokenizer's vocabulary) saved as a checkpoint, since
quantisation loads pretrained weights. CPU compute is fp32 (the placement default on CPU).
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from agentrm.data.schema import write_jsonl
from agentrm.data.tiny_tokenizer import train_tiny_tokenizer, trajectory_texts
from agentrm.models import quant
from agentrm.models.backbone import build_backbone
from agentrm.models.placement import resolve_placement
from agentrm.models.quant import QuantizationUnavailable
from tests.lit.conftest import learnable_trajectories

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is a dependency: pip install -e .")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU placement a CPU-only host gets")
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
BASE = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}
LAYERS = {"nf4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """``(base_dir, data_path)``: the tokenizer and a random 2-layer LLaMA checkpoint, and training data."""
    tmp = tmp_path_factory.mktemp("quant_cpu")
    trajs = learnable_trajectories(64)
    write_jsonl(tmp / "train.jsonl", trajs)
    tok = train_tiny_tokenizer(trajectory_texts(trajs), vocab_size=300)
    torch.manual_seed(0)
    build_backbone(config=BASE, vocab_size=len(tok), causal_lm=True).save_pretrained(tmp / "base")
    tok.save_pretrained(tmp / "base")
    return tmp / "base", tmp / "train.jsonl"


def _mapped(path: Path) -> bool:
    """Whether this process has ``path`` memory-mapped."""
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_causal_lm_loads_quantised_on_cpu_with_full_precision_heads(setup, scheme, caplog):
    base, _ = setup
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # (no graph that would keep the fp32 model, hence its memory map, alive)
        ref = build_backbone(str(base), causal_lm=True, device="cpu")(input_ids=ids).logits
    gc.collect()
    model = build_backbone(str(base), causal_lm=True, quantization=scheme, device="cpu")
    gc.collect()
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LAYERS[scheme]) and q_proj.weight.dtype in (torch.uint8, torch.int8)
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    # the unquantised tensors were copied out of the checkpoint's memory map (else the file stays resident)
    assert not _mapped(base / "model.safetensors")
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        model(input_ids=ids)
    # LLM.int8 logs its fp16 cast on every layer's every forward: once is kept
    casts = [r for r in caplog.records if "inputs will be cast" in r.getMessage()]
    assert len(casts) == (1 if scheme == "int8" else 0)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    err = (logits - ref).abs().max() / ref.abs().max()
    print(f"{scheme}: max |dlogit| / max |logit| = {err:.4f}")
    assert err < (0.3 if scheme == "nf4" else 0.05)  # (another random model: ~1.4)


@no_cuda
def test_placement_puts_quantised_models_on_the_cpu():
    p = resolve_placement(quantization="nf4", what="scorers[0]")
    assert (p.device, p.dtype, p.quantization) == (torch.device("cpu"), torch.float32, "nf4")
    kwargs = quant.quantized_load_kwargs("int8", device="cpu")
    assert kwargs["device_map"] == {"": "cpu"} and kwargs["quantization_config"].load_in_8bit
    assert quant.quantized_load_kwargs("nf4")["quantization_config"].bnb_4bit_compute_dtype == torch.float32


def test_devices_without_a_backend_and_old_bitsandbytes_are_refused(monkeypatch):
    with pytest.raises(QuantizationUnavailable, match=r"^policy: quantization='nf4' runs on a CUDA GPU or the CPU"):
        resolve_placement(device="mps", quantization="nf4", what="policy")
    monkeypatch.setattr(quant.importlib.metadata, "version", lambda name: "0.45.5")
    with pytest.raises(QuantizationUnavailable, match=r"needs bitsandbytes >= 0\.48 .* found 0\.45"):
        quant.check_quantization("int8", "cpu")


def _fit_config(tmp: Path, base: Path, data: Path, module: str, extra: dict) -> Path:
    run = tmp / "run"
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": 4, "max_epochs": 1,
            "default_root_dir": str(run), "enable_progress_bar": False, "enable_checkpointing": False,
            "log_every_n_steps": 1, "num_sanity_val_steps": 0, "limit_val_batches": 0,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(run), "name": "logs"}},
            "callbacks": [{"class_path": "agentrm.lit.callbacks.ExportHF",
                           "init_args": {"dirpath": str(run / "hf_model")}},
                          {"class_path": f"{__name__}.RecordLoraAtStart"}],
        },
        "model": {"class_path": module,
                  "init_args": {"backbone": str(base), "quantization": "nf4", "lora": LORA,
                                "learning_rate": 1e-2, "warmup_steps": 0, **extra}},
        "data": {"train_path": str(data), "tokenizer": str(base), "val_fraction": 0.25, "max_length": 512,
                 "batch_size": 4},
    }
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _lora_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


class RecordLoraAtStart(L.Callback):
    """Keeps the LoRA weights as training starts (in :data:`AT_START`), to show that the steps changed them."""

    def on_train_start(self, trainer, pl_module):
        AT_START.clear()
        AT_START.update(_lora_weights(pl_module.model))


AT_START: dict[str, torch.Tensor] = {}


def _qlora_fit(tmp: Path, base: Path, data: Path, module: str, extra: dict):
    """Run ``agentrm.fit`` on an nf4 base with LoRA for 4 steps; return the CLI object."""
    from agentrm.fit import main

    return main(["--config", str(_fit_config(tmp, base, data, module, extra))])


@pytest.fixture(scope="module")
def value_fit(setup, tmp_path_factory):
    """A value RM trained 4 QLoRA steps on the nf4 base (CPU): ``(cli, LoRA weights at the start, run dir)``."""
    base, data = setup
    tmp = tmp_path_factory.mktemp("value_qlora")
    cli = _qlora_fit(tmp, base, data, "agentrm.lit.value_module.ValueRMModule", {"loss": "bce"})
    return cli, dict(AT_START), tmp / "run"


def test_qlora_fit_step_of_a_value_rm_on_cpu_and_nf4_reload(setup, value_fit):
    from agentrm.data.collate import collate_trajectories
    from agentrm.models.value_rm import ValueRewardModel

    base, _ = setup
    cli, start, run = value_fit
    model = cli.model.model
    assert cli.trainer.global_step == 4
    assert isinstance(model.backbone.base_model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    end = _lora_weights(model)
    assert start.keys() == end.keys() and len(end) == 2 * 4 * 2  # A and B, 4 targets, 2 layers
    assert any(not torch.equal(start[n], end[n]) for n in end)  # the adapter trained
    assert not any(p.requires_grad for n, p in model.backbone.named_parameters() if "lora_" not in n)
    out = run / "hf_model"
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    assert json.loads((out / "agentrm_config.json").read_text())["base_model"] == str(base)
    # the export reloads in nf4 on the CPU and scores like the trained model
    items = cli.datamodule.train_items[:4]
    batch = collate_trajectories(items, cli.datamodule.tokenizer.pad_token_id)
    model.eval()
    trained = model.score(batch)
    reloaded = ValueRewardModel.from_pretrained(out, quantization="nf4", device="cpu").eval()
    assert isinstance(reloaded.backbone.base_model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    assert all(torch.equal(w, _lora_weights(reloaded)[n]) for n, w in end.items())
    # not bit-equal: on CPUs with AVX512-BF16, bitsandbytes repacks an nf4 weight into a CPU layout with bf16
    # block scales at its first inference forward, and the trained model went through training layouts first
    torch.testing.assert_close(reloaded.score(batch), trained, equal_nan=True, atol=2e-3, rtol=0)


def test_nf4_scorer_in_search_against_the_fp32_choices(value_fit, tmp_path):
    """The evaluation harness with the same exported RM loaded in fp32 and in nf4, side by side on the same
    episodes (shared candidate pools): the choices compared row by row; the disagreement rate is printed."""
    from agentrm.search.evaluate import EvalConfig, evaluate
    from agentrm.search.specs import PolicySpec, ScorerSpec

    _, _, run = value_fit
    path = str(run / "hf_model")
    rows = evaluate(EvalConfig(
        out_dir=str(tmp_path / "eval"), held_in=["babyai:GoToRedBall?max_steps=8"], episodes=3,
        policy=PolicySpec(kind="expert", error_rate=0.5),
        scorers=[ScorerSpec(path=path, name="fp32", device="cpu"),
                 ScorerSpec(path=path, name="nf4", device="cpu", quantization="nf4")],
        greedy=False, best_of_n=[4], beam=[(2, 2)], concurrency=2, progress=False, show=False, num_threads=1,
    ))
    assert {r["scorer"] for r in rows} >= {"fp32", "nf4"}
    episodes = [json.loads(x) for x in (tmp_path / "eval" / "episodes.jsonl").read_text().splitlines()]
    by = {(e["method"], e["scorer"], e["n"], e["episode"]): e for e in episodes if e["scorer"] in ("fp32", "nf4")}
    pairs = [(e, by[(m, "nf4", n, ep)]) for (m, s, n, ep), e in by.items() if s == "fp32"]
    assert len(pairs) == 2 * 3  # Best-of-4 and beam (2, 2), 3 episodes
    assert all(q["tokens_scored"] > 0 for _, q in pairs)
    differ = [(f["method"], f["episode"]) for f, q in pairs if f["actions"] != q["actions"]]
    print(f"nf4 vs fp32 scorer in agentrm.search: {len(differ)} of {len(pairs)} episodes chose differently {differ}")
    # a 4-step RM separates candidates by little, so nf4's noise can flip a close call (measured: 1 of 6,
    # a beam episode, on the 2-core CI machine); most choices must still be the fp32 ones
    assert len(differ) <= len(pairs) // 3, differ


def test_nf4_candidate_scores_rank_as_fp32(value_fit):
    """Candidate scores from the nf4 and fp32 scorers (built as the search builds them) on training prefixes:
    the largest difference, and how many candidate pairs the two order the same way."""
    from agentrm.data.schema import Trajectory, read_jsonl
    from agentrm.search.build import build_scorer
    from agentrm.search.resolve import resolve_scorer
    from agentrm.search.specs import ScorerSpec

    cli, _, run = value_fit
    path = str(run / "hf_model")
    fp32, nf4 = (build_scorer(resolve_scorer(ScorerSpec(path=path, device="cpu", quantization=q), "s"))
                 for q in (None, "nf4"))
    trajs = [t for t in read_jsonl(cli.datamodule.hparams.train_path) if len(t.steps) >= 2][:8]
    cands = list({(s.action, s.observation): s for t in read_jsonl(cli.datamodule.hparams.train_path)
                  for s in t.steps}.values())[:8]
    a, b = [], []
    for t in trajs:
        prefix = Trajectory(t.id, t.task, t.instruction, t.steps[:-1], t.reward, t.success)
        a.append(fp32.score_candidates(prefix, cands))
        b.append(nf4.score_candidates(prefix, cands))
    a, b = torch.stack(a), torch.stack(b)  # [prefixes, candidates]
    gap_a = a[:, :, None] - a[:, None, :]
    gap_b = b[:, :, None] - b[:, None, :]
    ordered = gap_a.abs() > 1e-3
    agree = float(((gap_a > 0) == (gap_b > 0))[ordered].float().mean())
    worst = float((a - b).abs().max())
    print(f"nf4 vs fp32 candidate scores ({a.numel()}): max |diff| {worst:.4f}, fp32 spread {float(a.std()):.3f}; "
          f"candidate pairs ordered alike {agree:.3f}")
    assert worst < 0.1 and agree > 0.85


def test_qlora_fit_step_of_an_implicit_prm_on_cpu(setup, tmp_path):
    from agentrm.models.implicit_prm import ImplicitPRM

    base, data = setup
    cli = _qlora_fit(tmp_path, base, data, "agentrm.lit.prm_module.ImplicitPRMModule", {"beta": 0.5})
    start = dict(AT_START)
    prm = cli.model.model
    assert cli.trainer.global_step == 4 and prm.reference is None  # the reference is the adapter disabled
    layer = prm.policy.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
    assert type(prm.policy.base_model.model.lm_head) is torch.nn.Linear  # log-probs from a full-precision head
    end = _lora_weights(prm)
    assert start.keys() == end.keys() and any(not torch.equal(start[n], end[n]) for n in end)
    out = tmp_path / "run" / "hf_model"
    assert (out / "policy" / "adapter_config.json").exists()
    reloaded = ImplicitPRM.from_pretrained(out, quantization="nf4", device="cpu")
    assert isinstance(reloaded.policy.base_model.model.model.layers[0].self_attn.q_proj.base_layer,
                      bnb.nn.Linear4bit)
    assert all(torch.equal(w, _lora_weights(reloaded)[n]) for n, w in end.items())


def qlora_losses(base: Path, scheme: str, causal_lm: bool, device: str, steps: int = 5) -> list[float]:
    """Losses of ``steps`` LoRA steps on a ``scheme`` base: the value RM (MSE on step values) or the implicit PRM
    (BCE of the outcome logit), on ``device`` (CUDA: bf16 autocast, the mixed bf16/fp32 log-ratio path)."""
    import torch.nn.functional as F
    from peft import prepare_model_for_kbit_training

    from agentrm.lit.trainable import apply_lora
    from agentrm.models.implicit_prm import ImplicitPRM
    from agentrm.models.value_rm import ValueRewardModel

    torch.manual_seed(0)
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (4, 64), device=device)
    token_step = torch.full_like(ids, -1)
    token_step[:, 10:20], token_step[:, 30:31], token_step[:, 40:60] = 0, 1, 2
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_step": token_step,
             "step_end_idx": torch.tensor([[25, 35, 63]] * 4, device=device),
             "step_mask": torch.ones(4, 3, dtype=torch.bool, device=device),
             "success": torch.tensor([1.0, 0.0, 1.0, 0.0], device=device)}
    targets = torch.rand(4, 3, device=device)
    bb = build_backbone(str(base), causal_lm=causal_lm, quantization=scheme, device=device,
                        dtype="bfloat16" if device.startswith("cuda") else None)
    bb = prepare_model_for_kbit_training(bb, use_gradient_checkpointing=True)
    lora = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    wrap = ImplicitPRM if causal_lm else ValueRewardModel
    model = wrap(apply_lora(bb, lora, "CAUSAL_LM" if causal_lm else "FEATURE_EXTRACTION")).to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(steps):
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            if causal_lm:
                logits = model.outcome_logits(model.step_rewards(batch), batch["step_mask"])
                loss = F.binary_cross_entropy_with_logits(logits, batch["success"])
            else:
                loss = F.mse_loss(model(batch["input_ids"], batch["attention_mask"], batch["step_end_idx"]), targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize("causal_lm", [False, True], ids=["value_rm", "implicit_prm"])
def test_qlora_steps_lower_the_loss_on_cpu(setup, scheme, causal_lm):
    base, _ = setup
    losses = qlora_losses(base, scheme, causal_lm, "cpu")
    assert all(x == x for x in losses) and losses[-1] < losses[0], losses
