"""Task-type splits: development and test task types unseen in training and apart from each other."""

from pathlib import Path

import pytest
import yaml

from agentrm.checks import ConfigError
from agentrm.data.schema import DataError, Step, Trajectory
from agentrm.data.splits import (
    SplitsConfig,
    check_configs,
    check_unseen,
    check_unseen_records,
    main,
    task_group,
    task_type,
)
from agentrm.paths import PROJECT_ROOT

GEN = PROJECT_ROOT / "configs" / "generalisation"
TRAIN = ["babyai:GoToLocal?max_steps=24", "babyai:PickupLoc", "sciworld:boil", "textworld:custom?games=2"]


def test_task_types_are_canonical_and_grouped():
    assert task_type("sciworld:1-1@test?max_steps=9") == "sciworld/boil"  # the paper id resolves
    assert task_type("textworld:cooking@test?games=4") == "textworld/cooking"
    assert task_type("babyai:OpenDoorLoc?max_steps=24") == "babyai/OpenDoorLoc"
    assert task_group("sciworld/power-component") == "sciworld topic 3 (electricity)"
    assert task_group("babyai/BlockedUnlockPickup") == "babyai Unlock"  # not Pickup: the first match wins
    assert task_group("babyai/PutNextS5N2") == "babyai PutNext"
    assert task_group("textworld/cooking") == "textworld/cooking"


def test_disjoint_sets_pass_and_are_reported():
    report = check_unseen(TRAIN, ["babyai:PutNextLocal", "sciworld:chemistry-mix@dev"],
                          ["babyai:OpenDoor", "sciworld:chemistry-mix-paint-secondary-color@test", "textworld:cooking@test"])
    assert set(report.types["test"]) == {"babyai/OpenDoor", "sciworld/chemistry-mix-paint-secondary-color",
                                         "textworld/cooking"}
    assert report.groups("dev")["sciworld topic 6 (chemistry)"] == ["sciworld/chemistry-mix"]  # dev and test share a topic
    assert report.lines()[0] == "train: 4 task types in 4 groups"


@pytest.mark.parametrize(("dev", "test", "message"), [
    ([], ["sciworld:1-1@test"], r"^test: task type sciworld/boil is also a training task type \(test spec "
                                r"'sciworld:1-1@test', training spec 'sciworld:boil'\)"),
    (["textworld:custom@dev"], [], r"^dev: task type textworld/custom is also a training task type"),
    ([], ["babyai:GoToObj"], r"^test: task type babyai/GoToObj .* is in babyai GoTo, which training covers with "
                             r"babyai/GoToLocal"),
    ([], ["sciworld:melt@test"], r"is in sciworld topic 1 \(matter\), which training covers with sciworld/boil"),
    (["babyai:OpenDoor"], ["babyai:OpenDoor?max_steps=9"], r"^test: task type babyai/OpenDoor is also a development"),
])
def test_overlaps_are_refused_naming_the_task_type(dev, test, message):
    with pytest.raises(ConfigError, match=message):
        check_unseen(TRAIN, dev, test)


def test_seen_groups_can_be_allowed():
    report = check_unseen(TRAIN, [], ["babyai:GoToObj", "sciworld:melt@test"], allow_seen_groups=True)
    assert set(report.types["test"]) == {"babyai/GoToObj", "sciworld/melt"}
    with pytest.raises(ConfigError, match="also a training task type"):  # types stay refused
        check_unseen(TRAIN, [], ["babyai:GoToLocal"], allow_seen_groups=True)


def _traj(task: str, ident: str, instance: str | None = None) -> Trajectory:
    meta = {"instance": instance} if instance else {}
    return Trajectory(ident, task, "Go.", [Step("move forward", "ok", 0.5)], 1.0, True, meta)


def test_records_of_a_training_type_are_refused():
    train = [_traj("babyai/GoToLocal", "a", "babyai:GoToLocal#seed=1")]
    assert check_unseen_records(train, [_traj("babyai/OpenDoor", "b")], "dev.jsonl") == {"babyai/OpenDoor"}
    with pytest.raises(DataError, match=r"^dev.jsonl: record 'c' has task type babyai/GoToLocal"):
        check_unseen_records(train, [_traj("babyai/OpenDoor", "b"), _traj("babyai/GoToLocal", "c")], "dev.jsonl")
    # an alias in the task field: the instance key names the canonical type
    sw = [_traj("sciworld/boil", "d", "sciworld:boil#var=3")]
    with pytest.raises(DataError, match="task type sciworld/boil"):
        check_unseen_records(sw, [_traj("sciworld/1-1", "e", "sciworld:boil#var=20")], "dev.jsonl")


def test_shipped_generalisation_configs_pass(capsys):
    report = main(["--train", f"[{GEN}/train_sciworld.yaml, {GEN}/train_textworld.yaml, {GEN}/train_babyai.yaml]",
                   "--dev", f"[{GEN}/dev_data.yaml]", "--test", f"[{GEN}/test_eval.yaml]"])
    out = capsys.readouterr().out
    assert "ok: development and test task types are unseen" in out
    def count(split: str, family: str) -> int:
        return sum(t.startswith(f"{family}/") for t in report.types[split])

    assert count("train", "sciworld") >= 12 and count("train", "babyai") >= 6 and count("train", "textworld") == 1
    assert count("test", "sciworld") >= 5 and count("dev", "sciworld") + count("test", "sciworld") >= 6
    test_groups = report.groups("test")
    assert {"textworld/cooking", "babyai Open", "babyai Unlock"} <= set(test_groups)
    assert len([g for g in test_groups if g.startswith("sciworld topic")]) >= 3


def _write(tmp_path: Path, name: str, data: dict) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_search_config_must_list_the_collected_specs(tmp_path):
    train = _write(tmp_path, "train.yaml", {"envs": ["babyai:GoToLocal"], "episodes": 50, "seed": 0})
    dev = _write(tmp_path, "dev.yaml", {"envs": ["babyai:PutNextLocal"], "episodes": 5, "seed": 0})
    good = {"held_out": ["babyai:OpenDoor"], "train_envs": ["babyai:GoToLocal", "babyai:PutNextLocal"],
            "train_seed": 0, "train_episodes": 50}
    check_configs(SplitsConfig(train=[train], dev=[dev], test=[_write(tmp_path, "t.yaml", good)]))
    for change, message in [({"train_envs": ["babyai:GoToLocal"]}, r"field 'train_envs' lacks 'babyai:PutNextLocal' "
                                                                    r"\(collected by .*dev.yaml\)"),
                            ({"train_seed": 3}, r"field 'train_seed' is 3, but .*train.yaml collects with seed 0"),
                            ({"train_episodes": 10}, r"field 'train_episodes' is 10, fewer than the 50 episodes")]:
        test = _write(tmp_path, "bad.yaml", {**good, **change})
        with pytest.raises(ConfigError, match=message):
            check_configs(SplitsConfig(train=[train], dev=[dev], test=[test]))
    with pytest.raises(ConfigError, match=r"nope.yaml: cannot read it"):
        check_configs(SplitsConfig(train=[str(tmp_path / "nope.yaml")]))
    with pytest.raises(ConfigError, match=r"t2.yaml: field 'held_out': missing or empty"):
        check_configs(SplitsConfig(train=[train], test=[_write(tmp_path, "t2.yaml", {"held_in": ["babyai:GoToLocal"]})]))


def test_cli_reports_an_overlap_in_one_line(tmp_path, capsys):
    train = _write(tmp_path, "train.yaml", {"envs": ["babyai:GoToLocal"]})
    dev = _write(tmp_path, "dev.yaml", {"envs": ["babyai:GoToLocal?max_steps=5"]})
    with pytest.raises(SystemExit) as e:
        main(["--train", f"[{train}]", "--dev", f"[{dev}]"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "agentrm.data.splits: error: dev: task type babyai/GoToLocal is also a training task type")


def test_search_refuses_a_held_out_task_type_of_the_training_data(tmp_path):
    from agentrm.search.evaluate import EvalConfig, evaluate
    from agentrm.search.specs import ScorerSpec

    config = EvalConfig(out_dir=str(tmp_path / "eval"), held_out=["babyai:GoToLocal?max_steps=6"],
                        train_envs=["babyai:PickupLoc", "babyai:GoToLocal?max_steps=24"], episodes=1, seed=1000,
                        scorers=[ScorerSpec(kind="oracle")], best_of_n=[], beam=[], progress=False, show=False)
    with pytest.raises(ConfigError, match=r"^held_out: task type babyai/GoToLocal is also a training task type"):
        evaluate(config)
