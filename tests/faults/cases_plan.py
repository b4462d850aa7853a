"""Fault cases for ``python -m agentrm.plan``: the fit CLI's own parser checks its configs and flags."""

from __future__ import annotations

from tests.faults.harness import FaultCase

COMPOSED = ["--config", "configs/recipes/value_rm.yaml", "--config", "configs/recipes/full.yaml",
            "--config", "configs/models/llama3-8b.yaml"]

CASES: list[FaultCase] = [
    FaultCase(id="plan/flag-typo", covers="a mistyped fit flag is named with the closest valid ones (was ignored)",
              module="agentrm.plan", args=[*COMPOSED, "--trainer.devce", "2"],
              message=r"unknown option --trainer\.devce; did you mean --trainer\.devices"),
    FaultCase(id="plan/devices-zero", covers="--trainer.devices 0 refused instead of a plausible table",
              module="agentrm.plan", args=[*COMPOSED, "--trainer.devices", "0"],
              message=r"trainer\.devices: must be >= 1"),
    FaultCase(id="plan/config-key-typo", covers="a mistyped key in a config file, named with its file",
              module="agentrm.plan", args=[*COMPOSED, "--config", "{d}/typo.yaml"],
              setup=lambda d: (d / "typo.yaml").write_text("model:\n  init_args:\n    learnig_rate: 1.0\n"),
              message=r"unknown key 'learnig_rate' for ValueRMModule \(in .*typo\.yaml\); did you mean 'learning_rate'"),
    FaultCase(id="plan/missing-config", covers="a config file that is not there", module="agentrm.plan",
              args=["--config", "{d}/nope.yaml"], message=r"nope\.yaml"),
    FaultCase(id="plan/fit-flags-on-a-search-config", covers="fit flags given with a search config are refused",
              module="agentrm.plan", args=["--config", "configs/search/llama3-8b_nf4.yaml", "--trainer.devices", "2"],
              message=r"config: .*llama3-8b_nf4\.yaml is a search config; fit flags"),
    FaultCase(id="plan/reserved-exceeds-gpu", covers="a reserve larger than the GPU", module="agentrm.plan",
              args=["--config", "configs/search/llama3-8b_nf4.yaml", "--gpu-gb", "40", "--reserved-gb", "60"],
              message=r"reserved_gb: 60\.0 GB held by others leaves nothing of a 40\.0 GB GPU"),
    FaultCase(id="plan/unknown-backbone", covers="an architecture the planner cannot tell, named with the way out",
              module="agentrm.plan", args=[*COMPOSED, "--model.init_args.backbone", "someone/not-a-model"],
              message=r"unknown backbone 'someone/not-a-model'"),
]
