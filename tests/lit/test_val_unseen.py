"""A second validation set of unseen task types (``data.val_unseen_path``): its own ``val_unseen/*`` metrics."""

import csv
import math

import pytest
import yaml

from agentrm.data.schema import DataError, Step, Trajectory, write_jsonl
from agentrm.fit import main
from agentrm.lit.datamodule import TrajectoryDataModule
from tests.lit.conftest import learnable_trajectories


def unseen_trajectories(n: int = 24) -> list[Trajectory]:
    """Learnable records of another task type, each success followed by a sibling that fails at its first step."""
    out = []
    for i, t in enumerate(learnable_trajectories(n, seed=11)):
        t.task, t.instruction = "OpenBall", f"Open the ball in room {i}."  # one prefix per sibling group
        t.meta = {"group": t.id}
        out.append(t)
        if t.success:  # same instruction (the prefix), another first action: a sibling pair with different values
            out.append(Trajectory(f"{t.id}-b0", "OpenBall", t.instruction,
                                  [Step("turn left", "You face a wall.", 0.05)], reward=0.0, success=False,
                                  meta={"group": t.id, "branch_at": 0}))
    return out


def with_unseen(cfg_path, tmp_path, **model_args):
    """The tiny value-RM config plus ``data.val_unseen_path`` and a checkpoint that monitors ``val_unseen/auroc``."""
    cfg = yaml.safe_load(open(cfg_path))
    unseen = tmp_path / "unseen.jsonl"
    write_jsonl(unseen, unseen_trajectories())
    cfg["data"]["val_unseen_path"] = [str(unseen)]
    cfg["data"]["max_length"] = 256  # no truncation: every sibling pair keeps its first step
    ckpt = cfg["trainer"]["callbacks"][0]["init_args"]
    ckpt.update({"monitor": "val_unseen/auroc", "mode": "max", "save_top_k": 1})
    cfg["trainer"]["max_epochs"] = 2
    cfg["model"]["init_args"].update(model_args)
    path = tmp_path / "unseen_cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_fit_logs_val_unseen_metrics_beside_val(tiny_setup, tmp_path):
    cfg, run = tiny_setup
    cli = main(["--config", str(with_unseen(cfg, tmp_path))])
    rows = list(csv.DictReader(open(next((run / "logs").glob("version_*/metrics.csv")))))
    for name in ("auroc", "type_auroc", "type_auroc_types", "rank_acc", "mse", "traj_auroc", "rank_pairs"):
        for prefix in ("val", "val_unseen") if name not in ("rank_acc", "rank_pairs") else ("val_unseen",):
            values = [float(r[f"{prefix}/{name}"]) for r in rows if r.get(f"{prefix}/{name}")]
            assert len(values) == 2 and all(math.isfinite(v) for v in values), (prefix, name, values)
    metrics = cli.trainer.callback_metrics
    # the unseen set is its own: one sibling pair per success of its 24 main records
    assert float(metrics["val_unseen/rank_pairs"]) == sum(t.success for t in learnable_trajectories(24, seed=11))
    assert float(metrics["val_unseen/mse"]) != pytest.approx(float(metrics["val/mse"]))
    # each set holds one task type: the per-type AUROC is the pooled one, over one type
    for prefix in ("val", "val_unseen"):
        assert float(metrics[f"{prefix}/type_auroc_types"]) == 1
        assert float(metrics[f"{prefix}/type_auroc"]) == pytest.approx(float(metrics[f"{prefix}/auroc"]), abs=1e-6)
    # checkpoints can select on the unseen set
    best = cli.trainer.checkpoint_callback
    assert best.monitor == "val_unseen/auroc" and best.best_model_score is not None
    assert cli.datamodule.truncation["val_unseen"].trajectories == len(unseen_trajectories())


def test_unseen_set_sharing_a_training_task_type_is_refused(tiny_setup, tmp_path):
    cfg, _ = tiny_setup
    data = yaml.safe_load(open(cfg))["data"]
    leaked = tmp_path / "leaked.jsonl"
    write_jsonl(leaked, [*unseen_trajectories(4), *learnable_trajectories(2, seed=5)])  # GoToBall: a training type
    dm = TrajectoryDataModule(data["train_path"], val_unseen_path=str(leaked), tokenizer=data["tokenizer"])
    with pytest.raises(DataError, match=r"leaked.jsonl: record 's5-0' has task type GoToBall, which the training"):
        dm.setup()


def test_model_without_separate_validation_sets_refuses_it(tiny_setup, tmp_path):
    """The implicit PRM's validation_step takes no dataloader_idx: unseen data would mix into val/*, so it stops."""
    cfg, _ = tiny_setup
    path = with_unseen(cfg, tmp_path)
    y = yaml.safe_load(open(path))
    y["model"] = {"class_path": "agentrm.lit.prm_module.ImplicitPRMModule",
                  "init_args": {"backbone_config": y["model"]["init_args"]["backbone_config"]}}
    y["trainer"]["callbacks"][0]["init_args"]["monitor"] = None
    path.write_text(yaml.safe_dump(y))
    with pytest.raises(DataError, match=r"^data.val_unseen_path: ImplicitPRMModule does not report validation sets"):
        main(["--config", str(path)])


def test_val_set_names_follow_the_config(tiny_setup):
    cfg, _ = tiny_setup
    data = yaml.safe_load(open(cfg))["data"]
    assert TrajectoryDataModule(data["train_path"], tokenizer=data["tokenizer"]).val_set_names == ["val"]
    dm = TrajectoryDataModule(data["train_path"], val_unseen_path="x.jsonl", tokenizer=data["tokenizer"])
    assert dm.val_set_names == ["val", "val_unseen"]


def test_the_type_auroc_selection_config_keeps_the_best_epoch_by_each_metric(tiny_setup, tmp_path):
    """configs/generalisation/selection/type_auroc.yaml, composed on a fit: one training run keeps the best epoch by
    val_unseen/type_auroc and the best by the pooled val_unseen/auroc, each file named by its value, and stops early
    on the per-type metric; the development set here holds two task types, so the two metrics differ."""
    from agentrm.paths import PROJECT_ROOT

    cfg_path, run = tiny_setup
    selection = yaml.safe_load((PROJECT_ROOT / "configs/generalisation/selection/type_auroc.yaml").read_text())
    callbacks = selection["trainer"]["callbacks"]
    for cb in callbacks:  # the selection's callbacks, writing under this test's run directory
        if "dirpath" in cb["init_args"]:
            cb["init_args"]["dirpath"] = str(run / cb["init_args"]["dirpath"].rsplit("/", 1)[1])
    cfg = yaml.safe_load(open(cfg_path))
    cfg["trainer"].update(callbacks=callbacks, max_epochs=3)
    unseen = unseen_trajectories()
    for t in unseen:
        t.task = "OpenBall" if int(t.meta["group"].split("-")[-1]) % 2 else "OpenBox"
    write_jsonl(tmp_path / "unseen.jsonl", unseen)
    cfg["data"].update(val_unseen_path=[str(tmp_path / "unseen.jsonl")], max_length=256)
    (tmp_path / "selection.yaml").write_text(yaml.safe_dump(cfg))
    main(["--config", str(tmp_path / "selection.yaml")])
    rows = [r for r in csv.DictReader(open(next((run / "logs").glob("version_*/metrics.csv"))))
            if r.get("val_unseen/auroc")]
    assert rows and all(float(r["val_unseen/type_auroc_types"]) == 2 for r in rows)
    names = sorted(p.name for p in (run / "checkpoints").glob("epoch*.ckpt"))
    for metric, tag in (("val_unseen/type_auroc", "unseen_type_auroc"), ("val_unseen/auroc", "unseen_auroc")):
        best = max(range(len(rows)), key=lambda e: (float(rows[e][metric]), -e))  # the first best epoch
        assert f"epoch{best:02d}-{tag}{float(rows[best][metric]):.3f}.ckpt" in names, (metric, names)
    assert len(names) == 2 and (run / "hf_model").is_dir()
    # one last.ckpt: the second checkpoint callback of the directory does not write a copy (last-v1.ckpt)
    assert sorted(p.name for p in (run / "checkpoints").glob("last*")) == ["last.ckpt"]
