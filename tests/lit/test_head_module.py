"""Head-only and top-block value RMs trained through ``python -m agentrm.fit`` on a precomputed features directory:
they learn, export ordinary value-RM directories that score what was trained, and refuse mismatched data."""

from __future__ import annotations

import csv

import pytest
import torch
import yaml

from agentrm.data.schema import write_jsonl
from agentrm.data.tiny_tokenizer import train_tiny_tokenizer, trajectory_texts
from agentrm.fit import main
from agentrm.models.value_rm import ValueRewardModel
from agentrm.scoring import ValueRMScorer
from tests.feature_fixtures import run_precompute, save_tiny
from tests.lit.conftest import learnable_trajectories


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    root = tmp_path_factory.mktemp("head_module")
    trajs = learnable_trajectories(48)
    data = root / "train.jsonl"
    write_jsonl(data, trajs)
    tok = train_tiny_tokenizer(trajectory_texts(trajs), vocab_size=300)
    backbone = save_tiny("llama", tok, root / "llama", seed=2)
    run_precompute(data=[str(data)], out=str(root / "features"), backbone=str(backbone), max_length=128,
                   layers=[2, 3], sequence_layers=[1, 2], sequence_dtype="float32", shard_size=16)
    return {"root": root, "data": data, "backbone": backbone, "features": root / "features"}


def _config(cached, tmp_path, model: dict, max_length: int = 128, epochs: int = 6):
    run = tmp_path / "run"
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": epochs, "default_root_dir": str(run),
            "enable_progress_bar": False, "log_every_n_steps": 1, "num_sanity_val_steps": 0,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(run), "name": "logs"}},
            "callbacks": [{"class_path": "agentrm.lit.callbacks.ExportHF",
                           "init_args": {"dirpath": str(run / "hf_model")}}],
        },
        "model": model,
        "data": {"train_path": str(cached["data"]), "tokenizer": str(cached["backbone"]), "max_length": max_length,
                 "batch_size": 8, "val_fraction": 0.25},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, run


@pytest.mark.parametrize("model", [
    {"class_path": "agentrm.lit.head_module.FeatureHeadModule",
     "init_args": {"layer": 2, "head": "mlp", "head_width": 32, "learning_rate": 0.01, "warmup_steps": 2,
                   "loss": "mse"}},
    {"class_path": "agentrm.lit.head_module.TopLayersModule",
     "init_args": {"layer": 2, "learning_rate": 0.01, "warmup_steps": 2, "loss": "mse",
                   "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]}}},
    {"class_path": "agentrm.lit.head_module.TopLayersModule",  # block 2 of 3 trains on block 1's cache; 3 dropped
     "init_args": {"layer": 1, "depth": 2, "learning_rate": 0.01, "warmup_steps": 2, "loss": "mse",
                   "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]}}},
], ids=["head", "top-lora", "top-lora-depth"])
def test_fit_on_cached_features_learns_and_exports(cached, tmp_path, model):
    model["init_args"]["features"] = str(cached["features"])
    cfg, run = _config(cached, tmp_path, model)
    cli = main(["--config", str(cfg)])
    rows = list(csv.DictReader(open(next((run / "logs").glob("version_*/metrics.csv")))))
    mse = [float(r["val/mse"]) for r in rows if r.get("val/mse")]
    assert len(mse) == 6 and mse[-1] < 0.7 * mse[0], mse
    assert float(cli.trainer.callback_metrics["val/auroc"]) > 0.8
    # the export is an ordinary value-RM directory; through the scorer it scores what was trained
    rm = ValueRewardModel.from_pretrained(run / "hf_model")
    layers = model["init_args"].get("depth") or (2 if model["class_path"].endswith("FeatureHeadModule") else 3)
    assert rm.backbone.config.num_hidden_layers == layers
    dm = cli.datamodule
    batch = next(iter(dm.val_dataloader()))
    module = cli.model.model.eval()
    with torch.no_grad():
        want = module(batch["input_ids"], batch["attention_mask"], batch["step_end_idx"])
    want = torch.sigmoid(want) if rm.value_activation == "sigmoid" else want
    torch.testing.assert_close(rm.score(batch)[batch["step_mask"]], want[batch["step_mask"]], atol=1e-5, rtol=0)
    # a checkpoint rebuilds the same module (its own arguments only, not ValueRMModule's)
    cls = type(cli.model)
    back = cls.load_from_checkpoint(str(run / "checkpoints" / "last.ckpt")).model.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(batch["input_ids"], batch["attention_mask"], batch["step_end_idx"]),
                                   module(batch["input_ids"], batch["attention_mask"], batch["step_end_idx"]))
    # the model-selection export (bench/generalisation_export_best.py) rebuilds the fit's class from a checkpoint
    # and writes the same export as the fit's last epoch
    from bench.generalisation_export_best import main as export_best

    export_best([str(run / "checkpoints" / "last.ckpt"), str(tmp_path / "selected"), "--max_length", "128",
                 "--module", model["class_path"]])
    selected = ValueRewardModel.from_pretrained(tmp_path / "selected")
    torch.testing.assert_close(selected.score(batch)[batch["step_mask"]], rm.score(batch)[batch["step_mask"]],
                               atol=1e-6, rtol=0)
    scorer = ValueRMScorer(rm, dm.tokenizer, max_length=128, aggregate="max")
    from agentrm.data.agentgym import load_trajectories

    trajs = load_trajectories(cached["data"])[:4]
    assert torch.isfinite(scorer.score_trajectories(trajs)).all()


def test_mismatched_data_settings_fail_in_one_line(cached, tmp_path, capsys):
    model = {"class_path": "agentrm.lit.head_module.FeatureHeadModule",
             "init_args": {"features": str(cached["features"]), "layer": 3}}
    cfg, _ = _config(cached, tmp_path, model, max_length=64, epochs=1)
    with pytest.raises(SystemExit) as e:
        from agentrm.fit import cli

        cli(["--config", str(cfg)])
    assert e.value.code == 2
    assert "data.max_length=64 but the features" in capsys.readouterr().err
    model["init_args"]["layer"] = 1
    cfg, _ = _config(cached, tmp_path, model, epochs=1)
    with pytest.raises(SystemExit):
        cli(["--config", str(cfg)])
    assert "holds layers [2, 3], not 1" in capsys.readouterr().err
    model = {"class_path": "agentrm.lit.head_module.TopLayersModule",
             "init_args": {"features": str(cached["features"]), "layer": 2, "depth": 2}}
    cfg, _ = _config(cached, tmp_path, model, epochs=1)
    with pytest.raises(SystemExit):
        cli(["--config", str(cfg)])
    assert "depth: 2 must be above layer 2 and at most the backbone's 3 blocks" in capsys.readouterr().err


def test_implicit_prm_fits_on_cached_reference_logprobs(cached, tmp_path, monkeypatch):
    """ImplicitPRMModule(reference_logprobs=<precompute>): no reference model is loaded while it trains; the export
    (reference loaded then) scores with the reference forward exactly what the trained model scored from the cache."""
    import agentrm.lit.prm_module as prm_module
    from agentrm.models.implicit_prm import ImplicitPRM

    run_precompute(data=[str(cached["data"])], out=str(tmp_path / "ref"), backbone=str(cached["backbone"]),
                   max_length=128, reference_logprobs=True)
    loads = []
    real_load = prm_module.load_reference
    monkeypatch.setattr(prm_module, "load_reference", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    model = {"class_path": "agentrm.lit.prm_module.ImplicitPRMModule",
             "init_args": {"backbone": str(cached["backbone"]), "reference_logprobs": str(tmp_path / "ref"),
                           "beta": 0.5, "learning_rate": 3e-3, "warmup_steps": 2}}
    cfg, run = _config(cached, tmp_path, model, epochs=2)
    cli = main(["--config", str(cfg)])
    assert len(loads) == 1  # once, by the export; never while training
    assert cli.model.model.reference is None and cli.model.model.reference_cache is not None
    prm = ImplicitPRM.from_pretrained(run / "hf_model")
    assert prm.reference is not None and prm.reference_cache is None
    batch = next(iter(cli.datamodule.val_dataloader()))
    trained = cli.model.model.eval()
    with torch.no_grad():
        want = trained.score(batch)
        got = prm.score(batch)
    assert want[batch["step_mask"]].abs().max() > 1e-4
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0, equal_nan=True)
