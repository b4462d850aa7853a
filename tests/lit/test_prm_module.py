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


def test_mse_loss_regresses_the_implicit_reward_onto_the_trajectory_reward(tiny_tokenizer):
    """loss="mse" is (beta * sum log-ratio - reward)^2; "bce" is BCE-with-logits against success."""
    import pytest
    import torch
    import torch.nn.functional as F

    from agentrm.data.collate import collate_trajectories
    from agentrm.data.tokenize import tokenize_trajectory
    from agentrm.lit.prm_module import ImplicitPRMModule
    from tests.conftest import make_trajectory
    from tests.lit.conftest import TINY_BACKBONE

    trajs = [make_trajectory(f"t{i}", 2 + i) for i in range(3)]
    for t, r in zip(trajs, (0.25, 1.0, 0.0)):
        t.reward, t.success = r, r == 1.0
    batch = collate_trajectories([tokenize_trajectory(tiny_tokenizer, t) for t in trajs],
                                 pad_token_id=tiny_tokenizer.pad_token_id)
    torch.manual_seed(0)
    mse = ImplicitPRMModule(tokenizer="agentrm/assets/tiny_tokenizer", backbone_config=TINY_BACKBONE, beta=0.5,
                            loss="mse")
    with torch.no_grad():
        for p in mse.model.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
        loss, r = mse._outcome_loss(batch)
        total = 0.5 * (mse.model.step_rewards(batch) / 0.5 * batch["step_mask"]).sum(dim=1)
        torch.testing.assert_close(loss, F.mse_loss(total, batch["reward"]))
        assert float(total.abs().max()) > 1e-4  # the policy moved away from its reference
        mse.hparams.loss = "bce"
        bce, _ = mse._outcome_loss(batch)
        torch.testing.assert_close(bce, F.binary_cross_entropy_with_logits(total, batch["success"]))
    with pytest.raises(ValueError, match="loss must be"):
        ImplicitPRMModule(backbone_config=TINY_BACKBONE, loss="hinge")


def test_full_training_reference_loads_from_the_weights_path_in_its_dtype(tiny_tokenizer, tmp_path, monkeypatch):
    """With a ``backbone`` path the reference is read from it in ``reference_dtype`` (no copy of the fp32
    policy); its weights and log-probs equal the old path's (deepcopy of the policy, then the cast)."""
    import copy

    import torch

    import agentrm.models.implicit_prm as implicit_prm
    from agentrm.data.collate import collate_trajectories
    from agentrm.data.tokenize import tokenize_trajectory
    from agentrm.lit.prm_module import ImplicitPRMModule
    from agentrm.models.backbone import build_backbone
    from tests.conftest import make_trajectory
    from tests.lit.conftest import TINY_BACKBONE

    torch.manual_seed(0)
    build_backbone(config=TINY_BACKBONE, vocab_size=len(tiny_tokenizer), causal_lm=True).save_pretrained(tmp_path / "m")

    def no_copy(*a, **k):
        raise AssertionError("the reference was copied from the policy instead of loaded from its path")

    monkeypatch.setattr(implicit_prm, "frozen_copy", no_copy)
    module = ImplicitPRMModule(backbone=str(tmp_path / "m"), dtype="float32", reference_dtype="bfloat16",
                               attn_implementation="sdpa")
    prm = module.model
    policy, ref = prm.policy, prm.reference
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    assert {p.dtype for p in ref.parameters()} == {torch.bfloat16} and not any(p.requires_grad for p in ref.parameters())
    n_params = sum(p.numel() for p in policy.parameters())
    assert sum(p.numel() * p.element_size() for p in ref.parameters()) == 2 * n_params  # half the policy's bytes
    assert not {p.data_ptr() for p in ref.parameters()} & {p.data_ptr() for p in policy.parameters()}
    old = copy.deepcopy(policy).to(torch.bfloat16)  # what the reference was before
    for (name, a), b in zip(ref.state_dict().items(), old.state_dict().values()):
        assert torch.equal(a, b), name  # the same bf16 weights
    items = [tokenize_trajectory(tiny_tokenizer, make_trajectory(f"t{i}", n)) for i, n in enumerate([3, 2])]
    batch = collate_trajectories(items, tiny_tokenizer.pad_token_id)
    rows, targets, _, _ = implicit_prm.action_token_rows(batch)
    new_lp = prm.reference_logprobs(batch, rows, targets)
    old_lp = implicit_prm.ImplicitPRM(policy, reference=old).reference_logprobs(batch, rows, targets)
    assert torch.equal(new_lp, old_lp)
    # with LoRA the reference stays the base with its adapter disabled: nothing loaded
    lora = ImplicitPRMModule(backbone=str(tmp_path / "m"), lora={"r": 2, "target_modules": ["q_proj"]})
    assert lora.model.reference is None
