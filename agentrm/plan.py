"""``python -m agentrm.plan --config CONFIG.yaml [--trainer.devices 8]``: estimate GPU memory per device.

Reads a fit config through the fit CLI's own parser (several ``--config`` compose, and any fit flag such as
``--trainer.devices 8`` applies, exactly as in ``agentrm.fit``: a mistyped key is refused in one line), the model's
architecture (a built-in table of well-known models, a local HF directory's
``config.json``, or the config's ``backbone_config``; never the hub) and prints, per
device: weights, gradients, optimizer states, a separate frozen reference (implicit PRM,
full training), activations and a fixed CUDA-context allowance; under FSDP also the host
memory each process needs while it builds the model, before FSDP shards it.

Given a search config (one with ``scorers:``, e.g. ``configs/search/llama3-8b_nf4.yaml``; read as
``agentrm.search`` reads it) it prints,
per locally loaded RM scorer: weights, a separate reference (implicit PRM), the prefix KV cache's
byte budget (``cache_bytes``, or the automatic one: :data:`agentrm.scoring.cache.AUTO_CUDA_FRACTION`
of the memory free on the GPU) and the keys/values of one scoring batch (see :func:`estimate_search`).

Accounting (bytes per parameter ``P``, ``N`` = devices x nodes):

* full, torch AMP (``bf16-mixed``, DDP/FSDP): fp32 weights 4P, fp32 grads 4P, AdamW m+v 8P
  (= 16P, the mixed-precision figure of the ZeRO paper); DeepSpeed bf16: bf16 weights 2P,
  grads 2P, fp32 master + m + v 12P.  DDP replicates all; ZeRO-2 shards grads+optimizer;
  FSDP / ZeRO-3 shard everything (FSDP adds one unsharded bf16 decoder layer in flight).
* LoRA: frozen base in its dtype (bf16: 2P) + fp32 adapters at 16 bytes/trainable param.
* implicit PRM, full training: the frozen reference is a submodule in ``reference_dtype`` (else the
  policy's ``dtype``): 2P in bf16, 4P in fp32; FSDP / ZeRO-3 shard it like the policy (FSDP adds one of
  its decoder layers gathered in flight), DDP / ZeRO-2 replicate it. With LoRA it is the base with the
  adapter disabled: no extra memory. It is read from the policy's weights path in its own dtype
  (:func:`agentrm.models.implicit_prm.load_reference`), so building it costs its own bytes, never an
  fp32 copy of the policy: under FSDP (Lightning builds the whole model on every rank's host before
  sharding) the host peak per process is the policy in ``dtype`` plus the reference in its dtype.
* QLoRA: linear layers in NF4 with double quantisation, 4 + 0.127 bits/param (QLoRA paper);
  the rest (embeddings, norms, ``lm_head``) upcast to fp32 by ``prepare_model_for_kbit_training``.
* activations per token per decoder layer, 16-bit, flash/SDPA attention (no ``s^2`` term):
  ``2*(7h + 3h_kv + 4I)`` bytes (norm inputs, q/k/v and rotated q/k, attention output,
  SwiGLU gate/up/act/product; after Korthikanti et al. 2022, adapted to GQA + SwiGLU);
  with activation checkpointing only each layer's input (2h) is kept, plus one layer's
  full activations during recomputation.
"""


from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agentrm.checks import at_least, fail
from agentrm.cli_config import parse_config
from agentrm.cli_errors import BuildError, run_cli
from agentrm.models.memory import (
    GB,
    KNOWN,
    Arch,
    Estimate,
    ScorerSetup,
    Setup,
    _dtype_bytes,
    estimate,
    estimate_search,
    kv_bytes_per_token,
    resolve_arch,
)

PLAN_FLAGS = ("--arch", "--gpu_gb", "--reserved_gb")


@dataclass
class PlanConfig:
    """``python -m agentrm.plan``: estimate GPU memory per device for a fit config (or a search config's scorers).

    Attributes:
        configs: the config files (``--config``, repeatable): fit configs composed in order, or one search config.
        fit_args: the fit CLI's own flags applied after them (``--trainer.devices 8``), checked by its parser.
        arch: search: the RM's architecture when its directory is not here (a known name or a local directory).
        gpu_gb: search: the GPU's memory.
        reserved_gb: search: GB of that GPU held by other processes (a policy server).
    """

    configs: list[str] = field(default_factory=list)
    fit_args: list[str] = field(default_factory=list)
    arch: str | None = None
    gpu_gb: float = 80.0
    reserved_gb: float = 0.0

    def __post_init__(self) -> None:
        if not self.configs:
            fail("config", "give a fit config (or several, composed) or a search config: --config FILE")
        at_least(self.gpu_gb, 1.0, "gpu_gb")
        at_least(self.reserved_gb, 0.0, "reserved_gb")
        if self.reserved_gb >= self.gpu_gb:
            fail("reserved_gb", f"{self.reserved_gb} GB held by others leaves nothing of a {self.gpu_gb} GB GPU")

    @property
    def is_search(self) -> bool:
        """A search config: one file with ``scorers:``."""
        from jsonargparse import get_loader

        text = Path(self.configs[0]).read_text() if Path(self.configs[0]).is_file() else ""
        return len(self.configs) == 1 and "scorers" in (get_loader("yaml")(text) or {})

def _strategy_name(strategy: Any) -> str:
    if strategy is None or strategy == "auto":
        return "single"
    if isinstance(strategy, str):
        s = strategy.lower()
        if "deepspeed" in s:
            return "deepspeed_stage_3" if "3" in s else "deepspeed_stage_2"
        return "fsdp" if "fsdp" in s else "ddp"
    cls = strategy.get("class_path", "")
    if cls.endswith("FSDPStrategy"):
        return "fsdp"
    if cls.endswith("DeepSpeedStrategy"):
        return f"deepspeed_stage_{strategy.get('init_args', {}).get('stage', 2)}"
    return "ddp"


def setup_from_config(cfg: dict[str, Any]) -> Setup:
    """Read a (merged) fit config dict into a :class:`Setup`."""
    trainer, model, data = cfg.get("trainer", {}), cfg.get("model", {}), cfg.get("data", {})
    margs = model.get("init_args", {})
    devices = trainer.get("devices", 1)
    if isinstance(devices, str):  # the fit parser keeps "4" (devices: list | str | int) as a string
        devices = int(devices) if devices.strip().lstrip("-").isdigit() else 1  # "auto": one per process here
    devices = devices if isinstance(devices, int) else len(devices) if isinstance(devices, list) else 1
    if devices < 1:
        fail("trainer.devices", f"must be >= 1 (or a list of device ids) to plan memory per device, got {devices}")
    at_least(trainer.get("num_nodes", 1) or 1, 1, "trainer.num_nodes")
    n = devices * int(trainer.get("num_nodes", 1) or 1)
    strategy = _strategy_name(trainer.get("strategy"))
    if strategy == "single" and n > 1:
        strategy = "ddp"
    lora = margs.get("lora")
    mode = "qlora" if margs.get("quantization") else "lora" if lora else "full"
    causal = "prm" in model.get("class_path", "").lower()
    fsdp_ckpt = (
        strategy == "fsdp"
        and bool((trainer.get("strategy") or {}).get("init_args", {}).get("activation_checkpointing_policy"))
        if isinstance(trainer.get("strategy"), dict)
        else False
    )
    return Setup(
        arch=resolve_arch(margs),
        causal_lm=causal,
        mode=mode,
        strategy=strategy,
        devices=n,
        precision=str(trainer.get("precision", "32-true")),
        dtype=margs.get("dtype"),
        lora_r=int((lora or {}).get("r", 8)),
        lora_targets=(lora or {}).get("target_modules"),
        batch_size=int(data.get("batch_size", 8)),
        max_length=int(data.get("max_length", 1024)),
        checkpointing=bool(margs.get("gradient_checkpointing")) or fsdp_ckpt,
        separate_reference=causal and not lora,
        reference_dtype=margs.get("reference_dtype"),
    )


def format_table(s: Setup, e: Estimate) -> str:
    lines = [
        f"{s.arch.name}  {'implicit PRM' if s.causal_lm else 'value RM'}  mode={s.mode}  strategy={s.strategy}  "
        f"devices={s.devices}  precision={s.precision}",
        f"params {e.params / 1e9:.2f}B  trainable {e.trainable / 1e6:.1f}M  "
        f"micro-batch {s.batch_size} x {s.max_length} tokens  activation checkpointing={s.checkpointing}",
        f"{'component':26s} {'GB/device':>10s}",
    ]
    lines += [f"{k:26s} {v:10.2f}" for k, v in e.rows.items()]
    lines.append(f"{'total':26s} {e.total:10.2f}")
    for gpu, cap in (("A100/H100 80GB", 80), ("H200 141GB", 141)):
        lines.append(f"fits {gpu}: {'yes' if e.total <= 0.95 * cap else 'no'}")
    if e.host_build is not None:
        ref = " (the reference read from the weights in its own dtype)" if s.separate_reference else ""
        lines.append(f"host memory per process while building, before FSDP shards: {e.host_build:.2f} GB{ref}")
    return "\n".join(lines)


def _scorer_arch(sc: dict[str, Any], where: str, override: str | None) -> tuple[Arch, dict[str, Any]]:
    """The architecture of a scorer's model (``--arch``, ``base``, or what its directory records) and the
    directory's ``agentrm_config.json`` (``{}`` when absent)."""
    path = Path(sc.get("path") or "")
    meta_file = path / "agentrm_config.json"
    meta = json.loads(meta_file.read_text()) if sc.get("path") and meta_file.exists() else {}
    names = [override, sc.get("base"), meta.get("base_model")]
    names = [n for n in names if n] + [str(d) for d in (path, path / "policy", path / "base") if sc.get("path")]
    for name in names:
        if name in KNOWN or (Path(name) / "config.json").exists():
            return resolve_arch({"backbone": name}), meta
        if (path / name / "config.json").exists():  # a base recorded relative to the directory
            return resolve_arch({"backbone": str(path / name)}), meta
    raise ValueError(f"{where}: cannot tell the architecture of {sc.get('path')!r} (not a local model directory, "
                     f"no known base); pass --arch NAME (one of {sorted(KNOWN)}) or a local model directory")


def search_setups(cfg: dict[str, Any], arch: str | None = None) -> list[ScorerSetup]:
    """The value-RM / implicit-PRM scorers of a search config (judges and oracles load no RM)."""
    from agentrm.search.specs import ScorerSpec

    defaults = ScorerSpec()
    out = []
    for i, sc in enumerate(cfg.get("scorers") or []):
        kind = sc.get("kind", defaults.kind)
        if kind not in ("value_rm", "implicit_prm"):
            continue
        where = f"scorers[{i}] ({sc.get('name') or kind})"
        a, meta = _scorer_arch(sc, where, arch)
        prm = kind == "implicit_prm"
        separate = meta.get("reference", "adapter_disabled" if sc.get("base") else "separate") == "separate"
        max_length = sc.get("max_length", defaults.max_length) or meta.get("max_length") or 4096
        from agentrm.scoring.cache import parse_bytes

        out.append(ScorerSetup(
            name=sc.get("name") or kind, arch=a, causal_lm=prm, quantization=sc.get("quantization"),
            dtype=sc.get("dtype") or "bfloat16", separate_reference=prm and separate, max_length=int(max_length),
            batch_size=int(sc.get("batch_size", defaults.batch_size)),
            cache_bytes=parse_bytes(sc.get("cache_bytes", getattr(defaults, "cache_bytes", None)),
                                    f"{where}.cache_bytes"),
        ))
    return out


def format_search_table(s: ScorerSetup, e: Estimate, gpu_gb: float, reserved_gb: float) -> str:
    per_token = kv_bytes_per_token(s.arch, _dtype_bytes(s.dtype))
    budget = (f"cache_bytes={s.cache_bytes / 2**30:.2f} GiB" if s.cache_bytes is not None
              else "cache_bytes=auto (a quarter of the memory free at its first store)")
    lines = [
        f"{s.arch.name}  {'implicit PRM' if s.causal_lm else 'value RM'}  scorer={s.name}  "
        f"quantization={s.quantization}  dtype={s.dtype}  {budget}",
        f"KV per token {per_token / 2**10:.1f} KiB; scoring batch {s.batch_size} rows x {s.max_length} tokens; "
        f"{gpu_gb:g} GB GPU, {reserved_gb:g} GB of it held by other processes",
        f"{'component':26s} {'GB/device':>10s}",
    ]
    lines += [f"{k:26s} {v:10.2f}" for k, v in e.rows.items()]
    lines.append(f"{'total':26s} {e.total:10.2f}")
    cache_tokens = e.rows["prefix KV cache"] * GB / (per_token * (2 if s.causal_lm else 1))
    lines.append(f"the prefix cache holds ~{cache_tokens:,.0f} tokens of keys/values "
                 f"(~{cache_tokens / s.max_length:.1f} prefixes of {s.max_length} tokens)")
    lines.append(f"fits beside the other processes: {'yes' if e.total <= 0.95 * (gpu_gb - reserved_gb) else 'no'}")
    return "\n".join(lines)


def fit_setup(config: PlanConfig) -> Setup:
    """The training setup of ``config``'s fit configs and flags, parsed by the fit CLI's parser."""
    from agentrm.lit.cli import parse_fit_config

    args = [a for f in config.configs for a in ("--config", f)] + list(config.fit_args)
    parsed = parse_fit_config(args).as_dict()
    try:
        return setup_from_config(parsed)
    except ValueError as e:
        raise BuildError(f"{', '.join(config.configs)}: {e}") from None


def search_config(config: PlanConfig) -> dict[str, Any]:
    """The search config as ``agentrm.search`` reads it (checked), as plain data."""
    from agentrm.search.evaluate import EvalConfig

    if config.fit_args:
        fail("config", f"{config.configs[0]} is a search config; fit flags {config.fit_args} do not apply to it")
    return asdict(parse_config(EvalConfig, ["--config", config.configs[0]], "agentrm.plan"))


def plan(config: PlanConfig) -> list[Estimate]:
    """Print the memory table(s) of ``config``; return the estimates."""
    if not config.is_search:
        setup = fit_setup(config)
        est = estimate(setup)
        print(format_table(setup, est))
        return [est]
    from agentrm.scoring.cache import AUTO_CUDA_FRACTION

    try:
        setups = search_setups(search_config(config), config.arch)
    except ValueError as e:
        raise BuildError(f"{config.configs[0]}: {e}") from None
    out = [(sc, estimate_search(sc, config.gpu_gb, config.reserved_gb, AUTO_CUDA_FRACTION)) for sc in setups]
    print("\n\n".join(format_search_table(sc, e, config.gpu_gb, config.reserved_gb) for sc, e in out)
          or "no value-RM or implicit-PRM scorer in the config: no RM loaded on a GPU to plan")
    return [e for _, e in out]


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """``argv`` as (the planner's own options, with ``--config`` files as ``--configs+``; the fit flags).

    The planner's options also take dashes (``--gpu-gb``); everything else goes to the fit CLI's parser."""
    own: list[str] = []
    fit: list[str] = []
    it = iter(argv)
    for tok in it:
        name, eq, value = tok.partition("=")
        norm = "--" + name[2:].replace("-", "_") if name.startswith("--") else name
        if norm in ("--config", "-c"):
            own += ["--configs+", value if eq else next(it, "")]
        elif norm in ("-h", "--help"):
            own.append(norm)
        elif norm in PLAN_FLAGS:
            own += [norm, value if eq else next(it, "")]
        else:
            fit.append(tok)
    return own, fit


def main(argv: list[str] | None = None) -> list[Estimate]:
    """Command-line entry point (``python -m agentrm.plan --config CONFIG.yaml [--trainer.devices 8]``)."""
    import sys

    own, fit = split_args(sys.argv[1:] if argv is None else argv)

    def run(_):
        cfg = parse_config(PlanConfig, own, "agentrm.plan")
        return plan(PlanConfig(cfg.configs, fit, cfg.arch, cfg.gpu_gb, cfg.reserved_gb))

    return run_cli("agentrm.plan", run, argv)


if __name__ == "__main__":
    main()
