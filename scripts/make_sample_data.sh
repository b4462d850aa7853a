#!/usr/bin/env bash
# Regenerates agentrm/assets/babyai_sample.jsonl (deterministic; resumes if interrupted).
python -m agentrm.collect --out agentrm/assets/babyai_sample.jsonl --envs "[babyai:GoToRedBall?max_steps=24, babyai:GoToObj?max_steps=24, babyai:GoToLocal?max_steps=24, babyai:PickupLoc?max_steps=24]" --episodes 75 --error_rate 0.6 --rollouts 4 --siblings 1 --seed 0 --workers 2 "$@"
