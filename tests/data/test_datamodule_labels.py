"""TrajectoryDataModule.setup checks labels against what the attached model trains on and reports truncation.

No training: a stand-in trainer carries the model's ``trains_on`` (what Lightning attaches before setup).
"""

import json
from types import SimpleNamespace

import pytest

from agentrm.data.labels import LabelError, TruncationError
from agentrm.data.schema import DataFormatError, Step, Trajectory, write_jsonl
from agentrm.lit.datamodule import TrajectoryDataModule
from agentrm.lit.value_module import ValueRMModule, check_loss_fits_range
from tests.conftest import make_trajectory


@pytest.fixture()
def tok_dir(tiny_tokenizer, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tiny_tokenizer.save_pretrained(d)
    return str(d)


class Logger:
    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, metrics))


def datamodule(train, tok_dir, trains_on=None, **kw):
    train = train if isinstance(train, list) else str(train)
    dm = TrajectoryDataModule(train_path=train, tokenizer=tok_dir, val_fraction=kw.pop("val_fraction", 0.25),
                              **{"max_length": 512, **kw})
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(trains_on=trains_on), logger=Logger(),
                                 is_global_zero=True)
    return dm


def mixed(n, steps=3):
    return [make_trajectory(f"t{i}", steps, success=i % 2 == 0) for i in range(n)]


def test_the_value_rm_declares_step_values():
    assert ValueRMModule.trains_on == "step_values"


def test_setup_reports_per_file_and_per_split_and_logs_truncation(tmp_path, tok_dir):
    p = tmp_path / "d.jsonl"
    write_jsonl(p, mixed(40))
    dm = datamodule(p, tok_dir, "step_values")
    dm.setup("fit")
    assert dm.summary_lines[0] == f"{p}: 40 records: 20 successes, 20 failures; 120 steps, 120 with a value"
    train, val = dm.truncation["train"], dm.truncation["val"]
    assert train.trajectories == len(dm.train_items) and val.trajectories == len(dm.val_items)
    assert train.labels == 3 * train.trajectories and train.labels_dropped == 0
    assert dm.summary_lines[1].startswith(f"train: {train.steps} steps ({train.labels} labelled) of {train.trajectories} "
                                          "trajectories; truncation dropped nothing (data.max_length=512")
    (step, metrics), = dm.trainer.logger.logged
    assert step == 0 and metrics["data/train/labels"] == train.labels and metrics["data/val/labels_dropped"] == 0


def test_small_max_length_warns_with_counts_and_none_left_is_an_error(tmp_path, tok_dir, tiny_tokenizer):
    from agentrm.data.tokenize import tokenize_trajectory

    trajs = mixed(40) + [make_trajectory(f"long{i}", 8, success=i % 2 == 0) for i in range(8)]
    p = tmp_path / "d.jsonl"
    write_jsonl(p, trajs)
    budget = len(tokenize_trajectory(tiny_tokenizer, trajs[0]).input_ids) + 4  # 3-step ones fit, 8-step ones do not
    dm = datamodule(p, tok_dir, "step_values", max_length=budget, val_fraction=0.0)
    with pytest.warns(UserWarning, match=rf"data.max_length={budget} drops \d+ of 184 labelled steps \(\d+\.\d%\) of "
                                         r"the train split \(the oldest steps of 8 trajectories\)"):
        dm.setup("fit")
    c = dm.truncation["train"]
    assert c.truncated == 8 and 0 < c.labels_dropped < 64 and c.labels_kept == 184 - c.labels_dropped
    assert f"truncation dropped {c.steps_dropped} steps" in dm.summary_lines[1]
    with pytest.raises(TruncationError, match=r"^data.max_length=8 drops every step of the training split"):
        datamodule(p, tok_dir, "step_values", max_length=8).setup("fit")


def test_value_rm_refuses_degenerate_labels_unless_allowed(tmp_path, tok_dir):
    p = tmp_path / "d.jsonl"
    write_jsonl(p, mixed(6))
    with pytest.raises(LabelError, match=r"only \d+ labelled steps .* data.min_labels=32"):
        datamodule(p, tok_dir, "step_values").setup("fit")
    dm = datamodule(p, tok_dir, "step_values", allow_degenerate=True)
    dm.setup("fit")
    assert dm.train_items
    datamodule(p, tok_dir, None).setup("fit")  # a model without labels (policy SFT): no label check
    ones = [Trajectory(f"o{i}", "t", "go", [Step("a", "o", 1.0)] * 2, 1.0, True) for i in range(40)]
    write_jsonl(p, ones)
    with pytest.raises(LabelError, match="has the value 1: a value RM would learn a constant"):
        datamodule(p, tok_dir, "step_values").setup("fit")


def test_implicit_prm_refuses_one_class_and_agentgym_thresholds_fix_it(tmp_path, tok_dir):
    conv = [{"from": "human", "value": "Go to the red ball."}, {"from": "gpt", "value": "move forward"},
            {"from": "human", "value": "You see a red ball."}]
    p = tmp_path / "ag.json"
    p.write_text(json.dumps([{"item_id": f"babyai_{i}", "conversations": conv, "reward": [0.3, 0.6, 0.9, 0.0][i % 4]}
                             for i in range(48)]))
    with pytest.raises(LabelError, match=r"is a failure \(\d+ of them have a partial reward .* 'success = reward >= 1'"):
        datamodule(p, tok_dir, "outcomes", min_labels=8).setup("fit")
    dm = datamodule(p, tok_dir, "outcomes", min_labels=8, success_threshold=0.5)
    dm.setup("fit")
    assert dm.summary_lines[0] == (f"{p} (success = reward >= 0.5): 48 records: 24 successes, 24 failures; 36 partial "
                                   "rewards (0 < reward < 1), 24 counted as successes; 48 steps, 0 with a value")


def test_unlabeled_demonstrations_with_a_value_rm(tmp_path, tok_dir):
    conv = [{"from": "human", "value": "Go to the red ball."}, {"from": "gpt", "value": "move forward"},
            {"from": "human", "value": "You see a red ball."}, {"from": "gpt", "value": "done"}]
    demos = tmp_path / "demos.json"
    demos.write_text(json.dumps([{"item_id": f"babyai_{i}", "conversations": conv} for i in range(30)]))
    failures = tmp_path / "fail.jsonl"
    write_jsonl(failures, [make_trajectory(f"f{i}", 3, success=False) for i in range(20)])
    both = [str(demos), str(failures)]
    with pytest.raises(LabelError, match="data.unlabeled=success makes 30 records .* success_values"):
        datamodule(both, tok_dir, "step_values", unlabeled="success").setup("fit")
    with pytest.raises(LabelError, match="data.unlabeled=ignore keeps 30 records"):
        datamodule(both, tok_dir, "step_values", unlabeled="ignore").setup("fit")
    with pytest.raises(LabelError, match=r"has the value 1: .* \(data.unlabeled=success_values gives every "
                                         r"demonstration step 1\)"):
        datamodule(str(demos), tok_dir, "step_values", unlabeled="success_values").setup("fit")
    dm = datamodule(both, tok_dir, "step_values", unlabeled="success_values")
    dm.setup("fit")  # demonstrations (1.0) beside failures with values (0.1): two kinds
    assert {v for it in dm.train_items for v in it.step_values} == {1.0, 0.1}
    with pytest.raises(LabelError, match="data.unlabeled=ignore keeps 30 records .* --data.unlabeled success if"):
        datamodule(both, tok_dir, "outcomes", unlabeled="ignore").setup("fit")
    datamodule(str(demos), tok_dir, None, unlabeled="ignore").setup("fit")  # policy SFT uses no outcome


def test_declared_value_range_reaches_the_reader_and_the_loss_must_fit_it(tmp_path, tok_dir):
    trajs = mixed(40)
    trajs[5].steps[1].value = -0.5
    p = tmp_path / "d.jsonl"
    write_jsonl(p, trajs)
    with pytest.raises(DataFormatError, match=rf"^{p}:6: field 'steps\[1\].value': -0.5 is outside the declared "
                                              r"value range \[0, 1\]"):
        datamodule(p, tok_dir, "step_values").setup("fit")
    datamodule(p, tok_dir, "step_values", value_range=[-1, 1]).setup("fit")
    with pytest.raises(ValueError, match=r"data.value_range must have low < high, got \[1, -1\]"):
        TrajectoryDataModule(train_path=str(p), value_range=[1, -1])
    check_loss_fits_range("mse", (-1.0, 1.0))
    check_loss_fits_range("bce", (0.0, 1.0))
    with pytest.raises(LabelError, match=r"^model.init_args.loss=bce needs value targets in \[0, 1\], but "
                                         r"data.value_range is \[-1, 1\]: pass --model.init_args.loss mse"):
        check_loss_fits_range("bce", (-1.0, 1.0))
