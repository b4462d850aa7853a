#!/usr/bin/env bash
# Regenerates agentrm/assets/babyai_sample.jsonl (deterministic; resumes if interrupted).
python -m agentrm.collect --out agentrm/assets/babyai_sample.jsonl --levels '[GoToRedBall, GoToObj, GoToLocal, PickupLoc]' --episodes 75 --error_rate 0.6 --max_steps 24 --rollouts 4 --siblings 1 --seed 0 --workers 2 "$@"
