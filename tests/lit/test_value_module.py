import csv
import json

import lightning as L
import pytest
import torch

from agentrm.fit import main
from agentrm.models.value_rm import ValueRewardModel


def val_metrics(run):
    rows = list(csv.DictReader(open(next((run / "logs").glob("version_*/metrics.csv")))))
    return [float(r["val/mse"]) for r in rows if r.get("val/mse")]


def test_fit_lowers_val_loss_and_exports(tiny_setup):
    cfg, run = tiny_setup
    cli = main(["--config", str(cfg)])
    mse = val_metrics(run)
    assert len(mse) == 4
    assert mse[-1] < 0.5 * mse[0], mse
    assert float(cli.trainer.callback_metrics["val/auroc"]) > 0.8
    model = ValueRewardModel.from_pretrained(run / "hf_model")
    dm = cli.datamodule
    batch = next(iter(dm.val_dataloader()))
    scores = model.score(batch)
    assert scores.shape == batch["step_end_idx"].shape
    assert torch.isnan(scores[~batch["step_mask"]]).all() and not torch.isnan(scores[batch["step_mask"]]).any()
    # the reloaded model scores exactly like the trained one
    cli.model.model.eval()
    ref = cli.model.model.score(batch)
    torch.testing.assert_close(scores, ref, equal_nan=True)
    # the export records what scorers default to: the training context budget and the loss
    recorded = json.loads((run / "hf_model" / "agentrm_config.json").read_text())
    assert recorded["max_length"] == 128 and recorded["loss"] == "mse"
    from agentrm.search.build import build_scorer
    from agentrm.search.specs import ScorerSpec

    assert build_scorer(ScorerSpec(path=str(run / "hf_model"))).max_length == 128
    with pytest.warns(UserWarning, match="below the 128 tokens the RM was trained with"):
        assert build_scorer(ScorerSpec(path=str(run / "hf_model"), max_length=64)).max_length == 64


class Crash(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 2 and batch_idx == 1:
            raise RuntimeError("simulated crash")


def test_resume_after_crash_matches_uninterrupted(tiny_setup, tmp_path):
    cfg, run = tiny_setup
    full = main(["--config", str(cfg), "--trainer.default_root_dir", str(run)])
    full_state = {k: v.clone() for k, v in full.model.state_dict().items()}
    full_metrics = {k: float(v) for k, v in full.trainer.callback_metrics.items() if k.startswith("val/")}

    run2 = tmp_path / "run2"
    args = ["--config", str(cfg), "--trainer.default_root_dir", str(run2),
            "--trainer.logger.init_args.save_dir", str(run2)]
    import yaml

    y = yaml.safe_load(open(cfg))
    y["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(run2 / "checkpoints")
    y["trainer"]["callbacks"][1]["init_args"]["dirpath"] = str(run2 / "hf_model")
    y["trainer"]["callbacks"].append({"class_path": "tests.lit.test_value_module.Crash"})
    cfg2 = tmp_path / "cfg2.yaml"
    cfg2.write_text(yaml.safe_dump(y))
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["--config", str(cfg2), *args[2:]])
    assert (run2 / "checkpoints" / "last.ckpt").exists()
    y["trainer"]["callbacks"].pop()
    cfg2.write_text(yaml.safe_dump(y))
    resumed = main(["--config", str(cfg2), *args[2:], "--ckpt_path", "last"])
    res_metrics = {k: float(v) for k, v in resumed.trainer.callback_metrics.items() if k.startswith("val/")}
    assert res_metrics.keys() == full_metrics.keys()
    for k in full_metrics:
        assert res_metrics[k] == pytest.approx(full_metrics[k], rel=1e-4, abs=1e-5), k
    for k, v in resumed.model.state_dict().items():
        torch.testing.assert_close(v, full_state[k], rtol=1e-4, atol=1e-5)


def val_mse_of(module, datamodule) -> float:
    """MSE of the predicted values (activation applied, as ``score`` does) on the labelled validation steps."""
    module.eval()
    se, n = 0.0, 0
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            pred = module.model.score(batch)
            lab = batch["step_mask"] & ~torch.isnan(batch["step_values"])
            se += float(((pred[lab] - batch["step_values"][lab]) ** 2).sum())
            n += int(lab.sum())
    return se / n


def test_training_lowers_val_loss_on_shipped_sample(tmp_path):
    """A short run on a slice of the shipped BabyAI sample with the shipped tokenizer."""
    import itertools
    import json

    from agentrm.data.schema import iter_jsonl, write_jsonl
    from agentrm.lit.value_module import ValueRMModule
    from agentrm.paths import resolve_path
    from tests.lit.conftest import TINY_BACKBONE

    data = tmp_path / "slice.jsonl"
    write_jsonl(data, itertools.islice(iter_jsonl(resolve_path("agentrm/assets/babyai_sample.jsonl")), 200))
    run = tmp_path / "run"
    cli = main([
        "--config", "configs/tiny/value_rm.yaml",
        "--data.train_path", str(data), "--data.max_length", "512", "--data.batch_size", "16",
        "--model.init_args.backbone_config", json.dumps(TINY_BACKBONE), "--model.init_args.warmup_steps", "3",
        "--model.init_args.learning_rate", "3e-3",
        "--trainer.max_epochs", "5", "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(run), "--trainer.callbacks", "[]",
        "--trainer.enable_checkpointing", "false",
    ])
    assert len(val_metrics(run)) == 5
    trained = val_mse_of(cli.model, cli.datamodule)
    L.seed_everything(0)
    hp = {k: v for k, v in cli.model.hparams.items() if not k.startswith("_")}
    untrained = val_mse_of(ValueRMModule(**hp), cli.datamodule)
    # and better than the best constant: the mean training target
    train_vals = [v for it in cli.datamodule.train_items for v in it.step_values if v == v]
    mean = sum(train_vals) / len(train_vals)
    val_vals = [v for it in cli.datamodule.val_items for v in it.step_values if v == v]
    constant = sum((v - mean) ** 2 for v in val_vals) / len(val_vals)
    print(f"val mse trained {trained:.4f} untrained {untrained:.4f} constant {constant:.4f}")
    assert trained < 0.75 * untrained and trained < constant, (trained, untrained, constant)


def test_new_run_never_replaces_another_runs_export(tiny_setup):
    cfg, run = tiny_setup
    main(["--config", str(cfg), "--trainer.max_epochs", "1"])
    exported = (run / "hf_model" / "value_head.safetensors").read_bytes()
    from agentrm.fit import ExportConflict

    with pytest.raises(ExportConflict, match=r"already holds a model exported by run \S+; pass --overwrite true"):
        main(["--config", str(cfg), "--trainer.max_epochs", "1", "--model.init_args.learning_rate", "0.1"])
    assert (run / "hf_model" / "value_head.safetensors").read_bytes() == exported
    main(["--config", str(cfg), "--trainer.max_epochs", "1", "--model.init_args.learning_rate", "0.1",
          "--overwrite", "true"])
    assert (run / "hf_model" / "value_head.safetensors").read_bytes() != exported


def test_unlabeled_agentgym_data_fails_clearly_and_values_are_required(tiny_setup, tmp_path):
    import json

    cfg, run = tiny_setup
    conv = [{"from": "human", "value": "Find a red mug."}, {"from": "gpt", "value": "Action: search[red mug]"},
            {"from": "human", "value": "3 results"}, {"from": "gpt", "value": "Action: click[buy]"}]
    traj_l = tmp_path / "agenttraj_l.json"
    traj_l.write_text(json.dumps([{"item_id": f"webshop_{i}", "conversations": conv} for i in range(10)]))
    from agentrm.data.labels import LabelError

    with pytest.raises(LabelError, match=r"10 of 10 records have no 'reward'.*--data.unlabeled success"):
        main(["--config", str(cfg), "--data.train_path", str(traj_l)])
    # kept as failures (ignore), or declared successes with no step value (success): refused, with the reason
    with pytest.raises(LabelError, match="data.unlabeled=ignore keeps 10 records .* as failures"):
        main(["--config", str(cfg), "--data.train_path", str(traj_l), "--data.unlabeled", "ignore"])
    with pytest.raises(LabelError, match="data.unlabeled=success makes 10 records .* no value.*success_values"):
        main(["--config", str(cfg), "--data.train_path", str(traj_l), "--data.unlabeled", "success"])
    # the stated rule (every demonstration step = 1.0) gives one class: refused, not a constant RM
    with pytest.raises(LabelError, match="has the value 1: a value RM would learn a constant"):
        main(["--config", str(cfg), "--data.train_path", str(traj_l), "--data.unlabeled", "success_values",
              "--data.min_labels", "1"])
    assert not (run / "hf_model").exists()


def test_one_class_validation_reports_nan_auroc_with_a_warning(tiny_setup, tmp_path):
    from agentrm.data.schema import write_jsonl
    from tests.lit.conftest import learnable_trajectories

    cfg, run = tiny_setup
    trajs = [t for t in learnable_trajectories(60) if t.success]
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    write_jsonl(train, learnable_trajectories(40))
    write_jsonl(val, trajs[:8])
    with pytest.warns(UserWarning, match="undefined"):
        cli = main(["--config", str(cfg), "--data.train_path", str(train), "--data.val_path", str(val),
                    "--trainer.max_epochs", "1"])
    assert torch.isnan(cli.trainer.callback_metrics["val/auroc"])


def test_group_batches_keep_groups_together_and_cover_every_item_once():
    from agentrm.lit.datamodule import GroupBatchSampler

    groups = [[0, 1, 2], [3], [4, 5], [6, 7, 8, 9, 10], [11, 12]]
    s = GroupBatchSampler(groups, batch_size=4, seed=3)
    s.set_epoch(1)
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(13))
    assert all(len(b) <= 4 for b in batches)
    for g in groups:  # a group that fits in a batch is never split
        if len(g) <= 4:
            assert any(set(g) <= set(b) for b in batches), (g, batches)
    assert list(s) == batches  # same epoch, same batches (resumable)
    s.set_epoch(2)
    assert list(s) != batches
    # DDP: ranks take disjoint strided batches, equal in number, groups never straddle ranks
    r0, r1 = (list(GroupBatchSampler(groups, 4, 3, num_replicas=2, rank=r)) for r in (0, 1))
    assert len(r0) == len(r1)
    for g in groups[:3] + groups[4:]:
        on = [r for r, bs in ((0, r0), (1, r1)) if any(set(g) & set(b) for b in bs)]
        assert len(on) >= 1 and all(any(set(g) <= set(b) for b in bs) for r, bs in ((0, r0), (1, r1)) if r in on)


def test_grouped_batching_makes_the_pairwise_loss_fire(tiny_setup, tmp_path):
    """Records with siblings (same prefix, other action): shuffled batches meet few pairs, grouped ones all."""
    import csv

    from agentrm.data.schema import Step, Trajectory, write_jsonl

    trajs = []
    for g in range(24):
        prefix = [Step(f"go {g}", f"room {g}", 0.5)]
        for a, v in (("left", 0.9), ("right", 0.1)):
            trajs.append(Trajectory(f"e{g}-{a}", "t", f"task {g}", [*prefix, Step(a, f"at {a}", v)], v, v > 0.5,
                                    meta={"group": f"e{g}"}))
    data = tmp_path / "siblings.jsonl"
    write_jsonl(data, trajs)
    cfg, run = tiny_setup

    def pairs_seen(batching: str, out: str) -> float:
        main(["--config", str(cfg), "--data.train_path", str(data), "--data.val_fraction", "0.2",
              "--data.batching", batching, "--data.batch_size", "4", "--model.init_args.pairwise_weight", "1.0",
              "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path / out),
              "--trainer.logger.init_args.save_dir", str(tmp_path / out), "--overwrite", "true"])
        rows = list(csv.DictReader(open(next((tmp_path / out / "logs").glob("version_*/metrics.csv")))))
        return sum(float(r["train/sibling_pairs"]) for r in rows if r.get("train/sibling_pairs"))

    grouped, shuffled = pairs_seen("groups", "g"), pairs_seen("shuffle", "s")
    # ~19 training groups of one sibling pair each: grouped batches see every pair, shuffled ones few
    assert grouped >= 15 and shuffled < 0.5 * grouped, (grouped, shuffled)
