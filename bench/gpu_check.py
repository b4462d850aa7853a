"""GPU smoke checks: ``python bench/gpu_check.py``.

1. the GPU-only tests (``pytest -m gpu``);
2. a QLoRA training step: a 2-layer LLaMA built from a config, saved locally, loaded in
   nf4 (bitsandbytes), LoRA on top, value head in fp32: forward, backward, AdamW step;
3. 4-bit inference: the same checkpoint loaded in nf4 vs bf16, scoring agreement and memory.

Prints a table.  Without CUDA (or without bitsandbytes) it says so and exits 0.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _tiny_llama(d: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=2048,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    return d


def _batch(vocab: int = 2048) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (4, 128), device="cuda")
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "step_end_idx": torch.tensor([[31, 63, 127]] * 4, device="cuda"),
    }


def check_pytest() -> tuple[str, str]:
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"], cwd=ROOT, capture_output=True, text=True
    )
    tail = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    return ("ok" if proc.returncode == 0 else "FAIL"), f"{tail} ({time.perf_counter() - t:.1f}s)"


def check_qlora_step(model_dir: Path) -> tuple[str, str]:
    from peft import prepare_model_for_kbit_training

    from agentrm.lit.trainable import apply_lora
    from agentrm.models.backbone import build_backbone
    from agentrm.models.value_rm import ValueRewardModel

    torch.cuda.reset_peak_memory_stats()
    bb = build_backbone(str(model_dir), quantization="nf4", dtype="bfloat16")
    bb = prepare_model_for_kbit_training(bb, use_gradient_checkpointing=True)
    bb = apply_lora(
        bb,
        {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "FEATURE_EXTRACTION",
    )
    model = ValueRewardModel(bb).cuda().train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    batch, target = _batch(), torch.rand(4, 3, device="cuda")
    losses = []
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            raw = model(batch["input_ids"], batch["attention_mask"], batch["step_end_idx"])
        loss = torch.nn.functional.mse_loss(raw.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    ok = all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    peak = torch.cuda.max_memory_allocated() / 2**20
    return (
        "ok" if ok else "FAIL"
    ), f"loss {losses[0]:.4f} -> {losses[-1]:.4f}, {len(trainable)} trainable tensors, peak {peak:.0f} MiB"


def check_4bit_inference(model_dir: Path) -> tuple[str, str]:
    from agentrm.models.backbone import build_backbone
    from agentrm.models.implicit_prm import final_hidden

    batch = _batch()
    ref = build_backbone(str(model_dir), causal_lm=True, dtype="bfloat16").cuda().eval()
    q = build_backbone(str(model_dir), causal_lm=True, quantization="nf4", dtype="bfloat16").eval()
    with torch.no_grad():
        h_ref = final_hidden(ref, batch["input_ids"], batch["attention_mask"]).float()
        h_q = final_hidden(q, batch["input_ids"], batch["attention_mask"]).float()
    cos = torch.nn.functional.cosine_similarity(h_ref.flatten(1), h_q.flatten(1)).min().item()
    mem_ref, mem_q = ref.get_memory_footprint() / 2**20, q.get_memory_footprint() / 2**20
    ok = cos > 0.9 and mem_q < mem_ref
    return (
        "ok" if ok else "FAIL"
    ), f"hidden cos {cos:.3f} vs bf16; footprint {mem_q:.1f} vs {mem_ref:.1f} MiB"


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; nothing to check (skipped).")
        return 0
    if importlib.util.find_spec("bitsandbytes") is None:
        print("gpu_check: bitsandbytes is not installed (pip install 'agentrm[quant]'); skipped.")
        return 0
    sys.path.insert(0, str(ROOT))
    rows = [("pytest -m gpu", *check_pytest())]
    with tempfile.TemporaryDirectory() as tmp:
        d = _tiny_llama(Path(tmp) / "llama2l")
        for name, fn in (
            ("QLoRA train step (nf4)", check_qlora_step),
            ("4-bit inference", check_4bit_inference),
        ):
            try:
                rows.append((name, *fn(d)))
            except Exception as e:  # report and continue with the next check
                rows.append((name, "FAIL", f"{type(e).__name__}: {e}"[:200]))
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    w = max(len(r[0]) for r in rows)
    print(f"{'check':{w}s}  status  detail")
    for name, status, detail in rows:
        print(f"{name:{w}s}  {status:6s}  {detail}")
    return 0 if all(r[1] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
