"""Export the value RM of a chosen checkpoint (the best epoch by ``val_unseen/auroc``) as a Hugging Face directory.

``python -m agentrm.fit`` exports the weights of the last epoch (``ExportHF``); with model selection on the
development set the model to evaluate is the checkpoint ``ModelCheckpoint`` kept as the best one. This loads it
into :class:`~agentrm.lit.value_module.ValueRMModule` and writes the same export as the fit would have
(``max_length`` recorded for scorers), plus ``selected_checkpoint.json`` naming the checkpoint. ``--module``
names the LightningModule class the fit trained (a frozen-feature head:
``agentrm.lit.head_module.FeatureHeadModule``); its checkpoint holds that class's arguments.

    python bench/generalisation_export_best.py runs/generalisation/rm/tiny/checkpoints/epoch01-*.ckpt \\
        runs/generalisation/rm/tiny/hf_model_best --max_length 1024
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--max_length", type=int, required=True, help="the data module's max_length of the fit")
    ap.add_argument("--module", default="agentrm.lit.value_module.ValueRMModule",
                    help="class path of the fit's model (default: the value RM trained from scratch)")
    args = ap.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"generalisation_export_best: {args.out} exists; remove it or pick another directory")
    module_name, _, class_name = args.module.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards"
    module = cls.load_from_checkpoint(str(args.checkpoint), map_location="cpu")
    module.export(args.out, max_length=args.max_length)
    (args.out / "selected_checkpoint.json").write_text(
        json.dumps({"checkpoint": str(args.checkpoint), "module": args.module}, indent=2))
    print(f"exported {args.checkpoint} to {args.out}")
    return args.out


if __name__ == "__main__":
    main()
