import csv

import yaml

from agentrm.fit import main
from agentrm.models.implicit_prm import ImplicitPRM


def test_implicit_prm_fit_learns_outcomes(tiny_setup, tmp_path):
    cfg, run = tiny_setup
    y = yaml.safe_load(open(cfg))
    y["model"] = {"class_path": "agentrm.lit.prm_module.ImplicitPRMModule",
                  "init_args": {"backbone_config": y["model"]["init_args"]["backbone_config"],
                                "beta": 0.5, "learning_rate": 3e-3, "warmup_steps": 2}}
    y["trainer"]["max_epochs"] = 5
    p = tmp_path / "prm.yaml"
    p.write_text(yaml.safe_dump(y))
    cli = main(["--config", str(p)])
    rows = list(csv.DictReader(open(next((run / "logs").glob("version_*/metrics.csv")))))
    losses = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(losses) == 5 and losses[-1] < 0.7 * losses[0], losses
    assert float(cli.trainer.callback_metrics["val/auroc"]) > 0.8
    prm = ImplicitPRM.from_pretrained(run / "hf_model")
    batch = next(iter(cli.datamodule.val_dataloader()))
    scores = prm.score_trajectory(batch, "sum")
    succ = batch["success"].bool()
    assert scores[succ].mean() > scores[~succ].mean()
