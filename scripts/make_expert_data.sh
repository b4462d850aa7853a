#!/usr/bin/env bash
# Regenerates agentrm/assets/babyai_expert.jsonl: expert demonstrations for behaviour cloning
# (the BabyAI bot with error_rate 0; --rollouts 0 skips Monte-Carlo values, so it is fast).
# Deterministic; resumes if interrupted.  Same training levels and step limit as the RM data.
python -m agentrm.collect --out agentrm/assets/babyai_expert.jsonl --envs '[babyai:GoToRedBall?max_steps=24, babyai:GoToObj?max_steps=24, babyai:GoToLocal?max_steps=24, babyai:PickupLoc?max_steps=24]' --episodes 180 --error_rate 0.0 --rollouts 0 --siblings 0 --seed 0 --workers 1 "$@"
